//! `MoleLinear` as a candle layer: built from a `VarBuilder`, run in bf16 and f16 against f32, as a
//! `Module` against the ops composed by hand, trained through a `VarMap`, loaded from a
//! self-describing expert file, and a quantised base holding only its packed weight.
#![cfg(feature = "candle")]

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use molora::candle::ops;
use molora::model::linear::{GateMode, MoleConfig, MoleLinear, QuantFormat, ThresholdMode};
use molora::model::weights::{save_tensors, MOLORA_METADATA_KEY};
use molora::Rng;

fn host(t: &Tensor) -> Vec<f32> {
    ops::host_f32(t).unwrap()
}

fn random(rng: &mut Rng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    Tensor::from_vec(rng.values::<f32>(n, scale), dims, &Device::Cpu).unwrap()
}

/// `max |a − b| / max |b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (host(a), host(b));
    let num = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
    num / den.max(1e-12)
}

fn topk_cfg(e: usize, r: usize) -> MoleConfig {
    MoleConfig {
        num_experts: e,
        gate: GateMode::TopK {
            k: 2,
            renormalize: true,
        },
        ..MoleConfig::lora(r, 2.0 * r as f32)
    }
}

/// Two MoLE layers as a candle model would hold them.
struct TwoLayer {
    up: MoleLinear,
    down: MoleLinear,
}

impl TwoLayer {
    fn new(vb: VarBuilder) -> Self {
        TwoLayer {
            up: MoleLinear::from_vb_with_experts(24, 40, true, topk_cfg(4, 4), vb.pp("up"))
                .unwrap(),
            down: MoleLinear::from_vb_with_experts(
                40,
                12,
                false,
                MoleConfig {
                    num_experts: 3,
                    gate: GateMode::Threshold(ThresholdMode::Learned { init_theta: 0.5 }),
                    ..MoleConfig::lora(2, 4.0)
                },
                vb.pp("down"),
            )
            .unwrap(),
        }
    }
}

impl Module for TwoLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.down.forward(&self.up.forward(x)?.gelu()?)
    }
}

/// The f32 model's tensors, every one drawn from `rng` in a fixed (sorted) key order so the test is
/// the same on every run: the experts (whose B starts at zero, which would hide them) at scale 0.3,
/// every other randomly initialised tensor at its initialiser's bound, constants kept.
fn trained_like_tensors(rng: &mut Rng) -> HashMap<String, Tensor> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let _ = TwoLayer::new(vb);
    let created: BTreeMap<String, Tensor> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let mut out = HashMap::new();
    for (k, t) in created {
        let values = host(&t);
        let constant = values.iter().all(|v| *v == values[0]);
        // PyTorch's bound for a weight [rows, fan_in]; a 1-D vector (a bias) takes 0.1.
        let bound = match t.dims() {
            [_, fan_in] => 1.0 / (*fan_in as f32).sqrt(),
            _ => 0.1,
        };
        let t = if k.ends_with(".experts") {
            random(rng, t.dims(), 0.3)
        } else if constant {
            t
        } else {
            random(rng, t.dims(), bound)
        };
        out.insert(k, t);
    }
    out
}

#[test]
fn a_bf16_and_an_f16_model_from_a_var_builder_equal_the_f32_model() {
    let mut rng = Rng::new(3);
    let tensors = trained_like_tensors(&mut rng);
    let x = random(&mut rng, &[2, 7, 24], 1.0);
    let f32_model = TwoLayer::new(VarBuilder::from_tensors(
        tensors.clone(),
        DType::F32,
        &Device::Cpu,
    ));
    let want = f32_model.forward(&x).unwrap();
    assert_eq!(want.dims(), [2, 7, 12]);
    for (dtype, tol) in [(DType::BF16, 3e-2f32), (DType::F16, 4e-3)] {
        let model = TwoLayer::new(VarBuilder::from_tensors(
            tensors.clone(),
            dtype,
            &Device::Cpu,
        ));
        assert_eq!(model.up.dtype(), dtype);
        let got = model.forward(&x.to_dtype(dtype).unwrap()).unwrap();
        assert_eq!(got.dtype(), dtype);
        let err = rel_err(&got, &want);
        assert!(err < tol, "{dtype:?}: relative error {err} ≥ {tol}");
        // The experts matter at this size: the base alone is far from the output.
        let routing = model
            .up
            .last_routing()
            .expect("a routed layer records its routing");
        let w = routing.weights().unwrap();
        assert_eq!(w.dims(), [14, 4]);
        assert_eq!(w.dtype(), DType::F32);
    }
    // A wrong input dtype is an error that names both dtypes.
    let e = f32_model
        .up
        .forward(&x.to_dtype(DType::BF16).unwrap())
        .unwrap_err();
    assert!(
        matches!(
            molora::Error::from_candle(&e),
            Some(molora::Error::Unsupported {
                op: "MoleLinear::forward",
                ..
            })
        ),
        "a typed error through Module::forward: {e}"
    );
    let e = e.to_string();
    assert!(e.contains("BF16") && e.contains("F32"), "{e}");
}

#[test]
fn module_forward_equals_the_ops_composed_by_hand() {
    let mut rng = Rng::new(5);
    let tensors = trained_like_tensors(&mut rng);
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let layer =
        MoleLinear::from_vb_with_experts(24, 40, true, topk_cfg(4, 4), vb.pp("up")).unwrap();
    let x = random(&mut rng, &[9, 24], 1.0);
    let got = layer.forward(&x).unwrap();

    let w = &tensors["up.weight"];
    let bias = &tensors["up.bias"];
    let ab = &tensors["up.experts"];
    let (a_len, r) = (4 * 4 * 24, 4);
    let a = ab.narrow(0, 0, a_len).unwrap().reshape((4, r, 24)).unwrap();
    let b = ab
        .narrow(0, a_len, 4 * 40 * r)
        .unwrap()
        .reshape((4, 40, r))
        .unwrap();
    let logits = x
        .matmul(&tensors["up.router.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&tensors["up.router.bias"])
        .unwrap();
    let p = candle_nn::ops::softmax(&logits, D::Minus1).unwrap();
    let gate = ops::top_k_gate(&p, 2, true).unwrap();
    let want = (x
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(bias)
        .unwrap()
        + ops::mole_lora(&x, &a, &b, &gate, 2.0).unwrap())
    .unwrap();
    let err = rel_err(&got, &want);
    assert!(err < 1e-6, "relative error {err}");
    let routed = layer.last_routing().unwrap();
    assert_eq!(host(&routed.weights().unwrap()), host(&gate));
}

#[test]
fn a_var_map_trains_the_packed_experts_and_router() {
    let mut rng = Rng::new(7);
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let layer = MoleLinear::from_vb_with_experts(16, 8, true, topk_cfg(4, 4), vb.pp("l")).unwrap();
    let names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
    for k in [
        "l.weight",
        "l.bias",
        "l.experts",
        "l.router.weight",
        "l.router.bias",
    ] {
        assert!(
            names.iter().any(|n| n == k),
            "{k} not in the VarMap: {names:?}"
        );
    }
    let x = random(&mut rng, &[32, 16], 1.0);
    let target = (layer.forward(&x).unwrap().detach() + random(&mut rng, &[32, 8], 0.5)).unwrap();
    let base_before = host(&map.data().lock().unwrap()["l.weight"].as_tensor().clone());
    // The candle way: every variable of the map to the optimiser.
    let mut opt = AdamW::new(
        map.all_vars(),
        ParamsAdamW {
            lr: 2e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let loss = |l: &MoleLinear| {
        (l.forward(&x).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let first = loss(&layer).to_scalar::<f32>().unwrap();
    for _ in 0..100 {
        opt.backward_step(&loss(&layer)).unwrap();
    }
    let last = loss(&layer).to_scalar::<f32>().unwrap();
    assert!(last < first / 3.0, "loss fell only from {first} to {last}");
    // The base is frozen: its variable gets no gradient, so the optimiser leaves it alone.
    let base_after = host(&map.data().lock().unwrap()["l.weight"].as_tensor().clone());
    assert_eq!(base_before, base_after);
}

#[test]
fn load_rebuilds_a_layer_from_its_expert_file() {
    let mut rng = Rng::new(11);
    let mut base = BTreeMap::new();
    base.insert("enc.q.weight".to_string(), random(&mut rng, &[6, 10], 0.5));
    base.insert("enc.q.bias".to_string(), random(&mut rng, &[6], 0.5));
    let vb = VarBuilder::from_tensors(base.clone().into_iter().collect(), DType::F32, &Device::Cpu);
    let cfg = MoleConfig {
        num_experts: 3,
        gate: GateMode::Threshold(ThresholdMode::InputDependent { init_bias: 0.2 }),
        ..MoleConfig::lora(4, 8.0)
    };
    let mut layer = MoleLinear::from_vb(10, 6, true, vb.pp("enc").pp("q")).unwrap();
    assert_eq!(layer.name(), "enc.q");
    layer.add_experts(cfg, &mut rng).unwrap();
    // Random experts, then save as the demos do.
    let mut tensors = BTreeMap::new();
    let mut layers = serde_json::Map::new();
    layer.save_experts(&mut tensors, &mut layers).unwrap();
    let b = tensors["enc.q.lora_B"].dims().to_vec();
    tensors.insert("enc.q.lora_B".into(), random(&mut rng, &b, 0.5));
    layer.load_experts(&tensors, "test").unwrap();
    let meta = BTreeMap::from([(
        MOLORA_METADATA_KEY.to_string(),
        serde_json::json!({"format": "molora", "version": 1, "layers": layers}).to_string(),
    )]);
    let dir = std::env::temp_dir().join(format!("molora-candle-layer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("experts.safetensors");
    save_tensors(&path, &tensors, &meta).unwrap();

    let loaded = MoleLinear::load(&path, vb.pp("enc").pp("q")).unwrap();
    assert_eq!(loaded.config(), Some(&cfg));
    let x = random(&mut rng, &[5, 10], 1.0);
    assert_eq!(
        host(&loaded.forward(&x).unwrap()),
        host(&layer.forward(&x).unwrap())
    );
    // A layer the file does not describe is an error naming it and the file.
    let e = MoleLinear::load(&path, vb.pp("enc").pp("k"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("enc.k") && e.contains("experts.safetensors"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_quantised_layer_holds_only_its_packed_weight() {
    let mut rng = Rng::new(13);
    let (d_in, d_out) = (256, 96);
    let mut layer = MoleLinear::new("l", d_in, d_out, true, &mut rng, &Device::Cpu).unwrap();
    let dense = layer.base_bytes();
    assert_eq!(dense, 4 * d_out * d_in + 4 * d_out);
    layer.quantize(QuantFormat::Nf4).unwrap();
    // NF4: half a byte per weight, one f32 absmax per block of 64, plus the f32 bias.
    let packed = d_out * d_in / 2 + 4 * (d_out * d_in / 64);
    assert_eq!(layer.base_bytes(), packed + 4 * d_out);
    assert_eq!(layer.bytes(), layer.base_bytes());
    assert!(dense > 6 * packed, "{dense} vs {packed}");
    // Nothing of the dense weight is trainable or held.
    assert!(layer.trainable_vars().is_empty());
    layer.quantize(QuantFormat::Int8).unwrap();
    assert_eq!(layer.base_bytes(), d_out * d_in + 4 * d_out + 4 * d_out);
    // A bf16 layer's base is half the f32 one.
    let mut half = MoleLinear::new("h", d_in, d_out, false, &mut rng, &Device::Cpu).unwrap();
    half.to_dtype(DType::BF16).unwrap();
    assert_eq!(half.base_bytes(), 2 * d_out * d_in);
}

/// The README's candle example, as written there (bf16, two layers from a `VarMap` builder).
#[test]
fn the_readme_bf16_example_runs() -> candle_core::Result<()> {
    let (map, dev) = (VarMap::new(), Device::Cpu);
    let vb = VarBuilder::from_varmap(&map, DType::BF16, &dev);
    let cfg = MoleConfig {
        num_experts: 4,
        gate: GateMode::TopK {
            k: 2,
            renormalize: true,
        },
        ..MoleConfig::lora(8, 16.0)
    };
    let up = MoleLinear::from_vb_with_experts(512, 1024, true, cfg, vb.pp("mlp.up"))?;
    let down = MoleLinear::from_vb_with_experts(1024, 512, true, cfg, vb.pp("mlp.down"))?;
    let x = Tensor::randn(0f32, 1.0, (2, 16, 512), &dev)?.to_dtype(DType::BF16)?;
    let y = down.forward(&up.forward(&x)?.gelu()?)?;
    assert_eq!((y.dims(), y.dtype()), (&[2usize, 16, 512][..], DType::BF16));
    let routing = up.last_routing().expect("a routed layer");
    assert_eq!(routing.probs.dims(), [32, 4]);
    Ok(())
}
