"""Everything on one machine: local broker (when none is configured), store, detector, collectors.

At scale each box runs as its own process (``collect``, ``detect``); :class:`LocalStack`
runs them together in one process for ``serve`` and ``demo``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Sequence

import msgspec

from smtpguard.core.config import Config
from smtpguard.core.errors import SmtpguardError
from smtpguard.core.kafka import LocalBroker, ensure_topics
from smtpguard.core.store import Store

log = logging.getLogger(__name__)


class LocalStack:
    """Broker (local Tansu if ``kafka.bootstrap_servers`` is empty), topics, store, a detector thread and a
    response service thread (its own consumer group on the alerts topic)."""

    def __init__(self, cfg: Config, exemptions_csv: str | None = None):
        """``exemptions_csv`` (or ``detect.exemptions_csv``) is imported into the exemption registry,
        which the detector then reads."""
        self.cfg = cfg
        self.exemptions_csv = exemptions_csv or cfg.detect.exemptions_csv or None
        self.broker: LocalBroker | None = None
        self.store: Store | None = None
        self.runner = None
        self.responder = None
        self.thread: threading.Thread | None = None
        self.response_thread: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def __enter__(self) -> "LocalStack":
        try:
            if not self.cfg.kafka.bootstrap_servers:
                Path(self.cfg.data_dir).mkdir(parents=True, exist_ok=True)
                self.broker = LocalBroker(log_path=Path(self.cfg.data_dir) / "tansu.log").start()
                self.cfg = msgspec.structs.replace(
                    self.cfg, kafka=msgspec.structs.replace(self.cfg.kafka, bootstrap_servers=self.broker.bootstrap))
            ensure_topics(self.cfg)
            self.store = Store(self.cfg.store_dsn, self.cfg.store.database)
            from smtpguard.detectors.runner import DetectorRunner

            from smtpguard.response.service import Responder

            import_exemptions(self.store, self.exemptions_csv, self.cfg)
            self.runner = DetectorRunner(self.cfg, self.store, None, stop=self.stop_event)
            self.responder = Responder(self.cfg, self.store, self.stop_event)
            self.thread = threading.Thread(target=self._run, args=(self.runner,), name="detector", daemon=True)
            self.response_thread = threading.Thread(target=self._run, args=(self.responder,), name="response",
                                                    daemon=True)
            self.thread.start()
            self.response_thread.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _run(self, service) -> None:
        try:
            service.run()
        except BaseException as e:  # noqa: BLE001 - reported by wait_idle / __exit__
            log.exception("%s stopped", type(service).__name__)
            self.error = e
            self.stop_event.set()

    def end_of_input(self, records: int) -> None:
        """The collectors are done and produced ``records`` records: the detector closes every window as
        soon as it has consumed them (:meth:`DetectorRunner.end_of_input`)."""
        self.runner.end_of_input(records)

    def wait_idle(self, expected_records: int, timeout_s: float = 300.0) -> bool:
        """Wait until the detector has consumed ``expected_records`` and closed every window, and the
        response service has acted on every alert it raised (decisions, owed events, DNSBL answers)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None:
                raise SmtpguardError(f"the detector or the response stopped: {self.error}")
            st = self.runner.stats
            if st.records >= expected_records and self.runner.open_rows == 0:
                break
            time.sleep(0.2)
        else:
            return False
        # every raised alert reaches the response service through the alerts topic
        while time.monotonic() < deadline:
            if self.error is not None:
                raise SmtpguardError(f"the response stopped: {self.error}")
            if self.responder.stats.alerts + self.responder.stats.decisions.get("suppressed", 0) >= \
                    self.runner.stats.alerts_raised:
                return self.responder.wait_idle(max(0.1, deadline - time.monotonic()))
            time.sleep(0.2)
        return False

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in (self.thread, self.response_thread):
            if t is not None:
                t.join(30)
        if self.store is not None:
            self.store.close()
        if self.broker is not None:
            self.broker.stop()


def import_exemptions(store: Store, csv_path: str | None, cfg: Config | None = None) -> None:
    """Grant the rows of an exemptions CSV the registry has not seen (idempotent), and, given
    ``cfg``, publish the new grants to the enforcement outputs as ``smtpguard exemptions import`` does."""
    if not csv_path:
        return
    from smtpguard.core.registry import Registry

    registry = Registry(store)
    res = registry.import_csv(csv_path, actor="import")
    log.info("exemptions from %s: %s", csv_path, res)
    if cfg is not None and res.events:
        from smtpguard.response.enforce import Outputs, messages_for

        states = registry.states()
        report = Outputs(cfg, cfg.response, store).publish([m for e in res.events for m in messages_for(e, states)])
        log.info("published %d imported exemptions: %s", len(res.events), report)


def collect_into(cfg: Config, paths: Sequence[str], fmt: str, progress=None, stop=None):
    from smtpguard.ingest.collector import Collector

    return Collector(cfg).run(paths, fmt, progress, stop=stop)
