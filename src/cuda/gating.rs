//! Gating on the GPU: the fused activation + top-k kernel of `cuda/gating.cu`.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::{check_launch, Device};
use super::ffi;
use crate::cpu::Activation;
use crate::error::check_len;
use crate::{Error, Result};

/// Largest number of experts the gating kernels handle.
pub const MAX_GATING_EXPERTS: usize = ffi::MOLORA_GATING_MAX_EXPERTS as usize;

/// Fused top-k gating from router logits, the GPU counterpart of
/// `cpu::top_k(&cpu::activate(logits, T, E, act, temperature)?, T, E, k, renormalize)`:
/// `p = softmax(z / temperature)` (or sigmoid), keep the `k` largest per token in descending order
/// (ties to the lower id), weights `p` or `p / Σ_kept p`.
///
/// `logits` `[T, E]`, `ids` and `weights` `[T, k]`: any cudarc buffer or view (`CudaSlice`,
/// `CudaView`, `CudaViewMut`) of exactly that length. Asynchronous on `dev`'s stream.
///
/// Logits cannot be checked for NaN without waiting for the device; a non-finite row gives empty
/// slots (id `-1`, weight 0) instead of the CPU path's [`Error::NonFinite`].
#[allow(clippy::too_many_arguments)]
pub fn top_k_gating(
    dev: &Device,
    logits: &impl DevicePtr<f32>,
    num_tokens: usize,
    num_experts: usize,
    act: Activation,
    temperature: f32,
    k: usize,
    renormalize: bool,
    ids: &mut impl DevicePtrMut<i32>,
    weights: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    const OP: &str = "top_k_gating";
    if num_experts == 0 {
        return Err(Error::InvalidDim {
            what: "num_experts",
            value: 0,
            reason: "need at least one expert",
        });
    }
    if num_experts > MAX_GATING_EXPERTS {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "{num_experts} experts (the gating kernel handles up to {MAX_GATING_EXPERTS})"
            ),
        });
    }
    if k == 0 || k > num_experts {
        return Err(Error::InvalidK { k, num_experts });
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::InvalidParameter {
            what: "temperature",
            value: temperature,
            reason: "must be finite and > 0",
        });
    }
    let n_logits = num_tokens
        .checked_mul(num_experts)
        .filter(|&n| n <= i32::MAX as usize)
        .ok_or(Error::InvalidDim {
            what: "num_tokens * num_experts",
            value: num_tokens.saturating_mul(num_experts),
            reason: "must fit in an i32",
        })?;
    let n_slots = num_tokens * k;
    check_len("logits [T, E]", n_logits, logits.len())?;
    check_len("ids [T, k]", n_slots, ids.len())?;
    check_len("weights [T, k]", n_slots, weights.len())?;
    if num_tokens == 0 {
        return Ok(());
    }

    let stream = dev.stream();
    let (logits_ptr, _logits_guard) = logits.device_ptr(stream);
    let (ids_ptr, _ids_guard) = ids.device_ptr_mut(stream);
    let (w_ptr, _w_guard) = weights.device_ptr_mut(stream);
    let args = ffi::molora_topk_gating_args {
        logits: logits_ptr as *const f32,
        ids: ids_ptr as *mut i32,
        weights: w_ptr as *mut f32,
        num_tokens: num_tokens as i32,
        num_experts: num_experts as i32,
        k: k as i32,
        activation: match act {
            Activation::Softmax => ffi::MOLORA_ACTIVATION_SOFTMAX as i32,
            Activation::Sigmoid => ffi::MOLORA_ACTIVATION_SIGMOID as i32,
        },
        temperature,
        renormalize: renormalize as i32,
    };
    // SAFETY: the three pointers are live device allocations of the lengths checked above
    // (T·E logits, T·k ids and weights), kept alive and ordered on `stream` by the guards until the
    // launch is enqueued; every scalar was validated (1 <= k <= E <= MAX_GATING_EXPERTS, T·E fits an
    // i32, temperature finite and > 0), which is what the launcher requires.
    let code = unsafe { ffi::molora_topk_gating_f32(&args, dev.raw_stream()) };
    check_launch(OP, code)
}
