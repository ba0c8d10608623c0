"""Expert-parallel MoE layer: each rank of an EP group holds E/P experts; tokens travel to the
rank owning their expert by all-to-all and come back the same way (GShard, Lepikhin et al. 2020;
the dispatch layout of DeepSpeed-MoE and Megatron-Core).

Shape legend: T local tokens, D model dim, E experts, El = E/P local experts, P EP ranks,
K top-k, S = T*K local routing slots, R kept local rows (grouped by expert, hence by
destination rank), Q rows received from all ranks.

    x (T, D) --router--> top-k --plan--> rows sorted by expert (R, D)
      --all_to_all #1--> (Q, D) in (source rank, expert) order --regroup--> (expert, source)
      --local experts (grouped products)--> --ungroup--> --all_to_all #2--> (R, D)
      --combine (weights, token order)--> (T, D)  [+ shared experts(x), replicated]

Semantics with data parallelism: each rank brings its own tokens; the single-process reference
is the plain layer run on the concatenation of every rank's tokens in rank order. Everything
that depends on more than one token is computed on that global batch:
  * capacity (C = ceil(T_global*K/E * capacity_factor)) and which slots drop: the top-k ids and
    weights (not the activations) are all-gathered, and each rank runs the single-process plan on
    the global batch and keeps its own slots;
  * balancing losses are ``balance.losses``' own functions, given a reduce hook (the layer's
    ``_batch_reduce``: a world sum) that sums their per-expert counts, score sums and token counts
    before the formula; every rank holds the global value, and gradients are arranged so that
    *averaging* gradients over the ranks (``data_parallel.replicate``) gives the single-process gradient
    (see ``all_to_all.global_sum``);
  * routing statistics and the aux-loss-free bias load are all-reduced, so every rank keeps the
    single-process statistics and applies the same bias update; activation checkpointing's
    recomputation counts nothing (``MoE._record``), on every rank alike;
  * padding (``token_mask``): only real tokens are routed, sent and counted, dropless or not, and
    capacity is decided on the world's real tokens (``MoE._route_and_run_valid``). Outputs,
    losses, statistics and gradients equal the single-process layer's with the same mask; padding
    rows get the shared experts' output only (the one-process dropless layer also runs padding
    through the routed experts, whose output there the contract leaves undefined).

``shard_moe`` is a transform in place (as FSDP2's ``fully_shard``): the layer keeps its forward,
router, shared experts, statistics and hooks; only its experts module (now this rank's slice) and
its class (``ExpertParallelMoE``, which overrides the layer's plan/experts/reduce seams) change.

``state_dict()`` of a sharded layer returns full (E, ...) expert tensors gathered over the EP
group, and ``load_state_dict`` accepts full tensors and keeps this rank's slice, so checkpoints
keep the single-process layout and load under any EP size. Both are collective: call them on
every rank of the group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..balance import losses as L
from ..config import ConfigError
from ..dispatch import DispatchPlan, combine, plan_token_choice
from ..experts import MLPExperts, SwiGLUExperts
from ..layer import MoE
from ..router import Routing, TopKRouter
from .all_to_all import all_to_all, exchange_counts, global_sum
from .errors import guarded
from .groups import ParallelGroups


def _shard_experts(experts: nn.Module, groups: ParallelGroups) -> nn.Module:
    """A stacked experts module holding only this rank's E/P experts (copies of their weights)."""
    if type(experts) not in (SwiGLUExperts, MLPExperts):
        raise ConfigError(f"expert parallelism shards stacked SwiGLU/MLP experts; got {type(experts).__name__} "
                          f"(nn.Module experts are not supported yet)")
    E, P = experts.num_experts, groups.ep_size
    if E % P != 0:
        raise ConfigError(f"num_experts={E} is not divisible by expert_parallel={P}")
    ids = groups.experts_of(E)
    shard = type(experts)(E // P, experts.dim, experts.hidden, experts.activation, experts.backend)
    with torch.no_grad():
        for name, p in experts.named_parameters(recurse=False):
            getattr(shard, name).copy_(p[ids.start:ids.stop])
    shard.to(device=next(experts.parameters()).device, dtype=next(experts.parameters()).dtype)
    shard.global_num_experts = E
    shard.register_state_dict_post_hook(_gather_state_hook(groups))
    shard.register_load_state_dict_pre_hook(_slice_state_hook(groups, E))
    return shard


def gather_experts(local: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """(El, ...) on each rank -> (E, ...) in expert order, gathered over the EP group."""
    if groups.ep_size == 1:
        return local.detach().clone()
    groups.require_open("all_gather(expert weights)")
    parts = [torch.empty_like(local) for _ in range(groups.ep_size)]
    guarded("all_gather(expert weights)",
            lambda: dist.all_gather(parts, local.detach().contiguous(), group=groups.ep_group), groups.timeout_s)
    return torch.cat(parts, dim=0)


def _gather_state_hook(groups: ParallelGroups):
    def hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for name, _ in module.named_parameters(recurse=False):
            key = prefix + name
            if key in state:
                state[key] = gather_experts(state[key], groups)
    return hook


def _slice_state_hook(groups: ParallelGroups, num_experts: int):
    ids = groups.experts_of(num_experts)

    def hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for name, p in module.named_parameters(recurse=False):
            key = prefix + name
            if key in state and state[key].shape[0] == num_experts and p.shape[0] != num_experts:
                state[key] = state[key][ids.start:ids.stop]
    return hook


class ExpertParallelMoE(MoE):
    """An MoE layer whose experts are sharded over ``groups.ep_group``; made by ``shard_moe``.

    A transform, not a copy: ``shard_moe`` keeps the layer object (its router, shared experts,
    statistics, buffers and hooks), swaps its experts for this rank's slice and its class for this
    one, as FSDP2's ``fully_shard`` does. The forward is ``MoE``'s; this class overrides only its
    seams: the plan (capacity on the world's batch), the routed experts (all-to-all around the local
    experts), the batch reduction of the losses and bias counts (a differentiable world sum), the
    statistics (all-reduced) and the rows the freeze hooks cover. Forward must run on every rank of
    the world (collectives).
    """

    sharded = True
    groups: ParallelGroups
    local_experts: range
    # Set to a dict to accumulate seconds per phase and bytes sent (benchmarks/expert_parallel.py).
    profile: dict[str, float] | None

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        if self.profile is None:
            yield
            return
        if self.groups.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.groups.device.type == "cuda":
            torch.cuda.synchronize()
        self.profile[name] = self.profile.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ forward
    def forward_with_routing(self, x: torch.Tensor,
                             token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        self.groups.require_open(f"{self.layer_name} forward")
        return super().forward_with_routing(x, token_mask)

    def _routes_padding(self) -> bool:
        """Never: padding would cost all-to-all bytes and expert rows, and the reason the one-process
        dropless layer routes it (no host sync) does not hold here (the split sizes sync anyway)."""
        return False

    def _require_real_tokens(self, num_real: int) -> None:
        """A rank whose tokens are all padding still joins the collectives with zero rows; the error
        is raised (on every rank alike) only when no rank holds a real token."""
        total = torch.tensor([num_real], dtype=torch.long, device=self.available_E.device)
        guarded("all_reduce(real token count)", lambda: dist.all_reduce(total), self.groups.timeout_s)
        super()._require_real_tokens(int(total))

    def _plan(self, routing: Routing, available_E: torch.Tensor | None) -> DispatchPlan:
        """This rank's kept slots, sorted by expert; capacity decided on the global batch. (The profile's
        "routing" phase times this plan; the router itself runs in ``MoE._route_and_run``.)"""
        with self._phase("routing"):
            idx_TK, w_TK = routing.topk_idx_TK, routing.topk_weight_TK
            assert idx_TK is not None and w_TK is not None
            T, K = idx_TK.shape
            E = self.num_experts
            expert_S = idx_TK.reshape(-1)
            routed_E = torch.bincount(expert_S, minlength=E)
            if self.config.router.capacity_factor is None:
                slot_R = torch.argsort(expert_S, stable=True)
            else:
                kept_S = torch.nonzero(self._global_keep(idx_TK, w_TK)).flatten()
                slot_R = kept_S[torch.argsort(expert_S[kept_S], stable=True)]
            counts_E = torch.bincount(expert_S[slot_R], minlength=E)
            return DispatchPlan(token_idx_R=torch.div(slot_R, K, rounding_mode="floor"),
                                weight_R=w_TK.reshape(-1)[slot_R], counts_E=counts_E, slot_idx_R=slot_R,
                                routed_E=routed_E, num_dropped=(routed_E - counts_E).sum(), num_tokens=T, top_k=K)

    def _global_keep(self, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Bool (S,): which local slots the single-process plan on the world's batch keeps."""
        g = self.groups
        T, K = idx_TK.shape
        sizes = [idx_TK.new_zeros(1) for _ in range(g.world_size)]
        guarded("all_gather(token counts)", lambda: dist.all_gather(sizes, idx_TK.new_tensor([T])), g.timeout_s)
        sizes_W = [int(s) for s in sizes]
        Tmax = max(sizes_W)
        pad_idx = idx_TK.new_zeros(Tmax, K)
        pad_idx[:T] = idx_TK
        pad_w = w_TK.detach().new_zeros(Tmax, K)
        pad_w[:T] = w_TK.detach()
        all_idx = [torch.empty_like(pad_idx) for _ in range(g.world_size)]
        all_w = [torch.empty_like(pad_w) for _ in range(g.world_size)]
        guarded("all_gather(top-k ids)", lambda: dist.all_gather(all_idx, pad_idx), g.timeout_s)
        guarded("all_gather(top-k weights)", lambda: dist.all_gather(all_w, pad_w), g.timeout_s)
        idx_GK = torch.cat([a[:n] for a, n in zip(all_idx, sizes_W)])
        w_GK = torch.cat([a[:n] for a, n in zip(all_w, sizes_W)])
        empty = w_GK.new_empty(0)
        glob = plan_token_choice(Routing(logits_TE=empty, scores_TE=empty, topk_idx_TK=idx_GK, topk_weight_TK=w_GK),
                                 self.num_experts, self.config.router.capacity_factor, self.config.router.drop_policy)
        keep_G = torch.zeros(idx_GK.numel(), dtype=torch.bool, device=idx_TK.device)
        keep_G[glob.slot_idx_R] = True
        start = sum(sizes_W[:g.rank]) * K
        return keep_G[start:start + T * K]

    def _run_routed(self, x_TD: torch.Tensor, plan: DispatchPlan,
                    check: Callable[[torch.Tensor, DispatchPlan], None] | None) -> torch.Tensor:
        """Rows to the ranks owning their experts, through the local experts, and back. ``check`` (the
        finite check) is not run: raising on the ranks that hold a bad row would hang the others."""
        g = self.groups
        P, El = g.ep_size, self.num_experts // g.ep_size
        with self._phase("permute"):
            x_RD = x_TD.index_select(0, plan.token_idx_R)
        # The experts' data-parallel wrapper (``data_parallel.replicate``), when there is one.
        experts = self.__dict__.get("_dp_experts")
        if experts is None:
            experts = self.experts
        if P == 1:
            with self._phase("experts"):
                y_RD = experts(x_RD, plan.counts_E)
            with self._phase("combine"):
                return combine(y_RD, plan, x_TD.dtype)
        with self._phase("all_to_all_dispatch"):
            send_PX = plan.counts_E.view(P, El)
            recv_PX = exchange_counts(send_PX, g.ep_group, g.timeout_s)
            send_splits = send_PX.sum(dim=1).tolist()
            recv_splits = recv_PX.sum(dim=1).tolist()
            x_QD = all_to_all(x_RD, send_splits, recv_splits, g.ep_group, "tokens", g.timeout_s)
        with self._phase("experts"):
            # Rows arrive in (source rank, local expert) blocks; the grouped product wants them by expert.
            block_Q = torch.repeat_interleave(torch.arange(P * El, device=x_QD.device), recv_PX.reshape(-1))
            order_Q = torch.argsort((block_Q % El) * P + block_Q // El, stable=True)
            y_QD = experts(x_QD.index_select(0, order_Q), recv_PX.sum(dim=0))
            inverse_Q = torch.empty_like(order_Q)
            inverse_Q[order_Q] = torch.arange(order_Q.shape[0], device=order_Q.device)
            y_QD = y_QD.index_select(0, inverse_Q)
        with self._phase("all_to_all_combine"):
            y_RD = all_to_all(y_QD, recv_splits, send_splits, g.ep_group, "expert outputs", g.timeout_s)
        if self.profile is not None:
            remote = sum(send_splits) - send_splits[g.ep_rank] + sum(recv_splits) - recv_splits[g.ep_rank]
            self.profile["bytes_sent"] = self.profile.get("bytes_sent", 0.0) + remote * x_RD.shape[1] * x_RD.element_size()
        with self._phase("combine"):
            return combine(y_RD, plan, x_TD.dtype)

    # ------------------------------------------------------------------ global losses and statistics
    def _record(self, routing: Routing, plan: DispatchPlan, lead: tuple[int, ...],
                valid_T: torch.Tensor | None = None) -> None:
        with self._phase("losses_stats"):
            super()._record(routing, plan, lead, valid_T)

    def _batch_reduce(self) -> L.Reduce:
        """The world sum (every rank holds a share of the batch), differentiable under gradient
        averaging (``all_to_all.global_sum``): ``balance.losses`` reduces its counts and sums with it."""
        timeout_s = self.groups.timeout_s
        return lambda x: global_sum(x, None, timeout_s)

    @torch.no_grad()
    def _update_stats(self, routing: Routing, plan: DispatchPlan, valid_T: torch.Tensor | None) -> None:
        """``RoutingStats.update`` with this forward's increments summed over the world, so every rank
        keeps the single-process statistics."""
        stats = self.stats
        names = [n for n, buf in stats.named_buffers(recurse=False) if buf.is_floating_point()]
        before = {n: getattr(stats, n).clone() for n in names}
        idle_before = stats.idle_steps_E.clone()
        stats.update(routing, plan, valid_T)
        delta = torch.cat([(getattr(stats, n) - before[n]).reshape(-1) for n in names])
        guarded("all_reduce(routing statistics)", lambda: dist.all_reduce(delta), self.groups.timeout_s)
        offset = 0
        for n in names:
            buf = getattr(stats, n)
            buf.copy_(before[n] + delta[offset:offset + buf.numel()].view_as(buf))
            offset += buf.numel()
        used_E = (stats.tokens_E - before["tokens_E"]) > 0
        stats.idle_steps_E.copy_((idle_before + 1).masked_fill(used_E, 0))

    def _expert_rows(self) -> range:
        return self.local_experts

    def extra_repr(self) -> str:
        ids = self.local_experts
        return (f"{super().extra_repr()}, expert_parallel={self.groups.ep_size}, "
                f"local experts [{ids.start}, {ids.stop})")


def shard_moe(layer: MoE, groups: ParallelGroups) -> ExpertParallelMoE:
    """Make ``layer`` expert-parallel on this rank, in place (like ``fully_shard``), and return it:
    same object, router and state; its experts become this rank's slice."""
    if isinstance(layer, ExpertParallelMoE):
        raise ValueError(f"{layer.layer_name} is already expert-parallel")
    cfg = layer.config
    if not isinstance(layer.router, TopKRouter):
        raise ConfigError(f"expert parallelism needs a token-choice router; router.kind={cfg.router.kind!r}")
    if cfg.num_experts % groups.ep_size != 0:
        raise ConfigError(f"num_experts={cfg.num_experts} is not divisible by expert_parallel={groups.ep_size}")
    shard = _shard_experts(layer.experts, groups)
    # The old stacked weights go with their freeze hooks; the local ones are hooked on the next forward.
    layer._freeze_hooks.clear()
    layer.experts = shard
    layer.__class__ = ExpertParallelMoE
    assert isinstance(layer, ExpertParallelMoE)
    layer.groups = groups
    layer.local_experts = groups.experts_of(cfg.num_experts)
    layer.profile = None
    return layer


def shard_model(model: nn.Module, groups: ParallelGroups, sync: bool = True) -> nn.Module:
    """Make every MoE layer of ``model`` expert-parallel (in place, ``shard_moe``); returns the model.

    With ``sync``, parameters are first made identical across replicas: non-expert parameters
    and buffers are broadcast from rank 0, so ranks that initialised differently still agree.
    """
    if sync and groups.world_size > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            guarded("broadcast(parameters)", lambda t=t: dist.broadcast(t.data, src=0), groups.timeout_s)
    for module in list(model.modules()):
        if isinstance(module, MoE) and not isinstance(module, ExpertParallelMoE):
            shard_moe(module, groups)
    return model


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that are expert shards (averaged over their replicas only)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            ids.update(id(p) for p in module.experts.parameters())
    return ids
