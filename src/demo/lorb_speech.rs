//! `molora demo lorb` on speech (the default; `--data synthetic` runs [`super::lorb`]): LoRB's
//! rescorer on N-best lists that a speech recogniser's beam search writes for accented speech.
//!
//! The first pass is the LLM-ASR recogniser of the HDMoLE demo ([`super::speech_asr`]), pretrained
//! on general-domain speech (`en-us`). Its beam search (width `nbest`) decodes accented utterances
//! into N-best lists: each hypothesis with its first-pass cost (minus its total log-probability)
//! and its word errors against the reference. The rescorer's general domain is two accents
//! (Scottish and Caribbean English): it is pretrained on their lists. Its target domain is the other
//! two (Lancastrian and West Midlands English): full fine-tuning, LoRB and LoRB + `L_cor` adapt it on
//! the target's training lists with MWER, and each is scored by the WER of its choices on held-out
//! target lists, whose sentences no model trained on (the methods are the synthetic demo's, over
//! these lists).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;

use super::lorb::{oracle_wer, run_methods, word_errors, LorbResult, NbestList, RescorerTraining};
use super::speech_asr::{nbest, Example, RecogniserConfig, SpeechData, MAX_TOKENS};
use crate::error::Result;
use crate::model::llm_asr::LlmAsr;
use crate::model::lorb::{NormKind, RescorerConfig, FIRST_WORD_ID};
use crate::speech::data::split_sentences;
use crate::speech::text::Words;
use crate::Rng;

/// Settings of the LoRB speech demo.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechLorbConfig {
    /// Seed of the data recipe and of every initialisation.
    pub seed: u64,
    /// The recogniser's general-domain training utterances and pretraining steps.
    pub general_train: usize,
    pub asr_pretrain_steps: usize,
    /// Utterances per accent whose N-best lists train the rescorer, and held-out ones per accent.
    pub lists_per_accent: usize,
    pub test_per_accent: usize,
    /// espeak-ng voice variants per domain.
    pub variants: usize,
    /// Hypotheses per N-best list (the beam width).
    pub nbest: usize,
    /// The recogniser's sizes and batch.
    pub asr_d_model: usize,
    pub asr_layers: usize,
    pub asr_batch: usize,
    /// The rescorer's sizes.
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
    pub d_ff: usize,
    /// How each method trains the rescorer.
    pub training: RescorerTraining,
    /// Where the synthesised corpus is cached (default: the speech cache).
    pub cache_root: Option<PathBuf>,
    /// Where to train.
    pub device: super::DemoDevice,
}

impl Default for SpeechLorbConfig {
    /// The command's default (see the README for its time on two CPU cores).
    fn default() -> Self {
        SpeechLorbConfig {
            seed: 1,
            general_train: 600,
            asr_pretrain_steps: 1500,
            lists_per_accent: 150,
            test_per_accent: 40,
            variants: 3,
            nbest: 8,
            asr_d_model: 96,
            asr_layers: 2,
            asr_batch: 16,
            d_model: 64,
            heads: 4,
            layers: 2,
            d_ff: 128,
            training: RescorerTraining {
                pretrain_steps: 800,
                steps: 250,
                pretrain_on_combined: true,
                batch: 12,
                rank: 4,
                alpha: 8.0,
                targets: vec!["q".into(), "v".into()],
                beta: 1.0,
                lambda_cor: 1e-3,
                lr_pretrain: 2e-3,
                lr_full: 5e-4,
                lr_lora: 5e-3,
                dtype: DType::F32,
            },
            cache_root: None,
            device: super::DemoDevice::Cpu,
        }
    }
}

impl SpeechLorbConfig {
    /// A configuration for the test suite (a smaller recogniser; about two minutes on two cores).
    pub fn small() -> Self {
        SpeechLorbConfig {
            general_train: 300,
            asr_pretrain_steps: 700,
            asr_d_model: 64,
            asr_layers: 1,
            ..Self::default()
        }
    }

    /// The recogniser and its data: the general domain and all four accents.
    pub fn recogniser(&self) -> RecogniserConfig {
        RecogniserConfig {
            seed: self.seed,
            general_train: self.general_train,
            accent_train: self.lists_per_accent,
            test_per_domain: self.test_per_accent,
            variants: self.variants,
            accents: 4,
            pretrain_steps: self.asr_pretrain_steps,
            lr: 1e-3,
            batch: self.asr_batch,
            d_model: self.asr_d_model,
            heads: 4,
            d_ff: 2 * self.asr_d_model,
            enc_layers: self.asr_layers,
            dec_layers: self.asr_layers,
            cache_root: self.cache_root.clone(),
            device: self.device,
            dtype: self.training.dtype,
        }
    }

    /// The rescorer's sizes: every word of the grammar, and the longest hypothesis.
    pub fn rescorer(&self) -> RescorerConfig {
        RescorerConfig {
            vocab: Words::grammar().len(),
            max_len: MAX_TOKENS + 1,
            d_model: self.d_model,
            heads: self.heads,
            layers: self.layers,
            d_ff: self.d_ff,
            norm: NormKind::Layer,
        }
    }

    /// Checks the settings before any work: the recogniser's, counts of at least 1 and finite
    /// positive learning rates (the targets are checked when LoRA is added).
    pub fn check(&self) -> Result<()> {
        self.recogniser().check()?;
        let t = &self.training;
        super::check_counts(&[
            ("nbest", self.nbest),
            ("rescorer pretrain steps", t.pretrain_steps),
            ("rescorer steps", t.steps),
            ("rescorer batch", t.batch),
            ("rank", t.rank),
            ("rescorer d_model", self.d_model),
            ("rescorer heads", self.heads),
            ("rescorer layers", self.layers),
            ("rescorer d_ff", self.d_ff),
        ])?;
        super::check_learning_rates(&[
            ("lr_pretrain", t.lr_pretrain),
            ("lr_full", t.lr_full),
            ("lr_lora", t.lr_lora),
        ])
    }
}

/// What the LoRB speech demo measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechLorbReport {
    /// The settings it ran with.
    pub config: SpeechLorbConfig,
    /// First pass, pretrained rescorer, full fine-tuning, LoRB, LoRB + `L_cor`.
    pub rows: Vec<LorbResult>,
    /// Oracle WER (%) of the held-out target lists.
    pub oracle_wer: f32,
    /// WER (%) on the held-out general-domain (rescorer) lists: first pass, pretrained rescorer.
    pub general_wer: (f32, f32),
    /// The recogniser's WER (%) on held-out `en-us` speech (greedy), its own domain.
    pub asr_general_wer: f32,
    /// The last training loss of each trained method.
    pub final_losses: Vec<(String, f32)>,
    /// Lists: general-domain training, target training, target held-out.
    pub list_counts: (usize, usize, usize),
    /// Seconds: data, recogniser pretraining, beam search.
    pub seconds: (f32, f32, f32),
}

/// The N-best list of one utterance: the beam's hypotheses (padded to `n` by repeating the last)
/// with first-pass costs `−log p` and word errors against the reference.
fn list_of(model: &LlmAsr, data: &SpeechData, e: &Example, n: usize) -> Result<NbestList> {
    let words =
        |t: &[u32]| -> Vec<u32> { t.iter().copied().filter(|&t| t >= FIRST_WORD_ID).collect() };
    let reference = words(&e.tokens);
    let mut hyps = Vec::with_capacity(n);
    let mut first_pass = Vec::with_capacity(n);
    for h in nbest(model, data, e, n)? {
        hyps.push(words(&h.tokens));
        first_pass.push(-h.score as f32);
    }
    while hyps.len() < n {
        let (h, c) = match (hyps.last(), first_pass.last()) {
            (Some(h), Some(c)) => (h.clone(), *c),
            _ => (Vec::new(), 0.0),
        };
        hyps.push(h);
        first_pass.push(c);
    }
    let errors = hyps
        .iter()
        .map(|h| word_errors(h, &reference) as u32)
        .collect();
    Ok(NbestList {
        reference,
        hyps,
        first_pass,
        errors,
    })
}

/// A text-only N-best list for pretraining: `sentence` (word ids) and `n − 1` corruptions of it
/// (1 or 2 edits each: a random word substituted, a word deleted, or a random word inserted), in
/// random order, first-pass costs 0 — what a masked-LM pretraining gives a real rescorer, knowledge
/// of which word sequences the language has.
fn corrupted_list(sentence: &[u32], words: usize, n: usize, rng: &mut Rng) -> NbestList {
    let word = |rng: &mut Rng| FIRST_WORD_ID + rng.below(words) as u32;
    let mut hyps = vec![sentence.to_vec()];
    while hyps.len() < n {
        let mut h = sentence.to_vec();
        for _ in 0..1 + rng.below(2) {
            let at = rng.below(h.len() + 1);
            match rng.below(3) {
                0 if at < h.len() => h[at] = word(rng),
                1 if at < h.len() && h.len() > 1 => {
                    h.remove(at);
                }
                _ => h.insert(at, word(rng)),
            }
        }
        if h.len() < MAX_TOKENS {
            hyps.push(h);
        }
    }
    let at = rng.below(n);
    hyps.swap(0, at);
    let errors = hyps
        .iter()
        .map(|h| word_errors(h, sentence) as u32)
        .collect();
    NbestList {
        reference: sentence.to_vec(),
        hyps,
        first_pass: vec![0.0; n],
        errors,
    }
}

/// Runs the demo: data, the recogniser, its N-best lists, then LoRB's methods on them. `progress`
/// receives status lines.
pub fn run_speech_lorb_demo(
    cfg: &SpeechLorbConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<SpeechLorbReport> {
    cfg.check()?;
    let dev = cfg.device.candle()?;
    let rc = cfg.recogniser();
    progress("speech data: synthesising with espeak-ng (or reading the cache)");
    let data = SpeechData::build(&rc)?;
    let mut rng = Rng::new(cfg.seed ^ 0xa5a5);
    let t = Instant::now();
    let asr = rc.pretrain(&data, &mut rng, progress)?;
    let asr_seconds = t.elapsed().as_secs_f32();
    let (asr_wers, _) = super::speech_asr::score(&asr, &data, 1)?;

    let t = Instant::now();
    let mut lists = |domains: &[usize], held_out: bool, label: &str| -> Result<Vec<NbestList>> {
        let mut out = Vec::new();
        for &d in domains {
            let set = if held_out {
                &data.test[d]
            } else {
                &data.train[d]
            };
            for (i, e) in set.iter().enumerate() {
                if i % 20 == 0 {
                    progress(&format!(
                        "first pass: beam {} on {label} ({}), {}/{}",
                        cfg.nbest,
                        data.names[d],
                        i + 1,
                        set.len()
                    ));
                }
                out.push(list_of(&asr, &data, e, cfg.nbest)?);
            }
        }
        Ok(out)
    };
    // The rescorer's general domain: Scottish and Caribbean; its target: Lancastrian and West
    // Midlands.
    let general = lists(&[1, 2], false, "general training")?;
    let general_test = lists(&[1, 2], true, "general held-out")?;
    let train = lists(&[3, 4], false, "target training")?;
    let test = lists(&[3, 4], true, "target held-out")?;
    let beam_seconds = t.elapsed().as_secs_f32();

    // Pretraining: the general domain's lists, and as many text-only lists of the training
    // sentences (never a held-out one).
    let (sentences, _) = split_sentences(cfg.seed, 0.15)?;
    let sentences = sentences
        .iter()
        .map(|s| data.words.encode(s))
        .collect::<Result<Vec<_>>>()?;
    let n_words = data.words.len() - FIRST_WORD_ID as usize;
    let out = run_methods(
        &cfg.training,
        cfg.rescorer(),
        &mut |n, rng| {
            Ok((0..n)
                .map(|i| {
                    if i % 2 == 0 {
                        general[rng.below(general.len())].clone()
                    } else {
                        let s = &sentences[rng.below(sentences.len())];
                        corrupted_list(s, n_words, cfg.nbest, rng)
                    }
                })
                .collect())
        },
        &train,
        &test,
        &general_test,
        &dev,
        &mut rng,
        progress,
    )?;
    Ok(SpeechLorbReport {
        config: cfg.clone(),
        rows: out.rows,
        oracle_wer: oracle_wer(&test),
        general_wer: out.general_wer,
        asr_general_wer: asr_wers[0],
        final_losses: out.final_losses,
        list_counts: (general.len(), train.len(), test.len()),
        seconds: (data.seconds, asr_seconds, beam_seconds),
    })
}

impl SpeechLorbReport {
    /// The row of a method by name.
    pub fn row(&self, name: &str) -> Option<&LorbResult> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// The results as a Markdown table, with the lists, the oracle and the timings.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from(
            "| method | WER % | rel. WER reduction vs first pass % | trainable params | % of full FT | train time s |\n|---|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {:.2} | {:.1} | {} | {:.3} | {:.1} |\n",
                r.name, r.wer, r.rel_reduction, r.trainable, r.trainable_pct, r.seconds
            ));
        }
        let (g, tr, te) = self.list_counts;
        let (ds, asr, beam) = self.seconds;
        s.push_str(&format!(
            "\nN-best lists (beam {}) of the recogniser pretrained on en-us speech (its own held-out WER {:.1}%): \
             {g} general-domain lists (Scottish, Caribbean) to pretrain the rescorer, {tr} target lists \
             (Lancastrian, West Midlands) to adapt it, {te} held-out target lists; oracle WER {:.2}%. \
             General domain held out: first pass {:.2}%, pretrained rescorer {:.2}%. \
             Time: data {ds:.0} s, recogniser {asr:.0} s, beam search {beam:.0} s.\n",
            self.config.nbest,
            self.asr_general_wer,
            self.oracle_wer,
            self.general_wer.0,
            self.general_wer.1
        ));
        s
    }

    /// The results as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        let t = &c.training;
        serde_json::json!({
            "data": "speech",
            "config": {
                "seed": c.seed, "general_train": c.general_train,
                "asr_pretrain_steps": c.asr_pretrain_steps, "lists_per_accent": c.lists_per_accent,
                "test_per_accent": c.test_per_accent, "variants": c.variants, "nbest": c.nbest,
                "asr_d_model": c.asr_d_model, "asr_layers": c.asr_layers,
                "d_model": c.d_model, "heads": c.heads, "layers": c.layers, "d_ff": c.d_ff,
                "pretrain_steps": t.pretrain_steps, "steps": t.steps, "batch": t.batch,
                "rank": t.rank, "alpha": t.alpha, "targets": t.targets, "beta": t.beta,
                "lambda_cor": t.lambda_cor, "lr_pretrain": t.lr_pretrain, "lr_full": t.lr_full,
                "lr_lora": t.lr_lora, "dtype": format!("{:?}", t.dtype),
            },
            "methods": self.rows.iter().map(|r| serde_json::json!({
                "name": r.name, "wer_pct": r.wer, "rel_wer_reduction_pct": r.rel_reduction,
                "trainable_params": r.trainable, "trainable_pct_of_full": r.trainable_pct,
                "train_seconds": r.seconds,
            })).collect::<Vec<_>>(),
            "oracle_wer_pct": self.oracle_wer,
            "general_domain_wer_pct": {
                "first_pass": self.general_wer.0, "pretrained_rescorer": self.general_wer.1,
            },
            "asr_general_wer_pct": self.asr_general_wer,
            "lists": {"general": self.list_counts.0, "target_train": self.list_counts.1,
                      "target_test": self.list_counts.2},
            "seconds": {"data": self.seconds.0, "recogniser": self.seconds.1,
                        "beam_search": self.seconds.2},
            "final_losses": self.final_losses.iter().map(|(n, l)| serde_json::json!({
                "method": n, "loss": l,
            })).collect::<Vec<_>>(),
        })
    }
}
