//! Every CPU gradient against central finite differences in f64, over random shapes, `-1` slots and
//! duplicate ids. The loss is `L = Σ dy ⊙ f(θ)` for a random `dy`, so `∂L/∂θ` is what the backward
//! returns for that `dy`. Selections (top-k sets, threshold sets, fallbacks) are piecewise constant:
//! the tests build probabilities whose gaps and distances to τ are far larger than the step, so no
//! finite difference crosses a tie or a threshold edge.

use molora::cpu::backward::{
    base_backward_dx, cv_balance_loss, gate_backward, input_threshold_backward, lora_backward,
    lora_forward, mix_backward, mix_combine_backward, product_combine_backward, router_backward,
    sigmoid_backward, softmax_backward, switch_balance_loss,
};
use molora::LoraShape;
use molora::Rng;
use proptest::prelude::*;

const EPS: f64 = 1e-6;

/// Central differences of `f` at `x`.
fn fd(f: &dyn Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let v = xp[i];
            xp[i] = v + EPS;
            let up = f(&xp);
            xp[i] = v - EPS;
            let down = f(&xp);
            xp[i] = v;
            (up - down) / (2.0 * EPS)
        })
        .collect()
}

/// Relative error at most 1e-6 (with an absolute floor for values near zero, where the finite
/// difference's own rounding, about 1e-10·|L|, dominates).
fn check(what: &str, analytic: &[f64], numeric: &[f64]) -> Result<(), TestCaseError> {
    prop_assert_eq!(analytic.len(), numeric.len(), "{}: lengths", what);
    for (i, (&a, &n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (a - n).abs();
        prop_assert!(
            err <= 1e-6 * a.abs().max(n.abs()) + 1e-8,
            "{}[{}]: analytic {}, finite difference {}, error {}",
            what,
            i,
            a,
            n,
            err
        );
    }
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax(z: &[f64], e: usize, temp: f64) -> Vec<f64> {
    let mut p = Vec::with_capacity(z.len());
    for row in z.chunks_exact(e) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ex: Vec<f64> = row.iter().map(|&v| ((v - m) / temp).exp()).collect();
        let s: f64 = ex.iter().sum();
        p.extend(ex.iter().map(|v| v / s));
    }
    p
}

#[derive(Debug, Clone)]
struct Lora {
    t: usize,
    k: usize,
    e: usize,
    r: usize,
    d_in: usize,
    d_out: usize,
    seed: u64,
}

fn lora_case() -> impl Strategy<Value = Lora> {
    (
        0usize..6,
        1usize..=3,
        1usize..=4,
        1usize..=5,
        1usize..=7,
        1usize..=6,
        any::<u64>(),
    )
        .prop_map(|(t, k, e, r, d_in, d_out, seed)| Lora {
            t,
            k,
            e,
            r,
            d_in,
            d_out,
            seed: seed | 1,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// dA, dB, dx and dw of the LoRA part, with empty slots and duplicate ids.
    #[test]
    fn lora_gradients(c in lora_case()) {
        let mut rng = Rng::new(c.seed);
        let shape = LoraShape::new(c.e, c.r, c.d_in, c.d_out).unwrap();
        let x = rng.values_f64(c.t * c.d_in, 1.0);
        let a = rng.values_f64(shape.a_len(), 1.0);
        let b = rng.values_f64(shape.b_len(), 1.0);
        let ids: Vec<i32> = (0..c.t * c.k)
            .map(|_| if rng.uniform() < 0.25 { -1 } else { (rng.uniform() * c.e as f64) as i32 % c.e as i32 })
            .collect();
        let w = rng.values_f64(c.t * c.k, 1.0);
        let dy = rng.values_f64(c.t * c.d_out, 1.0);
        let s = 1.5;
        let g = lora_backward(&x, &a, &b, &shape, &ids, &w, c.k, s, &dy).unwrap();
        let loss = |x: &[f64], a: &[f64], b: &[f64], w: &[f64]| {
            dot(&dy, &lora_forward(x, a, b, &shape, &ids, w, c.k, s).unwrap())
        };
        check("dA", &g.da, &fd(&|v| loss(&x, v, &b, &w), &a))?;
        check("dB", &g.db, &fd(&|v| loss(&x, &a, v, &w), &b))?;
        check("dx", &g.dx, &fd(&|v| loss(v, &a, &b, &w), &x))?;
        check("dw", &g.dw, &fd(&|v| loss(&x, &a, &b, v), &w))?;
        for (i, &id) in ids.iter().enumerate() {
            if id < 0 {
                prop_assert_eq!(g.dw[i], 0.0);
            }
        }
    }

    /// Softmax and sigmoid with temperature, and the router (logits = x·W_gᵀ + b).
    #[test]
    fn activation_and_router_gradients(t in 1usize..5, e in 1usize..7, d_in in 1usize..6,
                                       temp in 0.3f64..3.0, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let z = rng.values_f64(t * e, 1.0);
        let dp = rng.values_f64(t * e, 1.0);
        let p = softmax(&z, e, temp);
        let dz = softmax_backward(&p, &dp, e, temp).unwrap();
        check("softmax dz", &dz, &fd(&|v| dot(&dp, &softmax(v, e, temp)), &z))?;
        let sig = |v: &[f64]| v.iter().map(|&x| 1.0 / (1.0 + (-x / temp).exp())).collect::<Vec<_>>();
        let ps = sig(&z);
        let dzs = sigmoid_backward(&ps, &dp, temp).unwrap();
        check("sigmoid dz", &dzs, &fd(&|v| dot(&dp, &sig(v)), &z))?;

        let x = rng.values_f64(t * d_in, 1.0);
        let wg = rng.values_f64(e * d_in, 1.0);
        let bg = rng.values_f64(e, 1.0);
        let logits = |x: &[f64], wg: &[f64], bg: &[f64]| -> Vec<f64> {
            (0..t * e)
                .map(|i| {
                    let (tok, ex) = (i / e, i % e);
                    dot(&x[tok * d_in..(tok + 1) * d_in], &wg[ex * d_in..(ex + 1) * d_in]) + bg[ex]
                })
                .collect()
        };
        let (dwg, dbg, dx) = router_backward(&x, &wg, &dz, d_in, e).unwrap();
        check("router dW_g", &dwg, &fd(&|v| dot(&dz, &logits(&x, v, &bg)), &wg))?;
        check("router db", &dbg, &fd(&|v| dot(&dz, &logits(&x, &wg, v)), &bg))?;
        check("router dx", &dx, &fd(&|v| dot(&dz, &logits(v, &wg, &bg)), &x))?;
    }

    /// Top-k (renormalised and not) and the dynamic threshold, through to dθ of a learned τ.
    #[test]
    fn gate_gradients(t in 1usize..5, e in 2usize..8, k in 1usize..8, seed in any::<u64>(),
                      theta in -2.0f64..2.0) {
        let k = k.min(e);
        let mut rng = Rng::new(seed);
        // Well-separated probabilities: distinct multiples of 1/(4E), shuffled, plus jitter < 1e-3.
        let mut p = Vec::with_capacity(t * e);
        for _ in 0..t {
            let mut levels: Vec<f64> = (1..=e).map(|v| v as f64 / (4.0 * e as f64)).collect();
            for i in (1..levels.len()).rev() {
                let j = (rng.uniform() * (i + 1) as f64) as usize % (i + 1);
                levels.swap(i, j);
            }
            p.extend(levels.iter().map(|v| v + rng.uniform() * 1e-3));
        }
        let top = |row: &[f64], k: usize| -> Vec<usize> {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            idx.truncate(k);
            idx
        };
        // The selection is fixed at p; the weights are differentiated as functions of p (and τ).
        let sel: Vec<Vec<usize>> = p.chunks(e).map(|row| top(row, k)).collect();
        let ids: Vec<i32> = sel.iter().flat_map(|s| s.iter().map(|&v| v as i32)).collect();
        let dw = rng.values_f64(t * k, 1.0);
        for renorm in [true, false] {
            let weights = |p: &[f64]| -> Vec<f64> {
                let mut w = vec![];
                for (tok, s) in sel.iter().enumerate() {
                    let row = &p[tok * e..(tok + 1) * e];
                    let sum: f64 = s.iter().map(|&i| row[i]).sum();
                    w.extend(s.iter().map(|&i| if renorm { row[i] / sum } else { row[i] }));
                }
                w
            };
            let (dp, _) = gate_backward(&p, e, &ids, k, None, renorm, &dw).unwrap();
            check(if renorm { "top-k renormalised dp" } else { "top-k dp" }, &dp,
                  &fd(&|v| dot(&dw, &weights(v)), &p))?;
        }

        // Threshold τ = σ(θ)/E, kept {p ≥ τ} (fallback to the arg-max when empty), k_max = E.
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let tau0 = sig(theta) / e as f64;
        // Keep τ away from every p (the finite difference must not cross an edge).
        prop_assume!(p.iter().all(|&v| (v - tau0).abs() > 1e-4));
        let kept: Vec<Vec<usize>> = p
            .chunks(e)
            .map(|row| {
                let s: Vec<usize> = top(row, e).into_iter().filter(|&i| row[i] >= tau0).collect();
                if s.is_empty() { top(row, 1) } else { s }
            })
            .collect();
        let mut tids = vec![-1i32; t * e];
        for (tok, s) in kept.iter().enumerate() {
            for (slot, &i) in s.iter().enumerate() {
                tids[tok * e + slot] = i as i32;
            }
        }
        let dwt = rng.values_f64(t * e, 1.0);
        let tw = |p: &[f64], tau: f64| -> Vec<f64> {
            let mut w = vec![0.0; t * e];
            for (tok, s) in kept.iter().enumerate() {
                let row = &p[tok * e..(tok + 1) * e];
                let fallback = s.len() == 1 && row[s[0]] < tau0;
                let z: f64 = s.iter().map(|&i| row[i] - tau).sum();
                for (slot, &i) in s.iter().enumerate() {
                    w[tok * e + slot] = if fallback { 1.0 } else { (row[i] - tau) / z };
                }
            }
            w
        };
        let taus = vec![tau0; t];
        let (dp, dtau) = gate_backward(&p, e, &tids, e, Some(&taus), true, &dwt).unwrap();
        check("threshold dp", &dp, &fd(&|v| dot(&dwt, &tw(v, tau0)), &p))?;
        // dθ = Σ_t dτ_t·σ'(θ)/E.
        let dtheta: f64 = dtau.iter().sum::<f64>() * sig(theta) * (1.0 - sig(theta)) / e as f64;
        let num = fd(&|v| dot(&dwt, &tw(&p, sig(v[0]) / e as f64)), &[theta]);
        check("threshold dθ", &[dtheta], &num)?;
    }

    /// Hierarchical combinations, SAML mixing through a weight-space layer, and the balance losses.
    #[test]
    fn combine_mixing_and_balance_gradients(t in 1usize..5, e in 1usize..6, r in 1usize..4,
                                            d in 1usize..5, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let l: Vec<f64> = (0..t * e).map(|_| 0.05 + rng.uniform()).collect();
        let g: Vec<f64> = (0..t * e).map(|_| 0.05 + rng.uniform()).collect();
        let dp = rng.values_f64(t * e, 1.0);
        let lambda = 0.3;
        let mix = |l: &[f64], lam: f64| -> Vec<f64> {
            g.iter().zip(l).map(|(&ge, &le)| lam * ge + (1.0 - lam) * le).collect()
        };
        let (dl, dlam) = mix_combine_backward(&g, &l, lambda, &dp).unwrap();
        check("mix dl", &dl, &fd(&|v| dot(&dp, &mix(v, lambda)), &l))?;
        check("mix dλ", &[dlam], &fd(&|v| dot(&dp, &mix(&l, v[0])), &[lambda]))?;
        let prod = |l: &[f64]| -> Vec<f64> {
            let mut out = vec![];
            for (gr, lr) in g.chunks(e).zip(l.chunks(e)) {
                let s: f64 = gr.iter().zip(lr).map(|(a, b)| a * b).sum();
                out.extend(gr.iter().zip(lr).map(|(a, b)| a * b / s));
            }
            out
        };
        let dlp = product_combine_backward(&g, &l, e, &dp).unwrap();
        check("product dl", &dlp, &fd(&|v| dot(&dp, &prod(v)), &l))?;

        // SAML: y = s·(x·Āᵀ)·B̄ᵀ with Ā = Σ p_e A_e, B̄ = Σ p_e B_e, one sequence.
        let shape = LoraShape::new(e, r, d, d + 1).unwrap();
        let one = LoraShape::new(1, r, d, d + 1).unwrap();
        let x = rng.values_f64(t * d, 1.0);
        let a = rng.values_f64(shape.a_len(), 1.0);
        let b = rng.values_f64(shape.b_len(), 1.0);
        let p: Vec<f64> = (0..e).map(|_| rng.uniform()).collect();
        let dy = rng.values_f64(t * (d + 1), 1.0);
        let mixed = |a: &[f64], b: &[f64], p: &[f64]| -> (Vec<f64>, Vec<f64>) {
            let pa = r * d;
            let pb = (d + 1) * r;
            ((0..pa).map(|i| (0..e).map(|ex| p[ex] * a[ex * pa + i]).sum()).collect(),
             (0..pb).map(|i| (0..e).map(|ex| p[ex] * b[ex * pb + i]).sum()).collect())
        };
        let ids = vec![0i32; t];
        let ones = vec![1.0; t];
        let loss = |a: &[f64], b: &[f64], p: &[f64]| {
            let (am, bm) = mixed(a, b, p);
            dot(&dy, &lora_forward(&x, &am, &bm, &one, &ids, &ones, 1, 0.7).unwrap())
        };
        let (am, bm) = mixed(&a, &b, &p);
        let gm = lora_backward(&x, &am, &bm, &one, &ids, &ones, 1, 0.7, &dy).unwrap();
        let (da, db, dpm) = mix_backward(&a, &b, &shape, &p, &gm.da, &gm.db).unwrap();
        check("SAML dA", &da, &fd(&|v| loss(v, &b, &p), &a))?;
        check("SAML dB", &db, &fd(&|v| loss(&a, v, &p), &b))?;
        check("SAML dp", &dpm, &fd(&|v| loss(&a, &b, v), &p))?;

        // Balance losses.
        let ids: Vec<i32> = (0..t).map(|tok| (tok % e) as i32).collect();
        let (_, gs) = switch_balance_loss(&l, e, &ids).unwrap();
        check("switch dL/dp", &gs, &fd(&|v| switch_balance_loss(v, e, &ids).unwrap().0, &l))?;
        let (_, gcv) = cv_balance_loss(&l, e).unwrap();
        check("cv dL/dw", &gcv, &fd(&|v| cv_balance_loss(v, e).unwrap().0, &l))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The input-dependent threshold's parameters and input, and dx through a frozen base.
    #[test]
    fn input_threshold_and_base_gradients(t in 1usize..5, d_in in 1usize..7, d_out in 1usize..5,
                                          e in 1usize..9, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let x = rng.values_f64(t * d_in, 1.0);
        let w = rng.values_f64(d_in, 1.0);
        let b = rng.uniform() - 0.5;
        let dtau = rng.values_f64(t, 1.0);
        let taus = |x: &[f64], w: &[f64], b: f64| -> Vec<f64> {
            (0..t)
                .map(|tok| {
                    let z = dot(&x[tok * d_in..(tok + 1) * d_in], w) + b;
                    1.0 / (1.0 + (-z).exp()) / e as f64
                })
                .collect()
        };
        let (dw, db, dx) = input_threshold_backward(&x, &w, b, e, &dtau).unwrap();
        check("τ(x) dw", &dw, &fd(&|v| dot(&dtau, &taus(&x, v, b)), &w))?;
        check("τ(x) db", &[db], &fd(&|v| dot(&dtau, &taus(&x, &w, v[0])), &[b]))?;
        check("τ(x) dx", &dx, &fd(&|v| dot(&dtau, &taus(v, &w, b)), &x))?;

        let w0 = rng.values_f64(d_out * d_in, 1.0);
        let dy = rng.values_f64(t * d_out, 1.0);
        let base = |x: &[f64]| -> Vec<f64> {
            (0..t * d_out)
                .map(|k| dot(&x[(k / d_out) * d_in..(k / d_out + 1) * d_in], &w0[(k % d_out) * d_in..(k % d_out + 1) * d_in]))
                .collect()
        };
        let dxb = base_backward_dx(&dy, &w0, d_in, d_out).unwrap();
        check("base dx", &dxb, &fd(&|v| dot(&dy, &base(v)), &x))?;
    }
}

#[test]
fn backward_rejects_bad_input() {
    let shape = LoraShape::new(2, 1, 3, 2).unwrap();
    let x = vec![0.0f64; 6];
    let a = vec![0.0f64; shape.a_len()];
    let b = vec![0.0f64; shape.b_len()];
    assert!(matches!(
        lora_backward(&x, &a, &b, &shape, &[0, 2], &[1.0, 1.0], 1, 1.0, &[0.0; 4]),
        Err(molora::Error::ExpertIdOutOfRange {
            token: 1,
            slot: 0,
            id: 2,
            num_experts: 2
        })
    ));
    assert!(matches!(
        lora_backward(&x, &a, &b, &shape, &[0, 1], &[1.0, 1.0], 1, 1.0, &[0.0; 3]),
        Err(molora::Error::LengthMismatch {
            what: "dy [T, d_out]",
            expected: 4,
            got: 3
        })
    ));
    assert!(matches!(
        gate_backward(&[0.5f64; 4], 2, &[0, 1], 1, None, true, &[1.0]),
        Err(molora::Error::LengthMismatch {
            what: "dw [T, k_max]",
            expected: 2,
            got: 1
        })
    ));
}
