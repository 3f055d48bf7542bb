"""DNSBL answers as alert evidence: every new alert of ``dnsbl.check_alerts_from`` or higher has
its source looked up in the default zones, and the answers are stored with the alert id.

The lookups run on a worker thread of the detector, off the consume-detect-commit path: a
blocklist that times out (3 s by default) must not hold a partition back, and answers arrive
a moment after the alert they belong to. The queue is bounded (``dnsbl.alert_queue_max``);
when a flood of alerts fills it, further lookups are skipped and counted, never silently
dropped, and the console's "re-check DNSBLs" action (or ``smtpguard alerts dnsbl``) looks any
alert up later. Lookups still queued when the detector stops are counted as skipped too.

Answers go to the ``dnsbl_checks`` table (:func:`store_results`, the one writer of that
table, shared with the console's re-check), where the console's alert page, the JSON API and
``smtpguard alerts show`` read them (:func:`smtpguard.console.queries.stored_dnsbl`).

Example::

    lookups = AlertLookups(cfg, store)
    lookups.submit(new_alerts)      # returns at once
    lookups.close(timeout_s=10)     # waits for what is queued, then stops the worker
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import msgspec

from smtpguard.core.alert import LowCardinality, address_of
from smtpguard.core.config import Config
from smtpguard.core.errors import SmtpguardError
from smtpguard.core.record import SEVERITIES
from smtpguard.core.records import RecordType, Time, iso_of
from smtpguard.core.store import Store
from smtpguard.response.dnsbl import Checker, Result, check_sync, summary

log = logging.getLogger(__name__)

#: the actor recorded on answers the detector looked up by itself
ACTOR = "smtpguard-detector"
#: alerts looked up together (their distinct addresses go out as one concurrent check)
BATCH = 64


class DnsblAnswer(msgspec.Struct):
    """One stored DNSBL answer: an address in one zone, when, for whom (one row of ``dnsbl_checks``)."""

    checked_at: Time
    ip: str
    zone: LowCardinality
    status: LowCardinality
    """listed, policy, not_listed or error"""
    codes: list[str]
    meaning: str
    txt: str
    error: str
    delist_url: str
    weight: float
    actor: str
    """who asked: the detector's lookups, a person in the console, an audit"""
    alert_id: str
    """the alert it was looked up for ('' when none)"""


DNSBL_ANSWER = RecordType(DnsblAnswer, table="dnsbl_checks")


def migrations(db: str) -> list[tuple[str, list[str]]]:
    """Stores made before this step got the table from the console's first step (same columns)."""
    return [("response-dnsbl-1", [DNSBL_ANSWER.ddl(db, "ENGINE = MergeTree ORDER BY (`ip`, `checked_at`, `zone`)")])]


def store_results(store: Store, results: Sequence[Result], *, actor: str, alert_id: str = "",
                  at: dt.datetime | None = None) -> None:
    """Append DNSBL answers to ``dnsbl_checks`` (one row per address and zone): the one writer of the table."""
    if not results:
        return
    at_iso = iso_of(int((at or dt.datetime.now(dt.timezone.utc)).timestamp() * 1000))
    store.insert_arrow(DNSBL_ANSWER.table, DNSBL_ANSWER.to_arrow([
        DnsblAnswer(checked_at=at_iso, ip=r.ip, zone=r.zone, status=r.status, codes=list(r.codes), meaning=r.meaning,
                    txt=r.txt, error=r.error or "", delist_url=r.delist_url, weight=r.weight, actor=actor,
                    alert_id=alert_id) for r in results]))


@dataclass
class LookupStats:
    queued: int = 0
    alerts_checked: int = 0
    listed: int = 0
    """alerts whose source at least one zone lists"""
    errors: int = 0
    """answers that were errors (timeouts, refusals, invalid answers): never counted as listings"""
    skipped: int = 0
    """alerts not looked up: the queue was full, or the detector stopped before their turn"""
    failed: int = 0
    """alerts whose lookup or write failed (logged with the reason)"""

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Job:
    alert_id: str
    ip: str


class AlertLookups:
    """Looks the sources of new medium-or-higher alerts up in DNSBLs on a worker thread."""

    def __init__(self, cfg: Config, store: Store, checker: Checker | None = None):
        self.cfg = cfg
        self.store = store
        level = cfg.dnsbl.check_alerts_from
        self.min_rank = None if level == "off" else SEVERITIES.index(level)
        self.checker = checker
        self.stats = LookupStats()
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=cfg.dnsbl.alert_queue_max)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._busy = 0

    @property
    def enabled(self) -> bool:
        return self.min_rank is not None and bool(self.cfg.dnsbl.default_zones)

    def wants(self, alert: Any) -> bool:
        """Whether ``alert`` (an :class:`~smtpguard.detectors.alerts.Alert`) is one to look up."""
        return (self.enabled and bool(alert.src_ip) and not alert.suppressed
                and SEVERITIES.index(alert.severity) >= self.min_rank)  # type: ignore[operator]

    def submit(self, alerts: Sequence[Any]) -> int:
        """Queue the sources of the wanted ``alerts``; returns how many were queued."""
        queued = 0
        for a in alerts:
            if not self.wants(a):
                continue
            if self._thread is None:
                self._start()
            try:
                self._queue.put_nowait(_Job(a.alert_id, address_of(a.src_ip, getattr(a, "evidence", None))))
            except queue.Full:
                self.stats.skipped += 1
                if self.stats.skipped in (1, 10, 100) or self.stats.skipped % 1000 == 0:
                    log.warning("DNSBL lookup queue full (%d alerts): %d alert lookups skipped so far; the "
                                "console's re-check looks them up on demand", self._queue.maxsize, self.stats.skipped)
                continue
            with self._idle:
                self._busy += 1
            queued += 1
        self.stats.queued += queued
        return queued

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued lookup is done; False when ``timeout_s`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued (up to ``timeout_s``), then stop; what is left is counted as skipped."""
        if self._thread is None:
            return
        self.drain(timeout_s)
        self._stop.set()
        self._thread.join(timeout=max(1.0, timeout_s))
        left = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            left += 1
        if left:
            self.stats.skipped += left
            log.warning("%d DNSBL lookups of alerts were still queued at shutdown and were skipped", left)
        with self._idle:
            self._busy = 0
            self._idle.notify_all()
        self._thread = None

    # -- worker -------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.checker is None:
            self.checker = Checker(self.cfg.dnsbl)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dnsbl-alert-lookups", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(jobs) < BATCH:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._lookup(jobs)
            except Exception as e:  # noqa: BLE001 - a lookup failure must never stop the worker
                self.stats.failed += len(jobs)
                log.error("DNSBL lookup of %d alerts failed: %s", len(jobs), e)
            finally:
                with self._idle:
                    self._busy -= len(jobs)
                    self._idle.notify_all()

    def _lookup(self, jobs: list[_Job]) -> None:
        ips = list(dict.fromkeys(j.ip for j in jobs))
        try:
            results = check_sync(ips, checker=self.checker)
        except SmtpguardError as e:  # a bad address or zone config: the same for every retry
            self.stats.failed += len(jobs)
            log.error("DNSBL lookup of %s failed: %s", ", ".join(ips), e)
            return
        by_ip: dict[str, list[Result]] = {}
        for r in results:
            by_ip.setdefault(r.ip, []).append(r)
        sums = summary(results)
        at = dt.datetime.now(dt.timezone.utc)
        for j in jobs:
            mine = by_ip.get(j.ip, [])
            store_results(self.store, mine, actor=ACTOR, alert_id=j.alert_id, at=at)
            self.stats.alerts_checked += 1
            self.stats.errors += sum(1 for r in mine if r.status == "error")
            s = sums.get(j.ip)
            if s is not None and s.listed:
                self.stats.listed += 1
                log.info("alert %s: %s is listed in %s", j.alert_id, j.ip, ", ".join(s.listed))
