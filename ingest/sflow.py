"""sFlow v5 datagrams → records (sflow.org, "sFlow Version 5", 2004).

Switches and hypervisors (Open vSwitch, most data-centre switches) export sFlow: every Nth
packet of an interface, its first bytes, in a *flow sample*. :class:`SflowDecoder` is the pure
decoder: fed UDP payloads with the time they arrived, it returns
:class:`~smtpguard.ingest.base.Batch` objects. Three shells feed it: :class:`SflowPcapParser`
(sFlow datagrams in a pcap or pcapng capture of the export traffic, read by
:mod:`smtpguard.ingest.pcapfile`), :class:`SflowDatParser` (datagrams written back to back) and
the UDP listener (``smtpguard collect sflow --listen HOST:PORT``,
:func:`smtpguard.ingest.netflow_listen.listen_udp`).

Samples
    Flow samples (format 1) and expanded flow samples (format 3) give one record each, from
    their raw packet header record (format 1: Ethernet with 802.1Q/802.1ad tags, raw IPv4 or
    raw IPv6; then TCP or UDP) or, when there is none, their sampled IPv4/IPv6 record (formats 3
    and 4). Counter samples (formats 2 and 4) are counted and skipped, as are flow samples of
    other protocols' headers and of non-IP packets. A sample that cannot be read is a dead letter
    with its reason; the datagram's other samples go on.

Records
    One record per sampled packet: ``packets`` 1, ``bytes`` the IP packet's length (IPv4 total
    length, IPv6 payload length + 40; the sampled record's length field when there is no
    header), ``sampling_rate`` the sample's N (1 in N), ``tcp_flags`` from the TCP header,
    ``interface_id`` the input ifIndex, ``exporter`` the agent address (``/sub-agent`` when it
    is not 0), ``action`` ``reject`` when the output interface says the packet was discarded,
    else ``unknown``. sFlow carries no flow times: ``start`` and ``end`` are the datagram's
    arrival (the capture time, or the wall clock of the listener); for datagrams in a file with
    no times, the file's modification time moved by the agent's uptime.

SMTP selection (``smtp_ports`` not None)
    A sample towards an SMTP port is kept; the others (the server's answers, other ports) are
    skipped. Packet samples are not paired into connections: a kept record is one packet of a
    client's SMTP traffic, weighted by its sampling rate (docs/DETECTION.md, sampling).

Counters
    Per agent (:attr:`SflowDecoder.counters`): datagrams, flow and counter samples, samples kept
    and skipped, sequence gaps (datagrams missed between two the agent numbered), the agents'
    own drop counters (samples the agent could not export), and dead letters.
"""

from __future__ import annotations

import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Sequence

import pyarrow as pa

from smtpguard.core import record
from smtpguard.core.wire import MAX_EPOCH_MS
from smtpguard.ingest.base import Batch, Counters, Datagram, Reject
from smtpguard.ingest.pcapfile import (ExportCaptureParser, addr_text, ip_header, is_capture, skip_vlan,
                                       with_rejects)
from smtpguard.ingest.selection import DEFAULT_SMTP_PORTS, smtp_ports_config

NAME = "sflow"
#: bytes of a datagram kept in its dead letter (hex)
RAW_PREFIX_BYTES = 256
#: samples a datagram may declare (a 64 KiB datagram holds at most a few hundred)
MAX_SAMPLES = 4096

_U32 = struct.Struct(">I")
_HEADER = struct.Struct(">III")  # sub_agent_id, sequence, uptime_ms ... after the agent address
_FLOW = struct.Struct(">IIIIIIII")  # seq, source_id, rate, pool, drops, input, output, n_records
_FLOW_X = struct.Struct(">IIIIIIIIIII")  # seq, id type, id index, rate, pool, drops, in fmt, in, out fmt, out, n
_RAW = struct.Struct(">IIII")  # header protocol, frame length, stripped, header length


class SflowError(ValueError):
    """Why a datagram or a sample cannot be read."""


@dataclass
class AgentCounters(Counters):
    datagrams: int = 0
    flow_samples: int = 0
    counter_samples: int = 0
    kept: int = 0
    skipped: int = 0
    """flow samples of other ports, of the server's direction, of other protocols or of non-IP packets"""
    sequence_gaps: int = 0
    """datagrams the agent numbered that never arrived"""
    agent_drops: int = 0
    """samples the agent says it dropped (its drops counters' increase)"""
    rejects: int = 0

    def __str__(self) -> str:
        return (f"{self.datagrams} datagrams, {self.flow_samples} flow samples ({self.kept} kept, {self.skipped} "
                f"skipped), {self.counter_samples} counter samples, {self.sequence_gaps} datagrams missed, "
                f"{self.agent_drops} samples dropped by the agents, {self.rejects} dead letters")


class _Packet:
    __slots__ = ("src", "dst", "sport", "dport", "proto", "length", "flags")

    def __init__(self, src: str, dst: str, sport: int, dport: int, proto: int, length: int, flags: int | None):
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.proto, self.length, self.flags = proto, length, flags


class _Agent:
    """What the decoder remembers of one agent: its counters, the last datagram sequence number, and
    the drops counter of each of its data sources (at most :data:`MAX_SOURCES_PER_AGENT`)."""

    __slots__ = ("counters", "seq", "drops")

    def __init__(self) -> None:
        self.counters = AgentCounters()
        self.seq: int | None = None
        self.drops: dict[int, int] = {}


#: data sources per agent whose drops counter is followed (a switch has one per sampled interface)
MAX_SOURCES_PER_AGENT = 4096


class SflowDecoder:
    """Decode sFlow v5 datagrams into record batches; see the module docstring. The state it
    keeps (:class:`_Agent`) is bounded by ``max_agents``: the least recently heard agent is
    forgotten, its counts kept in :meth:`totals`."""

    name = NAME

    def __init__(self, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS, *, max_agents: int = 10_000):
        self.smtp_ports = smtp_ports_config(smtp_ports)
        self.max_agents = max_agents
        self._agents: OrderedDict[str, _Agent] = OrderedDict()
        self._forgotten = AgentCounters()

    @property
    def counters(self) -> dict[str, AgentCounters]:
        """Per agent heard (and not forgotten): its counters."""
        return {name: a.counters for name, a in self._agents.items()}

    # the listener's interface, shared with the NetFlow decoder: sFlow has no templates to wait for
    pending_sets = 0

    def expire(self, now_ms: int) -> Batch:
        return Batch.empty()

    def flush(self) -> Batch:
        return Batch.empty()

    def totals(self) -> AgentCounters:
        t = AgentCounters()
        t.add(self._forgotten)
        for a in self._agents.values():
            t.add(a.counters)
        return t

    def decode(self, payload: bytes, exporter: str = "", received_ms: int | None = None) -> Batch:
        return self.decode_many([Datagram(payload, exporter, received_ms)])

    def decode_many(self, datagrams: Iterable[Datagram], source: str | None = None) -> Batch:
        cols: dict[str, list] = {k: [] for k in ("start", "src_ip", "dst_ip", "src_port", "dst_port", "protocol",
                                                   "bytes", "tcp_flags", "interface_id", "exporter", "sampling_rate",
                                                   "action")}
        rejects: list[Reject] = []
        read = skipped = 0
        for dg in datagrams:
            loc = dg.location or "datagram"
            src = source or dg.exporter or "sflow"
            try:
                r, s = self._datagram(dg, cols, rejects, src, loc)
            except SflowError as e:
                rejects.append(Reject.make(src, loc, f"sFlow datagram from {dg.exporter or 'unknown'}: {e}",
                                           dg.payload[:RAW_PREFIX_BYTES].hex(), NAME))
                r, s = 1, 0
            read += r
            skipped += s
        n = len(cols["start"])
        if n == 0:
            return Batch(record.empty_table(), rejects, read, skipped)
        ms = pa.array(cols["start"], pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
        table = record.conform(pa.table({
            "start": ms, "end": ms,
            "src_ip": pa.array(cols["src_ip"], pa.string()), "dst_ip": pa.array(cols["dst_ip"], pa.string()),
            "src_port": pa.array(cols["src_port"], pa.uint16()), "dst_port": pa.array(cols["dst_port"], pa.uint16()),
            "protocol": pa.array(cols["protocol"], pa.uint8()),
            "packets": pa.repeat(pa.scalar(1, pa.uint64()), n), "bytes": pa.array(cols["bytes"], pa.uint64()),
            "tcp_flags": pa.array(cols["tcp_flags"], pa.uint16()),
            "interface_id": pa.array(cols["interface_id"], pa.string()),
            "exporter": pa.array(cols["exporter"], pa.string()),
            "sampling_rate": pa.array(cols["sampling_rate"], pa.uint32()),
            "action": pa.array(cols["action"], pa.string()),
        }), source_format=NAME)
        return Batch(table, rejects, read, skipped)

    # ------------------------------------------------------------------ internals

    def _agent(self, name: str) -> _Agent:
        a = self._agents.get(name)
        if a is None:
            a = self._agents[name] = _Agent()
            while len(self._agents) > self.max_agents:
                _, old = self._agents.popitem(last=False)
                self._forgotten.add(old.counters)
        else:
            self._agents.move_to_end(name)  # most recently heard last
        return a

    def _datagram(self, dg: Datagram, cols: dict[str, list], rejects: list[Reject], src: str,
                  loc: str) -> tuple[int, int]:
        """Decode one datagram into ``cols``; returns (units read, units skipped)."""
        p = dg.payload
        if len(p) < 8:
            raise SflowError(f"{len(p)} bytes, shorter than an sFlow header")
        version, atype = struct.unpack_from(">II", p, 0)
        if version != 5:
            raise SflowError(f"version {version}, not 5")
        if atype == 1:
            alen = 4
        elif atype == 2:
            alen = 16
        else:
            raise SflowError(f"agent address type {atype} (1 = IPv4, 2 = IPv6)")
        if len(p) < 8 + alen + 16:
            raise SflowError(f"{len(p)} bytes, shorter than its header")
        agent_ip = addr_text(p[8:8 + alen])
        sub, seq, uptime = _HEADER.unpack_from(p, 8 + alen)
        (nsamples,) = _U32.unpack_from(p, 20 + alen)
        if nsamples > MAX_SAMPLES:
            raise SflowError(f"{nsamples} samples declared (at most {MAX_SAMPLES})")
        agent = agent_ip if sub == 0 else f"{agent_ip}/{sub}"
        state = self._agent(agent)
        c = state.counters
        c.datagrams += 1
        if state.seq is not None and seq > state.seq + 1:
            c.sequence_gaps += seq - state.seq - 1
        state.seq = seq
        when = dg.received_ms if dg.received_ms is not None else int(time.time() * 1000)
        when = min(max(when, 0), MAX_EPOCH_MS)
        pos = 24 + alen
        read = skipped = 0
        for k in range(nsamples):
            # a datagram cut short: the samples read so far stand, the rest is one dead letter
            cut = None
            if pos + 8 > len(p):
                cut = f"sample {k + 1} of {nsamples} is missing (the datagram ends at byte {len(p)})"
            else:
                fmt, length = struct.unpack_from(">II", p, pos)
                body = p[pos + 8:pos + 8 + length]
                if len(body) < length:
                    cut = f"sample {k + 1} declares {length} bytes, {len(body)} left"
            if cut is not None:
                c.rejects += 1
                rejects.append(Reject.make(src, f"{loc} sample {k + 1}", f"sFlow datagram from {agent}: {cut}",
                                           p[pos:pos + RAW_PREFIX_BYTES].hex(), NAME))
                return read + 1, skipped
            pos += 8 + length
            enterprise, fmt = fmt >> 12, fmt & 0xFFF
            if enterprise != 0 or fmt not in (1, 2, 3, 4):
                continue  # a vendor's sample: not ours to read
            if fmt in (2, 4):
                c.counter_samples += 1
                continue
            c.flow_samples += 1
            read += 1
            try:
                kept = self._flow_sample(body, fmt == 3, agent, when, state, cols)
            except (SflowError, struct.error, ValueError) as e:
                c.rejects += 1
                rejects.append(Reject.make(src, f"{loc} sample {k + 1}", f"sFlow flow sample from {agent}: {e}",
                                           body[:RAW_PREFIX_BYTES].hex(), NAME))
                continue
            if kept:
                c.kept += 1
            else:
                c.skipped += 1
                skipped += 1
        return read, skipped

    def _flow_sample(self, b: bytes, expanded: bool, agent: str, when: int, state: _Agent,
                     cols: dict[str, list]) -> bool:
        if expanded:
            (_seq, id_type, id_index, rate, _pool, drops, in_fmt, in_val, out_fmt, _out_val,
             nrec) = _FLOW_X.unpack_from(b, 0)
            pos = _FLOW_X.size
            source_id = (id_type << 24) | id_index
        else:
            _seq, source_id, rate, _pool, drops, inp, out, nrec = _FLOW.unpack_from(b, 0)
            pos = _FLOW.size
            in_fmt, in_val, out_fmt = inp >> 30, inp & 0x3FFFFFFF, out >> 30
        if rate == 0:
            raise SflowError("sampling rate 0 (it is 1 in N, N >= 1)")
        before = state.drops.get(source_id)
        if before is not None and drops > before:
            state.counters.agent_drops += drops - before
        if before is not None or len(state.drops) < MAX_SOURCES_PER_AGENT:
            state.drops[source_id] = drops
        pkt = None
        for _ in range(nrec):
            if pos + 8 > len(b):
                raise SflowError("a flow record is missing (the sample ends early)")
            rfmt, rlen = struct.unpack_from(">II", b, pos)
            body = b[pos + 8:pos + 8 + rlen]
            if len(body) < rlen:
                raise SflowError(f"a flow record declares {rlen} bytes, {len(body)} left")
            pos += 8 + rlen
            if rfmt == 1:
                pkt = _raw_header(body)
                break  # the raw header is what was on the wire: it wins over the sampled IP records
            if rfmt in (3, 4) and pkt is None:
                pkt = _sampled_ip(body, v6=rfmt == 4)
        if pkt is None:
            return False
        if self.smtp_ports is not None and pkt.dport not in self.smtp_ports:
            return False
        cols["start"].append(when)
        cols["src_ip"].append(pkt.src)
        cols["dst_ip"].append(pkt.dst)
        cols["src_port"].append(pkt.sport)
        cols["dst_port"].append(pkt.dport)
        cols["protocol"].append(pkt.proto)
        cols["bytes"].append(pkt.length)
        cols["tcp_flags"].append(pkt.flags)
        cols["interface_id"].append(str(in_val) if in_fmt == 0 and in_val not in (0, 0x3FFFFFFF) else "")
        cols["exporter"].append(agent)
        cols["sampling_rate"].append(rate)
        cols["action"].append("reject" if out_fmt == 1 else "unknown")
        return True


def _raw_header(b: bytes) -> _Packet | None:
    """The packet in a raw packet header record, or None when it is not IP (or not a protocol
    this reads)."""
    proto, _frame_len, _stripped, hlen = _RAW.unpack_from(b, 0)
    h = b[_RAW.size:_RAW.size + hlen]
    if len(h) < hlen:
        raise SflowError(f"raw packet header declares {hlen} bytes, {len(h)} left")
    if proto == 1:  # Ethernet
        if len(h) < 14:
            return None
        etype, off = skip_vlan(h, (h[12] << 8) | h[13], 14)
    elif proto == 11:
        etype, off = 0x0800, 0
    elif proto == 12:
        etype, off = 0x86DD, 0
    else:
        return None
    return _ip(h, etype, off)


def _ip(h: bytes, etype: int, off: int) -> _Packet | None:
    ip = ip_header(h, etype, off)
    if ip is None:
        return None
    sport = dport = 0
    flags = None
    if ip.proto in (6, 17) and ip.l4 >= 0 and len(h) >= ip.l4 + 4:
        l4 = ip.l4
        sport, dport = (h[l4] << 8) | h[l4 + 1], (h[l4 + 2] << 8) | h[l4 + 3]
        if ip.proto == 6 and len(h) >= l4 + 14:
            flags = ((h[l4 + 12] & 1) << 8) | h[l4 + 13]
    return _Packet(addr_text(ip.src), addr_text(ip.dst), sport, dport, ip.proto, ip.length, flags)


def _sampled_ip(b: bytes, v6: bool) -> _Packet:
    if len(b) < (56 if v6 else 32):
        raise SflowError(f"sampled IPv{6 if v6 else 4} record of {len(b)} bytes is too short")
    if v6:
        length, proto = struct.unpack_from(">II", b, 0)
        src, dst = addr_text(b[8:24]), addr_text(b[24:40])
        sport, dport, flags = struct.unpack_from(">III", b, 40)
    else:
        length, proto = struct.unpack_from(">II", b, 0)
        src, dst = addr_text(b[8:12]), addr_text(b[12:16])
        sport, dport, flags = struct.unpack_from(">III", b, 16)
    if sport > 0xFFFF or dport > 0xFFFF or proto > 0xFF:
        raise SflowError(f"sampled IP record with port {max(sport, dport)} or protocol {proto} out of range")
    return _Packet(src, dst, sport, dport, proto, length, (flags & 0x1FF) if proto == 6 else None)


def looks_like_sflow(payload: bytes) -> bool:
    """True when ``payload`` starts like an sFlow v5 datagram."""
    if len(payload) < 28:
        return False
    version, atype = struct.unpack_from(">II", payload, 0)
    if version != 5 or atype not in (1, 2):
        return False
    alen = 4 if atype == 1 else 16
    if len(payload) < 24 + alen:
        return False
    (n,) = _U32.unpack_from(payload, 20 + alen)
    return n <= MAX_SAMPLES


def sniff_pcap(head: bytes) -> bool:
    """True when ``head`` is the start of a capture whose first UDP datagram is sFlow v5."""
    if not is_capture(head):
        return False
    from smtpguard.ingest.pcapfile import first_udp_payload

    payload = first_udp_payload(head)
    return payload is not None and looks_like_sflow(payload)


def sniff_dat(head: bytes) -> bool:
    """True when ``head`` starts with an sFlow v5 datagram (datagrams written back to back)."""
    return not is_capture(head) and looks_like_sflow(head)


sniff = sniff_pcap


class SflowPcapParser(ExportCaptureParser):
    """sFlow datagrams in a pcap or pcapng capture of the export traffic; each datagram's time is
    its capture time. UDP that is not sFlow is counted in :attr:`ignored_packets`."""

    name = "sflow-pcap"

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS, *,
                 decoder: SflowDecoder | None = None, batch_datagrams: int = 2000):
        super().__init__(source, decoder if decoder is not None else SflowDecoder(smtp_ports), "sflow",
                         looks_like_sflow, batch_datagrams, RAW_PREFIX_BYTES)


class SflowDatParser:
    """sFlow datagrams written back to back (a datagram's length follows from its samples'
    lengths). Times: the file's modification time for the last datagram, the others moved back
    by the agent's uptime."""

    name = "sflow-dat"

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS, *,
                 decoder: SflowDecoder | None = None):
        self.source = source
        self.decoder = decoder if decoder is not None else SflowDecoder(smtp_ports)

    def parse_stream(self, fh: BinaryIO, source: str) -> Iterator[Batch]:
        data = fh.read()
        try:
            mtime_ms = int(os.fstat(fh.fileno()).st_mtime * 1000)
        except (OSError, AttributeError, ValueError):
            mtime_ms = int(time.time() * 1000)
        found: list[tuple[bytes, int, str]] = []
        pos = 0
        extra: list[Reject] = []
        while pos < len(data):
            end = _datagram_end(data, pos)
            if end is None:
                extra.append(Reject.make(source, f"byte {pos}", "not an sFlow v5 datagram (the rest of the file is "
                                         "left unread)", data[pos:pos + RAW_PREFIX_BYTES].hex(), NAME))
                break
            dg = data[pos:end]
            alen = 4 if _U32.unpack_from(dg, 4)[0] == 1 else 16
            found.append((dg, _U32.unpack_from(dg, 16 + alen)[0], f"byte {pos}"))
            pos = end
        if found:
            last_up = found[-1][1]
            todo = [Datagram(dg, "", mtime_ms - max(0, last_up - up), loc) for dg, up, loc in found]
            yield with_rejects(self.decoder.decode_many(todo, source), extra)
        elif extra:
            yield Batch(record.empty_table(), extra, len(extra), 0)

    def close(self) -> Batch:
        return Batch.empty()


def _datagram_end(data: bytes, pos: int) -> int | None:
    """Where the datagram at ``pos`` ends, from its samples' lengths; None when it is not one."""
    if not looks_like_sflow(data[pos:pos + 64]):
        return None
    alen = 4 if _U32.unpack_from(data, pos + 4)[0] == 1 else 16
    (n,) = _U32.unpack_from(data, pos + 20 + alen)
    p = pos + 24 + alen
    for _ in range(n):
        if p + 8 > len(data):
            return None
        (length,) = _U32.unpack_from(data, p + 4)
        p += 8 + length
    return p if p <= len(data) else None
