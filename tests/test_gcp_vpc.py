"""GCP VPC Flow Logs (Cloud Logging JSON lines): Elastic's expected output for the
sample, SRC/DEST deduplication, reverse attribution, bad input as dead letters."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.hostile import char_edits, edit_chars

from smtpguard.core import record
from smtpguard.ingest.base import Batch
from smtpguard.ingest.gcp_vpc import GcpVpcParser, sniff

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GCP = DATA / "cloud-flowlogs" / "gcp-vpcflow"
SAMPLE = GCP / "test-vpcflow.first3.log"
EXPECTED = GCP / "test-vpcflow.log-expected.first3.json"
LINES = SAMPLE.read_text().splitlines()


def entry(i: int = 0) -> dict:
    return json.loads(LINES[i])


def smtp_entry(**conn: object) -> dict:
    """The first sample entry turned into a flow to port 25, connection fields overridden."""
    e = entry(0)
    c = e["jsonPayload"]["connection"]
    c.update({"src_port": 40000, "dest_port": 25})
    c.update(conn)
    return e


def reverse(e: dict, **payload: object) -> dict:
    """The server-to-client report of the flow in ``e``, as the client VM (DEST) reports it."""
    r = copy.deepcopy(e)
    p = r["jsonPayload"]
    c = p["connection"]
    c["src_ip"], c["dest_ip"] = c["dest_ip"], c["src_ip"]
    c["src_port"], c["dest_port"] = c["dest_port"], c["src_port"]
    p["reporter"] = "DEST"
    if "src_instance" in p:
        p["dest_instance"] = p.pop("src_instance")
    p.update(payload)
    return r


def parse(objs: list, smtp_ports=None, first: int = 1) -> Batch:
    lines = [o if isinstance(o, str) or o is None or isinstance(o, bytes) else json.dumps(o) for o in objs]
    b = GcpVpcParser("vpc_flows.json", smtp_ports).parse_lines(lines, first)
    assert b.records.schema == record.SCHEMA
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects)
    for r in b.rejects:
        assert r.format == "gcp-vpc" and r.reason and r.reason != "invalid entry"
    return b


def rows(b: Batch) -> list[dict]:
    return record.to_dicts(b.records)


def ms(ts: str) -> str:
    """An RFC 3339 nanosecond time cut to the record's milliseconds."""
    return ts[:23] + "Z"


def test_sample_matches_elastic_expected() -> None:
    expected = json.loads(EXPECTED.read_text())["expected"]
    assert [e["event"]["original"] for e in expected] == LINES
    b = parse(LINES)
    assert b.rejects == [] and b.skipped == 0
    got = rows(b)
    assert len(got) == 3
    for rec, e, raw in zip(got, expected, LINES):
        assert rec["src_ip"] == e["source"]["ip"]
        assert rec["dst_ip"] == e["destination"]["ip"]
        assert rec["src_port"] == e["source"]["port"]
        assert rec["dst_port"] == e["destination"]["port"]
        assert rec["protocol"] == int(e["network"]["iana_number"])
        assert rec["bytes"] == e["source"]["bytes"] == e["network"]["bytes"]
        assert rec["packets"] == e["source"]["packets"] == e["network"]["packets"]
        assert rec["start"] == ms(e["event"]["start"])
        assert rec["end"] == ms(e["event"]["end"])
        assert rec["tenant"] == e["gcp"]["source"]["instance"]["project_id"]
        if "cloud" in e:
            assert rec["tenant"] == e["cloud"]["project"]["id"]
        assert rec["instance_id"] == e["source"]["domain"] == json.loads(raw)["jsonPayload"]["src_instance"]["vm_name"]
        assert rec["action"] == "unknown" and rec["source_format"] == "gcp-vpc"


def test_sample_in_smtp_mode_keeps_nothing() -> None:
    b = parse(LINES, smtp_ports=(25, 465, 587, 2525))
    assert b.records.num_rows == 0 and b.skipped == 3 and b.rejects == []


def test_src_and_dest_reports_of_one_flow_count_once() -> None:
    src = smtp_entry()
    dest = copy.deepcopy(src)
    dest["jsonPayload"]["reporter"] = "DEST"
    dest["jsonPayload"]["bytes_sent"] = "1700"  # the other end sampled differently
    later = copy.deepcopy(src)
    later["jsonPayload"]["start_time"] = "2019-06-14T03:46:37.186193305Z"
    later["jsonPayload"]["end_time"] = "2019-06-14T03:46:38Z"
    b = parse([dest, src, later])
    got = rows(b)
    assert [r["bytes"] for r in got] == [1776, 1776]  # the SRC report wins, the later flow stays
    assert b.skipped == 1


def test_reverse_flow_is_attributed() -> None:
    fwd = smtp_entry()
    rev = reverse(fwd, bytes_sent="555", packets_sent="5")
    other_project = reverse(fwd, bytes_sent="999")
    other_project["jsonPayload"]["dest_instance"]["project_id"] = "someone-else"
    web = smtp_entry(dest_port=443)
    b = parse([fwd, web, rev, other_project], smtp_ports=(25,))
    (rec,) = rows(b)
    assert (rec["packets"], rec["bytes"], rec["rev_packets"], rec["rev_bytes"]) == (7, 1776, 5, 555)
    assert rec["tenant"] == "my-sample-project" and rec["instance_id"] == "kibana"
    assert b.skipped == 3


def test_tenant_falls_back_to_resource_project_and_ports_may_be_absent() -> None:
    e = entry(0)
    del e["jsonPayload"]["src_instance"]
    e["resource"]["labels"]["project_id"] = "host-project"
    icmp = entry(0)
    icmp["jsonPayload"]["connection"] = {"src_ip": "10.0.0.1", "dest_ip": "10.0.0.2", "protocol": 1}
    numeric = entry(0)
    numeric["jsonPayload"]["connection"]["src_port"] = 5602
    numeric["jsonPayload"]["bytes_sent"] = 1776
    numeric["jsonPayload"]["packets_sent"] = 7
    a, b_, c = rows(parse([e, icmp, numeric]))
    assert a["tenant"] == "host-project" and a["instance_id"] == ""
    assert (b_["protocol"], b_["src_port"], b_["dst_port"]) == (1, 0, 0)
    assert (c["bytes"], c["packets"]) == (1776, 7)


def test_other_logs_in_the_export_are_skipped() -> None:
    audit = {"logName": "projects/p/logs/cloudaudit.googleapis.com%2Factivity", "jsonPayload": {"message": "x"}}
    b = parse([audit, LINES[0]])
    assert b.skipped == 1 and b.records.num_rows == 1


def _with(path: str, value: object) -> dict:
    e = entry(0)
    node = e
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    if value is ...:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return e


BAD = [
    (_with("jsonPayload.connection.src_ip", "10.0.0.300"), "invalid IP address in connection.src_ip"),
    (_with("jsonPayload.connection.dest_ip", ...), "missing connection.dest_ip"),
    (_with("jsonPayload.connection.src_port", 70000), "connection.src_port out of range"),
    (_with("jsonPayload.connection.dest_port", -1), "negative connection.dest_port"),
    (_with("jsonPayload.connection.protocol", ...), "missing connection.protocol"),
    (_with("jsonPayload.connection.protocol", 300), "connection.protocol out of range"),
    (_with("jsonPayload.bytes_sent", "-5"), "negative bytes_sent"),
    (_with("jsonPayload.bytes_sent", "12kB"), "non-numeric bytes_sent"),
    (_with("jsonPayload.packets_sent", ...), "missing packets_sent"),
    (_with("jsonPayload.packets_sent", "99999999999999999999999"), "packets_sent out of range"),
    (_with("jsonPayload.start_time", "yesterday"), "invalid start_time: 'yesterday'"),
    (_with("jsonPayload.end_time", "2019-06-14T03:45:37.186193305+02:00"), "invalid end_time"),
    (_with("jsonPayload.end_time", "2019-06-14T03:40:00Z"), "end_time before start_time"),
    (_with("jsonPayload.reporter", "BOTH"), "unknown reporter: 'BOTH'"),
    (_with("jsonPayload.connection", ...), "missing jsonPayload.connection"),
    (_with("jsonPayload.connection.src_port", "5601"), "wrong JSON type: Expected `int | null`, got `str`"),
    (_with("jsonPayload.src_instance.vm_name", "v" * 300), "src_instance.vm_name too long"),
    (LINES[0][:100], "invalid JSON: Input data was truncated"),
    ("[1, 2]", "wrong JSON type: Expected `object`, got `array`"),
    ("garbage", "invalid JSON"),
    ({"insertId": "x"}, "missing jsonPayload"),
]


@pytest.mark.parametrize("obj,reason", BAD, ids=[r for _, r in BAD])
def test_bad_entry_becomes_reject(obj: object, reason: str) -> None:
    b = parse([LINES[0], obj, LINES[1]], first=7)
    assert b.records.num_rows == 2
    (rej,) = b.rejects
    assert reason in rej.reason
    assert rej.location == "8"


def test_undecodable_and_blank_lines() -> None:
    raw = bytes(range(256)).decode("utf-8", "surrogateescape")
    b = parse([raw, None, "", "   ", LINES[0]])
    assert b.records.num_rows == 1 and len(b.rejects) == 2 and b.read == 3


# ------------------------------------------------------------------ properties


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.text(max_size=200), max_size=10))
def test_random_lines_never_raise(lines: list[str]) -> None:
    parse(lines)


_EDITS = char_edits('0123456789.-:"{}[],ZTabc \x00\u00e9', 4)




_BASE = LINES + [json.dumps(smtp_entry()), json.dumps(reverse(smtp_entry()))]


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, len(_BASE) - 1), _EDITS), max_size=20), st.booleans())
def test_mutated_entries_never_raise(picks: list, smtp_only: bool) -> None:
    parse([edit_chars(_BASE[i], e) for i, e in picks], smtp_ports=(25,) if smtp_only else None)


def test_sniff() -> None:
    assert sniff(SAMPLE.read_text())
    assert not sniff('{"jsonPayload": {"message": "hello"}}\n')
    assert not sniff("")
    assert not sniff(EXPECTED.read_text()[:4096])
