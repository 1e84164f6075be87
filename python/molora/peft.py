"""PEFT adapters as molora experts.

:func:`experts_from_peft` stacks the LoRA adapters of one module, from adapter directories (as
``save_pretrained`` writes them) or from a ``PeftModel`` with several adapters loaded, into the
``A [E, r, d_in]`` / ``B [E, d_out, r]`` the ops take. Directories are read by the crate's rules
(``molora::peft``: ``target_modules``, ``rank_pattern`` / ``alpha_pattern``, rsLoRA, and every option
molora does not implement — DoRA, ... — rejected by name).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _C

#: The prefix PEFT puts before module names in adapter files.
PEFT_KEY_PREFIX = "base_model.model."


@dataclass
class Experts:
    """E LoRA experts of one module: ``a [E, r, d_in]``, ``b [E, d_out, r]`` and the shared scale
    (``alpha / r``; an adapter whose own scale differs has it folded into its ``B``)."""

    a: Tensor
    b: Tensor
    scale: float
    names: List[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return self.a.shape[0]

    @property
    def rank(self) -> int:
        return self.a.shape[1]


def _stack(pairs, scales, names) -> Experts:
    """Stacks ``(A [r_e, d_in], B [d_out, r_e])`` pairs: ranks zero-padded to the largest (exact),
    each scale folded into its ``B`` relative to the first."""
    d_in = pairs[0][0].shape[1]
    d_out = pairs[0][1].shape[0]
    for (a, b), n in zip(pairs, names):
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(
                f"adapter {n}: A {tuple(a.shape)} and B {tuple(b.shape)} do not match the first adapter's "
                f"d_in = {d_in}, d_out = {d_out}"
            )
    r = max(a.shape[0] for a, _ in pairs)
    dtype = pairs[0][0].dtype
    aa = torch.zeros((len(pairs), r, d_in), dtype=dtype)
    bb = torch.zeros((len(pairs), d_out, r), dtype=dtype)
    s0 = scales[0]
    for e, ((a, b), s) in enumerate(zip(pairs, scales)):
        aa[e, : a.shape[0]] = a.to(dtype)
        bb[e, :, : b.shape[1]] = b.to(dtype) * (s / s0)
    return Experts(aa, bb, s0, list(names))


def _from_dir(path: str, module_name: str):
    cfg_path = os.path.join(path, "adapter_config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{cfg_path}: {e.strerror or e}") from None
    rule = _C.peft_module(text, path, module_name)
    if rule is None:
        raise ValueError(f"{path}: the adapter does not target module {module_name!r}")
    r, _alpha, scale = rule
    from safetensors.torch import load_file

    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(weights):
        raise ValueError(f"{path}: no adapter_model.safetensors (only safetensors adapters are read)")
    tensors = load_file(weights)
    key = PEFT_KEY_PREFIX + module_name
    try:
        a = tensors[f"{key}.lora_A.weight"]
        b = tensors[f"{key}.lora_B.weight"]
    except KeyError as e:
        raise ValueError(f"{weights}: no tensor {e.args[0]!r}") from None
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
        raise ValueError(
            f"{weights}: {module_name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
            f"[r, d_in] and [d_out, r] with the config's r = {r}"
        )
    return (a, b), scale


def _from_model(model, module_name: str, adapters: Optional[Sequence[str]]):
    module = None
    for name in (PEFT_KEY_PREFIX + module_name, module_name):
        try:
            module = model.get_submodule(name)
            break
        except AttributeError:
            continue
    if module is None or not hasattr(module, "lora_A"):
        raise ValueError(f"the model has no LoRA module {module_name!r}")
    names = list(adapters) if adapters is not None else list(module.lora_A.keys())
    if not names:
        raise ValueError(f"{module_name}: no adapters loaded")
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    out = []
    for n in names:
        if n not in module.lora_A:
            raise ValueError(f"{module_name}: no adapter {n!r} (loaded: {list(module.lora_A.keys())})")
        if magnitudes is not None and n in magnitudes:
            raise ValueError(f"{module_name}: adapter {n!r} uses DoRA (use_dora), which molora does not implement")
        a = module.lora_A[n].weight.detach()
        b = module.lora_B[n].weight.detach()
        out.append(((a, b), float(module.scaling[n]), n))
    return out


def experts_from_peft(
    model_or_dirs: Union[object, Sequence[Union[str, os.PathLike]]],
    module_name: str,
    adapters: Optional[Sequence[str]] = None,
) -> Experts:
    """The experts of ``module_name`` (e.g. ``"model.encoder.layers.0.self_attn.q_proj"``) from a
    list of PEFT adapter directories (one expert each, in order) or from a ``PeftModel`` (its loaded
    adapters, or those named in ``adapters``)."""
    if isinstance(model_or_dirs, (str, os.PathLike)):
        model_or_dirs = [model_or_dirs]
    if isinstance(model_or_dirs, (list, tuple)):
        if not model_or_dirs:
            raise ValueError("experts_from_peft: no adapter directories")
        got = [(_from_dir(os.fspath(p), module_name)) for p in model_or_dirs]
        return _stack([g[0] for g in got], [g[1] for g in got], [os.fspath(p) for p in model_or_dirs])
    got = _from_model(model_or_dirs, module_name, adapters)
    return _stack([g[0] for g in got], [g[1] for g in got], [g[2] for g in got])


def read_config(path: Union[str, os.PathLike]) -> dict:
    """The ``adapter_config.json`` of an adapter directory, as a dict."""
    with open(os.path.join(os.fspath(path), "adapter_config.json"), encoding="utf-8") as f:
        return json.load(f)
