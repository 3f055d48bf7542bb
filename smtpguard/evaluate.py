"""``smtpguard eval``: detection quality on labelled traffic.

Generates labelled scenarios (every abuse kind, plus hard benign cases), runs the detectors
exactly as ``analyze`` does (through the flow-log parser), and measures, counting only
alerts of medium severity or higher:

- recall per abuse kind: abusive sources with an alert whose window overlaps their abuse
  (tenant-level alerts count for every instance of the tenant);
- precision over flagged sources, and the benign sources flagged, with their kind;
- detection delay: from the start of the abuse to the event time at which the first alert
  was emitted (the watermark when its window closed), so it includes the allowed lateness.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from smtpguard.config import Config
from smtpguard.detectors.alerts import Alert, rank

MEDIUM = rank("medium")


@dataclass
class KindResult:
    kind: str
    sources: int = 0
    detected: int = 0
    delays_s: list[float] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.detected / self.sources if self.sources else float("nan")


@dataclass
class EvalResult:
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    kinds: dict[str, KindResult] = field(default_factory=dict)
    flagged_sources: int = 0
    true_flagged: int = 0
    false_positives: list[dict[str, Any]] = field(default_factory=list)
    labelled: list[dict[str, Any]] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.true_flagged / self.flagged_sources if self.flagged_sources else float("nan")

    @property
    def delays_s(self) -> list[float]:
        return [d for k in self.kinds.values() for d in k.delays_s]

    def median_delay_s(self) -> float:
        d = self.delays_s
        return statistics.median(d) if d else float("nan")

    def meets_targets(self, min_recall: float = 0.95, max_delay_s: float = 180.0) -> bool:
        return (all(k.recall >= min_recall for k in self.kinds.values() if k.sources)
                and not self.false_positives and self.median_delay_s() < max_delay_s
                and all(x["ok"] for x in self.labelled))

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenarios": self.scenarios,
            "recall": {k: {"sources": v.sources, "detected": v.detected, "recall": v.recall,
                           "median_delay_s": statistics.median(v.delays_s) if v.delays_s else None}
                       for k, v in sorted(self.kinds.items())},
            "precision": self.precision, "flagged_sources": self.flagged_sources,
            "false_positives": self.false_positives, "median_delay_s": self.median_delay_s(),
            "labelled_datasets": self.labelled, "meets_targets": self.meets_targets(),
        }


def _medium(alerts: Sequence[Alert]) -> list[Alert]:
    return [a for a in alerts if not a.suppressed and rank(a.severity) >= MEDIUM]


def score_scenario(result: EvalResult, truth: list[dict[str, Any]], alerts: Sequence[Alert], *,
                   grace_ms: int = 120_000, scored_from_ms: int | None = None) -> None:
    """Fold one scenario's alerts into ``result``."""
    alerts = _medium(alerts)
    if scored_from_ms is not None:
        alerts = [a for a in alerts if a.window_start_ms >= scored_from_ms]
    by_ip: dict[str, list[Alert]] = {}
    by_tenant: dict[str, list[Alert]] = {}
    for a in alerts:
        if a.src_ip is None:
            by_tenant.setdefault(a.tenant, []).append(a)
        else:
            by_ip.setdefault(a.src_ip, []).append(a)
    actors = {t["ip"]: t for t in truth}
    for t in truth:
        if t["label"] == "benign":
            continue
        k = result.kinds.setdefault(t["label"], KindResult(t["label"]))
        k.sources += 1
        lo, hi = t["abuse_start_ms"], t["abuse_end_ms"] + grace_ms
        hits = [a for a in by_ip.get(t["ip"], []) + by_tenant.get(t["tenant"], [])
                if a.window_start_ms < hi and a.window_start_ms + 60_000 > lo]
        if hits:
            k.detected += 1
            first = min(hits, key=lambda a: a.evidence.get("emitted_at_ms", a.window_start_ms))
            k.delays_s.append(max(0.0, (first.evidence.get("emitted_at_ms", first.window_start_ms) - lo) / 1000))
    for ip, group in by_ip.items():
        result.flagged_sources += 1
        t = actors.get(ip)
        if t is not None and t["label"] != "benign":
            result.true_flagged += 1
        else:
            worst = max(group, key=lambda a: rank(a.severity))
            result.false_positives.append({"ip": ip, "kind": t["kind"] if t else "unknown",
                                           "detector": worst.detector, "severity": worst.severity,
                                           "reason": worst.reasons[0]})
    abusive_tenants = {t["tenant"] for t in truth if t["label"] == "tenant_spam"}
    for tenant, group in by_tenant.items():
        result.flagged_sources += 1
        if tenant in abusive_tenants:
            result.true_flagged += 1
        else:
            result.false_positives.append({"tenant": tenant, "kind": "tenant", "detector": group[0].detector,
                                           "severity": group[0].severity, "reason": group[0].reasons[0]})


def run(cfg: Config, seeds: Sequence[int], *, instances: int = 300, hours: float = 2.0, warmup_min: int = 60,
        late_fraction: float = 0.0, labelled_dirs: Sequence[Path] = (), progress=None) -> EvalResult:
    from smtpguard import scenario
    from smtpguard.analyze import analyze
    from smtpguard.exemptions import Exemptions

    result = EvalResult()
    kinds = tuple(k for k in scenario.ABUSE_KINDS)
    for seed in seeds:
        kwargs: dict[str, Any] = dict(instances=instances, duration_s=int(hours * 3600) + warmup_min * 60, abuse=kinds)
        extra = _optional_kwargs(scenario.generate, warmup_s=warmup_min * 60, late_fraction=late_fraction,
                                 benign_extras=True)
        scen = scenario.generate(seed, **kwargs, **extra)
        with tempfile.TemporaryDirectory(prefix="smtpguard-eval-") as tmp:
            paths = scenario.write(scen, Path(tmp))
            res = analyze(cfg, [str(paths["flows"])], "aws-vpc", Exemptions.from_csv(paths["exemptions"]))
        truth = scen.truth()
        score_scenario(result, truth, res.alerts, scored_from_ms=scen.start_ms + warmup_min * 60_000 if "warmup_s" in extra else None)
        result.scenarios.append({"seed": seed, "lines": res.read, "smtp_records": res.kept, "late": res.late,
                                 "alerts": len(_medium(res.alerts))})
        if progress:
            progress(seed)
    for d in labelled_dirs:
        result.labelled.extend(evaluate_labelled(cfg, Path(d)))
    return result


def _optional_kwargs(fn, **kwargs: Any) -> dict[str, Any]:
    """Only the keyword arguments ``fn`` accepts (older generators lack some options)."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def evaluate_labelled(cfg: Config, directory: Path) -> list[dict[str, Any]]:
    """Public labelled flows (Argus binetflow with CTU-13 labels): the hosts whose flows are
    labelled SPAM must be flagged, and nothing else."""
    from smtpguard.analyze import analyze
    from smtpguard.ingest.registry import FORMATS

    if "argus" not in FORMATS:
        return [{"dataset": str(directory), "ok": False, "error": "the argus format is not available"}]
    out = []
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        spam_hosts = set()
        with f.open(errors="replace") as fh:
            for line in fh:
                if "SPAM" in line:
                    spam_hosts.add(line.split(",")[3])
        res = analyze(cfg, [str(f)], "argus")
        flagged = {a.src_ip for a in _medium(res.alerts) if a.src_ip}
        out.append({"dataset": f.name, "spam_hosts": sorted(spam_hosts), "flagged": sorted(flagged),
                    "ok": flagged == spam_hosts})
    return out


def report(result: EvalResult) -> str:
    lines = ["abuse kind            sources  detected  recall  median delay"]
    for k, v in sorted(result.kinds.items()):
        med = f"{statistics.median(v.delays_s):.0f} s" if v.delays_s else "-"
        lines.append(f"{k:20} {v.sources:8} {v.detected:9}  {v.recall:6.2f}  {med:>12}")
    lines.append(f"precision {result.precision:.3f} over {result.flagged_sources} flagged sources; "
                 f"median detection delay {result.median_delay_s():.0f} s")
    lines.append(f"benign sources flagged medium or higher: {len(result.false_positives)}")
    for fp in result.false_positives:
        lines.append(f"  {fp.get('ip') or 'tenant ' + fp.get('tenant', '')} ({fp['kind']}): {fp['detector']} "
                     f"{fp['severity']}: {fp['reason']}")
    for d in result.labelled:
        status = "ok" if d["ok"] else "FAILED"
        lines.append(f"labelled {d['dataset']}: {status}; SPAM hosts {d.get('spam_hosts')}, flagged {d.get('flagged')}"
                     + (f" ({d['error']})" if "error" in d else ""))
    lines.append("targets (recall >= 0.95 per kind, no benign medium+, median delay < 180 s): "
                 + ("met" if result.meets_targets() else "NOT met"))
    return "\n".join(lines)
