"""sFlow v5: the shared real exports against their published decodes (akvorado's tests), exports that
pmacct's `pmacctd` makes from the shared SMTP captures against nfdump's decode of the same export
(`sfcapd` + `nfdump`), the UDP collector keeping every sample with its counters, and bad datagrams
as dead letters."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fuzz.hostile import check_batch
from smtpguard.ingest import registry
from smtpguard.ingest.base import Datagram
from smtpguard.ingest.sflow import SflowDatParser, SflowDecoder, SflowPcapParser

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AKV = DATA / "sflow" / "akvorado"
SMTP_PCAPS = [DATA / "smtp" / "zeek" / "Traces" / "smtp.pcap",
              DATA / "smtp" / "zeek" / "Traces" / "tls" / "smtp-starttls.pcap"]
COLS = ["src_ip", "dst_ip", "src_port", "dst_port", "protocol", "bytes", "sampling_rate", "interface_id", "tcp_flags",
        "action", "exporter"]


def decode_pcap(path: Path, ports=None):
    p = SflowPcapParser(path.name, ports)
    batches = [check_batch(b, "sflow") for b in p.parse_stream(path.open("rb"), path.name)]
    rows = [r for b in batches for r in b.records.select(COLS).to_pylist()]
    return rows, batches, p.decoder


# ------------------------------------------------------------- akvorado's expected decodes


def test_several_samples_per_datagram_with_ipv6_match_the_published_decode() -> None:
    rows, batches, dec = decode_pcap(AKV / "data-1140.pcap")
    v6 = ("2a0c:8880:2:0:185:21:130:38", "2a0c:8880:2:0:185:21:130:39", 46026, 22, 6, 1500, 1024, "27", 0x10)
    want = [v6,
            ("104.26.8.24", "45.90.161.46", 443, 56876, 6, 421, 1024, "49001", 0x18),
            v6,
            ("45.90.161.148", "191.87.91.27", 55658, 5555, 6, 40, 1024, "28", 0x2),
            v6]
    assert [tuple(r[c] for c in COLS[:9]) for r in rows] == want
    assert {r["exporter"] for r in rows} == {"172.16.0.3"}
    t = dec.totals()
    assert (t.datagrams, t.flow_samples, t.kept, t.rejects) == (1, 5, 5, 0)


def test_expanded_samples_raw_ipv4_headers_and_discards() -> None:
    rows, _, _ = decode_pcap(AKV / "data-sflow-expanded-sample.pcap")
    assert [tuple(r[c] for c in COLS[:9]) for r in rows] == [
        ("52.52.52.52", "53.53.53.53", 22, 52237, 6, 104, 1000, "29001", 0x18)]
    rows, _, _ = decode_pcap(AKV / "data-sflow-raw-ipv4.pcap")
    assert rows and all((r["src_ip"], r["protocol"], r["sampling_rate"]) == ("69.58.92.107", 1, 1) for r in rows)
    assert rows[0]["dst_ip"] == "92.222.186.1"
    discard, _, _ = decode_pcap(AKV / "data-discard-interface.pcap")
    local, _, _ = decode_pcap(AKV / "data-local-interface.pcap")
    assert [r["action"] for r in discard] == ["reject"] and [r["action"] for r in local] == ["unknown"]
    vxlan, _, _ = decode_pcap(AKV / "data-encap-vxlan.pcap")
    assert [(r["protocol"], r["dst_port"]) for r in vxlan] == [(17, 4789)]  # the outer flow, as exported


def test_smtp_selection_keeps_client_samples_towards_smtp_ports() -> None:
    rows, batches, dec = decode_pcap(AKV / "data-1140.pcap", (25,))
    assert rows == [] and sum(b.skipped for b in batches) == 5 and dec.totals().skipped == 5


def test_every_shared_capture_is_recognised_as_sflow() -> None:
    for f in sorted(AKV.glob("*.pcap")):
        assert registry.detect(f.read_bytes()[:65536], f.name).name == "sflow-pcap", f


# ------------------------------------------------------------- pmacct exports, nfdump decodes



def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_with_pmacctd(pcap: Path, rate: int, tmp: Path) -> list[bytes]:
    """The sFlow datagrams `pmacctd` (sfprobe plugin) exports while reading ``pcap``."""
    for tool in ("pmacctd", "sfcapd", "nfdump"):
        assert shutil.which(tool), f"{tool} is missing: make test installs pmacct and nfdump-sflow"
    port = _free_udp_port()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.settimeout(0.5)
    conf = tmp / f"pmacctd-{rate}.conf"
    conf.write_text(f"daemonize: false\npcap_savefile: {pcap}\nplugins: sfprobe\nsfprobe_receiver: 127.0.0.1:{port}\n"
                    f"sfprobe_agentip: 192.0.2.1\nsampling_rate: {rate}\n")
    got: list[bytes] = []
    proc = subprocess.Popen(["pmacctd", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                got.append(sock.recv(65535))
            except socket.timeout:
                if proc.poll() is not None:
                    break
        # the last datagrams may still be in flight when the probe exits
        try:
            while True:
                got.append(sock.recv(65535))
        except socket.timeout:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        sock.close()
    assert got, f"pmacctd exported nothing: {proc.stderr.read()[-2000:]}"
    return got


def nfdump_flows(datagrams: list[bytes], tmp: Path) -> list[dict]:
    """What `sfcapd` collects and `nfdump` decodes from the same datagrams."""
    out = tmp / f"nfcap-{len(datagrams)}-{time.monotonic_ns()}"
    out.mkdir()
    port = _free_udp_port()
    proc = subprocess.Popen(["sfcapd", "-l", str(out), "-p", str(port), "-b", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for d in datagrams:
                s.sendto(d, ("127.0.0.1", port))
                time.sleep(0.001)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    r = subprocess.run(["nfdump", "-R", str(out), "-o", "json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


def write_pcap(datagrams: list[bytes], path: Path) -> None:
    """The datagrams as a capture of the export traffic (Ethernet, IPv4, UDP to 6343)."""
    from scapy.all import IP, UDP, Ether, wrpcap

    wrpcap(str(path), [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="192.0.2.1", dst="192.0.2.9") / UDP(sport=40000, dport=6343) / d
                       for d in datagrams])


def _key(src, dst, sport, dport, proto) -> tuple:
    return (src, dst, int(sport), int(dport), int(proto))


@pytest.mark.parametrize("pcap", SMTP_PCAPS, ids=[p.name for p in SMTP_PCAPS])
@pytest.mark.parametrize("rate", [1, 4])
def test_decode_of_a_pmacctd_export_matches_nfdump(pcap: Path, rate: int, tmp_path: Path) -> None:
    datagrams = export_with_pmacctd(pcap, rate, tmp_path)
    theirs = nfdump_flows(datagrams, tmp_path)
    export = tmp_path / "export.pcap"
    write_pcap(datagrams, export)
    exe = str(Path(sys.executable).with_name("smtpguard"))
    r = subprocess.run([exe, "decode", str(export), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ours = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(ours) == len(theirs) > 0
    def flags(s: str) -> int:  # nfdump prints TCP flags as "...AP.S." (CWR ECE URG ACK PSH RST SYN FIN)
        return sum(1 << (7 - i) for i, ch in enumerate(s) if ch != ".")

    mine: dict[tuple, list[int]] = {}
    for o in ours:
        # nfdump scales packets and bytes by the sampling rate; smtpguard keeps the sample and its rate
        k = (_key(o["src_ip"], o["dst_ip"], o["src_port"], o["dst_port"], o["protocol"]), o["packets"] * rate,
             o["tcp_flags"] or 0, o["sampling_rate"])
        mine.setdefault(k, []).append(o["bytes"])
    nf: dict[tuple, list[int]] = {}
    for t in theirs:
        k = (_key(t.get("src4_addr") or t.get("src6_addr"), t.get("dst4_addr") or t.get("dst6_addr"),
                  t.get("src_port", 0), t.get("dst_port", 0), t["proto"]), t["in_packets"],
             flags(t["tcp_flags"]) if t["proto"] == 6 else 0, rate)
        nf.setdefault(k, []).append(t["in_bytes"])
    assert {k: len(v) for k, v in mine.items()} == {k: len(v) for k, v in nf.items()}
    # bytes: nfdump counts the sampled Ethernet frame with its checksum (IP + 14 + 4, or Ethernet's 64-byte
    # minimum when the capture kept the padding), smtpguard the IP packet, as NetFlow and the flow logs do
    for k, ip_lengths in mine.items():
        for o, t in zip(sorted(ip_lengths), sorted(nf[k])):
            assert t == (o + 18) * rate or (t == 64 * rate and o + 18 < 64), (k, o, t)
    assert {o["exporter"] for o in ours} == {"192.0.2.1"}
    if rate == 1:
        # unsampled, every packet of the capture to or from the SMTP server is a sample
        assert sum(o["dst_port"] == 25 for o in ours) > 5


def test_collect_sflow_listen_keeps_every_sample_with_its_counters(cfg, tmp_path: Path) -> None:
    """`smtpguard collect sflow --listen` as a process: a replayed pmacctd export in, every SMTP sample on
    the topic, the agent's counters in its summary."""
    from smtpguard.core import wire
    from test_streaming import read_topic, run_udp_collector

    datagrams = export_with_pmacctd(SMTP_PCAPS[0], 1, tmp_path)
    every = SflowDecoder(None).decode_many([Datagram(d, "x", 0) for d in datagrams])
    smtp = SflowDecoder((25, 465, 587, 2525)).decode_many([Datagram(d, "x", 0) for d in datagrams])
    err = run_udp_collector(cfg, "sflow", datagrams)
    assert "listening for sFlow" in err
    t = cfg.kafka.topics
    msgs = read_topic(cfg, t.flows, 1, timeout_s=20)
    records = sum(wire.decode_message(m.value(), m.headers()).num_rows for m in msgs)
    assert records == smtp.records.num_rows > 0
    assert f"agents: {len(datagrams)} datagrams, {every.read} flow samples ({records} kept" in err, err


# ------------------------------------------------------------------ bad input, files of datagrams


def _datagram(samples: list[bytes], seq: int = 1, agent: bytes = bytes([192, 0, 2, 1])) -> bytes:
    return struct.pack(">II", 5, 1) + agent + struct.pack(">IIII", 0, seq, 1000 * seq, len(samples)) + b"".join(samples)


def _flow_sample(rate: int, header: bytes, drops: int = 0, out: int = 2) -> bytes:
    rec = struct.pack(">IIII", 11, len(header) + 4, 4, len(header)) + header + b"\0" * (-len(header) % 4)
    body = struct.pack(">IIIIIIII", 1, 7, rate, 100, drops, 3, out, 1) + struct.pack(">II", 1, len(rec)) + rec
    return struct.pack(">II", 1, len(body)) + body


def _ipv4_tcp(src: bytes, dst: bytes, dport: int, flags: int) -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, src, dst)
    return ip + struct.pack(">HHIIBBHHH", 40000, dport, 1, 0, 0x50, flags, 1000, 0, 0)


def test_bad_samples_are_dead_letters_and_the_others_go_on() -> None:
    good = _flow_sample(256, _ipv4_tcp(bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7]), 25, 0x02))
    zero_rate = _flow_sample(0, _ipv4_tcp(bytes([10, 0, 0, 6]), bytes([198, 51, 100, 7]), 25, 0x02))
    counter = struct.pack(">II", 2, 8) + b"\0" * 8
    dec = SflowDecoder((25,))
    b = check_batch(dec.decode_many([Datagram(_datagram([good, zero_rate, counter, good]), "a", 1000, "dg 1")]), "sflow")
    assert b.records.num_rows == 2 and [r.location for r in b.rejects] == ["dg 1 sample 2"]
    assert "sampling rate 0" in b.rejects[0].reason
    assert b.records.column("sampling_rate").to_pylist() == [256, 256]
    t = dec.totals()
    assert (t.flow_samples, t.counter_samples, t.kept, t.rejects) == (3, 1, 2, 1)
    cut = _datagram([good])[:-10]
    b = check_batch(dec.decode_many([Datagram(cut, "a", 1000, "dg 2"), Datagram(b"\0\0\0\4junk", "a", 1000, "dg 3")]),
                    "sflow")
    assert [r.location for r in b.rejects] == ["dg 2 sample 1", "dg 3"] and b.records.num_rows == 0
    assert "declares" in b.rejects[0].reason and "version 4" in b.rejects[1].reason


def test_sequence_gaps_and_agent_drops_are_counted() -> None:
    s = _flow_sample(64, _ipv4_tcp(bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7]), 25, 0x02))
    dec = SflowDecoder((25,))
    dec.decode_many([Datagram(_datagram([s], seq=1), "a", 1), Datagram(_datagram([s], seq=2), "a", 2),
                     Datagram(_datagram([s], seq=6), "a", 3),
                     Datagram(_datagram([_flow_sample(64, _ipv4_tcp(bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7]),
                                                                   25, 0x02), drops=9)], seq=7), "a", 4)])
    t = dec.counters["192.0.2.1"]
    assert (t.datagrams, t.sequence_gaps, t.agent_drops) == (4, 3, 9)


def test_datagrams_written_back_to_back_are_read_with_times_from_the_file(tmp_path: Path) -> None:
    s = _flow_sample(1, _ipv4_tcp(bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7]), 25, 0x02))
    f = tmp_path / "export.dat"
    f.write_bytes(_datagram([s], seq=1) + _datagram([s, s], seq=2))
    os.utime(f, (1_700_000_000, 1_700_000_000))
    assert registry.detect(f.read_bytes(), f.name).name == "sflow-dat"
    b = list(SflowDatParser(f.name, (25,)).parse_stream(f.open("rb"), f.name))[0]
    check_batch(b, "sflow")
    ms = [int(x.timestamp() * 1000) for x in b.records.column("start").to_pylist()]
    assert ms == [1_700_000_000_000 - 1000, 1_700_000_000_000, 1_700_000_000_000]  # uptimes 1 s and 2 s


def test_the_listener_takes_sflow_datagrams(tmp_path: Path) -> None:
    from smtpguard.ingest.netflow_listen import listen_udp

    s = _flow_sample(1, _ipv4_tcp(bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7]), 25, 0x02))
    got, ready, stop = [], threading.Event(), threading.Event()
    addr: list = []
    th = threading.Thread(target=listen_udp, args=("127.0.0.1", 0, SflowDecoder((25,)), got.append, stop),
                          kwargs={"on_ready": lambda a: (addr.append(a), ready.set())}, daemon=True)
    th.start()
    assert ready.wait(10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(5):
            sock.sendto(_datagram([s], seq=i + 1), addr[0])
    time.sleep(0.6)
    stop.set()
    th.join(10)
    assert sum(b.records.num_rows for b in got) == 5


# ------------------------------------------------------------------ detection on packet samples


def _session(client: bytes, server: bytes, sport: int, n_data: int) -> list[bytes]:
    """The client's packets of one SMTP session: a SYN, then ``n_data`` ACK/PSH packets."""
    def pkt(flags: int, length: int) -> bytes:
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, length, 1, 0, 64, 6, 0, client, server)
        return ip + struct.pack(">HHIIBBHHH", sport, 25, 1, 0, 0x50, flags, 1000, 0, 0)
    return [pkt(0x02, 60)] + [pkt(0x18, 200) for _ in range(n_data)]


def _features(datagrams: list[bytes]):
    from smtpguard.core import config
    from smtpguard.detectors.pipeline import Pipeline

    batch = SflowDecoder((25,)).decode_many([Datagram(d, "a", 1_764_583_210_000) for d in datagrams])
    pipe = Pipeline(config.load(environ={}))
    out = pipe.process(batch.records)
    out.extend(pipe.flush())
    return out.features.row(0, named=True)


def test_packet_samples_count_connections_by_their_first_packet_and_weigh_their_rate() -> None:
    client = bytes([10, 0, 0, 5])
    servers = [bytes([198, 51, 100, i]) for i in (7, 8, 9)]
    # unsampled: every packet of three sessions to three servers is a sample
    packets = [p for i, srv in enumerate(servers) for p in _session(client, srv, 40000 + i, 10)]
    f = _features([_datagram([_flow_sample(1, p) for p in packets[k:k + 10]], seq=k + 1)
                   for k in range(0, len(packets), 10)])
    assert (f["connections"], f["distinct_dst"], f["packets"]) == (3, 3, 33)
    assert f["bytes"] == 3 * (60 + 10 * 200)
    assert f["low_byte_conns"] == 0  # a sampled SYN is not a handshake-only connection
    # 1 in 10: the samples that came are a SYN to one server and two data packets to two others; each
    # stands for ten packets, the SYN for ten connections; all three servers were seen
    picked = [_session(client, servers[0], 40000, 0)[0], _session(client, servers[1], 40001, 1)[1],
              _session(client, servers[2], 40002, 1)[1]]
    f = _features([_datagram([_flow_sample(10, p) for p in picked])])
    assert (f["connections"], f["distinct_dst"], f["packets"]) == (10, 3, 30)


def _sampled_alerts(samples: list[bytes], rate: int):
    from smtpguard.core import config
    from smtpguard.detectors.pipeline import Pipeline

    dgs = [Datagram(_datagram([_flow_sample(rate, p) for p in samples[k:k + 8]], seq=k + 1), "a",
                    1_764_583_210_000 + k) for k in range(0, len(samples), 8)]
    pipe = Pipeline(config.load(environ={}))
    out = pipe.process(SflowDecoder((25,)).decode_many(dgs).records)
    out.extend(pipe.flush())
    return out


def test_one_sampled_syn_is_judged_by_the_lower_bound_of_its_estimate() -> None:
    """One sampled SYN at 1:4096 estimates 4,096 connections, stored as such; the detectors judge the lower
    99.9 % bound (4 connections), which floods no one."""
    client, server = bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7])
    out = _sampled_alerts([_session(client, server, 40000, 0)[0]], 4096)
    assert out.features.row(0, named=True)["connections"] == 4096
    assert [a for a in out.alerts if a.severity not in ("info", "low")] == []


def test_a_sampled_flood_is_raised_and_says_it_is_an_estimate() -> None:
    """Twenty SYNs to one server among the samples at 1:256: at least about 2,300 connections in the
    minute, a flood whatever the noise; the alert names its samples and rate."""
    client, server = bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7])
    syns = [_session(client, server, 40000 + i, 0)[0] for i in range(20)]
    out = _sampled_alerts(syns, 256)
    flood = [a for a in out.alerts if a.detector == "connection_flood"]
    assert flood and flood[0].severity in ("medium", "high", "critical"), out.alerts
    a = flood[0]
    assert 2200 <= int(a.evidence["top3_dst_conns"]) < 20 * 256, a.evidence
    assert any("estimated from 20 sFlow packet samples at 1:256: counts are the lower 99.9 % bound" in r
               for r in a.reasons), a.reasons
    assert a.evidence["sampling_rate"] == 256 and a.evidence["estimated_from_samples"] == 20


def test_poisson_lower_bound_has_its_coverage() -> None:
    """The bound is the mean at which seeing k or more events has probability 1 - confidence."""
    import numpy as np
    from scipy.stats import poisson

    from smtpguard.detectors.features import poisson_lower

    k = np.array([1, 2, 3, 7, 20, 150])
    for conf in (0.9, 0.99, 0.999):
        low = poisson_lower(k, conf)
        assert np.allclose(poisson.sf(k - 1, low), 1 - conf, rtol=1e-6)
    assert poisson_lower(np.array([0]), 0.99)[0] == 0
    # one confidence per count (the busiest destinations' bound is divided over those seen)
    assert np.allclose(poisson_lower(np.array([3, 3]), np.array([0.99, 0.999])),
                       [poisson_lower(np.array([3]), 0.99)[0], poisson_lower(np.array([3]), 0.999)[0]])


def test_a_scenario_exported_as_sflow_estimates_its_smtp_connections(tmp_path: Path) -> None:
    """The evaluation's sFlow export (every packet of every flow sampled 1 in N): decoded, its sampled
    SYNs times N estimate the scenario's SMTP connections without bias, and every sample carries N."""
    import numpy as np
    import polars as pl

    from smtpguard.app.analyze import analyze
    from smtpguard.core import config
    from smtpguard.detectors.features import connection_weights
    from smtpguard.lab import scenario

    sc = scenario.generate(7, instances=120, duration_s=1800, abuse=("spam_burst", "flood"))
    paths = scenario.write(sc, tmp_path)
    flows = analyze(config.load(environ={}), [str(paths["flows"])], "aws-vpc").kept
    for rate in (16, 64):
        out = tmp_path / f"sflow-{rate}.pcap"
        written = scenario.write_sflow(sc, out, rate)
        rows, batches, dec = decode_pcap(out, (25, 465, 587))
        t = dec.totals()
        assert (t.flow_samples, t.rejects, t.sequence_gaps) == (written, 0, 0)
        assert {r["sampling_rate"] for r in rows} == {rate}
        est = sum(int(connection_weights(b.records).sum() or 0) for b in batches if b.records.num_rows)
        # SYN retries of unanswered (rejected) connections are SYNs too: the estimate counts attempts,
        # at least the connections and at most their packets
        assert est <= 1.3 * flows + 4 * np.sqrt(flows * rate), (rate, est, flows)
        assert est >= flows - 4 * np.sqrt(flows * rate), (rate, est, flows)
        assert pl.DataFrame(rows)["dst_port"].is_in([25, 465, 587]).all()


def test_a_short_sampled_ipv6_record_is_a_dead_letter() -> None:
    rec = struct.pack(">II", 60, 6) + b"\x20\x01" + b"\0" * 4
    body = struct.pack(">IIIIIIII", 1, 7, 1, 100, 0, 3, 2, 1) + struct.pack(">II", 4, len(rec)) + rec
    b = check_batch(SflowDecoder(None).decode_many([Datagram(_datagram([struct.pack(">II", 1, len(body)) + body]),
                                                             "a", 1, "dg")]), "sflow")
    assert b.records.num_rows == 0 and "too short" in b.rejects[0].reason


def test_forgotten_agents_stay_in_the_totals_and_sources_per_agent_are_bounded() -> None:
    from smtpguard.ingest import sflow

    s = _flow_sample(64, _ipv4_tcp(bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7]), 25, 0x02))
    dec = SflowDecoder((25,), max_agents=2)
    dec.decode_many([Datagram(_datagram([s], agent=bytes([192, 0, 2, i])), "a", 1) for i in range(1, 6)])
    assert list(dec.counters) == ["192.0.2.4", "192.0.2.5"] and dec.totals().datagrams == 5
    many = [struct.pack(">II", 1, 48) + struct.pack(">IIIIIIII", 1, i, 64, 100, 0, 3, 2, 0) + b"\0" * 16
            for i in range(sflow.MAX_SOURCES_PER_AGENT + 10)]
    dec.decode_many([Datagram(_datagram(many[k:k + 1000]), "a", 1) for k in range(0, len(many), 1000)])
    assert len(dec._agents["192.0.2.1"].drops) == sflow.MAX_SOURCES_PER_AGENT


def test_an_ipv4_header_shorter_than_twenty_bytes_is_not_read() -> None:
    from smtpguard.ingest.pcapfile import ip_header

    good = _ipv4_tcp(bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7]), 25, 0x02)
    assert ip_header(good, 0x0800, 0).l4 == 20
    assert ip_header(bytes([0x40]) + good[1:], 0x0800, 0) is None  # IHL 0


def test_a_window_of_samples_that_opened_nothing_has_no_connections_and_tenants_count_connections() -> None:
    import polars as pl

    from smtpguard.detectors.features import close_windows, connection_weights

    client, server = bytes([10, 0, 0, 5]), bytes([198, 51, 100, 7])
    data = _session(client, server, 40000, 3)[1:]  # three data packets, no SYN
    batch = SflowDecoder((25,)).decode_many([Datagram(_datagram([_flow_sample(1, p) for p in data]), "a",
                                                      1_764_583_210_000)])

    rows = pl.from_arrow(batch.records).with_columns(connection_weights(batch.records), tenant=pl.lit("acct"),
                                                     window_start=pl.lit(1_764_583_200_000, pl.Int64),
                                                     src_addr=pl.lit(None, pl.String))
    closed = close_windows(rows, 60_000)
    f = closed.features.row(0, named=True)
    assert (f["connections"], f["packets"], f["bytes_per_conn"], f["top_dst_share"]) == (0, 3, 0.0, 0.0)
    assert closed.tenant_rows["conns"].to_list() == [0]  # three packets of one session opened no connection here
