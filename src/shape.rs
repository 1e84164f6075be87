//! Shapes of a MoLE layer and the memory layouts every path (CPU and CUDA) shares.
//!
//! Layouts are PyTorch's / PEFT's, so weights load without transposes:
//!
//! | tensor | shape | meaning |
//! |---|---|---|
//! | `x` | `[T, d_in]` | input rows |
//! | `y` | `[T, d_out]` | output rows |
//! | base `W0` | `[d_out, d_in]` | `nn.Linear.weight`; `y = x·W0ᵀ (+ bias)` |
//! | router `W_g` | `[E, d_in]`, `b_g` `[E]` | `logits = x·W_gᵀ + b_g` |
//! | expert `A` | `[E, r, d_in]` | PEFT `lora_A.weight` stacked; `h = x·A_eᵀ` (`[r]` per row) |
//! | expert `B` | `[E, d_out, r]` | PEFT `lora_B.weight` stacked; `Δy = h·B_eᵀ` |
//!
//! So the formula `y_t = x_t·W0 + s·Σ_e w_te·(x_t·A_e)·B_e` of the papers (with `A_e: d_in × r`,
//! `B_e: r × d_out`) is computed with the transposed, row-major storage above.

use crate::error::{Error, Result};

/// Largest LoRA rank the operations accept.
pub const MAX_RANK: usize = 256;

/// The dimensions of a set of LoRA experts on one linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoraShape {
    pub num_experts: usize,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
}

impl LoraShape {
    /// Validates: at least one expert, rank in `1..=MAX_RANK`, `d_in, d_out >= 1`, and every buffer
    /// length fits an `i32` index.
    pub fn new(num_experts: usize, rank: usize, d_in: usize, d_out: usize) -> Result<Self> {
        if num_experts == 0 {
            return Err(Error::InvalidDim {
                what: "num_experts",
                value: 0,
                reason: "need at least one expert",
            });
        }
        if rank == 0 || rank > MAX_RANK {
            return Err(Error::InvalidRank {
                rank,
                max: MAX_RANK,
            });
        }
        for (what, value) in [("d_in", d_in), ("d_out", d_out)] {
            if value == 0 {
                return Err(Error::InvalidDim {
                    what,
                    value,
                    reason: "must be at least 1",
                });
            }
        }
        let s = LoraShape {
            num_experts,
            rank,
            d_in,
            d_out,
        };
        let biggest = num_experts
            .checked_mul(rank)
            .and_then(|er| er.checked_mul(d_in.max(d_out)));
        match biggest {
            Some(n) if n <= i32::MAX as usize => Ok(s),
            _ => Err(Error::InvalidDim {
                what: "num_experts * rank * max(d_in, d_out)",
                value: biggest.unwrap_or(usize::MAX),
                reason: "expert stacks must have fewer than 2^31 elements",
            }),
        }
    }
    /// Elements of the stacked `A`, `[E, r, d_in]`.
    pub fn a_len(&self) -> usize {
        self.num_experts * self.rank * self.d_in
    }
    /// Elements of the stacked `B`, `[E, d_out, r]`.
    pub fn b_len(&self) -> usize {
        self.num_experts * self.d_out * self.rank
    }
}
