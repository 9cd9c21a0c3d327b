"""raybig: train, tune and serve GPT-style models with DeepSpeed ZeRO on Ray, from one YAML spec."""

__version__ = "0.1.0"
