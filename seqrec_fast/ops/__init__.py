"""Public functional ops: autograd-aware, backend-dispatched (see seqrec_fast.backend)."""
from .attention import label_aware_attention, multi_interest_attention  # noqa: F401
from .routing import capsule_routing  # noqa: F401
from .linear_cross_entropy import linear_cross_entropy  # noqa: F401
from .sampled_softmax import bpr_max_loss, sampled_softmax_loss  # noqa: F401
from .multi_interest_topk import multi_interest_topk  # noqa: F401
from .diverse_topk import diverse_topk, interest_candidates  # noqa: F401
from . import samplers  # noqa: F401
