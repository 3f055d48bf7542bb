"""The response service on its own consumer group: a webhook that hangs holds up neither the detector
nor the response's decisions, and a response killed (SIGKILL) at random points acts on every alert once.

Real parts: the Tansu broker and chdb store of the fixtures, an HTTP server for the webhook, the
`smtpguard respond` command as a process.
"""

from __future__ import annotations

import collections
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import replace
from smtpguard.core.kafka import ensure_topics
from smtpguard.core.registry import Registry
from smtpguard.core.store import Store
from smtpguard.ingest.collector import Collector
from smtpguard.lab import scenario
from smtpguard.response.outbox import OUTBOX
from test_streaming import read_topic, run_detector_until_idle

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))
REVOKE_ALL = {"info": "notify", "low": "notify", "medium": "revoke", "high": "revoke", "critical": "revoke"}
ABUSE = ("spam_exempted_new", "flood", "volume_spike", "spam_burst", "flood", "spam_exempted_new")


class Hook:
    """A webhook receiver (enforcement events, or the SIEM's findings) that hangs every request while
    ``hanging`` is set (up to 60 s)."""

    def __init__(self) -> None:
        self.hanging = threading.Event()
        self.delay_s = 0.0
        self.requests: list[tuple[str, str, dict]] = []
        """(event id, ip, body) of every request"""
        self.raw: list[tuple[dict, bytes]] = []
        """(headers, body) of every request, as they came"""
        self.lock = threading.Lock()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                deadline = time.monotonic() + 60
                while hook.hanging.is_set() and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(hook.delay_s)
                with hook.lock:
                    hook.raw.append((dict(self.headers), body))
                    hook.requests.append((self.headers["X-Smtpguard-Event-Id"], json.loads(body).get("ip"),
                                          json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/enforcement"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.hanging.clear()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def _scenario(tmp_path, seed: int):
    scen = scenario.generate(seed, instances=120, duration_s=95 * 60, abuse=ABUSE)
    return scen, scenario.write(scen, tmp_path / "scen")


def _revocations(reg: Registry) -> collections.Counter:
    return collections.Counter(e.ip for e in reg.events() if e.kind == "revoked")


def test_a_hanging_webhook_delays_neither_the_detector_nor_the_decisions(cfg, hook, tmp_path):
    from smtpguard.response.service import Responder

    scen, paths = _scenario(tmp_path, 83)
    cfg = replace(cfg, response={"actions": REVOKE_ALL, "webhook": {
        "url": hook.url, "secret": "s3cret", "timeout_ms": 70_000, "max_attempts": 2}},
                  dnsbl={"check_alerts_from": "off"})
    ensure_topics(cfg)
    hook.hanging.set()
    kept = Collector(cfg).run([str(paths["flows"])], "aws-vpc").kept
    with Store(cfg.store_dsn, cfg.store.database) as store:
        Registry(store).import_csv(paths["exemptions"], actor="import")
        stop = threading.Event()
        responder = Responder(cfg, store, stop, lookups=False)
        th = threading.Thread(target=responder.run, daemon=True)
        th.start()
        try:
            t0 = time.monotonic()
            runner = run_detector_until_idle(cfg, store, None, kept, timeout_s=120)
            detector_s = time.monotonic() - t0
            assert runner.stats.commits > 0 and runner.stats.alerts_raised > 0
            deadline = time.monotonic() + 60
            while responder.stats.alerts < runner.stats.alerts_raised and time.monotonic() < deadline:
                time.sleep(0.2)
            decided_s = time.monotonic() - t0
            # every alert is decided and every revocation written while the webhook still hangs
            assert responder.stats.alerts == runner.stats.alerts_raised
            assert responder.stats.decisions.get("revoke", 0) > 0
            revoked = _revocations(Registry(store))
            assert revoked and max(revoked.values()) == 1
            owed = responder.outbox.pending()
            assert owed and hook.hanging.is_set() and decided_s < 60, (detector_s, decided_s)
            assert len(hook.requests) == 0
            # the endpoint answers again: the response catches up
            hook.hanging.clear()
            assert responder.deliverer.wait_idle(90)
        finally:
            stop.set()
            th.join(30)
        delivered = {(eid, ip) for eid, ip, _ in hook.requests}
        rows = store.query(f"SELECT event_id, ip FROM {store.database}.{OUTBOX.table} FINAL")
        assert delivered == {(r[0], r[1]) for r in rows} and len(hook.requests) == len(delivered)
        on_topic = read_topic(cfg, cfg.kafka.topics.enforcement, len(rows))
        revoke_events = [json.loads(m.value()) for m in on_topic if json.loads(m.value())["kind"] == "revoked"]
        assert sorted(e["ip"] for e in revoke_events) == sorted(revoked)


def test_a_response_killed_at_random_points_acts_on_every_alert_once(cfg, hook, tmp_path):
    scen, paths = _scenario(tmp_path, 89)
    # a short cooldown: many alerts, so the kills land while work is left; a webhook that takes its time
    cfg = replace(cfg, response={"actions": REVOKE_ALL, "poll_alerts": 1,
                                 "webhook": {"url": hook.url, "secret": "s3cret"}},
                  dnsbl={"check_alerts_from": "off"}, detect={"cooldown_ms": 60_000})
    hook.delay_s = 0.05
    ensure_topics(cfg)
    kept = Collector(cfg).run([str(paths["flows"])], "aws-vpc").kept
    with Store(cfg.store_dsn, cfg.store.database) as store:
        Registry(store).import_csv(paths["exemptions"], actor="import")
        runner = run_detector_until_idle(cfg, store, None, kept, timeout_s=120)
    raised = runner.stats.alerts_raised
    assert raised >= 100
    conf = tmp_path / "respond.toml"
    conf.write_text(_toml(cfg))
    env = {**os.environ, "SMTPGUARD_CONFIG": str(conf)}
    rng = random.Random(int(os.environ.get("TEST_SEED", "7")))
    soak = int(os.environ.get("TEST_SOAK", "1"))
    ends = _ends(cfg, cfg.kafka.topics.alerts)
    assert sum(ends.values()) == raised
    kills = 0
    for _ in range(3 * soak):
        proc = subprocess.Popen([SMTPGUARD, "respond", "--metrics", ""], env=env, stderr=subprocess.PIPE, text=True)
        start = _committed(cfg, ends)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _committed(cfg, ends) <= start:
            time.sleep(0.3)
        time.sleep(rng.uniform(0, 1.0))  # somewhere between two commits, deliveries under way
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
    assert _committed(cfg, ends) < raised, "the response finished before it could be killed"
    # a last run to the end: every alert committed, nothing owed
    port = _free_port()
    proc = subprocess.Popen([SMTPGUARD, "respond", "--metrics", f"127.0.0.1:{port}"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        quiet = 0
        while time.monotonic() < deadline:
            time.sleep(1)
            # nothing owed at two passes in a row of the deliverer (it passes every 0.5 s)
            quiet = quiet + 1 if _committed(cfg, ends) >= raised and _owed(port) == 0 else 0
            if quiet >= 2:
                break
        else:
            raise AssertionError("the response did not finish")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err

    with Store(cfg.store_dsn, cfg.store.database) as store:
        db = store.database
        decisions = store.query(f"SELECT alert_id, count() FROM {db}.response_decisions GROUP BY alert_id")
        revoked = _revocations(Registry(store))
        owed = store.query(f"SELECT event_id, ip FROM {db}.{OUTBOX.table} FINAL")
    ids = {json.loads(m.value())["alert_id"] for m in read_topic(cfg, cfg.kafka.topics.alerts, raised)
           if json.loads(m.value())["severity"] in ("medium", "high", "critical")}
    # every medium+ alert decided once, every address revoked once
    assert {d[0] for d in decisions} == ids and all(d[1] == 1 for d in decisions), kills
    assert revoked and max(revoked.values()) == 1
    # every owed enforcement event on the topic once, and at the webhook (deduplicated by event id, as the
    # receiver is told to: a request that succeeded just before a kill, unmarked, is sent again)
    events = [json.loads(m.value()) for m in read_topic(cfg, cfg.kafka.topics.enforcement, len(owed))]
    per_event = collections.Counter((e["event_id"], e["ip"]) for e in events)
    assert set(per_event) >= {(r[0], r[1]) for r in owed} and max(per_event.values()) == 1
    received = collections.Counter((eid, ip) for eid, ip, _ in hook.requests)
    assert set(received) == {(r[0], r[1]) for r in owed}
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= kills, received


def _ends(cfg, topic: str) -> dict[int, int]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from smtpguard.core.kafka import consumer_settings, partitions_of, read_partitions

    ends = {p: 0 for p in range(partitions_of(cfg, topic))}
    c = Consumer(consumer_settings(cfg, group_id="probe-ends"))
    try:
        read_partitions(c, [TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends],
                        lambda m: ends.__setitem__(m.partition(), max(ends[m.partition()], m.offset() + 1)))
    finally:
        c.close()
    return ends


def _committed(cfg, ends: dict[int, int]) -> int:
    """Alerts the response group has committed (its progress)."""
    from confluent_kafka import Consumer, TopicPartition

    from smtpguard.core.kafka import consumer_settings

    c = Consumer(consumer_settings(cfg, group_id=cfg.kafka.response_group_id))
    try:
        got = c.committed([TopicPartition(cfg.kafka.topics.alerts, p) for p in ends], timeout=10)
    finally:
        c.close()
    return sum(max(tp.offset, 0) for tp in got)


def _owed(port: int) -> float:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith("smtpguard_enforcement_outbox_pending "):
            return float(line.split()[1])
    return -1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(cfg) -> str:
    t = cfg.kafka.topics
    hook = cfg.response.webhook
    actions = ", ".join(f'{k} = "{v}"' for k, v in cfg.response.actions.items())
    return f"""data_dir = "{cfg.data_dir}"
[kafka]
bootstrap_servers = "{cfg.kafka.bootstrap_servers}"
group_id = "{cfg.kafka.group_id}"
response_group_id = "{cfg.kafka.response_group_id}"
session_timeout_ms = 6000
max_poll_interval_ms = 20000
[kafka.topics]
flows = "{t.flows}"
dlq = "{t.dlq}"
alerts = "{t.alerts}"
enforcement = "{t.enforcement}"
[store]
dsn = "{cfg.store.dsn}"
database = "{cfg.store.database}"
[response]
actions = {{ {actions} }}
poll_alerts = {cfg.response.poll_alerts}
[response.webhook]
url = "{hook.url}"
secret = "{hook.secret}"
[dnsbl]
check_alerts_from = "off"
"""
