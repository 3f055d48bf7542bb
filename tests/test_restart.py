"""A detector killed with SIGKILL in the middle of a scenario and restarted gives the same
medium-or-higher alerts as an uninterrupted run (nothing missing, nothing extra), each once in the
store and on the alerts topic, and resumes its source history. (The response service's own
restarts: tests/test_response_service.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from smtpguard.lab import scenario
from smtpguard.core.alert import from_json
from fuzz.hostile import SOAK
from test_streaming import read_topic
from smtpguard.app.analyze import analyze
from smtpguard.core.exemptions import Exemptions
from smtpguard.ingest.collector import Collector
from smtpguard.core.kafka import consumer_settings, ensure_topics, read_partitions
from smtpguard.core.store import Store

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))
KILLS = 3 * SOAK


def _config_file(cfg, path: Path, exemptions: Path) -> Path:
    k, t = cfg.kafka, cfg.kafka.topics
    path.write_text(f"""data_dir = "{cfg.data_dir}"
[kafka]
bootstrap_servers = "{k.bootstrap_servers}"
group_id = "{k.group_id}"
session_timeout_ms = 6000
max_poll_interval_ms = 10000
[kafka.topics]
flows = "{t.flows}"
dlq = "{t.dlq}"
alerts = "{t.alerts}"
enforcement = "{t.enforcement}"
[store]
dsn = "{cfg.store_dsn}"
database = "{cfg.store.database}"
[detect]
idle_flush_ms = 1500
checkpoint_interval_ms = 500
poll_messages = 4
exemptions_csv = "{exemptions}"
[metrics]
listen = ""  # the default metrics port may be taken by another run
""")
    return path


def _progress(cfg, ends: dict[int, int]) -> int:
    c = Consumer(consumer_settings(cfg))
    try:
        got = c.committed([TopicPartition(cfg.kafka.topics.flows, p) for p in ends], timeout=10)
    finally:
        c.close()
    return sum(max(tp.offset, 0) for tp in got)


def test_sigkill_and_restart_loses_and_duplicates_nothing(cfg, tmp_path):
    scen = scenario.generate(61, instances=120, duration_s=50 * 60)
    paths = scenario.write(scen, tmp_path / "scen")
    ensure_topics(cfg)
    from conftest import replace

    # small messages, so the detector is still working when it is killed
    stats = Collector(replace(cfg, kafka={"records_per_message": 40})).run([str(paths["flows"])], "aws-vpc")
    # the end of each partition as read (a broker's high watermark may lag the last record batch)
    ends = {p: 0 for p in range(cfg.kafka.partitions)}
    c = Consumer(consumer_settings(cfg, group_id="probe"))
    try:
        read_partitions(c, [TopicPartition(cfg.kafka.topics.flows, p, OFFSET_BEGINNING) for p in ends],
                        lambda m: ends.__setitem__(m.partition(), max(ends[m.partition()], m.offset() + 1)))
    finally:
        c.close()
    total = sum(ends.values())
    conf = _config_file(cfg, tmp_path / "smtpguard.toml", paths["exemptions"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    kills = 0
    rng = random.Random(61)
    # kill at three random points while the detector is working, then let a last run finish
    for _ in range(KILLS):
        proc = subprocess.Popen([SMTPGUARD, "--config", str(conf), "detect"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_progress = _progress(cfg, ends)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _progress(cfg, ends) <= start_progress:
            time.sleep(0.3)
        time.sleep(rng.uniform(0, 1.0))  # somewhere between two commits
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        kills += 1
    assert _progress(cfg, ends) < total, f"the scenario finished before the detector could be killed ({total} messages)"
    proc = subprocess.Popen([SMTPGUARD, "--config", str(conf), "detect"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and _progress(cfg, ends) < total:
        time.sleep(0.5)
    time.sleep(4)  # idle flush of the last windows, then a checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert kills == KILLS

    with Store(cfg.store_dsn, cfg.store.database) as store:
        streamed = store.list_alerts(limit=100_000)
        rows = store.query(f"SELECT count(), uniqExact(alert_id) FROM {cfg.store.database}.alerts FINAL")
        flows = store.query(f"SELECT count() FROM {cfg.store.database}.flows FINAL")[0][0]
        states = store.query(f"SELECT count() FROM {cfg.store.database}.detector_state FINAL")[0][0]
    offline = analyze(cfg, [str(paths["flows"])], "aws-vpc", Exemptions.from_csv(paths["exemptions"]))
    assert rows[0][0] == rows[0][1]  # no alert id twice
    assert flows == stats.kept  # every record stored once
    assert states >= 1
    flagged = {a["src_ip"] for a in streamed if a["severity"] in ("medium", "high", "critical")}
    assert {a.ip for a in scen.abusive} <= flagged
    # both directions: the same medium-or-higher alerts (ids, windows, severities) as an uninterrupted
    # offline run, nothing missing and nothing extra
    want = {(a.alert_id, a.src_ip, a.detector, a.window_start, a.severity) for a in offline.raised()
            if a.severity in ("medium", "high", "critical")}
    got = {(a["alert_id"], a["src_ip"], a["detector"], a["window_start"].strftime("%Y-%m-%dT%H:%M:%SZ"), a["severity"])
           for a in streamed if a["severity"] in ("medium", "high", "critical")}
    assert got == want, {"missing": sorted(want - got), "extra": sorted(got - want)}

    # on the alerts topic: every raised alert exactly once
    raised = {a["alert_id"] for a in streamed}
    published = [from_json(m.value()).alert_id for m in read_topic(cfg, cfg.kafka.topics.alerts, len(raised))]
    assert sorted(published) == sorted(raised)
