"""Typed flow addresses and per-minute rollups of the flows (``source_minutes``, ``tenant_minutes``:
smtpguard.core.store.ROLLUPS) on the real ClickHouse engine: a store made by the schema before them
(addresses as text, no rollups) is carried forward with every flow kept as it was and its rollups
filled; the detector's window closes (replays included) keep the rollups equal to the raw flows,
and the notebooks' queries over them match the same queries over flows."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from smtpguard.core import record
from smtpguard.core import store as store_mod
from smtpguard.core.store import Store, addr_text

#: every flow as text, in a fixed order: what must survive a migration unchanged
FLOW_TEXT = (f"SELECT {addr_text('src_ip')}, {addr_text('dst_ip')}, toUnixTimestamp64Milli(`start`), src_port, "
             "bytes, tenant, kafka_partition, kafka_offset, kafka_row FROM smtpguard.flows FINAL ORDER BY 7, 8, 9")


def _batches(tmp_path):
    from smtpguard.ingest.reader import read_batches
    from smtpguard.lab import scenario

    scen = scenario.generate(11, instances=60, duration_s=30 * 60, abuse=("spam_burst", "spam_ipv6_rotating"))
    paths = scenario.write(scen, tmp_path / "scenario")
    out = []
    for n, (_src, batch) in enumerate(read_batches([str(paths["flows"])], "aws-vpc", (25, 465, 587, 2525), 20_000)):
        rows = batch.records.num_rows
        # the position a record would have had on the flows topic: one message per batch
        out.append(batch.records.append_column("kafka_partition", pa.array([n % 3] * rows, pa.uint32()))
                   .append_column("kafka_offset", pa.array([n] * rows, pa.int64()))
                   .append_column("kafka_row", pa.array(range(rows), pa.uint32())))
    assert len(out) >= 4
    return out


def _same(a, b) -> None:
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and len(a) == len(b) and len(a) > 0
    for c in a.columns:
        assert a[c].tolist() == pytest.approx(b[c].tolist()) if a[c].dtype.kind == "f" else a[c].tolist() == b[c].tolist(), c


def _check(store: Store) -> None:
    from smtpguard.lab import notebook

    busy = notebook.sources(store).src_ip.head(20).tolist()
    _same(notebook.per_minute(store, busy), notebook.per_minute(store, busy, raw=True))
    _same(notebook.tenant_traffic(store), notebook.tenant_traffic(store, raw=True))


def test_an_older_store_is_carried_forward_and_the_rollups_match_raw_flows(tmp_path, monkeypatch):
    batches = _batches(tmp_path)
    dsn = f"chdb://{tmp_path / 'store'}"
    every = store_mod.all_migrations
    # a store made by the schema before typed addresses and rollups, holding flows (one message written
    # twice: a replay)
    text_fields = tuple(dataclasses.replace(f, clickhouse="String") if f.name in ("src_ip", "dst_ip") else f
                        for f in record.FIELDS)
    monkeypatch.setattr(store_mod.record, "FIELDS", text_fields)
    monkeypatch.setattr(store_mod, "all_migrations",
                        lambda db: [s for s in every(db) if s[0] not in ("core-5", "core-6", "core-7")])
    with Store(dsn) as old:
        old.apply_retention({"flows": 3650})
        for b in batches[:3] + batches[1:2]:
            old.insert_flows(b)
        assert "source_minutes" not in {r[0] for r in old.query("SHOW TABLES FROM smtpguard")}
        assert "`src_ip` String" in old.query("SHOW CREATE TABLE smtpguard.flows")[0][0]
        # a notebook on a store without the rollups yet reads the raw flows
        from smtpguard.lab import notebook

        busy = notebook.sources(old).src_ip.head(3).tolist()
        assert set(notebook.per_minute(old, busy).src_ip) == set(busy) and len(notebook.tenant_traffic(old)) > 0
        flows_before = old.query(FLOW_TEXT.replace(addr_text("src_ip"), "src_ip").replace(addr_text("dst_ip"), "dst_ip"))
    monkeypatch.undo()
    with Store(dsn) as s:
        versions = {r[0] for r in s.query("SELECT version FROM smtpguard.schema_migrations")}
        assert {"core-5", "core-6", "core-7"} <= versions
        ddl = s.query("SHOW CREATE TABLE smtpguard.flows")[0][0]
        assert "`src_ip` IPv6" in ddl and "`dst_ip` IPv6" in ddl and "`tenant` LowCardinality(String)" in ddl
        # the copy keeps the retention, and its rows expire by it (their parts carry the TTL)
        assert "TTL toDateTime(stored_at) + toIntervalDay(3650)" in ddl
        assert s.query("SELECT min(delete_ttl_info_min) > toDateTime('2000-01-01') FROM system.parts "
                       "WHERE database = 'smtpguard' AND table = 'flows' AND active")[0][0]
        assert s.query(FLOW_TEXT) == flows_before  # no flow lost, every value as it was
        assert len(flows_before) == sum(b.num_rows for b in batches[:3])
        assert {":" in r[0] for r in flows_before} == {True, False}  # IPv6 sources and IPv4 ones
        _check(s)
        # from here the detector keeps the rollups as it closes windows. After the upgrade it replays what
        # its windows had open (here: everything, a detector that lost its checkpoint) and reads on; its
        # one-minute windows rewrite the rows folded from before with the same keys. A second replay of
        # everything changes nothing either.
        for replay in range(2):
            detect_and_write(s, batches)
            _check(s)
        raw = s.query("SELECT sum(greatest(sampling_rate, 1)) FROM smtpguard.flows FINAL")[0][0]
        assert raw > 0
        assert s.query("SELECT sum(connections) FROM smtpguard.source_minutes FINAL")[0][0] == raw
        assert s.query("SELECT sum(connections) FROM smtpguard.tenant_minutes FINAL")[0][0] == raw
        # the rollups hold fewer rows than the raw flows they stand for
        assert s.query("SELECT count() FROM smtpguard.source_minutes FINAL")[0][0] < s.count("flows")


def detect_and_write(store: Store, batches: list[pa.Table], inventory=None) -> None:
    """What the detector consumer writes for ``batches`` (each one Kafka message on its partition): the
    flows as consumed, and at each window close the closing records for the rollups."""
    from smtpguard.core.config import Config
    from smtpguard.detectors.pipeline import Pipeline

    pipe = Pipeline(Config(), rollups=True, inventory=inventory)
    for b in batches:
        store.insert_flows(b)
        out = pipe.process(b.drop_columns(["kafka_partition", "kafka_offset", "kafka_row"]),
                           key=b["kafka_partition"][0].as_py())
        if out.rollups is not None:
            store.insert_rollups(out.rollups.to_arrow())
    out = pipe.flush()
    if out.rollups is not None:
        store.insert_rollups(out.rollups.to_arrow())


def test_a_large_close_reaches_the_rollup_views_as_one_block(tmp_path, monkeypatch):
    """A view folds one block at a time: a write split into blocks (many Arrow batches, a server with small
    ``max_insert_block_size``) would leave partial rows under one key, of which FINAL keeps one."""
    batches = _batches(tmp_path)
    with Store(f"chdb://{tmp_path / 'store'}") as s:
        write = s.insert_arrow

        def small_blocks(table, data, settings=None):  # a server that cuts inserts into blocks of 50 rows
            settings = {"max_insert_block_size": 50, "min_insert_block_size_rows": 50, **(settings or {})}
            return write(table, pa.Table.from_batches(data.to_batches(max_chunksize=50)), settings)

        monkeypatch.setattr(s, "insert_arrow", small_blocks)
        detect_and_write(s, batches)
        assert s.query("SELECT count() FROM smtpguard.source_minutes")[0][0] < s.count("flows")
        _check(s)
        raw = s.query("SELECT sum(greatest(sampling_rate, 1)) FROM smtpguard.flows FINAL")[0][0]
        assert s.query("SELECT sum(connections) FROM smtpguard.tenant_minutes FINAL")[0][0] == raw


def test_the_rollups_keep_the_records_tenant_where_the_inventory_fills_one_in(tmp_path):
    """Records without a tenant (NetFlow, captures) are judged under the inventory's tenant; the rollups, like
    ``flows``, keep what the record said, so the notebooks read the same either way."""
    from smtpguard.core.inventory import Inventory

    batches = [b.set_column(b.schema.get_field_index("tenant"), "tenant", pa.array([""] * b.num_rows))
               for b in _batches(tmp_path)]
    inventory = Inventory.from_rows([("0.0.0.0/0", "999900000001", "", ""), ("::/0", "999900000001", "", "")])
    with Store(f"chdb://{tmp_path / 'store'}") as s:
        detect_and_write(s, batches, inventory)
        _check(s)
        assert s.query("SELECT groupUniqArray(tenant) FROM smtpguard.source_minutes")[0][0] == [""]


def test_a_replayed_window_close_rewrites_the_rollups_instead_of_adding_to_them(tmp_path):
    batches = _batches(tmp_path)
    with Store(f"chdb://{tmp_path / 'store'}") as s:
        detect_and_write(s, batches[:2])
        before = s.query("SELECT sum(connections), count() FROM smtpguard.source_minutes FINAL")[0]
        detect_and_write(s, batches[:2])  # a detector that replays the same messages
        assert s.query("SELECT sum(connections), count() FROM smtpguard.source_minutes FINAL")[0] == before
        detect_and_write(s, batches)
        _check(s)
        # the Null table that takes the detector's rows keeps none of them
        assert s.query("SELECT count() FROM smtpguard.rollup_input")[0][0] == 0


def test_show_create_table_has_the_rollups_types_and_the_views(tmp_path):
    with Store(f"chdb://{tmp_path / 'store'}") as s:
        for name in store_mod.ROLLUPS:
            ddl = s.query(f"SHOW CREATE TABLE smtpguard.{name}")[0][0]
            assert "ReplacingMergeTree" in ddl and "AggregateFunction(uniqExact, IPv6)" in ddl
            assert "`tenant` LowCardinality(String)" in ddl
            view = s.query(f"SHOW CREATE TABLE smtpguard.{name}_mv")[0][0]
            assert "MATERIALIZED VIEW" in view and f"TO smtpguard.{name}" in view
            # filled at window close, not on every flows write
            assert "FROM smtpguard.rollup_input" in view and "smtpguard.flows" not in view
        assert "ENGINE = `Null`" in s.query("SHOW CREATE TABLE smtpguard.rollup_input")[0][0]


def _old_store(dsn: str, monkeypatch, rows: pa.Table) -> None:
    """A store made by the schema before typed addresses, holding ``rows``."""
    every = store_mod.all_migrations
    text_fields = tuple(dataclasses.replace(f, clickhouse="String") if f.name in ("src_ip", "dst_ip") else f
                        for f in record.FIELDS)
    with monkeypatch.context() as m:
        m.setattr(store_mod.record, "FIELDS", text_fields)
        m.setattr(store_mod, "all_migrations", lambda db: [s for s in every(db) if s[0] not in ("core-5", "core-6", "core-7")])
        with Store(dsn) as old:
            old.insert_flows(rows)


def test_a_server_store_is_copied_only_by_store_migrate(tmp_path, monkeypatch):
    """On a server, other writers may run during the copy: only `store migrate` copies, every other
    process refuses to start with that instruction (the embedded store is emulated as a server)."""
    from smtpguard.core.errors import StoreError

    batch = _batches(tmp_path)[0]
    dsn = f"chdb://{tmp_path / 'store'}"
    _old_store(dsn, monkeypatch, batch)
    with Store(dsn, create=False) as s:
        s.embedded = False
        with pytest.raises(StoreError, match="run `smtpguard store migrate` once"):
            s.migrate()
        assert "`src_ip` String" in s.query("SHOW CREATE TABLE smtpguard.flows")[0][0]
        assert s.migrate(rebuild=True) >= 2
        assert "`src_ip` IPv6" in s.query("SHOW CREATE TABLE smtpguard.flows")[0][0]
        assert s.count("flows") == batch.num_rows


def test_a_flow_whose_address_is_not_an_address_stops_the_copy_and_says_how_to_mend_it(tmp_path, monkeypatch):
    from smtpguard.core.errors import StoreError

    batch = _batches(tmp_path)[0].slice(0, 3)
    bad = batch.set_column(batch.schema.get_field_index("src_ip"), "src_ip", pa.array(["10.0.0.1", "garbage", "10.0.0.3"]))
    dsn = f"chdb://{tmp_path / 'store'}"
    _old_store(dsn, monkeypatch, bad)
    with pytest.raises(StoreError, match=r"1 rows of smtpguard.flows have an address that is not an IP address "
                                         r"\(e.g. src_ip 'garbage'.*ALTER TABLE smtpguard.flows DELETE WHERE"):
        Store(dsn)
    with Store(dsn, create=False) as s:  # nothing lost meanwhile
        assert s.count("flows") == 3 and "`src_ip` String" in s.query("SHOW CREATE TABLE smtpguard.flows")[0][0]


def test_an_alert_on_a_prefix_reads_the_flows_of_its_addresses_only(tmp_path):
    """The console's evidence of an alert on an IPv6 /64 is one range of the typed addresses; a prefix
    around the IPv4-mapped range does not take in the IPv4 flows."""
    import datetime as dt

    from smtpguard.console.queries import _scope

    t = dt.datetime(2026, 1, 5, 12, tzinfo=dt.timezone.utc)
    rows = record.from_dicts([
        {"start": t, "end": t + dt.timedelta(seconds=1), "src_ip": ip, "dst_ip": "192.0.2.25",
         "src_port": 40000, "dst_port": 25, "protocol": 6, "packets": 3, "bytes": 180, "source_format": "aws-vpc"}
        for ip in ("2600:1f18:934:af1b::10", "2600:1f18:934:af1b:ffff::1", "2600:1f18:934:af1c::1", "10.0.0.1", "::5")])
    n = rows.num_rows
    rows = (rows.append_column("kafka_partition", pa.array([0] * n, pa.uint32()))
            .append_column("kafka_offset", pa.array([0] * n, pa.int64()))
            .append_column("kafka_row", pa.array(range(n), pa.uint32())))
    with Store(f"chdb://{tmp_path / 'store'}") as s:
        s.insert_flows(rows)

        def sources(key: str) -> list[str]:
            cond, params = _scope({"src_ip": key, "tenant": ""})
            return [r[0] for r in s.query(f"SELECT {addr_text('src_ip')} AS ip FROM smtpguard.flows WHERE {cond} "
                                          "ORDER BY ip", params)]

        assert sources("2600:1f18:934:af1b::/64") == ["2600:1f18:934:af1b::10", "2600:1f18:934:af1b:ffff::1"]
        assert sources("::/64") == ["::5"]
        assert sources("10.0.0.1") == ["10.0.0.1"]


def test_a_server_store_moves_its_rollups_to_window_closes_only_by_store_migrate(tmp_path, monkeypatch):
    """Step core-7 drops the views on flows: a detector of the release before, still writing, would leave a
    gap. On a server it runs only from `store migrate` (the embedded store is emulated as a server) when
    there are rollup rows to carry over; a new store takes it like any step."""
    from smtpguard.core.errors import StoreError

    batches = _batches(tmp_path)
    dsn = f"chdb://{tmp_path / 'store'}"
    every = store_mod.all_migrations
    with monkeypatch.context() as m:
        m.setattr(store_mod, "all_migrations", lambda db: [s for s in every(db) if s[0] != "core-7"])
        with Store(dsn) as old:
            for b in batches[:2]:
                old.insert_flows(b)  # the views of core-6 roll them up
    with Store(dsn, create=False) as s:
        s.embedded = False
        with pytest.raises(StoreError, match="core-7 must run with the detectors stopped.*smtpguard store migrate"):
            s.migrate()
        assert "smtpguard.flows" in s.query("SHOW CREATE TABLE smtpguard.source_minutes_mv")[0][0]
        assert s.migrate(rebuild=True) == 1
        assert "rollup_input" in s.query("SHOW CREATE TABLE smtpguard.source_minutes_mv")[0][0]
        _check(s)
    fresh = f"chdb://{tmp_path / 'fresh'}"
    with Store(fresh, create=False) as s:
        s.embedded = False
        assert s.migrate() > 0  # nothing to carry over
