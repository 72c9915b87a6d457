"""Every Triton kernel compiles for sm_90 (Hopper) at the headline shapes, without a GPU.

``bench/sm90_report.py`` runs in one subprocess (TRITON_INTERPRET unset, a stub Triton driver
reporting ``GPUTarget("cuda", 90, 32)``, the persistent cache ``build/triton_sm90_cache``): it
calls the public ops with ``backend="triton"`` forward and backward at each case's shapes, so
every kernel is compiled with the configuration its launcher picks for a GPU. Each case must
compile, use at most 227 KB of shared memory per block, not spill registers, and lower its
``tl.dot``s to wgmma.

What does not hold today is listed below, kernel by kernel, as strict xfails: fixing one makes
its test XPASS, which fails the run until its entry is deleted here. An entry that names no
compiled (case, kernel) fails ``test_expectations_name_compiled_kernels``, so renames cannot
silently drop a check.
"""
import importlib.util
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sm90_report",
                                               os.path.join(ROOT, "bench", "sm90_report.py"))
sm90 = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("sm90_report", sm90)  # dataclasses look the module up by name
_spec.loader.exec_module(sm90)

CASE_NAMES = [c.name for c in sm90.CASES]

# ----------------------------------------------------------------------------------------------
# known today (triton 3.9 / ptxas of its wheel, sm_90): (case, kernel) -> why
# ----------------------------------------------------------------------------------------------
SMALL_M = ("the (BLOCK_K=16, L)·(L, d) interests dot has M = 16 rows; wgmma needs 64 per warp "
           "group, so it lowers to mma.sync")

KNOWN_SPILLS = {
    # full-catalog cross-entropy: fp32 at d = 128 (not a headline shape) keeps a (64, 128) fp32
    # item-mean accumulator plus the hi/lo 3xTF32 parts of its user tile in registers
    ("linear_cross_entropy/full/8192x2000000x128/fp32", "_linear_cross_entropy_fwd_kernel"):
        "3xTF32 operand splits + (BLOCK_B, d) = (64, 128) fp32 accumulator, 4 warps; 88 B",
    # routing: fused MIND backward, fp32 (bf16/fp16 do not spill)
    ("routing/mind_shared/4096x50x4x64/fp32", "_routing_mind_bwd_kernel"):
        "tf32x3 dots (grad_uᵀ·E and grad_u·W, each operand split in two) next to the (d, d) "
        "fp32 dW accumulator: 255 registers at 8 warps, 40 B of spill (16 warps: worse)",
}

ATTN_FP32_TILES = ("fp32 attention backward (3xTF32: split big/small operands) takes 16-32-row "
                   "tiles to stay spill-free; dots with fewer than 64 rows lower to mma.sync")

MISSING_WGMMA = {
    ("attention/comirec_sa/4096x50x4x64/fp32", "_attention_fwd_kernel"): SMALL_M,
    ("attention/comirec_sa/4096x50x4x64/fp32", "_attention_bwd_rows_kernel"): ATTN_FP32_TILES,
    ("attention/comirec_sa/4096x50x4x64/fp32", "_attention_bwd_weights_kernel"): ATTN_FP32_TILES,
    ("attention/comirec_sa/8192x200x8x64/fp32", "_attention_fwd_kernel"): SMALL_M,
    ("attention/comirec_sa/8192x200x8x64/fp32", "_attention_bwd_rows_kernel"): ATTN_FP32_TILES,
    ("attention/comirec_sa/8192x200x8x64/fp32", "_attention_bwd_weights_kernel"): ATTN_FP32_TILES,
    ("attention/comirec_sa/4096x50x4x64/bf16", "_attention_fwd_kernel"): SMALL_M,
    ("attention/comirec_sa/4096x50x4x64/fp16", "_attention_fwd_kernel"): SMALL_M,
}


def _triton_version():
    try:
        from importlib.metadata import version
        return ".".join(version("triton").split(".")[:2])
    except Exception:  # noqa: BLE001 - no triton: the report fixture skips
        return None


TRITON = _triton_version()


def _applies(table):
    """The entries of ``table`` that hold for the installed triton: {(case, kernel): reason}.
    A value is a reason, or (reason, triton versions where it does NOT hold)."""
    out = {}
    for key, val in table.items():
        why, not_on = (val, ()) if isinstance(val, str) else val
        if TRITON not in not_on:
            out[key] = why
    return out


def _xfail_params(table):
    """Every entry as a test; strict xfail where it holds for this triton, a plain test (that
    must pass) where it is listed as not holding."""
    now = _applies(table)
    return [pytest.param(case, kernel, id=f"{case}::{kernel}",
                         marks=[pytest.mark.xfail(strict=True, reason=now[(case, kernel)])]
                         if (case, kernel) in now else [])
            for (case, kernel) in sorted(table)]


# ----------------------------------------------------------------------------------------------
# one compile run for the whole module
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path = str(tmp_path_factory.mktemp("sm90") / "report.json")
    t0 = time.perf_counter()
    r, rep = sm90.run_subprocess(path, cache_dir=sm90.DEFAULT_CACHE, timeout=1500)
    assert rep, (f"bench/sm90_report.py wrote no report (exit {r.returncode}):\n"
                 f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    rep["wall_seconds"] = time.perf_counter() - t0
    return rep


def _rows(report, case):
    return [r for r in report["rows"] if r["case"] == case]


def _row(report, case, kernel):
    rows = [r for r in _rows(report, case) if r["kernel"] == kernel]
    assert rows, f"{kernel} was not launched by {case}"
    return rows


def _describe(r):
    return (f"{r['kernel']} in {r['case']}: warps {r['num_warps']}, stages {r['num_stages']}, "
            f"{r['blocks']}, {r['regs']} regs, {r['spill_bytes']} B spill, {r['shared']} B smem, "
            f"dots: {r['lowering']}")


@pytest.mark.parametrize("case", CASE_NAMES)
def test_compiles_for_sm90(report, case):
    assert case not in report["errors"], report["errors"].get(case)
    assert _rows(report, case), f"{case} launched no Triton kernel"
    for r in _rows(report, case):
        assert r["regs"] is not None, f"no resource usage read from the cubin: {_describe(r)}"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_shared_memory_fits_sm90(report, case):
    for r in _rows(report, case):
        assert r["shared"] <= sm90.SM90_SHARED_LIMIT, _describe(r)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_no_register_spills(report, case):
    """Every kernel launched at a headline shape is hot: no local-memory spill stack."""
    bad = [_describe(r) for r in _rows(report, case)
           if (case, r["kernel"]) not in _applies(KNOWN_SPILLS) and r["spill_bytes"]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("case, kernel", _xfail_params(KNOWN_SPILLS))
def test_known_spill_is_fixed(report, case, kernel):
    for r in _row(report, case, kernel):
        assert not r["spill_bytes"], _describe(r)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_dots_lower_to_wgmma(report, case):
    """Every tl.dot of a kernel becomes a Hopper warp-group MMA (wgmma.mma_async)."""
    bad = []
    for r in _rows(report, case):
        d = r["dots"]
        if (case, r["kernel"]) in _applies(MISSING_WGMMA) or not d["tl_dots"]:
            continue
        if d["other_dots"] or not d["wgmma_dots"] or not d["ptx_wgmma"]:
            bad.append(_describe(r))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("case, kernel", _xfail_params(MISSING_WGMMA))
def test_missing_wgmma_is_fixed(report, case, kernel):
    for r in _row(report, case, kernel):
        d = r["dots"]
        assert d["wgmma_dots"] and not d["other_dots"] and d["ptx_wgmma"], _describe(r)


def test_expectations_name_compiled_kernels(report):
    """Every xfail entry names a (case, kernel) that was compiled, and every case exists."""
    compiled = {(r["case"], r["kernel"]) for r in report["rows"]}
    stale = sorted(set(KNOWN_SPILLS) - compiled) + sorted(set(MISSING_WGMMA) - compiled)
    assert not stale, f"entries naming nothing compiled (renamed kernel or case?): {stale}"


def test_every_triton_kernel_is_compiled(report):
    """Each @triton.jit ``*_kernel`` of seqrec_fast.kernels is launched by some case."""
    launched = {f"{r['module']}.{r['kernel']}" for r in report["rows"]}
    missing = sorted(set(report["jit_kernels"]) - launched)
    assert report["jit_kernels"], "no Triton kernels discovered in seqrec_fast.kernels"
    assert not missing, f"kernels no case launches (add a case to bench/sm90_report.py): {missing}"
