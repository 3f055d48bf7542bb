"""AWS VPC Flow Logs text parser: samples against Elastic's expected output, layouts,
SMTP selection with reverse attribution, and bad input as dead letters."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from smtpguard.core import record
from smtpguard.core.errors import ConfigError
from smtpguard.ingest.aws_vpc import HEADERLESS_LAYOUTS, AwsVpcParser, _row_problem, sniff
from smtpguard.ingest.base import Batch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AWS = DATA / "cloud-flowlogs" / "aws-vpcflow"
SAMPLES = ["test-extra-samples.log", "test-v5-all-fields.log"]

V2_NAMES = (
    "version account-id interface-id srcaddr dstaddr srcport dstport protocol "
    "packets bytes start end action log-status"
).split()


def v2(**kw: object) -> str:
    """A valid default-format (v2) line towards port 25, with fields overridden."""
    vals = {
        "version": "2", "account-id": "123456789012", "interface-id": "eni-0a1b2c3d4e5f60718",
        "srcaddr": "10.0.0.5", "dstaddr": "198.51.100.7", "srcport": "40000", "dstport": "25",
        "protocol": "6", "packets": "10", "bytes": "1000", "start": "1700000000",
        "end": "1700000060", "action": "ACCEPT", "log-status": "OK",
    }
    for k, v in kw.items():
        vals[k.replace("_", "-")] = str(v)
    return " ".join(vals[n] for n in V2_NAMES)


def reverse_of(line: str, **kw: object) -> str:
    """The server-to-client line of the connection in ``line`` (a v2 line)."""
    t = dict(zip(V2_NAMES, line.split(" ")))
    t["srcaddr"], t["dstaddr"] = t["dstaddr"], t["srcaddr"]
    t["srcport"], t["dstport"] = t["dstport"], t["srcport"]
    t["packets"], t["bytes"] = "7", "700"
    for k, v in kw.items():
        t[k.replace("_", "-")] = str(v)
    return " ".join(t[n] for n in V2_NAMES)


def parse(lines: list[str], smtp_ports=None, first_line_no: int = 1, parser: AwsVpcParser | None = None) -> Batch:
    """``lines`` parsed line by line; the same lines as one block of bytes, as the reader hands
    them to the parser, must give the same batch and leave the parser in the same state."""
    p = parser or AwsVpcParser("test.log", smtp_ports)
    twin = copy.deepcopy(p)
    b = p.parse_lines(lines, first_line_no)
    check_accounting(b, lines)
    if all(isinstance(s, str) and "\n" not in s for s in lines):
        try:
            data = "\n".join(lines).encode("utf-8")
        except UnicodeEncodeError:
            return b  # lone surrogates: no file holds these bytes
        same_batch(twin.parse_block(data, first_line_no), b)
        assert _layout(twin._state) == _layout(p._state)
    return b


def _layout(state: object) -> object:
    return getattr(state, "fields", None) or getattr(state, "reason", None)


def same_batch(got: Batch, want: Batch) -> None:
    assert got.records.equals(want.records)
    assert [(r.location, r.reason, r.raw) for r in got.rejects] == [(r.location, r.reason, r.raw) for r in want.rejects]
    assert (got.read, got.skipped) == (want.read, want.skipped)


def check_accounting(b: Batch, lines: list[str]) -> None:
    assert b.records.schema == record.SCHEMA
    assert b.read == sum(1 for s in lines if not (isinstance(s, str) and not s.strip()))
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects)
    for r in b.rejects:
        assert r.reason and r.reason != "invalid record" and r.reason != "invalid line"
        assert r.format == "aws-vpc" and r.source == "test.log"


def rows(b: Batch) -> list[dict]:
    return record.to_dicts(b.records)


# ----------------------------------------------------------------- the samples


def _expected(name: str) -> list[dict]:
    return json.loads((AWS / f"{name}-expected.json").read_text())["expected"]


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_matches_elastic_expected(name: str) -> None:
    lines = (AWS / name).read_text().splitlines()
    expected = _expected(name)
    assert [e["event"]["original"] for e in expected] == lines
    b = AwsVpcParser("test.log", None).parse_lines(lines, 1)
    check_accounting(b, lines)
    assert b.rejects == []

    flows = [e for e in expected if "source" in e]
    nodata = [e for e in expected if "source" not in e]
    assert b.skipped == len(nodata)
    assert all(e["aws"]["vpcflow"]["log_status"] in ("NODATA", "SKIPDATA") for e in nodata)
    got = rows(b)
    assert len(got) == len(flows)
    actions = {"ACCEPT": "accept", "REJECT": "reject"}
    for rec, e in zip(got, flows):
        vpc = e["aws"]["vpcflow"]
        assert rec["src_ip"] == e["source"]["ip"] == e["source"]["address"]
        assert rec["dst_ip"] == e["destination"]["ip"] == e["destination"]["address"]
        assert rec["src_port"] == e["source"]["port"]
        assert rec["dst_port"] == e["destination"]["port"]
        assert rec["protocol"] == int(e["network"]["iana_number"])
        assert rec["packets"] == e["network"]["packets"] == e["source"]["packets"]
        assert rec["bytes"] == e["network"]["bytes"] == e["source"]["bytes"]
        assert rec["start"] == e["event"]["start"]
        assert rec["end"] == e["event"]["end"]
        assert rec["action"] == actions[vpc["action"]]
        assert rec["tenant"] == vpc["account_id"] == e["cloud"]["account"]["id"]
        assert rec["interface_id"] == vpc["interface_id"]
        assert rec["instance_id"] == vpc.get("instance_id", "")
        assert rec["tcp_flags"] == (int(vpc["tcp_flags"]) if "tcp_flags" in vpc else None)
        assert rec["rev_packets"] == 0 and rec["rev_bytes"] == 0
        assert rec["source_format"] == "aws-vpc" and rec["exporter"] == "test.log"


def test_samples_in_smtp_mode_keep_nothing_and_reject_nothing() -> None:
    for name in SAMPLES:
        lines = (AWS / name).read_text().splitlines()
        b = parse(lines, smtp_ports=(25, 465, 587, 2525))
        assert b.records.num_rows == 0 and b.rejects == []
        assert b.skipped == len(lines)


@pytest.mark.parametrize("name", SAMPLES)
def test_sniff_recognises_samples(name: str) -> None:
    assert sniff((AWS / name).read_text())


def test_sniff_rejects_other_formats() -> None:
    assert not sniff("")
    assert not sniff("\n\n")
    assert not sniff('{"time": "2018-11-13T12:00:35.3899262Z", "records": []}\n')
    assert not sniff("StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State\n")
    assert not sniff("hello world\nthis is not a flow log\n")
    assert not sniff("2 not enough fields\n")
    assert not sniff("#separator \\x09\n#fields\tts\tuid\n")


def test_sniff_rejects_every_other_shared_fixture() -> None:
    others = [f for f in DATA.rglob("*") if f.is_file() and f.parent != AWS]
    assert others
    for f in others:
        head = f.read_bytes()[:8192].decode("utf-8", "replace")
        assert not sniff(head), f


def test_sniff_header_and_cut_last_line() -> None:
    assert sniff("version account-id interface-id srcaddr dstaddr srcport dstport protocol packets bytes start end action log-status\n")
    assert sniff("${srcaddr} ${dstaddr} ${srcport} ${dstport}\n")
    head = v2() + "\n" + v2()[:30]  # a head cut in the middle of the second line
    assert sniff(head)


# ------------------------------------------------------------------- layouts


def test_header_declares_custom_order_and_dollar_style() -> None:
    header = "${start} ${end} ${dstport} ${srcport} ${dstaddr} ${srcaddr} ${protocol} ${bytes} ${packets} ${action} ${tcp-flags} ${account-id} ${instance-id} ${interface-id} ${flow-direction}"
    line = "1700000000 1700000060 587 51000 192.0.2.10 10.1.2.3 6 4321 12 REJECT 2 999988887777 i-0abc - egress"
    b = parse([header, line])
    assert b.skipped == 1 and b.rejects == []
    (rec,) = rows(b)
    assert rec["src_ip"] == "10.1.2.3" and rec["dst_ip"] == "192.0.2.10"
    assert rec["src_port"] == 51000 and rec["dst_port"] == 587
    assert rec["packets"] == 12 and rec["bytes"] == 4321
    assert rec["action"] == "reject" and rec["tcp_flags"] == 2
    assert rec["tenant"] == "999988887777" and rec["instance_id"] == "i-0abc" and rec["interface_id"] == ""
    assert rec["start"] == "2023-11-14T22:13:20.000Z" and rec["end"] == "2023-11-14T22:14:20.000Z"


def test_header_without_optional_fields_uses_record_defaults() -> None:
    header = "srcaddr dstaddr srcport dstport protocol packets bytes start end"
    b = parse([header, "10.0.0.1 10.0.0.2 1234 25 6 1 2 1700000000 1700000001"])
    (rec,) = rows(b)
    assert rec["action"] == "unknown" and rec["tenant"] == "" and rec["tcp_flags"] is None


def test_header_in_first_chunk_applies_to_next_chunk() -> None:
    p = AwsVpcParser("test.log", None)
    header = "srcport srcaddr dstport dstaddr protocol packets bytes start end action"
    b1 = parse([header], parser=p)
    assert b1.skipped == 1 and b1.records.num_rows == 0
    b2 = parse(["40000 10.0.0.1 25 10.0.0.2 6 3 300 1700000000 1700000010 ACCEPT"], parser=p, first_line_no=2)
    (rec,) = rows(b2)
    assert (rec["src_ip"], rec["src_port"], rec["dst_ip"], rec["dst_port"]) == ("10.0.0.1", 40000, "10.0.0.2", 25)
    # a default-format line under that header has the wrong field count
    b3 = parse([v2()], parser=p, first_line_no=3)
    assert "expected 10 fields (header at line 1), got 14" in b3.rejects[0].reason
    assert b3.rejects[0].location == "3"


def test_new_header_switches_layout_mid_chunk() -> None:
    h1 = "srcaddr dstaddr srcport dstport protocol packets bytes start end"
    h2 = "dstaddr srcaddr dstport srcport protocol packets bytes start end"
    data = "10.0.0.1 10.0.0.2 1000 25 6 1 1 1700000000 1700000000"
    b = parse([h1, data, h2, data])
    a, c = rows(b)
    assert (a["src_ip"], a["dst_port"]) == ("10.0.0.1", 25)
    assert (c["src_ip"], c["dst_port"]) == ("10.0.0.2", 1000)
    assert b.skipped == 2


def test_unknown_header_field_rejects_header_and_following_lines_until_valid_header() -> None:
    lines = [
        "version account_id srcaddr dstaddr srcport dstport protocol packets bytes start end",
        v2(),
        "srcaddr dstaddr",  # known names, but not enough for a record
        v2(),
        "srcaddr dstaddr srcport dstport protocol packets bytes start end",
        "10.0.0.1 10.0.0.2 1000 25 6 1 1 1700000000 1700000000",
    ]
    b = parse(lines)
    reasons = [(r.location, r.reason) for r in b.rejects]
    assert reasons[0][0] == "1" and "unknown field name(s) 'account_id'" in reasons[0][1]
    assert reasons[1][0] == "2" and "header at line 1 was rejected" in reasons[1][1]
    assert reasons[2][0] == "3" and "lacks field(s) needed for a record" in reasons[2][1]
    assert reasons[3][0] == "4" and "header at line 3 was rejected" in reasons[3][1]
    assert b.records.num_rows == 1 and b.skipped == 1


def test_duplicate_header_field_is_rejected() -> None:
    b = parse(["srcaddr dstaddr srcport dstport protocol packets bytes start end srcaddr"])
    assert "duplicate field name(s) srcaddr" in b.rejects[0].reason


def test_headerless_all_fields_layouts_v3_v4_v5() -> None:
    base = v2(version=3).split(" ")
    v3 = base + ["vpc-1", "subnet-1", "i-0123", "19", "IPv4", "10.0.0.5", "198.51.100.7"]
    v4 = v3 + ["eu-west-1", "euw1-az1", "-", "-"]
    v5 = v4 + ["-", "AMAZON", "egress", "1"]
    v4[0], v5[0] = "4", "5"
    b = parse([" ".join(v3), " ".join(v4), " ".join(v5)])
    assert b.rejects == []
    assert [r["tcp_flags"] for r in rows(b)] == [19, 19, 19]
    assert [r["instance_id"] for r in rows(b)] == ["i-0123"] * 3


def test_headerless_unknown_layouts_are_rejected_not_guessed() -> None:
    v3_19 = " ".join(v2(version=3).split(" ") + ["vpc-1", "subnet-1", "i-0", "2", "IPv4"])
    v2_29 = " ".join(v2().split(" ") + ["-"] * 15)
    lines = [v3_19, v2_29, "7 " + v2()[2:], "x " + v2()[2:], "6 1 2 3"]
    b = parse(lines)
    assert b.records.num_rows == 0
    r = [x.reason for x in b.rejects]
    assert "expected 21 fields (headerless version 3 all-fields format), got 19" in r[0]
    assert "expected 14 fields (headerless version 2 default format), got 29" in r[1]
    assert "unknown layout: version '7'" in r[2]
    assert "unknown layout: first field 'x' is not a flow log version" in r[3]
    assert "unknown layout: version '6'" in r[4]


def test_mixed_headerless_layouts_keep_input_order() -> None:
    v5 = " ".join(v2(version=5, srcaddr="10.9.9.9").split(" ") + ["vpc", "subnet", "i-5", "3", "IPv4", "-", "-", "r", "az", "-", "-", "-", "-", "egress", "1"])
    lines = [v2(srcaddr="10.0.0.1"), v5, v2(srcaddr="10.0.0.3")]
    got = rows(parse(lines))
    assert [r["src_ip"] for r in got] == ["10.0.0.1", "10.9.9.9", "10.0.0.3"]
    assert [r["tcp_flags"] for r in got] == [None, 3, None]
    assert [r["instance_id"] for r in got] == ["", "i-5", ""]


def test_ipv6_is_canonicalised() -> None:
    b = parse([v2(srcaddr="2001:DB8:0:0:0:0:0:0001", dstaddr="::FFFF:c000:0280")])
    (rec,) = rows(b)
    assert rec["src_ip"] == "2001:db8::1"
    assert rec["dst_ip"] == "::ffff:c000:280"


def test_nodata_and_skipdata_are_skipped() -> None:
    lines = [
        "2 123456789010 eni-1235b8ca123456789 - - - - - - - 1431280876 1431280934 - NODATA",
        "2 123456789010 eni-11111111aaaaaaaaa - - - - - - - 1431280876 1431280934 - SKIPDATA",
    ]
    b = parse(lines, smtp_ports=(25,))
    assert b.skipped == 2 and b.records.num_rows == 0 and b.rejects == []


def test_dash_action_maps_to_unknown() -> None:
    (rec,) = rows(parse([v2(action="-")]))
    assert rec["action"] == "unknown"


def test_blank_lines_are_ignored_but_keep_line_numbers() -> None:
    b = parse(["", v2(srcaddr="bad"), "   ", "\t", v2()], first_line_no=10)
    assert b.read == 2 and b.records.num_rows == 1
    assert b.rejects[0].location == "11"


def test_crlf_and_surrounding_blanks_are_tolerated() -> None:
    b = parse([v2() + "\r", "  " + v2() + "  "])
    assert b.records.num_rows == 2 and b.rejects == []


def test_empty_chunk() -> None:
    b = AwsVpcParser("test.log").parse_lines([], 1)
    assert b.read == 0 and b.records.num_rows == 0 and b.records.schema == record.SCHEMA


# -------------------------------------------------------------- SMTP selection


def test_smtp_filter_and_reverse_attribution() -> None:
    fwd = v2(srcaddr="10.0.0.5", srcport=40001, dstport=25, packets=10, bytes=1000)
    rev = reverse_of(fwd, packets=8, bytes=800)
    fwd587 = v2(srcaddr="10.0.0.6", srcport=40002, dstport=587)  # no reverse seen
    orphan = reverse_of(v2(srcaddr="10.0.0.7", srcport=40003, dstport=465))  # no forward in chunk
    web = v2(dstport=443)
    web_rev = reverse_of(web)
    other_eni = reverse_of(fwd, interface_id="eni-ffffffffffffffff1")  # same tuple, other interface
    lines = [fwd, web, rev, fwd587, orphan, web_rev, other_eni]
    b = parse(lines, smtp_ports=(25, 465, 587, 2525))
    got = rows(b)
    assert [(r["src_ip"], r["dst_port"]) for r in got] == [("10.0.0.5", 25), ("10.0.0.6", 587)]
    assert (got[0]["rev_packets"], got[0]["rev_bytes"]) == (8, 800)
    assert (got[1]["rev_packets"], got[1]["rev_bytes"]) == (0, 0)
    assert got[0]["packets"] == 10 and got[0]["bytes"] == 1000
    assert b.skipped == 5 and b.rejects == []


def test_repeated_connection_pairs_in_order() -> None:
    f1 = v2(packets=1, bytes=100, start=1700000000, end=1700000060)
    f2 = v2(packets=2, bytes=200, start=1700000060, end=1700000120)
    r1 = reverse_of(f1, packets=11, bytes=1100)
    r2 = reverse_of(f2, packets=22, bytes=2200)
    r3 = reverse_of(f2, packets=33, bytes=3300)  # one more reverse than forwards
    got = rows(parse([f1, r1, f2, r2, r3], smtp_ports=(25,)))
    assert [(r["packets"], r["rev_packets"], r["rev_bytes"]) for r in got] == [(1, 11, 1100), (2, 22, 2200)]


def test_smtp_ports_none_keeps_every_flow_without_attribution() -> None:
    fwd = v2()
    b = parse([fwd, reverse_of(fwd), v2(dstport=443)], smtp_ports=None)
    got = rows(b)
    assert len(got) == 3 and b.skipped == 0
    assert all(r["rev_packets"] == 0 for r in got)


def test_custom_smtp_ports() -> None:
    b = parse([v2(dstport=25), v2(dstport=10025)], smtp_ports=[10025])
    assert [r["dst_port"] for r in rows(b)] == [10025]


@pytest.mark.parametrize("ports", [[], [70000], [-1], ["25"], [True]])
def test_bad_smtp_ports_are_a_config_error(ports) -> None:
    with pytest.raises(ConfigError):
        AwsVpcParser("x", ports)


# ------------------------------------------------------------------ bad input


BAD_LINES = [
    (v2()[:50], "wrong field count: expected 14 fields"),
    (v2() + " extra", "got 15"),
    (v2().replace(" ", "  ", 1), "consecutive spaces"),
    ("2 123456789012", "expected 14 fields"),
    (v2(srcaddr="10.0.0.256"), "invalid IP address in srcaddr: '10.0.0.256'"),
    (v2(dstaddr="mail.example.com"), "invalid IP address in dstaddr"),
    (v2(srcaddr="010.0.0.1"), "invalid IP address in srcaddr"),
    (v2(srcaddr="fe80::1%eth0"), "invalid IP address in srcaddr"),
    (v2(srcaddr="1:2:3"), "invalid IP address in srcaddr"),
    (v2(srcaddr="-"), "missing srcaddr"),
    (v2(packets=-5), "negative packets: '-5'"),
    (v2(bytes="-1"), "negative bytes"),
    (v2(bytes="12kB"), "non-numeric bytes"),
    (v2(packets="99999999999999999999"), "packets out of range"),
    (v2(srcport=65536), "srcport out of range: '65536' (max 65535)"),
    (v2(dstport=70000), "dstport out of range"),
    (v2(dstport="-"), "missing dstport"),
    (v2(protocol=256), "protocol out of range: '256' (max 255)"),
    (v2(protocol="tcp"), "non-numeric protocol"),
    (v2(start=1700000100, end=1700000000), "end before start"),
    (v2(start="99999999999999"), "start out of range"),
    (v2(end="soon"), "non-numeric end"),
    (v2(action="ALLOW"), "unknown action: 'ALLOW'"),
    (v2(action="accept"), "unknown action"),
    (v2(interface_id="eni-" + "a" * 300), "interface-id too long"),
    ("\x00\x01\x02\x03 binary \x7f", "binary data: control character"),
    (v2().replace("ACCEPT", "ACC\x00EPT"), "control character '\\x00'"),
    (v2().replace(" ", "\t"), "control character '\\t'"),
    ("caf\u00e9 " + v2(), "non-ASCII character U+00E9"),
    (v2() + " \ufffd\ufffd", "undecodable bytes (U+FFFD"),
    ("2 " + "x" * 100_000, "line too long: 100002 chars"),
    ("hello world", "unknown layout"),
    ("#comment line", "unknown layout"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_becomes_reject_with_reason(line: str, reason: str) -> None:
    good = v2()
    b = parse([good, line, good], smtp_ports=None, first_line_no=5)
    assert b.records.num_rows == 2
    assert len(b.rejects) == 1, [r.reason for r in b.rejects]
    rej = b.rejects[0]
    assert reason in rej.reason
    assert rej.location == "6"
    assert rej.raw == line[:2048] + (f"...[{len(line) - 2048} more chars]" if len(line) > 2048 else "")


def test_all_bad_lines_in_one_chunk() -> None:
    lines = [line for line, _ in BAD_LINES]
    b = parse(lines, smtp_ports=(25,))
    assert b.records.num_rows == 0 and len(b.rejects) == len(lines)
    assert [r.location for r in b.rejects] == [str(i + 1) for i in range(len(lines))]
    for r, (_, reason) in zip(b.rejects, BAD_LINES):
        assert reason in r.reason


def test_undecodable_input_never_raises() -> None:
    raw = bytes(range(256)) * 3
    lines = [
        raw.decode("utf-8", "surrogateescape"),  # lone surrogates: not encodable as UTF-8
        raw.decode("latin-1"),
        raw.decode("utf-8", "replace"),
        v2(),
        b"2 \xff\xfe not utf8",  # bytes where text was expected
        None,
    ]
    b = AwsVpcParser("test.log", None).parse_lines(lines, 1)  # type: ignore[arg-type]
    assert b.records.num_rows == 1
    assert len(b.rejects) == 5
    assert b.read == 6 == b.records.num_rows + b.skipped + len(b.rejects)
    reasons = [r.reason for r in b.rejects]
    assert "undecodable bytes" in reasons[0]
    assert "control character" in reasons[1]
    assert "undecodable bytes" in reasons[3] and "not a text line" in reasons[4]
    for r in b.rejects:
        r.raw.encode("utf-8")  # dead letters are always valid text


def test_none_and_bytes_lines_never_raise() -> None:
    lines = [None, v2(), b"2 123 short"]
    b = AwsVpcParser("test.log", None).parse_lines(lines, 1)  # type: ignore[arg-type]
    assert b.records.num_rows == 1 and b.read == 3
    assert [r.reason.split(":")[0] for r in b.rejects] == ["not a text line (NoneType)", "wrong field count"]
    assert b.rejects[1].raw == "2 123 short"


def test_random_mutations_never_raise_and_always_account() -> None:
    rnd = random.Random(20240601)
    alphabet = "0123456789abcdefABCDEF.:- \t\x00\xe9\ufffdxyz-"
    base = [v2(), reverse_of(v2()), v2(srcaddr="2001:db8::5"), v2(dstport=443)]
    p = AwsVpcParser("test.log", (25,))
    for round_ in range(30):
        lines = []
        for _ in range(200):
            s = list(rnd.choice(base))
            for _ in range(rnd.randrange(0, 4)):
                op = rnd.randrange(3)
                pos = rnd.randrange(len(s) + 1)
                if op == 0 and s:
                    del s[min(pos, len(s) - 1)]
                elif op == 1:
                    s.insert(pos, rnd.choice(alphabet))
                elif s:
                    s[min(pos, len(s) - 1)] = rnd.choice(alphabet)
            lines.append("".join(s))
        first = 1 + 200 * round_
        b = parse(lines, parser=p, first_line_no=first)
        # whatever the vector path accepted, the per-line checks accept too
        rejected = {int(r.location) - first for r in b.rejects}
        for i, line in enumerate(lines):
            if i not in rejected and line.strip():
                layout = HEADERLESS_LAYOUTS[("2", 14)]
                assert _row_problem(line.strip(" \t\r").split(" "), layout) is None, line
                assert "\x00" not in line and "\t" not in line.strip(" \t\r")


def test_valid_lines_match_a_python_reference() -> None:
    """The vector path against a straightforward per-line decode."""
    import ipaddress

    rnd = random.Random(7)
    lines = []
    for _ in range(500):
        if rnd.random() < 0.2:
            src = str(ipaddress.IPv6Address(rnd.getrandbits(128)))
        else:
            src = str(ipaddress.IPv4Address(rnd.getrandbits(32)))
        dst = str(ipaddress.IPv4Address(rnd.getrandbits(32)))
        start = rnd.randrange(0, 2_000_000_000)
        lines.append(v2(srcaddr=src, dstaddr=dst, srcport=rnd.randrange(65536), dstport=rnd.randrange(65536),
                        protocol=rnd.randrange(256), packets=rnd.randrange(10**12), bytes=rnd.randrange(10**18),
                        start=start, end=start + rnd.randrange(600), action=rnd.choice(["ACCEPT", "REJECT", "-"])))
    got = rows(parse(lines))
    assert len(got) == len(lines)
    for rec, line in zip(got, lines):
        t = dict(zip(V2_NAMES, line.split(" ")))
        assert rec["src_ip"] == str(ipaddress.ip_address(t["srcaddr"]))
        assert rec["dst_ip"] == t["dstaddr"]
        assert (rec["src_port"], rec["dst_port"], rec["protocol"]) == (int(t["srcport"]), int(t["dstport"]), int(t["protocol"]))
        assert (rec["packets"], rec["bytes"]) == (int(t["packets"]), int(t["bytes"]))
        import datetime as dt

        want = dt.datetime.fromtimestamp(int(t["start"]), dt.timezone.utc).isoformat(timespec="milliseconds")
        assert rec["start"] == want.replace("+00:00", "Z")


def test_large_chunk_stays_columnar() -> None:
    """A big chunk of valid lines: every line kept, one record per line, in order."""
    lines = [v2(srcport=1024 + i % 60000, start=1700000000 + i, end=1700000000 + i) for i in range(20000)]
    b = parse(lines)
    assert b.records.num_rows == 20000
    col = b.records.column("src_port").to_pylist()
    assert col[:3] == [1024, 1025, 1026] and isinstance(b.records, pa.Table)


# ------------------------------------------------------- blocks of bytes (the reader's path)


def clean_lines(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        line = v2(srcaddr=f"10.0.{rnd.randrange(256)}.{rnd.randrange(256)}", srcport=1024 + rnd.randrange(60000),
                  dstport=rnd.choice([25, 25, 443, 587]), packets=rnd.randrange(1, 10**6), bytes=rnd.randrange(10**9),
                  action=rnd.choice(["ACCEPT", "REJECT", "-"]))
        out.append(line)
        if rnd.random() < 0.3:
            out.append(reverse_of(line))
    return out


def test_a_clean_block_takes_the_column_reader_and_matches_the_line_path() -> None:
    header = " ".join(V2_NAMES)
    for lines in (clean_lines(3000, 1), [header] + clean_lines(3000, 2),
                  [header, v2(start="-", end="-", srcaddr="-", dstaddr="-", srcport="-", dstport="-", protocol="-",
                              packets="-", bytes="-", action="-", log_status="NODATA")] + clean_lines(50, 3)):
        data = "\n".join(lines).encode()
        fast = AwsVpcParser("test.log", (25,))._parse_clean(data, 1)
        assert fast is not None, "a clean block must not need the line-by-line path"
        same_batch(fast, parse(lines, smtp_ports=(25,)))


@pytest.mark.parametrize("token", ["0025", "+25", "0x19", "-25", "25.0", "", "99999", "250000", "-0", "+0", "0X19"])
def test_a_number_the_line_path_would_read_differently_sends_the_block_there(token: str) -> None:
    """Numbers are read by the column reader only when every token is the plain text of its
    value; anything else ("0x19", which the reader would take for 25) is judged line by line."""
    lines = clean_lines(200, 4)
    lines[100] = v2(dstport=token)
    data = "\n".join(lines).encode()
    assert AwsVpcParser("test.log", (25,))._parse_clean(data, 1) is None
    b = parse(lines, smtp_ports=(25,))
    assert [int(r.location) for r in b.rejects] == ([101] if token != "0025" else [])


def test_the_reader_hands_blocks_with_the_lines_of_chunks(tmp_path: Path) -> None:
    from smtpguard.ingest.reader import Opened, expand

    lines = [" ".join(V2_NAMES)] + clean_lines(5000, 5) + ["", "2 bad line", v2() + "\r", " " + v2()]
    f = tmp_path / "flows.log"
    f.write_bytes(("\n".join(lines)).encode())
    src = expand([str(f)])[0]
    by_lines = [(ls, first) for ls, first in Opened(src).chunks(700)]
    blocks = list(Opened(src).blocks(700))
    assert [first for _, first, _ in blocks] == [first for _, first in by_lines]
    p1, p2 = AwsVpcParser("test.log", (25,)), AwsVpcParser("test.log", (25,))
    for (ls, first), (data, _, crlf) in zip(by_lines, blocks):
        same_batch(p2.parse_block(data, first, crlf), p1.parse_lines(ls, first))


def test_hexadecimal_counters_take_the_line_path_even_where_lengths_would_add_up() -> None:
    """The reader takes hexadecimal: "0x2540BE400" has as many characters as 10000000000 has digits, and
    "0xFFFFFFFFFF" (one fewer than its value's) beside a "025" would make the block's lengths add up."""
    for changes in ({10: {"bytes": "0x2540BE400"}}, {10: {"bytes": "0xFFFFFFFFFF"}, 20: {"dstport": "025"}}):
        lines = clean_lines(50, 9)
        for i, fields in changes.items():
            lines[i] = v2(**fields)
        assert AwsVpcParser("test.log", (25,))._parse_clean("\n".join(lines).encode(), 1) is None
        assert 11 in [int(r.location) for r in parse(lines, smtp_ports=(25,)).rejects]


def test_the_x_search_looks_inside_the_block_only() -> None:
    import numpy as np

    from smtpguard.ingest.aws_vpc import _has_x

    whole = b"0x12 34\n56 78\n9 aX"
    for a in range(len(whole)):
        for b in range(a, len(whole) + 1):
            view = memoryview(whole)[a:b]
            want = b"x" in whole[a:b] or b"X" in whole[a:b]
            assert _has_x(view, np.frombuffer(view, np.uint8)) == want, (a, b)
            part = whole[a:b]
            assert _has_x(part, np.frombuffer(part, np.uint8)) == want


def test_a_twenty_digit_counter_takes_the_line_path() -> None:
    lines = clean_lines(50, 9)
    lines[10] = v2(bytes="10000000000000000000")
    assert AwsVpcParser("test.log", (25,))._parse_clean("\n".join(lines).encode(), 1) is None
    assert [int(r.location) for r in parse(lines, smtp_ports=(25,)).rejects] == [11]
