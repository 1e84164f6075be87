//! `molora demo lorb --data synthetic`: the LoRB rescorer ([`crate::model::lorb`]) adapted to a new
//! domain on a deterministic synthetic rescoring task (the speech demo is [`super::lorb_speech`]).
//!
//! The task: a "language" of topics: every word belongs to one topic and a correct sentence draws all
//! its words from one topic (no word twice in a row); a general domain and a target domain whose topic
//! assignments differ for a fraction of the words. A simulated first pass turns each reference sentence
//! into an N-best list of corrupted hypotheses (substitutions, mostly by an "acoustically" confusable
//! word, insertions and deletions; the reference itself is in the list with a set probability) whose
//! first-pass costs prefer fewer errors only weakly. Word errors per hypothesis are [`word_errors`]
//! (Levenshtein distance) to the reference. The rescorer is pretrained on the general domain (list-wise
//! cross-entropy towards the oracle hypothesis), then adapted to the target domain by full fine-tuning
//! with MWER, LoRB with MWER, and LoRB with MWER + `L_cor` ([`run_lorb_demo`]).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::Optimizer;

use crate::error::{Error, Result};
use crate::model::linear::{Ctx, MoleConfig};
use crate::model::lorb::{
    combined_scores, correlation_loss, mwer_loss, NormKind, Rescorer, RescorerConfig, CLS_ID,
    FIRST_WORD_ID, PAD_ID,
};
use crate::Rng;

/// Word errors of a hypothesis against its reference: the Levenshtein distance over words
/// (substitutions, insertions and deletions each count 1).
pub fn word_errors(hyp: &[u32], reference: &[u32]) -> usize {
    let mut prev: Vec<usize> = (0..=reference.len()).collect();
    let mut cur = vec![0usize; reference.len() + 1];
    for (i, h) in hyp.iter().enumerate() {
        cur[0] = i + 1;
        for (j, r) in reference.iter().enumerate() {
            let sub = prev[j] + usize::from(h != r);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[reference.len()]
}

// ---------------------------------------------------------------------------------------------
// The synthetic task.

/// One N-best list of the simulated first pass.
#[derive(Debug, Clone, PartialEq)]
pub struct NbestList {
    /// The reference sentence (word ids).
    pub reference: Vec<u32>,
    /// The hypotheses (word ids), `N` of them.
    pub hyps: Vec<Vec<u32>>,
    /// The first-pass cost `s^a_i` of each hypothesis (lower is better).
    pub first_pass: Vec<f32>,
    /// The word errors `ε_i` of each hypothesis against the reference.
    pub errors: Vec<u32>,
}

/// Settings of the LoRB demo.
#[derive(Debug, Clone, PartialEq)]
pub struct LorbDemoConfig {
    /// Seed of the data and of every initialisation.
    pub seed: u64,
    /// Words in the language.
    pub words: usize,
    /// Topics the words are split into (a sentence uses one topic's words).
    pub topics: usize,
    /// Fraction of the words whose topic differs in the target domain.
    pub target_shift: f32,
    /// Sentence lengths, inclusive range.
    pub min_words: usize,
    /// Longest sentence.
    pub max_words: usize,
    /// Hypotheses per N-best list.
    pub nbest: usize,
    /// Most edits in one corrupted hypothesis (at least 1 each).
    pub max_edits: usize,
    /// Probability that the reference itself is in its N-best list.
    pub ref_in_list: f32,
    /// First pass: cost per word error (`s^a_i = margin·ε_i + noise·g_i`, `g` standard normal).
    pub first_pass_margin: f32,
    /// First pass: the noise of its costs.
    pub first_pass_noise: f32,
    /// Target-domain N-best lists available for adaptation.
    pub target_train_lists: usize,
    /// Held-out target-domain N-best lists (the evaluation).
    pub test_lists: usize,
    /// Optimiser steps of the general-domain pretraining.
    pub pretrain_steps: usize,
    /// Optimiser steps of each adaptation method.
    pub steps: usize,
    /// N-best lists per step.
    pub batch: usize,
    /// Rescorer sizes.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// The normalisation.
    pub norm: NormKind,
    /// LoRA rank and alpha.
    pub rank: usize,
    /// LoRA alpha (scale `alpha / rank`).
    pub alpha: f32,
    /// The layers that receive LoRA (see [`Rescorer::resolve_targets`]); PAPERS.md: q and v.
    pub targets: Vec<String>,
    /// Weight `β` of the rescorer's score.
    pub beta: f64,
    /// Weight `λ` of the correlation regulariser.
    pub lambda_cor: f64,
    /// Learning rates: pretraining; full fine-tuning; LoRA.
    pub lr_pretrain: f64,
    /// Full fine-tuning's learning rate.
    pub lr_full: f64,
    /// LoRA's learning rate.
    pub lr_lora: f64,
    /// Where to train (default: the CPU).
    pub device: super::DemoDevice,
    /// The dtype the models run in (f32, f16 or bf16).
    pub dtype: DType,
}

impl Default for LorbDemoConfig {
    /// The command's default: under two minutes on two CPU cores in release.
    fn default() -> Self {
        LorbDemoConfig {
            seed: 11,
            words: 24,
            topics: 4,
            target_shift: 0.5,
            min_words: 6,
            max_words: 10,
            nbest: 8,
            max_edits: 2,
            ref_in_list: 0.8,
            first_pass_margin: 1.0,
            first_pass_noise: 1.5,
            target_train_lists: 256,
            test_lists: 300,
            pretrain_steps: 500,
            steps: 250,
            batch: 12,
            d_model: 32,
            heads: 4,
            layers: 2,
            d_ff: 64,
            norm: NormKind::Layer,
            rank: 4,
            alpha: 8.0,
            targets: vec!["q".into(), "v".into()],
            beta: 1.0,
            lambda_cor: 1e-3,
            lr_pretrain: 2e-3,
            lr_full: 5e-4,
            lr_lora: 5e-3,
            device: super::DemoDevice::Cpu,
            dtype: DType::F32,
        }
    }
}

impl LorbDemoConfig {
    /// The smallest configuration that still shows the effect (the test suite's run, seconds).
    pub fn tiny() -> Self {
        LorbDemoConfig {
            target_train_lists: 128,
            test_lists: 150,
            pretrain_steps: 400,
            steps: 150,
            batch: 8,
            d_model: 32,
            d_ff: 64,
            ..Self::default()
        }
    }

    /// Checks the settings before any work: counts of at least 1, consistent sizes, fractions in
    /// [0, 1] and finite positive learning rates.
    pub fn check(&self) -> Result<()> {
        super::check_counts(&[
            ("words", self.words),
            ("topics", self.topics),
            ("min_words", self.min_words),
            ("nbest", self.nbest),
            ("max_edits", self.max_edits),
            ("target_train_lists", self.target_train_lists),
            ("test_lists", self.test_lists),
            ("batch", self.batch),
            ("rank", self.rank),
        ])?;
        if self.topics > self.words {
            return Err(Error::InvalidDim {
                what: "topics",
                value: self.topics,
                reason: "cannot exceed the number of words",
            });
        }
        if self.max_words < self.min_words {
            return Err(Error::InvalidDim {
                what: "max_words",
                value: self.max_words,
                reason: "must be at least min_words",
            });
        }
        for (what, v) in [
            ("target_shift", self.target_shift),
            ("ref_in_list", self.ref_in_list),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::InvalidParameter {
                    what,
                    value: v,
                    reason: "must be in [0, 1]",
                });
            }
        }
        super::check_learning_rates(&[
            ("lr_pretrain", self.lr_pretrain),
            ("lr_full", self.lr_full),
            ("lr_lora", self.lr_lora),
        ])?;
        Ok(())
    }

    /// How the rescorer is trained and used, apart from the task.
    pub fn training(&self) -> RescorerTraining {
        RescorerTraining {
            pretrain_steps: self.pretrain_steps,
            steps: self.steps,
            pretrain_on_combined: false,
            batch: self.batch,
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
            beta: self.beta,
            lambda_cor: self.lambda_cor,
            lr_pretrain: self.lr_pretrain,
            lr_full: self.lr_full,
            lr_lora: self.lr_lora,
            dtype: self.dtype,
        }
    }

    /// The rescorer's sizes for this task.
    pub fn rescorer_config(&self) -> RescorerConfig {
        RescorerConfig {
            vocab: self.words + FIRST_WORD_ID as usize,
            max_len: self.max_words + self.max_edits + 1,
            d_model: self.d_model,
            heads: self.heads,
            layers: self.layers,
            d_ff: self.d_ff,
            norm: self.norm,
        }
    }
}

/// How LoRB's methods train the rescorer, whatever makes the N-best lists (the synthetic task
/// here, a speech recogniser's beam in [`super::lorb_speech`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RescorerTraining {
    /// Optimiser steps of the general-domain pretraining and of each adaptation method.
    pub pretrain_steps: usize,
    pub steps: usize,
    /// Pretraining scores each hypothesis by the rescorer alone (`false`: it learns to rank by
    /// itself) or by `s^a + β·s^l` (`true`: it learns what the first pass gets wrong, the score it
    /// is used with).
    pub pretrain_on_combined: bool,
    /// N-best lists per step.
    pub batch: usize,
    /// LoRA rank and alpha.
    pub rank: usize,
    pub alpha: f32,
    /// The layers that receive LoRA (see [`Rescorer::resolve_targets`]).
    pub targets: Vec<String>,
    /// Weight `β` of the rescorer's score and `λ` of the correlation regulariser.
    pub beta: f64,
    pub lambda_cor: f64,
    /// Learning rates: pretraining; full fine-tuning; LoRA.
    pub lr_pretrain: f64,
    pub lr_full: f64,
    pub lr_lora: f64,
    /// The dtype the rescorer runs in.
    pub dtype: DType,
}

/// The synthetic language of both domains and the simulated first pass; see the module docs.
#[derive(Debug, Clone)]
pub struct RescoringTask {
    cfg: LorbDemoConfig,
    /// Per domain (0 general, 1 target), the words (indices) of each non-empty topic.
    members: [Vec<Vec<usize>>; 2],
}

/// `k` distinct indices of `0..n` (k ≤ n).
fn distinct(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + rng.below(n - i);
        all.swap(i, j);
    }
    all.truncate(k.min(n));
    all
}

impl RescoringTask {
    /// The general domain's topics (the words shuffled and dealt round-robin into `topics`
    /// topics), and the target domain's: the same, except for a random `target_shift` fraction of
    /// the words, each moved to a uniform other topic.
    pub fn new(cfg: &LorbDemoConfig, rng: &mut Rng) -> Result<Self> {
        cfg.check()?;
        let (w, k) = (cfg.words, cfg.topics);
        let mut general = vec![0usize; w];
        for (i, word) in distinct(rng, w, w).into_iter().enumerate() {
            general[word] = i % k;
        }
        let mut target = general.clone();
        let shifted = ((cfg.target_shift * w as f32).round() as usize).min(w);
        for word in distinct(rng, w, shifted) {
            if k > 1 {
                target[word] = (general[word] + 1 + rng.below(k - 1)) % k;
            }
        }
        let members = |topic_of: &[usize]| -> Vec<Vec<usize>> {
            (0..k)
                .map(|t| (0..w).filter(|&x| topic_of[x] == t).collect::<Vec<_>>())
                .filter(|m| !m.is_empty())
                .collect()
        };
        Ok(RescoringTask {
            cfg: cfg.clone(),
            members: [members(&general), members(&target)],
        })
    }

    /// A correct sentence of `domain` (0 general, 1 target): a uniform topic, then words uniform
    /// among the topic's words, never the same word twice in a row (unless the topic has one).
    pub fn sentence(&self, domain: usize, rng: &mut Rng) -> Vec<u32> {
        let topics = &self.members[domain.min(1)];
        let words = &topics[rng.below(topics.len())];
        let len = self.cfg.min_words + rng.below(self.cfg.max_words - self.cfg.min_words + 1);
        let mut out: Vec<u32> = Vec::with_capacity(len);
        while out.len() < len {
            let w = words[rng.below(words.len())] as u32 + FIRST_WORD_ID;
            if words.len() == 1 || out.last() != Some(&w) {
                out.push(w);
            }
        }
        out
    }

    /// A word "acoustically" confusable with `w`: with probability 0.7 one of its id neighbours
    /// (±1, ±2, cyclically), otherwise a uniform other word.
    fn confusable(&self, w: u32, rng: &mut Rng) -> u32 {
        let n = self.cfg.words as i64;
        let i = i64::from(w - FIRST_WORD_ID);
        let j = if rng.uniform() < 0.7 {
            let off = [-2i64, -1, 1, 2][rng.below(4)];
            (i + off).rem_euclid(n)
        } else {
            (i + 1 + rng.below(self.cfg.words.max(2) - 1) as i64).rem_euclid(n)
        };
        j as u32 + FIRST_WORD_ID
    }

    /// A first-pass error pattern applied to `reference`: 1..=max_edits edits, each a substitution
    /// by a confusable word (50%), an insertion of a uniform word (25%) or a deletion (25%; not
    /// below one word).
    fn corrupt(&self, reference: &[u32], rng: &mut Rng) -> Vec<u32> {
        let mut h = reference.to_vec();
        let edits = 1 + rng.below(self.cfg.max_edits);
        for _ in 0..edits {
            let u = rng.uniform();
            if u < 0.5 {
                let p = rng.below(h.len());
                h[p] = self.confusable(h[p], rng);
            } else if u < 0.75 || h.len() <= 1 {
                let p = rng.below(h.len() + 1);
                h.insert(p, rng.below(self.cfg.words) as u32 + FIRST_WORD_ID);
            } else {
                let p = rng.below(h.len());
                h.remove(p);
            }
        }
        h
    }

    /// An N-best list for a new sentence of `domain`: the reference (with probability
    /// `ref_in_list`) and corrupted hypotheses (distinct when possible), their word errors and
    /// first-pass costs `margin·ε_i + noise·g_i`, in a random order.
    pub fn nbest(&self, domain: usize, rng: &mut Rng) -> NbestList {
        let reference = self.sentence(domain, rng);
        let mut hyps: Vec<Vec<u32>> = Vec::with_capacity(self.cfg.nbest);
        if rng.uniform() < f64::from(self.cfg.ref_in_list) {
            hyps.push(reference.clone());
        }
        while hyps.len() < self.cfg.nbest {
            let mut h = self.corrupt(&reference, rng);
            for _ in 0..10 {
                if !hyps.contains(&h) {
                    break;
                }
                h = self.corrupt(&reference, rng);
            }
            hyps.push(h);
        }
        // Shuffle, so the position says nothing.
        for i in (1..hyps.len()).rev() {
            let j = rng.below(i + 1);
            hyps.swap(i, j);
        }
        let errors: Vec<u32> = hyps
            .iter()
            .map(|h| word_errors(h, &reference) as u32)
            .collect();
        let first_pass = errors
            .iter()
            .map(|&e| {
                self.cfg.first_pass_margin * e as f32
                    + self.cfg.first_pass_noise * rng.normal() as f32
            })
            .collect();
        NbestList {
            reference,
            hyps,
            first_pass,
            errors,
        }
    }

    /// `n` N-best lists of `domain`.
    pub fn lists(&self, domain: usize, n: usize, rng: &mut Rng) -> Vec<NbestList> {
        (0..n).map(|_| self.nbest(domain, rng)).collect()
    }
}

/// The rescorer's inputs for every hypothesis of `lists` (list by list): ids `[Σ N, L]` u32
/// (\[CLS\], the words, padding to the longest), the first-pass costs and the word errors as f32
/// `[lists, N]`. Every list must have the same `N`.
pub fn encode_lists(lists: &[NbestList], device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let n = lists.first().map_or(0, |l| l.hyps.len());
    if n == 0 {
        return Err(Error::InvalidDim {
            what: "N-best lists",
            value: 0,
            reason: "need at least one list of at least one hypothesis",
        });
    }
    let len = 1 + lists
        .iter()
        .flat_map(|l| l.hyps.iter().map(|h| h.len()))
        .max()
        .unwrap_or(0);
    let mut ids = Vec::with_capacity(lists.len() * n * len);
    let mut sa = Vec::with_capacity(lists.len() * n);
    let mut eps = Vec::with_capacity(lists.len() * n);
    for l in lists {
        for v in [l.first_pass.len(), l.errors.len()] {
            crate::error::check_len("hypotheses of every N-best list", l.hyps.len(), v)?;
        }
        crate::error::check_len("hypotheses per N-best list", n, l.hyps.len())?;
        for h in &l.hyps {
            ids.push(CLS_ID);
            ids.extend_from_slice(h);
            ids.extend(std::iter::repeat_n(PAD_ID, len - 1 - h.len()));
        }
        sa.extend_from_slice(&l.first_pass);
        eps.extend(l.errors.iter().map(|&e| e as f32));
    }
    let b = lists.len();
    Ok((
        Tensor::from_vec(ids, (b * n, len), device)?,
        Tensor::from_vec(sa, (b, n), device)?,
        Tensor::from_vec(eps, (b, n), device)?,
    ))
}

/// WER (%) of picking, per list, the hypothesis with the lowest `s^a_i + β·s^l_i` (without a
/// rescorer: the first pass alone): the chosen hypotheses' word errors over the references' words.
pub fn rescored_wer(model: Option<&Rescorer>, lists: &[NbestList], beta: f64) -> Result<f32> {
    let mut errors = 0usize;
    let mut words = 0usize;
    for chunk in lists.chunks(64) {
        let dev = model.map_or(Device::Cpu, |m| m.device().clone());
        let (ids, sa, _) = encode_lists(chunk, &dev)?;
        let s = match model {
            Some(m) => {
                let sl = m.forward(&ids, &mut Ctx::default())?.scores;
                combined_scores(&sa, &sl.reshape(sa.dims())?, beta)?
            }
            None => sa,
        };
        let pick: Vec<u32> = s.argmin(D::Minus1)?.to_vec1()?;
        for (l, &p) in chunk.iter().zip(&pick) {
            errors += l.errors.get(p as usize).copied().unwrap_or(0) as usize;
            words += l.reference.len();
        }
    }
    Ok(100.0 * errors as f32 / words.max(1) as f32)
}

/// Oracle WER (%): the best hypothesis of each list.
pub fn oracle_wer(lists: &[NbestList]) -> f32 {
    let errors: usize = lists
        .iter()
        .map(|l| l.errors.iter().copied().min().unwrap_or(0) as usize)
        .sum();
    let words: usize = lists.iter().map(|l| l.reference.len()).sum();
    100.0 * errors as f32 / words.max(1) as f32
}

// ---------------------------------------------------------------------------------------------
// The demo.

/// One row of the results table.
#[derive(Debug, Clone, PartialEq)]
pub struct LorbResult {
    /// The method.
    pub name: String,
    /// WER (%) on the held-out target-domain N-best lists.
    pub wer: f32,
    /// Relative WER reduction (%) against the first pass.
    pub rel_reduction: f32,
    /// Trainable parameters of the method's training.
    pub trainable: usize,
    /// Trainable parameters as % of full fine-tuning.
    pub trainable_pct: f32,
    /// Wall time of the method's training (s).
    pub seconds: f32,
}

/// What the LoRB demo measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LorbReport {
    /// The settings it ran with.
    pub config: LorbDemoConfig,
    /// First pass, pretrained rescorer, full fine-tuning, LoRB, LoRB + `L_cor`.
    pub rows: Vec<LorbResult>,
    /// Oracle WER (%) of the held-out lists (the best any rescorer can do).
    pub oracle_wer: f32,
    /// WER (%) on held-out general-domain lists: first pass, pretrained rescorer.
    pub general_wer: (f32, f32),
    /// The last training loss of each trained method, by name.
    pub final_losses: Vec<(String, f32)>,
}

impl LorbReport {
    /// The row of a method by name.
    pub fn row(&self, name: &str) -> Option<&LorbResult> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// The results as a Markdown table with a line on the oracle and the general domain.
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
        s.push_str(&format!(
            "\nHeld-out target-domain lists: {}, N = {}; oracle WER {:.2}%. General domain: first pass {:.2}%, pretrained rescorer {:.2}%.\n",
            self.config.test_lists, self.config.nbest, self.oracle_wer, self.general_wer.0, self.general_wer.1
        ));
        s
    }

    /// The results as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "config": {
                "seed": c.seed, "words": c.words, "topics": c.topics,
                "target_shift": c.target_shift, "min_words": c.min_words, "max_words": c.max_words,
                "nbest": c.nbest, "max_edits": c.max_edits, "ref_in_list": c.ref_in_list,
                "first_pass_margin": c.first_pass_margin, "first_pass_noise": c.first_pass_noise,
                "target_train_lists": c.target_train_lists, "test_lists": c.test_lists,
                "pretrain_steps": c.pretrain_steps, "steps": c.steps, "batch": c.batch,
                "d_model": c.d_model, "heads": c.heads, "layers": c.layers, "d_ff": c.d_ff,
                "norm": format!("{:?}", c.norm), "rank": c.rank, "alpha": c.alpha,
                "targets": c.targets, "beta": c.beta, "lambda_cor": c.lambda_cor,
                "lr_pretrain": c.lr_pretrain, "lr_full": c.lr_full, "lr_lora": c.lr_lora,
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
            "final_losses": self.final_losses.iter().map(|(n, l)| serde_json::json!({
                "method": n, "loss": l,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The row names of [`run_lorb_demo`]'s report, in order.
pub const ROW_NAMES: [&str; 5] = [
    "first pass",
    "pretrained rescorer",
    "full fine-tuning (MWER)",
    "LoRB (MWER)",
    "LoRB (MWER + L_cor)",
];

/// Pretrains `model` on general-domain lists (`general(n, rng)` gives `n` of them): list-wise
/// cross-entropy of the rescorer's scores (`softmax(−s^l)`, or `softmax(−(s^a + β·s^l))` with
/// [`RescorerTraining::pretrain_on_combined`]) towards each list's oracle hypothesis (fewest word
/// errors).
fn pretrain(
    model: &Rescorer,
    general: &mut dyn FnMut(usize, &mut Rng) -> Result<Vec<NbestList>>,
    cfg: &RescorerTraining,
    rng: &mut Rng,
    progress: &mut dyn FnMut(&str),
) -> Result<f32> {
    let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = super::adam(vars, cfg.lr_pretrain)?;
    let dev = model.device().clone();
    let mut last = f32::NAN;
    for step in 0..cfg.pretrain_steps {
        let lists = general(cfg.batch, rng)?;
        let (ids, sa, eps) = encode_lists(&lists, &dev)?;
        let target: Vec<u32> = lists
            .iter()
            .map(|l| {
                let best = l.errors.iter().copied().min().unwrap_or(0);
                l.errors.iter().position(|&e| e == best).unwrap_or(0) as u32
            })
            .collect();
        let target = Tensor::from_vec(target, lists.len(), &dev)?;
        let sl = model
            .forward(&ids, &mut Ctx::default())?
            .scores
            .reshape(eps.dims())?;
        let s = if cfg.pretrain_on_combined {
            combined_scores(&sa, &sl, cfg.beta)?
        } else {
            sl
        };
        let loss = candle_nn::loss::cross_entropy(&s.neg()?, &target)?;
        opt.backward_step(&loss)?;
        if step % 25 == 0 || step + 1 == cfg.pretrain_steps {
            last = loss.to_scalar::<f32>()?;
            progress(&format!(
                "pretrain (general domain): step {}/{}, loss {last:.3}",
                step + 1,
                cfg.pretrain_steps
            ));
        }
    }
    Ok(last)
}

/// Adapts `model`'s trainable parameters on the target-domain training lists with MWER on
/// `s^a + β·s^l` (plus `λ·L_cor` on the batch's \[CLS\] embeddings when `lambda_cor > 0`).
#[allow(clippy::too_many_arguments)]
fn adapt(
    model: &Rescorer,
    train: &[NbestList],
    cfg: &RescorerTraining,
    lr: f64,
    lambda_cor: f64,
    rng: &mut Rng,
    label: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<f32> {
    let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = super::adam(vars, lr)?;
    let dev = model.device().clone();
    let mut last = f32::NAN;
    for step in 0..cfg.steps {
        let batch: Vec<NbestList> = (0..cfg.batch)
            .map(|_| train[rng.below(train.len())].clone())
            .collect();
        let (ids, sa, eps) = encode_lists(&batch, &dev)?;
        let out = model.forward(&ids, &mut Ctx::default())?;
        let s = combined_scores(&sa, &out.scores.reshape(sa.dims())?, cfg.beta)?;
        let mut loss = mwer_loss(&s, &eps)?;
        if lambda_cor > 0.0 {
            loss = (loss + (correlation_loss(&out.cls)? * lambda_cor)?)?;
        }
        opt.backward_step(&loss)?;
        if step % 25 == 0 || step + 1 == cfg.steps {
            last = loss.to_scalar::<f32>()?;
            progress(&format!(
                "{label}: step {}/{}, loss {last:.4}",
                step + 1,
                cfg.steps
            ));
        }
    }
    Ok(last)
}

/// What [`run_methods`] measured.
pub(crate) struct MethodsOutcome {
    /// The rows of [`ROW_NAMES`], in order.
    pub rows: Vec<LorbResult>,
    /// WER (%) on held-out general-domain lists: first pass, pretrained rescorer.
    pub general_wer: (f32, f32),
    /// The last training loss of each trained method.
    pub final_losses: Vec<(String, f32)>,
}

/// LoRB's methods on given N-best lists: a rescorer of sizes `rescorer` pretrained on `general`
/// lists, then full fine-tuning, LoRB and LoRB + `L_cor` on `train`, each scored by WER on `test`
/// (and the pretrained one on `general_test`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_methods(
    cfg: &RescorerTraining,
    rescorer: RescorerConfig,
    general: &mut dyn FnMut(usize, &mut Rng) -> Result<Vec<NbestList>>,
    train: &[NbestList],
    test: &[NbestList],
    general_test: &[NbestList],
    dev: &Device,
    rng: &mut Rng,
    progress: &mut dyn FnMut(&str),
) -> Result<MethodsOutcome> {
    let first = rescored_wer(None, test, cfg.beta)?;
    let mut rows = Vec::new();
    let mut final_losses = Vec::new();
    let row = |name: &str, wer: f32, trainable: usize, full: usize, seconds: f32| LorbResult {
        name: name.to_string(),
        wer,
        rel_reduction: if first > 0.0 {
            100.0 * (first - wer) / first
        } else {
            0.0
        },
        trainable,
        trainable_pct: 100.0 * trainable as f32 / full.max(1) as f32,
        seconds,
    };

    let t = Instant::now();
    let mut base = Rescorer::new(rescorer, rng, dev)?;
    base.to_dtype(cfg.dtype)?;
    let full_params = base.num_base_params();
    let loss = pretrain(&base, general, cfg, rng, progress)?;
    let pretrain_s = t.elapsed().as_secs_f32();
    final_losses.push(("pretraining (cross-entropy)".to_string(), loss));
    rows.push(row(ROW_NAMES[0], first, 0, full_params, 0.0));
    rows.push(row(
        ROW_NAMES[1],
        rescored_wer(Some(&base), test, cfg.beta)?,
        0,
        full_params,
        pretrain_s,
    ));
    let general_wer = (
        rescored_wer(None, general_test, cfg.beta)?,
        rescored_wer(Some(&base), general_test, cfg.beta)?,
    );

    // Full fine-tuning with MWER.
    let full = base.deep_clone()?;
    let t = Instant::now();
    let loss = adapt(
        &full,
        train,
        cfg,
        cfg.lr_full,
        0.0,
        rng,
        ROW_NAMES[2],
        progress,
    )?;
    let secs = t.elapsed().as_secs_f32();
    final_losses.push((ROW_NAMES[2].to_string(), loss));
    rows.push(row(
        ROW_NAMES[2],
        rescored_wer(Some(&full), test, cfg.beta)?,
        full.num_trainable(),
        full_params,
        secs,
    ));

    // LoRB, without and with the correlation regulariser.
    for (name, lambda) in [(ROW_NAMES[3], 0.0), (ROW_NAMES[4], cfg.lambda_cor)] {
        let mut m = base.deep_clone()?;
        m.add_lora(&cfg.targets, MoleConfig::lora(cfg.rank, cfg.alpha), rng)?;
        let t = Instant::now();
        let loss = adapt(&m, train, cfg, cfg.lr_lora, lambda, rng, name, progress)?;
        let secs = t.elapsed().as_secs_f32();
        final_losses.push((name.to_string(), loss));
        rows.push(row(
            name,
            rescored_wer(Some(&m), test, cfg.beta)?,
            m.num_trainable(),
            full_params,
            secs,
        ));
    }
    Ok(MethodsOutcome {
        rows,
        general_wer,
        final_losses,
    })
}

/// Runs the demo: the data, pretraining on the general domain, then full fine-tuning, LoRB and
/// LoRB + `L_cor` on the target domain, each scored by WER on held-out target-domain lists.
/// `progress` receives status lines.
pub fn run_lorb_demo(cfg: &LorbDemoConfig, progress: &mut dyn FnMut(&str)) -> Result<LorbReport> {
    cfg.check()?;
    let dev = cfg.device.candle()?;
    let mut rng = Rng::new(cfg.seed);
    let task = RescoringTask::new(cfg, &mut rng)?;
    let train = task.lists(1, cfg.target_train_lists, &mut rng);
    let test = task.lists(1, cfg.test_lists, &mut rng);
    let general_test = task.lists(0, cfg.test_lists, &mut rng);
    let out = run_methods(
        &cfg.training(),
        cfg.rescorer_config(),
        &mut |n, rng| Ok(task.lists(0, n, rng)),
        &train,
        &test,
        &general_test,
        &dev,
        &mut rng,
        progress,
    )?;
    Ok(LorbReport {
        config: cfg.clone(),
        rows: out.rows,
        oracle_wer: oracle_wer(&test),
        general_wer: out.general_wer,
        final_losses: out.final_losses,
    })
}
