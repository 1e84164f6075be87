//! The CUDA path: safe wrappers over the kernels of `cuda/*.cu`, on a [`Device`] that is a GPU
//! (cudarc 0.19 contexts, streams and buffers) or, with the `emu` feature, the emulated device (the
//! same kernels compiled for the host, every access checked).
//!
//! Every op validates shapes, lengths, parameters and the memory kind of its buffers before its one
//! `unsafe` block, enqueues its kernels on the [`Device`]'s stream (or runs them, on the emulated
//! device) and returns without synchronising with the host. Ops take buffers through [`DeviceRead`]
//! and [`DeviceWrite`]: molora's [`Buffer`] and its views on either device, cudarc's `CudaSlice`,
//! `CudaView` and `CudaViewMut` on a GPU.
//!
//! Without the `cuda` feature this module still exists: [`device_available`] is `false` and
//! [`Device::new`] returns [`Error::CudaNotCompiled`](crate::Error::CudaNotCompiled), so callers need no
//! `cfg` of their own.

#[cfg(feature = "cuda")]
#[macro_use]
mod launch;
#[cfg(feature = "cuda")]
mod backward;
#[cfg(feature = "cuda")]
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod dispatch;
#[cfg(feature = "emu")]
mod emu;
#[cfg(feature = "cuda")]
pub mod ffi;
#[cfg(feature = "emu")]
pub mod ffi_emu;
#[cfg(feature = "cuda")]
mod forward;
#[cfg(feature = "cuda")]
mod gating;
#[cfg(feature = "cuda")]
mod lora;
#[cfg(feature = "cuda")]
mod memory;
#[cfg(feature = "cuda")]
pub mod ops;
#[cfg(feature = "cuda")]
mod quant;
#[cfg(feature = "cuda")]
mod selftest;
#[cfg(feature = "cuda")]
mod weight_space;

#[cfg(feature = "cuda")]
pub use backward::{
    gate_probabilities_backward, gating_backward, gating_backward_hierarchical,
    lora_backward_dense_gated, lora_backward_experts, mix_backward, router_backward,
    DeviceLoraGrads, DlambdaOut,
};
/// The cudarc version molora's CUDA ops take buffers of.
#[cfg(feature = "cuda")]
pub use cudarc;
#[cfg(feature = "emu")]
pub use device::set_emulated_arch;
#[cfg(feature = "cuda")]
pub use device::{device_available, Device};
#[cfg(feature = "cuda")]
pub use dispatch::{dispatch, gather_rows, scatter_combine, DevicePlan, MAX_DISPATCH_EXPERTS};
#[cfg(feature = "cuda")]
pub use forward::{DeviceRouter, MoleLoraForward, MoleLoraGrads};
#[cfg(feature = "cuda")]
pub use gating::{
    dense_to_slots, gate_probabilities, gating, router_logits, slots_to_dense, top_k_gating,
    DeviceGate, DeviceSeqRouting, MAX_GATING_EXPERTS,
};
#[cfg(feature = "cuda")]
pub use lora::{
    add_lora, dense_gated_splits, expand_experts, expand_experts_on, expand_segments,
    expand_segments_on, lora_dense_gated, lora_dense_gated_on, mix_experts, shrink_experts,
    shrink_experts_on, shrink_segments, shrink_segments_on, staged_expand_max_columns,
    AddLoraWorkspace, CudaElement, DenseGatedConfig, DenseGatedWorkspace, DeviceSegments,
    KernelPath, LoraPath, DENSE_GATED_MAX_COLUMNS,
};
#[cfg(feature = "cuda")]
pub use memory::{
    gpu_view, gpu_view_mut, Buffer, BufferView, BufferViewMut, DeviceRead, DeviceWrite,
};
#[cfg(feature = "cuda")]
pub use quant::{
    quant_matmul, quant_matmul_dx, quant_matmul_on, quantize_int8, quantize_nf4, DeviceQuantWeight,
    QuantKernel,
};
#[cfg(feature = "cuda")]
pub use selftest::{run_selftest, SelfTest};
#[cfg(feature = "cuda")]
pub use weight_space::WeightSpaceLora;

#[cfg(not(feature = "cuda"))]
mod disabled {
    use crate::{Error, Result};

    /// `false`: molora was built without the `cuda` feature.
    pub fn device_available() -> bool {
        false
    }

    /// Stands in for the CUDA device when the `cuda` feature is off; it cannot be constructed.
    #[derive(Debug)]
    pub struct Device {
        _private: (),
    }

    impl Device {
        /// Always [`Error::CudaNotCompiled`].
        pub fn new(_ordinal: usize) -> Result<Device> {
            Err(Error::CudaNotCompiled { op: "Device::new" })
        }

        /// Always [`Error::EmuNotCompiled`] (the emulated device comes with the `emu` feature,
        /// which implies `cuda`).
        pub fn emulated() -> Result<Device> {
            Err(Error::EmuNotCompiled {
                op: "Device::emulated",
            })
        }
    }
}

#[cfg(not(feature = "cuda"))]
pub use disabled::{device_available, Device};
