//! The device handle: a cudarc context and the stream every op of this handle runs on.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::{Error, Result};

/// Whether a CUDA driver and at least one device are present. Never panics.
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

/// A CUDA device and the stream molora's ops on it are enqueued on.
#[derive(Debug, Clone)]
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Device {
    /// Opens device `ordinal` and uses its default stream.
    ///
    /// Errors: [`Error::NoDevice`] when the driver library is missing or `ordinal` is not below the
    /// device count, [`Error::Driver`] when the driver fails to count devices or create the context.
    pub fn new(ordinal: usize) -> Result<Device> {
        if !driver_library_present() {
            return Err(Error::NoDevice {
                reason: "the CUDA driver library (libcuda) was not found".into(),
            });
        }
        let count = CudaContext::device_count().map_err(|e| Error::Driver(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice {
                reason: format!("device {ordinal} requested, {count} present"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Driver(e.to_string()))?;
        let stream = ctx.default_stream();
        Ok(Device { ctx, stream })
    }

    /// Uses an existing cudarc stream (e.g. a framework's), so molora's ops order with its work.
    pub fn from_stream(stream: Arc<CudaStream>) -> Device {
        Device {
            ctx: stream.context().clone(),
            stream,
        }
    }

    /// The cudarc context of the device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream molora's ops on this handle are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies a host slice to a new device buffer (enqueued on the stream).
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| Error::Driver(e.to_string()))
    }

    /// Copies a device buffer back to the host; this waits for the stream.
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| Error::Driver(e.to_string()))
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(|e| Error::Driver(e.to_string()))
    }

    /// Waits until everything enqueued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::Driver(e.to_string()))
    }

    pub(crate) fn raw_stream(&self) -> super::ffi::molora_stream_t {
        self.stream.cu_stream() as super::ffi::molora_stream_t
    }
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
pub(crate) fn activation_code(act: Option<crate::cpu::Activation>) -> i32 {
    match act {
        Some(crate::cpu::Activation::Softmax) => super::ffi::MOLORA_ACTIVATION_SOFTMAX as i32,
        Some(crate::cpu::Activation::Sigmoid) => super::ffi::MOLORA_ACTIVATION_SIGMOID as i32,
        None => super::ffi::MOLORA_ACTIVATION_NONE as i32,
    }
}

/// Maps a launcher's return code (a `cudaError_t`) to a result.
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
fn cuda_error_name(code: i32) -> &'static str {
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
        _ => "see cudaGetErrorString",
    }
}
