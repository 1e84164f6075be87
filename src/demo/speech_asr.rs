//! What the speech demos share: the recogniser's settings, the corpus of general-domain and
//! accented speech ready for the model, training, and scoring by decoding held-out utterances.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;
use candle_nn::Optimizer;

use crate::error::{Error, Result};
use crate::model::llm_asr::{AsrBatch, LlmAsr, LlmAsrConfig};
use crate::speech::data::{accent_domains, default_cache_root, Recipe, Utterance};
use crate::speech::decode::{beam_search_batch, Hypothesis};
use crate::speech::mel::N_MELS;
use crate::speech::text::Words;
use crate::speech::wer::{cer, wer};
use crate::Rng;

/// The longest transcript the decoders write (tokens, the end token included).
pub const MAX_TOKENS: usize = 16;

/// The data and the recogniser a speech demo pretrains on the general domain.
#[derive(Debug, Clone, PartialEq)]
pub struct RecogniserConfig {
    /// Seed of the data recipe, the batches and the initialisation.
    pub seed: u64,
    /// Training utterances of the general domain (`en-us`).
    pub general_train: usize,
    /// Training utterances per accent.
    pub accent_train: usize,
    /// Held-out utterances per domain.
    pub test_per_domain: usize,
    /// espeak-ng voice variants per domain.
    pub variants: usize,
    /// Accent domains (1 to 4).
    pub accents: usize,
    /// Optimiser steps and learning rate of the general-domain pretraining.
    pub pretrain_steps: usize,
    pub lr: f64,
    /// Utterances per step.
    pub batch: usize,
    /// Model sizes.
    pub d_model: usize,
    pub heads: usize,
    pub d_ff: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    /// Where the synthesised corpus is cached (default: [`default_cache_root`]).
    pub cache_root: Option<PathBuf>,
    /// Where to train.
    pub device: super::DemoDevice,
    /// The dtype the model runs in.
    pub dtype: DType,
}

impl RecogniserConfig {
    /// The model's sizes (`num_domains`: the accents).
    pub fn model(&self) -> LlmAsrConfig {
        LlmAsrConfig {
            d_feat: N_MELS,
            d_model: self.d_model,
            heads: self.heads,
            d_ff: self.d_ff,
            enc_layers: self.enc_layers,
            dec_layers: self.dec_layers,
            vocab: Words::grammar().len(),
            num_domains: self.accents,
            max_len: 1024,
        }
    }

    /// Checks the settings: counts of at least 1, 1 to 4 accents, a finite positive learning rate
    /// and model sizes the model takes.
    pub fn check(&self) -> Result<()> {
        super::check_counts(&[
            ("general training utterances", self.general_train),
            ("accent training utterances", self.accent_train),
            ("held-out utterances per domain", self.test_per_domain),
            ("voice variants", self.variants),
            ("accents", self.accents),
            ("pretrain steps", self.pretrain_steps),
            ("batch", self.batch),
        ])?;
        if self.accents > 4 {
            return Err(Error::InvalidDim {
                what: "accents",
                value: self.accents,
                reason: "the speech data has 4 accent domains",
            });
        }
        super::check_learning_rates(&[("lr_full", self.lr)])?;
        self.model().check()
    }

    /// A new recogniser pretrained on the general domain's training utterances.
    pub(crate) fn pretrain(
        &self,
        data: &SpeechData,
        rng: &mut Rng,
        progress: &mut dyn FnMut(&str),
    ) -> Result<LlmAsr> {
        let dev = self.device.candle()?;
        let mut model = LlmAsr::new(self.model(), rng, &dev)?;
        model.to_dtype(self.dtype)?;
        train(
            &model,
            data,
            &[0],
            self.batch,
            self.pretrain_steps,
            self.lr,
            rng,
            "pretrain (general domain)",
            progress,
        )?;
        Ok(model)
    }
}

/// One utterance ready for the model.
pub(crate) struct Example {
    pub domain: usize,
    pub text: String,
    pub tokens: Vec<u32>,
    pub features: Vec<f32>,
    pub frames: usize,
}

/// The demo's data: training pools and held-out sets per domain (0 the general domain, then the
/// accents).
pub(crate) struct SpeechData {
    pub names: Vec<String>,
    pub train: Vec<Vec<Example>>,
    pub test: Vec<Vec<Example>>,
    pub words: Words,
    /// Seconds spent making (or reading) it, and whether it came from the cache.
    pub seconds: f32,
    pub cached: bool,
}

pub(crate) fn examples(
    utts: Vec<Utterance>,
    words: &Words,
    domain_offset: usize,
) -> Result<Vec<Example>> {
    utts.into_iter()
        .map(|u| {
            Ok(Example {
                domain: u.domain + domain_offset,
                tokens: words.encode(&u.text)?,
                text: u.text,
                features: u.features,
                frames: u.frames,
            })
        })
        .collect()
}

impl SpeechData {
    /// The corpus of `cfg`, synthesised into the cache or read back from it.
    pub fn build(cfg: &RecogniserConfig) -> Result<Self> {
        let t = Instant::now();
        let root = cfg.cache_root.clone().unwrap_or_else(default_cache_root);
        let mut domains = accent_domains(cfg.variants);
        domains.truncate(1 + cfg.accents);
        let names = domains.iter().map(|d| d.name.clone()).collect();
        let general = Recipe {
            domains: domains[..1].to_vec(),
            train_per_domain: cfg.general_train,
            test_per_domain: cfg.test_per_domain,
            seed: cfg.seed,
            held_out_permille: 150,
        }
        .build(&root)?;
        let accents = Recipe {
            domains: domains[1..].to_vec(),
            train_per_domain: cfg.accent_train,
            test_per_domain: cfg.test_per_domain,
            seed: cfg.seed,
            held_out_permille: 150,
        }
        .build(&root)?;
        let cached = general.cached && accents.cached;
        let words = Words::grammar();
        let n = 1 + cfg.accents;
        let mut train: Vec<Vec<Example>> = (0..n).map(|_| Vec::new()).collect();
        let mut test: Vec<Vec<Example>> = (0..n).map(|_| Vec::new()).collect();
        for (set, offset) in [(general, 0), (accents, 1)] {
            for e in examples(set.train, &words, offset)? {
                let d = e.domain;
                train[d].push(e);
            }
            for e in examples(set.test, &words, offset)? {
                let d = e.domain;
                test[d].push(e);
            }
        }
        Ok(SpeechData {
            names,
            train,
            test,
            words,
            seconds: t.elapsed().as_secs_f32(),
            cached,
        })
    }

    pub fn batch_of(&self, items: &[&Example], dev: &candle_core::Device) -> Result<AsrBatch> {
        let feats: Vec<(&[f32], usize)> = items
            .iter()
            .map(|e| (e.features.as_slice(), e.frames))
            .collect();
        let tokens: Vec<Vec<u32>> = items.iter().map(|e| e.tokens.clone()).collect();
        AsrBatch::new(&feats, N_MELS, &tokens, Words::BOS, Words::EOS, dev)
    }

    /// A random batch from the training pools of `domains`, with each utterance's domain.
    pub fn sample(
        &self,
        domains: &[usize],
        n: usize,
        rng: &mut Rng,
        dev: &candle_core::Device,
    ) -> Result<(AsrBatch, Vec<usize>)> {
        let pool: Vec<&Example> = domains.iter().flat_map(|&d| &self.train[d]).collect();
        if pool.is_empty() {
            return Err(Error::InvalidDim {
                what: "training utterances of the chosen domains",
                value: 0,
                reason: "the demo needs at least 1",
            });
        }
        let items: Vec<&Example> = (0..n)
            .map(|_| pool[(rng.uniform() * pool.len() as f64) as usize % pool.len()])
            .collect();
        let ds = items.iter().map(|e| e.domain).collect();
        Ok((self.batch_of(&items, dev)?, ds))
    }
}

/// Decodes every held-out set: `(WER % per domain, CER % over the accents)`.
pub(crate) fn score(model: &LlmAsr, data: &SpeechData, beam: usize) -> Result<(Vec<f32>, f32)> {
    let dev = model.device().clone();
    let mut wers = Vec::with_capacity(data.test.len());
    let mut accent_pairs: Vec<(String, String)> = Vec::new();
    for (d, set) in data.test.iter().enumerate() {
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(set.len());
        for chunk in set.chunks(32) {
            let items: Vec<&Example> = chunk.iter().collect();
            let hyps = if beam <= 1 {
                let b = data.batch_of(&items, &dev)?;
                model.greedy(&b.features, Words::BOS, Words::EOS, MAX_TOKENS)?
            } else {
                let mut out = Vec::with_capacity(items.len());
                for e in &items {
                    let hyps = nbest(model, data, e, beam)?;
                    out.push(hyps.first().map(|h| h.tokens.clone()).unwrap_or_default());
                }
                out
            };
            for (e, h) in items.iter().zip(hyps) {
                pairs.push((e.text.clone(), data.words.decode(&h)));
            }
        }
        wers.push(100.0 * wer(pairs.iter().map(|(r, h)| (r.as_str(), h.as_str()))) as f32);
        if d > 0 {
            accent_pairs.extend(pairs);
        }
    }
    let c = 100.0 * cer(accent_pairs.iter().map(|(r, h)| (r.as_str(), h.as_str()))) as f32;
    Ok((wers, c))
}

/// Trains the model's trainable parameters (the global router's excluded) with AdamW on batches of
/// `batch` utterances of `domains`, `steps` steps of teacher-forced cross-entropy (linear warm-up
/// over the first tenth, then cosine decay to a tenth of `lr`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train(
    model: &LlmAsr,
    data: &SpeechData,
    domains: &[usize],
    batch: usize,
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
        opt.set_learning_rate(lr * super::warmup_cosine(step, steps));
        let (b, _) = data.sample(domains, batch, rng, &dev)?;
        let loss = model.loss(&b, Some(rng))?;
        opt.backward_step(&loss)?;
        if step % 20 == 0 || step + 1 == steps {
            last = loss.to_scalar::<f32>()?;
            progress(&format!(
                "{label}: step {}/{steps}, loss {last:.3}",
                step + 1
            ));
        }
    }
    Ok(last)
}

/// The N-best list of beam search of width `beam` on one utterance: hypotheses (tokens before the
/// end token) with their scores (total log-probability), best first; every live hypothesis of a
/// step is scored in one batched decoder call.
pub(crate) fn nbest(
    model: &LlmAsr,
    data: &SpeechData,
    e: &Example,
    beam: usize,
) -> Result<Vec<Hypothesis>> {
    let b = data.batch_of(&[e], model.device())?;
    let speech = model.prefix(&b.features, None, &mut Vec::new())?;
    let mut out = beam_search_batch(
        data.words.len(),
        Words::BOS,
        Words::EOS,
        beam,
        MAX_TOKENS,
        0.0,
        |prefixes| model.next_log_probs_batch(&speech, prefixes),
    )?;
    for h in &mut out {
        if h.finished {
            h.tokens.pop();
        }
    }
    Ok(out)
}
