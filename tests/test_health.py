import numpy as np
import pytest
import torch

from moekit import moe_config
from moekit.data.corpus import TokenData, TokenSplit
from moekit.explain.mask_sweep import mask_sweep, plot_mask_sweep
from moekit.health import CorruptExpertError, Quarantine, health_report, parse_mask_spec, scan_weights
from moekit.layer import ExpertNonFiniteError
from moekit.lm import LM, LMConfig
from moekit.model_ops import mask_experts, moe_layers
from moekit.recipes import save_model
from moekit.train import TrainConfig, Trainer, load_checked

from capture_util import captured


pytestmark = pytest.mark.usefixtures("one_thread")


def lm(num_experts=4, top_k=2, backend="auto") -> LM:
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=257, dim=16, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=16,
                       moe=moe_config(dim=16, num_experts=num_experts, expert_hidden=12, top_k=top_k,
                                      backend=backend))).eval()


def tcfg(tmp_path, model) -> TrainConfig:
    return TrainConfig(model=model.config, seq_len=16, batch_size=4, steps=1, eval_tokens=64,
                       out_dir=str(tmp_path / "run"), progress=False, tensorboard=False)


def ids(seed=0) -> torch.Tensor:
    return torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(seed))


def fake_data(n=2000) -> TokenData:
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 257, n).astype(np.uint16)
    labs = (np.arange(n) >= n // 2).astype(np.int16)
    return TokenData(TokenSplit(toks, labs), TokenSplit(toks.copy(), labs.copy()), ["a", "b"], "byte", None)


def test_masking_reroutes_to_the_next_best_experts():
    model = lm(num_experts=5, top_k=2)
    x = ids()
    captured = {}
    handles = [layer.router.register_forward_hook(lambda m, a, out, n=name: captured.__setitem__(n, out))
               for name, layer in moe_layers(model)]
    model(x)
    clean = {n: r.topk_idx_TK.clone() for n, r in captured.items()}
    mask_experts(model, {"layers.0.mlp": [int(clean["layers.0.mlp"][0, 0])]})
    model(x)
    masked_id = moe_layers(model)[0][1].masked_experts[0]
    routing = captured["layers.0.mlp"]
    expected_TK = routing.logits_TE.clone()
    expected_TK[:, masked_id] = float("-inf")
    assert torch.equal(routing.topk_idx_TK, expected_TK.topk(2, dim=-1).indices)
    assert not (routing.topk_idx_TK == masked_id).any()
    w = routing.topk_weight_TK
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w[:, 0]))
    # the unmasked layer is untouched
    assert torch.equal(captured["layers.1.mlp"].topk_idx_TK, clean["layers.1.mlp"])
    for h in handles:
        h.remove()


def test_nan_weights_detected_at_load_and_named(tmp_path):
    model = lm()
    with torch.no_grad():
        model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
        model.layers[0].mlp.router.weight[3, 1] = float("inf")
    path = save_model(tmp_path / "bad", model, tcfg(tmp_path, model))
    assert [(f.layer, f.expert, f.tensors) for f in scan_weights(model)] == [
        ("layers.0.mlp", 3, ["router.weight"]), ("layers.1.mlp", 2, ["experts.down_proj"])]
    with pytest.raises(CorruptExpertError, match=r"step_00000000.safetensors.*layers.0.mlp expert 3 \(router.weight\)"
                                                 r".*layers.1.mlp expert 2 \(experts.down_proj\)"):
        load_checked(path)
    loaded, _, findings = load_checked(path, quarantine=True)
    assert len(findings) == 2
    assert loaded.layers[1].mlp.masked_experts == [2]
    out = loaded(ids())
    assert torch.isfinite(out).all()
    states = {name: [r["state"] for r in rows] for name, rows in health_report(loaded, findings).items()}
    assert states["layers.1.mlp"][2] == "corrupt_weights" and states["layers.1.mlp"][0] == "ok"


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_runtime_quarantine_keeps_serving(backend):
    model = lm(backend=backend)
    x = ids()
    used = int(captured(model, x)[1].last("layers.0.mlp").routing.topk_idx_TK[0, 0])
    with torch.no_grad():
        model.layers[0].mlp.experts.gate_up_proj[used] = float("inf")
    with pytest.raises(ExpertNonFiniteError, match=f"layers.0.mlp: expert\\(s\\) \\[{used}\\]"):
        model(x)
    model.layers[0].mlp.unmask_experts()
    with Quarantine(model) as q:
        out = model(x)
        assert torch.isfinite(out).all()
        assert [(e.layer, e.experts) for e in q.events] == [("layers.0.mlp", [used])]
        assert model.layers[0].mlp.masked_experts == [used]
        # the rerun equals a forward with the expert masked from the start
        reference = lm(backend=backend)
        reference.layers[0].mlp.mask_experts([used])
        torch.testing.assert_close(out, reference(x))
        report = health_report(model)
        assert report["layers.0.mlp"][used]["state"] == "corrupt_weights"
        # padding reaches the guarded layers: the same output and statistics as the unguarded reference
        mask = torch.ones_like(x)
        mask[:, -2:] = 0
        for m in (model, reference):
            m.layers[0].mlp.stats.reset()
        torch.testing.assert_close(model(x, token_mask=mask), reference(x, token_mask=mask))
        assert torch.equal(model.layers[0].mlp.stats.tokens_E, reference.layers[0].mlp.stats.tokens_E)
        assert float(model.layers[0].mlp.stats.num_tokens) == mask.sum()
    assert "forward" not in model.layers[0].mlp.__dict__


def test_health_report_marks_nonfinite_outputs_and_masked():
    model = lm()
    model.layers[1].mlp.mask_experts([0])
    model(ids())
    model.layers[1].mlp.stats.nonfinite_E[3] = True
    states = [r["state"] for r in health_report(model)["layers.1.mlp"]]
    assert states == ["masked", "ok", "ok", "nonfinite_outputs"]
    loads = [r["load"] for r in health_report(model)["layers.1.mlp"]]
    assert loads[0] == 0 and sum(loads) == pytest.approx(1.0)


def test_parse_mask_spec():
    assert parse_mask_spec(["1,3"]) == [1, 3]
    assert parse_mask_spec(["layers.0.mlp:2", "layers.1.mlp:0,1"]) == {"layers.0.mlp": [2], "layers.1.mlp": [0, 1]}
    with pytest.raises(ValueError, match="comma-separated"):
        parse_mask_spec(["a,b"])
    with pytest.raises(ValueError, match="not both"):
        parse_mask_spec(["1", "layers.0.mlp:2"])


def test_mask_sweep_starts_unmasked_and_restores(tmp_path):
    model = lm(num_experts=4, top_k=2)
    trainer = Trainer(tcfg(tmp_path, model), fake_data(), model=model)
    plain = trainer.evaluate()["loss"]
    rows = mask_sweep(trainer, strategy="most_used")
    assert [r["masked"] for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] == plain
    assert rows[1]["loss"] != plain
    assert all(layer.masked_experts == [] for _, layer in moe_layers(model))
    assert rows[2]["draws"][0]["experts"]["layers.0.mlp"] != []
    assert plot_mask_sweep({"most used": rows})[:8] == b"\x89PNG\r\n\x1a\n"


def test_scan_names_corrupt_module_experts():
    from torch import nn

    from moekit import MoE
    from moekit.experts.dense import GatedMLP

    layer = MoE(moe_config(dim=8, num_experts=3, expert_hidden=4, top_k=2),
                experts=[GatedMLP(8, 4) for _ in range(3)])
    model = nn.Sequential(layer)
    assert scan_weights(model) == []
    with torch.no_grad():
        layer.experts.experts[1].up_proj.weight[0, 0] = float("nan")
    found = scan_weights(model)
    assert [(f.layer, f.expert, f.tensors) for f in found] == [("0", 1, ["experts.1.up_proj.weight"])]
