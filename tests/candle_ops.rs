//! The candle custom ops against the same computation written with candle's own tensor ops: the
//! forward values and the gradients candle's autograd gives through our ops (our backward) must equal
//! the gradients candle's autograd gives through its native ops.
#![cfg(feature = "candle")]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use molora::candle::ops::{
    mole_lora, quant_linear, routed_lora, threshold_gate, top_k_gate, weight_space_lora,
    QuantWeight, RoutedGate,
};
use molora::Rng;

fn randn(rng: &mut Rng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * scale).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    molora::candle::ops::host_f32(t).unwrap()
}

/// `|a − b| ≤ atol + rtol·|b|` elementwise, printing the first index that fails.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
    let (av, bv) = (host(a), host(b));
    assert_eq!(av.len(), bv.len(), "{what}: lengths differ");
    for (i, (&x, &y)) in av.iter().zip(&bv).enumerate() {
        assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "{what}[{i}]: ours {x} vs reference {y}"
        );
    }
}

/// `Δy = s·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ` with candle ops only.
fn lora_reference(x: &Tensor, a: &Tensor, b: &Tensor, w: &Tensor, s: f64) -> Tensor {
    let e = a.dims()[0];
    let mut acc: Option<Tensor> = None;
    for ex in 0..e {
        let ae = a.get(ex).unwrap(); // [r, d_in]
        let be = b.get(ex).unwrap(); // [d_out, r]
        let h = x.matmul(&ae.t().unwrap()).unwrap(); // [T, r]
        let y = h.matmul(&be.t().unwrap()).unwrap(); // [T, d_out]
        let we = w.narrow(1, ex, 1).unwrap(); // [T, 1]
        let term = y.broadcast_mul(&we).unwrap();
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term).unwrap(),
        });
    }
    (acc.unwrap() * s).unwrap()
}

#[test]
fn mole_lora_forward_and_gradients_match_candle_autograd() {
    let mut rng = Rng::new(11);
    // Odd sizes; w has zeros (unused experts) and a fully dense row.
    for &(t, d_in, d_out, e, r) in &[
        (7usize, 13usize, 9usize, 3usize, 4usize),
        (1, 5, 3, 1, 1),
        (9, 16, 24, 4, 8),
    ] {
        let x = Var::from_tensor(&randn(&mut rng, &[t, d_in], 1.0)).unwrap();
        let a = Var::from_tensor(&randn(&mut rng, &[e, r, d_in], 0.5)).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[e, d_out, r], 0.5)).unwrap();
        let mut wv: Vec<f32> = (0..t * e).map(|_| rng.uniform() as f32).collect();
        for (i, v) in wv.iter_mut().enumerate() {
            if i % 3 == 1 && i >= e {
                *v = 0.0;
            }
        }
        let w = Var::from_tensor(&Tensor::from_vec(wv, (t, e), &Device::Cpu).unwrap()).unwrap();
        let dy = randn(&mut rng, &[t, d_out], 1.0);
        let s = 2.0f32;

        let ours = mole_lora(&x, &a, &b, &w, s).unwrap();
        let reference = lora_reference(&x, &a, &b, &w, s as f64);
        assert_close("forward", &ours, &reference, 1e-5, 1e-5);

        let g_ours = (ours * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (reference * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("dx", &x), ("dA", &a), ("dB", &b), ("dw", &w)] {
            let go = g_ours
                .get(v)
                .unwrap_or_else(|| panic!("{name}: no gradient through our op"));
            let gr = g_ref.get(v).unwrap();
            assert_close(name, go, gr, 1e-4, 1e-4);
        }
    }
}

#[test]
fn mole_lora_half_dtypes_round_once() {
    let mut rng = Rng::new(5);
    let (t, d_in, d_out, e, r) = (6, 11, 7, 2, 3);
    let x = randn(&mut rng, &[t, d_in], 1.0);
    let a = randn(&mut rng, &[e, r, d_in], 0.5);
    let b = randn(&mut rng, &[e, d_out, r], 0.5);
    let w = Tensor::from_vec(vec![0.5f32; t * e], (t, e), &Device::Cpu).unwrap();
    let full = mole_lora(&x, &a, &b, &w, 1.0).unwrap();
    for (dt, tol) in [(DType::F16, 4e-3f32), (DType::BF16, 3e-2)] {
        let half = mole_lora(
            &x.to_dtype(dt).unwrap(),
            &a.to_dtype(dt).unwrap(),
            &b.to_dtype(dt).unwrap(),
            &w,
            1.0,
        )
        .unwrap();
        assert_eq!(half.dtype(), dt);
        assert_close(&format!("{dt:?}"), &half, &full, tol, tol);
    }
}

#[test]
fn gates_match_candle_autograd_through_native_ops() {
    let mut rng = Rng::new(23);
    let (t, e) = (8usize, 5usize);
    let logits = randn(&mut rng, &[t, e], 1.5);
    let p = Var::from_tensor(&candle_nn::ops::softmax_last_dim(&logits).unwrap()).unwrap();
    let pv = host(&p);
    let dw = randn(&mut rng, &[t, e], 1.0);

    // Top-2, renormalised: w = p⊙m / Σ p⊙m with the mask m of the kept experts.
    let ours = top_k_gate(&p, 2, true).unwrap();
    let mut mask = vec![0.0f32; t * e];
    for tok in 0..t {
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&i, &j| pv[tok * e + j].total_cmp(&pv[tok * e + i]).then(i.cmp(&j)));
        for &ex in &order[..2] {
            mask[tok * e + ex] = 1.0;
        }
    }
    let m = Tensor::from_vec(mask, (t, e), &Device::Cpu).unwrap();
    let kept = (p.as_tensor() * &m).unwrap();
    let reference = kept.broadcast_div(&kept.sum_keepdim(1).unwrap()).unwrap();
    assert_close("top-k forward", &ours, &reference, 1e-6, 1e-5);
    let go = (ours * &dw).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (reference * &dw)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "top-k dp",
        go.get(&p).unwrap(),
        gr.get(&p).unwrap(),
        1e-5,
        1e-4,
    );

    // Learned threshold τ = σ(θ)/E, away from the edges: every row keeps at least one expert and
    // no probability sits within 1e-3 of τ (the test skips rows that would).
    let theta = Var::new(&[0.3f32], &Device::Cpu).unwrap();
    let tau = (candle_nn::ops::sigmoid(theta.as_tensor()).unwrap() / e as f64)
        .unwrap()
        .broadcast_as(t)
        .unwrap()
        .contiguous()
        .unwrap();
    let tau_v = host(&tau)[0];
    let mut mask = vec![0.0f32; t * e];
    let mut row_ok = vec![0.0f32; t];
    for tok in 0..t {
        let row = &pv[tok * e..(tok + 1) * e];
        let kept = row.iter().filter(|&&v| v >= tau_v).count();
        let near = row.iter().any(|&v| (v - tau_v).abs() < 1e-3);
        if kept > 0 && !near {
            row_ok[tok] = 1.0;
            for ex in 0..e {
                if row[ex] >= tau_v {
                    mask[tok * e + ex] = 1.0;
                }
            }
        }
    }
    assert!(row_ok.iter().sum::<f32>() >= 4.0, "too few usable rows");
    let m = Tensor::from_vec(mask, (t, e), &Device::Cpu).unwrap();
    let ok = Tensor::from_vec(row_ok, (t, 1), &Device::Cpu).unwrap();
    let ours = threshold_gate(&p, &tau)
        .unwrap()
        .broadcast_mul(&ok)
        .unwrap();
    let diff = (p
        .as_tensor()
        .broadcast_sub(&tau.reshape((t, 1)).unwrap())
        .unwrap()
        * &m)
        .unwrap();
    let z = (diff.sum_keepdim(1).unwrap() + (1.0 - &ok).unwrap()).unwrap();
    let reference = diff.broadcast_div(&z).unwrap().broadcast_mul(&ok).unwrap();
    assert_close("threshold forward", &ours, &reference, 1e-6, 1e-5);
    let go = (ours * &dw).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (reference * &dw)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "threshold dp",
        go.get(&p).unwrap(),
        gr.get(&p).unwrap(),
        1e-5,
        1e-4,
    );
    assert_close(
        "threshold dθ",
        go.get(&theta).unwrap(),
        gr.get(&theta).unwrap(),
        1e-5,
        1e-4,
    );
}

#[test]
fn quant_linear_matches_dequantised_matmul_and_its_gradient() {
    let mut rng = Rng::new(3);
    let (t, d_in, d_out) = (5usize, 70usize, 9usize);
    let w: Vec<f32> = (0..d_in * d_out).map(|_| rng.normal() as f32).collect();
    for q in [
        QuantWeight::Nf4(molora::cpu::quantize_nf4(&w, d_out, d_in).unwrap()),
        QuantWeight::Int8(molora::cpu::quantize_int8(&w, d_out, d_in).unwrap()),
    ] {
        let deq = Tensor::from_vec(q.dequantize(), (d_out, d_in), &Device::Cpu).unwrap();
        let q = Arc::new(q);
        let x = Var::from_tensor(&randn(&mut rng, &[t, d_in], 1.0)).unwrap();
        let ours = quant_linear(&x, &q).unwrap();
        let reference = x.matmul(&deq.t().unwrap()).unwrap();
        assert_close(q.format(), &ours, &reference, 1e-4, 1e-5);
        let dy = randn(&mut rng, &[t, d_out], 1.0);
        let go = (ours * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_close("dx", go.get(&x).unwrap(), gr.get(&x).unwrap(), 1e-4, 1e-4);
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_problem() {
    let x = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
    let a = Tensor::zeros((2, 2, 5), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((2, 6, 2), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    let e = mole_lora(&x, &a, &b, &w, 1.0).unwrap_err().to_string();
    assert!(e.contains("d_in"), "{e}");
    let p = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    let e = top_k_gate(&p, 3, true).unwrap_err().to_string();
    assert!(e.contains("k = 3"), "{e}");
    let e = top_k_gate(&p.to_dtype(DType::F16).unwrap(), 1, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("F16"), "{e}");
}

#[test]
fn errors_keep_their_type_through_candle() {
    // Raised inside the op's cpu_fwd (the crate's gate sees the NaN), carried through candle's
    // apply_op as a candle error, and given back as the same molora::Error.
    let nan = Tensor::new(&[[0.5f32, 0.5], [f32::NAN, 1.0]], &Device::Cpu).unwrap();
    let e = top_k_gate(&nan, 1, true).unwrap_err();
    assert!(
        matches!(e, molora::Error::NonFinite { index: 2, .. }),
        "{e:?}"
    );
    let p = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    let e = top_k_gate(&p.to_dtype(DType::F16).unwrap(), 1, true).unwrap_err();
    assert!(matches!(e, molora::Error::Unsupported { .. }), "{e:?}");
    let e = top_k_gate(&p, 3, true).unwrap_err();
    assert_eq!(
        e,
        molora::Error::InvalidK {
            k: 3,
            num_experts: 2
        }
    );

    // As a candle error: candle's message leads with ours, and from_candle finds it through
    // candle's context and path layers.
    let c = candle_core::Error::from(e.clone());
    assert!(c.to_string().starts_with(&e.to_string()), "{c}");
    let c = c.context("layer 3").with_path("model.safetensors");
    assert_eq!(molora::Error::from_candle(&c), Some(&e));
    assert_eq!(molora::Error::from(c), e);

    // candle's own errors stay candle's.
    let x = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
    let c = x.matmul(&p).unwrap_err();
    assert!(molora::Error::from_candle(&c).is_none());
    assert!(matches!(molora::Error::from(c), molora::Error::Candle(_)));
}

#[test]
fn weight_space_lora_matches_candle_autograd() {
    let mut rng = Rng::new(29);
    for &(s, l, d_in, d_out, e, r) in &[
        (3usize, 5usize, 7usize, 6usize, 4usize, 2usize),
        (1, 1, 3, 2, 1, 1),
        (2, 4, 9, 5, 3, 1),
    ] {
        let x = Var::from_tensor(&randn(&mut rng, &[s, l, d_in], 1.0)).unwrap();
        let a = Var::from_tensor(&randn(&mut rng, &[e, r, d_in], 0.5)).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &[e, d_out, r], 0.5)).unwrap();
        let logits = randn(&mut rng, &[s, e], 1.0);
        let p = Var::from_tensor(&candle_nn::ops::softmax_last_dim(&logits).unwrap()).unwrap();
        let scale = 4.0f32;
        let ours = weight_space_lora(&x, &a, &b, &p, scale).unwrap();
        // Ā = p·A, B̄ = p·B per sequence, then x·Āᵀ·B̄ᵀ as batched matmuls.
        let am = p
            .matmul(&a.reshape((e, r * d_in)).unwrap())
            .unwrap()
            .reshape((s, r, d_in))
            .unwrap();
        let bm = p
            .matmul(&b.reshape((e, d_out * r)).unwrap())
            .unwrap()
            .reshape((s, d_out, r))
            .unwrap();
        let h = x.matmul(&am.transpose(1, 2).unwrap()).unwrap();
        let reference = (h.matmul(&bm.transpose(1, 2).unwrap()).unwrap() * scale as f64).unwrap();
        assert_close("weight-space forward", &ours, &reference, 1e-5, 1e-5);
        let dy = randn(&mut rng, &[s, l, d_out], 1.0);
        let go = (ours * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("dx", &x), ("dA", &a), ("dB", &b), ("dp", &p)] {
            assert_close(name, go.get(v).unwrap(), gr.get(v).unwrap(), 1e-4, 1e-4);
        }
    }
}

/// The one-op road from probabilities (`routed_lora`: the gate's sparse slots straight to the LoRA
/// part) against the dense road (the gate op's `[T, E]` weights, then `mole_lora`): the same output
/// and the same gradients to `x`, the experts, `p` and `τ`, for every gate, in f32 and bf16.
#[test]
fn routed_lora_equals_the_gate_then_mole_lora() {
    let mut rng = Rng::new(21);
    for &(t, d_in, d_out, e, r) in &[(9usize, 13usize, 7usize, 5usize, 3usize), (1, 8, 16, 2, 1)] {
        for gate in [
            RoutedGate::TopK {
                k: 2,
                renormalize: true,
            },
            RoutedGate::TopK {
                k: 1,
                renormalize: false,
            },
            RoutedGate::Threshold,
            RoutedGate::Dense,
        ] {
            for dtype in [DType::F32, DType::BF16] {
                let x =
                    Var::from_tensor(&randn(&mut rng, &[t, d_in], 1.0).to_dtype(dtype).unwrap())
                        .unwrap();
                let a = randn(&mut rng, &[e, r, d_in], 0.5).to_dtype(dtype).unwrap();
                let b = randn(&mut rng, &[e, d_out, r], 0.5)
                    .to_dtype(dtype)
                    .unwrap();
                let ab = Var::from_tensor(
                    &Tensor::cat(&[a.flatten_all().unwrap(), b.flatten_all().unwrap()], 0).unwrap(),
                )
                .unwrap();
                let logits = randn(&mut rng, &[t, e], 2.0);
                let p = Var::from_tensor(
                    &candle_nn::ops::softmax(&logits, candle_core::D::Minus1).unwrap(),
                )
                .unwrap();
                let tau = Var::from_tensor(&Tensor::full(0.8 / e as f32, t, &Device::Cpu).unwrap())
                    .unwrap();
                let shape = molora::LoraShape::new(e, r, d_in, d_out).unwrap();
                let tau_in = (gate == RoutedGate::Threshold).then(|| tau.as_tensor());
                let ours = routed_lora(
                    x.as_tensor(),
                    ab.as_tensor(),
                    shape,
                    p.as_tensor(),
                    tau_in,
                    gate,
                    1.5,
                )
                .unwrap();
                let w = match gate {
                    RoutedGate::TopK { k, renormalize } => {
                        top_k_gate(p.as_tensor(), k, renormalize).unwrap()
                    }
                    RoutedGate::Threshold => {
                        threshold_gate(p.as_tensor(), tau.as_tensor()).unwrap()
                    }
                    RoutedGate::Dense => p.as_tensor().clone(),
                };
                let a_v = ab
                    .as_tensor()
                    .narrow(0, 0, shape.a_len())
                    .unwrap()
                    .reshape((e, r, d_in))
                    .unwrap();
                let b_v = ab
                    .as_tensor()
                    .narrow(0, shape.a_len(), shape.b_len())
                    .unwrap()
                    .reshape((e, d_out, r))
                    .unwrap();
                let want = mole_lora(x.as_tensor(), &a_v, &b_v, &w, 1.5).unwrap();
                let what = format!("{gate:?} {dtype:?} T={t}");
                let (atol, rtol) = if dtype == DType::F32 {
                    (1e-5, 1e-5)
                } else {
                    (1e-2, 1e-2)
                };
                assert_close(&format!("{what}: y"), &ours, &want, atol, rtol);
                // A random linear functional of the output, so every gradient is exercised.
                let probe = randn(&mut rng, &[t, d_out], 1.0).to_dtype(dtype).unwrap();
                let g1 = (ours * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g2 = (want * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let mut checked = vec![
                    ("x", x.as_tensor()),
                    ("experts", ab.as_tensor()),
                    ("p", p.as_tensor()),
                ];
                if gate == RoutedGate::Threshold {
                    checked.push(("tau", tau.as_tensor()));
                }
                for (name, v) in checked {
                    let (d1, d2) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                    assert_close(
                        &format!("{what}: d{name}"),
                        d1,
                        d2,
                        atol * 10.0,
                        rtol * 10.0,
                    );
                }
            }
        }
    }
    // A threshold gate needs its thresholds; a top-k larger than E is an error naming k.
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let shape = molora::LoraShape::new(2, 1, 4, 3).unwrap();
    let ab = Tensor::zeros(shape.a_len() + shape.b_len(), DType::F32, &Device::Cpu).unwrap();
    let p = Tensor::full(0.5f32, (2, 2), &Device::Cpu).unwrap();
    assert!(routed_lora(&x, &ab, shape, &p, None, RoutedGate::Threshold, 1.0).is_err());
    let e = routed_lora(
        &x,
        &ab,
        shape,
        &p,
        None,
        RoutedGate::TopK {
            k: 3,
            renormalize: false,
        },
        1.0,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains('3'), "{e}");
}
