"""Weight-only int8 experts: per-output-channel symmetric int8 weights, activations in float.

Shape letters (docs/architecture.md): T tokens, D model dim, E experts, F expert hidden, U first-product
width (2F gated, F plain), K slots per token, R rows grouped by expert, N one expert's rows (or, in the
gather path, the T*K chosen slots), O and I a weight's output and input widths.

Quantisation (the LLM.int8 / gpt-fast weight-only scheme without outliers): each output channel o of
each expert's weight W_e (O, I) gets scale s_eo = max_i |W_eoi| / 127 and q_eoi = round(W_eoi / s_eo)
in [-127, 127], so |W - s q| <= s / 2 elementwise. Because the scale is per output channel it
factors out of a product: x W_e^T = (x q_e^T) * s_e. The kernels below never hold a dequantised
copy of all E experts:

  ``int8_experts``         the loop schedule of ``moekit.ops.fused``: one expert block at a time;
                           the block's int8 weight is converted to the compute dtype, multiplied, and
                           the output scaled by s_e (so the dequantised weight is one expert's, once).
  ``int8_gather_experts``  the sort-free decode path: the chosen experts' int8 weights are gathered
                           ((N, U, D) int8, a quarter of float32's bytes) and only those are converted.
  Half-precision blocks of at most PACK_MAX_ROWS rows (decode in a bf16 model) whose input width is
  a multiple of PACK_WIDTH_MULTIPLE run in ATen's CPU kernel ``torch._weight_int8pack_mm``, which
  reads the int8 weight and scales inside the product (no converted copy at all); measured at
  about 3x a bf16 or float32 matrix-vector product.

Both are ``torch.library`` custom ops (opaque to torch.compile) for inference only: their backward
raises. Train the float model and quantise afterwards (``moekit.experts.int8.quantize_experts``).

Why not torchao. torchao 0.18 (PyPI, abi3 wheel that loads on torch 2.13 CPU) quantises nn.Linear
weights to its ``Int8Tensor`` subclass and its weight-only linear runs on CPU, but stacked 3-D expert
weights are not supported by its ops: ``index_select`` (the decode gather), ``transpose`` (hence
grouped_mm) and ``bmm`` raise NotImplementedError on an Int8Tensor, a subclass cannot pass through
the ``moekit::fused_experts`` custom op without a dispatch rule of its own, and its prototype MoE
quantisation was removed. What remains usable is the quantise formula and the per-row weight-only
linear, both a few lines (the latter is the same ``q.to(dtype)`` product and output scaling as here),
so the kernel is written here with no new dependency.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .fused import FUSED_ACTIVATIONS, NATIVE_DTYPE_MAX_ROWS, _act_forward, _combine, _nonempty_blocks
from .grouped import compute_dtype

QMAX = 127
SCHEMES = ("int8",)


class Int8Weights(NamedTuple):
    """What int8 experts hand the int8 kernels (``experts.fused_weights(x_TD)``, read by
    ``moekit.dispatch.run``): per-output-channel int8 weights and their float32 scales."""

    q1_EUD: torch.Tensor   # int8 gate_up_proj (E, 2F, D) when gated, else up_proj (E, F, D)
    s1_EU: torch.Tensor
    q2_EDF: torch.Tensor   # int8 down_proj (E, D, F)
    s2_ED: torch.Tensor
    activation: str
    gated: bool
# torch._weight_int8pack_mm (ATen CPU, torch >= 2.3) for half-precision blocks of at most this many
# rows. Measured on this project's CPU (AVX-512 BF16), one thread, one expert 1536 x 2048: 1 row
# 0.16 ms vs 0.52 ms float32 and 0.52 ms bf16; at 4 rows even with bf16; at 32 rows 2.4x slower than
# converting the block to bf16. Its float32 path is unvectorised (12x slower), so never used.
PACK_MAX_ROWS = 4
# Its AVX-512 kernel reads the input width in whole vectors with no tail and no check: widths not a
# multiple of 16 gave garbage or a segmentation fault in torch 2.13; only multiples of 32 go to it.
PACK_WIDTH_MULTIPLE = 32
_HAS_PACK = hasattr(torch, "_weight_int8pack_mm")


def quantize_per_channel(w_EOI: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(E, O, I) float -> (q_EOI int8, scale_EO float32): symmetric per output channel, computed in
    float32 (float64 inputs in float64). An all-zero channel gets scale 1 (q = 0). Non-finite
    weights are an error naming ``name`` and the expert."""
    if not w_EOI.is_floating_point() or w_EOI.dim() != 3:
        raise ValueError(f"{name}: expected a float (E, O, I) tensor, got {w_EOI.dtype} {tuple(w_EOI.shape)}")
    finite_E = torch.isfinite(w_EOI).flatten(1).all(1)
    if not bool(finite_E.all()):
        bad = torch.nonzero(~finite_E).flatten().tolist()
        raise ValueError(f"{name}: expert(s) {bad[:8]} hold NaN/Inf weights; int8 quantisation needs finite "
                         f"weights (quarantine or repair them first)")
    w = w_EOI.detach().to(torch.promote_types(w_EOI.dtype, torch.float32))
    amax_EO = w.abs().amax(dim=-1)
    scale_EO = torch.where(amax_EO > 0, amax_EO / QMAX, torch.ones_like(amax_EO))
    q_EOI = torch.round(w / scale_EO.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q_EOI, scale_EO.to(torch.float32)


def dequantize(q_EOI: torch.Tensor, scale_EO: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s * q in float32 (float64 for float64), then ``dtype``: the weights the int8 kernels compute with."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (q_EOI.to(acc) * scale_EO.to(acc).unsqueeze(-1)).to(dtype)


def block_product(x_NI: torch.Tensor, q_OI: torch.Tensor, s_O: torch.Tensor) -> torch.Tensor:
    """x_NI @ (s_O q_OI)^T for one expert -> (N, O) in x's dtype. Few half-precision rows on CPU
    run in ``torch._weight_int8pack_mm``; otherwise the int8 block is converted to the compute
    dtype (x's for blocks of at most NATIVE_DTYPE_MAX_ROWS rows, as the fused loop does) and the
    output scaled per channel in float32."""
    n = x_NI.shape[0]
    if n <= PACK_MAX_ROWS and _packed_kernel_fits(x_NI):
        return torch._weight_int8pack_mm(x_NI.contiguous(), q_OI, s_O.to(x_NI.dtype))
    cdt = x_NI.dtype if n <= NATIVE_DTYPE_MAX_ROWS else compute_dtype(x_NI)
    acc = torch.float64 if cdt == torch.float64 else torch.float32
    return ((x_NI.to(cdt) @ q_OI.to(cdt).t()).to(acc) * s_O.to(acc)).to(x_NI.dtype)


def _packed_kernel_fits(x_NI: torch.Tensor) -> bool:
    return (_HAS_PACK and x_NI.device.type == "cpu" and x_NI.dtype in (torch.bfloat16, torch.float16)
            and x_NI.shape[1] % PACK_WIDTH_MULTIPLE == 0)


def _inference_only(*_args: object) -> None:
    raise RuntimeError("int8 experts are inference-only (no backward through the int8 kernels): train the "
                       "float model and quantise afterwards with moekit.experts.quantize_experts(model, 'int8')")


def _check(x_TD: torch.Tensor, q1_EUD: torch.Tensor, s1_EU: torch.Tensor, q2_EDF: torch.Tensor,
           s2_ED: torch.Tensor, act_name: str) -> None:
    if act_name not in FUSED_ACTIVATIONS:
        raise ValueError(f"activation={act_name!r} has no int8 path; known: {sorted(FUSED_ACTIVATIONS)}")
    if q1_EUD.dtype != torch.int8 or q2_EDF.dtype != torch.int8:
        raise ValueError(f"int8 experts: weights must be int8, got {q1_EUD.dtype} and {q2_EDF.dtype}")
    E, U, D = q1_EUD.shape
    if s1_EU.shape != (E, U) or s2_ED.shape != q2_EDF.shape[:2] or x_TD.shape[-1] != D:
        raise ValueError(f"int8 experts: shapes do not fit: x {tuple(x_TD.shape)}, w1 {tuple(q1_EUD.shape)} "
                         f"scale {tuple(s1_EU.shape)}, w2 {tuple(q2_EDF.shape)} scale {tuple(s2_ED.shape)}")


# ------------------------------------------------------------------------------------------ loop schedule
@torch.library.custom_op("moekit::int8_experts", mutates_args=())
def _int8_op(x_TD: torch.Tensor, q1_EUD: torch.Tensor, s1_EU: torch.Tensor, q2_EDF: torch.Tensor,
             s2_ED: torch.Tensor, weight_R: torch.Tensor, token_idx_R: torch.Tensor, inverse_S: torch.Tensor | None,
             counts_E: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    R, D = token_idx_R.shape[0], x_TD.shape[1]
    y_RD = x_TD.new_empty(R, D)
    for e, start, n in _nonempty_blocks(counts_E, R):
        rows = slice(start, start + n)
        h_NU = block_product(x_TD.index_select(0, token_idx_R[rows]), q1_EUD[e], s1_EU[e])
        y_RD[rows] = block_product(_act_forward(h_NU, act_name, gated), q2_EDF[e], s2_ED[e])
    return _combine(y_RD, weight_R, inverse_S, token_idx_R, x_TD.shape[0]).to(x_TD.dtype)


@_int8_op.register_fake
def _(x_TD, q1_EUD, s1_EU, q2_EDF, s2_ED, weight_R, token_idx_R, inverse_S, counts_E, act_name, gated):
    return x_TD.new_empty(x_TD.shape)


_int8_op.register_autograd(lambda ctx, *grads: _inference_only(), setup_context=lambda ctx, inputs, output: None)


def int8_experts(x_TD: torch.Tensor, q1_EUD: torch.Tensor, s1_EU: torch.Tensor, q2_EDF: torch.Tensor,
                 s2_ED: torch.Tensor, weight_R: torch.Tensor, token_idx_R: torch.Tensor, counts_E: torch.Tensor,
                 act_name: str, gated: bool, inverse_S: torch.Tensor | None = None) -> torch.Tensor:
    """(T, D) tokens -> (T, D) combined output in x's dtype, as ``fused_experts`` computes it with the
    weights s1 * q1 (``gate_up_proj`` or ``up_proj``) and s2 * q2 (``down_proj``), one expert block
    at a time. Inference only."""
    _check(x_TD, q1_EUD, s1_EU, q2_EDF, s2_ED, act_name)
    if weight_R.shape != token_idx_R.shape:
        raise ValueError(f"weight_R has shape {tuple(weight_R.shape)}, expected {tuple(token_idx_R.shape)}")
    return _int8_op(x_TD, q1_EUD, s1_EU, q2_EDF, s2_ED, weight_R, token_idx_R, inverse_S, counts_E, act_name, gated)


# ------------------------------------------------------------------------------------------ decode gather
def _gathered_product(x_NI: torch.Tensor, q_EOI: torch.Tensor, s_EO: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """Row n times the dequantised weight of expert idx_N[n] -> (N, O) in x's dtype."""
    if _packed_kernel_fits(x_NI):
        return torch.cat([block_product(x_NI[n:n + 1], q_EOI[e], s_EO[e]) for n, e in enumerate(idx_N.tolist())])
    acc = torch.float64 if x_NI.dtype == torch.float64 else torch.float32
    q_NOI = q_EOI.index_select(0, idx_N).to(x_NI.dtype)
    y_NO = torch.bmm(x_NI.unsqueeze(1), q_NOI.transpose(1, 2)).squeeze(1)  # row x W^T: CPU bmm's fast orientation
    return (y_NO.to(acc) * s_EO.index_select(0, idx_N).to(acc)).to(x_NI.dtype)


@torch.library.custom_op("moekit::int8_gather_experts", mutates_args=())
def _int8_gather_op(x_TD: torch.Tensor, q1_EUD: torch.Tensor, s1_EU: torch.Tensor, q2_EDF: torch.Tensor,
                    s2_ED: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor, act_name: str,
                    gated: bool) -> torch.Tensor:
    T, K = idx_TK.shape
    idx_N = idx_TK.reshape(-1)
    h_NU = _gathered_product(x_TD.repeat_interleave(K, dim=0), q1_EUD, s1_EU, idx_N)
    y_ND = _gathered_product(_act_forward(h_NU, act_name, gated), q2_EDF, s2_ED, idx_N)
    acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    return (y_ND.view(T, K, -1).to(acc) * weight_TK.to(acc).unsqueeze(-1)).sum(1).to(x_TD.dtype)


@_int8_gather_op.register_fake
def _(x_TD, q1_EUD, s1_EU, q2_EDF, s2_ED, idx_TK, weight_TK, act_name, gated):
    return x_TD.new_empty(x_TD.shape)


_int8_gather_op.register_autograd(lambda ctx, *grads: _inference_only(),
                                  setup_context=lambda ctx, inputs, output: None)


def int8_gather_experts(x_TD: torch.Tensor, q1_EUD: torch.Tensor, s1_EU: torch.Tensor, q2_EDF: torch.Tensor,
                        s2_ED: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor, act_name: str,
                        gated: bool) -> torch.Tensor:
    """Sort-free decode path (``fused.gather_experts`` with int8 weights): only the T*K chosen experts'
    weights are read and converted. -> (T, D) in x's dtype, summed in float32. Inference only."""
    _check(x_TD, q1_EUD, s1_EU, q2_EDF, s2_ED, act_name)
    return _int8_gather_op(x_TD, q1_EUD, s1_EU, q2_EDF, s2_ED, idx_TK, weight_TK, act_name, gated)
