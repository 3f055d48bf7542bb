"""IPFIX (RFC 7011) messages, and the template model shared with NetFlow v9 and v5.

Pure functions over bytes, no state: :func:`parse_header` and :func:`iter_sets` split a
message, :func:`parse_template_set` turns a template or options template set into
:class:`Template` objects. Which templates are known, and what a data set means, is the
business of :class:`smtpguard.ingest.netflow.NetflowDecoder`.

A :class:`Template` knows which of its fields carry what a flow record needs (the
*columns*: addresses, ports, counters, times, sampling, ...) and decodes a run of data
records in one go: for fixed-length templates one ``numpy.frombuffer`` with a structured
dtype that names only those fields at their offsets (the other fields are skipped by
the dtype's item size); for templates with variable-length fields a short walk finds
each record's start, then every column is gathered with one fancy-indexing operation.

Malformed input raises :class:`DecodeError` with a reason and the offset; the decoder
turns it into a dead letter.
"""

from __future__ import annotations

import struct
from typing import Iterator, NamedTuple, Sequence

import numpy as np

VERSION = 10
HEADER_LEN = 16
#: Field length that announces a variable-length field (RFC 7011 section 7).
VARLEN = 65535
#: Private enterprise number of RFC 5103 reverse information elements.
REVERSE_PEN = 29305
#: Marks a NetFlow v9 options *scope* field: its type is a scope kind (1 system,
#: 2 interface, ...), not an information element, so it never names a column.
V9_SCOPE = -1

TEMPLATE_SET = 2
OPTIONS_TEMPLATE_SET = 3
MIN_DATA_SET = 256

#: Largest field count accepted in one template. Real exporters use up to ~100 fields
#: (Citrix NetScaler ~45, Cisco ~60); a bigger template is a bomb, not a flow format.
MAX_TEMPLATE_FIELDS = 512

_HEADER = struct.Struct(">HHIII")
_SET = struct.Struct(">HH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class DecodeError(Exception):
    """Malformed input: ``reason`` says what is wrong, ``offset`` where (bytes from the
    start of the datagram)."""

    def __init__(self, reason: str, offset: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


class FieldSpec(NamedTuple):
    ie: int
    """information element id (enterprise bit cleared), or NetFlow v9 field type"""
    pen: int
    """private enterprise number; 0 for IANA elements, :data:`V9_SCOPE` for v9 scope fields"""
    length: int
    """bytes, or :data:`VARLEN`"""


# Which information elements give which column, best first, and how the column is
# encoded: "u" unsigned integer of 1..8 bytes (reduced-size encoding allowed), "v4" and
# "v6" addresses, "ntp" a 64-bit NTP timestamp (dateTimeMicro/Nanoseconds).
COLUMNS: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {
    "src4": ("v4", ((0, 8),)),
    "dst4": ("v4", ((0, 12),)),
    "src6": ("v6", ((0, 27),)),
    "dst6": ("v6", ((0, 28),)),
    "sport": ("u", ((0, 7),)),
    "dport": ("u", ((0, 11),)),
    "proto": ("u", ((0, 4),)),
    "flags": ("u", ((0, 6),)),
    # octetDeltaCount, octetTotalCount, postOctetDeltaCount, initiatorOctets (Cisco NSEL)
    "bytes": ("u", ((0, 1), (0, 85), (0, 23), (0, 231))),
    "packets": ("u", ((0, 2), (0, 86), (0, 24), (0, 298))),
    # RFC 5103 reverse counters, or responderOctets/Packets
    "rbytes": ("u", ((REVERSE_PEN, 1), (REVERSE_PEN, 85), (0, 232))),
    "rpackets": ("u", ((REVERSE_PEN, 2), (REVERSE_PEN, 86), (0, 299))),
    "rflags": ("u", ((REVERSE_PEN, 6),)),
    "in_if": ("u", ((0, 10),)),
    "out_if": ("u", ((0, 14),)),
    "start_ms": ("u", ((0, 152),)),
    "end_ms": ("u", ((0, 153),)),
    "start_s": ("u", ((0, 150),)),
    "end_s": ("u", ((0, 151),)),
    "start_us": ("ntp", ((0, 154),)),
    "end_us": ("ntp", ((0, 155),)),
    "start_ns": ("ntp", ((0, 156),)),
    "end_ns": ("ntp", ((0, 157),)),
    "start_delta_us": ("u", ((0, 158),)),
    "end_delta_us": ("u", ((0, 159),)),
    "start_up": ("u", ((0, 22),)),
    "end_up": ("u", ((0, 21),)),
    "dur_ms": ("u", ((0, 161),)),
    "dur_us": ("u", ((0, 162),)),
    "sys_init_ms": ("u", ((0, 160),)),
    # samplingInterval, samplerRandomInterval
    "samp_interval": ("u", ((0, 34), (0, 50))),
    "samp_pkt_interval": ("u", ((0, 305),)),
    "samp_pkt_space": ("u", ((0, 306),)),
    "samp_size": ("u", ((0, 309),)),
    "samp_population": ("u", ((0, 310),)),
    # samplerId, selectorId
    "sampler_id": ("u", ((0, 48), (0, 302))),
    "fwd_status": ("u", ((0, 89),)),
    # firewallEvent; NSEL's NF_F_FW_EVENT in NetFlow v9
    "fw_event": ("u", ((0, 233), (0, 40005))),
}

_KIND_LENGTHS = {"u": range(1, 9), "v4": (4,), "v6": (16,), "ntp": (8,)}
_NATIVE = {1: ">u1", 2: ">u2", 4: ">u4", 8: ">u8"}


def _be_uint(mat: np.ndarray) -> np.ndarray:
    """Big-endian unsigned integers from an (n, L) byte matrix, L <= 8."""
    out = np.zeros(mat.shape[0], dtype=np.uint64)
    for i in range(mat.shape[1]):
        out = (out << np.uint64(8)) | mat[:, i].astype(np.uint64)
    return out


class Template:
    """A data or options template: its fields, and how to decode its records.

    ``columns`` maps column names (see :data:`COLUMNS`) to field positions. Fields that
    give no column, enterprise fields included, are stepped over, whatever their length.
    """

    __slots__ = ("tid", "fields", "scope_count", "options", "fixed", "record_len", "columns",
                 "_offsets", "_dtype", "_segments")

    def __init__(self, tid: int, fields: Sequence[FieldSpec], scope_count: int = 0, options: bool = False):
        self.tid = tid
        self.fields: tuple[FieldSpec, ...] = tuple(fields)
        self.scope_count = scope_count
        self.options = options
        lengths = [f.length for f in self.fields]
        self.fixed = VARLEN not in lengths
        #: the record length (fixed templates) or the least a record can take (variable)
        self.record_len = sum(1 if n == VARLEN else n for n in lengths)
        first: dict[tuple[int, int], int] = {}
        for i, f in enumerate(self.fields):
            first.setdefault((f.pen, f.ie), i)
        self.columns: dict[str, int] = {}
        for name, (kind, candidates) in COLUMNS.items():
            for c in candidates:
                i = first.get(c)
                if i is not None and self.fields[i].length in _KIND_LENGTHS[kind]:
                    self.columns[name] = i
                    break
        self._offsets: list[int] | None = None
        self._dtype: np.dtype | None = None
        self._segments: list[tuple[int, list[tuple[int, int]]]] | None = None
        if self.fixed:
            offs, at = [], 0
            for n in lengths:
                offs.append(at)
                at += n
            self._offsets = offs

    def __repr__(self) -> str:
        kind = "options template" if self.options else "template"
        return f"<{kind} {self.tid}: {len(self.fields)} fields, {'fixed' if self.fixed else 'variable'} length>"

    def same_layout(self, other: "Template") -> bool:
        return self.fields == other.fields and self.scope_count == other.scope_count and self.options == other.options

    # -------------------------------------------------------------- fixed length

    @property
    def dtype(self) -> np.dtype:
        """Structured dtype of one record with only the column fields, big-endian."""
        if self._dtype is None:
            assert self._offsets is not None
            names, formats, offsets = [], [], []
            for name, i in self.columns.items():
                n = self.fields[i].length
                names.append(name)
                formats.append(_NATIVE.get(n, f"({n},)u1"))
                offsets.append(self._offsets[i])
            self._dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets,
                                    "itemsize": self.record_len})
        return self._dtype

    def decode_fixed(self, buf: bytes, n: int) -> dict[str, np.ndarray]:
        """Columns of ``n`` consecutive records at the start of ``buf``."""
        arr = np.frombuffer(buf, self.dtype, count=n)
        out: dict[str, np.ndarray] = {}
        for name, i in self.columns.items():
            col = arr[name]
            kind = COLUMNS[name][0]
            if kind == "v6":
                out[name] = np.ascontiguousarray(col)
            elif kind == "v4":
                out[name] = col.astype(np.uint32)
            elif col.ndim == 2:
                out[name] = _be_uint(col)
            else:
                out[name] = col.astype(np.uint64)
        return out

    # ----------------------------------------------------------- variable length

    def _segs(self) -> list[tuple[int, list[tuple[int, int]]]]:
        """The record as runs of fixed fields, each followed by one variable field (the
        last run has none): [(run length, [(column field, offset in run)])]."""
        if self._segments is None:
            wanted = set(self.columns.values())
            segs: list[tuple[int, list[tuple[int, int]]]] = []
            at, cols = 0, []
            for i, f in enumerate(self.fields):
                if f.length == VARLEN:
                    segs.append((at, cols))
                    at, cols = 0, []
                    continue
                if i in wanted:
                    cols.append((i, at))
                at += f.length
            segs.append((at, cols))
            self._segments = segs
        return self._segments

    def record_starts(self, body: bytes) -> tuple[list[int], dict[int, list[int]], int, str | None]:
        """Walk the variable-length records of a data set body.

        Returns (record starts, column field -> offsets per record, bytes used, problem):
        ``problem`` says why the walk stopped before the end, None when what is left is
        shorter than the smallest record (set padding).
        """
        segs = self._segs()
        last = len(segs) - 1
        starts: list[int] = []
        offs: dict[int, list[int]] = {i: [] for _, cols in segs for i, _ in cols}
        size = len(body)
        pos = 0
        while size - pos >= self.record_len:
            p = pos
            rec_offs: list[tuple[int, int]] = []
            for k, (run, cols) in enumerate(segs):
                for i, o in cols:
                    rec_offs.append((i, p + o))
                p += run
                if k == last:
                    break
                if p >= size:
                    return starts, offs, pos, f"record {len(starts) + 1} ends inside a variable-length field header"
                n = body[p]
                p += 1
                if n == 255:
                    if p + 2 > size:
                        return starts, offs, pos, f"record {len(starts) + 1} ends inside a variable-length field header"
                    n = (body[p] << 8) | body[p + 1]
                    p += 2
                p += n
                if p > size:
                    return starts, offs, pos, (
                        f"record {len(starts) + 1}: a variable-length field of {n} bytes runs past the end of the set")
            if p > size:
                return starts, offs, pos, f"record {len(starts) + 1} runs past the end of the set"
            for i, o in rec_offs:
                offs[i].append(o)
            starts.append(pos)
            pos = p
        return starts, offs, pos, None

    def decode_gather(self, buf: bytes, offs: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """Columns of records whose column fields sit at ``offs[field]`` in ``buf``."""
        data = np.frombuffer(buf, dtype=np.uint8)
        out: dict[str, np.ndarray] = {}
        for name, i in self.columns.items():
            n = self.fields[i].length
            at = offs[i]
            mat = data[at[:, None] + np.arange(n, dtype=np.int64)]
            kind = COLUMNS[name][0]
            if kind == "v6":
                out[name] = mat
            elif kind == "v4":
                out[name] = _be_uint(mat).astype(np.uint32)
            else:
                out[name] = _be_uint(mat)
        return out


# ------------------------------------------------------------------- messages


class Header(NamedTuple):
    length: int
    export_s: int
    sequence: int
    domain: int


def parse_header(payload: bytes) -> Header:
    """The message header; the message must fill ``payload`` (one UDP datagram)."""
    if len(payload) < HEADER_LEN:
        raise DecodeError(f"IPFIX message of {len(payload)} bytes is shorter than its {HEADER_LEN}-byte header")
    version, length, export_s, seq, domain = _HEADER.unpack_from(payload, 0)
    if version != VERSION:
        raise DecodeError(f"not an IPFIX message: version {version}")
    if length < HEADER_LEN:
        raise DecodeError(f"IPFIX header length {length} is shorter than the header itself")
    if length > len(payload):
        raise DecodeError(f"truncated IPFIX message: header says {length} bytes, the datagram has {len(payload)}")
    return Header(length, export_s, seq, domain)


def iter_sets(payload: bytes, start: int, end: int) -> Iterator[tuple[int, int, bytes]]:
    """(set id, offset of the set, set body) for every set in ``payload[start:end]``;
    raises :class:`DecodeError` at the first set whose length does not fit."""
    pos = start
    while pos < end:
        if end - pos < 4:
            raise DecodeError(f"{end - pos} stray bytes after the last set", pos)
        sid, length = _SET.unpack_from(payload, pos)
        if length < 4:
            raise DecodeError(f"set {sid} has length {length}, less than its own 4-byte header", pos)
        if pos + length > end:
            raise DecodeError(f"set {sid} claims {length} bytes but only {end - pos} are left in the message", pos)
        yield sid, pos, payload[pos + 4:pos + length]
        pos += length


def _read_fields(body: bytes, pos: int, count: int, enterprise: bool, what: str) -> tuple[list[FieldSpec], int]:
    fields = []
    size = len(body)
    for k in range(count):
        if pos + 4 > size:
            raise DecodeError(f"{what}: field {k + 1} of {count} runs past the end of the set", pos)
        ie, length = _SET.unpack_from(body, pos)
        pos += 4
        pen = 0
        if enterprise and ie & 0x8000:
            if pos + 4 > size:
                raise DecodeError(f"{what}: enterprise number of field {k + 1} runs past the end of the set", pos)
            pen = _U32.unpack_from(body, pos)[0]
            pos += 4
            ie &= 0x7FFF
        fields.append(FieldSpec(ie, pen, length))
    return fields, pos


def check_fields(fields: Sequence[FieldSpec], what: str, *, allow_zero: int = 0, max_len: int = 65515) -> None:
    """Refuse layouts that cannot be decoded: zero-length fields (except the first
    ``allow_zero`` ones, NetFlow v9 options scopes), records with no bytes, or records
    longer than a message can hold."""
    for k, f in enumerate(fields):
        if f.length == 0 and k >= allow_zero:
            raise DecodeError(f"{what}: field {k + 1} (element {f.ie}) has length 0")
    total = sum(1 if f.length == VARLEN else f.length for f in fields)
    if total == 0:
        raise DecodeError(f"{what}: a record of this template would have no bytes")
    if total > max_len:
        raise DecodeError(f"{what}: records of {total} bytes cannot fit in a message")


def parse_template_set(body: bytes, options: bool, max_fields: int = MAX_TEMPLATE_FIELDS
                       ) -> tuple[list[tuple[int, Template | None]], list[DecodeError]]:
    """Template records of an IPFIX template set (set id 2) or options template set (3).

    Returns ([(template id, Template, or None for a withdrawal)], problems). A problem
    in one template record ends the walk: the next record's start is unknown after it.
    Offsets in problems are relative to the set body.
    """
    out: list[tuple[int, Template | None]] = []
    pos = 0
    size = len(body)
    head = 6 if options else 4
    while size - pos >= head:
        tid, count = _SET.unpack_from(body, pos)
        at = pos
        what = f"{'options ' if options else ''}template {tid}"
        if count == 0:
            # a withdrawal: template id 2 or 3 withdraws them all (RFC 7011 8.1)
            out.append((tid, None))
            pos += 4
            continue
        scope = _U16.unpack_from(body, pos + 4)[0] if options else 0
        pos += head
        try:
            if tid < MIN_DATA_SET:
                raise DecodeError(f"{what}: template ids below {MIN_DATA_SET} are reserved", at)
            if count > max_fields:
                raise DecodeError(f"{what} has {count} fields (limit {max_fields})", at)
            if options and not 1 <= scope <= count:
                raise DecodeError(f"{what}: scope field count {scope} is not between 1 and the field count {count}", at)
            fields, pos = _read_fields(body, pos, count, True, what)
            check_fields(fields, what)
        except DecodeError as e:
            e.offset = e.offset or at
            return out, [e]
        out.append((tid, Template(tid, fields, scope, options)))
    return out, []
