"""Detection quality on traffic the thresholds were not chosen on, counted from the first minute.

The evaluation seeds (``smtpguard.lab.evaluate.EVALUATION_SEEDS``) are never used to choose a
threshold; each is a two-hour scenario of 600 instances with every abuse kind among the wide
benign population, detected once as AWS VPC flow logs and once re-exported as NetFlow v9.
"""

from __future__ import annotations

import pytest

from smtpguard.lab import evaluate, scenario


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    from conftest import make_config

    cfg = make_config(tmp_path_factory.mktemp("eval"))
    return evaluate.run(cfg, evaluate.EVALUATION_SEEDS, instances=600, hours=2.0, formats=evaluate.FORMATS)


def test_tuning_and_evaluation_seeds_are_apart():
    assert len(evaluate.EVALUATION_SEEDS) >= 3 and len(evaluate.TUNING_SEEDS) >= 3
    assert not set(evaluate.TUNING_SEEDS) & set(evaluate.EVALUATION_SEEDS)


def test_every_abuse_kind_is_caught_on_every_evaluation_seed_and_format(evaluation):
    res = evaluation
    assert {r["format"] for r in res.runs} == {"aws-vpc", "netflow-v9"} and len(res.runs) == 6
    assert all(r["instances"] >= 500 and r["hours"] >= 2 for r in res.runs)
    assert set(res.kinds) == set(scenario.ABUSE_KINDS)
    for kind, k in res.kinds.items():
        assert k.recall == 1.0, (kind, k.missed, evaluate.report(res))
    assert res.kinds["flood"].sources == 2 * len(res.runs)  # one just over its threshold, one far over


def test_no_benign_source_and_no_abuser_outside_its_window_is_alerted(evaluation):
    res = evaluation
    assert res.false_positives == [], evaluate.report(res)
    assert res.fp_per_hour == 0.0 and res.precision == 1.0 and res.alert_precision == 1.0
    assert res.alerts > 100 and res.hours >= 12


def test_alerts_come_fast_for_bursts_and_within_half_an_hour_for_low_and_slow(evaluation):
    res = evaluation
    assert res.median_delay_s(evaluate.FAST_KINDS) <= evaluate.FAST_DELAY_S, evaluate.report(res)
    assert res.median_delay_s(evaluate.SLOW_KINDS) <= evaluate.SLOW_DELAY_S, evaluate.report(res)
    assert res.meets_targets()
    text = evaluate.report(res)
    assert "false-positive sources 0 (0.00 per hour of traffic)" in text and "NOT met" not in text


def test_labelled_ctu13_spam_host_flagged_and_negative_control_silent(offline_cfg, shared_data):
    """Public labelled flows: the host whose flows are labelled SPAM, and nothing else."""
    results = evaluate.evaluate_labelled(offline_cfg, shared_data / "labelled-flows" / "ctu13-scenario6-capture20110816")
    by_name = {r["dataset"]: r for r in results}
    spam = by_name["capture20110816.binetflow.slice_13_1"]
    assert spam["spam_hosts"] == ["147.32.84.165"] and spam["flagged"] == ["147.32.84.165"]
    idle = by_name["capture20110816.binetflow.slice_1_2"]
    assert idle["flagged"] == [] and all(r["ok"] for r in results)
