#!/usr/bin/env bash
# The Python package's checks (a step of scripts/test.sh): rustfmt and clippy on its extension crate,
# then `pip install ./python` into a virtual environment and pytest on python/tests (opcheck on every
# op, PEFT parity, an adapter written by the crate loaded by PEFT, the README's example).
#
# The environment lives in $MOLORA_VENV (default ~/.cache/molora-venv) and is made once: torch, peft,
# transformers, safetensors, pytest and maturin from PyPI (torch's Linux wheel is its CUDA build,
# about 3 GB installed with its NVIDIA libraries; about a minute to fetch here).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MOLORA_VENV:-$HOME/.cache/molora-venv}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
fi
# pip's downloads are cached too (torch and its NVIDIA libraries are most of the cost of a new venv).
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}"
if ! "$py" -c "import torch, peft, transformers, safetensors, pytest, maturin" 2>/dev/null; then
  "$py" -m pip install --quiet --upgrade pip
  "$py" -m pip install --quiet "torch>=2.4" "peft>=0.13" "transformers>=4.40" "safetensors>=0.4" \
    "pytest>=7" "maturin>=1.5,<2"
fi
export PYO3_PYTHON="$py" PATH="$venv/bin:$PATH"
cargo fmt --manifest-path python/Cargo.toml -- --check
cargo clippy --manifest-path python/Cargo.toml --all-targets -- -D warnings
# The CUDA half of the extension (python/src/gpu.rs) is linted where nvcc is (scripts/test.sh puts it
# on PATH): it builds the kernels for one architecture; it runs only on a GPU (scripts/gpu-check.sh).
if command -v nvcc >/dev/null 2>&1; then
  MOLORA_CUDA_ARCHS=80 cargo clippy --manifest-path python/Cargo.toml --all-targets --features cuda -- -D warnings
fi
"$py" -m pip install --quiet --no-build-isolation --force-reinstall --no-deps ./python
# From outside the source tree, so the tests import the installed package, not python/molora.
root=$PWD
(cd "$(mktemp -d)" && "$py" -m pytest -q -rs "$root/python/tests")
