"""Preprocessing: ordering, k-core filter, popularity-sorted id remap, splits, .npz cache.

Conventions (ComiRec): item id 0 is padding; real items are 1..n_items-1 sorted by training
popularity (1 = most frequent, which the log-uniform negative sampler relies on). Users are split
8:1:1 into train / valid / test users; for an evaluation user the first 80 % of the history is
the input and the rest are the targets. ``split="leave_last_out"`` keeps every user: training
sequences drop the last two items, valid targets the second-to-last, test targets the last.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .loaders import Interactions

log = logging.getLogger("seqrec_fast.data")

SPLITS = ("user", "leave_last_out")


@dataclass
class EvalSplit:
    """Held-out users: histories and targets in CSR form.
    hist_indptr: (U+1,) int64, hist_items: (hist_indptr[-1],) int64;
    tgt_indptr: (U+1,) int64, tgt_items: (tgt_indptr[-1],) int64."""
    hist_indptr: np.ndarray
    hist_items: np.ndarray
    tgt_indptr: np.ndarray
    tgt_items: np.ndarray

    @property
    def n_users(self) -> int:
        return int(self.hist_indptr.shape[0] - 1)


@dataclass
class Dataset:
    """A preprocessed dataset.

    n_items: size of the item table INCLUDING padding id 0 (real ids are 1..n_items-1).
    train_indptr: (U_train+1,) and train_items: (nnz,) the time-ordered training sequences.
    valid / test: EvalSplit. item_counts: (n_items,) training frequency (0 for padding).
    item_category: (n_items,) int64 category / planted cluster, -1 unknown (or None).
    item_tokens: (n_items,) str, the source token of each item id ("" for padding 0), when the
    source file had string item tokens (RecBole; see ``load_recbole``), else None.
    """
    n_items: int
    train_indptr: np.ndarray
    train_items: np.ndarray
    valid: EvalSplit
    test: EvalSplit
    item_counts: np.ndarray
    item_category: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)
    item_tokens: Optional[np.ndarray] = None

    @property
    def n_train_users(self) -> int:
        return int(self.train_indptr.shape[0] - 1)

    def summary(self) -> str:
        return (f"{self.n_items - 1} items, {self.n_train_users} train users "
                f"({int(self.train_indptr[-1])} interactions), {self.valid.n_users} valid users, "
                f"{self.test.n_users} test users")

    # ------------------------------------------------------------------ cache
    def save(self, path) -> None:
        """Write the dataset to a .npz file."""
        arrays = {"n_items": np.int64(self.n_items), "train_indptr": self.train_indptr,
                  "train_items": self.train_items, "item_counts": self.item_counts,
                  "meta": np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)}
        for name in ("valid", "test"):
            s = getattr(self, name)
            for k in ("hist_indptr", "hist_items", "tgt_indptr", "tgt_items"):
                arrays[f"{name}_{k}"] = getattr(s, k)
        if self.item_category is not None:
            arrays["item_category"] = self.item_category
        if self.item_tokens is not None:
            arrays["item_tokens"] = np.asarray(self.item_tokens).astype(str)  # no pickling
        tmp = f"{os.fspath(path)}.{os.getpid()}.tmp.npz"    # concurrent writers: own file
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "Dataset":
        """Read a dataset written by :meth:`save`."""
        z = np.load(path)
        splits = {name: EvalSplit(*(z[f"{name}_{k}"] for k in
                                    ("hist_indptr", "hist_items", "tgt_indptr", "tgt_items")))
                  for name in ("valid", "test")}
        return cls(int(z["n_items"]), z["train_indptr"], z["train_items"], splits["valid"],
                   splits["test"], z["item_counts"],
                   z["item_category"] if "item_category" in z.files else None,
                   json.loads(bytes(z["meta"]).decode()),
                   z["item_tokens"] if "item_tokens" in z.files else None)


def kcore(user: np.ndarray, item: np.ndarray, k: int):
    """Iterative k-core: keep interactions whose user AND item have >= k of them.
    user, item: (n,) int64. Returns a bool keep mask (n,)."""
    keep = np.ones(user.shape[0], dtype=bool)
    if k <= 1:
        return keep
    while True:
        u, uinv, ucnt = np.unique(user[keep], return_inverse=True, return_counts=True)
        i, iinv, icnt = np.unique(item[keep], return_inverse=True, return_counts=True)
        ok = (ucnt[uinv] >= k) & (icnt[iinv] >= k)
        if ok.all():
            return keep
        idx = np.flatnonzero(keep)
        keep[idx[~ok]] = False


def _csr(groups: np.ndarray, values: np.ndarray, n_groups: int):
    """values sorted by group -> (indptr (n_groups+1,), values)."""
    counts = np.bincount(groups, minlength=n_groups)
    indptr = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, values


def _subset(indptr, items, rows):
    """Rows ``rows`` of a CSR -> new (indptr, items)."""
    lens = indptr[rows + 1] - indptr[rows]
    new_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_ptr[1:])
    idx = np.repeat(indptr[rows] - new_ptr[:-1], lens) + np.arange(new_ptr[-1])
    return new_ptr, items[idx]


def _cut(indptr, items, cut_at):
    """Split each row r at position cut_at[r] -> (head CSR, tail CSR)."""
    lens = np.diff(indptr)
    pos = np.arange(items.shape[0]) - np.repeat(indptr[:-1], lens)
    head = pos < np.repeat(cut_at, lens)
    hp = np.zeros_like(indptr)
    np.cumsum(cut_at, out=hp[1:])
    tp = np.zeros_like(indptr)
    np.cumsum(lens - cut_at, out=tp[1:])
    return (hp, items[head]), (tp, items[~head])


def preprocess(inter: Interactions, *, k_core: int = 5, split: str = "user",
               ratios=(0.8, 0.1, 0.1), eval_history_frac: float = 0.8, seed: int = 2020,
               meta: Optional[dict] = None, user_split: Optional[dict] = None) -> Dataset:
    """Raw interactions -> :class:`Dataset` (see module doc for the conventions).

    Handling of bad data, all counted in the log: interactions are ordered by timestamp within
    each user (stable; users whose file order was not time order are counted); k-core filtering
    drops users/items with fewer than ``k_core`` interactions (iteratively); evaluation users with
    fewer than 2 interactions are dropped (nothing to predict).

    When ``inter.item_tokens`` is set (string item tokens), the result's ``item_tokens[i]`` is
    the token of final item id i; popularity ties are then broken by token order.

    user_split: a ready-made user split instead of the seeded ``ratios`` draw (``split="user"``
    only): raw user id (as in ``inter.user``) -> "train" | "valid" | "test". Users of the data
    that it does not list are dropped (counted in the log).
    """
    if not isinstance(inter, Interactions):
        raise TypeError(f"inter must be an Interactions, got {type(inter).__name__}")
    if isinstance(k_core, bool) or not isinstance(k_core, int) or k_core < 0:
        raise ValueError(f"k_core must be an int >= 0, got {k_core!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers, got {ratios!r}")
    if not 0.0 < eval_history_frac < 1.0:
        raise ValueError(f"eval_history_frac must lie in (0, 1), got {eval_history_frac}")
    if len(inter) == 0:
        raise ValueError("inter holds no interactions")
    if user_split is not None and split != "user":
        raise ValueError(f"user_split needs split='user', got split={split!r}")
    user, item, time, cat = inter.user, inter.item, inter.time, inter.category
    if (item == 0).any() and item.min() >= 0:
        pass  # raw id 0 is an ordinary item here; remapping moves every item off 0
    # order: by user, then time, then file order
    order = np.lexsort((np.arange(len(user)), time, user))
    file_order = np.lexsort((np.arange(len(user)), user))
    if not np.array_equal(order, file_order):
        moved = np.unique(user[order[order != file_order]])
        log.info("reordered the interactions of %d user(s) whose file order was not time order",
                 len(moved))
    user, item, time = user[order], item[order], time[order]
    cat = cat[order] if cat is not None else None
    keep = kcore(user, item, k_core)
    if not keep.all():
        n_u0, n_i0 = len(np.unique(user)), len(np.unique(item))
        user, item, time = user[keep], item[keep], time[keep]
        cat = cat[keep] if cat is not None else None
        log.info("%d-core filter dropped %d interaction(s), %d user(s), %d item(s)", k_core,
                 int((~keep).sum()), n_u0 - len(np.unique(user)), n_i0 - len(np.unique(item)))
    if len(user) == 0:
        raise ValueError(f"no interaction is left after the {k_core}-core filter")
    uids, uidx = np.unique(user, return_inverse=True)
    n_users = len(uids)
    rng = np.random.default_rng(seed)

    # user split decided first: popularity (the id order) counts training interactions only
    if split == "user" and user_split is not None:
        code = {"train": 0, "valid": 1, "test": 2}
        part = np.full(n_users, -1, dtype=np.int64)
        for i, u in enumerate(uids.tolist()):
            v = user_split.get(u)
            if v is not None:
                if v not in code:
                    raise ValueError(f"user_split: user {u} has split {v!r}; expected train, "
                                     f"valid or test")
                part[i] = code[v]
        if (part < 0).any():
            log.info("user_split does not list %d of the %d user(s) left after filtering: "
                     "dropped", int((part < 0).sum()), n_users)
        if not (part == 0).any():
            raise ValueError("user_split puts no user of the data in 'train'")
        train_u, valid_u, test_u = (np.flatnonzero(part == c) for c in range(3))
        train_inter = np.isin(uidx, train_u)
    elif split == "user":
        perm = rng.permutation(n_users)
        r = np.asarray(ratios, dtype=np.float64) / float(sum(ratios))
        n_tr = int(round(r[0] * n_users))
        n_va = int(round(r[1] * n_users))
        train_u, valid_u, test_u = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
        train_inter = np.isin(uidx, train_u)
    else:
        lens = np.bincount(uidx, minlength=n_users)
        pos = np.arange(len(uidx)) - np.repeat(np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        train_inter = pos < np.repeat(lens - 2, lens)
    iids, iidx = np.unique(item, return_inverse=True)
    counts = np.bincount(iidx[train_inter], minlength=len(iids))
    # popularity order (ties: raw id), 1-based so that 0 stays padding
    rank = np.empty(len(iids), dtype=np.int64)
    rank[np.lexsort((iids, -counts))] = np.arange(1, len(iids) + 1)
    new_item = rank[iidx]
    n_items = len(iids) + 1
    item_counts = np.zeros(n_items, dtype=np.int64)
    item_counts[rank] = counts
    item_category = None
    if cat is not None:
        item_category = np.full(n_items, -1, dtype=np.int64)
        item_category[new_item] = cat
    indptr, items = _csr(uidx, new_item, n_users)
    lens = np.diff(indptr)

    if split == "user":
        tr = _subset(indptr, items, np.sort(train_u))
        evals = []
        for name, us in (("valid", valid_u), ("test", test_u)):
            us = np.sort(us)
            short = lens[us] < 2
            if short.any():
                log.info("%s: dropped %d user(s) with fewer than 2 interactions", name,
                         int(short.sum()))
                us = us[~short]
            p, it = _subset(indptr, items, us)
            cut = np.maximum(1, (np.diff(p) * eval_history_frac).astype(np.int64))
            (hp, hi), (tp, ti) = _cut(p, it, cut)
            evals.append(EvalSplit(hp, hi, tp, ti))
        valid, test = evals
    else:
        ok = lens >= 3
        if not ok.all():
            log.info("leave_last_out: dropped %d user(s) with fewer than 3 interactions",
                     int((~ok).sum()))
        p, it = _subset(indptr, items, np.flatnonzero(ok))
        l2 = np.diff(p)
        (trp, tri), _ = _cut(p, it, l2 - 2)
        tr = (trp, tri)
        (vh, vhi), rest = _cut(p, it, l2 - 2)
        (vt, vti), _ = _cut(rest[0], rest[1], np.ones(len(l2), dtype=np.int64))
        (th, thi), (tt, tti) = _cut(p, it, l2 - 1)
        valid, test = EvalSplit(vh, vhi, vt, vti), EvalSplit(th, thi, tt, tti)
    m = {"k_core": k_core, "split": split, "ratios": list(ratios), "seed": seed,
         "eval_history_frac": eval_history_frac, "user_split": user_split is not None,
         "n_raw_users": n_users}
    m.update(meta or {})
    item_tokens = None
    if inter.item_tokens is not None:
        tok = np.asarray(inter.item_tokens).astype(str)
        item_tokens = np.zeros(n_items, dtype=tok.dtype)      # "" for padding 0
        item_tokens[rank] = tok[iids]
    ds = Dataset(n_items, tr[0], tr[1], valid, test, item_counts, item_category, m, item_tokens)
    log.info("dataset: %s", ds.summary())
    return ds


def cache_key(*parts) -> str:
    """A short stable hash of JSON-serialisable ``parts`` (file digests, options)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path, chunk: int = 1 << 22) -> str:
    """blake2b digest of a file's content (the cache key of a data file: a copied, touched or
    moved file keeps its cache, an edited one gets a new one)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def default_cache_dir() -> str:
    """``$SEQREC_FAST_CACHE``, else ``$XDG_CACHE_HOME/seqrec_fast`` (``~/.cache/seqrec_fast``)."""
    env = os.environ.get("SEQREC_FAST_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "seqrec_fast")


def load_dataset(source, *, cache_dir: Optional[str] = "auto", format: str = "auto",
                 loader_kwargs: Optional[dict] = None, synthetic: Optional[dict] = None,
                 user_split=None, item_categories=None, **prep_kwargs) -> Dataset:
    """A source -> :class:`Dataset`: the one entry point from a log file (or ``"synthetic"``)
    to preprocessed, cached data.

    source: a path (format from ``format`` / the extension, see ``load_interactions``;
    ``loader_kwargs`` go to the loader: columns, ``sep``, ``header``) or ``"synthetic"``
    (``synthetic``: arguments of :func:`~seqrec_fast.data.synthetic.synthetic`).
    user_split: None, a path of ``user,split`` lines, or a dict raw user id -> "train" /
    "valid" / "test" (see :func:`preprocess`). prep_kwargs go to :func:`preprocess`
    (k_core, split, ratios, seed, eval_history_frac).
    item_categories: None, or a path of an item -> category map (ComiRec's ``item_cate.txt``,
    RecBole's ``.item``, a CSV; see ``loaders.read_item_categories``): the data set's
    ``item_category`` then comes from it (-1 for items it lacks).

    cache_dir: ``"auto"`` (the default) caches files under :func:`default_cache_dir`, not the
    synthetic data (generated in well under a second); a folder caches every source there;
    None caches nothing. The cache file is ``<name>-<key>.npz``, the key a hash of the file's
    content (``user_split``'s too) and of every option, so any change gives a new entry and a
    second call with the same input skips loading and preprocessing."""
    from .loaders import (load_interactions, read_item_categories, read_user_split,
                          with_item_categories)
    from .synthetic import DEFAULTS, synthetic as generate

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or 'synthetic', got {type(source).__name__}")
    is_synth = isinstance(source, str) and source == "synthetic"
    if is_synth:   # generator arguments given as keywords (as synthetic_dataset takes them)
        moved = {k: prep_kwargs.pop(k) for k in list(prep_kwargs) if k in DEFAULTS and k != "seed"}
        synthetic = {**(synthetic or {}), **moved}
    if synthetic and not is_synth:
        raise ValueError("synthetic arguments are given but source is not 'synthetic'")
    if cache_dir == "auto":
        cache_dir = None if is_synth else default_cache_dir()
    split_key = None
    cat_key = None
    if item_categories is not None:
        if not isinstance(item_categories, (str, os.PathLike)):
            raise TypeError(f"item_categories must be a path, got "
                            f"{type(item_categories).__name__}")
        if not os.path.isfile(os.fspath(item_categories)):
            raise ValueError(f"item_categories {os.fspath(item_categories)!r} does not exist")
        cat_key = file_digest(os.fspath(item_categories)) if cache_dir is not None else None
    if isinstance(user_split, (str, os.PathLike)):
        us = os.fspath(user_split)
        if not os.path.isfile(us):
            raise ValueError(f"user_split {us!r} does not exist")
        split_key = file_digest(us) if cache_dir is not None else None
    elif user_split is not None:
        if not isinstance(user_split, dict):
            raise TypeError(f"user_split must be a path or a dict, got "
                            f"{type(user_split).__name__}")
        split_key = sorted((str(k), v) for k, v in user_split.items())
    if is_synth:
        args = dict(DEFAULTS)
        unknown = set(synthetic or {}) - set(args)
        if unknown:
            raise TypeError(f"unknown synthetic argument(s) {sorted(unknown)}; known: "
                            f"{sorted(args)}")
        args.update(synthetic or {})
        name, key_parts = "synthetic", (args,)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"source {path!r} does not exist (or use source='synthetic')")
        name = os.path.basename(path)
        key_parts = (file_digest(path), format, loader_kwargs) if cache_dir else ()
    cache = None
    if cache_dir is not None:
        key = cache_key(*key_parts, split_key, sorted(prep_kwargs.items()), _CACHE_VERSION,
                        *((cat_key,) if cat_key is not None else ()))
        cache = os.path.join(os.fspath(cache_dir), f"{name}-{key}.npz")
        if os.path.exists(cache):
            log.info("loading the cached dataset %s", cache)
            return Dataset.load(cache)
    if is_synth:
        gen = dict(args)
        inter = generate(gen.pop("n_users"), gen.pop("n_items"), gen.pop("n_interests"), **gen)
        meta = {"source": "synthetic", "synthetic": args}
    else:
        inter = load_interactions(path, format, **(loader_kwargs or {}))
        meta = {"source": os.path.abspath(path)}
    if item_categories is not None:
        inter = with_item_categories(inter, read_item_categories(item_categories, inter))
    if isinstance(user_split, (str, os.PathLike)):
        user_split = read_user_split(user_split, inter)
    ds = preprocess(inter, meta=meta, user_split=user_split, **prep_kwargs)
    if cache is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            ds.save(cache)
            log.info("cached the dataset to %s", cache)
        except OSError as exc:       # a read-only or missing place: the data set still loads
            log.warning("could not cache the dataset in %s (%s); pass another cache_dir, or "
                        "None to turn the cache off", cache_dir, exc.strerror or exc)
    return ds


_CACHE_VERSION = 2


def synthetic_dataset(*, cache_dir: Optional[str] = None, **kwargs) -> Dataset:
    """``load_dataset("synthetic", synthetic=<generator arguments>, ...)``: keyword arguments
    of :func:`~seqrec_fast.data.synthetic.synthetic` go to the generator, the others
    (k_core, split, seed, ...) to :func:`load_dataset`."""
    from .synthetic import DEFAULTS

    # ``seed`` is the split seed (as in preprocess); the generator's is synthetic={"seed": ...}
    gen = {k: kwargs.pop(k) for k in list(kwargs) if k in DEFAULTS and k != "seed"}
    return load_dataset("synthetic", cache_dir=cache_dir, synthetic=gen, **kwargs)
