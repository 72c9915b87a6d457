"""Speed report of catalog-scale multi-interest retrieval (multi_interest_topk) and of ComiRec's
controllable aggregation (diverse_topk).

    python bench/retrieval.py                  # CPU headline: U,K,N,d,n = 4096,4,100000,64,50
    python bench/retrieval.py --quick          # CI-sized run
    python bench/retrieval.py --gpu-suite      # GPU headline: 100000,4,1000000,64,50
    python bench/retrieval.py --shapes 1024,4,100000,64,50 --providers torch,ours

Providers of the top-n step (variant "topn", all exact):
  ours    multi_interest_topk with the backend auto picks (cpp on CPU, triton on GPU); the
          backend names cpp / triton pick one explicitly
  torch   chunks of users: matmul (chunk·K, N), topk per interest, merge by score, de-duplicate
  torch-max  chunks of users: matmul, max over interests, topk
  faiss   IndexFlatIP over the items (built outside the timing) searched with the U·K interest
          vectors, then the same merge (only when faiss is installed; CPU index on CPU)
  eager   the float64 reference (quick shapes only)
Variant "aggregate": diverse_topk (lam = 0.5, 20 categories) over the merged top-(2n) candidates
of every user, ours vs the eager per-user loop (quick shapes only), to set its cost against
the top-n step. Prints a Markdown table (median ms, 20/80 percentiles, peak MiB, speed-up vs
torch) and appends rows to bench/results/retrieval.csv.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness  # noqa: E402
from seqrec_fast.ops.diverse_topk import diverse_topk  # noqa: E402
from seqrec_fast.ops.multi_interest_topk import multi_interest_topk  # noqa: E402
from seqrec_fast.reference.diverse_topk import diverse_topk_ref  # noqa: E402
from seqrec_fast.reference.multi_interest_topk import multi_interest_topk_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_SHAPES = [(100000, 4, 1000000, 64, 50)]
CPU_SHAPES = [(4096, 4, 100000, 64, 50)]
QUICK_SHAPES = [(256, 4, 5000, 32, 20)]
# scores held at once by the torch providers: 128 MiB in fp32 on CPU; on CUDA 4 GiB, so that the
# GPU shape (100000 users x 4 interests x 1M items) takes ~400 chunks, not 12,500 Python steps
CHUNK_ELEMS = {"cpu": 1 << 25, "cuda": 1 << 30}


def chunk_elems(device_type: str) -> int:
    """Scores the torch providers hold at once on a device of this type."""
    return CHUNK_ELEMS.get(device_type, CHUNK_ELEMS["cpu"])


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def merge(scores: torch.Tensor, ids: torch.Tensor, n: int):
    """Per-interest lists (U, K·m) -> the n best distinct ids by score (ComiRec's merge)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    s, i = scores.gather(1, order), ids.gather(1, order)
    srt, perm = i.sort(dim=1, stable=True)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = torch.zeros_like(dup).scatter_(1, perm, dup)
    s = s.masked_fill(dup, float("-inf"))
    top, idx = s.topk(min(n, s.shape[1]), dim=1)
    return top, i.gather(1, idx)


def torch_topn(q: torch.Tensor, items: torch.Tensor, n: int, per_interest: bool = True):
    U, K, d = q.shape
    N = items.shape[0]
    step = max(1, chunk_elems(q.device.type) // max(1, K * N))
    out_s, out_i = [], []
    it_t = items.t()
    for u0 in range(0, U, step):
        s = (q[u0:u0 + step].reshape(-1, d) @ it_t).float()           # (u·K, N)
        u = s.shape[0] // K
        if per_interest:
            v, i = s.topk(min(n, N), dim=1)
            v, i = merge(v.reshape(u, -1), i.reshape(u, -1), n)
        else:
            v, i = s.view(u, K, N).amax(1).topk(min(n, N), dim=1)
        out_s.append(v)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


class FaissFlat:
    def __init__(self, items: torch.Tensor):
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        self.index = faiss.IndexFlatIP(items.shape[1])
        self.index.add(items.float().cpu().numpy())

    def __call__(self, q: torch.Tensor, n: int):
        U, K, d = q.shape
        s, i = self.index.search(q.reshape(U * K, d).float().cpu().numpy(), n)
        s, i = torch.from_numpy(s), torch.from_numpy(i)
        return merge(s.reshape(U, K * n), i.reshape(U, K * n), n)


def make_inputs(shape, dtype, device, seed=0):
    U, K, N, d, n = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(U, K, d, generator=g).to(device=device, dtype=dtype)
    items = torch.randn(N, d, generator=g).to(device=device, dtype=dtype)
    cats = torch.randint(0, 20, (N,), generator=g).to(device)
    return q, items, cats


def build_cases(shapes, dtypes, device, providers, quick):
    cases = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for shape in shapes:
            U, K, N, d, n = shape
            q, items, cats = make_inputs(shape, dtype, device)
            tag = "x".join(map(str, shape))
            fns = {}
            for p in providers:
                if p in ("ours", "cpp", "triton", "cuda"):
                    be = "auto" if p == "ours" else p
                    fns[p] = lambda q=q, it=items, n=n, be=be: multi_interest_topk(q, it, n,
                                                                                   backend=be)
                elif p == "torch":
                    fns[p] = lambda q=q, it=items, n=n: torch_topn(q, it, n)
                elif p == "torch-max":
                    fns[p] = lambda q=q, it=items, n=n: torch_topn(q, it, n, per_interest=False)
                elif p == "faiss" and faiss_available() and device.type == "cpu":
                    index = FaissFlat(items)
                    fns[p] = lambda q=q, n=n, index=index: index(q, n)
                elif p == "eager" and quick:
                    fns[p] = lambda q=q, it=items, n=n: multi_interest_topk_ref(q, it, n)
            for p, fn in fns.items():
                cases.append(_harness.Case(p, "fwd", tag, _harness.no_grad(fn), variant="topn",
                                           dtype=dname))
            ours = [p for p in providers if p in ("ours", "cpp", "triton")]
            if ours:
                cs, ci = multi_interest_topk(q, items, 2 * n)
                lam = 0.5
                for p in ours:
                    be = "auto" if p == "ours" else p
                    cases.append(_harness.Case(
                        p, "fwd", tag,
                        lambda cs=cs, ci=ci, n=n, be=be: diverse_topk(cs, ci, cats, n, lam,
                                                                      backend=be),
                        variant="aggregate", dtype=dname))
                if quick:
                    cases.append(_harness.Case(
                        "eager", "fwd", tag,
                        lambda cs=cs, ci=ci, n=n: diverse_topk_ref(cs, ci, cats, n, lam),
                        variant="aggregate", dtype=dname))
    return cases


def check_exact(shape, device):
    """Our ids equal the torch-max provider's on a small slice of the shape (no ties in
    random continuous data), so the timed providers compute the same thing."""
    U, K, N, d, n = shape
    q, items, _ = make_inputs((min(U, 64), K, N, d, n), torch.float32, device, seed=1)
    s, i = multi_interest_topk(q, items, n)
    ts, ti = torch_topn(q, items, n, per_interest=False)
    agree = (i == ti).float().mean().item()
    print(f"exactness check at {min(U, 64)} users: {100 * agree:.2f}% of ids equal the "
          f"torch matmul+topk path, max score diff {(s - ts).abs().max().item():.2e}",
          file=sys.stderr)


def main(argv=None):
    _harness.stable_malloc()
    ap = _harness.base_parser(__doc__, "ours,torch,torch-max,faiss,eager")
    ap.add_argument("--dtype", default="fp32", help="comma list of " + ",".join(sorted(DTYPES)))
    ap.add_argument("--shapes", nargs="*", help="U,K,N,d,n ...")
    ap.add_argument("--gpu-suite", action="store_true",
                    help="GPU headline shape (dtypes from --dtype, fp32 by default)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype_names = _harness.parse_dtypes(ap, args.dtype, DTYPES)
    if args.shapes:
        for s in args.shapes:
            if len(s.split(",")) != 5:
                ap.error(f"--shapes: want U,K,N,d,n, got {s!r}")
    shapes = GPU_SHAPES if args.gpu_suite and not args.shapes else \
        _harness.pick_shapes(args, device, QUICK_SHAPES, GPU_SHAPES, CPU_SHAPES)
    providers = _harness.parse_providers(ap, args.providers, device, "multi_interest_topk",
                                         extra=("torch", "torch-max", "faiss"))
    _harness.print_versions()
    check_exact(shapes[0], device)
    cases = build_cases(shapes, [DTYPES[n] for n in dtype_names], device, providers, args.quick)
    _harness.run_cases("retrieval", cases, device, baseline=("torch", "eager"),
                       csv_path=args.csv, reps=3 if args.quick else args.reps)
    for c in cases:   # the aggregation's cost next to the top-n step it follows
        if c.variant == "aggregate" and c.provider != "eager" and "ms" in c.result:
            top = [t for t in cases if t.variant == "topn" and t.provider == c.provider
                   and t.shape == c.shape and t.dtype == c.dtype and "ms" in t.result]
            if top:
                print(f"aggregate/top-n time at {c.shape} {c.dtype}: "
                      f"{c.result['ms']:.3f} ms / {top[0].result['ms']:.3f} ms = "
                      f"{c.result['ms'] / top[0].result['ms']:.3f}")


if __name__ == "__main__":
    main()
