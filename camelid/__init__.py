"""camelid: train, align and serve LLaMA-family chat models on one machine."""

__version__ = "0.1.0"
