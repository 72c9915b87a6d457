"""sm_90 compile report without a GPU: every Triton kernel, compiled for Hopper at the
headline shapes, with its registers, spill stack, shared memory and how its dots lowered.

    python bench/sm90_report.py                  # compile (cached), print the Markdown table
    python bench/sm90_report.py --json out.json  # also write the rows as JSON (the test reads it)

How (DESIGN.md, "Testing without a GPU"): the active Triton driver is replaced by a stub whose
target is ``GPUTarget("cuda", 90, 32)``. A JIT launch then parses, lowers and runs ptxas for
sm_90 exactly as on a Hopper card, and the stub's launcher records the launch instead of running
it. The public ops are called with ``backend="triton"`` on CPU tensors of the real shapes (a
data pointer only matters for Triton's 16-byte alignment specialisation); the large tables are
``torch.empty`` (never touched, so they cost address space, not memory). Outputs are garbage:
nothing runs. The launchers' GPU heuristics (tile sizes, warps, stages) are selected by
answering their device questions the way a CUDA device would (``gpu_tuned`` -> True,
``num_sms`` -> 132, an H100/H200 SXM); ``TRITON_INTERPRET`` must be unset in this process,
which ``main`` checks (run it as a script or in a subprocess, never inside the interpreter
session of the tests).

Resource figures come from the cubin (``cuobjdump --dump-resource-usage``: REG, STACK = local
memory per thread, which is the spill stack here) and the kernel metadata (``shared``: the
dynamic shared memory the launch requests). Dots: ``ttng.warp_group_dot`` in the TTGIR is a dot
lowered to wgmma (``wgmma.mma_async`` in the PTX); a remaining ``tt.dot`` lowered to ``mma.sync``
(tensor cores, pre-Hopper style) or, when the PTX has no mma at all, to FMA.

Module-level code imports neither triton nor the kernels: tests import ``CASES`` and the
expectation tables without compiling anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(ROOT, "build", "triton_sm90_cache")
SM90_SHARED_LIMIT = 232448  # 227 KB: the opt-in maximum of dynamic shared memory per block
SM90_NUM_SMS = 132          # H100 SXM / H200
REGEN_COMMAND = "python bench/sm90_report.py"


# ----------------------------------------------------------------------------------------------
# the cases: public ops at the headline shapes, forward and backward
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    name: str                       # "op/variant/shape/dtype", the id the test uses
    op: str
    dtype: str                      # "fp32" | "bf16" | "fp16"
    run: Callable[["object"], None]  # run(torch.dtype): forward (+ backward) once
    note: str = ""                  # shapes actually used when they differ from the headline


def _dt(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _routing(B, L, K, d, bilinear):
    def run(dtype):
        import torch
        from seqrec_fast.ops import capsule_routing
        seq = torch.zeros(B, L, d, dtype=dtype, requires_grad=True)
        mask = torch.ones(B, L, dtype=torch.bool)
        if bilinear == "shared":  # MIND: one map, N(0, 1) initial logits (passed in)
            w = torch.zeros(d, d, dtype=dtype, requires_grad=True)
            init = torch.zeros(B, K, L)
        else:                     # ComiRec-DR: one map per (position, interest), zero logits
            w = torch.zeros(L, K * d, d, dtype=dtype, requires_grad=True)
            init = None
        v = capsule_routing(seq, mask, w, num_interests=K, bilinear=bilinear, init_logits=init,
                            backend="triton")
        v.backward(torch.ones_like(v))
    return run


def _attention(B, L, K, d, d_a):
    def run(dtype):
        import torch
        from seqrec_fast.ops import multi_interest_attention
        z = dict(dtype=dtype, requires_grad=True)
        seq = torch.zeros(B, L, d, **z)
        mask = torch.ones(B, L, dtype=torch.bool)
        w1, b1 = torch.zeros(d, d_a, **z), torch.zeros(d_a, **z)
        w2, b2 = torch.zeros(d_a, K, **z), torch.zeros(K, **z)
        pos = torch.zeros(L, d, **z)
        out = multi_interest_attention(seq, mask, w1, b1, w2, b2, pos_emb=pos, backend="triton")
        out.backward(torch.ones_like(out))
    return run


def _linear_ce(B, N, d):
    def run(dtype):
        import torch
        from seqrec_fast.ops import linear_cross_entropy
        user = torch.zeros(B, d, dtype=dtype, requires_grad=True)
        items = torch.empty(N, d, dtype=dtype).requires_grad_()  # never touched: no memory
        target = torch.zeros(B, dtype=torch.int64)
        linear_cross_entropy(user, items, target, backend="triton").backward()
    return run


def _sampled(B, N, S, d, per_row):
    def run(dtype):
        import torch
        from seqrec_fast.ops import sampled_softmax_loss
        user = torch.zeros(B, d, dtype=dtype, requires_grad=True)
        items = torch.empty(N, d, dtype=dtype).requires_grad_()
        target = torch.zeros(B, dtype=torch.int64)
        shape = (B, S) if per_row else (S,)
        neg = torch.zeros(shape, dtype=torch.int64)
        log_q = torch.zeros(shape)
        sampled_softmax_loss(user, items, target, neg, log_q=log_q, target_log_q=torch.zeros(B),
                             backend="triton").backward()
    return run


def _topk(U, K, N, d, n):
    def run(dtype):
        import torch
        from seqrec_fast.ops import multi_interest_topk
        multi_interest_topk(torch.zeros(U, K, d, dtype=dtype), torch.empty(N, d, dtype=dtype), n,
                            backend="triton")
    return run


def _diverse(U, M, n):
    def run(dtype):
        import torch
        from seqrec_fast.ops.diverse_topk import diverse_topk
        ids = torch.arange(M, dtype=torch.int64).expand(U, M)
        diverse_topk(torch.zeros(U, M, dtype=dtype), ids, torch.zeros(M, dtype=torch.int64), n,
                     1.0, backend="triton")
    return run


def _cases() -> List[Case]:
    out = []

    def add(op, variant, shape, dtype, run, note=""):
        out.append(Case(f"{op}/{variant}/{'x'.join(map(str, shape))}/{dtype}", op, dtype, run,
                        note))

    # capsule_routing (B, L, K, d). The kernel config depends on (L, K, d) only (B is the grid),
    # so B is cut where the CPU-side bilinear GEMM (done by torch, for real) would be slow.
    for dt in ("fp32", "bf16", "fp16"):
        add("routing", "mind_shared", (4096, 50, 4, 64), dt, _routing(4096, 50, 4, 64, "shared"))
    add("routing", "dr_per_position", (4096, 50, 4, 64), "fp32",
        _routing(4096, 50, 4, 64, "per_position"))
    for dt in ("bf16", "fp16"):
        add("routing", "dr_per_position", (4096, 50, 4, 64), dt,
            _routing(256, 50, 4, 64, "per_position"), "B=256 (grid only)")
    for dt in ("fp32", "bf16"):
        add("routing", "dr_per_position", (8192, 200, 8, 64), dt,
            _routing(256, 200, 8, 64, "per_position"), "B=256 (grid only)")
    # multi_interest_attention (B, L, K, d), d_a = 4d
    for dt in ("fp32", "bf16", "fp16"):
        add("attention", "comirec_sa", (4096, 50, 4, 64), dt, _attention(4096, 50, 4, 64, 256))
    add("attention", "comirec_sa", (8192, 200, 8, 64), "fp32", _attention(8192, 200, 8, 64, 256))
    # linear_cross_entropy (B, N, d)
    for dt in ("fp32", "bf16", "fp16"):
        add("linear_cross_entropy", "full", (4096, 1_000_000, 64), dt,
            _linear_ce(4096, 1_000_000, 64))
    for dt in ("fp32", "bf16"):
        add("linear_cross_entropy", "full", (8192, 2_000_000, 128), dt,
            _linear_ce(8192, 2_000_000, 128))
    # sampled_softmax_loss (B, N, S, d): shared negatives + in-batch, logQ, hit removal
    for dt in ("fp32", "bf16", "fp16"):
        add("sampled_softmax", "shared_neg", (4096, 1_000_000, 8192, 64), dt,
            _sampled(4096, 1_000_000, 8192, 64, False))
    for dt in ("fp32", "bf16", "fp16"):
        add("sampled_softmax", "per_row_neg", (4096, 1_000_000, 128, 64), dt,
            _sampled(4096, 1_000_000, 128, 64, True))
    # retrieval (inference only): top-n by max over interests, controllable aggregation
    for dt in ("fp32", "bf16", "fp16"):
        add("multi_interest_topk", "eval", (100_000, 4, 1_000_000, 64, 50), dt,
            _topk(100_000, 4, 1_000_000, 64, 50))
    add("diverse_topk", "eval", (4096, 200, 50), "fp32", _diverse(4096, 200, 50))
    return out


CASES: List[Case] = _cases()

# ----------------------------------------------------------------------------------------------
# what is seen today (triton 3.9, sm_90): the test asserts these with strict xfails, so a fix
# turns them into failures until the entry is removed. Keys: (case name, kernel name).
# ----------------------------------------------------------------------------------------------
KNOWN_SPILLS: Dict[Tuple[str, str], str] = {}
MISSING_WGMMA: Dict[Tuple[str, str], str] = {}


# ----------------------------------------------------------------------------------------------
# the stub driver
# ----------------------------------------------------------------------------------------------
class _Function:
    """What ``load_binary`` hands back: the kernel's name and cubin bytes."""

    def __init__(self, name, cubin):
        self.name, self.cubin = name, cubin


class _Launcher:
    """Replaces the driver's launcher class: records each launch, runs nothing."""

    launches: List[tuple] = []
    label: str = ""

    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        _Launcher.launches.append((_Launcher.label, self.src, self.metadata, function,
                                   (gridX, gridY, gridZ)))


class _Utils:
    def get_device_properties(self, device):
        # max_shared_mem above the real limit on purpose: the launch proceeds, the report
        # compares ``shared`` with SM90_SHARED_LIMIT itself
        return {"max_shared_mem": 1 << 30, "multiprocessor_count": SM90_NUM_SMS,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1_980_000,
                "mem_clock_rate": 2_619_000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads); 3.6 and 3.9 agree on this
        return 1, _Function(name, kernel), 0, 0, 1024

    def unload_module(self, module):
        pass


class StubDriver:
    """A Triton driver that reports an sm_90 device and launches nothing.

    Installed with ``triton.runtime.driver.driver.set_active``; it answers what the JIT
    (``runtime/jit.py``) and ``CompiledKernel`` (``compiler/compiler.py``) ask a driver in triton
    3.6 and 3.9: target, device, stream, device properties (shared-memory limit), binary
    loading (3.9 also calls ``unload_module`` when a kernel is freed) and the launcher class.
    """

    launcher_cls = _Launcher

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)
        self.utils = _Utils()

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return divmod(self.target.arch, 10)

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_benchmarker(self):
        raise RuntimeError("the sm_90 stub driver compiles only; nothing can be timed")


def install_stub():
    """Make every JIT launch in this process compile for sm_90 and run nothing; make the
    launchers choose their GPU configurations for CPU tensors."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET must be unset: the interpreter never compiles "
                           "(run bench/sm90_report.py as a script / in a subprocess)")
    from triton.runtime.driver import driver
    driver.set_active(StubDriver())
    _answer_as_cuda()


def _kernel_modules():
    import importlib
    import pkgutil
    import seqrec_fast.kernels as pkg
    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mods.append(importlib.import_module(f"{pkg.__name__}.{info.name}"))
    return mods


def _answer_as_cuda():
    """The launchers pick GPU tile sizes only for CUDA tensors (``gpu_tuned``) and size grids
    from the SM count; answer those questions as an sm_90 device would. Done by name in every
    kernel module (they import the helpers with ``from ._utils import ...``), so it keeps
    working as kernels move between modules. Also lets ``backend="triton"`` accept CPU tensors
    without the interpreter."""
    import seqrec_fast.backend as be
    be.triton_interpreting = lambda: True  # only read by the availability check (and info())
    patched = []
    for mod in _kernel_modules():
        for name in ("gpu_tuned",):
            if callable(getattr(mod, name, None)):
                setattr(mod, name, lambda device: True)
                patched.append(f"{mod.__name__}.{name}")
        for name in ("num_sms", "_num_sms"):
            if callable(getattr(mod, name, None)):
                setattr(mod, name, lambda device: SM90_NUM_SMS)
                patched.append(f"{mod.__name__}.{name}")
    return patched


# ----------------------------------------------------------------------------------------------
# reading a compiled kernel
# ----------------------------------------------------------------------------------------------
def _tool(name):
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _resource_usage(cubin: bytes, name: str) -> Dict[str, int]:
    """REG / STACK / SHARED / LOCAL of ``name`` from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    res, in_fn = {}, False
    for line in out.splitlines():
        if line.strip().startswith("Function "):
            in_fn = line.strip()[len("Function "):].rstrip(":") == name
        elif in_fn and "REG:" in line:
            res = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)}
            break
    return res


def _find_compiled(src, metadata):
    """The CompiledKernel of a recorded launch (for its asm), from the JIT function's cache."""
    want = getattr(metadata, "hash", None)
    caches = getattr(src.fn, "device_caches", {})
    for entry in list(caches.values()):
        for k in list(entry[0].values()):  # entry[0]: the kernel cache in 3.6 and 3.9
            k = k.result() if hasattr(k, "result") and not hasattr(k, "asm") else k
            if getattr(k, "hash", None) == want or getattr(getattr(k, "metadata", None), "hash",
                                                           None) == want:
                return k
    return None


def _dots(asm) -> Dict[str, int]:
    ttgir = asm.get("ttgir", "")
    ptx = asm.get("ptx", "")
    ttir = asm.get("ttir", "")
    return {
        "tl_dots": len(re.findall(r"= tt\.dot ", ttir)),
        "wgmma_dots": len(re.findall(r"= ttng\.warp_group_dot ", ttgir)),
        "other_dots": len(re.findall(r"= tt\.dot ", ttgir)),
        "ptx_wgmma": ptx.count("wgmma.mma_async"),
        "ptx_mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
    }


def _lowering(d: Dict[str, int]) -> str:
    if d["tl_dots"] == 0:
        return "no dot"
    parts = []
    if d["wgmma_dots"]:
        parts.append(f"{d['wgmma_dots']} wgmma")
    if d["other_dots"]:
        parts.append(f"{d['other_dots']} {'mma' if d['ptx_mma_sync'] else 'fma'}")
    return ", ".join(parts) or "?"


def _row(label, src, metadata, function) -> dict:
    fn = src.fn
    names = list(getattr(fn, "arg_names", []))
    params = getattr(fn, "params", [])
    constexpr_idx = {p.num for p in params if getattr(p, "is_constexpr", False)}
    consts = {}
    for key, val in getattr(src, "constants", {}).items():
        i = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        if isinstance(i, int) and i < len(names) and i in constexpr_idx:
            consts[names[i]] = val if isinstance(val, (bool, int, float, str)) else str(val)
    compiled = _find_compiled(src, metadata)
    asm = dict(compiled.asm) if compiled is not None else {}
    cubin = asm.get("cubin", getattr(function, "cubin", b""))
    res = _resource_usage(cubin, metadata.name) if cubin else {}
    dots = _dots(asm)
    return dict(case=label, kernel=fn.__name__, module=fn.module if hasattr(fn, "module") else "",
                num_warps=metadata.num_warps, num_stages=metadata.num_stages,
                blocks={k: v for k, v in consts.items() if "BLOCK" in k},
                constexprs=consts, regs=res.get("REG"), spill_bytes=res.get("STACK"),
                local_bytes=res.get("LOCAL"), shared=metadata.shared, dots=dots,
                lowering=_lowering(dots))


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------
def compile_all(cases: List[Case], log=None) -> dict:
    """Compile every case under the stub; -> {"rows": [...], "errors": {case: text},
    "seconds": {case: s}, versions}."""
    import traceback

    import torch
    import triton
    install_stub()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows, errors, seconds, seen = [], {}, {}, set()
    for case in cases:
        _Launcher.launches.clear()
        _Launcher.label = case.name
        t0 = time.perf_counter()
        try:
            case.run(_dt(case.dtype))
        except Exception as e:  # noqa: BLE001 - a compile error is a result of the report
            errors[case.name] = f"{type(e).__name__}: {e}\n" + "".join(
                traceback.format_exc(limit=-3))[-3000:]
        seconds[case.name] = round(time.perf_counter() - t0, 2)
        for label, src, metadata, function, _grid in list(_Launcher.launches):
            key = (label, metadata.hash)
            if key in seen:
                continue
            seen.add(key)
            rows.append(dict(_row(label, src, metadata, function), note=case.note))
        if log:
            n = sum(1 for r in rows if r["case"] == case.name)
            log(f"{case.name}: {n} kernels, {seconds[case.name]} s"
                + (" ERROR" if case.name in errors else ""))
    jit_kernels = sorted({f"{m.__name__}.{n}" for m in _kernel_modules() for n, v in vars(m).items()
                          if n.endswith("_kernel") and type(v).__name__ == "JITFunction"})
    return dict(rows=rows, errors=errors, seconds=seconds, jit_kernels=jit_kernels,
                triton=triton.__version__, torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))


def markdown(report: dict) -> str:
    head = ("| kernel | case (op/variant/shape/dtype) | warps | stages | blocks | regs | "
            "spill B | shared B | dots |")
    lines = [head, "|" + "---|" * 9]
    for r in report["rows"]:
        blocks = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["blocks"].items())
        flag = ""
        if r["spill_bytes"]:
            flag += " **spill**"
        if r["shared"] > SM90_SHARED_LIMIT:
            flag += " **smem>227K**"
        case = r["case"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['kernel']} | {case} | {r['num_warps']} | {r['num_stages']} | "
                     f"{blocks} | {r['regs']} | {r['spill_bytes']}{flag} | {r['shared']} | "
                     f"{r['lowering']} |")
    for case, err in report["errors"].items():
        lines.append(f"| (error) | {case} | | | | | | | {err.splitlines()[0][:120]} |")
    return "\n".join(lines)


def run_subprocess(json_path: str, cache_dir: str = DEFAULT_CACHE, timeout: float = 1200,
                   cases: Optional[List[str]] = None) -> Tuple[subprocess.CompletedProcess, dict]:
    """Run this script in a fresh process without TRITON_INTERPRET (tests use this)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = cache_dir
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; 1 = its default
    cmd = [sys.executable, os.path.abspath(__file__), "--json", json_path, "--quiet"]
    if cases:
        cmd += ["--cases", ",".join(cases)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    report = {}
    if os.path.exists(json_path):
        with open(json_path) as f:
            report = json.load(f)
    return r, report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the report rows as JSON here")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--cache-dir", default=None,
                    help=f"TRITON_CACHE_DIR (default: $TRITON_CACHE_DIR or {DEFAULT_CACHE})")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", args.cache_dir or DEFAULT_CACHE)
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the interpreter does not compile")
    cases = CASES
    if args.cases:
        want = args.cases.split(",")
        unknown = sorted(set(want) - {c.name for c in CASES})
        if unknown:
            ap.error(f"unknown cases: {unknown}")
        cases = [c for c in CASES if c.name in want]
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    report = compile_all(cases, log)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(f"sm_90 compile report ({report['date']}, triton {report['triton']}, "
          f"torch {report['torch']}; `{REGEN_COMMAND}`)\n")
    print(markdown(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
