"""Scale-out: detectors in one consumer group share the partitions of smtp.flows and raise
the same alerts as one detector, and a rebalance hands each partition's state over.

One scenario is generated and collected once into a 4-partition topic. Each run copies its
messages into a fresh topic only once the group's members all hold partitions, so the run
measures sharing, not a start-up rebalance.

The embedded store (chdb) has one owner process at a time, so each ``smtpguard detect``
process of a run has its own store here; a deployment of several detectors shares a
ClickHouse server. The results are read from all the stores of a run together. The
rebalance test needs the shared store the new owner restores state from: it runs two
detectors of one group in this process, on the tests' embedded store.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from smtpguard.lab import scenario
from smtpguard.ingest.collector import Collector
from smtpguard.core.kafka import consumer_settings, ensure_topics, producer_settings

from conftest import make_config, replace

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))
MEDIUM_UP = ("medium", "high", "critical")
PARTITIONS = 4

_READ_STORE = """
import json, sys
from smtpguard.core.store import Store
with Store(sys.argv[1], sys.argv[2], create=False) as s:
    db = sys.argv[2]
    alerts = s.query(f"SELECT alert_id, severity, suppressed, src_ip, detector FROM {db}.alerts FINAL")
    flows = s.query(f"SELECT kafka_partition, kafka_offset, kafka_row FROM {db}.flows FINAL")
    states = s.query(f"SELECT partition FROM {db}.detector_state FINAL")
print(json.dumps({"alerts": [list(a) for a in alerts], "flows": [list(f) for f in flows],
                  "states": [r[0] for r in states]}))
"""


@pytest.fixture(scope="module")
def collected(broker, tmp_path_factory):
    """The scenario, collected once: its messages (partition, value, headers, timestamp) and truth."""
    tmp = tmp_path_factory.mktemp("scaleout")
    scen = scenario.generate(72, instances=120, duration_s=40 * 60,
                             abuse=("spam_burst", "spam_exempted_new", "flood", "blocked_attempts"))
    paths = scenario.write(scen, tmp / "scen")
    cfg = make_config(tmp, broker.bootstrap)
    ensure_topics(cfg)
    stats = Collector(replace(cfg, kafka={"records_per_message": 200})).run([str(paths["flows"])], "aws-vpc")
    assert stats.delivery_errors == 0
    # read back until the topic is quiet (Tansu's high watermark counts record batches, not messages)
    c = Consumer(consumer_settings(cfg, group_id=f"copy-{uuid.uuid4().hex[:8]}"))
    c.assign([TopicPartition(cfg.kafka.topics.flows, p, 0) for p in range(PARTITIONS)])
    messages, ends = [], {p: 0 for p in range(PARTITIONS)}
    quiet = time.monotonic()
    while time.monotonic() - quiet < 3:
        for m in c.consume(500, 0.5):
            assert m.error() is None, m.error()
            messages.append((m.partition(), m.value(), m.headers(), m.timestamp()[1], m.offset()))
            ends[m.partition()] = max(ends[m.partition()], m.offset() + 1)
            quiet = time.monotonic()
    c.close()
    assert len(messages) == sum(ends.values())  # every offset once
    messages.sort(key=lambda m: (m[3], m[0], m[4]))  # in the order they were produced, over all partitions
    assert all(ends[p] > 0 for p in range(PARTITIONS))
    return {"scen": scen, "paths": paths, "messages": messages, "kept": stats.kept, "topic": cfg.kafka.topics.flows,
            "ends": ends, "tmp": tmp}


def _config_file(path: Path, bootstrap: str, group: str, topics: dict[str, str], data_dir: Path,
                 exemptions: Path) -> Path:
    path.write_text(f"""data_dir = "{data_dir}"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
partitions = {PARTITIONS}
session_timeout_ms = 6000
max_poll_interval_ms = 20000
[kafka.topics]
flows = "{topics['flows']}"
dlq = "{topics['dlq']}"
alerts = "{topics['alerts']}"
enforcement = "{topics['enforcement']}"
[store]
dsn = "chdb://{data_dir}/store"
database = "smtpguard"
[detect]
idle_flush_ms = 1500
checkpoint_interval_ms = 500
exemptions_csv = "{exemptions}"
[dnsbl]
check_alerts_from = "off"
[metrics]
listen = ""
""")
    return path


def _assignment(log: str) -> set[int]:
    """Partitions a detector holds after the assign/revoke lines of its log."""
    held: set[int] = set()
    for kind, parts in re.findall(r"(assigned|revoked) partitions \[([\d, ]*)\]", log):
        ps = {int(x) for x in parts.split(",") if x.strip()}
        held = held | ps if kind == "assigned" else held - ps
    return held


def _committed(bootstrap: str, group: str, topic: str) -> int:
    cfg = make_config(Path("/nonexistent"), bootstrap)
    c = Consumer(consumer_settings(cfg, group_id=group))
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    finally:
        c.close()
    return sum(max(tp.offset, 0) for tp in got)


def _copy(bootstrap: str, topic: str, messages: list) -> None:
    cfg = make_config(Path("/nonexistent"), bootstrap)
    prod = Producer(producer_settings(cfg))
    for p, value, headers, ts, _ in messages:
        prod.produce(topic, value, partition=p, headers=headers, timestamp=ts)
        prod.poll(0)
    assert prod.flush(30) == 0


def _read_alerts_topic(bootstrap: str, topic: str) -> list[dict]:
    cfg = make_config(Path("/nonexistent"), bootstrap)
    c = Consumer(consumer_settings(cfg, group_id=f"read-{uuid.uuid4().hex[:8]}"))
    try:
        end = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
        c.assign([TopicPartition(topic, 0, 0)])
        out: list[dict] = []
        deadline = time.monotonic() + 30
        while len(out) < end and time.monotonic() < deadline:
            out.extend(json.loads(m.value()) for m in c.consume(500, 1.0) if m.error() is None)
    finally:
        c.close()
    return out


def run_group(broker, collected, n: int) -> dict:
    """``n`` `smtpguard detect` processes in a fresh group on a fresh copy of the scenario's topic."""
    tag = uuid.uuid4().hex[:8]
    base = collected["tmp"] / f"run{n}-{tag}"
    topics = {"flows": f"flows-{n}-{tag}", "dlq": f"dlq-{n}-{tag}", "alerts": f"alerts-{n}-{tag}",
              "enforcement": f"enf-{n}-{tag}"}
    group = f"scale-{n}-{tag}"
    cfg = make_config(base, broker.bootstrap)
    ensure_topics(replace(cfg, kafka={"topics": msgspec.structs.replace(cfg.kafka.topics, **topics)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    procs, logs = [], []
    for i in range(n):
        data = base / f"detector{i}"
        data.mkdir(parents=True)
        conf = _config_file(base / f"detector{i}.toml", broker.bootstrap, group, topics, data,
                            collected["paths"]["exemptions"])
        log = base / f"detector{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen([SMTPGUARD, "-v", "--config", str(conf), "detect"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(log, "w")))
    try:
        # every member holds partitions, together all of them once: the group is stable
        deadline = time.monotonic() + 120
        while True:
            held = [_assignment(log.read_text()) for log in logs]
            if all(held) and sorted(p for h in held for p in h) == list(range(PARTITIONS)):
                break
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            assert time.monotonic() < deadline, f"the group did not settle: {held}"
            time.sleep(0.3)
        _copy(broker.bootstrap, topics["flows"], collected["messages"])
        total = sum(collected["ends"].values())
        deadline = time.monotonic() + 240
        while _committed(broker.bootstrap, group, topics["flows"]) < total:
            assert time.monotonic() < deadline, "the detectors did not consume the scenario"
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            time.sleep(0.5)
        time.sleep(4)  # idle flush of the last windows (1.5 s), then a checkpoint
        final = [_assignment(log.read_text()) for log in logs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]
    stores = []
    for i in range(n):
        out = subprocess.run([sys.executable, "-c", _READ_STORE, f"chdb://{base / f'detector{i}'}/store", "smtpguard"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        stores.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"held": held, "final": final, "stores": stores,
            "topic_alerts": _read_alerts_topic(broker.bootstrap, topics["alerts"])}


def _medium_up(stores: list[dict]) -> set[tuple[str, str, str]]:
    return {(a[0], a[1], a[2]) for s in stores for a in s["alerts"] if a[1] in MEDIUM_UP}


_single: dict = {}


def _single_run(broker, collected) -> dict:
    if not _single:
        _single.update(run_group(broker, collected, 1))
    return _single


def test_one_two_and_four_processes_share_partitions_and_raise_the_same_alerts(broker, collected):
    one = _single_run(broker, collected)
    want = _medium_up(one["stores"])
    flagged = {a[3] for s in one["stores"] for a in s["alerts"] if a[1] in MEDIUM_UP and not a[2]}
    assert {a.ip for a in collected["scen"].abusive} <= flagged  # the scenario's abusers, found by one detector
    for n in (1, 2, 4):
        run = one if n == 1 else run_group(broker, collected, n)
        # each member held its own partitions, all of them once
        assert len(run["held"]) == n and all(run["held"])
        assert sorted(p for h in run["final"] for p in h) == list(range(PARTITIONS))
        stores = run["stores"]
        # every flow stored once: in exactly one detector's store, once there
        positions = [tuple(f) for s in stores for f in s["flows"]]
        assert len(positions) == len(set(positions)) == collected["kept"], n
        for s, held in zip(stores, run["final"]):
            assert {f[0] for f in s["flows"]} <= held  # a detector stores only what its partitions carry
            assert set(s["states"]) == held  # and checkpoints exactly those partitions
        # each alert once over all the stores, and on the alerts topic
        ids = [a[0] for s in stores for a in s["alerts"]]
        assert len(ids) == len(set(ids)), n
        published = [a["alert_id"] for a in run["topic_alerts"]]
        assert len(published) == len(set(published)), n
        raised = {a[0] for s in stores for a in s["alerts"] if not a[2]}
        assert set(published) == raised, n
        # the same medium-or-higher alerts, severities and cooldown decisions as one detector
        got = _medium_up(stores)
        assert got == want, (n, sorted(want - got), sorted(got - want))


def test_rebalance_hands_partition_state_over_through_checkpoints(broker, chdb_dir, collected, tmp_path):
    """One detector consumes the first half of the scenario, a second joins the group, then the rest
    arrives: the partitions the second one takes over are restored from the first one's checkpoints
    (watermark, source history, panes, cooldowns) and replayed from the committed offsets, and the
    alerts equal one detector's."""
    from smtpguard.detectors.runner import DetectorRunner
    from smtpguard.app.serve import import_exemptions
    from smtpguard.core.store import Store

    # idle flush well above the pause for the rebalance: windows open at the hand-over are not
    # closed early (their later records would then be late, as for any partition idle that long)
    cfg = make_config(tmp_path, broker.bootstrap, f"chdb://{chdb_dir}", checkpoint_interval_ms=300,
                      idle_flush_ms=12_000)
    cfg = replace(cfg, kafka={"max_poll_interval_ms": 20000})
    ensure_topics(cfg)
    topic = cfg.kafka.topics.flows
    messages = collected["messages"]
    half = len(messages) // 2
    total = len(messages)
    with Store(cfg.store_dsn, cfg.store.database) as store:
        import_exemptions(store, str(collected["paths"]["exemptions"]))
        stops = [threading.Event(), threading.Event()]
        first = DetectorRunner(cfg, store, None, stop=stops[0])
        t1 = threading.Thread(target=first.run, daemon=True)
        t1.start()
        _copy(broker.bootstrap, topic, messages[:half])
        deadline = time.monotonic() + 90
        while _committed(broker.bootstrap, cfg.kafka.group_id, topic) == 0 or first.stats.records == 0:
            assert time.monotonic() < deadline, "the first detector did not consume"
            time.sleep(0.2)
        second = DetectorRunner(cfg, store, None, stop=stops[1])
        t2 = threading.Thread(target=second.run, daemon=True)
        t2.start()
        deadline = time.monotonic() + 90
        while not (second.stats.assigned and first.stats.assigned):
            assert time.monotonic() < deadline, "the second detector got no partition"
            time.sleep(0.2)
        held = (set(first.stats.assigned), set(second.stats.assigned))
        _copy(broker.bootstrap, topic, messages[half:])
        deadline = time.monotonic() + 240
        while _committed(broker.bootstrap, cfg.kafka.group_id, topic) < total:
            assert time.monotonic() < deadline, "the scenario was not consumed"
            time.sleep(0.3)
        time.sleep(14)  # idle flush, then a checkpoint
        for s in stops:
            s.set()
        t1.join(60)
        t2.join(60)
        db = cfg.store.database
        alerts = store.query(f"SELECT alert_id, severity, suppressed FROM {db}.alerts FINAL")
        flows = store.query(f"SELECT count(), uniqExact(kafka_partition, kafka_offset, kafka_row) FROM {db}.flows FINAL")
    # the hand-over happened: the second detector took partitions the first had held, with their state
    assert held[0] and held[1] and held[0].isdisjoint(held[1]) and held[0] | held[1] == set(range(PARTITIONS))
    assert second.stats.restored >= 1 and second.stats.records > 0
    assert first.pipeline.late_records == 0 and second.pipeline.late_records == 0
    assert flows[0] == (collected["kept"], collected["kept"])
    ids = [a[0] for a in alerts]
    assert len(ids) == len(set(ids))
    got = {tuple(a) for a in alerts if a[1] in MEDIUM_UP}
    want = _medium_up(_single_run(broker, collected)["stores"])
    assert got == want, (sorted(want - got), sorted(got - want))
