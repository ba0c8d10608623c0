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
  * balancing losses use global counts and global score sums (all-reduced); every rank holds the
    global value, and gradients are arranged so that *averaging* gradients over the ranks
    (``reduce_gradients``) gives the single-process gradient (see ``all_to_all.global_sum``);
  * routing statistics and the aux-loss-free bias load are all-reduced, so every rank keeps the
    single-process statistics and applies the same bias update.

``state_dict()`` of a sharded layer returns full (E, ...) expert tensors gathered over the EP
group, and ``load_state_dict`` accepts full tensors and keeps this rank's slice, so checkpoints
keep the single-process layout and load under any EP size. Both are collective: call them on
every rank of the group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
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
    """An MoE layer whose experts are sharded over ``groups.ep_group``; built by ``shard_moe``.

    It adopts the given layer's router, shared experts, statistics and buffers and keeps only
    its slice of the experts. Forward must run on every rank of the world (collectives).
    """

    def __init__(self, layer: MoE, groups: ParallelGroups) -> None:
        nn.Module.__init__(self)
        cfg = layer.config
        if not isinstance(layer.router, TopKRouter):
            raise ConfigError(f"expert parallelism needs a token-choice router; router.kind={cfg.router.kind!r}")
        if cfg.balance.aux_loss_convention == "mixtral" and cfg.balance.aux_loss_coef > 0:
            raise ConfigError("balance.aux_loss_convention='mixtral' pools routings across layers in "
                              "moekit.aux_loss, which is not all-reduced; use 'moekit' or 'switch' under "
                              "expert parallelism")
        if cfg.balance.aux_loss_convention == "switch_group" and cfg.balance.aux_loss_coef > 0:
            raise ConfigError("balance.aux_loss_convention='switch_group' is not all-reduced under expert "
                              "parallelism; use 'moekit' or 'switch'")
        if cfg.num_experts % groups.ep_size != 0:
            raise ConfigError(f"num_experts={cfg.num_experts} is not divisible by expert_parallel={groups.ep_size}")
        # Adopt the layer's modules, buffers and state (the module dicts are copied, not shared).
        self.__dict__.update({k: (dict(v) if k in ("_parameters", "_buffers", "_modules") else v)
                              for k, v in vars(layer).items()})
        self.groups = groups
        self.local_experts = groups.experts_of(cfg.num_experts)
        self._modules["experts"] = _shard_experts(layer.experts, groups)
        # Set to a dict to accumulate seconds per phase and bytes sent (benchmarks/expert_parallel.py).
        self.profile: dict[str, float] | None = None

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
    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if token_mask is not None:
            raise NotImplementedError(f"{self.layer_name}: token_mask (padding) is not supported under expert "
                                      f"parallelism yet; pack sequences without padding instead")
        self.groups.require_open(f"{self.layer_name} forward")
        shape = x.shape
        x_TD = self._tokens(x)
        with self._phase("routing"):
            routing = self.router(x_TD, self.available_E if self._any_masked else None)
            plan = self._local_plan(routing)
        out_TD = self._dispatch_compute_combine(x_TD, plan)
        if self.shared_experts is not None:
            with self._phase("shared_experts"):
                out_TD = out_TD + self.shared_experts(x_TD)
        batch = math.prod(shape[:-2]) if len(shape) >= 3 else 1
        with self._phase("losses_stats"):
            self._record_global(routing, plan, batch)
        self._run_routing_hooks(routing, plan, tuple(shape[:-1]))  # moekit.capture_routing
        return out_TD.view(shape)

    def _local_plan(self, routing: Routing) -> DispatchPlan:
        """This rank's kept slots, sorted by expert; capacity decided on the global batch."""
        idx_TK, w_TK = routing.topk_idx_TK, routing.topk_weight_TK
        assert idx_TK is not None and w_TK is not None
        T, K = idx_TK.shape
        E = self.num_experts
        expert_S = idx_TK.reshape(-1)
        routed_E = torch.bincount(expert_S, minlength=E)
        cf = self.config.router.capacity_factor
        if cf is None:
            slot_R = torch.argsort(expert_S, stable=True)
        else:
            kept_S = torch.nonzero(self._global_keep(idx_TK, w_TK)).flatten()
            slot_R = kept_S[torch.argsort(expert_S[kept_S], stable=True)]
        counts_E = torch.bincount(expert_S[slot_R], minlength=E)
        return DispatchPlan(token_idx_R=torch.div(slot_R, K, rounding_mode="floor"), weight_R=w_TK.reshape(-1)[slot_R],
                            counts_E=counts_E, slot_idx_R=slot_R, routed_E=routed_E,
                            num_dropped=(routed_E - counts_E).sum(), num_tokens=T, top_k=K)

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

    def _dispatch_compute_combine(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        g = self.groups
        P, El = g.ep_size, self.num_experts // g.ep_size
        with self._phase("permute"):
            x_RD = x_TD.index_select(0, plan.token_idx_R)
        if P == 1:
            with self._phase("experts"):
                y_RD = self.experts(x_RD, plan.counts_E)
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
            y_QD = self.experts(x_QD.index_select(0, order_Q), recv_PX.sum(dim=0))
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
    def _record_global(self, routing: Routing, plan: DispatchPlan, batch: int) -> None:
        cfg, g, E = self.config, self.groups, self.num_experts
        idx_TK = routing.topk_idx_TK
        # The reference conventions count the picks of the plain scores (no selection bias, no group limit).
        plain_top1_E = torch.bincount(L.plain_topk(routing, 1).reshape(-1), minlength=E)
        plain_topk_E = torch.bincount(L.plain_topk(routing, idx_TK.shape[1]).reshape(-1), minlength=E)
        counts = torch.cat([plan.routed_E, plain_top1_E, plain_topk_E,
                            torch.tensor([routing.num_tokens, batch], device=idx_TK.device)])
        guarded("all_reduce(expert counts)", lambda: dist.all_reduce(counts), g.timeout_s)
        routed_E, top1_E, plain_E = counts[:E], counts[E:2 * E], counts[2 * E:3 * E]
        T, B = int(counts[3 * E]), int(counts[3 * E + 1])
        self.last_routing = Routing(**{k: (v.detach() if isinstance(v, torch.Tensor) else v)
                                       for k, v in vars(routing).items()})
        self.last_plan = plan
        if cfg.track_stats:
            self._update_stats_global(routing, plan)
        if self.training and self.router.selection_bias is not None and cfg.router.bias_update_rate is not None:
            self.bias_load_E += routed_E
        self._pooled_routing = None
        if self.training and torch.is_grad_enabled():
            self.aux_loss, self.last_losses = self._global_losses(routing, routed_E, top1_E, plain_E, T, batch, B)
        else:
            self.aux_loss, self.last_losses = routing.logits_TE.new_zeros(()), {}

    def _global_losses(self, routing: Routing, routed_E: torch.Tensor, top1_E: torch.Tensor, plain_E: torch.Tensor,
                       T: int, batch: int, B: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The single-process losses of the world's batch, from all-reduced counts and sums.

        ``routed_E`` counts the layer's own picks, ``top1_E``/``plain_E`` the plain-score top-1/top-k."""
        b, E, K, g = self.config.balance, self.num_experts, self.top_k, self.groups
        total = routing.logits_TE.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        if b.aux_loss_coef > 0:
            psum_E = global_sum(L.normalized_scores(routing).sum(dim=0), None, g.timeout_s)
            if b.aux_loss_convention == "switch":
                value = E * ((top1_E.to(psum_E.dtype) / T) * (psum_E / T)).sum()
            else:
                counts_E = plain_E if b.aux_loss_convention == "megatron" else routed_E
                value = E / (K * T * T) * (psum_E * counts_E.to(psum_E.dtype)).sum()
            terms["aux"] = value
            total = total + b.aux_loss_coef * value
        if b.z_loss_coef > 0:
            terms["z"] = value = global_sum(torch.logsumexp(routing.logits_TE, dim=-1).square().sum(), None,
                                            g.timeout_s) / T
            total = total + b.z_loss_coef * value
        if b.cv_loss_coef > 0:
            importance_E = global_sum(L.importance(routing, E), None, g.timeout_s)
            load_E = global_sum(L.smooth_load(routing, E, K), None, g.timeout_s)
            terms["cv"] = value = (L.cv_squared(importance_E, unbiased=b.cv_unbiased)
                                   + L.cv_squared(load_E, unbiased=b.cv_unbiased))
            total = total + b.cv_loss_coef * value
        if b.seq_aux_loss_coef > 0:
            local = L.sequence_aux_loss(routing, E, batch) * batch
            terms["seq_aux"] = value = global_sum(local, None, g.timeout_s) / B
            total = total + b.seq_aux_loss_coef * value
        return total, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def _update_stats_global(self, routing: Routing, plan: DispatchPlan) -> None:
        stats = self.stats
        names = [n for n, buf in stats.named_buffers(recurse=False) if buf.is_floating_point()]
        before = {n: getattr(stats, n).clone() for n in names}
        idle_before = stats.idle_steps_E.clone()
        stats.update(routing, plan)
        delta = torch.cat([(getattr(stats, n) - before[n]).reshape(-1) for n in names])
        guarded("all_reduce(routing statistics)", lambda: dist.all_reduce(delta), self.groups.timeout_s)
        offset = 0
        for n in names:
            buf = getattr(stats, n)
            buf.copy_(before[n] + delta[offset:offset + buf.numel()].view_as(buf))
            offset += buf.numel()
        used_E = (stats.tokens_E - before["tokens_E"]) > 0
        stats.idle_steps_E.copy_((idle_before + 1).masked_fill(used_E, 0))

    # ------------------------------------------------------------------ expert control
    def _zero_frozen_grad(self, grad: torch.Tensor) -> torch.Tensor:
        ids = self.local_experts
        keep = (~self.frozen_E[ids.start:ids.stop]).to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return grad * keep

    def _ensure_freeze_hooks(self) -> None:
        El = self.num_experts // self.groups.ep_size
        for p in self.experts.parameters():
            if p.dim() >= 1 and p.shape[0] == El:
                hooks = getattr(p, "_backward_hooks", None) or {}
                if not any(h == self._zero_frozen_grad for h in hooks.values()):
                    p.register_hook(self._zero_frozen_grad)

    def extra_repr(self) -> str:
        ids = self.local_experts
        return (f"{super().extra_repr()}, expert_parallel={self.groups.ep_size}, "
                f"local experts [{ids.start}, {ids.stop})")


def shard_moe(layer: MoE, groups: ParallelGroups) -> ExpertParallelMoE:
    """The expert-parallel version of ``layer`` on this rank (same router, its slice of experts)."""
    if isinstance(layer, ExpertParallelMoE):
        raise ValueError(f"{layer.layer_name} is already expert-parallel")
    return ExpertParallelMoE(layer, groups)


def shard_model(model: nn.Module, groups: ParallelGroups, sync: bool = True) -> nn.Module:
    """Replace every MoE layer of ``model`` (in place) by its expert-parallel shard; returns the model.

    With ``sync``, parameters are first made identical across replicas: non-expert parameters
    and buffers are broadcast from rank 0, so ranks that initialised differently still agree.
    """
    if sync and groups.world_size > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            guarded("broadcast(parameters)", lambda t=t: dist.broadcast(t.data, src=0), groups.timeout_s)
    if isinstance(model, MoE):
        return shard_moe(model, groups)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                setattr(module, child_name, shard_moe(child, groups))
    return model


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that are expert shards (averaged over their replicas only)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            ids.update(id(p) for p in module.experts.parameters())
    return ids
