"""`python -m raybig`: the same as the `raybig` command."""

from raybig.cli import main

main()
