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

from smtpguard.config import Config
from smtpguard.errors import SmtpguardError
from smtpguard.kafka import LocalBroker, ensure_topics
from smtpguard.store import Store

log = logging.getLogger(__name__)


class LocalStack:
    """Broker (local Tansu if ``kafka.bootstrap_servers`` is empty), topics, store and a detector thread."""

    def __init__(self, cfg: Config, exemptions_csv: str | None = None):
        """``exemptions_csv`` (or ``detect.exemptions_csv``) is imported into the exemption registry,
        which the detector then reads."""
        self.cfg = cfg
        self.exemptions_csv = exemptions_csv or cfg.detect.exemptions_csv or None
        self.broker: LocalBroker | None = None
        self.store: Store | None = None
        self.runner = None
        self.thread: threading.Thread | None = None
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

            import_exemptions(self.store, self.exemptions_csv, self.cfg)
            self.runner = DetectorRunner(self.cfg, self.store, None, stop=self.stop_event)
            self.thread = threading.Thread(target=self._run_detector, name="detector", daemon=True)
            self.thread.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _run_detector(self) -> None:
        try:
            self.runner.run()
        except BaseException as e:  # noqa: BLE001 - reported by wait_idle / __exit__
            log.exception("detector stopped")
            self.error = e
            self.stop_event.set()

    def wait_idle(self, expected_records: int, timeout_s: float = 300.0) -> bool:
        """Wait until the detector has consumed ``expected_records`` and closed every window."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None:
                raise SmtpguardError(f"the detector stopped: {self.error}")
            st = self.runner.stats
            if st.records >= expected_records and self.runner.open_rows == 0:
                return True
            time.sleep(0.2)
        return False

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(30)
        if self.store is not None:
            self.store.close()
        if self.broker is not None:
            self.broker.stop()


def import_exemptions(store: Store, csv_path: str | None, cfg: Config | None = None) -> None:
    """Grant the rows of an exemptions CSV the registry has not seen (idempotent), and, given
    ``cfg``, publish the new grants to the enforcement outputs as ``smtpguard exemptions import`` does."""
    if not csv_path:
        return
    from smtpguard.response.registry import Registry

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
