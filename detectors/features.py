"""Window features per source IP: defined once, computed in columns with polars.

:data:`FEATURES` is the one list of feature columns; the ClickHouse table
``window_features`` derives from it and :func:`window_features` computes exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard.core.frames import encode

from .tenants import dst_hash


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
RECORD_COLUMNS = ("start", "end", "src_ip", "dst_ip", "dst_port", "action", "packets", "bytes", "rev_packets",
                  "rev_bytes", "tenant", "instance_id", "sampling_rate", "reply_first", "replies_5xx", "rcpt_count")
#: What the window engine keeps per row: the record columns, ``src_addr`` (the address where the key
#: is a prefix: :meth:`smtpguard.core.inventory.SourceKeys.apply`), ``conn_weight`` (for packet
#: samples, the connections a row stands for: :func:`connection_weights`; null for flow records) and
#: ``tenant_filled`` (the record had no tenant and the inventory's is used: the store's rollups keep
#: the record's own, as ``flows`` does).
NEEDED_COLUMNS = RECORD_COLUMNS + ("src_addr", "conn_weight", "tenant_filled")


def connection_weights(records: pa.Table) -> pl.Series | None:
    """``conn_weight`` of record rows, or None when none is a packet sample. A packet sample (sFlow)
    is one packet, not one connection: it stands for ``sampling_rate`` connections when it is a
    connection's first packet (TCP SYN without ACK), for none otherwise; its packets and bytes still
    weigh its sampling rate (docs/DETECTION.md, sampling)."""
    fmt = records.column("source_format")
    if not pc.any(pc.equal(fmt, "sflow")).as_py():
        return None
    df = pl.from_arrow(records.select(["source_format", "tcp_flags", "sampling_rate"]))
    syn = (pl.col("tcp_flags").fill_null(0) & 0x12) == 0x02
    return df.select(pl.when(pl.col("source_format") == "sflow")
                     .then(pl.col("sampling_rate").cast(pl.UInt32) * syn.cast(pl.UInt32))
                     .otherwise(None).alias("conn_weight")).to_series()


#: features that are sums weighted by the sampling rate: under packet sampling each is N times a count of
#: samples, an estimate whose lower bound detectors judge (:func:`lower_bounds`)
SAMPLED_COUNTS = ("connections", "accepted", "rejected", "bytes", "packets", "rev_bytes", "rejected_port25",
                  "unanswered", "port25", "port465", "port587", "port_other", "top_dst_conns", "top3_dst_conns",
                  "conns_10m", "conns_60m", "rejected_port25_10m", "rejected_port25_60m")
#: of those, the largest per destination: the busiest of many noisy counts is picked for being high, so their
#: bound is taken over every destination the samples saw (a Bonferroni bound)
SELECTED_COUNTS = ("top_dst_conns", "top3_dst_conns")
#: novelty judged against the source's own usual: a destination enters a source's familiar set only when a
#: sample of it is seen, so under packet sampling a recurring destination keeps looking new; these are not
#: judged on packet-sampled windows (0 for the detectors)
SAMPLED_UNJUDGED = ("elevated", "new_excess", "elevated_minutes_10m", "elevated_minutes_60m", "new_excess_10m",
                    "new_excess_60m")


def sample_support(rows: pl.DataFrame) -> pl.DataFrame | None:
    """Per (window_start, src_ip) estimated from packet samples at 1 in N > 1: ``sampling_rate`` (the
    highest N) and ``samples``; None when no row is such a sample."""
    if "conn_weight" not in rows.columns or rows["conn_weight"].null_count() == rows.height:
        return None
    est = (rows.filter(pl.col("conn_weight").is_not_null() & (pl.col("sampling_rate") > 1))
           .group_by("window_start", "src_ip").agg(sampling_rate=pl.col("sampling_rate").max().cast(pl.UInt32),
                                                   samples=pl.len().cast(pl.UInt32)))
    return est if est.height else None


def poisson_lower(k: np.ndarray, confidence: float | np.ndarray) -> np.ndarray:
    """The exact one-sided lower bound, at ``confidence`` (one value or one per count), of a Poisson
    mean from ``k`` observed events (0 for k = 0): the mean below which seeing ``k`` or more has
    probability ``1 - confidence``."""
    from scipy.special import gammaincinv

    k = np.asarray(k, dtype=np.float64)
    alpha = np.broadcast_to(1.0 - np.asarray(confidence, dtype=np.float64), k.shape)
    out = np.zeros_like(k)
    pos = k > 0
    out[pos] = gammaincinv(k[pos], alpha[pos])
    return out


def lower_bounds(features: pl.DataFrame, support: pl.DataFrame, confidence: float) -> pl.DataFrame:
    """``features`` with each :data:`SAMPLED_COUNTS` column of a window estimated from packet samples
    (``support``: :func:`sample_support`) replaced by the lower bound of its estimate: a count of
    ``N * k`` (k samples at 1 in N) becomes ``N * poisson_lower(k)``, at ``confidence`` divided over
    the destinations seen for :data:`SELECTED_COUNTS`; :data:`SAMPLED_UNJUDGED` are 0 there. Other
    rows are unchanged; the rows estimated gain ``sampling_rate`` and ``samples`` (null elsewhere)."""
    out = features.join(support.with_columns(pl.col("window_start").cast(features.schema["window_start"])),
                        on=["window_start", "src_ip"], how="left", maintain_order="left")
    rate = out["sampling_rate"].fill_null(1).cast(pl.Float64).to_numpy()
    hit = out["sampling_rate"].is_not_null().to_numpy()
    if not hit.any():
        return out
    cols = []
    seen = np.maximum(out["distinct_dst"].fill_null(1).cast(pl.Float64).to_numpy(), 1)
    for c in SAMPLED_COUNTS:
        if c not in out.columns:
            continue
        v = out[c].cast(pl.Float64).fill_null(0).to_numpy()
        k = np.rint(v / rate)
        low = poisson_lower(k, 1 - (1 - confidence) / seen if c in SELECTED_COUNTS else confidence)
        cols.append(pl.Series(c, np.where(hit, np.floor(rate * low), v)).cast(out.schema[c]))
    for c in SAMPLED_UNJUDGED:
        if c in out.columns:
            cols.append(pl.when(pl.Series(hit)).then(pl.lit(0, out.schema[c])).otherwise(pl.col(c)).alias(c))
    return out.with_columns(cols)


BITS = 16384
"""width of a source's familiar-destination set (detectors/history.py)"""


def _net_of(ip: pl.Expr) -> pl.Expr:
    """The destination network a fan-out counts: the /24 of an IPv4 address, the /48 of an IPv6 one."""
    v4 = ip.str.replace(r"\.\d+$", "")
    # IPv6 text is canonical (compressed); the first three hextets name the /48 when present.
    v6 = ip.str.extract(r"^([0-9a-f]{0,4}:[0-9a-f]{0,4}:[0-9a-f]{0,4})", 1)
    return pl.when(ip.str.contains(":")).then(v6.fill_null(ip)).otherwise(v4)


@dataclass
class Closed:
    """What closing windows hands to the stages after it (:func:`close_windows`)."""

    features: pl.DataFrame
    """one row per (source, window): the columns of :data:`FEATURES`, sorted by window start then source"""
    pairs: pl.DataFrame
    """the (source, destination) pairs of each feature row, for the source history: ``row`` (the feature
    row), ``bit`` (the destination's position in a familiar-destination set of :data:`BITS` bits) and
    ``rej`` (a rejected port-25 connection), sorted by ``row``"""
    tenant_rows: pl.DataFrame
    """port-25 traffic of sources with a tenant, one row per (tenant, window, source, destination):
    ``tenant``, ``window_start`` (ms), ``src_ip``, ``dst_hash``, ``conns``, ``rejected`` (for
    :class:`detectors.tenants.TenantStage`)"""


_NO_PAIRS = {"row": pl.Int64, "bit": pl.Int64, "rej": pl.Boolean}
_NO_TENANT_ROWS = {"tenant": pl.String, "window_start": pl.Int64, "src_ip": pl.String, "dst_hash": pl.UInt64,
                   "conns": pl.UInt32, "rejected": pl.UInt32}


def close_windows(rows: pl.DataFrame, window_ms: int) -> Closed:
    """Aggregate record rows (with a ``window_start`` column in epoch ms) to one row per
    (source IP, window), with the columns of :data:`FEATURES` in order; with the pairs and
    tenant rows the later stages need (:class:`Closed`).

    Every group-by runs on one integer key: the source, destination, tenant, instance and address
    strings are dictionary-encoded once (sorted, so ties still break by the string); the (window,
    source) pair is one integer whose order is the output's order. Rows are first reduced to one per
    (window, source, destination), which carries every sum; the windows are built from those.
    Strings come back only for the output.
    """
    if rows.height == 0:
        return Closed(empty_features(), pl.DataFrame(schema=_NO_PAIRS), pl.DataFrame(schema=_NO_TENANT_ROWS))
    srcs, src = encode(rows["src_ip"])
    dsts, dst = encode(rows["dst_ip"])
    _nets, net_of_dst = encode(pl.select(_net_of(pl.lit(dsts))).to_series())
    ws = rows["window_start"].cast(pl.Int64)
    ws0 = int(ws.min())
    nsrc, ndst = len(srcs), len(dsts)
    nkeys = (int(ws.max()) - ws0) // window_ms * nsrc + nsrc
    if nkeys * ndst >= 1 << 63:
        raise ValueError(f"too many windows in one close ({nkeys:,} source windows x {ndst:,} destinations)")
    key = ((ws - ws0) // window_ms).cast(pl.UInt64) * nsrc + src.cast(pl.UInt64)

    # sampled flows weigh their sampling rate; unsampled ones (most) skip the multiplications. Connection
    # counts weigh ``cw``: the sampling rate, or for packet samples the connections they stand for
    samples = "conn_weight" in rows.columns and rows["conn_weight"].null_count() < rows.height
    sampled = int(rows["sampling_rate"].max() or 1) > 1 or samples
    w = pl.col("w")
    cw = pl.col("cw")
    port = pl.col("dst_port")
    accept, reject = pl.col("action") == "accept", pl.col("action") == "reject"

    def wif(mask: pl.Expr) -> pl.Expr:
        return cw * mask.cast(pl.UInt64) if sampled else mask.cast(pl.UInt64)

    def times_w(col: str) -> pl.Expr:
        c = pl.col(col).fill_null(0).cast(pl.UInt64)
        return c * w if sampled else c

    tenants, tenant = encode(rows["tenant"])
    no_tenant = int(tenants.search_sorted("")) if (tenants == "").any() else -1

    base = pl.DataFrame({"k": key, "d": dst, "t": tenant}).hstack(rows.select(
        "dst_port", "action", "packets", "bytes", "rev_bytes", "rev_packets", "start", "end", "reply_first",
        "replies_5xx", "rcpt_count", "sampling_rate", "instance_id",
        *(["conn_weight"] if samples else []))).lazy()
    # the sums every window carries; those that are zero in this batch (no capture fields in flow logs,
    # ports not seen) are not computed
    ports = set(rows["dst_port"].unique().to_list())
    sum_exprs = {
        "accepted": wif(accept), "rejected": wif(reject),
        "bytes": times_w("bytes"), "packets": times_w("packets"), "rev_bytes": times_w("rev_bytes"),
        # a packet sample is one packet of a connection: it cannot tell a handshake-only connection
        "low_byte_conns": wif((pl.col("packets") <= 3) & (pl.col("bytes") <= 300)
                              & (pl.col("conn_weight").is_null() if samples else pl.lit(True))),
        "rejected_port25": wif(reject & (port == 25)),
        "unanswered": wif(accept & (pl.col("rev_packets") == 0)),
        "port25": wif(port == 25), "port465": wif(port == 465), "port587": wif(port == 587),
        "port_other": wif(~port.is_in([25, 465, 587])),
        "smtp_sessions": wif(pl.col("reply_first").is_not_null()),
        "replies_5xx": times_w("replies_5xx"), "rcpt_total": times_w("rcpt_count"),
    }
    zero = {"port25": 25 not in ports, "port465": 465 not in ports, "port587": 587 not in ports,
            "port_other": not ports - {25, 465, 587},
            "smtp_sessions": rows["reply_first"].null_count() == rows.height,
            "replies_5xx": rows["replies_5xx"].null_count() == rows.height,
            "rcpt_total": rows["rcpt_count"].null_count() == rows.height}
    sums = tuple(c for c in sum_exprs if not zero.get(c))
    base = base.with_columns(w=pl.col("sampling_rate").cast(pl.UInt64).clip(1)).with_columns(
        cw=pl.col("conn_weight").cast(pl.UInt64).fill_null(w) if samples else w).select(
        kd=pl.col("k") * ndst + pl.col("d").cast(pl.UInt64),
        w=cw,
        dur=(pl.col("end").cast(pl.Int64) - pl.col("start").cast(pl.Int64)).clip(0),
        **{c: sum_exprs[c] for c in sums},
        # the first row with an instance id names the window's instance
        irow=pl.when(pl.col("instance_id") != "").then(pl.int_range(pl.len(), dtype=pl.UInt32)),
        t=pl.col("t"),
        p25=(port == 25).cast(pl.UInt32), r25=(reject & (port == 25)).cast(pl.UInt32),
        # a tenant's connections: a flow record is one, a packet sample the connections it stands for
        **({"c25": (port == 25).cast(pl.UInt64) * cw, "cr25": (reject & (port == 25)).cast(pl.UInt64) * cw}
           if samples else {}),
    )
    per_dst = base.group_by("kd").agg(
        pl.col("w").sum().alias("n"), *[pl.col(c).sum() for c in sums],
        dur=pl.col("dur").sum(), rows=pl.len(), irow=pl.col("irow").min(),
        t=pl.col("t").min(), t_hi=pl.col("t").max(), n25=pl.col("p25").sum(), r25=pl.col("r25").sum(),
        **({"c25": pl.col("c25").sum(), "cr25": pl.col("cr25").sum()} if samples else {}),
    ).with_columns(k=pl.col("kd") // ndst, d=(pl.col("kd") % ndst).cast(pl.UInt32)).collect()
    per_dst = per_dst.with_columns(net=net_of_dst.gather(per_dst["d"]))
    by_key = per_dst.lazy().group_by("k").agg(
        connections=pl.col("n").sum(), *[pl.col(c).sum() for c in sums],
        mean_duration_ms=pl.col("dur").sum().cast(pl.Float64) / pl.col("rows").sum(),
        irow=pl.col("irow").min(),
        distinct_dst=pl.len().cast(pl.UInt32),
        distinct_dst24=pl.col("net").n_unique().cast(pl.UInt32),
        rejected_dst25=(pl.col("rejected_port25") > 0).sum().cast(pl.UInt32),
        d_top=pl.col("d").sort_by(["n", "d"], descending=[True, False]).first(),
        top_dst_conns=pl.col("n").max(),
        top3_dst_conns=pl.col("n").top_k(3).sum(),
    ).sort("k")
    out = by_key.collect()
    k = out["k"]
    # the (source, destination) pairs of each output row, for the source history
    bit_of_dst = (dsts.hash(seed=7) % BITS).cast(pl.Int64)
    pairs = pl.DataFrame({"row": k.search_sorted(per_dst["k"]).cast(pl.Int64),
                          "bit": bit_of_dst.gather(per_dst["d"]),
                          "rej": per_dst["rejected_port25"] > 0}).sort("row")
    out = out.with_columns(
        src_ip=srcs.gather(k % nsrc),
        window_start=(k // nsrc).cast(pl.Int64) * window_ms + ws0,
        top_dst=dsts.gather(out["d_top"]),
        instance_id=rows["instance_id"].gather(out["irow"]).fill_null(""),
    )
    if (per_dst["t"] == per_dst["t_hi"]).all():
        # one tenant per (window, source, destination), as records of one source have: counted from the pairs
        named = per_dst.lazy().filter(pl.col("t") != no_tenant)
        mode = named.group_by("k", "t").agg(n=pl.col("rows").sum())
        conns, rejected = ("c25", "cr25") if samples else ("n25", "r25")
        t25 = (named.filter(pl.col("n25") > 0)
               .select("k", "t", "d", conns=pl.col(conns).cast(pl.UInt32), rejected=pl.col(rejected).cast(pl.UInt32))
               .collect())
    else:
        tw = rows["conn_weight"].fill_null(1) if samples else pl.repeat(1, rows.height, dtype=pl.UInt32, eager=True)
        named = pl.DataFrame({"k": key, "t": tenant, "d": dst, "tw": tw}).hstack(rows.select("dst_port", "action")) \
            .lazy().filter(pl.col("t") != no_tenant)
        mode = named.group_by("k", "t").agg(n=pl.len())
        t25 = (named.filter(pl.col("dst_port") == 25)
               .group_by("k", "t", "d").agg(conns=pl.col("tw").sum().cast(pl.UInt32),
                                            rejected=pl.col("tw").filter(pl.col("action") == "reject").sum()
                                            .cast(pl.UInt32))
               .collect())
    mode = _top(mode, "t").collect()
    out = out.join(mode.select("k", tenant=tenants.gather(mode["top"])), on="k", how="left", maintain_order="left")
    tenant_rows = pl.DataFrame({
        "tenant": tenants.gather(t25["t"]),
        "window_start": (t25["k"] // nsrc).cast(pl.Int64) * window_ms + ws0,
        "src_ip": srcs.gather(t25["k"] % nsrc),
        "dst_hash": dst_hash(dsts).gather(t25["d"]),
        "conns": t25["conns"], "rejected": t25["rejected"],
    }, schema=_NO_TENANT_ROWS)
    addr = _addresses(rows, key, rows["sampling_rate"].cast(pl.UInt64).clip(1))
    if addr is None:
        out = out.with_columns(addresses=pl.lit(1, pl.UInt32), top_address=pl.col("src_ip"))
    else:
        out = out.join(addr, on="k", how="left", maintain_order="left").with_columns(
            addresses=pl.col("addresses").fill_null(1), top_address=pl.col("top_address").fill_null(pl.col("src_ip")))
    out = out.with_columns(
        tenant=pl.col("tenant").fill_null(""),
        window_ms=pl.lit(window_ms, pl.UInt32),
        window_end=pl.col("window_start") + window_ms,
        # a window of packet samples none of which opened a connection has none: its ratios are 0
        bytes_per_conn=_per_conn("bytes"),
        packets_per_conn=_per_conn("packets"),
        top_dst_share=_per_conn("top_dst_conns"),
    )
    return Closed(_typed(out, BASE_FEATURES), pairs, tenant_rows)


def _per_conn(col: str) -> pl.Expr:
    conns = pl.col("connections")
    return pl.when(conns > 0).then(pl.col(col) / conns).otherwise(0.0)


def window_features(rows: pl.DataFrame, window_ms: int) -> pl.DataFrame:
    """Aggregate record rows (with a ``window_start`` column in epoch ms) to one row per
    (source IP, window), with the columns of :data:`FEATURES` in order."""
    return close_windows(rows, window_ms).features


def _top(frame: pl.LazyFrame, value: str) -> pl.LazyFrame:
    """Per ``k``: the ``value`` with the largest ``n`` (ties: the smallest code, so the smallest string),
    and how many values the key has."""
    return frame.group_by("k").agg(top=pl.col(value).sort_by(["n", value], descending=[True, False]).first(),
                                   count=pl.len().cast(pl.UInt32))


def _addresses(rows: pl.DataFrame, key: pl.Series, w: pl.Series) -> pl.DataFrame | None:
    """``addresses`` and ``top_address`` of the keys that name a network (IPv6 prefixes): their rows carry
    the address in ``src_addr``. A key is either an address (``src_addr`` null) or a network, never both.
    None when no key is a network (one address each)."""
    if "src_addr" not in rows.columns:
        return None
    has = rows["src_addr"].is_not_null()
    if not has.any():
        return None
    addrs, addr = encode(rows["src_addr"].filter(has))
    per = pl.DataFrame({"k": key.filter(has), "a": addr, "w": w.filter(has)}).lazy().group_by("k", "a").agg(
        n=pl.col("w").sum())
    got = _top(per, "a").collect()
    return got.select("k", top_address=addrs.gather(got["top"]), addresses=pl.col("count"))


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
