//! Backward of the grouped LoRA part on the GPU (`cuda/backward.cu`), deterministic: the GPU
//! counterpart of [`crate::cpu::backward::lora_backward`] over the forward's dispatch plan.

use super::device::{activation_code, checked_i32, Device};
use super::dispatch::DevicePlan;
use super::ffi;
use super::launch::{Kernel, Launch};
use super::lora::{dense_gated_tc_refusal, multiprocessors, split_k_factor, CudaElement};
use super::memory::{Buffer, BufferView, DeviceRead, DeviceWrite};
use crate::error::check_len;
use crate::gate::check_scale;
use crate::grads::LoraGrads;
use crate::{Error, LoraShape, Result};

const GATING_BACKWARD: Kernel<ffi::molora_gating_backward_args> =
    kernel!(molora_gating_backward_f32, molora_emu_gating_backward_f32);

/// Device buffers of the LoRA gradients (f32) for `T` tokens, `k_max` slots and a [`LoraShape`],
/// plus the `u = dy·B` workspace: `[T·k_max, r]` for the segmented backward
/// ([`DeviceLoraGrads::new`]), or `[T, E·r]` and the per-token gate `[T, E]` as well for the
/// dense-gated backward ([`DeviceLoraGrads::new_dense_gated`], which serves both). Allocate once per
/// shape and reuse; the backward ops allocate nothing.
#[derive(Debug)]
pub struct DeviceLoraGrads {
    num_tokens: usize,
    k_max: usize,
    shape: LoraShape,
    dense_gated: bool,
    // Each buffer holds one element more than it needs: the driver cannot allocate zero bytes.
    da: Buffer<f32>,
    db: Buffer<f32>,
    dx: Buffer<f32>,
    dw: Buffer<f32>,
    u: Buffer<f32>,
    /// The dense-gated backward on tensor cores (allocated by `new_dense_gated`, one element
    /// elsewhere): `G ⊙ U` and `G ⊙ H` in the element type, the split-T partials and tickets.
    tc: DenseTcWorkspace,
}

#[derive(Debug)]
struct DenseTcWorkspace {
    ug: Buffer<u16>,
    hg: Buffer<u16>,
    partials: Buffer<f32>,
    tickets: Buffer<i32>,
    num_tickets: usize,
    splits: usize,
}

impl DenseTcWorkspace {
    fn none(dev: &Device) -> Result<Self> {
        Ok(DenseTcWorkspace {
            ug: dev.zeros(1)?,
            hg: dev.zeros(1)?,
            partials: dev.zeros(1)?,
            tickets: dev.zeros(1)?,
            num_tickets: 0,
            splits: 1,
        })
    }

    /// For `T` tokens of `shape`: the split of the sums over `T` gives about two blocks per
    /// multiprocessor over the smaller of the dA and dB grids, each split at least 4 steps of 32
    /// tokens, at most 32 splits.
    fn new(dev: &Device, t: usize, shape: &LoraShape) -> Result<Self> {
        let c = shape.num_experts * shape.rank;
        let n = checked_i32("num_tokens * E·r", t, c)?;
        let tiles = |m: usize, n: usize| m.div_ceil(64) * n.div_ceil(64);
        let num_tickets = tiles(c, shape.d_in).max(tiles(shape.d_out, c));
        let fewest = (c.div_ceil(64) * shape.d_in.div_ceil(128))
            .min(shape.d_out.div_ceil(64) * c.div_ceil(128))
            .max(1);
        let splits = split_k_factor(multiprocessors(dev), fewest, t.div_ceil(32), 4, 32);
        let plane = checked_i32("E·r * max(d_in, d_out)", c, shape.d_in.max(shape.d_out))?;
        let partials = if splits > 1 {
            checked_i32("splits * E·r * max(d_in, d_out)", splits, plane)?
        } else {
            1
        };
        Ok(DenseTcWorkspace {
            ug: dev.zeros(n + 8)?,
            hg: dev.zeros(n + 8)?,
            partials: dev.zeros(partials)?,
            tickets: dev.zeros(num_tickets.max(1))?,
            num_tickets,
            splits,
        })
    }
}

/// Device addresses of a [`DeviceLoraGrads`]' buffers, bound to one launch.
struct GradPtrs {
    u: *mut f32,
    da: *mut f32,
    db: *mut f32,
    dx: *mut f32,
    dw: *mut f32,
    ug: *mut u16,
    hg: *mut u16,
    partials: *mut f32,
    tickets: *mut i32,
}

impl DeviceLoraGrads {
    /// Binds the workspace and the four gradient buffers to a launch that writes them.
    fn bind<'a>(&'a mut self, l: &mut Launch<'a>) -> Result<GradPtrs> {
        Ok(GradPtrs {
            u: l.output_any("gradient workspace u", &mut self.u)?,
            da: l.output_any("dA buffer", &mut self.da)?,
            db: l.output_any("dB buffer", &mut self.db)?,
            dx: l.output_any("dx buffer", &mut self.dx)?,
            dw: l.output_any("dw buffer", &mut self.dw)?,
            ug: l.output_any("dense-gated backward workspace G⊙U", &mut self.tc.ug)?,
            hg: l.output_any("dense-gated backward workspace G⊙H", &mut self.tc.hg)?,
            partials: l.output_any("dense-gated backward partials", &mut self.tc.partials)?,
            tickets: l.output_any("dense-gated backward tickets", &mut self.tc.tickets)?,
        })
    }

    pub fn new(dev: &Device, num_tokens: usize, k_max: usize, shape: &LoraShape) -> Result<Self> {
        let slots = checked_i32("num_tokens * k_max", num_tokens, k_max)?;
        Ok(DeviceLoraGrads {
            num_tokens,
            k_max,
            shape: *shape,
            dense_gated: false,
            da: dev.zeros(shape.a_len() + 1)?,
            db: dev.zeros(shape.b_len() + 1)?,
            dx: dev.zeros(num_tokens * shape.d_in + 1)?,
            dw: dev.zeros(slots + 1)?,
            u: dev.zeros(slots * shape.rank + 1)?,
            tc: DenseTcWorkspace::none(dev)?,
        })
    }

    /// Buffers for [`lora_backward_dense_gated`] (and [`lora_backward_experts`]): the workspace holds
    /// `U` `[T, E·r]` and the per-token expert gate `[T, E]`. `E·r` must be at most
    /// [`super::DENSE_GATED_MAX_COLUMNS`].
    pub fn new_dense_gated(
        dev: &Device,
        num_tokens: usize,
        k_max: usize,
        shape: &LoraShape,
    ) -> Result<Self> {
        let columns = shape.num_experts * shape.rank;
        if columns > super::DENSE_GATED_MAX_COLUMNS {
            return Err(Error::Unsupported {
                op: "lora_backward_dense_gated",
                what: format!(
                    "E·r = {columns} (the dense-gated path takes up to {}; use the segmented path)",
                    super::DENSE_GATED_MAX_COLUMNS
                ),
            });
        }
        let slots = checked_i32("num_tokens * k_max", num_tokens, k_max)?;
        checked_i32("num_tokens * d_in", num_tokens, shape.d_in)?;
        let dense = checked_i32(
            "num_tokens * (E·r + E)",
            num_tokens,
            columns + shape.num_experts,
        )?;
        Ok(DeviceLoraGrads {
            num_tokens,
            k_max,
            shape: *shape,
            dense_gated: true,
            da: dev.zeros(shape.a_len() + 1)?,
            db: dev.zeros(shape.b_len() + 1)?,
            dx: dev.zeros(num_tokens * shape.d_in + 1)?,
            dw: dev.zeros(slots + 1)?,
            u: dev.zeros(dense.max(slots * shape.rank) + 1)?,
            tc: DenseTcWorkspace::new(dev, num_tokens, shape)?,
        })
    }

    /// `dA` `[E, r, d_in]` on the device.
    pub fn da(&self) -> BufferView<'_, f32> {
        self.da.prefix(self.shape.a_len())
    }
    /// `dB` `[E, d_out, r]` on the device.
    pub fn db(&self) -> BufferView<'_, f32> {
        self.db.prefix(self.shape.b_len())
    }
    /// `dx` through the experts `[T, d_in]` on the device.
    pub fn dx(&self) -> BufferView<'_, f32> {
        self.dx.prefix(self.num_tokens * self.shape.d_in)
    }
    /// `dw` `[T, k_max]` on the device.
    pub fn dw(&self) -> BufferView<'_, f32> {
        self.dw.prefix(self.num_tokens * self.k_max)
    }

    /// Bytes of device memory these buffers hold (gradients and the `u` workspace), allocated once
    /// by [`DeviceLoraGrads::new`]; [`lora_backward_experts`] allocates nothing per call.
    pub fn device_bytes(&self) -> usize {
        std::mem::size_of::<f32>()
            * (self.da.len()
                + self.db.len()
                + self.dx.len()
                + self.dw.len()
                + self.u.len()
                + self.tc.partials.len()
                + self.tc.tickets.len())
            + std::mem::size_of::<u16>() * (self.tc.ug.len() + self.tc.hg.len())
    }

    /// Copies the gradients to the host (waits for the stream).
    pub fn to_host(&self, dev: &Device) -> Result<LoraGrads<f32>> {
        Ok(LoraGrads {
            da: dev.download(&self.da())?,
            db: dev.download(&self.db())?,
            dx: dev.download(&self.dx())?,
            dw: dev.download(&self.dw())?,
        })
    }
}

/// Gradients of the LoRA part given `dy` `[T, d_out]`, with the forward's plan and its sorted
/// shrink `h` `[T·k_max, r]` (from [`super::shrink_experts`]): `dA`, `dB` (per-expert reductions over
/// the expert's pairs in sorted order), `dx` through the experts and `dw`, into `grads`. Formulas
/// as in [`crate::cpu::backward::lora_backward`]; deterministic, asynchronous.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_experts<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    plan: &DevicePlan,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    h: &impl DeviceRead<f32>,
    dy: &impl DeviceRead<T>,
    scale: f32,
    grads: &mut DeviceLoraGrads,
) -> Result<()> {
    const OP: &str = "lora_backward_experts";
    check_scale(scale)?;
    let (t, k) = (plan.num_tokens(), plan.k_max());
    check_len(
        "experts of the plan vs shape.num_experts",
        shape.num_experts,
        plan.num_experts(),
    )?;
    check_len("gradient buffers: tokens", t, grads.num_tokens)?;
    check_len("gradient buffers: k_max", k, grads.k_max)?;
    if grads.shape != *shape {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "gradient buffers made for {:?}, called with {shape:?}",
                grads.shape
            ),
        });
    }
    if t > 65535 || shape.num_experts > 65535 {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "{t} tokens / {} experts (the backward grid takes up to 65535 each)",
                shape.num_experts
            ),
        });
    }
    let mut l = Launch::new(dev, OP);
    let x = l.input("x [T, d_in]", x, t * shape.d_in)?;
    let a = l.input("A [E, r, d_in]", a, shape.a_len())?;
    let b = l.input("B [E, d_out, r]", b, shape.b_len())?;
    let ids = l.input("routing ids [T, k_max]", ids, t * k)?;
    let weights = l.input("routing weights [T, k_max]", weights, t * k)?;
    let h = l.input("h [T * k_max, r]", h, t * k * shape.rank)?;
    let dy = l.input("dy [T, d_out]", dy, t * shape.d_out)?;
    let (expert_offsets, sorted_slots) = plan.bind_sorted(&mut l)?;
    let slot_to_sorted = plan.bind_inverse(&mut l)?;
    let GradPtrs {
        u, da, db, dx, dw, ..
    } = grads.bind(&mut l)?;
    let args = ffi::molora_lora_backward_args {
        x: x.cast(),
        a: a.cast(),
        b: b.cast(),
        dy: dy.cast(),
        h,
        ids,
        weights,
        expert_offsets,
        sorted_slots,
        slot_to_sorted,
        u,
        da,
        db,
        dx,
        dw,
        scale,
        num_tokens: t as i32,
        k_max: k as i32,
        num_experts: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_in: shape.d_in as i32,
        d_out: shape.d_out as i32,
    };
    // SAFETY: every input has the length checked above; the plan was built for this T, k_max and E
    // (its sorted slots index the routing, its positions index h and u); the gradient buffers were
    // allocated for this T, k_max and shape. Grid dimensions were checked against 65535.
    unsafe { l.run(&T::LORA_BACKWARD, &args) }
}

/// Gradients of the dense-gated LoRA forward ([`super::lora_dense_gated`]) given `dy` `[T, d_out]`,
/// without dispatch: from the forward's all-experts shrink `H` `[T, E·r]` (held by `ws` after the
/// forward ran) and its routing `ids`/`weights` `[T, k_max]`, writes `dA`, `dB`, `dx` (through the
/// experts) and `dw` into `grads` (made by [`DeviceLoraGrads::new_dense_gated`]). The same
/// gradients as [`crate::cpu::backward::lora_backward`]; deterministic (each output summed by one
/// thread in a fixed order), asynchronous. Memory: the `[T, E·r]` intermediates `H` (the forward's)
/// and `U = dy·B_all` are kept, never `[T, E, d]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward_dense_gated<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    k_max: usize,
    ws: &super::DenseGatedWorkspace,
    dy: &impl DeviceRead<T>,
    scale: f32,
    grads: &mut DeviceLoraGrads,
) -> Result<()> {
    const OP: &str = "lora_backward_dense_gated";
    check_scale(scale)?;
    let t = ws.num_tokens;
    let columns = shape.num_experts * shape.rank;
    check_len("workspace columns (E * r)", columns, ws.columns)?;
    check_len("gradient buffers: tokens", t, grads.num_tokens)?;
    check_len("gradient buffers: k_max", k_max, grads.k_max)?;
    if grads.shape != *shape || !grads.dense_gated {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "gradient buffers made for {:?}{}, called with {shape:?} (use DeviceLoraGrads::new_dense_gated)",
                grads.shape,
                if grads.dense_gated { "" } else { " by DeviceLoraGrads::new" }
            ),
        });
    }
    checked_i32("T * d_out", t, shape.d_out)?;
    let mut l = Launch::new(dev, OP);
    let x = l.input("x [T, d_in]", x, t * shape.d_in)?;
    let a = l.input("A [E, r, d_in]", a, shape.a_len())?;
    let b = l.input("B [E, d_out, r]", b, shape.b_len())?;
    let ids = l.input("routing ids [T, k_max]", ids, t * k_max)?;
    let weights = l.input("routing weights [T, k_max]", weights, t * k_max)?;
    let dy = l.input("dy [T, d_out]", dy, t * shape.d_out)?;
    let h = l.input_any("dense-gated workspace h", &ws.h)?;
    // Tensor cores where they apply: the forward's conditions on x, A, B, and d_out a multiple of
    // 8 with dy aligned too.
    let tc = shape.d_out % 8 == 0 && dense_gated_tc_refusal::<T>(shape, &[x, a, b, dy]).is_none();
    let (splits, num_tickets) = (grads.tc.splits, grads.tc.num_tickets);
    let GradPtrs {
        u,
        da,
        db,
        dx,
        dw,
        ug,
        hg,
        partials,
        tickets,
    } = grads.bind(&mut l)?;
    let args = ffi::molora_lora_backward_dense_args {
        x: x.cast(),
        a: a.cast(),
        b: b.cast(),
        dy: dy.cast(),
        h,
        ids,
        weights,
        u,
        // The gate [T, E] follows U [T, E·r] in the workspace; wrapping_add keeps this safe code.
        gate: u.wrapping_add(t * columns),
        da,
        db,
        dx,
        dw,
        scale,
        num_tokens: t as i32,
        k_max: k_max as i32,
        num_experts: shape.num_experts as i32,
        rank: shape.rank as i32,
        d_in: shape.d_in as i32,
        d_out: shape.d_out as i32,
        ug: if tc { ug.cast() } else { std::ptr::null_mut() },
        hg: hg.cast(),
        partials: if splits > 1 {
            partials
        } else {
            std::ptr::null_mut()
        },
        tickets,
        num_tickets: num_tickets as i32,
        splits: splits as i32,
    };
    // SAFETY: x holds T·d_in, A E·r·d_in, B E·d_out·r, dy T·d_out, ids/weights T·k_max elements
    // (checked); with tensor cores (f16/bf16, dims and alignment checked above) the buffers of
    // new_dense_gated hold G⊙U and G⊙H [T, E·r], `splits` partial planes of E·r·max(d_in, d_out)
    // floats and num_tickets zeroed tickets (the kernels leave them zero); the workspace's H holds T·E·r floats (made for this T and E·r, checked); the
    // gradient buffers were made by new_dense_gated for this T, k_max and shape, so u holds
    // T·(E·r + E) floats (U, then the gate at offset T·E·r) and dA, dB, dx, dw their sizes. E·r is
    // at most DENSE_GATED_MAX_COLUMNS (checked when the buffers were made). The kernels skip ids
    // outside [0, E). The launch orders every buffer on the device.
    unsafe { l.run(&T::LORA_BACKWARD_DENSE, &args) }
}

/// Gating backward on the GPU, the counterpart of [`crate::cpu::backward::gate_backward`] followed by
/// [`crate::cpu::backward::softmax_backward`] / [`crate::cpu::backward::sigmoid_backward`]: from the
/// forward's logits `[T, E]`, its routing `ids` `[T, k_max]` and `dw = ∂L/∂w` `[T, k_max]`, writes
/// `dz = ∂L/∂logits` `[T, E]` and, for a threshold gate, `dτ` `[T]`. For a forward with a
/// hierarchical combination use [`gating_backward_hierarchical`].
#[allow(clippy::too_many_arguments)]
pub fn gating_backward(
    dev: &Device,
    logits: &impl DeviceRead<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: crate::gate::Activation,
    temperature: f32,
    gate: &super::DeviceGate<'_>,
    ids: &impl DeviceRead<i32>,
    dw: &impl DeviceRead<f32>,
    dz: &mut impl DeviceWrite<f32>,
    dtau: Option<&mut dyn DeviceWrite<f32>>,
) -> Result<()> {
    gating_backward_impl(
        dev,
        logits,
        num_tokens,
        num_experts,
        Some(act),
        temperature,
        None,
        gate,
        ids,
        dw,
        dz,
        dtau,
        None,
    )
}

/// Backward of [`super::gate_probabilities`], the counterpart of
/// [`crate::cpu::backward::gate_backward`]: from the forward's probabilities `probs` `[T, E]`, its
/// routing `ids` `[T, k_max]` and `dw` `[T, k_max]`, writes `dp = ∂L/∂p` `[T, E]` and, for a
/// threshold gate, `dτ` `[T]`. Selection is not differentiated.
#[allow(clippy::too_many_arguments)]
pub fn gate_probabilities_backward(
    dev: &Device,
    probs: &impl DeviceRead<f32>,
    num_tokens: usize,
    num_experts: usize,
    gate: &super::DeviceGate<'_>,
    ids: &impl DeviceRead<i32>,
    dw: &impl DeviceRead<f32>,
    dp: &mut impl DeviceWrite<f32>,
    dtau: Option<&mut dyn DeviceWrite<f32>>,
) -> Result<()> {
    gating_backward_impl(
        dev,
        probs,
        num_tokens,
        num_experts,
        None,
        1.0,
        None,
        gate,
        ids,
        dw,
        dp,
        dtau,
        None,
    )
}

/// Where [`gating_backward_hierarchical`] writes `dλ` of a λ-mix: `per_token` `[T]` receives each
/// token's `dλ_t = Σ_e dp_te·(g_se − l_te)`, `total` `[1]` their sum `Σ_t dλ_t`, formed by one block
/// in a fixed order (deterministic).
pub struct DlambdaOut<'a> {
    pub per_token: &'a mut dyn DeviceWrite<f32>,
    pub total: &'a mut dyn DeviceWrite<f32>,
}

impl std::fmt::Debug for DlambdaOut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlambdaOut")
            .field("per_token_len", &self.per_token.len())
            .field("total_len", &self.total.len())
            .finish()
    }
}

/// Gating backward through a hierarchical combination (HDMoLE) on the GPU: as [`gating_backward`]
/// for a forward run by [`super::gating`] with `Some(hierarchy)`. The local probabilities `l` are
/// recomputed from the logits and combined with the sequence's global posterior `g` exactly as the
/// forward did; `dp` of the combined `p` (through the gate) goes through the combination to `dl`, and
/// `dz` is the activation's backward at `l`:
///
/// * λ-mix `p = λ·g + (1 − λ)·l`: `dl = (1 − λ)·dp`, and `dλ = Σ_t Σ_e dp_te·(g_se − l_te)` into
///   `dlambda` when given (the counterpart of [`crate::cpu::backward::mix_combine_backward`]);
/// * product `p = g ⊙ l / Σ(g ⊙ l)`: `dl = g ⊙ (dp − ⟨dp, p⟩)/Σ(g ⊙ l)`, or `dl = dp` for a row
///   whose sum is 0 (the counterpart of [`crate::cpu::backward::product_combine_backward`]); a
///   `dlambda` given here receives zeros.
///
/// The global posterior is a constant (a frozen classifier's output): it gets no gradient.
#[allow(clippy::too_many_arguments)]
pub fn gating_backward_hierarchical(
    dev: &Device,
    logits: &impl DeviceRead<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: crate::gate::Activation,
    temperature: f32,
    hierarchy: (&super::DeviceSeqRouting, crate::gate::HierarchicalCombine),
    gate: &super::DeviceGate<'_>,
    ids: &impl DeviceRead<i32>,
    dw: &impl DeviceRead<f32>,
    dz: &mut impl DeviceWrite<f32>,
    dtau: Option<&mut dyn DeviceWrite<f32>>,
    dlambda: Option<DlambdaOut<'_>>,
) -> Result<()> {
    gating_backward_impl(
        dev,
        logits,
        num_tokens,
        num_experts,
        Some(act),
        temperature,
        Some(hierarchy),
        gate,
        ids,
        dw,
        dz,
        dtau,
        dlambda,
    )
}

#[allow(clippy::too_many_arguments)]
fn gating_backward_impl(
    dev: &Device,
    logits: &impl DeviceRead<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: Option<crate::gate::Activation>,
    temperature: f32,
    hierarchy: Option<(&super::DeviceSeqRouting, crate::gate::HierarchicalCombine)>,
    gate: &super::DeviceGate<'_>,
    ids: &impl DeviceRead<i32>,
    dw: &impl DeviceRead<f32>,
    dz: &mut impl DeviceWrite<f32>,
    dtau: Option<&mut dyn DeviceWrite<f32>>,
    dlambda: Option<DlambdaOut<'_>>,
) -> Result<()> {
    use super::DeviceGate;
    use crate::gate::HierarchicalCombine;
    const OP: &str = "gating_backward";
    crate::gate::check_temperature(temperature)?;
    if num_experts == 0 || num_experts > super::MAX_GATING_EXPERTS {
        return Err(Error::Unsupported {
            op: OP,
            what: format!("{num_experts} experts (1..={})", super::MAX_GATING_EXPERTS),
        });
    }
    let k_max = gate.k_max(num_experts);
    if let DeviceGate::TopK { k, .. } = gate {
        crate::gate::check_k(*k, num_experts)?;
    }
    if let Some((g, combine)) = &hierarchy {
        g.check_for(*combine, num_tokens, num_experts)?;
    }
    let n_logits = checked_i32("num_tokens * num_experts", num_tokens, num_experts)?;
    let mut l = Launch::new(dev, OP);
    let logits = l.input("logits [T, E]", logits, n_logits)?;
    let dz = l.output("dz [T, E]", dz, n_logits)?;
    let ids = l.input("routing ids [T, k_max]", ids, num_tokens * k_max)?;
    let dw = l.input("dw [T, k_max]", dw, num_tokens * k_max)?;
    let taus = match gate {
        DeviceGate::ThresholdPerToken(t) => l.input("taus [T]", t, num_tokens)?,
        _ => std::ptr::null(),
    };
    let dtau = match dtau {
        Some(d) => l.output("dtau [T]", d, num_tokens)?,
        None => std::ptr::null_mut(),
    };
    let (dlambda_tokens, dlambda_total, has_dlambda) = match dlambda {
        Some(d) => (
            l.output("dλ per token [T]", d.per_token, num_tokens)?,
            l.output("dλ total [1]", d.total, 1)?,
            true,
        ),
        None => (std::ptr::null_mut(), std::ptr::null_mut(), false),
    };
    let global = match &hierarchy {
        Some((g, _)) => Some(g.bind(&mut l)?),
        None => None,
    };
    if num_tokens == 0 && !has_dlambda {
        return Ok(());
    }
    let (combine, lambda) = match hierarchy.map(|h| h.1) {
        None => (ffi::MOLORA_COMBINE_NONE, 0.0),
        Some(HierarchicalCombine::Mix { lambda }) => (ffi::MOLORA_COMBINE_MIX, lambda),
        Some(HierarchicalCombine::Product) => (ffi::MOLORA_COMBINE_PRODUCT, 0.0),
    };
    let (kind, renormalize, tau) = match gate {
        DeviceGate::TopK { renormalize, .. } => (ffi::MOLORA_GATE_TOPK, *renormalize, 0.0),
        DeviceGate::Threshold(tau) => (ffi::MOLORA_GATE_THRESHOLD, false, *tau),
        DeviceGate::ThresholdPerToken(_) => (ffi::MOLORA_GATE_THRESHOLD, false, 0.0),
        DeviceGate::Dense => (ffi::MOLORA_GATE_DENSE, false, 0.0),
    };
    let args = ffi::molora_gating_backward_args {
        logits,
        ids,
        dw,
        dz,
        dtau,
        taus,
        tau,
        num_tokens: num_tokens as i32,
        num_experts: num_experts as i32,
        k_max: k_max as i32,
        activation: activation_code(act),
        temperature,
        gate: kind as i32,
        renormalize: renormalize as i32,
        combine: combine as i32,
        lambda,
        global_probs: global.map_or(std::ptr::null(), |g| g.1),
        seq_offsets: global.map_or(std::ptr::null(), |g| g.0),
        num_seqs: global.map_or(0, |g| g.2 as i32),
        dlambda_tokens,
        dlambda: dlambda_total,
    };
    // SAFETY: logits and dz hold T·E, ids and dw T·k_max, taus, dtau and dλ per token T elements,
    // the dλ total 1 (checked); E is within the kernel's shared-memory limit; the global posterior was
    // uploaded whole from a validated SeqRouting of E experts whose segments cover exactly T rows, so
    // every token finds its sequence; λ is in [0, 1] (check_combine). The launch orders every
    // buffer on the device.
    unsafe { l.run(&GATING_BACKWARD, &args) }
}

/// Backward of SAML's weight-space mixing ([`super::mix_experts`]) on the GPU, deterministic: with
/// `Ā_s = Σ_e p_se·A_e`, `B̄_s = Σ_e p_se·B_e` and the gradients `dĀ` `[S, r, d_in]`, `dB̄`
/// `[S, d_out, r]` (f32), writes `dA_e = Σ_s p_se·dĀ_s` `[E, r, d_in]`, `dB_e = Σ_s p_se·dB̄_s`
/// `[E, d_out, r]` (sequences in order) and `dp_se = ⟨dĀ_s, A_e⟩ + ⟨dB̄_s, B_e⟩` `[S, E]` (a
/// fixed-order reduction per `(s, e)`), all f32. The counterpart of
/// [`crate::cpu::backward::mix_backward`] applied per sequence, its `dA`, `dB` summed over sequences.
#[allow(clippy::too_many_arguments)]
pub fn mix_backward<T: CudaElement>(
    dev: &Device,
    a: &impl DeviceRead<T>,
    b: &impl DeviceRead<T>,
    shape: &LoraShape,
    probs: &impl DeviceRead<f32>,
    num_seqs: usize,
    d_a_mixed: &impl DeviceRead<f32>,
    d_b_mixed: &impl DeviceRead<f32>,
    da: &mut impl DeviceWrite<f32>,
    db: &mut impl DeviceWrite<f32>,
    dp: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    const OP: &str = "mix_backward";
    let e = shape.num_experts;
    let per_a = shape.rank * shape.d_in;
    let per_b = shape.d_out * shape.rank;
    if num_seqs > 65535 || e > 65535 {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "{num_seqs} sequences / {e} experts (the mixing backward grid takes up to 65535 each)"
            ),
        });
    }
    let mut l = Launch::new(dev, OP);
    let a = l.input("A [E, r, d_in]", a, shape.a_len())?;
    let b = l.input("B [E, d_out, r]", b, shape.b_len())?;
    let probs = l.input("probs [S, E]", probs, num_seqs * e)?;
    let da_mixed = l.input("dĀ [S, r, d_in]", d_a_mixed, num_seqs * per_a)?;
    let db_mixed = l.input("dB̄ [S, d_out, r]", d_b_mixed, num_seqs * per_b)?;
    let da = l.output("dA [E, r, d_in]", da, shape.a_len())?;
    let db = l.output("dB [E, d_out, r]", db, shape.b_len())?;
    let dp = l.output("dp [S, E]", dp, num_seqs * e)?;
    let args = ffi::molora_mix_backward_args {
        a: a.cast(),
        b: b.cast(),
        probs,
        da_mixed,
        db_mixed,
        da,
        db,
        dp,
        num_experts: e as i32,
        num_seqs: num_seqs as i32,
        per_a: per_a as i64,
        per_b: per_b as i64,
    };
    // SAFETY: A, dA hold E·r·d_in, B, dB E·d_out·r, probs and dp S·E, dĀ S·r·d_in and dB̄ S·d_out·r
    // elements (checked); E and S are at most 65535 (grid limits, checked); per_a, per_b >= 1
    // (LoraShape). With S = 0 the kernels write dA = dB = 0 and read no sequence. The launch orders
    // every buffer on the device.
    unsafe { l.run(&T::MIX_BACKWARD, &args) }
}

/// Router backward on the GPU, deterministic (tokens summed in order): `dW_g = dzᵀ·x` `[E, d_in]`,
/// `db = Σ_t dz` `[E]`, and when given `dx = dz·W_g` `[T, d_in]` (written, not accumulated), all
/// f32. The counterpart of [`crate::cpu::backward::router_backward`].
#[allow(clippy::too_many_arguments)]
pub fn router_backward<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    num_tokens: usize,
    d_in: usize,
    w_g: &impl DeviceRead<T>,
    num_experts: usize,
    dz: &impl DeviceRead<f32>,
    dw_g: &mut impl DeviceWrite<f32>,
    db: &mut impl DeviceWrite<f32>,
    dx: Option<&mut dyn DeviceWrite<f32>>,
) -> Result<()> {
    router_backward_impl(
        dev,
        x,
        num_tokens,
        d_in,
        w_g,
        num_experts,
        dz,
        dw_g,
        db,
        dx,
        None,
    )
}

/// The router backward on tensor cores (`MoleLoraForward::backward` keeps one per workspace):
/// `dz` rounded to the element type `[T, E8]` (`E8` = `E` rounded up to 8), the split-T partials
/// of `dW_g` and their tickets.
#[derive(Debug)]
pub(crate) struct RouterTcWorkspace {
    num_tokens: usize,
    d_in: usize,
    num_experts: usize,
    dz_t: Buffer<u16>,
    partials: Buffer<f32>,
    tickets: Buffer<i32>,
    num_tickets: usize,
    splits: usize,
}

impl RouterTcWorkspace {
    /// Bytes of device memory it holds.
    pub(crate) fn device_bytes(&self) -> usize {
        2 * self.dz_t.len() + 4 * (self.partials.len() + self.tickets.len())
    }

    /// For `T` tokens, `d_in` and `E`: splits of the sum over T for about two blocks per
    /// multiprocessor over dW_g's tiles, each at least 4 steps of 32 tokens.
    pub(crate) fn new(dev: &Device, t: usize, d_in: usize, e: usize) -> Result<Self> {
        let e8 = e.div_ceil(8) * 8;
        let n = checked_i32("T * E8", t, e8)?;
        let num_tickets = e.div_ceil(64) * d_in.div_ceil(64);
        let tiles = e.div_ceil(64) * d_in.div_ceil(128);
        let splits = split_k_factor(multiprocessors(dev), tiles, t.div_ceil(32), 4, 32);
        let plane = checked_i32("E * d_in", e, d_in)?;
        Ok(RouterTcWorkspace {
            num_tokens: t,
            d_in,
            num_experts: e,
            dz_t: dev.zeros(n + 8)?,
            partials: dev.zeros(if splits > 1 {
                checked_i32("splits * E * d_in", splits, plane)?
            } else {
                1
            })?,
            tickets: dev.zeros(num_tickets.max(1))?,
            num_tickets,
            splits,
        })
    }
}

/// [`router_backward`], on tensor cores when `tc` is given and applies (f16/bf16, `d_in` a multiple
/// of 8, `x` and `W_g` 16-byte aligned, the workspace made for this T, d_in and E).
#[allow(clippy::too_many_arguments)]
pub(crate) fn router_backward_impl<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    num_tokens: usize,
    d_in: usize,
    w_g: &impl DeviceRead<T>,
    num_experts: usize,
    dz: &impl DeviceRead<f32>,
    dw_g: &mut impl DeviceWrite<f32>,
    db: &mut impl DeviceWrite<f32>,
    dx: Option<&mut dyn DeviceWrite<f32>>,
    tc: Option<&mut RouterTcWorkspace>,
) -> Result<()> {
    const OP: &str = "router_backward";
    if d_in == 0 || num_experts == 0 {
        return Err(Error::InvalidDim {
            what: if d_in == 0 { "d_in" } else { "num_experts" },
            value: 0,
            reason: "must be at least 1",
        });
    }
    let x_len = checked_i32("T * d_in", num_tokens, d_in)?;
    let w_len = checked_i32("E * d_in", num_experts, d_in)?;
    let dz_len = checked_i32("T * E", num_tokens, num_experts)?;
    let mut l = Launch::new(dev, OP);
    let x = l.input("x [T, d_in]", x, x_len)?;
    let w_g = l.input("router W_g [E, d_in]", w_g, w_len)?;
    let dz = l.input("dz [T, E]", dz, dz_len)?;
    let dw_g = l.output("dW_g [E, d_in]", dw_g, w_len)?;
    let db = l.output("db [E]", db, num_experts)?;
    let dx = match dx {
        Some(d) => l.output("dx [T, d_in]", d, x_len)?,
        None => std::ptr::null_mut(),
    };
    let tc = tc.filter(|w| {
        T::DENSE_GATED_TC.is_some()
            && d_in % 8 == 0
            && x as usize % 16 == 0
            && w_g as usize % 16 == 0
            && (w.num_tokens, w.d_in, w.num_experts) == (num_tokens, d_in, num_experts)
    });
    let (dz_t, partials, tickets, num_tickets, splits) = match tc {
        Some(w) => (
            l.output_any("router backward workspace dz_t", &mut w.dz_t)?
                .cast(),
            l.output_any("router backward partials", &mut w.partials)?,
            l.output_any("router backward tickets", &mut w.tickets)?,
            w.num_tickets,
            w.splits,
        ),
        None => (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            1,
        ),
    };
    let args = ffi::molora_router_backward_args {
        x: x.cast(),
        w_g: w_g.cast(),
        dz,
        dw_g,
        db,
        dx,
        num_tokens: num_tokens as i32,
        d_in: d_in as i32,
        num_experts: num_experts as i32,
        dz_t,
        partials: if splits > 1 {
            partials
        } else {
            std::ptr::null_mut()
        },
        tickets,
        num_tickets: num_tickets as i32,
        splits: splits as i32,
    };
    // SAFETY: every buffer has the length checked above and all products fit an i32; with tensor
    // cores the workspace was made for this T, d_in and E (checked: T·E8 elements of dz_t, `splits`
    // planes of E·d_in floats, num_tickets zeroed tickets the kernels leave zero) and the dtype,
    // d_in and alignment conditions were checked; the launch orders them on the device.
    unsafe { l.run(&T::ROUTER_BACKWARD, &args) }
}
