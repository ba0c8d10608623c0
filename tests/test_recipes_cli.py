"""The recipe, explain, diagnose, health and mask-sweep commands end to end on a tiny corpus."""

import json

import pytest
import torch

from moekit.cli import main
from moekit.lm import LMConfig
from moekit.train import TrainConfig, Trainer
from moekit.train.trainer import load_trained, prepare_data


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "data" / "tiny"
    corpus.mkdir(parents=True)
    texts = {"en": "the cat sat on the mat. ", "de": "der Hund lief über die Straße. ", "ja": "猫が座った。"}
    rows = [{"text": t * (3 + i % 4), "label": label, "split": "val" if i % 5 == 0 else "train"}
            for label, t in texts.items() for i in range(20)]
    (corpus / "documents.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    (corpus / "report.json").write_text(json.dumps({"labels": sorted(texts)}))
    cfg = TrainConfig(model=LMConfig(vocab_size=257, dim=16, n_layers=2, n_heads=2, ffn_hidden=16, max_seq_len=16),
                      corpus="tiny", data_dir=str(root / "data"), seq_len=16, batch_size=4, steps=2, warmup_steps=1,
                      eval_every=100, eval_tokens=128, out_dir=str(root / "dense"), progress=False, tensorboard=False)
    Trainer(cfg, prepare_data(cfg)).fit()
    return root


def test_upcycle_then_explain_health_sweep_and_eval_mask(dense_run, tmp_path, capsys):
    moe_dir = tmp_path / "moe"
    assert main(["recipe", "upcycle", str(dense_run / "dense"), "--out", str(moe_dir), "--experts", "4",
                 "--top-k", "2", "--noise", "0.01", "--steps", "2"]) == 0
    model, cfg, _ = load_trained(moe_dir)
    assert model.config.moe.num_experts == 4 and cfg.steps == 2
    capsys.readouterr()

    assert main(["explain", str(moe_dir), "the cat", "--labels", "--tokens", "64", "--no-color",
                 "--html", str(tmp_path / "e.html")]) == 0
    out = capsys.readouterr().out
    assert "layers.0.mlp" in out and "e" in out.splitlines()[1] and "labels each expert mostly serves" in out
    assert "layers.1.mlp" in (tmp_path / "e.html").read_text()

    assert main(["health", str(moe_dir), "--tokens", "64"]) == 0
    assert "healthy" in capsys.readouterr().out

    assert main(["mask-sweep", str(moe_dir), "--out", str(tmp_path / "sweep"), "--tokens", "64", "--repeats", "1"]) == 0
    curves = json.loads((tmp_path / "sweep" / "mask_sweep.json").read_text())
    assert [r["masked"] for r in curves["random"]] == [0, 1, 2]
    assert (tmp_path / "sweep" / "mask_sweep.png").stat().st_size > 1000
    capsys.readouterr()

    assert main(["eval", str(moe_dir), "--tokens", "64", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["loss"]
    assert main(["eval", str(moe_dir), "--tokens", "64", "--json", "--mask-experts", "layers.0.mlp:0,1"]) == 0
    masked = json.loads(capsys.readouterr().out)
    assert masked["loss"] != plain
    assert masked["routing"]["layers.0.mlp"]["utilization"][:2] == [0.0, 0.0]
    assert main(["eval", str(moe_dir), "--mask-experts", "0,1,2"]) == 2
    assert "leaves 1 expert(s), fewer than top_k=2" in capsys.readouterr().err

    for what in ("stability", "expert-loss", "latency"):
        args = ["diagnose", what, str(moe_dir), "--tokens", "64", "--repeats", "1"]
        if what == "stability":
            args += ["--other", str(moe_dir)]
        assert main(args) == 0
    assert "top-1 changed for 0.0%" in capsys.readouterr().out


def test_surgery_finetune_supervised_btx_commands(dense_run, tmp_path, capsys):
    moe_dir = tmp_path / "moe"
    assert main(["recipe", "upcycle", str(dense_run / "dense"), "--out", str(moe_dir), "--experts", "4",
                 "--steps", "0"]) == 0
    assert main(["recipe", "surgery", str(moe_dir), "add", "--n", "2", "--bias-update-rate", "0.001",
                 "--out", str(tmp_path / "add")]) == 0
    added = load_trained(tmp_path / "add")[0].config.moe
    assert added.num_experts == 6 and added.router.bias_update_rate == 0.001 and added.router.logit_bias
    assert main(["recipe", "surgery", str(moe_dir), "remove", "--experts", "3", "--out", str(tmp_path / "rm")]) == 0
    assert load_trained(tmp_path / "rm")[0].config.moe.num_experts == 3
    assert main(["recipe", "surgery", str(moe_dir), "merge", "--groups", "0+1", "2+3", "--out",
                 str(tmp_path / "merge")]) == 0
    assert load_trained(tmp_path / "merge")[0].config.moe.num_experts == 2
    assert main(["recipe", "finetune-experts", str(moe_dir), "--experts", "1", "--labels", "de", "--steps", "1",
                 "--out", str(tmp_path / "ft")]) == 0
    assert main(["recipe", "supervised", str(moe_dir), "--coef", "0.1", "--steps", "1",
                 "--out", str(tmp_path / "sup")]) == 0
    assert "routing purity" in capsys.readouterr().out
    assert main(["recipe", "btx", str(dense_run / "dense"), "--group", "en", "--group", "de,ja", "--branch-steps", "1",
                 "--mix-steps", "1", "--out", str(tmp_path / "btx")]) == 0
    assert load_trained(tmp_path / "btx")[0].config.moe.num_experts == 2
    assert main(["recipe", "surgery", str(moe_dir), "remove", "--experts", "9", "--out", str(tmp_path / "x")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_health_command_names_a_corrupt_expert_and_exits_1(dense_run, tmp_path, capsys):
    from moekit.recipes import save_model

    moe_dir = tmp_path / "moe"
    assert main(["recipe", "upcycle", str(dense_run / "dense"), "--out", str(moe_dir), "--experts", "4",
                 "--steps", "0"]) == 0
    model, cfg, _ = load_trained(moe_dir)
    with torch.no_grad():
        model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("inf")
    save_model(tmp_path / "bad" / "checkpoints", model, cfg)
    capsys.readouterr()
    assert main(["health", str(tmp_path / "bad"), "--tokens", "64"]) == 1
    out = capsys.readouterr().out
    assert "corrupt weights: layers.1.mlp expert 3 in experts.down_proj" in out
    assert "e3 corrupt_weights" in out and "1 expert(s) unhealthy" in out
