"""The serving engine's batched decode step against LM.forward, and the engine without HTTP."""

import re
import threading

import pytest
import torch

from moekit.config import ConfigError, moe_config
from moekit.lm import LM, KVCache, LMConfig
from moekit.lm.generate import draw, generate, nucleus_probs
from moekit.serve.batched import KVPool, RowCaches, can_batch, decode_step, mixed_step, prefill_step, truncate_cache
from moekit.serve.engine import Engine, GenRequest, QueueFullError, ServeLimits


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_lm(**overrides) -> LM:
    kw = dict(vocab_size=257, dim=32, n_layers=2, n_heads=4, max_seq_len=64, ffn_hidden=48, init_std=0.2,
              moe=moe_config(dim=32, num_experts=4, expert_hidden=24, top_k=2))
    kw.update(overrides)
    return LM(LMConfig(**kw)).eval()


def new_caches(model: LM, n: int, kind: str = "list") -> list[KVCache]:
    """``list``: the LM's own growing KVCache; ``pool``: slots of one KVPool (slot order scrambled,
    read with a gather); ``consecutive``: slots 1..n in row order (read as one view of the pool)."""
    if kind == "list":
        return [KVCache(model.config.n_layers) for _ in range(n)]
    pool = KVPool(model.config.n_layers, n + 2, model.config.max_seq_len)
    pool.acquire()  # leave slot 0 unused, so rows and slots differ
    caches = [pool.acquire() for _ in range(n)]
    return caches if kind == "consecutive" else caches[::-1]


def prefilled(model: LM, prompts: list[torch.Tensor], kind: str = "list") -> list[KVCache]:
    caches = new_caches(model, len(prompts), kind)
    with torch.no_grad():
        for p, c in zip(prompts, caches):
            model(p, cache=c)
    return caches


@pytest.mark.parametrize("kind", ["list", "pool", "consecutive"])
@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"qk_norm": "head"}, {"qk_norm": "full", "n_kv_heads": 1},
                                       {"moe_layers": [1]}])
def test_decode_step_matches_lm_forward_per_row(overrides, kind):
    model = tiny_lm(**overrides)
    assert can_batch(model)
    prompts = [torch.randint(0, 257, (1, n)) for n in (3, 9, 1, 6)]
    caches = prefilled(model, prompts, kind)
    tokens_B = torch.tensor([5, 17, 200, 3])
    logits_BV = decode_step(model, tokens_B, caches)
    assert [c.length for c in caches] == [4, 10, 2, 7]
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            full = torch.cat([prompt, tokens_B[b:b + 1, None]], dim=1)
            ref_V = model(full)[0, -1]
            torch.testing.assert_close(logits_BV[b], ref_V, rtol=1e-4, atol=1e-5)
    # A second step continues every row's own cache.
    logits2_BV = decode_step(model, torch.tensor([1, 2, 3, 4]), caches)
    with torch.no_grad():
        full = torch.cat([prompts[1], torch.tensor([[17, 2]])], dim=1)
        torch.testing.assert_close(logits2_BV[1], model(full)[0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["list", "pool", "consecutive"])
@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1, "qk_norm": "head"}])
def test_prefill_step_packs_prompts_like_separate_lm_forwards(overrides, kind):
    model = tiny_lm(**overrides)
    layer = model.layers[0].mlp
    # Row 2 continues a cache that holds 4 positions already (P > 0 takes the offset causal mask).
    history = torch.randint(0, 257, (1, 4))
    caches = new_caches(model, 3, kind)
    with torch.no_grad():
        model(history, cache=caches[2])
    prompts = [torch.randint(0, 257, (n,)) for n in (5, 1, 3)]
    tokens_before = float(layer.stats.num_tokens)
    logits_BV, rows = prefill_step(model, prompts, caches)
    assert rows == [4, 5, 8] and [c.length for c in caches] == [5, 1, 7]
    assert float(layer.stats.num_tokens) - tokens_before == 9  # real tokens only, no padding
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            full = torch.cat([history[0], prompt]) if b == 2 else prompt
            torch.testing.assert_close(logits_BV[b], model(full[None])[0, -1], rtol=1e-4, atol=1e-5)
    # The caches continue like LM.forward's: a batched decode step after the packed prefill.
    out_BV = decode_step(model, torch.tensor([7, 8, 9]), caches)
    with torch.no_grad():
        ref = model(torch.cat([prompts[0], torch.tensor([7])])[None])[0, -1]
    torch.testing.assert_close(out_BV[0], ref, rtol=1e-4, atol=1e-5)


def test_decode_step_rejects_bad_shapes_and_overflow():
    model = tiny_lm(max_seq_len=4)
    caches = prefilled(model, [torch.randint(0, 257, (1, 4))])
    with pytest.raises(ValueError, match="B = 1 caches"):
        decode_step(model, torch.tensor([1, 2]), caches)
    with pytest.raises(ValueError, match="exceed max_seq_len=4"):
        decode_step(model, torch.tensor([1]), caches)
    with pytest.raises(ValueError, match="exceed max_seq_len=4"):
        prefill_step(model, [torch.tensor([1])], caches)
    with pytest.raises(ValueError, match="got 2 prompts for 1 caches"):
        prefill_step(model, [torch.tensor([1]), torch.tensor([2])], caches)


def test_pool_slots_are_reused_and_bounded():
    model = tiny_lm(max_seq_len=8)
    pool = KVPool(2, 2, 8)
    a, b = pool.acquire(), pool.acquire()
    with pytest.raises(RuntimeError, match="all 2 KV cache slots are in use"):
        pool.acquire()
    with torch.no_grad():
        model(torch.randint(0, 257, (1, 8)), cache=a)
    with pytest.raises(ValueError, match="9 positions exceed"):
        decode_step(model, torch.tensor([1]), [a])
    # A released slot serves a new sequence from position 0; stale keys past its length are masked.
    pool.release(a)
    c = pool.acquire()
    assert c.slot == a.slot and c.length == 0
    prompt = torch.randint(0, 257, (1, 3))
    with torch.no_grad():
        model(prompt, cache=c)
        model(torch.randint(0, 257, (1, 5)), cache=b)
    out_BV = decode_step(model, torch.tensor([4, 4]), [c, b])
    with torch.no_grad():
        ref_V = model(torch.cat([prompt, torch.tensor([[4]])], dim=1))[0, -1]
    torch.testing.assert_close(out_BV[0], ref_V, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", [{}, {"attention": "mla", "attention_options": {
    "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}}])
def test_compacted_pool_keeps_every_row_and_is_read_as_one_view(attention):
    """Rows in slots 1, 3, 4 of a 5-slot pool (0 and 2 free, as after finished sequences) move into
    slots 0..2 (one copy of each moved row's positions): the step reads one view of the pool and
    gives each row the logits of LM.forward over its whole sequence; acquire takes the lowest slot."""
    torch.manual_seed(0)
    model = tiny_lm(**attention)
    pool = KVPool(model.config.n_layers, 5, model.config.max_seq_len)
    caches = [pool.acquire() for _ in range(5)]
    prompts = [torch.randint(0, 257, (1, n)) for n in (4, 2, 6, 3, 5)]
    with torch.no_grad():
        for p, c in zip(prompts, caches):
            model(p, cache=c)
    pool.release(caches[0])
    pool.release(caches[2])
    rows = [caches[1], caches[3], caches[4]]
    pool.compact(rows)
    assert sorted(c.slot for c in rows) == [0, 1, 2] and sorted(pool.free) == [3, 4]
    rows.sort(key=lambda c: c.slot)
    assert RowCaches(rows)._first_slot == 0
    tokens = torch.tensor([7, 8, 9])
    out_BV = decode_step(model, tokens, rows)
    row_prompts = {id(c): p for c, p in zip(caches, prompts)}
    with torch.no_grad():
        for b, c in enumerate(rows):
            ref_V = model(torch.cat([row_prompts[id(c)], tokens[b].view(1, 1)], dim=1))[0, -1]
            torch.testing.assert_close(out_BV[b], ref_V, rtol=1e-4, atol=1e-5)
    assert pool.acquire().slot == 3
    with pytest.raises(ValueError, match="slot 1 is not a free slot of this pool"):
        pool.move(rows[0], 1)


def test_truncate_cache_undoes_a_failed_step():
    model = tiny_lm()
    caches = prefilled(model, [torch.randint(0, 257, (1, 5))])
    before = [t.clone() for t in caches[0].layers[0]]
    caches[0].update(0, torch.ones(1, 4, 1, 8), torch.ones(1, 4, 1, 8))  # a partial append, length unchanged
    assert caches[0].layers[0][0].shape[-2] == 6
    truncate_cache(caches[0])
    for t, ref in zip(caches[0].layers[0], before):
        assert torch.equal(t, ref)


def test_serve_limits_validate():
    with pytest.raises(ConfigError, match="max_batch=0"):
        ServeLimits(max_batch=0)
    with pytest.raises(ConfigError, match="max_prompt_tokens='x'"):
        ServeLimits(max_prompt_tokens="x")


class ByteTok:
    eos_id = 256

    def decode(self, ids):
        return bytes(i for i in ids if i != 256).decode("utf-8", errors="replace")


def run_requests(engine: Engine, reqs: list[GenRequest]) -> list[list[dict]]:
    """Submit every request, then start the engine: its first step admits them all together."""
    events = [[] for _ in reqs]
    done = [threading.Event() for _ in reqs]
    for i, r in enumerate(reqs):
        def on_event(ev, i=i):
            events[i].append(ev)
            if ev["type"] != "token":
                done[i].set()
        r.on_event = on_event
        engine.submit(r)
    engine.start()
    for d in done:
        assert d.wait(60)
    return events


def test_engine_prefills_prompts_in_the_running_rows_decode_step():
    """With max_batch 2, later requests take a slot while the other row still runs: their prompts
    join that row's decode step (a mixed step), and every request keeps its offline tokens."""
    model = tiny_lm()
    engine = Engine(model, ByteTok(), ServeLimits(max_batch=2))
    try:
        prompts = [[72, 101, 108], [10, 20, 30, 40, 50, 60], [7], [99, 98], [5, 6, 7, 8]]
        lengths = [3, 9, 4, 7, 5]
        reqs = [GenRequest(prompt_ids=p, max_tokens=n, temperature=0.9, seed=i)
                for i, (p, n) in enumerate(zip(prompts, lengths))]
        run_requests(engine, reqs)
        assert engine.counts["mixed_steps"] >= 2
        for i, (p, n, r) in enumerate(zip(prompts, lengths, reqs)):
            ref = generate(model, torch.tensor([p]), n, temperature=0.9, seed=i, stop_token=256)
            assert r.generated == ref[0, len(p):].tolist()
    finally:
        engine.stop()


def test_a_failing_mixed_step_fails_only_the_request_that_breaks_it():
    """A prompt that breaks the forward (here: token 250 in a multi-token input) fails the mixed
    step; the engine runs prompts and rows apart, so only that request fails and the running row
    keeps its offline tokens."""
    model = tiny_lm()

    def poison(_module, args):
        ids = args[0]
        if ids.shape[-1] > 1 and bool((ids == 250).any()):
            raise RuntimeError("poisoned prompt")

    model.embed_tokens.register_forward_pre_hook(poison)
    engine = Engine(model, ByteTok(), ServeLimits(max_batch=2))
    try:
        reqs = [GenRequest(prompt_ids=[1, 2, 3], max_tokens=10, temperature=0.0),
                GenRequest(prompt_ids=[4, 5], max_tokens=2, temperature=0.0),
                GenRequest(prompt_ids=[250, 1, 2], max_tokens=4, temperature=0.0)]
        events = run_requests(engine, reqs)
        assert engine.counts["mixed_steps"] >= 1
        assert events[2][-1] == {"type": "error", "message": "RuntimeError: poisoned prompt"}
        assert events[0][-1]["type"] == "done" and events[1][-1]["type"] == "done"
        ref = generate(model, torch.tensor([[1, 2, 3]]), 10, temperature=0.0, stop_token=256)
        assert reqs[0].generated == ref[0, 3:].tolist()
    finally:
        engine.stop()


def test_mixed_step_traces_and_records_the_joining_requests_routing():
    """A request that joins a running row through a mixed step gets its own rows of the step's
    routing: each token's trace and its routing record equal a plain forward of its sequence."""
    from moekit import capture_routing

    model = tiny_lm()
    engine = Engine(model, ByteTok(), ServeLimits(max_batch=2))
    try:
        reqs = [GenRequest(prompt_ids=[1, 2, 3], max_tokens=14, temperature=0.0),
                GenRequest(prompt_ids=[4, 5], max_tokens=2, temperature=0.0),
                GenRequest(prompt_ids=[9, 8, 7, 6], max_tokens=5, temperature=0.0, trace=True, record_routing=True)]
        events = run_requests(engine, reqs)
        assert engine.counts["mixed_steps"] >= 1
        joined = reqs[2]
        record = engine.routing_record(joined)
        seq = joined.prompt_ids + joined.generated[:-1]
        with torch.no_grad(), capture_routing(model) as cap:
            model(torch.tensor([seq]))
        for name, idx_1TK in zip(record.layers, record.topk_idx):
            offline_TK = cap.last(name).routing.topk_idx_TK
            assert torch.equal(idx_1TK[0], offline_TK)
            traces = [ev["experts"][name] for ev in events[2] if ev["type"] == "token"]
            assert traces == offline_TK[len(joined.prompt_ids) - 1:].tolist()
    finally:
        engine.stop()


@pytest.mark.parametrize("max_batch", [1, 4])
def test_engine_equals_offline_generate(max_batch):
    model = tiny_lm()
    engine = Engine(model, ByteTok(), ServeLimits(max_batch=max_batch))
    try:
        prompts = [[72, 101, 108], [10, 20, 30, 40, 50, 60], [7], [99, 98]]
        settings = [(0.0, 1.0, None), (0.8, 0.95, 3), (1.0, 1.0, 11), (1.3, 0.5, 5)]
        reqs = [GenRequest(prompt_ids=p, max_tokens=12, temperature=t, top_p=tp, seed=s)
                for p, (t, tp, s) in zip(prompts, settings)]
        events = run_requests(engine, reqs)
        for p, (t, tp, s), r, ev in zip(prompts, settings, reqs, events):
            ref = generate(model, torch.tensor([p]), 12, temperature=t, top_p=tp, seed=s, stop_token=256)
            assert r.generated == ref[0, len(p):].tolist()
            assert ev[-1]["type"] == "done"
            assert "".join(e["text"] for e in ev) == ByteTok().decode(r.generated)
        assert (engine.counts["batched_steps"] > 0) == (max_batch > 1)
        assert engine.counts["packed_prefills"] == (1 if max_batch > 1 else 0)
    finally:
        engine.stop()


def test_engine_queue_is_bounded():
    engine = Engine(tiny_lm(), ByteTok(), ServeLimits(max_batch=1, queue_size=2))  # not started: nothing drains
    engine.submit(GenRequest(prompt_ids=[1], max_tokens=1))
    engine.submit(GenRequest(prompt_ids=[1], max_tokens=1))
    with pytest.raises(QueueFullError, match="queue_size=2"):
        engine.submit(GenRequest(prompt_ids=[1], max_tokens=1))
    assert engine.counts["rejected"] == 1


@pytest.mark.parametrize("fields,message", [
    ({"prompt_ids": []}, "prompt_ids: empty"),
    ({"max_tokens": 0}, "max_tokens=0 must be"),
    ({"prompt_ids": [1] * 60, "max_tokens": 5}, "exceeds the model's context of 64"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_p": 0.0}, "top_p=0.0"),
])
def test_engine_rejects_requests_it_cannot_run(fields, message):
    engine = Engine(tiny_lm(), ByteTok())
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.submit(GenRequest(**{"prompt_ids": [1], "max_tokens": 2, **fields}))
    assert engine.queue_depth == 0


def test_engine_quarantines_an_expert_that_produces_nan():
    model = tiny_lm()
    layer = model.layers[0].mlp
    with torch.no_grad():
        layer.experts.down_proj[2].fill_(float("nan"))
    engine = Engine(model, ByteTok(), ServeLimits(max_batch=4))
    try:
        reqs = [GenRequest(prompt_ids=list(range(30, 40 + 3 * i)), max_tokens=6, temperature=0.0, trace=True)
                for i in range(3)]
        events = run_requests(engine, reqs)
        assert all(ev[-1]["type"] == "done" for ev in events)
        assert engine.quarantined["layers.0.mlp"] == {2}
        assert layer.masked_experts == [2]
        assert engine.counts["quarantine_events"] >= 1 and engine.counts["packed_prefills"] == 1
        for ev in events:
            assert all(2 not in e["experts"]["layers.0.mlp"] for e in ev if e["type"] == "token")
        # Once quarantined, the model is the clean model with expert 2 masked: compare with offline.
        clean = tiny_lm()
        clean.load_state_dict(model.state_dict())
        clean.layers[0].mlp.mask_experts([2])
        for r in reqs:
            ref = generate(clean, torch.tensor([r.prompt_ids]), 6, temperature=0.0, stop_token=256)
            assert r.generated == ref[0, len(r.prompt_ids):].tolist()
    finally:
        engine.stop()


@pytest.mark.parametrize("attention", ["mla", "gpt_oss"])
def test_engine_batches_mla_and_gpt_oss_models(attention):
    """Batched steps past gpt-oss's sliding window (3) with its sinks: offline generate's tokens."""
    model = attention_lm(attention)
    assert can_batch(model)
    engine = Engine(model, ByteTok(), ServeLimits(max_batch=4))
    try:
        reqs = [GenRequest(prompt_ids=[5 + i, 6, 7], max_tokens=6, temperature=0.9, seed=i) for i in range(3)]
        run_requests(engine, reqs)
        for i, r in enumerate(reqs):
            ref = generate(model, torch.tensor([r.prompt_ids]), 6, temperature=0.9, seed=i, stop_token=256)
            assert r.generated == ref[0, 3:].tolist()
        assert engine.counts["batched_steps"] >= 4 and engine.counts["packed_prefills"] == 1
    finally:
        engine.stop()


def test_engine_survives_a_failing_step():
    class BrokenTok(ByteTok):
        def decode(self, ids):
            raise RuntimeError("tokenizer exploded")

    engine = Engine(tiny_lm(), BrokenTok(), ServeLimits(max_batch=2))
    try:
        events = run_requests(engine, [GenRequest(prompt_ids=[1, 2], max_tokens=3)])
        assert events[0][-1] == {"type": "error", "message": "RuntimeError: tokenizer exploded"}
        engine.tokenizer = ByteTok()
        events = run_requests(engine, [GenRequest(prompt_ids=[1, 2], max_tokens=3)])
        assert events[0][-1]["type"] == "done"
    finally:
        engine.stop()


ATTENTION_KINDS = {
    "mla": {"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8},
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 3,
                "rope": {"rope_type": "default", "rope_theta": 10000.0}},
}


def attention_lm(attention: str) -> LM:
    """A tiny LM of one ATTENTION_KINDS kind, seeded; gpt-oss's sinks made nonzero so they matter."""
    torch.manual_seed(0)
    model = tiny_lm(attention=attention, attention_options=ATTENTION_KINDS[attention], n_kv_heads=2)
    if attention == "gpt_oss":
        with torch.no_grad():
            for layer in model.layers:
                layer.self_attn.sinks.normal_()
    return model


@pytest.mark.parametrize("kind", ["list", "pool", "consecutive"])
@pytest.mark.parametrize("attention", sorted(ATTENTION_KINDS))
def test_steps_serve_every_attention_kind_through_lm_forward(attention, kind):
    """The cache protocol carries MLA's latent cache and gpt-oss's sinks and per-layer window:
    packed prefill and batched decode (past the window) equal LM.forward on each whole sequence."""
    model = attention_lm(attention)
    history = torch.randint(0, 257, (1, 4))
    caches = new_caches(model, 3, kind)
    with torch.no_grad():
        model(history, cache=caches[2])
    prompts = [torch.randint(0, 257, (n,)) for n in (5, 1, 3)]
    seqs = [prompts[0].tolist(), prompts[1].tolist(), history[0].tolist() + prompts[2].tolist()]
    logits_BV, _ = prefill_step(model, prompts, caches)
    with torch.no_grad():
        for step in range(4):
            for b, seq in enumerate(seqs):
                torch.testing.assert_close(logits_BV[b], model(torch.tensor([seq]))[0, -1], rtol=1e-4, atol=1e-5)
            tokens_B = torch.tensor([3 + step, 50 + step, 100 + step])
            logits_BV = decode_step(model, tokens_B, caches)
            for b, seq in enumerate(seqs):
                seq.append(int(tokens_B[b]))
    assert [c.length for c in caches] == [len(s) for s in seqs]


@pytest.mark.parametrize("attention", [None, *sorted(ATTENTION_KINDS)])
def test_mixed_step_decodes_rows_and_prefills_prompts_in_one_forward(attention):
    """Rows decode one token each and new prompts prefill in the same forward (one MoE batch): each
    output equals LM.forward on its whole sequence, and every cache continues (a decode step after)."""
    model = tiny_lm(attention_options={"sliding_window": 3}) if attention is None else attention_lm(attention)
    layer = model.layers[0].mlp
    pool = KVPool(model.config.n_layers, 6, model.config.max_seq_len)
    pool.acquire()  # slot 0 unused: rows and slots differ
    histories = [torch.randint(0, 257, (n,)) for n in (4, 1, 6)]
    rows = [pool.acquire() for _ in histories]
    with torch.no_grad():
        for h, c in zip(histories, rows):
            model(h[None], cache=c)
    prompts = [torch.randint(0, 257, (n,)) for n in (5, 1)]
    fresh = [pool.acquire() for _ in prompts]
    tokens_B = torch.tensor([7, 8, 9])
    tokens_before = float(layer.stats.num_tokens)
    logits_NV, trace_rows = mixed_step(model, tokens_B, rows, prompts, fresh)
    assert trace_rows == [0, 1, 2, 7, 8] and logits_NV.shape == (5, 257)
    assert float(layer.stats.num_tokens) - tokens_before == 3 + 6  # one routed batch of every new token
    seqs = [torch.cat([h, tokens_B[b:b + 1]]).tolist() for b, h in enumerate(histories)] + [p.tolist() for p in prompts]
    assert [c.length for c in rows + fresh] == [len(s) for s in seqs]
    with torch.no_grad():
        for n, seq in enumerate(seqs):
            torch.testing.assert_close(logits_NV[n], model(torch.tensor([seq]))[0, -1], rtol=1e-4, atol=1e-5)
    out_BV = decode_step(model, torch.tensor([1, 2, 3, 4, 5]), rows + fresh)
    with torch.no_grad():
        for n, seq in enumerate(seqs):
            ref = model(torch.tensor([seq + [n + 1]]))[0, -1]
            torch.testing.assert_close(out_BV[n], ref, rtol=1e-4, atol=1e-5)


def test_mixed_step_and_forward_groups_reject_bad_input():
    model = tiny_lm(max_seq_len=6)
    pool = KVPool(model.config.n_layers, 3, 6)
    row, fresh = pool.acquire(), pool.acquire()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5]]), cache=row)
    with pytest.raises(ValueError, match="B = 1 >= 1 row caches"):
        mixed_step(model, torch.tensor([1, 2]), [row], [torch.tensor([3])], [fresh])
    with pytest.raises(ValueError, match="got 0 prompts for 1 caches"):
        mixed_step(model, torch.tensor([1]), [row], [], [fresh])
    with pytest.raises(ValueError, match="at least one token"):
        mixed_step(model, torch.tensor([1]), [row], [torch.tensor([], dtype=torch.long)], [fresh])
    with pytest.raises(ValueError, match="exceed max_seq_len=6"):
        mixed_step(model, torch.tensor([1]), [row], [torch.arange(7)], [fresh])
    assert row.length == 5 and fresh.length == 0  # nothing advanced
    with pytest.raises(ValueError, match="at least one"):
        model.forward_groups([], torch.tensor([0]))
    with pytest.raises(ValueError, match=r"non-empty \(B, S\) long tensor"):
        model.forward_groups([(torch.tensor([[1.0]]), KVCache(2))], torch.tensor([0]))


def test_lm_forward_takes_per_row_positions():
    model = tiny_lm(attention_options={"sliding_window": 4})
    ids = torch.randint(0, 257, (3, 7))
    with torch.no_grad():
        ref = model(ids)
        # Rotary scores depend on relative positions only: shifting each row's positions keeps the logits.
        shifted = torch.arange(7)[None] + torch.tensor([[0], [5], [30]])
        torch.testing.assert_close(model(ids, positions=shifted), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(ids, positions=torch.arange(7)), ref, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, logits_at=torch.tensor([6, 2])), ref[:, [6, 2]], rtol=0, atol=0)
        # Positions order the keys: a row given descending positions sees only itself and later tokens.
        reverse = model(ids[:1].flip(1), positions=torch.arange(7).flip(0))
        torch.testing.assert_close(reverse[0, 0], ref[0, -1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pass positions or a cache, not both"):
        model(ids, cache=KVCache(2), positions=torch.arange(7))
    with pytest.raises(ValueError, match=r"positions must be \(B, S\) or \(S,\) long >= 0"):
        model(ids, positions=torch.arange(6))
    with pytest.raises(ValueError, match="65 positions exceed max_seq_len=64"):
        model(ids, positions=torch.arange(7) + 58)


def test_row_caches_read_consecutive_slots_as_one_view():
    model = tiny_lm()
    assert RowCaches(new_caches(model, 3, "consecutive"))._first_slot == 1
    assert RowCaches(new_caches(model, 3, "pool"))._first_slot is None
    assert RowCaches(new_caches(model, 3, "list"))._first_slot is None


def test_nucleus_probs_rows_of_a_batch_equal_each_row_alone():
    torch.manual_seed(0)
    logits_BV = torch.randn(6, 257) * 3
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1e-40, 1.0), (1.3, 1e-61)]:
        probs_BV = nucleus_probs(logits_BV, temperature, top_p)
        for b in range(6):
            assert torch.equal(probs_BV[b:b + 1], nucleus_probs(logits_BV[b:b + 1], temperature, top_p))


def test_nucleus_probs_takes_per_row_temperature_and_top_p():
    torch.manual_seed(0)
    logits_BV = torch.randn(4, 257) * 3
    temperature, top_p = [0.3, 1.0, 1e-40, 1.7], [0.9, 0.5, 0.99, 1e-61]
    probs_BV = nucleus_probs(logits_BV, torch.tensor(temperature, dtype=torch.float64), torch.tensor(top_p))
    for b in range(4):
        assert torch.equal(probs_BV[b:b + 1], nucleus_probs(logits_BV[b:b + 1], temperature[b], top_p[b]))
    with pytest.raises(ValueError, match="top_p: a tensor must hold values below 1 in every row or 1"):
        nucleus_probs(logits_BV, 1.0, torch.tensor([0.9, 1.0, 1.0, 1.0]))


def test_draw_is_torch_multinomial_and_each_row_draws_from_its_own_generator():
    """One generator: the tokens torch.multinomial draws from the same state (seeded answers did not
    change); a generator per row: row b's token is the one it draws alone from generator b."""
    torch.manual_seed(0)
    for B in (1, 5):
        probs_BV = torch.softmax(torch.randn(B, 257, dtype=torch.float64) * 3, dim=-1)
        probs_BV[:, ::5] = 0.0
        for seed in range(20):
            want = torch.multinomial(probs_BV, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
            assert torch.equal(draw(probs_BV, torch.Generator().manual_seed(seed)), want)
            gens = [torch.Generator().manual_seed(seed * 10 + b) for b in range(B)]
            alone = [int(draw(probs_BV[b:b + 1], torch.Generator().manual_seed(seed * 10 + b))[0]) for b in range(B)]
            assert draw(probs_BV, gens).tolist() == alone
    bad_BV = torch.full((3, 4), 0.25, dtype=torch.float64)
    bad_BV[1] = 0.0
    bad_BV[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1, 2\] of the probabilities are not distributions"):
        draw(bad_BV, None)
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        draw(torch.full((3, 4), 0.25), [None, None])


def test_rows_with_penalties_and_logit_bias_draw_in_the_batch_as_they_do_alone():
    """Penalties (values not exact in float32), logit_bias, greedy and sampled rows in one batch: each
    request's tokens equal its run alone (``_sample`` on its own row, which tests/test_serve_openai.py
    checks against a float64 reference) and its logprobs too, up to the rounding by which batched
    logits differ from unbatched ones; the batch drew every row."""
    torch.manual_seed(3)
    model = tiny_lm()
    settings = [dict(temperature=0.0, frequency_penalty=0.3, presence_penalty=0.7),
                dict(temperature=0.9, top_p=0.8, frequency_penalty=1.1, logit_bias={97: 2.3, 98: -0.7}),
                dict(temperature=1.0, presence_penalty=-0.4, logprobs=3),
                dict(temperature=0.0, logit_bias={65: 1.7}, logprobs=2),
                dict(temperature=1.2),
                dict(temperature=0.7, top_p=0.95, frequency_penalty=0.3, presence_penalty=0.7, logprobs=1)]

    def requests():
        return [GenRequest(prompt_ids=[40 + i, 50, 60], max_tokens=10, seed=7 + i, **kw) for i, kw in enumerate(settings)]

    batched = requests()
    engine = Engine(model, ByteTok(), ServeLimits(max_batch=len(batched)))
    drawn = []
    draw_rows = engine._draw

    def spy(reqs, logits_BV):
        tokens, adjusted_BV = draw_rows(reqs, logits_BV)
        drawn.append(tokens)
        return tokens, adjusted_BV

    engine._draw = spy
    try:
        events = run_requests(engine, batched)
    finally:
        engine.stop()
    assert drawn and all(None not in tokens for tokens in drawn)
    for i, req in enumerate(requests()):
        alone = Engine(model, ByteTok(), ServeLimits(max_batch=1))
        try:
            alone_events = run_requests(alone, [req])[0]
        finally:
            alone.stop()
        assert batched[i].generated == req.generated, f"request {i}: {settings[i]}"
        got = [e["logprob"] for e in events[i] if e["type"] == "token"]
        want = [e["logprob"] for e in alone_events if e["type"] == "token"]
        assert (got[0] is None) == (want[0] is None) == (batched[i].logprobs is None)
        for g, w in zip(got, want):
            if w is not None:
                assert [t for t, _ in g["top"]] == [t for t, _ in w["top"]], f"request {i}: top ids"
                values = [(g["logprob"], w["logprob"])] + [(a, b) for (_, a), (_, b) in zip(g["top"], w["top"])]
                assert all(abs(a - b) < 1e-5 for a, b in values), f"request {i}: logprobs {values}"


def test_engine_draws_rows_alike_together_and_each_request_keeps_its_offline_tokens():
    """Greedy rows, two (temperature, top_p) groups and a logit_bias row (sampled on its own) in one
    batch: every seeded request gives ``generate``'s tokens; the biased one its forced token."""
    torch.manual_seed(1)
    model = tiny_lm()
    settings = [(0.0, 1.0), (0.0, 1.0), (0.8, 0.9), (0.8, 0.9), (1.0, 1.0), (0.8, 0.9)]
    reqs = [GenRequest(prompt_ids=[10 + i, 20, 30], max_tokens=8, temperature=t, top_p=p, seed=100 + i)
            for i, (t, p) in enumerate(settings)]
    reqs[-1].logit_bias = {65: 100.0}
    engine = Engine(model, ByteTok(), ServeLimits(max_batch=len(reqs)))
    try:
        run_requests(engine, reqs)
        assert engine.counts["batched_steps"] >= 7
        for i, r in enumerate(reqs[:-1]):
            t, p = settings[i]
            ref = generate(model, torch.tensor([r.prompt_ids]), 8, temperature=t, top_p=p, seed=100 + i,
                           stop_token=256)
            assert r.generated == ref[0, 3:].tolist(), f"request {i} ({t}, {p})"
        assert reqs[-1].generated == [65] * 8
    finally:
        engine.stop()
