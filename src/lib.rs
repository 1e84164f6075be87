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
//!
//! ```
//! use molora::cpu::{self, Activation, DenseBase, Experts, Gate, RouterWeights, ThresholdSpec};
//! use molora::LoraShape;
//!
//! // Two tokens, d_in = 3, d_out = 2, E = 2 experts of rank 1.
//! let x = [1.0f32, 0.0, 2.0, 0.5, 1.0, 0.0];
//! let shape = LoraShape::new(2, 1, 3, 2)?;
//! let a = [1.0f32, 0.0, 0.0, /* expert 1 */ 0.0, 1.0, 0.0]; // [E, r, d_in]
//! let b = [1.0f32, 1.0, /* expert 1 */ 2.0, 0.0]; // [E, d_out, r]
//! let w0 = [0.0f32; 6]; // a zero base, so y is the LoRA part alone
//! let w_g = [4.0f32, 0.0, 0.0, 0.0, 4.0, 0.0]; // router [E, d_in]
//! let router = RouterWeights { w_g: &w_g, b_g: None, activation: Activation::Softmax, temperature: 1.0 };
//!
//! let gate = Gate::Threshold(ThresholdSpec::Learned { theta: 0.0 }); // τ = σ(0)/E = 0.25
//! let routing = cpu::route(&x, 2, 3, 2, &router, None, &gate)?;
//! let experts = Experts::new(&a, &b, shape, 1.0)?;
//! let base = DenseBase { weight: &w0, bias: None };
//! let y = cpu::mole_forward(&x, 2, &base.into(), &experts, &routing)?;
//! // Token 0 leans on expert 0 (p = σ(4) ≈ 0.98 > τ), expert 1 is below τ and dropped.
//! assert_eq!(routing.ids()[..2], [0, -1]);
//! assert_eq!(y[..2], [1.0, 1.0]);
//! # Ok::<(), molora::Error>(())
//! ```

#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
pub mod cuda;
#[cfg(feature = "candle")]
pub mod demo;
pub mod dispatch;
pub mod dtype;
pub mod error;
pub mod gate;
pub mod grads;
#[cfg(feature = "candle")]
pub mod model;
#[cfg(feature = "peft")]
pub mod peft;
pub mod quant;
pub mod rng;
pub mod routing;
pub mod shape;
#[cfg(feature = "speech")]
pub mod speech;
#[doc(hidden)]
pub mod testing;

pub use dispatch::DispatchPlan;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use rng::Rng;
pub use routing::{AdapterSegments, Routing, Segments, SeqRouting};
pub use shape::{LoraShape, MAX_RANK};

/// Re-export of `half` so users name the same f16/bf16 types.
pub use half;
