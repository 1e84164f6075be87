//! The framework ops on device memory: the CUDA twins of [`crate::cpu::ops`], each op's forward and
//! backward as a framework binding calls it (candle's CUDA path, the PyTorch package), over any
//! device buffers ([`DeviceRead`] / [`DeviceWrite`]: molora's [`Buffer`]s or cudarc's slices of a
//! framework's tensors, so nothing is copied). Each allocates the workspace it needs on the device,
//! enqueues its kernels on the device's stream and returns without waiting: no host sync, nothing
//! copied to the host.
//!
//! Conventions as in [`crate::cpu::ops`]: `x` `[T, d_in]`, experts `a` `[E, r, d_in]` and `b`
//! `[E, d_out, r]` of the element type; probabilities, gate weights and thresholds f32. Forwards
//! *add* into their output (`y += Δy`: pass zeros for `Δy` alone); backwards write f32 gradients.
//!
//! What the device cannot check without a sync (ids outside `-1..E` in slots, NaN or negative
//! probabilities) gives empty slots instead of the CPU path's error.

use super::device::Device;
use super::forward::{MoleLoraForward, MoleLoraGrads};
use super::gating::{dense_to_slots, gate_probabilities, slots_to_dense, DeviceGate};
use super::lora::{CudaElement, LoraPath};
use super::memory::{Buffer, BufferView, DeviceRead, DeviceWrite};
use super::weight_space::WeightSpaceLora;
use crate::error::{check_len, check_matrix};
use crate::gate::RoutedGate;
use crate::{Error, LoraShape, Result};

/// The device form of a [`RoutedGate`], with per-token thresholds `tau` `[T]` for
/// [`RoutedGate::Threshold`].
pub fn device_gate<'a>(
    gate: &RoutedGate,
    tau: Option<BufferView<'a, f32>>,
) -> Result<DeviceGate<'a>> {
    match (gate, tau) {
        (RoutedGate::TopK { k, renormalize }, _) => Ok(DeviceGate::TopK {
            k: *k,
            renormalize: *renormalize,
        }),
        (RoutedGate::Threshold, Some(tau)) => Ok(DeviceGate::ThresholdPerToken(tau)),
        (RoutedGate::Threshold, None) => Err(Error::Unsupported {
            op: "threshold gate (CUDA)",
            what: "a threshold gate without its thresholds tau [T]".into(),
        }),
        (RoutedGate::Dense, _) => Ok(DeviceGate::Dense),
    }
}

/// The slots `(ids, weights)` `[T, k_max]` of `gate` over `p` `[T, E]`, and `k_max`.
fn slots(
    dev: &Device,
    gate: &DeviceGate<'_>,
    p: &impl DeviceRead<f32>,
    t: usize,
    e: usize,
) -> Result<(Buffer<i32>, Buffer<f32>, usize)> {
    let k = gate.k_max(e);
    let n = crate::error::checked_elems("slots [T, k_max]", t, k, 4)?;
    let mut ids = dev.zeros::<i32>(n)?;
    let mut weights = dev.zeros::<f32>(n)?;
    if t > 0 {
        gate_probabilities(dev, p, t, e, gate, &mut ids, &mut weights)?;
    }
    Ok((ids, weights, k))
}

/// The gate op: the dense weights `w` `[T, E]` of `gate` over `p` `[T, E]` (every element written).
/// Twin of [`crate::cpu::ops::gate_forward`].
pub fn gate_forward(
    dev: &Device,
    gate: &RoutedGate,
    p: &impl DeviceRead<f32>,
    tau: Option<BufferView<'_, f32>>,
    num_tokens: usize,
    num_experts: usize,
    w: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    let (t, e) = (num_tokens, num_experts);
    check_matrix("p [T, E]", t, e, p.len())?;
    check_len("w [T, E]", t * e, w.len())?;
    let g = device_gate(gate, tau)?;
    let (ids, weights, k) = slots(dev, &g, p, t, e)?;
    if t == 0 {
        return Ok(());
    }
    slots_to_dense(dev, &ids, &weights, t, k, e, w)
}

/// The gate op's backward: `dp` `[T, E]` and, for [`RoutedGate::Threshold`], `dτ` `[T]` from `dw`
/// `[T, E]` (selection is not differentiated). Twin of [`crate::cpu::ops::gate_backward`].
#[allow(clippy::too_many_arguments)]
pub fn gate_backward(
    dev: &Device,
    gate: &RoutedGate,
    p: &impl DeviceRead<f32>,
    tau: Option<BufferView<'_, f32>>,
    num_tokens: usize,
    num_experts: usize,
    dw: &impl DeviceRead<f32>,
    dp: &mut impl DeviceWrite<f32>,
    dtau: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    let (t, e) = (num_tokens, num_experts);
    check_matrix("p [T, E]", t, e, p.len())?;
    check_len("dw [T, E]", t * e, dw.len())?;
    check_len("dp [T, E]", t * e, dp.len())?;
    check_len("dtau [T]", t, dtau.len())?;
    let g = device_gate(gate, tau)?;
    let (ids, _, k) = slots(dev, &g, p, t, e)?;
    if !gate.has_tau() {
        dev.memset_zeros(dtau)?;
    }
    if t == 0 {
        return Ok(());
    }
    let mut dws = dev.zeros::<f32>(t * k)?;
    dense_to_slots(dev, &ids, dw, t, k, e, &mut dws)?;
    let dtau_out: Option<&mut dyn DeviceWrite<f32>> =
        if gate.has_tau() { Some(dtau) } else { None };
    super::backward::gate_probabilities_backward(dev, p, t, e, &g, &ids, &dws, dp, dtau_out)
}

/// A forward workspace for `t ≥ 1` tokens and `k` slots on the path [`LoraPath::for_shape`] picks.
fn workspace<T: CudaElement>(
    dev: &Device,
    t: usize,
    shape: &LoraShape,
    k: usize,
) -> Result<MoleLoraForward> {
    MoleLoraForward::new(dev, t, shape, k, LoraPath::for_shape(shape, T::DTYPE))
}

/// Gradients of the LoRA ops, f32, in the layouts of their inputs.
pub struct DeviceOpGrads<'o, D: DeviceWrite<f32> + ?Sized> {
    /// `∂L/∂x` `[T, d_in]`.
    pub dx: &'o mut D,
    /// `∂L/∂A` `[E, r, d_in]`.
    pub da: &'o mut D,
    /// `∂L/∂B` `[E, d_out, r]`.
    pub db: &'o mut D,
    /// `∂L/∂w`: `[T, E]` for [`mole_lora_forward`], `[T, k]` for [`slot_lora_forward`], `∂L/∂p`
    /// `[T, E]` for [`routed_lora_forward`], `[S, E]` for [`weight_space_forward`].
    pub dw: &'o mut D,
}

/// Copies the LoRA part's gradients of a backward out of `grads` into the op's outputs.
fn copy_lora_grads<D: DeviceWrite<f32> + ?Sized>(
    dev: &Device,
    grads: &MoleLoraGrads,
    t: usize,
    shape: &LoraShape,
    out: &mut DeviceOpGrads<'_, D>,
    dw_len: usize,
) -> Result<()> {
    let lora = grads.lora();
    dev.copy(&lora.dx().slice(0..t * shape.d_in)?, out.dx)?;
    dev.copy(&lora.da().slice(0..shape.a_len())?, out.da)?;
    dev.copy(&lora.db().slice(0..shape.b_len())?, out.db)?;
    if dw_len > 0 {
        dev.copy(&lora.dw().slice(0..dw_len)?, out.dw)?;
    }
    Ok(())
}

/// Checks the shapes of a LoRA op's inputs and gradient outputs: `x` `[T, d_in]`, `a`, `b`, `dy`
/// `[T, d_out]` and the gradients' lengths (`dw_len` for `dw`).
#[allow(clippy::too_many_arguments)]
fn check_lora_grads<T, D: DeviceWrite<f32> + ?Sized>(
    t: usize,
    shape: &LoraShape,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    dy: &impl DeviceRead<T>,
    out: &DeviceOpGrads<'_, D>,
    dw_len: usize,
) -> Result<()> {
    check_len("x [T, d_in]", t * shape.d_in, x.len())?;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("dy [T, d_out]", t * shape.d_out, dy.len())?;
    check_len("dx [T, d_in]", t * shape.d_in, out.dx.len())?;
    check_len("dA [E, r, d_in]", shape.a_len(), out.da.len())?;
    check_len("dB [E, d_out, r]", shape.b_len(), out.db.len())?;
    check_len("dw", dw_len, out.dw.len())
}

/// Zeroes every gradient (the op had no tokens).
fn zero_grads<D: DeviceWrite<f32> + ?Sized>(
    dev: &Device,
    out: &mut DeviceOpGrads<'_, D>,
) -> Result<()> {
    dev.memset_zeros(out.dx)?;
    dev.memset_zeros(out.da)?;
    dev.memset_zeros(out.db)?;
    dev.memset_zeros(out.dw)
}

/// Ids `[T, E]` with `ids[t, e] = e` (the dense gate over `w`, which keeps every expert with a weight
/// ≥ 0), so the dense weights `w` are the routing's slot weights as they are.
fn dense_ids(dev: &Device, w: &impl DeviceRead<f32>, t: usize, e: usize) -> Result<Buffer<i32>> {
    let (ids, _, _) = slots(dev, &DeviceGate::Dense, w, t, e)?;
    Ok(ids)
}

/// The dense-weight LoRA op: `y += s·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ` for `w` `[T, E]` (f32, ≥ 0 as a gate
/// gives them; the device drops a negative or NaN weight, where the CPU path uses or rejects it), on
/// the segmented or dense-gated path by shape (any `E·r`). Twin of
/// [`crate::cpu::ops::mole_lora_forward`].
#[allow(clippy::too_many_arguments)]
pub fn mole_lora_forward<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    w: &impl DeviceRead<f32>,
    num_tokens: usize,
    shape: &LoraShape,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
) -> Result<()> {
    let (t, e) = (num_tokens, shape.num_experts);
    check_matrix("w [T, E]", t, e, w.len())?;
    let ids = dense_ids(dev, w, t, e)?;
    slot_lora_forward(dev, x, a, b, &ids, w, t, e, shape, scale, y)
}

/// The dense-weight LoRA op's backward (the forward again, then its backward): `dx`, `dA`, `dB` and
/// `dw` `[T, E]` for every `(t, e)`, exact also where `w = 0`. Twin of
/// [`crate::cpu::ops::mole_lora_backward`].
#[allow(clippy::too_many_arguments)]
pub fn mole_lora_backward<T: CudaElement, D: DeviceWrite<f32> + ?Sized>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    w: &impl DeviceRead<f32>,
    num_tokens: usize,
    shape: &LoraShape,
    scale: f32,
    dy: &impl DeviceRead<T>,
    out: &mut DeviceOpGrads<'_, D>,
) -> Result<()> {
    let (t, e) = (num_tokens, shape.num_experts);
    check_matrix("w [T, E]", t, e, w.len())?;
    check_lora_grads(t, shape, x, a, b, dy, out, t * e)?;
    let ids = dense_ids(dev, w, t, e)?;
    slot_lora_backward(dev, x, a, b, &ids, w, t, e, shape, scale, dy, out)
}

/// The sparse-slot LoRA op: `y += s·Σ_s w_ts·(x_t·A_eᵀ)·B_eᵀ` for `ids`, `weights` `[T, k]` (`-1` =
/// an empty slot, exactly zero; ids outside `0..E` are empty too). Twin of
/// [`crate::cpu::ops::slot_lora_forward`].
#[allow(clippy::too_many_arguments)]
pub fn slot_lora_forward<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    num_tokens: usize,
    k: usize,
    shape: &LoraShape,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
) -> Result<()> {
    let t = num_tokens;
    check_matrix("ids [T, k]", t, k, ids.len())?;
    check_len("y [T, d_out]", t * shape.d_out, y.len())?;
    if t == 0 {
        return Ok(());
    }
    workspace::<T>(dev, t, shape, k)?.run_slots(dev, x, ids, weights, a, b, scale, y)
}

/// The sparse-slot LoRA op's backward: `dx`, `dA`, `dB` and `dw` `[T, k]` (0 on empty slots).
#[allow(clippy::too_many_arguments)]
pub fn slot_lora_backward<T: CudaElement, D: DeviceWrite<f32> + ?Sized>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    num_tokens: usize,
    k: usize,
    shape: &LoraShape,
    scale: f32,
    dy: &impl DeviceRead<T>,
    out: &mut DeviceOpGrads<'_, D>,
) -> Result<()> {
    let t = num_tokens;
    check_matrix("ids [T, k]", t, k, ids.len())?;
    check_lora_grads(t, shape, x, a, b, dy, out, t * k)?;
    if t == 0 {
        return zero_grads(dev, out);
    }
    let mut fwd = workspace::<T>(dev, t, shape, k)?;
    let mut scratch = dev.zeros::<T>(t * shape.d_out)?;
    fwd.run_slots(dev, x, ids, weights, a, b, scale, &mut scratch)?;
    let mut grads = fwd.new_grads(dev)?;
    fwd.backward_slots(dev, x, a, b, dy, scale, &mut grads)?;
    copy_lora_grads(dev, &grads, t, shape, out, t * k)
}

/// From router probabilities to the LoRA output: `gate` over `p` `[T, E]` (and `τ` `[T]`) into slots
/// that stay on the device, then `y += s·Σ_slots w_ts·(x_t·A_eᵀ)·B_eᵀ`
/// ([`MoleLoraForward::run_probs`]). Twin of [`crate::cpu::ops::routed_lora_forward`].
#[allow(clippy::too_many_arguments)]
pub fn routed_lora_forward<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    p: &impl DeviceRead<f32>,
    tau: Option<BufferView<'_, f32>>,
    gate: &RoutedGate,
    num_tokens: usize,
    shape: &LoraShape,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
) -> Result<()> {
    let (t, e) = (num_tokens, shape.num_experts);
    check_matrix("p [T, E]", t, e, p.len())?;
    check_len("y [T, d_out]", t * shape.d_out, y.len())?;
    let g = device_gate(gate, tau)?;
    if t == 0 {
        return Ok(());
    }
    workspace::<T>(dev, t, shape, g.k_max(e))?.run_probs(dev, x, p, &g, a, b, scale, y)
}

/// [`routed_lora_forward`]'s backward (the forward again, then
/// [`MoleLoraForward::backward_probs`]): `dx`, `dA`, `dB`, `dp` `[T, E]` in `out.dw`, and `dτ` `[T]`
/// (zero for gates without thresholds).
#[allow(clippy::too_many_arguments)]
pub fn routed_lora_backward<T: CudaElement, D: DeviceWrite<f32> + ?Sized>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    p: &impl DeviceRead<f32>,
    tau: Option<BufferView<'_, f32>>,
    gate: &RoutedGate,
    num_tokens: usize,
    shape: &LoraShape,
    scale: f32,
    dy: &impl DeviceRead<T>,
    out: &mut DeviceOpGrads<'_, D>,
    dtau: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    let (t, e) = (num_tokens, shape.num_experts);
    check_matrix("p [T, E]", t, e, p.len())?;
    check_lora_grads(t, shape, x, a, b, dy, out, t * e)?;
    check_len("dtau [T]", t, dtau.len())?;
    let g = device_gate(gate, tau)?;
    if t == 0 {
        return zero_grads(dev, out);
    }
    let mut fwd = workspace::<T>(dev, t, shape, g.k_max(e))?;
    let mut scratch = dev.zeros::<T>(t * shape.d_out)?;
    fwd.run_probs(dev, x, p, &g, a, b, scale, &mut scratch)?;
    let mut grads = fwd.new_grads(dev)?;
    fwd.backward_probs(dev, x, p, &g, a, b, dy, scale, &mut grads)?;
    copy_lora_grads(dev, &grads, t, shape, out, 0)?;
    dev.copy(&grads.dp(), out.dw)?;
    dev.copy(&grads.dtau(), dtau)
}

/// SAML's weight-space op: for sequences of `lengths` rows (each ≥ 1) and one mixing vector per
/// sequence `p` `[S, E]`: `y += s·(x_t·Ā_qᵀ)·B̄_qᵀ` ([`WeightSpaceLora`]). Twin of
/// [`crate::cpu::ops::weight_space_forward`] (which also takes empty sequences).
#[allow(clippy::too_many_arguments)]
pub fn weight_space_forward<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    p: &impl DeviceRead<f32>,
    lengths: &[usize],
    shape: &LoraShape,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
) -> Result<()> {
    WeightSpaceLora::<T>::new(dev, lengths, shape)?.forward(dev, x, a, b, p, scale, y)
}

/// [`weight_space_forward`]'s backward: `dx`, `dA`, `dB`, and `dp` `[S, E]` in `out.dw`.
#[allow(clippy::too_many_arguments)]
pub fn weight_space_backward<T: CudaElement, D: DeviceWrite<f32> + ?Sized>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    p: &impl DeviceRead<f32>,
    lengths: &[usize],
    shape: &LoraShape,
    scale: f32,
    dy: &impl DeviceRead<T>,
    out: &mut DeviceOpGrads<'_, D>,
) -> Result<()> {
    let mut ws = WeightSpaceLora::<T>::new(dev, lengths, shape)?;
    let t = ws.num_tokens();
    check_lora_grads(
        t,
        shape,
        x,
        a,
        b,
        dy,
        out,
        lengths.len() * shape.num_experts,
    )?;
    let mut scratch = dev.zeros::<T>(t * shape.d_out)?;
    ws.forward(dev, x, a, b, p, scale, &mut scratch)?;
    ws.backward(dev, x, a, b, p, dy, scale)?;
    dev.copy(&ws.dx().slice(0..t * shape.d_in)?, out.dx)?;
    dev.copy(&ws.da(), out.da)?;
    dev.copy(&ws.db(), out.db)?;
    dev.copy(&ws.dp(), out.dw)
}
