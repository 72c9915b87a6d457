"""Training-step speed and peak memory of ComiRec-DR and ComiRec-SA: our models (fused ops)
against a seed-style and a careful eager PyTorch model.

    python bench/train.py                  # CPU-sized shape on CPU; headline + mid shapes on CUDA
    python bench/train.py --quick          # CI-sized run
    python bench/train.py --gpu-suite      # only the headline shape (B 1024, L 50, K 4, d 64,
                                           # 1M items, 10240 shared negatives), CUDA
    python bench/train.py --shapes 256,20,4,64,100000,2560 --providers eager,ours

One measured call = one training step: forward, loss, backward, dense Adam step, on a fixed
batch (random histories of random lengths, random targets; negatives drawn each step).
Dense Adam is torch.optim.Adam for the baselines (torch's default implementation, foreach) and
``seqrec_fast.optim.build_optimizers`` for ours, which picks torch's fused Adam where torch has it
(CPU, CUDA). ``eager-fused`` is the careful eager model with that same optimizer, so the summary
shows our speed-up both against what a careful user runs by default and with the optimizer
choice factored out.
Providers:
  seed         the seed-style model: broadcast-multiply bilinear map (DR: a (B, L, K·d, d)
               product), a per-row Python loop for the hard readout, full softmax over the
               catalog through a (B, n_items) logits matrix.
  eager        a careful eager model: einsum bilinear, gathered (vectorised) hard readout,
               sampled softmax over S log-uniform negatives shared by the batch (logQ-corrected,
               accidental hits masked) — what a careful PyTorch user writes.
  eager-fused  ``eager`` with the same dense Adam as ours (seqrec_fast.optim.dense_adam: torch's
               fused Adam where available).
  ours         seqrec_fast.models.ComiRecDR / ComiRecSA (fused routing / attention and sampled
               softmax ops, backend "auto"), the same loss as ``eager``.
  ours-full    ours with the fused full-catalog softmax (loss="full"; no logits matrix).
  ours-sparse  ours with sparse item-table gradients and the row-wise sparse Adam (optional).
  compile      ``eager`` with its loss under torch.compile (optional: compiles for minutes).
Prints the harness's Markdown table (speed-up vs ``eager``) and a summary with steps/s and the
speed-ups vs ``seed``, ``eager`` and ``eager-fused``; appends long-format rows to
bench/results/train.csv.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import _harness  # noqa: E402
from seqrec_fast.models import ComiRecDR, ComiRecSA  # noqa: E402
from seqrec_fast.ops.samplers import LogUniformSampler  # noqa: E402
from seqrec_fast.optim import build_optimizers, dense_adam  # noqa: E402
from seqrec_fast.reference.attention import attention_ref  # noqa: E402
from seqrec_fast.reference.routing import routing_iterations_ref  # noqa: E402

# (B, L, K, d, n_items, shared negatives)
HEADLINE = (1024, 50, 4, 64, 1_000_000, 10240)
GPU_SHAPES = [HEADLINE, (256, 50, 4, 64, 1_000_000, 2560)]
CPU_SHAPES = [(256, 20, 4, 64, 100_000, 2560)]
QUICK_SHAPES = [(64, 20, 4, 32, 20_000, 640)]
# --gpu-suite also checks the scale targets: the full softmax at 1M items and batch 4096 (its
# peak beyond parameters and optimizer state), and 10M items with the row-wise sparse optimizer
SCALE_CASES = [("dr", "ours-full", (4096, 50, 4, 64, 1_000_000, 10240)),
               ("dr", "ours-sparse", (1024, 50, 4, 64, 10_000_000, 10240))]
PROVIDERS = ("seed", "eager", "eager-fused", "ours", "ours-full", "ours-sparse", "compile")
DEFAULT_PROVIDERS = "seed,eager,eager-fused,ours,ours-full"
BASELINES = ("seed", "eager", "eager-fused")   # the summary's speed-up columns


# --------------------------------------------------------------------------- baseline models
class EagerModel(nn.Module):
    """The seed-style (``style="seed"``) or careful eager (``style="eager"``) ComiRec-DR / -SA.
    Same parameters as our models: item table (n_items, d) (row 0 = padding), DR: weight
    (L, K·d, d); SA: w1 (d, 4d), b1, w2 (4d, K), b2, position embedding (L, d)."""

    def __init__(self, variant: str, style: str, n_items: int, L: int, K: int, d: int):
        super().__init__()
        self.variant, self.style, self.L, self.K, self.d = variant, style, L, K, d
        self.item_emb = nn.Embedding(n_items, d)
        nn.init.normal_(self.item_emb.weight, 0.0, 1.0 / math.sqrt(d))
        if variant == "dr":
            self.weight = nn.Parameter(torch.randn(L, K * d, d) / math.sqrt(d))
        else:
            da = 4 * d
            self.w1 = nn.Parameter(torch.randn(d, da) / math.sqrt(d))
            self.b1 = nn.Parameter(torch.zeros(da))
            self.w2 = nn.Parameter(torch.randn(da, K) / math.sqrt(da))
            self.b2 = nn.Parameter(torch.zeros(K))
            self.pos_emb = nn.Parameter(torch.randn(L, d) / math.sqrt(d))

    def interests(self, hist, mask):
        e = self.item_emb(hist) * mask[..., None].to(self.item_emb.weight.dtype)   # (B, L, d)
        B, L, d = e.shape
        if self.variant == "sa":
            return attention_ref(e, mask, self.w1, self.b1, self.w2, self.b2, pos_emb=self.pos_emb)
        if self.style == "seed":    # broadcast multiply: a (B, L, K·d, d) temporary
            u = (self.weight[None] * e[:, :, None, :]).sum(-1)
        else:
            u = torch.einsum("lod,bld->blo", self.weight, e)
        u = u.view(B, L, self.K, d).transpose(1, 2)                                 # (B, K, L, d)
        return routing_iterations_ref(u, mask, None, iters=3)

    def loss(self, hist, mask, target, neg=None, log_q=None, target_log_q=None):
        v = self.interests(hist, mask)                                              # (B, K, d)
        tgt = self.item_emb(target)                                                 # (B, d)
        score = torch.einsum("bkd,bd->bk", v, tgt)
        if self.style == "seed":    # per-row Python readout, full softmax
            rows = []
            for b in range(v.shape[0]):
                rows.append(v[b, int(torch.argmax(score[b]))])
            user = torch.stack(rows)
            return F.cross_entropy(user @ self.item_emb.weight.t(), target)
        user = v[torch.arange(v.shape[0], device=v.device), score.argmax(1)]         # gather
        neg_emb = self.item_emb(neg)                                                # (S, d)
        pos = (user * tgt).sum(-1) - target_log_q                                   # (B,)
        logits = user @ neg_emb.t() - log_q[None, :]                                # (B, S)
        logits = logits.masked_fill(neg[None, :] == target[:, None], float("-inf"))
        return (torch.logsumexp(torch.cat([pos[:, None], logits], 1), 1) - pos).mean()


# ---------------------------------------------------------------------------------- the cases
def make_batch(shape, device, seed=0):
    B, L, K, d, N, S = shape
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(4, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lens[:, None]                     # right padding
    hist = torch.randint(1, N, (B, L), generator=g) * mask
    target = torch.randint(1, N, (B,), generator=g)
    return hist.to(device), mask.to(device), target.to(device)


def train_step(loss_fn, opts):
    def run():
        loss = loss_fn()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    return run


def build_case(variant, provider, shape, device):
    """-> a callable running one training step, or None when the provider does not apply."""
    B, L, K, d, N, S = shape
    hist, mask, target = make_batch(shape, device)
    torch.manual_seed(0)
    if provider in ("seed", "eager", "eager-fused", "compile"):
        style = "seed" if provider == "seed" else "eager"
        m = EagerModel(variant, style, N, L, K, d).to(device)
        if provider == "eager-fused":   # the optimizer ours gets from build_optimizers
            opt = dense_adam(m.parameters(), lr=1e-3)
        else:                           # torch's default Adam
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        if style == "seed":
            return train_step(lambda: m.loss(hist, mask, target), [opt])
        sampler = LogUniformSampler(N - 1, device)
        g = torch.Generator(device=device).manual_seed(1)
        loss = torch.compile(m.loss) if provider == "compile" else m.loss

        def loss_fn():
            r, lq = sampler.sample(S, g)
            return loss(hist, mask, target, r + 1, lq + math.log(S),
                        sampler.log_prob(target - 1) + math.log(S))
        return train_step(loss_fn, [opt])
    cls = ComiRecDR if variant == "dr" else ComiRecSA
    kw = dict(dim=d, max_len=L, num_interests=K, num_negatives=S, backend="auto")
    if provider == "ours-full":
        kw["loss"] = "full"
    if provider == "ours-sparse":
        kw["sparse"] = True
    m = cls(N, **kw).to(device)
    m.generator = torch.Generator(device=device).manual_seed(1)
    opts = build_optimizers(m, "rowwise_adam" if provider == "ours-sparse" else "adam", 1e-3)
    batch = {"history": hist, "mask": mask, "target": target}
    return train_step(lambda: m.loss(batch), opts)


def shape_tag(shape):
    B, L, K, d, N, S = shape
    return f"B{B},L{L},K{K},d{d},N{N},S{S}"


def summary(cases):
    """steps/s and the speed-ups vs seed, eager and eager-fused, per (variant, shape)."""
    print("\n### training steps/s (speed-up vs seed-style / careful eager with torch's default "
          "Adam / careful eager with our dense Adam)\n")
    print("| variant | shape | provider | steps/s | peak MiB | "
          + " | ".join(f"vs {b}" for b in BASELINES) + " |")
    print("|---" * (5 + len(BASELINES)) + "|")
    groups = {}
    for c in cases:
        groups.setdefault((c.variant, c.shape), []).append(c)
    for (variant, shape), cs in groups.items():
        ms = {c.provider: c.result.get("ms") for c in cs}
        for c in cs:
            r = c.result
            if "ms" not in r:
                print(f"| {variant} | {shape} | {c.provider} | failed: {r.get('error', '?')} | - | "
                      + " | ".join("-" for _ in BASELINES) + " |")
                continue
            vs = [f"{ms[b] / r['ms']:.2f}x" if ms.get(b) else "-" for b in BASELINES]
            print(f"| {variant} | {shape} | {c.provider} | {1e3 / r['ms']:.2f} | {r['mib']:.0f} | "
                  + " | ".join(vs) + " |")


def main(argv=None):
    _harness.stable_malloc()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="*", help="B,L,K,d,n_items,negatives ...")
    ap.add_argument("--variants", default="dr,sa", help="dr,sa")
    ap.add_argument("--providers", default=DEFAULT_PROVIDERS,
                    help=f"comma list of {','.join(PROVIDERS)} (default {DEFAULT_PROVIDERS})")
    ap.add_argument("--quick", action="store_true", help="one small shape, few repetitions")
    ap.add_argument("--gpu-suite", action="store_true",
                    help="the headline shape and the scale cases (1M items x batch 4096 full "
                         "softmax, 10M items row-wise Adam) for bench/gpu_suite.sh; needs CUDA")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.gpu_suite:
        if device.type != "cuda":
            print("--gpu-suite needs a CUDA device; nothing to do", file=sys.stderr)
            return 0
        shapes = [HEADLINE]
    elif args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
        if any(len(s) != 6 for s in shapes):
            ap.error("--shapes takes B,L,K,d,n_items,negatives")
    elif args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    providers = args.providers.split(",")
    bad = set(providers) - set(PROVIDERS)
    if bad:
        ap.error(f"unknown provider(s) {sorted(bad)}; choose from {PROVIDERS}")
    variants = args.variants.split(",")
    if set(variants) - {"dr", "sa"}:
        ap.error("--variants takes dr and/or sa")
    _harness.print_versions()
    plan = [(variant, p, shape) for shape in shapes for variant in variants for p in providers]
    if args.gpu_suite:
        plan += SCALE_CASES
    cases = []
    for variant, p, shape in plan:
        # build lazily so that only one provider's parameters live at a time
        holder = {}

        def fn(v=variant, p=p, s=shape, h=holder):
            if "run" not in h:
                h["run"] = build_case(v, p, s, device)
            h["run"]()
        cases.append(_harness.Case(p, "train-step", shape_tag(shape), _Releasing(fn, holder),
                                   variant=f"comirec-{variant}",
                                   retained_mib=_harness.routing_workspace_mib(device)
                                   if p.startswith("ours") else None))
    _harness.run_cases("train", cases, device, baseline=("eager",), csv_path=args.csv,
                       reps=3 if args.quick else args.reps)
    summary(cases)
    return 0


class _Releasing:
    """A case callable that builds its model on first use; the harness measures it, then the
    next case's first call frees the previous model (one model's parameters and optimizer state
    in memory at a time, so peak memory is per provider)."""
    current = None

    def __init__(self, fn, holder):
        self.fn, self.holder = fn, holder

    def __call__(self):
        if _Releasing.current is not None and _Releasing.current is not self:
            _Releasing.current.holder.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        _Releasing.current = self
        self.fn()


if __name__ == "__main__":
    sys.exit(main())
