//! Base-weight quantisation on the CPU: NF4 (QLoRA's 4-bit NormalFloat, block-wise absmax) and int8
//! per output channel, with dequantisation and the quantised base matmul. Every rounding is defined
//! here exactly, so GPU kernels can match these results bit for bit.
//!
//! Weights are `[rows = d_out, cols = d_in]`, row-major (PyTorch's `nn.Linear.weight`).

use crate::error::{check_finite, check_len, Error, Result};
use crate::Element;

/// Elements per NF4 block (one absmax each), over the flattened row-major weight.
pub const NF4_BLOCK: usize = 64;

/// QLoRA's NF4 code book (the quantiles of N(0, 1) normalised to [-1, 1], with an exact 0), as in
/// bitsandbytes.
pub const NF4_TABLE: [f32; 16] = [
    -1.0_f64 as f32,
    -0.6961928009986877_f64 as f32,
    -0.5250730514526367_f64 as f32,
    -0.39491748809814453_f64 as f32,
    -0.28444138169288635_f64 as f32,
    -0.18477343022823334_f64 as f32,
    -0.09105003625154495_f64 as f32,
    0.0_f64 as f32,
    0.07958029955625534_f64 as f32,
    0.16093020141124725_f64 as f32,
    0.24611230194568634_f64 as f32,
    0.33791524171829224_f64 as f32,
    0.44070982933044434_f64 as f32,
    0.5626170039176941_f64 as f32,
    0.7229568362236023_f64 as f32,
    1.0_f64 as f32,
];

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

fn check_dims(rows: usize, cols: usize) -> Result<usize> {
    for (what, value) in [("rows", rows), ("cols", cols)] {
        if value == 0 {
            return Err(Error::InvalidDim {
                what,
                value,
                reason: "a weight needs at least one row and one column",
            });
        }
    }
    rows.checked_mul(cols)
        .filter(|&n| n <= i32::MAX as usize)
        .ok_or(Error::InvalidDim {
            what: "rows * cols",
            value: rows.saturating_mul(cols),
            reason: "must fit in an i32",
        })
}

fn check_scales(what: &'static str, v: &[f32]) -> Result<()> {
    check_finite(what, v)?;
    match v.iter().position(|&s| s < 0.0) {
        None => Ok(()),
        Some(i) => Err(Error::InvalidParameter {
            what,
            value: v[i],
            reason: "scales must be >= 0",
        }),
    }
}

/// An NF4-quantised weight: two 4-bit codes per byte (element `2i` in the high nibble, `2i + 1` in
/// the low nibble; an odd count leaves the last low nibble 0) and one f32 absmax per block of
/// [`NF4_BLOCK`] elements of the flattened weight (the last block may be shorter).
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    rows: usize,
    cols: usize,
    packed: Vec<u8>,
    absmax: Vec<f32>,
}

impl Nf4Weight {
    /// Wraps stored parts, checking their lengths (`ceil(n/2)` bytes, `ceil(n/64)` absmax values,
    /// finite and `>= 0`).
    pub fn from_parts(rows: usize, cols: usize, packed: Vec<u8>, absmax: Vec<f32>) -> Result<Self> {
        let n = check_dims(rows, cols)?;
        check_len("NF4 packed codes [ceil(n/2)]", n.div_ceil(2), packed.len())?;
        check_len(
            "NF4 absmax [ceil(n/64)]",
            n.div_ceil(NF4_BLOCK),
            absmax.len(),
        )?;
        check_scales("NF4 absmax", &absmax)?;
        Ok(Nf4Weight {
            rows,
            cols,
            packed,
            absmax,
        })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }
    /// Storage in bytes: the packed codes plus the f32 absmax values.
    pub fn bytes(&self) -> usize {
        self.packed.len() + 4 * self.absmax.len()
    }
    /// The code of flattened element `i` (`i < rows·cols`).
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i % 2 == 0 {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }
    /// Element `i` dequantised: `NF4_TABLE[code(i)] · absmax[i / 64]` (one f32 multiply).
    #[inline]
    pub fn value(&self, i: usize) -> f32 {
        NF4_TABLE[self.code(i) as usize] * self.absmax[i / NF4_BLOCK]
    }
    /// The dequantised weight, f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols).map(|i| self.value(i)).collect()
    }
}

/// NF4 quantisation: per block `b` of 64 flattened elements, `absmax_b = max |w|` (0 for an all-zero
/// block), and per element `code = nf4_code(w / absmax_b)` (one f32 division; an all-zero block gets
/// code 7, the exact 0). The nearest code-book value wins, ties to the lower code.
pub fn quantize_nf4<T: Element>(w: &[T], rows: usize, cols: usize) -> Result<Nf4Weight> {
    let n = check_dims(rows, cols)?;
    check_len("weight [rows, cols]", n, w.len())?;
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    check_finite("weight", &wf)?;
    let mid = nf4_midpoints();
    let mut absmax = Vec::with_capacity(n.div_ceil(NF4_BLOCK));
    let mut packed = vec![0u8; n.div_ceil(2)];
    for (b, block) in wf.chunks(NF4_BLOCK).enumerate() {
        let m = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        for (j, &v) in block.iter().enumerate() {
            let code = if m > 0.0 { nf4_code(v / m, &mid) } else { 7 };
            let i = b * NF4_BLOCK + j;
            packed[i / 2] |= if i % 2 == 0 { code << 4 } else { code };
        }
    }
    Nf4Weight::from_parts(rows, cols, packed, absmax)
}

/// An int8 weight quantised per output channel (row): `q` `[rows, cols]` and one f32 scale per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Weight {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Weight {
    /// Wraps stored parts, checking their lengths and that the scales are finite and `>= 0`.
    pub fn from_parts(rows: usize, cols: usize, q: Vec<i8>, scales: Vec<f32>) -> Result<Self> {
        let n = check_dims(rows, cols)?;
        check_len("int8 codes [rows, cols]", n, q.len())?;
        check_len("int8 scales [rows]", rows, scales.len())?;
        check_scales("int8 scales", &scales)?;
        Ok(Int8Weight {
            rows,
            cols,
            q,
            scales,
        })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn q(&self) -> &[i8] {
        &self.q
    }
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Storage in bytes: the codes plus the f32 scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }
    /// Element `(o, i)` dequantised: `q[o, i] as f32 · scale[o]`.
    #[inline]
    pub fn value(&self, o: usize, i: usize) -> f32 {
        self.q[o * self.cols + i] as f32 * self.scales[o]
    }
    /// The dequantised weight, f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows)
            .flat_map(|o| (0..self.cols).map(move |i| (o, i)))
            .map(|(o, i)| self.value(o, i))
            .collect()
    }
}

/// Int8 per-channel quantisation: `scale_o = max_i |W[o, i]| / 127` (f32; 0 for an all-zero row) and
/// `q = clamp(round_half_away_from_zero(w / scale_o), -127, 127)` (0 where the scale is 0).
pub fn quantize_int8<T: Element>(w: &[T], rows: usize, cols: usize) -> Result<Int8Weight> {
    let n = check_dims(rows, cols)?;
    check_len("weight [rows, cols]", n, w.len())?;
    let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    check_finite("weight", &wf)?;
    let mut q = Vec::with_capacity(n);
    let mut scales = Vec::with_capacity(rows);
    for row in wf.chunks_exact(cols) {
        let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = m / 127.0;
        scales.push(scale);
        q.extend(row.iter().map(|&v| {
            if scale > 0.0 {
                (v / scale).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        }));
    }
    Int8Weight::from_parts(rows, cols, q, scales)
}

fn check_matmul_inputs<T: Element>(
    x: &[T],
    num_tokens: usize,
    rows: usize,
    cols: usize,
    bias: Option<&[T]>,
) -> Result<()> {
    check_len("x [T, d_in]", num_tokens * cols, x.len())?;
    if let Some(b) = bias {
        check_len("bias [d_out]", rows, b.len())?;
    }
    Ok(())
}

/// The NF4 base matmul: `y[t, o] = Σ_i x[t, i]·deq(W)[o, i] + bias[o]`, f32 `[T, d_out]`, the sum over
/// `i` in order, the bias added last.
pub fn nf4_matmul<T: Element>(
    x: &[T],
    num_tokens: usize,
    w: &Nf4Weight,
    bias: Option<&[T]>,
) -> Result<Vec<f32>> {
    check_matmul_inputs(x, num_tokens, w.rows, w.cols, bias)?;
    let deq = w.dequantize();
    Ok(matmul_f32(x, num_tokens, &deq, w.rows, w.cols, bias))
}

/// The int8 base matmul: `y[t, o] = Σ_i x[t, i]·(q[o, i]·scale_o) + bias[o]`, f32 `[T, d_out]`, the
/// sum over `i` in order, the bias added last.
pub fn int8_matmul<T: Element>(
    x: &[T],
    num_tokens: usize,
    w: &Int8Weight,
    bias: Option<&[T]>,
) -> Result<Vec<f32>> {
    check_matmul_inputs(x, num_tokens, w.rows, w.cols, bias)?;
    let deq = w.dequantize();
    Ok(matmul_f32(x, num_tokens, &deq, w.rows, w.cols, bias))
}

fn matmul_f32<T: Element>(
    x: &[T],
    num_tokens: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    bias: Option<&[T]>,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(num_tokens * rows);
    for t in 0..num_tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for o in 0..rows {
            let mut acc = 0.0f32;
            for (&a, &b) in xt.iter().zip(&w[o * cols..(o + 1) * cols]) {
                acc += a.to_f32() * b;
            }
            out.push(acc + bias.map_or(0.0, |b| b[o].to_f32()));
        }
    }
    out
}
