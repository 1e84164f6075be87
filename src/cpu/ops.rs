//! The framework ops on host memory: the forward and backward of each op that candle
//! ([`crate::candle::ops`]) and the PyTorch package expose, over contiguous host slices, composed from
//! the reference functions of this module's siblings. A framework's CPU path is these functions and
//! nothing else, so candle and PyTorch compute the same numbers.
//!
//! Conventions: `x` `[T, d_in]` and the experts `a` `[E, r, d_in]`, `b` `[E, d_out, r]` in the element
//! type `T`; router probabilities, gate weights, thresholds and mixing vectors in f32; every forward
//! accumulates in f32 and rounds once at its output; every backward takes and gives f32.

use super::backward;
use super::layer::{lora_delta, Experts};
use super::lora::{expand_segments, shrink_segments};
use super::mixing::mix_experts;
use crate::error::{check_len, check_matrix, checked_elems, Error, Result};
use crate::{AdapterSegments, Element, LoraShape, Routing, Segments, SeqRouting};

pub use crate::gate::RoutedGate;

/// The routing of `p` `[T, E]` (and `τ` `[T]` for [`RoutedGate::Threshold`]) by the crate's gates.
pub fn gate_routing(
    gate: &RoutedGate,
    p: &[f32],
    tau: Option<&[f32]>,
    num_tokens: usize,
    num_experts: usize,
) -> Result<Routing> {
    match (gate, tau) {
        (RoutedGate::TopK { k, renormalize }, _) => {
            super::top_k(p, num_tokens, num_experts, *k, *renormalize)
        }
        (RoutedGate::Threshold, Some(tau)) => {
            super::threshold_gate(p, num_tokens, num_experts, tau)
        }
        (RoutedGate::Threshold, None) => Err(Error::Unsupported {
            op: "threshold gate",
            what: "a threshold gate without its thresholds tau [T]".into(),
        }),
        (RoutedGate::Dense, _) => super::dense(p, num_tokens, num_experts),
    }
}

/// A sparse routing as a dense `[T, E]` matrix (`w[t, e]` = the weight of the slot holding `e`, 0
/// where no slot does).
pub fn dense_weights(r: &Routing) -> Vec<f32> {
    let e = r.num_experts();
    let mut out = vec![0.0f32; r.num_tokens() * e];
    for t in 0..r.num_tokens() {
        for s in 0..r.k_max() {
            let id = r.id(t, s);
            if id >= 0 {
                out[t * e + id as usize] += r.weight(t, s);
            }
        }
    }
    out
}

/// The slots' values `[T, k_max]` of a dense `[T, E]` matrix (0 for empty slots).
fn gather_slots(r: &Routing, dense: &[f32]) -> Vec<f32> {
    let e = r.num_experts();
    let k = r.k_max();
    let mut out = vec![0.0f32; r.num_tokens() * k];
    for t in 0..r.num_tokens() {
        for s in 0..k {
            let id = r.id(t, s);
            if id >= 0 {
                out[t * k + s] = dense[t * e + id as usize];
            }
        }
    }
    out
}

/// The routing of a dense weight matrix `w` `[T, E]`: per token the experts with `w ≠ 0`, ascending
/// ids, in `k_max` = the most any token uses (at least 1) slots, `-1` after the last.
pub fn sparse_routing(w: &[f32], num_tokens: usize, num_experts: usize) -> Result<Routing> {
    crate::error::check_experts_nonzero(num_experts)?;
    check_matrix("w [T, E]", num_tokens, num_experts, w.len())?;
    let k_max = w
        .chunks_exact(num_experts)
        .map(|row| row.iter().filter(|&&v| v != 0.0).count())
        .max()
        .unwrap_or(0)
        .max(1);
    let slots = checked_elems("T * k_max", num_tokens, k_max, 4)?;
    let mut ids = Vec::with_capacity(slots);
    let mut weights = Vec::with_capacity(slots);
    for row in w.chunks_exact(num_experts) {
        let mut n = 0;
        for (ex, &v) in row.iter().enumerate() {
            if v != 0.0 {
                ids.push(ex as i32);
                weights.push(v);
                n += 1;
            }
        }
        ids.extend(std::iter::repeat_n(-1, k_max - n));
        weights.extend(std::iter::repeat_n(0.0, k_max - n));
    }
    Routing::new(num_tokens, k_max, num_experts, ids, weights)
}

/// The gate op: the dense weights `w` `[T, E]` of `gate` over `p` `[T, E]` (and `τ` `[T]`).
pub fn gate_forward(
    gate: &RoutedGate,
    p: &[f32],
    tau: Option<&[f32]>,
    num_tokens: usize,
    num_experts: usize,
) -> Result<Vec<f32>> {
    Ok(dense_weights(&gate_routing(
        gate,
        p,
        tau,
        num_tokens,
        num_experts,
    )?))
}

/// The gate op's backward: `(dp [T, E], dτ [T])` from `dw` `[T, E]` through the kept (renormalised)
/// weights ([`backward::gate_backward`]; which experts are kept is not differentiated). `dτ` is
/// all zero for gates without thresholds.
pub fn gate_backward(
    gate: &RoutedGate,
    p: &[f32],
    tau: Option<&[f32]>,
    num_tokens: usize,
    num_experts: usize,
    dw: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let r = gate_routing(gate, p, tau, num_tokens, num_experts)?;
    check_len("dw [T, E]", p.len(), dw.len())?;
    let dw = gather_slots(&r, dw);
    backward::gate_backward(
        p,
        num_experts,
        r.ids(),
        r.k_max(),
        tau.filter(|_| gate.has_tau()),
        gate.renormalizes(),
        &dw,
    )
}

/// The dense-weight LoRA op: `Δy_t = s·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ` (`w` `[T, E]`, f32), computed over
/// the non-zero weights by [`lora_delta`] and rounded once to `T`.
pub fn mole_lora_forward<T: Element>(
    x: &[T],
    a: &[T],
    b: &[T],
    w: &[f32],
    shape: &LoraShape,
    scale: f32,
) -> Result<Vec<T>> {
    let experts = Experts::new(a, b, *shape, scale)?;
    let t = rows(x.len(), shape.d_in, "x [T, d_in]")?;
    let routing = sparse_routing(w, t, shape.num_experts)?;
    let delta = lora_delta(x, t, &experts, &routing)?;
    Ok(delta.into_iter().map(T::from_f32).collect())
}

/// The dense-weight LoRA op's backward ([`backward::lora_backward`] over every `(t, e)`, so `dw` is
/// exact also where `w = 0`): `dx [T, d_in]`, `dA`, `dB`, and `dw` `[T, E]`.
pub fn mole_lora_backward(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    w: &[f32],
    shape: &LoraShape,
    scale: f32,
    dy: &[f32],
) -> Result<crate::grads::LoraGrads<f32>> {
    let t = rows(x.len(), shape.d_in, "x [T, d_in]")?;
    let e = shape.num_experts;
    check_matrix("w [T, E]", t, e, w.len())?;
    let ids: Vec<i32> = (0..t).flat_map(|_| 0..e as i32).collect();
    backward::lora_backward(x, a, b, shape, &ids, w, e, scale, dy)
}

/// The sparse-slot LoRA op (`ids`, `weights` `[T, k]`, `-1` = an empty slot, exactly zero):
/// `Δy_t = s·Σ_slots w_ts·(x_t·A_eᵀ)·B_eᵀ`, rounded once to `T`.
#[allow(clippy::too_many_arguments)]
pub fn slot_lora_forward<T: Element>(
    x: &[T],
    a: &[T],
    b: &[T],
    ids: &[i32],
    weights: &[f32],
    k: usize,
    shape: &LoraShape,
    scale: f32,
) -> Result<Vec<T>> {
    let experts = Experts::new(a, b, *shape, scale)?;
    let t = rows(x.len(), shape.d_in, "x [T, d_in]")?;
    let routing = Routing::new(t, k, shape.num_experts, ids.to_vec(), weights.to_vec())?;
    let delta = lora_delta(x, t, &experts, &routing)?;
    Ok(delta.into_iter().map(T::from_f32).collect())
}

/// Gradients of [`routed_lora_forward`]: the LoRA part's, then the gate's.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedGrads {
    /// `∂L/∂x` `[T, d_in]`.
    pub dx: Vec<f32>,
    /// `∂L/∂A` `[E, r, d_in]`.
    pub da: Vec<f32>,
    /// `∂L/∂B` `[E, d_out, r]`.
    pub db: Vec<f32>,
    /// `∂L/∂p` `[T, E]`.
    pub dp: Vec<f32>,
    /// `∂L/∂τ` `[T]` (zero for gates without thresholds).
    pub dtau: Vec<f32>,
}

/// From router probabilities to the LoRA output: `gate` turns `p` `[T, E]` (and `τ` `[T]`) into slots
/// ([`gate_routing`]), then `Δy_t = s·Σ_slots w_ts·(x_t·A_eᵀ)·B_eᵀ` ([`lora_delta`]), rounded once.
#[allow(clippy::too_many_arguments)]
pub fn routed_lora_forward<T: Element>(
    x: &[T],
    a: &[T],
    b: &[T],
    p: &[f32],
    tau: Option<&[f32]>,
    gate: &RoutedGate,
    shape: &LoraShape,
    scale: f32,
) -> Result<Vec<T>> {
    let experts = Experts::new(a, b, *shape, scale)?;
    let t = rows(x.len(), shape.d_in, "x [T, d_in]")?;
    let routing = gate_routing(gate, p, tau, t, shape.num_experts)?;
    let delta = lora_delta(x, t, &experts, &routing)?;
    Ok(delta.into_iter().map(T::from_f32).collect())
}

/// [`routed_lora_forward`]'s backward: [`backward::lora_backward`] over the slots, then
/// [`backward::gate_backward`] to `p` and `τ` (selection is not differentiated).
#[allow(clippy::too_many_arguments)]
pub fn routed_lora_backward(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    p: &[f32],
    tau: Option<&[f32]>,
    gate: &RoutedGate,
    shape: &LoraShape,
    scale: f32,
    dy: &[f32],
) -> Result<RoutedGrads> {
    let t = rows(x.len(), shape.d_in, "x [T, d_in]")?;
    let e = shape.num_experts;
    let routing = gate_routing(gate, p, tau, t, e)?;
    let lg = backward::lora_backward(
        x,
        a,
        b,
        shape,
        routing.ids(),
        routing.weights(),
        routing.k_max(),
        scale,
        dy,
    )?;
    let (dp, dtau) = backward::gate_backward(
        p,
        e,
        routing.ids(),
        routing.k_max(),
        tau.filter(|_| gate.has_tau()),
        gate.renormalizes(),
        &lg.dw,
    )?;
    Ok(RoutedGrads {
        dx: lg.dx,
        da: lg.da,
        db: lg.db,
        dp,
        dtau,
    })
}

/// SAML's weight-space op: for sequences `seq` (row segments of `x`) and one mixing vector per
/// sequence `p` `[S, E]`: `y_t = s·(x_t·Ā_qᵀ)·B̄_qᵀ` for the sequence `q` holding row `t`, with
/// `Ā_q = Σ_e p_qe·A_e`, `B̄_q = Σ_e p_qe·B_e` ([`mix_experts`], in f32), applied by the segmented
/// shrink and expand; rounded once to `T`.
pub fn weight_space_forward<T: Element>(
    x: &[T],
    a: &[T],
    b: &[T],
    p: &[f32],
    seq: &Segments,
    shape: &LoraShape,
    scale: f32,
) -> Result<Vec<T>> {
    Experts::new(a, b, *shape, scale)?;
    let t = rows(x.len(), shape.d_in, "x [T, d_in]")?;
    check_len("sequence segments' rows vs x rows", t, seq.num_rows())?;
    let routing = SeqRouting::new(seq.clone(), shape.num_experts, p.to_vec())?;
    let af: Vec<f32> = crate::dtype::to_f32_vec(a);
    let bf: Vec<f32> = crate::dtype::to_f32_vec(b);
    let (am, bm) = mix_experts(&af, &bf, shape, &routing)?;
    let mixed = LoraShape::new(
        seq.num_segments().max(1),
        shape.rank,
        shape.d_in,
        shape.d_out,
    )?;
    let segs = AdapterSegments::identity(seq.clone())?;
    let mut y = vec![0.0f32; checked_elems("y [T, d_out]", t, shape.d_out, 4)?];
    if t > 0 {
        let xf: Vec<f32> = crate::dtype::to_f32_vec(x);
        let h = shrink_segments(&xf, &am, &mixed, &segs)?;
        expand_segments(&h, &bm, &mixed, &segs, scale, &mut y)?;
    }
    Ok(crate::dtype::from_f32_slice(&y))
}

/// Gradients of [`weight_space_forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct WeightSpaceGrads {
    /// `∂L/∂x` `[T, d_in]`.
    pub dx: Vec<f32>,
    /// `∂L/∂A` `[E, r, d_in]`.
    pub da: Vec<f32>,
    /// `∂L/∂B` `[E, d_out, r]`.
    pub db: Vec<f32>,
    /// `∂L/∂p` `[S, E]`.
    pub dp: Vec<f32>,
}

/// [`weight_space_forward`]'s backward: per sequence the single-adapter LoRA backward of its mixed
/// adapter ([`backward::lora_backward`] with one expert at weight 1), then
/// [`backward::mix_backward`] to `p`, `A_e` and `B_e`.
#[allow(clippy::too_many_arguments)]
pub fn weight_space_backward(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    p: &[f32],
    seq: &Segments,
    shape: &LoraShape,
    scale: f32,
    dy: &[f32],
) -> Result<WeightSpaceGrads> {
    let t = rows(x.len(), shape.d_in, "x [T, d_in]")?;
    check_len("sequence segments' rows vs x rows", t, seq.num_rows())?;
    check_matrix("dy [T, d_out]", t, shape.d_out, dy.len())?;
    let routing = SeqRouting::new(seq.clone(), shape.num_experts, p.to_vec())?;
    let (am, bm) = mix_experts(a, b, shape, &routing)?;
    let LoraShape {
        num_experts: e,
        rank: r,
        d_in,
        d_out,
    } = *shape;
    let one = LoraShape::new(1, r, d_in, d_out)?;
    let mut dx = Vec::with_capacity(x.len());
    let mut da = vec![0.0f32; a.len()];
    let mut db = vec![0.0f32; b.len()];
    let mut dp = Vec::with_capacity(p.len());
    for q in 0..seq.num_segments() {
        let rows = seq.range(q);
        let n = rows.len();
        let g = backward::lora_backward(
            &x[rows.start * d_in..rows.end * d_in],
            &am[q * r * d_in..(q + 1) * r * d_in],
            &bm[q * d_out * r..(q + 1) * d_out * r],
            &one,
            &vec![0; n],
            &vec![1.0; n],
            1,
            scale,
            &dy[rows.start * d_out..rows.end * d_out],
        )?;
        dx.extend_from_slice(&g.dx);
        let (dae, dbe, dpq) =
            backward::mix_backward(a, b, shape, &p[q * e..(q + 1) * e], &g.da, &g.db)?;
        for (acc, v) in da.iter_mut().zip(dae) {
            *acc += v;
        }
        for (acc, v) in db.iter_mut().zip(dbe) {
            *acc += v;
        }
        dp.extend(dpq);
    }
    Ok(WeightSpaceGrads { dx, da, db, dp })
}

/// punica's / vLLM's `add_lora`: one adapter per token (`indices` `[T]`, `-1` = none), the delta
/// added in place into the columns `y_offset..y_offset + d_out` of `y` (`[T, y_stride]`, so a packed
/// QKV or gate-up output takes each part's adapters):
/// `y[t, y_offset + o] += s·((x_t·A_eᵀ)·B_eᵀ)[o]` with `e = indices[t]`, in f32, rounded once.
#[allow(clippy::too_many_arguments)]
pub fn add_lora<T: Element>(
    y: &mut [T],
    y_stride: usize,
    y_offset: usize,
    x: &[T],
    a: &[T],
    b: &[T],
    indices: &[i32],
    shape: &LoraShape,
    scale: f32,
) -> Result<()> {
    let t = rows(x.len(), shape.d_in, "x [T, d_in]")?;
    check_len("indices [T]", t, indices.len())?;
    crate::error::check_columns(y_stride, y_offset, shape.d_out)?;
    check_matrix("y [T, y_stride]", t, y_stride, y.len())?;
    let experts = Experts::new(a, b, *shape, scale)?;
    let weights: Vec<f32> = indices
        .iter()
        .map(|&i| if i < 0 { 0.0 } else { 1.0 })
        .collect();
    let routing = Routing::new(t, 1, shape.num_experts, indices.to_vec(), weights)?;
    let delta = lora_delta(x, t, &experts, &routing)?;
    let d_out = shape.d_out;
    for (row, d) in y
        .chunks_exact_mut(y_stride.max(1))
        .zip(delta.chunks_exact(d_out))
    {
        for (v, dv) in row[y_offset..y_offset + d_out].iter_mut().zip(d) {
            *v = T::from_f32(v.to_f32() + dv);
        }
    }
    Ok(())
}

/// The experts packed as one buffer (`A` `[E, r, d_in]` then `B` `[E, d_out, r]`, the layout the
/// candle layer stores) split into `(A, B)`, after checking its length.
pub fn split_packed<'a, T>(ab: &'a [T], shape: &LoraShape) -> Result<(&'a [T], &'a [T])> {
    let len = shape
        .a_len()
        .checked_add(shape.b_len())
        .ok_or(Error::InvalidDim {
            what: "packed experts A then B",
            value: shape.a_len(),
            reason: "A and B together overflow usize",
        })?;
    check_len(
        "packed experts (A [E, r, d_in] then B [E, d_out, r])",
        len,
        ab.len(),
    )?;
    Ok(ab.split_at(shape.a_len()))
}

/// The rows of a `[rows, cols]` buffer of `len` elements, or an error naming it.
fn rows(len: usize, cols: usize, what: &'static str) -> Result<usize> {
    if cols == 0 {
        return Err(Error::InvalidDim {
            what,
            value: 0,
            reason: "the row width must be at least 1",
        });
    }
    if len % cols != 0 {
        return Err(Error::LengthMismatch {
            what,
            expected: len.div_ceil(cols) * cols,
            got: len,
        });
    }
    Ok(len / cols)
}
