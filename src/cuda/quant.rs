//! Quantised base weights on the GPU (`cuda/quant.cu`): NF4 and int8 quantisation giving exactly
//! the CPU reference's codes and scales, and the dequantising matmul. GPU counterparts of
//! [`crate::cpu::quantize_nf4`], [`crate::cpu::quantize_int8`], [`crate::cpu::nf4_matmul`] and
//! [`crate::cpu::int8_matmul`].

use super::device::Device;
use super::ffi;
use super::launch::Launch;
use super::lora::CudaElement;
use super::memory::{check_memory, Buffer, DeviceRead, DeviceWrite};
use crate::error::check_len;
use crate::quant::{check_dims, Int8Weight, Nf4Weight, NF4_BLOCK};
use crate::{Error, Result};

/// A quantised weight `[rows, cols]` in device memory.
#[derive(Debug)]
pub enum DeviceQuantWeight {
    /// Packed NF4 codes (`ceil(n/2)` bytes) and one absmax per block of 64.
    Nf4 {
        rows: usize,
        cols: usize,
        packed: Buffer<u8>,
        absmax: Buffer<f32>,
    },
    /// Int8 codes `[rows, cols]` and one scale per row.
    Int8 {
        rows: usize,
        cols: usize,
        q: Buffer<i8>,
        scales: Buffer<f32>,
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
    w: &impl DeviceRead<T>,
    rows: usize,
    cols: usize,
) -> Result<DeviceQuantWeight> {
    const OP: &str = "quantize_nf4";
    let n = check_dims(rows, cols)?;
    check_len("weight [rows, cols]", n, w.len())?;
    // The input's memory kind before anything is allocated.
    check_memory(dev, "weight [rows, cols]", w)?;
    let mut packed = dev.zeros::<u8>(n.div_ceil(2))?;
    let mut absmax = dev.zeros::<f32>(n.div_ceil(NF4_BLOCK))?;
    {
        let mut l = Launch::new(dev, OP);
        let w = l.input("weight [rows, cols]", w, n)?;
        let packed = l.output_any("NF4 codes", &mut packed)?;
        let scales = l.output_any("NF4 absmax", &mut absmax)?;
        let args = ffi::molora_quantize_args {
            w: w.cast(),
            packed,
            q: std::ptr::null_mut(),
            scales,
            rows: rows as i32,
            cols: cols as i32,
        };
        // SAFETY: w holds rows·cols elements (checked), packed ceil(n/2) bytes and absmax ceil(n/64)
        // floats (allocated above); n fits an i32. The launch orders the buffers on the device.
        unsafe { l.run(&T::QUANTIZE_NF4, &args) }?;
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
    w: &impl DeviceRead<T>,
    rows: usize,
    cols: usize,
) -> Result<DeviceQuantWeight> {
    const OP: &str = "quantize_int8";
    let n = check_dims(rows, cols)?;
    check_len("weight [rows, cols]", n, w.len())?;
    // The input's memory kind before anything is allocated.
    check_memory(dev, "weight [rows, cols]", w)?;
    let mut q = dev.zeros::<i8>(n)?;
    let mut scales = dev.zeros::<f32>(rows)?;
    {
        let mut l = Launch::new(dev, OP);
        let w = l.input("weight [rows, cols]", w, n)?;
        let q = l.output_any("int8 codes", &mut q)?;
        let scales = l.output_any("int8 scales", &mut scales)?;
        let args = ffi::molora_quantize_args {
            w: w.cast(),
            packed: std::ptr::null_mut(),
            q,
            scales,
            rows: rows as i32,
            cols: cols as i32,
        };
        // SAFETY: w and q hold rows·cols elements, scales rows floats; n fits an i32.
        unsafe { l.run(&T::QUANTIZE_INT8, &args) }?;
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
    x: &impl DeviceRead<T>,
    num_tokens: usize,
    w: &DeviceQuantWeight,
    bias: Option<&dyn DeviceRead<T>>,
    y: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    quant_matmul_on(dev, x, num_tokens, w, bias, y, QuantKernel::Auto)
}

/// [`quant_matmul`] on an explicit kernel ([`QuantKernel`]).
pub fn quant_matmul_on<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    num_tokens: usize,
    w: &DeviceQuantWeight,
    bias: Option<&dyn DeviceRead<T>>,
    y: &mut impl DeviceWrite<f32>,
    kernel: QuantKernel,
) -> Result<()> {
    const OP: &str = "quant_matmul";
    let (rows, cols) = (w.rows(), w.cols());
    let kernel = match kernel {
        QuantKernel::Auto if num_tokens <= 16 => QuantKernel::Gemv,
        QuantKernel::Auto => QuantKernel::Gemm,
        k => k,
    };
    let (tile, code) = match kernel {
        QuantKernel::Gemv => (16, ffi::MOLORA_QUANT_KERNEL_GEMV),
        _ => (64, ffi::MOLORA_QUANT_KERNEL_GEMM),
    };
    if !fits_launch(num_tokens, rows, cols, tile) {
        return Err(Error::Unsupported {
            op: OP,
            what: format!("{num_tokens} tokens of {cols} -> {rows} on the {kernel:?} kernel (indices must fit an i32, at most 65535·{tile} tokens)"),
        });
    }
    let mut l = Launch::new(dev, OP);
    let x = l.input("x [T, d_in]", x, num_tokens * cols)?;
    let bias = match bias {
        Some(b) => l.input("bias [d_out]", b, rows)?,
        None => std::ptr::null(),
    };
    let y = l.output("y [T, d_out]", y, num_tokens * rows)?;
    let (packed, q, scales) = w.bind(&mut l)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let args = ffi::molora_quant_matmul_args {
        x: x.cast(),
        packed,
        q,
        scales,
        bias: bias.cast(),
        y,
        num_tokens: num_tokens as i32,
        rows: rows as i32,
        cols: cols as i32,
        kernel: code as i32,
    };
    // SAFETY: x holds T·cols, y T·rows, bias rows elements (checked); the weight's buffers were
    // allocated for rows·cols (codes) and its scales, exactly one of packed / q is set; all indices
    // fit an i32 and the token tiles fit the grid. The launch orders every buffer on the device.
    unsafe { l.run(&T::QUANT_MATMUL, &args) }
}

/// The quantised matmul's backward to its input (the weight is frozen):
/// `dx[t, i] = Σ_o dy[t, o]·deq(W)[o, i]`, f32 `[T, cols]`, from `dy` `[T, rows]` on the device,
/// without dequantising the weight into a dense copy. GPU counterpart of
/// [`crate::cpu::quant_matmul_dx`]. Asynchronous.
pub fn quant_matmul_dx<T: CudaElement>(
    dev: &Device,
    dy: &impl DeviceRead<T>,
    num_tokens: usize,
    w: &DeviceQuantWeight,
    dx: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    const OP: &str = "quant_matmul_dx";
    let (rows, cols) = (w.rows(), w.cols());
    if !fits_launch(num_tokens, rows, cols, 64) {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "{num_tokens} tokens of {rows} -> {cols} (indices must fit an i32, at most 65535·64 tokens)"
            ),
        });
    }
    let mut l = Launch::new(dev, OP);
    let dy = l.input("dy [T, d_out]", dy, num_tokens * rows)?;
    let dx = l.output("dx [T, d_in]", dx, num_tokens * cols)?;
    let (packed, q, scales) = w.bind(&mut l)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let args = ffi::molora_quant_matmul_dx_args {
        dy: dy.cast(),
        packed,
        q,
        scales,
        dx,
        num_tokens: num_tokens as i32,
        rows: rows as i32,
        cols: cols as i32,
    };
    // SAFETY: dy holds T·rows and dx T·cols elements (checked); the weight's buffers were allocated
    // for rows·cols codes and their scales, exactly one of packed / q is set; every index fits an i32
    // and the token tiles fit the grid.
    unsafe { l.run(&T::QUANT_MATMUL_DX, &args) }
}

/// Whether `T` tokens of a `[rows, cols]` weight fit the matmul kernels: every index an i32, and at
/// most 65535 tiles of `tile` tokens.
fn fits_launch(num_tokens: usize, rows: usize, cols: usize, tile: usize) -> bool {
    num_tokens
        .checked_mul(rows.max(cols))
        .is_some_and(|n| n <= i32::MAX as usize)
        && num_tokens.div_ceil(tile) <= 65535
}

impl DeviceQuantWeight {
    /// The weight's buffers as a launch's inputs: `(packed, q, scales)`, the codes of the other format
    /// null, as the kernels' argument structs take them.
    fn bind<'a>(&'a self, l: &mut Launch<'a>) -> Result<(*const u8, *const i8, *const f32)> {
        Ok(match self {
            DeviceQuantWeight::Nf4 { packed, absmax, .. } => (
                l.input_any("NF4 codes", packed)?,
                std::ptr::null(),
                l.input_any("NF4 absmax", absmax)?,
            ),
            DeviceQuantWeight::Int8 { q, scales, .. } => (
                std::ptr::null(),
                l.input_any("int8 codes", q)?,
                l.input_any("int8 scales", scales)?,
            ),
        })
    }
}
