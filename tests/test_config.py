"""Config construction (dataclasses and keyword form) and round-trips through a file."""

from __future__ import annotations

import json

import pytest
import torch

from moekit import BalanceConfig, ConfigError, MoE, MoEConfig, RouterConfig, SharedExpertConfig, moe_config


def _full_config() -> MoEConfig:
    return MoEConfig(
        dim=16, num_experts=8, expert_hidden=24, expert_kind="swiglu", activation="gelu_tanh",
        router=RouterConfig(kind="sigmoid_topk", top_k=3, norm_topk_prob=True, routed_scaling_factor=2.5,
                            n_group=4, topk_group=2, bias_update_rate=1e-3, capacity_factor=1.25,
                            drop_policy="position"),
        balance=BalanceConfig(aux_loss_coef=0.0, z_loss_coef=1e-3, seq_aux_loss_coef=1e-4),
        shared=SharedExpertConfig(num=2, hidden=40, gated=True),
        backend="loop", check_finite=False, track_stats=True, dead_window=7,
    )


def test_round_trip_through_file(tmp_path):
    cfg = _full_config()
    path = tmp_path / "moe.json"
    cfg.save(path)
    assert json.loads(path.read_text())["router"]["kind"] == "sigmoid_topk"
    loaded = MoEConfig.load(path)
    assert loaded == cfg
    assert isinstance(loaded.router, RouterConfig) and isinstance(loaded.shared, SharedExpertConfig)
    # The same config builds layers with the same parameter shapes and behaviour.
    a, b = MoE(cfg), MoE(loaded)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_dict_round_trip_and_defaults():
    cfg = moe_config(dim=8, num_experts=4, expert_hidden=8)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.router == RouterConfig() and cfg.top_k == 2 and cfg.router.capacity_factor is None
    assert cfg.balance.aux_loss_convention == "moekit"


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dim": 8, "num_experts": 4, "expert_hidden": 8, "router": {"kind": "nope"}}))
    with pytest.raises(ConfigError, match=r"bad.json: router.kind='nope' is not one of"):
        MoEConfig.load(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken.json: invalid JSON at line 1 column 2: "):
        MoEConfig.load(broken)
    with pytest.raises(ConfigError, match=r"config file .*absent\.json does not exist"):
        MoEConfig.load(tmp_path / "absent.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"dim": "8", "num_experts": 4, "expert_hidden": 8}))
    with pytest.raises(ConfigError, match=r"wrong\.json: dim='8' must be an int >= 1$"):
        MoEConfig.load(wrong)


def test_keyword_form_fills_groups():
    cfg = moe_config(dim=8, num_experts=6, expert_hidden=8, router="switch", capacity_factor=1.5,
                     z_loss_coef=1e-3, aux_loss_convention="switch", shared_experts=1, shared_expert_gated=True)
    assert cfg.router.kind == "switch" and cfg.router.top_k == 1 and cfg.router.capacity_factor == 1.5
    assert cfg.balance.z_loss_coef == 1e-3 and cfg.balance.aux_loss_convention == "switch"
    assert cfg.shared == SharedExpertConfig(num=1, gated=True)
    explicit = moe_config(dim=8, num_experts=6, expert_hidden=8, router=RouterConfig(kind="switch", top_k=1))
    assert explicit.router.kind == "switch"
    with pytest.raises(ConfigError, match=r"router fields \['top_k'\] given beside a RouterConfig"):
        moe_config(dim=8, num_experts=6, expert_hidden=8, router=RouterConfig(), top_k=2)
    layer = MoE(dim=8, num_experts=6, expert_hidden=8, top_k=3)
    assert layer.config == moe_config(dim=8, num_experts=6, expert_hidden=8, top_k=3)


def test_nested_dicts_are_validated():
    cfg = MoEConfig(dim=8, num_experts=4, expert_hidden=8, router={"kind": "softmax_topk", "top_k": 1},
                    shared={"num": 1})
    assert cfg.router.top_k == 1 and cfg.shared.num == 1
    with pytest.raises(ConfigError, match=r"router.top_k=9 exceeds num_experts=4"):
        MoEConfig(dim=8, num_experts=4, expert_hidden=8, router={"top_k": 9})


@pytest.mark.parametrize("keywords", [
    dict(router="softmax_topk", top_k=2, norm_topk_prob=False, logit_bias=True),
    dict(router="noisy_topk", top_k=2, cv_loss_coef=0.01),
    dict(router="switch", capacity_factor=1.25, jitter_eps=0.01, aux_loss_convention="switch"),
    dict(router="expert_choice", capacity_factor=2.0, expert_kind="mlp", activation="gelu"),
    dict(router="sigmoid_topk", top_k=2, n_group=2, topk_group=1, bias_update_rate=1e-3, shared_experts=1),
], ids=lambda kw: kw["router"])
def test_every_router_kind_round_trips(tmp_path, keywords):
    cfg = moe_config(dim=8, num_experts=4, expert_hidden=8, **keywords)
    path = tmp_path / "cfg.json"
    cfg.save(path)
    loaded = MoEConfig.load(path)
    assert loaded == cfg and loaded.to_dict() == json.loads(path.read_text())
