//! The MoLE operations as candle custom ops, with their backward wired into candle's autograd.
//!
//! Each op's `cpu_fwd` runs the crate's CPU path ([`crate::cpu`]) on the tensor's storage, and its
//! `bwd` runs the CPU backward ([`crate::cpu::backward`]); a candle model that calls these functions
//! trains through them with `loss.backward()`. The functions take and return candle tensors:
//!
//! | function | computes | gradients to |
//! |---|---|---|
//! | [`top_k_gate`] | dense `w` `[T, E]` of [`cpu::top_k`] | `p` |
//! | [`threshold_gate`] | dense `w` `[T, E]` of [`cpu::threshold_gate`] | `p`, `τ` |
//! | [`mole_lora`] | `Δy = s·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ` | `x`, `A`, `B`, `w` |
//! | [`quant_linear`] | `y = x·deq(W)ᵀ` for an NF4/int8 `W` | `x` (the weight is frozen), by [`cpu::quant_matmul_dx`] |
//! | [`weight_space_lora`] | SAML's `y = s·(x·Ā_qᵀ)·B̄_qᵀ` per sequence | `x`, `A`, `B`, `p` |
//!
//! The gates return the routing as a dense `[T, E]` matrix (zero for experts a token does not use),
//! which is what the rest of a candle model multiplies with; selection is not differentiated, as in
//! [`cpu::backward::gate_backward`].
//!
//! Device: with the feature `candle-cuda` every op also has a `cuda_fwd` on molora's kernels over
//! candle's CUDA storage (on the stream of the tensor's candle device, no copies through the host),
//! and every op has a GPU backward (nothing goes through the host). Without `candle-cuda` a CUDA tensor gives candle's "no cuda
//! implementation" error. On CUDA each op is the device op of `molora::cuda::ops` (the segmented
//! or dense-gated path by shape, any `E·r`).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
#[cfg(feature = "candle-cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::cpu::ops::{self as cpu_ops, split_packed as split_experts};
use crate::cpu::{self, Int8Weight, Nf4Weight};
use crate::error::{Error, Result};
use crate::{Element, LoraShape};

type CResult<T> = candle_core::Result<T>;

/// The output storage of `$body` computed with `$t` the element type of the float storage
/// `$storage` (f32, f16 or bf16); another dtype returns an error naming the op.
macro_rules! float_storage {
    ($op:literal, $storage:expr, $t:ident => $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F16(_) => {
                type $t = f16;
                CpuStorage::F16($body)
            }
            CpuStorage::BF16(_) => {
                type $t = bf16;
                CpuStorage::BF16($body)
            }
            other => {
                return Err(Error::Unsupported {
                    op: $op,
                    what: format!("dtype {:?} (the op takes f32, f16, bf16)", other.dtype()),
                }
                .into())
            }
        }
    };
}

/// A frozen quantised weight `[d_out, d_in]` for [`quant_linear`].
#[derive(Debug, Clone)]
pub enum QuantWeight {
    /// 4-bit NormalFloat, block 64 ([`cpu::quantize_nf4`]).
    Nf4(Nf4Weight),
    /// int8 per output channel ([`cpu::quantize_int8`]).
    Int8(Int8Weight),
}

impl QuantWeight {
    /// Rows (`d_out`).
    pub fn rows(&self) -> usize {
        match self {
            QuantWeight::Nf4(w) => w.rows(),
            QuantWeight::Int8(w) => w.rows(),
        }
    }

    /// Columns (`d_in`).
    pub fn cols(&self) -> usize {
        match self {
            QuantWeight::Nf4(w) => w.cols(),
            QuantWeight::Int8(w) => w.cols(),
        }
    }

    /// The weight borrowed as the crate's functions over both formats take it.
    pub fn as_ref(&self) -> cpu::QuantWeightRef<'_> {
        match self {
            QuantWeight::Nf4(w) => cpu::QuantWeightRef::Nf4(w),
            QuantWeight::Int8(w) => cpu::QuantWeightRef::Int8(w),
        }
    }

    /// Bytes the packed weight and its scales take.
    pub fn bytes(&self) -> usize {
        match self {
            QuantWeight::Nf4(w) => w.bytes(),
            QuantWeight::Int8(w) => w.bytes(),
        }
    }

    /// The dequantised weight, f32 `[d_out, d_in]`.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantWeight::Nf4(w) => w.dequantize(),
            QuantWeight::Int8(w) => w.dequantize(),
        }
    }

    /// Short name of the format (`"nf4"`, `"int8"`).
    pub fn format(&self) -> &'static str {
        match self {
            QuantWeight::Nf4(_) => "nf4",
            QuantWeight::Int8(_) => "int8",
        }
    }
}

fn msg(e: Error) -> candle_core::Error {
    e.into()
}

/// The contiguous slice of a CPU storage, or an error naming the input.
fn slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> CResult<&'a [T]> {
    let v = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(Error::NotContiguous { what: what.into() }.into()),
    }
}

/// `(rows, cols)` of a rank-2 layout.
fn dims2(l: &Layout, what: &str) -> CResult<(usize, usize)> {
    match l.dims() {
        [r, c] => Ok((*r, *c)),
        d => Err(Error::Rank {
            what: what.into(),
            expected: 2,
            shape: d.to_vec(),
        }
        .into()),
    }
}

/// A tensor's values as an f32 host vector (any float dtype, any layout).
pub fn host_f32(t: &Tensor) -> CResult<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn check_f32(t: &Tensor, what: &'static str) -> Result<()> {
    if t.dtype() == DType::F32 {
        Ok(())
    } else {
        Err(Error::Unsupported {
            op: what,
            what: format!(
                "dtype {:?} (router probabilities and gate weights are f32)",
                t.dtype()
            ),
        })
    }
}

fn check_rank2(t: &Tensor, what: &'static str) -> Result<(usize, usize)> {
    match t.dims() {
        [r, c] => Ok((*r, *c)),
        d => Err(Error::Unsupported {
            op: what,
            what: format!("shape {d:?} (expected a rank-2 tensor)"),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Top-k gate

struct TopKGate {
    k: usize,
    renormalize: bool,
}

impl TopKGate {
    fn gate(&self) -> RoutedGate {
        RoutedGate::TopK {
            k: self.k,
            renormalize: self.renormalize,
        }
    }
}

impl CustomOp1 for TopKGate {
    fn name(&self) -> &'static str {
        "molora-top-k-gate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (t, e) = dims2(l, "probs")?;
        let p = slice::<f32>(s, l, "probs")?;
        let w = cpu_ops::gate_forward(&self.gate(), p, None, t, e).map_err(msg)?;
        Ok((CpuStorage::F32(w), Shape::from((t, e))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        super::cuda_ops::gate_fwd(&self.gate(), (s, l), None)
    }

    fn bwd(&self, p: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        #[cfg(feature = "candle-cuda")]
        if p.device().is_cuda() {
            return Ok(Some(
                super::cuda_ops::gate_bwd(&self.gate(), p, None, grad)?.0,
            ));
        }
        let (t, e) = p.dims2()?;
        let (dp, _) =
            cpu_ops::gate_backward(&self.gate(), &host_f32(p)?, None, t, e, &host_f32(grad)?)
                .map_err(msg)?;
        Ok(Some(Tensor::from_vec(dp, (t, e), p.device())?))
    }
}

/// Top-k gate over router probabilities `p` (f32 `[T, E]`), as [`cpu::top_k`]: the `k` largest
/// probabilities of each row kept (ties to the lower id), renormalised to sum 1 when asked. Returns
/// the dense weights `w` `[T, E]`. Backward: `dp` through the kept (renormalised) weights.
pub fn top_k_gate(p: &Tensor, k: usize, renormalize: bool) -> Result<Tensor> {
    check_f32(p, "top_k_gate")?;
    let (_, e) = check_rank2(p, "top_k_gate")?;
    crate::gate::check_k(k, e)?;
    Ok(p.contiguous()?.apply_op1(TopKGate { k, renormalize })?)
}

// ---------------------------------------------------------------------------------------------
// Threshold gate

struct ThresholdGate;

impl CustomOp2 for ThresholdGate {
    fn name(&self) -> &'static str {
        "molora-threshold-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (t, e) = dims2(l1, "probs")?;
        let p = slice::<f32>(s1, l1, "probs")?;
        let tau = slice::<f32>(s2, l2, "tau")?;
        let w = cpu_ops::gate_forward(&RoutedGate::Threshold, p, Some(tau), t, e).map_err(msg)?;
        Ok((CpuStorage::F32(w), Shape::from((t, e))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        super::cuda_ops::gate_fwd(&RoutedGate::Threshold, (s1, l1), Some((s2, l2)))
    }

    fn bwd(
        &self,
        p: &Tensor,
        tau: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if p.device().is_cuda() {
            let (dp, dtau) = super::cuda_ops::gate_bwd(&RoutedGate::Threshold, p, Some(tau), grad)?;
            return Ok((Some(dp), dtau));
        }
        let (t, e) = p.dims2()?;
        let (dp, dtau) = cpu_ops::gate_backward(
            &RoutedGate::Threshold,
            &host_f32(p)?,
            Some(&host_f32(tau)?),
            t,
            e,
            &host_f32(grad)?,
        )
        .map_err(msg)?;
        Ok((
            Some(Tensor::from_vec(dp, (t, e), p.device())?),
            Some(Tensor::from_vec(dtau, t, p.device())?),
        ))
    }
}

/// HDMoLE's dynamic-threshold gate over router probabilities `p` (f32 `[T, E]`) and per-token
/// thresholds `tau` (f32 `[T]`), as [`cpu::threshold_gate`]: experts with `p ≥ τ` kept with
/// weights `(p − τ)/Σ(p − τ)`, the arg-max when none passes. Returns the dense weights `[T, E]`.
/// Backward: `dp` and `dτ` (so a learned `τ = σ(θ)/E` built with candle ops gets its `dθ`).
pub fn threshold_gate(p: &Tensor, tau: &Tensor) -> Result<Tensor> {
    check_f32(p, "threshold_gate")?;
    check_f32(tau, "threshold_gate")?;
    let (t, _) = check_rank2(p, "threshold_gate")?;
    crate::error::check_len("tau [T]", t, tau.elem_count())?;
    let tau = tau.flatten_all()?.contiguous()?;
    Ok(p.contiguous()?.apply_op2(&tau, ThresholdGate)?)
}

// ---------------------------------------------------------------------------------------------
// The LoRA part

struct MoleLora {
    shape: LoraShape,
    scale: f32,
}

impl MoleLora {
    fn forward<T: Element>(&self, x: &[T], ab: &[T], w: &[f32]) -> Result<Vec<T>> {
        let (a, b) = split_experts(ab, &self.shape)?;
        cpu_ops::mole_lora_forward(x, a, b, w, &self.shape, self.scale)
    }
}

impl CustomOp3 for MoleLora {
    fn name(&self) -> &'static str {
        "molora-lora"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (t, _) = dims2(l1, "x")?;
        let w = slice::<f32>(s3, l3, "w")?;
        let out = float_storage!(
            "molora-lora",
            s1,
            T => self.forward::<T>(slice(s1, l1, "x")?, slice(s2, l2, "experts")?, w)
                .map_err(msg)?
        );
        Ok((out, Shape::from((t, self.shape.d_out))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        super::cuda_ops::lora_fwd(&self.shape, self.scale, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ab: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            let (dx, dab, dw) = super::cuda_ops::lora_bwd(&self.shape, self.scale, x, ab, w, grad)?;
            return Ok((Some(dx), Some(dab), Some(dw)));
        }
        let (t, _) = x.dims2()?;
        let e = self.shape.num_experts;
        let abv = host_f32(ab)?;
        let (a, b) = split_experts(&abv, &self.shape).map_err(msg)?;
        let g = cpu_ops::mole_lora_backward(
            &host_f32(x)?,
            a,
            b,
            &host_f32(w)?,
            &self.shape,
            self.scale,
            &host_f32(grad)?,
        )
        .map_err(msg)?;
        let mut dab = g.da;
        dab.extend_from_slice(&g.db);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(g.dx, x.shape(), dev)?.to_dtype(x.dtype())?),
            Some(Tensor::from_vec(dab, ab.shape(), dev)?.to_dtype(ab.dtype())?),
            Some(Tensor::from_vec(g.dw, (t, e), dev)?),
        ))
    }
}

/// Checks experts `a` `[E, r, d_in]` and `b` `[E, d_out, r]` against the input width and the scale,
/// and packs them into the one tensor the ops take (`A` then `B`, flattened), so one custom op
/// carries both and candle's `cat` backward splits their gradients.
fn expert_shape(a: &Tensor, b: &Tensor, d_in: usize, scale: f32) -> Result<(LoraShape, Tensor)> {
    let (e, r, a_in) = a.dims3()?;
    let (b_e, d_out, b_r) = b.dims3()?;
    crate::error::check_len("A d_in (A [E, r, d_in] vs the input's d_in)", d_in, a_in)?;
    crate::error::check_len("B experts (B [E, d_out, r] vs A)", e, b_e)?;
    crate::error::check_len("B rank (B [E, d_out, r] vs A)", r, b_r)?;
    if !scale.is_finite() {
        return Err(Error::InvalidParameter {
            what: "scale",
            value: scale,
            reason: "must be finite",
        });
    }
    let shape = LoraShape::new(e, r, d_in, d_out)?;
    Ok((
        shape,
        Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)?,
    ))
}

/// The LoRA part of a MoLE layer: `Δy_t = s·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ` for `x` `[T, d_in]`, experts
/// `a` `[E, r, d_in]` and `b` `[E, d_out, r]` (x, a, b of one dtype: f32, f16 or bf16) and dense gate
/// weights `w` (f32 `[T, E]`, zero for unused experts). The forward is [`cpu::lora_delta`] over the
/// non-zero weights (f32 accumulation, one rounding at the output); the backward is
/// [`cpu::backward::lora_backward`] over every `(t, e)`, so `dw` is exact also where `w = 0` (the gates
/// then drop it: selection is not differentiated). Memory: nothing `[T, E, d]`-sized is built.
///
/// This packs `a` and `b` into one tensor per call; [`mole_lora_packed`] takes them packed.
pub fn mole_lora(x: &Tensor, a: &Tensor, b: &Tensor, w: &Tensor, scale: f32) -> Result<Tensor> {
    let (_, d_in) = check_rank2(x, "mole_lora")?;
    let (shape, ab) = expert_shape(a, b, d_in, scale)?;
    mole_lora_packed(x, &ab, shape, w, scale)
}

/// Checks the packed experts `ab` (1-D, `A` `[E, r, d_in]` then `B` `[E, d_out, r]`) against
/// `shape`, `x`'s dtype and `d_in`.
fn check_packed(
    op: &'static str,
    x_dtype: DType,
    d_in: usize,
    ab: &Tensor,
    shape: &LoraShape,
    scale: f32,
) -> Result<()> {
    crate::error::check_len("x d_in (vs the experts' d_in)", shape.d_in, d_in)?;
    let len = shape
        .a_len()
        .checked_add(shape.b_len())
        .ok_or(Error::Unsupported {
            op,
            what: format!("experts of shape {shape:?} overflow usize"),
        })?;
    match ab.dims() {
        [n] if *n == len => {}
        d => {
            return Err(Error::Unsupported {
                op,
                what: format!(
                    "packed experts of shape {d:?}, expected [{len}] (A [E, r, d_in] then B [E, d_out, r] \
                     flattened, for E = {}, r = {}, d_in = {}, d_out = {})",
                    shape.num_experts, shape.rank, shape.d_in, shape.d_out
                ),
            })
        }
    }
    if ab.dtype() != x_dtype {
        return Err(Error::Unsupported {
            op,
            what: format!(
                "the experts have dtype {:?} but x has {x_dtype:?}",
                ab.dtype()
            ),
        });
    }
    if !scale.is_finite() {
        return Err(Error::InvalidParameter {
            what: "scale",
            value: scale,
            reason: "must be finite",
        });
    }
    Ok(())
}

/// [`mole_lora`] with the experts packed as the kernels take them: `ab` 1-D, `A` `[E, r, d_in]`
/// then `B` `[E, d_out, r]` flattened (what [`crate::model::linear::MoleLinear`] stores, so its
/// forward copies no expert weights), of `x`'s dtype. Gradients flow to `x`, `ab` and `w`.
pub fn mole_lora_packed(
    x: &Tensor,
    ab: &Tensor,
    shape: LoraShape,
    w: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (t, d_in) = check_rank2(x, "mole_lora")?;
    check_f32(w, "mole_lora")?;
    check_packed("mole_lora", x.dtype(), d_in, ab, &shape, scale)?;
    let e = shape.num_experts;
    crate::error::check_len(
        "w [T, E]",
        crate::error::checked_elems("w [T, E]", t, e, 4)?,
        w.elem_count(),
    )?;
    let w = w.reshape((t, e))?.contiguous()?;
    Ok(x.contiguous()?
        .apply_op3(&ab.contiguous()?, &w, MoleLora { shape, scale })?)
}

// ---------------------------------------------------------------------------------------------
// From router probabilities to the LoRA output, in one op

/// The gate of [`routed_lora`]: how router probabilities become the experts' slots.
pub use crate::cpu::ops::RoutedGate;

struct RoutedLora {
    shape: LoraShape,
    scale: f32,
    gate: RoutedGate,
}

impl RoutedLora {
    /// `p` `[T, E]` and `τ` `[T]` from the gate input: `p` flattened, then `τ` for a threshold gate
    /// (1-D, `T·E (+ T)`), so the device reads both as contiguous ranges.
    fn split(&self, g: &[f32], t: usize) -> (Vec<f32>, Option<Vec<f32>>) {
        let n = (t * self.shape.num_experts).min(g.len());
        let (p, tau) = g.split_at(n);
        (p.to_vec(), self.gate.has_tau().then(|| tau.to_vec()))
    }

    fn forward<T: Element>(&self, x: &[T], ab: &[T], g: &[f32], t: usize) -> Result<Vec<T>> {
        let (a, b) = split_experts(ab, &self.shape)?;
        let (p, tau) = self.split(g, t);
        cpu_ops::routed_lora_forward(
            x,
            a,
            b,
            &p,
            tau.as_deref(),
            &self.gate,
            &self.shape,
            self.scale,
        )
    }
}

impl CustomOp3 for RoutedLora {
    fn name(&self) -> &'static str {
        "molora-routed-lora"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (t, _) = dims2(l1, "x")?;
        let g = slice::<f32>(s3, l3, "gate input")?;
        let want = t * self.shape.num_experts + if self.gate.has_tau() { t } else { 0 };
        if g.len() != want {
            return Err(Error::len_mismatch(
                "molora-routed-lora gate input (p then tau)",
                want,
                g.len(),
            )
            .into());
        }
        let out = float_storage!(
            "molora-routed-lora",
            s1,
            T => self.forward::<T>(slice(s1, l1, "x")?, slice(s2, l2, "experts")?, g, t)
                .map_err(msg)?
        );
        Ok((out, Shape::from((t, self.shape.d_out))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        super::cuda_ops::routed_fwd(
            &self.shape,
            self.scale,
            &self.gate,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        ab: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            let (dx, dab, dg) =
                super::cuda_ops::routed_bwd(&self.shape, self.scale, &self.gate, x, ab, g, grad)?;
            return Ok((Some(dx), Some(dab), Some(dg)));
        }
        let (t, _) = x.dims2()?;
        let (p, tau) = self.split(&host_f32(g)?, t);
        let abv = host_f32(ab)?;
        let (a, b) = split_experts(&abv, &self.shape).map_err(msg)?;
        let lg = cpu_ops::routed_lora_backward(
            &host_f32(x)?,
            a,
            b,
            &p,
            tau.as_deref(),
            &self.gate,
            &self.shape,
            self.scale,
            &host_f32(grad)?,
        )
        .map_err(msg)?;
        let mut dg = lg.dp;
        if self.gate.has_tau() {
            dg.extend_from_slice(&lg.dtau);
        }
        let mut dab = lg.da;
        dab.extend_from_slice(&lg.db);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(lg.dx, x.shape(), dev)?.to_dtype(x.dtype())?),
            Some(Tensor::from_vec(dab, ab.shape(), dev)?.to_dtype(ab.dtype())?),
            Some(Tensor::from_vec(dg, g.shape(), dev)?),
        ))
    }
}

/// The LoRA part of a MoLE layer from the router's probabilities, in one op: the crate's gate turns
/// `p` `[T, E]` (f32; for [`RoutedGate::Threshold`] with `tau` `[T]`) into sparse slots, which go
/// straight to the LoRA computation — no dense `[T, E]` weight matrix in between, no copy through the
/// host on CUDA — and `Δy_t = s·Σ_slots w_ts·(x_t·A_eᵀ)·B_eᵀ` (`x` `[T, d_in]`, experts packed as
/// [`mole_lora_packed`] takes them, of `x`'s dtype).
///
/// CPU: [`cpu::top_k`] / [`cpu::threshold_gate`] / [`cpu::dense`], then [`cpu::lora_delta`];
/// backward [`cpu::backward::lora_backward`] over the slots, then [`cpu::backward::gate_backward`] to `p` and
/// `τ` (selection is not differentiated). CUDA (`candle-cuda`): [`crate::cuda::MoleLoraForward`]
/// from probabilities on the path [`crate::cuda::LoraPath::for_shape`] picks (segmented or
/// dense-gated; any `E·r`), and its backward. Gradients flow to `x`, `ab`, `p` and `tau`.
pub fn routed_lora(
    x: &Tensor,
    ab: &Tensor,
    shape: LoraShape,
    p: &Tensor,
    tau: Option<&Tensor>,
    gate: RoutedGate,
    scale: f32,
) -> Result<Tensor> {
    let (t, d_in) = check_rank2(x, "routed_lora")?;
    check_packed("routed_lora", x.dtype(), d_in, ab, &shape, scale)?;
    check_f32(p, "routed_lora")?;
    let e = shape.num_experts;
    crate::error::check_len(
        "p [T, E]",
        crate::error::checked_elems("p [T, E]", t, e, 4)?,
        p.elem_count(),
    )?;
    if let RoutedGate::TopK { k, .. } = gate {
        crate::gate::check_k(k, e)?;
    }
    let p = p.flatten_all()?;
    let g = match (gate.has_tau(), tau) {
        (true, Some(tau)) => {
            check_f32(tau, "routed_lora")?;
            crate::error::check_len("tau [T]", t, tau.elem_count())?;
            Tensor::cat(&[&p, &tau.flatten_all()?], 0)?
        }
        (true, None) => {
            return Err(Error::Unsupported {
                op: "routed_lora",
                what: "a threshold gate without its thresholds tau [T]".into(),
            })
        }
        (false, _) => p,
    };
    Ok(x.contiguous()?.apply_op3(
        &ab.contiguous()?,
        &g.contiguous()?,
        RoutedLora { shape, scale, gate },
    )?)
}

// ---------------------------------------------------------------------------------------------
// Quantised base

struct QuantLinear {
    weight: Arc<QuantWeight>,
}

impl QuantLinear {
    fn forward<T: Element + candle_core::WithDType>(&self, x: &[T], t: usize) -> Result<Vec<T>> {
        let y = match &*self.weight {
            QuantWeight::Nf4(w) => cpu::nf4_matmul(x, t, w, None)?,
            QuantWeight::Int8(w) => cpu::int8_matmul(x, t, w, None)?,
        };
        Ok(y.into_iter().map(T::from_f32).collect())
    }
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "molora-quant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (t, _) = dims2(l, "x")?;
        let out = float_storage!(
            "molora-quant-linear",
            s,
            T => self.forward::<T>(slice(s, l, "x")?, t).map_err(msg)?
        );
        Ok((out, Shape::from((t, self.weight.rows()))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CResult<(CudaStorage, Shape)> {
        super::cuda_ops::quant_fwd(&self.weight, (s, l))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        // dx = dy·deq(W) on the packed weight (the weight is frozen).
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return Ok(Some(super::cuda_ops::quant_bwd(
                &self.weight,
                grad,
                x.dtype(),
            )?));
        }
        let (t, _) = grad.dims2()?;
        let dx = cpu::quant_matmul_dx(&host_f32(grad)?, t, &QuantWeight::as_ref(&self.weight))
            .map_err(msg)?;
        Ok(Some(
            Tensor::from_vec(dx, (t, self.weight.cols()), x.device())?.to_dtype(x.dtype())?,
        ))
    }
}

/// A frozen quantised linear layer without bias: `y = x·deq(W)ᵀ` (`x` `[T, d_in]`, f32/f16/bf16),
/// forward by [`cpu::nf4_matmul`] / [`cpu::int8_matmul`] on the packed weight; backward gives `dx =
/// dy·deq(W)` (the weight is frozen, so it gets no gradient).
pub fn quant_linear(x: &Tensor, weight: &Arc<QuantWeight>) -> Result<Tensor> {
    let (_, d_in) = check_rank2(x, "quant_linear")?;
    crate::error::check_len("x columns (quantised weight d_in)", weight.cols(), d_in)?;
    Ok(x.contiguous()?.apply_op1(QuantLinear {
        weight: Arc::clone(weight),
    })?)
}

// ---------------------------------------------------------------------------------------------
// SAML: weight-space mixing per sequence, then the segmented LoRA

struct WeightSpaceLora {
    shape: LoraShape,
    scale: f32,
    seq_len: usize,
}

impl WeightSpaceLora {
    /// `S` sequences of `seq_len` rows each.
    fn sequences(&self, s: usize) -> Result<crate::Segments> {
        crate::Segments::from_lengths(&vec![self.seq_len; s])
    }

    fn forward<T: Element>(&self, x: &[T], ab: &[T], p: &[f32], s: usize) -> Result<Vec<T>> {
        let (a, b) = split_experts(ab, &self.shape)?;
        let seq = self.sequences(s)?;
        cpu_ops::weight_space_forward(x, a, b, p, &seq, &self.shape, self.scale)
    }
}

impl CustomOp3 for WeightSpaceLora {
    fn name(&self) -> &'static str {
        "molora-weight-space-lora"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (s, _) = dims2(l3, "p")?;
        let p = slice::<f32>(s3, l3, "p")?;
        let out = float_storage!(
            "molora-weight-space-lora",
            s1,
            T => self.forward::<T>(slice(s1, l1, "x")?, slice(s2, l2, "experts")?, p, s)
                .map_err(msg)?
        );
        Ok((out, Shape::from((s * self.seq_len, self.shape.d_out))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> CResult<(CudaStorage, Shape)> {
        super::cuda_ops::weight_space_fwd(
            &self.shape,
            self.scale,
            self.seq_len,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        ab: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            let (dx, dab, dp) = super::cuda_ops::weight_space_bwd(
                &self.shape,
                self.scale,
                self.seq_len,
                x,
                ab,
                p,
                grad,
            )?;
            return Ok((Some(dx), Some(dab), Some(dp)));
        }
        let (s, e) = p.dims2()?;
        let abv = host_f32(ab)?;
        let (a, b) = split_experts(&abv, &self.shape).map_err(msg)?;
        let seq = self.sequences(s).map_err(msg)?;
        let cpu_ops::WeightSpaceGrads { dx, mut da, db, dp } = cpu_ops::weight_space_backward(
            &host_f32(x)?,
            a,
            b,
            &host_f32(p)?,
            &seq,
            &self.shape,
            self.scale,
            &host_f32(grad)?,
        )
        .map_err(msg)?;
        da.extend_from_slice(&db);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?.to_dtype(x.dtype())?),
            Some(Tensor::from_vec(da, ab.shape(), dev)?.to_dtype(ab.dtype())?),
            Some(Tensor::from_vec(dp, (s, e), dev)?),
        ))
    }
}

/// SAML's weight-space mixture of LoRA experts: for `x` `[S, L, d_in]` (S sequences of L rows),
/// experts `a` `[E, r, d_in]`, `b` `[E, d_out, r]` (of `x`'s dtype: f32, f16 or bf16) and one mixing
/// vector per sequence `p` `[S, E]` (any float dtype, used in f32): `y_{q,t} = s·(x_{q,t}·Ā_qᵀ)·B̄_qᵀ`
/// with `Ā_q = Σ_e p_qe·A_e`, `B̄_q = Σ_e p_qe·B_e` (not `Σ_e p_qe·B_e·A_e`: the cross terms are part
/// of the method). Forward: [`cpu::mix_experts`] then the segmented shrink/expand
/// ([`cpu::shrink_segments`], [`cpu::expand_segments`]), one segment per sequence, in f32 with one
/// rounding at the output; backward: the single-adapter LoRA backward per sequence, then
/// [`cpu::backward::mix_backward`] to `p`, `A_e`, `B_e`. Returns `[S, L, d_out]` in `x`'s dtype.
pub fn weight_space_lora(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    p: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (_, _, d_in) = x.dims3()?;
    let (shape, ab) = expert_shape(a, b, d_in, scale)?;
    weight_space_lora_packed(x, &ab, shape, p, scale)
}

/// [`weight_space_lora`] with the experts packed as [`mole_lora_packed`] takes them.
pub fn weight_space_lora_packed(
    x: &Tensor,
    ab: &Tensor,
    shape: LoraShape,
    p: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (s, l, d_in) = x.dims3()?;
    check_packed("weight_space_lora", x.dtype(), d_in, ab, &shape, scale)?;
    let (e, d_out) = (shape.num_experts, shape.d_out);
    crate::error::check_len(
        "p [S, E]",
        crate::error::checked_elems("p [S, E]", s, e, 4)?,
        p.elem_count(),
    )?;
    let x2 = x.reshape((s * l, d_in))?.contiguous()?;
    let p = p.to_dtype(DType::F32)?.reshape((s, e))?.contiguous()?;
    let y = x2.apply_op3(
        &ab.contiguous()?,
        &p,
        WeightSpaceLora {
            shape,
            scale,
            seq_len: l,
        },
    )?;
    Ok(y.reshape((s, l, d_out))?)
}
