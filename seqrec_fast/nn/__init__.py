"""nn.Module wrappers around the fused ops: interest extraction and the catalog-scale losses."""
from .attention import MultiInterestAttention  # noqa: F401
from .linear_cross_entropy import LinearCrossEntropyLoss  # noqa: F401
from .routing import CapsuleRouting  # noqa: F401
from .sampled_softmax import SampledSoftmaxLoss  # noqa: F401
