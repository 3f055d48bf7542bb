"""The deployment kit (deploy/, docs/DEPLOYMENT.md): systemd units that systemd accepts and whose
command lines the CLI accepts, a server config that loads, topic settings that match the config's
topic names, and the store's schema applied and printed by `smtpguard store`."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from smtpguard.cli.main import cli
from smtpguard.core import config as config_mod
from smtpguard.core.store import Store, addr_text, all_migrations

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED = "/opt/smtpguard/venv/bin/smtpguard"
#: this checkout's smtpguard, standing in for the installed one
HERE = str(Path(sys.executable).with_name("smtpguard"))


def _instance(unit: Path) -> str:
    return unit.name.replace("@.service", "@31.service")


def _verify(units: list[Path], tmp_path: Path) -> subprocess.CompletedProcess:
    for u in units:
        (tmp_path / u.name).write_text(u.read_text().replace(INSTALLED, HERE))
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *[f"./{_instance(u)}" for u in units]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_the_kit_has_a_unit_per_long_running_service() -> None:
    names = {u.name for u in UNITS}
    assert {"smtpguard-detect@.service", "smtpguard-respond.service", "smtpguard-console.service",
            "smtpguard-collect-netflow.service", "smtpguard-audit.service"} <= names


def test_systemd_accepts_every_unit(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "make test installs systemd (systemd-analyze)"
    r = _verify(UNITS, tmp_path)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_the_unit_check_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "in"
    broken.mkdir()
    unit = DEPLOY / "systemd" / "smtpguard-respond.service"
    bad = broken / unit.name
    bad.write_text(unit.read_text().replace("Type=exec", "Type=sometimes").replace(INSTALLED, "/nonexistent/smtpguard"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"./{bad.name}"], cwd=broken, capture_output=True,
                       text=True, timeout=60)
    assert "Type" in r.stderr or "sometimes" in r.stderr, r.stderr
    assert r.returncode != 0 and "/nonexistent/smtpguard" in r.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_every_unit_runs_a_command_line_the_cli_accepts(unit: Path) -> None:
    m = re.search(r"^ExecStart=(.+)$", unit.read_text(), re.M)
    assert m, unit
    argv = shlex.split(m.group(1).replace("%i", "31"))
    assert argv[0] == INSTALLED
    r = CliRunner().invoke(cli, [*argv[1:], "--help"])
    assert r.exit_code == 0, r.output


def test_the_server_config_loads_and_shows_as_toml_that_loads_back(tmp_path: Path) -> None:
    cfg = config_mod.load(DEPLOY / "smtpguard.toml", environ={})
    assert cfg.kafka.client["security.protocol"] == "SASL_SSL"
    assert cfg.store.dsn.startswith("https://")
    r = CliRunner().invoke(cli, ["--config", str(DEPLOY / "smtpguard.toml"), "config", "show"])
    assert r.exit_code == 0, r.output
    assert "change-me" not in r.output  # secrets are masked
    shown = tmp_path / "shown.toml"
    shown.write_text(r.output)
    back = config_mod.load(shown, environ={})
    assert back.kafka.client.keys() == cfg.kafka.client.keys()
    assert back.kafka.topics == cfg.kafka.topics and back.detect.inventory_csv == cfg.detect.inventory_csv
    # what `config show` prints is a fixed point: shown again, it is the same text
    again = CliRunner().invoke(cli, ["--config", str(shown), "config", "show"])
    assert again.output == r.output


def test_the_topic_script_creates_the_configured_topics() -> None:
    script = DEPLOY / "kafka-topics.sh"
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
    created = [t for t in re.findall(r"--topic (\S+)", script.read_text()) if "$" not in t]
    topics = config_mod.Config().kafka.topics
    assert sorted(created) == sorted([topics.flows, topics.dlq, topics.alerts, topics.enforcement])
    enforcement = script.read_text().split(f"--topic {topics.enforcement}")[1]
    assert "cleanup.policy=compact" in enforcement


def test_store_migrate_applies_every_step_once_and_schema_prints_them(tmp_path: Path) -> None:
    run = CliRunner()
    args = ["--data-dir", str(tmp_path)]
    first = run.invoke(cli, [*args, "store", "migrate"])
    steps = all_migrations("smtpguard")
    assert first.exit_code == 0, first.output
    assert first.output.startswith(f"{len(steps)} schema steps applied now")
    again = run.invoke(cli, [*args, "store", "migrate"])
    assert again.output.startswith("0 schema steps applied now")
    with Store(f"chdb://{tmp_path / 'store'}", create=False) as st:
        tables = {r[0] for r in st.query("SELECT name FROM system.tables WHERE database = 'smtpguard'")}
    schema = run.invoke(cli, ["store", "schema", "--database", "sg"])
    assert schema.exit_code == 0
    assert re.findall(r"^-- step (\S+)$", schema.output, re.M) == [v for v, _ in steps]
    for t in tables - {"schema_migrations"}:
        assert f"sg.{t} " in schema.output or f"sg.{t}\n" in schema.output or f"sg.{t}(" in schema.output, t


def _ttl_days(store: Store, table: str) -> int | None:
    sql = store.query("SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}",
                      {"db": store.database, "t": table})[0][0]
    m = re.search(r"TTL toDateTime\((\w+)\) \+ toIntervalDay\((\d+)\)", sql)
    if m is None:
        return None
    assert m.group(1) == ("checked_at" if table == "dnsbl_checks" else "stored_at"), sql
    return int(m.group(2))


def test_retention_is_a_ttl_per_table_from_the_config_and_old_rows_expire(tmp_path: Path) -> None:
    import datetime as dt

    import pyarrow as pa

    from smtpguard.core import record

    run = CliRunner()
    args = ["--data-dir", str(tmp_path)]
    out = run.invoke(cli, [*args, "store", "migrate"])
    assert "flows: rows kept 30 days" in out.output and "window_features: rows kept 180 days" in out.output
    dsn = f"chdb://{tmp_path / 'store'}"
    with Store(dsn, create=False) as st:
        assert (_ttl_days(st, "flows"), _ttl_days(st, "window_features"), _ttl_days(st, "dnsbl_checks")) == (30, 180, None)
        assert _ttl_days(st, "alerts") is None  # alerts are kept
    changed = run.invoke(cli, [*args, "store", "migrate"], env={"SMTPGUARD_STORE__RETENTION_DAYS": "{flows = 7}"})
    assert "flows: rows kept 7 days" in changed.output and "window_features: rows kept for ever" in changed.output
    with Store(dsn, create=False) as st:
        assert (_ttl_days(st, "flows"), _ttl_days(st, "window_features")) == (7, None)
        # retention counts from when a row was stored, not from its event time: a flow of two years ago read
        # today stays; one stored 30 days ago goes
        now = dt.datetime.now(dt.timezone.utc)
        old_event = now - dt.timedelta(days=730)
        rows = [{"start": old_event, "end": old_event, "src_ip": ip, "dst_ip": "192.0.2.25", "src_port": 40000,
                 "dst_port": 25, "protocol": 6, "packets": 1, "bytes": 60, "source_format": "aws-vpc"}
                for ip in ("10.0.0.1", "10.0.0.2")]
        flows = record.from_dicts(rows)
        extra = pa.table({"kafka_partition": pa.array([0, 0], pa.uint32()), "kafka_offset": pa.array([1, 2], pa.int64()),
                          "kafka_row": pa.array([0, 0], pa.uint32()),
                          "stored_at": pa.array([now - dt.timedelta(days=30), now], pa.timestamp("s", tz="UTC"))})
        st.insert_arrow("flows", pa.Table.from_arrays(flows.columns + extra.columns,
                                                      names=flows.column_names + extra.column_names))
        st.query(f"OPTIMIZE TABLE {st.database}.flows FINAL")
        assert [r[0] for r in st.query(f"SELECT {addr_text('src_ip')} FROM {st.database}.flows")] == ["10.0.0.2"]


def test_a_table_that_cannot_expire_is_a_config_error() -> None:
    import os

    env = {**os.environ, "SMTPGUARD_STORE__RETENTION_DAYS": "{alerts = 7}"}
    r = subprocess.run([HERE, "config", "show"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'alerts' cannot expire" in r.stderr and len(r.stderr.strip().splitlines()) == 1
