"""The collector shell: inputs -> parser -> Kafka (``smtp.flows`` and ``smtp.flows.dlq``).

Records travel in Arrow IPC batches grouped by partition (see :mod:`smtpguard.core.wire`);
rejects travel one per message as JSON with their reason. The producer is idempotent;
every delivery error is counted and reported, and the run fails (exit 1) if any message
could not be delivered.

Nothing is lost when the broker is away: librdkafka buffers up to
``queue.buffering.max.kbytes`` (512 MB) and retries each message until
``message.timeout.ms`` (5 minutes by default); while its queue is full the collector stops
reading input, so memory stays bounded. A message still undelivered after that is written,
whole, to the **spool** (``<data_dir>/spool/*.spool``, see :class:`Spool`) and reported;
``smtpguard spool resend`` delivers the spool once the broker is back, to the same topic and
partition, and removes each file only after every message in it was acknowledged.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import msgspec

from smtpguard.core import metrics, wire
from smtpguard.core.config import Config
from smtpguard.core.errors import BrokerError

from .base import Batch, Reject
from .reader import Progress, read_batches

log = logging.getLogger(__name__)


@dataclass
class CollectStats:
    read: int = 0
    kept: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    messages: int = 0
    delivered: int = 0
    delivery_errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    spooled: int = 0
    """undelivered messages written to the spool (``smtpguard spool resend`` delivers them)"""
    spool_path: str = ""
    elapsed_s: float = 0.0
    stopped: bool = False
    """a stop request ended the reading before the input's end"""

    def summary(self) -> str:
        rate = self.read / self.elapsed_s if self.elapsed_s else 0
        text = (f"read {self.read:,} lines, kept {self.kept:,} SMTP records, skipped {self.skipped:,}, "
                f"dead-lettered {self.dead_lettered:,}; {self.messages:,} messages, "
                f"{self.delivery_errors:,} delivery errors; {self.elapsed_s:.1f} s ({rate:,.0f} lines/s)")
        if self.stopped:
            text += "; stopped before the end of the input"
        if self.spooled:
            text += (f"\n{self.spooled:,} undelivered messages kept in the spool {self.spool_path}: "
                     "`smtpguard spool resend` delivers them when the broker is back")
        return text


class SpooledMessage(msgspec.Struct, array_like=True):
    """One Kafka message as it was produced: enough to produce it again to the same place."""

    topic: str
    partition: int
    """-1 = the producer's partitioner (messages produced with a key only)"""
    key: bytes | None
    headers: list[tuple[str, bytes]]
    value: bytes
    produced_ms: int = 0
    """when it was first produced (the Kafka message timestamp)"""


class Spool:
    """Undelivered messages on disk, so that a broker outage longer than the delivery timeout
    loses nothing.

    A spool file (``<data_dir>/spool/<UTC time>-<pid>.spool``) is a sequence of frames, each a
    4-byte big-endian length and a MessagePack array ``[topic, partition, key, headers, value]``
    (:class:`SpooledMessage`); ``value`` is the message exactly as produced (an Arrow IPC batch on
    the flows topic, a JSON dead letter on the DLQ). Frames are written and flushed one by one, so
    a crash loses at most the frame being written (a torn last frame is reported and skipped on
    resend).
    """

    SUFFIX = ".spool"

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.path: Path | None = None
        self._fh: Any = None
        self._enc = msgspec.msgpack.Encoder()

    def add(self, m: SpooledMessage) -> None:
        if self._fh is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.path = self.directory / f"{stamp}-{os.getpid()}-{time.monotonic_ns() % 10**9:09d}{self.SUFFIX}"
            self._fh = open(self.path, "ab")
        frame = self._enc.encode(m)
        self._fh.write(struct.pack(">I", len(frame)) + frame)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{self.SUFFIX}")) if self.directory.is_dir() else []

    @staticmethod
    def read(path: Path) -> Iterator[SpooledMessage]:
        dec = msgspec.msgpack.Decoder(SpooledMessage)
        data = path.read_bytes()
        pos = 0
        while pos + 4 <= len(data):
            (n,) = struct.unpack_from(">I", data, pos)
            if pos + 4 + n > len(data):
                log.warning("%s: the last frame is torn (%d of %d bytes); it is skipped", path, len(data) - pos - 4, n)
                return
            yield dec.decode(data[pos + 4:pos + 4 + n])
            pos += 4 + n


class Collector:
    def __init__(self, cfg: Config, producer: Any | None = None):
        from confluent_kafka import Producer

        from smtpguard.core.kafka import partitions_of, producer_settings

        self.cfg = cfg
        self.topics = cfg.kafka.topics
        self.producer = producer or Producer(producer_settings(cfg))
        self.partitions = partitions_of(cfg, self.topics.flows)
        from smtpguard.core.inventory import Inventory, SourceKeys

        # the partition of a record is its source key's: the detectors' keys (IPv6 prefixes) stay whole
        inventory = Inventory.from_csv(cfg.detect.inventory_csv) if cfg.detect.inventory_csv else None
        self.keys = SourceKeys(inventory, cfg.detect.ipv6_prefix_len)
        self.stats = CollectStats()
        self.spool = Spool(Path(cfg.data_dir) / "spool")

    def _on_delivery(self, err: Any, msg: Any, headers: list[tuple[str, bytes]] | None = None,
                     produced_ms: int = 0) -> None:
        # the delivery report of a failed message carries no headers: they come from _produce
        if err is not None:
            self.stats.delivery_errors += 1
            metrics.COLLECTOR_DELIVERY_ERRORS.labels(msg.topic()).inc()
            if len(self.stats.first_errors) < 5:
                self.stats.first_errors.append(f"{msg.topic()}: {err}")
            try:
                self.spool.add(SpooledMessage(msg.topic(), msg.partition(), msg.key(), list(headers or []),
                                              msg.value(), produced_ms))
                self.stats.spooled += 1
                metrics.COLLECTOR_SPOOLED.labels(msg.topic()).inc()
                self.stats.spool_path = str(self.spool.path)
            except OSError as e:  # the count above still reports the message as undelivered
                log.error("could not write an undelivered message to the spool %s: %s", self.spool.directory, e)
        else:
            self.stats.delivered += 1

    def _produce(self, topic: str, value: bytes, **kw: Any) -> None:
        headers, now_ms = kw.get("headers"), int(time.time() * 1000)

        def on_delivery(err: Any, msg: Any) -> None:
            self._on_delivery(err, msg, headers, now_ms)

        while True:
            try:
                self.producer.produce(topic, value, on_delivery=on_delivery, **kw)
                self.stats.messages += 1
                self.producer.poll(0)
                return
            except BufferError:  # local queue full: let librdkafka drain it
                self.producer.poll(0.1)

    def send(self, batch: Batch) -> None:
        s = self.stats
        s.read += batch.read
        s.kept += batch.records.num_rows
        s.skipped += batch.skipped
        for p, payload, _n in wire.encode_batches(batch.records, self.partitions, self.cfg.kafka.records_per_message,
                                                  self.keys.key_of):
            self._produce(self.topics.flows, payload, partition=p, headers=[*wire.HEADERS, wire.message_id_header()])
        for r in batch.rejects:
            self.send_reject(r)
        self._count(batch)

    def _count(self, batch: Batch) -> None:
        """The batch in the metrics: one call per counter and label, not per record."""
        from .netflow import TEMPLATE_MISS

        metrics.COLLECTOR_INPUT.inc(batch.read)
        metrics.COLLECTOR_KEPT.inc(batch.records.num_rows)
        metrics.COLLECTOR_SKIPPED.inc(batch.skipped)
        if batch.rejects:
            formats = Counter(r.format or "unknown" for r in batch.rejects)
            misses = Counter(r.format for r in batch.rejects if r.reason.startswith(TEMPLATE_MISS))
            for fmt, n in formats.items():
                metrics.DEAD_LETTERS.labels(fmt).inc(n)
            for fmt, n in misses.items():
                metrics.TEMPLATE_MISSES.labels(fmt).inc(n)
        metrics.COLLECTOR_QUEUE.set(len(self.producer))

    def send_reject(self, r: Reject) -> None:
        self.stats.dead_lettered += 1
        self._produce(self.topics.dlq, wire.encode_json(r), key=r.source.encode(), headers=[wire.message_id_header()])

    def run(self, paths: Sequence[str], fmt: str, progress: Progress | None = None,
            stop: threading.Event | None = None) -> CollectStats:
        """Read ``paths`` and produce their records; a set ``stop`` ends the reading after the batch in
        hand (what was read is delivered; ``stats.stopped`` says the input was not read to its end)."""
        t0 = time.perf_counter()
        for _src, batch in read_batches(paths, fmt, self.cfg.ingest.smtp_ports, self.cfg.ingest.chunk_lines, progress):
            self.send(batch)
            if stop is not None and stop.is_set():
                self.stats.stopped = True
                break
        self.flush()
        self.stats.elapsed_s = time.perf_counter() - t0
        return self.stats

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for every message to be delivered or to fail (failures go to the spool). By default
        the wait is the delivery timeout and a little more, so every message gets its verdict."""
        if timeout_s is None:
            timeout_s = int(self.cfg.kafka.client.get("message.timeout.ms", 300_000)) / 1000 + 30
        remaining = self.producer.flush(timeout_s)
        self.spool.close()
        metrics.COLLECTOR_QUEUE.set(remaining)
        if remaining:
            self.stats.delivery_errors += remaining
            raise BrokerError(f"{remaining} messages could not be delivered to {self.cfg.kafka.bootstrap_servers} "
                              f"within {timeout_s:.0f} s")


def resend_spool(cfg: Config, producer: Any | None = None) -> CollectStats:
    """Produce every spooled message again, to its topic and partition, unless the topic holds
    it already (a message that timed out may still have been written: its id header tells);
    a spool file is removed once all its messages are settled. Messages that fail again go to
    a new spool file. ``stats.skipped`` counts the messages found already on the topic."""
    col = Collector(cfg, producer)
    s = col.stats
    t0 = time.perf_counter()
    for path in col.spool.files():
        frames = list(Spool.read(path))
        present = _ids_on_topics(cfg, frames)
        for m in frames:
            if wire.message_id(m.headers) in present:
                s.skipped += 1
                continue
            kw: dict[str, Any] = {"key": m.key, "headers": m.headers}
            if m.partition >= 0:
                kw["partition"] = m.partition
            col._produce(m.topic, m.value, **kw)
        before = s.delivery_errors
        col.producer.flush(int(cfg.kafka.client.get("message.timeout.ms", 300_000)) / 1000 + 30)
        if len(col.producer) == 0:
            path.unlink()  # delivered, or failed again and written to the new spool file
            log.info("spool %s resent: %d messages, %d already on the topic, %d failed again",
                     path, len(frames), len(present), s.delivery_errors - before)
    col.spool.close()
    s.elapsed_s = time.perf_counter() - t0
    return s


def _ids_on_topics(cfg: Config, frames: list[SpooledMessage], timeout_s: float = 30.0) -> set[bytes]:
    """The ids of ``frames`` that their partitions already hold: each partition is read from
    shortly before the first frame's produce time (or its start) to its end, headers only."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    from smtpguard.core.kafka import consumer_settings, read_partitions

    wanted: dict[tuple[str, int], set[bytes]] = {}
    since: dict[tuple[str, int], int] = {}
    for m in frames:
        mid = wire.message_id(m.headers)
        if mid is None or m.partition < 0:
            continue
        tp = (m.topic, m.partition)
        wanted.setdefault(tp, set()).add(mid)
        since[tp] = min(since.get(tp, m.produced_ms), m.produced_ms)
    if not wanted:
        return set()
    import uuid

    consumer = Consumer(consumer_settings(cfg, group_id=f"smtpguard-spool-check-{uuid.uuid4().hex[:8]}"))
    found: set[bytes] = set()
    try:
        try:
            starts = consumer.offsets_for_times(
                [TopicPartition(t, p, max(since[t, p] - 60_000, 0)) for t, p in wanted], timeout=timeout_s)
        except KafkaException as e:  # a broker without time lookups: read the partitions whole
            log.info("offsets by time unavailable (%s): reading the partitions from their start", e)
            starts = [TopicPartition(t, p, OFFSET_BEGINNING) for t, p in wanted]
        starts = [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                  for tp in starts]  # no message at or after the time: read the partition whole

        def handle(msg: Any) -> None:
            mid = wire.message_id(msg.headers())
            if mid is not None and mid in wanted.get((msg.topic(), msg.partition()), ()):
                found.add(mid)

        read_partitions(consumer, starts, handle, timeout_s=timeout_s, what="the topics to check the spool against")
    finally:
        consumer.close()
    return found
