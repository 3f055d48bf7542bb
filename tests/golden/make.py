"""Write the detector core's golden output: window features, tenant features and medium-or-higher
alerts of `analyze` over the scenarios in :data:`CASES`.

The golden files pin what the detector core computes, so a rewrite for speed (different group-bys,
integer keys, other data structures) must reproduce them exactly: ``tests/test_core_equivalence.py``
compares. Regenerate them only for a change that is meant to alter detection, and say so in the
commit and in docs/DETECTION.md:

    .venv/bin/python tests/golden/make.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent

#: (seed, instances, minutes, abuse kinds): tuning-side seeds, never the evaluation seeds
CASES = (
    (201, 120, 110, "all"),
    (202, 90, 70, ("spam_ipv6_rotating", "spam_ipv6_wide", "tenant_spam", "spam_exempted_new", "flood")),
    (203, 200, 65, ("spam_first_minute", "blocked_attempts", "spam_burst", "low_and_slow")),
)


def run_case(seed: int, instances: int, minutes: int, abuse, workdir: Path):
    """Features (source and tenant) and medium-or-higher alerts of ``analyze`` over one scenario."""
    from smtpguard.app.analyze import analyze, contract_json
    from smtpguard.core import config
    from smtpguard.core.exemptions import Exemptions
    from smtpguard.core.inventory import Inventory
    from smtpguard.lab import scenario

    kinds = scenario.ABUSE_KINDS if abuse == "all" else tuple(abuse)
    paths = scenario.write(scenario.generate(seed, instances=instances, duration_s=minutes * 60, abuse=kinds), workdir)
    cfg = config.load(environ={})
    res = analyze(cfg, [str(paths["flows"])], "aws-vpc", Exemptions.from_csv(paths["exemptions"]),
                  keep_features=True, inventory=Inventory.from_csv(paths["inventory"]))
    feats = pl.concat(res.features).sort(["window_start", "src_ip"]) if res.features else pl.DataFrame()
    tenants = (pl.concat(res.tenant_features).sort(["window_start", "tenant"]) if res.tenant_features
               else pl.DataFrame())
    alerts = sorted((contract_json(a) for a in res.raised() if a.severity in ("medium", "high", "critical")),
                    key=lambda a: a["alert_id"])
    return feats, tenants, alerts


def case_name(seed: int) -> str:
    return f"core-{seed}"


def main() -> None:
    for seed, instances, minutes, abuse in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            feats, tenants, alerts = run_case(seed, instances, minutes, abuse, Path(tmp))
        name = case_name(seed)
        feats.write_parquet(HERE / f"{name}-features.parquet", compression="zstd")
        tenants.write_parquet(HERE / f"{name}-tenants.parquet", compression="zstd")
        (HERE / f"{name}-alerts.json").write_text(json.dumps(alerts, indent=1, sort_keys=True, default=str) + "\n")
        print(f"{name}: {feats.height} feature rows, {tenants.height} tenant rows, {len(alerts)} alerts", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    main()
