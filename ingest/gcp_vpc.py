"""Google Cloud VPC Flow Logs as exported from Cloud Logging (one ``LogEntry`` JSON
object per line) → records.

A pure parser: :class:`GcpVpcParser` is fed consecutive chunks of lines; it keeps no
state between chunks.

Fields read
    ``jsonPayload.connection.{src_ip, dest_ip, src_port, dest_port, protocol}``,
    ``jsonPayload.{bytes_sent, packets_sent, start_time, end_time, reporter}``,
    ``jsonPayload.src_instance`` / ``dest_instance`` ``{project_id, vm_name}`` and
    ``resource.labels.project_id``. Cloud Logging writes int64 values as JSON strings
    (``"bytes_sent": "1776"``); numbers are accepted too. Timestamps are RFC 3339 in
    UTC with up to nanoseconds, cut to milliseconds. Ports are absent for protocols
    without ports (0 in the record).
Mapping
    ``tenant`` = project of the source instance, else the log's resource project;
    ``instance_id`` = the source VM name; ``action`` is ``unknown`` (flow logs sample
    traffic, they do not say what a firewall decided).
Reporters
    A flow between two VMs is reported by both ends (``reporter`` SRC and DEST). Within
    a chunk, reports with the same 5-tuple and ``start_time`` are one flow: the SRC
    report is kept (then SRC_GATEWAY, DEST, DEST_GATEWAY) and the others are skipped.
    The two ends sample on their own, so their reports of one flow can differ in
    start time; those are not recognised as one flow.
SMTP selection (``smtp_ports`` not None)
    Flows to an SMTP port are kept; a flow from an SMTP port (server to client) is
    paired with the forward flow of the chunk with the reversed 5-tuple in the same
    client project (the k-th with the k-th) and its packets and bytes become
    ``rev_packets`` / ``rev_bytes`` (:func:`smtpguard.ingest.selection.pair_reverse`).
    Reverse flows, duplicates and other ports are skipped. With ``smtp_ports=None`` every
    flow is kept as is.
Entries of other logs in the same export (``logName`` not ``.../vpc_flows``) are skipped.
"""

from __future__ import annotations

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa

from smtpguard.ingest.base import Batch
from smtpguard.ingest.columns import (
    MAX_COUNTER,
    MAX_ID_CHARS,
    ColumnParser,
    datetime_exprs,
    datetime_maps,
    datetime_us,
    int_problem,
    json_problem,
    lines_to_arrow,
    ms_timestamps,
    np_,
    short,
)
from smtpguard.ingest.selection import pair_reverse, smtp_directions
from smtpguard.core.iputil import canonical_ip, canonicalize_ips

NAME = "gcp-vpc"
#: Longest line accepted (a flow log entry with every metadata field is ~3 KB).
MAX_LINE_CHARS = 65536
#: Which report of a flow is kept when several ends reported it (lower first).
REPORTER_RANK = {"SRC": 0, "SRC_GATEWAY": 1, "DEST": 2, "DEST_GATEWAY": 3}
_RFC3339_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$"


class _Connection(msgspec.Struct, gc=False):
    src_ip: str | None = None
    dest_ip: str | None = None
    src_port: int | None = None
    dest_port: int | None = None
    protocol: int | None = None


class _Instance(msgspec.Struct, gc=False):
    project_id: str | None = None
    vm_name: str | None = None


class _Payload(msgspec.Struct, gc=False):
    connection: _Connection | None = None
    bytes_sent: str | int | None = None
    packets_sent: str | int | None = None
    start_time: str | None = None
    end_time: str | None = None
    reporter: str | None = None
    src_instance: _Instance | None = None
    dest_instance: _Instance | None = None


class _Labels(msgspec.Struct, gc=False):
    project_id: str | None = None


class _Resource(msgspec.Struct, gc=False):
    labels: _Labels | None = None


class _Entry(msgspec.Struct, gc=False):
    jsonPayload: _Payload | None = None
    resource: _Resource | None = None
    logName: str | None = None


_DECODE = msgspec.json.Decoder(_Entry).decode
_EMPTY_INSTANCE = _Instance()


def _text(v: str | int | None) -> str | None:
    return v if v is None or isinstance(v, str) else str(v)


def _entry_problem(e: _Entry) -> str | None:
    """Why a decoded entry cannot become a record (the Python twin of the vector checks)."""
    p = e.jsonPayload
    if p is None:
        return "missing jsonPayload"
    c = p.connection
    if c is None:
        return "missing jsonPayload.connection"
    for name, v in (("src_ip", c.src_ip), ("dest_ip", c.dest_ip)):
        if v is None:
            return f"missing connection.{name}"
        if canonical_ip(v) is None:
            return f"invalid IP address in connection.{name}: {short(v)}"
    for name, v, top in (
        ("src_port", c.src_port, 65535),
        ("dest_port", c.dest_port, 65535),
        ("protocol", c.protocol, 255),
    ):
        if v is None and name == "protocol":
            return "missing connection.protocol"
        if v is not None:
            why = int_problem(f"connection.{name}", v, top)
            if why:
                return why
    for name, v in (("bytes_sent", p.bytes_sent), ("packets_sent", p.packets_sent)):
        why = int_problem(name, v, MAX_COUNTER)
        if why:
            return why
    for name, v in (("start_time", p.start_time), ("end_time", p.end_time)):
        if v is None:
            return f"missing {name}"
        us, ok = datetime_us(pl.Series([v]), _RFC3339_RE)
        if not ok[0]:
            return f"invalid {name}: {short(v)} (expected RFC 3339 UTC, e.g. 2019-06-14T03:45:37.186193305Z)"
    st, _ = datetime_us(pl.Series([p.start_time]), _RFC3339_RE)
    en, _ = datetime_us(pl.Series([p.end_time]), _RFC3339_RE)
    if en[0] < st[0]:
        return f"end_time before start_time: {p.start_time} > {p.end_time}"
    if p.reporter is not None and p.reporter not in REPORTER_RANK:
        return f"unknown reporter: {short(p.reporter)} (expected SRC, DEST, SRC_GATEWAY or DEST_GATEWAY)"
    for name, inst in (("src_instance", p.src_instance), ("dest_instance", p.dest_instance)):
        if inst is not None:
            for f in ("project_id", "vm_name"):
                v = getattr(inst, f)
                if v is not None and len(v) > MAX_ID_CHARS:
                    return f"{name}.{f} too long: {len(v)} chars (limit {MAX_ID_CHARS})"
    return None


class GcpVpcParser(ColumnParser):
    """Parser for GCP VPC Flow Logs (Cloud Logging JSON lines); see the module docstring."""

    name = NAME

    def parse_lines(self, lines: list[str], first_line_no: int) -> Batch:
        n = len(lines)
        if n == 0:
            return Batch.empty()
        problems: list[tuple[int, str]] = []
        raws: dict[int, str] = {}
        entries: list[_Entry] | None = None
        if all(type(line) is str for line in lines) and max(map(len, lines)) <= MAX_LINE_CHARS:
            try:  # the common case: every line is a well-formed entry
                entries = [_DECODE(line) for line in lines]
                rows = list(range(n))
                read, skipped = n, 0
            except msgspec.MsgspecError:
                entries = None
        if entries is None:
            rows, entries, read, skipped, raws = self._decode_lines(lines, problems)

        # entries of other logs, or without a connection, leave before the columns are built
        if any(e.jsonPayload is None or e.jsonPayload.connection is None for e in entries):
            keep_rows, keep_entries = [], []
            for i, e in zip(rows, entries):
                if e.jsonPayload is not None and e.jsonPayload.connection is not None:
                    keep_rows.append(i)
                    keep_entries.append(e)
                elif e.logName is not None and not e.logName.endswith("vpc_flows"):
                    skipped += 1  # another log in the same export
                else:
                    problems.append((i, _entry_problem(e) or "invalid entry"))
            rows, entries = keep_rows, keep_entries

        table = self._fill.table({}, 0)
        if entries:
            good, cols, nskip, bad = self._decode(entries)
            skipped += nskip
            for j in bad.tolist():
                problems.append((rows[j], _entry_problem(entries[j]) or "invalid entry"))
            table = self._fill.table(cols, len(good))
        return self._batch(table, problems, lines, raws, first_line_no, read, skipped)

    @staticmethod
    def _decode_lines(
        lines: list, problems: list[tuple[int, str]]
    ) -> tuple[list[int], list[_Entry], int, int, dict[int, str]]:
        """Decode line by line, explaining every line that is not an entry."""
        arr, forced, raws = lines_to_arrow(lines)
        problems.extend(forced.items())
        rows: list[int] = []
        entries: list[_Entry] = []
        read = 0
        for i, line in enumerate(lines):
            if i in forced:
                read += 1
                continue
            text = line if isinstance(line, str) else arr[i].as_py()
            if not text.strip(" \t\n\v\f\r"):  # blank as in the other formats: other whitespace is input
                continue
            read += 1
            if len(text) > MAX_LINE_CHARS:
                problems.append((i, f"line too long: {len(text)} chars (limit {MAX_LINE_CHARS})"))
                continue
            try:
                e = _DECODE(text)
            except msgspec.DecodeError as err:
                problems.append((i, json_problem(err)))
                continue
            rows.append(i)
            entries.append(e)
        return rows, entries, read, 0, raws

    def _decode(self, entries: list[_Entry]) -> tuple[np.ndarray, dict[str, pa.Array], int, np.ndarray]:
        """Columns of decoded entries: (positions kept, record columns, skipped, positions rejected)."""
        m = len(entries)
        pays = [e.jsonPayload for e in entries]
        conns = [p.connection for p in pays]
        srci = [p.src_instance or _EMPTY_INSTANCE for p in pays]
        dsti = [p.dest_instance or _EMPTY_INSTANCE for p in pays]
        labels = [e.resource.labels if e.resource is not None else None for e in entries]

        def strings(vals: list) -> pa.Array:
            try:
                return pa.array(vals, pa.string())
            except (pa.ArrowException, TypeError):  # int64 values written as numbers
                return pa.array([_text(v) for v in vals], pa.string())

        def ints(vals: list) -> pa.Array:
            try:
                return pa.array(vals, pa.int64())
            except (pa.ArrowException, OverflowError):  # beyond 64 bits: out of range anyway
                return pa.array([v if v is None or -(2**63) <= v < 2**63 else -1 for v in vals], pa.int64())

        table = pa.table(
            {
                "src": strings([c.src_ip for c in conns]),
                "dst": strings([c.dest_ip for c in conns]),
                "sport": ints([c.src_port for c in conns]),
                "dport": ints([c.dest_port for c in conns]),
                "proto": ints([c.protocol for c in conns]),
                "st": strings([p.start_time for p in pays]),
                "et": strings([p.end_time for p in pays]),
                "rep": strings([p.reporter for p in pays]),
                "sproj": strings([i.project_id for i in srci]),
                "dproj": strings([i.project_id for i in dsti]),
                "svm": strings([i.vm_name for i in srci]),
                "rproj": strings([lab.project_id if lab is not None else None for lab in labels]),
                "bytes": strings([p.bytes_sent for p in pays]),
                "pkts": strings([p.packets_sent for p in pays]),
            }
        )
        df = pl.from_arrow(table)
        assert isinstance(df, pl.DataFrame)
        c = pl.col
        maps = datetime_maps(pl.concat([df["st"], df["et"]]).drop_nulls())
        st_parts, st_us, st_ok = datetime_exprs("st", _RFC3339_RE, None, maps)
        et_parts, et_us, et_ok = datetime_exprs("et", _RFC3339_RE, None, maps)
        known = c("rep").replace_strict(REPORTER_RANK, default=9, return_dtype=pl.Int8)

        def counter(name: str) -> tuple[pl.Expr, pl.Expr]:
            # the cast takes digits only (and a leading "+", refused here)
            v = c(name).cast(pl.UInt64, strict=False)
            return v.fill_null(0), v.is_not_null() & ~c(name).str.starts_with("+")

        def within(name: str, top: int, required: bool) -> pl.Expr:
            ok = (c(name) >= 0) & (c(name) <= top)
            return ok.fill_null(not required)

        nbytes, bytes_ok = counter("bytes")
        npkts, pkts_ok = counter("pkts")
        long = pl.any_horizontal([c(f).str.len_chars() > MAX_ID_CHARS for f in ("sproj", "dproj", "svm")]).fill_null(
            False
        )
        q = (
            df.lazy()
            .with_columns(**st_parts, **et_parts)
            .select(
                sport=c("sport").fill_null(0).clip(0, 65535).cast(pl.Int32),
                dport=c("dport").fill_null(0).clip(0, 65535).cast(pl.Int32),
                proto=c("proto").fill_null(0).clip(0, 255).cast(pl.Int32),
                bytes=nbytes,
                pkts=npkts,
                start_us=st_us,
                end_us=et_us,
                rank=pl.when(c("rep").is_null()).then(pl.lit(4, pl.Int8)).otherwise(known),
                ok=(
                    within("sport", 65535, False)
                    & within("dport", 65535, False)
                    & within("proto", 255, True)
                    & bytes_ok
                    & pkts_ok
                    & st_ok
                    & et_ok
                    & (et_us >= st_us)
                    & ~long
                ).fill_null(False),
                tenant=pl.coalesce("sproj", "rproj").fill_null(""),
                client_scope=pl.coalesce("dproj", "rproj").fill_null(""),
                svm=c("svm").fill_null(""),
            )
            .collect()
        )
        ok = np_(q["ok"]).astype(bool) & (np_(q["rank"]) != 9)
        src, src_ok = canonicalize_ips(table["src"].combine_chunks().fill_null(""))
        dst, dst_ok = canonicalize_ips(table["dst"].combine_chunks().fill_null(""), check=src_ok)
        ok &= src_ok & dst_ok
        bad = np.flatnonzero(~ok)
        sport, dport, proto = (np_(q[k]).astype(np.int32) for k in ("sport", "dport", "proto"))

        # one flow reported by both ends: keep the best-ranked report
        valid = np.flatnonzero(ok)
        kf = pl.DataFrame(
            {
                "src": pl.from_arrow(src.take(pa.array(valid))),
                "dst": pl.from_arrow(dst.take(pa.array(valid))),
                "sp": sport[valid],
                "dp": dport[valid],
                "pr": proto[valid],
                "st": q["start_us"].gather(valid),
                "rank": q["rank"].gather(valid),
                "pos": valid,
            }
        )
        first = kf.sort(["rank", "pos"]).unique(subset=["src", "dst", "sp", "dp", "pr", "st"], keep="first")
        kept = np.zeros(m, dtype=bool)
        kept[first["pos"].to_numpy()] = True
        skipped = int(valid.size - kept.sum())

        tenant = q["tenant"].to_arrow()
        counters = {k: np_(q[k]).astype(np.uint64) for k in ("bytes", "pkts")}
        rev_packets = np.zeros(m, dtype=np.uint64)
        rev_bytes = np.zeros(m, dtype=np.uint64)
        sel = kept
        if self.smtp_ports is not None:
            fwd, rev = smtp_directions(sport, dport, self.smtp_ports)
            fwd &= kept
            rev &= kept
            fi, ri = pair_reverse(src, dst, sport, dport, proto, fwd, rev, [tenant], [q["client_scope"].to_arrow()])
            rev_packets[fi] = counters["pkts"][ri]
            rev_bytes[fi] = counters["bytes"][ri]
            skipped += int(kept.sum() - fwd.sum())
            sel = fwd
        idx = np.flatnonzero(sel)
        keep = pa.array(sel)
        cols = {
            "start": ms_timestamps(np_(q["start_us"]).astype(np.int64)[idx] // 1000),
            "end": ms_timestamps(np_(q["end_us"]).astype(np.int64)[idx] // 1000),
            "src_ip": src.filter(keep),
            "dst_ip": dst.filter(keep),
            "src_port": pa.array(sport[idx]),
            "dst_port": pa.array(dport[idx]),
            "protocol": pa.array(proto[idx]),
            "packets": pa.array(counters["pkts"][idx]),
            "bytes": pa.array(counters["bytes"][idx]),
            "rev_packets": pa.array(rev_packets[idx]),
            "rev_bytes": pa.array(rev_bytes[idx]),
            "tenant": tenant.filter(keep),
            "instance_id": q["svm"].to_arrow().filter(keep),
        }
        return idx, cols, skipped, bad


def sniff(head: str) -> bool:
    """True if the first non-blank line is a Cloud Logging entry of a VPC flow log
    (``jsonPayload.connection`` and ``vpc_flows`` in ``logName``, or a ``reporter``)."""
    for line in head.splitlines():
        if not line.strip():
            continue
        try:
            e = _DECODE(line)
        except msgspec.MsgspecError:
            return False
        p = e.jsonPayload
        if p is None or p.connection is None:
            return False
        return (e.logName or "").endswith("vpc_flows") or p.reporter is not None
    return False
