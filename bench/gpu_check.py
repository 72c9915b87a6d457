"""Small-shape correctness of every Triton kernel at fp32 / bf16 / fp16, values and gradients,
against float64 references — the first thing bench/gpu_suite.sh runs on a lent card.

    python bench/gpu_check.py [--out DIR] [--dtypes fp32,bf16,fp16] [--only NAME,...]
    python bench/gpu_check.py --dry-run     # CPU tensors, Triton through its interpreter

Each check runs one op with ``backend="triton"`` on inputs rounded to the dtype, the same op
with ``backend="eager"`` at that dtype, and the eager op in float64 on the rounded inputs (the
truth). The rule is DESIGN.md's: |kernel - truth| <= 2·|eager - truth| + atol·max(1, |truth|),
for the output and every input gradient (a random cotangent). A check's line is printed (and
its rows appended to DIR/gpu_check.csv) as soon as it ends, so a run that is killed still
reports what it finished. Every check runs even after a failure, so one run shows them all;
the exit code is 1 when any failed, 2 when a check crashed.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for gpu_check.csv (default: none)")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--only", default=None, help="comma list of check names (default: all)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors and the Triton interpreter (what CI runs)")
    args = ap.parse_args(argv)
    bad = [d for d in args.dtypes.split(",") if d not in DTYPE_NAMES]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; choose from {list(DTYPE_NAMES)}")
    return args


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    # must be set before triton.jit decorates any kernel, i.e. before seqrec_fast is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from _util import ATOL, describe_error  # noqa: E402

import seqrec_fast.ops as ops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CSV_FIELDS = ["check", "dtype", "quantity", "ok", "kernel_err", "eager_err", "bound", "seconds",
              "device", "detail"]


# ------------------------------------------------------------------------------------ checks
# Each check: (name, make(generator) -> dict of float64 / int tensors, run(inputs, backend)
# -> output tensor, names of the float inputs that get gradients). Shapes are small but not
# round (odd L, a padded row, an all-padded row, N not a multiple of any tile).

def _routing(bilinear, softmax_axis="interest"):
    def make(g):
        B, L, K, d = 5, 13, 3, 24
        lengths = torch.tensor([13, 7, 1, 0, 10])
        seq = torch.randn(B, L, d, generator=g, dtype=torch.float64) * 0.5
        if bilinear == "shared":
            w = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
            init = torch.randn(B, K, L, generator=g, dtype=torch.float64).float()
        else:
            w = torch.randn(L, K * d, d, generator=g, dtype=torch.float64) / d ** 0.5
            init = None
        return {"seq_emb": seq, "weight": w, "lengths": lengths, "init": init, "K": K}

    def run(x, backend):
        return ops.capsule_routing(x["seq_emb"], x["lengths"], x["weight"], num_interests=x["K"],
                                   bilinear=bilinear, init_logits=x["init"],
                                   softmax_axis=softmax_axis, backend=backend)
    return make, run, ("seq_emb", "weight")


def _attention():
    def make(g):
        B, L, K, d, da = 5, 13, 3, 24, 40
        f = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
        return {"seq_emb": f(B, L, d, scale=0.5), "lengths": torch.tensor([13, 7, 1, 0, 10]),
                "w1": f(d, da, scale=d ** -0.5), "b1": f(da, scale=0.1),
                "w2": f(da, K, scale=da ** -0.5), "b2": f(K, scale=0.1),
                "pos_emb": f(L, d, scale=0.3)}

    def run(x, backend):
        return ops.multi_interest_attention(x["seq_emb"], x["lengths"], x["w1"], x["b1"], x["w2"],
                                            x["b2"], pos_emb=x["pos_emb"], backend=backend)
    return make, run, ("seq_emb", "w1", "b1", "w2", "b2", "pos_emb")


def _linear_cross_entropy():
    def make(g):
        B, N, d = 37, 1000, 24
        target = torch.randint(0, N, (B,), generator=g)
        target[3] = -100
        return {"user": torch.randn(B, d, generator=g, dtype=torch.float64) * 0.5,
                "items": torch.randn(N, d, generator=g, dtype=torch.float64) * 0.5,
                "bias": torch.randn(N, generator=g, dtype=torch.float64) * 0.1,
                "target": target}

    def run(x, backend):
        return ops.linear_cross_entropy(x["user"], x["items"], x["target"], bias=x["bias"],
                                        reduction="none", backend=backend)
    return make, run, ("user", "items", "bias")


def _sampled_softmax(per_row):
    def make(g):
        B, N, S, d = 37, 500, 50, 24
        neg_shape = (B, S) if per_row else (S,)
        return {"user": torch.randn(B, d, generator=g, dtype=torch.float64) * 0.5,
                "items": torch.randn(N, d, generator=g, dtype=torch.float64) * 0.5,
                "target": torch.randint(0, N, (B,), generator=g),
                "negatives": torch.randint(0, N, neg_shape, generator=g),
                "log_q": torch.randn(neg_shape, generator=g, dtype=torch.float64).float() - 3,
                "target_log_q": torch.randn(B, generator=g, dtype=torch.float64).float() - 3}

    def run(x, backend):
        return ops.sampled_softmax_loss(x["user"], x["items"], x["target"], x["negatives"],
                                        log_q=x["log_q"], target_log_q=x["target_log_q"],
                                        in_batch_negatives=not per_row, reduction="none",
                                        backend=backend)
    return make, run, ("user", "items")


CHECKS = {
    "routing_mind": _routing("shared"),
    "routing_dr": _routing("per_position"),
    # torch-rechub's sequence softmax (padded positions in the denominator; fused MIND kernel)
    # and the real-positions one
    "routing_mind_sequence": _routing("shared", "sequence"),
    "routing_dr_sequence_real": _routing("per_position", "sequence_real"),
    "attention": _attention(),
    "linear_cross_entropy": _linear_cross_entropy(),
    "sampled_softmax_shared": _sampled_softmax(False),
    "sampled_softmax_per_row": _sampled_softmax(True),
}


def _topk_check(dtype, device):
    """multi_interest_topk (when the op exists): ids exactly the float64 reference's wherever
    the reference's scores are separated by more than the dtype's rounding, scores within it."""
    try:
        from seqrec_fast.reference import multi_interest_topk_ref
    except ImportError:
        return None
    g = torch.Generator().manual_seed(3)
    U, K, N, d, n = (9, 3, 1000, 24, 20) if device.type == "cuda" else (3, 2, 300, 16, 10)
    inter = (torch.randn(U, K, d, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    items = (torch.randn(N, d, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    s_k, i_k = ops.multi_interest_topk(inter.to(device), items.to(device), n, backend="triton")
    s_t, i_t = multi_interest_topk_ref(inter.double(), items.double(), n)
    err = (s_k.double().cpu() - s_t).abs().max().item()
    bound = 1e-4 if dtype == torch.float32 else 2e-3
    # ids may differ only where the truth's neighbouring scores are within the bound
    gaps = torch.cat([(s_t[:, :-1] - s_t[:, 1:]).abs(), torch.full((U, 1), float("inf"),
                                                                   dtype=s_t.dtype)], 1)
    ids_ok = bool(((i_k.cpu() == i_t) | (gaps <= 2 * bound)).all())
    return [("scores", err <= bound, err, 0.0, bound, ""),
            ("ids", ids_ok, float(not ids_ok), 0.0, 0.0, "" if ids_ok else "ids differ")]


def _prepare(x, dtype, device, float_names):
    """-> (rounded float64 copies on CPU, copies at dtype on device); float inputs named in
    float_names are leaves requiring grad."""
    truth_in, dev_in = {}, {}
    for k, v in x.items():
        if isinstance(v, torch.Tensor) and v.dtype == torch.float64:
            r = v.to(dtype)
            truth_in[k] = r.double().requires_grad_(k in float_names)
            dev_in[k] = r.to(device).requires_grad_(k in float_names)
        elif isinstance(v, torch.Tensor):
            truth_in[k], dev_in[k] = v, v.to(device)
        else:
            truth_in[k] = dev_in[k] = v
    return truth_in, dev_in


def _forward_backward(run, inputs, backend, float_names, gout):
    out = run(inputs, backend)
    grads = torch.autograd.grad(out, [inputs[k] for k in float_names],
                                gout.to(out.device, out.dtype), allow_unused=True)
    res = {"out": out.detach()}
    for k, gr in zip(float_names, grads):
        res["d_" + k] = None if gr is None else gr.detach()
    return res


def _compare(name, kernel, eager, truth, dtype):
    """-> (ok, kernel_err, eager_err, bound, detail) under DESIGN.md's 2x-eager rule."""
    if kernel is None or truth is None:
        ok = kernel is None and (truth is None or not bool(truth.abs().sum()))
        return ok, 0.0, 0.0, 0.0, "" if ok else "gradient missing"
    kernel, eager = kernel.double().cpu(), eager.double().cpu()
    if kernel.shape != truth.shape:
        return False, float("inf"), 0.0, 0.0, f"shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    if not bool(torch.isfinite(kernel).all()):
        return False, float("inf"), 0.0, 0.0, "non-finite: " + describe_error(kernel, truth)
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    ours = (kernel - truth).abs().max().item() if truth.numel() else 0.0
    fin = torch.isfinite(eager)
    ref = (eager - truth).abs()[fin].max().item() if bool(fin.any()) else 0.0
    bound = 2 * ref + ATOL[dtype] * scale
    ok = ours <= bound
    return ok, ours, ref, bound, "" if ok else describe_error(kernel, truth)


def main(args) -> int:
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: use --dry-run (Triton interpreter on CPU tensors)", file=sys.stderr)
        return 2
    names = list(CHECKS) + ["multi_interest_topk"]
    if args.only:
        want = args.only.split(",")
        unknown = [w for w in want if w not in names]
        if unknown:
            print(f"--only: unknown {unknown}; choose from {names}", file=sys.stderr)
            return 2
        names = want
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    writer = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "gpu_check.csv")
        new = not os.path.exists(path)
        fh = open(path, "a", newline="")
        writer = csv.DictWriter(fh, CSV_FIELDS)
        if new:
            writer.writeheader()
    failed = crashed = 0
    print("| check | dtype | quantity | ok | kernel err | eager err | bound | s |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            t0 = time.perf_counter()
            try:
                if name == "multi_interest_topk":
                    rows = _topk_check(dtype, device)
                    if rows is None:
                        print(f"| {name} | {dname} | - | skipped (op not in this version) |||||",
                              flush=True)
                        continue
                else:
                    make, run, float_names = CHECKS[name]
                    x = make(torch.Generator().manual_seed(0))
                    truth_in, dev_in = _prepare(x, dtype, device, float_names)
                    # the cotangent: the eager output's shape, fixed by its own generator
                    probe = run(truth_in, "eager")
                    gout = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64)
                    truth = _forward_backward(run, truth_in, "eager", float_names, gout)
                    eager = _forward_backward(run, dev_in, "eager", float_names, gout)
                    kernel = _forward_backward(run, dev_in, "triton", float_names, gout)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    rows = [(q,) + _compare(q, kernel[q], eager[q], truth[q], dtype)
                            for q in truth]
            except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
                crashed += 1
                tb = traceback.format_exc(limit=4).strip().splitlines()
                rows = [("crash", False, float("nan"), float("nan"), float("nan"),
                         f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500])]
                print("\n".join(tb), file=sys.stderr, flush=True)
            secs = time.perf_counter() - t0
            for q, ok, ours, ref, bound, detail in rows:
                failed += not ok
                mark = "ok" if ok else "**FAIL**"
                print(f"| {name} | {dname} | {q} | {mark} | {ours:.2e} | {ref:.2e} | {bound:.2e} "
                      f"| {secs:.1f} |" + (f" {detail}" if detail else ""), flush=True)
                if writer is not None:
                    writer.writerow({"check": name, "dtype": dname, "quantity": q, "ok": ok,
                                     "kernel_err": f"{ours:.3e}", "eager_err": f"{ref:.3e}",
                                     "bound": f"{bound:.3e}", "seconds": f"{secs:.2f}",
                                     "device": dev_name, "detail": detail})
                    fh.flush()
    print(f"gpu_check: {failed} failed ({crashed} crashed) on {dev_name}", flush=True)
    return 2 if crashed else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main(ARGS))
