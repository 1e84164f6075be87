// Self-test kernels (cuda/include/molora_selftest.h): each primitive the kernels rely on (shuffles and
// votes, wmma, mma.sync, ldmatrix, cp.async groups) computes something whose answer the CUDA
// documentation and the PTX ISA fix, so the emulated device and a GPU are held to the same answer; and a
// handful of kernels with planted bugs, one each, that the emulator must report.

#include "common.cuh"
#include "molora_selftest.h"
#include "tc.cuh"

namespace molora {
namespace {

constexpr int kShflEntries = 13;

__global__ void shuffles_kernel(const float *in, float *out) {
    const int tid = threadIdx.x, lane = tid % 32;
    const float v = in[tid];
    float *o = out + tid * kShflEntries;
    o[0] = __shfl_xor_sync(kFullMask, v, 5);
    o[1] = __shfl_up_sync(kFullMask, v, 3);
    o[2] = __shfl_down_sync(kFullMask, v, 7);
    o[3] = __shfl_sync(kFullMask, v, (lane * 7 + 3) % 32);
    o[4] = __shfl_xor_sync(kFullMask, v, 3, 8);
    o[5] = __shfl_up_sync(kFullMask, v, 2, 8);
    o[6] = __shfl_sync(kFullMask, v, 5, 8);
    const unsigned b = __ballot_sync(kFullMask, v > 0.5f);
    o[7] = static_cast<float>(b & 0xffffu);
    o[8] = static_cast<float>(b >> 16);
    o[9] = __any_sync(kFullMask, v > 0.9f) ? 1.0f : 0.0f;
    o[10] = __all_sync(kFullMask, v > 0.05f) ? 1.0f : 0.0f;
    const unsigned m = __match_any_sync(kFullMask, static_cast<int>(v * 4.0f));
    o[11] = static_cast<float>(m & 0xffffu);
    o[12] = static_cast<float>(m >> 16);
}

// D = A·B for A [16][16] (in[0..256), row-major) and B [16][16] (in[256..512), B[k][n] row-major),
// B staged column-major. kBug stores D column-major into a row-major result.
template <bool kBug>
__global__ void wmma_kernel(const float *in, float *out) {
    using namespace nvcuda;
    MOLORA_SHARED_ALIGNED(32, __half, as, [16 * 16]);
    MOLORA_SHARED_ALIGNED(32, __half, bs, [16 * 16]);
    MOLORA_SHARED_ALIGNED(32, float, ds, [16 * 16]);
    for (int i = threadIdx.x; i < 256; i += 32) {
        as[i] = __float2half_rn(in[i]);
        const int k = i / 16, n = i % 16;
        bs[n * 16 + k] = __float2half_rn(in[256 + i]);  // element (k, n) at n·16 + k: column-major
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, as, 16);
    wmma::load_matrix_sync(fb, bs, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(ds, acc, 16, kBug ? wmma::mem_col_major : wmma::mem_row_major);
    __syncwarp();
    for (int i = threadIdx.x; i < 256; i += 32) out[i] = ds[i];
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    const __half l = __float2half_rn(lo), h = __float2half_rn(hi);
    uint16_t lb, hb;
    memcpy(&lb, &l, 2);
    memcpy(&hb, &h, 2);
    return static_cast<uint32_t>(lb) | static_cast<uint32_t>(hb) << 16;
}

// D [16][8] = A [16][16] (in[0..256)) · B [16][8] (in[256..384), B[k][n]), one mma.sync, every lane's
// fragments built from global memory by the PTX ISA's layout. kBug swaps rows g and g + 8 of A.
template <bool kBug>
__global__ void mma_kernel(const float *in, float *out) {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    uint32_t a[4], b[2];
    for (int j = 0; j < 4; ++j) {
        float e[2];
        for (int h = 0; h < 2; ++h) {
            const int i = 2 * j + h;
            int m = g + 8 * ((i / 2) % 2);
            if (kBug) m = g + 8 * (1 - (i / 2) % 2);
            const int k = 2 * t + i % 2 + 8 * (i / 4);
            e[h] = in[m * 16 + k];
        }
        a[j] = pack_half2(e[0], e[1]);
    }
    for (int j = 0; j < 2; ++j) {
        float e[2];
        for (int h = 0; h < 2; ++h) {
            const int i = 2 * j + h;
            const int k = 2 * t + i % 2 + 8 * (i / 2);
            e[h] = in[256 + k * 8 + g];
        }
        b[j] = pack_half2(e[0], e[1]);
    }
    const float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float d[4];
    mma_m16n8k16<__half>(d, a, b, c);
    for (int i = 0; i < 4; ++i) out[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// Four 8×8 matrices (in[q·64 + r·8 + c]) in shared memory, loaded with ldmatrix x4 and x4.trans; lane l
// writes its 4 registers' 8 halves, then the transposed load's 8: out[l·16 + ...].
__global__ void ldmatrix_kernel(const float *in, float *out) {
    MOLORA_SHARED_ALIGNED(16, __half, m, [4 * 8 * 8]);
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) m[i] = __float2half_rn(in[i]);
    __syncwarp();
    uint32_t r[4], rt[4];
    const __half *row = m + (lane / 8) * 64 + (lane % 8) * 8;
    ldmatrix<4, false>(r, row);
    ldmatrix<4, true>(rt, row);
    for (int q = 0; q < 4; ++q) {
        for (int h = 0; h < 2; ++h) {
            __half_raw raw;
            raw.x = static_cast<unsigned short>(r[q] >> (16 * h));
            out[lane * 16 + q * 2 + h] = __half2float(__half(raw));
            raw.x = static_cast<unsigned short>(rt[q] >> (16 * h));
            out[lane * 16 + 8 + q * 2 + h] = __half2float(__half(raw));
        }
    }
}

// Two cp.async groups of 16 bytes per lane (the second zero-filled on odd lanes); wait_group 1 lands the
// first, wait_group 0 the second. Each lane reads back only what it copied.
__global__ void cp_async_kernel(const float *in, float *out) {
    MOLORA_SHARED_ALIGNED(16, float, s0, [128]);
    MOLORA_SHARED_ALIGNED(16, float, s1, [128]);
    const int lane = threadIdx.x;
    for (int i = 0; i < 4; ++i) {
        s0[4 * lane + i] = -1.0f;
        s1[4 * lane + i] = -1.0f;
    }
    cp_async16(s0 + 4 * lane, in + 4 * lane, true);
    cp_async_commit();
    cp_async16(s1 + 4 * lane, in + 128 + 4 * lane, lane % 2 == 0);
    cp_async_commit();
    cp_async_wait<1>();
    for (int i = 0; i < 4; ++i) out[4 * lane + i] = s0[4 * lane + i];
    cp_async_wait<0>();
    for (int i = 0; i < 4; ++i) out[128 + 4 * lane + i] = s1[4 * lane + i];
}

// ---- planted bugs --------------------------------------------------------------------------------
__global__ void bug_oob_global_write(const float *in, float *out) { out[threadIdx.x + 1] = in[threadIdx.x]; }

__global__ void bug_oob_shared_read(const float *in, float *out) {
    MOLORA_SHARED(float, s, [32]);
    s[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x + 1];
}

__global__ void bug_missing_syncthreads(const float *in, float *out) {
    MOLORA_SHARED(float, s, [64]);
    const int tid = threadIdx.x;
    s[tid] = 0.0f;
    __syncthreads();
    s[tid] = in[tid];
    // missing: __syncthreads();
    out[tid] = s[(tid + 33) % 64];
}

__global__ void bug_divergent_barrier(const float *in, float *out) {
    MOLORA_SHARED(float, s, [64]);
    const int tid = threadIdx.x;
    if (tid < 32) {
        s[tid] = in[tid];
        __syncthreads();
        out[tid] = s[31 - tid];
    }
}

__global__ void bug_shuffle_mask(const float *in, float *out) {
    const int lane = threadIdx.x;
    if (lane == 31) return;
    out[lane] = __shfl_xor_sync(kFullMask, in[lane], 1);
}

__global__ void copy_kernel(const float *in, float *out) { out[threadIdx.x] = in[threadIdx.x]; }

struct Kind {
    int32_t kind;
    int64_t in_len, out_len;
};
constexpr Kind kKinds[] = {
    {MOLORA_SELFTEST_SHUFFLES, 64, 64 * kShflEntries},
    {MOLORA_SELFTEST_WMMA, 512, 256},
    {MOLORA_SELFTEST_MMA, 384, 128},
    {MOLORA_SELFTEST_LDMATRIX, 256, 512},
    {MOLORA_SELFTEST_CP_ASYNC, 256, 256},
    {MOLORA_SELFTEST_BUG_OOB_GLOBAL_WRITE, 32, 32},
    {MOLORA_SELFTEST_BUG_OOB_SHARED_READ, 32, 32},
    {MOLORA_SELFTEST_BUG_MISSING_SYNCTHREADS, 64, 64},
    {MOLORA_SELFTEST_BUG_DIVERGENT_BARRIER, 64, 64},
    {MOLORA_SELFTEST_BUG_SHUFFLE_MASK, 32, 32},
    {MOLORA_SELFTEST_BUG_MMA_FRAGMENT, 384, 128},
    {MOLORA_SELFTEST_BUG_WMMA_LAYOUT, 512, 256},
    {MOLORA_SELFTEST_BUG_SMEM_LIMIT, 32, 32},
    {MOLORA_SELFTEST_BUG_UNINIT_READ, 32, 32},
};

const Kind *find_kind(int32_t kind) {
    for (const Kind &k : kKinds)
        if (k.kind == kind) return &k;
    return nullptr;
}

int run_selftest(const molora_selftest_args &a, cudaStream_t s) {
    const Kind *k = find_kind(a.kind);
    if (!k || a.in_len != k->in_len || a.out_len != k->out_len || !a.in || !a.out) return static_cast<int>(cudaErrorInvalidValue);
    switch (a.kind) {
        case MOLORA_SELFTEST_SHUFFLES: launch<shuffles_kernel>(1, 64, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_WMMA: launch<wmma_kernel<false>>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_WMMA_LAYOUT: launch<wmma_kernel<true>>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_MMA: launch<mma_kernel<false>>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_MMA_FRAGMENT: launch<mma_kernel<true>>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_LDMATRIX: launch<ldmatrix_kernel>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_CP_ASYNC: launch<cp_async_kernel>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_OOB_GLOBAL_WRITE: launch<bug_oob_global_write>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_OOB_SHARED_READ: launch<bug_oob_shared_read>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_MISSING_SYNCTHREADS: launch<bug_missing_syncthreads>(1, 64, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_DIVERGENT_BARRIER: launch<bug_divergent_barrier>(1, 64, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_SHUFFLE_MASK: launch<bug_shuffle_mask>(1, 32, 0, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_SMEM_LIMIT: launch<copy_kernel>(1, 32, 100 * 1024, s, a.in, a.out); break;
        case MOLORA_SELFTEST_BUG_UNINIT_READ: launch<copy_kernel>(1, 32, 0, s, a.in, a.out); break;
        default: return static_cast<int>(cudaErrorInvalidValue);
    }
    return last_launch_error();
}

}  // namespace
}  // namespace molora

extern "C" {
int molora_selftest(const molora_selftest_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    return molora::run_selftest(*args, reinterpret_cast<cudaStream_t>(stream));
}
int64_t molora_selftest_in_len(int32_t kind) {
    const molora::Kind *k = molora::find_kind(kind);
    return k ? k->in_len : -1;
}
int64_t molora_selftest_out_len(int32_t kind) {
    const molora::Kind *k = molora::find_kind(kind);
    return k ? k->out_len : -1;
}
}
