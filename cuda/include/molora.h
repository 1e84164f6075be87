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
 * `libmolora_kernels.a` (SASS for sm_80 and sm_90 plus compute_90 PTX that newer GPUs JIT; each
 * object is whole-program device code, so any host linker can use it) lands in cargo's OUT_DIR,
 * which a dependent crate's build script sees as DEP_MOLORA_KERNELS_ROOT (and this folder as
 * DEP_MOLORA_KERNELS_INCLUDE). Then
 *
 *   cc app.c -I"$DEP_MOLORA_KERNELS_INCLUDE" -L"$DEP_MOLORA_KERNELS_ROOT" -lmolora_kernels \
 *      -L"$CUDA_HOME/lib64" -lcudart_static -lrt -ldl -lpthread -lstdc++
 *
 * (the CUDA toolkit's static runtime; `scripts/cuda-toolkit.sh` prints a CUDA_HOME).
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

/* Router non-linearity, applied to logits / temperature. NONE: the input already holds the
 * probabilities p (in [0, 1]; temperature ignored), for gates over probabilities a framework computed,
 * and its backward passes dp through unchanged. */
typedef enum molora_activation {
    MOLORA_ACTIVATION_SOFTMAX = 0,
    MOLORA_ACTIVATION_SIGMOID = 1,
    MOLORA_ACTIVATION_NONE = 2
} molora_activation;

/* How a gating kernel turns probabilities into slots. */
typedef enum molora_gate {
    MOLORA_GATE_TOPK = 0,      /* k largest, descending, ties to the lower id; k_max = k */
    MOLORA_GATE_THRESHOLD = 1, /* every p >= tau, descending; arg-max fallback; k_max = E */
    MOLORA_GATE_DENSE = 2      /* slot e holds expert e with weight p; k_max = E */
} molora_gate;

/* How the hierarchical gate combines the local probabilities l_t with the sequence's global g_s. */
typedef enum molora_combine {
    MOLORA_COMBINE_NONE = 0,
    MOLORA_COMBINE_MIX = 1,    /* p = lambda·g + (1 − lambda)·l */
    MOLORA_COMBINE_PRODUCT = 2 /* p = g ⊙ l / Σ(g ⊙ l) (in double); l when the sum is 0 */
} molora_combine;

/*
 * Fused top-k gating from router logits, one warp per token, several tokens per block; the CPU
 * reference is molora::cpu::top_k(molora::cpu::activate(logits, T, E, activation, temperature),
 * T, E, k, renormalize) in src/cpu/gating.rs. Per token t (row-major layouts):
 *
 *   logits  [num_tokens, num_experts]  f32, read only
 *   ids     [num_tokens, k]            int32, written
 *   weights [num_tokens, k]            f32, written
 *
 *   p[e] = exp((z[e] − max_j z[j]) / temperature) / Σ_j exp((z[j] − max z) / temperature)   (softmax)
 *   p[e] = σ(z[e] / temperature)                                                           (sigmoid)
 *   p[e] = z[e]                                                                            (none)
 *
 * computed in f32 with expf and IEEE division (no fast math). Slot s holds the s-th expert in the
 * order (p descending, expert id ascending): exact ties go to the LOWER id. weights[t, s] = p, or,
 * with renormalize != 0, p / Σ_kept p (sum in double; 1/k each when that sum is 0).
 *
 * Limits: 1 <= k <= num_experts <= MOLORA_GATING_MAX_EXPERTS, num_tokens >= 0, temperature finite
 * and > 0, num_tokens * num_experts < 2^31; otherwise cudaErrorInvalidValue without a launch.
 * num_tokens == 0 returns 0 without a launch. The grid depends on num_tokens only. A row holding a
 * NaN (which the launcher cannot see without a host sync) gives empty slots (id -1, weight 0).
 * Returns the launch's cudaError_t (from cudaGetLastError) as an int; asynchronous on `stream`.
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

/*
 * The general fused gate, from router logits, one warp per token (the CPU reference is src/cpu/gating.rs):
 *
 *   p[t, :] = softmax(logits[t, :] / temperature) (max-subtracted) or sigmoid(logits / temperature)
 *               (or the logits themselves with MOLORA_ACTIVATION_NONE)
 *   p       = combine(p, global_probs[seg(t), :])        when combine != NONE (seq_offsets [S + 1])
 *   top-k:     the k largest p, descending, ties to the LOWER id; weights p, or p / Σ_kept p
 *              (renormalize; 1/k each when that sum is 0)
 *   threshold: every e with p >= tau_t (taus[t], or tau when taus is NULL), descending; weights
 *              (p − tau)/Σ(p − tau) in double (uniform when that sum is 0); the arg-max with weight 1
 *              when none passes; remaining slots id -1, weight 0
 *   dense:     ids[t, e] = e, weights[t, e] = p
 *
 * ids / weights are [num_tokens, k_max] with k_max = k (top-k) or E (threshold, dense). Sums of the
 * gates are formed in double, as on the CPU. 1 <= k <= E <= MOLORA_GATING_MAX_EXPERTS, temperature
 * > 0. Non-finite logits cannot be rejected without a host sync: a slot that finds no comparable
 * probability is left empty (id -1, weight 0). The grid depends on num_tokens only.
 */
typedef struct molora_gating_args {
    const float *logits;
    int32_t *ids;
    float *weights;
    int32_t num_tokens;
    int32_t num_experts;
    int32_t activation; /* molora_activation */
    float temperature;
    int32_t combine; /* molora_combine */
    float lambda;
    const float *global_probs;
    const int32_t *seq_offsets;
    int32_t num_seqs;
    int32_t gate; /* molora_gate */
    int32_t k;
    int32_t renormalize;
    const float *taus;
    float tau;
} molora_gating_args;

int molora_gating_f32(const molora_gating_args *args, molora_stream_t stream);

/*
 * Conversions between a routing's slots and the dense gate matrix frameworks multiply with:
 *
 *   slots_to_dense:  dense[t, e] = Σ_s [ids[t, s] == e]·slots[t, s]      (every element written)
 *   dense_to_slots:  slots[t, s] = dense[t, ids[t, s]], or 0 where ids[t, s] is outside [0, E)
 *
 * ids [num_tokens, k_max] int32, slots [num_tokens, k_max] f32, dense [num_tokens, num_experts] f32.
 * slots_to_dense sums a token's slots in slot order, so repeated ids add up (deterministic, no
 * atomics). k_max >= 1, num_experts >= 1, num_tokens >= 0, num_tokens·max(k_max, num_experts) <
 * 2^31; otherwise cudaErrorInvalidValue without a launch; num_tokens == 0 launches nothing.
 */
typedef struct molora_slots_dense_args {
    const int32_t *ids;
    float *slots;
    float *dense;
    int32_t num_tokens;
    int32_t k_max;
    int32_t num_experts;
} molora_slots_dense_args;

int molora_slots_to_dense_f32(const molora_slots_dense_args *args, molora_stream_t stream);
int molora_dense_to_slots_f32(const molora_slots_dense_args *args, molora_stream_t stream);

/*
 * Router logits (without taus: the LoRA shrink with one run and rank E, then the bias; with taus:
 * one warp per token):
 *   logits[t, e] = Σ_i x[t, i]·W_g[e, i] + b_g[e]           (b_g may be NULL)
 *   taus[t]      = σ(Σ_i w_tau[i]·x[t, i] + b_tau) / E      (only when taus != NULL; w_tau f32 [d_in])
 * x [T, d_in], W_g [E, d_in], b_g [E] of the launcher's element type; f32 accumulation.
 */
typedef struct molora_router_logits_args {
    const void *x;
    const void *w_g;
    const void *b_g;
    float *logits;
    const float *w_tau;
    float b_tau;
    float *taus;
    int32_t num_tokens;
    int32_t d_in;
    int32_t num_experts;
} molora_router_logits_args;

int molora_router_logits_f32(const molora_router_logits_args *args, molora_stream_t stream);
int molora_router_logits_f16(const molora_router_logits_args *args, molora_stream_t stream);
int molora_router_logits_bf16(const molora_router_logits_args *args, molora_stream_t stream);

/*
 * Dispatch: a stable counting sort of the (token, slot) pairs by expert, on the GPU, giving exactly
 * the CPU reference's plan (src/dispatch.rs):
 *
 *   expert_offsets [E + 1]   start of each expert's run; expert_offsets[E] = P, the number of pairs
 *   sorted_slots  [S]        flat slot index t * k_max + s of each sorted pair (by expert, then slot
 *                            index); entries P..S-1 are set to -1
 *   slot_to_sorted [S]       sorted position of each slot, -1 for an empty slot
 *
 * with S = num_slots = T * k_max. Ids outside [-1, E) cannot be rejected without a host sync; they are
 * treated as empty slots. Three kernels (count per chunk, one-block scan, stable scatter); the grids
 * depend on S and E only. `workspace` holds molora_dispatch_workspace_len(S, E) int32 values.
 */
#define MOLORA_DISPATCH_MAX_EXPERTS 1024
#define MOLORA_DISPATCH_CHUNK 256

typedef struct molora_dispatch_args {
    const int32_t *ids;
    int32_t *expert_offsets;
    int32_t *sorted_slots;
    int32_t *slot_to_sorted;
    int32_t *workspace;
    int32_t num_slots;
    int32_t num_experts;
} molora_dispatch_args;

int64_t molora_dispatch_workspace_len(int32_t num_slots, int32_t num_experts);
int molora_dispatch(const molora_dispatch_args *args, molora_stream_t stream);

/*
 * Gather into the plan's sorted order (the CPU reference is molora::cpu::gather_rows):
 *   out[p, :] = x[sorted_slots[p] / k_max, :]     for p < P = expert_offsets[num_experts]
 * x [num_tokens, d] and out [num_slots, d] of the launcher's element type (a plain copy); rows of out
 * at or past P are not written. One block per row p < num_slots (blocks past P exit), so the grid
 * depends on num_slots only. num_slots = num_tokens·k_max; num_slots·d < 2^31.
 */
typedef struct molora_gather_rows_args {
    const void *x;
    void *out;
    const int32_t *expert_offsets;
    const int32_t *sorted_slots;
    int32_t num_slots;
    int32_t k_max;
    int32_t num_experts;
    int32_t d;
} molora_gather_rows_args;

int molora_gather_rows_f32(const molora_gather_rows_args *args, molora_stream_t stream);
int molora_gather_rows_f16(const molora_gather_rows_args *args, molora_stream_t stream);
int molora_gather_rows_bf16(const molora_gather_rows_args *args, molora_stream_t stream);

/*
 * Scatter-combine of per-pair rows back into token order, deterministic (the CPU reference is
 * molora::cpu::scatter_combine):
 *   y[t, o] = round(y[t, o] + scale · Σ_{s valid} weights[t, s] · rows[slot_to_sorted[t·k_max + s], o])
 * A slot is valid when its id is in [0, num_experts) and slot_to_sorted >= 0; slots are summed in
 * slot order in f32; a token with no valid slot keeps its row bit for bit. rows [num_slots, d] is f32
 * when rows_f32 != 0, else of the launcher's element type; y [num_tokens, d] of the launcher's type.
 * One block per token; the grid depends on num_tokens only.
 */
typedef struct molora_scatter_combine_args {
    const void *rows;
    int32_t rows_f32;
    const int32_t *ids;
    const float *weights;
    const int32_t *slot_to_sorted;
    void *y;
    float scale;
    int32_t num_tokens;
    int32_t k_max;
    int32_t num_experts;
    int32_t d;
} molora_scatter_combine_args;

int molora_scatter_combine_f32(const molora_scatter_combine_args *args, molora_stream_t stream);
int molora_scatter_combine_f16(const molora_scatter_combine_args *args, molora_stream_t stream);
int molora_scatter_combine_bf16(const molora_scatter_combine_args *args, molora_stream_t stream);

/*
 * Kernel variant of the LoRA shrink and expand (the `path` field of their argument structs). Every
 * variant gives the same result within the f32 tolerance (the vectorised one bit for bit the plain
 * one's); AUTO lets the launcher pick by element type, rank and alignment (a starting rule, to be
 * tuned by measurement), the others force one for tests and benches:
 *   PLAIN   scalar loads, any shape and alignment;
 *   VECTOR  16-byte loads: shrink needs d_in a multiple of 16/sizeof(element) and x, A 16-byte
 *           aligned; expand needs rank a multiple of 16/sizeof(element) and B 16-byte aligned
 *           (ranks 8, 16, 32, 64 and 128 run fully unrolled instances); otherwise
 *           cudaErrorInvalidValue (AUTO falls back to PLAIN instead);
 *   TENSOR  shrink only, f16/bf16 only: warp-level mma (wmma 16×16×16), f32 accumulation, any
 *           d_in / rank: when d_in is a multiple of 8 and x, A are 16-byte aligned, 16-row × (16, 32
 *           or 64)-rank tiles whose 4 warps split d_in, each fed by its own cp.async pipeline, the
 *           partial tiles summed in warp order; otherwise 32-row × 64-rank tiles staged in one step
 *           (zero-padded tails); f32 inputs give cudaErrorInvalidValue;
 *   ROWS    shrink only, any dtype and shape: a warp per (row, 4 rank columns) striding over d_in,
 *           no tiling (for few rows, where tiles would leave the GPU idle);
 *   STAGED  expand only: each block copies its 64 output columns of every weight's B into shared
 *           memory (in the element type) once, then stages its tokens' routing and h rows and sums
 *           from shared memory; needs num_weights·rank·66·sizeof(element) ≤ 112 KiB (num_weights·rank
 *           ≤ 868 for f16/bf16, ≤ 434 for f32), otherwise cudaErrorInvalidValue. The same sums as
 *           PLAIN.
 * AUTO: shrink ROWS for f32 and when max_rows <= 256, else TENSOR;
 *       expand STAGED when B fits and num_tokens > 4, else VECTOR when aligned, else PLAIN.
 */
typedef enum molora_lora_path {
    MOLORA_LORA_PATH_AUTO = 0,
    MOLORA_LORA_PATH_PLAIN = 1,
    MOLORA_LORA_PATH_VECTOR = 2,
    MOLORA_LORA_PATH_TENSOR = 3,
    MOLORA_LORA_PATH_ROWS = 4,
    MOLORA_LORA_PATH_STAGED = 5
} molora_lora_path;

/*
 * Grouped LoRA shrink, over row runs (experts after dispatch, or sequence segments):
 *
 *   h[p, j] = Σ_i x[src(p), i] · A[w(run(p)), j, i]      (f32 out, f32 accumulation)
 *
 * Rows p in [0, run_offsets[num_runs]) are grouped into runs: run q covers
 * [run_offsets[q], run_offsets[q + 1]) and uses weight w(q) = run_weight[q] (or q when run_weight is
 * NULL); a weight outside [0, num_weights) (e.g. -1) gives zero rows. src(p) = row_src[p] / src_div
 * (or p when row_src is NULL): for expert segments run_offsets = expert_offsets, row_src =
 * sorted_slots and src_div = k_max (the gather is fused); for sequence segments run_offsets = the
 * sequence offsets, run_weight = the adapter ids, row_src = NULL. run_offsets = NULL (with
 * num_runs = 1) is one run over [0, max_rows): a plain x·Aᵀ, as the router logits use it.
 * x [*, d_in] and A [num_weights, rank, d_in] of the launcher's element type; h [max_rows, rank] f32;
 * rows past run_offsets[num_runs] are not written. The grid depends on max_rows only.
 */
typedef struct molora_lora_shrink_args {
    const void *x;
    const void *a;
    float *h;
    const int32_t *run_offsets;
    const int32_t *run_weight;
    const int32_t *row_src;
    int32_t src_div;
    int32_t max_rows;
    int32_t num_runs;
    int32_t num_weights;
    int32_t rank;
    int32_t d_in;
    int32_t path; /* molora_lora_path */
    int32_t b_rank; /* 0: A as above. > 0: "A" is a LoRA B [*, d_in, b_rank] read transposed, column j
                       of weight w being B[(w·rank + j) / b_rank, i, (w·rank + j) % b_rank] (u = dy·B in
                       the backward); TENSOR path only, f16/bf16, d_in, rank and b_rank multiples of 8,
                       16-byte aligned; otherwise cudaErrorInvalidValue */
} molora_lora_shrink_args;

int molora_lora_shrink_f32(const molora_lora_shrink_args *args, molora_stream_t stream);
int molora_lora_shrink_f16(const molora_lora_shrink_args *args, molora_stream_t stream);
int molora_lora_shrink_bf16(const molora_lora_shrink_args *args, molora_stream_t stream);

/*
 * Grouped LoRA expand with the scatter and the weighted combine fused, deterministic (no atomics):
 *
 *   expert mode (ids != NULL):
 *     y[t, o] = round(y[t, o] + scale · Σ_{s: ids[t,s] valid} weights[t,s] · Σ_j h[slot_to_sorted[t,s], j] · B[ids[t,s], o, j])
 *     (h_dense = 1: h[t, e·rank + j] in place of h[slot_to_sorted[t,s], j])
 *   segment mode (ids == NULL):
 *     y[t, o] = round(y[t, o] + scale · Σ_j h[t, j] · B[adapter_ids[seg(t)], o, j])
 *
 * Slots are summed in slot order, j in order, in f32; y is read and written once per element. Rows
 * of tokens with no valid slot (or adapter -1) are not touched. h [*, rank] f32, B [num_weights,
 * d_out, rank] and y [num_tokens, d_out] of the launcher's element type.
 *
 * Row t of y starts y_stride elements after row t - 1 (y_stride = 0: d_out; otherwise ≥ d_out), so
 * y may be a column slice of a wider output: a packed QKV or gate-up projection passes y + offset
 * and its full row width (punica's / vLLM's add_lora). weights = NULL (expert mode) gives every
 * valid slot weight 1: one adapter per token, ids [T, 1].
 */
typedef struct molora_lora_expand_args {
    const float *h;
    const void *b;
    void *y;
    const int32_t *ids;
    const float *weights;
    const int32_t *slot_to_sorted;
    int32_t k_max;
    int32_t h_dense; /* expert mode: 1 = h is [T, num_weights·rank] (row t, expert e at column e·rank),
                        slot_to_sorted unused: the dense-gated path, no dispatch */
    const int32_t *seg_offsets;
    const int32_t *adapter_ids;
    int32_t num_segments;
    float scale;
    int32_t num_tokens;
    int32_t num_weights;
    int32_t rank;
    int32_t d_out;
    int32_t path; /* molora_lora_path (PLAIN, VECTOR, STAGED or AUTO) */
    int32_t y_stride; /* elements between rows of y: 0 = d_out, else ≥ d_out */
} molora_lora_expand_args;

int molora_lora_expand_f32(const molora_lora_expand_args *args, molora_stream_t stream);
int molora_lora_expand_f16(const molora_lora_expand_args *args, molora_stream_t stream);
int molora_lora_expand_bf16(const molora_lora_expand_args *args, molora_stream_t stream);

/*
 * Weight-space mixing (SAML), per sequence s:
 *   out[s, i] = round(Σ_e probs[s, e] · w[e, i]),  i < per_expert   (f32 accumulation in e order)
 * Called once for the A stack (per_expert = rank·d_in) and once for the B stack (d_out·rank).
 */
typedef struct molora_mix_args {
    const void *w;
    const float *probs;
    void *out;
    int32_t num_experts;
    int32_t num_seqs;
    int64_t per_expert;
} molora_mix_args;

int molora_mix_f32(const molora_mix_args *args, molora_stream_t stream);
int molora_mix_f16(const molora_mix_args *args, molora_stream_t stream);
int molora_mix_bf16(const molora_mix_args *args, molora_stream_t stream);

/*
 * The dense-gated LoRA part on tensor cores (f16/bf16), two kernels, no dispatch:
 *
 *   K1  h[t, c]  = Σ_i x[t, i] · A_all[c, i]                  c < N = num_experts·rank, A_all = A as [N, d_in]
 *       v = g[t, c / rank] · h[t, c],  g[t, e] = Σ_{s: ids[t,s] = e} weights[t,s]
 *       hg[0][t, c] = round(v);  with hg_terms = 2 also hg[1][t, c] = round(v - hg[0][t, c])
 *   K2  y[t, o]  = round(y[t, o] + scale · Σ_q Σ_c hg[q][t, c] · B[c / rank, o, c % rank])   (when the sum is not 0)
 *
 * K1 is an mma.sync GEMM over 64-token × MOLORA_DG_SHRINK_BN(N)-column tiles whose epilogue gates;
 * with splits > 1 the d_in range is split over `splits` blocks per tile, each writing its f32 partial
 * tile to partials[split] ([splits, T, N]), and the last block of a tile to arrive (a ticket per tile,
 * reset to zero by that block, so every launch leaves tickets zeroed: graph-safe) sums the partials in
 * split order (deterministic) and runs the epilogue. K2 is an mma.sync GEMM over 128 × 128 output
 * tiles with K = hg_terms·N; y is read and written once. h stays f32 (the backward reads it); the
 * expand's operand g ⊙ h is rounded once to the element type (hg_terms = 1: relative error 2^-9 for
 * bf16, 2^-12 for f16) or split into two terms (hg_terms = 2: about 2^-17 / 2^-22, at twice the
 * expand's products). Needs d_in and rank multiples of 8 and x, A, B, hg 16-byte aligned; otherwise
 * cudaErrorInvalidValue. Ids outside [0, num_experts) are skipped.
 *
 * pdl = 1 (sm_90): both kernels are launched with programmatic stream serialization. K1 then reads
 * x and A before its predecessor on the stream has finished, and waits for it only before it reads
 * ids/weights and writes anything: set it only when the predecessor is the gating kernel that
 * produced the routing (MoleLoraForward does). K2 is always launched so: it stages its first tiles of
 * B while K1 finishes and waits for K1 before it reads hg or y.
 */
#define MOLORA_DG_SHRINK_BM 64
#define MOLORA_DG_SHRINK_BN(n) ((n) <= 64 ? 64 : 128)
typedef struct molora_dense_gated_args {
    const void *x;          /* [T, d_in] */
    const void *a;          /* [num_experts, rank, d_in] */
    const void *b;          /* [num_experts, d_out, rank] */
    void *y;                /* [T, d_out], accumulated into */
    const int32_t *ids;     /* [T, k_max] */
    const float *weights;   /* [T, k_max] */
    float *h;               /* [T, N] f32 out */
    void *hg;               /* [hg_terms, T, N] element type out */
    float *partials;        /* [splits, T, N] f32 (NULL when splits = 1) */
    int32_t *tickets;       /* [ceil(T / MOLORA_DG_SHRINK_BM) · ceil(N / MOLORA_DG_SHRINK_BN(N))], zeroed once */
    int32_t k_max;
    int32_t num_tokens;
    int32_t num_experts;
    int32_t rank;
    int32_t d_in;
    int32_t d_out;
    int32_t splits;         /* 1 ..= ceil(d_in / 32) */
    int32_t hg_terms;       /* 1 or 2 */
    int32_t pdl;            /* 0 or 1 */
    float scale;
} molora_dense_gated_args;

int molora_dense_gated_f16(const molora_dense_gated_args *args, molora_stream_t stream);
int molora_dense_gated_bf16(const molora_dense_gated_args *args, molora_stream_t stream);

/*
 * The whole dense-gated LoRA forward for a few tokens (decode), router and gate included, in two
 * kernels (f16/bf16, the conditions of molora_dense_gated_args, num_tokens <= MOLORA_DG_DECODE_MAX_TOKENS):
 *
 *   D1  one split-K mma.sync GEMM of x against [A_all; W_g] (N + E columns): h [T, N] (f32) and the
 *       router logits [T, E] (+ b_g); each column tile's last split sums the partials in split order,
 *       and the last tile to finish runs the gate of every token (molora_gating_args, as
 *       molora_gating computes it: activation, temperature, top-k / threshold / dense) into ids and
 *       weights, then hg = round(g ⊙ h) (hg_terms as in K1);
 *   D2  K2 of molora_dense_gated (programmatic dependent launch on sm_90: it stages B while D1 ends).
 *
 * lora.ids and lora.weights are outputs here (gating.ids / gating.weights point at them, and
 * gating.logits at the logits buffer); lora.partials holds [splits, T, N + E] floats when splits > 1,
 * lora.tickets one int per column tile of D1 (ceil((N + E) / 128)) and `done` one more; all zero, left
 * zero. gating.combine must be MOLORA_COMBINE_NONE.
 */
#define MOLORA_DG_DECODE_MAX_TOKENS 16
typedef struct molora_dense_gated_decode_args {
    molora_dense_gated_args lora;
    molora_gating_args gating;
    const void *w_g;   /* [E, d_in] */
    const void *b_g;   /* [E] or NULL */
    int32_t *done;     /* one int */
} molora_dense_gated_decode_args;

int molora_dense_gated_decode_f16(const molora_dense_gated_decode_args *args, molora_stream_t stream);
int molora_dense_gated_decode_bf16(const molora_dense_gated_decode_args *args, molora_stream_t stream);

/*
 * Base-weight quantisation, bit for bit as the CPU reference (src/cpu/quant.rs). W is [rows, cols]
 * row-major (nn.Linear.weight: rows = d_out, cols = d_in).
 *
 * NF4: blocks of MOLORA_NF4_BLOCK elements of the flattened weight, absmax[b] = max |w| (f32), code =
 * number of the 15 code-book midpoints strictly below w / absmax (one f32 division; 7, the exact 0,
 * for an all-zero block); two codes per byte, element 2i in the high nibble. packed holds
 * ceil(n / 2) bytes, absmax ceil(n / 64) floats. Dequantised value: table[code] * absmax.
 * int8: scale[o] = max_i |W[o, i]| / 127, q = clamp(roundf(w / scale), -127, 127) (0 for a zero row).
 * Non-finite weights cannot be rejected without a host sync; they give unspecified codes.
 *
 * Matmul, any T:
 *   y[t, o] = Σ_i x[t, i] · deq(W)[o, i] + bias[o]     (f32 out, f32 accumulation; bias may be NULL)
 * in one of two kernels (the `kernel` field, molora_quant_kernel):
 *   GEMV  one warp per output row and tile of 16 tokens (the weight read once per 16 tokens);
 *         num_tokens <= 65535·16;
 *   GEMM  64 tokens × 64 output rows per block, the weight dequantised into shared memory in chunks
 *         of 32 columns and reused by all 64 tokens, 4 × 4 outputs per thread; num_tokens <= 65535·64;
 *   AUTO  GEMV for num_tokens <= 16, else GEMM.
 */
#define MOLORA_NF4_BLOCK 64

typedef struct molora_quantize_args {
    const void *w;
    uint8_t *packed;  /* NF4 */
    int8_t *q;        /* int8 */
    float *scales;    /* NF4: absmax per block; int8: scale per row */
    int32_t rows;
    int32_t cols;
} molora_quantize_args;

int molora_quantize_nf4_f32(const molora_quantize_args *args, molora_stream_t stream);
int molora_quantize_nf4_f16(const molora_quantize_args *args, molora_stream_t stream);
int molora_quantize_nf4_bf16(const molora_quantize_args *args, molora_stream_t stream);
int molora_quantize_int8_f32(const molora_quantize_args *args, molora_stream_t stream);
int molora_quantize_int8_f16(const molora_quantize_args *args, molora_stream_t stream);
int molora_quantize_int8_bf16(const molora_quantize_args *args, molora_stream_t stream);

typedef enum molora_quant_kernel {
    MOLORA_QUANT_KERNEL_AUTO = 0,
    MOLORA_QUANT_KERNEL_GEMV = 1,
    MOLORA_QUANT_KERNEL_GEMM = 2
} molora_quant_kernel;

typedef struct molora_quant_matmul_args {
    const void *x;
    const uint8_t *packed; /* NF4, or NULL */
    const int8_t *q;       /* int8, or NULL */
    const float *scales;
    const void *bias;
    float *y;
    int32_t num_tokens;
    int32_t rows;
    int32_t cols;
    int32_t kernel; /* molora_quant_kernel */
} molora_quant_matmul_args;

int molora_quant_matmul_f32(const molora_quant_matmul_args *args, molora_stream_t stream);
int molora_quant_matmul_f16(const molora_quant_matmul_args *args, molora_stream_t stream);
int molora_quant_matmul_bf16(const molora_quant_matmul_args *args, molora_stream_t stream);

/*
 * Backward of the quantised matmul to its input (the weight is frozen):
 *   dx[t, i] = Σ_o dy[t, o] · deq(W)[o, i]     (f32 out, f32 accumulation over o in order)
 * dy [num_tokens, rows] of the launcher's element type, dx [num_tokens, cols] f32. 64 tokens × 64
 * columns per block, the weight dequantised into shared memory in chunks of 32 rows (read along its
 * rows, coalesced) and reused by all 64 tokens; num_tokens <= 65535·64. Exactly one of packed / q.
 */
typedef struct molora_quant_matmul_dx_args {
    const void *dy;
    const uint8_t *packed; /* NF4, or NULL */
    const int8_t *q;       /* int8, or NULL */
    const float *scales;
    float *dx;
    int32_t num_tokens;
    int32_t rows;
    int32_t cols;
} molora_quant_matmul_dx_args;

int molora_quant_matmul_dx_f32(const molora_quant_matmul_dx_args *args, molora_stream_t stream);
int molora_quant_matmul_dx_f16(const molora_quant_matmul_dx_args *args, molora_stream_t stream);
int molora_quant_matmul_dx_bf16(const molora_quant_matmul_dx_args *args, molora_stream_t stream);

/*
 * Backward of the grouped LoRA part over expert segments (the plan of the forward), deterministic (no
 * float atomics: every output element is summed by one thread in a fixed order). With h the forward's
 * sorted shrink [P, rank] f32, for each sorted pair p of token t, slot s, expert e, weight w:
 *
 *   u[p, j]  = Σ_o dy[t, o]·B[e, o, j]                       (workspace u [T·k_max, rank] f32)
 *   dw[t,s]  = scale·Σ_j h[p, j]·u[p, j]                      (f32 [T, k_max]; 0 for empty slots)
 *   dB[e,o,j] = scale·Σ_{p in e} w·dy[t, o]·h[p, j]           (pairs in sorted order)
 *   dA[e,j,i] = scale·Σ_{p in e} w·u[p, j]·x[t, i]
 *   dx[t, i] = scale·Σ_{s active} w·Σ_j u[p, j]·A[e, j, i]     (slots in order)
 *
 * Gradients are f32: dA [E, rank, d_in], dB [E, d_out, rank], dx [T, d_in], dw [T, k_max]. x, A, B
 * and dy are of the launcher's element type.
 */
typedef struct molora_lora_backward_args {
    const void *x;
    const void *a;
    const void *b;
    const void *dy;
    const float *h;
    const int32_t *ids;
    const float *weights;
    const int32_t *expert_offsets;
    const int32_t *sorted_slots;
    const int32_t *slot_to_sorted;
    float *u;
    float *da;
    float *db;
    float *dx;
    float *dw;
    float scale;
    int32_t num_tokens;
    int32_t k_max;
    int32_t num_experts;
    int32_t rank;
    int32_t d_in;
    int32_t d_out;
} molora_lora_backward_args;

int molora_lora_backward_f32(const molora_lora_backward_args *args, molora_stream_t stream);
int molora_lora_backward_f16(const molora_lora_backward_args *args, molora_stream_t stream);
int molora_lora_backward_bf16(const molora_lora_backward_args *args, molora_stream_t stream);

/*
 * Backward of the dense-gated LoRA path (one shrink over all experts into H [T, C], C = E·rank, expert
 * e's column j at e·rank + j; then molora_lora_expand with h_dense = 1), without dispatch and
 * deterministic (every output summed by one thread in a fixed order, no float atomics). With
 * G[t, e] = Σ_{s: ids[t,s] = e} weights[t, s] (slots in order; ids outside [0, E) skipped):
 *
 *   U[t, c]   = Σ_o dy[t, o]·B[e, o, j]                      (c = e·rank + j; workspace u [T, C])
 *   gate[t,e] = G[t, e]                                       (workspace gate [T, E])
 *   dw[t, s]  = scale·Σ_j H[t, e·rank + j]·U[t, e·rank + j]   (0 for empty slots)
 *   dB[e,o,j] = scale·Σ_t G[t, e]·dy[t, o]·H[t, e·rank + j]   (tokens in order)
 *   dA[e,j,i] = scale·Σ_t G[t, e]·U[t, e·rank + j]·x[t, i]
 *   dx[t, i]  = scale·Σ_e G[t, e]·Σ_j U[t, e·rank + j]·A[e, j, i]
 *
 * the same gradients as molora_lora_backward (a token's slots of one expert summed first). Gradients
 * f32: dA [E, rank, d_in], dB [E, d_out, rank], dx [T, d_in], dw [T, k_max]; x, A, B, dy of the
 * launcher's element type. C <= MOLORA_DENSE_GATED_MAX_COLUMNS, else cudaErrorInvalidValue. The grids
 * depend on the shapes only; T = 0 writes dA = dB = 0.
 *
 * Tensor cores (ug != NULL; f16/bf16, d_in, d_out and rank multiples of 8, x, A, B, dy, ug, hg 16-byte
 * aligned, otherwise cudaErrorInvalidValue): with Ũ = round(G ⊙ U) and Ĥ = round(G ⊙ H) in the
 * element type (ug, hg [T, C]), dx = scale·Ũ·A_all, dA = scale·Ũᵀ·x and dB = scale·dyᵀ·Ĥ are
 * mma.sync GEMMs (f32 accumulation); dA and dB split their sum over T `splits` ways into partials
 * ([splits, max(C·d_in, d_out·C)] f32) summed in split order by each tile's last block (tickets: at
 * least num_tickets = max(ceil(C/64)·ceil(d_in/64), ceil(d_out/64)·ceil(C/64)) ints, zero, left zero).
 */
#define MOLORA_DENSE_GATED_MAX_COLUMNS 512

typedef struct molora_lora_backward_dense_args {
    const void *x;
    const void *a;
    const void *b;
    const void *dy;
    const float *h;
    const int32_t *ids;
    const float *weights;
    float *u;
    float *gate;
    float *da;
    float *db;
    float *dx;
    float *dw;
    float scale;
    int32_t num_tokens;
    int32_t k_max;
    int32_t num_experts;
    int32_t rank;
    int32_t d_in;
    int32_t d_out;
    void *ug;              /* [T, C] element type, or NULL: the CUDA-core kernels */
    void *hg;              /* [T, C] element type (with ug) */
    float *partials;       /* [splits, max(C·d_in, d_out·C)] f32 (with ug, when splits > 1) */
    int32_t *tickets;      /* [num_tickets] (with ug) */
    int32_t num_tickets;
    int32_t splits;        /* 1 ..= max(1, ceil(T / 32)) (with ug) */
} molora_lora_backward_dense_args;

int molora_lora_backward_dense_f32(const molora_lora_backward_dense_args *args, molora_stream_t stream);
int molora_lora_backward_dense_f16(const molora_lora_backward_dense_args *args, molora_stream_t stream);
int molora_lora_backward_dense_bf16(const molora_lora_backward_dense_args *args, molora_stream_t stream);

/*
 * Gating backward (top-k, threshold with per-token or scalar tau, dense; with or without the
 * hierarchical combination), one warp per token: the local probabilities l are recomputed from the
 * logits and combined into p exactly as the forward computed them, then
 *   dp from dw:  top-k renormalised  dp_i = (dw_i − Σ_j w_j·dw_j)/Σ_kept p;  not renormalised dp_i = dw_i;
 *                threshold  dp_i = (dw_i − Σ_j w_j·dw_j)/Z,  dtau = Σ_i dw_i·(n·w_i − 1)/Z
 *                (Z = Σ_kept (p − tau), n kept; the arg-max fallback and Z = 0 give no gradient);
 *                dense  dp = dw
 *   dl from dp:  no combination  dl = dp;
 *                λ-mix (p = λ·g + (1 − λ)·l)  dl = (1 − λ)·dp,  dλ_t = Σ_e dp_e·(g_e − l_e);
 *                product (p = g ⊙ l / Σ(g ⊙ l))  dl = g ⊙ (dp − ⟨dp, p⟩)/Σ(g ⊙ l), or dl = dp where
 *                that sum is 0 (the forward kept l)
 *   dz from dl:  softmax  l·(dl − ⟨dl, l⟩)/temperature;  sigmoid  dl·l·(1 − l)/temperature;
 *                none  dz = dl (the input was the probabilities)
 * ids / weights are the forward's [T, k_max]; dz [T, E] f32; dtau [T] f32 (threshold only, may be NULL).
 * With combine != NONE, global_probs [num_seqs, E] and seq_offsets [num_seqs + 1] are the forward's
 * (as in molora_gating_args); dlambda_tokens [T] f32 receives dλ_t (λ-mix only, may be NULL), and
 * dlambda [1] f32 (may be NULL; needs dlambda_tokens) Σ_t dλ_t, summed by one block in a fixed order
 * (deterministic). Sums in double, as on the CPU reference (src/cpu/backward.rs).
 */
typedef struct molora_gating_backward_args {
    const float *logits;
    const int32_t *ids;
    const float *dw;
    float *dz;
    float *dtau;
    const float *taus;
    float tau;
    int32_t num_tokens;
    int32_t num_experts;
    int32_t k_max;
    int32_t activation;
    float temperature;
    int32_t gate;
    int32_t renormalize;
    int32_t combine; /* molora_combine */
    float lambda;
    const float *global_probs;
    const int32_t *seq_offsets;
    int32_t num_seqs;
    float *dlambda_tokens;
    float *dlambda;
} molora_gating_backward_args;

int molora_gating_backward_f32(const molora_gating_backward_args *args, molora_stream_t stream);

/*
 * Router backward, deterministic: with logits = x·W_gᵀ + b and dz [T, E] f32:
 *   dW_g[e, i] = Σ_t dz[t, e]·x[t, i]   db[e] = Σ_t dz[t, e]   dx[t, i] = Σ_e dz[t, e]·W_g[e, i]
 * (tokens summed in order; f32 outputs; dx is written, not accumulated, and may be NULL).
 *
 * Tensor cores (dz_t != NULL; f16/bf16, d_in a multiple of 8, x, W_g, dz_t 16-byte aligned,
 * otherwise cudaErrorInvalidValue): dz is rounded to the element type into dz_t [T, E8] (E8 = E
 * rounded up to a multiple of 8, zero-padded), then dW_g = dz_tᵀ·x and dx = dz_t·W_g are mma.sync
 * GEMMs; dW_g's sum over T is split `splits` ways into partials ([splits, E, d_in] f32, when
 * splits > 1) summed in split order by each tile's last block (tickets: at least num_tickets =
 * ceil(E/64)·ceil(d_in/64) ints, zero, left zero); db as above.
 */
typedef struct molora_router_backward_args {
    const void *x;
    const void *w_g;
    const float *dz;
    float *dw_g;
    float *db;
    float *dx;
    int32_t num_tokens;
    int32_t d_in;
    int32_t num_experts;
    void *dz_t;          /* [T, E8] element type, or NULL: the CUDA-core kernels */
    float *partials;     /* [splits, E, d_in] (with dz_t, when splits > 1) */
    int32_t *tickets;    /* [num_tickets] (with dz_t) */
    int32_t num_tickets;
    int32_t splits;      /* 1 ..= max(1, ceil(T / 32)) (with dz_t) */
} molora_router_backward_args;

int molora_router_backward_f32(const molora_router_backward_args *args, molora_stream_t stream);
int molora_router_backward_f16(const molora_router_backward_args *args, molora_stream_t stream);
int molora_router_backward_bf16(const molora_router_backward_args *args, molora_stream_t stream);

/*
 * Backward of SAML's weight-space mixing (molora_mix), deterministic. With Ā_s = Σ_e p[s, e]·A_e,
 * B̄_s = Σ_e p[s, e]·B_e and the gradients dĀ [S, per_a], dB̄ [S, per_b] (f32):
 *   dA[e, i] = Σ_s p[s, e]·dĀ[s, i]      dB[e, i] = Σ_s p[s, e]·dB̄[s, i]      (sequences in order)
 *   dp[s, e] = ⟨dĀ_s, A_e⟩ + ⟨dB̄_s, B_e⟩                                         (one block per (s, e),
 *              a fixed-order tree over its threads' partial sums)
 * A [E, per_a] and B [E, per_b] of the launcher's element type; dA [E, per_a], dB [E, per_b],
 * dp [S, E] f32, written (not accumulated). per_a = rank·d_in, per_b = d_out·rank. The CPU reference
 * is molora::cpu::backward::mix_backward, per sequence (its dA_e, dB_e summed over the sequences).
 * num_seqs == 0 writes dA = dB = 0. E, num_seqs <= 65535.
 */
typedef struct molora_mix_backward_args {
    const void *a;
    const void *b;
    const float *probs;
    const float *da_mixed;
    const float *db_mixed;
    float *da;
    float *db;
    float *dp;
    int32_t num_experts;
    int32_t num_seqs;
    int64_t per_a;
    int64_t per_b;
} molora_mix_backward_args;

int molora_mix_backward_f32(const molora_mix_backward_args *args, molora_stream_t stream);
int molora_mix_backward_f16(const molora_mix_backward_args *args, molora_stream_t stream);
int molora_mix_backward_bf16(const molora_mix_backward_args *args, molora_stream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MOLORA_H */
