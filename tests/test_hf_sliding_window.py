"""Sliding-window attention of Mixtral and Qwen3-MoE (``attention_options.sliding_window`` of moekit's
``mha`` attention) against transformers, the mask against its formula, and the serving paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.config import ConfigError, moe_config  # noqa: E402
from moekit.hf import UnsupportedArchitectureError, from_hf, to_hf  # noqa: E402
from moekit.hf.testing import tiny_hf_model  # noqa: E402
from moekit.lm import LM, KVCache, LMConfig, generate  # noqa: E402
from moekit.lm.model import causal_mask  # noqa: E402
from moekit.serve.batched import KVPool, can_batch, decode_step, prefill_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

WINDOW = 4
# Twelve prompt tokens and 20 generated: three times the window, so most keys fall out of it.
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
WINDOWED = {"mixtral": dict(sliding_window=WINDOW), "qwen3_moe": dict(use_sliding_window=True, sliding_window=WINDOW)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    model.generation_config.eos_token_id = None
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                          pad_token_id=0)


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_windowed_logits_generation_and_export_match_transformers(family: str, tmp_path: Path) -> None:
    hf = tiny_hf_model(family, **WINDOWED[family])
    assert hf.config.sliding_window == WINDOW
    hf.save_pretrained(tmp_path / "src")
    model = from_hf(tmp_path / "src")
    assert model.config.attention_options == {"sliding_window": WINDOW}
    with torch.no_grad():
        ref = hf(IDS).logits
        # The window changes the outputs (so the comparison below can fail): the same weights
        # with full causal attention are far off.
        assert rel_err(tiny_hf_model(family)(IDS).logits, ref) > 0.05
        assert rel_err(model(IDS), ref) < 1e-4
        hf_tokens = hf_greedy(hf, IDS, 20)
    assert torch.equal(generate(model, IDS, 20), hf_tokens)
    assert torch.equal(generate(model, IDS, 20, use_cache=False), hf_tokens)
    # Export keeps the window: transformers reloads the same model.
    to_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.sliding_window == WINDOW
    with torch.no_grad():
        assert rel_err(back(IDS).logits, ref) < 1e-6


def test_per_layer_windows_are_refused(tmp_path: Path) -> None:
    tiny_hf_model("qwen2_moe", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1) \
        .save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=r"layer_types.*sliding_attention.*qwen2_moe"):
        from_hf(tmp_path)


@pytest.mark.parametrize("S,P,window", [(5, 0, 1), (7, 0, 3), (4, 6, 3), (1, 9, 4), (3, 2, 10)])
def test_causal_mask_with_window_is_the_formula(S: int, P: int, window: int) -> None:
    mask_SL = causal_mask(S, P, torch.device("cpu"), window)
    expected = [[P + s - window < j <= P + s for j in range(P + S)] for s in range(S)]
    assert mask_SL.tolist() == expected


def windowed_lm(window: int | None = WINDOW) -> LM:
    torch.manual_seed(0)
    options = {} if window is None else {"sliding_window": window}
    cfg = LMConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.2,
                   attention_options=options, moe=moe_config(dim=32, num_experts=4, expert_hidden=24, top_k=2))
    return LM(cfg).eval()


@pytest.mark.parametrize("kind", ["list", "pool"])
def test_serving_steps_match_lm_forward_past_the_window(kind: str) -> None:
    model = windowed_lm()
    assert can_batch(model)
    prompts = [torch.randint(0, 257, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 2, 6)]
    if kind == "list":
        caches = [KVCache(2) for _ in prompts]
    else:
        pool = KVPool(2, 3, 64)
        caches = [pool.acquire() for _ in prompts]
    with torch.no_grad():
        logits_BV, _ = prefill_step(model, prompts, caches)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(logits_BV[b], model(p[None])[0, -1], rtol=1e-4, atol=1e-5)
        seqs = [p.tolist() for p in prompts]
        for step in range(6):
            tokens_B = torch.tensor([3 + step, 50 + step, 100 + step])
            logits_BV = decode_step(model, tokens_B, caches)
            for b in range(len(seqs)):
                seqs[b].append(int(tokens_B[b]))
                ref_V = model(torch.tensor([seqs[b]]))[0, -1]
                torch.testing.assert_close(logits_BV[b], ref_V, rtol=1e-4, atol=1e-5)
    # A window as long as the sequence is plain causal attention.
    full, wide = windowed_lm(None), windowed_lm(64)
    ids = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(wide(ids), full(ids), rtol=0, atol=0)
        assert rel_err(windowed_lm()(ids), full(ids)) > 0.01


@pytest.mark.parametrize("options,match", [
    ({"sliding_window": 0}, r"attention_options\.sliding_window=0 must be None or an int >= 1"),
    ({"sliding_window": 2.5}, r"attention_options\.sliding_window=2\.5"),
    ({"window": 4}, r"unknown attention_options \['window'\] for attention='mha'"),
])
def test_bad_window_options_name_the_option(options: dict, match: str) -> None:
    cfg = LMConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, attention_options=options)
    with pytest.raises(ConfigError, match=match):
        LM(cfg)


def test_window_export_refused_where_the_family_has_none(tmp_path: Path) -> None:
    model = windowed_lm()
    with pytest.raises(UnsupportedArchitectureError, match=r"olmoe.*sliding_window=4"):
        to_hf(model, tmp_path / "x", family="olmoe")
    assert not (tmp_path / "x").exists()
