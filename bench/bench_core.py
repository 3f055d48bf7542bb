"""The detector core on one CPU: records in, windows, features, history, horizons, tenants, every
detector, alerts out; this tree against the previous release and a pandas baseline, in one run.

Usage: python bench/bench_core.py [--seed 1] [--instances 1000] [--minutes 120] [--previous REV]

The input is a generated scenario's SMTP records (parsed once, kept under .bench/ as Arrow). Each
contender runs in its own process pinned to CPU 0 (``taskset -c 0``, ``POLARS_MAX_THREADS=1``)
over the same records in batches of 100,000, and reports records per CPU-second and peak RSS:

- this tree: ``smtpguard.detectors.pipeline.Pipeline``;
- the previous release (``--previous``, default: the first commit of the last landed release
  named in docs/PERFORMANCE.md, or ``HEAD~1``): its own tree, checked out with ``git worktree``;
- pandas: per (source, minute) connections, distinct destinations and /24s, rejected port 25 (a
  floor for what any windowed group-by costs, with no history, horizons or detectors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, PREVIOUS, machine, previous_tree, run_pinned  # noqa: E402


RUN = r"""
import json, os, resource, sys, time
import pyarrow as pa, pyarrow.ipc as ipc
records = ipc.open_file(sys.argv[1]).read_all()
mode = sys.argv[2]
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
if mode == "pandas":
    import pandas as pd
    c0 = cpu()
    df = records.select(["start", "src_ip", "dst_ip", "dst_port", "action"]).to_pandas()
    df["minute"] = df["start"].astype("int64") // 60_000_000_000 if str(df["start"].dtype).startswith("datetime64[ns") else df["start"].astype("int64") // 60_000
    df["net"] = df["dst_ip"].str.rsplit(".", n=1).str[0]
    df["rej25"] = (df["action"] == "reject") & (df["dst_port"] == 25)
    g = df.groupby(["src_ip", "minute"]).agg(conns=("dst_ip", "size"), distinct=("dst_ip", "nunique"),
                                            nets=("net", "nunique"), rej25=("rej25", "sum"))
    out = {"cpu_s": cpu() - c0, "windows": len(g), "alerts": 0}
else:
    from smtpguard.detectors.pipeline import Pipeline
    try:
        from smtpguard.core import config
    except ImportError:
        from smtpguard import config
    cfg = config.load(environ={})
    c0 = cpu()
    pipe = Pipeline(cfg)
    windows = alerts = 0
    for off in range(0, records.num_rows, 100_000):
        o = pipe.process(records.slice(off, 100_000))
        windows += o.features.height; alerts += len(o.alerts)
    o = pipe.flush()
    windows += o.features.height; alerts += len(o.alerts)
    out = {"cpu_s": cpu() - c0, "windows": windows, "alerts": alerts}
out["records"] = records.num_rows
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def records_file(seed: int, instances: int, minutes: int) -> Path:
    """The scenario's SMTP records as an Arrow file, made once."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from smtpguard.ingest.reader import read_batches
    from smtpguard.lab import scenario

    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"records-{seed}-{instances}-{minutes}.arrow"
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        paths = scenario.write(scenario.generate(seed, instances=instances, duration_s=minutes * 60,
                                                 abuse=scenario.ABUSE_KINDS), Path(tmp))
        batches = [b.records for _s, b in read_batches([str(paths["flows"])], "aws-vpc", (25, 465, 587, 2525), 200_000)
                   if b.records.num_rows]
    table = pa.concat_tables(batches)
    with ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    return path


def run(records: Path, mode: str, pythonpath: str | None = None) -> dict:
    try:
        return run_pinned(RUN, [str(records), mode], pythonpath)
    except RuntimeError as e:
        raise SystemExit(f"{mode} failed:\n{e}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--minutes", type=int, default=120)
    ap.add_argument("--previous", default=PREVIOUS, help="git revision of the previous release")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rec = records_file(args.seed, args.instances, args.minutes)
    results = {"this tree": run(rec, "pipeline"), "pandas baseline": run(rec, "pandas")}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            results[f"previous release ({args.previous})"] = run(rec, "pipeline", str(previous_tree(args.previous, Path(tmp))))
        except subprocess.CalledProcessError as e:
            print(f"previous release {args.previous} not available: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {machine()}; one CPU (taskset -c 0, POLARS_MAX_THREADS=1)")
    print(f"input: {results['this tree']['records']:,} SMTP records (seed {args.seed}, {args.instances} instances, "
          f"{args.minutes} min, every abuse kind)")
    base = results["this tree"]["records"] / results["this tree"]["cpu_s"]
    print(f"{'contender':32} {'records/CPU-s':>14} {'x this tree':>11} {'windows':>8} {'alerts':>7} {'peak RSS':>9}")
    for name, r in results.items():
        rate = r["records"] / r["cpu_s"]
        print(f"{name:32} {rate:14,.0f} {rate / base:11.2f} {r['windows']:8,} {r['alerts']:7,} {r['rss_mb']:7.0f} MB")


if __name__ == "__main__":
    main()
