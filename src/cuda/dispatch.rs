//! Dispatch on the GPU: the stable counting sort of `cuda/dispatch.cu`, giving exactly the arrays of
//! [`crate::cpu::dispatch()`].

use super::device::{checked_i32, Device};
use super::ffi;
use super::launch::{Kernel, Launch};
use super::lora::CudaElement;
use super::memory::{Buffer, DeviceRead, DeviceWrite};
use crate::error::check_len;
use crate::{DType, DispatchPlan, Error, Result};

const DISPATCH: Kernel<ffi::molora_dispatch_args> = kernel!(molora_dispatch, molora_emu_dispatch);

/// Largest number of experts the dispatch kernels handle.
pub const MAX_DISPATCH_EXPERTS: usize = ffi::MOLORA_DISPATCH_MAX_EXPERTS as usize;

/// A dispatch plan in device memory, for `T` tokens with `k_max` slots and `E` experts: the arrays
/// of [`DispatchPlan`] (`expert_offsets [E + 1]`, `sorted_slots [T·k_max]` with `-1` past the
/// number of pairs, `slot_to_sorted [T·k_max]`) plus the kernels' workspace. Allocate once per shape
/// and reuse: [`dispatch`] writes it without allocating.
#[derive(Debug)]
pub struct DevicePlan {
    num_tokens: usize,
    k_max: usize,
    num_experts: usize,
    // Every buffer holds one element more than it needs, since the driver cannot allocate zero bytes.
    expert_offsets: Buffer<i32>,
    sorted_slots: Buffer<i32>,
    slot_to_sorted: Buffer<i32>,
    workspace: Buffer<i32>,
}

impl DevicePlan {
    /// Allocates a plan for this shape on `dev`.
    pub fn new(dev: &Device, num_tokens: usize, k_max: usize, num_experts: usize) -> Result<Self> {
        if num_experts == 0 || num_experts > MAX_DISPATCH_EXPERTS {
            return Err(Error::Unsupported {
                op: "dispatch",
                what: format!(
                    "{num_experts} experts (the dispatch kernels handle 1..={MAX_DISPATCH_EXPERTS})"
                ),
            });
        }
        if k_max == 0 {
            return Err(Error::InvalidDim {
                what: "k_max",
                value: 0,
                reason: "a routing needs at least one slot per token",
            });
        }
        let slots = num_tokens
            .checked_mul(k_max)
            .filter(|&n| n < i32::MAX as usize)
            .ok_or(Error::InvalidDim {
                what: "num_tokens * k_max",
                value: num_tokens.saturating_mul(k_max),
                reason: "must fit in an i32",
            })?;
        // SAFETY: a pure size computation on validated, non-negative i32 arguments.
        let ws = unsafe { ffi::molora_dispatch_workspace_len(slots as i32, num_experts as i32) };
        Ok(DevicePlan {
            num_tokens,
            k_max,
            num_experts,
            expert_offsets: dev.zeros(num_experts + 2)?,
            sorted_slots: dev.zeros(slots + 1)?,
            slot_to_sorted: dev.zeros(slots + 1)?,
            workspace: dev.zeros(ws.max(0) as usize + 1)?,
        })
    }

    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    pub fn k_max(&self) -> usize {
        self.k_max
    }
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    fn num_slots(&self) -> usize {
        self.num_tokens * self.k_max
    }

    /// Device addresses of `expert_offsets` and `sorted_slots`, for a launch that reads them.
    pub(crate) fn bind_sorted<'a>(
        &'a self,
        l: &mut Launch<'a>,
    ) -> Result<(*const i32, *const i32)> {
        Ok((
            l.input_any("plan expert offsets", &self.expert_offsets)?,
            l.input_any("plan sorted slots", &self.sorted_slots)?,
        ))
    }

    /// Device address of `slot_to_sorted`, for a launch that reads it.
    pub(crate) fn bind_inverse<'a>(&'a self, l: &mut Launch<'a>) -> Result<*const i32> {
        l.input_any("plan slot_to_sorted", &self.slot_to_sorted)
    }

    /// Copies `expert_offsets` `[E + 1]` into `host` (waits for the stream): the host sync that a
    /// caller looping over experts on the host needs (molora's own ops never do this).
    pub fn expert_offsets_to_host(&self, dev: &Device, host: &mut [i32]) -> Result<()> {
        check_len(
            "host expert offsets [E + 1]",
            self.num_experts + 1,
            host.len(),
        )?;
        dev.download_into(&self.expert_offsets.prefix(self.num_experts + 1), host)
    }

    /// Copies the plan to the host (waits for the stream): the same [`DispatchPlan`] the CPU builds.
    pub fn to_host(&self, dev: &Device) -> Result<DispatchPlan> {
        let mut offsets = dev.download(&self.expert_offsets)?;
        offsets.truncate(self.num_experts + 1);
        let pairs = offsets.last().copied().unwrap_or(0).max(0) as usize;
        let mut sorted = dev.download(&self.sorted_slots)?;
        sorted.truncate(pairs.min(self.num_slots()));
        let mut inverse = dev.download(&self.slot_to_sorted)?;
        inverse.truncate(self.num_slots());
        Ok(DispatchPlan {
            num_tokens: self.num_tokens,
            k_max: self.k_max,
            num_experts: self.num_experts,
            expert_offsets: offsets,
            sorted_slots: sorted,
            slot_to_sorted: inverse,
        })
    }
}

/// Builds the dispatch plan of a routing's expert ids `[T, k_max]` (i32, `-1` = empty) into `plan`,
/// asynchronously on `dev`'s stream. The GPU counterpart of [`crate::cpu::dispatch()`]: the same
/// offsets and the same stable order. Ids outside `[-1, E)` cannot be checked without a host sync;
/// the kernels treat them as empty slots.
pub fn dispatch(dev: &Device, ids: &impl DeviceRead<i32>, plan: &mut DevicePlan) -> Result<()> {
    let slots = plan.num_slots();
    let num_experts = plan.num_experts;
    let mut l = Launch::new(dev, "dispatch");
    let ids = l.input("routing ids [T, k_max]", ids, slots)?;
    let expert_offsets = l.output_any("plan expert offsets", &mut plan.expert_offsets)?;
    let sorted_slots = l.output_any("plan sorted slots", &mut plan.sorted_slots)?;
    let slot_to_sorted = l.output_any("plan slot_to_sorted", &mut plan.slot_to_sorted)?;
    let workspace = l.output_any("plan workspace", &mut plan.workspace)?;
    let args = ffi::molora_dispatch_args {
        ids,
        expert_offsets,
        sorted_slots,
        slot_to_sorted,
        workspace,
        num_slots: slots as i32,
        num_experts: num_experts as i32,
    };
    // SAFETY: `ids` holds T·k_max elements (checked above); the plan's buffers were allocated by
    // `DevicePlan::new` for this T, k_max and E (offsets E + 1, slots T·k_max, workspace of
    // `molora_dispatch_workspace_len`), with 1 <= E <= MAX_DISPATCH_EXPERTS and T·k_max < 2^31.
    // The launch keeps every buffer alive and ordered until the kernels are enqueued.
    unsafe { l.run(&DISPATCH, &args) }
}

/// Gathers input rows into the plan's sorted order: `out[p, :] = x[sorted_slots[p] / k_max, :]` for
/// every pair `p < P`; rows of `out` at or past `P` are not written. `x` `[T, d]`, `out`
/// `[T·k_max, d]` (room for every slot, since `P` is only known on the device). The GPU counterpart
/// of [`crate::cpu::gather_rows`]; asynchronous.
pub fn gather_rows<T: CudaElement>(
    dev: &Device,
    x: &impl DeviceRead<T>,
    d: usize,
    plan: &DevicePlan,
    out: &mut impl DeviceWrite<T>,
) -> Result<()> {
    if d == 0 {
        return Err(Error::InvalidDim {
            what: "d",
            value: 0,
            reason: "must be at least 1",
        });
    }
    let slots = plan.num_slots();
    let x_len = checked_i32("T * d", plan.num_tokens, d)?;
    let out_len = checked_i32("T * k_max * d", slots, d)?;
    let mut l = Launch::new(dev, "gather_rows");
    let x = l.input("x [T, d]", x, x_len)?;
    let out = l.output("gathered rows [T * k_max, d]", out, out_len)?;
    let (expert_offsets, sorted_slots) = plan.bind_sorted(&mut l)?;
    if slots == 0 {
        return Ok(());
    }
    let args = ffi::molora_gather_rows_args {
        x: x.cast(),
        out: out.cast(),
        expert_offsets,
        sorted_slots,
        num_slots: slots as i32,
        k_max: plan.k_max as i32,
        num_experts: plan.num_experts as i32,
        d: d as i32,
    };
    // SAFETY: x holds T·d and out T·k_max·d elements (checked, both fit an i32); the plan was
    // allocated for this T and k_max, so its first P sorted slots index slots < T·k_max, whose
    // token (slot / k_max) is < T. The launch orders every buffer on the device.
    unsafe { l.run(&T::GATHER_ROWS, &args) }
}

/// Scatter-combine of per-pair rows back into token order, deterministic:
/// `y[t, :] = round(y[t, :] + scale·Σ_s w_ts·rows[slot_to_sorted[t·k_max + s], :])` over the valid
/// slots in slot order, in f32; tokens with no valid slot keep their row bit for bit. `rows`
/// `[T·k_max, d]` (sorted order) is f32 or of `y`'s element type; `ids`/`weights` are the routing
/// the plan was built from. The GPU counterpart of [`crate::cpu::scatter_combine`]; asynchronous.
#[allow(clippy::too_many_arguments)]
pub fn scatter_combine<T: CudaElement, R: CudaElement>(
    dev: &Device,
    rows: &impl DeviceRead<R>,
    d: usize,
    plan: &DevicePlan,
    ids: &impl DeviceRead<i32>,
    weights: &impl DeviceRead<f32>,
    scale: f32,
    y: &mut impl DeviceWrite<T>,
) -> Result<()> {
    const OP: &str = "scatter_combine";
    crate::gate::check_scale(scale)?;
    if R::DTYPE != DType::F32 && R::DTYPE != T::DTYPE {
        return Err(Error::Unsupported {
            op: OP,
            what: format!(
                "rows of {:?} into y of {:?} (rows must be f32 or y's element type)",
                R::DTYPE,
                T::DTYPE
            ),
        });
    }
    if d == 0 {
        return Err(Error::InvalidDim {
            what: "d",
            value: 0,
            reason: "must be at least 1",
        });
    }
    let slots = plan.num_slots();
    let rows_len = checked_i32("T * k_max * d", slots, d)?;
    let y_len = checked_i32("T * d", plan.num_tokens, d)?;
    let mut l = Launch::new(dev, OP);
    let rows = l.input("rows [T * k_max, d]", rows, rows_len)?;
    let ids = l.input("routing ids [T, k_max]", ids, slots)?;
    let weights = l.input("routing weights [T, k_max]", weights, slots)?;
    let y = l.output("y [T, d]", y, y_len)?;
    let slot_to_sorted = plan.bind_inverse(&mut l)?;
    if plan.num_tokens == 0 {
        return Ok(());
    }
    let args = ffi::molora_scatter_combine_args {
        rows: rows.cast(),
        rows_f32: (R::DTYPE == DType::F32) as i32,
        ids,
        weights,
        slot_to_sorted,
        y: y.cast(),
        scale,
        num_tokens: plan.num_tokens as i32,
        k_max: plan.k_max as i32,
        num_experts: plan.num_experts as i32,
        d: d as i32,
    };
    // SAFETY: rows hold T·k_max·d, ids/weights T·k_max and y T·d elements (checked, all fit an i32);
    // rows are read as f32 exactly when R is f32, else R is T (checked). The plan's inverse holds
    // T·k_max positions, each -1 or < T·k_max; the kernel skips ids outside [0, E). The launch
    // orders every buffer on the device.
    unsafe { l.run(&T::SCATTER_COMBINE, &args) }
}
