"""Speed and memory of the sampled softmax (sampled_softmax_loss: shared negatives, in-batch
negatives, logQ correction) against eager PyTorch and torch.compile.

    python bench/sampled_softmax.py                  # headline shapes for the device
    python bench/sampled_softmax.py --quick          # CI-sized run
    python bench/sampled_softmax.py --gpu-suite      # what bench/gpu_suite.sh runs (bf16, fp32)
    python bench/sampled_softmax.py --sampled 4096,1000000,8192,64 --dtype bf16

Providers (the vocabulary of every bench script, bench/_harness.py): eager (the reference,
builds the candidate logits), compile (torch.compile of it), our backends by name (triton,
cuda, cpp) or ours (triton on CUDA, cpp on CPU). Columns: ms fwd+bwd (median, p20-p80), peak MiB above the
inputs. Rows go to bench/results/sampled_softmax.csv.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness  # noqa: E402
from seqrec_fast import backend as B  # noqa: E402
from seqrec_fast.ops.sampled_softmax import sampled_softmax_loss  # noqa: E402
from seqrec_fast.reference.sampled_softmax import sampled_softmax_ref  # noqa: E402

OP = "sampled_softmax"
PROVIDERS = "eager,compile,ours"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPE_FLAG, SHAPE_LEN, SHAPE_HELP = "--sampled", 4, "B,N,S,d ... sampled-softmax shapes"
GPU_SHAPES = [(4096, 1_000_000, 8192, 64)]  # shared negatives + in-batch
CPU_SHAPES = [(1024, 100_000, 2048, 64)]
QUICK_SHAPES = [(256, 8192, 512, 32)]


def build_cases(shapes, dtype, device, providers, modes):
    cases = []
    compiled = torch.compile(sampled_softmax_ref, dynamic=False)
    for b, n, s, d in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        user = (torch.randn(b, d, generator=g) * 0.3).to(device=device, dtype=dtype)
        items = (torch.randn(n, d, generator=g) * 0.3).to(device=device, dtype=dtype)
        target = torch.randint(0, n, (b,), generator=g).to(device)
        neg = torch.randint(0, n, (s,), generator=g).to(device)
        log_q = torch.full((s,), -float(torch.log(torch.tensor(float(n)))), device=device)
        user.requires_grad_(True)
        items.requires_grad_(True)
        kw = dict(log_q=log_q, target_log_q=torch.full((b,), -10.0, device=device))
        fns = {}
        for p in providers:
            if p == "eager":
                fns[p] = lambda: sampled_softmax_ref(user, items, target, neg, **kw)
            elif p == "compile":
                fns[p] = lambda: compiled(user, items, target, neg, **kw)
            elif p in ("triton", "cuda", "cpp") and B.available(OP, p, device):
                fns[p] = lambda p=p: sampled_softmax_loss(user, items, target, neg,
                                                          backend=p, **kw)
        tag = f"{b}x{n}xS{s}x{d}"
        for mode in modes:
            for p, fn in fns.items():
                run = _harness.no_grad(fn) if mode == "fwd" else _harness.fwd_bwd(fn, [user, items])
                cases.append(_harness.Case(p, mode, tag, run, variant="sampled",
                                           dtype=str(dtype).replace("torch.", "")))
    return cases


def main(argv=None):
    _harness.loss_bench_main(sys.modules[__name__], __doc__, argv, extra_providers=())


if __name__ == "__main__":
    main()
