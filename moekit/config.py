"""Typed, validated configuration for an MoE layer.

Options are grouped by the part they configure (router, balancing losses, shared experts), so
each part reads only its own group. Each group is a ``moekit.config_base.Config``: fields checked
on construction from their annotations and declared ranges, cross-field checks in ``validate``,
round-trips through ``to_dict`` / ``from_dict`` and ``save`` / ``load`` (JSON); unknown keys are an
error that names the key and the closest known one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from .config_base import Config, ConfigError, check, spec, suggest

ROUTERS = ("softmax_topk", "noisy_topk", "switch", "sigmoid_topk", "expert_choice")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")
DROP_POLICIES = ("probability", "position")
EXPERT_KINDS = ("swiglu", "mlp")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
AUX_CONVENTIONS = ("moekit", "switch", "switch_group", "megatron", "mixtral")
BACKENDS = ("auto", "grouped_mm", "loop", "reference")


@dataclass
class RouterConfig(Config):
    """How tokens pick experts.

    kind:
      ``softmax_topk``  softmax over experts, top-k (Mixtral, Qwen, OLMoE).
      ``noisy_topk``    Shazeer et al. 2017: learned, input-dependent Gaussian noise on the
                        logits during training, then softmax over the kept top-k.
      ``switch``        Fedus et al. 2021: top-1, weight = softmax probability of the pick.
      ``sigmoid_topk``  DeepSeek-V3: sigmoid scores, optional aux-loss-free bias (selection only)
                        and group-limited selection; weights from unbiased scores.
      ``expert_choice`` Zhou et al. 2022: each expert picks its top-capacity tokens. Not causal:
                        a token's routing depends on the other tokens of the batch.
    """

    section = "router"

    kind: str = spec("softmax_topk", choices=ROUTERS)
    top_k: int = spec(2, ge=1)
    # Renormalise the top-k weights to sum to 1 (Mixtral: True; Qwen2-MoE/OLMoE: False).
    norm_topk_prob: bool = True
    routed_scaling_factor: float = spec(1.0, gt=0)
    # Group-limited routing (DeepSeek-V2/V3): experts split into n_group groups, only
    # topk_group groups are eligible per token.
    n_group: int = spec(1, ge=1)
    topk_group: int = spec(1, ge=1)
    group_score: str = spec("top2_sum", choices=GROUP_SCORES)
    # Score function for group/sigmoid routers; None picks the kind's own.
    score_func: str | None = spec(None, choices=SCORE_FUNCS)
    # Aux-loss-free balancing (DeepSeek-V3): per-expert bias added for selection only,
    # updated by b += rate * sign(mean(c) - c) outside autograd. None disables it.
    bias_update_rate: float | None = spec(None, ge=0)
    # Multiplicative input jitter in training (Switch Transformer); 0 disables.
    jitter_eps: float = spec(0.0, ge=0, lt=1)
    # Linear bias on the router logits (gpt-oss).
    logit_bias: bool = False
    # Capacity: None means dropless. Otherwise capacity = ceil(T*k/E*capacity_factor).
    capacity_factor: float | None = spec(None, gt=0, hint="null: dropless")
    drop_policy: str = spec("probability", choices=DROP_POLICIES)

    def validate(self) -> None:
        if self.kind == "switch":
            check(self.top_k == 1, f"router.top_k={self.top_k} but the switch router is top-1")
        if self.kind == "noisy_topk":
            check(self.norm_topk_prob, "router.norm_topk_prob=False but noisy_topk weights are the softmax over "
                  "the kept top-k (Shazeer et al. 2017); use softmax_topk for unnormalised weights")
        check(self.topk_group <= self.n_group,
              f"router.topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.kind == "expert_choice":
            check(self.capacity_factor is not None,
                  "router.kind='expert_choice' needs router.capacity_factor (tokens per expert = T*cf/E)")
        if self.bias_update_rate is not None:
            check(self.kind in ("sigmoid_topk", "softmax_topk"),
                  f"router.bias_update_rate is set but router.kind={self.kind!r} has no selection bias")

    @property
    def effective_score_func(self) -> str:
        if self.score_func is not None:
            return self.score_func
        return "sigmoid" if self.kind == "sigmoid_topk" else "softmax"


@dataclass
class BalanceConfig(Config):
    """Coefficients and conventions of the load-balancing losses (0 disables a loss).

    aux_loss_coef * E * sum_i f_i * P_i is the switch/GShard loss. In every convention P_i is the
    mean over tokens of the full (not top-k renormalised) router distribution: softmax
    probabilities, or sigmoid scores divided by their per-token sum; counts are taken before
    capacity drops. aux_loss_convention picks f and the scope:

      ============  =========================================  =============  ================
      convention    f_i                                        scope          value at balance
      ============  =========================================  =============  ================
      moekit        count_i / (k*T), the layer's top-k picks   per layer      1 for any k
      switch        count_i / T, top-1 of the plain scores     per layer      1
      switch_group  count_i / S, top-1 of the plain scores     per sequence   1
      megatron      count_i / (k*T), top-k of plain scores     per layer      1
      mixtral       count_i / T, top-k of plain scores         layers pooled  k
      ============  =========================================  =============  ================

    "Plain scores" are the router distribution without selection bias or group limit (masked
    experts excluded), as Switch (Fedus et al. 2021, eq. 4-6), Megatron-Core and transformers
    count; the layer's picks differ from them only under a selection bias (aux-loss-free
    balancing) or group-limited routing.
    ``megatron`` is Megatron-Core's switch_load_balancing_loss_func with
    compute_routing_scores_for_aux_loss: E/(k*T^2) * sum_i (sum_t p_ti) * count_i.
    ``mixtral`` is transformers' load_balancing_loss_func: every layer's tokens (layers with the
    same E and coefficient) are concatenated before f and P are taken, in ``moekit.aux_loss``.
    With masked experts (f_i = P_i = 0 for them) a layer balanced over its E' unmasked experts
    scores E/E' (k*E/E' for ``mixtral``), and each CV^2 term of cv_loss_coef E/E' - 1 instead of 0:
    constant offsets, the minimiser is still balance over the unmasked experts.
    z_loss_coef: ST-MoE router z-loss. cv_loss_coef: Shazeer et al. 2017 importance + load CV^2.
    seq_aux_loss_coef: DeepSeek-V3 complementary sequence-wise balance loss.
    ``switch_group`` is transformers' SwitchTransformers load_balancing_loss_func: f and P within
    each sequence (its groups are the batch rows), E * sum_i f_i * P_i averaged over sequences.
    cv_unbiased: CV^2 with the sample variance (divide by E - 1, as torch.var) instead of the
    population variance (divide by E, as Shazeer et al.'s tensor2tensor code).
    With a token mask (padding), T, S and every mean and count run over the valid tokens only.
    """

    section = "balance"

    aux_loss_coef: float = spec(0.01, ge=0)
    aux_loss_convention: str = spec("moekit", choices=AUX_CONVENTIONS)
    z_loss_coef: float = spec(0.0, ge=0)
    cv_loss_coef: float = spec(0.0, ge=0)
    seq_aux_loss_coef: float = spec(0.0, ge=0)
    cv_unbiased: bool = False


@dataclass
class SharedExpertConfig(Config):
    """Experts every token passes through (DeepSeek, Qwen2-MoE). num=0 disables them."""

    section = "shared"

    num: int = spec(0, ge=0)
    # Hidden size of the fused shared MLP; None means num * expert_hidden.
    hidden: int | None = spec(None, ge=1)
    # Qwen2-MoE scales the shared output by sigmoid(x @ w_gate).
    gated: bool = False

    def validate(self) -> None:
        if self.hidden is not None:
            check(self.num >= 1, f"shared.hidden={self.hidden} is set but shared.num=0")
        if self.gated:
            check(self.num >= 1, "shared.gated=True but shared.num=0")


@dataclass
class MoEConfig(Config):
    """One MoE layer: (..., dim) -> (..., dim)."""

    dim: int = spec(ge=1)
    num_experts: int = spec(ge=1)
    expert_hidden: int = spec(ge=1)
    expert_kind: str = spec("swiglu", choices=EXPERT_KINDS)
    activation: str = spec("silu", choices=ACTIVATIONS)
    router: RouterConfig = field(default_factory=RouterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    shared: SharedExpertConfig = field(default_factory=SharedExpertConfig)
    # Grouped-product implementation; "auto" picks the fastest correct one for the device/dtype.
    backend: str = spec("auto", choices=BACKENDS)
    # Raise on NaN/Inf input, and name any expert whose output is not finite (two host syncs per
    # forward). None (default): on in eval mode (serving, evaluation), off in training mode.
    check_finite: bool | None = None
    # Keep routing statistics (cheap, no host sync).
    track_stats: bool = True
    # An expert that gets no token for this many forward passes is reported dead.
    dead_window: int = spec(100, ge=1)

    def validate(self) -> None:
        r = self.router
        check(r.top_k <= self.num_experts,
              f"router.top_k={r.top_k} exceeds num_experts={self.num_experts}")
        check(self.num_experts % r.n_group == 0,
              f"num_experts={self.num_experts} is not divisible by router.n_group={r.n_group}")
        if r.n_group > 1:
            per_group = self.num_experts // r.n_group
            check(r.topk_group * per_group >= r.top_k,
                  f"router.topk_group={r.topk_group} groups of {per_group} experts cannot hold top_k={r.top_k}")
            if r.group_score == "top2_sum":
                check(per_group >= 2, f"group_score='top2_sum' needs >= 2 experts per group, got {per_group}")

    @property
    def top_k(self) -> int:
        return self.router.top_k


_ROUTER_KEYS = {f.name for f in fields(RouterConfig)}
_BALANCE_KEYS = {f.name for f in fields(BalanceConfig)}


def moe_config(**kwargs: Any) -> MoEConfig:
    """Build a MoEConfig from flat keywords.

    Router fields (top_k, capacity_factor, ...) and balance fields (aux_loss_coef, ...) may be
    given directly; ``router`` may be a router kind name; ``shared_experts=N``,
    ``shared_expert_hidden`` and ``shared_expert_gated`` fill the shared-expert group.
    """
    router = kwargs.pop("router", None)
    router_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _ROUTER_KEYS}
    balance_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _BALANCE_KEYS}
    shared_kw = {}
    for flat, name in (("shared_experts", "num"), ("shared_expert_hidden", "hidden"), ("shared_expert_gated", "gated")):
        if flat in kwargs:
            shared_kw[name] = kwargs.pop(flat)
    if isinstance(router, str):
        router_kw["kind"] = router
        if router == "switch":
            router_kw.setdefault("top_k", 1)
    elif isinstance(router, RouterConfig):
        check(not router_kw, f"router fields {sorted(router_kw)} given beside a RouterConfig")
        router_kw = dataclasses.asdict(router)
    elif router is not None:
        raise ConfigError(f"router={router!r} must be a router kind name or a RouterConfig")
    names = sorted({f.name for f in fields(MoEConfig)} - {"router", "balance", "shared"})
    unknown = sorted(set(kwargs) - set(names))
    flat = names + sorted(_ROUTER_KEYS | _BALANCE_KEYS) + ["router", "shared_experts", "shared_expert_hidden",
                                                            "shared_expert_gated"]
    check(not unknown, f"unknown MoE option(s) {unknown}{suggest(unknown, flat)}")
    return MoEConfig(router=RouterConfig(**router_kw), balance=BalanceConfig(**balance_kw),
                     shared=SharedExpertConfig(**shared_kw), **kwargs)


__all__ = ["ACTIVATIONS", "AUX_CONVENTIONS", "BACKENDS", "BalanceConfig", "Config", "ConfigError", "DROP_POLICIES",
           "EXPERT_KINDS", "GROUP_SCORES", "MoEConfig", "ROUTERS", "RouterConfig", "SCORE_FUNCS",
           "SharedExpertConfig", "check", "moe_config"]
