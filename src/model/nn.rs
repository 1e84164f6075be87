//! Numerics the models share, computed in f32 whatever dtype the model runs in (f16 and bf16 keep
//! their storage and matmuls; reductions and exponentials are widened), the result in the input's
//! dtype.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// `x / √(mean(x²) + 1e-6)` over the last dimension.
pub fn rms_norm(x: &Tensor) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(xf
        .broadcast_div(&(ms + 1e-6)?.sqrt()?)?
        .to_dtype(x.dtype())?)
}

/// `(x − mean(x)) / √(var(x) + 1e-5)` over the last dimension (no affine parameters).
pub fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let c = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(c.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .to_dtype(x.dtype())?)
}

/// The softmax over `dim` (differentiable; candle's `softmax_last_dim` is not), in f32, returned in
/// `x`'s dtype.
pub fn softmax<Dim: candle_core::shape::Dim>(x: &Tensor, dim: Dim) -> Result<Tensor> {
    let p = candle_nn::ops::softmax(&x.to_dtype(DType::F32)?, dim)?;
    Ok(p.to_dtype(x.dtype())?)
}
