//! Grouped LoRA on the GPU (`cuda/lora.cu`): shrink and expand over expert segments (gather and
//! scatter/combine fused) and over sequence segments (SGMV), and SAML's weight-space mixing. Each op
//! is the GPU counterpart of the [`crate::cpu`] function of the same name, with device buffers.

use std::os::raw::c_int;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::device::{check_launch, Device};
use super::dispatch::DevicePlan;
use super::ffi;
use crate::cpu::dispatch::check_scale;
use crate::error::check_len;
use crate::{AdapterSegments, DType, Element, Error, LoraShape, Result};

type Launcher<A> = unsafe extern "C" fn(*const A, ffi::molora_stream_t) -> c_int;

/// An element type with CUDA kernels: f32, f16 and bf16.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {
    #[doc(hidden)]
    const SHRINK: Launcher<ffi::molora_lora_shrink_args>;
    #[doc(hidden)]
    const EXPAND: Launcher<ffi::molora_lora_expand_args>;
    #[doc(hidden)]
    const MIX: Launcher<ffi::molora_mix_args>;
    #[doc(hidden)]
    const ROUTER_LOGITS: Launcher<ffi::molora_router_logits_args>;
    #[doc(hidden)]
    const QUANTIZE_NF4: Launcher<ffi::molora_quantize_args>;
    #[doc(hidden)]
    const QUANTIZE_INT8: Launcher<ffi::molora_quantize_args>;
    #[doc(hidden)]
    const QUANT_MATMUL: Launcher<ffi::molora_quant_matmul_args>;
    #[doc(hidden)]
    const LORA_BACKWARD: Launcher<ffi::molora_lora_backward_args>;
    #[doc(hidden)]
    const ROUTER_BACKWARD: Launcher<ffi::molora_router_backward_args>;
    #[doc(hidden)]
    const MIX_BACKWARD: Launcher<ffi::molora_mix_backward_args>;
    #[doc(hidden)]
    const GATHER_ROWS: Launcher<ffi::molora_gather_rows_args>;
    #[doc(hidden)]
    const SCATTER_COMBINE: Launcher<ffi::molora_scatter_combine_args>;
    #[doc(hidden)]
    const LORA_BACKWARD_DENSE: Launcher<ffi::molora_lora_backward_dense_args>;
}

impl CudaElement for f32 {
    const SHRINK: Launcher<ffi::molora_lora_shrink_args> = ffi::molora_lora_shrink_f32;
    const EXPAND: Launcher<ffi::molora_lora_expand_args> = ffi::molora_lora_expand_f32;
    const MIX: Launcher<ffi::molora_mix_args> = ffi::molora_mix_f32;
    const ROUTER_LOGITS: Launcher<ffi::molora_router_logits_args> = ffi::molora_router_logits_f32;
    const QUANTIZE_NF4: Launcher<ffi::molora_quantize_args> = ffi::molora_quantize_nf4_f32;
    const QUANTIZE_INT8: Launcher<ffi::molora_quantize_args> = ffi::molora_quantize_int8_f32;
    const QUANT_MATMUL: Launcher<ffi::molora_quant_matmul_args> = ffi::molora_quant_matmul_f32;
    const LORA_BACKWARD: Launcher<ffi::molora_lora_backward_args> = ffi::molora_lora_backward_f32;
    const ROUTER_BACKWARD: Launcher<ffi::molora_router_backward_args> =
        ffi::molora_router_backward_f32;
    const MIX_BACKWARD: Launcher<ffi::molora_mix_backward_args> = ffi::molora_mix_backward_f32;
    const GATHER_ROWS: Launcher<ffi::molora_gather_rows_args> = ffi::molora_gather_rows_f32;
    const SCATTER_COMBINE: Launcher<ffi::molora_scatter_combine_args> =
        ffi::molora_scatter_combine_f32;
    const LORA_BACKWARD_DENSE: Launcher<ffi::molora_lora_backward_dense_args> =
        ffi::molora_lora_backward_dense_f32;
}
impl CudaElement for f16 {
    const SHRINK: Launcher<ffi::molora_lora_shrink_args> = ffi::molora_lora_shrink_f16;
    const EXPAND: Launcher<ffi::molora_lora_expand_args> = ffi::molora_lora_expand_f16;
    const MIX: Launcher<ffi::molora_mix_args> = ffi::molora_mix_f16;
    const ROUTER_LOGITS: Launcher<ffi::molora_router_logits_args> = ffi::molora_router_logits_f16;
    const QUANTIZE_NF4: Launcher<ffi::molora_quantize_args> = ffi::molora_quantize_nf4_f16;
    const QUANTIZE_INT8: Launcher<ffi::molora_quantize_args> = ffi::molora_quantize_int8_f16;
    const QUANT_MATMUL: Launcher<ffi::molora_quant_matmul_args> = ffi::molora_quant_matmul_f16;
    const LORA_BACKWARD: Launcher<ffi::molora_lora_backward_args> = ffi::molora_lora_backward_f16;
    const ROUTER_BACKWARD: Launcher<ffi::molora_router_backward_args> =
        ffi::molora_router_backward_f16;
    const MIX_BACKWARD: Launcher<ffi::molora_mix_backward_args> = ffi::molora_mix_backward_f16;
    const GATHER_ROWS: Launcher<ffi::molora_gather_rows_args> = ffi::molora_gather_rows_f16;
    const SCATTER_COMBINE: Launcher<ffi::molora_scatter_combine_args> =
        ffi::molora_scatter_combine_f16;
    const LORA_BACKWARD_DENSE: Launcher<ffi::molora_lora_backward_dense_args> =
        ffi::molora_lora_backward_dense_f16;
}
impl CudaElement for bf16 {
    const SHRINK: Launcher<ffi::molora_lora_shrink_args> = ffi::molora_lora_shrink_bf16;
    const EXPAND: Launcher<ffi::molora_lora_expand_args> = ffi::molora_lora_expand_bf16;
    const MIX: Launcher<ffi::molora_mix_args> = ffi::molora_mix_bf16;
    const ROUTER_LOGITS: Launcher<ffi::molora_router_logits_args> = ffi::molora_router_logits_bf16;
    const QUANTIZE_NF4: Launcher<ffi::molora_quantize_args> = ffi::molora_quantize_nf4_bf16;
    const QUANTIZE_INT8: Launcher<ffi::molora_quantize_args> = ffi::molora_quantize_int8_bf16;
    const QUANT_MATMUL: Launcher<ffi::molora_quant_matmul_args> = ffi::molora_quant_matmul_bf16;
    const LORA_BACKWARD: Launcher<ffi::molora_lora_backward_args> = ffi::molora_lora_backward_bf16;
    const ROUTER_BACKWARD: Launcher<ffi::molora_router_backward_args> =
        ffi::molora_router_backward_bf16;
    const MIX_BACKWARD: Launcher<ffi::molora_mix_backward_args> = ffi::molora_mix_backward_bf16;
    const GATHER_ROWS: Launcher<ffi::molora_gather_rows_args> = ffi::molora_gather_rows_bf16;
    const SCATTER_COMBINE: Launcher<ffi::molora_scatter_combine_args> =
        ffi::molora_scatter_combine_bf16;
    const LORA_BACKWARD_DENSE: Launcher<ffi::molora_lora_backward_dense_args> =
        ffi::molora_lora_backward_dense_bf16;
}

/// Sequence segments with one adapter each, in device memory (from a validated [`AdapterSegments`]).
#[derive(Debug)]
pub struct DeviceSegments {
    num_rows: usize,
    num_segments: usize,
    num_adapters: usize,
    offsets: CudaSlice<i32>,
    adapter_ids: CudaSlice<i32>,
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
enum Kernel {
    Shrink,
    Expand,
}

/// The C code of `path`, or [`Error::Unsupported`] naming why this call cannot take it for `shape`
/// (the vectorised condition is on `d_in` for the shrink and on `r` for the expand); `ptrs` are the
/// device addresses that 16-byte loads read from.
fn resolve_path<T: CudaElement>(
    op: &'static str,
    path: KernelPath,
    kernel: Kernel,
    shape: &LoraShape,
    ptrs: &[u64],
) -> Result<i32> {
    let (dim_name, dim) = match kernel {
        Kernel::Shrink => ("d_in", shape.d_in),
        Kernel::Expand => ("rank", shape.rank),
    };
    let columns = shape.num_experts * shape.rank;
    // The variants that exist for one of the two kernels only.
    let only_for = match path {
        KernelPath::TensorCore | KernelPath::Rows => Some(Kernel::Shrink),
        KernelPath::Staged => Some(Kernel::Expand),
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
            if let Some(p) = ptrs.iter().find(|&&p| p % 16 != 0) {
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
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    h: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    shrink_experts_on(dev, x, a, shape, plan, h, KernelPath::Auto)
}

/// [`shrink_experts`] on an explicit kernel variant ([`KernelPath`]); [`KernelPath::Auto`] is [`shrink_experts`].
/// A variant the shape, alignment or element type cannot take is an [`Error::Unsupported`] naming it.
#[allow(clippy::too_many_arguments)]
pub fn shrink_experts_on<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    h: &mut impl DevicePtrMut<f32>,
    path: KernelPath,
) -> Result<()> {
    const OP: &str = "shrink_experts";
    check_experts(OP, shape, plan.num_experts())?;
    let slots = plan.num_tokens() * plan.k_max();
    check_len("x [T, d_in]", plan.num_tokens() * shape.d_in, x.len())?;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("h [T * k_max, r]", slots * shape.rank, h.len())?;
    let max_rows = fits_i32("T * k_max", slots)?;
    fits_i32("T * k_max * r", slots * shape.rank)?;
    // The element type and shape conditions of the variant, also when there is nothing to do.
    resolve_path::<T>(OP, path, Kernel::Shrink, shape, &[])?;
    if slots == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (a_ptr, _g1) = a.device_ptr(stream);
    let (h_ptr, _g2) = h.device_ptr_mut(stream);
    let (off_ptr, sorted_ptr, _g3) = plan.offsets_and_sorted(stream);
    let path = resolve_path::<T>(OP, path, Kernel::Shrink, shape, &[x_ptr, a_ptr])?;
    let args = ffi::molora_lora_shrink_args {
        x: x_ptr as *const _,
        a: a_ptr as *const _,
        h: h_ptr as *mut f32,
        run_offsets: off_ptr as *const i32,
        run_weight: std::ptr::null(),
        row_src: sorted_ptr as *const i32,
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
    // a token < T. All sizes fit an i32. The guards keep the buffers alive and ordered on `stream`.
    let code = unsafe { T::SHRINK(&args, dev.raw_stream()) };
    check_launch(OP, code)
}

/// Grouped expand with the scatter and weighted combine fused, deterministic:
/// `y[t, o] = round(y[t, o] + scale·Σ_s w_ts·Σ_j h[pos(t, s), j]·B[e_ts, o, j])`; tokens with no
/// active slot are not touched. `ids`/`weights` are the routing's `[T, k_max]`, `h` the output of
/// [`shrink_experts`] with the same plan. GPU counterpart of [`crate::cpu::expand_experts`].
#[allow(clippy::too_many_arguments)]
pub fn expand_experts<T: CudaElement>(
    dev: &Device,
    h: &impl DevicePtr<f32>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    ids: &impl DevicePtr<i32>,
    weights: &impl DevicePtr<f32>,
    scale: f32,
    y: &mut impl DevicePtrMut<T>,
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
    h: &impl DevicePtr<f32>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    ids: &impl DevicePtr<i32>,
    weights: &impl DevicePtr<f32>,
    scale: f32,
    y: &mut impl DevicePtrMut<T>,
    path: KernelPath,
) -> Result<()> {
    const OP: &str = "expand_experts";
    check_experts(OP, shape, plan.num_experts())?;
    check_scale(scale)?;
    let (t, k_max) = (plan.num_tokens(), plan.k_max());
    let slots = t * k_max;
    check_len("h [T * k_max, r]", slots * shape.rank, h.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("routing ids [T, k_max]", slots, ids.len())?;
    check_len("routing weights [T, k_max]", slots, weights.len())?;
    check_len("y [T, d_out]", t * shape.d_out, y.len())?;
    fits_i32("T * d_out", t * shape.d_out)?;
    // The element type and shape conditions of the variant, also when there is nothing to do.
    resolve_path::<T>(OP, path, Kernel::Expand, shape, &[])?;
    if t == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (h_ptr, _g0) = h.device_ptr(stream);
    let (b_ptr, _g1) = b.device_ptr(stream);
    let (ids_ptr, _g2) = ids.device_ptr(stream);
    let (w_ptr, _g3) = weights.device_ptr(stream);
    let (y_ptr, _g4) = y.device_ptr_mut(stream);
    let (inv_ptr, _g5) = plan.inverse(stream);
    let path = resolve_path::<T>(OP, path, Kernel::Expand, shape, &[b_ptr])?;
    let args = ffi::molora_lora_expand_args {
        h: h_ptr as *const f32,
        b: b_ptr as *const _,
        y: y_ptr as *mut _,
        ids: ids_ptr as *const i32,
        weights: w_ptr as *const f32,
        slot_to_sorted: inv_ptr as *const i32,
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
    };
    // SAFETY: lengths checked above (h T·k_max·r, B E·d_out·r, ids/weights T·k_max, y T·d_out); the
    // plan's inverse holds T·k_max positions, each -1 or < T·k_max (a row of h). The kernel skips
    // ids outside [0, E). Sizes fit an i32; the guards keep buffers alive and ordered on `stream`.
    let code = unsafe { T::EXPAND(&args, dev.raw_stream()) };
    check_launch(OP, code)
}

/// Segmented (SGMV) shrink: `h[t, j] = Σ_i x[t, i]·A[adapter(seg(t)), j, i]`, zero rows for adapter
/// `-1`. `shape.num_experts` is the number of adapters. GPU counterpart of
/// [`crate::cpu::shrink_segments`].
#[allow(clippy::too_many_arguments)]
pub fn shrink_segments<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<T>,
    shape: &LoraShape,
    segs: &DeviceSegments,
    h: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    shrink_segments_on(dev, x, a, shape, segs, h, KernelPath::Auto)
}

/// [`shrink_segments`] on an explicit kernel variant ([`KernelPath`]); [`KernelPath::Auto`] is [`shrink_segments`].
/// A variant the shape, alignment or element type cannot take is an [`Error::Unsupported`] naming it.
#[allow(clippy::too_many_arguments)]
pub fn shrink_segments_on<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<T>,
    shape: &LoraShape,
    segs: &DeviceSegments,
    h: &mut impl DevicePtrMut<f32>,
    path: KernelPath,
) -> Result<()> {
    const OP: &str = "shrink_segments";
    check_experts(OP, shape, segs.num_adapters)?;
    let t = segs.num_rows;
    check_len("x [T, d_in]", t * shape.d_in, x.len())?;
    check_len("A [N, r, d_in]", shape.a_len(), a.len())?;
    check_len("h [T, r]", t * shape.rank, h.len())?;
    fits_i32("T * r", t * shape.rank)?;
    // The element type and shape conditions of the variant, also when there is nothing to do.
    resolve_path::<T>(OP, path, Kernel::Shrink, shape, &[])?;
    if t == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (a_ptr, _g1) = a.device_ptr(stream);
    let (h_ptr, _g2) = h.device_ptr_mut(stream);
    let (off_ptr, _g3) = segs.offsets.device_ptr(stream);
    let (ad_ptr, _g4) = segs.adapter_ids.device_ptr(stream);
    let path = resolve_path::<T>(OP, path, Kernel::Shrink, shape, &[x_ptr, a_ptr])?;
    let args = ffi::molora_lora_shrink_args {
        x: x_ptr as *const _,
        a: a_ptr as *const _,
        h: h_ptr as *mut f32,
        run_offsets: off_ptr as *const i32,
        run_weight: ad_ptr as *const i32,
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
    let code = unsafe { T::SHRINK(&args, dev.raw_stream()) };
    check_launch(OP, code)
}

/// Segmented (SGMV) expand: `y[t, o] = round(y[t, o] + scale·Σ_j h[t, j]·B[adapter(seg(t)), o, j])`,
/// rows of adapter `-1` untouched. GPU counterpart of [`crate::cpu::expand_segments`].
#[allow(clippy::too_many_arguments)]
pub fn expand_segments<T: CudaElement>(
    dev: &Device,
    h: &impl DevicePtr<f32>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    segs: &DeviceSegments,
    scale: f32,
    y: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    expand_segments_on(dev, h, b, shape, segs, scale, y, KernelPath::Auto)
}

/// [`expand_segments`] on an explicit kernel variant ([`KernelPath`]); [`KernelPath::Auto`] is [`expand_segments`].
/// A variant the shape, alignment or element type cannot take is an [`Error::Unsupported`] naming it.
#[allow(clippy::too_many_arguments)]
pub fn expand_segments_on<T: CudaElement>(
    dev: &Device,
    h: &impl DevicePtr<f32>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    segs: &DeviceSegments,
    scale: f32,
    y: &mut impl DevicePtrMut<T>,
    path: KernelPath,
) -> Result<()> {
    const OP: &str = "expand_segments";
    check_experts(OP, shape, segs.num_adapters)?;
    check_scale(scale)?;
    let t = segs.num_rows;
    check_len("h [T, r]", t * shape.rank, h.len())?;
    check_len("B [N, d_out, r]", shape.b_len(), b.len())?;
    check_len("y [T, d_out]", t * shape.d_out, y.len())?;
    fits_i32("T * d_out", t * shape.d_out)?;
    // The element type and shape conditions of the variant, also when there is nothing to do.
    resolve_path::<T>(OP, path, Kernel::Expand, shape, &[])?;
    if t == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (h_ptr, _g0) = h.device_ptr(stream);
    let (b_ptr, _g1) = b.device_ptr(stream);
    let (y_ptr, _g2) = y.device_ptr_mut(stream);
    let (off_ptr, _g3) = segs.offsets.device_ptr(stream);
    let (ad_ptr, _g4) = segs.adapter_ids.device_ptr(stream);
    let path = resolve_path::<T>(OP, path, Kernel::Expand, shape, &[b_ptr])?;
    let args = ffi::molora_lora_expand_args {
        h: h_ptr as *const f32,
        b: b_ptr as *const _,
        y: y_ptr as *mut _,
        ids: std::ptr::null(),
        weights: std::ptr::null(),
        slot_to_sorted: std::ptr::null(),
        k_max: 0,
        h_dense: 0,
        seg_offsets: off_ptr as *const i32,
        adapter_ids: ad_ptr as *const i32,
        num_segments: segs.num_segments as i32,
        scale,
        num_tokens: t as i32,
        num_weights: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_out: shape.d_out as i32,
        path,
    };
    // SAFETY: as for `shrink_segments`: validated segments uploaded whole, lengths checked above.
    let code = unsafe { T::EXPAND(&args, dev.raw_stream()) };
    check_launch(OP, code)
}

/// SAML weight-space mixing: `Ā_s = Σ_e p_se·A_e` (`[S, r, d_in]`) and `B̄_s = Σ_e p_se·B_e`
/// (`[S, d_out, r]`), f32 accumulation, rounded once. `probs` `[S, E]`. GPU counterpart of
/// [`crate::cpu::mix_experts`]; feed the outputs to [`shrink_segments`] / [`expand_segments`] with
/// [`AdapterSegments::identity`].
#[allow(clippy::too_many_arguments)]
pub fn mix_experts<T: CudaElement>(
    dev: &Device,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    probs: &impl DevicePtr<f32>,
    num_seqs: usize,
    a_mixed: &mut impl DevicePtrMut<T>,
    b_mixed: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    const OP: &str = "mix_experts";
    let e = shape.num_experts;
    let per_a = shape.rank * shape.d_in;
    let per_b = shape.d_out * shape.rank;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("probs [S, E]", num_seqs * e, probs.len())?;
    check_len("mixed A [S, r, d_in]", num_seqs * per_a, a_mixed.len())?;
    check_len("mixed B [S, d_out, r]", num_seqs * per_b, b_mixed.len())?;
    if num_seqs > 65535 {
        return Err(Error::Unsupported {
            op: OP,
            what: format!("{num_seqs} sequences (the mixing kernel handles up to 65535)"),
        });
    }
    if num_seqs == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (p_ptr, _g0) = probs.device_ptr(stream);
    for (w, out, per) in [
        (a.device_ptr(stream), a_mixed.device_ptr_mut(stream), per_a),
        (b.device_ptr(stream), b_mixed.device_ptr_mut(stream), per_b),
    ] {
        let args = ffi::molora_mix_args {
            w: w.0 as *const _,
            probs: p_ptr as *const f32,
            out: out.0 as *mut _,
            num_experts: e as i32,
            num_seqs: num_seqs as i32,
            per_expert: per as i64,
        };
        // SAFETY: w holds E·per, out S·per and probs S·E elements (checked above); S <= 65535 and
        // E·per fits an i32 (LoraShape). The guards (w.1, out.1, _g0) live until after the launch.
        let code = unsafe { T::MIX(&args, dev.raw_stream()) };
        check_launch(OP, code)?;
    }
    Ok(())
}

/// Largest `E·r` the dense-gated path takes: every expert's shrink is computed for every token.
pub const DENSE_GATED_MAX_COLUMNS: usize = 512;

/// Which LoRA forward path suits a shape: [`LoraPath::DenseGated`] (all experts' shrink as one pass
/// over `x`, no dispatch, two launches) when `E·r <= 256`, else [`LoraPath::Segmented`] (dispatch,
/// then shrink / expand over expert segments, five launches). The threshold is a starting point to
/// be tuned by measurement; both paths give the same result and are reachable explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    DenseGated,
    Segmented,
}

impl LoraPath {
    pub fn for_shape(shape: &LoraShape) -> Self {
        if shape.num_experts * shape.rank <= 256 {
            LoraPath::DenseGated
        } else {
            LoraPath::Segmented
        }
    }
}

/// Workspace of the dense-gated path for `T` tokens: every expert's shrink `[T, E·r]` (f32) and the
/// one-run offsets `[0, T]`. Allocate once per shape; [`lora_dense_gated`] allocates nothing.
#[derive(Debug)]
pub struct DenseGatedWorkspace {
    pub(crate) num_tokens: usize,
    pub(crate) columns: usize,
    pub(crate) h: CudaSlice<f32>,
    offsets: CudaSlice<i32>,
}

impl DenseGatedWorkspace {
    pub fn new(dev: &Device, num_tokens: usize, shape: &LoraShape) -> Result<Self> {
        let columns = shape.num_experts * shape.rank;
        if columns > DENSE_GATED_MAX_COLUMNS {
            return Err(Error::Unsupported {
                op: "lora_dense_gated",
                what: format!(
                    "E·r = {columns} (the dense-gated path takes up to {DENSE_GATED_MAX_COLUMNS}; use the segmented path)"
                ),
            });
        }
        fits_i32("T * E * r", num_tokens * columns)?;
        Ok(DenseGatedWorkspace {
            num_tokens,
            columns,
            h: dev.zeros(num_tokens * columns + 1)?,
            offsets: dev.upload(&[0, num_tokens as i32])?,
        })
    }
}

/// The dense-gated LoRA forward, without dispatch: `H = x·A_allᵀ` with `A_all` the `[E·r, d_in]`
/// view of the stacked `A` (one shrink over all experts), then the fused expand reading each active
/// slot's columns of `H`: `y[t, o] = round(y[t, o] + scale·Σ_s w_ts·Σ_j H[t, e_ts·r + j]·B[e_ts, o, j])`.
/// The same result as [`shrink_experts`] + [`expand_experts`] with the same routing; two launches.
#[allow(clippy::too_many_arguments)]
pub fn lora_dense_gated<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    ids: &impl DevicePtr<i32>,
    weights: &impl DevicePtr<f32>,
    k_max: usize,
    scale: f32,
    ws: &mut DenseGatedWorkspace,
    y: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    const OP: &str = "lora_dense_gated";
    check_scale(scale)?;
    let t = ws.num_tokens;
    // The workspace, x and A are checked by `dense_gated_shrink`, before it launches anything.
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("routing ids [T, k_max]", t * k_max, ids.len())?;
    check_len("routing weights [T, k_max]", t * k_max, weights.len())?;
    check_len("y [T, d_out]", t * shape.d_out, y.len())?;
    fits_i32("T * d_out", t * shape.d_out)?;
    if k_max == 0 {
        return Err(Error::InvalidDim {
            what: "k_max",
            value: 0,
            reason: "a routing needs at least one slot per token",
        });
    }
    dense_gated_shrink(dev, x, a, shape, ws)?;
    if t == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (b_ptr, _g2) = b.device_ptr(stream);
    let (ids_ptr, _g3) = ids.device_ptr(stream);
    let (w_ptr, _g4) = weights.device_ptr(stream);
    let (y_ptr, _g5) = y.device_ptr_mut(stream);
    let (h_ptr, _g6) = ws.h.device_ptr(stream);
    let expand = ffi::molora_lora_expand_args {
        h: h_ptr as *const f32,
        b: b_ptr as *const _,
        y: y_ptr as *mut _,
        ids: ids_ptr as *const i32,
        weights: w_ptr as *const f32,
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
        path: ffi::MOLORA_LORA_PATH_AUTO as i32,
    };
    // SAFETY: h is [T, E·r] as written above; ids/weights hold T·k_max, B E·d_out·r and y T·d_out
    // elements (checked); the kernel skips ids outside [0, E).
    let code = unsafe { T::EXPAND(&expand, dev.raw_stream()) };
    check_launch(OP, code)
}

/// The first half of [`lora_dense_gated`]: every expert's shrink `H = x·A_allᵀ` `[T, E·r]` into the
/// workspace, which the expand and the dense-gated backward read.
pub(crate) fn dense_gated_shrink<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<T>,
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
    check_len("x [T, d_in]", t * shape.d_in, x.len())?;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    if t == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (a_ptr, _g1) = a.device_ptr(stream);
    let (h_ptr, _g2) = ws.h.device_ptr_mut(stream);
    let (off_ptr, _g3) = ws.offsets.device_ptr(stream);
    let shrink = ffi::molora_lora_shrink_args {
        x: x_ptr as *const _,
        a: a_ptr as *const _,
        h: h_ptr as *mut f32,
        run_offsets: off_ptr as *const i32,
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
    let code = unsafe { T::SHRINK(&shrink, dev.raw_stream()) };
    check_launch(OP, code)
}
