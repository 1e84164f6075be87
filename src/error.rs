//! The crate's one error type. Every variant carries the values that made the input invalid, so a
//! message such as `expert id 9 at token 3, slot 1 is out of range for 8 experts` says what to fix.
//!
//! Validation runs before any computation (and, on the CUDA path, before any `unsafe` code), so an
//! `Err` never leaves an output half written.

use crate::dtype::DType;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in a molora operation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A buffer's length does not match the shape the operation was given.
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },

    /// A dimension is zero (or otherwise outside what the operation accepts).
    #[error("{what} = {value} is invalid: {reason}")]
    InvalidDim {
        what: &'static str,
        value: usize,
        reason: &'static str,
    },

    /// LoRA rank 0, or above the largest rank an operation supports.
    #[error("LoRA rank {rank} is invalid: rank must be in 1..={max}")]
    InvalidRank { rank: usize, max: usize },

    /// `k = 0` or `k > E` for top-k gating.
    #[error(
        "top-k with k = {k} is invalid for {num_experts} experts: k must be in 1..={num_experts}"
    )]
    InvalidK { k: usize, num_experts: usize },

    /// An expert id in a routing is `>= E` or below `-1`.
    #[error("expert id {id} at token {token}, slot {slot} is out of range for {num_experts} experts (valid: -1 for an empty slot, or 0..{num_experts})")]
    ExpertIdOutOfRange {
        token: usize,
        slot: usize,
        id: i32,
        num_experts: usize,
    },

    /// An adapter id of a sequence segment is `>= N` or below `-1`.
    #[error("adapter id {id} of segment {segment} is out of range for {num_adapters} adapters (valid: -1 for no adapter, or 0..{num_adapters})")]
    AdapterIdOutOfRange {
        segment: usize,
        id: i32,
        num_adapters: usize,
    },

    /// A NaN or infinity where a finite number is required (logits, probabilities, thresholds, weights).
    #[error("{what}[{index}] = {value} is not finite")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },

    /// A scalar parameter outside its valid range (temperature <= 0, lambda outside [0, 1], ...).
    #[error("{what} = {value} is invalid: {reason}")]
    InvalidParameter {
        what: &'static str,
        value: f32,
        reason: &'static str,
    },

    /// Offsets of sequence (or expert) segments that do not start at 0, decrease, or do not end at the
    /// number of rows.
    #[error("{what}: {reason} (offsets[{index}] = {value}, previous = {previous}, rows = {rows})")]
    BadOffsets {
        what: &'static str,
        reason: &'static str,
        index: usize,
        value: usize,
        previous: usize,
        rows: usize,
    },

    /// Tensors of different element types were combined.
    #[error("dtype mismatch in {what}: expected {expected:?}, got {got:?}")]
    DTypeMismatch {
        what: &'static str,
        expected: DType,
        got: DType,
    },

    /// A shape or configuration that no kernel handles; the message names it.
    #[error("unsupported by {op}: {what}")]
    Unsupported { op: &'static str, what: String },

    /// The crate was built without the `cuda` feature.
    #[error("{op} needs the CUDA path, but molora was built without the `cuda` feature (rebuild with `--features cuda`)")]
    CudaNotCompiled { op: &'static str },

    /// The emulated CUDA device was asked for, but the crate was built without the `emu` feature.
    #[error("{op} needs the emulated CUDA device, but molora was built without the `emu` feature (rebuild with `--features emu`)")]
    EmuNotCompiled { op: &'static str },

    /// A buffer of one kind of device memory passed to an op on a device of the other kind: an
    /// emulated buffer on a GPU device, or GPU memory (a cudarc buffer) on the emulated device.
    #[error("{what}: {buffer} memory cannot be used on the {device} device (allocate it with that device's upload or zeros)")]
    DeviceMismatch {
        what: &'static str,
        buffer: &'static str,
        device: &'static str,
    },

    /// A sub-range of a device buffer that does not lie inside it.
    #[error("range {start}..{end} is out of bounds for a device buffer of {len} elements")]
    OutOfBounds {
        start: usize,
        end: usize,
        len: usize,
    },

    /// No usable GPU or driver was found at run time.
    #[error("no CUDA device available: {reason}")]
    NoDevice { reason: String },

    /// A CUDA launcher or runtime call failed.
    #[error("CUDA error in {op}: code {code} ({message})")]
    Cuda {
        op: &'static str,
        code: i32,
        message: String,
    },

    /// An error reported by the CUDA driver API (through cudarc).
    #[error("CUDA driver error: {0}")]
    Driver(String),

    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io { path: String, message: String },

    /// A weight file (safetensors, PEFT adapter, config) does not fit what was asked of it: a missing
    /// or unexpected key, a shape that does not match, a config field out of range.
    #[error("{source_name}: {key}: {detail}")]
    Weights {
        source_name: String,
        key: String,
        detail: String,
    },

    /// A tensor handed to a molora op that is not laid out contiguously (feature `candle`).
    #[error("{what}: the molora ops need a contiguous tensor (call .contiguous() first)")]
    NotContiguous { what: String },

    /// A tensor of the wrong rank (feature `candle`).
    #[error("{what}: expected a rank-{expected} tensor, got shape {shape:?}")]
    Rank {
        what: String,
        expected: usize,
        shape: Vec<usize>,
    },

    /// An error raised inside candle (feature `candle`), as text; molora's own errors that passed
    /// through candle come back as themselves, not as this.
    #[error("candle: {0}")]
    Candle(String),
}

impl Error {
    /// Shorthand for [`Error::Weights`].
    pub fn weights(
        source: impl Into<String>,
        key: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Error::Weights {
            source_name: source.into(),
            key: key.into(),
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Error::LengthMismatch`].
    pub fn len_mismatch(what: &'static str, expected: usize, got: usize) -> Self {
        Error::LengthMismatch {
            what,
            expected,
            got,
        }
    }
}

/// `a·b` elements of `elem_bytes` bytes each, checked: the product must not overflow and the buffer
/// must be one a process can hold (at most `isize::MAX` bytes), else [`Error::InvalidDim`] naming
/// `what`.
pub fn checked_elems(what: &'static str, a: usize, b: usize, elem_bytes: usize) -> Result<usize> {
    match a.checked_mul(b) {
        Some(n)
            if n.checked_mul(elem_bytes.max(1))
                .is_some_and(|bytes| bytes <= isize::MAX as usize) =>
        {
            Ok(n)
        }
        _ => Err(Error::InvalidDim {
            what,
            value: if a > b { a } else { b },
            reason: "the buffer would be larger than a process can hold",
        }),
    }
}

/// A `[rows, cols]` buffer of 4-byte elements has `len` elements: the product checked as
/// [`checked_elems`] does, then [`check_len`], both naming `what`.
pub fn check_matrix(what: &'static str, rows: usize, cols: usize, len: usize) -> Result<()> {
    check_len(what, checked_elems(what, rows, cols, 4)?, len)
}

/// The product of `dims` (elements of a tensor of that shape), checked like [`checked_elems`] with
/// 4-byte elements.
pub fn checked_product(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| checked_elems(what, n, d, 4))
}

/// `E ≥ 1`, else [`Error::InvalidDim`] naming `num_experts`.
pub fn check_experts_nonzero(num_experts: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::InvalidDim {
            what: "num_experts",
            value: 0,
            reason: "must be at least 1",
        });
    }
    Ok(())
}

/// Checks that `got == expected`, naming the buffer in the error otherwise.
pub fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::len_mismatch(what, expected, got))
    }
}

/// Checks that every value in `values` is finite, naming the first one that is not.
pub fn check_finite(what: &'static str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            what,
            index,
            value: values[index],
        }),
    }
}

/// `y_offset + d_out ≤ y_stride`, else an error naming the three.
pub fn check_columns(y_stride: usize, y_offset: usize, d_out: usize) -> Result<()> {
    match y_offset.checked_add(d_out) {
        Some(end) if end <= y_stride => Ok(()),
        _ => Err(Error::Unsupported {
            op: "add_lora",
            what: format!(
                "columns {y_offset}..{y_offset}+{d_out} of rows of {y_stride} columns (y_offset + d_out must be ≤ y's row stride)"
            ),
        }),
    }
}
