"""``vaelab report``: what the report says about a model folder (``content``), the arrays behind
its pictures (``figures``), the interactive latent explorer's arrays (``explorer``) and its page
(``explorer_html``), one self-contained HTML file (``html``), its charts as inline SVG (``svg``)
and its numbers in words (``text``)."""

from vaelab.report.explorer import LatentExplorer, latent_explorer
from vaelab.report.html import LatentScatter, Metric, ReportContent, write_report

__all__ = [
    "LatentExplorer",
    "LatentScatter",
    "Metric",
    "ReportContent",
    "latent_explorer",
    "write_report",
]
