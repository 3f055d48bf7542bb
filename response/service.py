"""The response service (``smtpguard respond``, also run by ``serve``): a consumer group of its own on
``smtp.alerts`` that acts on every raised alert once.

For each alert: the revocation policy decides (:mod:`smtpguard.response.policy`), a revocation is
written to the exemption registry with the events owed to the network (the outbox,
:mod:`smtpguard.response.outbox`), and sources of alerts of ``dnsbl.check_alerts_from`` or higher
are looked up in the DNSBLs (:mod:`smtpguard.response.lookups`). The offsets of the alerts are
committed after their decisions and owed events are in the store, never before.

Exactly once, across restarts: the alert id is the key. A decided alert (its decision, or a
registry event naming it) is decided ``none`` when it comes again; a revocation whose owed events
did not reach the outbox before a crash gets them on the replay (:meth:`Outbox.ensure`); the
outbox's deliverer skips what the enforcement topic already holds; DNSBL answers already stored
for an alert are not looked up again.

Slow outputs hold only the deliverer's thread: a webhook that hangs delays neither this consumer's
polls (``kafka.max_poll_interval_ms``) nor the detectors, which no longer act on alerts at all.
The detectors learn of revocations from the registry (``detect.exemptions_refresh_ms``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from smtpguard.core import metrics
from smtpguard.core.alert import from_json
from smtpguard.core.config import Config
from smtpguard.core.errors import SmtpguardError, StoreError
from smtpguard.core.registry import Registry
from smtpguard.core.store import Store

from .enforce import messages_for
from .findings import FindingDeliverer, FindingOutbox
from .lookups import AlertLookups
from .outbox import Deliverer, Outbox
from .policy import Executor

log = logging.getLogger(__name__)


@dataclass
class ResponseStats:
    alerts: int = 0
    """raised alerts consumed"""
    bad_messages: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    recovered: int = 0
    """owed events put back in the outbox on a replay"""
    commits: int = 0

    def summary(self) -> str:
        return (f"response: {self.alerts:,} alerts consumed, decisions {self.decisions or 'none'}, "
                f"{self.bad_messages} unreadable messages, {self.commits} commits")


class Responder:
    """The consumer loop; :meth:`run` until ``stop`` is set (a clean stop writes and commits first)."""

    def __init__(self, cfg: Config, store: Store, stop: threading.Event | None = None, *, lookups: bool = True):
        from confluent_kafka import Consumer

        from smtpguard.core.kafka import consumer_settings

        self.cfg = cfg
        self.store = store
        self.stop_event = stop or threading.Event()
        self.registry = Registry(store)
        self.outbox = Outbox(store, cfg)
        self.executor = Executor(self.registry, cfg.response, self.outbox)
        self.deliverer = Deliverer(cfg, store, self.stop_event)
        self.findings = FindingOutbox(store) if cfg.response.siem_webhook.url else None
        self.finding_deliverer = FindingDeliverer(cfg, store, self.stop_event) if self.findings else None
        self.lookups = AlertLookups(cfg, store) if lookups else None
        self.consumer = Consumer(consumer_settings(cfg, group_id=cfg.kafka.response_group_id))
        self.poll_messages = cfg.response.poll_alerts
        self.stats = ResponseStats()
        self._pending: dict[int, int] = {}

    def run(self) -> ResponseStats:
        self.consumer.subscribe([self.cfg.kafka.topics.alerts], on_revoke=self._on_revoke)
        self.deliverer.start()
        if self.finding_deliverer is not None:
            self.finding_deliverer.start()
        try:
            while not self.stop_event.is_set():
                self.step(0.5)
        finally:
            try:
                self._commit()
            except Exception as e:  # noqa: BLE001 - a failed final commit means a replay, which is harmless
                log.warning("final commit failed: %s", e)
            self.consumer.close()
            if self.lookups is not None:
                self.lookups.close(timeout_s=10)
            self.deliverer.join(15)
            if self.finding_deliverer is not None:
                self.finding_deliverer.join(15)
        return self.stats

    def _on_revoke(self, _consumer: Any, _partitions: list[Any]) -> None:
        try:
            self._commit()
        except Exception as e:  # noqa: BLE001
            log.warning("commit on revoke failed: %s", e)

    def step(self, timeout_s: float = 0.5) -> None:
        msgs = self.consumer.consume(self.poll_messages, timeout_s)
        raised = []
        done: dict[int, int] = {}  # offsets to commit once everything this step owes is written
        for m in msgs:
            if m.error():
                log.warning("consumer error: %s", m.error())
                continue
            try:
                alert = from_json(m.value())
            except Exception as e:  # noqa: BLE001 - a message the detectors did not write: skipped, counted
                self.stats.bad_messages += 1
                log.warning("alerts[%d] offset %d is not an alert (%s): skipped", m.partition(), m.offset(), e)
                done[m.partition()] = m.offset() + 1
                continue
            if not alert.suppressed:
                raised.append(alert)
                self._act(alert)
            else:
                self.stats.decisions["suppressed"] = self.stats.decisions.get("suppressed", 0) + 1
            done[m.partition()] = m.offset() + 1
        if raised and self.findings is not None:
            self._owe_findings(raised)
        self._pending.update(done)
        if msgs:
            self._commit()

    def _owe_findings(self, alerts: list[Any]) -> None:
        """The SIEM's findings of these alerts, owed before their offsets are committed."""
        delay = 0.5
        while True:
            try:
                self.findings.add(alerts)
                return
            except StoreError as e:
                log.error("writing %d findings for the SIEM failed (%s); trying again in %.1f s", len(alerts), e, delay)
                if self.stop_event.wait(delay):
                    raise
                delay = min(delay * 2, 10.0)

    def _act(self, alert: Any) -> None:
        """Decide about one alert (store writes only); retried until the store takes it."""
        self.stats.alerts += 1
        if self.cfg.response.action_for(alert.detector, alert.severity) == "notify":
            # nothing to decide: the alert itself is the notification (and the registry reads cost time)
            self.stats.decisions["notify"] = self.stats.decisions.get("notify", 0) + 1
            if self.lookups is not None and not self._looked_up(alert.alert_id):
                self.lookups.submit([alert])
            return
        delay = 0.5
        while True:
            try:
                outcome = self.executor.handle(alert)
                d = outcome.decision
                if d.action == "none" and d.rule == "duplicate":
                    # decided before: make sure the events a revocation owes are in the outbox
                    for event in self.registry.events(alert_id=alert.alert_id):
                        if event.kind == "revoked":
                            self.stats.recovered += self.outbox.ensure(messages_for(event, self.registry.states()))
                self.stats.decisions[d.action] = self.stats.decisions.get(d.action, 0) + 1
                break
            except StoreError as e:
                log.error("deciding about alert %s failed (%s); trying again in %.1f s", alert.alert_id, e, delay)
                if self.stop_event.wait(delay):
                    raise
                delay = min(delay * 2, 10.0)
        if self.lookups is not None and not self._looked_up(alert.alert_id):
            self.lookups.submit([alert])

    def _looked_up(self, alert_id: str) -> bool:
        from .lookups import DNSBL_ANSWER

        try:
            return bool(self.store.query(f"SELECT 1 FROM {self.store.database}.{DNSBL_ANSWER.table} "
                                         "WHERE alert_id = {id:String} LIMIT 1", {"id": alert_id}))
        except SmtpguardError:
            return False

    def _commit(self) -> None:
        from confluent_kafka import TopicPartition

        if not self._pending:
            return
        topic = self.cfg.kafka.topics.alerts
        self.consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in self._pending.items()],
                             asynchronous=False)
        self._pending.clear()
        self.stats.commits += 1
        metrics.RESPONSE_COMMITS.inc()

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Until the outboxes owe nothing and the lookups are done (the demo, tests)."""
        deadline = time.monotonic() + timeout_s
        ok = self.deliverer.wait_idle(timeout_s)
        if self.finding_deliverer is not None:
            ok = self.finding_deliverer.wait_idle(max(0.1, deadline - time.monotonic())) and ok
        if self.lookups is not None:
            ok = self.lookups.drain(max(0.1, deadline - time.monotonic())) and ok
        return ok
