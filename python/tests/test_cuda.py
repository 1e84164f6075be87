"""The CUDA path (a build with `--features cuda`, on a GPU): every op with CUDA tensors against the same
op on the CPU (the reference path, checked against the formulas and PEFT by the other tests), forward
and backward, every dtype, with PyTorch's sync debug mode on (no host sync in the Python layer), and
opcheck on CUDA inputs. Skipped where there is no GPU or the wheel has no kernels;
MOLORA_PY_REQUIRE_CUDA=1 makes that a failure (scripts/gpu-check.sh sets it).

Runs under pytest, or as `python3 test_cuda.py` where pytest is missing."""

import os
import sys

import torch

import molora

HAVE = torch.cuda.is_available() and molora._C.has_cuda
REQUIRE = os.environ.get("MOLORA_PY_REQUIRE_CUDA") == "1"

try:
    import pytest

    pytestmark = pytest.mark.skipif(not HAVE and not REQUIRE, reason="needs a GPU and a wheel built with --features cuda")
except ImportError:  # the GPU machine may lack pytest
    pytest = None

TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def need_cuda():
    assert HAVE, f"CUDA path required: torch.cuda.is_available() = {torch.cuda.is_available()}, has_cuda = {molora._C.has_cuda}"


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * sum(shape))
    return torch.randn(*shape, generator=g).to(dtype)


def close(got, want, dtype, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    assert err <= TOL[dtype] * scale, f"{what} {dtype}: CUDA vs CPU max error {err} (scale {scale})"
    return err


def both(fn, inputs, grad_idx, seed=7):
    """fn on CPU leaves and on CUDA copies; returns (cpu_out, cuda_out, cpu_grads, cuda_grads)."""
    cpu = [v.clone().requires_grad_(i in grad_idx) if isinstance(v, torch.Tensor) else v for i, v in enumerate(inputs)]
    gpu = [v.detach().cuda().requires_grad_(i in grad_idx) if isinstance(v, torch.Tensor) else v
           for i, v in enumerate(inputs)]
    y_cpu = fn(*cpu)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y_gpu = fn(*gpu)
        g = rand(*y_cpu.shape, seed=seed).to(y_cpu.dtype)
        (y_gpu * g.cuda()).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    (y_cpu * g).sum().backward()
    return y_cpu, y_gpu, [cpu[i].grad for i in grad_idx], [gpu[i].grad for i in grad_idx]


def check(name, fn, inputs, grad_idx, dtype):
    y_c, y_g, g_c, g_g = both(fn, inputs, grad_idx)
    errs = [close(y_g, y_c, dtype, f"{name} y")]
    for i, (a, b) in enumerate(zip(g_c, g_g)):
        errs.append(close(b, a, dtype, f"{name} grad {grad_idx[i]}"))
    print(f"{name} {dtype}: max CUDA-CPU error {max(errs):.3g}")


def test_lora_ops_on_cuda_equal_the_cpu_path():
    need_cuda()
    t, e, r, d_in, d_out = 37, 6, 4, 40, 24
    for dtype in DTYPES:
        x, a, b = rand(t, d_in, dtype=dtype), rand(e, r, d_in, dtype=dtype) * 0.3, rand(e, d_out, r, dtype=dtype) * 0.3
        p = torch.softmax(rand(t, e), -1)
        w = molora.top_k_gate(p, 2, True)
        check("mole_lora", lambda x, a, b, w: molora.mole_lora(x, a, b, w, 0.5), [x, a, b, w], [0, 1, 2, 3], dtype)
        ids = torch.randint(-1, e, (t, 2), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
        sw = torch.rand(t, 2)
        check("mole_lora_routed", lambda x, a, b, ids, sw: molora.mole_lora_routed(x, a, b, ids, sw, 1.5),
              [x, a, b, ids, sw], [0, 1, 2, 4], dtype)
        offs = torch.tensor([0, 10, 11, t])
        pm = torch.rand(3, e)
        check("weight_space_lora", lambda x, a, b, pm: molora.weight_space_lora(x, a, b, pm, offs, 0.5),
              [x, a, b, pm], [0, 1, 2, 3], dtype)


def test_gates_on_cuda_equal_the_cpu_path():
    need_cuda()
    p = torch.softmax(rand(29, 7, seed=5), -1)
    check("top_k_gate", lambda p: molora.top_k_gate(p, 3, True), [p], [0], torch.float32)
    tau = torch.full((29,), 0.12)
    check("threshold_gate", lambda p, tau: molora.threshold_gate(p, tau), [p, tau], [0, 1], torch.float32)


def test_add_lora_on_cuda_equals_the_cpu_path():
    need_cuda()
    t, e, r, d_in, d_out = 19, 4, 8, 32, 16
    for dtype in DTYPES:
        x, a, b = rand(t, d_in, dtype=dtype), rand(e, r, d_in, dtype=dtype), rand(e, d_out, r, dtype=dtype)
        idx = torch.randint(-1, e, (t,), generator=torch.Generator().manual_seed(9))
        y = rand(t, 3 * d_out, dtype=dtype)
        y_gpu = y.cuda()
        molora.add_lora(y, x, a, b, idx, 0.75, d_out)
        molora.add_lora(y_gpu, x.cuda(), a.cuda(), b.cuda(), idx.cuda(), 0.75, d_out)
        print(f"add_lora {dtype}: max CUDA-CPU error {close(y_gpu, y, dtype, 'add_lora'):.3g}")


def test_mole_linear_trains_on_cuda():
    need_cuda()
    from molora.nn import MoleLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16)
    layer = MoleLinear(base, (torch.randn(4, 4, 24) * 0.1, torch.randn(4, 16, 4) * 0.1, 2.0), gate="top_k", k=2)
    gpu = MoleLinear(torch.nn.Linear(24, 16), (layer.a.detach(), layer.b.detach(), 2.0), gate="top_k", k=2)
    gpu.load_state_dict(layer.state_dict())
    gpu = gpu.cuda()
    x = torch.randn(3, 5, 24)
    check_y = close(gpu(x.cuda()), layer(x), torch.float32, "MoleLinear y")
    print(f"MoleLinear: max CUDA-CPU error {check_y:.3g}")


def test_ops_without_a_cuda_path_say_so():
    need_cuda()
    x = torch.randn(4, 8, device="cuda")
    q = molora.quantize_nf4(torch.randn(6, 8))
    for f, needle in ((lambda: molora.route_slots(x, torch.randn(3, 8, device="cuda")), "CPU tensors only"),
                      (lambda: molora.quant_linear(x, q), "")):
        try:
            f()
        except ValueError as e:
            assert needle in str(e), str(e)
        else:
            raise AssertionError("expected ValueError")


def test_opcheck_on_cuda():
    need_cuda()
    from torch.library import opcheck

    t, e, r, d_in, d_out = 5, 3, 2, 8, 6
    c = lambda v: v.cuda().requires_grad_()  # noqa: E731
    x, a, b = c(torch.randn(t, d_in)), c(torch.randn(e, r, d_in)), c(torch.randn(e, d_out, r))
    w = c(torch.rand(t, e))
    p = c(torch.softmax(torch.randn(t, e), -1))
    opcheck(torch.ops.molora.mole_lora.default, (x, a, b, w, 0.5))
    opcheck(torch.ops.molora.top_k_gate.default, (p, 2, True))
    opcheck(torch.ops.molora.mole_lora_routed.default,
            (x, a, b, torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 1], [0, 1]], dtype=torch.int32, device="cuda"),
             c(torch.rand(t, 2)), 0.5))


if __name__ == "__main__":
    failed = 0
    for name, f in sorted(globals().items()):
        if name.startswith("test_") and callable(f):
            try:
                f()
                print(f"PASS {name}")
            except Exception as e:  # noqa: BLE001
                failed += 1
                print(f"FAIL {name}: {type(e).__name__}: {e}")
    print(f"python cuda: {failed} failed")
    sys.exit(1 if failed else 0)
