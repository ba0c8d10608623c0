"""Fused experts block: gather -> first grouped product -> activation -> second grouped product
-> weighted combine, as one ``torch.library`` custom op with a hand-written backward op.

Shape letters (docs/architecture.md): T tokens, D model dim, E experts, F expert hidden, U first-product
width (2F for SwiGLU: gate rows then up rows, F for a plain MLP), K slots per token, S = T*K slots,
R rows grouped by expert (R <= S; R < S when capacity dropped slots), N one expert's rows.

The expert computation is Shazeer 2020's gated FFN y = down(act(gate x) * up x) (or
y = down(act(up x)) ungated), and the layer output is out_t = sum_r w_r y_r over the rows r of
token t. The backward saves the pre-activation h (R, U) and, for a gated float32/float64 block that
can be differentiated, act(gate) (R, F) (half of h's size; it spares the backward the activation
pass); the gathered input and a = act(gate) * up are recomputed, and weight gradients are grouped
products dW_e = dY_e^T X_e, so nothing of size (E, ...) is ever materialised per token. The
router-weight gradient dw_r = <dout_t, y_r> is computed as <g_r, a_r> with g_r = dout_t W2_e (the
product backward needs anyway for dL/da_r = w_r g_r), so the expert outputs y are not kept.

Combine and the input gradient are deterministic and atomics-free: with the plan's inverse
permutation inverse_S (slot t*K + j -> its row, R for a dropped slot) the K rows of each token are
gathered back in slot order and summed, out_TD = pad(w y)[inverse_S].view(T, K, D).sum(1), and the
same for dx from the rows' dx. Plans without slots (expert choice) fall back to ``index_add_``.

Two schedules share the math:
  ``grouped``  whole-batch passes with torch.nn.functional.grouped_mm (CPU float32, CUDA bf16).
  ``loop``     one expert block at a time with torch.mm, products written straight into the
               (R, .) buffers.
  ``auto``     resolved inside the op at run time (``moekit.ops.kernels``): loop where the
               measured per-op latency is small against a block's product time, else grouped;
               near that modeled threshold, whichever ran faster in a one-off timed trial of both
               on blocks of the shape (``_trial``; the model leaves out cache locality).
On CPU, half-precision blocks run natively where the CPU has bf16 dot products (measured by
``cpu_kernels``), else in float32 and stored back in the input dtype, except blocks of at most
NATIVE_DTYPE_MAX_ROWS rows in forward (decode), which run in the input dtype. Combine and the
K-sum of dx accumulate in float32 (float64 for float64 inputs).

Everything that reads counts on the host or measures the CPU runs inside the op, so
``torch.compile(fullgraph=True)`` sees one opaque node with a shape-only fake implementation.
The plain composition (permute -> experts.forward -> combine) stays the reference.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .grouped import compute_dtype, resolve_backend, resolve_schedule
from .kernels import cpu_kernels, onednn_off, row_product_kernel
from .permute import token_sum as _token_sum

SCHEDULES = ("grouped", "loop", "auto")


class FusedWeights(NamedTuple):
    """What a stacked experts module hands the fused path (``experts.fused_weights(x_TD)``, read by
    ``moekit.dispatch.run``): the op's weights and settings, so dispatch never imports experts."""

    w1_EUD: torch.Tensor   # gate_up_proj (E, 2F, D) when gated, else up_proj (E, F, D)
    w2_EDF: torch.Tensor   # down_proj (E, D, F)
    activation: str        # one of FUSED_ACTIVATIONS
    gated: bool
    schedule: str          # one of SCHEDULES


def _act_forward(h_RU: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    if not gated:
        return _ACT[act_name](h_RU)
    gate_RF, up_RF = h_RU.chunk(2, dim=-1)
    return _ACT[act_name](gate_RF) * up_RF


def _act_forward_parts(h_RU: torch.Tensor, act_name: str, gated: bool, act_gate_RF: torch.Tensor | None = None,
                       halves: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a (R, F), act(gate) (R, F) when gated else None): backward recomputes a and hands act(gate)
    on to ``_act_backward``, so the activation runs once there (not at all when the forward kept
    act(gate), ``act_gate_RF``). ``halves``: h's (gate, up) views, if the caller has them."""
    if not gated:
        return _ACT[act_name](h_RU), None
    gate_RF, up_RF = h_RU.chunk(2, dim=-1) if halves is None else halves
    if act_gate_RF is None:
        act_gate_RF = _ACT[act_name](gate_RF)
    return act_gate_RF * up_RF, act_gate_RF


def _act_backward(h_RU: torch.Tensor, da_RF: torch.Tensor, act_name: str, gated: bool,
                  act_gate_RF: torch.Tensor | None = None,
                  halves: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """dL/dh (R, U) from dL/da (R, F), given the pre-activation h (and act(gate) and h's (gate, up)
    views, if at hand). Overwrites da_RF; both halves of a gated dh are written in place (no copy)."""
    if not gated:
        return _act_grad(h_RU, da_RF, act_name)
    gate_RF, up_RF = h_RU.chunk(2, dim=-1) if halves is None else halves
    dh_RU = torch.empty_like(h_RU)
    dgate_RF, dup_RF = dh_RU.chunk(2, dim=-1)
    torch.mul(da_RF, _ACT[act_name](gate_RF) if act_gate_RF is None else act_gate_RF, out=dup_RF)
    _act_grad(gate_RF, da_RF.mul_(up_RF), act_name, out=dgate_RF)
    return dh_RU


def _act_grad(z: torch.Tensor, grad: torch.Tensor, act_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """grad * act'(z) with ATen's fused backward kernels (one pass; the op runs below autograd),
    into ``out`` if given."""
    if out is None:
        out = torch.empty_like(grad)
    if act_name == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=out)
    if act_name == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, z, 0, grad_input=out)
    return torch.ops.aten.gelu_backward.grad_input(grad, z, approximate="tanh" if act_name == "gelu_tanh" else "none",
                                                   grad_input=out)


_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
}
FUSED_ACTIVATIONS = tuple(_ACT)
# Loop schedule, forward: expert blocks of at most this many rows run in the input dtype even
# where compute_dtype says float32 (CPU bf16 without bf16 units: 8 experts x 1 row took 6-11 ms in
# bf16 and 80-130 ms through float32 weight copies; the two met at about 16 rows).
NATIVE_DTYPE_MAX_ROWS = 8


def _act_into(z: torch.Tensor, act_name: str, out: torch.Tensor) -> torch.Tensor:
    """act(z) written into ``out`` (silu without a copy, the others copied in)."""
    if act_name == "silu":
        return torch.ops.aten.silu.out(z, out=out)
    return out.copy_(_ACT[act_name](z))


def _keeps_act(x_TD: torch.Tensor, gated: bool, keep_act: bool) -> bool:
    """Whether the forward keeps act(gate) for the backward: asked, gated, and a float32/float64 input
    (the dtype every schedule computes in, so the kept values are those a recomputation gives)."""
    return keep_act and gated and x_TD.dtype in (torch.float32, torch.float64)


def _kept(act_gate_RF: torch.Tensor | None, h_RU: torch.Tensor) -> torch.Tensor:
    """The forward's act(gate) (R, F) for the backward, or an empty (R, 0) when not kept."""
    return h_RU.new_empty(h_RU.shape[0], 0) if act_gate_RF is None else act_gate_RF


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _combine(y_RD, weight_R, inverse_S, token_idx_R, T):
    return _token_sum(y_RD, inverse_S, token_idx_R, T, _acc_dtype(y_RD), weight_R)


def _nonempty_blocks(counts_E: torch.Tensor, R: int) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) of every expert that received rows, in row order, from one host
    read. With fewer rows than experts (decode) only the non-empty experts' ids and counts are
    read, so the loop schedule never visits the (many) empty experts."""
    if R == 0:
        return []
    if R < counts_E.shape[0]:
        e_N = counts_E.nonzero().squeeze(1)
        ids, ns = torch.stack((e_N, counts_E[e_N])).tolist()
    else:
        ids, ns = zip(*[(e, n) for e, n in enumerate(counts_E.tolist()) if n])
    blocks, start = [], 0
    for e, n in zip(ids, ns):
        blocks.append((e, start, n))
        start += n
    return blocks


def _offsets(counts_E: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def _schedule(schedule: str, x_TD: torch.Tensor, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor, R: int,
              act_name: str, gated: bool, forward_only: bool = False) -> str:
    if schedule != "auto":
        return schedule
    E, U, D = w1_EUD.shape
    Fh, rows = w2_EDF.shape[-1], R / E
    modeled = resolve_schedule(x_TD, D, U, Fh, rows)
    if x_TD.device.type != "cpu" or resolve_backend("auto", x_TD, (D, U, Fh)) != "grouped_mm" or rows < 1:
        return modeled
    threshold = cpu_kernels().loop_min_rows(D, U, Fh)
    if not threshold / TRIAL_BAND <= rows <= threshold * TRIAL_BAND:
        return modeled
    key = (torch.get_num_threads(), x_TD.dtype, D, U, Fh, act_name, gated, round(math.log2(rows)))
    found = _TRIED.get(key)
    if found is None:
        if forward_only:
            # The trial times a training step (forward + backward); an inference forward (a server's
            # prefill) takes the model's answer rather than wait a fraction of a second for a trial.
            return modeled
        found = _TRIED[key] = _trial(x_TD.dtype, w1_EUD, w2_EDF, rows, act_name, gated, modeled)
    return found


# CPU ``auto`` near the modeled threshold: the schedule that ran faster on blocks of this shape, per
# (threads, dtype, D, U, F, activation, rows per expert to the nearest power of 2).
_TRIED: dict[tuple, str] = {}
# The trial runs where the modeled threshold (CPUKernels.loop_min_rows) is within this factor of the
# rows per expert: the model leaves out what the loop's cache locality saves on the elementwise
# passes, which at small D is more than the product time it assumes (demo D 128, F 128, 512 rows
# per expert: loop 0.94x grouped in CPU time at 1 thread, modeled threshold 890 rows).
TRIAL_BAND = 8.0
TRIAL_BYTES = 8 * 2**20
TRIAL_EVICT_BYTES = 64 * 2**20
TRIAL_RUNS = 3
TRIAL_MARGIN = 0.03
# Past it (a busy machine), stop after the first timed pair; a first run over 1/8 of it: no trial.
TRIAL_BUDGET_S = 2.0


@torch.no_grad()
def _trial(dtype: torch.dtype, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor, rows: float, act_name: str,
           gated: bool, modeled: str = "grouped") -> str:
    """Time forward + backward of both schedules on random blocks of ``rows`` rows for as many of the
    experts as make about TRIAL_BYTES of per-row temporaries (so the grouped passes leave the cache as
    they do in a layer), at least 2, each run starting from an evicted cache; the faster (minimum of
    TRIAL_RUNS timed runs each, interleaved, after one untimed run) wins if it beats the ``modeled``
    schedule by more than TRIAL_MARGIN, else the model's answer stands (noise does not flip it).
    Random data from a private generator (the global RNG is untouched); the weights are the layer's
    first experts'. Both schedules compute the same block products: the choice moves speed only."""
    E, U, D = w1_EUD.shape
    Fh = w2_EDF.shape[-1]
    n = max(1, round(rows))
    E_t = min(E, max(2, TRIAL_BYTES // (n * (2 * D + U + Fh) * torch.finfo(dtype).bits // 8)))
    R = n * E_t
    gen = torch.Generator().manual_seed(0)
    x_TD = torch.randn(R, D, generator=gen).to(dtype)
    dout_TD = torch.randn(R, D, generator=gen).to(dtype)
    token_idx_R = torch.randperm(R, generator=gen)
    inverse_S = torch.empty_like(token_idx_R).scatter_(0, token_idx_R, torch.arange(R))
    weight_R = torch.rand(R, generator=gen)
    counts_E = torch.full((E_t,), n, dtype=torch.long)
    w1, w2 = w1_EUD[:E_t].detach(), w2_EDF[:E_t].detach()
    evict = torch.zeros(TRIAL_EVICT_BYTES // 4)

    def run(sched: str) -> float:
        evict.add_(1.0)  # a layer's blocks start from memory, not from the last run's cache
        start = time.perf_counter()
        forward = _forward_grouped if sched == "grouped" else _forward_loop
        backward = _backward_grouped if sched == "grouped" else _backward_loop
        h_RU, y_RD, act_gate_RF = forward(x_TD, w1, w2, token_idx_R, counts_E, act_name, gated, True)
        _combine(y_RD, weight_R, inverse_S, token_idx_R, R)
        dx_RD = backward(x_TD, w1, w2, weight_R, token_idx_R, h_RU, dout_TD, act_name, gated, counts_E,
                         _or_none(act_gate_RF))[0]
        _token_sum(dx_RD, inverse_S, token_idx_R, R, _acc_dtype(dx_RD))
        return time.perf_counter() - start

    best = {"grouped": math.inf, "loop": math.inf}
    began = time.perf_counter()
    for i in range(TRIAL_RUNS + 1):
        for sched in best:
            seconds = run(sched)
            if i:  # the first run of each allocates its buffers
                best[sched] = min(best[sched], seconds)
            elif seconds > TRIAL_BUDGET_S / 8:  # a busy machine (or big blocks): not worth timing
                return modeled
        if i and time.perf_counter() - began > TRIAL_BUDGET_S:
            break
    other = "loop" if modeled == "grouped" else "grouped"
    return other if best[other] < best[modeled] * (1 - TRIAL_MARGIN) else modeled


# ---------------------------------------------------------------------------------------------- forward
def _forward_grouped(x_TD, w1_EUD, w2_EDF, token_idx_R, counts_E, act_name, gated, keep_act=False,
                     forward_only=False):
    offs_E = _offsets(counts_E)
    dtype = x_TD.dtype
    x_RD = x_TD.index_select(0, token_idx_R)
    h_RU = F.grouped_mm(x_RD, w1_EUD.to(dtype).transpose(1, 2), offs=offs_E)
    del x_RD
    a_RF, act_gate_RF = _act_forward_parts(h_RU, act_name, gated)
    if forward_only:
        h_RU = h_RU.new_empty(h_RU.shape[0], 0)
    y_RD = F.grouped_mm(a_RF, w2_EDF.to(dtype).transpose(1, 2), offs=offs_E)
    return h_RU, y_RD, _kept(act_gate_RF if _keeps_act(x_TD, gated, keep_act) else None, h_RU)


def _row_kernel(x_TD: torch.Tensor, n: int) -> contextlib.AbstractContextManager[None]:
    """A one-row CPU half-precision block (decode) runs its products with the kernel that the
    probe found reads uncached weights faster (``moekit.ops.kernels.row_product_kernel``)."""
    if n == 1 and x_TD.device.type == "cpu" and x_TD.dtype in (torch.bfloat16, torch.float16):
        if row_product_kernel(x_TD.dtype) == "aten":
            return onednn_off()
    return contextlib.nullcontext()


def _expert_views(w_EXY: torch.Tensor,
                  blocks: list[tuple[int, int, int]]) -> dict[int, torch.Tensor] | tuple[torch.Tensor, ...]:
    """w_EXY[e] for the blocks' experts, indexable by expert id: one unbind of all E (one op) when
    most experts have rows, else a select per block (decode: 8 of 128 experts, not 128 views)."""
    if 4 * len(blocks) >= w_EXY.shape[0]:
        return w_EXY.unbind(0)
    return {e: w_EXY[e] for e, _, _ in blocks}


def _forward_loop(x_TD, w1_EUD, w2_EDF, token_idx_R, counts_E, act_name, gated, keep_act=False,
                  forward_only=False):
    dtype, cdt = x_TD.dtype, compute_dtype(x_TD)
    R, U, D = token_idx_R.shape[0], w1_EUD.shape[1], x_TD.shape[1]
    # Forward only (no backward can follow): each block's pre-activation is a temporary of the
    # block's size, not a slice of an (R, U) buffer kept for the backward.
    h_RU = x_TD.new_empty(R, 0 if forward_only else U)
    y_RD = x_TD.new_empty(R, D)
    keep = _keeps_act(x_TD, gated, keep_act)
    act_gate_RF = x_TD.new_empty(R, U // 2 if keep else 0)
    blocks = _nonempty_blocks(counts_E, R)
    sizes = [n for _, _, n in blocks]  # the blocks tile rows [0, R) in order
    # Every block's views from one split or unbind per tensor, not a slice (or select) per block each.
    toks, ys, kept = (t.split(sizes) for t in (token_idx_R, y_RD, act_gate_RF))
    hs = (None,) * len(blocks) if forward_only else h_RU.split(sizes)
    gates, ups = (half.split(sizes) for half in h_RU.chunk(2, dim=-1)) if keep else ((), ())
    w1ts, w2ts = (_expert_views(w.transpose(1, 2), blocks) for w in (w1_EUD, w2_EDF))
    for i, (e, _, n) in enumerate(blocks):
        # A block of a few rows is weight-read bound: converting the expert's weights to float32
        # costs more than a half-precision product reading them once (decode).
        bdt = dtype if n <= NATIVE_DTYPE_MAX_ROWS else cdt
        w1t, w2t = (w if w.dtype == bdt else w.to(bdt) for w in (w1ts[e], w2ts[e]))
        x_ND = x_TD.index_select(0, toks[i])
        if bdt == dtype:  # products write straight into the saved (R, .) buffers
            with _row_kernel(x_TD, n):
                h_NU = torch.mm(x_ND, w1t) if forward_only else torch.mm(x_ND, w1t, out=hs[i])
                a_NF = _act_into(gates[i], act_name, kept[i]) * ups[i] if keep else _act_forward(h_NU, act_name, gated)
                torch.mm(a_NF, w2t, out=ys[i])
        else:
            h_NU = x_ND.to(bdt) @ w1t
            if not forward_only:
                hs[i].copy_(h_NU)
            ys[i].copy_(_act_forward(h_NU, act_name, gated) @ w2t)
    return h_RU, y_RD, act_gate_RF


@torch.library.custom_op("moekit::fused_experts", mutates_args=())
def _fused_op(x_TD: torch.Tensor, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor, weight_R: torch.Tensor,
              token_idx_R: torch.Tensor, inverse_S: torch.Tensor | None, counts_E: torch.Tensor, act_name: str,
              gated: bool, schedule: str,
              keep_act: bool = False,
              forward_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out_TD in x's dtype, y_RD unweighted expert outputs, h_RU pre-activations, act(gate) (R, F)
    for the backward where ``_keeps_act``, else (R, 0)). ``forward_only``: no backward will follow,
    so h_RU is not kept (it comes back (R, 0)) and a backward raises."""
    return _fused_forward(x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E, act_name, gated,
                          schedule, keep_act, forward_only)


def _fused_forward(x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E, act_name, gated, schedule,
                   keep_act=False, forward_only=False):
    """The body of ``moekit::fused_experts`` (same arguments and outputs)."""
    sched = _schedule(schedule, x_TD, w1_EUD, w2_EDF, token_idx_R.shape[0], act_name, gated, forward_only)
    run = _forward_grouped if sched == "grouped" else _forward_loop
    h_RU, y_RD, act_gate_RF = run(x_TD, w1_EUD, w2_EDF, token_idx_R, counts_E, act_name, gated, keep_act,
                                  forward_only)
    out_TD = _combine(y_RD, weight_R, inverse_S, token_idx_R, x_TD.shape[0]).to(x_TD.dtype)
    return out_TD, y_RD, h_RU, act_gate_RF


@_fused_op.register_fake
def _(x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E, act_name, gated, schedule, keep_act=False,
      forward_only=False):
    R = token_idx_R.shape[0]
    width = w1_EUD.shape[1] // 2 if _keeps_act(x_TD, gated, keep_act) else 0
    return (x_TD.new_empty(x_TD.shape), x_TD.new_empty(R, x_TD.shape[1]),
            x_TD.new_empty(R, 0 if forward_only else w1_EUD.shape[1]), x_TD.new_empty(R, width))


# ---------------------------------------------------------------------------------------------- backward
def _or_none(act_gate_RF: torch.Tensor) -> torch.Tensor | None:
    """The kept act(gate), or None when the forward kept none (width 0)."""
    return act_gate_RF if act_gate_RF.shape[-1] else None


def _backward_grouped(x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, h_RU, dout_TD, act_name, gated, counts_E,
                      act_gate_RF=None):
    offs_E = _offsets(counts_E)
    dtype = x_TD.dtype
    w1 = w1_EUD.to(dtype)
    w2 = w2_EDF.to(dtype)
    dout_RD = dout_TD.to(dtype).index_select(0, token_idx_R)
    a_RF, act_gate_RF = _act_forward_parts(h_RU, act_name, gated, act_gate_RF)
    # g_r = dout_t W2_e: dw_r = <dout_t, y_r> = <g_r, a_r>, and dL/da_r = w_r g_r.
    g_RF = F.grouped_mm(dout_RD, w2, offs=offs_E)
    dweight_R = (g_RF * a_RF).sum(-1, dtype=_acc_dtype(g_RF)).to(weight_R.dtype)
    w_R1 = weight_R.to(dtype).unsqueeze(-1)
    dy_RD = dout_RD.mul_(w_R1)
    dw2_EDF = F.grouped_mm(dy_RD.t(), a_RF, offs=offs_E)
    del a_RF, dy_RD, dout_RD
    dh_RU = _act_backward(h_RU, g_RF.mul_(w_R1), act_name, gated, act_gate_RF)
    del g_RF, act_gate_RF
    dx_RD = F.grouped_mm(dh_RU, w1, offs=offs_E)
    x_RD = x_TD.index_select(0, token_idx_R)
    dw1_EUD = F.grouped_mm(dh_RU.t(), x_RD, offs=offs_E)
    return dx_RD, dw1_EUD.to(w1_EUD.dtype), dw2_EDF.to(w2_EDF.dtype), dweight_R


def _backward_loop(x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, h_RU, dout_TD, act_name, gated, counts_E,
                   act_gate_RF=None):
    cdt = compute_dtype(x_TD)
    R = token_idx_R.shape[0]
    # Every non-empty expert's gradient is written whole below; only the empty ones need zeros
    # (a memset of all E experts' gradients costs as much as the products at small batches).
    dw1 = torch.empty(w1_EUD.shape, dtype=cdt, device=w1_EUD.device)
    dw2 = torch.empty(w2_EDF.shape, dtype=cdt, device=w2_EDF.device)
    empty_N = (counts_E == 0).nonzero().squeeze(1)
    dw1.index_fill_(0, empty_N, 0)
    dw2.index_fill_(0, empty_N, 0)
    dweight_R = torch.empty_like(weight_R)
    dx_RD = torch.empty(R, x_TD.shape[1], dtype=cdt, device=x_TD.device)
    blocks = _nonempty_blocks(counts_E, R)
    sizes = [n for _, _, n in blocks]  # the blocks tile rows [0, R) in order

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == cdt else t.to(cdt)

    # Every block's views from one split or unbind per tensor, not a slice (or select) per block each.
    toks, hs, ws, dws, dxs = (t.split(sizes) for t in (token_idx_R, h_RU, weight_R, dweight_R, dx_RD))
    kept = (None,) * len(blocks) if act_gate_RF is None else act_gate_RF.split(sizes)
    # h's gate and up halves of every block (h in the compute dtype, gated), else chunked per block.
    split_halves = gated and h_RU.dtype == cdt
    halves = tuple(zip(*(half.split(sizes) for half in h_RU.chunk(2, dim=-1)))) if split_halves else ()
    w1s, w2s, dw1s, dw2s = w1_EUD.unbind(0), w2_EDF.unbind(0), dw1.unbind(0), dw2.unbind(0)
    for i, (e, _, _) in enumerate(blocks):
        tok_N = toks[i]
        dout_ND = cast(dout_TD.index_select(0, tok_N))
        h_NU = cast(hs[i])
        halves_N = halves[i] if split_halves else None
        a_NF, act_gate_NF = _act_forward_parts(h_NU, act_name, gated, kept[i], halves_N)
        g_NF = torch.mm(dout_ND, cast(w2s[e]))
        dws[i].copy_((g_NF * a_NF).sum(-1))
        w_N1 = cast(ws[i]).unsqueeze(-1)
        torch.mm(dout_ND.mul_(w_N1).t(), a_NF, out=dw2s[e])
        dh_NU = _act_backward(h_NU, g_NF.mul_(w_N1), act_name, gated, act_gate_NF, halves_N)
        torch.mm(dh_NU.t(), cast(x_TD.index_select(0, tok_N)), out=dw1s[e])
        torch.mm(dh_NU, cast(w1s[e]), out=dxs[i])
    return dx_RD, dw1.to(w1_EUD.dtype), dw2.to(w2_EDF.dtype), dweight_R


@torch.library.custom_op("moekit::fused_experts_backward", mutates_args=())
def _fused_backward_op(dout_TD: torch.Tensor, x_TD: torch.Tensor, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor,
                       weight_R: torch.Tensor, token_idx_R: torch.Tensor, inverse_S: torch.Tensor | None,
                       counts_E: torch.Tensor, h_RU: torch.Tensor, act_name: str, gated: bool,
                       schedule: str, act_gate_RF: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx_TD, dw1_EUD, dw2_EDF, dweight_R); ``act_gate_RF``: the forward's kept act(gate), if any."""
    sched = _schedule(schedule, x_TD, w1_EUD, w2_EDF, token_idx_R.shape[0], act_name, gated)
    run = _backward_grouped if sched == "grouped" else _backward_loop
    kept_RF = None if act_gate_RF is None else _or_none(act_gate_RF)
    dx_RD, dw1, dw2, dweight_R = run(x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, h_RU, dout_TD.contiguous(),
                                     act_name, gated, counts_E, kept_RF)
    dx_TD = _token_sum(dx_RD, inverse_S, token_idx_R, x_TD.shape[0], _acc_dtype(dx_RD)).to(x_TD.dtype)
    return dx_TD, dw1, dw2, dweight_R


@_fused_backward_op.register_fake
def _(dout_TD, x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E, h_RU, act_name, gated, schedule,
      act_gate_RF=None):
    return torch.empty_like(x_TD), torch.empty_like(w1_EUD), torch.empty_like(w2_EDF), torch.empty_like(weight_R)


def _setup_context(ctx, inputs, output) -> None:
    x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E, act_name, gated, schedule, *keep = inputs
    ctx.save_for_backward(x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E, output[2], output[3])
    ctx.act_name, ctx.gated, ctx.schedule = act_name, gated, schedule
    # y and h carry no gradient: without this autograd would zero-fill (R, D) and (R, U) for them.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout_TD, _dy, _dh, _da):
    if dout_TD is None:  # only y, h or act(gate) reached the loss (outputs without a gradient)
        return (None,) * 12
    x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E, h_RU, act_gate_RF = ctx.saved_tensors
    if h_RU.shape[-1] == 0 and token_idx_R.shape[0]:
        raise RuntimeError("moekit::fused_experts ran with forward_only=True, which keeps nothing for a backward")
    dx, dw1, dw2, dweight = _fused_backward_op(dout_TD, x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S,
                                               counts_E, h_RU, ctx.act_name, ctx.gated, ctx.schedule, act_gate_RF)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dw1 if need[1] else None, dw2 if need[2] else None,
            dweight if need[3] else None, None, None, None, None, None, None, None, None)


_fused_op.register_autograd(_backward, setup_context=_setup_context)


def fused_experts(x_TD: torch.Tensor, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor, weight_R: torch.Tensor,
                  token_idx_R: torch.Tensor, counts_E: torch.Tensor, act_name: str, gated: bool,
                  schedule: str, inverse_S: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) tokens -> ((T, D) combined output in x's dtype, (R, D) unweighted expert outputs).

    w1_EUD is ``gate_up_proj`` (E, 2F, D) when gated, else ``up_proj`` (E, F, D); w2_EDF is
    ``down_proj`` (E, D, F). Rows of expert e are token_idx_R[offs[e-1]:offs[e]] with
    offs = cumsum(counts_E); weight_R are their combine weights. inverse_S (optional, (T*K,) long)
    maps slot t*K + j to its row (R for a dropped slot) for the deterministic gather combine;
    without it rows are added with ``index_add_``. Gradients flow to x, w1, w2 and weight_R.
    schedule is ``grouped``, ``loop`` or ``auto`` (see the module docstring). The second output
    carries no gradient; it is there for finite checks.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if act_name not in _ACT:
        raise ValueError(f"activation={act_name!r} has no fused path; known: {sorted(_ACT)}")
    R = token_idx_R.shape[0]
    if weight_R.shape != (R,):
        raise ValueError(f"weight_R has shape {tuple(weight_R.shape)}, expected ({R},) like token_idx_R")
    if inverse_S is not None and inverse_S.shape[0] % x_TD.shape[0] != 0:
        raise ValueError(f"inverse_S has {inverse_S.shape[0]} slots, not a multiple of the {x_TD.shape[0]} tokens")
    # The backward reuses the forward's act(gate) (R, F) rather than recomputing it, at half the size
    # of the pre-activation it keeps anyway; only when a backward can follow.
    keep_act = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, w1_EUD, w2_EDF, weight_R))
    # Without a backward the pre-activation (R, U) is not kept either: blocks use temporaries.
    args = (x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E, act_name, gated, schedule,
            keep_act, not keep_act)
    if not keep_act and _plain_eager(x_TD, w1_EUD, w2_EDF, weight_R, token_idx_R, inverse_S, counts_E):
        # Inference in eager mode: the op's body directly. The custom op's dispatch (autograd
        # wrapper, redispatch, dynamo guard) is what compile and the backward need; it cost ~45 us
        # per call at decode sizes (a 16-token layer of D 128: 257 -> 210 us).
        out_TD, y_RD, _, _ = _fused_forward(*args)
    else:
        out_TD, y_RD, _, _ = _fused_op(*args)
    return out_TD, y_RD


def _plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Eager mode on plain tensors: not tracing or compiling, no dispatch mode (fake tensors,
    FLOP counters) active, no tensor subclass among the inputs but ``nn.Parameter`` (the experts'
    own weights: a plain tensor to every kernel)."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(t is None or type(t) in _PLAIN for t in tensors))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def gather_experts(x_TD: torch.Tensor, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor, idx_TK: torch.Tensor,
                   weight_TK: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    """Sort-free path for few tokens (decode): each token's K chosen experts' weights are gathered
    ((T, K, U, D) and (T, K, D, F)) and applied with batched products, as gpt-fast does; no plan
    order, no host read. Plain differentiable ops. -> (T, D) in x's dtype, summed in float32."""
    T, K = idx_TK.shape
    dtype = x_TD.dtype
    # Gather, then cast: only the chosen experts' weights are converted (never all E of them).
    # Row vector times the transposed weight, (N, 1, D) @ (N, D, U): CPU bmm runs this orientation
    # 2-8x faster than weight times a column, (N, U, D) @ (N, D, 1).
    w1_NUD = w1_EUD.index_select(0, idx_TK.reshape(-1)).to(dtype)
    h_NU = torch.bmm(x_TD.repeat_interleave(K, dim=0).unsqueeze(1), w1_NUD.transpose(1, 2)).squeeze(1)
    a_NF = _act_forward(h_NU, act_name, gated)
    w2_NDF = w2_EDF.index_select(0, idx_TK.reshape(-1)).to(dtype)
    y_ND = torch.bmm(a_NF.unsqueeze(1), w2_NDF.transpose(1, 2)).squeeze(1)
    acc = _acc_dtype(x_TD)
    out_TD = (y_ND.view(T, K, -1).to(acc) * weight_TK.to(acc).unsqueeze(-1)).sum(1)
    return out_TD.to(dtype)
