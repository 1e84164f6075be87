// The gate of one token, as a warp-level device function: activation (softmax / sigmoid with
// temperature), the hierarchical combination with a per-sequence global posterior, and the gate
// (top-k, dynamic threshold, dense), writing the token's ids and weights. Used by gating_kernel
// (cuda/gating.cu, one warp per token) and by the fused decode of cuda/dense_gated.cu.
//
// Lanes stride over the experts; the token's probabilities live in `p` (E floats of shared memory
// owned by the warp). Selection repeats a warp arg-max ordered by (p descending, expert id
// ascending), the CPU reference's order, so exact ties go to the lower id. The gates' normalising sums
// are formed in double, as on the CPU. Non-finite logits cannot be rejected without a host sync, so
// they are defined instead: a slot that finds no comparable probability (NaN) is written empty (id
// -1, weight 0).
#pragma once

#include <cfloat>
#include <cstdint>

#include "common.cuh"

namespace molora {

// (p, id) with the better one kept: larger p, then lower id. Taken experts carry p = -1.
__device__ __forceinline__ void better(float &p, int &id, float p2, int id2) {
    if (p2 > p || (p2 == p && id2 < id)) {
        p = p2;
        id = id2;
    }
}

// The best untaken expert of the warp's row (p >= floor), the same on every lane; id INT32_MAX if none.
__device__ __forceinline__ void warp_argmax(const float *p, int E, int lane, float floor, float &best_p, int &best_id) {
    best_p = -2.0f;
    best_id = INT32_MAX;
    for (int e = lane; e < E; e += kWarp)
        if (p[e] >= floor) better(best_p, best_id, p[e], e);
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
        const float p2 = __shfl_xor_sync(kFullMask, best_p, o);
        const int id2 = __shfl_xor_sync(kFullMask, best_id, o);
        better(best_p, best_id, p2, id2);
    }
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

// The activation of one row of E logits z into out (a warp; lanes stride over the experts):
// softmax / sigmoid with temperature, or a copy (MOLORA_ACTIVATION_NONE: z holds probabilities).
// The forward gate and the gating backward (which recomputes the forward's probabilities) share it.
__device__ __forceinline__ void activate_row(int activation, float temperature, const float *z, float *out, int E,
                                             int lane) {
    if (activation == MOLORA_ACTIVATION_SOFTMAX) {
        float m = -INFINITY;
        for (int e = lane; e < E; e += kWarp) m = fmaxf(m, z[e]);
        m = warp_max(m);
        float s = 0.0f;
        for (int e = lane; e < E; e += kWarp) {
            const float v = expf((z[e] - m) / temperature);
            out[e] = v;
            s += v;
        }
        s = warp_sum(s);
        for (int e = lane; e < E; e += kWarp) out[e] = out[e] / s;
    } else if (activation == MOLORA_ACTIVATION_SIGMOID) {
        for (int e = lane; e < E; e += kWarp) out[e] = sigmoid(z[e] / temperature);
    } else {
        for (int e = lane; e < E; e += kWarp) out[e] = z[e];
    }
}

// Token t's gate from its logits z (E floats, global or shared memory) into a.ids / a.weights rows t;
// the whole warp calls it (lane = its lane), p is the warp's E floats of shared memory.
__device__ __forceinline__ void gate_row(const molora_gating_args &a, int t, const float *z, float *p, int lane) {
    const int E = a.num_experts;

    activate_row(a.activation, a.temperature, z, p, E, lane);
    __syncwarp();

    // Hierarchical combination with the sequence's global posterior.
    if (a.combine != MOLORA_COMBINE_NONE) {
        const int seg = find_run(a.seq_offsets, a.num_seqs, t);
        const float *g = a.global_probs + static_cast<int64_t>(seg) * E;
        if (a.combine == MOLORA_COMBINE_MIX) {
            for (int e = lane; e < E; e += kWarp) p[e] = a.lambda * g[e] + (1.0f - a.lambda) * p[e];
        } else {
            double s = 0.0;
            for (int e = lane; e < E; e += kWarp) s += static_cast<double>(g[e]) * static_cast<double>(p[e]);
            s = warp_sum_d(s);
            if (s > 0.0) {
                for (int e = lane; e < E; e += kWarp)
                    p[e] = static_cast<float>(static_cast<double>(g[e]) * static_cast<double>(p[e]) / s);
            }
        }
        __syncwarp();
    }

    if (a.gate == MOLORA_GATE_DENSE) {
        int32_t *ids = a.ids + static_cast<int64_t>(t) * E;
        float *w = a.weights + static_cast<int64_t>(t) * E;
        for (int e = lane; e < E; e += kWarp) {
            ids[e] = e;
            w[e] = p[e];
        }
        return;
    }

    const bool threshold = a.gate == MOLORA_GATE_THRESHOLD;
    const int k_max = threshold ? E : a.k;
    const float tau = threshold ? (a.taus ? a.taus[t] : a.tau) : 0.0f;
    int32_t *ids = a.ids + static_cast<int64_t>(t) * k_max;
    float *w = a.weights + static_cast<int64_t>(t) * k_max;
    // Top-k takes k slots from everything; the threshold takes every p >= tau (the floor), and the
    // arg-max when none passes.
    const float floor = threshold ? tau : -1.0f;
    double kept_sum = 0.0;
    int filled = 0;
    for (int s = 0; s < k_max; ++s) {
        float best_p;
        int best_id;
        warp_argmax(p, E, lane, threshold ? floor : 0.0f, best_p, best_id);
        if (best_id >= E && threshold && s == 0) {
            // No expert passes: the arg-max over all untaken (every one) with weight 1.
            warp_argmax(p, E, lane, -1.0f, best_p, best_id);
            if (lane == 0) {
                ids[0] = best_id < E ? best_id : -1;
                w[0] = best_id < E ? 1.0f : 0.0f;
            }
            filled = 1;
            kept_sum = -1.0;  // marks the fallback: no renormalisation below
            break;
        }
        if (best_id >= E) break;  // nothing left (threshold) or a NaN row (top-k)
        kept_sum += threshold ? static_cast<double>(best_p) - static_cast<double>(tau) : static_cast<double>(best_p);
        // Every lane has read p in warp_argmax; the shuffles since order no memory, so the warp syncs
        // before lane 0 marks the expert taken (a write-after-read race otherwise).
        __syncwarp();
        if (lane == 0) {
            ids[s] = best_id;
            w[s] = best_p;
            p[best_id] = -1.0f;
        }
        ++filled;
        __syncwarp();
    }
    __syncwarp();
    for (int s = filled + lane; s < k_max; s += kWarp) {
        ids[s] = -1;
        w[s] = 0.0f;
    }
    if (kept_sum < 0.0) return;  // threshold fallback already final
    if (threshold) {
        for (int s = lane; s < filled; s += kWarp) {
            w[s] = kept_sum > 0.0
                       ? static_cast<float>((static_cast<double>(w[s]) - static_cast<double>(tau)) / kept_sum)
                       : 1.0f / static_cast<float>(filled);
        }
    } else if (a.renormalize) {
        for (int s = lane; s < filled; s += kWarp) {
            w[s] = kept_sum > 0.0 ? static_cast<float>(static_cast<double>(w[s]) / kept_sum)
                                  : 1.0f / static_cast<float>(a.k);
        }
    }
}


}  // namespace molora
