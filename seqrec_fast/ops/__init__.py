"""Public functional ops: autograd-aware, backend-dispatched (see seqrec_fast.backend)."""
from .routing import capsule_routing  # noqa: F401
