"""The exemption registry (chdb store), the revocation policy and its executor, and the
``exemptions`` / ``enforce`` command groups."""

from __future__ import annotations

import csv
import datetime as dt
import ipaddress
import json

import msgspec
import polars as pl
import pytest
from click.testing import CliRunner

from smtpguard.cli.response import ResponseContext, enforce_group, exemptions_group
from smtpguard.core.alert import Alert, iso
from smtpguard.core.errors import ConfigError, InputError
from smtpguard.core.exemptions import Exemptions, parse_time
from smtpguard.response import policy as policy_mod
from smtpguard.core.config import ResponseConfig, TenantAllowance
from smtpguard.response.enforce import read_state
from smtpguard.response.policy import DAY_MS, DecisionLog, Executor, History, apply_policy
from smtpguard.core.registry import (EVENT, ExemptionEvent, Registry, RegistryError, fold, from_ms,
                                         now_ms)
from smtpguard.response.webhook import DEAD_LETTER_COLUMNS
from smtpguard.core.store import Store

HOUR_MS = 3_600_000
INJECTION = "x'); DROP TABLE exemption_events; -- {ip:String} \\' \" `"


@pytest.fixture
def store(cfg):
    s = Store(cfg.store_dsn, cfg.store.database)
    yield s
    s.close()


@pytest.fixture
def reg(store) -> Registry:
    return Registry(store)


def nets(reg: Registry, at_ms: int | None = None) -> list[str]:
    return [str(n) for n, _ in reg.allowed(at_ms)]


def alert(ip: str | None = "198.51.100.7", *, detector: str = "spam_fanout", severity: str = "high",
          start_ms: int, tenant: str = "acct-1", suppressed: str = "", aid: str | None = None) -> Alert:
    return Alert(alert_id=aid or f"{detector}-{ip}-{start_ms}", detector=detector, severity=severity, score=0.8,
                 src_ip=ip, tenant=tenant, window_start=iso(start_ms), window_end=iso(start_ms + 60_000),
                 reasons=["412 distinct destinations in one minute"], evidence={}, suppressed=suppressed)


# -- schema -------------------------------------------------------------------------------------------
def test_response_tables_match_their_definitions(store):
    def columns(table):
        return {r[0]: r[1].replace(" ", "") for r in store.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            {"db": store.database, "t": table})}

    assert columns("exemption_events") == {n: t.replace(" ", "") for n, t in EVENT.clickhouse_columns()}
    assert set(columns("response_decisions")) == {n for n, _ in policy_mod.DECISION_COLUMNS}
    assert set(columns("webhook_dead_letters")) == {n for n, _ in DEAD_LETTER_COLUMNS}
    assert store.migrate() == 0


# -- registry -------------------------------------------------------------------------------------------
def test_every_change_records_who_when_why_and_the_alerts(reg):
    t0 = now_ms()
    reg.grant("198.51.100.7", "acct-1", "mail relay, CHG-42", "alice", now_ms=t0)
    assert reg.current().lookup("198.51.100.7") is not None
    reg.revoke("198.51.100.7", "spam run", "bob", ["a-1", "a-2"], now_ms=t0 + 1000)
    assert reg.current(t0 + 1000).lookup("198.51.100.7") is None
    assert reg.current(t0 + 500).lookup("198.51.100.7") is not None, "the registry as it was before the revocation"
    reg.restore("198.51.100.7", "customer cleaned the instance", "carol", now_ms=t0 + 2000)

    shown = reg.show("198.51.100.7", at_ms=t0 + 2000)
    assert [(e.kind, e.actor, e.reason, e.alert_ids, e.at_ms) for e in shown.history] == [
        ("granted", "alice", "mail relay, CHG-42", [], t0),
        ("revoked", "bob", "spam run", ["a-1", "a-2"], t0 + 1000),
        ("restored", "carol", "customer cleaned the instance", [], t0 + 2000),
    ]
    assert shown.allowed and shown.state.state == "active" and shown.state.granted_at_ms == t0
    assert shown.state.restored_at_ms == t0 + 2000
    assert [s.key for s in reg.list("active", at_ms=t0 + 2000)] == ["198.51.100.7"]
    assert reg.list("revoked", at_ms=t0 + 1500)[0].last.alert_ids == ["a-1", "a-2"]


def test_events_in_the_same_millisecond_keep_their_order(reg):
    t = now_ms()
    reg.grant("198.51.100.9", "acct-1", "relay", "alice", now_ms=t)
    reg.revoke("198.51.100.9", "spam", "bob", now_ms=t)
    reg.restore("198.51.100.9", "fixed", "carol", now_ms=t)
    assert [e.kind for e in reg.show("198.51.100.9", at_ms=t).history] == ["granted", "revoked", "restored"]
    assert reg.list("active", at_ms=t)[0].key == "198.51.100.9"


def test_revoking_an_address_inside_a_block_cuts_it_out_and_restore_lifts_the_cut(reg):
    t = now_ms()
    reg.grant("198.51.100.0/28", "acct-1", "relay pool", "alice", now_ms=t)
    reg.grant("2001:db8:25::/64", "acct-2", "v6 relays", "alice", now_ms=t)
    reg.revoke("198.51.100.3", "spam run", "policy", ["a-9"], now_ms=t + 1)
    ex = reg.current(t + 1)
    assert ex.lookup("198.51.100.3") is None
    assert ex.lookup("198.51.100.2").tenant == "acct-1" and ex.lookup("198.51.100.4") is not None
    assert ex.lookup("2001:db8:25::1").tenant == "acct-2"
    allowed_v4 = [ipaddress.ip_network(n) for n in nets(reg, t + 1) if ":" not in n]
    assert sum(n.num_addresses for n in allowed_v4) == 15
    assert not any(ipaddress.ip_address("198.51.100.3") in n for n in allowed_v4)
    assert reg.show("198.51.100.3", at_ms=t + 1).decided_by.key == "198.51.100.3"

    reg.restore("198.51.100.3", "false positive", "carol", now_ms=t + 2)
    assert reg.list("lifted", at_ms=t + 2)[0].key == "198.51.100.3"
    assert nets(reg, t + 2) == ["198.51.100.0/28", "2001:db8:25::/64"]
    assert reg.show("198.51.100.3", at_ms=t + 2).decided_by.key == "198.51.100.0/28"
    # a block revoked later takes its lifted addresses with it
    reg.revoke("198.51.100.0/28", "tenant closed", "bob", now_ms=t + 3)
    assert reg.current(t + 3).lookup("198.51.100.3") is None
    assert nets(reg, t + 3) == ["2001:db8:25::/64"]


def test_refusals_say_what_is_wrong(reg):
    t = now_ms()
    with pytest.raises(RegistryError, match="cannot revoke 192.0.2.1: it has no exemption"):
        reg.revoke("192.0.2.1", "spam", "bob", now_ms=t)
    reg.grant("192.0.2.1", "acct", "relay", "alice", now_ms=t)
    with pytest.raises(RegistryError, match="already exempted"):
        reg.grant("192.0.2.1", "acct", "relay", "alice", now_ms=t)
    with pytest.raises(RegistryError, match="not revoked"):
        reg.restore("192.0.2.1", "nothing to lift", "carol", now_ms=t)
    reg.revoke("192.0.2.1", "spam", "bob", now_ms=t + 1)
    with pytest.raises(RegistryError, match="already revoked"):
        reg.revoke("192.0.2.1", "spam", "bob", now_ms=t + 2)
    with pytest.raises(RegistryError, match="restore"):
        reg.grant("192.0.2.1", "acct", "again", "alice", now_ms=t + 2)
    with pytest.raises(InputError, match="reason is required"):
        reg.restore("192.0.2.1", "  ", "carol", now_ms=t + 2)
    with pytest.raises(InputError, match="not an IP address"):
        reg.grant("192.0.2.300", "acct", "relay", "alice")
    with pytest.raises(InputError, match="host bits"):
        reg.grant("192.0.2.7/24", "acct", "relay", "alice")
    with pytest.raises(InputError, match="not in the future"):
        reg.grant("192.0.2.8", "acct", "relay", "alice", expires=from_ms(t - 1), now_ms=t)


def test_expiry_is_computed_from_expires_at_and_recorded_once(reg):
    t = now_ms()
    reg.grant("203.0.113.5", "acct-3", "trial relay", "alice", expires=from_ms(t + HOUR_MS), now_ms=t)
    reg.grant("203.0.113.6", "acct-3", "permanent relay", "alice", now_ms=t)
    assert reg.current(t + HOUR_MS - 1).lookup("203.0.113.5") is not None
    assert reg.current(t + HOUR_MS).lookup("203.0.113.5") is None, "no event needed for it to end"
    assert [s.key for s in reg.list("expired", at_ms=t + 2 * HOUR_MS)] == ["203.0.113.5"]

    written = reg.expire_due(now_ms=t + 2 * HOUR_MS)
    assert [(e.ip, e.kind, e.actor, e.at_ms) for e in written] == [("203.0.113.5", "expired", "smtpguard", t + HOUR_MS)]
    assert reg.expire_due(now_ms=t + 3 * HOUR_MS) == []
    with pytest.raises(RegistryError, match="expired at"):
        reg.revoke("203.0.113.5", "spam", "bob", now_ms=t + 2 * HOUR_MS)

    reg.renew("203.0.113.5", "trial extended", "alice", expires=from_ms(t + 5 * HOUR_MS), now_ms=t + 2 * HOUR_MS)
    assert reg.current(t + 2 * HOUR_MS).lookup("203.0.113.5") is not None
    assert [e.kind for e in reg.show("203.0.113.5").history] == ["granted", "expired", "renewed"]


def test_a_revocation_that_outlives_the_expiry_can_still_be_lifted(reg):
    t = now_ms()
    reg.grant("203.0.113.7", "acct-3", "trial relay", "alice", expires=from_ms(t + HOUR_MS), now_ms=t)
    reg.revoke("203.0.113.7", "spam", "bob", now_ms=t + 1)
    assert reg.list("revoked", at_ms=t + 2 * HOUR_MS)[0].key == "203.0.113.7", "revoked stays revoked past the expiry"
    reg.restore("203.0.113.7", "false positive", "carol", now_ms=t + 2 * HOUR_MS)
    assert reg.show("203.0.113.7", at_ms=t + 2 * HOUR_MS).state.state == "expired"
    assert [e.at_ms for e in reg.expire_due(now_ms=t + 2 * HOUR_MS)] == [t + 2 * HOUR_MS]
    assert reg.expire_due(now_ms=t + 3 * HOUR_MS) == []
    reg.renew("203.0.113.7", "extended", "alice", now_ms=t + 2 * HOUR_MS)
    assert reg.current(t + 2 * HOUR_MS).lookup("203.0.113.7") is not None


def test_csv_import_export_round_trip(reg, cfg, tmp_path):
    src = tmp_path / "exemptions.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ip", "tenant", "granted_at", "reason", "owner", "expires_at"])
        w.writerow(["198.51.100.7", "acct-1", "2025-03-01T12:00:00Z", 'relay, "primary"', "ops", ""])
        w.writerow(["198.51.100.16/28", "acct-2", "2025-04-01", "pool", "ops", "2099-01-01T00:00:00Z"])
        w.writerow(["2001:db8:25::7", "acct-3", "2025-05-01T00:00:00+02:00", "", "ops", ""])
    first = reg.import_csv(src, "alice")
    assert first.imported == ["198.51.100.7", "198.51.100.16/28", "2001:db8:25::7"] and first.skipped == []
    assert reg.import_csv(src, "alice").imported == [], "a second import changes nothing"

    s = reg.show("2001:db8:25::7").state
    assert s.granted_at_ms == int(parse_time("2025-04-30T22:00:00Z").timestamp() * 1000)
    assert s.granted_reason == "imported from exemptions.csv" and s.last.actor == "alice"
    assert reg.show("198.51.100.16/28").state.expires_at_ms == int(parse_time("2099-01-01").timestamp() * 1000)

    reg.revoke("198.51.100.20", "spam", "bob")
    out = tmp_path / "out.csv"
    assert reg.export_csv(out) == 1 + 4 + 1, "the /28 minus one address is four networks"

    # the exported file is what `analyze --exemptions` reads, and says what the registry says
    ex = Exemptions.from_csv(out)
    now = reg.current()
    for ip in ("198.51.100.7", "198.51.100.16", "198.51.100.20", "198.51.100.31", "2001:db8:25::7", "192.0.2.1"):
        a, b = ex.lookup(ip), now.lookup(ip)
        assert (a and (a.tenant, a.granted_at_ms, a.reason)) == (b and (b.tenant, b.granted_at_ms, b.reason)), ip

    with Store(cfg.store_dsn, cfg.store.database + "_copy") as other:
        copy = Registry(other)
        copy.import_csv(out, "bob")
        assert nets(copy) == nets(reg)
        assert copy.show("198.51.100.7").state.granted_reason == 'relay, "primary"'
        assert copy.show("198.51.100.24/29").state.expires_at_ms == reg.show("198.51.100.16/28").state.expires_at_ms


def test_import_reports_the_bad_line(reg, tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("ip,tenant,granted_at,reason\n198.51.100.7,a,2025-01-01,ok\nnot-an-ip,a,2025-01-01,bad\n")
    with pytest.raises(ConfigError, match="line 3"):
        reg.import_csv(src, "alice")
    assert reg.events() == [], "nothing of a bad file is imported"


def test_hostile_strings_are_stored_and_returned_verbatim(reg, store):
    reg.grant("192.0.2.44", INJECTION, INJECTION, INJECTION)
    reg.grant("192.0.2.45", "plain", "plain", "alice")
    reg.revoke("192.0.2.44", INJECTION, INJECTION, [INJECTION])
    assert [s.key for s in reg.list("all", tenant=INJECTION)] == ["192.0.2.44"]
    assert reg.list("all", tenant="' OR '1'='1") == []
    history = reg.show("192.0.2.44").history
    assert {(e.tenant, e.actor, e.reason) for e in history} == {(INJECTION, INJECTION, INJECTION)}
    assert history[-1].alert_ids == [INJECTION]
    assert reg.events(alert_id=INJECTION)[0].ip == "192.0.2.44"
    assert store.count("exemption_events") == 3
    assert DecisionLog(store).list(ip=INJECTION) == []


def test_detectors_read_the_registry(reg):
    t = now_ms()
    reg.grant("198.51.100.7", "acct-1", "relay", "alice", now_ms=t - 10 * DAY_MS)
    feats = pl.DataFrame({"src_ip": ["198.51.100.7", "198.51.100.8"],
                          "window_start": [from_ms(t), from_ms(t)]}).with_columns(
        pl.col("window_start").dt.cast_time_unit("ms"))
    out = reg.current(t).annotate(feats)
    assert out["exempted"].to_list() == [True, False]
    assert out["exemption_age_days"].to_list()[0] == pytest.approx(10.0)


# -- policy (pure) ------------------------------------------------------------------------------------
T = int(dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.timezone.utc).timestamp() * 1000)


def exemption(kinds: list[tuple[str, int]], key: str = "198.51.100.7", tenant: str = "acct-1"):
    events = [ExemptionEvent(event_id=f"e{i}", ip=key, tenant=tenant, kind=k, at=from_ms(at), expires_at=None,
                             actor="alice", reason="r") for i, (k, at) in enumerate(kinds)]
    return fold(key, events, T + 365 * DAY_MS)


GRANTED = [("granted", T - 100 * DAY_MS)]


def test_graduated_path_warns_first_then_revokes_within_the_window():
    p = ResponseConfig(graduated_window_days=7)
    first = apply_policy(alert(start_ms=T), History(exemption=exemption(GRANTED)), p, T)
    assert (first.configured, first.action, first.rule) == ("graduated", "warn", "first-offence")
    second = apply_policy(alert(start_ms=T), History(exemption=exemption(GRANTED), offences_ms=(T - 3 * DAY_MS,)), p, T)
    assert (second.action, second.rule) == ("revoke", "repeat-offence") and "2026-02-27" in second.reason
    old = apply_policy(alert(start_ms=T), History(exemption=exemption(GRANTED), offences_ms=(T - 8 * DAY_MS,)), p, T)
    assert old.action == "warn"
    same_window = apply_policy(alert(start_ms=T), History(exemption=exemption(GRANTED), offences_ms=(T,)), p, T)
    assert same_window.action == "warn", "two detectors on one window are one offence"


def test_abuse_after_a_restore_revokes_at_once_during_probation():
    p = ResponseConfig(restore_probation_days=30)
    restored = exemption([*GRANTED, ("revoked", T - 20 * DAY_MS), ("restored", T - 10 * DAY_MS)])
    d = apply_policy(alert(start_ms=T), History(exemption=restored), p, T)
    assert (d.action, d.rule) == ("revoke", "after-restore")
    long_ago = exemption([*GRANTED, ("revoked", T - 60 * DAY_MS), ("restored", T - 40 * DAY_MS)])
    assert apply_policy(alert(start_ms=T), History(exemption=long_ago), p, T).action == "warn"
    before_restore = apply_policy(alert(start_ms=T - 15 * DAY_MS), History(exemption=restored), p, T)
    assert before_restore.action == "warn", "an alert from before the restore is not abuse after it"


def test_tenant_allowlist_turns_revoke_into_propose_until_it_expires():
    until = "2026-03-10T00:00:00Z"
    p = ResponseConfig(tenant_allowlist=[TenantAllowance("acct-1", until, "managed relay, CHG-7")])
    a = alert(severity="critical", start_ms=T)
    d = apply_policy(a, History(exemption=exemption(GRANTED)), p, T)
    assert (d.configured, d.action, d.rule) == ("revoke", "propose", "allowlist")
    assert "CHG-7" in d.reason and until in d.reason
    after = int(parse_time(until).timestamp() * 1000)
    assert apply_policy(a, History(exemption=exemption(GRANTED)), p, after).action == "revoke"
    other = apply_policy(alert(severity="critical", start_ms=T, tenant="acct-9"),
                         History(exemption=exemption(GRANTED, tenant="acct-9")), p, T)
    assert other.action == "revoke"


def test_actions_per_severity_and_detector():
    p = msgspec.convert({"actions": {"medium": "notify"}, "detectors": {"connection_flood": {"high": "revoke"}}},
                        ResponseConfig)
    ex = History(exemption=exemption(GRANTED))
    assert apply_policy(alert(severity="medium", start_ms=T), ex, p, T).action == "notify"
    assert apply_policy(alert(severity="high", start_ms=T), ex, p, T).action == "warn"
    assert apply_policy(alert(severity="high", detector="connection_flood", start_ms=T), ex, p, T).action == "revoke"
    assert apply_policy(alert(severity="critical", start_ms=T), ex, p, T).action == "revoke"
    assert apply_policy(alert(severity="low", start_ms=T), ex, p, T).action == "notify"


def test_what_is_never_a_revocation():
    p = ResponseConfig()
    crit = dict(severity="critical", start_ms=T)
    assert apply_policy(alert(**crit), History(), p, T).rule == "no-exemption"
    assert apply_policy(alert(None, detector="tenant_spam", **crit), History(), p, T).rule == "tenant-scope"
    assert apply_policy(alert(**crit, suppressed="cooldown"), History(exemption=exemption(GRANTED)), p, T).action == "none"
    assert apply_policy(alert(**crit), History(handled=True, exemption=exemption(GRANTED)), p, T).rule == "duplicate"


@pytest.mark.parametrize("section,needle", [
    ({"actions": {"high": "nuke"}}, "'nuke' is not an action"),
    ({"actions": {"severe": "revoke"}}, "'severe' is not a severity"),
    ({"tenant_allowlist": [{"tenant": "a", "until": "soon"}]}, "until 'soon'"),
    ({"webhook": {"url": "https://hooks.example/x"}}, "secret is required"),
    ({"webhook": {"url": "ftp://x", "secret": "s"}}, "http:// or https://"),
])
def test_bad_response_config_is_refused(section, needle):
    with pytest.raises(msgspec.ValidationError, match=needle):
        msgspec.convert(section, ResponseConfig)


def test_a_detector_the_response_config_names_must_exist(tmp_path):
    """The core config does not know the detectors; a run's config loading does (app.settings)."""
    from smtpguard.app import settings

    f = tmp_path / "c.toml"
    f.write_text('[response.detectors.no_such]\nhigh = "revoke"\n')
    with pytest.raises(ConfigError, match="unknown detector 'no_such'"):
        settings.load(f, environ={})


# -- executor (store + broker) ------------------------------------------------------------------------
def test_executor_graduated_path_is_idempotent_reversible_and_published(reg, cfg, store):
    from smtpguard.response.enforce import Outputs

    p = ResponseConfig()
    ex = Executor(reg, p, Outputs(cfg, p, store))
    t = now_ms()
    w1 = t - t % 60_000
    reg.grant("198.51.100.7", "acct-1", "relay", "alice", now_ms=t - DAY_MS)

    first = ex.handle(alert(start_ms=w1), now_ms=t)
    assert first.decision.action == "warn" and first.published is None
    assert ex.handle(alert(start_ms=w1), now_ms=t).decision.rule == "duplicate"

    a2 = alert(start_ms=w1 + 10 * 60_000)
    second = ex.handle(a2, now_ms=t + 1)
    assert (second.decision.action, second.decision.rule) == ("revoke", "repeat-offence")
    assert ex.handle(a2, now_ms=t + 2).decision.action == "none"
    revocations = [e for e in reg.show("198.51.100.7").history if e.kind == "revoked"]
    assert len(revocations) == 1 and revocations[0].alert_ids == [a2.alert_id] and revocations[0].actor == p.actor
    assert second.published.kafka == 1
    assert read_state(cfg)["198.51.100.7"].action == "deny"

    third = ex.handle(alert(start_ms=w1 + 20 * 60_000), now_ms=t + 3)
    assert third.decision.rule == "no-exemption", "nothing left to revoke"

    reg.restore("198.51.100.7", "false positive", "carol", now_ms=t + 4)
    again = ex.handle(alert(start_ms=w1 + 60 * 60_000, detector="volume_spike"), now_ms=t + 5)
    assert (again.decision.action, again.decision.rule) == ("revoke", "after-restore")
    assert [d["action"] for d in DecisionLog(store).list(ip="198.51.100.7")] == ["revoke", "notify", "revoke", "warn"]


# -- CLI ----------------------------------------------------------------------------------------------
@pytest.fixture
def run(cfg):
    runner = CliRunner()
    ctx = ResponseContext(cfg, ResponseConfig())

    def invoke(group, *args: str):
        return runner.invoke(group, list(args), obj=ctx)

    return invoke


def test_cli_grant_list_show_revoke_restore(run, cfg):
    import getpass

    r = run(exemptions_group, "grant", "198.51.100.7", "--tenant", "acct-1", "--reason", "relay, CHG-42",
            "--expires", "2099-12-31")
    assert r.exit_code == 0, r.output
    r = run(exemptions_group, "list", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["ip"], x["state"], x["tenant"], x["expires_at"], x["last_actor"]) for x in rows] == [
        ("198.51.100.7", "active", "acct-1", "2099-12-31T00:00:00.000Z", getpass.getuser())]

    r = run(exemptions_group, "revoke", "198.51.100.7", "--reason", "spam run", "--alert", "a-1", "--alert", "a-2",
            "--actor", "bob")
    assert r.exit_code == 0, r.output
    assert run(exemptions_group, "list", "--json").stdout == ""
    assert json.loads(run(exemptions_group, "list", "--state", "revoked", "--json").stdout)["last_reason"] == "spam run"
    assert read_state(cfg)["198.51.100.7"].action == "deny"

    shown = json.loads(run(exemptions_group, "show", "198.51.100.7", "--json").stdout)
    assert shown["allowed"] is False
    assert [(h["kind"], h["alert_ids"]) for h in shown["history"]] == [("granted", []), ("revoked", ["a-1", "a-2"])]
    text = run(exemptions_group, "show", "198.51.100.7").stdout
    assert "may not send on port 25" in text and "spam run" in text and "a-1, a-2" in text

    assert run(exemptions_group, "restore", "198.51.100.7", "--reason", "cleaned").exit_code == 0
    assert json.loads(run(exemptions_group, "show", "198.51.100.7", "--json").stdout)["allowed"] is True
    assert read_state(cfg)["198.51.100.7"].action == "allow"


def test_cli_errors_and_exit_status(run):
    r = run(exemptions_group, "grant", "198.51.100.300", "--tenant", "t", "--reason", "r")
    assert r.exit_code == 2 and "not an IP address" in r.output
    r = run(exemptions_group, "grant", "198.51.100.7", "--tenant", "t", "--reason", "r", "--expires", "next week")
    assert r.exit_code == 2 and "not an ISO 8601 date" in r.output
    r = run(exemptions_group, "grant", "198.51.100.7", "--tenant", "t", "--reason", "r", "--expires", "2001-01-01")
    assert r.exit_code == 2 and "not in the future" in r.output
    r = run(exemptions_group, "revoke", "192.0.2.77", "--reason", "spam")
    assert r.exit_code == 1 and isinstance(r.exception, RegistryError)
    assert str(r.exception) == "cannot revoke 192.0.2.77: it has no exemption"
    r = run(exemptions_group, "revoke", "192.0.2.77")
    assert r.exit_code == 2 and "--reason" in r.output


def test_cli_import_export_proposals_and_nftables(run, cfg, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("ip,tenant,granted_at,reason\n198.51.100.0/29,acct-1,2025-01-01,pool\n2001:db8::25,acct-2,2025-01-01,v6\n")
    r = run(exemptions_group, "import", str(src))
    assert r.exit_code == 0 and "imported 2, skipped 0" in r.stderr
    assert "imported 0, skipped 2" in run(exemptions_group, "import", str(src)).stderr

    store = Store(cfg.store_dsn, cfg.store.database)
    p = ResponseConfig(tenant_allowlist=[TenantAllowance("acct-1", "2099-01-01")])
    Executor(Registry(store), p).handle(alert("198.51.100.5", severity="critical", start_ms=now_ms() - 60_000))
    store.close()
    proposals = [json.loads(x) for x in run(exemptions_group, "proposals", "--json").stdout.splitlines()]
    assert [(x["ip"], x["rule"]) for x in proposals] == [("198.51.100.5", "allowlist")]

    out = tmp_path / "out.csv"
    assert run(exemptions_group, "export", str(out)).exit_code == 0
    assert [row["ip"] for row in csv.DictReader(out.open())] == ["198.51.100.0/29", "2001:db8::25"]

    nft = tmp_path / "smtp.nft"
    r = run(enforce_group, "nftables", "--output", str(nft), "--no-check")
    assert r.exit_code == 0, r.output
    assert "elements = { 198.51.100.0/29 }" in nft.read_text() and "elements = { 2001:db8::25 }" in nft.read_text()

    state = read_state(cfg)
    assert {k: v.action for k, v in state.items()} == {"198.51.100.0/29": "allow", "2001:db8::25": "allow"}


# -- IPv6 prefixes and declared volumes ---------------------------------------------------------------
def test_a_prefix_alert_finds_and_revokes_the_exemption_inside_or_around_it(reg):
    """Detection judges IPv6 sources by prefix: the policy finds the address exempted inside the /64
    (or the block around it) and revokes that; the nftables set leaves it out."""
    t = now_ms()
    reg.grant("2001:db8:aa:1::25", "acct-6", "v6 mail server", "alice", now_ms=t - 30 * DAY_MS)
    reg.grant("2001:db8:bb::/48", "acct-7", "v6 relay block", "alice", now_ms=t - 30 * DAY_MS)
    assert reg.exemption_of("2001:db8:aa:1::/64", t).key == "2001:db8:aa:1::25"
    assert reg.exemption_of("2001:db8:bb:3::/64", t).key == "2001:db8:bb::/48"
    assert reg.exemption_of("2001:db8:cc:1::/64", t) is None
    cfg = ResponseConfig(actions={"critical": "revoke"})
    ex = Executor(reg, cfg)
    d1 = ex.handle(alert("2001:db8:aa:1::/64", severity="critical", start_ms=t - 60_000), now_ms=t).decision
    d2 = ex.handle(alert("2001:db8:bb:3::/64", severity="critical", start_ms=t - 60_000), now_ms=t).decision
    assert (d1.action, d2.action) == ("revoke", "revoke")
    assert reg.current(t).lookup("2001:db8:aa:1::25") is None
    assert reg.current(t).lookup("2001:db8:bb:3::1") is None, "the /64 is cut out of the block"
    assert reg.current(t).lookup("2001:db8:bb:4::1") is not None, "the rest of the block still sends"


def test_a_declared_volume_travels_from_csv_through_the_registry_to_the_detectors(reg, tmp_path):
    t = now_ms()
    f = tmp_path / "ex.csv"
    f.write_text("ip,tenant,granted_at,reason,declared_conns_per_min\n"
                 "192.0.2.40,acct,2026-01-01T00:00:00Z,new MTA,250\n192.0.2.41,acct,2026-01-01T00:00:00Z,old,\n")
    reg.import_csv(f, actor="import")
    current = reg.current(t)
    assert current.lookup("192.0.2.40").declared_conns_per_min == 250.0
    assert current.lookup("192.0.2.41").declared_conns_per_min is None
    reg.renew("192.0.2.41", "declared at review", "alice", declared=80, now_ms=t)
    assert reg.current(t + 1).lookup("192.0.2.41").declared_conns_per_min == 80.0
    out = tmp_path / "back.csv"
    reg.export_csv(out, t + 1)
    rows = {r["ip"]: r for r in csv.DictReader(out.read_text().splitlines())}
    assert rows["192.0.2.40"]["declared_conns_per_min"] == "250" and rows["192.0.2.41"]["declared_conns_per_min"] == "80"
    with pytest.raises(InputError, match="positive"):
        reg.grant("192.0.2.42", "acct", "x", "alice", declared=0)
    bad = tmp_path / "bad.csv"
    bad.write_text("ip,tenant,granted_at,reason,declared_conns_per_min\n192.0.2.43,a,2026-01-01,x,-5\n")
    with pytest.raises(ConfigError, match="line 2.*positive"):
        Exemptions.from_csv(bad)


def test_a_revocation_whose_decision_was_not_recorded_gets_it_on_the_replay(reg, cfg, store):
    """The response stopped between revoking for an alert and recording its decision: the replay of the
    alert records the decision (rule "recovered") and publishes the revocation, instead of taking the alert
    for one already handled and leaving it undecided."""
    from smtpguard.response.enforce import Outputs

    p = ResponseConfig(actions={"critical": "revoke"})
    t = now_ms()
    reg.grant("198.51.100.9", "acct-9", "relay", "alice", now_ms=t - DAY_MS)
    a = alert("198.51.100.9", severity="critical", start_ms=t - 60_000)
    event = reg.revoke("198.51.100.9", "abuse", p.actor, [a.alert_id], now_ms=t)  # ... and the process died
    assert not DecisionLog(store).has(a.alert_id)
    out = Executor(reg, p, Outputs(cfg, p, store)).handle(a, now_ms=t + 1)
    d = out.decision
    assert (d.action, d.rule, d.event_id) == ("revoke", "recovered", event.event_id)
    assert [x["rule"] for x in DecisionLog(store).list(ip="198.51.100.9")] == ["recovered"]
    assert out.published.kafka == 1 and read_state(cfg)["198.51.100.9"].action == "deny"
    assert len([e for e in reg.show("198.51.100.9").history if e.kind == "revoked"]) == 1  # not revoked twice
    again = Executor(reg, p).handle(a, now_ms=t + 2).decision
    assert (again.action, again.rule) == ("none", "duplicate")
