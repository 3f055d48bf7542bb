"""Detector memory under a spoofed-source flood: a million distinct source IPs through the detection pipeline.

Usage: python bench/bench_memory.py [--sources 1000000] [--minutes 12] [--flood-per-min 250000]
                                    [--partitions 8] [--batch 50000] [--no-flood] [--profile]

What runs: the detector's own code (``detectors.pipeline.Pipeline``, as ``smtpguard detect`` runs it per
Kafka partition, in one process, no broker and no store) over minutes of event time of

- a generated normal scenario (``smtpguard.lab.scenario``, 300 instances, with the four default injected
  abusers: spam burst, spam from a newly exempted server, connection flood, blocked attempts), and
- a spoofed-source SYN flood mixed in from minute 1: ``--flood-per-min`` port-25 records a minute
  (1 packet, 40-60 bytes, mostly REJECTed) from ``--sources`` distinct addresses towards three of the
  scenario's mail servers; each minute takes the next slice of the address pool, so every address
  recurs every sources/flood-per-min minutes and all of them are active within the last hour.

The input is generated in a child process and streamed in as Arrow IPC record batches of
``--batch`` records in event-time order, so the generator's memory is not counted; each batch is
split by partition exactly as the collector does (``wire.partition_of``) and fed to the pipeline
one pass per partition, like the consumer.

Prints: peak RSS (ru_maxrss of the detecting process: Python, polars, pyarrow, numpy and the pipeline), the
RSS before the pipeline ran, the pipeline's state sizes at the end and at their peak (history entries,
history evictions, open window rows, horizon panes, tenant partials, alert-gate entries), records per
CPU-second (pin with ``taskset -c 1 env POLARS_MAX_THREADS=1`` for a per-core number), whether every
injected abuser was still flagged at medium or higher during the flood, and how the alerts on the
normal scenario's sources compare with the same scenario run without the flood.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, cpu_seconds, machine, peak_rss_mb  # noqa: E402

MEDIUM_UP = ("medium", "high", "critical")
#: minutes of normal traffic after the flood, so the flood's last windows close by watermark as in a live stream
TAIL_MIN = 3


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def normal_records(seed: int, minutes: int):
    """The generated scenario's SMTP records (parsed once, cached as Arrow under .bench/)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from smtpguard.lab import scenario
    from smtpguard.core.config import load
    from smtpguard.ingest.reader import read_batches

    scen = scenario.generate(seed, instances=300, duration_s=minutes * 60)  # the caller adds the tail
    CACHE.mkdir(exist_ok=True)
    cached = CACHE / f"memory-scenario-{seed}-{minutes}.arrow"
    if not cached.exists():
        paths = scenario.write(scen, CACHE / f"memory-scenario-{seed}-{minutes}")
        cfg = load(environ={})
        tables = [b.records for _, b in read_batches([str(paths["flows"])], "aws-vpc", cfg.ingest.smtp_ports, 100_000)]
        table = pa.concat_tables(tables)
        with ipc.new_file(str(cached) + ".tmp", table.schema) as w:
            w.write_table(table)
        Path(str(cached) + ".tmp").rename(cached)
        (CACHE / f"memory-scenario-{seed}-{minutes}" / "exemptions.csv").replace(cached.with_suffix(".csv"))
    table = ipc.open_file(str(cached)).read_all()
    return scen, table, cached.with_suffix(".csv")


def ip_text(u32):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    octets = pa.array([str(i) for i in range(256)])
    parts = [octets.take(pa.array(((u32 >> s) & 255).astype(np.int64))) for s in (24, 16, 8, 0)]
    return pc.binary_join_element_wise(*parts, ".")


def flood_minute(rng, minute_ms: int, pool: int, first: int, n: int, targets: list[tuple[str, str, str]]):
    """``n`` spoofed-source SYNs in one minute: sources pool[first:first+n] (wrapping)."""
    import numpy as np
    import pyarrow as pa

    from smtpguard.core import record

    k = (np.arange(first, first + n, dtype=np.int64) % pool).astype(np.uint64)
    # distinct addresses in 64.0.0.0/6 (an odd multiplier permutes the 2^26 addresses)
    u32 = (np.uint64(64 << 24) + (k * np.uint64(2654435761)) % np.uint64(1 << 26)).astype(np.uint32)
    start = minute_ms + np.sort(rng.integers(0, 60_000, n))
    t = rng.integers(0, len(targets), n)
    ts = pa.timestamp("ms", tz="UTC")
    return record.conform(pa.table({
        "start": pa.array(start, ts), "end": pa.array(start + rng.integers(0, 2000, n), ts),
        "src_ip": ip_text(u32), "dst_ip": pa.array([targets[i][0] for i in range(len(targets))]).take(pa.array(t)),
        "src_port": pa.array(rng.integers(1024, 65535, n).astype(np.uint16)),
        "dst_port": pa.array(np.full(n, 25, np.uint16)), "protocol": pa.array(np.full(n, 6, np.uint8)),
        "packets": pa.array(np.ones(n, np.uint64)), "bytes": pa.array(rng.integers(40, 61, n).astype(np.uint64)),
        "action": pa.array(np.where(rng.random(n) < 0.8, "reject", "accept")),
        "tcp_flags": pa.array(np.full(n, 2, np.uint16)),
        "tenant": pa.array([targets[i][1] for i in range(len(targets))]).take(pa.array(t)),
        "interface_id": pa.array([targets[i][2] for i in range(len(targets))]).take(pa.array(t)),
    }), source_format="aws-vpc", exporter="flood")


def state_sizes(pipe) -> dict[str, int]:
    stats = pipe.state_stats()
    streams = list(pipe.streams.values())
    stats["open_bytes"] = sum(sum(df.estimated_size() for df in s.engine._open) for s in streams)
    stats["pane_bytes"] = sum(s.panes.panes.estimated_size() for s in streams)
    return stats


def emit(args, flood: bool) -> None:
    """The input, written to stdout as one Arrow IPC stream of record batches of ``--batch`` records in
    event-time order (run in a child process, so the generator's memory is not counted as the detector's)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from smtpguard.core import record

    scen, normal, _ = normal_records(args.seed, args.minutes + TAIL_MIN)
    rng = np.random.default_rng(5)
    mail = [a for a in scen.actors if a.kind == "mail_server" and not a.abusive][:3]
    targets = [(a.ip, a.tenant, a.interface_id) for a in mail]
    t0_ms = int(scen.start.timestamp() * 1000)
    normal_start = pc.cast(normal.column("start"), pa.int64()).to_numpy()
    with pa.ipc.new_stream(sys.stdout.buffer, record.SCHEMA) as out:
        for m in range(args.minutes + TAIL_MIN):
            lo, hi = t0_ms + m * 60_000, t0_ms + (m + 1) * 60_000
            parts = [normal.filter(pa.array((normal_start >= lo) & (normal_start < hi)))]
            if flood and 1 <= m < args.minutes:
                parts.append(flood_minute(rng, lo, args.sources, (m - 1) * args.flood_per_min, args.flood_per_min,
                                          targets))
            minute = pa.concat_tables(parts)
            minute = minute.take(pc.sort_indices(minute, [("start", "ascending")]))
            for b in range(0, minute.num_rows, args.batch):
                out.write_table(minute.slice(b, args.batch))


def run(args, scen, exemptions_csv, flood: bool):
    import subprocess

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from smtpguard.core import wire
    from smtpguard.core.config import load
    from smtpguard.detectors.features import to_store
    from smtpguard.detectors.pipeline import Output, Pipeline
    from smtpguard.detectors.runner import HAND_OFF_WINDOWS
    from smtpguard.core.exemptions import Exemptions

    cfg = load(environ={})
    pipe = Pipeline(cfg, Exemptions.from_csv(exemptions_csv))
    cmd = [sys.executable, __file__, "--emit", "--seed", str(args.seed), "--minutes", str(args.minutes),
           "--sources", str(args.sources), "--flood-per-min", str(args.flood_per_min), "--batch", str(args.batch)]
    child = subprocess.Popen(cmd + ([] if flood else ["--no-flood"]), stdout=subprocess.PIPE)
    t0_ms = int(scen.start.timestamp() * 1000)
    alerts = []
    peak: dict[str, int] = {}
    records = flood_records = 0
    cpu = 0.0
    offsets = [0] * args.partitions
    shown = -1
    reader = pa.ipc.open_stream(child.stdout)
    for batch in reader:
        batch = pa.Table.from_batches([batch])
        minute = (int(batch.column("start")[0].value) - t0_ms) // 60_000
        if args.profile and minute != shown:
            if shown >= 0:
                profile_line(shown, pipe)
            shown = minute
        flood_records += pc.sum(pc.equal(batch.column("exporter"), "flood")).as_py() or 0
        part = wire.partition_of(batch.column("src_ip"), args.partitions)
        c0 = cpu_seconds()
        out = Output()
        for p in np.unique(part):
            sub = batch.filter(pa.array(part == p))
            o = pipe.process(sub, key=int(p), offset=offsets[p])
            if o.features.height >= HAND_OFF_WINDOWS:
                # as the detector consumer does: a large close goes to the store writer at once
                # (converted to the store's Arrow table; the writer thread then owns it)
                to_store(o.features)
                out.alerts.extend(o.alerts)
            else:
                out.extend(o)
            offsets[p] += 1
        cpu += cpu_seconds() - c0
        records += batch.num_rows
        alerts.extend(out.alerts)
        for k, v in state_sizes(pipe).items():
            peak[k] = max(peak.get(k, 0), v)
    if child.wait() != 0:
        raise SystemExit(f"the input generator failed (status {child.returncode})")
    if args.profile and shown >= 0:
        profile_line(shown, pipe)
    c0 = cpu_seconds()
    out = pipe.flush()
    cpu += cpu_seconds() - c0
    alerts.extend(out.alerts)
    final = state_sizes(pipe)
    return pipe, alerts, records, flood_records, cpu, peak, final


def profile_line(m: int, pipe) -> None:
    s = state_sizes(pipe)
    print(f"  minute {m:3d}: RSS {rss_mb():6,.0f} MB  sources {s['sources']:>9,} "
          f"({s['history_bytes'] / 2**20:5.0f} MB, {s['familiar_rows']:,} full rows, evicted "
          f"{s['evicted_sources']:,})  open rows {s['open_rows']:>9,} ({s['open_bytes'] / 2**20:4.0f} MB)  "
          f"panes {s['panes']:>9,} ({s['pane_bytes'] / 2**20:4.0f} MB, evicted {s['evicted_panes']:,})  "
          f"gate {s['gate_entries']:,}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=1_000_000, help="distinct spoofed source addresses")
    ap.add_argument("--minutes", type=int, default=12, help="minutes of event time (the flood runs from minute 1)")
    ap.add_argument("--flood-per-min", type=int, default=250_000, help="flood records per minute")
    ap.add_argument("--partitions", type=int, default=8, help="partitions (pipeline streams) in this one process")
    ap.add_argument("--batch", type=int, default=50_000, help="records per pipeline pass (all partitions)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-flood", action="store_true", help="only the normal scenario (memory baseline)")
    ap.add_argument("--no-compare", action="store_true", help="skip the run without flood that alerts are compared with")
    ap.add_argument("--profile", action="store_true", help="print RSS and state sizes after every minute")
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emit:
        emit(args, not args.no_flood)
        return

    print(f"machine: {machine()}")
    scen, normal, exemptions_csv = normal_records(args.seed, args.minutes + TAIL_MIN)
    n_normal = normal.num_rows
    del normal
    import polars  # noqa: F401  (imports count in the RSS before the run)

    from smtpguard.detectors import pipeline  # noqa: F401

    before = rss_mb()
    print(f"normal scenario: seed {args.seed}, 300 instances, {args.minutes + TAIL_MIN} min, {n_normal:,} SMTP records; "
          f"RSS before the pipeline {before:,.0f} MB")
    flood = not args.no_flood
    t0 = time.perf_counter()
    pipe, alerts, records, flood_records, cpu, peak, final = run(args, scen, exemptions_csv, flood)
    wall = time.perf_counter() - t0
    peak_rss = peak_rss_mb()
    if flood:
        per_min = min(args.flood_per_min, args.sources)
        print(f"flood: {flood_records:,} records from {min(args.sources, flood_records):,} distinct spoofed sources "
              f"({per_min:,} a minute, every source again every {args.sources / per_min:.0f} min) "
              f"over {args.minutes - 1} min toward 3 mail servers, {args.partitions} partitions in one process")
    print(f"pipeline: {records:,} records in {wall:.1f} s wall ({records / wall:,.0f} records/s), {cpu:.1f} CPU-s in the "
          f"pipeline -> {records / cpu:,.0f} records per CPU-second")
    print(f"peak RSS {peak_rss:,.0f} MB (before the pipeline {before:,.0f} MB; target < 1024 MB)")
    print("state at its peak: " + ", ".join(f"{k} {v:,}" for k, v in peak.items()))
    print("state at the end:  " + ", ".join(f"{k} {v:,}" for k, v in final.items()))
    raised = [a for a in alerts if not a.suppressed and a.severity in MEDIUM_UP]
    flagged = {a.src_ip for a in raised}
    for a in scen.abusive:
        dets = sorted({x.detector for x in raised if x.src_ip == a.ip})
        print(f"abuser {a.ip:15s} {a.label:18s} {'FLAGGED' if a.ip in flagged else 'MISSED '} {', '.join(dets)}")
    spoofed = [a for a in raised if a.src_ip is not None and a.src_ip.startswith(("64.", "65.", "66.", "67."))]
    tenant = [a for a in raised if a.src_ip is None]
    print(f"medium+ alerts: {len(raised)} ({len(spoofed)} on spoofed sources, {len(tenant)} tenant-level)")
    if flood and not args.no_compare:
        known = {a.ip for a in scen.actors}
        _, base, *_ = run(args, scen, exemptions_csv, False)
        key = lambda a: (a.src_ip, a.detector, a.window_start, a.severity)  # noqa: E731
        want = {key(a) for a in base if not a.suppressed and a.severity in MEDIUM_UP and a.src_ip in known}
        got = {key(a) for a in raised if a.src_ip in known}
        print(f"alerts on the scenario's own sources, flood vs no flood: {len(got)} vs {len(want)}; "
              f"{'identical' if got == want else f'missing {sorted(want - got)}, extra {sorted(got - want)}'}")


if __name__ == "__main__":
    main()
