"""Prometheus metrics on real components: the collector and the detector against the Tansu broker
and chdb, the `collect` and `detect` commands as processes, DNSBL lookups against rbldnsd, the
webhook against a real HTTP receiver, and the console's /metrics route. Every endpoint is read
over HTTP and parsed with prometheus_client's own parser.

Counters belong to the process and other tests in it count too, so in-process tests compare
a scrape before with a scrape after.
"""

from __future__ import annotations

import collections
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpguard.response import dnsbl
from smtpguard.core import metrics
from smtpguard.lab import scenario
from smtpguard.detectors.runner import DetectorRunner
from smtpguard.core.exemptions import Exemptions
from smtpguard.ingest.collector import Collector
from smtpguard.core.kafka import ensure_topics, free_port
from smtpguard.lab.rbldnsd import Dataset, Rbldnsd
from smtpguard.core.store import Store

from conftest import replace

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))
BAD_LINES = ["this is not a flow record",
             "3 688010969201 eni-0a 999.1.1.1 10.0.0.1 40000 25 6 3 180 1710230400 1710230401 ACCEPT OK i-1 2",
             "3 1 2 3"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def series(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    want = set(labels.items())
    return {ls: v for (n, ls), v in samples.items() if n == name and want <= set(ls)}


class Delta:
    def __init__(self, before: Samples, after: Samples):
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return get(self.after, name, **labels) - get(self.before, name, **labels)


@pytest.fixture(scope="module")
def endpoint():
    ep = metrics.serve("127.0.0.1:0")
    yield ep
    ep.close()


@pytest.fixture(scope="module")
def flow_file(tmp_path_factory):
    """A generated cloud's AWS VPC flow log with abuse in it, plus three lines that cannot be parsed."""
    out = tmp_path_factory.mktemp("metrics-scen")
    scen = scenario.generate(23, instances=80, duration_s=40 * 60)
    paths = scenario.write(scen, out)
    with open(paths["flows"], "a") as fh:
        fh.write("\n".join(BAD_LINES) + "\n")
    lines = sum(1 for _ in open(paths["flows"]))
    return paths, lines


def wait_for(what: str, check, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.3)


def test_collector_and_detector_metrics_match_the_input_and_the_store(cfg, flow_file, endpoint):
    paths, lines = flow_file
    cfg = replace(cfg, metrics={"lag_interval_ms": 300})
    topic = cfg.kafka.topics.flows
    ensure_topics(cfg)
    before = scrape(endpoint.url)
    stats = Collector(cfg).run([str(paths["flows"])], "aws-vpc")
    collected = scrape(endpoint.url)
    d = Delta(before, collected)
    assert d("smtpguard_collector_input_records_total") == lines == stats.read
    kept, skipped = d("smtpguard_collector_kept_records_total"), d("smtpguard_collector_skipped_records_total")
    dead = d("smtpguard_dead_letters_total")
    assert kept == stats.kept > 1000 and skipped == stats.skipped
    assert dead == d("smtpguard_dead_letters_total", format="aws-vpc") == len(BAD_LINES) == stats.dead_lettered
    assert kept + skipped + dead == lines
    assert d("smtpguard_collector_delivery_errors_total") == 0
    assert get(collected, "smtpguard_collector_queue_messages") == 0  # all acknowledged after the flush

    with Store(cfg.store_dsn, cfg.store.database) as store:
        started = time.time()
        stop = threading.Event()
        runner = DetectorRunner(cfg, store, Exemptions.from_csv(paths["exemptions"]), stop=stop)
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        try:
            def caught_up() -> Samples | None:
                s = scrape(endpoint.url)
                lag = series(s, "smtpguard_consumer_lag_messages", topic=topic)
                done = (runner.stats.records >= stats.kept and runner.open_rows == 0
                        and len(lag) == cfg.kafka.partitions and all(v == 0 for v in lag.values()))
                return s if done else None

            live = wait_for("the detector catching up, with consumer lag 0 on every partition", caught_up)
            seen_at = time.time()
        finally:
            stop.set()
            th.join(30)
        after = scrape(endpoint.url)
        db = cfg.store.database
        newest = dict(store.query(f"SELECT kafka_partition, toUnixTimestamp64Milli(max(`start`)) FROM {db}.flows "
                                  "GROUP BY kafka_partition"))
        stored = collections.Counter()
        for sev, suppressed, n in store.query(f"SELECT severity, suppressed != '', count() FROM {db}.alerts FINAL "
                                              "GROUP BY severity, suppressed != ''"):
            stored[sev, "suppressed" if suppressed else "raised"] += n
        flows, windows = store.count("flows"), store.count("window_features")

    # window lag = wall clock - (newest event time - allowed lateness), per partition, in seconds
    lateness_ms = cfg.detect.allowed_lateness_ms
    window_lag = series(live, "smtpguard_window_lag_seconds", topic=topic)
    assert {dict(ls)["partition"] for ls in window_lag} == {str(p) for p in newest}
    for ls, lag in window_lag.items():
        watermark_s = (newest[int(dict(ls)["partition"])] - lateness_ms) / 1000
        assert started - watermark_s <= lag <= seen_at - watermark_s
    # a stopped detector reports no partitions
    assert not series(after, "smtpguard_consumer_lag_messages", topic=topic)
    assert not series(after, "smtpguard_window_lag_seconds", topic=topic)

    d = Delta(collected, after)
    assert d("smtpguard_detector_records_total") == stats.kept == flows
    assert d("smtpguard_detector_messages_total") == runner.stats.messages > 0
    assert d("smtpguard_detector_windows_total") == runner.stats.windows == windows > 0
    assert d("smtpguard_detector_commits_total") == runner.stats.commits >= 1
    counted = collections.Counter({(sev, outcome): d("smtpguard_alerts_total", severity=sev, outcome=outcome)
                                   for sev in ("info", "low", "medium", "high", "critical")
                                   for outcome in ("raised", "suppressed")})
    assert +counted == +stored
    assert sum(n for (_, outcome), n in stored.items() if outcome == "raised") == runner.stats.alerts_raised > 0
    for table in ("flows", "window_features", "alerts", "detector_state"):
        assert d("smtpguard_store_write_seconds_count", table=table) > 0, table
        assert d("smtpguard_store_write_seconds_sum", table=table) > 0, table
    assert d("smtpguard_store_write_failures_total") == 0
    assert get(after, "smtpguard_build_info", version=metrics._version()) == 1


def test_template_misses_are_counted_as_dead_letters_of_their_format(cfg, shared_data, endpoint):
    data = shared_data / "netflow" / "logstash-codec-netflow" / "ipfix_test_netscaler_data.dat"
    ensure_topics(cfg)
    before = scrape(endpoint.url)
    stats = Collector(cfg).run([str(data)], "netflow-dat")  # data sets whose templates never come
    d = Delta(before, scrape(endpoint.url))
    assert stats.dead_lettered == 4
    assert d("smtpguard_netflow_template_misses_total") == d("smtpguard_netflow_template_misses_total",
                                                             format="ipfix") == 4
    assert d("smtpguard_dead_letters_total", format="ipfix") == 4


def _env(cfg) -> dict[str, str]:
    t = cfg.kafka.topics
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    env.update({"SMTPGUARD_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers, "SMTPGUARD_KAFKA__GROUP_ID":
                cfg.kafka.group_id, "SMTPGUARD_KAFKA__TOPICS__FLOWS": t.flows, "SMTPGUARD_KAFKA__TOPICS__DLQ": t.dlq,
                "SMTPGUARD_KAFKA__TOPICS__ALERTS": t.alerts, "SMTPGUARD_KAFKA__TOPICS__ENFORCEMENT": t.enforcement,
                "SMTPGUARD_DNSBL__CHECK_ALERTS_FROM": "off"})
    return env


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_detect_command_serves_metrics_and_its_lag_reaches_zero(cfg, tmp_path):
    scen = scenario.generate(5, instances=40, duration_s=20 * 60)
    paths = scenario.write(scen, tmp_path / "scen")
    ensure_topics(cfg)
    stats = Collector(cfg).run([str(paths["flows"])], "aws-vpc")
    port = free_port()
    env = _env(cfg) | {"SMTPGUARD_METRICS__LAG_INTERVAL_MS": "300"}
    proc = subprocess.Popen([SMTPGUARD, "--data-dir", str(tmp_path / "data"), "--store",
                             f"chdb://{tmp_path / 'store'}", "detect", "--metrics", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        def caught_up() -> Samples | None:
            if proc.poll() is not None:
                pytest.fail(f"detect exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                s = scrape(url)
            except (urllib.error.URLError, ConnectionError):
                return None  # not listening yet
            lag = series(s, "smtpguard_consumer_lag_messages", topic=cfg.kafka.topics.flows)
            done = (get(s, "smtpguard_detector_records_total") == stats.kept and len(lag) == cfg.kafka.partitions
                    and all(v == 0 for v in lag.values()))
            return s if done else None

        s = wait_for("detect consuming every record with consumer lag 0", caught_up)
    finally:
        err = _stop(proc)
    # a fresh process: the counters are this run's alone
    assert get(s, "smtpguard_detector_records_total") == stats.kept
    assert get(s, "smtpguard_store_write_seconds_count", table="flows") >= 1
    assert get(s, "smtpguard_build_info", version=metrics._version()) == 1
    assert get(s, "process_resident_memory_bytes") > 0
    assert f"consumed {stats.kept:,} records" in err


def test_collect_command_serves_metrics_while_it_listens(cfg, shared_data):
    ensure_topics(cfg)
    udp, port = free_port(), free_port()
    env = _env(cfg) | {"SMTPGUARD_INGEST__SMTP_PORTS": "[25, 123]"}
    proc = subprocess.Popen([SMTPGUARD, "collect", "netflow", "--listen", f"127.0.0.1:{udp}",
                             "--metrics", f"127.0.0.1:{port}"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in proc.stderr.readline()
        payload = (shared_data / "netflow/logstash-codec-netflow/netflow9_test_valid01.dat").read_bytes()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(payload, ("127.0.0.1", udp))
            s.sendto(b"\x00\x09garbage", ("127.0.0.1", udp))

        def counted() -> Samples | None:
            s = scrape(f"http://127.0.0.1:{port}/metrics")
            return s if get(s, "smtpguard_collector_kept_records_total") == 6 and \
                get(s, "smtpguard_dead_letters_total") >= 1 else None

        s = wait_for("the collector counting the six flows and the bad datagram", counted, timeout_s=60)
    finally:
        _stop(proc)
    # every input unit is kept, skipped or dead-lettered
    assert get(s, "smtpguard_collector_input_records_total") == sum(
        get(s, name) for name in ("smtpguard_collector_kept_records_total", "smtpguard_collector_skipped_records_total",
                                  "smtpguard_dead_letters_total"))
    assert get(s, "smtpguard_collector_delivery_errors_total") == 0


# -- DNSBL --------------------------------------------------------------------------------------------------
ZEN = msgspec.structs.replace(next(z for z in dnsbl.CATALOGUE if z.name == "spamhaus-zen"), name="metrics-zen",
                              zone="zen.metrics.test")
UNSERVED = dnsbl.Zone("metrics-unserved", "unserved.metrics.test", {"127.0.0.2": dnsbl.Code("listed")})


def test_dnsbl_lookups_are_counted_by_zone_and_answer(tmp_path, endpoint):
    srv = Rbldnsd(tmp_path, [Dataset("zen.metrics.test", "ip4set", [
        ":127.0.0.2:Listed $", "192.0.2.1", "192.0.2.10 :127.0.0.10:Dynamic range"])])
    srv.start()
    try:
        checker = dnsbl.Checker(dnsbl.DnsblConfig(resolvers=[srv.resolver], zones=[ZEN, UNSERVED],
                                                  default_zones=["metrics-zen"], timeout_ms=2000))
        ips = ["192.0.2.1", "192.0.2.10", "203.0.113.7"]
        before = scrape(endpoint.url)
        first = dnsbl.check_sync(ips, ["metrics-zen", "metrics-unserved"], checker=checker)
        mid = scrape(endpoint.url)
        again = dnsbl.check_sync(ips, ["metrics-zen", "metrics-unserved"], checker=checker)
        after = scrape(endpoint.url)
    finally:
        srv.stop()
    d = Delta(before, mid)
    assert {(r.ip, r.zone): r.status for r in first if r.zone == "metrics-zen"} == {
        ("192.0.2.1", "metrics-zen"): "listed", ("192.0.2.10", "metrics-zen"): "policy",
        ("203.0.113.7", "metrics-zen"): "not_listed"}
    for (zone, status), n in collections.Counter((r.zone, r.status) for r in first).items():
        assert d("smtpguard_dnsbl_lookups_total", zone=zone, status=status) == n, (zone, status)
    assert d("smtpguard_dnsbl_lookups_total") == len(first) == 6
    errors = collections.Counter((r.zone, r.error) for r in first if r.error)
    assert errors == {("metrics-unserved", "refused"): 3}
    assert d("smtpguard_dnsbl_errors_total", zone="metrics-unserved", kind="refused") == 3
    assert d("smtpguard_dnsbl_errors_total") == 3
    assert d("smtpguard_dnsbl_cache_hits_total") == 0
    # answers are cached for their TTL, failures are not
    d = Delta(mid, after)
    assert d("smtpguard_dnsbl_cache_hits_total", zone="metrics-zen") == sum(r.cached for r in again) == 3
    assert d("smtpguard_dnsbl_cache_hits_total", zone="metrics-unserved") == 0


# -- enforcement ------------------------------------------------------------------------------------------
class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_enforcement_deliveries_and_webhook_dead_letters_are_counted(cfg, endpoint):
    from smtpguard.core.config import WebhookConfig
    from smtpguard.response.enforce import EnforcementEvent, KafkaOutput, encode
    from smtpguard.response.webhook import DEAD_LETTER_TABLE, WebhookSender

    events = [EnforcementEvent(ip=f"198.51.100.{i}", action="deny", tenant="t", reason="test", alert_ids=[],
                               event_id=f"e{i}", at="2026-01-01T00:00:00.000Z", kind="revoked", actor="test",
                               decided_by=None) for i in range(3)]
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    closed = free_port()  # nothing listens here: the connection is refused
    before = scrape(endpoint.url)
    try:
        KafkaOutput(cfg).publish(events)
        with Store(cfg.store_dsn, cfg.store.database) as store:
            ok = WebhookSender(WebhookConfig(url=f"http://127.0.0.1:{receiver.server_port}/hook", secret="s"), store)
            delivered = [ok.send(encode(e), event_id=e.event_id, ip=e.ip).delivered for e in events]
            dead = WebhookSender(WebhookConfig(url=f"http://127.0.0.1:{closed}/hook", secret="s", max_attempts=2,
                                               backoff_initial_ms=10), store)
            failed = dead.send(encode(events[0]), event_id="e0", ip=events[0].ip)
            stored_dead = store.count(DEAD_LETTER_TABLE)
    finally:
        receiver.shutdown()
        receiver.server_close()
    d = Delta(before, scrape(endpoint.url))
    assert delivered == [True] * 3 and not failed.delivered and failed.attempts == 2
    assert d("smtpguard_enforcement_events_total", output="kafka") == 3
    assert d("smtpguard_enforcement_events_total", output="webhook") == 3
    assert d("smtpguard_webhook_dead_letters_total") == stored_dead == 1


# -- console ------------------------------------------------------------------------------------------------
def _console(cfg, store):
    from smtpguard.console.app import create_app
    from smtpguard.console.server import ConsoleServer

    return ConsoleServer(create_app(cfg, store), "127.0.0.1", 0)


def test_console_serves_metrics_with_request_counts_by_route(offline_cfg, chdb_dir):
    cfg = replace(offline_cfg, store={"dsn": f"chdb://{chdb_dir}"})
    with Store(cfg.store_dsn, cfg.store.database) as store, _console(cfg, store) as console:
        before = scrape(console.url + "/metrics")
        got = [_status(console.url + path) for path in ("/login", "/login", "/alerts/some-alert-id", "/no-such-page")]
        d = Delta(before, scrape(console.url + "/metrics"))
    assert got == [200, 200, 303, 404]
    assert d("smtpguard_console_requests_total", method="GET", route="/login", status="200") == 2
    # a route template, never the path: one series however many alerts are opened
    assert d("smtpguard_console_requests_total", route="/alerts/{alert_id}") == 1
    assert d("smtpguard_console_requests_total", route="other", status="404") == 1
    assert d("smtpguard_console_requests_total", route="/metrics", status="200") == 1  # the first scrape


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(urllib.request.Request(url, headers=headers or {}),
                                                          timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_console_metrics_need_a_login_when_not_public(offline_cfg, chdb_dir):
    from smtpguard.console.auth import ApiTokens, Users

    cfg = replace(offline_cfg, store={"dsn": f"chdb://{chdb_dir}"}, metrics={"console_public": False})
    with Store(cfg.store_dsn, cfg.store.database) as store:
        user = Users(store).add("prometheus", "viewer", "a long enough password", "test")
        token = ApiTokens(store).issue(user, "scraper")
        with _console(cfg, store) as console:
            assert _status(console.url + "/metrics") == 401
            assert _status(console.url + "/metrics", {"Authorization": "Bearer sgc_wrong"}) == 401
            assert _status(console.url + "/metrics", {"Authorization": f"Bearer {token}"}) == 200


# -- command line -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["collect", "aws-vpc", "flows.log"], ["detect"], ["serve"]])
def test_a_bad_metrics_address_is_one_line_and_exit_status_2(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    r = subprocess.run([SMTPGUARD, "--data-dir", str(tmp_path), *args, "--metrics", "nonsense"], env=env,
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "metrics.listen" in r.stderr and "'nonsense' is not HOST:PORT" in r.stderr


def test_a_taken_metrics_port_is_one_line_naming_the_way_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([SMTPGUARD, "--data-dir", str(tmp_path), "detect", "--metrics", f"127.0.0.1:{port}"],
                           env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr
    assert "--metrics HOST:PORT" in r.stderr


def test_an_empty_address_serves_no_metrics():
    assert metrics.serve("") is None
