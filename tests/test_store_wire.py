"""The store schema against the record and feature definitions, and the Kafka wire format."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from smtpguard.core import record, wire
from smtpguard.detectors.features import FEATURES
from smtpguard.core.alert import ALERT
from smtpguard.core.store import Store, addr_text

T = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def sample(n: int = 3) -> pa.Table:
    return record.from_dicts([dict(start=T, end=T + dt.timedelta(seconds=1), src_ip=f"10.0.0.{i}", dst_ip="192.0.2.1",
                                   src_port=1000 + i, dst_port=25, protocol=6, packets=2, bytes=120, action="reject",
                                   tcp_flags=2, tenant="acct") for i in range(n)])


def _normalise(t: str) -> str:
    return t.replace(" ", "").replace("'", "")


@pytest.fixture
def store(chdb_dir):
    import uuid

    s = Store(f"chdb://{chdb_dir}", f"w_{uuid.uuid4().hex[:8]}")
    yield s
    s.close()


def test_tables_match_the_definitions(store):
    def columns(table):
        return {r[0]: r[1] for r in store.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            {"db": store.database, "t": table})}

    from smtpguard.core.store import FLOW_POSITION_COLUMNS, STORED_AT

    stored = {STORED_AT[0]: STORED_AT[1]}
    want = {f.name: _normalise(f.clickhouse) for f in record.FIELDS} | {k: v for k, v in FLOW_POSITION_COLUMNS} | stored
    assert {k: _normalise(v) for k, v in columns("flows").items()} == want
    assert {k: _normalise(v) for k, v in columns("window_features").items()} == \
        {f.name: _normalise(f.clickhouse) for f in FEATURES} | stored
    assert {k: _normalise(v) for k, v in columns("alerts").items()} == {
        n: _normalise(t) for n, t in ALERT.clickhouse_columns()}


def test_migration_is_idempotent_and_records_round_trip(store):
    assert store.migrate() == 0
    t = sample(3)
    store.insert_flows(t.append_column("kafka_partition", pa.array([0, 0, 0], pa.uint32()))
                       .append_column("kafka_offset", pa.array([7, 7, 7], pa.int64()))
                       .append_column("kafka_row", pa.array([0, 1, 2], pa.uint32())))
    rows = store.query(f"SELECT {addr_text('src_ip')} AS ip, action, tcp_flags, start FROM {store.database}.flows "
                       "ORDER BY ip")
    assert [r[0] for r in rows] == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    assert rows[0][1] == "reject" and rows[0][2] == 2
    assert rows[0][3].replace(tzinfo=dt.timezone.utc) == T


def test_second_process_gets_a_clear_error_naming_the_owner(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "owned"
    with Store(f"chdb://{path}"):
        code = ("import sys\nfrom smtpguard.core.store import Store\nfrom smtpguard.core.errors import StoreLockedError\n"
                f"try:\n    Store('chdb://{path}')\nexcept StoreLockedError as e:\n    print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    import os

    assert r.returncode == 3 and f"pid {os.getpid()}" in r.stdout


def test_arrow_wire_round_trip_and_partitioning():
    t = sample(50)
    msgs = list(wire.encode_batches(t, partitions=4, max_records=7))
    assert sum(n for _, _, n in msgs) == 50
    for p, payload, n in msgs:
        back = wire.decode_message(payload, wire.HEADERS)
        assert back.num_rows == n and back.schema.equals(record.SCHEMA)
        assert set(wire.partition_of(back.column("src_ip"), 4)) == {p}
    # same IP, same partition, whatever else is in the batch
    one = wire.partition_of(pa.array(["10.0.0.7"]), 4)[0]
    many = wire.partition_of(pa.array(["10.0.0.1", "10.0.0.7", "10.0.0.9"]), 4)[1]
    assert one == many


def test_wire_rejects_wrong_version_and_garbage():
    t = sample(1)
    old = t.replace_schema_metadata({b"smtpguard.core.record.version": b"0"})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, old.schema) as w:
        w.write_table(old)
    with pytest.raises(wire.WireError, match="version 0"):
        wire.decode_message(sink.getvalue().to_pybytes(), wire.HEADERS)
    with pytest.raises(wire.WireError, match="Arrow"):
        wire.decode_message(b"\xff" * 40, wire.HEADERS)
    with pytest.raises(wire.WireError, match="empty"):
        wire.decode_message(b"", None)


def test_json_records_from_other_producers():
    msg = b'{"start": "2026-01-01T00:00:00Z", "end": 1767225601000, "src_ip": "10.1.1.1", "dst_ip": "2001:db8::0001", "dst_port": 25}'
    t = wire.decode_message(msg, [("content-type", b"application/json")])
    row = t.to_pylist()[0]
    assert row["dst_ip"] == "2001:db8::1" and row["packets"] == 0 and row["action"] == "unknown"
    with pytest.raises(wire.WireError, match="JSON"):
        wire.decode_message(b'{"src_ip": "10.1.1.1"}', [("content-type", b"application/json")])


def test_readme_field_table_matches_the_record():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert record.markdown_table() in readme
