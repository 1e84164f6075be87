//! SAML's weight-space mixing on the CPU: one mixed adapter per sequence.

use crate::error::{check_len, Result};
use crate::{Element, LoraShape, SeqRouting};

/// `Ā_s = Σ_e p_se·A_e` (`[S, r, d_in]`) and `B̄_s = Σ_e p_se·B_e` (`[S, d_out, r]`) for every
/// sequence `s` of `routing`, each element summed over `e` in order in f32 and rounded once to `T`.
/// This mixes in weight space: `x·Ā_sᵀ·B̄_sᵀ ≠ Σ_e p_se·x·A_eᵀ·B_eᵀ` (cross terms). Apply the result
/// with [`super::shrink_segments`] / [`super::expand_segments`] and [`crate::AdapterSegments::identity`].
///
/// `p` may be any finite values ([`SeqRouting`] checks that); they need not sum to 1. A one-hot `p_s`
/// gives back the chosen expert's `A_e`, `B_e` exactly. `routing.num_experts()` must equal
/// `shape.num_experts` and `a`, `b` must have the lengths of `shape`.
pub fn mix_experts<T: Element>(
    a: &[T],
    b: &[T],
    shape: &LoraShape,
    routing: &SeqRouting,
) -> Result<(Vec<T>, Vec<T>)> {
    mix_with(a, b, shape, routing, T::from_f32)
}

/// The same mixture kept in f32 (the whole-layer reference rounds only its output).
pub(crate) fn mix_experts_f32<T: Element>(
    a: &[T],
    b: &[T],
    shape: &LoraShape,
    routing: &SeqRouting,
) -> Result<(Vec<f32>, Vec<f32>)> {
    mix_with(a, b, shape, routing, |v| v)
}

fn mix_with<T: Element, U>(
    a: &[T],
    b: &[T],
    shape: &LoraShape,
    routing: &SeqRouting,
    round: impl Fn(f32) -> U,
) -> Result<(Vec<U>, Vec<U>)> {
    check_len(
        "experts of the routing vs shape.num_experts",
        shape.num_experts,
        routing.num_experts(),
    )?;
    check_len("A [E, r, d_in]", shape.a_len(), a.len())?;
    check_len("B [E, d_out, r]", shape.b_len(), b.len())?;
    let s = routing.segments().num_segments();
    let mix = |w: &[T], per: usize| -> Vec<U> {
        let mut out = Vec::with_capacity(s * per);
        for seq in 0..s {
            let p = routing.probs_of(seq);
            for i in 0..per {
                let mut acc = 0.0f32;
                for (e, &pe) in p.iter().enumerate() {
                    acc += pe * w[e * per + i].to_f32();
                }
                out.push(round(acc));
            }
        }
        out
    };
    Ok((
        mix(a, shape.rank * shape.d_in),
        mix(b, shape.d_out * shape.rank),
    ))
}
