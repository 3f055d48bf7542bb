"""A store filled the way the pipeline fills it, for the console's tests: a generated scenario's flows,
the detectors' window features and alerts, and the scenario's exemptions in the registry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from smtpguard.lab import scenario
from smtpguard.app.analyze import analyze
from smtpguard.core.config import Config
from smtpguard.core.alert import Alert
from smtpguard.detectors import storage
from smtpguard.detectors.features import to_store
from smtpguard.core.exemptions import Exemptions
from smtpguard.ingest.reader import read_batches
from smtpguard.core.registry import Registry
from smtpguard.core.store import Store


@dataclass
class Filled:
    alerts: list[Alert]
    """raised alerts (not suppressed)"""
    truth: dict[str, str]
    """abusive source IP -> its label"""
    exempted: set[str]

    def first(self, *, label: str, exempted: bool, severity: str | None = None) -> Alert:
        """The first raised alert about a source with ``label`` (and exemption, severity) in the truth."""
        return next(a for a in self.alerts
                    if self.truth.get(a.src_ip) == label and a.exempted == exempted
                    and (severity is None or a.severity == severity))


SEED, INSTANCES, MINUTES = 7, 40, 40


def plan(seed: int = SEED, instances: int = INSTANCES, minutes: int = MINUTES) -> scenario.Scenario:
    """The scenario the console's store is filled with (its actors name the addresses tests look for)."""
    return scenario.generate(seed, instances=instances, duration_s=minutes * 60)


def abuser(scen: scenario.Scenario, label: str) -> str:
    """The address of the scenario's abuser of this kind."""
    return next(a.ip for a in scen.actors if a.label == label)


def fill(store: Store, cfg: Config, out_dir: Path, *, seed: int = SEED, instances: int = INSTANCES,
         minutes: int = MINUTES) -> Filled:
    scen = plan(seed, instances, minutes)
    paths = scenario.write(scen, out_dir)
    flows = [str(paths["flows"])]
    for n, (_src, batch) in enumerate(read_batches(flows, "aws-vpc", cfg.ingest.smtp_ports, cfg.ingest.chunk_lines)):
        rows = batch.records.num_rows
        # the position a record would have had on the flows topic: one message per batch
        store.insert_flows(batch.records.append_column("kafka_partition", pa.array([0] * rows, pa.uint32()))
                           .append_column("kafka_offset", pa.array([n] * rows, pa.int64()))
                           .append_column("kafka_row", pa.array(range(rows), pa.uint32())))
    exemptions = Exemptions.from_csv(paths["exemptions"])
    res = analyze(cfg, flows, "aws-vpc", exemptions, keep_features=True)
    store.insert_alerts(res.alerts)
    for f in res.features:
        storage.insert_features(store, to_store(f))
    Registry(store).import_csv(paths["exemptions"], actor="import")
    truth = {a["ip"]: a["label"] for a in json.loads(Path(paths["truth"]).read_text()) if a["label"] != "benign"}
    return Filled(res.raised(), truth, {str(e.network.network_address) for e in exemptions.entries})
