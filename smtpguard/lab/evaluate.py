"""``smtpguard eval``: detection quality on labelled traffic, with nothing left out of the score.

Generates labelled scenarios (every abuse kind among a wide benign population, see
:mod:`smtpguard.lab.scenario`), writes each as an AWS VPC flow log and re-exports the same
traffic as NetFlow v9, runs the detectors exactly as ``analyze`` does (through the parsers,
with the scenario's exemptions and inventory), and scores every alert of medium severity or
higher from the first minute of the run:

- an alert is a **true positive** when it names an abusive source (its address, its prefix, or
  its tenant for tenant-level alerts) and its window overlaps the abuse window widened to
  [start - 1 min, end + 15 min); any other medium+ alert is a **false positive**, including one
  on an abuser outside that window;
- **recall** per abuse kind: abusive sources with at least one true positive;
- **precision** over alerts and over flagged sources, and **false-positive sources per hour**
  of traffic (a source with any false-positive alert counts once per run);
- **delay**: from the start of the abuse to the event time at which its first true positive
  was due (the end of its window plus the allowed lateness), independent of batch sizes.

Tuning and judging are kept apart: thresholds are chosen on :data:`TUNING_SEEDS` only and
judged on :data:`EVALUATION_SEEDS`, which the test suite asserts. A threshold is never changed
to pass an evaluation seed.
"""

from __future__ import annotations

import ipaddress
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from smtpguard.core.config import Config
from smtpguard.core.alert import Alert, rank

MEDIUM = rank("medium")
#: scenario seeds the detectors' thresholds were chosen on
TUNING_SEEDS: tuple[int, ...] = (101, 102, 103, 104, 105, 106)
#: seeds that judge them (never used to choose a threshold)
EVALUATION_SEEDS: tuple[int, ...] = (9001, 9002, 9003)
#: an alert up to this long before the abuse starts still counts (the minute it began)
BEFORE_MS = 60_000
#: ... and this long after it ends (the source is still the abuser it was)
AFTER_MS = 15 * 60_000
#: kinds caught within a minute or two (bursts, floods, blocked spam): median delay target
FAST_KINDS = ("spam_burst", "spam_first_minute", "spam_exempted_new", "spam_submission", "flood",
              "blocked_attempts", "tenant_spam", "spam_ipv6_rotating", "spam_ipv6_wide")
FAST_DELAY_S = 90.0
#: kinds that are defined by persistence (judged over 10 and 60 minutes)
SLOW_KINDS = ("low_and_slow", "low_and_slow_blocked", "low_and_slow_in_mail", "volume_spike")
SLOW_DELAY_S = 1800.0
#: what ``run`` writes each scenario as by default (both unsampled)
FORMATS = ("aws-vpc", "netflow-v9")
#: sFlow packet-sampling rates the sampling evaluation exports at (``sflow-N``: 1 packet in N)
SAMPLING_RATES = (64, 256, 1024, 4096)


def sflow_rate(fmt: str) -> int | None:
    """N of an ``sflow-N`` evaluation format (the traffic exported as sFlow sampling 1 in N), else None."""
    head, _, n = fmt.partition("-")
    if head == "sflow" and n.isdigit() and int(n) >= 1:
        return int(n)
    return None


def check_formats(formats: Sequence[str]) -> None:
    """Raise ValueError naming what is not an evaluation format."""
    unknown = [f for f in formats if f not in FORMATS and sflow_rate(f) is None]
    if unknown or not formats:
        raise ValueError(f"unknown eval format(s) {unknown}; known: {', '.join(FORMATS)}, sflow-N "
                         f"(sFlow sampling 1 packet in N, e.g. sflow-256)")


def eval_abuse() -> tuple[str, ...]:
    """The abuse in every evaluation scenario: every kind, and a second flood (one just over its
    threshold, one far over)."""
    from smtpguard.lab import scenario

    return scenario.ABUSE_KINDS + ("flood",)


@dataclass
class KindResult:
    kind: str
    sources: int = 0
    detected: int = 0
    delays_s: list[float] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.detected / self.sources if self.sources else float("nan")


@dataclass
class DetectorResult:
    detector: str
    alerts: int = 0
    true: int = 0

    @property
    def precision(self) -> float:
        return self.true / self.alerts if self.alerts else float("nan")


@dataclass
class EvalResult:
    runs: list[dict[str, Any]] = field(default_factory=list)
    kinds: dict[str, KindResult] = field(default_factory=dict)
    detectors: dict[str, DetectorResult] = field(default_factory=dict)
    alerts: int = 0
    true_alerts: int = 0
    flagged_sources: int = 0
    true_flagged: int = 0
    hours: float = 0.0
    false_positives: list[dict[str, Any]] = field(default_factory=list)
    labelled: list[dict[str, Any]] = field(default_factory=list)
    by_format: dict[str, "EvalResult"] = field(default_factory=dict)
    """the same scores per format (each scenario is generated once and written in every format)"""

    @property
    def precision(self) -> float:
        """Share of flagged sources that were abusive and flagged during their abuse."""
        return self.true_flagged / self.flagged_sources if self.flagged_sources else float("nan")

    @property
    def alert_precision(self) -> float:
        return self.true_alerts / self.alerts if self.alerts else float("nan")

    @property
    def fp_sources(self) -> int:
        return len({(fp["run"], fp["source"]) for fp in self.false_positives})

    @property
    def fp_per_hour(self) -> float:
        return self.fp_sources / self.hours if self.hours else float("nan")

    def delays_of(self, kinds: Sequence[str]) -> list[float]:
        return [d for k in kinds if k in self.kinds for d in self.kinds[k].delays_s]

    def median_delay_s(self, kinds: Sequence[str] | None = None) -> float:
        d = self.delays_of(kinds) if kinds is not None else [x for k in self.kinds.values() for x in k.delays_s]
        return statistics.median(d) if d else float("nan")

    def targets(self) -> dict[str, bool]:
        fast, slow = self.median_delay_s(FAST_KINDS), self.median_delay_s(SLOW_KINDS)
        return {
            "recall 1.0 for every kind": all(k.recall == 1.0 for k in self.kinds.values() if k.sources),
            "no false-positive source": not self.false_positives,
            f"median delay <= {FAST_DELAY_S:.0f} s for bursts, floods and blocked spam": not fast > FAST_DELAY_S,
            f"median delay <= {SLOW_DELAY_S / 60:.0f} min for low-and-slow": not slow > SLOW_DELAY_S,
            "labelled data sets": all(x["ok"] for x in self.labelled),
        }

    def meets_targets(self) -> bool:
        return all(self.targets().values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "recall": {k: {"sources": v.sources, "detected": v.detected, "recall": v.recall,
                           "median_delay_s": statistics.median(v.delays_s) if v.delays_s else None, "missed": v.missed}
                       for k, v in sorted(self.kinds.items())},
            "detectors": {d: {"alerts": v.alerts, "true": v.true, "precision": v.precision}
                          for d, v in sorted(self.detectors.items())},
            "precision": self.precision, "alert_precision": self.alert_precision,
            "flagged_sources": self.flagged_sources, "alerts": self.alerts, "hours": self.hours,
            "false_positive_sources": self.fp_sources, "false_positive_sources_per_hour": self.fp_per_hour,
            "false_positives": self.false_positives,
            "median_delay_s": {"fast": _nan_none(self.median_delay_s(FAST_KINDS)),
                               "slow": _nan_none(self.median_delay_s(SLOW_KINDS))},
            "labelled_datasets": self.labelled, "targets": self.targets(), "meets_targets": self.meets_targets(),
        }


def _nan_none(x: float) -> float | None:
    return None if x != x else x


def medium_up(alerts: Sequence[Alert]) -> list[Alert]:
    """The raised alerts of medium severity or higher (what is scored)."""
    return [a for a in alerts if not a.suppressed and rank(a.severity) >= MEDIUM]


class _Actors:
    """Finds the actors an alert names: by address, by the prefix that holds them, or by tenant."""

    def __init__(self, truth: list[dict[str, Any]]):
        self.by_ip = {t["ip"]: t for t in truth}
        self.by_prefix: dict[str, list[dict]] = {}
        for t in truth:
            if t.get("prefix"):
                self.by_prefix.setdefault(t["prefix"], []).append(t)
        self.by_tenant: dict[str, list[dict]] = {}
        for t in truth:
            self.by_tenant.setdefault(t["tenant"], []).append(t)
        self._v6 = [(ipaddress.ip_network(t["prefix"]), t) for t in truth if t.get("prefix")]

    def of(self, a: Alert) -> list[dict[str, Any]]:
        if a.src_ip is None:  # a tenant-level alert names the tenant's abusive instances, of any kind
            return [t for t in self.by_tenant.get(a.tenant, []) if t["label"] != "benign"]
        if a.src_ip in self.by_ip:
            return [self.by_ip[a.src_ip]]
        if a.src_ip in self.by_prefix:
            return self.by_prefix[a.src_ip]
        if "/" in a.src_ip:  # a prefix key holding an actor's address (another prefix length)
            net = ipaddress.ip_network(a.src_ip, strict=False)
            return [t for n, t in self._v6 if n.version == net.version and n.overlaps(net)]
        return []


def _in_window(a: Alert, t: dict[str, Any]) -> bool:
    lo, hi = t["abuse_start_ms"] - BEFORE_MS, t["abuse_end_ms"] + AFTER_MS
    start = a.window_start_ms
    return start < hi and start + 60_000 > lo


def score_run(result: EvalResult, run: str, truth: list[dict[str, Any]], alerts: Sequence[Alert], hours: float) -> None:
    """Fold one run's medium+ alerts into ``result`` (every alert from the first minute)."""
    actors = _Actors(truth)
    hits: dict[str, list[Alert]] = {}
    flagged: dict[str, bool] = {}
    result.hours += hours
    for a in medium_up(alerts):
        d = result.detectors.setdefault(a.detector, DetectorResult(a.detector))
        d.alerts += 1
        result.alerts += 1
        named = actors.of(a)
        source = a.src_ip if a.src_ip is not None else f"tenant {a.tenant}"
        good = [t for t in named if t["label"] != "benign" and _in_window(a, t)]
        if good:
            d.true += 1
            result.true_alerts += 1
            for t in good:
                hits.setdefault(t["ip"], []).append(a)
            flagged[source] = flagged.get(source, True)
        else:
            flagged[source] = False
            t = named[0] if named else None
            result.false_positives.append({
                "run": run, "source": source, "kind": t["kind"] if t else "unknown",
                "label": t["label"] if t else "unknown", "detector": a.detector, "severity": a.severity,
                "window_start": a.window_start, "reason": a.reasons[0] if a.reasons else ""})
    result.flagged_sources += len(flagged)
    result.true_flagged += sum(flagged.values())
    for t in truth:
        if t["label"] == "benign":
            continue
        k = result.kinds.setdefault(t["label"], KindResult(t["label"]))
        k.sources += 1
        got = hits.get(t["ip"])
        if got:
            k.detected += 1
            first = min(a.evidence.get("emitted_at_ms", a.window_start_ms) for a in got)
            k.delays_s.append(max(0.0, (first - t["abuse_start_ms"]) / 1000))
        else:
            k.missed.append(f"{run} {t['ip']}")


def exported(scen, paths: dict[str, Path], fmt: str, tmp: Path) -> tuple[Path, str]:
    """The file holding ``scen`` as evaluation format ``fmt`` and the input format that reads it:
    flows.log and netflow.pcap as :func:`smtpguard.lab.scenario.write` wrote them, ``sflow-N``
    written now into ``tmp``."""
    from smtpguard.lab import scenario

    rate = sflow_rate(fmt)
    if rate is not None:
        out = tmp / f"{fmt}.pcap"
        scenario.write_sflow(scen, out, rate)
        return out, "sflow-pcap"
    if fmt == "aws-vpc":
        return paths["flows"], "aws-vpc"
    if fmt == "netflow-v9":
        return paths["netflow"], "netflow-pcap"
    raise ValueError(f"unknown eval format {fmt!r}")


def run(cfg: Config, seeds: Sequence[int], *, instances: int = 600, hours: float = 2.0,
        formats: Sequence[str] = FORMATS, late_fraction: float = 0.0, labelled_dirs: Sequence[Path] = (),
        abuse: Sequence[str] | None = None, progress=None, keep_alerts: bool = False) -> EvalResult:
    """Generate, detect and score ``seeds`` in each of ``formats`` (aws-vpc, netflow-v9, sflow-N)."""
    from smtpguard.lab import scenario
    from smtpguard.app.analyze import analyze
    from smtpguard.core.exemptions import Exemptions
    from smtpguard.core.inventory import Inventory

    result = EvalResult()
    check_formats(formats)
    for seed in seeds:
        scen = scenario.generate(seed, instances=instances, duration_s=int(hours * 3600),
                                 abuse=tuple(abuse) if abuse is not None else eval_abuse(), late_fraction=late_fraction)
        truth = scen.truth()
        with tempfile.TemporaryDirectory(prefix="smtpguard-eval-") as tmp:
            paths = scenario.write(scen, Path(tmp), netflow="netflow-v9" in formats)
            ex = Exemptions.from_csv(paths["exemptions"])
            inv = Inventory.from_csv(paths["inventory"])
            for fmt in formats:
                src, parser = exported(scen, paths, fmt, Path(tmp))
                res = analyze(cfg, [str(src)], parser, ex, inventory=inv)
                name = f"{seed}/{fmt}"
                for into in (result, result.by_format.setdefault(fmt, EvalResult())):
                    score_run(into, name, truth, res.alerts, scen.duration_s / 3600)
                entry = {"seed": seed, "format": fmt, "records": res.read, "smtp_records": res.kept, "late": res.late,
                         "alerts": len(medium_up(res.alerts)), "instances": len(scen.actors),
                         "hours": scen.duration_s / 3600}
                if keep_alerts:
                    entry["_alerts"] = res.alerts
                    entry["_truth"] = truth
                result.runs.append(entry)
                result.by_format[fmt].runs.append(entry)
                if progress:
                    progress(name)
    for d in labelled_dirs:
        result.labelled.extend(evaluate_labelled(cfg, Path(d)))
    return result


@dataclass
class SamplingResult:
    """One :class:`EvalResult` per sampling rate (1 = the unsampled flow log) on the same scenarios."""

    rates: dict[int, EvalResult] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        return sorted({k for r in self.rates.values() for k in r.kinds})

    def detectable_up_to(self, kind: str) -> int | None:
        """The highest rate N such that ``kind`` has recall 1.0 at N and at every lower rate evaluated."""
        best = None
        for n in sorted(self.rates):
            k = self.rates[n].kinds.get(kind)
            if k is None or k.recall < 1.0:
                break
            best = n
        return best

    def no_false_positives(self) -> bool:
        return all(not r.false_positives for r in self.rates.values())

    def to_dict(self) -> dict[str, Any]:
        return {"rates": {n: r.to_dict() for n, r in self.rates.items()},
                "detectable_up_to": {k: self.detectable_up_to(k) for k in self.kinds()},
                "no_false_positives": self.no_false_positives()}


def sampling(cfg: Config, seeds: Sequence[int], rates: Sequence[int] = SAMPLING_RATES, *, instances: int = 600,
             hours: float = 2.0, progress=None) -> SamplingResult:
    """The same scenarios detected unsampled (the AWS VPC flow log, rate 1) and exported as sFlow
    sampling 1 packet in each of ``rates``: one :class:`EvalResult` per rate."""
    fmts = {n: "aws-vpc" if n == 1 else f"sflow-{n}" for n in (1, *sorted(r for r in rates if r > 1))}
    res = run(cfg, seeds, instances=instances, hours=hours, formats=tuple(fmts.values()), progress=progress)
    return SamplingResult({n: res.by_format[f] for n, f in fmts.items()})


def _rate(n: int) -> str:
    return "1:1" if n == 1 else f"1:{n:,}"


def sampling_report(res: SamplingResult) -> str:
    """A Markdown table: recall per abuse kind at each rate, the highest rate each kind is still fully
    detected at, false-positive sources, precision and median delay per rate."""
    rates = sorted(res.rates)
    head = "| abuse kind | " + " | ".join(_rate(n) for n in rates) + " | detected up to |"
    lines = [head, "|" + " --- |" * (len(rates) + 2)]
    for k in res.kinds():
        cells = []
        for n in rates:
            kr = res.rates[n].kinds.get(k)
            cells.append(f"{kr.detected}/{kr.sources}" if kr else "-")
        up = res.detectable_up_to(k)
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {_rate(up) if up else 'not at 1:1'} |")
    lines.append("| **false-positive sources** | " + " | ".join(str(res.rates[n].fp_sources) for n in rates) + " | |")
    lines.append("| precision (flagged sources) | " + " | ".join(
        f"{res.rates[n].precision:.3f}" if res.rates[n].flagged_sources else "-" for n in rates) + " | |")
    lines.append("| median delay, fast kinds | " + " | ".join(
        f"{d:.0f} s" if d == d else "-" for d in (res.rates[n].median_delay_s(FAST_KINDS) for n in rates)) + " | |")
    lines.append("| median delay, low-and-slow | " + " | ".join(
        f"{d / 60:.1f} min" if d == d else "-" for d in (res.rates[n].median_delay_s(SLOW_KINDS) for n in rates))
        + " | |")
    fps = [f"  FP at {_rate(n)}: {fp['run']} {fp['source']} ({fp['label']}/{fp['kind']}): {fp['detector']} "
           f"{fp['severity']}: {fp['reason']}" for n in rates for fp in res.rates[n].false_positives]
    return "\n".join(lines + ([""] + fps if fps else []))


def evaluate_labelled(cfg: Config, directory: Path) -> list[dict[str, Any]]:
    """Public labelled flows (Argus binetflow with CTU-13 labels): the hosts whose flows are
    labelled SPAM must be flagged, and nothing else."""
    from smtpguard.app.analyze import analyze
    from smtpguard.ingest.registry import FORMATS as INPUTS

    if "argus" not in INPUTS:
        return [{"dataset": str(directory), "ok": False, "error": "the argus format is not available"}]
    out = []
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        spam_hosts = set()
        with f.open(errors="replace") as fh:
            for line in fh:
                if "SPAM" in line:
                    spam_hosts.add(line.split(",")[3])
        res = analyze(cfg, [str(f)], "argus")
        flagged = {a.src_ip for a in medium_up(res.alerts) if a.src_ip}
        out.append({"dataset": f.name, "spam_hosts": sorted(spam_hosts), "flagged": sorted(flagged),
                    "ok": flagged == spam_hosts})
    return out


def report(result: EvalResult) -> str:
    runs = len(result.runs)
    lines = [f"{runs} runs ({', '.join(sorted({r['format'] for r in result.runs}))}), {result.hours:.1f} hours of "
             f"traffic, scored from the first minute",
             "",
             "abuse kind             sources  detected  recall  median delay"]
    for k, v in sorted(result.kinds.items()):
        med = f"{statistics.median(v.delays_s):.0f} s" if v.delays_s else "-"
        lines.append(f"{k:22} {v.sources:7} {v.detected:9}  {v.recall:6.2f}  {med:>12}")
        for m in v.missed:
            lines.append(f"    missed: {m}")
    lines += ["", "detector              medium+ alerts  true  precision"]
    for d, v in sorted(result.detectors.items()):
        lines.append(f"{d:22} {v.alerts:14} {v.true:5}  {v.precision:9.3f}")
    lines += ["",
              f"precision {result.precision:.3f} over {result.flagged_sources} flagged sources "
              f"({result.alert_precision:.3f} over {result.alerts} alerts); "
              f"false-positive sources {result.fp_sources} ({result.fp_per_hour:.2f} per hour of traffic)",
              f"median delay: {result.median_delay_s(FAST_KINDS):.0f} s for bursts, floods and blocked spam; "
              f"{result.median_delay_s(SLOW_KINDS) / 60:.1f} min for low-and-slow"]
    for fp in result.false_positives:
        lines.append(f"  FP {fp['run']} {fp['source']} ({fp['label']}/{fp['kind']}): {fp['detector']} {fp['severity']} "
                     f"at {fp['window_start']}: {fp['reason']}")
    for d in result.labelled:
        status = "ok" if d["ok"] else "FAILED"
        lines.append(f"labelled {d['dataset']}: {status}; SPAM hosts {d.get('spam_hosts')}, flagged {d.get('flagged')}"
                     + (f" ({d['error']})" if "error" in d else ""))
    for name, ok in result.targets().items():
        lines.append(f"target {name}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)
