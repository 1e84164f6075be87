// The emulated device: what a kernel of cuda/*.cu sees when the file is compiled by the host C++
// compiler with MOLORA_EMU defined (build.rs, feature `emu`). The kernel sources are the same as for
// nvcc; this header gives them the CUDA execution model on the CPU:
//
// - every thread of a block is a fiber; the fibers of a block run on one OS thread, one at a time,
//   switching at barriers and warp collectives (cuda/emu/runtime.cpp). `__syncthreads()` is a real
//   barrier; a thread that exits or waits at another barrier while others wait is reported.
// - warps are 32 lanes; `__shfl*_sync`, `__ballot_sync`, `__any/__all_sync`, `__match_any_sync` and
//   `__syncwarp` are collectives of the lanes their mask names (a named lane that never arrives, a
//   lane outside its own mask, or lanes that disagree on the mask are reported).
// - shared memory is declared with MOLORA_SHARED / MOLORA_DYNAMIC_SHARED (common.cuh): every array is
//   its own allocation, sized exactly, inside the emulator's arena.
// - wmma fragments (nvcuda::wmma, m16n16k16) and the primitives of cuda/tc.cuh (mma.sync m16n8k16,
//   ldmatrix, cp.async groups) keep each lane's elements where the PTX ISA's fragment layouts put
//   them, so a wrong fragment index gives a wrong answer here too.
// - every load and store the compiler emits is instrumented (-fsanitize=thread instrumentation; the
//   hooks are the emulator's, not ThreadSanitizer's): accesses to device or shared memory outside any
//   allocation (memcheck), reads of bytes nothing wrote (initcheck) and conflicting shared-memory
//   accesses of two threads between barriers (racecheck) fail the launch with a report.
//
// What it does not model: timing, the order of memory operations between blocks (blocks run one after
// another), the hardware's rounding inside tensor cores (the emulated mma accumulates in f32 with fmaf in
// k order), and launch bounds. Host libm's expf/logf/... are correctly rounded to within 1 ulp where
// CUDA's device functions allow up to 2 ulp (expf, logf) and the fast intrinsics (__expf) more.
#pragma once

#ifndef MOLORA_EMU
#error "cuda/emu/emu.cuh is the emulated device; nvcc builds include the CUDA headers instead"
#endif

// The CUDA runtime functions that kernels' host code calls are the emulator's, under names of its own
// so that a binary can hold both the GPU build (cudart) and the emulated one.
#define cudaGetLastError molora_emu_cudaGetLastError
#define cudaPeekAtLastError molora_emu_cudaPeekAtLastError
#define cudaFuncSetAttribute molora_emu_cudaFuncSetAttribute
#define cudaDeviceGetAttribute molora_emu_cudaDeviceGetAttribute
#define cudaMemsetAsync molora_emu_cudaMemsetAsync
#define cudaMemcpyAsync molora_emu_cudaMemcpyAsync

#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <vector_functions.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __constant__
#undef __shared__
#undef __align__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __constant__
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// Shared memory is declared through MOLORA_SHARED (common.cuh), which the emulator can size and check.
#define __shared__ __shared___is_declared_with_MOLORA_SHARED_in_molora_kernels

#include "molora_emu.h"

namespace emu {

// What a thread of a kernel knows about itself.
struct Coords {
    uint3 thread;
    uint3 block;
    dim3 block_dim;
    dim3 grid_dim;
    unsigned linear;  // thread index in the block (x fastest)
    unsigned lane;
    unsigned warp;
};

}  // namespace emu

extern "C" {
// The running thread's coordinates (set by the scheduler at every switch).
extern __thread const emu::Coords *molora_emu_coords;
cudaError_t molora_emu_cudaFuncSetAttribute(const void *func, cudaFuncAttribute attr, int value);
cudaError_t molora_emu_cudaGetLastError(void);
cudaError_t molora_emu_cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device);
cudaError_t molora_emu_cudaPeekAtLastError(void);
}

#define threadIdx (molora_emu_coords->thread)
#define blockIdx (molora_emu_coords->block)
#define blockDim (molora_emu_coords->block_dim)
#define gridDim (molora_emu_coords->grid_dim)
#define warpSize 32

template <typename F>
inline cudaError_t molora_emu_cudaFuncSetAttribute(F *func, cudaFuncAttribute attr, int value) {
    return molora_emu_cudaFuncSetAttribute(reinterpret_cast<const void *>(func), attr, value);
}

namespace emu {

// ---- the runtime's entry points (cuda/emu/runtime.cpp) -----------------------------------------
using Body = void (*)(void *params);
// Runs a kernel: every block of `grid`, `block` threads each, calling body(params) in every thread.
void run_kernel(const char *name, const void *func, dim3 grid, dim3 block, size_t dynamic_smem, Body body,
                void *params);
// The block's shared array declared at (file, line) as `name`, `bytes` long: allocated by the first
// thread that reaches the declaration, the same memory for every other thread of the block.
void *shared_array(size_t bytes, size_t align, const char *name, const char *file, int line);
// The block's dynamic shared memory (the launch's byte count, 1024-byte aligned).
void *dynamic_shared(const char *name, const char *file, int line);
void syncthreads(const char *file, int line);
// A collective of the lanes of `mask`: every lane deposits `mine`; the last to arrive calls
// complete(lane_data, mask, ctx) with the 32 lanes' pointers (null for lanes outside the mask), then
// every lane returns. `key` must be the same for all lanes (e.g. a shared pointer and a stride).
// `orders_memory`: the collective orders the lanes' memory accesses (`__syncwarp`, as CUDA documents;
// shuffles and votes do not).
using Complete = void (*)(void *const *lane_data, unsigned mask);
void warp_collective(const char *what, const char *file, int line, unsigned mask, uint64_t key, void *mine,
                     Complete complete, bool orders_memory);
// Reports a bug found by a check of this header (a finding): the launch stops and fails.
[[noreturn]] void fail(const char *check, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Accesses made until the matching end_as_lane are attributed to `lane` of the current warp (the lane
// that gave the address of an ldmatrix row).
void begin_as_lane(unsigned lane);
void end_as_lane();
// cp.async: queued per thread, completed (copied) at the wait that covers its group.
void cp_async(void *smem, const void *gmem, int bytes, int src_bytes, const char *file, int line);
void cp_async_commit();
void cp_async_wait(int pending);
// Atomics: read-modify-write of device or shared memory, checked like any access.
int atomic_add_i32(int *p, int v);
unsigned atomic_add_u32(unsigned *p, unsigned v);
unsigned long long atomic_add_u64(unsigned long long *p, unsigned long long v);
float atomic_add_f32(float *p, float v);
double atomic_add_f64(double *p, double v);
int atomic_max_i32(int *p, int v);
int atomic_min_i32(int *p, int v);
int atomic_cas_i32(int *p, int compare, int v);
unsigned atomic_cas_u32(unsigned *p, unsigned compare, unsigned v);
int atomic_exch_i32(int *p, int v);
unsigned atomic_exch_u32(unsigned *p, unsigned v);
float atomic_exch_f32(float *p, float v);

template <auto K>
const char *kernel_name() {
    // "const char* emu::kernel_name() [with auto K = NAME]" (GCC), "... [K = NAME]" (Clang)
    static const char *const pretty = __PRETTY_FUNCTION__;
    static const char *name = [] {
        static char buf[512];
        const char *s = pretty;
        const char *p = std::strstr(s, "K = ");
        p = p ? p + 4 : s;
        if (*p == '&') ++p;  // Clang writes the address of the function
        for (const char *prefix : {"molora_emu::(anonymous namespace)::", "molora_emu::{anonymous}::", "molora_emu::"}) {
            if (std::strncmp(p, prefix, std::strlen(prefix)) == 0) {
                p += std::strlen(prefix);
                break;
            }
        }
        size_t n = std::strlen(p);
        if (n > 0 && p[n - 1] == ']') --n;
        if (n >= sizeof(buf)) n = sizeof(buf) - 1;
        std::memcpy(buf, p, n);
        buf[n] = 0;
        return static_cast<const char *>(buf);
    }();
    return name;
}

template <auto K, typename... A>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, A... args) {
    struct Params {
        std::tuple<A...> args;
    } params{std::tuple<A...>(args...)};
    run_kernel(kernel_name<K>(), reinterpret_cast<const void *>(K), grid, block, smem,
               [](void *p) { std::apply([](auto &...a) { K(a...); }, static_cast<Params *>(p)->args); }, &params);
}

inline unsigned lane_id() { return molora_emu_coords->lane; }

// ---- warp collectives ----------------------------------------------------------------------------
template <typename T>
struct ShflSlot {
    T value;
    T result;
    int src;  // the lane this lane reads, or -1 for its own value
};

template <typename T>
void shfl_complete(void *const *data, unsigned mask) {
    for (int l = 0; l < 32; ++l) {
        if (!(mask & (1u << l))) continue;
        auto *s = static_cast<ShflSlot<T> *>(data[l]);
        if (s->src < 0) {
            s->result = s->value;
        } else if (!(mask & (1u << s->src))) {
            fail("synccheck", "lane %d reads lane %d in a shuffle whose mask 0x%08x does not name it (undefined)", l,
                 s->src, mask);
        } else {
            s->result = static_cast<ShflSlot<T> *>(data[s->src])->value;
        }
    }
}

enum ShflMode { kShflIdx, kShflUp, kShflDown, kShflXor };

template <typename T>
T shfl(const char *what, const char *file, int line, ShflMode mode, unsigned mask, T var, int arg, int width) {
    static_assert(std::is_trivially_copyable<T>::value, "shuffles move trivially copyable values");
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        fail("synccheck", "%s with width %d (a power of two up to 32)", what, width);
    const int lane = static_cast<int>(lane_id());
    const int base = lane & ~(width - 1), in = lane - base;
    int src = -1;
    switch (mode) {
        case kShflIdx: src = base + ((arg % width) + width) % width; break;
        case kShflUp: src = in >= arg ? lane - arg : -1; break;
        case kShflDown: src = in + arg < width ? lane + arg : -1; break;
        case kShflXor: {
            const int s = lane ^ arg;
            src = (s >= base && s < base + width) ? s : -1;
            break;
        }
    }
    if (src == lane) src = -1;
    ShflSlot<T> slot{var, var, src};
    warp_collective(what, file, line, mask, static_cast<uint64_t>(mode) << 32 | static_cast<unsigned>(width), &slot,
                    &shfl_complete<T>, false);
    return slot.result;
}

struct VoteSlot {
    uint64_t value;
    unsigned result;
};
inline void ballot_complete(void *const *data, unsigned mask) {
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l)
        if ((mask & (1u << l)) && static_cast<VoteSlot *>(data[l])->value) bits |= 1u << l;
    for (int l = 0; l < 32; ++l)
        if (mask & (1u << l)) static_cast<VoteSlot *>(data[l])->result = bits;
}
inline void match_complete(void *const *data, unsigned mask) {
    for (int l = 0; l < 32; ++l) {
        if (!(mask & (1u << l))) continue;
        auto *s = static_cast<VoteSlot *>(data[l]);
        unsigned peers = 0;
        for (int m = 0; m < 32; ++m)
            if ((mask & (1u << m)) && static_cast<VoteSlot *>(data[m])->value == s->value) peers |= 1u << m;
        s->result = peers;
    }
}
inline void nothing_complete(void *const *, unsigned) {}

inline unsigned ballot(const char *file, int line, unsigned mask, int pred) {
    VoteSlot s{pred != 0, 0};
    warp_collective("__ballot_sync", file, line, mask, 0, &s, &ballot_complete, false);
    return s.result;
}
inline int vote_any(const char *file, int line, unsigned mask, int pred) {
    VoteSlot s{pred != 0, 0};
    warp_collective("__any_sync", file, line, mask, 0, &s, &ballot_complete, false);
    return s.result != 0;
}
inline int vote_all(const char *file, int line, unsigned mask, int pred) {
    VoteSlot s{pred != 0, 0};
    warp_collective("__all_sync", file, line, mask, 0, &s, &ballot_complete, false);
    return s.result == mask;
}
template <typename T>
unsigned match_any(const char *file, int line, unsigned mask, T value) {
    static_assert(sizeof(T) <= 8, "__match_any_sync takes 32- and 64-bit values");
    VoteSlot s{0, 0};
    std::memcpy(&s.value, &value, sizeof(T));
    warp_collective("__match_any_sync", file, line, mask, sizeof(T), &s, &match_complete, false);
    return s.result;
}
inline void syncwarp(const char *file, int line, unsigned mask) {
    warp_collective("__syncwarp", file, line, mask, 0, nullptr, &nothing_complete, true);
}

}  // namespace emu

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__, ::emu::mask_or_full(__VA_ARGS__))
#define __shfl_sync(mask, var, ...) \
    ::emu::shfl("__shfl_sync", __FILE__, __LINE__, ::emu::kShflIdx, mask, var, ::emu::shfl_args(__VA_ARGS__))
#define __shfl_up_sync(mask, var, ...) \
    ::emu::shfl("__shfl_up_sync", __FILE__, __LINE__, ::emu::kShflUp, mask, var, ::emu::shfl_args(__VA_ARGS__))
#define __shfl_down_sync(mask, var, ...) \
    ::emu::shfl("__shfl_down_sync", __FILE__, __LINE__, ::emu::kShflDown, mask, var, ::emu::shfl_args(__VA_ARGS__))
#define __shfl_xor_sync(mask, var, ...) \
    ::emu::shfl("__shfl_xor_sync", __FILE__, __LINE__, ::emu::kShflXor, mask, var, ::emu::shfl_args(__VA_ARGS__))
#define __ballot_sync(mask, pred) ::emu::ballot(__FILE__, __LINE__, mask, pred)
#define __any_sync(mask, pred) ::emu::vote_any(__FILE__, __LINE__, mask, pred)
#define __all_sync(mask, pred) ::emu::vote_all(__FILE__, __LINE__, mask, pred)
#define __match_any_sync(mask, value) ::emu::match_any(__FILE__, __LINE__, mask, value)

namespace emu {
inline unsigned mask_or_full() { return 0xffffffffu; }
inline unsigned mask_or_full(unsigned m) { return m; }
// (arg, width = 32) of the shuffles, passed on as two ints.
struct ShflArgs {
    int arg, width;
};
inline ShflArgs shfl_args(int arg, int width = 32) { return {arg, width}; }
template <typename T>
T shfl(const char *what, const char *file, int line, ShflMode mode, unsigned mask, T var, ShflArgs a) {
    return shfl<T>(what, file, line, mode, mask, var, a.arg, a.width);
}
}  // namespace emu

// ---- atomics, loads, fences, integer and float intrinsics -----------------------------------------
inline int atomicAdd(int *p, int v) { return emu::atomic_add_i32(p, v); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return emu::atomic_add_u32(p, v); }
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) { return emu::atomic_add_u64(p, v); }
inline float atomicAdd(float *p, float v) { return emu::atomic_add_f32(p, v); }
inline double atomicAdd(double *p, double v) { return emu::atomic_add_f64(p, v); }
inline int atomicSub(int *p, int v) { return emu::atomic_add_i32(p, -v); }
inline int atomicMax(int *p, int v) { return emu::atomic_max_i32(p, v); }
inline int atomicMin(int *p, int v) { return emu::atomic_min_i32(p, v); }
inline int atomicCAS(int *p, int c, int v) { return emu::atomic_cas_i32(p, c, v); }
inline unsigned atomicCAS(unsigned *p, unsigned c, unsigned v) { return emu::atomic_cas_u32(p, c, v); }
inline int atomicExch(int *p, int v) { return emu::atomic_exch_i32(p, v); }
inline unsigned atomicExch(unsigned *p, unsigned v) { return emu::atomic_exch_u32(p, v); }
inline float atomicExch(float *p, float v) { return emu::atomic_exch_f32(p, v); }

template <typename T>
inline T __ldg(const T *p) {
    return *p;
}
// Loads that bypass L1 (global memory written by other blocks of the same grid).
template <typename T>
inline T __ldcg(const T *p) {
    return *p;
}
// Blocks run one after another and each finishes before the next starts: there is no order between
// blocks to model, so the fences only keep the compiler from moving accesses across them.
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __brev(unsigned v) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
    return r;
}
namespace emu {
template <typename To, typename From>
inline To bits_as(From v) {
    static_assert(sizeof(To) == sizeof(From), "a reinterpretation keeps the size");
    To t;
    std::memcpy(&t, &v, sizeof(To));
    return t;
}
}  // namespace emu
inline float __int_as_float(int v) { return emu::bits_as<float>(v); }
inline int __float_as_int(float f) { return emu::bits_as<int>(f); }
inline float __uint_as_float(unsigned v) { return emu::bits_as<float>(v); }
inline unsigned __float_as_uint(float f) { return emu::bits_as<unsigned>(f); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// ---- wmma (m16n16k16, f16/bf16 inputs, f32 or f16 accumulators) --------------------------------------
// A lane's elements are where the PTX ISA puts them for mma.m16n8k16 (a 16×16 tile is two m16n8 /
// k16n8 halves): with g = lane / 4 and t = lane % 4,
//   matrix_a  (m, k), element i < 8: m = g + 8·((i / 2) % 2),  k = 2t + i % 2 + 8·(i / 4)
//   matrix_b  (k, n), element i < 8: k = 2t + i % 2 + 8·((i / 2) % 2),  n = g + 8·(i / 4)
//   accumulator (m, n), element i < 8: m = g + 8·((i / 2) % 2),  n = 2t + i % 2 + 8·(i / 4)
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline void elem_rc(const matrix_a *, int lane, int i, int &r, int &c) {
    r = lane / 4 + 8 * ((i / 2) % 2);
    c = 2 * (lane % 4) + i % 2 + 8 * (i / 4);
}
inline void elem_rc(const matrix_b *, int lane, int i, int &r, int &c) {
    r = 2 * (lane % 4) + i % 2 + 8 * ((i / 2) % 2);
    c = lane / 4 + 8 * (i / 4);
}
inline void elem_rc(const accumulator *, int lane, int i, int &r, int &c) {
    r = lane / 4 + 8 * ((i / 2) % 2);
    c = 2 * (lane % 4) + i % 2 + 8 * (i / 4);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulator has the m16n16k16 wmma shape only");
    static constexpr int num_elements = 8;
    using element_type = T;
    T x[num_elements];
};

namespace detail {
template <typename Use, typename T, typename L>
void check_args(const char *what, const void *p, unsigned ldm) {
    const size_t align = 32;  // the wmma pointer must be 256-bit aligned
    if (reinterpret_cast<uintptr_t>(p) % align != 0)
        emu::fail("memcheck", "misaligned %s pointer %p (wmma needs 32-byte alignment)", what, p);
    const unsigned mult = 16 / sizeof(T);
    if (ldm % mult != 0) emu::fail("memcheck", "%s with ldm %u (a multiple of %u elements for this type)", what, ldm, mult);
}
inline uint64_t key(const void *p, unsigned ldm, int layout) {
    return reinterpret_cast<uintptr_t>(p) * 31u + ldm * 4u + static_cast<unsigned>(layout);
}
}  // namespace detail

template <typename Use, typename T, typename L, typename U>
void load_matrix_sync_at(fragment<Use, 16, 16, 16, T, L> &f, const U *p, unsigned ldm, bool row_major_mem,
                         const char *file, int line) {
    detail::check_args<Use, U, L>("wmma::load_matrix_sync", p, ldm);
    emu::warp_collective("wmma::load_matrix_sync", file, line, 0xffffffffu, detail::key(p, ldm, row_major_mem), nullptr,
                         &emu::nothing_complete, false);
    const int lane = static_cast<int>(emu::lane_id());
    for (int i = 0; i < 8; ++i) {
        int r, c;
        detail::elem_rc(static_cast<const Use *>(nullptr), lane, i, r, c);
        f.x[i] = row_major_mem ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r];
    }
}
template <typename T, typename U>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major> &f, const U *p, unsigned ldm) {
    load_matrix_sync_at(f, p, ldm, true, "wmma", 0);
}
template <typename T, typename U>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, col_major> &f, const U *p, unsigned ldm) {
    load_matrix_sync_at(f, p, ldm, false, "wmma", 0);
}
template <typename T, typename U>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, row_major> &f, const U *p, unsigned ldm) {
    load_matrix_sync_at(f, p, ldm, true, "wmma", 0);
}
template <typename T, typename U>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major> &f, const U *p, unsigned ldm) {
    load_matrix_sync_at(f, p, ldm, false, "wmma", 0);
}
template <typename T, typename U>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T> &f, const U *p, unsigned ldm, layout_t layout) {
    load_matrix_sync_at(f, p, ldm, layout == mem_row_major, "wmma", 0);
}
template <typename T, typename U>
void store_matrix_sync(U *p, const fragment<accumulator, 16, 16, 16, T> &f, unsigned ldm, layout_t layout) {
    detail::check_args<accumulator, U, void>("wmma::store_matrix_sync", p, ldm);
    emu::warp_collective("wmma::store_matrix_sync", "wmma", 0, 0xffffffffu, detail::key(p, ldm, layout), nullptr,
                         &emu::nothing_complete, false);
    const int lane = static_cast<int>(emu::lane_id());
    for (int i = 0; i < 8; ++i) {
        int r, c;
        detail::elem_rc(static_cast<const accumulator *>(nullptr), lane, i, r, c);
        U *q = layout == mem_row_major ? p + static_cast<size_t>(r) * ldm + c : p + static_cast<size_t>(c) * ldm + r;
        *q = static_cast<U>(f.x[i]);
    }
}
template <typename Use, typename T, typename L, typename V>
void fill_fragment(fragment<Use, 16, 16, 16, T, L> &f, const V &v) {
    for (int i = 0; i < 8; ++i) f.x[i] = static_cast<T>(v);
}

namespace detail {
template <typename TA, typename LA, typename TB, typename LB, typename TC>
struct MmaSlot {
    fragment<accumulator, 16, 16, 16, TC> *d;
    const fragment<matrix_a, 16, 16, 16, TA, LA> *a;
    const fragment<matrix_b, 16, 16, 16, TB, LB> *b;
    const fragment<accumulator, 16, 16, 16, TC> *c;
};
template <typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_complete(void *const *data, unsigned) {
    using Slot = MmaSlot<TA, LA, TB, LB, TC>;
    float A[16][16], B[16][16], C[16][16];
    for (int l = 0; l < 32; ++l) {
        const Slot *s = static_cast<const Slot *>(data[l]);
        for (int i = 0; i < 8; ++i) {
            int r, c;
            elem_rc(static_cast<const matrix_a *>(nullptr), l, i, r, c);
            A[r][c] = static_cast<float>(s->a->x[i]);
            elem_rc(static_cast<const matrix_b *>(nullptr), l, i, r, c);
            B[r][c] = static_cast<float>(s->b->x[i]);
            elem_rc(static_cast<const accumulator *>(nullptr), l, i, r, c);
            C[r][c] = static_cast<float>(s->c->x[i]);
        }
    }
    for (int l = 0; l < 32; ++l) {
        const Slot *s = static_cast<const Slot *>(data[l]);
        for (int i = 0; i < 8; ++i) {
            int r, c;
            elem_rc(static_cast<const accumulator *>(nullptr), l, i, r, c);
            float acc = C[r][c];
            for (int k = 0; k < 16; ++k) acc = fmaf(A[r][k], B[k][c], acc);
            s->d->x[i] = static_cast<TC>(acc);
        }
    }
}
}  // namespace detail

template <typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, 16, 16, 16, TC> &d, const fragment<matrix_a, 16, 16, 16, TA, LA> &a,
              const fragment<matrix_b, 16, 16, 16, TB, LB> &b, const fragment<accumulator, 16, 16, 16, TC> &c) {
    detail::MmaSlot<TA, LA, TB, LB, TC> slot{&d, &a, &b, &c};
    emu::warp_collective("wmma::mma_sync", "wmma", 0, 0xffffffffu, 0, &slot, &detail::mma_complete<TA, LA, TB, LB, TC>,
                         false);
}
}  // namespace wmma
}  // namespace nvcuda

// ---- mma.sync m16n8k16, ldmatrix, cp.async (the primitives of cuda/tc.cuh) -------------------------
namespace emu {

inline float half_bits_to_f32(uint16_t bits, bool bf16) {
    if (bf16) return bits_as<float>(static_cast<uint32_t>(bits) << 16);
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
}

// PTX mma.m16n8k16 (row.col, f32 accumulators) fragments, g = lane / 4, t = lane % 4:
//   A: a[j] holds elements 2j, 2j+1 (low half first); element i: m = g + 8·((i / 2) % 2), k = 2t + i % 2 + 8·(i / 4)
//   B: b[j] holds elements 2j, 2j+1; element i: k = 2t + i % 2 + 8·(i / 2), n = g
//   C, D: element i: m = g + 8·(i / 2), n = 2t + i % 2
struct MmaSlot {
    float *d;
    const uint32_t *a;
    const uint32_t *b;
    const float *c;
};
template <bool kBf16>
void mma_m16n8k16_complete(void *const *data, unsigned) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const MmaSlot *s = static_cast<const MmaSlot *>(data[l]);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 8; ++i) {
            const uint16_t bits = static_cast<uint16_t>(s->a[i / 2] >> (16 * (i % 2)));
            A[g + 8 * ((i / 2) % 2)][2 * t + i % 2 + 8 * (i / 4)] = half_bits_to_f32(bits, kBf16);
        }
        for (int i = 0; i < 4; ++i) {
            const uint16_t bits = static_cast<uint16_t>(s->b[i / 2] >> (16 * (i % 2)));
            B[2 * t + i % 2 + 8 * (i / 2)][g] = half_bits_to_f32(bits, kBf16);
            C[g + 8 * (i / 2)][2 * t + i % 2] = s->c[i];
        }
    }
    for (int l = 0; l < 32; ++l) {
        const MmaSlot *s = static_cast<const MmaSlot *>(data[l]);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
            const int m = g + 8 * (i / 2), n = 2 * t + i % 2;
            float acc = C[m][n];
            for (int k = 0; k < 16; ++k) acc = fmaf(A[m][k], B[k][n], acc);
            s->d[i] = acc;
        }
    }
}
template <bool kBf16>
inline void mma_m16n8k16(float *d, const uint32_t *a, const uint32_t *b, const float *c, const char *file, int line) {
    float out[4];
    MmaSlot slot{out, a, b, c};
    warp_collective(kBf16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16", file, line, 0xffffffffu, 0, &slot,
                    &mma_m16n8k16_complete<kBf16>, false);
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: lanes 8q..8q+7 give the row addresses of matrix q
// (16-byte aligned shared memory); lane l receives, in register q, elements (l / 4, 2·(l % 4)) and
// (l / 4, 2·(l % 4) + 1) of matrix q, or with .trans (2·(l % 4), l / 4) and (2·(l % 4) + 1, l / 4).
struct LdmSlot {
    const uint16_t *row;
    uint32_t *regs;
};
template <int kNum, bool kTrans>
void ldmatrix_complete(void *const *data, unsigned) {
    uint16_t m[4][8][8];
    for (int q = 0; q < kNum; ++q) {
        for (int r = 0; r < 8; ++r) {
            const int src_lane = 8 * q + r;
            const uint16_t *row = static_cast<const LdmSlot *>(data[src_lane])->row;
            if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
                fail("memcheck", "ldmatrix row address %p of lane %d is not 16-byte aligned", static_cast<const void *>(row),
                     src_lane);
            begin_as_lane(static_cast<unsigned>(src_lane));
            for (int c = 0; c < 8; ++c) m[q][r][c] = row[c];
            end_as_lane();
        }
    }
    for (int l = 0; l < 32; ++l) {
        uint32_t *regs = static_cast<const LdmSlot *>(data[l])->regs;
        for (int q = 0; q < kNum; ++q) {
            uint16_t lo, hi;
            if (kTrans) {
                lo = m[q][2 * (l % 4)][l / 4];
                hi = m[q][2 * (l % 4) + 1][l / 4];
            } else {
                lo = m[q][l / 4][2 * (l % 4)];
                hi = m[q][l / 4][2 * (l % 4) + 1];
            }
            regs[q] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
        }
    }
}
template <int kNum, bool kTrans>
inline void ldmatrix(uint32_t *regs, const void *row, const char *file, int line) {
    LdmSlot slot{static_cast<const uint16_t *>(row), regs};
    warp_collective(kTrans ? "ldmatrix.trans" : "ldmatrix", file, line, 0xffffffffu, kNum, &slot,
                    &ldmatrix_complete<kNum, kTrans>, false);
}

}  // namespace emu
