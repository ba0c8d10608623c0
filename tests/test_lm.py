import pytest
import torch

from moekit import ConfigError, moe_config
from moekit.lm import LM, KVCache, LMConfig, generate


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    base = dict(vocab_size=50, dim=32, n_layers=3, n_heads=4, ffn_hidden=48, max_seq_len=24)
    base.update(kw)
    return LMConfig(**base)


def moe(dim=32, E=4, F=24, k=2, **kw):
    return moe_config(dim=dim, num_experts=E, expert_hidden=F, top_k=k, **kw)


def test_forward_shape_and_dtype():
    model = LM(tiny())
    logits = model(torch.randint(0, 50, (2, 7)))
    assert logits.shape == (2, 7, 50) and logits.dtype == torch.float32


def test_dense_parameter_count_by_hand():
    c = tiny()
    V, D, L, F = 50, 32, 3, 48
    attn = 4 * D * D
    mlp = 3 * D * F
    norms = 2 * D
    expected = V * D + L * (attn + mlp + norms) + D + V * D
    model = LM(c)
    assert model.num_params() == expected
    assert model.num_active_params() == expected
    tied = LM(tiny(tie_embeddings=True))
    assert tied.num_params() == expected - V * D


def test_moe_total_and_active_parameters_by_hand():
    E, F, k = 4, 24, 2
    c = tiny(moe=moe(E=E, F=F, k=k), first_dense_layers=1)
    V, D, L, Fd = 50, 32, 3, 48
    attn, norms = 4 * D * D, 2 * D
    dense_mlp = 3 * D * Fd
    experts = E * 3 * D * F
    router = E * D
    total = V * D + L * (attn + norms) + dense_mlp + 2 * (experts + router) + D + V * D
    active = total - 2 * (E - k) * 3 * D * F
    model = LM(c)
    assert c.moe_layer_ids == [1, 2]
    assert model.num_params() == total
    assert model.num_active_params() == active


def test_equal_active_parameters_dense_vs_moe():
    dense = LM(tiny(ffn_hidden=64))
    sparse = LM(tiny(ffn_hidden=64, moe=moe(E=8, F=32, k=2)))
    router = 3 * 8 * 32
    assert sparse.num_active_params() == dense.num_active_params() + router
    assert sparse.num_params() > 3 * dense.num_params() // 2


def test_flops_per_token_formula():
    model = LM(tiny())
    V, D, L, F, S = 50, 32, 3, 48, 24
    matmul = L * (4 * D * D + 3 * D * F) + V * D
    flops = model.flops_per_token(S)
    assert flops["forward"] == 2 * matmul + L * 4 * 4 * 8 * (S + 1) / 2
    assert flops["train"] == 3 * flops["forward"]


@pytest.mark.parametrize("kw", [
    {}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "qkv_bias": True}, {"qk_norm": "head", "head_dim": 16},
    {"qk_norm": "full"}, {"moe": "moe", "moe_every": 2}, {"tie_embeddings": True},
])
def test_kv_cache_matches_full_recomputation(kw):
    if kw.get("moe") == "moe":
        kw = {**kw, "moe": moe()}
    model = LM(tiny(**kw)).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = model(ids)
    cache = KVCache(model.config.n_layers)
    parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(5, 9)]
    parts.append(model(ids[:, 9:], cache=cache))
    stepped = torch.cat(parts, dim=1)
    assert cache.length == 12
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-4)


def test_generate_cached_equals_uncached_greedy_and_seeded_sampling():
    model = LM(tiny(moe=moe(), n_kv_heads=2))
    prompt = torch.randint(0, 50, (2, 4))
    greedy = generate(model, prompt, 10)
    assert greedy.shape == (2, 14) and torch.equal(greedy[:, :4], prompt)
    assert torch.equal(greedy, generate(model, prompt, 10, use_cache=False))
    a = generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=3, use_cache=False)
    c = generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_adds_every_forwards_routing_statistics():
    """generate defers the statistics (DECODE_UPDATE_EVERY forwards per pass) but returns with all
    of them added: the same counts and sums as the same forwards run one at a time, and each
    layer's own setting back."""
    import copy

    from moekit.stats import DECODE_UPDATE_EVERY
    from moekit.lm.model import KVCache
    from moekit.model_ops import moe_layers

    model = LM(tiny(moe=moe(), max_seq_len=64)).eval()
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, 50, (2, 4))
    new = DECODE_UPDATE_EVERY + 5  # one full deferred pass, then a partial one at the end
    out = generate(model, prompt, new)
    cache, step = KVCache(ref.config.n_layers), prompt
    with torch.no_grad():
        for i in range(new):  # the same forwards, statistics added one at a time
            ref(step, cache=cache)
            step = out[:, 4 + i:5 + i]
    for (name, got), (_, want) in zip(moe_layers(model), moe_layers(ref)):
        assert got.stats.update_every == 1, name
        assert int(got.stats.passes) == new
        for buf in ("tokens_E", "routed_E", "idle_steps_E"):
            assert torch.equal(getattr(got.stats, buf), getattr(want.stats, buf)), (name, buf)
        for buf in ("entropy_sum", "z_sum", "num_tokens", "coactivation_EE"):
            torch.testing.assert_close(getattr(got.stats, buf), getattr(want.stats, buf)), (name, buf)


def test_top_p_keeps_only_the_nucleus():
    from moekit.lm.generate import sample_next

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.8, g)) for _ in range(200)}
    assert draws == {0, 1}


def test_generation_stops_at_context_limit():
    model = LM(tiny(max_seq_len=10))
    out = generate(model, torch.zeros(1, 6, dtype=torch.long), 50)
    assert out.shape == (1, 10)
    with pytest.raises(ValueError, match="exceed max_seq_len=10"):
        model(torch.zeros(1, 11, dtype=torch.long))


def test_config_round_trips_through_a_file(tmp_path):
    c = tiny(n_kv_heads=2, qk_norm="head", moe=moe(shared_experts=1), moe_layers=[0, 2])
    path = tmp_path / "lm.json"
    c.save(path)
    again = LMConfig.load(path)
    assert again == c
    assert again.moe.shared.num == 1 and again.moe_layer_ids == [0, 2]


@pytest.mark.parametrize("kw, message", [
    ({"dim": 30, "n_heads": 4}, r"dim=30 is not divisible by n_heads=4"),
    ({"n_kv_heads": 3}, r"n_heads=4 is not divisible by n_kv_heads=3"),
    ({"qk_norm": "layer"}, r"qk_norm='layer' is not one of"),
    ({"attention": "linear"}, r"attention='linear' is not one of"),
    ({"moe_layers": [0, 5], "moe": "moe"}, r"moe_layers has \[5\] outside \[0, n_layers=3\)"),
    ({"moe": "moe16"}, r"moe.dim=16 differs from dim=32"),
    ({"ffn_hidden": 0}, r"ffn_hidden=0 must be an int >= 1"),
    ({"head_dim": 5}, r"head_dim=5 must be even"),
])
def test_impossible_sizes_are_named(kw, message):
    if kw.get("moe") == "moe":
        kw["moe"] = moe()
    elif kw.get("moe") == "moe16":
        kw["moe"] = moe(dim=16)
    with pytest.raises(ConfigError, match=message):
        tiny(**kw)


def test_unknown_key_in_config_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"dim": 32, "n_head": 4}')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['n_head'\] in .*bad\.json"):
        LMConfig.load(path)
    path.write_text('{"dim": 32,')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1"):
        LMConfig.load(path)


def test_hf_style_parameter_names():
    names = {n for n, _ in LM(tiny(moe=moe(), first_dense_layers=1, qk_norm="head")).named_parameters()}
    for name in ["embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_norm.weight",
                 "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
                 "layers.0.mlp.gate_proj.weight", "layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.router.weight",
                 "norm.weight", "lm_head.weight"]:
        assert name in names


def test_missing_attention_module_is_a_clear_error(monkeypatch):
    from moekit.lm import config as lm_config

    monkeypatch.setitem(lm_config.ATTENTION_REGISTRY, "fancy", "moekit.lm.no_such_module:Fancy")
    with pytest.raises(ImportError, match=r"attention='fancy' needs moekit.lm.no_such_module.Fancy"):
        LM(tiny(attention="fancy"))
