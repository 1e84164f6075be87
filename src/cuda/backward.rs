//! Backward of the grouped LoRA part on the GPU (`cuda/backward.cu`), deterministic: the GPU
//! counterpart of [`crate::cpu::backward::lora_backward`] over the forward's dispatch plan.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::device::{activation_code, check_launch, checked_i32, Device};
use super::dispatch::DevicePlan;
use super::ffi;
use super::lora::CudaElement;
use crate::cpu::backward::LoraGrads;
use crate::cpu::dispatch::check_scale;
use crate::error::check_len;
use crate::{Error, LoraShape, Result};

/// Device buffers of the LoRA gradients (f32) for `T` tokens, `k_max` slots and a [`LoraShape`],
/// plus the `u = dy·B` workspace: `[T·k_max, r]` for the segmented backward
/// ([`DeviceLoraGrads::new`]), or `[T, E·r]` and the per-token gate `[T, E]` as well for the
/// dense-gated backward ([`DeviceLoraGrads::new_dense_gated`], which serves both). Allocate once per
/// shape and reuse; the backward ops allocate nothing.
#[derive(Debug)]
pub struct DeviceLoraGrads {
    num_tokens: usize,
    k_max: usize,
    shape: LoraShape,
    dense_gated: bool,
    // Each buffer holds one element more than it needs: the driver cannot allocate zero bytes.
    da: CudaSlice<f32>,
    db: CudaSlice<f32>,
    dx: CudaSlice<f32>,
    dw: CudaSlice<f32>,
    u: CudaSlice<f32>,
}

impl DeviceLoraGrads {
    pub fn new(dev: &Device, num_tokens: usize, k_max: usize, shape: &LoraShape) -> Result<Self> {
        let slots = checked_i32("num_tokens * k_max", num_tokens, k_max)?;
        Ok(DeviceLoraGrads {
            num_tokens,
            k_max,
            shape: *shape,
            dense_gated: false,
            da: dev.zeros(shape.a_len() + 1)?,
            db: dev.zeros(shape.b_len() + 1)?,
            dx: dev.zeros(num_tokens * shape.d_in + 1)?,
            dw: dev.zeros(slots + 1)?,
            u: dev.zeros(slots * shape.rank + 1)?,
        })
    }

    /// Buffers for [`lora_backward_dense_gated`] (and [`lora_backward_experts`]): the workspace holds
    /// `U` `[T, E·r]` and the per-token expert gate `[T, E]`. `E·r` must be at most
    /// [`super::DENSE_GATED_MAX_COLUMNS`].
    pub fn new_dense_gated(
        dev: &Device,
        num_tokens: usize,
        k_max: usize,
        shape: &LoraShape,
    ) -> Result<Self> {
        let columns = shape.num_experts * shape.rank;
        if columns > super::DENSE_GATED_MAX_COLUMNS {
            return Err(Error::Unsupported {
                op: "lora_backward_dense_gated",
                what: format!(
                    "E·r = {columns} (the dense-gated path takes up to {}; use the segmented path)",
                    super::DENSE_GATED_MAX_COLUMNS
                ),
            });
        }
        let slots = checked_i32("num_tokens * k_max", num_tokens, k_max)?;
        checked_i32("num_tokens * d_in", num_tokens, shape.d_in)?;
        let dense = checked_i32(
            "num_tokens * (E·r + E)",
            num_tokens,
            columns + shape.num_experts,
        )?;
        Ok(DeviceLoraGrads {
            num_tokens,
            k_max,
            shape: *shape,
            dense_gated: true,
            da: dev.zeros(shape.a_len() + 1)?,
            db: dev.zeros(shape.b_len() + 1)?,
            dx: dev.zeros(num_tokens * shape.d_in + 1)?,
            dw: dev.zeros(slots + 1)?,
            u: dev.zeros(dense.max(slots * shape.rank) + 1)?,
        })
    }

    /// `dA` `[E, r, d_in]` on the device.
    pub fn da(&self) -> CudaView<'_, f32> {
        self.da.slice(0..self.shape.a_len())
    }
    /// `dB` `[E, d_out, r]` on the device.
    pub fn db(&self) -> CudaView<'_, f32> {
        self.db.slice(0..self.shape.b_len())
    }
    /// `dx` through the experts `[T, d_in]` on the device.
    pub fn dx(&self) -> CudaView<'_, f32> {
        self.dx.slice(0..self.num_tokens * self.shape.d_in)
    }
    /// `dw` `[T, k_max]` on the device.
    pub fn dw(&self) -> CudaView<'_, f32> {
        self.dw.slice(0..self.num_tokens * self.k_max)
    }

    /// The gradient buffers `(dA, dB, dx, dw)`, each one element longer than its gradient (the
    /// driver cannot allocate zero bytes), for a caller that hands them on without copying; the
    /// `u` workspace is dropped.
    #[cfg(feature = "candle-cuda")]
    pub(crate) fn into_parts(
        self,
    ) -> (
        CudaSlice<f32>,
        CudaSlice<f32>,
        CudaSlice<f32>,
        CudaSlice<f32>,
    ) {
        (self.da, self.db, self.dx, self.dw)
    }

    /// Bytes of device memory these buffers hold (gradients and the `u` workspace), allocated once
    /// by [`DeviceLoraGrads::new`]; [`lora_backward_experts`] allocates nothing per call.
    pub fn device_bytes(&self) -> usize {
        std::mem::size_of::<f32>()
            * (self.da.len() + self.db.len() + self.dx.len() + self.dw.len() + self.u.len())
    }

    /// Copies the gradients to the host (waits for the stream).
    pub fn to_host(&self, dev: &Device) -> Result<LoraGrads<f32>> {
        let take = |s: &CudaSlice<f32>, n: usize| -> Result<Vec<f32>> {
            let mut v = dev.download(s)?;
            v.truncate(n);
            Ok(v)
        };
        Ok(LoraGrads {
            da: take(&self.da, self.shape.a_len())?,
            db: take(&self.db, self.shape.b_len())?,
            dx: take(&self.dx, self.num_tokens * self.shape.d_in)?,
            dw: take(&self.dw, self.num_tokens * self.k_max)?,
        })
    }
}

/// Gradients of the LoRA part given `dy` `[T, d_out]`, with the forward's plan and its sorted
/// shrink `h` `[T·k_max, r]` (from [`super::shrink_experts`]): `dA`, `dB` (per-expert reductions over
/// the expert's pairs in sorted order), `dx` through the experts and `dw`, into `grads`. Formulas
/// as in [`crate::cpu::backward::lora_backward`]; deterministic, asynchronous.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_experts<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    ids: &impl DevicePtr<i32>,
    weights: &impl DevicePtr<f32>,
    h: &impl DevicePtr<f32>,
    dy: &impl DevicePtr<T>,
    scale: f32,
    grads: &mut DeviceLoraGrads,
) -> Result<()> {
    const OP: &str = "lora_backward_experts";
    check_scale(scale)?;
    let (t, k) = (plan.num_tokens(), plan.k_max());
    check_len(
        "experts of the plan vs shape.num_experts",
        shape.num_experts,
        plan.num_experts(),
    )?;
    check_len("gradient buffers: tokens", t, grads.num_tokens)?;
    check_len("gradient buffers: k_max", k, grads.k_max)?;
    if grads.shape != *shape {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "gradient buffers made for {:?}, called with {shape:?}",
                grads.shape
            ),
        });
    }
    check_len("x [T, d_in]", t * shape.d_in, x.len())?;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("routing ids [T, k_max]", t * k, ids.len())?;
    check_len("routing weights [T, k_max]", t * k, weights.len())?;
    check_len("h [T * k_max, r]", t * k * shape.rank, h.len())?;
    check_len("dy [T, d_out]", t * shape.d_out, dy.len())?;
    if t > 65535 || shape.num_experts > 65535 {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "{t} tokens / {} experts (the backward grid takes up to 65535 each)",
                shape.num_experts
            ),
        });
    }
    let stream = dev.stream();
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (a_ptr, _g1) = a.device_ptr(stream);
    let (b_ptr, _g2) = b.device_ptr(stream);
    let (dy_ptr, _g3) = dy.device_ptr(stream);
    let (h_ptr, _g4) = h.device_ptr(stream);
    let (ids_ptr, _g5) = ids.device_ptr(stream);
    let (w_ptr, _g6) = weights.device_ptr(stream);
    let (off_ptr, sorted_ptr, _g7) = plan.offsets_and_sorted(stream);
    let (inv_ptr, _g8) = plan.inverse(stream);
    let (u_ptr, _g9) = grads.u.device_ptr_mut(stream);
    let (da_ptr, _g10) = grads.da.device_ptr_mut(stream);
    let (db_ptr, _g11) = grads.db.device_ptr_mut(stream);
    let (dx_ptr, _g12) = grads.dx.device_ptr_mut(stream);
    let (dw_ptr, _g13) = grads.dw.device_ptr_mut(stream);
    let args = ffi::molora_lora_backward_args {
        x: x_ptr as *const _,
        a: a_ptr as *const _,
        b: b_ptr as *const _,
        dy: dy_ptr as *const _,
        h: h_ptr as *const f32,
        ids: ids_ptr as *const i32,
        weights: w_ptr as *const f32,
        expert_offsets: off_ptr as *const i32,
        sorted_slots: sorted_ptr as *const i32,
        slot_to_sorted: inv_ptr as *const i32,
        u: u_ptr as *mut f32,
        da: da_ptr as *mut f32,
        db: db_ptr as *mut f32,
        dx: dx_ptr as *mut f32,
        dw: dw_ptr as *mut f32,
        scale,
        num_tokens: t as i32,
        k_max: k as i32,
        num_experts: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_in: shape.d_in as i32,
        d_out: shape.d_out as i32,
    };
    // SAFETY: every input has the length checked above; the plan was built for this T, k_max and E
    // (its sorted slots index the routing, its positions index h and u); the gradient buffers were
    // allocated for this T, k_max and shape. Grid dimensions were checked against 65535.
    let code = unsafe { T::LORA_BACKWARD(&args, dev.raw_stream()) };
    check_launch(OP, code)
}

/// Gradients of the dense-gated LoRA forward ([`super::lora_dense_gated`]) given `dy` `[T, d_out]`,
/// without dispatch: from the forward's all-experts shrink `H` `[T, E·r]` (held by `ws` after the
/// forward ran) and its routing `ids`/`weights` `[T, k_max]`, writes `dA`, `dB`, `dx` (through the
/// experts) and `dw` into `grads` (made by [`DeviceLoraGrads::new_dense_gated`]). The same
/// gradients as [`crate::cpu::backward::lora_backward`]; deterministic (each output summed by one
/// thread in a fixed order), asynchronous. Memory: the `[T, E·r]` intermediates `H` (the forward's)
/// and `U = dy·B_all` are kept, never `[T, E, d]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_dense_gated<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    ids: &impl DevicePtr<i32>,
    weights: &impl DevicePtr<f32>,
    k_max: usize,
    ws: &super::DenseGatedWorkspace,
    dy: &impl DevicePtr<T>,
    scale: f32,
    grads: &mut DeviceLoraGrads,
) -> Result<()> {
    const OP: &str = "lora_backward_dense_gated";
    check_scale(scale)?;
    let t = ws.num_tokens;
    let columns = shape.num_experts * shape.rank;
    check_len("workspace columns (E * r)", columns, ws.columns)?;
    check_len("gradient buffers: tokens", t, grads.num_tokens)?;
    check_len("gradient buffers: k_max", k_max, grads.k_max)?;
    if grads.shape != *shape || !grads.dense_gated {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "gradient buffers made for {:?}{}, called with {shape:?} (use DeviceLoraGrads::new_dense_gated)",
                grads.shape,
                if grads.dense_gated { "" } else { " by DeviceLoraGrads::new" }
            ),
        });
    }
    check_len("x [T, d_in]", t * shape.d_in, x.len())?;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("routing ids [T, k_max]", t * k_max, ids.len())?;
    check_len("routing weights [T, k_max]", t * k_max, weights.len())?;
    check_len("dy [T, d_out]", t * shape.d_out, dy.len())?;
    checked_i32("T * d_out", t, shape.d_out)?;
    let stream = dev.stream();
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (a_ptr, _g1) = a.device_ptr(stream);
    let (b_ptr, _g2) = b.device_ptr(stream);
    let (dy_ptr, _g3) = dy.device_ptr(stream);
    let (h_ptr, _g4) = ws.h.device_ptr(stream);
    let (ids_ptr, _g5) = ids.device_ptr(stream);
    let (w_ptr, _g6) = weights.device_ptr(stream);
    let (u_ptr, _g7) = grads.u.device_ptr_mut(stream);
    let (da_ptr, _g8) = grads.da.device_ptr_mut(stream);
    let (db_ptr, _g9) = grads.db.device_ptr_mut(stream);
    let (dx_ptr, _g10) = grads.dx.device_ptr_mut(stream);
    let (dw_ptr, _g11) = grads.dw.device_ptr_mut(stream);
    let u_ptr = u_ptr as *mut f32;
    let args = ffi::molora_lora_backward_dense_args {
        x: x_ptr as *const _,
        a: a_ptr as *const _,
        b: b_ptr as *const _,
        dy: dy_ptr as *const _,
        h: h_ptr as *const f32,
        ids: ids_ptr as *const i32,
        weights: w_ptr as *const f32,
        u: u_ptr,
        // The gate [T, E] follows U [T, E·r] in the workspace; wrapping_add keeps this safe code.
        gate: u_ptr.wrapping_add(t * columns),
        da: da_ptr as *mut f32,
        db: db_ptr as *mut f32,
        dx: dx_ptr as *mut f32,
        dw: dw_ptr as *mut f32,
        scale,
        num_tokens: t as i32,
        k_max: k_max as i32,
        num_experts: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_in: shape.d_in as i32,
        d_out: shape.d_out as i32,
    };
    // SAFETY: x holds T·d_in, A E·r·d_in, B E·d_out·r, dy T·d_out, ids/weights T·k_max elements
    // (checked); the workspace's H holds T·E·r floats (made for this T and E·r, checked); the
    // gradient buffers were made by new_dense_gated for this T, k_max and shape, so u holds
    // T·(E·r + E) floats (U, then the gate at offset T·E·r) and dA, dB, dx, dw their sizes. E·r is
    // at most DENSE_GATED_MAX_COLUMNS (checked when the buffers were made). The kernels skip ids
    // outside [0, E). The guards order every buffer on `stream`.
    let code = unsafe { T::LORA_BACKWARD_DENSE(&args, dev.raw_stream()) };
    check_launch(OP, code)
}

/// Gating backward on the GPU, the counterpart of [`crate::cpu::backward::gate_backward`] followed by
/// [`crate::cpu::backward::softmax_backward`] / [`crate::cpu::backward::sigmoid_backward`]: from the
/// forward's logits `[T, E]`, its routing `ids` `[T, k_max]` and `dw = ∂L/∂w` `[T, k_max]`, writes
/// `dz = ∂L/∂logits` `[T, E]` and, for a threshold gate, `dτ` `[T]`. For a forward with a
/// hierarchical combination use [`gating_backward_hierarchical`].
#[allow(clippy::too_many_arguments)]
pub fn gating_backward(
    dev: &Device,
    logits: &impl DevicePtr<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: crate::cpu::Activation,
    temperature: f32,
    gate: &super::DeviceGate<'_>,
    ids: &impl DevicePtr<i32>,
    dw: &impl DevicePtr<f32>,
    dz: &mut impl DevicePtrMut<f32>,
    dtau: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    gating_backward_impl(
        dev,
        logits,
        num_tokens,
        num_experts,
        Some(act),
        temperature,
        None,
        gate,
        ids,
        dw,
        dz,
        dtau,
        None,
    )
}

/// Backward of [`super::gate_probabilities`], the counterpart of
/// [`crate::cpu::backward::gate_backward`]: from the forward's probabilities `probs` `[T, E]`, its
/// routing `ids` `[T, k_max]` and `dw` `[T, k_max]`, writes `dp = ∂L/∂p` `[T, E]` and, for a
/// threshold gate, `dτ` `[T]`. Selection is not differentiated.
#[allow(clippy::too_many_arguments)]
pub fn gate_probabilities_backward(
    dev: &Device,
    probs: &impl DevicePtr<f32>,
    num_tokens: usize,
    num_experts: usize,
    gate: &super::DeviceGate<'_>,
    ids: &impl DevicePtr<i32>,
    dw: &impl DevicePtr<f32>,
    dp: &mut impl DevicePtrMut<f32>,
    dtau: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    gating_backward_impl(
        dev,
        probs,
        num_tokens,
        num_experts,
        None,
        1.0,
        None,
        gate,
        ids,
        dw,
        dp,
        dtau,
        None,
    )
}

/// Where [`gating_backward_hierarchical`] writes `dλ` of a λ-mix: `per_token` `[T]` receives each
/// token's `dλ_t = Σ_e dp_te·(g_se − l_te)`, `total` `[1]` their sum `Σ_t dλ_t`, formed by one block
/// in a fixed order (deterministic).
#[derive(Debug)]
pub struct DlambdaOut<'a> {
    pub per_token: &'a mut CudaSlice<f32>,
    pub total: &'a mut CudaSlice<f32>,
}

/// Gating backward through a hierarchical combination (HDMoLE) on the GPU: as [`gating_backward`]
/// for a forward run by [`super::gating`] with `Some(hierarchy)`. The local probabilities `l` are
/// recomputed from the logits and combined with the sequence's global posterior `g` exactly as the
/// forward did; `dp` of the combined `p` (through the gate) goes through the combination to `dl`, and
/// `dz` is the activation's backward at `l`:
///
/// * λ-mix `p = λ·g + (1 − λ)·l`: `dl = (1 − λ)·dp`, and `dλ = Σ_t Σ_e dp_te·(g_se − l_te)` into
///   `dlambda` when given (the counterpart of [`crate::cpu::backward::mix_combine_backward`]);
/// * product `p = g ⊙ l / Σ(g ⊙ l)`: `dl = g ⊙ (dp − ⟨dp, p⟩)/Σ(g ⊙ l)`, or `dl = dp` for a row
///   whose sum is 0 (the counterpart of [`crate::cpu::backward::product_combine_backward`]); a
///   `dlambda` given here receives zeros.
///
/// The global posterior is a constant (a frozen classifier's output): it gets no gradient.
#[allow(clippy::too_many_arguments)]
pub fn gating_backward_hierarchical(
    dev: &Device,
    logits: &impl DevicePtr<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: crate::cpu::Activation,
    temperature: f32,
    hierarchy: (&super::DeviceSeqRouting, crate::cpu::HierarchicalCombine),
    gate: &super::DeviceGate<'_>,
    ids: &impl DevicePtr<i32>,
    dw: &impl DevicePtr<f32>,
    dz: &mut impl DevicePtrMut<f32>,
    dtau: Option<&mut CudaSlice<f32>>,
    dlambda: Option<DlambdaOut<'_>>,
) -> Result<()> {
    gating_backward_impl(
        dev,
        logits,
        num_tokens,
        num_experts,
        Some(act),
        temperature,
        Some(hierarchy),
        gate,
        ids,
        dw,
        dz,
        dtau,
        dlambda,
    )
}

#[allow(clippy::too_many_arguments)]
fn gating_backward_impl(
    dev: &Device,
    logits: &impl DevicePtr<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: Option<crate::cpu::Activation>,
    temperature: f32,
    hierarchy: Option<(&super::DeviceSeqRouting, crate::cpu::HierarchicalCombine)>,
    gate: &super::DeviceGate<'_>,
    ids: &impl DevicePtr<i32>,
    dw: &impl DevicePtr<f32>,
    dz: &mut impl DevicePtrMut<f32>,
    dtau: Option<&mut CudaSlice<f32>>,
    dlambda: Option<DlambdaOut<'_>>,
) -> Result<()> {
    use super::DeviceGate;
    use crate::cpu::HierarchicalCombine;
    const OP: &str = "gating_backward";
    crate::cpu::gating::check_temperature(temperature)?;
    if num_experts == 0 || num_experts > super::MAX_GATING_EXPERTS {
        return Err(Error::Unsupported {
            op: OP,
            what: format!("{num_experts} experts (1..={})", super::MAX_GATING_EXPERTS),
        });
    }
    let k_max = gate.k_max(num_experts);
    if let DeviceGate::TopK { k, .. } = gate {
        crate::cpu::gating::check_k(*k, num_experts)?;
    }
    if let Some((g, combine)) = &hierarchy {
        crate::cpu::gating::check_combine(*combine)?;
        check_len("global posterior experts", num_experts, g.num_experts)?;
        check_len("global posterior segment rows", num_tokens, g.num_rows)?;
    }
    let n_logits = checked_i32("num_tokens * num_experts", num_tokens, num_experts)?;
    check_len("logits [T, E]", n_logits, logits.len())?;
    check_len("dz [T, E]", n_logits, dz.len())?;
    check_len("routing ids [T, k_max]", num_tokens * k_max, ids.len())?;
    check_len("dw [T, k_max]", num_tokens * k_max, dw.len())?;
    if let DeviceGate::ThresholdPerToken(t) = gate {
        check_len("taus [T]", num_tokens, t.len())?;
    }
    if let Some(d) = &dtau {
        check_len("dtau [T]", num_tokens, d.len())?;
    }
    if let Some(d) = &dlambda {
        check_len("dλ per token [T]", num_tokens, d.per_token.len())?;
        check_len("dλ total [1]", 1, d.total.len())?;
    }
    if num_tokens == 0 && dlambda.is_none() {
        return Ok(());
    }
    let stream = dev.stream();
    let (l_ptr, _g0) = logits.device_ptr(stream);
    let (ids_ptr, _g1) = ids.device_ptr(stream);
    let (dw_ptr, _g2) = dw.device_ptr(stream);
    let (dz_ptr, _g3) = dz.device_ptr_mut(stream);
    let dtau_ptr = dtau.map(|d| d.device_ptr_mut(stream));
    let taus = match gate {
        DeviceGate::ThresholdPerToken(v) => Some(v.device_ptr(stream)),
        _ => None,
    };
    let hier = hierarchy.map(|(g, _)| {
        let (o, go) = g.offsets.device_ptr(stream);
        let (p, gp) = g.probs.device_ptr(stream);
        (o, p, g.num_seqs, [go, gp])
    });
    let (combine, lambda) = match hierarchy.map(|h| h.1) {
        None => (ffi::MOLORA_COMBINE_NONE, 0.0),
        Some(HierarchicalCombine::Mix { lambda }) => (ffi::MOLORA_COMBINE_MIX, lambda),
        Some(HierarchicalCombine::Product) => (ffi::MOLORA_COMBINE_PRODUCT, 0.0),
    };
    let dl = dlambda.map(|d| {
        (
            d.per_token.device_ptr_mut(stream),
            d.total.device_ptr_mut(stream),
        )
    });
    let (kind, renormalize, tau) = match gate {
        DeviceGate::TopK { renormalize, .. } => (ffi::MOLORA_GATE_TOPK, *renormalize, 0.0),
        DeviceGate::Threshold(tau) => (ffi::MOLORA_GATE_THRESHOLD, false, *tau),
        DeviceGate::ThresholdPerToken(_) => (ffi::MOLORA_GATE_THRESHOLD, false, 0.0),
        DeviceGate::Dense => (ffi::MOLORA_GATE_DENSE, false, 0.0),
    };
    let args = ffi::molora_gating_backward_args {
        logits: l_ptr as *const f32,
        ids: ids_ptr as *const i32,
        dw: dw_ptr as *const f32,
        dz: dz_ptr as *mut f32,
        dtau: dtau_ptr
            .as_ref()
            .map_or(std::ptr::null_mut(), |d| d.0 as *mut f32),
        taus: taus
            .as_ref()
            .map_or(std::ptr::null(), |t| t.0 as *const f32),
        tau,
        num_tokens: num_tokens as i32,
        num_experts: num_experts as i32,
        k_max: k_max as i32,
        activation: activation_code(act),
        temperature,
        gate: kind as i32,
        renormalize: renormalize as i32,
        combine: combine as i32,
        lambda,
        global_probs: hier
            .as_ref()
            .map_or(std::ptr::null(), |h| h.1 as *const f32),
        seq_offsets: hier
            .as_ref()
            .map_or(std::ptr::null(), |h| h.0 as *const i32),
        num_seqs: hier.as_ref().map_or(0, |h| h.2 as i32),
        dlambda_tokens: dl
            .as_ref()
            .map_or(std::ptr::null_mut(), |d| d.0 .0 as *mut f32),
        dlambda: dl
            .as_ref()
            .map_or(std::ptr::null_mut(), |d| d.1 .0 as *mut f32),
    };
    // SAFETY: logits and dz hold T·E, ids and dw T·k_max, taus, dtau and dλ per token T elements,
    // the dλ total 1 (checked); E is within the kernel's shared-memory limit; the global posterior was
    // uploaded whole from a validated SeqRouting of E experts whose segments cover exactly T rows, so
    // every token finds its sequence; λ is in [0, 1] (check_combine). The guards order every buffer
    // on `stream`.
    let code = unsafe { ffi::molora_gating_backward_f32(&args, dev.raw_stream()) };
    check_launch(OP, code)
}

/// Backward of SAML's weight-space mixing ([`super::mix_experts`]) on the GPU, deterministic: with
/// `Ā_s = Σ_e p_se·A_e`, `B̄_s = Σ_e p_se·B_e` and the gradients `dĀ` `[S, r, d_in]`, `dB̄`
/// `[S, d_out, r]` (f32), writes `dA_e = Σ_s p_se·dĀ_s` `[E, r, d_in]`, `dB_e = Σ_s p_se·dB̄_s`
/// `[E, d_out, r]` (sequences in order) and `dp_se = ⟨dĀ_s, A_e⟩ + ⟨dB̄_s, B_e⟩` `[S, E]` (a
/// fixed-order reduction per `(s, e)`), all f32. The counterpart of
/// [`crate::cpu::backward::mix_backward`] applied per sequence, its `dA`, `dB` summed over sequences.
#[allow(clippy::too_many_arguments)]
pub fn mix_backward<T: CudaElement>(
    dev: &Device,
    a: &impl DevicePtr<T>,
    b: &impl DevicePtr<T>,
    shape: &LoraShape,
    probs: &impl DevicePtr<f32>,
    num_seqs: usize,
    d_a_mixed: &impl DevicePtr<f32>,
    d_b_mixed: &impl DevicePtr<f32>,
    da: &mut impl DevicePtrMut<f32>,
    db: &mut impl DevicePtrMut<f32>,
    dp: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    const OP: &str = "mix_backward";
    let e = shape.num_experts;
    let per_a = shape.rank * shape.d_in;
    let per_b = shape.d_out * shape.rank;
    if num_seqs > 65535 || e > 65535 {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "{num_seqs} sequences / {e} experts (the mixing backward grid takes up to 65535 each)"
            ),
        });
    }
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("probs [S, E]", num_seqs * e, probs.len())?;
    check_len("dĀ [S, r, d_in]", num_seqs * per_a, d_a_mixed.len())?;
    check_len("dB̄ [S, d_out, r]", num_seqs * per_b, d_b_mixed.len())?;
    check_len("dA [E, r, d_in]", shape.a_len(), da.len())?;
    check_len("dB [E, d_out, r]", shape.b_len(), db.len())?;
    check_len("dp [S, E]", num_seqs * e, dp.len())?;
    let stream = dev.stream();
    let (a_ptr, _g0) = a.device_ptr(stream);
    let (b_ptr, _g1) = b.device_ptr(stream);
    let (p_ptr, _g2) = probs.device_ptr(stream);
    let (dam_ptr, _g3) = d_a_mixed.device_ptr(stream);
    let (dbm_ptr, _g4) = d_b_mixed.device_ptr(stream);
    let (da_ptr, _g5) = da.device_ptr_mut(stream);
    let (db_ptr, _g6) = db.device_ptr_mut(stream);
    let (dp_ptr, _g7) = dp.device_ptr_mut(stream);
    let args = ffi::molora_mix_backward_args {
        a: a_ptr as *const _,
        b: b_ptr as *const _,
        probs: p_ptr as *const f32,
        da_mixed: dam_ptr as *const f32,
        db_mixed: dbm_ptr as *const f32,
        da: da_ptr as *mut f32,
        db: db_ptr as *mut f32,
        dp: dp_ptr as *mut f32,
        num_experts: e as i32,
        num_seqs: num_seqs as i32,
        per_a: per_a as i64,
        per_b: per_b as i64,
    };
    // SAFETY: A, dA hold E·r·d_in, B, dB E·d_out·r, probs and dp S·E, dĀ S·r·d_in and dB̄ S·d_out·r
    // elements (checked); E and S are at most 65535 (grid limits, checked); per_a, per_b >= 1
    // (LoraShape). With S = 0 the kernels write dA = dB = 0 and read no sequence. The guards order
    // every buffer on `stream`.
    let code = unsafe { T::MIX_BACKWARD(&args, dev.raw_stream()) };
    check_launch(OP, code)
}

/// Router backward on the GPU, deterministic (tokens summed in order): `dW_g = dzᵀ·x` `[E, d_in]`,
/// `db = Σ_t dz` `[E]`, and when given `dx = dz·W_g` `[T, d_in]` (written, not accumulated), all
/// f32. The counterpart of [`crate::cpu::backward::router_backward`].
#[allow(clippy::too_many_arguments)]
pub fn router_backward<T: CudaElement>(
    dev: &Device,
    x: &impl DevicePtr<T>,
    num_tokens: usize,
    d_in: usize,
    w_g: &impl DevicePtr<T>,
    num_experts: usize,
    dz: &impl DevicePtr<f32>,
    dw_g: &mut impl DevicePtrMut<f32>,
    db: &mut impl DevicePtrMut<f32>,
    dx: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    const OP: &str = "router_backward";
    if d_in == 0 || num_experts == 0 {
        return Err(Error::InvalidDim {
            what: if d_in == 0 { "d_in" } else { "num_experts" },
            value: 0,
            reason: "must be at least 1",
        });
    }
    check_len(
        "x [T, d_in]",
        checked_i32("T * d_in", num_tokens, d_in)?,
        x.len(),
    )?;
    check_len(
        "router W_g [E, d_in]",
        checked_i32("E * d_in", num_experts, d_in)?,
        w_g.len(),
    )?;
    check_len(
        "dz [T, E]",
        checked_i32("T * E", num_tokens, num_experts)?,
        dz.len(),
    )?;
    check_len("dW_g [E, d_in]", num_experts * d_in, dw_g.len())?;
    check_len("db [E]", num_experts, db.len())?;
    if let Some(d) = &dx {
        check_len("dx [T, d_in]", num_tokens * d_in, d.len())?;
    }
    let stream = dev.stream();
    let (x_ptr, _g0) = x.device_ptr(stream);
    let (w_ptr, _g1) = w_g.device_ptr(stream);
    let (dz_ptr, _g2) = dz.device_ptr(stream);
    let (dwg_ptr, _g3) = dw_g.device_ptr_mut(stream);
    let (db_ptr, _g4) = db.device_ptr_mut(stream);
    let dx_ptr = dx.map(|d| d.device_ptr_mut(stream));
    let args = ffi::molora_router_backward_args {
        x: x_ptr as *const _,
        w_g: w_ptr as *const _,
        dz: dz_ptr as *const f32,
        dw_g: dwg_ptr as *mut f32,
        db: db_ptr as *mut f32,
        dx: dx_ptr
            .as_ref()
            .map_or(std::ptr::null_mut(), |d| d.0 as *mut f32),
        num_tokens: num_tokens as i32,
        d_in: d_in as i32,
        num_experts: num_experts as i32,
    };
    // SAFETY: every buffer has the length checked above and all products fit an i32; the guards
    // order them on `stream`.
    let code = unsafe { T::ROUTER_BACKWARD(&args, dev.raw_stream()) };
    check_launch(OP, code)
}
