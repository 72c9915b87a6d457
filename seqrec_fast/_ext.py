"""Loads the optional compiled extension ``seqrec_fast._C``; never raises."""
from __future__ import annotations

_C = None
LOAD_ERROR: str | None = None

try:  # the extension is optional: a missing or broken build must not break the import
    import torch  # noqa: F401  (the extension links against torch's libraries)

    import importlib

    _C = importlib.import_module("seqrec_fast._C")
except Exception as exc:  # noqa: BLE001
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def has(symbol: str) -> bool:
    """True when the extension is loaded and exports ``symbol``."""
    return _C is not None and hasattr(_C, symbol)


def with_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))
