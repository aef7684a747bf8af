"""Putting figures and tables on the page: embedded PNG figures with captions, tables that fit 1300 px.

A report page is read at :data:`PAGE_WIDTH_PX`: figures are at most 13 in wide at 100 dpi, table cells
wrap between words (never inside one, and never inside "mean ± sd"), and a table with more than
:data:`MAX_COLUMNS` columns is split into parts of about equal width (:func:`split_columns`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure

from crmse.report.style import DPI

PAGE_WIDTH_PX = 1300
#: Most columns of one table on the page; wider tables are split, their key columns repeated.
MAX_COLUMNS = 12
TABLE_CLASS = "crmse-table"
#: " ± " in table cells is bound with no-break spaces, so a cell wraps around "mean ± sd", not inside it;
#: so is the space between a number and its unit ("500 K").
PM_NOBREAK = "\u00a0±\u00a0"
UNIT_SPACE = re.compile(r"(?<=\d) (?=(?:K|ps|fs|Å)\b)")
TABLE_CSS = (
    f"<style>table.{TABLE_CLASS}{{border-collapse:collapse;font-size:0.9em;max-width:{PAGE_WIDTH_PX - 60}px;"
    "table-layout:auto}"
    f"table.{TABLE_CLASS} th,table.{TABLE_CLASS} td{{padding:3px 8px;border-bottom:1px solid #ddd;"
    "text-align:right;white-space:normal;overflow-wrap:break-word;word-break:normal;hyphens:manual;"
    "vertical-align:top}"
    f"table.{TABLE_CLASS} th{{max-width:11em}}"
    f"table.{TABLE_CLASS} td:first-child,table.{TABLE_CLASS} th:first-child{{text-align:left;max-width:22em}}"
    "</style>"
)


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes at :data:`DPI`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def figure_html(fig: Figure, key: str, caption: str) -> str:
    """A ``<figure id="fig-<key>">`` with the PNG embedded as base64; alt text and caption = ``caption``."""
    data = base64.b64encode(figure_png(fig)).decode()
    cap = html.escape(caption)
    return (
        f'<figure id="fig-{html.escape(key)}" style="margin:0 0 1.5em 0">'
        f'<img alt="{cap}" style="max-width:100%;height:auto" src="data:image/png;base64,{data}"/>'
        f'<figcaption style="font-size:0.95em;color:#444;max-width:75em">{cap}</figcaption></figure>'
    )


def split_columns(df: pd.DataFrame, keys: Sequence[str], max_columns: int = MAX_COLUMNS) -> list[pd.DataFrame]:
    """``df`` as tables of at most ``max_columns`` columns each, every one starting with the ``keys`` columns."""
    if len(df.columns) <= max_columns:
        return [df]
    keys = [k for k in keys if k in df.columns]
    rest = [c for c in df.columns if c not in keys]
    parts = math.ceil(len(rest) / max(max_columns - len(keys), 1))
    per = math.ceil(len(rest) / parts)  # parts of about equal width, not a full one and a stub
    return [df[keys + rest[i : i + per]] for i in range(0, len(rest), per)]


def table_html(df: pd.DataFrame, table_id: str, escape: bool = True, keys: Sequence[str] = ()) -> str:
    """HTML of ``df`` in wrapping cells, split by :func:`split_columns` (parts ``<id>``, ``<id>-2``, …)."""
    df = df.map(lambda v: UNIT_SPACE.sub("\u00a0", v.replace(" ± ", PM_NOBREAK)) if isinstance(v, str) else v)
    parts = split_columns(df, keys or df.columns[:1].tolist())
    out = [TABLE_CSS]
    for k, part in enumerate(parts):
        body = part.to_html(index=False, escape=escape, border=0, na_rep="—", classes=TABLE_CLASS)
        part_id = table_id if k == 0 else f"{table_id}-{k + 1}"
        out.append(f'<div id="{html.escape(part_id)}" style="margin-bottom:1em">{body}</div>')
    return "".join(out)


def show(fig: Figure | None, key: str, caption: str) -> None:
    """Display a figure in the notebook (embedded PNG + caption); the caption alone when there is no figure."""
    from IPython.display import HTML, display

    if fig is None:
        display(HTML(f'<p id="fig-{html.escape(key)}-missing"><em>{html.escape(caption)}</em></p>'))
        return
    display(HTML(figure_html(fig, key, caption)))


def show_markdown(text: str) -> None:
    """Display generated Markdown."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def show_table(df: pd.DataFrame | None, table_id: str, escape: bool = True, keys: Sequence[str] = ()) -> None:
    """Display a table (see :func:`table_html`); nothing for None."""
    from IPython.display import HTML, display

    if df is not None:
        display(HTML(table_html(df, table_id, escape, keys)))
