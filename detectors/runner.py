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
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from smtpguard.core import metrics, ocsf, wire
from smtpguard.core.config import Config
from smtpguard.core.errors import BrokerError, StoreError
from smtpguard.core.exemptions import Exemptions
from smtpguard.core.deadletter import Reject
from smtpguard.core.store import Store

from smtpguard.core.alert import Alert, to_json
from .features import empty_features, to_store
from . import storage
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
    offset_resets: int = 0
    commit_failures: int = 0
    """times a partition's log went back (the broker lost it); see DetectorRunner._log_went_back"""
    commits: int = 0
    restored: int = 0
    last_message_at: float = 0.0
    assigned: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the end of ``detect`` and ``serve``."""
        return (f"detector: consumed {self.records:,} records in {self.messages:,} messages; {self.windows:,} windows; "
                f"{self.alerts_raised} alerts raised, {self.alerts_suppressed} suppressed by cooldown; "
                f"{self.commits} commits")


#: a partition's close of at least this many source windows is handed to the writer at once
#: (:meth:`DetectorRunner._hand_off`); smaller ones go with the step's flows
HAND_OFF_WINDOWS = 20_000


def _rollup_table(out: Output) -> pa.Table | None:
    """The closed windows' rollup rows of ``out`` as the store takes them (None when there are none)."""
    return out.rollups.to_arrow() if out.rollups is not None and out.rollups.height else None


class DetectorRunner:
    def __init__(self, cfg: Config, store: Store, exemptions: Exemptions | None = None,
                 stop: threading.Event | None = None, poll_batch: int | None = None):
        """``exemptions`` None: the exemption registry in the store is the source, read again every
        ``detect.exemptions_refresh_ms`` (revocations and grants by the response service or by people
        reach the detectors within that time); given: a fixed set (tests, CSV-only setups)."""
        from confluent_kafka import Consumer, Producer

        from smtpguard.core.kafka import consumer_settings, producer_settings
        from smtpguard.core.registry import Registry

        self.cfg = cfg
        self.store = store
        store.apply_retention(cfg.store.retention_days)  # the tables this detector fills expire as configured
        self.stop_event = stop or threading.Event()
        self.registry = Registry(store)
        self._registry_exemptions = exemptions is None
        self._exemptions_version = self.registry.version() if exemptions is None else None
        self._exemptions_checked = time.monotonic()
        self.pipeline = Pipeline(cfg, exemptions if exemptions is not None else self.registry.current(), rollups=True)
        self._verdicts_version: tuple | None = None
        self._verdicts_checked = float("-inf")
        self._refresh_verdicts()
        self.poll_batch = poll_batch or cfg.detect.poll_messages
        self.topics = cfg.kafka.topics
        self.consumer = Consumer(consumer_settings(cfg))
        self.producer = Producer(producer_settings(cfg))
        self.stats = RunnerStats()
        self._next_offset: dict[int, int] = {}
        self._committed: dict[int, int] = {}
        """the last offset this process committed per partition (kept across rebalances): offsets only
        grow, so a partition handed back that starts below it lost its log"""
        self._last_seen: dict[int, float] = {}
        self._dlq_retry: list[tuple[bytes, bytes]] = []
        self._producer_failed = False
        self._checkpoint_s = cfg.detect.checkpoint_interval_ms / 1000
        self._last_checkpoint = 0.0
        self._dirty = False
        self._open_rows = 0
        self._lag_s = cfg.metrics.lag_interval_ms / 1000
        self._last_lag = 0.0
        self._input_end: int | None = None
        self._consumed = 0
        """records consumed and processed (``stats.records`` counts them once written)"""
        self._writes: queue.Queue = queue.Queue(maxsize=2)
        self._write_error: BaseException | None = None
        self._pending_windows = 0
        self._pending_lock = threading.Lock()

    def end_of_input(self, records: int) -> None:
        """The input is finite and holds ``records`` records (``serve FILE``, the demo): once they are
        consumed, every window closes at once instead of after ``detect.idle_flush_ms`` of silence.
        Records arriving later still count; those of an already closed window are late."""
        self._input_end = records

    # -- group membership -------------------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        parts = [p.partition for p in partitions]
        self.stats.assigned = sorted(set(self.stats.assigned) | set(parts))
        try:
            states = storage.load_state(self.store, self.cfg.kafka.group_id, self.topics.flows, parts)
        except Exception as e:  # noqa: BLE001 - without state the detector still runs, it only starts blind
            log.warning("could not load detector state for partitions %s: %s", parts, e)
            states = {}
        for p, state in states.items():
            self.pipeline.restore(p, state)
            self.stats.restored += 1
        now = time.monotonic()
        for p in parts:
            # a stream per assigned partition: tenant windows wait for every partition until it is idle
            self.pipeline.stream(p)
            self._last_seen.setdefault(p, now)
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
        writer = threading.Thread(target=self._writer, name="detector-writer", daemon=True)
        writer.start()
        try:
            while not self.stop_event.is_set():
                self.step(timeout_s=0.5)
        finally:
            try:
                self._commit(list(self._next_offset))
            except Exception as e:  # noqa: BLE001
                log.warning("final commit failed: %s", e)
            self._writes.put(None)
            writer.join(60)
            self.consumer.close()
            self._flush(10)
            metrics.forget_partitions(self.topics.flows, self.stats.assigned)
        return self.stats

    def step(self, timeout_s: float = 0.5) -> None:
        self._refresh_exemptions()
        self._refresh_verdicts()
        msgs = self.consumer.consume(self.poll_batch, timeout_s)
        out = Output()
        flows: list[pa.Table] = []
        touched: set[int] = set()
        per_partition: dict[int, list[tuple[pa.Table, int]]] = {}
        seen = (self.stats.messages,)
        consumed = 0
        handed = 0
        for m in msgs:
            if m.error():
                log.warning("consumer error: %s", m.error())
                continue
            p, off = m.partition(), m.offset()
            floor = self._next_offset.get(p, self._committed.get(p, -1))
            if off < floor:
                self._log_went_back(p, floor, off)
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
            consumed += table.num_rows
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
            part = self.pipeline.process(table, key=p, offsets=offsets)
            if part.features.height >= HAND_OFF_WINDOWS:
                handed += self._hand_off(part)
            else:
                out.extend(part)
        ended = (self._input_end is not None and self._consumed + consumed >= self._input_end
                 and self._caught_up())
        out.extend(self._flush_idle(exclude=set() if ended else touched, now_idle=ended))
        self._consumed += consumed
        self._open_rows = sum(s.engine.open_rows for s in self.pipeline.streams.values())
        if flows or out.features.height or out.alerts or consumed:
            self._write(flows, out, consumed)
        if self._write_error is not None:
            self._drain()
        if msgs:
            self.stats.last_message_at = time.monotonic()
            metrics.DETECTOR_MESSAGES.inc(self.stats.messages - seen[0])
        if touched or out.features.height or handed:
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_checkpoint >= self._checkpoint_s:
            self._commit_or_wait(sorted(set(self._next_offset)))
        if time.monotonic() - self._last_lag >= self._lag_s:
            self._export_lag()

    def _commit_or_wait(self, partitions: list[int]) -> None:
        """A commit the broker refuses is not fatal: everything consumed is written, so at worst the
        next owner of a partition replays from the last commit (ids and stored positions make the
        replay harmless). Typical: the group moved on while the broker was unreachable (unknown
        member, illegal generation); the consumer rejoins by itself and the next commit covers it."""
        from confluent_kafka import KafkaException

        try:
            self._commit(partitions)
        except (KafkaException, BrokerError) as e:
            self.stats.commit_failures += 1
            self._last_checkpoint = time.monotonic()  # retry at the next interval, not at every poll
            log.warning("offset commit failed, retrying at the next checkpoint: %s", e.args[0] if e.args else e)

    def _log_went_back(self, p: int, expected: int, got: int) -> None:
        """Offsets only grow within a partition's log: a smaller one means the broker lost the log
        (a broker restarted without its data, a topic deleted and created again) and the consumer
        was reset to the start of the new one. Reported; detection goes on with the new records."""
        self.stats.offset_resets += 1
        self._committed[p] = got
        metrics.OFFSET_RESETS.labels(self.topics.flows, str(p)).inc()
        log.error("partition %d of %s went back from offset %d to %d: the broker lost the partition's log "
                  "(restarted without its data?); consuming the new log from there. Records sent while the "
                  "log was lost are gone from the broker: collectors report what they could not deliver "
                  "(smtpguard spool resend)", p, self.topics.flows, expected, got)
        stream = self.pipeline.streams.get(p)
        if stream is not None:
            stream.engine.rebase_offsets(got)

    def _export_lag(self) -> None:
        """Window lag and consumer lag (high watermark - next offset to read) of the assigned partitions.

        Window lag first: a scrape that sees the consumer lag of this refresh sees its window lag too."""
        from confluent_kafka import KafkaException, TopicPartition

        self._last_lag = time.monotonic()
        metrics.set_detector_state(self.pipeline.state_stats())
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
                tp = TopicPartition(topic, p)
                # the high watermark the last fetch brought (no broker round trip in the consume loop); a
                # partition not fetched yet asks the broker
                low, high = self.consumer.get_watermark_offsets(tp, cached=True) or (-1, -1)
                if high < 0:
                    low, high = self.consumer.get_watermark_offsets(tp, timeout=2)
                metrics.CONSUMER_LAG.labels(topic, str(p)).set(max(high - max(position.get(p, -1), low), 0))
        except KafkaException as e:
            log.debug("consumer lag not refreshed: %s", e)

    def _caught_up(self) -> bool:
        """Every assigned partition consumed up to the high watermark the last fetch reported."""
        from confluent_kafka import TopicPartition

        for p in self.stats.assigned:
            tp = TopicPartition(self.topics.flows, p)
            got = self.consumer.get_watermark_offsets(tp, cached=True)
            if not got or got[1] < 0:
                return False  # not fetched yet
            pos = self._next_offset.get(p)
            if pos is None:  # nothing consumed from it: where the consumer stands (an empty partition: at 0)
                pos = self.consumer.position([tp])[0].offset
                pos = 0 if pos < 0 and got[1] == 0 else pos
            if pos < got[1]:
                return False
        return True

    def _flush_idle(self, exclude: set[int], now_idle: bool = False) -> Output:
        """Close the windows of partitions without input for ``detect.idle_flush_ms`` (every partition
        outside ``exclude`` with ``now_idle``: the input has ended)."""
        out = Output()
        idle_s = 0.0 if now_idle else self.cfg.detect.idle_flush_ms / 1000
        now = time.monotonic()
        for p, s in list(self.pipeline.streams.items()):
            if p in exclude or now - self._last_seen.get(p, now) < idle_s:
                continue
            if s.engine.open_rows:
                out.extend(self.pipeline.flush(p))
            out.alerts.extend(self.pipeline.set_idle(p))
        return out

    # -- output -----------------------------------------------------------------------------
    def _hand_off(self, out: Output) -> int:
        """One partition's large output (a close of many sources) goes out before the step's other
        partitions are processed: its alerts published, its features queued for the writer, so a step
        never holds every partition's features at once. Returns the windows handed off."""
        if out.alerts:
            self._retrying(lambda: self._publish_alerts(out.alerts))
        n = out.features.height
        features = to_store(out.features)
        rollups = _rollup_table(out)
        out.features, out.rollups = empty_features(), None
        with self._pending_lock:
            self._pending_windows += n
        self._writes.put((None, features, rollups, 0, n))
        return n

    def _write(self, flows: list[pa.Table], out: Output, consumed: int) -> None:
        """Alerts now (small, and someone is waiting for them); the step's flows and features go to the
        writer thread, which writes them while the next poll is processed. Offsets are committed only
        once every write before the commit is done (:meth:`_drain`); ``consumed`` records are counted
        when their flows are written."""
        self._retrying(lambda: self._publish_alerts(out.alerts) if out.alerts else None)
        features = to_store(out.features) if out.features.height else None
        job = (pa.concat_tables(flows) if flows else None, features, _rollup_table(out), consumed, out.features.height)
        with self._pending_lock:
            self._pending_windows += out.features.height
        self._writes.put(job)  # blocks while a write is behind: back-pressure on the consumer

    def _retrying(self, write: Callable[[], Any]) -> None:
        """Run a store write until it succeeds (a store outage holds up the commit, not the detector's
        process); StoreError out once the runner is stopping."""
        delay = 0.5
        while True:
            try:
                write()
                return
            except StoreError as e:
                self.stats.store_errors += 1
                log.error("store write failed, offsets not committed; retrying in %.1f s: %s", delay, e)
                if self.stop_event.wait(delay):
                    raise
                delay = min(delay * 2, 30)

    def _writer(self) -> None:
        """The writer thread: flows then features of each step, in step order (chdb works outside the GIL,
        so this overlaps with the next step's processing on another core)."""
        while True:
            job = self._writes.get()
            try:
                if job is None:
                    return
                flows_table, features, rollups, consumed, windows = job
                if self._write_error is None:
                    try:
                        if flows_table is not None:
                            self._retrying(lambda: self.store.insert_flows(flows_table))
                        if features is not None:
                            self._retrying(lambda: storage.insert_features(self.store, features))
                        if rollups is not None:
                            self._retrying(lambda: self.store.insert_rollups(rollups))
                    except BaseException as e:  # noqa: BLE001 - re-raised by the consumer thread (_drain)
                        self._write_error = e
                        continue
                    # counted once written: whoever waits for the count (serve, the demo, tests) then finds
                    # the windows, features and alerts of those records in the store
                    self.stats.windows += windows
                    metrics.DETECTOR_WINDOWS.inc(windows)
                    self.stats.records += consumed
                    metrics.DETECTOR_RECORDS.inc(consumed)
                with self._pending_lock:
                    self._pending_windows -= windows
            finally:
                self._writes.task_done()

    def _drain(self) -> None:
        """Wait until every queued write is done; raise the writer's error if one failed."""
        self._writes.join()
        if self._write_error is not None:
            raise self._write_error

    def _publish_alerts(self, alerts: list[Alert]) -> None:
        """Store the alerts, then publish the raised ones the topic does not have yet.

        Order and bookkeeping make each alert appear once in the store and once on the topic,
        across retries and crashes: the store write is idempotent (alert id), and the ids the
        broker acknowledged are recorded (``alert_publications``) before the offsets that produced
        them are committed. A retry or a replay publishes only what is not recorded; an alert is
        published twice only if the detector dies between the broker's acknowledgement and that
        record (the consumers' dedupe by ``alert_id`` covers it)."""
        if not alerts:
            return
        topic = self.topics.alerts
        known = self.store.existing_alerts([a.alert_id for a in alerts])
        self.store.insert_alerts([a for a in alerts if a.alert_id not in known])
        # the stored decision stands: a replay after a restart may judge a repeat under cooldown
        # differently, but the store and the topic must agree on what was raised
        raised = [a for a in alerts if (known[a.alert_id] == "" if a.alert_id in known else not a.suppressed)]
        # every form of a raised alert, each with its own publication record: smtpguard's JSON on the
        # alerts topic and, when configured, the OCSF finding on the OCSF topic
        forms: list[tuple[str, Callable[[Alert], bytes]]] = [(topic, to_json)]
        if self.topics.ocsf:
            forms.append((self.topics.ocsf, ocsf.to_json))
        published = self.store.published_alert_ids(topic, [a.alert_id for a in raised])
        delivered: dict[str, list[str]] = {t: [] for t, _ in forms}
        errors: list[str] = []
        todo_n = 0

        def on_delivery(t: str, alert_id: str) -> Callable[[Any, Any], None]:
            def report(err: Any, _msg: Any) -> None:
                if err is None:
                    delivered[t].append(alert_id)
                else:
                    errors.append(str(err))
                    if err.fatal():
                        self._producer_failed = True
            return report

        for t, encode in forms:
            done = published if t == topic else self.store.published_alert_ids(t, [a.alert_id for a in raised])
            todo = [a for a in raised if a.alert_id not in done]
            todo_n += len(todo)
            for a in todo:
                key = (a.src_ip or f"tenant:{a.tenant}").encode()
                self._produce(t, encode(a), key, on_delivery(t, a.alert_id))
        unsent = self._flush(30)
        if unsent:
            # An idempotent producer whose broker came back without its data retries for ever
            # (message.timeout.ms) without a fatal error: drop its queue and start afresh; what is
            # not recorded as published is sent again by the retry.
            self._replace_producer()
        for t, ids in delivered.items():
            self.store.mark_published(t, ids)  # even when some failed: those are not sent again
        if self._producer_failed:
            self._new_producer()
        if unsent or errors:
            raise StoreError(f"{unsent + len(errors)} of {todo_n} alert messages were not delivered to "
                             f"{', '.join(t for t, _ in forms)}" + (f": {errors[0]}" if errors else " within 30 s"))
        counted: Counter[tuple[str, str]] = Counter()
        raised_ids = {a.alert_id for a in raised}
        for a in alerts:
            if a.alert_id not in raised_ids:
                self.stats.alerts_suppressed += 1
                if a.alert_id not in known:
                    counted[a.severity, "suppressed"] += 1
            elif a.alert_id in published:
                self.stats.alerts_republished_skipped += 1
            else:
                self.stats.alerts_raised += 1
                counted[a.severity, "raised"] += 1
        for (severity, outcome), n in counted.items():
            metrics.ALERTS.labels(severity, outcome).inc(n)

    def _produce(self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        from confluent_kafka import KafkaException

        try:
            self.producer.produce(topic, value, key=key, on_delivery=on_delivery)
        except KafkaException as e:
            if not (e.args and e.args[0].fatal()):
                raise
            self._new_producer()
            self.producer.produce(topic, value, key=key, on_delivery=on_delivery)
        except BufferError:
            self.producer.poll(1)
            self.producer.produce(topic, value, key=key, on_delivery=on_delivery)

    def _flush(self, timeout_s: float) -> int:
        """Messages still undelivered after ``timeout_s``; a producer in a fatal state counts as
        having delivered none of them (it is replaced by the caller)."""
        from confluent_kafka import KafkaException

        try:
            return self.producer.flush(timeout_s)
        except KafkaException as e:
            log.error("producer: %s", e.args[0] if e.args else e)
            self._producer_failed = True
            return max(len(self.producer), 1)

    def _replace_producer(self) -> None:
        from confluent_kafka import KafkaException

        try:
            self.producer.purge()  # undelivered messages report an error (dead letters queue for a resend)
            self.producer.poll(0)
        except KafkaException:
            pass  # a producer in a fatal state: nothing more to get from it
        self._new_producer()

    def _new_producer(self) -> None:
        """A producer with a fatal error (e.g. its idempotence state refused by a broker that lost its
        data) takes no more messages: replace it. Its undelivered messages were reported as errors."""
        from confluent_kafka import Producer

        from smtpguard.core.kafka import producer_settings

        log.error("the producer cannot deliver (fatal error, or a broker that lost its data); starting a new one")
        self.producer = Producer(producer_settings(self.cfg))
        self._producer_failed = False

    def _refresh_exemptions(self) -> None:
        """Read the registry again when it changed (at most every ``detect.exemptions_refresh_ms``): the
        response service and people revoke, restore and grant; the detector learns of it here."""
        if not self._registry_exemptions:
            return
        now = time.monotonic()
        if now - self._exemptions_checked < self.cfg.detect.exemptions_refresh_ms / 1000:
            return
        self._exemptions_checked = now
        try:
            version = self.registry.version()
            if version != self._exemptions_version:
                self.pipeline.exemptions = self.registry.current()
                self._exemptions_version = version
                log.info("exemptions read again from the registry (%d in force)", len(self.pipeline.exemptions))
        except StoreError as e:  # the exemptions in hand stay; the next refresh tries again
            log.warning("could not read the exemption registry: %s", e)

    def _refresh_verdicts(self) -> None:
        """Read the team's verdicts again when they changed (checked at most every
        ``detect.exemptions_refresh_ms``): repeats of alerts dismissed since are held (detectors/repeats.py)."""
        from smtpguard.models.verdicts import history_version

        if self.pipeline.repeats is None:
            return
        now = time.monotonic()
        if now - self._verdicts_checked < self.cfg.detect.exemptions_refresh_ms / 1000:
            return
        self._verdicts_checked = now
        try:
            version = history_version(self.store)
            if version != self._verdicts_version:
                self.pipeline.repeats.refresh(self.store)
                self._verdicts_version = version
        except StoreError as e:  # the verdicts in hand stay; the next refresh tries again
            log.warning("could not read the team's verdicts: %s", e)

    def _dead_letter(self, r: Reject) -> None:
        metrics.DEAD_LETTERS.labels(r.format).inc()
        self._send_dead_letter(wire.encode_json(r), r.source.encode())

    def _send_dead_letter(self, value: bytes, key: bytes) -> None:
        def report(err: Any, _msg: Any) -> None:
            if err is not None:  # sent again before the next commit; the commit waits for it
                self._dlq_retry.append((value, key))
                if err.fatal():
                    self._producer_failed = True

        self._produce(self.topics.dlq, value, key, report)

    def _settle_dead_letters(self) -> None:
        """Every dead letter of the consumed messages is on the DLQ topic before their offsets are
        committed; BrokerError (and no commit) when some still are not."""
        if self._flush(30):
            self._replace_producer()
        for _attempt in range(2):
            if not self._dlq_retry:
                return
            if self._producer_failed:
                self._new_producer()
            again, self._dlq_retry = self._dlq_retry, []
            for value, key in again:
                self._send_dead_letter(value, key)
            if self._flush(30):
                self._replace_producer()
        if self._dlq_retry:
            raise BrokerError(f"{len(self._dlq_retry)} dead letters are not delivered to {self.topics.dlq} yet")

    def _commit(self, partitions: list[int]) -> None:
        from confluent_kafka import TopicPartition

        self._drain()  # offsets only for what is written
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
            self._settle_dead_letters()
            # state first: offsets never run ahead of the checkpoint that covers them
            storage.save_state(self.store, self.cfg.kafka.group_id, self.topics.flows, states)
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self._committed.update((tp.partition, tp.offset) for tp in offsets)
            self.stats.commits += 1
            metrics.DETECTOR_COMMITS.inc()
        self._last_checkpoint = time.monotonic()
        self._dirty = False

    @property
    def open_rows(self) -> int:
        """Records in open windows as of the end of the last step, plus the windows closed but not yet
        written: a window counts as open until its features and alerts are in the store."""
        return self._open_rows + self._pending_windows
