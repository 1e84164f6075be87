// Shared device helpers of molora's kernels.
#pragma once

#ifdef MOLORA_EMU
// The emulated device (feature `emu`): the same kernels compiled by the host compiler.
#include "emu/emu.cuh"
#else
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif
#include <stdint.h>

#include <atomic>

#include "molora.h"

// Shared memory. One declaration for nvcc and the emulated device, which allocates every array of a
// block on its own, sized exactly, so that out-of-bounds accesses, races and unwritten reads are caught:
//   MOLORA_SHARED(float, xs, [32][33]);               __shared__ float xs[32][33];
//   MOLORA_SHARED(int, carry, );                      __shared__ int carry;
//   MOLORA_SHARED_ALIGNED(32, T, tile, [16][40]);     __shared__ __align__(32) T tile[16][40];
//   MOLORA_DYNAMIC_SHARED(16, float, smem);           extern __shared__ __align__(16) float smem[];
#ifdef MOLORA_EMU
#define MOLORA_SHARED_ALIGNED(align, T, name, dims)                                                   \
    T(&name) dims = *reinterpret_cast<T(*) dims>(::emu::shared_array(sizeof(T dims), (align) > alignof(T) ? (align) : alignof(T), #name, __FILE__, __LINE__))
#define MOLORA_SHARED(T, name, dims) MOLORA_SHARED_ALIGNED(alignof(T), T, name, dims)
#define MOLORA_DYNAMIC_SHARED(align, T, name) T *name = static_cast<T *>(::emu::dynamic_shared(#name, __FILE__, __LINE__))
#else
#define MOLORA_SHARED(T, name, dims) __shared__ T name dims
#define MOLORA_SHARED_ALIGNED(align, T, name, dims) __shared__ __align__(align) T name dims
#define MOLORA_DYNAMIC_SHARED(align, T, name) extern __shared__ __align__(align) T name[]
#endif

namespace molora {

#ifndef MOLORA_EMU
// Whether the current device has programmatic dependent launch (compute capability 9.0 and newer),
// read once per device.
inline bool pdl_supported() {
    constexpr int kMaxDevices = 64;
    static std::atomic<int> cache[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return false;
    int v = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
    if (v == 0) {
        int major = 0;
        v = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 ? 2 : 1;
        if (dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
    }
    return v == 2;
}
#endif

// The error of the last molora::launch on this host thread (0 = enqueued). Kept here rather than read
// back with cudaGetLastError, which also returns an earlier asynchronous error of another op.
inline thread_local int tl_launch_error = 0;

// Launches kernel K: cudaLaunchKernelEx on nvcc (which returns the launch's own error), the emulator's
// launch on the emulated device. Its error is read with last_launch_error(). With `pdl` (sm_90) the
// launch may start before its predecessor on the stream has finished: K must call pdl_wait()
// (cuda/tc.cuh) before it reads anything the predecessor writes.
template <auto K, typename... A>
inline int launch_ex(bool pdl, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A... args) {
#ifdef MOLORA_EMU
    (void)pdl;
    ::emu::launch<K>(grid, block, smem, stream, args...);
    tl_launch_error = static_cast<int>(cudaGetLastError());
#else
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    if (pdl && pdl_supported()) {
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
    }
    tl_launch_error = static_cast<int>(cudaLaunchKernelEx(&cfg, K, args...));
#endif
    return tl_launch_error;
}
template <auto K, typename... A>
inline int launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A... args) {
    return launch_ex<K>(false, grid, block, smem, stream, args...);
}

// Launch epilogue: the error of the last launch on this thread (a configuration error, an exhausted
// resource), not an earlier asynchronous error of another op.
inline int last_launch_error() {
    const int e = tl_launch_error;
    tl_launch_error = 0;
    return e;
}

// The device's shared-memory limit per block with the opt-in (99 KiB on sm_86/89, 227 KiB on sm_90),
// read once per device; 0 when it cannot be read. Launchers choose a variant that fits by it.
inline int max_block_smem() {
#ifdef MOLORA_EMU
    int v = 0;
    return cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) == cudaSuccess ? v : 0;
#else
    constexpr int kMaxDevices = 64;
    static std::atomic<int> cache[kMaxDevices] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 0;
    if (dev >= kMaxDevices) {
        int v = 0;
        return cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess ? v : 0;
    }
    int v = cache[dev].load(std::memory_order_relaxed);
    if (v == 0 && cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess)
        cache[dev].store(v, std::memory_order_relaxed);
    return v;
#endif
}

// Lets kernel K use `bytes` of dynamic shared memory: cudaFuncSetAttribute once per device and kernel
// (again only for a larger size), not on every launch. Returns the CUDA error.
template <auto K>
inline int allow_dynamic_smem(int bytes) {
    if (bytes <= 0) return 0;
#ifdef MOLORA_EMU
    // The emulated architecture can change between launches (molora_emu_set_arch): no cache.
    return static_cast<int>(cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
#else
    constexpr int kMaxDevices = 64;
    static std::atomic<int> granted[kMaxDevices] = {};
    int dev = 0;
    const cudaError_t ge = cudaGetDevice(&dev);
    if (ge != cudaSuccess) return static_cast<int>(ge);
    if (dev >= 0 && dev < kMaxDevices && granted[dev].load(std::memory_order_relaxed) >= bytes) return 0;
    const cudaError_t err = cudaFuncSetAttribute(K, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess && dev >= 0 && dev < kMaxDevices) {
        int cur = granted[dev].load(std::memory_order_relaxed);
        while (cur < bytes && !granted[dev].compare_exchange_weak(cur, bytes, std::memory_order_relaxed)) {
        }
    }
    return static_cast<int>(err);
#endif
}

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

// The same sigmoid as the CPU reference: branch on the sign so exp never overflows.
__device__ __forceinline__ float sigmoid(float z) {
    if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
    const float e = expf(z);
    return e / (1.0f + e);
}

// Element conversions: exact widening to f32, round-to-nearest-even narrowing (as `half` does).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Index of the run holding row p: the largest q with offsets[q] <= p and offsets[q + 1] > p, for
// non-decreasing offsets[0..=n] and offsets[0] <= p < offsets[n].
__device__ __forceinline__ int find_run(const int32_t *offsets, int n, int p) {
    int lo = 0, hi = n;  // invariant: offsets[lo] <= p < offsets[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (offsets[mid] <= p) lo = mid; else hi = mid;
    }
    return lo;
}

// The typed C launcher of the grouped LoRA shrink (cuda/lora.cu), for host code of other kernel files
// that reuse it (router logits, the backward's u = dy·B).
template <typename T> inline int shrink_typed(const molora_lora_shrink_args *a, molora_stream_t s);
template <> inline int shrink_typed<float>(const molora_lora_shrink_args *a, molora_stream_t s) { return molora_lora_shrink_f32(a, s); }
template <> inline int shrink_typed<__half>(const molora_lora_shrink_args *a, molora_stream_t s) { return molora_lora_shrink_f16(a, s); }
template <> inline int shrink_typed<__nv_bfloat16>(const molora_lora_shrink_args *a, molora_stream_t s) {
    return molora_lora_shrink_bf16(a, s);
}

}  // namespace molora
