"""The report's charts as inline SVG, drawn without a plotting library: line charts of training
curves (``curve_charts``), the 2-D latent scatter (``scatter_chart``) and the KL per latent
dimension as bars (``kl_bar_chart``), each an HTML ``<figure>``, on axes with round-number ticks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from vaelab.report.text import esc, format_number

# Tableau 10: distinguishable, colour-blind-aware, and ten of them for ten digit classes.
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
INACTIVE = "#c5cad3"
MAX_SCATTER_POINTS = 5000  # beyond this an SVG scatter weighs megabytes and shows no more


Curve = tuple[Sequence[float], Sequence[float]]


class LatentScatter(NamedTuple):
    """Latent codes for a 2-D scatter plot.

    ``points: [n, 2]``; ``labels: [n]`` (ints or strings, coloured by class) or None;
    ``axis_names`` such as ``("z1", "z2")`` or ``("PC1", "PC2")``.
    """

    points: Any
    labels: Any = None
    axis_names: tuple[str, str] = ("z1", "z2")


def _nice_step(span: float, target: int) -> float:
    """A step of 1, 2, 2.5 or 5 times a power of ten giving about ``target`` intervals."""
    raw = span / target
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if raw <= m * power * (1 + 1e-9))


def _ticks(
    lo: float, hi: float, target: int = 5, widen: bool = True
) -> tuple[float, float, list[float]]:
    """Axis range ``(lo, hi)``, widened to round numbers if ``widen``, and the ticks inside it."""
    if hi <= lo:  # a constant series: give it a visible band
        half = abs(lo) * 0.1 or 1.0
        lo, hi = lo - half, hi + half
    step = _nice_step(hi - lo, target)
    if widen:
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    else:
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    ticks = [i * step for i in range(first, last + 1)]
    return (ticks[0], ticks[-1], ticks) if widen else (lo, hi, ticks)


def _tick_label(value: float, step: float) -> str:
    if step >= 1e5 or step < 1e-4:
        return f"{value:.3g}"
    lead = step / 10.0 ** math.floor(math.log10(step))
    decimals = max(0, -math.floor(math.log10(step)) + (1 if abs(lead - 2.5) < 1e-6 else 0))
    return f"{value + 0.0:.{decimals}f}"  # + 0.0 turns -0.0 into 0.0


@dataclass
class _Frame:
    """Maps data coordinates to SVG pixels for one plot area."""

    width: int
    height: int
    left: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    top: int = 12
    right: int = 16

    def x(self, value: float) -> float:
        lo, hi = self.x_range
        return self.left + (value - lo) / (hi - lo) * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        lo, hi = self.y_range
        span = self.height - self.top - self.bottom
        return self.height - self.bottom - (value - lo) / (hi - lo) * span


def _svg(frame: _Frame, label: str, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {frame.width} {frame.height}" '
        f'style="max-width:{frame.width}px" role="img" aria-label="{esc(label)}">'
        + "".join(parts)
        + "</svg>"
    )


def _left_margin(labels: Sequence[str], axis_title: str) -> int:
    # SVG cannot measure text; 7 px per character of the 12 px font is a safe overestimate.
    return int(12 + 7 * max((len(s) for s in labels), default=1) + (20 if axis_title else 0))


def _axes(
    frame: _Frame,
    x_ticks: Sequence[float] | None,
    y_ticks: Sequence[float],
    x_title: str = "",
    y_title: str = "",
) -> list[str]:
    """Grid lines, axis lines, tick labels and axis titles (``x_ticks`` None: no x labels)."""
    parts = []
    x0, x1 = frame.x(frame.x_range[0]), frame.x(frame.x_range[1])
    y0, y1 = frame.y(frame.y_range[0]), frame.y(frame.y_range[1])
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    for t in y_ticks:
        py = frame.y(t)
        parts.append(
            f'<line class="grid" x1="{x0:.1f}" y1="{py:.1f}" x2="{x1:.1f}" y2="{py:.1f}"/>'
        )
        parts.append(
            f'<text x="{x0 - 6:.1f}" y="{py + 4:.1f}" text-anchor="end">'
            f"{_tick_label(t, y_step)}</text>"
        )
    if x_ticks is not None:
        x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
        for t in x_ticks:
            px = frame.x(t)
            parts.append(
                f'<line class="tick" x1="{px:.1f}" y1="{y0:.1f}" x2="{px:.1f}" y2="{y0 + 4:.1f}"/>'
            )
            parts.append(
                f'<text x="{px:.1f}" y="{y0 + 17:.1f}" text-anchor="middle">'
                f"{_tick_label(t, x_step)}</text>"
            )
    parts.append(f'<line class="axis" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y0:.1f}"/>')
    parts.append(f'<line class="axis" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x0:.1f}" y2="{y1:.1f}"/>')
    if x_title:
        parts.append(
            f'<text class="title" x="{(x0 + x1) / 2:.1f}" y="{frame.height - 4}" '
            f'text-anchor="middle">{esc(x_title)}</text>'
        )
    if y_title:
        cy = (y0 + y1) / 2
        parts.append(
            f'<text class="title" x="14" y="{cy:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {cy:.1f})">{esc(y_title)}</text>'
        )
    return parts


def _legend(entries: Sequence[tuple[str, str]], kind: str) -> str:
    items = "".join(
        f'<li><span class="{kind}" style="background:{colour}"></span>{esc(name)}</li>'
        for name, colour in entries
    )
    return f'<ul class="legend">{items}</ul>'


def curve_charts(curves: Mapping[str, Mapping[str, Curve]]) -> str:
    figures = "".join(_line_chart(title, series) for title, series in curves.items())
    return f'<div class="charts">{figures}</div>' if figures else ""


def _line_chart(title: str, series: Mapping[str, Curve]) -> str:
    data = []
    for name, (xs, ys) in series.items():
        x = np.asarray(xs, dtype=np.float64).reshape(-1)
        y = np.asarray(ys, dtype=np.float64).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(
                f"curve {title!r}, series {name!r}: x has {x.size} values but y has {y.size}"
            )
        data.append((name, x, y))
    finite = [(x[ok], y[ok]) for _, x, y in data if (ok := np.isfinite(x) & np.isfinite(y)).any()]
    if not finite:
        return ""
    all_x = np.concatenate([x for x, _ in finite])
    all_y = np.concatenate([y for _, y in finite])
    # x (epochs, steps) spans exactly the data; y widens to round numbers.
    x_lo, x_hi, x_ticks = _ticks(float(all_x.min()), float(all_x.max()), target=6, widen=False)
    y_lo, y_hi, y_ticks = _ticks(float(all_y.min()), float(all_y.max()))
    y_step = y_ticks[1] - y_ticks[0]
    left = _left_margin([_tick_label(t, y_step) for t in y_ticks], "")
    frame = _Frame(480, 280, left, 28, (x_lo, x_hi), (y_lo, y_hi))
    parts = _axes(frame, x_ticks, y_ticks)
    entries = []
    markers = sum(x.size for x, _ in finite) <= 60  # dots help only while they stay apart
    for i, (name, x, y) in enumerate(data):
        colour = PALETTE[i % len(PALETTE)]
        entries.append((name, colour))
        ok = np.isfinite(x) & np.isfinite(y)
        # A non-finite value (a diverged epoch) breaks the line rather than being skipped over.
        for segment in np.split(np.arange(x.size), np.flatnonzero(~ok)):
            idx = segment[ok[segment]]
            points = " ".join(f"{frame.x(x[j]):.1f},{frame.y(y[j]):.1f}" for j in idx)
            if idx.size > 1:
                parts.append(f'<polyline class="line" stroke="{colour}" points="{points}"/>')
            if idx.size == 1 or (markers and idx.size):
                parts.extend(
                    f'<circle cx="{frame.x(x[j]):.1f}" cy="{frame.y(y[j]):.1f}" r="2.5" '
                    f'fill="{colour}"/>'
                    for j in idx
                )
    return (
        f"<figure><h3>{esc(title)}</h3>{_svg(frame, title, parts)}"
        f"{_legend(entries, 'swatch-line')}</figure>"
    )


def scatter_chart(scatter: LatentScatter | tuple[Any, ...]) -> str:
    if not 1 <= len(scatter) <= 3:
        raise ValueError("expected (points [n, 2], labels [n] or None, axis_names)")
    spec = LatentScatter(*scatter)
    points = np.asarray(spec.points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape [n, 2]; got {points.shape}")
    labels = None if spec.labels is None else np.asarray(spec.labels).reshape(-1)
    if labels is not None and labels.shape[0] != points.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {points.shape[0]} points")
    if len(spec.axis_names) != 2:
        raise ValueError(f"axis_names must be two names; got {spec.axis_names!r}")
    keep = np.isfinite(points).all(axis=1)
    total = int(keep.sum())
    if total == 0:
        return ""
    index = np.flatnonzero(keep)
    if total > MAX_SCATTER_POINTS:  # evenly spaced, so class proportions survive
        index = index[np.linspace(0, total - 1, MAX_SCATTER_POINTS).round().astype(int)]
    # Drawing in a fixed random order keeps the last class from covering all the others.
    index = index[np.random.default_rng(0).permutation(index.size)]

    x_name, y_name = (str(n) for n in spec.axis_names)
    x_lo, x_hi, x_ticks = _ticks(float(points[index, 0].min()), float(points[index, 0].max()))
    y_lo, y_hi, y_ticks = _ticks(float(points[index, 1].min()), float(points[index, 1].max()))
    y_step = y_ticks[1] - y_ticks[0]
    left = _left_margin([_tick_label(t, y_step) for t in y_ticks], y_name)
    frame = _Frame(560, 440, left, 42, (x_lo, x_hi), (y_lo, y_hi))
    parts = _axes(frame, x_ticks, y_ticks, x_name, y_name)

    legend = ""
    if labels is None:
        colours = np.zeros(points.shape[0], dtype=int)
    else:
        classes, colours = np.unique(labels, return_inverse=True)
        colours = colours.reshape(-1) % len(PALETTE)
        legend = _legend(
            [(str(c), PALETTE[i % len(PALETTE)]) for i, c in enumerate(classes)], "swatch-dot"
        )
    parts.append('<g class="points">')
    parts.extend(
        f'<circle class="c{colours[i]}" cx="{frame.x(points[i, 0]):.1f}" '
        f'cy="{frame.y(points[i, 1]):.1f}" r="2.2"/>'
        for i in index
    )
    parts.append("</g>")
    shown = f"{index.size} of {points.shape[0]}" if index.size < points.shape[0] else f"{total}"
    caption = f"{shown} points"
    if labels is not None:
        caption += ", coloured by label"
        if len(np.unique(labels)) > len(PALETTE):
            caption += f" (colours repeat after {len(PALETTE)} labels)"
    return (
        f"<figure>{_svg(frame, 'latent scatter', parts)}{legend}"
        f'<p class="caption">{esc(caption)}.</p></figure>'
    )


def kl_bar_chart(values: Sequence[float], sort: bool, threshold: float | None) -> str:
    kl = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(kl)):
        raise ValueError("KL values must be finite")
    order = np.argsort(-kl, kind="stable") if sort else np.arange(kl.size)
    top = max(float(kl.max()), threshold or 0.0)
    y_lo, y_hi, y_ticks = _ticks(min(0.0, float(kl.min())), top if top > 0 else 1.0)
    y_step = y_ticks[1] - y_ticks[0]
    left = _left_margin([_tick_label(t, y_step) for t in y_ticks], "KL (nats)")
    frame = _Frame(560, 260, left, 42, (0.0, float(kl.size)), (y_lo, y_hi))
    parts = _axes(
        frame, None, y_ticks, "latent dimension" + (", sorted" if sort else ""), "KL (nats)"
    )
    slot = frame.x(1.0) - frame.x(0.0)
    # Label every bar while the numbers fit, else every k-th position.
    every = 1 if slot >= 14 else math.ceil(14 / slot)
    zero = frame.y(0.0)
    for position, dim in enumerate(order):
        value = float(kl[dim])
        active = threshold is None or value > threshold
        x = frame.x(position) + 0.1 * slot
        y = min(frame.y(value), zero)
        bar_height = abs(frame.y(value) - zero)
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{0.8 * slot:.1f}" height="{bar_height:.1f}" '
            f'fill="{PALETTE[0] if active else INACTIVE}">'
            f"<title>z{dim}: {format_number(value)} nats</title></rect>"
        )
        if position % every == 0 and (not sort or every == 1):
            parts.append(
                f'<text x="{x + 0.4 * slot:.1f}" y="{frame.y(y_lo) + 15:.1f}" '
                f'text-anchor="middle">{dim}</text>'
            )
    caption = f"{kl.size} dimensions, {format_number(float(kl.sum()))} nats in total"
    if threshold is not None:
        ty = frame.y(threshold)
        x0, x1 = frame.x(0.0), frame.x(float(kl.size))
        parts.append(
            f'<line class="threshold" x1="{x0:.1f}" y1="{ty:.1f}" x2="{x1:.1f}" y2="{ty:.1f}"/>'
        )
        parts.append(
            f'<text class="threshold-label" x="{x1:.1f}" y="{ty - 4:.1f}" text-anchor="end">'
            f"threshold {esc(format_number(threshold))}</text>"
        )
        active_count = int((kl > threshold).sum())
        caption += f"; {active_count} of {kl.size} above the threshold (active)"
    return (
        f"<figure>{_svg(frame, 'KL per latent dimension', parts)}"
        f'<p class="caption">{esc(caption)}.</p></figure>'
    )
