"""End to end on real components: a flow-log file -> collector -> Tansu -> detector -> chdb.

Also: the streaming path and ``analyze`` give the same alerts for the same input, and a
replay of the same input raises no alert twice on the alerts topic.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from confluent_kafka import Consumer

from conftest import replace
from smtpguard.lab import scenario
from smtpguard.app.analyze import analyze
from smtpguard.core.alert import from_json
from smtpguard.detectors.runner import DetectorRunner
from smtpguard.core.exemptions import Exemptions
from smtpguard.ingest.collector import Collector
from smtpguard.core.kafka import consumer_settings, ensure_topics
from smtpguard.core.store import Store


@pytest.fixture(scope="module")
def small_scenario(tmp_path_factory):
    out = tmp_path_factory.mktemp("scen")
    scen = scenario.generate(23, instances=80, duration_s=40 * 60)
    paths = scenario.write(scen, out)
    return scen, paths


def run_detector_until_idle(cfg, store, exemptions, expected_records, timeout_s=90):
    stop = threading.Event()
    runner = DetectorRunner(cfg, store, exemptions, stop=stop)
    th = threading.Thread(target=runner.run, daemon=True)
    th.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if runner.stats.records >= expected_records and runner.open_rows == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"detector consumed {runner.stats.records} of {expected_records} records in {timeout_s} s")
    finally:
        stop.set()
        th.join(30)
    return runner


def run_responder_until_idle(cfg, store, expected_alerts, timeout_s=90, lookups=True):
    """The response service over the alerts topic until it has acted on ``expected_alerts`` and owes nothing."""
    from smtpguard.response.service import Responder

    stop = threading.Event()
    responder = Responder(cfg, store, stop, lookups=lookups)
    th = threading.Thread(target=responder.run, daemon=True)
    th.start()
    deadline = time.monotonic() + timeout_s
    try:
        while responder.stats.alerts < expected_alerts:
            if time.monotonic() > deadline:
                pytest.fail(f"the response acted on {responder.stats.alerts} of {expected_alerts} alerts")
            time.sleep(0.2)
        assert responder.wait_idle(max(1.0, deadline - time.monotonic()))
    finally:
        stop.set()
        th.join(30)
    return responder


def read_topic(cfg, topic, expect_at_least, timeout_s=30):
    c = Consumer(consumer_settings(cfg, group_id=f"reader-{topic}"))
    c.subscribe([topic])
    got = []
    deadline = time.monotonic() + timeout_s
    idle_since = None
    while time.monotonic() < deadline:
        msgs = c.consume(500, 0.5)
        got.extend(m for m in msgs if not m.error())
        if len(got) >= expect_at_least:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 2:
                break
    c.close()
    return got


@pytest.mark.parametrize("hand_off", [None, 1], ids=["step-writes", "every-close-handed-off"])
def test_flow_log_to_alerts_in_clickhouse_matches_analyze(cfg, small_scenario, hand_off, monkeypatch):
    """The streamed alerts, features and flows equal analyze's; also when every partition's close goes to the
    writer on its own (as a flood's closes of 20,000 windows or more do: runner.HAND_OFF_WINDOWS)."""
    if hand_off is not None:
        import smtpguard.detectors.runner as runner_module

        monkeypatch.setattr(runner_module, "HAND_OFF_WINDOWS", hand_off)
    scen, paths = small_scenario
    exemptions = Exemptions.from_csv(paths["exemptions"])
    ensure_topics(cfg)

    stats = Collector(cfg).run([str(paths["flows"])], "aws-vpc")
    assert stats.delivery_errors == 0 and stats.kept > 1000 and stats.dead_lettered == 0

    with Store(cfg.store_dsn, cfg.store.database) as store:
        runner = run_detector_until_idle(cfg, store, exemptions, stats.kept)
        assert store.count("flows") == stats.kept
        assert store.count("window_features") == runner.stats.windows > 0
        streamed = {a["alert_id"]: a for a in store.list_alerts(limit=10_000)}

    offline = analyze(cfg, [str(paths["flows"])], "aws-vpc", exemptions)
    offline_ids = {a.alert_id: a for a in offline.raised()}
    assert streamed.keys() == offline_ids.keys()
    for aid, a in offline_ids.items():
        assert streamed[aid]["severity"] == a.severity and streamed[aid]["reasons"] == a.reasons

    abusers = {a.ip for a in scen.abusive}
    flagged = {a["src_ip"] for a in streamed.values() if a["severity"] in ("medium", "high", "critical")}
    assert abusers <= flagged and flagged <= abusers

    published = read_topic(cfg, cfg.kafka.topics.alerts, len(streamed))
    ids = [from_json(m.value()).alert_id for m in published]
    assert sorted(ids) == sorted(streamed)  # every raised alert once on the topic
    assert all(m.key().decode() == from_json(m.value()).src_ip for m in published)


def test_replay_raises_no_alert_twice(cfg, small_scenario):
    """Consume the same input twice with fresh consumer groups: the second run publishes nothing new."""
    import msgspec

    _scen, paths = small_scenario
    exemptions = Exemptions.from_csv(paths["exemptions"])
    ensure_topics(cfg)
    stats = Collector(cfg).run([str(paths["flows"])], "aws-vpc")
    with Store(cfg.store_dsn, cfg.store.database) as store:
        first = run_detector_until_idle(cfg, store, exemptions, stats.kept)
        again = msgspec.structs.replace(cfg, kafka=msgspec.structs.replace(cfg.kafka, group_id=cfg.kafka.group_id + "-2"))
        second = run_detector_until_idle(again, store, exemptions, stats.kept)
        assert first.stats.alerts_raised > 0
        assert second.stats.alerts_raised == 0
        assert second.stats.alerts_republished_skipped == first.stats.alerts_raised
        rows = store.query(f"SELECT count(), uniqExact(alert_id) FROM {cfg.store.database}.alerts FINAL")
        assert rows[0][0] == rows[0][1]
    published = read_topic(cfg, cfg.kafka.topics.alerts, first.stats.alerts_raised)
    assert len(published) == first.stats.alerts_raised


def test_bad_messages_are_dead_lettered_and_do_not_stop_the_partition(cfg):
    from confluent_kafka import Producer

    from smtpguard.core import record, wire
    from smtpguard.core.kafka import producer_settings

    ensure_topics(cfg)
    p = Producer(producer_settings(cfg))
    p.produce(cfg.kafka.topics.flows, b"\x00\x01garbage", partition=0, headers=wire.HEADERS)
    p.produce(cfg.kafka.topics.flows, json.dumps({"src_ip": "not-an-ip"}).encode(), partition=0,
              headers=[("content-type", b"application/json")])
    good = record.from_dicts([{"start": 1_700_000_000_000, "end": 1_700_000_001_000, "src_ip": "10.9.9.9",
                               "dst_ip": "192.0.2.1", "src_port": 1, "dst_port": 25, "protocol": 6,
                               "packets": 3, "bytes": 180}])
    p.produce(cfg.kafka.topics.flows, wire.encode_table(good), partition=0, headers=wire.HEADERS)
    p.flush(10)
    with Store(cfg.store_dsn, cfg.store.database) as store:
        runner = run_detector_until_idle(cfg, store, Exemptions(), 1)
        assert runner.stats.bad_messages == 2
        assert store.count("flows") == 1
    dead = [json.loads(m.value()) for m in read_topic(cfg, cfg.kafka.topics.dlq, 2)]
    assert len(dead) == 2
    assert any("Arrow" in d["reason"] for d in dead) and any("JSON" in d["reason"] for d in dead)


def run_udp_collector(cfg, fmt: str, datagrams: list[bytes], env_extra: dict | None = None) -> str:
    """`smtpguard collect FMT --listen` as a process: ``datagrams`` sent to it over UDP, then SIGTERM;
    returns its stderr (the summary) after checking it exited 0."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from smtpguard.core.kafka import free_port

    ensure_topics(cfg)
    port = free_port()
    t = cfg.kafka.topics
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    env.update({"SMTPGUARD_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers, "SMTPGUARD_KAFKA__TOPICS__FLOWS": t.flows,
                "SMTPGUARD_KAFKA__TOPICS__DLQ": t.dlq,
                "SMTPGUARD_METRICS__LISTEN": "", **(env_extra or {})})  # the default metrics port may be taken
    exe = str(Path(sys.executable).with_name("smtpguard"))
    proc = subprocess.Popen([exe, "collect", fmt, "--listen", f"127.0.0.1:{port}"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "listening" in line, line
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for d in datagrams:
                s.sendto(d, ("127.0.0.1", port))
                time.sleep(0.002)
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return line + err


def test_collect_netflow_over_udp_into_kafka(cfg, shared_data):
    """`smtpguard collect netflow --listen` as a process: real UDP datagrams in, records on the topic."""
    from smtpguard.core import wire

    payload = (shared_data / "netflow/logstash-codec-netflow/netflow9_test_valid01.dat").read_bytes()
    run_udp_collector(cfg, "netflow", [payload, b"\x00\x09garbage"], {"SMTPGUARD_INGEST__SMTP_PORTS": "[25, 123]"})
    t = cfg.kafka.topics
    msgs = read_topic(cfg, t.flows, 1, timeout_s=20)
    records = sum(wire.decode_message(m.value(), m.headers()).num_rows for m in msgs)
    assert records == 6  # the six NTP flows of the sample (port 123 configured as a "mail" port here)
    assert len(read_topic(cfg, t.dlq, 1, timeout_s=20)) >= 1


def test_a_finite_input_closes_its_last_windows_once_consumed(cfg, small_scenario):
    """``serve FILE`` and the demo know where the input ends: the detector closes the last windows as soon
    as it has consumed the collector's records, not after ``detect.idle_flush_ms`` of silence (here ten
    minutes), and the windows and alerts are those of the file."""
    _scen, paths = small_scenario
    cfg = replace(cfg, detect={"idle_flush_ms": 600_000})
    exemptions = Exemptions.from_csv(paths["exemptions"])
    ensure_topics(cfg)
    stats = Collector(cfg).run([str(paths["flows"])], "aws-vpc")
    with Store(cfg.store_dsn, cfg.store.database) as store:
        stop = threading.Event()
        runner = DetectorRunner(cfg, store, exemptions, stop=stop)
        runner.end_of_input(stats.kept)
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        try:
            deadline = time.monotonic() + 90
            while not (runner.stats.records >= stats.kept and runner.open_rows == 0):
                assert time.monotonic() < deadline, f"{runner.open_rows} rows still open after 90 s"
                time.sleep(0.2)
        finally:
            stop.set()
            th.join(30)
        streamed = {a["alert_id"] for a in store.list_alerts(limit=10_000)}
    offline = analyze(cfg, [str(paths["flows"])], "aws-vpc", exemptions)
    assert runner.stats.windows == offline.windows
    assert streamed == {a.alert_id for a in offline.raised()}
