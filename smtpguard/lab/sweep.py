"""``smtpguard eval --sweep``: each detector's main parameter over a range, so defaults are a visible choice.

The scenarios are generated and analyzed once (with the default parameters), keeping the
window features (history, horizons and exemptions included) and the tenant windows. Each
detector is then evaluated again over those features for every value of its main parameter,
through an alert gate of its own (the same cooldown), and scored as ``smtpguard eval`` scores:
medium-or-higher alerts, from the first minute, against the abuse windows.

- **recall**: abusive sources of the kinds the detector is for (:data:`TARGETS`) that it flags
  inside their abuse window;
- **precision**: the detector's medium+ alerts that name an abuser inside its abuse window.

Writes ``DIR/<detector>.png`` (precision and recall against the parameter, the default
marked) and ``DIR/README.md`` (the tables). Plots need matplotlib (``pip install
'smtpguard[notebooks]'``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec
import polars as pl

from smtpguard.core.config import Config
from smtpguard.detectors.alerts import AlertGate
from smtpguard.detectors.rules import REGISTRY
from smtpguard.core.errors import ConfigError
from smtpguard.lab.evaluate import _Actors, exported, _in_window, eval_abuse, medium_up

#: detector -> (parameter, values)
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "spam_fanout": ("min_distinct_dst", (5, 10, 15, 20, 30, 40, 60, 80, 120)),
    "connection_flood": ("min_conns_top3", (50, 100, 200, 300, 400, 600, 900, 1500)),
    "blocked_attempts": ("min_servers", (2, 3, 4, 5, 6, 8, 10, 15)),
    "volume_spike": ("sustain_minutes", (2, 3, 4, 5, 6, 7, 8, 9, 10)),
    "low_and_slow": ("min_elevated_minutes_60m", (3, 5, 8, 10, 12, 15, 20, 25, 30)),
    "tenant_spam": ("min_distinct_dst", (10, 20, 30, 40, 60, 80, 120, 160)),
}
#: the abuse kinds each detector is for (its recall is counted over these)
TARGETS: dict[str, tuple[str, ...]] = {
    "spam_fanout": ("spam_burst", "spam_first_minute", "spam_exempted_new", "spam_submission", "spam_ipv6_rotating",
                    "spam_ipv6_wide"),
    "connection_flood": ("flood",),
    "blocked_attempts": ("blocked_attempts", "low_and_slow_blocked"),
    "volume_spike": ("volume_spike",),
    "low_and_slow": ("low_and_slow", "low_and_slow_in_mail"),
    "tenant_spam": ("tenant_spam",),
}


def _score(detector: str, runs: list[dict[str, Any]], findings_of: Callable[[dict[str, Any]], list]) -> dict[str, Any]:
    alerts = true = targets = hit = 0
    for run in runs:
        gate = AlertGate(run["cooldown_ms"])
        raised = medium_up(gate.admit(findings_of(run)))
        actors = run["actors"]
        caught: set[str] = set()
        for a in raised:
            alerts += 1
            good = [t for t in actors.of(a) if t["label"] != "benign" and _in_window(a, t)]
            if good:
                true += 1
                caught.update(t["ip"] for t in good if t["label"] in TARGETS[detector])
        mine = [t for t in run["truth"] if t["label"] in TARGETS[detector]]
        targets += len(mine)
        hit += len(caught & {t["ip"] for t in mine})
    return {"alerts": alerts, "true": true, "precision": true / alerts if alerts else None,
            "targets": targets, "detected": hit, "recall": hit / targets if targets else None,
            "false_positives": alerts - true}


def run(cfg: Config, seeds: Sequence[int], out_dir: Path, *, instances: int = 600, hours: float = 2.0,
        formats: Sequence[str] = ("aws-vpc",), progress=None) -> dict[str, list[dict[str, Any]]]:
    from smtpguard.lab import scenario
    from smtpguard.app.analyze import analyze
    from smtpguard.core.exemptions import Exemptions
    from smtpguard.core.inventory import Inventory

    runs: list[dict[str, Any]] = []
    for seed in seeds:
        scen = scenario.generate(seed, instances=instances, duration_s=int(hours * 3600), abuse=eval_abuse())
        truth = scen.truth()
        with tempfile.TemporaryDirectory(prefix="smtpguard-sweep-") as tmp:
            paths = scenario.write(scen, Path(tmp), netflow="netflow-v9" in formats)
            ex, inv = Exemptions.from_csv(paths["exemptions"]), Inventory.from_csv(paths["inventory"])
            for fmt in formats:
                try:
                    src, parser = exported(scen, paths, fmt, Path(tmp))
                except ValueError as e:
                    raise ConfigError(str(e)) from None
                res = analyze(cfg, [str(src)], parser, ex, keep_features=True, inventory=inv)
                feats = pl.concat(res.features, how="diagonal_relaxed") if res.features else pl.DataFrame()
                tfeats = pl.concat(res.tenant_features, how="diagonal_relaxed") if res.tenant_features else pl.DataFrame()
                runs.append({"name": f"{seed}/{fmt}", "truth": truth, "actors": _Actors(truth), "features": feats,
                             "tenant_features": tfeats, "cooldown_ms": cfg.detect.cooldown_ms})
                if progress:
                    progress(f"{seed}/{fmt}")
    tables: dict[str, list[dict[str, Any]]] = {}
    for name, (param, values) in SWEEPS.items():
        cls = REGISTRY[name]
        base = msgspec.convert(cfg.detect.detectors.get(name, {}), cls.Params, strict=False)
        rows = []
        for v in values:
            det = cls(msgspec.structs.replace(base, **{param: type(getattr(base, param))(v)}))
            key = "tenant_features" if det.scope == "tenant" else "features"
            row = _score(name, runs, lambda r: det.evaluate(r[key]) if r[key].height else [])
            row.update({"value": v, "default": v == getattr(base, param)})
            rows.append(row)
        tables[name] = rows
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(tables, out_dir, [r["name"] for r in runs], hours, instances)
    return tables


def _write(tables: dict[str, list[dict[str, Any]]], out_dir: Path, runs: list[str], hours: float,
           instances: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the test extras install it
        raise ConfigError("eval --sweep draws its plots with matplotlib: pip install 'smtpguard[notebooks]'") from None
    lines = ["# Parameter sweeps", "",
             f"Each detector's main parameter over a range, on {len(runs)} runs ({', '.join(runs)}; {instances} instances, "
             f"{hours:g} hours each), scored from the first minute like `smtpguard eval`: recall over the abuse kinds "
             "the detector is for, precision over its medium-or-higher alerts. The default is in bold. "
             "Made by `smtpguard eval --seeds tuning --sweep docs/sweep` (tuning seeds only).", ""]
    for name, rows in tables.items():
        param = SWEEPS[name][0]
        lines += [f"## `{name}.{param}`", "", f"![{name}]({name}.png)", "",
                  f"| {param} | alerts | false positives | precision | recall ({', '.join(TARGETS[name])}) |",
                  "| --- | --- | --- | --- | --- |"]
        for r in rows:
            v = f"**{r['value']:g}**" if r["default"] else f"{r['value']:g}"
            prec = "-" if r["precision"] is None else f"{r['precision']:.3f}"
            rec = "-" if r["recall"] is None else f"{r['recall']:.2f} ({r['detected']}/{r['targets']})"
            lines.append(f"| {v} | {r['alerts']} | {r['false_positives']} | {prec} | {rec} |")
        lines.append("")
        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
        xs = [r["value"] for r in rows]
        ax.plot(xs, [r["precision"] if r["precision"] is not None else float("nan") for r in rows], "o-",
                label="precision")
        ax.plot(xs, [r["recall"] if r["recall"] is not None else float("nan") for r in rows], "s-", label="recall")
        default = [r["value"] for r in rows if r["default"]]
        if default:
            ax.axvline(default[0], color="grey", linestyle="--", linewidth=1, label="default")
        ax.set_xlabel(param)
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
    (out_dir / "README.md").write_text("\n".join(lines))


def report(tables: dict[str, list[dict[str, Any]]], out_dir: Path) -> str:
    out = []
    for name, rows in tables.items():
        param = SWEEPS[name][0]
        cells = ", ".join(f"{r['value']:g}{'*' if r['default'] else ''}: P "
                          f"{'-' if r['precision'] is None else format(r['precision'], '.2f')} R "
                          f"{'-' if r['recall'] is None else format(r['recall'], '.2f')}" for r in rows)
        out.append(f"{name}.{param}: {cells}")
    out.append(f"tables and plots in {out_dir}/README.md")
    return "\n".join(out)
