//! The quantised base-weight formats shared by the CPU reference ([`crate::cpu`]) and the CUDA
//! path ([`crate::cuda`]): NF4 (QLoRA's 4-bit NormalFloat, block-wise absmax) and int8 per output
//! channel, as stored — codes, packing, scales, dequantisation — with the checks both paths run on
//! them. The quantisers and the quantised matmul are [`crate::cpu::quantize_nf4`],
//! [`crate::cpu::quantize_int8`], [`crate::cpu::nf4_matmul`] and [`crate::cpu::int8_matmul`], whose
//! documentation gives the exact rounding rules.

use crate::error::{check_finite, check_len, Error, Result};

/// Elements per NF4 block (one absmax each), over the flattened row-major weight.
pub const NF4_BLOCK: usize = 64;

/// QLoRA's NF4 code book (the quantiles of N(0, 1) normalised to [-1, 1], with an exact 0), as in
/// bitsandbytes, each constant rounded to the nearest f32. Ascending; `NF4_TABLE[7] = 0`.
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

/// The NF4 code of an all-zero block's elements: the index of the table's exact 0.
pub(crate) const NF4_ZERO_CODE: u8 = 7;

/// Checks `rows, cols >= 1` and `rows·cols <= i32::MAX`; returns `n = rows·cols`.
pub(crate) fn check_dims(rows: usize, cols: usize) -> Result<usize> {
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

/// Checks that stored scales (NF4 absmax, int8 scales) are finite and `>= 0`.
pub(crate) fn check_scales(what: &'static str, v: &[f32]) -> Result<()> {
    check_finite(what, v)?;
    match v.iter().find(|&&s| s < 0.0) {
        None => Ok(()),
        Some(&value) => Err(Error::InvalidParameter {
            what,
            value,
            reason: "scales must be >= 0",
        }),
    }
}

/// An NF4-quantised weight `[rows, cols]`: two 4-bit codes per byte (element `2i` in the high nibble,
/// `2i + 1` in the low nibble; an odd count leaves the last low nibble 0) and one f32 absmax per block
/// of [`NF4_BLOCK`] elements of the flattened weight (the last block may be shorter). See the module
/// documentation for the exact quantisation rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    rows: usize,
    cols: usize,
    packed: Vec<u8>,
    absmax: Vec<f32>,
}

impl Nf4Weight {
    /// Wraps stored parts, with `n = rows·cols`: `packed` must hold `ceil(n/2)` bytes (for odd `n`
    /// the last byte's low nibble must be 0) and `absmax` `ceil(n/64)` finite values `>= 0`.
    ///
    /// Errors: zero or oversized dims ([`Error::InvalidDim`]), wrong lengths
    /// ([`Error::LengthMismatch`]), NaN/infinite absmax ([`Error::NonFinite`]), negative absmax or a
    /// non-zero padding nibble ([`Error::InvalidParameter`]).
    pub fn from_parts(rows: usize, cols: usize, packed: Vec<u8>, absmax: Vec<f32>) -> Result<Self> {
        let n = check_dims(rows, cols)?;
        check_len("NF4 packed codes [ceil(n/2)]", n.div_ceil(2), packed.len())?;
        check_len(
            "NF4 absmax [ceil(n/64)]",
            n.div_ceil(NF4_BLOCK),
            absmax.len(),
        )?;
        check_scales("NF4 absmax", &absmax)?;
        if n % 2 == 1 {
            if let Some(&last) = packed.last() {
                if last & 0x0f != 0 {
                    return Err(Error::InvalidParameter {
                        what: "NF4 padding nibble",
                        value: f32::from(last & 0x0f),
                        reason: "the low nibble after the last element of an odd count must be 0",
                    });
                }
            }
        }
        Ok(Nf4Weight {
            rows,
            cols,
            packed,
            absmax,
        })
    }

    /// Number of rows (`d_out`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (`d_in`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The packed codes, `ceil(rows·cols / 2)` bytes.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// One absmax per block of 64 flattened elements, `ceil(rows·cols / 64)` values.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }

    /// Storage in bytes: `ceil(n/2)` packed code bytes plus `4·ceil(n/64)` for the f32 absmax values
    /// (about 4.5 bits per element).
    pub fn bytes(&self) -> usize {
        self.packed.len() + std::mem::size_of::<f32>() * self.absmax.len()
    }

    /// The code (0..=15) of flattened element `i`: the high nibble of byte `i/2` for even `i`, the
    /// low nibble for odd `i`; `None` when `i >= rows·cols`.
    pub fn code(&self, i: usize) -> Option<u8> {
        if i >= self.rows * self.cols {
            return None;
        }
        let byte = self.packed[i / 2];
        Some(if i % 2 == 0 { byte >> 4 } else { byte & 0x0f })
    }

    /// Flattened element `i` dequantised: `NF4_TABLE[code(i)] · absmax[i / 64]` (one f32 multiply);
    /// `None` when `i >= rows·cols`.
    #[inline]
    pub fn value(&self, i: usize) -> Option<f32> {
        self.code(i)
            .map(|c| NF4_TABLE[usize::from(c)] * self.absmax[i / NF4_BLOCK])
    }

    /// The dequantised weight, f32 `[rows, cols]`: `deq[i] = NF4_TABLE[code(i)] · absmax[i / 64]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.rows * self.cols;
        let mut out = Vec::with_capacity(n);
        for (b, &a) in self.absmax.iter().enumerate() {
            let end = ((b + 1) * NF4_BLOCK).min(n);
            for i in b * NF4_BLOCK..end {
                let byte = self.packed.get(i / 2).copied().unwrap_or(0);
                let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                out.push(NF4_TABLE[usize::from(code)] * a);
            }
        }
        out
    }
}

/// An int8 weight `[rows, cols]` quantised per output channel (row): codes `q` in `-127..=127`,
/// row-major, and one f32 scale per row. See the module documentation for the exact rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Weight {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Weight {
    /// Wraps stored parts: `q` must hold `rows·cols` codes in `-127..=127`, `scales` `rows` finite
    /// values `>= 0`.
    ///
    /// Errors: zero or oversized dims ([`Error::InvalidDim`]), wrong lengths
    /// ([`Error::LengthMismatch`]), NaN/infinite scales ([`Error::NonFinite`]), negative scales or
    /// the code −128 ([`Error::InvalidParameter`]).
    pub fn from_parts(rows: usize, cols: usize, q: Vec<i8>, scales: Vec<f32>) -> Result<Self> {
        let n = check_dims(rows, cols)?;
        check_len("int8 codes [rows, cols]", n, q.len())?;
        check_len("int8 scales [rows]", rows, scales.len())?;
        check_scales("int8 scales", &scales)?;
        if q.contains(&i8::MIN) {
            return Err(Error::InvalidParameter {
                what: "int8 codes",
                value: f32::from(i8::MIN),
                reason: "codes must be in -127..=127",
            });
        }
        Ok(Int8Weight {
            rows,
            cols,
            q,
            scales,
        })
    }

    /// Number of rows (`d_out`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (`d_in`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The codes, `[rows, cols]` row-major.
    pub fn q(&self) -> &[i8] {
        &self.q
    }

    /// One scale per row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Storage in bytes: `rows·cols` code bytes plus `4·rows` for the f32 scales.
    pub fn bytes(&self) -> usize {
        self.q.len() + std::mem::size_of::<f32>() * self.scales.len()
    }

    /// Element `(o, i)` dequantised: `q[o, i] as f32 · scale[o]` (one f32 multiply); `None` when
    /// `o >= rows` or `i >= cols`.
    #[inline]
    pub fn value(&self, o: usize, i: usize) -> Option<f32> {
        (o < self.rows && i < self.cols)
            .then(|| f32::from(self.q[o * self.cols + i]) * self.scales[o])
    }

    /// The dequantised weight, f32 `[rows, cols]`: `deq[o, i] = q[o, i] as f32 · scale[o]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(self.cols)
            .zip(&self.scales)
            .flat_map(|(row, &s)| row.iter().map(move |&q| f32::from(q) * s))
            .collect()
    }
}

/// A borrowed quantised weight of either format, for the functions that take both.
#[derive(Debug, Clone, Copy)]
pub enum QuantWeightRef<'a> {
    Nf4(&'a Nf4Weight),
    Int8(&'a Int8Weight),
}

impl QuantWeightRef<'_> {
    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            QuantWeightRef::Nf4(w) => (w.rows(), w.cols()),
            QuantWeightRef::Int8(w) => (w.rows(), w.cols()),
        }
    }

    /// The dequantised weight, f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantWeightRef::Nf4(w) => w.dequantize(),
            QuantWeightRef::Int8(w) => w.dequantize(),
        }
    }
}
