"""Bad input and bad configuration raise errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from moekit import ConfigError, MoE, MoEConfig, RouterConfig, moe_config

D = 8


def _layer(**kw) -> MoE:
    return MoE(dim=D, num_experts=4, expert_hidden=8, top_k=2, **kw)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 9)])
def test_wrong_last_dimension(shape):
    with pytest.raises(ValueError, match=rf"input of shape \({shape[0]}, .*has last dimension {shape[-1]}, expected dim=8"):
        _layer()(torch.randn(shape))


def test_scalar_and_empty_input():
    with pytest.raises(ValueError, match="has last dimension None, expected dim=8"):
        _layer()(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"input of shape \(0, 8\) has no tokens"):
        _layer()(torch.randn(0, D))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_non_floating_input(dtype):
    with pytest.raises(TypeError, match=rf"must be a floating-point tensor, got dtype {dtype}"):
        _layer()(torch.zeros(3, D, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(bad):
    x = torch.randn(4, D)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="input contains NaN or Inf values"):
        _layer().eval()(x)  # check_finite=None: on in eval mode (serving)
    with pytest.raises(ValueError, match="input contains NaN or Inf values"):
        _layer(check_finite=True).train()(x)
    assert not bool(torch.isfinite(_layer().train()(x)).all())  # off in training: no host sync
    layer = MoE(dim=D, num_experts=4, expert_hidden=8, top_k=2, check_finite=False).eval()
    layer(torch.randn(4, D))  # the check can be turned off; finite input still runs


def test_top_k_exceeds_num_experts():
    with pytest.raises(ConfigError, match=r"router.top_k=5 exceeds num_experts=4"):
        MoE(dim=D, num_experts=4, expert_hidden=8, top_k=5)
    with pytest.raises(ConfigError, match=r"router.top_k=0 must be an int >= 1"):
        RouterConfig(top_k=0)
    with pytest.raises(ConfigError, match=r"router.top_k=2 but the switch router is top-1"):
        RouterConfig(kind="switch", top_k=2)


@pytest.mark.parametrize("cf", [0, -1.0, float("nan"), float("inf")])
def test_non_positive_capacity_factor(cf):
    with pytest.raises(ConfigError, match=r"router.capacity_factor=.* must be a finite number > 0 or null"):
        _layer(capacity_factor=cf)


def test_capacity_factor_wrong_type_and_expert_choice_needs_it():
    with pytest.raises(ConfigError, match=r"router.capacity_factor='1.0' must be a finite number > 0 or null"):
        RouterConfig(capacity_factor="1.0")
    with pytest.raises(ConfigError, match=r"router.kind='expert_choice' needs router.capacity_factor"):
        RouterConfig(kind="expert_choice")


def test_unknown_router_and_options():
    with pytest.raises(ConfigError, match=r"router.kind='topk_softmax' is not one of \['softmax_topk'"):
        MoE(dim=D, num_experts=4, expert_hidden=8, router="topk_softmax")
    with pytest.raises(ConfigError, match=r"router.drop_policy='random' is not one of"):
        _layer(capacity_factor=1.0, drop_policy="random")
    with pytest.raises(ConfigError, match=r"balance.aux_loss_convention='gshard' is not one of"):
        _layer(aux_loss_convention="gshard")
    with pytest.raises(ConfigError, match=r"activation='swish' is not one of"):
        _layer(activation="swish")
    with pytest.raises(ConfigError, match=r"backend='triton' is not one of"):
        _layer(backend="triton")
    with pytest.raises(ConfigError, match=r"router=3 must be a router kind name or a RouterConfig"):
        MoE(dim=D, num_experts=4, expert_hidden=8, router=3)


def test_noisy_topk_without_renormalisation_is_rejected():
    with pytest.raises(ConfigError, match=r"norm_topk_prob=False but noisy_topk weights are the softmax"):
        RouterConfig(kind="noisy_topk", norm_topk_prob=False)


def test_shared_expert_mismatches():
    with pytest.raises(ConfigError, match=r"shared.hidden=64 is set but shared.num=0"):
        _layer(shared_expert_hidden=64)
    with pytest.raises(ConfigError, match=r"shared.gated=True but shared.num=0"):
        _layer(shared_expert_gated=True)
    with pytest.raises(ConfigError, match=r"shared.num=-1 must be an int >= 0"):
        _layer(shared_experts=-1)
    with pytest.raises(ConfigError, match=r"shared.hidden=0 must be an int >= 1"):
        _layer(shared_experts=1, shared_expert_hidden=0)


def test_group_and_bias_mismatches():
    with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by router.n_group=4"):
        MoE(dim=D, num_experts=6, expert_hidden=8, top_k=2, n_group=4, topk_group=1)
    with pytest.raises(ConfigError, match=r"router.topk_group=3 must be in \[1, n_group=2\]"):
        RouterConfig(n_group=2, topk_group=3)
    with pytest.raises(ConfigError, match=r"topk_group=1 groups of 2 experts cannot hold top_k=3"):
        MoE(dim=D, num_experts=8, expert_hidden=8, top_k=3, n_group=4, topk_group=1)
    with pytest.raises(ConfigError, match=r"bias_update_rate is set but router.kind='switch' has no selection bias"):
        RouterConfig(kind="switch", top_k=1, bias_update_rate=1e-3)


def test_unknown_config_keys():
    with pytest.raises(ConfigError, match=r"unknown MoE option\(s\) \['num_expert'\]"):
        MoE(dim=D, num_expert=4, expert_hidden=8)
    base = moe_config(dim=D, num_experts=4, expert_hidden=8).to_dict()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['topk'\] in router"):
        MoEConfig.from_dict({**base, "router": {**base["router"], "topk": 2}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\] in MoEConfig"):
        MoEConfig.from_dict({**base, "colour": "blue"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['zloss'\] in balance"):
        MoEConfig.from_dict({**base, "balance": {"zloss": 1.0}})
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['expert_hidden'\]"):
        MoEConfig.from_dict({"dim": D, "num_experts": 4})
    with pytest.raises(ConfigError, match=r"router='switch' must be a RouterConfig or a dict"):
        MoEConfig.from_dict({**base, "router": "switch"})


def test_bad_sizes_and_mixed_construction():
    with pytest.raises(ConfigError, match=r"dim='8' must be an int >= 1"):
        MoE(dim="8", num_experts=4, expert_hidden=8)
    with pytest.raises(ConfigError, match=r"balance.z_loss_coef=-0.1 must be a finite number >= 0"):
        _layer(z_loss_coef=-0.1)
    with pytest.raises(TypeError, match=r"pass either a MoEConfig or keywords, not both \(got \['top_k'\]\)"):
        MoE(moe_config(dim=D, num_experts=4, expert_hidden=8), top_k=2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=True), r"num_experts=True must be an int >= 1"),
    (dict(top_k=2.0), r"router.top_k=2.0 must be an int >= 1"),
    (dict(n_group=2.0), r"router.n_group=2.0 must be an int >= 1"),
    (dict(shared_experts=1.5), r"shared.num=1.5 must be an int >= 0"),
    (dict(aux_loss_coef="0.01"), r"balance.aux_loss_coef='0.01' must be a finite number >= 0"),
    (dict(routed_scaling_factor=0.0), r"router.routed_scaling_factor=0.0 must be a finite number > 0"),
    (dict(jitter_eps=1.0), r"router.jitter_eps=1.0 must be a finite number in \[0, 1\)"),
    (dict(router="sigmoid_topk", bias_update_rate=-1e-3),
     r"router.bias_update_rate=-0.001 must be a finite number >= 0"),
])
def test_wrong_types_and_ranges_are_named(kwargs, message):
    base = dict(dim=D, num_experts=4, expert_hidden=8, top_k=2)
    with pytest.raises(ConfigError, match=message):
        moe_config(**{**base, **kwargs})
