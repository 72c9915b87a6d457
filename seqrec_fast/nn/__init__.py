"""nn.Module wrappers around the fused ops."""
from .routing import CapsuleRouting  # noqa: F401
