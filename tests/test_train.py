import json
import math
import sys

import numpy as np
import pytest
import torch

from moekit import ConfigError, moe_config
from moekit.data.corpus import TokenData, TokenSplit
from moekit.lm import LMConfig
from moekit.train import TrainConfig, Trainer
from moekit.train.trainer import eval_batches, load_trained


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_data(n=4000, labels=("a", "b")) -> TokenData:
    """Two 'languages' with different byte statistics, labels per token."""
    rng = np.random.default_rng(0)
    half = n // 2
    toks = np.concatenate([rng.integers(0, 8, half), rng.integers(100, 140, n - half)]).astype(np.uint16)
    labs = np.concatenate([np.zeros(half), np.ones(n - half)]).astype(np.int16)
    split = TokenSplit(toks, labs)
    return TokenData(split, TokenSplit(toks[::-1].copy(), labs[::-1].copy()), list(labels), "byte", None)


def cfg(tmp_path, moe=True, **kw) -> TrainConfig:
    model = LMConfig(vocab_size=257, dim=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=16,
                     moe=moe_config(dim=16, num_experts=4, expert_hidden=16, top_k=2, z_loss_coef=1e-3,
                                    router="noisy_topk") if moe else None)
    base = dict(model=model, seq_len=16, batch_size=4, steps=6, warmup_steps=2, eval_every=3, ckpt_every=2,
                eval_tokens=128, out_dir=str(tmp_path / "run"), progress=False, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_bit_for_bit(tmp_path):
    straight = Trainer(cfg(tmp_path / "a"), fake_data())
    straight.fit()
    losses = [h["loss"] for h in straight.history]

    first = Trainer(cfg(tmp_path / "b"), fake_data())
    first.fit(steps=3)
    torch.manual_seed(1234)  # disturb global RNG: resume must restore it
    second = Trainer(cfg(tmp_path / "b"), fake_data())
    second.resume(tmp_path / "b" / "run")
    assert second.step == 3
    second.fit()
    resumed = [h["loss"] for h in first.history] + [h["loss"] for h in second.history]
    assert resumed == losses
    assert [h["aux"] for h in second.history] == [h["aux"] for h in straight.history[3:]]
    for (n, p), (_, q) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n


def test_training_lowers_loss_and_eval_reports_each_label(tmp_path):
    t = Trainer(cfg(tmp_path, steps=30, lr=1e-2, eval_every=30, ckpt_every=30), fake_data())
    t.fit()
    first, last = t.evals[0], t.evals[-1]
    assert last["loss"] < first["loss"] - 1.0
    assert set(last["per_label"]) == {"a", "b"}
    counts = last["routing_by_label"]["layers.0.mlp"]
    assert np.asarray(counts).shape == (2, 4)
    assert sum(map(sum, counts)) == 2 * sum(last["tokens_per_label"].values())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(x.get("kind") == "eval" for x in lines) and any("grad_norm" in x for x in lines)


def test_eval_overall_is_token_weighted_mean_of_labels(tmp_path):
    t = Trainer(cfg(tmp_path), fake_data())
    r = t.evaluate()
    n = r["tokens_per_label"]
    weighted = sum(r["per_label"][k] * n[k] for k in n) / sum(n.values())
    assert math.isclose(r["loss"], weighted, rel_tol=1e-9)
    batches = eval_batches(t.data.val, 4, 16, 128)
    assert sum(b.targets.numel() for b in batches) == 128


def test_lr_schedule_warmup_then_cosine(tmp_path):
    t = Trainer(cfg(tmp_path, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1), fake_data())
    assert t.lr_at(0) == pytest.approx(0.1)
    assert t.lr_at(9) == pytest.approx(1.0)
    assert t.lr_at(55) == pytest.approx(0.55)
    assert t.lr_at(100) == pytest.approx(0.1)


def test_extra_loss_and_param_filter(tmp_path):
    seen = []

    def label_loss(model, batch, logits):
        seen.append(batch.labels.shape)
        return logits.float().pow(2).mean() * 0.0 + 0.5

    only_experts = lambda name, p: ".mlp.experts." in name  # noqa: E731
    t = Trainer(cfg(tmp_path, steps=2, grad_accum=2), fake_data(), param_filter=only_experts)
    t.add_loss("label", label_loss)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.fit()
    assert seen == [(4, 16)] * 4
    assert t.history[-1]["label"] == pytest.approx(0.5)
    for n, p in t.model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (".mlp.experts." in n), n
    with pytest.raises(ValueError, match="already exists"):
        t.add_loss("aux", label_loss)


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path):
    t = Trainer(cfg(tmp_path, steps=50, eval_every=3, ckpt_every=100), fake_data())
    t.fit(on_eval=lambda record: t._on_sigint(2, None))
    assert t.interrupted and t.step == 3
    again = Trainer(cfg(tmp_path, steps=50), fake_data())
    again.resume(tmp_path / "run")
    assert again.step == 3


def test_trained_model_loads_for_eval(tmp_path):
    t = Trainer(cfg(tmp_path, steps=2), fake_data())
    t.fit()
    model, config, meta = load_trained(tmp_path / "run")
    assert config == t.cfg and meta["step"] == 2
    ids = torch.randint(0, 200, (1, 8))
    t.model.eval()
    torch.testing.assert_close(model(ids), t.model(ids))


def test_train_config_errors_name_field_and_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"steps": 10, "learning_rate": 0.1}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\] in .*train\.json"):
        TrainConfig.load(path)
    path.write_text(json.dumps({"model": {"dim": 30, "n_heads": 4}}))
    with pytest.raises(ConfigError, match=r"train\.json: model: dim=30 is not divisible by n_heads=4"):
        TrainConfig.load(path)
    with pytest.raises(ConfigError, match=r"seq_len=512 exceeds model.max_seq_len=256"):
        TrainConfig(seq_len=512)
    with pytest.raises(ConfigError, match=r"autocast='fp16'"):
        TrainConfig(autocast="fp16")


def test_config_round_trip(tmp_path):
    c = cfg(tmp_path)
    c.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == c


def test_vocab_too_small_for_data_is_an_error(tmp_path):
    c = cfg(tmp_path)
    c.model = LMConfig(vocab_size=100, dim=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=16)
    with pytest.raises(ConfigError, match=r"model.vocab_size=100 is smaller than the tokenizer's 140 ids"):
        Trainer(c, fake_data())


def test_example_configs_load_and_match_the_demo(tmp_path):
    from pathlib import Path

    from moekit.cli.demo import DemoMoE, demo_configs

    root = Path(__file__).resolve().parents[1] / "configs"
    loaded = {p.stem: TrainConfig.load(p) for p in sorted(root.glob("*.json"))}
    assert {"polyglot_dense", "polyglot_moe", "polyglot_moe_fine", "tiny_moe"} <= set(loaded)
    # polyglot_moe_fine.json is the 16 x 128 top-4 MoE of the first investigation (docs/training.md), with
    # its schedule: lr 3e-3 and 30 warm-up steps (the demo's defaults at the time).
    demo = demo_configs("small", tmp_path, "data_cache", DemoMoE(num_experts=16, top_k=4, shared_experts=0,
                                                                     aux_loss_coef=0.01, lr=3e-3, warmup_steps=30))
    assert loaded["polyglot_moe_fine"].model == demo["moe"].model
    assert loaded["polyglot_dense"].model == demo["dense"].model
    for key in ("seq_len", "batch_size", "steps", "lr", "warmup_steps", "eval_every", "eval_tokens", "seed"):
        assert getattr(loaded["polyglot_moe_fine"], key) == getattr(demo["moe"], key), key


# ---------------------------------------------------------------------- resume you can trust (issue 13)
def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _without_time(row):
    return {k: v for k, v in row.items() if k != "time_s"}


def test_resume_restores_routing_statistics_and_metrics_read_as_one_run(tmp_path):
    kw = dict(steps=7, eval_every=3, ckpt_every=2, log_every=1)
    straight = Trainer(cfg(tmp_path / "a", **kw), fake_data())
    straight.fit()

    killed = Trainer(cfg(tmp_path / "b", **kw), fake_data())
    killed.fit(steps=5)  # rows up to step 5 were written before the "kill", which beat step 5's checkpoint
    run = tmp_path / "b" / "run"
    (run / "checkpoints" / "step_00000005.safetensors").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "tokens": 3')  # a torn line from the moment of the kill
    resumed = Trainer(cfg(tmp_path / "b", **kw), fake_data())
    assert resumed.resume(run).name == "step_00000004.safetensors"
    resumed.fit()
    rows, ref = _rows(run), _rows(tmp_path / "a" / "run")
    assert [(r.get("kind", "train"), r["step"]) for r in rows] == [(r.get("kind", "train"), r["step"]) for r in ref]
    # Eval rows (train_routing counts steps 4-6 across the resume) and per-step losses are identical.
    assert [_without_time(r) for r in rows] == [_without_time(r) for r in ref]


def test_restart_from_step_zero_drops_the_killed_runs_rows(tmp_path):
    first = Trainer(cfg(tmp_path, steps=1, ckpt_every=100, log_every=1), fake_data())
    first.fit()
    again = Trainer(cfg(tmp_path, steps=1, ckpt_every=100, log_every=1), fake_data())
    again.fit()
    rows = _rows(tmp_path / "run")
    assert [(r.get("kind", "train"), r["step"]) for r in rows] == [("eval", 0), ("train", 1), ("eval", 1)]


def test_quarantined_run_resumes_with_its_masks(tmp_path):
    from moekit.health import Quarantine, scan_weights
    from moekit.model_ops import moe_layers

    def poisoned(sub):
        t = Trainer(cfg(tmp_path / sub, steps=4, ckpt_every=2, eval_every=2), fake_data())
        with torch.no_grad():
            dict(moe_layers(t.model))["layers.0.mlp"].experts.gate_up_proj[1] = float("nan")
        return t

    straight = poisoned("a")
    with Quarantine(straight.model) as guard:
        straight.fit()
    assert {e.layer for e in guard.events} == {"layers.0.mlp"}
    assert dict(moe_layers(straight.model))["layers.0.mlp"].masked_experts == [1]

    first = poisoned("b")
    with Quarantine(first.model):
        first.fit(steps=2)
    resumed = Trainer(cfg(tmp_path / "b", steps=4, ckpt_every=2, eval_every=2), fake_data())
    resumed.resume(tmp_path / "b" / "run")  # no quarantine now: the masks come from the checkpoint
    assert dict(moe_layers(resumed.model))["layers.0.mlp"].masked_experts == [1]
    resumed.fit()
    assert [h["loss"] for h in first.history + resumed.history] == [h["loss"] for h in straight.history]
    model, _, _ = load_trained(tmp_path / "b" / "run")
    assert dict(moe_layers(model))["layers.0.mlp"].masked_experts == [1]
    assert [(f.layer, f.expert) for f in scan_weights(model)] == [("layers.0.mlp", 1)]
    assert torch.isfinite(model(torch.randint(0, 140, (2, 16)))).all()


def test_resume_skips_a_corrupted_newest_checkpoint(tmp_path):
    t = Trainer(cfg(tmp_path, steps=4, ckpt_every=2), fake_data())
    t.fit()
    newest = tmp_path / "run" / "checkpoints" / "step_00000004.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    newest.write_bytes(bytes(data))
    again = Trainer(cfg(tmp_path, steps=4, ckpt_every=2), fake_data())
    assert again.resume(tmp_path / "run").name == "step_00000002.safetensors" and again.step == 2
    assert len(again.resume_skipped) == 1 and "fails its sha256 checksum" in again.resume_skipped[0]


def test_cli_train_quarantine_and_resume(tmp_path, capsys):
    from moekit.cli import main

    c = cfg(tmp_path, steps=2, ckpt_every=1, eval_every=2, corpus=str(tmp_path / "docs.jsonl"),
            data_dir=str(tmp_path / "data"))
    with open(tmp_path / "docs.jsonl", "w") as f:
        rng = np.random.default_rng(0)
        for i in range(60):
            alphabet = list("abcdefgh " if i % 2 else "0123456789 ")
            f.write(json.dumps({"text": "".join(rng.choice(alphabet, 300)), "label": "letters" if i % 2 else "digits"})
                    + "\n")
    c.save(tmp_path / "c.json")
    assert main(["train", str(tmp_path / "c.json"), "--quarantine", "--steps", "1"]) == 0
    assert main(["train", str(tmp_path / "c.json"), "--quarantine", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000001.safetensors at step 1" in out
    assert [r["step"] for r in _rows(tmp_path / "run") if "kind" not in r] == [1, 2]


# ---------------------------------------------------------------------- device, host syncs, TensorBoard
def test_device_field_is_checked_and_resolved(tmp_path):
    from moekit.train.config import resolve_device

    with pytest.raises(ConfigError, match=r"device='gpu' is not one of \['cpu', 'cuda', 'cuda:N', 'auto'\]"):
        TrainConfig(device="gpu")
    assert TrainConfig.from_dict({"device": "cuda:1"}).device == "cuda:1"  # loads anywhere; only training asks
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                      else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device='cuda' but this machine has no CUDA device"):
            Trainer(cfg(tmp_path, device="cuda"), fake_data())
    t = Trainer(cfg(tmp_path), fake_data())
    assert t.device == torch.device("cpu") and t.batch(0, 0).input_ids.device == t.device
    # Both devices get torch's fused AdamW (one pass per parameter).
    assert t.optimizer.defaults["fused"] is True
    from moekit.train.loop import adamw_options

    assert adamw_options(torch.device("cuda", 0)) == {"fused": True}
    from types import SimpleNamespace

    nccl = SimpleNamespace(groups=SimpleNamespace(device=torch.device("cuda", 0)))  # only its device is read
    with pytest.raises(ConfigError, match=r"device='cpu' resolves to cpu, but expert parallelism runs its "
                                          r"collectives on cuda:0"):
        Trainer(cfg(tmp_path), fake_data(), parallel=nccl)


def test_cli_train_device_flag_fails_before_building_the_corpus(tmp_path, capsys):
    from moekit.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is valid here (tests/test_gpu.py trains on it)")
    c = cfg(tmp_path, corpus=str(tmp_path / "docs.jsonl"), data_dir=str(tmp_path / "data"))
    c.save(tmp_path / "c.json")
    assert main(["train", str(tmp_path / "c.json"), "--device", "cuda"]) == 2
    assert "device='cuda' but this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_train_step_reads_the_device_once(tmp_path, monkeypatch):
    """Loss terms (ce, aux, extras) of every micro-batch and the gradient norm come to the host in one
    read per optimizer step; each read of a tensor value is a device sync on a GPU."""
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "moekit" in caller and "torch/optim" not in caller:
                reads.append((_name, caller.split("moekit")[-1], sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    t = Trainer(cfg(tmp_path, grad_accum=3, steps=2), fake_data())
    t.add_loss("extra", lambda model, batch, logits: logits.float().square().mean() * 1e-4)
    reads.clear()
    record = t.train_step()
    assert [r[:2] for r in reads] == [("tolist", "/train/loop.py")], reads
    assert set(record) >= {"loss", "aux", "extra", "grad_norm"}


def test_tensorboard_purges_a_killed_runs_events_past_the_resume_step(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'moekit[train]')")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    kw = dict(steps=5, ckpt_every=2, eval_every=100, log_every=1, tensorboard=True)
    killed = Trainer(cfg(tmp_path, **kw), fake_data())
    killed.fit()  # events up to step 5; the checkpoint of step 5 is lost in the "kill"
    killed._tb.close()
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000005.safetensors").unlink()
    resumed = Trainer(cfg(tmp_path, **kw), fake_data())
    resumed.resume(run)
    assert resumed.step == 4
    resumed.fit()
    resumed._tb.close()
    files = sorted((run / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 2

    def starts(path):
        return [e.step for e in EventFileLoader(str(path)).Load() if e.HasField("session_log")
                and e.session_log.status == e.session_log.START]

    # TensorBoard hides the earlier files' events at step >= the START event's step: the killed run's step 5.
    assert starts(files[0]) == [0] and starts(files[1]) == [5]
