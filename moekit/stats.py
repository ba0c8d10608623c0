"""Per-layer routing health, kept in buffers and updated without host syncs.

Cheap enough to leave on in training: a few (E,) reductions and one (E, E) product per forward.
Read with ``RoutingStats.report()`` (one layer) or ``moekit.routing_report(model)`` (all layers).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .balance.losses import entropy, normalized_scores, token_weights
from .dispatch.plan import DispatchPlan
from .router.routing import Routing


class RoutingCollapseWarning(UserWarning):
    """An expert is dead, or one expert takes most of the load."""


@dataclass
class LayerReport:
    tokens_per_expert: list[float]
    utilization: list[float]
    assignments: int
    dropped: int
    dropped_fraction: float
    mean_entropy: float
    max_entropy: float
    max_over_mean_load: float
    top_expert_share: float
    mean_router_z: float
    dead_experts: list[int]
    dead_window: int
    coactivation: list[list[float]]
    forward_passes: int
    nonfinite_experts: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


# What decode loops pass to ``RoutingStats.defer_updates`` (moekit.lm.generate, the serving engine,
# patch_model's layers): added one forward at a time, the statistics cost a one-token decode step
# about a dozen small ops per layer; any read adds the waiting forwards first.
DECODE_UPDATE_EVERY = 32


class RoutingStats(nn.Module):
    """Running counts since the last ``reset()``; buffers follow the layer's device."""

    def __init__(self, num_experts: int, dead_window: int) -> None:
        super().__init__()
        E = num_experts
        self.num_experts, self.dead_window = E, dead_window
        self.register_buffer("tokens_E", torch.zeros(E, dtype=torch.float64), persistent=False)
        self.register_buffer("routed_E", torch.zeros(E, dtype=torch.float64), persistent=False)
        self.register_buffer("dropped", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("z_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("coactivation_EE", torch.zeros(E, E, dtype=torch.float64), persistent=False)
        self.register_buffer("idle_steps_E", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("nonfinite_E", torch.zeros(E, dtype=torch.bool), persistent=False)
        # A buffer, not a Python int: a compiled forward would recompile on every new int value.
        self.register_buffer("passes", torch.zeros((), dtype=torch.long), persistent=False)
        # Forwards not yet added to the buffers (``defer_updates``).
        self._pending: list[tuple[Routing, DispatchPlan, torch.Tensor | None]] = []
        self._every = 1

    @property
    def forward_passes(self) -> int:
        return int(self.passes)

    @forward_passes.setter
    def forward_passes(self, value: int) -> None:
        self.passes.fill_(int(value))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self.flush()
        # Counts and sums stay float64 when the model is cast (bf16 counts stop at 256).
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float64:
                self._buffers[name] = buf.to(torch.float64)
        return self

    @property
    def update_every(self) -> int:
        """Forwards added to the buffers in one pass (``defer_updates``; 1: each at once)."""
        return self._every

    def defer_updates(self, every: int) -> None:
        """Add forwards to the buffers ``every`` at a time, in one pass over all their tokens, instead
        of a few (E,) reductions per forward (at a server's 16-token decode steps those cost about a
        tenth of the step). The totals are those of adding each forward (counts exactly, float sums
        up to rounding); reading any buffer, ``report``, ``snapshot`` and a device move add the
        waiting forwards first. 1 (the default): each forward is added at once; so is a forward whose
        router scores carry gradients (training), whose graph waiting would keep alive."""
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"defer_updates: every={every!r} must be an int >= 1")
        self.flush()
        self._every = every

    def __getattr__(self, name: str) -> Any:
        # Buffers are reached through nn.Module.__getattr__: forwards waiting to be added go in first.
        if self.__dict__.get("_pending") and name in self.__dict__.get("_buffers", ()):
            self.flush()
        return super().__getattr__(name)

    @torch.no_grad()
    def update(self, routing: Routing, plan: DispatchPlan, valid_T: torch.Tensor | None = None) -> None:
        """Add one forward pass (now, or with the next ``every`` - 1, see ``defer_updates``). With
        ``valid_T`` (T,) the per-token sums (entropy, z, tokens, co-activation) skip padding; the
        plan's counts must already exclude it (MoE does that)."""
        if self._every == 1 or routing.scores_TE.requires_grad:
            # A training forward is added at once: waiting would keep its autograd graph alive.
            self.flush()
            self._add([(routing, plan, valid_T)])
            return
        self._pending.append((routing, plan, valid_T))
        if len(self._pending) >= self._every:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Add the forwards waiting since the last one (``defer_updates``)."""
        pending, self._pending = self._pending, []
        if pending:
            self._add(pending)

    def _add(self, forwards: list[tuple[Routing, DispatchPlan, torch.Tensor | None]]) -> None:
        """Add N forwards: counts and per-token sums over all their tokens at once."""
        N = len(forwards)

        def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

        def total(tensors: list[torch.Tensor]) -> torch.Tensor:
            return tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum(dim=0)

        plans = [plan for _, plan, _ in forwards]
        self.passes.add_(N)
        # add_ in place: ``buffer += x`` would also go through nn.Module.__setattr__ on every forward.
        self.tokens_E.add_(total([p.counts_E for p in plans]))
        self.routed_E.add_(total([p.routed_E for p in plans]))
        self.dropped.add_(total([p.num_dropped for p in plans]))
        logits_TE = cat([r.logits_TE for r, _, _ in forwards])
        probs_TE = cat([normalized_scores(r) for r, _, _ in forwards])
        if all(v is None for _, _, v in forwards):
            w_T = None
        else:
            w_T = cat([token_weights(v, r.logits_TE) if v is not None else r.logits_TE.new_ones(r.logits_TE.shape[0])
                       for r, _, v in forwards])
        if all(r.logsumexp_T is not None for r, _, _ in forwards):
            # The router's logsumexp, and (softmax scores: log p = l - lse, sum p = 1) the entropy as
            # lse_t - sum_e p_te l_te: one product over (T, E) instead of clamp, log, mul and sum.
            lse_T = cat([r.logsumexp_T for r, _, _ in forwards])
            z_T = lse_T.square()
            if w_T is None:
                self.entropy_sum.add_(lse_T.sum() - torch.dot(probs_TE.reshape(-1), logits_TE.reshape(-1)))
            else:
                entropy_T = lse_T - torch.linalg.vecdot(probs_TE, logits_TE)
                self.entropy_sum.add_((entropy_T * w_T).sum())
        else:
            entropy_T = entropy(probs_TE)
            z_T = torch.logsumexp(logits_TE, dim=-1).square()
            self.entropy_sum.add_(entropy_T.sum() if w_T is None else (entropy_T * w_T).sum())
        if w_T is None:
            self.z_sum.add_(z_T.sum())
            self.num_tokens.add_(sum(r.num_tokens for r, _, _ in forwards))
        else:
            self.z_sum.add_((z_T * w_T).sum())
            self.num_tokens.add_(w_T.sum())
        if all(r.topk_idx_TK is not None for r, _, _ in forwards):
            hit_TE = torch.zeros_like(logits_TE).scatter_(1, cat([r.topk_idx_TK for r, _, _ in forwards]), 1.0)
            hit_w_TE = hit_TE if w_T is None else hit_TE * w_T.unsqueeze(1)
            self.coactivation_EE.add_((hit_w_TE.t() @ hit_TE).double())
        if N == 1:
            self.idle_steps_E.add_(1).masked_fill_(plans[0].counts_E > 0, 0)
        else:
            # Forwards since each expert's last use: N - 1 - its last forward with tokens, else idle + N.
            used_NE = torch.stack([p.counts_E for p in plans]) > 0
            last_E = torch.where(used_NE, torch.arange(N, device=used_NE.device)[:, None], -1).amax(dim=0)
            self.idle_steps_E.copy_(torch.where(last_E >= 0, N - 1 - last_E, self.idle_steps_E + N))

    def reset(self) -> None:
        self._pending = []
        for buf in self.buffers(recurse=False):
            buf.zero_()
        self.forward_passes = 0

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of every counter; ``restore`` puts them back (to count a block of passes apart,
        as evaluation during training does)."""
        self.flush()
        return {name: buf.clone() for name, buf in self.named_buffers(recurse=False)}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        self._pending = []
        for name, buf in self.named_buffers(recurse=False):
            buf.copy_(snapshot[name])

    def report(self) -> LayerReport:
        E = self.num_experts
        tokens = self.tokens_E.cpu()
        total = float(tokens.sum())
        routed = float(self.routed_E.sum())
        n = max(float(self.num_tokens), 1.0)
        mean_load = total / E if total > 0 else 0.0
        co = self.coactivation_EE.cpu()
        return LayerReport(
            tokens_per_expert=tokens.tolist(),
            utilization=(tokens / total).tolist() if total > 0 else [0.0] * E,
            assignments=int(routed),
            dropped=int(self.dropped),
            dropped_fraction=float(self.dropped) / routed if routed > 0 else 0.0,
            mean_entropy=float(self.entropy_sum) / n,
            max_entropy=float(torch.log(torch.tensor(float(E)))),
            max_over_mean_load=float(tokens.max()) / mean_load if mean_load > 0 else 0.0,
            top_expert_share=float(tokens.max()) / total if total > 0 else 0.0,
            mean_router_z=float(self.z_sum) / n,
            dead_experts=[e for e in range(E) if int(self.idle_steps_E[e]) >= self.dead_window],
            dead_window=self.dead_window,
            coactivation=co.tolist(),
            forward_passes=self.forward_passes,
            nonfinite_experts=torch.nonzero(self.nonfinite_E.cpu()).flatten().tolist(),
        )


def warn_on_collapse(name: str, report: LayerReport, top_k: int, collapse_share: float = 0.5,
                     collapse_ratio: float = 2.0) -> list[str]:
    """Warn (RoutingCollapseWarning) when experts are dead or one expert takes most of the load.

    Collapse: the busiest expert serves more than ``collapse_share`` of the tokens and more than
    ``collapse_ratio`` times the mean load.
    """
    problems = []
    if report.dead_experts:
        problems.append(f"{name}: experts {report.dead_experts} received no tokens in the last "
                        f"{report.dead_window} forward passes (dead)")
    tokens_served_share = report.top_expert_share * top_k
    if tokens_served_share > collapse_share and report.max_over_mean_load > collapse_ratio:
        E = len(report.tokens_per_expert)
        busiest = max(range(E), key=lambda e: report.tokens_per_expert[e])
        problems.append(f"{name}: expert {busiest} serves {tokens_served_share:.0%} of tokens "
                        f"({report.max_over_mean_load:.1f}x the mean load): routing is collapsing")
    for message in problems:
        warnings.warn(message, RoutingCollapseWarning, stacklevel=3)
    return problems
