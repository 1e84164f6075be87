#!/usr/bin/env bash
# The one prepared GPU run (a machine with a GPU, the CUDA driver and compute-sanitizer; no Rust
# needed). Build the bundle first, on any machine with the toolkit:
#
#   ../shared/gpu/bundle --features emu        # every test, bench, binary and example into .gpu/
#   scripts/python-wheel.sh                    # the PyTorch package with the kernels, into .gpu/wheels/
#
# tests/candle_cuda.rs joins step 1 when the bundle is built with candle's CUDA backend, which links
# cuBLAS and cuRAND at build time (MOLORA_CUDA_BLAS=1 makes scripts/cuda-toolkit.sh fetch them):
#
#   MOLORA_CUDA_BLAS=1 CUDA_COMPUTE_CAP=90 ../shared/gpu/bundle --features "emu candle-cuda"
#
# and finds them at run time on LD_LIBRARY_PATH (below: the nvidia/*/lib folders of the machine's
# Python packages, PyTorch's CUDA libraries, are added when present).
#
# then, on the GPU machine, from the project's root (with .gpu carried along):
#
#   scripts/gpu-check.sh                       # ≤ 8 minutes on an H200; logs under $OUT
#
# 1. every CUDA test binary (tests/cuda_*.rs, tests/emu_selftest.rs, tests/candle_cuda.rs) with
#    MOLORA_REQUIRE_GPU=1 (GPU tests fail instead of skipping), full case counts;
#    tests/emu_selftest.rs holds the GPU to the same primitive answers as the emulated device;
# 2. the kernel suite on the emulated device too (MOLORA_DEVICE=emu), as CI runs it; then the PyTorch
#    package from .gpu/wheels on CUDA tensors (python/tests/test_cuda.py: every op against the CPU
#    path, PyTorch's sync debug mode on, opcheck), with the CPU suite when pytest is there;
# 3. compute-sanitizer memcheck over the CUDA test binaries and racecheck over the LoRA and backward
#    ones, with MOLORA_TEST_CASES=2 (racecheck 1);
# 4. ncu over the dense-gated tensor-core kernels at T = 4096, 4096→4096, E 8, r 16, top-2 (speed of
#    light: the limiter, DRAM and SM throughput, occupancy), when ncu is there;
# 5. the criterion benches of the GPU path, short (benches/cuda.rs);
# 6. the GPU bench tables for bf16 and f16, printed last (`molora bench --device cuda` when the binary
#    was built, else the example).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
[ -d .gpu/bin ] || { echo "gpu-check.sh: no .gpu/bin (run ../shared/gpu/bundle --features emu first)" >&2; exit 2; }
fail=0
summary=()
note() { summary+=("$*"); echo "$*"; }

# check LABEL LOG COMMAND...: runs the command with its output in $out/LOG, notes ok/FAIL.
check() {
  local label=$1 log=$2; shift 2
  if "$@" >"$out/$log" 2>&1; then
    note "$label ok   ${log%.log}: $(grep '^test result:' "$out/$log" | tail -1)"
  else
    fail=1; note "$label FAIL ${log%.log} (log: $log)"; tail -30 "$out/$log"
  fi
}

# cuBLAS / cuRAND for a candle-cuda bundle: the CUDA libraries of the machine's Python packages.
if py_libs=$(python3 - 2>/dev/null <<'PY'
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
dirs = set()
for base in (spec.submodule_search_locations if spec else []):
    for lib in glob.glob(os.path.join(base, "**", "lib", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
PY
); then
  [ -n "$py_libs" ] && export LD_LIBRARY_PATH="$py_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

cuda_tests=$(ls .gpu/bin/test-cuda_* .gpu/bin/test-emu_selftest .gpu/bin/test-candle_cuda 2>/dev/null)

echo "== 1. tests on the GPU (MOLORA_REQUIRE_GPU=1)"
for t in $cuda_tests; do
  check gpu "$(basename "$t").log" env MOLORA_REQUIRE_GPU=1 MOLORA_DEVICE=gpu "$t" --test-threads=1
done

echo "== 2. the same suite on the emulated device"
for t in $(ls .gpu/bin/test-cuda_* .gpu/bin/test-emu_selftest 2>/dev/null); do
  check emu "emu-$(basename "$t").log" env MOLORA_DEVICE=emu "$t" --test-threads=2
done

echo "== 2b. the PyTorch package on CUDA tensors (a wheel from scripts/python-wheel.sh in .gpu/wheels)"
wheel=$(ls .gpu/wheels/molora-*.whl 2>/dev/null | head -1)
if [ -n "$wheel" ] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  pydir=$(mktemp -d)
  if python3 -m pip install --quiet --no-deps --no-index --target "$pydir" "$wheel" >"$out/py-install.log" 2>&1; then
    # test_cuda.py compares every op on CUDA with the CPU path; the CPU suite runs too where pytest is.
    if python3 -c "import pytest" 2>/dev/null; then
      check python "python-tests.log" env PYTHONPATH="$pydir" MOLORA_PY_REQUIRE_CUDA=1 \
        python3 -m pytest -q -rs -s python/tests
      grep -E "CUDA-CPU error|passed|failed" "$out/python-tests.log" | tail -20
    else
      check python "python-cuda.log" env PYTHONPATH="$pydir" MOLORA_PY_REQUIRE_CUDA=1 \
        python3 python/tests/test_cuda.py
      grep -E "CUDA-CPU error|PASS|FAIL|python cuda" "$out/python-cuda.log" | tail -20
    fi
  else
    fail=1; note "python FAIL install of $wheel (log: py-install.log)"
  fi
else
  note "no wheel in .gpu/wheels or no CUDA torch: the PyTorch package's CUDA tests skipped"
fi

echo "== 3. compute-sanitizer (MOLORA_TEST_CASES=2, racecheck 1)"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for t in $(ls .gpu/bin/test-cuda_* | grep -v cuda_graph); do
    check memcheck "memcheck-$(basename "$t").log" env MOLORA_REQUIRE_GPU=1 MOLORA_DEVICE=gpu MOLORA_TEST_CASES=2 \
      compute-sanitizer --tool memcheck --error-exitcode 99 "$t" --test-threads=1
  done
  for t in .gpu/bin/test-cuda_lora .gpu/bin/test-cuda_backward; do
    [ -x "$t" ] || continue
    check racecheck "racecheck-$(basename "$t").log" env MOLORA_REQUIRE_GPU=1 MOLORA_DEVICE=gpu MOLORA_TEST_CASES=1 \
      compute-sanitizer --tool racecheck --error-exitcode 99 "$t" --test-threads=1
  done
else
  note "compute-sanitizer not found: sanitizer runs skipped"
fi

echo "== 4. ncu: the dense-gated tensor-core kernels"
if command -v ncu >/dev/null 2>&1 && [ -x .gpu/bin/bin-02_gpu_bench ]; then
  # One bf16 row (the first shape at T = 4096), a few iterations, every dg_* kernel's speed of light.
  # The first dg_ launches are the dense-gated forward's (its warm-up and timed runs).
  MOLORA_BENCH_NO_BACKWARD=1 timeout 180 ncu --kernel-name regex:dg_ \
    --launch-count 4 --section SpeedOfLight --section Occupancy --section LaunchStats \
    .gpu/bin/bin-02_gpu_bench bf16 2 4096 >"$out/ncu.log" 2>&1 \
    && note "ncu ok   (log: ncu.log)" || note "ncu FAIL (log: ncu.log)"
  grep -E "dg_|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Duration" "$out/ncu.log" | head -80
else
  note "ncu or the bench example not found: ncu skipped"
fi

echo "== 5. criterion benches of the GPU path (short)"
if [ -x .gpu/bin/bench-cuda ]; then
  timeout 240 .gpu/bin/bench-cuda --bench --warm-up-time 0.3 --measurement-time 1 2>&1 | tee "$out/criterion.log" \
    | grep -E "^cuda/|time:|thrpt:" || fail=1
else
  note "no bench-cuda in the bundle"
fi

echo "== 6. bench tables"
if [ -x .gpu/bin/bin-molora ]; then
  .gpu/bin/bin-molora bench --device cuda 2>&1 | tee "$out/bench.log" || fail=1
elif [ -x .gpu/bin/bin-02_gpu_bench ]; then
  for dt in bf16 f16; do .gpu/bin/bin-02_gpu_bench $dt 50 2>&1 | tee -a "$out/bench.log" || fail=1; done
else
  note "no bench binary in the bundle"
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
exit $fail
