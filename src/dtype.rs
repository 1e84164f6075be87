//! Element types: f32, f16 and bf16 (from `half`). Every operation accumulates in f32 and rounds to
//! the element type once, when it writes its output.

use half::{bf16, f16};

/// The element type of a buffer, as a value (for error messages and the C ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name (`"f32"`, `"f16"`, `"bf16"`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An element type the operations accept. Conversions go through f32, which is exact for f16 and
/// bf16 (`to_f32`) and rounds to nearest-even (`from_f32`).
pub trait Element:
    Copy + Clone + Default + Send + Sync + PartialEq + std::fmt::Debug + 'static
{
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Converts a slice of f32 to the element type (rounding once per value).
pub fn from_f32_slice<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// Converts a slice of elements to f32 (exact).
pub fn to_f32_vec<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|&x| x.to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_for_representable_values() {
        for v in [0.0f32, 1.0, -2.5, 0.125, 65504.0] {
            assert_eq!(f16::from_f32(v).to_f32(), v);
        }
        for v in [0.0f32, 1.0, -2.5, 0.125, 3.0e38] {
            let b = <bf16 as Element>::from_f32(v);
            assert_eq!(<bf16 as Element>::from_f32(b.to_f32()), b);
        }
        assert_eq!(DType::BF16.size_in_bytes(), 2);
        assert_eq!(<f32 as Element>::DTYPE, DType::F32);
    }
}
