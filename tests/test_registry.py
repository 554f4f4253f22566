"""The attention registry is the list of variants: a variant file that exists but does not register
(or is not imported by the package, so never registers) fails here, not silently in a study."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import lm.model.attention as attention_pkg
from lm.model.attention import ATTENTION
from lm.model.attention.base import Attention

PKG_DIR = Path(attention_pkg.__file__).parent


def variant_modules() -> list[str]:
    names = []
    for path in sorted(PKG_DIR.rglob("*.py")):
        rel = path.relative_to(PKG_DIR).with_suffix("")
        if rel.name == "__init__" or rel.name in ("base", "common"):
            continue
        names.append("lm.model.attention." + ".".join(rel.parts))
    return names


def test_every_variant_file_is_imported_by_the_package():
    # importing lm.model.attention registers every variant: each file must be imported on the way
    missing = [m for m in variant_modules() if m not in sys.modules]
    assert not missing, f"not imported by lm/model/attention/__init__.py (so never registered): {missing}"


def test_every_attention_class_in_a_variant_file_is_registered():
    registered = set(ATTENTION.values())
    unregistered = []
    for name in variant_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, Attention) and cls is not Attention and cls not in registered:
                # allowed only as the shared base of registered variants (e.g. RKDE/SPKDE's kernel density base)
                if not any(issubclass(r, cls) for r in registered):
                    unregistered.append(f"{name}.{cls.__name__}")
    assert not unregistered, f"Attention subclasses without @register(...) (and no registered subclass): {unregistered}"
    assert len(variant_modules()) >= 10  # the scan found the variant files at all


def test_registry_names_are_the_classes_names():
    for name, cls in ATTENTION.items():
        assert cls.name == name and issubclass(cls, Attention)
