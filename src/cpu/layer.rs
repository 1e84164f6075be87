//! The whole MoLE layer on the CPU: `y = x·W0ᵀ (+ bias) + s·Σ_e w_te·(x·A_eᵀ)·B_eᵀ`, for per-token
//! routings (top-k, threshold, hierarchical, dense: all arrive as a [`Routing`]) and for SAML's
//! per-sequence weight-space mixing. Everything is computed in f32 and rounded once, at the output.

use super::dispatch::{check_dim, check_scale, mul_len};
use super::mixing::mix_experts_f32;
use crate::error::{check_len, Result};
use crate::{Element, LoraShape, Routing, SeqRouting};

/// A set of LoRA experts on one layer: `A` `[E, r, d_in]`, `B` `[E, d_out, r]`, and the scale
/// `s = alpha / r`.
#[derive(Debug, Clone, Copy)]
pub struct Experts<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub shape: LoraShape,
    pub scale: f32,
}

impl<'a, T: Element> Experts<'a, T> {
    /// Checks the lengths of `a` and `b` against `shape` and that `scale` is finite.
    pub fn new(a: &'a [T], b: &'a [T], shape: LoraShape, scale: f32) -> Result<Self> {
        check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
        check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
        check_scale(scale)?;
        Ok(Experts { a, b, shape, scale })
    }
}

/// A dense (unquantised) base linear layer: `weight` `[d_out, d_in]`, optional `bias` `[d_out]`.
#[derive(Debug, Clone, Copy)]
pub struct DenseBase<'a, T> {
    pub weight: &'a [T],
    pub bias: Option<&'a [T]>,
}

/// The frozen base of a MoLE layer, as the layer functions take it ([`mole_forward`],
/// [`mole_forward_weight_space`]). A [`DenseBase`] converts with `.into()`; quantised bases hold their
/// packed weight and keep the bias in the element type. Whatever the variant, the base output is
/// [`base_weight_forward`], f32 `[T, d_out]`.
#[derive(Debug, Clone, Copy)]
pub enum BaseWeight<'a, T> {
    /// An unquantised `W0` `[d_out, d_in]` and optional bias `[d_out]`.
    Dense(DenseBase<'a, T>),
    /// An NF4-quantised weight (see [`super::quantize_nf4`]) with an optional bias.
    Nf4(&'a super::Nf4Weight, Option<&'a [T]>),
    /// An int8 per-channel weight (see [`super::quantize_int8`]) with an optional bias.
    Int8(&'a super::Int8Weight, Option<&'a [T]>),
}

impl<'a, T> From<DenseBase<'a, T>> for BaseWeight<'a, T> {
    fn from(b: DenseBase<'a, T>) -> Self {
        BaseWeight::Dense(b)
    }
}

/// The base output `base[t, o] = Σ_i x[t, i]·W0[o, i] + bias[o]` (f32 `[T, d_out]`, the sum over `i`
/// in order, the bias added last). `x` `[T, d_in]`, `d_in, d_out >= 1`.
pub fn base_forward<T: Element>(
    x: &[T],
    num_tokens: usize,
    base: &DenseBase<T>,
    d_in: usize,
    d_out: usize,
) -> Result<Vec<f32>> {
    check_dense_base(base, d_in, d_out)?;
    check_len(
        "x [T, d_in]",
        mul_len("x [T, d_in]", num_tokens, d_in)?,
        x.len(),
    )?;
    let mut out = Vec::with_capacity(num_tokens * d_out);
    for t in 0..num_tokens {
        let xt = &x[t * d_in..(t + 1) * d_in];
        for o in 0..d_out {
            let w = &base.weight[o * d_in..(o + 1) * d_in];
            let mut acc = 0.0f32;
            for (&a, &b) in xt.iter().zip(w) {
                acc += a.to_f32() * b.to_f32();
            }
            out.push(acc + base.bias.map_or(0.0, |b| b[o].to_f32()));
        }
    }
    Ok(out)
}

fn check_dense_base<T>(base: &DenseBase<T>, d_in: usize, d_out: usize) -> Result<()> {
    check_dim("d_in", d_in)?;
    check_dim("d_out", d_out)?;
    let w_len = mul_len("base W0 [d_out, d_in]", d_out, d_in)?;
    check_len("base W0 [d_out, d_in]", w_len, base.weight.len())?;
    if let Some(b) = base.bias {
        check_len("base bias [d_out]", d_out, b.len())?;
    }
    Ok(())
}

/// Checks a base against the layer's `d_in`, `d_out` (weight and bias lengths, or the quantised
/// weight's rows and columns), without computing anything.
fn check_base<T>(base: &BaseWeight<T>, d_in: usize, d_out: usize) -> Result<()> {
    let check_quantised = |rows: usize, cols: usize, bias: Option<&[T]>| -> Result<()> {
        check_len("quantised base rows vs d_out", d_out, rows)?;
        check_len("quantised base cols vs d_in", d_in, cols)?;
        if let Some(b) = bias {
            check_len("base bias [d_out]", d_out, b.len())?;
        }
        Ok(())
    };
    match base {
        BaseWeight::Dense(b) => check_dense_base(b, d_in, d_out),
        BaseWeight::Nf4(w, bias) => check_quantised(w.rows(), w.cols(), *bias),
        BaseWeight::Int8(w, bias) => check_quantised(w.rows(), w.cols(), *bias),
    }
}

/// The base output of any [`BaseWeight`], f32 `[T, d_out]`:
/// `base[t, o] = Σ_i x[t, i]·W0[o, i] + bias[o]` with `W0` the dense weight, or the dequantised one
/// ([`super::nf4_matmul`], [`super::int8_matmul`]).
pub fn base_weight_forward<T: Element>(
    x: &[T],
    num_tokens: usize,
    base: &BaseWeight<T>,
    d_in: usize,
    d_out: usize,
) -> Result<Vec<f32>> {
    check_base(base, d_in, d_out)?;
    match base {
        BaseWeight::Dense(b) => base_forward(x, num_tokens, b, d_in, d_out),
        BaseWeight::Nf4(w, bias) => super::nf4_matmul(x, num_tokens, w, *bias),
        BaseWeight::Int8(w, bias) => super::int8_matmul(x, num_tokens, w, *bias),
    }
}

fn check_routing(
    routing: &Routing,
    experts: &Experts<impl Element>,
    num_tokens: usize,
) -> Result<()> {
    check_len(
        "experts of the routing vs shape.num_experts",
        experts.shape.num_experts,
        routing.num_experts(),
    )?;
    check_len("routing tokens", num_tokens, routing.num_tokens())
}

fn check_experts<T: Element>(experts: &Experts<T>, x: &[T], num_tokens: usize) -> Result<()> {
    let s = &experts.shape;
    check_len(
        "x [T, d_in]",
        mul_len("x [T, d_in]", num_tokens, s.d_in)?,
        x.len(),
    )?;
    check_len("A [E, r, d_in]", s.a_len(), experts.a.len())?;
    check_len("B [E, d_out, r]", s.b_len(), experts.b.len())?;
    check_scale(experts.scale)
}

/// `out[o] += w·Σ_j h[j]·B[o, j]` for `h = x_t·Aᵀ` (`A` `[r, d_in]`, `B` `[d_out, r]`), all f32.
fn add_lora<T: Element, W: Element>(xt: &[T], a: &[W], b: &[W], r: usize, w: f32, out: &mut [f32]) {
    let d_in = xt.len();
    let h: Vec<f32> = (0..r)
        .map(|j| {
            let mut acc = 0.0f32;
            for (&xi, &ai) in xt.iter().zip(&a[j * d_in..(j + 1) * d_in]) {
                acc += xi.to_f32() * ai.to_f32();
            }
            acc
        })
        .collect();
    for (o, out_o) in out.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for (&hj, &bj) in h.iter().zip(&b[o * r..(o + 1) * r]) {
            acc += hj * bj.to_f32();
        }
        *out_o += w * acc;
    }
}

/// The LoRA part of the layer in f32:
/// `delta[t, o] = s·Σ_{slots, id ≠ -1} w_ts·Σ_j (Σ_i x[t, i]·A[e, j, i])·B[e, o, j]`, `[T, d_out]`.
pub fn lora_delta<T: Element>(
    x: &[T],
    num_tokens: usize,
    experts: &Experts<T>,
    routing: &Routing,
) -> Result<Vec<f32>> {
    check_experts(experts, x, num_tokens)?;
    check_routing(routing, experts, num_tokens)?;
    let LoraShape {
        rank: r,
        d_in,
        d_out,
        ..
    } = experts.shape;
    let mut out = vec![0.0f32; num_tokens * d_out];
    for t in 0..num_tokens {
        let xt = &x[t * d_in..(t + 1) * d_in];
        let mut acc = vec![0.0f32; d_out];
        for s in 0..routing.k_max() {
            let e = routing.id(t, s);
            if e < 0 {
                continue;
            }
            let e = e as usize;
            let a = &experts.a[e * r * d_in..(e + 1) * r * d_in];
            let b = &experts.b[e * d_out * r..(e + 1) * d_out * r];
            add_lora(xt, a, b, r, routing.weight(t, s), &mut acc);
        }
        for (o, v) in acc.into_iter().enumerate() {
            out[t * d_out + o] = experts.scale * v;
        }
    }
    Ok(out)
}

/// The whole MoLE layer with output-space mixing:
/// `y[t, o] = round(base[t, o] + s·Σ_{slots, id ≠ -1} w_ts·((x_t·A_eᵀ)·B_eᵀ)[o])`, where `base` is
/// [`base_weight_forward`]; computed in f32 and rounded once. Every per-token routing mode (top-k,
/// dynamic threshold, hierarchical, dense) arrives as a [`Routing`].
pub fn mole_forward<T: Element>(
    x: &[T],
    num_tokens: usize,
    base: &BaseWeight<T>,
    experts: &Experts<T>,
    routing: &Routing,
) -> Result<Vec<T>> {
    let s = experts.shape;
    // Everything is validated before anything is computed.
    check_experts(experts, x, num_tokens)?;
    check_routing(routing, experts, num_tokens)?;
    check_base(base, s.d_in, s.d_out)?;
    let delta = lora_delta(x, num_tokens, experts, routing)?;
    let base_out = base_weight_forward(x, num_tokens, base, s.d_in, s.d_out)?;
    Ok(base_out
        .iter()
        .zip(&delta)
        .map(|(&b, &d)| T::from_f32(b + d))
        .collect())
}

/// The whole MoLE layer with SAML's per-sequence weight-space mixing:
/// `y_t = round(base_t + s·(x_t·Ā_qᵀ)·B̄_qᵀ)` for the sequence `q` holding row `t`, with
/// `Ā_q = Σ_e p_qe·A_e` and `B̄_q = Σ_e p_qe·B_e` kept in f32.
pub fn mole_forward_weight_space<T: Element>(
    x: &[T],
    num_tokens: usize,
    base: &BaseWeight<T>,
    experts: &Experts<T>,
    routing: &SeqRouting,
) -> Result<Vec<T>> {
    check_experts(experts, x, num_tokens)?;
    check_len(
        "experts of the routing vs shape.num_experts",
        experts.shape.num_experts,
        routing.num_experts(),
    )?;
    check_len(
        "routing rows (sequence segments)",
        num_tokens,
        routing.segments().num_rows(),
    )?;
    check_base(base, experts.shape.d_in, experts.shape.d_out)?;
    let LoraShape {
        rank: r,
        d_in,
        d_out,
        ..
    } = experts.shape;
    let (am, bm) = mix_experts_f32(experts.a, experts.b, &experts.shape, routing)?;
    let base_out = base_weight_forward(x, num_tokens, base, d_in, d_out)?;
    let mut y = Vec::with_capacity(num_tokens * d_out);
    for q in 0..routing.segments().num_segments() {
        let a = &am[q * r * d_in..(q + 1) * r * d_in];
        let b = &bm[q * d_out * r..(q + 1) * d_out * r];
        for t in routing.segments().range(q) {
            let mut acc = vec![0.0f32; d_out];
            add_lora(&x[t * d_in..(t + 1) * d_in], a, b, r, 1.0, &mut acc);
            for (o, v) in acc.into_iter().enumerate() {
                y.push(T::from_f32(base_out[t * d_out + o] + experts.scale * v));
            }
        }
    }
    Ok(y)
}
