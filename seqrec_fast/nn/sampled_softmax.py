"""``SampledSoftmaxLoss``: the fused sampled softmax loss as a module."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import _checks
from ..backend import BACKENDS
from ..ops import sampled_softmax_loss


class SampledSoftmaxLoss(nn.Module):
    """Each row's positive against sampled (and optionally in-batch) negatives, fused: a module
    around ``seqrec_fast.ops.sampled_softmax_loss`` holding its options.

    Args (as the op): in_batch_negatives, remove_accidental_hits, temperature (> 0),
    reduction ("mean" | "sum" | "none"), backend, process_group.

    Bad options raise ValueError when the module is built (reduction, backend) or at the
    first call (numeric ranges, checked by the op).

    forward(user (B, d), items (n_items, d), target (B,) int64, negatives (S,) or (B, S) int64,
            log_q=None (shape of negatives), target_log_q=None (B,)) -> loss
    """

    def __init__(self, *, in_batch_negatives: bool = True, remove_accidental_hits: bool = True,
                 temperature: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 process_group=None):
        super().__init__()
        # options the op checks again at call time; caught here so a bad module never builds
        _checks.choice("reduction", reduction, ("mean", "sum", "none"))
        _checks.choice("backend", backend, BACKENDS)
        self.in_batch_negatives = in_batch_negatives
        self.remove_accidental_hits = remove_accidental_hits
        self.temperature, self.reduction = temperature, reduction
        self.backend, self.process_group = backend, process_group

    def forward(self, user: Tensor, items: Tensor, target: Tensor, negatives: Tensor,
                log_q: Optional[Tensor] = None,
                target_log_q: Optional[Tensor] = None) -> Tensor:
        return sampled_softmax_loss(user, items, target, negatives, log_q=log_q,
                                    target_log_q=target_log_q,
                                    in_batch_negatives=self.in_batch_negatives,
                                    remove_accidental_hits=self.remove_accidental_hits,
                                    temperature=self.temperature, reduction=self.reduction,
                                    backend=self.backend, process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"in_batch_negatives={self.in_batch_negatives}, "
                f"remove_accidental_hits={self.remove_accidental_hits}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}"
                + (", sharded" if self.process_group is not None else ""))
