"""A decoder-only language model with dense or MoE feed-forward blocks, and generation."""

from .config import LMConfig
from .generate import generate
from .model import LM, KVCache

__all__ = ["LMConfig", "LM", "KVCache", "generate"]
