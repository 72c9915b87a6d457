"""The one place where an op's backend is chosen.

``backend`` is one of ``"auto" | "triton" | "cuda" | "cpp" | "eager"``. ``"auto"`` can be
overridden with the environment variable ``SEQREC_FAST_BACKEND``. ``auto`` picks, for CUDA
tensors, Triton (then the CUDA extension, then eager); for CPU tensors, the C++ extension (then
eager). Only ``auto`` falls back, and it says so once per (op, backend) through ``warnings``.
A backend named explicitly that cannot run raises ``ValueError``/``RuntimeError``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "cpp", "eager")
_warned: set = set()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def reason_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``, else why not."""
    if backend == "eager":
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreting():
            return ("Triton kernels run on CPU tensors only under the interpreter: set "
                    "TRITON_INTERPRET=1 before importing seqrec_fast")
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on device type {device.type!r}"
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the 'cpp' backend runs on CPU tensors, got {device.type} tensors"
        if _ext._C is None:
            return f"the C++ extension is not built ({_ext.LOAD_ERROR})"
        if not _ext.has(f"{op}_fwd_cpu"):
            return f"the C++ extension has no CPU kernel for {op!r}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got {device.type} tensors"
        if _ext._C is None:
            return f"the C++ extension is not built ({_ext.LOAD_ERROR})"
        if not _ext.has(f"{op}_fwd_cuda"):
            return f"the extension was built without a CUDA kernel for {op!r}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def available(op: str, backend: str, device: torch.device | str = "cpu") -> bool:
    return reason_unavailable(op, backend, torch.device(device)) is None


def resolve(op: str, backend: str, device: torch.device) -> str:
    """Return the concrete backend that runs ``op`` for tensors on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("SEQREC_FAST_BACKEND", "auto") or "auto"
        if env not in BACKENDS:
            raise ValueError(f"SEQREC_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend != "auto":
        why = reason_unavailable(op, backend, device)
        if why is not None:
            raise RuntimeError(f"{op}: backend {backend!r} is not available: {why}")
        return backend
    order = ("triton", "cuda", "eager") if device.type == "cuda" else ("cpp", "eager")
    skipped = []
    for cand in order:
        why = reason_unavailable(op, cand, device)
        if why is None:
            if skipped and (op, cand) not in _warned:
                _warned.add((op, cand))
                warnings.warn(f"seqrec_fast.{op}: backend 'auto' fell back to {cand!r} "
                              f"({'; '.join(skipped)})", RuntimeWarning, stacklevel=3)
            return cand
        skipped.append(f"{cand}: {why}")
    return "eager"  # unreachable: eager is always available
