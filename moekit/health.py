"""Fault tolerance for MoE models: find corrupted experts, quarantine them, report their health.

* ``scan_weights`` finds experts whose weights (stacked expert rows or router rows) hold NaN/Inf.
* ``load_checked`` loads a checkpoint and scans it: a corrupted expert raises
  ``CorruptExpertError`` naming file, layer, expert and tensor, or with ``quarantine=True`` is
  masked so the model keeps serving with the other experts.
* ``Quarantine`` (opt-in, run time): when a layer raises ``ExpertNonFiniteError`` the named
  experts are masked and that layer's forward is rerun; each event is recorded.
* ``health_report`` gives each expert's state: ok, masked, corrupt weights, non-finite outputs,
  dead (no tokens for the layer's dead window), with its load.

Masking is ``MoE.mask_experts``: the router picks among the remaining experts and renormalises,
so a masked expert's tokens go to their next-best experts.

Shape legend: E experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layer import MoE, ExpertNonFiniteError
from .model_ops import moe_layers


class CorruptExpertError(ValueError):
    """Experts with NaN/Inf weights; ``findings`` lists them, the message names each."""

    def __init__(self, findings: list[CorruptExpert], where: str = "") -> None:
        self.findings = findings
        prefix = f"{where}: " if where else ""
        names = "; ".join(f"{f.layer} expert {f.expert} ({', '.join(f.tensors)})" for f in findings)
        super().__init__(f"{prefix}non-finite (NaN/Inf) weights in {names}. load_checked(path, quarantine=True) "
                         f"masks them and serves with the other experts; `moekit health` reports them")


@dataclass
class CorruptExpert:
    layer: str
    expert: int
    tensors: list[str]


@torch.no_grad()
def scan_weights(model: nn.Module) -> list[CorruptExpert]:
    """Experts whose own rows of any stacked expert tensor, or whose router row, are not finite."""
    found = []
    for name, layer in moe_layers(model):
        E = layer.num_experts
        bad: dict[int, list[str]] = {}
        if hasattr(layer.experts, "experts"):  # a list of arbitrary expert modules
            tensors = []
            for e, module in enumerate(layer.experts.experts):
                for n, p in module.named_parameters():
                    if not bool(torch.isfinite(p).all()):
                        bad.setdefault(e, []).append(f"experts.{e}.{n}")
        else:  # stacked (E, ...) tensors
            tensors = [(f"experts.{n}", p) for n, p in layer.experts.named_parameters()
                       if p.dim() >= 1 and p.shape[0] == E]
        for pname in ("weight", "bias", "noise_weight"):
            p = getattr(layer.router, pname, None)
            if isinstance(p, torch.Tensor) and p.dim() >= 1 and p.shape[0] == E:
                tensors.append((f"router.{pname}", p))
        for tname, p in tensors:
            ok_E = torch.isfinite(p.reshape(E, -1)).all(dim=1)
            for e in torch.nonzero(~ok_E).flatten().tolist():
                bad.setdefault(e, []).append(tname)
        found += [CorruptExpert(name, e, sorted(t)) for e, t in sorted(bad.items())]
    return found


def quarantine_experts(model: nn.Module, findings: list[CorruptExpert]) -> None:
    """Mask every expert in ``findings`` and zero its non-finite weights (a NaN in a row that no
    token uses is harmless in the grouped product, but 0 * NaN in a dense fallback is not)."""
    layers = dict(moe_layers(model))
    by_layer: dict[str, list[int]] = {}
    for f in findings:
        by_layer.setdefault(f.layer, []).append(f.expert)
    for name, ids in by_layer.items():
        layer = layers[name]
        layer.mask_experts(ids)
        with torch.no_grad():
            for p in list(layer.experts.parameters()) + list(layer.router.parameters()):
                if p.dim() >= 1 and p.shape[0] == layer.num_experts:
                    rows = p[ids]
                    p[ids] = torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)
        layer.stats.nonfinite_E[ids] = True


def load_checked(path: str | Path, quarantine: bool = False) -> tuple[nn.Module, Any, list[CorruptExpert]]:
    """``load_trained`` plus a weight scan: (model, TrainConfig, findings). Corrupted experts raise
    CorruptExpertError naming the file, unless ``quarantine`` masks them."""
    from .train.trainer import load_trained

    model, cfg, _ = load_trained(path)
    findings = scan_weights(model)
    if findings:
        if not quarantine:
            raise CorruptExpertError(findings, str(path))
        quarantine_experts(model, findings)
    return model, cfg, findings


@dataclass
class QuarantineEvent:
    layer: str
    experts: list[int]
    forward_call: int


@dataclass
class Quarantine:
    """Run-time quarantine for every MoE layer of ``model`` (opt-in; ``close()`` turns it off).

    A layer that raises ExpertNonFiniteError gets the named experts masked and reruns its forward
    on the same input; ``events`` records what was quarantined and when.
    """

    model: nn.Module
    events: list[QuarantineEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._layers = moe_layers(self.model)
        if not self._layers:
            raise ValueError("the model has no MoE layers to guard")
        self._calls = 0
        self._auto: list[MoE] = []
        for name, layer in self._layers:
            if layer.config.check_finite is False:
                raise ValueError(f"{name}: check_finite=False, so non-finite expert outputs cannot be detected")
            if layer.config.check_finite is None:  # auto is off in training; the guard needs the checks
                layer.config.check_finite = True
                self._auto.append(layer)
            layer.forward = self._guarded(name, layer)

    def _guarded(self, name: str, layer: MoE):
        plain = type(layer).forward.__get__(layer)

        def forward(x: torch.Tensor) -> torch.Tensor:
            self._calls += 1
            for _ in range(layer.num_experts):
                try:
                    return plain(x)
                except ExpertNonFiniteError as err:
                    self.events.append(QuarantineEvent(name, list(err.experts), self._calls))
                    layer.mask_experts(err.experts)
            raise RuntimeError(f"{name}: quarantine masked every expert it could")

        return forward

    def close(self) -> None:
        for _, layer in self._layers:
            layer.__dict__.pop("forward", None)
        for layer in self._auto:
            layer.config.check_finite = None
        self._auto = []

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


EXPERT_STATES = ("ok", "masked", "corrupt_weights", "nonfinite_outputs", "dead")


def health_report(model: nn.Module, findings: list[CorruptExpert] | None = None) -> dict[str, list[dict[str, Any]]]:
    """{layer: [{expert, state, load, masked, ...} per expert]} from the layers' statistics (run some
    inputs first so loads and non-finite outputs are counted) and a weight scan."""
    findings = scan_weights(model) if findings is None else findings
    corrupt = {(f.layer, f.expert): f.tensors for f in findings}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, layer in moe_layers(model):
        report = layer.report()
        masked = set(layer.masked_experts)
        rows = []
        for e in range(layer.num_experts):
            if (name, e) in corrupt:
                state = "corrupt_weights"
            elif e in report.nonfinite_experts:
                state = "nonfinite_outputs"
            elif e in masked:
                state = "masked"
            elif e in report.dead_experts:
                state = "dead"
            else:
                state = "ok"
            rows.append({"expert": e, "state": state, "masked": e in masked,
                         "load": report.utilization[e], "tokens": report.tokens_per_expert[e],
                         "corrupt_tensors": corrupt.get((name, e), [])})
        out[name] = rows
    return out


def findings_to_dicts(findings: list[CorruptExpert]) -> list[dict[str, Any]]:
    return [asdict(f) for f in findings]


def parse_mask_spec(specs: list[str]) -> dict[str, list[int]] | list[int]:
    """``["1,3"]`` -> the same ids in every layer; ``["layers.0.mlp:1,3", ...]`` -> {layer: ids}."""
    per_layer: dict[str, list[int]] = {}
    everywhere: list[int] = []
    for spec in specs:
        layer, sep, ids = spec.rpartition(":")
        try:
            values = [int(v) for v in ids.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--mask-experts {spec!r}: expected comma-separated expert ids, "
                             f"optionally after LAYER: (e.g. 3,5 or layers.1.mlp:3,5)") from None
        if sep:
            per_layer.setdefault(layer, []).extend(values)
        else:
            everywhere.extend(values)
    if per_layer and everywhere:
        raise ValueError("--mask-experts: give ids for every layer or per layer (LAYER:ids), not both")
    return per_layer if per_layer else everywhere


def mask_sweep(trainer: Any, max_masked: int | None = None, strategy: str = "random", repeats: int = 3,
               max_tokens: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Validation loss with m = 0, 1, ... experts masked in every MoE layer (``trainer.evaluate``).

    strategy ``most_used`` masks each layer's m most-loaded experts (loads measured unmasked),
    ``random`` averages ``repeats`` random draws per m. Returns [{masked, loss, per_label, ...}].
    """
    if strategy not in ("random", "most_used"):
        raise ValueError(f"strategy={strategy!r} is not one of ['random', 'most_used']")
    layers = moe_layers(trainer.model)
    if not layers:
        raise ValueError("the model has no MoE layers to mask")
    E, K = layers[0][1].num_experts, layers[0][1].top_k
    limit = E - K if max_masked is None else min(max_masked, E - K)
    for _, layer in layers:
        layer.unmask_experts()
    base = trainer.evaluate(max_tokens=max_tokens)
    order = {name: sorted(range(E), key=lambda e: -base["routing"][name]["utilization"][e]) for name, _ in layers}
    gen = torch.Generator().manual_seed(seed)
    rows = [{"masked": 0, "loss": base["loss"], "loss_std": 0.0, "per_label": base["per_label"], "draws": []}]
    for m in range(1, limit + 1):
        draws = []
        for r in range(1 if strategy == "most_used" else repeats):
            chosen = {}
            for name, layer in layers:
                ids = order[name][:m] if strategy == "most_used" else torch.randperm(E, generator=gen)[:m].tolist()
                layer.unmask_experts()
                layer.mask_experts(ids)
                chosen[name] = sorted(ids)
            result = trainer.evaluate(max_tokens=max_tokens)
            draws.append({"experts": chosen, "loss": result["loss"], "per_label": result["per_label"]})
        losses = torch.tensor([d["loss"] for d in draws], dtype=torch.float64)
        labels = draws[0]["per_label"].keys()
        rows.append({"masked": m, "loss": float(losses.mean()),
                     "loss_std": float(losses.std()) if len(draws) > 1 else 0.0,
                     "per_label": {k: sum(d["per_label"][k] for d in draws) / len(draws) for k in labels},
                     "draws": draws})
    for _, layer in layers:
        layer.unmask_experts()
    return rows


def plot_mask_sweep(curves: dict[str, list[dict[str, Any]]]) -> bytes:
    """PNG: validation loss against experts masked per layer, one line per curve name."""
    from .report.plots import new_figure, png

    fig = new_figure((6, 4))
    ax = fig.subplots()
    for name, rows in curves.items():
        xs = [r["masked"] for r in rows]
        ys = [r["loss"] for r in rows]
        ax.errorbar(xs, ys, yerr=[r["loss_std"] for r in rows], marker="o", ms=3, capsize=3, label=name)
    ax.set_xlabel("experts masked in every MoE layer")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("degradation under expert masking")
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)
