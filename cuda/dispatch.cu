// Dispatch kernels: the stable counting sort of (token, slot) pairs by expert.
//
// 1. dispatch_count: each block counts the experts of its chunk of MOLORA_DISPATCH_CHUNK slots
//    (shared-memory histogram) into workspace[chunk * E + e].
// 2. dispatch_scan: one block turns the counts, read expert-major (e, then chunk), into exclusive
//    bases in place, and writes expert_offsets.
// 3. dispatch_scatter: each block ranks its chunk stably (warp __match_any_sync peers, then the
//    counts of the earlier warps of the block) and writes sorted_slots / slot_to_sorted.
// Chunks, warps and lanes follow slot order, so within an expert the order is by slot index, as on
// the CPU. Integer atomics only: the result does not depend on scheduling.

#include "common.cuh"

namespace molora {
namespace {

constexpr int kChunk = MOLORA_DISPATCH_CHUNK;
constexpr int kChunkWarps = kChunk / kWarp;
constexpr int kScanThreads = 1024;

__device__ __forceinline__ int valid_expert(const int32_t *ids, int i, int n, int E) {
    if (i >= n) return -1;
    const int e = ids[i];
    return (e >= 0 && e < E) ? e : -1;
}

__global__ void __launch_bounds__(kChunk) dispatch_count(molora_dispatch_args a) {
    MOLORA_DYNAMIC_SHARED(16, int, hist);
    const int E = a.num_experts;
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int i = blockIdx.x * kChunk + threadIdx.x;
    const int e = valid_expert(a.ids, i, a.num_slots, E);
    if (e >= 0) atomicAdd(&hist[e], 1);
    __syncthreads();
    int32_t *counts = a.workspace + static_cast<int64_t>(blockIdx.x) * E;
    for (int x = threadIdx.x; x < E; x += blockDim.x) counts[x] = hist[x];
}

// Exclusive scan of v[e * chunks + c] = workspace[c * E + e], written back in place, one block.
__global__ void __launch_bounds__(kScanThreads) dispatch_scan(molora_dispatch_args a, int chunks) {
    MOLORA_SHARED(int, warp_sums, [kScanThreads / kWarp]);
    MOLORA_SHARED(int, carry, );
    const int E = a.num_experts;
    const int64_t n = static_cast<int64_t>(E) * chunks;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    for (int64_t base = 0; base < n; base += kScanThreads) {
        const int64_t v = base + threadIdx.x;
        int e = 0, c = 0, x = 0;
        if (v < n) {
            e = static_cast<int>(v / chunks);
            c = static_cast<int>(v % chunks);
            x = a.workspace[static_cast<int64_t>(c) * E + e];
        }
        // Inclusive warp scan, then across warps.
        int incl = x;
#pragma unroll
        for (int o = 1; o < kWarp; o <<= 1) {
            const int y = __shfl_up_sync(kFullMask, incl, o);
            if (lane >= o) incl += y;
        }
        if (lane == kWarp - 1) warp_sums[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            int s = warp_sums[lane];
#pragma unroll
            for (int o = 1; o < kWarp; o <<= 1) {
                const int y = __shfl_up_sync(kFullMask, s, o);
                if (lane >= o) s += y;
            }
            warp_sums[lane] = s;  // inclusive over warps
        }
        __syncthreads();
        const int before_warp = warp == 0 ? 0 : warp_sums[warp - 1];
        const int excl = carry + before_warp + incl - x;
        if (v < n) {
            a.workspace[static_cast<int64_t>(c) * E + e] = excl;
            if (c == 0) a.expert_offsets[e] = excl;
        }
        __syncthreads();
        if (threadIdx.x == 0) carry += warp_sums[kScanThreads / kWarp - 1];
        __syncthreads();
    }
    if (threadIdx.x == 0) a.expert_offsets[E] = carry;
}

__global__ void __launch_bounds__(kChunk) dispatch_scatter(molora_dispatch_args a) {
    MOLORA_DYNAMIC_SHARED(16, int, warp_counts);  // [kChunkWarps][E]
    const int E = a.num_experts;
    for (int x = threadIdx.x; x < kChunkWarps * E; x += blockDim.x) warp_counts[x] = 0;
    __syncthreads();
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int i = blockIdx.x * kChunk + threadIdx.x;
    const int e = valid_expert(a.ids, i, a.num_slots, E);
    const unsigned peers = __match_any_sync(kFullMask, e);
    const unsigned lower = (1u << lane) - 1u;
    const int rank = __popc(peers & lower);
    if (e >= 0 && rank == 0) warp_counts[warp * E + e] = __popc(peers);
    __syncthreads();
    const int total = a.expert_offsets[E];
    if (i < a.num_slots) {
        if (e >= 0) {
            int pos = a.workspace[static_cast<int64_t>(blockIdx.x) * E + e] + rank;
            for (int w = 0; w < warp; ++w) pos += warp_counts[w * E + e];
            a.sorted_slots[pos] = i;
            a.slot_to_sorted[i] = pos;
        } else {
            a.slot_to_sorted[i] = -1;
        }
        if (i >= total) a.sorted_slots[i] = -1;
    }
}

}  // namespace
}  // namespace molora

extern "C" int64_t molora_dispatch_workspace_len(int32_t num_slots, int32_t num_experts) {
    if (num_slots <= 0 || num_experts <= 0) return 0;
    const int64_t chunks = (static_cast<int64_t>(num_slots) + MOLORA_DISPATCH_CHUNK - 1) / MOLORA_DISPATCH_CHUNK;
    return chunks * num_experts;
}

extern "C" int molora_dispatch(const molora_dispatch_args *args, molora_stream_t stream) {
    using namespace molora;
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_dispatch_args a = *args;
    if (a.num_slots < 0 || a.num_experts < 1 || a.num_experts > MOLORA_DISPATCH_MAX_EXPERTS)
        return static_cast<int>(cudaErrorInvalidValue);
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (a.num_slots == 0) {
        // No pairs: every offset is 0.
        const cudaError_t err = cudaMemsetAsync(a.expert_offsets, 0, sizeof(int32_t) * (a.num_experts + 1), s);
        return static_cast<int>(err);
    }
    const int chunks = (a.num_slots + kChunk - 1) / kChunk;
    launch<dispatch_count>(chunks, kChunk, sizeof(int) * a.num_experts, s, a);
    int err = last_launch_error();
    if (err) return err;
    launch<dispatch_scan>(1, kScanThreads, 0, s, a, chunks);
    err = last_launch_error();
    if (err) return err;
    launch<dispatch_scatter>(chunks, kChunk, sizeof(int) * kChunkWarps * a.num_experts, s, a);
    return last_launch_error();
}

// ---- gather into sorted order, and scatter-combine back into token order -------------------------

namespace molora {
namespace {

constexpr int kRowThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRowThreads) gather_rows_kernel(molora_gather_rows_args a) {
    const int p = blockIdx.x;
    if (p >= a.expert_offsets[a.num_experts]) return;
    const int64_t src = a.sorted_slots[p] / a.k_max;
    const T *x = static_cast<const T *>(a.x) + src * a.d;
    T *out = static_cast<T *>(a.out) + static_cast<int64_t>(p) * a.d;
    for (int i = threadIdx.x; i < a.d; i += kRowThreads) out[i] = x[i];
}

template <typename T, typename R>
__global__ void __launch_bounds__(kRowThreads) scatter_combine_kernel(molora_scatter_combine_args a) {
    const int t = blockIdx.x;
    const R *rows = static_cast<const R *>(a.rows);
    T *y = static_cast<T *>(a.y) + static_cast<int64_t>(t) * a.d;
    const int64_t base = static_cast<int64_t>(t) * a.k_max;
    for (int o = threadIdx.x; o < a.d; o += kRowThreads) {
        float acc = 0.0f;
        bool any = false;
        for (int s = 0; s < a.k_max; ++s) {
            const int e = a.ids[base + s];
            const int pos = a.slot_to_sorted[base + s];
            if (e < 0 || e >= a.num_experts || pos < 0) continue;
            any = true;
            acc = fmaf(a.weights[base + s], to_f32(rows[static_cast<int64_t>(pos) * a.d + o]), acc);
        }
        if (any) y[o] = from_f32<T>(to_f32(y[o]) + a.scale * acc);
    }
}

template <typename T>
int launch_gather_rows(const molora_gather_rows_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_gather_rows_args a = *args;
    if (a.num_slots < 0 || a.k_max < 1 || a.num_experts < 1 || a.d < 1) return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_slots == 0) return 0;
    launch<gather_rows_kernel<T>>(a.num_slots, kRowThreads, 0, reinterpret_cast<cudaStream_t>(stream), a);
    return last_launch_error();
}

template <typename T>
int launch_scatter_combine(const molora_scatter_combine_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_scatter_combine_args a = *args;
    if (a.num_tokens < 0 || a.k_max < 1 || a.num_experts < 1 || a.d < 1) return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (a.rows_f32) launch<scatter_combine_kernel<T, float>>(a.num_tokens, kRowThreads, 0, s, a);
    else launch<scatter_combine_kernel<T, T>>(a.num_tokens, kRowThreads, 0, s, a);
    return last_launch_error();
}

}  // namespace
}  // namespace molora

extern "C" {
int molora_gather_rows_f32(const molora_gather_rows_args *a, molora_stream_t s) { return molora::launch_gather_rows<float>(a, s); }
int molora_gather_rows_f16(const molora_gather_rows_args *a, molora_stream_t s) { return molora::launch_gather_rows<__half>(a, s); }
int molora_gather_rows_bf16(const molora_gather_rows_args *a, molora_stream_t s) { return molora::launch_gather_rows<__nv_bfloat16>(a, s); }
int molora_scatter_combine_f32(const molora_scatter_combine_args *a, molora_stream_t s) { return molora::launch_scatter_combine<float>(a, s); }
int molora_scatter_combine_f16(const molora_scatter_combine_args *a, molora_stream_t s) { return molora::launch_scatter_combine<__half>(a, s); }
int molora_scatter_combine_bf16(const molora_scatter_combine_args *a, molora_stream_t s) { return molora::launch_scatter_combine<__nv_bfloat16>(a, s); }
}
