"""``MultiInterestAttention``: the interest-extraction layer of ComiRec-SA."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _checks
from ..ops.attention import multi_interest_attention


class MultiInterestAttention(nn.Module):
    """Multi-interest self-attention owning its weights (ComiRec-SA).

    Args (``dim`` and ``num_interests`` positional, the rest keyword-only, as
    ``CapsuleRouting``):
      dim: item embedding size d.
      num_interests: K.
      hidden_dim: d_a of the tanh layer; default 4·dim as in ComiRec.
      seq_len: when given, a learned position embedding (seq_len, dim) is added to the keys
        (ComiRec's ``add_pos``); inputs may then have up to ``seq_len`` positions (L positions
        take the table's first L rows; more positions raise the op's ValueError on
        ``pos_emb``'s shape, under torch.compile too).
      bias: learn b1 and b2 (ComiRec's dense layers do).
      backend: as ``seqrec_fast.ops.multi_interest_attention``.
    Init as ComiRec's TF dense layers: Glorot-uniform w1, w2 and position table, zero biases.
    Weights are stored in the op's orientation: w1 (dim, hidden), w2 (hidden, num_interests).

    forward(seq_emb (B, L, d), mask (B, L) bool or lengths (B,), return_attention=False)
      -> interests (B, K, d) [, attention (B, K, L)]
    """

    def __init__(self, dim: int, num_interests: int, *, hidden_dim: Optional[int] = None,
                 seq_len: Optional[int] = None, bias: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        _checks.positive_int("dim", dim)
        _checks.positive_int("num_interests", num_interests)
        if hidden_dim is None:
            hidden_dim = 4 * dim
        _checks.positive_int("hidden_dim", hidden_dim)
        if seq_len is not None:
            _checks.positive_int("seq_len", seq_len)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.dim, self.num_interests, self.hidden_dim = dim, num_interests, hidden_dim
        self.seq_len, self.backend = seq_len, backend
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(dim, hidden_dim, **factory))
        self.w2 = nn.Parameter(torch.empty(hidden_dim, num_interests, **factory))
        self.b1 = nn.Parameter(torch.empty(hidden_dim, **factory)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_interests, **factory)) if bias else None
        self.pos_emb = (nn.Parameter(torch.empty(seq_len, dim, **factory))
                        if seq_len is not None else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.w1)
        nn.init.xavier_uniform_(self.w2)
        if self.b1 is not None:
            nn.init.zeros_(self.b1)
            nn.init.zeros_(self.b2)
        if self.pos_emb is not None:
            nn.init.xavier_uniform_(self.pos_emb)

    def forward(self, seq_emb: Tensor, mask: Tensor, return_attention: bool = False):
        pos = self.pos_emb
        if pos is not None and isinstance(seq_emb, Tensor) and seq_emb.dim() == 3 \
                and seq_emb.shape[1] <= self.seq_len:
            pos = pos[:seq_emb.shape[1]]
        # a longer history keeps the whole (seq_len, d) table: the op then raises its pos_emb
        # shape ValueError, compiled (torch.compile, fullgraph) or not alike
        return multi_interest_attention(seq_emb, mask, self.w1, self.b1, self.w2, self.b2,
                                        pos_emb=pos, return_attention=return_attention,
                                        backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_interests={self.num_interests}, "
                f"hidden_dim={self.hidden_dim}, seq_len={self.seq_len}, "
                f"bias={self.b1 is not None}")
