//! The device handle: a GPU (a cudarc context and the stream every op of this handle runs on) or,
//! with the `emu` feature, the emulated device (the same kernels compiled for the host, with every
//! access checked), and the memory operations of both.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};

use super::memory::{gpu_view, gpu_view_mut, Buffer, DeviceRead, DeviceWrite, Memory};
use crate::error::check_len;
use crate::{Error, Result};

/// Whether a CUDA driver and at least one GPU are present (the emulated device does not count).
/// Never panics.
pub fn device_available() -> bool {
    if !driver_library_present() {
        return false;
    }
    matches!(CudaContext::device_count(), Ok(n) if n > 0)
}

/// Whether the driver library can be used. With `cuda` alone cudarc loads libcuda at run time (so a
/// binary built with the kernels starts on a machine without a driver, and every op first asks this);
/// with `candle-cuda`, candle links cudarc to libcuda at build time, so a running binary has it.
fn driver_library_present() -> bool {
    #[cfg(not(feature = "candle-cuda"))]
    {
        // SAFETY: `is_culib_present` only tries to dlopen the driver library and drops the handle.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(feature = "candle-cuda")]
    {
        true
    }
}

/// A device molora's ops run on: a CUDA GPU and the stream its ops are enqueued on
/// ([`Device::new`], [`Device::from_stream`]), or the emulated device ([`Device::emulated`], feature
/// `emu`), on which every launch runs on the calling thread with its memory accesses, barriers and
/// shuffles checked. The ops take the same buffers on both ([`Buffer`], or cudarc's on a GPU).
#[derive(Debug, Clone)]
pub struct Device {
    backend: Backend,
}

#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Gpu {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
    },
    #[cfg(feature = "emu")]
    Emulated,
}

fn drv(e: cudarc::driver::DriverError) -> Error {
    Error::Driver(e.to_string())
}

/// An empty GPU buffer: a GPU cannot allocate zero bytes, so it holds one element, zeroed (so that
/// even [`Buffer::as_cuda_slice`], which hands it out, never shows stale memory), which no length,
/// view or address of the buffer covers.
fn empty_gpu_buffer<T: DeviceRepr>(stream: &Arc<CudaStream>) -> Result<Buffer<T>> {
    // SAFETY: the element is zeroed below before anything can read it; `T: DeviceRepr` is plain data.
    let mut placeholder: CudaSlice<T> = unsafe { stream.alloc(1) }.map_err(drv)?;
    let bytes = std::mem::size_of::<T>();
    let (ptr, record) = placeholder.device_ptr_mut(stream);
    // SAFETY: `ptr` is the start of the live allocation of `bytes` bytes just made, and the fill is
    // enqueued on the stream it was allocated on (`record` orders later users after it).
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }
        .map_err(drv)?;
    drop(record);
    Ok(Buffer::empty_gpu(placeholder))
}

impl Device {
    /// Opens GPU `ordinal` on a stream of its own: a new non-blocking stream, not the legacy default
    /// stream, so that the ops enqueued on it can be captured into a CUDA graph. Being non-blocking,
    /// it does not wait for work on the legacy default stream (nor that for it): order such work
    /// with [`Device::synchronize`] or cudarc's events ([`Device::stream`]).
    ///
    /// Creating the stream puts cudarc's context in its multi-stream mode, in which every buffer
    /// records and waits on cudarc's events at each use, so that a buffer used on another stream
    /// is ordered after its last use here. A capture must not wait on events recorded before it:
    /// whoever captures turns that tracking off on [`Device::context`]
    /// (`CudaContext::disable_event_tracking`, unsafe) before making the buffers the captured ops
    /// use, and then orders any other stream's use of them itself.
    ///
    /// Errors: [`Error::NoDevice`] when the driver library is missing or `ordinal` is not below the
    /// device count, [`Error::Driver`] when the driver fails to count devices or create the context
    /// or the stream.
    pub fn new(ordinal: usize) -> Result<Device> {
        if !driver_library_present() {
            return Err(Error::NoDevice {
                reason: "the CUDA driver library (libcuda) was not found".into(),
            });
        }
        let count = CudaContext::device_count().map_err(drv)?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice {
                reason: format!("device {ordinal} requested, {count} present"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        let stream = ctx.new_stream().map_err(drv)?;
        Ok(Device {
            backend: Backend::Gpu { ctx, stream },
        })
    }

    /// The emulated CUDA device: molora's kernels compiled by the host compiler, each launch run to
    /// completion on the calling thread, with out-of-bounds and uninitialised accesses, shared-memory
    /// races, divergent barriers and bad shuffle masks reported as [`Error::Cuda`] carrying the
    /// emulator's report. For tests and CI without a GPU; it is slow.
    ///
    /// Errors: [`Error::EmuNotCompiled`] when molora was built without the `emu` feature.
    pub fn emulated() -> Result<Device> {
        #[cfg(feature = "emu")]
        {
            Ok(Device {
                backend: Backend::Emulated,
            })
        }
        #[cfg(not(feature = "emu"))]
        {
            Err(Error::EmuNotCompiled {
                op: "Device::emulated",
            })
        }
    }

    /// Uses an existing cudarc stream (e.g. a framework's), so molora's ops order with its work.
    pub fn from_stream(stream: Arc<CudaStream>) -> Device {
        Device {
            backend: Backend::Gpu {
                ctx: stream.context().clone(),
                stream,
            },
        }
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        self.memory() != Memory::Gpu
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    pub(crate) fn memory(&self) -> Memory {
        match self.backend {
            Backend::Gpu { .. } => Memory::Gpu,
            #[cfg(feature = "emu")]
            Backend::Emulated => Memory::Emulated,
        }
    }

    /// The cudarc context and stream of a GPU device, for work a caller orders with ours (cuBLAS,
    /// events, graph capture), or [`Error::Unsupported`] naming `op` on the emulated device.
    #[cfg_attr(not(feature = "emu"), allow(unused_variables))]
    pub fn gpu(&self, op: &'static str) -> Result<(&Arc<CudaContext>, &Arc<CudaStream>)> {
        match &self.backend {
            Backend::Gpu { ctx, stream } => Ok((ctx, stream)),
            #[cfg(feature = "emu")]
            Backend::Emulated => Err(Error::Unsupported {
                op,
                what: "the emulated device (this needs a GPU: a CUDA context and stream)".into(),
            }),
        }
    }

    /// The cudarc context of a GPU device; [`Error::Unsupported`] on the emulated device.
    pub fn context(&self) -> Result<&Arc<CudaContext>> {
        self.gpu("Device::context").map(|(ctx, _)| ctx)
    }

    /// The stream molora's ops on this GPU device are enqueued on; [`Error::Unsupported`] on the
    /// emulated device.
    pub fn stream(&self) -> Result<&Arc<CudaStream>> {
        self.gpu("Device::stream").map(|(_, stream)| stream)
    }

    /// Copies a host slice to a new device buffer (enqueued on a GPU's stream). An empty slice makes
    /// an empty buffer, on a GPU too (see [`Buffer`]).
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<Buffer<T>> {
        match &self.backend {
            Backend::Gpu { stream, .. } if host.is_empty() => empty_gpu_buffer(stream),
            Backend::Gpu { stream, .. } => stream.clone_htod(host).map(Buffer::from).map_err(drv),
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                super::emu::EmuAlloc::copy_of("Device::upload", host).map(Buffer::from_emu)
            }
        }
    }

    /// A zeroed device buffer of `len` elements; `len = 0` makes an empty buffer, on a GPU too (which
    /// cannot allocate zero bytes: see [`Buffer`]).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<Buffer<T>> {
        match &self.backend {
            Backend::Gpu { stream, .. } if len == 0 => empty_gpu_buffer(stream),
            Backend::Gpu { stream, .. } => stream.alloc_zeros(len).map(Buffer::from).map_err(drv),
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                super::emu::EmuAlloc::zeroed("Device::zeros", len).map(Buffer::from_emu)
            }
        }
    }

    /// `len` elements the emulator counts as unwritten, so that a kernel reading them fails its
    /// initcheck: for the self-test's planted uninitialised read. Emulated device only (an
    /// [`Error::Unsupported`] on a GPU, where such memory would hold whatever was there).
    #[cfg_attr(not(feature = "emu"), allow(unused_variables))]
    pub(crate) fn alloc_unwritten<T: DeviceRepr>(&self, len: usize) -> Result<Buffer<T>> {
        match &self.backend {
            Backend::Gpu { .. } => Err(Error::Unsupported {
                op: "Device::alloc_unwritten",
                what: "a GPU device (unwritten memory is for the emulated device's initcheck)"
                    .into(),
            }),
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                super::emu::EmuAlloc::alloc("Device::alloc_unwritten", len).map(Buffer::from_emu)
            }
        }
    }

    /// Copies a device buffer (or view) back to the host; this waits for the stream. An empty one
    /// gives an empty vector.
    pub fn download<T: DeviceRepr, B: DeviceRead<T> + ?Sized>(&self, src: &B) -> Result<Vec<T>> {
        match &self.backend {
            Backend::Gpu { stream, .. } => {
                let view = gpu_view("download source", src)?;
                if view.is_empty() {
                    // No copy of zero bytes for the driver; the wait still happens.
                    return stream.synchronize().map(|()| Vec::new()).map_err(drv);
                }
                stream.clone_dtoh(&view).map_err(drv)
            }
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                let addr = super::memory::emu_addr("download source", src)?;
                let n = src.len();
                let mut host = Vec::with_capacity(n);
                let spare = host
                    .spare_capacity_mut()
                    .get_mut(..n)
                    .ok_or(Error::InvalidDim {
                        what: "download length",
                        value: n,
                        reason: "the host vector could not reserve that many elements",
                    })?;
                super::emu::copy_dtoh("Device::download", addr, spare)?;
                // SAFETY: the emulator wrote all `n` elements (it fails the call and writes nothing
                // otherwise), each a `T` a kernel or a copy left in the buffer (every buffer is
                // initialised when made), and `T: DeviceRepr` is plain data.
                unsafe { host.set_len(n) };
                Ok(host)
            }
        }
    }

    /// Copies a device buffer (or view) into `host`, of the same length; this waits for the stream.
    pub fn download_into<T: DeviceRepr, B: DeviceRead<T> + ?Sized>(
        &self,
        src: &B,
        host: &mut [T],
    ) -> Result<()> {
        check_len("host destination of download_into", src.len(), host.len())?;
        match &self.backend {
            Backend::Gpu { stream, .. } => {
                let view = gpu_view("download source", src)?;
                if !view.is_empty() {
                    stream.memcpy_dtoh(&view, host).map_err(drv)?;
                }
                // An asynchronous copy into pageable memory need not have finished when it returns.
                stream.synchronize().map_err(drv)
            }
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                let addr = super::memory::emu_addr("download source", src)?;
                super::emu::copy_dtoh("Device::download_into", addr, host)
            }
        }
    }

    /// Copies `host` into an existing device buffer (or view) of the same length (enqueued on a GPU's
    /// stream).
    pub fn upload_into<T: DeviceRepr, B: DeviceWrite<T> + ?Sized>(
        &self,
        host: &[T],
        dst: &mut B,
    ) -> Result<()> {
        check_len("device destination of upload_into", host.len(), dst.len())?;
        match &self.backend {
            Backend::Gpu { stream, .. } => {
                let mut view = gpu_view_mut("upload destination", dst)?;
                if host.is_empty() {
                    return Ok(());
                }
                stream.memcpy_htod(host, &mut view).map_err(drv)
            }
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                let addr = super::memory::emu_addr("upload destination", dst)?;
                super::emu::copy_htod("Device::upload_into", host, addr)
            }
        }
    }

    /// Copies device memory `src` into `dst` of the same length (enqueued on a GPU's stream).
    pub fn copy<T: DeviceRepr, S: DeviceRead<T> + ?Sized, D: DeviceWrite<T> + ?Sized>(
        &self,
        src: &S,
        dst: &mut D,
    ) -> Result<()> {
        check_len("destination of the device copy", src.len(), dst.len())?;
        match &self.backend {
            Backend::Gpu { stream, .. } => {
                let from = gpu_view("copy source", src)?;
                let mut to = gpu_view_mut("copy destination", dst)?;
                if from.is_empty() {
                    return Ok(());
                }
                stream.memcpy_dtod(&from, &mut to).map_err(drv)
            }
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                let from = super::memory::emu_addr("copy source", src)?;
                let to = super::memory::emu_addr("copy destination", dst)?;
                super::emu::copy_dtod::<T>("Device::copy", from, to, src.len())
            }
        }
    }

    /// Sets every element of `dst` to zero (enqueued on a GPU's stream).
    pub fn memset_zeros<T: DeviceRepr + ValidAsZeroBits, B: DeviceWrite<T> + ?Sized>(
        &self,
        dst: &mut B,
    ) -> Result<()> {
        match &self.backend {
            Backend::Gpu { stream, .. } => {
                let mut view = gpu_view_mut("memset destination", dst)?;
                if view.is_empty() {
                    return Ok(());
                }
                stream.memset_zeros(&mut view).map_err(drv)
            }
            #[cfg(feature = "emu")]
            Backend::Emulated => {
                let addr = super::memory::emu_addr("memset destination", dst)?;
                super::emu::memset_zero::<T>("Device::memset_zeros", addr, dst.len())
            }
        }
    }

    /// Waits until everything enqueued on the stream has finished (nothing to wait for on the
    /// emulated device, whose launches finish before they return).
    pub fn synchronize(&self) -> Result<()> {
        match &self.backend {
            Backend::Gpu { stream, .. } => stream.synchronize().map_err(drv),
            #[cfg(feature = "emu")]
            Backend::Emulated => Ok(()),
        }
    }
}

/// Sets the compute capability (times ten: 80, 86, 89, 90, 100, 120; 90 by default) whose limits
/// (shared memory per block and its opt-in, threads per block, ...) every emulated launch in the
/// process is checked against, so the emulator refuses what a GPU of that architecture would.
///
/// Errors: an unknown architecture ([`Error::Cuda`] with the emulator's report, or
/// [`Error::InvalidDim`] when it does not fit an `int`).
#[cfg(feature = "emu")]
pub fn set_emulated_arch(compute_capability: u32) -> Result<()> {
    super::emu::set_arch(compute_capability)
}

/// `a·b` when it fits an `i32` (every index on the device is an i32), else [`Error::InvalidDim`]
/// naming the product.
pub(crate) fn checked_i32(what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .filter(|&n| n <= i32::MAX as usize)
        .ok_or(Error::InvalidDim {
            what,
            value: a.saturating_mul(b),
            reason: "must fit in an i32",
        })
}

/// The C ABI's code of a router activation; `None` is `MOLORA_ACTIVATION_NONE` (the input already
/// holds the probabilities).
pub(crate) fn activation_code(act: Option<crate::gate::Activation>) -> i32 {
    match act {
        Some(crate::gate::Activation::Softmax) => super::ffi::MOLORA_ACTIVATION_SOFTMAX as i32,
        Some(crate::gate::Activation::Sigmoid) => super::ffi::MOLORA_ACTIVATION_SIGMOID as i32,
        None => super::ffi::MOLORA_ACTIVATION_NONE as i32,
    }
}
