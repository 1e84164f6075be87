//! HDMoLE as a whole model (PAPERS.md): a small LLM-ASR-shaped network — a speech encoder, a
//! projector and a decoder — in which any named set of linear layers carries LoRA experts with
//! hierarchical routing: a frozen global accent classifier over the pooled encoder states gives a
//! posterior `g` per utterance, each MoLE layer's local router gives `l_t`, and the two combine
//! (`λ·g + (1 − λ)·l_t` by default) before a learned dynamic threshold picks the experts.
//!
//! ```text
//! frames [B, L, d_feat] ─ encoder.0 ─ gelu ─ encoder.1 (+res) ─► enc [B, L, d]
//!   enc ─ projector.0 ─ gelu ─ projector.1 ─► h
//!   h ─ rms ─ decoder.{q,k,v} ─ attention ─ decoder.o (+res) ─ rms ─ decoder.up ─ gelu ─ decoder.down (+res)
//!     ─ head ─► logits [B, L, V]
//! global router: mean_L(enc) ─ global_router ─ softmax ─► g [B, E]
//! ```
//!
//! Every linear layer is a [`MoleLinear`]; [`AsrModel::add_experts`] gives experts to the layers whose
//! names match the targets (`"projector"` matches `projector.0` and `projector.1`, `"decoder.q"` one
//! layer, `"all"` every layer but the head and the global router).

use candle_core::{DType, Device, Tensor, Var, D};

use crate::error::{Error, Result};
use crate::model::linear::{Ctx, MoleConfig, MoleLinear, Routed};
use crate::model::nn::{push_routing as push, rms_norm, softmax};
use crate::Rng;

/// Sizes of an [`AsrModel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsrConfig {
    /// Features per input frame.
    pub d_feat: usize,
    /// Model width.
    pub d_model: usize,
    /// Width of the decoder's feed-forward layer.
    pub d_ff: usize,
    /// Output vocabulary.
    pub vocab: usize,
    /// Classes of the global router (the accent domains), which is also the number of experts a
    /// hierarchical layer must have.
    pub num_domains: usize,
}

/// The names of the model's linear layers, in order (the global router and head last).
pub const LAYER_NAMES: [&str; 12] = [
    "encoder.0",
    "encoder.1",
    "projector.0",
    "projector.1",
    "decoder.q",
    "decoder.k",
    "decoder.v",
    "decoder.o",
    "decoder.up",
    "decoder.down",
    "head",
    "global_router",
];

/// An LLM-ASR-shaped model whose linear layers are [`MoleLinear`]s; see the module docs.
#[derive(Debug, Clone)]
pub struct AsrModel {
    cfg: AsrConfig,
    layers: Vec<MoleLinear>,
    device: Device,
}

/// What [`AsrModel::forward`] returns.
pub struct AsrOutput {
    /// `[B, L, V]`.
    pub logits: Tensor,
    /// The global posterior `[B, E]` (when the model routes hierarchically).
    pub global: Option<Tensor>,
    /// The routing of every routed layer, by layer name.
    pub routing: Vec<(String, Routed)>,
}

impl AsrModel {
    /// A model with random weights (PyTorch's default linear initialisation, from `rng`).
    pub fn new(cfg: AsrConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        let d = cfg.d_model;
        let dims = [
            (cfg.d_feat, d),
            (d, d),
            (d, d),
            (d, d),
            (d, d),
            (d, d),
            (d, d),
            (d, d),
            (d, cfg.d_ff),
            (cfg.d_ff, d),
            (d, cfg.vocab),
            (d, cfg.num_domains),
        ];
        let layers = LAYER_NAMES
            .iter()
            .zip(dims)
            .map(|(name, (i, o))| MoleLinear::new(name, i, o, true, rng, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(AsrModel {
            cfg,
            layers,
            device: device.clone(),
        })
    }

    /// The dtype the model runs in (its layers'); inputs are converted to it, logits come out in
    /// f32.
    pub fn dtype(&self) -> DType {
        self.layers.first().map_or(DType::F32, MoleLinear::dtype)
    }

    /// Converts every layer to `dtype` (f32, f16 or bf16; see [`MoleLinear::to_dtype`]). Build the
    /// optimiser after this.
    pub fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        for l in &mut self.layers {
            l.to_dtype(dtype)?;
        }
        Ok(())
    }

    /// The sizes.
    pub fn config(&self) -> &AsrConfig {
        &self.cfg
    }

    /// The layers, in [`LAYER_NAMES`] order.
    pub fn layers(&self) -> &[MoleLinear] {
        &self.layers
    }

    fn layer(&self, name: &str) -> &MoleLinear {
        // LAYER_NAMES and `layers` are built together, so every name is present.
        let i = LAYER_NAMES.iter().position(|n| *n == name).unwrap_or(0);
        &self.layers[i]
    }

    /// The names of the layers `targets` selects: exact names, prefixes up to a dot
    /// (`"projector"`, `"decoder"`), or `"all"` (every layer but the head and the global router).
    pub fn resolve_targets(targets: &[String]) -> Result<Vec<&'static str>> {
        let mut out = Vec::new();
        for t in targets {
            let matched: Vec<&'static str> = LAYER_NAMES[..10]
                .iter()
                .copied()
                .filter(|n| t == "all" || *n == t || n.starts_with(&format!("{t}.")))
                .collect();
            if matched.is_empty() {
                return Err(Error::Unsupported {
                    op: "AsrModel targets",
                    what: format!(
                        "no layer matches {t:?} (layers: {}, or \"all\")",
                        LAYER_NAMES[..10].join(", ")
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

    /// Gives experts configured by `cfg` to the layers `targets` selects (see
    /// [`AsrModel::resolve_targets`]) and freezes every base weight.
    pub fn add_experts(
        &mut self,
        targets: &[String],
        cfg: MoleConfig,
        rng: &mut Rng,
    ) -> Result<()> {
        if cfg.hierarchy.is_some() && cfg.num_experts != self.cfg.num_domains {
            return Err(Error::Unsupported {
                op: "AsrModel::add_experts",
                what: format!(
                    "hierarchical routing with {} experts over a global router of {} domains",
                    cfg.num_experts, self.cfg.num_domains
                ),
            });
        }
        let names = Self::resolve_targets(targets)?;
        for l in &mut self.layers {
            l.set_train_base(false);
            if names.contains(&l.name()) {
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

    /// Mutable access to a layer by name.
    pub fn layer_mut(&mut self, name: &str) -> Result<&mut MoleLinear> {
        self.layers
            .iter_mut()
            .find(|l| l.name() == name)
            .ok_or_else(|| Error::Unsupported {
                op: "AsrModel::layer_mut",
                what: format!("no layer named {name:?}"),
            })
    }

    /// The encoder's output `[B, L, d]` in the model's dtype, for frames of any float dtype (the
    /// encoder has no experts unless targeted).
    pub fn encode(
        &self,
        frames: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<(Tensor, Vec<(String, Routed)>)> {
        let mut routing = Vec::new();
        let frames = &frames.to_dtype(self.dtype())?;
        let layer = self.layer("encoder.0");
        let h = layer.forward_ctx(frames, ctx)?;
        push(&mut routing, "encoder.0", layer.last_routing());
        let h = h.gelu()?;
        let layer = self.layer("encoder.1");
        let h2 = layer.forward_ctx(&h, ctx)?;
        push(&mut routing, "encoder.1", layer.last_routing());
        Ok(((h + h2)?, routing))
    }

    /// The global router's posterior `[B, E]` over the pooled encoder states (`softmax` of the
    /// `global_router` layer). Its gradient flows only into the global router (the encoder output is
    /// detached), so it can be trained as a classifier on a frozen encoder.
    pub fn global_posterior(&self, enc: &Tensor) -> Result<Tensor> {
        let z = self.global_logits(enc)?;
        Ok(candle_nn::ops::softmax(&z, D::Minus1)?)
    }

    /// The global router's logits `[B, E]`, f32 (for training it as a classifier).
    pub fn global_logits(&self, enc: &Tensor) -> Result<Tensor> {
        let pooled = enc.detach().mean(1)?;
        let z = self
            .layer("global_router")
            .forward_ctx(&pooled, &mut Ctx::default())?;
        Ok(z.to_dtype(DType::F32)?)
    }

    /// Logits `[B, L, V]` (f32) for frames `[B, L, d_feat]` (any float dtype, converted to the
    /// model's); `rng` turns on training mode (dropout).
    pub fn forward(&self, frames: &Tensor, rng: Option<&mut Rng>) -> Result<AsrOutput> {
        let (b, l, _) = frames.dims3()?;
        let mut ctx = Ctx {
            global: None,
            rng,
            seq_probs: None,
        };
        let (enc, mut routing) = self.encode(frames, &mut ctx)?;
        let global = if self.is_hierarchical() {
            Some(self.global_posterior(&enc)?)
        } else {
            None
        };
        let per_token = match &global {
            Some(g) => {
                let e = g.dims()[1];
                Some(
                    g.unsqueeze(1)?
                        .broadcast_as((b, l, e))?
                        .reshape((b * l, e))?,
                )
            }
            None => None,
        };
        ctx.global = per_token.as_ref();
        let mut run = |name: &str, x: &Tensor, ctx: &mut Ctx| -> Result<Tensor> {
            let layer = self.layer(name);
            let y = layer.forward_ctx(x, ctx)?;
            push(&mut routing, name, layer.last_routing());
            Ok(y)
        };
        let h = run("projector.0", &enc, &mut ctx)?.gelu()?;
        let h = run("projector.1", &h, &mut ctx)?;
        // Decoder block: single-head self-attention, then a feed-forward layer, both pre-norm.
        let n = rms_norm(&h)?;
        let q = run("decoder.q", &n, &mut ctx)?;
        let k = run("decoder.k", &n, &mut ctx)?;
        let v = run("decoder.v", &n, &mut ctx)?;
        let scores =
            (q.matmul(&k.transpose(1, 2)?.contiguous()?)? / (self.cfg.d_model as f64).sqrt())?;
        let att = softmax(&scores, D::Minus1)?.matmul(&v)?;
        let h = (&h + run("decoder.o", &att, &mut ctx)?)?;
        let n = rms_norm(&h)?;
        let f = run("decoder.up", &n, &mut ctx)?.gelu()?;
        let h = (&h + run("decoder.down", &f, &mut ctx)?)?;
        let logits = run("head", &h, &mut ctx)?.to_dtype(DType::F32)?;
        Ok(AsrOutput {
            logits,
            global,
            routing,
        })
    }

    /// Every trainable parameter with its name (see [`MoleLinear::trainable_vars`]); the global
    /// router is left out unless `with_global_router`.
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

    /// A deep copy of the base weights (fresh parameters with the same values, trainable; experts
    /// are not copied), so several fine-tuning runs can start from one pretrained model.
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
        Ok(AsrModel {
            cfg: self.cfg,
            layers,
            device: self.device.clone(),
        })
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token predictions `[B, L]` (arg-max of the logits) as u32.
    pub fn predict(&self, frames: &Tensor) -> Result<Tensor> {
        let out = self.forward(frames, None)?;
        Ok(out.logits.argmax(D::Minus1)?.to_dtype(DType::U32)?)
    }
}
