//! The CPU reference: every operation written plainly, each documented with the formula it
//! computes, f32 accumulation, one rounding to the element type at the output. It is the oracle the
//! CUDA kernels are tested against.

pub mod backward;
pub mod dispatch;
pub mod gating;
pub mod layer;
pub mod lora;
pub mod mixing;
pub mod ops;
pub mod quant;

pub use dispatch::*;
pub use gating::*;
pub use layer::*;
pub use lora::*;
pub use mixing::*;
pub use quant::*;
