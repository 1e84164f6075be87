// Gating kernels: router logits (x·W_gᵀ + b, and the input-dependent threshold), then one fused
// kernel, one warp per token, for activation, the hierarchical combination and the gate
// (cuda/gating.cuh holds the per-token device function, which the fused decode reuses).

#include <cfloat>
#include <cstdint>

#include "common.cuh"
#include "gating.cuh"

namespace molora {
namespace {

constexpr int kGatingWarps = 4;  // tokens per block

__global__ void __launch_bounds__(kGatingWarps * kWarp) gating_kernel(molora_gating_args a) {
    MOLORA_DYNAMIC_SHARED(16, float, smem);
    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int t = blockIdx.x * kGatingWarps + warp;
    if (t >= a.num_tokens) return;  // whole warps exit together
    gate_row(a, t, a.logits + static_cast<int64_t>(t) * a.num_experts, smem + warp * a.num_experts, lane);
}

// ---- router logits -------------------------------------------------------------------------
constexpr int kLogitWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kLogitWarps * kWarp) router_logits_kernel(molora_router_logits_args a) {
    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int t = blockIdx.x * kLogitWarps + warp;
    if (t >= a.num_tokens) return;
    const T *x = static_cast<const T *>(a.x) + static_cast<int64_t>(t) * a.d_in;
    const T *wg = static_cast<const T *>(a.w_g);
    const T *bg = static_cast<const T *>(a.b_g);
    for (int e = 0; e < a.num_experts; ++e) {
        const T *we = wg + static_cast<int64_t>(e) * a.d_in;
        float s = 0.0f;
#pragma unroll 8
        for (int i = lane; i < a.d_in; i += kWarp) s = fmaf(to_f32(x[i]), to_f32(we[i]), s);
        s = warp_sum(s);
        if (lane == 0) a.logits[static_cast<int64_t>(t) * a.num_experts + e] = bg ? s + to_f32(bg[e]) : s;
    }
    if (a.taus) {
        float s = 0.0f;
#pragma unroll 8
        for (int i = lane; i < a.d_in; i += kWarp) s = fmaf(a.w_tau[i], to_f32(x[i]), s);
        s = warp_sum(s);
        if (lane == 0) a.taus[t] = sigmoid(s + a.b_tau) / static_cast<float>(a.num_experts);
    }
}

constexpr int kBiasThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kBiasThreads) add_bias_kernel(float *logits, const T *b, int64_t n, int num_experts) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kBiasThreads + threadIdx.x;
    if (i < n) logits[i] += to_f32(b[i % num_experts]);
}

// Without the input-dependent threshold the logits are the shrink x·W_gᵀ (one run, rank E) on the
// LoRA kernels (row-parallel for few tokens, tiled / tensor cores for many), then the bias; with it,
// the warp-per-token kernel computes both.
template <typename T>
int launch_router_logits(const molora_router_logits_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_router_logits_args a = *args;
    if (a.num_tokens < 0 || a.d_in < 1 || a.num_experts < 1 || (a.taus && !a.w_tau))
        return static_cast<int>(cudaErrorInvalidValue);
    if (a.num_tokens == 0) return 0;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (!a.taus) {
        molora_lora_shrink_args sa{};
        sa.x = a.x;
        sa.a = a.w_g;
        sa.h = a.logits;
        sa.run_offsets = nullptr;
        sa.run_weight = nullptr;
        sa.row_src = nullptr;
        sa.src_div = 1;
        sa.max_rows = a.num_tokens;
        sa.num_runs = 1;
        sa.num_weights = 1;
        sa.rank = a.num_experts;
        sa.d_in = a.d_in;
        sa.path = MOLORA_LORA_PATH_AUTO;
        sa.b_rank = 0;
        const int code = shrink_typed<T>(&sa, stream);
        if (code != 0 || !a.b_g) return code;
        const int64_t n = static_cast<int64_t>(a.num_tokens) * a.num_experts;
        const int64_t blocks = (n + kBiasThreads - 1) / kBiasThreads;
        if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
        launch<add_bias_kernel<T>>(static_cast<unsigned>(blocks), kBiasThreads, 0, s, a.logits,
                                   static_cast<const T *>(a.b_g), n, a.num_experts);
        return last_launch_error();
    }
    const int blocks = (a.num_tokens + kLogitWarps - 1) / kLogitWarps;
    launch<router_logits_kernel<T>>(blocks, kLogitWarps * kWarp, 0, s, a);
    return last_launch_error();
}

// Validates a gating launch (cudaErrorInvalidValue without launching), then enqueues it.
int launch_gating(const molora_gating_args &a, molora_stream_t stream) {
    const bool gate_ok = a.gate == MOLORA_GATE_DENSE || a.gate == MOLORA_GATE_THRESHOLD ||
                         (a.gate == MOLORA_GATE_TOPK && a.k >= 1 && a.k <= a.num_experts);
    const bool combine_ok = a.combine == MOLORA_COMBINE_NONE ||
                            ((a.combine == MOLORA_COMBINE_MIX || a.combine == MOLORA_COMBINE_PRODUCT) &&
                             a.global_probs && a.seq_offsets && a.num_seqs >= 1);
    if (a.num_tokens < 0 || a.num_experts < 1 || a.num_experts > MOLORA_GATING_MAX_EXPERTS || !gate_ok ||
        !combine_ok || !(a.temperature > 0.0f) || !(a.temperature <= FLT_MAX) ||
        static_cast<int64_t>(a.num_tokens) * a.num_experts > INT32_MAX ||
        (a.activation != MOLORA_ACTIVATION_SOFTMAX && a.activation != MOLORA_ACTIVATION_SIGMOID &&
         a.activation != MOLORA_ACTIVATION_NONE)) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    if (a.num_tokens == 0) return 0;
    const dim3 block(kGatingWarps * kWarp);
    const dim3 grid((a.num_tokens + kGatingWarps - 1) / kGatingWarps);
    const size_t smem = sizeof(float) * kGatingWarps * a.num_experts;
    launch<gating_kernel>(grid, block, smem, reinterpret_cast<cudaStream_t>(stream), a);
    return last_launch_error();
}

constexpr int kConvertThreads = 256;

// One thread per dense element: the sum of the token's slots that name its expert, in slot order.
__global__ void __launch_bounds__(kConvertThreads) slots_to_dense_kernel(molora_slots_dense_args a) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x;
    if (i >= static_cast<int64_t>(a.num_tokens) * a.num_experts) return;
    const int64_t t = i / a.num_experts;
    const int e = static_cast<int>(i % a.num_experts);
    const int32_t *ids = a.ids + t * a.k_max;
    const float *w = a.slots + t * a.k_max;
    float v = 0.0f;
    for (int s = 0; s < a.k_max; ++s)
        if (ids[s] == e) v += w[s];
    a.dense[i] = v;
}

// One thread per slot: the dense value of its expert, 0 for an empty or out-of-range id.
__global__ void __launch_bounds__(kConvertThreads) dense_to_slots_kernel(molora_slots_dense_args a) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x;
    if (i >= static_cast<int64_t>(a.num_tokens) * a.k_max) return;
    const int64_t t = i / a.k_max;
    const int32_t id = a.ids[i];
    a.slots[i] = (id >= 0 && id < a.num_experts) ? a.dense[t * a.num_experts + id] : 0.0f;
}

// Validates a conversion and returns its grid size (0: nothing to launch), or -1 when invalid.
int64_t convert_blocks(const molora_slots_dense_args *a, bool to_dense) {
    if (a == nullptr || !a->ids || !a->slots || !a->dense || a->num_tokens < 0 || a->k_max < 1 ||
        a->num_experts < 1)
        return -1;
    const int64_t n = static_cast<int64_t>(a->num_tokens) * (to_dense ? a->num_experts : a->k_max);
    if (static_cast<int64_t>(a->num_tokens) * a->k_max > INT32_MAX ||
        static_cast<int64_t>(a->num_tokens) * a->num_experts > INT32_MAX)
        return -1;
    return (n + kConvertThreads - 1) / kConvertThreads;
}

}  // namespace
}  // namespace molora

extern "C" int molora_slots_to_dense_f32(const molora_slots_dense_args *args, molora_stream_t stream) {
    const int64_t blocks = molora::convert_blocks(args, true);
    if (blocks < 0) return static_cast<int>(cudaErrorInvalidValue);
    if (blocks == 0) return 0;
    molora::launch<molora::slots_to_dense_kernel>(static_cast<unsigned>(blocks), molora::kConvertThreads, 0,
                                reinterpret_cast<cudaStream_t>(stream), *args);
    return molora::last_launch_error();
}

extern "C" int molora_dense_to_slots_f32(const molora_slots_dense_args *args, molora_stream_t stream) {
    const int64_t blocks = molora::convert_blocks(args, false);
    if (blocks < 0) return static_cast<int>(cudaErrorInvalidValue);
    if (blocks == 0) return 0;
    molora::launch<molora::dense_to_slots_kernel>(static_cast<unsigned>(blocks), molora::kConvertThreads, 0,
                                reinterpret_cast<cudaStream_t>(stream), *args);
    return molora::last_launch_error();
}

extern "C" int molora_gating_f32(const molora_gating_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    return molora::launch_gating(*args, stream);
}

extern "C" int molora_topk_gating_f32(const molora_topk_gating_args *args, molora_stream_t stream) {
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    molora_gating_args a{};
    a.logits = args->logits;
    a.ids = args->ids;
    a.weights = args->weights;
    a.num_tokens = args->num_tokens;
    a.num_experts = args->num_experts;
    a.activation = args->activation;
    a.temperature = args->temperature;
    a.combine = MOLORA_COMBINE_NONE;
    a.gate = MOLORA_GATE_TOPK;
    a.k = args->k;
    a.renormalize = args->renormalize != 0;
    return molora::launch_gating(a, stream);
}

extern "C" {
int molora_router_logits_f32(const molora_router_logits_args *a, molora_stream_t s) {
    return molora::launch_router_logits<float>(a, s);
}
int molora_router_logits_f16(const molora_router_logits_args *a, molora_stream_t s) {
    return molora::launch_router_logits<__half>(a, s);
}
int molora_router_logits_bf16(const molora_router_logits_args *a, molora_stream_t s) {
    return molora::launch_router_logits<__nv_bfloat16>(a, s);
}
}
