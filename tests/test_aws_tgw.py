"""AWS Transit Gateway flow logs in the AWS VPC parser: the version 6 default layout
without a header, the same fields declared by a header, tenant and interface mapping,
reverse attribution per attachment, and layouts that are still refused."""

from __future__ import annotations

import pytest

from smtpguard.core import record
from smtpguard.ingest.aws_vpc import TGW_FIELDS, AwsVpcParser, sniff
from smtpguard.ingest.base import Batch


def tgw(**kw: object) -> str:
    """A Transit Gateway default-format (version 6) line towards port 25, fields overridden."""
    v = {
        "version": "6",
        "resource-type": "TransitGateway",
        "account-id": "999999999999",
        "tgw-id": "tgw-0123456789abcdef0",
        "tgw-attachment-id": "tgw-attach-0aaaaaaaaaaaaaaa1",
        "tgw-src-vpc-account-id": "111111111111",
        "tgw-dst-vpc-account-id": "222222222222",
        "tgw-src-vpc-id": "vpc-0aaaaaaaaaaaaaaa1",
        "tgw-dst-vpc-id": "vpc-0bbbbbbbbbbbbbbb2",
        "tgw-src-subnet-id": "subnet-0aaaaaaaaaaaaaaa1",
        "tgw-dst-subnet-id": "subnet-0bbbbbbbbbbbbbbb2",
        "tgw-src-eni": "eni-0aaaaaaaaaaaaaaa1",
        "tgw-dst-eni": "eni-0bbbbbbbbbbbbbbb2",
        "tgw-src-az-id": "use1-az1",
        "tgw-dst-az-id": "use1-az2",
        "tgw-pair-attachment-id": "tgw-attach-0bbbbbbbbbbbbbbb2",
        "srcaddr": "10.0.1.5",
        "dstaddr": "10.1.2.7",
        "srcport": "40000",
        "dstport": "25",
        "protocol": "6",
        "packets": "10",
        "bytes": "1000",
        "start": "1700000000",
        "end": "1700000060",
        "log-status": "OK",
        "type": "IPv4",
        "packets-lost-no-route": "0",
        "packets-lost-blackhole": "0",
        "packets-lost-mtu-exceeded": "0",
        "packets-lost-ttl-expired": "0",
        "tcp-flags": "3",
        "region": "us-east-1",
        "flow-direction": "ingress",
        "pkt-src-aws-service": "-",
        "pkt-dst-aws-service": "-",
    }
    v.update({k.replace("_", "-"): str(x) for k, x in kw.items()})
    return " ".join(v[f] for f in TGW_FIELDS)


def reverse_of(line: str, **kw: object) -> str:
    t = dict(zip(TGW_FIELDS, line.split(" ")))
    for a, b in (
        ("srcaddr", "dstaddr"),
        ("srcport", "dstport"),
        ("tgw-src-vpc-account-id", "tgw-dst-vpc-account-id"),
        ("tgw-src-vpc-id", "tgw-dst-vpc-id"),
        ("tgw-src-subnet-id", "tgw-dst-subnet-id"),
        ("tgw-src-eni", "tgw-dst-eni"),
        ("tgw-src-az-id", "tgw-dst-az-id"),
    ):
        t[a], t[b] = t[b], t[a]
    t.update({"packets": "7", "bytes": "700", "flow-direction": "egress"})
    t.update({k.replace("_", "-"): str(x) for k, x in kw.items()})
    return " ".join(t[f] for f in TGW_FIELDS)


def parse(lines: list[str], smtp_ports=None) -> Batch:
    b = AwsVpcParser("tgw.log", smtp_ports).parse_lines(lines, 1)
    assert b.records.schema == record.SCHEMA
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects)
    return b


def test_default_layout_has_36_fields_in_aws_order() -> None:
    assert len(TGW_FIELDS) == 36 and len(set(TGW_FIELDS)) == 36
    assert TGW_FIELDS[:5] == ("version", "resource-type", "account-id", "tgw-id", "tgw-attachment-id")
    assert TGW_FIELDS[16:26] == (
        "srcaddr",
        "dstaddr",
        "srcport",
        "dstport",
        "protocol",
        "packets",
        "bytes",
        "start",
        "end",
        "log-status",
    )
    assert TGW_FIELDS[-5:] == ("tcp-flags", "region", "flow-direction", "pkt-src-aws-service", "pkt-dst-aws-service")


def test_headerless_tgw_line() -> None:
    b = parse([tgw()])
    assert b.rejects == []
    (rec,) = record.to_dicts(b.records)
    assert (rec["src_ip"], rec["dst_ip"], rec["src_port"], rec["dst_port"], rec["protocol"]) == (
        "10.0.1.5",
        "10.1.2.7",
        40000,
        25,
        6,
    )
    assert (rec["packets"], rec["bytes"], rec["tcp_flags"]) == (10, 1000, 3)
    assert rec["start"] == "2023-11-14T22:13:20.000Z" and rec["end"] == "2023-11-14T22:14:20.000Z"
    assert rec["tenant"] == "111111111111"  # the source VPC's account
    assert rec["interface_id"] == "eni-0aaaaaaaaaaaaaaa1" and rec["instance_id"] == ""
    assert rec["action"] == "unknown"


def test_tenant_falls_back_to_the_log_account() -> None:
    (rec,) = record.to_dicts(parse([tgw(tgw_src_vpc_account_id="-", tgw_src_eni="-")]).records)
    assert rec["tenant"] == "999999999999" and rec["interface_id"] == ""


def test_reverse_flow_pairs_at_the_same_attachment_across_accounts() -> None:
    fwd = tgw()
    rev = reverse_of(fwd)
    other_attachment = reverse_of(fwd, tgw_attachment_id="tgw-attach-0ccccccccccccccc3", bytes=999)
    b = parse([fwd, other_attachment, rev], smtp_ports=(25,))
    (rec,) = record.to_dicts(b.records)
    assert (rec["rev_packets"], rec["rev_bytes"]) == (7, 700)
    assert b.skipped == 2


def test_nodata_and_other_ports() -> None:
    nodata = tgw(
        srcaddr="-",
        dstaddr="-",
        srcport="-",
        dstport="-",
        protocol="-",
        packets="-",
        bytes="-",
        tcp_flags="-",
        log_status="NODATA",
    )
    b = parse([nodata, tgw(dstport=443)], smtp_ports=(25,))
    assert b.records.num_rows == 0 and b.rejects == [] and b.skipped == 2


def test_header_with_tgw_fields() -> None:
    header = (
        "${version} ${tgw-attachment-id} ${tgw-src-vpc-account-id} ${srcaddr} ${dstaddr} ${srcport} ${dstport} "
        "${protocol} ${packets} ${bytes} ${start} ${end} ${flow-direction}"
    )
    line = "6 tgw-attach-0a 333333333333 10.0.0.1 10.0.0.2 40000 587 6 3 300 1700000000 1700000010 ingress"
    (rec,) = record.to_dicts(parse([header, line]).records)
    assert rec["tenant"] == "333333333333" and rec["dst_port"] == 587 and rec["packets"] == 3


def test_mixed_vpc_and_tgw_lines_keep_order() -> None:
    v2 = "2 123456789012 eni-0a1b2c3d4e5f60718 10.9.9.9 198.51.100.7 40001 25 6 1 100 1700000000 1700000060 ACCEPT OK"
    got = record.to_dicts(parse([tgw(), v2, tgw(srcaddr="10.0.1.6")]).records)
    assert [r["src_ip"] for r in got] == ["10.0.1.5", "10.9.9.9", "10.0.1.6"]
    assert [r["action"] for r in got] == ["unknown", "accept", "unknown"]
    assert [r["tenant"] for r in got] == ["111111111111", "123456789012", "111111111111"]


@pytest.mark.parametrize(
    "line,reason",
    [
        (" ".join(tgw().split(" ")[:30]), "unknown layout: version '6' line with 30 fields"),
        (tgw() + " extra", "unknown layout: version '6' line with 37 fields"),
        ("7 " + tgw()[2:], "unknown layout: version '7' line with 36 fields"),
        (tgw(srcaddr="10.0.1.300"), "invalid IP address in srcaddr"),
        (tgw(packets=-1), "negative packets"),
        (tgw(tgw_src_eni="eni-" + "a" * 300), "tgw-src-eni too long"),
    ],
)
def test_bad_tgw_lines(line: str, reason: str) -> None:
    b = parse([tgw(), line])
    assert b.records.num_rows == 1
    (rej,) = b.rejects
    assert reason in rej.reason


def test_sniff_accepts_tgw() -> None:
    assert sniff(tgw() + "\n" + tgw(srcport=40001) + "\n")
    assert sniff(" ".join(TGW_FIELDS) + "\n")
