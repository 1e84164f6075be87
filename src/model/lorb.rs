//! LoRB (PAPERS.md): LoRA for a BERT-style second-pass rescorer and its discriminative losses.
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
//! `molora demo lorb` trains it on a synthetic rescoring task: [`crate::demo::lorb`].

use candle_core::{DType, Device, Tensor, Var, D};

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
