"""``vaelab report``: what the report says about a model folder (``content``), the arrays behind
its pictures (``figures``), one self-contained HTML file (``html``), its charts as inline SVG
(``svg``) and its numbers in words (``text``)."""

from vaelab.report.html import LatentScatter, Metric, ReportContent, write_report

__all__ = ["LatentScatter", "Metric", "ReportContent", "write_report"]
