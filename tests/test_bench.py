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


def _load_bench(name):
    """bench/<name>.py as a module (bench/ on sys.path, as the scripts put it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_rows_are_on_disk_before_the_run_ends(tmp_path):
    """bench/gpu_suite.sh kills a step at its time limit: every case measured before the kill
    keeps its CSV row (here the second case kills the process the way `timeout` does)."""
    out = tmp_path / "rows.csv"
    code = f"""
import os, signal, sys
sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})
import torch, _harness
def killed():
    os.kill(os.getpid(), signal.SIGTERM)
cases = [_harness.Case("eager", "fwd", "2x3", lambda: torch.ones(4).sum()),
         _harness.Case("cpp", "fwd", "2x3", killed),
         _harness.Case("eager", "fwd", "4x5", lambda: torch.ones(4).sum())]
_harness.run_cases("fake", cases, torch.device("cpu"), csv_path={str(out)!r}, reps=1)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == -15, (r.returncode, r.stderr[-2000:])
    assert out.exists(), "no CSV at all after the kill"
    rows = list(csv.DictReader(open(out)))
    assert [(row["provider"], row["shape"]) for row in rows] == [("eager", "2x3")]
    assert float(rows[0]["ms"]) > 0 and rows[0]["op"] == "fake"


def test_bench_cuda_error_is_the_failing_cases_own(tmp_path, monkeypatch, capsys):
    """A CUDA error that surfaces in torch.cuda.empty_cache after a case (a sticky error) is
    recorded as that case's failure; the run goes on, writes the other rows and the table."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import _harness as h
    calls = []

    def empty_cache():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fake_measure(fn, device, reps=10):
        fn()
        return 1.0, 0.9, 1.1, 2.0

    def bad():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(h, "measure", fake_measure)
    monkeypatch.setattr(h, "device_name", lambda device: "fake card")
    out = tmp_path / "rows.csv"
    cases = [h.Case("triton", "fwd", "2x3", bad), h.Case("eager", "fwd", "2x3", lambda: None)]
    h.run_cases("fake", cases, torch.device("cuda"), csv_path=str(out), reps=1)
    assert "illegal memory access" in cases[0].result["error"]
    assert cases[1].result["ms"] == 1.0 and len(calls) == 2
    rows = list(csv.DictReader(open(out)))
    assert [(row["provider"], row["device"]) for row in rows] == [("eager", "fake card")]
    table = capsys.readouterr().out
    assert "| triton | failed: RuntimeError: CUDA error" in table and "| eager | 1.000" in table


def _fake_peer_modules(monkeypatch):
    import types

    cce_mod = types.ModuleType("cut_cross_entropy")
    cce_mod.linear_cross_entropy = _cce_signature
    liger_mod = types.ModuleType("liger_kernel.transformers.functional")
    liger_mod.liger_fused_linear_cross_entropy = _liger_signature
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", cce_mod)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers",
                        types.ModuleType("liger_kernel.transformers"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", liger_mod)


@pytest.mark.parametrize("argv, want", [
    # the suite: peers in bf16 at 4096,1000000,64 only (liger takes seconds per call in fp32 and
    # at the 2M-item shape; cce's backward takes no fp32)
    (["--gpu-suite"], {("cce", "bfloat16", "4096x1000000x64"),
                       ("liger", "bfloat16", "4096x1000000x64")}),
    # outside the suite the user's choice stands, except cce in fp32, which cannot run
    (["--dtype", "fp32,bf16", "--full", "64,1000,8", "8192,2000000,128"],
     {("liger", "float32", "64x1000x8"), ("liger", "float32", "8192x2000000x128"),
      ("cce", "bfloat16", "64x1000x8"), ("liger", "bfloat16", "64x1000x8"),
      ("cce", "bfloat16", "8192x2000000x128"), ("liger", "bfloat16", "8192x2000000x128")}),
])
def test_bench_loss_peer_cases(monkeypatch, argv, want):
    """The cases bench/linear_cross_entropy.py builds on a card with both peers installed
    (faked here; inputs and measuring stubbed, nothing runs)."""
    _fake_peer_modules(monkeypatch)
    mod = _load_bench("linear_cross_entropy")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)   # main() finds itself there
    assert set(mod._peers()) == {"cce", "liger"}
    got = {}
    monkeypatch.setattr(mod._harness, "stable_malloc", lambda: None)
    monkeypatch.setattr(mod._harness, "run_cases",
                        lambda op, cases, device, **kw: got.setdefault("cases", cases))
    monkeypatch.setattr(mod, "_inputs", lambda shape, dtype, device: (None, None, None))
    mod.main(["--device", "cuda", "--providers", "eager,cce,liger", *argv])
    cases = got["cases"]
    assert {(c.provider, c.dtype, c.shape) for c in cases if c.provider in ("cce", "liger")} \
        == want
    if "--gpu-suite" in argv:   # the suite still measures eager at both dtypes
        assert {(c.provider, c.dtype) for c in cases} >= {("eager", "bfloat16"),
                                                          ("eager", "float32")}


def test_bench_retrieval_chunk_is_large_on_cuda():
    """The torch provider's chunk on CUDA: the GPU shape (100000 users x 4 interests x 1M
    items) in a few hundred Python steps, not 12,500; CPU keeps 128 MiB of fp32 scores."""
    mod = _load_bench("retrieval")
    assert mod.chunk_elems("cpu") == 1 << 25
    assert mod.chunk_elems("cuda") >= 1 << 30
    U, K, N = 100000, 4, 1_000_000
    steps = -(-U // max(1, mod.chunk_elems("cuda") // (K * N)))
    assert steps <= 400
