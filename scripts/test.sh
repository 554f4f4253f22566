#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (slow end-to-end tests included).
# Locally, `bash scripts/test.sh -m "not slow"` skips the slow ones.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# -n 2 (pytest-xdist, worksteal): two test processes; most tests are short and wait on process start-up and
# imports, so two workers on two cores take the suite from ~10.5 to ~6 minutes. `-n 0` runs it in one process
# (a later -n wins). --durations: every CI log names its slowest tests, so a suite creeping past 10 minutes
# shows where.
python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=15 "$@"
