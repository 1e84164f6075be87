//! The CUDA side of the candle ops (feature `candle-cuda`): each op's `cuda_fwd`, and the backward
//! of the LoRA part and of the gates, run molora's kernels on candle's CUDA storage, on the stream of
//! the tensor's candle device, without copying through the host and without waiting for the device.
//!
//! | op | forward kernels | backward |
//! |---|---|---|
//! | [`super::ops::routed_lora`] | [`cuda::MoleLoraForward::run_probs`]: the gate, then the segmented or dense-gated path by shape (any `E·r`) | the forward again, then [`cuda::MoleLoraForward::backward_probs`] |
//! | [`super::ops::mole_lora`] | dense gate ids, then the dense-gated shrink and expand | [`cuda::lora_backward_dense_gated`] (`dx`, `dA`, `dB`, `dw` for every `(t, e)`) |
//! | [`super::ops::top_k_gate`], [`super::ops::threshold_gate`] | [`cuda::gate_probabilities`], [`cuda::slots_to_dense`] | [`cuda::dense_to_slots`], [`cuda::gate_probabilities_backward`] |
//! | [`super::ops::quant_linear`] | [`cuda::quant_matmul`] (the packed weight uploaded once per device and weight) | [`cuda::quant_matmul_dx`] on the same packed weight |
//! | [`super::ops::weight_space_lora`] | [`cuda::WeightSpaceLora::forward`]: [`cuda::mix_experts`], segmented shrink and expand | [`cuda::WeightSpaceLora::backward`]: the mixed adapters' LoRA backward, then [`cuda::mix_backward`] |
//!
//! The gates cannot report bad probabilities without a host sync: on CUDA a NaN row gives no expert
//! and a negative probability is never selected, where the CPU path returns an error.

use std::sync::{Arc, Mutex, Weak};

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView};

use super::ops::{QuantWeight, RoutedGate};
use crate::cuda::{self, CudaElement, DeviceGate, DeviceWrite};
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

/// Ids `[T, E]` with `ids[t, e] = e`: every expert in every slot, so that the dense gate weights
/// `w` `[T, E]` are the routing's slot weights as they are.
fn all_expert_ids(
    dev: &cuda::Device,
    w: &CudaView<'_, f32>,
    t: usize,
    e: usize,
) -> CResult<CudaSlice<i32>> {
    let mut ids = zeros::<i32>(dev, t * e)?;
    let mut copy = zeros::<f32>(dev, t * e)?;
    if t > 0 {
        let mut ids_v = ids.slice_mut(0..t * e);
        let mut copy_v = copy.slice_mut(0..t * e);
        cuda::gate_probabilities(dev, w, t, e, &DeviceGate::Dense, &mut ids_v, &mut copy_v)
            .map_err(msg)?;
    }
    Ok(ids)
}

fn check_columns(shape: &LoraShape) -> Result<()> {
    let columns = shape.num_experts * shape.rank;
    if columns > cuda::DENSE_GATED_MAX_COLUMNS {
        return Err(Error::Unsupported {
            op: "mole_lora (CUDA)",
            what: format!(
                "E·r = {columns}: the candle op runs the dense-gated kernels, which take up to {} \
                 (call molora::cuda's segmented path directly for more)",
                cuda::DENSE_GATED_MAX_COLUMNS
            ),
        });
    }
    Ok(())
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
    let a = abv.slice(0..shape.a_len());
    let b = abv.slice(shape.a_len()..shape.a_len() + shape.b_len());
    let e = shape.num_experts;
    let mut y = zeros::<T>(&dev, t * shape.d_out)?;
    if t > 0 {
        let ids = all_expert_ids(&dev, &wv, t, e)?;
        let mut ws = cuda::DenseGatedWorkspace::new(&dev, t, shape).map_err(msg)?;
        let mut yv = y.slice_mut(0..t * shape.d_out);
        cuda::lora_dense_gated(
            &dev,
            &xv,
            &a,
            &b,
            shape,
            &ids.slice(0..t * e),
            &wv,
            e,
            scale,
            &mut ws,
            &mut yv,
        )
        .map_err(msg)?;
    }
    Ok(wrap(y, x))
}

/// `cuda_fwd` of the LoRA op: `Δy = s·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ` on the dense-gated kernels.
pub(crate) fn lora_fwd(
    shape: &LoraShape,
    scale: f32,
    x: (&CudaStorage, &Layout),
    ab: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape)> {
    check_columns(shape).map_err(msg)?;
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
                    let a = abv.slice(0..shape.a_len());
                    let b = abv.slice(shape.a_len()..shape.a_len() + shape.b_len());
                    let mut grads =
                        cuda::DeviceLoraGrads::new_dense_gated(&dev, t, e, shape).map_err(msg)?;
                    if t > 0 {
                        let ids = all_expert_ids(&dev, &wv, t, e)?;
                        let ids = ids.slice(0..t * e);
                        let mut ws = cuda::DenseGatedWorkspace::new(&dev, t, shape).map_err(msg)?;
                        cuda::dense_gated_shrink(&dev, &xv, &a, shape, &mut ws).map_err(msg)?;
                        cuda::lora_backward_dense_gated(
                            &dev, &xv, &a, &b, shape, &ids, &wv, e, &ws, &dyv, scale, &mut grads,
                        )
                        .map_err(msg)?;
                    }
                    // dx and dw become tensors as they are (their buffers hold one padding element
                    // the shapes do not read); dA and dB are joined into the one [A; B] gradient.
                    // With T = 0 every gradient is zero.
                    let (da, db, dx, dw) = grads.into_parts();
                    let dab = concat(
                        &dev,
                        &[(da.view(), shape.a_len()), (db.view(), shape.b_len())],
                    )?;
                    let (dx, dw) = (
                        dx.into_cuda_slice().map_err(msg)?,
                        dw.into_cuda_slice().map_err(msg)?,
                    );
                    let dx = tensor(dx, x.shape(), xs).to_dtype(x.dtype())?;
                    let dab = tensor(dab, ab.shape(), xs).to_dtype(ab.dtype())?;
                    let dw = tensor(dw, (t, e), xs);
                    Ok((dx, dab, dw))
                })
            })
        })
    })
}

/// Backward of the LoRA op on the GPU: `(dx, d[A;B], dw)`, `dw` for every `(t, e)` (exact also where
/// `w = 0`), from the dense-gated backward kernels. `dy` is made contiguous first.
pub(crate) fn lora_bwd(
    shape: &LoraShape,
    scale: f32,
    x: &Tensor,
    ab: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    check_columns(shape).map_err(msg)?;
    let dy = dy.to_dtype(x.dtype())?.contiguous()?;
    with_element!("molora-lora", x.dtype(), T => lora_bwd_typed::<T>(shape, scale, x, ab, w, &dy))
}

// ---------------------------------------------------------------------------------------------
// From router probabilities to the LoRA output

/// The device gate of [`super::ops::RoutedGate`], with `τ` read from the gate input.
fn routed_gate<'a>(gate: &RoutedGate, tau: Option<CudaView<'a, f32>>) -> CResult<DeviceGate<'a>> {
    Ok(match (gate, tau) {
        (RoutedGate::TopK { k, renormalize }, _) => DeviceGate::TopK {
            k: *k,
            renormalize: *renormalize,
        },
        (RoutedGate::Threshold, Some(tau)) => DeviceGate::ThresholdPerToken(tau.into()),
        (RoutedGate::Threshold, None) => {
            return Err(Error::Unsupported {
                op: "molora-routed-lora",
                what: "threshold gating without the thresholds tau [T]".into(),
            }
            .into())
        }
        (RoutedGate::Dense, _) => DeviceGate::Dense,
    })
}

/// `p` `[T, E]` and, for a threshold gate, `τ` `[T]`: the two ranges of the gate input.
fn split_gate_input<'a>(
    g: &'a CudaView<'a, f32>,
    gate: &RoutedGate,
    t: usize,
    e: usize,
) -> CResult<(CudaView<'a, f32>, Option<CudaView<'a, f32>>)> {
    let want = t * e
        + if matches!(gate, RoutedGate::Threshold) {
            t
        } else {
            0
        };
    crate::error::check_len("gate input (p, then tau)", want, g.len()).map_err(msg)?;
    let p = g.slice(0..t * e);
    let tau = matches!(gate, RoutedGate::Threshold).then(|| g.slice(t * e..t * e + t));
    Ok((p, tau))
}

/// A forward workspace for `t ≥ 1` tokens on the path [`cuda::LoraPath::for_shape`] picks, its run
/// from the probabilities, and the output `y` (zeroed, then accumulated into).
#[allow(clippy::too_many_arguments)]
fn routed_run<T: CudaElement + CudaDType>(
    dev: &cuda::Device,
    shape: &LoraShape,
    scale: f32,
    gate: &DeviceGate<'_>,
    x: &CudaView<'_, T>,
    ab: &CudaView<'_, T>,
    p: &CudaView<'_, f32>,
    t: usize,
) -> CResult<(cuda::MoleLoraForward, CudaSlice<T>)> {
    let path = cuda::LoraPath::for_shape(shape, T::DTYPE);
    let k_max = gate.k_max(shape.num_experts);
    let mut fwd = cuda::MoleLoraForward::new(dev, t, shape, k_max, path).map_err(msg)?;
    let a = ab.slice(0..shape.a_len());
    let b = ab.slice(shape.a_len()..shape.a_len() + shape.b_len());
    let mut y = zeros::<T>(dev, t * shape.d_out)?;
    {
        let mut yv = y.slice_mut(0..t * shape.d_out);
        fwd.run_probs(dev, x, p, gate, &a, &b, scale, &mut yv)
            .map_err(msg)?;
    }
    Ok((fwd, y))
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
    if t == 0 {
        return Ok(wrap(zeros::<T>(&dev, 0)?, x));
    }
    let dg = routed_gate(gate, tau)?;
    let (_, y) = routed_run(&dev, shape, scale, &dg, &xv, &abv, &pv, t)?;
    Ok(wrap(y, x))
}

/// `cuda_fwd` of [`super::ops::routed_lora`]: [`cuda::MoleLoraForward::run_probs`] (the gate's
/// slots stay on the device) on the segmented or dense-gated path, any `E·r`.
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

/// One new device buffer holding, one after the other, the first `n` values of each `(view, n)`:
/// how the ops hand their gradient parts (`dA` then `dB`, `dp` then `dτ`) to candle as one tensor.
fn concat(
    dev: &cuda::Device,
    parts: &[(cuda::BufferView<'_, f32>, usize)],
) -> CResult<CudaSlice<f32>> {
    let total: usize = parts.iter().map(|(_, n)| n).sum();
    let mut out = dev.zeros::<f32>(total.max(1)).map_err(msg)?;
    let mut at = 0;
    for (src, n) in parts {
        if *n > 0 {
            let src = src.slice(0..*n).map_err(msg)?;
            let mut dst = out.slice_mut(at..at + n).map_err(msg)?;
            dev.copy(&src, &mut dst).map_err(msg)?;
        }
        at += n;
    }
    out.into_cuda_slice().map_err(msg)
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
                    let threshold = matches!(gate, RoutedGate::Threshold);
                    if t == 0 {
                        return Ok((
                            x.zeros_like()?,
                            ab.zeros_like()?.to_dtype(ab.dtype())?,
                            g.zeros_like()?,
                        ));
                    }
                    let dg = routed_gate(gate, tau)?;
                    // The forward again (its plan, shrink and routing are what the backward reads).
                    let (fwd, _) = routed_run(&dev, shape, scale, &dg, &xv, &abv, &pv, t)?;
                    let mut grads = fwd.new_grads(&dev).map_err(msg)?;
                    let a = abv.slice(0..shape.a_len());
                    let b = abv.slice(shape.a_len()..shape.a_len() + shape.b_len());
                    fwd.backward_probs(&dev, &xv, &pv, &dg, &a, &b, &dyv, scale, &mut grads)
                        .map_err(msg)?;
                    let lora = grads.lora();
                    let dx = concat(&dev, &[(lora.dx(), t * shape.d_in)])?;
                    let dab = concat(
                        &dev,
                        &[(lora.da(), shape.a_len()), (lora.db(), shape.b_len())],
                    )?;
                    let dgate = concat(
                        &dev,
                        &[
                            (grads.dp(), t * e),
                            (grads.dtau(), if threshold { t } else { 0 }),
                        ],
                    )?;
                    Ok((
                        tensor(dx, x.shape(), xs).to_dtype(x.dtype())?,
                        tensor(dab, ab.shape(), xs).to_dtype(ab.dtype())?,
                        tensor(dgate, g.shape(), xs),
                    ))
                })
            })
        })
    })
}

/// Backward of [`super::ops::routed_lora`] on the GPU: `(dx, d[A;B], d[p; τ])` from
/// [`cuda::MoleLoraForward::backward_probs`] after re-running the forward.
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

/// The gates of the candle ops, as the kernels take them.
pub(crate) enum GateKind {
    TopK {
        k: usize,
        renormalize: bool,
    },
    /// Per-token thresholds `τ` `[T]`.
    Threshold,
}

/// Runs the gate on `p` `[T, E]` (and `τ` `[T]` for the threshold gate): the routing's ids and
/// weights `[T, k_max]` and `k_max`.
fn routing(
    dev: &cuda::Device,
    kind: &GateKind,
    p: &CudaView<'_, f32>,
    tau: Option<&CudaView<'_, f32>>,
    t: usize,
    e: usize,
) -> CResult<(CudaSlice<i32>, CudaSlice<f32>, usize)> {
    let gate = device_gate(kind, tau)?;
    let k_max = gate.k_max(e);
    let mut ids = zeros::<i32>(dev, t * k_max)?;
    let mut weights = zeros::<f32>(dev, t * k_max)?;
    if t > 0 {
        let mut iv = ids.slice_mut(0..t * k_max);
        let mut wv = weights.slice_mut(0..t * k_max);
        cuda::gate_probabilities(dev, p, t, e, &gate, &mut iv, &mut wv).map_err(msg)?;
    }
    Ok((ids, weights, k_max))
}

fn device_gate<'a>(kind: &GateKind, tau: Option<&CudaView<'a, f32>>) -> CResult<DeviceGate<'a>> {
    Ok(match (kind, tau) {
        (GateKind::TopK { k, renormalize }, _) => DeviceGate::TopK {
            k: *k,
            renormalize: *renormalize,
        },
        (GateKind::Threshold, Some(tau)) => DeviceGate::ThresholdPerToken(tau.slice(..).into()),
        (GateKind::Threshold, None) => {
            return Err(Error::Unsupported {
                op: "molora-threshold-gate",
                what: "threshold gating without the thresholds tau [T]".into(),
            }
            .into())
        }
    })
}

/// `cuda_fwd` of the gates: the dense weights `[T, E]` of the gate over probabilities `p`.
pub(crate) fn gate_fwd(
    kind: &GateKind,
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
    if let Some(tv) = &tv {
        crate::error::check_len("tau [T]", t, tv.len()).map_err(msg)?;
    }
    let mut dense = zeros::<f32>(&dev, t * e)?;
    if t > 0 {
        let (ids, weights, k_max) = routing(&dev, kind, &pv, tv.as_ref(), t, e)?;
        let mut dv = dense.slice_mut(0..t * e);
        cuda::slots_to_dense(
            &dev,
            &ids.slice(0..t * k_max),
            &weights.slice(0..t * k_max),
            t,
            k_max,
            e,
            &mut dv,
        )
        .map_err(msg)?;
    }
    Ok((wrap(dense, p), Shape::from((t, e))))
}

/// Backward of the gates on the GPU: `dp` `[T, E]` and, for the threshold gate, `dτ` `[T]`, from the
/// gradient of the dense weights.
pub(crate) fn gate_bwd(
    kind: &GateKind,
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
                if t > 0 {
                    let (ids, _weights, k_max) = routing(&dev, kind, &pv, tv, t, e)?;
                    let ids = ids.slice(0..t * k_max);
                    let mut dw = zeros::<f32>(&dev, t * k_max)?;
                    {
                        let mut dwv = dw.slice_mut(0..t * k_max);
                        cuda::dense_to_slots(&dev, &ids, &gv, t, k_max, e, &mut dwv)
                            .map_err(msg)?;
                    }
                    let gate = device_gate(kind, tv)?;
                    let mut dpv = dp.slice_mut(0..t * e);
                    let threshold = matches!(kind, GateKind::Threshold);
                    cuda::gate_probabilities_backward(
                        &dev,
                        &pv,
                        t,
                        e,
                        &gate,
                        &ids,
                        &dw.slice(0..t * k_max),
                        &mut dpv,
                        threshold.then_some(&mut dtau as &mut dyn DeviceWrite<f32>),
                    )
                    .map_err(msg)?;
                }
                let dp = tensor(dp, (t, e), ps);
                let dtau = matches!(kind, GateKind::Threshold).then(|| tensor(dtau, t, ps));
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
        let a = abv.slice(0..shape.a_len());
        let b = abv.slice(shape.a_len()..shape.a_len() + shape.b_len());
        let mut ws =
            cuda::WeightSpaceLora::<T>::new(&dev, &vec![seq_len; s], shape).map_err(msg)?;
        let mut yv = y.slice_mut(0..t * shape.d_out);
        ws.forward(&dev, &xv, &a, &b, &pv, scale, &mut yv)
            .map_err(msg)?;
    }
    Ok(wrap(y, x))
}

/// `cuda_fwd` of the weight-space LoRA: [`cuda::WeightSpaceLora::forward`] (the mixed adapters by
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
                    let a = abv.slice(0..shape.a_len());
                    let b = abv.slice(shape.a_len()..shape.a_len() + shape.b_len());
                    let mut ws = cuda::WeightSpaceLora::<T>::new(&dev, &vec![seq_len; s], shape)
                        .map_err(msg)?;
                    // The forward again: the backward reads its mixed adapters and shrink.
                    let mut scratch = zeros::<T>(&dev, t * shape.d_out)?;
                    {
                        let mut sv = scratch.slice_mut(0..t * shape.d_out);
                        ws.forward(&dev, &xv, &a, &b, &pv, scale, &mut sv)
                            .map_err(msg)?;
                    }
                    ws.backward(&dev, &xv, &a, &b, &pv, &dyv, scale)
                        .map_err(msg)?;
                    let dx = concat(&dev, &[(ws.dx(), t * shape.d_in)])?;
                    let dp = concat(&dev, &[(ws.dp(), s * e)])?;
                    let dab = concat(&dev, &[(ws.da(), shape.a_len()), (ws.db(), shape.b_len())])?;
                    Ok((
                        tensor(dx, x.shape(), xs).to_dtype(x.dtype())?,
                        tensor(dab, ab.shape(), xs).to_dtype(ab.dtype())?,
                        tensor(dp, (s, e), xs),
                    ))
                })
            })
        })
    })
}

/// Backward of the weight-space LoRA on the GPU: `(dx, d[A;B], dp)` by
/// [`cuda::WeightSpaceLora::backward`] after re-running its forward; nothing goes through the host.
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
