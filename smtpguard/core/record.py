"""The SMTP connection record: the one definition every stage uses.

A record is one client-to-server connection (or flow) towards an SMTP port, as seen
by a flow source. Parsers produce batches of records as Arrow tables with
:data:`SCHEMA`; the Kafka wire format (:mod:`smtpguard.core.wire`), the ClickHouse table
(:mod:`smtpguard.core.store`), ``smtpguard decode --json`` and the notebooks all derive
from :data:`FIELDS`. Change a field here and bump :data:`RECORD_VERSION`.

Conventions:
- timestamps are UTC, millisecond precision;
- IP addresses are canonical text (``ipaddress`` formatting), IPv4 or IPv6;
- counters the source does not have are 0 (``rev_*``) or null (SMTP dialogue);
- text fields the source does not have are the empty string.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa

RECORD_VERSION = 1

#: Alert severities, lowest first (alerts carry one; the store keeps its index as severity_rank).
SEVERITIES = ("info", "low", "medium", "high", "critical")

#: Values of the ``action`` field.
ACTIONS = ("accept", "reject", "unknown")


@dataclass(frozen=True)
class Field:
    """One column of a record type: Arrow type, ClickHouse type and meaning."""

    name: str
    arrow: pa.DataType
    clickhouse: str
    doc: str
    nullable: bool = False

    @property
    def arrow_field(self) -> pa.Field:
        return pa.field(self.name, self.arrow, nullable=self.nullable)


_TS = pa.timestamp("ms", tz="UTC")

FIELDS: tuple[Field, ...] = (
    Field("start", _TS, "DateTime64(3, 'UTC')", "flow start (first packet), UTC"),
    Field("end", _TS, "DateTime64(3, 'UTC')", "flow end (last packet), UTC"),
    Field("src_ip", pa.string(), "IPv6", "client (connecting) address (stored as IPv6, IPv4 mapped)"),
    Field("dst_ip", pa.string(), "IPv6", "server address (stored as IPv6, IPv4 mapped)"),
    Field("src_port", pa.uint16(), "UInt16", "client port"),
    Field("dst_port", pa.uint16(), "UInt16", "server port (25, 465, 587, 2525 by default)"),
    Field("protocol", pa.uint8(), "UInt8", "IANA protocol number (6 = TCP)"),
    Field("packets", pa.uint64(), "UInt64", "packets client to server"),
    Field("bytes", pa.uint64(), "UInt64", "bytes client to server"),
    Field("rev_packets", pa.uint64(), "UInt64", "packets server to client, when the reverse flow was seen (else 0)"),
    Field("rev_bytes", pa.uint64(), "UInt64", "bytes server to client, when the reverse flow was seen (else 0)"),
    Field("action", pa.string(), "LowCardinality(String)", "accept, reject or unknown (what the network did)"),
    Field("tcp_flags", pa.uint16(), "Nullable(UInt16)", "OR of TCP flags of the flow where the source has them", True),
    Field("tenant", pa.string(), "LowCardinality(String)", "cloud account, project or subscription"),
    Field("interface_id", pa.string(), "String", "network interface id (eni-…) where known"),
    Field("instance_id", pa.string(), "String", "instance id where known"),
    Field("source_format", pa.string(), "LowCardinality(String)", "input format name, e.g. aws-vpc"),
    Field("exporter", pa.string(), "LowCardinality(String)", "who reported the flow: file name, exporter address, capture interface"),
    Field("sampling_rate", pa.uint32(), "UInt32", "1 in N packet sampling of the source (1 = unsampled)"),
    Field("conn_state", pa.string(), "LowCardinality(String)", "TCP handshake outcome where known: completed, refused, unanswered, reset, or ''"),
    Field("helo", pa.string(), "String", "EHLO/HELO name (captures only)"),
    Field("mail_from_domain", pa.string(), "String", "domain of MAIL FROM (captures only)"),
    Field("rcpt_count", pa.uint32(), "Nullable(UInt32)", "number of RCPT TO commands (captures only)", True),
    Field("reply_first", pa.uint16(), "Nullable(UInt16)", "first server reply code (captures only)", True),
    Field("reply_last", pa.uint16(), "Nullable(UInt16)", "last server reply code (captures only)", True),
    Field("replies_4xx", pa.uint16(), "Nullable(UInt16)", "count of 4xx replies (captures only)", True),
    Field("replies_5xx", pa.uint16(), "Nullable(UInt16)", "count of 5xx replies (captures only)", True),
    Field("starttls", pa.bool_(), "Nullable(Bool)", "STARTTLS was issued (captures only)", True),
    Field("auth", pa.bool_(), "Nullable(Bool)", "AUTH was issued (captures only)", True),
)

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
SCHEMA: pa.Schema = pa.schema(
    [f.arrow_field for f in FIELDS],
    metadata={b"smtpguard.core.record.version": str(RECORD_VERSION).encode()},
)

#: Defaults for columns a parser does not fill.
_DEFAULTS: dict[str, Any] = {
    "rev_packets": 0,
    "rev_bytes": 0,
    "action": "unknown",
    "tenant": "",
    "interface_id": "",
    "instance_id": "",
    "source_format": "",
    "exporter": "",
    "sampling_rate": 1,
    "conn_state": "",
    "helo": "",
    "mail_from_domain": "",
}


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def conform(table: pa.Table, **constants: Any) -> pa.Table:
    """Return ``table`` with exactly :data:`SCHEMA`: missing columns get their
    default (or a value from ``constants``), types are cast, order is fixed.

    >>> conform(pa.table({"src_ip": ["10.0.0.1"]}), source_format="aws-vpc").column("action")[0].as_py()
    'unknown'
    """
    n = table.num_rows
    cols = []
    for f in FIELDS:
        if f.name in table.column_names:
            col = table.column(f.name)
            if col.type != f.arrow:
                col = col.cast(f.arrow)
        elif f.name in constants:
            col = pa.repeat(pa.scalar(constants[f.name], f.arrow), n)
        elif f.name in _DEFAULTS:
            col = pa.repeat(pa.scalar(_DEFAULTS[f.name], f.arrow), n)
        elif f.nullable:
            col = pa.nulls(n, f.arrow)
        else:
            raise ValueError(f"record column {f.name!r} is required")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def from_dicts(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Build a record table from dicts (slow path: tests, captures, small inputs).

    Timestamps may be ``datetime`` (aware) or epoch milliseconds.
    """
    rows = list(rows)
    cols: dict[str, list[Any]] = {}
    for f in FIELDS:
        vals = []
        for r in rows:
            v = r.get(f.name, _DEFAULTS.get(f.name))
            vals.append(v)
        if all(v is None for v in vals) and not f.nullable and f.name not in _DEFAULTS:
            continue
        cols[f.name] = vals
    arrays = {}
    for f in FIELDS:
        if f.name in cols:
            arrays[f.name] = pa.array(cols[f.name], f.arrow)
    return conform(pa.table(arrays) if arrays else pa.table({}))


def _json_value(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return v


def to_dicts(table: pa.Table) -> list[dict[str, Any]]:
    """Records as JSON-ready dicts with the documented field names (ISO 8601 times)."""
    return [{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()]


def markdown_table() -> str:
    """The field reference used in the README (kept in sync by a test)."""
    lines = ["| field | type | meaning |", "| --- | --- | --- |"]
    for f in FIELDS:
        lines.append(f"| `{f.name}` | {f.clickhouse} | {f.doc} |")
    return "\n".join(lines)
