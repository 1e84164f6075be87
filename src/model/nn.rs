//! Numerics the models share, computed in f32 whatever dtype the model runs in (f16 and bf16 keep
//! their storage and matmuls; reductions and exponentials are widened), the result in the input's
//! dtype.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::model::linear::Routed;

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

/// Sinusoidal positions `[len, d]` (f32): `sin(p / 10000^(2i/d))` in even columns, `cos` in odd.
pub fn sinusoids(len: usize, d: usize, dev: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(len * d);
    for p in 0..len {
        for i in 0..d {
            let f = (p as f32) / 10000f32.powf((2 * (i / 2)) as f32 / d as f32);
            v.push(if i % 2 == 0 { f.sin() } else { f.cos() });
        }
    }
    Ok(Tensor::from_vec(v, (len, d), dev)?)
}

/// Appends a layer's routing (when it routed) to a model's list, under the layer's name.
pub(crate) fn push_routing(routing: &mut Vec<(String, Routed)>, name: &str, r: Option<Routed>) {
    if let Some(r) = r {
        routing.push((name.to_string(), r));
    }
}
