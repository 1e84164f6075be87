//! LoRB (PAPERS.md): LoRA for a BERT-style second-pass rescorer, its discriminative losses, and
//! `molora demo lorb` on a deterministic synthetic rescoring task.
//!
//! ```text
//! ids [B, L] ─ tok_emb + pos_emb ─ norm ─► h
//!   per layer l: h += layer.l.attn.o(MHA(layer.l.attn.{q,k,v}(norm(h))))      (padding masked)
//!                h += layer.l.ffn.down(gelu(layer.l.ffn.up(norm(h))))
//!   norm(h)[:, 0] ([CLS]) ─ pooler ─ tanh ─► c [B, d]  ─ head ─► s^l [B]
//! ```
//!
//! Every linear layer is a [`MoleLinear`]; [`Rescorer::add_lora`] gives a plain LoRA adapter to
//! the layers its targets select (default **q and v of every layer**, PAPERS.md marks this choice
//! as ours) and freezes everything else. The norms are pre-norm and parameter-free (no gain or
//! bias), so full fine-tuning trains exactly the embeddings and the linear layers.
//!
//! Rescoring an N-best list (`s^a_i` the first pass's cost of hypothesis `i`, `s^l_i` the
//! rescorer's, both negative log-probabilities up to a constant):
//!
//! ```text
//! s_i = s^a_i + β·s^l_i          P_i = softmax(−s)_i over the list
//! ```
//!
//! and the hypothesis with the lowest `s_i` is the output. Training uses [`mwer_loss`] (or
//! [`mwed_loss`]) on `s`, optionally plus `λ·`[`correlation_loss`] on the batch's \[CLS\]
//! embeddings.
//!
//! The demo ([`run_lorb_demo`]): a "language" of topics: every word belongs to one topic and a
//! correct sentence draws all its words from one topic (no word twice in a row); a general domain
//! and a target domain whose topic assignments differ for a fraction of the words. A simulated first pass turns each reference sentence into an
//! N-best list of corrupted hypotheses (substitutions, mostly by an "acoustically" confusable word,
//! insertions and deletions; the reference itself is in the list with a set probability) whose
//! first-pass costs prefer fewer errors only weakly. Word errors per hypothesis are
//! [`word_errors`] (Levenshtein distance) to the reference. The rescorer is pretrained on the
//! general domain (list-wise cross-entropy towards the oracle hypothesis), then adapted to the
//! target domain by full fine-tuning with MWER, LoRB with MWER, and LoRB with MWER + `L_cor`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::error::{Error, Result};
use crate::model::linear::{Ctx, MoleConfig, MoleLinear};
use crate::Rng;

/// The padding token id (masked out of attention).
pub const PAD_ID: u32 = 0;
/// The \[CLS\] token id, the first token of every input.
pub const CLS_ID: u32 = 1;
/// The first word id: words are `FIRST_WORD_ID..FIRST_WORD_ID + words`.
pub const FIRST_WORD_ID: u32 = 2;

/// The normalisation of the rescorer (parameter-free).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x − mean) / √(var + 1e-5)` over the last dimension.
    Layer,
    /// `x / √(mean(x²) + 1e-6)` over the last dimension.
    Rms,
}

/// Sizes of a [`Rescorer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RescorerConfig {
    /// Token ids `0..vocab` (pad, \[CLS\], words).
    pub vocab: usize,
    /// Longest input, \[CLS\] included (the number of position embeddings).
    pub max_len: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads (must divide `d_model`).
    pub heads: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Width of the feed-forward layers.
    pub d_ff: usize,
    /// The normalisation.
    pub norm: NormKind,
}

impl RescorerConfig {
    fn check(&self) -> Result<()> {
        for (what, v) in [
            ("vocab", self.vocab),
            ("max_len", self.max_len),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("layers", self.layers),
            ("d_ff", self.d_ff),
        ] {
            if v == 0 {
                return Err(Error::InvalidDim {
                    what,
                    value: 0,
                    reason: "the rescorer needs at least 1",
                });
            }
        }
        if self.d_model % self.heads != 0 {
            return Err(Error::InvalidDim {
                what: "d_model",
                value: self.d_model,
                reason: "must be a multiple of the number of heads",
            });
        }
        Ok(())
    }
}

/// What [`Rescorer::forward`] returns.
#[derive(Debug, Clone)]
pub struct RescorerOutput {
    /// The rescorer's score `s^l` per input, `[B]` (a cost: lower is more plausible).
    pub scores: Tensor,
    /// The pooled \[CLS\] embedding per input, `[B, d_model]` (what [`correlation_loss`] sees).
    pub cls: Tensor,
}

/// A BERT-style encoder rescorer whose linear layers are [`MoleLinear`]s; see the module docs.
#[derive(Debug, Clone)]
pub struct Rescorer {
    cfg: RescorerConfig,
    tok_emb: Var,
    pos_emb: Var,
    train_embeddings: bool,
    layers: Vec<MoleLinear>,
    device: Device,
}

/// The per-layer linear layers, by their short name (a target name), in order.
const BLOCK_LAYERS: [&str; 6] = ["q", "k", "v", "o", "up", "down"];

fn block_layer_name(layer: usize, short: &str) -> String {
    match short {
        "up" | "down" => format!("layer.{layer}.ffn.{short}"),
        _ => format!("layer.{layer}.attn.{short}"),
    }
}

fn normal(rng: &mut Rng, dims: &[usize], std: f32, device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * std).collect();
    Ok(Tensor::from_vec(v, dims, device)?)
}

impl Rescorer {
    /// A rescorer with random weights: embeddings `N(0, 1)`, linear layers PyTorch's default
    /// (`U(−1/√d_in, 1/√d_in)`), all from `rng`; every parameter trainable.
    pub fn new(cfg: RescorerConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        cfg.check()?;
        let d = cfg.d_model;
        let tok_emb = Var::from_tensor(&normal(rng, &[cfg.vocab, d], 1.0, device)?)?;
        let pos_emb = Var::from_tensor(&normal(rng, &[cfg.max_len, d], 1.0, device)?)?;
        let mut layers = Vec::with_capacity(6 * cfg.layers + 2);
        for l in 0..cfg.layers {
            for short in BLOCK_LAYERS {
                let (i, o) = match short {
                    "up" => (d, cfg.d_ff),
                    "down" => (cfg.d_ff, d),
                    _ => (d, d),
                };
                layers.push(MoleLinear::new(
                    &block_layer_name(l, short),
                    i,
                    o,
                    true,
                    rng,
                    device,
                )?);
            }
        }
        layers.push(MoleLinear::new("pooler", d, d, true, rng, device)?);
        layers.push(MoleLinear::new("head", d, 1, true, rng, device)?);
        Ok(Rescorer {
            cfg,
            tok_emb,
            pos_emb,
            train_embeddings: true,
            layers,
            device: device.clone(),
        })
    }

    /// The sizes.
    pub fn config(&self) -> &RescorerConfig {
        &self.cfg
    }

    /// The linear layers: per transformer layer `attn.{q,k,v,o}` and `ffn.{up,down}`, then
    /// `pooler` and `head`.
    pub fn layers(&self) -> &[MoleLinear] {
        &self.layers
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The token embeddings `[vocab, d_model]` and position embeddings `[max_len, d_model]`.
    pub fn embeddings(&self) -> (&Tensor, &Tensor) {
        (self.tok_emb.as_tensor(), self.pos_emb.as_tensor())
    }

    fn layer(&self, name: &str) -> Result<&MoleLinear> {
        self.layers
            .iter()
            .find(|l| l.name() == name)
            .ok_or_else(|| Error::Unsupported {
                op: "Rescorer",
                what: format!("no layer named {name:?}"),
            })
    }

    /// The names of the layers `targets` selects: a short name applies to every transformer layer
    /// (`"q"`, `"k"`, `"v"`, `"o"`, `"up"`, `"down"`; `"attention"` is q, k, v and o, `"ffn"` up
    /// and down), or an exact layer name (`"layer.0.attn.q"`, `"pooler"`, `"head"`).
    pub fn resolve_targets(&self, targets: &[String]) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for t in targets {
            let shorts: &[&str] = match t.as_str() {
                "attention" => &["q", "k", "v", "o"],
                "ffn" => &["up", "down"],
                s => match BLOCK_LAYERS.iter().find(|b| **b == s) {
                    Some(b) => std::slice::from_ref(b),
                    None => &[],
                },
            };
            let matched: Vec<String> = if shorts.is_empty() {
                self.layers
                    .iter()
                    .filter(|l| l.name() == t)
                    .map(|l| l.name().to_string())
                    .collect()
            } else {
                (0..self.cfg.layers)
                    .flat_map(|l| shorts.iter().map(move |s| block_layer_name(l, s)))
                    .collect()
            };
            if matched.is_empty() {
                return Err(Error::Unsupported {
                    op: "Rescorer targets",
                    what: format!(
                        "no layer matches {t:?} (q, k, v, o, up, down, attention, ffn, or a layer \
                         name such as layer.0.attn.q, pooler, head)"
                    ),
                });
            }
            for m in matched {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }

    /// Gives a LoRA adapter configured by `cfg` (usually [`MoleConfig::lora`]) to the layers
    /// `targets` selects (see [`Rescorer::resolve_targets`]) and freezes every base weight and the
    /// embeddings: afterwards only the adapters are trainable.
    pub fn add_lora(&mut self, targets: &[String], cfg: MoleConfig, rng: &mut Rng) -> Result<()> {
        let names = self.resolve_targets(targets)?;
        self.set_train_base(false);
        for l in &mut self.layers {
            if names.iter().any(|n| n == l.name()) {
                l.add_experts(cfg, rng)?;
            }
        }
        Ok(())
    }

    /// Trains every base weight and the embeddings (full fine-tuning), or freezes them all.
    pub fn set_train_base(&mut self, train: bool) {
        self.train_embeddings = train;
        for l in &mut self.layers {
            l.set_train_base(train);
        }
    }

    /// Scores token ids `[B, L]` (u32; [`CLS_ID`] first, [`PAD_ID`] after the end; `L ≤ max_len`).
    /// `ctx` is passed to every linear layer (its `rng` turns on adapter dropout).
    pub fn forward(&self, ids: &Tensor, ctx: &mut Ctx) -> Result<RescorerOutput> {
        let (b, l) = ids.dims2()?;
        if l > self.cfg.max_len || l == 0 {
            return Err(Error::InvalidDim {
                what: "input length",
                value: l,
                reason: "must be in 1..=max_len of the rescorer",
            });
        }
        let ids = ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()?;
        if max_id as usize >= self.cfg.vocab {
            return Err(Error::InvalidDim {
                what: "token id",
                value: max_id as usize,
                reason: "must be below the rescorer's vocab",
            });
        }
        let (tok, pos) = if self.train_embeddings {
            (
                self.tok_emb.as_tensor().clone(),
                self.pos_emb.as_tensor().clone(),
            )
        } else {
            (
                self.tok_emb.as_tensor().detach(),
                self.pos_emb.as_tensor().detach(),
            )
        };
        let d = self.cfg.d_model;
        let dt = self.dtype();
        let (nh, dh) = (self.cfg.heads, d / self.cfg.heads);
        let x = tok
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, d))?
            .broadcast_add(&pos.narrow(0, 0, l)?)?;
        let mut h = self.norm(&x)?;
        // Additive attention mask over the keys: 0 for tokens, −1e9 for padding; [B, 1, 1, L].
        let keep = ids.ne(PAD_ID)?.to_dtype(DType::F32)?;
        let mask = ((keep - 1.0)? * 1e9)?.reshape((b, 1, 1, l))?;
        let scale = 1.0 / (dh as f64).sqrt();
        for layer in 0..self.cfg.layers {
            let run = |short: &str, x: &Tensor, ctx: &mut Ctx| -> Result<Tensor> {
                self.layer(&block_layer_name(layer, short))?
                    .forward_ctx(x, ctx)
            };
            let heads = |t: Tensor| -> Result<Tensor> {
                Ok(t.reshape((b, l, nh, dh))?.transpose(1, 2)?.contiguous()?)
            };
            let n = self.norm(&h)?;
            let q = heads(run("q", &n, ctx)?)?;
            let k = heads(run("k", &n, ctx)?)?;
            let v = heads(run("v", &n, ctx)?)?;
            let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?
                .to_dtype(DType::F32)?
                .broadcast_add(&mask)?;
            // `candle_nn::ops::softmax_last_dim` has no backward (candle applies it without
            // gradient tracking), which would silently freeze q and k; this softmax is
            // differentiable.
            let att = candle_nn::ops::softmax(&scores, D::Minus1)?
                .to_dtype(dt)?
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, l, d))?;
            h = (&h + run("o", &att, ctx)?)?;
            let n = self.norm(&h)?;
            let f = run("up", &n, ctx)?.gelu()?;
            h = (&h + run("down", &f, ctx)?)?;
        }
        let cls = self.norm(&h)?.narrow(1, 0, 1)?.reshape((b, d))?;
        let pooled = self.layer("pooler")?.forward_ctx(&cls, ctx)?;
        let pooled = pooled.tanh()?;
        let s = self.layer("head")?.forward_ctx(&pooled, ctx)?;
        Ok(RescorerOutput {
            scores: s.reshape(b)?.to_dtype(DType::F32)?,
            cls: pooled.to_dtype(DType::F32)?,
        })
    }

    fn norm(&self, x: &Tensor) -> Result<Tensor> {
        match self.cfg.norm {
            NormKind::Rms => crate::model::nn::rms_norm(x),
            NormKind::Layer => crate::model::nn::layer_norm(x),
        }
    }

    /// The dtype the rescorer runs in (its embeddings and layers); scores and the pooled
    /// embedding come out in f32.
    pub fn dtype(&self) -> DType {
        self.tok_emb.dtype()
    }

    /// Converts the embeddings and every layer to `dtype` (f32, f16 or bf16). Build the optimiser
    /// after this.
    pub fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        for l in &mut self.layers {
            l.to_dtype(dtype)?;
        }
        self.tok_emb = Var::from_tensor(&self.tok_emb.as_tensor().to_dtype(dtype)?)?;
        self.pos_emb = Var::from_tensor(&self.pos_emb.as_tensor().to_dtype(dtype)?)?;
        Ok(())
    }

    /// Every trainable parameter with its name: the embeddings (`tok_emb`, `pos_emb`) when the
    /// base is trained, then each layer's [`MoleLinear::trainable_vars`].
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if self.train_embeddings {
            out.push(("tok_emb".to_string(), self.tok_emb.clone()));
            out.push(("pos_emb".to_string(), self.pos_emb.clone()));
        }
        out.extend(self.layers.iter().flat_map(|l| l.trainable_vars()));
        out
    }

    /// The number of trainable parameters.
    pub fn num_trainable(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    /// The number of base parameters (what full fine-tuning trains): embeddings, weights, biases.
    pub fn num_base_params(&self) -> usize {
        let emb = self.tok_emb.as_tensor().elem_count() + self.pos_emb.as_tensor().elem_count();
        emb + self
            .layers
            .iter()
            .map(|l| {
                let (i, o) = l.dims();
                i * o + l.bias().map_or(0, |b| b.elem_count())
            })
            .sum::<usize>()
    }

    /// A deep copy of the base (fresh parameters with the same values, no adapters, every
    /// parameter trainable), so several fine-tuning runs can start from one pretrained rescorer.
    pub fn deep_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let w = l.weight()?.copy()?;
                let b = l.bias().map(|b| b.copy()).transpose()?;
                MoleLinear::from_weights(l.name(), &w, b.as_ref())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Rescorer {
            cfg: self.cfg,
            tok_emb: Var::from_tensor(&self.tok_emb.as_tensor().copy()?)?,
            pos_emb: Var::from_tensor(&self.pos_emb.as_tensor().copy()?)?,
            train_embeddings: true,
            layers,
            device: self.device.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Scores and losses.

/// `log softmax(x)` over the last dimension from primitive ops (any float dtype, differentiable):
/// `x − m − log Σ exp(x − m)` with `m` the (detached) row maximum.
fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

fn check_lists(what: &'static str, scores: &Tensor, other: &Tensor) -> Result<(usize, usize)> {
    let (b, n) = scores.dims2()?;
    if other.dims() != [b, n] {
        return Err(Error::Unsupported {
            op: what,
            what: format!(
                "scores {:?} and word errors {:?} must both be [lists, N]",
                scores.dims(),
                other.dims()
            ),
        });
    }
    if n == 0 || b == 0 {
        return Err(Error::InvalidDim {
            what: "N-best lists",
            value: 0,
            reason: "need at least one list of at least one hypothesis",
        });
    }
    Ok((b, n))
}

/// The combined score of each hypothesis: `s_i = s^a_i + β·s^l_i` (first-pass cost plus `β` times
/// the rescorer's cost; both negative log-probabilities), elementwise over tensors of one shape.
pub fn combined_scores(first_pass: &Tensor, rescorer: &Tensor, beta: f64) -> Result<Tensor> {
    Ok((first_pass + (rescorer * beta)?)?)
}

/// The N-best posteriors `P_i = softmax(−s)_i` of scores `[lists, N]`, per list.
pub fn nbest_posteriors(scores: &Tensor) -> Result<Tensor> {
    Ok(log_softmax_last(&scores.neg()?)?.exp()?)
}

/// MWER (minimum word error rate) loss over N-best lists, averaged over the lists:
///
/// ```text
/// L = (1/B) Σ_b Σ_i P_bi (ε_bi − ε̄_b)      P_b = softmax(−s_b),  ε̄_b = (1/N) Σ_i ε_bi
/// ```
///
/// `scores` `s` `[B, N]` (combined costs, see [`combined_scores`]); `errors` `ε` `[B, N]` (word
/// errors of each hypothesis, same dtype). Differentiable in `scores` by candle autograd.
pub fn mwer_loss(scores: &Tensor, errors: &Tensor) -> Result<Tensor> {
    check_lists("mwer_loss", scores, errors)?;
    let p = nbest_posteriors(scores)?;
    let centred = errors.broadcast_sub(&errors.mean_keepdim(1)?)?;
    Ok((p * centred)?.sum(1)?.mean(0)?)
}

/// MWED (minimum word error distribution) loss: the cross-entropy from the word-error
/// distribution to the score distribution, averaged over the lists:
///
/// ```text
/// L = −(1/B) Σ_b Σ_i Q_bi · log P_bi      Q_b = softmax(−ε_b),  P_b = softmax(−s_b / T)
/// ```
///
/// It pulls the list's posteriors towards a distribution ranked like the word errors rather
/// than towards their expectation (MWER). Xu et al. derive the temperature `T` from the ratio of
/// the scales of `s` and `ε`; here it is a parameter (`T = 1` uses the same posteriors as
/// [`mwer_loss`]). Shapes and dtype as in [`mwer_loss`]; `T` must be positive and finite.
pub fn mwed_loss(scores: &Tensor, errors: &Tensor, temperature: f64) -> Result<Tensor> {
    check_lists("mwed_loss", scores, errors)?;
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::InvalidParameter {
            what: "MWED temperature",
            value: temperature as f32,
            reason: "must be positive and finite",
        });
    }
    let q = log_softmax_last(&errors.neg()?)?.exp()?.detach();
    let log_p = log_softmax_last(&(scores.neg()? / temperature)?)?;
    Ok((q * log_p)?.sum(1)?.mean(0)?.neg()?)
}

/// The correlation regulariser `L_cor` of a batch of \[CLS\] embeddings `c` `[n, d]` (n ≥ 2): the
/// squared Frobenius norm of the off-diagonal part of their correlation matrix,
///
/// ```text
/// z_kj = (c_kj − μ_j) / √(σ²_j + 1e-8)      μ_j, σ²_j the batch mean and variance of dimension j
/// C = zᵀz / n                                 the d × d correlation matrix
/// L_cor = Σ_{i≠j} C_ij²
/// ```
///
/// Zero for uncorrelated dimensions; it pushes the embeddings towards isotropy. Differentiable in
/// `c` by candle autograd; any float dtype.
pub fn correlation_loss(cls: &Tensor) -> Result<Tensor> {
    let (n, d) = cls.dims2()?;
    if n < 2 {
        return Err(Error::InvalidDim {
            what: "embeddings for the correlation loss",
            value: n,
            reason: "a correlation needs at least 2 rows",
        });
    }
    let centred = cls.broadcast_sub(&cls.mean_keepdim(0)?)?;
    let var = centred.sqr()?.mean_keepdim(0)?;
    let z = centred.broadcast_div(&(var + 1e-8)?.sqrt()?)?;
    let c = (z.t()?.matmul(&z)? / n as f64)?;
    let off = (Tensor::ones((d, d), cls.dtype(), cls.device())?
        - Tensor::eye(d, cls.dtype(), cls.device())?)?;
    Ok((c * off)?.sqr()?.sum_all()?)
}

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
        for (what, v) in [
            ("words", self.words),
            ("topics", self.topics),
            ("min_words", self.min_words),
            ("nbest", self.nbest),
            ("max_edits", self.max_edits),
            ("target_train_lists", self.target_train_lists),
            ("test_lists", self.test_lists),
            ("batch", self.batch),
            ("rank", self.rank),
        ] {
            if v == 0 {
                return Err(Error::InvalidDim {
                    what,
                    value: 0,
                    reason: "the demo needs at least 1",
                });
            }
        }
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
        for (what, v) in [
            ("lr_pretrain", self.lr_pretrain),
            ("lr_full", self.lr_full),
            ("lr_lora", self.lr_lora),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::InvalidParameter {
                    what,
                    value: v as f32,
                    reason: "a learning rate must be finite and greater than 0",
                });
            }
        }
        Ok(())
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

/// Pretrains `model` on fresh general-domain lists: list-wise cross-entropy of the rescorer's
/// scores alone (`softmax(−s^l)`) towards each list's oracle hypothesis (fewest word errors).
fn pretrain(
    model: &Rescorer,
    task: &RescoringTask,
    cfg: &LorbDemoConfig,
    rng: &mut Rng,
    progress: &mut dyn FnMut(&str),
) -> Result<f32> {
    let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: cfg.lr_pretrain,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let dev = model.device().clone();
    let mut last = f32::NAN;
    for step in 0..cfg.pretrain_steps {
        let lists = task.lists(0, cfg.batch, rng);
        let (ids, _, eps) = encode_lists(&lists, &dev)?;
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
        let loss = candle_nn::loss::cross_entropy(&sl.neg()?, &target)?;
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
    cfg: &LorbDemoConfig,
    lr: f64,
    lambda_cor: f64,
    rng: &mut Rng,
    label: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<f32> {
    let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
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

    let first = rescored_wer(None, &test, cfg.beta)?;
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
    let mut base = Rescorer::new(cfg.rescorer_config(), &mut rng, &dev)?;
    base.to_dtype(cfg.dtype)?;
    let full_params = base.num_base_params();
    let loss = pretrain(&base, &task, cfg, &mut rng, progress)?;
    let pretrain_s = t.elapsed().as_secs_f32();
    final_losses.push(("pretraining (cross-entropy)".to_string(), loss));
    rows.push(row(ROW_NAMES[0], first, 0, full_params, 0.0));
    rows.push(row(
        ROW_NAMES[1],
        rescored_wer(Some(&base), &test, cfg.beta)?,
        0,
        full_params,
        pretrain_s,
    ));
    let general_wer = (
        rescored_wer(None, &general_test, cfg.beta)?,
        rescored_wer(Some(&base), &general_test, cfg.beta)?,
    );

    // Full fine-tuning with MWER.
    let full = base.deep_clone()?;
    let t = Instant::now();
    let loss = adapt(
        &full,
        &train,
        cfg,
        cfg.lr_full,
        0.0,
        &mut rng,
        ROW_NAMES[2],
        progress,
    )?;
    let secs = t.elapsed().as_secs_f32();
    final_losses.push((ROW_NAMES[2].to_string(), loss));
    rows.push(row(
        ROW_NAMES[2],
        rescored_wer(Some(&full), &test, cfg.beta)?,
        full.num_trainable(),
        full_params,
        secs,
    ));

    // LoRB, without and with the correlation regulariser.
    for (name, lambda) in [(ROW_NAMES[3], 0.0), (ROW_NAMES[4], cfg.lambda_cor)] {
        let mut m = base.deep_clone()?;
        m.add_lora(
            &cfg.targets,
            MoleConfig::lora(cfg.rank, cfg.alpha),
            &mut rng,
        )?;
        let t = Instant::now();
        let loss = adapt(
            &m,
            &train,
            cfg,
            cfg.lr_lora,
            lambda,
            &mut rng,
            name,
            progress,
        )?;
        let secs = t.elapsed().as_secs_f32();
        final_losses.push((name.to_string(), loss));
        rows.push(row(
            name,
            rescored_wer(Some(&m), &test, cfg.beta)?,
            m.num_trainable(),
            full_params,
            secs,
        ));
    }

    Ok(LorbReport {
        config: cfg.clone(),
        rows,
        oracle_wer: oracle_wer(&test),
        general_wer,
        final_losses,
    })
}
