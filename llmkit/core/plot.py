"""A loss-curve image (SVG) written by hand: no plotting library needed for two polylines."""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 720, 420, 64, 20, 56, 48


def _ticks(lo: float, hi: float, n: int = 8, *, whole: bool = False) -> list[float]:
    """Round tick values between lo and hi (whole numbers only with ``whole``, e.g. steps)."""
    if hi <= lo:
        return [lo]
    raw = max((hi - lo) / n, 1.0) if whole else (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def loss_curve_svg(train: list[tuple[int, float]], val: list[tuple[int, float]], title: str,
                   ylabel: str = "loss (nats/token)") -> str:
    """Training loss (thin) and validation loss (thick, dotted points) against steps."""
    points = [p for p in train + val if math.isfinite(p[1])]
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}"></svg>\n'
    x_hi = max(max(s for s, _ in points), 1)
    y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
    if y_hi - y_lo < 1e-6:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def sx(s: float) -> float:
        return PAD_L + (W - PAD_L - PAD_R) * s / x_hi

    def sy(v: float) -> float:
        return H - PAD_B - (H - PAD_T - PAD_B) * (v - y_lo) / (y_hi - y_lo)

    def line(series, color, width):
        pts = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in series if math.isfinite(v))
        return f'<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{pts}"/>'

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for t in _ticks(y_lo, y_hi):
        y = sy(t)
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{round(t, 6):g}</text>')
    for t in _ticks(0, x_hi, whole=True):
        x = sx(t)
        out.append(f'<text x="{x:.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{round(t):d}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">step</text>')
    out.append(f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">{escape(ylabel)}</text>')
    if train:
        out.append(line(train, "#7aa6d6", 1.2))
    if val:
        out.append(line(val, "#d1495b", 2.2))
        out.extend(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="#d1495b"/>' for s, v in val if math.isfinite(v))
    # The legend sits in the top margin, above the plot, where no curve can pass under it.
    out.append(f'<text x="{W - PAD_R - 300}" y="{PAD_T - 12}" fill="#7aa6d6">— train loss</text>')
    out.append(f'<text x="{W - PAD_R - 150}" y="{PAD_T - 12}" fill="#d1495b">● validation loss</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_loss_curve(path: Path, train, val, title: str, ylabel: str = "loss (nats/token)") -> None:
    Path(path).write_text(loss_curve_svg(train, val, title, ylabel), encoding="utf-8")
