//! `molora demo saml`: SAML on an NF4-quantised Whisper-shaped model, adapted per target speaker.
//!
//! Data: the synthetic task shared with the HDMoLE demo ([`Domains`]) read as speech: an utterance is `L`
//! tokens, each rendered as a frame by its speaker's own affine distortion of the token's prototype.
//! Speakers `1..=P` form the pretraining pool, the next `E` are the training speakers whose rank-1
//! LoRAs become the experts, the last `S` are the target speakers adapted to at test time.
//!
//! Steps: pretrain the full-precision model on the pool; quantise it to NF4 (block 64); train one
//! rank-1 LoRA per training speaker on the quantised model; then per target speaker, from
//! `adapt_utterances` of its speech, adapt (a) one fresh LoRA and (b) SAML — experts initialised from
//! the training speakers' LoRAs, routers new; router and experts trained by two Adam optimisers that
//! take turns every step, learning rates ×0.9 per epoch (PAPERS.md) — and score everything on held-out
//! utterances of that speaker (token error, teacher-forced).

use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::Optimizer;

use super::domains::{Domains, DomainsConfig};
use super::{adam, param_count as count, shuffled};
use crate::error::{Error, Result};
use crate::model::linear::QuantFormat;
use crate::model::saml::{SamlConfig, SamlModel};
use crate::Rng;

/// Settings of the SAML demo (PAPERS.md's defaults where it gives them).
#[derive(Debug, Clone, PartialEq)]
pub struct SamlDemoConfig {
    pub seed: u64,
    /// Model sizes.
    pub model: SamlConfig,
    /// Frames per utterance.
    pub frames: usize,
    /// Pretraining speakers, experts (training speakers), target speakers.
    pub pool_speakers: usize,
    pub experts: usize,
    pub target_speakers: usize,
    /// Pretraining steps and batch.
    pub pretrain_steps: usize,
    pub batch: usize,
    /// Steps of each training speaker's LoRA.
    pub expert_steps: usize,
    /// Adaptation: utterances of the target speaker, epochs, batch (PAPERS.md: ~60, 10, 8).
    pub adapt_utterances: usize,
    pub epochs: usize,
    pub adapt_batch: usize,
    /// Held-out utterances per target speaker.
    pub test_utterances: usize,
    /// LoRA rank and alpha (PAPERS.md: 1 and 4).
    pub rank: usize,
    pub alpha: f32,
    /// Learning rates: router, experts (PAPERS.md's 1e-3 and 3e-4, the defaults), the one-LoRA
    /// baseline, and pretraining; all adaptation rates ×`lr_decay` per epoch. On this small
    /// synthetic model PAPERS.md's rates move SAML little in 10 epochs of 60 utterances; 3e-3 for
    /// both (the one-LoRA baseline's rate) is what the README's second SAML run uses.
    pub lr_router: f64,
    pub lr_experts: f64,
    pub lr_lora: f64,
    pub lr_pretrain: f64,
    pub lr_decay: f64,
    /// Router softmax temperature.
    pub temperature: f32,
    /// Speaker distortion strength and frame noise.
    pub speaker_strength: f32,
    pub noise: f32,
    /// Base quantisation.
    pub quant: QuantFormat,
    /// Where to train (default: the CPU).
    pub device: super::DemoDevice,
    /// The dtype the models run in (f32, f16 or bf16).
    pub dtype: DType,
}

impl Default for SamlDemoConfig {
    /// The command's default: a few minutes on two CPU cores.
    fn default() -> Self {
        SamlDemoConfig {
            seed: 11,
            model: SamlConfig {
                d_feat: 24,
                d_model: 64,
                d_ff: 128,
                vocab: 16,
                enc_layers: 1,
                dec_layers: 1,
                max_len: 16,
                router_channels: 16,
            },
            frames: 6,
            pool_speakers: 12,
            experts: 6,
            target_speakers: 3,
            pretrain_steps: 2500,
            batch: 32,
            expert_steps: 150,
            adapt_utterances: 60,
            epochs: 10,
            adapt_batch: 8,
            test_utterances: 60,
            rank: 1,
            alpha: 4.0,
            lr_router: 1e-3,
            lr_experts: 3e-4,
            lr_lora: 3e-3,
            lr_pretrain: 5e-3,
            lr_decay: 0.9,
            temperature: 1.0,
            speaker_strength: 0.3,
            noise: 0.6,
            quant: QuantFormat::Nf4,
            device: super::DemoDevice::Cpu,
            dtype: DType::F32,
        }
    }
}

impl SamlDemoConfig {
    /// A configuration for the test suite (seconds).
    pub fn tiny() -> Self {
        let d = Self::default();
        SamlDemoConfig {
            model: SamlConfig {
                d_model: 32,
                d_ff: 64,
                ..d.model
            },
            frames: 6,
            pool_speakers: 6,
            experts: 3,
            target_speakers: 2,
            pretrain_steps: 600,
            batch: 16,
            expert_steps: 40,
            adapt_utterances: 32,
            epochs: 4,
            // Four epochs of 32 utterances are too few steps for PAPERS.md's rates.
            lr_router: 3e-3,
            lr_experts: 3e-3,
            test_utterances: 24,
            ..d
        }
    }

    /// Checks the settings before any work: counts of at least 1, `frames` within the model's
    /// `max_len`, finite positive learning rates and a decay in (0, 1].
    pub fn check(&self) -> Result<()> {
        super::check_counts(&[
            ("frames", self.frames),
            ("pool speakers", self.pool_speakers),
            ("experts", self.experts),
            ("target speakers", self.target_speakers),
            ("batch", self.batch),
            ("adaptation utterances", self.adapt_utterances),
            ("adaptation batch", self.adapt_batch),
            ("test utterances", self.test_utterances),
            ("epochs", self.epochs),
            ("rank", self.rank),
        ])?;
        if self.frames > self.model.max_len {
            return Err(Error::InvalidDim {
                what: "frames",
                value: self.frames,
                reason: "longer than the model's max_len",
            });
        }
        super::check_learning_rates(&[
            ("lr_router", self.lr_router),
            ("lr_experts", self.lr_experts),
            ("lr_lora", self.lr_lora),
            ("lr_pretrain", self.lr_pretrain),
        ])?;
        super::check_decay(self.lr_decay)
    }
}

/// One target speaker's (or the overall) row.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeakerRow {
    /// "speaker N" or "overall".
    pub name: String,
    /// Token error (%) of: the full-precision model, the quantised model, quantised + one LoRA
    /// adapted, quantised + SAML adapted.
    pub full_precision: f32,
    pub quantised: f32,
    pub quantised_lora: f32,
    pub quantised_saml: f32,
}

impl SpeakerRow {
    /// Relative error reduction of SAML against the full-precision model (%).
    pub fn saml_vs_full_precision(&self) -> f32 {
        if self.full_precision > 0.0 {
            100.0 * (self.full_precision - self.quantised_saml) / self.full_precision
        } else {
            0.0
        }
    }
}

/// What the SAML demo measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SamlReport {
    pub config: SamlDemoConfig,
    /// Per target speaker, then "overall".
    pub rows: Vec<SpeakerRow>,
    /// Base bytes, full precision (the model's dtype) and quantised.
    pub fp_bytes: usize,
    pub quant_bytes: usize,
    /// Adapter parameters of SAML (experts + routers) and of one LoRA.
    pub saml_params: usize,
    pub lora_params: usize,
    /// Wall time of the whole run (s).
    pub seconds: f32,
}

/// Runs the demo; `progress` receives status lines.
pub fn run_saml_demo(cfg: &SamlDemoConfig, progress: &mut dyn FnMut(&str)) -> Result<SamlReport> {
    cfg.check()?;
    let start = Instant::now();
    let dev = cfg.device.candle()?;
    let mut rng = Rng::new(cfg.seed);
    let n_spk = cfg.pool_speakers + cfg.experts + cfg.target_speakers;
    let data = Domains::from_config(
        &DomainsConfig {
            d_feat: cfg.model.d_feat,
            vocab: cfg.model.vocab,
            noise: cfg.noise,
            count: n_spk,
            strength: cfg.speaker_strength,
        },
        &mut rng,
    );
    let pool: Vec<usize> = (1..=cfg.pool_speakers).collect();
    let train_spk: Vec<usize> = (cfg.pool_speakers + 1..=cfg.pool_speakers + cfg.experts).collect();
    let targets: Vec<usize> = (cfg.pool_speakers + cfg.experts + 1..=n_spk).collect();

    // Pretraining in full precision.
    let mut fp = SamlModel::new(cfg.model, &mut rng, &dev)?;
    fp.to_dtype(cfg.dtype)?;
    fp.set_train_base(true);
    let mut opt = adam(fp.layer_vars(), cfg.lr_pretrain)?;
    for step in 0..cfg.pretrain_steps {
        let (x, y, _) = data.sample_mix(&pool, cfg.batch, cfg.frames, &mut rng, &dev)?;
        let loss = fp.loss(&x, &y)?;
        opt.backward_step(&loss)?;
        if step % 20 == 0 || step + 1 == cfg.pretrain_steps {
            progress(&format!(
                "pretrain: step {}/{}, loss {:.3}",
                step + 1,
                cfg.pretrain_steps,
                loss.to_scalar::<f32>()?
            ));
        }
    }
    fp.set_train_base(false);
    let fp_bytes = fp.base_bytes();
    let mut q = fp.base_clone()?;
    q.quantize(cfg.quant)?;
    let quant_bytes = q.base_bytes();

    // One rank-r LoRA per training speaker, on the quantised model.
    let mut expert_loras = Vec::with_capacity(cfg.experts);
    for (i, &spk) in train_spk.iter().enumerate() {
        let mut m = q.base_clone()?;
        m.add_single_lora(cfg.rank, cfg.alpha, &mut rng)?;
        let mut opt = adam(m.layer_vars(), cfg.lr_lora)?;
        for step in 0..cfg.expert_steps {
            let (x, y) = data.sample(spk, cfg.batch, cfg.frames, &mut rng, &dev)?;
            let loss = m.loss(&x, &y)?;
            opt.backward_step(&loss)?;
            if step % 20 == 0 || step + 1 == cfg.expert_steps {
                progress(&format!(
                    "expert {}/{} (training speaker {spk}): step {}/{}, loss {:.3}",
                    i + 1,
                    cfg.experts,
                    step + 1,
                    cfg.expert_steps,
                    loss.to_scalar::<f32>()?
                ));
            }
        }
        expert_loras.push(m.lora_pairs()?);
    }

    let mut rows = Vec::with_capacity(targets.len() + 1);
    let mut saml_params = 0;
    let mut lora_params = 0;
    for &spk in &targets {
        let (ax, ay) = data.sample(spk, cfg.adapt_utterances, cfg.frames, &mut rng, &dev)?;
        let (tx, ty) = data.sample(spk, cfg.test_utterances, cfg.frames, &mut rng, &dev)?;
        let batches = cfg.adapt_utterances.div_ceil(cfg.adapt_batch);

        // (a) one fresh LoRA.
        let mut lora = q.base_clone()?;
        lora.add_single_lora(cfg.rank, cfg.alpha, &mut rng)?;
        let vars = lora.layer_vars();
        lora_params = count(&vars);
        let mut opt = adam(vars, cfg.lr_lora)?;
        // (b) SAML.
        let mut saml = q.base_clone()?;
        saml.add_saml_experts(
            &expert_loras,
            cfg.rank,
            cfg.alpha,
            cfg.temperature,
            &mut rng,
        )?;
        let (rv, ev) = (saml.router_vars(), saml.layer_vars());
        saml_params = count(&rv) + count(&ev);
        let mut opt_router = adam(rv, cfg.lr_router)?;
        let mut opt_experts = adam(ev, cfg.lr_experts)?;

        let mut step = 0usize;
        for epoch in 0..cfg.epochs {
            let order = shuffled(cfg.adapt_utterances, &mut rng);
            for bi in 0..batches {
                let idx: Vec<u32> = order
                    [bi * cfg.adapt_batch..((bi + 1) * cfg.adapt_batch).min(order.len())]
                    .iter()
                    .map(|&i| i as u32)
                    .collect();
                let idx = Tensor::from_vec(idx.clone(), idx.len(), &dev)?;
                let (x, y) = (ax.index_select(&idx, 0)?, ay.index_select(&idx, 0)?);
                opt.backward_step(&lora.loss(&x, &y)?)?;
                // SAML: router and experts take turns, one step each.
                let loss = saml.loss(&x, &y)?;
                if step % 2 == 0 {
                    opt_router.backward_step(&loss)?;
                } else {
                    opt_experts.backward_step(&loss)?;
                }
                step += 1;
            }
            for o in [&mut opt_router, &mut opt_experts, &mut opt] {
                let lr = o.learning_rate();
                o.set_learning_rate(lr * cfg.lr_decay);
            }
            progress(&format!(
                "target speaker {spk}: epoch {}/{}",
                epoch + 1,
                cfg.epochs
            ));
        }
        rows.push(SpeakerRow {
            name: format!("speaker {spk}"),
            full_precision: fp.token_error(&tx, &ty)?,
            quantised: q.token_error(&tx, &ty)?,
            quantised_lora: lora.token_error(&tx, &ty)?,
            quantised_saml: saml.token_error(&tx, &ty)?,
        });
    }
    let n = rows.len().max(1) as f32;
    let mean = |f: fn(&SpeakerRow) -> f32| rows.iter().map(f).sum::<f32>() / n;
    let overall = SpeakerRow {
        name: "overall".into(),
        full_precision: mean(|r| r.full_precision),
        quantised: mean(|r| r.quantised),
        quantised_lora: mean(|r| r.quantised_lora),
        quantised_saml: mean(|r| r.quantised_saml),
    };
    rows.push(overall);
    Ok(SamlReport {
        config: cfg.clone(),
        rows,
        fp_bytes,
        quant_bytes,
        saml_params,
        lora_params,
        seconds: start.elapsed().as_secs_f32(),
    })
}

impl SamlReport {
    /// The results as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from(
            "| target | full precision % | NF4 % | NF4 + one LoRA % | NF4 + SAML % | SAML vs full precision |\n\
             |---|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1}% |\n",
                r.name,
                r.full_precision,
                r.quantised,
                r.quantised_lora,
                r.quantised_saml,
                -r.saml_vs_full_precision()
            ));
        }
        s.push_str(&format!(
            "\nToken error (teacher-forced) on held-out utterances of each target speaker. Base: {} bytes \
             in {}, {} bytes quantised ({:.1}× smaller); adapters: SAML {} parameters ({} experts of \
             rank {} and 3 routers), one LoRA {}. {:.0} s in all.\n",
            self.fp_bytes,
            format!("{:?}", self.config.dtype).to_lowercase(),
            self.quant_bytes,
            self.fp_bytes as f32 / self.quant_bytes.max(1) as f32,
            self.saml_params,
            self.config.experts,
            self.config.rank,
            self.lora_params,
            self.seconds
        ));
        s
    }

    /// The results as JSON: the settings, one object per row (token error %), sizes and time.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "config": {
                "seed": c.seed, "d_feat": c.model.d_feat, "d_model": c.model.d_model,
                "d_ff": c.model.d_ff, "vocab": c.model.vocab, "enc_layers": c.model.enc_layers,
                "dec_layers": c.model.dec_layers, "max_len": c.model.max_len,
                "router_channels": c.model.router_channels, "frames": c.frames,
                "pool_speakers": c.pool_speakers, "experts": c.experts,
                "target_speakers": c.target_speakers, "pretrain_steps": c.pretrain_steps,
                "batch": c.batch, "expert_steps": c.expert_steps,
                "adapt_utterances": c.adapt_utterances, "epochs": c.epochs,
                "adapt_batch": c.adapt_batch, "test_utterances": c.test_utterances,
                "rank": c.rank, "alpha": c.alpha, "lr_router": c.lr_router,
                "lr_experts": c.lr_experts, "lr_lora": c.lr_lora, "lr_pretrain": c.lr_pretrain,
                "lr_decay": c.lr_decay, "temperature": c.temperature,
                "speaker_strength": c.speaker_strength, "noise": c.noise,
                "quant": format!("{:?}", c.quant),
            },
            "rows": self.rows.iter().map(|r| serde_json::json!({
                "name": r.name, "full_precision_pct": r.full_precision,
                "quantised_pct": r.quantised, "quantised_lora_pct": r.quantised_lora,
                "quantised_saml_pct": r.quantised_saml,
                "saml_vs_full_precision_pct": r.saml_vs_full_precision(),
            })).collect::<Vec<_>>(),
            "fp_bytes": self.fp_bytes,
            "quant_bytes": self.quant_bytes,
            "saml_params": self.saml_params,
            "lora_params": self.lora_params,
            "seconds": self.seconds,
        })
    }
}
