"""What every input format produces: batches of good records and rejects (dead letters).

A format module is a pure parser: it turns lines or bytes into :class:`Batch` objects and
keeps its own state (a header, templates) in the parser object. Files, sockets and Kafka
stay in the collector shell (:mod:`smtpguard.ingest.collector`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import BinaryIO, Iterable, Iterator, NamedTuple, Protocol

import pyarrow as pa

from smtpguard.core import record

# the dead letter is a shared record (the dead-letter topic's message): defined in the core
from smtpguard.core.deadletter import MAX_RAW_CHARS, Reject  # noqa: E402,F401


@dataclass
class Batch:
    """Output of one parse step."""

    records: pa.Table
    """kept SMTP client-to-server records, with :data:`smtpguard.core.record.SCHEMA`"""
    rejects: list[Reject] = field(default_factory=list)
    read: int = 0
    """input units (lines, flow records) consumed"""
    skipped: int = 0
    """valid input that is not SMTP client traffic (other ports, NODATA rows, reverse halves merged into a record)"""

    @classmethod
    def empty(cls) -> "Batch":
        return cls(record.empty_table())


class Datagram(NamedTuple):
    """One UDP payload and where it came from."""

    payload: bytes
    exporter: str
    """``ip:port`` of the sender (``[ip]:port`` for IPv6), or a name for files"""
    received_ms: int | None = None
    """receive time (epoch ms); None when unknown: the exporter's clock stands in"""
    location: str = ""
    """where in the input (``packet 12``, ``byte 1464``) for dead letters"""


class Counters:
    """Base of a parser's counters, a dataclass of numbers: :meth:`add` sums another's
    into these, field by field."""

    def add(self, other: "Counters") -> None:
        for f in fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


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
