import os

import pytest
import torch

from moekit import moe_config
from moekit.lm import LM, LMConfig
from moekit.train.checkpoint import CheckpointError, ChecksumError, DiskFullError, append_line, latest_checkpoint, \
    load_checkpoint, load_newest, model_state, optimizer_state, resolve_checkpoint, restore_moe_state, save_checkpoint


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


# ---------------------------------------------------------------------- integrity (issue 13)
def _tensor_span(path, name):
    """(start, end) byte offsets of tensor ``name``'s data inside a safetensors file."""
    import json

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _flip(path, offset, mask=0x01):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_flipped_expert_weight_stays_finite_but_is_detected(tmp_path):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    name = "model.layers.1.mlp.experts.gate_up_proj"
    start, _ = _tensor_span(path, name)
    _flip(path, start + 4 * 37)  # lowest mantissa bit of one float32: finite, slightly wrong
    from safetensors.torch import load_file

    assert torch.isfinite(load_file(path)[name]).all()
    with pytest.raises(ChecksumError, match=rf"step_00000001\.safetensors: tensor '{name}' fails its sha256 checksum"):
        load_checkpoint(path)


def test_flipped_optimizer_byte_is_detected(tmp_path):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    start, end = _tensor_span(path, "optim.3.exp_avg_sq")
    _flip(path, (start + end) // 2, 0x40)
    with pytest.raises(ChecksumError, match=r"tensor 'optim\.3\.exp_avg_sq' fails its sha256 checksum"):
        load_checkpoint(path)


def test_every_single_byte_corruption_is_detected(tmp_path):
    """Random byte flips anywhere in the file (header, metadata JSON, tensor data): each load raises."""
    import random

    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, 1, model, opt, {"config": {"lr": 0.01}})
    clean = path.read_bytes()
    rng = random.Random(0)
    cases = 300
    for _ in range(cases):
        data = bytearray(clean)
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    path.write_bytes(clean)
    assert load_checkpoint(path)[1]["step"] == 1


def test_changed_metadata_is_detected(tmp_path):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, 1, model, opt, {"config": {"lr": 0.25}})
    data = path.read_bytes()
    assert data.count(b"0.25") == 1
    path.write_bytes(data.replace(b"0.25", b"0.75"))  # same length, still valid JSON
    with pytest.raises(ChecksumError, match=r"its metadata .* fails its sha256 checksum"):
        load_checkpoint(path)


def test_legacy_checkpoint_without_checksums_still_loads(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "step_00000004.safetensors"
    save_file({"model.w": torch.ones(2)}, str(path),
              metadata={"format": "moekit-checkpoint-v1", "step": "4", "meta": "{}", "optim": "{}"})
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 4 and meta["moe"] == {} and torch.equal(tensors["model.w"], torch.ones(2))


def test_kill_between_rename_and_pointer_resumes_from_the_newer_file(tmp_path):
    model, opt = trained_pair()
    save_checkpoint(tmp_path, 2, model, opt, {})
    # The kill came after step 4 was renamed into place but before `latest` was replaced.
    newer = save_checkpoint(tmp_path, 4, model, opt, {})
    (tmp_path / "latest").write_text("step_00000002.safetensors")
    assert latest_checkpoint(tmp_path) == newer
    assert load_newest(tmp_path)[0] == newer
    # ... and on the first checkpoint: no pointer at all.
    first = tmp_path / "first"
    save_checkpoint(first, 2, model, opt, {})
    (first / "latest").unlink()
    assert load_newest(first)[0].name == "step_00000002.safetensors"


def test_resume_skips_a_corrupted_newest_checkpoint(tmp_path):
    model, opt = trained_pair()
    save_checkpoint(tmp_path, 2, model, opt, {})
    bad = save_checkpoint(tmp_path, 4, model, opt, {})
    start, _ = _tensor_span(bad, "model.embed_tokens.weight")
    _flip(bad, start)
    path, _, meta, skipped = load_newest(tmp_path)
    assert path.name == "step_00000002.safetensors" and meta["step"] == 2
    assert len(skipped) == 1 and "step_00000004.safetensors" in skipped[0] and "embed_tokens" in skipped[0]
    with pytest.raises(ChecksumError):  # an explicit load of the folder names the bad newest file
        load_checkpoint(tmp_path)
    (tmp_path / "step_00000002.safetensors").write_bytes(b"junk")
    with pytest.raises(ChecksumError, match=r"no older checkpoint of .* loads either"):
        load_newest(tmp_path)


def test_stale_temp_files_are_removed(tmp_path):
    import subprocess
    import sys

    model, opt = trained_pair()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = [tmp_path / f".step_00000006.safetensors.{pid}.tmp", tmp_path / f".latest.{pid}.tmp"]
    live = tmp_path / f".step_00000006.safetensors.{os.getppid()}.tmp"  # a writer still running
    for p in [*stale, live]:
        p.write_bytes(b"partial")
    save_checkpoint(tmp_path, 1, model, opt, {})
    assert not any(p.exists() for p in stale) and live.exists()
    live.unlink()
    for p in stale:
        p.write_bytes(b"partial")
    load_newest(tmp_path)
    assert not any(p.exists() for p in stale)


def test_full_disk_names_the_space_needed_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from moekit.train import checkpoint as ckpt

    model, opt = trained_pair()
    good = save_checkpoint(tmp_path, 2, model, opt, {})
    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd, data):
        calls["n"] += 1
        if calls["n"] > 1:  # the first chunk lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data)[:1000])

    monkeypatch.setattr(ckpt.os, "write", full_disk)
    with pytest.raises(DiskFullError, match=r"no space left to write .*step_00000004\.safetensors: it needs "
                                            r"\d+\.\d KiB, .* free in .*; the partial file was removed; the previous "
                                            r"checkpoint step_00000002\.safetensors stays the resume point"):
        save_checkpoint(tmp_path, 4, model, opt, {})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002.safetensors"]
    assert load_newest(tmp_path)[0] == good


def test_metrics_line_is_never_torn_by_a_full_disk(tmp_path, monkeypatch):
    from moekit.train import checkpoint as ckpt

    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"step": 1}')
    real_write = os.write
    monkeypatch.setattr(ckpt.os, "write", lambda fd, data: real_write(fd, data[:5]))  # a short write
    with pytest.raises(DiskFullError, match=r"no space left to append 13 bytes to .*metrics\.jsonl"):
        append_line(path, '{"step": 22}')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'


def test_masks_and_routing_statistics_round_trip(tmp_path):
    from moekit.model_ops import moe_layers

    model, opt = trained_pair()
    layer = dict(moe_layers(model))["layers.1.mlp"]
    layer.mask_experts([2])
    layer.freeze_experts([0])
    model(torch.randint(0, 40, (2, 8)))
    save_checkpoint(tmp_path, 3, model, opt, {})
    tensors, meta = load_checkpoint(tmp_path)
    other = small_model()
    restore_moe_state(meta["moe"], other, tmp_path)
    got = dict(moe_layers(other))["layers.1.mlp"]
    assert got.masked_experts == [2] and got.frozen_experts == [0]
    assert got.stats.forward_passes == layer.stats.forward_passes == 2
    for (k, a), (_, b) in zip(layer.stats.named_buffers(), got.stats.named_buffers()):
        assert torch.equal(a, b), k
    fresh = small_model()
    restore_moe_state(meta["moe"], fresh, tmp_path, stats=False)  # for eval/serving: masks only
    fl = dict(moe_layers(fresh))["layers.1.mlp"]
    assert fl.masked_experts == [2] and fl.frozen_experts == [] and fl.stats.forward_passes == 0
    dense = LM(LMConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=8))
    with pytest.raises(CheckpointError, match=r"MoE state for layers \['layers.0.mlp', 'layers.1.mlp'\]"):
        restore_moe_state(meta["moe"], dense, tmp_path)
