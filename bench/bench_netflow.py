"""NetFlow v5 / v9 / IPFIX decoding speed: records per second on one core.

Builds a synthetic stream of full-size export datagrams from many exporters (IPFIX and
v9 with a Cisco-like IPv4 template, v5), 10 % of the flows towards port 25, and feeds
it to :class:`~smtpguard.ingest.netflow.NetflowDecoder` in batches of datagrams, the way
the pcap/dat shells and the UDP listener do. Prints records/s per case, peak memory and
the machine.

    .venv/bin/python bench/bench_netflow.py [--records 2000000]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import socket
import struct
import sys
import time

import numpy as np

from smtpguard.ingest.netflow import (BATCH_DATAGRAMS, Datagram, NetflowDatParser, NetflowDecoder,
                                      NetflowPcapParser)

#: srcaddr dstaddr srcport dstport proto tcpflags tos packets bytes ingressIf egressIf
#: nexthop srcAS dstAS first last (sysUpTime) forwardingStatus
TEMPLATE = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (5, 1), (2, 4), (1, 8), (10, 4), (14, 4),
            (15, 4), (16, 4), (17, 4), (22, 4), (21, 4), (89, 1)]
REC_LEN = sum(n for _, n in TEMPLATE)
RECORD_DTYPE = np.dtype([(f"f{i}", f">u{n}") for i, (_, n) in enumerate(TEMPLATE)])
PER_DATAGRAM = (1400 - 20 - 4) // REC_LEN
EXPORTERS = 64


def records(n: int, rng: np.random.Generator) -> bytes:
    """``n`` flow records in the template's layout: random clients and servers, 10 %
    towards port 25, half of those answered (the server's reverse flow follows)."""
    r = np.zeros(n, RECORD_DTYPE)
    r["f0"] = rng.integers(0x0A000000, 0x0AFFFFFF, n)
    r["f1"] = rng.integers(0x01000000, 0xDF000000, n)
    r["f2"] = rng.integers(1024, 65535, n)
    r["f3"] = rng.choice([443, 80, 53, 25], n, p=[0.6, 0.2, 0.1, 0.1])
    r["f4"] = 6
    r["f5"] = 0x1B
    r["f7"] = rng.integers(1, 100, n)
    r["f8"] = r["f7"].astype(np.uint64) * rng.integers(40, 1500, n).astype(np.uint64)
    r["f9"] = rng.integers(1, 64, n)
    r["f14"] = 1_000_000
    r["f15"] = 1_005_000
    r["f16"] = 0x40
    answered = np.flatnonzero(r["f3"] == 25)[::2]
    answered = answered[answered + 1 < n]
    nxt = answered + 1
    for a, b in (("f0", "f1"), ("f1", "f0"), ("f2", "f3"), ("f3", "f2")):
        r[a][nxt] = r[b][answered]
    return r.tobytes()


def ipfix_stream(n_records: int, rng: np.random.Generator) -> list[Datagram]:
    tpl = struct.pack(">HH", 256, len(TEMPLATE)) + b"".join(struct.pack(">HH", ie, n) for ie, n in TEMPLATE)
    tpl_set = struct.pack(">HH", 2, len(tpl) + 4) + tpl
    body = records(n_records, rng)
    out = []
    for e in range(EXPORTERS):
        msg = tpl_set
        out.append(Datagram(struct.pack(">HHIII", 10, 16 + len(msg), 1_700_000_000, 0, 0) + msg,
                            f"10.255.0.{e}:4739", 1_700_000_000_000))
    step = PER_DATAGRAM * REC_LEN
    for k, i in enumerate(range(0, len(body), step)):
        chunk = body[i:i + step]
        sets = struct.pack(">HH", 256, len(chunk) + 4) + chunk
        out.append(Datagram(struct.pack(">HHIII", 10, 16 + len(sets), 1_700_000_000, k, 0) + sets,
                            f"10.255.0.{k % EXPORTERS}:4739", 1_700_000_000_000 + k // 100))
    return out


def v9_stream(n_records: int, rng: np.random.Generator) -> list[Datagram]:
    tpl = struct.pack(">HH", 256, len(TEMPLATE)) + b"".join(struct.pack(">HH", ie, n) for ie, n in TEMPLATE)
    tpl_set = struct.pack(">HH", 0, len(tpl) + 4) + tpl
    body = records(n_records, rng)
    out = [Datagram(struct.pack(">HHIIII", 9, 1, 2_000_000, 1_700_000_000, 0, 0) + tpl_set, f"10.254.0.{e}:2055",
                    1_700_000_000_000) for e in range(EXPORTERS)]
    step = PER_DATAGRAM * REC_LEN
    for k, i in enumerate(range(0, len(body), step)):
        chunk = body[i:i + step]
        pad = b"\0" * (-len(chunk) % 4)
        fs = struct.pack(">HH", 256, len(chunk) + len(pad) + 4) + chunk + pad
        out.append(Datagram(struct.pack(">HHIIII", 9, len(chunk) // REC_LEN, 2_000_000, 1_700_000_000, k, 0) + fs,
                            f"10.254.0.{k % EXPORTERS}:2055", 1_700_000_000_000 + k // 100))
    return out


def v5_stream(n_records: int, rng: np.random.Generator) -> list[Datagram]:
    n = n_records
    r = np.zeros(n, np.dtype([("src", ">u4"), ("dst", ">u4"), ("nh", ">u4"), ("in", ">u2"), ("out", ">u2"),
                              ("pkts", ">u4"), ("bytes", ">u4"), ("first", ">u4"), ("last", ">u4"),
                              ("sport", ">u2"), ("dport", ">u2"), ("pad", "u1"), ("flags", "u1"), ("proto", "u1"),
                              ("tos", "u1"), ("sas", ">u2"), ("das", ">u2"), ("sm", "u1"), ("dm", "u1"),
                              ("pad2", ">u2")]))
    r["src"] = rng.integers(0x0A000000, 0x0AFFFFFF, n)
    r["dst"] = rng.integers(0x01000000, 0xDF000000, n)
    r["sport"] = rng.integers(1024, 65535, n)
    r["dport"] = rng.choice([443, 80, 53, 25], n, p=[0.6, 0.2, 0.1, 0.1])
    r["proto"] = 6
    r["pkts"] = rng.integers(1, 100, n)
    r["bytes"] = r["pkts"] * 500
    r["first"], r["last"] = 1_000_000, 1_005_000
    body = r.tobytes()
    out = []
    for k, i in enumerate(range(0, n, 30)):
        cnt = min(30, n - i)
        hdr = struct.pack(">HHIIIIBBH", 5, cnt, 2_000_000, 1_700_000_000, 0, k * 30, 0, 0, 0)
        out.append(Datagram(hdr + body[i * 48:(i + cnt) * 48], f"10.253.0.{k % EXPORTERS}:2055",
                            1_700_000_000_000))
    return out


def run(name: str, stream: list[Datagram], smtp_ports, repeat: int) -> float:
    """Decoder alone: datagrams already in memory, in batches as the shells pass them."""
    best_s = float("inf")
    for _ in range(repeat):
        dec = NetflowDecoder(smtp_ports)
        kept = 0
        t0 = time.process_time()
        for i in range(0, len(stream), BATCH_DATAGRAMS):
            b = dec.decode_many(stream[i:i + BATCH_DATAGRAMS])
            kept += b.records.num_rows
        best_s = min(best_s, time.process_time() - t0)
        total = dec.totals().records
    _report(name, "SMTP only" if smtp_ports else "every flow", total, best_s, kept)
    return total / best_s


def run_shell(name: str, parser_cls, blob: bytes, repeat: int) -> float:
    """A whole input shell: framing (pcap or back-to-back packets) plus the decoder."""
    best_s = float("inf")
    for _ in range(repeat):
        parser = parser_cls("bench", (25, 465, 587, 2525))
        kept = 0
        t0 = time.process_time()
        for b in parser.parse_stream(io.BytesIO(blob), "bench"):
            kept += b.records.num_rows
        best_s = min(best_s, time.process_time() - t0)
        total = parser.decoder.totals().records
    _report(name, "SMTP only", total, best_s, kept)
    return total / best_s


def _report(name: str, what: str, total: int, cpu_s: float, kept: int) -> None:
    print(f"{name:12} {what:10}: {total:>10,} records in {cpu_s:6.2f} CPU s = {total / cpu_s:>12,.0f} records/s "
          f"({kept:,} kept)")


def pcap_of(stream: list[Datagram]) -> bytes:
    """The datagrams as a classic pcap: Ethernet, IPv4, UDP from each exporter."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i, d in enumerate(stream):
        host, port = d.exporter.rsplit(":", 1)
        udp = struct.pack(">HHHH", int(port), 2055, 8 + len(d.payload), 0) + d.payload
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(host),
                         socket.inet_aton("192.0.2.1"))
        frame = b"\x02" * 12 + b"\x08\x00" + ip + udp
        out.append(struct.pack("<IIII", 1_700_000_000 + i // 1000, 0, len(frame), len(frame)) + frame)
    return b"".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, numpy {np.__version__}")
    streams = {"ipfix": ipfix_stream(args.records, rng), "v9": v9_stream(args.records, rng),
               "v5": v5_stream(args.records, rng)}
    print(f"{PER_DATAGRAM} records of {REC_LEN} bytes per v9/IPFIX datagram, 30 per v5 datagram, "
          f"{EXPORTERS} exporters, {BATCH_DATAGRAMS} datagrams per decode call")
    # the dat shell takes every packet as coming from one exporter
    one = [d._replace(exporter="x:1") for d in streams["ipfix"]]
    blobs = {"dat": b"".join(d.payload for d in one), "pcap": pcap_of(streams["v9"])}
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"max RSS with the synthetic inputs built: {built / 1024:,.0f} MiB")
    for name, stream in streams.items():
        for ports in ((25, 465, 587, 2525), None):
            run(name, stream, ports, args.repeat)
    run_shell("ipfix (dat)", NetflowDatParser, blobs["dat"], args.repeat)
    run_shell("v9 (pcap)", NetflowPcapParser, blobs["pcap"], args.repeat)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"max RSS at the end: {peak / 1024:,.0f} MiB (decoding added {max(0, peak - built) / 1024:,.0f} MiB)")


if __name__ == "__main__":
    main()
