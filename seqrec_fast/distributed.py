"""Multi-process helpers (torch.distributed): catalog sharding and data-parallel training.

See README "Scaling to several GPUs".
"""
from __future__ import annotations

from .ops._catalog_parallel import check_group, shard_rows  # noqa: F401

__all__ = ["shard_rows", "check_group"]
