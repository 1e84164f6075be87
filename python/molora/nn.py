"""``MoleLinear``: a base ``nn.Linear`` with E LoRA experts and a router, as an ``nn.Module``."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ops
from .peft import Experts


class MoleLinear(torch.nn.Module):
    """``y = base(x) + scale·Σ_e w_te·(x_t·A_eᵀ)·B_eᵀ`` with ``w = gate(softmax(router(x)/T))``.

    ``gate`` is ``"top_k"`` (``k``, ``renormalize``), ``"threshold"`` (HDMoLE's learned threshold
    ``τ = σ(θ)/E``, ``θ`` a parameter) or ``"dense"``. The base is frozen; the experts, the router and
    ``θ`` train. Router probabilities and gate weights are float32 whatever the model's dtype; the
    LoRA part runs in the experts' dtype with f32 accumulation (:func:`molora.mole_lora`).
    """

    def __init__(
        self,
        base: torch.nn.Linear,
        experts: Union[Experts, Tuple[Tensor, Tensor, float]],
        router: Optional[torch.nn.Linear] = None,
        gate: str = "top_k",
        k: int = 2,
        renormalize: bool = True,
        temperature: float = 1.0,
        theta: float = 0.0,
    ):
        super().__init__()
        if not isinstance(base, torch.nn.Linear):
            raise ValueError(f"base: expected a torch.nn.Linear, got {type(base).__name__}")
        if isinstance(experts, Experts):
            a, b, scale = experts.a, experts.b, experts.scale
        else:
            a, b, scale = experts
        if a.dim() != 3 or b.dim() != 3:
            raise ValueError(f"experts: A {tuple(a.shape)} and B {tuple(b.shape)} must be [E, r, d_in] and [E, d_out, r]")
        e, r, d_in = a.shape
        if d_in != base.in_features or tuple(b.shape) != (e, base.out_features, r):
            raise ValueError(
                f"experts: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit base {base.in_features}→{base.out_features}"
            )
        if gate not in ("top_k", "threshold", "dense"):
            raise ValueError(f'gate {gate!r} is not one of "top_k", "threshold", "dense"')
        if gate == "top_k" and not (1 <= k <= e):
            raise ValueError(f"top-k with k = {k} is invalid for {e} experts: k must be in 1..={e}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature = {temperature} is invalid: must be finite and > 0")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        dtype = base.weight.dtype
        self.a = torch.nn.Parameter(a.detach().to(dtype).clone().contiguous())
        self.b = torch.nn.Parameter(b.detach().to(dtype).clone().contiguous())
        self.scale = float(scale)
        if router is None:
            router = torch.nn.Linear(d_in, e, dtype=dtype, device=base.weight.device)
        if router.in_features != d_in or router.out_features != e:
            raise ValueError(f"router: {router.in_features}→{router.out_features}, expected {d_in}→{e}")
        self.router = router
        self.gate, self.k, self.renormalize, self.temperature = gate, k, renormalize, temperature
        self.theta = torch.nn.Parameter(torch.tensor(float(theta))) if gate == "threshold" else None

    @property
    def num_experts(self) -> int:
        return self.a.shape[0]

    def probabilities(self, x2: Tensor) -> Tensor:
        """The router's probabilities ``[T, E]`` (float32) for rows ``x2 [T, d_in]``."""
        return torch.softmax(self.router(x2).float() / self.temperature, dim=-1).contiguous()

    def weights(self, x2: Tensor) -> Tensor:
        """The gate weights ``[T, E]`` (float32) for rows ``x2 [T, d_in]``."""
        p = self.probabilities(x2)
        if self.gate == "top_k":
            return _ops.top_k_gate(p, self.k, self.renormalize)
        if self.gate == "threshold":
            tau = (torch.sigmoid(self.theta) / self.num_experts).float().expand(p.shape[0]).contiguous()
            return _ops.threshold_gate(p, tau)
        return p

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.base.in_features:
            raise ValueError(f"x: last dimension {x.shape[-1]}, expected d_in = {self.base.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = self.base(x2) + _ops.mole_lora(x2, self.a, self.b, self.weights(x2), self.scale)
        return y.reshape(*lead, y.shape[-1])
