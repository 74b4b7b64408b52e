"""The HTML report: self-contained, escaped, sections present or omitted, clean in a browser."""

import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from browser import check_page_in_browser, skip_unless_browser
from vaelab.report.html import (
    LatentScatter,
    Metric,
    ReportContent,
    format_number,
    render_report,
    write_report,
)

SECTIONS = [
    "config",
    "metrics",
    "curves",
    "samples",
    "reconstructions",
    "manifold",
    "interpolations",
    "latent_scatter",
    "kl_per_dimension",
    "notes",
]


def synthetic_content() -> ReportContent:
    """Every section filled with random or closed-form data: 8 x 8 grey images, ten classes."""
    rng = np.random.default_rng(0)
    epochs = np.arange(1, 31)
    t = np.linspace(0.0, 2 * np.pi, 80)
    centres = rng.normal(0.0, 4.0, size=(10, 2))
    labels = np.repeat(np.arange(10), 40)
    valid = -120 + 25 * (1 - np.exp(-epochs / 6))
    valid[12] = np.nan  # a diverged evaluation must break the line, not the chart
    return ReportContent(
        title='Synthetic <report> & "checks"',
        subtitle="MLP encoder and decoder, 10-d latent, Bernoulli likelihood",
        config={"data": "synthetic", "latent": 10, "encoder": {"hidden": [64, 32]}, "lr": 1e-3},
        metrics=[
            ("ELBO", -98.3123, "nats/example, test, higher is better"),
            ("IWAE-5000", -94.87, "nats/example, test"),
            ("approximation gap", 2.15, "nats"),
            Metric("active units", 7, "of 10"),
        ],
        curves={
            "ELBO per epoch": {"train": (epochs, valid + 3), "valid": (epochs, valid)},
            "sine": {"sin t": (t, np.sin(t))},
        },
        samples=rng.uniform(size=(16, 1, 8, 8)),
        reconstructions=(rng.uniform(size=(12, 1, 8, 8)), rng.uniform(size=(12, 1, 8, 8))),
        manifold=rng.uniform(size=(6, 6, 1, 8, 8)),
        interpolations=rng.uniform(size=(3, 7, 8, 8)),
        latent_scatter=(centres[labels] + rng.normal(size=(400, 2)), labels, ("PC1", "PC2")),
        kl_per_dimension=[2.5, 0.001, 1.2, 0.0, 3.1, 0.8, 0.002, 1.9, 0.5, 0.004],
        active_threshold=0.01,
        notes=["Estimated with <script>alert('x')</script> & friends."],
        captions={"samples": "z ~ p(z), decoder mean"},
    )


@pytest.fixture
def report_path(tmp_path):
    return write_report(tmp_path / "report.html", synthetic_content())


def data_uri_images(text: str) -> list[Image.Image]:
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    return [Image.open(io.BytesIO(base64.b64decode(uri, validate=True))) for uri in uris]


def test_report_is_self_contained(report_path):
    text = report_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # The SVG namespace is the only URL-looking text allowed; nothing is fetched from anywhere.
    without_namespace = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_namespace
    assert "https://" not in without_namespace
    assert "url(" not in text and "@import" not in text
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", text)
    assert len(sources) > 0
    assert all(source.startswith("data:") for source in sources)
    links = re.findall(r"""\bhref\s*=\s*["']?([^"'\s>]*)""", text)
    assert all(link.startswith(("#", "data:")) for link in links)
    assert "<script" not in text.lower()


def test_report_has_every_section_and_picture(report_path):
    text = report_path.read_text(encoding="utf-8")
    assert re.findall(r'<section id="([a-z_]+)">', text) == SECTIONS
    # samples 1, reconstructions 2 rows per 10 examples (12 -> 4 rows), manifold 1, interpolations 1
    assert text.count("<img ") == 1 + 4 + 1 + 1
    assert text.count("<svg ") == 2 + 1 + 1  # two curve charts, scatter, KL bars
    sizes = [image.size for image in data_uri_images(text)]
    assert sizes[0] == (4 * 9 + 1, 4 * 9 + 1)  # 16 samples of 8 x 8, 4 per row, 1-pixel gaps
    assert sizes[-2] == (6 * 8, 6 * 8)  # the manifold is tiled without gaps
    assert sizes[-1] == (7 * 9 + 1, 3 * 9 + 1)  # 3 interpolations of 7 steps
    assert "z ~ p(z), decoder mean" in text
    assert "6 of 10 above the threshold" in text  # 2.5, 1.2, 3.1, 0.8, 1.9, 0.5
    assert "400 points, coloured by label" in text


def test_report_text_is_escaped(report_path):
    text = report_path.read_text(encoding="utf-8")
    assert "<title>Synthetic &lt;report&gt; &amp; &quot;checks&quot;</title>" in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; friends." in text


def test_values_are_formatted_for_people(report_path):
    text = report_path.read_text(encoding="utf-8")
    assert ">-98.31<" in text
    assert ">0.001<" in text  # a setting is shown as given
    assert "encoder.hidden" in text and "64, 32" in text


def test_nan_in_a_curve_breaks_the_line():
    content = ReportContent(curves={"c": {"s": ([0, 1, 2, 3, 4], [0, 1, float("nan"), 3, 4])}})
    assert render_report(content).count("<polyline") == 2


def test_empty_content_has_no_sections():
    text = render_report(ReportContent(title="Nothing yet"))
    assert "<h1>Nothing yet</h1>" in text
    assert "<section" not in text and "<nav>" not in text


def test_only_given_sections_appear():
    content = ReportContent(metrics=[("ELBO", -1.5)], kl_per_dimension=[], notes=[])
    assert re.findall(r'<section id="([a-z_]+)">', render_report(content)) == ["metrics"]


def test_large_scatter_is_thinned_and_says_so():
    points = np.random.default_rng(3).normal(size=(6000, 2))
    text = render_report(ReportContent(latent_scatter=LatentScatter(points)))
    assert "5000 of 6000 points" in text
    assert len(re.findall(r'<circle class="c0"', text)) == 5000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-98.3123, "-98.31"),
        (2.15, "2.15"),
        (0.01, "0.01"),
        (2.0, "2.0"),
        (1234.567, "1234.57"),
        (12, "12"),
        (np.int64(7), "7"),
        (np.float32(0.5), "0.5"),
        (0.0, "0"),
        (3.2e-6, "3.2e-6"),
        (-1.5e7, "-1.5e7"),
        (float("nan"), "nan"),
        (float("-inf"), "-inf"),
    ],
)
def test_format_number(value, expected):
    assert format_number(value) == expected


def test_format_number_can_keep_a_columns_precision():
    assert format_number(-23.1996, trim=False) == "-23.20"
    assert format_number(2.0, trim=False) == "2.000"
    assert format_number(0.06286, trim=False) == "0.06286"
    assert format_number(7, trim=False) == "7"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (ReportContent(samples=np.zeros((2, 2))), r"ReportContent\.samples: .*\[n, C, H, W\]"),
        (
            ReportContent(reconstructions=(np.zeros((2, 1, 4, 4)), np.zeros((3, 1, 4, 4)))),
            r"ReportContent\.reconstructions: .*same shape",
        ),
        (ReportContent(curves={"c": {"s": ([1, 2], [1])}}), r"ReportContent\.curves: .*'c'"),
        (
            ReportContent(latent_scatter=(np.zeros((5, 3)), None, ("a", "b"))),
            r"ReportContent\.latent_scatter: points .*\[n, 2\]",
        ),
        (
            ReportContent(latent_scatter=(np.zeros((5, 2)), np.zeros(4), ("a", "b"))),
            r"4 labels for 5 points",
        ),
        (ReportContent(manifold=np.zeros((4, 8, 8))), r"ReportContent\.manifold"),
        (ReportContent(kl_per_dimension=[1.0, float("nan")]), r"finite"),
        (ReportContent(metrics=[("only a name",)]), r"ReportContent\.metrics"),
    ],
)
def test_bad_content_names_the_field(content, message):
    with pytest.raises(ValueError, match=message):
        render_report(content)


def test_write_report_replaces_atomically(tmp_path):
    target = tmp_path / "report.html"
    write_report(target, ReportContent(title="first"))
    path = write_report(target, ReportContent(title="second"))
    assert path == target
    assert "<h1>second</h1>" in target.read_text(encoding="utf-8")
    assert os.listdir(tmp_path) == ["report.html"]


@pytest.mark.slow
def test_report_renders_cleanly_in_chromium(report_path, tmp_path):
    skip_unless_browser()
    screenshot = tmp_path / "report.png"
    assert check_page_in_browser(report_path, screenshot) == []
    with Image.open(screenshot) as image:
        assert image.width == 1100
        assert image.height > 2000  # the full page, not just the first screen


def test_curves_without_finite_points_are_left_out():
    content = ReportContent(curves={"empty": {"s": ([], [])}, "nan": {"s": ([0], [float("nan")])}})
    assert "<section" not in render_report(content)
