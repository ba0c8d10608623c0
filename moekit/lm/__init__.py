"""A decoder-only language model with dense or MoE feed-forward blocks, and generation. Every
model part lives here; ``moekit.hf`` only converts checkpoints to and from it.

  config    LMConfig (one flat dataclass; ``attention`` picks a kind from ATTENTION_REGISTRY).
  model     RMSNorm, rotary multi-head attention (GQA, q/k norms, sliding window), dense SwiGLU
            MLP or moekit MoE, blocks, LM, KVCache.
  mla       multi-head latent attention of DeepSeek-V2/V3.
  gpt_oss   gpt-oss attention (sinks, sliding-window layers) and its clamped SwiGLU experts.
  rope      rotary frequency tables of Hugging Face ``rope_parameters`` (default, YaRN).
  generate  greedy or top-p sampled generation with the KV cache.
"""

from .config import LMConfig
from .generate import generate
from .model import LM, KVCache

__all__ = ["LMConfig", "LM", "KVCache", "generate"]
