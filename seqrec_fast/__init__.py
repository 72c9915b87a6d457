"""seqrec_fast: fused kernels and models for sequential-recall recommendation."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _ext, backend  # noqa: E402
from . import ops, nn, reference  # noqa: E402,F401

# every op with a backend choice (the ``OP`` name of its module in seqrec_fast.ops)
OPS = ("routing", "attention", "linear_cross_entropy", "sampled_softmax", "multi_interest_topk",
       "diverse_topk")


def info() -> dict:
    """What this install can do: versions, devices and the backends available for each op."""
    import platform

    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                    for i in range(torch.cuda.device_count())]
    backends = {}
    for op in OPS:
        backends[op] = {}
        for name in ("eager", "cpp", "triton", "cuda"):
            dev = torch.device("cuda" if name == "cuda" or
                               (name == "triton" and torch.cuda.is_available()) else "cpu")
            backends[op][name] = backend.available(op, name, dev)
    import torch.distributed as dist

    dist_backends = []
    if dist.is_available():
        dist_backends = [n for n, ok in (("gloo", dist.is_gloo_available()),
                                         ("nccl", dist.is_nccl_available())) if ok]
    return {
        "seqrec_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": backend.triton_interpreting(),
        "devices": devices,
        "extension": _ext._C is not None,
        "extension_cuda": _ext.with_cuda(),
        "extension_error": _ext.LOAD_ERROR,
        "backends": backends,
        "distributed": dist_backends,   # torch.distributed backends for torchrun / sharding
    }
