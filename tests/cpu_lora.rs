//! Property tests of the CPU reference for dispatch, grouped and segmented LoRA, weight-space mixing
//! and the whole layer: invariants (permutation, stability, inverse, exact zeros of empty slots,
//! linearity) and agreement with naive f64 per-token loops, over odd shapes, skewed / empty /
//! all-to-one / dense routings, `-1` slots with garbage weights, duplicate ids, and every dtype.
//! Each invalid input has its own test showing the typed error and its values.

use half::{bf16, f16};
use molora::cpu::{self, BaseWeight, DenseBase, Experts};
use molora::testing::{compare, Tolerance};
use molora::Rng;
use molora::{
    AdapterSegments, DType, Element, Error, LoraShape, Routing, Segments, SeqRouting, MAX_RANK,
};
use proptest::prelude::*;

/// xorshift64: the tensors of a case come from its seed, so a failing case replays exactly.
fn f32s<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Bit patterns, so that `-0.0` vs `0.0` and NaN payloads count as differences.
fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// A routing problem: shapes and routing style.
#[derive(Debug, Clone)]
struct Case {
    t: usize,
    k_max: usize,
    e: usize,
    r: usize,
    d_in: usize,
    d_out: usize,
    seed: u64,
    /// Share of slots sent to expert 0 (1.0 = all tokens on one expert).
    skew: f64,
    /// Share of `-1` slots (1.0 = nothing routed).
    empty: f64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(0usize), Just(1), Just(7), Just(133), 0usize..140],
        // 1..=4 slots, or 0: dense (k_max = E).
        0usize..=4,
        1usize..=64,
        prop_oneof![1usize..=8, 1usize..=128],
        1usize..=45,
        1usize..=45,
        any::<u64>(),
        prop_oneof![Just(0.0f64), Just(0.9), Just(1.0)],
        prop_oneof![Just(0.0f64), Just(0.3), Just(1.0)],
    )
        .prop_map(|(t, k, e, r, d_in, d_out, seed, skew, empty)| {
            let dense = k == 0;
            // Keep the work small when the rank or the number of slots is large.
            let r = if dense { r.min(8) } else { r };
            let (d_in, d_out) = if r > 32 || dense {
                (d_in.min(17), d_out.min(13))
            } else {
                (d_in, d_out)
            };
            Case {
                t,
                k_max: if dense { e } else { k },
                e,
                r,
                d_in: d_in | 1,
                d_out: d_out | 1,
                seed,
                skew,
                empty,
            }
        })
}

/// A routing with skew, empty slots (whose weights are garbage: NaN, ±inf or huge; they must never
/// be read), experts without tokens and duplicate ids within a token.
fn routing(c: &Case, rng: &mut Rng) -> Routing {
    let n = c.t * c.k_max;
    let mut ids = Vec::with_capacity(n);
    let mut w = Vec::with_capacity(n);
    for _ in 0..n {
        if rng.uniform() < c.empty {
            ids.push(-1);
            w.push([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3.0e38][rng.below(4)]);
        } else {
            ids.push(if rng.uniform() < c.skew {
                0
            } else {
                rng.below(c.e) as i32
            });
            w.push(rng.uniform() as f32 * 2.0 - 0.5);
        }
    }
    Routing::new(c.t, c.k_max, c.e, ids, w).expect("valid routing")
}

/// The same routing with every empty slot removed (k_max shrinks to the most active slots of a
/// token, padded with -1 and weight 0), the active slots kept in their order.
fn without_empty_slots(r: &Routing) -> Routing {
    let k = (0..r.num_tokens())
        .map(|t| (0..r.k_max()).filter(|&s| r.id(t, s) >= 0).count())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![];
    let mut w = vec![];
    for t in 0..r.num_tokens() {
        let mut n = 0;
        for s in 0..r.k_max() {
            if r.id(t, s) >= 0 {
                ids.push(r.id(t, s));
                w.push(r.weight(t, s));
                n += 1;
            }
        }
        ids.extend(std::iter::repeat_n(-1, k - n));
        w.extend(std::iter::repeat_n(0.0, k - n));
    }
    Routing::new(r.num_tokens(), k, r.num_experts(), ids, w).unwrap()
}

/// Naive f64 reference of the LoRA part, token by token:
/// `s·Σ_{slots, id ≠ -1} w·Σ_j (Σ_i x[t,i]·A[e,j,i])·B[e,o,j]`.
fn naive_delta<T: Element>(
    x: &[T],
    a: &[T],
    b: &[T],
    shape: &LoraShape,
    r: &Routing,
    scale: f32,
) -> Vec<f32> {
    let (rk, d_in, d_out) = (shape.rank, shape.d_in, shape.d_out);
    let mut out = vec![0.0f32; r.num_tokens() * d_out];
    for t in 0..r.num_tokens() {
        let mut acc = vec![0.0f64; d_out];
        for s in 0..r.k_max() {
            let e = r.id(t, s);
            if e < 0 {
                continue;
            }
            let e = e as usize;
            let w = r.weight(t, s) as f64;
            for j in 0..rk {
                let mut h = 0.0f64;
                for i in 0..d_in {
                    h += x[t * d_in + i].to_f32() as f64
                        * a[(e * rk + j) * d_in + i].to_f32() as f64;
                }
                for (o, acc_o) in acc.iter_mut().enumerate() {
                    *acc_o += w * h * b[(e * d_out + o) * rk + j].to_f32() as f64;
                }
            }
        }
        for (o, v) in acc.into_iter().enumerate() {
            out[t * d_out + o] = (scale as f64 * v) as f32;
        }
    }
    out
}

/// Naive f64 base: `Σ_i x[t,i]·W0[o,i] + bias[o]`.
fn naive_base<T: Element>(
    x: &[T],
    w0: &[T],
    bias: Option<&[T]>,
    t: usize,
    d_in: usize,
    d_out: usize,
) -> Vec<f64> {
    let mut out = vec![0.0f64; t * d_out];
    for tt in 0..t {
        for o in 0..d_out {
            let mut acc = bias.map_or(0.0, |b| b[o].to_f32() as f64);
            for i in 0..d_in {
                acc += x[tt * d_in + i].to_f32() as f64 * w0[o * d_in + i].to_f32() as f64;
            }
            out[tt * d_out + o] = acc;
        }
    }
    out
}

/// Tolerance for a result rounded to `T` after sums of about `terms` products of unit size.
fn tol<T: Element>(terms: usize) -> Tolerance {
    Tolerance::for_dtype(T::DTYPE).scaled((terms.max(1) as f32).sqrt())
}

macro_rules! prop_close {
    ($what:expr, $got:expr, $want:expr, $tol:expr) => {
        if let Err(m) = compare($what, $got, $want, $tol) {
            prop_assert!(false, "{}", m);
        }
    };
}

fn dispatch_invariants(r: &Routing) -> Result<(), TestCaseError> {
    let plan = cpu::dispatch(r).unwrap();
    let (t, k, e) = (r.num_tokens(), r.k_max(), r.num_experts());
    prop_assert_eq!(
        (plan.num_tokens(), plan.k_max(), plan.num_experts()),
        (t, k, e)
    );
    let active: Vec<usize> = (0..t * k).filter(|&i| r.ids()[i] >= 0).collect();
    prop_assert_eq!(plan.num_pairs(), active.len());
    let off = plan.expert_offsets();
    prop_assert_eq!(off.len(), e + 1);
    prop_assert_eq!(off[0], 0);
    prop_assert_eq!(off[e] as usize, active.len());
    prop_assert!(off.windows(2).all(|w| w[0] <= w[1]), "offsets decrease");
    // A permutation of the non-empty slots.
    let mut seen = plan.sorted_slots().to_vec();
    seen.sort_unstable();
    prop_assert_eq!(
        seen,
        active.iter().map(|&i| i as i32).collect::<Vec<_>>(),
        "not a permutation of the non-empty slots"
    );
    // Grouped by expert, stable: tokens (then slots) increasing within an expert; the counts are
    // those of the routing.
    for ex in 0..e {
        let seg = &plan.sorted_slots()[off[ex] as usize..off[ex + 1] as usize];
        prop_assert!(seg.iter().all(|&i| r.ids()[i as usize] == ex as i32));
        prop_assert!(seg.windows(2).all(|w| w[0] < w[1]), "unstable order");
        prop_assert!(
            seg.windows(2)
                .all(|w| (w[0] as usize / k) <= (w[1] as usize / k)),
            "tokens decrease within an expert"
        );
        let count = r.ids().iter().filter(|&&id| id == ex as i32).count();
        prop_assert_eq!(plan.expert_count(ex), count);
    }
    // slot_to_sorted is the inverse of sorted_slots; -1 exactly at the empty slots.
    for (i, &pos) in plan.slot_to_sorted().iter().enumerate() {
        if r.ids()[i] < 0 {
            prop_assert_eq!(pos, -1);
        } else {
            prop_assert_eq!(plan.sorted_slots()[pos as usize] as usize, i);
        }
    }
    for (p, &slot) in plan.sorted_slots().iter().enumerate() {
        prop_assert_eq!(plan.slot_to_sorted()[slot as usize], p as i32);
        prop_assert_eq!(plan.token_of(p), slot as usize / k);
    }
    // unsort inverts the permutation: the sorted slot indices come back as the identity.
    let back = cpu::unsort(plan.sorted_slots(), &plan, -7).unwrap();
    for (i, &v) in back.iter().enumerate() {
        prop_assert_eq!(v, if r.ids()[i] >= 0 { i as i32 } else { -7 });
    }
    // Dispatch is deterministic.
    prop_assert_eq!(cpu::dispatch(r).unwrap(), plan);
    Ok(())
}

fn grouped_lora<T: Element>(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(c.seed);
    let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).unwrap();
    let x: Vec<T> = rng.values(c.t * c.d_in, 1.0);
    let a: Vec<T> = rng.values(shape.a_len(), 0.4);
    let b: Vec<T> = rng.values(shape.b_len(), 0.4);
    let y0: Vec<T> = rng.values(c.t * c.d_out, 1.0);
    let r = routing(c, &mut rng);
    let scale = 1.25f32;
    dispatch_invariants(&r)?;
    let plan = cpu::dispatch(&r).unwrap();

    // Gather equals the token rows.
    let g = cpu::gather_rows(&x, c.t, c.d_in, &plan).unwrap();
    prop_assert_eq!(g.len(), plan.num_pairs() * c.d_in);
    for p in 0..plan.num_pairs() {
        let t = plan.token_of(p);
        prop_assert_eq!(
            bits(&g[p * c.d_in..(p + 1) * c.d_in]),
            bits(&x[t * c.d_in..(t + 1) * c.d_in])
        );
    }

    // Shrink + expand equal the naive per-token loop.
    let h = cpu::shrink_experts(&x, &a, &shape, &plan).unwrap();
    prop_assert_eq!(h.len(), plan.num_pairs() * c.r);
    let mut y = y0.clone();
    cpu::expand_experts(&h, &b, &shape, &plan, &r, scale, &mut y).unwrap();
    let delta = naive_delta(&x, &a, &b, &shape, &r, scale);
    let want: Vec<f32> = f32s(&y0).iter().zip(&delta).map(|(a, b)| a + b).collect();
    prop_close!(
        "expand_experts",
        &f32s(&y),
        &want,
        tol::<T>(c.d_in * c.r * c.k_max)
    );

    // Empty slots contribute exactly zero: the same result, bit for bit, without them.
    let dense = without_empty_slots(&r);
    let plan2 = cpu::dispatch(&dense).unwrap();
    let h2 = cpu::shrink_experts(&x, &a, &shape, &plan2).unwrap();
    let mut y2 = y0.clone();
    cpu::expand_experts(&h2, &b, &shape, &plan2, &dense, scale, &mut y2).unwrap();
    prop_assert_eq!(bits(&y), bits(&y2), "-1 slots changed the result");
    // Tokens with only empty slots keep their rows bit for bit.
    for t in 0..c.t {
        if (0..c.k_max).all(|s| r.id(t, s) < 0) {
            prop_assert_eq!(
                bits(&y[t * c.d_out..(t + 1) * c.d_out]),
                bits(&y0[t * c.d_out..(t + 1) * c.d_out])
            );
        }
    }
    // A routing with every slot empty leaves y untouched.
    let none = Routing::empty(c.t, c.k_max, c.e).unwrap();
    let plan0 = cpu::dispatch(&none).unwrap();
    prop_assert_eq!(plan0.num_pairs(), 0);
    let h0 = cpu::shrink_experts(&x, &a, &shape, &plan0).unwrap();
    prop_assert!(h0.is_empty());
    let mut y_none = y0.clone();
    cpu::expand_experts(&h0, &b, &shape, &plan0, &none, scale, &mut y_none).unwrap();
    prop_assert_eq!(bits(&y_none), bits(&y0));

    // Scatter-combine of the per-pair expanded rows (the unfused path) gives the fused expand's
    // result bit for bit: both sum over j in order, then over slots in slot order, in f32.
    let mut rows = vec![0.0f32; plan.num_pairs() * c.d_out];
    for p in 0..plan.num_pairs() {
        let slot = plan.sorted_slots()[p] as usize;
        let e = r.ids()[slot] as usize;
        for o in 0..c.d_out {
            let mut acc = 0.0f32;
            for j in 0..c.r {
                acc += h[p * c.r + j] * b[(e * c.d_out + o) * c.r + j].to_f32();
            }
            rows[p * c.d_out + o] = acc;
        }
    }
    let mut y3 = y0.clone();
    cpu::scatter_combine(&rows, c.d_out, &plan, &r, scale, &mut y3).unwrap();
    prop_assert_eq!(
        bits(&y3),
        bits(&y),
        "scatter_combine differs from expand_experts"
    );

    // The whole layer equals base + LoRA delta, rounded once; base and delta match f64 loops;
    // the delta is linear in the scale.
    let w0: Vec<T> = rng.values(c.d_out * c.d_in, 0.3);
    let bias: Vec<T> = rng.values(c.d_out, 0.3);
    let base = DenseBase {
        weight: &w0,
        bias: Some(&bias),
    };
    let experts = Experts::new(&a, &b, shape, scale).unwrap();
    let yl = cpu::mole_forward(&x, c.t, &base.into(), &experts, &r).unwrap();
    let bo = cpu::base_forward(&x, c.t, &base, c.d_in, c.d_out).unwrap();
    let ld = cpu::lora_delta(&x, c.t, &experts, &r).unwrap();
    let sum: Vec<f32> = bo.iter().zip(&ld).map(|(a, b)| a + b).collect();
    let exact: Vec<u32> = sum
        .iter()
        .map(|&v| T::from_f32(v).to_f32().to_bits())
        .collect();
    prop_assert_eq!(bits(&yl), exact, "mole_forward is not round(base + delta)");
    let nb: Vec<f32> = naive_base(&x, &w0, Some(&bias), c.t, c.d_in, c.d_out)
        .iter()
        .map(|&v| v as f32)
        .collect();
    prop_close!("base_forward", &bo, &nb, tol::<f32>(c.d_in));
    prop_close!(
        "lora_delta",
        &ld,
        &delta,
        tol::<f32>(c.d_in * c.r * c.k_max)
    );
    let half_experts = Experts::new(&a, &b, shape, scale / 2.0).unwrap();
    let ld_half = cpu::lora_delta(&x, c.t, &half_experts, &r).unwrap();
    let doubled: Vec<f32> = ld_half.iter().map(|v| 2.0 * v).collect();
    prop_close!("linearity in scale", &doubled, &ld, tol::<f32>(4));
    let zero_experts = Experts::new(&a, &b, shape, 0.0).unwrap();
    let ld_zero = cpu::lora_delta(&x, c.t, &zero_experts, &r).unwrap();
    prop_assert!(
        ld_zero.iter().all(|&v| v == 0.0),
        "scale 0 gives a nonzero delta"
    );
    // With every slot empty the layer is the base alone, rounded once.
    let y_base = cpu::mole_forward(&x, c.t, &base.into(), &experts, &none).unwrap();
    let rounded: Vec<u32> = bo
        .iter()
        .map(|&v| T::from_f32(v).to_f32().to_bits())
        .collect();
    prop_assert_eq!(bits(&y_base), rounded);
    Ok(())
}

fn segments_and_mixing<T: Element>(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(c.seed ^ 0xabcdef);
    let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).unwrap();
    let x: Vec<T> = rng.values(c.t * c.d_in, 1.0);
    let a: Vec<T> = rng.values(shape.a_len(), 0.4);
    let b: Vec<T> = rng.values(shape.b_len(), 0.4);
    let y0: Vec<T> = rng.values(c.t * c.d_out, 1.0);
    // Five segments, some possibly empty; segment 1 has no adapter.
    let mut lens = vec![];
    let mut left = c.t;
    for _ in 0..4 {
        let l = rng.below(left + 1);
        lens.push(l);
        left -= l;
    }
    lens.push(left);
    let segs = Segments::from_lengths(&lens).unwrap();
    let ids: Vec<i32> = (0..lens.len())
        .map(|i| if i == 1 { -1 } else { rng.below(c.e) as i32 })
        .collect();
    let asegs = AdapterSegments::new(segs.clone(), c.e, ids.clone()).unwrap();
    let h = cpu::shrink_segments(&x, &a, &shape, &asegs).unwrap();
    prop_assert_eq!(h.len(), c.t * c.r);
    let mut y = y0.clone();
    cpu::expand_segments(&h, &b, &shape, &asegs, 0.75, &mut y).unwrap();
    // Equal to the per-token loop with a routing of one slot per token.
    let seg_of = segs.segment_of_rows();
    let tok_ids: Vec<i32> = seg_of.iter().map(|&s| ids[s]).collect();
    let per_token = Routing::new(c.t, 1, c.e, tok_ids, vec![1.0; c.t]).unwrap();
    let delta = naive_delta(&x, &a, &b, &shape, &per_token, 0.75);
    let want: Vec<f32> = f32s(&y0).iter().zip(&delta).map(|(a, b)| a + b).collect();
    prop_close!("segments", &f32s(&y), &want, tol::<T>(c.d_in * c.r));
    // Rows of the segment without adapter: h is zero, y untouched bit for bit.
    let rows = segs.range(1);
    prop_assert_eq!(
        bits(&y[rows.start * c.d_out..rows.end * c.d_out]),
        bits(&y0[rows.start * c.d_out..rows.end * c.d_out]),
        "rows of the segment without adapter changed"
    );
    prop_assert!(h[rows.start * c.r..rows.end * c.r]
        .iter()
        .all(|&v| v == 0.0));
    // The segmented path equals the grouped path over experts with that per-token routing, bit
    // for bit (the same f32 sums in the same order).
    let plan = cpu::dispatch(&per_token).unwrap();
    let hg = cpu::shrink_experts(&x, &a, &shape, &plan).unwrap();
    let mut yg = y0.clone();
    cpu::expand_experts(&hg, &b, &shape, &plan, &per_token, 0.75, &mut yg).unwrap();
    prop_assert_eq!(bits(&yg), bits(&y), "segmented and grouped paths differ");

    // Weight-space mixing equals building Ā, B̄ explicitly; one-hot p picks the expert exactly.
    let s = lens.len();
    let mut probs: Vec<f32> = (0..s * c.e).map(|_| rng.uniform() as f32).collect();
    let onehot = rng.below(c.e);
    for (e, p) in probs.iter_mut().take(c.e).enumerate() {
        *p = if e == onehot { 1.0 } else { 0.0 };
    }
    let seq = SeqRouting::new(segs.clone(), c.e, probs.clone()).unwrap();
    let (am, bm) = cpu::mix_experts(&a, &b, &shape, &seq).unwrap();
    let per_a = c.r * c.d_in;
    let per_b = c.d_out * c.r;
    prop_assert_eq!((am.len(), bm.len()), (s * per_a, s * per_b));
    let explicit = |w: &[T], per: usize, q: usize, i: usize| -> f64 {
        (0..c.e)
            .map(|e| probs[q * c.e + e] as f64 * w[e * per + i].to_f32() as f64)
            .sum::<f64>()
    };
    for q in 0..s {
        let want_a: Vec<f32> = (0..per_a)
            .map(|i| explicit(&a, per_a, q, i) as f32)
            .collect();
        let want_b: Vec<f32> = (0..per_b)
            .map(|i| explicit(&b, per_b, q, i) as f32)
            .collect();
        let t = tol::<T>(c.e);
        prop_close!(
            "mixed A",
            &f32s(&am[q * per_a..(q + 1) * per_a]),
            &want_a,
            t
        );
        prop_close!(
            "mixed B",
            &f32s(&bm[q * per_b..(q + 1) * per_b]),
            &want_b,
            t
        );
    }
    prop_assert_eq!(
        bits(&am[..per_a]),
        bits(&a[onehot * per_a..(onehot + 1) * per_a])
    );
    prop_assert_eq!(
        bits(&bm[..per_b]),
        bits(&b[onehot * per_b..(onehot + 1) * per_b])
    );

    // The weight-space layer with general p equals an f64 loop over the explicit mixtures.
    let w0: Vec<T> = rng.values(c.d_out * c.d_in, 0.3);
    let base: BaseWeight<T> = DenseBase {
        weight: &w0,
        bias: None,
    }
    .into();
    let experts = Experts::new(&a, &b, shape, 0.5).unwrap();
    let yw_mix = cpu::mole_forward_weight_space(&x, c.t, &base, &experts, &seq).unwrap();
    let nb = naive_base(&x, &w0, None, c.t, c.d_in, c.d_out);
    let mut want_w = vec![0.0f32; c.t * c.d_out];
    for q in 0..s {
        let abar: Vec<f64> = (0..per_a).map(|i| explicit(&a, per_a, q, i)).collect();
        let bbar: Vec<f64> = (0..per_b).map(|i| explicit(&b, per_b, q, i)).collect();
        for t in segs.range(q) {
            let hq: Vec<f64> = (0..c.r)
                .map(|j| {
                    (0..c.d_in)
                        .map(|i| x[t * c.d_in + i].to_f32() as f64 * abar[j * c.d_in + i])
                        .sum()
                })
                .collect();
            for o in 0..c.d_out {
                let d: f64 = (0..c.r).map(|j| hq[j] * bbar[o * c.r + j]).sum();
                want_w[t * c.d_out + o] = (nb[t * c.d_out + o] + 0.5 * d) as f32;
            }
        }
    }
    prop_close!(
        "weight-space layer",
        &f32s(&yw_mix),
        &want_w,
        tol::<T>(c.d_in * c.r * c.e)
    );
    // The same layer through the kernels' route (mix_experts, then the segmented LoRA with one
    // adapter per sequence): identical for f32, where mixing rounds nothing.
    let ident = AdapterSegments::identity(segs.clone()).unwrap();
    let mshape = LoraShape::new(s, c.r, c.d_in, c.d_out).unwrap();
    let hm = cpu::shrink_segments(&x, &am, &mshape, &ident).unwrap();
    let bo = cpu::base_forward(
        &x,
        c.t,
        &DenseBase {
            weight: &w0,
            bias: None,
        },
        c.d_in,
        c.d_out,
    )
    .unwrap();
    let mut ym: Vec<T> = bo.iter().map(|&v| T::from_f32(v)).collect();
    cpu::expand_segments(&hm, &bm, &mshape, &ident, 0.5, &mut ym).unwrap();
    if T::DTYPE == DType::F32 {
        prop_assert_eq!(bits(&ym), bits(&yw_mix));
    } else {
        prop_close!(
            "mix + segments vs weight-space layer",
            &f32s(&ym),
            &f32s(&yw_mix),
            tol::<T>(c.d_in * c.r * c.e).scaled(2.0)
        );
    }

    // The weight-space layer with one-hot p equals the output-space layer with that one expert.
    let mut one_hot_all = vec![0.0f32; s * c.e];
    for q in 0..s {
        one_hot_all[q * c.e + onehot] = 1.0;
    }
    let seq1 = SeqRouting::new(segs, c.e, one_hot_all).unwrap();
    let yw = cpu::mole_forward_weight_space(&x, c.t, &base, &experts, &seq1).unwrap();
    let single = Routing::new(c.t, 1, c.e, vec![onehot as i32; c.t], vec![1.0; c.t]).unwrap();
    let yo = cpu::mole_forward(&x, c.t, &base, &experts, &single).unwrap();
    prop_close!(
        "weight space vs output space (one-hot)",
        &f32s(&yw),
        &f32s(&yo),
        tol::<T>(c.d_in * c.r)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn grouped_lora_f32(c in case()) { grouped_lora::<f32>(&c)?; }
    #[test]
    fn grouped_lora_f16(c in case()) { grouped_lora::<f16>(&c)?; }
    #[test]
    fn grouped_lora_bf16(c in case()) { grouped_lora::<bf16>(&c)?; }
    #[test]
    fn segments_and_mixing_f32(c in case()) { segments_and_mixing::<f32>(&c)?; }
    #[test]
    fn segments_and_mixing_f16(c in case()) { segments_and_mixing::<f16>(&c)?; }
    #[test]
    fn segments_and_mixing_bf16(c in case()) { segments_and_mixing::<bf16>(&c)?; }
}

#[test]
fn all_tokens_on_one_expert_and_experts_without_tokens() {
    let r = Routing::new(
        5,
        2,
        4,
        vec![2, -1, 2, 2, 2, -1, -1, -1, 2, 2],
        vec![0.5; 10],
    )
    .unwrap();
    let plan = cpu::dispatch(&r).unwrap();
    assert_eq!(plan.expert_offsets(), &[0, 0, 0, 6, 6]);
    assert_eq!(plan.sorted_slots(), &[0, 2, 3, 4, 8, 9]);
    assert_eq!(plan.slot_to_sorted(), &[0, -1, 1, 2, 3, -1, -1, -1, 4, 5]);
}

#[test]
fn dispatch_sorts_stably_by_expert() {
    // Token 0: experts 1, 0; token 1: 1, 1 (a duplicate); token 2: -1, 0.
    let r = Routing::new(3, 2, 2, vec![1, 0, 1, 1, -1, 0], vec![1.0; 6]).unwrap();
    let plan = cpu::dispatch(&r).unwrap();
    assert_eq!(plan.expert_offsets(), &[0, 2, 5]);
    assert_eq!(plan.sorted_slots(), &[1, 5, 0, 2, 3]);
    assert_eq!(plan.slot_to_sorted(), &[2, 0, 3, 4, -1, 1]);
    assert_eq!(
        cpu::unsort(&[10, 11, 12, 13, 14], &plan, 0).unwrap(),
        [12, 10, 13, 14, 0, 11]
    );
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // [3, 2]
    let g = cpu::gather_rows(&x, 3, 2, &plan).unwrap();
    assert_eq!(g, [1.0, 2.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]);
}

#[test]
fn hand_computed_layer() {
    // d_in = 2, d_out = 1, E = 2, r = 1. A_0 = [1, 0], A_1 = [0, 1]; B_0 = [2], B_1 = [3].
    let shape = LoraShape::new(2, 1, 2, 1).unwrap();
    let a = [1.0f32, 0.0, 0.0, 1.0];
    let b = [2.0f32, 3.0];
    let w0 = [1.0f32, 1.0];
    let bias = [0.5f32];
    let experts = Experts::new(&a, &b, shape, 0.5).unwrap();
    let base: BaseWeight<f32> = DenseBase {
        weight: &w0,
        bias: Some(&bias),
    }
    .into();
    let x = [1.0f32, 2.0, 3.0, 4.0];
    // Token 0: 0.25·expert 0 + 0.75·expert 1; token 1: expert 1 twice (0.5 + 0.5) and an empty slot.
    let r = Routing::new(
        2,
        3,
        2,
        vec![0, 1, -1, 1, -1, 1],
        vec![0.25, 0.75, f32::NAN, 0.5, f32::NAN, 0.5],
    )
    .unwrap();
    let y = cpu::mole_forward(&x, 2, &base, &experts, &r).unwrap();
    // Token 0: base 3.5; LoRA 0.5·(0.25·1·2 + 0.75·2·3) = 2.5.
    // Token 1: base 7.5; LoRA 0.5·(1.0·4·3) = 6.
    assert_eq!(y, [6.0, 13.5]);
    // Weight space: p = (0.25, 0.75) for one sequence: Ā = [0.25, 0.75], B̄ = [2.75].
    let seq = SeqRouting::new(Segments::single(2).unwrap(), 2, vec![0.25, 0.75]).unwrap();
    let (am, bm) = cpu::mix_experts(&a, &b, &shape, &seq).unwrap();
    assert_eq!((am, bm), (vec![0.25, 0.75], vec![2.75]));
    let yw = cpu::mole_forward_weight_space(&x, 2, &base, &experts, &seq).unwrap();
    // Token 0: 3.5 + 0.5·(1.75·2.75); token 1: 7.5 + 0.5·(3.75·2.75).
    assert_eq!(yw, [3.5 + 0.5 * 1.75 * 2.75, 7.5 + 0.5 * 3.75 * 2.75]);
}

// ---- Bad input: one test per error case. ----

struct Fixture {
    shape: LoraShape,
    routing: Routing,
    x: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    w0: Vec<f32>,
}

/// T = 2, k_max = 1, E = 3, r = 2, d_in = 4, d_out = 5.
fn fixture() -> Fixture {
    let shape = LoraShape::new(3, 2, 4, 5).unwrap();
    Fixture {
        shape,
        routing: Routing::new(2, 1, 3, vec![0, 2], vec![1.0, 1.0]).unwrap(),
        x: vec![0.5; 8],
        a: vec![0.25; shape.a_len()],
        b: vec![0.25; shape.b_len()],
        w0: vec![0.0; 20],
    }
}

#[test]
fn shrink_experts_rejects_short_x() {
    let f = fixture();
    let plan = cpu::dispatch(&f.routing).unwrap();
    assert_eq!(
        cpu::shrink_experts(&f.x[..7], &f.a, &f.shape, &plan),
        Err(Error::LengthMismatch {
            what: "x [T, d_in]",
            expected: 8,
            got: 7
        })
    );
}

#[test]
fn shrink_experts_rejects_short_a() {
    let f = fixture();
    let plan = cpu::dispatch(&f.routing).unwrap();
    assert_eq!(
        cpu::shrink_experts(&f.x, &f.a[1..], &f.shape, &plan),
        Err(Error::LengthMismatch {
            what: "A [E, r, d_in]",
            expected: 24,
            got: 23
        })
    );
}

#[test]
fn expand_experts_rejects_wrong_h_b_and_y() {
    let f = fixture();
    let plan = cpu::dispatch(&f.routing).unwrap();
    let h = vec![0.0f32; 4];
    let mut y = vec![0.0f32; 10];
    assert_eq!(
        cpu::expand_experts(&h[..3], &f.b, &f.shape, &plan, &f.routing, 1.0, &mut y),
        Err(Error::LengthMismatch {
            what: "h [P, r]",
            expected: 4,
            got: 3
        })
    );
    assert_eq!(
        cpu::expand_experts(&h, &f.b[..29], &f.shape, &plan, &f.routing, 1.0, &mut y),
        Err(Error::LengthMismatch {
            what: "B [E, d_out, r]",
            expected: 30,
            got: 29
        })
    );
    assert_eq!(
        cpu::expand_experts(&h, &f.b, &f.shape, &plan, &f.routing, 1.0, &mut y[..9]),
        Err(Error::LengthMismatch {
            what: "y [T, d_out]",
            expected: 10,
            got: 9
        })
    );
    assert!(y.iter().all(|&v| v == 0.0), "an error wrote the output");
}

#[test]
fn experts_of_the_routing_must_match_the_shape() {
    let f = fixture();
    let plan = cpu::dispatch(&f.routing).unwrap();
    let other = LoraShape::new(4, 2, 4, 5).unwrap();
    let a4 = vec![0.0f32; other.a_len()];
    let b4 = vec![0.0f32; other.b_len()];
    assert_eq!(
        cpu::shrink_experts(&f.x, &a4, &other, &plan),
        Err(Error::LengthMismatch {
            what: "experts of the plan vs shape.num_experts",
            expected: 4,
            got: 3
        })
    );
    let experts = Experts::new(&a4, &b4, other, 1.0).unwrap();
    assert_eq!(
        cpu::lora_delta(&f.x, 2, &experts, &f.routing),
        Err(Error::LengthMismatch {
            what: "experts of the routing vs shape.num_experts",
            expected: 4,
            got: 3
        })
    );
    let base: BaseWeight<f32> = DenseBase {
        weight: &f.w0,
        bias: None,
    }
    .into();
    assert_eq!(
        cpu::mole_forward(&f.x, 2, &base, &experts, &f.routing),
        Err(Error::LengthMismatch {
            what: "experts of the routing vs shape.num_experts",
            expected: 4,
            got: 3
        })
    );
    let seq = SeqRouting::new(Segments::single(2).unwrap(), 3, vec![0.3; 3]).unwrap();
    assert_eq!(
        cpu::mix_experts(&a4, &b4, &other, &seq),
        Err(Error::LengthMismatch {
            what: "experts of the routing vs shape.num_experts",
            expected: 4,
            got: 3
        })
    );
}

#[test]
fn token_count_must_match_routing_and_plan() {
    let f = fixture();
    let plan = cpu::dispatch(&f.routing).unwrap();
    let h = vec![0.0f32; 4];
    let mut y = vec![0.0f32; 10];
    let r3 = Routing::new(3, 1, 3, vec![0, 1, 2], vec![1.0; 3]).unwrap();
    assert_eq!(
        cpu::expand_experts(&h, &f.b, &f.shape, &plan, &r3, 1.0, &mut y),
        Err(Error::LengthMismatch {
            what: "routing tokens vs plan",
            expected: 2,
            got: 3
        })
    );
    assert_eq!(
        cpu::gather_rows(&[0.0f32; 12], 3, 4, &plan),
        Err(Error::LengthMismatch {
            what: "tokens vs plan",
            expected: 2,
            got: 3
        })
    );
    let experts = Experts::new(&f.a, &f.b, f.shape, 1.0).unwrap();
    let base: BaseWeight<f32> = DenseBase {
        weight: &f.w0,
        bias: None,
    }
    .into();
    let x3 = vec![0.0f32; 12];
    assert_eq!(
        cpu::mole_forward(&x3, 3, &base, &experts, &f.routing),
        Err(Error::LengthMismatch {
            what: "routing tokens",
            expected: 3,
            got: 2
        })
    );
    let seq = SeqRouting::new(Segments::from_lengths(&[3]).unwrap(), 3, vec![0.3; 3]).unwrap();
    assert_eq!(
        cpu::mole_forward_weight_space(&f.x, 2, &base, &experts, &seq),
        Err(Error::LengthMismatch {
            what: "routing rows (sequence segments)",
            expected: 2,
            got: 3
        })
    );
}

#[test]
fn a_plan_from_another_routing_is_rejected() {
    let f = fixture();
    let plan = cpu::dispatch(&f.routing).unwrap();
    // Same T, k_max and E, but token 1 goes to expert 1 (and, in the second, token 0 is empty).
    let other = Routing::new(2, 1, 3, vec![0, 1], vec![1.0; 2]).unwrap();
    let emptied = Routing::new(2, 1, 3, vec![-1, 2], vec![1.0; 2]).unwrap();
    let h = vec![0.0f32; 4];
    let mut y = vec![0.0f32; 10];
    assert_eq!(
        cpu::expand_experts(&h, &f.b, &f.shape, &plan, &other, 1.0, &mut y),
        Err(Error::InvalidDim {
            what: "routing slot (t * k_max + s) vs dispatch plan",
            value: 1,
            reason: "the plan was built from another routing (its expert or emptiness differs)"
        })
    );
    let rows = vec![0.0f32; 10];
    assert!(matches!(
        cpu::scatter_combine(&rows, 5, &plan, &emptied, 1.0, &mut y),
        Err(Error::InvalidDim { value: 0, .. })
    ));
}

#[test]
fn non_finite_scale_is_rejected() {
    let f = fixture();
    let plan = cpu::dispatch(&f.routing).unwrap();
    let h = vec![0.0f32; 4];
    let mut y = vec![0.0f32; 10];
    assert!(matches!(
        cpu::expand_experts(&h, &f.b, &f.shape, &plan, &f.routing, f32::INFINITY, &mut y),
        Err(Error::InvalidParameter { what: "scale", value, .. }) if value == f32::INFINITY
    ));
    assert!(matches!(
        cpu::scatter_combine(
            &[0.0f32; 10],
            5,
            &plan,
            &f.routing,
            f32::NEG_INFINITY,
            &mut y
        ),
        Err(Error::InvalidParameter { what: "scale", .. })
    ));
    let segs = AdapterSegments::new(Segments::single(2).unwrap(), 3, vec![0]).unwrap();
    assert!(matches!(
        cpu::expand_segments(&h, &f.b, &f.shape, &segs, f32::NAN, &mut y),
        Err(Error::InvalidParameter { what: "scale", value, .. }) if value.is_nan()
    ));
    assert!(matches!(
        Experts::new(&f.a, &f.b, f.shape, f32::NAN),
        Err(Error::InvalidParameter { what: "scale", .. })
    ));
    // Public fields can bypass `new`; the layer checks the scale again.
    let bad = Experts {
        a: &f.a,
        b: &f.b,
        shape: f.shape,
        scale: f32::INFINITY,
    };
    assert!(matches!(
        cpu::lora_delta(&f.x, 2, &bad, &f.routing),
        Err(Error::InvalidParameter { what: "scale", .. })
    ));
}

#[test]
fn adapter_segments_must_cover_the_tokens() {
    let f = fixture();
    // Segments over 3 rows, x and y of 2.
    let segs =
        AdapterSegments::new(Segments::from_lengths(&[1, 2]).unwrap(), 3, vec![0, 1]).unwrap();
    assert_eq!(
        cpu::shrink_segments(&f.x, &f.a, &f.shape, &segs),
        Err(Error::LengthMismatch {
            what: "x [T, d_in]",
            expected: 12,
            got: 8
        })
    );
    let h = vec![0.0f32; 6];
    let mut y = vec![0.0f32; 10];
    assert_eq!(
        cpu::expand_segments(&h, &f.b, &f.shape, &segs, 1.0, &mut y),
        Err(Error::LengthMismatch {
            what: "y [T, d_out]",
            expected: 15,
            got: 10
        })
    );
}

#[test]
fn adapters_of_the_segments_must_match_the_shape() {
    let f = fixture();
    let segs = AdapterSegments::new(Segments::single(2).unwrap(), 2, vec![1]).unwrap();
    assert_eq!(
        cpu::shrink_segments(&f.x, &f.a, &f.shape, &segs),
        Err(Error::LengthMismatch {
            what: "adapters of the segments vs shape.num_experts",
            expected: 3,
            got: 2
        })
    );
}

#[test]
fn unsort_and_gather_reject_wrong_lengths() {
    let f = fixture();
    let plan = cpu::dispatch(&f.routing).unwrap();
    assert_eq!(
        cpu::unsort(&[1, 2, 3], &plan, 0),
        Err(Error::LengthMismatch {
            what: "sorted values [P]",
            expected: 2,
            got: 3
        })
    );
    assert_eq!(
        cpu::gather_rows(&f.x[..6], 2, 4, &plan),
        Err(Error::LengthMismatch {
            what: "x [T, d]",
            expected: 8,
            got: 6
        })
    );
    assert_eq!(
        cpu::gather_rows(&f.x, 2, 0, &plan),
        Err(Error::InvalidDim {
            what: "d",
            value: 0,
            reason: "must be at least 1"
        })
    );
    assert!(matches!(
        cpu::gather_rows(&f.x, 2, usize::MAX, &plan),
        Err(Error::InvalidDim {
            what: "x [T, d]",
            ..
        })
    ));
    let mut y = vec![0.0f32; 10];
    assert_eq!(
        cpu::scatter_combine(&[0.0f32; 9], 5, &plan, &f.routing, 1.0, &mut y),
        Err(Error::LengthMismatch {
            what: "rows [P, d]",
            expected: 10,
            got: 9
        })
    );
}

#[test]
fn base_and_experts_reject_wrong_lengths() {
    let f = fixture();
    assert_eq!(
        cpu::base_forward(
            &f.x,
            2,
            &DenseBase {
                weight: &f.w0[..19],
                bias: None
            },
            4,
            5
        ),
        Err(Error::LengthMismatch {
            what: "base W0 [d_out, d_in]",
            expected: 20,
            got: 19
        })
    );
    let bias = [0.0f32; 4];
    let base = DenseBase {
        weight: &f.w0,
        bias: Some(&bias),
    };
    assert_eq!(
        cpu::base_forward(&f.x, 2, &base, 4, 5),
        Err(Error::LengthMismatch {
            what: "base bias [d_out]",
            expected: 5,
            got: 4
        })
    );
    let experts = Experts::new(&f.a, &f.b, f.shape, 1.0).unwrap();
    assert_eq!(
        cpu::mole_forward(&f.x, 2, &base.into(), &experts, &f.routing),
        Err(Error::LengthMismatch {
            what: "base bias [d_out]",
            expected: 5,
            got: 4
        })
    );
    assert_eq!(
        cpu::base_forward(
            &f.x,
            2,
            &DenseBase {
                weight: &[],
                bias: None
            },
            4,
            0
        ),
        Err(Error::InvalidDim {
            what: "d_out",
            value: 0,
            reason: "must be at least 1"
        })
    );
    assert_eq!(
        Experts::new(&f.a, &f.b[1..], f.shape, 1.0).map(|_| ()),
        Err(Error::LengthMismatch {
            what: "B [E, d_out, r]",
            expected: 30,
            got: 29
        })
    );
}

#[test]
fn rank_zero_and_rank_above_the_maximum_are_rejected() {
    assert_eq!(
        LoraShape::new(3, 0, 4, 5),
        Err(Error::InvalidRank {
            rank: 0,
            max: MAX_RANK
        })
    );
    assert_eq!(
        LoraShape::new(3, MAX_RANK + 1, 4, 5),
        Err(Error::InvalidRank {
            rank: MAX_RANK + 1,
            max: MAX_RANK
        })
    );
}
