"""``CapsuleRouting``: the interest-extraction layer of MIND and ComiRec-DR."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.routing import capsule_routing
from ..reference.routing import SOFTMAX_AXES


class CapsuleRouting(nn.Module):
    """Dynamic routing layer owning its bilinear weight.

    Args (``dim`` and ``num_interests`` positional, the rest keyword-only, as
    ``MultiInterestAttention``):
      dim: item embedding size d.
      num_interests: K.
      seq_len: L, needed by ``bilinear="per_position"`` (one map per position and interest).
      bilinear: "per_position" (ComiRec-DR, weight (L, K*d, d), init N(0, 1) as ComiRec's
        code) or "shared" (MIND, weight (d, d), Glorot-uniform like a dense layer).
      iters, softmax_axis, detach_routing, backend: as ``seqrec_fast.ops.capsule_routing``
        (softmax_axis "interest" | "sequence" (torch-rechub: over all L positions) |
        "sequence_real" (over the real positions)). Under torch.autocast the layer runs in
        the autocast dtype (its weight stays fp32 and gets fp32 gradients).
      init_logits: "zeros" (ComiRec-DR) or "normal" (MIND: fresh N(0, 1) logits each call,
        drawn from the generator given to ``forward`` so runs are reproducible).
    Default init_logits: "normal" for shared, "zeros" for per_position.

    forward(seq_emb (B, L, d), mask (B, L) bool or lengths (B,), generator=None,
            init_logits=None) -> (B, K, d)
    """

    def __init__(self, dim: int, num_interests: int, *, seq_len: Optional[int] = None,
                 bilinear: str = "per_position", iters: int = 3,
                 softmax_axis: str = "interest", detach_routing: bool = True,
                 init_logits: Optional[str] = None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("num_interests", num_interests)
        _checks.positive_int("iters", iters)
        _checks.choice("bilinear", bilinear, ("per_position", "shared"))
        _checks.choice("softmax_axis", softmax_axis, SOFTMAX_AXES)
        if init_logits is None:
            init_logits = "normal" if bilinear == "shared" else "zeros"
        _checks.choice("init_logits", init_logits, ("zeros", "normal"))
        self.dim, self.num_interests, self.iters = dim, num_interests, iters
        self.bilinear, self.softmax_axis = bilinear, softmax_axis
        self.detach_routing, self.init_logits, self.backend = detach_routing, init_logits, backend
        factory = {"device": device, "dtype": dtype}
        if bilinear == "shared":
            self.seq_len = seq_len
            self.weight = nn.Parameter(torch.empty(dim, dim, **factory))
        else:
            if seq_len is None:
                raise ValueError("seq_len is required for bilinear='per_position'")
            _checks.positive_int("seq_len", seq_len)
            self.seq_len = seq_len
            self.weight = nn.Parameter(torch.empty(seq_len, num_interests * dim, dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.bilinear == "shared":
            bound = math.sqrt(6.0 / (2 * self.dim))
            nn.init.uniform_(self.weight, -bound, bound)
        else:
            nn.init.normal_(self.weight, 0.0, 1.0)

    def forward(self, seq_emb: Tensor, mask: Tensor,
                generator: Optional[torch.Generator] = None,
                init_logits: Optional[Tensor] = None) -> Tensor:
        """seq_emb (B, L, d), mask (B, L) bool or lengths (B,) -> interests (B, K, d).

        ``init_logits (B, K, L)`` overrides the layer's own logits (e.g. under
        torch.compile, which cannot take a Generator argument).
        """
        init = init_logits
        if init is None and self.init_logits == "normal":
            _checks.tensor("seq_emb", seq_emb, ndim=3)
            B, L, _ = seq_emb.shape
            init = torch.randn(B, self.num_interests, L, device=seq_emb.device,
                               dtype=torch.float32, generator=generator)
        return capsule_routing(seq_emb, mask, self.weight, num_interests=self.num_interests,
                               iters=self.iters, bilinear=self.bilinear, init_logits=init,
                               softmax_axis=self.softmax_axis,
                               detach_routing=self.detach_routing, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_interests={self.num_interests}, seq_len={self.seq_len}, "
                f"bilinear={self.bilinear!r}, iters={self.iters}, "
                f"softmax_axis={self.softmax_axis!r}, detach_routing={self.detach_routing}")
