"""Ops: the kernels under dispatch and experts, each a plain function or ``torch.library`` custom op
with a plain-PyTorch reference (``reference.py``) and a benchmark (``benchmarks/ops_*.py``) beside it.

  ``grouped``  grouped_matmul (rows grouped by expert times each expert's weight), backend choice
  ``fused``    ``moekit::fused_experts``: gather, both products, activation, combine; hand-written backward
  ``int8``     weight-only int8 experts (``moekit::int8_experts``, ``moekit::int8_gather_experts``)
  ``permute``  gather of token rows into expert order and the deterministic per-token sum back
  ``finite``   all_finite: the eval-mode NaN/Inf guard in one read of the tensor
  ``kernels``  what this CPU can do (bf16 dot products, op latency), measured once per thread count
               (a probe, not an op: it has no reference; its numbers are in every benchmark's JSON)
  ``cuda_kernels``  what this CUDA device's grouped_mm does per dtype (one kernel, host-sync fallback,
               or none), probed once; the gather decode path's limit from the device's memory
Imports nothing else from moekit: ``moekit.dispatch`` and ``moekit.experts`` build on it.
"""

from .finite import all_finite
from .fused import FUSED_ACTIVATIONS, FusedWeights, fused_experts, gather_experts
from .grouped import grouped_matmul, resolve_backend
from .int8 import Int8Weights, dequantize, int8_experts, int8_gather_experts, quantize_per_channel
from .kernels import cpu_kernels
from .permute import gather_rows, token_sum

__all__ = ["grouped_matmul", "resolve_backend", "fused_experts", "gather_experts", "FusedWeights",
           "FUSED_ACTIVATIONS", "int8_experts", "int8_gather_experts", "Int8Weights", "quantize_per_channel",
           "dequantize", "gather_rows", "token_sum", "cpu_kernels", "all_finite"]
