"""The HTML page of the sweep report: one self-contained file (inline CSS, PNGs as
base64 data URIs, no scripts, no external resources), so it can be mailed, copied
off a cluster, or opened from a file share as is.

Built by `python -m finellama_rl.report results/<sweep>` (finellama_rl/report.py).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Dict, Sequence, Tuple

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #1a1a1a; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
.sub { color: #555; font-size: 13px; margin-bottom: 16px; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 12px; }
th, td { border: 1px solid #888; padding: 3px 5px; text-align: right; white-space: nowrap; }
th { background: #1f3b5c; color: #fff; font-weight: 600; white-space: normal; max-width: 84px; vertical-align: bottom; }
td:nth-child(-n+4), th:nth-child(-n+4) { text-align: left; }
tr:nth-child(even) td { background: #eef2f7; }
td.pos { color: #0a6b2c; font-weight: 600; } td.neg { color: #a31515; font-weight: 600; }
td.ns { color: #777; font-style: italic; } td.sig-pos { background: #d8f0dd !important; color: #0a6b2c; font-weight: 600; }
td.sig-neg { background: #f6d9d9 !important; color: #a31515; font-weight: 600; }
h2 { font-size: 16px; margin: 18px 0 6px 0; }
ul.notes { color: #444; font-size: 12px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 560px; max-width: 100%; }
img { width: 100%; height: auto; border: 1px solid #ddd; }
"""


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


SIGNIFICANCE_HEADERS = ("vs baseline", "verdict")
FLAG_HEADER = "flag"  # the training-signals table: a raised reward-hacking flag is red


def _cell(header: str, value: str) -> str:
    cls = ""
    if header.startswith("Δ") and len(value) > 1 and value[0] in "+-" and value[1:] != "0.0":
        cls = " class='pos'" if value[0] == "+" else " class='neg'"
    elif header == FLAG_HEADER and value.startswith("reward up"):
        cls = " class='sig-neg'"
    elif header in SIGNIFICANCE_HEADERS:
        if value.startswith("not significant"):
            cls = " class='ns'"
        elif value.startswith("better") or (header == "verdict" and value.endswith(" better")):
            cls = " class='sig-pos'"  # significant: final above baseline, or the named run above the other
        elif value.startswith("worse"):
            cls = " class='sig-neg'"
    return f"<td{cls}>{html.escape(value)}</td>"


def table_html(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str = "runs") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(h, str(v)) for h, v in zip(headers, row)) + "</tr>" for row in rows)
    return f"<table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_html(title: str, subtitle: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
               notes: Sequence[str], images: Dict[str, Path],
               more_tables: Sequence[Tuple[str, Sequence[str], Sequence[Sequence[str]]]] = (),
               anchors: Sequence[str] = ()) -> str:
    """The page: the runs table, further (title, headers, rows) tables when they have rows (each
    table's id: its anchor, e.g. report.html#arms, else table2, table3, ...), notes, plots."""
    figures = "".join(
        f"<figure><img alt='{html.escape(name)}' src='{data_uri(path)}'></figure>"
        for name, path in images.items()
    )
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    ids = [*anchors, *(f"table{i + 2}" for i in range(len(anchors), len(more_tables)))]
    extra = "".join(f"<h2>{html.escape(t)}</h2>{table_html(h, r, ids[i])}" for i, (t, h, r) in enumerate(more_tables) if r)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><div class='sub'>{html.escape(subtitle)}</div>"
        f"{table_html(headers, rows)}{extra}<ul class='notes'>{notes_html}</ul>"
        f"<div class='plots'>{figures}</div></body></html>\n"
    )
