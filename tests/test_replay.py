"""Router replay (moekit.replay): recorded experts are the ones a later forward uses, bit for bit;
weights and gradients follow the current router (checked against a float64 per-token loop); the
file round-trips compactly; converted HF families replay; every mismatch is one clear error."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from moekit import MoE, moe_config
from moekit.cli import main
from moekit.lm import LM, LMConfig, generate
from moekit.model_ops import moe_layers
from moekit.replay import RoutingRecord, RoutingRecordError, record_routing, replay_routing

from capture_util import captured

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(seed: int = 0, n_layers: int = 3, E: int = 8, k: int = 2, **moe_kw) -> LM:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=50, dim=32, n_layers=n_layers, n_heads=4, ffn_hidden=48, max_seq_len=40, init_std=0.2,
                   moe=moe_config(dim=32, num_experts=E, expert_hidden=24, top_k=k, **moe_kw))
    return LM(cfg)


def used_experts(model: torch.nn.Module, *args) -> list[torch.Tensor]:
    """Each MoE layer's (T, K) expert ids in ``model(*args)``."""
    _, cap = captured(model, *args)
    return [cap.last(name).routing.topk_idx_TK for name in cap.names]


def nudge_routers(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """Move every router so its free top-k differs from before (an RL step's worth, exaggerated)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moe_layers(model):
            w = layer.router.weight
            w.add_(torch.randn(w.shape, generator=gen) * scale * w.std())


# ---------------------------------------------------------------------- bit-for-bit
@pytest.mark.parametrize("router", [dict(), dict(router="sigmoid_topk", n_group=4, topk_group=2, routed_scaling_factor=2.5),
                                    dict(router="switch", top_k=1), dict(norm_topk_prob=False)])
def test_replayed_forward_equals_recorded_bit_for_bit(router) -> None:
    kw = dict(router)
    k = kw.pop("top_k", 2)
    model = tiny_lm(k=k, **kw).train()
    ids = torch.randint(0, 50, (3, 11))
    with record_routing(model) as rec:
        logits = model(ids)
    (logits.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    record = RoutingRecord.from_bytes(rec.record(tokens=ids).to_bytes())
    assert record.shape == (3, 11) and torch.equal(record.tokens, ids)
    model.zero_grad()
    with replay_routing(model, record):
        replayed = model(ids)
        (replayed.square().mean()).backward()
    assert torch.equal(replayed, logits)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    assert all(layer.replay_topk_idx is None for _, layer in moe_layers(model))


def test_generation_record_replays_in_a_training_forward() -> None:
    """Cached sampling (prefill, then one token a step) -> a full-sequence training forward uses
    the rollout's experts in every layer, after the routers moved."""
    model = tiny_lm()
    prompt = torch.randint(0, 50, (2, 4))
    with record_routing(model) as rec:
        out = generate(model, prompt, 12, temperature=1.0, seed=3)
    record = rec.record(tokens=out[:, :-1])
    assert record.shape == (2, 4 + 12 - 1)
    nudge_routers(model)
    model.train()
    free = used_experts(model, record.tokens)
    assert any(not torch.equal(f.view(2, -1, 2), r) for f, r in zip(free, record.topk_idx)), \
        "the nudge should change the free routing, else this test shows nothing"
    with replay_routing(model, record):
        replayed = used_experts(model, record.tokens)
    for used, recorded in zip(replayed, record.topk_idx):
        assert torch.equal(used.view(2, -1, 2), recorded)


def reference_replayed(layer: MoE, x_TD: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """Per-token loop with given experts: weights are the router's scores there (softmax over all E),
    renormalised over the k, as Mixtral's router computes them."""
    logits_TE = x_TD @ layer.router.weight.t()
    rows = []
    for t in range(x_TD.shape[0]):
        p_E = torch.softmax(logits_TE[t], dim=-1)
        picks = idx_TK[t].tolist()
        total = sum(p_E[e] for e in picks)
        rows.append(sum(p_E[e] / total * layer.experts.expert_forward(e, x_TD[t:t + 1])[0] for e in picks))
    return torch.stack(rows)


def test_replay_weights_and_gradients_match_float64_reference() -> None:
    torch.manual_seed(0)
    layer = MoE(dim=16, num_experts=6, expert_hidden=20, top_k=3).double().train()
    ref = copy.deepcopy(layer)
    x_TD = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x_TD.detach().clone().requires_grad_(True)
    idx_TK = torch.stack([torch.randperm(6)[:3] for _ in range(13)])
    layer.replay_topk_idx = idx_TK
    y = layer(x_TD)
    y_ref = reference_replayed(ref, x_ref, idx_TK)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x_TD.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    assert ref.router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad, rtol=1e-12, atol=1e-12)
    for (n, p), (_, q) in zip(layer.experts.named_parameters(), ref.experts.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)


def test_replay_with_padding_and_capacity() -> None:
    """The capacity path routes only real tokens: the replayed ids follow them there too."""
    model = tiny_lm(capacity_factor=2.0).train()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with record_routing(model) as rec:
        logits = model(ids, token_mask=mask)
    record = rec.record()
    with replay_routing(model, record):
        assert torch.equal(model(ids, token_mask=mask), logits)


def test_stack_batches_per_request_records() -> None:
    """Per-request records of different lengths, right-padded into one batch with a token mask, give
    each request's own replayed logits at its positions."""
    model = tiny_lm().eval()
    singles, logits = [], []
    for n in (5, 9, 7):
        ids = torch.randint(0, 50, (1, n))
        with record_routing(model) as rec:
            logits.append(model(ids))
        singles.append(rec.record(tokens=ids))
    batch, mask = RoutingRecord.stack(singles)
    assert batch.shape == (3, 9) and mask.sum(dim=1).tolist() == [5, 9, 7]
    with replay_routing(model, batch):
        out = model(batch.tokens, token_mask=mask)
    for b, n in enumerate((5, 9, 7)):
        torch.testing.assert_close(out[b, :n], logits[b][0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- file
def test_file_is_compact_and_round_trips(tmp_path) -> None:
    from safetensors import safe_open

    model = tiny_lm(E=8)
    ids = torch.randint(0, 50, (1, 30))
    with record_routing(model) as rec:
        model(ids)
    path = rec.record(tokens=ids).save(tmp_path / "r.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("topk_idx/layers.0.mlp").dtype == torch.uint8
        assert f.metadata()["format"] == "moekit.routing_record"
    loaded = RoutingRecord.load(path)
    assert loaded.layers == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"] and loaded.num_experts == [8] * 3
    assert loaded.top_k == [2] * 3 and torch.equal(loaded.tokens, ids)
    # 3 layers * 30 tokens * 2 ids, one byte each, plus tokens and a small header.
    assert path.stat().st_size < 3 * 30 * 2 + 30 * 4 + 1024

    big = RoutingRecord(["a"], [300], [torch.tensor([[[299, 0]]])])
    assert RoutingRecord.from_bytes(big.to_bytes()).topk_idx[0].tolist() == [[[299, 0]]]


# ---------------------------------------------------------------------- errors
def recorded(model: LM, shape=(2, 6)) -> RoutingRecord:
    with record_routing(model) as rec:
        model(torch.randint(0, 50, shape))
    return rec.record()


def test_layer_count_mismatch_is_an_error() -> None:
    record = recorded(tiny_lm(n_layers=3))
    with pytest.raises(RoutingRecordError, match=r"record has 3 MoE layers, the model 2"):
        with replay_routing(tiny_lm(n_layers=2), record):
            pass


def test_shape_mismatch_names_the_layer() -> None:
    model = tiny_lm()
    record = recorded(model, (2, 6))
    with replay_routing(model, record):
        with pytest.raises(ValueError, match=re.escape("layers.0.mlp: the replayed routing covers tokens of shape "
                                                       "(2, 6), but this forward's input has (2, 7)")):
            model(torch.randint(0, 50, (2, 7)))
        model(torch.randint(0, 50, (2, 6)))  # the right shape still works after the error


@pytest.mark.parametrize("other, message", [
    (dict(E=4), r"layers.0.mlp has num_experts=4, top_k=2; the record has num_experts=8, top_k=2"),
    (dict(k=3), r"layers.0.mlp has num_experts=8, top_k=3; the record has num_experts=8, top_k=2"),
])
def test_model_signature_mismatch(other, message) -> None:
    record = recorded(tiny_lm())
    with pytest.raises(RoutingRecordError, match=message):
        with replay_routing(tiny_lm(**other), record):
            pass


def test_names_must_match_unless_paired_by_order() -> None:
    record = recorded(tiny_lm())
    record.layers = [f"model.{n}" for n in record.layers]
    model = tiny_lm()
    with pytest.raises(RoutingRecordError, match=r"record layer 'model.layers.0.mlp' meets model layer 'layers.0.mlp'"):
        with replay_routing(model, record):
            pass
    with replay_routing(model, record, match_names=False):
        model(torch.randint(0, 50, (2, 6)))


def test_bad_files_and_records(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(RoutingRecordError, match=r"bad.safetensors: safetensors header of \d+ bytes runs past"):
        RoutingRecord.load(bad)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(bad), metadata={"format": "other"})
    with pytest.raises(RoutingRecordError, match=r"not a moekit routing record \(metadata format='other'"):
        RoutingRecord.load(bad)
    with pytest.raises(RoutingRecordError, match=r"a holds expert id 8, out of range \[0, 8\)"):
        RoutingRecord(["a"], [8], [torch.tensor([[[1, 8]]])])
    with pytest.raises(RoutingRecordError, match=r"a picks the same expert twice for one token"):
        RoutingRecord(["a"], [8], [torch.tensor([[[3, 3]]])])
    with pytest.raises(RoutingRecordError, match=r"b covers positions \(1, 2\), the first layer \(1, 1\)"):
        RoutingRecord(["a", "b"], [8, 8], [torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1], [1, 2]]])])
    with pytest.raises(RoutingRecordError, match=r"tokens of shape \(1, 2\) do not match the recorded positions \(1, 1\)"):
        RoutingRecord(["a"], [8], [torch.tensor([[[0, 1]]])], tokens=torch.zeros(1, 2, dtype=torch.long))


def test_unreplayable_models_and_states() -> None:
    dense = LM(LMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=40))
    with pytest.raises(RoutingRecordError, match=r"record_routing: the model has no moekit MoE layer"):
        with record_routing(dense):
            pass
    ec = MoE(dim=16, num_experts=4, expert_hidden=8, top_k=1, router="expert_choice", capacity_factor=1.0)
    with pytest.raises(RoutingRecordError, match=r"uses expert-choice routing"):
        with record_routing(ec):
            pass
    from moekit.parallel import ParallelGroups, shard_moe

    one_rank = ParallelGroups(world_size=1, rank=0, ep_size=1, ep_group=None, dp_group=None, ep_ranks=[0],
                              dp_ranks=[0], backend="gloo", device=torch.device("cpu"), timeout_s=10.0)
    sharded = shard_moe(MoE(dim=16, num_experts=4, expert_hidden=8, top_k=2), one_rank)
    with pytest.raises(RoutingRecordError, match=r"MoE is expert-parallel"):
        with record_routing(sharded):
            pass
    model = tiny_lm()
    record = recorded(model)
    with replay_routing(model, record):
        with pytest.raises(RoutingRecordError, match=r"nested replay_routing"):
            with replay_routing(model, record):
                pass
    expert = int(record.topk_idx[1][0, 0, 0])
    model.layers[1].mlp.mask_experts([expert])
    with pytest.raises(RoutingRecordError, match=rf"layers.1.mlp replays masked expert\(s\) \[{expert}\]"):
        with replay_routing(model, record):
            pass
    with record_routing(model) as rec:
        model(torch.randint(0, 50, (2, 3)))
        model(torch.randint(0, 50, (1, 3)))
    with pytest.raises(RoutingRecordError, match=r"saw forwards of batch sizes \[1, 2\]"):
        rec.record()


# ---------------------------------------------------------------------- converted Hugging Face models
HF_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_replay_on_converted_hf_family(family: str, tmp_path) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed; pip install -e '.[dev]'")
    from moekit.hf import from_hf, patch_model
    from moekit.hf.testing import tiny_hf_model

    hf_model = tiny_hf_model(family)
    hf_model.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with record_routing(model) as rec:
        out = generate(model, prompt, 6)
    record = RoutingRecord.from_bytes(rec.record(tokens=out[:, :-1]).to_bytes())
    assert len(record.layers) == len(moe_layers(model))
    with record_routing(model) as rec:
        full = model(record.tokens)
    with replay_routing(model, rec.record()):
        assert torch.equal(model(record.tokens), full)
    nudge_routers(model, scale=1.0)
    with replay_routing(model, record):
        replayed = used_experts(model.train(), record.tokens)
    for used, recorded_idx in zip(replayed, record.topk_idx):
        assert torch.equal(used.view(recorded_idx.shape), recorded_idx)
    # The same rollout replayed in transformers' own model (its MoE blocks patched), layers paired by order.
    patch_model(hf_model)
    with replay_routing(hf_model, record, match_names=False):
        replayed = used_experts(hf_model.train(), record.tokens)
    for used, recorded_idx in zip(replayed, record.topk_idx):
        assert torch.equal(used.view(recorded_idx.shape), recorded_idx)


# ---------------------------------------------------------------------- CLI and server
def write_run(folder) -> LM:
    from moekit.train.checkpoint import save_checkpoint
    from moekit.train.trainer import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig(model=LMConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, ffn_hidden=48, max_seq_len=64,
                                     init_std=0.2, moe=moe_config(dim=32, num_experts=4, expert_hidden=24, top_k=2)),
                      seq_len=32, tokenizer="byte")
    model = LM(cfg.model)
    save_checkpoint(folder, 0, model, None, {"config": cfg.to_dict()})
    return model


def test_server_returns_routing_records_per_choice(tmp_path) -> None:
    """n=3 choices run as a packed prefill and batched decode steps; each choice's record covers its
    prompt and generated tokens but the last, and replays in a training forward."""
    import base64

    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed; pip install -e '.[serve]'")
    httpx = pytest.importorskip("httpx", reason="httpx is not installed; pip install -e '.[dev]'")
    from moekit.serve import BackgroundServer, ServeLimits, create_app, load_engine

    model = write_run(tmp_path / "run")
    engine = load_engine(tmp_path / "run", ServeLimits(max_batch=4, max_tokens=16), model_name="tiny")
    with BackgroundServer(create_app(engine)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        body = {"prompt": "hello there", "max_tokens": 7, "n": 3, "temperature": 1.0, "seed": 5, "routing_record": True}
        choices = client.post("/v1/completions", json=body).json()["choices"]
        stream = client.post("/v1/completions", json={**body, "n": 1, "stream": True}).text
        plain = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()["choices"][0]
    assert "routing_record" not in plain
    assert engine.counts["packed_prefills"] >= 1 and engine.counts["batched_steps"] >= 1
    records = [RoutingRecord.from_bytes(base64.b64decode(c["routing_record"]), "response") for c in choices]
    finals = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    streamed = [c["routing_record"] for f in finals for c in f["choices"] if "routing_record" in c]
    assert len(streamed) == 1
    records.append(RoutingRecord.from_bytes(base64.b64decode(streamed[0]), "stream"))
    model.train()
    for choice, record in zip(choices, records):
        prompt = list(b"hello there")
        assert record.layers == ["layers.0.mlp", "layers.1.mlp"]
        assert record.tokens[0, :len(prompt)].tolist() == prompt
        assert record.tokens[0, len(prompt):].tolist() == choice["token_ids"][:record.shape[1] - len(prompt)]
        with replay_routing(model, record):
            replayed = used_experts(model, record.tokens)
        for used, recorded_idx in zip(replayed, record.topk_idx):
            assert torch.equal(used.view(recorded_idx.shape), recorded_idx)
    batch, mask = RoutingRecord.stack(records)
    with replay_routing(model, batch):
        model(batch.tokens, token_mask=mask)


def test_cli_generate_records_routing(tmp_path, capsys) -> None:
    model = write_run(tmp_path / "run")
    path = tmp_path / "rollout.safetensors"
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hello", "--max-new-tokens", "6",
                 "--temperature", "0", "--record-routing", str(path)]) == 0
    assert "written to" in capsys.readouterr().err
    record = RoutingRecord.load(path)
    assert record.shape == (1, 5 + 6 - 1) and record.tokens[0, :5].tolist() == list(b"hello")
    model.train()
    with replay_routing(model, record):
        replayed = used_experts(model, record.tokens)
    for used, recorded_idx in zip(replayed, record.topk_idx):
        assert torch.equal(used.view(recorded_idx.shape), recorded_idx)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "2",
                 "--record-routing", str(tmp_path / "missing" / "r.safetensors")]) == 2
    assert "No such file or directory" in capsys.readouterr().err
