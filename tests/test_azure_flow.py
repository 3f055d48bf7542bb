"""Azure NSG (v1, v2) and VNet (v4) flow logs: Elastic's expected output for the NSG
sample, a VNet document built from the documented format, merging of B/C/E tuples,
bad documents, records and tuples as dead letters."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.hostile import char_edits, edit_chars

from smtpguard.core import record
from smtpguard.ingest.azure_flow import AzureFlowParser, sniff
from smtpguard.ingest.base import Batch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NSG = DATA / "cloud-flowlogs" / "azure-nsg" / "test-nsg.log"
NSG_EXPECTED = DATA / "cloud-flowlogs" / "azure-nsg" / "test-nsg.log-expected.json"
SUB = "11111111-2222-3333-4444-555555555555"


def nsg_record(tuples: list[str], version: int = 2, mac: str = "000D3AF87856") -> dict:
    return {
        "time": "2018-11-13T12:00:35.3899262Z",
        "systemId": "a0fca5ce-022c-47b1-9735-89943b42f2fa",
        "category": "NetworkSecurityGroupFlowEvent",
        "resourceId": f"/SUBSCRIPTIONS/{SUB.upper()}/RESOURCEGROUPS/RG/PROVIDERS/MICROSOFT.NETWORK/"
        "NETWORKSECURITYGROUPS/NSG1",
        "operationName": "NetworkSecurityGroupFlowEvents",
        "properties": {
            "Version": version,
            "flows": [{"rule": "DefaultRule_AllowInternetOutBound", "flows": [{"mac": mac, "flowTuples": tuples}]}],
        },
    }


def vnet_record(tuples: list[str]) -> dict:
    """A VNet flow log record (version 4) as Network Watcher writes it."""
    return {
        "time": "2022-09-14T09:00:52.5625085Z",
        "flowLogVersion": 4,
        "flowLogGUID": "66aa66aa-bb77-cc88-dd99-00ee00ee00ee",
        "macAddress": "112233445566",
        "category": "FlowLogFlowEvent",
        "flowLogResourceID": f"/SUBSCRIPTIONS/{SUB.upper()}/RESOURCEGROUPS/NETWORKWATCHERRG/PROVIDERS/"
        "MICROSOFT.NETWORK/"
        "NETWORKWATCHERS/NETWORKWATCHER_EASTUS2EUAP/FLOWLOGS/VNETFLOWLOG",
        "targetResourceID": f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet1",
        "operationName": "FlowLogFlowEvent",
        "flowRecords": {
            "flows": [
                {
                    "aclID": "00000000-1234-abcd-ef00-c1c2c3c4c5c6",
                    "flowGroups": [{"rule": "DefaultRule_AllowInternetOutBound", "flowTuples": tuples}],
                }
            ]
        },
    }


def doc(*records: dict, indent: int | None = 2) -> bytes:
    return json.dumps({"records": list(records)}, indent=indent).encode()


def parse(data: bytes, smtp_ports=None) -> Batch:
    batches = list(AzureFlowParser("PT1H.json", smtp_ports).parse_stream(io.BytesIO(data), "PT1H.json"))
    assert len(batches) == 1
    b = batches[0]
    assert b.records.schema == record.SCHEMA
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects)
    for r in b.rejects:
        assert r.format == "azure-flow" and r.source == "PT1H.json" and r.reason and r.reason != "invalid flow tuple"
    return b


def rows(b: Batch) -> list[dict]:
    return record.to_dicts(b.records)


def test_nsg_sample_matches_elastic_expected() -> None:
    (e,) = json.loads(NSG_EXPECTED.read_text())["expected"]
    b = parse(NSG.read_bytes())
    assert b.rejects == [] and b.read == 1
    (rec,) = rows(b)
    (t,) = e["azure_network_watcher_nsg"]["log"]["properties"]["flows"][0]["flows"][0]["tuples"]
    assert rec["src_ip"] == t["source"]["ip"] and rec["src_port"] == t["source"]["port"]
    assert rec["dst_ip"] == t["destination"]["ip"] and rec["dst_port"] == t["destination"]["port"]
    assert rec["protocol"] == 6 and t["protocol"] == "TCP"
    assert (rec["packets"], rec["bytes"]) == (t["packets"]["sent"], t["bytes"]["sent"])
    assert (rec["rev_packets"], rec["rev_bytes"]) == (t["packets"]["received"], t["bytes"]["received"])
    assert rec["start"] == rec["end"] == t["timestamp"]
    assert rec["action"] == "accept" and t["traffic"]["decision"] == "Allowed"
    assert rec["interface_id"] == e["source"]["mac"][0] == "00-0D-3A-F8-78-56"
    assert rec["tenant"] == "00000000-0000-0000-0000-000000000000"
    assert rec["source_format"] == "azure-flow"


def test_nsg_sample_in_smtp_mode() -> None:
    b = parse(NSG.read_bytes(), smtp_ports=(25,))
    assert b.records.num_rows == 0 and b.skipped == 1


def test_nsg_v2_flow_states_merge_into_one_connection() -> None:
    tuples = [
        "1542110377,10.1.0.4,192.0.2.10,44000,25,T,O,A,B,,,,",
        "1542110400,10.1.0.4,192.0.2.10,44000,25,T,O,A,C,10,1000,8,600",
        "1542110437,10.1.0.4,192.0.2.10,44000,25,T,O,A,E,2,200,1,60",
        "1542110438,10.1.0.4,192.0.2.10,44000,25,T,O,A,B,,,,",  # the same 5-tuple again: a new connection
        "1542110440,10.1.0.4,198.51.100.7,44001,25,T,O,D,B,,,,",  # denied
        "1542110441,10.1.0.4,198.51.100.7,44002,443,T,O,A,E,1,1,1,1",
    ]
    b = parse(doc(nsg_record(tuples)), smtp_ports=(25,))
    got = rows(b)
    assert b.rejects == [] and b.read == 6 and b.skipped == 3
    first, again, denied = got
    assert (first["start"], first["end"]) == ("2018-11-13T11:59:37.000Z", "2018-11-13T12:00:37.000Z")
    assert (first["packets"], first["bytes"], first["rev_packets"], first["rev_bytes"]) == (12, 1200, 9, 660)
    assert first["action"] == "accept" and first["tenant"] == SUB
    assert (again["packets"], again["start"]) == (0, "2018-11-13T12:00:38.000Z")
    assert denied["action"] == "reject" and denied["dst_ip"] == "198.51.100.7"


def test_nsg_v1_tuples_stand_alone() -> None:
    tuples = [
        "1491143966,10.2.0.4,23.99.34.232,37560,25,T,O,A",
        "1491143966,10.2.0.4,23.99.34.232,37560,25,T,O,A",
        "1491143984,10.2.0.4,91.189.89.199,56559,123,U,I,D",
    ]
    got = rows(parse(doc(nsg_record(tuples, version=1))))
    assert len(got) == 3
    assert [(r["protocol"], r["action"], r["packets"]) for r in got] == [
        (6, "accept", 0),
        (6, "accept", 0),
        (17, "reject", 0),
    ]


def test_vnet_v4_document() -> None:
    tuples = [
        "1663146003599,10.0.0.6,192.0.2.180,23956,25,6,O,B,NX,0,0,0,0",
        "1663146003606,10.0.0.6,192.0.2.180,23956,25,6,O,E,NX,3,767,2,1580",
        "1663146003620,10.0.0.6,192.0.2.181,23957,587,6,O,D,NX,0,0,0,0",
        "1663146003630,2001:DB8::6,2001:db8::25,23958,25,6,O,C,X,5,500,4,400",
        "1663146003640,10.0.0.6,192.0.2.182,23959,53,17,O,E,NX,1,70,1,120",
    ]
    b = parse(doc(vnet_record(tuples)), smtp_ports=(25, 587))
    assert b.rejects == []
    a, denied, v6 = rows(b)
    assert (a["start"], a["end"]) == ("2022-09-14T09:00:03.599Z", "2022-09-14T09:00:03.606Z")
    assert (a["packets"], a["bytes"], a["rev_packets"], a["rev_bytes"], a["action"]) == (3, 767, 2, 1580, "accept")
    assert a["tenant"] == SUB and a["interface_id"] == "11-22-33-44-55-66"
    assert denied["action"] == "reject" and denied["dst_port"] == 587
    assert v6["src_ip"] == "2001:db8::6" and (v6["packets"], v6["rev_bytes"]) == (5, 400)
    assert b.skipped == 2  # the merged B tuple and the DNS flow


def test_single_record_and_json_lines_forms() -> None:
    tuples = ["1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,1,60,1,60"]
    assert len(rows(parse(json.dumps(nsg_record(tuples)).encode()))) == 1
    lines = (
        b"\n".join(
            [
                json.dumps(nsg_record(tuples)).encode(),
                doc(vnet_record(["1663146003606,10.0.0.6,192.0.2.180,23956,25,6,O,E,NX,3,767,2,1580"]), indent=None),
            ]
        )
        + b"\n"
    )
    assert len(rows(parse(lines))) == 2


def test_one_bad_record_does_not_cost_the_others() -> None:
    good = nsg_record(["1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,1,60,1,60"])
    bad_type = nsg_record([])
    bad_type["properties"]["flows"] = "not a list"
    not_flow = {"category": "SomethingElse", "time": "2018-11-13T12:00:35Z"}
    future = nsg_record(["1,10.0.0.1,10.0.0.2,1,25,T,O,A"], version=9)
    b = parse(doc(bad_type, good, not_flow, future))
    assert b.records.num_rows == 1
    reasons = {r.location: r.reason for r in b.rejects}
    assert "wrong JSON type" in reasons["records[0]"] and "$.properties.flows" in reasons["records[0]"]
    assert "not a flow log record" in reasons["records[2]"]
    assert "unsupported NSG flow log version: 9" in reasons["records[3]"]


TUPLE_BAD = [
    (
        "1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,1,60,1",
        "wrong field count: expected 13 fields (version 2 tuple), got 12",
    ),
    ("1542110379,10.0.0.300,10.0.0.2,40000,25,T,O,A,E,1,60,1,60", "invalid IP address in source address"),
    ("1542110379,10.0.0.1,10.0.0.2,70000,25,T,O,A,E,1,60,1,60", "source port out of range"),
    ("1542110379,10.0.0.1,10.0.0.2,40000,25,X,O,A,E,1,60,1,60", "unknown protocol: 'X'"),
    ("1542110379,10.0.0.1,10.0.0.2,40000,25,T,N,A,E,1,60,1,60", "unknown direction: 'N'"),
    ("1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,Q,E,1,60,1,60", "unknown decision: 'Q'"),
    ("1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,A,Z,1,60,1,60", "unknown flow state: 'Z'"),
    ("1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,-1,60,1,60", "negative packets s2d"),
    ("1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,1,6e1,1,60", "non-numeric bytes s2d"),
    ("1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,,,,", "missing packets s2d (empty)"),
    ("soon,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,1,60,1,60", "non-numeric timestamp"),
    ("99999999999999,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,1,60,1,60", "timestamp out of range"),
]


@pytest.mark.parametrize("tup,reason", TUPLE_BAD, ids=[r for _, r in TUPLE_BAD])
def test_bad_tuple_becomes_reject(tup: str, reason: str) -> None:
    good = "1542110379,10.0.0.1,10.0.0.2,40000,25,T,O,A,E,1,60,1,60"
    b = parse(doc(nsg_record([good, tup])))
    assert b.records.num_rows == 1
    (rej,) = b.rejects
    assert reason in rej.reason
    assert rej.location == "records[0].properties.flows[0].flows[0].flowTuples[1]"
    assert rej.raw == tup


def test_bad_vnet_tuple() -> None:
    b = parse(doc(vnet_record(["1663146003606,10.0.0.6,192.0.2.180,23956,25,600,O,E,NX,3,767,2,1580"])))
    assert "protocol out of range" in b.rejects[0].reason


@pytest.mark.parametrize(
    "data,reason",
    [
        (NSG.read_bytes()[:150], "invalid JSON: Input data was truncated"),
        (doc(vnet_record(["1663146003606,10.0.0.6,192.0.2.180,23956,25,6,O,E,NX,3,767,2,1580"]))[:-40], "invalid JSON"),
        (b"[1, 2, 3]", "not an Azure flow log document: top level is list"),
        (b"\x00\x01\x02\xff garbage", "invalid JSON"),
    ],
)
def test_bad_document_is_one_reject(data: bytes, reason: str) -> None:
    b = parse(data)
    assert b.records.num_rows == 0 and b.read == 1
    (rej,) = b.rejects
    assert reason in rej.reason and rej.location == "document"
    rej.raw.encode("utf-8")


def test_empty_input() -> None:
    b = parse(b"  \n")
    assert b.read == 0 and b.records.num_rows == 0 and b.rejects == []


# ------------------------------------------------------------------ properties


@settings(max_examples=80, deadline=None, database=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_raise(data: bytes) -> None:
    parse(data)


_EDITS = char_edits(b'0123456789.,:-"{}[]TUOIABCDE \x00', 4)
_BASE = doc(
    nsg_record(
        [
            "1542110377,10.1.0.4,192.0.2.10,44000,25,T,O,A,B,,,,",
            "1542110437,10.1.0.4,192.0.2.10,44000,25,T,O,A,E,2,200,1,60",
        ]
    ),
    vnet_record(["1663146003606,10.0.0.6,192.0.2.180,23956,25,6,O,E,NX,3,767,2,1580"]),
    indent=None,
)


@settings(max_examples=80, deadline=None, database=None)
@given(_EDITS, st.booleans())
def test_mutated_documents_never_raise(edits: list, smtp_only: bool) -> None:
    parse(edit_chars(_BASE, edits), smtp_ports=(25,) if smtp_only else None)


def test_sniff() -> None:
    assert sniff(NSG.read_bytes())
    assert sniff(doc(vnet_record([])))
    assert sniff(doc(nsg_record(["1,10.0.0.1,10.0.0.2,1,2,T,O,A"])))
    assert not sniff(NSG_EXPECTED.read_bytes())
    assert not sniff(b'{"records": []}')
    assert not sniff(b"")
