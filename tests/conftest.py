"""Shared test set-up: import paths and fixtures. Plain helpers live in tests/helpers.py.

Markers (setup.cfg): ``slow`` = end-to-end runs (training through the CLI, benchmark scripts, processes
killed and resumed); ``pytest -m "not slow"`` is the quick unit run."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning  # noqa: F401
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The repository (lm, corruptions, even without an install) and scripts/ (bench, reproduce) import as
# top-level modules in every test file.
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
# (`import lightning` above, at collection: Lightning's log handler keeps the stderr of the moment it is first
# imported. `lm.cli` no longer imports Lightning, so without this the first test to run `lm fit` under capsys
# would hand it a captured stream that is closed once that test ends: "--- Logging error ---" in later tests.)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add contention on a loaded 2-core box. Restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
