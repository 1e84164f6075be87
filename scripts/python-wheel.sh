#!/usr/bin/env bash
# Builds the PyTorch package with the CUDA kernels (`--features cuda`) as a wheel into .gpu/wheels/,
# for scripts/gpu-check.sh on a GPU machine (which has torch but no Rust). abi3: one wheel for every
# CPython ≥ 3.9. MOLORA_CUDA_ARCHS (default 80,90) names the GPUs it is built for.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MOLORA_VENV:-$HOME/.cache/molora-venv}"
[ -x "$venv/bin/maturin" ] || { echo "python-wheel.sh: no maturin in $venv (run scripts/python-test.sh once)" >&2; exit 2; }
CUDA_HOME=$(scripts/cuda-toolkit.sh)
export CUDA_HOME PATH="$CUDA_HOME/bin:$venv/bin:$PATH" PYO3_PYTHON="$venv/bin/python"
mkdir -p .gpu/wheels
rm -f .gpu/wheels/molora-*.whl
maturin build --release --features cuda -m python/Cargo.toml -o .gpu/wheels
ls -l .gpu/wheels
