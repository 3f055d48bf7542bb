"""Kafka message formats (documented in docs/ARCHITECTURE.md, "Messages on Kafka").

``smtp.flows``: each message is an Arrow IPC stream holding one record batch with
:data:`smtpguard.record.SCHEMA` (header ``content-type: application/vnd.apache.arrow.stream``,
``smtpguard-record-version: 1``). A producer groups records by partition
(:func:`partition_of`: CRC32 of the source IP text modulo the partition count, the same
as librdkafka's ``consistent`` partitioner with the IP as key), so one source IP always lands
on one partition. Other tools may also produce single records as JSON objects with the
record's field names (``content-type: application/json``, key = source IP).

``smtp.flows.dlq``: JSON :class:`smtpguard.ingest.base.Reject` objects.
``smtp.alerts``: JSON :class:`smtpguard.detectors.alerts.Alert` objects, key = source IP (or ``tenant:T``).
"""

from __future__ import annotations

import zlib
from typing import Iterator

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard import record

ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
JSON_CONTENT_TYPE = "application/json"
HEADERS = [("content-type", ARROW_CONTENT_TYPE.encode()),
           ("smtpguard-record-version", str(record.RECORD_VERSION).encode())]


class WireError(ValueError):
    """A message that is not a valid record batch (it goes to the dead-letter topic)."""


def partition_of(src_ips: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """Partition number of each record: crc32(ip) % partitions (librdkafka 'consistent')."""
    if isinstance(src_ips, pa.ChunkedArray):
        src_ips = src_ips.combine_chunks()
    enc = pc.dictionary_encode(src_ips)
    per_ip = np.fromiter((zlib.crc32(ip.encode()) % partitions for ip in enc.dictionary.to_pylist()),
                         dtype=np.int32, count=len(enc.dictionary))
    return per_ip[enc.indices.to_numpy(zero_copy_only=False)]


def encode_batches(records: pa.Table, partitions: int, max_records: int) -> Iterator[tuple[int, bytes, int]]:
    """Split records into (partition, Arrow IPC payload, record count) messages."""
    if records.num_rows == 0:
        return
    parts = partition_of(records.column("src_ip"), partitions)
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


def decode_message(value: bytes | None, headers: list[tuple[str, bytes]] | None) -> pa.Table:
    """Records from one ``smtp.flows`` message; raises :class:`WireError` with the reason."""
    if not value:
        raise WireError("empty message")
    ctype = ""
    for k, v in headers or []:
        if k == "content-type":
            ctype = v.decode(errors="replace")
    if ctype == JSON_CONTENT_TYPE or (not ctype and value[:1] in (b"{", b"[")):
        return _decode_json(value)
    try:
        reader = pa.ipc.open_stream(value)
        table = reader.read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise WireError(f"not an Arrow IPC record batch: {e}") from None
    version = (table.schema.metadata or {}).get(b"smtpguard.record.version", b"?").decode()
    if version != str(record.RECORD_VERSION):
        raise WireError(f"record version {version} is not {record.RECORD_VERSION}")
    if table.schema.remove_metadata() != record.SCHEMA.remove_metadata():
        try:
            table = record.conform(table)
        except (ValueError, pa.ArrowInvalid) as e:
            raise WireError(f"batch does not match the record schema: {e}") from None
    return table


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


def _decode_json(value: bytes) -> pa.Table:
    import datetime as dt
    import ipaddress

    try:
        obj = msgspec.json.decode(value)
        rows = obj if isinstance(obj, list) else [obj]
        for i, r in enumerate(rows):
            typed = msgspec.convert(r, _JsonRecord)  # type check of the required fields
            r = rows[i] = {**msgspec.structs.asdict(typed), **r}
            for k in ("src_ip", "dst_ip"):
                r[k] = str(ipaddress.ip_address(r[k]))
            for k in ("start", "end"):
                if isinstance(r[k], str):
                    t = dt.datetime.fromisoformat(r[k].replace("Z", "+00:00"))
                    r[k] = t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
                else:
                    r[k] = dt.datetime.fromtimestamp(r[k] / 1000, dt.timezone.utc)
        return record.from_dicts(rows)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, pa.ArrowInvalid, OverflowError) as e:
        raise WireError(f"invalid JSON record: {e}") from None


_enc = msgspec.json.Encoder()


def encode_json(obj: object) -> bytes:
    return _enc.encode(obj)
