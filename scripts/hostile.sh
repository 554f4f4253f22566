#!/usr/bin/env bash
# Replays issue 19's bad-input list against the `lm` command: every case must end in a non-zero exit with one
# paragraph and no traceback, and change nothing written before it (tests/test_hostile.py, which CI runs with
# the rest of the suite), plus the signal / lock / untrained-weights cases (tests/test_run_safety.py), the
# data-side cases of issue 31 (tests/test_hostile_data.py: memory guard, bounded reads, download leftovers),
# hostile checkpoints (pickles with code, URLs served from 127.0.0.1: tests/test_untrusted_ckpt.py) and records
# that must not overstate (limits, stops, concurrent evaluations: tests/test_records.py), and hostile exports,
# prompts and generation settings (tests/test_export_safety.py).
#
#   scripts/hostile.sh            # the six modules
#   scripts/hostile.sh -k corrupt # any pytest selection
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  exec "$PY" -m pytest -q -p no:cacheprovider tests/test_hostile.py tests/test_run_safety.py tests/test_hostile_data.py \
  tests/test_untrusted_ckpt.py tests/test_records.py tests/test_export_safety.py "$@"
