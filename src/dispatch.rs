//! The dispatch plan: a routing's non-empty (token, slot) pairs sorted by expert.
//!
//! Pairs are numbered by their flat slot index `t * k_max + s`. The plan lists them in expert order
//! (a stable counting sort: within an expert, by token, then by slot), with `expert_offsets[e]..
//! expert_offsets[e + 1]` the positions of expert `e`'s pairs. `slot_to_sorted` is the inverse: the
//! sorted position of every slot, or `-1` for an empty slot. Everything is i32 so the device holds
//! the same arrays. Built by [`crate::cpu::dispatch()`] (and, on the GPU, by its dispatch kernels,
//! which must give exactly the same arrays).

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    pub(crate) num_tokens: usize,
    pub(crate) k_max: usize,
    pub(crate) num_experts: usize,
    /// `[E + 1]`: start of each expert's run of sorted pairs; `expert_offsets[E]` = number of pairs.
    pub(crate) expert_offsets: Vec<i32>,
    /// `[P]`: flat slot index `t * k_max + s` of each sorted pair.
    pub(crate) sorted_slots: Vec<i32>,
    /// `[T * k_max]`: sorted position of each slot, `-1` for an empty slot.
    pub(crate) slot_to_sorted: Vec<i32>,
}

impl DispatchPlan {
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    pub fn k_max(&self) -> usize {
        self.k_max
    }
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// Number of non-empty (token, slot) pairs, `P`.
    pub fn num_pairs(&self) -> usize {
        self.sorted_slots.len()
    }
    /// `[E + 1]` offsets of each expert's segment in sorted order.
    pub fn expert_offsets(&self) -> &[i32] {
        &self.expert_offsets
    }
    /// `[P]` flat slot index of each sorted pair.
    pub fn sorted_slots(&self) -> &[i32] {
        &self.sorted_slots
    }
    /// `[T * k_max]` sorted position of each slot (`-1` = empty).
    pub fn slot_to_sorted(&self) -> &[i32] {
        &self.slot_to_sorted
    }
    /// Token of sorted pair `p`.
    pub fn token_of(&self, p: usize) -> usize {
        self.sorted_slots[p] as usize / self.k_max
    }
    /// Number of pairs routed to expert `e`.
    pub fn expert_count(&self, e: usize) -> usize {
        (self.expert_offsets[e + 1] - self.expert_offsets[e]) as usize
    }
}
