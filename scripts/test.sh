#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (slow end-to-end tests included).
# Locally, `bash scripts/test.sh -m "not slow"` skips the slow ones.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
# --durations: every CI log names its slowest tests, so a suite creeping past 10 minutes shows where.
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
