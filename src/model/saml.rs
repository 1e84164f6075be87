//! SAML (PAPERS.md): a mixture of LoRA experts on a quantised, Whisper-shaped encoder-decoder,
//! mixed per utterance in weight space and adapted to a speaker at test time.
//!
//! ```text
//! frames [B, L, d_feat] ─ encoder.conv (kernel 3) ─ gelu (+pos)
//!   ─ per layer: self_attn.{q,k,v,out}_proj (+res) ─ fc1 ─ gelu ─ fc2 (+res) ─► enc
//! previous tokens ─ decoder.embed (+pos)
//!   ─ per layer: causal self_attn (+res) ─ encoder_attn over enc (+res) ─ fc1 ─ gelu ─ fc2 (+res)
//!   ─ decoder.head ─► logits [B, L, V]
//! ```
//!
//! Every linear, conv and embedding weight is a [`MoleLinear`] and can be quantised to NF4 or int8
//! ([`SamlModel::quantize`]). Experts sit on q, k, v and out of every attention module (encoder self,
//! decoder self, cross), none on the FFN; they mix in weight space (`Ā = Σ p_e A_e`, `B̄ = Σ p_e B_e`)
//! with one `p` per utterance and module, from a router per module kind (encoder self, decoder self,
//! cross) shared across layers but run on each layer's own input: Conv1d (kernel 3) over the input,
//! attention pooling over time, linear, `softmax(z / T)`; the cross-attention router pools the
//! decoder states and the encoder output with the same conv and concatenates the two.
//!
//! Incremental decoding: the decoder routers pool over time, so with a key/value cache each new
//! token changes the decoder-side `p` and with it the mixed adapter; cached keys and values computed
//! under an earlier `p` then no longer match what a full recomputation gives. This model computes the
//! whole (teacher-forced) sequence at once; a streaming decoder should either fix `p` after the
//! encoder (cross router on the encoder output only) or recompute the cache when `p` changes.
//!
//! Attention is single-head; positions are sinusoidal.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::error::{Error, Result};
use crate::model::linear::{Ctx, GateMode, MoleConfig, MoleLinear, QuantFormat};
use crate::model::nn::{rms_norm as rms, sinusoids, softmax};
use crate::model::weights::LoraPair;
use crate::Rng;

/// Sizes of a [`SamlModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamlConfig {
    /// Features per input frame.
    pub d_feat: usize,
    /// Model width.
    pub d_model: usize,
    /// FFN width.
    pub d_ff: usize,
    /// Output tokens (the decoder's input vocabulary has one more: the start token).
    pub vocab: usize,
    /// Encoder and decoder layers.
    pub enc_layers: usize,
    pub dec_layers: usize,
    /// Longest sequence (for the positions).
    pub max_len: usize,
    /// Channels of the routers' conv.
    pub router_channels: usize,
}

/// The three module kinds, each with its own router.
const KINDS: [&str; 3] = ["encoder_self", "decoder_self", "cross"];

/// A SAML router: conv (kernel 3) → GELU → attention pooling over time → linear → softmax(z/T):
///
/// ```text
/// h_t = gelu(conv·[x_{t-1}; x_t; x_{t+1}])       (zero padded; conv is [c, 3·d])
/// a   = softmax_t(att·h_t)                       (attention pooling weights over time)
/// z   = out·(Σ_t a_t·h_t)   (the cross router: out·[pool(dec); pool(enc)])
/// p   = softmax(z / T)
/// ```
#[derive(Debug, Clone)]
pub struct Router {
    /// The kernel-3 conv as a linear layer over the unfolded input, `[c, 3·d]`.
    pub conv: MoleLinear,
    /// The attention-pooling scorer, `[1, c]`.
    pub att: MoleLinear,
    /// The output layer, `[E, c]` (`[E, 2c]` for the cross router).
    pub out: MoleLinear,
    /// `T`.
    pub temperature: f32,
}

/// `[B, L, d]` → `[B, L, 3d]`: each frame with its left and right neighbour (zero padded), the input
/// of a kernel-3 convolution written as a linear layer.
pub fn unfold3(x: &Tensor) -> Result<Tensor> {
    let &[_, l, _] = x.dims() else {
        return Err(Error::Unsupported {
            op: "unfold3",
            what: format!("a tensor of shape {:?} (it takes [B, L, d])", x.dims()),
        });
    };
    let p = x.pad_with_zeros(1, 1, 1)?;
    Ok(Tensor::cat(
        &[p.narrow(1, 0, l)?, p.narrow(1, 1, l)?, p.narrow(1, 2, l)?],
        2,
    )?)
}

impl Router {
    /// A router named `name` over inputs of width `d`, with `c` conv channels, `inputs` pooled
    /// streams (1, or 2 for the cross router) and `E` outputs, randomly initialised.
    pub fn new(
        name: &str,
        d: usize,
        c: usize,
        inputs: usize,
        e: usize,
        rng: &mut Rng,
        dev: &Device,
    ) -> Result<Self> {
        Ok(Router {
            conv: MoleLinear::new(&format!("router.{name}.conv"), 3 * d, c, true, rng, dev)?,
            att: MoleLinear::new(&format!("router.{name}.att"), c, 1, true, rng, dev)?,
            out: MoleLinear::new(&format!("router.{name}.out"), inputs * c, e, true, rng, dev)?,
            temperature: 1.0,
        })
    }

    /// Attention-pooled conv features `[B, c]`.
    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .conv
            .forward_ctx(&unfold3(x)?, &mut Ctx::default())?
            .gelu()?;
        let a = self.att.forward_ctx(&h, &mut Ctx::default())?; // [B, L, 1]
        let a = softmax(&a, 1)?;
        Ok(h.broadcast_mul(&a)?.sum(1)?)
    }

    /// `p` `[B, E]` for input `x` `[B, L, d]` (and, for the cross router, the encoder output).
    pub fn probs(&self, x: &Tensor, enc: Option<&Tensor>) -> Result<Tensor> {
        let pooled = match enc {
            Some(e) => Tensor::cat(&[self.pool(x)?, self.pool(e)?], 1)?,
            None => self.pool(x)?,
        };
        let z = self
            .out
            .forward_ctx(&pooled, &mut Ctx::default())?
            .to_dtype(DType::F32)?;
        Ok(candle_nn::ops::softmax(
            &(z / f64::from(self.temperature))?,
            D::Minus1,
        )?)
    }

    /// Converts the router's layers to `dtype`.
    pub fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        for l in [&mut self.conv, &mut self.att, &mut self.out] {
            l.to_dtype(dtype)?;
        }
        Ok(())
    }

    fn vars(&self) -> Vec<(String, Var)> {
        [&self.conv, &self.att, &self.out]
            .iter()
            .flat_map(|l| l.trainable_vars())
            .collect()
    }
}

/// The Whisper-shaped encoder-decoder; see the module docs.
#[derive(Debug, Clone)]
pub struct SamlModel {
    cfg: SamlConfig,
    layers: BTreeMap<String, MoleLinear>,
    routers: Option<Vec<Router>>,
    pos: Tensor,
    device: Device,
}

/// The attention projections of the model, which receive experts.
fn attention_names(cfg: &SamlConfig) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..cfg.enc_layers {
        for p in ["q", "k", "v", "out"] {
            out.push(format!("encoder.layers.{i}.self_attn.{p}_proj"));
        }
    }
    for i in 0..cfg.dec_layers {
        for m in ["self_attn", "encoder_attn"] {
            for p in ["q", "k", "v", "out"] {
                out.push(format!("decoder.layers.{i}.{m}.{p}_proj"));
            }
        }
    }
    out
}

impl SamlModel {
    /// A model with random weights.
    pub fn new(cfg: SamlConfig, rng: &mut Rng, dev: &Device) -> Result<Self> {
        let d = cfg.d_model;
        let mut shapes: Vec<(String, usize, usize)> =
            vec![("encoder.conv".into(), 3 * cfg.d_feat, d)];
        for i in 0..cfg.enc_layers {
            shapes.push((format!("encoder.layers.{i}.fc1"), d, cfg.d_ff));
            shapes.push((format!("encoder.layers.{i}.fc2"), cfg.d_ff, d));
        }
        shapes.push(("decoder.embed".into(), cfg.vocab + 1, d));
        for i in 0..cfg.dec_layers {
            shapes.push((format!("decoder.layers.{i}.fc1"), d, cfg.d_ff));
            shapes.push((format!("decoder.layers.{i}.fc2"), cfg.d_ff, d));
        }
        shapes.push(("decoder.head".into(), d, cfg.vocab));
        for n in attention_names(&cfg) {
            shapes.push((n, d, d));
        }
        let mut layers = BTreeMap::new();
        for (n, i, o) in shapes {
            layers.insert(n.clone(), MoleLinear::new(&n, i, o, true, rng, dev)?);
        }
        Ok(SamlModel {
            cfg,
            layers,
            routers: None,
            pos: sinusoids(cfg.max_len, d, dev)?,
            device: dev.clone(),
        })
    }

    /// The dtype the model runs in (its layers'); inputs are converted to it, logits come out in
    /// f32.
    pub fn dtype(&self) -> DType {
        self.layers
            .values()
            .next()
            .map_or(DType::F32, MoleLinear::dtype)
    }

    /// Converts every layer and router to `dtype` (f32, f16 or bf16; see [`MoleLinear::to_dtype`]).
    /// Routers added later are converted when they are added. Build the optimisers after this.
    pub fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        for l in self.layers.values_mut() {
            l.to_dtype(dtype)?;
        }
        for r in self.routers.iter_mut().flatten() {
            r.to_dtype(dtype)?;
        }
        Ok(())
    }

    /// The sizes.
    pub fn config(&self) -> &SamlConfig {
        &self.cfg
    }

    fn layer(&self, name: &str) -> Result<&MoleLinear> {
        self.layers.get(name).ok_or_else(|| Error::Unsupported {
            op: "SamlModel",
            what: format!("no layer named {name:?}"),
        })
    }

    /// A deep copy of the base weights (no experts, no routers).
    pub fn base_clone(&self) -> Result<Self> {
        let mut layers = BTreeMap::new();
        for (n, l) in &self.layers {
            layers.insert(n.clone(), l.base_copy()?);
        }
        Ok(SamlModel {
            cfg: self.cfg,
            layers,
            routers: None,
            pos: self.pos.clone(),
            device: self.device.clone(),
        })
    }

    /// Quantises every weight (linear, conv, embedding) and freezes the base.
    pub fn quantize(&mut self, format: QuantFormat) -> Result<()> {
        for l in self.layers.values_mut() {
            l.quantize(format)?;
        }
        Ok(())
    }

    /// Bytes of the base weights (packed weights, scales and biases).
    pub fn base_bytes(&self) -> usize {
        self.layers.values().map(|l| l.base_bytes()).sum()
    }

    /// Trains every base weight (pretraining) or freezes them.
    pub fn set_train_base(&mut self, train: bool) {
        for l in self.layers.values_mut() {
            l.set_train_base(train);
        }
    }

    /// Gives every attention projection a single LoRA adapter (rank `r`, `alpha`): the per-speaker
    /// LoRAs the experts start from, and the one-LoRA baseline.
    pub fn add_single_lora(&mut self, rank: usize, alpha: f32, rng: &mut Rng) -> Result<()> {
        for n in attention_names(&self.cfg) {
            if let Some(l) = self.layers.get_mut(&n) {
                l.add_experts(MoleConfig::lora(rank, alpha), rng)?;
            }
        }
        Ok(())
    }

    /// The single LoRA of every attention projection, by layer name.
    pub fn lora_pairs(&self) -> Result<BTreeMap<String, LoraPair>> {
        attention_names(&self.cfg)
            .into_iter()
            .map(|n| Ok((n.clone(), self.layer(&n)?.lora_pair()?)))
            .collect()
    }

    /// SAML: `E = per_expert.len()` experts on every attention projection, initialised from one LoRA
    /// per expert (e.g. per training speaker; all of rank `rank`), mixed in weight space by the three
    /// routers (new, with temperature `temperature`).
    pub fn add_saml_experts(
        &mut self,
        per_expert: &[BTreeMap<String, LoraPair>],
        rank: usize,
        alpha: f32,
        temperature: f32,
        rng: &mut Rng,
    ) -> Result<()> {
        let e = per_expert.len();
        let cfg = MoleConfig {
            num_experts: e,
            gate: GateMode::WeightSpace,
            ..MoleConfig::lora(rank, alpha)
        };
        for n in attention_names(&self.cfg) {
            let pairs = per_expert
                .iter()
                .map(|m| {
                    m.get(&n).ok_or_else(|| Error::Weights {
                        source_name: "per-expert LoRAs".into(),
                        key: n.clone(),
                        detail: "missing".into(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let l = self.layers.get_mut(&n).ok_or_else(|| Error::Unsupported {
                op: "SamlModel",
                what: format!("no layer named {n:?}"),
            })?;
            l.add_experts(cfg, rng)?;
            l.init_experts_from(&pairs)?;
        }
        let (d, c) = (self.cfg.d_model, self.cfg.router_channels);
        let mut routers = Vec::with_capacity(3);
        for (i, k) in KINDS.iter().enumerate() {
            let inputs = if i == 2 { 2 } else { 1 };
            let mut r = Router::new(k, d, c, inputs, e, rng, &self.device)?;
            r.to_dtype(self.dtype())?;
            r.temperature = temperature;
            routers.push(r);
        }
        self.routers = Some(routers);
        Ok(())
    }

    /// The routers' parameters (the SAML router optimiser's).
    pub fn router_vars(&self) -> Vec<Var> {
        self.routers
            .iter()
            .flatten()
            .flat_map(|r| r.vars())
            .map(|(_, v)| v)
            .collect()
    }

    /// Every trainable parameter of the layers (base weights when trained, else the adapters).
    pub fn layer_vars(&self) -> Vec<Var> {
        self.layers
            .values()
            .flat_map(|l| l.trainable_vars())
            .map(|(_, v)| v)
            .collect()
    }

    /// Parameters of the base (every layer's weight and bias).
    pub fn num_base_params(&self) -> usize {
        self.layers
            .values()
            .map(|l| {
                let (i, o) = l.dims();
                i * o + l.bias().map_or(0, |b| b.elem_count())
            })
            .sum()
    }

    fn router(&self, kind: usize) -> Option<&Router> {
        self.routers.as_ref().and_then(|r| r.get(kind))
    }

    /// Single-head attention with the four projections of `module` (`…self_attn` or
    /// `…encoder_attn`); `p` the module's per-utterance mixture (SAML).
    fn attention(
        &self,
        module: &str,
        x: &Tensor,
        kv: &Tensor,
        causal: bool,
        p: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut ctx = Ctx {
            seq_probs: p,
            ..Default::default()
        };
        let q = self
            .layer(&format!("{module}.q_proj"))?
            .forward_ctx(x, &mut ctx)?;
        let k = self
            .layer(&format!("{module}.k_proj"))?
            .forward_ctx(kv, &mut ctx)?;
        let v = self
            .layer(&format!("{module}.v_proj"))?
            .forward_ctx(kv, &mut ctx)?;
        let mut scores =
            (q.matmul(&k.transpose(1, 2)?.contiguous()?)? / (self.cfg.d_model as f64).sqrt())?;
        if causal {
            let l = x.dims()[1];
            let mask: Vec<f32> = (0..l * l)
                .map(|i| {
                    if i % l > i / l {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            scores = scores.broadcast_add(
                &Tensor::from_vec(mask, (l, l), x.device())?.to_dtype(scores.dtype())?,
            )?;
        }
        let att = softmax(&scores, D::Minus1)?.matmul(&v)?;
        self.layer(&format!("{module}.out_proj"))?
            .forward_ctx(&att, &mut ctx)
    }

    fn ffn(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let h = self
            .layer(&format!("{prefix}.fc1"))?
            .forward_ctx(x, &mut Ctx::default())?
            .gelu()?;
        self.layer(&format!("{prefix}.fc2"))?
            .forward_ctx(&h, &mut Ctx::default())
    }

    /// Teacher-forced logits `[B, L, V]` for frames `[B, F, d_feat]` and labels `[B, L]` (u32; `L`
    /// need not be `F`): the decoder sees the start token and the labels shifted right.
    pub fn forward(&self, frames: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let (b, f, _) = frames.dims3()?;
        let (bl, l) = labels.dims2()?;
        crate::error::check_len("label rows (the batch)", b, bl)?;
        let dt = self.dtype();
        let frames = &frames.to_dtype(dt)?;
        for (what, n) in [("frames", f), ("labels", l)] {
            if n > self.cfg.max_len {
                return Err(Error::InvalidDim {
                    what,
                    value: n,
                    reason: "longer than the model's max_len",
                });
            }
        }
        let pos = self.pos.narrow(0, 0, f)?.to_dtype(dt)?;
        let conv = self
            .layer("encoder.conv")?
            .forward_ctx(&unfold3(frames)?, &mut Ctx::default())?;
        let mut x = conv.gelu()?.broadcast_add(&pos)?;
        for i in 0..self.cfg.enc_layers {
            let n = rms(&x)?;
            let p = self.router(0).map(|r| r.probs(&n, None)).transpose()?;
            x = (&x
                + self.attention(
                    &format!("encoder.layers.{i}.self_attn"),
                    &n,
                    &n,
                    false,
                    p.as_ref(),
                )?)?;
            x = (&x + self.ffn(&format!("encoder.layers.{i}"), &rms(&x)?)?)?;
        }
        let enc = rms(&x)?;

        // Start token (id V) then the labels shifted right, as one-hot rows for the embedding.
        let lab: Vec<u32> = labels.flatten_all()?.to_vec1()?;
        let v1 = self.cfg.vocab + 1;
        let mut onehot = vec![0.0f32; b * l * v1];
        for u in 0..b {
            for t in 0..l {
                let prev = if t == 0 {
                    self.cfg.vocab
                } else {
                    lab[u * l + t - 1] as usize
                };
                onehot[(u * l + t) * v1 + prev.min(self.cfg.vocab)] = 1.0;
            }
        }
        let onehot = Tensor::from_vec(onehot, (b, l, v1), frames.device())?.to_dtype(dt)?;
        let emb = self
            .layer("decoder.embed")?
            .forward_ctx(&onehot, &mut Ctx::default())?;
        let mut h = emb.broadcast_add(&self.pos.narrow(0, 0, l)?.to_dtype(dt)?)?;
        for i in 0..self.cfg.dec_layers {
            let n = rms(&h)?;
            let p = self.router(1).map(|r| r.probs(&n, None)).transpose()?;
            h = (&h
                + self.attention(
                    &format!("decoder.layers.{i}.self_attn"),
                    &n,
                    &n,
                    true,
                    p.as_ref(),
                )?)?;
            let n = rms(&h)?;
            let p = self
                .router(2)
                .map(|r| r.probs(&n, Some(&enc)))
                .transpose()?;
            h = (&h
                + self.attention(
                    &format!("decoder.layers.{i}.encoder_attn"),
                    &n,
                    &enc,
                    false,
                    p.as_ref(),
                )?)?;
            h = (&h + self.ffn(&format!("decoder.layers.{i}"), &rms(&h)?)?)?;
        }
        Ok(self
            .layer("decoder.head")?
            .forward_ctx(&rms(&h)?, &mut Ctx::default())?
            .to_dtype(DType::F32)?)
    }

    /// Token error (%) under teacher forcing.
    pub fn token_error(&self, frames: &Tensor, labels: &Tensor) -> Result<f32> {
        let pred = self
            .forward(frames, labels)?
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?;
        let wrong = pred
            .ne(labels)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        Ok(100.0 * wrong)
    }

    /// The mean cross-entropy of the teacher-forced predictions over the tokens where `mask`
    /// `[B, L]` (f32) is 1 (variable-length transcripts padded to `L`).
    pub fn loss_masked(&self, frames: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let logits = self.forward(frames, labels)?;
        crate::model::llm_asr::masked_cross_entropy(&logits, labels, mask)
    }

    /// Greedy decoding of a batch: at each step the labels so far (and a placeholder) are run
    /// teacher-forced and the most probable token at the new position is kept, until every
    /// utterance has written `eos` or `max_len` tokens. Every step recomputes the whole model, as
    /// the decoder routers' mixture changes with each token (see the module docs). Returns each
    /// utterance's tokens before its `eos`.
    pub fn greedy(&self, frames: &Tensor, eos: u32, max_len: usize) -> Result<Vec<Vec<u32>>> {
        let b = frames.dims3()?.0;
        let mut seqs: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for _ in 0..max_len {
            let l = seqs[0].len() + 1;
            let flat: Vec<u32> = seqs
                .iter()
                .flat_map(|s| s.iter().copied().chain(std::iter::once(eos)))
                .collect();
            let labels = Tensor::from_vec(flat, (b, l), frames.device())?;
            let next: Vec<u32> = self
                .forward(frames, &labels)?
                .narrow(1, l - 1, 1)?
                .squeeze(1)?
                .argmax(D::Minus1)?
                .to_dtype(DType::U32)?
                .to_vec1()?;
            for (i, t) in next.into_iter().enumerate() {
                let t = if done[i] { eos } else { t };
                done[i] |= t == eos;
                seqs[i].push(t);
            }
            if done.iter().all(|d| *d) {
                break;
            }
        }
        Ok(seqs
            .into_iter()
            .map(|s| s.into_iter().take_while(|&t| t != eos).collect())
            .collect())
    }

    /// Cross-entropy of the teacher-forced predictions.
    pub fn loss(&self, frames: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let logits = self.forward(frames, labels)?;
        Ok(candle_nn::loss::cross_entropy(
            &logits.reshape(((), self.cfg.vocab))?,
            &labels.flatten_all()?,
        )?)
    }
}
