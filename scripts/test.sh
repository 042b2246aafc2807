#!/usr/bin/env bash
# Set up (with test dependencies), lint, type-check and run the whole test suite. Extra arguments go
# to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the quick tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
