//! Quantised base weights on the GPU (`cuda/quant.cu`): NF4 and int8 quantisation giving exactly
//! the CPU reference's codes and scales, and the dequantising matmul. GPU counterparts of
//! [`crate::cpu::quantize_nf4`], [`crate::cpu::quantize_int8`], [`crate::cpu::nf4_matmul`] and
//! [`crate::cpu::int8_matmul`].

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::device::{check_launch, Device};
use super::ffi;
use super::lora::CudaElement;
use crate::cpu::quant::check_dims;
use crate::cpu::{Int8Weight, Nf4Weight, NF4_BLOCK};
use crate::error::check_len;
use crate::{Error, Result};

/// A quantised weight `[rows, cols]` in device memory.
#[derive(Debug)]
pub enum DeviceQuantWeight {
    /// Packed NF4 codes (`ceil(n/2)` bytes) and one absmax per block of 64.
    Nf4 {
        rows: usize,
        cols: usize,
        packed: CudaSlice<u8>,
        absmax: CudaSlice<f32>,
    },
    /// Int8 codes `[rows, cols]` and one scale per row.
    Int8 {
        rows: usize,
        cols: usize,
        q: CudaSlice<i8>,
        scales: CudaSlice<f32>,
    },
}

impl DeviceQuantWeight {
    pub fn rows(&self) -> usize {
        match self {
            DeviceQuantWeight::Nf4 { rows, .. } | DeviceQuantWeight::Int8 { rows, .. } => *rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            DeviceQuantWeight::Nf4 { cols, .. } | DeviceQuantWeight::Int8 { cols, .. } => *cols,
        }
    }

    /// Uploads a CPU NF4 weight.
    pub fn from_nf4(dev: &Device, w: &Nf4Weight) -> Result<Self> {
        Ok(DeviceQuantWeight::Nf4 {
            rows: w.rows(),
            cols: w.cols(),
            packed: dev.upload(w.packed())?,
            absmax: dev.upload(w.absmax())?,
        })
    }

    /// Uploads a CPU int8 weight.
    pub fn from_int8(dev: &Device, w: &Int8Weight) -> Result<Self> {
        Ok(DeviceQuantWeight::Int8 {
            rows: w.rows(),
            cols: w.cols(),
            q: dev.upload(w.q())?,
            scales: dev.upload(w.scales())?,
        })
    }

    /// Copies an NF4 weight back to the host (waits for the stream).
    pub fn to_nf4(&self, dev: &Device) -> Result<Nf4Weight> {
        match self {
            DeviceQuantWeight::Nf4 {
                rows,
                cols,
                packed,
                absmax,
            } => Nf4Weight::from_parts(*rows, *cols, dev.download(packed)?, dev.download(absmax)?),
            DeviceQuantWeight::Int8 { .. } => Err(Error::Unsupported {
                op: "DeviceQuantWeight::to_nf4",
                what: "an int8 weight".into(),
            }),
        }
    }

    /// Copies an int8 weight back to the host (waits for the stream).
    pub fn to_int8(&self, dev: &Device) -> Result<Int8Weight> {
        match self {
            DeviceQuantWeight::Int8 {
                rows,
                cols,
                q,
                scales,
            } => Int8Weight::from_parts(*rows, *cols, dev.download(q)?, dev.download(scales)?),
            DeviceQuantWeight::Nf4 { .. } => Err(Error::Unsupported {
                op: "DeviceQuantWeight::to_int8",
                what: "an NF4 weight".into(),
            }),
        }
    }
}

/// NF4 quantisation of `w` `[rows, cols]` on the GPU, bit for bit as [`crate::cpu::quantize_nf4`].
/// Non-finite weights cannot be rejected without a host sync (the CPU path rejects them); they give
/// unspecified codes.
pub fn quantize_nf4<T: CudaElement>(
    dev: &Device,
    w: &impl DevicePtr<T>,
    rows: usize,
    cols: usize,
) -> Result<DeviceQuantWeight> {
    let n = check_dims(rows, cols)?;
    check_len("weight [rows, cols]", n, w.len())?;
    let mut packed = dev.zeros::<u8>(n.div_ceil(2))?;
    let mut absmax = dev.zeros::<f32>(n.div_ceil(NF4_BLOCK))?;
    {
        let stream = dev.stream();
        let (w_ptr, _g0) = w.device_ptr(stream);
        let (p_ptr, _g1) = packed.device_ptr_mut(stream);
        let (s_ptr, _g2) = absmax.device_ptr_mut(stream);
        let args = ffi::molora_quantize_args {
            w: w_ptr as *const _,
            packed: p_ptr as *mut u8,
            q: std::ptr::null_mut(),
            scales: s_ptr as *mut f32,
            rows: rows as i32,
            cols: cols as i32,
        };
        // SAFETY: w holds rows·cols elements (checked), packed ceil(n/2) bytes and absmax ceil(n/64)
        // floats (allocated above); n fits an i32. The guards order the buffers on `stream`.
        let code = unsafe { T::QUANTIZE_NF4(&args, dev.raw_stream()) };
        check_launch("quantize_nf4", code)?;
    }
    Ok(DeviceQuantWeight::Nf4 {
        rows,
        cols,
        packed,
        absmax,
    })
}

/// Int8 per-channel quantisation on the GPU, bit for bit as [`crate::cpu::quantize_int8`].
pub fn quantize_int8<T: CudaElement>(
    dev: &Device,
    w: &impl DevicePtr<T>,
    rows: usize,
    cols: usize,
) -> Result<DeviceQuantWeight> {
    let n = check_dims(rows, cols)?;
    check_len("weight [rows, cols]", n, w.len())?;
    let mut q = dev.zeros::<i8>(n)?;
    let mut scales = dev.zeros::<f32>(rows)?;
    {
        let stream = dev.stream();
        let (w_ptr, _g0) = w.device_ptr(stream);
        let (q_ptr, _g1) = q.device_ptr_mut(stream);
        let (s_ptr, _g2) = scales.device_ptr_mut(stream);
        let args = ffi::molora_quantize_args {
            w: w_ptr as *const _,
            packed: std::ptr::null_mut(),
            q: q_ptr as *mut i8,
            scales: s_ptr as *mut f32,
            rows: rows as i32,
            cols: cols as i32,
        };
        // SAFETY: w and q hold rows·cols elements, scales rows floats; n fits an i32.
        let code = unsafe { T::QUANTIZE_INT8(&args, dev.raw_stream()) };
        check_launch("quantize_int8", code)?;
    }
    Ok(DeviceQuantWeight::Int8 {
        rows,
        cols,
        q,
        scales,
    })
}

/// Which kernel [`quant_matmul_on`] runs (`molora_quant_kernel` in `cuda/include/molora.h`); both
/// give the CPU reference's result within the f32 tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKernel {
    /// GEMV for `T <= 16`, else GEMM.
    Auto,
    /// One warp per output row and tile of 16 tokens; up to 65535·16 tokens.
    Gemv,
    /// 64 tokens × 64 output rows per block, the weight dequantised once per block into shared memory
    /// and reused by its 64 tokens; up to 65535·64 tokens.
    Gemm,
}

/// The quantised base matmul `y[t, o] = Σ_i x[t, i]·deq(W)[o, i] + bias[o]`, f32 `[T, rows]`, on
/// the kernel [`QuantKernel::Auto`] picks. GPU counterpart of [`crate::cpu::nf4_matmul`] /
/// [`crate::cpu::int8_matmul`].
pub fn quant_matmul<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    num_tokens: usize,
    w: &DeviceQuantWeight,
    bias: Option<&CudaView<'_, T>>,
    y: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    quant_matmul_on(dev, x, num_tokens, w, bias, y, QuantKernel::Auto)
}

/// [`quant_matmul`] on an explicit kernel ([`QuantKernel`]).
pub fn quant_matmul_on<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    num_tokens: usize,
    w: &DeviceQuantWeight,
    bias: Option<&CudaView<'_, T>>,
    y: &mut impl DevicePtrMut<f32>,
    kernel: QuantKernel,
) -> Result<()> {
    let (rows, cols) = (w.rows(), w.cols());
    check_len("x [T, d_in]", num_tokens * cols, x.len())?;
    if let Some(b) = bias {
        check_len("bias [d_out]", rows, b.len())?;
    }
    check_len("y [T, d_out]", num_tokens * rows, y.len())?;
    let kernel = match kernel {
        QuantKernel::Auto if num_tokens <= 16 => QuantKernel::Gemv,
        QuantKernel::Auto => QuantKernel::Gemm,
        k => k,
    };
    let (tile, code) = match kernel {
        QuantKernel::Gemv => (16, ffi::MOLORA_QUANT_KERNEL_GEMV),
        _ => (64, ffi::MOLORA_QUANT_KERNEL_GEMM),
    };
    if num_tokens * rows.max(cols) > i32::MAX as usize || num_tokens.div_ceil(tile) > 65535 {
        return Err(Error::Unsupported {
            op: "quant_matmul",
            what: format!("{num_tokens} tokens of {cols} -> {rows} on the {kernel:?} kernel (indices must fit an i32, at most 65535·{tile} tokens)"),
        });
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (y_ptr, _g1) = y.device_ptr_mut(stream);
    let b = bias.map(|b| b.device_ptr(stream));
    let (packed, q, scales) = match w {
        DeviceQuantWeight::Nf4 { packed, absmax, .. } => (
            Some(packed.device_ptr(stream)),
            None,
            absmax.device_ptr(stream),
        ),
        DeviceQuantWeight::Int8 { q, scales, .. } => {
            (None, Some(q.device_ptr(stream)), scales.device_ptr(stream))
        }
    };
    let args = ffi::molora_quant_matmul_args {
        x: x_ptr as *const _,
        packed: packed
            .as_ref()
            .map_or(std::ptr::null(), |p| p.0 as *const u8),
        q: q.as_ref().map_or(std::ptr::null(), |p| p.0 as *const i8),
        scales: scales.0 as *const f32,
        bias: b.as_ref().map_or(std::ptr::null(), |p| p.0 as *const _),
        y: y_ptr as *mut f32,
        num_tokens: num_tokens as i32,
        rows: rows as i32,
        cols: cols as i32,
        kernel: code as i32,
    };
    // SAFETY: x holds T·cols, y T·rows, bias rows elements (checked); the weight's buffers were
    // allocated for rows·cols (codes) and its scales, exactly one of packed / q is set; all indices
    // fit an i32 and the token tiles fit the grid. The guards order every buffer on `stream`.
    let code = unsafe { T::QUANT_MATMUL(&args, dev.raw_stream()) };
    check_launch("quant_matmul", code)
}
