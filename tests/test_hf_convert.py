"""Checkpoint conversion HF -> moekit (from_hf), export moekit -> HF (to_hf), and their errors.

Every model is a tiny random transformers model saved with ``save_pretrained`` (no hub access).
"""

from __future__ import annotations

import json
import weakref
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from moekit import MoEConfig, RouterConfig  # noqa: E402
from moekit.cli import main as cli_main  # noqa: E402
from moekit.hf import CheckpointError, UnsupportedArchitectureError, from_hf, load_moekit, save_moekit, to_hf  # noqa: E402
from moekit.hf.convert import CONVERTIBLE, INDEX_NAME, lm_tensors  # noqa: E402
from moekit.hf.testing import tiny_hf_model  # noqa: E402
from moekit.lm import LM, LMConfig, generate  # noqa: E402

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """transformers' own greedy KV-cache generation of exactly ``steps`` tokens (no stop at an end
    token; an explicit mask: id 0 is not padding here)."""
    model.generation_config.eos_token_id = None
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                          pad_token_id=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """family -> (HF model, folder it was saved to), built once for the module."""
    out = {}
    for family in CONVERTIBLE:
        model = tiny_hf_model(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (model, folder)
    return out


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta, tb = lm_tensors(a), lm_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_from_hf_logits_and_greedy_generation(family: str, saved) -> None:
    hf, folder = saved[family]
    model = from_hf(folder)
    with torch.no_grad():
        ref = hf(IDS).logits
        assert rel_err(model(IDS), ref) < 1e-4
        hf_tokens = hf_greedy(hf, IDS, 20)
    assert torch.equal(generate(model, IDS, 20), hf_tokens)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 64}


def test_gpt_oss_with_yarn_rope_sinks_and_sliding_window(tmp_path: Path) -> None:
    """gpt-oss as released: YaRN rotary scaling, attention sinks, every other layer windowed
    (window 4, shorter than prompt + generation), clamped SwiGLU experts with biases."""
    hf = tiny_hf_model("gpt_oss", rope_parameters=YARN)
    assert hf.config.layer_types[0] == "sliding_attention" and hf.config.sliding_window == 4
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert float(model.layers[0].self_attn.sinks.detach().abs().min()) > 0
    with torch.no_grad():
        assert rel_err(model(IDS), hf(IDS).logits) < 1e-4
        hf_tokens = hf_greedy(hf, IDS, 20)
    assert torch.equal(generate(model, IDS, 20), hf_tokens)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_with_yarn_rope(family: str, tmp_path: Path) -> None:
    """DeepSeek-V2/V3 as released use YaRN with mscale_all_dim, which also rescales the softmax."""
    rope = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
    hf = tiny_hf_model(family, rope_parameters=rope)
    hf.save_pretrained(tmp_path / "src")
    model = from_hf(tmp_path / "src")
    with torch.no_grad():
        ref = hf(IDS).logits
        assert rel_err(model(IDS), ref) < 1e-4
        hf_tokens = hf_greedy(hf, IDS, 20)
    assert torch.equal(generate(model, IDS, 20), hf_tokens)
    to_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        assert rel_err(back(IDS).logits, ref) < 1e-6


@pytest.mark.parametrize("rope", [
    YARN,
    {**YARN, "truncate": True, "beta_fast": 16.0, "beta_slow": 2.0},
    # DeepSeek-V3's form: attention factor from mscale / mscale_all_dim.
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.8,
     "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0, "attention_factor": 1.3,
     "original_max_position_embeddings": 8192},
    {"rope_type": "default", "rope_theta": 123.0},
])
def test_rotary_tables_match_transformers(rope: dict) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moekit.lm.rope import rotary_inv_freq

    config = transformers.GptOssConfig(hidden_size=64, num_attention_heads=4, head_dim=32,
                                       max_position_embeddings=4096 * 40, rope_parameters=dict(rope))
    if rope["rope_type"] == "default":
        theirs, their_scale = transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding \
            .compute_default_rope_parameters(config)
    else:
        theirs, their_scale = ROPE_INIT_FUNCTIONS["yarn"](config)
    ours, scale = rotary_inv_freq(32, rope, config.max_position_embeddings)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0) and scale == pytest.approx(their_scale, rel=1e-12)


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_export_loads_in_transformers_and_round_trips(family: str, saved, tmp_path: Path) -> None:
    hf, folder = saved[family]
    model = from_hf(folder)
    # Small shards force an index file and experts split across files.
    to_hf(model, tmp_path / "hf", max_shard_bytes=64_000)
    assert (tmp_path / "hf" / INDEX_NAME).is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is type(hf)
    with torch.no_grad():
        assert rel_err(reloaded(IDS).logits, hf(IDS).logits) < 1e-6
    assert_same_tensors(from_hf(tmp_path / "hf"), model)


def test_sharded_checkpoint_with_index(saved, tmp_path: Path) -> None:
    hf, _ = saved["qwen2_moe"]
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and (tmp_path / INDEX_NAME).is_file()
    with torch.no_grad():
        assert rel_err(from_hf(tmp_path)(IDS), hf(IDS).logits) < 1e-4


def test_dtype_cast_on_load(saved) -> None:
    _, folder = saved["mixtral"]
    model = from_hf(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["softmax_mha", "sigmoid_mla"])
def test_native_moekit_model_exports(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if kind == "softmax_mha":
        moe = MoEConfig(dim=32, num_experts=4, expert_hidden=24, router=RouterConfig(top_k=2))
        cfg = LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, moe=moe, max_seq_len=64)
        expected = "MixtralForCausalLM"
    else:
        moe = MoEConfig(dim=32, num_experts=8, expert_hidden=16, shared={"num": 1},
                        router=RouterConfig(kind="sigmoid_topk", top_k=2, n_group=2, topk_group=1,
                                            routed_scaling_factor=2.0))
        cfg = LMConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, moe=moe, first_dense_layers=1, ffn_hidden=48,
                       attention="mla", max_seq_len=64,
                       attention_options=dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                              qk_rope_head_dim=4, v_head_dim=8))
        expected = "DeepseekV3ForCausalLM"
    model = LM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    to_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == expected
    ids = IDS % 64
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-4
        assert torch.equal(generate(model, ids, 10), hf_greedy(hf, ids, 10))
    # moekit -> HF -> moekit: bit-identical weights (and the router's selection bias).
    assert_same_tensors(from_hf(tmp_path), model)


def test_moekit_folder_and_cli(saved, tmp_path: Path) -> None:
    hf, folder = saved["olmoe"]
    assert cli_main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "mk")]) == 0
    model = load_moekit(tmp_path / "mk")
    assert_same_tensors(model, from_hf(folder))
    assert cli_main(["convert", "--to-hf", str(tmp_path / "mk"), "--out", str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert rel_err(back(IDS).logits, hf(IDS).logits) < 1e-6
    save_moekit(model, tmp_path / "again")
    assert_same_tensors(load_moekit(tmp_path / "again"), model)


# ---------------------------------------------------------------------------------------- errors
def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_unsupported_architecture(tmp_path: Path) -> None:
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    llama.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="model_type='llama'"):
        from_hf(tmp_path)


def test_scaled_rope_is_refused_where_unsupported(tmp_path: Path) -> None:
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    tiny_hf_model("mixtral", rope_parameters=yarn, head_dim=8).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="rope_type='yarn'.*mixtral"):
        from_hf(tmp_path)


def test_missing_shard(saved, tmp_path: Path) -> None:
    hf, _ = saved["mixtral"]
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        from_hf(tmp_path)


def test_shape_mismatch_names_tensor_and_file(saved, tmp_path: Path) -> None:
    folder = _copy(saved["qwen3_moe"][1], tmp_path)
    key = "model.layers.0.mlp.experts.3.up_proj.weight"
    _rewrite(folder / "model.safetensors", lambda t: t.__setitem__(key, torch.zeros(5, 32)))
    with pytest.raises(CheckpointError, match=rf"{key}.*model.safetensors.*\(5, 32\)"):
        from_hf(folder)


def test_wrong_dtype_names_tensor_and_file(saved, tmp_path: Path) -> None:
    folder = _copy(saved["deepseek_v3"][1], tmp_path)
    key = "model.layers.1.mlp.gate.weight"
    _rewrite(folder / "model.safetensors", lambda t: t.__setitem__(key, t[key].to(torch.int8)))
    with pytest.raises(CheckpointError, match=rf"{key}.*model.safetensors.*I8"):
        from_hf(folder)


def test_missing_and_unexpected_tensors(saved, tmp_path: Path) -> None:
    folder = _copy(saved["mixtral"][1], tmp_path)
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    _rewrite(folder / "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.down_proj"):
        from_hf(folder)
    _rewrite(folder / "model.safetensors", lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="mystery"):
        from_hf(folder)


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(CheckpointError, match="no safetensors"):
        from_hf(tmp_path)


def test_export_refuses_what_the_family_cannot_express(tmp_path: Path) -> None:
    moe = MoEConfig(dim=32, num_experts=4, expert_hidden=24, router=RouterConfig(top_k=2, norm_topk_prob=False))
    model = LM(LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, moe=moe, max_seq_len=64))
    with pytest.raises(UnsupportedArchitectureError, match="mixtral.*norm_topk_prob"):
        to_hf(model, tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="olmoe.*qk_norm"):
        to_hf(model, tmp_path, family="olmoe")


# ---------------------------------------------------------------------------------------- streaming
class _TrackedHandle:
    """A safe_open handle that records every tensor it hands out (by weak reference)."""

    def __init__(self, handle, log: dict) -> None:
        self._handle, self._log = handle, log

    def __enter__(self):
        self._log["open"] += 1
        self._log["max_open"] = max(self._log["max_open"], self._log["open"])
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        self._log["open"] -= 1
        return self._handle.__exit__(*exc)

    def keys(self):
        return self._handle.keys()

    def get_slice(self, key):
        return self._handle.get_slice(key)

    def get_tensor(self, key):
        alive = [k for k, ref in self._log["refs"] if ref() is not None]
        self._log["max_alive_before_read"] = max(self._log["max_alive_before_read"], len(alive))
        tensor = self._handle.get_tensor(key)
        self._log["refs"].append((key, weakref.ref(tensor)))
        return tensor


def test_loader_streams_one_tensor_at_a_time(saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards open one at a time, each tensor is read once, and every tensor read is freed
    (copied into the model) before the next one is read: never a second copy of the model."""
    import safetensors

    hf, _ = saved["deepseek_v3"]
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    n_files = len(list(tmp_path.glob("*.safetensors")))
    assert n_files > 2
    log = {"open": 0, "max_open": 0, "max_alive_before_read": 0, "refs": []}
    real_open = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **kw: _TrackedHandle(real_open(*a, **kw), log))
    model = from_hf(tmp_path)
    keys = [k for k, _ in log["refs"]]
    index = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert sorted(keys) == sorted(index) and len(set(keys)) == len(keys)
    assert log["max_open"] == 1
    assert log["max_alive_before_read"] == 0
    assert all(ref() is None for _, ref in log["refs"])
    with torch.no_grad():
        assert rel_err(model(IDS), hf(IDS).logits) < 1e-4
