"""Command line: ``seqrec-fast train|evaluate|plot|info|sampler-bench`` (also
``python -m seqrec_fast``).

  seqrec-fast train --model comirec-dr --data synthetic          # the CPU demo
  seqrec-fast train --model mind --data log.csv --loss full --steps 20000 --device cuda --bf16
  seqrec-fast train --data ratings.csv --user-col userId --item-col movieId
  seqrec-fast train --out-dir runs/dr --resume --steps 3000      # continue runs/dr/last.pt
  seqrec-fast evaluate runs/dr/best.pt --split test --faiss-index ivf
  torchrun --nproc_per_node 4 -m seqrec_fast train --model comirec-sa --data log.csv   # DDP
  seqrec-fast plot runs/comirec-dr runs/youtubednn --out plots   # t-SNE + curves (needs [plot])
  seqrec-fast info                                  # versions, extension, backend of each op

A mistake in the options or the data (a missing file, a bad value) is reported in one line and
exits with status 2; -v shows the full traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from typing import List, Optional

from . import train as _train
from .backend import BACKENDS
from .data.loaders import FORMATS
from .data.preprocess import SPLITS
from .models.base import LOSSES, READOUTS, SAMPLERS
from .models.models import MODELS, ComiRecDR
from .optim import OPTIMIZERS
from .retrieval import INDEXES, RETRIEVERS


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module doc as written, and "(default: ...)" after every option's help."""


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"n_items\": 1000}}', got {s!r}")
    return v


def _ratios(s: str) -> tuple:
    try:
        r = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers such as 0.8,0.1,0.1, got "
                                         f"{s!r}") from None
    if len(r) != 3 or min(r) < 0 or sum(r) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative numbers such as "
                                         f"0.8,0.1,0.1, got {s!r}")
    return r


def _none_or(kind):
    def parse(s: str):
        if s.lower() in ("none", "auto", ""):
            return None
        return kind(s)
    parse.__name__ = kind.__name__
    return parse


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _lambdas(s: str) -> list:
    """'0,0.05,0.1' -> [0.0, 0.05, 0.1]: finite numbers >= 0."""
    out = []
    for part in s.split(","):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of numbers >= 0, got "
                                             f"{s!r}") from None
        if not 0 <= v < float("inf"):
            raise argparse.ArgumentTypeError(f"every λ must be a finite number >= 0, got {part!r}")
        out.append(v)
    return out


def _sep(s: str) -> str:
    return {"\\t": "\t", "tab": "\t", "comma": ",", "space": " "}.get(s, s)


def _add_index_args(p) -> None:
    p.add_argument("--faiss-index", default="flat", choices=list(INDEXES),
                   help="retrieval index: exact flat or approximate ivf / hnsw")
    p.add_argument("--faiss-nlist", type=int, default=None,
                   help="ivf: number of lists (None: 4*sqrt(n), at most n/39)")
    p.add_argument("--faiss-nprobe", type=int, default=None,
                   help="ivf: lists probed per query (None: max(8, nlist/8))")
    p.add_argument("--faiss-hnsw-m", type=int, default=32, help="hnsw: neighbours per node")
    p.add_argument("--faiss-ef-search", type=int, default=128, help="hnsw: search breadth")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = _train.TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   choices=list(MODELS),
                   help="the recommender to train")
    g.add_argument("--dim", type=int, default=d.dim, help="embedding size d")
    g.add_argument("--num-interests", type=int, default=d.num_interests,
                   help="interests K per user (MIND, ComiRec)")
    g.add_argument("--max-len", type=int, default=d.max_len,
                   help="history length L: the last L items before the target")
    g.add_argument("--padding", default=d.padding, choices=["right", "left"],
                   help="side of the padding in a short history (ComiRec: right)")
    g.add_argument("--readout", default=d.readout, choices=list(READOUTS),
                   help="training readout: the interest closest to the target, or "
                        "softmax(score^p) (MIND)")
    g.add_argument("--readout-pow", type=float, default=d.readout_pow,
                   help="p of the pow readout")
    g.add_argument("--dynamic-k", action="store_true", help="MIND: dynamic interest number")
    g.add_argument("--bilinear-init", default=d.bilinear_init, choices=list(ComiRecDR.BILINEAR_INITS),
                   help="ComiRec-DR: start of the per-position maps (normal = ComiRec's N(0,1))")
    g.add_argument("--backend", default=d.backend,
                   choices=list(BACKENDS),
                   help="kernel backend of the fused ops")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data,
                   help="'synthetic' or an interaction log (.csv / .tsv / .inter / .txt / "
                        ".parquet / headerless files such as MovieLens u.data)")
    g.add_argument("--data-format", default=d.data_format,
                   choices=list(FORMATS),
                   help="file format (auto: from the extension)")
    g.add_argument("--user-col", default=d.user_col,
                   help="user column: a name, or a 0-based index in a file without header "
                        "(None: user_id / userId / user, or column 0)")
    g.add_argument("--item-col", default=d.item_col,
                   help="item column: a name or a 0-based index (None: item_id / itemId / "
                        "movieId / item, or column 1)")
    g.add_argument("--time-col", default=d.time_col,
                   help="timestamp column: a name or a 0-based index; 'none' = file order "
                        "(None: timestamp / time, or the last column of 3+; else file order)")
    g.add_argument("--sep", type=_sep, default=d.sep,
                   help="field separator, e.g. ',', '\\t' or '::' (None: from the extension, or "
                        "sniffed from the first line)")
    g.add_argument("--header", type=_none_or(_bool), default=d.header,
                   help="whether the first line names the columns (None: detected)")
    g.add_argument("--synthetic", default=d.synthetic, type=_json_object,
                   help='synthetic data: JSON arguments of the generator, e.g. '
                        '\'{"n_items": 100000}\'')
    g.add_argument("--k-core", type=int, default=d.k_core,
                   help="drop users and items with fewer interactions (iteratively)")
    g.add_argument("--cache-dir", default=d.cache_dir,
                   help="where preprocessed data sets are cached ('auto': $SEQREC_FAST_CACHE "
                        "or ~/.cache/seqrec_fast; 'none': no cache)")

    g = p.add_argument_group("split")
    g.add_argument("--split", default=d.split, choices=list(SPLITS),
                   help="held-out users (ComiRec) or every user's last items")
    g.add_argument("--split-ratios", type=_ratios, default=d.split_ratios,
                   help="train,valid,test shares of the users (--split user)")
    g.add_argument("--split-seed", type=int, default=d.split_seed,
                   help="seed of the user split")
    g.add_argument("--eval-history-frac", type=float, default=d.eval_history_frac,
                   help="share of a held-out user's history given as input (the rest are "
                        "the targets)")
    g.add_argument("--user-split", default=d.user_split,
                   help="a ready-made user split: a file of 'user,split' lines (split: train, "
                        "valid or test; users as in the data file)")
    g.add_argument("--item-categories", default=d.item_categories,
                   help="an item -> category map (ComiRec's item_cate.txt, RecBole's .item, or "
                        "a CSV with item and category columns): for Diversity@N and "
                        "'evaluate --diversity'")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", default=d.loss, choices=list(LOSSES),
                   help="sampled softmax over shared negatives, or full-catalog softmax")
    g.add_argument("--neg-ratio", type=int, default=d.neg_ratio,
                   help="shared negatives per batch = neg_ratio x batch size")
    g.add_argument("--num-negatives", type=int, default=d.num_negatives,
                   help="a fixed number of shared negatives (overrides --neg-ratio)")
    g.add_argument("--neg-sampler", default=d.neg_sampler, choices=list(SAMPLERS),
                   help="negative distribution (log-uniform over popularity ranks)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="batch size (per rank under torchrun)")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    g.add_argument("--epochs", type=float, default=d.epochs,
                   help="train for this many passes over the training interactions "
                        "(overrides --steps)")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate (dense Adam)")
    g.add_argument("--optimizer", default=d.optimizer,
                   choices=list(OPTIMIZERS),
                   help="adam, or a row-wise optimizer for the item table (sparse updates)")
    g.add_argument("--sparse-lr", type=float, default=d.sparse_lr,
                   help="learning rate of the row-wise optimizer (None: 0.05 for Adagrad, "
                        "--lr for Adam)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the training streams")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")

    g = p.add_argument_group("validation and test")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="validate every N steps")
    g.add_argument("--eval-users", type=int, default=d.eval_users,
                   help="validate on the first N validation users (None: all)")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="stop after N validations without improvement")
    g.add_argument("--log-every", type=int, default=d.log_every,
                   help="log the mean training loss every N steps")
    g.add_argument("--retriever", default=d.retriever,
                   choices=list(RETRIEVERS),
                   help="retrieval: fused exact top-N (auto with a flat index), chunked torch "
                        "matmul + top-k, or faiss")
    _add_index_args(g)

    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=d.out_dir, help="outputs (None: runs/<model>)")
    g.add_argument("--resume", action="store_true",
                   help="continue <out-dir>/last.pt: model, data and split come from it; "
                        "--steps, --lr and other run options may change")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (None: torch's)")
    g.add_argument("--no-export", action="store_true",
                   help="skip the embedding (and faiss index) export")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                   help="under torchrun: seconds a collective waits for a silent rank")
    g.add_argument("--shard-catalog", action="store_true",
                   help="under torchrun: split the item table by rows across the ranks")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seqrec-fast", description=__doc__, formatter_class=_Help)
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="debug logging, and full tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", formatter_class=_Help,
                                   help="train a model, evaluate it, export embeddings"))
    ev = sub.add_parser("evaluate", formatter_class=_Help,
                        help="evaluate a checkpoint (and the most-popular baseline)")
    ev.add_argument("checkpoint", help="a best.pt or last.pt written by train")
    ev.add_argument("--split", default="test", choices=["valid", "test"], help="users to score")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ev.add_argument("--retriever", default="auto", choices=list(RETRIEVERS),
                    help="retrieval: fused exact top-N (auto with a flat index), chunked torch "
                         "matmul + top-k, or faiss")
    ev.add_argument("--diversity", default=None, type=_lambdas,
                    help="comma list of λ >= 0: one row per λ of ComiRec's controllable "
                         "aggregation (Recall, NDCG, HitRate, Diversity); needs item categories")
    _add_index_args(ev)
    pl = sub.add_parser("plot", formatter_class=_Help,
                        help="t-SNE of item embeddings and training curves (PNG; needs "
                             "matplotlib and scikit-learn)")
    pl.add_argument("runs", nargs="+", help="run folder(s) written by train")
    pl.add_argument("--out", default=None, help="output folder (None: the first run folder)")
    pl.add_argument("--no-tsne", action="store_true", help="training curves only")
    pl.add_argument("--points", type=int, default=2000,
                    help="t-SNE of the N most popular items")
    pl.add_argument("--categories", type=int, default=12,
                    help="colour the N largest categories, the rest grey")
    pl.add_argument("--seed", type=int, default=0, help="t-SNE seed")
    inf = sub.add_parser("info", formatter_class=_Help,
                         help="versions, devices and which backend runs each op here")
    inf.add_argument("--json", action="store_true", help="seqrec_fast.info() as JSON")
    sb = sub.add_parser("sampler-bench", formatter_class=_Help,
                        help="batches/s of the training-batch sampler alone")
    sb.add_argument("--data", default="synthetic", help="'synthetic' or an interaction log")
    sb.add_argument("--synthetic", default={}, type=_json_object,
                    help="synthetic data: JSON arguments of the generator")
    sb.add_argument("--batch-size", type=int, default=1024, help="batch size")
    sb.add_argument("--max-len", type=int, default=50, help="history length")
    sb.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sb.add_argument("--batches", type=int, default=200, help="batches to time")
    return ap


_NOT_CONFIG = {"threads", "no_export", "no_progress", "verbose", "command"}


def _explicit(argv: List[str]) -> set:
    """The train options given on the command line (argparse defaults suppressed)."""
    ap = build_parser()
    for action in ap._subparsers._group_actions[0].choices["train"]._actions:
        action.default = argparse.SUPPRESS
    a = ap.parse_args(argv)
    out = set(vars(a)) - _NOT_CONFIG
    if "no_export" in vars(a):
        out.add("export")
    if "no_progress" in vars(a):
        out.add("progress")
    return out


def _config_kwargs(a) -> dict:
    fields = {f.name for f in dataclasses.fields(_train.TrainConfig)}
    kw = {k: v for k, v in vars(a).items() if k in fields}
    kw["export"] = not a.no_export
    kw["progress"] = not a.no_progress
    if isinstance(kw.get("time_col"), str) and kw["time_col"].lower() == "none":
        kw["time_col"] = "none"
    if isinstance(kw.get("cache_dir"), str) and kw["cache_dir"].lower() == "none":
        kw["cache_dir"] = None
    return kw


_FIELDS = sorted((f.name for f in dataclasses.fields(_train.TrainConfig)), key=len, reverse=True)


def _flagify(msg: str) -> str:
    """Python field names in an error message -> the command-line flags."""
    for name in _FIELDS:
        msg = re.sub(rf"(?<![\w'-]){name}(?= must| =|=| '| \()", "--" + name.replace("_", "-"),
                     msg)
    return msg


def _fail(command: str, exc: BaseException) -> int:
    print(f"seqrec-fast {command}: error: {_flagify(str(exc))}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    level = logging.DEBUG if args.verbose else logging.INFO
    if rank not in ("", "0") and not args.verbose:
        level = logging.WARNING          # under torchrun, rank 0 speaks for the run
    logging.basicConfig(level=level, format=(f"[rank {rank}] " if rank not in ("", "0") else "")
                        + "%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args, argv)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        if args.verbose:
            raise
        return _fail(args.command, exc)


def _run(args, argv) -> int:
    if args.command == "train":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        kw = _config_kwargs(args)
        explicit = _explicit(argv)
        if args.resume:                  # the checkpoint's settings, except what was given
            kw = {k: v for k, v in kw.items() if k in explicit}
        res = _train.train(**kw)         # builds (validates) the TrainConfig before any work
        if res["rank"] != 0:
            return 0
        sps = res["steps_per_s"]
        speed = f" at {sps:.1f} steps/s" if sps is not None else " (nothing left to train)"
        print(f"\n{res['step']} steps{speed}, best valid recall@50 {res['best_valid']:.4f}; "
              f"outputs in {res['out_dir']}\n")
        print(res["table"])
        return 0
    if args.command == "evaluate":
        rows, pop = _train.evaluate_checkpoint(
            args.checkpoint, args.split, args.device, args.retriever, args.faiss_index,
            args.faiss_nlist, args.faiss_nprobe, args.faiss_hnsw_m, args.faiss_ef_search,
            with_popularity=True, diversity=args.diversity)
        from .metrics import format_table

        name = f"{args.checkpoint} ({args.split})"
        if args.diversity is None:
            table = {name: rows}
        else:
            table = {f"{name} λ={lam:g}": m for lam, m in zip(args.diversity, rows)}
        table["most-popular"] = pop
        print(format_table(table))
        return 0
    if args.command == "plot":
        from .plot import plot_runs

        paths = plot_runs(args.runs, args.out, tsne=not args.no_tsne, n_points=args.points,
                          max_categories=args.categories, seed=args.seed)
        for p in paths:
            print(p)
        return 0
    if args.command == "info":
        print(_info_text(args.json))
        return 0
    if args.command == "sampler-bench":
        from .data import TrainSampler, load_dataset

        ds = load_dataset(args.data,
                          synthetic=args.synthetic if args.data == "synthetic" else None)
        s = TrainSampler(ds.train_indptr, ds.train_items, batch_size=args.batch_size,
                         max_len=args.max_len, device=_train._device(args.device))
        print(f"{s.throughput(args.batches):.1f} batches/s (batch {args.batch_size}, "
              f"max_len {args.max_len}, {s.device})")
        return 0
    return 2  # pragma: no cover


def _info_text(as_json: bool) -> str:
    """``seqrec_fast.info()`` as JSON, or as a short report: versions, devices, the C++
    extension, and per op which backends can run and which one ``auto`` picks on each device."""
    import json

    import torch

    from . import OPS, backend, info

    i = info()
    if as_json:
        return json.dumps(i, indent=1)
    lines = [f"seqrec_fast {i['seqrec_fast']}  python {i['python']}  torch {i['torch']}"
             f" (CUDA {i['torch_cuda'] or 'none'})  triton {i['triton'] or 'not installed'}"
             + ("  [TRITON_INTERPRET=1]" if i["triton_interpret"] else ""),
             "devices: " + ", ".join(i["devices"]),
             "C++ extension: " + ("built" + (" with CUDA kernels" if i["extension_cuda"] else
                                             " (CPU kernels only)") if i["extension"]
                                  else f"not built ({i['extension_error']})"),
             "distributed: " + (", ".join(i["distributed"]) or "not available"), ""]
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    head = "| op | " + " | ".join(["eager", "cpp", "triton", "cuda"]) + " | " + " | ".join(
        f"auto on {d.type}" for d in devs) + " |"
    lines += [head, "|" + "---|" * (5 + len(devs))]
    for op in OPS:
        flags = i["backends"][op]
        picks = []
        for d in devs:
            try:
                picks.append(backend.resolve(op, "auto", d))
            except (RuntimeError, ValueError) as e:
                picks.append(f"error: {e}")
        lines.append(f"| {op} | " + " | ".join("yes" if flags[b] else "-" for b in
                                                ("eager", "cpp", "triton", "cuda"))
                     + " | " + " | ".join(picks) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
