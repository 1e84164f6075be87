//! Weights on disk: PEFT adapters written by PEFT itself import with the right config and shapes;
//! save → load round trips are bit-exact; malformed or unsupported adapters give errors naming the key or
//! option; stacking experts pads ranks and keeps each expert's `scale · B · A`; `inspect` describes
//! molora files, PEFT adapters and plain safetensors.
#![cfg(feature = "candle")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use molora::model::weights::{
    inspect, load_peft_adapter, load_tensors, save_peft_adapter, save_tensors, stack_experts,
    LoraPair, PeftConfig,
};
use molora::Error;
use molora::Rng;

const TARGETS: [&str; 4] = ["k_proj", "out_proj", "q_proj", "v_proj"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/peft")
        .join(name)
}

/// A fresh, empty scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("molora-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn random(rng: &mut Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rng.values::<f32>(n, scale), shape, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The module names the tiny Whisper fixtures adapt: 2 encoder layers × self_attn, 2 decoder layers ×
/// (self_attn, encoder_attn), × q/k/v/out projections.
fn whisper_modules() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for layer in 0..2 {
        for proj in TARGETS {
            names.insert(format!("model.encoder.layers.{layer}.self_attn.{proj}"));
            names.insert(format!("model.decoder.layers.{layer}.self_attn.{proj}"));
            names.insert(format!("model.decoder.layers.{layer}.encoder_attn.{proj}"));
        }
    }
    names
}

#[test]
fn real_peft_adapters_import_with_their_config_and_shapes() {
    let mut first_b = Vec::new();
    for name in ["whisper-tiny-lora-accent0", "whisper-tiny-lora-accent1"] {
        let dir = fixture(name);
        let adapter = load_peft_adapter(&dir, &Device::Cpu).unwrap();
        let c = &adapter.config;
        assert_eq!(c.r, 4);
        assert_eq!(c.lora_alpha, 8.0);
        let targets: BTreeSet<&str> = c.target_modules.iter().map(String::as_str).collect();
        assert_eq!(targets, BTreeSet::from(TARGETS));
        assert_eq!(c.lora_dropout, 0.0);
        assert!(!c.use_rslora && !c.fan_in_fan_out);
        assert_eq!(adapter.source, dir);

        let modules: BTreeSet<String> = adapter.modules.keys().cloned().collect();
        assert_eq!(modules.len(), 24);
        assert_eq!(modules, whisper_modules());

        // The imported tensors are the file's, bit for bit.
        let (raw, meta) =
            load_tensors(&dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(raw.len(), 48);
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        for (module, pair) in &adapter.modules {
            assert_eq!(pair.a.dims(), &[4, 64], "{module}");
            assert_eq!(pair.b.dims(), &[64, 4], "{module}");
            assert_eq!(pair.a.dtype(), DType::F32);
            assert_eq!((pair.rank(), pair.d_in(), pair.d_out()), (4, 64, 64));
            assert_eq!(pair.scale, 2.0);
            let a_raw = &raw[&format!("base_model.model.{module}.lora_A.weight")];
            let b_raw = &raw[&format!("base_model.model.{module}.lora_B.weight")];
            assert_eq!(bits(&pair.a), bits(a_raw), "{module} A");
            assert_eq!(bits(&pair.b), bits(b_raw), "{module} B");
            assert!(
                values(&pair.b).iter().any(|&v| v != 0.0),
                "{module}: B is zero"
            );
        }
        let q = &adapter.modules["model.encoder.layers.0.self_attn.q_proj"];
        first_b.push(bits(&q.b));
    }
    assert_ne!(first_b[0], first_b[1], "the two accents have different B");
}

#[test]
fn peft_save_load_round_trip_is_bit_exact() {
    // The real adapter, re-saved.
    let original = load_peft_adapter(&fixture("whisper-tiny-lora-accent0"), &Device::Cpu).unwrap();
    let dir = scratch("roundtrip-real");
    save_peft_adapter(&dir, &original.config, &original.modules).unwrap();
    let back = load_peft_adapter(&dir, &Device::Cpu).unwrap();
    assert_eq!(back.config, original.config);
    assert_eq!(
        back.modules.keys().collect::<Vec<_>>(),
        original.modules.keys().collect::<Vec<_>>()
    );
    for (module, pair) in &original.modules {
        let got = &back.modules[module];
        assert_eq!(bits(&got.a), bits(&pair.a), "{module} A");
        assert_eq!(bits(&got.b), bits(&pair.b), "{module} B");
        assert_eq!(got.scale.to_bits(), pair.scale.to_bits(), "{module} scale");
    }
    // Same keys and layout as PEFT wrote.
    let (ours, meta) = load_tensors(&dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (theirs, _) = load_tensors(
        &fixture("whisper-tiny-lora-accent0").join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["use_dora"], false);

    // A config with rank and alpha patterns, rsLoRA and dropout, and mixed ranks.
    let mut rng = Rng::new(5);
    let mut config = PeftConfig::new(4, 16.0, &["q_proj", "fc1"]);
    config.use_rslora = true;
    config.lora_dropout = 0.1;
    config
        .rank_pattern
        .insert("model.layers.1.q_proj".to_string(), 2);
    config.alpha_pattern.insert("fc1".to_string(), 3.0);
    let mut modules = BTreeMap::new();
    for (name, d_in, d_out) in [
        ("model.layers.0.q_proj", 16, 16),
        ("model.layers.1.q_proj", 16, 16),
        ("model.layers.0.fc1", 16, 40),
    ] {
        let r = config.rank_for(name);
        let pair = LoraPair::new(
            random(&mut rng, &[r, d_in], 1.0),
            random(&mut rng, &[d_out, r], 1.0),
            config.scale_for(name),
        )
        .unwrap();
        modules.insert(name.to_string(), pair);
    }
    assert_eq!(modules["model.layers.1.q_proj"].rank(), 2);
    assert_eq!(modules["model.layers.0.fc1"].scale, 3.0 / 2.0);
    assert_eq!(modules["model.layers.0.q_proj"].scale, 16.0 / 2.0);
    let dir = scratch("roundtrip-patterns");
    save_peft_adapter(&dir, &config, &modules).unwrap();
    let back = load_peft_adapter(&dir, &Device::Cpu).unwrap();
    assert_eq!(back.config, config);
    for (module, pair) in &modules {
        let got = &back.modules[module];
        assert_eq!(bits(&got.a), bits(&pair.a), "{module} A");
        assert_eq!(bits(&got.b), bits(&pair.b), "{module} B");
        assert_eq!(got.scale.to_bits(), pair.scale.to_bits(), "{module} scale");
    }
}

/// Writes a PEFT-layout adapter by hand: `config` as the JSON text, `tensors` under their full keys.
fn write_adapter(name: &str, config: &str, tensors: BTreeMap<String, Tensor>) -> PathBuf {
    let dir = scratch(name);
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    save_tensors(&dir.join("adapter_model.safetensors"), &tensors, &meta).unwrap();
    dir
}

const CONFIG: &str = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}"#;
const A_KEY: &str = "base_model.model.model.layers.0.q_proj.lora_A.weight";
const B_KEY: &str = "base_model.model.model.layers.0.q_proj.lora_B.weight";

fn good_tensors(rng: &mut Rng) -> BTreeMap<String, Tensor> {
    BTreeMap::from([
        (A_KEY.to_string(), random(rng, &[4, 8], 1.0)),
        (B_KEY.to_string(), random(rng, &[6, 4], 1.0)),
    ])
}

/// The `Error::Weights` of loading `dir`, as (key, detail); panics on any other outcome.
fn weights_error(dir: &Path) -> (String, String) {
    match load_peft_adapter(dir, &Device::Cpu) {
        Err(Error::Weights { key, detail, .. }) => (key, detail),
        Err(other) => panic!("expected Error::Weights, got {other}"),
        Ok(_) => panic!("expected an error loading {}", dir.display()),
    }
}

#[test]
fn hand_written_adapter_imports_and_converts_half_precision() {
    let mut rng = Rng::new(1);
    let dir = write_adapter("good", CONFIG, good_tensors(&mut rng));
    let adapter = load_peft_adapter(&dir, &Device::Cpu).unwrap();
    let pair = &adapter.modules["model.layers.0.q_proj"];
    assert_eq!(
        (pair.rank(), pair.d_in(), pair.d_out(), pair.scale),
        (4, 8, 6, 2.0)
    );

    // f16 and bf16 are converted to f32 exactly.
    let a16 = random(&mut rng, &[4, 8], 1.0).to_dtype(DType::F16).unwrap();
    let b16 = random(&mut rng, &[6, 4], 1.0)
        .to_dtype(DType::BF16)
        .unwrap();
    let tensors = BTreeMap::from([
        (A_KEY.to_string(), a16.clone()),
        (B_KEY.to_string(), b16.clone()),
    ]);
    let dir = write_adapter("half", CONFIG, tensors);
    let adapter = load_peft_adapter(&dir, &Device::Cpu).unwrap();
    let pair = &adapter.modules["model.layers.0.q_proj"];
    assert_eq!(pair.a.dtype(), DType::F32);
    assert_eq!(pair.b.dtype(), DType::F32);
    assert_eq!(bits(&pair.a), bits(&a16));
    assert_eq!(bits(&pair.b), bits(&b16));

    // A regex target_modules is replaced by the modules found.
    let config = CONFIG.replace(r#"["q_proj"]"#, r#""model\\.layers\\.\\d+\\.q_proj""#);
    let dir = write_adapter("regex-targets", &config, good_tensors(&mut rng));
    let adapter = load_peft_adapter(&dir, &Device::Cpu).unwrap();
    assert_eq!(adapter.config.target_modules, vec!["q_proj".to_string()]);
}

#[test]
fn malformed_adapters_name_the_key() {
    let mut rng = Rng::new(2);

    // lora_B with the wrong rank.
    let mut t = good_tensors(&mut rng);
    t.insert(B_KEY.to_string(), random(&mut rng, &[6, 3], 1.0));
    let (key, detail) = weights_error(&write_adapter("wrong-shape", CONFIG, t));
    assert_eq!(key, B_KEY, "{detail}");
    assert!(
        detail.contains("[6, 4]") && detail.contains("[6, 3]"),
        "{detail}"
    );

    // Missing lora_B.
    let mut t = good_tensors(&mut rng);
    t.remove(B_KEY);
    let (key, detail) = weights_error(&write_adapter("missing-b", CONFIG, t));
    assert_eq!(key, B_KEY, "{detail}");
    assert!(detail.contains("missing"), "{detail}");

    // A rank that is not the config's r.
    let config = CONFIG.replace(r#""r": 4"#, r#""r": 8"#);
    let (key, detail) = weights_error(&write_adapter("wrong-r", &config, good_tensors(&mut rng)));
    assert_eq!(key, A_KEY, "{detail}");
    assert!(
        detail.contains("r = 8") && detail.contains("rank 4"),
        "{detail}"
    );

    // A 3-D lora_A (e.g. a convolution's LoRA).
    let mut t = good_tensors(&mut rng);
    t.insert(A_KEY.to_string(), random(&mut rng, &[4, 8, 1], 1.0));
    let (key, detail) = weights_error(&write_adapter("3d", CONFIG, t));
    assert_eq!(key, A_KEY, "{detail}");
    assert!(detail.contains("2-D"), "{detail}");

    // An unsupported dtype.
    let mut t = good_tensors(&mut rng);
    t.insert(
        A_KEY.to_string(),
        random(&mut rng, &[4, 8], 1.0).to_dtype(DType::F64).unwrap(),
    );
    let (key, detail) = weights_error(&write_adapter("f64", CONFIG, t));
    assert_eq!(key, A_KEY, "{detail}");
    assert!(
        detail.contains("F64") && detail.contains("F32, F16 or BF16"),
        "{detail}"
    );

    // A key that is not a LoRA weight.
    let mut t = good_tensors(&mut rng);
    let extra = "base_model.model.model.layers.0.q_proj.lora_magnitude_vector";
    t.insert(extra.to_string(), random(&mut rng, &[6], 1.0));
    let (key, detail) = weights_error(&write_adapter("extra-key", CONFIG, t));
    assert_eq!(key, extra, "{detail}");

    // A key without PEFT's prefix.
    let mut t = good_tensors(&mut rng);
    t.insert(
        "model.layers.0.q_proj.weight".to_string(),
        random(&mut rng, &[6, 8], 1.0),
    );
    let (key, _) = weights_error(&write_adapter("no-prefix", CONFIG, t));
    assert_eq!(key, "model.layers.0.q_proj.weight");

    // A module the config does not target (PEFT would ignore its weights).
    let config = CONFIG.replace(r#"["q_proj"]"#, r#"["v_proj"]"#);
    let (key, detail) = weights_error(&write_adapter(
        "untargeted",
        &config,
        good_tensors(&mut rng),
    ));
    assert_eq!(key, A_KEY, "{detail}");
    assert!(detail.contains("target_modules"), "{detail}");

    // No adapter_config.json.
    let dir = write_adapter("no-config", CONFIG, good_tensors(&mut rng));
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    match load_peft_adapter(&dir, &Device::Cpu) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("adapter_config.json"), "{path}"),
        other => panic!("expected Error::Io, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn unsupported_peft_options_are_named() {
    let mut rng = Rng::new(3);
    for (option, json) in [
        ("use_dora", r#""use_dora": true"#),
        ("lora_bias", r#""lora_bias": true"#),
        ("bias", r#""bias": "lora_only""#),
        ("modules_to_save", r#""modules_to_save": ["classifier"]"#),
        ("init_lora_weights", r#""init_lora_weights": "pissa""#),
        ("peft_type", r#""peft_type": "IA3""#),
    ] {
        let config = CONFIG.replace(r#""bias": "none""#, json);
        let config = if option == "peft_type" {
            config.replace(r#""peft_type": "LORA", "#, "")
        } else {
            config
        };
        let (key, detail) = weights_error(&write_adapter(option, &config, good_tensors(&mut rng)));
        assert_eq!(key, option, "{detail}");
        assert!(detail.contains(option), "{detail}");
    }
    // A config field of the wrong type names the field.
    let config = CONFIG.replace(r#""lora_alpha": 8"#, r#""lora_alpha": "eight""#);
    let (key, _) = weights_error(&write_adapter(
        "alpha-type",
        &config,
        good_tensors(&mut rng),
    ));
    assert_eq!(key, "lora_alpha");
    // Two alpha_pattern suffixes with different values for one module: PEFT's choice depends on order.
    let config = CONFIG.replace(
        r#""bias": "none""#,
        r#""alpha_pattern": {"q_proj": 4, "layers.0.q_proj": 16}"#,
    );
    let (key, detail) = weights_error(&write_adapter(
        "alpha-ambiguous",
        &config,
        good_tensors(&mut rng),
    ));
    assert_eq!(key, "alpha_pattern");
    assert!(detail.contains("model.layers.0.q_proj"), "{detail}");
    // The full name settles it.
    let config = CONFIG.replace(
        r#""bias": "none""#,
        r#""alpha_pattern": {"q_proj": 4, "^model.layers.0.q_proj": 16}"#,
    );
    let adapter = load_peft_adapter(
        &write_adapter("alpha-full", &config, good_tensors(&mut rng)),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(adapter.modules["model.layers.0.q_proj"].scale, 4.0);
    // fan_in_fan_out is accepted: PEFT stores A and B in the same layout either way.
    let config = CONFIG.replace(r#""bias": "none""#, r#""fan_in_fan_out": true"#);
    let adapter = load_peft_adapter(
        &write_adapter("fifo", &config, good_tensors(&mut rng)),
        &Device::Cpu,
    )
    .unwrap();
    assert!(adapter.config.fan_in_fan_out);
    assert_eq!(adapter.modules["model.layers.0.q_proj"].a.dims(), &[4, 8]);
}

#[test]
fn saving_refuses_what_peft_would_load_differently() {
    let mut rng = Rng::new(4);
    let config = PeftConfig::new(4, 8.0, &["q_proj"]);
    let pair = |rng: &mut Rng, r: usize, scale: f32| {
        LoraPair::new(random(rng, &[r, 8], 1.0), random(rng, &[6, r], 1.0), scale).unwrap()
    };
    let dir = scratch("save-refuses");
    let cases = [
        ("model.layers.0.q_proj", pair(&mut rng, 4, 3.0), "scale"),
        ("model.layers.0.q_proj", pair(&mut rng, 2, 2.0), "rank"),
        (
            "model.layers.0.k_proj",
            pair(&mut rng, 4, 2.0),
            "target_modules",
        ),
    ];
    for (module, p, word) in cases {
        let modules = BTreeMap::from([(module.to_string(), p)]);
        match save_peft_adapter(&dir, &config, &modules) {
            Err(Error::Weights { key, detail, .. }) => {
                assert_eq!(key, module);
                assert!(detail.contains(word), "{detail}");
            }
            other => panic!("expected Error::Weights, got {other:?}"),
        }
    }
}

#[test]
fn stacked_experts_pad_ranks_and_keep_each_product() {
    let mut rng = Rng::new(6);
    let (d_in, d_out) = (10, 7);
    let specs = [(2usize, 1.0f32), (4, 2.0), (3, 0.5)];
    let pairs: Vec<LoraPair> = specs
        .iter()
        .map(|&(r, s)| {
            LoraPair::new(
                random(&mut rng, &[r, d_in], 1.0),
                random(&mut rng, &[d_out, r], 1.0),
                s,
            )
            .unwrap()
        })
        .collect();
    let refs: Vec<&LoraPair> = pairs.iter().collect();
    let target = 2.0f32;
    let (a, b) = stack_experts(&refs, target).unwrap();
    assert_eq!(a.dims(), &[3, 4, d_in]);
    assert_eq!(b.dims(), &[3, d_out, 4]);
    assert_eq!((a.dtype(), b.dtype()), (DType::F32, DType::F32));
    for (e, pair) in pairs.iter().enumerate() {
        let r = pair.rank();
        let a_e = a.get(e).unwrap();
        let b_e = b.get(e).unwrap();
        // A's own rows are copied; padded rows and B's padded columns are zero.
        assert_eq!(bits(&a_e.narrow(0, 0, r).unwrap()), bits(&pair.a));
        if r < 4 {
            let pad_a = values(&a_e.narrow(0, r, 4 - r).unwrap().contiguous().unwrap());
            let pad_b = values(&b_e.narrow(1, r, 4 - r).unwrap().contiguous().unwrap());
            assert!(pad_a.iter().chain(&pad_b).all(|&v| v == 0.0), "expert {e}");
        }
        // target · B_e A_e (padded) equals scale_e · B_e A_e (the adapter's own).
        let got = (b_e.matmul(&a_e).unwrap() * f64::from(target)).unwrap();
        let want = (pair.b.matmul(&pair.a).unwrap() * f64::from(pair.scale)).unwrap();
        let (got, want) = (values(&got), values(&want));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-5,
            "expert {e}: worst relative difference {worst}"
        );
    }
    // Expert 1's scale equals the target: its B is copied unchanged.
    let b1 = b.get(1).unwrap();
    assert_eq!(bits(&b1), bits(&pairs[1].b));

    // Errors: no experts, a zero target scale, mismatched widths.
    assert!(matches!(
        stack_experts(&[], 1.0),
        Err(Error::Weights { .. })
    ));
    assert!(matches!(
        stack_experts(&refs, 0.0),
        Err(Error::Weights { key, .. }) if key == "target_scale"
    ));
    let odd = LoraPair::new(
        random(&mut rng, &[2, d_in + 1], 1.0),
        random(&mut rng, &[d_out, 2], 1.0),
        1.0,
    )
    .unwrap();
    match stack_experts(&[&pairs[0], &odd], 1.0) {
        Err(Error::Weights { key, detail, .. }) => {
            assert_eq!(key, "expert 1");
            assert!(
                detail.contains("11 -> 7") && detail.contains("10 -> 7"),
                "{detail}"
            );
        }
        other => panic!("expected Error::Weights, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn safetensors_round_trip_is_bit_exact_with_metadata() {
    let mut rng = Rng::new(7);
    let dev = Device::Cpu;
    let tensors = BTreeMap::from([
        ("l.lora_A".to_string(), random(&mut rng, &[4, 8, 16], 1.0)),
        (
            "l.lora_B".to_string(),
            random(&mut rng, &[4, 12, 8], 1.0)
                .to_dtype(DType::BF16)
                .unwrap(),
        ),
        (
            "l.router.weight".to_string(),
            random(&mut rng, &[4, 16], 1.0)
                .to_dtype(DType::F16)
                .unwrap(),
        ),
        (
            "l.steps".to_string(),
            Tensor::new(&[3i64, -1, 1 << 40], &dev).unwrap(),
        ),
        (
            "l.mask".to_string(),
            Tensor::new(&[0u8, 1, 255], &dev).unwrap(),
        ),
        // A non-contiguous tensor is written in logical order.
        (
            "l.transposed".to_string(),
            random(&mut rng, &[3, 5], 1.0).t().unwrap(),
        ),
    ]);
    let metadata = BTreeMap::from([
        (
            "molora".to_string(),
            r#"{"format":"molora","version":1}"#.to_string(),
        ),
        ("note".to_string(), "ünïcode ok".to_string()),
    ]);
    let path = scratch("st-roundtrip").join("experts.safetensors");
    save_tensors(&path, &tensors, &metadata).unwrap();
    let (back, meta) = load_tensors(&path, &dev).unwrap();
    assert_eq!(meta, metadata);
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &tensors {
        let got = &back[name];
        assert_eq!(got.dtype(), t.dtype(), "{name}");
        assert_eq!(got.dims(), t.dims(), "{name}");
        match t.dtype() {
            DType::I64 => assert_eq!(got.to_vec1::<i64>().unwrap(), t.to_vec1::<i64>().unwrap()),
            DType::U8 => assert_eq!(got.to_vec1::<u8>().unwrap(), t.to_vec1::<u8>().unwrap()),
            _ => assert_eq!(bits(got), bits(t), "{name}"),
        }
    }

    // No metadata reads back as empty; a missing file is an Io error naming it.
    let path2 = path.with_file_name("plain.safetensors");
    save_tensors(&path2, &tensors, &BTreeMap::new()).unwrap();
    assert!(load_tensors(&path2, &dev).unwrap().1.is_empty());
    let missing = path.with_file_name("missing.safetensors");
    match load_tensors(&missing, &dev) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("missing.safetensors")),
        other => panic!("expected Error::Io, got {:?}", other.map(|_| ())),
    }
    // A file that is not safetensors names the header.
    let junk = path.with_file_name("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    assert!(matches!(
        load_tensors(&junk, &dev),
        Err(Error::Weights { key, .. }) if key == "(header)"
    ));
}

#[test]
fn inspect_describes_molora_peft_and_plain_files() {
    let mut rng = Rng::new(8);
    let (e, r, d_in, d_out) = (4, 8, 64, 32);
    let mut tensors = BTreeMap::new();
    for layer in ["enc.0.fc1", "enc.1.q_proj"] {
        tensors.insert(
            format!("{layer}.lora_A"),
            random(&mut rng, &[e, r, d_in], 1.0),
        );
        tensors.insert(
            format!("{layer}.lora_B"),
            random(&mut rng, &[e, d_out, r], 1.0),
        );
    }
    tensors.insert(
        "enc.0.fc1.router.weight".to_string(),
        random(&mut rng, &[e, d_in], 1.0),
    );
    tensors.insert(
        "enc.0.fc1.router.bias".to_string(),
        random(&mut rng, &[e], 1.0),
    );
    tensors.insert(
        "enc.0.fc1.threshold".to_string(),
        random(&mut rng, &[1], 1.0),
    );
    tensors.insert(
        "global_router.weight".to_string(),
        random(&mut rng, &[3, d_in], 1.0),
    );
    // Only enc.0.fc1 is described in the JSON; enc.1.q_proj is inferred from its tensors.
    let json = r#"{"format":"molora","version":1,"layers":{"enc.0.fc1":{"experts":4,"rank":8,"d_in":64,"d_out":32,"alpha":16,"routing":"threshold(learned)"}}}"#;
    let metadata = BTreeMap::from([("molora".to_string(), json.to_string())]);
    let path = scratch("inspect").join("experts.safetensors");
    save_tensors(&path, &tensors, &metadata).unwrap();
    let report = inspect(&path).unwrap();
    for needle in [
        "molora file (format molora, version 1), 2 MoLE layers",
        "enc.0.fc1: E = 4, r = 8, 64 -> 32, alpha = 16, routing = threshold(learned)",
        "router: weight [4, 64] + bias [4]",
        "threshold: learned θ [1]",
        "enc.1.q_proj: E = 4, r = 8, 64 -> 32, alpha = -, routing = -; router: none; threshold: none",
        "global_router.weight: F32 [3, 64]",
        "totals: 8 tensors",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in:\n{report}");
    }
    let params = 2 * (e * r * d_in + e * d_out * r) + e * d_in + e + 1 + 3 * d_in;
    assert!(
        report.contains(&format!("{params} parameters, {} bytes", 4 * params)),
        "{report}"
    );

    // A PEFT adapter, with its config beside it.
    let peft = fixture("whisper-tiny-lora-accent0").join("adapter_model.safetensors");
    let report = inspect(&peft).unwrap();
    for needle in [
        "PEFT LoRA adapter, 24 modules",
        "r = 4, lora_alpha = 8, scale = 2",
        "model.encoder.layers.0.self_attn.q_proj: r = 4, 64 -> 64, A F32 [4, 64], B F32 [64, 4]",
        "model.decoder.layers.1.encoder_attn.out_proj: r = 4",
        "totals: 48 tensors, 12288 parameters, 49152 bytes",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in:\n{report}");
    }
    for target in TARGETS {
        assert!(report.contains(target), "{report}");
    }

    // A plain file: every tensor's name, dtype and shape.
    let plain = BTreeMap::from([
        ("w".to_string(), random(&mut rng, &[2, 3], 1.0)),
        (
            "b".to_string(),
            random(&mut rng, &[3], 1.0).to_dtype(DType::F16).unwrap(),
        ),
    ]);
    let path = path.with_file_name("plain.safetensors");
    save_tensors(&path, &plain, &BTreeMap::new()).unwrap();
    let report = inspect(&path).unwrap();
    for needle in [
        "w: F32 [2, 3]",
        "b: F16 [3]",
        "totals: 2 tensors, 9 parameters, 30 bytes",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in:\n{report}");
    }
}
