//! The LLM-ASR model HDMoLE is published for (PAPERS.md), small: a speech encoder (convolutional
//! subsampling and a transformer), a projector into the decoder's width, and an autoregressive
//! decoder-only transformer that reads the projected speech as a prefix and then writes the
//! transcript one token at a time.
//!
//! ```text
//! log-mel [B, F, d_feat] ─ stack 2 ─ encoder.sub.0 ─ gelu ─ stack 2 ─ encoder.sub.1 ─ gelu (+pos)
//!   ─ per layer i: encoder.i.{q,k,v,o} self-attention (+res) ─ encoder.i.up ─ gelu ─ encoder.i.down (+res)
//!   ─ rms ─► enc [B, S = F/4, d]
//! enc ─ projector.0 ─ gelu ─ projector.1 ─► speech prefix [B, S, d]
//! tokens ─ embed (+pos) ─► [B, L, d]
//! [prefix; tokens] ─ per layer i: decoder.i.{q,k,v,o} prefix-causal attention (+res)
//!   ─ decoder.i.up ─ gelu ─ decoder.i.down (+res) ─ rms ─ head on the token positions ─► logits [B, L, V]
//! global router: mean_S(enc) ─ global_router ─ softmax ─► g [B, E]
//! ```
//!
//! "Stack 2" puts two neighbouring frames side by side, so `encoder.sub.*` are stride-2,
//! kernel-2 convolutions written as linear layers: the encoder runs at 40 ms per position. The
//! decoder's attention is a prefix language model's: a speech position sees every speech position; a
//! token sees every speech position and the tokens up to itself. Text positions are numbered from 0
//! after the prefix, so a transcript's encoding does not depend on how long its audio is.
//!
//! Every linear layer is a [`MoleLinear`] (the token embedding too, over one-hot rows);
//! [`LlmAsr::add_experts`] gives LoRA experts to the layers its targets select, and with a hierarchy
//! the global router's posterior reaches every routed layer of the projector and the decoder.

use candle_core::{DType, Device, Tensor, Var, D};

use crate::error::{Error, Result};
use crate::model::linear::{Ctx, MoleConfig, MoleLinear, Routed};
use crate::model::nn::{push_routing as push, rms_norm, sinusoids, softmax};
use crate::Rng;

/// Sizes of an [`LlmAsr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmAsrConfig {
    /// Features per input frame (80 log-mel bins).
    pub d_feat: usize,
    /// Width of the encoder, the projector and the decoder.
    pub d_model: usize,
    /// Attention heads (dividing `d_model`).
    pub heads: usize,
    /// Width of the feed-forward layers.
    pub d_ff: usize,
    /// Encoder and decoder layers.
    pub enc_layers: usize,
    pub dec_layers: usize,
    /// Output vocabulary (the start and end tokens included).
    pub vocab: usize,
    /// Classes of the global router (the accent domains), the experts a hierarchical layer has.
    pub num_domains: usize,
    /// Longest sequence of encoder positions or tokens (for the positions).
    pub max_len: usize,
}

impl LlmAsrConfig {
    /// Checks the sizes: every one at least 1 and `heads` dividing `d_model`.
    pub fn check(&self) -> Result<()> {
        for (what, v) in [
            ("d_feat", self.d_feat),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("d_ff", self.d_ff),
            ("encoder layers", self.enc_layers),
            ("decoder layers", self.dec_layers),
            ("vocab", self.vocab),
            ("domains", self.num_domains),
            ("max_len", self.max_len),
        ] {
            if v == 0 {
                return Err(Error::InvalidDim {
                    what,
                    value: 0,
                    reason: "the model needs at least 1",
                });
            }
        }
        if self.d_model % self.heads != 0 {
            return Err(Error::InvalidDim {
                what: "heads",
                value: self.heads,
                reason: "must divide d_model",
            });
        }
        Ok(())
    }

    /// Every layer's name with its `(d_in, d_out)`, in forward order (head, global router last).
    pub fn layer_dims(&self) -> Vec<(String, usize, usize)> {
        let (d, f) = (self.d_model, self.d_ff);
        let mut out = vec![
            ("embed".to_string(), self.vocab, d),
            ("encoder.sub.0".into(), 2 * self.d_feat, d),
            ("encoder.sub.1".into(), 2 * d, d),
        ];
        let block = |out: &mut Vec<(String, usize, usize)>, part: &str, i: usize| {
            for p in ["q", "k", "v", "o"] {
                out.push((format!("{part}.{i}.{p}"), d, d));
            }
            out.push((format!("{part}.{i}.up"), d, f));
            out.push((format!("{part}.{i}.down"), f, d));
        };
        for i in 0..self.enc_layers {
            block(&mut out, "encoder", i);
        }
        out.push(("projector.0".into(), d, d));
        out.push(("projector.1".into(), d, d));
        for i in 0..self.dec_layers {
            block(&mut out, "decoder", i);
        }
        out.push(("head".into(), d, self.vocab));
        out.push(("global_router".into(), d, self.num_domains));
        out
    }
}

/// A batch of utterances for [`LlmAsr::forward`]: features padded to a common length (a multiple of
/// 4) and the decoder's input and target tokens padded to a common length.
#[derive(Debug, Clone)]
pub struct AsrBatch {
    /// `[B, F, d_feat]`, f32.
    pub features: Tensor,
    /// The decoder's input tokens `[B, L]` (u32): the start token, then the transcript.
    pub inputs: Tensor,
    /// The tokens to predict `[B, L]` (u32): the transcript, then the end token.
    pub targets: Tensor,
    /// 1 where `targets` is a real token, 0 on padding, `[B, L]` f32.
    pub mask: Tensor,
}

impl AsrBatch {
    /// A batch from per-utterance features (`[frames_i, d_feat]` frame-major, padded with each
    /// utterance's own minimum, its silence level) and token sequences (each padded with `pad`).
    pub fn new(
        features: &[(&[f32], usize)],
        d_feat: usize,
        tokens: &[Vec<u32>],
        bos: u32,
        eos: u32,
        dev: &Device,
    ) -> Result<Self> {
        if features.is_empty() || features.len() != tokens.len() {
            return Err(Error::len_mismatch(
                "utterances in a batch (features and transcripts, at least one)",
                features.len().max(1),
                tokens.len(),
            ));
        }
        let b = features.len();
        let frames = features.iter().map(|(_, n)| *n).max().unwrap_or(0);
        let frames = frames.div_ceil(4).max(1) * 4;
        let mut x = Vec::with_capacity(b * frames * d_feat);
        for (f, n) in features {
            crate::error::check_matrix("utterance features [frames, d_feat]", *n, d_feat, f.len())?;
            let floor = f.iter().copied().fold(f32::INFINITY, f32::min);
            let floor = if floor.is_finite() { floor } else { 0.0 };
            x.extend_from_slice(f);
            x.resize(x.len() + (frames - n) * d_feat, floor);
        }
        let len = tokens.iter().map(Vec::len).max().unwrap_or(0) + 1;
        let (mut inp, mut tgt, mut mask) = (
            Vec::with_capacity(b * len),
            Vec::with_capacity(b * len),
            Vec::with_capacity(b * len),
        );
        for t in tokens {
            inp.push(bos);
            inp.extend_from_slice(t);
            tgt.extend_from_slice(t);
            tgt.push(eos);
            mask.extend(std::iter::repeat_n(1.0f32, t.len() + 1));
            let pad = len - t.len() - 1;
            inp.extend(std::iter::repeat_n(eos, pad));
            tgt.extend(std::iter::repeat_n(eos, pad));
            mask.extend(std::iter::repeat_n(0.0f32, pad));
        }
        Ok(AsrBatch {
            features: Tensor::from_vec(x, (b, frames, d_feat), dev)?,
            inputs: Tensor::from_vec(inp, (b, len), dev)?,
            targets: Tensor::from_vec(tgt, (b, len), dev)?,
            mask: Tensor::from_vec(mask, (b, len), dev)?,
        })
    }
}

/// What [`LlmAsr::forward`] returns.
pub struct LlmAsrOutput {
    /// `[B, L, V]`, f32.
    pub logits: Tensor,
    /// The global posterior `[B, E]` (when the model routes hierarchically).
    pub global: Option<Tensor>,
    /// The routing of every routed layer, by layer name.
    pub routing: Vec<(String, Routed)>,
}

/// The encoded speech of a batch, ready for the decoder: the prefix and, for a hierarchical model,
/// the global posterior.
#[derive(Debug, Clone)]
pub struct SpeechPrefix {
    /// The projector's output `[B, S, d]`.
    pub prefix: Tensor,
    /// The encoder's output `[B, S, d]`.
    pub enc: Tensor,
    /// `[B, E]`.
    pub global: Option<Tensor>,
}

/// The LLM-ASR model; see the module docs.
#[derive(Debug, Clone)]
pub struct LlmAsr {
    cfg: LlmAsrConfig,
    layers: Vec<MoleLinear>,
    pos: Tensor,
    device: Device,
}

/// `[B, L, d]` → `[B, L/2, 2d]` (L even): each pair of neighbouring positions side by side.
fn stack2(x: &Tensor) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    Ok(x.reshape((b, l / 2, 2 * d))?)
}

impl LlmAsr {
    /// A model with random weights (PyTorch's default linear initialisation, from `rng`).
    pub fn new(cfg: LlmAsrConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        cfg.check()?;
        let layers = cfg
            .layer_dims()
            .iter()
            .map(|(name, i, o)| MoleLinear::new(name, *i, *o, name != "embed", rng, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(LlmAsr {
            cfg,
            layers,
            pos: sinusoids(cfg.max_len, cfg.d_model, device)?,
            device: device.clone(),
        })
    }

    /// The sizes.
    pub fn config(&self) -> &LlmAsrConfig {
        &self.cfg
    }

    /// The layers, in [`LlmAsrConfig::layer_dims`] order.
    pub fn layers(&self) -> &[MoleLinear] {
        &self.layers
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the model runs in (its layers'); logits come out in f32.
    pub fn dtype(&self) -> DType {
        self.layers.first().map_or(DType::F32, MoleLinear::dtype)
    }

    /// Converts every layer to `dtype` (f32, f16 or bf16). Build the optimiser after this.
    pub fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        for l in &mut self.layers {
            l.to_dtype(dtype)?;
        }
        Ok(())
    }

    fn layer(&self, name: &str) -> Result<&MoleLinear> {
        self.layers
            .iter()
            .find(|l| l.name() == name)
            .ok_or_else(|| Error::Unsupported {
                op: "LlmAsr",
                what: format!("no layer named {name:?}"),
            })
    }

    /// Mutable access to a layer by name.
    pub fn layer_mut(&mut self, name: &str) -> Result<&mut MoleLinear> {
        self.layers
            .iter_mut()
            .find(|l| l.name() == name)
            .ok_or_else(|| Error::Unsupported {
                op: "LlmAsr::layer_mut",
                what: format!("no layer named {name:?}"),
            })
    }

    /// The layers that may take adapters: every linear layer but the embedding, the head and the
    /// global router.
    pub fn adaptable(cfg: &LlmAsrConfig) -> Vec<String> {
        cfg.layer_dims()
            .into_iter()
            .map(|(n, _, _)| n)
            .filter(|n| !matches!(n.as_str(), "embed" | "head" | "global_router"))
            .collect()
    }

    /// The names of the layers `targets` selects: exact names (`decoder.0.q`), prefixes up to a dot
    /// (`projector`, `decoder`, `decoder.1`), a projection in every layer of a part (`decoder.q`
    /// selects `decoder.0.q`, `decoder.1.q`, …), or `all` (every adaptable layer).
    pub fn resolve_targets(cfg: &LlmAsrConfig, targets: &[String]) -> Result<Vec<String>> {
        let names = Self::adaptable(cfg);
        let mut out: Vec<String> = Vec::new();
        for t in targets {
            let matched: Vec<&String> = names
                .iter()
                .filter(|n| {
                    if t == "all" || *n == t || n.starts_with(&format!("{t}.")) {
                        return true;
                    }
                    // `part.proj` against `part.<i>.proj`.
                    let parts: Vec<&str> = n.split('.').collect();
                    parts.len() == 3
                        && parts[1].chars().all(|c| c.is_ascii_digit())
                        && *t == format!("{}.{}", parts[0], parts[2])
                })
                .collect();
            if matched.is_empty() {
                return Err(Error::Unsupported {
                    op: "LlmAsr targets",
                    what: format!(
                        "no layer matches {t:?} (layers: {}; a part such as \"decoder\", a \
                         projection of every layer such as \"decoder.q\", or \"all\")",
                        names.join(", ")
                    ),
                });
            }
            for m in matched {
                if !out.contains(m) {
                    out.push(m.clone());
                }
            }
        }
        Ok(out)
    }

    /// Gives experts configured by `cfg` to the layers `targets` selects and freezes every base
    /// weight.
    pub fn add_experts(
        &mut self,
        targets: &[String],
        cfg: MoleConfig,
        rng: &mut Rng,
    ) -> Result<()> {
        if cfg.hierarchy.is_some() && cfg.num_experts != self.cfg.num_domains {
            return Err(Error::Unsupported {
                op: "LlmAsr::add_experts",
                what: format!(
                    "hierarchical routing with {} experts over a global router of {} domains",
                    cfg.num_experts, self.cfg.num_domains
                ),
            });
        }
        let names = Self::resolve_targets(&self.cfg, targets)?;
        if cfg.hierarchy.is_some() {
            if let Some(n) = names.iter().find(|n| n.starts_with("encoder.")) {
                return Err(Error::Unsupported {
                    op: "LlmAsr::add_experts",
                    what: format!(
                        "{n} cannot be routed hierarchically: the global accent posterior comes \
                         from the encoder's output"
                    ),
                });
            }
        }
        for l in &mut self.layers {
            l.set_train_base(false);
            if names.iter().any(|n| n == l.name()) {
                l.add_experts(cfg, rng)?;
            }
        }
        Ok(())
    }

    /// Trains every base weight (full fine-tuning) or freezes them all.
    pub fn set_train_base(&mut self, train: bool) {
        for l in &mut self.layers {
            l.set_train_base(train);
        }
    }

    /// Whether any layer routes hierarchically (and so needs the global router).
    pub fn is_hierarchical(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.config().is_some_and(|c| c.hierarchy.is_some()))
    }

    /// Multi-head attention of block `block` (`encoder.0`, `decoder.1`, …) over `x` `[B, L, d]` with
    /// an additive f32 `mask` `[L, L]` (0 or −∞) when given.
    fn attention(
        &self,
        block: &str,
        x: &Tensor,
        mask: Option<&Tensor>,
        ctx: &mut Ctx,
        routing: &mut Vec<(String, Routed)>,
    ) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let h = self.cfg.heads;
        let dh = d / h;
        let mut proj = |p: &str, ctx: &mut Ctx| -> Result<Tensor> {
            let name = format!("{block}.{p}");
            let layer = self.layer(&name)?;
            let y = layer.forward_ctx(x, ctx)?;
            push(routing, &name, layer.last_routing());
            Ok(y.reshape((b, l, h, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let q = proj("q", ctx)?;
        let k = proj("k", ctx)?;
        let v = proj("v", ctx)?;
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?
            .to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let att = softmax(&scores, D::Minus1)?
            .to_dtype(x.dtype())?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, d))?;
        let name = format!("{block}.o");
        let layer = self.layer(&name)?;
        let y = layer.forward_ctx(&att, ctx)?;
        push(routing, &name, layer.last_routing());
        Ok(y)
    }

    /// One pre-norm transformer block: attention, then the feed-forward layer, both residual.
    fn block(
        &self,
        block: &str,
        x: &Tensor,
        mask: Option<&Tensor>,
        ctx: &mut Ctx,
        routing: &mut Vec<(String, Routed)>,
    ) -> Result<Tensor> {
        let x = (x + self.attention(block, &rms_norm(x)?, mask, ctx, routing)?)?;
        let up = format!("{block}.up");
        let layer = self.layer(&up)?;
        let f = layer.forward_ctx(&rms_norm(&x)?, ctx)?;
        push(routing, &up, layer.last_routing());
        let down = format!("{block}.down");
        let layer = self.layer(&down)?;
        let y = layer.forward_ctx(&f.gelu()?, ctx)?;
        push(routing, &down, layer.last_routing());
        Ok((x + y)?)
    }

    fn positions(&self, len: usize) -> Result<Tensor> {
        if len > self.cfg.max_len {
            return Err(Error::InvalidDim {
                what: "sequence length (encoder positions or tokens)",
                value: len,
                reason: "longer than the model's max_len",
            });
        }
        Ok(self.pos.narrow(0, 0, len)?.to_dtype(self.dtype())?)
    }

    /// The encoder's output `[B, S, d]` for features `[B, F, d_feat]` (`F` a multiple of 4).
    pub fn encode(
        &self,
        features: &Tensor,
        ctx: &mut Ctx,
        routing: &mut Vec<(String, Routed)>,
    ) -> Result<Tensor> {
        let (_, f, d_feat) = features.dims3()?;
        crate::error::check_len("features last dimension (d_feat)", self.cfg.d_feat, d_feat)?;
        if f == 0 || f % 4 != 0 {
            return Err(Error::InvalidDim {
                what: "feature frames",
                value: f,
                reason: "must be a positive multiple of 4 (the encoder subsamples by 4)",
            });
        }
        let x = features.to_dtype(self.dtype())?;
        let mut run = |name: &str, x: &Tensor, ctx: &mut Ctx| -> Result<Tensor> {
            let layer = self.layer(name)?;
            let y = layer.forward_ctx(x, ctx)?;
            push(routing, name, layer.last_routing());
            Ok(y)
        };
        let h = run("encoder.sub.0", &stack2(&x)?, ctx)?.gelu()?;
        let h = run("encoder.sub.1", &stack2(&h)?, ctx)?.gelu()?;
        let mut h = h.broadcast_add(&self.positions(f / 4)?)?;
        for i in 0..self.cfg.enc_layers {
            h = self.block(&format!("encoder.{i}"), &h, None, ctx, routing)?;
        }
        rms_norm(&h)
    }

    /// The global router's logits `[B, E]` (f32) over the mean encoder state; the encoder output is
    /// detached, so training it as a classifier leaves the encoder alone.
    pub fn global_logits(&self, enc: &Tensor) -> Result<Tensor> {
        let pooled = enc.detach().mean(1)?;
        let z = self
            .layer("global_router")?
            .forward_ctx(&pooled, &mut Ctx::default())?;
        Ok(z.to_dtype(DType::F32)?)
    }

    /// The encoded speech: encoder, global posterior (hierarchical models) and projector.
    pub fn prefix(
        &self,
        features: &Tensor,
        mut rng: Option<&mut Rng>,
        routing: &mut Vec<(String, Routed)>,
    ) -> Result<SpeechPrefix> {
        let mut ctx = Ctx {
            rng: rng.as_deref_mut(),
            ..Default::default()
        };
        let enc = self.encode(features, &mut ctx, routing)?;
        let global = if self.is_hierarchical() {
            Some(candle_nn::ops::softmax(
                &self.global_logits(&enc)?,
                D::Minus1,
            )?)
        } else {
            None
        };
        let (b, s, _) = enc.dims3()?;
        let g = global.as_ref().map(|g| per_token(g, b, s)).transpose()?;
        let mut ctx = Ctx {
            rng,
            global: g.as_ref(),
            ..Default::default()
        };
        let mut run = |name: &str, x: &Tensor, ctx: &mut Ctx| -> Result<Tensor> {
            let layer = self.layer(name)?;
            let y = layer.forward_ctx(x, ctx)?;
            push(routing, name, layer.last_routing());
            Ok(y)
        };
        let h = run("projector.0", &enc, &mut ctx)?.gelu()?;
        let prefix = run("projector.1", &h, &mut ctx)?;
        Ok(SpeechPrefix {
            prefix,
            enc,
            global,
        })
    }

    /// The decoder over a speech prefix and input tokens `[B, L]` (u32): logits `[B, L, V]` (f32)
    /// for the token after each input token.
    pub fn decode(
        &self,
        speech: &SpeechPrefix,
        inputs: &Tensor,
        rng: Option<&mut Rng>,
        routing: &mut Vec<(String, Routed)>,
    ) -> Result<Tensor> {
        let (b, s, _) = speech.prefix.dims3()?;
        let (bi, l) = inputs.dims2()?;
        crate::error::check_len("input token rows (the batch)", b, bi)?;
        let ids: Vec<u32> = inputs.flatten_all()?.to_vec1()?;
        let v = self.cfg.vocab;
        let mut onehot = vec![0.0f32; b * l * v];
        for (i, &t) in ids.iter().enumerate() {
            if t as usize >= v {
                return Err(Error::InvalidDim {
                    what: "input token",
                    value: t as usize,
                    reason: "must be below the vocabulary size",
                });
            }
            onehot[i * v + t as usize] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, (b, l, v), &self.device)?.to_dtype(self.dtype())?;
        let emb = self
            .layer("embed")?
            .forward_ctx(&onehot, &mut Ctx::default())?
            .broadcast_add(&self.positions(l)?)?;
        let mut h = Tensor::cat(&[&speech.prefix, &emb], 1)?;
        // Prefix-causal mask over S + L positions: speech sees speech; a token sees the speech and
        // the tokens up to itself.
        let n = s + l;
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                let (q, k) = (i / n, i % n);
                if k < s || (q >= s && k <= q) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), &self.device)?;
        let g = speech
            .global
            .as_ref()
            .map(|g| per_token(g, b, n))
            .transpose()?;
        let mut ctx = Ctx {
            rng,
            global: g.as_ref(),
            ..Default::default()
        };
        for i in 0..self.cfg.dec_layers {
            h = self.block(&format!("decoder.{i}"), &h, Some(&mask), &mut ctx, routing)?;
        }
        let h = rms_norm(&h.narrow(1, s, l)?)?;
        let mut ctx = Ctx::default();
        Ok(self
            .layer("head")?
            .forward_ctx(&h, &mut ctx)?
            .to_dtype(DType::F32)?)
    }

    /// Teacher-forced logits `[B, L, V]` (f32) for a batch; `rng` turns on training mode (dropout).
    pub fn forward(&self, batch: &AsrBatch, mut rng: Option<&mut Rng>) -> Result<LlmAsrOutput> {
        let mut routing = Vec::new();
        let speech = self.prefix(&batch.features, rng.as_deref_mut(), &mut routing)?;
        let logits = self.decode(&speech, &batch.inputs, rng, &mut routing)?;
        Ok(LlmAsrOutput {
            logits,
            global: speech.global,
            routing,
        })
    }

    /// The mean cross-entropy of the targets under teacher forcing, over the real (unmasked) tokens.
    pub fn loss(&self, batch: &AsrBatch, rng: Option<&mut Rng>) -> Result<Tensor> {
        let out = self.forward(batch, rng)?;
        masked_cross_entropy(&out.logits, &batch.targets, &batch.mask)
    }

    /// Greedy decoding of a whole batch at once: from `bos`, the most probable next token of every
    /// utterance at each step, until every utterance has written `eos` or `max_len` tokens. Returns
    /// each utterance's tokens before its `eos`.
    pub fn greedy(
        &self,
        features: &Tensor,
        bos: u32,
        eos: u32,
        max_len: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let speech = self.prefix(features, None, &mut Vec::new())?;
        let b = speech.prefix.dims3()?.0;
        let mut seqs: Vec<Vec<u32>> = vec![vec![bos]; b];
        let mut done = vec![false; b];
        for _ in 0..max_len {
            let l = seqs[0].len();
            let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
            let inputs = Tensor::from_vec(flat, (b, l), &self.device)?;
            let logits = self.decode(&speech, &inputs, None, &mut Vec::new())?;
            let next: Vec<u32> = logits
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
            .map(|s| s[1..].iter().copied().take_while(|&t| t != eos).collect())
            .collect())
    }

    /// The log-probabilities `[V]` of the token after `tokens` (which start with the start token)
    /// for one utterance's encoded speech (`B = 1`), the step function of
    /// [`crate::speech::decode::beam_search`].
    pub fn next_log_probs(&self, speech: &SpeechPrefix, tokens: &[u32]) -> Result<Vec<f32>> {
        let l = tokens.len();
        if l == 0 {
            return Err(Error::InvalidDim {
                what: "decoder prefix tokens",
                value: 0,
                reason: "must hold at least the start token",
            });
        }
        let inputs = Tensor::from_vec(tokens.to_vec(), (1, l), &self.device)?;
        let logits = self.decode(speech, &inputs, None, &mut Vec::new())?;
        let last = logits.narrow(1, l - 1, 1)?.flatten_all()?;
        Ok(candle_nn::ops::log_softmax(&last, D::Minus1)?.to_vec1()?)
    }

    /// [`LlmAsr::next_log_probs`] for several token prefixes of the same length after one
    /// utterance's encoded speech (`B = 1`), run as one batch: one `[V]` row per prefix (the step
    /// function of [`crate::speech::decode::beam_search_batch`]).
    pub fn next_log_probs_batch(
        &self,
        speech: &SpeechPrefix,
        prefixes: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        let n = prefixes.len();
        let l = prefixes.first().map_or(0, Vec::len);
        if n == 0 || l == 0 {
            return Err(Error::InvalidDim {
                what: "decoder prefixes (each at least the start token)",
                value: n.min(l),
                reason: "need at least one prefix of at least one token",
            });
        }
        if let Some(p) = prefixes.iter().find(|p| p.len() != l) {
            return Err(Error::len_mismatch(
                "prefix length (all equal in a batch)",
                l,
                p.len(),
            ));
        }
        crate::error::check_len(
            "utterances of the encoded speech",
            1,
            speech.prefix.dims3()?.0,
        )?;
        let rep = |t: &Tensor| -> Result<Tensor> {
            let (_, s, d) = t.dims3()?;
            Ok(t.broadcast_as((n, s, d))?.contiguous()?)
        };
        let many = SpeechPrefix {
            prefix: rep(&speech.prefix)?,
            enc: rep(&speech.enc)?,
            global: speech
                .global
                .as_ref()
                .map(|g| -> Result<Tensor> {
                    let e = g.dims2()?.1;
                    Ok(g.broadcast_as((n, e))?.contiguous()?)
                })
                .transpose()?,
        };
        let flat: Vec<u32> = prefixes.iter().flatten().copied().collect();
        let inputs = Tensor::from_vec(flat, (n, l), &self.device)?;
        let logits = self.decode(&many, &inputs, None, &mut Vec::new())?;
        let last = logits.narrow(1, l - 1, 1)?.squeeze(1)?;
        Ok(candle_nn::ops::log_softmax(&last, D::Minus1)?.to_vec2()?)
    }

    /// Every trainable parameter with its name; the global router is left out unless
    /// `with_global_router`.
    pub fn trainable_vars(&self, with_global_router: bool) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .filter(|l| with_global_router || l.name() != "global_router")
            .flat_map(|l| l.trainable_vars())
            .collect()
    }

    /// The number of parameters full fine-tuning trains (every layer but the global router).
    pub fn num_base_params(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.name() != "global_router")
            .map(|l| {
                let (i, o) = l.dims();
                i * o + l.bias().map_or(0, |b| b.elem_count())
            })
            .sum()
    }

    /// The bytes of every base weight and bias (the global router's included).
    pub fn base_bytes(&self) -> usize {
        self.layers.iter().map(MoleLinear::base_bytes).sum()
    }

    /// A deep copy of the base weights (fresh trainable parameters with the same values; experts are
    /// not copied), so several fine-tuning runs can start from one pretrained model.
    pub fn deep_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut c = l.base_copy()?;
                c.set_train_base(true);
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LlmAsr {
            cfg: self.cfg,
            layers,
            pos: self.pos.clone(),
            device: self.device.clone(),
        })
    }
}

/// `g` `[B, E]` repeated for each of `n` positions: `[B·n, E]`.
fn per_token(g: &Tensor, b: usize, n: usize) -> Result<Tensor> {
    let e = g.dims2()?.1;
    Ok(g.unsqueeze(1)?
        .broadcast_as((b, n, e))?
        .reshape((b * n, e))?)
}

/// `Σ mask·(−log softmax(logits)[target]) / Σ mask` for logits `[B, L, V]`, targets `[B, L]` (u32)
/// and mask `[B, L]` (f32).
pub fn masked_cross_entropy(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let v = logits.dims3()?.2;
    let lp = candle_nn::ops::log_softmax(&logits.reshape(((), v))?, D::Minus1)?;
    let picked = lp
        .gather(&targets.flatten_all()?.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let m = mask.flatten_all()?;
    let n = m.sum_all()?.to_scalar::<f32>()?.max(1.0);
    Ok((picked.mul(&m)?.sum_all()?.neg()? / f64::from(n))?)
}
