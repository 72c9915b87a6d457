"""Training loop (Python API): ``train(TrainConfig(...))`` or ``train(model="comirec-dr", ...)``.

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

from .data import TrainSampler, eval_batches, load_dataset
from .evaluate import Retriever, evaluate, evaluate_popularity, faiss_available
from .metrics import format_table
from .models import build_model
from .optim import build_optimizers

log = logging.getLogger("seqrec_fast.train")


@dataclass
class TrainConfig:
    """Every option of a run (CLI flags have the same names with dashes).

    Defaults follow ComiRec (d 64, K 4, L 20, batch 128, Adam 1e-3, 10×batch sampled negatives,
    hard readout, early stopping on validation Recall@50) and are sized so that the default CPU
    demo (ComiRec-DR on the default synthetic data) finishes in about a minute.
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
        self.topk = tuple(self.topk)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def _eval(model, split, cfg, device, max_users=None):
    """Evaluation with a fixed generator (MIND's random logits) so that it leaves the training
    RNG streams untouched and gives the same numbers every time."""
    saved = model.generator
    g = torch.Generator(device=device)
    g.manual_seed(12345)
    model.generator = g
    try:
        return evaluate(model, split, max_len=cfg.max_len, padding=cfg.padding, ks=cfg.topk,
                        retriever=cfg.retriever, device=device, max_users=max_users)
    finally:
        model.generator = saved


def _autocast(device, enabled):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _save(path, **obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(config: Optional[TrainConfig] = None, **overrides) -> dict:
    """Train a model; returns {"out_dir", "step", "best_valid", "test", "popularity", "history",
    "steps_per_s", "model"}. ``overrides`` are TrainConfig fields."""
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = config
    device = _device(cfg.device)
    out = cfg.out_dir or os.path.join("runs", cfg.model)
    os.makedirs(out, exist_ok=True)
    ds = _dataset(cfg)
    log.info("data: %s", ds.summary())
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.n_items, **model_kwargs(cfg)).to(device)
    model.generator = torch.Generator(device=device)
    model.generator.manual_seed(cfg.seed + 1)
    sampler = TrainSampler(ds.train_indptr, ds.train_items, batch_size=cfg.batch_size,
                           max_len=cfg.max_len, padding=cfg.padding, device=device,
                           seed=cfg.seed)
    opts = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.sparse_lr)
    total = cfg.steps
    if cfg.epochs is not None:
        total = max(1, int(math.ceil(cfg.epochs * int(ds.train_indptr[-1]) / cfg.batch_size)))
    step, best, bad, history, stopped = 0, -1.0, 0, [], False
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    if cfg.resume:
        if not os.path.exists(last_path):
            raise ValueError(f"resume=True but {last_path} does not exist")
        ck = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        for o, s in zip(opts, ck["optimizers"]):
            o.load_state_dict(s)
        sampler.load_state_dict(ck["sampler"])
        model.generator.set_state(ck["model_generator"])
        step, best, bad, history, stopped = (ck["step"], ck["best"], ck["bad"], ck["history"],
                                             ck.get("stopped", False))
        log.info("resumed from %s at step %d", last_path, step)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1, default=str)
    metrics_path = os.path.join(out, "metrics.jsonl")

    def checkpoint(path):
        _save(path, model=model.state_dict(), optimizers=[o.state_dict() for o in opts],
              sampler=sampler.state_dict(), model_generator=model.generator.get_state(),
              step=step, best=best, bad=bad, history=history, stopped=stopped,
              config=dataclasses.asdict(cfg), n_items=ds.n_items)

    def log_record(rec):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=total, initial=step, disable=not cfg.progress or tqdm is None,
               desc=cfg.model, dynamic_ncols=True) if tqdm else None
    model.train()
    t0, s0, ema = time.perf_counter(), step, None
    while step < total and not stopped:
        batch = sampler.sample()
        with _autocast(device, cfg.bf16):
            loss = model.loss(batch)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss became {lv} at step {step}")
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{ema:.3f}", samples_s=f"{(step - s0) * cfg.batch_size / el:.0f}",
                                best_r50=f"{best:.4f}" if best >= 0 else "-")
        if step % cfg.eval_every == 0 or step == total:
            m = _eval(model, ds.valid, cfg, device, cfg.eval_users)
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
                    log.info("early stopping at step %d (best valid recall@50 %.4f)", step, best)
            checkpoint(last_path)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    sps = (step - s0) / elapsed if step > s0 else float("nan")
    # test with the best checkpoint
    if os.path.exists(best_path):
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=False)["model"])
    test = _eval(model, ds.test, cfg, device)
    pop = evaluate_popularity(ds.item_counts, ds.test, cfg.topk)
    log_record({"step": step, "split": "test", **test})
    if cfg.export:
        export_embeddings(model, ds.test, cfg, out, device)
        if ds.item_category is not None:   # for `seqrec-fast plot` (t-SNE coloured by category)
            np.save(os.path.join(out, "item_category.npy"), ds.item_category)
    table = format_table({cfg.model: test, "most-popular": pop}, cfg.topk)
    log.info("test metrics:\n%s", table)
    return {"out_dir": out, "step": step, "best_valid": best, "test": test, "popularity": pop,
            "history": history, "steps_per_s": sps, "model": model, "table": table}


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


def evaluate_checkpoint(path: str, split: str = "test", device="auto", retriever="auto") -> dict:
    """Evaluate a checkpoint on "valid" or "test" -> metrics dict."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    model, cfg, ds = load_checkpoint(path, device)
    cfg.retriever = retriever
    return _eval(model, getattr(ds, split), cfg, next(model.parameters()).device)
