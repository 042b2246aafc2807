#!/usr/bin/env bash
# The TT validation tier, as CI runs it: set up .venv-tt (with torch, for the numerics emulation and the
# torch-side runner), then run tests/tt against the pinned ttnn on mock clusters -- mock validation, no
# numerics -- and the host emulation of the port's numerics with ttnn's own block-float rounding
# (docs/tt-validation.md). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_tt.sh --with-torch
exec .venv-tt/bin/python -m pytest tests/tt "$@"
