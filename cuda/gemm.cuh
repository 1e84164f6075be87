// The block-tile GEMM of molora's tensor-core kernels (sm_80 and newer, f16/bf16 inputs, f32
// accumulators):
//
//   acc[m, n] += Σ_{k in [k0, k1)} A(m, k) · B(n, k)     for the block's BM × BN tile
//
// Each operand is contiguous in runs of 8 elements along K (the default) or along its own dimension
// (kATrans: A(m..m+7, k) contiguous; kBTrans: B(n..n+7, k) contiguous). A loader maps (m or n, k) with
// the contiguous coordinate a multiple of 8 to the address of those 8 elements, or to nullptr where
// the tile reaches past the matrix (those 16 bytes are zero-filled), so gathers and strided layouts
// (LoRA B stacked per expert) are the loader's business, not the main loop's. A STAGES-deep cp.async
// pipeline fills shared memory (rows padded by 16 bytes: ldmatrix reads of 8 rows hit 8 distinct bank
// groups) while the warps run ldmatrix (.trans for the transposed operands) + mma.sync m16n8k16 on the
// stage loaded STAGES - 1 steps before.
//
// Warps form a WM × WN grid; warp (wm, wn) owns rows [wm·BM/WM, +BM/WM) and columns [wn·BN/WN, +BN/WN),
// as MT × NT tiles of 16 × 8. Accumulator element acc[mt][nt][i] is at
//   row = wm·BM/WM + 16·mt + lane/4 + 8·(i/2),  col = wn·BN/WN + 8·nt + 2·(lane%4) + i%2
// (the mma.m16n8k16 C layout); for_each_acc visits them in pairs of adjacent columns.
#pragma once

#include "common.cuh"
#include "tc.cuh"

namespace molora {

// The two plain loaders. KMajor: element (row, k) at p[row·ld + k], 8 contiguous along k.
// Strided: element (col, k) at p[k·ld + col], 8 contiguous along col (the transposed operands).
template <typename T>
struct KMajor {
    const T *p;
    int rows, cols, ld;
    __device__ const T *operator()(int row, int k) const {
        return row < rows && k < cols ? p + static_cast<int64_t>(row) * ld + k : nullptr;
    }
};
template <typename T>
struct Strided {
    const T *p;
    int cols, ks, ld;
    __device__ const T *operator()(int col, int k) const {
        return col < cols && k < ks ? p + static_cast<int64_t>(k) * ld + col : nullptr;
    }
};

template <typename T, int BM, int BN, int WM, int WN, int STAGES, bool kATrans = false, bool kBTrans = false>
struct TileGemm {
    static constexpr int BK = 32;             // k per stage
    static constexpr int PITCH = BK + 8;      // elements per staged row of a K-contiguous tile (80 bytes)
    static constexpr int PITCH_A = kATrans ? BM + 8 : PITCH;  // staged A: [BM][BK + 8] or [BK][BM + 8]
    static constexpr int PITCH_B = kBTrans ? BN + 8 : PITCH;
    static constexpr int THREADS = WM * WN * kWarp;
    static constexpr int MT = BM / WM / 16;   // 16-row tiles per warp
    static constexpr int NT = BN / WN / 8;    // 8-column tiles per warp
    static constexpr int A_ELEMS = kATrans ? BK * PITCH_A : BM * PITCH;
    static constexpr int STAGE_ELEMS = A_ELEMS + (kBTrans ? BK * PITCH_B : BN * PITCH);
    static constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * static_cast<int>(sizeof(T));
    static constexpr int A_CHUNKS = BM * BK / 8;           // 16-byte copies per stage
    static constexpr int CHUNKS = (BM + BN) * BK / 8;
    static_assert(BM % (16 * WM) == 0 && BN % (16 * WN) == 0, "warp tiles of whole 16 x 16 blocks");
    static_assert(NT % 2 == 0, "B fragments are loaded two 8-column tiles at a time");
    static_assert(STAGES >= 2, "a pipeline of at least two stages");

    using Acc = float[MT][NT][4];

    __device__ static void zero(Acc &acc) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
    }

    static constexpr int kLoadA = 1, kLoadB = 2;

    // Stage `st` <- the k-tile starting at k (rows m0.., n0.. of A and B; `which` of the two).
    template <class AL, class BL>
    __device__ static void load_stage(T *smem, int st, const AL &al, const BL &bl, int m0, int n0, int k, const T *any,
                                      int which = kLoadA | kLoadB) {
        T *as = smem + st * STAGE_ELEMS;
        T *bs = as + A_ELEMS;
        const int c0 = (which & kLoadA) ? 0 : A_CHUNKS, c1 = (which & kLoadB) ? CHUNKS : A_CHUNKS;
        for (int c = c0 + static_cast<int>(threadIdx.x); c < c1; c += THREADS) {
            const T *src;
            T *dst;
            if (c < A_CHUNKS) {
                if constexpr (kATrans) {
                    const int kr = c / (BM / 8), mc = (c % (BM / 8)) * 8;
                    src = al(m0 + mc, k + kr);
                    dst = as + kr * PITCH_A + mc;
                } else {
                    const int row = c / (BK / 8), kc = (c % (BK / 8)) * 8;
                    src = al(m0 + row, k + kc);
                    dst = as + row * PITCH + kc;
                }
            } else {
                const int cb = c - A_CHUNKS;
                if constexpr (kBTrans) {
                    const int kr = cb / (BN / 8), nc = (cb % (BN / 8)) * 8;
                    src = bl(n0 + nc, k + kr);
                    dst = bs + kr * PITCH_B + nc;
                } else {
                    const int row = cb / (BK / 8), kc = (cb % (BK / 8)) * 8;
                    src = bl(n0 + row, k + kc);
                    dst = bs + row * PITCH + kc;
                }
            }
            cp_async16(dst, src ? src : any, src != nullptr);
        }
    }

    // acc += A·Bᵀ over k-tiles [kt0, kt1) (k = 32·kt); `any` is a valid global address for the
    // zero-filled copies. Leaves shared memory free for the caller (all copies waited, barrier passed).
    // wait_a: A is the predecessor kernel's output (programmatic dependent launch): the first stages'
    // B tiles are copied, then pdl_wait(), then their A tiles (one commit group for the prologue).
    template <class AL, class BL>
    __device__ static void run(T *smem, const AL &al, const BL &bl, int m0, int n0, int kt0, int kt1, const T *any,
                               Acc &acc, bool wait_a) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        const int wm0 = (warp / WN) * (BM / WM), wn0 = (warp % WN) * (BN / WN);
        if (wait_a) {
            for (int s = 0; s < STAGES - 1; ++s)
                if (kt0 + s < kt1) load_stage(smem, s, al, bl, m0, n0, (kt0 + s) * BK, any, kLoadB);
            pdl_wait();
            for (int s = 0; s < STAGES - 1; ++s)
                if (kt0 + s < kt1) load_stage(smem, s, al, bl, m0, n0, (kt0 + s) * BK, any, kLoadA);
            cp_async_commit();
            // Empty groups keep the count that cp_async_wait<STAGES - 2> below relies on.
            for (int s = 1; s < STAGES - 1; ++s) cp_async_commit();
        } else {
#pragma unroll
            for (int s = 0; s < STAGES - 1; ++s) {
                if (kt0 + s < kt1) load_stage(smem, s, al, bl, m0, n0, (kt0 + s) * BK, any, kLoadA | kLoadB);
                cp_async_commit();
            }
        }
        for (int kt = kt0; kt < kt1; ++kt) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();  // stage kt has landed for every thread; stage kt - 1 is free again
            const int next = kt + STAGES - 1;
            if (next < kt1) load_stage(smem, (next - kt0) % STAGES, al, bl, m0, n0, next * BK, any, kLoadA | kLoadB);
            cp_async_commit();
            const T *as = smem + ((kt - kt0) % STAGES) * STAGE_ELEMS;
            const T *bs = as + A_ELEMS;
#pragma unroll
            for (int kk = 0; kk < BK; kk += 16) {
                uint32_t af[MT][4];
                uint32_t bf[NT][2];
                // Matrix q = lane / 8 of each x4 load: A (m 0-7 | 8-15) × (k 0-7 | 8-15) as q % 2, q / 2;
                // B (k 0-7 | 8-15) × (n 0-7 | 8-15) as q % 2, q / 2. A transposed tile holds rows of
                // k, and ldmatrix.trans hands each lane the elements the fragment layout wants.
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if constexpr (kATrans) {
                        const int kr = kk + (lane % 8) + 8 * (lane / 16);
                        ldmatrix<4, true>(af[mt], as + kr * PITCH_A + wm0 + mt * 16 + 8 * ((lane / 8) % 2));
                    } else {
                        const int row = wm0 + mt * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
                        ldmatrix<4>(af[mt], as + row * PITCH + kk + 8 * (lane / 16));
                    }
                }
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    uint32_t r[4];
                    if constexpr (kBTrans) {
                        const int kr = kk + (lane % 8) + 8 * ((lane / 8) % 2);
                        ldmatrix<4, true>(r, bs + kr * PITCH_B + wn0 + np * 16 + 8 * (lane / 16));
                    } else {
                        const int row = wn0 + np * 16 + (lane % 8) + 8 * (lane / 16);
                        ldmatrix<4>(r, bs + row * PITCH + kk + 8 * ((lane / 8) % 2));
                    }
                    bf[2 * np][0] = r[0];
                    bf[2 * np][1] = r[1];
                    bf[2 * np + 1][0] = r[2];
                    bf[2 * np + 1][1] = r[3];
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) mma_m16n8k16<T>(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
            }
        }
        cp_async_wait<0>();
        __syncthreads();
    }

    // Split-K over blocks blockIdx.z = split of `splits`: each block publishes its partial tile into
    // partials[split] ([splits][rows][ld] f32, the output's (m, n) at m·ld + n, m < rows, n < cols),
    // and the tile's last block to arrive (ticket: an int that starts at zero and that this call
    // leaves at zero) sums the partials in split order and calls f(m, n, v) for each of its elements
    // (global coordinates). Deterministic, whichever block is last. Returns true in the block that
    // ran f (after a barrier), false in the others.
    template <class F>
    __device__ static bool split_k_epilogue(const Acc &acc, float *partials, int rows, int cols, int ld, int m0,
                                            int n0, int split, int splits, int *ticket, F &&f) {
        MOLORA_SHARED(int, split_k_last, );
        const int64_t plane = static_cast<int64_t>(rows) * ld;
        float *mine = partials + split * plane;
        for_each_acc(acc, [&](int r, int c, float v0, float v1) {
            const int m = m0 + r, n = n0 + c;
            if (m >= rows) return;
            if (n < cols) mine[static_cast<int64_t>(m) * ld + n] = v0;
            if (n + 1 < cols) mine[static_cast<int64_t>(m) * ld + n + 1] = v1;
        });
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            const int prev = atomicAdd(ticket, 1);
            split_k_last = prev == splits - 1;
            if (split_k_last) *ticket = 0;
        }
        __syncthreads();
        if (!split_k_last) return false;
        __threadfence();
        for_each_acc(acc, [&](int r, int c, float, float) {
            const int m = m0 + r;
            if (m >= rows) return;
            for (int q = 0; q < 2; ++q) {
                const int n = n0 + c + q;
                if (n >= cols) continue;
                const int64_t at = static_cast<int64_t>(m) * ld + n;
                float v = 0.0f;
                for (int sp = 0; sp < splits; ++sp) v += __ldcg(partials + sp * plane + at);
                f(m, n, v);
            }
        });
        __syncthreads();
        return true;
    }

    // f(row, col, v0, v1): the accumulators of (row, col) and (row, col + 1), tile-local coordinates.
    template <class F>
    __device__ static void for_each_acc(const Acc &acc, F &&f) {
        const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
        const int wm0 = (warp / WN) * (BM / WM), wn0 = (warp % WN) * (BN / WN);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    f(wm0 + mt * 16 + lane / 4 + 8 * h, wn0 + nt * 8 + 2 * (lane % 4), acc[mt][nt][2 * h],
                      acc[mt][nt][2 * h + 1]);
    }
};

}  // namespace molora
