"""moekit language models -> Hugging Face checkpoint folders that transformers loads.

Writes config.json (the family's transformers config) and safetensors shards in the layout
transformers' ``save_pretrained`` writes (per-expert ``experts.N.*`` tensors, Mixtral's
``block_sparse_moe`` names), with model.safetensors.index.json when there is more than one
shard. Tensors are written shard by shard; per-expert tensors are views of the stacked
weights, so no second copy of the model is made.

The family is the model's source family when it was converted from HF (``model.hf_config``),
else inferred from its features: MLA attention -> deepseek_v3 (sigmoid router) / deepseek_v2
(softmax); per-head q/k norm -> qwen3_moe; whole-projection q/k norm -> olmoe; gated shared
expert -> qwen2_moe; otherwise mixtral. A model that does not fit the family raises an error
naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import MoEConfig
from ..lm import LM, LMConfig
from .blocks import UnsupportedArchitectureError
from .convert import CONVERTIBLE, INDEX_NAME, KeyMap, is_hf_export_file, lm_tensors, output_folder

_CONFIG_CLASSES = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
                   "olmoe": "OlmoeConfig", "deepseek_v2": "DeepseekV2Config", "deepseek_v3": "DeepseekV3Config",
                   "gpt_oss": "GptOssConfig"}
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                  "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                  "gpt_oss": "GptOssForCausalLM"}


def infer_family(cfg: LMConfig) -> str:
    """The HF family whose architecture matches a moekit LMConfig's features."""
    moe = _moe(cfg)
    if cfg.attention == "gpt_oss":
        return "gpt_oss"
    if cfg.attention == "mla":
        return "deepseek_v3" if moe.router.kind == "sigmoid_topk" else "deepseek_v2"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if cfg.qk_norm == "full":
        return "olmoe"
    if moe.shared.gated:
        return "qwen2_moe"
    return "mixtral"


def _moe(cfg: LMConfig) -> MoEConfig:
    if cfg.moe is None:
        raise UnsupportedArchitectureError("the model has no MoE layers (LMConfig.moe is None); nothing to export "
                                           "as an HF MoE family")
    return cfg.moe


def _require(cond: bool, family: str, what: str) -> None:
    if not cond:
        raise UnsupportedArchitectureError(f"cannot export as {family}: {what}")


def hf_config_kwargs(cfg: LMConfig, family: str) -> dict[str, Any]:
    """Keyword arguments of the family's transformers config for a moekit LMConfig."""
    if family not in CONVERTIBLE:
        raise UnsupportedArchitectureError(f"family={family!r} is not one of {list(CONVERTIBLE)}")
    moe = _moe(cfg)
    r = moe.router
    E, F, K = moe.num_experts, moe.expert_hidden, r.top_k
    _require(moe.expert_kind == "swiglu" and moe.activation == "silu", family,
             f"expert_kind={moe.expert_kind!r}, activation={moe.activation!r} (needs swiglu experts with silu)")
    _require(r.capacity_factor is None, family, f"router.capacity_factor={r.capacity_factor} (HF routing is dropless)")
    _require(not r.logit_bias, family, "router.logit_bias=True")
    moe_ids = cfg.moe_layer_ids
    all_moe = moe_ids == list(range(cfg.n_layers))
    kw: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", num_experts_per_tok=K,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if family in ("deepseek_v2", "deepseek_v3"):
        _require(cfg.attention == "mla", family, f"attention={cfg.attention!r} (needs 'mla')")
        from ..lm.mla import mla_options

        o = mla_options(cfg)
        first = cfg.first_dense_layers if cfg.moe_layers is None else (moe_ids[0] if moe_ids else cfg.n_layers)
        _require(moe_ids == list(range(first, cfg.n_layers)), family,
                 f"MoE layers {moe_ids} (needs dense layers first, then MoE in every layer)")
        n_shared = 0
        if moe.shared.num:
            hidden = moe.shared.hidden or moe.shared.num * F
            _require(hidden % F == 0 and not moe.shared.gated, family,
                     f"shared experts hidden={hidden}, gated={moe.shared.gated} (needs ungated, a multiple of {F})")
            n_shared = hidden // F
        kw.update(n_routed_experts=E, moe_intermediate_size=F, intermediate_size=cfg.ffn_hidden,
                  n_shared_experts=n_shared, first_k_dense_replace=first, num_key_value_heads=cfg.n_heads,
                  routed_scaling_factor=r.routed_scaling_factor, q_lora_rank=o["q_lora_rank"],
                  kv_lora_rank=o["kv_lora_rank"], qk_nope_head_dim=o["qk_nope_head_dim"],
                  qk_rope_head_dim=o["qk_rope_head_dim"], v_head_dim=o["v_head_dim"],
                  attention_bias=o["attention_bias"], n_group=r.n_group, topk_group=r.topk_group)
        if o["rope"] is not None:
            kw["rope_parameters"] = dict(o["rope"])
        if family == "deepseek_v2":
            _require(r.kind == "softmax_topk" and not r.norm_topk_prob and r.group_score == "max", family,
                     f"router kind={r.kind!r}, norm_topk_prob={r.norm_topk_prob}, group_score={r.group_score!r} "
                     f"(needs softmax_topk, no renormalisation, group_score='max')")
            _require(o["rope_interleave"], family, "rope_interleave=False (DeepSeek-V2 rotates interleaved pairs)")
            kw["topk_method"] = "group_limited_greedy" if r.n_group > 1 else "greedy"
        else:
            _require(r.kind == "sigmoid_topk" and r.group_score == "top2_sum", family,
                     f"router kind={r.kind!r}, group_score={r.group_score!r} (needs sigmoid_topk, 'top2_sum')")
            kw.update(norm_topk_prob=r.norm_topk_prob, rope_interleave=o["rope_interleave"])
        return kw
    _require(cfg.attention == "mha", family, f"attention={cfg.attention!r}")
    window = cfg.attention_options.get("sliding_window")
    _require(window is None or family in ("mixtral", "qwen3_moe"), family,
             f"attention_options.sliding_window={window} (only mixtral and qwen3_moe window every layer)")
    _require(r.kind == "softmax_topk" and r.n_group == 1 and r.routed_scaling_factor == 1.0, family,
             f"router kind={r.kind!r}, n_group={r.n_group}, routed_scaling_factor={r.routed_scaling_factor} "
             f"(needs plain softmax_topk)")
    _require(family == "qwen2_moe" or not cfg.qkv_bias, family, "qkv_bias=True (only qwen2_moe has q/k/v biases)")
    kw["num_key_value_heads"] = cfg.kv_heads
    want_norm = {"mixtral": "none", "qwen2_moe": "none", "qwen3_moe": "head", "olmoe": "full"}[family]
    _require(cfg.qk_norm == want_norm, family, f"qk_norm={cfg.qk_norm!r} (needs {want_norm!r})")
    shared_ok = (not moe.shared.num) if family != "qwen2_moe" else (moe.shared.num >= 1 and moe.shared.gated)
    _require(shared_ok, family, f"shared experts num={moe.shared.num}, gated={moe.shared.gated}")
    if family in ("mixtral", "olmoe"):
        _require(all_moe, family, f"MoE layers {moe_ids} (needs MoE in every layer)")
        if family == "olmoe":
            _require(cfg.head_size == cfg.dim // cfg.n_heads, family, f"head_dim={cfg.head_size} differs from dim/n_heads")
        if family == "mixtral":
            _require(r.norm_topk_prob, family, "norm_topk_prob=False (Mixtral renormalises)")
            kw.update(intermediate_size=F, num_local_experts=E, head_dim=cfg.head_size, sliding_window=window)
        else:
            kw.update(intermediate_size=F, num_experts=E, norm_topk_prob=r.norm_topk_prob)
        return kw
    kw.update(intermediate_size=cfg.ffn_hidden, moe_intermediate_size=F, num_experts=E, norm_topk_prob=r.norm_topk_prob,
              mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_ids], decoder_sparse_step=1)
    if family == "qwen2_moe":
        _require(cfg.head_size == cfg.dim // cfg.n_heads, family, f"head_dim={cfg.head_size} differs from dim/n_heads")
        kw.update(qkv_bias=cfg.qkv_bias, use_sliding_window=False,
                  shared_expert_intermediate_size=moe.shared.hidden or moe.shared.num * F)
    else:
        _require(not cfg.qkv_bias, family, "qkv_bias=True")
        kw.update(head_dim=cfg.head_size, use_sliding_window=window is not None, sliding_window=window)
    return kw


def build_hf_config(model: LM, family: str | None = None) -> Any:
    """transformers config object for a moekit LM (imports transformers)."""
    import transformers

    source = getattr(model, "hf_config", None) or {}
    family = family or source.get("model_type") or infer_family(model.config)
    if family not in _CONFIG_CLASSES:
        raise UnsupportedArchitectureError(f"family={family!r} is not one of {sorted(_CONFIG_CLASSES)}")
    if family == "gpt_oss":
        return _gpt_oss_config(model, source)
    kw = hf_config_kwargs(model.config, family)
    # Token ids and other fields of the source config that moekit does not model carry over.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"):
        if name in source and name not in kw:
            kw[name] = source[name]
    config = getattr(transformers, _CONFIG_CLASSES[family])(**kw)
    config.architectures = [_ARCHITECTURES[family]]
    return config


def _gpt_oss_config(model: LM, source: dict[str, Any]) -> Any:
    """gpt-oss exports only as it was converted: its source config, checked against the model."""
    import transformers

    from ..lm.gpt_oss import ClampedSwiGLUExperts

    cfg = model.config
    _require(source.get("model_type") == "gpt_oss" and cfg.attention == "gpt_oss", "gpt_oss",
             "the model was not converted from a gpt-oss checkpoint (no gpt-oss source config)")
    moe = _moe(cfg)
    fields = {k: v for k, v in source.items() if k not in ("transformers_version", "architectures", "model_type")}
    config = transformers.GptOssConfig(**fields)
    expected = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
                    num_local_experts=moe.num_experts, intermediate_size=moe.expert_hidden,
                    num_experts_per_tok=moe.router.top_k, tie_word_embeddings=cfg.tie_embeddings)
    differ = {k: (getattr(config, k), v) for k, v in expected.items() if getattr(config, k) != v}
    _require(not differ, "gpt_oss", f"the source config differs from the model (config, model): {differ}")
    _require(cfg.moe_layer_ids == list(range(cfg.n_layers)) and all(
        type(layer.mlp.experts) is ClampedSwiGLUExperts for layer in model.layers), "gpt_oss",
        "every layer needs clamped SwiGLU experts")
    config.architectures = [_ARCHITECTURES["gpt_oss"]]
    return config


def _shards(items: Iterator[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = tensor
        size += nbytes
    if shard:
        yield shard


@torch.no_grad()
def to_hf(model: LM, out_dir: str | Path, family: str | None = None, dtype: torch.dtype | None = None,
          max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder; returns the folder.

    ``dtype`` casts tensors as they are written (one tensor at a time). The folder is written
    beside ``out_dir`` and renamed into place, so it appears complete or not at all. A non-empty
    ``out_dir`` is refused unless ``overwrite``, which replaces a previous export (config, shards,
    index) and refuses a folder holding anything else.
    """
    from safetensors.torch import save_file

    config = build_hf_config(model, family)
    key_map = KeyMap(config, model.config)

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in lm_tensors(model).items():
            for key, value in key_map.to_hf(name, tensor.detach()):
                yield key, (value if dtype is None else value.to(dtype)).contiguous()

    with output_folder(out_dir, is_hf_export_file, overwrite) as out:
        weight_map: dict[str, str] = {}
        files = []
        total_bytes = 0
        for i, shard in enumerate(_shards(items(), max_shard_bytes)):
            tmp_name = f"model-{i + 1:05d}.safetensors"
            save_file(shard, str(out / tmp_name), metadata={"format": "pt"})
            files.append(tmp_name)
            weight_map.update(dict.fromkeys(shard, tmp_name))
            total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
        if len(files) == 1:
            (out / files[0]).rename(out / "model.safetensors")
        else:
            total = len(files)
            renames = {old: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, old in enumerate(files)}
            for old, new in renames.items():
                (out / old).rename(out / new)
            index = {"metadata": {"total_size": total_bytes},
                     "weight_map": {k: renames[v] for k, v in weight_map.items()}}
            (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
        config.dtype = dtype or next(model.parameters()).dtype
        config.save_pretrained(str(out))
    return Path(out_dir)
