"""Throughput of `smtpguard analyze` over AWS VPC flow logs: parse, filter, windows, detectors.

Usage: python bench/bench_analyze.py [--lines N] [--baseline]

Prints lines per second (wall and per CPU-second), peak memory and the machine. With
--baseline it also runs the simplest honest alternative in the same process: pandas
read_csv of the same file plus a per-IP-minute group-by (no detectors), and prints the ratio.
Pin to one core for per-core numbers: `taskset -c 0 env POLARS_MAX_THREADS=1 python bench/bench_analyze.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds, flow_file, machine, peak_rss_mb  # noqa: E402


def run_analyze(path: Path) -> tuple[float, float, object]:
    from smtpguard.app.analyze import analyze
    from smtpguard.core.config import load

    cfg = load(environ={})
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = analyze(cfg, [str(path)], "aws-vpc")
    return time.perf_counter() - t0, cpu_seconds() - c0, res


def run_pandas_baseline(path: Path) -> tuple[float, int]:
    import pandas as pd

    t0 = time.perf_counter()
    df = pd.read_csv(path, sep=" ", header=0, usecols=["srcaddr", "dstaddr", "dstport", "start"],
                     dtype={"srcaddr": str, "dstaddr": str}, engine="c")
    df = df[df["dstport"].isin([25, 465, 587, 2525])]
    df["minute"] = df["start"] // 60
    g = df.groupby(["srcaddr", "minute"]).agg(conns=("dstaddr", "size"), distinct=("dstaddr", "nunique"))
    return time.perf_counter() - t0, len(g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=5_000_000)
    ap.add_argument("--baseline", action="store_true", help="also time a plain pandas script on the same file")
    args = ap.parse_args()
    path = flow_file(args.lines)
    lines = args.lines + 1
    print(f"machine: {machine()}")
    print(f"input: {path.name}, {lines:,} lines, {path.stat().st_size / 1e6:,.0f} MB")
    wall, cpu, res = run_analyze(path)
    print(f"analyze: {wall:.2f} s wall, {cpu:.2f} CPU-s -> {lines / wall:,.0f} lines/s, {lines / cpu:,.0f} lines per CPU-second; "
          f"{res.kept:,} SMTP records, {res.windows:,} windows, {len(res.raised())} alerts; peak RSS {peak_rss_mb():,.0f} MB")
    if args.baseline:
        bwall, groups = run_pandas_baseline(path)
        print(f"pandas baseline (read_csv + filter + group-by, no detectors): {bwall:.2f} s -> {lines / bwall:,.0f} lines/s "
              f"({groups:,} groups); analyze is {bwall / wall:.2f}x its speed")


if __name__ == "__main__":
    main()
