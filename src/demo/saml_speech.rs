//! `molora demo saml` on speech (the default; `--data synthetic` runs [`super::saml`]): SAML on an
//! NF4-quantised Whisper-shaped encoder-decoder ([`SamlModel`]), adapted at test time to unseen
//! speakers synthesised by espeak-ng, scored by the WER of decoded held-out sentences.
//!
//! Speakers are espeak-ng `en-us` voice variants at a pitch and a rate: a pretraining pool, training
//! speakers whose rank-1 LoRAs become SAML's experts, and unseen target speakers with a few dozen
//! adaptation utterances each. Steps, as PAPERS.md describes SAML: pretrain the full-precision model
//! on the pool; quantise it to NF4; train one LoRA per training speaker on the quantised model; then
//! per target speaker adapt (a) one fresh LoRA and (b) SAML (experts from the training speakers'
//! LoRAs, mixed in weight space per utterance by new routers; router and experts trained by two Adam
//! optimisers taking turns, rates ×0.9 per epoch), and decode that speaker's held-out utterances with
//! every model. The encoder reads four stacked log-mel frames per position (40 ms).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;

use super::saml::SpeakerRow;
use super::speech_asr::{examples, Example, MAX_TOKENS};
use super::{adam, param_count as count, shuffled, warmup_cosine};
use crate::error::{Error, Result};
use crate::model::linear::QuantFormat;
use crate::model::llm_asr::AsrBatch;
use crate::model::saml::{SamlConfig, SamlModel};
use crate::speech::data::{default_cache_root, speaker_domains, Recipe};
use crate::speech::mel::N_MELS;
use crate::speech::text::Words;
use crate::speech::wer::wer;
use crate::Rng;

/// Log-mel frames stacked per encoder position.
const STACK: usize = 4;

/// The pretraining pool: `(variant, pitch, rate)`.
const POOL: [(&str, u32, u32); 8] = [
    ("m1", 40, 165),
    ("f1", 60, 175),
    ("m3", 50, 185),
    ("f2", 70, 160),
    ("m5", 35, 175),
    ("f4", 55, 190),
    ("m7", 45, 170),
    ("f3", 65, 180),
];
/// The training speakers (one expert each).
const TRAINING: [(&str, u32, u32); 6] = [
    ("m2", 45, 175),
    ("f5", 65, 170),
    ("m4", 55, 180),
    ("m6", 40, 185),
    ("m8", 50, 165),
    ("f1", 80, 185),
];
/// The target speakers, unseen before adaptation.
const TARGETS: [(&str, u32, u32); 3] = [("m4", 25, 145), ("f3", 85, 200), ("m2", 70, 215)];

/// Settings of the SAML speech demo.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechSamlConfig {
    pub seed: u64,
    /// Speakers: pretraining pool (≤ 8), training speakers = experts (≤ 6), targets (≤ 3).
    pub pool_speakers: usize,
    pub experts: usize,
    pub target_speakers: usize,
    /// Utterances: per pool speaker, per training speaker, and per target speaker for adaptation
    /// and held out.
    pub pool_utterances: usize,
    pub expert_utterances: usize,
    pub adapt_utterances: usize,
    pub test_utterances: usize,
    /// Model sizes (`d_feat` is set to the stacked frames, `vocab` to the words).
    pub d_model: usize,
    pub d_ff: usize,
    pub layers: usize,
    /// Pretraining steps, batch and learning rate.
    pub pretrain_steps: usize,
    pub batch: usize,
    pub lr_pretrain: f64,
    /// Steps of each training speaker's LoRA.
    pub expert_steps: usize,
    /// Adaptation epochs and batch (PAPERS.md: 10 and 8).
    pub epochs: usize,
    pub adapt_batch: usize,
    /// LoRA rank and alpha (PAPERS.md: 1 and 4).
    pub rank: usize,
    pub alpha: f32,
    /// Learning rates: router, experts (PAPERS.md: 1e-3, 3e-4), the one-LoRA baseline; adaptation
    /// rates ×`lr_decay` per epoch.
    pub lr_router: f64,
    pub lr_experts: f64,
    pub lr_lora: f64,
    pub lr_decay: f64,
    /// Router softmax temperature.
    pub temperature: f32,
    /// Base quantisation.
    pub quant: QuantFormat,
    /// Where the synthesised corpus is cached (default: the speech cache).
    pub cache_root: Option<PathBuf>,
    pub device: super::DemoDevice,
    pub dtype: DType,
}

impl Default for SpeechSamlConfig {
    /// The command's default (see the README for its time on two CPU cores).
    fn default() -> Self {
        SpeechSamlConfig {
            seed: 1,
            pool_speakers: 8,
            experts: 6,
            target_speakers: 3,
            pool_utterances: 100,
            expert_utterances: 60,
            adapt_utterances: 40,
            test_utterances: 30,
            d_model: 96,
            d_ff: 192,
            layers: 2,
            pretrain_steps: 1500,
            batch: 16,
            lr_pretrain: 1e-3,
            expert_steps: 120,
            epochs: 10,
            adapt_batch: 8,
            rank: 1,
            alpha: 4.0,
            lr_router: 1e-3,
            lr_experts: 3e-4,
            lr_lora: 3e-3,
            lr_decay: 0.9,
            temperature: 1.0,
            quant: QuantFormat::Nf4,
            cache_root: None,
            device: super::DemoDevice::Cpu,
            dtype: DType::F32,
        }
    }
}

impl SpeechSamlConfig {
    /// A configuration for the test suite.
    pub fn small() -> Self {
        SpeechSamlConfig {
            pool_speakers: 6,
            experts: 3,
            target_speakers: 2,
            pool_utterances: 60,
            expert_utterances: 40,
            test_utterances: 20,
            d_model: 64,
            d_ff: 128,
            layers: 1,
            pretrain_steps: 900,
            expert_steps: 80,
            ..Self::default()
        }
    }

    /// The model's sizes.
    pub fn model(&self) -> SamlConfig {
        SamlConfig {
            d_feat: STACK * N_MELS,
            d_model: self.d_model,
            d_ff: self.d_ff,
            vocab: Words::grammar().len(),
            enc_layers: self.layers,
            dec_layers: self.layers,
            max_len: 512,
            router_channels: 16,
        }
    }

    /// Checks the settings before any work.
    pub fn check(&self) -> Result<()> {
        super::check_counts(&[
            ("pool speakers", self.pool_speakers),
            ("experts", self.experts),
            ("target speakers", self.target_speakers),
            ("pool utterances", self.pool_utterances),
            ("expert utterances", self.expert_utterances),
            ("adaptation utterances", self.adapt_utterances),
            ("test utterances", self.test_utterances),
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("layers", self.layers),
            ("pretrain steps", self.pretrain_steps),
            ("batch", self.batch),
            ("expert steps", self.expert_steps),
            ("epochs", self.epochs),
            ("adaptation batch", self.adapt_batch),
            ("rank", self.rank),
        ])?;
        for (what, n, max) in [
            ("pool speakers", self.pool_speakers, POOL.len()),
            ("experts", self.experts, TRAINING.len()),
            ("target speakers", self.target_speakers, TARGETS.len()),
        ] {
            if n > max {
                return Err(Error::InvalidDim {
                    what,
                    value: n,
                    reason: "more than the demo's speakers of that kind",
                });
            }
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

/// What the SAML speech demo measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechSamlReport {
    pub config: SpeechSamlConfig,
    /// Per target speaker, then "overall" (WER % over all target utterances), for the
    /// full-precision, NF4, NF4 + one LoRA and NF4 + SAML models.
    pub rows: Vec<SpeakerRow>,
    /// WER (%) of the full-precision and quantised models on the pool's speakers (their own
    /// domain; held-out sentences).
    pub pool_wer: (f32, f32),
    /// Base bytes, full precision and quantised.
    pub fp_bytes: usize,
    pub quant_bytes: usize,
    /// Adapter parameters of SAML (experts + routers) and of one LoRA.
    pub saml_params: usize,
    pub lora_params: usize,
    /// Seconds: data, pretraining, experts, adaptation and decoding; all.
    pub seconds: (f32, f32, f32, f32, f32),
}

/// One utterance's batch for the model: stacked frames `[B, F/4, 4·80]`, targets and mask.
fn batch(items: &[&Example], dev: &Device) -> Result<AsrBatch> {
    let feats: Vec<(&[f32], usize)> = items
        .iter()
        .map(|e| (e.features.as_slice(), e.frames))
        .collect();
    let tokens: Vec<Vec<u32>> = items.iter().map(|e| e.tokens.clone()).collect();
    let mut b = AsrBatch::new(&feats, N_MELS, &tokens, Words::BOS, Words::EOS, dev)?;
    let (n, f, d) = b.features.dims3()?;
    b.features = b.features.reshape((n, f / STACK, STACK * d))?;
    Ok(b)
}

fn loss(model: &SamlModel, b: &AsrBatch) -> Result<Tensor> {
    model.loss_masked(&b.features, &b.targets, &b.mask)
}

/// WER (%) of `model` on `set` (greedy decoding, batches of 32), and its (reference, hypothesis)
/// pairs.
fn decode_wer(
    model: &SamlModel,
    set: &[Example],
    words: &Words,
    dev: &Device,
) -> Result<(f32, Vec<(String, String)>)> {
    let mut pairs = Vec::with_capacity(set.len());
    for chunk in set.chunks(32) {
        let items: Vec<&Example> = chunk.iter().collect();
        let b = batch(&items, dev)?;
        for (e, h) in chunk
            .iter()
            .zip(model.greedy(&b.features, Words::EOS, MAX_TOKENS)?)
        {
            pairs.push((e.text.clone(), words.decode(&h)));
        }
    }
    let w = 100.0 * wer(pairs.iter().map(|(r, h)| (r.as_str(), h.as_str()))) as f32;
    Ok((w, pairs))
}

/// Per speaker: training utterances and held-out utterances.
struct Speakers {
    train: Vec<Vec<Example>>,
    test: Vec<Vec<Example>>,
}

fn speakers(
    list: &[(&str, u32, u32)],
    train: usize,
    test: usize,
    cfg: &SpeechSamlConfig,
    words: &Words,
) -> Result<(Speakers, bool)> {
    let root = cfg.cache_root.clone().unwrap_or_else(default_cache_root);
    let corpus = Recipe {
        domains: speaker_domains("en-us", list),
        train_per_domain: train,
        test_per_domain: test,
        seed: cfg.seed,
        held_out_permille: 150,
    }
    .build(&root)?;
    let cached = corpus.cached;
    let mut out = Speakers {
        train: (0..list.len()).map(|_| Vec::new()).collect(),
        test: (0..list.len()).map(|_| Vec::new()).collect(),
    };
    for e in examples(corpus.train, words, 0)? {
        let d = e.domain;
        out.train[d].push(e);
    }
    for e in examples(corpus.test, words, 0)? {
        let d = e.domain;
        out.test[d].push(e);
    }
    Ok((out, cached))
}

/// `n` random utterances of `pool`.
fn pick<'a>(pool: &[&'a Example], n: usize, rng: &mut Rng) -> Vec<&'a Example> {
    (0..n).map(|_| pool[rng.below(pool.len())]).collect()
}

/// Runs the demo; `progress` receives status lines.
pub fn run_speech_saml_demo(
    cfg: &SpeechSamlConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<SpeechSamlReport> {
    cfg.check()?;
    let start = Instant::now();
    let dev = cfg.device.candle()?;
    let words = Words::grammar();
    progress("speech data: synthesising with espeak-ng (or reading the cache)");
    let pool_list = &POOL[..cfg.pool_speakers];
    let train_list = &TRAINING[..cfg.experts];
    let target_list = &TARGETS[..cfg.target_speakers];
    let (pool, _) = speakers(
        pool_list,
        cfg.pool_utterances,
        cfg.test_utterances,
        cfg,
        &words,
    )?;
    let (training, _) = speakers(train_list, cfg.expert_utterances, 0, cfg, &words)?;
    let (targets, _) = speakers(
        target_list,
        cfg.adapt_utterances,
        cfg.test_utterances,
        cfg,
        &words,
    )?;
    let data_s = start.elapsed().as_secs_f32();
    let mut rng = Rng::new(cfg.seed ^ 0x5a41);

    // Pretraining in full precision on the pool (warm-up, then cosine decay to a tenth).
    let t = Instant::now();
    let mut fp = SamlModel::new(cfg.model(), &mut rng, &dev)?;
    fp.to_dtype(cfg.dtype)?;
    fp.set_train_base(true);
    let mut opt = adam(fp.layer_vars(), cfg.lr_pretrain)?;
    let all: Vec<&Example> = pool.train.iter().flatten().collect();
    for step in 0..cfg.pretrain_steps {
        opt.set_learning_rate(cfg.lr_pretrain * warmup_cosine(step, cfg.pretrain_steps));
        let b = batch(&pick(&all, cfg.batch, &mut rng), &dev)?;
        let l = loss(&fp, &b)?;
        opt.backward_step(&l)?;
        if step % 20 == 0 || step + 1 == cfg.pretrain_steps {
            progress(&format!(
                "pretrain (speaker pool): step {}/{}, loss {:.3}",
                step + 1,
                cfg.pretrain_steps,
                l.to_scalar::<f32>()?
            ));
        }
    }
    fp.set_train_base(false);
    let pretrain_s = t.elapsed().as_secs_f32();
    let fp_bytes = fp.base_bytes();
    let mut q = fp.base_clone()?;
    q.quantize(cfg.quant)?;
    let quant_bytes = q.base_bytes();

    // One LoRA per training speaker, on the quantised model.
    let t = Instant::now();
    let mut expert_loras = Vec::with_capacity(cfg.experts);
    for (i, utts) in training.train.iter().enumerate() {
        let mut m = q.base_clone()?;
        m.add_single_lora(cfg.rank, cfg.alpha, &mut rng)?;
        let mut opt = adam(m.layer_vars(), cfg.lr_lora)?;
        let refs: Vec<&Example> = utts.iter().collect();
        for step in 0..cfg.expert_steps {
            let b = batch(&pick(&refs, cfg.adapt_batch, &mut rng), &dev)?;
            let l = loss(&m, &b)?;
            opt.backward_step(&l)?;
            if step % 20 == 0 || step + 1 == cfg.expert_steps {
                progress(&format!(
                    "expert {}/{} (training speaker {}): step {}/{}, loss {:.3}",
                    i + 1,
                    cfg.experts,
                    train_list[i].0,
                    step + 1,
                    cfg.expert_steps,
                    l.to_scalar::<f32>()?
                ));
            }
        }
        expert_loras.push(m.lora_pairs()?);
    }
    let experts_s = t.elapsed().as_secs_f32();

    let t = Instant::now();
    let mut rows = Vec::with_capacity(cfg.target_speakers + 1);
    let mut all_pairs: [Vec<(String, String)>; 4] = Default::default();
    let (mut saml_params, mut lora_params) = (0, 0);
    for (si, adapt) in targets.train.iter().enumerate() {
        let (variant, pitch, rate) = target_list[si];
        let name = format!("en-us+{variant} p{pitch} r{rate}");
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
            let order = shuffled(adapt.len(), &mut rng);
            for chunk in order.chunks(cfg.adapt_batch) {
                let items: Vec<&Example> = chunk.iter().map(|&i| &adapt[i]).collect();
                let b = batch(&items, &dev)?;
                opt.backward_step(&loss(&lora, &b)?)?;
                // SAML: router and experts take turns, one step each.
                let l = loss(&saml, &b)?;
                if step % 2 == 0 {
                    opt_router.backward_step(&l)?;
                } else {
                    opt_experts.backward_step(&l)?;
                }
                step += 1;
            }
            for o in [&mut opt_router, &mut opt_experts, &mut opt] {
                let lr = o.learning_rate();
                o.set_learning_rate(lr * cfg.lr_decay);
            }
            progress(&format!(
                "target {name}: epoch {}/{}",
                epoch + 1,
                cfg.epochs
            ));
        }
        progress(&format!("target {name}: decoding the held-out utterances"));
        let test = &targets.test[si];
        let mut w = [0.0f32; 4];
        for (k, m) in [&fp, &q, &lora, &saml].into_iter().enumerate() {
            let (e, pairs) = decode_wer(m, test, &words, &dev)?;
            w[k] = e;
            all_pairs[k].extend(pairs);
        }
        rows.push(SpeakerRow {
            name,
            full_precision: w[0],
            quantised: w[1],
            quantised_lora: w[2],
            quantised_saml: w[3],
        });
    }
    let overall: Vec<f32> = all_pairs
        .iter()
        .map(|p| 100.0 * wer(p.iter().map(|(r, h)| (r.as_str(), h.as_str()))) as f32)
        .collect();
    rows.push(SpeakerRow {
        name: "overall".into(),
        full_precision: overall[0],
        quantised: overall[1],
        quantised_lora: overall[2],
        quantised_saml: overall[3],
    });
    let pool_test: Vec<Example> = pool.test.into_iter().flatten().collect();
    let pool_wer = (
        decode_wer(&fp, &pool_test, &words, &dev)?.0,
        decode_wer(&q, &pool_test, &words, &dev)?.0,
    );
    let adapt_s = t.elapsed().as_secs_f32();
    Ok(SpeechSamlReport {
        config: cfg.clone(),
        rows,
        pool_wer,
        fp_bytes,
        quant_bytes,
        saml_params,
        lora_params,
        seconds: (
            data_s,
            pretrain_s,
            experts_s,
            adapt_s,
            start.elapsed().as_secs_f32(),
        ),
    })
}

impl SpeechSamlReport {
    /// The results as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from(
            "| target speaker | full precision WER % | NF4 WER % | NF4 + one LoRA WER % | NF4 + SAML WER % | SAML vs full precision |\n|---|---:|---:|---:|---:|---:|\n",
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
        let (d, p, e, a, all) = self.seconds;
        s.push_str(&format!(
            "\nGreedy decoding of {} held-out utterances per target speaker (sentences unseen in training), after \
             adapting on {} of its utterances. The pool's own held-out speech: full precision {:.1}%, NF4 {:.1}%. \
             Base: {} bytes in {:?}, {} bytes quantised ({:.1}× smaller); adapters: SAML {} parameters \
             ({} experts of rank {} and 3 routers), one LoRA {}. Time: data {d:.0} s, pretraining {p:.0} s, \
             experts {e:.0} s, adaptation and decoding {a:.0} s; {all:.0} s in all.\n",
            self.config.test_utterances,
            self.config.adapt_utterances,
            self.pool_wer.0,
            self.pool_wer.1,
            self.fp_bytes,
            self.config.dtype,
            self.quant_bytes,
            self.fp_bytes as f32 / self.quant_bytes.max(1) as f32,
            self.saml_params,
            self.config.experts,
            self.config.rank,
            self.lora_params
        ));
        s
    }

    /// The results as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "data": "speech",
            "config": {
                "seed": c.seed, "pool_speakers": c.pool_speakers, "experts": c.experts,
                "target_speakers": c.target_speakers, "pool_utterances": c.pool_utterances,
                "expert_utterances": c.expert_utterances, "adapt_utterances": c.adapt_utterances,
                "test_utterances": c.test_utterances, "d_model": c.d_model, "d_ff": c.d_ff,
                "layers": c.layers, "pretrain_steps": c.pretrain_steps, "batch": c.batch,
                "expert_steps": c.expert_steps, "epochs": c.epochs, "adapt_batch": c.adapt_batch,
                "rank": c.rank, "alpha": c.alpha, "lr_router": c.lr_router,
                "lr_experts": c.lr_experts, "lr_lora": c.lr_lora, "lr_decay": c.lr_decay,
                "quant": format!("{:?}", c.quant), "dtype": format!("{:?}", c.dtype),
            },
            "rows": self.rows.iter().map(|r| serde_json::json!({
                "speaker": r.name, "full_precision_wer_pct": r.full_precision,
                "quantised_wer_pct": r.quantised, "quantised_lora_wer_pct": r.quantised_lora,
                "quantised_saml_wer_pct": r.quantised_saml,
            })).collect::<Vec<_>>(),
            "pool_wer_pct": {"full_precision": self.pool_wer.0, "quantised": self.pool_wer.1},
            "fp_bytes": self.fp_bytes, "quant_bytes": self.quant_bytes,
            "saml_params": self.saml_params, "lora_params": self.lora_params,
            "seconds": {"data": self.seconds.0, "pretraining": self.seconds.1,
                        "experts": self.seconds.2, "adaptation_and_decoding": self.seconds.3,
                        "all": self.seconds.4},
        })
    }
}
