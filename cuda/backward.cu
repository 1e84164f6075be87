// Backward of the grouped LoRA part (expert segments), deterministic: u = dy·B per pair and dw, then
// dB and dA as per-expert reductions over the expert's pairs (sorted order within 8 fixed slices, the
// slices added in order), then dx per token.
// Every output element is owned by one thread; no float atomics. Grids depend on shapes only.

#include "common.cuh"
#include "gating.cuh"
#include "gemm.cuh"

namespace molora {
namespace {

// The tensor-core GEMMs of the backward (cuda/gemm.cuh's loaders): tile shapes.
template <typename T> using DgDxGemm = TileGemm<T, 128, 128, 4, 2, 3, false, true>;
template <typename T, int BN> using DgWGemm = TileGemm<T, 64, BN, 2, 2, 4, true, true>;

// Reductions over tokens / pairs, deterministic and parallel: a block of 256 threads owns 32 outputs;
// its 8 warps each sum one contiguous slice of the reduction range in order (loads of 4 steps in
// flight), then the slices' partial sums are added in slice order. The same order on every run.
constexpr int kRedOut = 32;
constexpr int kRedSlices = 8;
constexpr int kRedThreads = kRedOut * kRedSlices;

// Σ over q in [begin, end) of step(q, acc) in the fixed slice order; every thread of the block must
// call it (it synchronises); the total is returned to the threads of slice 0.
template <typename F>
__device__ __forceinline__ float sliced_sum(int begin, int end, F step) {
    MOLORA_SHARED(float, red, [kRedSlices][kRedOut]);
    const int out = threadIdx.x % kRedOut, slice = threadIdx.x / kRedOut;
    const int per = (end - begin + kRedSlices - 1) / kRedSlices;
    const int q0 = begin + slice * per, q1 = min(end, q0 + per);
    float acc = 0.0f;
#pragma unroll 4
    for (int q = q0; q < q1; ++q) acc = step(q, acc);
    red[slice][out] = acc;
    __syncthreads();
    float total = 0.0f;
    if (slice == 0) {
        total = red[0][out];
#pragma unroll
        for (int w = 1; w < kRedSlices; ++w) total += red[w][out];
    }
    return total;
}

constexpr int kBwdWarps = 8;
constexpr int kBwdThreads = 256;
constexpr int kUChunk = 16;  // rank entries of u a warp accumulates at once

// Weight gradients as reductions over rows, register-tiled on CUDA cores, deterministic (each output
// is summed by one thread over its rows in order):
//   out[z·out_z + (m / rank)·out_e + (m % rank)·out_j + n·out_n]
//       = scale · Σ_{q ∈ rows(z)} coef(q, m) · L[q·ldl + m] · R[src(q)·ldr + n]
// Expert segments (q_offsets != NULL): z is the expert, rows(z) its pairs, src(q) = sorted_slots[q] /
// k_max and coef(q, m) = weights[sorted_slots[q]]; dense-gated: z = 0, rows = [0, T), src(q) = q and
// coef(q, m) = gate[q·E + m / rank]. dA takes L = u, R = x; dB takes L = h, R = dy.
struct RowGemmArgs {
    const float *l;
    int64_t ldl;
    const void *r;
    int64_t ldr;
    const int32_t *q_offsets;
    int num_rows;
    const int32_t *sorted_slots;
    int k_max;
    const float *weights;
    const float *gate;
    int num_experts;
    int rank;
    int m_count;
    int n_count;
    float *out;
    int64_t out_z, out_e, out_j, out_n;
    float scale;
};

constexpr int kRgThreads = 256;
constexpr int kRgK = 32;  // rows staged per step

// TM × TN outputs per block (16 × 16 threads, each MM × NB of them); the next step's rows are loaded
// into registers while the current step is multiplied, so one step's global latency hides behind
// the arithmetic of another. kCompact (dense-gated, the tile inside one expert e): the rows are first
// compacted, window by window and in order, to the tokens with gate[t, e] != 0, so the E/k tokens
// that did not route to e cost nothing; the sums and their order are those of the full range with the
// zero terms left out.
constexpr int kRgWindow = 1024;

template <typename T, int TM, int TN, bool kCompact>
__global__ void __launch_bounds__(kRgThreads) row_gemm_kernel(RowGemmArgs g) {
    constexpr int MM = TM / 16, NB = TN / 16;
    constexpr int LP = kRgK * TM / kRgThreads, RP = kRgK * TN / kRgThreads;  // per-thread loads per step
    MOLORA_SHARED(float, ls, [kRgK][TM]);
    MOLORA_SHARED(float, rs, [kRgK][TN + 1]);
    MOLORA_SHARED(int, rows, [kCompact ? kRgWindow : 1]);
    MOLORA_SHARED(int, warp_count, [kRgThreads / kWarp]);
    const int z = blockIdx.z;
    const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int q_begin = g.q_offsets ? g.q_offsets[z] : 0;
    const int q_end = g.q_offsets ? g.q_offsets[z + 1] : g.num_rows;
    const int tile_e = m0 / g.rank;  // kCompact: the tile's expert
    const T *R = static_cast<const T *>(g.r);
    float lreg[LP], rreg[RP];
    // Row q of the current range: itself, or (kCompact) the q-th compacted token.
    auto row_of = [&](int q) { return kCompact ? rows[q] : q; };
    auto load = [&](int q0, int qn) {
#pragma unroll
        for (int u = 0; u < LP; ++u) {
            const int idx = threadIdx.x + u * kRgThreads;
            const int kk = idx / TM, mm = idx % TM, q = q0 + kk, m = m0 + mm;
            float v = 0.0f;
            if (q < qn && m < g.m_count) {
                const int t = row_of(q);
                const float c = g.q_offsets ? g.weights[g.sorted_slots[t]] : g.gate[static_cast<int64_t>(t) * g.num_experts + m / g.rank];
                v = c * g.l[static_cast<int64_t>(t) * g.ldl + m];
            }
            lreg[u] = v;
        }
#pragma unroll
        for (int u = 0; u < RP; ++u) {
            const int idx = threadIdx.x + u * kRgThreads;
            const int kk = idx / TN, nn = idx % TN, q = q0 + kk, n = n0 + nn;
            float v = 0.0f;
            if (q < qn && n < g.n_count) {
                const int t = row_of(q);
                const int64_t src = g.q_offsets ? g.sorted_slots[t] / g.k_max : t;
                v = to_f32(R[src * g.ldr + n]);
            }
            rreg[u] = v;
        }
    };
    float acc[MM][NB];
#pragma unroll
    for (int a = 0; a < MM; ++a)
#pragma unroll
        for (int b = 0; b < NB; ++b) acc[a][b] = 0.0f;
    // Sums rows [0, qn) of the current range into acc.
    auto accumulate = [&](int qb, int qn) {
        if (qb < qn) load(qb, qn);
        for (int q0 = qb; q0 < qn; q0 += kRgK) {
#pragma unroll
            for (int u = 0; u < LP; ++u) {
                const int idx = threadIdx.x + u * kRgThreads;
                ls[idx / TM][idx % TM] = lreg[u];
            }
#pragma unroll
            for (int u = 0; u < RP; ++u) {
                const int idx = threadIdx.x + u * kRgThreads;
                rs[idx / TN][idx % TN] = rreg[u];
            }
            __syncthreads();
            if (q0 + kRgK < qn) load(q0 + kRgK, qn);
#pragma unroll
            for (int kk = 0; kk < kRgK; ++kk) {
                float lv[MM], rv[NB];
#pragma unroll
                for (int a = 0; a < MM; ++a) lv[a] = ls[kk][ty * MM + a];
#pragma unroll
                for (int b = 0; b < NB; ++b) rv[b] = rs[kk][tx + 16 * b];
#pragma unroll
                for (int a = 0; a < MM; ++a)
#pragma unroll
                    for (int b = 0; b < NB; ++b) acc[a][b] = fmaf(lv[a], rv[b], acc[a][b]);
            }
            __syncthreads();
        }
    };
    if constexpr (kCompact) {
        for (int w0 = q_begin; w0 < q_end; w0 += kRgWindow) {
            const int w1 = min(q_end, w0 + kRgWindow);
            int count = 0;  // the same in every thread
            for (int base = w0; base < w1; base += kRgThreads) {
                const int t = base + threadIdx.x;
                const bool active = t < w1 && g.gate[static_cast<int64_t>(t) * g.num_experts + tile_e] != 0.0f;
                const unsigned ballot = __ballot_sync(kFullMask, active);
                if (lane == 0) warp_count[warp] = __popc(ballot);
                __syncthreads();
                int before = count;
                for (int w = 0; w < warp; ++w) before += warp_count[w];
                if (active) rows[before + __popc(ballot & ((1u << lane) - 1u))] = t;
                for (int w = 0; w < kRgThreads / kWarp; ++w) count += warp_count[w];
                __syncthreads();  // warp_count is read before the next pass overwrites it
            }
            accumulate(0, count);
            __syncthreads();  // rows is read before the next window overwrites it
        }
    } else {
        accumulate(q_begin, q_end);
    }
#pragma unroll
    for (int a = 0; a < MM; ++a) {
        const int m = m0 + ty * MM + a;
        if (m >= g.m_count) continue;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const int n = n0 + tx + 16 * b;
            if (n < g.n_count)
                g.out[z * g.out_z + (m / g.rank) * g.out_e + (m % g.rank) * g.out_j + n * g.out_n] = g.scale * acc[a][b];
        }
    }
}

// Launches row_gemm_kernel over `experts` grid slices: 16 × 128 tiles for M <= 16, else 32 × 64; the
// dense-gated reductions with a rank that is a multiple of 16 take 16 × 128 tiles, each inside one
// expert, over that expert's tokens only (kCompact).
template <typename T>
int launch_row_gemm(const RowGemmArgs &g, int experts, cudaStream_t s) {
    if (!g.q_offsets && g.rank % 16 == 0) {
        const dim3 grid((g.n_count + 127) / 128, (g.m_count + 15) / 16, experts);
        if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
        launch<row_gemm_kernel<T, 16, 128, true>>(grid, kRgThreads, 0, s, g);
    } else if (g.m_count <= 16) {
        const dim3 grid((g.n_count + 127) / 128, 1, experts);
        launch<row_gemm_kernel<T, 16, 128, false>>(grid, kRgThreads, 0, s, g);
    } else {
        const dim3 grid((g.n_count + 63) / 64, (g.m_count + 31) / 32, experts);
        if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
        launch<row_gemm_kernel<T, 32, 64, false>>(grid, kRgThreads, 0, s, g);
    }
    return last_launch_error();
}

// dB, then dA, through row_gemm_kernel; `g` carries the rows, the coefficients, the rank and m_count
// (r over expert segments, E·r dense-gated, which is also the row length of h and u):
//   dB[e, o, j] = scale·Σ coef·h[·, j]·dy[·, o],   dA[e, j, i] = scale·Σ coef·u[·, j]·x[·, i].
template <typename T>
int launch_weight_grads(RowGemmArgs g, bool dense, int experts, const float *h, const float *u, const void *x,
                        const void *dy, float *da, float *db, int d_in, int d_out, cudaStream_t s) {
    const int64_t r = g.rank;
    g.ldl = g.m_count;
    g.l = h;
    g.r = dy;
    g.ldr = d_out;
    g.n_count = d_out;
    g.out = db;
    g.out_z = dense ? 0 : d_out * r;
    g.out_e = dense ? d_out * r : 0;
    g.out_j = 1;
    g.out_n = r;
    const int err = launch_row_gemm<T>(g, experts, s);
    if (err) return err;
    g.l = u;
    g.r = x;
    g.ldr = d_in;
    g.n_count = d_in;
    g.out = da;
    g.out_z = dense ? 0 : r * d_in;
    g.out_e = dense ? r * d_in : 0;
    g.out_j = d_in;
    g.out_n = 1;
    return launch_row_gemm<T>(g, experts, s);
}

// One warp per sorted slot position p < T·k_max (positions past the number of pairs exit):
// u[p, j] = Σ_o dy[t, o]·B[e, o, j], and dw of the slot.
template <typename T>
__global__ void __launch_bounds__(kBwdWarps * kWarp) bwd_u_dw_kernel(molora_lora_backward_args a) {
    const int lane = threadIdx.x % kWarp;
    const int p = blockIdx.x * kBwdWarps + threadIdx.x / kWarp;
    const int pairs = a.expert_offsets[a.num_experts];
    if (p >= pairs) return;
    const int slot = a.sorted_slots[p];
    const int t = slot / a.k_max;
    const int e = a.ids[slot];
    const T *dy = static_cast<const T *>(a.dy) + static_cast<int64_t>(t) * a.d_out;
    const T *B = static_cast<const T *>(a.b) + static_cast<int64_t>(e) * a.d_out * a.rank;
    const float *h = a.h + static_cast<int64_t>(p) * a.rank;
    float *u = a.u + static_cast<int64_t>(p) * a.rank;
    // Lanes stride over o and read kUChunk consecutive rank entries of B's row o at a time (whole
    // sectors instead of one element per row), then one fixed butterfly per entry.
    float dot = 0.0f;
    for (int j0 = 0; j0 < a.rank; j0 += kUChunk) {
        const int nj = min(kUChunk, a.rank - j0);
        float part[kUChunk];
#pragma unroll
        for (int q = 0; q < kUChunk; ++q) part[q] = 0.0f;
#pragma unroll 4
        for (int o = lane; o < a.d_out; o += kWarp) {
            const float d = to_f32(dy[o]);
            const T *br = B + static_cast<int64_t>(o) * a.rank + j0;
#pragma unroll
            for (int q = 0; q < kUChunk; ++q)
                if (q < nj) part[q] = fmaf(d, to_f32(br[q]), part[q]);
        }
#pragma unroll
        for (int q = 0; q < kUChunk; ++q) {
            const float s = warp_sum(part[q]);
            if (q < nj) {
                if (lane == 0) u[j0 + q] = s;
                dot = fmaf(h[j0 + q], s, dot);
            }
        }
    }
    if (lane == 0) a.dw[slot] = a.scale * dot;
}

// u = dy·B on the tensor-core shrink (B read transposed): for f16/bf16 with d_out and rank multiples
// of 8, 16-byte aligned dy and B, and more than 256 rows (below that the warp-per-row kernels are as
// fast). Returns -1 when the call is not eligible, else the launch's error.
template <typename T>
int u_on_tensor_cores(const void *dy, const void *b, float *u, const int32_t *run_offsets, int num_runs,
                      const int32_t *row_src, int src_div, int rows, int columns, int rank, int d_out,
                      molora_stream_t stream) {
    if (sizeof(T) != 2 || rows <= 256 || d_out % 8 != 0 || rank % 8 != 0 || reinterpret_cast<uintptr_t>(dy) % 16 != 0 ||
        reinterpret_cast<uintptr_t>(b) % 16 != 0)
        return -1;
    molora_lora_shrink_args sa{};
    sa.x = dy;
    sa.a = b;
    sa.h = u;
    sa.run_offsets = run_offsets;
    sa.run_weight = nullptr;
    sa.row_src = row_src;
    sa.src_div = src_div;
    sa.max_rows = rows;
    sa.num_runs = num_runs;
    sa.num_weights = run_offsets ? num_runs : 1;
    sa.rank = columns;
    sa.d_in = d_out;
    sa.path = MOLORA_LORA_PATH_TENSOR;
    sa.b_rank = rank;
    return shrink_typed<T>(&sa, stream);
}

// dw of each pair after the tensor-core u: dw[slot] = scale·Σ_j h[p, j]·u[p, j], j in order.
__global__ void __launch_bounds__(kBwdThreads) bwd_dw_kernel(molora_lora_backward_args a) {
    const int p = blockIdx.x * kBwdThreads + threadIdx.x;
    if (p >= a.expert_offsets[a.num_experts]) return;
    const float *h = a.h + static_cast<int64_t>(p) * a.rank;
    const float *u = a.u + static_cast<int64_t>(p) * a.rank;
    float dot = 0.0f;
    for (int j = 0; j < a.rank; ++j) dot = fmaf(h[j], u[j], dot);
    a.dw[a.sorted_slots[p]] = a.scale * dot;
}

// Empty slots get dw = 0.
__global__ void __launch_bounds__(kBwdThreads) bwd_dw_empty_kernel(molora_lora_backward_args a) {
    const int64_t slot = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x;
    if (slot >= static_cast<int64_t>(a.num_tokens) * a.k_max) return;
    if (a.slot_to_sorted[slot] < 0) a.dw[slot] = 0.0f;
}

// dx[t, i]: one thread per (t, i), slots in order.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_dx_kernel(molora_lora_backward_args a) {
    const int t = blockIdx.y;
    const int i = blockIdx.x * kBwdThreads + threadIdx.x;
    if (i >= a.d_in) return;
    const T *A = static_cast<const T *>(a.a);
    float acc = 0.0f;
    for (int s = 0; s < a.k_max; ++s) {
        const int64_t slot = static_cast<int64_t>(t) * a.k_max + s;
        const int p = a.slot_to_sorted[slot];
        if (p < 0) continue;
        const int e = a.ids[slot];
        const float *u = a.u + static_cast<int64_t>(p) * a.rank;
        const T *ae = A + static_cast<int64_t>(e) * a.rank * a.d_in;
        float d = 0.0f;
#pragma unroll 8
        for (int j = 0; j < a.rank; ++j) d = fmaf(u[j], to_f32(ae[static_cast<int64_t>(j) * a.d_in + i]), d);
        acc = fmaf(a.weights[slot], d, acc);
    }
    a.dx[static_cast<int64_t>(t) * a.d_in + i] = a.scale * acc;
}

template <typename T>
int launch_backward(const molora_lora_backward_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_lora_backward_args a = *args;
    if (a.num_tokens < 0 || a.k_max < 1 || a.num_experts < 1 || a.rank < 1 || a.d_in < 1 || a.d_out < 1 ||
        a.num_experts > 65535)
        return static_cast<int>(cudaErrorInvalidValue);
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const int64_t slots = static_cast<int64_t>(a.num_tokens) * a.k_max;
    // dA and dB are written whole (zero for experts without pairs), even when T = 0.
    if (slots > 0) {
        int err = u_on_tensor_cores<T>(a.dy, a.b, a.u, a.expert_offsets, a.num_experts, a.sorted_slots, a.k_max,
                                       static_cast<int>(slots), a.rank, a.rank, a.d_out, stream);
        if (err == -1) {
            launch<bwd_u_dw_kernel<T>>(static_cast<unsigned>((slots + kBwdWarps - 1) / kBwdWarps), kBwdWarps * kWarp, 0, s, a);
            err = last_launch_error();
        } else if (err == 0) {
            launch<bwd_dw_kernel>(static_cast<unsigned>((slots + kBwdThreads - 1) / kBwdThreads), kBwdThreads, 0, s, a);
            err = last_launch_error();
        }
        if (err) return err;
        launch<bwd_dw_empty_kernel>(static_cast<unsigned>((slots + kBwdThreads - 1) / kBwdThreads), kBwdThreads, 0, s, a);
        err = last_launch_error();
        if (err) return err;
    }
    RowGemmArgs g{};
    g.q_offsets = a.expert_offsets;
    g.sorted_slots = a.sorted_slots;
    g.k_max = a.k_max;
    g.weights = a.weights;
    g.num_experts = a.num_experts;
    g.rank = a.rank;
    g.m_count = a.rank;
    g.scale = a.scale;
    const int err = launch_weight_grads<T>(g, false, a.num_experts, a.h, a.u, a.x, a.dy, a.da, a.db, a.d_in, a.d_out, s);
    if (err || a.num_tokens == 0) return err;
    if (a.num_tokens > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
    launch<bwd_dx_kernel<T>>(dim3((a.d_in + kBwdThreads - 1) / kBwdThreads, a.num_tokens), kBwdThreads, 0, s, a);
    return last_launch_error();
}

}  // namespace
}  // namespace molora

extern "C" {
int molora_lora_backward_f32(const molora_lora_backward_args *a, molora_stream_t s) { return molora::launch_backward<float>(a, s); }
int molora_lora_backward_f16(const molora_lora_backward_args *a, molora_stream_t s) { return molora::launch_backward<__half>(a, s); }
int molora_lora_backward_bf16(const molora_lora_backward_args *a, molora_stream_t s) { return molora::launch_backward<__nv_bfloat16>(a, s); }
}

// ---- gating and router backward ---------------------------------------------------------------

namespace molora {
namespace {

constexpr int kGateBwdWarps = 4;

__device__ __forceinline__ double warp_sum_double(double v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

// dp[ids[s]] += value(s) for every slot s in [0, k_max) whose id is in [0, E), by the whole warp and
// deterministically. A routing may repeat an expert within a token (callers may pass one), so a lane
// per slot would race on dp[e]; instead the warp reads 32 slots at a time (a slot per lane), then
// steps through them in slot order, and only the lane owning expert e (e ≡ lane mod 32, the lane that
// zeroed dp[e]) adds each one. Every dp[e] therefore sums its slots in slot order, as the CPU does.
// k_max is uniform across the warp, so every lane takes part in every shuffle.
template <class Value>
__device__ __forceinline__ void scatter_slots(float *dp, const int32_t *ids, int k_max, int E, int lane, Value value) {
    for (int base = 0; base < k_max; base += kWarp) {
        const int s = base + lane;
        const int id = s < k_max ? ids[s] : -1;
        const bool valid = id >= 0 && id < E;
        const float v = valid ? value(s) : 0.0f;
        const int n = min(kWarp, k_max - base);
        for (int j = 0; j < n; ++j) {
            const int e = __shfl_sync(kFullMask, valid ? id : -1, j);
            const float vj = __shfl_sync(kFullMask, v, j);
            if (e >= 0 && e % kWarp == lane) dp[e] += vj;
        }
    }
}

__global__ void __launch_bounds__(kGateBwdWarps * kWarp) gating_backward_kernel(molora_gating_backward_args a) {
    MOLORA_DYNAMIC_SHARED(16, float, smem);  // [warps][3·E]: l (local probabilities), p (combined), dp
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int t = blockIdx.x * kGateBwdWarps + warp;
    if (t >= a.num_tokens) return;
    const int E = a.num_experts;
    float *l = smem + warp * 3 * E;
    float *p = l + E;
    float *dp = p + E;
    const float *z = a.logits + static_cast<int64_t>(t) * E;
    // l, by the forward kernel's own activation.
    activate_row(a.activation, a.temperature, z, l, E, lane);
    __syncwarp();
    // p = combine(l, g), exactly as the forward kernel combines them.
    const float *g = nullptr;
    double prod_sum = 0.0;
    if (a.combine != MOLORA_COMBINE_NONE) {
        const int seg = find_run(a.seq_offsets, a.num_seqs, t);
        g = a.global_probs + static_cast<int64_t>(seg) * E;
    }
    if (a.combine == MOLORA_COMBINE_MIX) {
        for (int e = lane; e < E; e += kWarp) p[e] = a.lambda * g[e] + (1.0f - a.lambda) * l[e];
    } else if (a.combine == MOLORA_COMBINE_PRODUCT) {
        for (int e = lane; e < E; e += kWarp) prod_sum += static_cast<double>(g[e]) * static_cast<double>(l[e]);
        prod_sum = warp_sum_double(prod_sum);
        for (int e = lane; e < E; e += kWarp)
            p[e] = prod_sum > 0.0 ? static_cast<float>(static_cast<double>(g[e]) * static_cast<double>(l[e]) / prod_sum)
                                  : l[e];
    } else {
        for (int e = lane; e < E; e += kWarp) p[e] = l[e];
    }
    for (int e = lane; e < E; e += kWarp) dp[e] = 0.0f;
    __syncwarp();

    // dp from dw, through the gate.
    const int32_t *ids = a.ids + static_cast<int64_t>(t) * a.k_max;
    const float *dw = a.dw + static_cast<int64_t>(t) * a.k_max;
    if (a.gate == MOLORA_GATE_DENSE || (a.gate == MOLORA_GATE_TOPK && !a.renormalize)) {
        // dp_e = Σ of dw over the slots holding e (more than one where a routing repeats e).
        scatter_slots(dp, ids, a.k_max, E, lane, [&](int s) { return dw[s]; });
    } else {
        const bool thr = a.gate == MOLORA_GATE_THRESHOLD;
        const double tau = thr ? static_cast<double>(a.taus ? a.taus[t] : a.tau) : 0.0;
        double z_sum = 0.0;
        int n = 0;
        for (int s = lane; s < a.k_max; s += kWarp) {
            const int e = ids[s];
            if (e >= 0 && e < E) {
                z_sum += static_cast<double>(p[e]) - tau;
                ++n;
            }
        }
        z_sum = warp_sum_double(z_sum);
        n = static_cast<int>(warp_sum(static_cast<float>(n)));
        const bool fallback = thr && n == 1 && static_cast<double>(p[ids[0] >= 0 && ids[0] < E ? ids[0] : 0]) < tau;
        double wdw = 0.0;
        if (z_sum > 0.0 && !fallback) {
            for (int s = lane; s < a.k_max; s += kWarp) {
                const int e = ids[s];
                if (e >= 0 && e < E) wdw += (static_cast<double>(p[e]) - tau) / z_sum * dw[s];
            }
        }
        wdw = warp_sum_double(wdw);
        double dtau = 0.0;
        if (z_sum > 0.0 && !fallback) {  // uniform across the warp (butterfly sums)
            scatter_slots(dp, ids, a.k_max, E, lane, [&](int s) { return static_cast<float>((dw[s] - wdw) / z_sum); });
            if (thr) {
                for (int s = lane; s < a.k_max; s += kWarp) {
                    const int e = ids[s];
                    if (e >= 0 && e < E) {
                        const double w = (static_cast<double>(p[e]) - tau) / z_sum;
                        dtau += dw[s] * (n * w - 1.0) / z_sum;
                    }
                }
            }
        }
        dtau = warp_sum_double(dtau);
        if (thr && a.dtau && lane == 0) a.dtau[t] = static_cast<float>(dtau);
    }
    __syncwarp();

    // dl from dp, through the combination (in place: dp becomes dl).
    if (a.combine == MOLORA_COMBINE_MIX) {
        double dlam = 0.0;
        for (int e = lane; e < E; e += kWarp) {
            dlam += static_cast<double>(dp[e]) * (static_cast<double>(g[e]) - static_cast<double>(l[e]));
            dp[e] = (1.0f - a.lambda) * dp[e];
        }
        dlam = warp_sum_double(dlam);
        if (a.dlambda_tokens && lane == 0) a.dlambda_tokens[t] = static_cast<float>(dlam);
    } else if (a.combine == MOLORA_COMBINE_PRODUCT) {
        if (prod_sum > 0.0) {
            double dot = 0.0;
            for (int e = lane; e < E; e += kWarp) dot += static_cast<double>(dp[e]) * static_cast<double>(p[e]);
            dot = warp_sum_double(dot);
            __syncwarp();
            for (int e = lane; e < E; e += kWarp)
                dp[e] = static_cast<float>((static_cast<double>(dp[e]) - dot) / prod_sum * static_cast<double>(g[e]));
        }
        if (a.dlambda_tokens && lane == 0) a.dlambda_tokens[t] = 0.0f;
    } else if (a.dlambda_tokens && lane == 0) {
        a.dlambda_tokens[t] = 0.0f;
    }
    __syncwarp();

    // dz from dl, through the activation (at l).
    float *dz = a.dz + static_cast<int64_t>(t) * E;
    if (a.activation == MOLORA_ACTIVATION_SOFTMAX) {
        double dot = 0.0;
        for (int e = lane; e < E; e += kWarp) dot += static_cast<double>(l[e]) * dp[e];
        dot = warp_sum_double(dot);
        for (int e = lane; e < E; e += kWarp) dz[e] = static_cast<float>(l[e] * (dp[e] - dot) / a.temperature);
    } else if (a.activation == MOLORA_ACTIVATION_SIGMOID) {
        for (int e = lane; e < E; e += kWarp) dz[e] = dp[e] * l[e] * (1.0f - l[e]) / a.temperature;
    } else {  // MOLORA_ACTIVATION_NONE
        for (int e = lane; e < E; e += kWarp) dz[e] = dp[e];
    }
}

// Σ_t v[t] into out[0], one block: each thread sums a strided run in order, then a fixed tree.
// The order depends on n only, so the result is deterministic.
constexpr int kSumThreads = 256;
__global__ void __launch_bounds__(kSumThreads) ordered_sum_kernel(const float *v, int n, float *out) {
    MOLORA_SHARED(double, part, [kSumThreads]);
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += kSumThreads) acc += static_cast<double>(v[i]);
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int w = kSumThreads / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = static_cast<float>(part[0]);
}

constexpr int kRouterThreads = 256;

// dW_g and db: one thread per (e, i) (i = d_in is db), tokens in order.
template <typename T>
__global__ void __launch_bounds__(kRedThreads) router_dw_kernel(molora_router_backward_args a) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kRedOut + threadIdx.x % kRedOut;
    const int64_t cols = static_cast<int64_t>(a.d_in) + 1;
    const bool valid = idx < cols * a.num_experts;
    const int e = valid ? static_cast<int>(idx / cols) : 0, i = valid ? static_cast<int>(idx % cols) : 0;
    const T *x = static_cast<const T *>(a.x);
    const float acc = sliced_sum(0, valid ? a.num_tokens : 0, [&](int t, float acc) {
        const float g = a.dz[static_cast<int64_t>(t) * a.num_experts + e];
        return i < a.d_in ? fmaf(g, to_f32(x[static_cast<int64_t>(t) * a.d_in + i]), acc) : acc + g;
    });
    if (!valid || threadIdx.x >= kRedOut) return;
    if (i < a.d_in) a.dw_g[static_cast<int64_t>(e) * a.d_in + i] = acc;
    else a.db[e] = acc;
}

// dx: one thread per (t, i), experts in order.
template <typename T>
__global__ void __launch_bounds__(kRouterThreads) router_dx_kernel(molora_router_backward_args a) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kRouterThreads + threadIdx.x;
    if (idx >= static_cast<int64_t>(a.num_tokens) * a.d_in) return;
    const int64_t t = idx / a.d_in;
    const int i = static_cast<int>(idx % a.d_in);
    const T *w = static_cast<const T *>(a.w_g);
    float acc = 0.0f;
    for (int e = 0; e < a.num_experts; ++e)
        acc = fmaf(a.dz[t * a.num_experts + e], to_f32(w[static_cast<int64_t>(e) * a.d_in + i]), acc);
    a.dx[idx] = acc;
}

// db alone (the tensor-core path), the same sums as router_dw_kernel's db.
__global__ void __launch_bounds__(kRedThreads) router_db_kernel(molora_router_backward_args a) {
    const int e = blockIdx.x * kRedOut + threadIdx.x % kRedOut;
    const bool valid = e < a.num_experts;
    const float acc = sliced_sum(0, valid ? a.num_tokens : 0, [&](int t, float acc) {
        return acc + a.dz[static_cast<int64_t>(t) * a.num_experts + e];
    });
    if (!valid || threadIdx.x >= kRedOut) return;
    a.db[e] = acc;
}

// dz_t[t, e] = round(dz[t, e]), zero for e in [E, E8).
template <typename T>
__global__ void __launch_bounds__(kRouterThreads) router_dz_cast_kernel(molora_router_backward_args a, int e8) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kRouterThreads + threadIdx.x;
    if (idx >= static_cast<int64_t>(a.num_tokens) * e8) return;
    const int64_t t = idx / e8;
    const int e = static_cast<int>(idx % e8);
    static_cast<T *>(a.dz_t)[idx] = from_f32<T>(e < a.num_experts ? a.dz[t * a.num_experts + e] : 0.0f);
}

// dW_g = dz_tᵀ·x: [E8, T]·[T, d_in], the sum over T split over blockIdx.z.
template <typename T, int BN>
__global__ void __launch_bounds__(DgWGemm<T, BN>::THREADS) router_dw_tc_kernel(molora_router_backward_args a, int e8) {
    using G = DgWGemm<T, BN>;
    MOLORA_DYNAMIC_SHARED(128, unsigned char, router_dw_smem);
    T *smem = reinterpret_cast<T *>(router_dw_smem);
    const int m0 = blockIdx.x * 64, n0 = blockIdx.y * BN, split = blockIdx.z;
    const int k_tiles = (a.num_tokens + G::BK - 1) / G::BK;
    const int per = (k_tiles + a.splits - 1) / a.splits;
    const int kt0 = min(k_tiles, split * per), kt1 = min(k_tiles, kt0 + per);
    const Strided<T> al{static_cast<const T *>(a.dz_t), e8, a.num_tokens, e8};
    const Strided<T> bl{static_cast<const T *>(a.x), a.d_in, a.num_tokens, a.d_in};
    typename G::Acc acc;
    G::zero(acc);
    G::run(smem, al, bl, m0, n0, kt0, kt1, static_cast<const T *>(a.x), acc, false);
    auto store = [&](int m, int n, float v) { a.dw_g[static_cast<int64_t>(m) * a.d_in + n] = v; };
    if (a.splits == 1) {
        G::for_each_acc(acc, [&](int r, int c, float v0, float v1) {
            const int m = m0 + r, n = n0 + c;
            if (m >= a.num_experts) return;
            if (n < a.d_in) store(m, n, v0);
            if (n + 1 < a.d_in) store(m, n + 1, v1);
        });
        return;
    }
    const int tile = blockIdx.x * gridDim.y + blockIdx.y;
    G::split_k_epilogue(acc, a.partials, a.num_experts, a.d_in, a.d_in, m0, n0, split, a.splits, a.tickets + tile, store);
}

// dx = dz_t·W_g: [T, E8]·[E8, d_in] (W_g's rows past E read as zero).
template <typename T>
__global__ void __launch_bounds__(DgDxGemm<T>::THREADS) router_dx_tc_kernel(molora_router_backward_args a, int e8) {
    using G = DgDxGemm<T>;
    MOLORA_DYNAMIC_SHARED(128, unsigned char, router_dx_smem);
    T *smem = reinterpret_cast<T *>(router_dx_smem);
    const int n0 = blockIdx.x * 128, m0 = blockIdx.y * 128;
    const T *dz_t = static_cast<const T *>(a.dz_t);
    const KMajor<T> al{dz_t, a.num_tokens, e8, e8};
    const Strided<T> bl{static_cast<const T *>(a.w_g), a.d_in, a.num_experts, a.d_in};
    typename G::Acc acc;
    G::zero(acc);
    G::run(smem, al, bl, m0, n0, 0, (e8 + G::BK - 1) / G::BK, dz_t, acc, false);
    G::for_each_acc(acc, [&](int r, int c, float v0, float v1) {
        const int t = m0 + r, i = n0 + c;
        if (t >= a.num_tokens) return;
        float *dx = a.dx + static_cast<int64_t>(t) * a.d_in + i;
        if (i < a.d_in) dx[0] = v0;
        if (i + 1 < a.d_in) dx[1] = v1;
    });
}

template <typename T, int BN>
int launch_router_dw_tc(const molora_router_backward_args &a, int e8, cudaStream_t s) {
    using G = DgWGemm<T, BN>;
    const dim3 grid((a.num_experts + 63) / 64, (a.d_in + BN - 1) / BN, a.splits);
    if (grid.y > 65535u || grid.z > 65535u || static_cast<int64_t>(grid.x) * grid.y > a.num_tickets)
        return static_cast<int>(cudaErrorInvalidValue);
    const int err = allow_dynamic_smem<router_dw_tc_kernel<T, BN>>(G::SMEM_BYTES);
    if (err) return err;
    launch<router_dw_tc_kernel<T, BN>>(grid, G::THREADS, G::SMEM_BYTES, s, a, e8);
    return last_launch_error();
}

template <typename T>
int launch_router_backward_tc(const molora_router_backward_args &a, cudaStream_t s) {
    const int e8 = (a.num_experts + 7) / 8 * 8;
    launch<router_db_kernel>(static_cast<unsigned>((a.num_experts + kRedOut - 1) / kRedOut), kRedThreads, 0, s, a);
    int err = last_launch_error();
    if (err) return err;
    const int64_t n = static_cast<int64_t>(a.num_tokens) * e8;
    if (n > 0) {
        launch<router_dz_cast_kernel<T>>(static_cast<unsigned>((n + kRouterThreads - 1) / kRouterThreads), kRouterThreads, 0,
                                         s, a, e8);
        err = last_launch_error();
        if (err) return err;
    }
    err = a.d_in <= 64 ? launch_router_dw_tc<T, 64>(a, e8, s) : launch_router_dw_tc<T, 128>(a, e8, s);
    if (err || !a.dx || a.num_tokens == 0) return err;
    using G = DgDxGemm<T>;
    const dim3 grid((a.d_in + 127) / 128, (a.num_tokens + 127) / 128);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    err = allow_dynamic_smem<router_dx_tc_kernel<T>>(G::SMEM_BYTES);
    if (err) return err;
    launch<router_dx_tc_kernel<T>>(grid, G::THREADS, G::SMEM_BYTES, s, a, e8);
    return last_launch_error();
}

template <typename T>
int launch_router_backward(const molora_router_backward_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_router_backward_args a = *args;
    if (a.num_tokens < 0 || a.d_in < 1 || a.num_experts < 1) return static_cast<int>(cudaErrorInvalidValue);
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (a.dz_t) {
        bool ok = sizeof(T) == 2 && a.tickets && a.d_in % 8 == 0 && a.splits >= 1 &&
                  a.splits <= max(1, (a.num_tokens + 31) / 32) && (a.splits == 1 || a.partials);
        for (const void *p : {a.x, a.w_g, static_cast<const void *>(a.dz_t)})
            ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
        if (!ok) return static_cast<int>(cudaErrorInvalidValue);
        if constexpr (sizeof(T) == 2) return launch_router_backward_tc<T>(a, s);
        return static_cast<int>(cudaErrorInvalidValue);
    }
    const int64_t n_dw = (static_cast<int64_t>(a.d_in) + 1) * a.num_experts;
    launch<router_dw_kernel<T>>(static_cast<unsigned>((n_dw + kRedOut - 1) / kRedOut), kRedThreads, 0, s, a);
    int err = last_launch_error();
    if (err || !a.dx || a.num_tokens == 0) return err;
    const int64_t n_dx = static_cast<int64_t>(a.num_tokens) * a.d_in;
    launch<router_dx_kernel<T>>(static_cast<unsigned>((n_dx + kRouterThreads - 1) / kRouterThreads), kRouterThreads, 0, s, a);
    return last_launch_error();
}

}  // namespace
}  // namespace molora

extern "C" int molora_gating_backward_f32(const molora_gating_backward_args *args, molora_stream_t stream) {
    using namespace molora;
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_gating_backward_args a = *args;
    const bool combine_ok =
        a.combine == MOLORA_COMBINE_NONE ||
        ((a.combine == MOLORA_COMBINE_MIX || a.combine == MOLORA_COMBINE_PRODUCT) && a.global_probs && a.seq_offsets &&
         a.num_seqs >= 1 && (a.combine != MOLORA_COMBINE_MIX || (a.lambda >= 0.0f && a.lambda <= 1.0f)));
    if (a.num_tokens < 0 || a.num_experts < 1 || a.num_experts > MOLORA_GATING_MAX_EXPERTS || a.k_max < 1 ||
        !(a.temperature > 0.0f) || !combine_ok || (a.dlambda && !a.dlambda_tokens) ||
        (a.activation != MOLORA_ACTIVATION_SOFTMAX && a.activation != MOLORA_ACTIVATION_SIGMOID &&
         a.activation != MOLORA_ACTIVATION_NONE) ||
        (a.gate != MOLORA_GATE_TOPK && a.gate != MOLORA_GATE_THRESHOLD && a.gate != MOLORA_GATE_DENSE))
        return static_cast<int>(cudaErrorInvalidValue);
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (a.num_tokens > 0) {
        const size_t smem = sizeof(float) * 3 * kGateBwdWarps * a.num_experts;
        launch<gating_backward_kernel>((a.num_tokens + kGateBwdWarps - 1) / kGateBwdWarps, kGateBwdWarps * kWarp, smem, s, a);
        const int err = last_launch_error();
        if (err) return err;
    }
    if (a.dlambda) {
        // T = 0 gives dλ = 0 (the kernel reads nothing).
        launch<ordered_sum_kernel>(1, kSumThreads, 0, s, a.dlambda_tokens, a.num_tokens, a.dlambda);
        return last_launch_error();
    }
    return 0;
}

extern "C" {
int molora_router_backward_f32(const molora_router_backward_args *a, molora_stream_t s) { return molora::launch_router_backward<float>(a, s); }
int molora_router_backward_f16(const molora_router_backward_args *a, molora_stream_t s) { return molora::launch_router_backward<__half>(a, s); }
int molora_router_backward_bf16(const molora_router_backward_args *a, molora_stream_t s) { return molora::launch_router_backward<__nv_bfloat16>(a, s); }
}

// ---- weight-space mixing backward (SAML) --------------------------------------------------------

namespace molora {
namespace {

constexpr int kMixBwdThreads = 256;

// dW[e, i] = Σ_s p[s, e]·dmix[s, i], sequences in order; one thread per (e, i), expert blockIdx.y.
__global__ void __launch_bounds__(kMixBwdThreads)
    mix_bwd_grad_kernel(const float *probs, const float *dmix, float *dw, int num_experts, int num_seqs, int64_t per) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kMixBwdThreads + threadIdx.x;
    const int e = blockIdx.y;
    if (i >= per) return;
    float acc = 0.0f;
    for (int s = 0; s < num_seqs; ++s)
        acc = fmaf(probs[static_cast<int64_t>(s) * num_experts + e], dmix[static_cast<int64_t>(s) * per + i], acc);
    dw[static_cast<int64_t>(e) * per + i] = acc;
}

// dp[s, e] = ⟨dĀ_s, A_e⟩ + ⟨dB̄_s, B_e⟩: one block per (e = blockIdx.x, s = blockIdx.y); each thread
// sums a strided run in order, then a fixed tree (deterministic).
template <typename T>
__global__ void __launch_bounds__(kMixBwdThreads) mix_bwd_dp_kernel(molora_mix_backward_args a) {
    MOLORA_SHARED(float, part, [kMixBwdThreads]);
    const int e = blockIdx.x, s = blockIdx.y;
    const T *A = static_cast<const T *>(a.a) + static_cast<int64_t>(e) * a.per_a;
    const T *B = static_cast<const T *>(a.b) + static_cast<int64_t>(e) * a.per_b;
    const float *dA = a.da_mixed + static_cast<int64_t>(s) * a.per_a;
    const float *dB = a.db_mixed + static_cast<int64_t>(s) * a.per_b;
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < a.per_a; i += kMixBwdThreads) acc = fmaf(to_f32(A[i]), dA[i], acc);
    for (int64_t i = threadIdx.x; i < a.per_b; i += kMixBwdThreads) acc = fmaf(to_f32(B[i]), dB[i], acc);
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int w = kMixBwdThreads / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) a.dp[static_cast<int64_t>(s) * a.num_experts + e] = part[0];
}

template <typename T>
int launch_mix_backward(const molora_mix_backward_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_mix_backward_args a = *args;
    if (a.num_experts < 1 || a.num_experts > 65535 || a.num_seqs < 0 || a.num_seqs > 65535 || a.per_a < 1 ||
        a.per_b < 1)
        return static_cast<int>(cudaErrorInvalidValue);
    const int64_t bx_a = (a.per_a + kMixBwdThreads - 1) / kMixBwdThreads;
    const int64_t bx_b = (a.per_b + kMixBwdThreads - 1) / kMixBwdThreads;
    if (bx_a > 0x7fffffff || bx_b > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    // dA and dB are written whole, zero when there are no sequences.
    launch<mix_bwd_grad_kernel>(dim3(static_cast<unsigned>(bx_a), a.num_experts), kMixBwdThreads, 0, s, a.probs,
                                a.da_mixed, a.da, a.num_experts, a.num_seqs, a.per_a);
    int err = last_launch_error();
    if (err) return err;
    launch<mix_bwd_grad_kernel>(dim3(static_cast<unsigned>(bx_b), a.num_experts), kMixBwdThreads, 0, s, a.probs,
                                a.db_mixed, a.db, a.num_experts, a.num_seqs, a.per_b);
    err = last_launch_error();
    if (err || a.num_seqs == 0) return err;
    launch<mix_bwd_dp_kernel<T>>(dim3(a.num_experts, a.num_seqs), kMixBwdThreads, 0, s, a);
    return last_launch_error();
}

}  // namespace
}  // namespace molora

extern "C" {
int molora_mix_backward_f32(const molora_mix_backward_args *a, molora_stream_t s) { return molora::launch_mix_backward<float>(a, s); }
int molora_mix_backward_f16(const molora_mix_backward_args *a, molora_stream_t s) { return molora::launch_mix_backward<__half>(a, s); }
int molora_mix_backward_bf16(const molora_mix_backward_args *a, molora_stream_t s) { return molora::launch_mix_backward<__nv_bfloat16>(a, s); }
}

// ---- backward of the dense-gated path -------------------------------------------------------------

namespace molora {
namespace {

constexpr int kDgThreads = 256;
constexpr int kDgCols = MOLORA_DENSE_GATED_MAX_COLUMNS;
constexpr int kDgColsPerThread = kDgCols / kDgThreads;  // 2
constexpr int kDgChunk = 512;                            // dy values staged per pass

// One block per kDgTok tokens: U[t, :] (every column), gate[t, :] and dw[t, :]. Each B element read
// serves the block's kDgTok tokens (the sums over o stay in order per token).
constexpr int kDgTok = 8;

template <typename T>
__global__ void __launch_bounds__(kDgThreads) dg_token_kernel(molora_lora_backward_dense_args a) {
    MOLORA_SHARED(float, dys, [kDgTok][kDgChunk]);
    MOLORA_SHARED(float, us, [kDgTok][kDgCols]);
    const int t0 = blockIdx.x * kDgTok;
    const int nt = min(kDgTok, a.num_tokens - t0);
    const int C = a.num_experts * a.rank;
    const T *B = static_cast<const T *>(a.b);
    float acc[kDgTok][kDgColsPerThread];
#pragma unroll
    for (int tt = 0; tt < kDgTok; ++tt)
#pragma unroll
        for (int q = 0; q < kDgColsPerThread; ++q) acc[tt][q] = 0.0f;
    for (int o0 = 0; o0 < a.d_out; o0 += kDgChunk) {
        const int n = min(kDgChunk, a.d_out - o0);
        for (int idx = threadIdx.x; idx < kDgTok * n; idx += kDgThreads) {
            const int tt = idx / n, o = idx % n;
            dys[tt][o] = tt < nt ? to_f32(static_cast<const T *>(a.dy)[static_cast<int64_t>(t0 + tt) * a.d_out + o0 + o]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < kDgColsPerThread; ++q) {
            const int c = threadIdx.x + q * kDgThreads;
            if (c < C) {
                const int e = c / a.rank, j = c % a.rank;
                const T *bc = B + (static_cast<int64_t>(e) * a.d_out + o0) * a.rank + j;
#pragma unroll 4
                for (int o = 0; o < n; ++o) {
                    const float b = to_f32(bc[static_cast<int64_t>(o) * a.rank]);
#pragma unroll
                    for (int tt = 0; tt < kDgTok; ++tt) acc[tt][q] = fmaf(dys[tt][o], b, acc[tt][q]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < kDgColsPerThread; ++q) {
        const int c = threadIdx.x + q * kDgThreads;
        if (c < C) {
#pragma unroll
            for (int tt = 0; tt < kDgTok; ++tt) {
                if (tt < nt) a.u[static_cast<int64_t>(t0 + tt) * C + c] = acc[tt][q];
                us[tt][c] = acc[tt][q];
            }
        }
    }
    __syncthreads();
    for (int tt = 0; tt < nt; ++tt) {
        const int t = t0 + tt;
        const int32_t *ids = a.ids + static_cast<int64_t>(t) * a.k_max;
        const float *w = a.weights + static_cast<int64_t>(t) * a.k_max;
        for (int e = threadIdx.x; e < a.num_experts; e += kDgThreads) {
            float g = 0.0f;
            for (int s = 0; s < a.k_max; ++s)
                if (ids[s] == e) g += w[s];
            a.gate[static_cast<int64_t>(t) * a.num_experts + e] = g;
        }
        const float *h = a.h + static_cast<int64_t>(t) * C;
        for (int s = threadIdx.x; s < a.k_max; s += kDgThreads) {
            const int e = ids[s];
            float d = 0.0f;
            if (e >= 0 && e < a.num_experts) {
                for (int j = 0; j < a.rank; ++j) d = fmaf(h[e * a.rank + j], us[tt][e * a.rank + j], d);
                d *= a.scale;
            }
            a.dw[static_cast<int64_t>(t) * a.k_max + s] = d;
        }
    }
}

// After the tensor-core U: gate[t, e] (Σ of the token's weights on e) and dw[t, s] =
// scale·Σ_j H[t, e·r + j]·U[t, e·r + j], one thread per token, the same sums as dg_token_kernel.
__global__ void __launch_bounds__(kDgThreads) dg_gate_dw_kernel(molora_lora_backward_dense_args a) {
    const int t = blockIdx.x * kDgThreads + threadIdx.x;
    if (t >= a.num_tokens) return;
    const int C = a.num_experts * a.rank;
    const int32_t *ids = a.ids + static_cast<int64_t>(t) * a.k_max;
    const float *w = a.weights + static_cast<int64_t>(t) * a.k_max;
    for (int e = 0; e < a.num_experts; ++e) {
        float g = 0.0f;
        for (int s = 0; s < a.k_max; ++s)
            if (ids[s] == e) g += w[s];
        a.gate[static_cast<int64_t>(t) * a.num_experts + e] = g;
    }
    const float *h = a.h + static_cast<int64_t>(t) * C;
    const float *u = a.u + static_cast<int64_t>(t) * C;
    for (int s = 0; s < a.k_max; ++s) {
        const int e = ids[s];
        float d = 0.0f;
        if (e >= 0 && e < a.num_experts) {
            for (int j = 0; j < a.rank; ++j) d = fmaf(h[e * a.rank + j], u[e * a.rank + j], d);
            d *= a.scale;
        }
        a.dw[static_cast<int64_t>(t) * a.k_max + s] = d;
    }
}

// dx[t, i]: one thread per element, experts in order.
template <typename T>
__global__ void __launch_bounds__(kDgThreads) dg_dx_kernel(molora_lora_backward_dense_args a) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kDgThreads + threadIdx.x;
    if (idx >= static_cast<int64_t>(a.num_tokens) * a.d_in) return;
    const int64_t t = idx / a.d_in;
    const int i = static_cast<int>(idx % a.d_in);
    const int C = a.num_experts * a.rank;
    const T *A = static_cast<const T *>(a.a);
    const float *u = a.u + t * C;
    float acc = 0.0f;
    for (int e = 0; e < a.num_experts; ++e) {
        const float g = a.gate[t * a.num_experts + e];
        if (g == 0.0f) continue;
        float d = 0.0f;
        for (int j = 0; j < a.rank; ++j)
            d = fmaf(u[e * a.rank + j], to_f32(A[static_cast<int64_t>(e * a.rank + j) * a.d_in + i]), d);
        acc = fmaf(g, d, acc);
    }
    a.dx[idx] = a.scale * acc;
}

// ---- the dense-gated backward on tensor cores ---------------------------------------------------
// Ũ = round(G ⊙ U), Ĥ = round(G ⊙ H): one thread per element.
template <typename T>
__global__ void __launch_bounds__(kDgThreads) dg_gated_operands_kernel(molora_lora_backward_dense_args a) {
    const int C = a.num_experts * a.rank;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kDgThreads + threadIdx.x;
    if (idx >= static_cast<int64_t>(a.num_tokens) * C) return;
    const int64_t t = idx / C;
    const int e = static_cast<int>(idx % C) / a.rank;
    const float g = a.gate[t * a.num_experts + e];
    static_cast<T *>(a.ug)[idx] = from_f32<T>(g * a.u[idx]);
    static_cast<T *>(a.hg)[idx] = from_f32<T>(g * a.h[idx]);
}



// dx = scale·Ũ·A_all: [T, C]·[C, d_in].
template <typename T>
__global__ void __launch_bounds__(DgDxGemm<T>::THREADS) dg_dx_tc_kernel(molora_lora_backward_dense_args a) {
    using G = DgDxGemm<T>;
    MOLORA_DYNAMIC_SHARED(128, unsigned char, dg_dx_smem);
    T *smem = reinterpret_cast<T *>(dg_dx_smem);
    const int C = a.num_experts * a.rank;
    const int n0 = blockIdx.x * 128, m0 = blockIdx.y * 128;
    const T *ug = static_cast<const T *>(a.ug);
    const KMajor<T> al{ug, a.num_tokens, C, C};
    const Strided<T> bl{static_cast<const T *>(a.a), a.d_in, C, a.d_in};
    typename G::Acc acc;
    G::zero(acc);
    G::run(smem, al, bl, m0, n0, 0, (C + G::BK - 1) / G::BK, ug, acc, false);
    G::for_each_acc(acc, [&](int r, int c, float v0, float v1) {
        const int t = m0 + r, i = n0 + c;
        if (t >= a.num_tokens) return;
        float *dx = a.dx + static_cast<int64_t>(t) * a.d_in + i;
        if (i < a.d_in) dx[0] = a.scale * v0;
        if (i + 1 < a.d_in) dx[1] = a.scale * v1;
    });
}

// The weight gradients, sums over T split over blockIdx.z: kDa: dA[c, i] = scale·Σ_t Ũ[t, c]·x[t, i];
// else dB[e, o, j] = scale·Σ_t dy[t, o]·Ĥ[t, e·r + j].
template <typename T, int BN, bool kDa>
__global__ void __launch_bounds__(DgWGemm<T, BN>::THREADS) dg_weight_tc_kernel(molora_lora_backward_dense_args a) {
    using G = DgWGemm<T, BN>;
    MOLORA_DYNAMIC_SHARED(128, unsigned char, dg_w_smem);
    T *smem = reinterpret_cast<T *>(dg_w_smem);
    const int C = a.num_experts * a.rank;
    const int M = kDa ? C : a.d_out, N = kDa ? a.d_in : C;
    const int m0 = blockIdx.x * 64, n0 = blockIdx.y * BN, split = blockIdx.z;
    const int k_tiles = (a.num_tokens + G::BK - 1) / G::BK;
    const int per = (k_tiles + a.splits - 1) / a.splits;
    const int kt0 = min(k_tiles, split * per), kt1 = min(k_tiles, kt0 + per);
    const Strided<T> al = kDa ? Strided<T>{static_cast<const T *>(a.ug), C, a.num_tokens, C}
                              : Strided<T>{static_cast<const T *>(a.dy), a.d_out, a.num_tokens, a.d_out};
    const Strided<T> bl = kDa ? Strided<T>{static_cast<const T *>(a.x), a.d_in, a.num_tokens, a.d_in}
                              : Strided<T>{static_cast<const T *>(a.hg), C, a.num_tokens, C};
    typename G::Acc acc;
    G::zero(acc);
    G::run(smem, al, bl, m0, n0, kt0, kt1, static_cast<const T *>(a.hg), acc, false);
    auto store = [&](int m, int n, float v) {
        if (kDa) {
            a.da[static_cast<int64_t>(m) * a.d_in + n] = a.scale * v;
        } else {
            const int e = n / a.rank, j = n % a.rank;
            a.db[(static_cast<int64_t>(e) * a.d_out + m) * a.rank + j] = a.scale * v;
        }
    };
    if (a.splits == 1) {
        G::for_each_acc(acc, [&](int r, int c, float v0, float v1) {
            const int m = m0 + r, n = n0 + c;
            if (m >= M) return;
            if (n < N) store(m, n, v0);
            if (n + 1 < N) store(m, n + 1, v1);
        });
        return;
    }
    const int tile = blockIdx.x * gridDim.y + blockIdx.y;
    G::split_k_epilogue(acc, a.partials, M, N, N, m0, n0, split, a.splits, a.tickets + tile, store);
}

template <typename T, int BN, bool kDa>
int launch_dg_weight_tc(const molora_lora_backward_dense_args &a, cudaStream_t s) {
    using G = DgWGemm<T, BN>;
    const int C = a.num_experts * a.rank;
    const int M = kDa ? C : a.d_out, N = kDa ? a.d_in : C;
    const dim3 grid((M + 63) / 64, (N + BN - 1) / BN, a.splits);
    if (grid.y > 65535u || grid.z > 65535u || static_cast<int64_t>(grid.x) * grid.y > a.num_tickets)
        return static_cast<int>(cudaErrorInvalidValue);
    const int err = allow_dynamic_smem<dg_weight_tc_kernel<T, BN, kDa>>(G::SMEM_BYTES);
    if (err) return err;
    launch<dg_weight_tc_kernel<T, BN, kDa>>(grid, G::THREADS, G::SMEM_BYTES, s, a);
    return last_launch_error();
}

template <typename T, bool kDa>
int launch_dg_weight_tc(const molora_lora_backward_dense_args &a, cudaStream_t s) {
    const int N = kDa ? a.d_in : a.num_experts * a.rank;
    return N <= 64 ? launch_dg_weight_tc<T, 64, kDa>(a, s) : launch_dg_weight_tc<T, 128, kDa>(a, s);
}

// After U, the gate and dw: Ũ and Ĥ, then dx, dA and dB on tensor cores.
template <typename T>
int launch_backward_dense_tc(const molora_lora_backward_dense_args &a, cudaStream_t s) {
    const int64_t n = static_cast<int64_t>(a.num_tokens) * a.num_experts * a.rank;
    if (n > 0) {
        launch<dg_gated_operands_kernel<T>>(static_cast<unsigned>((n + kDgThreads - 1) / kDgThreads), kDgThreads, 0, s, a);
        int err = last_launch_error();
        if (err) return err;
        using G = DgDxGemm<T>;
        const dim3 grid((a.d_in + 127) / 128, (a.num_tokens + 127) / 128);
        if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
        err = allow_dynamic_smem<dg_dx_tc_kernel<T>>(G::SMEM_BYTES);
        if (err) return err;
        launch<dg_dx_tc_kernel<T>>(grid, G::THREADS, G::SMEM_BYTES, s, a);
        err = last_launch_error();
        if (err) return err;
    }
    const int err = launch_dg_weight_tc<T, true>(a, s);
    if (err) return err;
    return launch_dg_weight_tc<T, false>(a, s);
}

template <typename T>
int launch_backward_dense(const molora_lora_backward_dense_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_lora_backward_dense_args a = *args;
    if (a.num_tokens < 0 || a.k_max < 1 || a.num_experts < 1 || a.rank < 1 || a.d_in < 1 || a.d_out < 1 ||
        static_cast<int64_t>(a.num_experts) * a.rank > kDgCols)
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.ug) {
        bool ok = sizeof(T) == 2 && a.hg && a.tickets && a.d_in % 8 == 0 && a.d_out % 8 == 0 && a.rank % 8 == 0 &&
                  a.splits >= 1 && a.splits <= max(1, (a.num_tokens + 31) / 32) && (a.splits == 1 || a.partials);
        for (const void *p : {a.x, a.a, a.b, a.dy, static_cast<const void *>(a.ug), static_cast<const void *>(a.hg)})
            ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
        if (!ok) return static_cast<int>(cudaErrorInvalidValue);
    }
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (a.num_tokens > 0) {
        int err = u_on_tensor_cores<T>(a.dy, a.b, a.u, nullptr, 1, nullptr, 1, a.num_tokens,
                                       a.num_experts * a.rank, a.rank, a.d_out, stream);
        if (err == -1) {
            launch<dg_token_kernel<T>>((a.num_tokens + kDgTok - 1) / kDgTok, kDgThreads, 0, s, a);
            err = last_launch_error();
        } else if (err == 0) {
            launch<dg_gate_dw_kernel>((a.num_tokens + kDgThreads - 1) / kDgThreads, kDgThreads, 0, s, a);
            err = last_launch_error();
        }
        if (err) return err;
    }
    if (a.ug) {
        if constexpr (sizeof(T) == 2) return launch_backward_dense_tc<T>(a, s);
        return static_cast<int>(cudaErrorInvalidValue);
    }
    const int64_t n_dx = static_cast<int64_t>(a.num_tokens) * a.d_in;
    RowGemmArgs g{};
    g.q_offsets = nullptr;
    g.num_rows = a.num_tokens;
    g.gate = a.gate;
    g.num_experts = a.num_experts;
    g.rank = a.rank;
    g.m_count = a.num_experts * a.rank;
    g.scale = a.scale;
    const int err = launch_weight_grads<T>(g, true, 1, a.h, a.u, a.x, a.dy, a.da, a.db, a.d_in, a.d_out, s);
    if (err || n_dx == 0) return err;
    launch<dg_dx_kernel<T>>(static_cast<unsigned>((n_dx + kDgThreads - 1) / kDgThreads), kDgThreads, 0, s, a);
    return last_launch_error();
}

}  // namespace
}  // namespace molora

extern "C" {
int molora_lora_backward_dense_f32(const molora_lora_backward_dense_args *a, molora_stream_t s) { return molora::launch_backward_dense<float>(a, s); }
int molora_lora_backward_dense_f16(const molora_lora_backward_dense_args *a, molora_stream_t s) { return molora::launch_backward_dense<__half>(a, s); }
int molora_lora_backward_dense_bf16(const molora_lora_backward_dense_args *a, molora_stream_t s) { return molora::launch_backward_dense<__nv_bfloat16>(a, s); }
}
