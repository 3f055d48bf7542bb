"""Azure Network Watcher flow logs → records: NSG flow logs (versions 1 and 2) and
virtual network (VNet) flow logs (version 4).

A stream parser: a file (a storage blob such as ``PT1H.json``) is one JSON document
``{"records": [...]}``, often pretty-printed over many lines, so
:meth:`AzureFlowParser.parse_stream` reads a whole input and yields one batch. A single
record object, or one document or record per line (Event Hubs exports), is read too.

Tuples
    NSG v2: ``ts(s),src,dst,sport,dport,proto(T/U),direction(I/O),decision(A/D),
    state(B/C/E),packets s→d,bytes s→d,packets d→s,bytes d→s``, counters empty on
    state B; NSG v1: the first eight. VNet v4 (``flowRecords.flows[].flowGroups[]``):
    ``ts(ms),src,dst,sport,dport,protocol number,direction,state(B/C/E/D),encryption,
    packets s→d,bytes s→d,packets d→s,bytes d→s``, where state D is a denied flow.
Mapping
    The tuple's source is the client (the side that opened the flow, whichever
    direction the NIC saw it); ``action`` is accept, or reject for decision D (v4:
    state D); ``tenant`` is the subscription id from ``resourceId`` /
    ``flowLogResourceID`` (lower case); ``interface_id`` the NIC's MAC address
    (``00-0D-3A-F8-78-56``); d→s counters become ``rev_packets`` / ``rev_bytes``.
Connections
    Azure reports a flow when it begins (B, no counters), every few minutes while it
    lasts (C) and when it ends (E), each C/E tuple with the counters since the last
    one. Within a document, the tuples of one flow (same subscription, MAC, 5-tuple,
    direction and decision) from a B up to its E are merged into one record: start of
    the first, end of the last, counters summed. Merged tuples count as skipped. A
    flow that began in an earlier document starts at its first tuple here. Version 1
    tuples have no state: each is a record.
SMTP selection
    With ``smtp_ports`` set, records whose destination port is not an SMTP port are
    skipped; ``None`` keeps them all.

``Batch.read`` counts flow tuples, plus records or documents rejected whole.
"""

from __future__ import annotations

import re
from typing import Any, BinaryIO, Iterator

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa

from smtpguard.ingest.base import Batch, Reject
from smtpguard.ingest.columns import (
    MAX_COUNTER,
    MAX_EPOCH_MS,
    MAX_EPOCH_S,
    ColumnParser,
    Split,
    json_problem,
    ms_timestamps,
    np_,
    short,
    uint_problem,
)
from smtpguard.ingest.selection import select_smtp
from smtpguard.core.iputil import canonical_ip, canonicalize_ips

NAME = "azure-flow"
#: Largest document read (an hourly NSG blob of a busy NIC is tens of MB).
MAX_DOCUMENT_BYTES = 1 << 30
#: Fields per tuple, by flow log version.
TUPLE_FIELDS = {1: 8, 2: 13, 4: 13}
_SUBSCRIPTION_RE = re.compile(r"/subscriptions/([^/]+)/", re.IGNORECASE)


class _NsgFlow(msgspec.Struct, gc=False):
    mac: str = ""
    flowTuples: list[str] = []


class _NsgRule(msgspec.Struct, gc=False):
    rule: str = ""
    flows: list[_NsgFlow] = []


class _NsgProperties(msgspec.Struct, gc=False):
    Version: int | None = None
    flows: list[_NsgRule] = []


class _VnetGroup(msgspec.Struct, gc=False):
    rule: str = ""
    flowTuples: list[str] = []


class _VnetFlow(msgspec.Struct, gc=False):
    aclID: str = ""
    flowGroups: list[_VnetGroup] = []


class _VnetRecords(msgspec.Struct, gc=False):
    flows: list[_VnetFlow] = []


class _Record(msgspec.Struct, gc=False):
    time: str | None = None
    category: str | None = None
    resourceId: str | None = None
    macAddress: str | None = None
    flowLogVersion: int | None = None
    flowLogResourceID: str | None = None
    targetResourceID: str | None = None
    properties: _NsgProperties | None = None
    flowRecords: _VnetRecords | None = None


class _Top(_Record, gc=False):
    """A document (``records``) or a bare record: both parse as this."""

    records: list[_Record] | None = None


_DECODE_TOP = msgspec.json.Decoder(_Top).decode
#: What msgspec raises for a document that is not JSON: invalid UTF-8 inside a string is a
#: UnicodeDecodeError, not a msgspec error.
_NOT_JSON = (msgspec.DecodeError, UnicodeDecodeError)


def _subscription(*ids: str | None) -> str:
    for rid in ids:
        if rid:
            m = _SUBSCRIPTION_RE.search(rid)
            if m:
                return m.group(1).lower()
    return ""


def _mac(mac: str) -> str:
    m = mac.replace("-", "").replace(":", "").upper()
    if len(m) == 12 and all(c in "0123456789ABCDEF" for c in m):
        return "-".join(m[i : i + 2] for i in range(0, 12, 2))
    return mac[:64]


class _Tuples:
    """Flow tuples of one input, in groups (one flowTuples list each) that share a
    version, subscription, MAC and location prefix."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.group_sizes: list[int] = []
        self.group_version: list[int] = []
        self.group_tenant: list[str] = []
        self.group_mac: list[str] = []
        self.group_where: list[str] = []

    def add_record(self, r: _Record, where: str) -> str | None:
        """Add the tuples of a record; returns why the record is unusable, or None."""
        if r.flowRecords is not None:
            ver = r.flowLogVersion if r.flowLogVersion is not None else 4
            if ver != 4:
                return f"unsupported VNet flow log version: {ver} (supported: 4)"
            tenant = _subscription(r.flowLogResourceID, r.targetResourceID, r.resourceId)
            mac = _mac(r.macAddress or "")
            for i, f in enumerate(r.flowRecords.flows):
                for j, g in enumerate(f.flowGroups):
                    self._add(
                        g.flowTuples, ver, tenant, mac, f"{where}.flowRecords.flows[{i}].flowGroups[{j}].flowTuples"
                    )
            return None
        if r.properties is not None:
            ver = r.properties.Version if r.properties.Version is not None else 1
            if ver not in (1, 2):
                return f"unsupported NSG flow log version: {ver} (supported: 1, 2)"
            tenant = _subscription(r.resourceId)
            for i, rule in enumerate(r.properties.flows):
                for j, f in enumerate(rule.flows):
                    self._add(
                        f.flowTuples, ver, tenant, _mac(f.mac), f"{where}.properties.flows[{i}].flows[{j}].flowTuples"
                    )
            return None
        return "not a flow log record: no properties.flows (NSG) or flowRecords (VNet)"

    def _add(self, tuples: list[str], ver: int, tenant: str, mac: str, where: str) -> None:
        if tuples:
            self.text.extend(tuples)
            self.group_sizes.append(len(tuples))
            self.group_version.append(ver)
            self.group_tenant.append(tenant)
            self.group_mac.append(mac)
            self.group_where.append(where)

    def per_tuple(self, values: list) -> np.ndarray:
        """A per-group value repeated for each tuple of its group."""
        return np.repeat(np.asarray(values), np.asarray(self.group_sizes, dtype=np.int64))

    def where(self, i: int) -> str:
        """Location of tuple ``i`` in the document."""
        ends = np.cumsum(self.group_sizes)
        g = int(np.searchsorted(ends, i, side="right"))
        return f"{self.group_where[g]}[{i - (int(ends[g - 1]) if g else 0)}]"


def _tuple_problem(t: str, ver: int) -> str | None:
    """Why a tuple cannot become a record (the Python twin of the vector checks)."""
    f = t.split(",")
    want = TUPLE_FIELDS[ver]
    if len(f) != want:
        return f"wrong field count: expected {want} fields (version {ver} tuple), got {len(f)}"
    top_ts = MAX_EPOCH_MS if ver == 4 else MAX_EPOCH_S
    p = uint_problem("timestamp", f[0], top_ts)
    if p:
        return p
    for name, v in (("source address", f[1]), ("destination address", f[2])):
        if canonical_ip(v) is None:
            return f"invalid IP address in {name}: {short(v)}"
    for name, v in (("source port", f[3]), ("destination port", f[4])):
        p = uint_problem(name, v, 65535)
        if p:
            return p
    if ver == 4:
        p = uint_problem("protocol", f[5], 255)
        if p:
            return p
    elif f[5] not in ("T", "U"):
        return f"unknown protocol: {short(f[5])} (expected T or U)"
    if f[6] not in ("I", "O"):
        return f"unknown direction: {short(f[6])} (expected I or O)"
    if ver in (1, 2) and f[7] not in ("A", "D"):
        return f"unknown decision: {short(f[7])} (expected A or D)"
    if ver == 1:
        return None
    state = f[8] if ver == 2 else f[7]
    states = ("B", "C", "E") if ver == 2 else ("B", "C", "E", "D")
    if state not in states:
        return f"unknown flow state: {short(state)} (expected {', '.join(states)})"
    for name, v in zip(("packets s2d", "bytes s2d", "packets d2s", "bytes d2s"), f[9:13]):
        if v == "" and state in ("B", "D"):
            continue
        p = uint_problem(name, v, MAX_COUNTER)
        if p:
            return p
    return None


class AzureFlowParser(ColumnParser):
    """Parser for Azure NSG (v1, v2) and VNet (v4) flow logs; see the module docstring."""

    name = NAME

    def parse_stream(self, fh: BinaryIO, source: str) -> Iterator[Batch]:
        data = fh.read(MAX_DOCUMENT_BYTES + 1)
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data or b"")
        yield self.parse_bytes(bytes(data), source)

    def parse_bytes(self, data: bytes, source: str | None = None) -> Batch:
        """Parse one whole input held in memory."""
        src = source or self.source
        rejects: list[Reject] = []
        if len(data) > MAX_DOCUMENT_BYTES:
            rejects.append(
                Reject.make(src, "document", f"document larger than {MAX_DOCUMENT_BYTES} bytes", data[:2048], NAME)
            )
            return Batch(self._fill.table({}, 0), rejects, 1, 0)
        if not data.strip():
            return Batch(self._fill.table({}, 0), [], 0, 0)
        tuples = _Tuples()
        read = 0
        for where, rec, problem, raw in self._records(data):
            if problem is None:
                assert rec is not None
                problem = tuples.add_record(rec, where)
            if problem is not None:
                read += 1
                rejects.append(Reject.make(src, where, problem, raw if raw is not None else b"", NAME))
        read += len(tuples.text)
        table, skipped, bad = self._decode(tuples)
        for i, reason in bad:
            rejects.append(Reject.make(src, tuples.where(i), reason, tuples.text[i], NAME))
        return Batch(table, rejects, read, skipped)

    # ---------------------------------------------------------------- internals

    def _records(self, data: bytes) -> Iterator[tuple[str, _Record | None, str | None, Any]]:
        """(location, record, why it is unusable, raw for the dead letter) of every record."""
        try:
            yield from self._top_records(_DECODE_TOP(data), "")
            return
        except msgspec.ValidationError:
            try:
                whole = msgspec.json.decode(data)
            except (msgspec.MsgspecError, UnicodeDecodeError):
                whole = None
            if whole is not None:
                yield from self._checked(whole, "")
                return
        except _NOT_JSON:
            pass
        lines = [ln for ln in data.split(b"\n")]
        framed = [ln.strip() for ln in lines if ln.strip()]
        if len(framed) > 1 and all(ln[:1] == b"{" and ln[-1:] == b"}" for ln in framed):
            for no, ln in enumerate(lines, 1):
                if not ln.strip():
                    continue
                try:
                    whole = msgspec.json.decode(ln)
                except _NOT_JSON as e:
                    yield f"line {no}", None, json_problem(e), ln
                    continue
                yield from self._checked(whole, f"line {no}: ")
            return
        try:
            msgspec.json.decode(data)
            reason = "not an Azure flow log document"
        except _NOT_JSON as e:
            reason = json_problem(e)
        yield "document", None, reason, data

    def _top_records(self, top: _Top, prefix: str) -> Iterator[tuple[str, _Record | None, str | None, Any]]:
        if top.records is not None:
            for i, r in enumerate(top.records):
                yield f"{prefix}records[{i}]", r, None, None
        else:
            yield f"{prefix}record", top, None, None

    def _checked(self, whole: Any, prefix: str) -> Iterator[tuple[str, _Record | None, str | None, Any]]:
        """Records of an untyped document, each checked on its own so that one bad record
        does not cost the others."""
        if isinstance(whole, dict) and isinstance(whole.get("records"), list):
            items = [(f"{prefix}records[{i}]", r) for i, r in enumerate(whole["records"])]
        elif isinstance(whole, dict):
            items = [(f"{prefix}record", whole)]
        else:
            yield (
                f"{prefix}document",
                None,
                f"not an Azure flow log document: top level is {type(whole).__name__}",
                msgspec.json.encode(whole),
            )
            return
        for where, r in items:
            try:
                yield where, msgspec.convert(r, _Record), None, None
            except msgspec.ValidationError as e:
                yield where, None, json_problem(e), msgspec.json.encode(r)

    def _decode(self, tuples: _Tuples) -> tuple[pa.Table, int, list[tuple[int, str]]]:
        n = len(tuples.text)
        if n == 0:
            return self._fill.table({}, 0), 0, []
        # the (subscription, MAC) of each tuple as a small integer code
        nics: dict[tuple[str, str], int] = {}
        group_nic = [nics.setdefault(k, len(nics)) for k in zip(tuples.group_tenant, tuples.group_mac)]
        nic = tuples.per_tuple(group_nic).astype(np.int64)
        nic_tenant = [t for t, _ in nics]
        nic_mac = [m for _, m in nics]
        arr = pa.array(tuples.text, pa.string())
        ver = tuples.per_tuple(tuples.group_version).astype(np.int16)
        split = Split(arr, ",")
        want = np.where(ver == 1, TUPLE_FIELDS[1], TUPLE_FIELDS[2])
        count_ok = split.counts == want
        rows = np.flatnonzero(count_ok)
        ok = count_ok.copy()
        m = rows.size

        def field(k: int) -> pl.Series:
            return pl.from_arrow(split.field(rows, k))

        def digits(s: pl.Series, max_digits: int = 20) -> tuple[np.ndarray, np.ndarray]:
            v = s.cast(pl.UInt64, strict=False)
            good = np_(s.str.contains(rf"^[0-9]{{1,{max_digits}}}$").fill_null(False)).astype(bool) & np_(
                v.is_not_null()
            ).astype(bool)
            return np.where(good, np_(v.fill_null(0)), 0).astype(np.uint64), good

        v = ver[rows]
        is4 = v == 4
        is1 = v == 1
        ts, g = digits(field(0), 16)
        ts_ms = np.where(is4, ts, ts * 1000).astype(np.int64)
        g &= np.where(is4, ts <= MAX_EPOCH_MS, ts <= MAX_EPOCH_S)
        sub_ok = g
        sport, g1 = digits(field(3), 5)
        dport, g2 = digits(field(4), 5)
        sub_ok &= g1 & g2 & (sport <= 65535) & (dport <= 65535)
        f5 = field(5)
        pnum, g3 = digits(f5, 3)
        letter = np_(f5.replace_strict({"T": 6, "U": 17}, default=-1, return_dtype=pl.Int64)).astype(np.int64)
        proto = np.where(is4, pnum.astype(np.int64), letter)
        sub_ok &= np.where(is4, g3 & (pnum <= 255), letter >= 0)
        direction = field(6)
        sub_ok &= np_(direction.is_in(["I", "O"])).astype(bool)
        f7 = field(7)
        if (~is1).any():
            state = pl.select(
                pl.when(pl.Series(is4)).then(f7).otherwise(field(8) if (v == 2).any() else f7)
            ).to_series()
        else:
            state = pl.Series(["B"] * m)
        state = pl.select(pl.when(pl.Series(is1)).then(pl.lit("B")).otherwise(state)).to_series()
        decision = pl.select(
            pl.when(pl.Series(is4)).then(pl.when(state == "D").then(pl.lit("D")).otherwise(pl.lit("A"))).otherwise(f7)
        ).to_series()
        sub_ok &= np_(decision.is_in(["A", "D"])).astype(bool)
        sub_ok &= np.where(
            is4, np_(state.is_in(["B", "C", "E", "D"])).astype(bool), np_(state.is_in(["B", "C", "E"])).astype(bool)
        )
        no_counts = np_(state.is_in(["B", "D"])).astype(bool)
        counters = []
        for k in (9, 10, 11, 12):
            if (~is1).any():
                s = field(k) if k < 13 else None
                val, good = digits(s)
                empty = np_(s.str.len_bytes().fill_null(0) == 0).astype(bool)
                good |= empty & no_counts
                val = np.where(is1, 0, val).astype(np.uint64)
                good |= is1
            else:
                val, good = np.zeros(m, dtype=np.uint64), np.ones(m, dtype=bool)
            counters.append(val)
            sub_ok &= good
        src, src_ok = canonicalize_ips(split.field(rows, 1))
        dst, dst_ok = canonicalize_ips(split.field(rows, 2), check=src_ok)
        sub_ok &= src_ok & dst_ok
        ok[rows] = sub_ok
        bad = [
            (i, _tuple_problem(tuples.text[i], int(ver[i])) or "invalid flow tuple")
            for i in np.flatnonzero(~ok).tolist()
        ]

        good = np.flatnonzero(sub_ok)
        gp = pa.array(good)
        df = pl.DataFrame(
            {
                "pos": rows[good],
                "nic": nic[rows[good]],
                "src": pl.from_arrow(src.take(gp)),
                "dst": pl.from_arrow(dst.take(gp)),
                "sport": sport[good].astype(np.int32),
                "dport": dport[good].astype(np.int32),
                "proto": proto[good].astype(np.int32),
                "dir": direction.gather(good),
                "decision": decision.gather(good),
                "state": state.gather(good),
                "v1": is1[good],
                "ts": ts_ms[good],
                "p": counters[0][good],
                "b": counters[1][good],
                "rp": counters[2][good],
                "rb": counters[3][good],
            }
        )
        # the port is part of a flow's identity: filter before merging
        smtp, skipped = select_smtp(np_(df["dport"]), self.smtp_ports)
        if skipped:
            df = df.filter(pl.Series(smtp))
        agg = _merge(df)
        skipped += df.height - agg.height
        cols = {
            "start": ms_timestamps(agg["start"].to_numpy()),
            "end": ms_timestamps(agg["end"].to_numpy()),
            "src_ip": agg["src"].to_arrow(),
            "dst_ip": agg["dst"].to_arrow(),
            "src_port": agg["sport"].to_arrow(),
            "dst_port": agg["dport"].to_arrow(),
            "protocol": agg["proto"].to_arrow(),
            "packets": agg["p"].to_arrow(),
            "bytes": agg["b"].to_arrow(),
            "rev_packets": agg["rp"].to_arrow(),
            "rev_bytes": agg["rb"].to_arrow(),
            "action": agg["decision"].replace_strict({"A": "accept", "D": "reject"}).to_arrow(),
            "tenant": pa.array(nic_tenant, pa.string()).take(pa.array(agg["nic"].to_numpy())),
            "interface_id": pa.array(nic_mac, pa.string()).take(pa.array(agg["nic"].to_numpy())),
        }
        return self._fill.table(cols, agg.height), skipped, bad


_FLOW_KEY = ["nic", "src", "dst", "sport", "dport", "proto", "dir", "decision"]


def _merge(df: pl.DataFrame) -> pl.DataFrame:
    """One row per connection: a flow's tuples from its B up to its E (v1 tuples stand
    alone), in order of the connection's first tuple.

    Tuples are sorted by a 64-bit hash of the flow key, time and position; a connection
    starts where the key differs from the previous row (compared column by column, so
    a hash collision cannot merge two flows), at a B, or after an E or D.
    """
    if df.height == 0:
        return df.select(*_FLOW_KEY, "pos", start="ts", end="ts", p="p", b="b", rp="rp", rb="rb")
    df = df.with_columns(h=pl.struct(_FLOW_KEY).hash(seed=0)).sort(["h", "ts", "pos"])
    same_key = pl.all_horizontal([pl.col(k) == pl.col(k).shift(1) for k in _FLOW_KEY]).fill_null(False)
    prev_state = pl.col("state").shift(1)
    starts = ~same_key | (pl.col("state") == "B") | pl.col("v1") | prev_state.is_in(["E", "D"]).fill_null(True)
    first = np.flatnonzero(np_(df.select(starts=starts)["starts"]).astype(bool))
    sums = {k: np.add.reduceat(np_(df[k]).astype(np.uint64), first) for k in ("p", "b", "rp", "rb")}
    ts = np_(df["ts"]).astype(np.int64)
    last = np.append(first[1:], df.height) - 1
    firsts = df[first.tolist()].select(*_FLOW_KEY, "pos")
    return firsts.with_columns(
        start=pl.Series(ts[first]),
        end=pl.Series(ts[last]),
        p=pl.Series(sums["p"]),
        b=pl.Series(sums["b"]),
        rp=pl.Series(sums["rp"]),
        rb=pl.Series(sums["rb"]),
    ).sort("pos")


_FIRST_KEY_RE = re.compile(rb'\A\s*\{\s*"([A-Za-z]+)"')
_RECORD_KEYS = frozenset(
    {
        b"time",
        b"systemId",
        b"category",
        b"resourceId",
        b"operationName",
        b"properties",
        b"flowLogVersion",
        b"flowLogGUID",
        b"macAddress",
        b"flowLogResourceID",
        b"targetResourceID",
        b"flowRecords",
    }
)


def sniff(head: bytes) -> bool:
    """True if the input starts like an Azure flow log: a JSON object whose first key is
    ``records`` or a flow log record field, with flow log markers (flowTuples, the
    NSG or VNet flow event category) near the start."""
    m = _FIRST_KEY_RE.match(head)
    if not m or (m.group(1) != b"records" and m.group(1) not in _RECORD_KEYS):
        return False
    window = head[:65536]
    return any(k in window for k in (b'"flowTuples"', b'"NetworkSecurityGroupFlowEvent"', b'"FlowLogFlowEvent"'))
