// Shared device helpers of molora's kernels.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "molora.h"

namespace molora {

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

// Launch epilogue: the error of the launch just enqueued (configuration errors show up here).
inline int last_launch_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace molora
