/*
 * molora_selftest.h — small kernels that hold the emulated device and the GPU to the same answers,
 * and kernels with planted bugs that the emulator must catch (tests/emu_selftest.rs). They are not
 * part of the product's kernels; they are built with them so that the same test runs on both devices.
 */
#ifndef MOLORA_SELFTEST_H
#define MOLORA_SELFTEST_H

#include "molora.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Primitive checks: every device must give the answer the CUDA documentation and the PTX ISA define. */
#define MOLORA_SELFTEST_SHUFFLES 1  /* shfl xor/up/down/idx (widths 32, 8), ballot, any/all, match_any  */
#define MOLORA_SELFTEST_WMMA 2      /* wmma 16×16×16: A row-major, B column-major, f16 in, f32 out      */
#define MOLORA_SELFTEST_MMA 3       /* mma.sync m16n8k16 f16 with fragments loaded by the PTX layout    */
#define MOLORA_SELFTEST_LDMATRIX 4  /* ldmatrix x4 and x4.trans of four 8×8 b16 matrices              */
#define MOLORA_SELFTEST_CP_ASYNC 5  /* cp.async groups: wait_group 1 lands the older group only         */
/* Planted bugs (run them on the emulated device only: on a GPU they corrupt memory or hang). */
#define MOLORA_SELFTEST_BUG_OOB_GLOBAL_WRITE 101  /* a store one element past the end of out          */
#define MOLORA_SELFTEST_BUG_OOB_SHARED_READ 102   /* a load one element past a shared array           */
#define MOLORA_SELFTEST_BUG_MISSING_SYNCTHREADS 103 /* a shared write read by another thread, no barrier */
#define MOLORA_SELFTEST_BUG_DIVERGENT_BARRIER 104 /* __syncthreads() inside a branch half the block skips */
#define MOLORA_SELFTEST_BUG_SHUFFLE_MASK 105      /* a full-mask shuffle that lane 31 never reaches    */
#define MOLORA_SELFTEST_BUG_MMA_FRAGMENT 106      /* MMA with rows g and g + 8 of A swapped (wrong answer) */
#define MOLORA_SELFTEST_BUG_WMMA_LAYOUT 107       /* WMMA storing D column-major (wrong answer)        */
#define MOLORA_SELFTEST_BUG_SMEM_LIMIT 108        /* 100 KiB of dynamic shared memory without the opt-in */
#define MOLORA_SELFTEST_BUG_UNINIT_READ 109       /* a load of device memory nothing wrote             */

typedef struct molora_selftest_args {
    int32_t kind;    /* one of MOLORA_SELFTEST_* */
    const float *in; /* device, in_len floats */
    int64_t in_len;
    float *out;      /* device, out_len floats */
    int64_t out_len;
} molora_selftest_args;

/* Runs one self-test kernel. in_len / out_len must be what the kind needs (tests/emu_selftest.rs);
 * cudaErrorInvalidValue otherwise. */
int molora_selftest(const molora_selftest_args *args, molora_stream_t stream);
/* The (in_len, out_len) a kind needs, or -1 for an unknown kind. */
int64_t molora_selftest_in_len(int32_t kind);
int64_t molora_selftest_out_len(int32_t kind);

#ifdef __cplusplus
}
#endif

#endif /* MOLORA_SELFTEST_H */
