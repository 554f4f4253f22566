"""Transformer-XL-style language models with Elliptical, QUEST and other attention variants."""

__version__ = "0.1.0"
