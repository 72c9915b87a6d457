"""The command line: the installed ``seqrec-fast`` script, help texts, one-line user errors."""
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from seqrec_fast.cli import main


def test_seqrec_fast_script_is_installed():
    # pyproject's [project.scripts] is what setuptools honours (setup.py's entry_points are
    # dropped when pyproject.toml has a [project] table)
    eps = [e for e in entry_points(group="console_scripts") if e.name == "seqrec-fast"]
    assert eps and eps[0].value == "seqrec_fast.cli:main", eps
    exe = shutil.which("seqrec-fast")
    assert exe is not None, "seqrec-fast is not on PATH after pip install"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "evaluate" in r.stdout, r.stderr


def test_train_help_documents_every_flag():
    p = subprocess.run([sys.executable, "-m", "seqrec_fast", "train", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    from seqrec_fast.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    undocumented = [a.option_strings for a in train._actions if not a.help]
    assert not undocumented, undocumented
    for group in ("model:", "data:", "split:", "loss:", "optimisation:", "validation and test:",
                  "run:"):
        assert group in p.stdout, group
    assert "(default: 1500)" in p.stdout and "(default: comirec-dr)" in p.stdout


@pytest.mark.parametrize("argv, match", [
    (["train", "--data", "nope.csv"], "--data 'nope.csv' is not 'synthetic' and not an existing file"),
    (["train", "--steps", "0"], "--steps must be a positive int"),
    (["train", "--eval-users", "0"], "--eval-users must be a positive int"),
    (["train", "--split-ratios", "0.8,0.2"], "three"),
    (["train", "--synthetic", "{bad"], "not valid JSON"),
    (["train", "--synthetic", '{"n_itemz": 5}'], "unknown synthetic argument"),
    (["evaluate", "missing.pt"], "checkpoint 'missing.pt' does not exist"),
    (["train", "--device", "xyz"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["train", "--sparse-lr", "-1"], "--sparse-lr must be > 0"),
    (["train", "--threads", "0"], "--threads: expected a positive integer"),
    (["train", "--k-core", "1000"], "no interaction is left after the 1000-core filter"),
    (["train", "--num-negatives", "0"], "--num-negatives must be >= 1"),
])
def test_user_mistakes_are_one_line(tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    p = subprocess.run([sys.executable, "-m", "seqrec_fast"] + argv + ["--no-progress"]
                       if argv[0] == "train" else [sys.executable, "-m", "seqrec_fast"] + argv,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert "Traceback" not in err and match in err, err
    assert "max_users" not in err and "AssertionError" not in err


def test_train_on_a_csv_with_other_column_names(tmp_path, capsys):
    """--user-col / --item-col / --time-col / --sep / --header, and the split flags."""
    import numpy as np

    rng = np.random.default_rng(1)
    lines = [f"{i}\t{u}\t{t}" for u in range(120) for t, i in enumerate(rng.integers(1, 50, 12))]
    p = tmp_path / "log.txt"
    p.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    rc = main(["train", "--model", "youtubednn", "--data", str(p), "--data-format", "csv",
               "--sep", "\\t", "--header", "false", "--user-col", "1", "--item-col", "0",
               "--time-col", "2", "--split-ratios", "0.6,0.2,0.2", "--split-seed", "5",
               "--eval-history-frac", "0.5", "--dim", "8", "--steps", "5", "--eval-every", "5",
               "--batch-size", "16", "--out-dir", str(out), "--no-progress", "--no-export",
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    from seqrec_fast.train import load_checkpoint

    _, cfg, ds = load_checkpoint(str(out / "last.pt"), "cpu")
    assert ds.meta["ratios"] == [0.6, 0.2, 0.2] and ds.meta["seed"] == 5
    assert ds.n_train_users == 72 and ds.valid.n_users == 24


def test_evaluate_diversity_rows_on_synthetic_data(tmp_path, capsys):
    """`evaluate --diversity` prints one row per λ of ComiRec's controllable aggregation, with
    Diversity@20/@50; on the synthetic set (categories = planted clusters) diversity rises with
    λ while recall falls gently; λ = 0 is the plain top-N."""
    import json

    from seqrec_fast.train import evaluate_checkpoint

    small = {"n_users": 400, "n_items": 300, "n_interests": 8, "min_len": 10, "max_len": 30}
    out = tmp_path / "run"
    # a multi-interest model: its K per-interest lists are the candidates the λ trades among
    assert main(["train", "--model", "comirec-sa", "--data", "synthetic", "--synthetic",
                 json.dumps(small), "--dim", "16", "--steps", "150", "--eval-every", "150",
                 "--batch-size", "64", "--lr", "0.01", "--out-dir", str(out), "--no-progress",
                 "--no-export"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.pt"), "--diversity", "0,0.05,0.5"]) == 0
    text = capsys.readouterr().out
    assert "diversity@20" in text and "diversity@50" in text
    assert all(f"λ={lam}" in text for lam in ("0", "0.05", "0.5")) and "| most-popular |" in text
    plain = evaluate_checkpoint(str(out / "best.pt"))
    rows = evaluate_checkpoint(str(out / "best.pt"), diversity=[0.0, 0.05, 0.2, 1.0])
    assert rows[0] == pytest.approx(plain, abs=1e-12)                 # λ = 0: the plain merge
    div = [r["diversity@50"] for r in rows]
    rec = [r["recall@50"] for r in rows]
    assert div == sorted(div) and div[-1] > div[0], div
    assert rec[1] >= rec[0] - 0.05, rec                                # gently at small λ
    with pytest.raises(SystemExit):
        main(["evaluate", str(out / "best.pt"), "--diversity", "0,-1"])
