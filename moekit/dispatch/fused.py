"""Fused experts block: gather -> first grouped product -> activation -> second grouped product
-> weighted combine, as one autograd Function with a hand-written backward.

Shape legend: T tokens, D model dim, E experts, F expert hidden, H first-product width
(2F for SwiGLU: gate rows then up rows, F for a plain MLP), R rows grouped by expert.

The expert computation is Shazeer 2020's gated FFN y = down(act(gate x) * up x) (or
y = down(act(up x)) ungated), and the layer output is out_t = sum_r w_r y_r over the rows r of
token t. The backward saves only the pre-activation h (R, H); the gathered input and the activation are
recomputed, and weight gradients are grouped products dW_e = dY_e^T X_e, so nothing of size
(E, ...) is ever materialised per token. The router-weight gradient dw_r = <dout_t, y_r> is
computed as <g_r, a_r> with g_r = dout_t W2_e (the product backward needs anyway for dL/da_r =
w_r g_r), so the expert outputs y are not kept.

Two schedules share the math:
  ``grouped``  whole-batch passes with torch.nn.functional.grouped_mm (CPU float32, CUDA bf16).
  ``loop``     one expert block at a time with torch.mm; the gather of each block's tokens feeds
               its first product directly, and on CPU half-precision blocks are computed in
               float32 (this CPU's bf16 matmul is many times slower than its float32 matmul)
               and stored back in the input dtype, except blocks of at most
               NATIVE_DTYPE_MAX_ROWS rows in forward (decode), which run in the input dtype.
The plain composition (permute -> experts.forward -> combine) stays the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped import compute_dtype


def _act_forward(h_RH: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    if not gated:
        return _ACT[act_name](h_RH)
    gate_RF, up_RF = h_RH.chunk(2, dim=-1)
    return _ACT[act_name](gate_RF) * up_RF


def _act_backward(h_RH: torch.Tensor, da_RF: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    """dL/dh (R, H) from dL/da (R, F), given the pre-activation h."""
    if not gated:
        return _act_grad(h_RH, da_RF, act_name)
    gate_RF, up_RF = h_RH.chunk(2, dim=-1)
    dh_RH = torch.empty_like(h_RH)
    dgate_RF, dup_RF = dh_RH.chunk(2, dim=-1)
    if act_name == "silu":
        sig_RF = torch.sigmoid(gate_RF)
        torch.mul(gate_RF, sig_RF, out=dup_RF).mul_(da_RF)
        # d silu(g)/dg = s * (1 + g * (1 - s)), built in place to keep two (R, F) temporaries.
        dsilu_RF = torch.sub(1, sig_RF).mul_(gate_RF).add_(1).mul_(sig_RF)
        del sig_RF
        torch.mul(da_RF, up_RF, out=dgate_RF).mul_(dsilu_RF)
    else:
        dup_RF.copy_(da_RF * _ACT[act_name](gate_RF))
        dgate_RF.copy_(_act_grad(gate_RF, da_RF * up_RF, act_name))
    return dh_RH


def _act_grad(z: torch.Tensor, grad: torch.Tensor, act_name: str) -> torch.Tensor:
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        (dz,) = torch.autograd.grad(_ACT[act_name](z), z, grad)
    return dz


_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
}
FUSED_ACTIVATIONS = tuple(_ACT)
# Loop schedule, forward: expert blocks of at most this many rows run in the input dtype even
# where compute_dtype says float32 (CPU bf16: 8 experts x 1 row took 6-11 ms in bf16 and 80-130 ms
# through float32 weight copies; the two met at about 16 rows).
NATIVE_DTYPE_MAX_ROWS = 8


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w1_EHD: torch.Tensor, w2_EDF: torch.Tensor, weight_R: torch.Tensor,
                token_idx_R: torch.Tensor, counts_E: torch.Tensor, act_name: str, gated: bool,
                schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = None
        if schedule == "grouped":
            h_RH, y_RD, out_TD = _forward_grouped(x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, counts_E,
                                                  act_name, gated)
        else:
            blocks = _nonempty_blocks(counts_E, token_idx_R.shape[0])
            h_RH, y_RD, out_TD = _forward_loop(x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, blocks,
                                               act_name, gated)
        ctx.save_for_backward(x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, counts_E, h_RH)
        ctx.blocks, ctx.act_name, ctx.gated, ctx.schedule = blocks, act_name, gated, schedule
        ctx.mark_non_differentiable(y_RD)
        return out_TD, y_RD

    @staticmethod
    def backward(ctx, dout_TD: torch.Tensor, _dy_unused: torch.Tensor | None):
        x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, counts_E, h_RH = ctx.saved_tensors
        need = ctx.needs_input_grad
        args = (x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, h_RH, dout_TD.contiguous(),
                ctx.act_name, ctx.gated)
        if ctx.schedule == "grouped":
            dx_TD, dw1, dw2, dweight_R = _backward_grouped(*args, counts_E)
        else:
            dx_TD, dw1, dw2, dweight_R = _backward_loop(*args, ctx.blocks)
        return (dx_TD if need[0] else None, dw1 if need[1] else None, dw2 if need[2] else None,
                dweight_R if need[3] else None, None, None, None, None, None)


def _nonempty_blocks(counts_E: torch.Tensor, R: int) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) of every expert that received rows, in row order, from one host
    read. With fewer rows than experts (decode) only the non-empty experts' ids and counts are
    read, so the loop schedule never visits the (many) empty experts."""
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


def _forward_grouped(x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, counts_E, act_name, gated):
    offs_E = _offsets(counts_E)
    dtype = x_TD.dtype
    x_RD = x_TD.index_select(0, token_idx_R)
    h_RH = F.grouped_mm(x_RD, w1_EHD.to(dtype).transpose(1, 2), offs=offs_E)
    del x_RD
    a_RF = _act_forward(h_RH, act_name, gated)
    y_RD = F.grouped_mm(a_RF, w2_EDF.to(dtype).transpose(1, 2), offs=offs_E)
    del a_RF
    out_TD = _combine(y_RD, weight_R, token_idx_R, x_TD.shape[0])
    return h_RH, y_RD, out_TD


def _combine(y_RD: torch.Tensor, weight_R: torch.Tensor, token_idx_R: torch.Tensor, T: int) -> torch.Tensor:
    """out_t = sum_r w_r y_r, accumulated in float32 (or float64) and returned in y's dtype."""
    acc = weight_R.dtype if weight_R.dtype == torch.float64 else torch.float32
    out_TD = torch.zeros(T, y_RD.shape[1], dtype=acc, device=y_RD.device)
    out_TD.index_add_(0, token_idx_R, y_RD.to(acc) * weight_R.to(acc).unsqueeze(-1))
    return out_TD.to(y_RD.dtype)


def _backward_grouped(x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, h_RH, dout_TD, act_name, gated, counts_E):
    offs_E = _offsets(counts_E)
    dtype = x_TD.dtype
    w1 = w1_EHD.to(dtype)
    w2 = w2_EDF.to(dtype)
    dout_RD = dout_TD.to(dtype).index_select(0, token_idx_R)
    a_RF = _act_forward(h_RH, act_name, gated)
    # g_r = dout_t W2_e: dw_r = <dout_t, y_r> = <g_r, a_r>, and dL/da_r = w_r g_r.
    g_RF = F.grouped_mm(dout_RD, w2, offs=offs_E)
    dweight_R = (g_RF.float() * a_RF.float()).sum(-1).to(weight_R.dtype)
    w_R1 = weight_R.to(dtype).unsqueeze(-1)
    dy_RD = dout_RD.mul_(w_R1)
    dw2_EDF = F.grouped_mm(dy_RD.t(), a_RF, offs=offs_E)
    del a_RF, dy_RD, dout_RD
    dh_RH = _act_backward(h_RH, g_RF.mul_(w_R1), act_name, gated)
    del g_RF
    dx_RD = F.grouped_mm(dh_RH, w1, offs=offs_E)
    dx_TD = torch.zeros_like(x_TD).index_add_(0, token_idx_R, dx_RD)
    del dx_RD
    x_RD = x_TD.index_select(0, token_idx_R)
    dw1_EHD = F.grouped_mm(dh_RH.t(), x_RD, offs=offs_E)
    return dx_TD, dw1_EHD.to(w1_EHD.dtype), dw2_EDF.to(w2_EDF.dtype), dweight_R


def _forward_loop(x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, blocks, act_name, gated):
    dtype, cdt = x_TD.dtype, compute_dtype(x_TD)
    R, H, D = token_idx_R.shape[0], w1_EHD.shape[1], x_TD.shape[1]
    h_RH = x_TD.new_empty(R, H)
    y_RD = x_TD.new_empty(R, D)
    acc = weight_R.dtype if weight_R.dtype == torch.float64 else torch.float32
    out_TD = torch.zeros(x_TD.shape[0], D, dtype=acc, device=x_TD.device)
    for e, start, n in blocks:
        rows = slice(start, start + n)
        tok_N = token_idx_R[rows]
        # A block of a few rows is weight-read bound: converting the expert's weights to float32
        # costs more than a half-precision product reading them once (decode).
        bdt = dtype if n <= NATIVE_DTYPE_MAX_ROWS else cdt
        x_ND = x_TD.index_select(0, tok_N).to(bdt)
        if bdt == dtype:  # products write straight into the saved (R, .) buffers
            h_NH = torch.mm(x_ND, w1_EHD[e].to(bdt).t(), out=h_RH[rows])
            y_ND = torch.mm(_act_forward(h_NH, act_name, gated), w2_EDF[e].to(bdt).t(), out=y_RD[rows])
        else:
            h_NH = x_ND @ w1_EHD[e].to(bdt).t()
            h_RH[rows] = h_NH
            y_ND = _act_forward(h_NH, act_name, gated) @ w2_EDF[e].to(bdt).t()
            y_RD[rows] = y_ND
        out_TD.index_add_(0, tok_N, y_ND.to(acc) * weight_R[rows].to(acc).unsqueeze(-1))
    return h_RH, y_RD, out_TD.to(dtype)


def _backward_loop(x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, h_RH, dout_TD, act_name, gated, blocks):
    cdt = compute_dtype(x_TD)
    dw1 = torch.zeros_like(w1_EHD)
    dw2 = torch.zeros_like(w2_EDF)
    dweight_R = torch.empty_like(weight_R)
    dx_TD = torch.zeros(x_TD.shape, dtype=cdt, device=x_TD.device)
    for e, start, n in blocks:
        rows = slice(start, start + n)
        tok_N = token_idx_R[rows]
        dout_ND = dout_TD.index_select(0, tok_N).to(cdt)
        h_NH = h_RH[rows].to(cdt)
        a_NF = _act_forward(h_NH, act_name, gated)
        g_NF = dout_ND @ w2_EDF[e].to(cdt)
        dweight_R[rows] = (g_NF * a_NF).sum(-1).to(weight_R.dtype)
        w_N1 = weight_R[rows].to(cdt).unsqueeze(-1)
        dw2[e] = dout_ND.mul_(w_N1).t() @ a_NF
        dh_NH = _act_backward(h_NH, g_NF.mul_(w_N1), act_name, gated)
        dw1[e] = dh_NH.t() @ x_TD.index_select(0, tok_N).to(cdt)
        dx_TD.index_add_(0, tok_N, dh_NH @ w1_EHD[e].to(cdt))
    return dx_TD.to(x_TD.dtype), dw1, dw2, dweight_R


@torch.compiler.disable
def fused_experts(x_TD: torch.Tensor, w1_EHD: torch.Tensor, w2_EDF: torch.Tensor, weight_R: torch.Tensor,
                  token_idx_R: torch.Tensor, counts_E: torch.Tensor, act_name: str, gated: bool,
                  schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) tokens -> ((T, D) combined output in x's dtype, (R, D) unweighted expert outputs).

    w1_EHD is ``gate_up_proj`` (E, 2F, D) when gated, else ``up_proj`` (E, F, D); w2_EDF is
    ``down_proj`` (E, D, F). Rows of expert e are token_idx_R[offs[e-1]:offs[e]] with
    offs = cumsum(counts_E); weight_R are their combine weights. Gradients flow to x, w1, w2
    and weight_R. schedule is ``grouped`` or ``loop`` (see the module docstring). The second
    output carries no gradient; it is there for finite checks.
    """
    if schedule not in ("grouped", "loop"):
        raise ValueError(f"schedule={schedule!r} is not one of ['grouped', 'loop']")
    if act_name not in _ACT:
        raise ValueError(f"activation={act_name!r} has no fused path; known: {sorted(_ACT)}")
    R = token_idx_R.shape[0]
    if weight_R.shape != (R,):
        raise ValueError(f"weight_R has shape {tuple(weight_R.shape)}, expected ({R},) like token_idx_R")
    return _FusedExperts.apply(x_TD, w1_EHD, w2_EDF, weight_R, token_idx_R, counts_E, act_name, gated, schedule)
