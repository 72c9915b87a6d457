"""Catalog-sharded losses against the single-process ops, with 2 gloo processes on CPU.

Each worker builds the same full catalog from a fixed seed, computes the unsharded op and its
gradients as the reference, then the sharded op on its own rows; the loss and the user
gradient must match on every rank, the shard gradient must match the reference's rows.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from seqrec_fast.distributed import shard_rows
from seqrec_fast.ops import linear_cross_entropy, sampled_softmax_loss

from _util import assert_close, fused_backends

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}


def _entry(rank, world, store, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank,
                            world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, *args, world=2):
    """Run fn(rank, world, *args) in ``world`` gloo processes; a failure in any re-raises here
    with the worker's traceback."""
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(_entry, args=(world, os.path.join(d, "store"), fn, args),
                                    nprocs=world, join=True)


def _bounds(rank, world, N, sizes):
    if sizes is None:
        return shard_rows(N, rank, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _check(name, got, want, dtype):
    atol, rtol = TOL[dtype]
    assert_close(got.detach(), want.detach(), atol=atol, rtol=rtol, name=name)


# ----------------------------------------------------------------------------------------------
# linear_cross_entropy
# ----------------------------------------------------------------------------------------------
def _lce_worker(rank, world, backends):
    B, d = 7, 12
    cases = [
        dict(N=37, sizes=None, dtype=torch.float32, bias=True, T=1.0, eps=0.0, red="mean"),
        dict(N=37, sizes=None, dtype=torch.float32, bias=False, T=0.5, eps=0.1, red="none"),
        dict(N=10, sizes=[3, 7], dtype=torch.float32, bias=True, T=2.0, eps=0.0, red="sum"),
        dict(N=23, sizes=[20, 3], dtype=torch.float64, bias=True, T=1.0, eps=0.2, red="mean"),
    ]
    for backend in backends:
        for i, c in enumerate(cases):
            if c["dtype"] == torch.float64 and backend == "triton":
                continue
            tag = f"{backend} case {i} rank {rank}"
            g = torch.Generator().manual_seed(100 + i)
            N, dt = c["N"], c["dtype"]
            user = torch.randn(B, d, generator=g, dtype=dt)
            items = torch.randn(N, d, generator=g, dtype=dt) * 0.5
            bias = torch.randn(N, generator=g, dtype=dt) if c["bias"] else None
            target = torch.randint(0, N, (B,), generator=g)
            target[1] = -100                                 # an ignored row
            target[2] = N - 1                                # last row of the last shard
            target[3] = 0
            up = torch.randn(B, generator=g, dtype=dt)       # upstream weights for "none"
            kw = dict(temperature=c["T"], label_smoothing=c["eps"], reduction=c["red"],
                      backend=backend)

            def run(u, w, b, **extra):
                loss, lse = linear_cross_entropy(u, w, target, bias=b, return_lse=True,
                                                 **kw, **extra)
                (loss * up if c["red"] == "none" else loss).sum().backward()
                return loss, lse

            u0 = user.clone().requires_grad_()
            w0 = items.clone().requires_grad_()
            b0 = bias.clone().requires_grad_() if bias is not None else None
            ref, ref_lse = run(u0, w0, b0)
            lo, hi = _bounds(rank, world, N, c["sizes"])
            u1 = user.clone().requires_grad_()
            w1 = items[lo:hi].clone().requires_grad_()
            b1 = bias[lo:hi].clone().requires_grad_() if bias is not None else None
            got, lse = run(u1, w1, b1, process_group="default")
            _check(f"{tag} loss", got, ref, dt)
            _check(f"{tag} lse", lse, ref_lse, dt)
            _check(f"{tag} d_user", u1.grad, u0.grad, dt)
            _check(f"{tag} d_items", w1.grad, w0.grad[lo:hi], dt)
            if bias is not None:
                _check(f"{tag} d_bias", b1.grad, b0.grad[lo:hi], dt)


def test_sharded_linear_cross_entropy_matches_single_process():
    spawn(_lce_worker, ["eager"] + fused_backends("linear_cross_entropy"))


# ----------------------------------------------------------------------------------------------
# sampled_softmax_loss
# ----------------------------------------------------------------------------------------------
def _sampled_worker(rank, world, backends):
    B, d, N = 6, 10, 29
    cases = [
        dict(shared=True, in_batch=True, hits=True, logq=True, T=1.0, dtype=torch.float32),
        dict(shared=True, in_batch=False, hits=True, logq=True, T=0.7, dtype=torch.float32),
        dict(shared=False, in_batch=True, hits=False, logq=False, T=1.0, dtype=torch.float32),
        dict(shared=False, in_batch=False, hits=True, logq=True, T=1.3, dtype=torch.float64),
    ]
    for backend in backends:
        for i, c in enumerate(cases):
            if c["dtype"] == torch.float64 and backend == "triton":
                continue
            tag = f"{backend} case {i} rank {rank}"
            g = torch.Generator().manual_seed(200 + i)
            dt = c["dtype"]
            user = torch.randn(B, d, generator=g, dtype=dt)
            items = torch.randn(N, d, generator=g, dtype=dt) * 0.5
            target = torch.randint(0, N, (B,), generator=g)
            target[4] = target[0]                           # duplicate target
            shape = (11,) if c["shared"] else (B, 5)
            neg = torch.randint(0, N, shape, generator=g)
            neg.view(-1)[0] = target[0]                     # accidental hit
            neg.view(-1)[1] = neg.view(-1)[2]               # duplicate negative
            log_q = torch.randn(shape, generator=g, dtype=dt) if c["logq"] else None
            t_lq = torch.randn(B, generator=g, dtype=dt) if c["logq"] else None
            kw = dict(log_q=log_q, target_log_q=t_lq, in_batch_negatives=c["in_batch"],
                      remove_accidental_hits=c["hits"], temperature=c["T"], backend=backend)

            def run(u, w, **extra):
                loss = sampled_softmax_loss(u, w, target, neg, **kw, **extra)
                loss.backward()
                return loss

            u0, w0 = user.clone().requires_grad_(), items.clone().requires_grad_()
            ref = run(u0, w0)
            lo, hi = shard_rows(N, rank, world)
            u1, w1 = user.clone().requires_grad_(), items[lo:hi].clone().requires_grad_()
            got = run(u1, w1, process_group="default")
            _check(f"{tag} loss", got, ref, dt)
            _check(f"{tag} d_user", u1.grad, u0.grad, dt)
            _check(f"{tag} d_items", w1.grad, w0.grad[lo:hi], dt)


def test_sharded_sampled_softmax_matches_single_process():
    spawn(_sampled_worker, ["eager"] + fused_backends("sampled_softmax"))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _errors_worker(rank, world):
    B, d, N = 4, 6, 20
    lo, hi = shard_rows(N, rank, world)
    items = torch.randn(N, d)[lo:hi]
    user = torch.randn(B, d, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([1, 2, 3, 19])
    # the batch must be replicated: a per-rank target is refused on every rank
    with pytest.raises(ValueError, match="target differs between ranks"):
        linear_cross_entropy(user, items, target + rank, process_group="default")
    with pytest.raises(ValueError, match="user values differs between ranks"):
        linear_cross_entropy(user + rank, items, target, process_group="default")
    with pytest.raises(ValueError, match="batch size differs"):
        sampled_softmax_loss(user[:B - rank], items, target[:B - rank], torch.tensor([5, 6]),
                             process_group="default")
    # ids are checked against the global catalog, not the shard
    with pytest.raises(ValueError, match=r"target contains id 20 outside \[0, 20\)"):
        linear_cross_entropy(user, items, torch.tensor([1, 2, 3, 20]), process_group="default")
    with pytest.raises(ValueError, match=r"negatives contains id 25 outside \[0, 20\)"):
        sampled_softmax_loss(user, items, target, torch.tensor([5, 25]),
                             process_group="default")
    with pytest.raises(ValueError, match="ignore_index=3 is a valid item id"):
        linear_cross_entropy(user, items, target, ignore_index=3, process_group="default")
    with pytest.raises(TypeError, match="process_group must be"):
        linear_cross_entropy(user, items, target, process_group=3)
    # a valid call still works after the refused ones (no collective left half-done)
    loss = linear_cross_entropy(user, items, target, process_group="default")
    assert torch.isfinite(loss)


def test_sharded_losses_bad_input():
    spawn(_errors_worker)


def test_process_group_without_init_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]),
                             process_group="default")


def test_shard_rows_covers_the_catalog():
    for n, w in ((10, 3), (7, 7), (1000, 8), (5, 1)):
        spans = [shard_rows(n, r, w) for r in range(w)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        sizes = [b - a for a, b in spans]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="n_items=2 cannot be split"):
        shard_rows(2, 0, 3)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_rows(10, 3, 3)
