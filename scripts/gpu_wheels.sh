#!/usr/bin/env bash
# Wheels (CPython 3.12, x86-64) of the project's dependencies that a bare GPU image lacks, into .whl/
# for scripts/gpu_check.sh. Run where PyPI is reachable; add `/.whl/` to .git/info/exclude.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
for spec in jsonargparse docstring-parser typeshed-client importlib-resources omegaconf antlr4-python3-runtime==4.9.3 \
            pyarrow; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec" || python3 -m pip download -q --no-deps -d .whl "$spec"
done
ls .whl
