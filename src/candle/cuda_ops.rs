//! The CUDA side of the candle ops (feature `candle-cuda`): each op's `cuda_fwd`, and the backward
//! of the LoRA part and of the gates, run molora's kernels on candle's CUDA storage, on the stream of
//! the tensor's candle device, without copying through the host and without waiting for the device.
//!
//! | op | forward kernels | backward |
//! |---|---|---|
//! | [`super::ops::routed_lora`] | [`ops::routed_lora_forward`]: the gate, then the segmented or dense-gated path by shape (any `E·r`) | [`ops::routed_lora_backward`]: the forward again, then its backward |
//! | [`super::ops::mole_lora`] | [`ops::mole_lora_forward`]: every expert a slot with its dense weight, on the segmented or dense-gated path by shape (any `E·r`) | [`ops::mole_lora_backward`] (`dx`, `dA`, `dB`, `dw` for every `(t, e)`) |
//! | [`super::ops::top_k_gate`], [`super::ops::threshold_gate`] | [`ops::gate_forward`]: [`cuda::gate_probabilities`], [`cuda::slots_to_dense`] | [`ops::gate_backward`]: [`cuda::dense_to_slots`], [`cuda::gate_probabilities_backward`] |
//! | [`super::ops::quant_linear`] | [`cuda::quant_matmul`] (the packed weight uploaded once per device and weight) | [`cuda::quant_matmul_dx`] on the same packed weight |
//! | [`super::ops::weight_space_lora`] | [`ops::weight_space_forward`] ([`cuda::WeightSpaceLora`]): [`cuda::mix_experts`], segmented shrink and expand | [`ops::weight_space_backward`]: the mixed adapters' LoRA backward, then [`cuda::mix_backward`] |
//!
//! Except for the quantised base, each is the framework-neutral device op of [`crate::cuda::ops`]
//! (tested on the emulated device against its CPU twin) on candle's storage.
//!
//! The gates cannot report bad probabilities without a host sync: on CUDA a NaN row gives no expert
//! and a negative probability is never selected, where the CPU path returns an error.

use std::sync::{Arc, Mutex, Weak};

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::ops::{QuantWeight, RoutedGate};
use crate::cuda::{self, ops, CudaElement};
use crate::error::{Error, Result};
use crate::LoraShape;

type CResult<T> = candle_core::Result<T>;

/// `$body` with `$t` the element type of the candle dtype `$dtype` (f32, f16 or bf16); another
/// dtype returns an error naming the op.
macro_rules! with_element {
    ($op:literal, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => {
                return Err(Error::Unsupported {
                    op: $op,
                    what: format!("dtype {other:?} (the op takes f32, f16, bf16)"),
                }
                .into())
            }
        }
    };
}

fn msg(e: Error) -> candle_core::Error {
    e.into()
}

/// molora's device handle on the stream of a candle CUDA storage, so our kernels order with
/// candle's own work on that device.
fn device(s: &CudaStorage) -> cuda::Device {
    cuda::Device::from_stream(s.device().cuda_stream())
}

/// The contiguous view of a candle CUDA storage, or an error naming the input.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> CResult<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => Err(Error::NotContiguous { what: what.into() }.into()),
    }
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, like: &CudaStorage) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, like.device().clone())
}

/// A new candle tensor (no gradient history) over a device buffer of `like`'s device.
fn tensor<T: CudaDType, S: Into<Shape>>(
    slice: CudaSlice<T>,
    shape: S,
    like: &CudaStorage,
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(wrap(slice, like)),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// Runs `f` on the CUDA storage and layout of a contiguous `t`.
fn with_cuda<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&CudaStorage, &Layout) -> CResult<R>,
) -> CResult<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(s, layout),
        _ => Err(Error::Unsupported {
            op: "molora's CUDA ops",
            what: format!(
                "{what}: a tensor on {:?} (expected one on a CUDA device)",
                t.device().location()
            ),
        }
        .into()),
    }
}

/// A zeroed device buffer of `n` elements (one when `n = 0`: the driver cannot allocate zero bytes).
fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &cuda::Device,
    n: usize,
) -> CResult<CudaSlice<T>> {
    dev.zeros::<T>(n.max(1))
        .and_then(cuda::Buffer::into_cuda_slice)
        .map_err(msg)
}

// ---------------------------------------------------------------------------------------------
// The LoRA part

/// The four f32 gradient buffers of a LoRA op's backward, handed to candle as `dx`, the packed
/// `d[A; B]` (one buffer, split for the op), and `dw` (`dw_len` values).
struct LoraGradSlices {
    dx: CudaSlice<f32>,
    dab: CudaSlice<f32>,
    dw: CudaSlice<f32>,
}

impl LoraGradSlices {
    fn new(dev: &cuda::Device, t: usize, shape: &LoraShape, dw_len: usize) -> CResult<Self> {
        Ok(LoraGradSlices {
            dx: zeros::<f32>(dev, t * shape.d_in)?,
            dab: zeros::<f32>(dev, shape.a_len() + shape.b_len())?,
            dw: zeros::<f32>(dev, dw_len)?,
        })
    }

    /// Runs `f` on views of exactly the gradients' lengths.
    fn with_out<R>(
        &mut self,
        t: usize,
        shape: &LoraShape,
        dw_len: usize,
        f: impl FnOnce(&mut ops::DeviceOpGrads<'_, CudaViewMut<'_, f32>>) -> Result<R>,
    ) -> CResult<R> {
        let mut dx = self.dx.slice_mut(0..t * shape.d_in);
        // dab holds exactly a_len + b_len values (both ≥ 1).
        let (mut da, mut db) = self.dab.split_at_mut(shape.a_len());
        let mut dw = self.dw.slice_mut(0..dw_len);
        f(&mut ops::DeviceOpGrads {
            dx: &mut dx,
            da: &mut da,
            db: &mut db,
            dw: &mut dw,
        })
        .map_err(msg)
    }

    /// `(dx, d[A; B], dw)` as candle tensors of `x`'s and the experts' dtypes (dw f32).
    fn tensors(
        self,
        like: &CudaStorage,
        x: &Tensor,
        ab: &Tensor,
        dw_shape: impl Into<Shape>,
    ) -> CResult<(Tensor, Tensor, Tensor)> {
        Ok((
            tensor(self.dx, x.shape(), like).to_dtype(x.dtype())?,
            tensor(self.dab, ab.shape(), like).to_dtype(ab.dtype())?,
            tensor(self.dw, dw_shape, like),
        ))
    }
}

fn lora_fwd_typed<T: CudaElement + CudaDType>(
    shape: &LoraShape,
    scale: f32,
    (x, lx): (&CudaStorage, &Layout),
    (ab, lab): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
) -> CResult<CudaStorage> {
    let dev = device(x);
    let t = lx.dims()[0];
    let xv = view::<T>(x, lx, "x")?;
    let abv = view::<T>(ab, lab, "experts")?;
    let wv = view::<f32>(w, lw, "w")?;
    let (a, b) = split_experts(&abv, shape);
    let mut y = zeros::<T>(&dev, t * shape.d_out)?;
    {
        let mut yv = y.slice_mut(0..t * shape.d_out);
        ops::mole_lora_forward(&dev, &xv, &a, &b, &wv, t, shape, scale, &mut yv).map_err(msg)?;
    }
    Ok(wrap(y, x))
}

/// `cuda_fwd` of the LoRA op: `Δy = s·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ` by [`ops::mole_lora_forward`] (the
/// segmented or dense-gated path by shape, any `E·r`).
pub(crate) fn lora_fwd(
    shape: &LoraShape,
    scale: f32,
    x: (&CudaStorage, &Layout),
    ab: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape)> {
    let t = x.1.dims()[0];
    let out = with_element!(
        "molora-lora",
        x.0.dtype(),
        T => lora_fwd_typed::<T>(shape, scale, x, ab, w)?
    );
    Ok((out, Shape::from((t, shape.d_out))))
}

fn lora_bwd_typed<T: CudaElement + CudaDType>(
    shape: &LoraShape,
    scale: f32,
    x: &Tensor,
    ab: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let (t, _) = x.dims2()?;
    let e = shape.num_experts;
    with_cuda(x, "x", |xs, lx| {
        with_cuda(ab, "experts", |abs, lab| {
            with_cuda(w, "w", |ws_, lw| {
                with_cuda(dy, "dy", |dys, ldy| {
                    let dev = device(xs);
                    let xv = view::<T>(xs, lx, "x")?;
                    let abv = view::<T>(abs, lab, "experts")?;
                    let wv = view::<f32>(ws_, lw, "w")?;
                    let dyv = view::<T>(dys, ldy, "dy")?;
                    let (a, b) = split_experts(&abv, shape);
                    let mut g = LoraGradSlices::new(&dev, t, shape, t * e)?;
                    g.with_out(t, shape, t * e, |out| {
                        ops::mole_lora_backward(&dev, &xv, &a, &b, &wv, t, shape, scale, &dyv, out)
                    })?;
                    g.tensors(xs, x, ab, (t, e))
                })
            })
        })
    })
}

/// Backward of the LoRA op on the GPU: `(dx, d[A;B], dw)`, `dw` for every `(t, e)` (exact also where
/// `w = 0`), by [`ops::mole_lora_backward`]. `dy` is made contiguous first.
pub(crate) fn lora_bwd(
    shape: &LoraShape,
    scale: f32,
    x: &Tensor,
    ab: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let dy = dy.to_dtype(x.dtype())?.contiguous()?;
    with_element!("molora-lora", x.dtype(), T => lora_bwd_typed::<T>(shape, scale, x, ab, w, &dy))
}

/// `A` and `B` of the packed experts.
fn split_experts<'a, T>(
    ab: &'a CudaView<'a, T>,
    shape: &LoraShape,
) -> (CudaView<'a, T>, CudaView<'a, T>) {
    (
        ab.slice(0..shape.a_len()),
        ab.slice(shape.a_len()..shape.a_len() + shape.b_len()),
    )
}

// ---------------------------------------------------------------------------------------------
// From router probabilities to the LoRA output

/// `p` `[T, E]` and, for a threshold gate, `τ` `[T]`: the two ranges of the gate input.
fn split_gate_input<'a>(
    g: &'a CudaView<'a, f32>,
    gate: &RoutedGate,
    t: usize,
    e: usize,
) -> CResult<(CudaView<'a, f32>, Option<CudaView<'a, f32>>)> {
    let want = t * e + if gate.has_tau() { t } else { 0 };
    crate::error::check_len("gate input (p, then tau)", want, g.len()).map_err(msg)?;
    let p = g.slice(0..t * e);
    let tau = gate.has_tau().then(|| g.slice(t * e..t * e + t));
    Ok((p, tau))
}

fn routed_fwd_typed<T: CudaElement + CudaDType>(
    shape: &LoraShape,
    scale: f32,
    gate: &RoutedGate,
    (x, lx): (&CudaStorage, &Layout),
    (ab, lab): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
) -> CResult<CudaStorage> {
    let dev = device(x);
    let t = lx.dims()[0];
    let xv = view::<T>(x, lx, "x")?;
    let abv = view::<T>(ab, lab, "experts")?;
    let gv = view::<f32>(g, lg, "gate input")?;
    let (pv, tau) = split_gate_input(&gv, gate, t, shape.num_experts)?;
    let (a, b) = split_experts(&abv, shape);
    let mut y = zeros::<T>(&dev, t * shape.d_out)?;
    {
        let mut yv = y.slice_mut(0..t * shape.d_out);
        ops::routed_lora_forward(
            &dev,
            &xv,
            &a,
            &b,
            &pv,
            tau.map(Into::into),
            gate,
            t,
            shape,
            scale,
            &mut yv,
        )
        .map_err(msg)?;
    }
    Ok(wrap(y, x))
}

/// `cuda_fwd` of [`super::ops::routed_lora`]: [`ops::routed_lora_forward`] (the gate's slots stay
/// on the device) on the segmented or dense-gated path, any `E·r`.
pub(crate) fn routed_fwd(
    shape: &LoraShape,
    scale: f32,
    gate: &RoutedGate,
    x: (&CudaStorage, &Layout),
    ab: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape)> {
    let t = x.1.dims()[0];
    let out = with_element!(
        "molora-routed-lora",
        x.0.dtype(),
        T => routed_fwd_typed::<T>(shape, scale, gate, x, ab, g)?
    );
    Ok((out, Shape::from((t, shape.d_out))))
}

#[allow(clippy::too_many_arguments)]
fn routed_bwd_typed<T: CudaElement + CudaDType>(
    shape: &LoraShape,
    scale: f32,
    gate: &RoutedGate,
    x: &Tensor,
    ab: &Tensor,
    g: &Tensor,
    dy: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let (t, _) = x.dims2()?;
    let e = shape.num_experts;
    with_cuda(x, "x", |xs, lx| {
        with_cuda(ab, "experts", |abs, lab| {
            with_cuda(g, "gate input", |gs, lg| {
                with_cuda(dy, "dy", |dys, ldy| {
                    let dev = device(xs);
                    let xv = view::<T>(xs, lx, "x")?;
                    let abv = view::<T>(abs, lab, "experts")?;
                    let gv = view::<f32>(gs, lg, "gate input")?;
                    let dyv = view::<T>(dys, ldy, "dy")?;
                    let (pv, tau) = split_gate_input(&gv, gate, t, e)?;
                    let (a, b) = split_experts(&abv, shape);
                    // d[p; τ] is one buffer: dp in its first T·E values, dτ after them.
                    let n_tau = if gate.has_tau() { t } else { 0 };
                    let mut grads = LoraGradSlices::new(&dev, t, shape, t * e + n_tau)?;
                    let mut dtau_scratch = zeros::<f32>(&dev, t)?;
                    grads.with_out(t, shape, t * e, |out| {
                        let mut dtau = dtau_scratch.slice_mut(0..t);
                        let tv = tau.as_ref().map(|v| v.slice(0..t).into());
                        ops::routed_lora_backward(
                            &dev, &xv, &a, &b, &pv, tv, gate, t, shape, scale, &dyv, out, &mut dtau,
                        )
                    })?;
                    if n_tau > 0 {
                        let mut dst = grads.dw.slice_mut(t * e..t * e + t);
                        dev.copy(&dtau_scratch.slice(0..t), &mut dst).map_err(msg)?;
                    }
                    grads.tensors(xs, x, ab, g.shape())
                })
            })
        })
    })
}

/// Backward of [`super::ops::routed_lora`] on the GPU: `(dx, d[A;B], d[p; τ])` by
/// [`ops::routed_lora_backward`] (the forward again, then its backward).
#[allow(clippy::too_many_arguments)]
pub(crate) fn routed_bwd(
    shape: &LoraShape,
    scale: f32,
    gate: &RoutedGate,
    x: &Tensor,
    ab: &Tensor,
    g: &Tensor,
    dy: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let dy = dy.to_dtype(x.dtype())?.contiguous()?;
    with_element!(
        "molora-routed-lora",
        x.dtype(),
        T => routed_bwd_typed::<T>(shape, scale, gate, x, ab, g, &dy)
    )
}

// ---------------------------------------------------------------------------------------------
// Gates

/// `cuda_fwd` of the gates: the dense weights `[T, E]` of the gate over probabilities `p`
/// ([`ops::gate_forward`]).
pub(crate) fn gate_fwd(
    gate: &RoutedGate,
    (p, lp): (&CudaStorage, &Layout),
    tau: Option<(&CudaStorage, &Layout)>,
) -> CResult<(CudaStorage, Shape)> {
    let (t, e) = match lp.dims() {
        [t, e] => (*t, *e),
        d => {
            return Err(Error::Rank {
                what: "probs".into(),
                expected: 2,
                shape: d.to_vec(),
            }
            .into())
        }
    };
    let dev = device(p);
    let pv = view::<f32>(p, lp, "probs")?;
    let tv = tau.map(|(s, l)| view::<f32>(s, l, "tau")).transpose()?;
    let mut dense = zeros::<f32>(&dev, t * e)?;
    {
        let mut dv = dense.slice_mut(0..t * e);
        let tau = tv.as_ref().map(|v| v.slice(0..v.len()).into());
        ops::gate_forward(&dev, gate, &pv, tau, t, e, &mut dv).map_err(msg)?;
    }
    Ok((wrap(dense, p), Shape::from((t, e))))
}

/// Backward of the gates on the GPU: `dp` `[T, E]` and, for the threshold gate, `dτ` `[T]`, from the
/// gradient of the dense weights ([`ops::gate_backward`]).
pub(crate) fn gate_bwd(
    gate: &RoutedGate,
    p: &Tensor,
    tau: Option<&Tensor>,
    grad: &Tensor,
) -> CResult<(Tensor, Option<Tensor>)> {
    let (t, e) = p.dims2()?;
    let grad = grad.to_dtype(DType::F32)?.contiguous()?;
    let tau = tau.map(|t| t.contiguous()).transpose()?;
    with_cuda(p, "probs", |ps, lp| {
        with_cuda(&grad, "grad", |gs, lg| {
            let dev = device(ps);
            let pv = view::<f32>(ps, lp, "probs")?;
            let gv = view::<f32>(gs, lg, "grad")?;
            let run = |tv: Option<&CudaView<'_, f32>>| -> CResult<(Tensor, Option<Tensor>)> {
                let mut dp = zeros::<f32>(&dev, t * e)?;
                let mut dtau = zeros::<f32>(&dev, t)?;
                {
                    let mut dpv = dp.slice_mut(0..t * e);
                    let mut dtv = dtau.slice_mut(0..t);
                    let tau = tv.map(|v| v.slice(0..v.len()).into());
                    ops::gate_backward(&dev, gate, &pv, tau, t, e, &gv, &mut dpv, &mut dtv)
                        .map_err(msg)?;
                }
                let dp = tensor(dp, (t, e), ps);
                let dtau = gate.has_tau().then(|| tensor(dtau, t, ps));
                Ok((dp, dtau))
            };
            match &tau {
                Some(tau) => with_cuda(tau, "tau", |ts, lt| {
                    let tv = view::<f32>(ts, lt, "tau")?;
                    run(Some(&tv))
                }),
                None => run(None),
            }
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Quantised base

/// One uploaded quantised weight: the host weight it was made from (weakly held, so the entry dies
/// with the weight) and the CUDA context it lives in.
struct CachedQuant {
    host: Weak<QuantWeight>,
    context: usize,
    device: Arc<cuda::DeviceQuantWeight>,
}

/// The packed weights already on a device, so a frozen quantised layer is uploaded once per device
/// rather than on every forward. Entries whose host weight was dropped are removed on each lookup.
static QUANT_CACHE: Mutex<Vec<CachedQuant>> = Mutex::new(Vec::new());

/// The device copy of `weight` on `dev`'s context: from the cache, or uploaded (enqueued on the
/// stream) and remembered.
fn device_quant(
    dev: &cuda::Device,
    weight: &Arc<QuantWeight>,
) -> CResult<Arc<cuda::DeviceQuantWeight>> {
    let context = Arc::as_ptr(dev.context().map_err(msg)?) as usize;
    // A poisoned lock only means another thread panicked while holding it; the list stays valid.
    let mut cache = QUANT_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|c| c.host.strong_count() > 0);
    if let Some(c) = cache
        .iter()
        .find(|c| c.context == context && c.host.upgrade().is_some_and(|h| Arc::ptr_eq(&h, weight)))
    {
        return Ok(Arc::clone(&c.device));
    }
    let uploaded = Arc::new(
        match &**weight {
            QuantWeight::Nf4(w) => cuda::DeviceQuantWeight::from_nf4(dev, w),
            QuantWeight::Int8(w) => cuda::DeviceQuantWeight::from_int8(dev, w),
        }
        .map_err(msg)?,
    );
    cache.push(CachedQuant {
        host: Arc::downgrade(weight),
        context,
        device: Arc::clone(&uploaded),
    });
    Ok(uploaded)
}

fn quant_fwd_typed<T: CudaElement + CudaDType>(
    weight: &Arc<QuantWeight>,
    (x, lx): (&CudaStorage, &Layout),
) -> CResult<CudaStorage> {
    let dev = device(x);
    let t = lx.dims()[0];
    let xv = view::<T>(x, lx, "x")?;
    let w = device_quant(&dev, weight)?;
    let rows = weight.rows();
    let mut y = zeros::<f32>(&dev, t * rows)?;
    if t > 0 {
        let mut yv = y.slice_mut(0..t * rows);
        cuda::quant_matmul(&dev, &xv, t, &w, None, &mut yv).map_err(msg)?;
    }
    let y = wrap(y, x);
    if x.dtype() == DType::F32 {
        return Ok(y);
    }
    let layout = Layout::contiguous((t * rows).max(1));
    y.to_dtype(&layout, x.dtype())
}

/// Backward of the quantised linear on the GPU: `dx = dy·deq(W)` `[T, cols]` by
/// [`cuda::quant_matmul_dx`] on the packed weight (the device copy of the forward), in `x_dtype`; no
/// dense weight is formed.
pub(crate) fn quant_bwd(weight: &Arc<QuantWeight>, dy: &Tensor, x_dtype: DType) -> CResult<Tensor> {
    let (t, _) = dy.dims2()?;
    let dy = dy.to_dtype(x_dtype)?.contiguous()?;
    let cols = weight.cols();
    fn run<T: CudaElement + CudaDType>(
        weight: &Arc<QuantWeight>,
        dy: &Tensor,
        t: usize,
        cols: usize,
    ) -> CResult<Tensor> {
        with_cuda(dy, "dy", |ds, ld| {
            let dev = device(ds);
            let dyv = view::<T>(ds, ld, "dy")?;
            let w = device_quant(&dev, weight)?;
            let mut dx = zeros::<f32>(&dev, t * cols)?;
            if t > 0 {
                let mut dxv = dx.slice_mut(0..t * cols);
                cuda::quant_matmul_dx(&dev, &dyv, t, &w, &mut dxv).map_err(msg)?;
            }
            Ok(tensor(dx, (t, cols), ds))
        })
    }
    let dx = with_element!("molora-quant-linear", x_dtype, T => run::<T>(weight, &dy, t, cols)?);
    dx.to_dtype(x_dtype)
}

/// `cuda_fwd` of the quantised linear: `y = x·deq(W)ᵀ` on [`cuda::quant_matmul`], in `x`'s dtype;
/// the packed weight is uploaded on a device's first call and kept while the host weight lives.
pub(crate) fn quant_fwd(
    weight: &Arc<QuantWeight>,
    x: (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape)> {
    let t = x.1.dims()[0];
    let out =
        with_element!("molora-quant-linear", x.0.dtype(), T => quant_fwd_typed::<T>(weight, x)?);
    Ok((out, Shape::from((t, weight.rows()))))
}

// ---------------------------------------------------------------------------------------------
// SAML weight-space mixing

fn weight_space_fwd_typed<T: CudaElement + CudaDType>(
    shape: &LoraShape,
    scale: f32,
    seq_len: usize,
    (x, lx): (&CudaStorage, &Layout),
    (ab, lab): (&CudaStorage, &Layout),
    (p, lp): (&CudaStorage, &Layout),
) -> CResult<CudaStorage> {
    let s = lp.dims()[0];
    let dev = device(x);
    let xv = view::<T>(x, lx, "x")?;
    let abv = view::<T>(ab, lab, "experts")?;
    let pv = view::<f32>(p, lp, "p")?;
    let t = s * seq_len;
    let mut y = zeros::<T>(&dev, t * shape.d_out)?;
    if t > 0 {
        let (a, b) = split_experts(&abv, shape);
        let mut yv = y.slice_mut(0..t * shape.d_out);
        ops::weight_space_forward(
            &dev,
            &xv,
            &a,
            &b,
            &pv,
            &vec![seq_len; s],
            shape,
            scale,
            &mut yv,
        )
        .map_err(msg)?;
    }
    Ok(wrap(y, x))
}

/// `cuda_fwd` of the weight-space LoRA: [`ops::weight_space_forward`] (the mixed adapters by
/// [`cuda::mix_experts`], then the segmented shrink and expand with one segment per sequence of
/// `seq_len` rows), in `x`'s dtype.
pub(crate) fn weight_space_fwd(
    shape: &LoraShape,
    scale: f32,
    seq_len: usize,
    x: (&CudaStorage, &Layout),
    ab: (&CudaStorage, &Layout),
    p: (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape)> {
    let t = p.1.dims()[0] * seq_len;
    let out = with_element!(
        "molora-weight-space-lora",
        x.0.dtype(),
        T => weight_space_fwd_typed::<T>(shape, scale, seq_len, x, ab, p)?
    );
    Ok((out, Shape::from((t, shape.d_out))))
}

#[allow(clippy::too_many_arguments)]
fn weight_space_bwd_typed<T: CudaElement + CudaDType>(
    shape: &LoraShape,
    scale: f32,
    seq_len: usize,
    x: &Tensor,
    ab: &Tensor,
    p: &Tensor,
    dy: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let (s, e) = p.dims2()?;
    let t = s * seq_len;
    with_cuda(x, "x", |xs, lx| {
        with_cuda(ab, "experts", |abs, lab| {
            with_cuda(p, "p", |ps, lp| {
                with_cuda(dy, "dy", |dys, ldy| {
                    if t == 0 {
                        return Ok((x.zeros_like()?, ab.zeros_like()?, p.zeros_like()?));
                    }
                    let dev = device(xs);
                    let xv = view::<T>(xs, lx, "x")?;
                    let abv = view::<T>(abs, lab, "experts")?;
                    let pv = view::<f32>(ps, lp, "p")?;
                    let dyv = view::<T>(dys, ldy, "dy")?;
                    let (a, b) = split_experts(&abv, shape);
                    let lengths = vec![seq_len; s];
                    let mut g = LoraGradSlices::new(&dev, t, shape, s * e)?;
                    g.with_out(t, shape, s * e, |out| {
                        ops::weight_space_backward(
                            &dev, &xv, &a, &b, &pv, &lengths, shape, scale, &dyv, out,
                        )
                    })?;
                    g.tensors(xs, x, ab, (s, e))
                })
            })
        })
    })
}

/// Backward of the weight-space LoRA on the GPU: `(dx, d[A;B], dp)` by
/// [`ops::weight_space_backward`] (its forward again, then its backward); nothing goes through the
/// host.
pub(crate) fn weight_space_bwd(
    shape: &LoraShape,
    scale: f32,
    seq_len: usize,
    x: &Tensor,
    ab: &Tensor,
    p: &Tensor,
    dy: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let dy = dy.to_dtype(x.dtype())?.contiguous()?;
    with_element!(
        "molora-weight-space-lora",
        x.dtype(),
        T => weight_space_bwd_typed::<T>(shape, scale, seq_len, x, ab, p, &dy)
    )
}
