"""The live capture shell: an interface, read with scapy, feeding a
:class:`~smtpguard.ingest.pcap_smtp.SmtpCaptureParser`.

Capture goes through scapy's Linux packet socket (``L2ListenSocket``: AF_PACKET, kernel
timestamps, VLAN tags put back from the kernel's auxiliary data). Frames are taken raw
with ``recv_raw`` and parsed by the same code as capture files; ``sniff`` /
``AsyncSniffer`` would dissect every frame into scapy objects first, which costs tens of
microseconds a packet and would cap a sensor at some tens of thousands of packets per
second.

The kernel filters what reaches Python. By default it runs a classic BPF program built
here ("TCP to or from an SMTP port", IPv4 and IPv6, on Ethernet or raw-IP interfaces),
so no libpcap is needed; ``bpf`` replaces it with a tcpdump-style expression, which
scapy compiles with libpcap. On the loopback interface the program also drops the
outgoing copy of each packet, which a packet socket sees twice there (tcpdump does the
same).

Example (what ``smtpguard collect live --iface eth0`` runs)::

    stop = threading.Event()
    live_capture("eth0", cfg.ingest.smtp_ports, collector.send, stop)
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from smtpguard.core.errors import ConfigError, InputError, SmtpguardError

from .base import Batch
from .pcap_smtp import SmtpCaptureParser, _check_ports

log = logging.getLogger(__name__)


class _NoLinkGuess(logging.Filter):
    """scapy guesses a dissector for an interface's link type when it opens a socket and
    warns when it has none (the loopback); frames are read raw here, so that is noise."""

    def filter(self, rec: logging.LogRecord) -> bool:
        return not rec.getMessage().startswith("Unable to guess type")


logging.getLogger("scapy.runtime").addFilter(_NoLinkGuess())

#: How often finished connections are handed to ``on_batch`` (wall time).
FLUSH_INTERVAL_S = 1.0
#: Longest frame read; loopback and offloaded interfaces pass frames of up to 64 KiB.
SNAPLEN_BYTES = 262_144
#: Frames read in one go before the loop looks at the clock and ``stop_event``.
READ_BURST = 1024
#: Kernel receive buffer asked for: scapy's default (64 KiB) overflows within
#: milliseconds on a busy link (the kernel may grant less, see ``net.core.rmem_max``).
RCVBUF_BYTES = 8 << 20
#: Frames still read after the stop: what the buffer held, not what keeps coming.
DRAIN_FRAMES = 100_000
#: How long the loop waits for a frame before it looks at ``stop_event``.
_POLL_S = 0.1
#: Above this many ports the default program only keeps TCP (its jumps would not fit
#: classic BPF's 8-bit offsets); the parser still keeps only SMTP ports.
MAX_FILTER_PORTS = 48

# Linux ARPHRD_* link types and the pcap link type their frames have
_ARPHRD_LINKTYPE = {1: 1, 772: 1, 0xFFFE: 101, 512: 101, 768: 101, 776: 101, 778: 101, 823: 101}
_ARPHRD_LOOPBACK = 772
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_SO_ATTACH_FILTER = 26
_PACKET_OUTGOING = 4
_SKF_AD_PKTTYPE = -0x1000 + 4

# classic BPF opcodes
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS, _LD_H_IND = 0x20, 0x28, 0x30, 0x48
_LDX_B_MSH, _ALU_AND_K = 0xB1, 0x54
_JEQ_K, _JSET_K, _RET_K = 0x15, 0x45, 0x06


@dataclass
class LiveStats:
    packets: int = 0
    """frames read from the socket (after the kernel filter)"""
    batches: int = 0
    """batches handed to ``on_batch``"""
    kernel_drops: int = 0
    """frames the kernel dropped because the socket buffer was full"""


# ------------------------------------------------------------------ BPF program


def _assemble(code: list[tuple]) -> list[tuple[int, int, int, int]]:
    """Resolve labels: items are ``(op, k)``, ``(op, k, jt_label, jf_label)`` (None = the
    next instruction) or ``("label", name)``."""
    where: dict[str, int] = {}
    n = 0
    for item in code:
        if item[0] == "label":
            where[item[1]] = n
        else:
            n += 1
    out: list[tuple[int, int, int, int]] = []
    for item in code:
        if item[0] == "label":
            continue
        i = len(out)
        op, k = item[0], item[1]
        jt = jf = 0
        if len(item) == 4:
            jt = 0 if item[2] is None else where[item[2]] - i - 1
            jf = 0 if item[3] is None else where[item[3]] - i - 1
            if not (0 <= jt <= 255 and 0 <= jf <= 255):
                raise ValueError("jump too far for classic BPF")
        out.append((op, jt, jf, k))
    return out


def smtp_filter(ports: frozenset[int] | None, link_bytes: int, drop_outgoing: bool) -> list[tuple[int, int, int, int]]:
    """A classic BPF program keeping TCP packets from or to one of ``ports`` (every TCP
    packet with ``ports=None``) for frames whose IP header starts at ``link_bytes``
    (14 for Ethernet, 0 for raw IP)."""
    L = link_bytes
    code: list[tuple] = []
    if drop_outgoing:
        code += [(_LD_W_ABS, _SKF_AD_PKTTYPE), (_JEQ_K, _PACKET_OUTGOING, "drop", None)]
    if L == 14:
        code += [(_LD_H_ABS, 12), (_JEQ_K, 0x0800, "v4", None), (_JEQ_K, 0x86DD, "v6", "drop")]
    else:
        code += [(_LD_B_ABS, 0), (_ALU_AND_K, 0xF0), (_JEQ_K, 0x40, "v4", None), (_JEQ_K, 0x60, "v6", "drop")]
    by_port = sorted(ports) if ports is not None and len(ports) <= MAX_FILTER_PORTS else None

    def port_checks(load_sport: tuple, load_dport: tuple) -> list[tuple]:
        if by_port is None:
            return [(_RET_K, SNAPLEN_BYTES)]
        out = [load_sport] + [(_JEQ_K, p, "keep", None) for p in by_port]
        out += [load_dport] + [(_JEQ_K, p, "keep", None) for p in by_port]
        return out + [(_RET_K, 0)]

    code += [("label", "v6"), (_LD_B_ABS, L + 6), (_JEQ_K, 6, None, "drop")]
    code += port_checks((_LD_H_ABS, L + 40), (_LD_H_ABS, L + 42))
    code += [("label", "v4"), (_LD_B_ABS, L + 9), (_JEQ_K, 6, None, "drop"),
             (_LD_H_ABS, L + 6), (_JSET_K, 0x1FFF, "drop", None),  # later fragments carry no ports
             (_LDX_B_MSH, L)]
    code += port_checks((_LD_H_IND, L), (_LD_H_IND, L + 2))
    code += [("label", "keep"), (_RET_K, SNAPLEN_BYTES), ("label", "drop"), (_RET_K, 0)]
    return _assemble(code)


def _attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    from scapy.libs.structures import bpf_insn, sock_fprog

    insns = (bpf_insn * len(program))(*[bpf_insn(op, jt, jf, ctypes.c_int32(k).value) for op, jt, jf, k in program])
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER,
                    sock_fprog(len(program), ctypes.cast(insns, ctypes.POINTER(bpf_insn))))


def _compile(expr: str, iface: str, drop_outgoing: bool) -> list[tuple[int, int, int, int]]:
    """A tcpdump-style expression compiled by libpcap (through scapy)."""
    from scapy.arch.common import compile_filter, free_filter
    from scapy.error import Scapy_Exception

    try:
        prog = compile_filter(expr, iface)
    except ImportError:
        raise InputError("a --bpf expression is compiled by libpcap, which is not installed "
                         "(install libpcap, e.g. apt install libpcap0.8; without --bpf the built-in SMTP-port "
                         "filter needs nothing)") from None
    except (Scapy_Exception, OSError) as e:
        raise InputError(f"BPF expression {expr!r} does not compile: {e}") from None
    code = [(prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf, prog.bf_insns[i].k)
            for i in range(prog.bf_len)]
    free_filter(prog)  # libpcap's copy; the instructions are ours now
    if drop_outgoing:
        # ld pkttype; jeq OUTGOING -> ret 0; then the compiled program, whose jumps are relative
        code = [(_LD_W_ABS, 0, 0, _SKF_AD_PKTTYPE), (_JEQ_K, 0, 1, _PACKET_OUTGOING), (_RET_K, 0, 0, 0)] + code
    return code


# ------------------------------------------------------------------ the socket


def _interfaces() -> str:
    try:
        return ", ".join(name for _, name in socket.if_nameindex())
    except OSError:
        return "unknown"


def open_capture(iface: str, promisc: bool = True) -> Any:
    """scapy's listening packet socket on ``iface``, or :class:`InputError` with what to do."""
    if not sys.platform.startswith("linux"):
        raise InputError(f"live capture needs Linux packet sockets; on {sys.platform} capture to a file "
                         "(tcpdump -w) and run `smtpguard collect pcap FILE`")
    try:
        socket.if_nametoindex(iface)
    except OSError:
        raise InputError(f"capture interface {iface!r} does not exist; interfaces here: {_interfaces()}") from None
    from scapy.arch.linux import L2ListenSocket

    try:
        return L2ListenSocket(iface=iface, promisc=promisc)
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno in (errno.EPERM, errno.EACCES):
            exe = os.path.realpath(sys.executable)
            raise InputError(f"capturing on {iface} needs root or CAP_NET_RAW: run as root, or grant the capability "
                             f"once with `sudo setcap cap_net_raw,cap_net_admin+eip {exe}`") from None
        raise InputError(f"cannot capture on {iface}: {e}") from None


def _kernel_drops(sock: socket.socket) -> int:
    try:
        _, drops = struct.unpack("=II", sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
    except OSError:
        return 0
    return drops


def live_capture(iface: str, smtp_ports: Sequence[int] | None, on_batch: Callable[[Batch], None],
                 stop_event: threading.Event, bpf: str | None = None, *,
                 parser: SmtpCaptureParser | None = None, promisc: bool = True,
                 flush_interval_s: float = FLUSH_INTERVAL_S, on_ready: Callable[[], None] | None = None) -> LiveStats:
    """Capture on ``iface`` until ``stop_event`` is set; hand finished connections to
    ``on_batch`` every ``flush_interval_s`` and the connections still open in a last
    batch at the end. ``on_ready`` is called once the filter is in place: packets from
    then on are seen. ``parser`` (default: a new one with ``smtp_ports``) keeps the
    connection state and its counters.

    Raises :class:`~smtpguard.core.errors.InputError` when the interface does not exist, the
    process may not capture (needs root or CAP_NET_RAW), or ``bpf`` does not compile.
    """
    ports = _check_ports(smtp_ports)
    if not flush_interval_s > 0:
        raise ConfigError(f"live_capture flush_interval_s must be positive, got {flush_interval_s!r}")
    sock = open_capture(iface, promisc)
    stats = LiveStats()
    try:
        hatype = sock.ins.getsockname()[3]
        linktype = _ARPHRD_LINKTYPE.get(hatype)
        if linktype is None:
            raise InputError(f"capturing on {iface}: its link type (ARPHRD {hatype}) is not supported; "
                             "capture on an Ethernet, loopback or IP tunnel interface")
        loopback = hatype == _ARPHRD_LOOPBACK
        program = (_compile(bpf, iface, loopback) if bpf
                   else smtp_filter(ports, 14 if linktype == 1 else 0, loopback))
        _attach(sock.ins, program)
        try:
            sock.ins.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        except OSError as e:
            log.warning("could not enlarge the capture buffer on %s: %s", iface, e)
        sock.ins.setblocking(False)
        while True:  # frames queued before the filter was attached
            try:
                sock.ins.recv(SNAPLEN_BYTES)
            except BlockingIOError:
                break
        _kernel_drops(sock.ins)  # reading the statistics resets them
        if parser is None:
            parser = SmtpCaptureParser(iface, smtp_ports)
        if on_ready is not None:
            on_ready()
        log.info("capturing SMTP connections on %s", iface)

        def deliver(batch: Batch) -> None:
            if batch.read or batch.records.num_rows or batch.rejects:
                stats.batches += 1
                on_batch(batch)

        feed = parser.feed
        fd = sock.ins

        def read(limit: int) -> None:
            for _ in range(limit):
                try:
                    _cls, frame, ts = sock.recv_raw(SNAPLEN_BYTES)
                except BlockingIOError:
                    return
                if frame:
                    stats.packets += 1
                    feed(stats.packets, int((ts if ts else time.time()) * 1000), frame, linktype)

        next_flush = time.monotonic() + flush_interval_s
        failure: OSError | None = None
        try:
            while not stop_event.is_set():
                ready, _, _ = select.select([fd], [], [], _POLL_S)
                if ready:
                    read(READ_BURST)
                now = time.monotonic()
                if now >= next_flush:
                    next_flush = now + flush_interval_s
                    stats.kernel_drops += _kernel_drops(fd)
                    parser.expire(int(time.time() * 1000))
                    deliver(parser.take())
            # what the kernel captured before the stop still counts
            read(DRAIN_FRAMES)
        except OSError as e:  # the interface went away or down: keep what was seen
            failure = e
        stats.kernel_drops += _kernel_drops(fd)
        deliver(parser.close())
    finally:
        sock.close()
    if stats.kernel_drops:
        log.warning("the kernel dropped %d frames on %s (socket buffer full)", stats.kernel_drops, iface)
    if failure is not None:
        raise SmtpguardError(f"capturing on {iface} stopped: {failure}")
    return stats
