import argparse
import json

import pytest
import torch

from moekit.cli import main
from moekit.cli.demo import (DemoMoE, compare, demo_configs, first_reach, interpolate, label_entropy,
                             label_expert_mi, plain_words, register, run_demo, seed_statistics, specialisation,
                             STORED_SEED_SPREAD)
from moekit.config import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_demo_writes_summary_and_report(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", str(tmp_path / "data"), size="tiny", steps=4, use_apt=False,
                       progress=False, threads=1)
    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert on_disk["comparison"]["equal_tokens"]["tokens"] == 4 * 4 * 32
    dense, moe = on_disk["models"]["dense"], on_disk["models"]["moe"]
    # Equal active parameters per token up to the router (D * E per MoE layer): the default design
    # is 64 experts, top-7 + 1 shared, each of hidden 64 / 8 at the tiny size.
    assert summary["moe_design"]["expert_hidden"] == 8
    assert moe["active_params"] - dense["active_params"] == 2 * 32 * 64
    assert moe["total_params"] > dense["total_params"]
    assert set(dense["load_average_1min"]) == {"start", "end"} and on_disk["cpu_count"] >= 1
    assert set(dense["final_val_loss_per_label"]) == {"en", "python"}
    for layer, e in moe["experts"].items():
        assert len(e["utilisation"]) == 64 and sum(e["utilisation"]) == pytest.approx(1.0)
        assert e["dropped_fraction"] == 0.0
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "src=\"http" not in html
    out = capsys.readouterr().out
    assert "equal tokens" in out and "[moe sample]" in out and "targets: equal-token gain" in out
    assert summary["corpus"]["fallback"] is True and summary["corpus"]["name"] == "polyglot"
    # One seed and no stored spread for tiny: the noise question is left open, not answered.
    assert on_disk["seeds"]["spread"] is None and on_disk["seeds"]["beyond_noise"] is None
    t = on_disk["targets"]
    rel = (moe["active_params"] - dense["active_params"]) / dense["active_params"]
    assert t["active_params_relative_difference"] == pytest.approx(rel) and t["active_params_met"] == (rel <= 0.05)
    assert on_disk["plain_words"].startswith("Trained on the same 512 tokens")
    for layer, sp in on_disk["specialisation"].items():
        assert 0 <= sp["mutual_information"] <= sp["ceiling"] + 1e-9 and sp["uniform_share"] == 1 / 64
        assert set(sp["favourite_expert_per_label"]) == {"en", "python"}


def test_demo_on_a_user_jsonl_corpus_with_two_seeds_and_a_shared_expert(tmp_path, capsys):
    rows = [{"text": f"{i} " + ("hello world, " if i % 2 else "print(x + 1)\n") * 30, "label": ["en", "code"][i % 2]}
            for i in range(60)] + [{"text": f"{i} 日本語のテキスト。" * 20, "label": "ja"} for i in range(30)]
    source = tmp_path / "mine.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out_dir = tmp_path / "demo"
    assert main(["demo", "--corpus", str(source), "--data-dir", str(tmp_path / "data"), "--out-dir", str(out_dir),
                 "--size", "tiny", "--steps", "4", "--seeds", "2", "--num-experts", "16", "--shared-experts", "1", "--top-k", "3",
                 "--balance", "bias", "--moe-lr", "0.005", "--threads", "1", "--no-progress"]) == 0
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["corpus"]["name"] == str(source) and (tmp_path / "data" / "mine" / "report.json").is_file()
    assert set(s["models"]["dense"]["final_val_loss_per_label"]) == {"code", "en", "ja"}
    assert s["moe_design"]["expert_hidden"] == 64 // 4 and s["moe_design"]["balance"] == "bias"
    assert s["models"]["moe"]["lr"] == 0.005 and s["models"]["dense"]["lr"] == 3e-3
    # Shared expert of hidden 16 + top-3 of hidden 16 = dense hidden 64: equal active parameters.
    assert s["models"]["moe"]["active_params"] - s["models"]["dense"]["active_params"] == 2 * 32 * 16
    seeds = s["seeds"]
    assert seeds["seeds"] == [0, 1] and (out_dir / "dense_seed1" / "config.json").is_file()
    assert seeds["spread"]["dense"] == pytest.approx(max(seeds["dense_final"]) - min(seeds["dense_final"]))
    assert seeds["spread_source"] == "measured in this run" and isinstance(seeds["beyond_noise"], bool)
    assert seeds["mean_gain"] == pytest.approx(sum(seeds["dense_final"]) / 2 - sum(seeds["moe_final"]) / 2)
    assert "seeds 0, 1: dense" in capsys.readouterr().out
    # A second demo may replace the folder (the seed runs are the demo's own).
    assert main(["demo", "--corpus", "mine", "--data-dir", str(tmp_path / "data"), "--out-dir", str(out_dir),
                 "--size", "tiny", "--steps", "2", "--threads", "1", "--no-progress"]) == 0
    assert not (out_dir / "dense_seed1").exists()


def test_demo_moe_design_errors_name_the_flags(tmp_path):
    with pytest.raises(ConfigError, match=r"--top-k 4 \+ --shared-experts 1 = 5 does not divide ffn_hidden=64"):
        demo_configs("tiny", tmp_path, "d", DemoMoE(top_k=4, shared_experts=1))
    with pytest.raises(ConfigError, match=r"--top-k 8 exceeds --num-experts 4"):
        demo_configs("tiny", tmp_path, "d", DemoMoE(num_experts=4, top_k=8, shared_experts=0))
    cfg = demo_configs("small", tmp_path, "d", DemoMoE(num_experts=32, top_k=7, shared_experts=1, balance="bias",
                                                       lr=5e-3, warmup_steps=60, z_loss_coef=0.0))
    moe = cfg["moe"].model.moe
    assert (moe.expert_hidden, moe.shared.num, moe.shared.hidden) == (64, 1, 64)
    assert moe.router.bias_update_rate == 1e-3 and moe.balance.aux_loss_coef == 0.0
    assert moe.balance.z_loss_coef == 0.0
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["demo", "--z-loss-coef", "0"]).z_loss_coef == 0.0
    assert parser.parse_args(["demo"]).z_loss_coef == DemoMoE().z_loss_coef == demo_configs(
        "small", tmp_path, "d")["moe"].model.moe.balance.z_loss_coef
    assert (cfg["moe"].lr, cfg["moe"].warmup_steps, cfg["dense"].lr, cfg["dense"].warmup_steps) == (5e-3, 60, 2e-3, 100)
    # The default: each model at its best learning rate of the sweep, the same warm-up.
    cfg = demo_configs("small", tmp_path, "d")
    assert (cfg["moe"].lr, cfg["moe"].warmup_steps, cfg["dense"].lr, cfg["dense"].warmup_steps) == (3e-3, 100, 2e-3, 100)


def _evals(points):
    return [{"tokens": t, "time_s": s, "loss": l} for t, s, l in points]


def test_comparison_arithmetic():
    dense = {"tokens": 100, "final_val_loss": 2.0, "train_time_s": 10.0, "tokens_per_s": 10.0,
             "final_val_loss_per_label": {"a": 2.0, "b": 2.0},
             "evals": _evals([(0, 0.0, 5.0), (100, 10.0, 2.0)])}
    moe = {"tokens": 100, "final_val_loss": 1.8, "train_time_s": 20.0, "tokens_per_s": 5.0,
           "final_val_loss_per_label": {"a": 1.5, "b": 2.1},
           "evals": _evals([(0, 0.0, 5.0), (50, 10.0, 2.4), (100, 20.0, 1.8)])}
    c = compare(dense, moe)
    assert c["equal_tokens"]["moe_minus_dense"] == pytest.approx(-0.2)
    assert c["equal_tokens"]["relative"] == pytest.approx(-0.1)
    assert c["equal_wall_clock"]["moe"] == pytest.approx(2.4)
    assert c["equal_wall_clock"]["dense"] == 2.0
    # The MoE passes 2.0 two thirds of the way from (10 s, 2.4) to (20 s, 1.8): 16.67 s = 1.67x dense's 10 s.
    reach = c["moe_reaches_dense_final_loss"]
    assert reach["time_s"] == pytest.approx(10 + 10 * 0.4 / 0.6)
    assert reach["fraction_of_dense_time"] == pytest.approx(reach["time_s"] / 10)
    assert reach["fraction_of_dense_tokens"] == pytest.approx((50 + 50 * 0.4 / 0.6) / 100)
    assert c["tokens_per_s"]["moe_over_dense"] == 0.5
    assert "MoE better on 1/2 labels: a" in c["verdict"] and "1.67x dense's training time" in c["verdict"]
    assert interpolate(moe["evals"], "time_s", 30.0) is None
    assert first_reach(moe["evals"], "time_s", 1.0) is None
    worse = compare(dense, {**moe, "final_val_loss": 2.1, "evals": _evals([(0, 0.0, 5.0), (100, 20.0, 2.1)])})
    assert worse["moe_reaches_dense_final_loss"]["fraction_of_dense_time"] is None
    assert "does not reach dense's final loss" in worse["verdict"]


def test_seed_statistics_and_plain_words_follow_the_numbers():
    def run(seed, loss):
        return {"seed": seed, "final_val_loss": loss}

    stats = seed_statistics([(run(0, 2.00), run(0, 1.80)), (run(1, 2.02), run(1, 1.81))], "small")
    assert stats["spread"] == pytest.approx({"dense": 0.02, "moe": 0.01})
    assert stats["mean_gain"] == pytest.approx(0.205) and stats["beyond_noise"] is True
    close = seed_statistics([(run(0, 2.00), run(0, 1.99)), (run(1, 2.05), run(1, 2.04))], "small")
    assert close["beyond_noise"] is False
    # One seed: the spread stored for the size (the larger of its two decides), named as stored.
    one = seed_statistics([(run(0, 2.00), run(0, 1.99))], "small")
    assert one["spread"] == STORED_SEED_SPREAD["small"] and one["spread_source"].startswith("stored")
    assert one["beyond_noise"] is (0.01 > max(STORED_SEED_SPREAD["small"].values()))
    comparison = {"equal_tokens": {"tokens": 1000, "relative": -0.1},
                  "moe_reaches_dense_final_loss": {"fraction_of_dense_time": 0.75},
                  "tokens_per_s": {"moe_over_dense": 0.8}}
    moe = {"evals": [{"routing_by_label": {"l0": [[9, 1], [5, 5]], "l1": [[10, 0], [0, 10]]}}],
           "experts": {"l0": {"label_expert_mutual_information": label_expert_mi([[9, 1], [5, 5]]),
                              "label_entropy": label_entropy([[9, 1], [5, 5]])},
                       "l1": {"label_expert_mutual_information": label_expert_mi([[10, 0], [0, 10]]),
                              "label_entropy": label_entropy([[10, 0], [0, 10]])}}}
    spec = specialisation(moe, ["ja", "en"])
    assert spec["l1"]["fraction_of_ceiling"] == pytest.approx(1.0)
    assert spec["l0"]["favourite_expert_per_label"] == {"ja": {"expert": 0, "share": 0.9}, "en": {"expert": 0, "share": 0.5}}
    text = plain_words(comparison, stats, spec)
    assert "10.0% lower" in text and "beyond noise" in text and "1.25x the dense steps" in text
    assert "after 75% of the dense model's training time" in text
    assert "in l1 a token's expert choice carries 0.693 nats" in text and "ja is the most concentrated" in text
    assert "en and ja share expert" not in text and "each label has its own favourite expert" in text
    assert "more in deeper layers" in text and "(100.0% of its picks on expert 0, where an even split gives 50.0%)" in text
    flat = {**spec, "l1": {**spec["l1"], "mutual_information": spec["l0"]["mutual_information"]}}
    assert "about as much in every layer" in plain_words(comparison, stats, flat)


def test_label_expert_mutual_information_bounds():
    assert label_expert_mi([[5, 5], [5, 5]]) == pytest.approx(0.0)
    assert label_expert_mi([[10, 0], [0, 10]]) == pytest.approx(0.6931, abs=1e-4)


def test_cli_data_build_and_train_eval_generate(tmp_path, capsys):
    data = tmp_path / "src"
    for label, text in {"en": "hello world " * 40, "ru": "привет мир " * 40}.items():
        (data / label).mkdir(parents=True)
        for i in range(12):
            (data / label / f"{i}.txt").write_text(f"{i} {text}", encoding="utf-8")
    assert main(["data", "build", str(data), "--data-dir", str(tmp_path / "cache"), "--name", "mine",
                 "--val-fraction", "0.3"]) == 0
    assert "ru" in capsys.readouterr().out
    config = {"model": {"dim": 16, "n_layers": 1, "n_heads": 2, "ffn_hidden": 32, "max_seq_len": 16,
                        "moe": {"dim": 16, "num_experts": 4, "expert_hidden": 16}},
              "corpus": "mine", "data_dir": str(tmp_path / "cache"), "seq_len": 16, "batch_size": 2,
              "steps": 3, "eval_every": 3, "eval_tokens": 64, "progress": False, "tensorboard": False}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    assert main(["train", str(path), "--out-dir", str(run_dir), "--set", "model.moe.router.top_k=1"]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert main(["train", str(path), "--out-dir", str(run_dir), "--steps", "4", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_label"]) == {"en", "ru"}
    assert main(["generate", str(run_dir), "--prompt", "hel", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("hel")
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"stepz": 3}')
    assert main(["train", str(tmp_path / "bad.json")]) == 2
    assert "unknown key(s) ['stepz']" in capsys.readouterr().err


def test_demo_moe_config_file_matches_the_default_design(tmp_path):
    from pathlib import Path

    from moekit.train import TrainConfig

    loaded = TrainConfig.load(Path(__file__).resolve().parents[1] / "configs" / "polyglot_moe_demo.json")
    demo = demo_configs("small", tmp_path, "data_cache")
    assert loaded.model == demo["moe"].model
    for key in ("seq_len", "batch_size", "steps", "lr", "warmup_steps", "eval_every", "eval_tokens", "seed"):
        assert getattr(loaded, key) == getattr(demo["moe"], key), key
    # Equal active parameters: shared + top-k experts of hidden 64 = the dense hidden 512.
    moe = loaded.model.moe
    assert (moe.router.top_k + moe.shared.num) * moe.expert_hidden == demo["dense"].model.ffn_hidden
    from moekit.lm import LM

    # The routers (D * E per layer) are the only difference: within the 5% target at the small size.
    dense_active, moe_active = (LM(demo[k].model).num_active_params() for k in ("dense", "moe"))
    assert moe_active - dense_active == 4 * 128 * 64 and (moe_active - dense_active) / dense_active < 0.05
