"""Run a layer or model once inside ``moekit.capture_routing`` and hand back what it routed."""

from __future__ import annotations

from typing import Any

from torch import nn

import moekit
from moekit import RoutingCapture, RoutingEvent


def routed(layer: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, RoutingEvent]:
    """``layer(*args, **kwargs)`` and the ``RoutingEvent`` of its one MoE layer."""
    with moekit.capture_routing(layer) as cap:
        out = layer(*args, **kwargs)
    return out, cap.last()


def captured(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, RoutingCapture]:
    """``model(*args, **kwargs)`` and the capture of every MoE layer's events."""
    with moekit.capture_routing(model) as cap:
        out = model(*args, **kwargs)
    return out, cap
