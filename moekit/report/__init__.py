"""Reports of training runs: PNG plots (matplotlib, lazy) and a self-contained HTML page."""

from .html import pre, write_report

__all__ = ["write_report", "pre"]
