// Grouped LoRA kernels: shrink over row runs (expert segments with the gather fused, or sequence
// segments), expand with the scatter and weighted combine fused (deterministic: every output element
// is owned by one thread, slots summed in order), and SAML's weight-space mixing.
//
// The grids depend on the shapes only (never on the routing), so a forward can be captured in a CUDA
// graph; blocks past the routing's number of rows exit early.

#include "common.cuh"

namespace molora {
namespace {

// ---- shrink: h[p, j] = Σ_i x[src(p), i] · A[w, j, i] ------------------------------------------
constexpr int kShrinkRows = 32;    // rows per block
constexpr int kShrinkK = 32;       // d_in chunk staged in shared memory
constexpr int kShrinkRank = 64;    // rank columns per pass
constexpr int kShrinkThreads = 256;
constexpr int kColsPerThread = kShrinkRank * kShrinkRows / kShrinkThreads;  // 8
constexpr int kColGroups = kShrinkRank / kColsPerThread;                     // 8 threads per row

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_kernel(molora_lora_shrink_args a) {
    __shared__ float xs[kShrinkRows][kShrinkK + 1];
    __shared__ float as[kShrinkRank][kShrinkK + 1];
    __shared__ int64_t src_row[kShrinkRows];
    const int total = a.run_offsets[a.num_runs];
    const int p0 = blockIdx.x * kShrinkRows;
    if (p0 >= total) return;
    const int p_end = min(p0 + kShrinkRows, total);
    const T *x = static_cast<const T *>(a.x);
    const int tid = threadIdx.x;
    const int row = tid / kColGroups;  // 0..31
    const int col = tid % kColGroups;  // owns rank columns col + kColGroups * c

    if (tid < kShrinkRows) {
        const int p = p0 + tid;
        int64_t src = -1;
        if (p < p_end) src = a.row_src ? static_cast<int64_t>(a.row_src[p] / a.src_div) : p;
        src_row[tid] = src;
    }
    __syncthreads();

    for (int run = find_run(a.run_offsets, a.num_runs, p0); run < a.num_runs && a.run_offsets[run] < p_end; ++run) {
        const int q0 = max(p0, a.run_offsets[run]);
        const int q1 = min(p_end, a.run_offsets[run + 1]);
        if (q0 >= q1) continue;  // block-uniform
        const int w = a.run_weight ? a.run_weight[run] : run;
        if (w < 0 || w >= a.num_weights) {
            for (int idx = tid; idx < (q1 - q0) * a.rank; idx += kShrinkThreads)
                a.h[static_cast<int64_t>(q0) * a.rank + idx] = 0.0f;
            continue;
        }
        const T *A = static_cast<const T *>(a.a) + static_cast<int64_t>(w) * a.rank * a.d_in;
        for (int r0 = 0; r0 < a.rank; r0 += kShrinkRank) {
            float acc[kColsPerThread];
#pragma unroll
            for (int c = 0; c < kColsPerThread; ++c) acc[c] = 0.0f;
            for (int k0 = 0; k0 < a.d_in; k0 += kShrinkK) {
                for (int idx = tid; idx < kShrinkRows * kShrinkK; idx += kShrinkThreads) {
                    const int rr = idx / kShrinkK, kk = idx % kShrinkK;
                    const int p = p0 + rr;
                    float v = 0.0f;
                    if (p >= q0 && p < q1 && k0 + kk < a.d_in)
                        v = to_f32(x[src_row[rr] * a.d_in + k0 + kk]);
                    xs[rr][kk] = v;
                }
                for (int idx = tid; idx < kShrinkRank * kShrinkK; idx += kShrinkThreads) {
                    const int jj = idx / kShrinkK, kk = idx % kShrinkK;
                    const int j = r0 + jj;
                    as[jj][kk] = (j < a.rank && k0 + kk < a.d_in)
                                     ? to_f32(A[static_cast<int64_t>(j) * a.d_in + k0 + kk])
                                     : 0.0f;
                }
                __syncthreads();
                const int kmax = min(kShrinkK, a.d_in - k0);
                for (int kk = 0; kk < kmax; ++kk) {
                    const float xv = xs[row][kk];
#pragma unroll
                    for (int c = 0; c < kColsPerThread; ++c) acc[c] = fmaf(xv, as[col + kColGroups * c][kk], acc[c]);
                }
                __syncthreads();
            }
            const int p = p0 + row;
            if (p >= q0 && p < q1) {
#pragma unroll
                for (int c = 0; c < kColsPerThread; ++c) {
                    const int j = r0 + col + kColGroups * c;
                    if (j < a.rank) a.h[static_cast<int64_t>(p) * a.rank + j] = acc[c];
                }
            }
        }
    }
}

// ---- expand: y[t, o] += scale · Σ_s w · h[pos] · B[e, o, :] ------------------------------------
constexpr int kExpandTokens = 16;
constexpr int kExpandThreads = 256;  // one output column per thread

template <typename T>
__global__ void __launch_bounds__(kExpandThreads) lora_expand_kernel(molora_lora_expand_args a) {
    const int o = blockIdx.x * kExpandThreads + threadIdx.x;
    const int t0 = blockIdx.y * kExpandTokens;
    const T *B = static_cast<const T *>(a.b);
    T *y = static_cast<T *>(a.y);
    const int t_end = min(t0 + kExpandTokens, a.num_tokens);
    for (int t = t0; t < t_end; ++t) {
        float acc = 0.0f;
        bool any = false;
        if (a.ids) {
            for (int s = 0; s < a.k_max; ++s) {
                const int64_t slot = static_cast<int64_t>(t) * a.k_max + s;
                const int e = a.ids[slot];
                if (e < 0 || e >= a.num_weights) continue;
                // Dense layout: h row t holds every expert's shrink, expert e at column e·rank.
                const int64_t row = a.h_dense ? static_cast<int64_t>(t) : a.slot_to_sorted[slot];
                if (row < 0) continue;
                any = true;
                if (o >= a.d_out) continue;
                const float *hr = a.h_dense ? a.h + row * a.num_weights * a.rank + static_cast<int64_t>(e) * a.rank
                                            : a.h + row * a.rank;
                const T *br = B + (static_cast<int64_t>(e) * a.d_out + o) * a.rank;
                float d = 0.0f;
                for (int j = 0; j < a.rank; ++j) d = fmaf(hr[j], to_f32(br[j]), d);
                acc = fmaf(a.weights[slot], d, acc);
            }
        } else {
            const int seg = find_run(a.seg_offsets, a.num_segments, t);
            const int w = a.adapter_ids[seg];
            if (w >= 0 && w < a.num_weights) {
                any = true;
                if (o < a.d_out) {
                    const float *hr = a.h + static_cast<int64_t>(t) * a.rank;
                    const T *br = B + (static_cast<int64_t>(w) * a.d_out + o) * a.rank;
                    for (int j = 0; j < a.rank; ++j) acc = fmaf(hr[j], to_f32(br[j]), acc);
                }
            }
        }
        if (any && o < a.d_out) {
            T *yp = y + static_cast<int64_t>(t) * a.d_out + o;
            *yp = from_f32<T>(to_f32(*yp) + a.scale * acc);
        }
    }
}

// ---- weight-space mixing ---------------------------------------------------------------------
constexpr int kMixThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kMixThreads) mix_kernel(molora_mix_args a) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kMixThreads + threadIdx.x;
    const int s = blockIdx.y;
    if (i >= a.per_expert) return;
    const T *w = static_cast<const T *>(a.w);
    const float *p = a.probs + static_cast<int64_t>(s) * a.num_experts;
    float acc = 0.0f;
    for (int e = 0; e < a.num_experts; ++e) acc = fmaf(p[e], to_f32(w[static_cast<int64_t>(e) * a.per_expert + i]), acc);
    static_cast<T *>(a.out)[static_cast<int64_t>(s) * a.per_expert + i] = from_f32<T>(acc);
}

template <typename T>
int launch_shrink(const molora_lora_shrink_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_lora_shrink_args a = *args;
    if (a.max_rows < 0 || a.num_runs < 1 || a.num_weights < 1 || a.rank < 1 || a.d_in < 1 || a.src_div < 1)
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.max_rows == 0) return 0;
    const int blocks = (a.max_rows + kShrinkRows - 1) / kShrinkRows;
    lora_shrink_kernel<T><<<blocks, kShrinkThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    return last_launch_error();
}

template <typename T>
int launch_expand(const molora_lora_expand_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_lora_expand_args a = *args;
    if (a.num_tokens < 0 || a.num_weights < 1 || a.rank < 1 || a.d_out < 1) return static_cast<int>(cudaErrorInvalidValue);
    if (a.ids ? (a.k_max < 1 || (!a.h_dense && !a.slot_to_sorted)) : a.num_segments < 1)
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    const dim3 grid((a.d_out + kExpandThreads - 1) / kExpandThreads, (a.num_tokens + kExpandTokens - 1) / kExpandTokens);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    lora_expand_kernel<T><<<grid, kExpandThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    return last_launch_error();
}

template <typename T>
int launch_mix(const molora_mix_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_mix_args a = *args;
    if (a.num_experts < 1 || a.num_seqs < 0 || a.per_expert < 0) return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_seqs == 0 || a.per_expert == 0) return 0;
    const int64_t bx = (a.per_expert + kMixThreads - 1) / kMixThreads;
    if (bx > 0x7fffffff || a.num_seqs > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
    const dim3 grid(static_cast<unsigned>(bx), a.num_seqs);
    mix_kernel<T><<<grid, kMixThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    return last_launch_error();
}

}  // namespace
}  // namespace molora

using molora::launch_expand;
using molora::launch_mix;
using molora::launch_shrink;

extern "C" {
int molora_lora_shrink_f32(const molora_lora_shrink_args *a, molora_stream_t s) { return launch_shrink<float>(a, s); }
int molora_lora_shrink_f16(const molora_lora_shrink_args *a, molora_stream_t s) { return launch_shrink<__half>(a, s); }
int molora_lora_shrink_bf16(const molora_lora_shrink_args *a, molora_stream_t s) { return launch_shrink<__nv_bfloat16>(a, s); }
int molora_lora_expand_f32(const molora_lora_expand_args *a, molora_stream_t s) { return launch_expand<float>(a, s); }
int molora_lora_expand_f16(const molora_lora_expand_args *a, molora_stream_t s) { return launch_expand<__half>(a, s); }
int molora_lora_expand_bf16(const molora_lora_expand_args *a, molora_stream_t s) { return launch_expand<__nv_bfloat16>(a, s); }
int molora_mix_f32(const molora_mix_args *a, molora_stream_t s) { return launch_mix<float>(a, s); }
int molora_mix_f16(const molora_mix_args *a, molora_stream_t s) { return launch_mix<__half>(a, s); }
int molora_mix_bf16(const molora_mix_args *a, molora_stream_t s) { return launch_mix<__nv_bfloat16>(a, s); }
}
