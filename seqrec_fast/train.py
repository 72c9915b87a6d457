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
    demo (ComiRec-DR on the default synthetic data) finishes in well under a minute (about 15 s on 2 cores).
    """
    model: str = "comirec-dr"
    data: str = "synthetic"
    data_format: str = "auto"
    synthetic: dict = field(default_factory=dict)   # synthetic() arguments (n_users, n_items, ...)
    k_core: int = 5
    split: str = "user"
    cache_dir: Optional[str] = None
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
                     "patience", "neg_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
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


_device = _dist.resolve_device


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


def _dataset(cfg: TrainConfig):
    if cfg.data == "synthetic":
        return load_dataset("synthetic", cache_dir=cfg.cache_dir, k_core=cfg.k_core,
                            split=cfg.split, **cfg.synthetic)
    return load_dataset(cfg.data, cache_dir=cfg.cache_dir, format=cfg.data_format,
                        k_core=cfg.k_core, split=cfg.split)


def _eval(model, split, cfg, device, max_users=None, distributed=False):
    """Evaluation with a fixed generator (MIND's random logits) so that it leaves the training
    RNG streams untouched and gives the same numbers every time. ``distributed``: users split
    over the ranks of the default group, metrics all-reduced."""
    saved = model.generator
    g = torch.Generator(device=device)
    g.manual_seed(12345)
    model.generator = g
    try:
        return evaluate(model, split, max_len=cfg.max_len, padding=cfg.padding, ks=cfg.topk,
                        retriever=cfg.retriever, device=device, max_users=max_users,
                        index=cfg.faiss_index, nlist=cfg.faiss_nlist, nprobe=cfg.faiss_nprobe,
                        hnsw_m=cfg.faiss_hnsw_m, ef_search=cfg.faiss_ef_search,
                        process_group="default" if distributed else None)
    finally:
        model.generator = saved


def _autocast(device, enabled):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _gather_rows(t: torch.Tensor, model) -> torch.Tensor:
    """This rank's rows of a sharded (n_r, ...) tensor -> the whole (n_items, ...) tensor on the
    CPU (collective over the model's catalog group)."""
    import torch.distributed as tdist

    from .ops.catalog_parallel import all_gather_list, shard_rows

    group, rank, world, _, _ = model.catalog_shard
    spans = [shard_rows(model.n_items, r, world) for r in range(world)]
    m = max(b - a for a, b in spans)
    on = t.device if tdist.get_backend(group) == "nccl" else torch.device("cpu")
    pad = torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=on)
    pad[:t.shape[0]] = t.detach().to(on)
    parts = all_gather_list(pad, group, world)
    return torch.cat([p[:b - a] for p, (a, b) in zip(parts, spans)]).cpu()


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
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(config: Optional[TrainConfig] = None, *, callback=None, **overrides) -> dict:
    """Train a model; returns {"out_dir", "step", "best_valid", "test", "popularity", "history",
    "steps_per_s", "model", "table", "rank", "world_size"}. ``overrides`` are TrainConfig
    fields. ``callback(step, loss)`` runs after every optimizer step on every rank (``loss``:
    the mean over ranks); an exception it raises stops that rank's training (under DDP the
    other ranks then stop with an error naming the failed collective)."""
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
        return _train(config, ctx, device, callback)
    finally:
        _dist.teardown(ctx)


def _train(cfg: TrainConfig, ctx, device, callback) -> dict:
    out = cfg.out_dir or os.path.join("runs", cfg.model)
    os.makedirs(out, exist_ok=True)
    if ctx.enabled and not ctx.is_main:
        ctx.barrier(device)            # rank 0 reads the data first (and writes any cache)
    ds = _dataset(cfg)
    if ctx.enabled and ctx.is_main:
        ctx.barrier(device)
    if ctx.is_main:
        log.info("data: %s", ds.summary())
    if ctx.enabled:
        log.info("rank %d/%d on %s: %d rows per rank, global batch %d", ctx.rank,
                 ctx.world_size, device, cfg.batch_size, cfg.batch_size * ctx.world_size)
    torch.manual_seed(cfg.seed)
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    model = build_model(cfg.model, ds.n_items, **model_kwargs(cfg))   # built on the CPU
    ck = None
    if cfg.resume:
        if not os.path.exists(last_path):
            raise ValueError(f"resume=True but {last_path} does not exist")
        ck = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
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
    model = model.to(device)
    model.generator = torch.Generator(device=device)
    model.generator.manual_seed(cfg.seed + 1)
    sampler = TrainSampler(ds.train_indptr, ds.train_items, batch_size=cfg.batch_size,
                           max_len=cfg.max_len, padding=cfg.padding, device=device,
                           seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    opts = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.sparse_lr)
    global_batch = cfg.batch_size * ctx.world_size
    total = cfg.steps
    if cfg.epochs is not None:
        total = max(1, int(math.ceil(cfg.epochs * int(ds.train_indptr[-1]) / global_batch)))
    step, best, bad, history, stopped = 0, -1.0, 0, [], False
    if ck is not None:
        for o, s in zip(opts, ck["optimizers"]):
            o.load_state_dict(_shard_optimizer_state(model, o, s))
        sampler.load_state_dict(ck["sampler"])
        model.generator.set_state(ck["model_generator"])
        step, best, bad, history, stopped = (ck["step"], ck["best"], ck["bad"], ck["history"],
                                             ck.get("stopped", False))
        if ctx.is_main:
            log.info("resumed from %s at step %d", last_path, step)
    net = model
    if ctx.enabled:
        import torch.distributed as tdist
        from torch.nn.parallel import DistributedDataParallel

        why = ddp_unsupported(cfg, tdist.get_backend())
        if why:
            raise ValueError(why)

        if model.catalog_shard is not None:   # each rank's own rows: not averaged by DDP
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, ["item_emb.weight"])
        # model.forward(batch) is model.loss(batch): DDP's hooks see every step
        net = DistributedDataParallel(model, device_ids=[device.index or 0]
                                      if device.type == "cuda" else None)
    if ctx.is_main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1, default=str)
    metrics_path = os.path.join(out, "metrics.jsonl")
    saved_step = step if cfg.resume else None

    def checkpoint(path):
        nonlocal saved_step
        model_state, opt_states = _full_states(model, opts)     # collective when sharded
        if not ctx.is_main:
            return
        _save(path, model=model_state, optimizers=opt_states,
              sampler=sampler.state_dict(), model_generator=model.generator.get_state(),
              step=step, best=best, bad=bad, history=history, stopped=stopped,
              config=dataclasses.asdict(cfg), n_items=ds.n_items,
              world_size=ctx.world_size)
        if path == last_path:
            saved_step = step

    def log_record(rec):
        if ctx.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=total, initial=step, disable=not cfg.progress or tqdm is None
               or not ctx.is_main, desc=cfg.model, dynamic_ncols=True) if tqdm else None
    model.train()
    t0, s0, ema = time.perf_counter(), step, None
    in_update = False                      # between the first optimizer step and step += 1
    try:
        while step < total and not stopped:
            batch = sampler.sample()
            with _autocast(device, cfg.bf16):
                loss = net(batch)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            in_update = True
            for o in opts:
                o.step()
            step += 1
            in_update = False
            lv = ctx.mean(float(loss.detach()), device)   # the same value on every rank
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss became {lv} at step {step}")
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            if callback is not None:
                callback(step, lv)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    el = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{ema:.3f}",
                                    samples_s=f"{(step - s0) * global_batch / el:.0f}",
                                    best_r50=f"{best:.4f}" if best >= 0 else "-")
            if step % cfg.eval_every == 0 or step == total:
                m = _eval(model, ds.valid, cfg, device, cfg.eval_users, ctx.enabled)
                rec = {"step": step, "split": "valid", "loss": ema, **m}
                history.append(rec)
                log_record(rec)
                key = m.get("recall@50", m[f"recall@{max(cfg.topk)}"])
                if key > best:
                    best, bad = key, 0
                    checkpoint(best_path)
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        stopped = True
                        if ctx.is_main:
                            log.info("early stopping at step %d (best valid recall@50 %.4f)",
                                     step, best)
                checkpoint(last_path)
    except KeyboardInterrupt:
        # nothing lost: the state after the last completed step goes to last.pt (rank 0; not
        # with a sharded table, whose gather would need every rank)
        if bar is not None:
            bar.close()
        if in_update or model.catalog_shard is not None:
            log.warning("interrupted during step %d; %s", step + 1,
                        f"{last_path} holds step {saved_step}" if saved_step is not None
                        else "no checkpoint was written")
        elif ctx.is_main:
            checkpoint(last_path)
            log.warning("interrupted after step %d: state saved to %s (continue with --resume)",
                        step, last_path)
        raise
    except Exception as e:
        if bar is not None:
            bar.close()
        if not ctx.enabled:
            raise
        where = (f"{last_path} holds the last complete state (step {saved_step}); continue "
                 "with --resume" if saved_step is not None else "no checkpoint was written yet")
        if _dist.is_collective_failure(e):
            raise RuntimeError(
                f"rank {ctx.rank}/{ctx.world_size}: a collective failed during step {step + 1}: "
                f"another rank has most likely stopped (see its log). {where}. "
                f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from e
        log.error("rank %d/%d: training failed at step %d (%s: %s); %s", ctx.rank,
                  ctx.world_size, step, type(e).__name__, e, where)
        raise
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    sps = (step - s0) / elapsed if step > s0 else float("nan")
    ctx.barrier(device)                    # rank 0 has finished writing best.pt
    # test with the best checkpoint
    if os.path.exists(best_path):
        _load_model_state(model, torch.load(best_path, map_location=device,
                                            weights_only=False)["model"])
    test = _eval(model, ds.test, cfg, device, None, ctx.enabled)
    pop = evaluate_popularity(ds.item_counts, ds.test, cfg.topk)
    log_record({"step": step, "split": "test", **test})
    exporter = model
    if cfg.export and model.catalog_shard is not None:
        # the whole table exists on rank 0's host only, for the export (collective gather)
        state, _ = _full_states(model, [])
        if ctx.is_main:
            exporter = build_model(cfg.model, ds.n_items, **model_kwargs(cfg))
            exporter.load_state_dict(state)
            exporter.generator = torch.Generator()
    if cfg.export and ctx.is_main:
        export_embeddings(exporter, ds.test, cfg, out,
                          device if exporter is model else torch.device("cpu"))
        if ds.item_category is not None:   # for `seqrec-fast plot` (t-SNE coloured by category)
            np.save(os.path.join(out, "item_category.npy"), ds.item_category)
    table = format_table({cfg.model: test, "most-popular": pop}, cfg.topk)
    if ctx.is_main:
        log.info("test metrics:\n%s", table)
    ctx.barrier(device)                    # every output file is complete when train returns
    return {"out_dir": out, "step": step, "best_valid": best, "test": test, "popularity": pop,
            "history": history, "steps_per_s": sps, "model": model, "table": table,
            "rank": ctx.rank, "world_size": ctx.world_size}


@torch.no_grad()
def export_embeddings(model, split, cfg: TrainConfig, out: str, device) -> dict:
    """Write item_emb.npy (n_items, d), user_emb_test.npy (U, K, d) and, with faiss, items.faiss
    (an IndexFlatIP over items 1..n_items-1: faiss id i is item i+1). Returns the paths."""
    model.eval()
    items = model.item_embeddings().detach().float().cpu().numpy()
    paths = {"item_emb": os.path.join(out, "item_emb.npy")}
    np.save(paths["item_emb"], items)
    ues = []
    for hist, mask, _, _ in eval_batches(split, max_len=cfg.max_len, padding=cfg.padding,
                                         device=device):
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


def load_checkpoint(path: str, device="auto"):
    """-> (model, TrainConfig, dataset) from a checkpoint written by ``train``."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    dev = _device(device)
    ck = torch.load(path, map_location=dev, weights_only=False)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in ck["config"].items() if k in fields})
    ds = _dataset(cfg)
    model = build_model(cfg.model, ds.n_items, **model_kwargs(cfg)).to(dev)
    model.load_state_dict(ck["model"])
    model.generator = torch.Generator(device=dev)
    return model, cfg, ds


def evaluate_checkpoint(path: str, split: str = "test", device="auto", retriever="auto",
                        faiss_index: str = "flat", faiss_nlist: Optional[int] = None,
                        faiss_nprobe: Optional[int] = None, faiss_hnsw_m: int = 32,
                        faiss_ef_search: int = 128) -> dict:
    """Evaluate a checkpoint (written at any world size) on "valid" or "test" -> metrics dict.
    ``faiss_*``: the retrieval index (see ``retrieval.Retriever``)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    model, cfg, ds = load_checkpoint(path, device)
    cfg.retriever = retriever
    cfg.faiss_index, cfg.faiss_nlist, cfg.faiss_nprobe = faiss_index, faiss_nlist, faiss_nprobe
    cfg.faiss_hnsw_m, cfg.faiss_ef_search = faiss_hnsw_m, faiss_ef_search
    return _eval(model, getattr(ds, split), cfg, next(model.parameters()).device)
