//! Backward passes on the CPU: the gradients of the MoLE layer's LoRA part and of the routing
//! steps, written plainly with the formula each computes. Generic over the float type (`f32` or
//! `f64`), so the same code is checked against finite differences in f64 and serves as the oracle
//! for the GPU backward in f32.
//!
//! Memory: nothing `[T, E, d]`-sized is built; per token the `r`-vectors `h = x_t·A_eᵀ` and
//! `u = dy_t·B_e` are recomputed for each of its active slots.

use num_traits::Float;

use crate::error::{check_experts_nonzero, check_len, checked_elems, Error, Result};
use crate::LoraShape;

pub use crate::grads::LoraGrads;

fn cast<F: Float>(v: f64) -> F {
    F::from(v).unwrap_or_else(F::nan)
}

/// Checks the lengths of a per-token LoRA problem; returns `T`.
fn check_lora<F>(
    x: &[F],
    a: &[F],
    b: &[F],
    shape: &LoraShape,
    ids: &[i32],
    weights: &[F],
    k_max: usize,
) -> Result<usize> {
    if k_max == 0 {
        return Err(Error::InvalidDim {
            what: "k_max",
            value: 0,
            reason: "a routing needs at least one slot per token",
        });
    }
    let t = x.len() / shape.d_in;
    check_len("x [T, d_in]", t * shape.d_in, x.len())?;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("routing ids [T, k_max]", t * k_max, ids.len())?;
    check_len("routing weights [T, k_max]", t * k_max, weights.len())?;
    for (i, &id) in ids.iter().enumerate() {
        if id < -1 || id >= shape.num_experts as i32 {
            return Err(Error::ExpertIdOutOfRange {
                token: i / k_max,
                slot: i % k_max,
                id,
                num_experts: shape.num_experts,
            });
        }
    }
    Ok(t)
}

/// `h = x_t·A_eᵀ` (`[r]`).
fn shrink_row<F: Float>(xt: &[F], a_e: &[F], r: usize) -> Vec<F> {
    let d_in = xt.len();
    (0..r)
        .map(|j| {
            xt.iter()
                .zip(&a_e[j * d_in..(j + 1) * d_in])
                .fold(F::zero(), |acc, (&xi, &ai)| acc + xi * ai)
        })
        .collect()
}

/// The LoRA part in the float type `F`: `Δy[t, o] = s·Σ_{slots, id ≠ -1} w_ts·Σ_j h_j·B[e, o, j]`
/// with `h = x_t·A_eᵀ`, `[T, d_out]`. The forward that [`lora_backward`] differentiates.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward<F: Float>(
    x: &[F],
    a: &[F],
    b: &[F],
    shape: &LoraShape,
    ids: &[i32],
    weights: &[F],
    k_max: usize,
    scale: F,
) -> Result<Vec<F>> {
    let t = check_lora(x, a, b, shape, ids, weights, k_max)?;
    let LoraShape {
        rank: r,
        d_in,
        d_out,
        ..
    } = *shape;
    let mut y = vec![F::zero(); t * d_out];
    for tok in 0..t {
        let xt = &x[tok * d_in..(tok + 1) * d_in];
        for s in 0..k_max {
            let id = ids[tok * k_max + s];
            if id < 0 {
                continue;
            }
            let e = id as usize;
            let w = weights[tok * k_max + s];
            let h = shrink_row(xt, &a[e * r * d_in..(e + 1) * r * d_in], r);
            for o in 0..d_out {
                let b_row = &b[(e * d_out + o) * r..(e * d_out + o + 1) * r];
                let d = h
                    .iter()
                    .zip(b_row)
                    .fold(F::zero(), |acc, (&hj, &bj)| acc + hj * bj);
                y[tok * d_out + o] = y[tok * d_out + o] + scale * w * d;
            }
        }
    }
    Ok(y)
}

/// The gradients of [`lora_forward`] given `dy = ∂L/∂Δy` `[T, d_out]`. For each active slot
/// `(t, s)` with expert `e` and weight `w`, with `h = x_t·A_eᵀ` and `u = dy_t·B_e` (`u_j =
/// Σ_o dy[t, o]·B[e, o, j]`):
///
/// * `dw_ts = s·Σ_j h_j·u_j` (`= s·⟨dy_t, h·B_eᵀ⟩`)
/// * `dB[e, o, j] += s·w·dy[t, o]·h_j`
/// * `dA[e, j, i] += s·w·u_j·x[t, i]`
/// * `dx[t, i] += s·w·Σ_j u_j·A[e, j, i]`
///
/// Empty slots get `dw = 0` and contribute nothing.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward<F: Float>(
    x: &[F],
    a: &[F],
    b: &[F],
    shape: &LoraShape,
    ids: &[i32],
    weights: &[F],
    k_max: usize,
    scale: F,
    dy: &[F],
) -> Result<LoraGrads<F>> {
    let t = check_lora(x, a, b, shape, ids, weights, k_max)?;
    let LoraShape {
        rank: r,
        d_in,
        d_out,
        ..
    } = *shape;
    check_len("dy [T, d_out]", t * d_out, dy.len())?;
    let mut g = LoraGrads {
        da: vec![F::zero(); a.len()],
        db: vec![F::zero(); b.len()],
        dx: vec![F::zero(); x.len()],
        dw: vec![F::zero(); ids.len()],
    };
    for tok in 0..t {
        let xt = &x[tok * d_in..(tok + 1) * d_in];
        let dyt = &dy[tok * d_out..(tok + 1) * d_out];
        for s in 0..k_max {
            let id = ids[tok * k_max + s];
            if id < 0 {
                continue;
            }
            let e = id as usize;
            let w = weights[tok * k_max + s];
            let a_e = &a[e * r * d_in..(e + 1) * r * d_in];
            let b_e = &b[e * d_out * r..(e + 1) * d_out * r];
            let h = shrink_row(xt, a_e, r);
            let mut u = vec![F::zero(); r];
            for (o, &dyo) in dyt.iter().enumerate() {
                for j in 0..r {
                    u[j] = u[j] + dyo * b_e[o * r + j];
                }
            }
            g.dw[tok * k_max + s] = scale
                * h.iter()
                    .zip(&u)
                    .fold(F::zero(), |acc, (&hj, &uj)| acc + hj * uj);
            let sw = scale * w;
            for (o, &dyo) in dyt.iter().enumerate() {
                for (j, &hj) in h.iter().enumerate() {
                    let k = (e * d_out + o) * r + j;
                    g.db[k] = g.db[k] + sw * dyo * hj;
                }
            }
            for j in 0..r {
                for i in 0..d_in {
                    let k = (e * r + j) * d_in + i;
                    g.da[k] = g.da[k] + sw * u[j] * xt[i];
                    g.dx[tok * d_in + i] = g.dx[tok * d_in + i] + sw * u[j] * a_e[j * d_in + i];
                }
            }
        }
    }
    Ok(g)
}

/// Softmax backward per row: with `p = softmax(z/τ)`, `∂L/∂z_e = p_e·(dp_e − Σ_j dp_j·p_j)/τ`.
pub fn softmax_backward<F: Float>(
    p: &[F],
    dp: &[F],
    num_experts: usize,
    temperature: F,
) -> Result<Vec<F>> {
    check_experts_nonzero(num_experts)?;
    check_len("dp [T, E]", p.len(), dp.len())?;
    check_len(
        "p [T, E]",
        p.len() / num_experts.max(1) * num_experts,
        p.len(),
    )?;
    let mut dz = Vec::with_capacity(p.len());
    for (pr, dr) in p
        .chunks_exact(num_experts)
        .zip(dp.chunks_exact(num_experts))
    {
        let dot = pr
            .iter()
            .zip(dr)
            .fold(F::zero(), |acc, (&a, &b)| acc + a * b);
        dz.extend(
            pr.iter()
                .zip(dr)
                .map(|(&pe, &de)| pe * (de - dot) / temperature),
        );
    }
    Ok(dz)
}

/// Sigmoid backward: with `p = σ(z/τ)`, `∂L/∂z = dp·p·(1 − p)/τ`.
pub fn sigmoid_backward<F: Float>(p: &[F], dp: &[F], temperature: F) -> Result<Vec<F>> {
    check_len("dp [T, E]", p.len(), dp.len())?;
    Ok(p.iter()
        .zip(dp)
        .map(|(&pe, &de)| de * pe * (F::one() - pe) / temperature)
        .collect())
}

/// Router backward: with `logits = x·W_gᵀ + b`, given `dz` `[T, E]`:
/// `dW_g[e, i] = Σ_t dz[t, e]·x[t, i]`, `db[e] = Σ_t dz[t, e]`, `dx[t, i] = Σ_e dz[t, e]·W_g[e, i]`.
/// Returns `(dW_g, db, dx)`.
pub fn router_backward<F: Float>(
    x: &[F],
    w_g: &[F],
    dz: &[F],
    d_in: usize,
    num_experts: usize,
) -> Result<(Vec<F>, Vec<F>, Vec<F>)> {
    let t = x.len() / d_in.max(1);
    check_len("x [T, d_in]", t * d_in, x.len())?;
    check_len("router W_g [E, d_in]", num_experts * d_in, w_g.len())?;
    check_len("dz [T, E]", t * num_experts, dz.len())?;
    let mut dw = vec![F::zero(); w_g.len()];
    let mut db = vec![F::zero(); num_experts];
    let mut dx = vec![F::zero(); x.len()];
    for tok in 0..t {
        for e in 0..num_experts {
            let g = dz[tok * num_experts + e];
            db[e] = db[e] + g;
            for i in 0..d_in {
                dw[e * d_in + i] = dw[e * d_in + i] + g * x[tok * d_in + i];
                dx[tok * d_in + i] = dx[tok * d_in + i] + g * w_g[e * d_in + i];
            }
        }
    }
    Ok((dw, db, dx))
}

/// Gate backward for the top-k and threshold gates, given the probabilities `p` `[T, E]`, the
/// routing they produced (`ids` `[T, k_max]`, `-1` = empty), per-token thresholds `tau` (`None` for
/// top-k) and `dw = ∂L/∂w` `[T, k_max]`. Selection itself is not differentiated. Returns
/// `(dp [T, E], dτ [T])`:
///
/// * top-k, renormalised: `w_i = p_i/S`, `S = Σ_kept p`: `dp_i = (dw_i − Σ_j w_j·dw_j)/S`.
/// * top-k, not renormalised: `dp_i = dw_i`.
/// * threshold: `w_i = (p_i − τ)/Z`, `Z = Σ_kept (p_j − τ)`, `n` kept:
///   `dp_i = (dw_i − Σ_j w_j·dw_j)/Z` and `dτ = Σ_i dw_i·(n·w_i − 1)/Z`; the arg-max fallback (a
///   constant weight 1) and a zero `Z` give no gradient.
///
/// Non-kept experts get `dp = 0`.
#[allow(clippy::too_many_arguments)]
pub fn gate_backward<F: Float>(
    p: &[F],
    num_experts: usize,
    ids: &[i32],
    k_max: usize,
    tau: Option<&[F]>,
    renormalize: bool,
    dw: &[F],
) -> Result<(Vec<F>, Vec<F>)> {
    check_experts_nonzero(num_experts)?;
    let t = p.len() / num_experts;
    check_len("p [T, E]", t * num_experts, p.len())?;
    let slots = checked_elems("T * k_max", t, k_max, 4)?;
    check_len("routing ids [T, k_max]", slots, ids.len())?;
    check_len("dw [T, k_max]", slots, dw.len())?;
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < -1 || id as i64 >= num_experts as i64)
    {
        return Err(Error::ExpertIdOutOfRange {
            token: i / k_max.max(1),
            slot: i % k_max.max(1),
            id,
            num_experts,
        });
    }
    if let Some(tau) = tau {
        check_len("tau [T]", t, tau.len())?;
    }
    let mut dp = vec![F::zero(); p.len()];
    let mut dtau = vec![F::zero(); t];
    for tok in 0..t {
        let row = &p[tok * num_experts..(tok + 1) * num_experts];
        let kept: Vec<(usize, F)> = (0..k_max)
            .filter_map(|s| {
                let id = ids[tok * k_max + s];
                (id >= 0).then(|| (id as usize, dw[tok * k_max + s]))
            })
            .collect();
        match tau {
            None if !renormalize => {
                for &(e, g) in &kept {
                    dp[tok * num_experts + e] = dp[tok * num_experts + e] + g;
                }
            }
            None => {
                let sum = kept.iter().fold(F::zero(), |acc, &(e, _)| acc + row[e]);
                if sum > F::zero() {
                    let wdw = kept
                        .iter()
                        .fold(F::zero(), |acc, &(e, g)| acc + row[e] / sum * g);
                    for &(e, g) in &kept {
                        dp[tok * num_experts + e] = dp[tok * num_experts + e] + (g - wdw) / sum;
                    }
                }
            }
            Some(taus) => {
                let tt = taus[tok];
                let fallback = kept.len() == 1 && row[kept[0].0] < tt;
                let z = kept
                    .iter()
                    .fold(F::zero(), |acc, &(e, _)| acc + (row[e] - tt));
                if !fallback && z > F::zero() {
                    let n = cast::<F>(kept.len() as f64);
                    let wdw = kept
                        .iter()
                        .fold(F::zero(), |acc, &(e, g)| acc + (row[e] - tt) / z * g);
                    for &(e, g) in &kept {
                        dp[tok * num_experts + e] = dp[tok * num_experts + e] + (g - wdw) / z;
                        let w = (row[e] - tt) / z;
                        dtau[tok] = dtau[tok] + g * (n * w - F::one()) / z;
                    }
                }
            }
        }
    }
    Ok((dp, dtau))
}

/// Backward of the λ-mix `p = λ·g + (1 − λ)·l`: returns `(dl = (1 − λ)·dp, dλ = Σ dp·(g − l))`,
/// with `g` expanded to one row per token (`[T, E]`).
pub fn mix_combine_backward<F: Float>(
    g: &[F],
    l: &[F],
    lambda: F,
    dp: &[F],
) -> Result<(Vec<F>, F)> {
    check_len("global posterior per token [T, E]", l.len(), g.len())?;
    check_len("dp [T, E]", l.len(), dp.len())?;
    let dl = dp.iter().map(|&d| (F::one() - lambda) * d).collect();
    let dlambda = dp
        .iter()
        .zip(g.iter().zip(l))
        .fold(F::zero(), |acc, (&d, (&ge, &le))| acc + d * (ge - le));
    Ok((dl, dlambda))
}

/// Backward of the product combination `p = q/Σq`, `q = g ⊙ l` (per row): `dq = (dp − ⟨dp, p⟩)/Σq`,
/// `dl = dq ⊙ g`. Rows whose `Σq` is 0 (where the forward falls back to `l`) pass `dl = dp`.
pub fn product_combine_backward<F: Float>(
    g: &[F],
    l: &[F],
    num_experts: usize,
    dp: &[F],
) -> Result<Vec<F>> {
    check_experts_nonzero(num_experts)?;
    check_len("global posterior per token [T, E]", l.len(), g.len())?;
    check_len("dp [T, E]", l.len(), dp.len())?;
    let mut dl = Vec::with_capacity(l.len());
    for ((gr, lr), dr) in g
        .chunks_exact(num_experts)
        .zip(l.chunks_exact(num_experts))
        .zip(dp.chunks_exact(num_experts))
    {
        let sum = gr
            .iter()
            .zip(lr)
            .fold(F::zero(), |acc, (&a, &b)| acc + a * b);
        if sum > F::zero() {
            let dot = gr
                .iter()
                .zip(lr)
                .zip(dr)
                .fold(F::zero(), |acc, ((&ge, &le), &de)| acc + de * ge * le / sum);
            dl.extend(gr.iter().zip(dr).map(|(&ge, &de)| (de - dot) / sum * ge));
        } else {
            dl.extend_from_slice(dr);
        }
    }
    Ok(dl)
}

/// SAML mixing backward for one sequence: with `Ā = Σ_e p_e·A_e`, `B̄ = Σ_e p_e·B_e` and the
/// gradients `dĀ`, `dB̄`: `dA_e = p_e·dĀ`, `dB_e = p_e·dB̄`, `dp_e = ⟨dĀ, A_e⟩ + ⟨dB̄, B_e⟩`.
/// Returns `(dA [E, r, d_in], dB [E, d_out, r], dp [E])`.
pub fn mix_backward<F: Float>(
    a: &[F],
    b: &[F],
    shape: &LoraShape,
    p: &[F],
    d_a_mixed: &[F],
    d_b_mixed: &[F],
) -> Result<(Vec<F>, Vec<F>, Vec<F>)> {
    let per_a = shape.rank * shape.d_in;
    let per_b = shape.d_out * shape.rank;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    check_len("p [E]", shape.num_experts, p.len())?;
    check_len("dĀ [r, d_in]", per_a, d_a_mixed.len())?;
    check_len("dB̄ [d_out, r]", per_b, d_b_mixed.len())?;
    let mut da = Vec::with_capacity(a.len());
    let mut db = Vec::with_capacity(b.len());
    let mut dp = Vec::with_capacity(p.len());
    for (e, &pe) in p.iter().enumerate() {
        let ae = &a[e * per_a..(e + 1) * per_a];
        let be = &b[e * per_b..(e + 1) * per_b];
        da.extend(d_a_mixed.iter().map(|&g| pe * g));
        db.extend(d_b_mixed.iter().map(|&g| pe * g));
        let dot_a = ae
            .iter()
            .zip(d_a_mixed)
            .fold(F::zero(), |acc, (&x, &g)| acc + x * g);
        let dot_b = be
            .iter()
            .zip(d_b_mixed)
            .fold(F::zero(), |acc, (&x, &g)| acc + x * g);
        dp.push(dot_a + dot_b);
    }
    Ok((da, db, dp))
}

/// Switch-Transformer load-balance loss `L = E·Σ_e f_e·P_e`, where `f_e` is the share of active
/// slots routed to expert `e` (a constant: selection is not differentiated) and `P_e = (1/T)·Σ_t p_te`.
/// Returns `(L, ∂L/∂p [T, E] = E·f_e/T)`.
pub fn switch_balance_loss<F: Float>(
    p: &[F],
    num_experts: usize,
    ids: &[i32],
) -> Result<(F, Vec<F>)> {
    let t = p.len() / num_experts.max(1);
    check_len("p [T, E]", t * num_experts, p.len())?;
    let mut counts = vec![0usize; num_experts];
    for &id in ids {
        if id >= 0 && (id as usize) < num_experts {
            counts[id as usize] += 1;
        }
    }
    let active: usize = counts.iter().sum();
    let e = cast::<F>(num_experts as f64);
    let tf = cast::<F>(t.max(1) as f64);
    let f: Vec<F> = counts
        .iter()
        .map(|&c| cast::<F>(c as f64) / cast::<F>(active.max(1) as f64))
        .collect();
    let mut loss = F::zero();
    for (ex, &fe) in f.iter().enumerate() {
        let pe = (0..t).fold(F::zero(), |acc, tok| acc + p[tok * num_experts + ex]) / tf;
        loss = loss + e * fe * pe;
    }
    let grad = (0..t * num_experts)
        .map(|i| e * f[i % num_experts] / tf)
        .collect();
    Ok((loss, grad))
}

/// Coefficient-of-variation balance loss (LoRAMoE): importance `I_e = Σ_t w_te` over a dense
/// weight matrix `w` `[T, E]`, `L = Var(I)/Mean(I)²` (population variance). Returns `(L, ∂L/∂w)`;
/// `∂L/∂I_e = 2·(I_e − μ)/(E·μ²) − 2·Var/(E·μ³)` and `∂L/∂w_te = ∂L/∂I_e`. Zero total importance gives
/// `L = 0` and a zero gradient.
pub fn cv_balance_loss<F: Float>(w: &[F], num_experts: usize) -> Result<(F, Vec<F>)> {
    check_experts_nonzero(num_experts)?;
    let t = w.len() / num_experts;
    check_len("w [T, E]", t * num_experts, w.len())?;
    let e = cast::<F>(num_experts as f64);
    let imp: Vec<F> = (0..num_experts)
        .map(|ex| (0..t).fold(F::zero(), |acc, tok| acc + w[tok * num_experts + ex]))
        .collect();
    let mu = imp.iter().fold(F::zero(), |acc, &v| acc + v) / e;
    if mu == F::zero() {
        return Ok((F::zero(), vec![F::zero(); w.len()]));
    }
    let var = imp
        .iter()
        .fold(F::zero(), |acc, &v| acc + (v - mu) * (v - mu))
        / e;
    let two = cast::<F>(2.0);
    let loss = var / (mu * mu);
    let di: Vec<F> = imp
        .iter()
        .map(|&v| two * (v - mu) / (e * mu * mu) - two * var / (e * mu * mu * mu))
        .collect();
    Ok((loss, (0..w.len()).map(|i| di[i % num_experts]).collect()))
}

/// Backward of AdaMoLE's input-dependent threshold `τ_t = σ(w·x_t + b)/E` given `dτ` `[T]`:
/// with `σ_t = σ(w·x_t + b)`, `g_t = dτ_t·σ_t·(1 − σ_t)/E`: `dw = Σ_t g_t·x_t`, `db = Σ_t g_t`,
/// `dx_t = g_t·w`. Returns `(dw [d_in], db, dx [T, d_in])`.
pub fn input_threshold_backward<F: Float>(
    x: &[F],
    w: &[F],
    b: F,
    num_experts: usize,
    dtau: &[F],
) -> Result<(Vec<F>, F, Vec<F>)> {
    let d_in = w.len();
    if d_in == 0 {
        return Err(Error::InvalidDim {
            what: "d_in",
            value: 0,
            reason: "must be at least 1",
        });
    }
    let t = dtau.len();
    check_len("x [T, d_in]", t * d_in, x.len())?;
    let e = cast::<F>(num_experts as f64);
    let mut dw = vec![F::zero(); d_in];
    let mut db = F::zero();
    let mut dx = vec![F::zero(); x.len()];
    for (tok, &dt) in dtau.iter().enumerate() {
        let xt = &x[tok * d_in..(tok + 1) * d_in];
        let z = xt.iter().zip(w).fold(b, |acc, (&xi, &wi)| acc + xi * wi);
        let s = F::one() / (F::one() + (-z).exp());
        let g = dt * s * (F::one() - s) / e;
        db = db + g;
        for i in 0..d_in {
            dw[i] = dw[i] + g * xt[i];
            dx[tok * d_in + i] = g * w[i];
        }
    }
    Ok((dw, db, dx))
}

/// `dx` through a frozen dense base `y = x·W0ᵀ`: `dx[t, i] = Σ_o dy[t, o]·W0[o, i]` (`W0`
/// `[d_out, d_in]`). Add it to [`LoraGrads::dx`] for the gradient through the whole layer; for a
/// quantised base pass its dequantised weight.
pub fn base_backward_dx<F: Float>(dy: &[F], w0: &[F], d_in: usize, d_out: usize) -> Result<Vec<F>> {
    check_len(
        "base W0 [d_out, d_in]",
        checked_elems("d_out * d_in", d_out, d_in, 1)?,
        w0.len(),
    )?;
    let t = dy.len() / d_out.max(1);
    check_len("dy [T, d_out]", t * d_out, dy.len())?;
    let mut dx = vec![F::zero(); checked_elems("T * d_in", t, d_in, std::mem::size_of::<F>())?];
    for tok in 0..t {
        for o in 0..d_out {
            let g = dy[tok * d_out + o];
            for i in 0..d_in {
                dx[tok * d_in + i] = dx[tok * d_in + i] + g * w0[o * d_in + i];
            }
        }
    }
    Ok(dx)
}
