import json

import pytest
import torch

from moekit.cli import main
from moekit.cli.demo import compare, interpolate, label_expert_mi, run_demo


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
    # Equal active parameters per token up to the router (D * E per MoE layer).
    assert moe["active_params"] - dense["active_params"] == 2 * 32 * 16
    assert moe["total_params"] > dense["total_params"]
    assert set(dense["load_average_1min"]) == {"start", "end"} and on_disk["cpu_count"] >= 1
    assert set(dense["final_val_loss_per_label"]) == {"en", "python"}
    for layer, e in moe["experts"].items():
        assert len(e["utilisation"]) == 16 and sum(e["utilisation"]) == pytest.approx(1.0)
        assert e["dropped_fraction"] == 0.0
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "src=\"http" not in html
    out = capsys.readouterr().out
    assert "equal tokens" in out and "[moe sample]" in out
    assert summary["corpus"]["fallback"] is True


def test_comparison_arithmetic():
    dense = {"tokens": 100, "final_val_loss": 2.0, "train_time_s": 10.0, "tokens_per_s": 10.0,
             "final_val_loss_per_label": {"a": 2.0, "b": 2.0},
             "evals": [{"time_s": 0.0, "loss": 5.0}, {"time_s": 10.0, "loss": 2.0}]}
    moe = {"tokens": 100, "final_val_loss": 1.8, "train_time_s": 20.0, "tokens_per_s": 5.0,
           "final_val_loss_per_label": {"a": 1.5, "b": 2.1},
           "evals": [{"time_s": 0.0, "loss": 5.0}, {"time_s": 20.0, "loss": 1.8}]}
    c = compare(dense, moe)
    assert c["equal_tokens"]["moe_minus_dense"] == pytest.approx(-0.2)
    assert c["equal_wall_clock"]["moe"] == pytest.approx(3.4)
    assert c["equal_wall_clock"]["dense"] == 2.0
    assert "MoE better on 1/2 labels: a" in c["verdict"]
    assert interpolate(moe["evals"], "time_s", 30.0) is None


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
