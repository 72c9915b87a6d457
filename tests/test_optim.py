"""Dense Adam (seqrec_fast.optim.dense_adam / build_optimizers): torch's fused Adam where torch has
it, numerically the same optimizer as torch.optim.Adam's default implementation."""
import copy

import pytest
import torch

from seqrec_fast.models import build_model
from seqrec_fast.optim import build_optimizers, dense_adam, fused_adam_supported


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(500, 16, generator=g)),
            torch.nn.Parameter(torch.randn(7, 3, 5, generator=g)),
            torch.nn.Parameter(torch.randn(4, generator=g))]


def _run(opt, params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            # sparse-looking gradients too: most table rows get exactly zero (dense Adam still
            # decays their moments and moves them)
            gr = torch.randn(p.shape, generator=g)
            if p.dim() == 2:
                gr[torch.rand(p.shape[0], generator=g) < 0.9] = 0
            p.grad = gr
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.01}, {"amsgrad": True},
                                {"betas": (0.8, 0.99), "eps": 1e-6}])
def test_dense_adam_matches_torch_adam(kw):
    ref, ours = _params(), _params()
    o_ref = torch.optim.Adam(ref, lr=1e-2, **kw)
    o = dense_adam(ours, lr=1e-2, **kw)
    assert o.defaults["fused"] is True        # CPU float tensors: torch's fused kernel
    _run(o_ref, ref, 20)
    _run(o, ours, 20)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # rows that never had a gradient still moved (every row's moments decay: dense Adam)
    for a, b in zip(o.state[ours[0]].values(), o_ref.state[ref[0]].values()):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=1e-5)


def test_dense_adam_fallbacks_and_explicit_choices():
    p = _params()
    assert fused_adam_supported(p)
    # explicit choices are honoured
    assert not dense_adam(p, lr=1e-3, foreach=True).defaults["fused"]
    assert not dense_adam(p, lr=1e-3, fused=False).defaults["fused"]
    # a tensor the fused kernel does not take: torch's default implementation
    odd = [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]
    assert not fused_adam_supported(odd)
    assert not dense_adam(odd + p, lr=1e-3).defaults["fused"]
    # param groups are accepted
    o = dense_adam([{"params": p[:1]}, {"params": p[1:], "lr": 1e-2}], lr=1e-3)
    assert o.defaults["fused"] and o.param_groups[1]["lr"] == 1e-2


def test_dense_adam_state_dict_round_trip():
    a, b = _params(), _params()
    oa = dense_adam(a, lr=1e-2)
    _run(oa, a, 3)
    ob = dense_adam(b, lr=1e-2)
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))   # as from a checkpoint file
    _run(oa, a, 2, seed=5)
    _run(ob, b, 2, seed=5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["adam", "rowwise_adam"])
def test_build_optimizers_uses_dense_adam(name):
    m = build_model("comirec-sa", 50, dim=8, max_len=6, backend="eager", sparse=name != "adam")
    opts = build_optimizers(m, name, 1e-3)
    assert isinstance(opts[0], torch.optim.Adam) and opts[0].defaults["fused"]


def test_rowwise_adam_resumed_onto_another_device_moves_its_step_counts():
    """A checkpoint is loaded on the CPU; Optimizer.load_state_dict moves every state entry to
    its parameter's device except one named "step", so RowWiseAdam's per-row counts stayed on
    the CPU while the table lived on the GPU. Shown here with the meta device as the other
    device (shape-only tensors: the step must run without a device mismatch)."""
    from seqrec_fast.optim import RowWiseAdam

    cpu = torch.nn.Parameter(torch.randn(6, 3))
    opt = RowWiseAdam([cpu], lr=0.1)
    cpu.grad = torch.randn(6, 3)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    other = torch.nn.Parameter(torch.empty(6, 3, device="meta"))
    opt2 = RowWiseAdam([other], lr=0.1)
    opt2.load_state_dict(state)
    other.grad = torch.empty(6, 3, device="meta")
    opt2.step()
    st = opt2.state[other]
    assert {t.device.type for t in (st["exp_avg"], st["exp_avg_sq"], st["step"])} == {"meta"}
