"""Transformer-XL-style language models with Elliptical, QUEST and other attention variants."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """A trained model from a checkpoint, an `lm export` folder or hf://owner/name (see ``lm.api``)."""
    from lm.api import load as _load

    return _load(path, device)
