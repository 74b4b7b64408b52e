"""Text for people in the report: measured numbers formatted for reading (``format_number``) and
escaping for HTML and SVG alike (``esc``)."""

from __future__ import annotations

import html
import math
from typing import SupportsFloat

import numpy as np


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


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)
