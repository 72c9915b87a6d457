"""Comparison helpers shared by the op tests."""
from __future__ import annotations

import torch

from seqrec_fast import backend as _backend

# extra absolute tolerance added to the "2x the same-dtype eager error" rule
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def describe_error(actual: torch.Tensor, expected: torch.Tensor) -> str:
    err = (actual.double() - expected.double()).abs()
    if err.numel() == 0:
        return "empty"
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return (f"max err {err.max().item():.3e} at {idx} (got {actual.double()[idx].item():.6g}, "
            f"want {expected.double()[idx].item():.6g}), mean err {err.mean().item():.3e}")


def assert_close(actual, expected, *, atol, rtol=0.0, name="value"):
    """Plain closeness with a readable message (max/mean error and where)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    assert bool((err <= bound).all()), f"{name}: {describe_error(actual, expected)}"


def assert_within_2x_eager(actual, eager, truth, *, name="value", atol=None):
    """DESIGN rule: |kernel - float64 truth| <= 2 * |same-dtype eager - truth| + atol.

    Compared as max errors over the tensor (the rule cut-cross-entropy's tests use).
    """
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values ({describe_error(actual, truth)})"
    if atol is None:
        atol = ATOL[actual.dtype]
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    ours = (actual.double() - truth).abs().max().item() if truth.numel() else 0.0
    # eager in fp16/bf16 can overflow or hit 0/0 (e.g. squash's 1e-9 underflows in fp16):
    # its error is taken over the elements where it is finite; ours must hold everywhere
    finite = torch.isfinite(eager)
    ref = (eager.double() - truth).abs()[finite].max().item() if bool(finite.any()) else 0.0
    assert ours <= 2 * ref + atol * scale, (
        f"{name}: kernel max err {ours:.3e} > 2 x eager err {ref:.3e} + {atol * scale:.1e}; "
        f"{describe_error(actual, truth)}")


def fused_backends(op: str, device: str = "cpu"):
    """The non-eager backends runnable here for ``op`` (cpp must be built when required)."""
    import os

    out = []
    for name in ("cpp", "triton", "cuda"):
        if _backend.available(op, name, torch.device(device)):
            out.append(name)
        elif name == "cpp" and device == "cpu" and os.environ.get("SEQREC_FAST_REQUIRE_EXT") == "1":
            out.append(name)  # let it fail loudly instead of silently skipping
    return out


def need_cpp(backends):
    """Skip unless ``cpp`` is among ``backends`` (``fused_backends(op)``); fail instead when the
    extension is required (SEQREC_FAST_REQUIRE_EXT=1)."""
    import os

    import pytest

    if "cpp" not in backends:
        if os.environ.get("SEQREC_FAST_REQUIRE_EXT") == "1":
            pytest.fail("the C++ extension is not built")
        pytest.skip("C++ extension not built")


def grads_of(fn, tensors, gout):
    """Run fn on fresh leaf copies of ``tensors`` (None passes through) -> (out, *grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out_t = out[0] if isinstance(out, tuple) else out
    want = [x for x in leaves if x is not None]
    gs = torch.autograd.grad(out_t, want, gout if out_t.dim() else None, allow_unused=True)
    return (out_t.detach(),) + tuple(gs)


def compare_three(fn_ours, fn_ref, tensors, gout, dtype, label):
    """Output and gradients of ``fn_ours`` in ``dtype`` against ``fn_ref`` in ``dtype`` and in
    float64 (the 2x-eager rule, ``assert_within_2x_eager``)."""
    cast = [None if t is None else t.to(dtype) for t in tensors]
    got = grads_of(fn_ours, cast, None if gout is None else gout.to(dtype))
    same = grads_of(fn_ref, cast, None if gout is None else gout.to(dtype))
    truth = grads_of(fn_ref, [None if t is None else t.double() for t in tensors],
                     None if gout is None else gout.double())
    names = ["loss"] + [f"grad{i}" for i in range(len(got) - 1)]
    for name, a, e, t in zip(names, got, same, truth):
        assert a.dtype == dtype, f"{label} {name}: dtype {a.dtype}"
        assert_within_2x_eager(a, e, t, name=f"{label} {name}")


def comirec_merge(q, it, n, mask=None, keep=None):
    """ComiRec's evaluation, literally: each interest's top-n list, the K lists concatenated,
    sorted by score (stable), the first occurrence of each id kept, ``keep`` of them (default
    n; K·n keeps the whole de-duplicated union). Float64 scores; within one interest's
    list ties go to the smaller id (as a stable sort makes them). q (U, K, d), it (N, d) ->
    per user a list of (id, score)."""
    U, K, _ = q.shape
    keep = n if keep is None else keep
    s = torch.einsum("ukd,nd->ukn", q.double(), it.double())
    out = []
    for u in range(U):
        lst = []
        for k in range(K):
            if mask is not None and not mask[u, k]:
                continue
            order = sorted(range(it.shape[0]), key=lambda i: (-s[u, k, i].item(), i))[:n]
            lst += [(i, s[u, k, i].item()) for i in order]
        lst.sort(key=lambda x: x[1], reverse=True)
        seen, merged = set(), []
        for i, v in lst:
            if i not in seen:
                seen.add(i)
                merged.append((i, v))
            if len(merged) == keep:
                break
        out.append(merged)
    return out
