//! Routing and gating on the CPU: router logits, activation (softmax / sigmoid with temperature),
//! top-k, HDMoLE's dynamic threshold (fixed, learned, or input-dependent), HDMoLE's hierarchical
//! combination with a per-sequence global posterior, dense routing, and [`route`], the whole pipeline.
//!
//! Shapes (row-major, PyTorch layouts; see [`crate::shape`]):
//!
//! | buffer | shape |
//! |---|---|
//! | `x` | `[T, d_in]` |
//! | router `W_g` | `[E, d_in]`, bias `b_g` `[E]` |
//! | logits, probabilities | `[T, E]` (f32) |
//! | routing | [`Routing`] `[T, k_max]` ids (`-1` = empty slot) and f32 weights |
//!
//! Every function validates all lengths, dimensions, parameters and NaN/infinity in its inputs before
//! it computes anything, and reports a typed [`Error`] whose fields carry the offending values.
//!
//! Probabilities handed to the gates ([`top_k`], [`threshold_gate`], [`dense`], [`hierarchical`])
//! must be finite and non-negative (they need not sum to 1: sigmoid routers give independent values).
//!
//! Precision: dot products and softmax sums accumulate in f32 (the element values are converted to
//! f32 exactly). The normalising sums of the gates (`Σ p` of top-k, `Σ (p − τ)` of the threshold, the
//! product `g ⊙ l` of the hierarchical combination) are formed in f64 so that no finite input can
//! overflow or underflow them; each weight is rounded to f32 once.

use std::cmp::Ordering;

use crate::error::{check_finite, check_len};
pub(crate) use crate::gate::{
    check_combine, check_k, check_num_experts, check_spec, check_temperature, sigmoid,
};
pub use crate::gate::{Activation, Gate, HierarchicalCombine, RouterWeights, ThresholdSpec};
use crate::{Element, Error, Result, Routing, SeqRouting};

/// `a * b`, or [`Error::InvalidDim`] naming `what` when the product overflows `usize`.
fn checked_len(what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::InvalidDim {
        what,
        value: usize::MAX,
        reason: "the buffer length overflows usize",
    })
}

fn check_d_in(d_in: usize) -> Result<()> {
    if d_in == 0 {
        return Err(Error::InvalidDim {
            what: "d_in",
            value: 0,
            reason: "the router needs at least one input feature",
        });
    }
    Ok(())
}

/// Checks that every element of `values` is finite (as f32), naming the first one that is not.
fn check_finite_elems<T: Element>(what: &'static str, values: &[T]) -> Result<()> {
    match values.iter().position(|v| !v.to_f32().is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            what,
            index,
            value: values.get(index).map_or(f32::NAN, |v| v.to_f32()),
        }),
    }
}

/// Checks a `[T, E]` probability buffer: length, finite, non-negative.
fn check_probs(
    what: &'static str,
    probs: &[f32],
    num_tokens: usize,
    num_experts: usize,
) -> Result<()> {
    check_num_experts(num_experts)?;
    let n = checked_len("num_tokens * num_experts", num_tokens, num_experts)?;
    check_len(what, n, probs.len())?;
    check_finite(what, probs)?;
    if let Some(&value) = probs.iter().find(|&&p| p < 0.0) {
        return Err(Error::InvalidParameter {
            what,
            value,
            reason: "probabilities must be non-negative",
        });
    }
    Ok(())
}

/// Checks that a global posterior fits `num_tokens` rows and `num_experts` experts.
pub(crate) fn check_global(
    global: &SeqRouting,
    num_tokens: usize,
    num_experts: usize,
) -> Result<()> {
    check_len(
        "global posterior experts",
        num_experts,
        global.num_experts(),
    )?;
    check_len(
        "global posterior segment rows",
        num_tokens,
        global.segments().num_rows(),
    )?;
    if let Some(&value) = global.probs().iter().find(|&&p| p < 0.0) {
        return Err(Error::InvalidParameter {
            what: "global posterior probs",
            value,
            reason: "probabilities must be non-negative",
        });
    }
    Ok(())
}

/// Descending by probability, ties to the lower expert id: the slot order of every gate.
fn by_prob_desc(row: &[f32]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| {
        row[b]
            .partial_cmp(&row[a])
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    }
}

/// Router logits `logits[t, e] = Σ_i x[t, i]·W_g[e, i] + b_g[e]` (`b_g[e] = 0` without a bias).
///
/// `x` is `[T, d_in]`, `w_g` is `[E, d_in]` (the layout of `nn.Linear(d_in, E).weight`), `b_g` is
/// `[E]`. The sum runs over `i = 0..d_in` in order in f32 (element values converted exactly), the bias
/// added last; the output is f32 `[T, E]`.
///
/// Errors: `E = 0` or `d_in = 0` ([`Error::InvalidDim`]), wrong lengths ([`Error::LengthMismatch`]),
/// NaN/infinity in `x`, `W_g` or `b_g` ([`Error::NonFinite`]).
pub fn router_logits<T: Element>(
    x: &[T],
    num_tokens: usize,
    d_in: usize,
    w_g: &[T],
    b_g: Option<&[T]>,
    num_experts: usize,
) -> Result<Vec<f32>> {
    check_num_experts(num_experts)?;
    check_d_in(d_in)?;
    check_len(
        "x [T, d_in]",
        checked_len("num_tokens * d_in", num_tokens, d_in)?,
        x.len(),
    )?;
    check_len(
        "router W_g [E, d_in]",
        checked_len("num_experts * d_in", num_experts, d_in)?,
        w_g.len(),
    )?;
    let out_len = checked_len("num_tokens * num_experts", num_tokens, num_experts)?;
    if let Some(b) = b_g {
        check_len("router b_g [E]", num_experts, b.len())?;
        check_finite_elems("router b_g", b)?;
    }
    check_finite_elems("x", x)?;
    check_finite_elems("router W_g", w_g)?;

    let mut logits = Vec::with_capacity(out_len);
    for xt in x.chunks_exact(d_in) {
        for (e, we) in w_g.chunks_exact(d_in).enumerate() {
            let mut acc = 0.0f32;
            for (&xi, &wi) in xt.iter().zip(we) {
                acc += xi.to_f32() * wi.to_f32();
            }
            if let Some(b) = b_g {
                acc += b.get(e).map_or(0.0, |v| v.to_f32());
            }
            logits.push(acc);
        }
    }
    Ok(logits)
}

/// Router activation with temperature `τ` over logits `z` `[T, E]`:
///
/// * [`Activation::Softmax`]: `p_te = exp((z_te − m_t)/τ) / Σ_j exp((z_tj − m_t)/τ)` with
///   `m_t = max_j z_tj` (equal to `softmax(z_t/τ)` since `τ > 0`; subtracting the maximum first keeps
///   every exponent `≤ 0`, so nothing overflows and each row sums to 1).
/// * [`Activation::Sigmoid`]: `p_te = 1 / (1 + exp(−z_te/τ))` elementwise.
///
/// Errors: `E = 0` ([`Error::InvalidDim`]), wrong length ([`Error::LengthMismatch`]), `τ ≤ 0` or not
/// finite ([`Error::InvalidParameter`] `"temperature"`), NaN/infinite logits
/// ([`Error::NonFinite`] `{ what: "logits", index, value }`).
pub fn activate(
    logits: &[f32],
    num_tokens: usize,
    num_experts: usize,
    act: Activation,
    temperature: f32,
) -> Result<Vec<f32>> {
    check_num_experts(num_experts)?;
    check_len(
        "logits [T, E]",
        checked_len("num_tokens * num_experts", num_tokens, num_experts)?,
        logits.len(),
    )?;
    check_temperature(temperature)?;
    check_finite("logits", logits)?;

    let mut probs = Vec::with_capacity(logits.len());
    match act {
        Activation::Softmax => {
            for row in logits.chunks_exact(num_experts) {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let start = probs.len();
                let mut sum = 0.0f32;
                for &z in row {
                    let e = ((z - m) / temperature).exp();
                    sum += e;
                    probs.push(e);
                }
                // The maximum contributes exp(0) = 1, so sum >= 1.
                for p in &mut probs[start..] {
                    *p /= sum;
                }
            }
        }
        Activation::Sigmoid => {
            probs.extend(logits.iter().map(|&z| sigmoid(z / temperature)));
        }
    }
    Ok(probs)
}

/// Top-k gate over probabilities `p` `[T, E]`.
///
/// Per token, keeps the `k` largest `p_te`; among equal probabilities the lower expert id wins. Slot
/// `s` holds the `s`-th kept expert in the order (descending `p`, then ascending id). Weights:
///
/// * `renormalize`: `w = p_te / Σ_{j kept} p_tj` (sum in f64). If that sum is 0 (every kept
///   probability is 0, hence the whole row is), each kept expert gets `1/k`: the lowest `k` ids share
///   the token equally.
/// * otherwise `w = p_te`.
///
/// Returns a [`Routing`] with `k_max = k` and every slot filled.
///
/// Errors: `E = 0` ([`Error::InvalidDim`]), `k = 0` or `k > E` ([`Error::InvalidK`]), wrong length,
/// NaN/infinite ([`Error::NonFinite`] `"probs"`) or negative ([`Error::InvalidParameter`]) probabilities.
pub fn top_k(
    probs: &[f32],
    num_tokens: usize,
    num_experts: usize,
    k: usize,
    renormalize: bool,
) -> Result<Routing> {
    check_num_experts(num_experts)?;
    check_k(k, num_experts)?;
    check_probs("probs", probs, num_tokens, num_experts)?;

    let n = checked_len("num_tokens * k", num_tokens, k)?;
    let mut ids = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    for row in probs.chunks_exact(num_experts) {
        order.clear();
        order.extend(0..num_experts);
        order.sort_by(by_prob_desc(row));
        let kept = &order[..k];
        let sum: f64 = kept.iter().map(|&e| f64::from(row[e])).sum();
        for &e in kept {
            ids.push(e as i32);
            let w = if !renormalize {
                row[e]
            } else if sum > 0.0 {
                (f64::from(row[e]) / sum) as f32
            } else {
                1.0 / k as f32
            };
            weights.push(w);
        }
    }
    Routing::new(num_tokens, k, num_experts, ids, weights)
}

/// Per-token thresholds `τ` `[T]` of the dynamic-threshold gate:
///
/// * [`ThresholdSpec::Fixed`]`(τ)`: `τ_t = τ`.
/// * [`ThresholdSpec::Learned`]`{ θ }`: `τ_t = σ(θ) / E`.
/// * [`ThresholdSpec::InputDependent`]`{ w, b }`: `τ_t = σ(Σ_i w_i·x[t, i] + b) / E` (dot product in
///   f32 over `i = 0..d_in` in order, `b` added last).
///
/// `x` (`[T, d_in]`) is needed only by the input-dependent spec; `None` counts as an empty buffer.
/// When given, its length is checked for every spec.
///
/// Errors: `E = 0` ([`Error::InvalidDim`]; also `d_in = 0` for the input-dependent spec), wrong
/// lengths of `x` or `w` ([`Error::LengthMismatch`]), NaN/infinite `τ` (`"tau"`), `θ` (`"theta"`),
/// `w` (`"threshold w"`), `b` (`"threshold b"`) or `x` (`"x"`) ([`Error::NonFinite`]).
pub fn threshold_values<T: Element>(
    spec: &ThresholdSpec,
    x: Option<&[T]>,
    num_tokens: usize,
    d_in: usize,
    num_experts: usize,
) -> Result<Vec<f32>> {
    check_num_experts(num_experts)?;
    check_spec(spec)?;
    crate::error::checked_elems("num_tokens (one τ each)", num_tokens, 1, 4)?;
    let x_len = checked_len("num_tokens * d_in", num_tokens, d_in)?;
    if let Some(x) = x {
        check_len("x [T, d_in]", x_len, x.len())?;
    }
    let e = num_experts as f32;
    match spec {
        ThresholdSpec::Fixed(tau) => Ok(vec![*tau; num_tokens]),
        ThresholdSpec::Learned { theta } => Ok(vec![sigmoid(*theta) / e; num_tokens]),
        ThresholdSpec::InputDependent { w, b } => {
            check_d_in(d_in)?;
            check_len("threshold w [d_in]", d_in, w.len())?;
            let x = x.unwrap_or(&[]);
            check_len("x [T, d_in] (input-dependent threshold)", x_len, x.len())?;
            check_finite_elems("x", x)?;
            Ok(x.chunks_exact(d_in)
                .map(|xt| {
                    let mut z = 0.0f32;
                    for (&xi, &wi) in xt.iter().zip(w) {
                        z += xi.to_f32() * wi;
                    }
                    sigmoid(z + *b) / e
                })
                .collect())
        }
    }
}

/// HDMoLE's dynamic-threshold gate over probabilities `p` `[T, E]` and thresholds `τ` `[T]`.
///
/// Per token `t`: the active set `S_t = {e : p_te ≥ τ_t}` and weights
/// `w_te = (p_te − τ_t) / Σ_{j∈S_t} (p_tj − τ_t)` (differences and sum in f64). Two edge cases, both
/// our choices:
///
/// * `S_t` empty (τ above every probability): keep the arg-max (ties to the lower id) with weight 1.
/// * `S_t` non-empty but `Σ (p − τ) = 0` (every kept expert sits exactly at `τ`): the kept experts
///   share the token equally, `w = 1/|S_t|`.
///
/// An expert exactly at `τ` next to one above it is kept with weight 0. The routing has `k_max = E`:
/// the kept experts fill the first `|S_t|` slots in order (descending `p`, then ascending id), the
/// other slots hold id `-1` and weight 0.
///
/// Errors: `E = 0` ([`Error::InvalidDim`]), wrong lengths ([`Error::LengthMismatch`]), NaN/infinite
/// probabilities (`"probs"`) or thresholds (`"tau"`) ([`Error::NonFinite`]), negative probabilities
/// ([`Error::InvalidParameter`]).
pub fn threshold_gate(
    probs: &[f32],
    num_tokens: usize,
    num_experts: usize,
    taus: &[f32],
) -> Result<Routing> {
    check_probs("probs", probs, num_tokens, num_experts)?;
    check_len("tau [T]", num_tokens, taus.len())?;
    check_finite("tau", taus)?;

    let n = checked_len("num_tokens * num_experts", num_tokens, num_experts)?;
    let mut ids = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    let mut order: Vec<usize> = Vec::with_capacity(num_experts);
    for (row, &tau) in probs.chunks_exact(num_experts).zip(taus) {
        order.clear();
        order.extend(0..num_experts);
        order.sort_by(by_prob_desc(row));
        let active = order.iter().take_while(|&&e| row[e] >= tau).count();
        let filled = if active == 0 {
            // Fallback: the arg-max, which sorts first.
            ids.extend(order.iter().take(1).map(|&e| e as i32));
            weights.push(1.0);
            1
        } else {
            let kept = &order[..active];
            let tau64 = f64::from(tau);
            let sum: f64 = kept.iter().map(|&e| f64::from(row[e]) - tau64).sum();
            for &e in kept {
                ids.push(e as i32);
                let w = if sum > 0.0 {
                    ((f64::from(row[e]) - tau64) / sum) as f32
                } else {
                    1.0 / active as f32
                };
                weights.push(w);
            }
            active
        };
        let empty = num_experts - filled;
        ids.extend(std::iter::repeat_n(-1, empty));
        weights.extend(std::iter::repeat_n(0.0, empty));
    }
    Routing::new(num_tokens, num_experts, num_experts, ids, weights)
}

/// HDMoLE's hierarchical routing: combines each token's local probabilities `l_t` (`local_probs`,
/// `[T, E]`) with the global posterior `g_s` of the sequence `s` that row `t` belongs to
/// (`global.segments()`), giving `p` `[T, E]`:
///
/// * [`HierarchicalCombine::Mix`]`{ λ }`: `p_te = λ·g_se + (1 − λ)·l_te`.
/// * [`HierarchicalCombine::Product`]: `p_te = g_se·l_te / Σ_j g_sj·l_tj` (in f64); if the sum is 0
///   the row is `l_t` unchanged (our choice: the local router decides when the global posterior rules
///   out every expert it likes).
///
/// Errors: `E = 0` ([`Error::InvalidDim`]), wrong length of `local_probs`, a global posterior with
/// another number of experts (`"global posterior experts"`) or whose segments do not cover exactly
/// `T` rows (`"global posterior segment rows"`) ([`Error::LengthMismatch`]), NaN/infinite local
/// probabilities ([`Error::NonFinite`]), negative probabilities or `λ ∉ [0, 1]`
/// ([`Error::InvalidParameter`]).
pub fn hierarchical(
    local_probs: &[f32],
    num_tokens: usize,
    num_experts: usize,
    global: &SeqRouting,
    combine: HierarchicalCombine,
) -> Result<Vec<f32>> {
    check_probs("local probs", local_probs, num_tokens, num_experts)?;
    check_combine(combine)?;
    check_global(global, num_tokens, num_experts)?;

    let mut out = Vec::with_capacity(local_probs.len());
    let segments = global.segments();
    for s in 0..segments.num_segments() {
        let g = global.probs_of(s);
        let range = segments.range(s);
        let rows = local_probs
            .get(range.start * num_experts..range.end * num_experts)
            .unwrap_or(&[]);
        for l in rows.chunks_exact(num_experts) {
            match combine {
                HierarchicalCombine::Mix { lambda } => {
                    out.extend(
                        g.iter()
                            .zip(l)
                            .map(|(&ge, &le)| lambda * ge + (1.0 - lambda) * le),
                    );
                }
                HierarchicalCombine::Product => {
                    let sum: f64 = g
                        .iter()
                        .zip(l)
                        .map(|(&ge, &le)| f64::from(ge) * f64::from(le))
                        .sum();
                    if sum > 0.0 {
                        out.extend(
                            g.iter()
                                .zip(l)
                                .map(|(&ge, &le)| (f64::from(ge) * f64::from(le) / sum) as f32),
                        );
                    } else {
                        out.extend_from_slice(l);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Dense (soft) routing: `k_max = E`, slot `e` of token `t` holds expert `e` with weight `p_te`.
///
/// Errors: `E = 0` ([`Error::InvalidDim`]), wrong length ([`Error::LengthMismatch`]), NaN/infinite
/// ([`Error::NonFinite`]) or negative ([`Error::InvalidParameter`]) probabilities.
pub fn dense(probs: &[f32], num_tokens: usize, num_experts: usize) -> Result<Routing> {
    check_probs("probs", probs, num_tokens, num_experts)?;
    let ids = (0..num_tokens)
        .flat_map(|_| 0..num_experts as i32)
        .collect();
    Routing::new(num_tokens, num_experts, num_experts, ids, probs.to_vec())
}

/// The whole routing pipeline for `x` `[T, d_in]`:
///
/// 1. `z = `[`router_logits`]`(x, W_g, b_g)`,
/// 2. `p = `[`activate`]`(z, activation, temperature)`,
/// 3. with a hierarchy `(g, combine)`: `p = `[`hierarchical`]`(p, g, combine)`,
/// 4. the gate: [`top_k`]`(p, k, renormalize)`, [`threshold_gate`]`(p, `[`threshold_values`]`(spec, x))`
///    or [`dense`]`(p)`.
///
/// The parameters (temperature, k, λ, the threshold spec, the global posterior's shape) are checked
/// before the logits are computed; the errors are those of the steps.
pub fn route<T: Element>(
    x: &[T],
    num_tokens: usize,
    d_in: usize,
    num_experts: usize,
    router: &RouterWeights<T>,
    hierarchy: Option<(&SeqRouting, HierarchicalCombine)>,
    gate: &Gate,
) -> Result<Routing> {
    check_num_experts(num_experts)?;
    check_temperature(router.temperature)?;
    if let Some((global, combine)) = hierarchy {
        check_combine(combine)?;
        check_global(global, num_tokens, num_experts)?;
    }
    match gate {
        Gate::TopK { k, .. } => check_k(*k, num_experts)?,
        Gate::Threshold(spec) => {
            check_spec(spec)?;
            if let ThresholdSpec::InputDependent { w, .. } = spec {
                check_len("threshold w [d_in]", d_in, w.len())?;
            }
        }
        Gate::Dense => {}
    }

    let logits = router_logits(x, num_tokens, d_in, router.w_g, router.b_g, num_experts)?;
    let mut probs = activate(
        &logits,
        num_tokens,
        num_experts,
        router.activation,
        router.temperature,
    )?;
    if let Some((global, combine)) = hierarchy {
        probs = hierarchical(&probs, num_tokens, num_experts, global, combine)?;
    }
    match gate {
        Gate::TopK { k, renormalize } => top_k(&probs, num_tokens, num_experts, *k, *renormalize),
        Gate::Threshold(spec) => {
            let taus = threshold_values(spec, Some(x), num_tokens, d_in, num_experts)?;
            threshold_gate(&probs, num_tokens, num_experts, &taus)
        }
        Gate::Dense => dense(&probs, num_tokens, num_experts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Segments;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6
    }

    #[test]
    fn softmax_of_known_logits() {
        let p = activate(&[0.0, 3f32.ln()], 1, 2, Activation::Softmax, 1.0).unwrap();
        assert!(close(p[0], 0.25) && close(p[1], 0.75), "{p:?}");
        // Temperature 2 halves the logits: [0, ln 9] / 2 = [0, ln 3].
        let p = activate(&[0.0, 9f32.ln()], 1, 2, Activation::Softmax, 2.0).unwrap();
        assert!(close(p[0], 0.25) && close(p[1], 0.75), "{p:?}");
        // Extreme but finite logits do not overflow.
        let p = activate(&[3e38, -3e38], 1, 2, Activation::Softmax, 1e-30).unwrap();
        assert_eq!(p, vec![1.0, 0.0]);
        let p = activate(&[0.0, 3e38, -3e38], 1, 3, Activation::Sigmoid, 1e-3).unwrap();
        assert_eq!(p, vec![0.5, 1.0, 0.0]);
    }

    #[test]
    fn logits_with_bias() {
        // x = [[1, 2]], W_g = [[1, 0], [0, 1], [1, 1]], b = [0.5, 0, -1]
        let z = router_logits(
            &[1.0f32, 2.0],
            1,
            2,
            &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            Some(&[0.5, 0.0, -1.0]),
            3,
        )
        .unwrap();
        assert_eq!(z, vec![1.5, 2.0, 2.0]);
    }

    #[test]
    fn top_k_ties_and_order() {
        let r = top_k(&[0.2, 0.3, 0.2, 0.3], 1, 4, 3, false).unwrap();
        assert_eq!(r.ids(), &[1, 3, 0]);
        assert_eq!(r.weights(), &[0.3, 0.3, 0.2]);
        let r = top_k(&[0.2, 0.3, 0.2, 0.3], 1, 4, 3, true).unwrap();
        assert!(close(r.weight(0, 0), 0.375) && close(r.weight(0, 2), 0.25));
        // An all-zero row: the lowest k ids, uniformly.
        let r = top_k(&[0.0; 4], 1, 4, 2, true).unwrap();
        assert_eq!(r.ids(), &[0, 1]);
        assert_eq!(r.weights(), &[0.5, 0.5]);
    }

    #[test]
    fn threshold_gate_cases() {
        let probs = [
            0.5, 0.3, 0.2, 0.0, // τ = 0.25: {0, 1}, weights 0.25/0.3, 0.05/0.3
            0.1, 0.4, 0.4, 0.1, // τ = 0.5: none passes, arg-max is expert 1
            0.25, 0.25, 0.25, 0.25, // τ = 0.25: all exactly at τ, uniform
            0.5, 0.25, 0.25, 0.0, // τ = 0.25: {0, 1, 2}, the two at τ get 0
        ];
        let r = threshold_gate(&probs, 4, 4, &[0.25, 0.5, 0.25, 0.25]).unwrap();
        assert_eq!(
            r.ids(),
            &[0, 1, -1, -1, 1, -1, -1, -1, 0, 1, 2, 3, 0, 1, 2, -1]
        );
        let w = r.weights();
        assert!(close(w[0], 0.25 / 0.3) && close(w[1], 0.05 / 0.3), "{w:?}");
        assert_eq!(&w[2..8], &[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(&w[8..12], &[0.25; 4]);
        assert_eq!(&w[12..16], &[1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn thresholds_from_specs() {
        let t =
            threshold_values::<f32>(&ThresholdSpec::Learned { theta: 0.0 }, None, 3, 5, 4).unwrap();
        assert_eq!(t, vec![0.125; 3]);
        let spec = ThresholdSpec::InputDependent {
            w: vec![1.0, -1.0],
            b: 0.5,
        };
        // z = [1 - 1.5 + 0.5, 0 - 0 + 0.5] = [0, 0.5]
        let t = threshold_values(&spec, Some(&[1.0f32, 1.5, 0.0, 0.0]), 2, 2, 2).unwrap();
        assert!(close(t[0], 0.25), "{t:?}");
        assert!(close(t[1], sigmoid(0.5) / 2.0), "{t:?}");
    }

    #[test]
    fn hierarchical_segments_pick_their_posterior() {
        let seg = Segments::from_lengths(&[1, 0, 2]).unwrap();
        let global = SeqRouting::new(seg, 2, vec![1.0, 0.0, 0.5, 0.5, 0.0, 1.0]).unwrap();
        let local = [0.5, 0.5, 0.25, 0.75, 1.0, 0.0];
        let p = hierarchical(
            &local,
            3,
            2,
            &global,
            HierarchicalCombine::Mix { lambda: 0.5 },
        )
        .unwrap();
        assert_eq!(p, vec![0.75, 0.25, 0.125, 0.875, 0.5, 0.5]);
        let p = hierarchical(&local, 3, 2, &global, HierarchicalCombine::Product).unwrap();
        // Row 2: g ⊙ l = [0, 0] -> falls back to l.
        assert_eq!(p, vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
    }
}
