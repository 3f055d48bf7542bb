"""Records in, window features and alerts out: the detection path shared by ``analyze``
(files, no broker) and ``detect`` (Kafka consumer group).

One :class:`WindowEngine` and one :class:`AlertGate` per stream: per Kafka partition in the
consumer, a single one in ``analyze``. Records are keyed by source IP, so every window of
an IP lives in exactly one stream.

State is bounded per process: ``detect.max_sources`` source histories and ``detect.max_panes``
horizon panes, shared evenly by the streams the process holds (re-divided when partitions are
assigned or revoked); what is evicted to stay within them is counted (:meth:`Pipeline.state_stats`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from smtpguard.core.config import Config
from smtpguard.core.exemptions import Exemptions
from smtpguard.core.inventory import Inventory, SourceKeys

from smtpguard.core.alert import Alert

from .alerts import AlertGate
from .repeats import RepeatHold
from .features import (RECORD_COLUMNS, close_windows, connection_weights, empty_features, lower_bounds,
                       sample_support)
from .history import HistoryParams, SourceHistory
from .horizons import Panes, pane_types
from .rules import Detector, build_detectors
from .tenants import TenantStage
from .windows import WindowEngine

log = logging.getLogger(__name__)


@dataclass
class Output:
    features: pl.DataFrame = field(default_factory=empty_features)
    alerts: list[Alert] = field(default_factory=list)
    rollups: pl.DataFrame | None = None
    """the closed windows' records for the store's per-minute rollups (:func:`rollup_rows`), when asked for"""

    def extend(self, other: "Output") -> None:
        if other.features.height:
            self.features = pl.concat([self.features, other.features]) if self.features.height else other.features
        self.alerts.extend(other.alerts)
        if other.rollups is not None:
            self.rollups = other.rollups if self.rollups is None else pl.concat([self.rollups, other.rollups])


def rollup_rows(rows: pl.DataFrame, partition: int) -> pl.DataFrame:
    """The closing records of one stream reduced to one row per minute, source address, tenant and destination
    (``rollup_input``, :data:`smtpguard.core.store.ROLLUP_INPUT_COLUMNS`), with the stream's partition and the
    window's start in ``kafka_offset``. A sampled record counts ``sampling_rate`` connections; the tenant is
    the record's own (``flows``'), not one the inventory filled in."""
    weight = pl.max_horizontal(pl.col("sampling_rate").fill_null(1).cast(pl.UInt64), pl.lit(1, pl.UInt64))
    start = pl.col("start").cast(pl.Int64)
    return (rows.group_by(
        minute=(start // 60_000 * 60_000).cast(pl.Datetime("ms", "UTC")),
        src_ip=pl.coalesce("src_addr", "src_ip"), dst_ip="dst_ip",
        # the record's own tenant, as ``flows`` holds it (not one the inventory filled in)
        tenant=pl.when(pl.col("tenant_filled")).then(pl.lit("")).otherwise(pl.col("tenant").fill_null("")),
        kafka_offset="window_start")
        .agg(connections=weight.sum(), rejected=weight.filter(pl.col("action") == "reject").sum(),
             bytes=pl.col("bytes").cast(pl.UInt64).sum(), packets=pl.col("packets").cast(pl.UInt64).sum())
        .with_columns(kafka_partition=pl.lit(partition, pl.UInt32), kafka_offset=pl.col("kafka_offset").cast(pl.Int64)))


@dataclass
class Stream:
    engine: WindowEngine
    gate: AlertGate
    history: SourceHistory
    panes: Panes
    idle: bool = False
    """no input for a while (:meth:`Pipeline.set_idle`): it does not hold tenant windows open until it has input"""


class Pipeline:
    def __init__(self, cfg: Config, exemptions: Exemptions | None = None, detectors: list[Detector] | None = None,
                 inventory: Inventory | None = None, rollups: bool = False):
        """``rollups``: each close also gives its records for the store's per-minute rollups (the consumer
        writes them; ``analyze`` has no store)."""
        self.cfg = cfg
        self.rollups = rollups
        self.exemptions = exemptions or Exemptions()
        if inventory is None and cfg.detect.inventory_csv:
            inventory = Inventory.from_csv(cfg.detect.inventory_csv)
        self.keys = SourceKeys(inventory, cfg.detect.ipv6_prefix_len)
        detectors = detectors if detectors is not None else build_detectors(cfg.detect.detectors)
        self.detectors = [d for d in detectors if d.scope == "source"]
        self.tenant_detectors = [d for d in detectors if d.scope == "tenant"]
        self.streams: dict[int, Stream] = {}
        self.tenants = TenantStage(cfg.detect.window_ms)
        self.tenant_gate = AlertGate(cfg.detect.cooldown_ms)
        established = [d.params.established_exemption_days for d in self.tenant_detectors]
        self.tenant_established_days = established[0] if established else 7.0
        self.repeats: RepeatHold | None = None
        """holds repeats of dismissed alerts at low once it has the team's verdicts (:meth:`RepeatHold.refresh`)"""
        if cfg.detect.hold_repeats_below > 0:
            from smtpguard.models.verdicts import models_folder

            self.repeats = RepeatHold(models_folder(cfg.data_dir), cfg.detect.hold_repeats_below)
        self.tenant_features: list[pl.DataFrame] | None = None
        """when a list, every closed tenant window's features are appended to it (analyze --keep-features)"""
        self.evictions: dict[str, int] = {"sources": 0, "sources_unremembered": 0, "familiar_saturated": 0,
                                          "panes": 0}
        """what this process evicted to stay within its bounds, since it started (monotonic)"""

    def stream(self, key: int) -> Stream:
        s = self.streams.get(key)
        if s is None:
            d = self.cfg.detect
            s = self.streams[key] = Stream(WindowEngine(d.window_ms, d.allowed_lateness_ms), AlertGate(d.cooldown_ms),
                                           SourceHistory(HistoryParams(learning_minutes=d.learning_minutes)),
                                           Panes(d.window_ms))
            self._budget()
        return s

    def drop(self, key: int) -> None:
        """Forget a stream's state (its partition was revoked; the new owner replays from the safe offset)."""
        if self.streams.pop(key, None) is not None:
            self._budget()

    def _budget(self) -> None:
        """Share the process's bounds evenly among its streams (enforced at their next window close)."""
        n = max(1, len(self.streams))
        for s in self.streams.values():
            s.history.p.max_sources = max(1, self.cfg.detect.max_sources // n)
            s.panes.max_rows = max(1, self.cfg.detect.max_panes // n)

    def state_stats(self) -> dict[str, int]:
        """Sizes of the state held now (all streams) and the process's eviction counters."""
        st = list(self.streams.values())
        out = {
            "sources": sum(len(s.history) for s in st),
            "familiar_rows": sum(s.history.wide_rows for s in st),
            "panes": sum(len(s.panes) for s in st),
            "open_rows": sum(s.engine.open_rows for s in st),
            "tenant_rows": self.tenants.instances.height + self.tenants.registers.height,
            "gate_entries": sum(len(s.gate._last) + len(s.gate._incidents) for s in st)
            + len(self.tenant_gate._last) + len(self.tenant_gate._incidents),
            "history_bytes": sum(s.history.nbytes() for s in st),
        }
        out.update({f"evicted_{k}": v for k, v in self.evictions.items()})
        return out

    def process(self, records: pa.Table, key: int = 0, offset: int = -1, offsets: pa.Array | None = None) -> Output:
        s = self.stream(key)
        s.idle = False
        rows = pl.from_arrow(records.select(list(RECORD_COLUMNS)))
        weights = connection_weights(records) if records.num_rows else None
        if weights is not None:
            rows = rows.with_columns(weights)
        s.engine.add(self.keys.apply(rows) if rows.height else rows, offset=offset, offsets=offsets)
        return self._close(s, force=False, key=key)

    def flush(self, key: int | None = None) -> Output:
        """Close every open window (end of input, or an idle stream)."""
        out = Output()
        for k in [key] if key is not None else sorted(self.streams):
            if k in self.streams:
                out.extend(self._close(self.streams[k], force=True, key=k))
        if key is None:
            out.alerts.extend(self._close_tenants(force=True))
        return out

    def _close(self, s: Stream, force: bool, key: int = 0) -> Output:
        rows = s.engine.close_ready(force=force)
        if rows is None or rows.height == 0:
            return Output()
        rollups = rollup_rows(rows, key) if self.rollups else None
        closed = close_windows(rows, self.cfg.detect.window_ms)
        h, counted = s.history, (s.history.evicted, s.history.unremembered, s.history.saturated, s.panes.evicted)
        feats = h.observe(closed.features, closed.pairs)
        feats = s.panes.add(feats)
        for k, before, now in zip(("sources", "sources_unremembered", "familiar_saturated", "panes"), counted,
                                  (h.evicted, h.unremembered, h.saturated, s.panes.evicted)):
            self.evictions[k] += now - before
        annotated = self.exemptions.annotate(feats)
        # packet-sampled windows: the features keep the estimates, the detectors judge their lower bounds
        support = sample_support(rows)
        judged = annotated if support is None else lower_bounds(annotated, support, self.cfg.detect.sampling_confidence)
        findings = [f for d in self.detectors for f in d.evaluate(judged)]
        if support is not None:
            _say_sampled(findings, support, self.cfg.detect.sampling_confidence)
        if self.repeats is not None and findings:
            self.repeats.hold(findings, annotated)
        skip = annotated.filter(pl.col("exempted") & (pl.col("exemption_age_days") >= self.tenant_established_days))
        self.tenants.add(closed.tenant_rows, set(skip["src_ip"].to_list()))
        lateness = self.cfg.detect.allowed_lateness_ms
        for f in findings:
            # the event time at which the watermark passes the window: when the alert is due, whatever the batch size
            due = f.window_end_ms + lateness
            f.evidence["emitted_at_ms"] = min(due, s.engine.max_event_ms) if force else due
        alerts = s.gate.admit(findings)
        s.gate.prune(s.engine.closed_upto_ms)
        if not force:
            alerts.extend(self._close_tenants(force=False))
        return Output(annotated, alerts, rollups)

    def set_idle(self, key: int) -> list[Alert]:
        """A stream had no input for a while (the consumer's ``detect.idle_flush_ms``): until it has input
        again it no longer holds tenant windows open; returns the tenant alerts that this releases."""
        s = self.streams.get(key)
        if s is None or s.idle:
            return []
        s.idle = True
        return self._close_tenants(force=False)

    def _close_tenants(self, force: bool) -> list[Alert]:
        """Tenant windows close when every stream has closed the minute: a tenant's instances may sit on
        several streams. Streams that exist but never had input hold them open (the consumer creates a
        stream per assigned partition), until they are idle (:meth:`set_idle`)."""
        if not self.tenant_detectors:
            return []
        if force:
            upto = None
        else:
            live = [s for s in self.streams.values() if not s.idle]
            if not live:
                live = [s for s in self.streams.values() if s.engine.closed_upto_ms is not None]
            marks = [s.engine.closed_upto_ms for s in live]
            if not marks or any(m is None for m in marks):
                return []
            upto = min(marks)
        feats = self.tenants.close(upto)
        if feats is None or feats.height == 0:
            return []
        if self.tenant_features is not None:
            self.tenant_features.append(feats)
        findings = [f for d in self.tenant_detectors for f in d.evaluate(feats)]
        for f in findings:
            f.evidence["emitted_at_ms"] = f.window_end_ms + self.cfg.detect.allowed_lateness_ms
        admitted = self.tenant_gate.admit(findings)
        if self.tenants.closed_upto_ms is not None:
            self.tenant_gate.prune(self.tenants.closed_upto_ms)
        return admitted

    def checkpoint(self, key: int) -> dict | None:
        """A stream's state for the store: watermark, source history, panes, cooldowns."""
        s = self.streams.get(key)
        if s is None:
            return None
        import io

        buf = io.BytesIO()
        if s.panes.panes.height:
            s.panes.panes.write_ipc(buf)
        return {
            "closed_upto_ms": s.engine.closed_upto_ms if s.engine.closed_upto_ms is not None else -1,
            "history": s.history.snapshot(),
            "panes": buf.getvalue(),
            "gate": {"last": {f"{k[0]}|{k[1]}": list(v) for k, v in s.gate._last.items()},
                     "incidents": {k: list(v) for k, v in s.gate._incidents.items()}},
        }

    def restore(self, key: int, state: dict) -> None:
        """Resume a stream from :meth:`checkpoint` (its partition was assigned to this process)."""
        import io

        s = self.stream(key)
        if state["closed_upto_ms"] >= 0:
            s.engine.closed_upto_ms = state["closed_upto_ms"]
        s.history = SourceHistory.restore(state["history"], s.history.p)
        if state["panes"]:
            s.panes.panes = pane_types(pl.read_ipc(io.BytesIO(state["panes"])))
            s.panes.bound()
        s.gate._last = {tuple(k.split("|", 1)): tuple(v) for k, v in state["gate"].get("last", {}).items()}
        s.gate._incidents = {k: tuple(v) for k, v in state["gate"].get("incidents", {}).items()}

    @property
    def late_records(self) -> int:
        return sum(s.engine.late.records for s in self.streams.values())


def _say_sampled(findings: list, support: pl.DataFrame, confidence: float) -> None:
    """A finding on a window estimated from sFlow packet samples (1 in N, N > 1) says so: its numbers
    are the lower bounds of estimates (:func:`.features.lower_bounds`), from how many samples at which
    rate."""
    by_key = {(int(w), k): (int(r), int(n)) for w, k, r, n in
              support.select("window_start", "src_ip", "sampling_rate", "samples").iter_rows()}
    for f in findings:
        hit = by_key.get((f.window_start_ms, f.src_ip))
        if hit is None:
            continue
        rate, samples = hit
        f.reasons.append(f"estimated from {samples} sFlow packet samples at 1:{rate}: counts are the lower "
                         f"{confidence * 100:g} % bound of the estimate, distinct destinations those the samples saw")
        f.evidence["estimated_from_samples"] = samples
        f.evidence["sampling_rate"] = rate
