"""Alerts for the SIEM: every raised alert POSTed as an OCSF Detection Finding
(:func:`smtpguard.core.ocsf.finding`, the object ``alerts list --format ocsf`` prints and the OCSF
topic carries) to ``response.siem_webhook``.

The response service owes each finding until the webhook took it: on consuming a raised alert it
writes the finding to the ``finding_outbox`` table (a store write, before the alert's offset is
committed; an alert id already there is not written again, so a replay owes nothing twice), and a
delivery thread sends what is owed, oldest first, with the enforcement webhook's signing, retries
and dead letters (:class:`~smtpguard.response.webhook.WebhookSender`). A webhook that hangs holds
only that thread. A request that succeeded just before a crash, unmarked, is sent again: receivers
deduplicate by ``X-Smtpguard-Event-Id`` (the alert id).
"""

from __future__ import annotations

import threading
from typing import Sequence

import msgspec

from smtpguard.core import ocsf
from smtpguard.core.alert import Alert
from smtpguard.core.config import Config
from smtpguard.core.records import RecordType, TimeMs
from smtpguard.core.registry import now_ms
from smtpguard.core.store import Store

from .outbox import DeliveryThread
from .webhook import WebhookSender


class FindingEntry(msgspec.Struct):
    """One finding owed to the SIEM webhook (one row of ``finding_outbox``; the latest row of an alert
    id is its state)."""

    alert_id: str
    key: str
    """the alert's source key (address or prefix) or ``tenant:T``"""
    payload: str
    """the OCSF Detection Finding as JSON"""
    created_at: TimeMs
    done: bool = False
    dead: bool = False
    """the webhook gave up on it (dead-lettered in webhook_dead_letters)"""
    updated_at: TimeMs = 0


FINDINGS = RecordType(FindingEntry, table="finding_outbox")


def migrations(db: str) -> list[tuple[str, list[str]]]:
    return [("response-findings-1", [
        FINDINGS.ddl(db, "ENGINE = ReplacingMergeTree(`updated_at`) ORDER BY (`alert_id`)"),
    ])]


class FindingOutbox:
    def __init__(self, store: Store):
        self.store = store

    def add(self, alerts: Sequence[Alert]) -> int:
        """Owe the findings of ``alerts`` that are not owed or sent yet; returns how many were added."""
        if not alerts:
            return 0
        rows = self.store.query(f"SELECT alert_id FROM {self.store.database}.{FINDINGS.table} "
                                "WHERE alert_id IN {ids:Array(String)}", {"ids": [a.alert_id for a in alerts]})
        have = {r[0] for r in rows}
        now = now_ms()
        new = [FindingEntry(alert_id=a.alert_id, key=a.src_ip or f"tenant:{a.tenant}", payload=ocsf.to_json(a).decode(),
                            created_at=now, updated_at=now) for a in alerts if a.alert_id not in have]
        if new:
            self.store.insert_arrow(FINDINGS.table, FINDINGS.to_arrow(new))
        return len(new)

    def pending(self, limit: int = 500) -> list[FindingEntry]:
        rows = self.store.query(
            f"SELECT {FINDINGS.select()} FROM {self.store.database}.{FINDINGS.table} FINAL "
            "WHERE NOT done AND NOT dead ORDER BY created_at, alert_id LIMIT {limit:UInt32}", {"limit": limit})
        return [FINDINGS.from_row(dict(zip(FINDINGS.names, r))) for r in rows]

    def mark(self, entry: FindingEntry, **flags: bool) -> FindingEntry:
        new = msgspec.structs.replace(entry, **flags, updated_at=max(now_ms(), entry.updated_at + 1))
        self.store.insert_arrow(FINDINGS.table, FINDINGS.to_arrow([new]))
        return new


class FindingDeliverer(DeliveryThread):
    """Sends the owed findings to ``response.siem_webhook`` in a thread of its own."""

    thread_name = "finding-outbox"

    def __init__(self, cfg: Config, store: Store, stop: threading.Event, interval_s: float = 0.5):
        super().__init__(stop, interval_s)
        self.outbox = FindingOutbox(store)
        self.webhook = WebhookSender(cfg.response.siem_webhook, store, stop)
        self.delivered = {"webhook": 0, "webhook_dead": 0}

    def owes(self) -> bool:
        return bool(self.outbox.pending(1))

    def deliver_once(self) -> int:
        todo = self.outbox.pending()
        for entry in todo:
            if self.stop.is_set():
                break
            result = self.webhook.send(entry.payload.encode(), event_id=entry.alert_id, ip=entry.key)
            if result.stopped:
                break
            if result.delivered:
                self.delivered["webhook"] += 1
                self.outbox.mark(entry, done=True)
            else:
                self.delivered["webhook_dead"] += 1
                self.outbox.mark(entry, dead=True)
        return len(todo)
