"""Alerts as OCSF Detection Findings: validated against the OCSF schema of the version we name (shipped
by the `ocsf-json-schema` package, read offline), every alert field mapped, and the same object from
`alerts list|show --format ocsf` and on the OCSF topic."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import jsonschema
import msgspec
import pytest
from click.testing import CliRunner
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from conftest import replace
from test_response_service import Hook
from test_streaming import (read_topic, run_detector_until_idle, run_responder_until_idle,  # noqa: F401
                            small_scenario)
from smtpguard.app.analyze import analyze
from smtpguard.cli.main import cli
from smtpguard.core import ocsf
from smtpguard.core.alert import Alert, from_json
from smtpguard.core.exemptions import Exemptions
from smtpguard.core.kafka import ensure_topics
from smtpguard.core.store import Store
from smtpguard.ingest.collector import Collector
from smtpguard.response.lookups import DNSBL_ANSWER, DnsblAnswer

VALIDATOR = jsonschema.Draft202012Validator(
    OcsfJsonSchemaEmbedded(get_ocsf_schema(ocsf.OCSF_VERSION)).get_class_schema("detection_finding", []))


def valid(obj: dict) -> dict:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(obj)]
    assert not errors, errors[:5]
    assert obj["type_uid"] == obj["class_uid"] * 100 + obj["activity_id"]  # the schema does not check this
    return obj


FULL = Alert(alert_id="a1b2c3", detector="spam_fanout", severity="high", score=0.87, src_ip="2001:db8:1:2::/64",
             tenant="acct-7", window_start="2026-12-01T10:00:00.000Z", window_end="2026-12-01T10:01:00.000Z",
             reasons=["120 distinct mail servers in a minute", "80 % never seen before"],
             evidence={"top_address": "2001:db8:1:2::5", "top_dst": "192.0.2.1", "instance_id": "i-0abc",
                       "distinct_dst": 120, "learning": False},
             exempted=True, status="acknowledged", created_at="2026-12-01T10:01:31.000Z", incident_id="inc-9",
             next_step="revoke the exemption and notify the customer")


def _ms(iso: str) -> int:
    return int(dt.datetime.fromisoformat(iso).replace(tzinfo=dt.timezone.utc).timestamp() * 1000)


def test_every_alert_field_has_its_place_in_the_finding() -> None:
    f = valid(ocsf.finding(FULL))
    where = {
        "alert_id": f["metadata"]["uid"] == f["finding_info"]["uid"] == "a1b2c3",
        "detector": f["finding_info"]["analytic"]["name"] == "spam_fanout" and f["finding_info"]["types"] == ["spam_fanout"],
        "severity": f["severity_id"] == 4 and f["severity"] == "High",
        "score": f["confidence_score"] == 87,
        "src_ip": f["resources"][0]["uid"] == "2001:db8:1:2::/64" and f["unmapped"]["src_key"] == FULL.src_ip,
        "tenant": f["metadata"]["tenant_uid"] == "acct-7" and f["resources"][0]["group"]["uid"] == "acct-7",
        "window_start": f["start_time"] == f["finding_info"]["first_seen_time"] == _ms("2026-12-01T10:00:00"),
        "window_end": f["end_time"] == f["finding_info"]["last_seen_time"] == _ms("2026-12-01T10:01:00"),
        "reasons": f["finding_info"]["desc"] == "; ".join(FULL.reasons),
        "evidence": f["unmapped"]["evidence"] == FULL.evidence
        and f["evidences"][0] == {"src_endpoint": {"ip": "2001:db8:1:2::5", "instance_uid": "i-0abc"},
                                  "dst_endpoint": {"ip": "192.0.2.1"}},
        "exempted": f["unmapped"]["exempted"] is True,
        "suppressed": f["unmapped"]["suppressed"] == "" and f["status_id"] == 2,
        "status": f["unmapped"]["alert_status"] == "acknowledged" and f["activity_id"] == 2,
        "created_at": f["time"] == _ms("2026-12-01T10:01:31"),
        "incident_id": f["metadata"]["correlation_uid"] == "inc-9",
        "next_step": f["remediation"]["desc"] == FULL.next_step,
    }
    assert set(where) == {fd.name for fd in msgspec.structs.fields(Alert)}, "a new alert field needs its place"
    assert [k for k, ok in where.items() if not ok] == []
    assert f["observables"] == [{"name": "evidences[0].src_endpoint.ip", "type_id": 2, "type": "IP Address",
                                 "value": "2001:db8:1:2::5"}]


def test_tenant_alerts_suppressed_findings_and_dnsbl_answers_validate() -> None:
    tenant = msgspec.structs.replace(FULL, src_ip=None, evidence={}, suppressed="cooldown", status="new",
                                     created_at="1970-01-01T00:00:00Z", next_step="", incident_id="")
    f = valid(ocsf.finding(tenant))
    assert f["status_id"] == 3 and f["activity_id"] == 1 and "evidences" not in f
    assert f["resources"] == [{"uid": "tenant:acct-7", "type": "tenant", "name": "acct-7"}]
    assert f["time"] == f["end_time"]  # no creation time: the window's end
    answers = [{"zone": "zen.example", "status": "listed", "codes": ["127.0.0.2"], "meaning": "spam source",
                "txt": "see the page", "checked_at": "2026-12-01T10:02:00Z", "delist_url": "https://dnsbl.example/d"}]
    g = valid(ocsf.finding(FULL, answers))
    assert g["enrichments"][0]["name"] == "dnsbl:zen.example" and g["enrichments"][0]["value"] == "listed"
    assert g["enrichments"][0]["data"]["codes"] == ["127.0.0.2"]


def test_the_validation_can_fail() -> None:
    f = ocsf.finding(FULL)
    for broken in ({**f, "class_uid": "2004"}, {k: v for k, v in f.items() if k != "finding_info"},
                   {**f, "severity_id": 42}, {**f, "src_endpoint": {"ip": "192.0.2.1"}}):
        assert list(VALIDATOR.iter_errors(broken)), broken


def test_alerts_list_and_show_print_valid_findings(offline_cfg, small_scenario, tmp_path: Path) -> None:  # noqa: F811
    _scen, paths = small_scenario
    result = analyze(offline_cfg, [str(paths["flows"])], "aws-vpc", Exemptions.from_csv(paths["exemptions"]))
    alerts = result.alerts
    assert len(result.raised()) >= 4 and any(a.suppressed for a in alerts)
    with Store(offline_cfg.store_dsn, offline_cfg.store.database) as store:
        store.insert_alerts(alerts)
        hit = next(a for a in result.raised() if a.src_ip and a.severity in ("medium", "high", "critical"))
        store.insert_arrow(DNSBL_ANSWER.table, DNSBL_ANSWER.to_arrow([DnsblAnswer(
            checked_at="2026-12-01T10:02:00.000Z", ip=hit.src_ip, zone="demo-bl", status="listed", codes=["127.0.0.2"],
            meaning="spam source", txt="listed for spam", error="", delist_url="https://example.org/delist", weight=1.0,
            actor="test", alert_id=hit.alert_id)]))
    args = ["--data-dir", offline_cfg.data_dir]
    run = CliRunner(env={"SMTPGUARD_STORE__DATABASE": offline_cfg.store.database})
    out = run.invoke(cli, [*args, "alerts", "list", "--format", "ocsf", "--suppressed", "--limit", "100000"])
    assert out.exit_code == 0, out.output
    findings = [valid(json.loads(line)) for line in out.output.splitlines()]
    assert sorted(f["finding_info"]["uid"] for f in findings) == sorted(a.alert_id for a in alerts)
    by_id = {a.alert_id: a for a in alerts}
    for f in findings:
        a = by_id[f["finding_info"]["uid"]]
        assert f["severity_id"] == ocsf.SEVERITY_ID[a.severity] and (f["status_id"] == 3) == bool(a.suppressed)
    shown = run.invoke(cli, [*args, "alerts", "show", hit.alert_id, "--format", "ocsf"])
    assert shown.exit_code == 0, shown.output
    one = valid(json.loads(shown.output))
    assert one["finding_info"]["uid"] == hit.alert_id
    assert [(e["name"], e["value"]) for e in one["enrichments"]] == [("dnsbl:demo-bl", "listed")]


def test_the_ocsf_topic_and_the_siem_webhook_carry_the_finding_of_every_raised_alert(cfg, small_scenario) -> None:  # noqa: F811
    from smtpguard.response.webhook import signature

    _scen, paths = small_scenario
    siem = Hook()
    try:
        cfg = replace(cfg, kafka={"topics": msgspec.structs.replace(cfg.kafka.topics,
                                                                    ocsf=cfg.kafka.topics.alerts + "-ocsf")},
                      response={"siem_webhook": {"url": siem.url, "secret": "s3cret"}})
        ensure_topics(cfg)
        stats = Collector(cfg).run([str(paths["flows"])], "aws-vpc")
        with Store(cfg.store_dsn, cfg.store.database) as store:
            runner = run_detector_until_idle(cfg, store, Exemptions.from_csv(paths["exemptions"]), stats.kept)
            assert runner.stats.alerts_raised >= 4
            run_responder_until_idle(cfg, store, runner.stats.alerts_raised, lookups=False)
    finally:
        siem.close()
    on_alerts = [from_json(m.value()) for m in read_topic(cfg, cfg.kafka.topics.alerts, runner.stats.alerts_raised)]
    on_ocsf = read_topic(cfg, cfg.kafka.topics.ocsf, runner.stats.alerts_raised)
    by_id = {a.alert_id: a for a in on_alerts}
    assert len(on_alerts) == len(by_id) == runner.stats.alerts_raised
    assert len(on_ocsf) == len(on_alerts)  # each raised alert once on each topic
    topic = {}
    for m in on_ocsf:
        f = valid(json.loads(m.value()))
        a = by_id[f["finding_info"]["uid"]]
        assert f == json.loads(ocsf.to_json(a))  # the same object as `alerts list --format ocsf`
        assert m.key().decode() == (a.src_ip or f"tenant:{a.tenant}")
        topic[a.alert_id] = f
    assert topic.keys() == by_id.keys()
    # the SIEM webhook: every raised alert once, the same object, signed
    hooked = {}
    for headers, body in siem.raw:
        assert headers["X-Smtpguard-Signature"] == signature("s3cret", headers["X-Smtpguard-Timestamp"], body)
        f = valid(json.loads(body))
        assert headers["X-Smtpguard-Event-Id"] == f["finding_info"]["uid"] not in hooked
        hooked[f["finding_info"]["uid"]] = f
    assert hooked == topic
