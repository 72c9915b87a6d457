"""``seqrec-fast plot``: pictures of a training run (optional extra: ``pip install 'seqrec_fast[plot]'``,
i.e. matplotlib and scikit-learn).

* ``tsne.png``: t-SNE of the item embeddings (``item_emb.npy`` of the run) of the 2000 most
  popular items, coloured by planted cluster / category (the largest categories get their own colour,
  the rest are grey). On the synthetic data, a model that learned the planted interests shows
  one tight blob per cluster.
* ``curves.png``: validation Recall/NDCG/HitRate@N and the training loss (the "train" records,
  logged every ``log_every`` steps) against the step, from ``metrics.jsonl`` (several runs
  overlaid when several run folders are given); the test result of each run is drawn as a star
  at the step of the checkpoint that was tested (the best validation). The legend sits below
  the panels, clear of the curves.
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional, Sequence

import numpy as np

log = logging.getLogger("seqrec_fast.plot")


def _require():
    """-> (matplotlib.pyplot, sklearn.manifold.TSNE), or an ImportError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise ImportError(f"seqrec-fast plot needs matplotlib and scikit-learn ({exc}); install "
                          f"them with: pip install 'seqrec_fast[plot]'  (or pip install "
                          f"matplotlib scikit-learn)") from exc
    return plt, TSNE


def read_metrics(path: str) -> List[dict]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line; blank lines skipped)."""
    if not os.path.isfile(path):
        raise ValueError(f"metrics file {path!r} does not exist")
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON record ({exc})") from exc
    return out


def item_categories(run_dir: str) -> Optional[np.ndarray]:
    """(n_items,) int64 category of each item id (-1 unknown) for a run: ``item_category.npy``
    when the run exported it, else rebuilt from the run's dataset (``config.json``); None when
    the data has no categories."""
    p = os.path.join(run_dir, "item_category.npy")
    if os.path.isfile(p):
        return np.load(p)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    from .train import config_from_dict, run_dataset

    with open(cfg_path) as f:
        raw = json.load(f)
    try:
        return run_dataset(config_from_dict(raw, where=cfg_path)).item_category
    except (ValueError, OSError) as exc:     # the data has moved: plot without colours
        log.warning("no item categories for %s: %s", run_dir, exc)
        return None


def _run_data(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f).get("data")
    except (OSError, ValueError):
        return None


def plot_tsne(item_emb: np.ndarray, categories: Optional[np.ndarray], out_png: str, *,
              n_points: int = 2000, max_categories: int = 12, seed: int = 0,
              title: str = "", label: str = "cluster") -> str:
    """t-SNE of ``item_emb`` (n_items, d) rows 1..n_points (ids are popularity sorted, so these
    are the most popular items; row 0 is padding) coloured by ``categories`` (n_items,): the
    ``max_categories`` most frequent categories among the plotted items get a colour each, the
    others are grey; ``label`` names them in the legend. Returns ``out_png``."""
    plt, TSNE = _require()
    item_emb = np.asarray(item_emb, dtype=np.float32)
    if item_emb.ndim != 2 or item_emb.shape[0] < 3:
        raise ValueError(f"item_emb must be (n_items >= 3, d), got {item_emb.shape}")
    if categories is not None and len(categories) != item_emb.shape[0]:
        raise ValueError(f"categories has {len(categories)} entries but item_emb has "
                         f"{item_emb.shape[0]} rows")
    n = min(int(n_points), item_emb.shape[0] - 1)
    x = item_emb[1:n + 1]
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
              ).fit_transform(x)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    if categories is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, c="tab:blue", alpha=0.6, linewidths=0)
    else:
        cat = np.asarray(categories)[1:n + 1]
        vals, cnt = np.unique(cat[cat >= 0], return_counts=True)
        top = vals[np.argsort(-cnt, kind="stable")][:max_categories]
        other = ~np.isin(cat, top)
        ax.scatter(xy[other, 0], xy[other, 1], s=3, c="lightgrey", alpha=0.5, linewidths=0,
                   label=f"other ({int(other.sum())} items)")
        cmap = plt.get_cmap("tab20" if len(top) > 10 else "tab10")
        for j, c in enumerate(top):
            sel = cat == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=7, color=cmap(j % cmap.N), alpha=0.9,
                       linewidths=0, label=f"{label} {int(c)}")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2,
                  frameon=False)
    ax.set_title(title or f"t-SNE of the {n} most popular item embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def loss_curve(records: Sequence[dict]):
    """-> (steps, losses) of the training loss: the "train" records (mean loss over each
    ``log_every`` window), or, for runs logged before those existed, the smoothed loss of the
    validation records."""
    pts = [(r["step"], r["loss"]) for r in records
           if r.get("split") == "train" and r.get("loss") is not None]
    if not pts:
        pts = [(r["step"], r["loss"]) for r in records
               if r.get("split") == "valid" and r.get("loss") is not None]
    return tuple(zip(*pts)) if pts else ((), ())


def tested_point(records: Sequence[dict], key: str):
    """-> (step, value) of the last test record's ``key`` at the step of the checkpoint that
    was tested (``checkpoint_step``; for older logs the best validation step by ``key``'s
    recall), or None."""
    tests = [r for r in records if r.get("split") == "test" and key in r]
    if not tests:
        return None
    t = tests[-1]
    step = t.get("checkpoint_step")
    if step is None:
        valid = [r for r in records if r.get("split") == "valid" and r["step"] <= t["step"]]
        k = key.split("@")[-1]
        metric = f"recall@{k}"
        best = max(valid, key=lambda r: r.get(metric, -1.0), default=None)
        step = best["step"] if best is not None else t["step"]
    return step, t[key]


def curves_figure(runs: Sequence[tuple], *, ks: Sequence[int] = (20, 50)):
    """The matplotlib figure of :func:`plot_curves`."""
    plt, _ = _require()
    if not runs:
        raise ValueError("runs is empty: nothing to plot")
    k = max(ks)
    panels = [f"recall@{k}", f"ndcg@{k}", f"hitrate@{k}", "loss"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), dpi=110)
    cmap = plt.get_cmap("tab10")
    handles = []
    for j, (label, recs) in enumerate(runs):
        valid = [r for r in recs if r.get("split") == "valid"]
        color = cmap(j % 10)
        for ax, key in zip(axes, panels):
            if key == "loss":
                s, v = loss_curve(recs)
                if s:
                    ax.plot(s, v, "-", lw=1.2, color=color)
                continue
            pts = [(r["step"], r[key]) for r in valid if r.get(key) is not None]
            if pts:
                s, v = zip(*pts)
                line, = ax.plot(s, v, "-o", ms=3, color=color, label=label)
                if ax is axes[0]:
                    handles.append(line)
            tp = tested_point(recs, key)
            if tp is not None:
                ax.plot([tp[0]], [tp[1]], "*", ms=11, color=color)
    for ax, key in zip(axes, panels):
        ax.set_title("training loss" if key == "loss" else f"valid {key} (★ test)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    if handles:      # below the panels: never over a curve
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


def plot_curves(runs: Sequence[tuple], out_png: str, *, ks: Sequence[int] = (20, 50)) -> str:
    """Training curves of one or more runs. runs: [(label, records from read_metrics)].
    Panels: validation recall@k, ndcg@k, hitrate@k for the largest k (★: the test result at
    the tested checkpoint's step), and the training loss. Returns ``out_png``."""
    plt, _ = _require()
    fig = curves_figure(runs, ks=ks)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def tsne_title(label: str, categories: Optional[np.ndarray], kind: str) -> str:
    """The t-SNE picture's title: "by <kind>" only when there are categories to colour by."""
    if categories is None or not (np.asarray(categories) >= 0).any():
        return f"{label}: t-SNE of item embeddings (no categories in the data)"
    what = "planted cluster" if kind == "cluster" else kind
    return f"{label}: t-SNE of item embeddings by {what}"


def plot_runs(run_dirs: Sequence[str], out_dir: Optional[str] = None, *, tsne: bool = True,
              n_points: int = 2000, max_categories: int = 12, seed: int = 0) -> List[str]:
    """The CLI's work: ``curves.png`` for all runs together and ``tsne-<run>.png`` per run
    (``tsne.png`` when one run), written to ``out_dir`` (default: the first run folder).
    Returns the written paths."""
    _require()
    if not run_dirs:
        raise ValueError("give at least one run folder")
    for d in run_dirs:
        if not os.path.isdir(d):
            raise ValueError(f"run folder {d!r} does not exist")
    out_dir = out_dir or run_dirs[0]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    runs = []
    for d in run_dirs:
        label = os.path.basename(os.path.normpath(d))
        runs.append((label, read_metrics(os.path.join(d, "metrics.jsonl"))))
    written.append(plot_curves(runs, os.path.join(out_dir, "curves.png")))
    if tsne:
        for d in run_dirs:
            emb = os.path.join(d, "item_emb.npy")
            if not os.path.isfile(emb):
                raise ValueError(f"{emb} does not exist (train with export on, the default)")
            label = os.path.basename(os.path.normpath(d))
            name = "tsne.png" if len(run_dirs) == 1 else f"tsne-{label}.png"
            kind = "cluster" if _run_data(d) == "synthetic" else "category"
            cats = item_categories(d)
            written.append(plot_tsne(np.load(emb), cats, os.path.join(out_dir, name),
                                     n_points=n_points, max_categories=max_categories,
                                     seed=seed, label=kind, title=tsne_title(label, cats, kind)))
    for p in written:
        log.info("wrote %s", p)
    return written
