"""Checkpoint conversion HF -> moekit (from_hf), export moekit -> HF (to_hf), and their errors.

Every model is a tiny random transformers model saved with ``save_pretrained`` (no hub access).
"""

from __future__ import annotations

import json
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
    """transformers' own greedy KV-cache generation (an explicit mask: id 0 is not padding here)."""
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


def test_gpt_oss_whole_model_is_refused_with_reason(tmp_path: Path) -> None:
    tiny_hf_model("gpt_oss").save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="gpt_oss.*block by block"):
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
