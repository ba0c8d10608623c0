"""Fault tolerance for MoE models: find corrupted experts, quarantine them, report their health.

* ``scan_weights`` finds experts whose weights (stacked expert rows or router rows) hold NaN/Inf.
* ``quarantine_experts`` masks the experts a scan found, so the model keeps serving with the
  others; ``moekit.train.load_checked`` loads a trained run and scans it (``CorruptExpertError``
  names file, layer, expert and tensor).
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
from typing import Any

import torch
from torch import nn

from .layer import MoE, ExpertNonFiniteError
from .model_ops import moe_layers
from .ops import all_finite


class CorruptExpertError(ValueError):
    """Experts with NaN/Inf weights; ``findings`` lists them, the message names each."""

    def __init__(self, findings: list[CorruptExpert], where: str = "") -> None:
        self.findings = findings
        prefix = f"{where}: " if where else ""
        names = "; ".join(f"{f.layer} expert {f.expert} ({', '.join(f.tensors)})" for f in findings)
        super().__init__(f"{prefix}non-finite (NaN/Inf) weights in {names}. moekit.train.load_checked(path, quarantine=True) "
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
                    if not all_finite(p):
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

        def forward(x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
            self._calls += 1
            for _ in range(layer.num_experts):
                try:
                    return plain(x, token_mask=token_mask)
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
