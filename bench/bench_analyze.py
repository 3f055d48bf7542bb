"""Throughput of `smtpguard analyze` over AWS VPC flow logs: parse, filter, windows, detectors.

Usage: python bench/bench_analyze.py [--lines N] [--baseline] [--previous REV | --no-previous]

Each contender runs in its own process pinned to CPU 0 (``taskset -c 0``, ``POLARS_MAX_THREADS=1``)
over the same generated file (cached under .bench/), and reports lines per second (wall and per
CPU-second) and its peak RSS:

- this tree: ``analyze`` end to end (parse with dead-lettering, SMTP selection and reverse pairing,
  windows, features, source history, horizons, tenant windows, every detector);
- the previous release (``--previous``, default the one named in bench/common.py): its own tree;
- with ``--baseline``, the simplest honest alternative: pandas ``read_csv`` of the same file plus a
  per-IP-minute group-by (no validation, no detectors).

Ratios against the others are printed in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PREVIOUS, flow_file, machine, previous_tree, run_pinned  # noqa: E402

ANALYZE = r"""
import json, resource, sys, time
path = sys.argv[1]
try:  # releases before the package layout first: an editable install may still map the new names
    from smtpguard.analyze import analyze
    from smtpguard.config import load
except ImportError:
    from smtpguard.app.analyze import analyze
    from smtpguard.core.config import load
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
cfg = load(environ={})
c0, t0 = cpu(), time.perf_counter()
res = analyze(cfg, [path], "aws-vpc")
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": cpu() - c0, "kept": res.kept,
                  "windows": res.windows, "alerts": len(res.raised()),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PANDAS = r"""
import json, resource, sys, time
import pandas as pd
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
c0, t0 = cpu(), time.perf_counter()
df = pd.read_csv(sys.argv[1], sep=" ", header=0, usecols=["srcaddr", "dstaddr", "dstport", "start"],
                 dtype={"srcaddr": str, "dstaddr": str}, engine="c")
df = df[df["dstport"].isin([25, 465, 587, 2525])]
df["minute"] = df["start"] // 60
g = df.groupby(["srcaddr", "minute"]).agg(conns=("dstaddr", "size"), distinct=("dstaddr", "nunique"))
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": cpu() - c0, "kept": len(df), "windows": len(g),
                  "alerts": 0, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=5_000_000)
    ap.add_argument("--baseline", action="store_true", help="also time a plain pandas script on the same file")
    ap.add_argument("--previous", default=PREVIOUS, help="git revision of the previous release")
    ap.add_argument("--no-previous", action="store_true", help="skip the previous release")
    args = ap.parse_args()
    path = flow_file(args.lines)
    lines = args.lines + 1
    print(f"machine: {machine()}; one CPU (taskset -c 0, POLARS_MAX_THREADS=1)")
    print(f"input: {path.name}, {lines:,} lines, {path.stat().st_size / 1e6:,.0f} MB")
    results = {"this tree": run_pinned(ANALYZE, [str(path)])}
    if not args.no_previous:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results[f"previous release ({args.previous})"] = run_pinned(
                    ANALYZE, [str(path)], str(previous_tree(args.previous, Path(tmp))))
            except Exception as e:  # noqa: BLE001 - a missing or broken old tree is reported, not fatal
                print(f"previous release {args.previous} not available: {str(e)[-300:]}", file=sys.stderr)
    if args.baseline:
        results["pandas read_csv + group-by (no validation, no detectors)"] = run_pinned(PANDAS, [str(path)])
    base = lines / results["this tree"]["cpu_s"]
    print(f"{'contender':58} {'lines/s':>10} {'lines/CPU-s':>12} {'x this tree':>11} {'SMTP kept':>10} "
          f"{'alerts':>7} {'peak RSS':>9}")
    for name, r in results.items():
        rate = lines / r["cpu_s"]
        print(f"{name:58} {lines / r['wall_s']:10,.0f} {rate:12,.0f} {rate / base:11.2f} {r['kept']:10,} "
              f"{r['alerts']:7,} {r['rss_mb']:7.0f} MB")


if __name__ == "__main__":
    main()
