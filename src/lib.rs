//! # molora
//!
//! Kernels for mixtures of LoRA experts (MoLE): gating (top-k, dynamic threshold, hierarchical,
//! dense, per-sequence), dispatch, grouped LoRA shrink/expand with fused scatter/gather, weight-space
//! mixing and quantised base weights. [`cpu`] is the reference path: every operation written plainly,
//! with the formula it computes, f32 accumulation. [`cuda`] holds the GPU path behind safe wrappers
//! (feature `cuda`); without the feature its entry points exist and return
//! [`Error::CudaNotCompiled`].
//!
//! Memory layouts are those of PyTorch and PEFT; see [`shape`].

pub mod cpu;
pub mod cuda;
pub mod dispatch;
pub mod dtype;
pub mod error;
pub mod routing;
pub mod shape;
pub mod testing;

pub use dispatch::DispatchPlan;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use routing::{AdapterSegments, Routing, Segments, SeqRouting};
pub use shape::{LoraShape, MAX_RANK};

/// Re-export of `half` so users name the same f16/bf16 types.
pub use half;
