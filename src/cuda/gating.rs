//! Gating on the GPU (`cuda/gating.cu`): router logits (with the input-dependent threshold), and one
//! fused kernel for activation, hierarchical combination and the gate (top-k, dynamic threshold,
//! dense). GPU counterparts of [`crate::cpu::router_logits`], [`crate::cpu::activate`],
//! [`crate::cpu::hierarchical`], [`crate::cpu::top_k`], [`crate::cpu::threshold_gate`] and
//! [`crate::cpu::dense`].

use super::device::{activation_code, checked_i32, Device};
use super::ffi;
use super::launch::{Kernel, Launch};
use super::lora::CudaElement;
use super::memory::{Buffer, BufferView, DeviceRead, DeviceWrite};
use crate::error::check_len;
use crate::gate::{check_combine, check_k, check_spec, check_temperature};
use crate::gate::{Activation, Gate, HierarchicalCombine, ThresholdSpec};
use crate::{Error, Result, SeqRouting};

const GATING: Kernel<ffi::molora_gating_args> = kernel!(molora_gating_f32, molora_emu_gating_f32);
const TOPK_GATING: Kernel<ffi::molora_topk_gating_args> =
    kernel!(molora_topk_gating_f32, molora_emu_topk_gating_f32);
const SLOTS_TO_DENSE: Kernel<ffi::molora_slots_dense_args> =
    kernel!(molora_slots_to_dense_f32, molora_emu_slots_to_dense_f32);
const DENSE_TO_SLOTS: Kernel<ffi::molora_slots_dense_args> =
    kernel!(molora_dense_to_slots_f32, molora_emu_dense_to_slots_f32);

/// Largest number of experts the gating kernels handle.
pub const MAX_GATING_EXPERTS: usize = ffi::MOLORA_GATING_MAX_EXPERTS as usize;

/// A per-sequence global posterior in device memory (from a validated [`SeqRouting`]).
#[derive(Debug)]
pub struct DeviceSeqRouting {
    pub(crate) num_rows: usize,
    pub(crate) num_seqs: usize,
    pub(crate) num_experts: usize,
    pub(crate) offsets: Buffer<i32>,
    pub(crate) probs: Buffer<f32>,
}

impl DeviceSeqRouting {
    /// Uploads the sequence offsets and the `[S, E]` probabilities (enqueued on the stream).
    pub fn new(dev: &Device, r: &SeqRouting) -> Result<Self> {
        Ok(DeviceSeqRouting {
            num_rows: r.segments().num_rows(),
            num_seqs: r.segments().num_segments(),
            num_experts: r.num_experts(),
            offsets: dev.upload(&r.segments().offsets_i32())?,
            probs: dev.upload(r.probs())?,
        })
    }

    /// The checks of a hierarchical gate over `num_tokens` rows of `num_experts` experts: the
    /// combination is known, and the posterior covers exactly those rows and experts.
    pub(crate) fn check_for(
        &self,
        combine: HierarchicalCombine,
        num_tokens: usize,
        num_experts: usize,
    ) -> Result<()> {
        check_combine(combine)?;
        check_len("global posterior experts", num_experts, self.num_experts)?;
        check_len("global posterior segment rows", num_tokens, self.num_rows)
    }

    /// Device addresses of the offsets `[S + 1]` and probabilities `[S, E]`, for a launch that reads
    /// them, and the number of sequences `S`.
    pub(crate) fn bind<'a>(
        &'a self,
        l: &mut Launch<'a>,
    ) -> Result<(*const i32, *const f32, usize)> {
        Ok((
            l.input_any("global posterior offsets", &self.offsets)?,
            l.input_any("global posterior probabilities", &self.probs)?,
            self.num_seqs,
        ))
    }
}

/// The gate of [`gating`], with the threshold in the form the kernel takes.
#[derive(Debug)]
pub enum DeviceGate<'a> {
    TopK {
        k: usize,
        renormalize: bool,
    },
    /// One `τ` for every token (a fixed or learned threshold).
    Threshold(f32),
    /// Per-token `τ` `[T]` (the input-dependent threshold, from [`router_logits`]).
    ThresholdPerToken(BufferView<'a, f32>),
    Dense,
}

impl DeviceGate<'static> {
    /// The device form of a CPU [`Gate`]: a learned threshold becomes `σ(θ)/E`, computed exactly as
    /// the CPU does. An input-dependent threshold needs per-token values from [`router_logits`]
    /// ([`DeviceGate::ThresholdPerToken`]) and is refused here.
    pub fn from_gate(gate: &Gate, num_experts: usize) -> Result<Self> {
        Ok(match gate {
            Gate::TopK { k, renormalize } => DeviceGate::TopK {
                k: *k,
                renormalize: *renormalize,
            },
            Gate::Dense => DeviceGate::Dense,
            Gate::Threshold(spec) => match spec.uniform_tau(num_experts)? {
                Some(tau) => DeviceGate::Threshold(tau),
                None => {
                    return Err(Error::Unsupported {
                        op: "DeviceGate::from_gate",
                        what: "an input-dependent threshold: compute per-token taus with \
                               cuda::router_logits and pass DeviceGate::ThresholdPerToken"
                            .into(),
                    })
                }
            },
        })
    }
}

impl DeviceGate<'_> {
    /// Slots per token of the routing this gate writes (`k` for top-k, `E` otherwise).
    pub fn k_max(&self, num_experts: usize) -> usize {
        match self {
            DeviceGate::TopK { k, .. } => *k,
            _ => num_experts,
        }
    }
}

fn check_experts(op: &'static str, num_experts: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::InvalidDim {
            what: "num_experts",
            value: 0,
            reason: "need at least one expert",
        });
    }
    if num_experts > MAX_GATING_EXPERTS {
        return Err(Error::Unsupported {
            op,
            what: format!(
                "{num_experts} experts (the gating kernels handle up to {MAX_GATING_EXPERTS})"
            ),
        });
    }
    Ok(())
}

/// Fused gating from router logits `[T, E]`: activation with temperature, optional hierarchical
/// combination with a per-sequence global posterior, and the gate; writes `ids`/`weights`
/// `[T, k_max]` (`k_max` = [`DeviceGate::k_max`]). Asynchronous on `dev`'s stream.
///
/// Logits cannot be checked for NaN without waiting for the device; a non-finite row gives empty
/// slots (id `-1`, weight 0) instead of the CPU path's [`Error::NonFinite`].
#[allow(clippy::too_many_arguments)]
pub fn gating(
    dev: &Device,
    logits: &impl DeviceRead<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: Activation,
    temperature: f32,
    hierarchy: Option<(&DeviceSeqRouting, HierarchicalCombine)>,
    gate: &DeviceGate<'_>,
    ids: &mut impl DeviceWrite<i32>,
    weights: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    gating_impl(
        dev,
        logits,
        num_tokens,
        num_experts,
        Some(act),
        temperature,
        hierarchy,
        gate,
        ids,
        weights,
    )
}

/// The gate alone, over probabilities a framework already computed: `probs` `[T, E]` (in `[0, 1]`)
/// to `ids`/`weights` `[T, k_max]` (`k_max` = [`DeviceGate::k_max`]), the GPU counterpart of
/// [`crate::cpu::top_k`], [`crate::cpu::threshold_gate`] and the dense gate on `probs`. Asynchronous.
///
/// The device cannot report bad probabilities without a host sync: a NaN row gives empty slots, and
/// a negative value is never selected (the CPU path returns an error for both).
#[allow(clippy::too_many_arguments)]
pub fn gate_probabilities(
    dev: &Device,
    probs: &impl DeviceRead<f32>,
    num_tokens: usize,
    num_experts: usize,
    gate: &DeviceGate<'_>,
    ids: &mut impl DeviceWrite<i32>,
    weights: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    gating_impl(
        dev,
        probs,
        num_tokens,
        num_experts,
        None,
        1.0,
        None,
        gate,
        ids,
        weights,
    )
}

/// [`gating`] with the activation as the kernel takes it: `None` when the input holds probabilities.
#[allow(clippy::too_many_arguments)]
fn gating_impl(
    dev: &Device,
    logits: &impl DeviceRead<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: Option<Activation>,
    temperature: f32,
    hierarchy: Option<(&DeviceSeqRouting, HierarchicalCombine)>,
    gate: &DeviceGate<'_>,
    ids: &mut impl DeviceWrite<i32>,
    weights: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    const OP: &str = "gating";
    check_experts(OP, num_experts)?;
    let n_logits = checked_i32("num_tokens * num_experts", num_tokens, num_experts)?;
    let n_slots = num_tokens * gate.k_max(num_experts);
    let mut l = Launch::new(dev, OP);
    let logits = l.input("logits [T, E]", logits, n_logits)?;
    let ids = l.output("ids [T, k_max]", ids, n_slots)?;
    let weights = l.output("weights [T, k_max]", weights, n_slots)?;
    let args = gating_args(
        &mut l,
        GatingPtrs {
            logits,
            ids,
            weights,
        },
        num_tokens,
        num_experts,
        act,
        temperature,
        hierarchy,
        gate,
    )?;
    if num_tokens == 0 {
        return Ok(());
    }
    // SAFETY: logits hold T·E, ids and weights T·k_max elements (checked above; T·E fits an i32);
    // gating_args validated the rest (the global posterior covers exactly T rows with E experts,
    // per-token taus hold T values, 1 <= k <= E <= MAX_GATING_EXPERTS, temperature finite and > 0,
    // λ in [0, 1]). The launch keeps every buffer alive and ordered until it is enqueued.
    unsafe { l.run(&GATING, &args) }
}

/// Device addresses of a gate's logits `[T, E]` (f32) and routing `[T, k_max]`, bound to a launch.
pub(crate) struct GatingPtrs {
    pub(crate) logits: *const f32,
    pub(crate) ids: *mut i32,
    pub(crate) weights: *mut f32,
}

/// The gating kernel's arguments after every check of [`gating`] on its parameters (`E`, the
/// temperature, `k`, `τ`, the per-token `τ`s' length and the hierarchy, which it binds to `l`);
/// the caller has bound and checked the three buffers of `ptrs`. Shared by `gating` and the fused
/// decode of [`super::MoleLoraForward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gating_args<'a>(
    l: &mut Launch<'a>,
    ptrs: GatingPtrs,
    num_tokens: usize,
    num_experts: usize,
    act: Option<Activation>,
    temperature: f32,
    hierarchy: Option<(&'a DeviceSeqRouting, HierarchicalCombine)>,
    gate: &'a DeviceGate<'a>,
) -> Result<ffi::molora_gating_args> {
    check_experts("gating", num_experts)?;
    check_temperature(temperature)?;
    match gate {
        DeviceGate::TopK { k, .. } => check_k(*k, num_experts)?,
        DeviceGate::Threshold(tau) => check_spec(&ThresholdSpec::Fixed(*tau))?,
        DeviceGate::ThresholdPerToken(taus) => check_len("taus [T]", num_tokens, taus.len())?,
        DeviceGate::Dense => {}
    }
    if let Some((g, combine)) = &hierarchy {
        g.check_for(*combine, num_tokens, num_experts)?;
    }
    let global = match &hierarchy {
        Some((g, _)) => Some(g.bind(l)?),
        None => None,
    };
    let taus = match gate {
        DeviceGate::ThresholdPerToken(v) => l.input("taus [T]", v, num_tokens)?,
        _ => std::ptr::null(),
    };
    let (combine, lambda) = match hierarchy.map(|h| h.1) {
        None => (ffi::MOLORA_COMBINE_NONE, 0.0),
        Some(HierarchicalCombine::Mix { lambda }) => (ffi::MOLORA_COMBINE_MIX, lambda),
        Some(HierarchicalCombine::Product) => (ffi::MOLORA_COMBINE_PRODUCT, 0.0),
    };
    let (gate_kind, k, renormalize, tau) = match gate {
        DeviceGate::TopK { k, renormalize } => (ffi::MOLORA_GATE_TOPK, *k, *renormalize, 0.0),
        DeviceGate::Threshold(tau) => (ffi::MOLORA_GATE_THRESHOLD, 0, false, *tau),
        DeviceGate::ThresholdPerToken(_) => (ffi::MOLORA_GATE_THRESHOLD, 0, false, 0.0),
        DeviceGate::Dense => (ffi::MOLORA_GATE_DENSE, 0, false, 0.0),
    };
    Ok(ffi::molora_gating_args {
        logits: ptrs.logits,
        ids: ptrs.ids,
        weights: ptrs.weights,
        num_tokens: num_tokens as i32,
        num_experts: num_experts as i32,
        activation: activation_code(act),
        temperature,
        combine: combine as i32,
        lambda,
        global_probs: global.map_or(std::ptr::null(), |g| g.1),
        seq_offsets: global.map_or(std::ptr::null(), |g| g.0),
        num_seqs: global.map_or(0, |g| g.2 as i32),
        gate: gate_kind as i32,
        k: k as i32,
        renormalize: renormalize as i32,
        taus,
        tau,
    })
}

/// Fused top-k gating from router logits, the GPU counterpart of
/// `cpu::top_k(&cpu::activate(logits, T, E, act, temperature)?, T, E, k, renormalize)`:
///
/// * `p[t, e] = exp((z[t, e] − max_j z[t, j]) / temperature) / Σ_j exp((z[t, j] − max_j z[t, j]) / temperature)`
///   (softmax) or `σ(z[t, e] / temperature)` (sigmoid), in f32;
/// * slot `s` of token `t` holds the `s`-th expert in the order (`p` descending, id ascending): exact
///   ties go to the lower id, as on the CPU;
/// * `weights[t, s] = p`, or with `renormalize` `p / Σ_kept p` (sum in f64; `1/k` each when that sum
///   is 0).
///
/// `logits` `[T, E]`, `ids` and `weights` `[T, k]`: any buffer or view of exactly that length
/// ([`Buffer`], [`BufferView`], [`super::BufferViewMut`], or on a GPU cudarc's `CudaSlice`,
/// `CudaView`, `CudaViewMut`). Asynchronous on `dev`'s stream: nothing is
/// synchronised; `T = 0` enqueues nothing.
///
/// Errors, all before anything is enqueued: `E = 0` ([`Error::InvalidDim`]), `E >`
/// [`MAX_GATING_EXPERTS`] ([`Error::Unsupported`]), `k = 0` or `k > E` ([`Error::InvalidK`]),
/// temperature not finite or `<= 0` ([`Error::InvalidParameter`]), `T·E` beyond `i32`
/// ([`Error::InvalidDim`]), a buffer of the wrong length ([`Error::LengthMismatch`] naming it) or of
/// the other memory kind than the device ([`Error::DeviceMismatch`] naming it), and a failed launch
/// ([`Error::Cuda`]).
///
/// Logits cannot be checked for NaN without waiting for the device; a row holding a NaN gives empty
/// slots (id `-1`, weight 0) instead of the CPU path's [`Error::NonFinite`].
#[allow(clippy::too_many_arguments)]
pub fn top_k_gating(
    dev: &Device,
    logits: &impl DeviceRead<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: Activation,
    temperature: f32,
    k: usize,
    renormalize: bool,
    ids: &mut impl DeviceWrite<i32>,
    weights: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    const OP: &str = "top_k_gating";
    check_experts(OP, num_experts)?;
    check_k(k, num_experts)?;
    check_temperature(temperature)?;
    let n_logits = checked_i32("num_tokens * num_experts", num_tokens, num_experts)?;
    // k <= E, so T·k <= T·E fits as well.
    let n_slots = num_tokens * k;
    let mut l = Launch::new(dev, OP);
    let logits = l.input("logits [T, E]", logits, n_logits)?;
    let ids = l.output("ids [T, k]", ids, n_slots)?;
    let weights = l.output("weights [T, k]", weights, n_slots)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let args = ffi::molora_topk_gating_args {
        logits,
        ids,
        weights,
        num_tokens: num_tokens as i32,
        num_experts: num_experts as i32,
        k: k as i32,
        activation: activation_code(Some(act)),
        temperature,
        renormalize: i32::from(renormalize),
    };
    // SAFETY: the three pointers are live device allocations of exactly the lengths checked above
    // (T·E logits, T·k ids and weights), of the device's memory kind, kept alive and ordered by the
    // launch until it is enqueued; every scalar satisfies the launcher's contract (1 <= k <= E <=
    // MAX_GATING_EXPERTS, 1 <= T and T·E fits an i32, temperature finite and > 0, a valid
    // activation), and `args` outlives the call, which only reads it.
    unsafe { l.run(&TOPK_GATING, &args) }
}

/// Router logits `logits[t, e] = Σ_i x[t, i]·W_g[e, i] + b_g[e]` (`[T, E]` f32), and, when `tau` is
/// given as `(w_τ [d_in], b_τ, taus [T])`, the input-dependent threshold
/// `taus[t] = σ(w_τ·x_t + b_τ)/E`. GPU counterpart of [`crate::cpu::router_logits`] and
/// [`crate::cpu::threshold_values`].
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn router_logits<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    num_tokens: usize,
    d_in: usize,
    w_g: &impl DeviceRead<T>,
    b_g: Option<&dyn DeviceRead<T>>,
    num_experts: usize,
    logits: &mut impl DeviceWrite<f32>,
    tau: Option<(&dyn DeviceRead<f32>, f32, &mut dyn DeviceWrite<f32>)>,
) -> Result<()> {
    const OP: &str = "router_logits";
    if d_in == 0 {
        return Err(Error::InvalidDim {
            what: "d_in",
            value: 0,
            reason: "must be at least 1",
        });
    }
    if num_experts == 0 {
        return Err(Error::InvalidDim {
            what: "num_experts",
            value: 0,
            reason: "need at least one expert",
        });
    }
    let x_len = checked_i32("num_tokens * d_in", num_tokens, d_in)?;
    let w_len = checked_i32("E * d_in", num_experts, d_in)?;
    let logits_len = checked_i32("num_tokens * num_experts", num_tokens, num_experts)?;
    if let Some((_, b, _)) = &tau {
        crate::error::check_finite("threshold b", &[*b])?;
    }
    let mut l = Launch::new(dev, OP);
    let x = l.input("x [T, d_in]", x, x_len)?;
    let w_g = l.input("router W_g [E, d_in]", w_g, w_len)?;
    let b_g = match b_g {
        Some(b) => l.input("router b_g [E]", b, num_experts)?,
        None => std::ptr::null(),
    };
    let logits = l.output("logits [T, E]", logits, logits_len)?;
    let (w_tau, b_tau, taus) = match tau {
        Some((w, b, taus)) => (
            l.input("threshold w [d_in]", w, d_in)?,
            b,
            l.output("taus [T]", taus, num_tokens)?,
        ),
        None => (std::ptr::null(), 0.0, std::ptr::null_mut()),
    };
    if num_tokens == 0 {
        return Ok(());
    }
    let args = ffi::molora_router_logits_args {
        x: x.cast(),
        w_g: w_g.cast(),
        b_g: b_g.cast(),
        logits,
        w_tau,
        b_tau,
        taus,
        num_tokens: num_tokens as i32,
        d_in: d_in as i32,
        num_experts: num_experts as i32,
    };
    // SAFETY: x holds T·d_in, W_g E·d_in, b_g E, logits T·E, w_τ d_in and taus T elements (checked
    // above, all products fit an i32); the launch keeps every buffer alive and ordered.
    unsafe { l.run(&T::ROUTER_LOGITS, &args) }
}

/// Which way [`convert_slots`] runs.
#[derive(Clone, Copy)]
enum Conversion {
    ToDense,
    ToSlots,
}

/// A routing's slots as the dense gate matrix frameworks multiply with:
/// `dense[t, e] = Σ_s [ids[t, s] = e]·slots[t, s]` (every element written, so `dense` needs no
/// zeroing). `ids`, `slots` `[T, k_max]`, `dense` `[T, E]`. Asynchronous.
pub fn slots_to_dense(
    dev: &Device,
    ids: &impl DeviceRead<i32>,
    slots: &impl DeviceRead<f32>,
    num_tokens: usize,
    k_max: usize,
    num_experts: usize,
    dense: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    let dims = (num_tokens, k_max, num_experts);
    convert_slots(dev, ids, slots, dense, dims, Conversion::ToDense)
}

/// The inverse gather: `slots[t, s] = dense[t, ids[t, s]]`, 0 for an empty slot (id `-1`). Turns a
/// framework's gradient of the dense gate matrix into the per-slot `dw` the backward kernels take.
pub fn dense_to_slots(
    dev: &Device,
    ids: &impl DeviceRead<i32>,
    dense: &impl DeviceRead<f32>,
    num_tokens: usize,
    k_max: usize,
    num_experts: usize,
    slots: &mut impl DeviceWrite<f32>,
) -> Result<()> {
    let dims = (num_tokens, k_max, num_experts);
    convert_slots(dev, ids, dense, slots, dims, Conversion::ToSlots)
}

/// Checks the lengths against `(T, k_max, E)` and launches one conversion from `input` (slots for
/// [`Conversion::ToDense`], the dense matrix for [`Conversion::ToSlots`]) into `output`.
fn convert_slots(
    dev: &Device,
    ids: &impl DeviceRead<i32>,
    input: &impl DeviceRead<f32>,
    output: &mut impl DeviceWrite<f32>,
    (num_tokens, k_max, num_experts): (usize, usize, usize),
    way: Conversion,
) -> Result<()> {
    const OP: &str = "slots_to_dense";
    if k_max == 0 || num_experts == 0 {
        return Err(Error::InvalidDim {
            what: if k_max == 0 { "k_max" } else { "num_experts" },
            value: 0,
            reason: "must be at least 1",
        });
    }
    let n_slots = checked_i32("num_tokens * k_max", num_tokens, k_max)?;
    let n_dense = checked_i32("num_tokens * num_experts", num_tokens, num_experts)?;
    let (input_what, input_len, output_what, output_len) = match way {
        Conversion::ToDense => ("slots [T, k_max]", n_slots, "dense [T, E]", n_dense),
        Conversion::ToSlots => ("dense [T, E]", n_dense, "slots [T, k_max]", n_slots),
    };
    let mut l = Launch::new(dev, OP);
    let ids = l.input("ids [T, k_max]", ids, n_slots)?;
    let input = l.input(input_what, input, input_len)?;
    let output = l.output(output_what, output, output_len)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let (slots, dense) = match way {
        Conversion::ToDense => (input.cast_mut(), output),
        Conversion::ToSlots => (output, input.cast_mut()),
    };
    let args = ffi::molora_slots_dense_args {
        ids,
        slots,
        dense,
        num_tokens: num_tokens as i32,
        k_max: k_max as i32,
        num_experts: num_experts as i32,
    };
    // SAFETY: ids and slots hold T·k_max and dense T·E elements (checked; both products fit an i32);
    // the launch keeps the three buffers alive and ordered. The kernels read ids only to compare
    // them or, in range, to index dense's row; they write only `output` (dense for ToDense, slots
    // for ToSlots), which the kernel never reads: the input's pointer is `*mut` only because the
    // argument struct serves both directions.
    let kernel = match way {
        Conversion::ToDense => &SLOTS_TO_DENSE,
        Conversion::ToSlots => &DENSE_TO_SLOTS,
    };
    unsafe { l.run(kernel, &args) }
}
