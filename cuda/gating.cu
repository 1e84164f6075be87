// Gating kernels: router activation (softmax / sigmoid with temperature) fused with top-k selection.
//
// One warp per token; lanes stride over the experts. The token's probabilities live in shared memory
// (E <= MOLORA_GATING_MAX_EXPERTS floats per warp). Selection runs k rounds of a warp arg-max that
// orders by (p descending, expert id ascending), the CPU reference's order, so exact ties go to the
// lower id. The renormalising sum is formed in double, as on the CPU.
//
// Non-finite logits cannot be rejected without a host sync, so they are defined instead: a slot that
// finds no comparable probability (NaN) is written empty (id -1, weight 0).

#include "common.cuh"

namespace molora {
namespace {

constexpr int kGatingWarps = 4;  // tokens per block

// (p, id) with the better one first: larger p, then lower id. Taken experts carry p = -1.
__device__ __forceinline__ void better(float &p, int &id, float p2, int id2) {
    if (p2 > p || (p2 == p && id2 < id)) {
        p = p2;
        id = id2;
    }
}

__global__ void __launch_bounds__(kGatingWarps * kWarp)
topk_gating_kernel(molora_topk_gating_args a) {
    extern __shared__ float smem[];
    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int t = blockIdx.x * kGatingWarps + warp;
    if (t >= a.num_tokens) return;  // whole warps exit together
    const int E = a.num_experts;
    float *p = smem + warp * E;
    const float *z = a.logits + static_cast<int64_t>(t) * E;

    if (a.activation == MOLORA_ACTIVATION_SOFTMAX) {
        float m = -INFINITY;
        for (int e = lane; e < E; e += kWarp) m = fmaxf(m, z[e]);
        m = warp_max(m);
        float s = 0.0f;
        for (int e = lane; e < E; e += kWarp) {
            const float v = expf((z[e] - m) / a.temperature);
            p[e] = v;
            s += v;
        }
        s = warp_sum(s);
        for (int e = lane; e < E; e += kWarp) p[e] = p[e] / s;
    } else {
        for (int e = lane; e < E; e += kWarp) p[e] = sigmoid(z[e] / a.temperature);
    }
    __syncwarp();

    int32_t *ids = a.ids + static_cast<int64_t>(t) * a.k;
    float *w = a.weights + static_cast<int64_t>(t) * a.k;
    double kept_sum = 0.0;
    for (int s = 0; s < a.k; ++s) {
        float best_p = -2.0f;
        int best_id = INT32_MAX;
        for (int e = lane; e < E; e += kWarp) better(best_p, best_id, p[e], e);
#pragma unroll
        for (int o = kWarp / 2; o > 0; o >>= 1) {
            const float p2 = __shfl_xor_sync(kFullMask, best_p, o);
            const int id2 = __shfl_xor_sync(kFullMask, best_id, o);
            better(best_p, best_id, p2, id2);
        }
        // Every lane now holds the same winner. No winner only happens when the row holds NaN
        // (the logits were not finite): the slot is left empty rather than indexing out of bounds.
        const bool found = best_id < E;
        if (found) kept_sum += static_cast<double>(best_p);
        if (lane == 0) {
            ids[s] = found ? best_id : -1;
            w[s] = found ? best_p : 0.0f;
            if (found) p[best_id] = -1.0f;
        }
        __syncwarp();
    }
    if (a.renormalize) {
        for (int s = lane; s < a.k; s += kWarp) {
            w[s] = kept_sum > 0.0 ? static_cast<float>(static_cast<double>(w[s]) / kept_sum)
                                  : 1.0f / static_cast<float>(a.k);
        }
    }
}

}  // namespace
}  // namespace molora

extern "C" int molora_topk_gating_f32(const molora_topk_gating_args *args, molora_stream_t stream) {
    using namespace molora;
    if (args == nullptr) return static_cast<int>(cudaErrorInvalidValue);
    const molora_topk_gating_args a = *args;
    if (a.num_tokens < 0 || a.num_experts < 1 || a.num_experts > MOLORA_GATING_MAX_EXPERTS ||
        a.k < 1 || a.k > a.num_experts || !(a.temperature > 0.0f) ||
        (a.activation != MOLORA_ACTIVATION_SOFTMAX && a.activation != MOLORA_ACTIVATION_SIGMOID)) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    if (a.num_tokens == 0) return 0;
    const dim3 block(kGatingWarps * kWarp);
    const dim3 grid((a.num_tokens + kGatingWarps - 1) / kGatingWarps);
    const size_t smem = sizeof(float) * kGatingWarps * a.num_experts;
    topk_gating_kernel<<<grid, block, smem, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    return last_launch_error();
}
