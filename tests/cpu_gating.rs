//! Property tests of the CPU routing/gating reference: router logits against an f64 loop for every
//! dtype, the invariants of softmax/sigmoid with temperature, top-k (ties to the lower id), the dynamic
//! threshold (active set exactly `{p ≥ τ}`, arg-max fallback), learned and input-dependent thresholds,
//! hierarchical combination, dense routing, the whole pipeline against the steps composed by hand,
//! and one test per bad-input case.

use molora::cpu::gating::{
    activate, dense, hierarchical, route, router_logits, threshold_gate, threshold_values, top_k,
    Activation, Gate, HierarchicalCombine, RouterWeights, ThresholdSpec,
};
use molora::half::{bf16, f16};
use molora::testing::{compare, Tolerance};
use molora::Rng;
use molora::{DType, Element, Error, Routing, Segments, SeqRouting};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Deterministic data from a proptest-chosen seed (keeps large tensors cheap to generate).

/// The crate's test generator with the helpers these tests use.
trait RngExt {
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32;
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32;
    fn vec_sym<T: Element>(&mut self, n: usize) -> Vec<T>;
}

impl RngExt for Rng {
    fn unit(&mut self) -> f32 {
        (self.uniform() as f32).min(1.0 - f32::EPSILON / 2.0)
    }
    fn sym(&mut self) -> f32 {
        2.0 * self.unit() - 1.0
    }
    fn vec_sym<T: Element>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from_f32(self.sym())).collect()
    }
}

fn softmax64(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|&v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn sigmoid64(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// One row of probabilities of a randomly chosen kind; several kinds have many exact ties.
fn prob_row(rng: &mut Rng, e: usize) -> Vec<f32> {
    match rng.below(7) {
        0 | 1 => {
            let scale = 1.0 + 7.0 * f64::from(rng.unit());
            let z: Vec<f64> = (0..e).map(|_| f64::from(rng.sym()) * scale).collect();
            softmax64(&z).iter().map(|&p| p as f32).collect()
        }
        // Quantised, unnormalised (as a sigmoid router gives): many ties, zeros.
        2 => (0..e).map(|_| rng.below(4) as f32 / 4.0).collect(),
        // Quantised and normalised.
        3 => {
            let lv: Vec<f32> = (0..e).map(|_| rng.below(3) as f32).collect();
            let s: f32 = lv.iter().sum();
            if s > 0.0 {
                lv.iter().map(|v| v / s).collect()
            } else {
                lv
            }
        }
        // One-hot.
        4 => {
            let hot = rng.below(e);
            (0..e).map(|j| if j == hot { 1.0 } else { 0.0 }).collect()
        }
        5 => vec![0.0; e],
        _ => vec![1.0 / e as f32; e],
    }
}

/// `[T, E]` probabilities: per-row kinds, or (1 case in 5) every token one-hot on the same expert.
fn prob_matrix(rng: &mut Rng, t: usize, e: usize) -> Vec<f32> {
    if rng.below(5) == 0 {
        let hot = rng.below(e);
        return (0..t * e)
            .map(|i| if i % e == hot { 1.0 } else { 0.0 })
            .collect();
    }
    (0..t).flat_map(|_| prob_row(rng, e)).collect()
}

/// Random segment lengths (some empty) summing to `t`.
fn random_segments(rng: &mut Rng, t: usize) -> Segments {
    let s = 1 + rng.below(5);
    let mut cuts: Vec<usize> = (0..s - 1).map(|_| rng.below(t + 1)).collect();
    cuts.sort_unstable();
    let mut offsets = vec![0];
    offsets.extend(cuts);
    offsets.push(t);
    Segments::new(offsets, t).unwrap()
}

/// A global posterior over random segments: softmax rows, one-hot rows or uniform rows.
fn random_global(rng: &mut Rng, t: usize, e: usize) -> SeqRouting {
    let seg = random_segments(rng, t);
    let mut probs = Vec::new();
    for _ in 0..seg.num_segments() {
        match rng.below(3) {
            0 => {
                let hot = rng.below(e);
                probs.extend((0..e).map(|j| if j == hot { 1.0f32 } else { 0.0 }));
            }
            1 => probs.extend(std::iter::repeat_n(1.0 / e as f32, e)),
            _ => {
                let z: Vec<f64> = (0..e).map(|_| f64::from(rng.sym()) * 3.0).collect();
                probs.extend(softmax64(&z).iter().map(|&p| p as f32));
            }
        }
    }
    SeqRouting::new(seg, e, probs).unwrap()
}

fn tokens() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(1), Just(7), Just(133), 0usize..140]
}

fn odd_d_in() -> impl Strategy<Value = usize> {
    (0usize..50).prop_map(|h| 2 * h + 1)
}

fn check_cmp(r: Result<(), String>) -> Result<(), TestCaseError> {
    r.map_err(TestCaseError::fail)
}

/// Whether `a` must come before `b` in a gate's slot order: larger p, or equal p and lower id.
fn precedes(p: &[f32], a: usize, b: usize) -> bool {
    p[a] > p[b] || (p[a] == p[b] && a < b)
}

// ---------------------------------------------------------------------------------------------
// Router logits.

fn check_logits<T: Element>(
    t: usize,
    d_in: usize,
    e: usize,
    bias: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let x: Vec<T> = rng.vec_sym(t * d_in);
    let w: Vec<T> = rng.vec_sym(e * d_in);
    let b: Option<Vec<T>> = bias.then(|| rng.vec_sym(e));
    let got = router_logits(&x, t, d_in, &w, b.as_deref(), e).unwrap();
    prop_assert_eq!(got.len(), t * e);
    let mut want = Vec::with_capacity(t * e);
    for ti in 0..t {
        for ei in 0..e {
            let mut acc = 0.0f64;
            for i in 0..d_in {
                acc += f64::from(x[ti * d_in + i].to_f32()) * f64::from(w[ei * d_in + i].to_f32());
            }
            if let Some(b) = &b {
                acc += f64::from(b[ei].to_f32());
            }
            want.push(acc as f32);
        }
    }
    // The element values are exact in f32 for every dtype, so the only error is the order of the
    // f32 accumulation: the f32 tolerance applies to all three.
    check_cmp(compare(
        &format!("router logits ({})", T::DTYPE),
        &got,
        &want,
        Tolerance::for_dtype(DType::F32),
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn router_logits_match_f64_loop(
        t in tokens(), d_in in odd_d_in(), e in 1usize..=64, bias in any::<bool>(), seed in any::<u64>()
    ) {
        check_logits::<f32>(t, d_in, e, bias, seed)?;
        check_logits::<f16>(t, d_in, e, bias, seed)?;
        check_logits::<bf16>(t, d_in, e, bias, seed)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Activation.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn softmax_rows_are_distributions(
        t in tokens(), e in 1usize..=64, scale in 0.1f32..20.0, temp in 0.2f32..5.0, seed in any::<u64>()
    ) {
        let mut rng = Rng::new(seed);
        let z: Vec<f32> = (0..t * e).map(|_| rng.sym() * scale).collect();
        let p = activate(&z, t, e, Activation::Softmax, temp).unwrap();
        prop_assert_eq!(p.len(), t * e);
        let mut want = Vec::with_capacity(t * e);
        for (ti, row) in p.chunks(e).enumerate() {
            let zr = &z[ti * e..(ti + 1) * e];
            let s: f32 = row.iter().sum();
            prop_assert!((s - 1.0).abs() <= 1e-5, "token {} sums to {}", ti, s);
            for (j, &pj) in row.iter().enumerate() {
                prop_assert!((0.0..=1.0).contains(&pj), "p[{},{}] = {}", ti, j, pj);
                // Monotone: a larger logit never gets a smaller probability.
                for (i, &pi) in row.iter().enumerate() {
                    if zr[i] > zr[j] {
                        prop_assert!(pi >= pj, "z[{i}] > z[{j}] but p {pi} < {pj}");
                    }
                }
            }
            let scaled: Vec<f64> = zr.iter().map(|&v| f64::from(v) / f64::from(temp)).collect();
            want.extend(softmax64(&scaled).iter().map(|&v| v as f32));
        }
        check_cmp(compare("softmax", &p, &want, Tolerance::for_dtype(DType::F32)))?;
        // Temperature scaling equals the softmax of the scaled logits.
        let zs: Vec<f32> = z.iter().map(|&v| v / temp).collect();
        let p1 = activate(&zs, t, e, Activation::Softmax, 1.0).unwrap();
        check_cmp(compare("softmax(z/τ)", &p, &p1, Tolerance::for_dtype(DType::F32)))?;
    }

    #[test]
    fn sigmoid_is_elementwise_logistic(
        t in tokens(), e in 1usize..=64, scale in 0.1f32..20.0, temp in 0.2f32..5.0, seed in any::<u64>()
    ) {
        let mut rng = Rng::new(seed);
        let z: Vec<f32> = (0..t * e).map(|_| rng.sym() * scale).collect();
        let p = activate(&z, t, e, Activation::Sigmoid, temp).unwrap();
        let want: Vec<f32> = z
            .iter()
            .map(|&v| sigmoid64(f64::from(v) / f64::from(temp)) as f32)
            .collect();
        prop_assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
        check_cmp(compare("sigmoid", &p, &want, Tolerance::for_dtype(DType::F32)))?;
        let zs: Vec<f32> = z.iter().map(|&v| v / temp).collect();
        let p1 = activate(&zs, t, e, Activation::Sigmoid, 1.0).unwrap();
        check_cmp(compare("sigmoid(z/τ)", &p, &p1, Tolerance::for_dtype(DType::F32)))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Top-k.

fn check_top_k(
    p: &[f32],
    t: usize,
    e: usize,
    k: usize,
    r: &Routing,
    renormalize: bool,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.num_tokens(), t);
    prop_assert_eq!(r.k_max(), k);
    prop_assert_eq!(r.num_experts(), e);
    for ti in 0..t {
        let row = &p[ti * e..(ti + 1) * e];
        let ids: Vec<usize> = (0..k)
            .map(|s| r.id(ti, s))
            .map(|id| {
                assert!(
                    id >= 0 && (id as usize) < e,
                    "token {ti}: id {id} out of range"
                );
                id as usize
            })
            .collect();
        // No duplicates.
        let mut seen = vec![false; e];
        for &id in &ids {
            prop_assert!(!seen[id], "token {}: expert {} twice", ti, id);
            seen[id] = true;
        }
        // Slot order: descending p, ties lower id first.
        for s in 1..k {
            prop_assert!(
                precedes(row, ids[s - 1], ids[s]),
                "token {}: slots {:?} out of order",
                ti,
                ids
            );
        }
        // The k largest: every kept expert beats every dropped one (ties to the lower id).
        for (d, _) in seen.iter().enumerate().filter(|(_, &kept)| !kept) {
            for &a in &ids {
                prop_assert!(
                    row[a] >= row[d],
                    "token {}: kept {} (p {}) < dropped {} (p {})",
                    ti,
                    a,
                    row[a],
                    d,
                    row[d]
                );
                prop_assert!(
                    precedes(row, a, d),
                    "token {}: tie between kept {} and dropped {} went to the higher id",
                    ti,
                    a,
                    d
                );
            }
        }
        let w: Vec<f32> = (0..k).map(|s| r.weight(ti, s)).collect();
        if renormalize {
            let sum_p: f64 = ids.iter().map(|&i| f64::from(row[i])).sum();
            let sum_w: f32 = w.iter().sum();
            prop_assert!(
                (sum_w - 1.0).abs() <= 1e-5,
                "token {}: weights sum to {}",
                ti,
                sum_w
            );
            for (s, &id) in ids.iter().enumerate() {
                prop_assert!(w[s] >= 0.0);
                let want = if sum_p > 0.0 {
                    (f64::from(row[id]) / sum_p) as f32
                } else {
                    1.0 / k as f32
                };
                prop_assert!(
                    (w[s] - want).abs() <= 1e-6,
                    "token {} slot {}: w {} want {}",
                    ti,
                    s,
                    w[s],
                    want
                );
            }
        } else {
            for (s, &id) in ids.iter().enumerate() {
                prop_assert_eq!(w[s], row[id]);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn top_k_keeps_the_k_largest(
        t in tokens(), (e, k) in (1usize..=64).prop_flat_map(|e| (Just(e), 1..=e)),
        renormalize in any::<bool>(), seed in any::<u64>()
    ) {
        let mut rng = Rng::new(seed);
        let p = prob_matrix(&mut rng, t, e);
        let r = top_k(&p, t, e, k, renormalize).unwrap();
        check_top_k(&p, t, e, k, &r, renormalize)?;
        prop_assert_eq!(r.num_active(), t * k);
    }
}

#[test]
fn top_k_ties_go_to_the_lower_id() {
    // Expert 5 and 2 tie at the top, 0, 3 and 4 tie below them.
    let p = [0.1, 0.0, 0.3, 0.1, 0.1, 0.3];
    let r = top_k(&p, 1, 6, 4, false).unwrap();
    assert_eq!(r.ids(), &[2, 5, 0, 3]);
    let r = top_k(&p, 1, 6, 1, true).unwrap();
    assert_eq!(r.ids(), &[2]);
    assert_eq!(r.weights(), &[1.0]);
    // All tokens on one expert: k = 1 routes every token there.
    let p: Vec<f32> = (0..7 * 3)
        .map(|i| if i % 3 == 1 { 1.0 } else { 0.0 })
        .collect();
    let r = top_k(&p, 7, 3, 1, true).unwrap();
    assert!(r.ids().iter().all(|&id| id == 1));
    assert!(r.weights().iter().all(|&w| w == 1.0));
}

// ---------------------------------------------------------------------------------------------
// Dynamic threshold.

fn check_threshold(
    p: &[f32],
    t: usize,
    e: usize,
    taus: &[f32],
    r: &Routing,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.num_tokens(), t);
    prop_assert_eq!(r.k_max(), e);
    prop_assert_eq!(r.num_experts(), e);
    for ti in 0..t {
        let row = &p[ti * e..(ti + 1) * e];
        let tau = taus[ti];
        let active = (0..e).take_while(|&s| r.id(ti, s) >= 0).count();
        prop_assert!(active >= 1, "token {}: no active slot", ti);
        // Empty slots come last, have id -1 and weight exactly 0.
        for s in active..e {
            prop_assert_eq!(r.id(ti, s), -1);
            prop_assert_eq!(r.weight(ti, s).to_bits(), 0.0f32.to_bits());
        }
        let ids: Vec<usize> = (0..active).map(|s| r.id(ti, s) as usize).collect();
        let w: Vec<f32> = (0..active).map(|s| r.weight(ti, s)).collect();
        for s in 1..active {
            prop_assert!(
                precedes(row, ids[s - 1], ids[s]),
                "token {}: slots {:?} out of order",
                ti,
                ids
            );
        }
        let passing: Vec<usize> = (0..e).filter(|&j| row[j] >= tau).collect();
        if passing.is_empty() {
            // Arg-max fallback, ties to the lower id, weight 1.
            let best = (0..e).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            prop_assert_eq!(active, 1, "token {}: fallback must keep one expert", ti);
            prop_assert_eq!(ids[0], best);
            prop_assert_eq!(w[0], 1.0);
        } else {
            // Kept set == {e : p_e >= τ}: every kept passes, none passing is dropped.
            let mut kept = ids.clone();
            kept.sort_unstable();
            prop_assert_eq!(&kept, &passing, "token {}: τ {}", ti, tau);
            let sum: f64 = ids
                .iter()
                .map(|&j| f64::from(row[j]) - f64::from(tau))
                .sum();
            let sum_w: f32 = w.iter().sum();
            prop_assert!(
                (sum_w - 1.0).abs() <= 1e-5,
                "token {}: weights sum to {}",
                ti,
                sum_w
            );
            for (s, &j) in ids.iter().enumerate() {
                prop_assert!(w[s] >= 0.0);
                let want = if sum > 0.0 {
                    ((f64::from(row[j]) - f64::from(tau)) / sum) as f32
                } else {
                    1.0 / active as f32
                };
                prop_assert!(
                    (w[s] - want).abs() <= 1e-6,
                    "token {} slot {}: w {} want {}",
                    ti,
                    s,
                    w[s],
                    want
                );
            }
        }
    }
    Ok(())
}

/// Thresholds of several kinds: below everything, inside the range, exactly at a probability (the
/// `≥` boundary), above everything (fallback), the learned default `σ(0)/E`.
fn random_taus(rng: &mut Rng, p: &[f32], t: usize, e: usize) -> Vec<f32> {
    (0..t)
        .map(|ti| {
            let row = &p[ti * e..(ti + 1) * e];
            let max = row.iter().copied().fold(0.0f32, f32::max);
            match rng.below(5) {
                0 => -rng.unit(),
                1 => rng.unit() * max,
                2 => row[rng.below(e)],
                3 => max + 0.01 + rng.unit(),
                _ => 0.5 / e as f32,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn threshold_keeps_exactly_the_experts_above_tau(
        t in tokens(), e in 1usize..=64, seed in any::<u64>()
    ) {
        let mut rng = Rng::new(seed);
        let p = prob_matrix(&mut rng, t, e);
        let taus = random_taus(&mut rng, &p, t, e);
        let r = threshold_gate(&p, t, e, &taus).unwrap();
        check_threshold(&p, t, e, &taus, &r)?;
    }

    #[test]
    fn learned_threshold_is_sigmoid_theta_over_e(
        t in tokens(), e in 1usize..=64, theta in -30.0f32..30.0
    ) {
        let taus = threshold_values::<f32>(&ThresholdSpec::Learned { theta }, None, t, 3, e).unwrap();
        prop_assert_eq!(taus.len(), t);
        let want = (sigmoid64(f64::from(theta)) / e as f64) as f32;
        for &tau in &taus {
            prop_assert!((tau - want).abs() <= 1e-6 * want, "τ {} want {}", tau, want);
            prop_assert!(tau > 0.0 && tau <= 1.0 / e as f32);
        }
        // A fixed τ is returned as is, for every token.
        let fixed = threshold_values::<f32>(&ThresholdSpec::Fixed(theta), None, t, 3, e).unwrap();
        prop_assert_eq!(fixed, vec![theta; t]);
    }

    #[test]
    fn input_dependent_threshold_matches_formula(
        t in tokens(), d_in in odd_d_in(), e in 1usize..=64, seed in any::<u64>()
    ) {
        check_input_tau::<f32>(t, d_in, e, seed)?;
        check_input_tau::<f16>(t, d_in, e, seed)?;
        check_input_tau::<bf16>(t, d_in, e, seed)?;
    }
}

fn check_input_tau<T: Element>(
    t: usize,
    d_in: usize,
    e: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let x: Vec<T> = rng.vec_sym(t * d_in);
    let w: Vec<f32> = (0..d_in).map(|_| rng.sym()).collect();
    let b = rng.sym() * 2.0;
    let spec = ThresholdSpec::InputDependent { w: w.clone(), b };
    let taus = threshold_values(&spec, Some(&x), t, d_in, e).unwrap();
    let want: Vec<f32> = (0..t)
        .map(|ti| {
            let z: f64 = (0..d_in)
                .map(|i| f64::from(x[ti * d_in + i].to_f32()) * f64::from(w[i]))
                .sum::<f64>()
                + f64::from(b);
            (sigmoid64(z) / e as f64) as f32
        })
        .collect();
    prop_assert!(taus.iter().all(|&v| v >= 0.0 && v <= 1.0 / e as f32));
    check_cmp(compare(
        &format!("input-dependent τ ({})", T::DTYPE),
        &taus,
        &want,
        Tolerance::for_dtype(DType::F32),
    ))
}

#[test]
fn threshold_active_count_varies_by_token() {
    let (t, e) = (133, 8);
    let mut rng = Rng::new(7);
    let z: Vec<f32> = (0..t * e).map(|_| rng.sym() * 3.0).collect();
    let p = activate(&z, t, e, Activation::Softmax, 1.0).unwrap();
    let taus =
        threshold_values::<f32>(&ThresholdSpec::Learned { theta: 0.0 }, None, t, 1, e).unwrap();
    let r = threshold_gate(&p, t, e, &taus).unwrap();
    let mut counts: Vec<usize> = (0..t)
        .map(|ti| (0..e).filter(|&s| r.id(ti, s) >= 0).count())
        .collect();
    counts.sort_unstable();
    counts.dedup();
    assert!(counts.len() >= 3, "active counts {counts:?}");
    // τ above every probability: the arg-max alone, weight 1.
    let r = threshold_gate(&[0.2, 0.5, 0.3, 0.5], 1, 4, &[0.9]).unwrap();
    assert_eq!(r.ids(), &[1, -1, -1, -1]);
    assert_eq!(r.weights(), &[1.0, 0.0, 0.0, 0.0]);
}

// ---------------------------------------------------------------------------------------------
// Hierarchical combination and dense routing.

fn local_probs(rng: &mut Rng, t: usize, e: usize) -> Vec<f32> {
    (0..t)
        .flat_map(|_| {
            if rng.below(4) == 0 {
                let hot = rng.below(e);
                (0..e)
                    .map(|j| if j == hot { 1.0 } else { 0.0 })
                    .collect::<Vec<f32>>()
            } else {
                let z: Vec<f64> = (0..e).map(|_| f64::from(rng.sym()) * 4.0).collect();
                softmax64(&z).iter().map(|&v| v as f32).collect()
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn hierarchical_mix_and_product(
        t in tokens(), e in 1usize..=64, lambda in 0.0f32..=1.0, seed in any::<u64>()
    ) {
        let mut rng = Rng::new(seed);
        let l = local_probs(&mut rng, t, e);
        let g = random_global(&mut rng, t, e);
        let seg_of = g.segments().segment_of_rows();

        let p0 = hierarchical(&l, t, e, &g, HierarchicalCombine::Mix { lambda: 0.0 }).unwrap();
        prop_assert_eq!(&p0, &l);
        let p1 = hierarchical(&l, t, e, &g, HierarchicalCombine::Mix { lambda: 1.0 }).unwrap();
        let g_rows: Vec<f32> = seg_of.iter().flat_map(|&s| g.probs_of(s).to_vec()).collect();
        prop_assert_eq!(&p1, &g_rows);

        let pm = hierarchical(&l, t, e, &g, HierarchicalCombine::Mix { lambda }).unwrap();
        prop_assert_eq!(pm.len(), t * e);
        let want: Vec<f32> = l
            .iter()
            .zip(&g_rows)
            .map(|(&lv, &gv)| (f64::from(lambda) * f64::from(gv) + (1.0 - f64::from(lambda)) * f64::from(lv)) as f32)
            .collect();
        check_cmp(compare("mix", &pm, &want, Tolerance { atol: 1e-6, rtol: 1e-6 }))?;

        let pp = hierarchical(&l, t, e, &g, HierarchicalCombine::Product).unwrap();
        for ti in 0..t {
            let (lr, gr) = (&l[ti * e..(ti + 1) * e], &g_rows[ti * e..(ti + 1) * e]);
            let sm: f32 = pm[ti * e..(ti + 1) * e].iter().sum();
            prop_assert!((sm - 1.0).abs() <= 1e-5, "mix row {} sums to {}", ti, sm);
            let prod: Vec<f64> = lr.iter().zip(gr).map(|(&a, &b)| f64::from(a) * f64::from(b)).collect();
            let s: f64 = prod.iter().sum();
            let row = &pp[ti * e..(ti + 1) * e];
            if s > 0.0 {
                let want: Vec<f32> = prod.iter().map(|v| (v / s) as f32).collect();
                check_cmp(compare("product", row, &want, Tolerance { atol: 1e-6, rtol: 1e-6 }))?;
                let sp: f32 = row.iter().sum();
                prop_assert!((sp - 1.0).abs() <= 1e-5, "product row {} sums to {}", ti, sp);
            } else {
                // Disjoint supports: the local router's row unchanged.
                prop_assert_eq!(row, lr);
            }
        }
    }

    #[test]
    fn dense_weights_are_the_probabilities(t in tokens(), e in 1usize..=64, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let p = prob_matrix(&mut rng, t, e);
        let r = dense(&p, t, e).unwrap();
        prop_assert_eq!(r.k_max(), e);
        prop_assert_eq!(r.num_active(), t * e);
        prop_assert_eq!(r.weights(), &p[..]);
        for ti in 0..t {
            for s in 0..e {
                prop_assert_eq!(r.id(ti, s), s as i32);
            }
        }
    }
}

#[test]
fn product_with_disjoint_support_falls_back_to_local() {
    let g = SeqRouting::new(Segments::single(2).unwrap(), 3, vec![1.0, 0.0, 0.0]).unwrap();
    let l = [0.0, 0.4, 0.6, 0.5, 0.5, 0.0];
    let p = hierarchical(&l, 2, 3, &g, HierarchicalCombine::Product).unwrap();
    assert_eq!(&p[..3], &l[..3]);
    assert_eq!(&p[3..], &[1.0, 0.0, 0.0]);
}

// ---------------------------------------------------------------------------------------------
// The pipeline.

fn random_gate(rng: &mut Rng, e: usize, d_in: usize) -> Gate {
    match rng.below(6) {
        0 | 1 => Gate::TopK {
            k: 1 + rng.below(e),
            renormalize: rng.below(2) == 0,
        },
        2 => Gate::Threshold(ThresholdSpec::Fixed(rng.unit() / e as f32 * 2.0)),
        3 => Gate::Threshold(ThresholdSpec::Learned {
            theta: rng.sym() * 3.0,
        }),
        4 => Gate::Threshold(ThresholdSpec::InputDependent {
            w: (0..d_in).map(|_| rng.sym()).collect(),
            b: rng.sym(),
        }),
        _ => Gate::Dense,
    }
}

fn check_route<T: Element>(
    t: usize,
    d_in: usize,
    e: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let x: Vec<T> = rng.vec_sym(t * d_in);
    let w_g: Vec<T> = rng.vec_sym(e * d_in);
    let b_g: Option<Vec<T>> = (rng.below(2) == 0).then(|| rng.vec_sym(e));
    let activation = if rng.below(2) == 0 {
        Activation::Softmax
    } else {
        Activation::Sigmoid
    };
    let temperature = 0.25 + 2.0 * rng.unit();
    let router = RouterWeights {
        w_g: &w_g,
        b_g: b_g.as_deref(),
        activation,
        temperature,
    };
    let global = random_global(&mut rng, t, e);
    let combine = match rng.below(3) {
        0 => None,
        1 => Some(HierarchicalCombine::Mix { lambda: rng.unit() }),
        _ => Some(HierarchicalCombine::Product),
    };
    let gate = random_gate(&mut rng, e, d_in);

    let got = route(
        &x,
        t,
        d_in,
        e,
        &router,
        combine.map(|c| (&global, c)),
        &gate,
    )
    .unwrap();

    let z = router_logits(&x, t, d_in, &w_g, b_g.as_deref(), e).unwrap();
    let mut p = activate(&z, t, e, activation, temperature).unwrap();
    if let Some(c) = combine {
        p = hierarchical(&p, t, e, &global, c).unwrap();
    }
    let want = match &gate {
        Gate::TopK { k, renormalize } => {
            let r = top_k(&p, t, e, *k, *renormalize).unwrap();
            check_top_k(&p, t, e, *k, &r, *renormalize)?;
            r
        }
        Gate::Threshold(spec) => {
            let taus = threshold_values(spec, Some(&x), t, d_in, e).unwrap();
            let r = threshold_gate(&p, t, e, &taus).unwrap();
            check_threshold(&p, t, e, &taus, &r)?;
            r
        }
        Gate::Dense => dense(&p, t, e).unwrap(),
    };
    prop_assert_eq!(got, want, "gate {:?}, combine {:?}", gate, combine);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn route_equals_the_steps_composed(
        t in tokens(), d_in in odd_d_in(), e in 1usize..=64, seed in any::<u64>()
    ) {
        check_route::<f32>(t, d_in, e, seed)?;
        check_route::<f16>(t, d_in, e, seed)?;
        check_route::<bf16>(t, d_in, e, seed)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input: one case each, the variant and its values.

fn global_2x3() -> SeqRouting {
    SeqRouting::new(
        Segments::from_lengths(&[1, 1]).unwrap(),
        3,
        vec![0.2, 0.3, 0.5, 1.0, 0.0, 0.0],
    )
    .unwrap()
}

#[test]
fn err_router_logits_lengths() {
    let x = [0.0f32; 6];
    let w = [0.0f32; 9];
    assert_eq!(
        router_logits(&x[..5], 2, 3, &w, None, 3),
        Err(Error::LengthMismatch {
            what: "x [T, d_in]",
            expected: 6,
            got: 5
        })
    );
    assert_eq!(
        router_logits(&x, 2, 3, &w[..8], None, 3),
        Err(Error::LengthMismatch {
            what: "router W_g [E, d_in]",
            expected: 9,
            got: 8
        })
    );
    assert_eq!(
        router_logits(&x, 2, 3, &w, Some(&[0.0; 2]), 3),
        Err(Error::LengthMismatch {
            what: "router b_g [E]",
            expected: 3,
            got: 2
        })
    );
    assert!(matches!(
        router_logits(&x, 2, 3, &w, None, 0),
        Err(Error::InvalidDim {
            what: "num_experts",
            value: 0,
            ..
        })
    ));
    assert!(matches!(
        router_logits::<f32>(&[], 2, 0, &[], None, 3),
        Err(Error::InvalidDim {
            what: "d_in",
            value: 0,
            ..
        })
    ));
    assert!(matches!(
        router_logits::<f32>(&[], usize::MAX, 2, &w, None, 3),
        Err(Error::InvalidDim {
            what: "num_tokens * d_in",
            ..
        })
    ));
}

#[test]
fn err_router_logits_non_finite_inputs() {
    let mut x = [f16::from_f32(0.5); 6];
    x[4] = f16::INFINITY;
    assert_eq!(
        router_logits(&x, 2, 3, &[f16::ZERO; 9], None, 3),
        Err(Error::NonFinite {
            what: "x",
            index: 4,
            value: f32::INFINITY
        })
    );
    let mut w = [bf16::ZERO; 9];
    w[7] = bf16::NEG_INFINITY;
    assert_eq!(
        router_logits(&[bf16::ONE; 6], 2, 3, &w, None, 3),
        Err(Error::NonFinite {
            what: "router W_g",
            index: 7,
            value: f32::NEG_INFINITY
        })
    );
    match router_logits(
        &[1.0f32; 6],
        2,
        3,
        &[0.0; 9],
        Some(&[0.0, f32::NAN, 0.0]),
        3,
    ) {
        Err(Error::NonFinite {
            what: "router b_g",
            index: 1,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn err_activate_logits_length() {
    assert_eq!(
        activate(&[0.0; 5], 2, 3, Activation::Softmax, 1.0),
        Err(Error::LengthMismatch {
            what: "logits [T, E]",
            expected: 6,
            got: 5
        })
    );
}

#[test]
fn err_nan_and_inf_logits() {
    for act in [Activation::Softmax, Activation::Sigmoid] {
        match activate(&[0.0, 1.0, f32::NAN, 2.0], 2, 2, act, 1.0) {
            Err(Error::NonFinite {
                what: "logits",
                index: 2,
                value,
            }) => assert!(value.is_nan()),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            activate(&[0.0, 1.0, 2.0, f32::INFINITY], 2, 2, act, 1.0),
            Err(Error::NonFinite {
                what: "logits",
                index: 3,
                value: f32::INFINITY
            })
        );
        assert_eq!(
            activate(&[f32::NEG_INFINITY, 0.0], 1, 2, act, 1.0),
            Err(Error::NonFinite {
                what: "logits",
                index: 0,
                value: f32::NEG_INFINITY
            })
        );
    }
}

#[test]
fn err_temperature() {
    for temp in [0.0f32, -0.0, -1.0, f32::INFINITY] {
        assert_eq!(
            activate(&[0.0; 4], 2, 2, Activation::Softmax, temp),
            Err(Error::InvalidParameter {
                what: "temperature",
                value: temp,
                reason: "the temperature must be finite and > 0"
            })
        );
    }
    match activate(&[0.0; 4], 2, 2, Activation::Sigmoid, f32::NAN) {
        Err(Error::InvalidParameter {
            what: "temperature",
            value,
            ..
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn err_top_k_k_out_of_range() {
    let p = [0.25f32; 8];
    assert_eq!(
        top_k(&p, 2, 4, 0, true),
        Err(Error::InvalidK {
            k: 0,
            num_experts: 4
        })
    );
    assert_eq!(
        top_k(&p, 2, 4, 5, false),
        Err(Error::InvalidK {
            k: 5,
            num_experts: 4
        })
    );
    assert_eq!(
        top_k(&p[..7], 2, 4, 2, true),
        Err(Error::LengthMismatch {
            what: "probs",
            expected: 8,
            got: 7
        })
    );
}

#[test]
fn err_gate_probs_nan_inf_negative() {
    let mut p = [0.25f32; 8];
    p[6] = f32::NAN;
    match top_k(&p, 2, 4, 2, true) {
        Err(Error::NonFinite {
            what: "probs",
            index: 6,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
    p[6] = f32::INFINITY;
    assert_eq!(
        dense(&p, 2, 4),
        Err(Error::NonFinite {
            what: "probs",
            index: 6,
            value: f32::INFINITY
        })
    );
    p[6] = -0.5;
    assert_eq!(
        threshold_gate(&p, 2, 4, &[0.1, 0.1]),
        Err(Error::InvalidParameter {
            what: "probs",
            value: -0.5,
            reason: "probabilities must be non-negative"
        })
    );
}

#[test]
fn err_threshold_tau() {
    let p = [0.25f32; 8];
    match threshold_gate(&p, 2, 4, &[0.1, f32::NAN]) {
        Err(Error::NonFinite {
            what: "tau",
            index: 1,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        threshold_gate(&p, 2, 4, &[0.1]),
        Err(Error::LengthMismatch {
            what: "tau [T]",
            expected: 2,
            got: 1
        })
    );
    match threshold_values::<f32>(&ThresholdSpec::Fixed(f32::NAN), None, 2, 3, 4) {
        Err(Error::NonFinite {
            what: "tau",
            index: 0,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        threshold_values::<f32>(
            &ThresholdSpec::Learned {
                theta: f32::INFINITY
            },
            None,
            2,
            3,
            4
        ),
        Err(Error::NonFinite {
            what: "theta",
            index: 0,
            value: f32::INFINITY
        })
    );
    let spec = ThresholdSpec::InputDependent {
        w: vec![0.0, f32::NEG_INFINITY, 0.0],
        b: 0.0,
    };
    assert_eq!(
        threshold_values(&spec, Some(&[0.0f32; 6]), 2, 3, 4),
        Err(Error::NonFinite {
            what: "threshold w",
            index: 1,
            value: f32::NEG_INFINITY
        })
    );
    let spec = ThresholdSpec::InputDependent {
        w: vec![0.0; 3],
        b: f32::NAN,
    };
    assert!(matches!(
        threshold_values(&spec, Some(&[0.0f32; 6]), 2, 3, 4),
        Err(Error::NonFinite {
            what: "threshold b",
            index: 0,
            ..
        })
    ));
}

#[test]
fn err_input_dependent_threshold_shapes() {
    let spec = ThresholdSpec::InputDependent {
        w: vec![0.0; 3],
        b: 0.0,
    };
    assert_eq!(
        threshold_values::<f32>(&spec, None, 2, 3, 4),
        Err(Error::LengthMismatch {
            what: "x [T, d_in] (input-dependent threshold)",
            expected: 6,
            got: 0
        })
    );
    assert_eq!(
        threshold_values(&spec, Some(&[0.0f32; 5]), 2, 3, 4),
        Err(Error::LengthMismatch {
            what: "x [T, d_in]",
            expected: 6,
            got: 5
        })
    );
    assert_eq!(
        threshold_values(&spec, Some(&[0.0f32; 8]), 2, 4, 4),
        Err(Error::LengthMismatch {
            what: "threshold w [d_in]",
            expected: 4,
            got: 3
        })
    );
    let mut x = [0.0f32; 6];
    x[5] = f32::INFINITY;
    assert_eq!(
        threshold_values(&spec, Some(&x), 2, 3, 4),
        Err(Error::NonFinite {
            what: "x",
            index: 5,
            value: f32::INFINITY
        })
    );
    assert!(matches!(
        threshold_values::<f32>(&ThresholdSpec::Learned { theta: 0.0 }, None, 2, 3, 0),
        Err(Error::InvalidDim {
            what: "num_experts",
            value: 0,
            ..
        })
    ));
}

#[test]
fn err_hierarchical_lambda() {
    let l = [0.5f32, 0.25, 0.25, 0.0, 0.0, 1.0];
    for lambda in [1.5f32, -0.1, f32::INFINITY] {
        assert_eq!(
            hierarchical(&l, 2, 3, &global_2x3(), HierarchicalCombine::Mix { lambda }),
            Err(Error::InvalidParameter {
                what: "lambda",
                value: lambda,
                reason: "the mixing weight must be in [0, 1]"
            })
        );
    }
    match hierarchical(
        &l,
        2,
        3,
        &global_2x3(),
        HierarchicalCombine::Mix { lambda: f32::NAN },
    ) {
        Err(Error::InvalidParameter {
            what: "lambda",
            value,
            ..
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn err_hierarchical_global_shape() {
    let l = [0.25f32; 9];
    // Segments cover 2 rows, the local probabilities 3.
    assert_eq!(
        hierarchical(&l, 3, 3, &global_2x3(), HierarchicalCombine::Product),
        Err(Error::LengthMismatch {
            what: "global posterior segment rows",
            expected: 3,
            got: 2
        })
    );
    // 3 experts in the global posterior, 4 locally.
    assert_eq!(
        hierarchical(
            &[0.25f32; 8],
            2,
            4,
            &global_2x3(),
            HierarchicalCombine::Mix { lambda: 0.5 }
        ),
        Err(Error::LengthMismatch {
            what: "global posterior experts",
            expected: 4,
            got: 3
        })
    );
    assert_eq!(
        hierarchical(&l[..5], 2, 3, &global_2x3(), HierarchicalCombine::Product),
        Err(Error::LengthMismatch {
            what: "local probs",
            expected: 6,
            got: 5
        })
    );
    let neg = SeqRouting::new(Segments::single(2).unwrap(), 3, vec![1.5, -0.5, 0.0]).unwrap();
    assert!(matches!(
        hierarchical(&l[..6], 2, 3, &neg, HierarchicalCombine::Product),
        Err(Error::InvalidParameter { what: "global posterior probs", value, .. }) if value == -0.5
    ));
}

#[test]
fn err_route_checks_parameters_first() {
    let x = [0.5f32; 6];
    let w = [0.1f32; 9];
    let router = RouterWeights {
        w_g: &w,
        b_g: None,
        activation: Activation::Softmax,
        temperature: 1.0,
    };
    let topk = |k| Gate::TopK {
        k,
        renormalize: true,
    };
    assert_eq!(
        route(&x, 2, 3, 3, &router, None, &topk(4)),
        Err(Error::InvalidK {
            k: 4,
            num_experts: 3
        })
    );
    // The k check comes before the length check of x.
    assert_eq!(
        route(&x[..5], 2, 3, 3, &router, None, &topk(0)),
        Err(Error::InvalidK {
            k: 0,
            num_experts: 3
        })
    );
    assert_eq!(
        route(&x[..5], 2, 3, 3, &router, None, &topk(2)),
        Err(Error::LengthMismatch {
            what: "x [T, d_in]",
            expected: 6,
            got: 5
        })
    );
    let cold = RouterWeights {
        temperature: -2.0,
        ..router
    };
    assert!(matches!(
        route(&x, 2, 3, 3, &cold, None, &Gate::Dense),
        Err(Error::InvalidParameter { what: "temperature", value, .. }) if value == -2.0
    ));
    let g = global_2x3();
    assert!(matches!(
        route(&x, 2, 3, 3, &router, Some((&g, HierarchicalCombine::Mix { lambda: 1.5 })), &Gate::Dense),
        Err(Error::InvalidParameter { what: "lambda", value, .. }) if value == 1.5
    ));
    assert_eq!(
        route(
            &[0.5f32; 9],
            3,
            3,
            3,
            &router,
            Some((&g, HierarchicalCombine::Product)),
            &Gate::Dense
        ),
        Err(Error::LengthMismatch {
            what: "global posterior segment rows",
            expected: 3,
            got: 2
        })
    );
    let spec = ThresholdSpec::InputDependent {
        w: vec![0.0; 2],
        b: 0.0,
    };
    assert_eq!(
        route(&x, 2, 3, 3, &router, None, &Gate::Threshold(spec)),
        Err(Error::LengthMismatch {
            what: "threshold w [d_in]",
            expected: 3,
            got: 2
        })
    );
    // Logits that overflow f32 from finite inputs are caught by the activation.
    let big = [3e38f32; 6];
    assert!(matches!(
        route(
            &big,
            2,
            3,
            3,
            &RouterWeights {
                w_g: &[3e38f32; 9],
                ..router
            },
            None,
            &Gate::Dense
        ),
        Err(Error::NonFinite {
            what: "logits",
            index: 0,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Arbitrary (mostly invalid) input never panics, and whatever succeeds is well formed.

fn special(rng: &mut Rng) -> f32 {
    const V: [f32; 9] = [
        0.0,
        0.25,
        1.0,
        -1.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3e38,
        -0.0,
    ];
    V[rng.below(V.len())]
}

fn off_by(rng: &mut Rng, n: usize) -> usize {
    match rng.below(6) {
        0 => n.saturating_sub(1),
        1 => n + 1,
        _ => n,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_input_never_panics(
        t in 0usize..6, e in 0usize..6, d_in in 0usize..5, k in 0usize..8, seed in any::<u64>()
    ) {
        let mut rng = Rng::new(seed);
        let vals = |rng: &mut Rng, n: usize| -> Vec<f32> {
            let n = off_by(rng, n);
            (0..n).map(|_| if rng.below(4) == 0 { special(rng) } else { rng.unit() }).collect()
        };
        let x = vals(&mut rng, t * d_in);
        let w = vals(&mut rng, e * d_in);
        let b = vals(&mut rng, e);
        let p = vals(&mut rng, t * e);
        let taus = vals(&mut rng, t);
        let temp = if rng.below(2) == 0 { special(&mut rng) } else { 1.0 };
        let lambda = if rng.below(2) == 0 { special(&mut rng) } else { 0.5 };
        let act = if rng.below(2) == 0 { Activation::Softmax } else { Activation::Sigmoid };
        let t_g = off_by(&mut rng, t);
        let seg = random_segments(&mut rng, t_g);
        let e_g = off_by(&mut rng, e).max(1);
        let gp = vals(&mut rng, seg.num_segments() * e_g);
        let global = SeqRouting::new(seg, e_g, gp).ok();
        let combine = if rng.below(2) == 0 { HierarchicalCombine::Product } else { HierarchicalCombine::Mix { lambda } };

        if let Ok(z) = router_logits(&x, t, d_in, &w, Some(&b), e) {
            prop_assert_eq!(z.len(), t * e);
        }
        if let Ok(q) = activate(&p, t, e, act, temp) {
            prop_assert!(q.iter().all(|v| (0.0..=1.0).contains(v)));
        }
        if let Ok(r) = top_k(&p, t, e, k, true) {
            prop_assert_eq!((r.num_tokens(), r.k_max()), (t, k));
            prop_assert!(r.weights().iter().all(|w| w.is_finite() && *w >= 0.0));
        }
        if let Ok(r) = threshold_gate(&p, t, e, &taus) {
            prop_assert_eq!((r.num_tokens(), r.k_max()), (t, e));
            prop_assert!(r.weights().iter().all(|w| w.is_finite() && *w >= 0.0));
        }
        if let Ok(r) = dense(&p, t, e) {
            prop_assert_eq!(r.num_active(), t * e);
        }
        let specs = [
            ThresholdSpec::Fixed(special(&mut rng)),
            ThresholdSpec::Learned { theta: special(&mut rng) },
            ThresholdSpec::InputDependent { w: vals(&mut rng, d_in), b: special(&mut rng) },
        ];
        for spec in &specs {
            if let Ok(tv) = threshold_values(spec, Some(&x), t, d_in, e) {
                prop_assert_eq!(tv.len(), t);
            }
            let _ = threshold_values::<f32>(spec, None, t, d_in, e);
        }
        if let Some(g) = &global {
            if let Ok(h) = hierarchical(&p, t, e, g, combine) {
                prop_assert!(h.iter().all(|v| v.is_finite() && *v >= 0.0));
            }
        }
        let router = RouterWeights { w_g: &w, b_g: Some(&b), activation: act, temperature: temp };
        for gate in [Gate::TopK { k, renormalize: false }, Gate::Dense, Gate::Threshold(specs[2].clone())] {
            let h = global.as_ref().map(|g| (g, combine));
            if let Ok(r) = route(&x, t, d_in, e, &router, h, &gate) {
                prop_assert_eq!(r.num_tokens(), t);
            }
        }
    }
}
