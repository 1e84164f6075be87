//! [`stack_experts`]: one LoRA per expert stacked into the layout of the MoLE operations.

use candle_core::{DType, Tensor};

use super::peft::LoraPair;
use super::weights_err;
use crate::error::Result;

/// Stacks one LoRA per expert into `A [E, r_max, d_in]` and `B [E, d_out, r_max]` (f32, on the first
/// pair's device), the layout of the MoLE operations.
///
/// Smaller ranks are zero-padded (exact: a padded row of `A` and the matching zero column of `B`
/// contribute nothing), and each expert's own scale is folded into its `B` as `scale_e / target_scale`,
/// so that `target_scale · B_e A_e` equals the adapter's `scale_e · B_e A_e` (up to one f32 rounding of
/// each element of `B`). With `target_scale` equal to every `scale_e`, `B` is copied unchanged.
///
/// Errors ([`Error::Weights`], source `stack_experts`): no pairs; `target_scale` zero or not finite; a
/// pair whose shapes are not `A [r, d_in]`, `B [d_out, r]`; experts whose `d_in` or `d_out` differ from
/// expert 0's.
///
/// [`Error::Weights`]: crate::Error::Weights
pub fn stack_experts(pairs: &[&LoraPair], target_scale: f32) -> Result<(Tensor, Tensor)> {
    const SOURCE: &str = "stack_experts";
    let Some(first) = pairs.first() else {
        return Err(weights_err(
            SOURCE,
            "(pairs)",
            "expected at least one expert",
        ));
    };
    if !target_scale.is_finite() || target_scale == 0.0 {
        return Err(weights_err(
            SOURCE,
            "target_scale",
            format!("expected a finite, non-zero scale, got {target_scale}"),
        ));
    }
    for (e, pair) in pairs.iter().enumerate() {
        pair.check(SOURCE, &format!("expert {e}"))?;
        if (pair.d_in(), pair.d_out()) != (first.d_in(), first.d_out()) {
            return Err(weights_err(
                SOURCE,
                format!("expert {e}"),
                format!(
                    "d_in -> d_out is {} -> {}, expected {} -> {} as for expert 0 (A {:?}, B {:?})",
                    pair.d_in(),
                    pair.d_out(),
                    first.d_in(),
                    first.d_out(),
                    pair.a.dims(),
                    pair.b.dims()
                ),
            ));
        }
    }
    let r_max = pairs.iter().map(|p| p.rank()).max().unwrap_or(0);
    let (d_in, d_out) = (first.d_in(), first.d_out());
    let device = first.a.device();
    let mut a_all = Vec::with_capacity(pairs.len());
    let mut b_all = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let r = pair.rank();
        let a = pair.a.to_device(device)?.to_dtype(DType::F32)?;
        let mut b = pair.b.to_device(device)?.to_dtype(DType::F32)?;
        let fold = pair.scale / target_scale;
        if fold != 1.0 {
            b = (b * f64::from(fold))?;
        }
        let (a, b) = if r < r_max {
            let a_pad = Tensor::zeros((r_max - r, d_in), DType::F32, device)?;
            let b_pad = Tensor::zeros((d_out, r_max - r), DType::F32, device)?;
            (
                Tensor::cat(&[&a, &a_pad], 0)?,
                Tensor::cat(&[&b, &b_pad], 1)?,
            )
        } else {
            (a, b)
        };
        a_all.push(a);
        b_all.push(b);
    }
    Ok((Tensor::stack(&a_all, 0)?, Tensor::stack(&b_all, 0)?))
}
