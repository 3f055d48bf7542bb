"""AWS VPC Flow Logs, text format (S3 objects, CloudWatch Logs exports) → records.

A pure parser: :class:`AwsVpcParser` is fed consecutive chunks of lines of one file and
returns :class:`~smtpguard.ingest.base.Batch` objects. Its only state is the layout
declared by the last header line.

Layouts
    * a header line (``version account-id interface-id srcaddr ...``, or the
      ``${version} ${account-id} ...`` spelling) declares the columns of the lines that
      follow, in any order, with any known field names (versions 2 to 5, plus the
      version 7 ECS and version 8 ``reject-reason`` names, which are ignored);
    * without a header, a line is routed by its version and field count only:
      version 2 with 14 fields is the default format; versions 3, 4 and 5 with 21, 25
      and 29 fields are the "all fields" layouts (v2 fields, then the v3, v4 and v5
      fields in the order of the AWS field table); version 6 with 36 fields is the
      Transit Gateway default format (:data:`TGW_FIELDS`, every Transit Gateway field).
      Anything else is rejected: columns are never assigned by guess.

Transit Gateway flow logs
    A record of a Transit Gateway (or attachment) flow log has no action (``unknown``)
    and no instance; ``tenant`` is the account of the source VPC
    (``tgw-src-vpc-account-id``, else ``account-id``) and ``interface_id`` the
    Transit Gateway ENI on the source side (``tgw-src-eni``). A Transit Gateway logs a
    flow at each attachment it crosses, so one connection between two attachments can
    appear twice (ingress at one, egress at the other); both are kept.

Fast path
    The whole chunk is handled as Arrow columns: one split of every line into tokens,
    one ``take`` per needed column, and vector checks (regex for IPv4, digit checks,
    numeric casts, range checks). Python loops only run over rejected rows, header
    lines and IPv6 addresses.

SMTP selection (``smtp_ports`` not None)
    A flow is kept when its destination port is an SMTP port (client to server). A flow
    whose source port is an SMTP port (server to client) is paired with the forward
    flow of the same chunk that has the reversed 5-tuple on the same interface and
    account (the k-th reverse flow of a connection, in input order, with the k-th
    forward one; for Transit Gateway records, the same attachment and account); its
    packets and bytes become the forward record's ``rev_packets`` /
    ``rev_bytes`` (:func:`smtpguard.ingest.selection.pair_reverse`). Reverse flows,
    paired or not, count as skipped, as do other ports and NODATA/SKIPDATA rows. With
    ``smtp_ports=None`` every valid flow is kept as is.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from smtpguard.core import record
from smtpguard.ingest.base import Batch
from smtpguard.ingest.columns import IS_WS as _IS_WS
from smtpguard.ingest.columns import (
    MAX_EPOCH_S,
    MAX_ID_CHARS,
    BadHeader,
    ColumnParser,
    block_lines,
    Split,
    char_problem,
    header_states,
    line_text,
    lines_to_arrow,
    ms_timestamps,
    segments,
    short,
    uint_problem,
)
from smtpguard.ingest.columns import edge_bytes as _edge_bytes
from smtpguard.ingest.columns import np_ as _np
from smtpguard.ingest.selection import DEFAULT_SMTP_PORTS, pair_reverse, smtp_directions
from smtpguard.core.iputil import canonical_ip, canonicalize_ips

NAME = "aws-vpc"

V2_FIELDS = (
    "version", "account-id", "interface-id", "srcaddr", "dstaddr", "srcport", "dstport",
    "protocol", "packets", "bytes", "start", "end", "action", "log-status",
)
V3_FIELDS = ("vpc-id", "subnet-id", "instance-id", "tcp-flags", "type", "pkt-srcaddr", "pkt-dstaddr")
V4_FIELDS = ("region", "az-id", "sublocation-type", "sublocation-id")
V5_FIELDS = ("pkt-src-aws-service", "pkt-dst-aws-service", "flow-direction", "traffic-path")
V7_FIELDS = (
    "ecs-cluster-arn", "ecs-cluster-name", "ecs-container-instance-arn", "ecs-container-instance-id",
    "ecs-container-id", "ecs-second-container-id", "ecs-service-name", "ecs-task-definition-arn",
    "ecs-task-arn", "ecs-task-id",
)
V8_FIELDS = ("reject-reason",)
#: The Transit Gateway default format (version 6): every Transit Gateway field, in the
#: order of the AWS Transit Gateway flow log record table.
TGW_FIELDS = (
    "version", "resource-type", "account-id", "tgw-id", "tgw-attachment-id", "tgw-src-vpc-account-id",
    "tgw-dst-vpc-account-id", "tgw-src-vpc-id", "tgw-dst-vpc-id", "tgw-src-subnet-id", "tgw-dst-subnet-id",
    "tgw-src-eni", "tgw-dst-eni", "tgw-src-az-id", "tgw-dst-az-id", "tgw-pair-attachment-id",
    "srcaddr", "dstaddr", "srcport", "dstport", "protocol", "packets", "bytes", "start", "end", "log-status",
    "type", "packets-lost-no-route", "packets-lost-blackhole", "packets-lost-mtu-exceeded",
    "packets-lost-ttl-expired", "tcp-flags", "region", "flow-direction", "pkt-src-aws-service", "pkt-dst-aws-service",
)
KNOWN_FIELDS: frozenset[str] = frozenset(
    V2_FIELDS + V3_FIELDS + V4_FIELDS + V5_FIELDS + V7_FIELDS + V8_FIELDS + TGW_FIELDS
)

#: Fields a layout must have to give a record.
REQUIRED_FIELDS = ("srcaddr", "dstaddr", "srcport", "dstport", "protocol", "packets", "bytes", "start", "end")
_TUPLE_FIELDS = ("srcaddr", "dstaddr", "srcport", "dstport", "protocol")

#: Longest line accepted (a v5 all-fields line is ~250 chars, with every ECS field ~2 KB).
MAX_LINE_CHARS = 8192

_UINT_RULES: dict[str, tuple[int, int]] = {  # field -> (max digits: those of the max value, max value)
    "srcport": (5, 65535),
    "dstport": (5, 65535),
    "protocol": (3, 255),
    "packets": (19, 10**19 - 1),
    "bytes": (19, 10**19 - 1),
    "start": (12, MAX_EPOCH_S),
    "end": (12, MAX_EPOCH_S),
    "tcp-flags": (5, 65535),
}
#: The numeric fields of a record and the types they are cast to.
_NUM_TYPES: dict[str, pa.DataType] = {
    "srcport": pa.int32(), "dstport": pa.int32(), "protocol": pa.int32(),
    "start": pa.int64(), "end": pa.int64(), "packets": pa.uint64(), "bytes": pa.uint64(),
}
_ACTIONS = ("ACCEPT", "REJECT", "-")
#: Flow log lines as the multi-column reader sees them: fields split on single spaces, no quoting
_CSV_PARSE = pa_csv.ParseOptions(delimiter=" ", quote_char=False, double_quote=False, escape_char=False,
                                 newlines_in_values=False, ignore_empty_lines=False)
_ACTION_OUT = pa.array(["accept", "reject", "unknown"], pa.string())
_ID_FIELDS = (("account-id", "tenant"), ("interface-id", "interface_id"), ("instance-id", "instance_id"))
#: Transit Gateway ids that become record fields (checked for length like _ID_FIELDS).
_TGW_ID_FIELDS = ("tgw-src-vpc-account-id", "tgw-src-eni", "tgw-attachment-id")
#: Columns that carry the pairing scope of a row (interface or attachment, account)
#: from decoding to assembly; they are not record fields.
_PAIR_COLS = ("_pair_if", "_pair_acct")

_TOKEN = r"(?:\$\{[A-Za-z][A-Za-z0-9_-]*\}|[A-Za-z][A-Za-z_-]*)"
#: Lines that may be a header: only name-like tokens (checked against KNOWN_FIELDS after).
_HEADER_CANDIDATE_RE = rf"^{_TOKEN}(?: {_TOKEN})*$"
_WS = " \t\n\v\f\r"  # what pyarrow's ascii_trim_whitespace trims


class Layout:
    """Column order of a family of lines, and where it came from (for messages)."""

    __slots__ = ("fields", "pos", "desc")

    def __init__(self, fields: Iterable[str], desc: str):
        self.fields: tuple[str, ...] = tuple(fields)
        self.pos: dict[str, int] = {f: i for i, f in enumerate(self.fields)}
        self.desc = desc

    def __repr__(self) -> str:
        return f"Layout({len(self.fields)} fields, {self.desc})"


#: Headerless layouts, by (version token, field count).
HEADERLESS_LAYOUTS: dict[tuple[str, int], Layout] = {
    ("2", 14): Layout(V2_FIELDS, "headerless version 2 default format"),
    ("3", 21): Layout(V2_FIELDS + V3_FIELDS, "headerless version 3 all-fields format"),
    ("4", 25): Layout(V2_FIELDS + V3_FIELDS + V4_FIELDS, "headerless version 4 all-fields format"),
    ("5", 29): Layout(V2_FIELDS + V3_FIELDS + V4_FIELDS + V5_FIELDS, "headerless version 5 all-fields format"),
    ("6", 36): Layout(TGW_FIELDS, "headerless Transit Gateway version 6 default format"),
}
_HEADERLESS_COUNT = {v: c for v, c in HEADERLESS_LAYOUTS}


def _header_tokens(line: str) -> list[str]:
    out = []
    for t in line.strip(_WS).split(" "):
        if t.startswith("${") and t.endswith("}"):
            t = t[2:-1]
        out.append(t)
    return out


def _classify_header(line: str, line_no: int = 0) -> tuple[str, Layout | str | None]:
    """('header', Layout) | ('bad', reason) | ('data', None) for a header-like line at ``line_no``."""
    names = _header_tokens(line)
    known = [n for n in names if n in KNOWN_FIELDS]
    if not known:
        return "data", None
    unknown = [n for n in names if n not in KNOWN_FIELDS]
    if unknown:
        return "bad", "invalid header: unknown field name(s) " + ", ".join(short(n) for n in unknown[:10])
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        return "bad", "invalid header: duplicate field name(s) " + ", ".join(dups)
    missing = [f for f in REQUIRED_FIELDS if f not in names]
    if missing:
        return "bad", "header lacks field(s) needed for a record: " + ", ".join(missing)
    return "header", Layout(names, f"header at line {line_no}")


def _text_checks(c: dict[str, pa.Array], ok: np.ndarray) -> np.ndarray:
    """``ok`` narrowed to the rows whose action, ids and addresses are valid (both parsing paths run
    these); the address columns of ``c`` become canonical text."""
    if "action" in c:
        ok &= _np(pc.is_in(c["action"], value_set=pa.array(_ACTIONS)))
    for f in [f for f, _ in _ID_FIELDS] + list(_TGW_ID_FIELDS):
        if f in c:
            ok &= _np(pc.binary_length(c[f])) <= MAX_ID_CHARS
    c["srcaddr"], src_ok = canonicalize_ips(c["srcaddr"], check=ok)
    c["dstaddr"], dst_ok = canonicalize_ips(c["dstaddr"], check=ok & src_ok)
    return ok & src_ok & dst_ok


def _headerless_problem(tokens: list[str]) -> str:
    ver, n = tokens[0], len(tokens)
    if ver == "6":
        # version 6 lines are Transit Gateway logs; only their default layout has no header
        return (
            f"unknown layout: version '6' line with {n} fields and no header line declaring the columns "
            f"(the Transit Gateway default format has {len(TGW_FIELDS)} fields)"
        )
    if ver in _HEADERLESS_COUNT:
        want = _HEADERLESS_COUNT[ver]
        layout = HEADERLESS_LAYOUTS[(ver, want)]
        hint = " (empty field: consecutive spaces)" if "" in tokens else ""
        return (
            f"wrong field count: expected {want} fields ({layout.desc}), got {n}{hint}; "
            "other layouts need a header line"
        )
    if ver.isascii() and ver.isdigit():
        return f"unknown layout: version {short(ver)} line with {n} fields and no header line declaring the columns"
    return (
        f"unknown layout: first field {short(ver)} is not a flow log version (2-6) "
        "and no header line declares the columns"
    )


def _line_problem(line: str) -> str | None:
    """Line-level problems: binary data, non-ASCII text, excessive length."""
    problem = char_problem(line, non_ascii=" (flow logs are ASCII text)")
    if problem is None and len(line) > MAX_LINE_CHARS:
        return f"line too long: {len(line)} chars (limit {MAX_LINE_CHARS})"
    return problem


def _uint_problem(name: str, tok: str) -> str | None:
    return uint_problem(name, tok, _UINT_RULES[name][1], missing="-")


def _row_problem(tokens: list[str], layout: Layout) -> str | None:
    """Why a row of a known layout cannot become a record (Python twin of the vector checks)."""
    if len(tokens) != len(layout.fields):
        hint = " (empty field: consecutive spaces)" if "" in tokens else ""
        return f"wrong field count: expected {len(layout.fields)} fields ({layout.desc}), got {len(tokens)}{hint}"
    get = lambda f: tokens[layout.pos[f]]  # noqa: E731
    if all(get(f) == "-" for f in _TUPLE_FIELDS):
        return None  # NODATA / SKIPDATA
    for f in ("srcaddr", "dstaddr"):
        tok = get(f)
        if tok == "-":
            return f"missing {f} ('-')"
        if canonical_ip(tok) is None:
            return f"invalid IP address in {f}: {short(tok)}"
    for f in ("srcport", "dstport", "protocol", "packets", "bytes", "start", "end"):
        p = _uint_problem(f, get(f))
        if p:
            return p
    if int(get("end")) < int(get("start")):
        return f"end before start: start {get('start')} > end {get('end')}"
    if "action" in layout.pos and get("action") not in _ACTIONS:
        return f"unknown action: {short(get('action'))} (expected ACCEPT, REJECT or -)"
    if "tcp-flags" in layout.pos and get("tcp-flags") != "-":
        p = _uint_problem("tcp-flags", get("tcp-flags"))
        if p:
            return p
    for f in [f for f, _ in _ID_FIELDS] + list(_TGW_ID_FIELDS):
        if f in layout.pos and len(get(f)) > MAX_ID_CHARS:
            return f"{f} too long: {len(get(f))} chars (limit {MAX_ID_CHARS})"
    return None


def _has_x(data: bytes | memoryview, buf: np.ndarray) -> bool:
    """Whether ``data`` (``buf`` is its bytes as an array) holds an ``x`` or ``X``. Searched with
    ``bytes.find`` in the bytes the block is a view of (a C byte scan, about a tenth of the time of a
    vector compare over the block)."""
    base = data.obj if isinstance(data, memoryview) else data
    if isinstance(base, bytes) and buf.size:
        at = buf.ctypes.data - np.frombuffer(base, np.uint8).ctypes.data
        end = at + buf.size
        if 0 <= at and end <= len(base):  # ``buf`` lies in ``base``
            return base.find(b"x", at, end) >= 0 or base.find(b"X", at, end) >= 0
    return bool(np.count_nonzero((buf | np.uint8(0x20)) == ord("x")))


def _digits_total(v: np.ndarray) -> int:
    """How many decimal digits the values of ``v`` (non-negative integers) have, all together."""
    if not v.size:
        return 0
    lo, hi = len(str(int(v.min()))), len(str(int(v.max())))
    # every value has at least lo digits; one more for each power of ten between lo and hi it reaches
    return v.size * lo + sum(int(np.count_nonzero(v >= 10**k)) for k in range(lo, hi))


_MAY_START_HEADER = np.zeros(256, dtype=bool)
_MAY_START_HEADER[[ord(ch) for ch in "$ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"]] = True


class AwsVpcParser(ColumnParser):
    """Parser for AWS VPC Flow Logs text; see the module docstring."""

    name = NAME

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS):
        super().__init__(source, smtp_ports)
        #: layout declared by the last header (None: no header seen, route by version)
        self._state: Layout | BadHeader | None = None

    # ------------------------------------------------------------------ public

    def parse_lines(self, lines: list[str], first_line_no: int) -> Batch:
        n = len(lines)
        if n == 0:
            return Batch.empty()
        arr, forced, raws = lines_to_arrow(lines)
        first_b, last_b, blen = _edge_bytes(arr)
        if (_IS_WS[first_b] | _IS_WS[last_b]).any():  # leading/trailing blanks, CRLF ends
            trimmed = pc.ascii_trim_whitespace(arr)
            first_b, last_b, blen = _edge_bytes(trimmed)
        else:
            trimmed = arr
        blank = blen == 0
        if forced:
            blank[list(forced)] = False
        read = int(n - blank.sum())

        def text(i: int) -> str:
            return line_text(lines, arr, i)

        problems: list[tuple[int, str]] = []  # (row, reason)
        skipped = 0

        # line-level: binary data, non-ASCII, too long
        line_bad = ~_np(pc.ascii_is_printable(trimmed)) | (blen > MAX_LINE_CHARS)
        line_bad &= ~blank
        if forced:
            line_bad[list(forced)] = True
        for i in np.flatnonzero(line_bad).tolist():
            reason = forced.get(i) or _line_problem(text(i).strip(_WS)) or "invalid line"
            problems.append((i, reason))
        live = ~blank & ~line_bad

        # header lines, in order; they split the chunk into segments
        cand = np.flatnonzero(_MAY_START_HEADER[first_b] & live)
        if cand.size:
            cand = cand[_np(pc.match_substring_regex(trimmed.take(cand), _HEADER_CANDIDATE_RE))]
        states, hdr_rows, skipped = header_states(
            cand.tolist(), lambda i, line_no: _classify_header(text(i), line_no), self._state, live, first_line_no,
            problems,
        )
        self._state = states[-1]

        split = Split(trimmed, " ")
        counts = split.counts

        # route every live row to a layout group
        groups: dict[tuple[str, ...], tuple[Layout, list[np.ndarray]]] = {}
        for state, rows in segments(live, hdr_rows, states):
            if state is None:
                first = split.field(rows, 0)
                cnt = counts[rows]
                matched = np.zeros(rows.size, dtype=bool)
                for (ver, want), layout in HEADERLESS_LAYOUTS.items():
                    m = (cnt == want) & _np(pc.equal(first, ver))
                    if m.any():
                        matched |= m
                        self._add(groups, layout, rows[m])
                for i in rows[~matched].tolist():
                    problems.append((i, _headerless_problem(text(i).strip(_WS).split(" "))))
            elif isinstance(state, BadHeader):
                problems.extend((i, state.reason) for i in rows.tolist())
            else:
                ok = counts[rows] == len(state.fields)
                self._add(groups, state, rows[ok])
                for i in rows[~ok].tolist():
                    problems.append((i, _row_problem(text(i).strip(_WS).split(" "), state) or "invalid record"))

        parts: list[tuple[np.ndarray, dict[str, pa.Array]]] = []
        for layout, chunks in groups.values():
            rows = chunks[0] if len(chunks) == 1 else np.sort(np.concatenate(chunks))
            good_rows, cols, nodata, bad = self._decode_group(layout, rows, split)
            skipped += nodata
            for i in bad.tolist():
                problems.append((i, _row_problem(text(i).strip(_WS).split(" "), layout) or "invalid record"))
            if good_rows.size:
                parts.append((good_rows, cols))

        table, more_skipped = self._assemble_paired(parts)
        return self._batch(table, problems, lines, raws, first_line_no, read, skipped + more_skipped)

    def parse_block(self, data: bytes | memoryview, first_line_no: int, crlf: bool = False) -> Batch:
        """Parse a block of whole lines as read from the file (``\n``-separated, no final
        newline). A clean block (ASCII text of one known layout, canonical numbers, every row
        valid) is read by a multi-column reader; any other block, or one in which any row
        fails a check, is parsed line by line by :meth:`parse_lines`, so both give the same
        records and the same dead letters. ``crlf``: strip a CR from each line's end, as the
        reader does for files with CRLF line ends."""
        if len(data):
            fast = self._parse_clean(data, first_line_no)
            if fast is not None:
                return fast
        return self.parse_lines(block_lines(data, crlf), first_line_no)

    # ---------------------------------------------------------------- internals

    def _parse_clean(self, data: bytes | memoryview, first_line_no: int) -> Batch | None:
        """The batch of a clean block (see :meth:`parse_block`), None when the block is not
        clean (nothing is changed then, the parser's layout included)."""
        buf = np.frombuffer(data, dtype=np.uint8)
        nl = np.flatnonzero(buf == 10)
        # printable ASCII and newlines only (bytes below 32 or above 126 wrap to 95 and up)
        if np.count_nonzero((buf - np.uint8(32)) > 94) != nl.size:
            return None
        # the reader takes "0x1F" for 31, which the line path refuses: a block with an x anywhere is judged
        # line by line (ids and addresses of flow logs have none)
        if _has_x(data, buf):
            return None
        pre = None
        saved = self._state
        if not 48 <= buf[0] <= 57:
            # a line that is not a flow (a header) leads the block: it takes the line-by-line path
            if nl.size == 0:
                return None
            pre = self.parse_lines([bytes(data[: nl[0]]).decode("ascii")], first_line_no)
            if pre.rejects or pre.records.num_rows:
                self._state = saved
                return None
            body_at = int(nl[0]) + 1
            data, buf, nl = data[body_at:], buf[body_at:], nl[1:] - body_at
            first_line_no += 1
            if not len(data):
                self._state = saved
                return None
        batch = self._read_clean(data, buf, nl)
        if batch is None:
            self._state = saved
            return None
        if pre is not None:
            batch.read += pre.read
            batch.skipped += pre.skipped
        return batch

    def _read_clean(self, data: bytes | memoryview, buf: np.ndarray, nl: np.ndarray) -> Batch | None:
        state = self._state
        version = None
        if state is None:
            first = bytes(data[: nl[0] if nl.size else len(data)]).split(b" ")
            layout = HEADERLESS_LAYOUTS.get((first[0].decode("ascii"), len(first)))
            if layout is None:
                return None
            version = first[0].decode("ascii")
        elif isinstance(state, Layout):
            layout = state
        else:
            return None
        n = nl.size + 1
        if np.diff(np.concatenate([[-1], nl, [buf.size]])).max() - 1 > MAX_LINE_CHARS:
            return None
        numeric = {f: _NUM_TYPES.get(f, pa.int32()) for f in layout.fields if f in _UINT_RULES}
        try:
            table = pa_csv.read_csv(
                pa.BufferReader(pa.py_buffer(data)),
                read_options=pa_csv.ReadOptions(column_names=list(layout.fields), use_threads=False,
                                                block_size=max(1 << 20, buf.size + 1)),
                parse_options=_CSV_PARSE,
                convert_options=pa_csv.ConvertOptions(
                    column_types={f: numeric.get(f, pa.string()) for f in layout.fields},
                    null_values=["-"], strings_can_be_null=False, quoted_strings_can_be_null=False,
                    check_utf8=False),  # ASCII, checked above
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None
        if table.num_rows != n:
            return None
        cols = {f: table.column(f).combine_chunks() for f in layout.fields}
        # Every token as written is the canonical text of its value. A decimal token the reader took is
        # never shorter than that text (a sign or leading zeros only add characters; "-" is one, as is
        # the "0" it stands for; hexadecimal, which can be shorter, never gets here), so the block's
        # length equals the sum of the canonical lengths exactly when every token is canonical: one sum
        # per column instead of one per row.
        expect = n * (len(layout.fields) - 1)
        for f, a in cols.items():
            if f in numeric:
                v = _np(a.fill_null(0))
                if v.dtype.kind == "i" and v.size and v.min() < 0:
                    return None
                expect += _digits_total(v)
            else:
                expect += int(pc.sum(pc.binary_length(a)).as_py() or 0)
        if expect != buf.size - nl.size:
            return None
        for f in ("packets", "bytes"):  # 20-digit counters fit a uint64 but not the line path's range
            if cols[f].null_count < len(cols[f]) and pc.max(cols[f]).as_py() > _UINT_RULES[f][1]:
                return None
        if version is not None and not pc.all(pc.equal(cols["version"], version)).as_py():
            return None
        c = {f: cols[f] for f in ("srcaddr", "dstaddr")}
        for f in ("action", "account-id", "interface-id", "instance-id") + _TGW_ID_FIELDS:
            if f in cols:
                c[f] = cols[f]
        dash = [_np(pc.equal(c["srcaddr"], "-")), _np(pc.equal(c["dstaddr"], "-"))]
        nodata = dash[0] & dash[1]
        for f in ("srcport", "dstport", "protocol"):
            nodata &= _np(cols[f].is_null())
        ok = ~nodata
        for f in _NUM_TYPES:
            if cols[f].null_count and (_np(cols[f].is_null()) & ok).any():
                return None
        if not np.array_equal(_text_checks(c, ok.copy()), ok):
            return None
        rows = np.flatnonzero(ok)
        nums = {f: cols[f] for f in _NUM_TYPES}
        flags = cols.get("tcp-flags")
        if not ok.all():
            keep = pa.array(ok)
            c = {k: v.filter(keep) for k, v in c.items()}
            nums = {k: v.filter(keep) for k, v in nums.items()}
            flags = flags.filter(keep) if flags is not None else None
        good, out, other, bad = self._finish(rows, c, nums, flags)
        if bad.size:
            return None
        table, more_skipped = self._assemble_paired([(good, out)] if good.size else [])
        return Batch(table, [], n, int(nodata.sum()) + other + more_skipped)

    @staticmethod
    def _add(groups: dict, layout: Layout, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        entry = groups.get(layout.fields)
        if entry is None:
            groups[layout.fields] = (layout, [rows])
        else:
            entry[1].append(rows)

    def _decode_group(
        self, layout: Layout, rows: np.ndarray, split: Split
    ) -> tuple[np.ndarray, dict[str, pa.Array], int, np.ndarray]:
        """Vector-decode rows that all have ``layout``'s field count.

        Returns (rows decoded, their record columns, rows skipped, rows rejected).
        Skipped are NODATA/SKIPDATA rows and, when ``smtp_ports`` is set, valid flows
        with no SMTP port on either side; the rows decoded are the other valid ones.
        """
        def col(name: str) -> pa.Array:
            return split.field(rows, layout.pos[name])

        c = {f: col(f) for f in REQUIRED_FIELDS}
        for f in ("action", "tcp-flags", "account-id", "interface-id", "instance-id") + _TGW_ID_FIELDS:
            if f in layout.pos:
                c[f] = col(f)

        dash = {f: _np(pc.equal(c[f], "-")) for f in _TUPLE_FIELDS}
        nodata = dash["srcaddr"] & dash["dstaddr"] & dash["srcport"] & dash["dstport"] & dash["protocol"]
        ok = ~nodata
        for f in ("srcport", "dstport", "protocol", "packets", "bytes", "start", "end"):
            ok &= _np(pc.ascii_is_decimal(c[f])) & (_np(pc.binary_length(c[f])) <= _UINT_RULES[f][0])
        if "tcp-flags" in c:
            fl = c["tcp-flags"]
            numeric = _np(pc.ascii_is_decimal(fl)) & (_np(pc.binary_length(fl)) <= _UINT_RULES["tcp-flags"][0])
            ok &= numeric | _np(pc.equal(fl, "-"))
        ok = _text_checks(c, ok)

        # keep the rows that passed the text checks, then cast and check ranges
        if not ok.all():
            keep = pa.array(ok)
            c = {k: v.filter(keep) for k, v in c.items()}
        good = rows[ok]
        bad = np.flatnonzero(~ok & ~nodata)

        nums = {f: pc.cast(c[f], t) for f, t in _NUM_TYPES.items()}
        flags = None
        if "tcp-flags" in c:
            fl = c["tcp-flags"]
            flags = pc.cast(pc.if_else(pc.equal(fl, "-"), pa.scalar(None, pa.string()), fl), pa.int32())
        good, out, other, bad2 = self._finish(good, c, nums, flags)
        bad = np.sort(np.concatenate([rows[bad], bad2])) if bad2.size else rows[bad]
        return good, out, int(nodata.sum()) + other, bad

    def _finish(
        self, good: np.ndarray, c: dict[str, pa.Array], nums: dict[str, pa.Array], flags: pa.Array | None
    ) -> tuple[np.ndarray, dict[str, pa.Array], int, np.ndarray]:
        """The rows ``good`` whose text passed the checks, with their numbers cast (``nums``,
        types of :data:`_NUM_TYPES`; ``flags``: tcp-flags, null for ``-``): range checks, the
        SMTP selection and the record columns. Returns (rows decoded, their record columns,
        valid rows skipped for their ports, rows rejected by a range check)."""
        sport, dport, proto = nums["srcport"], nums["dstport"], nums["protocol"]
        start, end, packets, nbytes = nums["start"], nums["end"], nums["packets"], nums["bytes"]
        ok2 = (
            _np(pc.less_equal(sport, 65535))
            & _np(pc.less_equal(dport, 65535))
            & _np(pc.less_equal(proto, 255))
            & _np(pc.less_equal(start, MAX_EPOCH_S))
            & _np(pc.less_equal(end, MAX_EPOCH_S))
            & _np(pc.greater_equal(end, start))
        )
        if flags is not None:
            ok2 &= _np(pc.fill_null(pc.less_equal(flags, 65535), True))
        bad = good[~ok2]

        # valid flows on no SMTP port are skipped here, before building their columns
        sel = ok2
        other = 0
        if self.smtp_ports is not None:
            fwd, rev = smtp_directions(_np(sport), _np(dport), self.smtp_ports)
            other = int((ok2 & ~(fwd | rev)).sum())
            sel = ok2 & (fwd | rev)
        if not sel.all():
            keep = pa.array(sel)
            sport, dport, proto, start, end, packets, nbytes = (
                a.filter(keep) for a in (sport, dport, proto, start, end, packets, nbytes)
            )
            flags = flags.filter(keep) if flags is not None else None
            c = {k: v.filter(keep) for k, v in c.items() if k not in _UINT_RULES}
            good = good[sel]

        out: dict[str, pa.Array] = {
            "start": ms_timestamps(pc.multiply(start, 1000)),
            "end": ms_timestamps(pc.multiply(end, 1000)),
            "src_ip": c["srcaddr"],
            "dst_ip": c["dstaddr"],
            "src_port": sport,
            "dst_port": dport,
            "protocol": proto,
            "packets": packets,
            "bytes": nbytes,
        }
        if "action" in c:
            out["action"] = _ACTION_OUT.take(pc.index_in(c["action"], value_set=pa.array(_ACTIONS)))
        if flags is not None:
            out["tcp_flags"] = flags
        for f, name in _ID_FIELDS:
            if f in c:
                out[name] = pc.if_else(pc.equal(c[f], "-"), "", c[f])
        if "tgw-src-vpc-account-id" in c:
            src_acct = c["tgw-src-vpc-account-id"]
            out["tenant"] = pc.if_else(pc.equal(src_acct, "-"), out.get("tenant", pa.scalar("")), src_acct)
        if "tgw-src-eni" in c:
            out["interface_id"] = pc.if_else(pc.equal(c["tgw-src-eni"], "-"), "", c["tgw-src-eni"])
        # a connection's two directions are logged at the same interface (VPC) or
        # attachment (Transit Gateway), under the same account
        scope = c.get("tgw-attachment-id", c.get("interface-id"))
        if scope is not None:
            out["_pair_if"] = scope
        if "account-id" in c:
            out["_pair_acct"] = c["account-id"]
        return good, out, other, bad

    def _assemble_paired(self, parts: list[tuple[np.ndarray, dict[str, pa.Array]]]) -> tuple[pa.Table, int]:
        """One record table in input order, SMTP-filtered when configured; returns the
        table and how many decoded flows were skipped (non-SMTP and reverse halves)."""
        if not parts:
            return record.empty_table(), 0
        names = [f.name for f in record.FIELDS] + list(_PAIR_COLS)
        if len(parts) == 1:
            rows, cols = parts[0]
            n = len(rows)
            arrays = {k: cols.get(k) for k in names}
        else:
            rows = np.concatenate([p[0] for p in parts])
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
            n = len(rows)
            arrays = {}
            for k in names:
                if any(k in p[1] for p in parts):
                    pieces = []
                    for prow, pcols in parts:
                        a = pcols.get(k)
                        if a is None:
                            a = self._constant(k, len(prow))
                        pieces.append(a.cast(pa.string() if k in _PAIR_COLS else record.SCHEMA.field(k).type))
                    arrays[k] = pa.concat_arrays(pieces).take(order)
                else:
                    arrays[k] = None

        skipped = 0
        if self.smtp_ports is not None:
            dport = _np(arrays["dst_port"])
            sport = _np(arrays["src_port"])
            fwd, rev = smtp_directions(sport, dport, self.smtp_ports)
            rev_packets = rev_bytes = None
            if fwd.any() and rev.any():
                scope = [arrays.get(k) for k in _PAIR_COLS]
                fi, ri = pair_reverse(arrays["src_ip"], arrays["dst_ip"], sport, dport, _np(arrays["protocol"]),
                                      fwd, rev, scope)
                if fi.size:
                    rp = np.zeros(n, dtype=np.uint64)
                    rb = np.zeros(n, dtype=np.uint64)
                    rp[fi] = _np(arrays["packets"].cast(pa.uint64()))[ri]
                    rb[fi] = _np(arrays["bytes"].cast(pa.uint64()))[ri]
                    rev_packets, rev_bytes = pa.array(rp), pa.array(rb)
            if rev_packets is not None:
                arrays["rev_packets"], arrays["rev_bytes"] = rev_packets, rev_bytes
            skipped = int(n - fwd.sum())
            if not fwd.all():
                keep = pa.array(fwd)
                arrays = {k: (None if v is None else v.filter(keep)) for k, v in arrays.items()}
                n = int(fwd.sum())

        return record.conform(self._fill.table(arrays, n)), skipped

    def _constant(self, name: str, n: int) -> pa.Array:
        if name in _PAIR_COLS:
            return pa.repeat(pa.scalar(""), n)
        return self._fill.column(name, n)


def sniff(head: str) -> bool:
    """True if ``head`` (the start of a file) looks like AWS VPC Flow Logs text: a header
    line of known field names, or lines of a known headerless layout (version 2..5 with
    the matching field count, addresses or ``-`` in srcaddr/dstaddr)."""
    lines = head.splitlines()
    if len(lines) > 1 and not head.endswith(("\n", "\r")):
        lines = lines[:-1]  # the last line may be cut
    lines = [s.strip(_WS) for s in lines if s.strip(_WS)][:20]
    if not lines:
        return False
    first = lines[0]
    if re.fullmatch(_HEADER_CANDIDATE_RE, first):
        kind, _ = _classify_header(first)
        if kind != "data":
            names = _header_tokens(first)
            return len(names) >= 2 and all(n in KNOWN_FIELDS for n in names)

    def fits(line: str) -> bool:
        toks = line.split(" ")
        layout = HEADERLESS_LAYOUTS.get((toks[0], len(toks)))
        if layout is None:
            return False
        addrs = (toks[layout.pos["srcaddr"]], toks[layout.pos["dstaddr"]])
        return all(a == "-" or "." in a or ":" in a for a in addrs)

    if not fits(first):
        return False
    return 2 * sum(fits(s) for s in lines) >= len(lines)
