//! Gradient containers shared by the CPU reference's backward ([`crate::cpu::backward`]) and the
//! CUDA path's (downloaded with [`crate::cuda::DeviceLoraGrads::to_host`]).

/// Gradients of the LoRA part `Δy_t = s·Σ_{slots} w_ts·(x_t·A_eᵀ)·B_eᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrads<F> {
    /// `∂L/∂A` `[E, r, d_in]` (zero for experts no token used).
    pub da: Vec<F>,
    /// `∂L/∂B` `[E, d_out, r]`.
    pub db: Vec<F>,
    /// `∂L/∂x` through the experts `[T, d_in]` (add `dy·W0` for the path through the frozen base).
    pub dx: Vec<F>,
    /// `∂L/∂w_ts` `[T, k_max]` (zero for empty slots).
    pub dw: Vec<F>,
}
