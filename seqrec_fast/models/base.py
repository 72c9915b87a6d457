"""Shared model machinery: item table, readout, sampled / full softmax loss.

Every model implements ``user_embeddings(history (B, L) int64, mask (B, L) bool) -> (B, K, d)``
(K = 1 for single-interest models); ``item_embeddings() -> (n_items, d)`` (row 0 = padding) and
``loss(batch) -> scalar`` come from here.

Defaults follow ComiRec's code: d = 64, hard readout (the interest with the highest score against
the target), sampled softmax with ``neg_ratio · B`` (10 × batch) negatives shared by the batch,
drawn log-uniformly over the popularity-sorted ids, logQ-corrected, accidental hits removed,
one embedding table for history and output items.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..backend import BACKENDS
from ..nn.linear_cross_entropy import LinearCrossEntropyLoss
from ..nn.sampled_softmax import SampledSoftmaxLoss
from ..ops.attention import label_aware_attention
from ..ops.samplers import LogUniformSampler, UniformSampler
from . import _common

LOSSES = ("sampled", "full")
SAMPLERS = ("log_uniform", "uniform")
READOUTS = ("hard", "pow")


class SeqRecModel(nn.Module):
    """Base class. Args:
      n_items: item-table rows INCLUDING padding 0. dim: d. max_len: L (history length).
      loss: "sampled" (default) or "full" (softmax over the whole catalog).
      neg_ratio: shared negatives per batch = neg_ratio · B (ComiRec: 10); num_negatives
        overrides it with a fixed count. neg_sampler: "log_uniform" (ids must be popularity
        sorted, as ``seqrec_fast.data`` makes them) or "uniform".
      readout: "hard" or "pow" (MIND: softmax(<v_k, e>^readout_pow)·v).
      sparse: item-table gradients as sparse row sets (for the row-wise sparse optimizers);
        with ``loss="full"`` every row gets a gradient, so the gradient stays dense (the row-wise
        optimizers take either).
      backend: passed to every fused op ("auto" | "triton" | "cuda" | "cpp" | "eager"). "auto":
        each op picks its fastest kernel for the tensors' device. A backend named explicitly must
        have a kernel for every fused op the model uses (interest extraction and the loss), else
        the constructor raises ValueError (see ``seqrec_fast.models._common.check_backend``).
    """
    multi_interest = False
    _step_table: Optional[Tensor] = None   # the item table's alias during one loss() call
    interest_op: Optional[str] = None   # the fused op computing the interests (backend registry name)

    def __init__(self, n_items: int, dim: int = 64, max_len: int = 20, *, loss: str = "sampled",
                 neg_ratio: int = 10, num_negatives: Optional[int] = None,
                 neg_sampler: str = "log_uniform", readout: str = "hard",
                 readout_pow: float = 1.0, sparse: bool = False, backend: str = "auto"):
        super().__init__()
        _checks.positive_int("n_items", n_items, minimum=2)
        _checks.positive_int("dim", dim)
        _checks.positive_int("max_len", max_len)
        _checks.choice("loss", loss, LOSSES)
        _checks.positive_int("neg_ratio", neg_ratio)
        if num_negatives is not None:
            _checks.positive_int("num_negatives", num_negatives)
        _checks.choice("neg_sampler", neg_sampler, SAMPLERS)
        _checks.choice("readout", readout, READOUTS)
        _checks.choice("backend", backend, BACKENDS)
        if not isinstance(sparse, bool):
            raise TypeError(f"sparse must be a bool, got {type(sparse).__name__}")
        if not isinstance(readout_pow, (int, float)) or readout_pow <= 0:
            raise ValueError(f"readout_pow must be a positive number, got {readout_pow!r}")
        self.n_items, self.dim, self.max_len = n_items, dim, max_len
        self.loss_type, self.neg_ratio, self.num_negatives = loss, neg_ratio, num_negatives
        self.neg_sampler, self.readout, self.readout_pow = neg_sampler, readout, float(readout_pow)
        self.sparse, self.backend = sparse, backend
        ops = ([self.interest_op] if self.interest_op else []) + \
            [_common.OP_FULL if loss == "full" else _common.OP_SAMPLED]
        _common.check_backend(backend, ops, type(self).__name__)
        # the loss layer: full catalog, or shared negatives with accidental hits removed and no
        # in-batch negatives (ComiRec); shard_catalog() swaps in the catalog-parallel one
        self.criterion = (LinearCrossEntropyLoss(backend=backend) if loss == "full" else
                          SampledSoftmaxLoss(in_batch_negatives=False,
                                             remove_accidental_hits=True, backend=backend))
        # the full softmax gives every row a gradient: a sparse one would only cost a conversion.
        # The module's flag is what DistributedDataParallel reads to expect sparse gradients.
        self.item_emb = nn.Embedding(n_items, dim, sparse=sparse and loss == "sampled")
        nn.init.normal_(self.item_emb.weight, 0.0, 1.0 / math.sqrt(dim))
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.generator: Optional[torch.Generator] = None  # set by the trainer for reproducibility
        # (group, rank, world, lo, hi) once shard_catalog() kept only rows [lo, hi) here
        self.catalog_shard: Optional[tuple] = None

    # ------------------------------------------------------------ catalog parallel
    def shard_catalog(self, process_group="default") -> "SeqRecModel":
        """Keep only this rank's rows of the item table (``shard_rows(n_items, rank, W)``), for
        data-parallel training where the catalog does not fit one device (every rank of
        ``process_group`` must call it, on identical full tables; call it before moving the
        model to its device). Afterwards lookups are collective (``sharded_embedding``), the
        full softmax runs catalog-parallel on the gathered batch, ``item_embeddings()`` is
        refused, and the table's gradient is scaled as DistributedDataParallel scales the
        replicated parameters' (mean over ranks). Returns self."""
        from ..ops.catalog_parallel import check_group, shard_rows

        if self.catalog_shard is not None:
            raise RuntimeError("the item table is already sharded")
        group, rank, world = check_group(process_group)
        lo, hi = shard_rows(self.n_items, rank, world)
        old = self.item_emb
        new = nn.Embedding(hi - lo, self.dim, sparse=old.sparse, device=old.weight.device,
                           dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight[lo:hi])
        self.item_emb = new
        self.catalog_shard = (group, rank, world, lo, hi)
        if self.loss_type == "full":
            self.criterion = LinearCrossEntropyLoss(backend=self.backend, process_group=group)
        return self

    # ---------------------------------------------------------------- helpers
    def embed(self, ids: Tensor) -> Tensor:
        """ids (...) int64 -> (..., d), sparse gradients when ``sparse``."""
        if self.catalog_shard is not None:
            from ..ops.catalog_parallel import sharded_embedding

            group, _, world, lo, _ = self.catalog_shard
            return sharded_embedding(ids, self.item_emb.weight, group, offset=lo,
                                     grad_scale=1.0 / world, sparse_grad=self.item_emb.sparse)
        if self._step_table is not None:
            return F.embedding(ids, self._step_table, sparse=True)
        return F.embedding(ids, self.item_emb.weight, sparse=self.item_emb.sparse)

    def _check_history(self, history: Tensor, mask: Tensor):
        _checks.tensor("history", history, ndim=2, dtypes=(torch.int64, torch.int32))
        B, L = history.shape
        mask = _checks.sequence_mask(mask, B, L, history.device)
        if L != self.max_len and getattr(self, "fixed_len", False):
            raise ValueError(f"history must have seq_len = max_len = {self.max_len}, got {L}")
        return history.long(), mask

    def item_embeddings(self) -> Tensor:
        """-> (n_items, d) output item table (row 0 = padding, never retrieved)."""
        if self.catalog_shard is not None:
            raise RuntimeError("the item table is sharded across ranks (shard_catalog): this "
                               "rank holds rows [%d, %d) only; see item_shard()"
                               % self.catalog_shard[3:])
        return self.item_emb.weight

    def item_shard(self) -> tuple:
        """-> (first id, (n_rows, d) rows) of the item table held here (all of it, offset 0,
        unless ``shard_catalog`` was called)."""
        lo = 0 if self.catalog_shard is None else self.catalog_shard[3]
        return lo, self.item_emb.weight

    def user_embeddings(self, history: Tensor, mask: Tensor) -> Tensor:  # pragma: no cover
        """history: (B, L) int64, mask: (B, L) bool -> (B, K, d)."""
        raise NotImplementedError

    def train_interests(self, history: Tensor, mask: Tensor) -> Tensor:
        """Interests used by the training readout (default: user_embeddings)."""
        return self.user_embeddings(history, mask)

    def read_out(self, interests: Tensor, target_emb: Tensor) -> Tensor:
        """interests (B, K, d), target_emb (B, d) -> (B, d)."""
        if interests.shape[1] == 1:
            return interests[:, 0]
        p = math.inf if self.readout == "hard" else self.readout_pow
        return label_aware_attention(interests, target_emb.to(interests.dtype), exponent=p)

    def sample_negatives(self, n: int, device) -> tuple:
        """-> (ids (n,) int64 in [1, n_items), log Q (n,) float32 = log(n · P(id))), drawn with
        ``seqrec_fast.ops.samplers`` (log-uniform over the popularity-sorted ids 1.., or uniform)
        from the model's generator."""
        R = self.n_items - 1
        if self.neg_sampler == "uniform":
            ids, lp = UniformSampler(R, device).sample(n, self.generator)
        else:
            ids, lp = LogUniformSampler(R, device).sample(n, self.generator)
        return ids + 1, lp + math.log(n)

    def target_log_q(self, target: Tensor, n: int) -> Tensor:
        """log(n · P(target)) of the negative sampler for target ids (B,) -> (B,) float32."""
        R = self.n_items - 1
        sampler = (UniformSampler if self.neg_sampler == "uniform" else LogUniformSampler)(
            R, target.device)
        return sampler.log_prob(target - 1) + math.log(n)

    # ------------------------------------------------------------------- loss
    def forward(self, batch: dict) -> Tensor:
        """The training loss (as :meth:`loss`): calling the module is what DistributedDataParallel
        wraps."""
        return self.loss(batch)

    def loss(self, batch: dict) -> Tensor:
        """batch: {"history": (B, L) int64, "mask": (B, L) bool, "target": (B,) int64} -> scalar.

        On CPU with a dense item-table gradient, the step's lookups (history, targets,
        negatives) go through one alias of the table whose backward builds the (n_items, d)
        gradient once (``_common.one_dense_grad_table``) instead of once per lookup plus their
        sum: the same gradient, dense as before."""
        w = self.item_emb.weight
        if (self.item_emb.sparse or self._step_table is not None
                or self.catalog_shard is not None or not torch.is_grad_enabled()
                or not w.requires_grad or w.device.type != "cpu" or _checks.compiling()):
            return self._loss(batch)
        self._step_table = _common.one_dense_grad_table(w)
        try:
            return self._loss(batch)
        finally:
            self._step_table = None

    def _loss(self, batch: dict) -> Tensor:
        if not isinstance(batch, dict):
            raise TypeError(f"batch must be a dict, got {type(batch).__name__}")
        missing = [k for k in ("history", "mask", "target") if k not in batch]
        if missing:
            raise ValueError(f"batch is missing {missing}")
        hist, mask, target = batch["history"], batch["mask"], batch["target"]
        _checks.tensor("target", target, ndim=1, dtypes=(torch.int64,))
        if target.shape[0] != hist.shape[0]:
            raise ValueError(f"target must have shape ({hist.shape[0]},), got {tuple(target.shape)}")
        interests = self.train_interests(hist, mask)                      # (B, K, d)
        tgt_emb = self.embed(target)
        user = self.read_out(interests, tgt_emb)                          # (B, d)
        if self.loss_type == "full":
            bias = self._pad_bias(user.device)
            if self.catalog_shard is not None:
                return self._sharded_full_softmax(user.float(), target, bias)
            return self.criterion(user.float(), self.item_emb.weight, target, bias)
        B = target.shape[0]
        S = self.num_negatives or self.neg_ratio * B
        neg, log_q = self.sample_negatives(S, target.device)
        # compact table of the rows this step touches: sparse gradients, ids compared exactly
        uniq, inv = torch.unique(torch.cat([target, neg]), return_inverse=True)
        items = self.embed(uniq)
        t_lq = self.target_log_q(target, S)
        return self.criterion(user.float(), items.float(), inv[:B], inv[B:], log_q, t_lq)

    def _pad_bias(self, device):
        """(rows held here,) zeros with -1e4 at padding id 0 (never a valid prediction)."""
        b = getattr(self, "_bias", None)
        n = self.item_emb.weight.shape[0]
        if b is None or b.device != device or b.shape[0] != n:
            b = torch.zeros(n, device=device)
            if self.catalog_shard is None or self.catalog_shard[3] == 0:
                b[0] = -1e4
            self._bias = b
        return b

    def _sharded_full_softmax(self, user: Tensor, target: Tensor, bias: Tensor) -> Tensor:
        """Full softmax over a sharded catalog: the ranks' rows are gathered (the loss is then
        the mean over the global batch, the same on every rank) and the catalog-parallel
        ``linear_cross_entropy`` runs on them; the rows' gradients are scaled by W so that
        DistributedDataParallel's averaging gives the global batch's gradient."""
        from ..ops.catalog_parallel import gather_batch

        group, _, world, _, _ = self.catalog_shard
        user_g = gather_batch(user, group, grad_scale=float(world))
        target_g = gather_batch(target, group)
        return self.criterion(user_g, self.item_emb.weight, target_g, bias)

    def extra_repr(self) -> str:
        return (f"n_items={self.n_items}, dim={self.dim}, max_len={self.max_len}, "
                f"loss={self.loss_type!r}, readout={self.readout!r}, sparse={self.sparse}, "
                f"backend={self.backend!r}")
