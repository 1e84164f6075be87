"""molora for PyTorch: mixtures of LoRA experts as torch ops with autograd.

The ops are registered with ``torch.library`` under the ``molora`` namespace
(``torch.ops.molora.mole_lora`` ...), each with a fake kernel for ``torch.compile`` and autograd
through the crate's backward. ``molora.nn.MoleLinear`` wraps a base ``nn.Linear`` with E experts;
``molora.peft.experts_from_peft`` stacks PEFT adapters into experts.
"""

from ._C import __version__
from ._ops import (
    QuantWeight,
    add_lora,
    gate_backward,
    mole_lora,
    mole_lora_backward,
    mole_lora_routed,
    mole_lora_routed_backward,
    quant_linear,
    quantize_int8,
    quantize_nf4,
    route,
    route_slots,
    threshold_gate,
    top_k_gate,
    weight_space_lora,
    weight_space_lora_backward,
)
from . import nn, peft

__all__ = [
    "QuantWeight",
    "__version__",
    "add_lora",
    "gate_backward",
    "mole_lora",
    "mole_lora_backward",
    "mole_lora_routed",
    "mole_lora_routed_backward",
    "nn",
    "peft",
    "quant_linear",
    "quantize_int8",
    "quantize_nf4",
    "route",
    "route_slots",
    "threshold_gate",
    "top_k_gate",
    "weight_space_lora",
    "weight_space_lora_backward",
]
