"""The detector consumer: ``smtp.flows`` -> windows -> features and alerts -> store and ``smtp.alerts``.

Commit after write: for each partition, the committed offset is the first offset still
needed by an open window (or the next unread offset when none is open), and it is committed
only after the flows, window features and alerts that the consumed messages produced are in
the store and the alerts are acknowledged by the broker. A crashed or rebalanced detector
replays from there; alert ids are deterministic, so a replay raises no alert twice on the
topic (ids already in the store are not published again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from smtpguard import metrics, wire
from smtpguard.config import Config
from smtpguard.errors import SmtpguardError, StoreError
from smtpguard.exemptions import Exemptions
from smtpguard.ingest.base import Reject
from smtpguard.store import Store

from .alerts import Alert, to_json
from .features import to_store
from .pipeline import Output, Pipeline

log = logging.getLogger(__name__)


@dataclass
class RunnerStats:
    messages: int = 0
    records: int = 0
    bad_messages: int = 0
    """messages dead-lettered whole or in part"""
    bad_records: int = 0
    """records of otherwise readable messages dead-lettered (wire.check_records)"""
    windows: int = 0
    alerts_raised: int = 0
    alerts_suppressed: int = 0
    alerts_republished_skipped: int = 0
    store_errors: int = 0
    commits: int = 0
    restored: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    last_message_at: float = 0.0
    assigned: list[int] = field(default_factory=list)


class DetectorRunner:
    def __init__(self, cfg: Config, store: Store, exemptions: Exemptions | None = None,
                 stop: threading.Event | None = None, poll_batch: int = 500, respond: bool = True,
                 lookups: bool = True):
        """``exemptions`` None: the exemption registry in the store is the source (and revocations
        by the response policy take effect at once); given: a fixed set (tests, CSV-only setups).
        ``lookups``: look the sources of new alerts up in DNSBLs (``dnsbl.check_alerts_from``)."""
        from confluent_kafka import Consumer, Producer

        from smtpguard.kafka import consumer_settings, producer_settings
        from smtpguard.response.enforce import Outputs
        from smtpguard.response.lookups import AlertLookups
        from smtpguard.response.policy import Executor
        from smtpguard.response.registry import Registry

        self.cfg = cfg
        self.store = store
        self.stop_event = stop or threading.Event()
        self.registry = Registry(store)
        self._registry_exemptions = exemptions is None
        self.pipeline = Pipeline(cfg, exemptions if exemptions is not None else self.registry.current())
        self.executor = Executor(self.registry, cfg.response, Outputs(cfg, cfg.response, store, self.stop_event)) \
            if respond else None
        self.lookups = AlertLookups(cfg, store) if lookups else None
        self.poll_batch = poll_batch
        self.topics = cfg.kafka.topics
        self.consumer = Consumer(consumer_settings(cfg))
        self.producer = Producer(producer_settings(cfg))
        self.stats = RunnerStats()
        self._next_offset: dict[int, int] = {}
        self._last_seen: dict[int, float] = {}
        self._delivery_errors: list[str] = []
        self._checkpoint_s = cfg.detect.checkpoint_interval_ms / 1000
        self._last_checkpoint = 0.0
        self._dirty = False
        self._lag_s = cfg.metrics.lag_interval_ms / 1000
        self._last_lag = 0.0

    # -- group membership -------------------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        parts = [p.partition for p in partitions]
        self.stats.assigned = sorted(set(self.stats.assigned) | set(parts))
        try:
            states = self.store.load_state(self.cfg.kafka.group_id, self.topics.flows, parts)
        except Exception as e:  # noqa: BLE001 - without state the detector still runs, it only starts blind
            log.warning("could not load detector state for partitions %s: %s", parts, e)
            states = {}
        for p, state in states.items():
            self.pipeline.restore(p, state)
            self.stats.restored += 1
        log.info("assigned partitions %s (state restored for %s)", parts, sorted(states))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        try:
            self._commit([p.partition for p in partitions])
        except Exception as e:  # noqa: BLE001 - a failed commit only means a longer replay for the next owner
            log.warning("commit on revoke failed: %s", e)
        for p in partitions:
            self.pipeline.drop(p.partition)
            self._next_offset.pop(p.partition, None)
            self._last_seen.pop(p.partition, None)
        self.stats.assigned = sorted(set(self.stats.assigned) - {p.partition for p in partitions})
        metrics.forget_partitions(self.topics.flows, [p.partition for p in partitions])
        log.info("revoked partitions %s", [p.partition for p in partitions])

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> RunnerStats:
        self.consumer.subscribe([self.topics.flows], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self.stop_event.is_set():
                self.step(timeout_s=0.5)
        finally:
            try:
                self._commit(list(self._next_offset))
            except Exception as e:  # noqa: BLE001
                log.warning("final commit failed: %s", e)
            self.consumer.close()
            self.producer.flush(10)
            if self.lookups is not None:
                self.lookups.close(timeout_s=10)
            metrics.forget_partitions(self.topics.flows, self.stats.assigned)
        return self.stats

    def step(self, timeout_s: float = 0.5) -> None:
        msgs = self.consumer.consume(self.poll_batch, timeout_s)
        out = Output()
        flows: list[pa.Table] = []
        touched: set[int] = set()
        per_partition: dict[int, list[tuple[pa.Table, int]]] = {}
        seen = (self.stats.messages, self.stats.records)
        for m in msgs:
            if m.error():
                log.warning("consumer error: %s", m.error())
                continue
            p, off = m.partition(), m.offset()
            self.stats.messages += 1
            touched.add(p)
            self._next_offset[p] = off + 1
            self._last_seen[p] = time.monotonic()
            try:
                ts_type, ts_ms = m.timestamp()
                table, bad = wire.decode(m.value(), m.headers(), produced_ms=ts_ms if ts_type else None)
            except wire.WireError as e:
                self.stats.bad_messages += 1
                self._dead_letter(Reject.make(f"{m.topic()}[{p}]", off, str(e), m.value() or b"", "kafka"))
                continue
            if bad:
                self.stats.bad_messages += 1
                self.stats.bad_records += len(bad)
                for b in bad:
                    self._dead_letter(Reject.make(f"{m.topic()}[{p}]", f"{off} record {b.index}", b.reason, b.raw,
                                                  "kafka"))
                if table.num_rows == 0:
                    continue
            self.stats.records += table.num_rows
            n = table.num_rows
            flows.append(table.append_column("kafka_partition", pa.array(np.full(n, p, np.uint32)))
                         .append_column("kafka_offset", pa.array(np.full(n, off, np.int64)))
                         .append_column("kafka_row", pa.array(np.arange(n, dtype=np.uint32))))
            per_partition.setdefault(p, []).append((table, off))
        # one pass through the pipeline per partition and poll: closing windows has a fixed cost
        for p, parts in per_partition.items():
            table = pa.concat_tables([t for t, _ in parts])
            offsets = pa.array(np.repeat(np.array([off for _, off in parts], np.int64),
                                         [t.num_rows for t, _ in parts]))
            out.extend(self.pipeline.process(table, key=p, offsets=offsets))
        if msgs:
            self.stats.last_message_at = time.monotonic()
            metrics.DETECTOR_MESSAGES.inc(self.stats.messages - seen[0])
            metrics.DETECTOR_RECORDS.inc(self.stats.records - seen[1])
        out.extend(self._flush_idle(exclude=touched))
        if flows or out.features.height or out.alerts:
            self._write(flows, out)
        if touched or out.features.height:
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_checkpoint >= self._checkpoint_s:
            self._commit(sorted(set(self._next_offset)))
        if time.monotonic() - self._last_lag >= self._lag_s:
            self._export_lag()

    def _export_lag(self) -> None:
        """Window lag and consumer lag (high watermark - next offset to read) of the assigned partitions.

        Window lag first: a scrape that sees the consumer lag of this refresh sees its window lag too."""
        from confluent_kafka import KafkaException, TopicPartition

        self._last_lag = time.monotonic()
        topic, parts = self.topics.flows, list(self.stats.assigned)
        wall_ms = time.time() * 1000
        for p in parts:
            stream = self.pipeline.streams.get(p)
            watermark = stream.engine.watermark_ms() if stream is not None else None
            if watermark is not None:
                metrics.WINDOW_LAG.labels(topic, str(p)).set((wall_ms - watermark) / 1000)
        try:
            position = {p: self._next_offset[p] for p in parts if p in self._next_offset}
            unread = [TopicPartition(topic, p) for p in parts if p not in position]
            if unread:  # nothing consumed since the assignment: the group's committed offset
                position.update((tp.partition, tp.offset) for tp in self.consumer.committed(unread, timeout=2))
            for p in parts:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=2)
                metrics.CONSUMER_LAG.labels(topic, str(p)).set(max(high - max(position.get(p, -1), low), 0))
        except KafkaException as e:
            log.debug("consumer lag not refreshed: %s", e)

    def _flush_idle(self, exclude: set[int]) -> Output:
        out = Output()
        idle_s = self.cfg.detect.idle_flush_ms / 1000
        now = time.monotonic()
        for p, s in list(self.pipeline.streams.items()):
            if p in exclude or s.engine.open_rows == 0:
                continue
            if now - self._last_seen.get(p, now) >= idle_s:
                out.extend(self.pipeline.flush(p))
        return out

    # -- output -----------------------------------------------------------------------------
    def _write(self, flows: list[pa.Table], out: Output) -> None:
        delay = 0.5
        while True:
            try:
                if flows:
                    self.store.insert_flows(pa.concat_tables(flows))
                if out.features.height:
                    self.store.insert_features(to_store(out.features))
                self._publish_alerts(out.alerts)
                break
            except StoreError as e:
                self.stats.store_errors += 1
                log.error("store write failed, offsets not committed; retrying in %.1f s: %s", delay, e)
                if self.stop_event.wait(delay):
                    raise
                delay = min(delay * 2, 30)
        self.stats.windows += out.features.height
        metrics.DETECTOR_WINDOWS.inc(out.features.height)

    def _publish_alerts(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        known = self.store.existing_alert_ids([a.alert_id for a in alerts])
        self.store.insert_alerts([a for a in alerts if a.alert_id not in known])
        counted: Counter[tuple[str, str]] = Counter()
        for a in alerts:
            if a.suppressed:
                self.stats.alerts_suppressed += 1
                if a.alert_id not in known:
                    counted[a.severity, "suppressed"] += 1
                continue
            if a.alert_id in known:
                self.stats.alerts_republished_skipped += 1
                continue
            self.stats.alerts_raised += 1
            counted[a.severity, "raised"] += 1
            key = (a.src_ip or f"tenant:{a.tenant}").encode()
            self.producer.produce(self.topics.alerts, to_json(a), key=key, on_delivery=self._on_delivery)
        for (severity, outcome), n in counted.items():
            metrics.ALERTS.labels(severity, outcome).inc(n)
        if self.producer.flush(30):
            raise StoreError("alerts could not be delivered to the alerts topic within 30 s")
        if self._delivery_errors:
            errs, self._delivery_errors = self._delivery_errors, []
            raise StoreError(f"alerts topic delivery failed: {errs[0]}")
        new = [a for a in alerts if not a.suppressed and a.alert_id not in known]
        self._respond(new)
        if self.lookups is not None:
            self.lookups.submit(new)

    def _respond(self, alerts: list[Alert]) -> None:
        """The revocation policy on new alerts; a revocation changes the exemptions at once."""
        if self.executor is None or not alerts:
            return
        revoked = False
        for a in alerts:
            if self.cfg.response.action_for(a.detector, a.severity) == "notify":
                # nothing to decide: the alert itself is the notification (and the registry lookups cost ~25 ms)
                self.stats.decisions["notify"] = self.stats.decisions.get("notify", 0) + 1
                continue
            try:
                outcome = self.executor.handle(a)
            except SmtpguardError as e:  # the registry is right; `enforce publish` resends the state
                log.error("response to alert %s failed: %s", a.alert_id, e)
                continue
            action = outcome.decision.action
            self.stats.decisions[action] = self.stats.decisions.get(action, 0) + 1
            revoked |= action == "revoke"
        if revoked and self._registry_exemptions:
            self.pipeline.exemptions = self.registry.current()

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))

    def _dead_letter(self, r: Reject) -> None:
        self.producer.produce(self.topics.dlq, wire.encode_json(r), key=r.source.encode())
        metrics.DEAD_LETTERS.labels(r.format).inc()

    def _commit(self, partitions: list[int]) -> None:
        from confluent_kafka import TopicPartition

        offsets = []
        states = {}
        for p in partitions:
            if p not in self._next_offset:
                continue
            stream = self.pipeline.streams.get(p)
            safe = stream.engine.safe_offset() if stream else None
            offsets.append(TopicPartition(self.topics.flows, p, safe if safe is not None else self._next_offset[p]))
            state = self.pipeline.checkpoint(p)
            if state is not None:
                states[p] = state
        if offsets:
            # state first: offsets never run ahead of the checkpoint that covers them
            self.store.save_state(self.cfg.kafka.group_id, self.topics.flows, states)
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self.stats.commits += 1
            metrics.DETECTOR_COMMITS.inc()
        self._last_checkpoint = time.monotonic()
        self._dirty = False

    @property
    def open_rows(self) -> int:
        return sum(s.engine.open_rows for s in self.pipeline.streams.values())
