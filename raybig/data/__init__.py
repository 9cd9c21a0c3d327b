"""Training data: sources, tokenization and per-rank batch streams."""
