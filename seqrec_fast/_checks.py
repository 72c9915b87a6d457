"""Input validation shared by every public op: errors name the offending argument."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def compiling() -> bool:
    """True while torch.compile traces (data-dependent checks and eager-only paths are skipped
    then)."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def tensor(name: str, x, *, ndim: Optional[int] = None, dtypes: Optional[Iterable] = None,
           device: Optional[torch.device] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")
    return x


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def choice(name: str, value, options) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def sequence_mask(mask, batch: int, seq_len: int, device: torch.device,
                  name: str = "mask") -> torch.Tensor:
    """Turn ``mask`` into a bool (batch, seq_len) tensor, True at real items.

    Accepts a bool ``(batch, seq_len)`` mask (any pattern) or integer ``lengths (batch,)``
    meaning the first ``length`` positions of each row are real.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool mask or int lengths), "
                        f"got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    if mask.dim() == 2:
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} of shape (batch, seq_len) must be bool, got {mask.dtype}")
        if tuple(mask.shape) != (batch, seq_len):
            raise ValueError(f"{name} must have shape (batch, seq_len) = ({batch}, {seq_len}), "
                             f"got {tuple(mask.shape)}")
        return mask
    if mask.dim() == 1:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.dtype == torch.bool:
            raise TypeError(f"{name} as lengths (batch,) must be an integer tensor, got {mask.dtype}")
        if mask.shape[0] != batch:
            raise ValueError(f"{name} as lengths must have shape ({batch},), got {tuple(mask.shape)}")
        # value check needs a host sync; skipped while torch.compile traces (data-dependent)
        if batch and not compiling() and (
                int(mask.min()) < 0 or int(mask.max()) > seq_len):
            raise ValueError(f"{name} lengths must lie in [0, {seq_len}], got range "
                             f"[{int(mask.min())}, {int(mask.max())}]")
        return torch.arange(seq_len, device=device)[None, :] < mask[:, None]
    raise ValueError(f"{name} must be a bool (batch, seq_len) mask or int (batch,) lengths, "
                     f"got shape {tuple(mask.shape)}")
