"""The enforcement outbox: enforcement events the response service owes the network, durable until
each configured output has taken them.

The response service never waits on the network while it consumes alerts: deciding writes the
registry, the decision and the events owed (:meth:`Outbox.publish`, store writes only); a
delivery thread (:class:`Deliverer`) sends them to ``smtp.enforcement`` and the webhook and marks
each output done. A webhook that hangs holds only that thread; alerts go on being decided, and the
events wait in the outbox (``smtpguard_enforcement_outbox_pending``) until it answers.

Across restarts: an event is in the outbox before the alert's offset is committed, so none is
lost; on start, the deliverer skips events the enforcement topic already holds (latest message per
key), so a Kafka event is not published twice. A webhook request that succeeded just before a
crash, unmarked, is sent again: receivers deduplicate by ``X-Smtpguard-Event-Id`` (and ``ip``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

import msgspec

from smtpguard.core import metrics
from smtpguard.core.config import Config
from smtpguard.core.errors import BrokerError, SmtpguardError
from smtpguard.core.records import RecordType, TimeMs
from smtpguard.core.registry import now_ms
from smtpguard.core.store import Store

from .enforce import EnforcementEvent, KafkaOutput, PublishReport, decode, encode, read_state
from .webhook import WebhookSender

log = logging.getLogger(__name__)


class OutboxEntry(msgspec.Struct):
    """One enforcement event owed to the outputs (one row of ``enforcement_outbox``; the latest row
    of an (event_id, ip) is its state)."""

    event_id: str
    ip: str
    payload: str
    """the :class:`EnforcementEvent` as JSON"""
    created_at: TimeMs
    kafka_done: bool = False
    webhook_done: bool = False
    webhook_dead: bool = False
    """the webhook gave up on it (dead-lettered in webhook_dead_letters)"""
    updated_at: TimeMs = 0


OUTBOX = RecordType(OutboxEntry, table="enforcement_outbox")


def migrations(db: str) -> list[tuple[str, list[str]]]:
    return [("response-outbox-1", [
        OUTBOX.ddl(db, "ENGINE = ReplacingMergeTree(`updated_at`) ORDER BY (`event_id`, `ip`)"),
    ])]


class Outbox:
    """The outbox table. Its :meth:`publish` has the enforcement outputs' signature, so the policy's
    executor hands it its events the same way it hands them to the outputs directly."""

    def __init__(self, store: Store, cfg: Config):
        self.store = store
        self.kafka = bool(cfg.kafka.bootstrap_servers)
        self.webhook = bool(cfg.response.webhook.url)

    def publish(self, events: Sequence[EnforcementEvent]) -> PublishReport:
        """Owe ``events`` to the outputs (store writes only); the deliverer sends them."""
        self.add(events)
        return PublishReport(skipped=["queued in the enforcement outbox"])

    def add(self, events: Sequence[EnforcementEvent]) -> None:
        if not events:
            return
        now = now_ms()
        self.store.insert_arrow(OUTBOX.table, OUTBOX.to_arrow([
            OutboxEntry(event_id=e.event_id, ip=e.ip, payload=encode(e).decode(), created_at=now, updated_at=now)
            for e in events]))

    def ensure(self, events: Sequence[EnforcementEvent]) -> int:
        """Add the events the outbox does not hold yet (a replay after a crash between the registry write
        and the outbox write); returns how many were missing."""
        have = self.known({e.event_id for e in events})
        missing = [e for e in events if (e.event_id, e.ip) not in have]
        self.add(missing)
        return len(missing)

    def known(self, event_ids: set[str]) -> set[tuple[str, str]]:
        if not event_ids:
            return set()
        rows = self.store.query(f"SELECT event_id, ip FROM {self.store.database}.{OUTBOX.table} "
                                "WHERE event_id IN {ids:Array(String)}", {"ids": sorted(event_ids)})
        return {(r[0], r[1]) for r in rows}

    def pending(self, limit: int = 500) -> list[OutboxEntry]:
        """Entries an output still owes, oldest first."""
        want = []
        if self.kafka:
            want.append("NOT kafka_done")
        if self.webhook:
            want.append("(NOT webhook_done AND NOT webhook_dead)")
        if not want:
            return []
        rows = self.store.query(
            f"SELECT {OUTBOX.select()} FROM {self.store.database}.{OUTBOX.table} FINAL WHERE {' OR '.join(want)} "
            "ORDER BY created_at, event_id, ip LIMIT {limit:UInt32}", {"limit": limit})
        return [OUTBOX.from_row(dict(zip(OUTBOX.names, r))) for r in rows]

    def mark(self, entry: OutboxEntry, **done: bool) -> OutboxEntry:
        new = msgspec.structs.replace(entry, **done, updated_at=max(now_ms(), entry.updated_at + 1))
        self.store.insert_arrow(OUTBOX.table, OUTBOX.to_arrow([new]))
        return new


class DeliveryThread:
    """What an outbox's delivery thread does, whatever it delivers: pass over what is owed
    (:meth:`deliver_once`), wait ``interval_s`` when nothing is, back off on store errors. A hanging
    output holds only this thread."""

    thread_name = "outbox"

    def __init__(self, stop: threading.Event, interval_s: float):
        self.stop = stop
        self.interval_s = interval_s
        self.errors = 0
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()

    def deliver_once(self) -> int:
        raise NotImplementedError

    def owes(self) -> bool:
        raise NotImplementedError

    def start(self) -> "DeliveryThread":
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """Until the outbox owes nothing (after at least one pass)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._idle.wait(0.2) and not self.owes():
                return True
        return False

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                n = self.deliver_once()
            except SmtpguardError as e:
                self.errors += 1
                log.warning("%s: %s (tried again in %.0f s)", self.thread_name, e, max(self.interval_s, 2))
                self.stop.wait(max(self.interval_s, 2))
                continue
            if n == 0:
                self._idle.set()
                self.stop.wait(self.interval_s)
            else:
                self._idle.clear()


class Deliverer(DeliveryThread):
    """Sends what the enforcement outbox owes to the topic and the webhook."""

    thread_name = "enforcement-outbox"

    def __init__(self, cfg: Config, store: Store, stop: threading.Event, interval_s: float = 0.5):
        super().__init__(stop, interval_s)
        self.cfg = cfg
        self.outbox = Outbox(store, cfg)
        self.kafka = KafkaOutput(cfg) if cfg.kafka.bootstrap_servers else None
        self.webhook = WebhookSender(cfg.response.webhook, store, stop) if cfg.response.webhook.url else None
        self.delivered = {"kafka": 0, "webhook": 0, "webhook_dead": 0, "kafka_already": 0}
        self._on_topic: dict[str, str] | None = None

    def owes(self) -> bool:
        return bool(self.outbox.pending(1))

    def deliver_once(self) -> int:
        """One pass over what is owed; returns how many entries it handled."""
        todo = self.outbox.pending()
        metrics.OUTBOX_PENDING.set(len(todo))
        if not todo:
            return 0
        if self.kafka is not None and self._on_topic is None:
            # once per start: what a crashed run published but did not mark is not published again
            try:
                self._on_topic = {k: e.event_id for k, e in read_state(self.cfg).items()}
            except BrokerError as e:
                raise BrokerError(f"cannot read {self.cfg.kafka.topics.enforcement}: {e}") from None
        for entry in todo:
            if self.stop.is_set():
                break
            event = decode(entry.payload.encode())
            if self.kafka is not None and not entry.kafka_done:
                if self._on_topic.get(entry.ip) == entry.event_id:
                    self.delivered["kafka_already"] += 1
                else:
                    self.kafka.publish([event])
                    self._on_topic[entry.ip] = entry.event_id
                    self.delivered["kafka"] += 1
                entry = self.outbox.mark(entry, kafka_done=True)
            if self.webhook is not None and not entry.webhook_done and not entry.webhook_dead:
                result = self.webhook.send(entry.payload.encode(), event_id=entry.event_id, ip=entry.ip)
                if result.stopped:
                    break  # stopped while retrying: it stays owed
                if result.delivered:
                    self.delivered["webhook"] += 1
                    entry = self.outbox.mark(entry, webhook_done=True)
                else:
                    self.delivered["webhook_dead"] += 1
                    entry = self.outbox.mark(entry, webhook_dead=True)
        return len(todo)
