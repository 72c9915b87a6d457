"""Deterministic synthetic interaction logs with planted interest clusters and Zipf popularity.

The catalog is split into ``n_interests`` clusters (planted interests). Each user holds
``interests_per_user`` clusters; a sequence walks among them (staying in the current interest with
probability ``stickiness``), and inside a cluster items are drawn with Zipf popularity
(weight ∝ 1 / rank^zipf_a over a random global popularity ranking). The same arguments always give
the same log. This is the default dataset: small for the CPU demo, millions of items for the
GPU catalog benchmark.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from .loaders import Interactions

log = logging.getLogger("seqrec_fast.data")

DEFAULTS = dict(n_users=3000, n_items=2000, n_interests=50, interests_per_user=4,
                min_len=20, max_len=60, zipf_a=0.8, stickiness=0.0, seed=42)


def synthetic(n_users: int = DEFAULTS["n_users"], n_items: int = DEFAULTS["n_items"],
              n_interests: int = DEFAULTS["n_interests"], *,
              interests_per_user: int = DEFAULTS["interests_per_user"],
              min_len: int = DEFAULTS["min_len"], max_len: int = DEFAULTS["max_len"],
              zipf_a: float = DEFAULTS["zipf_a"], stickiness: float = DEFAULTS["stickiness"],
              seed: int = DEFAULTS["seed"]) -> Interactions:
    """Generate a log. Returns Interactions with raw item ids 1..n_items, users 0..n_users-1,
    timestamps 0..len-1 per user and ``category`` = the planted cluster of each item.

    Sizes: n_interactions ≈ n_users · (min_len + max_len) / 2; vectorised (no per-interaction
    Python), so millions of items are fine.
    """
    for name, v, lo in (("n_users", n_users, 1), ("n_items", n_items, 2),
                        ("n_interests", n_interests, 1), ("interests_per_user", interests_per_user, 1),
                        ("min_len", min_len, 2), ("max_len", max_len, 2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if max_len < min_len:
        raise ValueError(f"max_len ({max_len}) must be >= min_len ({min_len})")
    if interests_per_user > n_interests:
        raise ValueError(f"interests_per_user ({interests_per_user}) must be <= n_interests "
                         f"({n_interests})")
    if n_interests > n_items:
        raise ValueError(f"n_interests ({n_interests}) must be <= n_items ({n_items})")
    if not 0.0 <= stickiness < 1.0:
        raise ValueError(f"stickiness must lie in [0, 1), got {stickiness}")
    if zipf_a < 0:
        raise ValueError(f"zipf_a must be >= 0, got {zipf_a}")
    rng = np.random.default_rng(seed)
    C, P = n_interests, interests_per_user
    cluster = rng.permutation(np.arange(n_items) % C)            # item -> cluster
    weight = 1.0 / (rng.permutation(n_items) + 1.0) ** zipf_a    # Zipf over a random ranking
    # per-cluster sampling tables: items sorted by cluster, cumulative weights within each cluster
    by_cluster = np.argsort(cluster, kind="stable")
    csize = np.bincount(cluster, minlength=C)
    cstart = np.concatenate([[0], np.cumsum(csize)[:-1]])
    w_sorted = weight[by_cluster]
    cum = np.cumsum(w_sorted)
    ctotal = np.add.reduceat(w_sorted, cstart)
    cbase = cum[cstart] - w_sorted[cstart]                        # cum weight before each cluster
    # users: P distinct clusters each (cluster popularity mildly Zipf too)
    cw = 1.0 / (rng.permutation(C) + 1.0) ** 0.5
    keys = rng.random((n_users, C)) ** (1.0 / cw)                 # weighted sampling w/o replacement
    user_int = np.argsort(-keys, axis=1)[:, :P]                   # (U, P)
    lens = rng.integers(min_len, max_len + 1, size=n_users)
    n = int(lens.sum())
    uid = np.repeat(np.arange(n_users), lens)
    # interest walk: a new interest with probability 1 - stickiness at each step
    switch = rng.random(n) >= stickiness
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    switch[first] = True
    choice = rng.integers(0, P, size=n)
    seg = np.cumsum(switch) - 1
    slot = choice[np.flatnonzero(switch)][seg]
    c = user_int[uid, slot]
    # item within the cluster by inverse-CDF on the cluster's cumulative weights
    u = cbase[c] + rng.random(n) * ctotal[c]
    pos = np.searchsorted(cum, u, side="right")
    pos = np.clip(pos, cstart[c], cstart[c] + csize[c] - 1)
    item = by_cluster[pos]
    time = (np.arange(n) - np.repeat(first, lens)).astype(np.float64)
    return Interactions(uid.astype(np.int64), item.astype(np.int64) + 1, time,
                        cluster[item].astype(np.int64))


def synthetic_dataset(*, cache_dir: Optional[str] = None, k_core: int = 5, split: str = "user",
                      seed: int = 2020, **gen_kwargs):
    """``synthetic(**gen_kwargs)`` preprocessed (see ``preprocess``), cached in ``cache_dir``."""
    from .preprocess import Dataset, cache_key, preprocess

    args = dict(DEFAULTS)
    unknown = set(gen_kwargs) - set(args)
    if unknown:
        raise TypeError(f"unknown synthetic argument(s) {sorted(unknown)}; known: {sorted(args)}")
    args.update(gen_kwargs)
    cache = None
    if cache_dir is not None:
        cache = os.path.join(cache_dir, f"synthetic-{cache_key(args, k_core, split, seed)}.npz")
        if os.path.exists(cache):
            log.info("loading the cached dataset %s", cache)
            return Dataset.load(cache)
    n_users, n_items, n_int = args.pop("n_users"), args.pop("n_items"), args.pop("n_interests")
    inter = synthetic(n_users, n_items, n_int, **args)
    ds = preprocess(inter, k_core=k_core, split=split, seed=seed,
                    meta={"source": "synthetic", "synthetic": dict(args, n_users=n_users,
                                                                   n_items=n_items,
                                                                   n_interests=n_int)})
    if cache is not None:
        os.makedirs(cache_dir, exist_ok=True)
        ds.save(cache)
    return ds
