//! Base-weight quantisation on the CPU: NF4 (QLoRA's 4-bit NormalFloat, block-wise absmax) and int8
//! per output channel, with dequantisation and the quantised base matmul. Every rounding is defined
//! here exactly, so GPU kernels can match these codes and scales bit for bit.
//!
//! Weights are `[rows = d_out, cols = d_in]`, row-major (PyTorch's `nn.Linear.weight`); `n = rows·cols`
//! must fit in an `i32`. Element values are converted to f32 exactly (f16 and bf16 are subsets of
//! f32) before anything is computed.
//!
//! # NF4
//!
//! The weight is flattened row-major and cut into blocks of [`NF4_BLOCK`] = 64 elements (the last
//! block holds `n mod 64` elements when that is not 0; blocks run across row boundaries). Per block
//! `b`:
//!
//! * `absmax_b = max_{i ∈ b} |w_i|` (f32, exact: a maximum rounds nothing).
//! * `v_i = w_i / absmax_b`, one IEEE f32 division, round to nearest even; `|v_i| ≤ 1` exactly.
//! * `code_i = |{c ∈ 0..15 : mid[c] < v_i}|` with `mid[c] = (NF4_TABLE[c] + NF4_TABLE[c + 1]) / 2`
//!   evaluated in f32 (an f32 add, then an exact halving). This is the index of the nearest table
//!   value; a `v_i` exactly on a midpoint goes to the LOWER code (towards −1).
//! * An all-zero block (`absmax_b = 0`) stores absmax 0 and code 7 (the table's exact 0) for each
//!   element.
//!
//! Packing: byte `j` holds element `2j` in its high nibble and element `2j + 1` in its low nibble;
//! when `n` is odd the low nibble of the last byte is 0. Dequantisation is
//! `deq_i = NF4_TABLE[code_i] · absmax_b` (one f32 multiply), so the block's absmax element
//! (`v = ±1`, code 0 or 15) and every zero come back exactly.
//!
//! # int8
//!
//! Per row `o`: `scale_o = (max_i |W[o, i]|) / 127` (one f32 division; 0 for an all-zero row) and
//! `q[o, i] = clamp(round_half_away_from_zero(W[o, i] / scale_o), −127, 127)` (one f32 division;
//! `q = 0` wherever `scale_o = 0`, including a non-zero row so tiny that `max / 127` underflows to 0).
//! Dequantisation is `deq[o, i] = (q[o, i] as f32) · scale_o` (one f32 multiply). The code −128 is
//! never produced and not accepted.
//!
//! # Matmul
//!
//! `y[t, o] = (Σ_{i = 0..d_in} x[t, i] · deq[o, i]) + bias[o]`: f32 products and an f32 sum in index
//! order starting from 0, the bias (converted to f32) added last; the output is f32 `[T, d_out]`.

use crate::error::{check_finite, check_len, Error, Result};
pub(crate) use crate::quant::{check_dims, NF4_ZERO_CODE};
pub use crate::quant::{Int8Weight, Nf4Weight, QuantWeightRef, NF4_BLOCK, NF4_TABLE};
use crate::Element;

/// Midpoints between neighbouring code-book values, `(NF4_TABLE[c] + NF4_TABLE[c + 1]) / 2` in f32.
fn nf4_midpoints() -> [f32; 15] {
    let mut m = [0.0f32; 15];
    for (c, v) in m.iter_mut().enumerate() {
        *v = (NF4_TABLE[c] + NF4_TABLE[c + 1]) / 2.0;
    }
    m
}

/// The NF4 code of a normalised value `v = w / absmax ∈ [-1, 1]`: the number of midpoints strictly
/// below `v` (`code = |{c : mid[c] < v}|`), i.e. the nearest code-book value, a value exactly on a
/// midpoint going to the lower code.
fn nf4_code(v: f32, mid: &[f32; 15]) -> u8 {
    mid.iter().filter(|&&m| m < v).count() as u8
}

/// Converts elements to f32 (exact) and checks that every value is finite.
fn to_finite_f32<T: Element>(what: &'static str, v: &[T]) -> Result<Vec<f32>> {
    let f: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
    check_finite(what, &f)?;
    Ok(f)
}

/// NF4 quantisation of `w` `[rows, cols]` (row-major): per block `b` of 64 flattened elements,
/// `absmax_b = max |w_i|`, and per element `code_i = |{c : mid[c] < w_i / absmax_b}|` (one f32
/// division; `mid[c] = (NF4_TABLE[c] + NF4_TABLE[c + 1]) / 2` in f32), i.e. the nearest code-book
/// value with ties to the lower code. An all-zero block gets absmax 0 and code 7 (the exact 0).
/// Codes are packed high nibble first (see [`Nf4Weight`]).
///
/// Errors: `rows = 0`, `cols = 0` or `rows·cols > i32::MAX` ([`Error::InvalidDim`]), `w.len() ≠
/// rows·cols` ([`Error::LengthMismatch`]), NaN/infinite weights ([`Error::NonFinite`]
/// `{ what: "weight", index, value }`).
pub fn quantize_nf4<T: Element>(w: &[T], rows: usize, cols: usize) -> Result<Nf4Weight> {
    let n = check_dims(rows, cols)?;
    check_len("weight [rows, cols]", n, w.len())?;
    let wf = to_finite_f32("weight", w)?;
    let mid = nf4_midpoints();
    let mut absmax = Vec::with_capacity(n.div_ceil(NF4_BLOCK));
    let mut codes = Vec::with_capacity(n);
    for block in wf.chunks(NF4_BLOCK) {
        let m = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        codes.extend(block.iter().map(|&v| {
            if m > 0.0 {
                nf4_code(v / m, &mid)
            } else {
                NF4_ZERO_CODE
            }
        }));
    }
    let packed = codes
        .chunks(2)
        .map(|pair| match *pair {
            [hi, lo] => (hi << 4) | lo,
            [hi] => hi << 4,
            _ => 0,
        })
        .collect();
    Nf4Weight::from_parts(rows, cols, packed, absmax)
}

/// Int8 per-channel quantisation of `w` `[rows, cols]` (row-major):
/// `scale_o = (max_i |W[o, i]|) / 127` (f32; 0 for an all-zero row) and
/// `q[o, i] = clamp(round_half_away_from_zero(W[o, i] / scale_o), −127, 127)` (one f32 division;
/// `q = 0` where `scale_o = 0`). The row's largest magnitude maps to ±127.
///
/// Errors: `rows = 0`, `cols = 0` or `rows·cols > i32::MAX` ([`Error::InvalidDim`]), `w.len() ≠
/// rows·cols` ([`Error::LengthMismatch`]), NaN/infinite weights ([`Error::NonFinite`]
/// `{ what: "weight", index, value }`).
pub fn quantize_int8<T: Element>(w: &[T], rows: usize, cols: usize) -> Result<Int8Weight> {
    let n = check_dims(rows, cols)?;
    check_len("weight [rows, cols]", n, w.len())?;
    let wf = to_finite_f32("weight", w)?;
    let mut q = Vec::with_capacity(n);
    let mut scales = Vec::with_capacity(rows);
    for row in wf.chunks_exact(cols) {
        let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = m / 127.0;
        scales.push(scale);
        q.extend(row.iter().map(|&v| {
            if scale > 0.0 {
                // `f32::round` rounds half away from zero; the clamp keeps the cast exact.
                (v / scale).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        }));
    }
    Int8Weight::from_parts(rows, cols, q, scales)
}

/// Checks `x` `[T, cols]` and `bias` `[rows]`: lengths and finiteness. Returns `x` and the bias in f32.
fn check_matmul_inputs<T: Element>(
    x: &[T],
    num_tokens: usize,
    rows: usize,
    cols: usize,
    bias: Option<&[T]>,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let x_len = num_tokens.checked_mul(cols).ok_or(Error::InvalidDim {
        what: "num_tokens * d_in",
        value: usize::MAX,
        reason: "the buffer length overflows usize",
    })?;
    num_tokens.checked_mul(rows).ok_or(Error::InvalidDim {
        what: "num_tokens * d_out",
        value: usize::MAX,
        reason: "the buffer length overflows usize",
    })?;
    check_len("x [T, d_in]", x_len, x.len())?;
    let bias = match bias {
        Some(b) => {
            check_len("bias [d_out]", rows, b.len())?;
            Some(to_finite_f32("bias", b)?)
        }
        None => None,
    };
    let x = to_finite_f32("x", x)?;
    Ok((x, bias))
}

/// The NF4 base matmul: `y[t, o] = (Σ_{i = 0..d_in} x[t, i]·deq(W)[o, i]) + bias[o]` with
/// `deq(W)` = [`Nf4Weight::dequantize`], f32 products summed in f32 in index order, the bias added
/// last (none: nothing added); output f32 `[T, d_out]` (`T = 0` gives an empty output).
///
/// Errors: `x.len() ≠ T·d_in` or `bias.len() ≠ d_out` ([`Error::LengthMismatch`]), NaN/infinite `x`
/// or `bias` ([`Error::NonFinite`] `"x"` / `"bias"`).
pub fn nf4_matmul<T: Element>(
    x: &[T],
    num_tokens: usize,
    w: &Nf4Weight,
    bias: Option<&[T]>,
) -> Result<Vec<f32>> {
    let (x, bias) = check_matmul_inputs(x, num_tokens, w.rows(), w.cols(), bias)?;
    let deq = w.dequantize();
    Ok(matmul_f32(&x, &deq, w.rows(), w.cols(), bias.as_deref()))
}

/// The int8 base matmul: `y[t, o] = (Σ_{i = 0..d_in} x[t, i]·(q[o, i]·scale_o)) + bias[o]`, the
/// dequantised weight as in [`Int8Weight::dequantize`], f32 products summed in f32 in index order,
/// the bias added last; output f32 `[T, d_out]`.
///
/// Errors: as [`nf4_matmul`].
pub fn int8_matmul<T: Element>(
    x: &[T],
    num_tokens: usize,
    w: &Int8Weight,
    bias: Option<&[T]>,
) -> Result<Vec<f32>> {
    let (x, bias) = check_matmul_inputs(x, num_tokens, w.rows(), w.cols(), bias)?;
    let deq = w.dequantize();
    Ok(matmul_f32(&x, &deq, w.rows(), w.cols(), bias.as_deref()))
}

/// `y[t, o] = (Σ_i x[t, i]·w[o, i]) + bias[o]` over validated f32 buffers.
fn matmul_f32(x: &[f32], w: &[f32], rows: usize, cols: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / cols * rows);
    for xt in x.chunks_exact(cols) {
        for (o, wo) in w.chunks_exact(cols).enumerate() {
            let mut acc = 0.0f32;
            for (&a, &b) in xt.iter().zip(wo) {
                acc += a * b;
            }
            if let Some(b) = bias {
                acc += b.get(o).copied().unwrap_or(0.0);
            }
            out.push(acc);
        }
    }
    out
}

/// The quantised matmul's backward to its input, for a frozen weight `W` `[rows, cols]` (NF4 or
/// int8): `dx[t, i] = Σ_{o = 0..rows} dy[t, o]·deq(W)[o, i]`, f32 products and an f32 sum in row order
/// from 0; `dy` `[T, rows]` (any element type, converted exactly), `dx` f32 `[T, cols]`.
///
/// Errors: wrong `dy` length ([`Error::LengthMismatch`]), NaN/infinite `dy` ([`Error::NonFinite`]).
pub fn quant_matmul_dx<T: Element>(
    dy: &[T],
    num_tokens: usize,
    w: &crate::quant::QuantWeightRef<'_>,
) -> Result<Vec<f32>> {
    let (rows, cols) = w.dims();
    let n = crate::error::checked_elems("dy [T, rows]", num_tokens, rows, 4)?;
    check_len("dy [T, rows]", n, dy.len())?;
    let dy = to_finite_f32("dy", dy)?;
    let deq = w.dequantize();
    let mut dx = vec![0.0f32; crate::error::checked_elems("dx [T, cols]", num_tokens, cols, 4)?];
    for (g, out) in dy.chunks_exact(rows).zip(dx.chunks_exact_mut(cols)) {
        for (o, &go) in g.iter().enumerate() {
            for (acc, &wv) in out.iter_mut().zip(&deq[o * cols..(o + 1) * cols]) {
                *acc += go * wv;
            }
        }
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midpoints_split_the_table() {
        let mid = nf4_midpoints();
        for (c, &t) in NF4_TABLE.iter().enumerate() {
            assert_eq!(nf4_code(t, &mid), c as u8);
        }
        for c in 0..15 {
            // Exactly on a midpoint: the lower code; just above: the upper one.
            assert_eq!(nf4_code(mid[c], &mid), c as u8);
            assert_eq!(nf4_code(mid[c] + 1e-6, &mid), c as u8 + 1);
        }
    }
}
