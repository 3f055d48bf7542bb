"""Zeek ``conn.log`` and ``smtp.log`` → records, in Zeek's TSV form (with its ``#``
header) and its JSON-lines form.

A pure parser: :class:`ZeekParser` is fed consecutive chunks of lines of one file. Its
state is the TSV header seen last (separator, unset and empty markers, path, fields).

TSV
    ``#separator``, ``#set_separator``, ``#empty_field``, ``#unset_field``, ``#path``
    and ``#fields`` declare how the lines below are split and what their columns are;
    other ``#`` lines (``#open``, ``#close``, ``#types``, comments) are skipped. Text
    values keep Zeek's ``\\xNN`` escapes undone. Data lines before any ``#fields`` are
    rejected: columns are never assigned by guess.
JSON
    One object per line with Zeek's field names (``id.orig_h`` ...); a line is a
    conn record if it has ``conn_state`` (or ``"_path": "conn"``), an smtp record if
    it has ``trans_depth`` and ``tls`` (or ``"_path": "smtp"``). ``ts`` is epoch
    seconds or ISO 8601 (``LogAscii::json_timestamps``).

Other Zeek logs (dns, ssl, files ...) are valid input that holds no flows: their lines
are skipped.

conn.log
    ``id.orig_h:id.orig_p`` is the client, ``id.resp_h:id.resp_p`` the server;
    ``ts`` + ``duration`` give start and end. Counters are IP-level, like every other
    flow source: ``orig_pkts`` / ``orig_ip_bytes`` → packets / bytes, ``resp_pkts`` /
    ``resp_ip_bytes`` → ``rev_packets`` / ``rev_bytes`` (payload-only ``orig_bytes`` /
    ``resp_bytes`` when a log lacks the ``*_ip_bytes`` columns); unset counters are 0.
    ``conn_state`` of TCP connections: S0, SH, RSTOS0 → unanswered (no answer to the
    SYN); REJ → refused; SF, S1, S2, S3 → completed; RSTO, RSTR → reset; OTH, SHR,
    RSTRH (no SYN seen) → ''.
smtp.log
    One record per mail transaction (a connection with two transactions gives two),
    with the dialogue fields: ``helo``, the domain of ``mailfrom``, ``rcpt_count`` =
    number of ``rcptto`` addresses (Zeek stops listing at ``SMTP::max_rcptto``, 500
    by default), ``reply_last`` = code of ``last_reply``, ``starttls`` = ``tls``. An
    smtp.log line only exists after Zeek parsed a dialogue, which needs an
    established TCP connection, so ``conn_state`` is ``completed``; packets and bytes
    are not in smtp.log and are 0 (read conn.log for them).

``action`` is ``unknown`` (a passive sensor does not see what a firewall did). Both
directions of a connection are in one Zeek record, so there is nothing to pair. With
``smtp_ports`` set, records whose ``id.resp_p`` is not an SMTP port are skipped.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Sequence

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard.ingest.base import Batch
from smtpguard.ingest.columns import (
    LineFrame,
    MAX_COUNTER,
    MAX_EPOCH_MS,
    MAX_ID_CHARS,
    ColumnParser,
    Split,
    json_problem,
    ms_timestamps,
    np_,
    segments,
    short,
    uint_problem,
)
from smtpguard.ingest.selection import DEFAULT_SMTP_PORTS, select_smtp
from smtpguard.core.iputil import canonical_ip, canonicalize_ips

NAME = "zeek"
#: Longest line accepted (an smtp.log line with 500 recipients is ~20 KB).
MAX_LINE_CHARS = 65536

_ID = ("ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p")
REQUIRED = {"conn": _ID + ("proto",), "smtp": _ID}
#: Columns read from each log (besides REQUIRED), when the header has them.
OPTIONAL = {
    "conn": (
        "duration",
        "orig_pkts",
        "orig_ip_bytes",
        "orig_bytes",
        "resp_pkts",
        "resp_ip_bytes",
        "resp_bytes",
        "conn_state",
        "ip_proto",
    ),
    "smtp": ("helo", "mailfrom", "rcptto", "last_reply", "tls"),
}
_COUNTERS = ("orig_pkts", "orig_ip_bytes", "orig_bytes", "resp_pkts", "resp_ip_bytes", "resp_bytes")

CONN_STATES: dict[str, str] = {
    "S0": "unanswered",
    "SH": "unanswered",
    "RSTOS0": "unanswered",
    "REJ": "refused",
    "SF": "completed",
    "S1": "completed",
    "S2": "completed",
    "S3": "completed",
    "RSTO": "reset",
    "RSTR": "reset",
    "OTH": "",
    "SHR": "",
    "RSTRH": "",
}
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1}

_TIME_RE = r"^[0-9]{1,11}(\.[0-9]{1,9})?$"
_INTERVAL_RE = r"^[0-9]{1,11}(\.[0-9]{1,9})?$"
_ESCAPE_RE = re.compile(r"\\x([0-9a-fA-F]{2})")
_DOMAIN_RE = r"@([^@<>\s]*)>?\s*$"


def _unescape(s: str) -> str:
    """Undo Zeek's ``\\xNN`` escapes (bytes, decoded as UTF-8)."""
    if "\\x" not in s:
        return s
    raw = _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), s)
    return raw.encode("latin-1", "backslashreplace").decode("utf-8", "replace")


class Header:
    """The TSV header in force: markers, log path and columns."""

    __slots__ = ("sep", "set_sep", "empty", "unset", "path", "fields", "pos", "kind", "line_no", "bad")

    def __init__(self) -> None:
        self.sep = "\t"
        self.set_sep = ","
        self.empty = "(empty)"
        self.unset = "-"
        self.path = ""
        self.fields: list[str] | None = None
        self.pos: dict[str, int] = {}
        self.kind = ""  # "conn", "smtp", "other" once #fields is seen
        self.line_no = 0
        self.bad = ""  # why the #fields line was rejected

    def copy(self) -> "Header":
        h = Header()
        for k in self.__slots__:
            setattr(h, k, getattr(self, k))
        return h


def _kind_of(path: str, fields: list[str]) -> str:
    if path in ("conn", "smtp"):
        return path
    if path:
        return "other"
    if "conn_state" in fields:
        return "conn"
    if "trans_depth" in fields and "tls" in fields:
        return "smtp"
    return "other"


def _apply_directive(h: Header, line: str, line_no: int) -> tuple[Header, str | None]:
    """Apply one ``#`` line to the header; returns (header, reject reason or None)."""
    if line.startswith("#separator "):
        value = _unescape(line[len("#separator ") :])
        if len(value) == 0 or value in ("\n", "\r"):
            return h, f"invalid #separator: {short(value)}"
        h = Header()  # a new separator starts a new log section
        h.sep = value
        return h, None
    name, _, value = line[1:].partition(h.sep)
    if name in ("set_separator", "empty_field", "unset_field", "path"):
        h = h.copy()
        setattr(
            h, {"set_separator": "set_sep", "empty_field": "empty", "unset_field": "unset", "path": "path"}[name], value
        )
        return h, None
    if name != "fields":
        return h, None  # #open, #close, #types, comments
    h = h.copy()
    fields = value.split(h.sep)
    h.fields, h.pos, h.line_no, h.bad = fields, {f: i for i, f in enumerate(fields)}, line_no, ""
    h.kind = _kind_of(h.path, fields)
    dups = sorted({f for f in fields if fields.count(f) > 1})
    if dups:
        h.bad = "invalid #fields: duplicate field name(s) " + ", ".join(dups)
    elif h.kind in REQUIRED:
        missing = [f for f in REQUIRED[h.kind] if f not in h.pos]
        if missing:
            h.bad = f"#fields of a Zeek {h.kind} log lacks field(s) needed for a record: " + ", ".join(missing)
    return h, (h.bad or None)


# ------------------------------------------------------------------------ JSON


class _ZeekJson(msgspec.Struct, gc=False):
    """The fields of a Zeek JSON conn or smtp record this parser reads."""

    ts: float | str | None = None
    uid: str | None = None
    path: str | None = msgspec.field(default=None, name="_path")
    orig_h: str | None = msgspec.field(default=None, name="id.orig_h")
    orig_p: int | None = msgspec.field(default=None, name="id.orig_p")
    resp_h: str | None = msgspec.field(default=None, name="id.resp_h")
    resp_p: int | None = msgspec.field(default=None, name="id.resp_p")
    proto: str | None = None
    duration: float | None = None
    orig_pkts: int | None = None
    orig_ip_bytes: int | None = None
    orig_bytes: int | None = None
    resp_pkts: int | None = None
    resp_ip_bytes: int | None = None
    resp_bytes: int | None = None
    conn_state: str | None = None
    ip_proto: int | None = None
    trans_depth: int | None = None
    helo: str | None = None
    mailfrom: str | None = None
    rcptto: list[str] | None = None
    last_reply: str | None = None
    tls: bool | None = None


_JSON_DECODE = msgspec.json.Decoder(_ZeekJson).decode
_JSON_HEADER = Header()
_JSON_HEADER.unset, _JSON_HEADER.empty, _JSON_HEADER.set_sep = "\x00unset", "\x00empty", "\x1f"


def _json_kind(o: _ZeekJson) -> str:
    """conn, smtp, other (another Zeek log) or '' (not a Zeek record)."""
    if o.path is not None:
        return o.path if o.path in ("conn", "smtp") else "other"
    if o.conn_state is not None:
        return "conn"
    if o.trans_depth is not None and o.tls is not None:
        return "smtp"
    if o.ts is not None and o.uid is not None:
        return "other"
    return ""


def _iso_seconds(v: str) -> float | None:
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def _seconds_text(values: list[float | str | None]) -> pa.Array:
    """Epoch seconds (numbers, or ISO 8601 texts) as the text a TSV log holds
    (``1254722767.529046``); values that are no time keep a text that says so."""
    if any(isinstance(v, str) for v in values):
        values = [_iso_seconds(v) if isinstance(v, str) else v for v in values]
    x = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    good = np.isfinite(x) & (x >= 0) & (x < 1e11)
    us = np.round(np.where(good, x, 0.0) * 1e6).astype(np.int64)
    text = pc.binary_join_element_wise(
        pc.cast(pa.array(us // 1_000_000), pa.string()),
        pc.utf8_lpad(pc.cast(pa.array(us % 1_000_000), pa.string()), 6, "0"),
        ".",
    )
    if not good.all():
        bad = np.flatnonzero(~good)
        shown = pa.array(
            [_JSON_HEADER.unset if np.isnan(x[i]) else repr(float(x[i])) for i in bad.tolist()], pa.string()
        )
        mask = np.zeros(len(values), dtype=bool)
        mask[bad] = True
        text = pc.replace_with_mask(text, pa.array(mask), shown)
    return text


def _json_columns(objs: list[_ZeekJson], kind: str) -> dict[str, pa.Array]:
    """The columns of decoded JSON records as the text tokens a TSV log would hold."""
    unset = _JSON_HEADER.unset

    def text(vals: list) -> pa.Array:
        return pc.fill_null(pa.array(vals, pa.string()), unset)

    def number(vals: list) -> pa.Array:
        try:
            a = pa.array(vals, pa.int64())
        except (pa.ArrowException, OverflowError):  # beyond 64 bits: out of range either way
            a = pa.array([None if v is None else (v if -(2**63) <= v < 2**63 else 2**63 - 1) for v in vals], pa.int64())
        return pc.fill_null(pc.cast(a, pa.string()), unset)

    cols = {
        "ts": _seconds_text([o.ts for o in objs]),
        "id.orig_h": text([o.orig_h for o in objs]),
        "id.orig_p": number([o.orig_p for o in objs]),
        "id.resp_h": text([o.resp_h for o in objs]),
        "id.resp_p": number([o.resp_p for o in objs]),
    }
    if kind == "conn":
        durations = [o.duration for o in objs]
        cols["duration"] = pc.if_else(pa.array([d is None for d in durations]), unset, _seconds_text(durations))
        negative = [d is not None and d < 0 for d in durations]
        if any(negative):  # shown as written, so the reject says what was wrong
            shown = pa.array([repr(d) for d, neg in zip(durations, negative) if neg], pa.string())
            cols["duration"] = pc.replace_with_mask(cols["duration"], pa.array(negative), shown)
        cols["proto"] = text([o.proto for o in objs])
        cols["conn_state"] = text([o.conn_state for o in objs])
        cols["ip_proto"] = number([o.ip_proto for o in objs])
        for f in _COUNTERS:
            cols[f] = number([getattr(o, f) for o in objs])
    else:
        cols["helo"] = text([o.helo for o in objs])
        cols["mailfrom"] = text([o.mailfrom for o in objs])
        cols["last_reply"] = text([o.last_reply for o in objs])
        cols["tls"] = text([None if o.tls is None else ("T" if o.tls else "F") for o in objs])
        cols["rcptto"] = text(
            [
                None if o.rcptto is None else (_JSON_HEADER.set_sep.join(o.rcptto) if o.rcptto else _JSON_HEADER.empty)
                for o in objs
            ]
        )
    return cols


# ----------------------------------------------------------------- row checks


def _row_problem(tok: dict[str, str], h: Header, kind: str) -> str | None:
    """Why a row cannot become a record (the Python twin of the vector checks)."""
    u = h.unset
    ts = tok["ts"]
    if ts == u:
        return "missing ts"
    if not re.fullmatch(_TIME_RE[1:-1], ts):
        return f"invalid ts: {short(ts)} (expected epoch seconds)"
    for f in ("id.orig_h", "id.resp_h"):
        if tok[f] == u:
            return f"missing {f}"
        if canonical_ip(tok[f]) is None:
            return f"invalid IP address in {f}: {short(tok[f])}"
    for f in ("id.orig_p", "id.resp_p"):
        if tok[f] == u:
            return f"missing {f}"
        p = uint_problem(f, tok[f], 65535)
        if p:
            return p
    if kind == "conn":
        proto = tok["proto"]
        if proto == u:
            return "missing proto"
        ipp = tok.get("ip_proto", u)
        if ipp not in (u, ""):
            p = uint_problem("ip_proto", ipp, 255)
            if p:
                return p
        elif proto not in _PROTOS and proto != "unknown_transport":
            return f"unknown proto: {short(proto)} (expected tcp, udp, icmp)"
        dur = tok.get("duration", u)
        if dur != u:
            if dur.startswith("-"):
                return f"negative duration: {short(dur)}"
            if not re.fullmatch(_INTERVAL_RE[1:-1], dur):
                return f"invalid duration: {short(dur)}"
        for f in _COUNTERS:
            v = tok.get(f, u)
            if v != u:
                p = uint_problem(f, v, MAX_COUNTER)
                if p:
                    return p
        cs = tok.get("conn_state", u)
        if cs != u and cs not in CONN_STATES:
            return f"unknown conn_state: {short(cs)}"
    else:
        for f in ("helo", "mailfrom"):
            v = tok.get(f, u)
            if len(v) > 4 * MAX_ID_CHARS:
                return f"{f} too long: {len(v)} chars (limit {4 * MAX_ID_CHARS})"
            if re.search(r"[\x00-\x1f\x7f\ufffd]", v):
                return f"binary data in {f}: {short(v)}"
        tls = tok.get("tls", u)
        if tls not in (u, "T", "F"):
            return f"invalid tls: {short(tls)} (expected T or F)"
    return None


class ZeekParser(ColumnParser):
    """Parser for Zeek conn.log and smtp.log (TSV or JSON lines); see the module docstring."""

    name = NAME

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS):
        super().__init__(source, smtp_ports)
        self._header = Header()

    def parse_lines(self, lines: list[str], first_line_no: int) -> Batch:
        if len(lines) == 0:
            return Batch.empty()
        lf = LineFrame(lines)
        live, text, blen = lf.live, lf.text, lf.blen
        problems: list[tuple[int, str]] = list(lf.forced.items())
        too_long = live & (blen > MAX_LINE_CHARS)
        for i in np.flatnonzero(too_long).tolist():
            problems.append((i, f"line too long: {int(blen[i])} bytes (limit {MAX_LINE_CHARS})"))
        live &= ~too_long

        skipped = 0
        # header lines, in order; they split the chunk into segments
        hdr_rows = np.flatnonzero(live & (lf.first_b == ord("#")))
        states = [self._header]
        h = self._header
        for i in hdr_rows.tolist():
            h, reason = _apply_directive(h, text(i), first_line_no + i)
            states.append(h)
            if reason:
                problems.append((i, reason))
            else:
                skipped += 1
        self._header = h
        live[hdr_rows] = False

        groups: list[tuple[str, Header, np.ndarray, dict[str, pa.Array]]] = []

        # JSON lines: decoded one by one (msgspec), then columns of TSV-equivalent tokens
        json_rows = np.flatnonzero(live & (lf.first_b == ord("{")))
        live[json_rows] = False
        if json_rows.size:
            by_kind: dict[str, tuple[list[int], list[_ZeekJson]]] = {"conn": ([], []), "smtp": ([], [])}
            decoded: list[_ZeekJson] | None = None
            if not lf.forced:
                try:  # the common case: every JSON line decodes
                    decoded = [_JSON_DECODE(lines[i]) for i in json_rows.tolist()]
                except msgspec.MsgspecError:
                    decoded = None
            for n_json, i in enumerate(json_rows.tolist()):
                try:
                    o = decoded[n_json] if decoded is not None else _JSON_DECODE(text(i))
                except msgspec.DecodeError as e:
                    problems.append((i, json_problem(e)))
                    continue
                kind = _json_kind(o)
                if kind in by_kind:
                    by_kind[kind][0].append(i)
                    by_kind[kind][1].append(o)
                elif kind == "other":
                    skipped += 1
                else:
                    problems.append((i, "not a Zeek conn or smtp record: no conn_state, trans_depth/tls or _path"))
            for kind, (rows_l, objs) in by_kind.items():
                if rows_l:
                    groups.append((kind, _JSON_HEADER, np.asarray(rows_l, dtype=np.int64), _json_columns(objs, kind)))

        # TSV data lines, per header segment
        splits: dict[str, Split] = {}
        for st, rows in segments(live, hdr_rows, states):
            if st.fields is None:
                problems.extend(
                    (i, "no #fields header line before this line: Zeek TSV columns are not guessed")
                    for i in rows.tolist()
                )
                continue
            if st.bad:
                problems.extend(
                    (i, f"no usable layout: the #fields line {st.line_no} was rejected ({st.bad})")
                    for i in rows.tolist()
                )
                continue
            if st.kind == "other":
                skipped += int(rows.size)
                continue
            if st.sep not in splits:
                splits[st.sep] = Split(lf.trimmed, st.sep)
            split = splits[st.sep]
            ok_count = split.counts[rows] == len(st.fields)
            for i in rows[~ok_count].tolist():
                problems.append(
                    (
                        i,
                        f"wrong field count: expected {len(st.fields)} fields "
                        f"(#fields at line {st.line_no}), got {int(split.counts[i])}",
                    )
                )
            rows = rows[ok_count]
            if rows.size:
                names = [f for f in REQUIRED[st.kind] + OPTIONAL[st.kind] if f in st.pos]
                cols = {f: split.field(rows, st.pos[f]) for f in names}
                groups.append((st.kind, st, rows, cols))

        parts: list[tuple[np.ndarray, dict[str, pa.Array]]] = []
        for kind, st, rows, cols in groups:
            good, out, nskip, bad = self._decode(kind, st, rows, cols)
            skipped += nskip
            for j in bad.tolist():
                tok = {f: cols[f][j].as_py() for f in cols}
                problems.append((int(rows[j]), _row_problem(tok, st, kind) or "invalid record"))
            if good.size:
                parts.append((rows[good], out))

        return self._batch(self._assemble(parts), problems, lines, lf.raws, first_line_no, lf.read, skipped)

    # ---------------------------------------------------------------- internals

    def _decode(
        self, kind: str, h: Header, rows: np.ndarray, cols: dict[str, pa.Array]
    ) -> tuple[np.ndarray, dict[str, pa.Array], int, np.ndarray]:
        """Vector-decode rows of one log kind (one polars query for every column).
        Returns (positions kept, their record columns, rows skipped, positions
        rejected); positions index ``rows``."""
        df = pl.from_arrow(pa.table(cols))
        assert isinstance(df, pl.DataFrame)
        c, u = pl.col, h.unset

        def is_set(f: str) -> pl.Expr:
            return c(f) != u

        # stage 1 parses every column once; the expressions below combine its results
        stage: dict[str, pl.Expr] = {}

        def secs_ms(f: str) -> tuple[pl.Expr, pl.Expr]:
            parts = c(f).str.split_exact(".", 1)
            whole = parts.struct.field("field_0").cast(pl.Int64, strict=False)
            frac = (
                parts.struct.field("field_1")
                .fill_null("")
                .str.slice(0, 3)
                .str.pad_end(3, "0")
                .cast(pl.Int64, strict=False)
            )
            stage[f"_{f}_ok"] = c(f).str.contains(_TIME_RE).fill_null(False)
            stage[f"_{f}_ms"] = whole * 1000 + frac
            return pl.when(c(f"_{f}_ok")).then(c(f"_{f}_ms")).otherwise(0), c(f"_{f}_ok")

        def port(f: str) -> tuple[pl.Expr, pl.Expr]:
            stage[f"_{f}"] = c(f).cast(pl.Int64, strict=False)
            stage[f"_{f}_fmt"] = c(f).str.contains(r"^[0-9]{1,5}$")
            v = c(f"_{f}")
            return v.fill_null(0).clip(0, 65535), c(f"_{f}_fmt") & (v <= 65535)

        start, ok = secs_ms("ts")
        sport, sport_ok = port("id.orig_p")
        dport, dport_ok = port("id.resp_p")
        ok = ok & sport_ok & dport_ok
        exprs: dict[str, pl.Expr] = {"start": start, "sport": sport, "dport": dport}
        skip = pl.lit(False)
        if kind == "conn":
            named = c("proto").replace_strict(_PROTOS, default=-1, return_dtype=pl.Int32)
            ipv6 = c("id.orig_h").str.contains(":", literal=True)
            stage["_proto"] = pl.when((named == 1) & ipv6).then(58).otherwise(named)  # Zeek calls ICMPv6 "icmp"
            proto = c("_proto")
            if "ip_proto" in df.columns:
                stage["_ipp"] = c("ip_proto").cast(pl.Int64, strict=False)
                stage["_ipp_fmt"] = c("ip_proto").str.contains(r"^[0-9]{1,3}$")
                ipp = c("_ipp")
                ipp_ok = c("_ipp_fmt") & (ipp <= 255)
                ok = ok & (~is_set("ip_proto") | ipp_ok)
                proto = pl.when(is_set("ip_proto") & ipp_ok).then(ipp).otherwise(proto)
            unknown_t = (c("proto") == "unknown_transport") & (proto < 0)
            ok = ok & ((proto >= 0) | unknown_t)
            skip = unknown_t  # no protocol number: cannot be a record
            if "duration" in df.columns:
                dur, dur_ok = secs_ms("duration")
                ok = ok & (~is_set("duration") | dur_ok)
                exprs["end"] = start + pl.when(is_set("duration")).then(dur).otherwise(0)
            else:
                exprs["end"] = start
            for f in _COUNTERS:
                if f in df.columns:
                    # the cast takes digits only, and a leading "+" that Zeek never writes
                    stage[f"_{f}"] = c(f).cast(pl.UInt64, strict=False)
                    stage[f"_{f}_plus"] = c(f).str.starts_with("+")
                    v = c(f"_{f}")
                    ok = ok & (~is_set(f) | (v.is_not_null() & ~c(f"_{f}_plus")))
                    exprs[f] = pl.when(is_set(f)).then(v).otherwise(0).fill_null(0)
            if "conn_state" in df.columns:
                ok = ok & (c("conn_state").is_in(list(CONN_STATES)) | (c("conn_state") == u))
                state = c("conn_state").replace_strict(CONN_STATES, default="")
                exprs["conn_state"] = pl.when(proto == 6).then(state).otherwise(pl.lit(""))
            else:
                exprs["conn_state"] = pl.lit("")
            exprs["proto"] = proto.fill_null(0).clip(0, 255)
        else:
            exprs["end"] = start
            exprs["proto"] = pl.lit(6)
            for f in ("helo", "mailfrom"):
                if f in df.columns:
                    ok = ok & ~c(f).str.contains(r"[\x00-\x1f\x7f\ufffd]") & (c(f).str.len_chars() <= 4 * MAX_ID_CHARS)
            if "tls" in df.columns:
                ok = ok & c("tls").is_in(["T", "F", u])
        q = (
            df.lazy()
            .with_columns(**stage)
            .select(ok=ok.fill_null(False), skip=skip.fill_null(False), **exprs)
            .collect()
        )

        start_ms = np_(q["start"]).astype(np.int64)
        end_ms = np_(q["end"]).astype(np.int64)
        ok_v = np_(q["ok"]).astype(bool) & (start_ms <= MAX_EPOCH_MS) & (end_ms <= MAX_EPOCH_MS)
        src, src_ok = canonicalize_ips(cols["id.orig_h"])
        dst, dst_ok = canonicalize_ips(cols["id.resp_h"], check=src_ok)
        ok_v &= src_ok & dst_ok
        skip_v = np_(q["skip"]).astype(bool)
        bad = np.flatnonzero(~ok_v)
        valid = ok_v & ~skip_v
        nskip = int((ok_v & skip_v).sum())
        sel, other = select_smtp(np_(q["dport"]), self.smtp_ports, valid)
        nskip += other
        idx = np.flatnonzero(sel)
        keep = pa.array(sel)
        q = q.filter(pl.Series(sel))

        rec: dict[str, pa.Array] = {
            "start": ms_timestamps(start_ms[idx]),
            "end": ms_timestamps(end_ms[idx]),
            "src_ip": src.filter(keep),
            "dst_ip": dst.filter(keep),
            "src_port": q["sport"].to_arrow(),
            "dst_port": q["dport"].to_arrow(),
            "protocol": q["proto"].to_arrow(),
        }
        if kind == "conn":
            zero = pa.repeat(pa.scalar(0, pa.uint64()), q.height)

            def counter(*names: str) -> pa.Array:
                for f in names:
                    if f in q.columns:
                        return q[f].to_arrow()
                return zero

            rec.update(
                packets=counter("orig_pkts"),
                bytes=counter("orig_ip_bytes", "orig_bytes"),
                rev_packets=counter("resp_pkts"),
                rev_bytes=counter("resp_ip_bytes", "resp_bytes"),
                conn_state=q["conn_state"].to_arrow(),
            )
        else:
            rec.update(self._smtp_columns(df.filter(pl.Series(sel)), h))
        return idx, rec, nskip, bad

    @staticmethod
    def _smtp_columns(df: pl.DataFrame, h: Header) -> dict[str, pa.Array]:
        u, empty, n = h.unset, h.empty, df.height

        def text(f: str) -> pl.Series:
            if f not in df.columns:
                return pl.Series([""] * n, dtype=pl.String)
            s = pl.select(pl.when(df[f] == u).then(pl.lit("")).otherwise(df[f])).to_series()
            if s.str.contains("\\x", literal=True).any():
                s = s.map_elements(_unescape, return_dtype=pl.String)
            return s

        helo = text("helo").str.slice(0, MAX_ID_CHARS)
        domain = text("mailfrom").str.extract(_DOMAIN_RE, 1).fill_null("").str.to_lowercase().str.slice(0, MAX_ID_CHARS)
        if "rcptto" in df.columns:
            rc = df["rcptto"]
            count = rc.str.count_matches(h.set_sep, literal=True) + 1
            rcpt = pl.select(pl.when((rc == u) | (rc == empty) | (rc == "")).then(0).otherwise(count)).to_series()
        else:
            rcpt = pl.Series([None] * n, dtype=pl.UInt32)
        if "last_reply" in df.columns:
            code = df["last_reply"].str.extract(r"^([2-5][0-9][0-9])", 1).cast(pl.UInt16, strict=False)
        else:
            code = pl.Series([None] * n, dtype=pl.UInt16)
        if "tls" in df.columns:
            tls = df["tls"].replace_strict({"T": True, "F": False}, default=None, return_dtype=pl.Boolean)
        else:
            tls = pl.Series([None] * n, dtype=pl.Boolean)
        return {
            "helo": helo.to_arrow(),
            "mail_from_domain": domain.to_arrow(),
            "rcpt_count": rcpt.cast(pl.UInt32).to_arrow(),
            "reply_last": code.to_arrow(),
            "starttls": tls.to_arrow(),
            "conn_state": pa.repeat(pa.scalar("completed"), n),
            "packets": pa.repeat(pa.scalar(0, pa.uint64()), n),
            "bytes": pa.repeat(pa.scalar(0, pa.uint64()), n),
        }


def sniff(head: str) -> bool:
    """True for a Zeek log: a TSV ``#separator`` / ``#fields`` header (after any ``#``
    comment lines), or JSON lines with Zeek's ``ts``, ``id.orig_h`` and ``uid`` (or
    ``_path``) fields."""
    for line in head.splitlines():
        if not line.strip():
            continue
        if line.startswith("#separator ") or line.startswith("#fields"):
            return True
        if line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                o = msgspec.json.decode(line)
            except msgspec.MsgspecError:
                return False
            return isinstance(o, dict) and "ts" in o and "id.orig_h" in o and ("uid" in o or "_path" in o)
        return False
    return False
