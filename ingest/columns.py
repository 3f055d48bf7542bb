"""Column helpers shared by the text and JSON flow parsers.

Every parser here works the same way: the input becomes Arrow columns of text, vector
checks mark the rows that cannot become records, a per-row Python twin of those checks
explains each bad row (only bad rows pay for Python), and the good rows are cast and
assembled into a record table with :data:`smtpguard.core.record.SCHEMA`.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard.core import record
from smtpguard.core.errors import ConfigError

DEFAULT_SMTP_PORTS: tuple[int, ...] = (25, 465, 587, 2525)
#: Largest counter accepted (packets, bytes): what a ClickHouse UInt64 and the record hold.
MAX_COUNTER = 2**64 - 1
#: Largest epoch millisecond accepted (9999-12-31T23:59:59.999Z).
MAX_EPOCH_MS = 253402300799999
#: Longest id/text value kept in a record (tenant, instance, interface, helo, domain).
MAX_ID_CHARS = 255

_TS_MS = pa.timestamp("ms", tz="UTC")


def smtp_ports_config(smtp_ports: Sequence[int] | None) -> tuple[int, ...] | None:
    """Validate the SMTP ports a parser keeps (None keeps every flow)."""
    if smtp_ports is None:
        return None
    ports = []
    for p in smtp_ports:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= int(p) <= 65535:
            raise ConfigError(f"SMTP port {p!r} is not a port number (0-65535)")
        ports.append(int(p))
    if not ports:
        raise ConfigError("smtp_ports is empty: give at least one port, or None to keep every flow")
    return tuple(sorted(set(ports)))


def np_(a: pa.Array | pa.ChunkedArray | pl.Series) -> np.ndarray:
    if isinstance(a, pl.Series):
        return a.to_numpy()
    return a.to_numpy(zero_copy_only=False)


def short(tok: object, limit: int = 40) -> str:
    """A value quoted for a reject reason, cut to ``limit`` characters."""
    s = tok if isinstance(tok, str) else str(tok)
    return repr(s if len(s) <= limit else s[:limit] + "...")


def lines_to_arrow(lines: list[Any]) -> tuple[pa.Array, dict[int, str], dict[int, str]]:
    """Lines as one Arrow string array.

    Lines that cannot be text (lone surrogates from ``surrogateescape`` decoding, invalid
    UTF-8 bytes, non-strings) become an empty placeholder and are reported in ``forced``
    (row -> reason) with a printable ``raw`` (row -> text) for the dead letter.
    """
    forced: dict[int, str] = {}
    raws: dict[int, str] = {}
    try:
        arr = pa.array(lines, pa.string())
    except (UnicodeError, pa.ArrowException, TypeError, ValueError):
        fixed: list[str] = []
        for i, line in enumerate(lines):
            if isinstance(line, str):
                try:
                    line.encode("utf-8")
                    fixed.append(line)
                    continue
                except UnicodeEncodeError:
                    forced[i] = "undecodable bytes (invalid UTF-8 in the input)"
                    raws[i] = line.encode("utf-8", "backslashreplace").decode("utf-8")
            elif isinstance(line, (bytes, bytearray, memoryview)):
                try:
                    fixed.append(bytes(line).decode("utf-8"))
                    continue
                except UnicodeDecodeError:
                    forced[i] = "undecodable bytes (invalid UTF-8 in the input)"
                    raws[i] = bytes(line).decode("utf-8", "backslashreplace")
            else:
                forced[i] = f"not a text line ({type(line).__name__})"
                raws[i] = repr(line)
            fixed.append("")
        arr = pa.array(fixed, pa.string())
    if isinstance(arr, pa.ChunkedArray):  # more than 2 GiB of text in one chunk
        arr = pa.concat_arrays([c.cast(pa.large_string()) for c in arr.chunks])
    if arr.null_count:  # None in the list
        for i in np.flatnonzero(np_(arr.is_null())).tolist():
            forced[i] = f"not a text line ({type(lines[i]).__name__})"
            raws[i] = repr(lines[i])
        arr = pc.fill_null(arr, "")
    return arr, forced, raws


def line_text(lines: list[Any], arr: pa.Array, i: int) -> str:
    """Line ``i`` as str (bytes input that was valid UTF-8 is decoded)."""
    s = lines[i]
    return s if isinstance(s, str) else arr[i].as_py()


class Split:
    """Every line of a chunk split on one separator: ``field(rows, k)`` is the k-th
    field of the given rows, as one Arrow string array (one ``take``, no copy of text
    per row in Python)."""

    def __init__(self, arr: pa.Array, sep: str):
        sp = pc.split_pattern(arr, sep)
        self.counts = np_(pc.list_value_length(sp)).astype(np.int64)
        self.offsets = np_(sp.offsets)[:-1].astype(np.int64)
        self.values = sp.values

    def field(self, rows: np.ndarray, k: int) -> pa.Array:
        return self.values.take(pa.array(self.offsets[rows] + k))

    def padded(self, rows: np.ndarray, k: int, byte: int = 32) -> bool:
        """Whether the k-th field of any of the rows starts or ends with ``byte`` (a space),
        read from the Arrow buffers without copying text."""
        bufs = self.values.buffers()
        if bufs[2] is None or bufs[2].size == 0:
            return False
        dtype = np.int64 if pa.types.is_large_string(self.values.type) else np.int32
        voff = np.frombuffer(bufs[1], dtype=dtype)[self.values.offset : self.values.offset + len(self.values) + 1]
        data = np.frombuffer(bufs[2], dtype=np.uint8)
        idx = self.offsets[rows] + k
        start, end = voff[idx].astype(np.int64), voff[idx + 1].astype(np.int64)
        nonempty = end > start
        if not nonempty.any():
            return False
        start, end = start[nonempty], end[nonempty]
        return bool((data[start] == byte).any() or (data[end - 1] == byte).any())


def decimal_ok(col: pa.Array, max_digits: int) -> np.ndarray:
    """Text that is 1..max_digits ASCII digits (the value may still be out of range)."""
    return np_(pc.ascii_is_decimal(col)) & (np_(pc.binary_length(col)) <= max_digits) & (np_(pc.binary_length(col)) > 0)


def uint_problem(name: str, tok: str, top: int) -> str | None:
    """Why ``tok`` is not an unsigned integer in 0..top (None when it is)."""
    if tok == "":
        return f"missing {name} (empty)"
    if tok[:1] == "-" and tok[1:].isascii() and tok[1:].isdigit():
        return f"negative {name}: {short(tok)}"
    if not (tok.isascii() and tok.isdigit()):
        return f"non-numeric {name}: {short(tok)}"
    if len(tok) > len(str(top)) or int(tok) > top:
        return f"{name} out of range: {short(tok)} (max {top})"
    return None


def int_problem(name: str, v: object, top: int) -> str | None:
    """Why a decoded JSON value is not an unsigned integer in 0..top."""
    if isinstance(v, bool) or v is None:
        return f"missing {name}" if v is None else f"wrong type for {name}: boolean"
    if isinstance(v, str):
        return uint_problem(name, v, top)
    if isinstance(v, int):
        if v < 0:
            return f"negative {name}: {v}"
        if v > top:
            return f"{name} out of range: {v} (max {top})"
        return None
    return f"wrong type for {name}: {type(v).__name__}"


def uint_from_text(col: pa.Array, top: int) -> tuple[pa.Array, np.ndarray]:
    """Cast a text column of decimal digits to uint64; returns (values, ok mask).
    Rows that are not 1..20 digits or exceed ``top`` are not ok (their value is 0)."""
    ok = decimal_ok(col, 20)
    if not ok.all():
        col = pc.if_else(pa.array(ok), col, "0")
    twenty = ok & (np_(pc.binary_length(col)) == 20)
    if twenty.any():  # 20 digits may not fit in 64 bits
        big = np.flatnonzero(twenty)
        for i, s in zip(big.tolist(), col.take(pa.array(big)).to_pylist()):
            if int(s) > MAX_COUNTER:
                twenty[i] = False
                ok[i] = False
        col = pc.if_else(pa.array(ok), col, "0")
    vals = pc.cast(col, pa.uint64())
    if top < MAX_COUNTER:
        ok &= np_(pc.less_equal(vals, pa.scalar(top, pa.uint64())))
    return vals, ok


def port_from_text(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    vals, ok = uint_from_text(col, 65535)
    return pc.cast(pc.if_else(pa.array(ok), vals, pa.scalar(0, pa.uint64())), pa.int32()), ok


class Filler:
    """The value of every record column a source does not give (record defaults,
    ``source_format``, ``exporter``), taken once from :func:`record.conform`."""

    def __init__(self, source_format: str, exporter: str):
        one = {
            "start": pa.array([0], _TS_MS),
            "end": pa.array([0], _TS_MS),
            "src_ip": pa.array([""]),
            "dst_ip": pa.array([""]),
        }
        for f in ("src_port", "dst_port", "protocol", "packets", "bytes"):
            one[f] = pa.array([0], pa.int64())
        proto = record.conform(pa.table(one), source_format=source_format, exporter=exporter)
        self.scalars = {f.name: proto.column(f.name)[0] for f in record.FIELDS}

    def table(self, cols: dict[str, pa.Array], n: int) -> pa.Table:
        """A record table from the given columns (cast to the record types) and
        constants for the others."""
        out = []
        for f in record.FIELDS:
            a = cols.get(f.name)
            if a is None:
                s = self.scalars[f.name]
                a = pa.nulls(n, f.arrow) if not s.is_valid else pa.repeat(s, n)
            else:
                if isinstance(a, pa.ChunkedArray):
                    a = a.combine_chunks()
                if a.type != f.arrow:
                    a = a.cast(f.arrow)
            out.append(a)
        return pa.Table.from_arrays(out, schema=record.SCHEMA)


def ms_timestamps(ms: pa.Array | np.ndarray) -> pa.Array:
    if isinstance(ms, np.ndarray):
        ms = pa.array(ms.astype(np.int64))
    return pc.cast(ms, pa.int64()).cast(_TS_MS)


def pair_reverse(
    src: pa.Array,
    dst: pa.Array,
    sport: np.ndarray,
    dport: np.ndarray,
    proto: np.ndarray,
    fwd_scope: pa.Array,
    rev_scope: pa.Array,
    fwd: np.ndarray,
    rev: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair reverse (server-to-client) flows with forward (client-to-server) flows of
    the same connection: reversed 5-tuple and the same scope (the client's account or
    project as each row names it); the k-th reverse of a connection, in input order,
    with the k-th forward one. Returns row positions (forward, reverse).

    An exact join on the key columns (polars), so two connections are never mixed up.
    """
    fi = np.flatnonzero(fwd)
    ri = np.flatnonzero(rev)
    if fi.size == 0 or ri.size == 0:
        return fi[:0], ri[:0]
    f = pl.DataFrame(
        {
            "a": pl.from_arrow(src.take(pa.array(fi))),
            "b": pl.from_arrow(dst.take(pa.array(fi))),
            "pa": sport[fi],
            "pb": dport[fi],
            "pr": proto[fi],
            "s": pl.from_arrow(fwd_scope.take(pa.array(fi))),
            "row": fi,
        }
    )
    r = pl.DataFrame(
        {
            "a": pl.from_arrow(dst.take(pa.array(ri))),
            "b": pl.from_arrow(src.take(pa.array(ri))),
            "pa": dport[ri],
            "pb": sport[ri],
            "pr": proto[ri],
            "s": pl.from_arrow(rev_scope.take(pa.array(ri))),
            "row": ri,
        }
    )
    key = ["a", "b", "pa", "pb", "pr", "s"]
    f = f.with_columns(k=pl.int_range(pl.len()).over(key))
    r = r.with_columns(k=pl.int_range(pl.len()).over(key))
    j = f.join(r, on=key + ["k"], how="inner", suffix="_r")
    return j["row"].to_numpy(), j["row_r"].to_numpy()


IS_WS = np.zeros(256, dtype=bool)
IS_WS[[9, 10, 11, 12, 13, 32]] = True
IS_ALPHA = np.zeros(256, dtype=bool)
IS_ALPHA[[ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"]] = True


def edge_bytes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First byte, last byte (0 for an empty string) and byte length of every string,
    read straight from the Arrow buffers (no copy of the text)."""
    bufs = arr.buffers()
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    off = np.frombuffer(bufs[1], dtype=dtype)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    lens = np.diff(off)
    if bufs[2] is None or bufs[2].size == 0 or not lens.any():
        z = np.zeros(len(arr), dtype=np.uint8)
        return z, z, lens
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    nonempty = lens > 0
    first = np.where(nonempty, data[np.minimum(off[:-1], data.size - 1)], 0).astype(np.uint8)
    last = np.where(nonempty, data[np.clip(off[1:] - 1, 0, data.size - 1)], 0).astype(np.uint8)
    return first, last, lens


_NOT_PRINTABLE = re.compile(r"[^ -~]")


def line_problem(line: str, max_chars: int, allow: str = "") -> str:
    """Why a line of an ASCII text format is unusable: binary data, undecodable bytes,
    non-ASCII text or excessive length (``allow``: control characters the format uses,
    such as a tab separator)."""
    if len(line) > max_chars:
        return f"line too long: {len(line)} chars (limit {max_chars})"
    for m in _NOT_PRINTABLE.finditer(line):
        ch = m.group()
        if ch in allow:
            continue
        col = m.start() + 1
        if ch == "\ufffd":
            return f"undecodable bytes (U+FFFD replacement character at column {col})"
        if "\ud800" <= ch <= "\udfff":
            return f"undecodable bytes (lone surrogate at column {col})"
        if ord(ch) < 32 or ord(ch) == 127:
            return f"binary data: control character {ch!r} at column {col}"
        return f"non-ASCII character U+{ord(ch):04X} at column {col}"
    return "invalid line"


def datetime_maps(st: pl.Series) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """For the distinct dates (first ten characters) and times of day (characters 12-19)
    of ``YYYY?MM?DD?HH:MM:SS`` texts: epoch day and second of the day, None when
    impossible. A chunk of flows has few of each, so Python checks them once."""
    days: dict[str, int | None] = {}
    for d in st.str.slice(0, 10).drop_nulls().unique().to_list():
        try:
            days[d] = (dt.date(int(d[0:4]), int(d[5:7]), int(d[8:10])) - dt.date(1970, 1, 1)).days
        except ValueError:
            days[d] = None
    tods: dict[str, int | None] = {}
    for t in st.str.slice(11, 8).drop_nulls().unique().to_list():
        ok = len(t) == 8 and t[2] == ":" and t[5] == ":" and t[:2].isdigit() and t[3:5].isdigit() and t[6:].isdigit()
        tods[t] = (
            int(t[:2]) * 3600 + int(t[3:5]) * 60 + int(t[6:])
            if ok and int(t[:2]) < 24 and int(t[3:5]) < 60 and int(t[6:]) < 60
            else None
        )
    return days, tods


def datetime_exprs(
    col: str, date_re: str, epoch_re: str | None, maps: tuple[dict[str, int | None], dict[str, int | None]]
) -> tuple[dict[str, pl.Expr], pl.Expr, pl.Expr]:
    """Expressions for the epoch microseconds of a date-time text column and its ok flag.

    Texts matching ``date_re`` are ``YYYY?MM?DD?HH:MM:SS[.fraction][Z]`` (one-character
    separators, UTC, digits past microseconds dropped; ``maps`` from
    :func:`datetime_maps`); texts matching ``epoch_re`` are epoch seconds with an
    optional fraction. Returns (parts, microseconds, ok): ``parts`` are columns to add
    first (``with_columns``), the other two expressions read them; evaluating the
    parts once is faster than one nested expression.
    """
    days, tods = maps
    s = pl.col(col)
    p = f"_{col}_"
    parts = {
        p + "date": s.str.contains(date_re).fill_null(False),
        p + "day": s.str.slice(0, 10).replace_strict(days, default=None, return_dtype=pl.Int64),
        p + "tod": s.str.slice(11, 8).replace_strict(tods, default=None, return_dtype=pl.Int64),
        p + "frac": s.str.slice(20, 6)
        .str.strip_chars_end("Z")
        .str.pad_end(6, "0")
        .cast(pl.Int64, strict=False)
        .fill_null(0),
    }
    c = pl.col
    date_ok = c(p + "date") & c(p + "day").is_not_null() & c(p + "tod").is_not_null()
    us = pl.when(date_ok).then((c(p + "day") * 86400 + c(p + "tod")) * 1_000_000 + c(p + "frac"))
    ok = date_ok
    if epoch_re is not None:
        split = s.str.split_exact(".", 1)
        parts[p + "epoch"] = s.str.contains(epoch_re).fill_null(False)
        parts[p + "whole"] = split.struct.field("field_0").cast(pl.Int64, strict=False)
        parts[p + "efrac"] = (
            split.struct.field("field_1").fill_null("").str.slice(0, 6).str.pad_end(6, "0").cast(pl.Int64, strict=False)
        )
        us = us.when(c(p + "epoch")).then(c(p + "whole") * 1_000_000 + c(p + "efrac"))
        ok = ok | c(p + "epoch")
    return parts, us.otherwise(0).fill_null(0), ok.fill_null(False)


def datetime_us(st: pl.Series, date_re: str, epoch_re: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Epoch microseconds of date-time texts and an ok mask (see :func:`datetime_exprs`)."""
    st = st.cast(pl.String)
    parts, us, ok = datetime_exprs("t", date_re, epoch_re, datetime_maps(st))
    out = pl.DataFrame({"t": st}).lazy().with_columns(**parts).select(us=us, ok=ok).collect()
    return np_(out["us"]).astype(np.int64), np_(out["ok"]).astype(bool)


class LineFrame:
    """A chunk of text lines as Arrow, with what every line format needs first: CRLF ends
    trimmed, the first/last byte and length of each line, which lines are blank, which
    could not be text (``forced``: row -> reason, ``raws``: row -> printable text), which
    are left to parse (``live``), and how many input lines count as read (blank ones do not)."""

    def __init__(self, lines: list[Any]):
        self.n = len(lines)
        self.arr, self.forced, self.raws = lines_to_arrow(lines)
        self.first_b, self.last_b, self.blen = edge_bytes(self.arr)
        self.trimmed = self.arr
        if (self.last_b == 13).any():  # CRLF line ends
            self.trimmed = pc.utf8_rtrim(self.arr, "\r")
            self.first_b, self.last_b, self.blen = edge_bytes(self.trimmed)
        blank = self.blen == 0
        ws = np.flatnonzero(IS_WS[self.first_b] & ~blank)
        if ws.size:
            blank[ws] = np_(pc.equal(pc.utf8_trim_whitespace(self.trimmed.take(pa.array(ws))), ""))
        live = ~blank
        if self.forced:
            rows = list(self.forced)
            blank[rows] = False
            live[rows] = False
        self.blank = blank
        self.live = live
        self.read = int(self.n - blank.sum())
