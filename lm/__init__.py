"""Transformer-XL-style language models with Elliptical, QUEST and other attention variants."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `lm.load` / `lm.Model` are the user API (lm.api, the top layer). The package root re-exports it lazily, so
    # `import lm` stays cheap and no module below the API imports it.
    if name in ("load", "Model", "Score"):
        import importlib

        return getattr(importlib.import_module("lm.api"), name)
    raise AttributeError(f"module 'lm' has no attribute {name!r}")
