//! `MoleLinear`: a linear layer with a frozen (optionally quantised) base and a mixture of LoRA
//! experts with a router, built on the candle ops of [`crate::candle::ops`].
//!
//! ```text
//! y_t = x_t·W0ᵀ + b  +  s·Σ_e w_te·(x̃_t·A_eᵀ)·B_eᵀ          s = alpha / r, x̃ = dropout(x)
//! l_t = softmax((x_t·W_gᵀ + b_g) / temperature)              the layer's local router
//! p_t = l_t, or combined with the utterance's global posterior g (HDMoLE):
//!       λ·g + (1 − λ)·l_t  |  g ⊙ l_t / Σ(g ⊙ l_t)
//! w_t = gate(p_t): top-k | threshold τ (fixed, σ(θ)/E learned, or σ(w_τ·x_t + b_τ)/E) | dense
//! ```
//!
//! With [`GateMode::Single`] there is one expert and no router (`w = 1`): a plain LoRA layer. A
//! `MoleLinear` without experts is a plain linear layer; models build every linear layer as one, so
//! any named set of them can receive experts.
//!
//! Parameters are candle [`Var`]s. The base is frozen unless [`MoleLinear::set_train_base`] is called
//! (full fine-tuning); a quantised base is always frozen. [`MoleLinear::trainable_vars`] lists what an
//! optimiser should update.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::candle::ops::{self, QuantWeight};
use crate::cpu;
use crate::error::{Error, Result};
use crate::model::weights::LoraPair;
use crate::testing::Rng;

/// How the router's probabilities become the weights of the experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GateMode {
    /// One expert applied to every token with weight 1, no router: plain LoRA (`E` must be 1).
    Single,
    /// The `k` most probable experts, renormalised to sum 1 when `renormalize`.
    TopK { k: usize, renormalize: bool },
    /// HDMoLE's dynamic threshold.
    Threshold(ThresholdMode),
    /// Every expert, weighted by its probability (soft routing).
    Dense,
    /// SAML: the experts mixed in weight space, `Ā = Σ_e p_e·A_e`, `B̄ = Σ_e p_e·B_e`, with one
    /// `p` per sequence given by the caller ([`Ctx::seq_probs`]); the layer has no router of its own.
    /// The input must be `[S, L, d_in]`.
    WeightSpace,
}

/// Where the threshold `τ` of [`GateMode::Threshold`] comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdMode {
    /// A constant `τ`.
    Fixed(f32),
    /// `τ = σ(θ)/E` with a learned per-layer `θ`, starting at `init_theta`.
    Learned { init_theta: f32 },
    /// AdaMoLE's `τ_t = σ(w_τ·x_t + b_τ)/E`, learned, `w_τ` starting at 0 and `b_τ` at `init_bias`.
    InputDependent { init_bias: f32 },
}

/// How a layer's local probabilities combine with the global (utterance) posterior.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Combine {
    /// `p = λ·g + (1 − λ)·l`; with `learned`, `λ = σ(φ)` is a parameter starting at `lambda`.
    Mix { lambda: f32, learned: bool },
    /// `p = g ⊙ l / Σ(g ⊙ l)`.
    Product,
}

/// The experts and router of a [`MoleLinear`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoleConfig {
    /// `E`.
    pub num_experts: usize,
    /// `r` (1..=256).
    pub rank: usize,
    /// `alpha`; the scale is `alpha / r`.
    pub alpha: f32,
    /// Dropout probability on the experts' input (training only).
    pub dropout: f32,
    /// The gate.
    pub gate: GateMode,
    /// Softmax temperature of the local router.
    pub temperature: f32,
    /// Combination with a global posterior (HDMoLE); `None`: the local router alone.
    pub hierarchy: Option<Combine>,
}

impl MoleConfig {
    /// A plain LoRA adapter (`E = 1`, [`GateMode::Single`]).
    pub fn lora(rank: usize, alpha: f32) -> Self {
        MoleConfig {
            num_experts: 1,
            rank,
            alpha,
            dropout: 0.0,
            gate: GateMode::Single,
            temperature: 1.0,
            hierarchy: None,
        }
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    fn validate(&self) -> Result<()> {
        crate::LoraShape::new(self.num_experts, self.rank, 1, 1)?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidParameter {
                what: "dropout",
                value: self.dropout,
                reason: "must be in [0, 1)",
            });
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidParameter {
                what: "temperature",
                value: self.temperature,
                reason: "must be positive and finite",
            });
        }
        if !self.alpha.is_finite() {
            return Err(Error::InvalidParameter {
                what: "alpha",
                value: self.alpha,
                reason: "must be finite",
            });
        }
        match self.gate {
            GateMode::Single if self.num_experts != 1 => Err(Error::Unsupported {
                op: "MoleLinear",
                what: format!(
                    "GateMode::Single with {} experts (a single adapter has E = 1)",
                    self.num_experts
                ),
            }),
            GateMode::TopK { k, .. } => cpu::gating::check_k(k, self.num_experts),
            _ => Ok(()),
        }?;
        if let Some(Combine::Mix { lambda, .. }) = self.hierarchy {
            if !(0.0..=1.0).contains(&lambda) {
                return Err(Error::InvalidParameter {
                    what: "lambda",
                    value: lambda,
                    reason: "must be in [0, 1]",
                });
            }
        }
        Ok(())
    }

    /// A short description, as written into expert files and shown by `molora inspect`.
    pub fn describe(&self) -> String {
        let gate = match self.gate {
            GateMode::Single => "single".to_string(),
            GateMode::TopK { k, renormalize } => {
                format!("top-{k}{}", if renormalize { " renormalised" } else { "" })
            }
            GateMode::Threshold(ThresholdMode::Fixed(t)) => format!("threshold(fixed {t})"),
            GateMode::Threshold(ThresholdMode::Learned { .. }) => "threshold(learned)".into(),
            GateMode::Threshold(ThresholdMode::InputDependent { .. }) => {
                "threshold(input-dependent)".into()
            }
            GateMode::Dense => "dense".into(),
            GateMode::WeightSpace => "weight-space (per sequence)".into(),
        };
        match self.hierarchy {
            None => gate,
            Some(Combine::Mix { lambda, learned }) => format!(
                "hierarchical(mix λ={lambda}{}) + {gate}",
                if learned { " learned" } else { "" }
            ),
            Some(Combine::Product) => format!("hierarchical(product) + {gate}"),
        }
    }
}

/// What a forward pass needs besides `x`.
#[derive(Default)]
pub struct Ctx<'a> {
    /// The global posterior per token, `[T, E]` (HDMoLE); required by layers with a hierarchy.
    pub global: Option<&'a Tensor>,
    /// Training mode: the generator for dropout. `None`: inference (no dropout).
    pub rng: Option<&'a mut Rng>,
    /// One mixing vector per sequence, `[S, E]`, for [`GateMode::WeightSpace`] layers.
    pub seq_probs: Option<&'a Tensor>,
}

/// The routing a forward pass used, for balance losses and routing tables.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The probabilities the gate saw, f32 `[T, E]`.
    pub probs: Tensor,
    /// The expert weights, f32 `[T, E]` (zero for unused experts).
    pub weights: Tensor,
}

#[derive(Debug, Clone)]
struct Experts {
    cfg: MoleConfig,
    a: Var,
    b: Var,
    router_w: Option<Var>,
    router_b: Option<Var>,
    theta: Option<Var>,
    tau_w: Option<Var>,
    tau_b: Option<Var>,
    lambda_logit: Option<Var>,
}

/// A linear layer `[d_in] → [d_out]` with optional LoRA experts; see the module docs.
#[derive(Debug, Clone)]
pub struct MoleLinear {
    name: String,
    d_in: usize,
    d_out: usize,
    weight: Var,
    bias: Option<Var>,
    quant: Option<Arc<QuantWeight>>,
    train_base: bool,
    experts: Option<Experts>,
}

/// Uniform values in `[-bound, bound)` as a tensor.
fn uniform(rng: &mut Rng, dims: &[usize], bound: f32, device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * bound)
        .collect();
    Ok(Tensor::from_vec(v, dims, device)?)
}

fn var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t)?)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn logit(p: f32) -> f32 {
    (p / (1.0 - p)).ln()
}

impl MoleLinear {
    /// A linear layer with PyTorch's default initialisation (`U(−1/√d_in, 1/√d_in)` for weight and
    /// bias), f32, without experts.
    pub fn new(
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        for (what, v) in [("d_in", d_in), ("d_out", d_out)] {
            if v == 0 {
                return Err(Error::InvalidDim {
                    what,
                    value: 0,
                    reason: "a linear layer needs at least one input and one output",
                });
            }
        }
        let bound = 1.0 / (d_in as f32).sqrt();
        let weight = var(uniform(rng, &[d_out, d_in], bound, device)?)?;
        let bias = if bias {
            Some(var(uniform(rng, &[d_out], bound, device)?)?)
        } else {
            None
        };
        Ok(MoleLinear {
            name: name.to_string(),
            d_in,
            d_out,
            weight,
            bias,
            quant: None,
            train_base: true,
            experts: None,
        })
    }

    /// A linear layer from a given weight `[d_out, d_in]` and optional bias `[d_out]`.
    pub fn from_weights(name: &str, weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (d_out, d_in) = weight.dims2()?;
        if let Some(b) = bias {
            crate::error::check_len("bias [d_out]", d_out, b.elem_count())?;
        }
        Ok(MoleLinear {
            name: name.to_string(),
            d_in,
            d_out,
            weight: var(weight.to_dtype(DType::F32)?)?,
            bias: bias
                .map(|b| var(b.to_dtype(DType::F32)?.flatten_all()?))
                .transpose()?,
            quant: None,
            train_base: true,
            experts: None,
        })
    }

    /// A copy of the base alone (fresh parameters with the same values, the same quantised weight,
    /// no experts, frozen), so several adaptations can start from one model.
    pub fn base_copy(&self) -> Result<Self> {
        Ok(MoleLinear {
            name: self.name.clone(),
            d_in: self.d_in,
            d_out: self.d_out,
            weight: var(self.weight.as_tensor().copy()?)?,
            bias: self
                .bias
                .as_ref()
                .map(|b| var(b.as_tensor().copy()?))
                .transpose()?,
            quant: self.quant.clone(),
            train_base: false,
            experts: None,
        })
    }

    /// The quantisation format of the base, if it is quantised.
    pub fn quant_format(&self) -> Option<QuantFormat> {
        self.quant.as_ref().map(|q| match **q {
            QuantWeight::Nf4(_) => QuantFormat::Nf4,
            QuantWeight::Int8(_) => QuantFormat::Int8,
        })
    }

    /// The layer's name (the prefix of its keys in weight files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    /// The base weight `[d_out, d_in]` (the dequantised one for a quantised base).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => Ok(Tensor::from_vec(
                q.dequantize(),
                (self.d_out, self.d_in),
                self.weight.device(),
            )?),
            None => Ok(self.weight.as_tensor().clone()),
        }
    }

    /// The base bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(|b| b.as_tensor())
    }

    /// Whether the base weight is trained (full fine-tuning) or frozen.
    pub fn set_train_base(&mut self, train: bool) {
        self.train_base = train;
    }

    /// Quantises the base weight to NF4 (block 64) or int8 per channel with the crate's CPU
    /// quantisers, and freezes it. The bias stays in f32.
    pub fn quantize(&mut self, format: QuantFormat) -> Result<()> {
        let w: Vec<f32> = self.weight.as_tensor().flatten_all()?.to_vec1()?;
        let q = match format {
            QuantFormat::Nf4 => QuantWeight::Nf4(cpu::quantize_nf4(&w, self.d_out, self.d_in)?),
            QuantFormat::Int8 => QuantWeight::Int8(cpu::quantize_int8(&w, self.d_out, self.d_in)?),
        };
        self.quant = Some(Arc::new(q));
        self.train_base = false;
        Ok(())
    }

    /// Bytes of the base: the packed weight and scales when quantised, `4·d_out·d_in` otherwise,
    /// plus the bias.
    pub fn base_bytes(&self) -> usize {
        let w = match &self.quant {
            Some(q) => q.bytes(),
            None => 4 * self.d_out * self.d_in,
        };
        w + self.bias.as_ref().map_or(0, |_| 4 * self.d_out)
    }

    /// Adds `E` LoRA experts and their router: `A` Kaiming-uniform (`U(−1/√d_in, 1/√d_in)`, PEFT's
    /// default), `B = 0` (so the layer's output is unchanged until trained), router weights
    /// `U(−1/√d_in, 1/√d_in)`, bias 0, the threshold and λ parameters at their configured start.
    /// Freezes the base.
    pub fn add_experts(&mut self, cfg: MoleConfig, rng: &mut Rng) -> Result<()> {
        cfg.validate()?;
        let dev = self.weight.device().clone();
        let (e, r, d_in, d_out) = (cfg.num_experts, cfg.rank, self.d_in, self.d_out);
        let bound = 1.0 / (d_in as f32).sqrt();
        let a = var(uniform(rng, &[e, r, d_in], bound, &dev)?)?;
        let b = var(Tensor::zeros((e, d_out, r), DType::F32, &dev)?)?;
        let routed = !matches!(cfg.gate, GateMode::Single | GateMode::WeightSpace);
        let router_w = if routed {
            Some(var(uniform(rng, &[e, d_in], bound, &dev)?)?)
        } else {
            None
        };
        let router_b = if routed {
            Some(var(Tensor::zeros(e, DType::F32, &dev)?)?)
        } else {
            None
        };
        let (theta, tau_w, tau_b) = match cfg.gate {
            GateMode::Threshold(ThresholdMode::Learned { init_theta }) => {
                (Some(var(Tensor::new(&[init_theta], &dev)?)?), None, None)
            }
            GateMode::Threshold(ThresholdMode::InputDependent { init_bias }) => (
                None,
                Some(var(Tensor::zeros(d_in, DType::F32, &dev)?)?),
                Some(var(Tensor::new(&[init_bias], &dev)?)?),
            ),
            _ => (None, None, None),
        };
        let lambda_logit = match cfg.hierarchy {
            Some(Combine::Mix {
                lambda,
                learned: true,
            }) => Some(var(Tensor::new(
                &[logit(lambda.clamp(1e-4, 1.0 - 1e-4))],
                &dev,
            )?)?),
            _ => None,
        };
        self.experts = Some(Experts {
            cfg,
            a,
            b,
            router_w,
            router_b,
            theta,
            tau_w,
            tau_b,
            lambda_logit,
        });
        self.train_base = false;
        Ok(())
    }

    /// The experts' configuration, if the layer has experts.
    pub fn config(&self) -> Option<&MoleConfig> {
        self.experts.as_ref().map(|e| &e.cfg)
    }

    /// The current threshold `τ` of a fixed or learned threshold gate.
    pub fn threshold(&self) -> Result<Option<f32>> {
        let Some(ex) = &self.experts else {
            return Ok(None);
        };
        match (ex.cfg.gate, &ex.theta) {
            (GateMode::Threshold(ThresholdMode::Fixed(t)), _) => Ok(Some(t)),
            (_, Some(theta)) => {
                let th: Vec<f32> = theta.as_tensor().to_vec1()?;
                Ok(Some(sigmoid(th[0]) / ex.cfg.num_experts as f32))
            }
            _ => Ok(None),
        }
    }

    /// The current `λ` of a hierarchical mix.
    pub fn lambda(&self) -> Result<Option<f32>> {
        let Some(ex) = &self.experts else {
            return Ok(None);
        };
        match (ex.cfg.hierarchy, &ex.lambda_logit) {
            (Some(Combine::Mix { .. }), Some(phi)) => {
                let v: Vec<f32> = phi.as_tensor().to_vec1()?;
                Ok(Some(sigmoid(v[0])))
            }
            (Some(Combine::Mix { lambda, .. }), None) => Ok(Some(lambda)),
            _ => Ok(None),
        }
    }

    /// Sets the experts from LoRA adapters, one per expert (e.g. PEFT adapters trained on one domain
    /// each): ranks are zero-padded to the layer's rank and each adapter's own scale is folded into
    /// its `B` (see [`crate::model::weights::stack_experts`]).
    pub fn init_experts_from(&mut self, pairs: &[&LoraPair]) -> Result<()> {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let name = self.name.clone();
        let ex = self.experts_mut()?;
        crate::error::check_len("adapters (one per expert)", ex.cfg.num_experts, pairs.len())?;
        for p in pairs {
            if p.d_in() != d_in || p.d_out() != d_out || p.rank() > ex.cfg.rank {
                return Err(Error::Weights {
                    source_name: name,
                    key: "lora_A/lora_B".into(),
                    detail: format!(
                        "adapter of rank {} for {}→{} does not fit a layer {d_in}→{d_out} of rank {}",
                        p.rank(),
                        p.d_in(),
                        p.d_out(),
                        ex.cfg.rank
                    ),
                });
            }
        }
        let (a, b) = crate::model::weights::stack_experts(pairs, ex.cfg.scale())?;
        let r_max = a.dims()[1];
        let pad = ex.cfg.rank - r_max;
        let (a, b) = if pad > 0 {
            (a.pad_with_zeros(1, 0, pad)?, b.pad_with_zeros(2, 0, pad)?)
        } else {
            (a, b)
        };
        ex.a.set(&a)?;
        ex.b.set(&b)?;
        Ok(())
    }

    /// The adapter of a single-expert layer as a [`LoraPair`] (`A` `[r, d_in]`, `B` `[d_out, r]`,
    /// its scale), e.g. to initialise one expert of a mixture from it.
    pub fn lora_pair(&self) -> Result<LoraPair> {
        let ex = self.experts.as_ref().ok_or(Error::Unsupported {
            op: "MoleLinear::lora_pair",
            what: format!("layer {} has no experts", self.name),
        })?;
        if ex.cfg.num_experts != 1 {
            return Err(Error::Unsupported {
                op: "MoleLinear::lora_pair",
                what: format!(
                    "layer {} has {} experts (a LoRA pair is one adapter)",
                    self.name, ex.cfg.num_experts
                ),
            });
        }
        Ok(LoraPair {
            a: ex.a.as_tensor().get(0)?.copy()?,
            b: ex.b.as_tensor().get(0)?.copy()?,
            scale: ex.cfg.scale(),
        })
    }

    fn experts_mut(&mut self) -> Result<&mut Experts> {
        let name = self.name.clone();
        self.experts.as_mut().ok_or(Error::Unsupported {
            op: "MoleLinear",
            what: format!("layer {name} has no experts"),
        })
    }

    /// `y = x·W0ᵀ + b (+ the experts)` for `x` `[..., d_in]`; returns `y` `[..., d_out]` and, for a
    /// layer with a router, the routing it used.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<(Tensor, Option<Routed>)> {
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(Error::Unsupported {
                op: "MoleLinear::forward",
                what: "a scalar input".into(),
            });
        };
        crate::error::check_len("x last dimension (d_in)", self.d_in, last)?;
        let t: usize = lead.iter().product();
        let x2 = x.reshape((t, self.d_in))?;
        let mut y = match &self.quant {
            Some(q) => ops::quant_linear(&x2, q)?,
            None => {
                let w = if self.train_base {
                    self.weight.as_tensor().clone()
                } else {
                    self.weight.as_tensor().detach()
                };
                x2.matmul(&w.t()?)?
            }
        };
        if let Some(b) = &self.bias {
            let b = if self.train_base {
                b.as_tensor().clone()
            } else {
                b.as_tensor().detach()
            };
            y = y.broadcast_add(&b)?;
        }
        let mut routed = None;
        if let Some(ex) = self
            .experts
            .as_ref()
            .filter(|e| e.cfg.gate == GateMode::WeightSpace)
        {
            let p = ctx.seq_probs.ok_or_else(|| Error::Unsupported {
                op: "MoleLinear::forward",
                what: format!(
                    "layer {} mixes in weight space but no per-sequence probabilities were given",
                    self.name
                ),
            })?;
            let [s, l, _] = dims[..] else {
                return Err(Error::Unsupported {
                    op: "MoleLinear::forward",
                    what: format!(
                        "layer {}: weight-space mixing needs x [S, L, d_in], got {dims:?}",
                        self.name
                    ),
                });
            };
            let xin = match ctx.rng.as_deref_mut() {
                Some(rng) if ex.cfg.dropout > 0.0 => dropout(&x2, ex.cfg.dropout, rng)?,
                _ => x2.clone(),
            };
            let delta = ops::weight_space_lora(
                &xin.reshape((s, l, self.d_in))?,
                ex.a.as_tensor(),
                ex.b.as_tensor(),
                p,
                ex.cfg.scale(),
            )?;
            y = (y + delta.reshape((t, self.d_out))?)?;
        } else if let Some(ex) = &self.experts {
            let (w, r) = self.route(ex, &x2, t, ctx)?;
            let xin = match ctx.rng.as_deref_mut() {
                Some(rng) if ex.cfg.dropout > 0.0 => dropout(&x2, ex.cfg.dropout, rng)?,
                _ => x2.clone(),
            };
            let delta =
                ops::mole_lora(&xin, ex.a.as_tensor(), ex.b.as_tensor(), &w, ex.cfg.scale())?;
            y = (y + delta)?;
            routed = r;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.d_out);
        Ok((y.reshape(out_dims)?, routed))
    }

    /// The gate weights `[T, E]` (and the routing, when there is a router).
    fn route(
        &self,
        ex: &Experts,
        x2: &Tensor,
        t: usize,
        ctx: &Ctx,
    ) -> Result<(Tensor, Option<Routed>)> {
        let e = ex.cfg.num_experts;
        let (Some(rw), Some(rb)) = (&ex.router_w, &ex.router_b) else {
            return Ok((Tensor::ones((t, 1), DType::F32, x2.device())?, None));
        };
        let xf = x2.to_dtype(DType::F32)?;
        let logits = xf
            .matmul(&rw.as_tensor().t()?)?
            .broadcast_add(rb.as_tensor())?;
        let local = candle_nn::ops::softmax(&(logits / f64::from(ex.cfg.temperature))?, D::Minus1)?;
        let probs = match ex.cfg.hierarchy {
            None => local,
            Some(combine) => {
                let g = ctx.global.ok_or_else(|| Error::Unsupported {
                    op: "MoleLinear::forward",
                    what: format!(
                        "layer {} routes hierarchically but no global posterior was given",
                        self.name
                    ),
                })?;
                crate::error::check_len("global posterior [T, E]", t * e, g.elem_count())?;
                let g = g.reshape((t, e))?.to_dtype(DType::F32)?;
                match combine {
                    Combine::Mix { lambda, .. } => match &ex.lambda_logit {
                        Some(phi) => {
                            let lam = candle_nn::ops::sigmoid(phi.as_tensor())?;
                            let one_minus = (1.0 - &lam)?;
                            (g.broadcast_mul(&lam)? + local.broadcast_mul(&one_minus)?)?
                        }
                        None => ((g * f64::from(lambda))? + (local * f64::from(1.0 - lambda))?)?,
                    },
                    Combine::Product => {
                        let q = (g * local)?;
                        q.broadcast_div(&q.sum_keepdim(1)?)?
                    }
                }
            }
        };
        let weights = match ex.cfg.gate {
            GateMode::Single | GateMode::Dense | GateMode::WeightSpace => probs.clone(),
            GateMode::TopK { k, renormalize } => ops::top_k_gate(&probs, k, renormalize)?,
            GateMode::Threshold(mode) => {
                let tau = match (mode, &ex.theta, &ex.tau_w, &ex.tau_b) {
                    (ThresholdMode::Fixed(v), _, _, _) => Tensor::full(v, t, x2.device())?,
                    (ThresholdMode::Learned { .. }, Some(theta), _, _) => {
                        (candle_nn::ops::sigmoid(theta.as_tensor())? / e as f64)?
                            .broadcast_as(t)?
                            .contiguous()?
                    }
                    (ThresholdMode::InputDependent { .. }, _, Some(tw), Some(tb)) => {
                        let z = xf
                            .matmul(&tw.as_tensor().unsqueeze(1)?)?
                            .broadcast_add(tb.as_tensor())?;
                        (candle_nn::ops::sigmoid(&z)? / e as f64)?.flatten_all()?
                    }
                    _ => {
                        return Err(Error::Unsupported {
                            op: "MoleLinear::forward",
                            what: format!("layer {}: threshold parameters missing", self.name),
                        })
                    }
                };
                ops::threshold_gate(&probs, &tau)?
            }
        };
        Ok((weights.clone(), Some(Routed { probs, weights })))
    }

    /// The parameters an optimiser should update, with their names: the base weight and bias when
    /// the base is trained, otherwise the experts, router, threshold and λ parameters.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if self.train_base && self.quant.is_none() {
            out.push((format!("{}.weight", self.name), self.weight.clone()));
            if let Some(b) = &self.bias {
                out.push((format!("{}.bias", self.name), b.clone()));
            }
        }
        out.extend(self.expert_tensors_named());
        out
    }

    /// The experts' parameters by their file keys (see [`crate::model::weights`]).
    fn expert_tensors_named(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if let Some(ex) = &self.experts {
            let n = &self.name;
            out.push((format!("{n}.lora_A"), ex.a.clone()));
            out.push((format!("{n}.lora_B"), ex.b.clone()));
            let opt = [
                ("router.weight", &ex.router_w),
                ("router.bias", &ex.router_b),
                ("threshold", &ex.theta),
                ("threshold.weight", &ex.tau_w),
                ("threshold.bias", &ex.tau_b),
                ("lambda", &ex.lambda_logit),
            ];
            for (k, v) in opt {
                if let Some(v) = v {
                    out.push((format!("{n}.{k}"), v.clone()));
                }
            }
        }
        out
    }

    /// The number of trainable parameters.
    pub fn num_trainable(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    /// Adds the experts' tensors to `tensors` under `NAME.lora_A`, `NAME.lora_B`, `NAME.router.*`,
    /// `NAME.threshold*`, `NAME.lambda`, and the layer's description to `layers` (the `"layers"`
    /// object of the file's `molora` metadata). A layer without experts adds nothing.
    pub fn save_experts(
        &self,
        tensors: &mut BTreeMap<String, Tensor>,
        layers: &mut serde_json::Map<String, serde_json::Value>,
    ) {
        let Some(ex) = &self.experts else { return };
        for (k, v) in self.expert_tensors_named() {
            tensors.insert(k, v.as_tensor().clone());
        }
        layers.insert(
            self.name.clone(),
            serde_json::json!({
                "experts": ex.cfg.num_experts,
                "rank": ex.cfg.rank,
                "d_in": self.d_in,
                "d_out": self.d_out,
                "alpha": ex.cfg.alpha,
                "routing": ex.cfg.describe(),
            }),
        );
    }

    /// Loads the experts' tensors saved by [`MoleLinear::save_experts`]; every tensor the layer has
    /// must be present with its shape.
    pub fn load_experts(&mut self, tensors: &BTreeMap<String, Tensor>, source: &str) -> Result<()> {
        for (k, v) in self.expert_tensors_named() {
            let t = tensors.get(&k).ok_or_else(|| Error::Weights {
                source_name: source.to_string(),
                key: k.clone(),
                detail: "missing".into(),
            })?;
            if t.dims() != v.as_tensor().dims() {
                return Err(Error::Weights {
                    source_name: source.to_string(),
                    key: k,
                    detail: format!("shape {:?}, expected {:?}", t.dims(), v.as_tensor().dims()),
                });
            }
            // A copy: `set` refuses a source that shares the variable's storage.
            v.set(&t.to_dtype(DType::F32)?.copy()?)?;
        }
        Ok(())
    }
}

/// The quantisation formats of [`MoleLinear::quantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 4-bit NormalFloat, one absmax per block of 64 weights.
    Nf4,
    /// int8, one scale per output channel.
    Int8,
}

/// Inverted dropout with our generator (deterministic for a seed): zero with probability `p`,
/// scale the rest by `1/(1 − p)`.
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    let keep = 1.0 - p;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if (rng.uniform() as f32) < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    let m = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * m)?)
}
