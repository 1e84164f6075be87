//! Dispatch on the GPU: the stable counting sort of `cuda/dispatch.cu`, giving exactly the arrays of
//! [`crate::cpu::dispatch()`].

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use super::device::{check_launch, Device};
use super::ffi;
use crate::error::check_len;
use crate::{DispatchPlan, Error, Result};

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
    expert_offsets: CudaSlice<i32>,
    sorted_slots: CudaSlice<i32>,
    slot_to_sorted: CudaSlice<i32>,
    workspace: CudaSlice<i32>,
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

    /// Device pointers of `expert_offsets` and `sorted_slots`, with the guards that order them on
    /// `stream`.
    pub(crate) fn offsets_and_sorted<'a>(
        &'a self,
        stream: &'a CudaStream,
    ) -> (CUdeviceptr, CUdeviceptr, [SyncOnDrop<'a>; 2]) {
        let (o, g0) = self.expert_offsets.device_ptr(stream);
        let (s, g1) = self.sorted_slots.device_ptr(stream);
        (o, s, [g0, g1])
    }

    /// Device pointer of `slot_to_sorted`, with its guard.
    pub(crate) fn inverse<'a>(&'a self, stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        self.slot_to_sorted.device_ptr(stream)
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
pub fn dispatch(dev: &Device, ids: &impl DevicePtr<i32>, plan: &mut DevicePlan) -> Result<()> {
    let slots = plan.num_slots();
    check_len("routing ids [T, k_max]", slots, ids.len())?;
    let stream = dev.stream();
    let (ids_ptr, _g0) = ids.device_ptr(stream);
    let (off_ptr, _g1) = plan.expert_offsets.device_ptr_mut(stream);
    let (sorted_ptr, _g2) = plan.sorted_slots.device_ptr_mut(stream);
    let (inv_ptr, _g3) = plan.slot_to_sorted.device_ptr_mut(stream);
    let (ws_ptr, _g4) = plan.workspace.device_ptr_mut(stream);
    let args = ffi::molora_dispatch_args {
        ids: ids_ptr as *const i32,
        expert_offsets: off_ptr as *mut i32,
        sorted_slots: sorted_ptr as *mut i32,
        slot_to_sorted: inv_ptr as *mut i32,
        workspace: ws_ptr as *mut i32,
        num_slots: slots as i32,
        num_experts: plan.num_experts as i32,
    };
    // SAFETY: `ids` holds T·k_max elements (checked above); the plan's buffers were allocated by
    // `DevicePlan::new` for this T, k_max and E (offsets E + 1, slots T·k_max, workspace of
    // `molora_dispatch_workspace_len`), with 1 <= E <= MAX_DISPATCH_EXPERTS and T·k_max < 2^31.
    // The guards keep every buffer alive and ordered on `stream` until the launches are enqueued.
    let code = unsafe { ffi::molora_dispatch(&args, dev.raw_stream()) };
    check_launch("dispatch", code)
}
