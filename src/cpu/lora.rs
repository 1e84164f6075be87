//! Grouped LoRA shrink and expand on the CPU: over expert segments (after [`super::dispatch()`], with
//! the gather and the weighted scatter-combine fused) and over sequence segments (punica's SGMV
//! case, one adapter per segment). Intermediates `h` are f32; every sum is f32 in index order.
//!
//! Lengths, the plan (against its routing), adapter ids and the scale are validated before anything
//! is computed. The values of `x`, `A`, `B` and `h` are not inspected: as in any matmul, a NaN among
//! them propagates to the outputs it touches (a `-1` slot or adapter never reads them).

use super::dispatch::{check_plan, check_plan_routing, check_scale, mul_len};
use crate::error::{check_len, Result};
use crate::{AdapterSegments, DispatchPlan, Element, LoraShape, Routing};

/// `Σ_i x[i]·w[i]` in f32, in index order.
#[inline]
fn dot<T: Element>(x: &[T], w: &[T]) -> f32 {
    let mut acc = 0.0f32;
    for (&a, &b) in x.iter().zip(w) {
        acc += a.to_f32() * b.to_f32();
    }
    acc
}

/// `Σ_j h[j]·b[j]` in f32, in index order.
#[inline]
fn dot_h<T: Element>(h: &[f32], b: &[T]) -> f32 {
    let mut acc = 0.0f32;
    for (&a, &w) in h.iter().zip(b) {
        acc += a * w.to_f32();
    }
    acc
}

fn check_plan_shape(plan: &DispatchPlan, shape: &LoraShape) -> Result<()> {
    check_len(
        "experts of the plan vs shape.num_experts",
        shape.num_experts,
        plan.num_experts(),
    )?;
    check_plan(plan)
}

/// Grouped shrink over expert segments with the gather fused:
/// `h[p, j] = Σ_i x[token(p), i]·A[e(p), j, i]` for every sorted pair `p` (`e(p)` the expert of its
/// segment), f32 `[P, r]`. `x` `[T, d_in]`, `A` `[E, r, d_in]`.
pub fn shrink_experts<T: Element>(
    x: &[T],
    a: &[T],
    shape: &LoraShape,
    plan: &DispatchPlan,
) -> Result<Vec<f32>> {
    check_plan_shape(plan, shape)?;
    let (r, d_in) = (shape.rank, shape.d_in);
    let x_len = mul_len("x [T, d_in]", plan.num_tokens(), d_in)?;
    check_len("x [T, d_in]", x_len, x.len())?;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    let mut h = vec![0.0f32; plan.num_pairs() * r];
    for e in 0..shape.num_experts {
        let a_e = &a[e * r * d_in..(e + 1) * r * d_in];
        let seg = plan.expert_offsets()[e] as usize..plan.expert_offsets()[e + 1] as usize;
        for p in seg {
            let t = plan.token_of(p);
            let xt = &x[t * d_in..(t + 1) * d_in];
            for j in 0..r {
                h[p * r + j] = dot(xt, &a_e[j * d_in..(j + 1) * d_in]);
            }
        }
    }
    Ok(h)
}

/// Grouped expand with the scatter and weighted combine fused, deterministic per token:
/// `y[t, o] = round(y[t, o] + scale·Σ_{s: ids[t,s] ≠ -1} w_ts·Σ_j h[pos(t, s), j]·B[e_ts, o, j])`,
/// slots in slot order, `j` in order, all in f32. `h` f32 `[P, r]` from [`shrink_experts`] with the
/// same plan, `B` `[E, d_out, r]`, `y` `[T, d_out]`. Empty slots contribute exactly zero; a token with
/// no active slot keeps its row bit for bit.
pub fn expand_experts<T: Element>(
    h: &[f32],
    b: &[T],
    shape: &LoraShape,
    plan: &DispatchPlan,
    routing: &Routing,
    scale: f32,
    y: &mut [T],
) -> Result<()> {
    check_plan_shape(plan, shape)?;
    check_len(
        "experts of the routing vs shape.num_experts",
        shape.num_experts,
        routing.num_experts(),
    )?;
    check_plan_routing(plan, routing)?;
    check_scale(scale)?;
    let (r, d_out, k) = (shape.rank, shape.d_out, plan.k_max());
    check_len(
        "h [P, r]",
        mul_len("h [P, r]", plan.num_pairs(), r)?,
        h.len(),
    )?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    let y_len = mul_len("y [T, d_out]", plan.num_tokens(), d_out)?;
    check_len("y [T, d_out]", y_len, y.len())?;
    for t in 0..plan.num_tokens() {
        let active: Vec<(usize, usize, f32)> = (0..k)
            .filter_map(|s| {
                let pos = plan.slot_to_sorted()[t * k + s];
                (pos >= 0).then(|| {
                    (
                        pos as usize,
                        routing.id(t, s) as usize,
                        routing.weight(t, s),
                    )
                })
            })
            .collect();
        if active.is_empty() {
            continue;
        }
        for o in 0..d_out {
            let mut acc = 0.0f32;
            for &(pos, e, w) in &active {
                let b_row = &b[(e * d_out + o) * r..(e * d_out + o + 1) * r];
                acc += w * dot_h(&h[pos * r..(pos + 1) * r], b_row);
            }
            let yo = &mut y[t * d_out + o];
            *yo = T::from_f32(yo.to_f32() + scale * acc);
        }
    }
    Ok(())
}

fn check_segments(segs: &AdapterSegments, shape: &LoraShape) -> Result<()> {
    check_len(
        "adapters of the segments vs shape.num_experts",
        shape.num_experts,
        segs.num_adapters(),
    )
}

/// Segmented (SGMV) shrink: `h[t, j] = Σ_i x[t, i]·A[a(t), j, i]` with `a(t)` the adapter of the
/// segment holding row `t`; rows of segments with adapter `-1` are 0. f32 `[T, r]`;
/// `shape.num_experts` is the number of adapters, `A` `[N, r, d_in]`.
pub fn shrink_segments<T: Element>(
    x: &[T],
    a: &[T],
    shape: &LoraShape,
    segs: &AdapterSegments,
) -> Result<Vec<f32>> {
    check_segments(segs, shape)?;
    let (r, d_in) = (shape.rank, shape.d_in);
    let rows = segs.segments().num_rows();
    check_len("x [T, d_in]", mul_len("x [T, d_in]", rows, d_in)?, x.len())?;
    check_len("A [N, r, d_in]", shape.a_len(), a.len())?;
    let mut h = vec![0.0f32; rows * r];
    for (s, &id) in segs.adapter_ids().iter().enumerate() {
        if id < 0 {
            continue;
        }
        let a_n = &a[id as usize * r * d_in..(id as usize + 1) * r * d_in];
        for t in segs.segments().range(s) {
            let xt = &x[t * d_in..(t + 1) * d_in];
            for j in 0..r {
                h[t * r + j] = dot(xt, &a_n[j * d_in..(j + 1) * d_in]);
            }
        }
    }
    Ok(h)
}

/// Segmented (SGMV) expand: `y[t, o] = round(y[t, o] + scale·Σ_j h[t, j]·B[a(t), o, j])`; rows of
/// segments with adapter `-1` are left bit for bit. `h` f32 `[T, r]`, `B` `[N, d_out, r]`.
pub fn expand_segments<T: Element>(
    h: &[f32],
    b: &[T],
    shape: &LoraShape,
    segs: &AdapterSegments,
    scale: f32,
    y: &mut [T],
) -> Result<()> {
    check_segments(segs, shape)?;
    check_scale(scale)?;
    let (r, d_out) = (shape.rank, shape.d_out);
    let rows = segs.segments().num_rows();
    check_len("h [T, r]", mul_len("h [T, r]", rows, r)?, h.len())?;
    check_len("B [N, d_out, r]", shape.b_len(), b.len())?;
    check_len(
        "y [T, d_out]",
        mul_len("y [T, d_out]", rows, d_out)?,
        y.len(),
    )?;
    for (s, &id) in segs.adapter_ids().iter().enumerate() {
        if id < 0 {
            continue;
        }
        let b_n = &b[id as usize * d_out * r..(id as usize + 1) * d_out * r];
        for t in segs.segments().range(s) {
            let ht = &h[t * r..(t + 1) * r];
            for o in 0..d_out {
                let acc = dot_h(ht, &b_n[o * r..(o + 1) * r]);
                let yo = &mut y[t * d_out + o];
                *yo = T::from_f32(yo.to_f32() + scale * acc);
            }
        }
    }
    Ok(())
}
