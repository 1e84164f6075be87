/*
 * molora_emu.h — the host side of molora's emulated CUDA device.
 *
 * With the crate's `emu` feature, every kernel of cuda/ is also compiled by the host C++ compiler
 * against cuda/emu/emu.cuh and runs on the CPU: each launcher `molora_X` of molora.h has a twin
 * `molora_emu_X` with the same signature (the stream is ignored; the launch runs to completion on the
 * calling thread before it returns). Device memory of the emulated device is host memory from the
 * emulator's arena; kernels' loads and stores are checked against it (cuda/emu/runtime.cpp).
 *
 * Every function returns a cudaError_t as an int (0 = success). When a launch or a copy fails, the
 * emulator's report (which check, the kernel, the thread and the address) is kept per thread and read
 * with molora_emu_last_report.
 */
#ifndef MOLORA_EMU_H
#define MOLORA_EMU_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* `bytes` of device memory, 256-byte aligned, with unaddressable redzones on both sides. Fresh memory
 * counts as unwritten: a kernel that reads a byte before anything wrote it fails (initcheck). Zero
 * bytes gives a unique pointer that nothing may touch. */
int molora_emu_malloc(void **ptr, size_t bytes);
/* Frees memory from molora_emu_malloc; later accesses to it are reported. */
int molora_emu_free(void *ptr);
/* Copies and fills; each range must lie inside one live allocation. */
int molora_emu_memcpy_htod(void *dst, const void *src, size_t bytes);
int molora_emu_memcpy_dtoh(void *dst, const void *src, size_t bytes);
int molora_emu_memcpy_dtod(void *dst, const void *src, size_t bytes);
int molora_emu_memset(void *dst, int value, size_t bytes);
/* The report of the last failed launch or call on this thread ("" when none): writes up to cap - 1
 * bytes and a NUL into buf (when cap > 0) and returns the report's full length. */
size_t molora_emu_last_report(char *buf, size_t cap);
/* The architecture whose limits launches are checked against, as a compute capability times ten
 * (80, 86, 89, 90, 100, 120); the default is 90. Returns cudaErrorInvalidValue for an unknown one. */
int molora_emu_set_arch(int cc);

#ifdef __cplusplus
}
#endif

#endif /* MOLORA_EMU_H */
