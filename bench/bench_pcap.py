"""Packet capture → SMTP connection records: packets per second on one core.

Synthesises a pcap of many short SMTP sessions (handshake, greeting, EHLO with a
multi-line answer, MAIL, RCPT, DATA with a small message, QUIT, FIN both ways: 19
packets each), ``--concurrent`` of them interleaved so the connection table holds that
many at a time, plus 20 % other TCP traffic (port 443) that is skipped. The file is
written once under ``.bench/`` and read back with
:class:`~smtpguard.ingest.pcap_smtp.SmtpCaptureParser`, the way ``smtpguard collect pcap``
reads it. Prints packets/s and records/s (wall and CPU), peak memory, the memory an open
connection takes, scapy's own dissection speed for comparison, and the machine.

    .venv/bin/python bench/bench_pcap.py [--sessions 200000] [--concurrent 2000]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, cpu_seconds, machine, peak_rss_mb  # noqa: E402

from smtpguard.ingest.pcap_smtp import SmtpCaptureParser  # noqa: E402

_ETH = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_REC = struct.Struct("<IIII")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

#: (from client?, flags, payload) of one session; payloads get the session number
SESSION = [
    (True, SYN, b""),
    (False, SYN | ACK, b""),
    (True, ACK, b""),
    (False, PSH | ACK, b"220 mx.example.net ESMTP ready\r\n"),
    (True, PSH | ACK, b"EHLO host-%d.client.example\r\n"),
    (False, PSH | ACK, b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"),
    (True, PSH | ACK, b"MAIL FROM:<news@sender-%d.example>\r\n"),
    (False, PSH | ACK, b"250 2.1.0 Ok\r\n"),
    (True, PSH | ACK, b"RCPT TO:<someone@example.org>\r\n"),
    (False, PSH | ACK, b"250 2.1.5 Ok\r\n"),
    (True, PSH | ACK, b"DATA\r\n"),
    (False, PSH | ACK, b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    (True, PSH | ACK, b"Subject: offer %d\r\nFrom: news@sender.example\r\n\r\nBuy now.\r\n.\r\n"),
    (False, PSH | ACK, b"250 2.0.0 Ok: queued as 4F2A1C\r\n"),
    (True, PSH | ACK, b"QUIT\r\n"),
    (False, PSH | ACK, b"221 2.0.0 Bye\r\n"),
    (True, FIN | ACK, b""),
    (False, FIN | ACK, b""),
    (True, ACK, b""),
]
OTHER_SHARE = 0.2
#: Capture time of one round (one packet of every running session): sessions last about
#: a second, as real ones do, so closed connections linger and the table holds what a
#: sensor's would.
ROUND_MS = 50


def frame(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    ip = _IP.pack(0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0, src, dst)
    tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535, 0, 0)
    return _ETH + ip + tcp + payload


class _Session:
    __slots__ = ("n", "step", "cip", "sip", "cport", "cseq", "sseq")

    def __init__(self, n: int):
        self.n = n
        self.step = 0
        self.cip = struct.pack("!I", 0x0A000000 + n % 50_000)
        self.sip = struct.pack("!I", 0xC6336400 + n % 250)
        self.cport = 10_000 + n % 50_000  # clear of the SMTP ports, so the other traffic stays other
        self.cseq = n * 7919
        self.sseq = n * 104729

    def next_frame(self) -> bytes:
        from_client, flags, payload = SESSION[self.step]
        self.step += 1
        if b"%d" in payload:
            payload = payload % self.n
        if from_client:
            f = frame(self.cip, self.sip, self.cport, 25, self.cseq, self.sseq, flags, payload)
            self.cseq += len(payload) + (1 if flags & (SYN | FIN) else 0)
        else:
            f = frame(self.sip, self.cip, 25, self.cport, self.sseq, self.cseq, flags, payload)
            self.sseq += len(payload) + (1 if flags & (SYN | FIN) else 0)
        return f

    @property
    def done(self) -> bool:
        return self.step == len(SESSION)


def write_capture(path: Path, sessions: int, concurrent: int) -> int:
    """Write the capture; returns the number of packets. Sessions start in turn and run
    interleaved, one packet each per round of ``ROUND_MS``."""
    packets = 0
    other_every = int(1 / OTHER_SHARE)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        active: list[_Session] = []
        started = 0
        ts_us = 1_700_000_000_000_000
        while started < sessions or active:
            while len(active) < concurrent and started < sessions:
                active.append(_Session(started))
                started += 1
            out = []
            for s in active:
                out.append(s.next_frame())
                packets += 1
                if packets % other_every == 0:
                    out.append(frame(s.cip, b"\x5d\xb8\xd8\x22", s.cport + 1, 443, packets, 0, ACK, b"x" * 100))
                    packets += 1
            step_us = max(1, ROUND_MS * 1000 // len(out))
            for f in out:
                ts_us += step_us
                fh.write(_REC.pack(ts_us // 1_000_000, ts_us % 1_000_000, len(f), len(f)))
                fh.write(f)
            active = [s for s in active if not s.done]
    return packets


def bench_file(path: Path) -> tuple[int, int, float, float, SmtpCaptureParser]:
    parser = SmtpCaptureParser(str(path), [25, 465, 587, 2525])
    rows = read = 0
    c0, t0 = cpu_seconds(), time.perf_counter()
    with open(path, "rb") as fh:
        for batch in parser.parse_stream(fh, path.name):
            rows += batch.records.num_rows
            read += batch.read
    last = parser.close()
    rows += last.records.num_rows
    read += last.read
    return rows, read, time.perf_counter() - t0, cpu_seconds() - c0, parser


def bytes_per_connection(n: int = 20_000) -> float:
    """Memory of ``n`` connections left open mid-dialogue (after EHLO), per connection."""
    parser = SmtpCaptureParser("mem", [25], max_connections=n + 1)
    sessions = [_Session(i) for i in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, s in enumerate(sessions):
        for _ in range(5):  # SYN, SYN-ACK, ACK, greeting, EHLO
            parser.feed(i, 1_700_000_000_000, s.next_frame(), 1)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert parser.open_connections == n
    return used / n


def scapy_dissection_rate(frames: int = 20_000) -> float:
    from scapy.layers.l2 import Ether

    s = [_Session(i) for i in range(frames // len(SESSION) + 1)]
    data = [x.next_frame() for x in s for _ in range(len(SESSION))][:frames]
    t0 = time.perf_counter()
    for f in data:
        Ether(f)
    return len(data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=200_000)
    ap.add_argument("--concurrent", type=int, default=2_000)
    args = ap.parse_args()
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"smtp-{args.sessions}-{args.concurrent}.pcap"
    if not path.exists():
        t0 = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        write_capture(tmp, args.sessions, args.concurrent)
        tmp.rename(path)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"machine: {machine()}")
    print(f"capture: {path.name}, {path.stat().st_size / 1e6:,.0f} MB, {args.sessions:,} SMTP sessions "
          f"({len(SESSION)} packets each), {args.concurrent:,} at a time, {OTHER_SHARE:.0%} other TCP packets")
    rows, read, wall, cpu, parser = bench_file(path)
    c = parser.counters
    assert c.malformed == 0 and read == c.packets, c
    print(f"connections emitted early: {c.evicted:,} at the {parser.max_connections:,}-connection bound, "
          f"{c.idle_timeouts:,} idle; {c.stray:,} stray packets")
    print(f"pcap file -> records: {c.packets:,} packets, {rows:,} records in {wall:.2f} s wall / {cpu:.2f} s CPU: "
          f"{c.packets / wall:,.0f} packets/s wall, {c.packets / cpu:,.0f} packets/s per CPU-second, "
          f"{rows / cpu:,.0f} records/s per CPU-second")
    print(f"peak RSS: {peak_rss_mb():,.0f} MB")
    print(f"memory per open connection (mid-dialogue): {bytes_per_connection():,.0f} bytes")
    print(f"for comparison, scapy dissecting the same frames (Ether(frame)): {scapy_dissection_rate():,.0f} packets/s")


if __name__ == "__main__":
    main()
