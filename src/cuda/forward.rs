//! The LoRA part of a MoLE layer on the GPU as one call with its workspace: router logits → fused
//! gating → either dispatch + grouped shrink/expand ([`LoraPath::Segmented`]) or the dense-gated
//! shrink/expand ([`LoraPath::DenseGated`]). Allocation happens once, in [`MoleLoraForward::new`];
//! [`MoleLoraForward::run`] only enqueues kernels (no allocation, no host sync), so it can be
//! captured in a CUDA graph.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};

use super::device::Device;
use super::dispatch::{dispatch, DevicePlan};
use super::gating::{gating, router_logits, DeviceGate};
use super::lora::{
    expand_experts, lora_dense_gated, shrink_experts, CudaElement, DenseGatedWorkspace, LoraPath,
};
use crate::cpu::Activation;
use crate::{Error, LoraShape, Result};

/// The router of a layer: `W_g` `[E, d_in]`, optional bias, activation and temperature.
#[derive(Debug)]
pub struct DeviceRouter<'a, T> {
    pub w_g: CudaView<'a, T>,
    pub b_g: Option<CudaView<'a, T>>,
    pub activation: Activation,
    pub temperature: f32,
}

#[derive(Debug)]
enum Path {
    Segmented { plan: DevicePlan, h: CudaSlice<f32> },
    DenseGated(DenseGatedWorkspace),
}

/// Workspace and plan of the LoRA forward for `T` tokens, a [`LoraShape`] and a gate's `k_max`.
#[derive(Debug)]
pub struct MoleLoraForward {
    num_tokens: usize,
    shape: LoraShape,
    k_max: usize,
    logits: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    path: Path,
}

impl MoleLoraForward {
    /// Allocates everything the forward needs for `num_tokens` tokens (T ≥ 1) with gates of
    /// `k_max` slots ([`DeviceGate::k_max`]), on the given path ([`LoraPath::for_shape`] picks one).
    pub fn new(
        dev: &Device,
        num_tokens: usize,
        shape: &LoraShape,
        k_max: usize,
        path: LoraPath,
    ) -> Result<Self> {
        if num_tokens == 0 || k_max == 0 {
            return Err(Error::InvalidDim {
                what: if num_tokens == 0 {
                    "num_tokens"
                } else {
                    "k_max"
                },
                value: 0,
                reason: "the forward workspace needs at least one token and one slot",
            });
        }
        let e = shape.num_experts;
        let path = match path {
            LoraPath::Segmented => Path::Segmented {
                plan: DevicePlan::new(dev, num_tokens, k_max, e)?,
                h: dev.zeros(num_tokens * k_max * shape.rank)?,
            },
            LoraPath::DenseGated => {
                Path::DenseGated(DenseGatedWorkspace::new(dev, num_tokens, shape)?)
            }
        };
        Ok(MoleLoraForward {
            num_tokens,
            shape: *shape,
            k_max,
            logits: dev.zeros(num_tokens * e)?,
            ids: dev.zeros(num_tokens * k_max)?,
            weights: dev.zeros(num_tokens * k_max)?,
            path,
        })
    }

    /// The routing of the last [`run`](Self::run): ids `[T, k_max]` (`-1` = empty).
    pub fn ids(&self) -> &CudaSlice<i32> {
        &self.ids
    }
    /// The routing weights of the last run `[T, k_max]`.
    pub fn weights(&self) -> &CudaSlice<f32> {
        &self.weights
    }
    /// The path this workspace runs.
    pub fn path(&self) -> LoraPath {
        match self.path {
            Path::Segmented { .. } => LoraPath::Segmented,
            Path::DenseGated(_) => LoraPath::DenseGated,
        }
    }

    /// `y[t, :] = round(y[t, :] + scale·Σ_s w_ts·(x_t·A_eᵀ)·B_eᵀ)` with the routing computed from `x`
    /// by `router` and `gate`, as `cpu::route` + `cpu::lora_delta` compute it. Asynchronous.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: CudaElement>(
        &mut self,
        dev: &Device,
        x: &impl DevicePtr<T>,
        router: &DeviceRouter<'_, T>,
        gate: &DeviceGate<'_>,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        scale: f32,
        y: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let (t, shape) = (self.num_tokens, self.shape);
        let e = shape.num_experts;
        if gate.k_max(e) != self.k_max {
            return Err(Error::LengthMismatch {
                what: "gate slots vs the workspace's k_max",
                expected: self.k_max,
                got: gate.k_max(e),
            });
        }
        router_logits(
            dev,
            x,
            t,
            shape.d_in,
            &router.w_g,
            router.b_g.as_ref(),
            e,
            &mut self.logits,
            None,
        )?;
        gating(
            dev,
            &self.logits,
            t,
            e,
            router.activation,
            router.temperature,
            None,
            gate,
            &mut self.ids,
            &mut self.weights,
        )?;
        match &mut self.path {
            Path::Segmented { plan, h } => {
                dispatch(dev, &self.ids, plan)?;
                shrink_experts(dev, x, a, &shape, plan, h)?;
                expand_experts(dev, h, b, &shape, plan, &self.ids, &self.weights, scale, y)
            }
            Path::DenseGated(ws) => lora_dense_gated(
                dev,
                x,
                a,
                b,
                &shape,
                &self.ids,
                &self.weights,
                self.k_max,
                scale,
                ws,
                y,
            ),
        }
    }
}
