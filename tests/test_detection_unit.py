"""Pure unit tests of windows, features, detectors and alert gating (no services)."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from smtpguard.core import record
from smtpguard.detectors.alerts import AlertGate, severity_of
from smtpguard.core.alert import alert_id
from smtpguard.detectors.features import BASE_FEATURES, window_features
from smtpguard.detectors.pipeline import Pipeline
from smtpguard.detectors.rules import build_detectors
from smtpguard.detectors.windows import WindowEngine
from smtpguard.core.errors import ConfigError
from smtpguard.core.exemptions import Exemption, Exemptions

T0 = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.timezone.utc)


def flows(src: str, n: int, *, minute: int = 0, dsts: int | None = None, action: str = "accept",
          port: int = 25, nbytes: int = 5000, packets: int = 12, second: int = 0) -> list[dict]:
    dsts = dsts or n
    out = []
    for i in range(n):
        start = T0 + dt.timedelta(minutes=minute, seconds=(second + i) % 60)
        out.append(dict(start=start, end=start + dt.timedelta(seconds=2), src_ip=src,
                        dst_ip=f"198.51.{(i % dsts) // 5}.{10 + (i % dsts) % 5}", src_port=40000 + i,
                        dst_port=port, protocol=6, packets=packets, bytes=nbytes, action=action, tenant="111122223333"))
    return out


def table(rows: list[dict]):
    return record.from_dicts(rows)


def test_window_engine_closes_on_watermark_and_counts_late():
    eng = WindowEngine(window_ms=60_000, allowed_lateness_ms=60_000)
    eng.add(table(flows("10.0.0.1", 5, minute=0)), offset=1)
    assert eng.close_ready() is None  # watermark is behind the window end
    eng.add(table(flows("10.0.0.1", 5, minute=2, second=30)), offset=2)
    closed = eng.close_ready()
    assert closed is not None and closed.height == 5
    assert set(closed["window_start"].to_list()) == {int(T0.timestamp() * 1000)}
    assert eng.safe_offset() == 2
    late = eng.add(table(flows("10.0.0.1", 3, minute=0)), offset=3)
    assert late == 3 and eng.late.records == 3 and eng.late.max_delay_ms > 120_000 - 1000
    forced = eng.close_ready(force=True)
    assert forced.height == 5 and eng.open_rows == 0 and eng.safe_offset() is None


def test_window_engine_rejects_bad_parameters():
    with pytest.raises(ValueError):
        WindowEngine(window_ms=0, allowed_lateness_ms=0)


def test_features_fanout_concentration_and_actions():
    rows = flows("10.0.0.1", 40, dsts=40) + flows("10.0.0.2", 30, dsts=1, action="reject", nbytes=60, packets=1)
    eng = WindowEngine(60_000, 0)
    eng.add(table(rows))
    feats = window_features(eng.close_ready(force=True), 60_000)
    assert tuple(feats.columns) == tuple(f.name for f in BASE_FEATURES)
    a = feats.filter(pl.col("src_ip") == "10.0.0.1").row(0, named=True)
    b = feats.filter(pl.col("src_ip") == "10.0.0.2").row(0, named=True)
    assert a["connections"] == 40 and a["distinct_dst"] == 40 and a["accepted"] == 40 and a["rejected"] == 0
    assert a["distinct_dst24"] < a["distinct_dst"]
    assert a["bytes_per_conn"] == 5000 and a["port25"] == 40
    assert b["distinct_dst"] == 1 and b["top_dst_share"] == 1.0 and b["rejected_port25"] == 30
    assert b["low_byte_conns"] == 30


def test_severity_and_deterministic_ids():
    assert severity_of(0.95) == "critical" and severity_of(0.5) == "medium" and severity_of(0.1) == "info"
    assert alert_id("spam_fanout", "10.0.0.1", 1) == alert_id("spam_fanout", "10.0.0.1", 1)
    assert alert_id("spam_fanout", "10.0.0.1", 1) != alert_id("spam_fanout", "10.0.0.1", 60_000)


def _pipeline(offline_cfg, exemptions=None):
    return Pipeline(offline_cfg, exemptions)


def _alerts(pipe, rows):
    out = pipe.process(table(rows))
    out.extend(pipe.flush())
    return [a for a in out.alerts if not a.suppressed]


def test_spam_fanout_detected_with_numbers_in_reasons(offline_cfg):
    alerts = _alerts(_pipeline(offline_cfg), flows("10.0.0.9", 150, dsts=150, action="reject", nbytes=120, packets=2))
    fan = [a for a in alerts if a.detector == "spam_fanout"]
    assert len(fan) == 1 and fan[0].src_ip == "10.0.0.9"
    assert fan[0].severity in ("high", "critical")
    assert "150 distinct mail servers" in fan[0].reasons[0]
    assert {a.detector for a in alerts} == {"spam_fanout", "blocked_attempts"}


def test_established_exempted_mail_server_is_normal_but_new_exemption_is_not(offline_cfg):
    rows = flows("10.0.0.5", 45, dsts=45)
    long_ago = int((T0 - dt.timedelta(days=90)).timestamp() * 1000)
    yesterday = int((T0 - dt.timedelta(hours=20)).timestamp() * 1000)
    import ipaddress

    old = Exemptions([Exemption(ipaddress.ip_network("10.0.0.5/32"), "t", long_ago, "mail server")])
    new = Exemptions([Exemption(ipaddress.ip_network("10.0.0.0/24"), "t", yesterday, "new server")])
    assert _alerts(_pipeline(offline_cfg, old), rows) == []
    assert [a.detector for a in _alerts(_pipeline(offline_cfg, new), rows)] == ["spam_fanout"]


def test_flood_against_one_target(offline_cfg):
    rows = flows("10.0.0.7", 900, dsts=2, nbytes=80, packets=2)
    alerts = _alerts(_pipeline(offline_cfg), rows)
    assert [a.detector for a in alerts] == ["connection_flood"]
    assert "900 connections to 2 server(s)" in alerts[0].reasons[0]


def test_benign_submission_and_single_blocked_attempt_raise_nothing(offline_cfg):
    rows = flows("10.0.0.3", 6, dsts=2, port=587) + flows("10.0.0.4", 2, action="reject", nbytes=60, packets=1)
    assert _alerts(_pipeline(offline_cfg), rows) == []


def test_cooldown_suppresses_repeats_and_escalation_breaks_through(offline_cfg):
    pipe = _pipeline(offline_cfg)
    rows = (flows("10.0.0.8", 8, minute=0, action="reject", nbytes=60, packets=1)
            + flows("10.0.0.8", 8, minute=1, action="reject", nbytes=60, packets=1)
            + flows("10.0.0.8", 59, minute=2, dsts=40, action="reject", nbytes=60, packets=1))
    out = pipe.process(table(rows))
    out.extend(pipe.flush())
    blocked = [a for a in out.alerts if a.detector == "blocked_attempts"]
    assert [a.suppressed for a in blocked] == ["", "cooldown", ""]
    assert blocked[2].severity != blocked[0].severity


def test_alert_gate_orders_findings_and_ids_do_not_depend_on_arrival():
    from smtpguard.detectors.rules import Finding

    t = int(T0.timestamp() * 1000)
    found = [Finding("spam_fanout", "10.0.0.2", "t", t + 60_000, t + 120_000, 0.6, ["r"]),
             Finding("spam_fanout", "10.0.0.1", "t", t, t + 60_000, 0.6, ["r"]),
             Finding("tenant_spam", None, "t", t, t + 60_000, 0.6, ["r"])]
    a = AlertGate(cooldown_ms=600_000).admit(found)
    b = AlertGate(cooldown_ms=600_000).admit(list(reversed(found)))
    assert [x.alert_id for x in a] == [x.alert_id for x in b]
    assert [x.window_start for x in a] == sorted(x.window_start for x in a)
    assert a[-1].alert_id == alert_id("spam_fanout", "10.0.0.2", t + 60_000)
    assert any(x.alert_id == alert_id("tenant_spam", "tenant:t", t) for x in a)


def test_detector_parameters_are_validated():
    assert {d.name for d in build_detectors({})} == {"spam_fanout", "connection_flood", "blocked_attempts", "volume_spike",
                                                     "low_and_slow", "reject_storm", "tenant_spam", "anomaly_model"}
    with pytest.raises(ConfigError, match="unknown detector"):
        build_detectors({"nope": {}})
    with pytest.raises(ConfigError, match="spam_fanout"):
        build_detectors({"spam_fanout": {"min_distinct_dst": "many"}})
    with pytest.raises(ConfigError):
        build_detectors({"spam_fanout": {"no_such_param": 1}})


def test_incidents_group_a_sources_alerts_until_a_gap():
    from smtpguard.detectors.rules import Finding

    gate = AlertGate(cooldown_ms=60_000, incident_gap_ms=30 * 60_000)

    def f(minute, det="spam_fanout"):
        ws = int(T0.timestamp() * 1000) + minute * 60_000
        return Finding(det, "10.0.0.1", "t", ws, ws + 60_000, 0.8, ["r"])

    a = gate.admit([f(0), f(5, "blocked_attempts"), f(20)])
    b = gate.admit([f(90)])
    assert len({x.incident_id for x in a}) == 1 and a[0].incident_id
    assert b[0].incident_id != a[0].incident_id
    again = AlertGate(cooldown_ms=60_000).admit([f(0)])
    assert again[0].incident_id == a[0].incident_id  # deterministic across replays


# --- cold start, declared volumes, severity that says who acts, IPv6 by prefix ---------------------


def _exempt(ip: str, days: float, declared: float | None = None) -> Exemptions:
    import ipaddress

    granted = int((T0 - dt.timedelta(days=days)).timestamp() * 1000)
    return Exemptions([Exemption(ipaddress.ip_network(ip), "t", granted, "mail", declared)])


def test_an_established_sender_with_no_history_is_at_most_low_and_says_it_is_learning(offline_cfg):
    """An ESP exempted for months, 400 distinct servers in its very first minute: no medium alert."""
    rows = flows("10.0.0.20", 400, dsts=400)
    alerts = _alerts(_pipeline(offline_cfg, _exempt("10.0.0.20/32", 200)), rows)
    assert [(a.detector, a.severity) for a in alerts] == [("spam_fanout", "low")]
    assert any(r.startswith("learning: seen for 0 minutes") for r in alerts[0].reasons)
    assert "No action yet" in alerts[0].next_step
    # the same traffic from an instance without exemption, or a fresh one, is spam from the first minute
    for ex in (None, _exempt("10.0.0.20/32", 0.5)):
        got = _alerts(_pipeline(offline_cfg, ex), rows)
        assert ("spam_fanout", "critical") in [(a.detector, a.severity) for a in got]
        assert "revocation policy" in next(a for a in got if a.detector == "spam_fanout").next_step


def test_a_declared_volume_judges_a_sender_from_its_first_minute(offline_cfg):
    """Declared 300 connections a minute: 200 is its job, 600 is not, history or none."""
    ex = _exempt("10.0.0.21/32", 2, declared=300)
    assert _alerts(_pipeline(offline_cfg, ex), flows("10.0.0.21", 200, dsts=200)) == []
    got = _alerts(_pipeline(offline_cfg, ex), flows("10.0.0.21", 600, dsts=600))
    assert {(a.detector, a.severity) for a in got} == {("spam_fanout", "medium"), ("volume_spike", "medium")}
    assert any("declared volume 300" in r for a in got for r in a.reasons)
    assert "volume its exemption was granted for" in got[0].next_step


def test_blocked_attempts_to_few_servers_are_an_advisory_and_to_many_are_spam(offline_cfg):
    app = _alerts(_pipeline(offline_cfg), flows("10.0.0.30", 300, dsts=2, action="reject", nbytes=60, packets=1))
    assert [(a.detector, a.severity) for a in app] == [("blocked_attempts", "low")]
    assert "misconfigured application" in app[0].reasons[0] and "587 or 465" in app[0].next_step
    spam = _alerts(_pipeline(offline_cfg), flows("10.0.0.31", 30, dsts=12, action="reject", nbytes=60, packets=1))
    assert [(a.detector, a.severity) for a in spam] == [("blocked_attempts", "medium")]
    assert "spam attempts" in spam[0].reasons[0] and "no exemption to revoke" in spam[0].next_step
    # slow: two new servers a minute never reach 4 in one minute, but 10 new in 10 minutes is spam
    slow = []
    for m in range(8):
        slow += [dict(r, dst_ip=f"203.0.{m}.{i + 1}") for i, r in
                 enumerate(flows("10.0.0.32", 2, minute=m, action="reject", nbytes=60, packets=1))]
    got = _alerts(_pipeline(offline_cfg), slow)
    assert [(a.detector, a.severity) for a in got] == [("blocked_attempts", "medium")]
    assert got[0].window_start.endswith("12:04:00Z")


def test_a_flood_the_network_rejects_is_no_flood(offline_cfg):
    rejected = flows("10.0.0.33", 900, dsts=2, action="reject", nbytes=60, packets=1)
    assert [a.detector for a in _alerts(_pipeline(offline_cfg), rejected)] == ["blocked_attempts"]
    accepted = flows("10.0.0.33", 900, dsts=2, nbytes=60, packets=1, port=587)
    assert [a.detector for a in _alerts(_pipeline(offline_cfg), accepted)] == ["connection_flood"]


def test_ipv6_addresses_rotating_in_a_prefix_are_one_source(offline_cfg):
    """A new address of one /64 for every connection: judged as the /64, and the alert names it."""
    rows = [dict(r, src_ip=f"2001:db8:7:1::{i + 1:x}") for i, r in enumerate(flows("x", 120, dsts=120))]
    got = _alerts(_pipeline(offline_cfg), rows)
    fan = [a for a in got if a.detector == "spam_fanout"]
    assert len(fan) == 1 and fan[0].src_ip == "2001:db8:7:1::/64"
    assert any("120 addresses of 2001:db8:7:1::/64" in r for r in fan[0].reasons)
    assert fan[0].lookup_address in {f"2001:db8:7:1::{i + 1:x}" for i in range(120)}


def test_the_inventory_names_a_wider_prefix_and_fills_tenants(offline_cfg):
    """Rotation over the /64s of a delegated /56 is one source with the inventory, 256 without."""
    from smtpguard.core.inventory import Inventory

    rows = [dict(r, src_ip=f"2001:db8:9:{i % 256:x}::{i + 1:x}", tenant="")
            for i, r in enumerate(flows("x", 200, dsts=200))]
    inv = Inventory.from_rows([("2001:db8:9::/56", "acct-9", "i-0abc", "eni-0abc")])
    got = [a for a in _alerts(Pipeline(offline_cfg, inventory=inv), rows) if a.detector == "spam_fanout"]
    assert [(a.src_ip, a.tenant) for a in got] == [("2001:db8:9::/56", "acct-9")]
    assert [a for a in _alerts(Pipeline(offline_cfg), rows) if a.detector == "spam_fanout"] == []


def test_exemption_of_an_address_covers_its_prefix_key(offline_cfg):
    rows = [dict(r, src_ip="2001:db8:5:1::25") for r in flows("x", 45, dsts=45)]
    assert _alerts(_pipeline(offline_cfg, _exempt("2001:db8:5:1::25/128", 90)), rows) == []
    assert [a.detector for a in _alerts(_pipeline(offline_cfg), rows)] == ["spam_fanout"]
