"""Compile every Triton launch of the CPU test suite for sm_90, without a GPU.

    python bench/sm90_sweep.py                        # the Triton tests of every op
    python bench/sm90_sweep.py tests/test_attention.py -k half

The tests run with the stub driver of ``bench/sm90_report.py`` in place of the Triton
interpreter: every launch compiles for Hopper with the launchers' GPU configurations (as on a
card) and does not run, so the tests' value checks see garbage and are not the point. What is
reported is whether each launch *compiles*: a test counts as a compile failure when Triton's
compiler raised (``CompilationError``, an MLIR pass failure, ...) or the process died (a compiler
assertion aborts it). The test shapes, dtypes and variants are many more than the report's
headline cases; run it with the Triton version of the GPU machines before a GPU session.

Exit code 1 when any test file had a compile failure or crashed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FILES = ["tests/test_routing.py", "tests/test_attention.py",
                 "tests/test_linear_cross_entropy.py", "tests/test_sampled_softmax.py",
                 "tests/test_multi_interest_topk.py", "tests/test_diverse_topk.py"]
# float64 tests (gradcheck, hypothesis and the float64 oracles) are left out: on a GPU float64
# attention never takes Triton (triton 3.6 cannot compile its fp64 dots for sm_90)
DEFAULT_K = "(triton or fused) and not float64 and not gradcheck and not hypothesis"
# the exception text of a failed compile (anything else after a launch is a value mismatch)
COMPILE_ERRORS = ("CompilationError", "PassManager::run failed", "MLIR pass pipeline",
                  "LLVM ERROR", "ptxas", "OutOfResources")


def _plugin_dir() -> str:
    return os.path.join(ROOT, "bench", "_sm90_plugin")


def run_file(path: str, k: str, cache_dir: str, timeout: float) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache_dir,
               PYTHONPATH=os.pathsep.join([_plugin_dir(), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "--tb=line", "-p", "no:cacheprovider",
           "-p", "sm90_stub", path, "-k", k]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or "") + (e.stderr or ""), "timeout"
    summary = [line.strip("= ") for line in out.splitlines()
               if re.search(r"\d+ (passed|failed|deselected|skipped|errors?)\b", line)
               and " in " in line]
    fails = [line for line in out.splitlines() if line.startswith("FAILED")]
    compile_fails = [line for line in fails if any(s in line for s in COMPILE_ERRORS)]
    # -rf lines are cut; the --tb=line lines carry the whole message: match those too
    for line in out.splitlines():
        if any(s in line for s in COMPILE_ERRORS) and not line.startswith("FAILED"):
            compile_fails.append(line.strip()[:200])
    crashed = rc not in (0, 1, 5)          # 1: tests failed (value checks), 5: none selected
    return dict(file=path, rc=rc, summary=summary[-1] if summary else "(no summary)",
                compile_failures=sorted(set(compile_fails)), crashed=crashed,
                tail=out[-1500:] if crashed else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", default=DEFAULT_FILES, help="test files")
    ap.add_argument("-k", default=DEFAULT_K, help="pytest -k expression (default: %(default)r)")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "build", "triton_sm90_sweep"),
                    help="TRITON_CACHE_DIR")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per file")
    args = ap.parse_args(argv)
    import triton

    print(f"sm_90 compile sweep, triton {triton.__version__}\n")
    print("| test file | pytest summary (value checks fail by design) | compile failures | crashed |")
    print("|---|---|---|---|")
    bad = False
    results = []
    for f in args.files:
        res = run_file(f, args.k, args.cache_dir, args.timeout)
        results.append(res)
        bad |= bool(res["compile_failures"]) or res["crashed"]
        print(f"| {f} | {res['summary']} | {len(res['compile_failures'])} | "
              f"{'yes (rc ' + str(res['rc']) + ')' if res['crashed'] else 'no'} |", flush=True)
    for res in results:
        for line in res["compile_failures"]:
            print(f"\n{res['file']}: {line}")
        if res["crashed"]:
            print(f"\n{res['file']} crashed; last output:\n{res['tail']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
