"""PEFT parity: molora's ops and MoleLinear against PEFT's own LoRA layers, and an adapter written by the
crate's save_peft_adapter loaded by PEFT into the tiny Whisper of tests/data/peft."""

import copy
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import molora
from molora.nn import MoleLinear
from molora.peft import experts_from_peft

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "peft"


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 10)
        self.fc2 = torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def peft_model(names, r=4, alpha=8, seed=0):
    torch.manual_seed(seed)
    base = Tiny()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc1"], init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name=names[0])
    for i, n in enumerate(names[1:]):
        torch.manual_seed(seed + 1 + i)
        model.add_adapter(n, LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc1"], init_lora_weights=False))
    return model


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_one_adapter_equals_base_plus_mole_lora_at_weight_one():
    model = peft_model(["only"])
    layer = model.get_submodule("base_model.model.fc1")
    x = torch.randn(9, 12)
    ex = experts_from_peft(model, "fc1")
    assert ex.num_experts == 1 and ex.scale == pytest.approx(2.0)
    want = layer(x)
    got = layer.base_layer(x) + molora.mole_lora(x, ex.a, ex.b, torch.ones(9, 1), ex.scale)
    err = max_err(got, want)
    print(f"one adapter: max |molora - PEFT| = {err:.3g}")
    assert err < 1e-5


@pytest.mark.parametrize("gate", ["dense", "top_k"])
def test_e_adapters_mixed_equal_the_weighted_sum_of_peft_outputs(gate):
    names = ["e0", "e1", "e2", "e3"]
    model = peft_model(names)
    layer = model.get_submodule("base_model.model.fc1")
    x = torch.randn(11, 12)
    ex = experts_from_peft(model, "fc1")
    assert ex.names == names and tuple(ex.a.shape) == (4, 4, 12)
    router = torch.nn.Linear(12, 4)
    mole = MoleLinear(copy.deepcopy(layer.base_layer), ex, router=router, gate=gate, k=2)
    with torch.no_grad():
        w = mole.weights(x)
        outs = []
        for n in names:
            model.set_adapter(n)
            outs.append(layer(x))
        want = sum(w[:, e : e + 1] * outs[e] for e in range(4))  # Σ_e w_e = 1 per token
        got = mole(x)
    err = max_err(got, want)
    print(f"{gate}: max |MoleLinear - Σ_e w_e·PEFT_e| = {err:.3g}")
    assert err < 1e-5


def test_mole_linear_gradients_equal_torch_autograd_of_the_formula():
    model = peft_model(["e0", "e1", "e2"])
    ex = experts_from_peft(model, "fc1")
    base = copy.deepcopy(model.get_submodule("base_model.model.fc1").base_layer)
    mole = MoleLinear(base, ex, gate="dense")
    x = torch.randn(7, 12, requires_grad=True)
    g = torch.randn(7, 10)
    (mole(x) * g).sum().backward()
    # The same parameters through plain torch ops.
    a, b = mole.a.detach().clone().requires_grad_(), mole.b.detach().clone().requires_grad_()
    wg, bg = mole.router.weight.detach().clone().requires_grad_(), mole.router.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    w = torch.softmax(xr @ wg.T + bg, -1)
    y = base(xr) + mole.scale * torch.einsum("te,ter,eor->to", w, torch.einsum("ti,eri->ter", xr, a), b)
    (y * g).sum().backward()
    for name, ours, ref in (("x", x.grad, xr.grad), ("A", mole.a.grad, a.grad), ("B", mole.b.grad, b.grad),
                            ("W_g", mole.router.weight.grad, wg.grad), ("b_g", mole.router.bias.grad, bg.grad)):
        err = max_err(ours, ref)
        print(f"d{name}: max error {err:.3g}")
        assert err < 1e-4, f"d{name}: {err}"


def test_adapter_directories_are_read_by_the_crate_rules(tmp_path):
    ex = experts_from_peft([DATA / "whisper-tiny-lora-accent0", DATA / "whisper-tiny-lora-accent1"],
                           "model.encoder.layers.0.self_attn.q_proj")
    assert tuple(ex.a.shape) == (2, 4, 64) and tuple(ex.b.shape) == (2, 64, 4) and ex.scale == pytest.approx(2.0)
    bad = tmp_path / "dora"
    shutil.copytree(DATA / "whisper-tiny-lora-accent0", bad)
    cfg = (bad / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (bad / "adapter_config.json").write_text(cfg)
    with pytest.raises(ValueError, match="use_dora"):
        experts_from_peft([bad], "model.encoder.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="does not target"):
        experts_from_peft([DATA / "whisper-tiny-lora-accent0"], "model.encoder.layers.0.fc1")


def saved_by_the_crate(out: pathlib.Path) -> pathlib.Path:
    """An adapter written by the crate's save_peft_adapter (examples/03_save_peft_adapter.rs)."""
    exe = os.environ.get("MOLORA_SAVE_PEFT_ADAPTER")
    if exe:
        cmd = [exe, str(out)]
    elif shutil.which("cargo"):
        cmd = ["cargo", "run", "--quiet", "--example", "03_save_peft_adapter", "--", str(out)]
    else:
        pytest.skip("needs cargo (or MOLORA_SAVE_PEFT_ADAPTER) to write the adapter with the crate")
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def test_an_adapter_saved_by_the_crate_loads_in_peft_and_gives_molora_s_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    adapter = saved_by_the_crate(tmp_path / "adapter")
    config = transformers.WhisperConfig.from_json_file(str(DATA / "whisper-tiny-config.json"))
    torch.manual_seed(0)
    base = transformers.WhisperForConditionalGeneration(config).eval()
    feats = torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions)
    dec = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        y_base = base(input_features=feats, decoder_input_ids=dec).logits
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = 0
    for key, value in saved.items():
        mod, kind = key[len("base_model.model."):].rsplit(".lora_", 1)
        layer = model.get_submodule("base_model.model." + mod)
        weight = (layer.lora_A if kind.startswith("A") else layer.lora_B)["default"].weight
        assert torch.equal(weight.detach(), value), f"{key}: PEFT did not load the crate's tensor"
        loaded += 1
    assert loaded == 48
    with torch.no_grad():
        y = model(input_features=feats, decoder_input_ids=dec).logits
    assert max_err(y, y_base) > 1e-3, "the adapter changes the model"
    # Each adapted module's output equals its base plus molora's LoRA of the same file.
    name = "model.encoder.layers.1.self_attn.v_proj"
    layer = model.get_submodule("base_model.model." + name)
    ex = experts_from_peft([adapter], name)
    x = torch.randn(6, 64)
    with torch.no_grad():
        err = max_err(layer(x), layer.base_layer(x) + molora.mole_lora(x, ex.a, ex.b, torch.ones(6, 1), ex.scale))
    print(f"crate-written adapter in PEFT: max |molora - PEFT| = {err:.3g}")
    assert err < 1e-5
