"""Speed report of capsule_routing (MIND and ComiRec-DR) against eager PyTorch and torch.compile.

    python bench/routing.py                 # headline shapes for the device (CPU: 1024,50,4,64)
    python bench/routing.py --quick         # CI-sized run
    python bench/routing.py --shapes 4096,50,4,64 --dtype bf16 --providers eager,triton
    python bench/routing.py --variants mind_seq,dr_seq   # torch-rechub's softmax over the sequence

Prints a Markdown table (median ms with 20/80 percentiles, peak MiB, speed-up vs torch.compile
or eager) and appends rows to bench/results/routing.csv.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness  # noqa: E402
from seqrec_fast import backend as B  # noqa: E402
from seqrec_fast.ops import capsule_routing  # noqa: E402
from seqrec_fast.reference import routing_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_SHAPES = [(4096, 50, 4, 64), (8192, 200, 8, 64), (1024, 20, 4, 16)]
CPU_SHAPES = [(1024, 50, 4, 64)]
QUICK_SHAPES = [(128, 20, 4, 32)]
# variant -> capsule_routing options. "*_seq": torch-rechub's CapsuleNetwork (softmax over the
# sequence axis, padded positions in the denominator: softmax_axis="sequence").
VARIANTS = {"mind": dict(bilinear="shared"), "dr": dict(bilinear="per_position"),
            "mind_seq": dict(bilinear="shared", softmax_axis="sequence"),
            "dr_seq": dict(bilinear="per_position", softmax_axis="sequence")}


def make_inputs(shape, variant, dtype, device, seed=0):
    b, l, k, d = shape
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(b, l, d, generator=g).mul_(0.5).to(device=device, dtype=dtype)
    lengths = torch.randint(1, l + 1, (b,), generator=g)
    mask = (torch.arange(l)[None, :] < lengths[:, None]).to(device)
    if VARIANTS[variant]["bilinear"] == "shared":
        w = torch.randn(d, d, generator=g) / d ** 0.5
        init = torch.randn(b, k, l, generator=g).to(device)
    else:
        w = torch.randn(l, k * d, d, generator=g) / d ** 0.5
        init = None
    seq.requires_grad_(True)
    w = w.to(device=device, dtype=dtype).requires_grad_(True)
    return seq, mask, w, init


def build_cases(shapes, variants, dtype, device, providers, modes):
    cases = []
    compiled = torch.compile(routing_ref, dynamic=False)
    for shape in shapes:
        for variant in variants:
            seq, mask, w, init = make_inputs(shape, variant, dtype, device)
            kw = dict(num_interests=shape[2], iters=3, init_logits=init, **VARIANTS[variant])
            fns = {}
            for p in providers:
                args = (seq, mask, w)
                if p == "eager":
                    fns[p] = lambda a=args, kw=kw: routing_ref(*a, **kw)
                elif p == "compile":
                    fns[p] = lambda a=args, kw=kw: compiled(*a, **kw)
                elif B.available("routing", p, device):
                    fns[p] = lambda a=args, kw=kw, p=p: capsule_routing(*a, backend=p, **kw)
            tag = "x".join(map(str, shape))
            for mode in modes:
                for p, fn in fns.items():
                    run = (_harness.no_grad(fn) if mode == "fwd"
                           else _harness.fwd_bwd(fn, [args[0], args[2]]))
                    cases.append(_harness.Case(p, mode, tag, run, variant=variant,
                                               dtype=str(dtype).replace("torch.", ""),
                                               retained_mib=_harness.routing_workspace_mib(
                                                   device) if p == "cpp" else None))
    return cases


def main(argv=None):
    _harness.stable_malloc()
    ap = _harness.base_parser(__doc__, "eager,compile,triton,cuda,cpp", "fwd,fwd+bwd")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--shapes", nargs="*", help="B,L,K,d ...")
    ap.add_argument("--variants", default="mind,dr",
                    help=f"comma list of {', '.join(VARIANTS)} (*_seq: torch-rechub's softmax "
                         f"over the sequence axis)")
    args = ap.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {sorted(VARIANTS)}")
    device = torch.device(args.device)
    shapes = _harness.pick_shapes(args, device, QUICK_SHAPES, GPU_SHAPES, CPU_SHAPES)
    providers = _harness.parse_providers(ap, args.providers, device, "routing")
    _harness.print_versions()
    cases = build_cases(shapes, args.variants.split(","), DTYPES[args.dtype], device, providers,
                        args.modes.split(","))
    _harness.run_cases("routing", cases, device, csv_path=args.csv,
                       reps=3 if args.quick else args.reps)


if __name__ == "__main__":
    main()
