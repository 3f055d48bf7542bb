"""Argus bidirectional flows as comma-separated text (``ra -c ,``; the CTU-13
``.binetflow`` files) → records.

A pure parser: :class:`ArgusParser` is fed consecutive chunks of lines of one file. Its
only state is the column layout declared by the last header line.

Layout
    The header line names the columns (``StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,
    Dport,State,sTos,dTos,TotPkts,TotBytes,SrcBytes,Label`` in CTU-13), in any order;
    columns this parser does not use are ignored. Without a header line nothing is
    decoded: columns are never assigned by guess.

Mapping
    * ``StartTime`` ``2011/08/16 12:00:00.026903`` (or epoch seconds, ``ra -u``) is the
      flow start. Argus prints local time without a zone; it is taken as UTC. (CTU-13
      was captured in Prague, so its times are UTC+2: shift them if wall-clock
      alignment with other sources matters.) ``end`` = start + ``Dur`` seconds.
    * ``SrcAddr`` is the client (Argus puts the originator first), ``Sport`` / ``Dport``
      are decimal or hex (``0x0008``: ICMP type and code), empty for protocols without
      ports (0 in the record).
    * ``SrcBytes`` → ``bytes``; ``TotBytes - SrcBytes`` → ``rev_bytes``.
      ``TotPkts`` has no per-direction split, so ``packets`` is the total of both
      directions and ``rev_packets`` is 0, unless the header also has ``SrcPkts``
      (then ``packets`` = SrcPkts, ``rev_packets`` = TotPkts - SrcPkts).
    * ``State`` of TCP flows (flags seen from each side, ``S_``, ``S_RA``,
      ``FSPA_FSPA``) gives ``conn_state``: no reply → unanswered; the server answered
      the SYN and no RST → completed; with an RST after the SYN-ACK → reset; RST
      without SYN-ACK → refused; no SYN seen (the flow began before the capture) → ''.
      The source side's flags are the record's ``tcp_flags``. Argus's word states
      (``ra`` without ``-Z``) map as REQ → unanswered, ACC/EST/CON/FIN/CLO →
      completed, RST → reset, others → '' (no flags).
    * ``action`` is ``unknown``: a passive sensor does not see what a firewall did.
    * ``Label`` is not part of the record; :func:`labels` reads it for evaluation.

Protocols that are not IP (``arp``, ``ipx/spx``, ``llc``, ``rarp``) are valid input that
cannot be a record: skipped, like flows on no SMTP port. Both directions of a
connection are in one Argus record, so there is nothing to pair.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard.ingest.base import Batch
from smtpguard.ingest.columns import (
    LineFrame,
    MAX_COUNTER,
    MAX_EPOCH_MS,
    IS_ALPHA,
    BadHeader,
    ColumnParser,
    Split,
    datetime_exprs,
    datetime_maps,
    datetime_us,
    header_states,
    line_problem,
    ms_timestamps,
    np_,
    segments,
    short,
    uint_problem,
)
from smtpguard.ingest.selection import DEFAULT_SMTP_PORTS, select_smtp
from smtpguard.core.iputil import canonical_ip, canonicalize_ips

NAME = "argus"

#: Columns a header must have to give a record.
REQUIRED = (
    "StartTime",
    "Dur",
    "Proto",
    "SrcAddr",
    "Sport",
    "DstAddr",
    "Dport",
    "State",
    "TotPkts",
    "TotBytes",
    "SrcBytes",
)
#: Longest line accepted (a CTU-13 line is ~150 chars).
MAX_LINE_CHARS = 8192
#: Longest flow accepted, in seconds (ten years): a larger Dur is corrupt.
MAX_DUR_S = 10 * 365 * 86400

#: Argus protocol names → IANA numbers. Argus names some UDP applications it
#: recognises (rtp, rtcp, udt); they are UDP.
IP_PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "ggp": 3,
    "ipnip": 4,
    "ipip": 4,
    "tcp": 6,
    "egp": 8,
    "igp": 9,
    "udp": 17,
    "rtp": 17,
    "rtcp": 17,
    "udt": 17,
    "rdp": 27,
    "ipv6": 41,
    "ipv6-route": 43,
    "ipv6-frag": 44,
    "rsvp": 46,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "ipv6-no": 59,
    "ipv6-opts": 60,
    "eigrp": 88,
    "ospf": 89,
    "ospfigp": 89,
    "pim": 103,
    "vrrp": 112,
    "l2tp": 115,
    "sctp": 132,
    "udplite": 136,
}
NON_IP_PROTOCOLS = frozenset({"arp", "rarp", "ipx/spx", "llc"})

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_START_RE = r"^[0-9]{4}/[0-9]{2}/[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?$"
_EPOCH_RE = r"^[0-9]{1,11}(\.[0-9]{1,9})?$"
_DUR_RE = r"^[0-9]{1,10}(\.[0-9]{1,9})?$"
_PORT_RE = r"^([0-9]{1,5}|0x[0-9a-fA-F]{1,4})?$"
_TCP_STATE_RE = r"^([FSRPAUEC]*)_([FSRPAUEC]*)$"
_FLAG_BITS = {"F": 1, "S": 2, "R": 4, "P": 8, "A": 16, "U": 32, "E": 64, "C": 128}
#: Argus's word states for TCP (without per-side flags).
_TCP_WORD_STATES = {
    "REQ": "unanswered",
    "ACC": "completed",
    "EST": "completed",
    "CON": "completed",
    "FIN": "completed",
    "CLO": "completed",
    "RST": "reset",
}


class Layout:
    __slots__ = ("names", "pos", "line_no")

    def __init__(self, names: list[str], line_no: int):
        self.names = names
        self.pos = {n: i for i, n in enumerate(names)}
        self.line_no = line_no


def _classify_header(line: str, line_no: int = 0) -> tuple[str, Layout | str | None]:
    """('header', Layout) | ('bad', reason) | ('data', None) for the line at ``line_no``."""
    names = [n.strip() for n in line.split(",")]
    if not names or not all(_NAME_RE.match(n) for n in names):
        return "data", None
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        return "bad", "invalid header: duplicate column name(s) " + ", ".join(dups)
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        return "bad", "header lacks column(s) needed for a record: " + ", ".join(missing)
    return "header", Layout(names, line_no)


def _parse_port(tok: str) -> int | None:
    tok = tok.strip()
    if tok == "":
        return 0
    if re.fullmatch(r"0x[0-9a-fA-F]{1,4}", tok):
        return int(tok, 16)
    if re.fullmatch(r"[0-9]{1,5}", tok) and int(tok) <= 65535:
        return int(tok)
    return None


def _row_problem(tokens: list[str], layout: Layout) -> str | None:
    """Why a row cannot become a record (the Python twin of the vector checks)."""
    if len(tokens) != len(layout.names):
        return (
            f"wrong field count: expected {len(layout.names)} fields (header at line {layout.line_no}), "
            f"got {len(tokens)}"
        )
    get = lambda c: tokens[layout.pos[c]].strip()  # noqa: E731
    proto = get("Proto").lower()
    if proto in NON_IP_PROTOCOLS:
        return None
    if proto not in IP_PROTOCOLS and not (proto.isascii() and proto.isdigit() and int(proto) <= 255):
        return f"unknown protocol: {short(get('Proto'))}"
    st = get("StartTime")
    st_us, st_ok = datetime_us(pl.Series([st]), _START_RE, _EPOCH_RE)
    if not st_ok[0]:
        return f"invalid StartTime: {short(st)} (expected YYYY/MM/DD HH:MM:SS.ffffff or epoch seconds)"
    dur = get("Dur")
    if dur.startswith("-"):
        return f"negative Dur: {short(dur)}"
    if not re.fullmatch(_DUR_RE[1:-1], dur):
        return f"invalid Dur: {short(dur)}"
    if float(dur) > MAX_DUR_S:
        return f"Dur out of range: {short(dur)} (max {MAX_DUR_S} s)"
    for c in ("SrcAddr", "DstAddr"):
        if canonical_ip(get(c)) is None:
            return f"invalid IP address in {c}: {short(get(c))}"
    for c in ("Sport", "Dport"):
        if _parse_port(get(c)) is None:
            return f"invalid {c}: {short(get(c))} (decimal 0-65535 or hex 0x0000-0xffff)"
    counters = ["TotPkts", "TotBytes", "SrcBytes"] + (["SrcPkts"] if "SrcPkts" in layout.pos else [])
    for c in counters:
        p = uint_problem(c, get(c), MAX_COUNTER)
        if p:
            return p
    if int(get("SrcBytes")) > int(get("TotBytes")):
        return f"SrcBytes exceeds TotBytes: {get('SrcBytes')} > {get('TotBytes')}"
    if "SrcPkts" in layout.pos and int(get("SrcPkts")) > int(get("TotPkts")):
        return f"SrcPkts exceeds TotPkts: {get('SrcPkts')} > {get('TotPkts')}"
    if (int(st_us[0]) + round(float(dur) * 1_000_000)) // 1000 > MAX_EPOCH_MS:
        return f"StartTime out of range: {short(st)}"
    return None


class ArgusParser(ColumnParser):
    """Parser for Argus CSV flows; see the module docstring."""

    name = NAME

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS):
        super().__init__(source, smtp_ports)
        self._state: Layout | BadHeader | None = None

    def parse_lines(self, lines: list[str], first_line_no: int) -> Batch:
        if len(lines) == 0:
            return Batch.empty()
        lf = LineFrame(lines)
        live, text = lf.live, lf.text
        problems: list[tuple[int, str]] = list(lf.forced.items())

        # binary data, non-ASCII text and absurd lengths are rejected before splitting
        bad_line = ~np_(pc.ascii_is_printable(lf.trimmed)) | (lf.blen > MAX_LINE_CHARS)
        for i in np.flatnonzero(bad_line & live).tolist():
            problems.append((i, line_problem(text(i), MAX_LINE_CHARS)))
        live &= ~bad_line

        # header lines split the chunk into segments, each with its layout
        cand = np.flatnonzero(live & IS_ALPHA[lf.first_b])
        states, hdr_rows, skipped = header_states(
            cand.tolist(), lambda i, line_no: _classify_header(text(i), line_no), self._state, live, first_line_no,
            problems,
        )
        self._state = states[-1]

        split = Split(lf.trimmed, ",")
        parts: list[tuple[np.ndarray, dict[str, pa.Array]]] = []
        for state, rows in segments(live, hdr_rows, states):
            if state is None:
                problems.extend(
                    (
                        i,
                        "no header line: an Argus CSV file starts with the column names "
                        "(StartTime,Dur,Proto,SrcAddr,...); columns are not guessed",
                    )
                    for i in rows.tolist()
                )
                continue
            if isinstance(state, BadHeader):
                problems.extend((i, state.reason) for i in rows.tolist())
                continue
            ok_count = split.counts[rows] == len(state.names)
            for i in rows[~ok_count].tolist():
                problems.append((i, _row_problem(text(i).split(","), state) or "invalid record"))
            rows = rows[ok_count]
            if rows.size:
                good, cols, nskip, bad = self._decode(state, rows, split)
                skipped += nskip
                for i in bad.tolist():
                    problems.append((i, _row_problem(text(i).split(","), state) or "invalid record"))
                if good.size:
                    parts.append((good, cols))

        return self._batch(self._assemble(parts), problems, lines, lf.raws, first_line_no, lf.read, skipped)

    # ---------------------------------------------------------------- internals

    def _decode(
        self, layout: Layout, rows: np.ndarray, split: Split
    ) -> tuple[np.ndarray, dict[str, pa.Array], int, np.ndarray]:
        """Vector-decode rows of one layout: (rows kept, their columns, rows skipped, rows rejected).

        The checks and conversions of every column run as one polars query."""
        names = REQUIRED + (("SrcPkts",) if "SrcPkts" in layout.pos else ())
        cols = {}
        for name in names:
            a = split.field(rows, layout.pos[name])
            if split.padded(rows, layout.pos[name]):  # ra pads some columns
                a = pc.utf8_trim(a, " ")
            cols[name] = a
        df = pl.from_arrow(pa.table(cols))
        assert isinstance(df, pl.DataFrame)
        c = pl.col
        parts, start_us, start_ok = datetime_exprs("StartTime", _START_RE, _EPOCH_RE, datetime_maps(df["StartTime"]))
        proto_name = c("Proto").str.to_lowercase()
        # stage 1: every column parsed once; stage 2 combines them (faster than one
        # nested expression that repeats its parts)
        stage1 = dict(parts)
        stage1["_proto"] = (
            pl.when(proto_name.str.contains(r"^[0-9]{1,3}$"))
            .then(proto_name.cast(pl.Int32, strict=False))
            .otherwise(proto_name.replace_strict(IP_PROTOCOLS, default=None, return_dtype=pl.Int32))
        )
        stage1["_non_ip"] = proto_name.is_in(list(NON_IP_PROTOCOLS))
        for name in ("Sport", "Dport"):
            t = c(name)
            stage1["_" + name] = (
                pl.when(t == "")
                .then(0)
                .when(t.str.starts_with("0x"))
                .then(t.str.slice(2).str.to_integer(base=16, strict=False))
                .otherwise(t.cast(pl.Int64, strict=False))
            )
            stage1["_" + name + "_fmt"] = t.str.contains(_PORT_RE)
        stage1["_dur"] = c("Dur").cast(pl.Float64, strict=False)
        stage1["_dur_fmt"] = c("Dur").str.contains(_DUR_RE)
        counter_names = ("TotPkts", "TotBytes", "SrcBytes") + names[len(REQUIRED) :]
        for name in counter_names:
            # the cast takes digits only, and a leading "+" that Argus never writes
            stage1["_" + name] = c(name).cast(pl.UInt64, strict=False)
            stage1["_" + name + "_plus"] = c(name).str.starts_with("+")

        proto = c("_proto")
        port_ok = [c(f"_{n}_fmt") & c(f"_{n}").is_not_null() & (c(f"_{n}") <= 65535) for n in ("Sport", "Dport")]
        dur_ok = c("_dur_fmt") & (c("_dur") <= MAX_DUR_S)
        dur_us = pl.when(dur_ok).then((c("_dur") * 1e6).round(0).cast(pl.Int64)).otherwise(0)
        count_ok = pl.all_horizontal([c("_" + n).is_not_null() & ~c(f"_{n}_plus") for n in counter_names])
        count_ok = count_ok & (c("_SrcBytes") <= c("_TotBytes"))
        if "SrcPkts" in counter_names:
            count_ok = count_ok & (c("_SrcPkts") <= c("_TotPkts"))
        q = (
            df.lazy()
            .with_columns(**stage1)
            .select(
                non_ip=c("_non_ip"),
                proto=proto.fill_null(0),
                start_us=start_us,
                end_ms=(start_us + dur_us) // 1000,
                ok=(
                    proto.is_not_null() & (proto <= 255) & start_ok & dur_ok & port_ok[0] & port_ok[1] & count_ok
                ).fill_null(False),
                sport=c("_Sport").fill_null(0),
                dport=c("_Dport").fill_null(0),
                **{n: c("_" + n).fill_null(0) for n in counter_names},
                State=c("State"),
            )
            .collect()
        )
        non_ip = np_(q["non_ip"]).astype(bool)
        dport_v = np_(q["dport"]).astype(np.int32)
        end_ms = np_(q["end_ms"]).astype(np.int64)
        ok = np_(q["ok"]).astype(bool) & (end_ms <= MAX_EPOCH_MS)
        src, src_ok = canonicalize_ips(cols["SrcAddr"], check=~non_ip)
        dst, dst_ok = canonicalize_ips(cols["DstAddr"], check=~non_ip & src_ok)
        ok &= src_ok & dst_ok & ~non_ip
        bad = rows[~ok & ~non_ip]
        skipped = int(non_ip.sum())
        sel, other = select_smtp(dport_v, self.smtp_ports, ok)
        skipped += other
        keep = pa.array(sel)
        q = q.filter(pl.Series(sel))
        conn_state, flags = _tcp_state(q["State"], np_(q["proto"]) == 6)
        tot_b, src_b = np_(q["TotBytes"]).astype(np.uint64), np_(q["SrcBytes"]).astype(np.uint64)
        tot_p = np_(q["TotPkts"]).astype(np.uint64)
        if "SrcPkts" in counter_names:
            pk = np_(q["SrcPkts"]).astype(np.uint64)
            rpk = tot_p - pk
        else:
            pk, rpk = tot_p, np.zeros(q.height, dtype=np.uint64)
        out = {
            "start": ms_timestamps(np_(q["start_us"]).astype(np.int64) // 1000),
            "end": ms_timestamps(np_(q["end_ms"]).astype(np.int64)),
            "src_ip": src.filter(keep),
            "dst_ip": dst.filter(keep),
            "src_port": q["sport"].to_arrow(),
            "dst_port": q["dport"].to_arrow(),
            "protocol": q["proto"].to_arrow(),
            "packets": pa.array(pk),
            "bytes": pa.array(src_b),
            "rev_packets": pa.array(rpk),
            "rev_bytes": pa.array(tot_b - src_b),
            "conn_state": conn_state,
            "tcp_flags": flags,
        }
        return rows[sel], out, skipped, bad


def _state_info(state: str) -> tuple[str, int | None]:
    """conn_state and the source side's TCP flags of one Argus TCP State string."""
    m = re.fullmatch(_TCP_STATE_RE[1:-1], state)
    if m is None:
        return _TCP_WORD_STATES.get(state, ""), None
    src, dst = m.group(1), m.group(2)
    flags = sum(bit for ch, bit in _FLAG_BITS.items() if ch in src)
    if "S" not in src:
        return "", flags  # the flow began before the capture
    if dst == "":
        return "unanswered", flags
    if "S" in dst:
        return ("reset" if "R" in src or "R" in dst else "completed"), flags
    return ("refused" if "R" in dst else ""), flags


def _tcp_state(state: pl.Series, is_tcp: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """conn_state and TCP flags of the records: a chunk has few distinct State strings,
    each is read once in Python and mapped onto the column."""
    info = {s: _state_info(s) for s in state.unique().to_list() if s is not None}
    df = pl.DataFrame({"s": state, "tcp": pl.Series(is_tcp, dtype=pl.Boolean)})
    out = df.select(
        conn_state=pl.when(pl.col("tcp"))
        .then(pl.col("s").replace_strict({k: v[0] for k, v in info.items()}, default="", return_dtype=pl.String))
        .otherwise(pl.lit("")),
        tcp_flags=pl.when(pl.col("tcp"))
        .then(pl.col("s").replace_strict({k: v[1] for k, v in info.items()}, default=None, return_dtype=pl.UInt16))
        .otherwise(None),
    )
    return out["conn_state"].to_arrow(), out["tcp_flags"].cast(pl.UInt16).to_arrow()


def labels(path: str | Path) -> dict[str, set[str]]:
    """The ``Label`` column of an Argus CSV file (plain or .gz) as {source address: labels},
    for evaluating detectors against labelled captures (CTU-13).

    >>> labs = labels("capture20110816.binetflow")  # doctest: +SKIP
    >>> any("SPAM" in lab for lab in labs["147.32.84.165"])  # doctest: +SKIP
    True
    """
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    out: dict[str, set[str]] = {}
    reader = csv.reader(io.StringIO(raw.decode("utf-8", "replace")))
    header = next(reader, None)
    if not header or "SrcAddr" not in header or "Label" not in header:
        return out
    si, li = header.index("SrcAddr"), header.index("Label")
    for row in reader:
        if len(row) == len(header):
            ip = canonical_ip(row[si].strip()) or row[si].strip()
            out.setdefault(ip, set()).add(row[li].strip())
    return out


def sniff(head: str) -> bool:
    """True if the first non-blank line is an Argus CSV header naming the columns a
    record needs (StartTime, SrcAddr, DstAddr, ...)."""
    for line in head.splitlines():
        if line.strip():
            kind, _ = _classify_header(line.strip())
            return kind == "header"
    return False
