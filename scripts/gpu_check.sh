#!/usr/bin/env bash
# One GPU check (under 8 minutes on one GPU): see scripts/gpu_check.py for the steps.
# On a machine with the project's venv: `bash scripts/gpu_check.sh`. On a bare GPU image whose python3 has
# torch and lightning but not the rest (no internet there): first, on a machine with PyPI,
# `bash scripts/gpu_wheels.sh` (wheels into .whl/), carry .whl along; this script installs them.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import jsonargparse, omegaconf, pyarrow" >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch; print('[gpu_check] torch', torch.__version__, 'cuda', torch.cuda.is_available())"
command -v nvidia-smi >/dev/null && nvidia-smi -L
exec "$PY" scripts/gpu_check.py "$@"
