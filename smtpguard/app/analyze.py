"""Offline analysis: the streaming detectors over files, with no broker and no store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import polars as pl
import pyarrow as pa

from smtpguard.core.config import Config
from smtpguard.core.alert import Alert
from smtpguard.detectors.pipeline import Output, Pipeline
from smtpguard.core.exemptions import Exemptions
from smtpguard.core.inventory import Inventory
from smtpguard.core.deadletter import Reject
from smtpguard.ingest.reader import Progress, read_batches
from smtpguard.core.record import SEVERITIES
from smtpguard.core.store import Store


#: Parsed records are handed to the detectors in batches of at least this many: a window close costs
#: about the same for 20,000 records as for 200,000 (its polars queries run per close), so larger
#: batches close the same windows with less work (1 M flow-log lines: 0.99 -> 0.41 CPU-s of detection).
DETECT_BATCH_RECORDS = 250_000


@dataclass
class AnalyzeResult:
    alerts: list[Alert] = field(default_factory=list)
    windows: int = 0
    read: int = 0
    kept: int = 0
    skipped: int = 0
    rejects: int = 0
    late: int = 0
    elapsed_s: float = 0.0
    features: list[pl.DataFrame] = field(default_factory=list)
    tenant_features: list[pl.DataFrame] = field(default_factory=list)

    def raised(self) -> list[Alert]:
        return [a for a in self.alerts if not a.suppressed]

    def summary(self) -> str:
        by_sev: dict[str, int] = {}
        for a in self.raised():
            by_sev[a.severity] = by_sev.get(a.severity, 0) + 1
        sev = ", ".join(f"{n} {s}" for s, n in sorted(by_sev.items(), key=lambda kv: -SEVERITIES.index(kv[0])))
        rate = self.read / self.elapsed_s if self.elapsed_s else 0.0
        return (f"read {self.read:,} lines ({rate:,.0f}/s), {self.kept:,} SMTP records, {self.skipped:,} skipped, "
                f"{self.rejects:,} rejected, {self.late:,} late; {self.windows:,} source-minute windows; "
                f"{len(self.raised())} alerts ({sev or 'none'}), "
                f"{len(self.alerts) - len(self.raised())} suppressed by cooldown")


def analyze(cfg: Config, paths: Sequence[str], fmt: str = "auto", exemptions: Exemptions | None = None,
            progress: Progress | None = None, on_reject: Callable[[Reject], None] | None = None,
            keep_features: bool = False, inventory: Inventory | None = None, verdicts_from: Store | None = None
            ) -> AnalyzeResult:
    """Detect over flow files. ``verdicts_from``: a store whose review verdicts hold repeats of dismissed
    alerts at low (``detect.hold_repeats_below``), as the detector consumer does."""
    res = AnalyzeResult()
    pipe = Pipeline(cfg, exemptions, inventory=inventory)
    if verdicts_from is not None and pipe.repeats is not None:
        pipe.repeats.refresh(verdicts_from)
    if keep_features:
        pipe.tenant_features = res.tenant_features
    t0 = time.perf_counter()

    def take(out: Output) -> None:
        res.windows += out.features.height
        res.alerts.extend(out.alerts)
        if keep_features and out.features.height:
            res.features.append(out.features)

    pending: list[pa.Table] = []
    held = 0
    for _src, batch in read_batches(paths, fmt, cfg.ingest.smtp_ports, cfg.ingest.chunk_lines, progress):
        res.read += batch.read
        res.kept += batch.records.num_rows
        res.skipped += batch.skipped
        res.rejects += len(batch.rejects)
        if on_reject is not None:
            for r in batch.rejects:
                on_reject(r)
        if batch.records.num_rows:
            pending.append(batch.records)
            held += batch.records.num_rows
        if held >= DETECT_BATCH_RECORDS:
            take(pipe.process(pa.concat_tables(pending)))
            pending, held = [], 0
    if pending:
        take(pipe.process(pa.concat_tables(pending)))
    take(pipe.flush())
    res.late = pipe.late_records
    res.elapsed_s = time.perf_counter() - t0
    res.alerts.sort(key=lambda a: (a.window_start, a.src_ip or "", a.detector))
    return res


CONTRACT_FIELDS = ("alert_id", "src_ip", "tenant", "detector", "severity", "score", "window_start", "window_end",
                   "reasons", "next_step", "exempted", "evidence")


def contract_json(a: Alert) -> dict:
    """One alert as ``analyze --json`` prints it (DESIGN.md contract, plus id, exemption and evidence)."""
    return {k: getattr(a, k) for k in CONTRACT_FIELDS}
