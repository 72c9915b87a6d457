"""Kernels launch on the device of their inputs: Triton launches on the *current* CUDA device
and its current stream, whatever device the tensors are on, so every custom op that launches
kernels runs its body under ``ops._common.on_input_device``."""
import re
from pathlib import Path

import pytest
import torch

from seqrec_fast.ops._common import on_input_device

OPS_DIR = Path(__file__).resolve().parents[1] / "seqrec_fast" / "ops"
NO_KERNEL = {"check_id_range", "lengths_mask", "raise_error"}   # argument checks, no launch


def test_every_kernel_op_runs_on_its_inputs_device():
    found = {}
    for path in OPS_DIR.glob("*.py"):
        text = path.read_text()
        for m in re.finditer(r'@torch\.library\.custom_op\("seqrec_fast::(\w+)"[^\n]*\n(@\w+)?',
                             text):
            found[m.group(1)] = m.group(2)
    assert {"routing_fwd", "attention_bwd", "linear_cross_entropy_fwd",
            "multi_interest_topk"} <= set(found)
    missing = sorted(n for n, deco in found.items()
                     if n not in NO_KERNEL and deco != "@on_input_device")
    assert not missing, f"custom ops launching kernels without @on_input_device: {missing}"


def test_on_input_device_keeps_signature_and_is_a_noop_on_cpu():
    calls = []

    def body(x: torch.Tensor, n: int) -> torch.Tensor:
        calls.append(x.device)
        return x * n

    f = on_input_device(body)
    assert f(torch.ones(2), 3).tolist() == [3.0, 3.0] and calls == [torch.device("cpu")]
    assert str(torch.library.infer_schema(f, mutates_args=())) == \
        str(torch.library.infer_schema(body, mutates_args=()))


@pytest.mark.cuda
def test_ops_on_a_second_gpu_while_the_first_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from seqrec_fast.ops import capsule_routing, linear_cross_entropy, multi_interest_topk

    g = torch.Generator().manual_seed(0)
    seq, w = torch.randn(8, 10, 16, generator=g), torch.randn(16, 16, generator=g) / 4
    user, items = torch.randn(8, 16, generator=g), torch.randn(300, 16, generator=g)
    target = torch.randint(0, 300, (8,), generator=g)
    lengths = torch.randint(1, 11, (8,), generator=g)
    want = (capsule_routing(seq, lengths, w, num_interests=3, bilinear="shared",
                            backend="eager"),
            linear_cross_entropy(user, items, target, backend="eager"),
            multi_interest_topk(seq[:, :3], items, 5, backend="eager")[1])
    dev = torch.device("cuda:1")
    torch.cuda.set_device(0)
    got = (capsule_routing(seq.to(dev), lengths.to(dev), w.to(dev), num_interests=3,
                           bilinear="shared", backend="triton"),
           linear_cross_entropy(user.to(dev), items.to(dev), target.to(dev), backend="triton"),
           multi_interest_topk(seq[:, :3].to(dev), items.to(dev), 5, backend="triton")[1])
    torch.cuda.synchronize(dev)
    assert torch.allclose(got[0].cpu(), want[0], atol=1e-4)
    assert torch.allclose(got[1].cpu(), want[1], atol=1e-4)
    assert torch.equal(got[2].cpu(), want[2])
