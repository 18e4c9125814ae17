"""Tables for the benchmarks' printed reports."""

from __future__ import annotations

import pandas as pd

__all__ = ["markdown"]


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub table of ``table`` (floats rounded to ``digits``)."""
    def cell(value):
        if isinstance(value, float):
            return "" if value != value else f"{value:.{digits}f}"  # NaN: an empty cell
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
