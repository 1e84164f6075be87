#!/usr/bin/env bash
# The project's test command (README), and what CI runs: format, lints with and without `cuda`/`emu`
# and with `candle-cuda`, the test suite on the CPU, the Python package (scripts/python-test.sh), and
# the kernel suite (tests/cuda_*.rs and
# tests/emu_selftest.rs) on the emulated device: every kernel of cuda/ compiled for the CPU and checked
# (memory, races, barriers, uninitialised reads) against the CPU reference.
#
#   scripts/test.sh        everything (what .ci/run calls)
#   scripts/test.sh emu    the kernel suite on the emulated device alone
#
# MOLORA_EMU_CASES=N caps the cases of each property test on the emulated device (the shapes keep their
# odd sizes and tails); by default the emulated run takes the full counts, as a GPU run does. GPU tests run on a GPU when
# one is present (MOLORA_DEVICE=gpu|emu forces one); MOLORA_REQUIRE_GPU=1 makes a missing GPU a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
mode="${1:-all}"
case "$mode" in
  all|emu) ;;
  *) echo "usage: scripts/test.sh [emu]" >&2; exit 2 ;;
esac

CUDA_HOME=$(scripts/cuda-toolkit.sh)
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
# espeak-ng for the speech tests; with it installed, a missing espeak-ng is a failure, not a skip.
if [ "$mode" = all ]; then
  scripts/speech-deps.sh >&2
  export MOLORA_REQUIRE_ESPEAK=1
fi

step() { printf '\n== %s\n' "$*"; }
start=$(date +%s)
log=$(mktemp)
emu_log=$(mktemp)
py_log=$(mktemp)
trap 'rm -f "$log" "$emu_log" "$py_log"' EXIT

# The kernel suite on the emulated device; ends with `emu: N passed, M failed, K skipped`.
emu_suite() {
  step "kernel suite on the emulated device (MOLORA_DEVICE=emu, ${MOLORA_EMU_CASES:-full} cases per property)"
  local t0 rc=0
  t0=$(date +%s)
  MOLORA_DEVICE=emu MOLORA_TEST_CASES="${MOLORA_EMU_CASES:-}" \
    cargo test --no-fail-fast --features emu --lib --test 'cuda_*' --test emu_selftest 2>&1 | tee "$emu_log" || rc=$?
  cat "$emu_log" >> "$log"
  awk -v secs=$(( $(date +%s) - t0 )) '
    /^test result:/ { p += $4; f += $6 }
    { n = gsub(/skipping [A-Za-z_0-9]+: /, "&"); s += n }
    END { printf "emu: %d passed, %d failed, %d skipped (%d s)\n", p, f, s, secs }' "$emu_log"
  return "$rc"
}

if [ "$mode" = emu ]; then
  emu_suite
  exit 0
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (CPU)"
cargo clippy --all-targets -- -D warnings

step "cargo clippy (cuda, emu)"
cargo clippy --all-targets --features emu -- -D warnings

# candle's CUDA backend links the CUDA libraries (libcuda, cuBLAS, cuRAND, NVRTC), which a machine
# without a GPU lacks, so this build is linted, not linked or run. Its nvcc for candle's own kernels
# is scripts/nvcc-lint.sh (empty outputs: a lint needs none of candle's ~11 minutes of kernels); our
# kernels are compiled for real, for one architecture.
step "cargo clippy (candle-cuda)"
MOLORA_CUDA_ARCHS=80 CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}" NVCC="$PWD/scripts/nvcc-lint.sh" \
  cargo clippy --all-targets --features candle-cuda -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --features emu

step "cargo test (CPU)"
cargo test 2>&1 | tee -a "$log"

step "the Python package (pip install ./python, pytest python/tests)"
py_t0=$(date +%s)
scripts/python-test.sh 2>&1 | tee "$py_log"
py_summary=$(grep -E '^[0-9]+ passed' "$py_log" | tail -1 || true)
py_t1=$(date +%s)

emu_suite

skipped=$(grep -oE 'skipping [A-Za-z_0-9]+: ' "$log" | wc -l || true)
step "all checks passed in $(( $(date +%s) - start )) s ($skipped test cases skipped: GPU-only)"
# One closing line for both runs: the totals of every `test result:` line above.
awk '/^test result:/ { p += $4; f += $6 } END { printf "molora: %d passed, %d failed\n", p, f }' "$log"
echo "python: ${py_summary:-no pytest summary} ($(( py_t1 - py_t0 )) s)"
