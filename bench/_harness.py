"""Shared benchmark machinery: timing, peak memory, Markdown table, long-format CSV.

Every bench/<op>.py builds a list of cases (provider, mode, shape, callable) and hands them to
``run_cases``. On CUDA, times come from ``triton.testing.do_bench`` (median, 20th and 80th
percentiles) and memory from ``torch.cuda.max_memory_allocated``; on CPU from a perf_counter
loop and the process's peak resident set (reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import csv
import datetime as _dt
import gc
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSV_FIELDS = ["op", "variant", "provider", "mode", "shape", "dtype", "ms", "ms_p20", "ms_p80",
              "peak_mib", "device", "torch", "triton", "git_sha", "time"]


@dataclass
class Case:
    provider: str
    mode: str
    shape: str
    fn: Callable[[], object]
    variant: str = ""
    dtype: str = "float32"
    result: dict = field(default_factory=dict)
    # memory the provider keeps between calls (a reused workspace): added to the measured peak,
    # which only sees what a call allocates on top of what already exists
    retained_mib: Optional[Callable[[], float]] = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} x{torch.get_num_threads()} threads"


def base_parser(doc: str, providers: str, modes: Optional[str] = None):
    """The options every bench script shares: --device, --providers, [--modes], --quick, --reps,
    --csv. -> argparse.ArgumentParser to add the script's own options to."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=providers)
    if modes is not None:
        ap.add_argument("--modes", default=modes, help="comma list of fwd, fwd+bwd")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--csv", default=None)
    return ap


def pick_shapes(args, device: torch.device, quick, gpu, cpu) -> list:
    """--shapes "a,b,c ..." when given, else the quick / GPU / CPU default list."""
    if getattr(args, "shapes", None):
        return [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    if args.quick:
        return list(quick)
    return list(gpu if device.type == "cuda" else cpu)


# One provider vocabulary for every bench/<op>.py: the eager reference, torch.compile of it, each
# of our backends by its backend name, and "ours" = the backend `auto` picks for the device
# (triton on CUDA, cpp on CPU). A script may add its own names (public peers: cce, liger).
PROVIDERS = ("eager", "compile", "triton", "cuda", "cpp", "ours")


def parse_providers(ap, text: str, device: torch.device, op: str, extra=()) -> list:
    """--providers (a comma list) -> the providers to run, in the one vocabulary above, "ours"
    resolved to its backend name. An unknown name is a usage error (``ap.error``); a backend
    without a kernel for ``op`` on ``device`` (or triton on CPU outside the interpreter) is
    left out with a note on stderr, never silently."""
    from seqrec_fast import backend

    names = [p.strip() for p in text.split(",") if p.strip()]
    known = PROVIDERS + tuple(extra)
    unknown = [p for p in names if p not in known]
    if unknown or not names:
        ap.error(f"--providers: unknown {unknown or text!r}; choose from {', '.join(known)} "
                 f"('ours' = {'triton' if device.type == 'cuda' else 'cpp'} on {device.type})")
    out = []
    for p in names:
        if p == "ours":
            p = "triton" if device.type == "cuda" else "cpp"
        if p in ("triton", "cuda", "cpp"):
            why = backend.reason_unavailable(op, p, device)
            if why is None and p == "triton" and device.type == "cpu" \
                    and not backend.triton_interpreting():
                why = "triton runs on CPU only under TRITON_INTERPRET=1 (for tests, not timing)"
            if why is not None:
                print(f"note: provider {p!r} left out: {why}", file=sys.stderr)
                continue
        if p not in out:
            out.append(p)
    return out


def parse_dtypes(ap, text: str, table) -> list:
    """--dtype (a comma list of keys of ``table``) -> the names as a list; an unknown name is a
    usage error (``ap.error``)."""
    names = text.split(",")
    for name in names:
        if name not in table:
            ap.error(f"--dtype: unknown {name!r} (choose from {sorted(table)})")
    return names


def routing_workspace_mib(device: torch.device):
    """A Case.retained_mib for providers that run the C++ routing backward on CPU: the grad_u
    buffer it keeps between calls (None elsewhere)."""
    from seqrec_fast import _ext

    if device.type != "cpu" or _ext._C is None:
        return None
    return lambda: _ext._C.routing_workspace_cpu() / 2**20


def print_versions() -> None:
    """One line on stderr: package, torch and triton versions, extension status."""
    import seqrec_fast

    info = seqrec_fast.info()
    ext = "built" if info["extension"] else "missing: " + str(info["extension_error"])
    print(f"seqrec_fast {info['seqrec_fast']}, torch {info['torch']}, triton {info['triton']}, "
          f"extension {ext}", file=sys.stderr)


def stable_malloc() -> None:
    """Re-exec once with a fixed glibc mmap threshold so that freed large CPU buffers go back
    to the OS and the peak-RSS reading of each case is meaningful (glibc otherwise raises the
    threshold after the first free and keeps later buffers in its heap)."""
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _rss_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, reps: int = 10,
            min_time_s: float = 0.5):
    """-> (median ms, p20 ms, p80 ms, peak MiB above the level before the call)."""
    gc.collect()
    if device.type == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return med, p20, p80, peak
    for _ in range(warmup):
        fn()
    gc.collect()
    peak = float("nan")
    if _reset_peak_rss():
        base = _rss_kib("VmRSS")
        fn()
        hwm = _rss_kib("VmHWM")
        if base is not None and hwm is not None:
            peak = max(0, hwm - base) / 1024
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return statistics.median(times), q[0], q[3], peak


def _error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"


def run_cases(op: str, cases: List[Case], device: torch.device, *, baseline=("compile", "eager"),
              csv_path: Optional[str] = None, reps: int = 10) -> List[Case]:
    """Measure each case, append its CSV row (flushed) as soon as it is measured, then print a
    Markdown table with speed-up ratios.

    A run killed part-way (bench/gpu_suite.sh runs each step under ``timeout``) keeps the rows
    of every case measured before the kill. A case that raises, including a CUDA error that
    only surfaces in the ``empty_cache`` after it, is recorded as that case's failure and the
    run goes on with the next case (after a sticky CUDA error those fail too, each on its own).
    The ratio column is baseline_ms / ms, where the baseline is the first provider in
    ``baseline`` that ran for the same (variant, mode, shape, dtype).
    """
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = ""
    dev = device_name(device)
    sha = git_sha()
    if csv_path is None:
        csv_path = os.path.join(os.environ.get("SEQREC_FAST_BENCH_DIR",
                                               os.path.join(ROOT, "bench", "results")), f"{op}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    if not os.path.exists(csv_path):
        with open(csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writeheader()
    n_rows = 0
    for case in cases:
        try:
            ms, p20, p80, mib = measure(case.fn, device, reps=reps)
            if case.retained_mib is not None:
                mib += case.retained_mib()
            if device.type == "cuda":  # inside the try: a sticky CUDA error surfaces here
                torch.cuda.empty_cache()
            case.result = {"ms": ms, "p20": p20, "p80": p80, "mib": mib}
        except Exception as exc:  # noqa: BLE001 - a provider that fails is reported, not fatal
            case.result = {"error": _error_text(exc)}
            if device.type == "cuda":
                try:
                    torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001 - already recorded as this case's failure
                    pass
        print(f"  measured {case.variant} {case.provider} {case.mode} {case.shape}: "
              + (f"{case.result['ms']:.3f} ms" if "ms" in case.result else case.result["error"]),
              file=sys.stderr, flush=True)
        r = case.result
        if "ms" in r:  # on disk now: a later kill keeps it
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            with open(csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(
                    {"op": op, "variant": case.variant, "provider": case.provider,
                     "mode": case.mode, "shape": case.shape, "dtype": case.dtype,
                     "ms": f"{r['ms']:.4f}", "ms_p20": f"{r['p20']:.4f}",
                     "ms_p80": f"{r['p80']:.4f}", "peak_mib": f"{r['mib']:.1f}",
                     "device": dev, "torch": torch.__version__, "triton": triton_version,
                     "git_sha": sha, "time": now})
                f.flush()
                os.fsync(f.fileno())
            n_rows += 1
    print(f"\n### {op} on {dev} (torch {torch.__version__}, triton {triton_version or '-'})\n")
    print("| variant | shape | dtype | mode | provider | ms (p20-p80) | peak MiB | speed-up vs "
          f"{'/'.join(baseline)} |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        key = (case.variant, case.mode, case.shape, case.dtype)
        base_ms = None
        for bname in baseline:
            for other in cases:
                if (other.variant, other.mode, other.shape, other.dtype) == key and \
                        other.provider == bname and "ms" in other.result:
                    base_ms = other.result["ms"]
                    break
            if base_ms is not None:
                break
        r = case.result
        if "ms" in r:
            ratio = f"{base_ms / r['ms']:.2f}x" if base_ms else "-"
            print(f"| {case.variant} | {case.shape} | {case.dtype} | {case.mode} | {case.provider} | "
                  f"{r['ms']:.3f} ({r['p20']:.3f}-{r['p80']:.3f}) | {r['mib']:.1f} | {ratio} |")
        else:
            print(f"| {case.variant} | {case.shape} | {case.dtype} | {case.mode} | {case.provider} | "
                  f"failed: {r['error']} | - | - |")
    print(f"\n{n_rows} rows appended to {os.path.relpath(csv_path, os.getcwd())}")
    return cases


def fwd_bwd(fn: Callable[[], torch.Tensor], params):
    """A callable running forward then backward of ``fn()`` with a fixed random output
    gradient (drawn on the first call) into ``params``."""
    state = {}

    def run():
        for p in params:
            p.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        if "g" not in state:
            gen = torch.Generator(device=out.device).manual_seed(1)
            state["g"] = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
        out.backward(state["g"])
    return run


def no_grad(fn: Callable[[], object]):
    def run():
        with torch.no_grad():
            return fn()
    return run


def loss_bench_main(mod, doc: str, argv=None, extra_providers=()) -> None:
    """The command line of bench/linear_cross_entropy.py and bench/sampled_softmax.py: ``mod``
    is the script's module, with OP, PROVIDERS, DTYPES, SHAPE_FLAG / SHAPE_LEN / SHAPE_HELP,
    QUICK_SHAPES / GPU_SHAPES / CPU_SHAPES and ``build_cases(shapes, dtype, device, providers,
    modes)``. Default dtype bf16 on CUDA, fp32 on CPU; --gpu-suite: the headline shapes (a
    catalog of at least 1M items) in bf16 and fp32, torch.compile in bf16 only, and the peers
    (``extra_providers``) only at the module's SUITE_PEER_SHAPES in its SUITE_PEER_DTYPES."""
    stable_malloc()
    ap = base_parser(doc, mod.PROVIDERS, "fwd+bwd")
    ap.add_argument("--dtype", default=None, help="comma list of " + ",".join(sorted(mod.DTYPES))
                    + " (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument(mod.SHAPE_FLAG, "--shapes", dest="shapes", nargs="*", help=mod.SHAPE_HELP)
    ap.add_argument("--gpu-suite", action="store_true",
                    help="headline GPU shapes, bf16 and fp32 (bench/gpu_suite.sh)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    providers = parse_providers(ap, args.providers, device, mod.OP, extra=tuple(extra_providers))
    modes = args.modes.split(",")
    shapes = pick_shapes(args, device, mod.QUICK_SHAPES, mod.GPU_SHAPES, mod.CPU_SHAPES)
    if any(len(s) != mod.SHAPE_LEN for s in shapes):
        ap.error(f"{mod.SHAPE_FLAG}: each shape is {mod.SHAPE_HELP.split()[0]}")
    dtypes = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.gpu_suite:  # the headline shapes only (the suite runs under a time budget)
        dtypes = "bf16,fp32"
        shapes = [s for s in shapes if s[1] >= 1_000_000]
    dtype_names = parse_dtypes(ap, dtypes, mod.DTYPES)
    print_versions()
    cases = []
    peers = [p for p in providers if p in extra_providers]
    peer_shapes = [tuple(s) for s in getattr(mod, "SUITE_PEER_SHAPES", ())]
    peer_dtypes = tuple(getattr(mod, "SUITE_PEER_DTYPES", ()))
    for name in dtype_names:
        dtype = mod.DTYPES[name]
        provs = providers
        if args.gpu_suite and dtype == torch.float32:  # keep the suite short: no recompiles
            provs = [p for p in providers if p != "compile"]
        if not (args.gpu_suite and peers):
            cases += mod.build_cases(shapes, dtype, device, provs, modes)
            continue
        # the suite's step has a time limit: the peers only at the module's SUITE_PEER_SHAPES
        # and SUITE_PEER_DTYPES (none where it names none)
        for shape in shapes:
            if dtype in peer_dtypes and tuple(shape) in peer_shapes:
                cases += mod.build_cases([shape], dtype, device, provs, modes)
            else:
                print(f"note: --gpu-suite: providers {', '.join(peers)} left out at {name} "
                      f"{','.join(map(str, shape))}", file=sys.stderr)
                cases += mod.build_cases([shape], dtype, device,
                                         [p for p in provs if p not in peers], modes)
    run_cases(mod.OP, cases, device, csv_path=args.csv, reps=3 if args.quick else args.reps)
