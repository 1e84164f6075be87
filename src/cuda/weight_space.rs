//! SAML's weight-space LoRA on the GPU as one workspace with its backward: per sequence `q` the mixed
//! adapter `Ā_q = Σ_e p_qe·A_e`, `B̄_q = Σ_e p_qe·B_e` ([`super::mix_experts`]), then
//! `y_t += s·(x_t·Ā_qᵀ)·B̄_qᵀ` on the segmented (SGMV) shrink and expand, one segment per sequence;
//! the backward is the mixed adapters' LoRA backward on a plan with one slot per token (its
//! sequence), then [`super::mix_backward`] to `dA_e`, `dB_e` and `dp`. The GPU counterpart of
//! [`crate::cpu::mole_forward_weight_space`]'s LoRA part and of `cpu::backward::mix_backward` after
//! the per-sequence LoRA backward. Everything is allocated in [`WeightSpaceLora::new`]; `forward`
//! and `backward` only enqueue kernels (no allocation, no host sync).

use super::backward::{lora_backward_experts, mix_backward, DeviceLoraGrads};
use super::device::Device;
use super::dispatch::{dispatch, DevicePlan};
use super::lora::{expand_segments, mix_experts, shrink_segments, CudaElement, DeviceSegments};
use super::memory::{Buffer, BufferView, DeviceRead, DeviceWrite};
use crate::{AdapterSegments, Error, LoraShape, Result, Segments};

/// Workspace of the weight-space LoRA for sequences of the given lengths (`T = Σ lengths` rows,
/// sequences contiguous and in order) and a [`LoraShape`] of `E` experts.
#[derive(Debug)]
pub struct WeightSpaceLora<T: CudaElement> {
    shape: LoraShape,
    mixed: LoraShape,
    num_seqs: usize,
    num_tokens: usize,
    segs: DeviceSegments,
    /// One slot per token holding its sequence, weight 1, and the plan over them (already in token
    /// order: the stable sort by sequence keeps it), for the backward.
    ids: Buffer<i32>,
    ones: Buffer<f32>,
    plan: DevicePlan,
    a_mixed: Buffer<T>,
    b_mixed: Buffer<T>,
    h: Buffer<f32>,
    grads: DeviceLoraGrads,
    da: Buffer<f32>,
    db: Buffer<f32>,
    dp: Buffer<f32>,
}

impl<T: CudaElement> WeightSpaceLora<T> {
    /// Allocates everything for sequences of `lengths` (at least one sequence, each at least one row)
    /// and `shape`; uploads the per-token sequence ids once.
    pub fn new(dev: &Device, lengths: &[usize], shape: &LoraShape) -> Result<Self> {
        if lengths.is_empty() || lengths.contains(&0) {
            return Err(Error::InvalidDim {
                what: "sequence lengths",
                value: 0,
                reason: "the weight-space workspace needs at least one sequence, each of at least one row",
            });
        }
        let num_seqs = lengths.len();
        let segments = Segments::from_lengths(lengths)?;
        let num_tokens = segments.num_rows();
        let mixed = LoraShape::new(num_seqs, shape.rank, shape.d_in, shape.d_out)?;
        let segs = DeviceSegments::new(dev, &AdapterSegments::identity(segments)?)?;
        let seq_ids: Vec<i32> = lengths
            .iter()
            .enumerate()
            .map(|(q, &n)| i32::try_from(q).map(|q| (q, n)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::InvalidDim {
                what: "sequences",
                value: num_seqs,
                reason: "sequence ids must fit an i32",
            })?
            .into_iter()
            .flat_map(|(q, n)| std::iter::repeat_n(q, n))
            .collect();
        let ids = dev.upload(&seq_ids)?;
        let mut plan = DevicePlan::new(dev, num_tokens, 1, num_seqs)?;
        dispatch(dev, &ids, &mut plan)?;
        Ok(WeightSpaceLora {
            shape: *shape,
            mixed,
            num_seqs,
            num_tokens,
            segs,
            ones: dev.upload(&vec![1.0f32; num_tokens])?,
            ids,
            plan,
            a_mixed: dev.zeros(mixed.a_len())?,
            b_mixed: dev.zeros(mixed.b_len())?,
            h: dev.zeros(num_tokens * shape.rank)?,
            grads: DeviceLoraGrads::new(dev, num_tokens, 1, &mixed)?,
            da: dev.zeros(shape.a_len())?,
            db: dev.zeros(shape.b_len())?,
            dp: dev.zeros(num_seqs * shape.num_experts)?,
        })
    }

    /// `y[t] += scale·(x_t·Ā_qᵀ)·B̄_qᵀ` for `x` `[T, d_in]`, experts `a`, `b`, one mixing vector per
    /// sequence `probs` `[S, E]` (f32); keeps the mixed adapters and the shrink for
    /// [`backward`](Self::backward). Asynchronous.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        probs: &impl DeviceRead<f32>,
        scale: f32,
        y: &mut impl DeviceWrite<T>,
    ) -> Result<()> {
        crate::gate::check_scale(scale)?;
        let shape = self.shape;
        mix_experts(
            dev,
            a,
            b,
            &shape,
            probs,
            self.num_seqs,
            &mut self.a_mixed,
            &mut self.b_mixed,
        )?;
        shrink_segments(dev, x, &self.a_mixed, &self.mixed, &self.segs, &mut self.h)?;
        expand_segments(
            dev,
            &self.h,
            &self.b_mixed,
            &self.mixed,
            &self.segs,
            scale,
            y,
        )
    }

    /// Gradients of the last [`forward`](Self::forward) given `dy` `[T, d_out]`, with the same `x`,
    /// `a`, `b`, `probs` and `scale`: [`dx`](Self::dx), [`da`](Self::da), [`db`](Self::db),
    /// [`dp`](Self::dp) (f32). Deterministic, asynchronous, no allocation.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        dev: &Device,
        x: &impl DeviceRead<T>,
        a: &impl DeviceRead<T>,
        b: &impl DeviceRead<T>,
        probs: &impl DeviceRead<f32>,
        dy: &impl DeviceRead<T>,
        scale: f32,
    ) -> Result<()> {
        lora_backward_experts(
            dev,
            x,
            &self.a_mixed,
            &self.b_mixed,
            &self.mixed,
            &self.plan,
            &self.ids,
            &self.ones,
            &self.h,
            dy,
            scale,
            &mut self.grads,
        )?;
        mix_backward(
            dev,
            a,
            b,
            &self.shape,
            probs,
            self.num_seqs,
            &self.grads.da(),
            &self.grads.db(),
            &mut self.da,
            &mut self.db,
            &mut self.dp,
        )
    }

    /// Device bytes the backward writes: the mixed adapters' gradient buffers and `dA`, `dB`, `dp`.
    pub fn backward_bytes(&self) -> usize {
        self.grads.device_bytes()
            + std::mem::size_of::<f32>() * (self.da.len() + self.db.len() + self.dp.len())
    }

    /// Rows `T`.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    /// `∂L/∂x` `[T, d_in]` after [`backward`](Self::backward).
    pub fn dx(&self) -> BufferView<'_, f32> {
        self.grads.dx()
    }
    /// `∂L/∂A` `[E, r, d_in]`.
    pub fn da(&self) -> BufferView<'_, f32> {
        self.da.view()
    }
    /// `∂L/∂B` `[E, d_out, r]`.
    pub fn db(&self) -> BufferView<'_, f32> {
        self.db.view()
    }
    /// `∂L/∂p` `[S, E]`.
    pub fn dp(&self) -> BufferView<'_, f32> {
        self.dp.view()
    }
}
