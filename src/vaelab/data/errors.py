"""The one exception of the data room: a mistake in the data or in the data options, said in one
sentence that tells the user what to do."""

from __future__ import annotations


class DataError(ValueError):
    """A mistake in the data or the data options; the message is one sentence saying what to do."""
