"""Argus CSV (CTU-13 .binetflow) parser: the labelled CTU-13 slices, the mapping of
states and counters, header handling, bad input as dead letters, labels()."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.hostile import char_edits, edit_chars

from smtpguard.core import record
from smtpguard.ingest.argus import ArgusParser, Layout, _row_problem, labels, sniff
from smtpguard.ingest.base import Batch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CTU = DATA / "labelled-flows" / "ctu13-scenario6-capture20110816"
SPAM_SLICE = CTU / "capture20110816.binetflow.slice_13_1"
IDLE_SLICE = CTU / "capture20110816.binetflow.slice_1_2"
HEADER = "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,TotPkts,TotBytes,SrcBytes,Label"
BOT = "147.32.84.165"


def flow(**kw: object) -> str:
    v = {
        "StartTime": "2011/08/16 12:00:00.239000",
        "Dur": "2.920000",
        "Proto": "tcp",
        "SrcAddr": "10.0.0.5",
        "Sport": "1879",
        "Dir": "   ->",
        "DstAddr": "192.0.2.10",
        "Dport": "25",
        "State": "S_",
        "sTos": "0",
        "dTos": "",
        "TotPkts": "2",
        "TotBytes": "124",
        "SrcBytes": "124",
        "Label": "flow=Background",
    }
    v.update({k: str(x) for k, x in kw.items()})
    return ",".join(v[c] for c in HEADER.split(","))


def parse(lines: list, smtp_ports=None, first: int = 1, parser: ArgusParser | None = None) -> Batch:
    p = parser or ArgusParser("ctu.binetflow", smtp_ports)
    b = p.parse_lines(lines, first)
    assert b.records.schema == record.SCHEMA
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects)
    for r in b.rejects:
        assert r.format == "argus" and r.source == "ctu.binetflow" and r.reason
    return b


def one(line: str, smtp_ports=None) -> dict:
    b = parse([HEADER, line], smtp_ports)
    assert b.rejects == [], [r.reason for r in b.rejects]
    (rec,) = record.to_dicts(b.records)
    return rec


# ------------------------------------------------------------------ CTU-13 slices


def test_spam_slice_keeps_every_spam_attempt() -> None:
    lines = SPAM_SLICE.read_text().splitlines()
    b = parse(lines, smtp_ports=(25, 465, 587, 2525))
    assert b.rejects == []
    recs = b.records.to_pandas()
    bot = recs[recs.src_ip == BOT]
    assert len(bot) == 203
    assert bot.dst_ip.nunique() == 162
    assert set(bot.dst_port) == {25}
    assert set(bot.conn_state) == {"unanswered"}
    assert set(bot.tcp_flags) == {2}
    assert set(bot.action) == {"unknown"}
    # the label file agrees with what the parser kept: the bot's port-25 flows are its SPAM flows
    spam = [ln for ln in lines if "TCP-Attempt-SPAM" in ln]
    assert len(spam) == 203
    assert {ln.split(",")[6] for ln in spam} == set(bot.dst_ip)


def test_spam_slice_without_filter_accounts_for_every_line() -> None:
    lines = SPAM_SLICE.read_text().splitlines()
    b = parse(lines, smtp_ports=None)
    assert b.read == len(lines) == 23753
    non_ip = sum(1 for ln in lines[1:] if ln.split(",")[2] in ("arp", "ipx/spx"))
    assert non_ip == 18
    assert b.skipped == 1 + non_ip  # the header and the non-IP flows
    assert b.records.num_rows == len(lines) - 1 - non_ip


def test_idle_slice_has_no_spam() -> None:
    b = parse(IDLE_SLICE.read_text().splitlines(), smtp_ports=(25,))
    assert b.rejects == []
    assert BOT not in set(b.records.column("src_ip").to_pylist())


def test_labels_of_the_bot() -> None:
    labs = labels(SPAM_SLICE)
    assert "flow=From-Botnet-V47-TCP-Attempt-SPAM" in labs[BOT]
    assert all("Botnet" in lab for lab in labs[BOT])
    assert not any("Botnet" in lab for ip, ls in labs.items() if ip != BOT for lab in ls)


def test_labels_reads_gzip(tmp_path: Path) -> None:
    p = tmp_path / "x.binetflow.gz"
    p.write_bytes(gzip.compress((HEADER + "\n" + flow(Label="flow=From-Botnet-X") + "\n").encode()))
    assert labels(p) == {"10.0.0.5": {"flow=From-Botnet-X"}}


# ------------------------------------------------------------------ mapping


def test_times_counters_and_ports() -> None:
    rec = one(flow(StartTime="2011/08/16 12:00:00.026903", Dur="0.000603", TotPkts=10, TotBytes=5000, SrcBytes=1200))
    assert rec["start"] == "2011-08-16T12:00:00.026Z"
    assert rec["end"] == "2011-08-16T12:00:00.027Z"
    assert (rec["packets"], rec["rev_packets"]) == (10, 0)
    assert (rec["bytes"], rec["rev_bytes"]) == (1200, 3800)
    assert (rec["src_port"], rec["dst_port"], rec["protocol"]) == (1879, 25, 6)
    assert rec["source_format"] == "argus" and rec["exporter"] == "ctu.binetflow" and rec["tenant"] == ""


def test_srcpkts_column_splits_packets() -> None:
    header = HEADER + ",SrcPkts"
    b = parse([header, flow(TotPkts=10) + ",4"])
    (rec,) = record.to_dicts(b.records)
    assert (rec["packets"], rec["rev_packets"]) == (4, 6)


def test_epoch_start_time() -> None:
    rec = one(flow(StartTime="1313496000.5", Dur="1.25"))
    assert rec["start"] == "2011-08-16T12:00:00.500Z" and rec["end"] == "2011-08-16T12:00:01.750Z"


@pytest.mark.parametrize(
    "state,conn_state,flags",
    [
        ("S_", "unanswered", 2),
        ("SA_", "unanswered", 18),
        ("S_RA", "refused", 2),
        ("S_SA", "completed", 2),
        ("FSPA_FSPA", "completed", 27),
        ("SRPA_FSPA", "reset", 30),
        ("FSPA_FSRPA", "reset", 27),
        ("PA_PA", "", 24),
        ("_FSPA", "", 0),
        ("REQ", "unanswered", None),
        ("EST", "completed", None),
    ],
)
def test_tcp_state(state: str, conn_state: str, flags: int | None) -> None:
    rec = one(flow(State=state))
    assert rec["conn_state"] == conn_state
    assert rec["tcp_flags"] == flags


def test_udp_and_icmp() -> None:
    udp = one(flow(Proto="udp", State="CON", Dport=53))
    assert udp["protocol"] == 17 and udp["conn_state"] == "" and udp["tcp_flags"] is None
    icmp = one(flow(Proto="icmp", Sport="0x0008", Dport="0x0785", State="ECO"))
    assert (icmp["protocol"], icmp["src_port"], icmp["dst_port"]) == (1, 8, 0x0785)
    igmp = one(flow(Proto="igmp", Sport="", Dport="", State="INT"))
    assert (igmp["protocol"], igmp["src_port"], igmp["dst_port"]) == (2, 0, 0)
    rtp = one(flow(Proto="rtp", State="CON"))
    assert rtp["protocol"] == 17
    v6 = one(
        flow(Proto="ipv6-icmp", SrcAddr="2001:718:2:1612:0:1:0:260", DstAddr="FF02::1:FF1B:D243", Sport=135, Dport="")
    )
    assert v6["src_ip"] == "2001:718:2:1612:0:1:0:260" and v6["dst_ip"] == "ff02::1:ff1b:d243" and v6["protocol"] == 58


def test_non_ip_flows_are_skipped() -> None:
    arp = "2011/08/16 12:00:01.122665,0.000000,arp,147.32.87.36,,  who,147.32.87.33,,RSP,,,1,60,0,flow=Background"
    ipx = (
        "2011/08/16 12:01:54.510844,534.203064,ipx/spx,00:15:17:2c:e5:2d,,   ->,ff:ff:ff:ff:ff:ff,,REQ,,,"
        "85,7875,7875,flow=B"
    )
    b = parse([HEADER, arp, ipx])
    assert b.records.num_rows == 0 and b.rejects == [] and b.skipped == 3


def test_smtp_filter_keeps_only_smtp_destinations() -> None:
    b = parse(
        [HEADER, flow(Dport=25), flow(Dport=80), flow(Dport=587), flow(Sport=25, Dport=40000)], smtp_ports=(25, 587)
    )
    assert [r["dst_port"] for r in record.to_dicts(b.records)] == [25, 587]
    assert b.skipped == 3


# ------------------------------------------------------------------ headers


def test_lines_without_header_are_rejected() -> None:
    b = parse([flow(), flow()])
    assert b.records.num_rows == 0
    assert all("no header line" in r.reason for r in b.rejects)


def test_header_in_any_order_and_across_chunks() -> None:
    p = ArgusParser("ctu.binetflow", None)
    names = HEADER.split(",")
    order = list(reversed(names))
    parse([",".join(order)], parser=p)
    vals = dict(zip(names, flow().split(",")))
    b = parse([",".join(vals[c] for c in order)], parser=p, first=2)
    (rec,) = record.to_dicts(b.records)
    assert (rec["src_ip"], rec["dst_ip"], rec["dst_port"]) == ("10.0.0.5", "192.0.2.10", 25)


def test_bad_header_rejects_the_lines_under_it() -> None:
    b = parse(["StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr", flow(), HEADER, flow()])
    reasons = [(r.location, r.reason) for r in b.rejects]
    assert reasons[0][0] == "1" and "lacks column(s) needed for a record: Dport, State" in reasons[0][1]
    assert reasons[1][0] == "2" and "header at line 1 was rejected" in reasons[1][1]
    assert b.records.num_rows == 1


def test_duplicate_header_column() -> None:
    b = parse([HEADER + ",Dur"])
    assert "duplicate column name(s) Dur" in b.rejects[0].reason


# ------------------------------------------------------------------ bad input

BAD = [
    (flow()[:40], "wrong field count: expected 15 fields"),
    (flow() + ",extra", "got 16"),
    (flow(StartTime="2011/13/16 12:00:00.1"), "invalid StartTime"),
    (flow(StartTime="2011/08/16 25:00:00.1"), "invalid StartTime"),
    (flow(StartTime="yesterday"), "invalid StartTime: 'yesterday'"),
    (flow(Dur="-1.5"), "negative Dur"),
    (flow(Dur="abc"), "invalid Dur"),
    (flow(Dur="9999999999"), "Dur out of range"),
    (flow(Proto="bogus"), "unknown protocol: 'bogus'"),
    (flow(SrcAddr="10.0.0.256"), "invalid IP address in SrcAddr"),
    (flow(DstAddr="mail.example.com"), "invalid IP address in DstAddr"),
    (flow(Sport="70000"), "invalid Sport"),
    (flow(Dport="0xfffff"), "invalid Dport"),
    (flow(Dport="-25"), "invalid Dport"),
    (flow(TotPkts="-2"), "negative TotPkts"),
    (flow(TotBytes="lots"), "non-numeric TotBytes"),
    (flow(TotBytes="999999999999999999999"), "TotBytes out of range"),
    (flow(SrcBytes="200", TotBytes="100"), "SrcBytes exceeds TotBytes"),
    (flow(TotPkts=""), "missing TotPkts"),
    (flow(Label="a\x00b"), "binary data: control character '\\x00'"),
    (flow(Label="caf\u00e9"), "non-ASCII character U+00E9"),
    ("x" * 10000, "line too long"),
]


@pytest.mark.parametrize("line,reason", BAD, ids=[r for _, r in BAD])
def test_bad_line_becomes_reject_with_reason(line: str, reason: str) -> None:
    b = parse([HEADER, flow(), line, flow()], first=10)
    assert b.records.num_rows == 2
    (rej,) = b.rejects
    assert reason in rej.reason
    assert rej.location == "12"


def test_undecodable_and_non_text_lines() -> None:
    raw = bytes(range(256)).decode("utf-8", "surrogateescape")
    b = parse([HEADER, raw, None, b"\xff\xfe", flow(), "", "  "])
    assert b.records.num_rows == 1 and len(b.rejects) == 3
    assert "undecodable bytes" in b.rejects[0].reason and "not a text line" in b.rejects[1].reason
    for r in b.rejects:
        r.raw.encode("utf-8")


def test_crlf_lines() -> None:
    b = parse([HEADER + "\r", flow() + "\r"])
    assert b.rejects == [] and b.records.num_rows == 1


# ------------------------------------------------------------------ properties

_ALPHABET = "0123456789abcdefx.,:/- \t_SAFRP\x00\u00e9"


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.text(alphabet=_ALPHABET, max_size=200), max_size=20))
def test_random_lines_never_raise(lines: list[str]) -> None:
    parse([HEADER] + lines)


_EDITS = char_edits(_ALPHABET, 3)




_BASE = SPAM_SLICE.read_text().splitlines()[1:]


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, len(_BASE) - 1), _EDITS), min_size=1, max_size=25), st.booleans())
def test_mutated_flows_never_raise(picks: list, smtp_only: bool) -> None:
    lines = [edit_chars(_BASE[i], edits) for i, edits in picks]
    b = parse([HEADER] + lines, smtp_ports=(25,) if smtp_only else None)
    # the vector checks and their per-line twin agree on every line
    layout = Layout(HEADER.split(","), 1)
    rejected = {int(r.location) - 2 for r in b.rejects}
    for i, line in enumerate(lines):
        if i in rejected or not line.strip():
            continue
        if line.isascii() and line.isprintable():
            assert _row_problem(line.strip().split(","), layout) is None, line
    assert all(r.reason != "invalid record" for r in b.rejects)


# ------------------------------------------------------------------ sniff


def test_sniff() -> None:
    assert sniff(SPAM_SLICE.read_text()[:4096])
    assert sniff(HEADER + "\n")
    assert not sniff(flow() + "\n")
    assert not sniff("")
    assert not sniff("StartTime,Dur\n")


def test_padded_columns_are_trimmed() -> None:
    rec = one(flow(Proto="  tcp", Dport="   25", State=" S_RA"))
    assert (rec["protocol"], rec["dst_port"], rec["conn_state"]) == (6, 25, "refused")
