"""Source history, horizons, tenant windows, the anomaly model and the evaluation scorer."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import polars as pl
import pytest

from smtpguard.detectors.history import SourceHistory, HistoryParams
from smtpguard.detectors.pipeline import Pipeline
from smtpguard.detectors.tenants import dst_hash, hll_estimate, hll_partials, relative_error
from smtpguard.core.errors import ConfigError
from smtpguard.lab.evaluate import EvalResult, score_run

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
    dsts = pl.Series([f"203.0.{i // 250}.{i % 250}" for i in range(n)])
    rows = pl.DataFrame({"tenant": ["t"] * n, "window_start": [0] * n, "dst_hash": dst_hash(dsts)})
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
    """A spike against the source's own rate needs a learned history (detect.learning_minutes, 60)."""
    def spike_after(minutes: int) -> list:
        pipe = Pipeline(offline_cfg)
        rows = []
        for m in range(minutes):
            rows += flows("10.0.0.3", 4, minute=m, dsts=2, port=587)
        rows += flows("10.0.0.3", 80, minute=minutes + 1, dsts=40, port=587)
        return [a for a in _alerts(pipe, rows).alerts if not a.suppressed and a.detector == "volume_spike"]

    assert spike_after(35) == []
    alerts = spike_after(65)
    assert len(alerts) == 1 and alerts[0].window_start.endswith("13:06:00Z")
    assert "20.0 times the usual 4.0 per active minute" in alerts[0].reasons[0]
    assert any(r.startswith("history: seen for 66 minutes") for r in alerts[0].reasons)
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


def test_eval_scoring_counts_every_alert_from_the_first_minute():
    """Hits inside [start - 1 min, end + 15 min); an abuser's alert outside it, a benign source's
    and an unknown source's are false positives; low alerts are not scored; prefix and tenant
    alerts name their actors."""
    start = int(T0.timestamp() * 1000)
    end = start + 600_000
    truth = [
        {"ip": "10.0.0.1", "tenant": "a", "kind": "x", "label": "spam_burst", "abuse_start_ms": start, "abuse_end_ms": end},
        {"ip": "10.0.0.2", "tenant": "a", "kind": "x", "label": "flood", "abuse_start_ms": start, "abuse_end_ms": end},
        {"ip": "10.0.0.3", "tenant": "b", "kind": "mail_server", "label": "benign", "abuse_start_ms": None,
         "abuse_end_ms": None},
        {"ip": "2001:db8:0:1::5", "prefix": "2001:db8:0:1::/64", "tenant": "c", "kind": "web",
         "label": "spam_ipv6_rotating", "abuse_start_ms": start, "abuse_end_ms": end},
        {"ip": "10.0.0.7", "tenant": "t", "kind": "web", "label": "tenant_spam", "abuse_start_ms": start,
         "abuse_end_ms": end},
    ]
    from smtpguard.core.alert import Alert, iso

    def alert(ip, minute, sev="high", tenant="a"):
        ws = start + minute * 60_000
        return Alert(alert_id=f"{ip}{minute}", detector="d", severity=sev, score=0.8, src_ip=ip, tenant=tenant,
                     window_start=iso(ws), window_end=iso(ws + 60_000), reasons=["r"],
                     evidence={"emitted_at_ms": ws + 90_000})

    res = EvalResult()
    score_run(res, "r1", truth, [
        alert("10.0.0.1", 0), alert("10.0.0.1", 24),         # a hit; 24 min is inside end + 15 min
        alert("10.0.0.1", 26),                                # after end + 15 min: a false positive
        alert("10.0.0.1", -3),                                # before start - 1 min: a false positive
        alert("10.0.0.3", 5), alert("10.9.9.9", 5),           # benign and unknown sources
        alert("10.0.0.2", 3, "low"),                          # low: not scored, the flood is missed
        alert("2001:db8:0:1::/64", 2),                        # the prefix names the rotating sender
        alert(None, 4, tenant="t"),                           # a tenant alert names its instances
    ], hours=2.0)
    assert res.kinds["spam_burst"].recall == 1.0 and res.kinds["flood"].recall == 0.0
    assert res.kinds["spam_ipv6_rotating"].recall == 1.0 and res.kinds["tenant_spam"].recall == 1.0
    assert res.kinds["spam_burst"].delays_s == [90.0]
    assert sorted(fp["source"] for fp in res.false_positives) == ["10.0.0.1", "10.0.0.1", "10.0.0.3", "10.9.9.9"]
    assert res.fp_sources == 3 and res.fp_per_hour == 1.5
    assert res.alerts == 8 and res.true_alerts == 4
    assert res.flagged_sources == 5 and res.true_flagged == 2   # 10.0.0.1 counts as flagged falsely too
    assert not res.meets_targets()


def test_familiar_tiers_answer_like_one_full_bitmap_per_source():
    """The inline tier and the full rows hold the same bits as one full bit set per source would,
    through promotions, a snapshot and a restore (also from the previous release's narrower sets)."""
    import io

    from smtpguard.detectors.history import BITS

    rng = np.random.default_rng(3)
    h = SourceHistory(HistoryParams(max_sources=500, max_wide=64))
    ref: dict[int, set[int]] = {}
    ips = [f"10.9.{i // 250}.{i % 250}" for i in range(300)]
    for _ in range(12):
        who = rng.choice(300, size=200)
        slots = h.slots([ips[i] for i in who])
        # most sources touch 1-3 destinations, a few many (they outgrow the inline tier)
        bits = np.where(who < 20, rng.integers(0, BITS, len(who)), rng.integers(0, 5, len(who)))
        want = np.array([b in ref.get(s, set()) for s, b in zip(slots.tolist(), bits.tolist())])
        assert (h.familiar(slots, bits) == want).all()
        h.learn(slots, bits, keep=slots)
        for s, b in zip(slots.tolist(), bits.tolist()):
            ref.setdefault(s, set()).add(b)
    assert 0 < h.wide_rows <= 64 and h.evicted == 0
    back = SourceHistory.restore(h.snapshot(), HistoryParams(max_sources=500, max_wide=64))
    probe = np.arange(BITS)
    for ip in ips[:40]:
        s, t = h.index[ip], back.index[ip]
        assert set(probe[back.familiar(np.full(BITS, t), probe)].tolist()) == ref[s]
    # a snapshot of the previous release: 4096-bit sets (inline positions and 512-byte rows), no
    # first-seen time or novelty baseline. Restored, its sources keep their width: a position is
    # familiar when it was modulo 4096, so nothing familiar becomes new.
    old_bits = 4096
    live = np.sort(h.index.slot)
    small = np.full((len(live), 8), 0xFFFF, np.uint16)
    wide_at, wide = [], []
    for k, s_ in enumerate(live.tolist()):
        olds = sorted({b % old_bits for b in ref.get(s_, ())})
        if len(olds) <= 8:
            small[k, :len(olds)] = olds
        else:
            row = np.zeros(old_bits // 64, np.uint64)
            for b in olds:
                row[b >> 6] |= np.uint64(1) << np.uint64(b & 63)
            wide_at.append(k)
            wide.append(row)
    buf = io.BytesIO()
    np.savez_compressed(buf, ips=h.index.by_slot()[1].astype(str), ewma_conns=h.ewma_conns[live],
                        ewma_distinct=h.ewma_distinct[live], peak_distinct=h.peak_distinct[live],
                        peak_conns=h.peak_conns[live], minutes=h.minutes[live], last_seen_ms=h.last_seen_ms[live],
                        small=small, wide_at=np.array(wide_at, np.int64),
                        wide=np.array(wide, np.uint64).reshape(-1, old_bits // 64), evicted=np.array([0]))
    old = SourceHistory.restore(buf.getvalue(), HistoryParams(max_sources=500, max_wide=64))
    assert BITS % old_bits == 0
    for ip in ips[:40]:
        t = old.index[ip]
        want = {b % old_bits + k * old_bits for b in ref[h.index[ip]] for k in range(BITS // old_bits)}
        assert set(probe[old.familiar(np.full(BITS, t), probe)].tolist()) == want
        assert old.first_seen_ms[t] == h.last_seen_ms[h.index[ip]] - h.minutes[h.index[ip]] * 60_000


def test_more_new_sources_in_one_window_than_the_history_holds_degrades_and_counts(offline_cfg):
    from conftest import replace

    pipe = Pipeline(replace(offline_cfg, detect={"max_sources": 50, "max_panes": 80}))
    rows = [r for k in range(120) for r in flows(f"10.7.0.{k}", 1, dsts=1)]
    rows += flows("10.0.0.9", 40, dsts=40)
    out = _alerts(pipe, rows)
    assert out.features.height == 121  # every source judged, with or without history
    stats = pipe.state_stats()
    assert stats["sources"] <= 50 and stats["evicted_sources_unremembered"] == 121 - 50
    assert stats["panes"] <= 80 and stats["evicted_panes"] == 121 - 80
    assert [a.src_ip for a in out.alerts if a.detector == "spam_fanout"] == ["10.0.0.9"]


def test_alert_gate_forgets_only_what_no_later_window_can_meet():
    from smtpguard.detectors.alerts import AlertGate
    from smtpguard.detectors.rules import Finding

    def finding(ip, minute):
        ws = int(T0.timestamp() * 1000) + minute * 60_000
        return Finding(detector="d", src_ip=ip, tenant="t", window_start_ms=ws, window_end_ms=ws + 60_000,
                       score=0.6, reasons=["r"], evidence={})

    gate = AlertGate(cooldown_ms=600_000, incident_gap_ms=1_800_000)
    gate.admit([finding("10.0.0.1", 0), finding("10.0.0.2", 25)])
    gate.prune(int(T0.timestamp() * 1000) + 26 * 60_000)
    assert set(gate._last) == {("10.0.0.2", "d")} and set(gate._incidents) == {"10.0.0.1", "10.0.0.2"}
    gate.prune(int(T0.timestamp() * 1000) + 31 * 60_000)
    assert set(gate._incidents) == {"10.0.0.2"}
    later = gate.admit([finding("10.0.0.2", 33), finding("10.0.0.1", 32)])
    assert {a.src_ip: a.suppressed for a in later} == {"10.0.0.2": "cooldown", "10.0.0.1": ""}


def test_horizons_of_a_batch_longer_than_the_longest_horizon(offline_cfg):
    """A detector catching up on a backlog closes more than an hour of windows at once: every window
    still gets the sums of its own last 10 and 60 minutes (panes are pruned after the sums, not before)."""
    rows = []
    for m in range(90):
        rows += flows("10.0.0.5", 3, minute=m, dsts=3, port=587)
    one = Pipeline(offline_cfg)
    whole = one.process(table(rows)).features.sort("window_start")
    minute_by_minute = Pipeline(offline_cfg)
    parts = []
    for m in range(90):
        out = minute_by_minute.process(table([r for r in rows if r["start"] < T0 + dt.timedelta(minutes=m + 1)
                                              and r["start"] >= T0 + dt.timedelta(minutes=m)]))
        if out.features.height:
            parts.append(out.features)
    steps = pl.concat(parts).sort("window_start")
    n = whole.height
    assert n >= 88
    cols = ["conns_10m", "conns_60m", "active_minutes_10m", "active_minutes_60m"]
    assert whole.select(cols).to_dicts() == steps.head(n).select(cols).to_dicts()
    assert whole["active_minutes_60m"].to_list()[:3] == [1, 2, 3] and whole["active_minutes_60m"].max() == 60
