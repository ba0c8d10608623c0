"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on MoE models, applied as a transform.

Shape legend: E experts, S adapted experts (S <= E), r rank, X rows and Y columns of one weight
matrix (a stacked expert weight is (E, X, Y): gate_up_proj (E, 2F, D), down_proj (E, D, F)).

Each adapted weight W becomes W + (alpha / r) * B @ A, with A random and B zero at the start, so
a fresh adapter leaves the model unchanged. Targets:

  experts    every stacked expert weight (leading dim E) of each MoE layer: per expert
             A (E, r, Y), B (E, X, r); ``shared``: one A (r, Y), B (X, r) for all experts; with
             ``expert_ids`` only the S chosen experts move (A (S, r, Y)), the others keep W exactly.
  router     the router's weight (E, D): A (r, D), B (E, r).
  attention  the named nn.Linear projections of each attention module (q_proj, k_proj, ...).

How it runs. The expert and router weights are read by the MoE layer's forward (its fused expert
path reads ``experts.gate_up_proj`` itself). A forward pre-hook on the MoE layer computes each
effective weight with one batched matrix product and shadows the parameter for that forward
(an instance attribute, found before ``nn.Module.__getattr__`` looks in ``_parameters``); a forward
hook that always runs removes it. The model code and the fused expert op run unchanged: no
per-expert Python loop, and the unchanged op differentiates into W's gradient, from which autograd
reaches A and B. ``torch.nn.utils.parametrize`` would compute the same thing, but it swaps the
module's class for a generated subclass, and the fused path only takes ``SwiGLUExperts`` /
``MLPExperts`` themselves (``SwiGLUExperts.fused_weights``), so parametrized experts fall back to the
reference composition. Attention projections take the additive form y = x W^T + s (x A^T) B^T
(a forward hook on the linear), which never forms W's gradient.

``merge_lora`` folds the adapters into the weights (serving runs the plain model), ``unmerge_lora``
takes them out again; ``remove_lora`` strips the adapters (merged or not). ``save_adapter`` writes
only the adapter tensors, with the config and the base shapes they were trained on, as one
safetensors file; ``load_adapter`` applies it to a model, naming any tensor whose shape differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..errors import CheckpointError
from ..layer import MoE

FORMAT = "moekit-lora"
FORMAT_VERSION = "1"
EXPERT_MODES = ("per_expert", "shared")


@dataclass
class LoraConfig:
    """Which weights get adapters, and their rank and scale (scale = alpha / rank).

    ``expert_ids``: None adapts every expert; a list adapts those experts in every MoE layer; a dict
    {MoE layer path (e.g. "layers.1.mlp"): ids} adapts only the listed layers' listed experts.
    ``attention``: names of the nn.Linear projections inside attention modules to adapt.
    """

    rank: int = 8
    alpha: float = 16.0
    experts: bool = True
    expert_mode: str = "per_expert"
    expert_ids: list[int] | dict[str, list[int]] | None = None
    router: bool = False
    attention: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        def check(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(f"lora.{message}")

        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
              f"rank={self.rank!r} must be an int >= 1")
        check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and math.isfinite(self.alpha)
              and self.alpha > 0, f"alpha={self.alpha!r} must be a finite number > 0")
        check(self.expert_mode in EXPERT_MODES, f"expert_mode={self.expert_mode!r} is not one of {list(EXPERT_MODES)}")
        check(isinstance(self.experts, bool) and isinstance(self.router, bool), "experts and router must be true or false")
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"seed={self.seed!r} must be an int")
        check(isinstance(self.attention, (list, tuple)) and all(isinstance(n, str) and n for n in self.attention),
              f"attention={self.attention!r} must be a list of projection names, e.g. ['q_proj', 'v_proj']")
        self.attention = list(self.attention)
        ids = self.expert_ids
        if isinstance(ids, dict):
            check(all(isinstance(k, str) for k in ids), f"expert_ids={ids!r}: keys must be MoE layer paths")
            self.expert_ids = {k: _id_list(v, f"expert_ids[{k!r}]") for k, v in ids.items()}
        elif ids is not None:
            self.expert_ids = _id_list(ids, "expert_ids")
        check(self.experts or self.router or bool(self.attention),
              "experts=false, router=false and attention=[] adapt nothing")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"lora: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def _id_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ConfigError(f"lora.{name}={value!r} must be a list of expert ids")
    return sorted(set(value))


class LoraWeight(nn.Module):
    """The low-rank update of one weight: delta = scale * B @ A.

    base_shape (E, X, Y) with ``per_expert``: A (S, r, Y), B (S, X, r) (S = len(expert_ids) or E);
    ``shared`` or a 2-D weight (X, Y): A (r, Y), B (X, r). ``target`` is the weight's path below the
    module that holds this adapter ("experts.gate_up_proj", "router.weight", "weight").
    """

    def __init__(self, target: str, base: torch.Tensor, rank: int, scale: float, shared: bool,
                 expert_ids: list[int] | None, generator: torch.Generator) -> None:
        super().__init__()
        self.target, self.scale, self.merged = target, scale, False
        self.base_shape = tuple(base.shape)
        self.expert_ids = expert_ids
        X, Y = base.shape[-2:]
        S = None if base.dim() == 2 or shared else (len(expert_ids) if expert_ids is not None else base.shape[0])
        lead = () if S is None else (S,)
        dtype = torch.promote_types(base.dtype, torch.float32)
        # A as nn.Linear initialises a weight of fan-in Y (kaiming uniform, a = sqrt(5)): U(-1/sqrt(Y), 1/sqrt(Y)).
        bound = 1.0 / math.sqrt(Y)
        A = (torch.rand(*lead, rank, Y, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.A = nn.Parameter(A.to(device=base.device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(*lead, X, rank, device=base.device, dtype=dtype))
        idx = None if expert_ids is None else torch.tensor(expert_ids, dtype=torch.long, device=base.device)
        self.register_buffer("expert_idx", idx, persistent=False)

    def delta(self) -> torch.Tensor:
        """scale * B @ A: (S, X, Y), or (X, Y) when shared or 2-D (one batched product)."""
        return torch.matmul(self.B, self.A) * self.scale

    def effective(self, w: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """w + sign * delta in w's dtype; only the chosen experts' rows change when expert_ids is set."""
        d = self.delta().to(w.dtype)
        if self.expert_idx is None:
            return w + d if sign > 0 else w - d
        d_SXY = d.expand(self.expert_idx.numel(), *w.shape[1:])
        return w.index_add(0, self.expert_idx, d_SXY, alpha=sign)

    def extra_repr(self) -> str:
        ids = "" if self.expert_ids is None else f", experts={self.expert_ids}"
        return f"{self.target}, base={self.base_shape}, rank={self.A.shape[-2]}, scale={self.scale:g}{ids}"


# ------------------------------------------------------------------------------------------- hooks
def _owner(module: nn.Module, target: str) -> tuple[nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (module.get_submodule(path) if path else module), name


def _shadow_weights(module: nn.Module, args: Any) -> None:
    """MoE forward pre-hook: each adapted weight reads as W + delta for this forward."""
    for lora in module.lora.values():
        if not lora.merged:
            owner, name = _owner(module, lora.target)
            owner.__dict__[name] = lora.effective(owner._parameters[name])


def _clear_shadows(module: nn.Module, args: Any, output: Any) -> None:
    """MoE forward hook (also on an exception): the parameters read as themselves again."""
    for lora in module.lora.values():
        owner, name = _owner(module, lora.target)
        owner.__dict__.pop(name, None)


def _add_low_rank(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """nn.Linear forward hook: y + scale * (x A^T) B^T, in x's dtype."""
    lora = module.lora
    if lora.merged:
        return output
    x = args[0]
    low = (x.to(lora.A.dtype) @ lora.A.t()) @ lora.B.t()
    return output + (lora.scale * low).to(output.dtype)


def _drop_hook(hooks: dict[int, Any], fn: Any) -> None:
    for key in [k for k, h in hooks.items() if h is fn]:
        del hooks[key]


# ------------------------------------------------------------------------------------------- apply
def _expert_weights(layer: MoE) -> list[str]:
    """Names of the stacked (E, X, Y) weights of a MoE layer's experts."""
    return [n for n, p in layer.experts.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == layer.num_experts]


def _chosen(cfg: LoraConfig, path: str, layer: MoE) -> list[int] | None:
    """Expert ids adapted in the layer at ``path`` (None: all); [] leaves its experts alone."""
    ids = cfg.expert_ids
    if ids is None:
        return None
    chosen = ids.get(path, []) if isinstance(ids, dict) else ids
    bad = [e for e in chosen if not 0 <= e < layer.num_experts]
    if bad:
        raise ConfigError(f"lora.expert_ids: {path} has no experts {bad} (it has {layer.num_experts})")
    return chosen


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraWeight]]:
    """(path, adapter) of every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraWeight):
            yield name, module


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Add adapters to ``model`` in place (see the module docstring) and freeze everything else:
    afterwards only the adapters' A and B require gradients. Returns ``model``."""
    if any(True for _ in lora_modules(model)):
        raise ValueError("the model already has LoRA adapters; remove_lora(model) first")
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    if isinstance(cfg.expert_ids, dict):
        unknown = sorted(set(cfg.expert_ids) - {n for n, _ in layers})
        if unknown:
            raise ConfigError(f"lora.expert_ids names {unknown}, which are not MoE layers; they are "
                              f"{[n for n, _ in layers]}")
    if (cfg.experts or cfg.router) and not layers:
        raise ConfigError("lora: experts/router adapters asked for, but the model has no MoE layers")
    plans: list[tuple[nn.Module, dict[str, LoraWeight]]] = []
    for path, layer in layers:
        adapters: dict[str, LoraWeight] = {}
        if cfg.experts:
            names = _expert_weights(layer)
            if not names:
                raise ConfigError(f"lora.experts: {path}.experts ({type(layer.experts).__name__}) holds no stacked "
                                  f"(E, X, Y) weights to adapt")
            chosen = _chosen(cfg, path, layer)
            if chosen != []:
                for n in names:
                    adapters[n] = LoraWeight(f"experts.{n}", getattr(layer.experts, n), cfg.rank, cfg.scale,
                                             cfg.expert_mode == "shared", chosen, gen)
        if cfg.router:
            w = getattr(layer.router, "weight", None)
            if not isinstance(w, nn.Parameter) or w.dim() != 2:
                raise ConfigError(f"lora.router: {path}.router ({type(layer.router).__name__}) has no 2-D weight")
            adapters["router"] = LoraWeight("router.weight", w, cfg.rank, cfg.scale, True, None, gen)
        if adapters:
            plans.append((layer, adapters))
    linears: list[tuple[nn.Linear, LoraWeight]] = []
    if cfg.attention:
        found: set[str] = set()
        for name, module in model.named_modules():
            parent, _, leaf = name.rpartition(".")
            if isinstance(module, nn.Linear) and leaf in cfg.attention and parent.split(".")[-1].endswith("attn"):
                linears.append((module, LoraWeight("weight", module.weight, cfg.rank, cfg.scale, True, None, gen)))
                found.add(leaf)
        missing = sorted(set(cfg.attention) - found)
        if missing:
            raise ConfigError(f"lora.attention: no nn.Linear named {missing} inside an attention module (*attn)")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, adapters in plans:
        layer.lora = nn.ModuleDict(adapters)
        layer.register_forward_pre_hook(_shadow_weights)
        layer.register_forward_hook(_clear_shadows, always_call=True)
    for linear, lora in linears:
        linear.lora = lora
        linear.register_forward_hook(_add_low_rank)
    model.lora_config = cfg
    return model


def _base(model: nn.Module, path: str, lora: LoraWeight) -> tuple[str, nn.Parameter]:
    """(path, parameter) of the weight the adapter at ``path`` updates. Adapters sit at
    "<MoE layer>.lora.<key>" or "<linear>.lora"; their ``target`` is relative to that holder."""
    parts = path.split(".")
    holder_path = ".".join(parts[:len(parts) - 1 - parts[::-1].index("lora")])
    owner, name = _owner(model.get_submodule(holder_path), lora.target)
    return f"{holder_path}.{lora.target}".lstrip("."), owner._parameters[name]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every unmerged adapter into its weight (W += delta); returns how many were merged."""
    n = 0
    for path, lora in lora_modules(model):
        if not lora.merged:
            _, w = _base(model, path, lora)
            w.copy_(lora.effective(w))
            lora.merged = True
            n += 1
    return n


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> int:
    """Take merged adapters out of their weights again (W -= delta, exact up to rounding)."""
    n = 0
    for path, lora in lora_modules(model):
        if lora.merged:
            _, w = _base(model, path, lora)
            w.copy_(lora.effective(w, sign=-1.0))
            lora.merged = False
            n += 1
    return n


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Strip the adapters and their hooks; with ``merge`` their updates stay in the weights (for
    serving or export), else the weights are as before the adapters. Returns ``model``."""
    if merge:
        merge_lora(model)
    else:
        unmerge_lora(model)
    for module in list(model.modules()):
        lora = module._modules.get("lora")
        if isinstance(lora, (nn.ModuleDict, LoraWeight)):
            del module._modules["lora"]
            _drop_hook(module._forward_pre_hooks, _shadow_weights)
            _drop_hook(module._forward_hooks, _clear_shadows)
            _drop_hook(module._forward_hooks, _add_low_rank)
    if "lora_config" in model.__dict__:
        del model.__dict__["lora_config"]
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, lora in lora_modules(model) for p in (lora.A, lora.B)]


def count_lora_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(model))


# ------------------------------------------------------------------------------------------- files
def _config_of(model: nn.Module) -> LoraConfig:
    cfg = getattr(model, "lora_config", None)
    if not isinstance(cfg, LoraConfig):
        raise ValueError("the model has no LoRA config (apply_lora sets model.lora_config)")
    return cfg


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters (A and B of each, float32 or wider) as one safetensors file with the LoRA
    config and the base shapes in its metadata; written to a temporary file, then renamed."""
    from safetensors.torch import save

    cfg = _config_of(model)
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, Any] = {}
    for name, lora in lora_modules(model):
        base_name, _ = _base(model, name, lora)
        targets[name] = {"base": base_name, "shape": list(lora.base_shape), "experts": lora.expert_ids}
        tensors[f"{name}.A"] = lora.A.detach().cpu().contiguous()
        tensors[f"{name}.B"] = lora.B.detach().cpu().contiguous()
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": json.dumps(cfg.to_dict()),
            "targets": json.dumps(targets)}
    data = save(tensors, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, Any], dict[str, torch.Tensor]]:
    """(config, targets {adapter path: {base, shape, experts}}, tensors) of an adapter file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter {path} is not a file")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"adapter {path} is not a safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"adapter {path} is not a moekit LoRA adapter (metadata format={meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"adapter {path} has format version {meta.get('version')!r}; this moekit reads "
                              f"{FORMAT_VERSION!r}")
    try:
        cfg = LoraConfig.from_dict(json.loads(meta["config"]))
        targets = json.loads(meta["targets"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"adapter {path}: metadata is damaged ({err})") from None
    except ConfigError as err:
        raise CheckpointError(f"adapter {path}: {err}") from None
    return cfg, targets, tensors


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path, merge: bool = False) -> nn.Module:
    """Apply the adapter file at ``path`` to ``model`` (which must have none yet) and load its
    tensors; with ``merge`` fold it into the weights and strip it (a plain model for serving).
    Errors name the file and the tensor whose shape or presence differs."""
    cfg, targets, tensors = read_adapter(path)
    try:
        apply_lora(model, cfg)
    except ConfigError as err:
        raise CheckpointError(f"adapter {path} does not fit this model: {err}") from None
    mine = dict(lora_modules(model))
    missing, unexpected = sorted(set(mine) - set(targets)), sorted(set(targets) - set(mine))
    if missing or unexpected:
        remove_lora(model, merge=False)
        raise CheckpointError(f"adapter {path} does not fit this model: adapters the model expects but the file "
                              f"lacks {missing[:6]}, adapters in the file the model has no place for {unexpected[:6]}")
    problems = []
    for name, lora in mine.items():
        base_name, base = _base(model, name, lora)
        want = tuple(targets[name]["shape"])
        if tuple(base.shape) != want:
            problems.append(f"tensor {base_name!r} has shape {tuple(base.shape)} in the model but the adapter was "
                            f"trained on {want}")
            continue
        for part in ("A", "B"):
            t = tensors.get(f"{name}.{part}")
            dst = getattr(lora, part)
            if t is None or tuple(t.shape) != tuple(dst.shape):
                problems.append(f"tensor {name}.{part} is {None if t is None else tuple(t.shape)} in the file, "
                                f"expected {tuple(dst.shape)}")
            else:
                dst.copy_(t)
    if problems:
        remove_lora(model, merge=False)
        raise CheckpointError(f"adapter {path} does not fit this model: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if merge:
        remove_lora(model, merge=True)
    return model
