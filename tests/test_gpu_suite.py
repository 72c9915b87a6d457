"""bench/gpu_suite.sh in its --dry-run form (CPU, Triton interpreter, tiny shapes): every step
runs and reports, failures and the budget change the exit code and steps.csv as documented,
so that no typo costs device time."""
import csv
import os
import re
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "bench", "gpu_suite.sh")


def _run(out, *args, env=None, timeout=600):
    e = dict(os.environ if env is None else env)
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", SUITE, str(out), *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


def _steps(out):
    return {r["step"]: r for r in csv.DictReader(open(out / "steps.csv"))}


def test_dry_run_runs_every_step(tmp_path):
    r = _run(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    steps = _steps(tmp_path)
    script_steps = re.findall(r"^\s*step (\w+) ", open(SUITE).read(), re.M)
    dry = [s for s in script_steps if s not in ("install", "peers", "cuda_extension_loaded",
                                                "all_cuda_tests", "bench_train")]
    assert set(dry) <= set(steps), f"steps that did not run: {set(dry) - set(steps)}"
    assert all(row["status"] == "ok" for row in steps.values()), steps
    # every Triton kernel x dtype was checked against float64, and passed
    checks = list(csv.DictReader(open(tmp_path / "gpu_check.csv")))
    seen = {(c["check"], c["dtype"]) for c in checks}
    for name in ("routing_mind", "routing_dr", "attention", "linear_cross_entropy",
                 "sampled_softmax_shared", "sampled_softmax_per_row"):
        for dt in ("fp32", "bf16", "fp16"):
            assert (name, dt) in seen, (name, dt)
    assert all(c["ok"] == "True" for c in checks)
    for op in ("routing", "attention", "linear_cross_entropy", "sampled_softmax"):
        rows = list(csv.DictReader(open(tmp_path / f"{op}.csv")))
        assert {"eager", "triton"} <= {row["provider"] for row in rows}, op
    assert "| op |" in open(tmp_path / "summary.md").read()
    log = open(tmp_path / "gpu_suite.log").read()
    assert "failed: none" in log and "=== ok correctness" in log


def test_every_step_name_is_declared():
    text = open(SUITE).read()
    declared = re.search(r"STEP_NAMES=\((.*?)\)", text, re.S).group(1).split()
    used = re.findall(r"^\s*step (\w+) ", text, re.M)
    assert sorted(set(used)) == sorted(declared)


def test_a_failing_step_fails_the_run_and_the_rest_still_runs(tmp_path):
    # a `python` first on PATH that fails for the correctness script only
    shim = tmp_path / "bin"
    shim.mkdir()
    fake = shim / "python"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *gpu_check.py*) echo boom >&2; exit 3;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    r = _run(out, "--dry-run", "--only", "correctness,cuda_build", env=env)
    assert r.returncode == 1, r.stdout[-3000:]
    steps = _steps(out)
    assert steps["correctness"]["status"] == "failed" and steps["correctness"]["exit_code"] == "3"
    assert steps["cuda_build"]["status"] == "ok"
    assert set(steps) == {"correctness", "cuda_build"}
    assert "failed: correctness" in open(out / "gpu_suite.log").read()


def test_budget_skips_what_does_not_fit(tmp_path):
    r = _run(tmp_path, "--dry-run", "--budget", "0")
    assert r.returncode == 0, r.stdout[-3000:]
    steps = _steps(tmp_path)
    assert steps and all(row["status"] == "skipped" for row in steps.values())
    assert "skip correctness: needs about" in r.stdout


def test_bad_arguments_are_usage_errors(tmp_path):
    assert _run(tmp_path, "--budget", "ten").returncode == 2
    r = _run(tmp_path, "--only", "correctnes")
    assert r.returncode == 2 and "unknown step 'correctnes'" in r.stderr
    r = subprocess.run(["bash", SUITE], capture_output=True, text=True)
    assert r.returncode == 2 and "OUTDIR is required" in r.stderr


def test_relative_outdir_is_the_callers(tmp_path):
    """A relative OUTDIR is taken from the caller's directory, not from the repository root the
    suite changes to."""
    import shutil
    import uuid

    caller = tmp_path / "caller"
    caller.mkdir()
    rel = f"suite_out_{uuid.uuid4().hex[:8]}"
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    try:
        r = subprocess.run(["bash", SUITE, rel, "--dry-run", "--only", "info"], cwd=caller,
                           capture_output=True, text=True, timeout=300, env=e)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        out = caller / rel
        assert _steps(out)["info"]["status"] == "ok"
        assert (out / "info.json").exists() and (out / "gpu_suite.log").exists()
        assert not os.path.exists(os.path.join(ROOT, rel))
    finally:
        shutil.rmtree(os.path.join(ROOT, rel), ignore_errors=True)


def test_installs_use_the_suites_python(tmp_path):
    """install, peers and cuda_build install with `python -m pip`: the packages go to the
    interpreter that runs the other steps, not to whatever `pip` is first on PATH."""
    shim = tmp_path / "bin"
    shim.mkdir()
    calls = tmp_path / "calls.txt"
    (shim / "python").write_text(
        "#!/bin/sh\n"
        "if [ \"$1\" = -m ] && [ \"$2\" = pip ]; then\n"
        f"  echo \"python $*\" >> '{calls}'; exit 0\nfi\n"
        f"exec {sys.executable} \"$@\"\n")
    (shim / "pip").write_text(f"#!/bin/sh\necho \"pip $*\" >> '{calls}'\nexit 7\n")
    for f in ("python", "pip"):
        (shim / f).chmod((shim / f).stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    r = _run(out, "--only", "install,peers,cuda_build", env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    steps = _steps(out)
    assert steps["install"]["status"] == "ok" and steps["cuda_build"]["status"] == "ok"
    lines = open(calls).read().splitlines()
    assert lines and all(line.startswith("python -m pip install") for line in lines), lines
    assert sum("-e ." in line for line in lines) == 2
    if "peers" in steps:   # wheels present in bench/peers
        assert steps["peers"]["status"] == "ok"
        assert any("bench/peers/" in line for line in lines)


def test_cuda_tests_step_names_files_with_cuda_tests():
    """`-m cuda` on a file without cuda-marked tests only costs collection time on the card."""
    line = re.search(r"^step cuda_tests .*$", open(SUITE).read(), re.M).group(0)
    files = re.findall(r"tests/\S+\.py", line)
    assert files
    for f in files:
        assert "pytest.mark.cuda" in open(os.path.join(ROOT, f)).read(), f
