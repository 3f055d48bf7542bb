"""Window features per source IP: defined once, computed in columns with polars.

:data:`FEATURES` is the one list of feature columns; the ClickHouse table
``window_features`` derives from it and :func:`window_features` computes exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa


@dataclass(frozen=True)
class Feature:
    name: str
    clickhouse: str
    doc: str


FEATURES: tuple[Feature, ...] = (
    Feature("window_start", "DateTime64(3, 'UTC')", "window start (UTC)"),
    Feature("window_end", "DateTime64(3, 'UTC')", "window end, exclusive (UTC)"),
    Feature("window_ms", "UInt32", "window length"),
    Feature("src_ip", "String", "source key: the client address (IPv4), or the IPv6 prefix it is judged by "
                                "(the inventory's, else its /64)"),
    Feature("addresses", "UInt32", "distinct source addresses of the key in the window (IPv6 rotation shows here)"),
    Feature("top_address", "String", "the source address with the most connections"),
    Feature("tenant", "String", "tenant of the source (most frequent non-empty value)"),
    Feature("instance_id", "String", "instance id of the source where known"),
    Feature("connections", "UInt64", "SMTP connections started in the window (sampling applied)"),
    Feature("accepted", "UInt64", "connections the network accepted"),
    Feature("rejected", "UInt64", "connections the network rejected"),
    Feature("distinct_dst", "UInt32", "distinct destination addresses (fan-out)"),
    Feature("distinct_dst24", "UInt32", "distinct destination /24 (IPv4) or /48 (IPv6) networks"),
    Feature("bytes", "UInt64", "client-to-server bytes"),
    Feature("packets", "UInt64", "client-to-server packets"),
    Feature("rev_bytes", "UInt64", "server-to-client bytes where the reverse flow was seen"),
    Feature("bytes_per_conn", "Float64", "mean client-to-server bytes per connection"),
    Feature("packets_per_conn", "Float64", "mean client-to-server packets per connection"),
    Feature("mean_duration_ms", "Float64", "mean flow duration"),
    Feature("low_byte_conns", "UInt64", "connections with at most 3 packets and 300 bytes (handshake only, no mail)"),
    Feature("rejected_port25", "UInt64", "port-25 connections the network rejected (blocked attempts)"),
    Feature("rejected_dst25", "UInt32", "distinct servers of the rejected port-25 connections"),
    Feature("unanswered", "UInt64", "accepted connections with no reply seen (only meaningful where reverse flows exist)"),
    Feature("port25", "UInt64", "connections to port 25"),
    Feature("port465", "UInt64", "connections to port 465"),
    Feature("port587", "UInt64", "connections to port 587"),
    Feature("port_other", "UInt64", "connections to other configured SMTP ports"),
    Feature("top_dst", "String", "destination with the most connections"),
    Feature("top_dst_conns", "UInt64", "connections to the top destination"),
    Feature("top_dst_share", "Float64", "share of connections going to the top destination (concentration)"),
    Feature("top3_dst_conns", "UInt64", "connections to the three busiest destinations"),
    Feature("smtp_sessions", "UInt64", "connections with a visible SMTP dialogue (captures)"),
    Feature("replies_5xx", "UInt64", "5xx server replies (captures)"),
    Feature("rcpt_total", "UInt64", "RCPT TO commands (captures)"),
)

#: Columns added from the source's own history (detectors/history.py), values before the window.
HISTORY_FEATURES: tuple[Feature, ...] = (
    Feature("new_dst", "UInt32", "destinations this source had never contacted before"),
    Feature("new_dst_share", "Float64", "new_dst / distinct_dst"),
    Feature("base_conns", "Float64", "the source's usual connections per active minute (EWMA)"),
    Feature("base_distinct", "Float64", "the source's usual distinct destinations per active minute (EWMA)"),
    Feature("peak_distinct", "Float64", "the source's slowly decaying peak of distinct destinations per minute"),
    Feature("peak_conns", "Float64", "the source's slowly decaying peak of connections per minute"),
    Feature("history_minutes", "Int64", "active minutes the source has been seen before this window"),
    Feature("seen_minutes", "Int64", "minutes since the source was first seen (0: first seen in this window)"),
    Feature("learning", "Bool", "its history covers less than detect.learning_minutes: no judgement against its own past"),
    Feature("base_new", "Float64", "the source's usual never-seen destinations per active minute (EWMA, not learned "
                                   "from elevated minutes)"),
    Feature("new_excess", "Float64", "new_dst minus base_new"),
    Feature("elevated", "UInt8", "1 when new_dst is well above base_new (base_new + max(4, 2 sqrt(base_new)))"),
    Feature("rejected_new_dst25", "UInt32", "servers of rejected port-25 connections the source never tried before"),
)

#: Sums over the last 10 and 60 minutes, from the one-minute panes (detectors/horizons.py).
HORIZON_FEATURES: tuple[Feature, ...] = tuple(
    Feature(f"{name}_{h}m", ch, f"{doc} over the last {h} minutes")
    for h in (10, 60)
    for name, ch, doc in (("conns", "UInt64", "connections"), ("new_dst", "UInt64", "new destinations"),
                          ("rejected_port25", "UInt64", "rejected port-25 connections"),
                          ("rejected_new_dst25", "UInt64", "new servers of rejected port-25 connections"),
                          ("new_excess", "Float64", "new destinations above the source's usual (sum of new_excess)"),
                          ("elevated_minutes", "UInt64", "minutes with elevated novelty"),
                          ("active_minutes", "UInt64", "minutes with SMTP activity"))
)

BASE_FEATURES = FEATURES
FEATURES = BASE_FEATURES + HISTORY_FEATURES + HORIZON_FEATURES

FEATURE_NAMES = tuple(f.name for f in FEATURES)

#: Record columns the window engine keeps for feature computation.
NEEDED_COLUMNS = ("start", "end", "src_ip", "src_addr", "dst_ip", "dst_port", "action", "packets", "bytes",
                  "rev_packets", "rev_bytes", "tenant", "instance_id", "sampling_rate", "reply_first",
                  "replies_5xx", "rcpt_count")


def _net_expr() -> pl.Expr:
    ip = pl.col("dst_ip")
    v4 = ip.str.replace(r"\.\d+$", "")
    # IPv6 text is canonical (compressed); the first three hextets name the /48 when present.
    v6 = ip.str.extract(r"^([0-9a-f]{0,4}:[0-9a-f]{0,4}:[0-9a-f]{0,4})", 1)
    return pl.when(ip.str.contains(":")).then(v6.fill_null(ip)).otherwise(v4)


def window_features(rows: pl.DataFrame, window_ms: int) -> pl.DataFrame:
    """Aggregate record rows (with a ``window_start`` column in epoch ms) to one row per
    (source IP, window), with the columns of :data:`FEATURES` in order.
    """
    if rows.height == 0:
        return empty_features()
    keys = ["src_ip", "window_start"]
    weight = pl.col("sampling_rate").cast(pl.UInt64).clip(1)
    rows = rows.with_columns(
        w=weight,
        dst_net=_net_expr(),
        dur=(pl.col("end").cast(pl.Int64) - pl.col("start").cast(pl.Int64)).clip(0),
    )
    per_dst = (
        rows.group_by(keys + ["dst_ip"]).agg(n=pl.col("w").sum())
        .sort(["n", "dst_ip"], descending=[True, False])
        .group_by(keys, maintain_order=True)
        .agg(top_dst=pl.col("dst_ip").first(), top_dst_conns=pl.col("n").first(), top3_dst_conns=pl.col("n").head(3).sum())
    )
    per_addr = (
        rows.group_by(keys + ["src_addr"]).agg(n=pl.col("w").sum())
        .sort(["n", "src_addr"], descending=[True, False])
        .group_by(keys, maintain_order=True)
        .agg(top_address=pl.col("src_addr").first(), addresses=pl.len().cast(pl.UInt32))
    )
    tenant_mode = (
        rows.filter(pl.col("tenant") != "")
        .group_by(keys + ["tenant"]).agg(n=pl.len())
        .sort(["n", "tenant"], descending=[True, False])
        .group_by(keys, maintain_order=True).agg(tenant=pl.col("tenant").first())
    )
    w = pl.col("w")
    agg = rows.group_by(keys).agg(
        instance_id=pl.col("instance_id").filter(pl.col("instance_id") != "").first().fill_null(""),
        connections=w.sum(),
        accepted=w.filter(pl.col("action") == "accept").sum(),
        rejected=w.filter(pl.col("action") == "reject").sum(),
        distinct_dst=pl.col("dst_ip").n_unique().cast(pl.UInt32),
        distinct_dst24=pl.col("dst_net").n_unique().cast(pl.UInt32),
        bytes=(pl.col("bytes") * w).sum(),
        packets=(pl.col("packets") * w).sum(),
        rev_bytes=(pl.col("rev_bytes") * w).sum(),
        mean_duration_ms=pl.col("dur").mean().cast(pl.Float64),
        low_byte_conns=w.filter((pl.col("packets") <= 3) & (pl.col("bytes") <= 300)).sum(),
        rejected_port25=w.filter((pl.col("action") == "reject") & (pl.col("dst_port") == 25)).sum(),
        rejected_dst25=pl.col("dst_ip").filter((pl.col("action") == "reject") & (pl.col("dst_port") == 25))
        .n_unique().cast(pl.UInt32),
        unanswered=w.filter((pl.col("action") == "accept") & (pl.col("rev_packets") == 0)).sum(),
        port25=w.filter(pl.col("dst_port") == 25).sum(),
        port465=w.filter(pl.col("dst_port") == 465).sum(),
        port587=w.filter(pl.col("dst_port") == 587).sum(),
        port_other=w.filter(~pl.col("dst_port").is_in([25, 465, 587])).sum(),
        smtp_sessions=w.filter(pl.col("reply_first").is_not_null()).sum(),
        replies_5xx=(pl.col("replies_5xx").fill_null(0).cast(pl.UInt64) * w).sum(),
        rcpt_total=(pl.col("rcpt_count").fill_null(0).cast(pl.UInt64) * w).sum(),
    )
    out = (
        agg.join(per_dst, on=keys, how="left")
        .join(per_addr, on=keys, how="left")
        .join(tenant_mode, on=keys, how="left")
        .with_columns(
            tenant=pl.col("tenant").fill_null(""),
            window_ms=pl.lit(window_ms, pl.UInt32),
            window_end=pl.col("window_start") + window_ms,
            bytes_per_conn=pl.col("bytes") / pl.col("connections"),
            packets_per_conn=pl.col("packets") / pl.col("connections"),
            top_dst_share=pl.col("top_dst_conns") / pl.col("connections"),
        )
    )
    return _typed(out, BASE_FEATURES).sort(["window_start", "src_ip"])


_POLARS_TYPES = {
    "DateTime64(3, 'UTC')": pl.Datetime("ms", "UTC"),
    "UInt32": pl.UInt32,
    "UInt64": pl.UInt64,
    "Float64": pl.Float64,
    "String": pl.String,
    "Int64": pl.Int64,
    "UInt8": pl.UInt8,
    "Bool": pl.Boolean,
}


def _typed(df: pl.DataFrame, features: tuple[Feature, ...]) -> pl.DataFrame:
    exprs = []
    for f in features:
        t = _POLARS_TYPES[f.clickhouse]
        if f.name not in df.columns:
            exprs.append(pl.lit(0).cast(t).alias(f.name))
            continue
        col = pl.col(f.name)
        if isinstance(t, pl.Datetime) and df.schema[f.name] != t:
            col = col.cast(pl.Int64).cast(t)
        exprs.append(col.fill_null(0).cast(t) if t in (pl.UInt8, pl.UInt32, pl.UInt64) else col.cast(t))
    return df.select(exprs)


def empty_features() -> pl.DataFrame:
    return pl.DataFrame(schema={f.name: _POLARS_TYPES[f.clickhouse] for f in FEATURES})


def to_store(features: pl.DataFrame) -> pa.Table:
    """The columns of :data:`FEATURES`, typed, for the ``window_features`` table."""
    return _typed(features, FEATURES).to_arrow()
