"""The benchmark scripts run end to end at their quick shapes (eager and C++ providers): the
table, the CSV rows and the speed-up column come out, and bad options are usage errors."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from _util import fused_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, tmp_path):
    out = tmp_path / f"{script}.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), *args,
                        "--csv", str(out)], capture_output=True, text=True, timeout=300, env=env)
    return r, out


@pytest.mark.parametrize("script, providers, ours", [("routing", "eager,cpp", "cpp"),
                                                     ("attention", "eager,cpp", "cpp"),
                                                     ("linear_cross_entropy", "eager,ours", "cpp"),
                                                     ("sampled_softmax", "eager,ours", "cpp")])
def test_bench_quick_runs(tmp_path, script, providers, ours):
    if "cpp" not in fused_backends(script):  # each bench script is named after its op
        pytest.skip("the C++ extension is not built")
    r, out = _run(script, "--quick", "--providers", providers, "--reps", "1",
                  tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| provider |" in r.stdout and "x |" in r.stdout        # table with ratios
    rows = list(csv.DictReader(open(out)))
    assert rows and {row["provider"] for row in rows} == {"eager", ours}
    assert all(float(row["ms"]) > 0 for row in rows)


def test_bench_routing_rechub_variants(tmp_path):
    """torch-rechub's softmax over the sequence axis has its own rows (mind_seq, dr_seq)."""
    if "cpp" not in fused_backends("routing"):
        pytest.skip("the C++ extension is not built")
    r, out = _run("routing", "--quick", "--variants", "mind_seq,dr_seq", "--providers",
                  "eager,cpp", "--reps", "1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out)))
    assert {(row["variant"], row["provider"]) for row in rows} == {
        (v, p) for v in ("mind_seq", "dr_seq") for p in ("eager", "cpp")}


def test_bench_bad_options_are_usage_errors(tmp_path):
    r, _ = _run("routing", "--variants", "comirec-dr", tmp_path=tmp_path)
    assert r.returncode == 2 and "--variants: unknown" in r.stderr
    r, _ = _run("attention", "--dtype", "fp99", tmp_path=tmp_path)
    assert r.returncode == 2 and "--dtype: unknown" in r.stderr


@pytest.mark.parametrize("script", ["routing", "attention", "linear_cross_entropy",
                                    "sampled_softmax"])
def test_bench_one_provider_vocabulary(tmp_path, script):
    """Every script takes the backend names (cpp measures the C++ kernel, as 'ours' does on
    CPU); an unknown provider is a usage error, not an empty measurement."""
    if "cpp" not in fused_backends(script):
        pytest.skip("the C++ extension is not built")
    r, out = _run(script, "--quick", "--providers", "cpp", "--reps", "1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {row["provider"] for row in csv.DictReader(open(out))} == {"cpp"}
    r, _ = _run(script, "--quick", "--providers", "eager,fastest", tmp_path=tmp_path)
    assert r.returncode == 2 and "--providers: unknown ['fastest']" in r.stderr, r.stderr[-2000:]


def test_bench_retrieval_quick(tmp_path):
    """bench/retrieval.py (multi_interest_topk and diverse_topk, named for the pair): both
    variants, the ratio column, and the shared provider vocabulary."""
    if "cpp" not in fused_backends("multi_interest_topk"):
        pytest.skip("the C++ extension is not built")
    r, out = _run("retrieval", "--quick", "--providers", "eager,cpp", "--reps", "1",
                  tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| provider |" in r.stdout and "x |" in r.stdout
    rows = list(csv.DictReader(open(out)))
    assert {(row["variant"], row["provider"]) for row in rows} == {
        ("topn", "eager"), ("topn", "cpp"), ("aggregate", "eager"), ("aggregate", "cpp")}
    r, _ = _run("retrieval", "--quick", "--providers", "eager,fastest", tmp_path=tmp_path)
    assert r.returncode == 2 and "--providers: unknown ['fastest']" in r.stderr, r.stderr[-2000:]


# the peers' signatures at the versions bench/fetch_peers.sh pins (cut-cross-entropy 25.1.1,
# liger-kernel 0.8.5), used when the packages are not installed
def _cce_signature(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False,
                   filter_eps="high", impl="cce"):
    pass


def _liger_signature(input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                     lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                     return_z_loss=False, accum_dtype=None, use_token_scaling=False,
                     return_token_accuracy=False, return_predicted_tokens=False,
                     chunk_mem_const=1):
    pass


def test_bench_peer_calls_bind_to_the_peers_signatures(monkeypatch):
    """bench/linear_cross_entropy.py calls cut-cross-entropy and liger-kernel with arguments
    their functions take (checked against the installed packages when present, else against
    their signatures at the pinned versions): a mismatch would only show on a GPU."""
    import importlib.util
    import inspect
    import types

    calls = {}

    def recorder(name, real):
        sig = inspect.signature(real)

        def f(*args, **kwargs):
            calls[name] = sig.bind(*args, **kwargs)        # TypeError on a mismatch
            return name
        return f

    try:
        from cut_cross_entropy import linear_cross_entropy as cce_real
    except ImportError:
        cce_real = _cce_signature
    try:
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy as liger_real)
    except ImportError:
        liger_real = _liger_signature
    cce_mod = types.ModuleType("cut_cross_entropy")
    cce_mod.linear_cross_entropy = recorder("cce", cce_real)
    liger_mod = types.ModuleType("liger_kernel.transformers.functional")
    liger_mod.liger_fused_linear_cross_entropy = recorder("liger", liger_real)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", cce_mod)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers",
                        types.ModuleType("liger_kernel.transformers"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", liger_mod)
    spec = importlib.util.spec_from_file_location(
        "bench_linear_cross_entropy", os.path.join(ROOT, "bench", "linear_cross_entropy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    peers = mod._peers()
    assert set(peers) == {"cce", "liger"}
    u, w, t = torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long)
    assert peers["cce"](u, w, t, None) == "cce" and peers["liger"](u, w, t, None) == "liger"
    assert calls["cce"].arguments["e"] is u and calls["cce"].arguments["c"] is w
    assert calls["liger"].arguments["weight"] is w
    with pytest.raises(ValueError, match="no bias"):
        peers["cce"](u, w, t, torch.zeros(5))
