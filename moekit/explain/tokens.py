"""Per-token explanations: which experts each token chose in each MoE layer, with what weights,
shown in the terminal (ANSI colours, one colour per expert) or as a self-contained HTML page;
and which document labels each expert mostly serves.

Shape legend: T tokens, K top-k, L MoE layers, N labels, E experts.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..model_ops import capture_routing, moe_layers

# 12 distinguishable xterm-256 colours (expert e uses PALETTE[e % 12]) and their RGB for HTML.
PALETTE = [196, 33, 40, 214, 129, 45, 202, 93, 118, 220, 27, 161]
RGB = ["#ff0000", "#0087ff", "#00d700", "#ffaf00", "#af00ff", "#00d7ff", "#ff5f00", "#8700ff", "#87ff00",
       "#ffd700", "#005fff", "#d7005f"]


@dataclass
class Explanation:
    """tokens[t]: text of token t ("" for a byte inside a multi-byte character); experts[l][t] and
    weights[l][t]: token t's top-k expert ids and weights in MoE layer ``layers[l]``."""

    tokens: list[str]
    token_ids: list[int]
    layers: list[str]
    experts: list[list[list[int]]]
    weights: list[list[list[float]]]
    affinity: dict[str, list[dict[str, Any]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cells(self) -> list[tuple[str, list[int]]]:
        """The text as shown: (character, token indices) per cell. The tokens of a multi-byte UTF-8
        character (all "" but the last, which carries the character) share one cell."""
        return character_cells(self.tokens)


def character_cells(pieces: list[str]) -> list[tuple[str, list[int]]]:
    """Group token pieces into display cells: a run of "" pieces joins the token that completes
    the character; a trailing run with no completing token is one cell shown as U+FFFD."""
    cells: list[tuple[str, list[int]]] = []
    pending: list[int] = []
    for t, piece in enumerate(pieces):
        pending.append(t)
        if piece:
            cells.append((piece, pending))
            pending = []
    if pending:
        cells.append(("\ufffd", pending))
    return cells


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Text each token adds to the decoded prefix; a token that ends inside a character adds ""
    and the character is shown on the token that completes it."""
    pieces, shown = [], ""
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[:i + 1]).rstrip("\ufffd")
        if prefix.startswith(shown):
            pieces.append(prefix[len(shown):])
            shown = prefix
        else:
            pieces.append(tokenizer.decode([ids[i]]))
            shown = prefix
    return pieces


@torch.no_grad()
def explain_ids(model: nn.Module, ids_S: list[int], tokenizer: Any | None = None) -> Explanation:
    """Run ``model`` on one sequence of ids and record every MoE layer's top-k choice per token."""
    if not ids_S:
        raise ValueError("nothing to explain: the text encodes to no tokens")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers")
    was_training = model.training
    model.eval()
    try:
        with capture_routing(model) as cap:
            model(torch.tensor([ids_S], dtype=torch.long))
    finally:
        model.train(was_training)
    experts, weights = [], []
    for name, _ in layers:
        routing = cap.last(name).routing
        if routing.topk_idx_TK is None:
            raise ValueError(f"{name}: explain needs a token-choice router")
        order_TK = routing.topk_weight_TK.argsort(dim=-1, descending=True)
        experts.append(routing.topk_idx_TK.gather(1, order_TK).tolist())
        weights.append(routing.topk_weight_TK.gather(1, order_TK).tolist())
    pieces = token_pieces(tokenizer, ids_S) if tokenizer is not None else [str(i) for i in ids_S]
    return Explanation(pieces, list(ids_S), [n for n, _ in layers], experts, weights)


def explain_text(model: nn.Module, tokenizer: Any, text: str) -> Explanation:
    return explain_ids(model, tokenizer.encode(text), tokenizer)


def label_affinity(counts_NE: dict[str, list[list[float]]], label_names: list[str], top: int = 3
                   ) -> dict[str, list[dict[str, Any]]]:
    """{layer: [{expert, tokens, labels: [(label, share of the expert's picks), ...top]}]} from
    (labels, experts) pick counts such as ``Trainer.evaluate(routing_by_label=True)`` returns."""
    out = {}
    for layer, rows in counts_NE.items():
        c_NE = torch.tensor(rows, dtype=torch.float64)
        per_expert = []
        for e in range(c_NE.shape[1]):
            col = c_NE[:, e]
            total = float(col.sum())
            order = col.argsort(descending=True)[:top].tolist()
            labels = [(label_names[i], float(col[i]) / total) for i in order if total > 0 and col[i] > 0]
            per_expert.append({"expert": e, "tokens": total, "labels": labels})
        out[layer] = per_expert
    return out


def _visible(piece: str) -> str:
    return piece.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u2423") if piece else "\u00b7"


def render_terminal(expl: Explanation, color: bool = True) -> str:
    """One line per character (a multi-byte character's tokens share its line): the character, then
    per MoE layer its tokens' experts and weights (top-1 first, tokens separated by " / "); with
    ``color`` each expert id is drawn in its own colour. Then each expert's main labels."""
    def paint(e: int, text: str) -> str:
        return f"\x1b[38;5;{PALETTE[e % len(PALETTE)]}m{text}\x1b[0m" if color else text

    def label(text: str, idx: list[int]) -> str:
        return _visible(text) + (f" ({len(idx)} tokens)" if len(idx) > 1 else "")

    cells = expl.cells()
    width = max(8, *(len(label(c, idx)) for c, idx in cells))
    header = f"{'token':<{width}}  " + "  ".join(f"{name:<{8 * len(expl.experts[l][0])}}"
                                               for l, name in enumerate(expl.layers))
    lines = [header]
    for text, idx in cells:
        parts = [" / ".join(" ".join(paint(e, f"e{e}:{w:.2f}") for e, w in zip(expl.experts[l][t], expl.weights[l][t]))
                            for t in idx) for l in range(len(expl.layers))]
        lines.append(f"{label(text, idx):<{width}}  " + "  ".join(parts))
    if expl.affinity:
        lines.append("")
        lines.append("labels each expert mostly serves (share of its top-k picks on validation data):")
        for layer, rows in expl.affinity.items():
            parts = [paint(r["expert"], f"e{r['expert']}") + " " + ", ".join(f"{lab} {s:.0%}" for lab, s in r["labels"])
                     for r in rows]
            lines.append(f"  {layer}: " + " | ".join(parts))
    return "\n".join(lines)


def render_html(expl: Explanation, title: str = "moekit explain") -> str:
    """A self-contained page: per MoE layer the text, one cell per character coloured by its tokens'
    top-1 experts (hover for all experts and weights), a per-character table, and the experts'
    label affinity."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em} .tok{font-family:monospace;padding:1px 0;white-space:pre}"
             "table{border-collapse:collapse;font-family:monospace} td,th{border:1px solid #ccc;padding:2px 6px}"
             "</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for l, name in enumerate(expl.layers):
        parts.append(f"<h2>{esc(name)}: characters coloured by their tokens' top-1 experts</h2><p>")
        for text, idx in expl.cells():
            # One cell per character; its background has one stripe per token (byte), in that
            # token's top-1 expert colour, so a CJK character shows its three bytes' experts.
            tip = "; ".join((f"token {expl.token_ids[t]}: " if len(idx) > 1 else "")
                            + ", ".join(f"expert {e}: {w:.3f}" for e, w in zip(expl.experts[l][t], expl.weights[l][t]))
                            for t in idx)
            colours = [RGB[expl.experts[l][t][0] % len(RGB)] for t in idx]
            stops = ", ".join(f"{c}55 {100 * i / len(idx):.1f}% {100 * (i + 1) / len(idx):.1f}%"
                              for i, c in enumerate(colours))
            under = ", ".join(f"{c} {100 * i / len(idx):.1f}% {100 * (i + 1) / len(idx):.1f}%"
                              for i, c in enumerate(colours))
            parts.append(f"<span class='tok' title='{esc(tip)}' style='background:linear-gradient(to right, {stops}) "
                         f"top/100% calc(100% - 3px) no-repeat, linear-gradient(to right, {under}) bottom/100% 3px "
                         f"no-repeat'>{esc(text)}</span>")
        parts.append("</p>")
    parts.append("<h2>per character</h2><table><tr><th>tokens</th><th>character</th><th>token ids</th>"
                 + "".join(f"<th>{esc(n)}</th>" for n in expl.layers) + "</tr>")
    for text, idx in expl.cells():
        cells = "".join("<td>" + "<br>".join(" ".join(f"<span style='color:{RGB[e % len(RGB)]}'>e{e}</span>:{w:.2f}"
                                                      for e, w in zip(expl.experts[l][t], expl.weights[l][t]))
                                             for t in idx) + "</td>"
                        for l in range(len(expl.layers)))
        span = str(idx[0]) if len(idx) == 1 else f"{idx[0]}-{idx[-1]}"
        ids = " ".join(str(expl.token_ids[t]) for t in idx)
        parts.append(f"<tr><td>{span}</td><td>{esc(repr(text))}</td><td>{ids}</td>{cells}</tr>")
    parts.append("</table>")
    if expl.affinity:
        parts.append("<h2>labels each expert mostly serves</h2>")
        for layer, rows in expl.affinity.items():
            parts.append(f"<h3>{esc(layer)}</h3><table><tr><th>expert</th><th>tokens</th><th>labels</th></tr>")
            for r in rows:
                labels = ", ".join(f"{esc(lab)} {s:.0%}" for lab, s in r["labels"])
                parts.append(f"<tr><td style='color:{RGB[r['expert'] % len(RGB)]}'>e{r['expert']}</td>"
                             f"<td>{r['tokens']:.0f}</td><td>{labels}</td></tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
