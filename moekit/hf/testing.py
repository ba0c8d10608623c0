"""Tiny random transformers MoE models of every supported family, for tests and benchmarks.

Built with transformers' own config and model classes (so no hub access); every weight is then
redrawn from N(0, std) (norm weights from 1 + N(0, std)) so routers separate their top-k picks
clearly instead of sitting near ties, as HF's small default initialisation would leave them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_COMMON: dict[str, Any] = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                         mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                         num_experts_per_tok=2, head_dim=12, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, pad_token_id=None,
                                  eos_token_id=None)),
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                                             num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
                                             topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                             routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=16,
                                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                             num_key_value_heads=4)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                                             num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                                             n_group=4, topk_group=2, routed_scaling_factor=2.5, q_lora_rank=24,
                                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                                             num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                     sliding_window=4, swiglu_limit=1.5,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def tiny_hf_config(family: str, **overrides: Any) -> Any:
    """A small transformers config of ``family`` (a model_type in TINY_CONFIGS)."""
    import transformers

    if family not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for family {family!r}; known: {sorted(TINY_CONFIGS)}")
    cls_name, fields = TINY_CONFIGS[family]
    kwargs = {**_COMMON, **fields, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


@torch.no_grad()
def randomize_(model: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Redraw every parameter and DeepSeek-V3 correction bias (norm weights around 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        p.copy_(1.0 + noise if "norm" in name.rsplit(".", 2)[-2] else noise * (4.0 if _is_router(name) else 1.0))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return model


def _is_router(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("mlp.router.weight")


def tiny_hf_model(family: str, seed: int = 0, std: float = 0.1, **overrides: Any) -> nn.Module:
    """A randomly initialised float32 ``AutoModelForCausalLM`` of ``family`` in eval mode."""
    import transformers

    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return randomize_(model, std, seed).eval()


# A ChatML-style template (Qwen's layout) that also reads bos_token, uses raise_exception and tojson,
# so that rendering it exercises what transformers' apply_chat_template provides.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{{ message['content'] | tojson }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TINY_TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Mixture-of-experts layers route each token to k experts.",
    "Le café est très chaud, déjà prêt.", "Съешь же ещё этих мягких французских булок.", "日本語のテキストです。",
    "Emoji: 🦊🐶 and math: ∑ x² ≤ ∞.", "def f(x):\n    return x * 2\n",
]


def tiny_tokenizer(folder: Any, vocab_size: int = 320, chat_template: str | None = TINY_CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer (the kind Qwen3 and DeepSeek-V3 ship) trained here on a few
    sentences, saved to ``folder`` as tokenizer.json plus a tokenizer_config.json with ``<s>`` as
    BOS (prepended by the post-processor), ``<|im_end|>`` as EOS and ``chat_template``. Returns
    the ``tokenizers.Tokenizer``; its ids fit a model of ``vocab_size`` rows."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_TOKENIZER_TEXT * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 256}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok
