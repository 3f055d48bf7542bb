"""Column helpers shared by the stages that work on polars frames."""

from __future__ import annotations

import polars as pl


def encode(values: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Dictionary-encode strings: (the distinct values, sorted; each row's index into them as UInt32).

    Codes keep the values' order, so sorting or breaking ties by code is sorting by the string.
    Group-bys, joins and sorts then run on integers, and strings come back by ``values.gather(codes)``."""
    uniq = values.unique().sort()
    return uniq, values.cast(pl.Enum(uniq)).to_physical().cast(pl.UInt32)
