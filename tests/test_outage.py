"""Outages on real components: a Tansu broker frozen with SIGSTOP and resumed with SIGCONT, or
restarted empty; a ClickHouse (chdb) store whose flows table is renamed away and back.

Each test runs its own broker (the session's shared one must not be frozen). Input reaches the
collector through a named pipe, so the outage falls exactly between two halves of the input.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from conftest import make_config, replace
from smtpguard.lab import scenario
from smtpguard.core import wire
from smtpguard.core.exemptions import Exemptions
from smtpguard.ingest.collector import Collector
from smtpguard.core.kafka import LocalBroker, consumer_settings, ensure_topics, read_partitions
from smtpguard.core.store import Store


@pytest.fixture(scope="module")
def flow_lines(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("scen")
    paths = scenario.write(scenario.generate(61, instances=60, duration_s=20 * 60), out)
    return Path(paths["flows"]).read_text().splitlines(keepends=True)


@pytest.fixture
def own_broker(tmp_path):
    b = LocalBroker(log_path=tmp_path / "tansu.log").start()
    yield b
    if b.proc is not None and b.proc.poll() is None:
        os.kill(b.pid, signal.SIGCONT)
    b.stop()


def freeze(b: LocalBroker) -> None:
    os.kill(b.pid, signal.SIGSTOP)


def thaw(b: LocalBroker) -> None:
    os.kill(b.pid, signal.SIGCONT)


def topic_records(cfg, topic: str, timeout_s: float = 30) -> pa.Table:
    """Every record on ``topic``, read from the start of each partition to its end."""
    c = Consumer(consumer_settings(cfg, group_id=f"reader-{time.monotonic_ns()}"))
    tables = []
    try:
        parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
        read_partitions(c, [TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts],
                        lambda m: tables.append(wire.decode_message(m.value(), m.headers())), timeout_s=timeout_s)
    finally:
        c.close()
    return pa.concat_tables(tables) if tables else pa.table({})


def collect_through_pipe(cfg, tmp_path: Path, halves: tuple[list[str], list[str]], between) -> Collector:
    """Collect from a named pipe: the first half, then ``between()`` (the outage), then the second half."""
    fifo = tmp_path / "flows.fifo"
    os.mkfifo(fifo)
    collector = Collector(cfg)
    errors: list[BaseException] = []

    def run():
        try:
            collector.run([str(fifo)], "aws-vpc")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    with open(fifo, "w") as w:
        w.writelines(halves[0])
        w.flush()
        deadline = time.monotonic() + 30
        while collector.stats.messages == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        between()
        w.writelines(halves[1])
    th.join(120)
    assert not th.is_alive(), "the collector did not finish"
    if errors:
        raise errors[0]
    return collector


def _parsed(lines: list[str], tmp_path: Path) -> pa.Table:
    """The input's SMTP records as the parser makes them, without a broker."""
    from smtpguard.ingest.reader import read_batches

    f = tmp_path / "input.log"
    f.write_text("".join(lines))
    return pa.concat_tables([b.records for _s, b in read_batches([str(f)], "aws-vpc", (25, 465, 587, 2525), 100_000)])


def key_counts(t: pa.Table) -> Counter:
    cols = [t.column(n).to_pylist() for n in ("start", "src_ip", "dst_ip", "src_port", "packets", "bytes")]
    return Counter(zip(*cols))


def test_collector_rides_out_a_frozen_broker_and_loses_nothing(own_broker, tmp_path, flow_lines):
    cfg = make_config(tmp_path, own_broker.bootstrap)
    ensure_topics(cfg)
    half = len(flow_lines) // 2

    def outage():
        freeze(own_broker)
        time.sleep(6)
        thaw(own_broker)

    c = collect_through_pipe(cfg, tmp_path, (flow_lines[:half], flow_lines[half:]), outage)
    st = c.stats
    assert st.read == len(flow_lines) and st.kept > 0
    assert st.delivery_errors == 0 and st.delivered == st.messages
    on_topic = topic_records(cfg, cfg.kafka.topics.flows)
    assert on_topic.num_rows == st.kept, "as many records on the topic as were kept"
    # and they are the same records: none lost, none twice (a loss offset by a duplicate shows here)
    assert key_counts(on_topic) == key_counts(_parsed(flow_lines, tmp_path))


def test_undeliverable_records_are_spooled_reported_and_resent(own_broker, tmp_path, flow_lines):
    """An outage longer than the delivery timeout: what could not be delivered is kept in the spool
    (and reported), and ``resend`` delivers it once the broker is back: nothing lost, nothing twice."""
    from smtpguard.ingest.collector import resend_spool

    cfg = make_config(tmp_path, own_broker.bootstrap)
    cfg = replace(cfg, kafka={"client": {"message.timeout.ms": 2000}})
    ensure_topics(cfg)
    half = len(flow_lines) // 2

    def outage():
        freeze(own_broker)
        time.sleep(1)

    try:
        c = collect_through_pipe(cfg, tmp_path, (flow_lines[:half], flow_lines[half:]), outage)
    finally:
        thaw(own_broker)
    st = c.stats
    assert st.delivery_errors > 0 and st.spooled == st.delivery_errors
    assert st.delivered + st.delivery_errors == st.messages
    spool = list(Path(cfg.data_dir, "spool").glob("*.spool"))
    assert spool and "spool resend" in st.summary()
    resent = resend_spool(cfg)
    # a message that timed out may have reached the broker after all: it is not sent twice
    assert resent.delivery_errors == 0 and resent.delivered == resent.messages
    assert resent.messages + resent.skipped == st.spooled
    assert not list(Path(cfg.data_dir, "spool").glob("*.spool")), "a delivered spool file is removed"
    on_topic = topic_records(cfg, cfg.kafka.topics.flows)
    assert on_topic.num_rows == st.kept
    assert sum(key_counts(on_topic).values()) == st.kept


def _run_detector(cfg, store):
    from smtpguard.detectors.runner import DetectorRunner

    stop = threading.Event()
    runner = DetectorRunner(cfg, store, Exemptions(), stop=stop)
    th = threading.Thread(target=runner.run, daemon=True)
    th.start()
    return runner, stop, th


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_detector_reconnects_after_a_frozen_broker(own_broker, tmp_path, chdb_dir, flow_lines):
    cfg = make_config(tmp_path, own_broker.bootstrap, f"chdb://{chdb_dir}")
    ensure_topics(cfg)
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    half = len(flow_lines) // 2
    first.write_text("".join(flow_lines[:half]))
    second.write_text("".join(flow_lines[half:]))
    with Store(cfg.store_dsn, cfg.store.database) as store:
        runner, stop, th = _run_detector(cfg, store)
        try:
            a = Collector(cfg).run([str(first)], "aws-vpc")
            _wait(lambda: runner.stats.records >= a.kept, 60, "the first half")
            freeze(own_broker)
            time.sleep(8)  # longer than the session timeout: the group must be rejoined
            thaw(own_broker)
            b = Collector(cfg).run([str(second)], "aws-vpc")
            assert a.delivery_errors == b.delivery_errors == 0
            _wait(lambda: runner.stats.records >= a.kept + b.kept and runner.open_rows == 0, 90,
                  "the second half after the outage")
            assert th.is_alive(), "the detector kept running through the outage"
        finally:
            stop.set()
            th.join(30)
        assert store.count("flows") == a.kept + b.kept


def test_a_broker_that_comes_back_empty_is_reported_not_crashed_on(tmp_path, chdb_dir, flow_lines):
    """A new, empty log is recognised when its offsets start below the last committed one: small
    messages here, so that the first part leaves each partition well past offset 0."""
    broker = LocalBroker(log_path=tmp_path / "tansu.log").start()
    cfg = replace(make_config(tmp_path, broker.bootstrap, f"chdb://{chdb_dir}"),
                  kafka={"records_per_message": 100}, detect={"checkpoint_interval_ms": 500})
    ensure_topics(cfg)
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    cut = len(flow_lines) * 3 // 4
    first.write_text("".join(flow_lines[:cut]))
    second.write_text("".join(flow_lines[:1] + flow_lines[cut:]))  # the header line, then the rest
    try:
        with Store(cfg.store_dsn, cfg.store.database) as store:
            runner, stop, th = _run_detector(cfg, store)
            try:
                a = Collector(cfg).run([str(first)], "aws-vpc")
                _wait(lambda: runner.stats.records >= a.kept and runner.stats.commits > 0, 60, "the first half")
                broker.stop()
                broker = LocalBroker(log_path=tmp_path / "tansu2.log", port=broker.port).start()
                ensure_topics(cfg)
                b = Collector(cfg).run([str(second)], "aws-vpc")
                assert b.delivery_errors == 0
                db = cfg.store.database
                unpublished = (f"SELECT count() FROM {db}.alerts FINAL WHERE suppressed = '' AND alert_id NOT IN "
                               f"(SELECT alert_id FROM {db}.alert_publications)")
                # the detector's producer, refused by the new broker, is replaced: every alert gets out
                _wait(lambda: runner.stats.records >= a.kept + b.kept and runner.open_rows == 0
                      and store.query(unpublished) == [(0,)], 150, "the records and alerts after the restart")
                assert th.is_alive()
                assert runner.stats.offset_resets >= 1
            finally:
                stop.set()
                th.join(60)
            # a retry after the alerts' delivery failed does not write the step's flows again
            assert store.count("flows") == a.kept + b.kept
    finally:
        broker.stop()


def _committed(cfg) -> dict[int, int]:
    c = Consumer(consumer_settings(cfg))
    try:
        tps = [TopicPartition(cfg.kafka.topics.flows, p) for p in range(cfg.kafka.partitions)]
        return {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
    finally:
        c.close()


def test_store_outage_stops_commits_and_resumes_without_loss(cfg, tmp_path, flow_lines):
    """ClickHouse refuses writes (the flows table is renamed away): the detector retries with
    backoff, commits nothing meanwhile, counts the failures, and stores everything once writes work."""
    from smtpguard.core import metrics

    cfg = replace(cfg, detect={"checkpoint_interval_ms": 500})
    ensure_topics(cfg)
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    half = len(flow_lines) // 2
    first.write_text("".join(flow_lines[:half]))
    second.write_text("".join(flow_lines[:1] + flow_lines[half:]))
    db = cfg.store.database
    failures_before = metrics.REGISTRY.get_sample_value("smtpguard_store_write_failures_total", {"table": "flows"}) or 0
    with Store(cfg.store_dsn, db) as store:
        runner, stop, th = _run_detector(cfg, store)
        try:
            a = Collector(cfg).run([str(first)], "aws-vpc")
            _wait(lambda: runner.stats.records >= a.kept and store.count("flows") == a.kept
                  and runner.stats.commits > 0, 60, "the first half stored and committed")
            store.client.command(f"RENAME TABLE {db}.flows TO {db}.flows_away")
            time.sleep(1.5)  # a checkpoint interval: the commit of the first half is done
            committed = _committed(cfg)
            b = Collector(cfg).run([str(second)], "aws-vpc")
            _wait(lambda: runner.stats.store_errors >= 3, 60, "failed writes")
            assert _committed(cfg) == committed, "no offset is committed while writes fail"
            assert th.is_alive()
            store.client.command(f"RENAME TABLE {db}.flows_away TO {db}.flows")
            _wait(lambda: runner.stats.records >= a.kept + b.kept and runner.open_rows == 0
                  and store.count("flows") == a.kept + b.kept, 120, "the writes after the outage")
        finally:
            stop.set()
            th.join(30)
        assert store.count("flows") == a.kept + b.kept
        dup = store.query(f"SELECT count() - uniqExact(alert_id) FROM {db}.alerts FINAL")
        assert dup == [(0,)]
    after = metrics.REGISTRY.get_sample_value("smtpguard_store_write_failures_total", {"table": "flows"})
    assert after - failures_before >= 3
    final = _committed(cfg)
    assert all(final[p] >= committed[p] for p in committed) and final != committed, "commits resumed"
