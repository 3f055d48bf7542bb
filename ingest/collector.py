"""The collector shell: inputs -> parser -> Kafka (``smtp.flows`` and ``smtp.flows.dlq``).

Records travel in Arrow IPC batches grouped by partition (see :mod:`smtpguard.wire`);
rejects travel one per message as JSON with their reason. The producer is idempotent;
every delivery error is counted and reported, and the run fails (exit 1) if any message
could not be delivered.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from smtpguard import metrics, wire
from smtpguard.config import Config
from smtpguard.errors import BrokerError

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
    elapsed_s: float = 0.0

    def summary(self) -> str:
        rate = self.read / self.elapsed_s if self.elapsed_s else 0
        return (f"read {self.read:,} lines, kept {self.kept:,} SMTP records, skipped {self.skipped:,}, "
                f"dead-lettered {self.dead_lettered:,}; {self.messages:,} messages, "
                f"{self.delivery_errors:,} delivery errors; {self.elapsed_s:.1f} s ({rate:,.0f} lines/s)")


class Collector:
    def __init__(self, cfg: Config, producer: Any | None = None):
        from confluent_kafka import Producer

        from smtpguard.kafka import partitions_of, producer_settings

        self.cfg = cfg
        self.topics = cfg.kafka.topics
        self.producer = producer or Producer(producer_settings(cfg))
        self.partitions = partitions_of(cfg, self.topics.flows)
        self.stats = CollectStats()

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.stats.delivery_errors += 1
            metrics.COLLECTOR_DELIVERY_ERRORS.labels(msg.topic()).inc()
            if len(self.stats.first_errors) < 5:
                self.stats.first_errors.append(f"{msg.topic()}: {err}")
        else:
            self.stats.delivered += 1

    def _produce(self, topic: str, value: bytes, **kw: Any) -> None:
        while True:
            try:
                self.producer.produce(topic, value, on_delivery=self._on_delivery, **kw)
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
        for p, payload, _n in wire.encode_batches(batch.records, self.partitions, self.cfg.kafka.records_per_message):
            self._produce(self.topics.flows, payload, partition=p, headers=wire.HEADERS)
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
        self._produce(self.topics.dlq, wire.encode_json(r), key=r.source.encode())

    def run(self, paths: Sequence[str], fmt: str, progress: Progress | None = None) -> CollectStats:
        t0 = time.perf_counter()
        for _src, batch in read_batches(paths, fmt, self.cfg.ingest.smtp_ports, self.cfg.ingest.chunk_lines, progress):
            self.send(batch)
        self.flush()
        self.stats.elapsed_s = time.perf_counter() - t0
        return self.stats

    def flush(self, timeout_s: float = 60.0) -> None:
        remaining = self.producer.flush(timeout_s)
        metrics.COLLECTOR_QUEUE.set(remaining)
        if remaining:
            self.stats.delivery_errors += remaining
            raise BrokerError(f"{remaining} messages could not be delivered to {self.cfg.kafka.bootstrap_servers} "
                              f"within {timeout_s:.0f} s")
