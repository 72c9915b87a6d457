"""`seqrec-fast plot`: t-SNE and training-curve PNGs; a clear error without the [plot] extra."""
import builtins
import json

import numpy as np
import pytest
import torch

from seqrec_fast.cli import main
from seqrec_fast.plot import plot_tsne, read_metrics

SMALL = {"n_users": 300, "n_items": 200, "n_interests": 8, "min_len": 10, "max_len": 30}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("plot") / "comirec-sa"
    rc = main(["train", "--model", "comirec-sa", "--data", "synthetic", "--synthetic",
               json.dumps(SMALL), "--dim", "16", "--steps", "30", "--eval-every", "10",
               "--batch-size", "32", "--out-dir", str(out), "--no-progress"])
    torch.set_num_threads(n)
    assert rc == 0
    return out


def test_plot_writes_pngs(run_dir, tmp_path, capsys):
    import matplotlib  # noqa: F401  (the test extra installs the plot dependencies)
    import sklearn  # noqa: F401
    assert (run_dir / "item_category.npy").exists()
    rc = main(["plot", str(run_dir), "--out", str(tmp_path), "--points", "150"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    for name in ("curves.png", "tsne.png"):
        p = tmp_path / name
        assert str(p) in printed
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    # several runs: curves overlaid, one t-SNE per run
    rc = main(["plot", str(run_dir), str(run_dir), "--out", str(tmp_path / "two"),
               "--no-tsne"])
    assert rc == 0 and (tmp_path / "two" / "curves.png").exists()


def test_plot_tsne_without_categories(tmp_path):
    import matplotlib  # noqa: F401  (the test extra installs the plot dependencies)
    import sklearn  # noqa: F401
    emb = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    p = plot_tsne(emb, None, str(tmp_path / "t.png"))
    assert open(p, "rb").read(8) == PNG
    with pytest.raises(ValueError, match="categories"):
        plot_tsne(emb, np.zeros(5), str(tmp_path / "u.png"))


def test_plot_bad_inputs(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_metrics(str(bad))


def test_plot_without_the_extra_names_it(run_dir, monkeypatch, capsys):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.split(".")[0] in ("matplotlib", "sklearn"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "seqrec_fast[plot]" in err and "matplotlib" in err and "scikit-learn" in err


def test_curves_star_at_the_tested_checkpoint_and_loss_from_train_records():
    from seqrec_fast.plot import curves_figure, loss_curve, tested_point, tsne_title

    recs = [{"step": s, "split": "train", "loss": 5.0 - s / 10} for s in range(5, 31, 5)]
    recs += [{"step": 10, "split": "valid", "loss": 4.0, "recall@50": 0.3, "ndcg@50": 0.2,
              "hitrate@50": 0.5},
             {"step": 20, "split": "valid", "loss": 3.0, "recall@50": 0.2, "ndcg@50": 0.1,
              "hitrate@50": 0.4},
             {"step": 20, "split": "test", "checkpoint_step": 10, "recall@50": 0.25,
              "ndcg@50": 0.15, "hitrate@50": 0.45}]
    assert tested_point(recs, "recall@50") == (10, 0.25)          # not the last step (20)
    old = [r for r in recs if r["split"] != "train"]
    old[-1] = {k: v for k, v in old[-1].items() if k != "checkpoint_step"}
    assert tested_point(old, "ndcg@50") == (10, 0.15)             # best valid recall@50
    assert loss_curve(recs) == ((5, 10, 15, 20, 25, 30), (4.5, 4.0, 3.5, 3.0, 2.5, 2.0))
    assert loss_curve(old) == ((10, 20), (4.0, 3.0))
    fig = curves_figure([("a", recs), ("b", old)])
    fig.canvas.draw()
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    box = fig.legends[0].get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    star = [ln for ln in fig.axes[0].lines if ln.get_marker() == "*"][0]
    assert list(star.get_xdata()) == [10]
    assert "by" not in tsne_title("run", None, "category")
    assert "by category" in tsne_title("run", np.array([-1, 3, 4]), "category")
    assert "no categories" in tsne_title("run", np.array([-1, -1]), "category")
