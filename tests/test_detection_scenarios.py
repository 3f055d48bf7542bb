"""Golden behaviour on generated two-hour scenarios: every injected abuser is flagged at
medium or higher, and no benign source is."""

from __future__ import annotations

import pytest

from smtpguard import scenario
from smtpguard.analyze import analyze
from smtpguard.exemptions import Exemptions

MEDIUM_UP = ("medium", "high", "critical")


@pytest.mark.parametrize("seed", [31, 47])
def test_two_hour_scenario_flags_every_abuser_and_no_benign_source(tmp_path, offline_cfg, seed):
    scen = scenario.generate(seed, instances=300, duration_s=7200)
    paths = scenario.write(scen, tmp_path)
    res = analyze(offline_cfg, [str(paths["flows"])], "aws-vpc", Exemptions.from_csv(paths["exemptions"]))
    assert res.rejects == 0 and res.late == 0
    flagged: dict[str, set[str]] = {}
    for a in res.raised():
        if a.severity in MEDIUM_UP:
            flagged.setdefault(a.src_ip, set()).add(a.detector)
    abusers = {a.ip: a.label for a in scen.abusive}
    assert set(flagged) == set(abusers), {ip: d for ip, d in flagged.items() if ip not in abusers}
    expected = {"spam_burst": "spam_fanout", "spam_exempted_new": "spam_fanout", "flood": "connection_flood",
                "blocked_attempts": "blocked_attempts"}
    for ip, label in abusers.items():
        assert expected[label] in flagged[ip], (ip, label, flagged[ip])


def test_eval_meets_the_targets_on_every_abuse_kind(offline_cfg):
    """Every abuse kind, the hard benign cases and a warm-up, through the eval scorer."""
    from smtpguard import evaluate

    res = evaluate.run(offline_cfg, [59], instances=300, hours=2.0, warmup_min=60)
    assert set(res.kinds) == set(scenario.ABUSE_KINDS)
    assert all(k.recall == 1.0 for k in res.kinds.values()), evaluate.report(res)
    assert res.false_positives == [], evaluate.report(res)
    assert res.median_delay_s() < 180 and res.meets_targets()


def test_labelled_ctu13_spam_host_flagged_and_negative_control_silent(offline_cfg, shared_data):
    """Public labelled flows: the host whose flows are labelled SPAM, and nothing else."""
    from smtpguard.evaluate import evaluate_labelled

    results = evaluate_labelled(offline_cfg, shared_data / "labelled-flows" / "ctu13-scenario6-capture20110816")
    by_name = {r["dataset"]: r for r in results}
    spam = by_name["capture20110816.binetflow.slice_13_1"]
    assert spam["spam_hosts"] == ["147.32.84.165"] and spam["flagged"] == ["147.32.84.165"]
    idle = by_name["capture20110816.binetflow.slice_1_2"]
    assert idle["flagged"] == [] and all(r["ok"] for r in results)
