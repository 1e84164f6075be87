//! The LoRA part of a MoLE layer on the GPU as one call with its workspace: router logits → fused
//! gating → either dispatch + grouped shrink/expand ([`LoraPath::Segmented`]) or the dense-gated
//! shrink/expand ([`LoraPath::DenseGated`]). Allocation happens once, in [`MoleLoraForward::new`];
//! [`MoleLoraForward::run`] only enqueues kernels (no allocation, no host sync), so it can be
//! captured in a CUDA graph. [`MoleLoraForward::backward`] differentiates the last run into
//! [`MoleLoraGrads`] (allocated once by [`MoleLoraForward::new_grads`]), on the same path.

use super::backward::{
    gating_backward, lora_backward_dense_gated, lora_backward_experts, router_backward_impl,
    DeviceLoraGrads, RouterTcWorkspace,
};
use super::device::Device;
use super::dispatch::{dispatch, DevicePlan};
use super::ffi;
use super::gating::{gating, gating_args, router_logits, DeviceGate, GatingPtrs};
use super::launch::{Kernel, Launch};
use super::lora::{
    dense_gated_impl, dense_gated_tc_refusal, expand_experts, multiprocessors, shrink_experts,
    split_k_factor, CudaElement, DenseGatedConfig, DenseGatedWorkspace, KernelPath, LoraPath,
};
use super::memory::{Buffer, BufferView, DeviceRead, DeviceWrite};
use crate::gate::check_scale;
use crate::gate::Activation;
use crate::{Error, LoraShape, Result};

/// The router of a layer: `W_g` `[E, d_in]`, optional bias, activation and temperature.
#[derive(Debug)]
pub struct DeviceRouter<'a, T> {
    pub w_g: BufferView<'a, T>,
    pub b_g: Option<BufferView<'a, T>>,
    pub activation: Activation,
    pub temperature: f32,
}

#[derive(Debug)]
enum Path {
    Segmented {
        plan: DevicePlan,
        h: Buffer<f32>,
    },
    DenseGated {
        ws: DenseGatedWorkspace,
        decode: Option<DecodeWorkspace>,
    },
}

/// The fused decode's own buffers (`T ≤ MOLORA_DG_DECODE_MAX_TOKENS`): the split-K partials of
/// `x·[A_all; W_g]ᵀ` and one ticket per column tile plus the "all tiles done" ticket.
#[derive(Debug)]
struct DecodeWorkspace {
    splits: usize,
    partials: Buffer<f32>,
    tickets: Buffer<i32>,
}

impl DecodeWorkspace {
    /// Splits of the `d_in` sum: about two blocks per multiprocessor over the column tiles, each
    /// split at least two k-steps of 32, at most 64.
    fn new(dev: &Device, t: usize, shape: &LoraShape) -> Result<Self> {
        let cols = shape.num_experts * shape.rank + shape.num_experts;
        let tiles = cols.div_ceil(128);
        let k_steps = shape.d_in.div_ceil(32);
        let splits = split_k_factor(multiprocessors(dev), tiles, k_steps, 2, 64);
        Ok(DecodeWorkspace {
            splits,
            partials: dev.zeros(if splits > 1 { splits * t * cols } else { 1 })?,
            tickets: dev.zeros(tiles + 1)?,
        })
    }
}

/// Workspace and plan of the LoRA forward for `T` tokens, a [`LoraShape`] and a gate's `k_max`.
#[derive(Debug)]
pub struct MoleLoraForward {
    num_tokens: usize,
    shape: LoraShape,
    k_max: usize,
    logits: Buffer<f32>,
    ids: Buffer<i32>,
    weights: Buffer<f32>,
    path: Path,
    fused_decode: bool,
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
            LoraPath::DenseGated => Path::DenseGated {
                ws: DenseGatedWorkspace::new(dev, num_tokens, shape)?,
                decode: if num_tokens <= ffi::MOLORA_DG_DECODE_MAX_TOKENS as usize {
                    Some(DecodeWorkspace::new(dev, num_tokens, shape)?)
                } else {
                    None
                },
            },
        };
        Ok(MoleLoraForward {
            num_tokens,
            shape: *shape,
            k_max,
            logits: dev.zeros(num_tokens * e)?,
            ids: dev.zeros(num_tokens * k_max)?,
            weights: dev.zeros(num_tokens * k_max)?,
            path,
            fused_decode: false,
        })
    }

    /// The routing of the last [`run`](Self::run): ids `[T, k_max]` (`-1` = empty).
    pub fn ids(&self) -> &Buffer<i32> {
        &self.ids
    }
    /// The routing weights of the last run `[T, k_max]`.
    pub fn weights(&self) -> &Buffer<f32> {
        &self.weights
    }
    /// Whether the last [`run`](Self::run) took the fused decode: for `T ≤ 16` on the dense-gated
    /// path with its tensor-core conditions (f16/bf16, `d_in` and `r` multiples of 8, 16-byte aligned
    /// `x`, `A`, `B`, `W_g`), router logits, gate and shrink in one kernel and the expand in a second.
    pub fn fused_decode(&self) -> bool {
        self.fused_decode
    }

    /// The path this workspace runs.
    pub fn path(&self) -> LoraPath {
        match self.path {
            Path::Segmented { .. } => LoraPath::Segmented,
            Path::DenseGated { .. } => LoraPath::DenseGated,
        }
    }

    /// `y[t, :] = round(y[t, :] + scale·Σ_s w_ts·(x_t·A_eᵀ)·B_eᵀ)` with the routing computed from `x`
    /// by `router` and `gate`, as `cpu::route` + `cpu::lora_delta` compute it. Asynchronous.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: CudaElement>(
        &mut self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        router: &DeviceRouter<'_, T>,
        gate: &DeviceGate<'_>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        scale: f32,
        y: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        let (t, shape) = (self.num_tokens, self.shape);
        let e = shape.num_experts;
        self.check_gate(gate)?;
        self.fused_decode = false;
        if let Path::DenseGated {
            ws,
            decode: Some(dec),
        } = &mut self.path
        {
            if let Some(kernel) = T::DENSE_GATED_DECODE {
                let ran = run_decode(
                    dev,
                    kernel,
                    DecodeCall {
                        t,
                        shape: &shape,
                        k_max: self.k_max,
                        scale,
                    },
                    x,
                    router,
                    gate,
                    a,
                    b,
                    y,
                    ws,
                    dec,
                    &mut self.logits,
                    &mut self.ids,
                    &mut self.weights,
                )?;
                if ran {
                    self.fused_decode = true;
                    return Ok(());
                }
            }
        }
        router_logits(
            dev,
            x,
            t,
            shape.d_in,
            &router.w_g,
            router.b_g.as_ref().map(|b| b as &dyn DeviceRead<T>),
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
        self.lora(dev, x, a, b, scale, y)
    }

    /// [`run`](Self::run) from router probabilities a framework already computed: `probs` `[T, E]`
    /// (f32, in `[0, 1]`) through the gate ([`super::gate_probabilities`], whose sparse slots stay
    /// on the device) into the LoRA part on this workspace's path, `y += scale·Σ_s w_ts·(x_t·A_eᵀ)·B_eᵀ`
    /// — what `cpu::top_k`/`cpu::threshold_gate`/`cpu::dense` + `cpu::lora_delta` compute.
    /// Asynchronous, no allocation. [`backward_probs`](Self::backward_probs) differentiates it.
    #[allow(clippy::too_many_arguments)]
    pub fn run_probs<T: CudaElement>(
        &mut self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        probs: &impl DeviceRead<f32>,
        gate: &DeviceGate<'_>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        scale: f32,
        y: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        self.check_gate(gate)?;
        check_scale(scale)?;
        self.fused_decode = false;
        let (t, e) = (self.num_tokens, self.shape.num_experts);
        super::gating::gate_probabilities(
            dev,
            probs,
            t,
            e,
            gate,
            &mut self.ids,
            &mut self.weights,
        )?;
        self.lora(dev, x, a, b, scale, y)
    }

    /// The LoRA part over slots a framework already holds: `ids`/`weights` `[T, k_max]` (`-1` = an
    /// empty slot, exactly zero) copied into this workspace's routing on the device, then
    /// `y += scale·Σ_s w_ts·(x_t·A_eᵀ)·B_eᵀ` on its path — what [`crate::cpu::lora_delta`] computes.
    /// Asynchronous, no allocation. [`backward_slots`](Self::backward_slots) differentiates it.
    #[allow(clippy::too_many_arguments)]
    pub fn run_slots<T: CudaElement>(
        &mut self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        ids: &impl DeviceRead<i32>,
        weights: &impl DeviceRead<f32>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        scale: f32,
        y: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        check_scale(scale)?;
        let slots = self.num_tokens * self.k_max;
        crate::error::check_len("slot ids [T, k_max]", slots, ids.len())?;
        crate::error::check_len("slot weights [T, k_max]", slots, weights.len())?;
        self.fused_decode = false;
        dev.copy(ids, &mut self.ids)?;
        dev.copy(weights, &mut self.weights)?;
        self.lora(dev, x, a, b, scale, y)
    }

    /// Gradients of the last [`run_slots`](Self::run_slots) given `dy` `[T, d_out]`, with the same
    /// `x`, `A`, `B` and `scale`: `dA`, `dB`, `dx` and `dw` `[T, k_max]` in `grads.lora()`. The gate's
    /// and router's buffers are not written. Deterministic, asynchronous, no allocation.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_slots<T: CudaElement>(
        &self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        dy: &impl DeviceRead<T>,
        scale: f32,
        grads: &mut MoleLoraGrads,
    ) -> Result<()> {
        self.check_grads(grads)?;
        self.lora_backward(dev, x, a, b, dy, scale, grads)
    }

    fn check_gate(&self, gate: &DeviceGate<'_>) -> Result<()> {
        let e = self.shape.num_experts;
        if gate.k_max(e) != self.k_max {
            return Err(Error::LengthMismatch {
                what: "gate slots vs the workspace's k_max",
                expected: self.k_max,
                got: gate.k_max(e),
            });
        }
        Ok(())
    }

    /// The LoRA part over the routing in `ids`/`weights`, on this workspace's path.
    #[allow(clippy::too_many_arguments)]
    fn lora<T: CudaElement>(
        &mut self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        scale: f32,
        y: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        let shape = self.shape;
        match &mut self.path {
            Path::Segmented { plan, h } => {
                dispatch(dev, &self.ids, plan)?;
                shrink_experts(dev, x, a, &shape, plan, h)?;
                expand_experts(dev, h, b, &shape, plan, &self.ids, &self.weights, scale, y)
            }
            // The gating just enqueued wrote the routing; x and A come from before the router:
            // the tensor-core shrink may overlap the gating's tail (programmatic dependent launch).
            Path::DenseGated { ws, .. } => dense_gated_impl(
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
                KernelPath::Auto,
                true,
            ),
        }
    }
}

/// Where a gate's backward writes `dτ`: the buffer for a threshold gate; for the other gates
/// nothing is written there, so the buffer is zeroed (`MoleLoraGrads::dtau` reads 0).
fn dtau_out<'g>(
    dev: &Device,
    gate: &DeviceGate<'_>,
    dtau: &'g mut Buffer<f32>,
) -> Result<Option<&'g mut dyn DeviceWrite<f32>>> {
    if matches!(
        gate,
        DeviceGate::Threshold(_) | DeviceGate::ThresholdPerToken(_)
    ) {
        Ok(Some(dtau))
    } else {
        dev.memset_zeros(dtau)?;
        Ok(None)
    }
}

/// The shapes of one fused-decode call.
struct DecodeCall<'s> {
    t: usize,
    shape: &'s LoraShape,
    k_max: usize,
    scale: f32,
}

/// The fused decode ([`MoleLoraForward::fused_decode`]) when its conditions hold: `Ok(true)` when
/// it was launched, `Ok(false)` when the shape, dtype or alignment does not qualify (the caller runs
/// the general path), `Err` for the general path's errors (lengths, gate parameters).
#[allow(clippy::too_many_arguments)]
fn run_decode<T: CudaElement>(
    dev: &Device,
    kernel: Kernel<ffi::molora_dense_gated_decode_args>,
    call: DecodeCall<'_>,
    x: &impl DeviceRead<T>,
    router: &DeviceRouter<'_, T>,
    gate: &DeviceGate<'_>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    y: &mut impl DeviceWrite<T>,
    ws: &mut DenseGatedWorkspace,
    dec: &mut DecodeWorkspace,
    logits: &mut Buffer<f32>,
    ids: &mut Buffer<i32>,
    weights: &mut Buffer<f32>,
) -> Result<bool> {
    const OP: &str = "MoleLoraForward::run (fused decode)";
    let DecodeCall {
        t,
        shape,
        k_max,
        scale,
    } = call;
    let e = shape.num_experts;
    check_scale(scale)?;
    let mut l = Launch::new(dev, OP);
    let xp = l.input("x [T, d_in]", x, t * shape.d_in)?;
    let ap = l.input("A [E, r, d_in]", a, shape.a_len())?;
    let bp = l.input("B [E, d_out, r]", b, shape.b_len())?;
    let wg = l.input("router W_g [E, d_in]", &router.w_g, e * shape.d_in)?;
    if dense_gated_tc_refusal::<T>(shape, &[xp, ap, bp, wg]).is_some() {
        return Ok(false);
    }
    let bg = match &router.b_g {
        Some(bias) => l.input("router b_g [E]", bias, e)?,
        None => std::ptr::null(),
    };
    let yp = l.output("y [T, d_out]", y, t * shape.d_out)?;
    let lp = l.output("router logits [T, E]", logits, t * e)?;
    let idp = l.output("routing ids [T, k_max]", ids, t * k_max)?;
    let wp = l.output("routing weights [T, k_max]", weights, t * k_max)?;
    let gating = gating_args(
        &mut l,
        GatingPtrs {
            logits: lp,
            ids: idp,
            weights: wp,
        },
        t,
        e,
        Some(router.activation),
        router.temperature,
        None,
        gate,
    )?;
    let DenseGatedConfig { two_term_h, .. } = ws.config;
    let h = l.output_any("dense-gated workspace h", &mut ws.h)?;
    let hg = l.output_any("dense-gated workspace hg", &mut ws.hg)?;
    let partials = l.output_any("decode partials", &mut dec.partials)?;
    let tickets = l.output_any("decode tickets", &mut dec.tickets)?;
    let tiles = (shape.num_experts * shape.rank + e).div_ceil(128);
    let args = ffi::molora_dense_gated_decode_args {
        lora: ffi::molora_dense_gated_args {
            x: xp.cast(),
            a: ap.cast(),
            b: bp.cast(),
            y: yp.cast(),
            ids: idp,
            weights: wp,
            h,
            hg: hg.cast(),
            partials: if dec.splits > 1 {
                partials
            } else {
                std::ptr::null_mut()
            },
            tickets,
            k_max: k_max as i32,
            num_tokens: t as i32,
            num_experts: e as i32,
            rank: shape.rank as i32,
            d_in: shape.d_in as i32,
            d_out: shape.d_out as i32,
            splits: dec.splits as i32,
            hg_terms: if two_term_h { 2 } else { 1 },
            pdl: 0,
            scale,
        },
        gating,
        w_g: wg.cast(),
        b_g: bg.cast(),
        // The "all tiles done" ticket follows the per-tile ones.
        done: tickets.wrapping_add(tiles),
    };
    // SAFETY: every buffer has the length checked above (x, A, B, W_g, b_g, y, logits, ids,
    // weights) or was allocated for this T and shape (h, hg of the workspace; the decode's
    // `splits` partial planes of T·(E·r + E) floats and tiles + 1 zeroed tickets, which the kernels
    // leave zero); gating_args checked the gate's parameters; the tensor-core conditions (dtype,
    // multiples of 8, 16-byte alignment) were checked by dense_gated_tc_refusal.
    unsafe { l.run(&kernel, &args) }?;
    Ok(true)
}

/// Gradient buffers of [`MoleLoraForward::backward`] (f32, allocated once by
/// [`MoleLoraForward::new_grads`]): the LoRA part's `dA`, `dB`, `dx` (through the experts) and `dw`,
/// the router's `dz = ∂L/∂logits` `[T, E]`, `dτ` `[T]` (threshold gates), `dW_g` `[E, d_in]`,
/// `db_g` `[E]` and `dx` through the router `[T, d_in]`. The input's whole gradient through the LoRA
/// part is `lora().dx() + dx_router()` (plus `dy·W0` through the frozen base, the caller's).
#[derive(Debug)]
pub struct MoleLoraGrads {
    lora: DeviceLoraGrads,
    num_tokens: usize,
    num_experts: usize,
    d_in: usize,
    // Exact sizes (T, E and d_in are at least 1).
    dz: Buffer<f32>,
    dtau: Buffer<f32>,
    dw_g: Buffer<f32>,
    db_g: Buffer<f32>,
    dx_router: Buffer<f32>,
    router_tc: RouterTcWorkspace,
}

impl MoleLoraGrads {
    /// `dA`, `dB`, `dx` through the experts and `dw`.
    pub fn lora(&self) -> &DeviceLoraGrads {
        &self.lora
    }
    /// `∂L/∂logits` `[T, E]` after [`MoleLoraForward::backward`].
    pub fn dz(&self) -> BufferView<'_, f32> {
        self.dz.view()
    }
    /// `∂L/∂p` `[T, E]` after [`MoleLoraForward::backward_probs`] (the buffer [`MoleLoraGrads::dz`]
    /// uses after [`MoleLoraForward::backward`]).
    pub fn dp(&self) -> BufferView<'_, f32> {
        self.dz.view()
    }
    /// `∂L/∂τ_t` `[T]` of a threshold gate (zero for other gates); for a learned `τ = σ(θ)/E` the
    /// caller forms `dθ = Σ_t dτ_t·σ'(θ)/E`.
    pub fn dtau(&self) -> BufferView<'_, f32> {
        self.dtau.view()
    }
    /// `∂L/∂W_g` `[E, d_in]`.
    pub fn dw_g(&self) -> BufferView<'_, f32> {
        self.dw_g.view()
    }
    /// `∂L/∂b_g` `[E]` (also when the router has no bias).
    pub fn db_g(&self) -> BufferView<'_, f32> {
        self.db_g.view()
    }
    /// `∂L/∂x` through the router `[T, d_in]`.
    pub fn dx_router(&self) -> BufferView<'_, f32> {
        self.dx_router.view()
    }
    /// Bytes of device memory these buffers and their workspaces hold.
    pub fn device_bytes(&self) -> usize {
        self.lora.device_bytes()
            + std::mem::size_of::<f32>()
                * (self.dz.len()
                    + self.dtau.len()
                    + self.dw_g.len()
                    + self.db_g.len()
                    + self.dx_router.len())
            + self.router_tc.device_bytes()
    }
}

impl MoleLoraForward {
    /// Gradient buffers for [`backward`](Self::backward) on this workspace's shape and path.
    pub fn new_grads(&self, dev: &Device) -> Result<MoleLoraGrads> {
        let (t, e, d_in) = (self.num_tokens, self.shape.num_experts, self.shape.d_in);
        let lora = match self.path {
            Path::Segmented { .. } => DeviceLoraGrads::new(dev, t, self.k_max, &self.shape)?,
            Path::DenseGated { .. } => {
                DeviceLoraGrads::new_dense_gated(dev, t, self.k_max, &self.shape)?
            }
        };
        Ok(MoleLoraGrads {
            lora,
            num_tokens: t,
            num_experts: e,
            d_in,
            dz: dev.zeros(t * e)?,
            dtau: dev.zeros(t)?,
            dw_g: dev.zeros(e * d_in)?,
            db_g: dev.zeros(e)?,
            dx_router: dev.zeros(t * d_in)?,
            router_tc: RouterTcWorkspace::new(dev, t, d_in, e)?,
        })
    }

    /// Gradients of the last [`run`](Self::run) given `dy = ∂L/∂y` `[T, d_out]`, with the same
    /// `x`, `router`, `gate`, `A`, `B` and `scale`: the LoRA part on the run's path (its plan and
    /// sorted shrink, or its all-experts shrink `[T, E·r]`, are what the forward kept: nothing
    /// `[T, E, d]` is formed), then the gate and the activation back to the logits, then the router.
    /// Deterministic, asynchronous, no allocation. The hierarchical combination is not part of this
    /// forward; see [`super::gating_backward_hierarchical`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: CudaElement>(
        &self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        router: &DeviceRouter<'_, T>,
        gate: &DeviceGate<'_>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        dy: &impl DeviceRead<T>,
        scale: f32,
        grads: &mut MoleLoraGrads,
    ) -> Result<()> {
        let (t, shape) = (self.num_tokens, self.shape);
        let e = shape.num_experts;
        self.check_gate(gate)?;
        self.check_grads(grads)?;
        self.lora_backward(dev, x, a, b, dy, scale, grads)?;
        let dtau = dtau_out(dev, gate, &mut grads.dtau)?;
        gating_backward(
            dev,
            &self.logits,
            t,
            e,
            router.activation,
            router.temperature,
            gate,
            &self.ids,
            &grads.lora.dw(),
            &mut grads.dz,
            dtau,
        )?;
        router_backward_impl(
            dev,
            x,
            t,
            shape.d_in,
            &router.w_g,
            e,
            &grads.dz,
            &mut grads.dw_g,
            &mut grads.db_g,
            Some(&mut grads.dx_router),
            Some(&mut grads.router_tc),
        )
    }

    /// Gradients of the last [`run_probs`](Self::run_probs) given `dy` `[T, d_out]`, with the same
    /// `x`, `probs`, `gate`, `A`, `B` and `scale`: the LoRA part on the run's path, then the gate back
    /// to the probabilities ([`super::gate_probabilities_backward`]): `dA`, `dB`, `dx` in
    /// `grads.lora()`, `∂L/∂p` `[T, E]` in [`MoleLoraGrads::dp`] and, for a threshold gate, `dτ` in
    /// [`MoleLoraGrads::dtau`]. The router's buffers are not written. Deterministic, asynchronous, no
    /// allocation.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_probs<T: CudaElement>(
        &self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        probs: &impl DeviceRead<f32>,
        gate: &DeviceGate<'_>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        dy: &impl DeviceRead<T>,
        scale: f32,
        grads: &mut MoleLoraGrads,
    ) -> Result<()> {
        self.check_gate(gate)?;
        self.check_grads(grads)?;
        let (t, e) = (self.num_tokens, self.shape.num_experts);
        self.lora_backward(dev, x, a, b, dy, scale, grads)?;
        let dtau = dtau_out(dev, gate, &mut grads.dtau)?;
        super::backward::gate_probabilities_backward(
            dev,
            probs,
            t,
            e,
            gate,
            &self.ids,
            &grads.lora.dw(),
            &mut grads.dz,
            dtau,
        )
    }

    fn check_grads(&self, grads: &MoleLoraGrads) -> Result<()> {
        let (t, e, d_in) = (self.num_tokens, self.shape.num_experts, self.shape.d_in);
        if grads.num_tokens != t || grads.num_experts != e || grads.d_in != d_in {
            return Err(Error::Unsupported {
                op: "MoleLoraForward::backward",
                what: format!(
                    "gradient buffers for T = {}, E = {}, d_in = {}, workspace for T = {t}, E = {e}, d_in = {d_in} (use new_grads)",
                    grads.num_tokens, grads.num_experts, grads.d_in
                ),
            });
        }
        Ok(())
    }

    /// The LoRA part's backward on the last run's path, into `grads.lora`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward<T: CudaElement>(
        &self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        dy: &impl DeviceRead<T>,
        scale: f32,
        grads: &mut MoleLoraGrads,
    ) -> Result<()> {
        let shape = self.shape;
        match &self.path {
            Path::Segmented { plan, h } => lora_backward_experts(
                dev,
                x,
                a,
                b,
                &shape,
                plan,
                &self.ids,
                &self.weights,
                h,
                dy,
                scale,
                &mut grads.lora,
            )?,
            Path::DenseGated { ws, .. } => lora_backward_dense_gated(
                dev,
                x,
                a,
                b,
                &shape,
                &self.ids,
                &self.weights,
                self.k_max,
                ws,
                dy,
                scale,
                &mut grads.lora,
            )?,
        }
        Ok(())
    }
}
