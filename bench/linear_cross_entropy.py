"""Speed and memory of the full-catalog softmax cross-entropy (linear_cross_entropy) against eager
PyTorch, torch.compile and the public peers.

    python bench/linear_cross_entropy.py                  # headline shapes for the device
    python bench/linear_cross_entropy.py --quick          # CI-sized run
    python bench/linear_cross_entropy.py --gpu-suite      # what bench/gpu_suite.sh runs
    python bench/linear_cross_entropy.py --full 4096,1000000,64 --dtype bf16

Providers (the vocabulary of every bench script, bench/_harness.py): eager (the reference,
builds the logits), compile (torch.compile of it), our backends by name (triton, cuda, cpp) or
ours (triton on CUDA, cpp on CPU), and the public peers when installed (never required):
cut-cross-entropy (``cce``, at its defaults: gradient filtering on, no bias argument) and
liger-kernel (``liger``), on CUDA only; ``bash bench/fetch_peers.sh`` fetches the versions these
calls are written against (cut-cross-entropy 25.1.1, liger-kernel 0.8.5). cce has no float32
case: its backward asserts bf16 or fp16 embeddings. Under --gpu-suite the peers run in bf16 at
4096,1000000,64 only (SUITE_PEER_SHAPES): liger-kernel 0.8.5 sizes its chunks as
cdiv(B, cdiv(N, d)) rows, one row per chunk at 1M-2M items and d = 64-128, seconds per call,
which would not fit the suite step's time limit; outside --gpu-suite the given --providers,
--dtype and shapes are kept. Columns: ms fwd+bwd (median, p20-p80), peak MiB above the inputs.
Rows go to bench/results/linear_cross_entropy.csv.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness  # noqa: E402
from seqrec_fast import backend as B  # noqa: E402
from seqrec_fast.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from seqrec_fast.reference.linear_cross_entropy import linear_cross_entropy_ref  # noqa: E402

OP = "linear_cross_entropy"
PROVIDERS = "eager,compile,ours,cce,liger"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPE_FLAG, SHAPE_LEN, SHAPE_HELP = "--full", 3, "B,N,d ... full-catalog shapes"
GPU_SHAPES = [(4096, 100_000, 64), (4096, 1_000_000, 64), (8192, 2_000_000, 128)]
CPU_SHAPES = [(1024, 100_000, 64)]
QUICK_SHAPES = [(256, 8192, 32)]
# eager / torch.compile materialise (B, N) logits several times: skip them where that cannot fit
EAGER_MAX_ELEMS = {"cuda": 4096 * 1_000_000, "cpu": 1024 * 200_000}
# --gpu-suite (bench/_harness.py loss_bench_main): the peers' cases only at these shapes and
# dtypes (liger-kernel takes seconds per call at the 2M-item shape and in fp32)
SUITE_PEER_SHAPES = [(4096, 1_000_000, 64)]
SUITE_PEER_DTYPES = (torch.bfloat16,)
# cut-cross-entropy 25.1.1's backward asserts bf16/fp16 embeddings
CCE_DTYPES = (torch.bfloat16, torch.float16)


def _peers():
    """{name: f(user, items, target, bias)} of the peers that import. cce takes no bias: with
    one it raises (the caller only passes None)."""
    peers = {}
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        def run_cce(u, w, t, b):
            if b is not None:
                raise ValueError("cut-cross-entropy has no bias argument")
            return cce(u, w, t)

        peers["cce"] = run_cce
    except Exception:  # noqa: BLE001 - optional
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lfce

        peers["liger"] = lambda u, w, t, b: lfce(u, w, t, bias=b)
    except Exception:  # noqa: BLE001 - optional
        pass
    return peers


def _inputs(shape, dtype, device):
    """(user, items, target) of one shape, user and items requiring grad."""
    b, n, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    user = (torch.randn(b, d, generator=g) * 0.3).to(device=device, dtype=dtype)
    items = (torch.randn(n, d, generator=g) * 0.3).to(device=device, dtype=dtype)
    target = torch.randint(0, n, (b,), generator=g).to(device)
    user.requires_grad_(True)
    items.requires_grad_(True)
    return user, items, target


def build_cases(shapes, dtype, device, providers, modes):
    cases = []
    compiled = torch.compile(linear_cross_entropy_ref, dynamic=False)
    peers = _peers() if device.type == "cuda" else {}
    if "cce" in providers and "cce" in peers and dtype not in CCE_DTYPES:
        print(f"note: provider 'cce' left out at {str(dtype).replace('torch.', '')}: "
              "cut-cross-entropy's backward takes bf16/fp16 only", file=sys.stderr)
    for b, n, d in shapes:
        user, items, target = _inputs((b, n, d), dtype, device)
        fns = {}
        big = b * n > EAGER_MAX_ELEMS[device.type]
        for p in providers:
            if p == "eager" and not big:
                fns[p] = lambda: linear_cross_entropy_ref(user, items, target)
            elif p == "compile" and not big:
                fns[p] = lambda: compiled(user, items, target)
            elif p in ("triton", "cuda", "cpp") and B.available(OP, p, device):
                fns[p] = lambda p=p: linear_cross_entropy(user, items, target, backend=p)
            elif p in peers and not (p == "cce" and dtype not in CCE_DTYPES):
                fns[p] = lambda f=peers[p]: f(user, items, target, None)
        tag = f"{b}x{n}x{d}"
        for mode in modes:
            for p, fn in fns.items():
                run = _harness.no_grad(fn) if mode == "fwd" else _harness.fwd_bwd(fn, [user, items])
                cases.append(_harness.Case(p, mode, tag, run, variant="full",
                                           dtype=str(dtype).replace("torch.", "")))
    return cases


def main(argv=None):
    _harness.loss_bench_main(sys.modules[__name__], __doc__, argv, extra_providers=("cce", "liger"))


if __name__ == "__main__":
    main()
