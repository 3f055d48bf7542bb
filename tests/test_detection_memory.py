"""Source history, horizons, tenant windows, the anomaly model and the evaluation scorer."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from smtpguard.detectors.history import SourceHistory, HistoryParams
from smtpguard.detectors.pipeline import Pipeline
from smtpguard.detectors.tenants import hll_estimate, hll_partials, relative_error
from smtpguard.errors import ConfigError
from smtpguard.evaluate import EvalResult, score_scenario

from test_detection_unit import T0, flows, table


def _alerts(pipe, rows):
    out = pipe.process(table(rows))
    out.extend(pipe.flush())
    return out


def test_history_learns_familiar_destinations_and_rates(offline_cfg):
    pipe = Pipeline(offline_cfg)
    # minute 0: 10 destinations; minute 1: the same 10 again plus 5 new ones
    rows = flows("10.0.0.1", 10, minute=0, dsts=10) + flows("10.0.0.1", 15, minute=1, dsts=15)
    out = _alerts(pipe, rows)
    f = out.features.sort("window_start")
    assert f["new_dst"].to_list() == [10, 5]
    assert f["history_minutes"].to_list() == [0, 1]
    assert f["base_conns"].to_list()[1] == 10.0
    assert f["conns_10m"].to_list() == [10, 25] and f["active_minutes_60m"].to_list() == [1, 2]


def test_history_snapshot_restores_and_eviction_is_bounded():
    h = SourceHistory(HistoryParams(max_sources=100))
    ips = [f"10.1.0.{i}" for i in range(100)]
    h.slots(ips)
    h.ewma_conns[h.slots(["10.1.0.5"])] = 42.0
    back = SourceHistory.restore(h.snapshot())
    assert len(back) == 100 and back.ewma_conns[back.index["10.1.0.5"]] == 42.0
    h.slots([f"10.2.0.{i}" for i in range(30)])
    assert len(h) <= 100 and h.evicted >= 30


def test_hll_estimates_distinct_destinations():
    n = 3000
    rows = pl.DataFrame({"tenant": ["t"] * n, "window_start": [0] * n, "dst_ip": [f"203.0.{i // 250}.{i % 250}" for i in range(n)]})
    est = hll_estimate(hll_partials(rows))["distinct_dst25"][0]
    assert abs(est - n) / n < 4 * relative_error()
    small = hll_estimate(hll_partials(rows.head(40)))["distinct_dst25"][0]
    assert 34 <= small <= 46


def test_tenant_spam_from_several_moderate_instances(offline_cfg):
    pipe = Pipeline(offline_cfg)
    rows = []
    for k in range(5):  # each instance: 12 distinct servers, below the per-source fan-out threshold
        for r in flows(f"10.5.0.{k}", 12, dsts=12, action="reject", nbytes=60, packets=1):
            r["dst_ip"] = f"198.{18 + k}.{r['src_port'] % 12}.9"
            rows.append(r)
    alerts = [a for a in _alerts(pipe, rows).alerts if not a.suppressed]
    tenant = [a for a in alerts if a.detector == "tenant_spam"]
    assert len(tenant) == 1 and tenant[0].src_ip is None and tenant[0].tenant == "111122223333"
    assert "5 instances" in tenant[0].reasons[0]
    assert not [a for a in alerts if a.detector == "spam_fanout"]


def test_volume_spike_needs_history(offline_cfg):
    pipe = Pipeline(offline_cfg)
    rows = []
    for m in range(35):
        rows += flows("10.0.0.3", 4, minute=m, dsts=2, port=587)
    rows += flows("10.0.0.3", 80, minute=36, dsts=40, port=587)
    alerts = [a for a in _alerts(pipe, rows).alerts if not a.suppressed and a.detector == "volume_spike"]
    assert len(alerts) == 1 and alerts[0].window_start.endswith("12:36:00Z")
    assert "20.0 times the usual 4.0 per active minute" in alerts[0].reasons[0]
    fresh = Pipeline(offline_cfg)
    assert [a for a in _alerts(fresh, flows("10.0.0.3", 80, minute=36, dsts=40, port=587)).alerts
            if a.detector == "volume_spike"] == []
    # the same spike concentrated on one server is a retrying application, not mail
    retry = Pipeline(offline_cfg)
    rows_retry = [r for m in range(35) for r in flows("10.0.0.3", 4, minute=m, dsts=2, port=587)]
    rows_retry += flows("10.0.0.3", 80, minute=36, dsts=1, port=587)
    assert not [a for a in _alerts(retry, rows_retry).alerts if a.detector == "volume_spike"]


def test_anomaly_model_round_trip_and_refusals(tmp_path, offline_cfg):
    from smtpguard.models import anomaly

    rng = np.random.default_rng(0)
    n = 400
    normal = pl.DataFrame({
        "connections": rng.integers(2, 30, n), "distinct_dst": rng.integers(1, 10, n), "distinct_dst24": rng.integers(1, 8, n),
        "bytes_per_conn": rng.uniform(3000, 9000, n), "packets_per_conn": rng.uniform(8, 20, n),
        "rejected": np.zeros(n, dtype=int), "low_byte_conns": np.zeros(n, dtype=int), "top_dst_share": rng.uniform(0.1, 0.6, n),
        "new_dst_share": rng.uniform(0, 0.3, n), "port25": rng.integers(2, 30, n), "mean_duration_ms": rng.uniform(1000, 5000, n),
    })
    model = anomaly.train(normal, window=("2026-01-01", "2026-01-02"))
    d = anomaly.save(model, tmp_path / "m")
    back = anomaly.load(d)
    odd = normal.head(1).with_columns(connections=pl.lit(3000), distinct_dst=pl.lit(900), low_byte_conns=pl.lit(2900),
                                      bytes_per_conn=pl.lit(60.0), new_dst_share=pl.lit(1.0))
    assert back.score(odd)[0] > np.percentile(back.score(normal), 99)
    assert np.allclose(back.score(normal.head(20)), model.score(normal.head(20)))
    # a changed artifact or a different feature list is refused
    card = json.loads((d / "card.json").read_text())
    card["features"] = card["features"][:-1]
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="features"):
        anomaly.load(d)
    anomaly.save(model, d)
    (d / "model.skops").write_bytes((d / "model.skops").read_bytes() + b"x")
    with pytest.raises(ConfigError, match="SHA-256"):
        anomaly.load(d)


def test_eval_scoring_counts_recall_precision_delay_and_false_positives():
    start = int(T0.timestamp() * 1000)
    truth = [
        {"ip": "10.0.0.1", "tenant": "a", "kind": "x", "label": "spam_burst", "abuse_start_ms": start, "abuse_end_ms": start + 600_000},
        {"ip": "10.0.0.2", "tenant": "a", "kind": "x", "label": "flood", "abuse_start_ms": start, "abuse_end_ms": start + 600_000},
        {"ip": "10.0.0.3", "tenant": "b", "kind": "mail_server", "label": "benign", "abuse_start_ms": None, "abuse_end_ms": None},
    ]
    from smtpguard.detectors.alerts import Alert, iso

    def alert(ip, minute, sev="high"):
        ws = start + minute * 60_000
        return Alert(alert_id=f"{ip}{minute}", detector="d", severity=sev, score=0.8, src_ip=ip, tenant="a",
                     window_start=iso(ws), window_end=iso(ws + 60_000), reasons=["r"],
                     evidence={"emitted_at_ms": ws + 120_000})

    res = EvalResult()
    score_scenario(res, truth, [alert("10.0.0.1", 0), alert("10.0.0.3", 5), alert("10.0.0.2", 30, "low")])
    assert res.kinds["spam_burst"].recall == 1.0 and res.kinds["flood"].recall == 0.0
    assert res.kinds["spam_burst"].delays_s == [120.0]
    assert res.precision == 0.5 and [fp["ip"] for fp in res.false_positives] == ["10.0.0.3"]
    assert not res.meets_targets()
