"""Hugging Face checkpoint folders -> moekit language models (``moekit.lm.LM``), and moekit's own
checkpoint folder format.

Reads a folder of config.json plus safetensors shards (with or without
model.safetensors.index.json), written by transformers' ``save_pretrained`` or downloaded from
the hub. Weights stream shard by shard and tensor by tensor into the preallocated moekit model:
only the model and one checkpoint tensor are in memory at a time. Per-expert checkpoint tensors
(``experts.N.gate_proj`` / Mixtral's ``w1, w3, w2``, the layout transformers writes) land in
their slices of moekit's stacked (E, 2F, D) / (E, D, F) expert weights; fused ``gate_up_proj``
tensors are taken as they are.

Families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, gpt_oss (see
``blocks.py`` for their routers; gpt-oss attention with sinks, sliding-window layers and YaRN
rotary scaling and its clamped SwiGLU experts are ``moekit.lm.gpt_oss``; DeepSeek's YaRN
scaling is handled by ``moekit.lm.mla``). Mixtral's and Qwen3-MoE's ``sliding_window`` (every layer
windowed) becomes ``attention_options.sliding_window`` of moekit's ``mha`` attention; per-layer
windows elsewhere (Qwen2-MoE's ``layer_types``) and scaled rotary embeddings outside the YaRN
families are refused with an error naming the field.

Every writer (``save_moekit``, ``convert_folder``, ``export.to_hf``) fills a temporary folder
beside the target and renames it into place (``output_folder``), so a reader never sees a
half-written or mixed folder, and refuses a non-empty target unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..experts.int8 import METADATA_KEY as QUANT_METADATA_KEY
from ..experts.int8 import quantization_of, quantize_experts
from ..lm import LM, LMConfig
from ..config_base import read_json
from ..lm.gpt_oss import ClampedSwiGLUExperts
from .blocks import UnsupportedArchitectureError, block_key_map, family_of, moe_config_from_hf

INDEX_NAME = "model.safetensors.index.json"
# Families whose YaRN-scaled rotary embeddings moekit.lm computes (others: default rope only).
_YARN_FAMILIES = ("deepseek_v2", "deepseek_v3", "gpt_oss")
MOEKIT_CONFIG = "moekit_lm.json"
CONVERTIBLE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
# Tokenizer and generation files copied beside converted weights when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


class OutputFolderError(CheckpointError):
    """An output folder cannot be written: it holds other files, or is not a folder."""


# ---------------------------------------------------------------------------------------- configs
def _rope_theta(hf_config: Any, allowed: tuple[str, ...] = ("default",)) -> float:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in allowed:
        raise UnsupportedArchitectureError(
            f"rope_parameters.rope_type={rope_type!r} (model_type={hf_config.model_type!r}) is not supported: "
            f"moekit.lm implements {list(allowed)} rotary embeddings for this family")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise UnsupportedArchitectureError(f"model_type={hf_config.model_type!r} config has no rope_theta")
    return float(theta)


def _scaled_rope(hf_config: Any) -> dict[str, Any] | None:
    """The rope_parameters dict when it scales the rotary embedding, else None."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return dict(rope) if rope.get("rope_type", "default") != "default" else None


# Families whose ``sliding_window`` (when set) windows every layer, as moekit's mha attention does.
_WINDOWED_FAMILIES = ("mixtral", "qwen3_moe")


def _sliding_window(hf_config: Any) -> int | None:
    """The window of every layer (Mixtral, Qwen3-MoE), or None; per-layer windows are refused."""
    t = hf_config.model_type
    layer_types = getattr(hf_config, "layer_types", None) or []
    window = getattr(hf_config, "sliding_window", None)
    if "sliding_attention" in layer_types:
        raise UnsupportedArchitectureError(
            f"layer_types with 'sliding_attention' (sliding_window={window!r}, model_type={t!r}): per-layer "
            f"sliding windows are supported for gpt_oss only")
    if t not in _WINDOWED_FAMILIES or window is None:
        return None
    if not (isinstance(window, int) and window >= 1):
        raise UnsupportedArchitectureError(f"sliding_window={window!r} (model_type={t!r}) must be an int >= 1")
    return window


def lm_config_from_hf(hf_config: Any, **moe_overrides: Any) -> LMConfig:
    """The moekit LMConfig computing what an HF MoE causal LM config describes."""
    fam = family_of(hf_config)
    t = fam.model_type
    if t not in CONVERTIBLE:
        raise UnsupportedArchitectureError(
            f"model_type={t!r} converts block by block only (moe_from_hf_block); whole-model conversion "
            f"supports {list(CONVERTIBLE)}")
    window = None if t == "gpt_oss" else _sliding_window(hf_config)
    c = hf_config
    n_layers = c.num_hidden_layers
    kw: dict[str, Any] = dict(
        vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=n_layers, n_heads=c.num_attention_heads,
        rope_theta=_rope_theta(c, ("default", "yarn") if t in _YARN_FAMILIES else ("default",)),
        norm_eps=float(c.rms_norm_eps), max_seq_len=c.max_position_embeddings,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), moe=moe_config_from_hf(c, **moe_overrides),
        ffn_hidden=getattr(c, "intermediate_size", None) or 1)
    if t in ("deepseek_v2", "deepseek_v3"):
        kw.update(attention="mla", head_dim=c.qk_nope_head_dim + c.qk_rope_head_dim,
                  first_dense_layers=c.first_k_dense_replace,
                  attention_options=dict(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
                                         qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                                         v_head_dim=c.v_head_dim, attention_bias=bool(c.attention_bias),
                                         rope_interleave=True if t == "deepseek_v2" else bool(c.rope_interleave),
                                         rope=_scaled_rope(c)))
        return LMConfig(**kw)
    kw.update(n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
              head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    if t == "gpt_oss":
        kw.update(attention="gpt_oss", attention_options=dict(
            layer_types=list(c.layer_types), sliding_window=c.sliding_window, rope=dict(c.rope_parameters),
            attention_bias=bool(c.attention_bias)))
        return LMConfig(**kw)
    if getattr(c, "attention_bias", False):
        raise UnsupportedArchitectureError(f"attention_bias=True (model_type={t!r}): moekit.lm has no o_proj bias")
    if window is not None:
        kw["attention_options"] = {"sliding_window": window}
    if t == "qwen2_moe":
        kw["qkv_bias"] = bool(c.qkv_bias)
    if t in ("qwen2_moe", "qwen3_moe"):
        step, dense = c.decoder_sparse_step, set(c.mlp_only_layers or [])
        kw["moe_layers"] = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    if t == "qwen3_moe":
        kw["qk_norm"] = "head"
    if t == "olmoe":
        if c.clip_qkv is not None:
            raise UnsupportedArchitectureError(f"clip_qkv={c.clip_qkv} (olmoe) is not supported by moekit.lm")
        kw["qk_norm"] = "full"
    return LMConfig(**kw)


def build_lm(cfg: LMConfig, hf_config: dict[str, Any] | None = None) -> LM:
    """A moekit LM for ``cfg``, with the experts of the source family (``hf_config``, a dict)
    where moekit's stacked SwiGLU experts do not compute them (gpt-oss)."""
    model = LM(cfg)
    if hf_config is not None and hf_config.get("model_type") == "gpt_oss":
        for layer in model.layers:
            if layer.is_moe:
                moe = layer.mlp.config
                layer.mlp.experts = ClampedSwiGLUExperts(
                    moe.num_experts, moe.dim, moe.expert_hidden, float(hf_config.get("swiglu_alpha", 1.702)),
                    float(hf_config.get("swiglu_limit", 7.0)), moe.backend)
    return model


def load_hf_config(folder: str | Path) -> Any:
    """transformers' config object of a checkpoint folder (imports transformers)."""
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise ImportError("reading Hugging Face configs needs transformers: pip install 'moekit[hf]'") from err
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise CheckpointError(f"{path} has no model_type (not a transformers model config)")
    from transformers import CONFIG_MAPPING

    if fields["model_type"] not in CONFIG_MAPPING:
        raise UnsupportedArchitectureError(f"{path}: model_type={fields['model_type']!r} is unknown to this "
                                           f"transformers; whole-model conversion supports {list(CONVERTIBLE)}")
    return AutoConfig.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------- files
def resolve_folder(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (config, safetensors, tokenizer)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    looks_local = path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"checkpoint folder {text} does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", *SIDE_FILES]
    return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=patterns))


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when it has one."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"shard(s) {missing} listed in {index} are missing from {folder}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = " (only PyTorch .bin weights found; convert them to safetensors)" if any(folder.glob("*.bin")) else ""
        raise CheckpointError(f"no safetensors weights in {folder}{extra}")
    return files


def open_safetensors(file: Path) -> Any:
    """``safe_open(file)``; a file safetensors cannot read raises CheckpointError naming the file
    and, for a truncated file, the first tensor whose bytes are missing."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: {safetensors_problem(file, err)}") from None


def safetensors_problem(file: Path, err: Exception) -> str:
    """Why ``file`` is not a readable safetensors file, from its header (8-byte little-endian
    header size, JSON header of {key: {dtype, shape, data_offsets}}, then the tensor bytes)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            header_bytes = f.read(min(n, size))
    except OSError as os_err:
        return f"cannot read the file ({os_err.strerror or os_err})"
    if size < 8:
        return f"not a safetensors file: {size} bytes, shorter than the 8-byte header size (truncated?)"
    if 8 + n > size:
        return f"truncated or not a safetensors file: its header needs {8 + n} bytes, the file has {size}"
    try:
        header = json.loads(header_bytes)
        ends = {k: int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"not a safetensors file: its {n}-byte header is not a safetensors JSON header ({err})"
    past = sorted((end, k) for k, end in ends.items() if 8 + n + end > size)
    if past:
        first = past[0][1]
        return (f"truncated: tensor {first!r} (and {len(past) - 1} more) ends past the end of the file "
                f"({size} bytes, needs {8 + n + past[-1][0]})")
    return f"not a readable safetensors file ({err})"


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[Path, Any, str]]:
    """(file, open safe_open handle, key) for every tensor, one shard open at a time."""
    for file in files:
        with open_safetensors(file) as handle:
            for key in handle.keys():
                yield file, handle, key


# ---------------------------------------------------------------------------------------- writing
# Files each writer puts in its folder: what ``overwrite=True`` may replace.
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
HF_EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", INDEX_NAME)
MOEKIT_FILES = (MOEKIT_CONFIG, "model.safetensors", "hf_config.json", *SIDE_FILES)


def _index_shards(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def is_hf_export_file(folder: Path, name: str) -> bool:
    """Whether ``to_hf`` (or transformers' save_pretrained) writes ``name`` in a checkpoint folder."""
    return name in HF_EXPORT_FILES or bool(_SHARD.match(name)) or name in _index_shards(folder)


def is_moekit_file(folder: Path, name: str) -> bool:
    """Whether ``save_moekit`` / ``convert_folder`` writes ``name``."""
    return name in MOEKIT_FILES


def check_output_folder(out: Path, owned: Callable[[Path, str], bool], overwrite: bool) -> None:
    """Refuse an output path that is not a folder, or a non-empty folder (unless ``overwrite`` and
    every entry is one ``owned`` says a previous export wrote)."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output folder {out} exists and is not a folder")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise OutputFolderError(f"output folder {out} is not empty ({', '.join(entries[:6])}"
                                f"{', ...' if len(entries) > 6 else ''}); pass overwrite=True (--overwrite) to "
                                f"replace the previous export, or choose an empty folder")
    foreign = [name for name in entries if not (owned(out, name) and (out / name).is_file())]
    if foreign:
        raise OutputFolderError(f"output folder {out} holds {foreign[:6]}, which this export does not write; "
                                f"overwrite replaces only a previous export: move them or choose another folder")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def output_folder(out_dir: str | Path, owned: Callable[[Path, str], bool], overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``out_dir`` to write into; on success it is synced and
    renamed to ``out_dir``, replacing a previous export (only with ``overwrite``; see
    ``check_output_folder``), which is deleted after the rename. On error the temporary folder is
    removed and ``out_dir`` is untouched."""
    out = Path(out_dir).expanduser().resolve()
    check_output_folder(out, owned, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the folder gets the user's umask permissions, not 0o700.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        check_output_folder(out, owned, overwrite)
        old = None
        if out.is_dir():
            if any(out.iterdir()):
                old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
                out.rename(old)
            else:
                out.rmdir()
        try:
            tmp.rename(out)
        except OSError:
            if old is not None:
                old.rename(out)
            raise
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


# ---------------------------------------------------------------------------------------- key mapping
class KeyMap:
    """HF checkpoint key <-> (moekit parameter name, index into it) for one model config."""

    _LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
    _LEGACY = re.compile(r"^experts\.(\d+)\.(\w+)\.weight$")

    def __init__(self, hf_config: Any, lm_config: LMConfig) -> None:
        self.fam = family_of(hf_config)
        self.cfg = lm_config
        self.block = block_key_map(hf_config)
        self.block_inverse = {v: k for k, v in self.block.items()}
        assert lm_config.moe is not None
        self.F = lm_config.moe.expert_hidden
        # DeepSeek-V3 checkpoints store their multi-token-prediction layers after the LM's layers.
        self.extra_layers = int(getattr(hf_config, "num_mtp_layers", 0) or 0) \
            if self.fam.model_type == "deepseek_v3" else 0

    def to_moekit(self, key: str) -> tuple[str, tuple[Any, ...]] | None:
        """(parameter name, index) for an HF key; None for keys to skip (e.g. extra MTP layers)."""
        if key == "lm_head.weight":
            # Tied checkpoints may still store the head; the embedding already holds it.
            return None if self.cfg.tie_embeddings else ("lm_head.weight", ())
        if key in ("model.embed_tokens.weight", "model.norm.weight"):
            return key[len("model."):], ()
        m = self._LAYER.match(key)
        if m is None:
            raise CheckpointError(f"unexpected tensor {key!r} for model_type={self.fam.model_type!r}")
        layer, sub = int(m.group(1)), m.group(2)
        if layer >= self.cfg.n_layers + self.extra_layers:
            raise CheckpointError(f"tensor {key!r} is for layer {layer}, but config.json gives num_hidden_layers="
                                  f"{self.cfg.n_layers}; the config does not match the checkpoint")
        if layer >= self.cfg.n_layers:
            return None  # multi-token-prediction layers (DeepSeek-V3) are not part of the LM
        sub = sub.replace("block_sparse_moe.", "mlp.", 1)
        if sub.endswith("rotary_emb.inv_freq"):
            return None
        if not (self.cfg.is_moe_layer(layer) and sub.startswith("mlp.")):
            return f"layers.{layer}.{sub}", ()
        inner = sub[len("mlp."):]
        if inner in self.block_inverse:
            return f"layers.{layer}.mlp.{self.block_inverse[inner]}", ()
        legacy = self._LEGACY.match(inner)
        names = self.fam.legacy_expert_names
        if legacy and names and legacy.group(2) in names:
            e, which = int(legacy.group(1)), names.index(legacy.group(2))
            if which == 2:
                return f"layers.{layer}.mlp.experts.down_proj", (e,)
            rows = slice(0, self.F) if which == 0 else slice(self.F, 2 * self.F)
            return f"layers.{layer}.mlp.experts.gate_up_proj", (e, rows)
        raise CheckpointError(f"unexpected tensor {key!r} in MoE layer {layer} of model_type={self.fam.model_type!r}")

    def to_hf(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """HF checkpoint (key, tensor) pairs for a moekit parameter, in transformers' on-disk layout."""
        if name in ("embed_tokens.weight", "norm.weight"):
            yield f"model.{name}", tensor
            return
        if name == "lm_head.weight":
            yield name, tensor
            return
        m = re.match(r"^layers\.(\d+)\.(.+)$", name)
        assert m is not None, name
        layer, sub = int(m.group(1)), m.group(2)
        prefix = f"model.layers.{layer}."
        if not (self.cfg.is_moe_layer(layer) and sub.startswith("mlp.")):
            yield prefix + sub, tensor
            return
        mlp = "block_sparse_moe." if self.fam.model_type == "mixtral" else "mlp."
        inner = sub[len("mlp."):]
        names = self.fam.legacy_expert_names
        if names and inner == "experts.gate_up_proj":
            for e in range(tensor.shape[0]):
                yield f"{prefix}{mlp}experts.{e}.{names[0]}.weight", tensor[e, : self.F]
                yield f"{prefix}{mlp}experts.{e}.{names[1]}.weight", tensor[e, self.F:]
        elif names and inner == "experts.down_proj":
            for e in range(tensor.shape[0]):
                yield f"{prefix}{mlp}experts.{e}.{names[2]}.weight", tensor[e]
        elif inner in self.block:
            yield f"{prefix}{mlp}{self.block[inner]}", tensor
        else:
            raise CheckpointError(f"moekit tensor {name!r} has no Hugging Face counterpart")


def lm_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (tied parameters once)."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    non_persistent = {f"{mod_name}.{b}".lstrip(".") for mod_name, mod in model.named_modules()
                      for b in mod._non_persistent_buffers_set}
    for name, buf in model.named_buffers():
        if buf is not None and name not in non_persistent:
            tensors[name] = buf
    return tensors


# ---------------------------------------------------------------------------------------- loading
@torch.no_grad()
def load_hf_weights(model: LM, files: list[Path], key_map: KeyMap) -> list[str]:
    """Stream every checkpoint tensor into ``model``; returns skipped keys. Errors name tensor and file."""
    targets = lm_tensors(model)
    filled = dict.fromkeys(targets, 0)
    skipped, seen = [], set()
    for file, handle, key in iter_checkpoint(files):
        try:
            mapped = key_map.to_moekit(key)
        except CheckpointError as err:
            raise CheckpointError(f"{file}: {err}") from None
        if mapped is None:
            skipped.append(key)
            continue
        name, index = mapped
        if name not in targets:
            raise CheckpointError(f"tensor {key!r} in {file} maps to {name!r}, which this model does not have")
        view = handle.get_slice(key)
        dtype = view.get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {key!r} in {file} has dtype {dtype}; expected one of "
                                  f"{sorted(_FLOAT_DTYPES)} (quantized checkpoints are not supported)")
        if index and index[0] >= targets[name].shape[0]:
            raise CheckpointError(f"tensor {key!r} in {file} belongs to expert {index[0]}, but config.json gives "
                                  f"{targets[name].shape[0]} experts ({name!r} has shape "
                                  f"{tuple(targets[name].shape)}); the config does not match the checkpoint")
        dst = targets[name][index] if index else targets[name]
        shape = tuple(view.get_shape())
        if shape != tuple(dst.shape):
            raise CheckpointError(f"tensor {key!r} in {file} has shape {shape}; moekit {name!r}"
                                  f"{list(index) if index else ''} expects {tuple(dst.shape)}")
        if filled[name] + dst.numel() > targets[name].numel():
            raise CheckpointError(f"tensor {key!r} in {file} fills {name!r} a second time")
        dst.copy_(handle.get_tensor(key))
        filled[name] += dst.numel()
        seen.add(key)
    missing = [n for n, count in filled.items() if count != targets[n].numel()]
    if missing:
        keys = [k for n in missing for k, _ in key_map.to_hf(n, targets[n]) if k not in seen]
        index_file = files[0].parent / INDEX_NAME
        where = str(index_file) if index_file.is_file() else ", ".join(str(f) for f in files)
        raise CheckpointError(f"{where} lacks tensor(s) {keys[:8]}{' ...' if len(keys) > 8 else ''} "
                              f"({len(keys)} in all; moekit parameter(s) {missing[:4]}"
                              f"{' ...' if len(missing) > 4 else ''})")
    return skipped


def from_hf(path_or_repo_id: str | Path, dtype: torch.dtype | None = None, revision: str | None = None,
            **moe_overrides: Any) -> LM:
    """A moekit LM from a Hugging Face checkpoint folder, or a hub repo id (downloaded first).

    ``dtype`` casts parameters before loading (default float32); ``moe_overrides`` set MoEConfig
    fields of every MoE layer (e.g. ``backend``, ``check_finite``).
    """
    folder = resolve_folder(path_or_repo_id, revision)
    hf_config = load_hf_config(folder)
    lm_cfg = lm_config_from_hf(hf_config, **moe_overrides)
    files = shard_files(folder)
    model = build_lm(lm_cfg, hf_config.to_dict())
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    load_hf_weights(model, files, KeyMap(hf_config, lm_cfg))
    model.hf_config = hf_config.to_dict()
    return model.eval()


# ---------------------------------------------------------------------------------------- moekit format
def _write_moekit(model: LM, folder: Path, hf_config: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    model.config.save(folder / MOEKIT_CONFIG)
    tensors = {k: v.contiguous() for k, v in lm_tensors(model).items()}
    quantized = quantization_of(model)  # int8 experts: int8 weights + float32 scales, named in the metadata
    metadata = {"format": "pt", **({QUANT_METADATA_KEY: quantized} if quantized else {})}
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    hf_config = hf_config if hf_config is not None else getattr(model, "hf_config", None)
    if hf_config is not None:
        (folder / "hf_config.json").write_text(json.dumps(hf_config, indent=2, default=str))


def save_moekit(model: LM, out_dir: str | Path, hf_config: dict[str, Any] | None = None,
                overwrite: bool = False) -> Path:
    """Write ``moekit_lm.json`` (LMConfig) and ``model.safetensors`` (state dict) to out_dir.

    The folder appears complete or not at all; a non-empty out_dir is refused unless
    ``overwrite``, which replaces a previous moekit folder (and refuses folders with other files).
    """
    with output_folder(out_dir, is_moekit_file, overwrite) as tmp:
        _write_moekit(model, tmp, hf_config)
    return Path(out_dir)


@torch.no_grad()
def load_moekit(folder: str | Path) -> LM:
    """A moekit LM saved by ``save_moekit``; errors name missing or mis-shaped tensors and the file."""
    folder = Path(folder)
    cfg = LMConfig.load(folder / MOEKIT_CONFIG)
    hf_path = folder / "hf_config.json"
    hf_config = read_json(hf_path) if hf_path.is_file() else None
    model = build_lm(cfg, hf_config)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors")
    with open_safetensors(path) as handle:
        quantized = (handle.metadata() or {}).get(QUANT_METADATA_KEY)
        if quantized is not None:
            try:
                quantize_experts(model, quantized)
            except ValueError as err:
                raise CheckpointError(f"{path}: {err}") from None
        targets = lm_tensors(model)
        keys = set(handle.keys())
        missing, unexpected = sorted(set(targets) - keys), sorted(keys - set(targets))
        if missing or unexpected:
            raise CheckpointError(f"{path}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
        for name, dst in targets.items():
            src = handle.get_tensor(name)
            if src.shape != dst.shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(src.shape)}, "
                                      f"expected {tuple(dst.shape)}")
            if dst.dtype != src.dtype and isinstance(dst, nn.Parameter):
                dst.data = torch.empty_like(dst, dtype=src.dtype)
            dst.copy_(src)
    if hf_config is not None:
        model.hf_config = hf_config
    return model.eval()


def convert_folder(src: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                   revision: str | None = None, overwrite: bool = False, quantize: str | None = None) -> Path:
    """HF checkpoint folder (or repo id) -> moekit folder, copying tokenizer files along.
    ``quantize="int8"`` stores the experts as int8 with per-channel scales (``quantize_experts``).

    Written as ``save_moekit`` writes: all at once, refusing a non-empty out_dir unless ``overwrite``.
    """
    check_output_folder(Path(out_dir).expanduser().resolve(), is_moekit_file, overwrite)  # before the slow part
    folder = resolve_folder(src, revision)
    model = from_hf(folder, dtype=dtype)
    if quantize is not None:
        quantize_experts(model, quantize)
    with output_folder(out_dir, is_moekit_file, overwrite) as tmp:
        _write_moekit(model, tmp, None)
        for name in SIDE_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
    return Path(out_dir)
