"""`smtpguard serve FILE` on this machine: local Tansu broker, collector, detector, response and the
embedded store in one process, as a user runs it; from the detector's first consumed record to its last
closed window.

Usage: python bench/bench_serve.py [--instances 700] [--minutes 180] [--seed 5]

The input is a generated scenario's AWS VPC flow log (every abuse kind; made once under .bench/).
The collector reads the file into the broker while the detector consumes it (both on the machine's
two cores); the detector is told where the input ends (as ``serve`` does), so the last windows close
once the records are consumed. Prints records per second over that span, the collector's lines per
second, the whole run's wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, cpu_seconds, machine, peak_rss_mb  # noqa: E402


def scenario_file(seed: int, instances: int, minutes: int) -> Path:
    from smtpguard.lab import scenario

    out = CACHE / f"serve-{seed}-{instances}-{minutes}"
    if not (out / "flows.log").exists():
        out.mkdir(parents=True, exist_ok=True)
        scenario.write(scenario.generate(seed, instances=instances, duration_s=minutes * 60,
                                         abuse=scenario.ABUSE_KINDS), out)
    return out / "flows.log"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=700)
    ap.add_argument("--minutes", type=int, default=180)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()

    from smtpguard.app.serve import LocalStack, collect_into
    from smtpguard.core import config

    path = scenario_file(args.seed, args.instances, args.minutes)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load(environ={}, overrides={"data_dir": tmp, "store": {"dsn": f"chdb://{tmp}/store"},
                                                 "dnsbl": {"check_alerts_from": "off"}})
        c0, t0 = cpu_seconds(), time.perf_counter()
        with LocalStack(cfg) as stack:
            runner = stack.runner
            first: list[float] = []

            def watch() -> None:
                while not runner.stats.records and not stack.stop_event.is_set():
                    time.sleep(0.005)
                first.append(time.perf_counter())

            threading.Thread(target=watch, daemon=True).start()
            tc = time.perf_counter()
            stats = collect_into(stack.cfg, [str(path)], "aws-vpc")
            collect_s = time.perf_counter() - tc
            stack.end_of_input(stats.kept)
            while not (runner.stats.records >= stats.kept and runner.open_rows == 0):
                time.sleep(0.002)
            last = time.perf_counter()
            span = last - first[0]
            st = runner.stats
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    print(f"input: {path.name} of {path.parent.name}: {stats.read:,} lines, {stats.kept:,} SMTP records")
    print(f"collector: {collect_s:.2f} s -> {stats.read / collect_s:,.0f} lines/s (beside the detector)")
    print(f"detector: {st.records:,} records, {st.windows:,} windows, {st.alerts_raised} alerts; first consumed record "
          f"to last closed window {span:.2f} s -> {st.records / span:,.0f} records/s")
    print(f"whole run (broker start to stop): {wall:.1f} s wall, {cpu:.1f} CPU-s; peak RSS {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
