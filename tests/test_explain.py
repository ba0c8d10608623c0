import contextlib
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from moekit import moe_config
from moekit.data.tokenizer import ByteTokenizer
from moekit.dispatch.run import stage
from moekit.explain import (explain_text, format_latency, label_affinity, latency_breakdown, per_expert_loss, render_html,
                            render_terminal, routing_change, weight_drift)
from moekit.explain.tokens import RGB, character_cells, token_pieces
from moekit.lm import LM, LMConfig
from moekit.train.trainer import Batch

from capture_util import captured


pytestmark = pytest.mark.usefixtures("one_thread")


def lm(seed=0, **kw) -> LM:
    torch.manual_seed(seed)
    moe = moe_config(dim=16, num_experts=4, expert_hidden=12, top_k=2, **kw)
    return LM(LMConfig(vocab_size=257, dim=16, n_layers=3, n_heads=2, ffn_hidden=24, max_seq_len=32, moe=moe,
                       moe_layers=[0, 2])).eval()


def batches(n=2, seed=0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        toks = torch.randint(0, 257, (2, 13), generator=g)
        out.append(Batch(toks[:, :-1], toks[:, 1:], torch.zeros(2, 12, dtype=torch.long)))
    return out


def test_explain_names_each_tokens_experts_and_weights():
    model = lm()
    tok = ByteTokenizer()
    expl = explain_text(model, tok, "héllo")
    assert expl.tokens == ["h", "", "é", "l", "l", "o"]
    assert expl.layers == ["layers.0.mlp", "layers.2.mlp"]
    r = captured(model, torch.tensor([tok.encode("héllo")]))[1].last("layers.2.mlp").routing
    for t in range(6):
        got = dict(zip(expl.experts[1][t], expl.weights[1][t]))
        want = dict(zip(r.topk_idx_TK[t].tolist(), r.topk_weight_TK[t].tolist()))
        assert got == pytest.approx(want)
        assert expl.weights[1][t][0] >= expl.weights[1][t][1]
    text = render_terminal(expl, color=True)
    first = expl.experts[0][0][0]
    assert re.search(rf"\x1b\[38;5;\d+me{first}:{expl.weights[0][0][0]:.2f}\x1b\[0m", text.splitlines()[1])
    plain = render_terminal(expl, color=False)
    assert "\x1b" not in plain and f"e{first}:" in plain.splitlines()[1]
    page = render_html(expl)
    # One cell per character: "é" is two byte tokens in one cell.
    assert page.startswith("<!doctype html>") and page.count("class='tok'") == 2 * 5
    assert f"expert {first}: {expl.weights[0][0][0]:.3f}" in page


def test_multibyte_characters_share_one_cell_with_each_bytes_experts():
    model = lm()
    tok = ByteTokenizer()
    expl = explain_text(model, tok, "a日本")
    assert len(expl.tokens) == 7
    assert expl.cells() == [("a", [0]), ("日", [1, 2, 3]), ("本", [4, 5, 6])]
    assert character_cells(["x", "", ""]) == [("x", [0]), ("\ufffd", [1, 2])]
    plain = render_terminal(expl, color=False).splitlines()
    assert len(plain) == 1 + 3
    row = plain[2]
    assert row.startswith("日 (3 tokens)")
    # Each layer's cell lists the three bytes' experts, separated by " / ", in byte order.
    for l in range(2):
        want = " / ".join(" ".join(f"e{e}:{w:.2f}" for e, w in zip(expl.experts[l][t], expl.weights[l][t]))
                          for t in (1, 2, 3))
        assert want in row
    page = render_html(expl)
    assert page.count("class='tok'") == 2 * 3 and ">日</span>" in page and ">本</span>" in page
    tip = "; ".join(f"token {expl.token_ids[t]}: " + ", ".join(
        f"expert {e}: {w:.3f}" for e, w in zip(expl.experts[0][t], expl.weights[0][t])) for t in (1, 2, 3))
    assert f"title='{tip}'" in page
    # The stripes: one per byte, in its top-1 expert's colour.
    for t in (1, 2, 3):
        assert RGB[expl.experts[0][t][0] % len(RGB)] in page
    assert "<td>1-3</td><td>&#x27;日&#x27;</td><td>230 151 165</td>" in page


def test_label_affinity_shares_and_rendering():
    counts = {"layers.0.mlp": [[6, 0, 1], [2, 0, 3]]}
    aff = label_affinity(counts, ["de", "fr"])
    rows = aff["layers.0.mlp"]
    assert rows[0]["labels"] == [("de", 0.75), ("fr", 0.25)]
    assert rows[1]["labels"] == [] and rows[1]["tokens"] == 0
    assert rows[2]["labels"][0] == ("fr", 0.75)
    expl = explain_text(lm(), ByteTokenizer(), "ab")
    expl.affinity = aff
    assert "de 75%" in render_terminal(expl, color=False)
    assert "de 75%" in render_html(expl)


def test_token_pieces_rebuild_the_text():
    tok = ByteTokenizer()
    text = "日本 ok\n"
    assert "".join(token_pieces(tok, tok.encode(text))) == text


def test_stability_is_zero_for_identical_models_and_drift_names_changed_experts():
    a = lm()
    b = copy.deepcopy(a)
    ids = [x.input_ids for x in batches()]
    same = routing_change(a, b, ids)
    assert all(v["top1_changed"] == 0 and v["topk_jaccard"] == 1 for v in same.values())
    assert all(d == [0.0] * 4 for d in weight_drift(a, b).values())
    with torch.no_grad():
        b.layers[0].mlp.experts.down_proj[2] *= 1.5
        b.layers[0].mlp.router.weight.copy_(torch.randn_like(b.layers[0].mlp.router.weight))
    drift = weight_drift(a, b)["layers.0.mlp"]
    d = a.layers[0].mlp.experts.requires_grad_(False)
    expected = math.sqrt(0.25 * float(d.down_proj[2].double().square().sum())
                         / float(d.down_proj[2].double().square().sum() + d.gate_up_proj[2].double().square().sum()))
    assert drift[2] == pytest.approx(expected) and drift[0] == 0
    changed = routing_change(a, b, ids)
    assert changed["layers.0.mlp"]["top1_changed"] > 0.2
    # against a recount by hand
    ra = captured(a, ids[0])[1].last("layers.0.mlp").routing
    rb = captured(b, ids[0])[1].last("layers.0.mlp").routing
    top1 = lambda r: r.topk_idx_TK.gather(1, r.topk_weight_TK.argmax(1, keepdim=True)).squeeze(1)
    first = float((top1(ra) != top1(rb)).double().mean())
    assert routing_change(a, b, ids[:1])["layers.0.mlp"]["top1_changed"] == pytest.approx(first)


def test_per_expert_loss_matches_a_recount():
    model = lm()
    bs = batches(1)
    result = per_expert_loss(model, bs)["layers.2.mlp"]
    with torch.no_grad():
        logits, cap = captured(model, bs[0].input_ids)
    nll = F.cross_entropy(logits.reshape(-1, 257), bs[0].targets.reshape(-1), reduction="none").double()
    r = cap.last("layers.2.mlp").routing
    top1 = r.topk_idx_TK.gather(1, r.topk_weight_TK.argmax(1, keepdim=True)).squeeze(1)
    for e in range(4):
        sel = top1 == e
        if sel.any():
            assert result["top1_loss"][e] == pytest.approx(float(nll[sel].mean()))
            assert result["top1_tokens"][e] == int(sel.sum())
        else:
            assert math.isnan(result["top1_loss"][e])
        w = (r.topk_weight_TK.double() * (r.topk_idx_TK == e)).sum(1)
        if w.sum() > 0:
            assert result["weighted_loss"][e] == pytest.approx(float((w * nll).sum() / w.sum()))


@pytest.mark.parametrize("kw", [{}, {"shared_experts": 1}, {"capacity_factor": 1.0}, {"backend": "reference"}])
def test_moe_forward_marks_its_stages_only_under_a_profiler(kw):
    """The layer's one forward path opens moe.<stage> ranges while a profiler runs (the plain
    composition all four; a fused path has its combine inside experts) and none otherwise."""
    layer = lm(**kw).layers[0].mlp
    layer.mask_experts([1])
    x = torch.randn(3, 5, 16)
    assert isinstance(stage("router"), contextlib.nullcontext)
    ref = layer(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = layer(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    names = {e.name for e in prof.events() if e.name.startswith("moe.")}
    fused = kw.get("backend") != "reference"
    assert names == {"moe.router", "moe.dispatch", "moe.experts"} | (set() if fused else {"moe.combine"})


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_latency_breakdown_reports_every_stage(backend):
    model = lm(backend=backend)
    result = latency_breakdown(model, batches(1)[0].input_ids, repeats=2)
    kinds = [row["kind"] for row in result["blocks"]]
    assert kinds == ["moe", "dense", "moe"]
    stages = ("router", "dispatch", "experts") + (("combine",) if backend == "reference" else ())
    for row in result["blocks"]:
        assert row["attention_ms"] > 0 and row["ffn_ms"] > 0
        if row["kind"] == "moe":
            assert all(row[f"{s}_ms"] > 0 for s in stages)
            assert ("combine_ms" in row) == (backend == "reference")
    assert "router_ms" not in result["blocks"][1]
    assert result["total_ms"] > 0
    assert "router ms" in format_latency(result)
