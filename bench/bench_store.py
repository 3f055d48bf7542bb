"""Store writes: flows into the embedded ClickHouse engine (chdb) through ``Store.insert_flows``.

Parses a generated flow-log file once, then writes its SMTP records with their topic positions
in batches of ``--batch`` rows, as the detector does per poll, and prints rows per second, peak
memory and the machine. Baseline in the same run: the same Arrow batches through
clickhouse-connect's ``insert_arrow`` directly (no smtpguard code in between), and the ratio.

    .venv/bin/python bench/bench_store.py --lines 2000000 --batch 50000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa

from common import cpu_seconds, flow_file, machine, peak_rss_mb


def records(path, smtp_ports) -> pa.Table:
    from smtpguard.ingest.reader import read_batches

    tables = [b.records for _src, b in read_batches([str(path)], "aws-vpc", smtp_ports, 200_000, None)]
    t = pa.concat_tables(tables)
    n = t.num_rows
    return (t.append_column("kafka_partition", pa.array(np.zeros(n, np.uint32)))
             .append_column("kafka_offset", pa.array(np.arange(n, dtype=np.int64) // 2000))
             .append_column("kafka_row", pa.array(np.arange(n, dtype=np.uint32) % 2000)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=2_000_000, help="generated flow-log lines to parse first")
    ap.add_argument("--batch", type=int, default=50_000, help="rows per insert")
    ap.add_argument("--repeat", type=int, default=5, help="write the records this many times (new databases)")
    ap.add_argument("--sources", type=int, default=0,
                    help="spread the records over this many source addresses (0: as generated, a few hundred); "
                         "a provider's traffic has thousands of instances with a few flows each")
    args = ap.parse_args()

    from smtpguard.core.config import Config
    from smtpguard.core.store import Store

    table = records(flow_file(args.lines), Config().ingest.smtp_ports)
    if args.sources:
        pool = np.array([f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(args.sources)])
        picks = np.random.default_rng(1).integers(0, args.sources, table.num_rows)
        table = table.set_column(table.schema.get_field_index("src_ip"), "src_ip", pa.array(pool[picks]))
    batches = [table.slice(i, args.batch) for i in range(0, table.num_rows, args.batch)]
    rows = table.num_rows * args.repeat
    print(machine())
    print(f"{table.num_rows:,} SMTP records from {args.lines:,} lines, {len(batches)} inserts of up to "
          f"{args.batch:,} rows, written {args.repeat} times")
    with tempfile.TemporaryDirectory(prefix="smtpguard-bench-store-") as tmp:
        results = {}
        for label in ("Store.insert_flows", "clickhouse-connect insert_arrow (baseline)"):
            wall = cpu = 0.0
            for r in range(args.repeat):
                db = f"bench_{'s' if label.startswith('Store') else 'b'}{r}"
                with Store(f"chdb://{tmp}/store", db) as store:
                    t0, c0 = time.perf_counter(), cpu_seconds()
                    for b in batches:
                        if label.startswith("Store"):
                            store.insert_flows(b)
                        else:
                            store.client.insert_arrow(f"{db}.flows", b)
                    wall += time.perf_counter() - t0
                    cpu += cpu_seconds() - c0
                    assert store.count("flows") == table.num_rows
            results[label] = (rows / wall, rows / cpu)
            print(f"{label:44} {rows / wall:>12,.0f} rows/s  {rows / cpu:>12,.0f} rows per CPU-second")
        ours, base = results["Store.insert_flows"][0], results["clickhouse-connect insert_arrow (baseline)"][0]
        print(f"ratio Store / baseline: {ours / base:.2f}; peak RSS {peak_rss_mb():,.0f} MB")
        with Store(f"chdb://{tmp}/store", "bench_s0") as store:
            rollups(store, table)


def rollups(store, table: pa.Table) -> None:
    """The per-minute rollups as the detector fills them at window close (the records of ``table`` through the
    detection pipeline on one partition, the closes' rows written to ``rollup_input``): their rows against the raw
    flows', and the notebooks' queries over each (the 20 busiest sources' minutes; every tenant's totals), best
    of 3."""
    from smtpguard.core.config import Config
    from smtpguard.detectors.pipeline import Pipeline
    from smtpguard.lab import notebook

    pipe = Pipeline(Config(), rollups=True)
    records = table.drop_columns(["kafka_partition", "kafka_offset", "kafka_row"])
    t0, c0 = time.perf_counter(), cpu_seconds()
    outs = [pipe.process(records.slice(i, 50_000)) for i in range(0, records.num_rows, 50_000)] + [pipe.flush()]
    written = 0
    for out in outs:
        if out.rollups is not None:
            store.insert_rollups(out.rollups.to_arrow())
            written += out.rollups.height
    print(f"rollups at window close: {written:,} rows into rollup_input, {time.perf_counter() - t0:.2f} s wall, "
          f"{cpu_seconds() - c0:.2f} CPU-s with the detection itself")
    flows = store.count("flows")
    for name in ("source_minutes", "tenant_minutes"):
        n = store.query(f"SELECT count() FROM {store.database}.{name} FINAL")[0][0]
        print(f"{name:44} {n:>12,} rows ({flows / n:,.1f} flows per row)")
    busy = notebook.sources(store).src_ip.head(20).tolist()
    for label, call in (("per_minute, 20 sources", lambda raw: notebook.per_minute(store, busy, raw=raw)),
                        ("tenant_traffic", lambda raw: notebook.tenant_traffic(store, raw=raw))):
        times = {}
        for raw in (True, False):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                call(raw)
                best = min(best, time.perf_counter() - t0)
            times[raw] = best
        print(f"{label:44} raw flows {times[True] * 1000:8.1f} ms, rollup {times[False] * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
