"""Eager PyTorch oracles (``*_ref``) for every op. Plain, readable, float64-capable.

Each takes already-validated inputs (the public ops in ``seqrec_fast.ops`` validate) and is
differentiable through ordinary autograd. Tests compare every kernel against these run in
float64; the ``eager`` backend runs them in the input dtype.
"""
from .routing import bilinear_ref, routing_iterations_ref, routing_ref, squash  # noqa: F401
