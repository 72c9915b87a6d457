"""Catalog-sharded losses against the single-process ops, with 2 gloo processes on CPU.

Each worker builds the same full catalog from a fixed seed, computes the unsharded op and its
gradients as the reference, then the sharded op on its own rows; the loss and the user
gradient must match on every rank, the shard gradient must match the reference's rows.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

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
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank,
                            world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()      # nobody tears its connections down while a peer still reads
    finally:
        dist.destroy_process_group()
    # Every check of this rank has passed. Leave without the interpreter's teardown: a spawned
    # worker that has imported torch.distributed, Triton and the extension can abort in static
    # destructors ("terminate called without an active exception", seen once in CI after the
    # checks), which is not what these tests test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, world=2):
    """Run fn(rank, world, *args) in ``world`` gloo processes; a failure in any re-raises here
    with the worker's traceback. A worker killed by a signal (not a failed check, which raises)
    is retried once, with a warning, as the same abort comes from process set-up and teardown
    outside this library."""
    for attempt in (0, 1):
        with tempfile.TemporaryDirectory() as d:
            try:
                torch.multiprocessing.spawn(_entry, args=(world, os.path.join(d, "store"), fn,
                                                          args), nprocs=world, join=True)
                return
            except torch.multiprocessing.ProcessExitedException as e:
                if attempt or e.signal_name is None:
                    raise
                warnings.warn(f"distributed test worker died ({e}); retrying once")


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
def _lce_worker(rank, world, backends, device="cpu"):
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
            user, items, target, up = (t.to(device) for t in (user, items, target, up))
            bias = bias.to(device) if bias is not None else None
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


@pytest.mark.cuda
def test_sharded_losses_on_cuda_tensors():
    """The same comparisons on the GPU (Triton kernels; gloo carries CUDA tensors)."""
    spawn(_lce_worker, ["eager"] + fused_backends("linear_cross_entropy", "cuda"), "cuda")
    spawn(_sampled_worker, ["eager"] + fused_backends("sampled_softmax", "cuda"), "cuda")


# ----------------------------------------------------------------------------------------------
# sampled_softmax_loss
# ----------------------------------------------------------------------------------------------
def _sampled_worker(rank, world, backends, device="cpu"):
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
            user, items, target, neg = (t.to(device) for t in (user, items, target, neg))
            log_q = log_q.to(device) if log_q is not None else None
            t_lq = t_lq.to(device) if t_lq is not None else None
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


# ----------------------------------------------------------------------------------------------
# data-parallel training (train() under a 2-process gloo group)
# ----------------------------------------------------------------------------------------------
SMALL = {"n_users": 300, "n_items": 200, "n_interests": 8, "min_len": 10, "max_len": 30}


def _train_kwargs(out, **kw):
    base = dict(data="synthetic", synthetic=SMALL, dim=16, steps=12, eval_every=6,
                num_negatives=64, progress=False, export=False, seed=3, out_dir=str(out))
    base.update(kw)
    return base


def _ddp_train_worker(rank, world, kwargs):
    from seqrec_fast.train import train

    res = train(**kwargs)
    assert res["rank"] == rank and res["world_size"] == world


def _model_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("model, loss, optimizer", [
    ("comirec-dr", "sampled", "adam"),
    ("comirec-sa", "full", "adam"),
    ("youtubednn", "sampled", "rowwise_adagrad"),
])
def test_ddp_training_matches_single_process(tmp_path, model, loss, optimizer):
    """2 ranks x batch 16 == 1 process x batch 32: same parameters after 12 steps, same
    (user-sharded, all-reduced) validation and test metrics, same logged loss."""
    from seqrec_fast.train import train

    torch.set_num_threads(1)
    kw = dict(model=model, loss=loss, optimizer=optimizer)
    single = train(**_train_kwargs(tmp_path / "single", batch_size=32, **kw))
    spawn(_ddp_train_worker, _train_kwargs(tmp_path / "ddp", batch_size=16, **kw))
    a = _model_state(tmp_path / "single" / "last.pt")
    b = _model_state(tmp_path / "ddp" / "last.pt")
    assert a["step"] == b["step"] == 12 and b["world_size"] == 2
    for name, want in a["model"].items():
        atol = 2e-5
        if name.endswith("b2"):
            # ComiRec-SA's score bias: the softmax over the sequence is invariant to it, so its
            # true gradient is 0 and Adam turns rounding noise into steps of up to lr either way
            atol = 2 * 1e-3 * 12
        assert_close(b["model"][name], want, atol=atol, rtol=1e-4, name=f"{model} {name}")
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    ra, rb = read(tmp_path / "single"), read(tmp_path / "ddp")
    assert [r["split"] for r in rb] == ["valid", "valid", "test"]
    for x, y in zip(ra, rb):
        for k in ("recall@20", "recall@50", "ndcg@50", "hitrate@50"):
            assert y[k] == pytest.approx(x[k], abs=1e-9), (k, x, y)
        if "loss" in x:
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert single["test"]["recall@50"] == pytest.approx(rb[-1]["recall@50"], abs=1e-9)


def test_ddp_checkpoint_loads_on_any_world_size(tmp_path):
    """A checkpoint written by 2 ranks resumes in one process and evaluates to the metrics the
    2-rank run logged; a 1-process checkpoint resumes under 2 ranks."""
    from seqrec_fast.train import evaluate_checkpoint, train

    torch.set_num_threads(1)
    out = tmp_path / "run"
    spawn(_ddp_train_worker, _train_kwargs(out, model="comirec-dr", batch_size=16))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m = evaluate_checkpoint(str(out / "best.pt"), "test")
    assert m["recall@50"] == pytest.approx(recs[-1]["recall@50"], abs=1e-9)
    res = train(**_train_kwargs(out, model="comirec-dr", batch_size=32, steps=18, resume=True))
    assert res["step"] == 18
    spawn(_ddp_train_worker, _train_kwargs(out, model="comirec-dr", batch_size=16, steps=24,
                                           resume=True))
    assert _model_state(out / "last.pt")["step"] == 24


def _dying_worker(rank, world, kwargs, report):
    """Rank 1 crashes (hard exit, as a killed process) during step 9; rank 0 must stop with a
    clear error instead of hanging, and the last checkpoint (step 6) must stay loadable."""
    from seqrec_fast.train import train

    def crash(step, loss):
        if rank == 1 and step == 8:
            os._exit(17)

    try:
        train(**kwargs, callback=crash)
    except Exception as e:  # noqa: BLE001
        with open(report, "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise


def test_dying_rank_gives_clear_error_and_keeps_checkpoint(tmp_path):
    import multiprocessing as mp

    out = tmp_path / "run"
    report = tmp_path / "rank0.txt"
    kwargs = _train_kwargs(out, model="comirec-dr", batch_size=16, steps=30, eval_every=6,
                           dist_timeout=60.0)
    ctx = mp.get_context("spawn")
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_entry, args=(r, 2, store, _dying_worker,
                                              (kwargs, str(report)))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(alive), "a rank hung after its peer died"
    assert procs[1].exitcode == 17
    assert procs[0].exitcode != 0
    text = report.read_text()
    assert "rank 0/2: a collective failed during step" in text, text
    assert "another rank has most likely stopped" in text and "step 6" in text, text
    ck = _model_state(out / "last.pt")
    assert ck["step"] == 6
    assert not list(out.glob("*.tmp")), "a partial checkpoint file was left behind"


@pytest.mark.parametrize("model, extra", [("comirec-sa", []),
                                          ("mind", ["--shard-catalog", "--loss", "full"])])
def test_cli_under_torchrun(tmp_path, model, extra):
    """`torchrun --standalone --nproc_per_node 2 -m seqrec_fast train ...` on CPU (gloo): one
    table printed (rank 0), rank-0 outputs, a checkpoint that records both ranks."""
    import subprocess
    import sys

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "seqrec_fast", "train", "--model", model, "--synthetic",
           json.dumps(SMALL), "--dim", "16", "--steps", "10", "--eval-every", "5",
           "--batch-size", "16", "--device", "cpu", "--no-progress", "--out-dir", str(out)]
    r = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0 and "Signal 6 (SIGABRT) received" in r.stderr:
        # a worker killed by a signal (exit code -6), not a Python error (exit code 1): the
        # abort that spawn() retries once too
        warnings.warn(f"torchrun worker died by SIGABRT; retrying once:\n{r.stderr[-1500:]}")
        out = tmp_path / "run2"
        cmd[cmd.index("--out-dir") + 1] = str(out)
        r = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(f"| {model} |") == 1, r.stdout
    ck = _model_state(out / "last.pt")
    assert ck["world_size"] == 2 and ck["step"] == 10
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["split"] for x in recs] == ["valid", "valid", "test"]


def test_sparse_optimizer_over_nccl_is_refused_clearly():
    from seqrec_fast.train import TrainConfig, ddp_unsupported

    sparse = TrainConfig(optimizer="rowwise_adagrad", loss="sampled")
    assert "cannot all-reduce sparse gradients over NCCL" in ddp_unsupported(sparse, "nccl")
    assert ddp_unsupported(sparse, "gloo") is None
    assert ddp_unsupported(TrainConfig(optimizer="adam"), "nccl") is None
    # the full softmax keeps the table gradient dense: fine on NCCL
    assert ddp_unsupported(TrainConfig(optimizer="rowwise_adam", loss="full"), "nccl") is None
    # a sharded table is not a DDP parameter
    assert ddp_unsupported(TrainConfig(optimizer="rowwise_adagrad", shard_catalog=True),
                           "nccl") is None


# ----------------------------------------------------------------------------------------------
# sharded embedding lookup (data-parallel ids)
# ----------------------------------------------------------------------------------------------
def _lookup_worker(rank, world):
    from seqrec_fast.distributed import sharded_embedding

    N, d = 23, 5
    g = torch.Generator().manual_seed(0)
    table = torch.randn(N, d, generator=g)
    ids = [torch.randint(0, N, (4, 3), generator=g), torch.randint(0, N, (7,), generator=g)]
    ids[0][0, 0] = ids[1][0]                         # an id both ranks use
    ws = [torch.randn(*i.shape, d, generator=g) for i in ids]
    # reference: one process, loss = sum over ranks of each rank's loss
    full = table.clone().requires_grad_()
    sum((F_emb(i, full) * w).sum() for i, w in zip(ids, ws)).backward()
    for scale, sparse in ((1.0, False), (0.5, True)):
        lo, hi = shard_rows(N, rank, world)
        shard = table[lo:hi].clone().requires_grad_()
        out = sharded_embedding(ids[rank], shard, "default", grad_scale=scale, sparse_grad=sparse)
        _check(f"rank {rank} lookup", out, table[ids[rank]], torch.float32)
        (out * ws[rank]).sum().backward()
        got = shard.grad.to_dense() if sparse else shard.grad
        assert shard.grad.is_sparse == sparse
        _check(f"rank {rank} d_shard (scale {scale})", got, scale * full.grad[lo:hi],
               torch.float32)


def F_emb(ids, table):
    return torch.nn.functional.embedding(ids, table)


def test_sharded_embedding_matches_full_table():
    spawn(_lookup_worker)


# ----------------------------------------------------------------------------------------------
# data parallel with the item table sharded across ranks (train(shard_catalog=True))
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, loss, optimizer", [
    ("comirec-dr", "sampled", "adam"),
    ("comirec-sa", "full", "adam"),
    ("youtubednn", "sampled", "rowwise_adam"),
])
def test_sharded_catalog_training_matches_single_process(tmp_path, model, loss, optimizer):
    """2 ranks each holding half of the item table x batch 16 == 1 process x batch 32: the
    gathered table, every other parameter, the optimizer state, the losses and the sharded
    retrieval metrics all match; the checkpoint (whole table) evaluates in one process."""
    from seqrec_fast.train import evaluate_checkpoint, train

    torch.set_num_threads(1)
    kw = dict(model=model, loss=loss, optimizer=optimizer, export=True)
    train(**_train_kwargs(tmp_path / "single", batch_size=32, **kw))
    spawn(_ddp_train_worker, _train_kwargs(tmp_path / "shard", batch_size=16,
                                           shard_catalog=True, **kw))
    a = _model_state(tmp_path / "single" / "last.pt")
    b = _model_state(tmp_path / "shard" / "last.pt")
    assert b["model"]["item_emb.weight"].shape == a["model"]["item_emb.weight"].shape
    for name, want in a["model"].items():
        atol = 2 * 1e-3 * 12 if name.endswith("b2") else 2e-5     # see the DDP test
        assert_close(b["model"][name], want, atol=atol, rtol=1e-4, name=f"{model} {name}")
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        for i, st in oa["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 201:
                    assert_close(ob["state"][i][k].float(), v.float(), atol=1e-6, rtol=1e-3,
                                 name=f"optimizer {i} {k}")
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    ra, rb = read(tmp_path / "single"), read(tmp_path / "shard")
    for x, y in zip(ra, rb):
        for k in ("recall@20", "recall@50", "ndcg@50", "hitrate@50"):
            assert y[k] == pytest.approx(x[k], abs=1e-9), (k, x, y)
        if "loss" in x:
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    import numpy as np

    assert np.allclose(np.load(tmp_path / "shard" / "item_emb.npy"),
                       np.load(tmp_path / "single" / "item_emb.npy"), atol=2e-5)
    m = evaluate_checkpoint(str(tmp_path / "shard" / "best.pt"), "test", retriever="torch")
    assert m["recall@50"] == pytest.approx(rb[-1]["recall@50"], abs=1e-9)


@pytest.mark.cuda
@pytest.mark.parametrize("shard", [False, True])
def test_ddp_on_cuda_matches_single_process(tmp_path, shard):
    """The GPU path (Triton kernels, CUDA tensors through gloo, both ranks on one GPU): 2 ranks
    x batch 16 == 1 process x batch 32 for ComiRec-SA with the full softmax."""
    from seqrec_fast.train import train

    kw = dict(model="comirec-sa", loss="full", optimizer="adam", device="cuda")
    train(**_train_kwargs(tmp_path / "single", batch_size=32, **kw))
    spawn(_ddp_train_worker, _train_kwargs(tmp_path / "ddp", batch_size=16, shard_catalog=shard,
                                           **kw))
    a = _model_state(tmp_path / "single" / "last.pt")
    b = _model_state(tmp_path / "ddp" / "last.pt")
    for name, want in a["model"].items():
        atol = 2 * 1e-3 * 12 if name.endswith("b2") else 1e-4
        assert_close(b["model"][name].cpu(), want.cpu(), atol=atol, rtol=1e-3, name=name)


def test_shard_catalog_needs_several_ranks(tmp_path):
    from seqrec_fast.train import train

    with pytest.raises(ValueError, match="shard_catalog=True needs several ranks"):
        train(**_train_kwargs(tmp_path, model="youtubednn", batch_size=8, shard_catalog=True))


def test_sharded_resume_continues_a_single_process_run(tmp_path):
    """12 steps in one process, 6 more with the table sharded over 2 ranks (model and Adam
    state sliced from the checkpoint) == 18 steps in one process."""
    from seqrec_fast.train import train

    torch.set_num_threads(1)
    kw = dict(model="comirec-dr", loss="sampled", optimizer="adam")
    train(**_train_kwargs(tmp_path / "ref", batch_size=32, steps=18, **kw))
    train(**_train_kwargs(tmp_path / "run", batch_size=32, steps=12, **kw))
    spawn(_ddp_train_worker, _train_kwargs(tmp_path / "run", batch_size=16, steps=18,
                                           resume=True, shard_catalog=True, **kw))
    a = _model_state(tmp_path / "ref" / "last.pt")
    b = _model_state(tmp_path / "run" / "last.pt")
    assert b["step"] == 18 and b["world_size"] == 2
    for name, want in a["model"].items():
        assert_close(b["model"][name], want, atol=2e-5, rtol=1e-4, name=name)


def test_setup_refuses_an_unknown_backend(monkeypatch):
    from seqrec_fast.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("SEQREC_FAST_DIST_BACKEND", "mpi")
    with pytest.raises(ValueError, match="SEQREC_FAST_DIST_BACKEND must be"):
        setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx, dev = setup("cpu")
    assert not ctx.enabled and dev.type == "cpu"
    with pytest.raises(ValueError, match="timeout_s"):
        setup("cpu", timeout_s=0)


# ----------------------------------------------------------------------------------------------
# gathering a sharded table for a checkpoint, in bounded rounds
# ----------------------------------------------------------------------------------------------
def _gather_worker(rank, world):
    from types import SimpleNamespace

    from seqrec_fast.train import _gather_rows

    N = 11                                              # shards of 6 and 5 rows
    full = torch.arange(N * 3, dtype=torch.float32).view(N, 3)
    lo, hi = shard_rows(N, rank, world)
    model = SimpleNamespace(n_items=N, catalog_shard=(None, rank, world, lo, hi))
    for chunk_bytes in (1, 12, 24, 100, 1 << 20):      # 1 row per round ... everything at once
        got = _gather_rows(full[lo:hi].clone(), model, chunk_bytes=chunk_bytes)
        assert torch.equal(got, full), (rank, chunk_bytes)
    counts = torch.arange(N, dtype=torch.int64)         # a 1-D state (per-row step counts)
    assert torch.equal(_gather_rows(counts[lo:hi].clone(), model, chunk_bytes=16), counts)


def test_sharded_table_gathers_in_bounded_rounds():
    spawn(_gather_worker)


def test_half_precision_collectives_travel_as_fp32_on_every_device():
    """The catalog collectives sum half-precision values in fp32 on CUDA too (NCCL would
    otherwise round each rank's partial sum to bf16/fp16, unlike the gloo path tested here)."""
    from types import SimpleNamespace

    from seqrec_fast.ops.catalog_parallel import _collective_dtype

    for dt in (torch.bfloat16, torch.float16):
        for is_cuda in (False, True):
            assert _collective_dtype(SimpleNamespace(dtype=dt, is_cuda=is_cuda)) == torch.float32
    for dt in (torch.float32, torch.float64):
        assert _collective_dtype(SimpleNamespace(dtype=dt, is_cuda=True)) == dt
