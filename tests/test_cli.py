"""The command line as a user runs it: a subprocess of the installed ``smtpguard`` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smtpguard.lab import scenario

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))


def run(*args: str, env: dict | None = None, cwd: Path | None = None, input: str | None = None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    e.update(env or {})
    return subprocess.run([SMTPGUARD, *args], capture_output=True, text=True, env=e, cwd=cwd, input=input, timeout=300)


@pytest.fixture(scope="module")
def scen_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-scen")
    scen = scenario.generate(5, instances=60, duration_s=30 * 60)
    return scen, scenario.write(scen, out)


def test_help_on_every_command():
    top = run("--help")
    assert top.returncode == 0 and "analyze" in top.stdout and "demo" in top.stdout
    for cmd in (["audit"], ["collect"], ["console"], ["users", "add"], ["alerts", "incidents"], ["analyze"], ["decode"], ["collect"], ["detect"], ["serve"], ["demo"], ["alerts", "list"],
                ["alerts", "show"], ["config", "show"], ["topics", "create"], ["formats"], ["dnsbl", "check"], ["dnsbl", "zones"],
                ["model", "train"], ["model", "evaluate"], ["eval"], ["exemptions", "grant"], ["exemptions", "list"],
                ["exemptions", "revoke"], ["exemptions", "restore"], ["enforce", "nftables"]):
        r = run(*cmd, "--help")
        assert r.returncode == 0, (cmd, r.stderr)
        assert "Usage:" in r.stdout


def test_wrong_flag_is_one_line_and_exit_2():
    r = run("analyze", "--no-such-flag", "x")
    assert r.returncode == 2 and "no-such-flag" in r.stderr


@pytest.mark.parametrize("toml,needle", [
    ("[kafka]\npartitions = 'many'\n", "kafka.partitions"),
    ("[nope]\nx = 1\n", "nope"),
    ("[ingest]\nsmtp_ports = [25, 70000]\n", "70000"),
    ("[detect.detectors.spam_fanout]\nmin_distinct_dst = 'x'\n", "spam_fanout"),
    ("not toml at all = = =\n", "config file"),
    ("[detect]\nsampling_confidence = 1.0\n", "sampling_confidence"),
])
def test_bad_config_is_one_clear_line_and_exit_2(tmp_path, toml, needle):
    f = tmp_path / "c.toml"
    f.write_text(toml)
    r = run("--config", str(f), "config", "show")
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_env_override_and_secrets_masked(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[kafka.client]\n"sasl.password" = "hunter2"\n"sasl.username" = "sg"\n'
                 '[store]\ndsn = "https://user:s3cret@ch.example:8443/sg"\n')
    r = run("--config", str(f), "config", "show", "--json", env={"SMTPGUARD_KAFKA__PARTITIONS": "16"})
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["kafka"]["partitions"] == 16
    assert data["kafka"]["client"] == {"sasl.password": "***", "sasl.username": "sg"}
    assert "s3cret" not in r.stdout and "hunter2" not in r.stdout
    assert data["detect"]["detectors"]["spam_fanout"]["min_distinct_dst"] > 0
    toml = run("--config", str(f), "config", "show")
    assert toml.returncode == 0 and "[kafka]" in toml.stdout and "hunter2" not in toml.stdout


def test_analyze_json_contract(scen_files):
    scen, paths = scen_files
    r = run("analyze", str(paths["flows"]), "--exemptions", str(paths["exemptions"]), "--json")
    assert r.returncode == 0, r.stderr
    alerts = [json.loads(line) for line in r.stdout.splitlines()]
    assert alerts, r.stderr
    for a in alerts:
        assert {"src_ip", "tenant", "detector", "severity", "score", "window_start", "window_end", "reasons"} <= a.keys()
        assert 0 <= a["score"] <= 1 and a["severity"] in ("info", "low", "medium", "high", "critical")
        assert a["window_start"].endswith("Z") and a["reasons"] and all(isinstance(x, str) for x in a["reasons"])
    medium = [a for a in alerts if a["severity"] in ("medium", "high", "critical")]
    assert {a["src_ip"] for a in medium if a["src_ip"]} == {a.ip for a in scen.abusive}
    # tenant-level alerts only for tenants with abusive instances (here one holds two spammers)
    assert {a["tenant"] for a in medium if a["src_ip"] is None} <= {a.tenant for a in scen.abusive}
    assert all(a["next_step"] for a in alerts)
    assert "alerts" in r.stderr and "lines" in r.stderr  # summary on stderr, not stdout


def test_analyze_reads_stdin_and_gzip(scen_files, tmp_path):
    import gzip
    import shutil

    _scen, paths = scen_files
    gz = tmp_path / "flows.log.gz"
    with open(paths["flows"], "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    a = run("analyze", str(gz), "--json")
    b = run("analyze", "-", "--json", input=Path(paths["flows"]).read_text())
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout


@pytest.mark.parametrize("args,needle", [
    (["--formats", "sflow-0"], "--formats"), (["--formats", "netflow-v5"], "sflow-N"),
    (["--sampling", "64,x"], "--sampling"), (["--sampling", "0"], "--sampling"),
])
def test_eval_wrong_format_or_rate_is_one_line_and_exit_2(args, needle):
    r = run("eval", "--seeds", "101", *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_analyze_missing_input_and_unknown_format(tmp_path):
    r = run("analyze", str(tmp_path / "missing.log"))
    assert r.returncode == 2 and "not found" in r.stderr
    junk = tmp_path / "junk.txt"
    junk.write_text("hello world\nthis is not a flow log\n")
    r = run("analyze", str(junk))
    assert r.returncode == 2 and "--format" in r.stderr


def test_decode_json_and_rejects(tmp_path):
    f = tmp_path / "flows.log"
    f.write_text(
        "2 123456789010 eni-1 10.0.0.1 198.51.100.7 40001 25 6 5 300 1700000000 1700000060 ACCEPT OK\n"
        "2 123456789010 eni-1 198.51.100.7 10.0.0.1 25 40001 6 4 200 1700000000 1700000060 ACCEPT OK\n"
        "2 123456789010 eni-1 10.0.0.1 not-an-ip 40002 25 6 5 300 1700000000 1700000060 ACCEPT OK\n")
    r = run("decode", str(f), "--json", "--smtp-only")
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and len(recs) == 1
    assert recs[0]["src_ip"] == "10.0.0.1" and recs[0]["rev_bytes"] == 200 and recs[0]["tenant"] == "123456789010"
    assert recs[0]["start"] == "2023-11-14T22:13:20.000Z"
    r = run("decode", str(f), "--rejects", "--json")
    rej = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rej) == 1 and rej[0]["location"] == "3" and "not-an-ip" in rej[0]["raw"]


def test_alerts_list_show_and_store_lock(tmp_path, scen_files):
    """alerts list/show read the store; a second process on an owned embedded store gets a clear error."""
    from smtpguard.app.analyze import analyze
    from smtpguard.core.config import load
    from smtpguard.core.exemptions import Exemptions
    from smtpguard.core.store import Store

    _scen, paths = scen_files
    data = tmp_path / "data"
    cfg = load(environ={}, overrides={"data_dir": str(data), "store": {"dsn": f"chdb://{data}/store"}})
    res = analyze(cfg, [str(paths["flows"])], "aws-vpc", Exemptions.from_csv(paths["exemptions"]))
    store = Store(cfg.store_dsn, cfg.store.database)
    try:
        store.insert_alerts(res.alerts)
        locked = run("--data-dir", str(data), "alerts", "list")
        assert locked.returncode == 1 and "in use by another process" in locked.stderr and str(os.getpid()) in locked.stderr
    finally:
        store.close()
    r = run("--data-dir", str(data), "alerts", "list", "--severity", "high", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows and all(x["severity"] in ("high", "critical") for x in rows)
    inc = run("--data-dir", str(data), "alerts", "incidents", "--json")
    incidents = [json.loads(x) for x in inc.stdout.splitlines()]
    assert inc.returncode == 0 and incidents
    assert sum(i["alerts"] for i in incidents) == len([a for a in res.alerts if not a.suppressed])
    one = run("--data-dir", str(data), "alerts", "show", rows[0]["alert_id"])
    assert one.returncode == 0 and rows[0]["src_ip"] in one.stdout and "reasons:" in one.stdout
    assert run("--data-dir", str(data), "alerts", "show", "nope").returncode == 1
    bad = run("--data-dir", str(data), "alerts", "list", "--since", "yesterday-ish")
    assert bad.returncode == 2
