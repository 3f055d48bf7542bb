"""The ClickHouse store, through clickhouse-connect only.

The same SQL runs on the embedded engine (``chdb:///dir``) and on a server
(``http(s)://user:pass@host:8123/db``). Table definitions derive from the record and
feature definitions; the schema is created and migrated when a :class:`Store` opens.

Embedded mode: one process at a time may own a chdb directory. The owner holds a lock
file beside it naming its PID; another process gets :class:`StoreLockedError` naming
the owner instead of a corrupted store.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa

from smtpguard.core import metrics, record
from smtpguard.core.alert import ALERT
from smtpguard.core.errors import StoreError, StoreLockedError

log = logging.getLogger(__name__)

#: Embedded store locks this process holds: lock path -> [fd, users]. Several Store objects
#: in one process (the detector and the console of `serve`) share one engine and one lock.
_HELD: dict[str, list[int]] = {}
_HELD_MUTEX = threading.Lock()

SEVERITIES = record.SEVERITIES


def _columns(fields: Iterable[tuple[str, str]]) -> str:
    return ",\n    ".join(f"`{name}` {ch}" for name, ch in fields)


#: Where a stored flow came from on the flows topic: a replay after a restart rewrites the same
#: (partition, offset, row), which the table folds into one row.
#: The write time of a row of ``flows`` and ``window_features`` (filled by the store, never by a writer):
#: what their retention (``store.retention_days``) counts from.
STORED_AT = ("stored_at", "DateTime")
STORED_AT_DDL = f"`{STORED_AT[0]}` {STORED_AT[1]} DEFAULT now()"

FLOW_POSITION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("kafka_partition", "UInt32"), ("kafka_offset", "Int64"), ("kafka_row", "UInt32"))

#: The alerts table as release 1 created it (step core-1, never to be edited); the alert's columns
#: now derive from its one definition, :data:`smtpguard.core.alert.ALERT`, and later steps add to it.
_ALERT_COLUMNS_1: tuple[tuple[str, str], ...] = (
    ("alert_id", "String"), ("detector", "LowCardinality(String)"), ("severity", "LowCardinality(String)"),
    ("severity_rank", "UInt8"), ("score", "Float64"), ("src_ip", "Nullable(String)"), ("tenant", "String"),
    ("window_start", "DateTime64(3, 'UTC')"), ("window_end", "DateTime64(3, 'UTC')"), ("reasons", "Array(String)"),
    ("evidence", "String"), ("exempted", "Bool"), ("suppressed", "LowCardinality(String)"),
    ("status", "LowCardinality(String)"), ("created_at", "DateTime64(3, 'UTC')"), ("incident_id", "String"),
)


#: The modules that own tables, by name, in the order their steps run; each has
#: ``migrations(db) -> list[(step_id, [sql, ...])]``. Steps run once each and are recorded in
#: ``schema_migrations``. The table's owner is the layer that defines its records (the core owns
#: flows and alerts; the detectors their features and checkpoints; the response the registry and
#: decisions; the console its users): the core names them here and imports them only to migrate.
MIGRATION_PROVIDERS = ("smtpguard.core.store", "smtpguard.core.registry", "smtpguard.detectors.storage",
                       "smtpguard.response", "smtpguard.console", "smtpguard.response.audit")


def all_migrations(db: str) -> list[tuple[str, list[str]]]:
    """Every schema step of every table owner, in the order they run."""
    import importlib

    return [step for mod in MIGRATION_PROVIDERS for step in importlib.import_module(mod).migrations(db)]


def addr_text(column: str) -> str:
    """SQL turning an ``IPv6`` address column back into the records' text: IPv4-mapped addresses as
    IPv4 (``10.0.0.1``), others as ClickHouse formats IPv6 (RFC 5952 compression; unlike Python's
    ``ipaddress``, an IPv4-compatible ``::1:2`` reads ``::0.1.0.2``, see ``smtpguard.core.iputil``)."""
    return f"replaceRegexpOne(toString({column}), '^::ffff:([0-9.]+)$', '\\\\1')"


def _flows_ddl(db: str, table: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS {db}.{table} (
    {_columns([(f.name, f.clickhouse) for f in record.FIELDS] + list(FLOW_POSITION_COLUMNS))}
) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMMDD(`start`)
ORDER BY (`src_ip`, `start`, `kafka_partition`, `kafka_offset`, `kafka_row`)"""


#: The flow columns as step core-5 copies them (frozen: a later step adding a field adds it itself)
_FLOW_COLUMNS_5: tuple[str, ...] = (
    "start", "end", "src_ip", "dst_ip", "src_port", "dst_port", "protocol", "packets", "bytes", "rev_packets",
    "rev_bytes", "action", "tcp_flags", "tenant", "interface_id", "instance_id", "source_format", "exporter",
    "sampling_rate", "conn_state", "helo", "mail_from_domain", "rcpt_count", "reply_first", "reply_last",
    "replies_4xx", "replies_5xx", "starttls", "auth", "kafka_partition", "kafka_offset", "kafka_row", "stored_at")


class Rebuild:
    """A schema step that copies a table into a new one with other column types and swaps the two
    (ClickHouse cannot change the type of a sorting-key column in place). It runs only where the
    table still has the old types (``needed_sql`` counts them): a store made since has them from its
    first step. On a server it runs only from ``smtpguard store migrate`` with the writers stopped
    (rows written during the copy would be lost); the embedded store is one process's alone.
    Safe to run again after a crash at any statement: the leftover copy is dropped first."""

    def __init__(self, table: str, needed_sql: str, check_sql: str, steps: list[str], ddl_table: str):
        self.table, self.needed_sql, self.check_sql, self.steps = table, needed_sql, check_sql, steps
        self.ddl_table = ddl_table

    def __iter__(self):
        # `store schema` prints these for review, commented out: a new store never needs them
        yield (f"-- only for a {self.table} table made before this step (its addresses still text), "
               "run by `smtpguard store migrate` with the writers stopped:\n-- "
               + ";\n-- ".join(s.replace("\n", " ") for s in self.steps))


class WritersStopped(list):
    """Schema statements that must not run beside writers of the release before, on a store where
    ``needed_sql`` counts something for them to carry over (on a new store they run like any step). On a
    server they run only from ``smtpguard store migrate`` with the detectors stopped; the embedded store is
    one process's alone."""

    def __init__(self, statements: list[str], needed_sql: str, why: str):
        super().__init__(statements)
        self.needed_sql, self.why = needed_sql, why


def _typed_flows_step(db: str) -> Rebuild:
    cols = ", ".join(f"`{c}`" for c in _FLOW_COLUMNS_5)
    return Rebuild(
        "flows",
        f"SELECT count() FROM system.columns WHERE database = '{db}' AND table = 'flows' "
        "AND name IN ('src_ip', 'dst_ip') AND type != 'IPv6'",
        f"SELECT count(), any(src_ip), any(dst_ip) FROM {db}.flows "
        "WHERE isNull(toIPv6OrNull(src_ip)) OR isNull(toIPv6OrNull(dst_ip))",
        [
            f"DROP TABLE IF EXISTS {db}.flows_typed",
            _flows_ddl(db, "flows_typed"),
            f"ALTER TABLE {db}.flows_typed ADD COLUMN IF NOT EXISTS {STORED_AT_DDL}",
            # (the flows' retention TTL is given to the copy here, so copied rows expire as before)
            f"INSERT INTO {db}.flows_typed ({cols}) SELECT {cols} FROM {db}.flows "
            "SETTINGS max_partitions_per_insert_block = 0",
            f"EXCHANGE TABLES {db}.flows AND {db}.flows_typed",
            f"DROP TABLE {db}.flows_typed",
        ], "flows_typed")


#: Per-minute rollups of ``flows``, so months of traffic are read without scanning raw flows (and outlive
#: their retention). Since step core-7 the detector fills them when it closes a window: it writes the
#: closing records reduced to one row per minute, source address, tenant and destination into
#: ``rollup_input`` (a Null table: nothing is stored), and materialized views fold those into one row
#: per minute, key, partition and window, with the window's start (ms) in ``kafka_offset``. A window is
#: closed once per partition and a replay closes it with the same records, so a replay rewrites the
#: same rows, which the table folds (read with FINAL, then sum and merge the ``uniqExact`` states).
#: ``connections`` count a sampled record as ``sampling_rate`` connections, as the notebooks' queries
#: over raw flows do. Records later than the allowed lateness are stored in ``flows`` but, like the
#: detector, the rollups leave them out. (Step core-6 kept the rollups by views on ``flows``, one row
#: per Kafka message; with many sources per message that doubled the cost of every flows write.)
ROLLUPS: dict[str, dict[str, str]] = {
    "source_minutes": {
        "keys": "`src_ip`, `tenant`",
        "key_columns": "`src_ip` IPv6, `tenant` LowCardinality(String)",
        "columns": "`dst` AggregateFunction(uniqExact, IPv6)",
        "select": "uniqExactState(`dst_ip`) AS `dst`",
        "states": "`dst`",
    },
    "tenant_minutes": {
        "keys": "`tenant`",
        "key_columns": "`tenant` LowCardinality(String)",
        "columns": "`sources` AggregateFunction(uniqExact, IPv6), `dst` AggregateFunction(uniqExact, IPv6)",
        "select": "uniqExactState(`src_ip`) AS `sources`, uniqExactState(`dst_ip`) AS `dst`",
        "states": "`sources`, `dst`",
    },
}


def rollup_select(name: str, source: str) -> str:
    """The SELECT filling rollup ``name`` from ``source`` (``flows`` rows)."""
    r = ROLLUPS[name]
    return (f"SELECT toStartOfMinute(`start`) AS `minute`, {r['keys']}, `kafka_partition`, `kafka_offset`, "
            "sum(greatest(`sampling_rate`, 1)) AS `connections`, "
            "sumIf(greatest(`sampling_rate`, 1), `action` = 'reject') AS `rejected`, "
            f"sum(`bytes`) AS `bytes`, sum(`packets`) AS `packets`, {r['select']} "
            f"FROM {source} GROUP BY `minute`, {r['keys']}, `kafka_partition`, `kafka_offset`")


#: ``rollup_input``: what the detector writes at a window close (:meth:`Store.insert_rollups`)
ROLLUP_INPUT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("minute", "DateTime('UTC')"), ("src_ip", "IPv6"), ("tenant", "LowCardinality(String)"), ("dst_ip", "IPv6"),
    ("kafka_partition", "UInt32"), ("kafka_offset", "Int64"), ("connections", "UInt64"), ("rejected", "UInt64"),
    ("bytes", "UInt64"), ("packets", "UInt64"))
#: squashing thresholds no write reaches: one insert, one block
_ONE_BLOCK = 1 << 62
#: rows written by step core-6's views hold a Kafka offset in ``kafka_offset``; the detector's, a window start
#: in ms (every one of which is above this)
_WINDOW_MS_FROM = 1_000_000_000_000


def _rollup_at_close_steps(db: str) -> "WritersStopped":
    """Step core-7: the rollups are filled at window close (ROLLUPS) instead of by views on ``flows``. Rows
    the old views wrote (one per Kafka message) are folded into one per minute, key and partition, keyed
    as a one-minute window starting at that minute, so the windows a detector replays after the upgrade
    (default one-minute windows) replace them instead of adding to them. Safe to run again: the folded
    rows are rewritten with the same keys."""
    out = [f"CREATE TABLE IF NOT EXISTS {db}.rollup_input ({_columns(ROLLUP_INPUT_COLUMNS)}) ENGINE = Null"]
    # a row the old views wrote: an offset, not a window start (a folded row of a minute before 2001 has an
    # offset below the bound too, but it is exactly its minute's start)
    old_row = f"`kafka_offset` < {_WINDOW_MS_FROM} AND `kafka_offset` != toInt64(toUnixTimestamp(`minute`)) * 1000"
    for name, r in ROLLUPS.items():
        merged = ", ".join(f"uniqExactMergeState({c}) AS {c}" for c in r["states"].split(", "))
        out += [
            f"DROP VIEW IF EXISTS {db}.{name}_mv",
            f"INSERT INTO {db}.{name} SELECT `minute`, {r['keys']}, `kafka_partition`, "
            "toInt64(toUnixTimestamp(`minute`)) * 1000 AS `window_start_ms`, sum(`connections`) AS `connections`, "
            f"sum(`rejected`) AS `rejected`, sum(`bytes`) AS `bytes`, sum(`packets`) AS `packets`, {merged} "
            f"FROM {db}.{name} FINAL WHERE {old_row} "
            f"GROUP BY `minute`, {r['keys']}, `kafka_partition` SETTINGS max_partitions_per_insert_block = 0",
            f"ALTER TABLE {db}.{name} DELETE WHERE {old_row} SETTINGS mutations_sync = 2",
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name}_mv TO {db}.{name} AS "
            f"SELECT `minute`, {r['keys']}, `kafka_partition`, `kafka_offset`, sum(`connections`) AS `connections`, "
            f"sum(`rejected`) AS `rejected`, sum(`bytes`) AS `bytes`, sum(`packets`) AS `packets`, {r['select']} "
            f"FROM {db}.rollup_input GROUP BY `minute`, {r['keys']}, `kafka_partition`, `kafka_offset`",
        ]
    # a detector of the release before, still writing, would keep feeding views that are gone (a gap in the
    # rollups), and a new one's rows would be lost until the new views exist
    needed = " + ".join(f"(SELECT count() FROM {db}.{name} WHERE {old_row})" for name in ROLLUPS)
    return WritersStopped(out, f"SELECT {needed}",
                          "the per-minute rollups move from views on flows to the detectors' window closes")


def _rollup_steps(db: str) -> list[str]:
    out = []
    for name, r in ROLLUPS.items():
        out += [
            f"""CREATE TABLE IF NOT EXISTS {db}.{name} (
    `minute` DateTime('UTC'), {r['key_columns']}, `kafka_partition` UInt32, `kafka_offset` Int64,
    `connections` UInt64, `rejected` UInt64, `bytes` UInt64, `packets` UInt64, {r['columns']}
) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(`minute`)
ORDER BY ({r['keys']}, `minute`, `kafka_partition`, `kafka_offset`)""",
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name}_mv TO {db}.{name} AS {rollup_select(name, f'{db}.flows')}",
            # flows stored before the view existed (a replay racing this step writes the same keys: folded)
            f"INSERT INTO {db}.{name} {rollup_select(name, f'{db}.flows FINAL')} "
            "SETTINGS max_partitions_per_insert_block = 0",
        ]
    return out


def migrations(db: str) -> list[tuple[str, list[str]]]:
    """The core tables' schema steps. Append a step; never edit a released one."""
    return [
        ("core-1", [
            _flows_ddl(db, "flows"),
            f"""CREATE TABLE IF NOT EXISTS {db}.alerts (
    {_columns(_ALERT_COLUMNS_1)}
) ENGINE = ReplacingMergeTree(`created_at`) ORDER BY (`alert_id`)""",
        ]),
        # which alerts the broker acknowledged on the alerts topic: a detector that stored an alert
        # and died before publishing it publishes it on replay; one that published it does not again
        ("core-2", [
            f"""CREATE TABLE IF NOT EXISTS {db}.alert_publications (
    `alert_id` String, `topic` String, `published_at` DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(`published_at`) ORDER BY (`topic`, `alert_id`)""",
        ]),
        # alerts carry their recommended next step
        ("core-3", [f"ALTER TABLE {db}.alerts ADD COLUMN IF NOT EXISTS `next_step` String"]),
        # when a flow was written: retention counts from it, so a replay of old logs is kept as long as new ones
        ("core-4", [f"ALTER TABLE {db}.flows ADD COLUMN IF NOT EXISTS {STORED_AT_DDL}"]),
        # addresses as IPv6 (IPv4 mapped): 16 bytes, compared and ranged as addresses
        ("core-5", _typed_flows_step(db)),
        # per-minute rollups per source and per tenant (ROLLUPS), filled from the flows already stored
        ("core-6", _rollup_steps(db)),
        # the rollups filled at window close, no longer by views on every flows write
        ("core-7", _rollup_at_close_steps(db)),
    ]


#: Tables whose rows may expire (``store.retention_days``) and the time column their TTL counts from: the
#: time a row was written, not the event's (historical logs read today are kept as long as live ones).
RETENTION_COLUMNS = {"flows": "stored_at", "window_features": "stored_at", "dnsbl_checks": "checked_at"}
_TTL_RE = re.compile(r"\sTTL\s+toDateTime\(`?(\w+)`?\)\s*\+\s*toIntervalDay\((\d+)\)")


class Store:
    """Open (and migrate) the store named by ``dsn``; use as a context manager."""

    def __init__(self, dsn: str, database: str = "smtpguard", *, create: bool = True):
        import clickhouse_connect

        self.dsn = dsn
        self.database = database
        self._lock_path: str | None = None
        self._mutex = threading.RLock()
        self.embedded = dsn.startswith("chdb://")
        try:
            if self.embedded:
                path = dsn[len("chdb://"):]
                if not path:
                    raise StoreError("store DSN chdb:// needs a directory, e.g. chdb:///var/lib/smtpguard/store")
                Path(path).mkdir(parents=True, exist_ok=True)
                self._take_lock(path)
            self.client = clickhouse_connect.get_client(dsn=dsn)
        except StoreError:
            self._release_lock()
            raise
        except Exception as e:  # connection refused, bad credentials, bad DSN
            self._release_lock()
            from smtpguard.core.config import mask_dsn

            raise StoreError(f"cannot open store {mask_dsn(dsn)}: {e}") from None
        if create:
            self.migrate()

    # -- embedded ownership -------------------------------------------------------------
    def _take_lock(self, path: str) -> None:
        lock_path = os.path.realpath(path).rstrip("/") + ".lock"
        with _HELD_MUTEX:
            held = _HELD.get(lock_path)
            if held is not None:
                held[1] += 1
                self._lock_path = lock_path
                return
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreLockedError(
                    f"the embedded store {path} is in use by another process ({owner}); "
                    "stop it, or give this command a server DSN with --store/SMTPGUARD_STORE__DSN"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {' '.join(os.sys.argv[:2])}".encode(), 0)
            _HELD[lock_path] = [fd, 1]
            self._lock_path = lock_path

    def _release_lock(self) -> None:
        path = getattr(self, "_lock_path", None)
        if path is None:
            return
        self._lock_path = None
        with _HELD_MUTEX:
            held = _HELD.get(path)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del _HELD[path]
                os.ftruncate(held[0], 0)
                os.close(held[0])

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
            self.client = None
        self._release_lock()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------
    def migrate(self, *, rebuild: bool = False) -> int:
        """Apply the schema steps not run yet; returns how many. ``rebuild``: this is `store migrate`,
        which may run a :class:`Rebuild` or a :class:`WritersStopped` step on a server (the embedded store
        always may)."""
        db = self.database
        with self._mutex:
            self.client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
            self.client.command(
                f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version String, applied_at DateTime64(3, 'UTC'))"
                " ENGINE = MergeTree ORDER BY version"
            )
            done = {r[0] for r in self.client.query(f"SELECT version FROM {db}.schema_migrations").result_rows}
            applied = 0
            for version, steps in all_migrations(db):
                if version in done:
                    continue
                if isinstance(steps, Rebuild):
                    self._rebuild(version, steps, rebuild or self.embedded)
                else:
                    if isinstance(steps, WritersStopped) and not (rebuild or self.embedded) \
                            and self.client.query(steps.needed_sql).result_rows[0][0]:
                        raise StoreError(f"schema step {version} must run with the detectors stopped ({steps.why}): "
                                         "stop them and run `smtpguard store migrate` once (docs/DEPLOYMENT.md, "
                                         "upgrades)")
                    for sql in steps:
                        self.client.command(sql)
                self.client.insert(f"{db}.schema_migrations", [[version, dt.datetime.now(dt.timezone.utc)]],
                                   column_names=["version", "applied_at"])
                done.add(version)  # a step listed twice runs once
                applied += 1
            return applied

    def _rebuild(self, version: str, step: Rebuild, allowed: bool) -> None:
        if not self.client.query(step.needed_sql).result_rows[0][0]:
            return  # made with the new types
        if not allowed:
            raise StoreError(f"the store's {step.table} table must be copied with its new column types (schema step "
                             f"{version}): stop the detectors and run `smtpguard store migrate` once "
                             "(docs/DEPLOYMENT.md, upgrades)")
        bad, src, dst = self.client.query(step.check_sql).result_rows[0]
        if bad:
            raise StoreError(f"{bad} rows of {self.database}.{step.table} have an address that is not an IP address "
                             f"(e.g. src_ip {src!r}, dst_ip {dst!r}); schema step {version} cannot type them. Remove "
                             f"them (ALTER TABLE {self.database}.{step.table} DELETE WHERE isNull(toIPv6OrNull(src_ip)) "
                             "OR isNull(toIPv6OrNull(dst_ip))) and migrate again")
        ttl = _TTL_RE.search(self.client.query(
            "SELECT create_table_query FROM system.tables WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": self.database, "t": step.table}).result_rows[0][0])
        for sql in step.steps:
            if sql.startswith("INSERT") and ttl:
                # the copied rows keep the retention they had (a TTL added after the copy skips its parts)
                self.client.command(f"ALTER TABLE {self.database}.{step.ddl_table} MODIFY TTL "
                                    f"toDateTime(`{ttl.group(1)}`) + INTERVAL {ttl.group(2)} DAY")
            self.client.command(sql)
        log.warning("schema step %s: %s copied with its new column types", version, step.table)

    def apply_retention(self, days: dict[str, int]) -> dict[str, int]:
        """Give each table of :data:`RETENTION_COLUMNS` the TTL of ``days`` (0 or absent: none). Only
        a table whose TTL differs is altered; existing parts are not rewritten (rows past their TTL go
        at the table's next merges). Returns the tables changed, with their new days (0 = removed)."""
        changed: dict[str, int] = {}
        db = self.database
        with self._mutex:
            for table, col in RETENTION_COLUMNS.items():
                want = int(days.get(table, 0))
                rows = self.query("SELECT create_table_query FROM system.tables WHERE database = {db:String} "
                                  "AND name = {t:String}", {"db": db, "t": table})
                if not rows:
                    continue
                m = _TTL_RE.search(rows[0][0])
                have = (m.group(1), int(m.group(2))) if m else None
                if have == ((col, want) if want else None):
                    continue
                if want:
                    self.client.command(f"ALTER TABLE {db}.{table} MODIFY TTL toDateTime(`{col}`) + INTERVAL {want} DAY "
                                        "SETTINGS materialize_ttl_after_modify = 0")
                else:
                    self.client.command(f"ALTER TABLE {db}.{table} REMOVE TTL")
                changed[table] = want
        return changed

    # -- writes ---------------------------------------------------------------------------
    def insert_arrow(self, table: str, data: pa.Table, settings: dict[str, Any] | None = None) -> None:
        if data.num_rows == 0:
            return
        t0 = time.perf_counter()
        try:
            with self._mutex:
                self.client.insert_arrow(f"{self.database}.{table}", data, settings=settings)
        except Exception as e:
            metrics.STORE_WRITE_FAILURES.labels(table).inc()
            raise StoreError(f"writing {data.num_rows} rows to {table} failed: {e}") from e
        self.last_write_s = time.perf_counter() - t0
        metrics.STORE_WRITE_SECONDS.labels(table).observe(self.last_write_s)

    def insert_flows(self, flows: pa.Table) -> None:
        """Records with their topic position columns (kafka_partition, kafka_offset, kafka_row).

        The table is partitioned by day, and one poll may hold flows of any number of days
        (a backlog, or old records): ClickHouse's default of at most 100 partitions per
        insert would refuse such a write for ever and stop the consumer.

        The insert does not fold duplicate keys within itself (``optimize_on_insert = 0``): one
        write's flows have distinct topic positions, replays arrive in later writes and are folded
        by merges and read with ``FINAL`` either way, and skipping that pass halves the insert's
        cost (5.9 -> 2.8 µs a row for 25,000-row writes of 20,000 sources)."""
        self.insert_arrow("flows", flows, settings={"max_partitions_per_insert_block": 0, "optimize_on_insert": 0})

    def insert_rollups(self, rows: pa.Table) -> None:
        """Closed windows' records reduced per minute, source address, tenant and destination
        (:data:`ROLLUP_INPUT_COLUMNS`); the rollup views fold them into ``source_minutes`` and
        ``tenant_minutes``.

        A view folds the block it is given, so the whole write must reach it as one block: a window's rows
        split over two blocks would leave two partial rows under one key, of which the table keeps one.
        The insert squashes everything it reads into one block (Arrow batches, and the server's
        ``max_insert_block_size`` splits, included)."""
        if rows.num_rows:
            # every column named (a missing one fails here rather than taking the column default)
            rows = rows.select([name for name, _ in ROLLUP_INPUT_COLUMNS])
            self.insert_arrow("rollup_input", rows, settings={
                "max_partitions_per_insert_block": 0, "min_insert_block_size_rows": _ONE_BLOCK,
                "min_insert_block_size_bytes": _ONE_BLOCK})

    def insert_alerts(self, alerts: Sequence[Any]) -> None:
        if alerts:
            self.insert_arrow(ALERT.table, ALERT.to_arrow(alerts))

    def existing_alerts(self, ids: Sequence[str]) -> dict[str, str]:
        """Of ``ids``, the alerts already stored, with their ``suppressed`` reason ('' = raised)."""
        if not ids:
            return {}
        rows = self.query(f"SELECT alert_id, argMax(suppressed, created_at) FROM {self.database}.alerts "
                          "WHERE alert_id IN {ids:Array(String)} GROUP BY alert_id", {"ids": list(ids)})
        return {r[0]: r[1] for r in rows}

    def published_alert_ids(self, topic: str, ids: Sequence[str]) -> set[str]:
        """Of ``ids``, the alerts already acknowledged on ``topic``."""
        if not ids:
            return set()
        rows = self.query(f"SELECT DISTINCT alert_id FROM {self.database}.alert_publications "
                          "WHERE topic = {topic:String} AND alert_id IN {ids:Array(String)}",
                          {"topic": topic, "ids": list(ids)})
        return {r[0] for r in rows}

    def mark_published(self, topic: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        now = dt.datetime.now(dt.timezone.utc)
        self.insert_arrow("alert_publications", pa.table({
            "alert_id": list(ids), "topic": [topic] * len(ids),
            "published_at": pa.array([now] * len(ids), pa.timestamp("ms", tz="UTC"))}))

    # -- reads ----------------------------------------------------------------------------
    def query(self, sql: str, parameters: dict[str, Any] | None = None,
              column_formats: dict[str, str] | None = None) -> list[tuple]:
        """Rows of ``sql`` (``column_formats``: e.g. ``{"blob": "bytes"}`` for binary String columns)."""
        try:
            with self._mutex:
                return self.client.query(sql, parameters=parameters or {}, column_formats=column_formats).result_rows
        except Exception as e:
            raise StoreError(f"query failed: {e}") from e

    def query_df(self, sql: str, parameters: dict[str, Any] | None = None):
        """A pandas DataFrame (for notebooks and the console)."""
        with self._mutex:
            return self.client.query_df(sql, parameters=parameters or {})

    def list_alerts(self, *, min_severity: str | None = None, since: dt.datetime | None = None,
                    ip: str | None = None, include_suppressed: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        where = ["1"]
        params: dict[str, Any] = {"limit": limit}
        if min_severity:
            where.append("severity_rank >= {rank:UInt8}")
            params["rank"] = SEVERITIES.index(min_severity)
        if since:
            where.append("window_end >= {since:DateTime64(3, 'UTC')}")
            params["since"] = since
        if ip:
            where.append("src_ip = {ip:String}")
            params["ip"] = ip
        if not include_suppressed:
            where.append("suppressed = ''")
        names = list(ALERT.names)
        sql = (f"SELECT {', '.join(names)} FROM {self.database}.alerts FINAL WHERE {' AND '.join(where)} "
               "ORDER BY window_start DESC, severity_rank DESC, alert_id LIMIT {limit:UInt32}")
        return [dict(zip(names, row)) for row in self.query(sql, params)]

    def list_incidents(self, *, since: dt.datetime | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Alerts grouped by incident: scope, first and last window, count, worst severity, detectors."""
        where, params = ["suppressed = ''", "incident_id != ''"], {"limit": limit}
        if since:
            where.append("window_end >= {since:DateTime64(3, 'UTC')}")
            params["since"] = since
        sql = (f"SELECT incident_id, any(src_ip), any(tenant), min(window_start), max(window_end), count(), "
               f"max(severity_rank), groupUniqArray(detector) FROM {self.database}.alerts FINAL "
               f"WHERE {' AND '.join(where)} GROUP BY incident_id ORDER BY max(window_end) DESC LIMIT {{limit:UInt32}}")
        names = ("incident_id", "src_ip", "tenant", "first_window", "last_window", "alerts", "severity", "detectors")
        rows = [dict(zip(names, r)) for r in self.query(sql, params)]
        for r in rows:
            r["severity"] = SEVERITIES[r["severity"]]
            r["detectors"] = sorted(r["detectors"])
        return rows

    def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        names = list(ALERT.names)
        rows = self.query(f"SELECT {', '.join(names)} FROM {self.database}.alerts FINAL WHERE alert_id = {{id:String}}",
                          {"id": alert_id})
        return dict(zip(names, rows[0])) if rows else None

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT count() FROM {self.database}.{table}")[0][0])
