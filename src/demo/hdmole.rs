//! `molora demo hdmole --data synthetic`: HDMoLE against full fine-tuning, one LoRA and top-k MoLE
//! on a deterministic synthetic multi-accent task (the speech demo is [`super::hdmole_speech`]).
//!
//! The task ([`Domains`]) is frame classification, the shape of ASR without alignment: an utterance is `L` tokens
//! from a vocabulary of `V`, each rendered as one frame `x = M_d·(μ_tok + ε) + c_d` (`μ` a fixed
//! prototype per token, `ε` Gaussian noise). The general domain has `M = I, c = 0`; each accent
//! domain `d` has its own distortion `M_d = I + β·G_d/√d_feat` and offset `c_d` — a different
//! transformation of the general domain's inputs. The model ([`AsrModel`]) is first trained on the
//! general domain; then four methods fine-tune copies of it on the accent domains only:
//!
//! 1. full fine-tuning (every weight),
//! 2. one LoRA on the target layers,
//! 3. MoLE with a top-k local router (one expert per accent),
//! 4. HDMoLE: a frozen global accent classifier over pooled encoder states (trained first), per-layer
//!    local routers mixed with its posterior, learned per-layer thresholds; experts optionally
//!    initialised from one LoRA per accent.
//!
//! Each is scored by frame error on held-out utterances of every domain: the accents (what was
//! trained) and the general domain (forgetting).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use candle_nn::Optimizer;

use super::domains::{Domains, DomainsConfig};
use crate::error::{Error, Result};
use crate::model::hdmole::{AsrConfig, AsrModel};
use crate::model::linear::{Combine, GateMode, MoleConfig, MoleLinear, ThresholdMode};
use crate::Rng;

/// Settings of the HDMoLE demo.
#[derive(Debug, Clone, PartialEq)]
pub struct HdmoleDemoConfig {
    /// Seed of the data and of every initialisation.
    pub seed: u64,
    /// Optimiser steps of each fine-tuning method.
    pub steps: usize,
    /// Optimiser steps of the general-domain pretraining.
    pub pretrain_steps: usize,
    /// Utterances per step.
    pub batch: usize,
    /// Frames (tokens) per utterance.
    pub frames: usize,
    /// Accent domains (and experts).
    pub accents: usize,
    /// Held-out utterances per domain.
    pub test_utterances: usize,
    /// Model sizes.
    pub d_feat: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub vocab: usize,
    /// LoRA rank and alpha of every adapter.
    pub rank: usize,
    pub alpha: f32,
    /// `k` of the top-k MoLE.
    pub top_k: usize,
    /// Learning rates: full fine-tuning and pretraining; adapters and routers.
    pub lr_full: f64,
    pub lr_adapter: f64,
    /// The layers that receive adapters (see [`AsrModel::resolve_targets`]).
    pub targets: Vec<String>,
    /// HDMoLE: `λ` of the global/local mix (learned from this start) and the threshold's `θ` start.
    pub lambda: f32,
    pub init_theta: f32,
    /// HDMoLE: initialise each expert from a LoRA trained on its accent alone (`steps / 2` each).
    pub init_from_domain_lora: bool,
    /// Distortion strength `β` of the accents.
    pub accent_strength: f32,
    /// Noise `σ` of every frame.
    pub noise: f32,
    /// Where to train (default: the CPU).
    pub device: super::DemoDevice,
    /// The dtype the models run in (f32, f16 or bf16).
    pub dtype: DType,
}

impl Default for HdmoleDemoConfig {
    /// The command's default: under five minutes on two CPU cores.
    fn default() -> Self {
        HdmoleDemoConfig {
            seed: 7,
            steps: 300,
            pretrain_steps: 600,
            batch: 32,
            frames: 16,
            accents: 3,
            test_utterances: 64,
            d_feat: 24,
            d_model: 64,
            d_ff: 128,
            vocab: 16,
            rank: 8,
            alpha: 16.0,
            top_k: 2,
            lr_full: 2e-3,
            lr_adapter: 3e-3,
            targets: vec![
                "projector".into(),
                "decoder.q".into(),
                "decoder.v".into(),
                "decoder.o".into(),
            ],
            lambda: 0.5,
            init_theta: 0.0,
            init_from_domain_lora: true,
            accent_strength: 1.2,
            noise: 0.9,
            device: super::DemoDevice::Cpu,
            dtype: DType::F32,
        }
    }
}

impl HdmoleDemoConfig {
    /// The parameters of the demo's [`Domains`]: `d_feat`, `vocab`, `noise`, and `accents` distorted
    /// domains of strength `accent_strength`.
    pub fn domains(&self) -> DomainsConfig {
        DomainsConfig {
            d_feat: self.d_feat,
            vocab: self.vocab,
            noise: self.noise,
            count: self.accents,
            strength: self.accent_strength,
        }
    }

    /// A configuration small enough for a test (seconds).
    pub fn small() -> Self {
        HdmoleDemoConfig {
            steps: 120,
            pretrain_steps: 250,
            batch: 16,
            frames: 12,
            test_utterances: 32,
            ..Self::default()
        }
    }

    /// The smallest configuration that still shows the effect (the test suite's end-to-end run).
    pub fn tiny() -> Self {
        HdmoleDemoConfig {
            steps: 60,
            pretrain_steps: 150,
            batch: 16,
            frames: 8,
            test_utterances: 24,
            d_model: 32,
            d_ff: 64,
            ..Self::default()
        }
    }

    /// Checks the settings before any work: sizes of at least 1, finite positive learning rates,
    /// targets that name layers (none in the encoder, whose output gives HDMoLE's global accent
    /// posterior), a rank the kernels take and `top_k` within the accents.
    pub fn check(&self) -> Result<()> {
        super::check_counts(&[
            ("steps", self.steps),
            ("pretrain steps", self.pretrain_steps),
            ("batch", self.batch),
            ("frames", self.frames),
            ("accents", self.accents),
            ("test utterances", self.test_utterances),
            ("d_feat", self.d_feat),
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("vocab", self.vocab),
        ])?;
        super::check_learning_rates(&[("lr_full", self.lr_full), ("lr_adapter", self.lr_adapter)])?;
        check_targets(&self.targets)?;
        crate::LoraShape::new(self.accents, self.rank, self.d_model, self.d_model)?;
        crate::cpu::gating::check_k(self.top_k, self.accents)
    }
}

/// Checks the demo's `targets`: a non-empty list whose entries each name layers of the model
/// ([`AsrModel::resolve_targets`]), none of them in the encoder: HDMoLE's global accent posterior is
/// computed from the encoder's output, so an encoder layer cannot itself be routed by it.
pub fn check_targets(targets: &[String]) -> Result<Vec<&'static str>> {
    if targets.is_empty() {
        return Err(Error::Unsupported {
            op: "HDMoLE demo targets",
            what: "the list of target layers is empty".into(),
        });
    }
    let names = AsrModel::resolve_targets(targets)?;
    let encoder: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("encoder."))
        .collect();
    if !encoder.is_empty() {
        return Err(Error::Unsupported {
            op: "HDMoLE demo targets",
            what: format!(
                "{} cannot take adapters: HDMoLE's global accent posterior comes from the encoder, \
                 so the encoder must stay as pretrained",
                encoder.join(", ")
            ),
        });
    }
    Ok(names)
}

impl Domains {
    /// The domains of the HDMoLE demo: [`HdmoleDemoConfig::domains`], the general domain and one per
    /// accent.
    pub fn new(cfg: &HdmoleDemoConfig, rng: &mut Rng) -> Self {
        Self::from_config(&cfg.domains(), rng)
    }
}

/// One row of the results table.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResult {
    /// The method.
    pub name: String,
    /// Frame error (%) on the general domain.
    pub general_error: f32,
    /// Frame error (%) per accent.
    pub accent_errors: Vec<f32>,
    /// Trainable parameters.
    pub trainable: usize,
    /// Trainable parameters as % of full fine-tuning.
    pub trainable_pct: f32,
    /// Wall time of the method's training (s).
    pub seconds: f32,
}

impl MethodResult {
    /// Mean error over the accents.
    pub fn mean_accent_error(&self) -> f32 {
        self.accent_errors.iter().sum::<f32>() / self.accent_errors.len().max(1) as f32
    }
}

/// What the demo measured.
#[derive(Debug, Clone, PartialEq)]
pub struct HdmoleReport {
    /// The settings it ran with.
    pub config: HdmoleDemoConfig,
    /// The base model, then each method.
    pub rows: Vec<MethodResult>,
    /// HDMoLE: mean expert weight per domain (row 0 general, then the accents) and expert, over the
    /// tokens of the held-out set and the routed layers.
    pub routing: Vec<Vec<f32>>,
    /// HDMoLE: the learned threshold `τ` and mix `λ` of each routed layer.
    pub thresholds: Vec<(String, f32, f32)>,
    /// Accuracy (%) of the global accent classifier on the held-out accent utterances.
    pub global_router_accuracy: f32,
}

/// Frame error (%) of `model` on `(x, y)`.
fn frame_error(model: &AsrModel, x: &Tensor, y: &Tensor) -> Result<f32> {
    let pred = model.predict(x)?;
    let wrong = pred
        .ne(y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(100.0 * wrong)
}

struct TestSets {
    sets: Vec<(Tensor, Tensor)>,
}

impl TestSets {
    fn errors(&self, model: &AsrModel) -> Result<(f32, Vec<f32>)> {
        let general = frame_error(model, &self.sets[0].0, &self.sets[0].1)?;
        let accents = self.sets[1..]
            .iter()
            .map(|(x, y)| frame_error(model, x, y))
            .collect::<Result<Vec<_>>>()?;
        Ok((general, accents))
    }
}

/// Trains the model's trainable parameters (`with_global_router` adds the global router's) with
/// AdamW on batches from `domains`, `steps` steps; the loss is cross-entropy over frames.
#[allow(clippy::too_many_arguments)]
fn train(
    model: &AsrModel,
    data: &Domains,
    domains: &[usize],
    cfg: &HdmoleDemoConfig,
    steps: usize,
    lr: f64,
    rng: &mut Rng,
    label: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<f32> {
    let vars: Vec<_> = model
        .trainable_vars(false)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let mut opt = super::adam(vars, lr)?;
    let dev = model.device().clone();
    let mut last = f32::NAN;
    for step in 0..steps {
        let (x, y, _) = data.sample_mix(domains, cfg.batch, cfg.frames, rng, &dev)?;
        let out = model.forward(&x, Some(rng))?;
        let v = model.config().vocab;
        let loss =
            candle_nn::loss::cross_entropy(&out.logits.reshape(((), v))?, &y.flatten_all()?)?;
        opt.backward_step(&loss)?;
        if step % 10 == 0 || step + 1 == steps {
            last = loss.to_scalar::<f32>()?;
            progress(&format!(
                "{label}: step {}/{steps}, loss {last:.3}",
                step + 1
            ));
        }
    }
    Ok(last)
}

/// Trains the global router as an accent classifier on the (frozen) encoder's pooled states.
fn train_global_router(
    model: &mut AsrModel,
    data: &Domains,
    cfg: &HdmoleDemoConfig,
    rng: &mut Rng,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    model.layer_mut("global_router")?.set_train_base(true);
    let router = model.layer_mut("global_router")?.trainable_vars();
    let mut opt = super::adam(router.into_iter().map(|(_, v)| v).collect(), 1e-2)?;
    let accents: Vec<usize> = (1..=cfg.accents).collect();
    let dev = model.device().clone();
    let steps = (cfg.steps / 2).max(50);
    for step in 0..steps {
        let (x, _, ds) = data.sample_mix(&accents, cfg.batch, cfg.frames, rng, &dev)?;
        let (enc, _) = model.encode(&x, &mut Default::default())?;
        let logits = model.global_logits(&enc)?;
        let target: Vec<u32> = ds.iter().map(|&d| (d - 1) as u32).collect();
        let target = Tensor::from_vec(target, ds.len(), &dev)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
        opt.backward_step(&loss)?;
        if step % 10 == 0 || step + 1 == steps {
            progress(&format!(
                "hdmole global router: step {}/{steps}, loss {:.3}",
                step + 1,
                loss.to_scalar::<f32>()?
            ));
        }
    }
    // Frozen from here on: HDMoLE's global router is a fixed accent classifier.
    model.layer_mut("global_router")?.set_train_base(false);
    Ok(())
}

fn global_accuracy(model: &AsrModel, tests: &TestSets) -> Result<f32> {
    let mut right = 0usize;
    let mut total = 0usize;
    for (d, (x, _)) in tests.sets.iter().enumerate().skip(1) {
        let (enc, _) = model.encode(x, &mut Default::default())?;
        let pred: Vec<u32> = model
            .global_logits(&enc)?
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1()?;
        right += pred.iter().filter(|&&p| p as usize == d - 1).count();
        total += pred.len();
    }
    Ok(100.0 * right as f32 / total.max(1) as f32)
}

/// Runs the demo: pretraining, the four methods, the routing table. `progress` receives status
/// lines; with `out_dir`, the report is written there as `report.json` and each method's adapters as
/// `<method>.safetensors`.
pub fn run_hdmole_demo(
    cfg: &HdmoleDemoConfig,
    out_dir: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<HdmoleReport> {
    cfg.check()?;
    let dev = cfg.device.candle()?;
    let mut rng = Rng::new(cfg.seed);
    let data = Domains::new(cfg, &mut rng);
    let tests = TestSets {
        sets: (0..data.len())
            .map(|d| data.sample(d, cfg.test_utterances, cfg.frames, &mut rng, &dev))
            .collect::<Result<Vec<_>>>()?,
    };
    let acfg = AsrConfig {
        d_feat: cfg.d_feat,
        d_model: cfg.d_model,
        d_ff: cfg.d_ff,
        vocab: cfg.vocab,
        num_domains: cfg.accents,
    };
    let accents: Vec<usize> = (1..=cfg.accents).collect();

    // Pretraining on the general domain.
    let t0 = Instant::now();
    let mut base = AsrModel::new(acfg, &mut rng, &dev)?;
    base.to_dtype(cfg.dtype)?;
    train(
        &base,
        &data,
        &[0],
        cfg,
        cfg.pretrain_steps,
        cfg.lr_full,
        &mut rng,
        "pretrain",
        progress,
    )?;
    let full_params = base.num_base_params();
    let (g, a) = tests.errors(&base)?;
    let mut rows = vec![MethodResult {
        name: "base (general domain only)".into(),
        general_error: g,
        accent_errors: a,
        trainable: 0,
        trainable_pct: 0.0,
        seconds: t0.elapsed().as_secs_f32(),
    }];
    let mut saved: Vec<(String, AsrModel)> = Vec::new();

    let finish = |name: &str,
                  model: AsrModel,
                  t: Instant,
                  rows: &mut Vec<MethodResult>|
     -> Result<AsrModel> {
        let trainable: usize = model
            .trainable_vars(false)
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        let (g, a) = tests.errors(&model)?;
        rows.push(MethodResult {
            name: name.into(),
            general_error: g,
            accent_errors: a,
            trainable,
            trainable_pct: 100.0 * trainable as f32 / full_params as f32,
            seconds: t.elapsed().as_secs_f32(),
        });
        Ok(model)
    };

    // 1. Full fine-tuning.
    let t = Instant::now();
    let mut full = base.deep_clone()?;
    full.set_train_base(true);
    train(
        &full,
        &data,
        &accents,
        cfg,
        cfg.steps,
        cfg.lr_full,
        &mut rng,
        "full fine-tuning",
        progress,
    )?;
    finish("full fine-tuning", full, t, &mut rows)?;

    // 2. One LoRA.
    let t = Instant::now();
    let mut lora = base.deep_clone()?;
    lora.add_experts(
        &cfg.targets,
        MoleConfig::lora(cfg.rank, cfg.alpha),
        &mut rng,
    )?;
    train(
        &lora,
        &data,
        &accents,
        cfg,
        cfg.steps,
        cfg.lr_adapter,
        &mut rng,
        "one LoRA",
        progress,
    )?;
    saved.push(("lora".into(), finish("one LoRA", lora, t, &mut rows)?));

    // 3. MoLE, top-k.
    let t = Instant::now();
    let mut topk = base.deep_clone()?;
    let topk_cfg = MoleConfig {
        num_experts: cfg.accents,
        gate: GateMode::TopK {
            k: cfg.top_k,
            renormalize: true,
        },
        ..MoleConfig::lora(cfg.rank, cfg.alpha)
    };
    topk.add_experts(&cfg.targets, topk_cfg, &mut rng)?;
    train(
        &topk,
        &data,
        &accents,
        cfg,
        cfg.steps,
        cfg.lr_adapter,
        &mut rng,
        "MoLE top-k",
        progress,
    )?;
    saved.push((
        "mole_topk".into(),
        finish(&format!("MoLE top-{}", cfg.top_k), topk, t, &mut rows)?,
    ));

    // 4. HDMoLE.
    let t = Instant::now();
    let mut hd = base.deep_clone()?;
    let hd_cfg = MoleConfig {
        num_experts: cfg.accents,
        gate: GateMode::Threshold(ThresholdMode::Learned {
            init_theta: cfg.init_theta,
        }),
        hierarchy: Some(Combine::Mix {
            lambda: cfg.lambda,
            learned: true,
        }),
        ..MoleConfig::lora(cfg.rank, cfg.alpha)
    };
    hd.add_experts(&cfg.targets, hd_cfg, &mut rng)?;
    train_global_router(&mut hd, &data, cfg, &mut rng, progress)?;
    let global_router_accuracy = global_accuracy(&hd, &tests)?;
    if cfg.init_from_domain_lora {
        init_from_domain_loras(&mut hd, &base, &data, cfg, &mut rng, progress)?;
    }
    train(
        &hd,
        &data,
        &accents,
        cfg,
        cfg.steps,
        cfg.lr_adapter,
        &mut rng,
        "HDMoLE",
        progress,
    )?;
    let hd = finish("HDMoLE", hd, t, &mut rows)?;

    let routing = routing_table(&hd, &tests, cfg.accents)?;
    let thresholds = hd
        .layers()
        .iter()
        .filter(|l| l.config().is_some())
        .map(|l| {
            Ok((
                l.name().to_string(),
                l.threshold()?.unwrap_or(f32::NAN),
                l.lambda()?.unwrap_or(f32::NAN),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    saved.push(("hdmole".into(), hd));

    let report = HdmoleReport {
        config: cfg.clone(),
        rows,
        routing,
        thresholds,
        global_router_accuracy,
    };
    if let Some(dir) = out_dir {
        let saved: Vec<(&str, &[MoleLinear])> = saved
            .iter()
            .map(|(name, m)| (name.as_str(), m.layers()))
            .collect();
        super::write_outputs(dir, &report.to_json(), &saved)?;
    }
    Ok(report)
}

/// Trains one single-expert LoRA per accent (on that accent alone) from the base, and copies each
/// into the matching expert of `hd`'s layers.
fn init_from_domain_loras(
    hd: &mut AsrModel,
    base: &AsrModel,
    data: &Domains,
    cfg: &HdmoleDemoConfig,
    rng: &mut Rng,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let mut per_domain = Vec::with_capacity(cfg.accents);
    for d in 1..=cfg.accents {
        let mut m = base.deep_clone()?;
        m.add_experts(&cfg.targets, MoleConfig::lora(cfg.rank, cfg.alpha), rng)?;
        train(
            &m,
            data,
            &[d],
            cfg,
            (cfg.steps / 2).max(1),
            cfg.lr_adapter,
            rng,
            &format!("HDMoLE expert init, accent {d}"),
            progress,
        )?;
        per_domain.push(m);
    }
    let names: Vec<String> = hd
        .layers()
        .iter()
        .filter(|l| l.config().is_some())
        .map(|l| l.name().to_string())
        .collect();
    for name in names {
        let mut pairs = Vec::with_capacity(per_domain.len());
        for m in &per_domain {
            let l = m
                .layers()
                .iter()
                .find(|l| l.name() == name)
                .ok_or_else(|| Error::Unsupported {
                    op: "HDMoLE expert init",
                    what: format!("layer {name} missing in a domain LoRA"),
                })?;
            pairs.push(l.lora_pair()?);
        }
        let refs: Vec<_> = pairs.iter().collect();
        hd.layer_mut(&name)?.init_experts_from(&refs)?;
    }
    Ok(())
}

/// Mean expert weight per domain and expert over the held-out tokens and the routed layers.
fn routing_table(model: &AsrModel, tests: &TestSets, experts: usize) -> Result<Vec<Vec<f32>>> {
    let mut table = Vec::with_capacity(tests.sets.len());
    for (x, _) in &tests.sets {
        let out = model.forward(x, None)?;
        let mut row = vec![0.0f32; experts];
        let n = out.routing.len().max(1) as f32;
        for (_, r) in &out.routing {
            let mean: Vec<f32> = r.weights()?.mean(0)?.to_vec1()?;
            for (acc, v) in row.iter_mut().zip(mean) {
                *acc += v / n;
            }
        }
        table.push(row);
    }
    Ok(table)
}

impl HdmoleReport {
    /// The results as Markdown: the methods table, the routing table and the thresholds.
    pub fn to_markdown(&self) -> String {
        let accents = self.config.accents;
        let mut s = String::new();
        s.push_str("| method | general error % | ");
        for a in 1..=accents {
            s.push_str(&format!("accent {a} error % | "));
        }
        s.push_str(
            "mean accent error % | trainable params | % of full FT | train time s |\n|---|---:|",
        );
        for _ in 0..accents {
            s.push_str("---:|");
        }
        s.push_str("---:|---:|---:|---:|\n");
        for r in &self.rows {
            s.push_str(&format!("| {} | {:.1} | ", r.name, r.general_error));
            for e in &r.accent_errors {
                s.push_str(&format!("{e:.1} | "));
            }
            s.push_str(&format!(
                "{:.1} | {} | {:.1} | {:.1} |\n",
                r.mean_accent_error(),
                r.trainable,
                r.trainable_pct,
                r.seconds
            ));
        }
        s.push_str("\nHDMoLE routing: mean expert weight per domain (held-out tokens, all routed layers)\n\n| domain |");
        for e in 0..accents {
            s.push_str(&format!(" expert {e} |"));
        }
        s.push_str("\n|---|");
        for _ in 0..accents {
            s.push_str("---:|");
        }
        s.push('\n');
        for (d, row) in self.routing.iter().enumerate() {
            let name = if d == 0 {
                "general".to_string()
            } else {
                format!("accent {d}")
            };
            s.push_str(&format!("| {name} |"));
            for v in row {
                s.push_str(&format!(" {v:.2} |"));
            }
            s.push('\n');
        }
        s.push_str(&format!(
            "\nGlobal accent router accuracy on held-out accent utterances: {:.1}%\n\nHDMoLE learned thresholds τ = σ(θ)/E and mix λ per layer\n\n| layer | τ | λ |\n|---|---:|---:|\n",
            self.global_router_accuracy
        ));
        for (name, tau, lam) in &self.thresholds {
            s.push_str(&format!("| {name} | {tau:.4} | {lam:.3} |\n"));
        }
        s
    }

    /// The results as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "config": {
                "seed": c.seed, "steps": c.steps, "pretrain_steps": c.pretrain_steps,
                "batch": c.batch, "frames": c.frames, "accents": c.accents,
                "d_feat": c.d_feat, "d_model": c.d_model, "d_ff": c.d_ff, "vocab": c.vocab,
                "rank": c.rank, "alpha": c.alpha, "top_k": c.top_k, "targets": c.targets,
                "init_from_domain_lora": c.init_from_domain_lora,
            },
            "methods": self.rows.iter().map(|r| serde_json::json!({
                "name": r.name, "general_error_pct": r.general_error,
                "accent_error_pct": r.accent_errors, "mean_accent_error_pct": r.mean_accent_error(),
                "trainable_params": r.trainable, "trainable_pct_of_full": r.trainable_pct,
                "train_seconds": r.seconds,
            })).collect::<Vec<_>>(),
            "hdmole_routing_domain_by_expert": self.routing,
            "hdmole_layers": self.thresholds.iter().map(|(n, t, l)| serde_json::json!({
                "layer": n, "tau": t, "lambda": l
            })).collect::<Vec<_>>(),
            "global_router_accuracy_pct": self.global_router_accuracy,
        })
    }
}
