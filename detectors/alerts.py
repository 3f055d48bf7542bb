"""Findings become alerts (:class:`smtpguard.core.alert.Alert`): severities, cooldown per
(source, detector), escalation and incidents. An alert's id is a hash of (detector, scope, window
start), so a replay of the same input produces the same ids.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Sequence


from smtpguard.core.alert import Alert, alert_id, iso, rank

from .rules import Finding

#: lowest score of each severity, highest first
SEVERITY_FLOORS = (("critical", 0.9), ("high", 0.75), ("medium", 0.5), ("low", 0.3), ("info", 0.0))


def severity_of(score: float) -> str:
    for name, floor in SEVERITY_FLOORS:
        if score >= floor:
            return name
    return "info"


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
            sev = f.severity or severity_of(f.score)
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
