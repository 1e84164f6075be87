"""The molora torch ops: ``torch.library`` custom ops in the ``molora`` namespace, each with a fake
(meta) kernel so ``torch.compile`` traces it, and autograd through the crate's backward.

Layouts are PEFT's: ``x [T, d_in]``, experts ``a [E, r, d_in]`` and ``b [E, d_out, r]`` of one float
dtype (float32, float16, bfloat16); router probabilities, gate weights, thresholds and mixing vectors
are float32. Each forward accumulates in f32 and rounds once at its output; each backward runs in f32
and returns gradients in the inputs' dtypes.

CPU tensors run on the crate's reference path; CUDA tensors (a build with ``--features cuda``) on its
kernels, zero-copy, on ``torch.cuda.current_stream()``, for every op but ``route`` and
``quant_linear``.

Every input is checked before any work (dtype, device, rank, shape, contiguity); a wrong one raises
``ValueError`` naming the argument and the values, and so does anything the crate rejects (an
expert id out of range, a NaN probability, bad sequence offsets), with the crate's message.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C

_FLOATS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------
# Checks shared by the kernels and the fake kernels


def _tensor(name: str, t, rank: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a rank-{rank} tensor, got shape {tuple(t.shape)}")
    return t


def _float(name: str, t: Tensor) -> str:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    return _FLOATS[t.dtype]


def _f32(name: str, t: Tensor) -> None:
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: dtype {t.dtype}, expected torch.float32 (gate math runs in f32)")


def _same_device(names: Sequence[str], ts: Sequence[Tensor]) -> None:
    d0 = ts[0].device
    for n, t in zip(names[1:], ts[1:]):
        if t.device != d0:
            raise ValueError(f"{n}: on {t.device}, but {names[0]} is on {d0}")


def _experts(x: Tensor, a: Tensor, b: Tensor) -> Tuple[int, int, int, int, int]:
    """``(T, E, r, d_in, d_out)`` of ``x [T, d_in]``, ``a [E, r, d_in]``, ``b [E, d_out, r]``."""
    _tensor("x", x, 2)
    _tensor("a", a, 3)
    _tensor("b", b, 3)
    _float("x", x)
    for n, t in (("a", a), ("b", b)):
        if t.dtype != x.dtype:
            raise ValueError(f"{n}: dtype {t.dtype}, but x is {x.dtype} (x, a, b share one dtype)")
    t, d_in = x.shape
    e, r, a_in = a.shape
    b_e, d_out, b_r = b.shape
    if a_in != d_in:
        raise ValueError(f"a: shape {tuple(a.shape)} is [E, r, d_in] with d_in = {a_in}, but x has d_in = {d_in}")
    if (b_e, b_r) != (e, r):
        raise ValueError(f"b: shape {tuple(b.shape)} is not [E, d_out, r] for E = {e}, r = {r} of a")
    return t, e, r, d_in, d_out


def _scale(scale: float) -> None:
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale = {scale} is invalid: must be finite")


def _placement(names: Sequence[str], ts: Sequence[Tensor], op: str, cuda: bool = True) -> Optional[int]:
    """Where an op runs: ``None`` for CPU tensors (the crate's reference path), the device index for
    CUDA tensors (the kernels, when this build has them and the op has a CUDA path). Every tensor
    must be on the same device and contiguous."""
    _same_device(names, ts)
    for n, t in zip(names, ts):
        if not t.is_contiguous():
            raise ValueError(f"{n}: the molora ops need a contiguous tensor (call .contiguous() first)")
    d = ts[0].device
    if d.type == "cpu":
        return None
    if d.type != "cuda":
        raise ValueError(f"{names[0]}: a tensor on {d}; molora runs CPU and CUDA tensors")
    if not _C.has_cuda:
        raise ValueError(
            f"{op}: {names[0]} is on {d}, but this build of the molora package has no CUDA kernels "
            "(build it with MATURIN_PEP517_ARGS=\"--features cuda\" pip install ./python)"
        )
    if not cuda:
        raise ValueError(f"{op}: {names[0]} is on {d}; this op runs CPU tensors only")
    return d.index if d.index is not None else torch.cuda.current_device()


def _host(names: Sequence[str], ts: Sequence[Tensor]) -> None:
    """For the ops without a CUDA path: CPU, contiguous."""
    _placement(names, ts, names[0], cuda=False)


def _stream(dev: int) -> int:
    return torch.cuda.current_stream(dev).cuda_stream


def _buf(t: Tensor) -> Tuple[int, int]:
    return (t.data_ptr(), t.numel())


def _opt(t: Optional[Tensor]):
    return None if t is None else _buf(t)


def _f32c(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# mole_lora: dense weights


def _check_mole_lora(x, a, b, w, scale):
    t, e, r, d_in, d_out = _experts(x, a, b)
    _tensor("w", w, 2)
    _f32("w", w)
    if tuple(w.shape) != (t, e):
        raise ValueError(f"w: shape {tuple(w.shape)}, expected [T, E] = [{t}, {e}]")
    _scale(scale)
    return t, e, r, d_in, d_out


@torch.library.custom_op("molora::mole_lora", mutates_args=())
def mole_lora(x: Tensor, a: Tensor, b: Tensor, w: Tensor, scale: float) -> Tensor:
    """``Δy_t = scale·Σ_e w[t, e]·(x_t·A_eᵀ)·B_eᵀ`` for dense gate weights ``w [T, E]`` (float32,
    zero for unused experts), ``[T, d_out]`` in ``x``'s dtype."""
    t, e, r, d_in, d_out = _check_mole_lora(x, a, b, w, scale)
    dev = _placement(("x", "a", "b", "w"), (x, a, b, w), "mole_lora")
    if dev is not None:
        out = x.new_zeros((t, d_out))
        _C.cuda_mole_lora(_float("x", x), dev, _stream(dev), _buf(x), _buf(a), _buf(b), _buf(w), _buf(out),
                          (e, r, d_in, d_out), scale)
        return out
    out = x.new_empty((t, d_out))
    _C.mole_lora(_float("x", x), _buf(x), _buf(a), _buf(b), _buf(w), _buf(out), (e, r, d_in, d_out), scale)
    return out


@mole_lora.register_fake
def _(x, a, b, w, scale):
    t, _, _, _, d_out = _check_mole_lora(x, a, b, w, scale)
    return x.new_empty((t, d_out))


@torch.library.custom_op("molora::mole_lora_backward", mutates_args=())
def mole_lora_backward(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, w: Tensor, scale: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients ``(dx, da, db, dw)`` of :func:`mole_lora` (``dw`` exact also where ``w = 0``)."""
    t, e, r, d_in, d_out = _check_mole_lora(x, a, b, w, scale)
    dev = _placement(("x", "a", "b", "w"), (x, a, b, w), "mole_lora_backward")
    if dev is not None:
        g = grad.detach().to(x.dtype).contiguous()
        dx, da, db, dw = (torch.empty(v.shape, dtype=torch.float32, device=v.device) for v in (x, a, b, w))
        _C.cuda_mole_lora_backward(_float("x", x), dev, _stream(dev), _buf(x), _buf(a), _buf(b), _buf(w), _buf(g),
                                   _buf(dx), _buf(da), _buf(db), _buf(dw), (e, r, d_in, d_out), scale)
        return dx.to(x.dtype), da.to(a.dtype), db.to(b.dtype), dw
    g, xf, af, bf, wf = (_f32c(v) for v in (grad, x, a, b, w))
    _host(("grad", "x", "a", "b", "w"), (g, xf, af, bf, wf))
    dx, da, db, dw = (torch.empty_like(v) for v in (xf, af, bf, wf))
    _C.mole_lora_backward(
        _buf(xf), _buf(af), _buf(bf), _buf(wf), _buf(g), _buf(dx), _buf(da), _buf(db), _buf(dw), (e, r, d_in, d_out), scale
    )
    return dx.to(x.dtype), da.to(a.dtype), db.to(b.dtype), dw


@mole_lora_backward.register_fake
def _(grad, x, a, b, w, scale):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(w)


def _mole_lora_setup(ctx, inputs, output):
    x, a, b, w, scale = inputs
    ctx.save_for_backward(x, a, b, w)
    ctx.scale = scale


def _mole_lora_bwd(ctx, grad):
    x, a, b, w = ctx.saved_tensors
    dx, da, db, dw = mole_lora_backward(grad.contiguous(), x, a, b, w, ctx.scale)
    return dx, da, db, dw, None


mole_lora.register_autograd(_mole_lora_bwd, setup_context=_mole_lora_setup)


# ---------------------------------------------------------------------------------------------
# mole_lora_routed: sparse slots


def _check_routed(x, a, b, ids, weights, scale):
    t, e, r, d_in, d_out = _experts(x, a, b)
    _tensor("ids", ids, 2)
    _tensor("weights", weights, 2)
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids: dtype {ids.dtype}, expected torch.int32 or torch.int64")
    _f32("weights", weights)
    if ids.shape[0] != t or tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(
            f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)}: expected both [T, k] with T = {t}"
        )
    _scale(scale)
    return t, e, r, d_in, d_out, ids.shape[1]


@torch.library.custom_op("molora::mole_lora_routed", mutates_args=())
def mole_lora_routed(x: Tensor, a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float) -> Tensor:
    """``Δy_t = scale·Σ_s weights[t, s]·(x_t·A_eᵀ)·B_eᵀ`` with ``e = ids[t, s]`` (``-1`` = an empty
    slot, exactly zero), ``[T, d_out]`` in ``x``'s dtype."""
    t, e, r, d_in, d_out, k = _check_routed(x, a, b, ids, weights, scale)
    ids32 = ids.to(torch.int32).contiguous()
    dev = _placement(("x", "a", "b", "ids", "weights"), (x, a, b, ids32, weights), "mole_lora_routed")
    if dev is not None:
        out = x.new_zeros((t, d_out))
        _C.cuda_mole_lora_routed(_float("x", x), dev, _stream(dev), _buf(x), _buf(a), _buf(b), _buf(ids32),
                                 _buf(weights), k, _buf(out), (e, r, d_in, d_out), scale)
        return out
    out = x.new_empty((t, d_out))
    _C.mole_lora_routed(
        _float("x", x), _buf(x), _buf(a), _buf(b), _buf(ids32), _buf(weights), k, _buf(out), (e, r, d_in, d_out), scale
    )
    return out


@mole_lora_routed.register_fake
def _(x, a, b, ids, weights, scale):
    t, _, _, _, d_out, _ = _check_routed(x, a, b, ids, weights, scale)
    return x.new_empty((t, d_out))


@torch.library.custom_op("molora::mole_lora_routed_backward", mutates_args=())
def mole_lora_routed_backward(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients ``(dx, da, db, dweights)`` of :func:`mole_lora_routed` (0 on empty slots)."""
    t, e, r, d_in, d_out, k = _check_routed(x, a, b, ids, weights, scale)
    ids32 = ids.to(torch.int32).contiguous()
    dev = _placement(("x", "a", "b", "ids", "weights"), (x, a, b, ids32, weights), "mole_lora_routed_backward")
    if dev is not None:
        g = grad.detach().to(x.dtype).contiguous()
        dx, da, db, dw = (torch.empty(v.shape, dtype=torch.float32, device=v.device) for v in (x, a, b, weights))
        _C.cuda_mole_lora_routed_backward(
            _float("x", x), dev, _stream(dev), _buf(x), _buf(a), _buf(b), _buf(ids32), _buf(weights), k, _buf(g),
            _buf(dx), _buf(da), _buf(db), _buf(dw), (e, r, d_in, d_out), scale,
        )
        return dx.to(x.dtype), da.to(a.dtype), db.to(b.dtype), dw
    g, xf, af, bf, wf = (_f32c(v) for v in (grad, x, a, b, weights))
    _host(("grad", "x", "a", "b", "ids", "weights"), (g, xf, af, bf, ids32, wf))
    dx, da, db, dw = (torch.empty_like(v) for v in (xf, af, bf, wf))
    _C.mole_lora_routed_backward(
        _buf(xf), _buf(af), _buf(bf), _buf(ids32), _buf(wf), k, _buf(g), _buf(dx), _buf(da), _buf(db), _buf(dw),
        (e, r, d_in, d_out), scale,
    )
    return dx.to(x.dtype), da.to(a.dtype), db.to(b.dtype), dw


@mole_lora_routed_backward.register_fake
def _(grad, x, a, b, ids, weights, scale):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(weights)


def _routed_setup(ctx, inputs, output):
    x, a, b, ids, weights, scale = inputs
    ctx.save_for_backward(x, a, b, ids, weights)
    ctx.scale = scale


def _routed_bwd(ctx, grad):
    x, a, b, ids, weights = ctx.saved_tensors
    dx, da, db, dw = mole_lora_routed_backward(grad.contiguous(), x, a, b, ids, weights, ctx.scale)
    return dx, da, db, None, dw, None


mole_lora_routed.register_autograd(_routed_bwd, setup_context=_routed_setup)


# ---------------------------------------------------------------------------------------------
# Gates: dense [T, E] weights out, gradients to p and tau


def _check_gate(p, tau, kind, k):
    _tensor("p", p, 2)
    _f32("p", p)
    t, e = p.shape
    if kind == "top_k" and not (1 <= k <= e):
        raise ValueError(f"top-k with k = {k} is invalid for {e} experts: k must be in 1..={e}")
    if tau is not None:
        _tensor("tau", tau, 1)
        _f32("tau", tau)
        if tau.shape[0] != t:
            raise ValueError(f"tau: shape {tuple(tau.shape)}, expected [T] = [{t}]")
    return t, e


def _gate_kernel(p: Tensor, tau: Optional[Tensor], kind: str, k: int, renormalize: bool) -> Tensor:
    t, e = _check_gate(p, tau, kind, k)
    ts = (p,) if tau is None else (p, tau)
    dev = _placement(("p", "tau")[: len(ts)], ts, f"{kind} gate")
    out = torch.empty_like(p)
    if dev is not None:
        _C.cuda_gate(dev, _stream(dev), kind, k, renormalize, _buf(p), _opt(tau), _buf(out), t, e)
    else:
        _C.gate(kind, k, renormalize, _buf(p), _opt(tau), _buf(out), t, e)
    return out


@torch.library.custom_op("molora::top_k_gate", mutates_args=())
def top_k_gate(p: Tensor, k: int, renormalize: bool) -> Tensor:
    """The dense weights ``[T, E]`` of the top-k gate over probabilities ``p [T, E]``: the ``k``
    largest of each row kept (ties to the lower id), renormalised to sum 1 when asked."""
    return _gate_kernel(p, None, "top_k", k, renormalize)


@top_k_gate.register_fake
def _(p, k, renormalize):
    _check_gate(p, None, "top_k", k)
    return torch.empty_like(p)


@torch.library.custom_op("molora::threshold_gate", mutates_args=())
def threshold_gate(p: Tensor, tau: Tensor) -> Tensor:
    """HDMoLE's dynamic-threshold gate: experts with ``p ≥ τ_t`` kept with weights
    ``(p − τ)/Σ(p − τ)``, the arg-max when none passes; dense ``[T, E]``."""
    return _gate_kernel(p, tau, "threshold", 0, True)


@threshold_gate.register_fake
def _(p, tau):
    _check_gate(p, tau, "threshold", 0)
    return torch.empty_like(p)


@torch.library.custom_op("molora::gate_backward", mutates_args=())
def gate_backward(
    grad: Tensor, p: Tensor, tau: Optional[Tensor], kind: str, k: int, renormalize: bool
) -> Tuple[Tensor, Tensor]:
    """``(dp [T, E], dtau [T])`` of a gate (which experts are kept is not differentiated)."""
    t, e = _check_gate(p, tau, kind, k)
    g = _f32c(grad)
    ts = (g, p) if tau is None else (g, p, tau)
    dev = _placement(("grad", "p", "tau")[: len(ts)], ts, f"{kind} gate backward")
    dp = torch.zeros_like(p)
    dtau = p.new_zeros((t,))
    if dev is not None:
        _C.cuda_gate_backward(dev, _stream(dev), kind, k, renormalize, _buf(p), _opt(tau), _buf(g), _buf(dp),
                              _buf(dtau), t, e)
    else:
        _C.gate_backward(kind, k, renormalize, _buf(p), _opt(tau), _buf(g), _buf(dp), _buf(dtau), t, e)
    return dp, dtau


@gate_backward.register_fake
def _(grad, p, tau, kind, k, renormalize):
    return torch.empty_like(p), p.new_empty((p.shape[0],))


def _top_k_setup(ctx, inputs, output):
    p, k, renormalize = inputs
    ctx.save_for_backward(p)
    ctx.k, ctx.renormalize = k, renormalize


def _top_k_bwd(ctx, grad):
    (p,) = ctx.saved_tensors
    dp, _ = gate_backward(grad.contiguous(), p, None, "top_k", ctx.k, ctx.renormalize)
    return dp, None, None


top_k_gate.register_autograd(_top_k_bwd, setup_context=_top_k_setup)


def _threshold_setup(ctx, inputs, output):
    p, tau = inputs
    ctx.save_for_backward(p, tau)


def _threshold_bwd(ctx, grad):
    p, tau = ctx.saved_tensors
    dp, dtau = gate_backward(grad.contiguous(), p, tau, "threshold", 0, True)
    return dp, dtau


threshold_gate.register_autograd(_threshold_bwd, setup_context=_threshold_setup)


# ---------------------------------------------------------------------------------------------
# route: the whole router -> gate pipeline (inference: the routing is a decision, not differentiated)


def _route_width(gate: str, k: int, e: int) -> int:
    return k if gate == "top_k" else e


def _check_route(x, w_g, b_g, gate, k, tau_w, global_probs, seq_offsets):
    _tensor("x", x, 2)
    _float("x", x)
    _tensor("w_g", w_g, 2)
    t, d_in = x.shape
    e, g_in = w_g.shape
    if g_in != d_in or w_g.dtype != x.dtype:
        raise ValueError(f"w_g: shape {tuple(w_g.shape)} {w_g.dtype}, expected [E, d_in = {d_in}] of {x.dtype}")
    if b_g is not None and (tuple(b_g.shape) != (e,) or b_g.dtype != x.dtype):
        raise ValueError(f"b_g: shape {tuple(b_g.shape)} {b_g.dtype}, expected [E = {e}] of {x.dtype}")
    if gate not in ("top_k", "threshold", "dense"):
        raise ValueError(f'gate {gate!r} is not one of "top_k", "threshold", "dense"')
    if gate == "top_k" and not (1 <= k <= e):
        raise ValueError(f"top-k with k = {k} is invalid for {e} experts: k must be in 1..={e}")
    if tau_w is not None:
        _f32("tau_w", tau_w)
        if tuple(tau_w.shape) != (d_in,):
            raise ValueError(f"tau_w: shape {tuple(tau_w.shape)}, expected [d_in] = [{d_in}]")
    if (global_probs is None) != (seq_offsets is None):
        raise ValueError("global_probs and seq_offsets go together")
    if global_probs is not None:
        _tensor("global_probs", global_probs, 2)
        _f32("global_probs", global_probs)
        if global_probs.shape[1] != e:
            raise ValueError(f"global_probs: shape {tuple(global_probs.shape)}, expected [S, E = {e}]")
        _tensor("seq_offsets", seq_offsets, 1)
        if seq_offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq_offsets: dtype {seq_offsets.dtype}, expected torch.int32 or torch.int64")
        if seq_offsets.shape[0] != global_probs.shape[0] + 1:
            raise ValueError(
                f"seq_offsets: {seq_offsets.shape[0]} offsets for {global_probs.shape[0]} sequences (expected S + 1)"
            )
    return t, d_in, e


@torch.library.custom_op("molora::route", mutates_args=())
def route(
    x: Tensor,
    w_g: Tensor,
    b_g: Optional[Tensor],
    activation: str,
    temperature: float,
    gate: str,
    k: int,
    renormalize: bool,
    threshold_kind: str,
    threshold_value: float,
    tau_w: Optional[Tensor],
    global_probs: Optional[Tensor],
    seq_offsets: Optional[Tensor],
    combine: str,
    lam: float,
) -> Tuple[Tensor, Tensor]:
    """The crate's whole routing pipeline (``cpu::route``): router logits ``x·W_gᵀ + b_g``, softmax or
    sigmoid with temperature, optionally HDMoLE's hierarchy with a global posterior per sequence,
    then the gate. Returns the slots ``(ids int32 [T, K], weights float32 [T, K])`` that
    :func:`mole_lora_routed` takes (``K = k`` for top-k, ``E`` otherwise; empty slots ``-1``).
    Use :func:`molora.route_slots` for keyword arguments."""
    t, d_in, e = _check_route(x, w_g, b_g, gate, k, tau_w, global_probs, seq_offsets)
    offs = None if seq_offsets is None else seq_offsets.to(torch.int64).contiguous()
    ts = [x, w_g] + [v for v in (b_g, tau_w, global_probs, offs) if v is not None]
    _host(["x", "w_g"] + ["input"] * (len(ts) - 2), ts)
    width = _route_width(gate, k, e)
    ids = torch.empty((t, width), dtype=torch.int32)
    weights = torch.empty((t, width), dtype=torch.float32)
    threshold = None
    if gate == "threshold":
        if threshold_kind == "input" and tau_w is None:
            raise ValueError("an input-dependent threshold needs tau_w [d_in]")
        threshold = (threshold_kind, threshold_value, _opt(tau_w))
    _C.route(
        _float("x", x), _buf(x), _buf(w_g), _opt(b_g), t, d_in, e, activation, temperature, gate, k, renormalize,
        threshold, _opt(global_probs), _opt(offs), combine, lam, _buf(ids), _buf(weights), width,
    )
    return ids, weights


@route.register_fake
def _(x, w_g, b_g, activation, temperature, gate, k, renormalize, threshold_kind, threshold_value, tau_w,
      global_probs, seq_offsets, combine, lam):
    t, _, e = _check_route(x, w_g, b_g, gate, k, tau_w, global_probs, seq_offsets)
    width = _route_width(gate, k, e)
    return x.new_empty((t, width), dtype=torch.int32), x.new_empty((t, width), dtype=torch.float32)


def route_slots(
    x: Tensor,
    w_g: Tensor,
    b_g: Optional[Tensor] = None,
    *,
    activation: str = "softmax",
    temperature: float = 1.0,
    gate: str = "top_k",
    k: int = 2,
    renormalize: bool = True,
    tau: Optional[float] = None,
    theta: Optional[float] = None,
    tau_w: Optional[Tensor] = None,
    tau_b: float = 0.0,
    global_probs: Optional[Tensor] = None,
    seq_offsets: Optional[Tensor] = None,
    combine: str = "mix",
    lam: float = 0.5,
) -> Tuple[Tensor, Tensor]:
    """:func:`route` with keywords. The threshold gate takes one of ``tau`` (fixed), ``theta``
    (learned, ``τ = σ(θ)/E``) or ``tau_w``/``tau_b`` (input-dependent, ``τ_t = σ(w·x_t + b)/E``)."""
    kind, value = "fixed", 0.0
    if gate == "threshold":
        given = [n for n, v in (("tau", tau), ("theta", theta), ("tau_w", tau_w)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"the threshold gate takes exactly one of tau, theta, tau_w; got {given or 'none'}")
        kind, value = {"tau": ("fixed", tau), "theta": ("learned", theta), "tau_w": ("input", tau_b)}[given[0]]
    return route(x, w_g, b_g, activation, temperature, gate, k, renormalize, kind, float(value), tau_w,
                 global_probs, seq_offsets, combine, lam)


# ---------------------------------------------------------------------------------------------
# weight_space_lora: SAML


def _check_weight_space(x, a, b, p, seq_offsets, scale):
    t, e, r, d_in, d_out = _experts(x, a, b)
    _tensor("p", p, 2)
    _f32("p", p)
    _tensor("seq_offsets", seq_offsets, 1)
    if seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_offsets: dtype {seq_offsets.dtype}, expected torch.int32 or torch.int64")
    s = p.shape[0]
    if p.shape[1] != e:
        raise ValueError(f"p: shape {tuple(p.shape)}, expected [S, E = {e}]")
    if seq_offsets.shape[0] != s + 1:
        raise ValueError(f"seq_offsets: {seq_offsets.shape[0]} offsets for {s} sequences of p (expected S + 1)")
    _scale(scale)
    return t, e, r, d_in, d_out


def _host_offsets(seq_offsets: Tensor):
    """The sequence offsets as a host list: they size the CUDA launch, so they live on the CPU."""
    if seq_offsets.device.type != "cpu":
        raise ValueError(
            f"seq_offsets: on {seq_offsets.device}; keep it on the CPU (it sizes the launch, and reading it "
            "from the device would wait for the GPU)"
        )
    return [int(v) for v in seq_offsets.tolist()]


@torch.library.custom_op("molora::weight_space_lora", mutates_args=())
def weight_space_lora(x: Tensor, a: Tensor, b: Tensor, p: Tensor, seq_offsets: Tensor, scale: float) -> Tensor:
    """SAML's weight-space mixture: for the rows ``seq_offsets[q]..seq_offsets[q+1]`` of sequence
    ``q``, ``y_t = scale·(x_t·Ā_qᵀ)·B̄_qᵀ`` with ``Ā_q = Σ_e p[q, e]·A_e``, ``B̄_q = Σ_e p[q, e]·B_e``
    (offsets int32 or int64, from 0 to T, non-decreasing)."""
    t, e, r, d_in, d_out = _check_weight_space(x, a, b, p, seq_offsets, scale)
    dev = _placement(("x", "a", "b", "p"), (x, a, b, p), "weight_space_lora")
    if dev is not None:
        out = x.new_zeros((t, d_out))
        _C.cuda_weight_space_lora(_float("x", x), dev, _stream(dev), _buf(x), _buf(a), _buf(b), _buf(p),
                                  _host_offsets(seq_offsets), _buf(out), (e, r, d_in, d_out), scale)
        return out
    offs = seq_offsets.to(torch.int64).contiguous()
    _host(("x", "a", "b", "p", "seq_offsets"), (x, a, b, p, offs))
    out = x.new_empty((t, d_out))
    _C.weight_space_lora(
        _float("x", x), _buf(x), _buf(a), _buf(b), _buf(p), _buf(offs), _buf(out), (e, r, d_in, d_out), scale
    )
    return out


@weight_space_lora.register_fake
def _(x, a, b, p, seq_offsets, scale):
    t, _, _, _, d_out = _check_weight_space(x, a, b, p, seq_offsets, scale)
    return x.new_empty((t, d_out))


@torch.library.custom_op("molora::weight_space_lora_backward", mutates_args=())
def weight_space_lora_backward(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, p: Tensor, seq_offsets: Tensor, scale: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients ``(dx, da, db, dp)`` of :func:`weight_space_lora`."""
    t, e, r, d_in, d_out = _check_weight_space(x, a, b, p, seq_offsets, scale)
    dev = _placement(("x", "a", "b", "p"), (x, a, b, p), "weight_space_lora_backward")
    if dev is not None:
        g = grad.detach().to(x.dtype).contiguous()
        dx, da, db, dp = (torch.empty(v.shape, dtype=torch.float32, device=v.device) for v in (x, a, b, p))
        _C.cuda_weight_space_lora_backward(
            _float("x", x), dev, _stream(dev), _buf(x), _buf(a), _buf(b), _buf(p), _host_offsets(seq_offsets),
            _buf(g), _buf(dx), _buf(da), _buf(db), _buf(dp), (e, r, d_in, d_out), scale,
        )
        return dx.to(x.dtype), da.to(a.dtype), db.to(b.dtype), dp
    g, xf, af, bf, pf = (_f32c(v) for v in (grad, x, a, b, p))
    offs = seq_offsets.to(torch.int64).contiguous()
    _host(("grad", "x", "a", "b", "p", "seq_offsets"), (g, xf, af, bf, pf, offs))
    dx, da, db, dp = (torch.empty_like(v) for v in (xf, af, bf, pf))
    _C.weight_space_lora_backward(
        _buf(xf), _buf(af), _buf(bf), _buf(pf), _buf(offs), _buf(g), _buf(dx), _buf(da), _buf(db), _buf(dp),
        (e, r, d_in, d_out), scale,
    )
    return dx.to(x.dtype), da.to(a.dtype), db.to(b.dtype), dp


@weight_space_lora_backward.register_fake
def _(grad, x, a, b, p, seq_offsets, scale):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(p)


def _ws_setup(ctx, inputs, output):
    x, a, b, p, seq_offsets, scale = inputs
    ctx.save_for_backward(x, a, b, p, seq_offsets)
    ctx.scale = scale


def _ws_bwd(ctx, grad):
    x, a, b, p, offs = ctx.saved_tensors
    dx, da, db, dp = weight_space_lora_backward(grad.contiguous(), x, a, b, p, offs, ctx.scale)
    return dx, da, db, dp, None, None


weight_space_lora.register_autograd(_ws_bwd, setup_context=_ws_setup)


# ---------------------------------------------------------------------------------------------
# Quantised bases


class QuantWeight:
    """A frozen NF4 (4-bit NormalFloat, blocks of 64) or int8 (per output channel) weight
    ``[rows, cols]``, made by :func:`quantize_nf4` / :func:`quantize_int8`."""

    def __init__(self, fmt: str, data: Tensor, scales: Tensor, rows: int, cols: int):
        self.format, self.data, self.scales, self.rows, self.cols = fmt, data, scales, rows, cols

    def nbytes(self) -> int:
        """Bytes of the packed weight and its scales."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4

    def __repr__(self) -> str:
        return f"QuantWeight({self.format}, [{self.rows}, {self.cols}], {self.nbytes()} bytes)"


def _quantize(fmt: str, w: Tensor) -> QuantWeight:
    _tensor("w", w, 2)
    _float("w", w)
    rows, cols = w.shape
    wf = _f32c(w)
    _host(("w",), (wf,))
    n_data, n_scales = _C.quant_sizes(fmt, rows, cols)
    data = torch.empty(n_data, dtype=torch.uint8 if fmt == "nf4" else torch.int8)
    scales = torch.empty(n_scales, dtype=torch.float32)
    _C.quantize(fmt, _buf(wf), rows, cols, _buf(data), _buf(scales))
    return QuantWeight(fmt, data, scales, rows, cols)


def quantize_nf4(w: Tensor) -> QuantWeight:
    """NF4 quantisation of ``w [rows, cols]`` (QLoRA's 4-bit NormalFloat, absmax per block of 64)."""
    return _quantize("nf4", w)


def quantize_int8(w: Tensor) -> QuantWeight:
    """int8 quantisation of ``w [rows, cols]``, one absmax scale per output row."""
    return _quantize("int8", w)


def _check_quant(x, data, scales, fmt, rows, cols):
    _tensor("x", x, 2)
    _float("x", x)
    if x.shape[1] != cols:
        raise ValueError(f"x: shape {tuple(x.shape)}, but the quantised weight has d_in = {cols}")
    if fmt not in ("nf4", "int8"):
        raise ValueError(f'format {fmt!r} is not "nf4" or "int8"')
    want = torch.uint8 if fmt == "nf4" else torch.int8
    if data.dtype != want or scales.dtype != torch.float32:
        raise ValueError(f"{fmt} weight: data {data.dtype} and scales {scales.dtype}, expected {want} and torch.float32")
    return x.shape[0]


@torch.library.custom_op("molora::quant_linear", mutates_args=())
def quant_linear_op(x: Tensor, data: Tensor, scales: Tensor, fmt: str, rows: int, cols: int) -> Tensor:
    """``y = x·deq(W)ᵀ`` on the packed weight (no bias), ``[T, rows]`` in ``x``'s dtype."""
    t = _check_quant(x, data, scales, fmt, rows, cols)
    _host(("x", "data", "scales"), (x, data, scales))
    out = x.new_empty((t, rows))
    _C.quant_linear(_float("x", x), _buf(x), fmt, _buf(data), _buf(scales), rows, cols, _buf(out))
    return out


@quant_linear_op.register_fake
def _(x, data, scales, fmt, rows, cols):
    t = _check_quant(x, data, scales, fmt, rows, cols)
    return x.new_empty((t, rows))


@torch.library.custom_op("molora::quant_linear_backward", mutates_args=())
def quant_linear_backward(grad: Tensor, data: Tensor, scales: Tensor, fmt: str, rows: int, cols: int) -> Tensor:
    """``dx = dy·deq(W)`` (f32 ``[T, cols]``; the weight is frozen)."""
    g = _f32c(grad)
    _host(("grad", "data", "scales"), (g, data, scales))
    dx = g.new_empty((g.shape[0], cols))
    _C.quant_linear_backward(_buf(g), fmt, _buf(data), _buf(scales), rows, cols, _buf(dx))
    return dx


@quant_linear_backward.register_fake
def _(grad, data, scales, fmt, rows, cols):
    return grad.new_empty((grad.shape[0], cols), dtype=torch.float32)


def _quant_setup(ctx, inputs, output):
    x, data, scales, fmt, rows, cols = inputs
    ctx.save_for_backward(data, scales)
    ctx.meta = (fmt, rows, cols, x.dtype)


def _quant_bwd(ctx, grad):
    data, scales = ctx.saved_tensors
    fmt, rows, cols, dtype = ctx.meta
    dx = quant_linear_backward(grad.contiguous(), data, scales, fmt, rows, cols)
    return dx.to(dtype), None, None, None, None, None


quant_linear_op.register_autograd(_quant_bwd, setup_context=_quant_setup)


def quant_linear(x: Tensor, w: QuantWeight) -> Tensor:
    """A frozen quantised linear layer without bias: ``y = x·deq(W)ᵀ``; gradients flow to ``x``."""
    return quant_linear_op(x, w.data, w.scales, w.format, w.rows, w.cols)


# ---------------------------------------------------------------------------------------------
# add_lora: punica / vLLM semantics


def _check_add_lora(y, x, a, b, indices, scale, y_offset):
    t, e, r, d_in, d_out = _experts(x, a, b)
    _tensor("y", y, 2)
    if y.dtype != x.dtype:
        raise ValueError(f"y: dtype {y.dtype}, but x is {x.dtype}")
    if y.shape[0] != t:
        raise ValueError(f"y: shape {tuple(y.shape)}, expected {t} rows like x")
    if y_offset < 0 or y_offset + d_out > y.shape[1]:
        raise ValueError(
            f"y_offset = {y_offset}: columns {y_offset}..{y_offset + d_out} do not fit y's {y.shape[1]} columns"
        )
    _tensor("indices", indices, 1)
    if indices.dtype not in (torch.int32, torch.int64) or indices.shape[0] != t:
        raise ValueError(f"indices: {tuple(indices.shape)} {indices.dtype}, expected int32/int64 [T = {t}]")
    _scale(scale)
    return t, e, r, d_in, d_out


@torch.library.custom_op("molora::add_lora", mutates_args=("y",))
def add_lora(y: Tensor, x: Tensor, a: Tensor, b: Tensor, indices: Tensor, scale: float, y_offset: int) -> None:
    """punica's / vLLM's ``add_lora``, in place: ``y[t, y_offset : y_offset + d_out] +=
    scale·(x_t·A_eᵀ)·B_eᵀ`` with ``e = indices[t]`` (``-1`` = no adapter), so a packed QKV or gate-up
    output takes each part's adapters. An inference op (no autograd)."""
    t, e, r, d_in, d_out = _check_add_lora(y, x, a, b, indices, scale, y_offset)
    idx = indices.to(torch.int32).contiguous()
    dev = _placement(("y", "x", "a", "b", "indices"), (y, x, a, b, idx), "add_lora")
    if dev is not None:
        _C.cuda_add_lora(_float("x", x), dev, _stream(dev), _buf(y), y.shape[1], y_offset, _buf(x), _buf(a), _buf(b),
                         _buf(idx), (e, r, d_in, d_out), scale)
        return
    _C.add_lora(_float("x", x), _buf(y), y.shape[1], y_offset, _buf(x), _buf(a), _buf(b), _buf(idx),
                (e, r, d_in, d_out), scale)


@add_lora.register_fake
def _(y, x, a, b, indices, scale, y_offset):
    _check_add_lora(y, x, a, b, indices, scale, y_offset)
    return None
