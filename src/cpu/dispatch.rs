//! Dispatch on the CPU: the stable counting sort of a routing's (token, slot) pairs by expert, the
//! gather of input rows into that order, and the inverse (unsort, and the weighted scatter-combine
//! back into token order).

use crate::error::{check_len, Error, Result};
use crate::{DispatchPlan, Element, Routing};

/// Builds the [`DispatchPlan`] of a routing by a stable counting sort:
///
/// * `count[e] = |{(t, s) : ids[t, s] = e}|`, `expert_offsets[e] = Σ_{e' < e} count[e']`,
///   `expert_offsets[E] = P` (the number of non-empty slots);
/// * slots are visited in flat order `i = t·k_max + s` and each is placed at the next free position of
///   its expert, so within an expert the order is by token, then by slot;
/// * `sorted_slots[pos] = i`, `slot_to_sorted[i] = pos`, and `slot_to_sorted[i] = -1` for an empty slot.
pub fn dispatch(routing: &Routing) -> Result<DispatchPlan> {
    let e = routing.num_experts();
    let ids = routing.ids();
    let mut counts = vec![0usize; e];
    for &id in ids {
        if id >= 0 {
            counts[id as usize] += 1;
        }
    }
    let mut expert_offsets = Vec::with_capacity(e + 1);
    let mut acc = 0usize;
    expert_offsets.push(0i32);
    for &c in &counts {
        acc += c;
        expert_offsets.push(acc as i32);
    }
    let mut next: Vec<usize> = expert_offsets[..e].iter().map(|&o| o as usize).collect();
    let mut sorted_slots = vec![0i32; acc];
    let mut slot_to_sorted = vec![-1i32; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if id >= 0 {
            let pos = next[id as usize];
            next[id as usize] += 1;
            sorted_slots[pos] = i as i32;
            slot_to_sorted[i] = pos as i32;
        }
    }
    Ok(DispatchPlan {
        num_tokens: routing.num_tokens(),
        k_max: routing.k_max(),
        num_experts: e,
        expert_offsets,
        sorted_slots,
        slot_to_sorted,
    })
}

/// Checks that a routing is the one a plan was built from (same T, k_max, E).
pub(crate) fn check_plan_routing(plan: &DispatchPlan, routing: &Routing) -> Result<()> {
    check_len(
        "routing tokens vs plan",
        plan.num_tokens,
        routing.num_tokens(),
    )?;
    check_len("routing k_max vs plan", plan.k_max, routing.k_max())?;
    check_len(
        "routing experts vs plan",
        plan.num_experts,
        routing.num_experts(),
    )
}

/// Gathers input rows into sorted order: `out[p, :] = x[token_of(p), :]`, `[P, d]`.
pub fn gather_rows<T: Element>(
    x: &[T],
    num_tokens: usize,
    d: usize,
    plan: &DispatchPlan,
) -> Result<Vec<T>> {
    check_len("tokens vs plan", plan.num_tokens, num_tokens)?;
    check_len("x [T, d]", num_tokens * d, x.len())?;
    let mut out = Vec::with_capacity(plan.num_pairs() * d);
    for p in 0..plan.num_pairs() {
        let t = plan.token_of(p);
        out.extend_from_slice(&x[t * d..(t + 1) * d]);
    }
    Ok(out)
}

/// The inverse permutation for per-pair values: `out[t·k_max + s] = sorted[slot_to_sorted[t·k_max + s]]`,
/// or `fill` for an empty slot. `sorted` has one value per pair (`[P]`).
pub fn unsort<U: Copy>(sorted: &[U], plan: &DispatchPlan, fill: U) -> Result<Vec<U>> {
    check_len("sorted values [P]", plan.num_pairs(), sorted.len())?;
    Ok(plan
        .slot_to_sorted
        .iter()
        .map(|&pos| if pos >= 0 { sorted[pos as usize] } else { fill })
        .collect())
}

/// Scatter-combine of per-pair rows back into token order:
/// `y[t, :] = round(y[t, :] + scale·Σ_{s: ids[t,s] ≠ -1} w_ts·rows[slot_to_sorted[t·k_max + s], :])`,
/// the sum over slots in slot order, in f32. `rows` is f32 `[P, d]`, `y` `[T, d]`. Empty slots
/// contribute exactly zero (their weights are never read); a token with no active slot keeps its row
/// bit for bit.
pub fn scatter_combine<T: Element>(
    rows: &[f32],
    d: usize,
    plan: &DispatchPlan,
    routing: &Routing,
    scale: f32,
    y: &mut [T],
) -> Result<()> {
    check_plan_routing(plan, routing)?;
    check_scale(scale)?;
    check_len("rows [P, d]", plan.num_pairs() * d, rows.len())?;
    check_len("y [T, d]", plan.num_tokens * d, y.len())?;
    let k = plan.k_max;
    let mut acc = vec![0.0f32; d];
    for t in 0..plan.num_tokens {
        let mut any = false;
        acc.iter_mut().for_each(|a| *a = 0.0);
        for s in 0..k {
            let pos = plan.slot_to_sorted[t * k + s];
            if pos < 0 {
                continue;
            }
            any = true;
            let w = routing.weight(t, s);
            let row = &rows[pos as usize * d..(pos as usize + 1) * d];
            for (a, &r) in acc.iter_mut().zip(row) {
                *a += w * r;
            }
        }
        if any {
            for (yo, &a) in y[t * d..(t + 1) * d].iter_mut().zip(&acc) {
                *yo = T::from_f32(yo.to_f32() + scale * a);
            }
        }
    }
    Ok(())
}

/// The LoRA scale must be finite.
pub(crate) fn check_scale(scale: f32) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            what: "scale",
            value: scale,
            reason: "must be finite",
        })
    }
}
