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
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::init::ZERO;
use candle_nn::{Init, VarBuilder};

use crate::candle::ops::{self, QuantWeight, RoutedGate};
use crate::cpu;
use crate::error::{Error, Result};
use crate::model::weights::LoraPair;
use crate::LoraShape;
use crate::Rng;

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
            GateMode::TopK { k, .. } => crate::gate::check_k(k, self.num_experts),
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

    /// The configuration as JSON, as written into expert files (`"config"` of a layer's metadata)
    /// and read back by [`MoleConfig::from_json`].
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let gate = match self.gate {
            GateMode::Single => json!({"kind": "single"}),
            GateMode::TopK { k, renormalize } => {
                json!({"kind": "top_k", "k": k, "renormalize": renormalize})
            }
            GateMode::Threshold(ThresholdMode::Fixed(tau)) => {
                json!({"kind": "threshold", "mode": "fixed", "tau": tau})
            }
            GateMode::Threshold(ThresholdMode::Learned { init_theta }) => {
                json!({"kind": "threshold", "mode": "learned", "init_theta": init_theta})
            }
            GateMode::Threshold(ThresholdMode::InputDependent { init_bias }) => {
                json!({"kind": "threshold", "mode": "input_dependent", "init_bias": init_bias})
            }
            GateMode::Dense => json!({"kind": "dense"}),
            GateMode::WeightSpace => json!({"kind": "weight_space"}),
        };
        let hierarchy = match self.hierarchy {
            None => serde_json::Value::Null,
            Some(Combine::Mix { lambda, learned }) => {
                json!({"kind": "mix", "lambda": lambda, "learned": learned})
            }
            Some(Combine::Product) => json!({"kind": "product"}),
        };
        json!({
            "num_experts": self.num_experts,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "temperature": self.temperature,
            "gate": gate,
            "hierarchy": hierarchy,
        })
    }

    /// The configuration from [`MoleConfig::to_json`]'s JSON, validated. The error says which field
    /// is missing or wrong.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let num = |o: &serde_json::Value, k: &str| -> std::result::Result<f64, String> {
            o.get(k)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| format!("config: `{k}` missing or not a number"))
        };
        let uint = |o: &serde_json::Value, k: &str| -> std::result::Result<usize, String> {
            o.get(k)
                .and_then(serde_json::Value::as_u64)
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| format!("config: `{k}` missing or not a non-negative integer"))
        };
        let boolean = |o: &serde_json::Value, k: &str| -> std::result::Result<bool, String> {
            o.get(k)
                .and_then(serde_json::Value::as_bool)
                .ok_or_else(|| format!("config: `{k}` missing or not a boolean"))
        };
        let kind = |o: &serde_json::Value, what: &str| -> std::result::Result<String, String> {
            o.get("kind")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("config: {what} has no `kind`"))
        };
        let g = v.get("gate").ok_or("config: `gate` missing")?;
        let gate = match kind(g, "gate")?.as_str() {
            "single" => GateMode::Single,
            "top_k" => GateMode::TopK {
                k: uint(g, "k")?,
                renormalize: boolean(g, "renormalize")?,
            },
            "threshold" => GateMode::Threshold(match g.get("mode").and_then(|m| m.as_str()) {
                Some("fixed") => ThresholdMode::Fixed(num(g, "tau")? as f32),
                Some("learned") => ThresholdMode::Learned {
                    init_theta: num(g, "init_theta")? as f32,
                },
                Some("input_dependent") => ThresholdMode::InputDependent {
                    init_bias: num(g, "init_bias")? as f32,
                },
                other => return Err(format!("config: unknown threshold mode {other:?}")),
            }),
            "dense" => GateMode::Dense,
            "weight_space" => GateMode::WeightSpace,
            other => return Err(format!("config: unknown gate kind `{other}`")),
        };
        let hierarchy = match v.get("hierarchy") {
            None | Some(serde_json::Value::Null) => None,
            Some(h) => Some(match kind(h, "hierarchy")?.as_str() {
                "mix" => Combine::Mix {
                    lambda: num(h, "lambda")? as f32,
                    learned: boolean(h, "learned")?,
                },
                "product" => Combine::Product,
                other => return Err(format!("config: unknown hierarchy kind `{other}`")),
            }),
        };
        let cfg = MoleConfig {
            num_experts: uint(v, "num_experts")?,
            rank: uint(v, "rank")?,
            alpha: num(v, "alpha")? as f32,
            dropout: num(v, "dropout")? as f32,
            temperature: num(v, "temperature")? as f32,
            gate,
            hierarchy,
        };
        cfg.validate().map_err(|e| format!("config: {e}"))?;
        Ok(cfg)
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
    /// The gate.
    pub gate: RoutedGate,
    /// The per-token thresholds `τ` `[T]` of a threshold gate.
    pub tau: Option<Tensor>,
}

impl Routed {
    /// The expert weights as a dense f32 `[T, E]` matrix (zero for unused experts), by the crate's
    /// gate ops on the same probabilities (differentiable, e.g. for balance losses). The forward
    /// pass itself never forms this matrix: [`ops::routed_lora`] hands the sparse slots to the LoRA
    /// computation.
    pub fn weights(&self) -> Result<Tensor> {
        match (self.gate, &self.tau) {
            (RoutedGate::TopK { k, renormalize }, _) => {
                ops::top_k_gate(&self.probs, k, renormalize)
            }
            (RoutedGate::Threshold, Some(tau)) => ops::threshold_gate(&self.probs, tau),
            (RoutedGate::Threshold, None) => Err(Error::Unsupported {
                op: "Routed::weights",
                what: "a threshold gate without its thresholds".into(),
            }),
            (RoutedGate::Dense, _) => Ok(self.probs.clone()),
        }
    }
}

/// The routing of a layer's last forward pass ([`MoleLinear::last_routing`]). A clone of the layer
/// starts with a copy of it.
#[derive(Debug, Default)]
struct LastRouting(Mutex<Option<Routed>>);

impl LastRouting {
    fn get(&self) -> Option<Routed> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, r: Option<Routed>) {
        match self.0.lock() {
            Ok(mut g) => *g = r,
            Err(poisoned) => *poisoned.into_inner() = r,
        }
    }
}

impl Clone for LastRouting {
    fn clone(&self) -> Self {
        LastRouting(Mutex::new(self.get()))
    }
}

/// The generator of [`ModuleT::forward_t`]'s dropout, owned by the layer.
///
/// [`ModuleT::forward_t`]: candle_nn::ModuleT::forward_t
#[derive(Debug)]
struct DropoutRng(Mutex<Rng>);

impl Clone for DropoutRng {
    fn clone(&self) -> Self {
        let r = match self.0.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        DropoutRng(Mutex::new(r))
    }
}

/// The frozen (or fully fine-tuned) base weight `[d_out, d_in]`: dense in the layer's dtype, or
/// packed NF4/int8, in which case the layer holds nothing else of it.
#[derive(Debug, Clone)]
enum Base {
    Dense(Var),
    Quant(Arc<QuantWeight>),
}

#[derive(Debug, Clone)]
struct Experts {
    cfg: MoleConfig,
    shape: LoraShape,
    /// `A` `[E, r, d_in]` then `B` `[E, d_out, r]`, flattened: the layout the LoRA op and the
    /// kernels take, so a forward copies no expert weights.
    ab: Var,
    /// The router `W_g` `[E, d_in]` and `b_g` `[E]`, in the layer's dtype.
    router_w: Option<Var>,
    router_b: Option<Var>,
    /// Gate parameters, f32: `θ` `[1]`; `w_τ` `[d_in]` (the layer's dtype) and `b_τ` `[1]`; `φ` `[1]`.
    theta: Option<Var>,
    tau_w: Option<Var>,
    tau_b: Option<Var>,
    lambda_logit: Option<Var>,
}

impl Experts {
    /// `A` `[E, r, d_in]`, a view of the packed variable (gradients flow to it).
    fn a(&self) -> Result<Tensor> {
        let s = &self.shape;
        Ok(self
            .ab
            .as_tensor()
            .narrow(0, 0, s.a_len())?
            .reshape((s.num_experts, s.rank, s.d_in))?)
    }

    /// `B` `[E, d_out, r]`, a view of the packed variable.
    fn b(&self) -> Result<Tensor> {
        let s = &self.shape;
        Ok(self
            .ab
            .as_tensor()
            .narrow(0, s.a_len(), s.b_len())?
            .reshape((s.num_experts, s.d_out, s.rank))?)
    }

    /// The tensors of the expert file by their keys (after `NAME.`), `A` and `B` unpacked.
    fn named(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let mut out = vec![("lora_A", self.a()?), ("lora_B", self.b()?)];
        for (k, v) in self.gate_vars() {
            out.push((k, v.as_tensor().clone()));
        }
        Ok(out)
    }

    /// The router and gate variables by their keys.
    fn gate_vars(&self) -> Vec<(&'static str, &Var)> {
        [
            ("router.weight", &self.router_w),
            ("router.bias", &self.router_b),
            ("threshold", &self.theta),
            ("threshold.weight", &self.tau_w),
            ("threshold.bias", &self.tau_b),
            ("lambda", &self.lambda_logit),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect()
    }
}

/// A linear layer `[d_in] → [d_out]` with optional LoRA experts; see the module docs.
///
/// As a candle layer it implements [`Module`] (inference; [`MoleLinear::forward_t`] with `train`
/// applies the experts' dropout with the layer's own generator); layers that need a context (a hierarchy's
/// global posterior, SAML's per-sequence probabilities) take it through [`MoleLinear::forward_ctx`].
/// The routing of the last forward pass is [`MoleLinear::last_routing`].
#[derive(Debug, Clone)]
pub struct MoleLinear {
    name: String,
    d_in: usize,
    d_out: usize,
    dtype: DType,
    base: Base,
    bias: Option<Var>,
    train_base: bool,
    experts: Option<Experts>,
    last: LastRouting,
    dropout_rng: DropoutRng,
}

/// Uniform values in `[-bound, bound)` as an f32 tensor.
fn uniform(rng: &mut Rng, dims: &[usize], bound: f32, device: &Device) -> Result<Tensor> {
    let n = crate::error::checked_product("tensor", dims)?;
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

/// The dtypes a layer runs in.
fn check_float(dtype: DType, what: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::Unsupported {
            op: "MoleLinear",
            what: format!("{what} has dtype {other:?} (a layer runs in f32, f16 or bf16)"),
        }),
    }
}

/// The first value of a one-element tensor, as f32.
fn scalar(t: &Tensor) -> Result<f32> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    v.first().copied().ok_or_else(|| Error::Unsupported {
        op: "MoleLinear",
        what: "an empty scalar parameter".into(),
    })
}

/// The start of a new parameter.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// `U(−bound, bound)`.
    Uniform(f32),
    /// Every value this one.
    Const(f32),
}

/// Where [`MoleLinear`]'s experts and gate parameters come from: the crate's generator (new
/// variables on `device`), or a [`VarBuilder`] (created in its `VarMap` with the same starts, or
/// loaded from its weights).
enum ParamSource<'a> {
    Rng { rng: &'a mut Rng, device: Device },
    Vb(VarBuilder<'a>),
}

impl ParamSource<'_> {
    /// The parameter `key` (after the layer's prefix) of shape `dims` in `dtype`.
    fn param(&mut self, key: &str, dims: &[usize], start: Start, dtype: DType) -> Result<Var> {
        match self {
            ParamSource::Rng { rng, device } => {
                let t = match start {
                    Start::Uniform(bound) => uniform(rng, dims, bound, device)?,
                    Start::Const(v) => Tensor::full(v, dims, device)?,
                };
                var(t.to_dtype(dtype)?)
            }
            ParamSource::Vb(vb) => {
                let init = match start {
                    Start::Uniform(bound) => Init::Uniform {
                        lo: -f64::from(bound),
                        up: f64::from(bound),
                    },
                    Start::Const(v) => Init::Const(v.into()),
                };
                var(vb.to_dtype(dtype).get_with_hints(dims, key, init)?)
            }
        }
    }

    /// The packed experts `[A; B]` in `dtype`: `A` `U(−bound, bound)` and `B = 0` when new; from a
    /// builder, `lora_A`/`lora_B` packed once when it has them, else its `experts` variable.
    fn experts(&mut self, shape: &LoraShape, bound: f32, dtype: DType) -> Result<Var> {
        let fresh = |a: Tensor, device: &Device| -> Result<Tensor> {
            let b = Tensor::zeros(shape.b_len(), DType::F32, device)?;
            Ok(Tensor::cat(&[a, b], 0)?.to_dtype(dtype)?)
        };
        match self {
            ParamSource::Rng { rng, device } => {
                let a = uniform(rng, &[shape.a_len()], bound, device)?;
                var(fresh(a, device)?)
            }
            ParamSource::Vb(vb) => {
                let vb = vb.to_dtype(dtype);
                let (e, r, d_in, d_out) = (shape.num_experts, shape.rank, shape.d_in, shape.d_out);
                if vb.contains_tensor("lora_A") || vb.contains_tensor("lora_B") {
                    let a = vb.get((e, r, d_in), "lora_A")?;
                    let b = vb.get((e, d_out, r), "lora_B")?;
                    return var(Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?);
                }
                let created = !vb.contains_tensor("experts");
                let ab = var(vb.get_with_hints(shape.a_len() + shape.b_len(), "experts", ZERO)?)?;
                if created {
                    let a = Tensor::rand(-bound, bound, shape.a_len(), vb.device())?;
                    ab.set(&fresh(a, vb.device())?)?;
                }
                Ok(ab)
            }
        }
    }
}

impl MoleLinear {
    /// A layer from its parts; the base is trained until experts are added.
    fn assemble(name: &str, base: Base, bias: Option<Var>, dtype: DType) -> Result<Self> {
        let (d_out, d_in) = match &base {
            Base::Dense(w) => w.as_tensor().dims2()?,
            Base::Quant(q) => (q.rows(), q.cols()),
        };
        for (what, v) in [("d_in", d_in), ("d_out", d_out)] {
            if v == 0 {
                return Err(Error::InvalidDim {
                    what,
                    value: 0,
                    reason: "a linear layer needs at least one input and one output",
                });
            }
        }
        Ok(MoleLinear {
            name: name.to_string(),
            d_in,
            d_out,
            dtype,
            base,
            bias,
            train_base: true,
            experts: None,
            last: LastRouting::default(),
            dropout_rng: DropoutRng(Mutex::new(Rng::new(0x5eed ^ (d_in * 31 + d_out) as u64))),
        })
    }

    /// A linear layer with PyTorch's default initialisation (`U(−1/√d_in, 1/√d_in)` for weight and
    /// bias), f32, without experts ([`MoleLinear::to_dtype`] converts it).
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
        Self::assemble(name, Base::Dense(weight), bias, DType::F32)
    }

    /// A linear layer from a given weight `[d_out, d_in]` and optional bias `[d_out]`, in the
    /// weight's dtype (f32, f16 or bf16; the bias is converted to it).
    pub fn from_weights(name: &str, weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (d_out, _) = weight.dims2()?;
        let dtype = weight.dtype();
        check_float(dtype, "the weight")?;
        if let Some(b) = bias {
            crate::error::check_len("bias [d_out]", d_out, b.elem_count())?;
        }
        let bias = bias
            .map(|b| var(b.to_dtype(dtype)?.flatten_all()?))
            .transpose()?;
        Self::assemble(name, Base::Dense(var(weight.clone())?), bias, dtype)
    }

    /// A linear layer from a [`VarBuilder`], as `candle_nn::linear` builds one: `{prefix}.weight`
    /// `[d_out, d_in]` and, with `bias`, `{prefix}.bias` `[d_out]`, in the builder's dtype. A builder
    /// over a `VarMap` creates them (`U(−1/√d_in, 1/√d_in)`, PyTorch's default); one over a weight
    /// file loads them. The layer's name is the builder's prefix.
    pub fn from_vb(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        check_float(vb.dtype(), "the VarBuilder")?;
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = var(vb.get_with_hints((d_out, d_in), "weight", init)?)?;
        let bias = if bias {
            Some(var(vb.get_with_hints(d_out, "bias", init)?)?)
        } else {
            None
        };
        Self::assemble(&vb.prefix(), Base::Dense(weight), bias, vb.dtype())
    }

    /// A linear layer with experts from a [`VarBuilder`]: the base as [`MoleLinear::from_vb`], the
    /// experts as [`MoleLinear::add_experts_vb`].
    pub fn from_vb_with_experts(
        d_in: usize,
        d_out: usize,
        bias: bool,
        cfg: MoleConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut layer = Self::from_vb(d_in, d_out, bias, vb.clone())?;
        layer.add_experts_vb(cfg, vb)?;
        Ok(layer)
    }

    /// A layer whose experts come from a molora expert file (written by
    /// [`crate::model::weights::save_tensors`] with the layers' [`MoleLinear::save_experts`]): the
    /// file describes the layer named by the builder's prefix (its [`MoleConfig`] is in the file's
    /// metadata), so no layer needs building first; the base comes from `vb` as in
    /// [`MoleLinear::from_vb`]. Errors name the file and what is missing or does not match.
    pub fn load(path: &Path, vb: VarBuilder) -> Result<Self> {
        let source = path.display().to_string();
        let (tensors, metadata) = crate::model::weights::load_tensors(path, vb.device())?;
        let name = vb.prefix();
        let weights_err = |key: &str, detail: String| Error::Weights {
            source_name: source.clone(),
            key: key.to_string(),
            detail,
        };
        let meta = metadata
            .get(crate::model::weights::MOLORA_METADATA_KEY)
            .ok_or_else(|| {
                weights_err(
                    "(metadata)",
                    "not a molora expert file (no \"molora\" metadata)".into(),
                )
            })?;
        let meta: serde_json::Value = serde_json::from_str(meta)
            .map_err(|e| weights_err("(metadata)", format!("invalid JSON: {e}")))?;
        let layer = meta
            .get("layers")
            .and_then(|l| l.get(&name))
            .ok_or_else(|| weights_err(&name, "no such layer in the file's metadata".into()))?;
        let dim = |k: &str| {
            layer
                .get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| weights_err(&name, format!("metadata has no `{k}`")))
        };
        let (d_in, d_out) = (dim("d_in")?, dim("d_out")?);
        let cfg = layer
            .get("config")
            .ok_or_else(|| {
                weights_err(
                    &name,
                    "metadata has no `config` (a file written before layers described themselves)"
                        .into(),
                )
            })
            .and_then(|c| MoleConfig::from_json(c).map_err(|d| weights_err(&name, d)))?;
        let bias = vb.contains_tensor("bias");
        let mut out = Self::from_vb(d_in, d_out, bias, vb)?;
        let mut rng = Rng::new(0);
        out.add_experts(cfg, &mut rng)?;
        out.load_experts(&tensors, &source)?;
        Ok(out)
    }

    /// A copy of the base alone (fresh parameters with the same values, the same quantised weight,
    /// no experts, frozen), so several adaptations can start from one model.
    pub fn base_copy(&self) -> Result<Self> {
        let base = match &self.base {
            Base::Dense(w) => Base::Dense(var(w.as_tensor().copy()?)?),
            Base::Quant(q) => Base::Quant(Arc::clone(q)),
        };
        let bias = self
            .bias
            .as_ref()
            .map(|b| var(b.as_tensor().copy()?))
            .transpose()?;
        let mut out = Self::assemble(&self.name, base, bias, self.dtype)?;
        out.train_base = false;
        Ok(out)
    }

    /// The layer converted to `dtype` (f32, f16 or bf16): base, bias, experts, router and `w_τ`; the
    /// gate's scalars (`θ`, `b_τ`, `φ`) stay f32, as the gate math does. The parameters are new
    /// variables (an optimiser built before the conversion does not see them).
    pub fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        check_float(dtype, "the requested layer")?;
        if dtype == self.dtype {
            return Ok(());
        }
        let conv = |v: &Var| var(v.as_tensor().to_dtype(dtype)?);
        if let Base::Dense(w) = &self.base {
            self.base = Base::Dense(conv(w)?);
        }
        self.bias = self.bias.as_ref().map(conv).transpose()?;
        if let Some(ex) = self.experts.as_mut() {
            ex.ab = conv(&ex.ab)?;
            ex.router_w = ex.router_w.as_ref().map(conv).transpose()?;
            ex.router_b = ex.router_b.as_ref().map(conv).transpose()?;
            ex.tau_w = ex.tau_w.as_ref().map(conv).transpose()?;
        }
        self.dtype = dtype;
        Ok(())
    }

    /// The dtype the layer runs in (its input and output).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The quantisation format of the base, if it is quantised.
    pub fn quant_format(&self) -> Option<QuantFormat> {
        match &self.base {
            Base::Quant(q) => Some(match **q {
                QuantWeight::Nf4(_) => QuantFormat::Nf4,
                QuantWeight::Int8(_) => QuantFormat::Int8,
            }),
            Base::Dense(_) => None,
        }
    }

    /// The layer's name (the prefix of its keys in weight files).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    /// The base weight `[d_out, d_in]` in the layer's dtype (for a quantised base, dequantised now:
    /// the layer does not keep a dense copy).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.base {
            Base::Quant(q) => {
                Ok(
                    Tensor::from_vec(q.dequantize(), (self.d_out, self.d_in), self.device())?
                        .to_dtype(self.dtype)?,
                )
            }
            Base::Dense(w) => Ok(w.as_tensor().clone()),
        }
    }

    /// The device the layer's parameters are on.
    pub fn device(&self) -> &Device {
        match (&self.base, &self.bias) {
            (Base::Dense(w), _) => w.device(),
            (Base::Quant(_), Some(b)) => b.device(),
            (Base::Quant(_), None) => self
                .experts
                .as_ref()
                .map_or(&Device::Cpu, |e| e.ab.device()),
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
    /// quantisers, and freezes it. The dense weight is dropped: the layer then holds only the packed
    /// weight and its scales ([`MoleLinear::base_bytes`]). The bias stays in the layer's dtype.
    pub fn quantize(&mut self, format: QuantFormat) -> Result<()> {
        let w: Vec<f32> = match &self.base {
            Base::Dense(w) => w
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            Base::Quant(q) => q.dequantize(),
        };
        let q = match format {
            QuantFormat::Nf4 => QuantWeight::Nf4(cpu::quantize_nf4(&w, self.d_out, self.d_in)?),
            QuantFormat::Int8 => QuantWeight::Int8(cpu::quantize_int8(&w, self.d_out, self.d_in)?),
        };
        self.base = Base::Quant(Arc::new(q));
        self.train_base = false;
        Ok(())
    }

    /// Bytes the base holds: the packed weight and its scales when quantised, the dense weight in
    /// the layer's dtype otherwise, plus the bias.
    pub fn base_bytes(&self) -> usize {
        let w = match &self.base {
            Base::Quant(q) => q.bytes(),
            Base::Dense(v) => v.as_tensor().elem_count() * v.dtype().size_in_bytes(),
        };
        w + self.bias.as_ref().map_or(0, |b| {
            b.as_tensor().elem_count() * b.dtype().size_in_bytes()
        })
    }

    /// Bytes of every tensor the layer holds: [`MoleLinear::base_bytes`] plus the experts, router
    /// and gate parameters.
    pub fn bytes(&self) -> usize {
        let ex = self.experts.as_ref().map_or(0, |ex| {
            std::iter::once(&ex.ab)
                .chain(ex.gate_vars().into_iter().map(|(_, v)| v))
                .map(|v| v.as_tensor().elem_count() * v.dtype().size_in_bytes())
                .sum()
        });
        self.base_bytes() + ex
    }

    fn check_new_experts(&self, cfg: &MoleConfig) -> Result<LoraShape> {
        cfg.validate()?;
        if self.experts.is_some() {
            return Err(Error::Unsupported {
                op: "MoleLinear::add_experts",
                what: format!("layer {} already has experts", self.name),
            });
        }
        crate::LoraShape::new(cfg.num_experts, cfg.rank, self.d_in, self.d_out)
    }

    /// Adds `E` LoRA experts and their router: `A` Kaiming-uniform (`U(−1/√d_in, 1/√d_in)`, PEFT's
    /// default), `B = 0` (so the layer's output is unchanged until trained), router weights
    /// `U(−1/√d_in, 1/√d_in)`, bias 0, the threshold and λ parameters at their configured start. In
    /// the layer's dtype; freezes the base.
    pub fn add_experts(&mut self, cfg: MoleConfig, rng: &mut Rng) -> Result<()> {
        let device = self.device().clone();
        self.install_experts(cfg, ParamSource::Rng { rng, device })
    }

    /// Adds experts from a [`VarBuilder`] under the layer's keys: `lora_A` `[E, r, d_in]` and
    /// `lora_B` `[E, d_out, r]` when the builder has them (a molora expert file, stacked PEFT
    /// adapters), loaded and packed once; otherwise the packed `experts` variable, which a
    /// `VarMap` builder creates (`A` `U(−1/√d_in, 1/√d_in)`, `B = 0`) so that `varmap.all_vars()`
    /// trains it. Then `router.weight`/`router.bias`, `threshold*` and `lambda` as the gate needs
    /// them (gate scalars in f32), initialised as [`MoleLinear::add_experts`] does. Freezes the base.
    pub fn add_experts_vb(&mut self, cfg: MoleConfig, vb: VarBuilder) -> Result<()> {
        self.install_experts(cfg, ParamSource::Vb(vb))
    }

    /// The experts, router and gate parameters `cfg` needs, each from `src`, in the order the
    /// generator draws them (`A`, then the router weights).
    fn install_experts(&mut self, cfg: MoleConfig, mut src: ParamSource<'_>) -> Result<()> {
        let shape = self.check_new_experts(&cfg)?;
        let (e, d_in, dt) = (cfg.num_experts, self.d_in, self.dtype);
        let bound = 1.0 / (d_in as f32).sqrt();
        let ab = src.experts(&shape, bound, dt)?;
        let routed = !matches!(cfg.gate, GateMode::Single | GateMode::WeightSpace);
        let (router_w, router_b) = if routed {
            (
                Some(src.param("router.weight", &[e, d_in], Start::Uniform(bound), dt)?),
                Some(src.param("router.bias", &[e], Start::Const(0.0), dt)?),
            )
        } else {
            (None, None)
        };
        let f32 = DType::F32;
        let (theta, tau_w, tau_b) = match cfg.gate {
            GateMode::Threshold(ThresholdMode::Learned { init_theta }) => (
                Some(src.param("threshold", &[1], Start::Const(init_theta), f32)?),
                None,
                None,
            ),
            GateMode::Threshold(ThresholdMode::InputDependent { init_bias }) => (
                None,
                Some(src.param("threshold.weight", &[d_in], Start::Const(0.0), dt)?),
                Some(src.param("threshold.bias", &[1], Start::Const(init_bias), f32)?),
            ),
            _ => (None, None, None),
        };
        let lambda_logit = match cfg.hierarchy {
            Some(Combine::Mix {
                lambda,
                learned: true,
            }) => Some(src.param(
                "lambda",
                &[1],
                Start::Const(logit(lambda.clamp(1e-4, 1.0 - 1e-4))),
                f32,
            )?),
            _ => None,
        };
        self.experts = Some(Experts {
            cfg,
            shape,
            ab,
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

    /// Reseeds the generator [`MoleLinear::forward_t`] draws its dropout masks from.
    pub fn reseed_dropout(&mut self, seed: u64) {
        self.dropout_rng = DropoutRng(Mutex::new(Rng::new(seed)));
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
            (_, Some(theta)) => Ok(Some(
                sigmoid(scalar(theta.as_tensor())?) / ex.cfg.num_experts as f32,
            )),
            _ => Ok(None),
        }
    }

    /// The current `λ` of a hierarchical mix.
    pub fn lambda(&self) -> Result<Option<f32>> {
        let Some(ex) = &self.experts else {
            return Ok(None);
        };
        match (ex.cfg.hierarchy, &ex.lambda_logit) {
            (Some(Combine::Mix { .. }), Some(phi)) => Ok(Some(sigmoid(scalar(phi.as_tensor())?))),
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
        let dt = self.dtype;
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
        let packed = Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?;
        ex.ab
            .set(&packed.to_dtype(dt)?.to_device(ex.ab.device())?)?;
        Ok(())
    }

    /// The adapter of a single-expert layer as a [`LoraPair`] (`A` `[r, d_in]`, `B` `[d_out, r]`,
    /// f32, its scale), e.g. to initialise one expert of a mixture from it.
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
        LoraPair::new(
            ex.a()?.get(0)?.copy()?,
            ex.b()?.get(0)?.copy()?,
            ex.cfg.scale(),
        )
    }

    fn experts_mut(&mut self) -> Result<&mut Experts> {
        let name = self.name.clone();
        self.experts.as_mut().ok_or(Error::Unsupported {
            op: "MoleLinear",
            what: format!("layer {name} has no experts"),
        })
    }

    /// The routing of the last forward pass of a layer with a router (probabilities and expert
    /// weights, f32 `[T, E]`), `None` before the first one or for layers without a router. It holds
    /// the tensors (and their autograd graph) until the next forward pass.
    pub fn last_routing(&self) -> Option<Routed> {
        self.last.get()
    }

    /// The layer as a candle layer in training or inference mode: with `train`, the experts'
    /// dropout draws from the layer's own generator ([`MoleLinear::reseed_dropout`]); without, this
    /// is [`Module::forward`]. (candle's `ModuleT` is implemented for every `Module` and ignores
    /// `train`, so this method is the layer's own.)
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            return self.forward_ctx(xs, &mut Ctx::default());
        }
        let mut guard = match self.dropout_rng.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut ctx = Ctx {
            rng: Some(&mut guard),
            ..Ctx::default()
        };
        self.forward_ctx(xs, &mut ctx)
    }

    /// `y = x·W0ᵀ + b (+ the experts)` for `x` `[..., d_in]` in the layer's dtype; returns `y`
    /// `[..., d_out]` in that dtype. The router's softmax and the gate run in f32. A layer with a
    /// router records the routing it used ([`MoleLinear::last_routing`]).
    pub fn forward_ctx(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(Error::Unsupported {
                op: "MoleLinear::forward",
                what: "a scalar input".into(),
            });
        };
        crate::error::check_len("x last dimension (d_in)", self.d_in, last)?;
        if x.dtype() != self.dtype {
            return Err(Error::Unsupported {
                op: "MoleLinear::forward",
                what: format!(
                    "layer {}: x has dtype {:?} but the layer runs in {:?} (convert one of them)",
                    self.name,
                    x.dtype(),
                    self.dtype
                ),
            });
        }
        let t = crate::error::checked_product("x rows", lead)?;
        let x2 = x.reshape((t, self.d_in))?;
        let mut y = match &self.base {
            Base::Quant(q) => ops::quant_linear(&x2, q)?,
            Base::Dense(w) => {
                let w = if self.train_base {
                    w.as_tensor().clone()
                } else {
                    w.as_tensor().detach()
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
        if let Some(ex) = &self.experts {
            let xin = match ctx.rng.as_deref_mut() {
                Some(rng) if ex.cfg.dropout > 0.0 => dropout(&x2, ex.cfg.dropout, rng)?,
                _ => x2.clone(),
            };
            let delta = if ex.cfg.gate == GateMode::WeightSpace {
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
                ops::weight_space_lora_packed(
                    &xin.reshape((s, l, self.d_in))?,
                    ex.ab.as_tensor(),
                    ex.shape,
                    p,
                    ex.cfg.scale(),
                )?
                .reshape((t, self.d_out))?
            } else {
                let r = self.route(ex, &x2, t, ctx)?;
                let delta = ops::routed_lora(
                    &xin,
                    ex.ab.as_tensor(),
                    ex.shape,
                    &r.probs,
                    r.tau.as_ref(),
                    r.gate,
                    ex.cfg.scale(),
                )?;
                // A layer without a router (a single adapter) has no routing to report.
                routed = ex.router_w.is_some().then_some(r);
                delta
            };
            y = (y + delta)?;
        }
        if self.experts.is_some() {
            self.last.set(routed);
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.d_out);
        Ok(y.reshape(out_dims)?)
    }

    /// The router's probabilities `[T, E]` and the gate (a single adapter: `p = 1`, dense).
    fn route(&self, ex: &Experts, x2: &Tensor, t: usize, ctx: &Ctx) -> Result<Routed> {
        let e = ex.cfg.num_experts;
        let (Some(rw), Some(rb)) = (&ex.router_w, &ex.router_b) else {
            return Ok(Routed {
                probs: Tensor::ones((t, 1), DType::F32, x2.device())?,
                gate: RoutedGate::Dense,
                tau: None,
            });
        };
        let logits = x2
            .matmul(&rw.as_tensor().t()?)?
            .broadcast_add(rb.as_tensor())?
            .to_dtype(DType::F32)?;
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
        let (gate, tau) = match ex.cfg.gate {
            GateMode::Single | GateMode::Dense | GateMode::WeightSpace => (RoutedGate::Dense, None),
            GateMode::TopK { k, renormalize } => (RoutedGate::TopK { k, renormalize }, None),
            GateMode::Threshold(mode) => {
                let tau = match (mode, &ex.theta, &ex.tau_w, &ex.tau_b) {
                    (ThresholdMode::Fixed(v), _, _, _) => Tensor::full(v, t, x2.device())?,
                    (ThresholdMode::Learned { .. }, Some(theta), _, _) => {
                        (candle_nn::ops::sigmoid(theta.as_tensor())? / e as f64)?
                            .broadcast_as(t)?
                            .contiguous()?
                    }
                    (ThresholdMode::InputDependent { .. }, _, Some(tw), Some(tb)) => {
                        let z = x2
                            .matmul(&tw.as_tensor().unsqueeze(1)?)?
                            .to_dtype(DType::F32)?
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
                (RoutedGate::Threshold, Some(tau))
            }
        };
        Ok(Routed { probs, gate, tau })
    }

    /// The parameters an optimiser should update, with their names: the base weight and bias when
    /// the base is trained, otherwise the experts (`NAME.experts`, `A` and `B` packed), router,
    /// threshold and λ parameters.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        let n = &self.name;
        if let (true, Base::Dense(w)) = (self.train_base, &self.base) {
            out.push((format!("{n}.weight"), w.clone()));
            if let Some(b) = &self.bias {
                out.push((format!("{n}.bias"), b.clone()));
            }
        }
        if let Some(ex) = &self.experts {
            out.push((format!("{n}.experts"), ex.ab.clone()));
            for (k, v) in ex.gate_vars() {
                out.push((format!("{n}.{k}"), v.clone()));
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
    /// object of the file's `molora` metadata, with the whole [`MoleConfig`] under `"config"`, so
    /// [`MoleLinear::load`] rebuilds the layer from the file). A layer without experts adds nothing.
    pub fn save_experts(
        &self,
        tensors: &mut BTreeMap<String, Tensor>,
        layers: &mut serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        let Some(ex) = &self.experts else {
            return Ok(());
        };
        for (k, v) in ex.named()? {
            tensors.insert(format!("{}.{k}", self.name), v);
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
                "config": ex.cfg.to_json(),
            }),
        );
        Ok(())
    }

    /// Loads the experts' tensors saved by [`MoleLinear::save_experts`]; every tensor the layer has
    /// must be present with its shape. Converted to the layer's dtypes.
    pub fn load_experts(&mut self, tensors: &BTreeMap<String, Tensor>, source: &str) -> Result<()> {
        let name = self.name.clone();
        let dt = self.dtype;
        let ex = self.experts_mut()?;
        let get = |k: &str, dims: &[usize]| -> Result<Tensor> {
            let key = format!("{name}.{k}");
            let t = tensors.get(&key).ok_or_else(|| Error::Weights {
                source_name: source.to_string(),
                key: key.clone(),
                detail: "missing".into(),
            })?;
            if t.dims() != dims {
                return Err(Error::Weights {
                    source_name: source.to_string(),
                    key,
                    detail: format!("shape {:?}, expected {dims:?}", t.dims()),
                });
            }
            Ok(t.clone())
        };
        let s = ex.shape;
        let a = get("lora_A", &[s.num_experts, s.rank, s.d_in])?;
        let b = get("lora_B", &[s.num_experts, s.d_out, s.rank])?;
        let mut updates = vec![(
            ex.ab.clone(),
            Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?.to_dtype(dt)?,
        )];
        for (k, v) in ex.gate_vars() {
            let t = get(k, v.as_tensor().dims())?.to_dtype(v.dtype())?;
            updates.push((v.clone(), t));
        }
        // Every tensor is checked before any is set. A copy: `set` refuses a source that shares the
        // variable's storage.
        for (v, t) in updates {
            v.set(&t.to_device(v.device())?.copy()?)?;
        }
        Ok(())
    }
}

impl Module for MoleLinear {
    /// [`MoleLinear::forward_ctx`] without context (inference: no dropout). Layers that route
    /// hierarchically or mix in weight space need [`MoleLinear::forward_ctx`]; here they return its
    /// error.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_ctx(xs, &mut Ctx::default())?)
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
