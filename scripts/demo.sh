#!/usr/bin/env bash
# Quick start, step 1: set up a virtual environment with celeriac and run the demo on the embedded
# SQLite default (a worker is started, add(30, 42) and more are sent, results printed, worker stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/python examples/demo.py
