"""What every input format produces: batches of good records and rejects (dead letters).

A format module is a pure parser: it turns lines or bytes into :class:`Batch` objects and
keeps its own state (a header, templates) in the parser object. Files, sockets and Kafka
stay in the collector shell (:mod:`smtpguard.ingest.collector`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Protocol

import msgspec
import pyarrow as pa

from smtpguard import record

#: Longest raw sample kept in a dead letter; longer input is cut and marked.
MAX_RAW_CHARS = 2048


class Reject(msgspec.Struct):
    """A piece of input that could not become a record, with why and where."""

    source: str
    """file name, exporter address or topic the input came from"""
    location: str
    """line number, packet number or offset within the source"""
    reason: str
    raw: str
    format: str = ""
    seen_at_ms: int = 0

    @classmethod
    def make(cls, source: str, location: object, reason: str, raw: str | bytes, fmt: str = "") -> "Reject":
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "backslashreplace")
        if len(raw) > MAX_RAW_CHARS:
            raw = raw[:MAX_RAW_CHARS] + f"...[{len(raw) - MAX_RAW_CHARS} more chars]"
        return cls(source, str(location), reason, raw, fmt, int(time.time() * 1000))


@dataclass
class Batch:
    """Output of one parse step."""

    records: pa.Table
    """kept SMTP client-to-server records, with :data:`smtpguard.record.SCHEMA`"""
    rejects: list[Reject] = field(default_factory=list)
    read: int = 0
    """input units (lines, flow records) consumed"""
    skipped: int = 0
    """valid input that is not SMTP client traffic (other ports, NODATA rows, reverse halves merged into a record)"""

    @classmethod
    def empty(cls) -> "Batch":
        return cls(record.empty_table())


class LineParser(Protocol):
    """A text format: fed chunks of lines in order, with the 1-based number of the first."""

    name: str

    def parse_lines(self, lines: list[str], first_line_no: int) -> Batch: ...


class StreamParser(Protocol):
    """A binary or whole-document format (pcap, NetFlow datagrams, a JSON document): reads an
    opened input and yields batches. State that outlives one input (NetFlow templates) lives
    in the parser object, so one parser can be fed several inputs in order."""

    name: str

    def parse_stream(self, fh: "BinaryIO", source: str) -> Iterator[Batch]: ...


def concat(batches: Iterable[Batch]) -> Batch:
    batches = list(batches)
    if not batches:
        return Batch.empty()
    return Batch(
        pa.concat_tables([b.records for b in batches]),
        [r for b in batches for r in b.rejects],
        sum(b.read for b in batches),
        sum(b.skipped for b in batches),
    )
