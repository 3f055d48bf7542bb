"""NetFlow v9 (RFC 3954) export packets: header, flowsets and templates.

Pure functions over bytes. NetFlow v9 is the ancestor of IPFIX and uses the same field
numbers, so its templates are :class:`smtpguard.ingest.ipfix.Template` objects; what
differs is the framing: a 20-byte header with the exporter's uptime and no length,
template flowsets with 16-bit field types (no enterprise numbers), and options templates
that give their scope and option fields as byte lengths. Scope fields of an options
template are scope kinds (system, interface, line card, cache, template), not field
types, and are marked :data:`~smtpguard.ingest.ipfix.V9_SCOPE`.
"""

from __future__ import annotations

import struct
from typing import Iterator, NamedTuple

from .ipfix import MAX_TEMPLATE_FIELDS, MIN_DATA_SET, V9_SCOPE, DecodeError, FieldSpec, Template, check_fields

VERSION = 9
HEADER_LEN = 20
TEMPLATE_FLOWSET = 0
OPTIONS_FLOWSET = 1

_HEADER = struct.Struct(">HHIIII")
_PAIR = struct.Struct(">HH")
_OPTIONS_HEAD = struct.Struct(">HHH")
#: A v9 packet never exceeds a UDP datagram; a record can be at most this long.
_MAX_RECORD = 65535 - HEADER_LEN - 4


class Header(NamedTuple):
    count: int
    uptime_ms: int
    unix_s: int
    sequence: int
    source_id: int


def parse_header(payload: bytes) -> Header:
    if len(payload) < HEADER_LEN:
        raise DecodeError(f"NetFlow v9 packet of {len(payload)} bytes is shorter than its {HEADER_LEN}-byte header")
    version, count, uptime, secs, seq, source_id = _HEADER.unpack_from(payload, 0)
    if version != VERSION:
        raise DecodeError(f"not a NetFlow v9 packet: version {version}")
    return Header(count, uptime, secs, seq, source_id)


def iter_flowsets(payload: bytes, start: int = HEADER_LEN) -> Iterator[tuple[int, int, bytes]]:
    """(flowset id, offset, body) for each flowset; raises :class:`DecodeError` at the first
    flowset whose length does not fit. Up to 3 trailing bytes are padding."""
    pos = start
    end = len(payload)
    while end - pos >= 4:
        fid, length = _PAIR.unpack_from(payload, pos)
        if length < 4:
            raise DecodeError(f"flowset {fid} has length {length}, less than its own 4-byte header", pos)
        if pos + length > end:
            raise DecodeError(f"flowset {fid} claims {length} bytes but only {end - pos} are left in the packet", pos)
        yield fid, pos, payload[pos + 4:pos + length]
        pos += length


def packet_end(buf: bytes, start: int) -> int:
    """Where the v9 packet that starts at ``buf[start]`` ends, in a stream of packets
    written back to back. The header has no length, so walk the flowsets until the next
    id is a reserved one (2..255: the version field of the next packet, 5, 9 or 10, is
    one) or a flowset does not fit (then the rest of ``buf`` is taken: the decoder
    rejects it)."""
    pos = start + HEADER_LEN
    end = len(buf)
    while end - pos >= 4:
        fid, length = _PAIR.unpack_from(buf, pos)
        if OPTIONS_FLOWSET < fid < MIN_DATA_SET:
            return pos
        if length < 4 or pos + length > end:
            return end
        pos += length
    return end


def parse_template_flowset(body: bytes, max_fields: int = MAX_TEMPLATE_FIELDS
                           ) -> tuple[list[tuple[int, Template]], list[DecodeError]]:
    """Templates of a template flowset (id 0): [(template id, Template)], problems.
    Offsets in problems are relative to the flowset body."""
    out: list[tuple[int, Template]] = []
    pos = 0
    size = len(body)
    while size - pos >= 4:
        at = pos
        tid, count = _PAIR.unpack_from(body, pos)
        pos += 4
        if tid == 0 and count == 0:
            break  # padding
        what = f"template {tid}"
        try:
            if tid < MIN_DATA_SET:
                raise DecodeError(f"{what}: template ids below {MIN_DATA_SET} are reserved", at)
            if count == 0:
                raise DecodeError(f"{what} has no fields", at)
            if count > max_fields:
                raise DecodeError(f"{what} has {count} fields (limit {max_fields})", at)
            if pos + 4 * count > size:
                raise DecodeError(f"{what}: {count} fields run past the end of the flowset", at)
            fields = []
            for k in range(count):
                ftype, length = _PAIR.unpack_from(body, pos + 4 * k)
                fields.append(FieldSpec(ftype, 0, length))
            pos += 4 * count
            check_fields(fields, what, max_len=_MAX_RECORD)
        except DecodeError as e:
            return out, [e]
        out.append((tid, Template(tid, fields)))
    return out, []


def parse_options_flowset(body: bytes, max_fields: int = MAX_TEMPLATE_FIELDS
                          ) -> tuple[list[tuple[int, Template]], list[DecodeError]]:
    """Options templates of an options template flowset (id 1)."""
    out: list[tuple[int, Template]] = []
    pos = 0
    size = len(body)
    while size - pos >= 6:
        at = pos
        tid, scope_len, opt_len = _OPTIONS_HEAD.unpack_from(body, pos)
        pos += 6
        if tid == 0 and scope_len == 0 and opt_len == 0:
            break  # padding
        what = f"options template {tid}"
        try:
            if tid < MIN_DATA_SET:
                raise DecodeError(f"{what}: template ids below {MIN_DATA_SET} are reserved", at)
            if scope_len % 4 or opt_len % 4:
                raise DecodeError(f"{what}: scope length {scope_len} and option length {opt_len} "
                                  "must be multiples of 4", at)
            n_scope, n_opt = scope_len // 4, opt_len // 4
            if n_scope == 0:
                raise DecodeError(f"{what} has no scope field", at)
            if n_scope + n_opt > max_fields:
                raise DecodeError(f"{what} has {n_scope + n_opt} fields (limit {max_fields})", at)
            if pos + scope_len + opt_len > size:
                raise DecodeError(f"{what}: {n_scope + n_opt} fields run past the end of the flowset", at)
            fields = []
            for k in range(n_scope + n_opt):
                ftype, length = _PAIR.unpack_from(body, pos + 4 * k)
                fields.append(FieldSpec(ftype, V9_SCOPE if k < n_scope else 0, length))
            pos += scope_len + opt_len
            # a "system" scope is often sent with length 0: it names the exporter as a whole
            check_fields(fields, what, allow_zero=n_scope, max_len=_MAX_RECORD)
        except DecodeError as e:
            return out, [e]
        out.append((tid, Template(tid, fields, n_scope, options=True)))
        # each options template is padded to a 4-byte boundary
        pos += (-pos) % 4
    return out, []
