// Grouped LoRA kernels: shrink over row runs (expert segments with the gather fused, or sequence
// segments), expand with the scatter and weighted combine fused (deterministic: every output element
// is owned by one thread, slots summed in order), and SAML's weight-space mixing.
//
// The grids depend on the shapes only (never on the routing), so a forward can be captured in a CUDA
// graph; blocks past the routing's number of rows exit early. Shrink variants: tiled on CUDA cores
// (plain / 16-byte loads), tiled on tensor cores (pipelined with cp.async when aligned), and
// row-parallel for few rows. Expand variants: plain / 16-byte loads of B, or B staged in shared memory.

#include "common.cuh"
#include "tc.cuh"

namespace molora {
namespace {

// ---- shrink: h[p, j] = Σ_i x[src(p), i] · A[w, j, i] ------------------------------------------
// Run boundaries: run_offsets, or one run [0, max_rows) when run_offsets is NULL (the router logits).
__device__ __forceinline__ int run_start(const molora_lora_shrink_args &a, int q) {
    return a.run_offsets ? a.run_offsets[q] : (q == 0 ? 0 : a.max_rows);
}
__device__ __forceinline__ int first_run(const molora_lora_shrink_args &a, int p) {
    return a.run_offsets ? find_run(a.run_offsets, a.num_runs, p) : 0;
}
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
    MOLORA_SHARED(float, xs, [kShrinkRows][kShrinkK + 1]);
    MOLORA_SHARED(float, as, [kShrinkRank][kShrinkK + 1]);
    MOLORA_SHARED(int64_t, src_row, [kShrinkRows]);
    const int total = run_start(a, a.num_runs);
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

    for (int run = first_run(a, p0); run < a.num_runs && run_start(a, run) < p_end; ++run) {
        const int q0 = max(p0, run_start(a, run));
        const int q1 = min(p_end, run_start(a, run + 1));
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
    MOLORA_SHARED_ALIGNED(32, T, xs, [kShrinkRows][kShrinkK + kTcPad]);
    MOLORA_SHARED_ALIGNED(32, T, as, [kShrinkRank][kShrinkK + kTcPad]);
    MOLORA_SHARED_ALIGNED(32, float, outs, [kShrinkRows][kShrinkRank + kTcOutPad]);
    MOLORA_SHARED(int64_t, src_row, [kShrinkRows]);
    const int total = run_start(a, a.num_runs);
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

    for (int run = first_run(a, p0); run < a.num_runs && run_start(a, run) < p_end; ++run) {
        const int q0 = max(p0, run_start(a, run));
        const int q1 = min(p_end, run_start(a, run + 1));
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

// ---- shrink, row-parallel (few rows): a block per (row, 16 rank columns), a warp per 4 columns ----
// Each warp strides over d_in (16-byte loads when aligned), keeps 4 partial dot products and reduces
// them across the warp. No reuse of A between rows, so it serves the small-T shapes, where the tiled
// kernels would leave most multiprocessors idle.
constexpr int kRowsThreads = 128;
constexpr int kRowsColsPerWarp = 4;
constexpr int kRowsCols = kRowsColsPerWarp * (kRowsThreads / kWarp);  // 16 columns per block

template <typename T, bool kVec>
__global__ void __launch_bounds__(kRowsThreads) lora_shrink_rows_kernel(molora_lora_shrink_args a) {
    const int total = run_start(a, a.num_runs);
    const int p = blockIdx.x;
    if (p >= total) return;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int j0 = blockIdx.y * kRowsCols + warp * kRowsColsPerWarp;
    if (j0 >= a.rank) return;  // warp-uniform
    const int nc = min(kRowsColsPerWarp, a.rank - j0);
    float *hp = a.h + static_cast<int64_t>(p) * a.rank + j0;
    const int run = first_run(a, p);
    const int w = a.run_weight ? a.run_weight[run] : run;
    if (w < 0 || w >= a.num_weights) {
        if (lane < nc) hp[lane] = 0.0f;
        return;
    }
    const int64_t src = a.row_src ? static_cast<int64_t>(a.row_src[p] / a.src_div) : p;
    const T *xr = static_cast<const T *>(a.x) + src * a.d_in;
    const T *A = static_cast<const T *>(a.a) + (static_cast<int64_t>(w) * a.rank + j0) * a.d_in;
    float acc[kRowsColsPerWarp];
#pragma unroll
    for (int c = 0; c < kRowsColsPerWarp; ++c) acc[c] = 0.0f;
    if constexpr (kVec) {
        constexpr int V = kVecElems<T>;
#pragma unroll 4
        for (int i = lane * V; i < a.d_in; i += kWarp * V) {
            float xv[V];
            load_vec(xr + i, xv);
#pragma unroll
            for (int c = 0; c < kRowsColsPerWarp; ++c) {
                if (c < nc) {
                    float av[V];
                    load_vec(A + static_cast<int64_t>(c) * a.d_in + i, av);
#pragma unroll
                    for (int q = 0; q < V; ++q) acc[c] = fmaf(xv[q], av[q], acc[c]);
                }
            }
        }
    } else {
#pragma unroll 4
        for (int i = lane; i < a.d_in; i += kWarp) {
            const float xv = to_f32(xr[i]);
#pragma unroll
            for (int c = 0; c < kRowsColsPerWarp; ++c)
                if (c < nc) acc[c] = fmaf(xv, to_f32(A[static_cast<int64_t>(c) * a.d_in + i]), acc[c]);
        }
    }
    float mine = 0.0f;
#pragma unroll
    for (int c = 0; c < kRowsColsPerWarp; ++c) {
        const float s = warp_sum(acc[c]);
        if (lane == c) mine = s;
    }
    if (lane < nc) hp[lane] = mine;
}

// ---- shrink on tensor cores, split over d_in between warps (f16 / bf16, aligned) ----------------------
// A block owns 16 rows × kBN rank columns (grid.y walks the rank tiles). Its 4 warps take interleaved
// 64-wide chunks of d_in (warp w: chunks w, w + 4, ...), each through its own cp.async pipeline of
// kStages chunks in shared memory (16-byte copies, zero-filled past d_in, the rank and the run's
// rows), with kBN / 16 wmma accumulators; the 4 partial tiles are then summed in warp order through
// shared memory (deterministic). Small tiles and many warps per multiprocessor keep enough copies in
// flight for small and large T alike. Needs d_in a multiple of 8 and x, A 16-byte aligned.
constexpr int kTcRows = 16;
constexpr int kTcWarps = 4;
constexpr int kTcK = 64;
constexpr int kTcPitch = kTcK + 8;  // elements per staged row: 144 bytes, keeps 16/32-byte alignment
constexpr int kTcThreads = kTcWarps * kWarp;
template <int kBN> constexpr int tc_stages() { return kBN <= 32 ? 3 : 2; }
// x rows, then the A operand: [kBN][kTcPitch] (A rows), or [kTcK][kBN + 8] (kBT: B read transposed).
template <int kBN, bool kBT> constexpr int tc_stage_elems() {
    return kTcRows * kTcPitch + (kBT ? kTcK * (kBN + 8) : kBN * kTcPitch);
}
template <int kBN, bool kBT> constexpr int tc_smem_bytes(int elem) {
    return kTcWarps * tc_stages<kBN>() * tc_stage_elems<kBN, kBT>() * elem + kTcWarps * kTcRows * (kBN + 4) * 4;
}

template <typename T, int kBN, bool kBT>
__global__ void __launch_bounds__(kTcThreads) lora_shrink_tcs_kernel(molora_lora_shrink_args a) {
    using namespace nvcuda;
    constexpr int kStages = tc_stages<kBN>();
    constexpr int kStageElems = tc_stage_elems<kBN, kBT>();
    constexpr int V = 8;                               // elements per 16-byte copy
    // Copies per lane per chunk: x rows and A rows (kBT: x rows and the kTcK × kBN B block).
    constexpr int kCopies = kBT ? kTcRows * (kTcK / V) / kWarp : (kTcRows + kBN) * (kTcK / V) / kWarp;
    constexpr int kBCopies = kBT ? kTcK * (kBN / V) / kWarp : 0;
    constexpr int kBPitch = kBN + 8;
    MOLORA_DYNAMIC_SHARED(128, unsigned char, tcs_smem);
    MOLORA_SHARED(int64_t, src_row, [kTcRows]);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    T *stages = reinterpret_cast<T *>(tcs_smem) + warp * kStages * kStageElems;
    float *red = reinterpret_cast<float *>(tcs_smem + kTcWarps * kStages * kStageElems * sizeof(T));  // [warps][16][kBN + 4]
    const int total = run_start(a, a.num_runs);
    const int p0 = blockIdx.x * kTcRows;
    if (p0 >= total) return;
    const int p_end = min(p0 + kTcRows, total);
    const int r0 = blockIdx.y * kBN;
    const T *x = static_cast<const T *>(a.x);
    const int nk = (a.d_in + kTcK - 1) / kTcK;
    const int mine = warp < nk ? (nk - warp + kTcWarps - 1) / kTcWarps : 0;  // chunks of this warp
    const int kk_lane = (lane % (kTcK / V)) * V;  // this lane's column in every copied row

    if (threadIdx.x < kTcRows) {
        const int p = p0 + threadIdx.x;
        int64_t src = -1;
        if (p < p_end) src = a.row_src ? static_cast<int64_t>(a.row_src[p] / a.src_div) : p;
        src_row[threadIdx.x] = src;
    }
    __syncthreads();

    for (int run = first_run(a, p0); run < a.num_runs && run_start(a, run) < p_end; ++run) {
        const int q0 = max(p0, run_start(a, run));
        const int q1 = min(p_end, run_start(a, run + 1));
        if (q0 >= q1) continue;  // block-uniform
        const int w = a.run_weight ? a.run_weight[run] : run;
        if (w < 0 || w >= a.num_weights) {
            const int nc = min(kBN, a.rank - r0);
            for (int idx = threadIdx.x; idx < (q1 - q0) * nc; idx += kTcThreads)
                a.h[static_cast<int64_t>(q0 + idx / nc) * a.rank + r0 + idx % nc] = 0.0f;
            continue;
        }
        const T *A = kBT ? static_cast<const T *>(a.a) : static_cast<const T *>(a.a) + static_cast<int64_t>(w) * a.rank * a.d_in;
        // This lane's copies: row rr = lane / 8 + 4c of the staged tile (x rows, then A rows), column
        // kk_lane; the source row (without the chunk offset) and whether it exists.
        const T *src_ptr[kCopies];
        bool row_ok[kCopies];
#pragma unroll
        for (int c = 0; c < kCopies; ++c) {
            const int rr = lane / (kTcK / V) + (kWarp / (kTcK / V)) * c;
            if (rr < kTcRows) {
                const int p = p0 + rr;
                row_ok[c] = p >= q0 && p < q1;
                src_ptr[c] = row_ok[c] ? x + src_row[rr] * a.d_in + kk_lane : x;
            } else if constexpr (!kBT) {
                const int j = r0 + rr - kTcRows;
                row_ok[c] = j < a.rank;
                src_ptr[c] = row_ok[c] ? A + static_cast<int64_t>(j) * a.d_in + kk_lane : A;
            }
        }
        auto load_chunk = [&](int i) {  // this warp's i-th chunk into stage i % kStages
            T *st = stages + (i % kStages) * kStageElems;
            const int k0 = (warp + kTcWarps * i) * kTcK;
            const bool in_k = k0 + kk_lane < a.d_in;
#pragma unroll
            for (int c = 0; c < kCopies; ++c) {
                const int rr = lane / (kTcK / V) + (kWarp / (kTcK / V)) * c;
                const bool valid = in_k && row_ok[c];
                cp_async16(st + rr * kTcPitch + kk_lane, valid ? src_ptr[c] + k0 : src_ptr[c], valid);
            }
            if constexpr (kBT) {
                // B block: row k (input index k0 + k), 8 columns from jb; column j of weight w is
                // B[(w·rank + j) / b_rank, i, (w·rank + j) % b_rank] (8 columns never straddle a B).
                T *bs = st + kTcRows * kTcPitch;
#pragma unroll
                for (int c = 0; c < kBCopies; ++c) {
                    const int idx = lane + kWarp * c;
                    const int k = idx / (kBN / V), jb = (idx % (kBN / V)) * V;
                    const int i_in = k0 + k, j = r0 + jb;
                    const bool valid = i_in < a.d_in && j < a.rank;
                    const T *src = A;
                    if (valid) {
                        const int64_t gc = static_cast<int64_t>(w) * a.rank + j;
                        src = static_cast<const T *>(a.a) + ((gc / a.b_rank) * a.d_in + i_in) * a.b_rank + gc % a.b_rank;
                    }
                    cp_async16(bs + k * kBPitch + jb, src, valid);
                }
            }
        };
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBN / 16];
#pragma unroll
        for (int n = 0; n < kBN / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < mine) load_chunk(s);
            cp_async_commit();
        }
        for (int i = 0; i < mine; ++i) {
            cp_async_wait<kStages - 2>();
            __syncwarp();
            const T *xs = stages + (i % kStages) * kStageElems;
            const T *as = xs + kTcRows * kTcPitch;
#pragma unroll
            for (int kk = 0; kk < kTcK; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                wmma::load_matrix_sync(fa, xs + kk, kTcPitch);
#pragma unroll
                for (int n = 0; n < kBN / 16; ++n) {
                    if constexpr (kBT) {
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
                        wmma::load_matrix_sync(fb, as + kk * kBPitch + 16 * n, kBPitch);
                        wmma::mma_sync(acc[n], fa, fb, acc[n]);
                    } else {
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                        wmma::load_matrix_sync(fb, as + (16 * n) * kTcPitch + kk, kTcPitch);
                        wmma::mma_sync(acc[n], fa, fb, acc[n]);
                    }
                }
            }
            __syncwarp();  // every lane is done with the stage before it is refilled
            if (i + kStages - 1 < mine) load_chunk(i + kStages - 1);
            cp_async_commit();
        }
        cp_async_wait<0>();
        float *mine_red = red + warp * kTcRows * (kBN + 4);
#pragma unroll
        for (int n = 0; n < kBN / 16; ++n)
            wmma::store_matrix_sync(mine_red + 16 * n, acc[n], kBN + 4, wmma::mem_row_major);
        __syncthreads();
        for (int idx = threadIdx.x; idx < kTcRows * kBN; idx += kTcThreads) {
            const int rr = idx / kBN, jj = idx % kBN;
            const int p = p0 + rr, j = r0 + jj;
            if (p >= q0 && p < q1 && j < a.rank) {
                float v = red[rr * (kBN + 4) + jj];
#pragma unroll
                for (int ww = 1; ww < kTcWarps; ++ww) v += red[(ww * kTcRows + rr) * (kBN + 4) + jj];
                a.h[static_cast<int64_t>(p) * a.rank + j] = v;
            }
        }
        __syncthreads();  // the partial tiles are read before the next run overwrites them
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
                acc = fmaf(a.weights ? a.weights[slot] : 1.0f, d, acc);
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
            T *yp = y + static_cast<int64_t>(t) * (a.y_stride > 0 ? a.y_stride : a.d_out) + o;
            *yp = from_f32<T>(to_f32(*yp) + a.scale * acc);
        }
    }
}

// ---- expand with B staged in shared memory -----------------------------------------------------------
// A block owns 64 output columns and a chunk of tokens. It copies those columns of every weight's B into
// shared memory once, in the element type, as column pairs ([W·r][33 pairs], padded so the copy and
// the reads are free of bank conflicts). Then, per sub-chunk of S tokens, it stages the tokens'
// routing (expert, weight, h offset) and their h rows in shared memory with coalesced loads, and
// 8 token lanes × 32 column pairs compute the outputs from shared memory alone, each thread two
// adjacent columns; y is loaded before the sums so its latency overlaps them. The sums are the plain
// kernel's: Σ_j in order, slots in order, f32.
constexpr int kStCols = 64;
constexpr int kStPairs = kStCols / 2;
constexpr int kStThreads = 256;
constexpr int kStLanes = kStThreads / kStPairs;  // 8 tokens in parallel
constexpr int kStPitch = kStPairs + 1;           // pairs per staged row of B
constexpr int kStMaxBBytes = 112 * 1024;         // B's share of shared memory (the Rust check mirrors it)
constexpr int kStSlots = 512;                    // routing slots staged per sub-chunk
constexpr int kStHFloats = 8192;                 // h values staged per sub-chunk (32 KiB)

__host__ __device__ constexpr int64_t staged_b_bytes(int64_t weights_times_rank, int elem) {
    return (weights_times_rank * kStPitch * 2 * elem + 15) / 16 * 16;
}

__device__ __forceinline__ float2 load_pair(const float *p) { return *reinterpret_cast<const float2 *>(p); }
__device__ __forceinline__ float2 load_pair(const __half *p) { return __half22float2(*reinterpret_cast<const __half2 *>(p)); }
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16 *p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(p));
}

template <typename T, int kRank>
__global__ void __launch_bounds__(kStThreads)
    lora_expand_staged_kernel(molora_lora_expand_args a, int tokens_per_block, int sub, int stage_h) {
    MOLORA_DYNAMIC_SHARED(16, unsigned char, st_smem);
    const int rank = kRank > 0 ? kRank : a.rank;
    const int W = a.num_weights;
    const int k_eff = a.ids ? a.k_max : 1;
    T *bs = reinterpret_cast<T *>(st_smem);
    unsigned char *rest = st_smem + staged_b_bytes(static_cast<int64_t>(W) * rank, sizeof(T));
    int64_t *s_off = reinterpret_cast<int64_t *>(rest);  // h offset of each staged slot
    int *s_e = reinterpret_cast<int *>(s_off + sub * k_eff);
    float *s_w = reinterpret_cast<float *>(s_e + sub * k_eff);
    float *s_h = s_w + sub * k_eff;

    const int o0 = blockIdx.x * kStCols;
    const int cols = min(kStCols, a.d_out - o0);
    const T *B = static_cast<const T *>(a.b);
    const int per_weight = cols * rank;
    for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(W) * per_weight; idx += kStThreads) {
        const int e = static_cast<int>(idx / per_weight), rem = static_cast<int>(idx % per_weight);
        const int c = rem / rank, j = rem % rank;
        bs[((static_cast<int64_t>(e) * rank + j) * kStPitch + c / 2) * 2 + c % 2] =
            B[(static_cast<int64_t>(e) * a.d_out + o0 + c) * rank + j];
    }
    // Columns past d_out in the last tile: zeros, so the unused half of a pair is defined.
    for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(W) * rank * (kStCols - cols); idx += kStThreads) {
        const int64_t row = idx / (kStCols - cols);
        const int c = cols + static_cast<int>(idx % (kStCols - cols));
        bs[(row * kStPitch + c / 2) * 2 + c % 2] = from_f32<T>(0.0f);
    }

    const int pair = threadIdx.x % kStPairs, lane_t = threadIdx.x / kStPairs;
    const int c0 = 2 * pair;
    T *y = static_cast<T *>(a.y);
    const int t_begin = blockIdx.y * tokens_per_block;
    const int t_end = min(t_begin + tokens_per_block, a.num_tokens);
    for (int base = t_begin; base < t_end; base += sub) {
        const int ns = min(sub, t_end - base);
        __syncthreads();  // B is staged / the previous sub-chunk is done with the slot arrays
        for (int idx = threadIdx.x; idx < ns * k_eff; idx += kStThreads) {
            const int t = base + idx / k_eff, s = idx % k_eff;
            int e;
            int64_t off = 0;
            float w = 1.0f;
            if (a.ids) {
                const int64_t slot = static_cast<int64_t>(t) * a.k_max + s;
                e = a.ids[slot];
                w = a.weights ? a.weights[slot] : 1.0f;
                if (e >= 0 && e < W) {
                    const int64_t row = a.h_dense ? static_cast<int64_t>(t) : a.slot_to_sorted[slot];
                    if (row < 0) e = -1;
                    else off = a.h_dense ? (row * W + e) * rank : row * rank;
                } else {
                    e = -1;
                }
            } else {
                e = a.adapter_ids[find_run(a.seg_offsets, a.num_segments, t)];
                if (e < 0 || e >= W) e = -1;
                off = static_cast<int64_t>(t) * rank;
            }
            s_e[idx] = e;
            s_w[idx] = w;
            s_off[idx] = off;
        }
        __syncthreads();
        if (stage_h) {
            for (int idx = threadIdx.x; idx < ns * k_eff * rank; idx += kStThreads) {
                const int sl = idx / rank, j = idx % rank;
                s_h[idx] = s_e[sl] >= 0 ? a.h[s_off[sl] + j] : 0.0f;
            }
            __syncthreads();
        }
        for (int tl = lane_t; tl < ns; tl += kStLanes) {
            const int t = base + tl;
            T *yp = y + static_cast<int64_t>(t) * (a.y_stride > 0 ? a.y_stride : a.d_out) + o0 + c0;
            const float y0 = c0 < cols ? to_f32(yp[0]) : 0.0f;
            const float y1 = c0 + 1 < cols ? to_f32(yp[1]) : 0.0f;
            float acc0 = 0.0f, acc1 = 0.0f;
            bool any = false;
            for (int s = 0; s < k_eff; ++s) {
                const int sl = tl * k_eff + s;
                const int e = s_e[sl];
                if (e < 0) continue;
                any = true;
                const float *hr = stage_h ? s_h + static_cast<int64_t>(sl) * rank : a.h + s_off[sl];
                const T *bp = bs + (static_cast<int64_t>(e) * rank * kStPitch + pair) * 2;
                float d0 = 0.0f, d1 = 0.0f;
                if (kRank > 0 && kRank % 4 == 0 && stage_h) {
                    // h from shared memory 4 values at a time (rows of a multiple-of-4 rank are 16-byte aligned).
#pragma unroll
                    for (int j = 0; j < kRank; j += 4) {
                        const float4 hv = *reinterpret_cast<const float4 *>(hr + j);
                        const float hs4[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            const float2 bv = load_pair(bp + (j + q) * kStPitch * 2);
                            d0 = fmaf(hs4[q], bv.x, d0);
                            d1 = fmaf(hs4[q], bv.y, d1);
                        }
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < (kRank > 0 ? kRank : rank); ++j) {
                        const float hv = hr[j];
                        const float2 bv = load_pair(bp + j * kStPitch * 2);
                        d0 = fmaf(hv, bv.x, d0);
                        d1 = fmaf(hv, bv.y, d1);
                    }
                }
                if (a.ids) {
                    acc0 = fmaf(s_w[sl], d0, acc0);
                    acc1 = fmaf(s_w[sl], d1, acc1);
                } else {
                    acc0 = d0;
                    acc1 = d1;
                }
            }
            if (any) {
                if (c0 < cols) yp[0] = from_f32<T>(y0 + a.scale * acc0);
                if (c0 + 1 < cols) yp[1] = from_f32<T>(y1 + a.scale * acc1);
            }
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

// AUTO's choice between the row-parallel and the tiled shrink: the row-parallel kernel for few rows (it
// reads A once per row, from L2), and always for f32, which has no tensor-core variant (the CUDA-core
// tiled kernels are slower than it at every measured size).
inline bool shrink_prefers_rows(int max_rows, bool k16) { return !k16 || max_rows <= 256; }

template <typename T, int kBN, bool kBT>
int launch_shrink_tcs(const molora_lora_shrink_args &a, cudaStream_t s) {
    const int smem = tc_smem_bytes<kBN, kBT>(static_cast<int>(sizeof(T)));
    const int err = allow_dynamic_smem<lora_shrink_tcs_kernel<T, kBN, kBT>>(smem);
    if (err) return err;
    const dim3 grid((a.max_rows + kTcRows - 1) / kTcRows, (a.rank + kBN - 1) / kBN);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    launch<lora_shrink_tcs_kernel<T, kBN, kBT>>(grid, kTcThreads, smem, s, a);
    return last_launch_error();
}

// The pipelined tensor-core shrink with the widest column tile that the rank needs and the device's
// shared memory holds: 64 columns take 107 KiB, more than the 99 KiB of sm_86/89, which then run
// 32-column tiles (90 to 96 KiB) over twice as many blocks.
template <typename T, bool kBT>
int launch_shrink_tcs_fit(const molora_lora_shrink_args &a, cudaStream_t s) {
    if (a.rank <= 16) return launch_shrink_tcs<T, 16, kBT>(a, s);
    const int limit = max_block_smem();
    if (a.rank <= 32 || tc_smem_bytes<64, kBT>(static_cast<int>(sizeof(T))) > limit) return launch_shrink_tcs<T, 32, kBT>(a, s);
    return launch_shrink_tcs<T, 64, kBT>(a, s);
}

template <typename T>
int launch_shrink(const molora_lora_shrink_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_lora_shrink_args a = *args;
    if (a.max_rows < 0 || a.num_runs < 1 || a.num_weights < 1 || a.rank < 1 || a.d_in < 1 || a.src_div < 1 ||
        (!a.run_offsets && a.num_runs != 1))
        return static_cast<int>(cudaErrorInvalidValue);
    constexpr bool k16 = sizeof(T) == 2;
    const bool aligned = a.d_in % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(a.a) % 16 == 0;
    if (a.b_rank != 0) {
        // B read transposed: the pipelined tensor-core kernel only.
        if (!k16 || !aligned || a.b_rank < 0 || a.b_rank % 8 != 0 || a.rank % 8 != 0 ||
            (a.path != MOLORA_LORA_PATH_AUTO && a.path != MOLORA_LORA_PATH_TENSOR))
            return static_cast<int>(cudaErrorInvalidValue);
        if (a.max_rows == 0) return 0;
        cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
        if constexpr (k16) return launch_shrink_tcs_fit<T, true>(a, st);
        return static_cast<int>(cudaErrorInvalidValue);
    }
    int path = a.path;
    if (path == MOLORA_LORA_PATH_AUTO) {
        if (shrink_prefers_rows(a.max_rows, k16)) path = MOLORA_LORA_PATH_ROWS;
        else path = k16 ? MOLORA_LORA_PATH_TENSOR : aligned ? MOLORA_LORA_PATH_VECTOR : MOLORA_LORA_PATH_PLAIN;
    }
    if ((path == MOLORA_LORA_PATH_VECTOR && !aligned) || (path == MOLORA_LORA_PATH_TENSOR && !k16) ||
        path < MOLORA_LORA_PATH_PLAIN || path > MOLORA_LORA_PATH_ROWS)
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.max_rows == 0) return 0;
    const int blocks = (a.max_rows + kShrinkRows - 1) / kShrinkRows;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (path == MOLORA_LORA_PATH_ROWS) {
        const dim3 grid(a.max_rows, (a.rank + kRowsCols - 1) / kRowsCols);
        if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
        if (aligned) launch<lora_shrink_rows_kernel<T, true>>(grid, kRowsThreads, 0, s, a);
        else launch<lora_shrink_rows_kernel<T, false>>(grid, kRowsThreads, 0, s, a);
    } else if (path == MOLORA_LORA_PATH_TENSOR) {
        if constexpr (k16) {
            // The pipelined kernel needs 16-byte copies; other shapes take the one-stage kernel.
            if (aligned) return launch_shrink_tcs_fit<T, false>(a, s);
            launch<lora_shrink_tc_kernel<T>>(blocks, kShrinkThreads, 0, s, a);
        }
    } else if (path == MOLORA_LORA_PATH_VECTOR) {
        launch<lora_shrink_kernel<T, true>>(blocks, kShrinkThreads, 0, s, a);
    } else {
        launch<lora_shrink_kernel<T, false>>(blocks, kShrinkThreads, 0, s, a);
    }
    return last_launch_error();
}

// Tokens per block of the staged expand: enough blocks for about 8 per multiprocessor of an H100/H200,
// each chunk at least 64 tokens (staging B costs about as much as 16 tokens' sums), at most 1024.
inline int expand_tokens_per_block(int num_tokens, int col_tiles) {
    const int64_t target_blocks = 1056;
    int64_t chunks = (target_blocks + col_tiles - 1) / col_tiles;
    if (chunks < 1) chunks = 1;
    int64_t tpb = (num_tokens + chunks - 1) / chunks;
    if (tpb < 64) tpb = 64;
    if (tpb > 1024) tpb = 1024;
    return static_cast<int>(tpb);
}

// The staged expand's sub-chunk of tokens, whether it stages h, and its shared memory in bytes.
struct StagedPlan {
    int sub;
    int stage_h;
    int64_t smem;
};
template <typename T> StagedPlan staged_plan(const molora_lora_expand_args &a) {
    const int k_eff = a.ids ? a.k_max : 1;
    int sub = k_eff >= kStSlots ? 1 : min(32, kStSlots / k_eff);
    int stage_h = static_cast<int64_t>(sub) * k_eff * a.rank <= kStHFloats;
    if (!stage_h && static_cast<int64_t>(k_eff) * a.rank <= kStHFloats) {
        sub = kStHFloats / (k_eff * a.rank);
        stage_h = 1;
    }
    const int64_t smem = staged_b_bytes(static_cast<int64_t>(a.num_weights) * a.rank, sizeof(T)) +
                         static_cast<int64_t>(sub) * k_eff * (8 + 4 + 4) +
                         (stage_h ? static_cast<int64_t>(sub) * k_eff * a.rank * 4 : 0);
    return {sub, stage_h, smem};
}

// B's columns fit the staged expand's shared memory, and the whole plan fits the device's.
template <typename T> bool staged_fits(const molora_lora_expand_args &a) {
    return staged_b_bytes(static_cast<int64_t>(a.num_weights) * a.rank, sizeof(T)) <= kStMaxBBytes &&
           staged_plan<T>(a).smem <= max_block_smem();
}

template <typename T, int kRank>
int launch_expand_staged(const molora_lora_expand_args &a, cudaStream_t s) {
    const StagedPlan plan = staged_plan<T>(a);
    if (plan.smem > max_block_smem()) return static_cast<int>(cudaErrorInvalidValue);
    const int smem = static_cast<int>(plan.smem);
    const int err = allow_dynamic_smem<lora_expand_staged_kernel<T, kRank>>(smem);
    if (err) return err;
    const int col_tiles = (a.d_out + kStCols - 1) / kStCols;
    const int tpb = expand_tokens_per_block(a.num_tokens, col_tiles);
    const dim3 grid(col_tiles, (a.num_tokens + tpb - 1) / tpb);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    launch<lora_expand_staged_kernel<T, kRank>>(grid, kStThreads, smem, s, a, tpb, plan.sub, plan.stage_h);
    return last_launch_error();
}

template <typename T>
int launch_expand(const molora_lora_expand_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_lora_expand_args a = *args;
    if (a.num_tokens < 0 || a.num_weights < 1 || a.rank < 1 || a.d_out < 1) return static_cast<int>(cudaErrorInvalidValue);
    if (a.y_stride != 0 && a.y_stride < a.d_out) return static_cast<int>(cudaErrorInvalidValue);
    if (a.ids ? (a.k_max < 1 || (!a.h_dense && !a.slot_to_sorted)) : a.num_segments < 1)
        return static_cast<int>(cudaErrorInvalidValue);
    const bool aligned = a.rank % kVecElems<T> == 0 && reinterpret_cast<uintptr_t>(a.b) % 16 == 0;
    const bool fits = staged_fits<T>(a);
    int path = a.path;
    // AUTO: staged when B fits, except for a handful of tokens, where copying B costs more than the
    // sums it serves (measured: 12 µs staged against 4 µs vectorised at T = 1 on an H200).
    if (path == MOLORA_LORA_PATH_AUTO)
        path = (fits && a.num_tokens > 4) ? MOLORA_LORA_PATH_STAGED : aligned ? MOLORA_LORA_PATH_VECTOR : MOLORA_LORA_PATH_PLAIN;
    if ((path == MOLORA_LORA_PATH_VECTOR && !aligned) || (path == MOLORA_LORA_PATH_STAGED && !fits) ||
        (path != MOLORA_LORA_PATH_PLAIN && path != MOLORA_LORA_PATH_VECTOR && path != MOLORA_LORA_PATH_STAGED))
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (path == MOLORA_LORA_PATH_STAGED) {
        switch (a.rank) {
            case 8: return launch_expand_staged<T, 8>(a, s);
            case 16: return launch_expand_staged<T, 16>(a, s);
            case 32: return launch_expand_staged<T, 32>(a, s);
            case 64: return launch_expand_staged<T, 64>(a, s);
            default: return launch_expand_staged<T, 0>(a, s);
        }
    }
    const dim3 grid((a.d_out + kExpandThreads - 1) / kExpandThreads, (a.num_tokens + kExpandTokens - 1) / kExpandTokens);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    if (path == MOLORA_LORA_PATH_VECTOR) {
        // Ranks 8..128 (all multiples of every vector width) get unrolled instances.
        switch (a.rank) {
            case 8: launch<lora_expand_kernel<T, true, 8>>(grid, kExpandThreads, 0, s, a); break;
            case 16: launch<lora_expand_kernel<T, true, 16>>(grid, kExpandThreads, 0, s, a); break;
            case 32: launch<lora_expand_kernel<T, true, 32>>(grid, kExpandThreads, 0, s, a); break;
            case 64: launch<lora_expand_kernel<T, true, 64>>(grid, kExpandThreads, 0, s, a); break;
            case 128: launch<lora_expand_kernel<T, true, 128>>(grid, kExpandThreads, 0, s, a); break;
            default: launch<lora_expand_kernel<T, true, 0>>(grid, kExpandThreads, 0, s, a); break;
        }
    } else {
        launch<lora_expand_kernel<T, false, 0>>(grid, kExpandThreads, 0, s, a);
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
    launch<mix_kernel<T>>(grid, kMixThreads, 0, reinterpret_cast<cudaStream_t>(stream), a);
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
