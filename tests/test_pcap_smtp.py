"""Packet captures → SMTP connection records: Zeek's SMTP traces against Zeek's own logs
and an independent reading of the same traces with scapy; handshake outcomes, TCP
reassembly, dialogue parsing and the bounds on crafted captures built with scapy; the
kernel filter program; a real capture on the loopback interface against a real SMTP
server; and property tests that no input makes the parser raise."""

from __future__ import annotations

import ctypes.util
import gzip
import io
import re
import smtplib
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, rdpcap

from smtpguard.core import record
from smtpguard.core.errors import ConfigError, InputError
from smtpguard.ingest import registry
from smtpguard.ingest.base import Batch, concat
from smtpguard.ingest.pcap_live import MAX_FILTER_PORTS, live_capture, smtp_filter
from smtpguard.ingest.pcap_smtp import SmtpCaptureParser, SmtpDialogue, mail_from_domain, sniff
from smtpguard.ingest.reader import Opened, Source

ZEEK = Path(__file__).resolve().parents[2] / "shared" / "data" / "smtp" / "zeek"
TRACES = ZEEK / "Traces"
BASELINE = ZEEK / "Baseline"
T0 = 1_700_000_000.0


def eth(**kw) -> Ether:
    """An Ethernet header with addresses given: left out, scapy resolves them by sending ARP requests."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **kw)


# ------------------------------------------------------------------ helpers


def check(b: Batch) -> Batch:
    """Every batch: the record schema, every packet accounted for once, and a reason
    and a place for every dead letter."""
    assert b.records.schema == record.SCHEMA
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects)
    for r in b.rejects:
        assert r.reason and not r.reason.startswith("internal error"), r.reason
        assert r.location and r.format == "pcap"
    return b


def parse(data: bytes, ports=(25,), name: str = "test.pcap", **kw) -> tuple[Batch, SmtpCaptureParser]:
    parser = SmtpCaptureParser(name, ports, **kw)
    batches = [check(b) for b in parser.parse_stream(io.BytesIO(data), name)]
    batches.append(check(parser.close()))
    return concat(batches), parser


def rows(b: Batch) -> list[dict]:
    return b.records.to_pylist()


def pcap(frames: list[tuple[float, bytes]], linktype: int = 1, snaplen: int | None = None) -> bytes:
    """A classic pcap file (microseconds, little-endian) of (time, frame) pairs."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen or 262144, linktype)]
    for ts, frame in frames:
        us = round(ts * 1e6)
        kept = frame[:snaplen] if snaplen else frame
        out.append(struct.pack("<IIII", us // 1_000_000, us % 1_000_000, len(kept), len(frame)) + kept)
    return b"".join(out)


class Conv:
    """The frames of one TCP connection, built with scapy; sequence numbers follow the
    bytes each side sent. ``c``/``s`` send from the client/server; ``at`` sends a
    segment at an offset from the side's current sequence number without advancing it
    (for reordering, retransmission and loss)."""

    def __init__(self, client: str = "10.0.0.1", cport: int = 40000, server: str = "192.0.2.25", sport: int = 25,
                 *, t0: float = T0, vlan: int | None = None, link: str = "ether"):
        self.client, self.cport, self.server, self.sport = client, cport, server, sport
        self.v6 = ":" in client
        self.vlan = vlan
        self.link = link
        self.cseq, self.sseq = 1000, 900000
        self.t = t0
        self.frames: list[tuple[float, bytes]] = []

    def frame(self, from_client: bool, flags: str, payload: bytes = b"", seq: int | None = None) -> bytes:
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        sp, dp = (self.cport, self.sport) if from_client else (self.sport, self.cport)
        if seq is None:
            seq = self.cseq if from_client else self.sseq
        ack = (self.sseq if from_client else self.cseq) if "A" in flags else 0
        ip = IPv6(src=src, dst=dst) if self.v6 else IP(src=src, dst=dst)
        pkt = ip / TCP(sport=sp, dport=dp, flags=flags, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF)
        if payload:
            pkt = pkt / Raw(payload)
        if self.link == "raw":
            return bytes(pkt)
        if self.link == "cooked":
            return bytes(CookedLinux(proto=0x86DD if self.v6 else 0x0800) / pkt)
        if self.vlan is not None:
            return bytes(eth() / Dot1Q(vlan=self.vlan) / pkt)
        return bytes(eth() / pkt)

    def send(self, from_client: bool, flags: str, payload: bytes = b"", dt: float = 0.01) -> "Conv":
        self.t += dt
        self.frames.append((self.t, self.frame(from_client, flags, payload)))
        n = len(payload) + (1 if "S" in flags or "F" in flags else 0)
        if from_client:
            self.cseq += n
        else:
            self.sseq += n
        return self

    def at(self, from_client: bool, offset: int, payload: bytes, flags: str = "PA", dt: float = 0.01) -> "Conv":
        base = self.cseq if from_client else self.sseq
        self.t += dt
        self.frames.append((self.t, self.frame(from_client, flags, payload, seq=base + offset)))
        return self

    def c(self, payload: bytes, flags: str = "PA") -> "Conv":
        return self.send(True, flags, payload)

    def s(self, payload: bytes, flags: str = "PA") -> "Conv":
        return self.send(False, flags, payload)

    def handshake(self) -> "Conv":
        return self.send(True, "S").send(False, "SA").send(True, "A")

    def close(self) -> "Conv":
        return self.send(True, "FA").send(False, "FA").send(True, "A")

    def dialogue(self, pairs: list[tuple[bytes, bytes]]) -> "Conv":
        for cmd, reply in pairs:
            if cmd:
                self.c(cmd)
            if reply:
                self.s(reply)
        return self


def one(data: bytes, **kw) -> dict:
    b, _ = parse(data, **kw)
    assert b.records.num_rows == 1, rows(b)
    return rows(b)[0]


SESSION = [
    (b"", b"220 mx.example.net ESMTP\r\n"),
    (b"EHLO Client.Example\r\n", b"250-mx.example.net\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
    (b"MAIL FROM:<Bob@Sender.Example> SIZE=120\r\n", b"250 2.1.0 Ok\r\n"),
    (b"RCPT TO:<a@example.org>\r\n", b"250 2.1.5 Ok\r\n"),
    (b"RCPT TO:<b@example.org>\r\n", b"450 4.2.1 try later\r\n"),
    (b"RCPT TO:<c@example.org>\r\n", b"550 5.1.1 no such user\r\n"),
    (b"DATA\r\n", b"354 go ahead\r\n"),
    (b"Subject: x\r\n\r\nRCPT TO:<not-a-command@example.org>\r\n..leading dot\r\n.\r\n", b"250 2.0.0 queued\r\n"),
    (b"QUIT\r\n", b"221 2.0.0 Bye\r\n"),
]


# ------------------------------------------------------------------ scapy's view of the Zeek traces


def _packets(path: Path):
    if path.suffix == ".gz":
        with gzip.open(path) as fh:
            return rdpcap(fh)
    return rdpcap(str(path))


def scapy_view(path: Path, port: int = 25) -> dict:
    """Per connection to ``port``, read with scapy: packets and IP bytes each way, the
    TCP flags each side sent, and each side's payload put together by sequence number
    (a retransmitted segment counted once)."""
    conns: dict = {}
    for p in _packets(path):
        if TCP not in p or IP not in p:
            continue
        ip, t = p[IP], p[TCP]
        if t.dport == port:
            key, side = (ip.src, t.sport, ip.dst), "c"
        elif t.sport == port:
            key, side = (ip.dst, t.dport, ip.src), "s"
        else:
            continue
        v = conns.setdefault(key, {"c_pkts": 0, "c_bytes": 0, "s_pkts": 0, "s_bytes": 0, "c_flags": 0,
                                   "s_flags": 0, "c_seg": {}, "s_seg": {}})
        v[side + "_pkts"] += 1
        v[side + "_bytes"] += ip.len
        v[side + "_flags"] |= int(t.flags)
        payload = bytes(t)[t.dataofs * 4:ip.len - ip.ihl * 4]
        if payload and len(payload) > len(v[side + "_seg"].get(t.seq, b"")):
            v[side + "_seg"][t.seq] = payload
    for v in conns.values():
        for side in "cs":
            segs = v.pop(side + "_seg")
            v[side + "_stream"] = b"".join(segs[k] for k in sorted(segs))
    return conns


def reply_codes(server_stream: bytes) -> list[int]:
    """Codes of the last lines of replies (``ddd text``), one per reply."""
    return [int(m) for m in re.findall(rb"(?m)^([1-5]\d\d)(?: |\r?$)", server_stream)]


def zeek_log(path: Path) -> list[dict]:
    fields: list[str] = []
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("#fields"):
            fields = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            out.append(dict(zip(fields, line.split("\t"))))
    return out


def zeek_events(path: Path) -> dict[tuple[str, int], list[dict]]:
    """smtp_request / smtp_reply events of Zeek's dump-events baseline, per client."""
    out: dict[tuple[str, int], list[dict]] = {}
    ev: dict | None = None
    for line in path.read_text().splitlines():
        m = re.match(r"^\d+\.\d+ (smtp_request|smtp_reply)$", line)
        if m:
            ev = {"event": m.group(1)}
            continue
        if ev is None:
            continue
        m = re.match(r"^\s+\[0\] c: connection\s+= \[id=\[orig_h=([^,]+), orig_p=(\d+)/tcp", line)
        if m:
            ev["client"] = (m.group(1), int(m.group(2)))
            out.setdefault(ev["client"], []).append(ev)
            continue
        m = re.match(r"^\s+\[\d\] (\w+): \w+\s+= ?(.*)$", line)
        if m:
            ev[m.group(1)] = m.group(2)
    return out


def expected_from_events(events: list[dict]) -> dict:
    requests = [e for e in events if e["event"] == "smtp_request"]
    finals = [int(e["code"]) for e in events if e["event"] == "smtp_reply" and e["cont_resp"] == "F"]
    helo = next(e["arg"] for e in requests if e["command"] in ("EHLO", "HELO"))
    mail = next(e["arg"] for e in requests if e["command"] == "MAIL")
    return {
        "helo": helo,
        "mail_from_domain": mail.rsplit("@", 1)[1].rstrip(">").lower(),
        "rcpt_count": sum(e["command"] == "RCPT" for e in requests),
        "auth": any(e["command"] == "AUTH" for e in requests),
        "starttls": any(e["command"] == "STARTTLS" for e in requests),
        "reply_first": finals[0],
        "reply_last": finals[-1],
        "replies_4xx": sum(400 <= c < 500 for c in finals),
        "replies_5xx": sum(500 <= c < 600 for c in finals),
    }


def by_client(b: Batch) -> dict[tuple[str, int], dict]:
    return {(r["src_ip"], r["src_port"]): r for r in rows(b)}


def parse_trace(name: str) -> Batch:
    path = TRACES / name
    opener = gzip.open if path.suffix == ".gz" else open
    parser = SmtpCaptureParser(path.name, [25])
    with opener(path, "rb") as fh:
        batches = [check(b) for b in parser.parse_stream(fh, path.name)]
    return concat(batches + [check(parser.close())])


def assert_counts_match_scapy(b: Batch, view: dict) -> None:
    got = by_client(b)
    assert set(got) == {(k[0], k[1]) for k in view}
    for (cip, cport, sip), v in view.items():
        r = got[(cip, cport)]
        assert (r["dst_ip"], r["dst_port"], r["protocol"]) == (sip, 25, 6)
        assert (r["packets"], r["bytes"], r["rev_packets"], r["rev_bytes"]) == \
            (v["c_pkts"], v["c_bytes"], v["s_pkts"], v["s_bytes"])
        assert r["tcp_flags"] == v["c_flags"]


# ------------------------------------------------------------------ golden: Zeek's traces


def test_smtp_pcap_matches_zeek_events_and_smtp_log():
    b = parse_trace("smtp.pcap")
    got = by_client(b)
    assert len(got) == 2
    # every command and reply Zeek saw (dump-events baseline) gives the dialogue fields
    events = zeek_events(BASELINE / "scripts.policy.misc.dump-events" / "smtp-events.log")
    assert set(events) == set(got)
    for client, evs in events.items():
        r = got[client]
        assert {k: r[k] for k in expected_from_events(evs)} == expected_from_events(evs), client
    # the per-transaction smtp.log agrees on helo, sender domain, recipients and TLS
    view = scapy_view(TRACES / "smtp.pcap")
    for row in zeek_log(BASELINE / "scripts.base.protocols.smtp.basic" / "smtp.log"):
        r = got[(row["id.orig_h"], int(row["id.orig_p"]))]
        assert r["helo"] == row["helo"]
        assert r["mail_from_domain"] == row["mailfrom"].rsplit("@", 1)[1].lower()
        assert r["rcpt_count"] == len(row["rcptto"].split(","))
        assert r["starttls"] is (row["tls"] == "T")
        # smtp.log's last_reply is the one ending the message; only QUIT (221) may follow it
        client_stream = view[(row["id.orig_h"], int(row["id.orig_p"]), row["id.resp_h"])]["c_stream"]
        quit_after = client_stream.rstrip().upper().endswith(b"QUIT")
        assert r["reply_last"] == (221 if quit_after else int(row["last_reply"][:3]))
    assert [got[c]["conn_state"] for c in sorted(got)] == ["completed", "completed"]
    assert_counts_match_scapy(b, view)
    assert all(r["exporter"] == "smtp.pcap" and r["source_format"] == "pcap" and r["action"] == "unknown"
               for r in rows(b))


def test_starttls_trace_stops_reading_at_tls():
    b = parse_trace("tls/smtp-starttls.pcap")
    (row,) = zeek_log(BASELINE / "scripts.base.protocols.smtp.starttls" / "smtp.log")
    (r,) = rows(b)
    assert row["tls"] == "T" and r["starttls"] is True
    assert r["reply_last"] == int(row["last_reply"][:3]) == 220
    assert r["helo"] == row["helo"] == "openssl.client.net"
    assert row["mailfrom"] == row["rcptto"] == "-"
    assert (r["mail_from_domain"], r["rcpt_count"], r["auth"]) == ("", 0, False)
    view = scapy_view(TRACES / "tls" / "smtp-starttls.pcap")
    (v,) = view.values()
    # the server's encrypted bytes after 220 are not read as replies
    assert reply_codes(v["s_stream"].split(b"Ready to start TLS")[0] + b"Ready to start TLS") == [220, 250, 220]
    assert (r["reply_first"], r["replies_4xx"], r["replies_5xx"]) == (220, 0, 0)
    # the server answers the client's FIN with RSTs (scapy sees them): reset
    assert v["s_flags"] & 0x04 and not v["c_flags"] & 0x04 and r["conn_state"] == "reset"
    assert_counts_match_scapy(b, view)


def test_invalid_transactions_trace_counts_5xx_replies():
    b = parse_trace("smtp-mail-transactions-invalid.pcap")
    (r,) = rows(b)
    log = zeek_log(BASELINE / "scripts.base.protocols.smtp.mail-transactions-invalid" / "smtp.log")
    assert {x["helo"] for x in log} == {r["helo"]} == {"Bob-PC"}
    assert {x["mailfrom"].rsplit("@", 1)[1] for x in log if x["mailfrom"] != "-"} == {r["mail_from_domain"]}
    # one RCPT per logged recipient: each transaction's rcptto holds the RCPTs it saw
    assert r["rcpt_count"] == sum(len(x["rcptto"].split(",")) for x in log if x["rcptto"] != "-") == 3
    assert "500 unrecognized command" in {x["last_reply"] for x in log}
    (v,) = scapy_view(TRACES / "smtp-mail-transactions-invalid.pcap").values()
    codes = reply_codes(v["s_stream"])
    assert (codes.count(503), codes.count(500)) == (5, 6)  # the README's count of this trace
    assert r["replies_5xx"] == sum(c >= 500 for c in codes) == 11
    assert (r["reply_first"], r["reply_last"], r["replies_4xx"]) == (codes[0], codes[-1], 0) == (220, 221, 0)
    assert r["conn_state"] == "completed"


def test_many_addresses_trace_counts_600_recipients_through_the_reader():
    path = TRACES / "smtp" / "smtp-many-addresses.pcap.gz"
    opened = Opened(Source(str(path), path, path.stat().st_size))  # the reader decompresses .gz
    try:
        assert sniff(opened.head)
        parser = SmtpCaptureParser(path.name, [25])
        b = concat([check(x) for x in parser.parse_stream(opened.binary, path.name)] + [check(parser.close())])
    finally:
        opened.close()
    (r,) = rows(b)
    (v,) = scapy_view(path).values()
    assert r["rcpt_count"] == v["c_stream"].count(b"\r\nRCPT TO:") == 600
    # Zeek caps its log at 500 recipients and says the connection went past it
    assert "rcptto, 500" in (BASELINE / "scripts.base.protocols.smtp.address-limits" / "output").read_text()
    assert "smtp_too_many_rcptto_addresses" in (BASELINE / "scripts.base.protocols.smtp.address-limits" /
                                                "weird.log").read_text()
    assert (r["helo"], r["reply_first"], r["reply_last"]) == ("mxsrp.mz.example", 220, 221)
    assert r["mail_from_domain"] == "kmzcztrw.kkk.com"
    assert b.read == v["c_pkts"] + v["s_pkts"] == 2508


def test_registry_entry_reads_the_traces():
    fmt = registry.Format("pcap", "smtpguard.ingest.pcap_smtp", "SmtpCaptureParser", "doc", "example", kind="stream")
    parser = fmt.make_parser("smtp.pcap", [25])
    with open(TRACES / "smtp.pcap", "rb") as fh:
        b = concat([check(x) for x in parser.parse_stream(fh, "smtp.pcap")] + [check(parser.close())])
    assert b.records.num_rows == 2
    _, sniffer = fmt.load()
    assert sniffer((TRACES / "smtp.pcap").read_bytes()[:4096])


def test_sniff_tells_captures_from_netflow_captures_and_text():
    assert sniff((TRACES / "smtp.pcap").read_bytes()[:65536])
    netflow = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "netflow").rglob("*.pcap"))
    assert netflow and not sniff(netflow[0].read_bytes()[:65536])
    assert not sniff(b"version account-id interface-id srcaddr\n")
    assert not sniff(b"")


# ------------------------------------------------------------------ handshakes, counters, closing


def test_completed_connection_counts_each_way():
    conv = Conv().handshake().dialogue(SESSION).close()
    r = one(pcap(conv.frames))
    c_frames = [f for i, (_, f) in enumerate(conv.frames) if Ether(f)[TCP].dport == 25]
    s_frames = [f for _, f in conv.frames if Ether(f)[TCP].sport == 25]
    assert (r["packets"], r["rev_packets"]) == (len(c_frames), len(s_frames))
    assert r["bytes"] == sum(Ether(f)[IP].len for f in c_frames)
    assert r["rev_bytes"] == sum(Ether(f)[IP].len for f in s_frames)
    assert r["tcp_flags"] == 0x02 | 0x10 | 0x08 | 0x01  # the client's SYN, ACK, PSH, FIN
    assert r["conn_state"] == "completed"
    assert (r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"]) == ("10.0.0.1", 40000, "192.0.2.25", 25)
    assert r["start"].timestamp() == pytest.approx(conv.frames[0][0], abs=0.001)
    assert r["end"].timestamp() == pytest.approx(conv.frames[-1][0], abs=0.001)


def test_dialogue_fields():
    r = one(pcap(Conv().handshake().dialogue(SESSION).close().frames))
    assert (r["helo"], r["mail_from_domain"], r["rcpt_count"]) == ("Client.Example", "sender.example", 3)
    assert (r["reply_first"], r["reply_last"], r["replies_4xx"], r["replies_5xx"]) == (220, 221, 1, 1)
    assert (r["starttls"], r["auth"]) == (False, False)


@pytest.mark.parametrize("build, state", [
    (lambda c: c.send(True, "S").send(False, "RA"), "refused"),
    (lambda c: c.send(True, "S").send(True, "S", dt=1).send(True, "S", dt=2), "unanswered"),
    (lambda c: c.handshake().dialogue(SESSION[:2]).send(False, "RA"), "reset"),
    (lambda c: c.handshake().dialogue(SESSION[:2]).send(True, "RA"), "reset"),
    (lambda c: c.send(True, "S").send(False, "SA").send(True, "R"), "reset"),  # a SYN scan of an open port
    (lambda c: c.dialogue(SESSION[2:4]), ""),  # picked up mid-way
    (lambda c: c.send(True, "S").send(False, "SA"), ""),  # the client never acknowledged
])
def test_handshake_outcomes(build, state):
    assert one(pcap(build(Conv()).frames))["conn_state"] == state


def test_client_only_capture():
    conv = Conv().handshake().dialogue(SESSION).close()
    client_side = [(t, f) for t, f in conv.frames if Ether(f)[TCP].dport == 25]
    r = one(pcap(client_side))
    assert r["rev_packets"] == 0 and r["conn_state"] == ""
    # the message is skipped without the server's 354: its RCPT line is not a command
    assert (r["helo"], r["mail_from_domain"], r["rcpt_count"]) == ("Client.Example", "sender.example", 3)
    assert r["reply_first"] is r["reply_last"] is r["replies_4xx"] is r["replies_5xx"] is None
    unanswered = one(pcap([(T0, Conv().frame(True, "S")), (T0 + 3, Conv().frame(True, "S"))]))
    assert unanswered["conn_state"] == "unanswered" and unanswered["rcpt_count"] is None


def test_server_only_capture_orients_by_port():
    conv = Conv().handshake().dialogue(SESSION).close()
    r = one(pcap([(t, f) for t, f in conv.frames if Ether(f)[TCP].sport == 25]))
    assert (r["src_ip"], r["dst_port"], r["packets"]) == ("10.0.0.1", 25, 0)
    assert (r["reply_first"], r["reply_last"], r["replies_5xx"]) == (220, 221, 1)
    assert r["rcpt_count"] is None


def test_trailing_packets_after_close_count_in_the_record_and_reuse_starts_a_new_one():
    conv = Conv().handshake().dialogue(SESSION).close()
    # retransmitted FINs: each within the linger time of the one before, the last
    # one more than the linger time after the close
    conv.send(True, "FA", dt=2.0).send(True, "FA", dt=2.5).send(True, "FA", dt=1.5)
    n_first = len(conv.frames)
    conv.cseq += 5000
    conv.send(True, "S", dt=30).send(False, "SA").send(True, "A").dialogue(SESSION[:2]).close()
    conv.send(True, "A", dt=120)  # long after: belongs to no connection
    b, parser = parse(pcap(conv.frames))
    first, second = rows(b)
    assert first["packets"] + first["rev_packets"] == n_first
    assert second["helo"] == "Client.Example" and second["rcpt_count"] == 0
    assert parser.counters.stray == 1
    assert b.read == len(conv.frames)


def test_idle_connections_are_emitted_before_the_end():
    a = Conv(cport=40001).send(True, "S")
    later = Conv(cport=40002, t0=T0 + 600).handshake()
    b_parser = SmtpCaptureParser("t", [25], batch_packets=1)
    early = [check(b) for b in b_parser.parse_stream(io.BytesIO(pcap(a.frames + later.frames)), "t")]
    early_rows = [r for b in early for r in rows(b)]
    assert [(r["src_port"], r["conn_state"]) for r in early_rows] == [(40001, "unanswered")]
    assert b_parser.counters.idle_timeouts == 1 and b_parser.open_connections == 1
    assert [r["src_port"] for r in rows(check(b_parser.close()))] == [40002]


def test_eviction_bounds_tracked_connections():
    parser = SmtpCaptureParser("t", [25], max_connections=2)
    seen = []
    for i in range(5):
        parser.feed(i + 1, int((T0 + i) * 1000), Conv(cport=41000 + i).frame(True, "S"), 1)
        assert parser.open_connections <= 2
        seen += rows(check(parser.take()))
    seen += rows(check(parser.close()))
    assert parser.counters.evicted == 3
    assert sorted(r["src_port"] for r in seen) == [41000 + i for i in range(5)]


def test_smtp_ports_none_keeps_every_tcp_connection_and_ports_select():
    web = Conv(cport=50000, server="198.51.100.7", sport=443).handshake().c(b"GET / HTTP/1.1\r\n\r\n").close()
    mail = Conv(sport=587).handshake().dialogue(SESSION[:3]).close()
    frames = sorted(web.frames + mail.frames)
    b, parser = parse(pcap(frames), ports=None)
    assert sorted(r["dst_port"] for r in rows(b)) == [443, 587]
    b, parser = parse(pcap(frames), ports=(25, 587))
    assert [r["dst_port"] for r in rows(b)] == [587]
    assert parser.counters.other_ports == len(web.frames)
    assert b.skipped == len(frames) - 1


@pytest.mark.parametrize("conv, linktype", [
    (Conv(client="2001:db8::1", server="2001:db8::25"), 1),
    (Conv(vlan=42), 1),
    (Conv(link="cooked"), 113),
    (Conv(link="raw"), 101),
    (Conv(client="2001:db8::1", server="2001:db8::25", link="raw"), 101),
])
def test_link_types_and_ipv6(conv, linktype):
    r = one(pcap(conv.handshake().dialogue(SESSION).close().frames, linktype))
    assert (r["src_ip"], r["dst_ip"]) == (conv.client, conv.server)
    assert (r["conn_state"], r["rcpt_count"], r["reply_last"]) == ("completed", 3, 221)


def test_pcapng(tmp_path):
    conv = Conv().handshake().dialogue(SESSION).close()
    path = tmp_path / "c.pcapng"
    w = PcapNgWriter(str(path))
    for t, f in conv.frames:
        p = Ether(f)
        p.time = t
        w.write(p)
    w.close()
    r = one(path.read_bytes())
    assert (r["rcpt_count"], r["conn_state"]) == (3, "completed")
    assert r["start"].timestamp() == pytest.approx(conv.frames[0][0], abs=0.001)


def test_files_of_one_session_continue_a_connection():
    conv = Conv().handshake().dialogue(SESSION).close()
    half = len(conv.frames) // 2
    parser = SmtpCaptureParser("a.pcap", [25])
    batches = [check(b) for b in parser.parse_stream(io.BytesIO(pcap(conv.frames[:half])), "a.pcap")]
    batches += [check(b) for b in parser.parse_stream(io.BytesIO(pcap(conv.frames[half:])), "b.pcap")]
    (r,) = rows(concat(batches + [check(parser.close())]))
    assert (r["rcpt_count"], r["reply_last"], r["exporter"]) == (3, 221, "a.pcap")


# ------------------------------------------------------------------ reassembly


def test_out_of_order_and_retransmitted_segments():
    ehlo, mail = b"EHLO x\r\n", b"MAIL FROM:<a@b.example>\r\n"
    conv = Conv().handshake().s(b"220 mx\r\n")
    conv.at(True, len(ehlo), mail)  # arrives before the segment it follows
    conv.at(True, 0, ehlo)
    conv.cseq += len(ehlo) + len(mail)
    conv.at(True, -len(mail), mail)  # retransmitted
    conv.c(b"RCPT TO:<x@y>\r\n").c(b"RCPT TO:<x@y>\r\n")
    b, parser = parse(pcap(conv.frames))
    (r,) = rows(b)
    assert (r["helo"], r["mail_from_domain"], r["rcpt_count"]) == ("x", "b.example", 2)
    assert parser.counters.retransmitted_bytes == len(mail)
    assert parser.counters.gaps == 0


def test_a_hole_the_server_acknowledged_is_stepped_over():
    lost, after = b"RCPT TO:<1@x>\r\n", b"RCPT TO:<2@x>\r\n"
    conv = Conv().handshake().dialogue(SESSION[:3])
    conv.at(True, len(lost), after)  # the capture missed the segment before it
    conv.cseq += len(lost) + len(after)
    conv.s(b"250 ok\r\n250 ok\r\n")  # the server had both: its ACK covers the hole
    conv.c(b"QUIT\r\n").s(b"221 bye\r\n")
    parser = SmtpCaptureParser("t", [25])
    held_after = []
    for i, (t, f) in enumerate(conv.frames):
        parser.feed(i + 1, int(t * 1000), f, 1)
        held_after.append(parser.buffered_bytes)
    n = len(conv.frames)
    # held while the hole is open, given up as soon as the server's ACK shows it was capture loss
    assert held_after[n - 4:] == [len(after), 0, 0, 0]
    assert (parser.counters.gaps, parser.counters.gap_bytes) == (1, len(lost))
    (r,) = rows(check(parser.close()))
    assert r["rcpt_count"] == 1 and r["reply_last"] == 221


def test_held_bytes_are_bounded():
    stream = b"EHLO a\r\n" + b"RCPT TO:<someone@example.org>\r\n" * 200
    conv = Conv().send(True, "S")
    segs = [stream[i:i + 30] for i in range(0, len(stream), 30)]
    parser = SmtpCaptureParser("t", [25], max_held_bytes=1000)
    parser.feed(1, int(T0 * 1000), conv.frames[0][1], 1)
    for i, seg in enumerate(segs[1:], 1):  # the first segment never comes
        parser.feed(i + 1, int(T0 * 1000) + i, conv.frame(True, "PA", seg, seq=conv.cseq + 30 * i), 1)
        assert parser.buffered_bytes <= 1000
    (r,) = rows(check(parser.close()))
    assert parser.counters.gaps >= 1
    assert r["rcpt_count"] == stream[30:].split(b"\n", 1)[1].count(b"RCPT TO")
    assert parser.buffered_bytes == 0


def test_the_capture_cut_payloads_at_the_snap_length():
    conv = Conv().handshake().dialogue(SESSION).close()
    b, parser = parse(pcap(conv.frames, snaplen=70))
    (r,) = rows(b)
    assert r["bytes"] == sum(Ether(f)[IP].len for _, f in conv.frames if Ether(f)[TCP].dport == 25)
    assert parser.counters.cut_by_snaplen > 0 and parser.counters.gaps > 0
    assert r["conn_state"] == "completed" and not b.rejects


# ------------------------------------------------------------------ dialogue


def client_only(stream: bytes, chunk: int = 10_000) -> SmtpDialogue:
    d = SmtpDialogue()
    for i in range(0, len(stream), chunk):
        d.client(stream[i:i + chunk])
    return d


def test_data_refused_keeps_reading_commands():
    conv = Conv().handshake().dialogue([
        (b"", b"220 mx\r\n"), (b"HELO a\r\n", b"250 ok\r\n"), (b"DATA\r\n", b"503 need RCPT\r\n"),
        (b"RCPT TO:<x@y>\r\n", b"503 need MAIL\r\n"), (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"),
        (b"RCPT TO:<x@y>\r\n", b"250 ok\r\n"), (b"DATA\r\n", b"354 go\r\n"),
        (b"RCPT TO:<in the body>\r\n.\r\n", b"250 ok\r\n"), (b"QUIT\r\n", b"221 bye\r\n")])
    r = one(pcap(conv.frames))
    assert (r["rcpt_count"], r["replies_5xx"], r["reply_last"]) == (2, 2, 221)


def test_pipelined_commands_and_data_before_354():
    d = SmtpDialogue()
    d.server(b"220 mx\r\n")
    d.client(b"EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\nDATA\r\n")
    d.server(b"250-mx\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n250 ok\r\n")
    assert d.data_waiting  # the 250s answered EHLO, MAIL and the RCPTs, not DATA
    d.server(b"354 go\r\n")
    d.client(b"RCPT TO:<body>\r\n.\r\nRCPT TO:<after@y>\r\nQUIT\r\n")
    d.server(b"250 ok\r\n250 ok\r\n221 bye\r\n")
    assert (d.rcpt_count, d.replies, d.reply_last) == (3, 9, 221)


def test_pipelined_transaction_after_a_message():
    d = SmtpDialogue()
    d.server(b"220 mx\r\n")
    d.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n")
    d.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
    # the end of the message and the next transaction in one go (RFC 2920)
    d.client(b"one\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<z@y>\r\nDATA\r\n")
    d.server(b"250 queued\r\n250 ok\r\n250 ok\r\n")
    assert d.data_waiting  # the third 250 answered the RCPT, the DATA is still open
    d.server(b"354 go\r\n")
    d.client(b"RCPT TO:<in the body>\r\n.\r\nQUIT\r\n")
    d.server(b"250 queued\r\n221 bye\r\n")
    assert (d.rcpt_count, d.replies, d.reply_last) == (2, 10, 221)


def test_first_sender_and_helo_are_kept():
    d = client_only(b"EHLO first.example\r\nMAIL FROM:<a@one.example>\r\nRSET\r\nHELO second.example\r\n"
                    b"MAIL FROM:<a@two.example>\r\n")
    assert (d.helo, d.mail_from_domain) == ("first.example", "one.example")


def test_replies_before_any_command_in_a_connection_picked_up_mid_way():
    d = SmtpDialogue(from_start=False)
    d.server(b"250 ok\r\n250 ok\r\n250 ok\r\n")  # answers to commands sent before the capture began
    d.client(b"DATA\r\n")
    d.server(b"554 no valid recipients\r\n")  # answers this DATA: what follows are commands
    d.client(b"RCPT TO:<x@y>\r\n")
    assert (d.rcpt_count, d.data_waiting, d.replies_5xx) == (1, False, 1)


def test_client_only_starttls_stops_at_the_tls_record():
    d = client_only(b"EHLO a\r\nSTARTTLS\r\n\x16\x03\x01\x02\x00\r\nRCPT TO:<x@y>\r\n", chunk=10)
    assert (d.starttls, d.rcpt_count, d.commands) == (True, 0, 2)


def test_bdat_chunks_are_skipped_by_length():
    body = b"RCPT TO:<inside@chunk>\r\n" * 3
    d = client_only(b"EHLO a\r\nMAIL FROM:<a@b>\r\nBDAT %d LAST\r\n" % len(body) + body + b"RCPT TO:<x@y>\r\nQUIT\r\n",
                    chunk=7)
    assert d.rcpt_count == 1 and d.commands == 5


def test_message_end_variants():
    assert client_only(b"DATA\r\n.\r\nRCPT TO:<a@b>\r\n").rcpt_count == 1  # empty message
    assert client_only(b"DATA\nhello\n.\nRCPT TO:<a@b>\n").rcpt_count == 1  # bare LF
    assert client_only(b"DATA\r\n..\r\nRCPT TO:<in@body>\r\n").rcpt_count == 0  # a dot-stuffed line is content


def test_starttls_refused_keeps_reading_and_accepted_stops():
    d = SmtpDialogue()
    d.server(b"220 mx\r\n")
    d.client(b"STARTTLS\r\n")
    d.server(b"454 TLS not available\r\n")
    d.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\n")
    assert (d.starttls, d.tls, d.rcpt_count) == (True, False, 1)
    d.client(b"STARTTLS\r\n")
    d.server(b"250 ok\r\n250 ok\r\n220 go ahead\r\n")
    d.client(b"RCPT TO:<hidden@tls>\r\n")  # would be encrypted; must not count
    d.server(b"550 nope\r\n")
    assert (d.tls, d.rcpt_count, d.replies_5xx, d.reply_last, d.done) == (True, 1, 0, 220, True)


def test_implicit_tls_leaves_the_dialogue_unknown():
    conv = Conv(sport=465).handshake()
    # TLS records whose bytes happen to hold line ends and SMTP-looking text
    conv.c(b"\x16\x03\x01\x00\x50\r\n" + b"RCPT TO:<x@y>\r\n" * 5).s(b"\x16\x03\x03\x00\x40\r\n" + b"250 x\r\n" * 9)
    r = one(pcap(conv.close().frames), ports=(465,))
    assert r["rcpt_count"] is r["reply_first"] is r["starttls"] is None
    assert r["conn_state"] == "completed"


def test_auth_and_multiline_replies_counted_once():
    d = SmtpDialogue()
    d.server(b"220-first\r\n220-second\r\n220 third\r\n")
    d.client(b"EHLO a\r\nAUTH LOGIN\r\n")
    d.server(b"250-x\r\n250 AUTH LOGIN\r\n334 VXNlcm5hbWU6\r\n")
    d.client(b"dXNlcg==\r\n")
    d.server(b"334 UGFzc3dvcmQ6\r\n")
    d.client(b"cGFzcw==\r\n")
    d.server(b"235 ok\r\n")
    assert (d.auth, d.replies, d.reply_first, d.reply_last) == (True, 5, 220, 235)


def test_lines_are_bounded():
    d = SmtpDialogue()
    d.client(b"EHLO " + b"x" * 100_000)
    assert d.buffered <= 4096
    d.client(b"RCPT TO:<inside a long line>\r\nRCPT TO:<x@y>\r\n")
    assert d.rcpt_count == 1 and d.helo is None
    d.server(b"250" * 10_000)
    assert d.buffered <= 2 * 4096


@pytest.mark.parametrize("arg, domain", [
    (b"FROM:<Bob@Example.ORG> SIZE=100", "example.org"),
    (b"FROM: <bob@example.org>", "example.org"),
    (b"from:bob@Mail.Example.com BODY=8BITMIME", "mail.example.com"),
    (b"FROM:<@relay.example:bob@final.example>", "final.example"),
    (b"FROM:<>", ""),
    (b"FROM:<postmaster>", ""),
    (b"TO:<bob@example.org>", ""),
    (b"FROM:<bob@example.org.>", "example.org"),
])
def test_mail_from_domain(arg, domain):
    assert mail_from_domain(arg) == domain


# ------------------------------------------------------------------ bad input


def test_malformed_packets_are_dead_letters_with_reasons():
    good = Conv().handshake().dialogue(SESSION[:2]).close()
    tcp_frame = good.frames[0][1]
    bad = [
        bytes(eth() / IP(proto=6))[:14 + 10],  # cut inside the IPv4 header
        bytes(eth(type=0x0800) / (b"\x43" + bytes(IP(proto=6))[1:] + bytes(TCP()))),  # IHL 3
        bytes(eth() / IP(dst="192.0.2.25") / TCP(dport=25))[:14 + 20 + 8],  # TCP header cut
        bytes(eth() / IP(dst="192.0.2.25") / TCP(dport=25, dataofs=2)),  # data offset 2
    ]
    frames = [(T0 + i, f) for i, f in enumerate(bad)] + good.frames
    b, parser = parse(pcap(frames))
    assert [r.location for r in b.rejects] == ["packet 1", "packet 2", "packet 3", "packet 4"]
    reasons = [r.reason for r in b.rejects]
    assert "IPv4 header" in reasons[0] and "IPv4 header" in reasons[1]
    assert "TCP header" in reasons[2] and "TCP header length" in reasons[3]
    assert b.rejects[0].raw == bad[0].hex()
    assert b.records.num_rows == 1 and b.read == len(frames)
    assert tcp_frame  # the good connection still makes its record


def test_other_traffic_is_skipped_not_rejected():
    frames = [(T0, bytes(eth() / ARP())), (T0 + 1, bytes(eth() / IP() / UDP(dport=25) / b"x")),
              (T0 + 2, bytes(eth() / IP(flags=0, frag=100, proto=6) / (b"\x00" * 40)))]
    b, parser = parse(pcap(frames))
    assert b.records.num_rows == 0 and not b.rejects and b.skipped == 3
    c = parser.counters
    assert (c.not_ip, c.not_tcp, c.fragments) == (1, 1, 1)


def test_broken_files():
    b, _ = parse(b"this is not a capture")
    (rej,) = b.rejects
    assert rej.location == "file" and "not a pcap" in rej.reason
    data = pcap(Conv().handshake().dialogue(SESSION).frames)
    b, _ = parse(data[:-5])  # cut inside the last packet
    assert [r.location for r in b.rejects] == ["file"] and "cut" in b.rejects[0].reason
    assert b.records.num_rows == 1  # what came before is kept
    b, _ = parse(b"")
    assert b.read == 1 and len(b.rejects) == 1


def test_configuration_is_checked():
    with pytest.raises(ConfigError, match="not a port number"):
        SmtpCaptureParser("t", [25, 70000])
    with pytest.raises(ConfigError, match="empty"):
        SmtpCaptureParser("t", [])
    with pytest.raises(ConfigError, match="max_connections"):
        SmtpCaptureParser("t", [25], max_connections=0)
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        SmtpCaptureParser("t", [25], idle_timeout_s=-1)


# ------------------------------------------------------------------ property tests

_LINKTYPES = st.sampled_from([1, 101, 113, 276, 0, 108, 228, 229, 147])


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(data):
    b, _ = parse(data)
    assert b.read >= 1 and b.records.num_rows == 0 or b.read >= b.records.num_rows


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=40), _LINKTYPES)
def test_random_frames_never_raise(frames, linktype):
    parse(pcap([(T0 + i, f) for i, f in enumerate(frames)], linktype))


def _tcpish(draw_bytes: bytes, sport: int, dport: int, flags: int) -> bytes:
    """A frame with valid Ethernet and IPv4 headers and a TCP header with the given
    ports and flags, the rest random: fuzzes the connection logic, not the header checks."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, *struct.unpack("!II", (draw_bytes + b"\x00" * 8)[:8]),
                      5 << 4, flags, 1024, 0, 0) + draw_bytes[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, b"\x0a\x00\x00\x01",
                     b"\xc0\x00\x02\x19")
    return b"\x00" * 12 + b"\x08\x00" + ip + tcp


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(max_size=300), st.sampled_from([25, 40000, 40001]),
                          st.sampled_from([25, 40000]), st.integers(0, 255), st.integers(0, 400)), max_size=60))
def test_random_tcp_traffic_never_raises_and_stays_bounded(packets):
    parser = SmtpCaptureParser("t", [25], max_connections=3, max_held_bytes=500, close_linger_s=1,
                               idle_timeout_s=60)
    for i, (body, sport, dport, flags, dt) in enumerate(packets):
        parser.feed(i + 1, int(T0 * 1000) + i * dt * 1000, _tcpish(body, sport, dport, flags), 1)
        assert parser.open_connections <= 3 and parser.buffered_bytes <= 3 * 500
        check(parser.take())
    check(parser.close())
    assert parser.counters.packets == len(packets)


def _edit(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, val in edits:
        if not buf:
            break
        pos %= len(buf)
        if kind == 0:
            buf[pos] = val
        elif kind == 1:
            del buf[pos:pos + val]
        elif kind == 2:
            buf[pos:pos] = bytes([val]) * (val % 17)
        else:
            del buf[pos:]
    return bytes(buf)


_SAMPLES = [(TRACES / "smtp-mail-transactions-invalid.pcap").read_bytes(),
            (TRACES / "tls" / "smtp-starttls.pcap").read_bytes(),
            pcap(Conv().handshake().dialogue(SESSION).close().frames)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(_SAMPLES))),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_captures_never_raise(sample, edits):
    parse(_edit(_SAMPLES[sample], edits))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=40))
def test_dialogue_does_not_depend_on_segmentation(cuts):
    stream = b"".join(c for c, _ in SESSION) + b"BDAT 30 LAST\r\n" + b"RCPT TO:<chunk@x>\r\n" * 2
    stream = stream[:len(stream) - 8] + b"RCPT TO:<after@x>\r\n"
    whole = client_only(stream)
    d = SmtpDialogue()
    pos = 0
    for n in cuts:
        d.client(stream[pos:pos + n])
        pos += n
    d.client(stream[pos:])
    assert (d.helo, d.mail_from_domain, d.rcpt_count, d.commands) == \
        (whole.helo, whole.mail_from_domain, whole.rcpt_count, whole.commands)


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(7)))
def test_reordered_client_segments_give_the_same_record(order):
    lines = [c for c, _ in SESSION if c][:7]
    base = Conv().send(True, "S")
    offsets = [sum(len(x) for x in lines[:i]) for i in range(len(lines))]
    segs = [(T0 + 1 + k, base.frame(True, "PA", lines[i], seq=base.cseq + offsets[i])) for k, i in enumerate(order)]
    r = one(pcap(base.frames + segs))
    assert (r["helo"], r["mail_from_domain"], r["rcpt_count"]) == ("Client.Example", "sender.example", 3)


# ------------------------------------------------------------------ the kernel filter program


def run_bpf(program: list[tuple[int, int, int, int]], frame: bytes, pkttype: int = 0) -> int:
    """Classic BPF as the kernel runs it, for the instructions the filters use."""
    a = x = pc = 0
    while True:
        op, jt, jf, k = program[pc]
        pc += 1
        k = k & 0xFFFFFFFF if k >= 0 else k
        if op == 0x20 and k == -0x1000 + 4:
            a = pkttype
        elif op in (0x20, 0x28, 0x30, 0x48):
            off = k + (x if op == 0x48 else 0)
            size = {0x20: 4, 0x28: 2, 0x30: 1, 0x48: 2}[op]
            if off + size > len(frame):
                return 0
            a = int.from_bytes(frame[off:off + size], "big")
        elif op == 0xB1:
            if k >= len(frame):
                return 0
            x = 4 * (frame[k] & 0x0F)
        elif op == 0x54:
            a &= k
        elif op == 0x15:
            pc += jt if a == k else jf
        elif op == 0x45:
            pc += jt if a & k else jf
        elif op == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {op:#x} not expected")


@pytest.mark.parametrize("link_bytes, wrap", [(14, lambda p: bytes(eth() / p)), (0, bytes)])
def test_filter_program_keeps_tcp_on_smtp_ports(link_bytes, wrap):
    prog = smtp_filter(frozenset([25, 587]), link_bytes, drop_outgoing=True)
    keep = [IP() / TCP(dport=25), IP() / TCP(sport=587, dport=40000), IPv6() / TCP(dport=587),
            IP(options=b"\x01\x01\x01\x00") / TCP(sport=25)]
    drop = [IP() / TCP(dport=443), IP() / UDP(dport=25), IPv6() / TCP(dport=80), IP(frag=10, proto=6) / (b"\x00" * 25),
            IPv6() / UDP(dport=25)]
    assert [run_bpf(prog, wrap(p)) > 0 for p in keep] == [True] * len(keep)
    assert [run_bpf(prog, wrap(p)) for p in drop] == [0] * len(drop)
    assert run_bpf(prog, wrap(keep[0]), pkttype=4) == 0  # the loopback's outgoing copy
    if link_bytes:
        assert run_bpf(prog, bytes(eth() / ARP())) == 0


def test_filter_program_fits_jumps_for_many_ports():
    ports = frozenset(range(1000, 1000 + MAX_FILTER_PORTS))
    prog = smtp_filter(ports, 14, True)
    assert run_bpf(prog, bytes(eth() / IP() / TCP(dport=1000 + MAX_FILTER_PORTS - 1))) > 0
    assert run_bpf(prog, bytes(eth() / IP() / TCP(dport=999))) == 0
    wide = smtp_filter(frozenset(range(2000, 2100)), 14, True)  # too many to list: every TCP packet
    assert run_bpf(wide, bytes(eth() / IP() / TCP(dport=9))) > 0
    assert run_bpf(wide, bytes(eth() / IP() / UDP(dport=2000))) == 0


# ------------------------------------------------------------------ live capture on the loopback


class _SmtpHandler(socketserver.StreamRequestHandler):
    """A tiny SMTP server: greeting, EHLO, MAIL, RCPT, QUIT."""

    def handle(self) -> None:
        self.wfile.write(b"220 test.localhost ESMTP\r\n")
        for line in self.rfile:
            verb = line.split()[0].upper() if line.split() else b""
            if verb == b"EHLO":
                self.wfile.write(b"250-test.localhost\r\n250 PIPELINING\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                self.wfile.write(b"250 ok\r\n")
            else:
                self.wfile.write(b"502 not implemented\r\n")


@pytest.fixture
def smtp_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SmtpHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(10)


class _Capture:
    """live_capture in a thread; the test talks while it runs."""

    def __init__(self, iface: str, ports, **kw):
        self.ready, self.stop = threading.Event(), threading.Event()
        self.batches: list[Batch] = []
        self.error: BaseException | None = None
        self.parser = SmtpCaptureParser(iface, ports)
        self.stats = None

        def run() -> None:
            try:
                self.stats = live_capture(iface, ports, self.batches.append, self.stop, parser=self.parser,
                                          on_ready=self.ready.set, flush_interval_s=0.2, **kw)
            except BaseException as e:  # handed to the test thread
                self.error = e
                self.ready.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.ready.wait(20)
        if self.error:
            raise self.error

    def finish(self) -> Batch:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error
        return concat([check(b) for b in self.batches])


def _talk_smtp(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as s:
        s.ehlo()
        s.mail("sender@Sender.Example")
        s.rcpt("a@example.org")
        s.rcpt("b@example.org")
    # leaving the block sent QUIT, read 221 and closed the socket


def test_live_capture_on_loopback(smtp_server):
    port = smtp_server
    cap = _Capture("lo", [port])
    # traffic the kernel filter keeps away: UDP to the port, TCP to another port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(b"not smtp", ("127.0.0.1", port))
    with socket.create_server(("127.0.0.1", 0)) as other:
        with socket.create_connection(other.getsockname()):
            pass
    _talk_smtp(port)
    b = cap.finish()
    (r,) = rows(b)
    assert (r["src_ip"], r["dst_ip"], r["dst_port"], r["protocol"]) == ("127.0.0.1", "127.0.0.1", port, 6)
    assert (r["helo"], r["mail_from_domain"], r["rcpt_count"]) == ("client.example", "sender.example", 2)
    assert (r["reply_first"], r["reply_last"], r["replies_4xx"], r["replies_5xx"]) == (220, 221, 0, 0)
    assert (r["starttls"], r["auth"], r["conn_state"]) == (False, False, "completed")
    assert (r["exporter"], r["source_format"], r["action"]) == ("lo", "pcap", "unknown")
    c = cap.parser.counters
    assert c.not_tcp == c.other_ports == 0  # the kernel filter did its job
    assert c.retransmitted_bytes == 0  # no second copy of loopback packets
    assert r["packets"] >= 7 and r["rev_packets"] >= 6 and b.read == cap.stats.packets


def test_live_capture_on_missing_interface():
    with pytest.raises(InputError, match="'nosuch0' does not exist; interfaces here: .*lo"):
        live_capture("nosuch0", [25], lambda b: None, threading.Event())


def test_live_capture_without_the_capture_privilege():
    code = ("import threading\n"
            "from smtpguard.core.errors import InputError\n"
            "from smtpguard.ingest.pcap_live import live_capture\n"
            "try:\n"
            "    live_capture('lo', [25], print, threading.Event())\n"
            "except InputError as e:\n"
            "    print('InputError:', e)\n")
    # keep uid 0 but take CAP_NET_RAW out of the bounding set: the child cannot open a packet socket
    out = subprocess.run(["setpriv", "--bounding-set=-net_raw", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)
    assert "InputError: capturing on lo needs root or CAP_NET_RAW" in out.stdout, out.stderr


def test_live_capture_with_a_bpf_expression(smtp_server):
    # make test installs libpcap (Debian's libpcap0.8): a BPF filter needs it, and this test with it
    assert ctypes.util.find_library("pcap"), "libpcap is missing: make test installs it (libpcap0.8)"
    cap = _Capture("lo", [smtp_server], bpf=f"tcp port {smtp_server}")
    _talk_smtp(smtp_server)
    (r,) = rows(cap.finish())
    assert r["rcpt_count"] == 2


def test_live_capture_checks_ports_before_opening():
    with pytest.raises(ConfigError):
        live_capture("lo", [25, -1], lambda b: None, threading.Event())
