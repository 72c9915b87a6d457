"""Deterministic synthetic interaction logs with planted interest clusters and Zipf popularity.

The catalog is split into ``n_interests`` clusters (planted interests) of n_items / n_interests
items each. Each user holds ``interests_per_user`` distinct clusters (chosen with a mild Zipf
preference for some clusters, ``cluster_zipf_a``; or one cluster in each of that many distinct
top-level groups when ``n_groups`` > 0); the user's sequence interleaves them (each next item
comes from one of the user's clusters drawn uniformly, or stays in the current one with
probability ``stickiness``), and inside a cluster items are drawn with Zipf popularity
(weight ∝ 1 / (rank + 1)^zipf_a over a random ranking within the cluster). Held-out targets
therefore come from any of a user's interests, not only from the latest one. ``category`` of an
item is its cluster. The same arguments always give the same log.

Default (the README demo and the planted-interest quality test): 4000 users, 4000 items in 80
clusters of 50 items (as large as the retrieval cut N = 50), 3 interests per user, sequences of
20–60 items. A user's relevant set (3 × 50 items) is three times what a top-50 list holds, and
with 80 clusters and a small embedding (d = 16 < 80 in the quality test) one averaged user
vector cannot point at three arbitrary clusters without pulling in items of others, while one
vector per interest can: multi-interest models beat single-interest ones by a wide margin there
(tests/test_train.py). Sized from this CPU demo up to millions of items (the GPU catalog
benchmark).

This module only generates interactions; ``load_dataset("synthetic", synthetic={...})``
preprocesses and caches them like any other source.
"""
from __future__ import annotations

import logging

import numpy as np

from .loaders import Interactions

log = logging.getLogger("seqrec_fast.data")

DEFAULTS = dict(n_users=4000, n_items=4000, n_interests=80, interests_per_user=3,
                min_len=20, max_len=60, zipf_a=0.8, cluster_zipf_a=0.5, n_groups=0, stickiness=0.0,
                seed=42)


def synthetic(n_users: int = DEFAULTS["n_users"], n_items: int = DEFAULTS["n_items"],
              n_interests: int = DEFAULTS["n_interests"], *,
              interests_per_user: int = DEFAULTS["interests_per_user"],
              min_len: int = DEFAULTS["min_len"], max_len: int = DEFAULTS["max_len"],
              zipf_a: float = DEFAULTS["zipf_a"],
              cluster_zipf_a: float = DEFAULTS["cluster_zipf_a"],
              n_groups: int = DEFAULTS["n_groups"],
              stickiness: float = DEFAULTS["stickiness"],
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
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)):
        raise TypeError(f"n_groups must be an int, got {type(n_groups).__name__}")
    if n_groups and not interests_per_user <= n_groups <= n_interests:
        raise ValueError(f"n_groups must be 0 or lie in [interests_per_user, n_interests] = "
                         f"[{interests_per_user}, {n_interests}], got {n_groups}")
    if n_interests > n_items:
        raise ValueError(f"n_interests ({n_interests}) must be <= n_items ({n_items})")
    if not 0.0 <= stickiness < 1.0:
        raise ValueError(f"stickiness must lie in [0, 1), got {stickiness}")
    for name, v in (("zipf_a", zipf_a), ("cluster_zipf_a", cluster_zipf_a)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    rng = np.random.default_rng(seed)
    C, P = n_interests, interests_per_user
    cluster = rng.permutation(np.arange(n_items) % C)            # item -> cluster (sizes differ by <= 1)
    # per-cluster sampling tables: items grouped by cluster (random order inside a cluster, which
    # is the popularity rank there), cumulative Zipf weights 1 / (rank + 1)^zipf_a
    by_cluster = np.argsort(cluster, kind="stable")
    csize = np.bincount(cluster, minlength=C)
    cstart = np.concatenate([[0], np.cumsum(csize)[:-1]])
    rank_in = np.arange(n_items) - np.repeat(cstart, csize)
    w_sorted = 1.0 / (rank_in + 1.0) ** zipf_a
    cum = np.cumsum(w_sorted)
    ctotal = np.add.reduceat(w_sorted, cstart)
    cbase = cum[cstart] - w_sorted[cstart]                        # cum weight before each cluster
    # users: P distinct clusters each, clusters chosen with a mild Zipf popularity
    cw = 1.0 / (rng.permutation(C) + 1.0) ** cluster_zipf_a
    if not n_groups:
        keys = rng.random((n_users, C)) ** (1.0 / cw)             # weighted sampling w/o replacement
        user_int = np.argsort(-keys, axis=1)[:, :P]               # (U, P)
    else:
        # P distinct groups (uniform), then one cluster inside each group (weights cw)
        G = int(n_groups)
        ug = np.argsort(rng.random((n_users, G)), axis=1)[:, :P]  # (U, P) group ids
        group = np.arange(C) % G
        order = np.argsort(group, kind="stable")
        gsize = np.bincount(group, minlength=G)
        gstart = np.concatenate([[0], np.cumsum(gsize)[:-1]])
        cw_s = cw[order]
        gcum = np.cumsum(cw_s)
        gbase = gcum[gstart] - cw_s[gstart]
        gtot = np.add.reduceat(cw_s, gstart)
        pos_c = np.searchsorted(gcum, gbase[ug] + rng.random(ug.shape) * gtot[ug], side="right")
        user_int = order[np.clip(pos_c, gstart[ug], gstart[ug] + gsize[ug] - 1)]
    lens = rng.integers(min_len, max_len + 1, size=n_users)
    n = int(lens.sum())
    uid = np.repeat(np.arange(n_users), lens)
    # interest walk: a fresh uniform draw among the user's P interests with probability
    # 1 - stickiness at each step (stickiness 0: the interests interleave at random)
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
