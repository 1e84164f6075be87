// Tensor-core and asynchronous-copy primitives (sm_80 and newer): mma.sync m16n8k16 with f32
// accumulators, ldmatrix, cp.async with commit/wait groups, programmatic dependent launch. Inline PTX on nvcc; on the emulated device
// (MOLORA_EMU) the emulation of cuda/emu/emu.cuh, which keeps every lane's fragment elements where the
// PTX ISA's layouts put them, so kernels are checked against the same layouts the hardware uses.
//
// Fragments of mma_m16n8k16 (g = lane / 4, t = lane % 4; a 32-bit register holds two 16-bit elements,
// the lower-indexed one in the low half):
//   A (16×16, row-major): a[j] = elements 2j, 2j+1; element i is (g + 8·((i / 2) % 2), 2t + i % 2 + 8·(i / 4))
//   B (16×8, column-major): b[j] = elements 2j, 2j+1; element i is (2t + i % 2 + 8·(i / 2), g)
//   C, D (16×8, f32): element i is (g + 8·(i / 2), 2t + i % 2)
#pragma once

#include <type_traits>

#include "common.cuh"

namespace molora {

// D = A·B + C on one 16×8×16 tile, T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
    static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16 inputs");
#ifdef MOLORA_EMU
    ::emu::mma_m16n8k16<std::is_same<T, __nv_bfloat16>::value>(d, a, b, c, __FILE__, __LINE__);
#else
    if constexpr (std::is_same<T, __half>::value) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%10,%11,%12,%13};\n"
                     : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                       "f"(c[3]));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%10,%11,%12,%13};\n"
                     : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                       "f"(c[3]));
    }
#endif
}

// ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16: lanes 8q..8q+7 give the (16-byte aligned) row
// addresses of 8×8 matrix q; lane l receives in regs[q] elements (l / 4, 2·(l % 4)) and (l / 4, 2·(l % 4) + 1)
// of matrix q, or with kTrans (2·(l % 4), l / 4) and (2·(l % 4) + 1, l / 4). Every lane passes an address
// (lanes past 8N pass any valid one).
template <int N, bool kTrans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&regs)[N], const void *row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef MOLORA_EMU
    ::emu::ldmatrix<N, kTrans>(regs, row, __FILE__, __LINE__);
#else
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (N == 1 && !kTrans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(regs[0]) : "r"(addr));
    } else if constexpr (N == 1) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(regs[0]) : "r"(addr));
    } else if constexpr (N == 2 && !kTrans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(regs[0]), "=r"(regs[1]) : "r"(addr));
    } else if constexpr (N == 2) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(regs[0]), "=r"(regs[1])
                     : "r"(addr));
    } else if constexpr (!kTrans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
                     : "r"(addr));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
                     : "r"(addr));
    }
#endif
}

// cp.async.cg.shared.global of 16 bytes: gmem is read only when `valid`, else the 16 bytes are zero-filled.
// The copy lands at the cp_async_wait that covers its group (the emulator completes it exactly there).
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
#ifdef MOLORA_EMU
    ::emu::cp_async(smem, gmem, 16, valid ? 16 : 0, __FILE__, __LINE__);
#else
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes) : "memory");
#endif
}
// Closes the group of the copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef MOLORA_EMU
    ::emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef MOLORA_EMU
    ::emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Programmatic dependent launch (sm_90): pdl_wait() blocks until the grids this launch depends on have
// completed or triggered, pdl_launch_dependents() lets the dependent launch start early. No-ops before
// sm_90 and on the emulated device, where every launch runs to completion before the next one starts
// (so a kernel that reads a predecessor's output before pdl_wait() is not caught there).
__device__ __forceinline__ void pdl_wait() {
#if !defined(MOLORA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if !defined(MOLORA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace molora
