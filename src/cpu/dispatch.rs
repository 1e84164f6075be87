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
///
/// Invariants of the result (checked again by every function that takes a plan):
///
/// 1. `expert_offsets` has `E + 1` entries, starts at 0, never decreases and ends at `P`;
/// 2. `sorted_slots` is a permutation of the non-empty flat slots, and every slot in
///    `sorted_slots[expert_offsets[e]..expert_offsets[e + 1]]` holds expert `e`, in increasing order;
/// 3. `slot_to_sorted[sorted_slots[pos]] = pos` for every `pos < P`, and every other entry is `-1`.
///
/// A routing is valid by construction ([`Routing::new`]), so this never fails; it returns a
/// `Result` like every other operation.
pub fn dispatch(routing: &Routing) -> Result<DispatchPlan> {
    let e = routing.num_experts();
    let ids = routing.ids();
    let mut counts = vec![0usize; e];
    for &id in ids {
        if let Some(c) = usize::try_from(id).ok().and_then(|i| counts.get_mut(i)) {
            *c += 1;
        }
    }
    let mut expert_offsets = Vec::with_capacity(e + 1);
    let mut acc = 0usize;
    expert_offsets.push(0i32);
    for &c in &counts {
        acc += c;
        expert_offsets.push(to_i32("number of (token, slot) pairs", acc)?);
    }
    // `next[e]`: the next free sorted position of expert `e`.
    let mut next: Vec<usize> = counts
        .iter()
        .scan(0usize, |start, &c| {
            let s = *start;
            *start += c;
            Some(s)
        })
        .collect();
    let mut sorted_slots = vec![0i32; acc];
    let mut slot_to_sorted = vec![-1i32; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if let Some(n) = usize::try_from(id).ok().and_then(|x| next.get_mut(x)) {
            let pos = *n;
            *n += 1;
            sorted_slots[pos] = to_i32("flat slot index", i)?;
            slot_to_sorted[i] = to_i32("sorted position", pos)?;
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

fn to_i32(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidDim {
        what,
        value: v,
        reason: "must fit in an i32",
    })
}

/// `a·b` as a buffer length, or [`Error::InvalidDim`] naming `what` when it overflows `usize`.
pub(crate) fn mul_len(what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or(Error::InvalidDim {
        what,
        value: a.saturating_mul(b),
        reason: "the buffer length overflows usize",
    })
}

/// A row width of at least 1.
pub(crate) fn check_dim(what: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        Err(Error::InvalidDim {
            what,
            value,
            reason: "must be at least 1",
        })
    } else {
        Ok(())
    }
}

/// Checks the invariants of a plan (see [`dispatch`]) so that no later index can go out of bounds,
/// whichever path built it (a plan copied back from the device is checked as thoroughly as one
/// built here).
pub(crate) fn check_plan(plan: &DispatchPlan) -> Result<()> {
    let slots = mul_len("plan num_tokens * k_max", plan.num_tokens, plan.k_max)?;
    check_len(
        "plan expert_offsets [E + 1]",
        plan.num_experts + 1,
        plan.expert_offsets.len(),
    )?;
    check_len(
        "plan slot_to_sorted [T * k_max]",
        slots,
        plan.slot_to_sorted.len(),
    )?;
    let pairs = plan.sorted_slots.len();
    let bad = |reason, index: usize, value: i32, previous: i32| Error::BadOffsets {
        what: "dispatch plan expert_offsets",
        reason,
        index,
        value: value.max(0) as usize,
        previous: previous.max(0) as usize,
        rows: pairs,
    };
    let mut previous = 0i32;
    for (index, &o) in plan.expert_offsets.iter().enumerate() {
        if index == 0 && o != 0 {
            return Err(bad("the first offset must be 0", 0, o, 0));
        }
        if o < previous {
            return Err(bad("offsets must not decrease", index, o, previous));
        }
        previous = o;
    }
    if previous as usize != pairs {
        return Err(bad(
            "the last offset must equal the number of pairs",
            plan.num_experts,
            previous,
            previous,
        ));
    }
    let not_inverse = |pos: usize| Error::InvalidDim {
        what: "dispatch plan sorted position",
        value: pos,
        reason: "sorted_slots and slot_to_sorted are not inverse permutations",
    };
    for (pos, &slot) in plan.sorted_slots.iter().enumerate() {
        let back = usize::try_from(slot)
            .ok()
            .and_then(|i| plan.slot_to_sorted.get(i));
        if back.and_then(|&b| usize::try_from(b).ok()) != Some(pos) {
            return Err(not_inverse(pos));
        }
    }
    // Every slot that claims a sorted position is the one that position lists (with the loop above,
    // exactly P slots are non-empty).
    for (slot, &pos) in plan.slot_to_sorted.iter().enumerate() {
        if pos == -1 {
            continue;
        }
        let listed = usize::try_from(pos)
            .ok()
            .and_then(|p| plan.sorted_slots.get(p));
        if listed.and_then(|&s| usize::try_from(s).ok()) != Some(slot) {
            return Err(not_inverse(pos.max(0) as usize));
        }
    }
    Ok(())
}

/// Checks that a routing is the one a plan was built from: the same `T`, `k_max`, `E`, and at every
/// slot, the plan lists the slot exactly when it is non-empty, in the segment of its expert. The plan
/// itself is checked with [`check_plan`] first.
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
    )?;
    check_plan(plan)?;
    for (slot, (&id, &pos)) in routing.ids().iter().zip(&plan.slot_to_sorted).enumerate() {
        let consistent = match usize::try_from(id) {
            // Empty slot: the plan must not list it.
            Err(_) => pos == -1,
            Ok(e) => {
                let lo = plan.expert_offsets[e];
                let hi = plan.expert_offsets[e + 1];
                lo <= pos && pos < hi
            }
        };
        if !consistent {
            return Err(Error::InvalidDim {
                what: "routing slot (t * k_max + s) vs dispatch plan",
                value: slot,
                reason: "the plan was built from another routing (its expert or emptiness differs)",
            });
        }
    }
    Ok(())
}

/// Gathers input rows into sorted order: `out[p, :] = x[token_of(p), :]` with
/// `token_of(p) = sorted_slots[p] / k_max`, `[P, d]`. `x` is `[T, d]`, `d >= 1`.
pub fn gather_rows<T: Element>(
    x: &[T],
    num_tokens: usize,
    d: usize,
    plan: &DispatchPlan,
) -> Result<Vec<T>> {
    check_dim("d", d)?;
    check_len("tokens vs plan", plan.num_tokens, num_tokens)?;
    check_plan(plan)?;
    check_len("x [T, d]", mul_len("x [T, d]", num_tokens, d)?, x.len())?;
    let mut out = Vec::with_capacity(plan.num_pairs() * d);
    for p in 0..plan.num_pairs() {
        let t = plan.token_of(p);
        out.extend_from_slice(&x[t * d..(t + 1) * d]);
    }
    Ok(out)
}

/// The inverse permutation for per-pair values: `out[t·k_max + s] = sorted[slot_to_sorted[t·k_max + s]]`,
/// or `fill` for an empty slot. `sorted` has one value per pair (`[P]`), the output one per slot
/// (`[T, k_max]`). `unsort(sorted_slots)` gives back `i` at every non-empty slot `i`.
pub fn unsort<U: Copy>(sorted: &[U], plan: &DispatchPlan, fill: U) -> Result<Vec<U>> {
    check_plan(plan)?;
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
/// bit for bit. `routing` must be the one `plan` was built from (checked slot by slot), `d >= 1`,
/// `scale` finite.
pub fn scatter_combine<T: Element>(
    rows: &[f32],
    d: usize,
    plan: &DispatchPlan,
    routing: &Routing,
    scale: f32,
    y: &mut [T],
) -> Result<()> {
    check_dim("d", d)?;
    check_plan_routing(plan, routing)?;
    check_scale(scale)?;
    check_len(
        "rows [P, d]",
        mul_len("rows [P, d]", plan.num_pairs(), d)?,
        rows.len(),
    )?;
    check_len(
        "y [T, d]",
        mul_len("y [T, d]", plan.num_tokens, d)?,
        y.len(),
    )?;
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

pub(crate) use crate::gate::check_scale;
