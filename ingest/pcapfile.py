"""Capture files: the frames of a pcap or pcapng file, and the link and network layers of a frame.

Both capture formats read them here: NetFlow/IPFIX datagrams in a capture
(:class:`~smtpguard.ingest.netflow.NetflowPcapParser`) and SMTP connections in one
(:class:`~smtpguard.ingest.pcap_smtp.SmtpCaptureParser`).

Files
    pcap with micro- or nanosecond times in either byte order, and pcapng (section,
    interface description, enhanced and simple packet blocks; each interface's link type
    and timestamp resolution; other blocks are skipped). :func:`iter_frames` raises
    :class:`PcapError` when the file itself is broken.
Link layers
    Ethernet (with 802.1Q/802.1ad tags), Linux cooked v1/v2, BSD loopback and raw IP
    (:func:`link_header`).
"""

from __future__ import annotations

import io
import ipaddress
import socket
import struct
from typing import BinaryIO, Callable, Iterator, NamedTuple

from smtpguard.ingest.base import Batch, Datagram, Reject


class PcapError(Exception):
    """The capture file itself is broken (not a bad datagram in it)."""


_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000.0),      # microseconds, little-endian
    b"\xa1\xb2\xc3\xd4": (">", 1000.0),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000.0),  # nanoseconds
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000.0),
}
_PCAPNG = b"\x0a\x0d\x0d\x0a"
#: Largest packet record accepted (pcap snaplen is at most 256 KiB in practice).
_MAX_FRAME = 1 << 20


def is_capture(head: bytes) -> bool:
    """True when ``head`` starts with the magic number of a pcap or pcapng file."""
    return head[:4] in _PCAP_MAGIC or head[:4] == _PCAPNG


class Frame(NamedTuple):
    """One captured frame."""

    number: int
    """1-based position in the capture"""
    ts_ms: int
    """capture time, epoch milliseconds (0 for a pcapng simple packet, which has none)"""
    data: bytes
    linktype: int
    orig_len: int
    """length on the wire (more than ``len(data)`` when the capture cut the frame)"""


def read_exact(fh: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes of ``fh`` (fewer only at its end)."""
    data = fh.read(n)
    return data if data is not None else b""


def iter_frames(fh: BinaryIO) -> Iterator[Frame]:
    """Frames of a pcap or pcapng capture; raises :class:`PcapError` when the file is
    not a capture or is cut inside a record."""
    head = read_exact(fh, 4)
    if head == _PCAPNG:
        yield from _iter_pcapng(fh, head)
        return
    if head not in _PCAP_MAGIC:
        raise PcapError("not a pcap or pcapng file (unknown magic number)")
    bo, ts_div = _PCAP_MAGIC[head]
    rest = read_exact(fh, 20)
    if len(rest) < 20:
        raise PcapError("pcap file header is cut")
    linktype = struct.unpack(bo + "I", rest[16:20])[0] & 0x0FFFFFFF
    rec = struct.Struct(bo + "IIII")
    number = 0
    offset = 24
    while True:
        h = read_exact(fh, 16)
        if not h:
            return
        if len(h) < 16:
            raise PcapError(f"capture cut inside the header of packet {number + 1} (byte {offset})")
        secs, frac, incl, orig = rec.unpack(h)
        if incl > _MAX_FRAME:
            raise PcapError(f"packet {number + 1} claims {incl} bytes (byte {offset}): the capture is corrupt")
        data = read_exact(fh, incl)
        if len(data) < incl:
            raise PcapError(f"capture cut inside packet {number + 1} (byte {offset})")
        number += 1
        offset += 16 + incl
        yield Frame(number, int(secs * 1000 + frac // ts_div), data, linktype, orig)


def _iter_pcapng(fh: BinaryIO, first: bytes) -> Iterator[Frame]:
    bo = "<"
    links: list[tuple[int, float]] = []  # per interface: (linktype, timestamp ticks per ms)
    number = 0
    offset = 0
    carry = first  # bytes of the next block header already read
    while True:
        hdr = carry + read_exact(fh, 8 - len(carry))
        carry = b""
        if not hdr:
            return
        if len(hdr) < 8:
            raise PcapError(f"pcapng cut inside a block header (byte {offset})")
        prefix = b""
        if hdr[:4] == _PCAPNG:  # a section header: its byte-order magic decides the rest
            prefix = read_exact(fh, 4)
            if prefix == b"\x4d\x3c\x2b\x1a":
                bo = "<"
            elif prefix == b"\x1a\x2b\x3c\x4d":
                bo = ">"
            else:
                raise PcapError(f"pcapng section header with a bad byte-order magic (byte {offset})")
            links = []
        code, length = struct.unpack(bo + "II", hdr)
        if length < 12 + len(prefix) or length % 4 or length > _MAX_FRAME + 64:
            raise PcapError(f"pcapng block of length {length} at byte {offset}: the capture is corrupt")
        body = prefix + read_exact(fh, length - 12 - len(prefix))
        trailer = read_exact(fh, 4)
        if len(body) < length - 12 or len(trailer) < 4:
            raise PcapError(f"pcapng cut inside a block (byte {offset})")
        offset += length
        if code == 1 and len(body) >= 8:  # interface description
            linktype = struct.unpack_from(bo + "H", body, 0)[0]
            tsres = 6
            pos = 8
            while pos + 4 <= len(body):
                ocode, olen = struct.unpack_from(bo + "HH", body, pos)
                if ocode == 0:
                    break
                if ocode == 9 and olen >= 1 and pos + 4 < len(body):
                    tsres = body[pos + 4]
                pos += 4 + olen + (-olen) % 4
            per_s = 2 ** (tsres & 0x7F) if tsres & 0x80 else 10 ** tsres
            links.append((linktype, per_s / 1000.0))
        elif code == 6 and len(body) >= 20:  # enhanced packet
            iface, hi, lo, incl, orig = struct.unpack_from(bo + "IIIII", body, 0)
            if iface >= len(links) or 20 + incl > len(body):
                raise PcapError(f"pcapng packet block at byte {offset - length} is inconsistent")
            linktype, per_ms = links[iface]
            number += 1
            yield Frame(number, int(((hi << 32) | lo) / per_ms), body[20:20 + incl], linktype, orig)
        elif code == 3 and len(body) >= 4 and links:  # simple packet: no timestamp
            orig = struct.unpack_from(bo + "I", body, 0)[0]
            number += 1
            yield Frame(number, 0, body[4:4 + min(orig, len(body) - 4)], links[0][0], orig)


# ------------------------------------------------------------------- link layer

#: Ethertypes of 802.1Q and 802.1ad (QinQ) tags.
VLAN_TYPES = (0x8100, 0x88A8, 0x9100)
#: Link types whose frames start with the IP header: DLT_RAW (101, and 12 or 14 on some
#: systems), LINKTYPE_IPV4 (228), LINKTYPE_IPV6 (229).
RAW_IP_LINKS = (101, 12, 14, 228, 229)
#: The ethertype :func:`link_header` gives a raw IP frame: the reader decides which IP it is.
RAW_IP = -1


def skip_vlan(frame: bytes, etype: int, pos: int) -> tuple[int, int]:
    """(ethertype, offset) past the VLAN tags at ``pos``, whose ethertype is ``etype``."""
    while etype in VLAN_TYPES and len(frame) >= pos + 4:
        etype = (frame[pos + 2] << 8) | frame[pos + 3]
        pos += 4
    return etype, pos


def link_header(frame: bytes, linktype: int) -> tuple[int, int]:
    """(ethertype, offset of the network header) of a captured frame: Ethernet (its VLAN
    tags skipped), Linux cooked v1/v2, BSD loopback (the address family as an ethertype);
    (:data:`RAW_IP`, 0) for the raw IP link types; (0, 0) when the frame is too short for
    its link header or the link type is not one of these."""
    n = len(frame)
    if linktype == 1:  # Ethernet
        if n < 14:
            return 0, 0
        etype = (frame[12] << 8) | frame[13]
        # most frames have no tag: no call for them (this runs for every packet of a capture)
        return skip_vlan(frame, etype, 14) if etype in VLAN_TYPES else (etype, 14)
    if linktype == 113:  # Linux cooked v1
        if n < 16:
            return 0, 0
        return (frame[14] << 8) | frame[15], 16
    if linktype == 276:  # Linux cooked v2
        if n < 20:
            return 0, 0
        return (frame[0] << 8) | frame[1], 20
    if linktype in (0, 108):  # BSD loopback: address family, host or network order
        if n < 4:
            return 0, 0
        fam = struct.unpack("<I" if linktype == 0 else ">I", frame[:4])[0]
        if linktype == 0 and fam > 0xFFFF:
            fam = struct.unpack(">I", frame[:4])[0]
        return (0x0800 if fam == 2 else 0x86DD if fam in (10, 24, 28, 30) else 0), 4
    if linktype in RAW_IP_LINKS:
        return RAW_IP, 0
    return 0, 0


def raw_ip_type(frame: bytes, linktype: int) -> int:
    """The ethertype of a raw IP frame: IPv4 or IPv6 by the link type where it says, else
    by the version in the first byte; 0 for an empty frame or another version."""
    if linktype == 228:
        return 0x0800
    if linktype == 229:
        return 0x86DD
    v = frame[0] >> 4 if frame else 0
    return 0x0800 if v == 4 else 0x86DD if v == 6 else 0


# ---------------------------------------------------------------------- UDP


class UdpDatagram(NamedTuple):
    src: str
    sport: int
    payload: bytes
    truncated: bool


def addr_text(raw: bytes) -> str:
    """The text of a 4- or 16-byte address (IPv6 as :mod:`ipaddress` prints it)."""
    return socket.inet_ntoa(raw) if len(raw) == 4 else str(ipaddress.IPv6Address(raw))


#: IPv6 extension headers walked to the transport header: hop-by-hop, routing, destination options
#: (length in 8-byte units after the first 8), fragment (8 bytes), authentication (4-byte units after 8)
_IPV6_EXT = frozenset((0, 43, 60, 44, 51))


class IpHeader(NamedTuple):
    src: bytes
    dst: bytes
    proto: int
    """the transport protocol (after IPv6 extension headers)"""
    l4: int
    """offset of the transport header in the frame; -1 for a fragment other than the first, or when the
    frame ends inside the IPv6 extension headers"""
    end: int
    """end of the IP packet in the frame (the frame's end when the header says more, or 0)"""
    length: int
    """the packet's length as its header says (IPv4 total length, IPv6 payload length + 40)"""
    more_fragments: bool


def ip_header(frame: bytes, etype: int, pos: int) -> IpHeader | None:
    """The IPv4 (``etype`` 0x0800) or IPv6 (0x86DD) header at ``pos`` of ``frame``; None when the frame
    is too short for it, its version is not the ethertype's, or an IPv4 header length is under 20."""
    n = len(frame)
    if etype == 0x0800:
        if n < pos + 20 or frame[pos] >> 4 != 4:
            return None
        ihl = (frame[pos] & 0x0F) * 4
        if ihl < 20:
            return None
        total = (frame[pos + 2] << 8) | frame[pos + 3]
        frag = ((frame[pos + 6] << 8) | frame[pos + 7]) & 0x3FFF
        end = min(n, pos + total) if total >= ihl else n
        return IpHeader(frame[pos + 12:pos + 16], frame[pos + 16:pos + 20], frame[pos + 9],
                        -1 if frag & 0x1FFF else pos + ihl, end, total, bool(frag & 0x2000))
    if etype == 0x86DD:
        if n < pos + 40 or frame[pos] >> 4 != 6:
            return None
        plen = (frame[pos + 4] << 8) | frame[pos + 5]
        nxt, l4 = frame[pos + 6], pos + 40
        end = min(n, l4 + plen) if plen else n
        more = False
        while nxt in _IPV6_EXT:
            if l4 + 8 > end:
                l4 = -1
                break
            if nxt == 44:
                off_m = (frame[l4 + 2] << 8) | frame[l4 + 3]
                if off_m & 0xFFF8:
                    l4 = -1
                    break
                more = bool(off_m & 1)
                nxt, l4 = frame[l4], l4 + 8
            elif nxt == 51:
                nxt, l4 = frame[l4], l4 + (frame[l4 + 1] + 2) * 4
            else:
                nxt, l4 = frame[l4], l4 + 8 + frame[l4 + 1] * 8
        return IpHeader(frame[pos + 8:pos + 24], frame[pos + 24:pos + 40], nxt, l4, end, plen + 40, more)
    return None


def udp_of(frame: bytes, linktype: int) -> UdpDatagram | None:
    """The UDP datagram in a captured frame, or None (not UDP over IPv4/IPv6, or an IP
    fragment other than the first)."""
    etype, pos = link_header(frame, linktype)
    if etype == RAW_IP:
        if not frame:
            return None
        # not raw_ip_type: a raw frame whose version is not 4 has always been read as IPv6 here
        etype = 0x0800 if frame[0] >> 4 == 4 else 0x86DD
    ip = ip_header(frame, etype, pos)
    if ip is None or ip.proto != 17 or ip.l4 < 0:
        return None
    udp, end = ip.l4, ip.end
    if udp + 8 > end:
        return None
    src = addr_text(ip.src)
    if len(ip.src) == 16:
        src = f"[{src}]"
    sport = (frame[udp] << 8) | frame[udp + 1]
    ulen = (frame[udp + 4] << 8) | frame[udp + 5]
    stop = udp + ulen if 8 <= ulen and udp + ulen <= end else end
    truncated = ip.more_fragments or (8 <= ulen and udp + ulen > end)
    return UdpDatagram(src, sport, frame[udp + 8:stop], truncated)


def first_udp_payload(head: bytes) -> bytes | None:
    """The payload of the first UDP datagram in the start of a capture, or None."""
    try:
        for fr in iter_frames(io.BytesIO(head)):
            u = udp_of(fr.data, fr.linktype)
            if u is not None:
                return u.payload
    except PcapError:
        return None
    return None


# ---------------------------------------------------------------------- export captures


class ExportCaptureParser:
    """A capture of flow-export traffic (NetFlow/IPFIX, sFlow) as a stream format: its UDP datagrams
    handed to ``decoder`` (``decode_many``, ``flush``) in batches. A datagram is its sender's (exporter
    ``ip:port``) at its capture time; UDP the format does not ``recognise`` (DNS, syslog beside the
    collector port) is counted in :attr:`ignored_packets`, not dead-lettered; a datagram cut by the
    capture or fragmented is a dead letter (it cannot be decoded whole). The decoder lives as long as
    the parser: several captures of one session are fed in order."""

    name = ""

    def __init__(self, source: str, decoder, fmt: str, recognise: Callable[[bytes], bool], batch_datagrams: int,
                 raw_prefix_bytes: int = 256):
        self.source = source
        self.decoder = decoder
        self.fmt = fmt
        self.recognise = recognise
        self.batch_datagrams = batch_datagrams
        self.raw_prefix_bytes = raw_prefix_bytes
        self.ignored_packets = 0

    def close(self) -> Batch:
        """What the decoder still holds (NetFlow data waiting for templates); call after the last input."""
        return self.decoder.flush()

    def parse_stream(self, fh: BinaryIO, source: str) -> Iterator[Batch]:
        decode = self.decoder.decode_many
        todo: list[Datagram] = []
        extra: list[Reject] = []
        frames = iter_frames(fh)
        while True:
            try:
                fr = next(frames, None)
            except PcapError as e:
                extra.append(Reject.make(source, "file", str(e), "", self.fmt))
                fr = None
            if fr is None:
                break
            u = udp_of(fr.data, fr.linktype)
            if u is None or not self.recognise(u.payload):
                self.ignored_packets += 1
                continue
            loc = f"packet {fr.number}"
            if u.truncated or fr.orig_len > len(fr.data):
                why = (f"an IP fragment ({self.fmt} datagrams larger than the path MTU are not reassembled)"
                       if u.truncated and fr.orig_len <= len(fr.data)
                       else f"cut by the capture at {len(fr.data)} of {fr.orig_len} bytes (snap length)")
                extra.append(Reject.make(source, loc, f"UDP datagram from {u.src}:{u.sport} is {why}",
                                         u.payload[:self.raw_prefix_bytes].hex(), self.fmt))
                continue
            todo.append(Datagram(u.payload, f"{u.src}:{u.sport}", fr.ts_ms, loc))
            if len(todo) >= self.batch_datagrams:
                yield with_rejects(decode(todo, source), extra)
                todo, extra = [], []
        if todo or extra:
            yield with_rejects(decode(todo, source), extra)


def with_rejects(batch: Batch, extra: list[Reject]) -> Batch:
    """``batch`` with the dead letters of its input shell (each one input unit read)."""
    if extra:
        batch.rejects = extra + batch.rejects
        batch.read += len(extra)
    return batch
