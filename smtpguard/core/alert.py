"""The alert: one definition for the alerts topic, the store's ``alerts`` table, ``analyze --json``,
the console and the response (:data:`ALERT` derives the table's columns and the Arrow rows).

Detectors make alerts (:mod:`smtpguard.detectors.alerts`: ids, severities, cooldowns); the
response acts on them; the console shows them. The id is a hash of (detector, scope, window
start), so a replay produces the same ids and every consumer can drop duplicates.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import msgspec

from .record import SEVERITIES
from .records import Json, RecordType, Time, ch, iso_of, ms_of

LowCardinality = Annotated[str, ch("LowCardinality(String)")]


def rank(severity: str) -> int:
    """0 (info) to 4 (critical)."""
    return SEVERITIES.index(severity)


def alert_id(detector: str, scope: str, window_start_ms: int) -> str:
    return hashlib.sha256(f"{detector}|{scope}|{window_start_ms}".encode()).hexdigest()[:24]


def iso(ms: int) -> str:
    """Epoch milliseconds as an alert's ISO 8601 UTC time."""
    return iso_of(ms)


def address_of(src_ip: str | None, evidence: dict[str, Any] | None) -> str | None:
    """An alert's address for lookups: ``src_ip`` when it is an address, else (an IPv6 prefix key) the
    evidence's busiest address (DNSBLs list IPv6 by /64, so any address of it answers for the prefix)."""
    if not src_ip or "/" not in src_ip:
        return src_ip
    return (evidence or {}).get("top_address") or src_ip.split("/")[0]


class Alert(msgspec.Struct, omit_defaults=False):
    """One alert, as written to the store, the alerts topic and ``analyze --json``."""

    alert_id: str
    detector: LowCardinality
    severity: LowCardinality
    score: float
    src_ip: str | None
    """the source: an address, or the IPv6 prefix it is judged by; None for tenant-level alerts"""
    tenant: str
    window_start: Time
    window_end: Time
    reasons: list[str]
    evidence: Json
    exempted: bool = False
    suppressed: LowCardinality = ""
    """why the finding was not raised: '' (raised) or 'cooldown'"""
    status: LowCardinality = "new"
    created_at: Time = "1970-01-01T00:00:00Z"
    incident_id: str = ""
    """alerts of one source (or tenant) with gaps under the incident gap share an incident"""
    next_step: str = ""
    """what the person who acts should do (docs/DETECTION.md, severity table)"""

    @property
    def lookup_address(self) -> str | None:
        return address_of(self.src_ip, self.evidence)

    @property
    def window_start_ms(self) -> int:
        return ms_of(self.window_start)


#: the ``alerts`` table: the alert's fields, and its severity as a number for sorting and filters
ALERT = RecordType(Alert, table="alerts", derived={"severity_rank": ("UInt8", lambda a: rank(a.severity))})

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Alert)


def to_json(alert: Alert) -> bytes:
    return _encoder.encode(alert)


def from_json(data: bytes) -> Alert:
    return _decoder.decode(data)
