//! The one launch layer of the CUDA wrappers: a [`Launch`] takes each buffer's device address after
//! checking its length and that it is memory of the device's kind, keeps the guards that order the
//! buffers on a GPU stream until after the launch, runs the launcher of the device's kind (the
//! nvcc-built one on a GPU, its `molora_emu_*` twin on the emulated device) and turns its return
//! code into a [`Result`]. On the emulated device a failed launch carries the emulator's report.

use std::os::raw::c_int;

use cudarc::driver::SyncOnDrop;

use super::device::{Backend, Device};
use super::ffi;
use super::memory::{read_addr, write_addr, DeviceRead, DeviceWrite};
use crate::error::check_len;
use crate::{Error, Result};

/// A launcher of the C ABI: `int molora_X(const molora_X_args *args, molora_stream_t stream)`.
pub(crate) type Launcher<A> = unsafe extern "C" fn(*const A, ffi::molora_stream_t) -> c_int;

/// A kernel's launchers: the GPU one, and with the `emu` feature its emulated twin (same arguments).
#[doc(hidden)]
pub struct Kernel<A> {
    pub(crate) gpu: Launcher<A>,
    #[cfg(feature = "emu")]
    pub(crate) emu: Launcher<A>,
}

impl<A> Clone for Kernel<A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<A> Copy for Kernel<A> {}

impl<A> std::fmt::Debug for Kernel<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kernel")
    }
}

/// `kernel!(molora_X, molora_emu_X)`: the [`Kernel`] of launcher `molora_X` of `ffi` and its twin of
/// `ffi_emu`.
macro_rules! kernel {
    ($gpu:ident, $emu:ident) => {
        $crate::cuda::launch::Kernel {
            gpu: $crate::cuda::ffi::$gpu,
            #[cfg(feature = "emu")]
            emu: $crate::cuda::ffi_emu::$emu,
        }
    };
}

/// One op's launches: the device, the op's name for errors, and the guards of every buffer whose
/// address it handed out (dropped with it, after the launches are enqueued).
pub(crate) struct Launch<'a> {
    dev: &'a Device,
    op: &'static str,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(dev: &'a Device, op: &'static str) -> Self {
        Launch {
            dev,
            op,
            guards: Vec::new(),
        }
    }

    /// The address of a buffer the launch reads, after checking that it holds `len` elements
    /// ([`Error::LengthMismatch`]) and is memory of the device's kind ([`Error::DeviceMismatch`]),
    /// both naming `what`.
    pub(crate) fn input<T: 'a, B: DeviceRead<T> + ?Sized>(
        &mut self,
        what: &'static str,
        buf: &'a B,
        len: usize,
    ) -> Result<*const T> {
        check_len(what, len, buf.len())?;
        self.input_any(what, buf)
    }

    /// [`Launch::input`] without the length check, for buffers whose length their owner fixed
    /// (plans and workspaces allocated for a shape).
    pub(crate) fn input_any<T: 'a, B: DeviceRead<T> + ?Sized>(
        &mut self,
        what: &'static str,
        buf: &'a B,
    ) -> Result<*const T> {
        let (addr, guard) = read_addr(self.dev, what, buf)?;
        self.guards.extend(guard);
        Ok(addr as usize as *const T)
    }

    /// The address of a buffer the launch writes, checked as for [`Launch::input`].
    pub(crate) fn output<T: 'a, B: DeviceWrite<T> + ?Sized>(
        &mut self,
        what: &'static str,
        buf: &'a mut B,
        len: usize,
    ) -> Result<*mut T> {
        check_len(what, len, buf.len())?;
        self.output_any(what, buf)
    }

    /// [`Launch::output`] without the length check.
    pub(crate) fn output_any<T: 'a, B: DeviceWrite<T> + ?Sized>(
        &mut self,
        what: &'static str,
        buf: &'a mut B,
    ) -> Result<*mut T> {
        let (addr, guard) = write_addr(self.dev, what, buf)?;
        self.guards.extend(guard);
        Ok(addr as usize as *mut T)
    }

    /// Runs `kernel` with `args` on the device (enqueued on a GPU's stream; to completion on the
    /// emulated device) and checks its return code: [`Error::Cuda`] naming the op, with the CUDA
    /// error's name, or on the emulated device the emulator's report of what went wrong.
    ///
    /// # Safety
    ///
    /// Every pointer in `args` is null where the launcher allows it or an address this launch handed
    /// out (so of the device's memory kind, alive and ordered until the launch is enqueued), each
    /// covering every element the kernel touches for the sizes in `args`; the scalars meet the
    /// launcher's contract in `cuda/include/molora.h`.
    pub(crate) unsafe fn run<A>(&self, kernel: &Kernel<A>, args: &A) -> Result<()> {
        match self.dev.backend() {
            Backend::Gpu { stream, .. } => {
                // SAFETY: the caller's contract; the stream is this device's, alive for `'a`.
                let code =
                    unsafe { (kernel.gpu)(args, stream.cu_stream() as ffi::molora_stream_t) };
                check_launch(self.op, code)
            }
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                // SAFETY: the caller's contract; the emulator ignores the stream and checks every
                // access the kernel makes against its allocations.
                let code = unsafe { (kernel.emu)(args, std::ptr::null_mut()) };
                super::emu::check(self.op, code)
            }
        }
    }
}

/// Maps a GPU launcher's return code (a `cudaError_t`) to a result.
pub(crate) fn check_launch(op: &'static str, code: i32) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Cuda {
            op,
            code,
            message: cuda_error_name(code).to_string(),
        })
    }
}

/// Names of the `cudaError_t` codes a launcher can return.
pub(crate) fn cuda_error_name(code: i32) -> &'static str {
    match code {
        1 => "cudaErrorInvalidValue",
        2 => "cudaErrorMemoryAllocation",
        3 => "cudaErrorInitializationError",
        9 => "cudaErrorInvalidConfiguration",
        35 => "cudaErrorInsufficientDriver",
        98 => "cudaErrorInvalidDeviceFunction",
        100 => "cudaErrorNoDevice",
        101 => "cudaErrorInvalidDevice",
        209 => "cudaErrorNoKernelImageForDevice",
        400 => "cudaErrorInvalidResourceHandle",
        700 => "cudaErrorIllegalAddress",
        701 => "cudaErrorLaunchOutOfResources",
        719 => "cudaErrorLaunchFailure",
        _ => "see cudaGetErrorString",
    }
}
