"""The alert page's per-minute traffic chart, drawn on the server as inline SVG.

Three small panels share the time axis, each on its own scale: connections run to
thousands while distinct destinations or rejects may be a handful, and on one scale the
smaller series would lie flat on the axis. The alert window is shaded across all three.
"""

from __future__ import annotations

import datetime as dt
from html import escape

from .queries import MINUTE_MS, Minute

WIDTH = 1160
LEFT = 60
RIGHT = 14
TOP = 6
PANEL_H = 62
GAP = 26
AXIS_H = 20

SERIES = (
    ("connections", "connections", "#2563eb"),
    ("distinct_dst", "distinct destinations", "#7c3aed"),
    ("rejected", "rejected", "#dc2626"),
)


def _hhmm(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%H:%M")


def minute_chart(minutes: list[Minute], window_start_ms: int, window_end_ms: int, *, title: str = "") -> str:
    """An ``<svg>`` element (a string to embed as it is) of the minutes, with the alert window shaded."""
    n = len(minutes)
    height = TOP + len(SERIES) * (PANEL_H + GAP) + AXIS_H - GAP + 14
    plot_w = WIDTH - LEFT - RIGHT
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
             f'width="100%" role="img" aria-label="{escape(title or "traffic per minute")}">',
             f"<title>{escape(title or 'traffic per minute')}</title>"]
    if n == 0:
        parts.append(f'<text x="{LEFT}" y="{TOP + 20}" class="chart-empty">no flows stored for this source</text></svg>')
        return "".join(parts)
    first = minutes[0].start_ms

    def x_at(ms: float) -> float:
        return LEFT + (ms - first) / MINUTE_MS * (plot_w / max(1, n - 1))

    band_x0 = x_at(window_start_ms // MINUTE_MS * MINUTE_MS)
    band_x1 = max(x_at(window_end_ms), band_x0 + 3)
    band_h = len(SERIES) * (PANEL_H + GAP) - GAP
    parts.append(f'<rect class="alert-window" x="{band_x0:.1f}" y="{TOP}" width="{band_x1 - band_x0:.1f}" '
                 f'height="{band_h}" fill="#f59e0b" fill-opacity="0.18"><title>alert window</title></rect>')
    for i, (attr, label, colour) in enumerate(SERIES):
        y0 = TOP + i * (PANEL_H + GAP)
        values = [getattr(m, attr) for m in minutes]
        peak = max(values)
        scale = max(peak, 1)

        def y_at(v: float) -> float:
            return y0 + PANEL_H - v / scale * (PANEL_H - 4)

        points = " ".join(f"{x_at(m.start_ms):.1f},{y_at(v):.1f}" for m, v in zip(minutes, values))
        parts.append(f'<g class="panel" data-series="{attr}">')
        parts.append(f'<line x1="{LEFT}" y1="{y0 + PANEL_H}" x2="{WIDTH - RIGHT}" y2="{y0 + PANEL_H}" '
                     'stroke="#cbd5e1" stroke-width="1"/>')
        parts.append(f'<line x1="{LEFT}" y1="{y0}" x2="{LEFT}" y2="{y0 + PANEL_H}" stroke="#cbd5e1" stroke-width="1"/>')
        if peak:
            parts.append(f'<text x="{LEFT - 6}" y="{y0 + 9}" text-anchor="end" class="tick">{peak:,}</text>')
        parts.append(f'<text x="{LEFT - 6}" y="{y0 + PANEL_H}" text-anchor="end" class="tick">0</text>')
        parts.append(f'<text x="{LEFT + 6}" y="{y0 + 10}" class="series-label" fill="{colour}">{escape(label)} per minute'
                     f' (peak {peak:,})</text>')
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.8" '
                     f'stroke-linejoin="round" points="{points}"/>')
        parts.append("</g>")
    axis_y = TOP + band_h + 14
    step = 10 if n > 30 else 5 if n > 10 else 1
    for m in minutes:
        if (m.start_ms // MINUTE_MS) % step == 0:
            x = x_at(m.start_ms)
            parts.append(f'<line x1="{x:.1f}" y1="{axis_y - 12}" x2="{x:.1f}" y2="{axis_y - 8}" stroke="#94a3b8"/>')
            parts.append(f'<text x="{x:.1f}" y="{axis_y + 4}" text-anchor="middle" class="tick">{_hhmm(m.start_ms)}</text>')
    parts.append(f'<text x="{WIDTH - RIGHT}" y="{axis_y + 4}" text-anchor="end" class="tick">UTC</text>')
    parts.append("</svg>")
    return "".join(parts)
