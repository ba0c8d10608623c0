"""Int8 stacked experts and the transform that makes them: ``quantize_experts(model, "int8")``.

Shape legend: E experts, D model dim, F expert hidden, U first-product width (2F gated, F plain),
R rows grouped by expert, N one expert's rows.

Quantisation is applied to a plain float model after loading, as gpt-fast does: every
``SwiGLUExperts`` / ``MLPExperts`` is replaced by an ``Int8Experts`` holding int8 buffers under the
same names (``gate_up_proj`` (E, 2F, D) or ``up_proj`` (E, F, D), ``down_proj`` (E, D, F)) plus
float32 per-output-channel scales (``gate_up_proj_scale`` (E, U), ``down_proj_scale`` (E, D)); the
scheme is ``moekit.ops.int8``'s. The layer's expert path (``moekit.dispatch.run``) sends
``Int8Experts`` to the int8 kernels (through ``fused_weights``); ``forward`` here is the plain reference (one expert's block
dequantised at a time, the same products as the float experts), which ``backend="reference"``
runs. Inference only: the weights are buffers and any backward through them raises.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.int8 import SCHEMES, Int8Weights, dequantize, quantize_per_channel
from .activations import get_activation
from .stacked import MLPExperts, SwiGLUExperts

METADATA_KEY = "moekit.quantize"  # safetensors metadata of a saved model with int8 experts


class _InferenceOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("int8 experts are inference-only (no backward): train the float model and quantise "
                           "afterwards with moekit.experts.quantize_experts(model, 'int8')")


class Int8Experts(nn.Module):
    """Stacked SwiGLU (``gated``) or MLP experts with int8 weights and float32 per-channel scales."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str, backend: str = "auto",
                 gated: bool = True) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.backend, self.activation, self.gated = backend, activation, gated
        self.act = get_activation(activation)
        self.w1_name = "gate_up_proj" if gated else "up_proj"
        U = 2 * hidden if gated else hidden
        self.register_buffer(self.w1_name, torch.zeros(num_experts, U, dim, dtype=torch.int8))
        self.register_buffer(f"{self.w1_name}_scale", torch.ones(num_experts, U))
        self.register_buffer("down_proj", torch.zeros(num_experts, dim, hidden, dtype=torch.int8))
        self.register_buffer("down_proj_scale", torch.ones(num_experts, dim))

    @classmethod
    @torch.no_grad()
    def from_float(cls, experts: SwiGLUExperts | MLPExperts, name: str = "experts") -> Int8Experts:
        """Quantise a float experts module (its weights are not changed). ``name`` prefixes errors."""
        gated = isinstance(experts, SwiGLUExperts)
        out = cls(experts.num_experts, experts.dim, experts.hidden, experts.activation, experts.backend, gated)
        w1 = experts.gate_up_proj if gated else experts.up_proj
        for dst, w in ((out.w1_name, w1), ("down_proj", experts.down_proj)):
            q, s = quantize_per_channel(w, f"{name}.{dst}")
            getattr(out, dst).copy_(q)
            getattr(out, f"{dst}_scale").copy_(s)
        return out.to(w1.device)

    def int8_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q1_EUD int8, s1_EU, q2_EDF int8, s2_ED)."""
        return (getattr(self, self.w1_name), getattr(self, f"{self.w1_name}_scale"), self.down_proj,
                self.down_proj_scale)

    def fused_weights(self, x_TD: torch.Tensor) -> Int8Weights | None:
        """The int8 kernels' inputs (``moekit.ops.int8``), or None for ``backend="reference"``."""
        if self.backend == "reference":
            return None
        return Int8Weights(*self.int8_weights(), self.activation, self.gated)

    def to_float(self, dtype: torch.dtype = torch.float32) -> SwiGLUExperts | MLPExperts:
        """The float experts module with the dequantised weights (s * q): what this module computes."""
        cls = SwiGLUExperts if self.gated else MLPExperts
        out = cls(self.num_experts, self.dim, self.hidden, self.activation, self.backend)
        q1, s1, q2, s2 = self.int8_weights()
        with torch.no_grad():
            getattr(out, self.w1_name).data = dequantize(q1, s1, dtype)
            out.down_proj.data = dequantize(q2, s2, dtype)
        return out

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows, its weights dequantised (reference path)."""
        q1, s1, q2, s2 = self.int8_weights()
        h_NU = x_ND @ dequantize(q1[e:e + 1], s1[e:e + 1], x_ND.dtype)[0].t()
        if self.gated:
            gate_NF, up_NF = h_NU.chunk(2, dim=-1)
            a_NF = self.act(gate_NF) * up_NF
        else:
            a_NF = self.act(h_NU)
        return a_NF @ dequantize(q2[e:e + 1], s2[e:e + 1], x_ND.dtype)[0].t()

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The plain composition: each expert's block with that expert's weights dequantised."""
        blocks = torch.split(x_RD, counts_E.tolist(), dim=0)
        outs = [self.expert_forward(e, block) for e, block in enumerate(blocks) if block.shape[0] > 0]
        y_RD = torch.cat(outs) if outs else x_RD.new_zeros(x_RD.shape[0], self.dim)
        return _InferenceOnly.apply(y_RD) if torch.is_grad_enabled() and y_RD.requires_grad else y_RD

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, int8 per-channel, "
                f"{'gated ' if self.gated else ''}{self.activation}")


def quantize_experts(model: nn.Module, scheme: str = "int8") -> list[str]:
    """Replace every stacked SwiGLU/MLP experts module in ``model`` by its ``Int8Experts``, in place;
    returns their names. Other experts modules (``ModuleExperts``, gpt-oss's clamped experts) have
    no int8 path: a model holding one is refused before anything changes, as is one with nothing
    to quantise or already quantised."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r} is not one of {list(SCHEMES)}")
    stacked, other, done = [], [], []
    for name, module in model.named_modules():
        if type(module) in (SwiGLUExperts, MLPExperts):
            stacked.append(name)
        elif isinstance(module, Int8Experts):
            done.append(name)
        elif name.rsplit(".", 1)[-1] == "experts" and hasattr(module, "num_experts"):
            other.append(f"{name} ({type(module).__name__})")
    if other:
        raise ValueError(f"int8 quantisation covers stacked SwiGLU/MLP experts only; {other[:4]} "
                         f"{'...' if len(other) > 4 else ''}have no int8 path")
    if stacked == [""]:
        raise ValueError("quantize_experts takes a model or layer holding experts; quantise a bare experts "
                         "module with Int8Experts.from_float")
    if not stacked:
        raise ValueError(f"nothing to quantise: {type(model).__name__} has no stacked experts"
                         + (f" (already int8: {done[:2]})" if done else ""))
    replaced = {name: Int8Experts.from_float(model.get_submodule(name), name) for name in stacked}
    for name, new in replaced.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return stacked


def quantization_of(model: nn.Module) -> str | None:
    """``"int8"`` when the model holds int8 experts, else None (written to saved files' metadata)."""
    return "int8" if any(isinstance(m, Int8Experts) for m in model.modules()) else None
