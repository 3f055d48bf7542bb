"""The live UDP collector shell: a socket feeding a
:class:`~smtpguard.ingest.netflow.NetflowDecoder` (NetFlow/IPFIX) or a
:class:`~smtpguard.ingest.sflow.SflowDecoder` (sFlow v5).

Datagrams are collected into batches (up to ``max_datagrams``, or ``max_wait_ms`` after
the first datagram of the batch, whichever comes first) because the decoder is much
faster on many datagrams at once; each batch's result goes to ``on_batch``. The exporter
of a datagram is its sender's ``ip:port``, its receive time the wall clock.

Example (what ``smtpguard collect netflow --listen 0.0.0.0:2055`` runs)::

    stop = threading.Event()
    dec = NetflowDecoder(cfg.ingest.smtp_ports)
    listen_udp("0.0.0.0", 2055, dec, collector.send, stop)
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .base import Batch
from .base import Datagram
from .netflow import NetflowDecoder

if TYPE_CHECKING:
    from .sflow import SflowDecoder

log = logging.getLogger(__name__)

#: Datagrams per batch handed to the decoder.
MAX_DATAGRAMS = 500
#: Longest a datagram waits in a batch before it is decoded.
MAX_WAIT_MS = 200
#: Kernel receive buffer asked for: bursts from many exporters must not overflow it
#: while a batch is being decoded (the kernel may grant less, see ``net.core.rmem_max``).
RCVBUF_BYTES = 8 << 20
#: How often the loop looks at ``stop_event`` when no datagram comes.
_POLL_S = 0.05


@dataclass
class ListenStats:
    datagrams: int = 0
    batches: int = 0
    bytes: int = 0


def _exporter(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_udp(host: str, port: int, decoder: "NetflowDecoder | SflowDecoder", on_batch: Callable[[Batch], None],
               stop_event: threading.Event, *, max_datagrams: int = MAX_DATAGRAMS, max_wait_ms: int = MAX_WAIT_MS,
               on_ready: Callable[[tuple], None] | None = None) -> ListenStats:
    """Receive datagrams on ``host:port`` until ``stop_event`` is set; decode them in
    batches and pass every batch to ``on_batch``. ``port`` 0 picks a free port;
    ``on_ready`` is called with the bound address once the socket listens. On stop, the
    datagrams received so far are decoded, and data still waiting for templates is given
    up (template misses) in a last batch."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    stats = ListenStats()
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        except OSError as e:
            log.warning("could not enlarge the UDP receive buffer: %s", e)
        sock.bind((host, port))
        sock.settimeout(_POLL_S)
        if on_ready is not None:
            on_ready(sock.getsockname())
        log.info("listening for %s on %s", "sFlow" if getattr(decoder, "name", "") == "sflow" else "NetFlow/IPFIX",
                 _exporter(sock.getsockname()))
        todo: list[Datagram] = []
        first_at = 0.0
        last_expiry = time.monotonic()

        def deliver() -> None:
            nonlocal todo
            batch = decoder.decode_many(todo)
            stats.batches += 1
            todo = []
            on_batch(batch)

        while not stop_event.is_set():
            try:
                payload, addr = sock.recvfrom(65535)
            except socket.timeout:
                payload = None
            except OSError as e:  # e.g. ICMP port unreachable reported on some systems
                log.debug("recvfrom: %s", e)
                payload = None
            now = time.monotonic()
            if payload is not None:
                if not todo:
                    first_at = now
                todo.append(Datagram(payload, _exporter(addr), int(time.time() * 1000)))
                stats.datagrams += 1
                stats.bytes += len(payload)
            if todo and (len(todo) >= max_datagrams or (now - first_at) * 1000 >= max_wait_ms):
                deliver()
            elif not todo and decoder.pending_sets and now - last_expiry >= 1.0:
                # no traffic: data waiting for templates must still time out
                last_expiry = now
                dropped = decoder.expire(int(time.time() * 1000))
                if dropped.read:
                    stats.batches += 1
                    on_batch(dropped)
        if todo:
            deliver()
        last = decoder.flush()
        if last.read:
            stats.batches += 1
            on_batch(last)
    finally:
        sock.close()
    return stats
