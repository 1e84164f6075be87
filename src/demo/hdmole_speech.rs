//! `molora demo hdmole` on speech (the default; `--data synthetic` runs [`super::hdmole`]): HDMoLE
//! against full fine-tuning, one LoRA and top-k MoLE on accented speech synthesised by espeak-ng,
//! recognised by an LLM-ASR model ([`LlmAsr`]) that decodes, scored by word error rate.
//!
//! The data ([`crate::speech::data`]): sentences of a small grammar, split into training sentences
//! and held-out sentences that no model ever trains on; the general domain spoken in `en-us`, four
//! accent domains in espeak-ng's English accents (`en-gb-scotland`, `en-029`, `en-gb-x-gbclan`,
//! `en-gb-x-gbcwmd`), each by several voice variants. The model is pretrained on the general domain;
//! then each method fine-tunes a copy on the accents alone:
//!
//! 1. full fine-tuning (every weight),
//! 2. one LoRA on the target layers,
//! 3. MoLE with a top-k local router (one expert per accent),
//! 4. HDMoLE: a frozen global accent classifier over the mean encoder state (trained first), each
//!    layer's local router mixed with its posterior, learned per-layer thresholds, experts started
//!    from one LoRA per accent.
//!
//! Every model is scored by greedy (or beam, `beam > 1`) decoding of the held-out utterances of every
//! domain: WER on the accents (what was trained) and on the general domain (forgetting).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use candle_nn::Optimizer;

use super::speech_asr::{score, train, Example, RecogniserConfig, SpeechData};
use crate::error::{Error, Result};
use crate::model::linear::{Combine, GateMode, MoleConfig, MoleLinear, ThresholdMode};
use crate::model::llm_asr::{LlmAsr, LlmAsrConfig};
use crate::Rng;

/// Settings of the HDMoLE speech demo.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechHdmoleConfig {
    /// Seed of the data recipe, the batches and every initialisation.
    pub seed: u64,
    /// Training utterances of the general domain (pretraining).
    pub general_train: usize,
    /// Training utterances per accent.
    pub accent_train: usize,
    /// Held-out utterances per domain (the general domain and each accent).
    pub test_per_domain: usize,
    /// espeak-ng voice variants per domain.
    pub variants: usize,
    /// Accent domains (1 to 4), and so experts.
    pub accents: usize,
    /// Optimiser steps of the general-domain pretraining and of each fine-tuning method.
    pub pretrain_steps: usize,
    pub steps: usize,
    /// Utterances per step.
    pub batch: usize,
    /// Model sizes.
    pub d_model: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    /// LoRA rank and alpha of every adapter.
    pub rank: usize,
    pub alpha: f32,
    /// `k` of the top-k MoLE.
    pub top_k: usize,
    /// Learning rates: pretraining and full fine-tuning; adapters and routers.
    pub lr_full: f64,
    pub lr_adapter: f64,
    /// The layers that receive adapters (see [`LlmAsr::resolve_targets`]).
    pub targets: Vec<String>,
    /// HDMoLE: `λ` of the global/local mix (learned from this start) and the threshold's `θ` start.
    pub lambda: f32,
    pub init_theta: f32,
    /// HDMoLE: initialise each expert from a LoRA trained on its accent alone (`steps / 2` each).
    pub init_from_domain_lora: bool,
    /// Beam width of the decoding (1: greedy).
    pub beam: usize,
    /// Where the synthesised corpus is cached (default: [`crate::speech::data::default_cache_root`]).
    pub cache_root: Option<PathBuf>,
    /// Where to train.
    pub device: super::DemoDevice,
    /// The dtype the models run in (f32, f16 or bf16).
    pub dtype: DType,
}

impl Default for SpeechHdmoleConfig {
    /// The command's default (see the README for its time on two CPU cores).
    fn default() -> Self {
        SpeechHdmoleConfig {
            seed: 1,
            general_train: 600,
            accent_train: 150,
            test_per_domain: 40,
            variants: 3,
            accents: 4,
            pretrain_steps: 1500,
            steps: 300,
            batch: 16,
            d_model: 96,
            heads: 4,
            d_ff: 192,
            enc_layers: 2,
            dec_layers: 2,
            rank: 8,
            alpha: 16.0,
            top_k: 2,
            lr_full: 1e-3,
            lr_adapter: 2e-3,
            targets: vec!["projector".into(), "decoder".into()],
            lambda: 0.5,
            init_theta: 0.0,
            init_from_domain_lora: true,
            beam: 1,
            cache_root: None,
            device: super::DemoDevice::Cpu,
            dtype: DType::F32,
        }
    }
}

impl SpeechHdmoleConfig {
    /// A configuration for the test suite (about a minute on two cores, data included).
    pub fn small() -> Self {
        SpeechHdmoleConfig {
            general_train: 300,
            accent_train: 60,
            test_per_domain: 16,
            accents: 2,
            pretrain_steps: 700,
            steps: 100,
            d_model: 64,
            d_ff: 128,
            enc_layers: 1,
            dec_layers: 1,
            ..Self::default()
        }
    }

    /// The data and recogniser part of the settings.
    pub fn recogniser(&self) -> RecogniserConfig {
        RecogniserConfig {
            seed: self.seed,
            general_train: self.general_train,
            accent_train: self.accent_train,
            test_per_domain: self.test_per_domain,
            variants: self.variants,
            accents: self.accents,
            pretrain_steps: self.pretrain_steps,
            lr: self.lr_full,
            batch: self.batch,
            d_model: self.d_model,
            heads: self.heads,
            d_ff: self.d_ff,
            enc_layers: self.enc_layers,
            dec_layers: self.dec_layers,
            cache_root: self.cache_root.clone(),
            device: self.device,
            dtype: self.dtype,
        }
    }

    /// The model's sizes.
    pub fn model(&self) -> LlmAsrConfig {
        self.recogniser().model()
    }

    /// Checks the settings before any work: the recogniser's ([`RecogniserConfig::check`]), counts
    /// of at least 1, finite positive learning rates, targets that name layers outside the encoder
    /// (HDMoLE's global accent posterior comes from it), a rank the kernels take and `top_k` within
    /// the accents.
    pub fn check(&self) -> Result<()> {
        self.recogniser().check()?;
        super::check_counts(&[("steps", self.steps), ("beam", self.beam)])?;
        super::check_learning_rates(&[("lr_adapter", self.lr_adapter)])?;
        check_targets(&self.model(), &self.targets)?;
        crate::LoraShape::new(self.accents, self.rank, self.d_model, self.d_model)?;
        crate::gate::check_k(self.top_k, self.accents)
    }
}

/// Checks `targets` for the speech model: a non-empty list of entries that each select layers
/// ([`LlmAsr::resolve_targets`]), none in the encoder (whose output gives the global posterior).
pub fn check_targets(cfg: &LlmAsrConfig, targets: &[String]) -> Result<Vec<String>> {
    if targets.is_empty() {
        return Err(Error::Unsupported {
            op: "HDMoLE demo targets",
            what: "the list of target layers is empty".into(),
        });
    }
    let names = LlmAsr::resolve_targets(cfg, targets)?;
    let encoder: Vec<&str> = names
        .iter()
        .map(String::as_str)
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

/// One row of the results table.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechMethodResult {
    /// The method.
    pub name: String,
    /// WER (%) on the general domain's held-out utterances.
    pub general_wer: f32,
    /// WER (%) per accent.
    pub accent_wers: Vec<f32>,
    /// CER (%) over every accent's held-out utterances.
    pub accent_cer: f32,
    /// Trainable parameters.
    pub trainable: usize,
    /// Trainable parameters as % of full fine-tuning.
    pub trainable_pct: f32,
    /// Bytes of the model (base weights and any adapters and routers).
    pub model_bytes: usize,
    /// Wall time of the method's training (s).
    pub seconds: f32,
}

impl SpeechMethodResult {
    /// Mean WER over the accents.
    pub fn mean_accent_wer(&self) -> f32 {
        self.accent_wers.iter().sum::<f32>() / self.accent_wers.len().max(1) as f32
    }
}

/// What the speech demo measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechHdmoleReport {
    /// The settings it ran with.
    pub config: SpeechHdmoleConfig,
    /// The domains' names (the general domain first).
    pub domains: Vec<String>,
    /// The base model, then each method.
    pub rows: Vec<SpeechMethodResult>,
    /// HDMoLE: mean expert weight per domain (row 0 general, then the accents) and expert, over the
    /// held-out utterances' positions and the routed layers.
    pub routing: Vec<Vec<f32>>,
    /// HDMoLE: the learned threshold `τ` and mix `λ` of each routed layer.
    pub thresholds: Vec<(String, f32, f32)>,
    /// Accuracy (%) of the global accent classifier on the held-out accent utterances.
    pub global_router_accuracy: f32,
    /// Seconds spent making (or reading) the speech data, and whether it came from the cache.
    pub data_seconds: f32,
    pub data_cached: bool,
    /// Training and held-out utterances in all.
    pub train_utterances: usize,
    pub test_utterances: usize,
}

/// Trains the global router as an accent classifier on the (frozen) encoder's mean state.
fn train_global_router(
    model: &mut LlmAsr,
    data: &SpeechData,
    cfg: &SpeechHdmoleConfig,
    rng: &mut Rng,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    model.layer_mut("global_router")?.set_train_base(true);
    let router = model.layer_mut("global_router")?.trainable_vars();
    let mut opt = super::adam(router.into_iter().map(|(_, v)| v).collect(), 3e-3)?;
    let accents: Vec<usize> = (1..=cfg.accents).collect();
    let dev = model.device().clone();
    let steps = cfg.steps.max(50);
    for step in 0..steps {
        let (batch, ds) = data.sample(&accents, cfg.batch, rng, &dev)?;
        let enc = model.encode(&batch.features, &mut Default::default(), &mut Vec::new())?;
        let logits = model.global_logits(&enc)?;
        let target: Vec<u32> = ds.iter().map(|&d| (d - 1) as u32).collect();
        let target = Tensor::from_vec(target, ds.len(), &dev)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
        opt.backward_step(&loss)?;
        if step % 20 == 0 || step + 1 == steps {
            progress(&format!(
                "HDMoLE global router: step {}/{steps}, loss {:.3}",
                step + 1,
                loss.to_scalar::<f32>()?
            ));
        }
    }
    // Frozen from here on: HDMoLE's global router is a fixed accent classifier.
    model.layer_mut("global_router")?.set_train_base(false);
    Ok(())
}

fn global_accuracy(model: &LlmAsr, data: &SpeechData) -> Result<f32> {
    let dev = model.device().clone();
    let (mut right, mut total) = (0usize, 0usize);
    for (d, set) in data.test.iter().enumerate().skip(1) {
        for chunk in set.chunks(32) {
            let items: Vec<&Example> = chunk.iter().collect();
            let b = data.batch_of(&items, &dev)?;
            let enc = model.encode(&b.features, &mut Default::default(), &mut Vec::new())?;
            let pred: Vec<u32> = model
                .global_logits(&enc)?
                .argmax(D::Minus1)?
                .to_dtype(DType::U32)?
                .to_vec1()?;
            right += pred.iter().filter(|&&p| p as usize == d - 1).count();
            total += pred.len();
        }
    }
    Ok(100.0 * right as f32 / total.max(1) as f32)
}

/// Mean expert weight per domain and expert over the held-out utterances (teacher-forced) and the
/// routed layers.
fn routing_table(model: &LlmAsr, data: &SpeechData, experts: usize) -> Result<Vec<Vec<f32>>> {
    let dev = model.device().clone();
    let mut table = Vec::with_capacity(data.test.len());
    for set in &data.test {
        let items: Vec<&Example> = set.iter().collect();
        let b = data.batch_of(&items, &dev)?;
        let out = model.forward(&b, None)?;
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

/// Trains one single-expert LoRA per accent (on that accent alone) from the base and copies each
/// into the matching expert of `hd`'s routed layers.
fn init_from_domain_loras(
    hd: &mut LlmAsr,
    base: &LlmAsr,
    data: &SpeechData,
    cfg: &SpeechHdmoleConfig,
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
            cfg.batch,
            (cfg.steps / 2).max(1),
            cfg.lr_adapter,
            rng,
            &format!("HDMoLE expert init, {}", data.names[d]),
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
        let pairs = per_domain
            .iter()
            .map(|m| {
                m.layers()
                    .iter()
                    .find(|l| l.name() == name)
                    .ok_or_else(|| Error::Unsupported {
                        op: "HDMoLE expert init",
                        what: format!("layer {name} missing in a domain LoRA"),
                    })?
                    .lora_pair()
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<_> = pairs.iter().collect();
        hd.layer_mut(&name)?.init_experts_from(&refs)?;
    }
    Ok(())
}

fn model_bytes(model: &LlmAsr) -> usize {
    let base = model.base_bytes();
    let extra: usize = model
        .layers()
        .iter()
        .filter(|l| l.config().is_some())
        .flat_map(|l| l.trainable_vars())
        .map(|(_, v)| v.as_tensor().elem_count() * v.as_tensor().dtype().size_in_bytes())
        .sum();
    base + extra
}

/// Runs the demo: data, pretraining, the four methods, the routing table. `progress` receives status
/// lines; with `out_dir`, the report is written there as `report.json` and each adapter method's
/// experts as `lora.safetensors`, `mole_topk.safetensors` and `hdmole.safetensors`.
pub fn run_speech_hdmole_demo(
    cfg: &SpeechHdmoleConfig,
    out_dir: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<SpeechHdmoleReport> {
    cfg.check()?;
    cfg.device.candle()?;
    progress("speech data: synthesising with espeak-ng (or reading the cache)");
    let data = SpeechData::build(&cfg.recogniser())?;
    progress(&format!(
        "speech data: {} s ({})",
        data.seconds as u32,
        if data.cached { "cached" } else { "synthesised" }
    ));
    let mut rng = Rng::new(cfg.seed ^ 0xa5a5);
    let accents: Vec<usize> = (1..=cfg.accents).collect();

    let t0 = Instant::now();
    let base = cfg.recogniser().pretrain(&data, &mut rng, progress)?;
    let full_params = base.num_base_params();
    let mut rows = Vec::new();
    let mut finish = |name: &str,
                      model: &LlmAsr,
                      t: Instant,
                      trainable: usize,
                      progress: &mut dyn FnMut(&str)|
     -> Result<()> {
        let seconds = t.elapsed().as_secs_f32();
        progress(&format!("{name}: decoding the held-out sets"));
        let (w, c) = score(model, &data, cfg.beam)?;
        rows.push(SpeechMethodResult {
            name: name.into(),
            general_wer: w[0],
            accent_wers: w[1..].to_vec(),
            accent_cer: c,
            trainable,
            trainable_pct: 100.0 * trainable as f32 / full_params.max(1) as f32,
            model_bytes: model_bytes(model),
            seconds,
        });
        progress(&format!(
            "{name}: general WER {:.1}%, accent WER {:.1}%",
            w[0],
            w[1..].iter().sum::<f32>() / (w.len() - 1).max(1) as f32
        ));
        Ok(())
    };
    finish("base (general domain only)", &base, t0, 0, progress)?;
    let count = |m: &LlmAsr| -> usize {
        m.trainable_vars(false)
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    };

    // 1. Full fine-tuning.
    let t = Instant::now();
    let full = base.deep_clone()?;
    train(
        &full,
        &data,
        &accents,
        cfg.batch,
        cfg.steps,
        cfg.lr_full,
        &mut rng,
        "full fine-tuning",
        progress,
    )?;
    finish("full fine-tuning", &full, t, count(&full), progress)?;
    drop(full);

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
        cfg.batch,
        cfg.steps,
        cfg.lr_adapter,
        &mut rng,
        "one LoRA",
        progress,
    )?;
    finish("one LoRA", &lora, t, count(&lora), progress)?;

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
        cfg.batch,
        cfg.steps,
        cfg.lr_adapter,
        &mut rng,
        "MoLE top-k",
        progress,
    )?;
    finish(
        &format!("MoLE top-{}", cfg.top_k),
        &topk,
        t,
        count(&topk),
        progress,
    )?;

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
    let global_router_accuracy = global_accuracy(&hd, &data)?;
    if cfg.init_from_domain_lora {
        init_from_domain_loras(&mut hd, &base, &data, cfg, &mut rng, progress)?;
    }
    train(
        &hd,
        &data,
        &accents,
        cfg.batch,
        cfg.steps,
        cfg.lr_adapter,
        &mut rng,
        "HDMoLE",
        progress,
    )?;
    finish("HDMoLE", &hd, t, count(&hd), progress)?;

    let routing = routing_table(&hd, &data, cfg.accents)?;
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
    let report = SpeechHdmoleReport {
        config: cfg.clone(),
        domains: data.names.clone(),
        rows,
        routing,
        thresholds,
        global_router_accuracy,
        data_seconds: data.seconds,
        data_cached: data.cached,
        train_utterances: data.train.iter().map(Vec::len).sum(),
        test_utterances: data.test.iter().map(Vec::len).sum(),
    };
    if let Some(dir) = out_dir {
        let saved: [(&str, &[MoleLinear]); 3] = [
            ("lora", lora.layers()),
            ("mole_topk", topk.layers()),
            ("hdmole", hd.layers()),
        ];
        super::write_outputs(dir, &report.to_json(), &saved)?;
    }
    Ok(report)
}

impl SpeechHdmoleReport {
    /// The results as Markdown: the methods table, the routing table and the thresholds.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from("| method | general WER % |");
        for d in &self.domains[1..] {
            s.push_str(&format!(" {d} WER % |"));
        }
        s.push_str(
            " mean accent WER % | accent CER % | trainable params | % of full FT | model bytes | train time s |\n|---|---:|",
        );
        for _ in 1..self.domains.len() {
            s.push_str("---:|");
        }
        s.push_str("---:|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            s.push_str(&format!("| {} | {:.1} |", r.name, r.general_wer));
            for e in &r.accent_wers {
                s.push_str(&format!(" {e:.1} |"));
            }
            s.push_str(&format!(
                " {:.1} | {:.1} | {} | {:.1} | {} | {:.0} |\n",
                r.mean_accent_wer(),
                r.accent_cer,
                r.trainable,
                r.trainable_pct,
                r.model_bytes,
                r.seconds
            ));
        }
        s.push_str("\nHDMoLE routing: mean expert weight per domain (held-out utterances, all routed layers)\n\n| domain |");
        for e in 1..self.domains.len() {
            s.push_str(&format!(" expert {} ({}) |", e - 1, self.domains[e]));
        }
        s.push_str("\n|---|");
        for _ in 1..self.domains.len() {
            s.push_str("---:|");
        }
        s.push('\n');
        for (name, row) in self.domains.iter().zip(&self.routing) {
            s.push_str(&format!("| {name} |"));
            for v in row {
                s.push_str(&format!(" {v:.2} |"));
            }
            s.push('\n');
        }
        s.push_str(&format!(
            "\nGlobal accent router accuracy on held-out accent utterances: {:.1}%\n\
             Data: {} training and {} held-out utterances, {:.0} s ({})\n\n\
             HDMoLE learned thresholds τ and mix λ per layer\n\n| layer | τ | λ |\n|---|---:|---:|\n",
            self.global_router_accuracy,
            self.train_utterances,
            self.test_utterances,
            self.data_seconds,
            if self.data_cached { "read from the cache" } else { "synthesised" }
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
            "data": "speech",
            "config": {
                "seed": c.seed, "general_train": c.general_train, "accent_train": c.accent_train,
                "test_per_domain": c.test_per_domain, "variants": c.variants, "accents": c.accents,
                "pretrain_steps": c.pretrain_steps, "steps": c.steps, "batch": c.batch,
                "d_model": c.d_model, "heads": c.heads, "d_ff": c.d_ff,
                "enc_layers": c.enc_layers, "dec_layers": c.dec_layers,
                "rank": c.rank, "alpha": c.alpha, "top_k": c.top_k, "targets": c.targets,
                "init_from_domain_lora": c.init_from_domain_lora, "beam": c.beam,
                "dtype": format!("{:?}", c.dtype),
            },
            "domains": self.domains,
            "methods": self.rows.iter().map(|r| serde_json::json!({
                "name": r.name, "general_wer_pct": r.general_wer,
                "accent_wer_pct": r.accent_wers, "mean_accent_wer_pct": r.mean_accent_wer(),
                "accent_cer_pct": r.accent_cer,
                "trainable_params": r.trainable, "trainable_pct_of_full": r.trainable_pct,
                "model_bytes": r.model_bytes, "train_seconds": r.seconds,
            })).collect::<Vec<_>>(),
            "hdmole_routing_domain_by_expert": self.routing,
            "hdmole_layers": self.thresholds.iter().map(|(n, t, l)| serde_json::json!({
                "layer": n, "tau": t, "lambda": l
            })).collect::<Vec<_>>(),
            "global_router_accuracy_pct": self.global_router_accuracy,
            "data_seconds": self.data_seconds, "data_cached": self.data_cached,
            "train_utterances": self.train_utterances, "test_utterances": self.test_utterances,
        })
    }
}
