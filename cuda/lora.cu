// Grouped LoRA kernels: shrink over row runs (expert segments with the gather fused, or sequence
// segments), expand with the scatter and weighted combine fused (deterministic: every output element
// is owned by one thread, slots summed in order), and SAML's weight-space mixing.
//
// The grids depend on the shapes only (never on the routing), so a forward can be captured in a CUDA
// graph; blocks past the routing's number of rows exit early.

#include <mma.h>

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

// Elements per 16-byte load.
template <typename T> constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// Loads kVecElems<T> elements from a 16-byte aligned address and widens them to f32.
template <typename T>
__device__ __forceinline__ void load_vec(const T *p, float *out) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(p);
    const T *v = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int q = 0; q < kVecElems<T>; ++q) out[q] = to_f32(v[q]);
}

// kVec: tiles are loaded with 16-byte loads (d_in a multiple of kVecElems<T>, x and A 16-byte aligned:
// every row then starts aligned and a vector never straddles the end of a row).
template <typename T, bool kVec>
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
                if constexpr (kVec) {
                    constexpr int V = kVecElems<T>;
                    constexpr int kPerRow = kShrinkK / V;
                    for (int idx = tid; idx < kShrinkRows * kPerRow; idx += kShrinkThreads) {
                        const int rr = idx / kPerRow, kk = (idx % kPerRow) * V;
                        const int p = p0 + rr;
                        float v[V];
#pragma unroll
                        for (int q = 0; q < V; ++q) v[q] = 0.0f;
                        if (p >= q0 && p < q1 && k0 + kk < a.d_in) load_vec(x + src_row[rr] * a.d_in + k0 + kk, v);
#pragma unroll
                        for (int q = 0; q < V; ++q) xs[rr][kk + q] = v[q];
                    }
                    for (int idx = tid; idx < kShrinkRank * kPerRow; idx += kShrinkThreads) {
                        const int jj = idx / kPerRow, kk = (idx % kPerRow) * V;
                        const int j = r0 + jj;
                        float v[V];
#pragma unroll
                        for (int q = 0; q < V; ++q) v[q] = 0.0f;
                        if (j < a.rank && k0 + kk < a.d_in) load_vec(A + static_cast<int64_t>(j) * a.d_in + k0 + kk, v);
#pragma unroll
                        for (int q = 0; q < V; ++q) as[jj][kk + q] = v[q];
                    }
                } else {
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

// ---- shrink on tensor cores (f16 / bf16): wmma 16×16×16, f32 accumulation -------------------------
// The same tiling and run handling as the plain shrink: a block owns 32 rows and passes over the rank
// in 64-column tiles; x and A chunks of 32 along d_in are staged in shared memory in the element type
// (zero-padded past d_in, the rank and the run's rows), each of the 8 warps owns one 16×16 tile of
// the 32×64 output, and the f32 accumulators go through shared memory to the valid rows / columns.
constexpr int kTcPad = 8;     // row padding of the staged tiles (ldm a multiple of 8 elements)
constexpr int kTcOutPad = 4;  // row padding of the f32 output tile (ldm a multiple of 4)

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_tc_kernel(molora_lora_shrink_args a) {
    using namespace nvcuda;
    // 32-byte alignment of every fragment pointer: rows are 40 elements (80 bytes) apart and
    // fragments start at rows 0/16 and columns 0/16, i.e. at multiples of 1280 + 32 bytes.
    __shared__ __align__(32) T xs[kShrinkRows][kShrinkK + kTcPad];
    __shared__ __align__(32) T as[kShrinkRank][kShrinkK + kTcPad];
    __shared__ __align__(32) float outs[kShrinkRows][kShrinkRank + kTcOutPad];
    __shared__ int64_t src_row[kShrinkRows];
    const int total = a.run_offsets[a.num_runs];
    const int p0 = blockIdx.x * kShrinkRows;
    if (p0 >= total) return;
    const int p_end = min(p0 + kShrinkRows, total);
    const T *x = static_cast<const T *>(a.x);
    const T zero = from_f32<T>(0.0f);
    const int tid = threadIdx.x;
    const int warp = tid / kWarp;
    const int wm = warp / 4, wn = warp % 4;  // this warp's 16×16 tile: rows 16·wm, columns 16·wn

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
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (int k0 = 0; k0 < a.d_in; k0 += kShrinkK) {
                for (int idx = tid; idx < kShrinkRows * kShrinkK; idx += kShrinkThreads) {
                    const int rr = idx / kShrinkK, kk = idx % kShrinkK;
                    const int p = p0 + rr;
                    xs[rr][kk] = (p >= q0 && p < q1 && k0 + kk < a.d_in) ? x[src_row[rr] * a.d_in + k0 + kk] : zero;
                }
                for (int idx = tid; idx < kShrinkRank * kShrinkK; idx += kShrinkThreads) {
                    const int jj = idx / kShrinkK, kk = idx % kShrinkK;
                    const int j = r0 + jj;
                    as[jj][kk] = (j < a.rank && k0 + kk < a.d_in) ? A[static_cast<int64_t>(j) * a.d_in + k0 + kk] : zero;
                }
                __syncthreads();
#pragma unroll
                for (int kk = 0; kk < kShrinkK; kk += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                    wmma::load_matrix_sync(fa, &xs[16 * wm][kk], kShrinkK + kTcPad);
                    // as[j][k] read as the K×N operand in column-major order: element (k, j) at j·ldm + k.
                    wmma::load_matrix_sync(fb, &as[16 * wn][kk], kShrinkK + kTcPad);
                    wmma::mma_sync(acc, fa, fb, acc);
                }
                __syncthreads();
            }
            wmma::store_matrix_sync(&outs[16 * wm][16 * wn], acc, kShrinkRank + kTcOutPad, wmma::mem_row_major);
            __syncthreads();
            for (int idx = tid; idx < kShrinkRows * kShrinkRank; idx += kShrinkThreads) {
                const int rr = idx / kShrinkRank, jj = idx % kShrinkRank;
                const int p = p0 + rr, j = r0 + jj;
                if (p >= q0 && p < q1 && j < a.rank) a.h[static_cast<int64_t>(p) * a.rank + j] = outs[rr][jj];
            }
            __syncthreads();
        }
    }
}

// ---- expand: y[t, o] += scale · Σ_s w · h[pos] · B[e, o, :] ------------------------------------
constexpr int kExpandTokens = 16;
constexpr int kExpandThreads = 256;  // one output column per thread

// Σ_j h[j]·B[j] over the rank, j in order; kVec: B read with 16-byte loads (rank a multiple of
// kVecElems<T>, B 16-byte aligned, so every row of B starts aligned); kRank > 0: the rank known at
// compile time (the fast paths for 8, 16, 32, 64 and 128, loops fully unrolled). The same sum in
// every variant.
template <typename T, bool kVec, int kRank>
__device__ __forceinline__ float dot_rank(const float *hr, const T *br, int rank_arg, float d) {
    const int rank = kRank > 0 ? kRank : rank_arg;
    if constexpr (kVec) {
        constexpr int V = kVecElems<T>;
#pragma unroll
        for (int j = 0; j < (kRank > 0 ? kRank : rank); j += V) {
            float bv[V];
            load_vec(br + j, bv);
#pragma unroll
            for (int q = 0; q < V; ++q) d = fmaf(hr[j + q], bv[q], d);
        }
    } else {
#pragma unroll
        for (int j = 0; j < (kRank > 0 ? kRank : rank); ++j) d = fmaf(hr[j], to_f32(br[j]), d);
    }
    return d;
}

template <typename T, bool kVec, int kRank>
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
                const float d = dot_rank<T, kVec, kRank>(hr, br, a.rank, 0.0f);
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
                    acc = dot_rank<T, kVec, kRank>(hr, br, a.rank, acc);
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
    constexpr bool k16 = sizeof(T) == 2;
    const bool aligned = a.d_in % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(a.a) % 16 == 0;
    int path = a.path;
    if (path == MOLORA_LORA_PATH_AUTO)
        path = (k16 && a.rank >= 16) ? MOLORA_LORA_PATH_TENSOR : aligned ? MOLORA_LORA_PATH_VECTOR : MOLORA_LORA_PATH_PLAIN;
    if ((path == MOLORA_LORA_PATH_VECTOR && !aligned) || (path == MOLORA_LORA_PATH_TENSOR && !k16) ||
        path < MOLORA_LORA_PATH_PLAIN || path > MOLORA_LORA_PATH_TENSOR)
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.max_rows == 0) return 0;
    const int blocks = (a.max_rows + kShrinkRows - 1) / kShrinkRows;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (path == MOLORA_LORA_PATH_TENSOR) {
        if constexpr (k16) lora_shrink_tc_kernel<T><<<blocks, kShrinkThreads, 0, s>>>(a);
    } else if (path == MOLORA_LORA_PATH_VECTOR) {
        lora_shrink_kernel<T, true><<<blocks, kShrinkThreads, 0, s>>>(a);
    } else {
        lora_shrink_kernel<T, false><<<blocks, kShrinkThreads, 0, s>>>(a);
    }
    return last_launch_error();
}

template <typename T>
int launch_expand(const molora_lora_expand_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_lora_expand_args a = *args;
    if (a.num_tokens < 0 || a.num_weights < 1 || a.rank < 1 || a.d_out < 1) return static_cast<int>(cudaErrorInvalidValue);
    if (a.ids ? (a.k_max < 1 || (!a.h_dense && !a.slot_to_sorted)) : a.num_segments < 1)
        return static_cast<int>(cudaErrorInvalidValue);
    const bool aligned = a.rank % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(a.b) % 16 == 0;
    int path = a.path;
    if (path == MOLORA_LORA_PATH_AUTO) path = aligned ? MOLORA_LORA_PATH_VECTOR : MOLORA_LORA_PATH_PLAIN;
    if ((path == MOLORA_LORA_PATH_VECTOR && !aligned) || (path != MOLORA_LORA_PATH_PLAIN && path != MOLORA_LORA_PATH_VECTOR))
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    const dim3 grid((a.d_out + kExpandThreads - 1) / kExpandThreads, (a.num_tokens + kExpandTokens - 1) / kExpandTokens);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (path == MOLORA_LORA_PATH_VECTOR) {
        // Ranks 8..128 (all multiples of every vector width) get unrolled instances.
        switch (a.rank) {
            case 8: lora_expand_kernel<T, true, 8><<<grid, kExpandThreads, 0, s>>>(a); break;
            case 16: lora_expand_kernel<T, true, 16><<<grid, kExpandThreads, 0, s>>>(a); break;
            case 32: lora_expand_kernel<T, true, 32><<<grid, kExpandThreads, 0, s>>>(a); break;
            case 64: lora_expand_kernel<T, true, 64><<<grid, kExpandThreads, 0, s>>>(a); break;
            case 128: lora_expand_kernel<T, true, 128><<<grid, kExpandThreads, 0, s>>>(a); break;
            default: lora_expand_kernel<T, true, 0><<<grid, kExpandThreads, 0, s>>>(a); break;
        }
    } else {
        lora_expand_kernel<T, false, 0><<<grid, kExpandThreads, 0, s>>>(a);
    }
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
