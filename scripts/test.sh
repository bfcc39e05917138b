#!/usr/bin/env bash
# Quick start, step 2: set up a virtual environment with every extra and the test tools, then run
# the whole suite: lint (ruff), types (mypy --strict) and the tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
echo "== ruff"
.venv/bin/ruff check celeriac tests examples benchmarks
.venv/bin/ruff format --check celeriac tests examples benchmarks
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
