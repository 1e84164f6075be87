#!/usr/bin/env bash
# An nvcc for lint-only builds (cargo clippy / check, which never link): queries (`--version`,
# `--list-gpu-code`) go to the real nvcc in $CUDA_HOME, and compilations write valid but empty
# outputs (an empty object, an empty PTX file, an archive of the given objects) instead of compiling.
#
# scripts/test.sh points candle's kernel build (cudaforge reads $NVCC) at it for the `candle-cuda`
# lint: that lint type-checks our Rust against candle's CUDA API, and compiling candle's ~11 minutes
# of kernels adds nothing to it. molora's own build.rs ignores $NVCC and compiles our kernels for
# real. cudaforge re-runs when $NVCC changes, so a later build without it compiles candle's kernels
# properly. Never use this for a build that links or runs.
set -euo pipefail
real="${CUDA_HOME:?CUDA_HOME must name the real toolkit}/bin/nvcc"
out="" outdir="" lib=0 ptx=0
objs=() sources=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -o) out="${args[i + 1]}" ;;
    --output-directory | -odir) outdir="${args[i + 1]}" ;;
    --lib | -lib) lib=1 ;;
    --ptx | -ptx) ptx=1 ;;
    *.o) objs+=("${args[i]}") ;;
    *.cu) sources+=("${args[i]}") ;;
  esac
done
# PTX into a directory: one empty <name>.ptx per source.
if [ "$ptx" = 1 ] && [ -z "$out" ] && [ -n "$outdir" ]; then
  mkdir -p "$outdir"
  for src in "${sources[@]}"; do
    base=$(basename "$src")
    : >"$outdir/${base%.cu}.ptx"
  done
  exit 0
fi
if [ -z "$out" ]; then exec "$real" "$@"; fi
mkdir -p "$(dirname "$out")"
if [ "$lib" = 1 ]; then
  rm -f "$out"
  ar rcs "$out" "${objs[@]}"
elif [ "$ptx" = 1 ]; then
  : >"$out"
else
  cc -c -x c /dev/null -o "$out"
fi
