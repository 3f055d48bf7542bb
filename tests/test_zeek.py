"""Zeek conn.log / smtp.log parser: Zeek's own smtp.log baselines, conn.log in TSV and
JSON, headers, other logs, bad input as dead letters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.hostile import char_edits, edit_chars

from smtpguard.core import record
from smtpguard.ingest.base import Batch
from smtpguard.ingest.zeek import ZeekParser, sniff

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BASELINE = DATA / "smtp" / "zeek" / "Baseline"
BASIC = BASELINE / "scripts.base.protocols.smtp.basic" / "smtp.log"
STARTTLS = BASELINE / "scripts.base.protocols.smtp.starttls" / "smtp.log"
INVALID = BASELINE / "scripts.base.protocols.smtp.mail-transactions-invalid" / "smtp.log"
#: btest replaces timestamps in baselines with this placeholder
CANON_TS = "XXXXXXXXXX.XXXXXX"
#: start of the first session of smtp.pcap (scripts.policy.misc.dump-events)
PCAP_TS = "1254722767.529046"

CONN_HEADER = [
    "#separator \\x09",
    "#set_separator\t,",
    "#empty_field\t(empty)",
    "#unset_field\t-",
    "#path\tconn",
    "#open\t2009-10-05-06-06-07",
    "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration\torig_bytes\tresp_bytes"
    "\tconn_state\tlocal_orig\tlocal_resp\tmissed_bytes\thistory\torig_pkts\torig_ip_bytes\tresp_pkts\tresp_ip_bytes"
    "\ttunnel_parents",
    "#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring\tbool\tbool\tcount"
    "\tstring\tcount\tcount\tcount\tcount\tset[string]",
]
CONN_NAMES = CONN_HEADER[6].split("\t")[1:]


def conn(**kw: object) -> str:
    """A conn.log TSV line: the first SMTP session of smtp.pcap, with fields overridden."""
    v = {
        "ts": PCAP_TS,
        "uid": "CHhAvVGS1DHFjwGM9",
        "id.orig_h": "10.10.1.4",
        "id.orig_p": "1470",
        "id.resp_h": "74.53.140.153",
        "id.resp_p": "25",
        "proto": "tcp",
        "service": "smtp",
        "duration": "7.299470",
        "orig_bytes": "20372",
        "resp_bytes": "350",
        "conn_state": "SF",
        "local_orig": "-",
        "local_resp": "-",
        "missed_bytes": "0",
        "history": "ShAdDaFf",
        "orig_pkts": "28",
        "orig_ip_bytes": "21673",
        "resp_pkts": "25",
        "resp_ip_bytes": "1546",
        "tunnel_parents": "-",
    }
    v.update({k.replace("__", "."): str(x) for k, x in kw.items()})
    return "\t".join(v[n] for n in CONN_NAMES)


def parse(lines: list, smtp_ports=None, first: int = 1, parser: ZeekParser | None = None) -> Batch:
    p = parser or ZeekParser("conn.log", smtp_ports)
    b = p.parse_lines(lines, first)
    assert b.records.schema == record.SCHEMA
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects)
    for r in b.rejects:
        assert r.format == "zeek" and r.reason and r.reason != "invalid record"
    return b


def rows(b: Batch) -> list[dict]:
    return record.to_dicts(b.records)


def baseline(path: Path) -> list[str]:
    return path.read_text().replace(CANON_TS, PCAP_TS).splitlines()


# ------------------------------------------------------------------ smtp.log baselines


def test_smtp_basic_baseline() -> None:
    b = parse(baseline(BASIC), smtp_ports=(25,))
    assert b.rejects == []
    first, second = rows(b)
    assert (first["src_ip"], first["src_port"], first["dst_ip"], first["dst_port"]) == (
        "10.10.1.4",
        1470,
        "74.53.140.153",
        25,
    )
    assert (first["helo"], first["mail_from_domain"], first["rcpt_count"]) == ("GP", "patriots.in", 1)
    assert (first["reply_last"], first["starttls"], first["conn_state"]) == (250, False, "completed")
    assert (second["src_ip"], second["src_port"], second["dst_ip"]) == ("192.168.133.100", 49648, "192.168.133.102")
    assert (second["helo"], second["mail_from_domain"], second["rcpt_count"]) == ("[192.168.133.100]", "example.com", 3)
    assert first["start"] == first["end"] == "2009-10-05T06:06:07.529Z"
    assert first["protocol"] == 6 and first["packets"] == 0 and first["action"] == "unknown"
    assert first["source_format"] == "zeek" and first["exporter"] == "conn.log"


def test_smtp_starttls_baseline() -> None:
    (rec,) = rows(parse(baseline(STARTTLS)))
    assert (rec["helo"], rec["mail_from_domain"], rec["rcpt_count"]) == ("openssl.client.net", "", 0)
    assert (rec["reply_last"], rec["starttls"]) == (220, True)


def test_smtp_invalid_transactions_baseline() -> None:
    got = rows(parse(baseline(INVALID)))
    assert [(r["mail_from_domain"], r["rcpt_count"], r["reply_last"]) for r in got] == [
        ("example.org", 1, 250),
        ("", 1, 500),
        ("example.org", 0, 500),
        ("example.org", 1, 250),
    ]
    assert {r["helo"] for r in got} == {"Bob-PC"}


def test_canonicalised_baseline_timestamps_are_rejected() -> None:
    b = parse(BASIC.read_text().splitlines())
    assert b.records.num_rows == 0 and len(b.rejects) == 2
    assert all(r.reason == "invalid ts: 'XXXXXXXXXX.XXXXXX' (expected epoch seconds)" for r in b.rejects)


def test_other_zeek_logs_are_skipped() -> None:
    for rel in (
        "scripts.base.protocols.smtp.starttls/ssl.log",
        "scripts.base.protocols.smtp.attachment/files.log",
        "scripts.base.protocols.smtp.mail-transactions-invalid/weird.log",
    ):
        lines = baseline(BASELINE / rel)
        b = parse(lines)
        assert b.records.num_rows == 0 and b.rejects == []
        assert b.skipped == len(lines)


# ------------------------------------------------------------------ conn.log


def test_conn_tsv() -> None:
    b = parse(CONN_HEADER + [conn(), "#close\t2009-10-05-06-06-15"], smtp_ports=(25,))
    assert b.skipped == len(CONN_HEADER) + 1
    (rec,) = rows(b)
    assert (rec["src_ip"], rec["src_port"], rec["dst_ip"], rec["dst_port"], rec["protocol"]) == (
        "10.10.1.4",
        1470,
        "74.53.140.153",
        25,
        6,
    )
    # IP-level counters, like the IPFIX export of the same session (28 pkts 21673 B, reverse 25 pkts 1546 B)
    assert (rec["packets"], rec["bytes"], rec["rev_packets"], rec["rev_bytes"]) == (28, 21673, 25, 1546)
    assert rec["start"] == "2009-10-05T06:06:07.529Z" and rec["end"] == "2009-10-05T06:06:14.828Z"
    assert rec["conn_state"] == "completed" and rec["tcp_flags"] is None and rec["helo"] == ""


def test_conn_without_ip_bytes_uses_payload_bytes() -> None:
    header = CONN_HEADER[:6] + [
        "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tduration"
        "\torig_bytes\tresp_bytes\tconn_state"
    ]
    b = parse(header + ["1.5\tC1\t10.0.0.1\t1000\t10.0.0.2\t25\ttcp\t-\t100\t200\tS1"])
    (rec,) = rows(b)
    assert (rec["bytes"], rec["rev_bytes"], rec["packets"]) == (100, 200, 0)
    assert rec["start"] == rec["end"] == "1970-01-01T00:00:01.500Z"


@pytest.mark.parametrize(
    "state,expected",
    [
        ("S0", "unanswered"),
        ("SH", "unanswered"),
        ("RSTOS0", "unanswered"),
        ("REJ", "refused"),
        ("SF", "completed"),
        ("S1", "completed"),
        ("S3", "completed"),
        ("RSTO", "reset"),
        ("RSTR", "reset"),
        ("OTH", ""),
        ("SHR", ""),
    ],
)
def test_conn_states(state: str, expected: str) -> None:
    (rec,) = rows(parse(CONN_HEADER + [conn(conn_state=state)]))
    assert rec["conn_state"] == expected


def test_udp_icmp_and_unset_counters() -> None:
    lines = [
        conn(proto="udp", id__resp_p=53, conn_state="SF"),
        conn(proto="icmp", id__orig_h="2001:db8::1", id__resp_h="2001:db8::2", id__orig_p=128, id__resp_p=129),
        conn(orig_pkts="-", orig_ip_bytes="-", duration="-"),
    ]
    udp, icmp6, unset = rows(parse(CONN_HEADER + lines))
    assert udp["protocol"] == 17 and udp["conn_state"] == ""
    assert icmp6["protocol"] == 58
    assert unset["packets"] == 0 and unset["bytes"] == 0 and unset["start"] == unset["end"]


def test_unknown_transport_is_skipped() -> None:
    b = parse(CONN_HEADER + [conn(proto="unknown_transport")])
    assert b.records.num_rows == 0 and b.rejects == [] and b.skipped == len(CONN_HEADER) + 1


def test_smtp_filter() -> None:
    b = parse(CONN_HEADER + [conn(), conn(id__resp_p=443), conn(id__orig_p=25, id__resp_p=40000)], smtp_ports=(25,))
    assert [r["dst_port"] for r in rows(b)] == [25]
    assert b.skipped == len(CONN_HEADER) + 2


def test_header_state_carries_across_chunks_and_new_sections() -> None:
    p = ZeekParser("conn.log", None)
    parse(CONN_HEADER, parser=p)
    b = parse([conn()], parser=p, first=9)
    assert b.records.num_rows == 1
    # a new section with another separator and column order
    names = ["id.resp_p", "id.resp_h", "id.orig_p", "id.orig_h", "proto", "ts", "conn_state"]
    section = ["#separator ,", "#path,conn", "#fields," + ",".join(names), "25,192.0.2.1,4000,10.0.0.9,tcp,10.0,S0"]
    b = parse(section, parser=p, first=10)
    (rec,) = rows(b)
    assert (rec["src_ip"], rec["dst_ip"], rec["src_port"], rec["conn_state"]) == (
        "10.0.0.9",
        "192.0.2.1",
        4000,
        "unanswered",
    )


def test_data_before_fields_is_rejected() -> None:
    b = parse([conn()])
    assert "no #fields header line" in b.rejects[0].reason


def test_fields_missing_columns_rejects_section() -> None:
    b = parse(["#path\tconn", "#fields\tts\tuid\tid.orig_h", "1.0\tC\t10.0.0.1"])
    assert "lacks field(s) needed for a record: id.orig_p, id.resp_h, id.resp_p, proto" in b.rejects[0].reason
    assert "the #fields line 2 was rejected" in b.rejects[1].reason


def test_escaped_text_in_smtp_log() -> None:
    lines = baseline(BASIC)
    lines = [ln.replace("\tGP\t", "\tmail\\x09host\\x2c1\t") for ln in lines]
    got = rows(parse(lines))
    assert got[0]["helo"] == "mail\thost,1"


# ------------------------------------------------------------------ JSON


def test_json_conn_and_smtp() -> None:
    c = {
        "ts": 1254722767.529046,
        "uid": "C1",
        "id.orig_h": "10.10.1.4",
        "id.orig_p": 1470,
        "id.resp_h": "74.53.140.153",
        "id.resp_p": 25,
        "proto": "tcp",
        "duration": 7.29947,
        "orig_pkts": 28,
        "orig_ip_bytes": 21673,
        "resp_pkts": 25,
        "resp_ip_bytes": 1546,
        "conn_state": "SF",
        "history": "ShAdDaFf",
    }
    s = {
        "ts": "2009-10-05T06:06:07.529046Z",
        "uid": "C1",
        "id.orig_h": "10.10.1.4",
        "id.orig_p": 1470,
        "id.resp_h": "74.53.140.153",
        "id.resp_p": 25,
        "trans_depth": 1,
        "helo": "GP",
        "mailfrom": "<Gurpartap@Patriots.IN>",
        "rcptto": ["a@b.example", "c@d.example"],
        "last_reply": "250 OK",
        "tls": False,
    }
    dns = {
        "ts": 1.0,
        "uid": "C2",
        "id.orig_h": "10.0.0.1",
        "id.orig_p": 53000,
        "id.resp_h": "10.0.0.2",
        "id.resp_p": 53,
        "query": "example.com",
    }
    b = parse([json.dumps(c), json.dumps(s), json.dumps(dns)], smtp_ports=(25,))
    assert b.skipped == 1 and b.rejects == []
    jc, js = rows(b)
    assert (jc["packets"], jc["bytes"], jc["rev_packets"], jc["rev_bytes"], jc["conn_state"]) == (
        28,
        21673,
        25,
        1546,
        "completed",
    )
    assert jc["end"] == "2009-10-05T06:06:14.828Z"
    assert (js["helo"], js["mail_from_domain"], js["rcpt_count"], js["reply_last"], js["starttls"]) == (
        "GP",
        "patriots.in",
        2,
        250,
        False,
    )
    assert js["start"] == jc["start"]


JSON_BAD = [
    (
        '{"ts": 1, "uid": "C", "id.orig_h": "10.0.0.1", "id.orig_p": "x", "id.resp_h": "10.0.0.2", "id.resp_p": 25, '
        '"proto": "tcp", "conn_state": "SF"}',
        "wrong JSON type: Expected `int | null`, got `str` - at `$.id.orig_p`",
    ),
    (
        '{"ts": 1, "uid": "C", "id.orig_h": "10.0.0.1", "id.orig_p": 70000, "id.resp_h": "10.0.0.2", "id.resp_p": 25, '
        '"proto": "tcp", "conn_state": "SF"}',
        "id.orig_p out of range",
    ),
    (
        '{"ts": 1, "uid": "C", "id.orig_h": "10.0.0.1", "id.orig_p": 1, "id.resp_h": "10.0.0.2", "id.resp_p": 25, '
        '"proto": "tcp", "conn_state": "SF", "orig_pkts": -3}',
        "negative orig_pkts",
    ),
    (
        '{"ts": -5, "uid": "C", "id.orig_h": "10.0.0.1", "id.orig_p": 1, "id.resp_h": "10.0.0.2", "id.resp_p": 25, '
        '"proto": "tcp", "conn_state": "SF"}',
        "invalid ts: '-5.0'",
    ),
    (
        '{"ts": 1, "uid": "C", "id.orig_h": "10.0.0.1", "id.orig_p": 1, "id.resp_h": "10.0.0.2", "id.resp_p": 25, '
        '"conn_state": "SF"}',
        "missing proto",
    ),
    ('{"ts": 1, "uid": "C", "id.orig_h": "10.0.0.1", "id.orig_p": 1', "invalid JSON: Input data was truncated"),
    ('{"hello": "world"}', "not a Zeek conn or smtp record"),
]


@pytest.mark.parametrize("line,reason", JSON_BAD, ids=[r for _, r in JSON_BAD])
def test_bad_json_line(line: str, reason: str) -> None:
    b = parse([line])
    (rej,) = b.rejects
    assert reason in rej.reason and rej.location == "1"


# ------------------------------------------------------------------ bad TSV input

TSV_BAD = [
    (conn()[:30], "wrong field count: expected 21 fields (#fields at line 7), got"),
    (conn(ts="soon"), "invalid ts: 'soon'"),
    (conn(ts="-1.0"), "invalid ts"),
    (conn(id__orig_h="10.0.0.300"), "invalid IP address in id.orig_h"),
    (conn(id__resp_h="-"), "missing id.resp_h"),
    (conn(id__orig_p=65536), "id.orig_p out of range"),
    (conn(id__resp_p="-25"), "negative id.resp_p"),
    (conn(proto="sctp"), "unknown proto: 'sctp'"),
    (conn(duration="-3.0"), "negative duration"),
    (conn(duration="long"), "invalid duration"),
    (conn(orig_pkts="-1"), "negative orig_pkts"),
    (conn(resp_ip_bytes="1e9"), "non-numeric resp_ip_bytes"),
    (conn(orig_ip_bytes="99999999999999999999999"), "orig_ip_bytes out of range"),
    (conn(conn_state="XX"), "unknown conn_state: 'XX'"),
    ("\x00\x01\x02 binary", "wrong field count"),
    ("x" * 70000, "line too long"),
]


@pytest.mark.parametrize("line,reason", TSV_BAD, ids=[r for _, r in TSV_BAD])
def test_bad_tsv_line(line: str, reason: str) -> None:
    b = parse(CONN_HEADER + [conn(), line, conn()], first=1)
    assert b.records.num_rows == 2
    (rej,) = b.rejects
    assert reason in rej.reason
    assert rej.location == str(len(CONN_HEADER) + 2)


def test_bad_smtp_fields() -> None:
    lines = baseline(BASIC)
    bad_tls = [ln.replace("\tF\tFmFp", "\tmaybe\tFmFp") for ln in lines]
    b = parse(bad_tls)
    assert "invalid tls: 'maybe'" in b.rejects[0].reason
    bad_helo = [ln.replace("\tGP\t", "\tG\x01P\t") for ln in lines]
    assert "binary data in helo" in parse(bad_helo).rejects[0].reason


def test_undecodable_lines_never_raise() -> None:
    raw = bytes(range(256)).decode("utf-8", "surrogateescape")
    b = parse(CONN_HEADER + [raw, None, b"\xff", conn()])
    assert b.records.num_rows == 1 and len(b.rejects) == 3


# ------------------------------------------------------------------ properties

_ALPHABET = '0123456789.-\t,#{}":tcpSFREJ\x00\u00e9abx'


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.text(alphabet=_ALPHABET, max_size=120), max_size=15))
def test_random_lines_never_raise(lines: list[str]) -> None:
    parse(CONN_HEADER + lines)
    parse(lines)


_EDITS = char_edits(_ALPHABET, 3)




_BASE = (
    CONN_HEADER
    + [conn(), conn(conn_state="S0", id__resp_p=587)]
    + baseline(BASIC)
    + [
        '{"ts":1.5,"uid":"C","id.orig_h":"10.0.0.1","id.orig_p":1,"id.resp_h":"10.0.0.2","id.resp_p":25,"proto":"tcp",'
        '"conn_state":"SF","orig_pkts":3}'
    ]
)


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, len(_BASE) - 1), _EDITS), max_size=25), st.booleans())
def test_mutated_logs_never_raise(picks: list, smtp_only: bool) -> None:
    parse([edit_chars(_BASE[i], e) for i, e in picks], smtp_ports=(25,) if smtp_only else None)


# ------------------------------------------------------------------ sniff


def test_sniff() -> None:
    assert sniff(BASIC.read_text())
    assert sniff("\n".join(CONN_HEADER))
    assert sniff('{"ts":1.0,"uid":"C","id.orig_h":"10.0.0.1","id.orig_p":1}\n')
    assert not sniff('{"ts":1.0,"src":"10.0.0.1"}\n')
    assert not sniff(conn())
    assert not sniff("")
    assert not sniff("# just a comment\n")
