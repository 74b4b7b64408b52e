"""The latent explorer as a section of the report: a canvas map, sliders and a small inline script.

Everything it shows was decoded ahead of time (`vaelab.report.explorer.LatentExplorer`) and travels
in the page: each grid of decodings, the traversals and the examples' thumbnails as one PNG sprite
sheet apiece (hidden ``<img>`` data URIs), the coordinates and neighbour lists as JSON in a
``<script type="application/json">`` block (read with ``JSON.parse``, never evaluated). The script
cuts the tile it needs out of a sheet with a canvas and shows it in an ``<img>``; it fetches
nothing, so the page works opened from disk and offline.

Fixed element ids, for tests and for people's own scripts: ``latent-map`` (the canvas) drives
``latent-decoded`` (the image under the pointer); ``latent-class`` chooses the class of a
conditional model; ``latent-neighbours`` holds the nearest examples' images; ``latent-slider-j``
and ``latent-traversal-j`` are the j-th unit's slider and image.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from vaelab.io.images import image_grid, png_data_uri
from vaelab.report.explorer import LatentExplorer
from vaelab.report.svg import PALETTE
from vaelab.report.text import esc, format_number

MAP_SIZE = 360  # CSS pixels of the square map
DECODED_SIZE = 168  # CSS pixels of the decoded picture
THUMB_SIZE = 56
SPRITE_COLUMNS = 20  # thumbnails per row of their sheet


def _sheet(images: np.ndarray, ncol: int) -> str:
    """``[n, C, H, W]`` tiled without gaps, ``ncol`` a row, as a PNG data URI."""
    return png_data_uri(image_grid(images, ncol=ncol, pad=0))


def _tile(image: np.ndarray) -> str:
    return png_data_uri(image_grid(image[None], ncol=1, pad=0))


def _round(values: np.ndarray, digits: int = 4) -> list[Any]:
    rounded: list[Any] = np.round(np.asarray(values, dtype=np.float64), digits).tolist()
    return rounded


def _json(data: dict[str, Any]) -> str:
    """JSON safe inside ``<script>``: no ``<`` (so no ``</script>``), no ``&``."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _scale(height: int, width: int, target: int) -> tuple[int, int]:
    factor = max(1, target // max(height, width))
    return height * factor, width * factor


def render_explorer(explorer: LatentExplorer) -> str:
    """The explorer section's body (HTML with its script)."""
    grid = np.asarray(explorer.grid, dtype=np.float64)
    if grid.ndim != 6:
        raise ValueError(f"grid must have shape [classes, steps, steps, C, H, W]; got {grid.shape}")
    classes, steps = grid.shape[0], explorer.steps
    if grid.shape[1:3] != (steps, steps):
        raise ValueError(f"grid is {grid.shape[1]} x {grid.shape[2]} but steps is {steps}")
    channels, height, width = grid.shape[3:]
    thumbs = np.asarray(explorer.thumbnails, dtype=np.float64)
    traversals = np.asarray(explorer.traversals, dtype=np.float64)
    n_starts, n_units, n_values = traversals.shape[:3]
    k = explorer.neighbours.shape[-1]
    centre = (steps // 2) * steps + steps // 2
    first = explorer.neighbours.reshape(steps * steps, k)[centre]
    names = explorer.classes or []

    sheets = [
        f'<img id="latent-grid-{c}" src="{_sheet(grid[c].reshape(-1, channels, height, width), steps)}" '
        f'alt="decodings on the map grid{"" if not names else ", " + esc(names[c])}">'
        for c in range(classes)
    ]
    sheets.append(
        f'<img id="latent-thumbnails" src="{_sheet(thumbs, SPRITE_COLUMNS)}" alt="examples">'
    )
    sheets.append(
        f'<img id="latent-traversals" '
        f'src="{_sheet(traversals.reshape(-1, channels, height, width), n_values)}" '
        f'alt="traversals">'
    )
    data = {
        "steps": steps,
        "extent": list(explorer.extent),
        "axes": list(explorer.axes),
        "tile": [width, height],
        "classes": classes,
        "points": _round(explorer.points),
        "labels": None if explorer.labels is None else np.asarray(explorer.labels).tolist(),
        "palette": list(PALETTE),
        "neighbours": np.asarray(explorer.neighbours).reshape(-1).tolist(),
        "k": k,
        "thumbColumns": SPRITE_COLUMNS,
        "starts": np.asarray(explorer.starts).tolist(),
        "units": n_units,
        "values": n_values,
        "offsets": _round(explorer.offsets, 3),
    }
    decoded_h, decoded_w = _scale(height, width, DECODED_SIZE)
    thumb_h, thumb_w = _scale(height, width, THUMB_SIZE)
    selector = ""
    if names:
        options = "".join(
            f'<option value="{c}">{esc(name)}</option>' for c, name in enumerate(names)
        )
        selector = f'<label class="explorer-class">class <select id="latent-class">{options}</select></label>'
    neighbour_imgs = "".join(
        f'<img class="px" src="{_tile(thumbs[i])}" width="{thumb_w}" height="{thumb_h}" '
        f'alt="nearest example {rank + 1}">'
        for rank, i in enumerate(first)
    )
    start_buttons = "".join(
        f'<button type="button" class="explorer-start" data-start="{s}" '
        f'aria-pressed="{"true" if s == 0 else "false"}">'
        f'<img class="px" src="{_tile(thumbs[explorer.starts[s]])}" width="{thumb_w}" '
        f'height="{thumb_h}" alt="start from example {s + 1}"></button>'
        for s in range(n_starts)
    )
    middle = n_values // 2
    rows = "".join(
        f'<div class="explorer-unit"><label for="latent-slider-{j}">z{int(unit) + 1}'
        f' <span class="note">Var {esc(format_number(float(act)))}</span></label>'
        f'<input type="range" id="latent-slider-{j}" data-unit="{j}" min="0" max="{n_values - 1}" '
        f'step="1" value="{middle}">'
        f'<img class="px" id="latent-traversal-{j}" src="{_tile(traversals[0, j, middle])}" '
        f'width="{thumb_w}" height="{thumb_h}" alt="z{int(unit) + 1} moved">'
        f'<output id="latent-offset-{j}">{explorer.offsets[middle]:+.1f} sd</output></div>'
        for j, (unit, act) in enumerate(zip(explorer.units, explorer.activity, strict=True))
    )
    legend = ""
    if explorer.labels is not None and explorer.label_names:
        legend = (
            '<ul class="legend">'
            + "".join(
                f'<li><span class="swatch-dot" style="background:{PALETTE[i % len(PALETTE)]}"></span>'
                f"{esc(name)}</li>"
                for i, name in enumerate(explorer.label_names)
            )
            + "</ul>"
        )
    axes = f"{esc(explorer.axes[0])} across, {esc(explorer.axes[1])} up"
    described = f" of {esc(explorer.examples_described)}" if explorer.examples_described else ""
    return f"""<div class="explorer">
<div class="explorer-map">
<canvas id="latent-map" width="{MAP_SIZE}" height="{MAP_SIZE}" tabindex="0"
 aria-label="latent map: move the pointer, or focus it and use the arrow keys"></canvas>
{legend}
<p class="caption">{len(explorer.points)} examples{described} at their posterior means, {axes};
the pointer decodes the {steps} × {steps} grid point under it.</p>
</div>
<div class="explorer-side">
{selector}
<img class="px" id="latent-decoded" src="{_tile(grid[0].reshape(-1, channels, height, width)[centre])}"
 width="{decoded_w}" height="{decoded_h}" alt="decoder mean at the pointer">
<output id="latent-position"></output>
<h3>Nearest examples</h3>
<div id="latent-neighbours">{neighbour_imgs}</div>
</div>
</div>
<h3>Traversals</h3>
<p class="caption">Start from an example, then move one of the {n_units} most active units
(largest variance of E_q[z_u] over the examples) in standard deviations of E_q[z_u]; the
others stay at the example's code{"; each is decoded given its example's own class" if names else ""}.</p>
<div class="explorer-starts">{start_buttons}</div>
<div class="explorer-units">{rows}</div>
<div class="explorer-sheets" hidden>{"".join(sheets)}</div>
<script type="application/json" id="latent-data">{_json(data)}</script>
<script>{EXPLORER_JS}</script>"""


# No framework, no eval: the data block is read with JSON.parse; tiles are cut from the sheets
# with a canvas (their data URIs are same-origin, so toDataURL is allowed) and cached.
EXPLORER_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("latent-data").textContent);
  var map = document.getElementById("latent-map");
  var decoded = document.getElementById("latent-decoded");
  var position = document.getElementById("latent-position");
  var neighbours = document.getElementById("latent-neighbours").getElementsByTagName("img");
  var chooser = document.getElementById("latent-class");
  var sliders = document.querySelectorAll("input[id^='latent-slider-']");
  var startButtons = document.querySelectorAll(".explorer-start");
  var cutter = document.createElement("canvas");
  var cache = {};
  var state = { row: Math.floor(data.steps / 2), col: Math.floor(data.steps / 2), cls: 0, start: 0 };
  var tw = data.tile[0], th = data.tile[1];
  cutter.width = tw;
  cutter.height = th;

  function tile(sheetId, columns, index) {
    var key = sheetId + ":" + index;
    if (!(key in cache)) {
      var sheet = document.getElementById(sheetId);
      var context = cutter.getContext("2d");
      context.clearRect(0, 0, tw, th);
      context.drawImage(sheet, (index % columns) * tw, Math.floor(index / columns) * th,
                        tw, th, 0, 0, tw, th);
      cache[key] = cutter.toDataURL("image/png");
    }
    return cache[key];
  }

  function show(img, url) {
    if (img.getAttribute("src") !== url) { img.setAttribute("src", url); }
  }

  function toMap(a, b) {
    var e = data.extent;
    return [(a - e[0]) / (e[1] - e[0]) * map.width, (e[3] - b) / (e[3] - e[2]) * map.height];
  }

  function drawMap() {
    var context = map.getContext("2d");
    var cell = map.width / data.steps;
    context.fillStyle = "#ffffff";
    context.fillRect(0, 0, map.width, map.height);
    context.strokeStyle = "#e3e6ec";
    context.strokeRect(0.5, 0.5, map.width - 1, map.height - 1);
    for (var i = 0; i < data.points.length; i++) {
      var p = toMap(data.points[i][0], data.points[i][1]);
      var label = data.labels === null ? 0 : data.labels[i];
      context.fillStyle = data.palette[label % data.palette.length];
      context.globalAlpha = 0.7;
      context.beginPath();
      context.arc(p[0], p[1], 3, 0, 2 * Math.PI);
      context.fill();
    }
    context.globalAlpha = 1;
    var first = (state.row * data.steps + state.col) * data.k;
    context.strokeStyle = "#1d2330";
    context.lineWidth = 1.5;
    for (var j = 0; j < data.k; j++) {
      var q = data.points[data.neighbours[first + j]];
      var r = toMap(q[0], q[1]);
      context.beginPath();
      context.arc(r[0], r[1], 5, 0, 2 * Math.PI);
      context.stroke();
    }
    context.strokeRect(state.col * cell, state.row * cell, cell, cell);
  }

  function update() {
    var index = state.row * data.steps + state.col;
    show(decoded, tile("latent-grid-" + state.cls, data.steps, index));
    var e = data.extent;
    var a = e[0] + (state.col + 0.5) / data.steps * (e[1] - e[0]);
    var b = e[3] - (state.row + 0.5) / data.steps * (e[3] - e[2]);
    position.textContent = data.axes[0] + " = " + a.toFixed(2) + ", " + data.axes[1] + " = " + b.toFixed(2);
    for (var j = 0; j < neighbours.length; j++) {
      show(neighbours[j], tile("latent-thumbnails", data.thumbColumns,
                               data.neighbours[index * data.k + j]));
    }
    drawMap();
  }

  function moveTo(row, col) {
    row = Math.max(0, Math.min(data.steps - 1, row));
    col = Math.max(0, Math.min(data.steps - 1, col));
    if (row !== state.row || col !== state.col) {
      state.row = row;
      state.col = col;
      update();
    }
  }

  function traverse(slider) {
    var unit = Number(slider.getAttribute("data-unit"));
    var value = Number(slider.value);
    var index = (state.start * data.units + unit) * data.values + value;
    show(document.getElementById("latent-traversal-" + unit),
         tile("latent-traversals", data.values, index));
    var offset = data.offsets[value];
    document.getElementById("latent-offset-" + unit).textContent =
      (offset >= 0 ? "+" : "") + offset.toFixed(1) + " sd";
  }

  function start() {
    map.addEventListener("pointermove", function (event) {
      var box = map.getBoundingClientRect();
      var col = Math.floor((event.clientX - box.left) / box.width * data.steps);
      var row = Math.floor((event.clientY - box.top) / box.height * data.steps);
      moveTo(row, col);
    });
    map.addEventListener("keydown", function (event) {
      var moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
      var move = moves[event.key];
      if (move) {
        event.preventDefault();
        moveTo(state.row + move[0], state.col + move[1]);
      }
    });
    if (chooser) {
      chooser.addEventListener("change", function () {
        state.cls = Number(chooser.value);
        update();
      });
    }
    for (var i = 0; i < sliders.length; i++) {
      sliders[i].addEventListener("input", function (event) { traverse(event.target); });
    }
    for (var s = 0; s < startButtons.length; s++) {
      startButtons[s].addEventListener("click", function (event) {
        state.start = Number(event.currentTarget.getAttribute("data-start"));
        for (var b = 0; b < startButtons.length; b++) {
          startButtons[b].setAttribute("aria-pressed", String(startButtons[b] === event.currentTarget));
        }
        for (var u = 0; u < sliders.length; u++) { traverse(sliders[u]); }
      });
    }
    update();
  }

  // The sheets are images: cut tiles from them once they have loaded.
  if (document.readyState === "complete") { start(); } else { window.addEventListener("load", start); }
})();
"""

EXPLORER_CSS = """
.explorer { display: flex; flex-wrap: wrap; gap: 12px 28px; align-items: flex-start; }
.explorer-map { flex: 0 1 360px; min-width: 0; }
#latent-map { display: block; width: 100%; max-width: 360px; height: auto; aspect-ratio: 1;
  cursor: crosshair; touch-action: none; border-radius: 4px; }
.explorer-side { flex: 1 1 200px; min-width: 0; }
.explorer-side output { display: block; color: var(--muted); font-size: .85rem; margin: 4px 0 12px;
  font-variant-numeric: tabular-nums; min-height: 1.3em; }
#latent-neighbours { display: flex; flex-wrap: wrap; gap: 4px; }
#latent-neighbours img, .explorer-starts img, .explorer-unit img { display: block; }
.explorer-class { display: block; margin-bottom: 8px; font-size: .9rem; }
.explorer-starts { display: flex; flex-wrap: wrap; gap: 4px; margin: 8px 0; }
.explorer-start { padding: 2px; border: 2px solid transparent; background: none; cursor: pointer;
  border-radius: 4px; }
.explorer-start[aria-pressed="true"] { border-color: #4e79a7; }
.explorer-unit { display: flex; flex-wrap: wrap; align-items: center; gap: 4px 12px; margin: 4px 0; }
.explorer-unit label { width: 8em; font-size: .9rem; }
.explorer-unit input { flex: 0 1 200px; min-width: 80px; }
.explorer-unit output { color: var(--muted); font-size: .85rem; font-variant-numeric: tabular-nums; }
.note { color: var(--muted); font-size: .8rem; }
#explorer h3 { margin-top: 14px; }
"""
