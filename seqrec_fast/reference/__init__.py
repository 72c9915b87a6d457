"""Eager PyTorch oracles (``*_ref``) for every op. Plain, readable, float64-capable.

Each takes already-validated inputs (the public ops in ``seqrec_fast.ops`` validate) and is
differentiable through ordinary autograd. Tests compare every kernel against these run in
float64; the ``eager`` backend runs them in the input dtype.
"""
from .attention import attention_ref, label_aware_attention_ref  # noqa: F401
from .routing import bilinear_ref, routing_iterations_ref, routing_ref, squash  # noqa: F401
from .linear_cross_entropy import linear_cross_entropy_ref  # noqa: F401
from .sampled_softmax import bpr_max_ref, sampled_candidates_ref, sampled_softmax_ref  # noqa: F401
from .multi_interest_topk import multi_interest_topk_ref  # noqa: F401
from .diverse_topk import diverse_topk_ref  # noqa: F401
