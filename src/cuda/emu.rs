//! The emulated device's memory (feature `emu`): allocations in the emulator's arena, copies and
//! fills, and the emulator's report of a failed call, on the safe side of `ffi_emu`.

use std::marker::PhantomData;
use std::os::raw::{c_char, c_int, c_void};

use super::ffi_emu;
use super::launch::cuda_error_name;
use crate::{Error, Result};

/// The emulator's report of the last failed launch or memory call on this thread (`""` when none).
pub(crate) fn last_report() -> String {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `buf` is a live, writable allocation of `buf.len()` bytes; the emulator writes at
        // most `cap - 1` bytes and a NUL into it.
        let full = unsafe {
            ffi_emu::molora_emu_last_report(buf.as_mut_ptr().cast::<c_char>(), buf.len())
        };
        if full < buf.len() {
            buf.truncate(full);
            return String::from_utf8_lossy(&buf).into_owned();
        }
        // Longer than the buffer: ask again with room for all of it and its NUL.
        buf = vec![0u8; full.saturating_add(1)];
    }
}

/// Maps an emulator return code (a `cudaError_t`) to a result; a failure carries the emulator's
/// report (the check, the kernel, the thread and the address), or the code's name when it gave none.
pub(crate) fn check(op: &'static str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let report = last_report();
    Err(Error::Cuda {
        op,
        code,
        message: if report.is_empty() {
            cuda_error_name(code).to_string()
        } else {
            report
        },
    })
}

/// Bytes of `len` elements of `T`, or [`Error::InvalidDim`] when that overflows.
fn bytes_of<T>(what: &'static str, len: usize) -> Result<usize> {
    len.checked_mul(std::mem::size_of::<T>())
        .ok_or(Error::InvalidDim {
            what,
            value: len,
            reason: "its size in bytes overflows a usize",
        })
}

/// One allocation of `len` elements of `T` in the emulated device's memory, freed on drop.
pub(crate) struct EmuAlloc<T> {
    ptr: *mut T,
    len: usize,
    _marker: PhantomData<T>,
}

// SAFETY: the allocation is plain memory of the emulator's arena, owned by this value alone (like a
// `Box<[T]>`); the emulator's allocator and copies may be called from any thread, and the Rust side
// never dereferences the pointer, it only hands it to the emulator. Sending or sharing the owner is
// therefore as safe as sending or sharing the `T`s it holds.
unsafe impl<T: Send> Send for EmuAlloc<T> {}
// SAFETY: as above; `&EmuAlloc` only gives reads of the memory (writes need `&mut`).
unsafe impl<T: Sync> Sync for EmuAlloc<T> {}

impl<T> EmuAlloc<T> {
    /// `len` elements of fresh memory, which the emulator counts as unwritten (a kernel reading it
    /// fails its initcheck).
    pub(crate) fn alloc(op: &'static str, len: usize) -> Result<Self> {
        let bytes = bytes_of::<T>("emulated allocation length", len)?;
        let mut raw: *mut c_void = std::ptr::null_mut();
        // SAFETY: `raw` is a valid place for the emulator to store the new pointer.
        check(op, unsafe { ffi_emu::molora_emu_malloc(&mut raw, bytes) })?;
        if raw.is_null() {
            return Err(Error::Cuda {
                op,
                code: 2,
                message: format!("the emulator returned a null pointer for {bytes} bytes"),
            });
        }
        Ok(EmuAlloc {
            ptr: raw.cast::<T>(),
            len,
            _marker: PhantomData,
        })
    }

    /// `len` zeroed elements.
    pub(crate) fn zeroed(op: &'static str, len: usize) -> Result<Self> {
        let a = Self::alloc(op, len)?;
        memset_zero::<T>(op, a.addr(), a.len)?;
        Ok(a)
    }

    /// A copy of `host`.
    pub(crate) fn copy_of(op: &'static str, host: &[T]) -> Result<Self> {
        let a = Self::alloc(op, host.len())?;
        copy_htod(op, host, a.addr())?;
        Ok(a)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The device address of the first element.
    pub(crate) fn addr(&self) -> u64 {
        self.ptr as usize as u64
    }
}

impl<T> Drop for EmuAlloc<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from molora_emu_malloc and is freed once, here; no view outlives the
        // allocation (views borrow it). A failure to free cannot be reported from a destructor.
        let _ = unsafe { ffi_emu::molora_emu_free(self.ptr.cast::<c_void>()) };
    }
}

/// Copies `host` to `len(host)` elements at emulated address `dst`. The caller checked that `dst`
/// starts a range of at least that many elements in a live allocation it may write.
pub(crate) fn copy_htod<T>(op: &'static str, host: &[T], dst: u64) -> Result<()> {
    let bytes = std::mem::size_of_val(host);
    // SAFETY: `host` is `bytes` readable bytes; the emulator checks that [dst, dst + bytes) lies in
    // one live allocation and fails the call (it writes nothing) otherwise.
    check(op, unsafe {
        ffi_emu::molora_emu_memcpy_htod(
            dst as usize as *mut c_void,
            host.as_ptr().cast::<c_void>(),
            bytes,
        )
    })
}

/// Copies `host.len()` elements from emulated address `src` into `host`.
pub(crate) fn copy_dtoh<T>(op: &'static str, src: u64, host: &mut [T]) -> Result<()> {
    let bytes = std::mem::size_of_val(host);
    // SAFETY: `host` is `bytes` writable bytes; the emulator checks the source range and writes
    // nothing when it does not lie in one live allocation. `T: DeviceRepr` at every caller (plain
    // data, valid for the bytes a kernel or a copy of `T`s left there).
    check(op, unsafe {
        ffi_emu::molora_emu_memcpy_dtoh(
            host.as_mut_ptr().cast::<c_void>(),
            src as usize as *const c_void,
            bytes,
        )
    })
}

/// Copies `len` elements of `T` from emulated address `src` to `dst`.
pub(crate) fn copy_dtod<T>(op: &'static str, src: u64, dst: u64, len: usize) -> Result<()> {
    let bytes = bytes_of::<T>("copy length", len)?;
    // SAFETY: both ranges are emulated device memory, which the emulator checks before copying.
    check(op, unsafe {
        ffi_emu::molora_emu_memcpy_dtod(
            dst as usize as *mut c_void,
            src as usize as *const c_void,
            bytes,
        )
    })
}

/// Zeroes `len` elements of `T` at emulated address `dst`.
pub(crate) fn memset_zero<T>(op: &'static str, dst: u64, len: usize) -> Result<()> {
    let bytes = bytes_of::<T>("fill length", len)?;
    // SAFETY: the range is emulated device memory, which the emulator checks before writing.
    check(op, unsafe {
        ffi_emu::molora_emu_memset(dst as usize as *mut c_void, 0, bytes)
    })
}

/// Sets the architecture whose limits emulated launches are checked against.
pub(crate) fn set_arch(cc: u32) -> Result<()> {
    let code = c_int::try_from(cc).map_err(|_| Error::InvalidDim {
        what: "emulated compute capability",
        value: cc as usize,
        reason: "must be a compute capability times ten such as 80, 86, 89, 90, 100 or 120",
    })?;
    // SAFETY: a plain call with an integer argument; the emulator refuses unknown values.
    check("set_emulated_arch", unsafe {
        ffi_emu::molora_emu_set_arch(code)
    })
}
