#!/usr/bin/env bash
# Prints a CUDA_HOME that holds nvcc 13.0, getting one if needed, and makes sure libclang (for
# bindgen) and clang (for the emulated device) are present. Idempotent: a second run only prints the path.
#
#   export CUDA_HOME=$(scripts/cuda-toolkit.sh) PATH="$CUDA_HOME/bin:$PATH"
#
# Order: $CUDA_HOME if it holds bin/nvcc; an nvcc on PATH; /usr/local/cuda; otherwise NVIDIA's own
# PyPI wheels (nvcc, nvvm, crt, runtime headers + static cudart, cccl), unpacked once into
# ${XDG_CACHE_HOME:-~/.cache}/cuda-13.0. Everything but the path goes to stderr.
set -euo pipefail

# libclang is what bindgen parses cuda/include/molora.h with. Missing, it is installed when this runs
# as root with apt-get; otherwise the script says how and goes on (nvcc is still useful without it).
ensure_libclang() {
  # No `grep -q`: under pipefail an early exit of grep can fail the pipeline with SIGPIPE.
  if ldconfig -p 2>/dev/null | grep 'libclang[-.0-9]*\.so' >/dev/null; then return 0; fi
  # libclang.so or libclang-N.so, not libclang-cpp.so (the C++ API, which bindgen cannot load).
  if compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null; then return 0; fi
  if compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null; then return 0; fi
  if [ -n "${LIBCLANG_PATH:-}" ] && compgen -G "$LIBCLANG_PATH/libclang[.-]*so*" >/dev/null; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "cuda-toolkit.sh: installing libclang-dev for bindgen" >&2
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev) >&2; then
      return 0
    fi
    echo "cuda-toolkit.sh: apt-get could not install libclang-dev" >&2
  fi
  echo "cuda-toolkit.sh: libclang not found; bindgen (the \`cuda\` feature) needs it. Install it with" \
       "\`sudo apt-get install libclang-dev\` (Debian/Ubuntu), \`dnf install clang-devel\` (Fedora)," \
       "or set LIBCLANG_PATH to the folder holding libclang.so" >&2
}

# Clang compiles the emulated device's kernels (feature `emu`, scripts/test.sh emu). Missing, it is
# installed like libclang; otherwise the script says how and goes on.
ensure_clang() {
  if command -v clang++ >/dev/null 2>&1 || compgen -G '/usr/bin/clang++-[0-9]*' >/dev/null; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "cuda-toolkit.sh: installing clang for the emulated device" >&2
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang) >&2; then
      return 0
    fi
    echo "cuda-toolkit.sh: apt-get could not install clang" >&2
  fi
  echo "cuda-toolkit.sh: clang not found; the emulated device (feature \`emu\`) needs it. Install it with" \
       "\`sudo apt-get install clang\` or set MOLORA_EMU_CXX to a clang++" >&2
}

find_cuda() {
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME"; return; fi
  if command -v nvcc >/dev/null 2>&1; then dirname "$(dirname "$(command -v nvcc)")"; return; fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; return; fi
  local dest="${XDG_CACHE_HOME:-$HOME/.cache}/cuda-13.0"
  if [ ! -x "$dest/bin/nvcc" ]; then
    echo "cuda-toolkit.sh: fetching nvcc 13.0 from PyPI into $dest" >&2
    local tmp; tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$tmp" \
      nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
    mkdir -p "$tmp/site"
    for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/site" >&2; done
    rm -rf "$dest"; mkdir -p "$(dirname "$dest")"
    mv "$tmp/site/nvidia/cu13" "$dest"
    chmod +x "$dest"/bin/* "$dest"/nvvm/bin/* 2>/dev/null || true
    # nvcc links host code against libcudart.so; the wheel ships only the versioned name.
    [ -e "$dest/lib/libcudart.so" ] || ln -s libcudart.so.13 "$dest/lib/libcudart.so"
    [ -e "$dest/lib64" ] || ln -sfn lib "$dest/lib64"
    rm -rf "$tmp"
  fi
  echo "$dest"
}

# MOLORA_CUDA_BLAS=1: also cuBLAS and cuRAND (NVIDIA's PyPI wheels, unpacked into the same folder), which
# a `candle-cuda` build links at build time (candle's choice); the nvcc wheels do not hold them. For
# building GPU bundles with candle's backend; CI does not need it.
ensure_blas() {
  local home=$1
  [ "${MOLORA_CUDA_BLAS:-0}" = 1 ] || return 0
  if compgen -G "$home/lib/libcublas.so*" >/dev/null && compgen -G "$home/lib/libcurand.so*" >/dev/null; then return 0; fi
  echo "cuda-toolkit.sh: fetching cuBLAS and cuRAND from PyPI into $home" >&2
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" "nvidia-cublas>=13.0,<13.1" "nvidia-curand>=10.4,<10.5" >&2
  mkdir -p "$tmp/site"
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/site" >&2; done
  cp -a "$tmp/site/nvidia/cu13/lib/." "$home/lib/" 2>/dev/null || cp -a "$tmp/site/nvidia/cu13/lib64/." "$home/lib/"
  cp -a "$tmp/site/nvidia/cu13/include/." "$home/include/"
  # The linker wants the unversioned names; the wheels ship the versioned ones.
  for l in cublas cublasLt curand; do
    if [ ! -e "$home/lib/lib$l.so" ]; then
      local v; v=$(cd "$home/lib" && ls lib$l.so.* 2>/dev/null | sort | head -1)
      [ -n "$v" ] && ln -s "$v" "$home/lib/lib$l.so"
    fi
  done
  rm -rf "$tmp"
}

ensure_libclang
ensure_clang
home=$(find_cuda)
ensure_blas "$home"
echo "$home"
