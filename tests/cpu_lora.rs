//! Property tests of the CPU reference for dispatch, grouped and segmented LoRA, weight-space mixing
//! and the whole layer: invariants (permutation, stability, inverse, exact zeros of empty slots,
//! linearity) and agreement with naive f64 per-token loops, over odd shapes, skewed / empty /
//! all-to-one routings, `-1` slots with garbage weights, and every dtype.

use half::{bf16, f16};
use molora::cpu::{self, BaseWeight, DenseBase, Experts};
use molora::testing::{compare, Tolerance};
use molora::{AdapterSegments, Element, Error, LoraShape, Routing, Segments, SeqRouting};
use proptest::prelude::*;

struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next() * n as f64) as usize).min(n.saturating_sub(1))
    }
    fn vals<T: Element>(&mut self, n: usize, scale: f32) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f32((self.next() as f32 * 2.0 - 1.0) * scale))
            .collect()
    }
}

fn f32s<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
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
        1usize..=4,
        1usize..=64,
        prop_oneof![1usize..=8, 1usize..=128],
        1usize..=45,
        1usize..=45,
        any::<u64>(),
        prop_oneof![Just(0.0f64), Just(0.9), Just(1.0)],
        prop_oneof![Just(0.0f64), Just(0.3), Just(1.0)],
    )
        .prop_map(|(t, k_max, e, r, d_in, d_out, seed, skew, empty)| {
            // Keep the work small when the rank is large.
            let (d_in, d_out) = if r > 32 {
                (d_in.min(17), d_out.min(13))
            } else {
                (d_in, d_out)
            };
            Case {
                t,
                k_max,
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

/// A routing with skew, empty slots (weight NaN: it must never be read) and duplicate ids.
fn routing(c: &Case, rng: &mut Rng) -> Routing {
    let n = c.t * c.k_max;
    let mut ids = Vec::with_capacity(n);
    let mut w = Vec::with_capacity(n);
    for _ in 0..n {
        if rng.next() < c.empty {
            ids.push(-1);
            w.push(f32::NAN);
        } else {
            ids.push(if rng.next() < c.skew {
                0
            } else {
                rng.below(c.e) as i32
            });
            w.push(rng.next() as f32 * 2.0 - 0.5);
        }
    }
    Routing::new(c.t, c.k_max, c.e, ids, w).expect("valid routing")
}

/// The same routing with every empty slot removed (k_max shrinks to the most active slots of a
/// token, padded with -1 and weight 0).
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

/// Naive f64 reference of the LoRA part: `s·Σ_slots w·(x_t·A_eᵀ)·B_eᵀ`.
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
        for o in 0..d_out {
            let mut acc = 0.0f64;
            for s in 0..r.k_max() {
                let e = r.id(t, s);
                if e < 0 {
                    continue;
                }
                let e = e as usize;
                let mut d = 0.0f64;
                for j in 0..rk {
                    let mut h = 0.0f64;
                    for i in 0..d_in {
                        h += x[t * d_in + i].to_f32() as f64
                            * a[(e * rk + j) * d_in + i].to_f32() as f64;
                    }
                    d += h * b[(e * d_out + o) * rk + j].to_f32() as f64;
                }
                acc += r.weight(t, s) as f64 * d;
            }
            out[t * d_out + o] = (scale as f64 * acc) as f32;
        }
    }
    out
}

/// Tolerance for a result rounded to `T` after sums of about `terms` products of unit size.
fn tol<T: Element>(terms: usize) -> Tolerance {
    Tolerance::for_dtype(T::DTYPE).scaled((terms.max(1) as f32).sqrt())
}

fn dispatch_invariants(r: &Routing) -> Result<(), TestCaseError> {
    let plan = cpu::dispatch(r).unwrap();
    let (t, k, e) = (r.num_tokens(), r.k_max(), r.num_experts());
    let active: Vec<usize> = (0..t * k).filter(|&i| r.ids()[i] >= 0).collect();
    prop_assert_eq!(plan.num_pairs(), active.len());
    let off = plan.expert_offsets();
    prop_assert_eq!(off.len(), e + 1);
    prop_assert_eq!(off[0], 0);
    prop_assert_eq!(off[e] as usize, active.len());
    prop_assert!(off.windows(2).all(|w| w[0] <= w[1]), "offsets decrease");
    // A permutation of the non-empty slots, sorted by expert, stable (slot order within an expert).
    let mut seen = plan.sorted_slots().to_vec();
    seen.sort_unstable();
    prop_assert_eq!(
        seen,
        active.iter().map(|&i| i as i32).collect::<Vec<_>>(),
        "not a permutation"
    );
    for ex in 0..e {
        let seg = &plan.sorted_slots()[off[ex] as usize..off[ex + 1] as usize];
        prop_assert!(seg.iter().all(|&i| r.ids()[i as usize] == ex as i32));
        prop_assert!(seg.windows(2).all(|w| w[0] < w[1]), "unstable order");
        prop_assert_eq!(plan.expert_count(ex), seg.len());
    }
    // The inverse.
    for (i, &pos) in plan.slot_to_sorted().iter().enumerate() {
        if r.ids()[i] < 0 {
            prop_assert_eq!(pos, -1);
        } else {
            prop_assert_eq!(plan.sorted_slots()[pos as usize] as usize, i);
        }
    }
    // unsort inverts the permutation of per-pair values.
    let vals: Vec<i32> = plan.sorted_slots().to_vec();
    let back = cpu::unsort(&vals, &plan, -7).unwrap();
    for (i, &v) in back.iter().enumerate() {
        prop_assert_eq!(v, if r.ids()[i] >= 0 { i as i32 } else { -7 });
    }
    Ok(())
}

fn grouped_lora<T: Element>(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(c.seed);
    let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).unwrap();
    let x: Vec<T> = rng.vals(c.t * c.d_in, 1.0);
    let a: Vec<T> = rng.vals(shape.a_len(), 0.4);
    let b: Vec<T> = rng.vals(shape.b_len(), 0.4);
    let y0: Vec<T> = rng.vals(c.t * c.d_out, 1.0);
    let r = routing(c, &mut rng);
    let scale = 1.25f32;
    dispatch_invariants(&r)?;
    let plan = cpu::dispatch(&r).unwrap();

    // Gather equals the token rows.
    let g = cpu::gather_rows(&x, c.t, c.d_in, &plan).unwrap();
    for p in 0..plan.num_pairs() {
        let t = plan.token_of(p);
        prop_assert_eq!(
            &g[p * c.d_in..(p + 1) * c.d_in],
            &x[t * c.d_in..(t + 1) * c.d_in]
        );
    }

    // Shrink + expand equal the naive per-token loop.
    let h = cpu::shrink_experts(&x, &a, &shape, &plan).unwrap();
    let mut y = y0.clone();
    cpu::expand_experts(&h, &b, &shape, &plan, &r, scale, &mut y).unwrap();
    let delta = naive_delta(&x, &a, &b, &shape, &r, scale);
    let want: Vec<f32> = f32s(&y0).iter().zip(&delta).map(|(a, b)| a + b).collect();
    if let Err(m) = compare("expand_experts", &f32s(&y), &want, tol::<T>(c.d_in * c.r)) {
        prop_assert!(false, "{}", m);
    }

    // Empty slots contribute exactly zero: the same result, bit for bit, without them.
    let dense = without_empty_slots(&r);
    let plan2 = cpu::dispatch(&dense).unwrap();
    let h2 = cpu::shrink_experts(&x, &a, &shape, &plan2).unwrap();
    let mut y2 = y0.clone();
    cpu::expand_experts(&h2, &b, &shape, &plan2, &dense, scale, &mut y2).unwrap();
    prop_assert!(y == y2, "-1 slots changed the result");
    // Tokens with only empty slots keep their rows bit for bit.
    for t in 0..c.t {
        if (0..c.k_max).all(|s| r.id(t, s) < 0) {
            prop_assert!(y[t * c.d_out..(t + 1) * c.d_out] == y0[t * c.d_out..(t + 1) * c.d_out]);
        }
    }

    // Scatter-combine of per-pair expanded rows is the same as the fused expand.
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
    if let Err(m) = compare("scatter_combine", &f32s(&y3), &f32s(&y), tol::<T>(c.k_max)) {
        prop_assert!(false, "{}", m);
    }

    // The whole layer equals base + LoRA delta; linear in the scale.
    let w0: Vec<T> = rng.vals(c.d_out * c.d_in, 0.3);
    let bias: Vec<T> = rng.vals(c.d_out, 0.3);
    let base = DenseBase {
        weight: &w0,
        bias: Some(&bias),
    };
    let experts = Experts::new(&a, &b, shape, scale).unwrap();
    let yl = cpu::mole_forward(&x, c.t, &base.into(), &experts, &r).unwrap();
    let bo = cpu::base_forward(&x, c.t, &base, c.d_in, c.d_out).unwrap();
    let ld = cpu::lora_delta(&x, c.t, &experts, &r).unwrap();
    let sum: Vec<f32> = bo.iter().zip(&ld).map(|(a, b)| a + b).collect();
    let exact: Vec<f32> = sum.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    prop_assert_eq!(f32s(&yl), exact, "mole_forward is not round(base + delta)");
    if let Err(m) = compare("lora_delta", &ld, &delta, tol::<f32>(c.d_in * c.r)) {
        prop_assert!(false, "{}", m);
    }
    let half_experts = Experts::new(&a, &b, shape, scale / 2.0).unwrap();
    let ld_half = cpu::lora_delta(&x, c.t, &half_experts, &r).unwrap();
    let doubled: Vec<f32> = ld_half.iter().map(|v| 2.0 * v).collect();
    if let Err(m) = compare("linearity in scale", &doubled, &ld, tol::<f32>(4)) {
        prop_assert!(false, "{}", m);
    }
    Ok(())
}

fn segments_and_mixing<T: Element>(c: &Case) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(c.seed ^ 0xabcdef);
    let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).unwrap();
    let x: Vec<T> = rng.vals(c.t * c.d_in, 1.0);
    let a: Vec<T> = rng.vals(shape.a_len(), 0.4);
    let b: Vec<T> = rng.vals(shape.b_len(), 0.4);
    let y0: Vec<T> = rng.vals(c.t * c.d_out, 1.0);
    // Up to 5 segments, some empty; segment 1 (when present) has no adapter.
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
    let mut y = y0.clone();
    cpu::expand_segments(&h, &b, &shape, &asegs, 0.75, &mut y).unwrap();
    // Equal to the per-token loop with a routing of one slot per token.
    let seg_of = segs.segment_of_rows();
    let tok_ids: Vec<i32> = seg_of.iter().map(|&s| ids[s]).collect();
    let per_token = Routing::new(c.t, 1, c.e, tok_ids, vec![1.0; c.t]).unwrap();
    let delta = naive_delta(&x, &a, &b, &shape, &per_token, 0.75);
    let want: Vec<f32> = f32s(&y0).iter().zip(&delta).map(|(a, b)| a + b).collect();
    if let Err(m) = compare("segments", &f32s(&y), &want, tol::<T>(c.d_in * c.r)) {
        prop_assert!(false, "{}", m);
    }
    let rows = segs.range(1);
    prop_assert!(
        y[rows.start * c.d_out..rows.end * c.d_out] == y0[rows.start * c.d_out..rows.end * c.d_out],
        "rows of the segment without adapter changed"
    );
    prop_assert!(h[rows.start * c.r..rows.end * c.r]
        .iter()
        .all(|&v| v == 0.0));

    // Weight-space mixing equals building Ā, B̄ explicitly; one-hot p picks the expert exactly.
    let s = lens.len();
    let mut probs: Vec<f32> = (0..s * c.e).map(|_| rng.next() as f32).collect();
    let onehot = rng.below(c.e);
    for (e, p) in probs.iter_mut().take(c.e).enumerate() {
        *p = if e == onehot { 1.0 } else { 0.0 };
    }
    let seq = SeqRouting::new(segs.clone(), c.e, probs.clone()).unwrap();
    let (am, bm) = cpu::mix_experts(&a, &b, &shape, &seq).unwrap();
    let per_a = c.r * c.d_in;
    let per_b = c.d_out * c.r;
    for q in 0..s {
        let explicit = |w: &[T], per: usize, i: usize| -> f32 {
            (0..c.e)
                .map(|e| probs[q * c.e + e] as f64 * w[e * per + i].to_f32() as f64)
                .sum::<f64>() as f32
        };
        let want_a: Vec<f32> = (0..per_a).map(|i| explicit(&a, per_a, i)).collect();
        let want_b: Vec<f32> = (0..per_b).map(|i| explicit(&b, per_b, i)).collect();
        let t = tol::<T>(c.e);
        if let Err(m) = compare(
            "mixed A",
            &f32s(&am[q * per_a..(q + 1) * per_a]),
            &want_a,
            t,
        ) {
            prop_assert!(false, "{}", m);
        }
        if let Err(m) = compare(
            "mixed B",
            &f32s(&bm[q * per_b..(q + 1) * per_b]),
            &want_b,
            t,
        ) {
            prop_assert!(false, "{}", m);
        }
    }
    prop_assert!(am[..per_a] == a[onehot * per_a..(onehot + 1) * per_a]);
    prop_assert!(bm[..per_b] == b[onehot * per_b..(onehot + 1) * per_b]);

    // The weight-space layer with one-hot p equals the output-space layer with that one expert.
    let w0: Vec<T> = rng.vals(c.d_out * c.d_in, 0.3);
    let base: BaseWeight<T> = DenseBase {
        weight: &w0,
        bias: None,
    }
    .into();
    let experts = Experts::new(&a, &b, shape, 0.5).unwrap();
    let mut one_hot_all = vec![0.0f32; s * c.e];
    for q in 0..s {
        one_hot_all[q * c.e + onehot] = 1.0;
    }
    let seq1 = SeqRouting::new(segs, c.e, one_hot_all).unwrap();
    let yw = cpu::mole_forward_weight_space(&x, c.t, &base, &experts, &seq1).unwrap();
    let single = Routing::new(c.t, 1, c.e, vec![onehot as i32; c.t], vec![1.0; c.t]).unwrap();
    let yo = cpu::mole_forward(&x, c.t, &base, &experts, &single).unwrap();
    if let Err(m) = compare(
        "weight space vs output space (one-hot)",
        &f32s(&yw),
        &f32s(&yo),
        tol::<T>(c.d_in * c.r),
    ) {
        prop_assert!(false, "{}", m);
    }
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
fn bad_input_gives_typed_errors() {
    let shape = LoraShape::new(3, 2, 4, 5).unwrap();
    let r = Routing::new(2, 1, 3, vec![0, 2], vec![1.0, 1.0]).unwrap();
    let plan = cpu::dispatch(&r).unwrap();
    let x = vec![0.0f32; 8];
    let a = vec![0.0f32; shape.a_len()];
    let b = vec![0.0f32; shape.b_len()];
    // Wrong lengths.
    assert_eq!(
        cpu::shrink_experts(&x[..7], &a, &shape, &plan),
        Err(Error::LengthMismatch {
            what: "x [T, d_in]",
            expected: 8,
            got: 7
        })
    );
    assert_eq!(
        cpu::shrink_experts(&x, &a[1..], &shape, &plan),
        Err(Error::LengthMismatch {
            what: "A [E, r, d_in]",
            expected: shape.a_len(),
            got: shape.a_len() - 1
        })
    );
    // Experts of the routing vs the shape.
    let other = LoraShape::new(4, 2, 4, 5).unwrap();
    assert!(matches!(
        cpu::shrink_experts(&x, &vec![0.0; other.a_len()], &other, &plan),
        Err(Error::LengthMismatch {
            expected: 4,
            got: 3,
            ..
        })
    ));
    // Token count mismatch between the routing and the plan.
    let h = vec![0.0f32; 2 * 2];
    let mut y = vec![0.0f32; 10];
    let r3 = Routing::new(3, 1, 3, vec![0, 1, 2], vec![1.0; 3]).unwrap();
    assert!(matches!(
        cpu::expand_experts(&h, &b, &shape, &plan, &r3, 1.0, &mut y),
        Err(Error::LengthMismatch {
            what: "routing tokens vs plan",
            expected: 2,
            got: 3
        })
    ));
    // Non-finite scale.
    assert!(matches!(
        cpu::expand_experts(&h, &b, &shape, &plan, &r, f32::INFINITY, &mut y),
        Err(Error::InvalidParameter { what: "scale", .. })
    ));
    assert!(matches!(
        Experts::new(&a, &b, shape, f32::NAN),
        Err(Error::InvalidParameter { what: "scale", .. })
    ));
    // Segments that do not cover T.
    let segs =
        AdapterSegments::new(Segments::from_lengths(&[1, 2]).unwrap(), 3, vec![0, 1]).unwrap();
    assert!(matches!(
        cpu::shrink_segments(&x, &a, &shape, &segs),
        Err(Error::LengthMismatch {
            what: "x [T, d_in]",
            expected: 12,
            got: 8
        })
    ));
    // A weight-space routing over another number of rows.
    let seq = SeqRouting::new(Segments::from_lengths(&[3]).unwrap(), 3, vec![0.3; 3]).unwrap();
    let experts = Experts::new(&a, &b, shape, 1.0).unwrap();
    let w0 = vec![0.0f32; 20];
    let base: BaseWeight<f32> = DenseBase {
        weight: &w0,
        bias: None,
    }
    .into();
    assert!(matches!(
        cpu::mole_forward_weight_space(&x, 2, &base, &experts, &seq),
        Err(Error::LengthMismatch {
            what: "routing rows (sequence segments)",
            expected: 2,
            got: 3
        })
    ));
    // unsort with the wrong number of values.
    assert!(matches!(
        cpu::unsort(&[1, 2, 3], &plan, 0),
        Err(Error::LengthMismatch {
            expected: 2,
            got: 3,
            ..
        })
    ));
    // Rank 0 and rank above the maximum.
    assert_eq!(
        LoraShape::new(3, 0, 4, 5),
        Err(Error::InvalidRank {
            rank: 0,
            max: molora::MAX_RANK
        })
    );
    assert!(matches!(
        LoraShape::new(3, molora::MAX_RANK + 1, 4, 5),
        Err(Error::InvalidRank { .. })
    ));
}
