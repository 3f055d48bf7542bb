"""Detector throughput with 1, 2 and 4 `smtpguard detect` processes in one consumer group.

Usage: python bench/bench_scaleout.py [--lines 4000000] [--processes 1,2,4] [--partitions 4]

A generated AWS VPC flow-log file (bench/common.py flow_file) is collected once into a local
Tansu topic and read back. For each process count, a fresh topic gets the same messages once
every process of a fresh group holds partitions (so start-up rebalances are not measured),
and the detectors' own counters (smtpguard_detector_records_total, scraped from each
process's metrics endpoint every 0.1 s) give the rate: records / (time the last record was
counted - time the first was). Each process runs the full detector (windows, history,
features, alerts, the response policy, flows and features written, checkpoints). The
embedded store has one owner process, so each detector writes to its own chdb store here;
a deployment shares a ClickHouse server. Prints records/s and CPU per process count, and the
machine: on 2 cores, processes beyond 2 share cores with each other and with the broker.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import flow_file, machine  # noqa: E402

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))


def config_text(bootstrap: str, group: str, topic: str, data: Path, partitions: int) -> str:
    return f"""data_dir = "{data}"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
partitions = {partitions}
session_timeout_ms = 6000
max_poll_interval_ms = 60000
[kafka.topics]
flows = "{topic}"
dlq = "{topic}.dlq"
alerts = "{topic}.alerts"
enforcement = "{topic}.enforcement"
[store]
dsn = "chdb://{data}/store"
[detect]
idle_flush_ms = 1000
checkpoint_interval_ms = 1000
[dnsbl]
check_alerts_from = "off"
[metrics]
listen = "127.0.0.1:0"
"""


def held(log: str) -> set[int]:
    out: set[int] = set()
    for kind, parts in re.findall(r"(assigned|revoked) partitions \[([\d, ]*)\]", log):
        ps = {int(x) for x in parts.split(",") if x.strip()}
        out = out | ps if kind == "assigned" else out - ps
    return out


def scrape(url: str) -> tuple[float, float]:
    """(records consumed, CPU seconds) of one detector process."""
    text = urllib.request.urlopen(url, timeout=2).read().decode()
    rec = re.search(r"^smtpguard_detector_records_total ([0-9.e+]+)$", text, re.M)
    cpu = re.search(r"^process_cpu_seconds_total ([0-9.e+]+)$", text, re.M)
    return (float(rec.group(1)) if rec else 0.0), (float(cpu.group(1)) if cpu else 0.0)


def run(args, bootstrap: str, messages: list, records: int, n: int, work: Path) -> dict:
    from confluent_kafka import Producer

    tag = uuid.uuid4().hex[:8]
    topic = f"bench-flows-{n}-{tag}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    procs, logs = [], []
    for i in range(n):
        data = work / f"{n}-{tag}-{i}"
        data.mkdir(parents=True)
        conf = data / "smtpguard.toml"
        conf.write_text(config_text(bootstrap, f"bench-{n}-{tag}", topic, data, args.partitions))
        log = data / "detect.log"
        logs.append(log)
        procs.append(subprocess.Popen([SMTPGUARD, "-v", "--config", str(conf), "detect"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(log, "w")))
    try:
        deadline = time.monotonic() + 120
        while True:
            h = [held(log.read_text()) for log in logs]
            urls = [re.search(r"metrics on (http://\S+)", log.read_text()) for log in logs]
            if all(h) and sorted(p for x in h for p in x) == list(range(args.partitions)) and all(urls):
                break
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise SystemExit("detectors did not settle:\n" + "\n".join(log.read_text()[-1500:] for log in logs))
            time.sleep(0.2)
        urls = [u.group(1) for u in urls]
        cpu0 = [scrape(u)[1] for u in urls]
        from confluent_kafka import Consumer, TopicPartition

        ends: dict[int, int] = {}
        for p, *_ in messages:
            ends[p] = ends.get(p, 0) + 1
        probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{n}-{tag}", "enable.auto.commit": False})
        prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 8 * 1024 * 1024})
        first = time.perf_counter()
        for p, value, headers, ts in messages:
            while True:
                try:
                    prod.produce(topic, value, partition=p, headers=headers, timestamp=ts)
                    break
                except BufferError:
                    prod.poll(0.05)
            prod.poll(0)
        prod.flush(60)
        produced = time.perf_counter() - first
        counted = None
        deadline = time.monotonic() + 600
        while True:
            now = time.perf_counter()
            if counted is None and sum(scrape(u)[0] for u in urls) >= records:
                counted = now
            got = probe.committed([TopicPartition(topic, p) for p in ends], timeout=10)
            if all(tp.offset >= ends[tp.partition] for tp in got):
                last = now
                break
            if time.monotonic() > deadline:
                raise SystemExit("the detectors did not commit the whole topic")
            time.sleep(0.1)
        probe.close()
        seen = [scrape(u) for u in urls]
        cpu = sum(c for _, c in seen) - sum(cpu0)
        per = [r for r, _ in seen]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    wall = last - first
    return {"n": n, "wall": wall, "rate": records / wall, "cpu": cpu, "per_process": per, "produced": produced,
            "counted": (counted or last) - first,
            "partitions": [sorted(x) for x in h]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=4_000_000)
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()

    from confluent_kafka import Consumer, TopicPartition

    from smtpguard.core import config
    from smtpguard.ingest.collector import Collector
    from smtpguard.core.kafka import LocalBroker, ensure_topics

    path = flow_file(args.lines)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        cfg = config.load(environ={}, overrides={
            "data_dir": tmp, "kafka": {"bootstrap_servers": broker.bootstrap, "partitions": args.partitions,
                                       "topics": {"flows": "bench-source"}}})
        ensure_topics(cfg)
        stats = Collector(cfg).run([str(path)], "aws-vpc")
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench-read", "enable.auto.commit": False,
                      "fetch.max.bytes": 64 * 1024 * 1024})
        c.assign([TopicPartition("bench-source", p, 0) for p in range(args.partitions)])
        messages, quiet = [], time.monotonic()
        while time.monotonic() - quiet < 3:
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    messages.append((m.partition(), m.value(), m.headers(), m.timestamp()[1]))
                    quiet = time.monotonic()
        c.close()
        messages.sort(key=lambda m: m[3])
        print(f"input: {stats.read:,} lines -> {stats.kept:,} SMTP records in {len(messages):,} messages, "
              f"{args.partitions} partitions")
        base = None
        for n in [int(x) for x in args.processes.split(",")]:
            r = run(args, broker.bootstrap, messages, stats.kept, n, Path(tmp))
            base = base or r["rate"]
            print(f"{n} process(es): {r['rate']:,.0f} records/s ({r['rate'] / base:.2f}x one process): "
                  f"{r['wall']:.1f} s from the first message produced to the last offset committed (producing took "
                  f"{r['produced']:.1f} s, every record counted after {r['counted']:.1f} s; the commit includes the "
                  f"1 s idle flush of the last windows), {r['cpu']:.1f} CPU-s in the "
                  f"detectors ({stats.kept / max(r['cpu'], 1e-9):,.0f} records per CPU-second); partitions "
                  f"{r['partitions']}, records per process {[int(x) for x in r['per_process']]}", flush=True)


if __name__ == "__main__":
    main()
