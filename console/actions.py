"""Actions on alerts and exemptions, as plain functions that the web console, its JSON API and
the command line share.

Every action names its actor. Actions on an alert add a row to ``alert_actions`` (with the
alert's new status when it changes one); confirm and dismiss also store a review label
(``review_labels``: confirmed or false_positive) for training. Changes to exemptions go
through the response registry, which records them in its own event log, and are then
published to the enforcement outputs (Kafka, webhook) as ``smtpguard exemptions`` does.

=================== ========== ===========================================================================
action              role       effect
=================== ========== ===========================================================================
acknowledge         analyst    status new -> acknowledged: someone is looking at it
confirm             analyst    status -> confirmed, label confirmed; the revocation policy decides about
                               the alert (:class:`smtpguard.response.policy.Executor`): notify, warn,
                               propose or revoke the source's exemption, and publishes a revocation
dismiss             analyst    status -> dismissed, label false_positive
recheck_dnsbl       analyst    looks the source up in the configured DNSBLs and stores the answers
revoke_exemption    admin      revokes an exemption (optionally naming the alert behind it)
restore_exemption   admin      lifts a revocation
grant_exemption     admin      exempts an address or block
=================== ========== ===========================================================================

Writes are serialised within the process: the registry expects one writer per key, and a
double click must not confirm an alert twice.

Example::

    c = Console(cfg, store)
    confirm(c, "4f1c0a9e2b7d5e6f7a8b9c0d", actor="alice", note="spam run, ticket SEC-12")
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
from typing import Any

import msgspec
import pyarrow as pa

from smtpguard.core.config import Config
from smtpguard.response.dnsbl import Checker, check_sync, summary
from smtpguard.core.errors import BrokerError, InputError, SmtpguardError
from smtpguard.core.config import ResponseConfig
from smtpguard.response.enforce import Outputs, PublishReport, messages_for
from smtpguard.response.lookups import store_results
from smtpguard.response.policy import Decision, DecisionLog, Executor
from smtpguard.core.registry import ExemptionEvent, Registry, parse_key
from smtpguard.core.records import iso_of, ms_of
from smtpguard.models.verdicts import CONFIRMED, DISMISSED
from smtpguard.core.store import Store

from . import queries, schema

MAX_NOTE_CHARS = 2000


class NotFound(SmtpguardError):
    """No such alert (or exemption key)."""


class Refused(SmtpguardError):
    """The action does not apply in the alert's current state (e.g. confirming a confirmed alert)."""


class ActionResult(msgspec.Struct, kw_only=True):
    """What an action did, for people (``message``) and scripts (``detail``)."""

    action: str
    actor: str
    at: str
    message: str
    alert_id: str = ""
    status: str = ""
    """the alert's status after the action ('' for actions not on an alert)"""
    detail: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class Console:
    """What the actions need: the store, the config, the response policy, and the clients they share."""

    def __init__(self, cfg: Config, store: Store, response: ResponseConfig | None = None):
        self.cfg = cfg
        self.store = store
        self.response = response if response is not None else cfg.response
        self.registry = Registry(store)
        self.decisions = DecisionLog(store)
        self.lock = threading.RLock()
        self._outputs: Outputs | None = None
        self._checker: Checker | None = None

    def outputs(self) -> Outputs:
        """The enforcement outputs, built on first use (connecting to Kafka takes a moment) and kept."""
        if self._outputs is None:
            self._outputs = Outputs(self.cfg, self.response, self.store)
        return self._outputs

    @property
    def checker(self) -> Checker:
        # one checker per process, so that its cache and query-rate bound span every check
        if self._checker is None:
            self._checker = Checker(self.cfg.dnsbl)
        return self._checker


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _note(note: str) -> str:
    note = (note or "").strip()
    if len(note) > MAX_NOTE_CHARS:
        raise InputError(f"a note may have at most {MAX_NOTE_CHARS} characters")
    return note


def _alert(c: Console, alert_id: str) -> dict[str, Any]:
    row = queries.get_alert(c.store, alert_id)
    if row is None:
        raise NotFound(f"no alert {alert_id}")
    return row


def _record(c: Console, alert: dict[str, Any], action: str, actor: str, status_after: str, note: str,
            message: str, detail: dict[str, Any]) -> ActionResult:
    at = _now()
    action_id = f"{int(at.timestamp() * 1000):012x}{secrets.token_hex(6)}"
    c.store.insert_arrow(schema.ALERT_ACTIONS, pa.table({
        "action_id": [action_id], "alert_id": [alert["alert_id"]], "action": [action], "actor": [actor],
        "at": pa.array([at], pa.timestamp("ms", tz="UTC")), "status_after": [status_after], "note": [note],
        "message": [message], "detail": [json.dumps(detail, default=str)],
    }))
    return ActionResult(action=action, actor=actor, at=_iso(at), message=message, alert_id=alert["alert_id"],
                        status=status_after or alert["status"], detail=detail)


def _label(c: Console, alert: dict[str, Any], label: str, actor: str) -> None:
    ts = pa.timestamp("ms", tz="UTC")
    c.store.insert_arrow(schema.REVIEW_LABELS, pa.table({
        "alert_id": [alert["alert_id"]], "src_ip": pa.array([alert["src_ip"]], pa.string()),
        "tenant": [alert["tenant"]], "detector": [alert["detector"]],
        "window_start": pa.array([alert["window_start"]], ts), "label": [label], "actor": [actor],
        "at": pa.array([_now()], ts),
    }))


def _publish_report(report: PublishReport | None, error: str = "") -> dict[str, Any]:
    if report is None:
        return {"error": error} if error else {}
    return {"kafka": report.kafka, "webhook_delivered": report.webhook_delivered,
            "webhook_dead": report.webhook_dead, "skipped": list(report.skipped), **({"error": error} if error else {})}


def _published_words(p: dict[str, Any]) -> str:
    if not p:
        return ""
    if p.get("error"):
        return (f"; the change is recorded, but the enforcement events were not delivered ({p['error']}): "
                "run `smtpguard enforce publish` once the outputs are reachable")
    sent = []
    if p.get("kafka"):
        sent.append(f"{p['kafka']} enforcement event(s) to Kafka")
    if p.get("webhook_delivered"):
        sent.append(f"{p['webhook_delivered']} to the webhook")
    if p.get("webhook_dead"):
        sent.append(f"{p['webhook_dead']} webhook deliveries failed (dead-lettered)")
    return "; published " + ", ".join(sent) if sent else "; no enforcement output is configured"


def _decision_dict(d: Decision) -> dict[str, Any]:
    return msgspec.to_builtins(d)


def _logged_decision(c: Console, alert: dict[str, Any]) -> dict[str, Any] | None:
    """The response policy's recorded decision about the alert, if any."""
    if not alert["src_ip"]:
        return None
    row = next((d for d in c.decisions.list(ip=alert["src_ip"], limit=10_000) if d["alert_id"] == alert["alert_id"]), None)
    return None if row is None else {k: (queries.iso_z(v) if isinstance(v, dt.datetime) else v) for k, v in row.items()}


def acknowledge(c: Console, alert_id: str, actor: str, note: str = "") -> ActionResult:
    """Mark a new alert as being looked at."""
    note = _note(note)
    with c.lock:
        alert = _alert(c, alert_id)
        if alert["status"] != "new":
            raise Refused(f"alert {alert_id} is {alert['status']}; only new alerts can be acknowledged")
        return _record(c, alert, "acknowledge", actor, "acknowledged", note, f"acknowledged by {actor}", {})


def confirm(c: Console, alert_id: str, actor: str, note: str = "") -> ActionResult:
    """Confirm the alert as abuse: label it, and let the revocation policy decide and act."""
    note = _note(note)
    with c.lock:
        alert = _alert(c, alert_id)
        if alert["status"] == "confirmed":
            raise Refused(f"alert {alert_id} is already confirmed")
        try:
            outputs, outputs_error = c.outputs(), ""
        except BrokerError as e:
            # the decision and the revocation are still recorded; only publishing waits
            outputs, outputs_error = None, str(e)
        executor = Executor(c.registry, c.response, outputs)
        decision: Decision | None = None
        published, publish_error = None, outputs_error
        try:
            outcome = executor.handle(queries.as_alert(alert))
            decision, published = outcome.decision, outcome.published
        except BrokerError as e:
            # the executor writes the registry and its decision log first, then publishes
            publish_error = str(e)
        logged = _logged_decision(c, alert)
        detail: dict[str, Any] = {}
        if decision is not None and decision.action == "none":
            detail["decision"] = _decision_dict(decision)
            if logged is not None:
                detail["earlier_decision"] = logged
                words = f"the policy had already decided about this alert: {logged['action']} ({logged['rule']})"
            else:
                words = f"policy: no action ({decision.rule}) — {decision.reason}"
        else:
            d = _decision_dict(decision) if decision is not None else logged
            detail["decision"] = d
            words = f"policy: {d['action']} ({d['rule']}) — {d['reason']}" if d else "policy: see the decision log"
            if d and d["action"] == "revoke":
                detail["published"] = _publish_report(published, publish_error)
        message = f"confirmed by {actor}; {words}{_published_words(detail.get('published', {}))}"
        result = _record(c, alert, "confirm", actor, "confirmed", note, message, detail)
        _label(c, alert, CONFIRMED, actor)
        return result


def dismiss(c: Console, alert_id: str, actor: str, note: str = "") -> ActionResult:
    """Dismiss the alert as a false positive (stored as a review label for training)."""
    note = _note(note)
    with c.lock:
        alert = _alert(c, alert_id)
        if alert["status"] == "dismissed":
            raise Refused(f"alert {alert_id} is already dismissed")
        message = f"dismissed as a false positive by {actor}"
        if alert["src_ip"] and any(e.kind == "revoked" for e in c.registry.events(alert_id=alert_id)):
            message += (f"; the exemption of {alert['src_ip']} was revoked for this alert: "
                        "an admin can restore it on the alert page")
        result = _record(c, alert, "dismiss", actor, "dismissed", note, message, {})
        _label(c, alert, DISMISSED, actor)
        return result


def restore(c: Console, alert_id: str, actor: str, note: str = "") -> ActionResult:
    """Give an alert the detectors held at low, as a repeat of alerts the team dismissed
    (``evidence.held``: detectors/repeats.py), the severity its rules gave it. The alert row is
    written again with that severity (and the restore in its evidence and reasons); confirming it then
    applies the revocation policy as for any alert."""
    note = _note(note)
    with c.lock:
        alert = _alert(c, alert_id)
        a = queries.as_alert(alert)
        held = a.evidence.get("held")
        if not isinstance(held, dict) or "rule_severity" not in held:
            raise Refused(f"alert {alert_id} was not held: its severity is the one its rules gave it")
        if held.get("restored_by"):
            raise Refused(f"alert {alert_id} was already restored to {held['rule_severity']} by {held['restored_by']}")
        rule, at = held["rule_severity"], _now()
        restored = msgspec.structs.replace(
            a, severity=rule, status=alert["status"],
            evidence={**a.evidence, "held": {**held, "restored_by": actor, "restored_at": _iso(at)}},
            reasons=[*a.reasons, f"severity restored to {rule} by {actor} ({_iso(at)})"],
            # the alerts table keeps the row with the latest created_at: the restored one
            created_at=iso_of(ms_of(a.created_at) + 1))
        then = ("it was already confirmed while held: the policy decided at low (the decision log); act on the "
                "exemption from the exemptions page if it should" if alert["status"] == "confirmed"
                else "confirm it to apply the revocation policy")
        # the action first: if writing the alert fails, the restore can be retried (it is not yet restored)
        result = _record(c, alert, "restore", actor, "", note,
                         f"severity restored from {a.severity} to {rule} by {actor}; {then} (the alerts topic keeps "
                         "the alert as it was published)", {"from": a.severity, "to": rule})
        c.store.insert_alerts([restored])
        return result


def recheck_dnsbl(c: Console, alert_id: str, actor: str) -> ActionResult:
    """Look the alert's source up in the configured DNSBLs (dnsbl.default_zones) and store the answers."""
    from smtpguard.core.alert import address_of

    alert = _alert(c, alert_id)
    ip = address_of(alert["src_ip"], alert.get("evidence"))
    if not ip:
        raise Refused(f"alert {alert_id} is about tenant {alert['tenant']}, not one address: nothing to look up")
    results = check_sync([ip], checker=c.checker)
    store_results(c.store, results, actor=actor, alert_id=alert_id)
    s = summary(results).get(ip)
    if s is None:
        message = f"no configured DNSBL zone answers for {ip}"
    else:
        message = (f"{ip}: listed in {len(s.listed)} of {len(results)} zones (score {s.score:g})"
                   + (f": {', '.join(s.listed)}" if s.listed else "")
                   + (f"; policy listings: {', '.join(s.policy)}" if s.policy else "")
                   + (f"; no answer from {', '.join(s.errors)}" if s.errors else ""))
    with c.lock:
        return _record(c, alert, "recheck_dnsbl", actor, "", "", message,
                       {"results": [r.to_dict() for r in results]})


# -- exemptions ---------------------------------------------------------------------------------------
def _publish(c: Console, events: list[ExemptionEvent]) -> dict[str, Any]:
    if not events:
        return {}
    states = c.registry.states()
    msgs = [m for e in events for m in messages_for(e, states)]
    try:
        return _publish_report(c.outputs().publish(msgs))
    except BrokerError as e:
        return _publish_report(None, str(e))


def _exemption_change(c: Console, kind: str, change, actor: str, alert_id: str | None) -> ActionResult:
    with c.lock:
        alert = _alert(c, alert_id) if alert_id else None
        expired = c.registry.expire_due()
        event: ExemptionEvent = change(c.registry)
        published = _publish(c, [*expired, event])
        message = f"{event.ip}: {event.kind} by {actor} ({event.reason}){_published_words(published)}"
        detail = {"event": event.to_dict(), "published": published}
        if alert is not None:
            return _record(c, alert, kind, actor, "", "", message, detail)
        return ActionResult(action=kind, actor=actor, at=event.to_dict()["at"], message=message, detail=detail)


def _reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise InputError("a reason is required: every change to an exemption records why")
    return _note(reason)


def revoke_exemption(c: Console, key: str, actor: str, reason: str, alert_id: str | None = None) -> ActionResult:
    """Revoke the exemption of an address or block (an address inside an exempted block is cut out of it)."""
    key, reason = parse_key(key)[0], _reason(reason)
    return _exemption_change(c, "revoke_exemption",
                             lambda reg: reg.revoke(key, reason, actor, [alert_id] if alert_id else []), actor, alert_id)


def restore_exemption(c: Console, key: str, actor: str, reason: str, alert_id: str | None = None) -> ActionResult:
    """Lift a revocation: the exemption is as it was before it."""
    key, reason = parse_key(key)[0], _reason(reason)
    return _exemption_change(c, "restore_exemption", lambda reg: reg.restore(key, reason, actor), actor, alert_id)


def grant_exemption(c: Console, key: str, tenant: str, actor: str, reason: str,
                    expires: dt.datetime | None = None) -> ActionResult:
    """Exempt an address or block: it may send mail on port 25."""
    key, reason = parse_key(key)[0], _reason(reason)
    tenant = (tenant or "").strip()
    if not tenant:
        raise InputError("a tenant is required: the account, project or subscription that holds the address")
    return _exemption_change(c, "grant_exemption", lambda reg: reg.grant(key, tenant, reason, actor, expires),
                             actor, None)
