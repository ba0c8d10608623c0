"""The MoE layer: router -> dispatch -> experts -> combine, plus shared experts.

Shape legend: T tokens (all leading dims flattened), D model dim, E experts, K top-k,
R rows after dispatch (grouped by expert).

    x (..., D) --router--> Routing --plan--> rows grouped by expert --experts--> y (R, D)
      --combine (weighted, back to token order)--> (..., D)  [+ shared experts(x)]

What a forward leaves behind, all public:
* ``aux_loss`` (0-dim, differentiable) and ``last_losses`` (each unweighted term, detached): the
  balancing losses of the last training forward (zero outside training); ``pooled_loss_sums``
  (``balance.losses.PooledSums`` or None): the per-expert sums of losses pooled over layers (the
  ``mixtral`` convention). ``moekit.aux_loss(model)`` adds them all up.
* ``stats`` (``RoutingStats``): routing statistics in buffers, no host sync.
* Nothing else: the routing and the dispatch plan are handed to routing hooks
  (``register_routing_hook``), opt-in, as ``moekit.capture_routing(model)`` does.
Activation checkpointing (``torch.utils.checkpoint``, either mode) runs a forward a second time
during backward; that recomputation counts in no statistic, bias count or hook, and leaves the
losses of the first forward in place. Under the reentrant mode the first forward runs without
grad, so the balancing losses cannot reach the backward: use ``use_reentrant=False``.

Nothing here syncs with the host on the hot path except the grouped-product fallback and the
finite checks (on in eval mode by default, ``check_finite`` sets them).

Padding: ``forward(x, token_mask)`` takes a mask of x's leading shape (1/True = real token).
Padding tokens count in no loss, statistic or bias-update count. Dropless token choice still
routes and computes them (static shapes, no host sync; their outputs are meaningless but
finite); with a capacity (or expert choice, whose picks depend on the whole batch) only the
real tokens are routed, so padding takes no capacity: one host sync, and padding tokens get a
zero routed output (plus the shared experts').
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .balance import losses as L
from .config import MoEConfig, moe_config
from .dispatch import DispatchPlan, plan_expert_choice, plan_token_choice, run_experts
from .dispatch.run import stage
from .experts import MLPExperts, ModuleExperts, SharedExperts, SwiGLUExperts
from .ops import all_finite
from .router import Routing, build_router
from .stats import LayerReport, RoutingStats


class ExpertNonFiniteError(FloatingPointError):
    """An expert produced NaN/Inf; ``experts`` lists their indices, ``layer`` names the layer."""

    def __init__(self, layer: str, experts: list[int]) -> None:
        self.layer, self.experts = layer, experts
        super().__init__(f"{layer}: expert(s) {experts} produced NaN/Inf outputs; mask them with "
                         f"layer.mask_experts({experts}) to keep serving with the others")


@dataclass
class RoutingEvent:
    """One counted forward of one MoE layer, as routing hooks receive it (tensors detached).

    routing   the ``Routing`` of the T = prod(shape) tokens (padding rows included).
    plan      the ``DispatchPlan``; its counts leave padding out.
    shape     the input's leading shape (x.shape[:-1]).
    valid_T   (T,) bool, True at real tokens, when the forward got a ``token_mask``; else None.
    """

    routing: Routing
    plan: DispatchPlan
    shape: tuple[int, ...]
    valid_T: torch.Tensor | None = None


RoutingHook = Callable[["MoE", RoutingEvent], None]


def recomputing() -> bool:
    """True while a forward runs inside autograd's backward pass, i.e. as activation checkpointing's
    recomputation (torch.utils.checkpoint runs it from the backward in both modes). PyTorch has no
    public flag for this; the autograd engine's graph-task id is -1 outside a backward pass."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Mixture-of-Experts layer mapping (..., dim) to (..., dim).

    Build from a config, or from keywords (see ``moekit.config.moe_config``)::

        layer = MoE(dim=512, num_experts=8, expert_hidden=1024, top_k=2)
        layer = MoE(cfg, experts=[my_module_0, my_module_1, ...])   # arbitrary nn.Module experts
    """

    # True on a layer whose experts are split over processes (``moekit.parallel.shard_moe``): its
    # forward runs collectives, so single-process tools (router replay) refuse it.
    sharded: bool = False

    def __init__(self, config: MoEConfig | None = None, *, experts: Sequence[nn.Module] | nn.Module | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = moe_config(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a MoEConfig or keywords, not both (got {sorted(kwargs)})")
        self.config = cfg = config
        self.num_experts, self.dim, self.top_k = cfg.num_experts, cfg.dim, cfg.router.top_k
        # Named once by the model that holds the layer (LM, patch_model, model_ops.name_moe_layers).
        self.layer_name = "MoE"
        self.router = build_router(cfg.dim, cfg.num_experts, cfg.router)
        self.experts = self._build_experts(cfg, experts)
        self.shared_experts = None
        if cfg.shared.num > 0:
            hidden = cfg.shared.hidden or cfg.shared.num * cfg.expert_hidden
            self.shared_experts = SharedExperts(cfg.dim, hidden, cfg.activation, cfg.shared.gated)
        self.stats = RoutingStats(cfg.num_experts, cfg.dead_window)
        self.register_buffer("available_E", torch.ones(cfg.num_experts, dtype=torch.bool), persistent=False)
        self.register_buffer("frozen_E", torch.zeros(cfg.num_experts, dtype=torch.bool), persistent=False)
        # Assignments per expert since the last bias update (aux-loss-free balancing).
        self.register_buffer("bias_load_E", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False)
        self._any_frozen = False
        self._any_masked = False
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_losses: dict[str, float | torch.Tensor] = {}
        self.pooled_loss_sums: L.PooledSums | None = None
        self._routing_hooks: OrderedDict[int, RoutingHook] = OrderedDict()
        # Gradient hooks zeroing frozen experts' rows, by id() of the stacked weight they sit on.
        self._freeze_hooks: dict[int, RemovableHandle] = {}
        # Router replay (moekit.replay): expert ids (..., K) long, of the input's leading shape, chosen
        # in place of the router's top-k; the weights still come from the router's scores.
        self.replay_topk_idx: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles hold the last forward's losses detached: a copy must not share (or try to
        deep-copy) the autograd graph of the forward that made them."""
        state = super().__getstate__()
        state["aux_loss"] = self.aux_loss.detach()
        state["last_losses"] = {k: v.detach() if isinstance(v, torch.Tensor) else v
                                for k, v in self.last_losses.items()}
        sums = self.pooled_loss_sums
        if sums is not None:
            state["pooled_loss_sums"] = dataclasses.replace(sums, scores_E=sums.scores_E.detach())
        return state

    @staticmethod
    def _build_experts(cfg: MoEConfig, experts: Sequence[nn.Module] | nn.Module | None) -> nn.Module:
        if experts is None:
            cls = SwiGLUExperts if cfg.expert_kind == "swiglu" else MLPExperts
            return cls(cfg.num_experts, cfg.dim, cfg.expert_hidden, cfg.activation, cfg.backend)
        if isinstance(experts, nn.Module) and hasattr(experts, "num_experts"):
            module = experts
        else:
            module = ModuleExperts(list(experts))
        if module.num_experts != cfg.num_experts:
            raise ValueError(f"got {module.num_experts} expert modules but num_experts={cfg.num_experts}")
        return module

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., D) -> (..., D); ``token_mask`` (...) marks real tokens (see the module docstring)."""
        return self.forward_with_routing(x, token_mask)[0]

    def forward_with_routing(self, x: torch.Tensor,
                             token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        """``forward``, also returning this forward's ``Routing`` (differentiable), for wrappers that
        hand router outputs on, as Hugging Face's sparse blocks do."""
        shape = x.shape
        x_TD = self._tokens(x)
        forced_TK = None if self.replay_topk_idx is None else self._replayed_experts(shape)
        if token_mask is None:
            routing, plan, out_TD = self._route_and_run(x_TD, forced_TK)
            valid_T = None
        else:
            valid_T = self._valid_tokens(token_mask, shape)
            if self._routes_padding():
                routing, plan, out_TD = self._route_and_run(x_TD, forced_TK)
                plan = _valid_counts_plan(plan, routing, valid_T, self.num_experts)
            else:
                routing, plan, out_TD = self._route_and_run_valid(x_TD, valid_T, forced_TK)
        if self.shared_experts is not None:
            with stage("experts"):
                out_TD = out_TD + self.shared_experts(x_TD)

        self._record(routing, plan, tuple(shape[:-1]), valid_T)
        return out_TD.view(shape), routing

    def _route_and_run(self, x_TD: torch.Tensor,
                       forced_TK: torch.Tensor | None = None) -> tuple[Routing, DispatchPlan, torch.Tensor]:
        """Router -> plan -> routed experts -> combine, for all T tokens (with ``forced_TK``, those experts)."""
        available_E = self.available_E if self._any_masked else None
        with stage("router"):  # profiler ranges (dispatch.run.stage), read by explain.latency
            routing = self.router(x_TD, available_E)
            if forced_TK is not None:
                routing = self.router.replay(routing, forced_TK)
        with stage("dispatch"):
            plan = self._plan(routing, available_E)
        check = self._check_expert_outputs if self.checks_finite else None
        return routing, plan, self._run_routed(x_TD, plan, check)

    # Seams for parallel transforms (moekit.parallel.expert_parallel overrides these, and
    # _routes_padding / _require_real_tokens below).
    def _plan(self, routing: Routing, available_E: torch.Tensor | None) -> DispatchPlan:
        """The dispatch plan of one routing (the kept slots, grouped by expert)."""
        if routing.is_token_choice:
            return plan_token_choice(routing, self.num_experts, self.config.router.capacity_factor,
                                     self.config.router.drop_policy)
        return plan_expert_choice(routing, available_E)

    def _run_routed(self, x_TD: torch.Tensor, plan: DispatchPlan,
                    check: Callable[[torch.Tensor, DispatchPlan], None] | None) -> torch.Tensor:
        """x (T, D) -> (T, D): the plan's rows through the routed experts, combined in token order."""
        return run_experts(x_TD, plan, self.experts, check)

    def _batch_reduce(self) -> L.Reduce | None:
        """The sum over every process's share of the batch for losses and bias counts; None: this
        process holds the whole batch."""
        return None

    def _update_stats(self, routing: Routing, plan: DispatchPlan, valid_T: torch.Tensor | None) -> None:
        self.stats.update(routing, plan, valid_T)

    def _expert_rows(self) -> range:
        """The global ids of the experts whose rows ``self.experts`` holds."""
        return range(self.num_experts)

    def _routes_padding(self) -> bool:
        """Whether padding tokens go through the routed experts (dropless: static shapes, no host
        sync) rather than only the real tokens being routed."""
        return self.config.router.capacity_factor is None

    def _require_real_tokens(self, num_real: int) -> None:
        """Raise when the batch (``num_real`` real tokens here) holds no real token."""
        if num_real == 0:
            raise ValueError(f"{self.layer_name}: token_mask marks no token as real")

    def _route_and_run_valid(self, x_TD: torch.Tensor, valid_T: torch.Tensor,
                             forced_TK: torch.Tensor | None = None) -> tuple[Routing, DispatchPlan, torch.Tensor]:
        """Route only the V real tokens (capacity from V, as for the batch without padding); the
        routing and plan come back in T-token indexing, padding rows zero and counted nowhere."""
        idx_V = torch.nonzero(valid_T).squeeze(1)
        self._require_real_tokens(idx_V.numel())
        forced_VK = None if forced_TK is None else forced_TK.index_select(0, idx_V)
        routing_V, plan_V, out_VD = self._route_and_run(x_TD.index_select(0, idx_V), forced_VK)
        out_TD = out_VD.new_zeros(x_TD.shape[0], out_VD.shape[1]).index_copy(0, idx_V, out_VD)
        return _scatter_routing(routing_V, idx_V, x_TD.shape[0]), _scatter_plan(plan_V, idx_V, x_TD.shape[0]), out_TD

    def _replayed_experts(self, shape: torch.Size) -> torch.Tensor:
        """``replay_topk_idx`` as (T, K), checked against the input's leading shape (or its T)."""
        idx = self.replay_topk_idx
        assert idx is not None
        lead = tuple(shape[:-1])
        if tuple(idx.shape[:-1]) != lead and not (len(lead) == 1 and idx[..., 0].numel() == lead[0]):
            raise ValueError(f"{self.layer_name}: the replayed routing covers tokens of shape {tuple(idx.shape[:-1])}, "
                             f"but this forward's input has {lead}")
        return idx.reshape(-1, idx.shape[-1])

    def _valid_tokens(self, token_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """token_mask (...) -> bool (T,), checked against x's leading shape."""
        if tuple(token_mask.shape) != tuple(shape[:-1]):
            raise ValueError(f"{self.layer_name}: token_mask of shape {tuple(token_mask.shape)} does not match "
                             f"the input's leading shape {tuple(shape[:-1])}")
        if token_mask.dtype != torch.bool and (token_mask.is_floating_point() or token_mask.is_complex()):
            raise TypeError(f"{self.layer_name}: token_mask must be bool or integer 0/1, got dtype {token_mask.dtype}")
        return token_mask.reshape(-1).to(device=self.available_E.device, dtype=torch.bool)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (T, D) after checking x and re-arming the freeze hooks (every forward)."""
        self._validate_input(x)
        if self._any_frozen:
            self._ensure_freeze_hooks()
        if self.training and not torch.is_grad_enabled() and x.requires_grad and self._has_losses():
            warnings.warn(f"{self.layer_name}: a training forward without grad on an input that requires grad "
                          f"(reentrant activation checkpointing?) computes no balancing loss; use "
                          f"torch.utils.checkpoint(..., use_reentrant=False)", UserWarning, stacklevel=3)
        return x.reshape(-1, self.dim)

    def _has_losses(self) -> bool:
        b = self.config.balance
        return b.aux_loss_coef > 0 or b.z_loss_coef > 0 or b.cv_loss_coef > 0 or b.seq_aux_loss_coef > 0

    def _validate_input(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise TypeError(f"{self.layer_name}: input must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.layer_name}: input of shape {tuple(x.shape)} has last dimension "
                             f"{x.shape[-1] if x.dim() else None}, expected dim={self.dim}")
        if x.numel() == 0:
            raise ValueError(f"{self.layer_name}: input of shape {tuple(x.shape)} has no tokens")
        if self.checks_finite and not all_finite(x):
            raise ValueError(f"{self.layer_name}: input contains NaN or Inf values")

    @property
    def checks_finite(self) -> bool:
        """config.check_finite, or where it is None: on in eval mode, off in training."""
        return (not self.training) if self.config.check_finite is None else self.config.check_finite

    def _check_expert_outputs(self, y_RD: torch.Tensor, plan: DispatchPlan) -> None:
        bad_R = ~torch.isfinite(y_RD).all(dim=-1)
        if bool(bad_R.any()):
            expert_R = torch.repeat_interleave(torch.arange(self.num_experts, device=y_RD.device), plan.counts_E)
            bad = sorted(set(expert_R[bad_R].tolist()))
            self.stats.nonfinite_E[bad] = True
            raise ExpertNonFiniteError(self.layer_name, bad)

    # ------------------------------------------------------------------ losses and statistics
    def _record(self, routing: Routing, plan: DispatchPlan, lead: tuple[int, ...],
                valid_T: torch.Tensor | None = None) -> None:
        """Losses, statistics, bias counts and routing hooks of one forward over tokens of shape ``lead``.

        Activation checkpointing's recomputation counts nothing and keeps the first forward's losses;
        it still computes them, because non-reentrant checkpointing expects every tensor that the
        first forward saved for backward (the losses' too) to be saved again."""
        again = recomputing()
        cfg = self.config
        reduce = self._batch_reduce()
        if cfg.track_stats and not again:
            self._update_stats(routing, plan, valid_T)
        if (self.training and self.router.selection_bias is not None and cfg.router.bias_update_rate is not None
                and not again):
            self.bias_load_E += L.batch_total(plan.routed_E, reduce)
        if self.training and torch.is_grad_enabled():
            batch = math.prod(lead[:-1]) if len(lead) >= 2 else 1
            losses = self._losses(routing, batch, valid_T, reduce)
            pooled = (cfg.balance.aux_loss_convention == "mixtral" and cfg.balance.aux_loss_coef > 0
                      and routing.is_token_choice)
            sums = L.mixtral_sums(routing, self.num_experts, valid_T, reduce) if pooled else None
            if not again:
                (self.aux_loss, self.last_losses), self.pooled_loss_sums = losses, sums
        elif not again:
            self.aux_loss, self.last_losses = routing.logits_TE.new_zeros(()), {}
            self.pooled_loss_sums = None
        if not again:
            self._run_routing_hooks(routing, plan, lead, valid_T)

    def _run_routing_hooks(self, routing: Routing, plan: DispatchPlan, lead: tuple[int, ...],
                           valid_T: torch.Tensor | None = None) -> None:
        """Hand one counted forward to the routing hooks (a subclass with its own forward calls this)."""
        if self._routing_hooks:
            event = RoutingEvent(_detached(routing), _detached_plan(plan), lead, valid_T)
            for hook in list(self._routing_hooks.values()):
                hook(self, event)

    def register_routing_hook(self, hook: RoutingHook) -> RemovableHandle:
        """Call ``hook(layer, event)`` after every counted forward (not activation checkpointing's
        recomputation) with that forward's ``RoutingEvent``; ``handle.remove()`` stops it.
        ``moekit.capture_routing(model)`` is the usual way in."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def _losses(self, routing: Routing, batch: int, valid_T: torch.Tensor | None = None,
                reduce: L.Reduce | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of this layer's balancing losses, and each unweighted term (detached); with
        ``reduce``, those of the whole batch split over processes (``balance.losses``)."""
        b, E, K = self.config.balance, self.num_experts, self.top_k
        total = routing.logits_TE.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        token_choice = routing.is_token_choice
        if b.aux_loss_coef > 0 and token_choice and b.aux_loss_convention != "mixtral":
            terms["aux"] = value = L.switch_aux_loss(routing, E, b.aux_loss_convention, valid_T, batch, reduce)
            total = total + b.aux_loss_coef * value
        if b.z_loss_coef > 0:
            terms["z"] = value = L.routing_z_loss(routing, valid_T, reduce)
            total = total + b.z_loss_coef * value
        if b.cv_loss_coef > 0 and token_choice:
            terms["cv"] = value = L.cv_squared_loss(routing, E, K, valid_T, b.cv_unbiased, reduce)
            total = total + b.cv_loss_coef * value
        if b.seq_aux_loss_coef > 0 and token_choice:
            terms["seq_aux"] = value = L.sequence_aux_loss(routing, E, batch, valid_T, reduce)
            total = total + b.seq_aux_loss_coef * value
        return total, {k: v.detach() for k, v in terms.items()}

    def report(self) -> LayerReport:
        """Routing statistics since the last reset; masked experts are not reported dead."""
        report = self.stats.report()
        masked = set(self.masked_experts)
        report.dead_experts = [e for e in report.dead_experts if e not in masked]
        return report

    def reset_stats(self) -> None:
        self.stats.reset()

    # ------------------------------------------------------------------ aux-loss-free balancing
    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """DeepSeek-V3's rule b_i += u * sign(mean(c) - c_i) over the assignments c counted since the
        last call (so gradient accumulation sees the whole step); then the counts reset."""
        rate = self.config.router.bias_update_rate
        bias = self.router.selection_bias
        if rate is None or bias is None or int(self.bias_load_E.sum()) == 0:
            return
        avail = self.available_E
        load = self.bias_load_E.to(bias.dtype)
        mean = load[avail].mean()
        bias[avail] += rate * torch.sign(mean - load[avail])
        self.bias_load_E.zero_()

    # ------------------------------------------------------------------ expert control
    def _expert_ids(self, ids: Iterable[int]) -> list[int]:
        ids = sorted({int(i) for i in ids})
        bad = [i for i in ids if not 0 <= i < self.num_experts]
        if bad:
            raise IndexError(f"{self.layer_name}: expert ids {bad} out of range [0, {self.num_experts})")
        return ids

    def mask_experts(self, ids: Iterable[int]) -> None:
        """Disable experts at run time: the router chooses among the rest and renormalises."""
        ids = self._expert_ids(ids)
        available = self.available_E.clone()
        available[ids] = False
        left = int(available.sum())
        needed = 1 if self.config.router.kind == "expert_choice" else self.top_k
        if left < needed:
            raise ValueError(f"{self.layer_name}: masking {ids} leaves {left} expert(s), fewer than top_k={needed}")
        self._check_groups_after_mask(ids, available)
        self.available_E.copy_(available)
        self._any_masked = True

    def _check_groups_after_mask(self, ids: list[int], available_E: torch.Tensor) -> None:
        """Group-limited routing picks topk_group groups by score; any such choice among the groups
        that can still score must hold top_k unmasked experts."""
        r = self.config.router
        if r.n_group == 1 or r.kind == "expert_choice":
            return
        per_group = available_E.view(r.n_group, -1).sum(dim=1).tolist()
        need = 2 if r.group_score == "top2_sum" else 1
        usable = sorted(c for c in per_group if c >= need)
        if len(usable) < r.topk_group or sum(usable[:r.topk_group]) < self.top_k:
            raise ValueError(f"{self.layer_name}: masking {ids} leaves unmasked experts per group {per_group}; "
                             f"group-limited routing (n_group={r.n_group}, topk_group={r.topk_group}, "
                             f"group_score={r.group_score!r}) could then choose groups holding fewer than "
                             f"top_k={self.top_k} experts")

    def unmask_experts(self, ids: Iterable[int] | None = None) -> None:
        if ids is None:
            self.available_E.fill_(True)
        else:
            self.available_E[self._expert_ids(ids)] = True
        self._any_masked = not bool(self.available_E.all())

    @property
    def masked_experts(self) -> list[int]:
        return torch.nonzero(~self.available_E.cpu()).flatten().tolist()

    def freeze_experts(self, ids: Iterable[int]) -> None:
        """Stop gradients to chosen experts' parameters (their grads are zero, rows stay put
        under plain SGD/Adam; exclude them from weight decay to keep them bit-identical)."""
        ids = self._expert_ids(ids)
        self.frozen_E[ids] = True
        self._any_frozen = True
        if isinstance(self.experts, ModuleExperts):
            for i in ids:
                self.experts.experts[i].requires_grad_(False)
            return
        self._ensure_freeze_hooks()

    def _ensure_freeze_hooks(self) -> None:
        """Zero frozen experts' rows of every stacked (E, ...) weight's gradient. Checked on each
        forward while experts are frozen, because tensor hooks do not survive copy.deepcopy or
        a parameter being replaced: a weight is hooked again unless the handle kept under its id()
        still points at a live hook table (a deep copy's handles point at none)."""
        if isinstance(self.experts, ModuleExperts):
            return
        rows = len(self._expert_rows())
        for p in self.experts.parameters():
            if p.dim() >= 1 and p.shape[0] == rows:
                handle = self._freeze_hooks.get(id(p))
                if handle is None or handle.hooks_dict_ref() is None:
                    self._freeze_hooks[id(p)] = p.register_hook(self._zero_frozen_grad)

    def unfreeze_experts(self, ids: Iterable[int] | None = None) -> None:
        ids = list(range(self.num_experts)) if ids is None else self._expert_ids(ids)
        self.frozen_E[ids] = False
        self._any_frozen = bool(self.frozen_E.any())
        if isinstance(self.experts, ModuleExperts):
            for i in ids:
                self.experts.experts[i].requires_grad_(True)

    def _zero_frozen_grad(self, grad: torch.Tensor) -> torch.Tensor:
        rows = self._expert_rows()
        keep = (~self.frozen_E[rows.start:rows.stop]).to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return grad * keep

    @property
    def frozen_experts(self) -> list[int]:
        return torch.nonzero(self.frozen_E.cpu()).flatten().tolist()

    def extra_repr(self) -> str:
        r = self.config.router
        cap = "dropless" if r.capacity_factor is None else f"capacity_factor={r.capacity_factor}"
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, router={r.kind}, {cap}"


def _valid_counts_plan(plan: DispatchPlan, routing: Routing, valid_T: torch.Tensor, num_experts: int) -> DispatchPlan:
    """A dropless plan whose counts (for statistics and the bias rule) skip padding tokens."""
    counts_E = L.expert_counts(routing.topk_idx_TK, num_experts, torch.long, valid_T.long())
    return dataclasses.replace(plan, counts_E=counts_E, routed_E=counts_E)


def _scatter_rows(x_VX: torch.Tensor | None, idx_V: torch.Tensor, T: int, fill: float = 0.0) -> torch.Tensor | None:
    """(V, ...) -> (T, ...): row v goes to row idx_V[v], other rows hold ``fill`` (differentiable)."""
    if x_VX is None:
        return None
    return x_VX.new_full((T, *x_VX.shape[1:]), fill).index_copy(0, idx_V, x_VX)


def _scatter_routing(routing_V: Routing, idx_V: torch.Tensor, T: int) -> Routing:
    """The routing of V real tokens in T-token indexing; padding rows: logits, scores and logsumexp 0,
    expert 0 with weight 0, noise scale 1 (finite everywhere; the losses and statistics skip them)."""
    ec_idx = None if routing_V.ec_token_idx_EC is None else idx_V[routing_V.ec_token_idx_EC]
    return dataclasses.replace(
        routing_V,
        logits_TE=_scatter_rows(routing_V.logits_TE, idx_V, T),
        scores_TE=_scatter_rows(routing_V.scores_TE, idx_V, T),
        topk_idx_TK=_scatter_rows(routing_V.topk_idx_TK, idx_V, T),
        topk_weight_TK=_scatter_rows(routing_V.topk_weight_TK, idx_V, T),
        ec_token_idx_EC=ec_idx,
        noise_std_TE=_scatter_rows(routing_V.noise_std_TE, idx_V, T, 1.0),
        noisy_logits_TE=_scatter_rows(routing_V.noisy_logits_TE, idx_V, T),
        logsumexp_T=_scatter_rows(routing_V.logsumexp_T, idx_V, T),
    )


def _scatter_plan(plan_V: DispatchPlan, idx_V: torch.Tensor, T: int) -> DispatchPlan:
    """The plan of V real tokens with its token and slot ids in T-token indexing."""
    slot = plan_V.slot_idx_R
    if slot is not None:
        K = plan_V.top_k
        slot = idx_V[torch.div(slot, K, rounding_mode="floor")] * K + slot % K
    return dataclasses.replace(plan_V, token_idx_R=idx_V[plan_V.token_idx_R], slot_idx_R=slot, num_tokens=T)


def _detached(routing: Routing) -> Routing:
    fields = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in vars(routing).items()}
    return Routing(**fields)


def _detached_plan(plan: DispatchPlan) -> DispatchPlan:
    fields = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in vars(plan).items()}
    return DispatchPlan(**fields)
