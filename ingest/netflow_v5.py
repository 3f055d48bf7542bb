"""NetFlow v5 export packets: a 24-byte header and up to 30 fixed 48-byte records.

Pure functions over bytes. The record layout is expressed as a
:class:`~smtpguard.ingest.ipfix.Template` with the equivalent IPFIX element numbers, so v5
records go through the same vectorised decoding as v9 and IPFIX data.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .ipfix import DecodeError, FieldSpec, Template

VERSION = 5
HEADER_LEN = 24
RECORD_LEN = 48
#: Cisco's limit; exporters that send more are tolerated when the datagram holds them.
MAX_RECORDS_SPEC = 30

_HEADER = struct.Struct(">HHIIIIBBH")

#: srcaddr dstaddr nexthop input output dPkts dOctets first last srcport dstport pad1
#: tcp_flags prot tos src_as dst_as src_mask dst_mask pad2, as IPFIX elements
TEMPLATE = Template(0, [FieldSpec(ie, 0, n) for ie, n in (
    (8, 4), (12, 4), (15, 4), (10, 2), (14, 2), (2, 4), (1, 4), (22, 4), (21, 4), (7, 2), (11, 2),
    (210, 1), (6, 1), (4, 1), (5, 1), (16, 2), (17, 2), (9, 1), (13, 1), (210, 2),
)])
assert TEMPLATE.record_len == RECORD_LEN


class Header(NamedTuple):
    count: int
    uptime_ms: int
    unix_s: int
    unix_ns: int
    sequence: int
    engine_type: int
    engine_id: int
    sampling_rate: int
    """1 in N packets (1 when the exporter does not sample)"""


def parse(payload: bytes) -> tuple[Header, bytes]:
    """The header and the bytes of the ``count`` records. Trailing bytes after the
    records are ignored (some exporters pad datagrams)."""
    if len(payload) < HEADER_LEN:
        raise DecodeError(f"NetFlow v5 packet of {len(payload)} bytes is shorter than its {HEADER_LEN}-byte header")
    version, count, uptime, secs, nsecs, seq, etype, eid, sampling = _HEADER.unpack_from(payload, 0)
    if version != VERSION:
        raise DecodeError(f"not a NetFlow v5 packet: version {version}")
    need = HEADER_LEN + RECORD_LEN * count
    if need > len(payload):
        room = (len(payload) - HEADER_LEN) // RECORD_LEN
        raise DecodeError(f"NetFlow v5 header claims {count} records ({need} bytes) but the packet has "
                          f"{len(payload)} bytes, room for {room}")
    if nsecs >= 1_000_000_000:
        nsecs = 0  # not a fraction of a second: only sub-second precision is lost
    # the top 2 bits are the sampling mode, the other 14 the interval
    interval = sampling & 0x3FFF
    header = Header(count, uptime, secs, nsecs, seq, etype, eid, interval if interval > 1 else 1)
    return header, payload[HEADER_LEN:need]


def packet_length(buf: bytes, start: int) -> int:
    """Length of the v5 packet at ``buf[start]`` according to its header (0 if the header
    is cut), for streams of packets written back to back."""
    if len(buf) - start < 4:
        return 0
    count = (buf[start + 2] << 8) | buf[start + 3]
    return HEADER_LEN + RECORD_LEN * count
