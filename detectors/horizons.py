"""Longer horizons (10 and 60 minutes) per source, summed from the one-minute panes.

The panes of the last hour are kept per stream (one small row per active source and
minute); each closing minute's rows get the sums over the panes of their horizon,
including themselves. Nothing is rescanned from raw records.

At most ``max_rows`` panes are kept (a flood of a million sources would otherwise hold
tens of millions). Beyond it, after the closing minute's sums are taken, the panes of the
sources with the fewest active minutes go first, oldest first, and are counted in
``evicted``: a flood of one-off sources loses its panes before a persistent sender does.
Below the bound the sums are exact.
"""

from __future__ import annotations

import polars as pl

HORIZONS_MIN = (10, 60)
PANE_COLUMNS = ("src_ip", "window_start", "connections", "new_dst", "rejected_port25", "rejected_new_dst25",
                "new_excess", "elevated")


#: (pane column, type summed in, horizon feature name)
_SUMS = (("connections", pl.UInt64, "conns"), ("new_dst", pl.UInt64, "new_dst"),
         ("rejected_port25", pl.UInt64, "rejected_port25"), ("rejected_new_dst25", pl.UInt64, "rejected_new_dst25"),
         ("new_excess", pl.Float64, "new_excess"), ("elevated", pl.UInt64, "elevated_minutes"))


def pane_types(panes: pl.DataFrame) -> pl.DataFrame:
    """Panes with 32-bit counts (12 bytes less per pane than the features' 64-bit ones)."""
    return panes.with_columns(pl.col("connections", "new_dst", "rejected_port25", "rejected_new_dst25").cast(pl.UInt32),
                              pl.col("new_excess").cast(pl.Float32), pl.col("elevated").cast(pl.UInt8))


class Panes:
    def __init__(self, window_ms: int, max_rows: int | None = None):
        self.window_ms = window_ms
        self.keep_ms = max(HORIZONS_MIN) * 60_000
        self.panes = pl.DataFrame()
        self.max_rows = max_rows
        self.evicted = 0

    def __len__(self) -> int:
        return self.panes.height

    def add(self, feats: pl.DataFrame) -> pl.DataFrame:
        """Store the closing panes and return ``feats`` with the horizon sums."""
        if feats.height == 0:
            return feats
        new = pane_types(feats.select(PANE_COLUMNS))
        self.panes = pl.concat([self.panes, new]) if self.panes.height else new
        newest = feats["window_start"].max()
        oldest = feats["window_start"].min()
        # keep what the oldest closing window's horizon needs while its sums are taken (a batch may span
        # more than the longest horizon: a detector that catches up on a backlog), then what is to come needs
        self.panes = self.panes.filter(pl.col("window_start") > oldest - pl.duration(milliseconds=self.keep_ms))
        keys = feats.select("src_ip", "window_start")
        joined = keys.join(self.panes.rename({"window_start": "pane_start"}), on="src_ip", how="inner")
        # both horizons in one pass
        longest = pl.duration(milliseconds=max(HORIZONS_MIN) * 60_000)
        joined = joined.filter((pl.col("pane_start") <= pl.col("window_start"))
                               & (pl.col("pane_start") > pl.col("window_start") - longest))
        aggs = []
        for h in HORIZONS_MIN:
            inside = pl.col("pane_start") > pl.col("window_start") - pl.duration(milliseconds=h * 60_000)
            last = h == max(HORIZONS_MIN)  # every joined pane is inside the longest horizon
            aggs += [(pl.col(col).cast(typ) if last else pl.col(col).cast(typ).filter(inside)).sum().alias(f"{name}_{h}m")
                     for col, typ, name in _SUMS]
            aggs.append((pl.len() if last else inside.sum()).cast(pl.UInt64).alias(f"active_minutes_{h}m"))
        sums = joined.group_by("src_ip", "window_start").agg(aggs)
        # joined on the keys only and added as columns: a join of ``feats`` itself would copy every column
        out = feats.hstack(keys.join(sums, on=["src_ip", "window_start"], how="left", maintain_order="left")
                           .drop("src_ip", "window_start"))
        self.panes = self.panes.filter(pl.col("window_start") > newest - pl.duration(milliseconds=self.keep_ms))
        self.bound()
        return out

    def bound(self) -> None:
        """Drop panes beyond ``max_rows``: fewest active minutes first, then oldest."""
        if self.max_rows is None or self.panes.height <= self.max_rows:
            return
        n = self.panes.height - self.max_rows
        self.panes = (self.panes.with_columns(_n=pl.len().over("src_ip"))
                      .sort(["_n", "window_start"], descending=[True, True]).head(self.max_rows).drop("_n"))
        self.evicted += n
