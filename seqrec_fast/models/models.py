"""YouTubeDNN, GRU4Rec, MIND, ComiRec-DR, ComiRec-SA (ComiRec's code is the reference for
defaults). All share :class:`~seqrec_fast.models.base.SeqRecModel`'s interface."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _checks
from ..nn.attention import MultiInterestAttention
from ..nn.routing import CapsuleRouting
from .base import SeqRecModel


class YouTubeDNN(SeqRecModel):
    """Masked mean of the history embeddings followed by a linear layer (K = 1)."""

    def __init__(self, n_items: int, dim: int = 64, max_len: int = 20, **kw):
        super().__init__(n_items, dim, max_len, **kw)
        self.proj = nn.Linear(dim, dim)

    def user_embeddings(self, history: Tensor, mask: Tensor) -> Tensor:
        """history (B, L) int64, mask (B, L) bool -> (B, 1, d)."""
        history, mask = self._check_history(history, mask)
        e = self.embed(history)
        m = mask.unsqueeze(-1).to(e.dtype)
        mean = (e * m).sum(1) / (m.sum(1) + 1e-9)
        return self.proj(mean).unsqueeze(1)


class GRU4Rec(SeqRecModel):
    """GRU over the history; the hidden state after the last real item (K = 1)."""

    def __init__(self, n_items: int, dim: int = 64, max_len: int = 20, **kw):
        super().__init__(n_items, dim, max_len, **kw)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def user_embeddings(self, history: Tensor, mask: Tensor) -> Tensor:
        """history (B, L) int64, mask (B, L) bool (any padding side) -> (B, 1, d)."""
        history, mask = self._check_history(history, mask)
        # real items first, in order (handles left and right padding alike)
        order = (~mask).to(torch.int8).argsort(dim=1, stable=True)
        hist = history.gather(1, order)
        lens = mask.sum(1)
        e = self.embed(hist)
        # right-aligned after the reordering: the output at position len-1 only saw real items
        # (cheaper on CPU than pack_padded_sequence, identical result)
        out, _ = self.gru(e)                                      # (B, L, d)
        last = (lens - 1).clamp(min=0)
        h = out[torch.arange(out.shape[0], device=out.device), last]
        h = h * (lens > 0).unsqueeze(-1).to(h.dtype)
        return h.unsqueeze(1)


class _MultiInterest(SeqRecModel):
    multi_interest = True

    def __init__(self, n_items, dim=64, max_len=20, *, num_interests=4, **kw):
        super().__init__(n_items, dim, max_len, **kw)
        self.num_interests = _checks.positive_int("num_interests", num_interests)


class ComiRecDR(_MultiInterest):
    """ComiRec-DR: dynamic routing with one bilinear map per (position, interest), zero initial
    logits, 3 iterations, interests over the sequence of ``max_len`` positions (no layer after
    the routing).

    bilinear_init: how the L·K maps W[l, k] (d × d) start.
      "identity" (default): W[l, k] = I + N(0, 0.01/d) noise — every capsule starts as a routed
        average of the history's item embeddings, i.e. already in the space of the (shared)
        output item table, and the noise breaks the symmetry between the K capsules.
      "normal": N(0, 1) entries, ComiRec's TF initializer. The L·K independent random maps send
        the same item to unrelated directions at different positions, and the model must first
        make them agree: on short runs it trains far slower (figures in bench/NOTES.md, "Model
        initialisation"). Over ComiRec's hundreds of thousands of steps the start matters
        little. The routing itself is ComiRec's either way.
    """
    interest_op = "routing"
    fixed_len = True
    BILINEAR_INITS = ("identity", "normal")

    def __init__(self, n_items: int, dim: int = 64, max_len: int = 20, *, num_interests: int = 4,
                 iters: int = 3, softmax_axis: str = "interest", detach_routing: bool = True,
                 bilinear_init: str = "identity", **kw):
        super().__init__(n_items, dim, max_len, num_interests=num_interests, **kw)
        _checks.choice("bilinear_init", bilinear_init, self.BILINEAR_INITS)
        self.bilinear_init = bilinear_init
        self.routing = CapsuleRouting(dim, num_interests, seq_len=max_len, bilinear="per_position",
                                      iters=iters, softmax_axis=softmax_axis,
                                      detach_routing=detach_routing, backend=self.backend)
        if bilinear_init == "identity":
            with torch.no_grad():
                w = self.routing.weight.view(max_len, num_interests, dim, dim)
                w.normal_(0.0, 0.1 / math.sqrt(dim))
                w += torch.eye(dim, dtype=w.dtype, device=w.device)

    def user_embeddings(self, history: Tensor, mask: Tensor) -> Tensor:
        """history (B, L=max_len) int64, mask (B, L) bool -> (B, K, d)."""
        history, mask = self._check_history(history, mask)
        return self.routing(self.embed(history), mask)


class MIND(_MultiInterest):
    """MIND: routing with one shared bilinear map, N(0, 1) initial logits (drawn from the model's
    generator), a ReLU projection of the capsules (as ComiRec's MIND), optional dynamic interest
    number K_u = max(1, min(K, floor(log2(n_u)))) — inactive interests repeat interest 0 so they
    add nothing after de-duplication. Readout: hard by default, ``readout="pow"`` for MIND's
    label-aware attention."""
    interest_op = "routing"

    def __init__(self, n_items: int, dim: int = 64, max_len: int = 20, *, num_interests: int = 4,
                 iters: int = 3, dynamic_k: bool = False, relu_layer: bool = True,
                 softmax_axis: str = "interest", detach_routing: bool = True, **kw):
        super().__init__(n_items, dim, max_len, num_interests=num_interests, **kw)
        self.routing = CapsuleRouting(dim, num_interests, seq_len=max_len, bilinear="shared",
                                      iters=iters,
                                      softmax_axis=softmax_axis, detach_routing=detach_routing,
                                      init_logits="normal", backend=self.backend)
        self.dynamic_k = bool(dynamic_k)
        self.proj = nn.Linear(dim, dim) if relu_layer else None

    def user_embeddings(self, history: Tensor, mask: Tensor) -> Tensor:
        """history (B, L) int64, mask (B, L) bool -> (B, K, d)."""
        history, mask = self._check_history(history, mask)
        v = self.routing(self.embed(history), mask, generator=self.generator)
        if self.proj is not None:
            v = torch.relu(self.proj(v))
        if self.dynamic_k:
            n = mask.sum(1).clamp(min=1).to(torch.float32)
            k_u = torch.clamp(torch.floor(torch.log2(n)), 1, self.num_interests)      # (B,)
            active = torch.arange(self.num_interests, device=v.device)[None, :] < k_u[:, None]
            v = torch.where(active[:, :, None], v, v[:, :1].expand_as(v))
        return v


class ComiRecSA(_MultiInterest):
    """ComiRec-SA: H = tanh((E + P)·W1 + b1) with d_a = 4d, A = H·W2 + b2, masked softmax over the
    sequence, interests = Aᵀ·E (values without the position embedding P). The layer is
    :class:`seqrec_fast.nn.MultiInterestAttention` (``self.attention``); its position table
    starts as N(0, 1/d) here."""
    interest_op = "attention"

    def __init__(self, n_items: int, dim: int = 64, max_len: int = 20, *, num_interests: int = 4,
                 hidden: int = None, add_pos: bool = True, **kw):
        super().__init__(n_items, dim, max_len, num_interests=num_interests, **kw)
        self.attention = MultiInterestAttention(dim, num_interests, hidden_dim=hidden or 4 * dim,
                                                seq_len=max_len if add_pos else None,
                                                backend=self.backend)
        if self.attention.pos_emb is not None:
            nn.init.normal_(self.attention.pos_emb, 0.0, 1.0 / math.sqrt(dim))

    def user_embeddings(self, history: Tensor, mask: Tensor) -> Tensor:
        """history (B, L <= max_len) int64, mask (B, L) bool -> (B, K, d)."""
        history, mask = self._check_history(history, mask)
        L = history.shape[1]
        if L > self.max_len:
            raise ValueError(f"history has seq_len {L} > max_len {self.max_len}")
        return self.attention(self.embed(history), mask)


MODELS = {"youtubednn": YouTubeDNN, "gru4rec": GRU4Rec, "mind": MIND, "comirec-dr": ComiRecDR,
          "comirec-sa": ComiRecSA}


def build_model(name: str, n_items: int, **kwargs) -> SeqRecModel:
    """Model by name ("youtubednn", "gru4rec", "mind", "comirec-dr", "comirec-sa"; "_" or "-")."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().replace("_", "-")
    if key not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[key](n_items, **kwargs)
