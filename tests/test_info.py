"""seqrec_fast.info(): what the install reports matches what actually runs."""
import torch
import torch.distributed as dist

import seqrec_fast
from seqrec_fast import backend


def test_info_reports_the_install():
    info = seqrec_fast.info()
    assert info["seqrec_fast"] == seqrec_fast.__version__
    assert info["torch"] == torch.__version__
    assert info["extension"] == (seqrec_fast._ext._C is not None)
    assert set(info["backends"]) == set(seqrec_fast.OPS)
    for op, flags in info["backends"].items():
        assert flags["eager"] is True
        assert flags["cpp"] == backend.available(op, "cpp", torch.device("cpu"))
    assert ("gloo" in info["distributed"]) == (dist.is_available() and dist.is_gloo_available())
    assert ("nccl" in info["distributed"]) == (dist.is_available() and dist.is_nccl_available())
    assert info["devices"][0] == "cpu"
    assert (len(info["devices"]) > 1) == torch.cuda.is_available()


def test_ops_lists_every_op_with_a_backend_choice():
    """OPS names the ``OP`` of every module of seqrec_fast.ops that has one, so info() and the
    CLI report cover a new op without further edits."""
    import importlib
    import pkgutil

    import seqrec_fast.ops as ops_pkg

    names = set()
    for m in pkgutil.iter_modules(ops_pkg.__path__):
        mod = importlib.import_module(f"seqrec_fast.ops.{m.name}")
        if isinstance(getattr(mod, "OP", None), str):
            names.add(mod.OP)
    assert names and set(seqrec_fast.OPS) == names


def test_cli_info(capsys):
    import json

    from seqrec_fast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"seqrec_fast {seqrec_fast.__version__}" in out and f"torch {torch.__version__}" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    rows.pop("op")
    assert set(rows) == set(seqrec_fast.OPS)
    for op, cells in rows.items():
        flags = ["yes" if backend.available(op, b, "cpu") else "-" for b in ("eager", "cpp")]
        assert cells[:2] == flags, (op, cells)
        assert cells[4] == backend.resolve(op, "auto", torch.device("cpu")), (op, cells)
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(seqrec_fast.info()))
