// Backward of the grouped LoRA part (expert segments), deterministic: u = dy·B per pair and dw, then
// dB and dA as per-expert reductions over the expert's pairs in sorted order, then dx per token.
// Every output element is owned by one thread; no float atomics. Grids depend on shapes only.

#include "common.cuh"

namespace molora {
namespace {

constexpr int kBwdWarps = 8;
constexpr int kBwdThreads = 256;

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
    float dot = 0.0f;
    for (int j = 0; j < a.rank; ++j) {
        float s = 0.0f;
        for (int o = lane; o < a.d_out; o += kWarp) s = fmaf(to_f32(dy[o]), to_f32(B[static_cast<int64_t>(o) * a.rank + j]), s);
        s = warp_sum(s);
        if (lane == 0) u[j] = s;
        dot = fmaf(h[j], s, dot);
    }
    if (lane == 0) a.dw[slot] = a.scale * dot;
}

// Empty slots get dw = 0.
__global__ void __launch_bounds__(kBwdThreads) bwd_dw_empty_kernel(molora_lora_backward_args a) {
    const int64_t slot = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x;
    if (slot >= static_cast<int64_t>(a.num_tokens) * a.k_max) return;
    if (a.slot_to_sorted[slot] < 0) a.dw[slot] = 0.0f;
}

// dB[e, o, j]: one thread per (o, j) of expert blockIdx.y, summing the expert's pairs in order.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_db_kernel(molora_lora_backward_args a) {
    const int e = blockIdx.y;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x;
    if (idx >= static_cast<int64_t>(a.d_out) * a.rank) return;
    const int o = static_cast<int>(idx / a.rank), j = static_cast<int>(idx % a.rank);
    const T *dy = static_cast<const T *>(a.dy);
    float acc = 0.0f;
    for (int p = a.expert_offsets[e]; p < a.expert_offsets[e + 1]; ++p) {
        const int slot = a.sorted_slots[p];
        const int t = slot / a.k_max;
        acc = fmaf(a.weights[slot] * to_f32(dy[static_cast<int64_t>(t) * a.d_out + o]), a.h[static_cast<int64_t>(p) * a.rank + j], acc);
    }
    a.db[static_cast<int64_t>(e) * a.d_out * a.rank + idx] = a.scale * acc;
}

// dA[e, j, i]: one thread per (j, i) of expert blockIdx.y.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_da_kernel(molora_lora_backward_args a) {
    const int e = blockIdx.y;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x;
    if (idx >= static_cast<int64_t>(a.rank) * a.d_in) return;
    const int j = static_cast<int>(idx / a.d_in), i = static_cast<int>(idx % a.d_in);
    const T *x = static_cast<const T *>(a.x);
    float acc = 0.0f;
    for (int p = a.expert_offsets[e]; p < a.expert_offsets[e + 1]; ++p) {
        const int slot = a.sorted_slots[p];
        const int t = slot / a.k_max;
        acc = fmaf(a.weights[slot] * a.u[static_cast<int64_t>(p) * a.rank + j], to_f32(x[static_cast<int64_t>(t) * a.d_in + i]), acc);
    }
    a.da[static_cast<int64_t>(e) * a.rank * a.d_in + idx] = a.scale * acc;
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
    const unsigned gb = static_cast<unsigned>((static_cast<int64_t>(a.d_out) * a.rank + kBwdThreads - 1) / kBwdThreads);
    const unsigned ga = static_cast<unsigned>((static_cast<int64_t>(a.rank) * a.d_in + kBwdThreads - 1) / kBwdThreads);
    if (slots > 0) {
        bwd_u_dw_kernel<T><<<static_cast<unsigned>((slots + kBwdWarps - 1) / kBwdWarps), kBwdWarps * kWarp, 0, s>>>(a);
        int err = last_launch_error();
        if (err) return err;
        bwd_dw_empty_kernel<<<static_cast<unsigned>((slots + kBwdThreads - 1) / kBwdThreads), kBwdThreads, 0, s>>>(a);
        err = last_launch_error();
        if (err) return err;
    }
    bwd_db_kernel<T><<<dim3(gb, a.num_experts), kBwdThreads, 0, s>>>(a);
    int err = last_launch_error();
    if (err) return err;
    bwd_da_kernel<T><<<dim3(ga, a.num_experts), kBwdThreads, 0, s>>>(a);
    err = last_launch_error();
    if (err || a.num_tokens == 0) return err;
    if (a.num_tokens > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
    bwd_dx_kernel<T><<<dim3((a.d_in + kBwdThreads - 1) / kBwdThreads, a.num_tokens), kBwdThreads, 0, s>>>(a);
    return last_launch_error();
}

}  // namespace
}  // namespace molora

extern "C" {
int molora_lora_backward_f32(const molora_lora_backward_args *a, molora_stream_t s) { return molora::launch_backward<float>(a, s); }
int molora_lora_backward_f16(const molora_lora_backward_args *a, molora_stream_t s) { return molora::launch_backward<__half>(a, s); }
int molora_lora_backward_bf16(const molora_lora_backward_args *a, molora_stream_t s) { return molora::launch_backward<__nv_bfloat16>(a, s); }
}
