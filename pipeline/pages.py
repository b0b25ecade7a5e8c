"""Shared pieces of the self-contained HTML pages (evaluation report, audit, nightly drift).

Every page embeds its images as base64 so it can be mailed or attached to a ticket as one
file. Only the standard library is imported here; matplotlib loads when a plot is drawn, so a
job that writes no plot does not pay for it.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

PNG_DPI = 110

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1150px;color:#222}
h1{margin-bottom:0}.subtitle{margin-top:.3em;color:#555;font-size:1.1em}
table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
table.summary th{font-weight:normal;background:#f6f6f6}img{max-width:100%}
td.n{text-align:right;min-width:2.2em}table.cm th{vertical-align:bottom}
th.v{padding:4px 2px}th.v span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap}
table.pairs td{vertical-align:top}.examples{display:flex;gap:8px}
figure{margin:0;width:150px;font-size:11px;line-height:1.3}figure img{display:block;margin-bottom:2px}
figcaption{overflow-wrap:anywhere}.noimg{width:96px;height:72px;background:#eee;color:#888;font-size:11px}
.plots{display:flex;gap:1em;align-items:flex-start}.plots img{max-width:49%}.note{color:#555}"""


def esc(value: Any) -> str:
    """`value` as escaped HTML text (quotes too, so it is safe inside an attribute)."""
    return html.escape(str(value), quote=True)


def img_tag(data: bytes, alt: str, mime: str = "image/png") -> str:
    """An <img> with the image embedded as a base64 data URI."""
    return f'<img alt="{esc(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def fmt_value(value: Any) -> str:
    """A metric for a table cell: 'n/a' for None, four decimals for a float, else escaped text."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else esc(value)


def percent(value: Any) -> str:
    """A share as a percent with one decimal; anything else as `fmt_value` shows it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.1%}"
    return fmt_value(value)


def html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
