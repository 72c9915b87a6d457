"""Sequential-recall models: YouTubeDNN, GRU4Rec, MIND, ComiRecDR, ComiRecSA."""
from .base import SeqRecModel  # noqa: F401
from .models import MODELS, MIND, ComiRecDR, ComiRecSA, GRU4Rec, YouTubeDNN, build_model  # noqa: F401
