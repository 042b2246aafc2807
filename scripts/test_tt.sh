#!/usr/bin/env bash
# The TT validation tier, as CI runs it: set up .venv-tt, then run tests/tt against the pinned ttnn on
# mock clusters -- mock validation, no numerics (docs/tt-validation.md). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_tt.sh
exec .venv-tt/bin/python -m pytest tests/tt "$@"
