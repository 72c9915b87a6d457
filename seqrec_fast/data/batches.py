"""Vectorised training-batch sampler (ComiRec's scheme, on the target device).

Each batch: ``batch_size`` users drawn uniformly (with replacement) among training users with at
least ``min_pos + 1`` items; for each a random target position k in [min_pos, len-1]; the history
is the ``max_len`` items before it. Built with a handful of tensor ops per batch: no per-sample
Python, no ``torch.tensor(list)`` per row.

Padding side (the same everywhere, evaluation included, see :func:`pad_histories`):
``"right"`` (ComiRec): the oldest kept item at position 0, padding after the last real item;
``"left"``: padding first, the most recent item at position max_len-1.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

PADDINGS = ("right", "left")


def pad_histories(indptr: torch.Tensor, items: torch.Tensor, rows: torch.Tensor,
                  end: torch.Tensor, max_len: int, padding: str = "right"):
    """Gather, for each row r, the up-to-``max_len`` items before position ``end[r]``.

    indptr: (U+1,) int64; items: (nnz,) int64; rows: (B,) int64 row ids; end: (B,) int64 cut
    positions within each row (exclusive). Returns history (B, max_len) int64 with 0 at padding
    and mask (B, max_len) bool (True at real items).
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    start = indptr[rows]
    n = torch.clamp(end, max=max_len)                                 # (B,) real items
    j = torch.arange(max_len, device=items.device)[None, :]            # (1, L)
    if padding == "right":
        mask = j < n[:, None]
        pos = start[:, None] + (end - n)[:, None] + j
    else:
        mask = j >= (max_len - n)[:, None]
        pos = start[:, None] + end[:, None] - max_len + j
    pos = torch.where(mask, pos, torch.zeros_like(pos))
    hist = torch.where(mask, items[pos], torch.zeros_like(pos))
    return hist, mask


class TrainSampler:
    """Infinite iterator of training batches ``{"history": (B, L) int64, "mask": (B, L) bool,
    "target": (B,) int64, "user": (B,) int64}`` on ``device``.

    Data parallel (``world_size`` > 1): every rank holds the same generator state and draws the
    same global batch of ``world_size · batch_size`` (user, position) pairs; rank r keeps rows
    ``[r·B, (r+1)·B)`` and builds only their histories. The ranks thus train on disjoint parts
    of one draw, and W ranks together see exactly the batch one process with batch W·B would
    (the generator state, what checkpoints save, does not depend on the world size).

    indptr: (U+1,) int64 and items: (nnz,) int64 (numpy or torch) — the training sequences.
    generator: a torch.Generator on ``device`` (its state is what checkpoints save).
    """

    def __init__(self, indptr, items, *, batch_size: int = 128, max_len: int = 20,
                 min_pos: int = 4, padding: str = "right", device="cpu",
                 generator: Optional[torch.Generator] = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        for name, v, lo in (("batch_size", batch_size, 1), ("max_len", max_len, 1),
                            ("min_pos", min_pos, 1), ("world_size", world_size, 1),
                            ("rank", rank, 0)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.indptr = torch.as_tensor(np.asarray(indptr), dtype=torch.int64).to(self.device)
        self.items = torch.as_tensor(np.asarray(items), dtype=torch.int64).to(self.device)
        if self.indptr.dim() != 1 or self.indptr.shape[0] < 2:
            raise ValueError(f"indptr must have shape (U+1,) with U >= 1, got {tuple(self.indptr.shape)}")
        lens = self.indptr[1:] - self.indptr[:-1]
        self.users = torch.nonzero(lens > min_pos).flatten()
        if self.users.numel() == 0:
            raise ValueError(f"no training user has more than min_pos={min_pos} items")
        self.lens = lens
        self.batch_size, self.max_len, self.min_pos, self.padding = batch_size, max_len, min_pos, padding
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        self.generator = generator

    def sample(self) -> dict:
        """One batch (see the class doc)."""
        g, B = self.generator, self.batch_size
        G = B * self.world_size            # the global batch every rank draws identically
        rows = slice(self.rank * B, (self.rank + 1) * B)
        pick = torch.randint(0, self.users.numel(), (G,), generator=g, device=self.device)[rows]
        user = self.users[pick]
        n = self.lens[user]
        # k uniform in [min_pos, n-1]
        k = self.min_pos + (torch.rand(G, generator=g, device=self.device)[rows]
                            * (n - self.min_pos).to(torch.float32)).long()
        k = torch.minimum(k, n - 1)
        target = self.items[self.indptr[user] + k]
        hist, mask = pad_histories(self.indptr, self.items, user, k, self.max_len, self.padding)
        return {"history": hist, "mask": mask, "target": target, "user": user}

    def __iter__(self):
        while True:
            yield self.sample()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def throughput(self, n_batches: int = 200) -> float:
        """Batches per second of the sampler alone (synchronised on CUDA)."""
        self.sample()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        for _ in range(n_batches):
            self.sample()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return n_batches / (time.perf_counter() - t)


def eval_batches(split, *, max_len: int, padding: str = "right", batch_size: int = 1024,
                 device="cpu", start: int = 0, stop: Optional[int] = None):
    """Yield (history (b, L), mask (b, L), tgt_indptr (b+1,), tgt_items) chunks of an EvalSplit:
    the last ``max_len`` items of each held-out history, padded as in training. Users
    ``[start, stop)`` only (default: all)."""
    hp = torch.as_tensor(split.hist_indptr, dtype=torch.int64, device=device)
    hi = torch.as_tensor(split.hist_items, dtype=torch.int64, device=device)
    tp = np.asarray(split.tgt_indptr)
    ti = torch.as_tensor(split.tgt_items, dtype=torch.int64, device=device)
    U = split.n_users if stop is None else min(stop, split.n_users)
    for s in range(start, U, batch_size):
        rows = torch.arange(s, min(U, s + batch_size), device=device)
        end = hp[rows + 1] - hp[rows]
        hist, mask = pad_histories(hp, hi, rows, end, max_len, padding)
        ptr = torch.as_tensor(tp[s:min(U, s + batch_size) + 1] - tp[s], device=device)
        yield hist, mask, ptr, ti[int(tp[s]):int(tp[min(U, s + batch_size)])]
