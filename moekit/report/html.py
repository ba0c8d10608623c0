"""A self-contained HTML report: tables of numbers and PNG plots embedded as base64 data URIs,
so the single file opens in any browser with no other files beside it."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(path: str | Path, title: str, sections: list[tuple[str, list[Any]]]) -> Path:
    """Write ``sections`` [(heading, items)] where an item is a str (HTML), a (png bytes, alt) pair,
    or a ("table", header, rows) triple. Written to a temporary file and renamed into place."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#eee}img{max-width:100%;margin:0.5em 0}"
             "pre{background:#f6f6f6;padding:0.6em;white-space:pre-wrap}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, tuple) and len(item) == 2:
                parts.append(_img(*item))
            elif isinstance(item, tuple) and len(item) == 3 and item[0] == "table":
                parts.append(_table(item[1], item[2]))
            else:
                raise TypeError(f"report item of type {type(item).__name__} is not str, (png, alt) or ('table', h, rows)")
    parts.append("</body></html>")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"
