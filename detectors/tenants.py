"""Tenant-level windows: several instances of one tenant, each moderate, together a fan-out.

Each stream contributes, per (tenant, minute), partial aggregates of its port-25 traffic:
connections per instance and a 256-register HyperLogLog of destinations. Partials from all
streams merge (sums, register-wise max) and a tenant window closes once every stream has
closed that minute. Traffic of established exempted mail servers is left out: it is
normal, and it would drown a small distributed spam run in a large tenant.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

M = 256
_ALPHA = 0.7213 / (1 + 1.079 / M)


def dst_hash(ips: pl.Series) -> pl.Series:
    """The 64-bit hash of each destination address the HyperLogLog registers are built from."""
    return ips.hash(seed=11)


def hll_partials(rows: pl.DataFrame) -> pl.DataFrame:
    """(tenant, window_start, bucket) -> max rank, from rows with ``tenant``, ``window_start`` and
    ``dst_hash`` (:func:`dst_hash` of the destination)."""
    h = rows["dst_hash"].to_numpy()
    bucket = (h & np.uint64(M - 1)).astype(np.int16)
    w = h >> np.uint64(8)
    with np.errstate(divide="ignore"):
        rank = np.where(w == 0, 57, 56 - np.floor(np.log2(w.astype(np.float64))).astype(np.int64)).astype(np.int16)
    return (rows.select("tenant", "window_start").with_columns(bucket=pl.Series(bucket), rank=pl.Series(rank))
            .group_by("tenant", "window_start", "bucket").agg(pl.col("rank").max()))


def hll_estimate(registers: pl.DataFrame) -> pl.DataFrame:
    """(tenant, window_start, bucket, rank) -> (tenant, window_start, distinct_dst25)."""
    g = registers.group_by("tenant", "window_start").agg(
        z=(2.0 ** (-pl.col("rank").cast(pl.Float64))).sum() + (M - pl.len()),
        zeros=M - pl.len(),
    )
    raw = _ALPHA * M * M / g["z"].to_numpy()
    zeros = g["zeros"].to_numpy()
    small = (raw <= 2.5 * M) & (zeros > 0)
    est = np.where(small, M * np.log(M / np.maximum(zeros, 1)), raw)
    return g.select("tenant", "window_start").with_columns(distinct_dst25=pl.Series(np.round(est).astype(np.int64)))


class TenantStage:
    def __init__(self, window_ms: int):
        self.window_ms = window_ms
        self.registers = pl.DataFrame()
        self.instances = pl.DataFrame()
        self.closed_upto_ms: int | None = None

    def add(self, rows: pl.DataFrame, skip_ips: set[str]) -> None:
        """Add a stream's closing port-25 traffic of sources with a tenant: one row per (tenant, window,
        source, destination) with ``dst_hash``, ``conns`` and ``rejected``
        (:attr:`detectors.features.Closed.tenant_rows`); sources in ``skip_ips`` (established exempted
        senders) are left out."""
        r = rows
        if skip_ips:
            r = r.filter(~pl.col("src_ip").is_in(pl.Series(list(skip_ips), dtype=pl.String).implode()))
        if self.closed_upto_ms is not None:
            r = r.filter(pl.col("window_start") >= self.closed_upto_ms)
        if r.height == 0:
            return
        regs = hll_partials(r)
        inst = r.group_by("tenant", "window_start", "src_ip").agg(
            conns=pl.col("conns").sum().cast(pl.UInt64), rejected=pl.col("rejected").sum().cast(pl.UInt64))
        self.registers = pl.concat([self.registers, regs]) if self.registers.height else regs
        self.instances = pl.concat([self.instances, inst]) if self.instances.height else inst

    def close(self, upto_ms: int | None) -> pl.DataFrame | None:
        """Tenant features of every window starting before ``upto_ms`` (None = all)."""
        if self.instances.height == 0:
            if upto_ms is not None:
                self.closed_upto_ms = max(upto_ms, self.closed_upto_ms or upto_ms)
            return None
        cond = pl.lit(True) if upto_ms is None else pl.col("window_start") < upto_ms
        inst = self.instances.filter(cond)
        regs = self.registers.filter(cond)
        self.instances = self.instances.filter(~cond)
        self.registers = self.registers.filter(~cond)
        if upto_ms is not None:
            self.closed_upto_ms = max(upto_ms, self.closed_upto_ms or upto_ms)
        if inst.height == 0:
            return None
        per_inst = inst.group_by("tenant", "window_start", "src_ip").agg(pl.col("conns").sum(), pl.col("rejected").sum())
        feats = per_inst.group_by("tenant", "window_start").agg(
            instances=pl.len().cast(pl.UInt32),
            conns25=pl.col("conns").sum(),
            rejected25=pl.col("rejected").sum(),
            max_instance_conns=pl.col("conns").max(),
            top_instances=pl.col("src_ip").sort_by(["conns", "src_ip"], descending=[True, False]).head(5).str.join(","),
        )
        regs = regs.group_by("tenant", "window_start", "bucket").agg(pl.col("rank").max())
        feats = feats.join(hll_estimate(regs), on=["tenant", "window_start"], how="left")
        return feats.with_columns(
            max_instance_share=pl.col("max_instance_conns") / pl.col("conns25"),
            window_start=pl.col("window_start").cast(pl.Datetime("ms", "UTC")),
            window_end=(pl.col("window_start") + self.window_ms).cast(pl.Datetime("ms", "UTC")),
            window_ms=pl.lit(self.window_ms),
            src_ip=pl.lit(None, pl.String),
            exempted=pl.lit(False),
        ).sort("window_start", "tenant")


def relative_error() -> float:
    """Standard error of the distinct-destination estimate (1.04 / sqrt(M))."""
    return 1.04 / math.sqrt(M)
