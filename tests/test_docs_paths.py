"""What the README and docs/ name exists, and setup.cfg declares what the code imports with a tested range.

A path in the docs is checked when it starts with one of the repository's own folders (configs/, scripts/,
docs/, lm/, corruptions/, tests/) and names a file; ``{a,b}`` is expanded as the shell would. Run outputs
(runs/, results/, data/) are not checked: they exist only after a command ran."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OWN = ("configs", "scripts", "docs", "lm", "corruptions", "tests")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./{},*<>-]*\.(?:yaml|py|sh|md|json|txt))" % "|".join(OWN))


def expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in expand(path[:m.start()] + alt + path[m.end():])]


def named_paths() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for raw in PATH.findall(doc.read_text(encoding="utf-8")):
            if "<" in raw or "*" in raw:  # a pattern (runs/<name>/..., tests/test_*.py), not one file
                continue
            out += [(doc.relative_to(ROOT).as_posix(), p) for p in expand(raw)]
    return sorted(set(out))


def test_the_docs_name_config_paths():
    configs = [p for _, p in named_paths() if p.startswith("configs/")]
    assert len(configs) > 20 and "configs/wikitext2/tiny.yaml" in configs  # the pattern finds them


@pytest.mark.parametrize("doc, path", named_paths(), ids=lambda x: x)
def test_every_path_the_docs_name_exists(doc, path):
    assert (ROOT / path).exists(), f"{doc} names {path}, which does not exist"


# ----- dependencies ----------------------------------------------------------------------------------------------
def requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


# import name -> distribution name, where they differ
DIST = {"yaml": "pyyaml", "lightning": "lightning", "huggingface_hub": "huggingface-hub"}
OPTIONAL = {"matplotlib", "pytest"}  # extras: [plot], [test]


def third_party_imports() -> set[str]:
    names = set()
    for pkg in ("lm", "corruptions", "scripts"):
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names.add(node.module.split(".")[0])
    own = {"lm", "corruptions"} | {p.stem for p in (ROOT / "scripts").glob("*.py")}  # scripts import each other
    return {n for n in names if n not in sys.stdlib_module_names and n not in own}


def test_every_imported_package_is_declared():
    declared = set(requirements())
    missing = sorted(n for n in third_party_imports() - OPTIONAL
                     if DIST.get(n, n).lower().replace("_", "-") not in declared)
    assert not missing, f"imported but not in setup.cfg install_requires: {missing}"


def test_every_requirement_has_a_tested_range():
    for name, req in requirements().items():
        ops = {s.operator for s in req.specifier}
        assert ">=" in ops, f"{req}: no lower bound"
        assert "<" in ops or name == "fsspec", f"{req}: no upper bound (fsspec alone has date versions)"
        assert metadata.version(name) in req.specifier, f"installed {name} {metadata.version(name)} is outside {req}"
    assert sum(r.name.lower() == "omegaconf" for r in requirements().values()) == 0  # via jsonargparse[omegaconf]
