"""The benchmark scripts run end to end at their quick shapes (eager and C++ providers): the
table, the CSV rows and the speed-up column come out, and bad options are usage errors."""
import csv
import os
import subprocess
import sys

import pytest

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
