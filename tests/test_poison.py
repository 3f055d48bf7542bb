"""Poison input through the streaming path, on real components (a Tansu broker, the chdb
engine): hostile messages on the flows topic interleaved with good ones, and a flow-log file
with hostile lines through the collector.

What must hold: every hostile message (or record) is on the dead-letter topic with its
reason, every good record is in the store, and the partition keeps moving: the committed
offset ends past the last message, poison included.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
from confluent_kafka import Consumer, Producer, TopicPartition
from test_streaming import read_topic, run_detector_until_idle

from smtpguard.core import record, wire
from smtpguard.core.exemptions import Exemptions
from smtpguard.ingest.collector import Collector
from smtpguard.core.kafka import consumer_settings, ensure_topics, producer_settings
from smtpguard.core.store import Store, addr_text

JSON = [("content-type", b"application/json")]
DAY_MS = 86_400_000
T0 = 1_710_230_400_000  # 2024-03-12T08:00:00Z


def flow(i: int, start_ms: int, **over: object) -> dict:
    return {"start": start_ms, "end": start_ms + 1500, "src_ip": f"10.20.{i // 250}.{i % 250 + 1}",
            "dst_ip": "198.51.100.25", "src_port": 40000 + i % 20000, "dst_port": 25, "protocol": 6, "packets": 8,
            "bytes": 900, **over}


def arrow(rows: list[dict]) -> bytes:
    return wire.encode_table(record.from_dicts(rows))


def arrow_raw(columns: dict[str, pa.Array], version: bytes = b"1") -> bytes:
    table = pa.table(columns).replace_schema_metadata({b"smtpguard.core.record.version": version})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def committed(cfg, partition: int) -> int:
    c = Consumer(consumer_settings(cfg))
    try:
        (tp,) = c.committed([TopicPartition(cfg.kafka.topics.flows, partition)], timeout=10)
        return tp.offset
    finally:
        c.close()


def test_poison_messages_are_dead_lettered_and_the_partition_keeps_moving(cfg):
    ensure_topics(cfg)
    topic = cfg.kafka.topics.flows
    good_rows: list[dict] = []
    msgs: list[tuple[bytes, list]] = []  # (value, headers)
    poison: list[str] = []  # the reason each dead letter must give, in order

    def good(rows: list[dict]) -> None:
        good_rows.extend(rows)
        msgs.append((arrow(rows), wire.HEADERS))

    def bad(value: bytes, headers: list, reason: str) -> None:
        msgs.append((value, headers))
        poison.append(reason)

    good([flow(i, T0 + i * 1000) for i in range(50)])
    bad(b"\x00\x01\x02undecodable", wire.HEADERS, "not an Arrow IPC record batch")
    bad(b"\xff\xfe{[" * 40, JSON, "invalid JSON")
    # Arrow batches with wrong types: counters as text, a list of addresses
    bad(arrow_raw({"start": pa.array([T0], pa.int64()), "end": pa.array([T0], pa.int64()),
                   "src_ip": pa.array(["10.0.0.1"]), "dst_ip": pa.array(["10.0.0.2"]),
                   "dst_port": pa.array([25]), "src_port": pa.array([1]), "protocol": pa.array([6]),
                   "packets": pa.array(["NaN"]), "bytes": pa.array([1.5])}), wire.HEADERS,
        "batch does not match the record schema")
    bad(arrow_raw({"src_ip": pa.array([["10.0.0.1"]])}), wire.HEADERS, "batch does not match the record schema")
    good([flow(i, T0 + 60_000 + i) for i in range(50, 80)])
    # JSON records: NaN counters, oversized fields, times decades away, forged IPv6
    bad(b'{"start": 1710230400000, "end": 1710230401000, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", '
        b'"dst_port": 25, "packets": NaN, "bytes": Infinity}', JSON, "invalid JSON")
    bad(json.dumps(flow(1, T0, helo="h" * 200_000)).encode(), JSON, "helo of 200000 chars is longer than 4096")
    bad(json.dumps(flow(2, T0, start="1900-01-01T00:00:00Z")).encode(), JSON, "outside 1970..9999")
    bad(json.dumps(flow(3, 7258118400000)).encode(), JSON, "after the message was produced")
    bad(json.dumps(flow(4, 2**63)).encode(), JSON, "outside 1970..9999")
    bad(json.dumps(flow(5, T0, src_ip="fe80::1%eth0")).encode(), JSON, "is not an IP address")
    bad(json.dumps(flow(6, T0, dst_ip="1::2::3")).encode(), JSON, "is not an IP address")
    bad(json.dumps(flow(7, T0, packets=-5)).encode(), JSON, "invalid JSON record")
    # a JSON list: its good records go on, its bad ones are dead-lettered one by one
    mixed = [flow(100, T0 + 120_000), flow(101, T0, end=T0 - 1000), flow(102, T0 + 120_500),
             flow(103, T0, action="x" * 5000)]
    msgs.append((json.dumps(mixed).encode(), JSON))
    good_rows.extend([mixed[0], mixed[2]])
    poison.extend(["before start", "unknown action"])
    # an Arrow batch of the record's schema with good records and records beyond any calendar
    hostile = record.from_dicts([flow(200, T0 + 180_000), flow(201, T0 + 180_000)])
    start = pa.array([T0 + 180_000, 2**63 - 1], pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    hostile = pa.Table.from_arrays([start, start] + hostile.columns[2:], schema=record.SCHEMA)
    msgs.append((wire.encode_table(hostile), wire.HEADERS))
    good_rows.append(flow(200, T0 + 180_000))
    poison.append("outside 1970..9999")
    # good records of 150 different days in one message (a backlog): one store write
    good([flow(300 + d, T0 - d * DAY_MS) for d in range(150)])
    good([flow(i, T0 + 240_000 + i) for i in range(500, 520)])

    p = Producer(producer_settings(cfg))
    for value, headers in msgs:
        p.produce(topic, value, partition=0, headers=headers)
    assert p.flush(30) == 0

    with Store(cfg.store_dsn, cfg.store.database) as store:
        runner = run_detector_until_idle(cfg, store, Exemptions(), len(good_rows))
        assert runner.stats.records == len(good_rows)
        assert runner.stats.bad_records == 10  # the JSON records, and the bad ones of the mixed list and batch
        assert store.count("flows") == len(good_rows)
        stored = {r[0] for r in store.query(f"SELECT {addr_text('src_ip')} FROM {cfg.store.database}.flows")}
        assert stored == {r["src_ip"] for r in good_rows}
    dead = [json.loads(m.value()) for m in read_topic(cfg, cfg.kafka.topics.dlq, len(poison))]
    assert len(dead) == len(poison)
    dead.sort(key=lambda d: (int(d["location"].split()[0]), d["location"]))
    for d, reason in zip(dead, poison):
        assert reason in d["reason"], (reason, d)
        assert d["format"] == "kafka" and d["source"] == f"{topic}[0]"
    # the partition moved past the poison: everything is committed
    deadline = time.monotonic() + 20
    while committed(cfg, 0) != len(msgs) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert committed(cfg, 0) == len(msgs)


AWS = "2 123456789010 eni-1 {src} 198.51.100.7 {sport} 25 6 {pkts} 1000 {start} {end} ACCEPT OK"


def test_collect_sends_every_hostile_line_to_the_dead_letter_topic(cfg, tmp_path):
    ensure_topics(cfg)
    now_s = int(time.time()) - 3600
    good = [AWS.format(src=f"10.30.0.{i + 1}", sport=40000 + i, pkts=5, start=now_s + i, end=now_s + i + 2)
            for i in range(40)]
    hostile = {
        "NaN packets": (AWS.format(src="10.31.0.1", sport=1, pkts="NaN", start=now_s, end=now_s), "non-numeric packets"),
        "negative packets": (AWS.format(src="10.31.0.2", sport=1, pkts="-5", start=now_s, end=now_s),
                             "negative packets"),
        "2^63 start": (AWS.format(src="10.31.0.3", sport=1, pkts=5, start=2**63, end=2**63), "start out of range"),
        "1900 start": (AWS.format(src="10.31.0.4", sport=1, pkts=5, start=-2208988800, end=now_s), "negative start"),
        "scoped IPv6": (AWS.format(src="fe80::1%eth0", sport=1, pkts=5, start=now_s, end=now_s), "invalid IP address"),
        "malformed IPv6": (AWS.format(src="1::2::3", sport=1, pkts=5, start=now_s, end=now_s), "invalid IP address"),
        "1 MB field": (AWS.format(src="10.31.0.5", sport=1, pkts=5, start=now_s, end=now_s).replace(
            "eni-1", "eni-" + "x" * 1_000_000), "line too long"),
        "binary": ("2 \x00\x01\x02 garbage", "binary data"),
        "undecodable": ("2 123 eni-1 \ufffd\ufffd", "undecodable bytes"),
        "short": ("2 123456789010 eni-1 10.0.0.1", "wrong field count"),
    }
    # accepted by the parser (a date it can hold), refused by the detector: after it was produced
    future = AWS.format(src="10.32.0.1", sport=1, pkts=5, start=7258118400, end=7258118401)
    lines = []
    for i, g in enumerate(good):
        lines.append(g)
        if i < len(hostile):
            lines.append(list(hostile.values())[i][0])
    lines.append(future)
    path = tmp_path / "flows.log"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    stats = Collector(cfg).run([str(path)], "aws-vpc")
    assert stats.delivery_errors == 0
    assert stats.kept == len(good) + 1 and stats.dead_lettered == len(hostile)
    dead = [json.loads(m.value()) for m in read_topic(cfg, cfg.kafka.topics.dlq, len(hostile))]
    assert len(dead) == len(hostile)
    by_line = {int(d["location"]): d for d in dead}
    for name, (line, reason) in hostile.items():
        no = lines.index(line) + 1
        assert reason in by_line[no]["reason"], (name, by_line[no]["reason"])
        assert by_line[no]["source"] == str(path) and by_line[no]["raw"]

    with Store(cfg.store_dsn, cfg.store.database) as store:
        runner = run_detector_until_idle(cfg, store, Exemptions(), len(good))
        assert runner.stats.bad_records == 1
        assert store.count("flows") == len(good)
    dead = [json.loads(m.value()) for m in read_topic(cfg, cfg.kafka.topics.dlq, len(hostile) + 1)]
    assert len(dead) == len(hostile) + 1
    assert any("after the message was produced" in d["reason"] and "10.32.0.1" in d["raw"] for d in dead)


class _FlakyDlq:
    """The detector's own producer, on the real broker, except that the first ``fails`` deliveries to the
    dead-letter topic report an error (a broker that times out twice, then takes it)."""

    def __init__(self, real, dlq: str, fails: int):
        self.real, self.dlq, self.fails = real, dlq, fails

    def produce(self, topic, value, key=None, on_delivery=None, **kw):
        if topic == self.dlq and self.fails > 0:
            self.fails -= 1
            from confluent_kafka import KafkaError

            def failed(_err, msg, report=on_delivery):
                report(KafkaError(KafkaError._MSG_TIMED_OUT), msg)

            return self.real.produce(topic, value, key=key, on_delivery=failed, **kw)
        return self.real.produce(topic, value, key=key, on_delivery=on_delivery, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __len__(self):
        return len(self.real)


def test_dead_letters_delivered_on_the_second_retry_are_committed(cfg):
    """Before the commit the detector makes sure every dead letter is on the DLQ: delivered only on the
    second retry, it commits (this path once raised NameError just before the commit)."""
    import threading

    from smtpguard.detectors.runner import DetectorRunner

    ensure_topics(cfg)
    p = Producer(producer_settings(cfg))
    p.produce(cfg.kafka.topics.flows, b"not an arrow batch", key=b"x", partition=0)
    p.flush(10)
    with Store(cfg.store_dsn, cfg.store.database) as store:
        stop = threading.Event()
        runner = DetectorRunner(cfg, store, Exemptions(), stop=stop)
        runner.producer = _FlakyDlq(runner.producer, cfg.kafka.topics.dlq, fails=2)
        errors: list[BaseException] = []

        def run():
            try:
                runner.run()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        th = threading.Thread(target=run, daemon=True)
        th.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and committed(cfg, 0) < 1 and not errors:
            time.sleep(0.2)
        stop.set()
        th.join(30)
    assert not errors, errors
    assert runner.producer.fails == 0 and committed(cfg, 0) >= 1
    dead = read_topic(cfg, cfg.kafka.topics.dlq, 1)
    assert len(dead) >= 1 and json.loads(dead[0].value())["reason"].startswith("not an Arrow IPC record batch")
