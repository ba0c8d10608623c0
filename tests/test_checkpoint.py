import pytest
import torch

from moekit import moe_config
from moekit.lm import LM, LMConfig
from moekit.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, model_state, \
    optimizer_state, resolve_checkpoint, save_checkpoint


def small_model(**kw):
    return LM(LMConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=8,
                       moe=moe_config(dim=16, num_experts=4, expert_hidden=8, top_k=2), **kw))


def trained_pair():
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 40, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def test_save_and_load_round_trip(tmp_path):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, 7, model, opt, {"note": "x"})
    assert path.name == "step_00000007.safetensors"
    assert latest_checkpoint(tmp_path) == path
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 7 and meta["meta"] == {"note": "x"}
    other = small_model()
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    model_state(tensors, other, path)
    optimizer_state(tensors, meta["optim"], other_opt, path)
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n
    s1, s2 = opt.state_dict(), other_opt.state_dict()
    for idx in s1["state"]:
        assert torch.equal(s1["state"][idx]["exp_avg_sq"], s2["state"][idx]["exp_avg_sq"])
        assert float(s1["state"][idx]["step"]) == float(s2["state"][idx]["step"])


def test_tied_embeddings_save(tmp_path):
    model = small_model(tie_embeddings=True)
    save_checkpoint(tmp_path, 1, model, None, {})
    other = small_model(tie_embeddings=True)
    tensors, _ = load_checkpoint(tmp_path)
    model_state(tensors, other, tmp_path)
    assert torch.equal(other.lm_head.weight, model.embed_tokens.weight)
    assert other.lm_head.weight is other.embed_tokens.weight


def test_keeps_newest_and_latest_points_at_last(tmp_path):
    model, opt = trained_pair()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002.safetensors", "step_00000003.safetensors"]
    assert latest_checkpoint(tmp_path).name == "step_00000003.safetensors"


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    model, opt = trained_pair()
    good = save_checkpoint(tmp_path, 5, model, opt, {})
    # A crash during the next save leaves a temporary file and an unchanged pointer.
    (tmp_path / ".step_00000006.safetensors.123.tmp").write_bytes(good.read_bytes()[:100])
    assert resolve_checkpoint(tmp_path) == good
    assert load_checkpoint(tmp_path)[1]["step"] == 5


def test_truncated_checkpoint_names_the_file(tmp_path):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=r"step_00000001\.safetensors is truncated or not a safetensors file"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a safetensors file but not a moekit checkpoint"):
        load_checkpoint(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors is truncated or not a safetensors file"):
        load_checkpoint(junk)


def test_checkpoint_of_another_model_names_the_mismatch(tmp_path):
    model, opt = trained_pair()
    save_checkpoint(tmp_path, 1, model, opt, {})
    tensors, _ = load_checkpoint(tmp_path)
    other = LM(LMConfig(vocab_size=40, dim=16, n_layers=3, n_heads=2, ffn_hidden=24, max_seq_len=8))
    message = r"does not match the model: missing \['layers.0.mlp.down_proj.*unexpected \['layers.0.mlp.experts"
    with pytest.raises(CheckpointError, match=message):
        model_state(tensors, other, tmp_path)
    wider = LM(LMConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=8,
                        moe=moe_config(dim=16, num_experts=4, expert_hidden=12, top_k=2)))
    with pytest.raises(CheckpointError, match=r"wrong shape.*gate_up_proj"):
        model_state(tensors, wider, tmp_path)


def test_missing_checkpoint_and_dangling_pointer(tmp_path):
    with pytest.raises(CheckpointError, match=r"holds no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_00000009.safetensors")
    with pytest.raises(CheckpointError, match=r"latest names 'step_00000009.safetensors', which does not exist"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"nope.safetensors does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
