"""The package's dependencies point one way (docs/architecture.md): every import in ``lm/`` and
``corruptions/`` -- at module level or inside a function, both are dependencies -- goes to the same
layer or a lower one. A backward import (the data layer importing evaluation code, a task importing
the command line) fails here with the file, the line and the two layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module belongs to the entry with the longest matching prefix.
LAYERS = [
    ("base", ["lm", "lm.errors", "lm.utils", "lm.checkpoint", "lm.precision"]),  # used by everything, imports nothing of ours
    ("config", ["lm.config"]),  # imports no model code: the model checks variant names against its registry
    # Attention variants are leaves of the model (they import no config and no other model module).
    ("attention", ["lm.model.attention", "lm.model.positions"]),
    ("model", ["lm.model"]),
    ("data", ["lm.data"]),
    ("tasks", ["lm.tasks"]),
    ("corruptions", ["corruptions"]),  # text to text: may use only the base (errors, atomic writes)
    ("eval", ["lm.eval"]),
    ("analysis", ["lm.analysis"]),
    ("export", ["lm.export"]),  # the export format: below the API, which reads and writes it
    ("api", ["lm.api", "lm.generate"]),  # the Python API, and `lm generate` on it
    ("cli", ["lm.cli", "lm.lightning_cli", "lm.__main__", "lm.rundir", "lm.trainer", "lm.summary"]),
]
# Layers a layer may NOT use although they are lower (side branches).
FORBIDDEN = {"corruptions": {"attention", "config", "model", "data", "tasks"}}


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of the project's own packages in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            # `from lm import checkpoint` imports the module lm.checkpoint, not (only) the package lm
            out += [(node.lineno, f"{name}.{a.name}" if (ROOT / f"{name}.{a.name}".replace(".", "/")).with_suffix(
                ".py").is_file() or (ROOT / f"{name}.{a.name}".replace(".", "/")).is_dir() else name)
                    for a in node.names]
    return sorted({(line, m) for line, m in out if m.split(".")[0] in ("lm", "corruptions")})


def sources() -> list[Path]:
    return sorted(p for pkg in ("lm", "corruptions") for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
    assert not unplaced, f"place these modules in tests/test_layering.py LAYERS (and docs/architecture.md): {unplaced}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    me = layer_of(module_name(path))
    name = LAYERS[me][0]
    bad = []
    for line, module in imports(path):
        target = layer_of(module)
        if target is None:
            continue  # reported by test_every_module_has_a_layer when it is a file of ours
        if target > me or LAYERS[target][0] in FORBIDDEN.get(name, ()):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({name} -> {LAYERS[target][0]})")
    assert not bad, "backward imports (layers, lowest first: " + " < ".join(n for n, _ in LAYERS) + "):\n" + "\n".join(bad)


def import_cycles(unit=lambda m: m) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (strongly connected components of
    the import graph, every import counted as in ``imports``): none may exist, also within one layer. With
    ``unit`` (e.g. ``package``) modules are merged first, so a loop through two packages counts too."""
    mods = {module_name(p): p for p in sources()}

    def owner(m: str) -> str:  # `from lm.x import f` is an edge to lm.x; a package's name to its __init__
        while m and m not in mods:
            m = m.rpartition(".")[0]
        return m

    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        targets = {unit(owner(x)) for _, x in imports(p) if owner(x)}
        graph.setdefault(unit(m), set()).update(targets - {unit(m)})
    return strongly_connected({k: sorted(v) for k, v in graph.items()})


def strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups (of more than one node) that reach each other."""
    index, low, stack, cycles = {}, {}, [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in graph:
        if m not in index:
            visit(m)
    return cycles


def package(module: str) -> str:
    """``lm.model.attention.base`` -> ``lm.model``: the unit the docs and the issue tracker talk about."""
    return ".".join(module.split(".")[:2])


# Cycles known and still to be broken (each a list of modules, sorted). A new cycle fails the test below.
KNOWN_CYCLES: list[list[str]] = []  # (lm.cli <-> lm.summary ended: lm_cli lives in lm.lightning_cli)


def test_no_import_cycles():
    cycles = import_cycles()
    # lm.api used lm.export (to load an export) while lm.export used lm.api (for `lm generate`): issue 32.
    assert not [c for c in cycles if {"lm.api", "lm.export"} & set(c)]
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, f"new import cycles (break them so dependencies point one way): {new}"


def test_the_check_sees_a_backward_import(tmp_path, monkeypatch):
    # The checker itself: a data module importing evaluation code, inside a function, and a task importing
    # the command line through a relative import, are both found and both point up.
    import sys

    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    f = tmp_path / "lm" / "data" / "x.py"
    f.parent.mkdir(parents=True)
    f.write_text("import torch\n\n\ndef g():\n    from lm.eval.evaluate import evaluate\n    from .. import cli\n")
    (tmp_path / "lm" / "cli.py").write_text("")
    assert imports(f) == [(5, "lm.eval.evaluate"), (6, "lm.cli")]
    assert all(layer_of(m) > layer_of(module_name(f)) for _, m in imports(f))


def test_no_import_cycles_between_packages():
    # A cycle can hide behind modules that do not import each other: lm.config imported the attention
    # registry (lm.model.attention) while lm.model.transformer imports lm.config.
    known = [sorted({package(m) for m in c}) for c in KNOWN_CYCLES]
    new = [c for c in import_cycles(package) if c not in known]
    assert not new, f"import cycles between packages of lm/ (break them so dependencies point one way): {new}"


def test_the_cycle_check_sees_a_cycle_through_a_subpackage(tmp_path, monkeypatch):
    # Config importing the attention registry while the model imports the config: no module reaches
    # itself, but the packages lm.config and lm.model do.
    import sys

    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for f, text in {"lm/__init__.py": "", "lm/config.py": "def f():\n    from lm.model.attention import A\n",
                    "lm/model/__init__.py": "", "lm/model/attention/__init__.py": "A = 1\n",
                    "lm/model/transformer.py": "from lm.config import f\n"}.items():
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text(text)
    assert import_cycles() == []
    assert import_cycles(package) == [["lm.config", "lm.model"]]


def test_no_import_cycle_among_scripts():
    # scripts/ are run as scripts (scripts/ is sys.path[0]) and import each other by file name; a cycle
    # (study.py <-> study_report.py once did) works only while nobody imports the "wrong" one first.
    names = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    g: dict[str, set[str]] = {n: set() for n in names}
    for n in names:
        for node in ast.walk(ast.parse((ROOT / "scripts" / f"{n}.py").read_text(encoding="utf-8"))):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            g[n] |= {m for m in found if m in names and m != n}
    found = strongly_connected({k: sorted(v) for k, v in g.items()})
    assert not found, f"import cycles in scripts/: {found}"
