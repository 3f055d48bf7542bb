"""Event-time tumbling windows with a watermark, per stream (one Kafka partition or one file set).

Mechanism only: which rows belong to which window and when a window closes. Features and
detectors sit on top (:mod:`features`, :mod:`rules`).

- Event time is the record's ``start``; the wall clock never assigns a window.
- The watermark is the newest event time seen minus ``allowed_lateness_ms``. A window
  ``[s, s + window_ms)`` closes when the watermark passes its end.
- A record for a window that already closed is *late*: it is counted (with its delay)
  and dropped, so a replay gives the same windows as the live stream.
- Each open row remembers the Kafka offset it came from, so the consumer can commit only
  offsets whose windows are closed and written (:meth:`WindowEngine.safe_offset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from .features import NEEDED_COLUMNS, RECORD_COLUMNS


def _validate(window_ms: int, allowed_lateness_ms: int) -> None:
    if window_ms <= 0:
        raise ValueError("window_ms must be positive")
    if allowed_lateness_ms < 0:
        raise ValueError("allowed_lateness_ms must be >= 0")


@dataclass
class LateStats:
    records: int = 0
    max_delay_ms: int = 0


@dataclass
class WindowEngine:
    window_ms: int
    allowed_lateness_ms: int
    max_event_ms: int | None = None
    closed_upto_ms: int | None = None
    """every window starting before this has been closed"""
    late: LateStats = field(default_factory=LateStats)
    _open: list[pl.DataFrame] = field(default_factory=list)
    _open_rows: int = 0

    def __post_init__(self) -> None:
        _validate(self.window_ms, self.allowed_lateness_ms)

    @property
    def open_rows(self) -> int:
        return self._open_rows

    def add(self, records: pa.Table | pl.DataFrame, offset: int = -1, offsets: pa.Array | None = None) -> int:
        """Add records; returns how many were late (and dropped)."""
        if not isinstance(records, pl.DataFrame):
            records = pl.from_arrow(records.select(list(RECORD_COLUMNS)))
        # src_addr: the record's address where the key is not the address itself (SourceKeys.apply);
        # conn_weight: set for packet samples only (features.connection_weights)
        df = records if "src_addr" in records.columns else records.with_columns(src_addr=pl.lit(None, pl.String))
        if "conn_weight" not in df.columns:
            df = df.with_columns(conn_weight=pl.lit(None, pl.UInt32))
        if "tenant_filled" not in df.columns:
            df = df.with_columns(tenant_filled=pl.lit(False))
        if df.height == 0:
            return 0
        start = pl.col("start").cast(pl.Int64)
        df = df.select(*NEEDED_COLUMNS).with_columns(
            window_start=(start // self.window_ms) * self.window_ms,
            offset=pl.Series(offsets, dtype=pl.Int64) if offsets is not None else pl.lit(offset, pl.Int64),
        )
        late = 0
        if self.closed_upto_ms is not None:
            is_late = pl.col("window_start") < self.closed_upto_ms
            late_df = df.filter(is_late)
            late = late_df.height
            if late:
                newest = self.max_event_ms if self.max_event_ms is not None else self.closed_upto_ms
                delay = newest - int(late_df["start"].cast(pl.Int64).min())
                self.late.records += late
                self.late.max_delay_ms = max(self.late.max_delay_ms, delay)
                df = df.filter(~is_late)
        if df.height:
            newest = int(df["start"].cast(pl.Int64).max())
            self.max_event_ms = newest if self.max_event_ms is None else max(self.max_event_ms, newest)
            self._open.append(df)
            self._open_rows += df.height
        return late

    def watermark_ms(self) -> int | None:
        return None if self.max_event_ms is None else self.max_event_ms - self.allowed_lateness_ms

    def close_ready(self, *, force: bool = False) -> pl.DataFrame | None:
        """Remove and return the rows of every window the watermark has passed
        (every open window with ``force``), or None when nothing closes."""
        if not self._open:
            return None
        wm = self.watermark_ms()
        if force:
            cutoff = ((self.max_event_ms // self.window_ms) + 1) * self.window_ms
        else:
            cutoff = (wm // self.window_ms) * self.window_ms  # windows ending at or before wm
        if self.closed_upto_ms is not None and cutoff <= self.closed_upto_ms:
            return None
        rows = pl.concat(self._open, how="vertical_relaxed") if len(self._open) > 1 else self._open[0]
        closing = rows.filter(pl.col("window_start") < cutoff)
        self.closed_upto_ms = cutoff if self.closed_upto_ms is None else max(cutoff, self.closed_upto_ms)
        if closing.height == 0:
            self._open = [rows]
            return None
        keep = rows.filter(pl.col("window_start") >= cutoff)
        self._open = [keep] if keep.height else []
        self._open_rows = keep.height
        return closing

    def safe_offset(self) -> int | None:
        """Smallest Kafka offset still needed by an open window (None if nothing is open)."""
        if not self._open:
            return None
        return min(int(df["offset"].min()) for df in self._open)

    def rebase_offsets(self, offset: int) -> None:
        """The partition's log started again (a broker that lost its data): the open rows' offsets
        belong to the old log, so they are all set to ``offset``, the first offset of the new one.
        The rows stay: their windows close as usual, but they cannot be replayed after a crash."""
        self._open = [df.with_columns(pl.lit(offset, pl.Int64).alias("offset")) for df in self._open]
