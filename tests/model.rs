//! Model level: MoleLinear against the CPU reference composed by hand, training, save/load, PEFT
//! experts, and the HDMoLE demo end to end at a small size.
#![cfg(feature = "candle")]

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use molora::cpu::{self, Activation, DenseBase, Experts, Gate, RouterWeights, ThresholdSpec};
use molora::demo::hdmole::{run_hdmole_demo, HdmoleDemoConfig};
use molora::model::linear::{Combine, Ctx, GateMode, MoleConfig, MoleLinear, ThresholdMode};
use molora::model::weights::{load_peft_adapter, load_tensors, save_tensors};
use molora::testing::{assert_close, Tolerance};
use molora::Rng;
use molora::{LoraShape, Segments, SeqRouting};

fn host(t: &Tensor) -> Vec<f32> {
    molora::candle::ops::host_f32(t).unwrap()
}

fn saved(layer: &MoleLinear) -> BTreeMap<String, Tensor> {
    let mut tensors = BTreeMap::new();
    let mut layers = serde_json::Map::new();
    layer.save_experts(&mut tensors, &mut layers).unwrap();
    tensors
}

/// Gives the layer's B (zero at init) random values, so the experts change the output.
fn randomise_b(layer: &mut MoleLinear, rng: &mut Rng) {
    let mut t = saved(layer);
    let b = t.get("l.lora_B").unwrap();
    let n = b.elem_count();
    let v: Vec<f32> = rng.values(n, 0.5);
    let nb = Tensor::from_vec(v, b.dims(), &Device::Cpu).unwrap();
    t.insert("l.lora_B".into(), nb);
    layer.load_experts(&t, "test").unwrap();
}

/// The layer's output against `cpu::route` + `cpu::mole_forward` on the same weights.
fn check_against_cpu(
    cfg: MoleConfig,
    gate: Gate,
    hierarchy: Option<(&SeqRouting, cpu::HierarchicalCombine)>,
    global: Option<&Tensor>,
) {
    let (t, d_in, d_out) = (9usize, 13usize, 7usize);
    let mut rng = Rng::new(17);
    let mut layer = MoleLinear::new("l", d_in, d_out, true, &mut rng, &Device::Cpu).unwrap();
    layer.add_experts(cfg, &mut rng).unwrap();
    randomise_b(&mut layer, &mut rng);
    let xv: Vec<f32> = rng.values(t * d_in, 1.0);
    let x = Tensor::from_vec(xv.clone(), (t, d_in), &Device::Cpu).unwrap();
    let y = layer
        .forward_ctx(
            &x,
            &mut Ctx {
                global,
                rng: None,
                seq_probs: None,
            },
        )
        .unwrap();
    let routed = layer.last_routing();

    let w = saved(&layer);
    let w0 = host(&layer.weight().unwrap());
    let bias = host(layer.bias().unwrap());
    let a = host(&w["l.lora_A"]);
    let b = host(&w["l.lora_B"]);
    let e = cfg.num_experts;
    let shape = LoraShape::new(e, cfg.rank, d_in, d_out).unwrap();
    let routing = match cfg.gate {
        GateMode::Single => cpu::dense(&vec![1.0; t], t, 1).unwrap(),
        _ => {
            let w_g = host(&w["l.router.weight"]);
            let b_g = host(&w["l.router.bias"]);
            let router = RouterWeights {
                w_g: &w_g,
                b_g: Some(&b_g),
                activation: Activation::Softmax,
                temperature: cfg.temperature,
            };
            cpu::route(&xv, t, d_in, e, &router, hierarchy, &gate).unwrap()
        }
    };
    let experts = Experts::new(&a, &b, shape, cfg.scale()).unwrap();
    let base = DenseBase {
        weight: &w0,
        bias: Some(&bias),
    };
    let want = cpu::mole_forward(&xv, t, &base.into(), &experts, &routing).unwrap();
    assert_close(
        "MoleLinear vs cpu::mole_forward",
        &host(&y),
        &want,
        Tolerance::for_dtype(molora::DType::F32).scaled(10.0),
    );
    if let Some(r) = routed {
        // The dense weights the layer used are the CPU routing's.
        let mut dense = vec![0.0f32; t * e];
        for tok in 0..t {
            for s in 0..routing.k_max() {
                let id = routing.id(tok, s);
                if id >= 0 {
                    dense[tok * e + id as usize] += routing.weight(tok, s);
                }
            }
        }
        assert_close(
            "gate weights",
            &host(&r.weights().unwrap()),
            &dense,
            Tolerance::for_dtype(molora::DType::F32),
        );
    }
}

#[test]
fn mole_linear_equals_the_cpu_reference_composed_by_hand() {
    let base = MoleConfig {
        num_experts: 4,
        temperature: 0.7,
        ..MoleConfig::lora(3, 6.0)
    };
    check_against_cpu(
        MoleConfig {
            gate: GateMode::TopK {
                k: 2,
                renormalize: true,
            },
            ..base
        },
        Gate::TopK {
            k: 2,
            renormalize: true,
        },
        None,
        None,
    );
    check_against_cpu(
        MoleConfig {
            gate: GateMode::Threshold(ThresholdMode::Learned { init_theta: 0.4 }),
            ..base
        },
        Gate::Threshold(ThresholdSpec::Learned { theta: 0.4 }),
        None,
        None,
    );
    check_against_cpu(
        MoleConfig {
            gate: GateMode::Dense,
            ..base
        },
        Gate::Dense,
        None,
        None,
    );
    check_against_cpu(MoleConfig::lora(5, 10.0), Gate::Dense, None, None);

    // Hierarchical: two utterances (rows 0..4 and 4..9) with their own global posterior.
    let g = [0.7f32, 0.1, 0.1, 0.1, 0.05, 0.05, 0.6, 0.3];
    let global = SeqRouting::new(Segments::from_lengths(&[4, 5]).unwrap(), 4, g.to_vec()).unwrap();
    let mut per_token = Vec::new();
    for tok in 0..9 {
        per_token.extend_from_slice(&g[if tok < 4 { 0..4 } else { 4..8 }]);
    }
    let gt = Tensor::from_vec(per_token, (9, 4), &Device::Cpu).unwrap();
    for (combine, cpu_combine) in [
        (
            Combine::Mix {
                lambda: 0.3,
                learned: false,
            },
            cpu::HierarchicalCombine::Mix { lambda: 0.3 },
        ),
        (Combine::Product, cpu::HierarchicalCombine::Product),
    ] {
        check_against_cpu(
            MoleConfig {
                gate: GateMode::Threshold(ThresholdMode::Fixed(0.2)),
                hierarchy: Some(combine),
                ..base
            },
            Gate::Threshold(ThresholdSpec::Fixed(0.2)),
            Some((&global, cpu_combine)),
            Some(&gt),
        );
    }
}

#[test]
fn training_a_mole_layer_lowers_the_loss() {
    // Two "domains" of inputs, each needing its own low-rank correction of a frozen base.
    let (t, d) = (64usize, 16usize);
    let mut rng = Rng::new(3);
    let mut layer = MoleLinear::new("l", d, d, true, &mut rng, &Device::Cpu).unwrap();
    let cfg = MoleConfig {
        num_experts: 2,
        gate: GateMode::Threshold(ThresholdMode::Learned { init_theta: 0.0 }),
        ..MoleConfig::lora(2, 4.0)
    };
    layer.add_experts(cfg, &mut rng).unwrap();
    let mut xv: Vec<f32> = rng.values(t * d, 1.0);
    for tok in 0..t {
        xv[tok * d] = if tok % 2 == 0 { 3.0 } else { -3.0 }; // the domain marker
    }
    let x = Tensor::from_vec(xv, (t, d), &Device::Cpu).unwrap();
    let shift: Vec<f32> = rng.values(2 * d, 1.0);
    let shift = Tensor::from_vec(shift, (2, d), &Device::Cpu).unwrap();
    let dom = Tensor::from_vec(
        (0..t).map(|i| (i % 2) as u32).collect::<Vec<_>>(),
        t,
        &Device::Cpu,
    )
    .unwrap();
    let y0 = layer.forward_ctx(&x, &mut Ctx::default()).unwrap();
    let router_before = host(&saved(&layer)["l.router.weight"]);
    let target = (y0.detach() + shift.embedding(&dom).unwrap()).unwrap();
    let vars: Vec<Var> = layer.trainable_vars().into_iter().map(|(_, v)| v).collect();
    assert!(
        vars.iter().all(|v| v.dims() != [d, d]),
        "the base must stay frozen"
    );
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 2e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..150 {
        let mut ctx = Ctx {
            global: None,
            rng: Some(&mut rng),
            seq_probs: None,
        };
        let y = layer.forward_ctx(&x, &mut ctx).unwrap();
        let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(last);
        opt.backward_step(&loss).unwrap();
    }
    let first = first.unwrap();
    assert!(last < first / 10.0, "loss fell only from {first} to {last}");
    // The router trained: its gradient flows back through the gate and the softmax.
    let router_after = host(&saved(&layer)["l.router.weight"]);
    assert_ne!(
        router_before, router_after,
        "the router received no gradient"
    );
    // The threshold moved: it receives gradient through the gate.
    assert!((layer.threshold().unwrap().unwrap() - 0.25).abs() > 1e-4);
}

#[test]
fn save_then_load_is_bit_exact() {
    let mut rng = Rng::new(8);
    let cfg = MoleConfig {
        num_experts: 3,
        gate: GateMode::Threshold(ThresholdMode::InputDependent { init_bias: 0.1 }),
        hierarchy: Some(Combine::Mix {
            lambda: 0.4,
            learned: true,
        }),
        ..MoleConfig::lora(4, 8.0)
    };
    let mut a = MoleLinear::new("l", 10, 6, true, &mut rng, &Device::Cpu).unwrap();
    a.add_experts(cfg, &mut rng).unwrap();
    randomise_b(&mut a, &mut rng);
    let mut tensors = BTreeMap::new();
    let mut layers = serde_json::Map::new();
    a.save_experts(&mut tensors, &mut layers).unwrap();
    let meta = BTreeMap::from([(
        "molora".to_string(),
        serde_json::json!({"format": "molora", "version": 1, "layers": layers}).to_string(),
    )]);
    let dir = std::env::temp_dir().join(format!("molora-model-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("experts.safetensors");
    save_tensors(&path, &tensors, &meta).unwrap();

    let mut b = MoleLinear::from_weights("l", &a.weight().unwrap(), a.bias()).unwrap();
    b.add_experts(cfg, &mut Rng::new(99)).unwrap();
    let (loaded, meta2) = load_tensors(&path, &Device::Cpu).unwrap();
    b.load_experts(&loaded, "experts.safetensors").unwrap();
    assert_eq!(meta2["molora"], meta["molora"]);
    for (k, v) in saved(&b) {
        assert_eq!(host(&v), host(&tensors[&k]), "{k} differs after load");
    }
    let x = Tensor::from_vec(rng.values::<f32>(50, 1.0), (5, 10), &Device::Cpu).unwrap();
    let g = Tensor::from_vec(vec![1.0f32 / 3.0; 15], (5, 3), &Device::Cpu).unwrap();
    let ya = a
        .forward_ctx(
            &x,
            &mut Ctx {
                global: Some(&g),
                rng: None,
                seq_probs: None,
            },
        )
        .unwrap();
    let yb = b
        .forward_ctx(
            &x,
            &mut Ctx {
                global: Some(&g),
                rng: None,
                seq_probs: None,
            },
        )
        .unwrap();
    assert_eq!(host(&ya), host(&yb));

    // A missing tensor is an error naming the key.
    let mut partial = loaded.clone();
    partial.remove("l.threshold.weight");
    let e = b
        .load_experts(&partial, "experts.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("l.threshold.weight") && e.contains("missing"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn peft_adapters_become_experts() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/peft");
    let module = "model.encoder.layers.0.self_attn.q_proj";
    let adapters: Vec<_> = ["whisper-tiny-lora-accent0", "whisper-tiny-lora-accent1"]
        .iter()
        .map(|d| load_peft_adapter(&data.join(d), &Device::Cpu).unwrap())
        .collect();
    let pairs: Vec<_> = adapters.iter().map(|a| &a.modules[module]).collect();
    let (d_in, d_out) = (pairs[0].d_in(), pairs[0].d_out());
    let mut rng = Rng::new(4);
    let mut layer = MoleLinear::new("q", d_in, d_out, false, &mut rng, &Device::Cpu).unwrap();
    layer
        .add_experts(
            MoleConfig {
                num_experts: 2,
                gate: GateMode::Dense,
                ..MoleConfig::lora(4, 8.0)
            },
            &mut rng,
        )
        .unwrap();
    layer.init_experts_from(&pairs).unwrap();
    // With dense routing the layer is W0 x + Σ_e w_e·2·B_e A_e x; check each expert alone by
    // comparing against a single-adapter layer per PEFT adapter.
    let x = Tensor::from_vec(rng.values::<f32>(3 * d_in, 1.0), (3, d_in), &Device::Cpu).unwrap();
    for p in &pairs {
        let mut single = MoleLinear::from_weights("q", &layer.weight().unwrap(), None).unwrap();
        single
            .add_experts(MoleConfig::lora(4, 8.0), &mut rng)
            .unwrap();
        single.init_experts_from(&[p]).unwrap();
        let y = single.forward_ctx(&x, &mut Ctx::default()).unwrap();
        let want = (x.matmul(&layer.weight().unwrap().t().unwrap()).unwrap()
            + (x.matmul(&p.a.t().unwrap())
                .unwrap()
                .matmul(&p.b.t().unwrap())
                .unwrap()
                * 2.0)
                .unwrap())
        .unwrap();
        assert_close(
            "PEFT LoRA as an expert",
            &host(&y),
            &host(&want),
            Tolerance::for_dtype(molora::DType::F32).scaled(10.0),
        );
    }
    // A rank that does not fit is an error naming the problem.
    let mut small = MoleLinear::new("q", d_in, d_out, false, &mut rng, &Device::Cpu).unwrap();
    small
        .add_experts(
            MoleConfig {
                num_experts: 2,
                gate: GateMode::Dense,
                ..MoleConfig::lora(2, 8.0)
            },
            &mut rng,
        )
        .unwrap();
    let e = small.init_experts_from(&pairs).unwrap_err().to_string();
    assert!(e.contains("rank 4"), "{e}");
}

#[test]
fn hdmole_demo_runs_end_to_end_and_beats_the_base_on_the_accents() {
    let cfg = HdmoleDemoConfig::tiny();
    let dir = std::env::temp_dir().join(format!("molora-demo-test-{}", std::process::id()));
    let report = run_hdmole_demo(&cfg, Some(&dir), &mut |_| {}).unwrap();
    let table = report.to_markdown();
    let base = &report.rows[0];
    let hd = report.rows.iter().find(|r| r.name == "HDMoLE").unwrap();
    assert!(
        hd.mean_accent_error() < base.mean_accent_error(),
        "HDMoLE {:.1}% vs base {:.1}% mean accent error\n{table}",
        hd.mean_accent_error(),
        base.mean_accent_error()
    );
    assert_eq!(report.rows.len(), 5, "{table}");
    assert_eq!(report.routing.len(), cfg.accents + 1);
    assert!(hd.trainable_pct < 100.0 && hd.trainable > 0);
    for f in [
        "report.json",
        "lora.safetensors",
        "mole_topk.safetensors",
        "hdmole.safetensors",
    ] {
        assert!(dir.join(f).exists(), "{f} not written");
    }
    let inspected = molora::model::weights::inspect(&dir.join("hdmole.safetensors")).unwrap();
    assert!(inspected.contains("projector.0"), "{inspected}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn saml_demo_runs_end_to_end_and_adaptation_beats_the_quantised_model() {
    use molora::demo::saml::{run_saml_demo, SamlDemoConfig};
    let cfg = SamlDemoConfig::tiny();
    let report = run_saml_demo(&cfg, &mut |_| {}).unwrap();
    let table = report.to_markdown();
    let overall = report.rows.last().unwrap();
    assert_eq!(report.rows.len(), cfg.target_speakers + 1, "{table}");
    assert!(
        overall.quantised_saml < overall.quantised,
        "SAML {:.1}% vs quantised {:.1}% token error\n{table}",
        overall.quantised_saml,
        overall.quantised
    );
    assert!(report.quant_bytes * 5 < report.fp_bytes, "{table}");
}

/// The HDMoLE and SAML demos with the models in bf16 (every layer, its experts and routers; the
/// router softmax and the gates in f32): the same headline directions as in f32.
#[test]
fn hdmole_and_saml_demos_run_in_bf16() {
    use molora::demo::saml::{run_saml_demo, SamlDemoConfig};
    let cfg = HdmoleDemoConfig {
        dtype: candle_core::DType::BF16,
        ..HdmoleDemoConfig::tiny()
    };
    let report = run_hdmole_demo(&cfg, None, &mut |_| {}).unwrap();
    let table = report.to_markdown();
    let (base, hd) = (&report.rows[0], &report.rows[4]);
    assert_eq!(hd.name, "HDMoLE");
    assert!(
        hd.mean_accent_error() < base.mean_accent_error(),
        "bf16: HDMoLE {:.1}% vs base {:.1}% mean accent error\n{table}",
        hd.mean_accent_error(),
        base.mean_accent_error()
    );
    let cfg = SamlDemoConfig {
        dtype: candle_core::DType::BF16,
        ..SamlDemoConfig::tiny()
    };
    let report = run_saml_demo(&cfg, &mut |_| {}).unwrap();
    let table = report.to_markdown();
    let overall = report.rows.last().unwrap();
    assert!(
        overall.quantised_saml < overall.quantised,
        "bf16: SAML {:.1}% vs quantised {:.1}% token error\n{table}",
        overall.quantised_saml,
        overall.quantised
    );
    // A bf16 base is half the f32 one, so NF4 saves less: still over 3×.
    assert!(report.quant_bytes * 3 < report.fp_bytes, "{table}");
    assert!(table.contains("bytes in bf16"), "{table}");
}
