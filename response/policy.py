"""Revocation policy: what to do about an alert on an exempted IP, and the executor that does it.

:func:`apply_policy` is pure: the alert, what is known about the IP (:class:`History`), the
``[response]`` config and the decision time in; a :class:`Decision` out. The configured
action (per severity, overridable per detector, see the [response] section of :mod:`smtpguard.core.config`) becomes:

========== ===========================================================================================
notify     ``notify``: recorded for the on-call, nothing changes
propose    ``propose``: a revocation waits for review (``smtpguard exemptions proposals``)
revoke     ``revoke`` at once
graduated  ``revoke`` when the IP was restored less than ``restore_probation_days`` before the alert,
           or when it has an earlier offence less than ``graduated_window_days`` before it;
           otherwise ``warn`` (a first offence)
========== ===========================================================================================

An offence is an alert whose decision was warn, propose or revoke. Offences are counted by
alert window (event time), so a replay decides the same, and alerts of several detectors for
the same window count once. A ``revoke`` for a tenant on ``response.tenant_allowlist``
(until its date, against the decision time) becomes ``propose``. Alerts about IPs with no
active exemption, tenant-level alerts and suppressed findings are never revocations.

:class:`Executor` applies decisions: it writes the revocation to the registry, records every
decision in ``response_decisions`` (keyed by alert id) and publishes the enforcement events.
An alert already decided, or already named by a registry event, is decided ``none``: applying
the same alert twice never revokes twice. A revocation is always reversible with
``Registry.restore``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import msgspec

from smtpguard.core.alert import Alert
from smtpguard.core.config import ResponseConfig
from smtpguard.core.records import RecordType, TimeMs, ch
from smtpguard.core.registry import ExemptionEvent, KeyState, Registry, from_ms, iso_ms, parse_key, to_ms
from smtpguard.core.store import Store

from .enforce import Outputs, PublishReport, messages_for
from smtpguard.core.registry import now_ms as wall_clock_ms

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
#: Decisions that count as an offence on the graduated path.
OFFENCES = ("warn", "propose", "revoke")
DECISIONS_TABLE = "response_decisions"
LowCardinality = Annotated[str, ch("LowCardinality(String)")]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy decided about one alert (one row of ``response_decisions``: :data:`DECISION`)."""

    alert_id: str
    ip: str
    """the alert's source ('' for a tenant-level alert)"""
    tenant: str
    detector: LowCardinality
    severity: LowCardinality
    alert_at: TimeMs
    """the alert's window start (epoch ms): offences are counted in event time"""
    configured: LowCardinality
    """the configured action for the alert's detector and severity"""
    action: LowCardinality
    """none, notify, warn, propose or revoke"""
    rule: LowCardinality
    """which rule chose the action: duplicate, suppressed, tenant-scope, no-exemption, configured,
    first-offence, repeat-offence, after-restore, allowlist; recovered (a revocation written before its
    process stopped, its decision recorded on the replay)"""
    reason: str
    """for people, with the numbers behind it"""
    event_id: str = ""
    """the registry event the executor wrote for it (revocations)"""
    decided_at: TimeMs = 0
    """when it was decided (epoch ms; set when it is recorded)"""


DECISION = RecordType(Decision, table=DECISIONS_TABLE)
DECISION_COLUMNS = tuple(DECISION.clickhouse_columns())


def migrations(db: str) -> list[tuple[str, list[str]]]:
    return [("response-decisions-1", [
        DECISION.ddl(db, "ENGINE = ReplacingMergeTree(`decided_at`) ORDER BY (`alert_id`)"),
    ])]


@dataclass(frozen=True)
class History:
    """What the policy knows about an alert's IP when it decides."""

    handled: bool = False
    """the alert id was decided before, or a registry event names it"""
    exemption: KeyState | None = None
    """the active exemption that lets the IP send (its own, or a block around it); None if none"""
    offences_ms: tuple[int, ...] = ()
    """window starts of the IP's earlier offences"""


def apply_policy(alert: Alert, history: History, policy: ResponseConfig, now: int) -> Decision:
    """Decide what to do about ``alert`` (pure; ``now`` is the decision time in ms)."""
    at = alert.window_start_ms
    configured = policy.action_for(alert.detector, alert.severity)
    what = (f"{alert.detector} {alert.severity} alert {alert.alert_id} (score {alert.score:.2f})"
            + (f": {alert.reasons[0]}" if alert.reasons else ""))

    def decide(action: str, rule: str, why: str) -> Decision:
        return Decision(alert_id=alert.alert_id, ip=alert.src_ip or "", tenant=alert.tenant, detector=alert.detector,
                        severity=alert.severity, alert_at=at, configured=configured, action=action, rule=rule,
                        reason=f"{what}; {why}")

    if history.handled:
        return decide("none", "duplicate", "this alert was already handled")
    if alert.suppressed:
        return decide("none", "suppressed", f"the finding was suppressed ({alert.suppressed}), not raised")
    if alert.src_ip is None:
        return decide("notify", "tenant-scope", f"a tenant-level alert for {alert.tenant}: no single exemption to act on")
    ex = history.exemption
    if ex is None:
        return decide("notify", "no-exemption", f"{alert.src_ip} has no active exemption to revoke")
    if configured in ("notify", "propose", "revoke"):
        d = decide(configured, "configured", f"{alert.severity} {alert.detector} alerts are set to {configured}")
    elif ex.restored_at_ms is not None and ex.restored_at_ms <= at < ex.restored_at_ms + policy.restore_probation_days * DAY_MS:
        d = decide("revoke", "after-restore", f"abuse again after the exemption was restored at {iso_ms(ex.restored_at_ms)} "
                                              f"(within {policy.restore_probation_days} days)")
    else:
        earlier = [o for o in history.offences_ms if at - policy.graduated_window_days * DAY_MS <= o < at]
        if earlier:
            d = decide("revoke", "repeat-offence", f"offence {len(earlier) + 1} within {policy.graduated_window_days} days "
                                                   f"(the one before at {iso_ms(max(earlier))})")
        else:
            d = decide("warn", "first-offence", f"a first offence: warned; another within "
                                                f"{policy.graduated_window_days} days revokes")
    if d.action == "revoke":
        allowance = policy.allowance(alert.tenant, now) or policy.allowance(ex.tenant, now)
        if allowance is not None:
            return msgspec.structs.replace(
                d, action="propose", rule="allowlist",
                reason=f"{d.reason}; proposed for review instead: tenant {allowance.tenant} is allowlisted until "
                       f"{allowance.until}" + (f" ({allowance.reason})" if allowance.reason else ""))
    return d


class DecisionLog:
    """The ``response_decisions`` table: every decision, keyed by alert id."""

    def __init__(self, store: Store):
        self.store = store
        self.table = f"{store.database}.{DECISIONS_TABLE}"

    def record(self, d: Decision, decided_at_ms: int) -> None:
        self.store.insert_arrow(DECISIONS_TABLE, DECISION.to_arrow([msgspec.structs.replace(d, decided_at=decided_at_ms)]))

    def has(self, alert_id: str) -> bool:
        return bool(self.store.query(f"SELECT 1 FROM {self.table} WHERE alert_id = {{id:String}} LIMIT 1", {"id": alert_id}))

    def offences(self, ip: str, since_ms: int, until_ms: int) -> tuple[int, ...]:
        rows = self.store.query(
            f"SELECT DISTINCT alert_at FROM {self.table} FINAL WHERE ip = {{ip:String}} "
            "AND action IN {offences:Array(String)} AND alert_at >= {since:DateTime64(3, 'UTC')} "
            "AND alert_at < {until:DateTime64(3, 'UTC')} ORDER BY alert_at",
            {"ip": ip, "offences": list(OFFENCES), "since": from_ms(since_ms), "until": from_ms(until_ms)})
        return tuple(to_ms(r[0]) for r in rows)

    def list(self, *, action: str | None = None, ip: str | None = None, limit: int = 100) -> list[dict]:
        where, params = ["1"], {"limit": limit}
        if action:
            where.append("action = {action:String}")
            params["action"] = action
        if ip:
            where.append("ip = {ip:String}")
            params["ip"] = ip
        names = DECISION.names
        rows = self.store.query(f"SELECT {DECISION.select()} FROM {self.table} FINAL WHERE {' AND '.join(where)} "
                                "ORDER BY decided_at DESC, alert_id LIMIT {limit:UInt32}", params)
        return [dict(zip(names, r)) for r in rows]


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    published: PublishReport | None = None


class Executor:
    """Decides about alerts and carries the decisions out: registry, decision log, enforcement outputs.

    Alerts of one IP must reach one executor at a time (``smtp.alerts`` is keyed by IP, so a
    consumer group gives exactly that).
    """

    def __init__(self, registry: Registry, policy: ResponseConfig, outputs: Outputs | None = None):
        self.registry = registry
        self.policy = policy
        self.outputs = outputs
        self.decisions = DecisionLog(registry.store)

    def history(self, alert: Alert, now: int) -> History:
        handled = self.decisions.has(alert.alert_id) or bool(self.registry.events(alert_id=alert.alert_id))
        if handled or alert.src_ip is None:
            return History(handled=handled)
        at = alert.window_start_ms
        return History(exemption=self.registry.exemption_of(alert.src_ip, now),
                       offences_ms=self.decisions.offences(alert.src_ip, at - self.policy.graduated_window_days * DAY_MS, at))

    def _unrecorded_revocation(self, alert: Alert) -> ExemptionEvent | None:
        """The revocation this alert made if its decision was never recorded, else None."""
        if self.decisions.has(alert.alert_id):
            return None
        return next((e for e in self.registry.events(alert_id=alert.alert_id) if e.kind == "revoked"), None)

    def handle(self, alert: Alert, *, now_ms: int | None = None) -> Outcome:
        """Decide about one alert and act. Store writes come first; a failure to publish raises
        afterwards (the registry is right; ``smtpguard enforce publish`` sends the state again)."""
        now = now_ms if now_ms is not None else wall_clock_ms()
        event = self._unrecorded_revocation(alert)
        if event is not None:
            # the process stopped between the revocation and its decision: record the decision now (and
            # publish, as the revocation would have), instead of taking the alert for one already handled
            d = Decision(alert_id=alert.alert_id, ip=alert.src_ip or "", tenant=alert.tenant, detector=alert.detector,
                         severity=alert.severity, alert_at=alert.window_start_ms,
                         configured=self.policy.action_for(alert.detector, alert.severity), action="revoke",
                         rule="recovered", reason=f"{alert.detector} {alert.severity} alert {alert.alert_id}: its "
                         f"revocation {event.event_id} was written before the process stopped; its decision now",
                         event_id=event.event_id)
            log.warning("recovered the decision of alert %s (revocation %s)", alert.alert_id, event.event_id)
        else:
            d = apply_policy(alert, self.history(alert, now), self.policy, now)
            if d.action == "none":
                return Outcome(d)
        if d.action == "revoke" and event is None:
            # the source itself (an address, or an IPv6 prefix cut out of a block), or the exempted key inside it
            ex = self.registry.exemption_of(alert.src_ip, now)
            target = alert.src_ip if ex is None or parse_key(alert.src_ip)[1].subnet_of(ex.network) else ex.key
            event = self.registry.revoke(target, d.reason, self.policy.actor, [alert.alert_id], now_ms=now)
            d = msgspec.structs.replace(d, event_id=event.event_id)
        self.decisions.record(d, now)
        log.info("%s %s: %s (%s)", d.action, d.ip or d.tenant, d.reason, d.rule)
        if event is None or self.outputs is None:
            return Outcome(d)
        return Outcome(d, self.outputs.publish(messages_for(event, self.registry.states(now))))
