#!/usr/bin/env bash
# The project's test command (README), and what CI runs: format, lints with and without `cuda` and
# with `candle-cuda`, the test suite on the CPU, and the test suite built with the CUDA kernels (GPU
# tests skip with a printed line when no GPU is present; MOLORA_REQUIRE_GPU=1 makes them fail
# instead).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

CUDA_HOME=$(scripts/cuda-toolkit.sh)
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"

step() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (CPU)"
cargo clippy --all-targets -- -D warnings

step "cargo clippy (cuda)"
cargo clippy --all-targets --features cuda -- -D warnings

# candle's CUDA backend links the CUDA libraries (libcuda, cuBLAS, cuRAND, NVRTC), which a machine
# without a GPU lacks, so this build is linted, not linked or run. Its nvcc for candle's own kernels
# is scripts/nvcc-lint.sh (empty outputs: a lint needs none of candle's ~11 minutes of kernels); our
# kernels are compiled for real, for one architecture.
step "cargo clippy (candle-cuda)"
MOLORA_CUDA_ARCHS=80 CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}" NVCC="$PWD/scripts/nvcc-lint.sh" \
  cargo clippy --all-targets --features candle-cuda -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --features cuda

log=$(mktemp)
trap 'rm -f "$log"' EXIT

step "cargo test (CPU)"
cargo test 2>&1 | tee -a "$log"

step "cargo test (cuda)"
cargo test --features cuda 2>&1 | tee -a "$log"

skipped=$(grep -c '^skipping ' "$log" || true)
step "all checks passed in $(( $(date +%s) - start )) s ($skipped GPU test cases skipped: no GPU)"
# One closing line for both runs: the totals of every `test result:` line above.
awk '/^test result:/ { p += $4; f += $6 } END { printf "molora: %d passed, %d failed\n", p, f }' "$log"
