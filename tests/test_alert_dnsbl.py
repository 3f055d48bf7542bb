"""Every new alert of medium or higher has its source looked up in the DNSBLs, and the answers
join the alert's evidence: streamed through Tansu and the detector, answered by a real rbldnsd."""

from __future__ import annotations

import json
import types

import pytest
from click.testing import CliRunner

from conftest import replace
from smtpguard.lab import scenario
from smtpguard.cli.main import Ctx, alerts_show
from smtpguard.console.queries import stored_dnsbl
from smtpguard.response.dnsbl import Code, Zone
from smtpguard.core.exemptions import Exemptions
from smtpguard.ingest.collector import Collector
from smtpguard.core.kafka import ensure_topics
from smtpguard.lab.rbldnsd import Dataset, Rbldnsd
from smtpguard.response.lookups import ACTOR, AlertLookups
from smtpguard.core.store import SEVERITIES, Store
from test_streaming import run_detector_until_idle, run_responder_until_idle

ZONE = Zone("evidence-bl", "evidence.dnsbl.test",
            {"127.0.0.2": Code("spam source"), "127.0.0.10": Code("dynamic range", "policy")},
            delist_url="https://evidence.dnsbl.test/remove")


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    out = tmp_path_factory.mktemp("scen")
    s = scenario.generate(23, instances=80, duration_s=40 * 60)
    return s, scenario.write(s, out)


def test_medium_alerts_carry_their_dnsbl_answers(cfg, scen, tmp_path):
    s, paths = scen
    abusers = sorted(a.ip for a in s.abusive)
    assert len(abusers) >= 2
    listed, policy = abusers[0], abusers[1]
    with Rbldnsd(tmp_path / "bl", [Dataset(ZONE.zone, "ip4set", [":127.0.0.2:Spam source", listed,
                                                                  f"{policy} :127.0.0.10:Dynamic"])]) as srv:
        cfg = replace(cfg, dnsbl={"zones": [ZONE], "default_zones": [ZONE.name], "resolvers": [srv.resolver],
                                  "check_alerts_from": "medium", "timeout_ms": 2000})
        ensure_topics(cfg)
        stats = Collector(cfg).run([str(paths["flows"])], "aws-vpc")
        with Store(cfg.store_dsn, cfg.store.database) as store:
            runner = run_detector_until_idle(cfg, store, Exemptions.from_csv(paths["exemptions"]), stats.kept)
            responder = run_responder_until_idle(cfg, store, runner.stats.alerts_raised)
            alerts = store.list_alerts(min_severity="info", limit=10_000)
            rows = store.query(f"SELECT alert_id, ip, zone, status, codes, txt, actor, delist_url "
                               f"FROM {cfg.store.database}.dnsbl_checks")
            listed_evidence = stored_dnsbl(store, listed)
            listed_alerts = {a["alert_id"] for a in alerts if a["src_ip"] == listed
                             and SEVERITIES.index(a["severity"]) >= SEVERITIES.index("medium")}
            shown = CliRunner().invoke(alerts_show, [min(listed_alerts), "--json"], obj=Ctx.of(cfg))
        queried = {q.name for q in srv.queries()}

    medium = [a for a in alerts if a["src_ip"] and SEVERITIES.index(a["severity"]) >= SEVERITIES.index("medium")]
    lower = [a for a in alerts if SEVERITIES.index(a["severity"]) < SEVERITIES.index("medium")]
    assert medium, "the scenario's abusers raise medium or higher alerts"
    by_alert = {r[0]: r for r in rows}
    # every medium+ alert was looked up once, in the one configured zone, and nothing else was
    assert sorted(by_alert) == sorted(a["alert_id"] for a in medium)
    assert len(rows) == len(medium)
    assert {r[1] for r in rows} == {a["src_ip"] for a in medium}
    assert all(a["alert_id"] not in by_alert for a in lower)
    assert responder.lookups.stats.alerts_checked == len(medium) and responder.lookups.stats.skipped == 0
    for a in medium:
        _aid, ip, zone, status, codes, txt, actor, delist = by_alert[a["alert_id"]]
        assert zone == ZONE.name and actor == ACTOR and delist == ZONE.delist_url
        if ip == listed:
            assert (status, list(codes), txt) == ("listed", ["127.0.0.2"], "Spam source")
        elif ip == policy:
            assert (status, list(codes), txt) == ("policy", ["127.0.0.10"], "Dynamic")
        else:
            assert (status, list(codes)) == ("not_listed", [])
    # the queries went to rbldnsd (cached per address: at most one A query per address)
    assert f"{'.'.join(reversed(listed.split('.')))}.{ZONE.zone}" in queried
    # what the console and `alerts show` read for the address
    assert [(e["zone"], e["status"]) for e in listed_evidence] == [(ZONE.name, "listed")]
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    # the latest answer per zone about the source, from the lookup of one of its alerts
    assert [(d["zone"], d["status"], d["codes"], d["txt"]) for d in data["dnsbl"]] == \
        [(ZONE.name, "listed", ["127.0.0.2"], "Spam source")]
    assert data["dnsbl"][0]["alert_id"] in listed_alerts


def _alert(i: int, severity: str = "high", src_ip: str | None = None, suppressed: str = ""):
    # the fields AlertLookups reads, as the detector's Alert has them
    return types.SimpleNamespace(alert_id=f"a{i:03d}", src_ip=f"198.51.100.{i}" if src_ip is None else src_ip, severity=severity,
                                 suppressed=suppressed)


def test_a_flood_of_alerts_is_bounded_and_counted_and_timeouts_are_not_listings(cfg, silent):
    zone = Zone("silent-bl", "silent.dnsbl.test", {"127.0.0.2": Code("spam source")}, resolver=silent, timeout_ms=300)
    cfg = replace(cfg, dnsbl={"zones": [zone], "default_zones": [zone.name], "alert_queue_max": 3,
                               "check_alerts_from": "medium"})
    with Store(cfg.store_dsn, cfg.store.database) as store:
        lookups = AlertLookups(cfg, store)
        wanted = [_alert(i) for i in range(20)]
        ignored = [_alert(50, "low"), _alert(51, "medium", suppressed="cooldown"), _alert(52, "critical", src_ip="")]
        queued = lookups.submit(wanted + ignored)
        assert 1 <= queued <= 4  # the worker holds at most one batch, the queue three more
        assert lookups.stats.skipped == len(wanted) - queued
        assert lookups.drain(timeout_s=10)
        lookups.close(timeout_s=1)
        rows = store.query(f"SELECT alert_id, status, error FROM {cfg.store.database}.dnsbl_checks")
    st = lookups.stats
    assert st.alerts_checked == queued and st.alerts_checked + st.skipped == len(wanted)
    assert st.listed == 0 and st.errors == queued
    assert sorted(r[0] for r in rows) == sorted(a.alert_id for a in wanted[:queued])
    assert {(r[1], r[2]) for r in rows} == {("error", "timeout")}


def test_check_alerts_from_off_looks_nothing_up(cfg):
    with Store(cfg.store_dsn, cfg.store.database) as store:
        lookups = AlertLookups(replace(cfg, dnsbl={"check_alerts_from": "off"}), store)
        assert lookups.submit([_alert(1, "critical")]) == 0
        assert lookups.stats.to_dict() == {"queued": 0, "alerts_checked": 0, "listed": 0, "errors": 0, "skipped": 0,
                                           "failed": 0}


@pytest.mark.parametrize("bad", [{"check_alerts_from": "severe"}, {"alert_queue_max": 0}])
def test_bad_lookup_settings_are_config_errors(tmp_path, bad):
    from smtpguard.core import config
    from smtpguard.core.errors import ConfigError

    with pytest.raises(ConfigError, match="dnsbl"):
        config.load(environ={}, overrides={"data_dir": str(tmp_path), "dnsbl": bad})
