"""Speed report of multi_interest_attention (ComiRec-SA) against eager PyTorch and torch.compile.

    python bench/attention.py                 # headline shapes for the device (CPU: 1024,50,4,64)
    python bench/attention.py --quick         # CI-sized run
    python bench/attention.py --gpu-suite     # bench/gpu_suite.sh: fp32 headline shapes, bf16
    python bench/attention.py --shapes 4096,50,4,64 --dtype bf16 --providers eager,triton

Shapes are B,L,K,d with hidden d_a = 4·d (ComiRec), a learned position embedding and both
biases, ~20 % padding. Prints a Markdown table (median ms with 20/80 percentiles, peak MiB,
speed-up vs torch.compile or eager) and appends rows to bench/results/attention.csv.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness  # noqa: E402
from seqrec_fast import backend as B  # noqa: E402
from seqrec_fast.ops.attention import multi_interest_attention  # noqa: E402
from seqrec_fast.reference.attention import attention_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_SHAPES = [(4096, 50, 4, 64), (8192, 200, 8, 64)]
CPU_SHAPES = [(1024, 50, 4, 64)]
QUICK_SHAPES = [(128, 20, 4, 32)]


def make_inputs(shape, dtype, device, seed=0):
    b, l, k, d = shape
    da = 4 * d
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(b, l, d, generator=g).mul_(0.5)
    lengths = torch.randint(max(1, l // 2), l + 1, (b,), generator=g)
    mask = (torch.arange(l)[None, :] < lengths[:, None]).to(device)
    w1 = torch.randn(d, da, generator=g) / d ** 0.5
    b1 = torch.randn(da, generator=g) * 0.1
    w2 = torch.randn(da, k, generator=g) / da ** 0.5
    b2 = torch.randn(k, generator=g) * 0.1
    pos = torch.randn(l, d, generator=g) * 0.1
    params = [t.to(device=device, dtype=dtype).requires_grad_(True)
              for t in (seq, w1, b1, w2, b2, pos)]
    return params, mask


def build_cases(shapes, dtypes, device, providers, modes):
    cases = []
    compiled = torch.compile(attention_ref, dynamic=False)
    for dtype in dtypes:
        for shape in shapes:
            (seq, w1, b1, w2, b2, pos), mask = make_inputs(shape, dtype, device)
            args = (seq, mask, w1, b1, w2, b2)
            params = [seq, w1, b1, w2, b2, pos]
            fns = {}
            for p in providers:
                if p == "eager":
                    fns[p] = lambda a=args, pe=pos: attention_ref(*a, pos_emb=pe)
                elif p == "compile":
                    fns[p] = lambda a=args, pe=pos: compiled(*a, pos_emb=pe)
                elif B.available("attention", p, device):
                    fns[p] = lambda a=args, pe=pos, p=p: multi_interest_attention(
                        *a, pos_emb=pe, backend=p)
            tag = "x".join(map(str, shape))
            for mode in modes:
                for p, fn in fns.items():
                    run = _harness.no_grad(fn) if mode == "fwd" else _harness.fwd_bwd(fn, params)
                    cases.append(_harness.Case(p, mode, tag, run, variant="sa",
                                               dtype=str(dtype).replace("torch.", "")))
    return cases


def main(argv=None):
    _harness.stable_malloc()
    ap = _harness.base_parser(__doc__, "eager,compile,triton,cuda,cpp", "fwd,fwd+bwd")
    ap.add_argument("--dtype", default="fp32", help="comma list of " + ",".join(sorted(DTYPES)))
    ap.add_argument("--shapes", nargs="*", help="B,L,K,d ...")
    ap.add_argument("--gpu-suite", action="store_true",
                    help="GPU headline shapes in fp32, plus bf16 fwd+bwd at the first one")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype_names = _harness.parse_dtypes(ap, args.dtype, DTYPES)
    shapes = _harness.pick_shapes(args, device, QUICK_SHAPES, GPU_SHAPES, CPU_SHAPES)
    providers = _harness.parse_providers(ap, args.providers, device, "attention")
    _harness.print_versions()
    if args.gpu_suite and not args.shapes:  # fp32 headline shapes + bf16 at the first one
        cases = build_cases(GPU_SHAPES, [torch.float32], device, providers,
                            args.modes.split(","))
        cases += build_cases(GPU_SHAPES[:1], [torch.bfloat16], device, providers, ["fwd+bwd"])
    else:
        cases = build_cases(shapes, [DTYPES[n] for n in dtype_names], device, providers,
                            args.modes.split(","))
    _harness.run_cases("attention", cases, device, csv_path=args.csv,
                       reps=3 if args.quick else args.reps)


if __name__ == "__main__":
    main()
