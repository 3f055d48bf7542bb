"""Collector and detector throughput on real components: flow-log file -> collector -> Tansu ->
detector -> chdb store.

Usage: python bench/bench_pipeline.py [--lines N]

Prints, for the collector, lines/s into Kafka and, for the detector, SMTP records/s consumed
with windows, features, alerts and flows written to the store (per process; the detector
process also writes every flow to ClickHouse), plus peak memory and the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds, flow_file, machine, peak_rss_mb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=2_000_000)
    args = ap.parse_args()

    from smtpguard.core import config
    from smtpguard.detectors.runner import DetectorRunner
    from smtpguard.ingest.collector import Collector
    from smtpguard.core.kafka import LocalBroker, ensure_topics
    from smtpguard.core.store import Store

    path = flow_file(args.lines)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        cfg = config.load(environ={}, overrides={
            "data_dir": tmp, "kafka": {"bootstrap_servers": broker.bootstrap, "partitions": 4,
                                       "session_timeout_ms": 6000, "max_poll_interval_ms": 60000},
            "detect": {"idle_flush_ms": 1000}})
        ensure_topics(cfg)
        c0, t0 = cpu_seconds(), time.perf_counter()
        stats = Collector(cfg).run([str(path)], "aws-vpc")
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        print(f"collector: {stats.read:,} lines, {stats.kept:,} SMTP records in {stats.messages:,} messages; "
              f"{wall:.2f} s -> {stats.read / wall:,.0f} lines/s ({stats.read / cpu:,.0f} per CPU-second)")
        with Store(cfg.store_dsn, cfg.store.database) as store:
            stop = threading.Event()
            runner = DetectorRunner(cfg, store, stop=stop)
            th = threading.Thread(target=runner.run, daemon=True)
            c0, t0 = cpu_seconds(), time.perf_counter()
            th.start()
            first = None
            while runner.stats.records < stats.kept or runner.open_rows:
                if first is None and runner.stats.records:
                    first = time.perf_counter()  # exclude the consumer group join
                time.sleep(0.05)
            wall, cpu = time.perf_counter() - (first or t0), cpu_seconds() - c0
            stop.set()
            th.join(30)
            st = runner.stats
            print(f"detector: {st.records:,} records, {st.windows:,} windows, {st.alerts_raised} alerts; "
                  f"{wall:.2f} s after the first message -> {st.records / wall:,.0f} records/s "
                  f"({st.records / cpu:,.0f} per CPU-second incl. group join); peak RSS {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
