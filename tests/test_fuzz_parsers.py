"""Property-based fuzzing of every input format in ``ingest/registry.py`` with hostile input:
valid lines, documents and packets from the shared samples (or built with the other tests'
helpers) with fields replaced by NaN and infinities, negatives, overflows, timestamps of
1900, 2200, 0 and 2^63, forged and odd IPv6, 1 MB fields, truncation and random bytes;
NetFlow v9/IPFIX template bombs.

The invariant is :func:`fuzz.hostile.check_batch`: no exception but the project's errors,
every line (record, packet) a kept record, a skipped one or a dead letter with a reason, and
kept records that obey the record's rules. Stateful decoders also stay within their bounds.
Examples are bounded per test (``max_examples``); found failures are kept in
``.hypothesis/`` and replayed first, and the ones found while writing these tests are the
``@example`` cases.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
from fuzz.hostile import BYTE_EDITS, HUGE, JSON_VALUES, TOKENS, Accounted, check_batch, fuzz, mutate
from hypothesis import example, given
from hypothesis import strategies as st
from test_netflow import (FLOW4, ipfix_message, ipfix_options_template, ipfix_set,
                          ipfix_template, pack_record, payloads_of, smtp_rec, v5_packet, v9_flowset, v9_packet,
                          v9_template)
from test_pcap_smtp import Conv, pcap
from test_zeek import CONN_HEADER, conn

from smtpguard.core.errors import SmtpguardError
from smtpguard.ingest.pcapfile import iter_frames, udp_of
from smtpguard.ingest import ipfix, registry
from smtpguard.ingest.netflow import (MAX_SHARED_TEMPLATES, Datagram, NetflowDatParser, NetflowDecoder,
                                      NetflowPcapParser)
from smtpguard.ingest.pcap_smtp import SmtpCaptureParser

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FLOWLOGS = DATA / "cloud-flowlogs"
NF = DATA / "netflow"
TRACES = DATA / "smtp" / "zeek" / "Traces"

# ====================================================================== line formats


def _split(sep: str) -> tuple[Callable[[str], list[str]], Callable[[list[str]], str]]:
    return (lambda line: line.split(sep)), sep.join


AWS_SAMPLES = ((FLOWLOGS / "aws-vpcflow" / "test-extra-samples.log").read_text().splitlines()
               + (FLOWLOGS / "aws-vpcflow" / "test-v5-all-fields.log").read_text().splitlines())
AWS_SMTP = "2 123456789010 eni-1 10.0.0.5 198.51.100.7 40000 25 6 10 1000 1700000000 1700000060 ACCEPT OK"
AWS_HEADER = ("version account-id interface-id srcaddr dstaddr srcport dstport protocol packets bytes start end "
              "action log-status tcp-flags instance-id")
ARGUS = DATA / "labelled-flows" / "ctu13-scenario6-capture20110816" / "capture20110816.binetflow.slice_13_1"
ARGUS_LINES = ARGUS.read_text().splitlines()
ARGUS_SMTP = [ln for ln in ARGUS_LINES if ",25," in ln][:8]
GCP_LINES = (FLOWLOGS / "gcp-vpcflow" / "test-vpcflow.first3.log").read_text().splitlines()
ZEEK_JSON = ('{"ts":1700000000.5,"uid":"C1","id.orig_h":"10.0.0.1","id.orig_p":40000,"id.resp_h":"192.0.2.25",'
             '"id.resp_p":25,"proto":"tcp","conn_state":"SF","duration":1.5,"orig_pkts":3,"orig_ip_bytes":300,'
             '"resp_pkts":2,"resp_ip_bytes":120}')


def _gcp_smtp() -> str:
    e = json.loads(GCP_LINES[0])
    e["jsonPayload"]["connection"].update(dest_port=25, src_port=40000)
    return json.dumps(e)


#: format -> (header lines kept in front, base lines, how a line splits into fields and joins back,
#:            or None for JSON lines)
TEXT_FORMATS: dict[str, tuple[list[str], list[str], Any]] = {
    "aws-vpc": ([], AWS_SAMPLES + [AWS_SMTP], _split(" ")),
    "argus": ([ARGUS_LINES[0]], ARGUS_LINES[1:6] + ARGUS_SMTP, _split(",")),
    "zeek": (CONN_HEADER, [conn(), conn(conn_state="S0", id__resp_p=587), conn(proto="udp")], _split("\t")),
    "gcp-vpc": ([], GCP_LINES + [_gcp_smtp()], None),
}
#: lines that switch the parser's layout mid-file (a new header)
RELAYOUT = {"aws-vpc": AWS_HEADER, "argus": ARGUS_LINES[0], "zeek": CONN_HEADER[6], "gcp-vpc": ZEEK_JSON}


def _json_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _json_paths(v, path + (k,))] or [path]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _json_paths(v, path + (i,))] or [path]
    return [path]


def _json_set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    obj[path[0]] = _json_set(obj[path[0]], path[1:], value)
    return obj


def _mutate_line(fmt: str, line: str, edits: list[tuple[int, Any]], cut: int | None) -> str:
    _, _, fields = TEXT_FORMATS[fmt]
    if fields is None or line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if obj is not None:
            paths = _json_paths(obj)
            for at, value in edits:
                obj = _json_set(obj, paths[at % len(paths)], value)
            line = json.dumps(obj)
    else:
        split, join = fields
        toks = split(line)
        for at, value in edits:
            toks[at % len(toks)] = value if isinstance(value, str) else json.dumps(value)
        line = join(toks)
    return line if cut is None else line[:cut % (len(line) + 1)]


def _parse_lines(fmt: str, lines: list[Any], smtp: bool, chunk: int) -> Accounted:
    """Feed the lines in chunks, as the reader does; every batch checked, every line accounted."""
    parser = registry.get(fmt).make_parser("fuzz.log", (25, 587) if smtp else None)
    total = Accounted()
    for i in range(0, len(lines), chunk):
        part = lines[i:i + chunk]
        try:
            b = parser.parse_lines(part, i + 1)
        except SmtpguardError:
            continue
        total.add(check_batch(b, fmt))
        blank = sum(1 for ln in part if isinstance(ln, (str, bytes)) and not ln.strip(
            " \t\n\v\f\r" if isinstance(ln, str) else b" \t\n\v\f\r"))
        assert b.read == len(part) - blank, (fmt, b.read, len(part), blank)  # blank lines are no input
    return total


_EDIT = st.tuples(st.integers(0, 200), st.one_of(st.sampled_from(TOKENS), st.sampled_from(JSON_VALUES),
                                                  st.text(max_size=30)))
_LINE = st.tuples(st.integers(0, 100), st.lists(_EDIT, max_size=4), st.one_of(st.none(), st.integers(0, 400)))


@pytest.mark.parametrize("fmt", sorted(TEXT_FORMATS))
@fuzz(120)
@given(picks=st.lists(st.one_of(_LINE, st.just("relayout"), st.text(max_size=80)), min_size=1, max_size=20),
       smtp=st.booleans(), chunk=st.sampled_from([1, 3, 1000]))
@example(picks=[(0, [(3, "fe80::1%eth0"), (4, "::ffff:10.0.0.1")], None)], smtp=False, chunk=1000)
@example(picks=[(0, [(10, str(2**63)), (11, "7258118400")], None), (1, [(8, "NaN")], None)], smtp=False, chunk=1)
@example(picks=[(0, [(2, HUGE)], None), (0, [(0, HUGE)], 5000)], smtp=True, chunk=1000)
@example(picks=[(0, [(0, "\u0662\u0665")], None)], smtp=False, chunk=1)  # zeek took Arabic-Indic digits for a time
def test_text_formats_with_hostile_fields(fmt: str, picks: list, smtp: bool, chunk: int) -> None:
    header, base, _ = TEXT_FORMATS[fmt]
    lines: list[Any] = list(header)
    for p in picks:
        if p == "relayout":
            lines.append(RELAYOUT[fmt])
        elif isinstance(p, str):
            lines.append(p)
        else:
            i, edits, cut = p
            lines.append(_mutate_line(fmt, base[i % len(base)], edits, cut))
    _parse_lines(fmt, lines, smtp, chunk)


@pytest.mark.parametrize("fmt", sorted(TEXT_FORMATS))
@fuzz(60)
@given(blob=st.binary(max_size=2000), smtp=st.booleans())
@example(blob=b"\x1c", smtp=False)  # gcp-vpc took Unicode whitespace for a blank line: the line vanished
@example(blob=b"\xe2\x80\xa8\n\xc2\x85", smtp=True)
def test_text_formats_with_random_bytes(fmt: str, blob: bytes, smtp: bool) -> None:
    """Undecodable and binary lines, as the reader hands them over (UTF-8 with replacement)
    and as surrogate-escaped text."""
    header, _, _ = TEXT_FORMATS[fmt]
    text = blob.decode("utf-8", "replace").split("\n")
    escaped = blob.decode("utf-8", "surrogateescape").split("\n")
    _parse_lines(fmt, header + text, smtp, 1000)
    _parse_lines(fmt, header + escaped + [None, blob], smtp, 7)


def test_every_format_is_fuzzed() -> None:
    """A format added to the registry without a fuzz test fails here."""
    fuzzed = set(TEXT_FORMATS) | {"azure-flow", "netflow-pcap", "netflow-dat", "pcap", "sflow-pcap", "sflow-dat"}
    assert fuzzed == set(registry.FORMATS)


# ====================================================================== Azure (documents)


def _azure_doc(tuples: list[str], version: int = 2) -> dict:
    return {"records": [{
        "time": "2018-11-13T12:00:35.3899262Z", "category": "NetworkSecurityGroupFlowEvent",
        "resourceId": "/SUBSCRIPTIONS/11111111-2222-3333-4444-555555555555/RESOURCEGROUPS/RG/PROVIDERS/"
                      "MICROSOFT.NETWORK/NETWORKSECURITYGROUPS/NSG1",
        "operationName": "NetworkSecurityGroupFlowEvents",
        "properties": {"Version": version, "flows": [{"rule": "R", "flows": [{"mac": "000D3AF87856",
                                                                               "flowTuples": tuples}]}]}}]}


AZURE_TUPLES = ["1542110377,10.1.0.4,192.0.2.10,44000,25,T,O,A,B,,,,",
                "1542110437,10.1.0.4,192.0.2.10,44000,25,T,O,A,E,2,200,1,60",
                "1542110379,1.128.0.0,1.128.0.1,59932,443,T,O,A,E,1,66,1,66"]
AZURE_NSG = (FLOWLOGS / "azure-nsg" / "test-nsg.log").read_bytes()


def _azure(data: bytes, smtp: bool) -> Accounted:
    parser = registry.get("azure-flow").make_parser("PT1H.json", (25,) if smtp else None)
    total = Accounted()
    try:
        for b in parser.parse_stream(io.BytesIO(data), "PT1H.json"):
            total.add(check_batch(b, "azure-flow"))
    except SmtpguardError:
        pass
    return total


@fuzz(120)
@given(tuples=st.lists(st.tuples(st.integers(0, 2), st.lists(st.tuples(st.integers(0, 12), st.sampled_from(TOKENS)),
                                                             max_size=3)), min_size=1, max_size=12),
       doc_edits=st.lists(st.tuples(st.integers(0, 100), st.sampled_from(JSON_VALUES)), max_size=2),
       version=st.sampled_from([1, 2, 4, 3, -1, 2**70]), smtp=st.booleans())
@example(tuples=[(1, [(0, str(2**63)), (9, "NaN"), (10, "-1")]), (1, [(1, "fe80::1%eth0")])], doc_edits=[],
         version=2, smtp=False)
def test_azure_documents_with_hostile_tuples(tuples: list, doc_edits: list, version: int, smtp: bool) -> None:
    rows = []
    for i, edits in tuples:
        fields = AZURE_TUPLES[i].split(",")
        for at, tok in edits:
            fields[at % len(fields)] = tok
        rows.append(",".join(fields))
    doc = _azure_doc(rows, version)
    paths = _json_paths(doc)
    for at, value in doc_edits:
        doc = _json_set(doc, paths[at % len(paths)], value)
    total = _azure(json.dumps(doc).encode(), smtp)
    if not doc_edits and version in (1, 2):
        # every tuple is a record, a skipped flow or a dead letter (B/C/E tuples of one flow merge)
        assert total.read >= 1


@fuzz(60)
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.binary(max_size=8)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 1 << 20)), smtp=st.booleans())
def test_azure_mutated_sample(edits: list, cut: int | None, smtp: bool) -> None:
    data = bytearray(AZURE_NSG)
    for at, blob in edits:
        at %= len(data) + 1
        data[at:at + len(blob)] = blob
    if cut is not None:
        del data[cut % (len(data) + 1):]
    _azure(bytes(data), smtp)


# ====================================================================== NetFlow v5 / v9 / IPFIX


def assert_bounded(dec: NetflowDecoder) -> None:
    """The decoder's state stays within its documented bounds, whatever it was fed."""
    assert len(dec._exporters) <= dec.max_exporters
    for exp in dec._exporters.values():
        n = sum(len(d.templates) for d in exp.domains.values())
        assert n == exp.n_templates <= dec.max_templates_per_exporter
        assert len(exp.domains) <= max(exp.n_templates, 0) or not exp.domains
        for d in exp.domains.values():
            assert d.templates  # a domain exists while it has templates
    assert len(dec._layouts) <= MAX_SHARED_TEMPLATES
    assert dec.pending_sets <= dec.pending_limit and dec._pending_bytes <= dec.pending_bytes_limit


def feed(dec: NetflowDecoder, datagrams: list[Datagram]) -> Accounted:
    """Decode, then flush: every datagram counted, every problem a dead letter, nothing waiting."""
    before = dec.totals()
    total = Accounted()
    total.add(check_batch(dec.decode_many(datagrams), "netflow"))
    assert_bounded(dec)
    total.add(check_batch(dec.flush(), "netflow"))
    after = dec.totals()
    assert after.packets - before.packets == len(datagrams)
    problems = (after.decode_errors + after.template_misses) - (before.decode_errors + before.template_misses)
    assert total.rejected == problems
    assert dec.pending_sets == 0
    return total


#: Elements the decoder reads (addresses, ports, counters, every time and sampling field)
#: and some it steps over, with every length the wire allows them to claim.
_COLUMN_IES = sorted({ie for _, cands in ipfix.COLUMNS.values() for pen, ie in cands if pen == 0})
_FIELD = st.tuples(st.one_of(st.sampled_from(_COLUMN_IES), st.integers(0, 0x7FFF)),
                   st.sampled_from([1, 2, 3, 4, 5, 8, 16, 65535, 0, 255, 7]))
#: hostile record values: zeros, all ones, the top bit, 2^63, times of 1900/2200
_VALUE = st.one_of(st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1, 2**63 - 1,
                                    (1 << 32) * 2208988800, 7258118400000, 4102444800]),
                   st.integers(0, 2**64 - 1))


def _value_bytes(v: int, n: int) -> bytes:
    if n == 65535:
        return b"\x03abc"
    return (v % (1 << (8 * n))).to_bytes(n, "big") if n else b""


@fuzz(150)
@given(fields=st.lists(_FIELD, min_size=1, max_size=24),
       records=st.lists(st.lists(_VALUE, min_size=24, max_size=24), min_size=1, max_size=6),
       version=st.sampled_from([9, 10]), tid=st.sampled_from([256, 257, 65535]),
       export_s=st.sampled_from([0, 1, 1_700_000_000, 0xFFFFFFFF]), uptime=st.sampled_from([0, 1, 0xFFFFFFFF]),
       data_first=st.booleans(), smtp=st.booleans())
@example(fields=[(8, 4), (12, 4), (7, 2), (11, 2), (152, 8), (153, 8)], records=[[0] * 4 + [2**63, 2**64 - 1] + [0] * 18],
         version=10, tid=256, export_s=0, uptime=0, data_first=False, smtp=False)
@example(fields=[(27, 16), (28, 16), (7, 2), (11, 2), (156, 8), (157, 8)], records=[[0] * 24], version=10,
         tid=256, export_s=0xFFFFFFFF, uptime=0, data_first=True, smtp=False)
def test_netflow_templates_and_records_with_hostile_values(fields, records, version, tid, export_s, uptime,
                                                           data_first, smtp) -> None:
    data = b"".join(b"".join(_value_bytes(v, n) for (_, n), v in zip(fields, rec)) for rec in records)
    if version == 9:
        tmpl = v9_flowset(0, struct.pack(">HH", tid, len(fields)) + b"".join(struct.pack(">HH", *f) for f in fields))
        sets = [v9_flowset(tid, data), tmpl] if data_first else [tmpl, v9_flowset(tid, data)]
        packet = v9_packet(*sets, uptime=uptime, secs=export_s)
    else:
        tmpl = ipfix_template(tid, list(fields))
        sets = [ipfix_set(tid, data), tmpl] if data_first else [tmpl, ipfix_set(tid, data)]
        packet = ipfix_message(*sets, export=export_s)
    dec = NetflowDecoder((25,) if smtp else None)
    feed(dec, [Datagram(packet, "192.0.2.1:2055", None), Datagram(packet, "192.0.2.1:2055", 0)])


@fuzz(80)
@given(recs=st.lists(st.fixed_dictionaries({
    8: st.sampled_from(["10.0.0.5", "0.0.0.0", "255.255.255.255"]), 12: st.sampled_from(["198.51.100.7", "0.0.0.0"]),
    7: st.integers(0, 65535), 11: st.sampled_from([25, 587, 0, 65535]), 2: _VALUE.map(lambda v: v & 0xFFFFFFFF),
    1: _VALUE.map(lambda v: v & 0xFFFFFFFF), 22: _VALUE.map(lambda v: v & 0xFFFFFFFF),
    21: _VALUE.map(lambda v: v & 0xFFFFFFFF), 4: st.integers(0, 255)}), min_size=1, max_size=30),
    uptime=st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF]), secs=st.sampled_from([0, 1, 1_700_000_000, 0xFFFFFFFF]),
    nsecs=st.sampled_from([0, 999_999_999, 1_000_000_000, 0xFFFFFFFF]), sampling=st.integers(0, 0xFFFF),
    count_delta=st.sampled_from([0, 0, 1, -1, 1000]))
def test_netflow_v5_with_hostile_headers_and_times(recs, uptime, secs, nsecs, sampling, count_delta) -> None:
    packet = bytearray(v5_packet(recs, uptime=uptime, secs=secs, nsecs=nsecs, sampling=sampling))
    packet[2:4] = ((len(recs) + count_delta) & 0xFFFF).to_bytes(2, "big")
    feed(NetflowDecoder(None), [Datagram(bytes(packet), "[2001:db8::1]:2055", None)])


def _datagrams_of(*names: str) -> list[bytes]:
    out = []
    for n in names:
        p = next(NF.rglob(n))
        out.extend(payloads_of(p))
    return out


NETFLOW_SAMPLES = _datagrams_of("netflow9_test_valid01.dat", "ipfix.dat", "netflow5.dat", "ipfixprobe-templates.pcap",
                                "ipfixprobe-data.pcap", "template.pcap", "data.pcap", "ipfix_test_netscaler_tpl.dat",
                                "ipfix_test_netscaler_data.dat", "samplingrate-template.pcap",
                                "samplingrate-data.pcap", "data+templates.pcap")


@fuzz(150)
@given(picks=st.lists(st.tuples(st.integers(0, len(NETFLOW_SAMPLES) - 1),
                                st.lists(st.tuples(st.sampled_from(BYTE_EDITS),
                                                   st.integers(0, 1 << 16), st.integers(0, 2**64 - 1)), max_size=5),
                                st.sampled_from(["a:1", "b:2", "[fe80::1%eth0]:9"])), min_size=1, max_size=10))
def test_netflow_mutated_samples(picks) -> None:
    """Shared captures' datagrams, fed in order with their templates, with lengths, ids and
    counters overwritten by hostile values (huge lengths, 0xFFFF, 2^63), cut or grown."""
    dgs = []
    for i, edits, exporter in picks:
        dgs.append(Datagram(mutate(NETFLOW_SAMPLES[i], edits, "big"), exporter, None))
    dec = NetflowDecoder(None, pending_limit=8, max_templates_per_exporter=16)
    dec.decode_many(Datagram(p, "a:1") for p in NETFLOW_SAMPLES)
    feed(dec, dgs)


# --------------------------------------------------------------- template bombs (explicit)


def test_thousands_of_templates_from_one_exporter_are_bounded_and_refused_with_reasons() -> None:
    dec = NetflowDecoder(None, max_templates_per_exporter=64)
    packets = [ipfix_message(*[ipfix_template(256 + t, FLOW4[: 1 + (t % len(FLOW4))]) for t in range(k, k + 50)])
               for k in range(0, 5000, 50)]
    total = feed(dec, [Datagram(p, "e:1") for p in packets])
    c = dec.counters["e:1"]
    assert c.templates == 5000 and c.templates_refused == 5000 - 64 == total.rejected
    assert dec._exporters["e:1"].n_templates == 64


def test_template_with_65535_fields_and_odd_lengths_are_refused() -> None:
    huge = ipfix_set(2, struct.pack(">HH", 300, 65535) + b"\x00\x08\x00\x04" * 16000)
    zero = ipfix_template(301, [(8, 4), (12, 0), (11, 2)])
    all_zero = v9_template(302, [(1, 0)])
    too_long = ipfix_template(303, [(8, 4)] + [(210, 65534)])
    varlen = ipfix_template(304, [(8, 4), (12, 4), (11, 2), (82, 65535)])
    big_v9 = v9_flowset(0, struct.pack(">HH", 305, 65535) + b"\x00\x08\x00\x04" * 16000)
    dec = NetflowDecoder(None)
    total = feed(dec, [Datagram(ipfix_message(huge), "e:1"), Datagram(ipfix_message(zero), "e:1"),
                       Datagram(v9_packet(all_zero), "e:1"), Datagram(ipfix_message(too_long), "e:1"),
                       Datagram(ipfix_message(varlen), "e:1"), Datagram(v9_packet(big_v9), "e:1")])
    assert total.rejected == 5, total.reasons
    assert any("65535 fields (limit 512)" in r for r in total.reasons)
    assert any("has length 0" in r for r in total.reasons)
    assert dec._exporters["e:1"].n_templates == 1  # only the variable-length one is a layout
    rec = pack_record([(8, 4), (12, 4), (11, 2), (82, 65535)], {8: "10.0.0.1", 12: "192.0.2.1", 11: 25,
                                                                  82: b"x" * 300})
    b = check_batch(dec.decode(ipfix_message(ipfix_set(304, rec)), "e:1"))
    assert b.records.column("dst_port").to_pylist() == [25]


def test_template_ids_reused_with_other_layouts_decode_with_the_last_one() -> None:
    dec = NetflowDecoder(None)
    v4 = [(8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (2, 4), (1, 4)]
    v6 = [(27, 16), (28, 16), (7, 2), (11, 2), (4, 1), (2, 4), (1, 4)]
    rec4 = pack_record(v4, {8: "10.0.0.1", 12: "192.0.2.1", 7: 40000, 11: 25, 4: 6, 2: 3, 1: 300})
    rec6 = pack_record(v6, {27: "2001:db8::1", 28: "2001:db8::25", 7: 40000, 11: 25, 4: 6, 2: 3, 1: 300})
    dgs = []
    for k in range(200):
        layout, rec = (v4, rec4) if k % 2 == 0 else (v6, rec6)
        dgs.append(Datagram(ipfix_message(ipfix_template(256, layout), ipfix_set(256, rec)), "e:1"))
    total = feed(dec, dgs)
    assert total.kept == 200 and total.rejected == 0
    assert dec._exporters["e:1"].n_templates == 1


def test_domain_ids_sprayed_by_one_exporter_leave_no_state() -> None:
    """An exporter cycling through observation domains / source ids in empty datagrams, data
    without templates and withdrawals keeps no per-domain state: domains exist only while
    they have templates."""
    dec = NetflowDecoder(None, pending_limit=4)
    dgs = [Datagram(struct.pack(">HHIII", 10, 16, 1_700_000_000, 1, d), "e:1") for d in range(20_000)]
    dgs += [Datagram(v9_packet(source_id=d), "e:1") for d in range(20_000)]
    dgs += [Datagram(ipfix_message(ipfix_set(256, b"\0" * 8), domain=d), "e:1") for d in range(2_000)]
    withdraw = ipfix_set(2, struct.pack(">HH", 256, 0))
    dgs += [Datagram(ipfix_message(ipfix_template(256, FLOW4), withdraw, domain=d), "e:1") for d in range(2_000)]
    feed(dec, dgs)
    assert dec._exporters["e:1"].domains == {}


def test_options_templates_and_sampling_with_hostile_values() -> None:
    opts = ipfix_options_template(400, [(149, 4)], [(34, 4), (48, 1), (160, 8)])
    data = pack_record([(149, 4), (34, 4), (48, 1), (160, 8)], {149: 1, 34: 0xFFFFFFFF, 48: 255, 160: 2**64 - 1})
    tmpl = ipfix_template(256, FLOW4 + [(48, 1)])
    rec = pack_record(FLOW4 + [(48, 1)], {**smtp_rec(), 48: 255})
    dec = NetflowDecoder(None)
    total = feed(dec, [Datagram(ipfix_message(opts, ipfix_set(400, data), tmpl, ipfix_set(256, rec)), "e:1")])
    assert total.kept + total.rejected == 1


# ------------------------------------------------------------------ file shells (dat, pcap)


def _stream(parser: Any, data: bytes) -> Accounted:
    total = Accounted()
    try:
        for b in parser.parse_stream(io.BytesIO(data), "fuzz"):
            total.add(check_batch(b, parser.name))
    except SmtpguardError:
        pass
    total.add(check_batch(parser.close(), parser.name))
    return total


STREAM_SAMPLES = {
    "netflow-dat": [p.read_bytes() for p in sorted((NF / "logstash-codec-netflow").glob("*.dat"))],
    "netflow-pcap": [p.read_bytes() for p in sorted((NF / "akvorado").glob("*.pcap"))],
    "sflow-pcap": [p.read_bytes() for p in sorted((NF.parent / "sflow" / "akvorado").glob("*.pcap"))],
    "sflow-dat": [u.payload for p in sorted((NF.parent / "sflow" / "akvorado").glob("*.pcap"))
                  for fr in iter_frames(p.open("rb")) if (u := udp_of(fr.data, fr.linktype)) is not None],
    "pcap": [(TRACES / "smtp.pcap").read_bytes(), (TRACES / "smtp-mail-transactions-invalid.pcap").read_bytes(),
             (TRACES / "tls" / "smtp-starttls.pcap").read_bytes()],
}


def _file_edit(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, v in edits:
        if not buf:
            break
        pos %= len(buf)
        if kind == 0:
            buf[pos] = v & 0xFF
        elif kind == 1:  # a length or timestamp field: 0, all ones, top bit, 1 MB
            buf[pos:pos + 4] = [b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x80\0\0\0", b"\0\x10\0\0"][v % 4]
        elif kind == 2:
            buf[pos:pos] = bytes([v & 0xFF]) * (v % 64)
        else:
            del buf[pos:]
    return bytes(buf)


@pytest.mark.parametrize("fmt", sorted(STREAM_SAMPLES))
@fuzz(80)
@given(sample=st.integers(0, 100),
       edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 1 << 16)), min_size=1,
                      max_size=8),
       smtp=st.booleans())
def test_capture_files_mutated(fmt: str, sample: int, edits: list, smtp: bool) -> None:
    samples = STREAM_SAMPLES[fmt]
    parser = registry.get(fmt).make_parser("fuzz", (25,) if smtp else None)
    _stream(parser, _file_edit(samples[sample % len(samples)], edits))


@pytest.mark.parametrize("fmt", sorted(STREAM_SAMPLES))
@fuzz(40)
@given(blob=st.binary(max_size=3000))
def test_capture_files_random_bytes(fmt: str, blob: bytes) -> None:
    _stream(registry.get(fmt).make_parser("fuzz", None), blob)


# ------------------------------------------------------------------ SMTP captures


_SMTP_LINES = st.sampled_from([
    b"EHLO " + b"h" * 100_000 + b"\r\n", b"HELO \xff\xfe\x00\r\n", b"MAIL FROM:<a@" + b"x" * 70000 + b">\r\n",
    b"RCPT TO:<b@example.net>\r\n" * 500, b"DATA\r\n", b"\r\n.\r\n", b"STARTTLS\r\n", b"AUTH LOGIN\r\n",
    b"BDAT 18446744073709551615 LAST\r\n", b"BDAT -1\r\n", b"\x16\x03\x01\x02\x00", b"QUIT\r\n",
    b"MAIL FROM:<@\xc3\x28>\r\n", b"EHLO fe80::1%eth0\r\n"])
_SMTP_REPLIES = st.sampled_from([b"220 hi\r\n", b"250-a\r\n250 b\r\n", b"999 what\r\n", b"-1 no\r\n",
                                 b"550 " + b"x" * 70000 + b"\r\n", b"421\r\n", b"354 go\r\n", b"250 " * 1000])


@fuzz(40)
@given(dialogue=st.lists(st.tuples(_SMTP_LINES, _SMTP_REPLIES), max_size=6),
       client=st.sampled_from(["10.0.0.1", "2001:db8::1", "::ffff:10.0.0.1", "fe80::1", "0.0.0.0"]),
       t0=st.sampled_from([0.0, 1.0, 1_700_000_000.0, 4294967000.0]), close=st.booleans())
@example(dialogue=[(b"EHLO " + HUGE.encode() + b"\r\n", b"250 ok\r\n")], client="10.0.0.1", t0=1.0, close=True)
def test_smtp_capture_with_hostile_dialogue_addresses_and_times(dialogue, client, t0, close) -> None:
    server = "2001:db8::25" if ":" in client else "192.0.2.25"
    conv = Conv(client=client, server=server, t0=t0).handshake()
    for cmd, reply in dialogue:  # in segments a TCP packet can hold
        for side, data in ((True, cmd), (False, reply)):
            for k in range(0, len(data), 8000):
                conv.send(side, "PA", data[k:k + 8000])
    if close:
        conv.close()
    parser = SmtpCaptureParser("fuzz.pcap", (25,))
    total = _stream(parser, pcap(conv.frames))
    assert parser.counters.packets == len(conv.frames)
    assert total.kept <= 1


def test_pcapng_timestamps_beyond_any_calendar_are_dead_letters_or_records_in_range() -> None:
    """Enhanced packet blocks carry 64-bit timestamps: 2^64-1 ticks is far beyond year 9999."""
    frames = Conv().handshake().dialogue([(b"EHLO x\r\n", b"250 ok\r\n")]).close().frames
    shb = struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 28)
    idb = struct.pack("<IIHHI", 1, 20, 1, 0, 262144) + struct.pack("<I", 20)
    blocks = [shb, idb]
    for i, (_, f) in enumerate(frames):
        ts = [2**64 - 1, 0, 2**63, 1_700_000_000_000_000][i % 4]
        body = struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(f), len(f)) + f + b"\0" * (-len(f) % 4)
        blocks.append(struct.pack("<II", 6, 12 + len(body)) + body + struct.pack("<I", 12 + len(body)))
    for fmt in ("pcap", "netflow-pcap"):
        _stream(registry.get(fmt).make_parser("fuzz", (25,)), b"".join(blocks))


def test_netflow_shells_with_hostile_datagrams_in_a_capture() -> None:
    """A NetFlow capture whose datagrams carry template bombs and 2^63 times, through the pcap
    and dat shells."""
    bomb = ipfix_message(*[ipfix_template(256 + t, FLOW4) for t in range(300)])
    times = ipfix_message(ipfix_template(256, [(8, 4), (12, 4), (11, 2), (152, 8)]),
                          ipfix_set(256, pack_record([(8, 4), (12, 4), (11, 2), (152, 8)],
                                                     {8: "10.0.0.1", 12: "192.0.2.1", 11: 25, 152: 2**63})))
    dat = NetflowDatParser("x", None, decoder=NetflowDecoder(None, max_templates_per_exporter=100))
    total = _stream(dat, bomb + times)
    assert total.rejected >= 201
    from test_netflow import _pcap_bytes, _udp_frame
    cap = NetflowPcapParser("x", None, decoder=NetflowDecoder(None, max_templates_per_exporter=100))
    total = _stream(cap, _pcap_bytes([_udp_frame(bomb), _udp_frame(times, src="2001:db8::9")]))
    assert total.rejected >= 201
