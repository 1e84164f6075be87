//! Routings: which experts each token (or each sequence) uses, and with what weight.
//!
//! * [`Routing`]: per token, `k_max` slots of `(expert id, weight)`; id `-1` marks an empty slot, which
//!   contributes exactly zero whatever its weight. Top-k fills all `k` slots; the dynamic threshold
//!   fills a varying number of them; dense routing uses `k_max = E`.
//! * [`Segments`]: contiguous runs of rows (sequences / utterances), as offsets `[S + 1]`.
//! * [`SeqRouting`]: one dense mixing vector `p_s ∈ R^E` per sequence (SAML's weight-space mixing, or
//!   HDMoLE's global posterior).
//! * [`AdapterSegments`]: one adapter id per sequence segment (punica's SGMV case; `-1` = no adapter).

use crate::error::{check_finite, check_len, checked_elems, Error, Result};

/// Largest number of (token, slot) pairs a routing may hold, so that every index fits an `i32` on
/// the device.
pub const MAX_PAIRS: usize = i32::MAX as usize;

/// Per-token routing `[T, k_max]`: expert ids (`-1` = empty slot) and f32 weights, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    num_tokens: usize,
    k_max: usize,
    num_experts: usize,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

impl Routing {
    /// Validates and wraps a routing. `ids` and `weights` are `[num_tokens, k_max]` row-major; every
    /// id is `-1` or in `0..num_experts`; the weight of every non-empty slot is finite (the weight of
    /// an empty slot is ignored). Duplicate ids within a token are allowed and add up.
    pub fn new(
        num_tokens: usize,
        k_max: usize,
        num_experts: usize,
        ids: Vec<i32>,
        weights: Vec<f32>,
    ) -> Result<Self> {
        if num_experts == 0 {
            return Err(Error::InvalidDim {
                what: "num_experts",
                value: 0,
                reason: "a routing needs at least one expert",
            });
        }
        if k_max == 0 {
            return Err(Error::InvalidDim {
                what: "k_max",
                value: 0,
                reason: "a routing needs at least one slot per token",
            });
        }
        let n = num_tokens
            .checked_mul(k_max)
            .filter(|&n| n <= MAX_PAIRS)
            .ok_or(Error::InvalidDim {
                what: "num_tokens * k_max",
                value: num_tokens.saturating_mul(k_max),
                reason: "must fit in an i32",
            })?;
        if num_experts > i32::MAX as usize {
            return Err(Error::InvalidDim {
                what: "num_experts",
                value: num_experts,
                reason: "must fit in an i32",
            });
        }
        check_len("routing ids [T, k_max]", n, ids.len())?;
        check_len("routing weights [T, k_max]", n, weights.len())?;
        for (i, (&id, &w)) in ids.iter().zip(&weights).enumerate() {
            if id < -1 || id >= num_experts as i32 {
                return Err(Error::ExpertIdOutOfRange {
                    token: i / k_max,
                    slot: i % k_max,
                    id,
                    num_experts,
                });
            }
            if id >= 0 && !w.is_finite() {
                return Err(Error::NonFinite {
                    what: "routing weights",
                    index: i,
                    value: w,
                });
            }
        }
        Ok(Routing {
            num_tokens,
            k_max,
            num_experts,
            ids,
            weights,
        })
    }

    /// A routing in which every slot is empty: the LoRA part is exactly zero.
    pub fn empty(num_tokens: usize, k_max: usize, num_experts: usize) -> Result<Self> {
        // The limit Routing::new enforces, checked before anything is allocated.
        let n = checked_elems("num_tokens * k_max", num_tokens, k_max, 8)?;
        if n > MAX_PAIRS {
            return Err(Error::InvalidDim {
                what: "num_tokens * k_max",
                value: n,
                reason: "must fit in an i32",
            });
        }
        Routing::new(num_tokens, k_max, num_experts, vec![-1; n], vec![0.0; n])
    }

    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    pub fn k_max(&self) -> usize {
        self.k_max
    }
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// Expert ids, `[T, k_max]` row-major.
    pub fn ids(&self) -> &[i32] {
        &self.ids
    }
    /// Weights, `[T, k_max]` row-major.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }
    /// Expert id of token `t`, slot `s` (`-1` when empty).
    pub fn id(&self, t: usize, s: usize) -> i32 {
        self.ids[t * self.k_max + s]
    }
    /// Weight of token `t`, slot `s`.
    pub fn weight(&self, t: usize, s: usize) -> f32 {
        self.weights[t * self.k_max + s]
    }
    /// Number of non-empty slots.
    pub fn num_active(&self) -> usize {
        self.ids.iter().filter(|&&id| id >= 0).count()
    }
    /// Splits into `(ids, weights)`.
    pub fn into_parts(self) -> (Vec<i32>, Vec<f32>) {
        (self.ids, self.weights)
    }
}

/// Contiguous row segments: `offsets[0] = 0`, non-decreasing, `offsets[S] = num_rows`. A segment may
/// be empty (`offsets[s] == offsets[s + 1]`), as an empty utterance in a batch is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    offsets: Vec<usize>,
}

impl Segments {
    /// Validates `offsets` (`[S + 1]`, S ≥ 1) against `num_rows`.
    pub fn new(offsets: Vec<usize>, num_rows: usize) -> Result<Self> {
        let bad = |reason, index: usize, previous: usize| Error::BadOffsets {
            what: "segment offsets",
            reason,
            index,
            value: offsets.get(index).copied().unwrap_or(0),
            previous,
            rows: num_rows,
        };
        if offsets.len() < 2 {
            return Err(Error::InvalidDim {
                what: "segment offsets length",
                value: offsets.len(),
                reason: "offsets need S + 1 >= 2 entries",
            });
        }
        if offsets[0] != 0 {
            return Err(bad("the first offset must be 0", 0, 0));
        }
        for i in 1..offsets.len() {
            if offsets[i] < offsets[i - 1] {
                return Err(bad("offsets must not decrease", i, offsets[i - 1]));
            }
        }
        let last = offsets.len() - 1;
        if offsets[last] != num_rows {
            return Err(bad(
                "the last offset must equal the number of rows",
                last,
                offsets[last - 1],
            ));
        }
        if num_rows > i32::MAX as usize {
            return Err(Error::InvalidDim {
                what: "num_rows",
                value: num_rows,
                reason: "must fit in an i32",
            });
        }
        Ok(Segments { offsets })
    }

    /// One segment covering all rows.
    pub fn single(num_rows: usize) -> Result<Self> {
        Segments::new(vec![0, num_rows], num_rows)
    }

    /// Segments of the given lengths.
    pub fn from_lengths(lengths: &[usize]) -> Result<Self> {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0usize);
        let mut acc = 0usize;
        for &l in lengths {
            acc = acc.checked_add(l).ok_or(Error::InvalidDim {
                what: "sum of segment lengths",
                value: usize::MAX,
                reason: "overflows usize",
            })?;
            offsets.push(acc);
        }
        Segments::new(offsets, acc)
    }

    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }
    pub fn num_segments(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn num_rows(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }
    /// Rows of segment `s`.
    pub fn range(&self, s: usize) -> std::ops::Range<usize> {
        self.offsets[s]..self.offsets[s + 1]
    }
    /// The segment each row belongs to, `[num_rows]`.
    pub fn segment_of_rows(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.num_rows());
        for s in 0..self.num_segments() {
            out.extend(std::iter::repeat_n(
                s,
                self.offsets[s + 1] - self.offsets[s],
            ));
        }
        out
    }
    /// Offsets as i32, the device layout.
    pub fn offsets_i32(&self) -> Vec<i32> {
        self.offsets.iter().map(|&o| o as i32).collect()
    }
}

/// One dense mixing vector per sequence: `probs[s, e]`, `[S, E]` row-major, all finite.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqRouting {
    segments: Segments,
    num_experts: usize,
    probs: Vec<f32>,
}

impl SeqRouting {
    pub fn new(segments: Segments, num_experts: usize, probs: Vec<f32>) -> Result<Self> {
        if num_experts == 0 {
            return Err(Error::InvalidDim {
                what: "num_experts",
                value: 0,
                reason: "a routing needs at least one expert",
            });
        }
        check_len(
            "per-sequence probs [S, E]",
            checked_elems("S * E", segments.num_segments(), num_experts, 4)?,
            probs.len(),
        )?;
        check_finite("per-sequence probs", &probs)?;
        Ok(SeqRouting {
            segments,
            num_experts,
            probs,
        })
    }
    pub fn segments(&self) -> &Segments {
        &self.segments
    }
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// `[S, E]` row-major.
    pub fn probs(&self) -> &[f32] {
        &self.probs
    }
    /// Mixing vector of sequence `s`.
    pub fn probs_of(&self, s: usize) -> &[f32] {
        &self.probs[s * self.num_experts..(s + 1) * self.num_experts]
    }
}

/// One adapter per sequence segment (`-1` = no adapter: the segment's LoRA output is exactly zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSegments {
    segments: Segments,
    num_adapters: usize,
    adapter_ids: Vec<i32>,
}

impl AdapterSegments {
    pub fn new(segments: Segments, num_adapters: usize, adapter_ids: Vec<i32>) -> Result<Self> {
        check_len(
            "adapter ids [S]",
            segments.num_segments(),
            adapter_ids.len(),
        )?;
        if num_adapters > i32::MAX as usize {
            return Err(Error::InvalidDim {
                what: "num_adapters",
                value: num_adapters,
                reason: "must fit in an i32",
            });
        }
        for (segment, &id) in adapter_ids.iter().enumerate() {
            if id < -1 || id >= num_adapters as i32 {
                return Err(Error::AdapterIdOutOfRange {
                    segment,
                    id,
                    num_adapters,
                });
            }
        }
        Ok(AdapterSegments {
            segments,
            num_adapters,
            adapter_ids,
        })
    }
    /// Segment `s` uses adapter `s` (the layout weight-space mixing produces).
    pub fn identity(segments: Segments) -> Result<Self> {
        let ids = (0..segments.num_segments() as i32).collect();
        let n = segments.num_segments();
        AdapterSegments::new(segments, n, ids)
    }
    pub fn segments(&self) -> &Segments {
        &self.segments
    }
    pub fn num_adapters(&self) -> usize {
        self.num_adapters
    }
    pub fn adapter_ids(&self) -> &[i32] {
        &self.adapter_ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_rejects_bad_ids_and_lengths() {
        assert!(matches!(
            Routing::new(2, 2, 4, vec![0, 1, 4, -1], vec![0.5; 4]),
            Err(Error::ExpertIdOutOfRange {
                token: 1,
                slot: 0,
                id: 4,
                num_experts: 4
            })
        ));
        assert!(matches!(
            Routing::new(2, 2, 4, vec![0, 1, -2, -1], vec![0.5; 4]),
            Err(Error::ExpertIdOutOfRange { id: -2, .. })
        ));
        assert!(matches!(
            Routing::new(2, 2, 4, vec![0, 1, 2], vec![0.5; 4]),
            Err(Error::LengthMismatch {
                expected: 4,
                got: 3,
                ..
            })
        ));
        assert!(matches!(
            Routing::new(1, 2, 4, vec![0, 1], vec![f32::NAN, 0.5]),
            Err(Error::NonFinite { index: 0, .. })
        ));
        // An empty slot's weight is ignored, even when it is NaN.
        assert!(Routing::new(1, 2, 4, vec![0, -1], vec![1.0, f32::NAN]).is_ok());
        assert!(Routing::new(0, 2, 4, vec![], vec![]).is_ok());
        assert!(matches!(
            Routing::new(1, 0, 4, vec![], vec![]),
            Err(Error::InvalidDim { what: "k_max", .. })
        ));
    }

    #[test]
    fn segments_validate_offsets() {
        assert!(Segments::new(vec![0, 3, 3, 7], 7).is_ok());
        assert!(matches!(
            Segments::new(vec![0, 4, 3, 7], 7),
            Err(Error::BadOffsets {
                index: 2,
                value: 3,
                previous: 4,
                ..
            })
        ));
        assert!(matches!(
            Segments::new(vec![0, 3, 6], 7),
            Err(Error::BadOffsets { index: 2, .. })
        ));
        assert!(matches!(
            Segments::new(vec![1, 3, 7], 7),
            Err(Error::BadOffsets { index: 0, .. })
        ));
        assert!(matches!(
            Segments::new(vec![0], 0),
            Err(Error::InvalidDim { .. })
        ));
        let s = Segments::from_lengths(&[2, 0, 3]).unwrap();
        assert_eq!(s.offsets(), &[0, 2, 2, 5]);
        assert_eq!(s.segment_of_rows(), vec![0, 0, 2, 2, 2]);
    }

    #[test]
    fn adapter_segments_validate_ids() {
        let seg = Segments::from_lengths(&[2, 3]).unwrap();
        assert!(AdapterSegments::new(seg.clone(), 3, vec![2, -1]).is_ok());
        assert!(matches!(
            AdapterSegments::new(seg, 3, vec![3, 0]),
            Err(Error::AdapterIdOutOfRange {
                segment: 0,
                id: 3,
                ..
            })
        ));
    }
}
