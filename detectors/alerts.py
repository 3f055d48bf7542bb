"""Alerts: deterministic ids, severities, cooldown per (source, detector), escalation.

An alert's id is a hash of (detector, scope, window start), so a replay of the same input
produces the same ids and the store and topic consumers can drop duplicates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgspec
import pyarrow as pa

from smtpguard.record import SEVERITIES

from .rules import Finding

#: lowest score of each severity, highest first
SEVERITY_FLOORS = (("critical", 0.9), ("high", 0.75), ("medium", 0.5), ("low", 0.3), ("info", 0.0))


def severity_of(score: float) -> str:
    for name, floor in SEVERITY_FLOORS:
        if score >= floor:
            return name
    return "info"


def rank(severity: str) -> int:
    return SEVERITIES.index(severity)


def alert_id(detector: str, scope: str, window_start_ms: int) -> str:
    return hashlib.sha256(f"{detector}|{scope}|{window_start_ms}".encode()).hexdigest()[:24]


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Alert(msgspec.Struct, omit_defaults=False):
    """One alert, as written to the store, the alerts topic and ``analyze --json``."""

    alert_id: str
    detector: str
    severity: str
    score: float
    src_ip: str | None
    tenant: str
    window_start: str
    window_end: str
    reasons: list[str]
    evidence: dict[str, Any]
    exempted: bool = False
    suppressed: str = ""
    """why the finding was not raised: '' (raised) or 'cooldown'"""
    status: str = "new"
    created_at: str = ""
    incident_id: str = ""
    """alerts of one source (or tenant) with gaps under the incident gap share an incident"""
    next_step: str = ""
    """what the person who acts should do (docs/DETECTION.md, severity table)"""

    @property
    def lookup_address(self) -> str | None:
        """The address to look up in DNSBLs: the source itself, or for a prefix key (IPv6) the busiest
        address of the window (DNSBLs list IPv6 by /64, so any address of it answers for the prefix)."""
        return address_of(self.src_ip, self.evidence)

    @property
    def window_start_ms(self) -> int:
        return int(dt.datetime.fromisoformat(self.window_start.replace("Z", "+00:00")).timestamp() * 1000)


@dataclass
class AlertGate:
    """Turns findings into alerts: cooldown per (scope, detector), escalation when worse, and
    incidents: every finding of one scope within ``incident_gap_ms`` of the previous one joins
    its incident (id = hash of scope and the incident's first window, so replays agree)."""

    cooldown_ms: int
    incident_gap_ms: int = 1_800_000
    _last: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    _incidents: dict[str, tuple[str, int]] = field(default_factory=dict)

    def _incident(self, scope: str, window_start_ms: int) -> str:
        cur = self._incidents.get(scope)
        if cur is None or window_start_ms > cur[1] + self.incident_gap_ms:
            cur = (hashlib.sha256(f"incident|{scope}|{window_start_ms}".encode()).hexdigest()[:16], window_start_ms)
        else:
            cur = (cur[0], max(cur[1], window_start_ms))
        self._incidents[scope] = cur
        return cur[0]

    def prune(self, closed_upto_ms: int) -> None:
        """Forget cooldowns and incidents that no window starting at or after ``closed_upto_ms``
        (every window still to come) can meet: the gate stays small and decides exactly as before."""
        self._last = {k: v for k, v in self._last.items() if v[0] + self.cooldown_ms > closed_upto_ms}
        self._incidents = {k: v for k, v in self._incidents.items() if v[1] + self.incident_gap_ms >= closed_upto_ms}

    def admit(self, findings: Sequence[Finding]) -> list[Alert]:
        out = []
        for f in sorted(findings, key=lambda f: (f.window_start_ms, f.src_ip or "", f.detector)):
            scope = f.src_ip if f.src_ip is not None else f"tenant:{f.tenant}"
            sev = severity_of(f.score)
            key = (scope, f.detector)
            last = self._last.get(key)
            suppressed = ""
            if last is not None and f.window_start_ms < last[0] + self.cooldown_ms and rank(sev) <= last[1]:
                suppressed = "cooldown"
            else:
                self._last[key] = (f.window_start_ms, rank(sev))
            out.append(Alert(
                alert_id=alert_id(f.detector, scope, f.window_start_ms), detector=f.detector, severity=sev,
                score=round(f.score, 3), src_ip=f.src_ip, tenant=f.tenant,
                window_start=iso(f.window_start_ms), window_end=iso(f.window_end_ms),
                reasons=f.reasons, evidence=f.evidence, exempted=f.exempted, suppressed=suppressed,
                created_at=iso(int(time.time() * 1000)), incident_id=self._incident(scope, f.window_start_ms),
                next_step=f.next_step,
            ))
        return out


def address_of(src_ip: str | None, evidence: dict[str, Any] | None) -> str | None:
    """An alert's address for lookups: ``src_ip`` when it is an address, else the evidence's top address."""
    if not src_ip or "/" not in src_ip:
        return src_ip
    return (evidence or {}).get("top_address") or src_ip.split("/")[0]


_encoder = msgspec.json.Encoder()


def to_json(alert: Alert) -> bytes:
    return _encoder.encode(alert)


def from_json(data: bytes) -> Alert:
    return msgspec.json.decode(data, type=Alert)


def _ts(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def alerts_to_arrow(alerts: Sequence[Alert]) -> pa.Table:
    """Rows for the store's ``alerts`` table (columns as in store.ALERT_COLUMNS)."""
    ts = pa.timestamp("ms", tz="UTC")
    return pa.table({
        "alert_id": pa.array([a.alert_id for a in alerts], pa.string()),
        "detector": pa.array([a.detector for a in alerts], pa.string()),
        "severity": pa.array([a.severity for a in alerts], pa.string()),
        "severity_rank": pa.array([rank(a.severity) for a in alerts], pa.uint8()),
        "score": pa.array([a.score for a in alerts], pa.float64()),
        "src_ip": pa.array([a.src_ip for a in alerts], pa.string()),
        "tenant": pa.array([a.tenant for a in alerts], pa.string()),
        "window_start": pa.array([_ts(a.window_start) for a in alerts], ts),
        "window_end": pa.array([_ts(a.window_end) for a in alerts], ts),
        "reasons": pa.array([a.reasons for a in alerts], pa.list_(pa.string())),
        "evidence": pa.array([_encoder.encode(a.evidence).decode() for a in alerts], pa.string()),
        "exempted": pa.array([a.exempted for a in alerts], pa.bool_()),
        "suppressed": pa.array([a.suppressed for a in alerts], pa.string()),
        "status": pa.array([a.status for a in alerts], pa.string()),
        "created_at": pa.array([_ts(a.created_at) for a in alerts], ts),
        "incident_id": pa.array([a.incident_id for a in alerts], pa.string()),
        "next_step": pa.array([a.next_step for a in alerts], pa.string()),
    })
