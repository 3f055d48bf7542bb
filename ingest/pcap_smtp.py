"""Packet captures → SMTP connection records, with the SMTP dialogue where it is visible.

:class:`SmtpCaptureParser` is pure: it is fed captured frames (from a pcap or pcapng
file by :meth:`~SmtpCaptureParser.parse_stream`, or from a live interface by
:func:`smtpguard.ingest.pcap_live.live_capture`) and keeps the TCP connections to SMTP
ports it is tracking as explicit state. :class:`SmtpDialogue` reads the SMTP commands
and replies of one connection from its two reassembled byte streams.

Frames
    Ethernet (with 802.1Q/802.1ad tags), Linux cooked v1/v2, BSD loopback and raw IP
    link types; IPv4 (options) and IPv6 (hop-by-hop, routing, destination and fragment
    headers); TCP. Files and link layers are read by :mod:`smtpguard.ingest.pcapfile` (pcap
    with micro- or nanosecond times, pcapng), which reads captures far faster than
    dissecting every packet with scapy. Other frames (ARP, UDP, ICMP, TCP to other
    ports, IP fragments after the first) are skipped and counted.

Connections and records
    One record per TCP connection towards an SMTP port (destination port in
    ``smtp_ports``; with ``smtp_ports=None`` every TCP connection). The client is the
    side that sent the SYN; when the capture starts mid-connection, the side talking to
    the SMTP port (or, with both or neither port an SMTP port, the higher port).

    * ``start``/``end``: first and last packet of the connection, capture time.
    * ``packets``/``bytes``: client to server; ``rev_packets``/``rev_bytes``: server to
      client. **Bytes are IP bytes**: the IP packet length from the IP header (IPv4
      total length, IPv6 40 + payload length), headers included, as NetFlow/IPFIX
      ``octetDeltaCount`` and VPC flow logs count them, so records from captures and
      from flow logs compare. A frame cut by the capture's snap length still counts
      its full IP length.
    * ``tcp_flags``: OR of the client's flags (the record is the client-to-server side,
      as in the flow formats).
    * ``conn_state``, the handshake's outcome: ``completed`` (SYN, SYN-ACK, ACK),
      ``refused`` (RST in answer to the SYN), ``unanswered`` (the client sent only SYNs
      and nothing came back), ``reset`` (an RST after the server accepted, or an RST
      on a connection picked up mid-way), else ``""`` (not seen: the capture started
      after the handshake, or holds only the client side of an answered connection).
    * ``action`` ``unknown``, ``source_format`` ``pcap``, ``exporter`` the capture file's
      name or the interface.

    A connection is emitted ``close_linger_s`` after it closed (FIN both ways, an RST,
    an RST refusing the SYN, or the client's FIN when no server packet was ever seen),
    so the last ACK and retransmitted FINs still count; ``idle_timeout_s`` after its
    last packet; when a new SYN reuses its addresses and ports; when
    ``max_connections`` are tracked and it is the least recently active (counted in
    :attr:`CaptureCounters.evicted`); or by :meth:`SmtpCaptureParser.close`. Times are
    capture times, so a replayed file gives the same records as the live capture did.

SMTP dialogue (see :class:`SmtpDialogue`)
    Each direction's payload is reassembled in sequence order: retransmitted bytes are
    dropped, segments that arrive early wait (at most ``max_held_bytes`` per
    connection and ``max_buffered_bytes`` for all connections together), and a hole
    the other side acknowledged, or one that outgrows those bounds, is a gap that the
    dialogue steps over. Message contents are skipped (after ``354`` until
    ``<CRLF>.<CRLF>``; ``BDAT`` chunks by their length), and after ``STARTTLS``
    answered by ``220``, or when either side starts a TLS record (port 465), the rest
    is encrypted and is not read.

    * ``helo``: the first EHLO/HELO name; ``mail_from_domain``: the domain of the first
      MAIL FROM, lower case (``""`` for the null sender); ``rcpt_count``: RCPT commands
      sent (accepted or not); ``starttls``/``auth``: the command was sent. Null (``""``
      for the names) when no client command was read.
    * ``reply_first``/``reply_last``: codes of the first and last replies;
      ``replies_4xx``/``replies_5xx``: how many replies had such codes, a multi-line
      reply counting once. Null when no reply was read.

Accounting
    A batch's ``read`` counts packets, plus one per dead letter about the file itself.
    The packets of a connection are counted in the batch that emits its record: one as
    the record, the others as ``skipped``, as are packets that are not SMTP traffic.
    Packets that cannot be read as TCP (a cut or malformed IP or TCP header) are dead
    letters with the reason and the frame's first bytes in hex. Over a whole input,
    ``read == records + skipped + rejects``, and so in every batch.
"""

from __future__ import annotations

import os
import re
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

import numpy as np
import pyarrow as pa

from smtpguard.core import record
from smtpguard.core.errors import ConfigError
from smtpguard.core.wire import MAX_EPOCH_MS
from smtpguard.ingest.base import Batch, Counters, Reject
from smtpguard.ingest.netflow import sniff_pcap as _sniff_netflow_pcap
from smtpguard.ingest.pcapfile import (RAW_IP, VLAN_TYPES, PcapError, addr_text, is_capture, iter_frames,
                                       link_header, raw_ip_type, skip_vlan)
from smtpguard.ingest.selection import DEFAULT_SMTP_PORTS, smtp_ports_config

FORMAT = "pcap"

#: A connection with no packet for this long (capture time) is emitted. Zeek's TCP
#: inactivity timeout is also 5 minutes; SMTP servers drop idle clients after 5 (RFC
#: 5321 4.5.3.2.7), so a longer silence means the capture missed the end.
IDLE_TIMEOUT_S = 300.0
#: How long a closed connection waits before it is emitted, so that the last ACK and
#: retransmitted FINs or RSTs count in it instead of looking like a new connection.
CLOSE_LINGER_S = 5.0
#: Connections tracked at once; beyond, the least recently active is emitted early.
#: About 1 KiB each without buffered data (measured by bench/bench_pcap.py).
MAX_CONNECTIONS = 100_000
#: Out-of-order payload held per connection (both directions) while a hole is open.
MAX_HELD_BYTES = 64 * 1024
#: Out-of-order payload held for all connections together.
MAX_BUFFERED_BYTES = 64 * 1024 * 1024
#: Longest command or reply line kept while waiting for its end. RFC 5321 allows 512
#: octets for a command line and for a reply line; longer ones are not SMTP and are
#: dropped up to their line end.
MAX_LINE_BYTES = 4096
#: Longest EHLO/HELO name and MAIL FROM domain kept in a record.
MAX_NAME_CHARS = 255
#: Packets read between batches.
BATCH_PACKETS = 65_536
#: Bytes of a bad frame kept (hex) in its dead letter.
RAW_PREFIX_BYTES = 128

_M = 0xFFFFFFFF
_HALF = 0x80000000
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_TCP = struct.Struct("!HHIIH")
_IPV6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options
_TLS_START = (0x16, 0x80)  # a TLS handshake record, an SSLv2-style ClientHello


@dataclass
class CaptureCounters(Counters):
    """What the parser saw, over its lifetime."""

    packets: int = 0
    """frames read"""
    smtp_packets: int = 0
    """TCP packets of tracked connections"""
    not_ip: int = 0
    """frames that are not IPv4/IPv6 (ARP, LLDP, unsupported link types)"""
    not_tcp: int = 0
    """IP packets that are not TCP"""
    other_ports: int = 0
    """TCP packets of connections to other ports"""
    fragments: int = 0
    """IP fragments after the first (no TCP header to read)"""
    stray: int = 0
    """packets of no tracked connection that cannot start one (a lone ACK, FIN or RST after
    its connection was emitted)"""
    malformed: int = 0
    """frames that claim to be IP or TCP but cannot be read (dead letters)"""
    cut_by_snaplen: int = 0
    """TCP packets whose payload the capture cut (counted at full length; the missing bytes are a gap)"""
    connections: int = 0
    """records emitted"""
    idle_timeouts: int = 0
    """connections emitted after ``idle_timeout_s`` without packets"""
    evicted: int = 0
    """connections emitted early because ``max_connections`` were tracked"""
    retransmitted_bytes: int = 0
    """payload bytes received again (dropped by reassembly)"""
    gaps: int = 0
    """holes in a byte stream that were stepped over (capture loss, buffer bounds)"""
    gap_bytes: int = 0
    """bytes in those holes"""


# ------------------------------------------------------------------- SMTP dialogue

_CMD, _BODY, _BDAT, _STOP = 0, 1, 2, 3
_KEEP, _OVERLONG, _AFTER_GAP = 0, 1, 2  # line dropping: none, to the line end, to the line end unless a line starts
# After a gap, data that starts like a command or a reply line is taken as one; any
# other data is dropped up to the next line end (the gap may have ended mid-line).
_COMMAND_START = re.compile(rb"[A-Za-z]{4,8}[ \r\n]")
_REPLY_START = re.compile(rb"[1-5][0-9][0-9][ \r\n-]")
_TERMINATORS = (b"\n.\r\n", b"\n.\n")  # end of message; bare LF endings are common in spamware


def _resume(drop: int, line_start: re.Pattern[bytes], data: bytes) -> tuple[int, bytes]:
    """Where reading resumes in ``data`` while a side drops a line: (how it drops now, the
    data left to read). After a gap, data that starts like one of the side's lines
    (``line_start``) is read at once; else the rest of the line is dropped."""
    if drop == _AFTER_GAP and line_start.match(data):
        return _KEEP, data
    nl = data.find(b"\n")
    if nl < 0:
        return drop, b""
    return _KEEP, data[nl + 1:]


def _unfinished(rest: bytes) -> tuple[int, bytes]:
    """(how a side drops, what it keeps) for the end of its data when no line end has come
    yet: the start of a line is kept until its end comes, an overlong one is dropped."""
    return (_OVERLONG, b"") if len(rest) > MAX_LINE_BYTES else (_KEEP, rest)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()[:MAX_NAME_CHARS]


def mail_from_domain(arg: bytes) -> str:
    """The domain of a ``MAIL`` command's argument, lower case; ``""`` for the null
    sender or when there is none.

    >>> mail_from_domain(b"FROM:<Bob@Example.ORG> SIZE=100")
    'example.org'
    >>> mail_from_domain(b"FROM:<>")
    ''
    """
    head, sep, rest = arg.partition(b":")
    if not sep or head.strip().upper() != b"FROM":
        return ""
    rest = rest.strip()
    if rest.startswith(b"<"):
        addr = rest[1:].partition(b">")[0]
    else:
        addr = rest.split(b" ", 1)[0] if rest else b""
    at = addr.rfind(b"@")
    if at < 0:
        return ""
    return _text(addr[at + 1:]).rstrip(".").lower()


class SmtpDialogue:
    """The SMTP dialogue of one connection, read from its two reassembled byte streams
    fed in capture order (:meth:`client`, :meth:`server`, and :meth:`client_gap` /
    :meth:`server_gap` for bytes the capture lost).

    Replies are matched to commands by counting: the n-th final reply line answers the
    n-th command (the greeting counts as the first when the connection was seen from
    its start; the end of a message counts as a command, as its ``250`` answers it).
    That is what tells a ``220`` after ``STARTTLS`` from a greeting, and a ``DATA``
    refused with ``503`` (whose next lines are commands again) from one accepted with
    ``354``. A client line that
    comes while ``DATA`` is unanswered is message content (RFC 2920: ``DATA`` ends a
    pipelined group), which also covers captures that hold only the client side; a
    side whose bytes start a TLS record at a line start has begun TLS.

    >>> d = SmtpDialogue(from_start=True)
    >>> d.server(b"220 mx ESMTP\\r\\n"); d.client(b"EHLO a.example\\r\\nMAIL FROM:<x@B.example>\\r\\n")
    >>> d.server(b"250-mx\\r\\n250 PIPELINING\\r\\n250 OK\\r\\n")
    >>> d.helo, d.mail_from_domain, d.reply_first, d.reply_last, d.replies
    ('a.example', 'b.example', 220, 250, 3)
    """

    __slots__ = ("c_mode", "c_buf", "c_drop", "c_skip", "s_buf", "s_drop", "s_stopped",
                 "sent", "answered", "data_at", "data_waiting", "tls_at",
                 "commands", "helo", "mail_from_domain", "rcpt_count", "starttls", "auth",
                 "replies", "reply_first", "reply_last", "replies_4xx", "replies_5xx", "tls")

    def __init__(self, from_start: bool = True):
        self.c_mode = _CMD
        self.c_buf = b""  # a partial command line, or the last bytes of message content
        self.c_drop = _KEEP  # dropping an overlong line, or one a gap cut, up to its end
        self.c_skip = 0  # BDAT chunk bytes still to skip
        self.s_buf = b""
        self.s_drop = _KEEP
        self.s_stopped = False
        self.sent = 1 if from_start else 0  # commands sent, the greeting included
        self.answered = 0  # final reply lines received
        self.data_at = 0  # number of the DATA command waiting for its reply
        self.data_waiting = False
        self.tls_at = 0  # number of the STARTTLS command waiting for its reply
        self.commands = 0
        self.helo: str | None = None
        self.mail_from_domain: str | None = None
        self.rcpt_count = 0
        self.starttls = False
        self.auth = False
        self.replies = 0
        self.reply_first: int | None = None
        self.reply_last: int | None = None
        self.replies_4xx = 0
        self.replies_5xx = 0
        self.tls = False

    @property
    def done(self) -> bool:
        """Both directions are encrypted or given up: nothing more to read."""
        return self.c_mode == _STOP and self.s_stopped

    @property
    def buffered(self) -> int:
        return len(self.c_buf) + len(self.s_buf)

    # -- client -------------------------------------------------------------------

    def client(self, data: bytes) -> None:
        while data:
            mode = self.c_mode
            if mode == _CMD:
                data = self._commands(data)
            elif mode == _BODY:
                data = self._body(data)
            elif mode == _BDAT:
                take = min(self.c_skip, len(data))
                self.c_skip -= take
                data = data[take:]
                if not self.c_skip:
                    self.c_mode = _CMD
            else:
                return

    def client_gap(self, n: int) -> None:
        """``n`` client bytes were lost: resynchronise at the next line."""
        if self.c_mode == _CMD:
            self.c_buf = b""
            self.c_drop = _AFTER_GAP
        elif self.c_mode == _BODY:
            self.c_buf = b""
        elif self.c_mode == _BDAT:
            if n < self.c_skip:
                self.c_skip -= n
            else:
                # the gap ran past the chunk: commands again, maybe from mid-line
                if n > self.c_skip:
                    self.c_drop = _AFTER_GAP
                self.c_skip = 0
                self.c_mode = _CMD
                self.c_buf = b""

    def _commands(self, data: bytes) -> bytes:
        """Read command lines; return what follows when the mode changes, else b""."""
        if self.c_drop:
            self.c_drop, data = _resume(self.c_drop, _COMMAND_START, data)
            if not data:
                return b""
        buf = self.c_buf + data if self.c_buf else data
        self.c_buf = b""
        pos = 0
        end = len(buf)
        while pos < end:
            if buf[pos] in _TLS_START:
                # a client that starts TLS: implicit TLS (port 465), or after a STARTTLS
                # whose answer the capture lacks
                self._stop_client()
                return b""
            nl = buf.find(b"\n", pos)
            if nl < 0:
                self.c_drop, self.c_buf = _unfinished(buf[pos:])
                return b""
            if self.data_waiting:
                # DATA is unanswered and the client goes on: this is the message
                self.data_waiting = False
                self.c_mode = _BODY
                self.c_buf = b"\n"
                return buf[pos:]
            if nl - pos <= MAX_LINE_BYTES:
                self._command(buf[pos:nl])
            pos = nl + 1
            if self.c_mode != _CMD:
                return buf[pos:]
        return b""

    def _command(self, line: bytes) -> None:
        self.commands += 1
        self.sent += 1
        verb, _, arg = line.rstrip(b"\r").partition(b" ")
        verb = verb.upper()
        if verb == b"RCPT":
            self.rcpt_count += 1
        elif verb == b"MAIL":
            if self.mail_from_domain is None:
                self.mail_from_domain = mail_from_domain(arg)
        elif verb in (b"EHLO", b"HELO"):
            if self.helo is None:
                self.helo = _text(arg)
        elif verb == b"DATA":
            self.data_at = self.sent
            self.data_waiting = True
        elif verb == b"BDAT":
            size = arg.split(b" ", 1)[0]
            if size.isdigit() and len(size) <= 15:
                self.c_skip = int(size)
                if self.c_skip:
                    self.c_mode = _BDAT
        elif verb == b"STARTTLS":
            self.starttls = True
            self.tls_at = self.sent
        elif verb == b"AUTH":
            self.auth = True

    def _body(self, data: bytes) -> bytes:
        buf = self.c_buf + data
        ends = [(i, t) for t in _TERMINATORS if (i := buf.find(t)) >= 0]
        if not ends:
            self.c_buf = buf[-3:]
            return b""
        i, t = min(ends)
        self.c_mode = _CMD
        self.c_buf = b""
        self.sent += 1  # the end of the message is answered like a command
        return buf[i + len(t):]

    def _stop_client(self) -> None:
        self.c_mode = _STOP
        self.c_buf = b""

    # -- server -------------------------------------------------------------------

    def server(self, data: bytes) -> None:
        if self.s_stopped or not data:
            return
        if self.s_drop:
            self.s_drop, data = _resume(self.s_drop, _REPLY_START, data)
            if not data:
                return
        buf = self.s_buf + data if self.s_buf else data
        self.s_buf = b""
        pos = 0
        end = len(buf)
        while pos < end and not self.s_stopped:
            if buf[pos] in _TLS_START:  # the server has started TLS
                self.s_stopped = True
                return
            nl = buf.find(b"\n", pos)
            if nl < 0:
                self.s_drop, self.s_buf = _unfinished(buf[pos:])
                return
            self._reply(buf[pos:nl])
            pos = nl + 1

    def server_gap(self, n: int) -> None:
        """``n`` server bytes were lost: resynchronise at the next reply line."""
        self.s_buf = b""
        self.s_drop = _AFTER_GAP

    def _reply(self, line: bytes) -> None:
        # "ddd text" ends a reply, "ddd-text" continues it; anything else is not a reply line
        if len(line) < 3 or not (0x31 <= line[0] <= 0x35 and 0x30 <= line[1] <= 0x39 and 0x30 <= line[2] <= 0x39):
            return
        if len(line) > 3 and line[3] == 0x2D:
            return  # a continuation line: the reply is counted once, at its last line
        if len(line) > 3 and line[3] not in b" \r\t":
            return
        code = (line[0] - 0x30) * 100 + (line[1] - 0x30) * 10 + (line[2] - 0x30)
        self.replies += 1
        if self.reply_first is None:
            self.reply_first = code
        self.reply_last = code
        if code >= 500:
            self.replies_5xx += 1
        elif code >= 400:
            self.replies_4xx += 1
        # more replies than commands: an unsolicited reply (421 before closing) or a
        # connection picked up mid-way; from here on, count from the present
        self.answered = min(self.answered + 1, self.sent)
        n = self.answered
        if self.data_waiting and (code == 354 or n == self.data_at):
            self.data_waiting = False
            if code == 354 and self.c_mode == _CMD:
                self.c_mode = _BODY
                self.c_buf = b"\n" + self.c_buf  # content the client sent early, if any
        if self.tls_at and n >= self.tls_at:
            if code == 220 and n == self.tls_at:
                self.tls = True
                self._stop_client()
                self.s_stopped = True
                self.s_buf = b""
            self.tls_at = 0


# ------------------------------------------------------------------- connections


class _Conn:
    __slots__ = ("cip", "cport", "sip", "sport", "exporter", "first_ms", "last_ms",
                 "packets", "bytes", "rev_packets", "rev_bytes", "flags",
                 "syn", "isn", "synack", "acked", "client_more", "server_seen", "rst", "refused",
                 "cfin", "sfin", "closing", "c_next", "s_next", "held", "held_bytes", "dialogue", "key")

    def __init__(self, key: tuple, cip: bytes, cport: int, sip: bytes, sport: int, exporter: str, ts: int):
        self.key = key
        self.cip = cip
        self.cport = cport
        self.sip = sip
        self.sport = sport
        self.exporter = exporter
        self.first_ms = ts
        self.last_ms = ts
        self.packets = 0
        self.bytes = 0
        self.rev_packets = 0
        self.rev_bytes = 0
        self.flags = 0
        self.syn = False  # the client's SYN was seen
        self.isn = -1
        self.synack = False
        self.acked = False  # the client acknowledged the SYN-ACK (or sent data after it)
        self.client_more = False  # the client sent something besides SYNs
        self.server_seen = False
        self.rst = False
        self.refused = False
        self.cfin = False
        self.sfin = False
        self.closing = -1  # capture time it closed, -1 while open
        self.c_next = -1  # next expected client sequence number, -1 until known
        self.s_next = -1
        # out-of-order segments: (from_client, seq) -> (payload, length on the wire)
        self.held: dict[tuple[bool, int], tuple[bytes, int]] | None = None
        self.held_bytes = 0
        self.dialogue: SmtpDialogue | None = None

    def state(self) -> str:
        if self.refused:
            return "refused"
        if self.rst and (self.synack or self.acked or not self.syn):
            return "reset"
        if self.syn and self.synack and self.acked:
            return "completed"
        if self.syn and not self.server_seen and not self.client_more:
            return "unanswered"
        return ""


def _check_ports(smtp_ports: Sequence[int] | None) -> frozenset[int] | None:
    """The SMTP ports as a set, for the lookup of every packet."""
    ports = smtp_ports_config(smtp_ports, every="TCP connection")
    return None if ports is None else frozenset(ports)


def _positive(name: str, value: float, integer: bool = True) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
    if bad or (integer and not isinstance(value, int)):
        kind = "integer" if integer else "number"
        raise ConfigError(f"SmtpCaptureParser {name} must be a positive {kind}, got {value!r}")


class _Columns:
    """Records emitted since the last batch, column by column."""

    def __init__(self) -> None:
        self.start: list[int] = []
        self.end: list[int] = []
        self.src: list[str] = []
        self.dst: list[str] = []
        self.sport: list[int] = []
        self.dport: list[int] = []
        self.packets: list[int] = []
        self.bytes: list[int] = []
        self.rev_packets: list[int] = []
        self.rev_bytes: list[int] = []
        self.flags: list[int] = []
        self.state: list[str] = []
        self.exporter: list[str] = []
        self.helo: list[str] = []
        self.mail_from: list[str] = []
        self.rcpt: list[int | None] = []
        self.first: list[int | None] = []
        self.last: list[int | None] = []
        self.r4: list[int | None] = []
        self.r5: list[int | None] = []
        self.starttls: list[bool | None] = []
        self.auth: list[bool | None] = []

    def __len__(self) -> int:
        return len(self.start)

    def table(self) -> pa.Table:
        ts = pa.timestamp("ms", tz="UTC")
        u16 = pa.uint16()
        return record.conform(pa.table({
            "start": pa.array(self.start, ts),
            "end": pa.array(self.end, ts),
            "src_ip": pa.array(self.src, pa.string()),
            "dst_ip": pa.array(self.dst, pa.string()),
            "src_port": pa.array(self.sport, u16),
            "dst_port": pa.array(self.dport, u16),
            "protocol": pa.array(np.full(len(self.start), 6, np.uint8)),
            "packets": pa.array(self.packets, pa.uint64()),
            "bytes": pa.array(self.bytes, pa.uint64()),
            "rev_packets": pa.array(self.rev_packets, pa.uint64()),
            "rev_bytes": pa.array(self.rev_bytes, pa.uint64()),
            "tcp_flags": pa.array(self.flags, u16),
            "conn_state": pa.array(self.state, pa.string()),
            "exporter": pa.array(self.exporter, pa.string()),
            "helo": pa.array(self.helo, pa.string()),
            "mail_from_domain": pa.array(self.mail_from, pa.string()),
            "rcpt_count": pa.array(self.rcpt, pa.uint32()),
            "reply_first": pa.array(self.first, u16),
            "reply_last": pa.array(self.last, u16),
            "replies_4xx": pa.array(self.r4, u16),
            "replies_5xx": pa.array(self.r5, u16),
            "starttls": pa.array(self.starttls, pa.bool_()),
            "auth": pa.array(self.auth, pa.bool_()),
        }), action="unknown", source_format=FORMAT, tenant="")


class SmtpCaptureParser:
    """TCP connections to SMTP ports in packet captures → records (see the module
    docstring). State lives as long as the parser: feed the files of one capture
    session in order (a connection may go on in the next file), then call
    :meth:`close` for the connections still open.

    >>> parser = SmtpCaptureParser("smtp.pcap", [25, 587])
    >>> with open("smtp.pcap", "rb") as fh:  # doctest: +SKIP
    ...     batches = list(parser.parse_stream(fh, "smtp.pcap")) + [parser.close()]

    Live capture feeds frames one by one with :meth:`feed` and collects what is done
    with :meth:`expire` (advance the clock when no packets come) and :meth:`take`.
    """

    name = FORMAT

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS, *,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, close_linger_s: float = CLOSE_LINGER_S,
                 max_connections: int = MAX_CONNECTIONS, max_held_bytes: int = MAX_HELD_BYTES,
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES, batch_packets: int = BATCH_PACKETS):
        _positive("idle_timeout_s", idle_timeout_s, integer=False)
        _positive("close_linger_s", close_linger_s, integer=False)
        for name, v in (("max_connections", max_connections), ("max_held_bytes", max_held_bytes),
                        ("max_buffered_bytes", max_buffered_bytes), ("batch_packets", batch_packets)):
            _positive(name, v)
        self.source = source
        self.ports = _check_ports(smtp_ports)
        self.idle_timeout_ms = int(idle_timeout_s * 1000)
        self.close_linger_ms = int(close_linger_s * 1000)
        self.max_connections = max_connections
        self.max_held_bytes = max_held_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.batch_packets = batch_packets
        self.counters = CaptureCounters()
        self._exporter = _exporter_name(source)
        # least recently active first: the idle sweep and eviction read from the front
        self._conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self._closing: deque[_Conn] = deque()
        self._held_total = 0
        self._now = 0
        self._next_sweep = 0
        self._cols = _Columns()
        self._rejects: list[Reject] = []
        self._read = 0
        self._skipped = 0
        self._ip_text: dict[bytes, str] = {}
        self._src_name = source

    # ------------------------------------------------------------------ public

    @property
    def open_connections(self) -> int:
        """Connections tracked now."""
        return len(self._conns)

    @property
    def buffered_bytes(self) -> int:
        """Out-of-order payload held now, all connections together (at most
        ``max_buffered_bytes``)."""
        return self._held_total

    def parse_stream(self, fh: BinaryIO, source: str) -> Iterator[Batch]:
        """Read one pcap or pcapng capture; yield a batch every ``batch_packets``
        packets and at the end (connections still open stay open for the next file or
        :meth:`close`)."""
        self._src_name = source
        self._exporter = _exporter_name(source)
        n = 0
        packet = self._tcp_packet
        counters = self.counters
        frames = iter_frames(fh)
        fr = None
        while True:
            # one try around the loop, not one per packet: this is the hot path
            try:
                for fr in frames:
                    counters.packets += 1
                    packet(fr.number, fr.ts_ms, fr.data, fr.linktype, fr.orig_len)
                    n += 1
                    if n >= self.batch_packets:
                        n = 0
                        yield self.take()
                break
            except PcapError as e:
                # the packets before the damage are kept; their connections stay open
                self._rejects.append(Reject.make(source, "file", str(e), "", FORMAT))
                self._read += 1
                break
            except Exception as e:  # a parser bug must not stop a collector: dead-letter the frame, go on
                self._internal_error(fr.number, fr.data, e)  # type: ignore[union-attr]
        batch = self.take()
        if batch.read or batch.records.num_rows:
            yield batch

    def feed(self, number: int, ts_ms: int, frame: bytes, linktype: int, orig_len: int | None = None) -> None:
        """One captured frame (``linktype`` as in pcap: 1 Ethernet, 101 raw IP, ...);
        ``orig_len`` is its length on the wire when the capture cut it."""
        self._packet(number, ts_ms, frame, linktype, len(frame) if orig_len is None else orig_len)

    def expire(self, now_ms: int) -> None:
        """Advance capture time to ``now_ms``: emit connections that closed or went
        idle by then (a live capture calls this when no packets come)."""
        if now_ms > self._now:
            self._now = now_ms
        self._sweep()

    def take(self) -> Batch:
        """The records and dead letters produced since the last call."""
        cols, self._cols = self._cols, _Columns()
        table = cols.table() if len(cols) else record.empty_table()
        batch = Batch(table, self._rejects, self._read, self._skipped)
        self._rejects, self._read, self._skipped = [], 0, 0
        return batch

    def close(self) -> Batch:
        """Emit every connection still tracked (call after the last input)."""
        for c in list(self._conns.values()):
            self._emit(c)
        self._closing.clear()
        return self.take()

    # ------------------------------------------------------------------ packets

    def _packet(self, number: int, ts: int, frame: bytes, linktype: int, orig_len: int) -> None:
        self.counters.packets += 1
        try:
            self._tcp_packet(number, ts, frame, linktype, orig_len)
        except Exception as e:  # a parser bug must not stop a collector: dead-letter the frame
            self._internal_error(number, frame, e)

    def _internal_error(self, number: int, frame: bytes, e: Exception) -> None:
        self._reject(number, f"internal error while reading the packet: {type(e).__name__}: {e}", frame)

    def _reject(self, number: int, reason: str, frame: bytes) -> None:
        self.counters.malformed += 1
        self._read += 1
        self._rejects.append(Reject.make(self._src_name, f"packet {number}", reason,
                                         frame[:RAW_PREFIX_BYTES].hex(), FORMAT))

    def _skip(self) -> None:
        self._read += 1
        self._skipped += 1

    def _tcp_packet(self, number: int, ts: int, frame: bytes, linktype: int, orig_len: int) -> None:
        flen = len(frame)
        # -- link layer
        etype, ip = link_header(frame, linktype)
        if etype == RAW_IP:
            etype = raw_ip_type(frame, linktype)
        elif etype in VLAN_TYPES:  # a tag after a Linux cooked header
            etype, ip = skip_vlan(frame, etype, ip)
        # -- IP
        if etype == 0x0800:
            if flen < ip + 20:
                return self._reject(number, "frame cut inside the IPv4 header", frame)
            vihl = frame[ip]
            ihl = (vihl & 0x0F) * 4
            if vihl >> 4 != 4 or ihl < 20:
                return self._reject(number, f"bad IPv4 header (version {vihl >> 4}, header length {ihl})", frame)
            if frame[ip + 9] != 6:
                self.counters.not_tcp += 1
                return self._skip()
            if ((frame[ip + 6] << 8) | frame[ip + 7]) & 0x1FFF:
                self.counters.fragments += 1
                return self._skip()
            ip_len = (frame[ip + 2] << 8) | frame[ip + 3]
            if ip_len < ihl:  # 0 from TCP segmentation offload: the frame tells
                ip_len = max(orig_len, flen) - ip
            src = frame[ip + 12:ip + 16]
            dst = frame[ip + 16:ip + 20]
            tcp = ip + ihl
        elif etype == 0x86DD:
            if flen < ip + 40:
                return self._reject(number, "frame cut inside the IPv6 header", frame)
            if frame[ip] >> 4 != 6:
                return self._reject(number, f"bad IPv6 header (version {frame[ip] >> 4})", frame)
            plen = (frame[ip + 4] << 8) | frame[ip + 5]
            ip_len = 40 + plen if plen else max(orig_len, flen) - ip  # 0: a jumbogram
            nxt = frame[ip + 6]
            tcp = ip + 40
            while nxt in _IPV6_EXT or nxt == 44:
                if tcp + 8 > flen:
                    return self._reject(number, "frame cut inside an IPv6 extension header", frame)
                if nxt == 44:
                    if ((frame[tcp + 2] << 8) | frame[tcp + 3]) & 0xFFF8:
                        self.counters.fragments += 1
                        return self._skip()
                    nxt, tcp = frame[tcp], tcp + 8
                else:
                    nxt, tcp = frame[tcp], tcp + 8 + frame[tcp + 1] * 8
            if nxt != 6:
                self.counters.not_tcp += 1
                return self._skip()
            src = frame[ip + 8:ip + 24]
            dst = frame[ip + 24:ip + 40]
        else:
            self.counters.not_ip += 1
            return self._skip()
        # -- TCP
        wire = max(orig_len, flen) - ip
        if ip_len > wire:  # a length the frame on the wire could not hold: trust the frame
            ip_len = wire
        end = ip + ip_len  # end of the IP packet on the wire
        if tcp + 20 > min(end, flen):
            why = "the capture cut the TCP header" if tcp + 20 <= end else "IP packet too short for a TCP header"
            return self._reject(number, why, frame)
        sport, dport, seq, ack, offflags = _TCP.unpack_from(frame, tcp)
        thl = (offflags >> 12) * 4
        if thl < 20 or tcp + thl > end:
            return self._reject(number, f"bad TCP header length {thl} (IP packet of {ip_len} bytes)", frame)
        flags = offflags & 0xFF
        if ts > MAX_EPOCH_MS or ts < 0:
            ts = MAX_EPOCH_MS if ts > 0 else 0
        if ts > self._now:
            # before the lookup: the sweep may emit the connection this packet belongs to
            self._now = ts
            if ts >= self._next_sweep:
                self._sweep()
        # -- which connection
        ports = self.ports
        if ports is not None and (dport in ports) != (sport in ports):
            if dport in ports:
                key = (src, sport, dst, dport)
                conn = self._conns.get(key)
                from_client = True
            else:
                key = (dst, dport, src, sport)
                conn = self._conns.get(key)
                from_client = False
        elif ports is not None and dport not in ports:
            self.counters.other_ports += 1
            return self._skip()
        else:
            key = (src, sport, dst, dport)
            conn = self._conns.get(key)
            from_client = True
            if conn is None:
                rkey = (dst, dport, src, sport)
                conn = self._conns.get(rkey)
                if conn is not None or (flags & (_SYN | _ACK)) == (_SYN | _ACK) or \
                        (not flags & _SYN and sport < dport):
                    key, from_client = rkey, False
        plen = end - tcp - thl  # payload length on the wire
        if conn is not None and from_client and (flags & (_SYN | _ACK)) == _SYN and seq != conn.isn \
                and (conn.closing >= 0 or conn.acked or not conn.syn):
            self._emit(conn)  # the client reuses the ports for a new connection
            conn = None
        if conn is None:
            if not (flags & _SYN or plen > 0) or flags & _RST:
                self.counters.stray += 1
                return self._skip()
            if len(self._conns) >= self.max_connections:
                self.counters.evicted += 1
                self._emit(next(iter(self._conns.values())))
            if from_client:
                conn = _Conn(key, src, sport, dst, dport, self._exporter, ts)
            else:
                conn = _Conn(key, dst, dport, src, sport, self._exporter, ts)
            self._conns[key] = conn
        else:
            self._conns.move_to_end(key)
        self.counters.smtp_packets += 1
        if ts > conn.last_ms:
            conn.last_ms = ts
        elif ts < conn.first_ms:  # captures merged from several points are not quite in order
            conn.first_ms = ts
        # -- counters and handshake
        if from_client:
            conn.packets += 1
            conn.bytes += ip_len
            conn.flags |= flags
            if flags & _SYN and not flags & _ACK:
                if not conn.syn:
                    conn.syn = True
                    conn.isn = seq
                    conn.c_next = (seq + 1) & _M
            else:
                conn.client_more = True
                if conn.synack and flags & _ACK:
                    conn.acked = True
            if flags & _FIN:
                conn.cfin = True
        else:
            conn.rev_packets += 1
            conn.rev_bytes += ip_len
            conn.server_seen = True
            if flags & _SYN and flags & _ACK:
                if not conn.synack:
                    conn.synack = True
                    conn.s_next = (seq + 1) & _M
            if flags & _FIN:
                conn.sfin = True
        if flags & _RST:
            if not from_client and conn.syn and not conn.synack and not conn.acked:
                conn.refused = True
            else:
                conn.rst = True
        # -- payload
        if plen > 0:
            d = conn.dialogue
            if d is None:
                d = conn.dialogue = SmtpDialogue(from_start=conn.syn or conn.synack)
            if not (d.c_mode == _STOP and d.s_stopped):
                payload = frame[tcp + thl:end]
                if len(payload) < plen:
                    self.counters.cut_by_snaplen += 1
                    self._segment(conn, from_client, seq, payload, plen)
                elif conn.held is not None:
                    self._segment(conn, from_client, seq, payload, plen)
                # in order and nothing held, the common case, without the calls of _segment
                elif from_client:
                    if conn.c_next == seq:
                        d.client(payload)
                        conn.c_next = (seq + plen) & _M
                    else:
                        self._segment(conn, from_client, seq, payload, plen)
                elif conn.s_next == seq:
                    d.server(payload)
                    conn.s_next = (seq + plen) & _M
                else:
                    self._segment(conn, from_client, seq, payload, plen)
        if conn.held is not None and flags & _ACK:
            self._acked(conn, not from_client, ack)
        if conn.closing < 0 and (conn.rst or conn.refused or (conn.cfin and (conn.sfin or not conn.server_seen))):
            conn.closing = ts
            self._closing.append(conn)

    # ------------------------------------------------------------------ reassembly

    def _segment(self, conn: _Conn, from_client: bool, seq: int, payload: bytes, plen: int) -> None:
        nxt = conn.c_next if from_client else conn.s_next
        if nxt < 0:
            nxt = seq
        off = (seq - nxt) & _M
        if off == 0:
            self._deliver(conn, from_client, payload, plen)
            nxt = (seq + plen) & _M
        elif off & _HALF:
            back = _M + 1 - off  # bytes of this segment already delivered
            if back >= plen:
                self.counters.retransmitted_bytes += plen
                return
            self.counters.retransmitted_bytes += back
            self._deliver(conn, from_client, payload[back:], plen - back)
            nxt = (seq + plen) & _M
        else:
            self._hold(conn, from_client, seq, payload, plen)
            return
        if from_client:
            conn.c_next = nxt
        else:
            conn.s_next = nxt
        if conn.held is not None:
            self._drain(conn, from_client)

    def _deliver(self, conn: _Conn, from_client: bool, payload: bytes, plen: int) -> None:
        d = conn.dialogue
        if from_client:
            d.client(payload)  # type: ignore[union-attr]
            if len(payload) < plen:
                self._gap(conn, True, plen - len(payload))
        else:
            d.server(payload)  # type: ignore[union-attr]
            if len(payload) < plen:
                self._gap(conn, False, plen - len(payload))

    def _gap(self, conn: _Conn, from_client: bool, n: int) -> None:
        self.counters.gaps += 1
        self.counters.gap_bytes += n
        d = conn.dialogue
        if from_client:
            d.client_gap(n)  # type: ignore[union-attr]
        else:
            d.server_gap(n)  # type: ignore[union-attr]

    def _hold(self, conn: _Conn, from_client: bool, seq: int, payload: bytes, plen: int) -> None:
        if conn.held is None:
            conn.held = {}
        k = (from_client, seq)
        old = conn.held.get(k)
        if old is not None and len(old[0]) >= len(payload):
            return
        size = len(payload) - (len(old[0]) if old else 0)
        conn.held[k] = (payload, plen)
        conn.held_bytes += size
        self._held_total += size
        # over a bound: the hole is not going to be filled in time; step over it
        while conn.held and (conn.held_bytes > self.max_held_bytes or self._held_total > self.max_buffered_bytes):
            side = from_client if any(s == from_client for s, _ in conn.held) else (not from_client)
            self._skip_hole(conn, side)

    def _acked(self, conn: _Conn, side: bool, ack: int) -> None:
        """The other side acknowledged ``ack`` for ``side``'s stream: a hole it covers was
        lost by the capture, not by the network."""
        nxt = conn.c_next if side else conn.s_next
        if nxt < 0 or not any(s == side for s, _ in conn.held):  # type: ignore[union-attr]
            return
        if 0 < ((ack - nxt) & _M) < _HALF:
            self._skip_hole(conn, side)

    def _skip_hole(self, conn: _Conn, side: bool) -> None:
        held = conn.held
        nxt = conn.c_next if side else conn.s_next
        seqs = [s for f, s in held if f == side]  # type: ignore[union-attr]
        if not seqs:
            return
        first = min(seqs, key=lambda s: (s - nxt) & _M)
        if first != nxt:
            self._gap(conn, side, (first - nxt) & _M)
        if side:
            conn.c_next = first
        else:
            conn.s_next = first
        self._drain(conn, side)

    def _drain(self, conn: _Conn, side: bool) -> None:
        """Deliver held segments of ``side`` that now follow on."""
        held = conn.held
        while held:
            nxt = conn.c_next if side else conn.s_next
            # at the next byte, or starting before it (overlapping what was delivered)
            ready = [(s, v) for (f, s), v in held.items()
                     if f == side and ((s - nxt) & _M == 0 or (s - nxt) & _M & _HALF)]
            if not ready:
                break
            for s, (payload, plen) in ready:
                del held[(side, s)]
                conn.held_bytes -= len(payload)
                self._held_total -= len(payload)
                nxt = conn.c_next if side else conn.s_next
                off = (s - nxt) & _M
                back = 0 if off == 0 else _M + 1 - off
                if back < plen:
                    self._deliver(conn, side, payload[back:], plen - back)
                    if side:
                        conn.c_next = (s + plen) & _M
                    else:
                        conn.s_next = (s + plen) & _M
        if not held:
            conn.held = None

    # ------------------------------------------------------------------ emission

    def _sweep(self) -> None:
        now = self._now
        self._next_sweep = now + 1000
        linger = self.close_linger_ms
        closing = self._closing
        while closing and closing[0].closing + linger <= now:
            c = closing.popleft()
            if self._conns.get(c.key) is not c:
                continue  # emitted already (reuse, eviction, timeout)
            if c.last_ms + linger <= now:
                self._emit(c)
            else:
                closing.append(c)  # packets came after the close: wait for them to stop
                c.closing = c.last_ms
                if closing[0] is c:
                    break
        idle = self.idle_timeout_ms
        conns = self._conns
        while conns:
            c = next(iter(conns.values()))
            if c.last_ms + idle > now:
                break
            self.counters.idle_timeouts += 1
            self._emit(c)

    def _emit(self, c: _Conn) -> None:
        if self._conns.get(c.key) is c:
            del self._conns[c.key]
        d = c.dialogue
        if c.held:
            # holes still open (the capture ended, or the connection went idle or was evicted):
            # read what is there, gaps and all
            for side in (True, False):
                while c.held and any(s == side for s, _ in c.held):
                    self._skip_hole(c, side)
        c.held = None
        self._held_total -= c.held_bytes
        c.held_bytes = 0
        cols = self._cols
        cols.start.append(c.first_ms)
        cols.end.append(c.last_ms)
        cols.src.append(self._text(c.cip))
        cols.dst.append(self._text(c.sip))
        cols.sport.append(c.cport)
        cols.dport.append(c.sport)
        cols.packets.append(c.packets)
        cols.bytes.append(c.bytes)
        cols.rev_packets.append(c.rev_packets)
        cols.rev_bytes.append(c.rev_bytes)
        cols.flags.append(c.flags)
        cols.state.append(c.state())
        cols.exporter.append(c.exporter)
        if d is not None and d.commands:
            cols.helo.append(d.helo or "")
            cols.mail_from.append(d.mail_from_domain or "")
            cols.rcpt.append(min(d.rcpt_count, _M))
            cols.starttls.append(d.starttls)
            cols.auth.append(d.auth)
        else:
            cols.helo.append("")
            cols.mail_from.append("")
            cols.rcpt.append(None)
            cols.starttls.append(None)
            cols.auth.append(None)
        if d is not None and d.replies:
            cols.first.append(d.reply_first)
            cols.last.append(d.reply_last)
            cols.r4.append(min(d.replies_4xx, 0xFFFF))
            cols.r5.append(min(d.replies_5xx, 0xFFFF))
        else:
            cols.first.append(None)
            cols.last.append(None)
            cols.r4.append(None)
            cols.r5.append(None)
        self.counters.connections += 1
        total = c.packets + c.rev_packets
        self._read += total
        self._skipped += total - 1

    def _text(self, addr: bytes) -> str:
        t = self._ip_text.get(addr)
        if t is None:
            if len(self._ip_text) > 65536:
                self._ip_text.clear()
            t = addr_text(addr)
            self._ip_text[addr] = t
        return t


def _exporter_name(source: str) -> str:
    return os.path.basename(source) or source


def sniff(head: bytes) -> bool:
    """True when ``head`` starts a pcap or pcapng capture that does not carry NetFlow
    (those are ``netflow-pcap``)."""
    return is_capture(head) and not _sniff_netflow_pcap(head)
