from raybig.cli import main

main()
