//! LoRB: the MWER, MWED and correlation losses on hand-computed examples and against central finite
//! differences (f64), word errors, LoRA training that leaves the base bit-identical, and the demo
//! end to end at its tiny size.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use molora::demo::lorb::{
    encode_lists, run_lorb_demo, word_errors, LorbDemoConfig, RescoringTask, ROW_NAMES,
};
use molora::model::linear::{Ctx, MoleConfig};
use molora::model::lorb::{
    combined_scores, correlation_loss, mwed_loss, mwer_loss, nbest_posteriors, NormKind, Rescorer,
    RescorerConfig,
};
use molora::Rng;

fn t64(v: &[f64], dims: (usize, usize)) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    molora::candle::ops::host_f32(t).unwrap()
}

/// The gradient of `f` at `x` by candle autograd and by central differences (step 1e-5), in f64;
/// panics when they differ by more than `1e-6·(1 + |g|)`.
fn check_grad(what: &str, x: &[f64], dims: (usize, usize), f: &dyn Fn(&Tensor) -> Tensor) {
    let var = Var::from_tensor(&t64(x, dims)).unwrap();
    let loss = f(var.as_tensor());
    let grads = loss.backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("a gradient for the input")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let h = 1e-5;
    for i in 0..x.len() {
        let mut xp = x.to_vec();
        let mut xm = x.to_vec();
        xp[i] += h;
        xm[i] -= h;
        let fd = (scalar(&f(&t64(&xp, dims))) - scalar(&f(&t64(&xm, dims)))) / (2.0 * h);
        assert!(
            (g[i] - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{what}: d/dx[{i}] autograd {} vs finite difference {fd}",
            g[i]
        );
    }
}

#[test]
fn mwer_on_a_hand_computed_example() {
    // List 1: s = [0, ln 3] → P = [3/4, 1/4]; ε = [1, 3], ε̄ = 2 → 3/4·(−1) + 1/4·1 = −1/2.
    // List 2: equal scores → uniform P; Σ_i (ε_i − ε̄)/N = 0.
    let s = t64(&[0.0, 3f64.ln(), 5.0, 5.0], (2, 2));
    let e = t64(&[1.0, 3.0, 0.0, 2.0], (2, 2));
    let p: Vec<f64> = nbest_posteriors(&s)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (got, want) in p.iter().zip([0.75, 0.25, 0.5, 0.5]) {
        assert!((got - want).abs() < 1e-12, "posteriors {p:?}");
    }
    let l = scalar(&mwer_loss(&s, &e).unwrap());
    assert!((l - (-0.25)).abs() < 1e-12, "MWER {l}, expected −0.25");
    // The combined score s^a + β·s^l.
    let c = combined_scores(&t64(&[1.0, 2.0], (1, 2)), &t64(&[0.5, -1.0], (1, 2)), 2.0).unwrap();
    let c: Vec<f64> = c.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(c, vec![2.0, 0.0]);
    // Mismatched shapes are an error, not a panic.
    assert!(mwer_loss(&s, &t64(&[1.0, 2.0], (1, 2))).is_err());
}

#[test]
fn mwed_on_a_hand_computed_example() {
    // s = [0, ln 3] → P = [3/4, 1/4] (T = 1); ε = [1, 2] → Q = [1, e⁻¹]/(1 + e⁻¹).
    let s = t64(&[0.0, 3f64.ln()], (1, 2));
    let e = t64(&[1.0, 2.0], (1, 2));
    let z = 1.0 + (-1f64).exp();
    let want = -((1.0 / z) * 0.75f64.ln() + ((-1f64).exp() / z) * 0.25f64.ln());
    let l = scalar(&mwed_loss(&s, &e, 1.0).unwrap());
    assert!((l - want).abs() < 1e-12, "MWED {l}, expected {want}");
    // T = 2: P = softmax(−s/2) = [1, 1/√3]/(1 + 1/√3).
    let r = 1.0 / 3f64.sqrt();
    let want2 = -((1.0 / z) * (1.0 / (1.0 + r)).ln() + ((-1f64).exp() / z) * (r / (1.0 + r)).ln());
    let l2 = scalar(&mwed_loss(&s, &e, 2.0).unwrap());
    assert!(
        (l2 - want2).abs() < 1e-12,
        "MWED(T=2) {l2}, expected {want2}"
    );
    assert!(mwed_loss(&s, &e, 0.0).is_err());
}

#[test]
fn correlation_loss_on_hand_computed_examples() {
    // Perfectly correlated columns: C = [[1, 1], [1, 1]] → off-diagonal Σ C² = 2.
    let l = scalar(&correlation_loss(&t64(&[1.0, 2.0, 2.0, 4.0, 3.0, 6.0], (3, 2))).unwrap());
    assert!((l - 2.0).abs() < 1e-6, "correlated: {l}");
    // Uncorrelated columns: 0.
    let l = scalar(
        &correlation_loss(&t64(&[1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0], (4, 2))).unwrap(),
    );
    assert!(l.abs() < 1e-12, "uncorrelated: {l}");
    // Columns x, −x, y with y ⟂ x: C_01 = C_10 = −1, the rest 0 → 2.
    let l = scalar(
        &correlation_loss(&t64(
            &[
                1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0,
            ],
            (4, 3),
        ))
        .unwrap(),
    );
    assert!((l - 2.0).abs() < 1e-6, "x, −x, y: {l}");
    assert!(correlation_loss(&t64(&[1.0, 2.0], (1, 2))).is_err());
}

#[test]
fn loss_gradients_match_finite_differences() {
    let mut rng = Rng::new(3);
    let (b, n) = (3, 5);
    let s = rng.values_f64(b * n, 2.0);
    let e: Vec<f64> = (0..b * n).map(|_| rng.below(4) as f64).collect();
    let et = t64(&e, (b, n));
    check_grad("MWER", &s, (b, n), &|x| mwer_loss(x, &et).unwrap());
    check_grad("MWED (T = 1)", &s, (b, n), &|x| {
        mwed_loss(x, &et, 1.0).unwrap()
    });
    check_grad("MWED (T = 2.5)", &s, (b, n), &|x| {
        mwed_loss(x, &et, 2.5).unwrap()
    });
    // Through the combined score: d/ds^l = β·d/ds.
    let sa = t64(&rng.values_f64(b * n, 2.0), (b, n));
    check_grad("MWER through s^a + β·s^l", &s, (b, n), &|x| {
        mwer_loss(&combined_scores(&sa, x, 0.7).unwrap(), &et).unwrap()
    });
    let c = rng.values_f64(6 * 4, 1.0);
    check_grad("L_cor", &c, (6, 4), &|x| correlation_loss(x).unwrap());
}

#[test]
fn word_errors_are_the_levenshtein_distance() {
    assert_eq!(word_errors(&[1, 2, 3], &[1, 2, 3]), 0);
    assert_eq!(word_errors(&[1, 9, 3], &[1, 2, 3]), 1); // substitution
    assert_eq!(word_errors(&[1, 2, 7, 3], &[1, 2, 3]), 1); // insertion
    assert_eq!(word_errors(&[1, 3], &[1, 2, 3]), 1); // deletion
    assert_eq!(word_errors(&[], &[1, 2, 3]), 3);
    assert_eq!(word_errors(&[4, 5], &[]), 2);
    assert_eq!(word_errors(&[2, 1, 3, 5], &[1, 2, 3, 4]), 3);
}

fn tiny_rescorer(rng: &mut Rng, norm: NormKind) -> Rescorer {
    let cfg = RescorerConfig {
        vocab: 12,
        max_len: 10,
        d_model: 16,
        heads: 2,
        layers: 2,
        d_ff: 24,
        norm,
    };
    Rescorer::new(cfg, rng, &Device::Cpu).unwrap()
}

#[test]
fn rescorer_shapes_targets_and_padding() {
    let mut rng = Rng::new(5);
    for norm in [NormKind::Layer, NormKind::Rms] {
        let m = tiny_rescorer(&mut rng, norm);
        let ids = Tensor::from_vec(
            vec![1u32, 4, 5, 6, 0, 0, 1, 4, 5, 6, 7, 8],
            (2, 6),
            &Device::Cpu,
        )
        .unwrap();
        let out = m.forward(&ids, &mut Ctx::default()).unwrap();
        assert_eq!(out.scores.dims(), &[2]);
        assert_eq!(out.cls.dims(), &[2, 16]);
        // Padding is masked: the first sequence scores the same without its padding.
        let short = Tensor::from_vec(vec![1u32, 4, 5, 6], (1, 4), &Device::Cpu).unwrap();
        let alone = m.forward(&short, &mut Ctx::default()).unwrap();
        let (a, b) = (host(&out.scores)[0], host(&alone.scores)[0]);
        assert!((a - b).abs() < 1e-5, "padded {a} vs unpadded {b}");
        // Out-of-range ids and over-long inputs are errors.
        let bad = Tensor::from_vec(vec![1u32, 40], (1, 2), &Device::Cpu).unwrap();
        assert!(m.forward(&bad, &mut Ctx::default()).is_err());
        let long = Tensor::zeros((1, 11), DType::U32, &Device::Cpu).unwrap();
        assert!(m.forward(&long, &mut Ctx::default()).is_err());
    }
    let m = tiny_rescorer(&mut rng, NormKind::Layer);
    let qv = m.resolve_targets(&["q".into(), "v".into()]).unwrap();
    assert_eq!(
        qv,
        vec![
            "layer.0.attn.q",
            "layer.1.attn.q",
            "layer.0.attn.v",
            "layer.1.attn.v"
        ]
    );
    assert_eq!(m.resolve_targets(&["attention".into()]).unwrap().len(), 8);
    assert_eq!(m.resolve_targets(&["head".into()]).unwrap(), vec!["head"]);
    assert!(m.resolve_targets(&["nope".into()]).is_err());
    assert_eq!(m.num_trainable(), m.num_base_params());
}

#[test]
fn lora_training_touches_only_the_adapters() {
    let mut rng = Rng::new(9);
    let cfg = LorbDemoConfig::tiny();
    let task = RescoringTask::new(&cfg, &mut rng).unwrap();
    let mut m = Rescorer::new(cfg.rescorer_config(), &mut rng, &Device::Cpu).unwrap();
    m.add_lora(&cfg.targets, MoleConfig::lora(4, 8.0), &mut rng)
        .unwrap();
    let vars = m.trainable_vars();
    assert_eq!(
        vars.len(),
        2 * cfg.layers,
        "the packed experts (A and B) of q and v per layer"
    );
    assert!(vars.iter().all(|(n, _)| n.ends_with(".experts")));
    let d = cfg.d_model;
    assert_eq!(m.num_trainable(), 2 * cfg.layers * 4 * (d + d));

    let snapshot = |m: &Rescorer| -> Vec<Vec<f32>> {
        let (tok, pos) = m.embeddings();
        let mut out = vec![host(tok), host(pos)];
        for l in m.layers() {
            out.push(host(&l.weight().unwrap()));
            if let Some(b) = l.bias() {
                out.push(host(b));
            }
        }
        out
    };
    let before = snapshot(&m);
    let b_before: Vec<Vec<f32>> = vars.iter().map(|(_, v)| host(v.as_tensor())).collect();
    let mut opt = AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let lists = task.lists(1, 6, &mut rng);
    let (ids, sa, eps) = encode_lists(&lists, &Device::Cpu).unwrap();
    for _ in 0..5 {
        let out = m.forward(&ids, &mut Ctx::default()).unwrap();
        let s = combined_scores(&sa, &out.scores.reshape(sa.dims()).unwrap(), 1.0).unwrap();
        let loss = (mwer_loss(&s, &eps).unwrap()
            + (correlation_loss(&out.cls).unwrap() * 1e-2).unwrap())
        .unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let after = snapshot(&m);
    assert!(before == after, "a base weight or embedding changed");
    let changed = vars
        .iter()
        .zip(&b_before)
        .filter(|((_, v), old)| host(v.as_tensor()) != **old)
        .count();
    let moved: Vec<(&String, bool)> = vars
        .iter()
        .zip(&b_before)
        .map(|((n, v), old)| (n, host(v.as_tensor()) != *old))
        .collect();
    assert_eq!(
        changed,
        vars.len(),
        "every adapter tensor should move: {moved:?}"
    );
}

#[test]
fn synthetic_lists_are_consistent() {
    let cfg = LorbDemoConfig::tiny();
    let mut rng = Rng::new(1);
    let task = RescoringTask::new(&cfg, &mut rng).unwrap();
    for l in task.lists(1, 50, &mut rng) {
        assert_eq!(l.hyps.len(), cfg.nbest);
        assert_eq!(l.first_pass.len(), cfg.nbest);
        for (h, &e) in l.hyps.iter().zip(&l.errors) {
            assert_eq!(word_errors(h, &l.reference) as u32, e);
            assert!(!h.is_empty() && h.len() <= cfg.max_words + cfg.max_edits);
        }
    }
    // Deterministic for a seed.
    let mut a = Rng::new(4);
    let mut b = Rng::new(4);
    let ta = RescoringTask::new(&cfg, &mut a).unwrap();
    let tb = RescoringTask::new(&cfg, &mut b).unwrap();
    assert_eq!(ta.lists(0, 5, &mut a), tb.lists(0, 5, &mut b));
}

#[test]
fn tiny_demo_runs_and_lorb_beats_the_first_pass() {
    let cfg = LorbDemoConfig::tiny();
    let report = run_lorb_demo(&cfg, &mut |_| {}).unwrap();
    let md = report.to_markdown();
    println!("{md}");
    let names: Vec<&str> = report.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ROW_NAMES.to_vec());
    let first = report.row("first pass").unwrap().wer;
    let lorb = report.row("LoRB (MWER)").unwrap();
    assert!(
        lorb.wer < first,
        "LoRB WER {:.2}% should be below the first pass's {first:.2}%\n{md}",
        lorb.wer
    );
    assert!(lorb.trainable_pct < 10.0, "{md}");
    let json = report.to_json();
    assert_eq!(json["methods"].as_array().map(|a| a.len()), Some(5));
}

/// The LoRB demo with the rescorer in bf16 (embeddings and every layer; softmax, norms, scores and
/// losses in f32): LoRB still below the first pass.
#[test]
fn tiny_demo_in_bf16_beats_the_first_pass() {
    let cfg = LorbDemoConfig {
        dtype: candle_core::DType::BF16,
        ..LorbDemoConfig::tiny()
    };
    let report = run_lorb_demo(&cfg, &mut |_| {}).unwrap();
    let md = report.to_markdown();
    let first = report.row("first pass").unwrap().wer;
    let lorb = report.row("LoRB (MWER)").unwrap();
    assert!(
        lorb.wer < first,
        "bf16: LoRB WER {:.2}% should be below the first pass's {first:.2}%\n{md}",
        lorb.wer
    );
}
