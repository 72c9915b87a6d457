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
