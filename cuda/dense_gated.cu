// The dense-gated LoRA part on tensor cores: K1 = every expert's shrink as one mma.sync GEMM over
// x·A_allᵀ (split-K over d_in with a deterministic, self-resetting reduction) whose epilogue writes h
// (f32, for the backward) and the gated hg = g ⊙ h; K2 = y += scale · hg·B_allᵀ as one mma.sync GEMM
// with K = E·r, y read and written once. See molora_dense_gated_args in molora.h.

#include "common.cuh"
#include "gating.cuh"
#include "gemm.cuh"

namespace molora {
namespace {

constexpr int kShrinkBM = MOLORA_DG_SHRINK_BM;

template <typename T, int BN> using DgShrink = TileGemm<T, kShrinkBM, BN, 2, 2, 4>;
template <typename T> using DgExpand = TileGemm<T, 128, 128, 4, 2, 3>;

// hg of the expand as one [T, terms·N] operand: k < N reads plane 0, k in [N, 2N) plane 1.
template <typename T>
struct GatedH {
    const T *p;
    int rows, n_cols, terms;
    __device__ const T *operator()(int row, int k) const {
        if (row >= rows || k >= terms * n_cols) return nullptr;
        const int q = k >= n_cols;
        return p + (static_cast<int64_t>(q) * rows + row) * n_cols + (k - q * n_cols);
    }
};
// B of the expand: row n = output column o, k = e·rank + j at B[e, o, j] (rank a multiple of 8, so
// 8 consecutive k stay inside one expert).
template <typename T>
struct StackedB {
    const T *p;
    int d_out, rank, n_cols;  // n_cols = E·rank
    int terms;
    __device__ const T *operator()(int o, int k) const {
        if (o >= d_out || k >= terms * n_cols) return nullptr;
        if (k >= n_cols) k -= n_cols;  // the second term of hg meets the same B
        const int e = k / rank, j = k % rank;
        return p + (static_cast<int64_t>(e) * d_out + o) * rank + j;
    }
};

// K1 epilogue of one element: h, and hg gated by the token's slots (slot order).
template <typename T>
__device__ __forceinline__ void shrink_store(const molora_dense_gated_args &a, int n_cols, int t, int c, float v) {
    const int64_t at = static_cast<int64_t>(t) * n_cols + c;
    a.h[at] = v;
    const int e = c / a.rank;
    const int32_t *ids = a.ids + static_cast<int64_t>(t) * a.k_max;
    const float *w = a.weights + static_cast<int64_t>(t) * a.k_max;
    float g = 0.0f;
    for (int s = 0; s < a.k_max; ++s)
        if (ids[s] == e) g += w[s];
    const float gv = g * v;
    const T hi = from_f32<T>(gv);
    T *hg = static_cast<T *>(a.hg);
    hg[at] = hi;
    if (a.hg_terms == 2) hg[static_cast<int64_t>(a.num_tokens) * n_cols + at] = from_f32<T>(gv - to_f32(hi));
}

template <typename T, int BN>
__global__ void __launch_bounds__(DgShrink<T, BN>::THREADS) dg_shrink_kernel(molora_dense_gated_args a) {
    using G = DgShrink<T, BN>;
    MOLORA_DYNAMIC_SHARED(128, unsigned char, dg_shrink_smem);
    T *smem = reinterpret_cast<T *>(dg_shrink_smem);
    const int n_cols = a.num_experts * a.rank;
    const int m0 = blockIdx.x * kShrinkBM, n0 = blockIdx.y * BN, split = blockIdx.z;
    const int k_tiles = (a.d_in + G::BK - 1) / G::BK;
    const int per = (k_tiles + a.splits - 1) / a.splits;
    const int kt0 = min(k_tiles, split * per), kt1 = min(k_tiles, kt0 + per);
    const T *x = static_cast<const T *>(a.x);
    const KMajor<T> al{x, a.num_tokens, a.d_in, a.d_in};
    const KMajor<T> bl{static_cast<const T *>(a.a), n_cols, a.d_in, a.d_in};
    typename G::Acc acc;
    G::zero(acc);
    G::run(smem, al, bl, m0, n0, kt0, kt1, x, acc, /*wait_a=*/false);
    // x and A are inputs of the whole layer; the routing and every buffer written below may still be
    // in use by the predecessor (PDL): wait for it here, then let K2 start staging B.
    pdl_wait();
    pdl_launch_dependents();
    if (a.splits == 1) {
        G::for_each_acc(acc, [&](int r, int c, float v0, float v1) {
            const int t = m0 + r, col = n0 + c;
            if (t >= a.num_tokens) return;
            if (col < n_cols) shrink_store<T>(a, n_cols, t, col, v0);
            if (col + 1 < n_cols) shrink_store<T>(a, n_cols, t, col + 1, v1);
        });
        return;
    }
    // Split-K: the tile's last block to arrive sums the partials in split order and gates.
    const int tile = blockIdx.x * gridDim.y + blockIdx.y;
    G::split_k_epilogue(acc, a.partials, a.num_tokens, n_cols, n_cols, m0, n0, split, a.splits, a.tickets + tile,
                        [&](int t, int col, float v) { shrink_store<T>(a, n_cols, t, col, v); });
}

template <typename T>
__global__ void __launch_bounds__(DgExpand<T>::THREADS) dg_expand_kernel(molora_dense_gated_args a) {
    using G = DgExpand<T>;
    MOLORA_DYNAMIC_SHARED(128, unsigned char, dg_expand_smem);
    T *smem = reinterpret_cast<T *>(dg_expand_smem);
    const int n_cols = a.num_experts * a.rank;
    const int n0 = blockIdx.x * 128, m0 = blockIdx.y * 128;
    const T *hg = static_cast<const T *>(a.hg);
    const GatedH<T> al{hg, a.num_tokens, n_cols, a.hg_terms};
    const StackedB<T> bl{static_cast<const T *>(a.b), a.d_out, a.rank, n_cols, a.hg_terms};
    typename G::Acc acc;
    G::zero(acc);
    // B does not depend on K1: its first stages are copied before waiting for K1 (PDL), hg after.
    G::run(smem, al, bl, m0, n0, 0, (a.hg_terms * n_cols + G::BK - 1) / G::BK, hg, acc, /*wait_a=*/true);
    T *y = static_cast<T *>(a.y);
    G::for_each_acc(acc, [&](int r, int c, float v0, float v1) {
        const int t = m0 + r, o = n0 + c;
        if (t >= a.num_tokens) return;
        T *yp = y + static_cast<int64_t>(t) * a.d_out + o;
        // A zero sum (no active slot) leaves y as it is, as the CPU path does.
        if (o < a.d_out && v0 != 0.0f) yp[0] = from_f32<T>(to_f32(yp[0]) + a.scale * v0);
        if (o + 1 < a.d_out && v1 != 0.0f) yp[1] = from_f32<T>(to_f32(yp[1]) + a.scale * v1);
    });
}

// K2, launched after K1 (or D1) with programmatic dependent launch.
template <typename T>
int launch_dg_expand(const molora_dense_gated_args &a, cudaStream_t s) {
    using G = DgExpand<T>;
    const dim3 grid((a.d_out + 127) / 128, (a.num_tokens + 127) / 128);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    const int err = allow_dynamic_smem<dg_expand_kernel<T>>(G::SMEM_BYTES);
    if (err) return err;
    launch_ex<dg_expand_kernel<T>>(true, grid, G::THREADS, G::SMEM_BYTES, s, a);
    return last_launch_error();
}

// ---- decode: router, gate and shrink in one kernel ----------------------------------------------
template <typename T> using DgDecode = TileGemm<T, 16, 128, 1, 4, 4>;

// The columns of D1: A_all's N rows, then W_g's E rows.
template <typename T>
struct RouterAndA {
    const T *a, *w_g;
    int n_cols, experts, d_in;
    __device__ const T *operator()(int n, int k) const {
        if (k >= d_in || n >= n_cols + experts) return nullptr;
        return n < n_cols ? a + static_cast<int64_t>(n) * d_in + k : w_g + static_cast<int64_t>(n - n_cols) * d_in + k;
    }
};

template <typename T>
__global__ void __launch_bounds__(DgDecode<T>::THREADS) dg_decode_kernel(molora_dense_gated_decode_args d) {
    using G = DgDecode<T>;
    const molora_dense_gated_args &a = d.lora;
    MOLORA_DYNAMIC_SHARED(128, unsigned char, dg_decode_smem);
    T *smem = reinterpret_cast<T *>(dg_decode_smem);
    MOLORA_SHARED(int, decode_last, );
    const int n_cols = a.num_experts * a.rank, E = a.num_experts, cols = n_cols + E;
    const int n0 = blockIdx.x * 128, split = blockIdx.y;
    const int k_tiles = (a.d_in + G::BK - 1) / G::BK;
    const int per = (k_tiles + a.splits - 1) / a.splits;
    const int kt0 = min(k_tiles, split * per), kt1 = min(k_tiles, kt0 + per);
    const T *x = static_cast<const T *>(a.x);
    const KMajor<T> al{x, a.num_tokens, a.d_in, a.d_in};
    const RouterAndA<T> bl{static_cast<const T *>(a.a), static_cast<const T *>(d.w_g), n_cols, E, a.d_in};
    typename G::Acc acc;
    G::zero(acc);
    G::run(smem, al, bl, 0, n0, kt0, kt1, x, acc, false);
    const T *b_g = static_cast<const T *>(d.b_g);
    float *logits = const_cast<float *>(d.gating.logits);  // D1 writes the logits the gate reads
    auto store = [&](int t, int c, float v) {
        if (c < n_cols) a.h[static_cast<int64_t>(t) * n_cols + c] = v;
        else logits[static_cast<int64_t>(t) * E + (c - n_cols)] = v + (b_g ? to_f32(b_g[c - n_cols]) : 0.0f);
    };
    bool finished;
    if (a.splits == 1) {
        G::for_each_acc(acc, [&](int r, int c, float v0, float v1) {
            if (r >= a.num_tokens) return;
            if (n0 + c < cols) store(r, n0 + c, v0);
            if (n0 + c + 1 < cols) store(r, n0 + c + 1, v1);
        });
        __syncthreads();
        finished = true;
    } else {
        finished = G::split_k_epilogue(acc, a.partials, a.num_tokens, cols, cols, 0, n0, split, a.splits,
                                       a.tickets + blockIdx.x, store);
    }
    if (!finished) return;
    // The last column tile to finish gates every token and writes hg.
    __threadfence();
    if (threadIdx.x == 0) {
        const int prev = atomicAdd(d.done, 1);
        decode_last = prev == static_cast<int>(gridDim.x) - 1;
        if (decode_last) *d.done = 0;
    }
    __syncthreads();
    if (!decode_last) return;
    __threadfence();
    // Shared memory is free again: per warp, the token's logits and its probabilities.
    float *zs = reinterpret_cast<float *>(dg_decode_smem);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    constexpr int kWarps = G::THREADS / kWarp;
    float *z = zs + warp * 2 * E, *p = z + E;
    for (int t = warp; t < a.num_tokens; t += kWarps) {
        for (int e = lane; e < E; e += kWarp) z[e] = __ldcg(logits + static_cast<int64_t>(t) * E + e);
        __syncwarp();
        gate_row(d.gating, t, z, p, lane);
        __syncwarp();
    }
    __syncthreads();  // every token's ids and weights are written (global memory, this block)
    for (int idx = threadIdx.x; idx < a.num_tokens * n_cols; idx += G::THREADS) {
        const int t = idx / n_cols, c = idx % n_cols;
        shrink_store<T>(a, n_cols, t, c, __ldcg(a.h + idx));
    }
}

template <typename T>
int launch_dense_gated_decode(const molora_dense_gated_decode_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_dense_gated_decode_args d = *args;
    const molora_dense_gated_args &a = d.lora;
    if (a.num_tokens < 0 || a.num_tokens > MOLORA_DG_DECODE_MAX_TOKENS || a.num_experts < 1 || a.rank < 1 ||
        a.d_in < 1 || a.d_out < 1 || a.k_max < 1 || a.rank % 8 != 0 || a.d_in % 8 != 0 || a.splits < 1 ||
        a.splits > (a.d_in + 31) / 32 || (a.hg_terms != 1 && a.hg_terms != 2) || (a.splits > 1 && !a.partials) ||
        !a.tickets || !d.done || !d.w_g || !d.gating.logits || d.gating.combine != MOLORA_COMBINE_NONE ||
        d.gating.num_tokens != a.num_tokens || d.gating.num_experts != a.num_experts || !a.x || !a.a || !a.b ||
        !a.y || !a.ids || !a.weights || !a.h || !a.hg || d.gating.ids != a.ids || d.gating.weights != a.weights)
        return static_cast<int>(cudaErrorInvalidValue);
    for (const void *p : {a.x, a.a, a.b, d.w_g, static_cast<const void *>(a.hg)})
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return static_cast<int>(cudaErrorInvalidValue);
    using G = DgDecode<T>;
    // The gate's shared memory (two rows of E floats per warp) lives in the GEMM's.
    if (static_cast<int64_t>(G::THREADS / kWarp) * 2 * a.num_experts * 4 > G::SMEM_BYTES)
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const int cols = a.num_experts * a.rank + a.num_experts;
    const dim3 grid((cols + 127) / 128, a.splits);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    int err = allow_dynamic_smem<dg_decode_kernel<T>>(G::SMEM_BYTES);
    if (err) return err;
    launch<dg_decode_kernel<T>>(grid, G::THREADS, G::SMEM_BYTES, s, d);
    err = last_launch_error();
    if (err) return err;
    return launch_dg_expand<T>(a, s);
}

template <typename T, int BN>
int launch_dg_shrink(const molora_dense_gated_args &a, cudaStream_t s) {
    using G = DgShrink<T, BN>;
    const int n_cols = a.num_experts * a.rank;
    const dim3 grid((a.num_tokens + kShrinkBM - 1) / kShrinkBM, (n_cols + BN - 1) / BN, a.splits);
    if (grid.y > 65535u || grid.z > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    const int err = allow_dynamic_smem<dg_shrink_kernel<T, BN>>(G::SMEM_BYTES);
    if (err) return err;
    launch_ex<dg_shrink_kernel<T, BN>>(a.pdl != 0, grid, G::THREADS, G::SMEM_BYTES, s, a);
    return last_launch_error();
}

template <typename T>
int launch_dense_gated(const molora_dense_gated_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_dense_gated_args a = *args;
    if (a.num_tokens < 0 || a.num_experts < 1 || a.rank < 1 || a.d_in < 1 || a.d_out < 1 || a.k_max < 1 ||
        a.rank % 8 != 0 || a.d_in % 8 != 0 || a.splits < 1 || a.splits > (a.d_in + 31) / 32 ||
        (a.hg_terms != 1 && a.hg_terms != 2) || (a.pdl != 0 && a.pdl != 1) ||
        (a.splits > 1 && (!a.partials || !a.tickets)) || !a.x || !a.a || !a.b || !a.y || !a.ids || !a.weights ||
        !a.h || !a.hg)
        return static_cast<int>(cudaErrorInvalidValue);
    for (const void *p : {a.x, a.a, a.b, static_cast<const void *>(a.hg)})
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return static_cast<int>(cudaErrorInvalidValue);
    if (static_cast<int64_t>(a.num_experts) * a.rank * a.hg_terms > 65535 * 128) return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const int n_cols = a.num_experts * a.rank;
    const int err = n_cols <= 64 ? launch_dg_shrink<T, 64>(a, s) : launch_dg_shrink<T, 128>(a, s);
    if (err) return err;
    return launch_dg_expand<T>(a, s);
}

}  // namespace
}  // namespace molora

extern "C" {
int molora_dense_gated_decode_f16(const molora_dense_gated_decode_args *a, molora_stream_t s) {
    return molora::launch_dense_gated_decode<__half>(a, s);
}
int molora_dense_gated_decode_bf16(const molora_dense_gated_decode_args *a, molora_stream_t s) {
    return molora::launch_dense_gated_decode<__nv_bfloat16>(a, s);
}
int molora_dense_gated_f16(const molora_dense_gated_args *a, molora_stream_t s) {
    return molora::launch_dense_gated<__half>(a, s);
}
int molora_dense_gated_bf16(const molora_dense_gated_args *a, molora_stream_t s) {
    return molora::launch_dense_gated<__nv_bfloat16>(a, s);
}
}
