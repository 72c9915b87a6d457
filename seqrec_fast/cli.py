"""Command line: ``seqrec-fast train|evaluate|plot|sampler-bench`` (also ``python -m seqrec_fast``).

  seqrec-fast train --model comirec-dr --data synthetic          # the CPU demo (~15 s on 2 cores)
  seqrec-fast train --model mind --data log.csv --loss full --steps 20000 --device cuda --bf16
  seqrec-fast train --out-dir runs/dr --resume                   # continue from runs/dr/last.pt
  seqrec-fast evaluate runs/dr/best.pt --split test --faiss-index ivf
  torchrun --nproc_per_node 4 -m seqrec_fast train --model comirec-sa --data log.csv   # DDP
  seqrec-fast plot runs/comirec-dr runs/youtubednn --out plots   # t-SNE + curves (needs [plot])
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import List, Optional

from . import train as _train


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _add_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--faiss-index", default="flat", choices=["flat", "ivf", "hnsw"],
                   help="faiss retrieval index: exact flat (default) or approximate ivf / hnsw")
    p.add_argument("--faiss-nlist", type=int, default=None, help="ivf lists (default 4*sqrt(n))")
    p.add_argument("--faiss-nprobe", type=int, default=None,
                   help="ivf lists probed (default max(8, nlist/8))")
    p.add_argument("--faiss-hnsw-m", type=int, default=32, help="hnsw neighbours per node")
    p.add_argument("--faiss-ef-search", type=int, default=128, help="hnsw search breadth")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = _train.TrainConfig()
    p.add_argument("--model", default=d.model,
                   choices=["youtubednn", "gru4rec", "mind", "comirec-dr", "comirec-sa"])
    p.add_argument("--data", default=d.data, help="'synthetic' or a log file (.csv/.tsv/.inter/.txt/.parquet)")
    p.add_argument("--data-format", default=d.data_format,
                   choices=["auto", "csv", "tsv", "recbole", "comirec", "parquet"])
    p.add_argument("--synthetic", default="{}", type=json.loads,
                   help='JSON arguments of the synthetic generator, e.g. \'{"n_items": 100000}\'')
    p.add_argument("--k-core", type=int, default=d.k_core)
    p.add_argument("--split", default=d.split, choices=["user", "leave_last_out"])
    p.add_argument("--cache-dir", default=d.cache_dir)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--num-interests", type=int, default=d.num_interests)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--padding", default=d.padding, choices=["right", "left"])
    p.add_argument("--loss", default=d.loss, choices=["sampled", "full"])
    p.add_argument("--neg-ratio", type=int, default=d.neg_ratio,
                   help="shared negatives per batch = neg_ratio x batch size")
    p.add_argument("--num-negatives", type=int, default=None, help="fixed negative count")
    p.add_argument("--neg-sampler", default=d.neg_sampler, choices=["log_uniform", "uniform"])
    p.add_argument("--readout", default=d.readout, choices=["hard", "pow"])
    p.add_argument("--readout-pow", type=float, default=d.readout_pow)
    p.add_argument("--dynamic-k", action="store_true", help="MIND: dynamic interest number")
    p.add_argument("--bilinear-init", default=d.bilinear_init, choices=["identity", "normal"],
                   help="ComiRec-DR: start of the per-position maps (normal = ComiRec's N(0,1))")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--epochs", type=float, default=None, help="overrides --steps")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", default=d.optimizer,
                   choices=["adam", "rowwise_adagrad", "rowwise_adam"])
    p.add_argument("--sparse-lr", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-users", type=int, default=None)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--device", default=d.device)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", default=d.backend, choices=["auto", "triton", "cuda", "cpp", "eager"])
    p.add_argument("--retriever", default=d.retriever, choices=["auto", "torch", "faiss"])
    _add_index_args(p)
    p.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                   help="under torchrun: seconds a collective waits for a silent rank")
    p.add_argument("--shard-catalog", action="store_true",
                   help="under torchrun: split the item table by rows across the ranks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", default=None, help="default runs/<model>")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    p.add_argument("--no-export", action="store_true", help="skip the embedding export")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seqrec-fast", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="train a model, evaluate it, export embeddings"))
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--split", default="test", choices=["valid", "test"])
    ev.add_argument("--device", default="auto")
    ev.add_argument("--retriever", default="auto", choices=["auto", "torch", "faiss"])
    _add_index_args(ev)
    pl = sub.add_parser("plot", help="t-SNE of item embeddings by category and training curves "
                                     "(PNG; needs matplotlib and scikit-learn)")
    pl.add_argument("runs", nargs="+", help="run folder(s) written by train")
    pl.add_argument("--out", default=None, help="output folder (default: the first run folder)")
    pl.add_argument("--no-tsne", action="store_true", help="training curves only")
    pl.add_argument("--points", type=int, default=2000,
                    help="t-SNE of the N most popular items (default 2000)")
    pl.add_argument("--categories", type=int, default=12,
                    help="colour the N largest categories, the rest grey (default 12)")
    pl.add_argument("--seed", type=int, default=0)
    sb = sub.add_parser("sampler-bench", help="batches/s of the training-batch sampler alone")
    sb.add_argument("--data", default="synthetic")
    sb.add_argument("--synthetic", default="{}", type=json.loads)
    sb.add_argument("--batch-size", type=int, default=1024)
    sb.add_argument("--max-len", type=int, default=50)
    sb.add_argument("--device", default="auto")
    sb.add_argument("--batches", type=int, default=200)
    return ap


def _config_from_args(a) -> _train.TrainConfig:
    fields = {f.name for f in dataclasses.fields(_train.TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in fields}
    kw["export"] = not a.no_export
    kw["progress"] = not a.no_progress
    return _train.TrainConfig(**kw)


def main(argv: Optional[List[str]] = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    level = logging.DEBUG if args.verbose else logging.INFO
    if rank not in ("", "0") and not args.verbose:
        level = logging.WARNING          # under torchrun, rank 0 speaks for the run
    logging.basicConfig(level=level, format=(f"[rank {rank}] " if rank not in ("", "0") else "")
                        + "%(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            cfg = _config_from_args(args)
        except (ValueError, TypeError) as exc:
            print(f"seqrec-fast: error: {exc}", file=sys.stderr)
            return 2
        res = _train.train(cfg)
        if res["rank"] != 0:
            return 0
        print(f"\n{res['step']} steps at {res['steps_per_s']:.1f} steps/s, best valid recall@50 "
              f"{res['best_valid']:.4f}; outputs in {res['out_dir']}\n")
        print(res["table"])
        return 0
    if args.command == "evaluate":
        from .metrics import format_table

        m = _train.evaluate_checkpoint(args.checkpoint, args.split, args.device, args.retriever,
                                       args.faiss_index, args.faiss_nlist, args.faiss_nprobe,
                                       args.faiss_hnsw_m, args.faiss_ef_search)
        print(format_table({f"{args.checkpoint} ({args.split})": m}))
        return 0
    if args.command == "plot":
        from .plot import plot_runs

        try:
            paths = plot_runs(args.runs, args.out, tsne=not args.no_tsne, n_points=args.points,
                              max_categories=args.categories, seed=args.seed)
        except (ImportError, ValueError) as exc:
            print(f"seqrec-fast plot: error: {exc}", file=sys.stderr)
            return 2
        for p in paths:
            print(p)
        return 0
    if args.command == "sampler-bench":
        from .data import TrainSampler, load_dataset

        ds = load_dataset(args.data, **(args.synthetic if args.data == "synthetic" else {}))
        s = TrainSampler(ds.train_indptr, ds.train_items, batch_size=args.batch_size,
                         max_len=args.max_len, device=_train._device(args.device))
        print(f"{s.throughput(args.batches):.1f} batches/s (batch {args.batch_size}, "
              f"max_len {args.max_len}, {s.device})")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
