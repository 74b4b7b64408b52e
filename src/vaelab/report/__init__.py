"""``vaelab report``: what the report says about a model folder (``content``), the arrays behind
its pictures (``figures``) and one self-contained HTML file (``html``)."""

from vaelab.report.html import LatentScatter, Metric, ReportContent, write_report

__all__ = ["LatentScatter", "Metric", "ReportContent", "write_report"]
