/*
 * molora.h — the C ABI of molora's CUDA kernels.
 *
 * One argument struct per operation and one `extern "C"` launcher per operation and element type.
 * Every launcher enqueues its work on `stream` and returns the `cudaError_t` of the launch as an int
 * (0 = success); it never synchronises. Pointers are device pointers. Layouts are row-major and
 * follow PyTorch / PEFT (see src/shape.rs in the crate): x [T, d_in], router W_g [E, d_in],
 * A [E, r, d_in], B [E, d_out, r].
 *
 * The header needs no CUDA header to parse: a `molora_stream_t` is a `cudaStream_t` / `CUstream`.
 *
 * Using it from C/C++: build the crate with `--features cuda`; the static library
 * `libmolora_kernels.a` lands in cargo's OUT_DIR (a dependent crate's build script sees it as
 * DEP_MOLORA_KERNELS_ROOT, and this folder as DEP_MOLORA_KERNELS_INCLUDE). Link with
 * `-lmolora_kernels -lcudart_static -lrt -ldl -lpthread -lstdc++`.
 */
#ifndef MOLORA_H
#define MOLORA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *molora_stream_t;

/* Largest number of experts the gating kernels handle (one warp per token, lanes striding over
 * experts, the token's probabilities held in shared memory). Larger E is refused with
 * cudaErrorInvalidValue, and the Rust wrapper returns Error::Unsupported before launching. */
#define MOLORA_GATING_MAX_EXPERTS 1024

/* Router non-linearity, applied to logits / temperature. */
typedef enum molora_activation {
    MOLORA_ACTIVATION_SOFTMAX = 0,
    MOLORA_ACTIVATION_SIGMOID = 1
} molora_activation;

/*
 * Fused top-k gating from router logits.
 *
 *   p[t, e]  = softmax_e(logits[t, :] / temperature)   (max-subtracted), or sigmoid(logits / temperature)
 *   slots    = the k largest p[t, :], in descending order, ties to the LOWER expert id
 *   ids[t,s] = expert of slot s;  weights[t,s] = p (renormalize = 0) or p / Σ_kept p (renormalize = 1;
 *              1/k each when that sum is 0)
 *
 * logits [num_tokens, num_experts] f32; ids [num_tokens, k] int32; weights [num_tokens, k] f32.
 * 1 <= k <= num_experts <= MOLORA_GATING_MAX_EXPERTS, temperature > 0. num_tokens = 0 launches
 * nothing. The grid depends on num_tokens only (never on the data), so the launch can be captured in
 * a CUDA graph.
 */
typedef struct molora_topk_gating_args {
    const float *logits;
    int32_t *ids;
    float *weights;
    int32_t num_tokens;
    int32_t num_experts;
    int32_t k;
    int32_t activation; /* molora_activation */
    float temperature;
    int32_t renormalize; /* 0 or 1 */
} molora_topk_gating_args;

int molora_topk_gating_f32(const molora_topk_gating_args *args, molora_stream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOLORA_H */
