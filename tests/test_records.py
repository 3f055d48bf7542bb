"""Every record type is defined once: its ClickHouse columns, its Arrow schema and its JSON form derive
from one Struct. Per record: the table the store made has exactly those columns, the Arrow rows have
them, the JSON has the record's fields, and a record written and read back is the same record."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from smtpguard.core.alert import ALERT, Alert
from smtpguard.core.records import RecordType
from smtpguard.core.registry import EVENT, ExemptionEvent
from smtpguard.core.store import Store
from smtpguard.response.findings import FINDINGS, FindingEntry
from smtpguard.response.lookups import DNSBL_ANSWER, DnsblAnswer
from smtpguard.response.outbox import OUTBOX, OutboxEntry
from smtpguard.response.policy import DECISION, Decision

T = dt.datetime(2026, 1, 5, 12, 0, 1, 250_000, tzinfo=dt.timezone.utc)
EXAMPLES: dict[str, tuple[RecordType, msgspec.Struct, str]] = {
    "alert": (ALERT, Alert(
        alert_id="a1", detector="spam_fanout", severity="high", score=0.8, src_ip="2001:db8:1:2::/64", tenant="acct",
        window_start="2026-01-05T12:00:00Z", window_end="2026-01-05T12:01:00Z", reasons=["412 servers", "learning"],
        evidence={"distinct_dst": 412, "top_address": "2001:db8:1:2::9"}, exempted=True, suppressed="",
        status="new", created_at="2026-01-05T12:02:30.500Z", incident_id="i1", next_step="Check the instance"),
        "ORDER BY alert_id"),
    "tenant alert": (ALERT, Alert(
        alert_id="a2", detector="tenant_spam", severity="medium", score=0.6, src_ip=None, tenant="acct",
        window_start="2026-01-05T12:00:00Z", window_end="2026-01-05T12:01:00Z", reasons=["r"], evidence={}),
        "ORDER BY alert_id"),
    "decision": (DECISION, Decision(
        alert_id="a1", ip="192.0.2.7", tenant="acct", detector="spam_fanout", severity="high", alert_at=1767614400000,
        configured="graduated", action="warn", rule="first-offence", reason="a first offence", event_id="",
        decided_at=1767614460123), "ORDER BY alert_id"),
    "exemption event": (EVENT, ExemptionEvent(
        event_id="e1", ip="192.0.2.0/28", tenant="acct", kind="granted", at=T, expires_at=None, actor="alice",
        reason="relay pool", alert_ids=["a1", "a2"], declared_conns_per_min=250.0), "ORDER BY event_id"),
    "DNSBL answer": (DNSBL_ANSWER, DnsblAnswer(
        checked_at="2026-01-05T12:00:01.250Z", ip="192.0.2.7", zone="test-bl", status="listed",
        codes=["127.0.0.2"], meaning="spam source", txt="see https://bl.example", error="",
        delist_url="https://bl.example/remove", weight=1.0, actor="smtpguard-detector", alert_id="a1"),
        "ORDER BY ip"),
    "outbox entry": (OUTBOX, OutboxEntry(
        event_id="e1", ip="192.0.2.7", payload='{"ip":"192.0.2.7"}', created_at=1767614400000, kafka_done=True,
        updated_at=1767614400001), "ORDER BY event_id"),
    "finding for the SIEM": (FINDINGS, FindingEntry(
        alert_id="a1", key="192.0.2.7", payload='{"class_uid":2004}', created_at=1767614400000, done=True,
        updated_at=1767614400001), "ORDER BY alert_id"),
}


@pytest.fixture
def store(cfg):
    s = Store(cfg.store_dsn, cfg.store.database)
    yield s
    s.close()


def _columns(store: Store, table: str) -> dict[str, str]:
    return {r[0]: r[1].replace(" ", "") for r in store.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        {"db": store.database, "t": table})}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_table_arrow_and_json_derive_from_one_definition(store, name):
    rt, example, _order = EXAMPLES[name]
    want = {n: t.replace(" ", "") for n, t in rt.clickhouse_columns()}
    assert _columns(store, rt.table) == want, "the migrated table has the record's columns"
    assert rt.to_arrow([example]).schema.names == list(want), "the Arrow rows have them, in order"
    as_json = msgspec.json.decode(rt.json(example))
    assert list(as_json) == list(rt.fields) and set(rt.fields) <= set(want), "JSON carries the record's fields"


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_a_record_written_and_read_back_is_the_same_record(store, name):
    rt, example, order = EXAMPLES[name]
    scratch = f"scratch_{rt.table}"
    store.client.command(rt.ddl(store.database, f"ENGINE = MergeTree {order}").replace(
        f"{store.database}.{rt.table}", f"{store.database}.{scratch}"))
    store.insert_arrow(scratch, rt.to_arrow([example]))
    [row] = store.query(f"SELECT {rt.select()} FROM {store.database}.{scratch}")
    assert rt.from_row(dict(zip(rt.names, row))) == example
