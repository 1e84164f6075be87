"""Every op against the explicit formula in torch (values and autograd), opcheck on every op, and the
input checks."""

import pytest
import torch
from torch.library import opcheck

import molora

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def lora_ref(x, a, b, w, scale):
    """scale·Σ_e w[t, e]·(x_t·A_eᵀ)·B_eᵀ in float64."""
    x, a, b, w = (v.double() for v in (x, a, b, w))
    h = torch.einsum("ti,eri->ter", x, a)
    return scale * torch.einsum("te,ter,eor->to", w, h, b)


def rand(*shape, dtype=torch.float32, requires_grad=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else sum(shape) * 7919)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)


def close(got, want, dtype=torch.float32, what=""):
    rtol, atol = TOL[dtype]
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max error {err} (scale {scale})"


SHAPES = [(5, 3, 2, 7, 6), (1, 1, 1, 1, 1), (17, 4, 3, 9, 5), (0, 2, 2, 3, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_mole_lora_matches_the_formula(dtype, shape):
    t, e, r, d_in, d_out = shape
    x, a, b = rand(t, d_in, dtype=dtype), rand(e, r, d_in, dtype=dtype), rand(e, d_out, r, dtype=dtype)
    p = torch.softmax(rand(t, e), -1)
    w = molora.top_k_gate(p, min(2, e), True)
    y = molora.mole_lora(x, a, b, w, 0.5)
    assert y.dtype == dtype and y.shape == (t, d_out)
    close(y, lora_ref(x, a, b, w, 0.5), dtype, f"mole_lora {dtype} {shape}")


def test_mole_lora_gradients_equal_torch_autograd_of_the_formula():
    t, e, r, d_in, d_out = 6, 4, 3, 5, 7
    leaves = [rand(t, d_in, requires_grad=True), rand(e, r, d_in, requires_grad=True),
              rand(e, d_out, r, requires_grad=True), torch.rand(t, e).requires_grad_()]
    g = rand(t, d_out, seed=3)
    (molora.mole_lora(*leaves, 0.7) * g).sum().backward()
    ours = [v.grad.clone() for v in leaves]
    ref = [v.detach().double().requires_grad_() for v in leaves]
    (lora_ref(*ref, 0.7) * g.double()).sum().backward()
    for name, o, rr in zip("x a b w".split(), ours, ref):
        close(o, rr.grad, what=f"d{name}")


def test_routed_slots_with_empty_slots_equal_the_dense_op():
    t, e, r, d_in, d_out = 9, 5, 2, 6, 4
    x, a, b = rand(t, d_in, requires_grad=True), rand(e, r, d_in, requires_grad=True), rand(e, d_out, r, requires_grad=True)
    ids = torch.tensor([[0, 3], [4, -1], [-1, -1], [1, 2], [2, 0], [3, -1], [0, 1], [4, 3], [-1, 2]], dtype=torch.int64)
    weights = torch.rand(t, 2)
    weights[ids < 0] = 0.0
    weights.requires_grad_()
    y = molora.mole_lora_routed(x, a, b, ids, weights, 1.5)
    dense = torch.zeros(t, e)
    for i in range(t):
        for s in range(2):
            if ids[i, s] >= 0:
                dense[i, ids[i, s]] += weights[i, s].item()
    close(y, lora_ref(x, a, b, dense, 1.5), what="routed vs dense")
    assert torch.all(y[2] == 0), "a token with only -1 slots gets exactly zero"
    g = rand(t, d_out, seed=5)
    (y * g).sum().backward()
    xr, ar, br = (v.detach().double().requires_grad_() for v in (x, a, b))
    wr = weights.detach().double().requires_grad_()
    dense_r = torch.zeros(t, e, dtype=torch.float64).index_put(
        (torch.arange(t).repeat_interleave(2), ids.clamp(min=0).flatten()),
        wr.flatten() * (ids >= 0).flatten().double(), accumulate=True)
    (lora_ref(xr, ar, br, dense_r, 1.5) * g.double()).sum().backward()
    for name, o, rr in (("x", x, xr), ("a", a, ar), ("b", b, br), ("weights", weights, wr)):
        want = rr.grad * ((ids >= 0).double() if name == "weights" else 1.0)
        close(o.grad, want, what=f"d{name}")


def test_gates_and_their_gradients():
    t, e = 7, 5
    logits = rand(t, e, seed=11)
    p = torch.softmax(logits, -1).requires_grad_()
    w = molora.top_k_gate(p, 2, True)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter(1, p.detach().topk(2, -1).indices, True)
    pr = p.detach().double().requires_grad_()
    wr = torch.where(keep, pr, 0.0)
    wr = wr / wr.sum(-1, keepdim=True)
    close(w, wr, what="top-k weights")
    g = rand(t, e, seed=12)
    (w * g).sum().backward()
    (wr * g.double()).sum().backward()
    close(p.grad, pr.grad, what="top-k dp")

    p2 = torch.softmax(rand(t, e, seed=13), -1).requires_grad_()
    tau = torch.full((t,), 0.18).requires_grad_()
    w2 = molora.threshold_gate(p2, tau)
    (w2 * g).sum().backward()
    pr2, tr = p2.detach().double().requires_grad_(), tau.detach().double().requires_grad_()
    keep2 = pr2.detach() >= tr.detach()[:, None]
    assert keep2.any(-1).all(), "τ below 1/E: every row keeps an expert (max p ≥ 1/E)"
    num = torch.where(keep2, pr2 - tr[:, None], 0.0)
    wr2 = num / num.sum(-1, keepdim=True)
    close(w2, wr2, what="threshold weights")
    (wr2 * g.double()).sum().backward()
    close(p2.grad, pr2.grad, what="threshold dp")
    close(tau.grad, tr.grad, what="threshold dtau")


def test_weight_space_lora_matches_the_formula_and_autograd():
    e, r, d_in, d_out = 3, 2, 5, 4
    offsets = torch.tensor([0, 3, 3, 8], dtype=torch.int32)  # an empty sequence in the middle
    t = 8
    x, a, b = rand(t, d_in, requires_grad=True), rand(e, r, d_in, requires_grad=True), rand(e, d_out, r, requires_grad=True)
    p = torch.rand(3, e).requires_grad_()
    y = molora.weight_space_lora(x, a, b, p, offsets, 0.5)
    g = rand(t, d_out, seed=4)
    (y * g).sum().backward()
    xr, ar, br, pr = (v.detach().double().requires_grad_() for v in (x, a, b, p))
    rows = []
    for q in range(3):
        s, f = offsets[q].item(), offsets[q + 1].item()
        am = torch.einsum("e,eri->ri", pr[q], ar)
        bm = torch.einsum("e,eor->or", pr[q], br)
        rows.append(0.5 * (xr[s:f] @ am.T) @ bm.T)
    yr = torch.cat(rows)
    close(y, yr, what="weight-space y")
    (yr * g.double()).sum().backward()
    for name, o, rr in (("x", x, xr), ("a", a, ar), ("b", b, br), ("p", p, pr)):
        close(o.grad, rr.grad, what=f"d{name}")


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quant_linear_is_x_times_the_dequantised_weight(fmt):
    w = rand(12, 70, seed=21)
    q = molora.quantize_nf4(w) if fmt == "nf4" else molora.quantize_int8(w)
    assert q.nbytes() < w.numel() * 4 / 3
    x = rand(5, 70, requires_grad=True)
    y = molora.quant_linear(x, q)
    eye = torch.eye(70)
    deq = molora.quant_linear(eye, q).T  # deq(W) [12, 70], column by column
    close(y, x.detach() @ deq.T, what=f"{fmt} y")
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < (0.15 if fmt == "nf4" else 0.01), f"{fmt} round trip: relative error {rel}"
    g = rand(5, 12, seed=22)
    (y * g).sum().backward()
    close(x.grad, g @ deq, what=f"{fmt} dx")


def test_add_lora_adds_into_a_column_slice_in_place():
    t, e, r, d_in, d_out = 6, 3, 2, 5, 4
    x, a, b = rand(t, d_in), rand(e, r, d_in), rand(e, d_out, r)
    indices = torch.tensor([0, -1, 2, 1, -1, 0])
    y = rand(t, 3 * d_out, seed=9)
    before = y.clone()
    molora.add_lora(y, x, a, b, indices, 2.0, d_out)  # the middle part of a packed QKV
    onehot = torch.zeros(t, e)
    for i, k in enumerate(indices.tolist()):
        if k >= 0:
            onehot[i, k] = 1.0
    want = before.clone()
    want[:, d_out:2 * d_out] += lora_ref(x, a, b, onehot, 2.0).float()
    close(y, want, what="add_lora")
    assert torch.equal(y[:, :d_out], before[:, :d_out]) and torch.equal(y[:, 2 * d_out:], before[:, 2 * d_out:])
    assert torch.equal(y[1], before[1]) and torch.equal(y[4], before[4]), "-1 adds nothing"


def test_route_equals_softmax_then_top_k():
    t, d_in, e = 8, 6, 5
    x, w_g, b_g = rand(t, d_in), rand(e, d_in, seed=2), rand(e, seed=3)
    ids, weights = molora.route_slots(x, w_g, b_g, temperature=0.7, gate="top_k", k=2)
    p = torch.softmax((x @ w_g.T + b_g) / 0.7, -1)
    top = p.topk(2, -1)
    assert torch.equal(ids.long(), top.indices)
    close(weights, top.values / top.values.sum(-1, keepdim=True), what="route weights")
    ids, weights = molora.route_slots(x, w_g, gate="threshold", tau=0.9)  # none pass: the arg-max
    assert torch.equal(ids[:, 0].long(), (x @ w_g.T).argmax(-1)) and torch.all(ids[:, 1:] == -1)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch with dynamic shapes


def opcheck_cases():
    t, e, r, d_in, d_out = 5, 3, 2, 4, 6
    x, a, b = rand(t, d_in, requires_grad=True), rand(e, r, d_in, requires_grad=True), rand(e, d_out, r, requires_grad=True)
    w = torch.rand(t, e).requires_grad_()
    p = torch.softmax(rand(t, e), -1).requires_grad_()
    ids = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 1], [0, 1]], dtype=torch.int32)
    sw = torch.rand(t, 2).requires_grad_()
    q = molora.quantize_nf4(rand(d_out, d_in))
    return [
        ("mole_lora", torch.ops.molora.mole_lora.default, (x, a, b, w, 0.5)),
        ("mole_lora_routed", torch.ops.molora.mole_lora_routed.default, (x, a, b, ids, sw, 0.5)),
        ("top_k_gate", torch.ops.molora.top_k_gate.default, (p, 2, True)),
        ("threshold_gate", torch.ops.molora.threshold_gate.default, (p, torch.full((t,), 0.3, requires_grad=True))),
        ("weight_space_lora", torch.ops.molora.weight_space_lora.default,
         (x, a, b, torch.rand(2, e, requires_grad=True), torch.tensor([0, 2, 5]), 0.5)),
        ("quant_linear", torch.ops.molora.quant_linear.default, (x, q.data, q.scales, "nf4", d_out, d_in)),
        ("route", torch.ops.molora.route.default,
         (x.detach(), rand(e, d_in), None, "softmax", 1.0, "top_k", 2, True, "fixed", 0.0, None, None, None, "mix", 0.5)),
        ("add_lora", torch.ops.molora.add_lora.default,
         (rand(t, 2 * d_out), x.detach(), a.detach(), b.detach(), torch.tensor([0, -1, 2, 1, 0]), 1.0, d_out)),
        ("mole_lora_backward", torch.ops.molora.mole_lora_backward.default,
         (rand(t, d_out), x.detach(), a.detach(), b.detach(), w.detach(), 0.5)),
        ("gate_backward", torch.ops.molora.gate_backward.default, (rand(t, e), p.detach(), None, "top_k", 2, True)),
        ("mole_lora_routed_backward", torch.ops.molora.mole_lora_routed_backward.default,
         (rand(t, d_out), x.detach(), a.detach(), b.detach(), ids, sw.detach(), 0.5)),
        ("weight_space_lora_backward", torch.ops.molora.weight_space_lora_backward.default,
         (rand(t, d_out), x.detach(), a.detach(), b.detach(), torch.rand(2, e), torch.tensor([0, 2, 5]), 0.5)),
        ("quant_linear_backward", torch.ops.molora.quant_linear_backward.default,
         (rand(t, d_out), q.data, q.scales, "nf4", d_out, d_in)),
    ]


@pytest.mark.parametrize("name,op,args", opcheck_cases(), ids=[c[0] for c in opcheck_cases()])
def test_opcheck(name, op, args):
    opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# Bad inputs raise ValueError naming the problem


def test_bad_inputs_are_value_errors_naming_the_problem():
    x, a, b = rand(3, 4), rand(2, 2, 4), rand(2, 5, 2)
    w = torch.rand(3, 2)
    cases = [
        (lambda: molora.mole_lora(x, rand(2, 2, 5), b, w, 1.0), "d_in"),
        (lambda: molora.mole_lora(x, a, b, torch.rand(3, 3), 1.0), "w: shape"),
        (lambda: molora.mole_lora(x, a, b, w.double(), 1.0), "float32"),
        (lambda: molora.mole_lora(x.half(), a, b, w, 1.0), "dtype"),
        (lambda: molora.mole_lora(x.t().contiguous().t(), a, b, w, 1.0), "contiguous"),
        (lambda: molora.mole_lora(x, a, b, w, float("nan")), "scale"),
        (lambda: molora.mole_lora_routed(x, a, b, torch.tensor([[0], [2], [1]]), torch.ones(3, 1), 1.0), "expert id 2"),
        (lambda: molora.top_k_gate(torch.rand(3, 2), 3, True), "k = 3"),
        (lambda: molora.top_k_gate(torch.tensor([[0.5, float("nan")]]), 1, True), "not finite"),
        (lambda: molora.weight_space_lora(x, a, b, torch.rand(2, 2), torch.tensor([0, 2, 1]), 1.0), "offsets"),
        (lambda: molora.add_lora(rand(3, 5), x, a, b, torch.tensor([0, 1, 0]), 1.0, 1), "y_offset"),
    ]
    for f, needle in cases:
        with pytest.raises(ValueError, match=needle):
            f()
