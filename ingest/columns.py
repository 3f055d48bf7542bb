"""Column helpers shared by the text and JSON flow parsers.

Every parser here works the same way: the input becomes Arrow columns of text, vector
checks mark the rows that cannot become records, a per-row Python twin of those checks
explains each bad row (only bad rows pay for Python), and the good rows are cast and
assembled into a record table with :data:`smtpguard.core.record.SCHEMA`.

What they share: lines as Arrow (:func:`lines_to_arrow`, :class:`LineFrame`), header
lines that declare the columns below them (:func:`header_states`, :func:`segments`),
checks and casts of fields, reject reasons, epoch times (:func:`ms_timestamps`,
:func:`datetime_us`; the last time a record can hold is
:data:`smtpguard.core.wire.MAX_EPOCH_MS`), and the base class :class:`ColumnParser`.
Which flows are SMTP is :mod:`smtpguard.ingest.selection`.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgspec
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard.core import record
from smtpguard.core.wire import MAX_EPOCH_MS
from smtpguard.ingest.base import Batch, Reject
from smtpguard.ingest.selection import DEFAULT_SMTP_PORTS, smtp_ports_config

#: Largest counter accepted (packets, bytes): what a ClickHouse UInt64 and the record hold.
MAX_COUNTER = 2**64 - 1
#: Largest epoch second accepted (9999-12-31T23:59:59Z; milliseconds: :data:`MAX_EPOCH_MS`).
MAX_EPOCH_S = MAX_EPOCH_MS // 1000
#: Longest id/text value kept in a record (tenant, instance, interface, helo, domain).
MAX_ID_CHARS = 255

_TS_MS = pa.timestamp("ms", tz="UTC")


def block_lines(data: bytes | memoryview, crlf: bool) -> list[str]:
    """The lines of a block of ``\n``-separated bytes as the reader hands it (no final newline),
    decoded (undecodable bytes become U+FFFD); with ``crlf``, a CR ending a line is dropped."""
    lines = bytes(data).decode("utf-8", "replace").split("\n")
    return [ln.rstrip("\r") for ln in lines] if crlf else lines


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


def uint_problem(name: str, tok: str, top: int, missing: str = "") -> str | None:
    """Why ``tok`` is not an unsigned integer in 0..top (None when it is); ``missing`` is
    the token that stands for no value."""
    if tok == missing:
        return f"missing {name} ({'empty' if missing == '' else repr(missing)})"
    if tok[:1] == "-" and tok[1:].isascii() and tok[1:].isdigit():
        return f"negative {name}: {short(tok)}"
    if not (tok.isascii() and tok.isdigit()):
        return f"non-numeric {name}: {short(tok)}"
    if len(tok) > len(str(top)) or int(tok) > top:
        return f"{name} out of range: {short(tok)} (max {top})"
    return None


def json_problem(e: Exception) -> str:
    """The reject reason for JSON text that msgspec could not decode: the wrong type for
    the expected structure, or not JSON at all."""
    return f"wrong JSON type: {e}" if isinstance(e, msgspec.ValidationError) else f"invalid JSON: {e}"


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

    def column(self, name: str, n: int) -> pa.Array:
        """The constant column ``name`` for ``n`` rows."""
        s = self.scalars[name]
        return pa.nulls(n, s.type) if not s.is_valid else pa.repeat(s, n)

    def table(self, cols: dict[str, pa.Array | None], n: int) -> pa.Table:
        """A record table from the given columns (cast to the record types) and
        constants for the others."""
        out = []
        for f in record.FIELDS:
            a = cols.get(f.name)
            if a is None:
                a = self.column(f.name, n)
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


def char_problem(line: str, allow: str = "", non_ascii: str = "") -> str | None:
    """Why a line of an ASCII text format cannot be read, from its first character that
    the format cannot hold: binary data, undecodable bytes or non-ASCII text (``allow``:
    control characters the format uses, such as a tab separator; ``non_ascii``: said
    after a non-ASCII character). None when every character is fine."""
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
        return f"non-ASCII character U+{ord(ch):04X} at column {col}{non_ascii}"
    return None


def line_problem(line: str, max_chars: int, allow: str = "") -> str:
    """Why a line of an ASCII text format is unusable: excessive length, else what
    :func:`char_problem` says."""
    if len(line) > max_chars:
        return f"line too long: {len(line)} chars (limit {max_chars})"
    return char_problem(line, allow) or "invalid line"


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
        self.lines = lines
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

    def text(self, i: int) -> str:
        """Line ``i`` as str, without its CR end."""
        return line_text(self.lines, self.arr, i).rstrip("\r")


class BadHeader:
    """The state after a rejected header line: the lines under it cannot be decoded."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def header_states(
    rows: Iterable[int],
    classify: Callable[[int, int], tuple[str, Any]],
    state: Any,
    live: np.ndarray,
    first_line_no: int,
    problems: list[tuple[int, str]],
) -> tuple[list[Any], list[int], int]:
    """The header lines among ``rows``, in order, for formats whose header line declares
    the columns of the lines below it. ``classify(row, line_no)`` tells what a row is:
    ``("header", layout)``, ``("bad", reason)`` or ``("data", None)``. Header lines leave
    ``live``; a rejected one is a problem, and the lines below it get a :class:`BadHeader`.

    Returns (the states in force: ``state`` and one per header line, the header rows, how
    many headers were accepted); :func:`segments` splits the chunk by them.
    """
    states = [state]
    hdr_rows: list[int] = []
    accepted = 0
    for i in rows:
        line_no = first_line_no + i
        kind, what = classify(i, line_no)
        if kind == "data":
            continue
        hdr_rows.append(i)
        live[i] = False
        if kind == "header":
            states.append(what)
            accepted += 1
        else:
            problems.append((i, what))
            states.append(BadHeader(f"no usable layout: the header at line {line_no} was rejected ({what})"))
    return states, hdr_rows, accepted


def segments(
    live: np.ndarray, hdr_rows: Sequence[int] | np.ndarray, states: list[Any]
) -> Iterator[tuple[Any, np.ndarray]]:
    """(state, live rows under it) for each state in force in a chunk, in order: header
    row k (in ``hdr_rows``, ascending) starts ``states[k + 1]``. States with no live row
    are left out."""
    rows_all = np.flatnonzero(live)
    seg = np.searchsorted(np.asarray(hdr_rows, dtype=np.int64), rows_all, side="right") if len(hdr_rows) else None
    for s, state in enumerate(states):
        rows = rows_all if seg is None else rows_all[seg == s]
        if rows.size:
            yield state, rows


class ColumnParser:
    """Base of the parsers built on these helpers: the source they read, the SMTP ports
    they keep, the constants of the record columns their format does not give, and how
    their rows become a batch."""

    name = ""

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS):
        self.source = source
        self.smtp_ports = smtp_ports_config(smtp_ports)
        self._fill = Filler(self.name, source)

    def _assemble(self, parts: list[tuple[np.ndarray, dict[str, pa.Array]]]) -> pa.Table:
        """One record table from parts of (input rows, record columns), in input order."""
        if not parts:
            return self._fill.table({}, 0)
        tables = [self._fill.table(cols, len(rows)) for rows, cols in parts]
        if len(tables) == 1:
            return tables[0]
        order = np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable")
        return pa.concat_tables(tables).take(pa.array(order))

    def _batch(
        self,
        table: pa.Table,
        problems: list[tuple[int, str]],
        lines: list[Any],
        raws: dict[int, str],
        first_line_no: int,
        read: int,
        skipped: int,
    ) -> Batch:
        """The batch of a chunk of lines: ``table``, and a dead letter for each problem
        (row, reason), in row order."""
        problems.sort()
        rejects = [
            Reject.make(self.source, first_line_no + i, reason, raws.get(i, lines[i]), self.name)
            for i, reason in problems
        ]
        return Batch(table, rejects, read, skipped)
