"""NetFlow v5/v9 and IPFIX: the shared samples against their expected decodes (beats
goldens, logstash and akvorado test values), state (templates, options, pending data),
bounds against template bombs, the pcap/dat/UDP shells, and property tests that no
input makes the decoder raise."""

from __future__ import annotations

import datetime as dt
import io
import json
import socket
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpguard.core import record
from smtpguard.core.errors import ConfigError
from smtpguard.ingest.base import Batch, Datagram, concat
from smtpguard.ingest.netflow import (NetflowDatParser, NetflowDecoder, NetflowPcapParser, sniff, sniff_dat, sniff_pcap,
                                      split_packets)
from smtpguard.ingest.pcapfile import iter_frames, udp_of
from smtpguard.ingest.netflow_listen import listen_udp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NF = DATA / "netflow"
DAT = NF / "logstash-codec-netflow"
AKV = NF / "akvorado"
GOLDEN = NF / "beats-golden"
EXPORTER = "192.0.2.1:4444"  # what beats' test harness shows as the exporter


# ------------------------------------------------------------------ helpers


def check(b: Batch) -> Batch:
    """Every batch: the record schema, and every unit of input accounted for once."""
    assert b.records.schema == record.SCHEMA
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects)
    for r in b.rejects:
        assert r.reason and not r.reason.startswith("internal error"), r.reason
        assert r.location
    return b


def run(parser, paths: list[Path], close: bool = True) -> Batch:
    batches = []
    for p in paths:
        with open(p, "rb") as fh:
            batches.extend(check(b) for b in parser.parse_stream(fh, p.name))
    if close:
        batches.append(check(parser.close()))
    return concat(batches)


def dat(*names: str, smtp_ports=None, **kw) -> tuple[Batch, NetflowDatParser]:
    parser = NetflowDatParser("test", smtp_ports, exporter=EXPORTER, **kw)
    return run(parser, [DAT / n for n in names]), parser


def pcap(*names: str, smtp_ports=None) -> tuple[Batch, NetflowPcapParser]:
    parser = NetflowPcapParser("test", smtp_ports)
    return run(parser, [AKV / n for n in names]), parser


def rows(b: Batch) -> list[dict]:
    return b.records.to_pylist()


def ms(ts) -> int:
    """Epoch ms of an ISO 8601 string (beats writes "…46.14Z") or an aware datetime."""
    if isinstance(ts, str):
        ts = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return round(ts.timestamp() * 1000)


def flow_tuple(r: dict) -> tuple:
    return (r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"], r["protocol"], r["packets"], r["bytes"])


def golden(name: str) -> list[dict]:
    return json.loads((GOLDEN / name).read_text()).get("events", [])


def golden_flow(nf: dict) -> tuple:
    return (nf.get("source_ipv4_address") or nf["source_ipv6_address"], nf["source_transport_port"],
            nf.get("destination_ipv4_address") or nf["destination_ipv6_address"], nf["destination_transport_port"],
            nf["protocol_identifier"], nf["packet_delta_count"], nf["octet_delta_count"])


def payloads_of(path: Path) -> list[bytes]:
    if path.suffix == ".pcap":
        with open(path, "rb") as fh:
            return [u.payload for fr in iter_frames(fh) if (u := udp_of(fr.data, fr.linktype)) is not None]
    with open(path, "rb") as fh:
        return [p for _, p in split_packets(fh)]


# ------------------------------------------------------- packet encoders (tests only)


def pack_record(fields: list[tuple], values: dict) -> bytes:
    """One data record: ``fields`` as (element, length[, pen]), values by element (or
    (pen, element)); a length of 65535 takes ``values`` bytes with an IPFIX length prefix."""
    out = b""
    for f in fields:
        ie, n = f[0], f[1]
        key = (f[2], ie) if len(f) > 2 else ie
        v = values.get(key, 0)
        if n == 65535:
            v = bytes(v) if v else b""
            out += (bytes([len(v)]) if len(v) < 255 else b"\xff" + struct.pack(">H", len(v))) + v
        elif isinstance(v, (bytes, bytearray)):
            out += bytes(v).rjust(n, b"\0")
        elif isinstance(v, str):
            import ipaddress
            out += ipaddress.ip_address(v).packed
        else:
            out += int(v).to_bytes(n, "big")
    return out


def v9_packet(*flowsets: bytes, uptime: int = 100_000, secs: int = 1_700_000_000, source_id: int = 0) -> bytes:
    return struct.pack(">HHIIII", 9, len(flowsets), uptime, secs, 1, source_id) + b"".join(flowsets)


def v9_flowset(fid: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack(">HH", fid, len(body) + 4) + body


def v9_template(tid: int, fields: list[tuple]) -> bytes:
    return v9_flowset(0, struct.pack(">HH", tid, len(fields)) + b"".join(struct.pack(">HH", f[0], f[1]) for f in fields))


def v9_options_template(tid: int, scope: list[tuple], opts: list[tuple]) -> bytes:
    body = struct.pack(">HHH", tid, 4 * len(scope), 4 * len(opts))
    body += b"".join(struct.pack(">HH", *f) for f in scope + opts)
    return v9_flowset(1, body)


def ipfix_message(*sets: bytes, export: int = 1_700_000_000, domain: int = 0) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), export, 7, domain) + body


def ipfix_set(sid: int, body: bytes) -> bytes:
    return struct.pack(">HH", sid, len(body) + 4) + body


def ipfix_field(f: tuple) -> bytes:
    if len(f) > 2 and f[2]:
        return struct.pack(">HHI", f[0] | 0x8000, f[1], f[2])
    return struct.pack(">HH", f[0], f[1])


def ipfix_template(tid: int, fields: list[tuple]) -> bytes:
    return ipfix_set(2, struct.pack(">HH", tid, len(fields)) + b"".join(ipfix_field(f) for f in fields))


def ipfix_options_template(tid: int, scope: list[tuple], opts: list[tuple]) -> bytes:
    return ipfix_set(3, struct.pack(">HHH", tid, len(scope) + len(opts), len(scope))
                     + b"".join(ipfix_field(f) for f in scope + opts))


def v5_packet(recs: list[dict], *, uptime: int = 100_000, secs: int = 1_700_000_000, nsecs: int = 0,
              sampling: int = 0) -> bytes:
    out = struct.pack(">HHIIIIBBH", 5, len(recs), uptime, secs, nsecs, 0, 0, 0, sampling)
    for r in recs:
        out += pack_record(V5_FIELDS, r)
    return out


V5_FIELDS = [(8, 4), (12, 4), (15, 4), (10, 2), (14, 2), (2, 4), (1, 4), (22, 4), (21, 4), (7, 2), (11, 2),
             (210, 1), (6, 1), (4, 1), (5, 1), (16, 2), (17, 2), (9, 1), (13, 1), (210, 2)]
#: a typical v9/IPFIX IPv4 flow template
FLOW4 = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (2, 4), (1, 4), (22, 4), (21, 4), (10, 4)]


def smtp_rec(src="10.0.0.5", dst="198.51.100.7", sport=40000, dport=25, pkts=10, nbytes=1000,
             extra: dict | None = None) -> dict:
    """A client-to-server SMTP flow record, by element id; ``extra`` adds or overrides elements."""
    return {8: src, 12: dst, 7: sport, 11: dport, 4: 6, 6: 0x1B, 2: pkts, 1: nbytes, 22: 90_000, 21: 95_000,
            10: 3, **(extra or {})}


# ======================================================= golden: the beats samples


def test_netflow9_valid01_matches_beats_golden() -> None:
    b, parser = dat("netflow9_test_valid01.dat")
    want = golden("Netflow-9-valid-01.golden.json")
    got = rows(b)
    assert [flow_tuple(r) for r in got] == [golden_flow(e["Fields"]["netflow"]) for e in want]
    for r, e in zip(got, want):
        nf = e["Fields"]["netflow"]
        assert r["tcp_flags"] == nf["tcp_control_bits"]
        assert ms(r["start"]) == ms(e["Fields"]["event"]["start"])
        assert ms(r["end"]) == ms(e["Fields"]["event"]["end"])
        assert r["source_format"] == "netflow-v9" and r["exporter"] == EXPORTER
        assert r["action"] == "unknown" and r["tenant"] == "" and r["sampling_rate"] == 1
    assert got[-1]["src_ip"] == "fe80::20c:29ff:fe83:3b6e" and got[-1]["dst_ip"] == "ff02::1"
    c = parser.decoder.counters[EXPORTER]
    assert (c.packets, c.records, c.templates, c.template_misses, c.decode_errors) == (1, 7, 2, 0, 0)


def test_ipfix_matches_beats_golden_with_options_and_system_init_time() -> None:
    b, parser = dat("ipfix.dat")
    events = golden("IPFIX.golden.json")
    options = [e for e in events if e["Fields"]["netflow"]["type"] == "netflow_options"]
    flows = [e["Fields"]["netflow"] for e in events if e["Fields"]["netflow"]["type"] == "netflow_flow"]
    assert len(options) == 1 and len(flows) == 12
    got = rows(b)
    assert [flow_tuple(r) for r in got] == [golden_flow(nf) for nf in flows]
    # flow times are sysUpTime-relative; the options record gives the exporter's init time
    init = ms(options[0]["Fields"]["netflow"]["options"]["system_init_time_milliseconds"])
    for r, nf in zip(got, flows):
        assert r["tcp_flags"] == nf["tcp_control_bits"]
        assert ms(r["start"]) == init + nf["flow_start_sys_up_time"]
        assert ms(r["end"]) == init + nf["flow_end_sys_up_time"]
        assert r["source_format"] == "ipfix"
        # samplingPacketInterval 1, samplingPacketSpace 0: unsampled
        assert r["sampling_rate"] == 1
    assert b.skipped == 1  # the options record
    assert parser.decoder.counters[EXPORTER].options_records == 1


def test_fortigate_template_then_data_files_share_one_session() -> None:
    b, parser = dat("netflow9_test_fortigate_fortios_521_tpl.dat", "netflow9_test_fortigate_fortios_521_data256.dat",
                    "netflow9_test_fortigate_fortios_521_data257.dat")
    events = golden("Netflow-9-Fortigate-FortiOS-5.2.1.golden.json")
    flows = [e for e in events if e["Fields"]["netflow"]["type"] == "netflow_flow"]
    assert len(flows) == 1 and b.records.num_rows == 1
    (r,) = rows(b)
    nf = flows[0]["Fields"]["netflow"]
    assert flow_tuple(r) == golden_flow(nf) == ("192.168.99.7", 61910, "31.13.87.36", 443, 6, 3, 152)
    assert r["tcp_flags"] is None  # the template has no tcp flags field
    # FortiOS 5.2.1 sends switch times ~7 days ahead of its own sysUptime: the flow is
    # placed at the export time (beats' Timestamp), keeping its 9 s duration
    assert ms(r["end"]) == ms(flows[0]["Timestamp"])
    assert ms(r["end"]) - ms(r["start"]) == nf["flow_end_sys_up_time"] - nf["flow_start_sys_up_time"]
    assert r["interface_id"] == str(nf["ingress_interface"])
    c = parser.decoder.counters[EXPORTER]
    assert (c.options_records, c.records, c.template_misses) == (1, 1, 0)


def test_netscaler_data_without_templates_gives_no_flows_and_counts_the_misses() -> None:
    assert golden("IPFIX-Netscaler-with-variable-length-fields-missing-templates.golden.json") == []
    parser = NetflowDatParser("test", None, exporter=EXPORTER)
    with open(DAT / "ipfix_test_netscaler_data.dat", "rb") as fh:
        b = concat(check(x) for x in parser.parse_stream(fh, "data"))
    assert b.records.num_rows == 0 and not b.rejects
    assert parser.decoder.pending_sets == 4  # buffered, not guessed
    last = check(parser.close())
    assert last.records.num_rows == 0 and len(last.rejects) == 4
    assert all("template miss" in r.reason for r in last.rejects)
    assert {r.reason.split("template ")[2].split(" ")[0] for r in last.rejects} == {"258", "257", "280"}
    c = parser.decoder.counters[EXPORTER]
    assert (c.template_misses, c.pending, c.records) == (4, 0, 0)


def test_netscaler_templates_first_decodes_variable_length_records() -> None:
    b, parser = dat("ipfix_test_netscaler_tpl.dat", "ipfix_test_netscaler_data.dat")
    got = rows(b)
    # sets 258 (variable length) and 257 (fixed) decode; 280 has no template in _tpl.dat
    assert len(got) == 3
    assert [flow_tuple(r) for r in got] == [
        ("192.168.0.1", 51053, "10.0.0.1", 443, 6, 1, 40),
        ("10.0.0.1", 443, "192.168.0.1", 51053, 6, 2, 1525),
        ("192.168.0.1", 51053, "10.0.0.1", 443, 6, 2, 1541),
    ]
    # the fixed-length record of set 257, read by hand: bytes at its template's offsets
    data = (DAT / "ipfix_test_netscaler_data.dat").read_bytes()
    at = data.index(struct.pack(">HH", 257, 126)) + 4
    # 138/4 144/4 148/8 129/4 133/4 60/1 4/1 210/2, then 8/4 12/4 7/2 11/2 2/8 1/8
    src, dst = data[at + 28:at + 32], data[at + 32:at + 36]
    pkts, nbytes = struct.unpack_from(">QQ", data, at + 40)
    assert (".".join(map(str, src)), ".".join(map(str, dst)), pkts, nbytes) == ("10.0.0.1", "192.168.0.1", 2, 1525)
    # flowStartMicroseconds is an NTP timestamp: 2016-11-11, the export day
    assert all(r["start"].date() == dt.date(2016, 11, 11) for r in got)
    c = parser.decoder.counters[EXPORTER]
    assert (c.template_misses, c.decode_errors) == (1, 0)


def test_data_before_template_across_files_is_decoded_when_the_template_comes() -> None:
    b, parser = dat("ipfix_test_netscaler_data.dat", "ipfix_test_netscaler_tpl.dat")
    assert b.records.num_rows == 3
    assert parser.decoder.counters[EXPORTER].template_misses == 1  # template 280 never came


# ================================================== golden: the logstash v5 samples


def test_netflow5_dat_walks_all_twelve_packets() -> None:
    b, parser = dat("netflow5.dat")
    got = rows(b)
    # 12 packets of 2, 4, 4, 4 and 8 x 2 records
    assert len(got) == 30 and parser.decoder.counters[EXPORTER].packets == 12
    # the logstash spec's two events of the first packet
    assert flow_tuple(got[0]) == ("10.0.2.2", 54435, "10.0.2.15", 22, 6, 5, 230) and got[0]["tcp_flags"] == 16
    assert flow_tuple(got[1]) == ("10.0.2.15", 22, "10.0.2.2", 54435, 6, 4, 304) and got[1]["tcp_flags"] == 24
    # first_switched 0xFFFFFFFF with sysUptime 3381: one millisecond before boot, not 49.7 days later
    export = 1430591888 * 1000 + 280
    assert ms(got[0]["start"]) == export - 3382 and ms(got[0]["end"]) == export - (3381 - 2577)
    assert all(r["start"] <= r["end"] for r in got)
    assert {r["source_format"] for r in got} == {"netflow-v5"}


def test_netflow5_microtik() -> None:
    b, _ = dat("netflow5_test_microtik.dat")
    got = rows(b)
    assert len(got) == 30
    r = got[0]
    assert flow_tuple(r) == ("10.0.13.1", 5228, "192.168.0.98", 52734, 6, 2, 104)
    assert ms(r["start"]) == 1469109117 * 1000 + 514 - (27361640 - 27346270)
    assert r["interface_id"] == "13" and r["tcp_flags"] == 16


def test_netflow5_invalid_count_is_rejected_not_decoded() -> None:
    b, parser = dat("netflow5_test_invalid01.dat")
    assert b.records.num_rows == 0 and len(b.rejects) == 1
    (r,) = b.rejects
    assert "55582" in r.reason and "room for 30" in r.reason
    assert r.location == "byte 0" and r.format == "netflow-v5" and r.raw.startswith("0005d91e")
    assert parser.decoder.counters[EXPORTER].decode_errors == 1


# ============================================================ golden: akvorado pcaps


def test_akvorado_nfv5() -> None:
    b, parser = pcap("nfv5.pcap")
    got = rows(b)
    assert len(got) == 29
    r = got[0]
    assert flow_tuple(r) == ("161.202.212.212", 30104, "202.152.70.24", 11963, 6, 1, 133)
    assert r["tcp_flags"] == 0x18 and r["interface_id"] == "117"
    # header 1680626679 s; sysUptime 2874339000 and first_switched 2874324000 ms
    assert ms(r["start"]) == 1680626679_000 - 15_000
    assert r["exporter"] == "10.19.144.41:40000"


def test_akvorado_options_then_template_then_data() -> None:
    parser = NetflowPcapParser("test", None)
    firsts = [run(parser, [AKV / n], close=False) for n in ("options-template.pcap", "options-data.pcap",
                                                             "template.pcap")]
    assert [x.records.num_rows for x in firsts] == [0, 0, 0]
    assert firsts[1].skipped == 4  # 4 options data records
    b = run(parser, [AKV / "data.pcap"])
    got = rows(b)
    assert [(r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"], r["protocol"], r["bytes"], r["packets"])
            for r in got] == [
        ("198.38.121.178", 443, "91.170.143.87", 19624, 6, 1500, 1),
        ("198.38.121.219", 443, "88.122.57.97", 2444, 6, 1500, 1),
        ("173.194.190.106", 443, "37.165.129.20", 53697, 6, 1400, 1),
        ("74.125.100.234", 443, "88.120.219.117", 52300, 6, 1448, 1),
    ]
    # the records name sampler 1; the options data gave sampler 1 a rate of 30000
    assert {r["sampling_rate"] for r in got} == {30000}
    # forwardingStatus 64 = forwarded: NetFlow has no firewall verdict
    assert {r["action"] for r in got} == {"unknown"}


def test_akvorado_data_before_template_in_one_packet_waits_for_it() -> None:
    b, parser = pcap("data+templates.pcap")
    # sets: data(257) x11, options template, options data (rate 100), template 257, data(257) x10.
    # The first data set waits in the buffer and is decoded once template 257 arrives.
    assert b.records.num_rows == 21 and b.skipped == 1 and not b.rejects
    got = rows(b)
    assert flow_tuple(got[0]) == ("120.120.28.238", 63308, "120.120.244.112", 31424, 17, 1, 48)
    assert {r["sampling_rate"] for r in got} == {100}
    c = parser.decoder.counters["102.102.144.1:14338"]
    assert (c.records, c.options_records, c.template_misses, c.pending) == (21, 1, 0, 0)


def test_akvorado_sampling_rate_in_data_records() -> None:
    b, _ = pcap("samplingrate-template.pcap", "samplingrate-data.pcap")
    got = rows(b)
    assert len(got) == 6
    r = got[0]
    assert flow_tuple(r) == ("232.131.215.65", 13245, "142.183.180.65", 10907, 6, 1, 160)
    assert r["sampling_rate"] == 2048 and r["interface_id"] == "13"
    assert {x["sampling_rate"] for x in got} == {2048}


def test_akvorado_ipfixprobe_biflows_give_unidirectional_flows() -> None:
    b, _ = pcap("ipfixprobe-templates.pcap", "ipfixprobe-data.pcap")
    got = rows(b)
    assert [flow_tuple(r) for r in got] == [
        ("10.10.1.4", 56166, "10.10.1.1", 53, 17, 1, 62),
        ("10.10.1.1", 53, "10.10.1.4", 56166, 17, 1, 128),
        ("10.10.1.20", 138, "10.10.1.255", 138, 17, 1, 229),  # no reverse packets: no reverse half
        ("10.10.1.4", 1470, "74.53.140.153", 25, 6, 28, 21673),
        ("74.53.140.153", 25, "10.10.1.4", 1470, 6, 25, 1546),
        ("192.168.1.1", 0, "10.10.1.4", 0, 1, 4, 2304),
    ]
    assert got[3]["tcp_flags"] == 0x1B
    # direct halves came in on ifIndex 10, reverse halves leave by it
    assert [r["interface_id"] for r in got] == ["10", "", "10", "10", "", "10"]
    # the same SMTP session as zeek's smtp.pcap: 2009-10-05
    assert got[3]["start"].date() == dt.date(2009, 10, 5) and got[3]["start"] < got[3]["end"]


def test_ipfixprobe_smtp_selection_attributes_the_reverse_half() -> None:
    b, _ = pcap("ipfixprobe-templates.pcap", "ipfixprobe-data.pcap", smtp_ports=[25, 465, 587, 2525])
    (r,) = rows(b)
    assert flow_tuple(r) == ("10.10.1.4", 1470, "74.53.140.153", 25, 6, 28, 21673)
    assert (r["rev_packets"], r["rev_bytes"]) == (25, 1546)
    assert b.skipped == 5 and b.read == 6


# ===================================================================== state


def test_v9_uptime_wrap() -> None:
    """sysUptime wrapped 1 s ago; the flow started 4 s before the wrap."""
    pkt = v9_packet(v9_template(300, FLOW4),
                    v9_flowset(300, pack_record(FLOW4, smtp_rec(extra={22: 2**32 - 4000, 21: 500}))),
                    uptime=1000, secs=1_700_000_000)
    (r,) = rows(check(NetflowDecoder(None).decode(pkt, "e:1")))
    assert ms(r["start"]) == 1_700_000_000_000 - 5000
    assert ms(r["end"]) == 1_700_000_000_000 - 500


def test_v5_uptime_wrap_and_header_sampling() -> None:
    pkt = v5_packet([smtp_rec(extra={22: 2**32 - 100, 21: 50})], uptime=200, secs=1_700_000_000, nsecs=250_000_000,
                    sampling=(1 << 14) | 512)
    (r,) = rows(check(NetflowDecoder(None).decode(pkt, "e:1")))
    assert ms(r["start"]) == 1_700_000_000_250 - 300 and ms(r["end"]) == 1_700_000_000_250 - 150
    assert r["sampling_rate"] == 512 and r["source_format"] == "netflow-v5"


def test_templates_are_per_exporter_and_domain() -> None:
    """One template id, three layouts: two exporters, and two domains of one exporter."""
    dec = NetflowDecoder(None)
    a = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (2, 4), (1, 4)]
    b_ = [(12, 4), (8, 4), (11, 2), (7, 2), (4, 1), (1, 4), (2, 4)]
    rec = {8: "10.0.0.1", 12: "10.0.0.2", 7: 1000, 11: 25, 4: 6, 2: 3, 1: 300}
    dec.decode(ipfix_message(ipfix_template(400, a), domain=1), "x:1")
    dec.decode(ipfix_message(ipfix_template(400, b_), domain=2), "x:1")
    dec.decode(ipfix_message(ipfix_template(400, b_), domain=1), "y:1")
    out = [rows(check(dec.decode(ipfix_message(ipfix_set(400, pack_record(t, rec)), domain=d), e)))[0]
           for t, d, e in ((a, 1, "x:1"), (b_, 2, "x:1"), (b_, 1, "y:1"))]
    assert all(flow_tuple(r) == ("10.0.0.1", 1000, "10.0.0.2", 25, 6, 3, 300) for r in out)
    # 32-bit observation domain ids
    dec.decode(ipfix_message(ipfix_template(400, a), domain=0xFFFFFFFF), "x:1")
    (r,) = rows(dec.decode(ipfix_message(ipfix_set(400, pack_record(a, rec)), domain=0xFFFFFFFF), "x:1"))
    assert r["dst_port"] == 25


def test_variable_length_and_enterprise_fields_do_not_shift_the_rest() -> None:
    fields = [(8, 4), (100, 65535, 9999), (12, 4), (82, 65535), (7, 2), (200, 7, 32473), (11, 2), (4, 1),
              (2, 8), (1, 8)]
    recs = [
        {8: "10.1.1.1", (9999, 100): b"x" * 3, 12: "10.2.2.2", 82: b"eth0", 7: 5000, 11: 25, 4: 6, 2: 2, 1: 120},
        {8: "10.1.1.3", (9999, 100): b"y" * 300, 12: "10.2.2.4", 82: b"", 7: 5001, 11: 587, 4: 6, 2: 4, 1: 240},
    ]
    body = b"".join(pack_record(fields, r) for r in recs) + b"\0\0\0"  # set padding
    dec = NetflowDecoder(None)
    got = rows(check(dec.decode(ipfix_message(ipfix_template(500, fields), ipfix_set(500, body)), "e:1")))
    assert [flow_tuple(r) for r in got] == [("10.1.1.1", 5000, "10.2.2.2", 25, 6, 2, 120),
                                            ("10.1.1.3", 5001, "10.2.2.4", 587, 6, 4, 240)]


def test_variable_length_field_running_past_the_set_is_rejected_keeping_earlier_records() -> None:
    fields = [(8, 4), (12, 4), (82, 65535), (11, 2)]
    good = pack_record(fields, {8: "10.0.0.1", 12: "10.0.0.2", 82: b"ab", 11: 25})
    bad = pack_record(fields, {8: "10.0.0.1", 12: "10.0.0.2"})[:8] + b"\xff\xff\xff" + b"z" * 10
    b = check(NetflowDecoder(None).decode(ipfix_message(ipfix_template(501, fields), ipfix_set(501, good + bad)),
                                          "e:1"))
    assert b.records.num_rows == 1 and len(b.rejects) == 1
    assert "runs past the end of the set" in b.rejects[0].reason


def test_ipv6_and_mixed_template() -> None:
    fields = [(8, 4), (12, 4), (27, 16), (28, 16), (7, 2), (11, 2), (4, 1), (2, 4), (1, 4)]
    r4 = {8: "192.0.2.10", 12: "198.51.100.25", 7: 1, 11: 25, 4: 6, 2: 1, 1: 40}
    r6 = {27: "2001:0db8:0000:0000:0000:0000:0000:0001", 28: "2001:db8::ff:0:25", 7: 2, 11: 25, 4: 6, 2: 1, 1: 60}
    body = pack_record(fields, r4) + pack_record(fields, r6)
    got = rows(check(NetflowDecoder(None).decode(
        v9_packet(v9_template(600, fields), v9_flowset(600, body)), "[2001:db8::9]:2055")))
    assert [(r["src_ip"], r["dst_ip"]) for r in got] == [("192.0.2.10", "198.51.100.25"),
                                                        ("2001:db8::1", "2001:db8::ff:0:25")]
    assert got[0]["exporter"] == "[2001:db8::9]:2055"


def test_options_sampling_per_sampler_and_exporter_wide() -> None:
    dec = NetflowDecoder(None)
    fields = FLOW4 + [(48, 1)]
    opts = v9_options_template(700, [(1, 4)], [(48, 1), (34, 4)])
    odata = v9_flowset(700, pack_record([(1, 4), (48, 1), (34, 4)], {48: 1, 34: 100})
                       + pack_record([(1, 4), (48, 1), (34, 4)], {48: 2, 34: 1000}))
    dec.decode(v9_packet(opts, odata, v9_template(701, fields)), "e:1")
    data = b"".join(pack_record(fields, smtp_rec(extra={48: s})) for s in (1, 2, 3))
    got = rows(check(dec.decode(v9_packet(v9_flowset(701, data)), "e:1")))
    assert [r["sampling_rate"] for r in got] == [100, 1000, 1]  # sampler 3 is unknown
    # an options record without sampler id sets the exporter-wide rate
    dec.decode(v9_packet(v9_options_template(702, [(1, 4)], [(34, 4)]),
                         v9_flowset(702, pack_record([(1, 4), (34, 4)], {34: 64}))), "e:1")
    got = rows(check(dec.decode(v9_packet(v9_flowset(701, data)), "e:1")))
    assert [r["sampling_rate"] for r in got] == [100, 1000, 64]
    # sampling is per exporter
    dec.decode(v9_packet(v9_template(701, fields)), "other:1")
    got = rows(dec.decode(v9_packet(v9_flowset(701, data)), "other:1"))
    assert [r["sampling_rate"] for r in got] == [1, 1, 1]


def test_forwarding_status_dropped_and_firewall_denied_are_rejects() -> None:
    fields = FLOW4 + [(89, 1), (233, 1)]
    recs = [smtp_rec(extra={89: 0x40}), smtp_rec(extra={89: 0x80 | 3}), smtp_rec(extra={233: 3}), smtp_rec(extra={233: 1})]
    got = rows(check(NetflowDecoder(None).decode(
        ipfix_message(ipfix_template(800, fields), ipfix_set(800, b"".join(pack_record(fields, r) for r in recs))),
        "e:1")))
    assert [r["action"] for r in got] == ["unknown", "reject", "reject", "unknown"]


def test_absolute_time_fields() -> None:
    fields = [(8, 4), (12, 4), (11, 2), (152, 8), (153, 8)]
    recs = [{8: "10.0.0.1", 12: "10.0.0.2", 11: 25, 152: 1_700_000_000_123, 153: 1_700_000_001_456},
            {8: "10.0.0.1", 12: "10.0.0.2", 11: 25, 152: 1_700_000_002_000, 153: 1_700_000_001_000},
            {8: "10.0.0.1", 12: "10.0.0.2", 11: 25, 152: 2**63, 153: 2**63}]
    b = check(NetflowDecoder(None).decode(
        ipfix_message(ipfix_template(900, fields), ipfix_set(900, b"".join(pack_record(fields, r) for r in recs))),
        "e:1"))
    (r,) = rows(b)
    assert (ms(r["start"]), ms(r["end"])) == (1_700_000_000_123, 1_700_000_001_456)
    assert [x.reason for x in b.rejects] == ["flow ends before it starts",
                                             "flow start or end time is outside 1970..9999"]
    assert all(x.location.endswith(("record 2", "record 3")) for x in b.rejects)


def test_pending_data_times_out_or_is_bounded_and_counts_misses() -> None:
    data = ipfix_message(ipfix_set(1000, pack_record(FLOW4, smtp_rec())))
    tpl = ipfix_message(ipfix_template(1000, FLOW4))
    dec = NetflowDecoder(None, pending_timeout_s=10)
    assert check(dec.decode(data, "e:1", received_ms=1_000)).read == 0
    assert dec.counters["e:1"].pending == 1
    late = check(dec.decode(tpl, "e:1", received_ms=12_000))  # the data waited 11 s > 10 s
    assert late.records.num_rows == 0 and "no template within 10 s" in late.rejects[0].reason
    assert dec.counters["e:1"].template_misses == 1
    # in time: decoded when the template comes
    dec2 = NetflowDecoder(None, pending_timeout_s=10)
    dec2.decode(data, "e:1", received_ms=1_000)
    assert check(dec2.decode(tpl, "e:1", received_ms=5_000)).records.num_rows == 1
    # bounded: the oldest is dropped for the newest
    dec3 = NetflowDecoder(None, pending_limit=2)
    dropped = concat(check(dec3.decode(data, "e:1", received_ms=1)) for _ in range(5))
    assert len(dropped.rejects) == 3 and "buffer" in dropped.rejects[0].reason
    assert dec3.pending_sets == 2 and dec3.counters["e:1"].template_misses == 3
    assert check(dec3.decode(tpl, "e:1", received_ms=2)).records.num_rows == 2


def test_expire_without_traffic() -> None:
    dec = NetflowDecoder(None, pending_timeout_s=1)
    dec.decode(ipfix_message(ipfix_set(1000, pack_record(FLOW4, smtp_rec()))), "e:1", received_ms=1_000)
    assert check(dec.expire(1_500)).read == 0
    assert len(check(dec.expire(2_500)).rejects) == 1 and dec.pending_sets == 0


def test_template_withdrawal() -> None:
    dec = NetflowDecoder(None)
    dec.decode(ipfix_message(ipfix_template(1100, FLOW4)), "e:1")
    dec.decode(ipfix_message(ipfix_set(2, struct.pack(">HH", 1100, 0))), "e:1")
    assert check(dec.decode(ipfix_message(ipfix_set(1100, pack_record(FLOW4, smtp_rec()))), "e:1")).read == 0
    assert dec.pending_sets == 1


def test_smtp_selection_pairs_reverse_flows_in_the_batch() -> None:
    fwd = smtp_rec()
    rev = smtp_rec(src="198.51.100.7", dst="10.0.0.5", sport=25, dport=40000, pkts=7, nbytes=700)
    lone_rev = smtp_rec(src="198.51.100.8", dst="10.0.0.6", sport=25, dport=40001)
    web = smtp_rec(dport=443)
    body = b"".join(pack_record(FLOW4, r) for r in (fwd, rev, lone_rev, web))
    pkt = v9_packet(v9_template(1200, FLOW4), v9_flowset(1200, body))
    b = check(NetflowDecoder([25, 587]).decode(pkt, "e:1"))
    (r,) = rows(b)
    assert (r["src_ip"], r["dst_port"], r["rev_packets"], r["rev_bytes"]) == ("10.0.0.5", 25, 7, 700)
    assert b.skipped == 3
    # the same reverse flow from another exporter is another observation
    dec = NetflowDecoder([25])
    other = v9_packet(v9_template(1200, FLOW4), v9_flowset(1200, pack_record(FLOW4, rev)))
    b2 = check(dec.decode_many([Datagram(v9_packet(v9_template(1200, FLOW4), v9_flowset(1200, pack_record(FLOW4, fwd))),
                                         "a:1"), Datagram(other, "b:1")]))
    assert rows(b2)[0]["rev_packets"] == 0
    # no SMTP selection: every flow is kept
    assert check(NetflowDecoder(None).decode(pkt, "e:1")).records.num_rows == 4


def test_bad_smtp_ports_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        NetflowDecoder([70000])
    with pytest.raises(ConfigError):
        NetflowDecoder([])
    with pytest.raises(ConfigError):
        NetflowDecoder(None, pending_limit=0)


# ============================================================= malformed input


@pytest.mark.parametrize("payload, reason", [
    (b"", "holds no NetFlow header"),
    (b"\x00\x07" + b"\0" * 30, "unknown NetFlow version 7"),
    (b"\x00\x09" + b"\0" * 8, "shorter than its 20-byte header"),
    (b"\x00\x0a\x00\x40" + b"\0" * 12, "truncated IPFIX message"),
    (ipfix_message(struct.pack(">HH", 2, 2)), "less than its own 4-byte header"),
    (ipfix_message(struct.pack(">HH", 256, 400) + b"\0" * 8), "claims 400 bytes"),
    (v9_packet(struct.pack(">HH", 0, 1)), "less than its own 4-byte header"),
    (ipfix_message(ipfix_template(300, FLOW4)) + b"junk", "4 bytes after the end of the IPFIX message"),
    (v5_packet([smtp_rec()])[:60], "room for 0"),
])
def test_truncated_and_malformed_datagrams_are_rejected(payload: bytes, reason: str) -> None:
    dec = NetflowDecoder(None)
    b = check(dec.decode(payload, "e:1"))
    assert any(reason in r.reason for r in b.rejects), [r.reason for r in b.rejects]
    assert dec.counters["e:1"].decode_errors == len(b.rejects) >= 1


@pytest.mark.parametrize("template, reason", [
    (ipfix_set(2, struct.pack(">HH", 1300, 60000) + b"\0\x08\0\x04" * 10), "60000 fields (limit 512)"),
    (ipfix_set(2, struct.pack(">HH", 1300, 3) + b"\0\x08\0\x04" * 2), "runs past the end of the set"),
    (ipfix_set(2, struct.pack(">HH", 1300, 2) + b"\0\x08\0\x04\0\x0c\0\x00"), "has length 0"),
    (ipfix_set(2, struct.pack(">HH", 100, 1) + b"\0\x08\0\x04"), "reserved"),
    (ipfix_set(3, struct.pack(">HHH", 1300, 2, 3) + b"\0\x08\0\x04" * 2), "scope field count 3"),
    (ipfix_set(2, struct.pack(">HH", 1300, 3) + b"\0\x08\xff\xf0" * 3), "cannot fit in a message"),
])
def test_template_bombs_are_rejected(template: bytes, reason: str) -> None:
    dec = NetflowDecoder(None)
    b = check(dec.decode(ipfix_message(template), "e:1"))
    assert len(b.rejects) == 1 and reason in b.rejects[0].reason, b.rejects
    assert dec.counters["e:1"].templates == 0


def test_v9_zero_length_field_is_refused_outside_options_scope() -> None:
    b = check(NetflowDecoder(None).decode(v9_packet(v9_template(1300, [(8, 4), (12, 0)])), "e:1"))
    assert "has length 0" in b.rejects[0].reason


def test_thousands_of_templates_are_bounded_per_exporter() -> None:
    dec = NetflowDecoder(None, max_templates_per_exporter=100)
    sets = [ipfix_template(256 + i, FLOW4) for i in range(3000)]
    msgs = [ipfix_message(*sets[i:i + 50]) for i in range(0, 3000, 50)]
    b = check(dec.decode_many(Datagram(m, "bomb:1") for m in msgs))
    c = dec.counters["bomb:1"]
    assert c.templates_refused == 2900 and len(b.rejects) == 2900
    assert "limit 100" in b.rejects[0].reason
    # refreshing a known template is still accepted
    assert check(dec.decode(ipfix_message(ipfix_template(256, FLOW4)), "bomb:1")).rejects == []
    # and other exporters are not affected
    assert check(dec.decode(ipfix_message(ipfix_template(5000, FLOW4)), "good:1")).rejects == []


def test_exporters_are_bounded() -> None:
    dec = NetflowDecoder(None, max_exporters=2)
    for e in ("a:1", "b:1", "c:1"):
        dec.decode(ipfix_message(ipfix_template(256, FLOW4)), e)
    assert set(dec.counters) == {"b:1", "c:1", "(forgotten exporters)"}
    assert dec.totals().packets == 3
    # forgotten templates: a's data waits again
    dec.decode(ipfix_message(ipfix_set(256, pack_record(FLOW4, smtp_rec()))), "a:1")
    assert dec.pending_sets == 1


# ===================================================================== shells


def _pcap_bytes(frames: list[bytes], snap: int = 65535, cut: dict[int, int] | None = None) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snap, 1)
    for i, f in enumerate(frames):
        orig = len(f)
        f = f[:cut[i]] if cut and i in cut else f
        out += struct.pack("<IIII", 1_700_000_000 + i, 500_000, len(f), orig) + f
    return out


def _udp_frame(payload: bytes, src: str = "192.0.2.9", sport: int = 2055, vlan: bool = False,
               v6: bool = False) -> bytes:
    import ipaddress
    udp = struct.pack(">HHHH", sport, 2055, 8 + len(payload), 0) + payload
    if v6:
        ip = struct.pack(">IHBB", 6 << 28, len(udp), 17, 64) + ipaddress.ip_address(src).packed + b"\0" * 15 + b"\1"
        etype = 0x86DD
    else:
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         ipaddress.ip_address(src).packed, bytes([198, 51, 100, 1]))
        etype = 0x0800
    eth = b"\x02" * 6 + b"\x04" * 6
    if vlan:
        eth += struct.pack(">HH", 0x8100, 42)
    return eth + struct.pack(">H", etype) + ip + udp


def test_pcap_shell_ethernet_vlan_ipv6_and_bad_packets() -> None:
    v5 = v5_packet([smtp_rec()])
    dns = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x03www\x00\x00\x01\x00\x01"
    frames = [_udp_frame(dns), _udp_frame(v5, vlan=True), _udp_frame(v5, src="2001:db8::7", v6=True),
              _udp_frame(v5)]
    data = _pcap_bytes(frames, cut={3: 60})
    assert sniff_pcap(_pcap_bytes(frames[1:])) and not sniff_pcap(data)  # the first UDP packet is DNS
    parser = NetflowPcapParser("cap", None)
    b = check(concat(parser.parse_stream(io.BytesIO(data), "cap.pcap")))
    assert [r["exporter"] for r in rows(b)] == ["192.0.2.9:2055", "[2001:db8::7]:2055"]
    assert parser.ignored_packets == 1
    assert len(b.rejects) == 1 and "snap length" in b.rejects[0].reason and b.rejects[0].location == "packet 4"


def test_pcap_cut_inside_a_packet_is_a_dead_letter() -> None:
    data = _pcap_bytes([_udp_frame(v5_packet([smtp_rec()]))] * 2)[:-10]
    b = check(concat(NetflowPcapParser("cap", None).parse_stream(io.BytesIO(data), "cap.pcap")))
    assert b.records.num_rows == 1 and "cut inside packet 2" in b.rejects[0].reason


def test_pcapng_is_read() -> None:
    frame = _udp_frame(v5_packet([smtp_rec()]))

    def block(code: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", code, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    shb = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    idb = block(1, struct.pack("<HHI", 1, 0, 65535))
    ts = 1_700_000_000_250_000  # microseconds
    epb = block(6, struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(frame), len(frame)) + frame)
    data = shb + idb + epb
    assert sniff_pcap(data)
    (fr,) = list(iter_frames(io.BytesIO(data)))
    assert fr.ts_ms == 1_700_000_000_250
    assert check(concat(NetflowPcapParser("x", None).parse_stream(io.BytesIO(data), "x"))).records.num_rows == 1


def test_sniffers() -> None:
    for name in ("nfv5.pcap", "data.pcap", "ipfixprobe-data.pcap", "samplingrate-template.pcap"):
        head = (AKV / name).read_bytes()[:65536]
        assert sniff_pcap(head) and sniff(head) and not sniff_dat(head)
    for name in ("netflow5.dat", "netflow9_test_valid01.dat", "ipfix.dat", "ipfix_test_netscaler_data.dat"):
        head = (DAT / name).read_bytes()[:65536]
        assert sniff_dat(head) and not sniff_pcap(head)
    assert not sniff_dat((DAT / "netflow5_test_invalid01.dat").read_bytes())  # 55582 records is implausible
    text = (DATA / "cloud-flowlogs" / "aws-vpcflow" / "test-extra-samples.log").read_bytes()
    assert not sniff_dat(text) and not sniff_pcap(text)
    zeek = (DATA / "smtp" / "zeek" / "Traces" / "smtp.pcap").read_bytes()[:65536]
    assert not sniff_pcap(zeek)  # a pcap, but SMTP over TCP, not NetFlow


def test_dat_stream_of_mixed_versions_splits_at_every_packet() -> None:
    names = ["netflow9_test_valid01.dat", "netflow5.dat", "ipfix.dat", "netflow9_test_valid01.dat",
             "netflow5_test_microtik.dat"]
    blob = b"".join((DAT / n).read_bytes() for n in names)
    whole = [(o, len(p)) for o, p in split_packets(io.BytesIO(blob))]
    assert len(whole) == 1 + 12 + 3 + 1 + 1
    assert sum(n for _, n in whole) == len(blob)
    # chunk boundaries inside packets change nothing
    assert [(o, len(p)) for o, p in split_packets(io.BytesIO(blob), chunk_bytes=7)] == whole
    parser = NetflowDatParser("blob", None)
    b = concat([check(x) for x in parser.parse_stream(io.BytesIO(blob), "blob")])
    assert b.records.num_rows == 7 + 30 + 12 + 7 + 30 and not b.rejects


def test_dat_garbage_after_packets_is_one_dead_letter() -> None:
    blob = (DAT / "netflow9_test_valid01.dat").read_bytes() + b"\x00\x07garbage-garbage"
    b = check(concat(NetflowDatParser("x", None).parse_stream(io.BytesIO(blob), "x.dat")))
    assert b.records.num_rows == 7 and len(b.rejects) == 1
    assert "unknown NetFlow version 7" in b.rejects[0].reason and b.rejects[0].location == "byte 460"


def test_udp_listener_on_loopback() -> None:
    """The sample datagrams sent over real UDP give what the file shells give."""
    payloads = (payloads_of(AKV / "ipfixprobe-templates.pcap") + payloads_of(AKV / "ipfixprobe-data.pcap")
                + payloads_of(DAT / "netflow9_test_valid01.dat") + payloads_of(DAT / "netflow5.dat")
                + payloads_of(DAT / "netflow5_test_invalid01.dat"))
    want_rows = 6 + 7 + 30
    got: list[Batch] = []
    ready = threading.Event()
    addr: list[tuple] = []
    stop = threading.Event()
    dec = NetflowDecoder(None)

    def on_ready(a: tuple) -> None:
        addr.append(a)
        ready.set()

    th = threading.Thread(target=listen_udp, args=("127.0.0.1", 0, dec, got.append, stop),
                          kwargs={"on_ready": on_ready, "max_datagrams": 4, "max_wait_ms": 50}, daemon=True)
    th.start()
    assert ready.wait(10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        sender = "127.0.0.1:%d" % s.getsockname()[1]
        for p in payloads:
            s.sendto(p, addr[0])
        for _ in range(200):
            if sum(b.records.num_rows + len(b.rejects) for b in list(got)) >= want_rows + 1:
                break
            stop.wait(0.05)
    stop.set()
    th.join(10)
    assert not th.is_alive()
    b = concat(check(x) for x in got)
    assert b.records.num_rows == want_rows and len(b.rejects) == 1
    assert set(b.records.column("exporter").to_pylist()) == {sender}
    smtp = [r for r in rows(b) if r["dst_port"] == 25]
    assert [flow_tuple(r) for r in smtp] == [("10.10.1.4", 1470, "74.53.140.153", 25, 6, 28, 21673)]
    assert dec.counters[sender].packets == len(payloads)


# =========================================================== property tests


def _samples() -> list[tuple[str, bytes]]:
    out = []
    for p in sorted(DAT.glob("*.dat")) + sorted(AKV.glob("*.pcap")):
        out.extend((p.name, x) for x in payloads_of(p))
    return out


SAMPLES = _samples()
TEMPLATES = [p for _, p in SAMPLES]


def _decoder_with_templates() -> NetflowDecoder:
    dec = NetflowDecoder(None, pending_limit=16)
    dec.decode_many(Datagram(p, "e:1") for p in TEMPLATES)
    return dec


@st.composite
def mutated(draw) -> bytes:
    _, p = draw(st.sampled_from(SAMPLES))
    data = bytearray(p)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "set16"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif i + 2 <= len(data):
            data[i:i + 2] = draw(st.sampled_from([0, 1, 3, 4, 255, 256, 0xFFFF, 0x8000])).to_bytes(2, "big")
    return bytes(data)


def _feed(dec: NetflowDecoder, payloads: list[bytes]) -> None:
    """Every datagram is counted, every problem counted is a dead letter and vice versa,
    and nothing is left waiting after a flush."""
    before = dec.totals()
    b = check(dec.decode_many(Datagram(p, "e:1", i) for i, p in enumerate(payloads)))
    b2 = check(dec.flush())
    after = dec.totals()
    assert after.packets == before.packets + len(payloads)
    problems = (after.decode_errors + after.template_misses) - (before.decode_errors + before.template_misses)
    assert len(b.rejects) + len(b2.rejects) == problems
    assert dec.pending_sets == 0 and after.pending == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v, rest: v + rest, st.sampled_from([b"\x00\x05", b"\x00\x09", b"\x00\x0a"]),
              st.binary(max_size=400)),
), max_size=8))
def test_random_datagrams_never_raise_and_are_counted(payloads: list[bytes]) -> None:
    _feed(NetflowDecoder(None), payloads)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated(), min_size=1, max_size=6))
def test_mutated_samples_never_raise_and_are_counted(payloads: list[bytes]) -> None:
    _feed(_decoder_with_templates(), payloads)
    _feed(NetflowDecoder([25]), payloads)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_random_files_never_raise(blob: bytes) -> None:
    for parser in (NetflowDatParser("x", None), NetflowPcapParser("x", None)):
        for b in parser.parse_stream(io.BytesIO(blob), "x"):
            check(b)
        check(parser.close())
