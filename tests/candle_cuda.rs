//! The candle custom ops on candle's CUDA backend (feature `candle-cuda`) against the same ops on
//! candle's CPU backend, whose `cpu_fwd` and backward are molora's CPU reference: forward values and
//! the gradients candle's autograd gives through each op, over odd shapes, skewed and empty
//! routings and every dtype; then the three demos end to end on the GPU.
//!
//! A build with `candle-cuda` links the CUDA libraries, so these binaries start only where they are
//! installed; without a GPU device every test prints a skip line (and fails instead under
//! `MOLORA_REQUIRE_GPU=1`).
#![cfg(feature = "candle-cuda")]

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use molora::candle::ops::{
    host_f32, mole_lora, quant_linear, routed_lora, threshold_gate, top_k_gate, weight_space_lora,
    QuantWeight, RoutedGate,
};
use molora::testing::{cases, compare, gpu_only, Tolerance};
use molora::Rng;
use proptest::prelude::*;

/// candle's CUDA device 0, or `None` after the shared helper printed why the test is skipped.
fn cuda(test: &str) -> Option<Device> {
    gpu_only(test, "candle's CUDA backend")?;
    Some(Device::new_cuda(0).expect("molora opened GPU 0 but candle could not"))
}

fn randn(rng: &mut Rng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * scale).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn tol(dt: DType) -> Tolerance {
    Tolerance::for_dtype(match dt {
        DType::F16 => molora::DType::F16,
        DType::BF16 => molora::DType::BF16,
        _ => molora::DType::F32,
    })
}

/// Compares a CUDA result with the CPU one, the message naming the index and both values.
fn check(what: &str, gpu: &Tensor, cpu: &Tensor, tol: Tolerance) -> Result<(), TestCaseError> {
    let (g, c) = (host_f32(gpu).unwrap(), host_f32(cpu).unwrap());
    compare(what, &g, &c, tol).map_err(TestCaseError::fail)
}

/// Router probabilities `[T, E]` (softmax rows), with exact ties in `ties` of the rows.
fn probs(rng: &mut Rng, t: usize, e: usize, ties: bool) -> Tensor {
    let z = randn(rng, &[t, e], 2.0);
    let z = if ties {
        (z * 2.0).unwrap().round().unwrap()
    } else {
        z
    };
    candle_nn::ops::softmax_last_dim(&z).unwrap()
}

/// Dense gate weights `[T, E]`: top-`k` of softmax rows, with every `empty_every`-th token (when
/// non-zero) routed nowhere, and a skewed routing sending most tokens to expert 0.
fn gate_weights(
    rng: &mut Rng,
    t: usize,
    e: usize,
    k: usize,
    empty_every: usize,
    skew: bool,
) -> Tensor {
    let mut w = vec![0.0f32; t * e];
    for tok in 0..t {
        if empty_every > 0 && tok % empty_every == 0 {
            continue;
        }
        let mut ids: Vec<usize> = (0..e).collect();
        for i in (1..e).rev() {
            ids.swap(i, (rng.uniform() * (i + 1) as f64) as usize % (i + 1));
        }
        if skew && rng.uniform() < 0.8 {
            let at = ids.iter().position(|&x| x == 0).unwrap();
            ids.swap(0, at);
        }
        for &ex in ids.iter().take(k) {
            w[tok * e + ex] = rng.uniform() as f32 + 0.05;
        }
    }
    Tensor::from_vec(w, (t, e), &Device::Cpu).unwrap()
}

/// Runs `f` on variables copied to `dev` and returns its output and the gradients of
/// `Σ out·g` (a fixed random `g`) with respect to each variable.
fn forward_and_grads(
    dev: &Device,
    inputs: &[&Tensor],
    g: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let g = g.to_device(dev).unwrap().to_dtype(out.dtype()).unwrap();
    let loss = (out.to_dtype(DType::F32).unwrap() * g.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("no gradient").clone())
        .collect();
    (out, gs)
}

#[derive(Debug, Clone)]
struct LoraCase {
    t: usize,
    e: usize,
    r: usize,
    k: usize,
    d_in: usize,
    d_out: usize,
    dtype: DType,
    empty_every: usize,
    skew: bool,
    seed: u64,
}

fn lora_case() -> impl Strategy<Value = LoraCase> {
    (
        0usize..40,
        1usize..9,
        1usize..17,
        1usize..70,
        1usize..70,
        prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        prop_oneof![Just(0usize), Just(1usize), Just(3usize)],
        any::<bool>(),
        any::<u64>(),
    )
        .prop_flat_map(|(t, e, r, d_in, d_out, dtype, empty_every, skew, seed)| {
            (1..=e).prop_map(move |k| LoraCase {
                t,
                e,
                r,
                k,
                d_in,
                d_out,
                dtype,
                empty_every,
                skew,
                seed,
            })
        })
}

fn run_lora_case(c: &LoraCase, gpu: &Device) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(c.seed);
    let x = randn(&mut rng, &[c.t, c.d_in], 1.0)
        .to_dtype(c.dtype)
        .unwrap();
    let a = randn(&mut rng, &[c.e, c.r, c.d_in], 0.3)
        .to_dtype(c.dtype)
        .unwrap();
    let b = randn(&mut rng, &[c.e, c.d_out, c.r], 0.3)
        .to_dtype(c.dtype)
        .unwrap();
    let w = gate_weights(&mut rng, c.t, c.e, c.k, c.empty_every, c.skew);
    let g = randn(&mut rng, &[c.t, c.d_out], 1.0);
    let scale = 2.0 / c.r as f32;
    let f = |v: &[Tensor]| mole_lora(&v[0], &v[1], &v[2], &v[3], scale).unwrap();
    let inputs = [&x, &a, &b, &w];
    let (y_cpu, g_cpu) = forward_and_grads(&Device::Cpu, &inputs, &g, &f);
    let (y_gpu, g_gpu) = forward_and_grads(gpu, &inputs, &g, &f);
    prop_assert_eq!(y_gpu.dtype(), c.dtype);
    let t = tol(c.dtype);
    let red = |n: usize| ((n.max(1)) as f32).sqrt() * 2.0;
    check("Δy", &y_gpu, &y_cpu, t.scaled(red(c.d_in.max(c.r))))?;
    check("dx", &g_gpu[0], &g_cpu[0], t.scaled(red(c.d_out * c.k)))?;
    check("dA", &g_gpu[1], &g_cpu[1], t.scaled(red(c.t * c.d_out)))?;
    check("dB", &g_gpu[2], &g_cpu[2], t.scaled(red(c.t * c.r)))?;
    check("dw", &g_gpu[3], &g_cpu[3], t.scaled(red(c.d_out * c.r)))?;
    // Tokens routed nowhere get exactly zero.
    if c.empty_every > 0 && c.t > 0 {
        let y = host_f32(&y_gpu).unwrap();
        prop_assert!(
            y[..c.d_out].iter().all(|&v| v == 0.0),
            "token 0 is unrouted but Δy ≠ 0"
        );
    }
    Ok(())
}

#[test]
fn mole_lora_on_cuda_matches_cpu() {
    let Some(gpu) = cuda("mole_lora_on_cuda_matches_cpu") else {
        return;
    };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(48),
        ..ProptestConfig::default()
    });
    runner
        .run(&lora_case(), |c| run_lora_case(&c, &gpu))
        .unwrap();
}

#[test]
fn mole_lora_on_cuda_names_the_columns_it_cannot_take() {
    let Some(gpu) = cuda("mole_lora_on_cuda_names_the_columns_it_cannot_take") else {
        return;
    };
    let (e, r) = (9, 64); // E·r = 576 > 512
    let x = Tensor::zeros((2, 8), DType::F32, &gpu).unwrap();
    let a = Tensor::zeros((e, r, 8), DType::F32, &gpu).unwrap();
    let b = Tensor::zeros((e, 8, r), DType::F32, &gpu).unwrap();
    let w = Tensor::zeros((2, e), DType::F32, &gpu).unwrap();
    let err = mole_lora(&x, &a, &b, &w, 1.0).unwrap_err().to_string();
    assert!(err.contains("576"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), ..ProptestConfig::default() })]

    /// Top-k and threshold gates over probabilities (with ties), forward and `dp`/`dτ`.
    #[test]
    fn gates_on_cuda_match_cpu(
        t in 0usize..40,
        e in 1usize..20,
        k_frac in 0.0f32..1.0,
        renormalize in any::<bool>(),
        ties in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = cuda("gates_on_cuda_match_cpu") else { return Ok(()); };
        let mut rng = Rng::new(seed);
        let p = probs(&mut rng, t, e, ties);
        let g = randn(&mut rng, &[t, e], 1.0);
        let k = 1 + ((e - 1) as f32 * k_frac) as usize;
        let f32_tol = tol(DType::F32).scaled(4.0);

        let topk = |v: &[Tensor]| top_k_gate(&v[0], k, renormalize).unwrap();
        let (w_cpu, d_cpu) = forward_and_grads(&Device::Cpu, &[&p], &g, &topk);
        let (w_gpu, d_gpu) = forward_and_grads(&gpu, &[&p], &g, &topk);
        check("top-k w", &w_gpu, &w_cpu, f32_tol)?;
        check("top-k dp", &d_gpu[0], &d_cpu[0], f32_tol)?;

        // τ around 1/E, so that some tokens keep several experts and some fall back to the arg-max.
        let tau = (randn(&mut rng, &[t], 0.3).exp().unwrap() / e as f64).unwrap();
        let thr = |v: &[Tensor]| threshold_gate(&v[0], &v[1]).unwrap();
        let (w_cpu, d_cpu) = forward_and_grads(&Device::Cpu, &[&p, &tau], &g, &thr);
        let (w_gpu, d_gpu) = forward_and_grads(&gpu, &[&p, &tau], &g, &thr);
        check("threshold w", &w_gpu, &w_cpu, f32_tol)?;
        check("threshold dp", &d_gpu[0], &d_cpu[0], f32_tol)?;
        check("threshold dτ", &d_gpu[1], &d_cpu[1], f32_tol.scaled((e as f32).sqrt()))?;
    }

    /// The quantised base (NF4 and int8) in every dtype, forward and `dx`.
    #[test]
    fn quant_linear_on_cuda_matches_cpu(
        t in 0usize..24,
        rows in 1usize..70,
        cols_blocks in 1usize..4,
        nf4 in any::<bool>(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        seed in any::<u64>(),
    ) {
        let Some(gpu) = cuda("quant_linear_on_cuda_matches_cpu") else { return Ok(()); };
        let mut rng = Rng::new(seed);
        let cols = 64 * cols_blocks;
        let wv = host_f32(&randn(&mut rng, &[rows, cols], 0.5)).unwrap();
        let qw = Arc::new(if nf4 {
            QuantWeight::Nf4(molora::cpu::quantize_nf4(&wv, rows, cols).unwrap())
        } else {
            QuantWeight::Int8(molora::cpu::quantize_int8(&wv, rows, cols).unwrap())
        });
        let x = randn(&mut rng, &[t, cols], 1.0).to_dtype(dtype).unwrap();
        let g = randn(&mut rng, &[t, rows], 1.0);
        let f = |v: &[Tensor]| quant_linear(&v[0], &qw).unwrap();
        let (y_cpu, d_cpu) = forward_and_grads(&Device::Cpu, &[&x], &g, &f);
        let (y_gpu, d_gpu) = forward_and_grads(&gpu, &[&x], &g, &f);
        prop_assert_eq!(y_gpu.dtype(), dtype);
        let t_ = tol(dtype).scaled((cols as f32).sqrt());
        check("y", &y_gpu, &y_cpu, t_)?;
        check("dx", &d_gpu[0], &d_cpu[0], tol(dtype).scaled((rows as f32).sqrt() * 2.0))?;
    }

    /// SAML's weight-space mixture (f32), forward and the gradients to x, A, B and p.
    #[test]
    fn weight_space_lora_on_cuda_matches_cpu(
        s in 0usize..5,
        l in 1usize..9,
        e in 1usize..6,
        r in 1usize..5,
        d_in in 1usize..40,
        d_out in 1usize..40,
        seed in any::<u64>(),
    ) {
        let Some(gpu) = cuda("weight_space_lora_on_cuda_matches_cpu") else { return Ok(()); };
        let mut rng = Rng::new(seed);
        let x = randn(&mut rng, &[s, l, d_in], 1.0);
        let a = randn(&mut rng, &[e, r, d_in], 0.3);
        let b = randn(&mut rng, &[e, d_out, r], 0.3);
        let p = probs(&mut rng, s, e, false);
        let g = randn(&mut rng, &[s, l, d_out], 1.0);
        let f = |v: &[Tensor]| weight_space_lora(&v[0], &v[1], &v[2], &v[3], 0.5).unwrap();
        let (y_cpu, d_cpu) = forward_and_grads(&Device::Cpu, &[&x, &a, &b, &p], &g, &f);
        let (y_gpu, d_gpu) = forward_and_grads(&gpu, &[&x, &a, &b, &p], &g, &f);
        let t_ = tol(DType::F32).scaled(((d_in + d_out) as f32).sqrt() * 2.0);
        check("y", &y_gpu, &y_cpu, t_)?;
        for (i, name) in ["dx", "dA", "dB", "dp"].iter().enumerate() {
            check(name, &d_gpu[i], &d_cpu[i], t_.scaled(((s * l).max(1) as f32).sqrt()))?;
        }
    }
}

/// `routed_lora` (the gate's slots straight to the LoRA part; what `MoleLinear` runs) on CUDA
/// against the CPU, forward and the gradients to x, the packed experts, p and τ: every gate, every
/// dtype, E·r past the dense-gated path's 512 columns (the segmented path) included.
#[test]
fn routed_lora_on_cuda_matches_cpu() {
    let Some(gpu) = cuda("routed_lora_on_cuda_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(77);
    for &(t, e, r, d_in, d_out) in &[
        (37usize, 5usize, 4usize, 33usize, 29usize),
        (3, 40, 16, 64, 48),
        (0, 2, 2, 8, 8),
    ] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for gate in [
                RoutedGate::TopK {
                    k: 2,
                    renormalize: true,
                },
                RoutedGate::Threshold,
                RoutedGate::Dense,
            ] {
                let shape = molora::LoraShape::new(e, r, d_in, d_out).unwrap();
                let x = randn(&mut rng, &[t, d_in], 1.0).to_dtype(dtype).unwrap();
                let ab = randn(&mut rng, &[shape.a_len() + shape.b_len()], 0.3)
                    .to_dtype(dtype)
                    .unwrap();
                let p = probs(&mut rng, t, e, false);
                let tau = Tensor::full(0.5f32 / e as f32, t, &Device::Cpu).unwrap();
                let g = randn(&mut rng, &[t, d_out], 1.0);
                let with_tau = gate == RoutedGate::Threshold;
                let f = |v: &[Tensor]| {
                    routed_lora(
                        &v[0],
                        &v[1],
                        shape,
                        &v[2],
                        with_tau.then(|| &v[3]),
                        gate,
                        0.5,
                    )
                    .unwrap()
                };
                // τ only where the gate reads it (every input must receive a gradient).
                let inputs: Vec<&Tensor> = if with_tau {
                    vec![&x, &ab, &p, &tau]
                } else {
                    vec![&x, &ab, &p]
                };
                let (y_cpu, d_cpu) = forward_and_grads(&Device::Cpu, &inputs, &g, &f);
                let (y_gpu, d_gpu) = forward_and_grads(&gpu, &inputs, &g, &f);
                let what = format!("T {t} E {e} r {r} {dtype:?} {gate:?}");
                let t_ = tol(dtype).scaled(((d_in + d_out + e * r) as f32).sqrt() * 2.0);
                let run = || -> Result<(), TestCaseError> {
                    check("y", &y_gpu, &y_cpu, t_)?;
                    for (i, name) in ["dx", "d[A;B]", "dp", "dτ"]
                        .iter()
                        .enumerate()
                        .take(if with_tau { 4 } else { 3 })
                    {
                        check(
                            name,
                            &d_gpu[i],
                            &d_cpu[i],
                            t_.scaled((t.max(1) as f32).sqrt()),
                        )?;
                    }
                    Ok(())
                };
                if let Err(m) = run() {
                    panic!("{what}: {m}");
                }
            }
        }
    }
}

#[test]
fn hdmole_demo_trains_on_cuda_and_beats_the_base() {
    use molora::demo::hdmole::{run_hdmole_demo, HdmoleDemoConfig};
    use molora::demo::DemoDevice;
    if cuda("hdmole_demo_trains_on_cuda_and_beats_the_base").is_none() {
        return;
    }
    let cfg = HdmoleDemoConfig {
        device: DemoDevice::Cuda(0),
        ..HdmoleDemoConfig::tiny()
    };
    let report = run_hdmole_demo(&cfg, None, &mut |_| {}).unwrap();
    let table = report.to_markdown();
    let base = &report.rows[0];
    let hd = report.rows.iter().find(|r| r.name == "HDMoLE").unwrap();
    assert!(
        hd.mean_accent_error() < base.mean_accent_error(),
        "HDMoLE {:.1}% vs base {:.1}% mean accent error on CUDA\n{table}",
        hd.mean_accent_error(),
        base.mean_accent_error()
    );
}

#[test]
fn saml_and_lorb_demos_train_on_cuda_and_beat_their_baselines() {
    use molora::demo::lorb::{run_lorb_demo, LorbDemoConfig};
    use molora::demo::saml::{run_saml_demo, SamlDemoConfig};
    use molora::demo::DemoDevice;
    if cuda("saml_and_lorb_demos_train_on_cuda_and_beat_their_baselines").is_none() {
        return;
    }
    let saml = run_saml_demo(
        &SamlDemoConfig {
            device: DemoDevice::Cuda(0),
            ..SamlDemoConfig::tiny()
        },
        &mut |_| {},
    )
    .unwrap();
    let table = saml.to_markdown();
    let overall = saml.rows.last().unwrap();
    assert!(
        overall.quantised_saml < overall.quantised,
        "SAML {:.1}% vs quantised {:.1}% token error on CUDA\n{table}",
        overall.quantised_saml,
        overall.quantised
    );
    let lorb = run_lorb_demo(
        &LorbDemoConfig {
            device: DemoDevice::Cuda(0),
            ..LorbDemoConfig::tiny()
        },
        &mut |_| {},
    )
    .unwrap();
    let md = lorb.to_markdown();
    let first = lorb.row("first pass").unwrap().wer;
    let ours = lorb.row("LoRB (MWER)").unwrap().wer;
    assert!(
        ours < first,
        "LoRB WER {ours:.2}% vs first pass {first:.2}% on CUDA\n{md}"
    );
}
