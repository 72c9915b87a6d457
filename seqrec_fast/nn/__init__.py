"""nn.Module wrappers around the fused ops."""
from .attention import MultiInterestAttention  # noqa: F401
from .routing import CapsuleRouting  # noqa: F401
