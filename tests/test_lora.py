"""LoRA on stacked experts, routers and attention (moekit.adapters.lora).

A fresh adapter (B = 0) leaves the model bit for bit; merged equals unmerged; gradients of A and B
match a float64 reference that builds W + s B A expert by expert and runs the per-token reference
layer; parameter counts follow the shapes; adapter files round-trip and refuse other bases.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from moekit import MoE
from moekit.adapters import (LoraConfig, apply_lora, count_lora_parameters, load_adapter, lora_modules,
                             merge_lora, remove_lora, save_adapter, unmerge_lora)
from moekit.config import ConfigError, moe_config
from moekit.errors import CheckpointError
from moekit.lm import LM, LMConfig
from moekit.reference import reference_forward

D, E, F, K, V = 16, 4, 12, 2, 257


def tiny_lm(seed: int = 0, **moe) -> LM:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=V, dim=D, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=16,
                   moe=moe_config(dim=D, num_experts=E, expert_hidden=F, top_k=K, **moe))
    return LM(cfg).eval()


def randomize_b(model: nn.Module, std: float = 0.2, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lora in lora_modules(model):
            lora.B.copy_(torch.randn(lora.B.shape, generator=gen, dtype=torch.float64) * std)


IDS = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
FULL = LoraConfig(rank=4, router=True, attention=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.mark.parametrize("cfg", [FULL, LoraConfig(rank=3, expert_mode="shared"), LoraConfig(rank=2, expert_ids=[1, 3])])
def test_zero_b_equals_base_exactly_on_the_fused_path(cfg, monkeypatch):
    from moekit.dispatch import run

    model = tiny_lm()
    base = model(IDS)
    apply_lora(model, cfg)
    calls = []
    fused = run.fused_experts
    monkeypatch.setattr(run, "fused_experts", lambda *a, **k: calls.append(1) or fused(*a, **k))
    assert torch.equal(model(IDS), base)
    assert len(calls) == 2, "the adapted experts left the fused path"
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in vars(model.layers[0].mlp.experts)), \
        "a shadowed weight outlived the forward"


def test_merged_equals_unmerged_and_unmerge_restores():
    model = tiny_lm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, FULL)
    randomize_b(model)
    unmerged = model(IDS)
    assert (unmerged - tiny_lm()(IDS)).abs().max() > 1e-2, "the adapters changed nothing"
    assert merge_lora(model) == 2 * 3 + 2 * 4
    merged = model(IDS)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(IDS), unmerged, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)
    remove_lora(model, merge=True)
    assert count_lora_parameters(model) == 0 and not hasattr(model, "lora_config")
    assert not any(h for m in model.modules() for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()))
    assert set(n for n, _ in model.named_parameters()) == set(before)
    torch.testing.assert_close(model(IDS), unmerged, rtol=0, atol=1e-5)


def test_only_chosen_experts_move():
    model = tiny_lm()
    w = model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    apply_lora(model, LoraConfig(rank=2, expert_ids={"layers.0.mlp": [2]}))
    randomize_b(model)
    assert [n for n, _ in lora_modules(model)] == ["layers.0.mlp.lora.gate_up_proj", "layers.0.mlp.lora.down_proj"]
    merge_lora(model)
    after = model.layers[0].mlp.experts.gate_up_proj
    others = [0, 1, 3]
    assert torch.equal(after[others], w[others])
    assert not torch.allclose(after[2], w[2])
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp has no experts \[7\]"):
        apply_lora(tiny_lm(), LoraConfig(expert_ids=[1, 7]))
    with pytest.raises(ConfigError, match=r"\['layers\.5\.mlp'\], which are not MoE layers"):
        apply_lora(tiny_lm(), LoraConfig(expert_ids={"layers.5.mlp": [0]}))


def _ref_effective(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, ids: list[int] | None,
                   shared: bool) -> torch.Tensor:
    """W + s B A expert by expert (float64, a plain loop)."""
    if w.dim() == 2:
        return w + s * B @ A
    rows = []
    chosen = list(range(w.shape[0])) if ids is None else ids
    for e in range(w.shape[0]):
        if e not in chosen:
            rows.append(w[e])
            continue
        j = chosen.index(e)
        a, b = (A, B) if shared else (A[j], B[j])
        rows.append(w[e] + s * b @ a)
    return torch.stack(rows)


class _Reference(nn.Module):
    def __init__(self, layer: MoE) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_forward(self.layer, x)


@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
@pytest.mark.parametrize("mode, ids", [("per_expert", None), ("shared", None), ("per_expert", [0, 3]),
                                       ("shared", [1])])
def test_gradients_match_float64_reference(kind, mode, ids):
    torch.manual_seed(0)
    layer = MoE(dim=D, num_experts=E, expert_hidden=F, top_k=K, expert_kind=kind,
                activation="silu" if kind == "swiglu" else "gelu")
    base64 = copy.deepcopy(layer).double()
    cfg = LoraConfig(rank=3, alpha=6.0, expert_mode=mode, expert_ids=ids, router=True)
    apply_lora(layer, cfg)
    randomize_b(layer)
    layer.train()
    x = torch.randn(37, D)
    g = torch.randn(37, D)
    (layer(x) * g).sum().backward()

    leaves = {name: (lora.A.detach().double().requires_grad_(), lora.B.detach().double().requires_grad_())
              for name, lora in lora_modules(layer)}
    swapped = {}
    for name, lora in lora_modules(layer):
        key = name.split(".")[-1]
        A, B = leaves[name]
        w = base64.get_parameter(lora.target)
        swapped[f"layer.{lora.target}"] = _ref_effective(w, A, B, cfg.scale, ids, mode == "shared" or w.dim() == 2)
        assert key in ("gate_up_proj", "up_proj", "down_proj", "router")
    base64.train()
    out = torch.func.functional_call(_Reference(base64), swapped, (x.double(),))
    (out * g.double()).sum().backward()
    for name, lora in lora_modules(layer):
        A, B = leaves[name]
        torch.testing.assert_close(lora.A.grad.double(), A.grad, rtol=1e-4, atol=1e-5, msg=f"{name}.A")
        torch.testing.assert_close(lora.B.grad.double(), B.grad, rtol=1e-4, atol=1e-5, msg=f"{name}.B")
        assert B.grad.abs().max() > 0
    assert all(p.grad is None for n, p in layer.named_parameters() if ".lora." not in f".{n}")


def test_trainable_parameter_count():
    r = 4
    model = tiny_lm()
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, FULL)
    H = 2 * (D // 2)  # q/k/v/o are D x D here (2 heads of 8)
    per_layer = (E * r * (D + 2 * F)) + (E * r * (F + D)) + r * (D + E) + 4 * r * (D + H)
    assert count_lora_parameters(model) == 2 * per_layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer
    assert sum(p.numel() for p in model.parameters()) == total + 2 * per_layer

    for cfg, expected in [(LoraConfig(rank=r, expert_mode="shared"), 2 * (r * (D + 2 * F) + r * (F + D))),
                          (LoraConfig(rank=r, expert_ids=[0, 2]), 2 * 2 * (r * (D + 2 * F) + r * (F + D))),
                          (LoraConfig(rank=r, experts=False, router=True), 2 * r * (D + E))]:
        assert count_lora_parameters(apply_lora(tiny_lm(), cfg)) == expected, cfg


def test_adapter_file_round_trip_and_mismatch(tmp_path):
    model = tiny_lm()
    apply_lora(model, FULL)
    randomize_b(model)
    want = model(IDS)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]
    assert path.stat().st_size < 4 * count_lora_parameters(model) + 8192, "the file holds more than the adapters"

    fresh = tiny_lm()
    load_adapter(fresh, path)
    assert count_lora_parameters(fresh) == count_lora_parameters(model)
    torch.testing.assert_close(fresh(IDS), want, rtol=0, atol=0)
    plain = load_adapter(tiny_lm(), path, merge=True)
    assert count_lora_parameters(plain) == 0
    torch.testing.assert_close(plain(IDS), want, rtol=0, atol=1e-5)

    torch.manual_seed(0)
    other = LM(LMConfig(vocab_size=V, dim=D, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=16,
                        moe=moe_config(dim=D, num_experts=E, expert_hidden=2 * F, top_k=K)))
    with pytest.raises(CheckpointError, match=re.escape("tensor 'layers.0.mlp.experts.gate_up_proj' has shape "
                                                        "(4, 48, 16) in the model but the adapter was trained on "
                                                        "(4, 24, 16)")):
        load_adapter(other, path)
    assert count_lora_parameters(other) == 0, "a refused adapter must leave the model as it was"
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors is not a safetensors file"):
        load_adapter(tiny_lm(), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, FULL)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"lora\.rank=0 must be an int >= 1"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match=r"lora\.expert_mode='tied' is not one of"):
        LoraConfig(expert_mode="tied")
    with pytest.raises(ConfigError, match=r"no nn\.Linear named \['qkv'\]"):
        apply_lora(tiny_lm(), LoraConfig(attention=["qkv"]))
    assert LoraConfig.from_dict(FULL.to_dict()) == FULL


def test_training_moves_only_adapters():
    model = tiny_lm().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, FULL)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert all(lora.B.abs().max() > 0 for _, lora in lora_modules(model))


HF_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_lora_on_converted_hf_family(family, tmp_path):
    pytest.importorskip("transformers", reason="converting HF models needs transformers (the hf extra)")
    from moekit.hf import from_hf
    from moekit.hf.testing import tiny_hf_model

    tiny_hf_model(family).save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    base = model(ids)
    attention = ["q_proj", "o_proj"] if family not in ("deepseek_v2", "deepseek_v3") else ["o_proj"]
    apply_lora(model, LoraConfig(rank=2, router=True, attention=attention))
    torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    randomize_b(model, std=0.05)
    adapted = model(ids)
    assert (adapted - base).abs().max() > 1e-4
    save_adapter(model, tmp_path / "a.safetensors")
    merged = load_adapter(from_hf(tmp_path / "hf").eval(), tmp_path / "a.safetensors", merge=True)
    torch.testing.assert_close(merged(ids), adapted, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A trained 2-step MoE run on a tiny labelled corpus."""
    import json

    from moekit.train import TrainConfig, Trainer
    from moekit.train.trainer import prepare_data

    root = tmp_path_factory.mktemp("lora")
    corpus = root / "data" / "tiny"
    corpus.mkdir(parents=True)
    texts = {"en": "the cat sat on the mat. ", "de": "der Hund lief über die Straße. "}
    rows = [{"text": t * (3 + i % 4), "label": label, "split": "val" if i % 5 == 0 else "train"}
            for label, t in texts.items() for i in range(20)]
    (corpus / "documents.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    (corpus / "report.json").write_text(json.dumps({"labels": sorted(texts)}))
    cfg = TrainConfig(model=tiny_lm().config, corpus="tiny", data_dir=str(root / "data"), seq_len=16, batch_size=4,
                      steps=2, warmup_steps=1, eval_every=100, eval_tokens=128, out_dir=str(root / "run"),
                      progress=False, tensorboard=False)
    Trainer(cfg, prepare_data(cfg)).fit()
    return root / "run"


@pytest.mark.usefixtures("one_thread")
def test_recipe_lora_on_a_run_then_serve_adapter(moe_run, tmp_path, capsys):
    from moekit.cli import main
    from moekit.serve.server import load_engine
    from moekit.train.trainer import load_trained

    out = tmp_path / "lora"
    assert main(["recipe", "lora", str(moe_run), "--out", str(out), "--steps", "3", "--rank", "2", "--router",
                 "--attention", "q_proj,v_proj", "--experts", "0:1,2", "--lr", "0.01", "--labels", "en"]) == 0
    printed = capsys.readouterr().out
    assert "adapter parameters" in printed and "--adapter" in printed
    adapter = out / "adapter.safetensors"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["adapter.safetensors"]
    base, _, _ = load_trained(moe_run)
    adapted = load_adapter(load_trained(moe_run)[0], adapter)
    names = [n for n, _ in lora_modules(adapted)]
    assert "layers.0.mlp.lora.gate_up_proj" in names and "layers.1.mlp.lora.gate_up_proj" not in names
    assert "layers.1.mlp.lora.router" in names and "layers.1.self_attn.v_proj.lora" in names
    engine = load_engine(moe_run, adapter=adapter)
    assert count_lora_parameters(engine.model) == 0
    with torch.no_grad():
        want = adapted(IDS)
        torch.testing.assert_close(engine.model(IDS), want, rtol=0, atol=1e-5)
        assert (base(IDS) - want).abs().max() > 1e-5, "three steps of LoRA moved nothing"

    assert main(["recipe", "lora", str(moe_run), "--out", str(tmp_path / "x"), "--experts", "9"]) == 2
    assert "has no experts [9]" in capsys.readouterr().err
    assert main(["recipe", "lora", str(moe_run), "--out", str(tmp_path / "x"), "--text", "f.txt"]) == 2
    assert "--text is for model folders" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_recipe_lora_on_a_converted_hf_folder(tmp_path, capsys):
    pytest.importorskip("transformers", reason="converting HF models needs transformers (the hf extra)")
    from moekit.cli import main
    from moekit.hf.convert import convert_folder
    from moekit.hf.testing import TINY_TOKENIZER_TEXT, tiny_hf_model, tiny_tokenizer
    from moekit.serve.server import load_engine

    tiny_hf_model("qwen3_moe", vocab_size=320).save_pretrained(tmp_path / "hf")
    tiny_tokenizer(tmp_path / "hf", vocab_size=320)
    convert_folder(tmp_path / "hf", tmp_path / "conv")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(TINY_TOKENIZER_TEXT * 12), encoding="utf-8")
    out = tmp_path / "lora"
    assert main(["recipe", "lora", str(tmp_path / "conv"), "--text", str(text), "--out", str(out), "--steps", "2",
                 "--seq-len", "16", "--batch-size", "2", "--shared", "--router"]) == 0
    assert "adapter saved" in capsys.readouterr().out
    engine = load_engine(tmp_path / "conv", adapter=out / "adapter.safetensors")
    assert count_lora_parameters(engine.model) == 0
    assert main(["recipe", "lora", str(tmp_path / "conv"), "--out", str(out)]) == 2
    assert "name the training text with --text FILE" in capsys.readouterr().err


def test_attention_adapter_gradients_match_float64():
    """The additive form on a projection: gradients of A and B against y = x (W + s B A)^T in float64."""
    model = tiny_lm().train()
    apply_lora(model, LoraConfig(rank=3, alpha=3.0, experts=False, attention=["v_proj"]))
    randomize_b(model)
    proj = model.layers[1].self_attn.v_proj
    x = torch.randn(2, 5, D)
    g = torch.randn(2, 5, proj.out_features)
    (proj(x) * g).sum().backward()
    A = proj.lora.A.detach().double().requires_grad_()
    B = proj.lora.B.detach().double().requires_grad_()
    w = proj.weight.detach().double() + 1.0 * B @ A
    y = x.double() @ w.t() + proj.bias.detach().double() if proj.bias is not None else x.double() @ w.t()
    (y * g.double()).sum().backward()
    torch.testing.assert_close(proj.lora.A.grad.double(), A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(proj.lora.B.grad.double(), B.grad, rtol=1e-4, atol=1e-5)
    assert proj.weight.grad is None
