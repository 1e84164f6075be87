//! The gate's types and checks, shared by the CPU reference ([`crate::cpu`]) and the CUDA path
//! ([`crate::cuda`]): the router's activation, the threshold specification, the hierarchical
//! combination, the gate, the router's weights, and the checks both paths run on them before any
//! work. Neither path depends on the other for these.

use crate::error::check_finite;
use crate::{Error, Result};

/// The router's output non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `p_te = exp(z_te/τ − m_t) / Σ_j exp(z_tj/τ − m_t)` with `m_t = max_j z_tj/τ`: each row sums to 1.
    Softmax,
    /// `p_te = σ(z_te/τ) = 1 / (1 + exp(−z_te/τ))`, elementwise: rows need not sum to 1.
    Sigmoid,
}

/// How the threshold `τ` of the dynamic-threshold gate is obtained.
#[derive(Debug, Clone, PartialEq)]
pub enum ThresholdSpec {
    /// `τ` itself, the same for every token. Any finite value: `τ ≤ 0` keeps every expert, `τ` above
    /// every probability falls back to the arg-max.
    Fixed(f32),
    /// HDMoLE's learned per-layer threshold: `τ = σ(θ) / E`.
    Learned { theta: f32 },
    /// AdaMoLE's input-dependent threshold: `τ_t = σ(w · x_t + b) / E`, `w` of length `d_in`.
    InputDependent { w: Vec<f32>, b: f32 },
}

/// How the hierarchical gate combines a token's local probabilities `l_t` with its sequence's global
/// posterior `g_s` (the combination is our choice; HDMoLE does not publish one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HierarchicalCombine {
    /// `p_te = λ·g_se + (1 − λ)·l_te`, `λ ∈ [0, 1]`. Rows sum to 1 when both `g_s` and `l_t` do.
    Mix { lambda: f32 },
    /// `p_te = g_se·l_te / Σ_j g_sj·l_tj`. When the product is zero for every expert (the two have
    /// disjoint supports) the row falls back to `l_t` unchanged.
    Product,
}

/// The gate that turns probabilities into a [`Routing`](crate::Routing).
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// [`top_k`](crate::cpu::top_k) with this `k` and renormalisation choice.
    TopK { k: usize, renormalize: bool },
    /// [`threshold_values`](crate::cpu::threshold_values) from this spec, then [`threshold_gate`](crate::cpu::threshold_gate).
    Threshold(ThresholdSpec),
    /// [`dense`](crate::cpu::dense): every expert with weight `p_te`.
    Dense,
}

/// How router probabilities become the experts' slots (the gate of the framework ops: `cpu::ops` and
/// `cuda::ops`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutedGate {
    /// The `k` most probable experts ([`crate::cpu::top_k`], ties to the lower id), renormalised to sum 1
    /// when `renormalize`.
    TopK { k: usize, renormalize: bool },
    /// The experts at or above a per-token threshold `τ_t` ([`crate::cpu::threshold_gate`]).
    Threshold,
    /// Every expert with weight `p_te` ([`crate::cpu::dense`]).
    Dense,
}

impl RoutedGate {
    /// Whether the gate reads per-token thresholds `τ` `[T]`.
    pub fn has_tau(&self) -> bool {
        matches!(self, RoutedGate::Threshold)
    }

    /// Whether the kept weights are renormalised (so their gradient goes through the sum).
    pub fn renormalizes(&self) -> bool {
        match self {
            RoutedGate::TopK { renormalize, .. } => *renormalize,
            RoutedGate::Threshold => true,
            RoutedGate::Dense => false,
        }
    }
}

/// A router's parameters: `W_g` `[E, d_in]`, optional bias `b_g` `[E]`, the activation and its
/// temperature (`> 0`, finite; 1 for a plain softmax/sigmoid).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterWeights<'a, T> {
    pub w_g: &'a [T],
    pub b_g: Option<&'a [T]>,
    pub activation: Activation,
    pub temperature: f32,
}

/// Logistic sigmoid `1 / (1 + exp(−z))`, written so that neither branch overflows. Both paths
/// compute `σ(θ)/E` of a learned threshold with it.
pub fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

impl ThresholdSpec {
    /// The one `τ` of a fixed (`τ`) or learned (`σ(θ)/E`) threshold, checked; `None` for the
    /// input-dependent threshold, whose `τ_t` depends on each token.
    pub fn uniform_tau(&self, num_experts: usize) -> Result<Option<f32>> {
        check_num_experts(num_experts)?;
        check_spec(self)?;
        Ok(match self {
            ThresholdSpec::Fixed(tau) => Some(*tau),
            ThresholdSpec::Learned { theta } => Some(sigmoid(*theta) / num_experts as f32),
            ThresholdSpec::InputDependent { .. } => None,
        })
    }
}

/// `E ≥ 1` and every id fits an `i32`, else [`Error::InvalidDim`] naming `num_experts`.
pub fn check_num_experts(num_experts: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::InvalidDim {
            what: "num_experts",
            value: 0,
            reason: "routing needs at least one expert",
        });
    }
    if num_experts > i32::MAX as usize {
        return Err(Error::InvalidDim {
            what: "num_experts",
            value: num_experts,
            reason: "expert ids must fit in an i32",
        });
    }
    Ok(())
}

pub fn check_temperature(temperature: f32) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::InvalidParameter {
            what: "temperature",
            value: temperature,
            reason: "the temperature must be finite and > 0",
        });
    }
    Ok(())
}

pub fn check_k(k: usize, num_experts: usize) -> Result<()> {
    if k == 0 || k > num_experts {
        return Err(Error::InvalidK { k, num_experts });
    }
    Ok(())
}

pub fn check_spec(spec: &ThresholdSpec) -> Result<()> {
    match spec {
        ThresholdSpec::Fixed(tau) => check_finite("tau", &[*tau]),
        ThresholdSpec::Learned { theta } => check_finite("theta", &[*theta]),
        ThresholdSpec::InputDependent { w, b } => {
            check_finite("threshold w", w)?;
            check_finite("threshold b", &[*b])
        }
    }
}

pub fn check_combine(combine: HierarchicalCombine) -> Result<()> {
    if let HierarchicalCombine::Mix { lambda } = combine {
        if !(0.0..=1.0).contains(&lambda) {
            return Err(Error::InvalidParameter {
                what: "lambda",
                value: lambda,
                reason: "the mixing weight must be in [0, 1]",
            });
        }
    }
    Ok(())
}

/// A LoRA scale: any finite value.
pub fn check_scale(scale: f32) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            what: "scale",
            value: scale,
            reason: "must be finite",
        })
    }
}
