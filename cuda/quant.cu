// Quantised base weights: NF4 (block-wise absmax) and int8 (per output channel) quantisation that
// reproduces the CPU reference bit for bit, and a dequantising matmul: GEMV-shaped (one warp per
// output row and tile of 16 tokens) for few tokens, a shared-memory tiled GEMM for many; and the
// matmul's backward to its input, a tiled GEMM over the weight's rows.

#include "common.cuh"

namespace molora {
namespace {

__constant__ float kNf4Table[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// The code of v = w / absmax: the number of midpoints (t[c] + t[c+1]) / 2 (in f32, as on the CPU)
// strictly below v.
__device__ __forceinline__ uint8_t nf4_code(float v) {
    uint8_t code = 0;
#pragma unroll
    for (int c = 0; c < 15; ++c) {
        const float mid = (kNf4Table[c] + kNf4Table[c + 1]) / 2.0f;
        code += mid < v ? 1 : 0;
    }
    return code;
}

constexpr int kQuantWarps = 4;

// One warp per NF4 block of 64: lane l owns elements 2l and 2l + 1 (one packed byte).
template <typename T>
__global__ void __launch_bounds__(kQuantWarps * kWarp) quantize_nf4_kernel(molora_quantize_args a) {
    const int lane = threadIdx.x % kWarp;
    const int64_t block = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / kWarp;
    const int64_t n = static_cast<int64_t>(a.rows) * a.cols;
    const int64_t start = block * MOLORA_NF4_BLOCK;
    if (start >= n) return;
    const T *w = static_cast<const T *>(a.w);
    const int64_t i0 = start + 2 * lane, i1 = i0 + 1;
    const float v0 = i0 < n ? to_f32(w[i0]) : 0.0f;
    const float v1 = i1 < n ? to_f32(w[i1]) : 0.0f;
    const float m = warp_max(fmaxf(fabsf(v0), fabsf(v1)));
    if (lane == 0) a.scales[block] = m;
    if (i0 < n) {
        const uint8_t c0 = m > 0.0f ? nf4_code(v0 / m) : 7;
        const uint8_t c1 = i1 < n ? (m > 0.0f ? nf4_code(v1 / m) : 7) : 0;
        a.packed[i0 / 2] = static_cast<uint8_t>((c0 << 4) | c1);
    }
}

constexpr int kRowThreads = 256;

// One block per row: scale = max |w| / 127, q = clamp(roundf(w / scale)).
template <typename T>
__global__ void __launch_bounds__(kRowThreads) quantize_int8_kernel(molora_quantize_args a) {
    MOLORA_SHARED(float, warp_m, [kRowThreads / kWarp]);
    const int o = blockIdx.x;
    const T *w = static_cast<const T *>(a.w) + static_cast<int64_t>(o) * a.cols;
    float m = 0.0f;
    for (int i = threadIdx.x; i < a.cols; i += kRowThreads) m = fmaxf(m, fabsf(to_f32(w[i])));
    m = warp_max(m);
    if (threadIdx.x % kWarp == 0) warp_m[threadIdx.x / kWarp] = m;
    __syncthreads();
    m = 0.0f;
    for (int k = 0; k < kRowThreads / kWarp; ++k) m = fmaxf(m, warp_m[k]);
    const float scale = m / 127.0f;
    if (threadIdx.x == 0) a.scales[o] = scale;
    int8_t *q = a.q + static_cast<int64_t>(o) * a.cols;
    for (int i = threadIdx.x; i < a.cols; i += kRowThreads) {
        q[i] = scale > 0.0f ? static_cast<int8_t>(fminf(fmaxf(roundf(to_f32(w[i]) / scale), -127.0f), 127.0f)) : 0;
    }
}

constexpr int kMatTokens = 16;
constexpr int kMatWarps = 4;  // output rows per block

template <typename T>
__global__ void __launch_bounds__(kMatWarps * kWarp) quant_matmul_kernel(molora_quant_matmul_args a) {
    const int lane = threadIdx.x % kWarp;
    const int o = blockIdx.x * kMatWarps + threadIdx.x / kWarp;
    const int t0 = blockIdx.y * kMatTokens;
    if (o >= a.rows) return;
    const int nt = min(kMatTokens, a.num_tokens - t0);
    const T *x = static_cast<const T *>(a.x) + static_cast<int64_t>(t0) * a.cols;
    const int64_t row = static_cast<int64_t>(o) * a.cols;
    float acc[kMatTokens];
#pragma unroll
    for (int t = 0; t < kMatTokens; ++t) acc[t] = 0.0f;
    for (int i = lane; i < a.cols; i += kWarp) {
        float wv;
        if (a.packed) {
            const int64_t f = row + i;
            const uint8_t byte = a.packed[f / 2];
            wv = kNf4Table[(f % 2 == 0) ? (byte >> 4) : (byte & 0x0f)] * a.scales[f / MOLORA_NF4_BLOCK];
        } else {
            wv = static_cast<float>(a.q[row + i]) * a.scales[o];
        }
#pragma unroll
        for (int t = 0; t < kMatTokens; ++t)
            if (t < nt) acc[t] = fmaf(to_f32(x[static_cast<int64_t>(t) * a.cols + i]), wv, acc[t]);
    }
    const float b = a.bias ? to_f32(static_cast<const T *>(a.bias)[o]) : 0.0f;
#pragma unroll
    for (int t = 0; t < kMatTokens; ++t) {
        const float s = warp_sum(acc[t]);
        if (lane == 0 && t < nt) a.y[static_cast<int64_t>(t0 + t) * a.rows + o] = s + b;
    }
}

// Dequantised weight element (o, i), exactly as the GEMV kernel and the CPU reference form it.
__device__ __forceinline__ float dequant(const molora_quant_matmul_args &a, int o, int i) {
    const int64_t f = static_cast<int64_t>(o) * a.cols + i;
    if (a.packed) {
        const uint8_t byte = a.packed[f / 2];
        return kNf4Table[(f % 2 == 0) ? (byte >> 4) : (byte & 0x0f)] * a.scales[f / MOLORA_NF4_BLOCK];
    }
    return static_cast<float>(a.q[f]) * a.scales[o];
}

constexpr int kGemmTok = 64;   // tokens per block
constexpr int kGemmRows = 64;  // output rows per block
constexpr int kGemmK = 32;     // columns per shared-memory chunk
constexpr int kGemmThreads = 256;
constexpr int kGemmPer = 4;    // tokens and rows per thread (16 × 16 threads × 4 × 4)

// Tiled GEMM: y[t0.., o0..] for a 64 × 64 tile. Thread (ty, tx) owns tokens ty + 16·a and rows
// tx + 16·b; each sums over i in order (chunk by chunk), in f32.
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) quant_gemm_kernel(molora_quant_matmul_args a) {
    MOLORA_SHARED(float, xs, [kGemmK][kGemmTok + 1]);
    MOLORA_SHARED(float, ws, [kGemmK][kGemmRows + 1]);
    const int o0 = blockIdx.x * kGemmRows;
    const int t0 = blockIdx.y * kGemmTok;
    const int tid = threadIdx.x;
    const int ty = tid / 16, tx = tid % 16;
    const T *x = static_cast<const T *>(a.x);
    float acc[kGemmPer][kGemmPer];
#pragma unroll
    for (int p = 0; p < kGemmPer; ++p)
#pragma unroll
        for (int q = 0; q < kGemmPer; ++q) acc[p][q] = 0.0f;
    for (int k0 = 0; k0 < a.cols; k0 += kGemmK) {
        for (int idx = tid; idx < kGemmTok * kGemmK; idx += kGemmThreads) {
            const int tt = idx / kGemmK, kk = idx % kGemmK;
            const int t = t0 + tt, i = k0 + kk;
            xs[kk][tt] = (t < a.num_tokens && i < a.cols) ? to_f32(x[static_cast<int64_t>(t) * a.cols + i]) : 0.0f;
        }
        for (int idx = tid; idx < kGemmRows * kGemmK; idx += kGemmThreads) {
            const int rr = idx / kGemmK, kk = idx % kGemmK;
            const int o = o0 + rr, i = k0 + kk;
            ws[kk][rr] = (o < a.rows && i < a.cols) ? dequant(a, o, i) : 0.0f;
        }
        __syncthreads();
        const int kmax = min(kGemmK, a.cols - k0);
        for (int kk = 0; kk < kmax; ++kk) {
            float xv[kGemmPer], wv[kGemmPer];
#pragma unroll
            for (int p = 0; p < kGemmPer; ++p) xv[p] = xs[kk][ty + 16 * p];
#pragma unroll
            for (int q = 0; q < kGemmPer; ++q) wv[q] = ws[kk][tx + 16 * q];
#pragma unroll
            for (int p = 0; p < kGemmPer; ++p)
#pragma unroll
                for (int q = 0; q < kGemmPer; ++q) acc[p][q] = fmaf(xv[p], wv[q], acc[p][q]);
        }
        __syncthreads();
    }
    const T *bias = static_cast<const T *>(a.bias);
#pragma unroll
    for (int q = 0; q < kGemmPer; ++q) {
        const int o = o0 + tx + 16 * q;
        if (o >= a.rows) continue;
        const float b = bias ? to_f32(bias[o]) : 0.0f;
#pragma unroll
        for (int p = 0; p < kGemmPer; ++p) {
            const int t = t0 + ty + 16 * p;
            if (t < a.num_tokens) a.y[static_cast<int64_t>(t) * a.rows + o] = acc[p][q] + b;
        }
    }
}

// dx[t0.., i0..] for a 64-token × 64-column tile: dy[t, o] · deq(o, i) summed over o in order, chunk by
// chunk of 32 rows of W. Thread (ty, tx) owns tokens ty + 16·p and columns tx + 16·q.
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) quant_gemm_dx_kernel(molora_quant_matmul_dx_args a) {
    MOLORA_SHARED(float, gs, [kGemmK][kGemmTok + 1]);
    MOLORA_SHARED(float, ws, [kGemmK][kGemmRows + 1]);
    const int i0 = blockIdx.x * kGemmRows;
    const int t0 = blockIdx.y * kGemmTok;
    const int tid = threadIdx.x;
    const int ty = tid / 16, tx = tid % 16;
    const T *dy = static_cast<const T *>(a.dy);
    float acc[kGemmPer][kGemmPer];
#pragma unroll
    for (int p = 0; p < kGemmPer; ++p)
#pragma unroll
        for (int q = 0; q < kGemmPer; ++q) acc[p][q] = 0.0f;
    for (int o0 = 0; o0 < a.rows; o0 += kGemmK) {
        for (int idx = tid; idx < kGemmTok * kGemmK; idx += kGemmThreads) {
            const int tt = idx / kGemmK, kk = idx % kGemmK;
            const int t = t0 + tt, o = o0 + kk;
            gs[kk][tt] = (t < a.num_tokens && o < a.rows) ? to_f32(dy[static_cast<int64_t>(t) * a.rows + o]) : 0.0f;
        }
        for (int idx = tid; idx < kGemmRows * kGemmK; idx += kGemmThreads) {
            const int kk = idx / kGemmRows, ii = idx % kGemmRows;
            const int o = o0 + kk, i = i0 + ii;
            float w = 0.0f;
            if (o < a.rows && i < a.cols) {
                const int64_t f = static_cast<int64_t>(o) * a.cols + i;
                if (a.packed) {
                    const uint8_t byte = a.packed[f / 2];
                    w = kNf4Table[(f % 2 == 0) ? (byte >> 4) : (byte & 0x0f)] * a.scales[f / MOLORA_NF4_BLOCK];
                } else {
                    w = static_cast<float>(a.q[f]) * a.scales[o];
                }
            }
            ws[kk][ii] = w;
        }
        __syncthreads();
        const int kmax = min(kGemmK, a.rows - o0);
        for (int kk = 0; kk < kmax; ++kk) {
            float gv[kGemmPer], wv[kGemmPer];
#pragma unroll
            for (int p = 0; p < kGemmPer; ++p) gv[p] = gs[kk][ty + 16 * p];
#pragma unroll
            for (int q = 0; q < kGemmPer; ++q) wv[q] = ws[kk][tx + 16 * q];
#pragma unroll
            for (int p = 0; p < kGemmPer; ++p)
#pragma unroll
                for (int q = 0; q < kGemmPer; ++q) acc[p][q] = fmaf(gv[p], wv[q], acc[p][q]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < kGemmPer; ++q) {
        const int i = i0 + tx + 16 * q;
        if (i >= a.cols) continue;
#pragma unroll
        for (int p = 0; p < kGemmPer; ++p) {
            const int t = t0 + ty + 16 * p;
            if (t < a.num_tokens) a.dx[static_cast<int64_t>(t) * a.cols + i] = acc[p][q];
        }
    }
}

template <typename T>
int launch_quantize_nf4(const molora_quantize_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_quantize_args a = *args;
    if (a.rows < 1 || a.cols < 1 || !a.packed || !a.scales) return static_cast<int>(cudaErrorInvalidValue);
    const int64_t n = static_cast<int64_t>(a.rows) * a.cols;
    const int64_t blocks = (n + MOLORA_NF4_BLOCK - 1) / MOLORA_NF4_BLOCK;
    const int64_t grid = (blocks + kQuantWarps - 1) / kQuantWarps;
    launch<quantize_nf4_kernel<T>>(static_cast<unsigned>(grid), kQuantWarps * kWarp, 0, reinterpret_cast<cudaStream_t>(stream), a);
    return last_launch_error();
}

template <typename T>
int launch_quantize_int8(const molora_quantize_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_quantize_args a = *args;
    if (a.rows < 1 || a.cols < 1 || !a.q || !a.scales) return static_cast<int>(cudaErrorInvalidValue);
    launch<quantize_int8_kernel<T>>(a.rows, kRowThreads, 0, reinterpret_cast<cudaStream_t>(stream), a);
    return last_launch_error();
}

template <typename T>
int launch_quant_matmul(const molora_quant_matmul_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_quant_matmul_args a = *args;
    if (a.num_tokens < 0 || a.rows < 1 || a.cols < 1 || (!a.packed == !a.q) || !a.scales)
        return static_cast<int>(cudaErrorInvalidValue);
    int kernel = a.kernel;
    if (kernel == MOLORA_QUANT_KERNEL_AUTO)
        kernel = a.num_tokens <= kMatTokens ? MOLORA_QUANT_KERNEL_GEMV : MOLORA_QUANT_KERNEL_GEMM;
    if (kernel != MOLORA_QUANT_KERNEL_GEMV && kernel != MOLORA_QUANT_KERNEL_GEMM)
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (kernel == MOLORA_QUANT_KERNEL_GEMM) {
        const dim3 grid((a.rows + kGemmRows - 1) / kGemmRows, (a.num_tokens + kGemmTok - 1) / kGemmTok);
        if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
        launch<quant_gemm_kernel<T>>(grid, kGemmThreads, 0, s, a);
    } else {
        const dim3 grid((a.rows + kMatWarps - 1) / kMatWarps, (a.num_tokens + kMatTokens - 1) / kMatTokens);
        if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
        launch<quant_matmul_kernel<T>>(grid, kMatWarps * kWarp, 0, s, a);
    }
    return last_launch_error();
}

template <typename T>
int launch_quant_matmul_dx(const molora_quant_matmul_dx_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_quant_matmul_dx_args a = *args;
    if (a.num_tokens < 0 || a.rows < 1 || a.cols < 1 || (!a.packed == !a.q) || !a.scales || !a.dx)
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    if (!a.dy) return static_cast<int>(cudaErrorInvalidValue);
    const dim3 grid((a.cols + kGemmRows - 1) / kGemmRows, (a.num_tokens + kGemmTok - 1) / kGemmTok);
    if (grid.y > 65535u) return static_cast<int>(cudaErrorInvalidConfiguration);
    launch<quant_gemm_dx_kernel<T>>(grid, kGemmThreads, 0, reinterpret_cast<cudaStream_t>(stream), a);
    return last_launch_error();
}

}  // namespace
}  // namespace molora

extern "C" {
int molora_quantize_nf4_f32(const molora_quantize_args *a, molora_stream_t s) { return molora::launch_quantize_nf4<float>(a, s); }
int molora_quantize_nf4_f16(const molora_quantize_args *a, molora_stream_t s) { return molora::launch_quantize_nf4<__half>(a, s); }
int molora_quantize_nf4_bf16(const molora_quantize_args *a, molora_stream_t s) { return molora::launch_quantize_nf4<__nv_bfloat16>(a, s); }
int molora_quantize_int8_f32(const molora_quantize_args *a, molora_stream_t s) { return molora::launch_quantize_int8<float>(a, s); }
int molora_quantize_int8_f16(const molora_quantize_args *a, molora_stream_t s) { return molora::launch_quantize_int8<__half>(a, s); }
int molora_quantize_int8_bf16(const molora_quantize_args *a, molora_stream_t s) { return molora::launch_quantize_int8<__nv_bfloat16>(a, s); }
int molora_quant_matmul_f32(const molora_quant_matmul_args *a, molora_stream_t s) { return molora::launch_quant_matmul<float>(a, s); }
int molora_quant_matmul_f16(const molora_quant_matmul_args *a, molora_stream_t s) { return molora::launch_quant_matmul<__half>(a, s); }
int molora_quant_matmul_bf16(const molora_quant_matmul_args *a, molora_stream_t s) { return molora::launch_quant_matmul<__nv_bfloat16>(a, s); }
int molora_quant_matmul_dx_f32(const molora_quant_matmul_dx_args *a, molora_stream_t s) { return molora::launch_quant_matmul_dx<float>(a, s); }
int molora_quant_matmul_dx_f16(const molora_quant_matmul_dx_args *a, molora_stream_t s) { return molora::launch_quant_matmul_dx<__half>(a, s); }
int molora_quant_matmul_dx_bf16(const molora_quant_matmul_dx_args *a, molora_stream_t s) { return molora::launch_quant_matmul_dx<__nv_bfloat16>(a, s); }
}
