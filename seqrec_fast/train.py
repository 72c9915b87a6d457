"""Training loop (Python API): ``train(TrainConfig(...))`` or ``train(model="comirec-dr", ...)``.

Data parallel: under ``torchrun --nproc_per_node N`` (or when the default process group is
already initialized) every rank trains a DistributedDataParallel replica on its own rows of
each global batch (``batch_size`` is per rank), validation and test users are split between the
ranks and the metrics all-reduced, and only rank 0 writes files (checkpoints hold the unwrapped
model, so they load on any world size, a single process included).

Writes to ``out_dir``: ``config.json``, ``metrics.jsonl`` (one JSON record per validation and the
final test), ``last.pt`` (resumable: model, optimizers, RNG states, counters), ``best.pt`` (best
validation Recall@50), ``item_emb.npy`` (n_items, d), ``user_emb_test.npy`` (U_test, K, d),
``item_category.npy`` (n_items,) when the data has categories, and ``items.faiss`` when faiss is
installed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import distributed as _dist
from .data import TrainSampler, eval_batches, load_dataset
from .evaluate import evaluate, evaluate_popularity
from .retrieval import Retriever, faiss_available
from .metrics import format_table
from .models import build_model
from .optim import build_optimizers

log = logging.getLogger("seqrec_fast.train")


@dataclass
class TrainConfig:
    """Every option of a run (CLI flags have the same names with dashes).

    Defaults follow ComiRec (d 64, K 4, L 20, batch 128, Adam 1e-3, 10×batch sampled negatives,
    hard readout, early stopping on validation Recall@50) and are sized so that the default CPU
    demo (ComiRec-DR on the default synthetic data) finishes in well under a minute (timing in
    bench/NOTES.md).
    """
    model: str = "comirec-dr"
    data: str = "synthetic"
    data_format: str = "auto"
    synthetic: dict = field(default_factory=dict)   # synthetic() arguments (n_users, n_items, ...)
    user_col: Optional[str] = None        # column names (or indexes), None: detected
    item_col: Optional[str] = None
    time_col: Optional[str] = None        # "none": file order is time order
    sep: Optional[str] = None             # None: from the extension / the first line
    header: Optional[bool] = None         # None: detected
    k_core: int = 5
    split: str = "user"
    split_ratios: tuple = (0.8, 0.1, 0.1)  # train / valid / test users
    split_seed: int = 2020
    eval_history_frac: float = 0.8        # input share of a held-out user's history
    user_split: Optional[str] = None      # file of "user,split" lines (a ready-made split)
    item_categories: Optional[str] = None  # item -> category map file (Diversity, aggregation)
    cache_dir: Optional[str] = "auto"     # "auto": $SEQREC_FAST_CACHE or ~/.cache/seqrec_fast
    dim: int = 64
    num_interests: int = 4
    max_len: int = 20
    padding: str = "right"
    loss: str = "sampled"
    neg_ratio: int = 10
    num_negatives: Optional[int] = None
    neg_sampler: str = "log_uniform"
    readout: str = "hard"
    readout_pow: float = 1.0
    dynamic_k: bool = False
    bilinear_init: str = "identity"       # ComiRec-DR: "identity" or "normal" (ComiRec's N(0, 1))
    batch_size: int = 128
    steps: int = 1500
    epochs: Optional[float] = None        # overrides steps: epochs · train interactions / batch
    lr: float = 1e-3
    optimizer: str = "adam"               # adam | rowwise_adagrad | rowwise_adam
    sparse_lr: Optional[float] = None
    eval_every: int = 500
    eval_users: Optional[int] = None      # validate on the first N validation users (None: all)
    patience: int = 5                     # evaluations without improvement before stopping
    log_every: int = 50                   # a "train" record (mean loss) every N steps
    device: str = "auto"
    bf16: bool = False
    seed: int = 0
    backend: str = "auto"
    retriever: str = "auto"
    faiss_index: str = "flat"             # flat (exact) | ivf | hnsw (see retrieval.Retriever)
    faiss_nlist: Optional[int] = None
    faiss_nprobe: Optional[int] = None
    faiss_hnsw_m: int = 32
    faiss_ef_search: int = 128
    dist_timeout: float = 600.0           # seconds a collective waits for a silent rank
    shard_catalog: bool = False           # DDP: split the item table by rows across ranks
    out_dir: Optional[str] = None         # default runs/<model>
    resume: bool = False
    export: bool = True
    progress: bool = True
    topk: tuple = (20, 50)

    def __post_init__(self):
        for name in ("dim", "num_interests", "max_len", "batch_size", "steps", "eval_every",
                     "patience", "neg_ratio", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.eval_users is not None and (isinstance(self.eval_users, bool)
                                            or not isinstance(self.eval_users, int)
                                            or self.eval_users < 1):
            raise ValueError(f"eval_users must be a positive int or None, got {self.eval_users!r}")
        check_device(self.device)
        if self.sparse_lr is not None and not (isinstance(self.sparse_lr, (int, float))
                                               and self.sparse_lr > 0):
            raise ValueError(f"sparse_lr must be > 0 or None, got {self.sparse_lr!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if self.faiss_index not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"faiss_index must be 'flat', 'ivf' or 'hnsw', got {self.faiss_index!r}")
        for name in ("faiss_nlist", "faiss_nprobe", "faiss_hnsw_m", "faiss_ef_search"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if (isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float))
                or not self.dist_timeout > 0):
            raise ValueError(f"dist_timeout must be a positive number of seconds, got "
                             f"{self.dist_timeout!r}")
        if not isinstance(self.shard_catalog, bool):
            raise TypeError(f"shard_catalog must be a bool, got {type(self.shard_catalog).__name__}")
        self.topk = tuple(self.topk)
        self.split_ratios = tuple(self.split_ratios)
        if (len(self.split_ratios) != 3 or min(self.split_ratios) < 0
                or sum(self.split_ratios) <= 0):
            raise ValueError(f"split_ratios must be three non-negative numbers, got "
                             f"{self.split_ratios!r}")
        if not 0.0 < self.eval_history_frac < 1.0:
            raise ValueError(f"eval_history_frac must lie in (0, 1), got "
                             f"{self.eval_history_frac!r}")
        if self.data != "synthetic" and not os.path.isfile(str(self.data)):
            raise ValueError(f"data {self.data!r} is not 'synthetic' and not an existing file")
        if self.user_split is not None and not os.path.isfile(str(self.user_split)):
            raise ValueError(f"user_split {self.user_split!r} does not exist")


def check_device(name) -> None:
    """ValueError for a device string torch cannot parse or a CUDA device without CUDA."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA GPU is available to this torch "
                         f"(CUDA build: {torch.version.cuda is not None}); use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} GPU(s) exist")


def _device(name):
    check_device(name)
    return _dist.resolve_device(name)


def model_kwargs(cfg: TrainConfig) -> dict:
    kw = dict(dim=cfg.dim, max_len=cfg.max_len, loss=cfg.loss, neg_ratio=cfg.neg_ratio,
              num_negatives=cfg.num_negatives, neg_sampler=cfg.neg_sampler, readout=cfg.readout,
              readout_pow=cfg.readout_pow, sparse=cfg.optimizer != "adam", backend=cfg.backend)
    name = cfg.model.lower().replace("_", "-")
    if name in ("mind", "comirec-dr", "comirec-sa"):
        kw["num_interests"] = cfg.num_interests
    if name == "mind":
        kw["dynamic_k"] = cfg.dynamic_k
    if name == "comirec-dr":
        kw["bilinear_init"] = cfg.bilinear_init
    return kw


def run_dataset(cfg: TrainConfig):
    """The preprocessed data set of a run (``cfg.data`` and the data / split options)."""
    prep = dict(k_core=cfg.k_core, split=cfg.split, ratios=tuple(cfg.split_ratios),
                seed=cfg.split_seed, eval_history_frac=cfg.eval_history_frac,
                user_split=cfg.user_split, item_categories=cfg.item_categories)
    if cfg.data == "synthetic":
        return load_dataset("synthetic", cache_dir=cfg.cache_dir, synthetic=cfg.synthetic,
                            **prep)
    cols = {k: getattr(cfg, k) for k in ("user_col", "item_col", "time_col", "sep", "header")
            if getattr(cfg, k) is not None}
    return load_dataset(cfg.data, cache_dir=cfg.cache_dir, format=cfg.data_format,
                        loader_kwargs=cols or None, **prep)


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    kw = {}
    if cfg.data != "synthetic" and not os.path.isabs(cfg.data):
        kw["data"] = os.path.abspath(cfg.data)
    for name in ("cache_dir", "user_split", "item_categories"):
        v = getattr(cfg, name)
        if v not in (None, "auto") and not os.path.isabs(v):
            kw[name] = os.path.abspath(v)
    return dataclasses.replace(cfg, **kw) if kw else cfg


# Every inference path (validation, test, ``evaluate``, the embedding export) runs the users'
# histories in batches of EVAL_BATCH and draws MIND's random initial routing logits from a
# fresh generator seeded with INFERENCE_SEED: the exported user embeddings are the ones the
# reported metrics were computed from, and the training random streams are left untouched.
INFERENCE_SEED = 12345
EVAL_BATCH = 512


@contextlib.contextmanager
def inference_generator(model, device):
    """Within the block, ``model.generator`` is a fresh generator seeded with INFERENCE_SEED."""
    saved = model.generator
    g = torch.Generator(device=device)
    g.manual_seed(INFERENCE_SEED)
    model.generator = g
    try:
        yield g
    finally:
        model.generator = saved


def _eval(model, split, cfg, device, max_users=None, distributed=False, categories=None,
          lam=None):
    """Metrics on an EvalSplit under :func:`inference_generator`. ``distributed``: users split
    over the ranks of the default group, metrics all-reduced. ``categories`` / ``lam``: as
    :func:`seqrec_fast.evaluate.evaluate` (Diversity@k, controllable aggregation)."""
    with inference_generator(model, device):
        return evaluate(model, split, max_len=cfg.max_len, padding=cfg.padding, ks=cfg.topk,
                        batch_size=EVAL_BATCH, retriever=cfg.retriever, device=device,
                        max_users=max_users, index=cfg.faiss_index, nlist=cfg.faiss_nlist,
                        nprobe=cfg.faiss_nprobe, hnsw_m=cfg.faiss_hnsw_m,
                        ef_search=cfg.faiss_ef_search,
                        process_group="default" if distributed else None,
                        categories=categories, lam=lam)


def _state_fits(gen: torch.Generator, state: torch.Tensor) -> bool:
    """True when ``state`` (a saved ``get_state()``) is of ``gen``'s kind: a CPU generator's
    state and a CUDA one's differ in size (5056 and 16 bytes)."""
    return state.numel() == gen.get_state().numel()


def _autocast(device, enabled):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


GATHER_CHUNK_BYTES = 64 << 20


def _gather_rows(t: torch.Tensor, model, chunk_bytes: int = GATHER_CHUNK_BYTES) -> torch.Tensor:
    """This rank's rows of a sharded (n_r, ...) tensor -> the whole (n_items, ...) tensor on the
    CPU (collective over the model's catalog group). Gathered in rounds of at most
    ``chunk_bytes`` per rank, each round moved to the CPU at once: on NCCL the device holds
    world × chunk_bytes, never the whole table (which a sharded catalog may not fit)."""
    import torch.distributed as tdist

    from .ops.catalog_parallel import all_gather_list, shard_rows

    group, rank, world, _, _ = model.catalog_shard
    spans = [shard_rows(model.n_items, r, world) for r in range(world)]
    m = max(b - a for a, b in spans)
    tail = tuple(t.shape[1:])
    on = t.device if tdist.get_backend(group) == "nccl" else torch.device("cpu")
    out = torch.empty((model.n_items,) + tail, dtype=t.dtype)
    row_bytes = max(1, math.prod(tail) * t.element_size())
    step = max(1, int(chunk_bytes) // row_bytes)
    own = t.shape[0]
    for r0 in range(0, m, step):                   # the same rounds on every rank
        r1 = min(r0 + step, m)
        pad = torch.zeros((r1 - r0,) + tail, dtype=t.dtype, device=on)
        lo, hi = min(r0, own), min(r1, own)
        if hi > lo:
            pad[:hi - lo] = t[lo:hi].detach().to(on)
        for p, (a, b) in zip(all_gather_list(pad, group, world), spans):
            n = min(r1, b - a) - r0
            if n > 0:
                out[a + r0:a + r0 + n] = p[:n].cpu()
    return out


def _table_state_ids(model, opt):
    """Keys of ``opt.state_dict()["state"]`` that belong to the item table."""
    ids, i = [], 0
    for g in opt.param_groups:
        for p in g["params"]:
            if p is model.item_emb.weight:
                ids.append(i)
            i += 1
    return ids


def _full_states(model, opts):
    """-> (model state, optimizer states) with the whole item table (gathered when sharded)."""
    ms = model.state_dict()
    osd = [o.state_dict() for o in opts]
    if model.catalog_shard is None:
        return ms, osd
    ms = dict(ms)
    ms["item_emb.weight"] = _gather_rows(model.item_emb.weight, model)
    n_local = model.item_emb.weight.shape[0]
    for o, sd in zip(opts, osd):
        for i in _table_state_ids(model, o):
            st = sd["state"].get(i)
            if st is None:
                continue
            sd["state"][i] = {k: (_gather_rows(v, model) if isinstance(v, torch.Tensor)
                                  and v.dim() >= 1 and v.shape[0] == n_local else v)
                              for k, v in st.items()}
    return ms, osd


def _shard_optimizer_state(model, opt, sd):
    """A whole-table optimizer state -> this rank's rows (identity when not sharded)."""
    if model.catalog_shard is None:
        return sd
    lo, hi = model.catalog_shard[3:]
    sd = {"state": dict(sd["state"]), "param_groups": sd["param_groups"]}
    for i in _table_state_ids(model, opt):
        st = sd["state"].get(i)
        if st is not None:
            sd["state"][i] = {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() >= 1
                                  and v.shape[0] == model.n_items else v) for k, v in st.items()}
    return sd


def _load_model_state(model, state):
    """Load a whole-table model state (slicing this rank's rows when sharded)."""
    if model.catalog_shard is not None:
        lo, hi = model.catalog_shard[3:]
        state = dict(state)
        state["item_emb.weight"] = state["item_emb.weight"][lo:hi]
    model.load_state_dict(state)


def ddp_unsupported(cfg: TrainConfig, dist_backend: str) -> Optional[str]:
    """Why ``cfg`` cannot train data-parallel on ``dist_backend`` ("gloo" | "nccl"), or None.
    The row-wise optimizers take sparse item-table gradients, which DDP all-reduces only on
    gloo: NCCL has no sparse all-reduce in torch. With ``shard_catalog`` the table is not a DDP
    parameter (its lookups all-reduce dense row blocks), so any optimizer works."""
    if (dist_backend == "nccl" and cfg.optimizer != "adam" and cfg.loss == "sampled"
            and not cfg.shard_catalog):   # a sharded table stays out of DDP's all-reduce
        return (f"optimizer={cfg.optimizer!r} keeps the item-table gradient sparse, and "
                "DistributedDataParallel cannot all-reduce sparse gradients over NCCL; use "
                "optimizer='adam' (dense) for multi-GPU training, or the gloo backend")
    return None


def _save(path, **obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# Fields of a run that a resumed run takes from its checkpoint and may change: giving another
# value is fine (the change is logged). Every other field (model, data, split, dimensions,
# loss, optimizer, seed, ...) defines what the checkpoint holds: resume takes it from the
# checkpoint and refuses a different value.
RESUME_MAY_CHANGE = frozenset({
    "steps", "epochs", "lr", "sparse_lr", "eval_every", "eval_users", "patience", "log_every",
    "batch_size", "device", "bf16", "backend", "retriever", "faiss_index", "faiss_nlist",
    "faiss_nprobe", "faiss_hnsw_m", "faiss_ef_search", "dist_timeout", "shard_catalog",
    "out_dir", "resume", "export", "progress", "topk", "cache_dir"})


def _plain(v):
    """A config value as JSON gives it back (tuples -> lists), for comparisons."""
    return json.loads(json.dumps(v, default=str))


def _same_data(a, b) -> bool:
    if a == b:
        return True
    if "synthetic" in (a, b) or a is None or b is None:
        return False
    return os.path.abspath(str(a)) == os.path.abspath(str(b))


def resume_config(cfg: TrainConfig, saved: dict, explicit=()) -> tuple:
    """The configuration a resumed run uses -> (TrainConfig, [changes as text]).

    ``saved``: the checkpoint's config (a dict); ``explicit``: the fields the user set. Every
    field comes from the checkpoint, except the explicit ones in :data:`RESUME_MAY_CHANGE`; an
    explicit value of any other field that differs from the checkpoint's raises ValueError."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw, changes, conflicts = {}, [], []
    for name in fields:
        mine = getattr(cfg, name)
        if name not in saved:                     # a field newer than the checkpoint
            kw[name] = mine
            continue
        theirs = saved[name]
        same = (_same_data(mine, theirs) if name == "data"
                else _plain(mine) == _plain(theirs))
        if name in ("resume", "out_dir", "device", "dist_timeout", "shard_catalog"):
            kw[name] = mine               # where and how this process runs: never the saved one
        elif name in explicit and not same:
            if name in RESUME_MAY_CHANGE:
                kw[name] = mine
                changes.append(f"{name} {theirs!r} -> {mine!r}")
            else:
                conflicts.append(f"{name}={mine!r} (the checkpoint has {theirs!r})")
        else:
            kw[name] = theirs
    if conflicts:
        raise ValueError("resume: the checkpoint's run was trained with other settings: "
                         + "; ".join(sorted(conflicts)) + ". Drop these options (resume takes "
                         "them from the checkpoint) or train into a new out_dir")
    return TrainConfig(**kw), changes


class Trainer:
    """One training run; every piece of state a checkpoint must hold lives on it.

    Life cycle (what :func:`train` does): ``build()`` (data, model, sampler, optimizers, DDP
    wrapper), ``resume()`` when ``cfg.resume``, ``fit()`` (``train_step()`` and ``validate()``
    until the step budget or early stopping; ``save_checkpoint()`` after each validation),
    ``test()``, ``export()``. :meth:`state_dict` / :meth:`load_state_dict` are the checkpoint
    contents: model, optimizers, the sampler's and the model's random streams, counters
    (step, best, bad, stopped, last validated / tested step), the history, the smoothed and
    windowed training loss. A run interrupted between steps (Ctrl-C) saves the state it had
    after its last completed step (the random streams rewound to before the interrupted
    step's draws), so ``--resume`` continues exactly as if uninterrupted."""

    def __init__(self, cfg: TrainConfig, ctx, device, callback=None, explicit=()):
        self.cfg, self.ctx, self.device, self.callback = cfg, ctx, device, callback
        self.explicit = set(explicit)
        self.out = cfg.out_dir or os.path.join("runs", cfg.model)
        self.last_path = os.path.join(self.out, "last.pt")
        self.best_path = os.path.join(self.out, "best.pt")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        # counters and logs: the checkpointed state besides model / optimizers / streams
        self.step, self.best, self.bad, self.stopped = 0, -1.0, 0, False
        self.best_step = None
        self.validated_step, self.tested_step = 0, None
        self.history = []
        self.ema = None
        self.loss_sum, self.loss_n = 0.0, 0
        self.test_result = self.popularity = None
        self.saved_step = None            # the step last.pt holds (for messages)
        self._pre_step = None             # random streams before the running step's draws
        self._in_update = False           # between the first optimizer step and step += 1
        self._ck = None

    # ------------------------------------------------------------------ set-up
    def build(self):
        cfg, ctx, device = self.cfg, self.ctx, self.device
        if cfg.resume:
            if not os.path.exists(self.last_path):
                raise ValueError(f"resume=True but {self.last_path} does not exist")
            self._ck = torch.load(self.last_path, map_location="cpu", weights_only=False)
            cfg, changes = resume_config(cfg, self._ck["config"], self.explicit)
            if ctx.is_main:
                for c in changes:
                    log.info("resume: %s", c)
        # where the data lives, absolute: `evaluate` finds it from any working directory
        self.cfg = cfg = _absolute_paths(cfg)
        os.makedirs(self.out, exist_ok=True)
        if ctx.enabled and not ctx.is_main:
            ctx.barrier(device)            # rank 0 reads the data first (and writes any cache)
        self.ds = ds = run_dataset(cfg)
        if ctx.enabled and ctx.is_main:
            ctx.barrier(device)
        if ctx.is_main:
            log.info("data: %s", ds.summary())
        if ctx.enabled:
            log.info("rank %d/%d on %s: %d rows per rank, global batch %d", ctx.rank,
                     ctx.world_size, device, cfg.batch_size, cfg.batch_size * ctx.world_size)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, ds.n_items, **model_kwargs(cfg))   # built on the CPU
        if self._ck is not None:
            model.load_state_dict(self._ck["model"])
        if cfg.shard_catalog:
            if not ctx.enabled:
                raise ValueError("shard_catalog=True needs several ranks (run under torchrun "
                                 "--nproc_per_node N with N >= 2)")
            import torch.distributed as tdist

            # its own group: the catalog collectives never interleave with DDP's gradient buckets
            model.shard_catalog(tdist.new_group())
            lo, hi = model.catalog_shard[3:]
            log.info("rank %d/%d holds items [%d, %d) of %d", ctx.rank, ctx.world_size, lo, hi,
                     ds.n_items)
        self.model = model = model.to(device)
        model.generator = torch.Generator(device=device)
        model.generator.manual_seed(cfg.seed + 1)
        self.sampler = TrainSampler(ds.train_indptr, ds.train_items, batch_size=cfg.batch_size,
                                    max_len=cfg.max_len, padding=cfg.padding, device=device,
                                    seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
        self.opts = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.sparse_lr)
        self._lrs = [[g["lr"] for g in o.param_groups] for o in self.opts]   # this run's lr
        self.global_batch = cfg.batch_size * ctx.world_size
        self.total = cfg.steps
        if cfg.epochs is not None:
            self.total = max(1, int(math.ceil(cfg.epochs * int(ds.train_indptr[-1])
                                              / self.global_batch)))
        self.net = model
        if ctx.enabled:
            import torch.distributed as tdist
            from torch.nn.parallel import DistributedDataParallel

            be = tdist.get_backend()     # a group made without a backend: "cpu:gloo,cuda:nccl"
            why = ddp_unsupported(cfg, "nccl" if be == "nccl" or (
                device.type == "cuda" and "cuda:nccl" in be) else "gloo")
            if why:
                raise ValueError(why)
            if model.catalog_shard is not None:   # each rank's own rows: not averaged by DDP
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, ["item_emb.weight"])
            # model.forward(batch) is model.loss(batch): DDP's hooks see every step
            self.net = DistributedDataParallel(model, device_ids=[device.index or 0]
                                               if device.type == "cuda" else None)
        return self

    def resume(self):
        """Load ``last.pt`` (read in :meth:`build`) and trim ``metrics.jsonl`` to the records of
        the state it holds; without resume, start ``metrics.jsonl`` afresh."""
        if self._ck is not None:
            self.load_state_dict(self._ck)
            self._ck = None
            self.saved_step = self.step
            if self.ctx.is_main:
                self._trim_metrics()
                log.info("resumed from %s at step %d", self.last_path, self.step)
        elif self.ctx.is_main:
            stale = [f for f in ("metrics.jsonl", "last.pt", "best.pt")
                     if os.path.exists(os.path.join(self.out, f))]
            if stale:
                log.warning("%s holds a previous run: starting it afresh (its %s are replaced; "
                            "use --resume to continue it instead)", self.out, ", ".join(stale))
            for f in stale:               # a later --resume must not find the old run's state
                if os.path.exists(os.path.join(self.out, f)):
                    os.remove(os.path.join(self.out, f))
        if self.ctx.is_main:
            with open(os.path.join(self.out, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(self.cfg), f, indent=1, default=str)
        return self

    def _trim_metrics(self):
        """Keep the records the checkpointed state had written (an interrupted run may have
        logged records after its last checkpoint)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            recs = [json.loads(x) for x in f if x.strip()]
        k = self.step

        def keep(r):
            if r.get("step", 0) < k:
                return True
            if r.get("step") != k:
                return False
            split = r.get("split")
            return (split == "train" or (split == "valid" and self.validated_step == k)
                    or (split == "test" and self.tested_step == k))

        kept = [r for r in recs if keep(r)]
        if len(kept) != len(recs):
            with open(self.metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    # ------------------------------------------------------------------ checkpoint
    def _streams(self) -> dict:
        return {"sampler": self.sampler.state_dict(),
                "model_generator": self.model.generator.get_state()}

    def state_dict(self) -> dict:
        """Everything ``last.pt`` holds (collective when the catalog is sharded)."""
        model_state, opt_states = _full_states(self.model, self.opts)
        streams = self._pre_step if self._pre_step is not None else self._streams()
        return dict(model=model_state, optimizers=opt_states, **streams,
                    step=self.step, best=self.best, best_step=self.best_step, bad=self.bad,
                    stopped=self.stopped, validated_step=self.validated_step,
                    tested_step=self.tested_step, history=list(self.history), ema=self.ema,
                    loss_sum=self.loss_sum, loss_n=self.loss_n, test=self.test_result,
                    popularity=self.popularity, config=dataclasses.asdict(self.cfg),
                    n_items=self.ds.n_items, world_size=self.ctx.world_size)

    def load_state_dict(self, ck: dict):
        for o, s in zip(self.opts, ck["optimizers"]):
            o.load_state_dict(_shard_optimizer_state(self.model, o, s))
        self._set_lr()                    # a changed lr wins over the one the optimizers saved
        same_kind = all(_state_fits(g, st) for g, st in (
            (self.sampler.generator, ck["sampler"]["generator"]),
            (self.model.generator, ck["model_generator"])))
        if same_kind:
            self.sampler.load_state_dict(ck["sampler"])
            self.model.generator.set_state(ck["model_generator"])
        else:
            # a CPU generator's state is not a CUDA one's: the checkpoint was written on the
            # other kind of device. Continue from seeds derived from the step (reproducible,
            # but not the uninterrupted run's stream).
            self.sampler.generator.manual_seed(self.cfg.seed + 1_000_003 * (ck["step"] + 1))
            self.model.generator.manual_seed(self.cfg.seed + 1 + 1_000_003 * (ck["step"] + 1))
            log.warning("resume: last.pt was written on another kind of device than %s; the "
                        "sampler and routing random streams restart from seeds derived from "
                        "step %d (the run continues, but not bitwise as it would have on the "
                        "original device)", self.device.type, ck["step"])
        self.step, self.best, self.bad = ck["step"], ck["best"], ck["bad"]
        self.history = list(ck["history"])
        self.stopped = ck.get("stopped", False)
        self.best_step = ck.get("best_step")
        # checkpoints of older versions: a validation ran at every checkpointed step
        self.validated_step = ck.get("validated_step", ck["step"])
        self.tested_step = ck.get("tested_step")
        self.ema = ck.get("ema")
        self.loss_sum, self.loss_n = ck.get("loss_sum", 0.0), ck.get("loss_n", 0)
        self.test_result, self.popularity = ck.get("test"), ck.get("popularity")

    def _set_lr(self):
        for o, lrs in zip(self.opts, self._lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr

    def save_checkpoint(self, path):
        state = self.state_dict()         # every rank joins the gather of a sharded table
        if self.ctx.is_main:
            _save(path, **state)
        if path == self.last_path:
            self.saved_step = self.step

    # ------------------------------------------------------------------ steps
    def train_step(self) -> float:
        """One optimizer step -> the loss (mean over ranks)."""
        self._pre_step = self._streams()
        batch = self.sampler.sample()
        with _autocast(self.device, self.cfg.bf16):
            loss = self.net(batch)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        self._in_update = True
        for o in self.opts:
            o.step()
        lv = self.ctx.mean(float(loss.detach()), self.device)   # the same value on every rank
        self.ema = lv if self.ema is None else 0.98 * self.ema + 0.02 * lv
        self.loss_sum, self.loss_n = self.loss_sum + lv, self.loss_n + 1
        step = self.step + 1
        if step % self.cfg.log_every == 0:
            self._log({"step": step, "split": "train", "loss": self.loss_sum / self.loss_n})
            self.loss_sum, self.loss_n = 0.0, 0
        self.step = step
        self._in_update = False
        self._pre_step = None
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss became {lv} at step {step}")
        return lv

    def validate(self) -> dict:
        """Validation metrics at the current step; updates best / early stopping, writes
        ``best.pt`` on improvement and ``last.pt``."""
        cfg = self.cfg
        m = _eval(self.model, self.ds.valid, cfg, self.device, cfg.eval_users, self.ctx.enabled)
        rec = {"step": self.step, "split": "valid", "loss": self.ema, **m}
        self.history.append(rec)
        self._log(rec)
        key = m.get("recall@50", m[f"recall@{max(cfg.topk)}"])
        self.validated_step = self.step
        if key > self.best:
            self.best, self.bad, self.best_step = key, 0, self.step
            self.save_checkpoint(self.best_path)
        else:
            self.bad += 1
            if self.bad >= cfg.patience:
                self.stopped = True
                if self.ctx.is_main:
                    log.info("early stopping at step %d (best valid recall@50 %.4f)",
                             self.step, self.best)
        self.save_checkpoint(self.last_path)
        return m

    def _log(self, rec):
        if self.ctx.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    @property
    def finished(self) -> bool:
        return self.stopped or self.step >= self.total

    def _validation_due(self) -> bool:
        return (self.step > 0 and self.validated_step != self.step
                and (self.step % self.cfg.eval_every == 0 or self.step >= self.total
                     or self.stopped))

    # ------------------------------------------------------------------ loop
    def fit(self) -> Optional[float]:
        """Train until the step budget or early stopping -> steps per second (None when there
        was nothing left to train)."""
        cfg, ctx = self.cfg, self.ctx
        if self.finished and not self._validation_due():
            if ctx.is_main:
                log.info("the run in %s already finished at step %d (of %d): nothing to train; "
                         "raise --steps to continue it", self.out, self.step, self.total)
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        bar = tqdm(total=self.total, initial=self.step, disable=not cfg.progress
                   or not ctx.is_main, desc=cfg.model, dynamic_ncols=True) if tqdm else None
        self.model.train()
        t0, s0 = time.perf_counter(), self.step
        try:
            while True:
                if self._validation_due():
                    self.validate()
                if self.finished:
                    break
                lv = self.train_step()
                if self.callback is not None:
                    self.callback(self.step, lv)
                if bar is not None:
                    bar.update(1)
                    if self.step % 20 == 0:
                        el = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{self.ema:.3f}",
                                        samples_s=f"{(self.step - s0) * self.global_batch / el:.0f}",
                                        best_r50=f"{self.best:.4f}" if self.best >= 0 else "-")
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            self._on_interrupt()
            raise
        except Exception as e:
            if bar is not None:
                bar.close()
            self._on_failure(e)
            raise
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        return (self.step - s0) / elapsed if self.step > s0 and elapsed > 0 else None

    def _on_interrupt(self):
        """Ctrl-C: the state after the last completed step goes to last.pt (rank 0; not with a
        sharded table, whose gather would need every rank)."""
        if self._in_update or self.model.catalog_shard is not None:
            log.warning("interrupted during step %d; %s", self.step + 1,
                        f"{self.last_path} holds step {self.saved_step}"
                        if self.saved_step is not None else "no checkpoint was written")
        elif self.ctx.is_main:
            self.save_checkpoint(self.last_path)      # streams rewound to before the draws
            log.warning("interrupted after step %d: state saved to %s (continue with --resume)",
                        self.step, self.last_path)

    def _on_failure(self, e: Exception):
        ctx = self.ctx
        if not ctx.enabled:
            return
        where = (f"{self.last_path} holds the last complete state (step {self.saved_step}); "
                 "continue with --resume" if self.saved_step is not None
                 else "no checkpoint was written yet")
        if _dist.is_collective_failure(e):
            raise RuntimeError(
                f"rank {ctx.rank}/{ctx.world_size}: a collective failed during step "
                f"{self.step + 1}: another rank has most likely stopped (see its log). {where}. "
                f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from e
        log.error("rank %d/%d: training failed at step %d (%s: %s); %s", ctx.rank,
                  ctx.world_size, self.step, type(e).__name__, e, where)

    def test(self) -> dict:
        """Test metrics of the best checkpoint (logged once per tested step; recorded in
        last.pt so that resuming a finished run does not test it again)."""
        cfg, ctx = self.cfg, self.ctx
        ctx.barrier(self.device)           # rank 0 has finished writing best.pt
        if os.path.exists(self.best_path):
            _load_model_state(self.model, torch.load(self.best_path, map_location="cpu",
                                                     weights_only=False)["model"])
        if self.tested_step == self.step and self.test_result is not None:
            return self.test_result
        self.test_result = _eval(self.model, self.ds.test, cfg, self.device, None, ctx.enabled)
        self.popularity = evaluate_popularity(self.ds.item_counts, self.ds.test, cfg.topk)
        self._log({"step": self.step, "split": "test", "checkpoint_step": self.best_step,
                   **self.test_result})
        self.tested_step = self.step
        # last.pt gets the test result (the model state is that of the last step: reload it)
        if os.path.exists(self.last_path):
            ck = torch.load(self.last_path, map_location="cpu", weights_only=False)
            if ck["step"] == self.step and ctx.is_main:
                ck.update(tested_step=self.step, test=self.test_result,
                          popularity=self.popularity)
                _save(self.last_path, **ck)
        return self.test_result

    def export(self):
        cfg, ctx, model = self.cfg, self.ctx, self.model
        if not cfg.export:
            return
        exporter = model
        if model.catalog_shard is not None:
            # the whole table exists on rank 0's host only, for the export (collective gather)
            state, _ = _full_states(model, [])
            if ctx.is_main:
                exporter = build_model(cfg.model, self.ds.n_items, **model_kwargs(cfg))
                exporter.load_state_dict(state)
                exporter.generator = torch.Generator()
        if ctx.is_main:
            export_embeddings(exporter, self.ds.test, cfg, self.out,
                              self.device if exporter is model else torch.device("cpu"))
            if self.ds.item_category is not None:   # for `seqrec-fast plot` (t-SNE colours)
                np.save(os.path.join(self.out, "item_category.npy"), self.ds.item_category)

    def run(self) -> dict:
        self.build().resume()
        sps = self.fit()
        test = self.test()
        pop = self.popularity
        self.export()
        cfg, ctx = self.cfg, self.ctx
        table = format_table({cfg.model: test, "most-popular": pop}, cfg.topk)
        if ctx.is_main:
            log.info("test metrics:\n%s", table)
        ctx.barrier(self.device)           # every output file is complete when train returns
        return {"out_dir": self.out, "step": self.step, "best_valid": self.best, "test": test,
                "popularity": pop, "history": self.history, "steps_per_s": sps,
                "model": self.model, "table": table, "rank": ctx.rank,
                "world_size": ctx.world_size, "config": cfg}


def _explicit_fields(config: Optional[TrainConfig], overrides: dict) -> set:
    """The fields a caller set: the keyword overrides, and the fields of ``config`` that differ
    from the defaults."""
    out = set(overrides)
    if config is not None:
        d = TrainConfig()
        out |= {f.name for f in dataclasses.fields(TrainConfig)
                if _plain(getattr(config, f.name)) != _plain(getattr(d, f.name))}
    return out


def train(config: Optional[TrainConfig] = None, *, callback=None, **overrides) -> dict:
    """Train a model; returns {"out_dir", "step", "best_valid", "test", "popularity", "history",
    "steps_per_s" (None when nothing was trained), "model", "table", "rank", "world_size",
    "config"}. ``overrides`` are TrainConfig fields. With ``resume``, the run's settings come
    from its checkpoint (see :func:`resume_config`: the fields given here that may change, such
    as steps or lr, change it; a different model, data or split is an error).
    ``callback(step, loss)`` runs after every optimizer step on every rank (``loss``: the mean
    over ranks); an exception it raises stops that rank's training (under DDP the other ranks
    then stop with an error naming the failed collective)."""
    explicit = _explicit_fields(config, overrides)
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    ctx, device = _dist.setup(config.device, config.dist_timeout)
    try:
        return Trainer(config, ctx, device, callback, explicit).run()
    finally:
        _dist.teardown(ctx)


@torch.no_grad()
def export_embeddings(model, split, cfg: TrainConfig, out: str, device) -> dict:
    """Write item_emb.npy (n_items, d), user_emb_test.npy (U, K, d) and, with faiss, items.faiss
    (an IndexFlatIP over items 1..n_items-1: faiss id i is item i+1). Returns the paths."""
    model.eval()
    items = model.item_embeddings().detach().float().cpu().numpy()
    paths = {"item_emb": os.path.join(out, "item_emb.npy")}
    np.save(paths["item_emb"], items)
    ues = []
    with inference_generator(model, device):      # the draws of the test evaluation (MIND)
        for hist, mask, _, _ in eval_batches(split, max_len=cfg.max_len, padding=cfg.padding,
                                             batch_size=EVAL_BATCH, device=device):
            ues.append(model.user_embeddings(hist, mask).float().cpu())
    if ues:
        paths["user_emb"] = os.path.join(out, "user_emb_test.npy")
        np.save(paths["user_emb"], torch.cat(ues).numpy())
    if faiss_available():
        paths["faiss"] = os.path.join(out, "items.faiss")
        Retriever(model.item_embeddings(), "faiss", use_gpu=False).save(paths["faiss"])
    else:
        log.info("faiss is not installed: no faiss index file written")
    model.train()
    return paths


def config_from_dict(raw: dict, where: str = "the checkpoint") -> TrainConfig:
    """A TrainConfig from a saved config dict (``config.json``, a checkpoint's ``config``);
    fields unknown to this version are ignored, a data file that has gone is a ValueError."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in raw.items() if k in fields}
    kw["device"] = "auto"            # where the run trained says nothing about this machine
    for k in ("topk", "split_ratios"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    try:
        return TrainConfig(**kw)
    except ValueError as exc:
        raise ValueError(f"{where}: the run's settings are no longer valid here ({exc})") from None


def load_checkpoint(path: str, device="auto"):
    """-> (model, TrainConfig, dataset) from a checkpoint written by ``train``."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    dev = _device(device)
    # on the CPU: only the model's tensors go to the device (load_state_dict copies them), not
    # the optimizer states (twice the table for Adam) nor the generator states
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = config_from_dict(ck["config"], where=path)
    ds = run_dataset(cfg)
    model = build_model(cfg.model, ds.n_items, **model_kwargs(cfg)).to(dev)
    model.load_state_dict(ck["model"])
    model.generator = torch.Generator(device=dev)
    return model, cfg, ds


def evaluate_checkpoint(path: str, split: str = "test", device="auto", retriever="auto",
                        faiss_index: str = "flat", faiss_nlist: Optional[int] = None,
                        faiss_nprobe: Optional[int] = None, faiss_hnsw_m: int = 32,
                        faiss_ef_search: int = 128, with_popularity: bool = False,
                        diversity=None):
    """Evaluate a checkpoint (written at any world size) on "valid" or "test" -> metrics dict,
    or (metrics, most-popular baseline metrics) with ``with_popularity``.
    ``faiss_*``: the retrieval index (see ``retrieval.Retriever``). When the run's data has
    item categories, the metrics include Diversity@k. ``diversity``: a list of λ >= 0 — then
    the result is a list of metrics dicts, one per λ of ComiRec's controllable aggregation
    (needs item categories)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    model, cfg, ds = load_checkpoint(path, device)
    cfg.retriever = retriever
    cfg.faiss_index, cfg.faiss_nlist, cfg.faiss_nprobe = faiss_index, faiss_nlist, faiss_nprobe
    cfg.faiss_hnsw_m, cfg.faiss_ef_search = faiss_hnsw_m, faiss_ef_search
    cats = ds.item_category
    if cats is not None and not (np.asarray(cats) >= 0).any():
        cats = None
    dev = next(model.parameters()).device
    if diversity is None:
        m = _eval(model, getattr(ds, split), cfg, dev, categories=cats)
    else:
        if cats is None:
            raise ValueError("diversity needs item categories, and this run's data has none: "
                             "train with --item-categories FILE (or ComiRec-format or "
                             "synthetic data)")
        m = _eval(model, getattr(ds, split), cfg, dev, categories=cats,
                  lam=[float(lam) for lam in diversity])
    if not with_popularity:
        return m
    return m, evaluate_popularity(ds.item_counts, getattr(ds, split), cfg.topk, categories=cats)
