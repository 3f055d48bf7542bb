"""Blacklist audits against real rbldnsd servers on loopback, with an embedded store.

Every query goes to 127.0.0.1: the config names the local servers as resolvers, and the
zone whose server never answers has its own loopback resolver (a UDP socket that reads nothing).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import signal
import threading
import time
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from smtpguard.response import audit
from smtpguard.cli.audit import audit_cmd
from smtpguard.core.alert import Alert
from smtpguard.response.dnsbl import Code, Zone
from smtpguard.core.registry import Registry
from smtpguard.core.store import Store

from conftest import make_config, replace
from smtpguard.lab.rbldnsd import Dataset, Rbldnsd

DELIST = "https://dnsbl.test/remove"
FLAKY_DELIST = "https://flaky.dnsbl.test/remove"
MAIN = Zone("audit-bl", "audit.dnsbl.test", {"127.0.0.2": Code("spam source")}, delist_url=DELIST)
FLAKY = Zone("audit-flaky", "flaky.dnsbl.test", {"127.0.0.2": Code("trap hit")}, delist_url=FLAKY_DELIST)


@pytest.fixture
def servers(tmp_path):
    main = Rbldnsd(tmp_path / "main", [Dataset("audit.dnsbl.test", "ip4set", [":127.0.0.2:Listed $",
                                                                               "192.0.2.1", "192.0.2.2",
                                                                               "198.51.100.9"])]).start()
    flaky = Rbldnsd(tmp_path / "flaky", [Dataset("flaky.dnsbl.test", "ip4set", [":127.0.0.2:Trap $",
                                                                                "192.0.2.4"])]).start()
    yield main, flaky
    main.stop()
    flaky.stop()


def audit_config(tmp_path: Path, chdb_dir: Path, main: Rbldnsd, flaky: Rbldnsd, silent: str, **dnsbl):
    silent_zone = Zone("audit-silent", "silent.dnsbl.test", {}, resolver=silent, timeout_ms=600)
    cfg = make_config(tmp_path, dsn=f"chdb://{chdb_dir}")
    flaky_zone = Zone(FLAKY.name, FLAKY.zone, FLAKY.codes, delist_url=FLAKY_DELIST, resolver=flaky.resolver,
                      timeout_ms=600)
    return replace(cfg, dnsbl={"resolvers": [main.resolver], "zones": [MAIN, flaky_zone, silent_zone],
                               "default_zones": ["audit-bl", "audit-flaky", "audit-silent"], "timeout_ms": 1500,
                               **dnsbl})


def invoke(cfg, *args: str):
    return CliRunner().invoke(audit_cmd, list(args), obj=types.SimpleNamespace(cfg=cfg))


def reload_zone(srv: Rbldnsd, lines: list[str], probe: str, listed: bool) -> None:
    """Rewrite the zone file, make rbldnsd reload it (SIGHUP), and wait until it answers from the new data."""
    srv.datasets[0].lines = lines
    srv._write_zones()
    later = time.time() + 5
    for p in srv.directory.glob("*.zone"):
        # rbldnsd reloads a file whose modification time changed; one-second mtimes could hide a quick rewrite
        os.utime(p, (later, later))
    os.kill(srv.pid, signal.SIGHUP)
    name = ".".join(reversed(probe.split("."))) + "." + srv.datasets[0].zone
    import dns.message
    import dns.query
    import dns.rcode

    host, port = srv.resolver.split(":")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = dns.query.udp(dns.message.make_query(name, "A"), host, port=int(port), timeout=1)
        if (r.rcode() == dns.rcode.NOERROR) == listed:
            return
        time.sleep(0.05)
    raise AssertionError(f"rbldnsd did not reload {srv.directory}")


def alert(alert_id: str, ip: str, severity: str, end: dt.datetime) -> Alert:
    iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    return Alert(alert_id=alert_id, detector="spam_fanout", severity=severity, score=5.0, src_ip=ip, tenant="acct-1",
                 window_start=iso(end - dt.timedelta(minutes=5)), window_end=iso(end), reasons=["fan-out"],
                 evidence={}, created_at=iso(end))


def pairs(out: dict, category: str) -> set[tuple[str, str]]:
    return {(c["ip"], c["zone"]) for c in out["changes"] if c["category"] == category}


def test_audit_reports_what_changed_between_runs(tmp_path, chdb_dir, servers, silent):
    main, flaky = servers
    cfg = audit_config(tmp_path, chdb_dir, main, flaky, silent)
    now = dt.datetime.now(dt.timezone.utc)
    with Store(cfg.store_dsn, cfg.store.database) as store:
        Registry(store).grant("198.51.100.8/30", tenant="acct-1", reason="relay pool", actor="alice")
        store.insert_alerts([
            alert("a-flag", "192.0.2.3", "medium", now - dt.timedelta(days=2)),       # flagged, then listed
            alert("a-low", "198.51.100.10", "low", now - dt.timedelta(days=1)),       # low: not a flag
            alert("a-recent", "203.0.113.5", "high", now - dt.timedelta(hours=3)),    # a flagged target
            alert("a-old", "203.0.113.6", "critical", now - dt.timedelta(days=10)),   # older than 7 days
        ])
    targets = "exempted,flagged,192.0.2.0/29"

    first = invoke(cfg, "--targets", targets, "--json")
    assert first.exit_code == 0, first.output
    one = json.loads(first.output)
    assert one["baseline"] is True and one["previous_audit_id"] is None
    assert [c for c in one["changes"] if c["category"] != "errors"] == []
    # 8 block addresses, 4 exempted, 2 flagged (192.0.2.3 is in the block already) = 13 addresses, 3 zones each
    assert one["counts"]["addresses"] == 13 and one["counts"]["lookups"] == 39
    assert one["counts"]["listed"] == 4   # 192.0.2.1, .2, 198.51.100.9 in audit-bl; 192.0.2.4 in audit-flaky
    assert pairs(one, "errors") == {(ip, "audit-silent") for ip in _addresses()}

    # Between the audits: .1 and 198.51.100.9 are delisted, .3 and 198.51.100.10 listed, .2 stays,
    # and the flaky list's server goes away, so 192.0.2.4's listing there cannot be seen.
    reload_zone(main, [":127.0.0.2:Listed $", "192.0.2.2", "192.0.2.3", "198.51.100.10"], "192.0.2.3", listed=True)
    flaky.stop()

    second = invoke(cfg, "--targets", targets, "--json")
    assert second.exit_code == 0, second.output
    two = json.loads(second.output)
    assert two["baseline"] is False and two["previous_audit_id"] == one["audit_id"]
    assert pairs(two, "newly_listed") == {("192.0.2.3", "audit-bl"), ("198.51.100.10", "audit-bl")}
    assert pairs(two, "delisted") == {("192.0.2.1", "audit-bl"), ("198.51.100.9", "audit-bl")}
    assert pairs(two, "still_listed") == {("192.0.2.2", "audit-bl")}
    assert pairs(two, "listed_no_prior") == set()
    # errors are errors: the unanswered flaky list does not turn 192.0.2.4 into a delisting
    assert pairs(two, "errors") == ({(ip, "audit-silent") for ip in _addresses()}
                                    | {(ip, "audit-flaky") for ip in _addresses()})
    assert {c["delist_url"] for c in two["changes"] if c["category"] in ("newly_listed", "still_listed")} == {DELIST}

    newly = {c["ip"]: c for c in two["changes"] if c["category"] == "newly_listed"}
    assert newly["192.0.2.3"]["first_flagged_at"] is not None
    assert 2 * 86400 - 120 <= newly["192.0.2.3"]["flagged_lead_s"] <= 2 * 86400 + 120
    assert newly["198.51.100.10"]["first_flagged_at"] is None   # its only alert was low

    paths = {k: Path(v) for k, v in two["reports"].items()}
    assert paths == {ext: Path(cfg.data_dir) / "audits" / f"{two['audit_id']}.{ext}" for ext in ("md", "html", "csv")}
    md = paths["md"].read_text()
    assert "## Newly listed (2)" in md and "## Delisted (2)" in md and "## Still listed (1)" in md
    assert DELIST in md and "flagged by smtpguard at" in md and "2d 0h before this audit found the listing" in md
    assert "not flagged by smtpguard before the listing" in md
    assert f"href='{DELIST}'" in paths["html"].read_text()
    rows = list(csv.DictReader(paths["csv"].open()))
    flagged_row = next(r for r in rows if r["category"] == "newly_listed" and r["ip"] == "192.0.2.3")
    assert flagged_row["delist_url"] == DELIST and flagged_row["previous_status"] == "not_listed"
    assert flagged_row["first_flagged_at"]
    base_md = (Path(cfg.data_dir) / "audits" / f"{one['audit_id']}.md").read_text()
    assert "baseline" in base_md and "Newly listed" not in base_md

    with Store(cfg.store_dsn, cfg.store.database) as store:
        db = store.database
        runs = store.query(f"SELECT audit_id, counts FROM {db}.audit_runs ORDER BY started_at")
        assert [r[0] for r in runs] == [one["audit_id"], two["audit_id"]]
        assert runs[1][1]["newly_listed"] == 2 and runs[1][1]["delisted"] == 2
        stored = store.query(f"SELECT status, count() FROM {db}.audit_results WHERE audit_id = {{a:String}} "
                             "GROUP BY status ORDER BY status", {"a": two["audit_id"]})
        assert dict(stored) == {"error": 26, "listed": 3, "not_listed": 10}


def _addresses() -> list[str]:
    return ([f"192.0.2.{i}" for i in range(8)] + [f"198.51.100.{i}" for i in range(8, 12)]
            + ["203.0.113.5"])


def test_text_output_names_the_delisting_page(tmp_path, chdb_dir, servers, silent):
    main, flaky = servers
    cfg = audit_config(tmp_path, chdb_dir, main, flaky, silent, default_zones=["audit-bl"])
    base = invoke(cfg, "--targets", "192.0.2.0/30")
    assert base.exit_code == 0 and "baseline" in base.output, base.output
    reload_zone(main, [":127.0.0.2:Listed $", "192.0.2.2", "192.0.2.3"], "192.0.2.3", listed=True)
    r = invoke(cfg, "--targets", "192.0.2.0/30", "--report-dir", str(tmp_path / "reports"))
    assert r.exit_code == 0, r.output
    assert "newly listed 1, delisted 1, still listed 1" in r.output
    assert f"newly listed: 192.0.2.3 audit-bl 127.0.0.2 spam source; delist: {DELIST}" in r.output
    assert len(list((tmp_path / "reports").glob("*.md"))) == 1


def test_a_second_concurrent_audit_is_refused(tmp_path, chdb_dir, servers, silent):
    main, flaky = servers
    cfg = audit_config(tmp_path, chdb_dir, main, flaky, silent)
    slow = replace(cfg, dnsbl={"default_zones": ["audit-silent"]})
    done: list[audit.Audit] = []

    def long_audit() -> None:
        # the silent zone holds this audit for its 600 ms timeout
        with audit.AuditLock(cfg.data_dir), Store(cfg.store_dsn, cfg.store.database) as store:
            from smtpguard.response.dnsbl import Checker

            done.append(audit.run_audit(store, Checker(slow.dnsbl), ["192.0.2.0/30"],
                                        report_dir=tmp_path / "reports"))

    t = threading.Thread(target=long_audit)
    t.start()
    lock = Path(cfg.data_dir) / "audits" / "audit.lock"
    deadline = time.monotonic() + 5
    while not (lock.exists() and lock.read_text().startswith("pid")) and time.monotonic() < deadline:
        time.sleep(0.01)
    refused = invoke(cfg, "--targets", "192.0.2.0/30", "--zone", "audit-bl")
    t.join()
    assert refused.exit_code == 1
    assert "another blacklist audit is running" in str(refused.exception)
    assert f"pid {os.getpid()}" in str(refused.exception)
    assert len(done) == 1 and done[0].counts["errors"] == 4
    # the lock is gone with the first audit: the next one runs
    after = invoke(cfg, "--targets", "192.0.2.0/30", "--zone", "audit-bl")
    assert after.exit_code == 0, after.output


def test_blocks_wider_than_the_cap_are_refused(tmp_path, chdb_dir, servers, silent):
    main, flaky = servers
    cfg = audit_config(tmp_path, chdb_dir, main, flaky, silent)
    r = invoke(cfg, "--targets", "192.0.0.0/21")
    assert r.exit_code != 0 and "at most 1024 addresses" in str(r.exception)
    r = invoke(cfg, "--targets", "not-a-target")
    assert r.exit_code == 2 and "is not exempted, flagged, an address or a CIDR block" in r.output
    r = invoke(cfg, "--every", "soon")
    assert r.exit_code == 2 and "--every" in r.output


def test_every_repeats_until_sigterm(tmp_path, chdb_dir, servers, silent):
    main, flaky = servers
    cfg = audit_config(tmp_path, chdb_dir, main, flaky, silent, default_zones=["audit-bl"])
    db = cfg.store.database

    def stop_after_two_runs() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if len(list((Path(cfg.data_dir) / "audits").glob("*.md"))) >= 2:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=stop_after_two_runs)
    t.start()
    r = invoke(cfg, "--targets", "192.0.2.0/30", "--every", "0.2s")
    t.join()
    assert r.exit_code == 0, r.output
    assert r.output.count("audit ") >= 2 and "baseline" in r.output and "still listed 2" in r.output
    with Store(cfg.store_dsn, db) as store:
        assert store.count("audit_runs") >= 2


def test_the_store_migrations_create_the_audit_tables(chdb_dir):
    """The audit module is one of the table owners every store migrates (no help from the test)."""
    import uuid

    from smtpguard.core import store as store_mod

    assert "smtpguard.response.audit" in store_mod.MIGRATION_PROVIDERS
    with Store(f"chdb://{chdb_dir}", f"a_{uuid.uuid4().hex[:8]}") as s:
        versions = {r[0] for r in s.query(f"SELECT version FROM {s.database}.schema_migrations")}
        assert "audit-1" in versions
        audit.ensure_tables(s)   # the command's own creation is a no-op on a migrated store
        assert s.count("audit_runs") == 0 and s.count("audit_results") == 0


def test_a_step_listed_twice_runs_once(chdb_dir, monkeypatch):
    """Migrations record each step as they go: a provider named twice does not run its steps again."""
    import uuid

    from smtpguard.core import store as store_mod

    monkeypatch.setattr(store_mod, "MIGRATION_PROVIDERS", (*store_mod.MIGRATION_PROVIDERS, "smtpguard.response.audit"))
    with Store(f"chdb://{chdb_dir}", f"a_{uuid.uuid4().hex[:8]}") as s:
        rows = s.query(f"SELECT version, count() FROM {s.database}.schema_migrations GROUP BY version")
        assert rows and all(n == 1 for _v, n in rows), rows