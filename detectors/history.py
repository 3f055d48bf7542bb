"""Each source's memory across windows, in bounded space.

Per source IP: exponentially weighted averages of connections and fan-out per active minute,
a slowly decaying peak fan-out, how many active minutes it has been seen, and its familiar
destinations as a 4096-bit set (a one-hash Bloom filter: a destination never seen before is
*new*; a false "familiar" happens only once a source has talked to thousands of servers).
Arrays are preallocated to ``max_sources``; when full, the least recently seen tenth is
evicted and counted. The state serialises to bytes for the store (:meth:`snapshot`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import polars as pl

BITS = 4096
WORDS = BITS // 64


@dataclass
class HistoryParams:
    alpha: float = 0.05
    """EWMA weight of the newest active minute (about 20 minutes of memory)"""
    peak_decay: float = 0.998
    """per active minute; the peak fan-out halves in about 350 active minutes"""
    max_sources: int = 200_000
    """sources remembered per stream; the least recently seen are evicted beyond this"""


class SourceHistory:
    def __init__(self, params: HistoryParams | None = None):
        self.p = params or HistoryParams()
        self.index: dict[str, int] = {}
        self.ips: list[str | None] = []
        cap = 1024
        self.ewma_conns = np.zeros(cap)
        self.ewma_distinct = np.zeros(cap)
        self.peak_distinct = np.zeros(cap)
        self.peak_conns = np.zeros(cap)
        self.minutes = np.zeros(cap, dtype=np.int64)
        self.last_seen_ms = np.zeros(cap, dtype=np.int64)
        self.familiar = np.zeros((cap, WORDS), dtype=np.uint64)
        self.free: list[int] = []
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.index)

    # -- slots ----------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = len(self.ewma_conns)
        if need <= cap:
            return
        new = min(max(need, cap * 2), self.p.max_sources)
        for name in ("ewma_conns", "ewma_distinct", "peak_distinct", "peak_conns", "minutes", "last_seen_ms"):
            a = getattr(self, name)
            b = np.zeros(new, dtype=a.dtype)
            b[:cap] = a
            setattr(self, name, b)
        f = np.zeros((new, WORDS), dtype=np.uint64)
        f[:cap] = self.familiar
        self.familiar = f

    def _evict(self, n: int, keep: set[str]) -> None:
        live = np.array([i for i, ip in enumerate(self.ips) if ip is not None and ip not in keep], dtype=np.int64)
        n = min(n, len(live))
        if n <= 0:
            return
        oldest = live[np.argpartition(self.last_seen_ms[live], n - 1)[:n]]
        for i in oldest:
            del self.index[self.ips[i]]
            self.ips[i] = None
            self._clear(i)
            self.free.append(int(i))
        self.evicted += n

    def _clear(self, i: int) -> None:
        self.ewma_conns[i] = self.ewma_distinct[i] = self.peak_distinct[i] = self.peak_conns[i] = 0
        self.minutes[i] = self.last_seen_ms[i] = 0
        self.familiar[i] = 0

    def slots(self, ips: list[str]) -> np.ndarray:
        out = np.empty(len(ips), dtype=np.int64)
        new = [ip for ip in dict.fromkeys(ips) if ip not in self.index]
        if new:
            room = self.p.max_sources - len(self.index)
            if len(new) > room:
                self._evict(max(len(new) - room, self.p.max_sources // 10), set(ips))
            for ip in new:
                if self.free:
                    i = self.free.pop()
                    self.ips[i] = ip
                else:
                    i = len(self.ips)
                    self._grow(i + 1)
                    self.ips.append(ip)
                self.index[ip] = i
        for k, ip in enumerate(ips):
            out[k] = self.index[ip]
        return out

    # -- per window -----------------------------------------------------------------------
    def observe(self, rows: pl.DataFrame, feats: pl.DataFrame) -> pl.DataFrame:
        """Add history columns to one closing batch of window features and learn from it.

        ``rows`` are the raw records of the closing windows (``src_ip``, ``dst_ip``,
        ``window_start``); windows are taken in time order, so a destination first seen in
        minute 1 is familiar in minute 2. Columns added (values *before* this window):
        ``new_dst`` (destinations not seen before), ``new_dst_share``, ``base_conns``,
        ``base_distinct``, ``peak_distinct``, ``history_minutes``.
        """
        if feats.height == 0:
            return feats.with_columns(
                pl.lit(0, pl.UInt32).alias("new_dst"), pl.lit(0.0).alias("new_dst_share"),
                pl.lit(0.0).alias("base_conns"), pl.lit(0.0).alias("base_distinct"),
                pl.lit(0.0).alias("peak_distinct"), pl.lit(0.0).alias("peak_conns"),
                pl.lit(0, pl.Int64).alias("history_minutes"))
        pairs = (rows.select("src_ip", "dst_ip", "window_start").unique()
                 .with_columns(bit=(pl.col("dst_ip").hash(seed=7) % BITS).cast(pl.Int64)))
        parts = []
        for ws in sorted(feats["window_start"].unique().to_list()):
            f = feats.filter(pl.col("window_start") == ws)
            ws_ms = int(ws.timestamp() * 1000) if hasattr(ws, "timestamp") else int(ws)
            p = pairs.filter(pl.col("window_start") == ws_ms)
            ips = f["src_ip"].to_list()
            idx = self.slots(ips)
            before = {
                "base_conns": self.ewma_conns[idx].copy(), "base_distinct": self.ewma_distinct[idx].copy(),
                "peak_distinct": self.peak_distinct[idx].copy(), "peak_conns": self.peak_conns[idx].copy(),
                "history_minutes": self.minutes[idx].copy(),
            }
            # novelty: which (source, destination) bits were unset before this minute
            pidx = self.slots(p["src_ip"].to_list())
            bits = p["bit"].to_numpy()
            words, masks = bits >> 6, np.left_shift(np.uint64(1), (bits & 63).astype(np.uint64))
            seen = (self.familiar[pidx, words] & masks) != 0
            new_per = (pl.DataFrame({"src_ip": p["src_ip"], "new": ~seen})
                       .group_by("src_ip").agg(new_dst=pl.col("new").sum().cast(pl.UInt32)))
            np.bitwise_or.at(self.familiar, (pidx, words), masks)
            # learn the window's values
            a = self.p.alpha
            conns = f["connections"].to_numpy().astype(float)
            distinct = f["distinct_dst"].to_numpy().astype(float)
            first = self.minutes[idx] == 0
            self.ewma_conns[idx] = np.where(first, conns, (1 - a) * self.ewma_conns[idx] + a * conns)
            self.ewma_distinct[idx] = np.where(first, distinct, (1 - a) * self.ewma_distinct[idx] + a * distinct)
            self.peak_distinct[idx] = np.maximum(self.peak_distinct[idx] * self.p.peak_decay, distinct)
            self.peak_conns[idx] = np.maximum(self.peak_conns[idx] * self.p.peak_decay, conns)
            self.minutes[idx] += 1
            self.last_seen_ms[idx] = np.maximum(self.last_seen_ms[idx], ws_ms)
            f = f.with_columns(**{k: pl.Series(v) for k, v in before.items()}).join(new_per, on="src_ip", how="left")
            parts.append(f.with_columns(
                new_dst=pl.col("new_dst").fill_null(0),
                new_dst_share=(pl.col("new_dst").fill_null(0) / pl.col("distinct_dst")).fill_nan(0.0),
            ))
        return pl.concat(parts)

    # -- persistence ----------------------------------------------------------------------
    def snapshot(self) -> bytes:
        live = np.array([i for i, ip in enumerate(self.ips) if ip is not None], dtype=np.int64)
        buf = io.BytesIO()
        np.savez_compressed(
            buf, ips=np.array([self.ips[i] for i in live], dtype=object).astype(str),
            ewma_conns=self.ewma_conns[live], ewma_distinct=self.ewma_distinct[live],
            peak_distinct=self.peak_distinct[live], peak_conns=self.peak_conns[live], minutes=self.minutes[live],
            last_seen_ms=self.last_seen_ms[live], familiar=self.familiar[live], evicted=np.array([self.evicted]))
        return buf.getvalue()

    @classmethod
    def restore(cls, data: bytes, params: HistoryParams | None = None) -> "SourceHistory":
        h = cls(params)
        z = np.load(io.BytesIO(data), allow_pickle=False)
        ips = [str(x) for x in z["ips"]]
        idx = h.slots(ips)
        for name in ("ewma_conns", "ewma_distinct", "peak_distinct", "peak_conns", "minutes", "last_seen_ms", "familiar"):
            getattr(h, name)[idx] = z[name]
        h.evicted = int(z["evicted"][0])
        return h
