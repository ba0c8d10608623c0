"""Explanations and diagnosis of MoE routing: per-token expert choices (terminal and HTML),
experts' label affinity, routing stability between models, expert weight drift, per-expert
loss, a latency breakdown of the forward pass, and the loss under expert masking."""

from .latency import format_latency, latency_breakdown
from .mask_sweep import mask_sweep, plot_mask_sweep
from .stability import per_expert_loss, routing_change, weight_drift
from .tokens import Explanation, explain_ids, explain_text, label_affinity, render_html, render_terminal

__all__ = ["Explanation", "explain_ids", "explain_text", "label_affinity", "render_terminal", "render_html",
           "routing_change", "weight_drift", "per_expert_loss", "latency_breakdown", "format_latency", "mask_sweep", "plot_mask_sweep"]
