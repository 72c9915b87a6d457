"""``LinearCrossEntropyLoss``: the full-catalog softmax loss as a module."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import _checks
from ..backend import BACKENDS
from ..ops import linear_cross_entropy


class LinearCrossEntropyLoss(nn.Module):
    """Softmax cross-entropy over the whole item catalog without a (batch, n_items) logits
    tensor: a module around ``seqrec_fast.ops.linear_cross_entropy`` holding its options.

    Args (as the op): temperature (> 0), ignore_index, reduction ("mean" | "sum" | "none"),
    label_smoothing in [0, 1), backend ("auto" | "triton" | "cpp" | "eager"),
    process_group (None, or the group over which ``items`` is sharded by rows).

    Bad options raise ValueError when the module is built (reduction, backend) or at the
    first call (numeric ranges, checked by the op).

    forward(user (..., d), items (n_items, d), target (...) int64, bias=None (n_items,))
      -> scalar loss ("mean"/"sum") or per-row losses of target's shape ("none")
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0,
                 backend: str = "auto", process_group=None):
        super().__init__()
        # options the op checks again at call time; caught here so a bad module never builds
        _checks.choice("reduction", reduction, ("mean", "sum", "none"))
        _checks.choice("backend", backend, BACKENDS)
        self.temperature, self.ignore_index = temperature, ignore_index
        self.reduction, self.label_smoothing = reduction, label_smoothing
        self.backend, self.process_group = backend, process_group

    def forward(self, user: Tensor, items: Tensor, target: Tensor,
                bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(user, items, target, bias=bias,
                                    temperature=self.temperature,
                                    ignore_index=self.ignore_index, reduction=self.reduction,
                                    label_smoothing=self.label_smoothing, backend=self.backend,
                                    process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"backend={self.backend!r}"
                + (", sharded" if self.process_group is not None else ""))
