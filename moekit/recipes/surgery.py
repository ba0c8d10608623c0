"""Expert surgery on a trained MoE ``LM``: add, remove or merge experts.

Every function returns a new model (the input is left untouched) whose config says the new
expert count, so checkpoints of it round-trip through ``save_model`` / ``load_trained``. All MoE
layers of an ``LM`` share one expert count, so every layer gains or loses the same number.

Adding: the new experts copy a parent expert's weights (optionally with multiplicative noise) and
its router row, and the router gets a logit bias (existing experts 0, new ones -gap). With
``calibration`` inputs the gap is measured so that on them no new expert reaches any token's
top-k: routing, and with renormalised top-k weights the outputs, are unchanged at first, while
the new experts still get gradient through the softmax and the balancing loss (the "grow then
train" of e.g. Lifelong-MoE, Chen et al. 2023, with a router init that keeps routing). The gap is
measured on logits, so the guarantee holds for routers that select by score alone (not with an
aux-loss-free selection bias, which is added after the score function).
Merging averages the experts' weights (optionally weighted by their load) and router rows, as in
M-SMoE (Li et al. 2024, "Merge, Then Compress") without its permutation alignment.

Shape legend: E experts, E' new count, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..lm.config import LMConfig
from ..lm.model import LM
from .common import moe_blocks, with_moe


@torch.no_grad()
def _rebuild(model: LM, new_cfg: LMConfig,
             build_rows: Callable[[int, str, torch.Tensor | None], torch.Tensor]) -> LM:
    """New LM of ``new_cfg``, weights copied from ``model``; each MoE layer's stacked expert
    tensors and router tensors come from ``build_rows(block_idx, name, old_tensor) -> new``."""
    new = LM(new_cfg)
    old_state = model.state_dict()
    new_state = new.state_dict()
    moe_idx = {i for i, _ in moe_blocks(model)}
    for name, target in new_state.items():
        block = int(name.split(".")[1]) if name.startswith("layers.") else None
        if block in moe_idx and (".mlp.experts." in name or ".mlp.router." in name):
            target.copy_(build_rows(block, name, old_state.get(name)))
        elif name in old_state:
            target.copy_(old_state[name])
    return new


@torch.no_grad()
def add_experts(model: LM, n: int, parents: Sequence[int] | None = None, noise: float = 0.0,
                calibration: torch.Tensor | None = None, margin: float = 1.0, gap: float = 8.0,
                bias_update_rate: float | None = None, seed: int = 0) -> LM:
    """``model`` with ``n`` more experts per MoE layer, appended as ids E..E+n-1.

    parents: the expert each new one copies (default 0, 1, ... cycling); noise: relative noise on
    the copies. The new experts' router logit bias is -(max over calibration tokens of
    new logit - k-th logit) - margin when ``calibration`` (B, S) ids are given, else -gap.
    Such experts get almost no gradient (their softmax probability is tiny), so they stay unused
    under plain training; ``bias_update_rate`` turns on aux-loss-free balancing (DeepSeek-V3's
    selection bias, starting at 0 so routing is still unchanged at first), which raises the
    under-loaded new experts' selection bias each step until tokens reach them.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE layers")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    E = blocks[0][1].num_experts
    parents = [i % E for i in range(n)] if parents is None else list(parents)
    if len(parents) != n or any(not 0 <= p < E for p in parents):
        raise ValueError(f"parents={parents} must list {n} expert ids in [0, {E})")
    if blocks[0][1].config.router.kind not in ("softmax_topk", "noisy_topk", "switch", "sigmoid_topk"):
        raise ValueError(f"add_experts supports token-choice routers, not {blocks[0][1].config.router.kind!r}")
    biases = _new_expert_bias(model, parents, calibration, margin) if calibration is not None else {
        i: -gap for i, _ in blocks}
    gen = torch.Generator().manual_seed(seed)
    router_changes: dict[str, object] = {"logit_bias": True}
    if bias_update_rate is not None:
        router_changes["bias_update_rate"] = bias_update_rate
    new_cfg = with_moe(model.config, num_experts=E + n, router=router_changes)

    def rows(block: int, name: str, old: torch.Tensor | None) -> torch.Tensor:
        layer = model.layers[block].mlp
        if name.endswith("router.bias"):
            base = old if old is not None else torch.zeros(E, dtype=layer.router.weight.dtype)
            return torch.cat([base, base[parents] + biases[block]])
        if name.endswith("router.selection_bias"):
            return torch.zeros(E + n) if old is None else torch.cat([old, old[parents]])
        new_rows = old[parents]
        if ".experts." in name and noise > 0:
            new_rows = new_rows * (1 + noise * torch.randn(new_rows.shape, generator=gen, dtype=new_rows.dtype))
        return torch.cat([old, new_rows])

    return _rebuild(model, new_cfg, build_rows=rows)


@torch.no_grad()
def _new_expert_bias(model: LM, parents: list[int], ids_BS: torch.Tensor, margin: float) -> dict[int, float]:
    """Per MoE block: a bias that keeps every copied router row below every calibration token's
    k-th logit by at least ``margin``."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in moe_blocks(model):
        def hook(module, args, output, i=i):
            captured[i] = output.logits_TE.detach()
        handles.append(layer.router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(ids_BS)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for i, layer in moe_blocks(model):
        logits_TE = captured[i]
        kth_T = logits_TE.topk(layer.top_k, dim=-1).values[:, -1]
        worst = float((logits_TE[:, parents] - kth_T[:, None]).max())
        out[i] = -worst - margin
    return out


@torch.no_grad()
def remove_experts(model: LM, experts: Sequence[int] | dict[int, Sequence[int]]) -> LM:
    """``model`` without the given experts: the same ids in every MoE block, or {block: ids} with
    the same count in each. Remaining experts keep their order (ids shift down)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE layers")
    E = blocks[0][1].num_experts
    drop = {i: sorted(set(experts)) for i, _ in blocks} if not isinstance(experts, dict) else {
        int(k): sorted(set(v)) for k, v in experts.items()}
    missing = sorted(set(i for i, _ in blocks) - set(drop))
    if missing:
        raise ValueError(f"no experts to remove given for MoE blocks {missing}")
    counts = {len(v) for v in drop.values()}
    if len(counts) != 1:
        raise ValueError(f"every MoE block must lose the same number of experts, got {drop}")
    for i, ids in drop.items():
        bad = [e for e in ids if not 0 <= e < E]
        if bad:
            raise IndexError(f"block {i}: expert ids {bad} out of range [0, {E})")
    new_E = E - counts.pop()
    top_k = blocks[0][1].top_k
    if new_E < top_k:
        raise ValueError(f"removing leaves {new_E} experts, fewer than top_k={top_k}")
    keep = {i: [e for e in range(E) if e not in drop[i]] for i in drop}
    new_cfg = with_moe(model.config, num_experts=new_E, router=_group_fix(model, new_E))

    def rows(block: int, name: str, old: torch.Tensor | None) -> torch.Tensor:
        return old[keep[block]]

    return _rebuild(model, new_cfg, build_rows=rows)


@torch.no_grad()
def merge_experts(model: LM, groups: Sequence[Sequence[int]], load_weighted: bool = True) -> LM:
    """``model`` with each group of experts (the same groups in every MoE block) merged into one,
    placed at the group's smallest id's position among the survivors. With ``load_weighted``
    the average is weighted by each expert's routed-token count in the layer's statistics."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE layers")
    E = blocks[0][1].num_experts
    groups = [sorted(set(int(e) for e in g)) for g in groups]
    flat = [e for g in groups for e in g]
    if len(flat) != len(set(flat)) or any(not 0 <= e < E for e in flat) or any(len(g) < 2 for g in groups):
        raise ValueError(f"groups={groups} must be disjoint lists of >= 2 expert ids in [0, {E})")
    head = {g[0]: g for g in groups}
    survivors = [e for e in range(E) if e not in flat or e in head]
    new_E = len(survivors)
    if new_E < blocks[0][1].top_k:
        raise ValueError(f"merging leaves {new_E} experts, fewer than top_k={blocks[0][1].top_k}")
    loads = {}
    for i, layer in blocks:
        load_E = layer.stats.tokens_E.detach().cpu() if load_weighted else None
        loads[i] = load_E.double() if load_E is not None else torch.ones(E, dtype=torch.float64)
    new_cfg = with_moe(model.config, num_experts=new_E, router=_group_fix(model, new_E))

    def rows(block: int, name: str, old: torch.Tensor | None) -> torch.Tensor:
        out = []
        for e in survivors:
            members = head.get(e, [e])
            w = loads[block][members]
            w = torch.full_like(w, 1 / len(members)) if float(w.sum()) <= 0 else w / w.sum()
            w = w.to(old.dtype).view(-1, *([1] * (old.dim() - 1)))
            out.append((old[members] * w).sum(dim=0))
        return torch.stack(out)

    return _rebuild(model, new_cfg, build_rows=rows)


def _group_fix(model: LM, new_E: int) -> dict[str, int]:
    r = model.config.moe.router
    return {} if new_E % r.n_group == 0 else {"n_group": 1, "topk_group": 1}
