#!/usr/bin/env bash
# Create (or reuse) .venv and install the package. Sourced by quickstart.sh and test.sh.
# torch: an installed torch (e.g. a CUDA build in the system Python) is kept by giving the venv access
# to system site-packages; otherwise torch==2.13.0 is installed explicitly: the version the suite was run with,
# the lower end of setup.cfg's range (torch>=2.13,<3), so a fresh CPU install gets exactly what was tested.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0"
  python -m pip install -q torch==2.13.0
fi
if ! python -c "import lm, corruptions, lightning, jsonargparse, tokenizers, pyarrow, huggingface_hub, pytest, xdist" >/dev/null 2>&1 \
   || [ setup.cfg -nt .venv/.installed ]; then
  echo "[setup] installing the package (editable) and its dependencies"
  python -m pip install -q -e ".[test,plot]"
  touch .venv/.installed
fi
