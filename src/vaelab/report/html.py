"""The self-contained HTML report: one file, no external resources.

Charts are inline SVG and pictures are base64 PNG data URIs, so the file can be mailed, archived
or opened offline and shows the same thing everywhere. The one piece of JavaScript is the latent
explorer's (``vaelab.report.explorer_html``), inline, reading only what the page holds; a report
without an explorer has no script at all. Every section is optional: fill in the
fields of a `ReportContent` you have, and `write_report` leaves out the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vaelab.io.files import atomic_write_bytes
from vaelab.io.images import image_grid, png_data_uri
from vaelab.report.explorer import LatentExplorer
from vaelab.report.explorer_html import EXPLORER_CSS, render_explorer
from vaelab.report.svg import (
    PALETTE,
    Curve,
    LatentScatter,
    curve_charts,
    kl_bar_chart,
    scatter_chart,
)
from vaelab.report.text import esc, format_number

__all__ = [
    "LatentScatter",
    "Metric",
    "ReportContent",
    "format_number",
    "render_report",
    "write_report",
]


IMAGE_WIDTH = 720  # target display width of pictures, in CSS pixels
MAX_UPSCALE = 8  # integer nearest-neighbour factor, so an 8 x 8 digit becomes 64 x 64
RECONSTRUCTIONS_PER_ROW = 10
PAD_VALUE = 1.0  # white gaps between pictures, the colour of the page around them


class Metric(NamedTuple):
    """One row of the metrics table, e.g. ``Metric("ELBO", -98.3, "nats/example, test")``;
    ``value=None`` shows a dash: a quantity that is not defined here, the note saying why."""

    name: str
    value: float | None
    note: str = ""


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
        explorer: `vaelab.report.explorer.LatentExplorer`, the interactive latent map,
            decodings under the pointer, nearest examples and traversals.
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
    explorer: LatentExplorer | None = None
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
                body += f'<p class="caption">{esc(caption)}</p>'
            sections.append((key, heading, body))

    if content.config:
        add("config", "Configuration", _config_table, content.config)
    if content.metrics:
        add("metrics", "Metrics", _metrics_table, content.metrics)
    if content.curves:
        add("curves", "Training curves", curve_charts, content.curves)
    if content.samples is not None:
        add("samples", "Samples", _samples, content.samples, content.sample_rows)
    if content.reconstructions is not None:
        add("reconstructions", "Reconstructions", _reconstructions, content.reconstructions)
    if content.manifold is not None:
        add("manifold", "Latent manifold", _tiled, content.manifold, 0, "latent manifold")
    if content.interpolations is not None:
        add("interpolations", "Interpolations", _tiled, content.interpolations, 1, "interpolation")
    if content.latent_scatter is not None:
        add("latent_scatter", "Latent space", scatter_chart, content.latent_scatter)
    if content.explorer is not None:
        add("explorer", "Latent explorer", render_explorer, content.explorer)
    if content.kl_per_dimension is not None and len(content.kl_per_dimension) > 0:
        add(
            "kl_per_dimension",
            "KL per latent dimension",
            kl_bar_chart,
            content.kl_per_dimension,
            content.kl_sorted,
            content.active_threshold,
        )
    if content.notes:
        add("notes", "Notes", _notes, content.notes)

    title = esc(content.title)
    subtitle = f'<p class="subtitle">{esc(content.subtitle)}</p>' if content.subtitle else ""
    nav = " ".join(f'<a href="#{key}">{esc(heading)}</a>' for key, heading, _ in sections)
    blocks = [
        f'<section id="{key}">\n<h2>{esc(heading)}</h2>\n{html_}\n</section>'
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
        f"<tr><th>{esc(name)}</th><td>{esc(_config_value(value))}</td></tr>"
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
            f"<tr><th>{esc(metric.name)}</th>"
            f'<td class="num">{esc(value)}</td>'
            f'<td class="note">{esc(metric.note)}</td></tr>'
        )
    return f'<table class="metrics">{"".join(rows)}</table>'


def _notes(notes: Sequence[str]) -> str:
    return "\n".join(f"<p>{esc(note)}</p>" for note in notes)


def _img(pixels: np.ndarray, alt: str) -> str:
    """``<img>`` for a uint8 picture ``[H, W(, 3)]``, enlarged by an integer factor."""
    height, width = pixels.shape[:2]
    scale = max(1, min(MAX_UPSCALE, IMAGE_WIDTH // width))
    return (
        f'<img class="px" src="{png_data_uri(pixels)}" width="{width * scale}" '
        f'height="{height * scale}" alt="{esc(alt)}">'
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
                f"<tr><th>{esc(name)}</th><td>{_img(pixels, f'samples of {name}')}</td></tr>"
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


_CSS = (
    """
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
"""
    + EXPLORER_CSS
    + "".join(f".c{i} {{ fill: {colour}; }}\n" for i, colour in enumerate(PALETTE))
)
