"""Weight-only int8 experts (moekit.ops.int8, moekit.experts.int8) against references.

* Quantisation: |W - s q| <= s/2 per element, q in [-127, 127], the largest |W| of a channel at +-127.
* Kernel exactness: the int8 layer equals the float layer built from the dequantised weights s * q
  (to 1e-5 in float32, both the per-block loop and the decode gather path, with capacity drops),
  and a float64 per-row loop over those weights; bfloat16 (whose decode blocks take ATen's
  int8 x bf16 kernel) within bfloat16's tolerance.
* Accuracy against the original float32 weights: a stated bound (INT8_TOL), and converted Hugging
  Face models' logits.
* Save/load, ``moekit convert --quantize int8``, the error cases, and that nothing trains through it.

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from moekit import MoE, moe_config
from moekit.dispatch import plan_token_choice, run_experts
from moekit.ops.int8 import QMAX, dequantize, quantize_per_channel
from moekit.experts import Int8Experts, MLPExperts, SwiGLUExperts, quantize_experts
from moekit.router import Routing

E, K, D, F = 8, 2, 32, 24
# Relative (Frobenius) error of an int8 layer against the float32 weights it was quantised from. The
# rounding error of a weight is uniform in [-s/2, s/2] (rms s/sqrt(12)) with s = amax/127, and a
# Gaussian row of width I has amax ~ sqrt(2 ln I) sigma, so each product is off by about
# sqrt(2 ln I) / (127 sqrt(12)) ~ 0.65% at I = 64; gate, up and down together ~ sqrt(3) times that,
# ~1.1%, as measured on these layers (1.0-1.1%). Converted tiny HF models measure 0.3-0.9% on logits.
INT8_TOL = 2.5e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _experts(kind: str) -> SwiGLUExperts | MLPExperts:
    torch.manual_seed(0)
    return SwiGLUExperts(E, D, F, "silu") if kind == "swiglu" else MLPExperts(E, D, F, kind)


def _plan(T: int, capacity_factor: float | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=gen) * 2
    scores_TE = logits_TE.softmax(-1)
    w_TK, idx_TK = scores_TE.topk(K, dim=-1)
    routing = Routing(logits_TE=logits_TE, scores_TE=scores_TE, topk_idx_TK=idx_TK, topk_weight_TK=w_TK)
    return plan_token_choice(routing, E, capacity_factor, "probability")


def _row_reference(x_TD: torch.Tensor, experts: SwiGLUExperts | MLPExperts, plan) -> torch.Tensor:
    """float64, one kept (token, expert) row at a time: sum_r w_r expert_e(x_t)."""
    ref = copy.deepcopy(experts).double()
    out = torch.zeros(x_TD.shape, dtype=torch.float64)
    e_R = torch.repeat_interleave(torch.arange(E), plan.counts_E)
    for t, e, w in zip(plan.token_idx_R.tolist(), e_R.tolist(), plan.weight_R.tolist()):
        out[t] += w * ref.expert_forward(e, x_TD[t:t + 1].double())[0]
    return out


def test_quantisation_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 17, generator=gen) * torch.logspace(-3, 1, 40).view(1, 40, 1)
    w[1, 5] = 0  # an all-zero channel
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3, 40)
    assert int(q.abs().max()) <= QMAX and int(q[1, 5].abs().max()) == 0 and float(s[1, 5]) == 1.0
    err = (w.double() - dequantize(q, s, torch.float64)).abs()
    assert bool((err <= s.double().unsqueeze(-1) / 2 * (1 + 1e-6)).all()), float((err / s.unsqueeze(-1)).max())
    nonzero = torch.ones(3, 40, dtype=torch.bool)
    nonzero[1, 5] = False
    assert bool((q.abs().amax(-1)[nonzero] == QMAX).all())  # each channel's largest weight uses the full range


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("T,capacity_factor", [(100, None), (100, 0.75), (1, None), (3, None)])
def test_kernel_equals_dequantised_float_layer(kind: str, T: int, capacity_factor: float | None) -> None:
    """T=1 and 3 take the gather path (2*T*K <= E), T=100 the per-block loop (with drops at 0.75)."""
    experts = _experts(kind)
    q8 = Int8Experts.from_float(experts).eval()
    deq = q8.to_float()
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    plan = _plan(T, capacity_factor)
    with torch.no_grad():
        out = run_experts(x_TD, plan, q8)
        fused = run_experts(x_TD, plan, deq)
        reference = run_experts(x_TD, plan, _with_backend(q8, "reference"))
    want = _row_reference(x_TD, deq, plan)
    assert out.dtype == torch.float32
    assert rel(out, want) < 1e-6 and rel(fused, want) < 1e-6
    assert (out - fused).abs().max() <= 1e-5 * fused.abs().max()
    assert rel(reference, want) < 1e-6


def _with_backend(experts: Int8Experts, backend: str) -> Int8Experts:
    other = copy.deepcopy(experts)
    other.backend = backend
    return other


@pytest.mark.parametrize("T", [1, 2, 40])
def test_bfloat16_against_float64(T: int) -> None:
    """bf16 activations: decode rows go through torch._weight_int8pack_mm, larger blocks through the
    converted block; both within bfloat16's tolerance of the float64 reference."""
    q8 = Int8Experts.from_float(_experts("swiglu"))
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    plan = _plan(T)
    with torch.no_grad():
        out = run_experts(x_TD.bfloat16(), plan, q8)
    assert out.dtype == torch.bfloat16
    assert rel(out, _row_reference(x_TD.bfloat16().float(), q8.to_float(), plan)) < 2e-2


@pytest.mark.parametrize("kind,activation", [("swiglu", "silu"), ("mlp", "gelu")])
def test_layer_against_original_float32(kind: str, activation: str) -> None:
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=64, num_experts=8, expert_hidden=48, top_k=2, activation=activation,
                           expert_kind=kind)).eval()
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        ref = layer(x)
        assert quantize_experts(layer) == ["experts"]
        out = layer(x)
        one = layer(x[:1, :1])  # decode-sized: the gather path
        ref_one = ref[:1, :1]
    assert isinstance(layer.experts, Int8Experts) and layer.experts.gated == (kind == "swiglu")
    assert 0 < rel(out, ref) < INT8_TOL
    assert rel(one, ref_one) < INT8_TOL


def test_inference_only() -> None:
    q8 = Int8Experts.from_float(_experts("swiglu"))
    for T in (1, 50):  # gather path, loop path
        x = torch.randn(T, D, requires_grad=True)
        out = run_experts(x, _plan(T), q8)
        with pytest.raises(RuntimeError, match="inference-only"):
            out.sum().backward()
    x = torch.randn(50, D, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        run_experts(x, _plan(50), _with_backend(q8, "reference")).sum().backward()
    assert not list(q8.parameters())  # nothing for an optimizer to update


def test_errors() -> None:
    layer = MoE(moe_config(dim=16, num_experts=4, expert_hidden=8, top_k=2))
    with pytest.raises(ValueError, match=re.escape("quantize='int4' is not one of ['int8']")):
        quantize_experts(copy.deepcopy(layer), "int4")
    bad = copy.deepcopy(layer)
    with torch.no_grad():
        bad.experts.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"experts\.down_proj: expert\(s\) \[2\] hold NaN/Inf"):
        quantize_experts(bad)
    assert isinstance(bad.experts, SwiGLUExperts)  # refused before anything changed
    quantize_experts(layer)
    with pytest.raises(ValueError, match=r"nothing to quantise.*already int8: \['experts'\]"):
        quantize_experts(layer)
    with pytest.raises(ValueError, match="no stacked experts"):
        quantize_experts(torch.nn.Linear(2, 2))
    modules = MoE(moe_config(dim=16, num_experts=2, expert_hidden=8, top_k=1),
                  experts=[torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)])
    with pytest.raises(ValueError, match=r"stacked SwiGLU/MLP experts only; \['experts \(ModuleExperts\)'\]"):
        quantize_experts(modules)


# ------------------------------------------------------------------------- converted Hugging Face models
transformers = pytest.importorskip("transformers")
from moekit.cli import main as cli_main  # noqa: E402
from moekit.hf import CheckpointError, from_hf, load_moekit, save_moekit  # noqa: E402
from moekit.hf.convert import CONVERTIBLE, lm_tensors  # noqa: E402
from moekit.hf.testing import tiny_hf_model  # noqa: E402
from moekit.lm import generate  # noqa: E402

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
STACKED_FAMILIES = [f for f in CONVERTIBLE if f != "gpt_oss"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for family in CONVERTIBLE:
        folder = tmp_path_factory.mktemp(family)
        tiny_hf_model(family).save_pretrained(folder)
        out[family] = folder
    return out


@pytest.mark.parametrize("family", STACKED_FAMILIES)
def test_converted_logits_delta(family: str, saved) -> None:
    model = from_hf(saved[family])
    with torch.no_grad():
        ref = model(IDS)
        names = quantize_experts(model)
        out = model(IDS)
    assert names and all(isinstance(model.get_submodule(n), Int8Experts) for n in names)
    assert 0 < rel(out, ref) < INT8_TOL, rel(out, ref)


def test_gpt_oss_is_refused(saved) -> None:
    model = from_hf(saved["gpt_oss"])
    with pytest.raises(ValueError, match=r"\(ClampedSwiGLUExperts\).*have no int8 path"):
        quantize_experts(model)


def test_save_load_round_trip(saved, tmp_path: Path) -> None:
    from safetensors import safe_open

    model = from_hf(saved["qwen3_moe"])
    quantize_experts(model)
    save_moekit(model, tmp_path / "q8")
    with safe_open(tmp_path / "q8" / "model.safetensors", "pt") as handle:
        assert handle.metadata()["moekit.quantize"] == "int8"
        name = next(k for k in handle.keys() if k.endswith("experts.gate_up_proj"))
        assert handle.get_tensor(name).dtype == torch.int8
        assert handle.get_tensor(name + "_scale").dtype == torch.float32
    back = load_moekit(tmp_path / "q8")
    a, b = lm_tensors(model), lm_tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(back(IDS), model(IDS))
    assert torch.equal(generate(back, IDS, 5), generate(model, IDS, 5))


def test_convert_cli(saved, tmp_path: Path, capsys) -> None:
    folder = saved["mixtral"]
    assert cli_main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "q8"), "--quantize", "int8"]) == 0
    model = load_moekit(tmp_path / "q8")
    assert all(isinstance(layer.mlp.experts, Int8Experts) for layer in model.layers)
    float_model = from_hf(folder)
    float_size = (sum(t.numel() * t.element_size() for t in lm_tensors(float_model).values()))
    assert (tmp_path / "q8" / "model.safetensors").stat().st_size < float_size
    with torch.no_grad():
        assert rel(model(IDS), float_model(IDS)) < INT8_TOL
    capsys.readouterr()
    assert cli_main(["convert", "--to-hf", str(tmp_path / "q8"), "--out", str(tmp_path / "hf")]) != 0
    assert "holds int8 experts" in capsys.readouterr().err
    assert cli_main(["convert", "--from-hf", str(saved["gpt_oss"]), "--out", str(tmp_path / "g"),
                     "--quantize", "int8"]) != 0
    assert "ClampedSwiGLUExperts" in capsys.readouterr().err


def test_unknown_scheme_in_file_is_a_checkpoint_error(saved, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = from_hf(saved["olmoe"])
    quantize_experts(model)
    save_moekit(model, tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    save_file(load_file(path), str(path), metadata={"format": "pt", "moekit.quantize": "int3"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: quantize='int3' is not one of"):
        load_moekit(tmp_path / "q")


def test_served_int8_folder_matches_generate(tmp_path: Path) -> None:
    """``moekit serve`` loads an int8 folder as it is; its batched decode (several requests in one
    step) gives the tokens single-sequence ``generate`` gives with the same int8 model."""
    import threading

    from moekit.hf.convert import convert_folder
    from moekit.hf.testing import tiny_tokenizer
    from moekit.serve.engine import GenRequest, ServeLimits
    from moekit.serve.server import load_engine

    hf_dir = tmp_path / "hf"
    tiny_hf_model("qwen3_moe", vocab_size=320).save_pretrained(hf_dir)
    tiny_tokenizer(hf_dir, vocab_size=320)
    convert_folder(hf_dir, tmp_path / "q8", quantize="int8")
    engine = load_engine(tmp_path / "q8", ServeLimits(max_batch=4))
    assert all(isinstance(layer.mlp.experts, Int8Experts) for layer in engine.model.layers)
    prompts = [engine.tokenizer.encode(p) for p in ("The quick brown fox", "Le café est très", "日本語の")]
    reqs = [GenRequest(prompt_ids=p, max_tokens=6, temperature=0.0) for p in prompts]
    done = [threading.Event() for _ in reqs]
    for r, d in zip(reqs, done):
        r.on_event = lambda ev, d=d: d.set() if ev["type"] in ("done", "error") else None
        engine.submit(r)
    engine.start()
    try:
        assert all(d.wait(120) for d in done)
    finally:
        engine.stop()
    model = load_moekit(tmp_path / "q8")
    for p, r in zip(prompts, reqs):
        want = generate(model, torch.tensor([p]), 6)[0, len(p):].tolist()
        assert r.generated == want[:len(r.generated)] and len(r.generated) >= 1
