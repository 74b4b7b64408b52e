"""The self-contained HTML report: one file, no external resources, no JavaScript.

Charts are inline SVG and pictures are base64 PNG data URIs, so the file can be mailed, archived
or opened offline and shows the same thing everywhere. Every section is optional: fill in the
fields of a `ReportContent` you have, and `write_report` leaves out the rest.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, SupportsFloat

import numpy as np

from vaelab.io.files import atomic_write_bytes
from vaelab.io.images import image_grid, png_data_uri

__all__ = [
    "LatentScatter",
    "Metric",
    "ReportContent",
    "format_number",
    "render_report",
    "write_report",
]

# Tableau 10: distinguishable, colour-blind-aware, and ten of them for ten digit classes.
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
INACTIVE = "#c5cad3"
MAX_SCATTER_POINTS = 5000  # beyond this an SVG scatter weighs megabytes and shows no more
IMAGE_WIDTH = 720  # target display width of pictures, in CSS pixels
MAX_UPSCALE = 8  # integer nearest-neighbour factor, so an 8 x 8 digit becomes 64 x 64
RECONSTRUCTIONS_PER_ROW = 10
PAD_VALUE = 1.0  # white gaps between pictures, the colour of the page around them

Curve = tuple[Sequence[float], Sequence[float]]


class Metric(NamedTuple):
    """One row of the metrics table, e.g. ``Metric("ELBO", -98.3, "nats/example, test")``;
    ``value=None`` shows a dash: a quantity that is not defined here, the note saying why."""

    name: str
    value: float | None
    note: str = ""


class LatentScatter(NamedTuple):
    """Latent codes for a 2-D scatter plot.

    ``points: [n, 2]``; ``labels: [n]`` (ints or strings, coloured by class) or None;
    ``axis_names`` such as ``("z1", "z2")`` or ``("PC1", "PC2")``.
    """

    points: Any
    labels: Any = None
    axis_names: tuple[str, str] = ("z1", "z2")


@dataclass
class ReportContent:
    """What the report shows; every field may be left empty and its section is then left out.

    Images are float arrays in ``[0, 1]``, channels first; ``C`` is 1 or 3 and may be left out.

    Attributes:
        title: page title and heading.
        subtitle: one line under the title, e.g. the model in words.
        config: model description / configuration, a table; nested mappings become dotted keys.
        metrics: rows ``(name, value, note)``, e.g. ``("active units", 12, "of 50")``.
        curves: chart title -> series name -> ``(x, y)``, e.g.
            ``{"ELBO per epoch": {"train": (epochs, elbo), "valid": (epochs, elbo_valid)}}``.
        samples: ``[n, C, H, W]``, shown as a grid; or ``[rows, n, C, H, W]``, a row of samples
            per class of a conditional model, each row headed by its name in ``sample_rows``.
        sample_rows: the names of the rows of ``samples`` (a conditional model's classes).
        reconstructions: ``(data [n, C, H, W], reconstructions [n, C, H, W])``, shown in pairs
            of rows.
        manifold: ``[rows, cols, C, H, W]``, decoded images on a 2-D latent grid (Kingma &
            Welling 2014, fig. 4), tiled without gaps into one picture.
        interpolations: ``[rows, steps, C, H, W]``, one interpolation per row.
        latent_scatter: `LatentScatter` or a tuple ``(points [n, 2], labels [n] | None,
            axis_names)``.
        kl_per_dimension: ``[latent]`` KL(q(z_j|x) || p(z_j)) averaged over data, in nats.
        kl_sorted: draw the KL bars largest first instead of in index order.
        active_threshold: KL level (nats) drawn as a dashed line; bars above it count as active.
        notes: free text, one paragraph each.
        captions: section name (a field name above) -> caption under that section's figure.
    """

    title: str = "vaelab report"
    subtitle: str | None = None
    config: Mapping[str, Any] | None = None
    metrics: Sequence[Metric | tuple[Any, ...]] = ()
    curves: Mapping[str, Mapping[str, Curve]] = field(default_factory=dict)
    samples: Any = None
    sample_rows: Sequence[str] | None = None
    reconstructions: tuple[Any, Any] | None = None
    manifold: Any = None
    interpolations: Any = None
    latent_scatter: LatentScatter | tuple[Any, ...] | None = None
    kl_per_dimension: Sequence[float] | None = None
    kl_sorted: bool = False
    active_threshold: float | None = None
    notes: Sequence[str] = ()
    captions: Mapping[str, str] = field(default_factory=dict)


def write_report(path: str | os.PathLike[str], content: ReportContent) -> Path:
    """Render ``content`` and write it to ``path`` atomically (temporary file, then rename)."""
    return atomic_write_bytes(path, render_report(content).encode("utf-8"))


def render_report(content: ReportContent) -> str:
    """The report as one HTML document (a string)."""
    sections: list[tuple[str, str, str]] = []  # (id, heading, body html)

    def add(key: str, heading: str, render: Callable[..., str], *args: Any) -> None:
        try:
            body = render(*args)
        except ValueError as error:
            raise ValueError(f"ReportContent.{key}: {error}") from None
        if body:
            caption = content.captions.get(key)
            if caption:
                body += f'<p class="caption">{_esc(caption)}</p>'
            sections.append((key, heading, body))

    if content.config:
        add("config", "Configuration", _config_table, content.config)
    if content.metrics:
        add("metrics", "Metrics", _metrics_table, content.metrics)
    if content.curves:
        add("curves", "Training curves", _curves, content.curves)
    if content.samples is not None:
        add("samples", "Samples", _samples, content.samples, content.sample_rows)
    if content.reconstructions is not None:
        add("reconstructions", "Reconstructions", _reconstructions, content.reconstructions)
    if content.manifold is not None:
        add("manifold", "Latent manifold", _tiled, content.manifold, 0, "latent manifold")
    if content.interpolations is not None:
        add("interpolations", "Interpolations", _tiled, content.interpolations, 1, "interpolation")
    if content.latent_scatter is not None:
        add("latent_scatter", "Latent space", _scatter, content.latent_scatter)
    if content.kl_per_dimension is not None and len(content.kl_per_dimension) > 0:
        add(
            "kl_per_dimension",
            "KL per latent dimension",
            _kl_bars,
            content.kl_per_dimension,
            content.kl_sorted,
            content.active_threshold,
        )
    if content.notes:
        add("notes", "Notes", _notes, content.notes)

    title = _esc(content.title)
    subtitle = f'<p class="subtitle">{_esc(content.subtitle)}</p>' if content.subtitle else ""
    nav = " ".join(f'<a href="#{key}">{_esc(heading)}</a>' for key, heading, _ in sections)
    blocks = [
        f'<section id="{key}">\n<h2>{_esc(heading)}</h2>\n{html_}\n</section>'
        for key, heading, html_ in sections
    ]
    if [key for key, _, _ in sections[:2]] == ["config", "metrics"]:  # two short tables share a row
        blocks[:2] = ['<div class="cards">\n' + "\n".join(blocks[:2]) + "\n</div>"]
    body = "\n".join(blocks)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # An empty inline icon stops the browser from asking for /favicon.ico.
        '<link rel="icon" href="data:,">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<header>\n<h1>{title}</h1>\n{subtitle}\n"
        + (f"<nav>{nav}</nav>\n" if len(sections) > 1 else "")
        + f"</header>\n{body}\n"
        "<footer>Generated by vaelab.</footer>\n</main>\n</body>\n</html>\n"
    )


def format_number(value: SupportsFloat, trim: bool = True) -> str:
    """Format a metric for people: integers as integers, floats to about four significant digits.

    Floats keep a decimal point and drop trailing zeros (``-98.3123 -> "-98.31"``,
    ``0.01 -> "0.01"``, ``2.0 -> "2.0"``) unless ``trim`` is false, which keeps a column of
    measurements at one precision (``-23.1996 -> "-23.20"`` beside ``-23.44``); very large or
    small magnitudes use scientific notation (``3.2e-6``); ``nan``, ``inf`` and ``-inf`` are
    spelled out.
    """
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | np.integer):
        return str(int(value))
    v = float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    magnitude = abs(v)
    if magnitude == 0:
        return "0"
    if magnitude >= 1e6 or magnitude < 1e-3:
        mantissa, exponent = f"{v:.3e}".split("e")
        return f"{_trim_zeros(mantissa)}e{int(exponent)}"
    decimals = max(2, 3 - math.floor(math.log10(magnitude)))
    number = f"{v:.{decimals}f}"
    return _trim_zeros(number) if trim else number


def _trim_zeros(number: str) -> str:
    """``"2.1500" -> "2.15"``, ``"1.000" -> "1.0"``: four significant digits without the noise."""
    trimmed = number.rstrip("0")
    return trimmed + "0" if trimmed.endswith(".") else trimmed


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


# ---- tables and text ------------------------------------------------------------------------


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, prefix=f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _config_value(value: Any) -> str:
    # Settings are shown exactly as given (1e-3 stays 0.001), unlike measured metrics.
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, list | tuple):
        return ", ".join(_config_value(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def _config_table(config: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_esc(name)}</th><td>{_esc(_config_value(value))}</td></tr>"
        for name, value in _flatten(config)
    )
    return f'<table class="kv">{rows}</table>'


def _metrics_table(metrics: Sequence[Metric | tuple[Any, ...]]) -> str:
    rows = []
    for row in metrics:
        if not 2 <= len(row) <= 3:
            raise ValueError(f"each metric is (name, value) or (name, value, note); got {row!r}")
        metric = Metric(*row)
        value = "—" if metric.value is None else format_number(metric.value, trim=False)
        rows.append(
            f"<tr><th>{_esc(metric.name)}</th>"
            f'<td class="num">{_esc(value)}</td>'
            f'<td class="note">{_esc(metric.note)}</td></tr>'
        )
    return f'<table class="metrics">{"".join(rows)}</table>'


def _notes(notes: Sequence[str]) -> str:
    return "\n".join(f"<p>{_esc(note)}</p>" for note in notes)


# ---- pictures -------------------------------------------------------------------------------


def _img(pixels: np.ndarray, alt: str) -> str:
    """``<img>`` for a uint8 picture ``[H, W(, 3)]``, enlarged by an integer factor."""
    height, width = pixels.shape[:2]
    scale = max(1, min(MAX_UPSCALE, IMAGE_WIDTH // width))
    return (
        f'<img class="px" src="{png_data_uri(pixels)}" width="{width * scale}" '
        f'height="{height * scale}" alt="{_esc(alt)}">'
    )


def _as_batch(images: Any, what: str) -> np.ndarray:
    """``[n, C, H, W]`` or ``[n, H, W]`` as ``[n, C, H, W]``."""
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"{what} must have shape [n, C, H, W] or [n, H, W]; got {arr.shape}")
    return arr


def _samples(samples: Any, names: Sequence[str] | None = None) -> str:
    arr = np.asarray(samples, dtype=np.float64)
    if arr.ndim == 5:  # a row per class
        names = [str(i) for i in range(len(arr))] if names is None else list(names)
        if len(names) != len(arr):
            raise ValueError(f"{len(arr)} rows of samples but {len(names)} row names")
        rows = []
        for name, row in zip(names, arr, strict=True):
            pixels = image_grid(_as_batch(row, "samples"), ncol=len(row), pad_value=PAD_VALUE)
            rows.append(
                f"<tr><th>{_esc(name)}</th><td>{_img(pixels, f'samples of {name}')}</td></tr>"
            )
        return f'<table class="pairs">{"".join(rows)}</table>'
    batch = _as_batch(samples, "samples")
    pixels = image_grid(batch, pad_value=PAD_VALUE)
    return f"<figure>{_img(pixels, f'{len(batch)} samples')}</figure>"


def _tiled(grid: Any, pad: int, what: str) -> str:
    """``[rows, cols, C, H, W]`` or ``[rows, cols, H, W]`` tiled as one picture."""
    arr = np.asarray(grid, dtype=np.float64)
    if arr.ndim not in (4, 5):
        raise ValueError(
            f"expected shape [rows, cols, C, H, W] or [rows, cols, H, W]; got {arr.shape}"
        )
    rows, cols = arr.shape[:2]
    pixels = image_grid(
        arr.reshape(rows * cols, *arr.shape[2:]), ncol=cols, pad=pad, pad_value=PAD_VALUE
    )
    return f"<figure>{_img(pixels, f'{what}, {rows} x {cols} images')}</figure>"


def _reconstructions(pair: tuple[Any, Any]) -> str:
    if len(pair) != 2:
        raise ValueError("expected a pair (data [n, C, H, W], reconstructions [n, C, H, W])")
    data = _as_batch(pair[0], "data")
    recon = _as_batch(pair[1], "reconstructions")
    if data.shape != recon.shape:
        raise ValueError(
            f"data and reconstructions must have the same shape; got {data.shape} and {recon.shape}"
        )
    ncol = min(len(data), RECONSTRUCTIONS_PER_ROW)
    rows = []
    for start in range(0, len(data), ncol):
        for label, batch in (("data", data), ("reconstruction", recon)):
            pixels = image_grid(batch[start : start + ncol], ncol=ncol, pad_value=PAD_VALUE)
            rows.append(
                f"<tr><th>{label}</th><td>{_img(pixels, f'{label}, examples {start}+')}</td></tr>"
            )
    return f'<table class="pairs">{"".join(rows)}</table>'


# ---- SVG charts -----------------------------------------------------------------------------


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
        f'style="max-width:{frame.width}px" role="img" aria-label="{_esc(label)}">'
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
            f'text-anchor="middle">{_esc(x_title)}</text>'
        )
    if y_title:
        cy = (y0 + y1) / 2
        parts.append(
            f'<text class="title" x="14" y="{cy:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {cy:.1f})">{_esc(y_title)}</text>'
        )
    return parts


def _legend(entries: Sequence[tuple[str, str]], kind: str) -> str:
    items = "".join(
        f'<li><span class="{kind}" style="background:{colour}"></span>{_esc(name)}</li>'
        for name, colour in entries
    )
    return f'<ul class="legend">{items}</ul>'


def _curves(curves: Mapping[str, Mapping[str, Curve]]) -> str:
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
        f"<figure><h3>{_esc(title)}</h3>{_svg(frame, title, parts)}"
        f"{_legend(entries, 'swatch-line')}</figure>"
    )


def _scatter(scatter: LatentScatter | tuple[Any, ...]) -> str:
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
        f'<p class="caption">{_esc(caption)}.</p></figure>'
    )


def _kl_bars(values: Sequence[float], sort: bool, threshold: float | None) -> str:
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
            f"threshold {_esc(format_number(threshold))}</text>"
        )
        active_count = int((kl > threshold).sum())
        caption += f"; {active_count} of {kl.size} above the threshold (active)"
    return (
        f"<figure>{_svg(frame, 'KL per latent dimension', parts)}"
        f'<p class="caption">{_esc(caption)}.</p></figure>'
    )


_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --rule: #e3e6ec; --bg: #f5f6f8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); font: 15px/1.5 system-ui,
  -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1000px; margin: 0 auto; padding: 28px 20px 40px; }
header h1 { font-size: 1.75rem; line-height: 1.2; margin: 0 0 4px; }
.subtitle { color: var(--muted); margin: 0; }
nav { margin-top: 12px; font-size: .85rem; display: flex; flex-wrap: wrap; gap: 4px 14px; }
nav a { color: #4e79a7; text-decoration: none; }
nav a:hover { text-decoration: underline; }
section { background: #fff; border: 1px solid var(--rule); border-radius: 8px;
  padding: 18px 22px; margin: 18px 0; overflow-x: auto; }
h2 { font-size: 1.15rem; margin: 0 0 12px; }
h3 { font-size: .9rem; font-weight: 600; color: var(--muted); margin: 0 0 6px; }
table { border-collapse: collapse; }
th, td { text-align: left; vertical-align: middle; padding: 5px 16px 5px 0;
  border-bottom: 1px solid var(--rule); }
tr:last-child > th, tr:last-child > td { border-bottom: 0; }
th { font-weight: 600; }
table.kv th { font-weight: 500; color: var(--muted); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.note, .caption, footer { color: var(--muted); font-size: .875rem; }
table.pairs th { color: var(--muted); font-weight: 500; font-size: .85rem; }
table.pairs td, table.pairs th { border: 0; padding: 2px 12px 2px 0; }
figure { margin: 0; min-width: 0; }
.caption { margin: 8px 0 0; }
.charts { display: grid; gap: 18px 28px;
  grid-template-columns: repeat(auto-fit, minmax(min(400px, 100%), 1fr)); }
img.px { display: block; max-width: 100%; height: auto; image-rendering: pixelated; }
svg { display: block; width: 100%; height: auto; }
svg text { font-size: 12px; fill: var(--muted); }
svg text.title { font-size: 13px; fill: var(--fg); }
svg .grid { stroke: #eceef2; }
svg .axis, svg .tick { stroke: #9aa1ad; }
svg .line { fill: none; stroke-width: 2; stroke-linejoin: round; stroke-linecap: round; }
svg .points circle { fill-opacity: .75; }
svg .threshold { stroke: #e15759; stroke-width: 1.5; stroke-dasharray: 5 4; }
svg text.threshold-label { fill: #e15759; }
.legend { list-style: none; margin: 6px 0 0; padding: 0; display: flex; flex-wrap: wrap;
  gap: 2px 16px; font-size: .85rem; }
.legend span { display: inline-block; margin-right: 6px; vertical-align: middle; }
.swatch-line { width: 16px; height: 3px; border-radius: 2px; }
.swatch-dot { width: 10px; height: 10px; border-radius: 50%; }
footer { margin-top: 24px; }
.cards { display: flex; flex-wrap: wrap; gap: 0 18px; }
.cards > section { flex: 1 1 300px; min-width: 0; }
.cards > section#metrics { flex: 2 1 420px; }
""" + "".join(f".c{i} {{ fill: {colour}; }}\n" for i, colour in enumerate(PALETTE))
