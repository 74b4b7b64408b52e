"""The report's latent explorer: its arrays against the model computed independently, its page
self-contained, and in Chromium the pointer and the sliders change what it shows."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import vaelab
from browser import check_page_in_browser, skip_unless_browser
from vaelab.report.explorer import LatentExplorer, latent_explorer
from vaelab.report.html import ReportContent, render_report, write_report

DIGITS = load_digits()
X = (DIGITS.data[:300] / 16.0).astype(np.float32)
Y = DIGITS.target[:300]


@pytest.fixture(scope="module")
def model2() -> vaelab.VAE:
    return vaelab.VAE(latent_dim=2, hidden=(32,), epochs=2, seed=0).fit(X)


@pytest.fixture(scope="module")
def model5() -> vaelab.VAE:
    return vaelab.VAE(latent_dim=5, hidden=(32,), epochs=2, seed=0).fit(X)


@pytest.fixture(scope="module")
def conditional() -> vaelab.VAE:
    return vaelab.VAE(latent_dim=3, hidden=(32,), epochs=2, seed=0, conditional=True).fit(X, Y)


@pytest.fixture(scope="module")
def explorer5(model5) -> LatentExplorer:
    found = latent_explorer(model5, X[:120], Y[:120], steps=6, neighbours=4, units=3, starts=2)
    assert found is not None
    return found


def decoder_means(estimator: vaelab.VAE, z: np.ndarray, label: int | None = None) -> np.ndarray:
    """E[x|z] straight from the likelihood module, ``[n, 8, 8]`` (given ``label`` one-hot)."""
    model = estimator.model_
    codes = torch.as_tensor(z, dtype=torch.float32)
    if label is not None:
        onehot = torch.zeros(len(z), len(estimator.classes_))
        onehot[:, list(estimator.classes_).index(label)] = 1.0
        model = model.given(onehot)
    with torch.no_grad():
        return model.likelihood.mean(codes).reshape(len(z), 8, 8).numpy()


def grid_points(explorer: LatentExplorer) -> np.ndarray:
    """The z of every cell centre, ``[steps, steps, latent]``, from the extent and the plane."""
    left, right, bottom, top = explorer.extent
    n = explorer.steps
    z = np.empty((n, n, len(explorer.origin)))
    for row in range(n):
        for col in range(n):
            a = left + (col + 0.5) * (right - left) / n
            b = top - (row + 0.5) * (top - bottom) / n
            z[row, col] = explorer.origin + a * explorer.directions[0] + b * explorer.directions[1]
    return z


def test_a_2d_latent_is_its_own_map(model2):
    explorer = latent_explorer(model2, X[:100], Y[:100], steps=5)
    assert explorer is not None and explorer.axes == ("z1", "z2")
    np.testing.assert_allclose(explorer.points, model2.transform(X[:100]), atol=1e-6)
    np.testing.assert_array_equal(explorer.directions, np.eye(2))
    left, right, bottom, top = explorer.extent
    inside = (explorer.points[:, 0] >= left) & (explorer.points[:, 0] <= right)
    assert inside.mean() >= 0.98 and left < right and bottom < top


def test_grid_decodings_are_the_decoder_means_at_the_grid_points(explorer5, model5):
    steps = explorer5.steps
    assert explorer5.grid.shape == (1, steps, steps, 1, 8, 8) and explorer5.classes is None
    z = grid_points(explorer5)
    np.testing.assert_allclose(explorer5.grid_latents(), z, atol=1e-9)
    expected = decoder_means(model5, z.reshape(-1, 5)).reshape(steps, steps, 8, 8)
    np.testing.assert_allclose(explorer5.grid[0, :, :, 0], np.clip(expected, 0, 1), atol=1e-5)


def test_a_wider_latent_is_mapped_on_its_principal_plane(explorer5, model5):
    z = model5.transform(X[:120]).astype(np.float64)
    centred = z - z.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    # The same plane up to the components' signs; the directions are orthonormal.
    np.testing.assert_allclose(np.abs(explorer5.directions), np.abs(vt[:2]), atol=1e-6)
    np.testing.assert_allclose(explorer5.directions @ explorer5.directions.T, np.eye(2), atol=1e-9)
    np.testing.assert_allclose(np.abs(explorer5.points), np.abs(centred @ vt[:2].T), atol=1e-5)
    assert explorer5.axes == ("PC1 of z", "PC2 of z")


def test_neighbours_are_the_nearest_examples_in_latent_space(explorer5, model5):
    z = model5.transform(X[:120]).astype(np.float64)
    points = grid_points(explorer5)
    assert explorer5.neighbours.shape == (explorer5.steps, explorer5.steps, 4)
    for row in range(explorer5.steps):
        for col in range(explorer5.steps):
            distances = np.linalg.norm(z - points[row, col], axis=1)
            found = explorer5.neighbours[row, col]
            assert sorted(distances[found]) == pytest.approx(np.sort(distances)[:4])
            assert list(distances[found]) == sorted(distances[found])  # nearest first


def test_traversals_move_the_most_active_units_one_at_a_time(explorer5, model5):
    z = model5.transform(X[:120]).astype(np.float64)
    spread = z.std(0)
    assert list(explorer5.units) == list(np.argsort(-spread)[:3])
    np.testing.assert_allclose(explorer5.activity, spread[explorer5.units] ** 2)
    assert explorer5.traversals.shape == (2, 3, len(explorer5.offsets), 1, 8, 8)
    middle = len(explorer5.offsets) // 2
    assert explorer5.offsets[middle] == 0
    for start in range(2):
        for j, unit in enumerate(explorer5.units):
            moved = np.repeat(z[start][None], len(explorer5.offsets), 0)
            moved[:, unit] += explorer5.offsets * spread[unit]
            expected = np.clip(decoder_means(model5, moved), 0, 1)
            np.testing.assert_allclose(explorer5.traversals[start, j, :, 0], expected, atol=1e-5)
    # Offset 0 is the example's own reconstruction.
    rebuilt = model5.reconstruct(X[:1]).reshape(8, 8)
    np.testing.assert_allclose(explorer5.traversals[0, 0, middle, 0], rebuilt, atol=1e-5)


def test_a_conditional_model_has_a_grid_per_class(conditional):
    explorer = latent_explorer(conditional, X[:100], Y[:100], steps=4, starts=2)
    assert explorer is not None
    assert explorer.classes == [str(c) for c in range(10)] and explorer.grid.shape[:3] == (10, 4, 4)
    z = grid_points(explorer).reshape(-1, 3)
    for c in (0, 7):
        expected = np.clip(decoder_means(conditional, z, label=c), 0, 1).reshape(4, 4, 8, 8)
        np.testing.assert_allclose(explorer.grid[c, :, :, 0], expected, atol=1e-5)
    # Each traversal is decoded given its start's own class.
    zs = conditional.transform(X[:1], Y[:1])
    own = decoder_means(conditional, zs, label=int(Y[0]))[0]
    np.testing.assert_allclose(
        explorer.traversals[0, 0, len(explorer.offsets) // 2, 0], np.clip(own, 0, 1), atol=1e-5
    )
    assert list(explorer.labels) == list(Y[:100])


def test_tabular_data_has_no_explorer():
    rows = np.random.default_rng(0).random((60, 5)).astype(np.float32)
    model = vaelab.VAE(latent_dim=2, hidden=(8,), epochs=1, seed=0).fit(rows)
    assert latent_explorer(model, rows) is None


def page_of(explorer: LatentExplorer) -> str:
    return render_report(ReportContent(title="explorer", explorer=explorer))


def test_the_explorer_page_is_self_contained(explorer5):
    text = page_of(explorer5)
    assert 'id="latent-map"' in text and 'id="latent-decoded"' in text
    assert "http://" not in text and "https://" not in text and "url(" not in text
    for source in re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", text):
        assert source.startswith("data:image/png;base64,"), source[:40]
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", text, flags=re.S)
    assert [attributes for attributes, _ in scripts] == [
        ' type="application/json" id="latent-data"',
        "",
    ]
    code = scripts[1][1]
    for banned in ("eval(", "new Function", "fetch(", "XMLHttpRequest", "import(", "setTimeout("):
        assert banned not in code, banned
    data = json.loads(scripts[0][1])
    assert data["steps"] == 6 and len(data["neighbours"]) == 6 * 6 * 4
    assert len(data["points"]) == 120 and data["units"] == 3


def test_the_sheets_hold_the_decodings_tile_by_tile(explorer5):
    text = page_of(explorer5)

    def sheet(name: str) -> np.ndarray:
        uri = re.search(rf'id="{name}" src="data:image/png;base64,([^"]+)"', text)
        assert uri is not None, name
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.group(1)))))

    grid = sheet("latent-grid-0")
    assert grid.shape == (6 * 8, 6 * 8)
    row, col = 2, 5  # the tile the script cuts for this cell
    tile = grid[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] / 255
    np.testing.assert_allclose(tile, explorer5.grid[0, row, col, 0], atol=0.5 / 255 + 1e-9)
    assert sheet("latent-thumbnails").shape == (6 * 8, 20 * 8)  # 120 examples, 20 a row
    assert sheet("latent-traversals").shape == (2 * 3 * 8, 13 * 8)


def test_class_names_are_escaped_in_the_page(conditional):
    names = [f"<b>{c}</b>" for c in range(10)]
    explorer = latent_explorer(conditional, X[:40], Y[:40], steps=3, class_names=names)
    text = page_of(explorer)
    assert "<b>" not in text and "&lt;b&gt;3&lt;/b&gt;" in text


@pytest.mark.slow
@pytest.mark.parametrize("which", ["plain", "conditional"])
def test_the_pointer_and_the_sliders_change_the_pictures_in_chromium(
    which, model5, conditional, tmp_path
):
    skip_unless_browser()
    from playwright.sync_api import sync_playwright

    from browser import CHROMIUM, LAUNCH_ARGS

    model = conditional if which == "conditional" else model5
    explorer = latent_explorer(model, X[:200], Y[:200])
    path = write_report(tmp_path / "report.html", ReportContent(title="x", explorer=explorer))
    assert check_page_in_browser(path) == []  # no errors, nothing fetched, every image decoded

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on(
                "request",
                lambda r: None if r.url.startswith(("file:", "data:")) else problems.append(r.url),
            )
            page.goto(path.resolve().as_uri(), wait_until="load")
            box = page.locator("#latent-map").bounding_box()
            assert box is not None

            def decoded() -> str | None:
                return page.get_attribute("#latent-decoded", "src")

            seen = [decoded()]
            for fx, fy in ((0.05, 0.05), (0.95, 0.05), (0.95, 0.95), (0.3, 0.7)):
                page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
                page.wait_for_function(
                    f"document.getElementById('latent-decoded').src !== {json.dumps(seen[-1])}",
                    timeout=5000,
                )
                seen.append(decoded())
            assert len(set(seen)) == len(seen)  # every move showed another decoding
            assert all(s and s.startswith("data:image/png;base64,") for s in seen)
            neighbours = page.eval_on_selector_all(
                "#latent-neighbours img", "images => images.map(i => i.src)"
            )
            assert len(neighbours) == 6 and all(n.startswith("data:image/png") for n in neighbours)

            before = page.get_attribute("#latent-traversal-0", "src")
            page.fill("#latent-slider-0", "0")
            assert page.get_attribute("#latent-traversal-0", "src") != before
            assert page.text_content("#latent-offset-0") == "-3.0 sd"
            moved = page.get_attribute("#latent-traversal-0", "src")
            page.locator(".explorer-start").nth(1).click()  # another example, same slider
            assert page.get_attribute("#latent-traversal-0", "src") != moved

            if which == "conditional":
                shown = decoded()
                page.select_option("#latent-class", "7")
                assert decoded() != shown
            else:
                assert page.locator("#latent-class").count() == 0
            page.focus("#latent-map")
            shown = decoded()
            page.keyboard.press("ArrowLeft")
            assert decoded() != shown
        finally:
            browser.close()
    assert problems == []


def test_several_stochastic_layers_are_explored_in_z1_the_decoder_reads():
    """The decoder reads z₁ alone: the map's plane and the traversed units lie in it."""
    model = vaelab.VAE(latent_dim=(3, 2), hidden=(16,), epochs=1, seed=0).fit(X[:200])
    explorer = latent_explorer(model, X[:100], steps=3, units=5)
    assert explorer is not None
    np.testing.assert_array_equal(explorer.directions[:, 3:], 0.0)
    assert sorted(explorer.units) == [0, 1, 2]
