"""Kafka message formats (documented in docs/ARCHITECTURE.md, "Messages on Kafka").

``smtp.flows``: each message is an Arrow IPC stream holding one record batch with
:data:`smtpguard.core.record.SCHEMA` (header ``content-type: application/vnd.apache.arrow.stream``,
``smtpguard-record-version: 1``). A producer groups records by partition
(:func:`partition_of`: CRC32 of the source key text modulo the partition count, the same
as librdkafka's ``consistent`` partitioner with the key as message key), so one source always
lands on one partition. The source key is the address for IPv4 and the prefix a source is
judged by for IPv6 (``2001:db8:1:2::/64``: the inventory's prefix, else the /64), so the
addresses an instance rotates through stay together. Other tools may also produce single
records as JSON objects with the record's field names (``content-type: application/json``,
key = the source key).

``smtp.flows.dlq``: JSON :class:`smtpguard.ingest.base.Reject` objects.
``smtp.alerts``: JSON :class:`smtpguard.detectors.alerts.Alert` objects, key = source IP (or ``tenant:T``).

A consumer trusts no message: :func:`decode` checks every record of a ``smtp.flows``
message against the record's rules (:func:`check_records`) and returns the good records
and the bad ones, each with its reason, for the dead-letter topic. A message that cannot
be read at all raises :class:`WireError`.
"""

from __future__ import annotations

import datetime as dt
import os
import zlib
from typing import Any, Callable, Iterator, NamedTuple

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard.core import record
from smtpguard.core.iputil import canonical_ip, canonicalize_ips

ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
JSON_CONTENT_TYPE = "application/json"
HEADERS = [("content-type", ARROW_CONTENT_TYPE.encode()),
           ("smtpguard-record-version", str(record.RECORD_VERSION).encode())]
#: Header with a message's unique id (32 hex digits), set by the collector on every message it
#: produces, so that a resent message that did reach the topic after all is recognised.
MESSAGE_ID = "smtpguard-message-id"


def message_id_header() -> tuple[str, bytes]:
    return (MESSAGE_ID, os.urandom(16).hex().encode())


def message_id(headers: list[tuple[str, bytes]] | None) -> bytes | None:
    for k, v in headers or ():
        if k == MESSAGE_ID:
            return v
    return None


#: 9999-12-31T23:59:59.999Z: the last millisecond a record can hold (the parsers' bound too).
MAX_EPOCH_MS = 253402300799999
#: How far a record's start or end may lie after the time its message was produced (clock
#: skew between exporters and collectors). Later is not a flow that happened: one such record
#: would move the watermark of its partition years ahead and make every real record late.
MAX_AHEAD_MS = 24 * 3600 * 1000
#: Longest text value accepted in any record field (ids, names, the exporter's file name).
MAX_TEXT_CHARS = 4096
#: Values of ``conn_state`` (see :data:`smtpguard.core.record.FIELDS`).
CONN_STATES = ("completed", "refused", "unanswered", "reset", "")


class WireError(ValueError):
    """A message that is not a valid record batch (it goes to the dead-letter topic)."""


class BadRecord(NamedTuple):
    """A record of a message that breaks the record's rules."""

    index: int
    """position of the record in its message (0-based)"""
    reason: str
    raw: bytes
    """the record as JSON (as far as it could be read)"""


def partition_of(src_ips: pa.Array | pa.ChunkedArray, partitions: int, key_of: Callable[[str], str] | None = None
                 ) -> np.ndarray:
    """Partition number of each record: crc32(source key) % partitions (librdkafka 'consistent').

    The source key is what the detectors judge a source by (:class:`smtpguard.core.inventory.SourceKeys`):
    the address for IPv4, the prefix for IPv6, so that every address of a prefix lands in one
    partition. Without ``key_of`` the address itself is the key.
    """
    if isinstance(src_ips, pa.ChunkedArray):
        src_ips = src_ips.combine_chunks()
    enc = pc.dictionary_encode(src_ips)
    ips = enc.dictionary.to_pylist()
    keys = ips if key_of is None else [key_of(ip) for ip in ips]
    per_ip = np.fromiter((zlib.crc32(k.encode()) % partitions for k in keys), dtype=np.int32, count=len(keys))
    return per_ip[enc.indices.to_numpy(zero_copy_only=False)]


def encode_batches(records: pa.Table, partitions: int, max_records: int,
                   key_of: Callable[[str], str] | None = None) -> Iterator[tuple[int, bytes, int]]:
    """Split records into (partition, Arrow IPC payload, record count) messages (see :func:`partition_of`)."""
    if records.num_rows == 0:
        return
    parts = partition_of(records.column("src_ip"), partitions, key_of)
    order = np.argsort(parts, kind="stable")
    sorted_parts = parts[order]
    bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
    for idx in np.split(order, bounds):
        p = int(parts[idx[0]])
        sub = records.take(pa.array(idx))
        for off in range(0, sub.num_rows, max_records):
            chunk = sub.slice(off, max_records)
            yield p, encode_table(chunk), chunk.num_rows


def encode_table(records: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, record.SCHEMA) as w:
        w.write_table(records.combine_chunks() if records.num_rows else records)
    return sink.getvalue().to_pybytes()


def decode(value: bytes | None, headers: list[tuple[str, bytes]] | None,
           produced_ms: int | None = None) -> tuple[pa.Table, list[BadRecord]]:
    """Records from one ``smtp.flows`` message: (good records, bad records with reasons).

    ``produced_ms`` is when the message was produced (its Kafka timestamp); records that
    start or end more than :data:`MAX_AHEAD_MS` after it are bad. Raises :class:`WireError`
    when the message as a whole cannot be read (not Arrow nor JSON, another record
    version, columns that do not convert to the record's types)."""
    if not value:
        raise WireError("empty message")
    ctype = ""
    for k, v in headers or []:
        if k == "content-type":
            ctype = v.decode(errors="replace")
    if ctype == JSON_CONTENT_TYPE or (not ctype and value[:1] in (b"{", b"[")):
        table, index, bad = _decode_json(value)
    else:
        table, index, bad = _decode_arrow(value), None, []
    if table.num_rows == 0 and not bad:
        raise WireError("the message holds no records")
    problems = check_records(table, produced_ms)
    if problems:
        rows = np.array([i for i, _ in problems])
        raws = _rows_json(table.take(pa.array(rows)))
        bad.extend(BadRecord(int(index[i]) if index is not None else i, why, raw)
                   for (i, why), raw in zip(problems, raws))
        keep = np.ones(table.num_rows, bool)
        keep[rows] = False
        table = table.filter(pa.array(keep))
    bad.sort(key=lambda b: b.index)
    return table, bad


def decode_message(value: bytes | None, headers: list[tuple[str, bytes]] | None,
                   produced_ms: int | None = None) -> pa.Table:
    """Records from one ``smtp.flows`` message, all of them good; raises :class:`WireError`
    with the reason otherwise (:func:`decode` keeps the good records of a mixed message)."""
    table, bad = decode(value, headers, produced_ms)
    if bad:
        more = f" (and {len(bad) - 1} more bad records)" if len(bad) > 1 else ""
        raise WireError(f"record {bad[0].index}: {bad[0].reason}{more}")
    return table


def _decode_arrow(value: bytes) -> pa.Table:
    try:
        reader = pa.ipc.open_stream(value)
        table = reader.read_all()
        # offsets and UTF-8 of every column: the reader checks only the framing
        table.validate(full=True)
        metadata = table.schema.metadata or {}
    except (pa.ArrowException, OSError, ValueError) as e:  # invalid UTF-8 in a name is a ValueError
        raise WireError(f"not an Arrow IPC record batch: {e}") from None
    version = metadata.get(b"smtpguard.core.record.version", b"?").decode(errors="replace")
    if version != str(record.RECORD_VERSION):
        raise WireError(f"record version {version[:40]} is not {record.RECORD_VERSION}")
    if table.schema.remove_metadata() != record.SCHEMA.remove_metadata():
        try:
            table = record.conform(table)
        except (ValueError, TypeError, KeyError, pa.ArrowException) as e:  # KeyError: a field named twice
            raise WireError(f"batch does not match the record schema: {e}") from None
    return table


def _iso(ms: int) -> str:
    if 0 <= ms <= MAX_EPOCH_MS:
        return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"
    return f"{ms} ms since 1970"


def _np(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return a.to_numpy(zero_copy_only=False)


def _rows_json(table: pa.Table) -> list[bytes]:
    """Records as JSON for dead letters; times as epoch ms (they may be beyond any calendar)."""
    cols = [c.cast(pa.int64()) if pa.types.is_timestamp(c.type) else c for c in table.columns]
    return [encode_json(r) for r in pa.Table.from_arrays(cols, names=table.column_names).to_pylist()]


_TEXT_FIELDS = tuple(f.name for f in record.FIELDS if f.arrow == pa.string())


def check_records(table: pa.Table, produced_ms: int | None = None) -> list[tuple[int, str]]:
    """(row, reason) for every record that breaks the record's rules, first rule broken:
    a null where the field is not nullable; start or end outside 1970..9999, or more than
    :data:`MAX_AHEAD_MS` after ``produced_ms``; end before start; an address that is not
    canonical IPv4 or IPv6 text; an unknown action or conn_state; sampling rate 0; text
    longer than :data:`MAX_TEXT_CHARS`. Vectorised; cheap when every record is good."""
    if table.num_rows == 0:
        return []
    table = table.combine_chunks()
    why: dict[int, str] = {}

    def flag(mask: np.ndarray, reason: Any) -> None:
        for i in np.flatnonzero(mask).tolist():
            if i not in why:
                why[i] = reason(i) if callable(reason) else reason

    for f in record.FIELDS:
        col = table.column(f.name)
        if not f.nullable and col.null_count:
            flag(_np(col.is_null()), f"{f.name} is missing (null)")
    start = _np(pc.fill_null(table.column("start").cast(pa.int64()), 0))
    end = _np(pc.fill_null(table.column("end").cast(pa.int64()), 0))
    for name, ms in (("start", start), ("end", end)):
        out = (ms < 0) | (ms > MAX_EPOCH_MS)
        if out.any():
            flag(out, lambda i, name=name, ms=ms: f"{name} {_iso(int(ms[i]))} is outside 1970..9999")
    if produced_ms is not None:
        ahead = np.maximum(start, end) - produced_ms
        late = ahead > MAX_AHEAD_MS
        if late.any():
            flag(late, lambda i: f"flow time {_iso(int(max(start[i], end[i])))} is {ahead[i] / 86_400_000:.1f} days "
                                 f"after the message was produced ({_iso(produced_ms)})")
    back = end < start
    if back.any():
        flag(back, lambda i: f"end {_iso(int(end[i]))} before start {_iso(int(start[i]))}")
    for name in ("src_ip", "dst_ip"):
        col = table.column(name).combine_chunks()
        canon, ok = canonicalize_ips(col)  # per distinct value: a message repeats its sources and servers
        wrong = ~ok
        if canon is not col:  # IPv6 text in another spelling than the canonical one
            wrong |= ~_np(pc.fill_null(pc.equal(canon, col), True))
        if col.null_count:
            wrong &= _np(col.is_valid())  # a missing address is flagged above
        if wrong.any():
            flag(wrong, lambda i, col=col, name=name: (
                f"{name} {col[i].as_py()[:60]!r} is not an IP address in canonical form"))
    for name, allowed in (("action", record.ACTIONS), ("conn_state", CONN_STATES)):
        col = table.column(name)
        unknown = ~_np(pc.fill_null(pc.is_in(col, value_set=pa.array(allowed, pa.string())), True))
        if unknown.any():
            flag(unknown, lambda i, col=col, name=name: f"unknown {name} {col[i].as_py()[:60]!r}")
    rate = table.column("sampling_rate")
    if pc.min(rate).as_py() == 0:
        flag(_np(pc.fill_null(pc.equal(rate, 0), False)), "sampling_rate 0 (1 in N, N >= 1)")
    for name in _TEXT_FIELDS:
        col = table.column(name)
        if sum(c.buffers()[2].size for c in col.chunks if c.buffers()[2] is not None) <= MAX_TEXT_CHARS:
            continue  # no value can be longer than all of them together
        if (pc.max(pc.binary_length(col)).as_py() or 0) <= MAX_TEXT_CHARS:
            continue  # no value has more bytes, so more characters, than the limit
        lengths = pc.fill_null(pc.utf8_length(col), 0)
        if pc.max(lengths).as_py() > MAX_TEXT_CHARS:
            flag(_np(pc.greater(lengths, MAX_TEXT_CHARS)), lambda i, lengths=lengths, name=name: (
                f"{name} of {lengths[i].as_py()} chars is longer than {MAX_TEXT_CHARS}"))
    return sorted(why.items())


class _JsonRecord(msgspec.Struct, forbid_unknown_fields=False):
    start: str | int
    end: str | int
    src_ip: str
    dst_ip: str
    dst_port: int
    src_port: int = 0
    protocol: int = 6
    packets: int = 0
    bytes: int = 0


def _json_time(v: str | int) -> dt.datetime:
    if isinstance(v, str):
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    if not 0 <= v <= MAX_EPOCH_MS:
        raise ValueError(f"epoch milliseconds {v} outside 1970..9999")
    return dt.datetime.fromtimestamp(v / 1000, dt.timezone.utc)


def _json_row(r: Any) -> dict[str, Any]:
    typed = msgspec.convert(r, _JsonRecord)  # type check of the required fields
    r = {**msgspec.structs.asdict(typed), **r}
    for k in ("src_ip", "dst_ip"):
        ip = canonical_ip(r[k])
        if ip is None:
            raise ValueError(f"{k} {r[k][:60]!r} is not an IP address")
        r[k] = ip
    for k in ("start", "end"):
        r[k] = _json_time(r[k])
    return r


_JSON_ERRORS = (msgspec.ValidationError, ValueError, TypeError, OverflowError, pa.ArrowException)


def _decode_json(value: bytes) -> tuple[pa.Table, np.ndarray, list[BadRecord]]:
    """(good records, their positions in the message, bad records) of a JSON object or list."""
    try:
        obj = msgspec.json.decode(value)
    except msgspec.DecodeError as e:
        raise WireError(f"invalid JSON: {e}") from None
    items = obj if isinstance(obj, list) else [obj]
    rows: list[dict[str, Any]] = []
    index: list[int] = []
    bad: list[BadRecord] = []
    for i, r in enumerate(items):
        try:
            rows.append(_json_row(r))
            index.append(i)
        except _JSON_ERRORS as e:
            bad.append(BadRecord(i, f"invalid JSON record: {e}", _raw_json(r)))
    try:
        table = record.from_dicts(rows) if rows else record.empty_table()
    except _JSON_ERRORS:
        # a value of a wrong type among the optional fields: find whose, one by one
        good = []
        for i, r in zip(list(index), rows):
            try:
                good.append(record.from_dicts([r]))
            except _JSON_ERRORS as e:
                bad.append(BadRecord(i, f"invalid JSON record: {e}", _raw_json(items[i])))
                index.remove(i)
        table = pa.concat_tables(good) if good else record.empty_table()
    return table, np.array(index, np.int64), bad


def _raw_json(obj: Any) -> bytes:
    try:
        return encode_json(obj)
    except (TypeError, ValueError, OverflowError):
        return repr(obj).encode(errors="backslashreplace")


_enc = msgspec.json.Encoder()


def encode_json(obj: object) -> bytes:
    return _enc.encode(obj)
