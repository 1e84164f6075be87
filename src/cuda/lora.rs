//! Grouped LoRA on the GPU (`cuda/lora.cu`): shrink and expand over expert segments (gather and
//! scatter/combine fused) and over sequence segments (SGMV), and SAML's weight-space mixing. Each op
//! is the GPU counterpart of the [`crate::cpu`] function of the same name, with device buffers.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::device::Device;
use super::dispatch::DevicePlan;
use super::ffi;
use super::launch::{Kernel, Launch};
use super::memory::{Buffer, BufferView, DeviceRead, DeviceWrite};
use crate::error::check_len;
use crate::gate::check_scale;
use crate::{AdapterSegments, DType, Element, Error, LoraShape, Result};

/// An element type with CUDA kernels: f32, f16 and bf16.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {
    #[doc(hidden)]
    const SHRINK: Kernel<ffi::molora_lora_shrink_args>;
    #[doc(hidden)]
    const EXPAND: Kernel<ffi::molora_lora_expand_args>;
    #[doc(hidden)]
    const MIX: Kernel<ffi::molora_mix_args>;
    #[doc(hidden)]
    const ROUTER_LOGITS: Kernel<ffi::molora_router_logits_args>;
    #[doc(hidden)]
    const QUANTIZE_NF4: Kernel<ffi::molora_quantize_args>;
    #[doc(hidden)]
    const QUANTIZE_INT8: Kernel<ffi::molora_quantize_args>;
    #[doc(hidden)]
    const QUANT_MATMUL: Kernel<ffi::molora_quant_matmul_args>;
    #[doc(hidden)]
    const QUANT_MATMUL_DX: Kernel<ffi::molora_quant_matmul_dx_args>;
    #[doc(hidden)]
    const LORA_BACKWARD: Kernel<ffi::molora_lora_backward_args>;
    #[doc(hidden)]
    const ROUTER_BACKWARD: Kernel<ffi::molora_router_backward_args>;
    #[doc(hidden)]
    const MIX_BACKWARD: Kernel<ffi::molora_mix_backward_args>;
    #[doc(hidden)]
    const GATHER_ROWS: Kernel<ffi::molora_gather_rows_args>;
    #[doc(hidden)]
    const SCATTER_COMBINE: Kernel<ffi::molora_scatter_combine_args>;
    #[doc(hidden)]
    const LORA_BACKWARD_DENSE: Kernel<ffi::molora_lora_backward_dense_args>;
    /// The dense-gated LoRA part on tensor cores (`cuda/dense_gated.cu`); none for f32.
    #[doc(hidden)]
    const DENSE_GATED_TC: Option<Kernel<ffi::molora_dense_gated_args>>;
    /// The fused decode of the dense-gated forward (router, gate, shrink; expand); none for f32.
    #[doc(hidden)]
    const DENSE_GATED_DECODE: Option<Kernel<ffi::molora_dense_gated_decode_args>>;
}

impl CudaElement for f32 {
    const SHRINK: Kernel<ffi::molora_lora_shrink_args> =
        kernel!(molora_lora_shrink_f32, molora_emu_lora_shrink_f32);
    const EXPAND: Kernel<ffi::molora_lora_expand_args> =
        kernel!(molora_lora_expand_f32, molora_emu_lora_expand_f32);
    const MIX: Kernel<ffi::molora_mix_args> = kernel!(molora_mix_f32, molora_emu_mix_f32);
    const ROUTER_LOGITS: Kernel<ffi::molora_router_logits_args> =
        kernel!(molora_router_logits_f32, molora_emu_router_logits_f32);
    const QUANTIZE_NF4: Kernel<ffi::molora_quantize_args> =
        kernel!(molora_quantize_nf4_f32, molora_emu_quantize_nf4_f32);
    const QUANTIZE_INT8: Kernel<ffi::molora_quantize_args> =
        kernel!(molora_quantize_int8_f32, molora_emu_quantize_int8_f32);
    const QUANT_MATMUL: Kernel<ffi::molora_quant_matmul_args> =
        kernel!(molora_quant_matmul_f32, molora_emu_quant_matmul_f32);
    const QUANT_MATMUL_DX: Kernel<ffi::molora_quant_matmul_dx_args> =
        kernel!(molora_quant_matmul_dx_f32, molora_emu_quant_matmul_dx_f32);
    const LORA_BACKWARD: Kernel<ffi::molora_lora_backward_args> =
        kernel!(molora_lora_backward_f32, molora_emu_lora_backward_f32);
    const ROUTER_BACKWARD: Kernel<ffi::molora_router_backward_args> =
        kernel!(molora_router_backward_f32, molora_emu_router_backward_f32);
    const MIX_BACKWARD: Kernel<ffi::molora_mix_backward_args> =
        kernel!(molora_mix_backward_f32, molora_emu_mix_backward_f32);
    const GATHER_ROWS: Kernel<ffi::molora_gather_rows_args> =
        kernel!(molora_gather_rows_f32, molora_emu_gather_rows_f32);
    const SCATTER_COMBINE: Kernel<ffi::molora_scatter_combine_args> =
        kernel!(molora_scatter_combine_f32, molora_emu_scatter_combine_f32);
    const LORA_BACKWARD_DENSE: Kernel<ffi::molora_lora_backward_dense_args> = kernel!(
        molora_lora_backward_dense_f32,
        molora_emu_lora_backward_dense_f32
    );
    const DENSE_GATED_TC: Option<Kernel<ffi::molora_dense_gated_args>> = None;
    const DENSE_GATED_DECODE: Option<Kernel<ffi::molora_dense_gated_decode_args>> = None;
}
impl CudaElement for f16 {
    const SHRINK: Kernel<ffi::molora_lora_shrink_args> =
        kernel!(molora_lora_shrink_f16, molora_emu_lora_shrink_f16);
    const EXPAND: Kernel<ffi::molora_lora_expand_args> =
        kernel!(molora_lora_expand_f16, molora_emu_lora_expand_f16);
    const MIX: Kernel<ffi::molora_mix_args> = kernel!(molora_mix_f16, molora_emu_mix_f16);
    const ROUTER_LOGITS: Kernel<ffi::molora_router_logits_args> =
        kernel!(molora_router_logits_f16, molora_emu_router_logits_f16);
    const QUANTIZE_NF4: Kernel<ffi::molora_quantize_args> =
        kernel!(molora_quantize_nf4_f16, molora_emu_quantize_nf4_f16);
    const QUANTIZE_INT8: Kernel<ffi::molora_quantize_args> =
        kernel!(molora_quantize_int8_f16, molora_emu_quantize_int8_f16);
    const QUANT_MATMUL: Kernel<ffi::molora_quant_matmul_args> =
        kernel!(molora_quant_matmul_f16, molora_emu_quant_matmul_f16);
    const QUANT_MATMUL_DX: Kernel<ffi::molora_quant_matmul_dx_args> =
        kernel!(molora_quant_matmul_dx_f16, molora_emu_quant_matmul_dx_f16);
    const LORA_BACKWARD: Kernel<ffi::molora_lora_backward_args> =
        kernel!(molora_lora_backward_f16, molora_emu_lora_backward_f16);
    const ROUTER_BACKWARD: Kernel<ffi::molora_router_backward_args> =
        kernel!(molora_router_backward_f16, molora_emu_router_backward_f16);
    const MIX_BACKWARD: Kernel<ffi::molora_mix_backward_args> =
        kernel!(molora_mix_backward_f16, molora_emu_mix_backward_f16);
    const GATHER_ROWS: Kernel<ffi::molora_gather_rows_args> =
        kernel!(molora_gather_rows_f16, molora_emu_gather_rows_f16);
    const SCATTER_COMBINE: Kernel<ffi::molora_scatter_combine_args> =
        kernel!(molora_scatter_combine_f16, molora_emu_scatter_combine_f16);
    const LORA_BACKWARD_DENSE: Kernel<ffi::molora_lora_backward_dense_args> = kernel!(
        molora_lora_backward_dense_f16,
        molora_emu_lora_backward_dense_f16
    );
    const DENSE_GATED_TC: Option<Kernel<ffi::molora_dense_gated_args>> =
        Some(kernel!(molora_dense_gated_f16, molora_emu_dense_gated_f16));
    const DENSE_GATED_DECODE: Option<Kernel<ffi::molora_dense_gated_decode_args>> = Some(kernel!(
        molora_dense_gated_decode_f16,
        molora_emu_dense_gated_decode_f16
    ));
}
impl CudaElement for bf16 {
    const SHRINK: Kernel<ffi::molora_lora_shrink_args> =
        kernel!(molora_lora_shrink_bf16, molora_emu_lora_shrink_bf16);
    const EXPAND: Kernel<ffi::molora_lora_expand_args> =
        kernel!(molora_lora_expand_bf16, molora_emu_lora_expand_bf16);
    const MIX: Kernel<ffi::molora_mix_args> = kernel!(molora_mix_bf16, molora_emu_mix_bf16);
    const ROUTER_LOGITS: Kernel<ffi::molora_router_logits_args> =
        kernel!(molora_router_logits_bf16, molora_emu_router_logits_bf16);
    const QUANTIZE_NF4: Kernel<ffi::molora_quantize_args> =
        kernel!(molora_quantize_nf4_bf16, molora_emu_quantize_nf4_bf16);
    const QUANTIZE_INT8: Kernel<ffi::molora_quantize_args> =
        kernel!(molora_quantize_int8_bf16, molora_emu_quantize_int8_bf16);
    const QUANT_MATMUL: Kernel<ffi::molora_quant_matmul_args> =
        kernel!(molora_quant_matmul_bf16, molora_emu_quant_matmul_bf16);
    const QUANT_MATMUL_DX: Kernel<ffi::molora_quant_matmul_dx_args> =
        kernel!(molora_quant_matmul_dx_bf16, molora_emu_quant_matmul_dx_bf16);
    const LORA_BACKWARD: Kernel<ffi::molora_lora_backward_args> =
        kernel!(molora_lora_backward_bf16, molora_emu_lora_backward_bf16);
    const ROUTER_BACKWARD: Kernel<ffi::molora_router_backward_args> =
        kernel!(molora_router_backward_bf16, molora_emu_router_backward_bf16);
    const MIX_BACKWARD: Kernel<ffi::molora_mix_backward_args> =
        kernel!(molora_mix_backward_bf16, molora_emu_mix_backward_bf16);
    const GATHER_ROWS: Kernel<ffi::molora_gather_rows_args> =
        kernel!(molora_gather_rows_bf16, molora_emu_gather_rows_bf16);
    const SCATTER_COMBINE: Kernel<ffi::molora_scatter_combine_args> =
        kernel!(molora_scatter_combine_bf16, molora_emu_scatter_combine_bf16);
    const LORA_BACKWARD_DENSE: Kernel<ffi::molora_lora_backward_dense_args> = kernel!(
        molora_lora_backward_dense_bf16,
        molora_emu_lora_backward_dense_bf16
    );
    const DENSE_GATED_TC: Option<Kernel<ffi::molora_dense_gated_args>> = Some(kernel!(
        molora_dense_gated_bf16,
        molora_emu_dense_gated_bf16
    ));
    const DENSE_GATED_DECODE: Option<Kernel<ffi::molora_dense_gated_decode_args>> = Some(kernel!(
        molora_dense_gated_decode_bf16,
        molora_emu_dense_gated_decode_bf16
    ));
}

/// Sequence segments with one adapter each, in device memory (from a validated [`AdapterSegments`]).
#[derive(Debug)]
pub struct DeviceSegments {
    num_rows: usize,
    num_segments: usize,
    num_adapters: usize,
    offsets: Buffer<i32>,
    adapter_ids: Buffer<i32>,
}

impl DeviceSegments {
    /// Uploads the offsets and adapter ids (enqueued on `dev`'s stream).
    pub fn new(dev: &Device, segs: &AdapterSegments) -> Result<Self> {
        Ok(DeviceSegments {
            num_rows: segs.segments().num_rows(),
            num_segments: segs.segments().num_segments(),
            num_adapters: segs.num_adapters(),
            offsets: dev.upload(&segs.segments().offsets_i32())?,
            adapter_ids: dev.upload(segs.adapter_ids())?,
        })
    }
    pub fn num_rows(&self) -> usize {
        self.num_rows
    }
    pub fn num_segments(&self) -> usize {
        self.num_segments
    }

    /// Device addresses of the offsets and adapter ids, for a launch.
    fn bind<'a>(&'a self, l: &mut Launch<'a>) -> Result<(*const i32, *const i32)> {
        Ok((
            l.input_any("segment offsets", &self.offsets)?,
            l.input_any("segment adapter ids", &self.adapter_ids)?,
        ))
    }
}

fn check_experts(op: &'static str, shape: &LoraShape, num_experts: usize) -> Result<()> {
    if shape.num_experts != num_experts {
        return Err(Error::LengthMismatch {
            what: if op.contains("segments") {
                "adapters of the segments vs shape.num_experts"
            } else {
                "experts of the plan vs shape.num_experts"
            },
            expected: shape.num_experts,
            got: num_experts,
        });
    }
    Ok(())
}

fn fits_i32(what: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::InvalidDim {
        what,
        value: n,
        reason: "must fit in an i32",
    })
}

/// Which kernel variant a LoRA shrink or expand runs (`molora_lora_path` in `cuda/include/molora.h`).
/// All give the CPU reference's result within the per-dtype tolerance; the vectorised and staged
/// expands give the plain one's bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// The launcher picks: for the shrink, [`KernelPath::Rows`] for f32 and for up to 256 rows
    /// (`T·k_max`), else [`KernelPath::TensorCore`]; for the expand, [`KernelPath::Staged`] when `B`
    /// fits in shared memory and `T > 4`, else 16-byte loads when aligned, else plain. The rule follows the
    /// kernel-variant table of `cuda::bench` on an H200.
    Auto,
    /// Scalar loads: any shape and alignment.
    Plain,
    /// 16-byte loads: the shrink needs `d_in`, the expand `r`, a multiple of `16 / sizeof(T)`, and
    /// the weights (and `x`) 16-byte aligned.
    Vectorized,
    /// Shrink only, f16/bf16 only: warp-level mma (wmma 16×16×16) with f32 accumulation, any shape;
    /// when `d_in` is a multiple of 8 and `x`, `A` are 16-byte aligned, 16-row tiles whose 4 warps
    /// split `d_in`, each fed by its own `cp.async` pipeline (partials summed in warp order), else
    /// one-stage 32-row tiles.
    TensorCore,
    /// Shrink only, any dtype and shape: a warp per (row, 4 rank columns) striding over `d_in`, no
    /// tiling. For few rows (small `T`), where tiles would leave most of the GPU idle.
    Rows,
    /// Expand only, any dtype and rank: each block copies its 64 output columns of every expert's
    /// `B` into shared memory once, then stages its tokens' routing and `h` and sums from shared
    /// memory. Needs `E·r` ≤ [`staged_expand_max_columns`] (868 for f16/bf16, 434 for f32).
    Staged,
}

impl KernelPath {
    /// Every variant, for tests and benches that cover them all.
    pub const ALL: [KernelPath; 6] = [
        KernelPath::Auto,
        KernelPath::Plain,
        KernelPath::Vectorized,
        KernelPath::TensorCore,
        KernelPath::Rows,
        KernelPath::Staged,
    ];
}

/// Largest `E·r` the staged expand takes for elements of `elem_bytes` bytes: `B`'s 64 columns of
/// every expert, as 33 column pairs per row, in 112 KiB of shared memory (868 for f16/bf16, 434 for
/// f32).
pub const fn staged_expand_max_columns(elem_bytes: usize) -> usize {
    112 * 1024 / (66 * elem_bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoraKernel {
    Shrink,
    Expand,
}

/// The C code of `path`, or [`Error::Unsupported`] naming why this call cannot take it for `shape`
/// (the vectorised condition is on `d_in` for the shrink and on `r` for the expand); `ptrs` are the
/// device addresses that 16-byte loads read from.
fn resolve_path<T: CudaElement>(
    op: &'static str,
    path: KernelPath,
    kernel: LoraKernel,
    shape: &LoraShape,
    ptrs: &[*const T],
) -> Result<i32> {
    let (dim_name, dim) = match kernel {
        LoraKernel::Shrink => ("d_in", shape.d_in),
        LoraKernel::Expand => ("rank", shape.rank),
    };
    let columns = shape.num_experts * shape.rank;
    // The variants that exist for one of the two kernels only.
    let only_for = match path {
        KernelPath::TensorCore | KernelPath::Rows => Some(LoraKernel::Shrink),
        KernelPath::Staged => Some(LoraKernel::Expand),
        KernelPath::Auto | KernelPath::Plain | KernelPath::Vectorized => None,
    };
    if let Some(other) = only_for.filter(|&k| k != kernel) {
        return Err(Error::Unsupported {
            op,
            what: format!("the {path:?} kernel (a {other:?} variant) for the {kernel:?}"),
        });
    }
    let code = match path {
        KernelPath::Auto => ffi::MOLORA_LORA_PATH_AUTO,
        KernelPath::Plain => ffi::MOLORA_LORA_PATH_PLAIN,
        KernelPath::Vectorized => {
            let v = 16 / std::mem::size_of::<T>();
            if dim % v != 0 {
                return Err(Error::Unsupported {
                    op,
                    what: format!(
                        "the vectorised kernel with {dim_name} = {dim} (needs a multiple of {v} for {:?})",
                        T::DTYPE
                    ),
                });
            }
            if let Some(p) = ptrs.iter().map(|&p| p as usize).find(|&p| p % 16 != 0) {
                return Err(Error::Unsupported {
                    op,
                    what: format!(
                        "the vectorised kernel with a buffer at device address {p:#x} (needs 16-byte alignment; offset {} bytes)",
                        p % 16
                    ),
                });
            }
            ffi::MOLORA_LORA_PATH_VECTOR
        }
        KernelPath::TensorCore => {
            if T::DTYPE == DType::F32 {
                return Err(Error::Unsupported {
                    op,
                    what: "the tensor-core kernel with f32 inputs (it takes f16 and bf16)".into(),
                });
            }
            ffi::MOLORA_LORA_PATH_TENSOR
        }
        KernelPath::Rows => ffi::MOLORA_LORA_PATH_ROWS,
        KernelPath::Staged => {
            let max = staged_expand_max_columns(std::mem::size_of::<T>());
            if columns > max {
                return Err(Error::Unsupported {
                    op,
                    what: format!(
                        "the staged expand with E·r = {columns} (its shared memory holds up to {max} for {:?})",
                        T::DTYPE
                    ),
                });
            }
            ffi::MOLORA_LORA_PATH_STAGED
        }
    };
    Ok(code as i32)
}

/// Grouped shrink over expert segments with the gather fused:
/// `h[p, j] = Σ_i x[token(p), i]·A[e(p), j, i]`, `h` f32 `[T·k_max, r]` in the plan's sorted order
/// (rows past the number of pairs are not written). GPU counterpart of [`crate::cpu::shrink_experts`].
#[allow(clippy::too_many_arguments)]
pub fn shrink_experts<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    h: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    shrink_experts_on(dev, x, a, shape, plan, h, KernelPath::Auto)
}

/// [`shrink_experts`] on an explicit kernel variant ([`KernelPath`]); [`KernelPath::Auto`] is [`shrink_experts`].
/// A variant the shape, alignment or element type cannot take is an [`Error::Unsupported`] naming it.
#[allow(clippy::too_many_arguments)]
pub fn shrink_experts_on<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    h: &mut impl DeviceWrite<f32>,
    path: KernelPath,
) -> Result<()> {
    const OP: &str = "shrink_experts";
    check_experts(OP, shape, plan.num_experts())?;
    let slots = plan.num_tokens() * plan.k_max();
    let max_rows = fits_i32("T * k_max", slots)?;
    fits_i32("T * k_max * r", slots * shape.rank)?;
    // The element type and shape conditions of the variant, also when there is nothing to do.
    resolve_path::<T>(OP, path, LoraKernel::Shrink, shape, &[])?;
    let mut l = Launch::new(dev, OP);
    let x = l.input("x [T, d_in]", x, plan.num_tokens() * shape.d_in)?;
    let a = l.input("A [E, r, d_in]", a, shape.a_len())?;
    let h = l.output("h [T * k_max, r]", h, slots * shape.rank)?;
    let (offsets, sorted) = plan.bind_sorted(&mut l)?;
    if slots == 0 {
        return Ok(());
    }
    let path = resolve_path::<T>(OP, path, LoraKernel::Shrink, shape, &[x, a])?;
    let args = ffi::molora_lora_shrink_args {
        x: x.cast(),
        a: a.cast(),
        h,
        run_offsets: offsets,
        run_weight: std::ptr::null(),
        row_src: sorted,
        src_div: plan.k_max() as i32,
        max_rows,
        num_runs: shape.num_experts as i32,
        num_weights: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_in: shape.d_in as i32,
        path,
        b_rank: 0,
    };
    // SAFETY: x holds T·d_in, A E·r·d_in and h T·k_max·r elements (checked above); the plan was
    // allocated for this T, k_max and E, so its offsets hold E + 1 and its sorted slots T·k_max
    // entries, each a slot index < T·k_max (or -1 past the pairs, never read); dividing by k_max gives
    // a token < T. All sizes fit an i32. The launch keeps the buffers alive and ordered until the
    // kernel is enqueued.
    unsafe { l.run(&T::SHRINK, &args) }
}

/// Grouped expand with the scatter and weighted combine fused, deterministic:
/// `y[t, o] = round(y[t, o] + scale·Σ_s w_ts·Σ_j h[pos(t, s), j]·B[e_ts, o, j])`; tokens with no
/// active slot are not touched. `ids`/`weights` are the routing's `[T, k_max]`, `h` the output of
/// [`shrink_experts`] with the same plan. GPU counterpart of [`crate::cpu::expand_experts`].
#[allow(clippy::too_many_arguments)]
pub fn expand_experts<T: CudaElement>(
    dev: &Device,
    h: &impl DeviceRead<f32>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
) -> Result<()> {
    expand_experts_on(
        dev,
        h,
        b,
        shape,
        plan,
        ids,
        weights,
        scale,
        y,
        KernelPath::Auto,
    )
}

/// [`expand_experts`] on an explicit kernel variant ([`KernelPath`]); [`KernelPath::Auto`] is [`expand_experts`].
/// A variant the shape, alignment or element type cannot take is an [`Error::Unsupported`] naming it.
#[allow(clippy::too_many_arguments)]
pub fn expand_experts_on<T: CudaElement>(
    dev: &Device,
    h: &impl DeviceRead<f32>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
    path: KernelPath,
) -> Result<()> {
    expand_into(
        dev,
        "expand_experts",
        h,
        b,
        shape,
        plan,
        ids,
        Some(weights),
        scale,
        y,
        OutputColumns {
            stride: shape.d_out,
            offset: 0,
            what: "y [T, d_out]",
        },
        path,
    )
}

/// Where the expand writes: columns `offset..offset + d_out` of rows `stride` elements apart, `what`
/// naming `y` in errors.
#[derive(Clone, Copy)]
struct OutputColumns {
    stride: usize,
    offset: usize,
    what: &'static str,
}

impl OutputColumns {
    /// Checks that the columns fit the rows and that `y` (`y_len` elements) holds `T` rows, and
    /// returns `T·stride`.
    fn check(&self, t: usize, d_out: usize, y_len: usize) -> Result<usize> {
        crate::error::check_columns(self.stride, self.offset, d_out)?;
        let n = crate::error::checked_elems(self.what, t, self.stride, 4)?;
        fits_i32(self.what, n)?;
        crate::error::check_len(self.what, n, y_len)?;
        Ok(n)
    }
}

/// The expert-mode expand of [`expand_experts_on`] and [`add_lora`]: `y[t, offset + o] +=
/// scale·Σ_s w_ts·h·B_eᵀ` over the plan's slots, with `weights = None` meaning weight 1 for every
/// valid slot, and `y` `[T, stride]`.
#[allow(clippy::too_many_arguments)]
fn expand_into<T: CudaElement>(
    dev: &Device,
    op: &'static str,
    h: &(impl DeviceRead<f32> + ?Sized),
    b: &(impl DeviceRead<T> + ?Sized),
    shape: &LoraShape,
    plan: &DevicePlan,
    ids: &(impl DeviceRead<i32> + ?Sized),
    weights: Option<&dyn DeviceRead<f32>>,
    scale: f32,
    y: &mut (impl DeviceWrite<T> + ?Sized),
    cols: OutputColumns,
    path: KernelPath,
) -> Result<()> {
    check_experts(op, shape, plan.num_experts())?;
    check_scale(scale)?;
    let (t, k_max) = (plan.num_tokens(), plan.k_max());
    let slots = t * k_max;
    let y_len = cols.check(t, shape.d_out, y.len())?;
    // The element type and shape conditions of the variant, also when there is nothing to do.
    resolve_path::<T>(op, path, LoraKernel::Expand, shape, &[])?;
    let mut l = Launch::new(dev, op);
    let h = l.input("h [T * k_max, r]", h, slots * shape.rank)?;
    let b = l.input("B [E, d_out, r]", b, shape.b_len())?;
    let ids = l.input("routing ids [T, k_max]", ids, slots)?;
    let weights = match weights {
        Some(w) => l.input("routing weights [T, k_max]", w, slots)?,
        None => std::ptr::null(),
    };
    let y = l.output(cols.what, y, y_len)?;
    let inverse = plan.bind_inverse(&mut l)?;
    if t == 0 {
        return Ok(());
    }
    let path = resolve_path::<T>(op, path, LoraKernel::Expand, shape, &[b])?;
    let args = ffi::molora_lora_expand_args {
        h,
        b: b.cast(),
        // Column `offset` of row 0; offset + d_out ≤ stride (checked), so every row's columns lie
        // inside y.
        y: y.wrapping_add(cols.offset).cast(),
        ids,
        weights,
        slot_to_sorted: inverse,
        k_max: k_max as i32,
        h_dense: 0,
        seg_offsets: std::ptr::null(),
        adapter_ids: std::ptr::null(),
        num_segments: 0,
        scale,
        num_tokens: t as i32,
        num_weights: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_out: shape.d_out as i32,
        path,
        y_stride: cols.stride as i32,
    };
    // SAFETY: lengths checked above (h T·k_max·r, B E·d_out·r, ids and weights when given T·k_max,
    // y T·stride); the kernel writes y[t·stride + offset + o] for o < d_out, inside y since
    // offset + d_out ≤ stride. The plan's inverse holds T·k_max positions, each -1 or < T·k_max (a
    // row of h). The kernel skips ids outside [0, E) and reads no weights when they are NULL (weight
    // 1). Sizes fit an i32; the launch keeps the buffers alive and ordered.
    unsafe { l.run(&T::EXPAND, &args) }
}

/// Workspace of [`add_lora`] for `T` tokens and a [`LoraShape`]: the dispatch plan of the adapter
/// indices and the shrink's `h` `[T, r]`.
#[derive(Debug)]
pub struct AddLoraWorkspace {
    plan: DevicePlan,
    h: Buffer<f32>,
}

impl AddLoraWorkspace {
    /// Allocates the workspace (`T ≥ 1`).
    pub fn new(dev: &Device, num_tokens: usize, shape: &LoraShape) -> Result<Self> {
        Ok(AddLoraWorkspace {
            plan: DevicePlan::new(dev, num_tokens, 1, shape.num_experts)?,
            h: dev.zeros(crate::error::checked_elems(
                "h [T, r]", num_tokens, shape.rank, 4,
            )?)?,
        })
    }
}

/// punica's / vLLM's `add_lora` on the device, in place: `y[t, y_offset + o] += scale·((x_t·A_eᵀ)·B_eᵀ)[o]`
/// with `e = indices[t]` (one adapter per token; `-1`, or any id outside `0..E`, adds nothing), into
/// the columns `y_offset..y_offset + d_out` of `y` `[T, y_stride]`, so a packed QKV or gate-up output
/// takes each part's adapters. The tokens are grouped by adapter on the device ([`super::dispatch`]), then
/// the grouped shrink and the fused expand (weight 1, rows `y_stride` apart) run; nothing is copied
/// to the host. GPU counterpart of [`crate::cpu::ops::add_lora`] (which also rejects ids outside
/// `-1..E`; the device cannot check them without a sync).
#[allow(clippy::too_many_arguments)]
pub fn add_lora<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    indices: &impl DeviceRead<i32>,
    shape: &LoraShape,
    scale: f32,
    ws: &mut AddLoraWorkspace,
    y: &mut impl DeviceWrite<T>,
    y_stride: usize,
    y_offset: usize,
) -> Result<()> {
    const OP: &str = "add_lora";
    check_experts(OP, shape, ws.plan.num_experts())?;
    check_scale(scale)?;
    let cols = OutputColumns {
        stride: y_stride,
        offset: y_offset,
        what: "y [T, y_stride]",
    };
    let t = ws.plan.num_tokens();
    crate::error::check_len("indices [T] (vs the workspace's T)", t, indices.len())?;
    crate::error::check_len("x [T, d_in]", t * shape.d_in, x.len())?;
    // Everything the expand checks, before the dispatch and shrink start.
    cols.check(t, shape.d_out, y.len())?;
    super::dispatch(dev, indices, &mut ws.plan)?;
    shrink_experts(dev, x, a, shape, &ws.plan, &mut ws.h)?;
    expand_into(
        dev,
        OP,
        &ws.h,
        b,
        shape,
        &ws.plan,
        indices,
        None,
        scale,
        y,
        cols,
        KernelPath::Auto,
    )
}

/// Segmented (SGMV) shrink: `h[t, j] = Σ_i x[t, i]·A[adapter(seg(t)), j, i]`, zero rows for adapter
/// `-1`. `shape.num_experts` is the number of adapters. GPU counterpart of
/// [`crate::cpu::shrink_segments`].
#[allow(clippy::too_many_arguments)]
pub fn shrink_segments<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    shape: &LoraShape,
    segs: &DeviceSegments,
    h: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    shrink_segments_on(dev, x, a, shape, segs, h, KernelPath::Auto)
}

/// [`shrink_segments`] on an explicit kernel variant ([`KernelPath`]); [`KernelPath::Auto`] is [`shrink_segments`].
/// A variant the shape, alignment or element type cannot take is an [`Error::Unsupported`] naming it.
#[allow(clippy::too_many_arguments)]
pub fn shrink_segments_on<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    shape: &LoraShape,
    segs: &DeviceSegments,
    h: &mut impl DeviceWrite<f32>,
    path: KernelPath,
) -> Result<()> {
    const OP: &str = "shrink_segments";
    check_experts(OP, shape, segs.num_adapters)?;
    let t = segs.num_rows;
    fits_i32("T * r", t * shape.rank)?;
    // The element type and shape conditions of the variant, also when there is nothing to do.
    resolve_path::<T>(OP, path, LoraKernel::Shrink, shape, &[])?;
    let mut l = Launch::new(dev, OP);
    let x = l.input("x [T, d_in]", x, t * shape.d_in)?;
    let a = l.input("A [N, r, d_in]", a, shape.a_len())?;
    let h = l.output("h [T, r]", h, t * shape.rank)?;
    let (offsets, adapters) = segs.bind(&mut l)?;
    if t == 0 {
        return Ok(());
    }
    let path = resolve_path::<T>(OP, path, LoraKernel::Shrink, shape, &[x, a])?;
    let args = ffi::molora_lora_shrink_args {
        x: x.cast(),
        a: a.cast(),
        h,
        run_offsets: offsets,
        run_weight: adapters,
        row_src: std::ptr::null(),
        src_div: 1,
        max_rows: t as i32,
        num_runs: segs.num_segments as i32,
        num_weights: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_in: shape.d_in as i32,
        path,
        b_rank: 0,
    };
    // SAFETY: the segments were validated on the host (offsets from 0 non-decreasing to T, adapter
    // ids in [-1, N)) and uploaded whole; x, A and h have the lengths checked above; sizes fit an i32.
    unsafe { l.run(&T::SHRINK, &args) }
}

/// Segmented (SGMV) expand: `y[t, o] = round(y[t, o] + scale·Σ_j h[t, j]·B[adapter(seg(t)), o, j])`,
/// rows of adapter `-1` untouched. GPU counterpart of [`crate::cpu::expand_segments`].
#[allow(clippy::too_many_arguments)]
pub fn expand_segments<T: CudaElement>(
    dev: &Device,
    h: &impl DeviceRead<f32>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    segs: &DeviceSegments,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
) -> Result<()> {
    expand_segments_on(dev, h, b, shape, segs, scale, y, KernelPath::Auto)
}

/// [`expand_segments`] on an explicit kernel variant ([`KernelPath`]); [`KernelPath::Auto`] is [`expand_segments`].
/// A variant the shape, alignment or element type cannot take is an [`Error::Unsupported`] naming it.
#[allow(clippy::too_many_arguments)]
pub fn expand_segments_on<T: CudaElement>(
    dev: &Device,
    h: &impl DeviceRead<f32>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    segs: &DeviceSegments,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
    path: KernelPath,
) -> Result<()> {
    const OP: &str = "expand_segments";
    check_experts(OP, shape, segs.num_adapters)?;
    check_scale(scale)?;
    let t = segs.num_rows;
    fits_i32("T * d_out", t * shape.d_out)?;
    // The element type and shape conditions of the variant, also when there is nothing to do.
    resolve_path::<T>(OP, path, LoraKernel::Expand, shape, &[])?;
    let mut l = Launch::new(dev, OP);
    let h = l.input("h [T, r]", h, t * shape.rank)?;
    let b = l.input("B [N, d_out, r]", b, shape.b_len())?;
    let y = l.output("y [T, d_out]", y, t * shape.d_out)?;
    let (offsets, adapters) = segs.bind(&mut l)?;
    if t == 0 {
        return Ok(());
    }
    let path = resolve_path::<T>(OP, path, LoraKernel::Expand, shape, &[b])?;
    let args = ffi::molora_lora_expand_args {
        h,
        b: b.cast(),
        y: y.cast(),
        ids: std::ptr::null(),
        weights: std::ptr::null(),
        slot_to_sorted: std::ptr::null(),
        k_max: 0,
        h_dense: 0,
        seg_offsets: offsets,
        adapter_ids: adapters,
        num_segments: segs.num_segments as i32,
        scale,
        num_tokens: t as i32,
        num_weights: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_out: shape.d_out as i32,
        path,
        y_stride: 0,
    };
    // SAFETY: as for `shrink_segments`: validated segments uploaded whole, lengths checked above.
    unsafe { l.run(&T::EXPAND, &args) }
}

/// SAML weight-space mixing: `Ā_s = Σ_e p_se·A_e` (`[S, r, d_in]`) and `B̄_s = Σ_e p_se·B_e`
/// (`[S, d_out, r]`), f32 accumulation, rounded once. `probs` `[S, E]`. GPU counterpart of
/// [`crate::cpu::mix_experts`]; feed the outputs to [`shrink_segments`] / [`expand_segments`] with
/// [`AdapterSegments::identity`].
#[allow(clippy::too_many_arguments)]
pub fn mix_experts<T: CudaElement>(
    dev: &Device,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    probs: &impl DeviceRead<f32>,
    num_seqs: usize,
    a_mixed: &mut impl DeviceWrite<T>,
    b_mixed: &mut impl DeviceWrite<T>,
) -> Result<()> {
    const OP: &str = "mix_experts";
    let e = shape.num_experts;
    let per_a = shape.rank * shape.d_in;
    let per_b = shape.d_out * shape.rank;
    if num_seqs > 65535 {
        return Err(Error::Unsupported {
            op: OP,
            what: format!("{num_seqs} sequences (the mixing kernel handles up to 65535)"),
        });
    }
    let mut l = Launch::new(dev, OP);
    let a = l.input("A [E, r, d_in]", a, shape.a_len())?;
    let b = l.input("B [E, d_out, r]", b, shape.b_len())?;
    let probs = l.input("probs [S, E]", probs, num_seqs * e)?;
    let a_mixed = l.output("mixed A [S, r, d_in]", a_mixed, num_seqs * per_a)?;
    let b_mixed = l.output("mixed B [S, d_out, r]", b_mixed, num_seqs * per_b)?;
    if num_seqs == 0 {
        return Ok(());
    }
    for (w, out, per) in [(a, a_mixed, per_a), (b, b_mixed, per_b)] {
        let args = ffi::molora_mix_args {
            w: w.cast(),
            probs,
            out: out.cast(),
            num_experts: e as i32,
            num_seqs: num_seqs as i32,
            per_expert: per as i64,
        };
        // SAFETY: w holds E·per, out S·per and probs S·E elements (checked above); S <= 65535 and
        // E·per fits an i32 (LoraShape). The launch keeps every buffer alive until after both runs.
        unsafe { l.run(&T::MIX, &args) }?;
    }
    Ok(())
}

/// Largest `E·r` the dense-gated path takes: every expert's shrink is computed for every token.
pub const DENSE_GATED_MAX_COLUMNS: usize = 512;

/// Which LoRA forward path suits a shape: [`LoraPath::DenseGated`] (all experts' shrink as one pass
/// over `x`, no dispatch, two launches) when `E·r <= 256`, and up to `E·r <= 512` when its
/// tensor-core kernels apply (f16/bf16, `d_in` and `r` multiples of 8: their cost grows with `E·r`
/// but stays near the memory floor while `E·r` is a few hundred), else [`LoraPath::Segmented`]
/// (dispatch, then shrink / expand over expert segments, five launches). The thresholds are set
/// from the kernels' work, not yet from a measured sweep (`cuda::bench` prints one); both paths give
/// the same result and are reachable explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    DenseGated,
    Segmented,
}

impl LoraPath {
    pub fn for_shape(shape: &LoraShape, dtype: DType) -> Self {
        let columns = shape.num_experts * shape.rank;
        let tensor_cores = dtype != DType::F32 && shape.d_in % 8 == 0 && shape.rank % 8 == 0;
        if columns <= 256 || (tensor_cores && columns <= DENSE_GATED_MAX_COLUMNS) {
            LoraPath::DenseGated
        } else {
            LoraPath::Segmented
        }
    }
}

/// Workspace of the dense-gated path for `T` tokens: every expert's shrink `h` `[T, E·r]` (f32, which
/// the backward reads), the gated `hg = g ⊙ h` `[T, E·r]` in the element type (the tensor-core
/// expand's operand), the split-K partials and tickets of the tensor-core shrink, and the one-run
/// offsets `[0, T]` of the CUDA-core shrink. Allocate once per shape; [`lora_dense_gated`] allocates
/// nothing.
#[derive(Debug)]
pub struct DenseGatedWorkspace {
    pub(crate) num_tokens: usize,
    pub(crate) columns: usize,
    pub(crate) h: Buffer<f32>,
    pub(crate) hg: Buffer<u16>,
    pub(crate) config: DenseGatedConfig,
    partials: Buffer<f32>,
    tickets: Buffer<i32>,
    offsets: Buffer<i32>,
}

/// Multiprocessors of the device (132 on the emulated device, an H100/H200's count).
pub(crate) fn multiprocessors(dev: &Device) -> usize {
    match dev.backend() {
        super::device::Backend::Gpu { ctx, .. } => ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(132),
        #[cfg(feature = "emu")]
        super::device::Backend::Emulated => 132,
    }
}

/// Split-K factor of the tensor-core dense-gated shrink: enough blocks for two per multiprocessor
/// when the `64 × BN` output tiles alone do not give them, each split at least 8 k-steps of 32
/// (`d_in` ≥ 256 per split), at most 16.
pub fn dense_gated_splits(
    num_tokens: usize,
    columns: usize,
    d_in: usize,
    multiprocessors: usize,
) -> usize {
    split_k_factor(
        multiprocessors,
        dense_gated_tiles(num_tokens, columns),
        d_in.div_ceil(32),
        8,
        16,
    )
}

/// The split-K rule of every tensor-core GEMM that splits its sum (the dense-gated shrink, the
/// fused decode, the backward's sums over T): enough blocks for two per multiprocessor over
/// `tiles` output tiles, each split at least `min_steps` k-steps of the `k_steps` there are, between 1
/// and `max_splits`.
pub(crate) fn split_k_factor(
    multiprocessors: usize,
    tiles: usize,
    k_steps: usize,
    min_steps: usize,
    max_splits: usize,
) -> usize {
    (2 * multiprocessors)
        .div_ceil(tiles.max(1))
        .min(k_steps / min_steps.max(1))
        .clamp(1, max_splits)
}

/// Output tiles of the tensor-core dense-gated shrink (`64 × 64` for `E·r ≤ 64`, else `64 × 128`).
fn dense_gated_tiles(num_tokens: usize, columns: usize) -> usize {
    let bn = if columns <= 64 { 64 } else { 128 };
    num_tokens.div_ceil(ffi::MOLORA_DG_SHRINK_BM as usize) * columns.div_ceil(bn)
}

/// How the tensor-core dense-gated kernels run: the shrink's split over `d_in` and whether the
/// expand's operand `g ⊙ h` is rounded once to the element type or split into two terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseGatedConfig {
    /// The shrink's split-K factor, 1 ..= `ceil(d_in / 32)`.
    pub splits: usize,
    /// `g ⊙ h` as two terms of the element type (hi + lo, about 16 significant bits for bf16): the
    /// output's error is then the output rounding's alone (`tests/cuda_lora.rs` measures it), at
    /// twice the expand's products. Off: one rounding (relative RMS error 1.4× the output
    /// rounding's, measured there).
    pub two_term_h: bool,
}

impl DenseGatedConfig {
    /// The default for `num_tokens` tokens of `shape` on `dev`: [`dense_gated_splits`], one term.
    pub fn for_shape(dev: &Device, num_tokens: usize, shape: &LoraShape) -> Self {
        DenseGatedConfig {
            splits: dense_gated_splits(
                num_tokens,
                shape.num_experts * shape.rank,
                shape.d_in,
                multiprocessors(dev),
            ),
            two_term_h: false,
        }
    }
}

impl DenseGatedWorkspace {
    /// The workspace for `num_tokens` tokens of `shape`, configured by [`DenseGatedConfig::for_shape`].
    pub fn new(dev: &Device, num_tokens: usize, shape: &LoraShape) -> Result<Self> {
        Self::with_config(
            dev,
            num_tokens,
            shape,
            DenseGatedConfig::for_shape(dev, num_tokens, shape),
        )
    }

    /// [`DenseGatedWorkspace::new`] with a chosen configuration ([`Error::InvalidDim`] for a split
    /// count outside 1 ..= `ceil(d_in / 32)`); for precision, tests and the bench's sweep.
    pub fn with_config(
        dev: &Device,
        num_tokens: usize,
        shape: &LoraShape,
        config: DenseGatedConfig,
    ) -> Result<Self> {
        let splits = config.splits;
        let columns = shape.num_experts * shape.rank;
        if columns > DENSE_GATED_MAX_COLUMNS {
            return Err(Error::Unsupported {
                op: "lora_dense_gated",
                what: format!(
                    "E·r = {columns} (the dense-gated path takes up to {DENSE_GATED_MAX_COLUMNS}; use the segmented path)"
                ),
            });
        }
        if splits == 0 || splits > shape.d_in.div_ceil(32) {
            return Err(Error::InvalidDim {
                what: "splits",
                value: splits,
                reason: "the shrink splits d_in into 1 ..= ceil(d_in / 32) parts",
            });
        }
        let n = fits_i32("T * E * r", num_tokens * columns)? as usize;
        let terms = if config.two_term_h { 2 } else { 1 };
        let hg = fits_i32("2 * T * E * r", terms * n)? as usize;
        let partials = if splits > 1 {
            fits_i32("splits * T * E * r", splits * n)? as usize
        } else {
            1
        };
        Ok(DenseGatedWorkspace {
            num_tokens,
            columns,
            h: dev.zeros(n + 1)?,
            hg: dev.zeros(hg + 8)?,
            config,
            partials: dev.zeros(partials)?,
            tickets: dev.zeros(dense_gated_tiles(num_tokens, columns).max(1))?,
            offsets: dev.upload(&[0, num_tokens as i32])?,
        })
    }

    /// The configuration the tensor-core kernels run with.
    pub fn config(&self) -> DenseGatedConfig {
        self.config
    }

    /// Every expert's shrink of the last run, `h` `[T, E·r]` f32 (ungated; the backward reads it).
    pub fn h(&self) -> Result<BufferView<'_, f32>> {
        self.h.slice(0..self.num_tokens * self.columns)
    }
}

/// The dense-gated LoRA forward, without dispatch: `H = x·A_allᵀ` with `A_all` the `[E·r, d_in]`
/// view of the stacked `A` (one shrink over all experts), then the fused expand reading each active
/// slot's columns of `H`: `y[t, o] = round(y[t, o] + scale·Σ_s w_ts·Σ_j H[t, e_ts·r + j]·B[e_ts, o, j])`.
/// The same result as [`shrink_experts`] + [`expand_experts`] with the same routing; two launches.
/// [`lora_dense_gated_on`] with [`KernelPath::Auto`]: the tensor-core kernels where they apply.
#[allow(clippy::too_many_arguments)]
pub fn lora_dense_gated<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    k_max: usize,
    scale: f32,
    ws: &mut DenseGatedWorkspace,
    y: &mut impl DeviceWrite<T>,
) -> Result<()> {
    lora_dense_gated_on(
        dev,
        x,
        a,
        b,
        shape,
        ids,
        weights,
        k_max,
        scale,
        ws,
        y,
        KernelPath::Auto,
    )
}

/// Why the tensor-core dense-gated kernels cannot take this call, or `None` when they can: f16/bf16,
/// `d_in` and `r` multiples of 8, `x`, `A`, `B` 16-byte aligned.
pub(crate) fn dense_gated_tc_refusal<T: CudaElement>(
    shape: &LoraShape,
    ptrs: &[*const T],
) -> Option<String> {
    if T::DENSE_GATED_TC.is_none() {
        return Some(format!("{:?} inputs (it takes f16 and bf16)", T::DTYPE));
    }
    if shape.d_in % 8 != 0 || shape.rank % 8 != 0 {
        return Some(format!(
            "d_in = {}, r = {} (both must be multiples of 8)",
            shape.d_in, shape.rank
        ));
    }
    ptrs.iter()
        .map(|&p| p as usize)
        .find(|&p| p % 16 != 0)
        .map(|p| format!("a buffer at device address {p:#x} (needs 16-byte alignment)"))
}

/// [`lora_dense_gated`] on a chosen variant. [`KernelPath::TensorCore`]: K1, one mma.sync GEMM over
/// `x·A_allᵀ` whose epilogue writes `H` and the gated `hg = g ⊙ H` (`g[t, e] = Σ_{s: e_ts = e} w_ts`,
/// rounded once to the element type), split over `d_in` when the tiles alone do not fill the GPU
/// (summed in a fixed order: deterministic); K2, `y += scale·hg·B_allᵀ` as one mma.sync GEMM with
/// `K = E·r` (f16/bf16, `d_in` and `r` multiples of 8, 16-byte aligned `x`, `A`, `B`; otherwise
/// [`Error::Unsupported`] naming why). [`KernelPath::Auto`]: the tensor-core kernels where they
/// apply, else the CUDA-core shrink and expand. [`KernelPath::Plain`], [`KernelPath::Vectorized`],
/// [`KernelPath::Staged`]: the CUDA-core shrink (its own rule) and that expand.
#[allow(clippy::too_many_arguments)]
pub fn lora_dense_gated_on<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    k_max: usize,
    scale: f32,
    ws: &mut DenseGatedWorkspace,
    y: &mut impl DeviceWrite<T>,
    path: KernelPath,
) -> Result<()> {
    dense_gated_impl(
        dev, x, a, b, shape, ids, weights, k_max, scale, ws, y, path, false,
    )
}

/// [`lora_dense_gated_on`]; `after_gating`: the kernel before this call on the stream is the gating
/// that wrote `ids`/`weights`, and nothing before it is still running that writes `x` or `A`, so the
/// tensor-core shrink may start before it ends (programmatic dependent launch; `MoleLoraForward`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_gated_impl<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    k_max: usize,
    scale: f32,
    ws: &mut DenseGatedWorkspace,
    y: &mut impl DeviceWrite<T>,
    path: KernelPath,
    pdl: bool,
) -> Result<()> {
    const OP: &str = "lora_dense_gated";
    check_scale(scale)?;
    let t = ws.num_tokens;
    fits_i32("T * d_out", t * shape.d_out)?;
    fits_i32("T * d_in", t * shape.d_in)?;
    if k_max == 0 {
        return Err(Error::InvalidDim {
            what: "k_max",
            value: 0,
            reason: "a routing needs at least one slot per token",
        });
    }
    check_len(
        "workspace columns (E * r)",
        shape.num_experts * shape.rank,
        ws.columns,
    )?;
    if path == KernelPath::Rows {
        return Err(Error::Unsupported {
            op: OP,
            what: "the Rows kernel (a shrink variant) as the dense-gated expand".into(),
        });
    }
    if matches!(path, KernelPath::Auto | KernelPath::TensorCore) {
        let mut l = Launch::new(dev, OP);
        let xp = l.input("x [T, d_in]", x, t * shape.d_in)?;
        let ap = l.input("A [E, r, d_in]", a, shape.a_len())?;
        let bp = l.input("B [E, d_out, r]", b, shape.b_len())?;
        let refusal = dense_gated_tc_refusal::<T>(shape, &[xp, ap, bp]);
        match (refusal, T::DENSE_GATED_TC) {
            (None, Some(kernel)) => {
                let idp = l.input("routing ids [T, k_max]", ids, t * k_max)?;
                let wp = l.input("routing weights [T, k_max]", weights, t * k_max)?;
                let yp = l.output("y [T, d_out]", y, t * shape.d_out)?;
                let DenseGatedConfig { splits, two_term_h } = ws.config;
                let h = l.output_any("dense-gated workspace h", &mut ws.h)?;
                let hg = l.output_any("dense-gated workspace hg", &mut ws.hg)?;
                let partials = l.output_any("dense-gated workspace partials", &mut ws.partials)?;
                let tickets = l.output_any("dense-gated workspace tickets", &mut ws.tickets)?;
                if t == 0 {
                    return Ok(());
                }
                let args = ffi::molora_dense_gated_args {
                    x: xp.cast(),
                    a: ap.cast(),
                    b: bp.cast(),
                    y: yp.cast(),
                    ids: idp,
                    weights: wp,
                    h,
                    hg: hg.cast(),
                    partials: if splits > 1 {
                        partials
                    } else {
                        std::ptr::null_mut()
                    },
                    tickets,
                    k_max: k_max as i32,
                    num_tokens: t as i32,
                    num_experts: shape.num_experts as i32,
                    rank: shape.rank as i32,
                    d_in: shape.d_in as i32,
                    d_out: shape.d_out as i32,
                    splits: splits as i32,
                    hg_terms: if two_term_h { 2 } else { 1 },
                    pdl: pdl as i32,
                    scale,
                };
                // SAFETY: x, A, B, ids, weights and y hold the checked lengths; the workspace was
                // allocated for this T and E·r with `splits` partial planes and a zeroed ticket per
                // shrink tile (kernels leave them zeroed); alignment and the multiples of 8 were
                // checked above; ids outside [0, E) are skipped by the kernels.
                return unsafe { l.run(&kernel, &args) };
            }
            (Some(why), _) if path == KernelPath::TensorCore => {
                return Err(Error::Unsupported {
                    op: OP,
                    what: format!("the tensor-core dense-gated kernels with {why}"),
                });
            }
            _ => {}
        }
    }
    let expand_path = if path == KernelPath::TensorCore {
        KernelPath::Auto
    } else {
        path
    };
    let code = resolve_path::<T>(OP, expand_path, LoraKernel::Expand, shape, &[])?;
    let mut l = Launch::new(dev, OP);
    let b = l.input("B [E, d_out, r]", b, shape.b_len())?;
    let ids = l.input("routing ids [T, k_max]", ids, t * k_max)?;
    let weights = l.input("routing weights [T, k_max]", weights, t * k_max)?;
    let y = l.output("y [T, d_out]", y, t * shape.d_out)?;
    if expand_path == KernelPath::Vectorized {
        resolve_path::<T>(OP, expand_path, LoraKernel::Expand, shape, &[b])?;
    }
    // The workspace, x and A are checked by `dense_gated_shrink`, before it launches anything.
    dense_gated_shrink(dev, x, a, shape, ws)?;
    let h = l.input_any("dense-gated workspace h", &ws.h)?;
    if t == 0 {
        return Ok(());
    }
    let expand = ffi::molora_lora_expand_args {
        h,
        b: b.cast(),
        y: y.cast(),
        ids,
        weights,
        slot_to_sorted: std::ptr::null(),
        k_max: k_max as i32,
        h_dense: 1,
        seg_offsets: std::ptr::null(),
        adapter_ids: std::ptr::null(),
        num_segments: 0,
        scale,
        num_tokens: t as i32,
        num_weights: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_out: shape.d_out as i32,
        path: code,
        y_stride: 0,
    };
    // SAFETY: h is [T, E·r] as written above; ids/weights hold T·k_max, B E·d_out·r and y T·d_out
    // elements (checked); the kernel skips ids outside [0, E).
    unsafe { l.run(&T::EXPAND, &expand) }
}

/// The first half of [`lora_dense_gated`]: every expert's shrink `H = x·A_allᵀ` `[T, E·r]` into the
/// workspace, which the expand and the dense-gated backward read.
pub(crate) fn dense_gated_shrink<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    shape: &LoraShape,
    ws: &mut DenseGatedWorkspace,
) -> Result<()> {
    const OP: &str = "lora_dense_gated";
    let t = ws.num_tokens;
    check_len(
        "workspace columns (E * r)",
        shape.num_experts * shape.rank,
        ws.columns,
    )?;
    let mut l = Launch::new(dev, OP);
    let x = l.input("x [T, d_in]", x, t * shape.d_in)?;
    let a = l.input("A [E, r, d_in]", a, shape.a_len())?;
    let h = l.output_any("dense-gated workspace h", &mut ws.h)?;
    let offsets = l.input_any("dense-gated workspace offsets", &ws.offsets)?;
    if t == 0 {
        return Ok(());
    }
    let shrink = ffi::molora_lora_shrink_args {
        x: x.cast(),
        a: a.cast(),
        h,
        run_offsets: offsets,
        run_weight: std::ptr::null(),
        row_src: std::ptr::null(),
        src_div: 1,
        max_rows: t as i32,
        num_runs: 1,
        num_weights: 1,
        rank: ws.columns as i32,
        d_in: shape.d_in as i32,
        path: ffi::MOLORA_LORA_PATH_AUTO as i32,
        b_rank: 0,
    };
    // SAFETY: x holds T·d_in and A E·r·d_in elements (checked), read as one [E·r, d_in] weight; the
    // workspace holds T·E·r (+1) floats of h and the offsets [0, T], allocated for this T and E·r.
    unsafe { l.run(&T::SHRINK, &shrink) }
}
