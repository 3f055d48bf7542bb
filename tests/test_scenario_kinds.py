"""The scenario generator's further abuse kinds, hard benign cases, warmup and late delivery."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from smtpguard import scenario as sc

SEED = 13
INSTANCES = 150
DURATION_S = 3 * 3600
WARMUP_S = 3600
OPTIONS = dict(instances=INSTANCES, duration_s=DURATION_S, abuse=sc.ABUSE_KINDS, warmup_s=WARMUP_S,
               benign_extras=True)


@pytest.fixture(scope="module")
def scen() -> sc.Scenario:
    return sc.generate(SEED, **OPTIONS)


@pytest.fixture(scope="module")
def out(scen, tmp_path_factory) -> dict[str, Path]:
    return sc.write(scen, tmp_path_factory.mktemp("kinds"))


@pytest.fixture(scope="module")
def smtp(out) -> pl.DataFrame:
    """Port-25 request flows (instance -> server), with their minute."""
    df = pl.read_csv(out["flows"], separator=" ", has_header=True,
                     schema_overrides={"account-id": pl.Utf8, "srcaddr": pl.Utf8, "dstaddr": pl.Utf8})
    return df.filter(pl.col("dstport") == 25).with_columns((pl.col("start") // 60).alias("minute"))


@pytest.fixture(scope="module")
def truth(out) -> list[dict]:
    return json.loads(out["truth"].read_text())


@pytest.fixture(scope="module")
def meta(out) -> dict:
    return json.loads(out["scenario"].read_text())


def _one(truth: list[dict], key: str, value: str) -> dict:
    found = [t for t in truth if t[key] == value]
    assert len(found) == 1, value
    return found[0]


def _of(smtp: pl.DataFrame, ip: str) -> pl.DataFrame:
    return smtp.filter(pl.col("srcaddr") == ip)


def _inside(df: pl.DataFrame, start_ms: int, end_ms: int) -> pl.DataFrame:
    return df.filter((pl.col("start") >= start_ms // 1000) & (pl.col("start") < end_ms // 1000))


def _full_minutes(df: pl.DataFrame, start_ms: int, end_ms: int) -> pl.DataFrame:
    """Per-minute connections and distinct servers over the calendar minutes wholly inside [start, end)."""
    lo, hi = -(-start_ms // 60_000), end_ms // 60_000
    return (df.filter((pl.col("minute") >= lo) & (pl.col("minute") < hi))
            .group_by("minute").agg(n=pl.len(), d=pl.col("dstaddr").n_unique()).sort("minute"))


def _granted(out) -> dict[str, dt.datetime]:
    rows = csv.DictReader(out["exemptions"].read_text().splitlines())
    return {r["ip"]: dt.datetime.fromisoformat(r["granted_at"].replace("Z", "+00:00")) for r in rows}


# --- truth, exemptions, warmup ---------------------------------------------------------------


def test_truth_has_every_kind(scen, truth, out):
    assert len(truth) == INSTANCES
    labels = Counter(t["label"] for t in truth if t["label"] != "benign")
    assert set(labels) == set(sc.ABUSE_KINDS)
    assert all(n == 1 for k, n in labels.items() if k != "tenant_spam")
    assert 4 <= labels["tenant_spam"] <= 6
    kinds = Counter(t["kind"] for t in truth)
    for kind in sc.BENIGN_EXTRA_KINDS:
        assert kinds[kind] == 1
        assert _one(truth, "kind", kind)["label"] == "benign"
        assert _one(truth, "kind", kind)["abuse_start_ms"] is None
    lengths = {"volume_spike": (10, 20), "low_and_slow": (60, 90), "low_and_slow_blocked": (60, 90),
               "tenant_spam": (10, 20)}
    for t in truth:
        if t["label"] == "benign":
            continue
        lo, hi = lengths.get(t["label"], (5, 20))
        assert lo * 60_000 - 1000 <= t["abuse_end_ms"] - t["abuse_start_ms"] <= hi * 60_000 + 1000, t
        assert scen.start_ms + WARMUP_S * 1000 <= t["abuse_start_ms"] < t["abuse_end_ms"] <= scen.end_ms
    granted = _granted(out)
    start = scen.start
    for kind in ("newsletter", "esp_high_volume", "app_retry"):
        t = _one(truth, "kind", kind)
        assert t["exempted"] and start - granted[t["ip"]] > dt.timedelta(days=7), kind
    assert not _one(truth, "kind", "app_retry_blocked")["exempted"]
    spike = _one(truth, "label", "volume_spike")
    assert spike["exempted"] and start - granted[spike["ip"]] > dt.timedelta(days=7)
    slow = _one(truth, "label", "low_and_slow")
    assert slow["exempted"] and dt.timedelta(days=1) <= start - granted[slow["ip"]] <= dt.timedelta(days=3)
    assert not _one(truth, "label", "low_and_slow_blocked")["exempted"]


def test_tenant_spam_truth(scen, truth, meta):
    group = [t for t in truth if t["label"] == "tenant_spam"]
    assert len({t["tenant"] for t in group}) == 1
    assert len({(t["abuse_start_ms"], t["abuse_end_ms"]) for t in group}) == 1
    assert not any(t["exempted"] for t in group)
    [run] = scen.tenant_truth()
    assert meta["tenant_abuse"] == [run]
    assert run["tenant"] == group[0]["tenant"] and run["label"] == "tenant_spam"
    assert sorted(run["instances"]) == sorted(t["ip"] for t in group)
    assert (run["abuse_start_ms"], run["abuse_end_ms"]) == (group[0]["abuse_start_ms"], group[0]["abuse_end_ms"])
    assert run["abuse_start"].endswith("Z")


def test_meta_records_options(meta, scen):
    assert meta["abuse"] == list(sc.ABUSE_KINDS)
    assert meta["warmup_s"] == WARMUP_S
    assert meta["late_fraction"] == 0.0 and meta["late_delay_s"] == [60, 240]
    assert meta["max_out_of_order_s"] == sc.JITTER_MS // 1000
    assert meta["benign_extras"] == list(sc.BENIGN_EXTRA_KINDS)
    kinds = {e["kind"] for e in meta["benign_episodes"]}
    assert kinds == {"newsletter", "app_retry", "app_retry_blocked"}
    assert meta["benign_episodes"] == scen.episodes


def test_warmup_keeps_abuse_out_of_the_first_hour(scen, smtp, truth):
    warm_end = (scen.start_ms // 1000) + WARMUP_S
    early = smtp.filter(pl.col("start") < warm_end)
    # abusers without legitimate mail send nothing on port 25 during the warmup
    for t in truth:
        if t["label"] in ("spam_burst", "tenant_spam", "blocked_attempts", "low_and_slow", "low_and_slow_blocked"):
            assert _of(early, t["ip"]).height == 0, t["label"]
    # the mail servers among them only send their usual mail
    for label in ("volume_spike", "flood"):
        per_min = _of(early, _one(truth, "label", label)["ip"]).group_by("minute").len()["len"]
        assert per_min.max() <= sc.MAIL_CAP_PER_MIN
    for e in scen.episodes:
        if e["kind"] != "newsletter":
            assert e["start_ms"] >= scen.start_ms + WARMUP_S * 1000


# --- abuse kinds -----------------------------------------------------------------------------


def test_volume_spike(scen, smtp, truth):
    t = _one(truth, "label", "volume_spike")
    s = _of(smtp, t["ip"])
    assert t["abuse_start_ms"] - scen.start_ms >= 45 * 60_000
    before = s.filter(pl.col("start") < t["abuse_start_ms"] // 1000)
    usual = before.group_by("minute").len()["len"]
    assert usual.len() >= 44 and 10 <= usual.median() <= sc.MAIL_CAP_PER_MIN
    spike = _inside(s, t["abuse_start_ms"], t["abuse_end_ms"])
    per_min = _full_minutes(spike, t["abuse_start_ms"], t["abuse_end_ms"])
    assert per_min.height >= 9
    assert per_min["n"].median() >= 6 * usual.median()
    assert per_min["n"].min() >= 4 * usual.median()
    # after the spike it is back to normal
    after = s.filter(pl.col("start") >= t["abuse_end_ms"] // 1000 + 60).group_by("minute").len()["len"]
    assert after.len() == 0 or after.max() <= sc.MAIL_CAP_PER_MIN
    # a mix of its usual servers and many it never used, all accepted mail
    new = ~spike["dstaddr"].is_in(before["dstaddr"].unique().to_list())
    assert 0.5 <= new.mean() <= 0.75
    assert spike.filter(new)["dstaddr"].n_unique() >= 300
    assert spike["action"].unique().to_list() == ["ACCEPT"]
    assert spike["bytes"].median() > 2000


@pytest.mark.parametrize("label, lo, hi, action", [("low_and_slow", 3, 8, "ACCEPT"),
                                                    ("low_and_slow_blocked", 2, 4, "REJECT")])
def test_low_and_slow(smtp, truth, label, lo, hi, action):
    t = _one(truth, "label", label)
    s = _of(smtp, t["ip"])
    assert s["start"].min() >= t["abuse_start_ms"] // 1000 and s["start"].max() < t["abuse_end_ms"] // 1000
    per_min = s.group_by("minute").agg(d=pl.col("dstaddr").n_unique())
    assert per_min["d"].max() <= hi < 20
    full = _full_minutes(s, t["abuse_start_ms"], t["abuse_end_ms"])
    assert full["n"].min() >= lo and full.height >= 59
    # every connection goes to a server it never contacted before
    assert s["dstaddr"].n_unique() == s.height
    hour = _inside(s, t["abuse_start_ms"], t["abuse_start_ms"] + 3_600_000)
    assert hour["dstaddr"].n_unique() >= (150 if label == "low_and_slow" else 110)
    assert hour["dstaddr"].str.replace(r"\.\d+$", "").n_unique() >= 50
    assert s["action"].unique().to_list() == [action]
    if action == "ACCEPT":
        assert s["bytes"].median() < 5000
    else:
        assert s["tcp-flags"].unique().to_list() == [2]


def test_tenant_spam_instances_each_moderate_together_a_fan_out(smtp, truth):
    group = [t for t in truth if t["label"] == "tenant_spam"]
    w0, w1 = group[0]["abuse_start_ms"], group[0]["abuse_end_ms"]
    s = smtp.filter(pl.col("srcaddr").is_in([t["ip"] for t in group]))
    assert s["start"].min() >= w0 // 1000 and s["start"].max() < w1 // 1000
    assert s["action"].unique().to_list() == ["REJECT"]
    assert s["tcp-flags"].unique().to_list() == [2]
    lo, hi = -(-w0 // 60_000), w1 // 60_000
    full = s.filter((pl.col("minute") >= lo) & (pl.col("minute") < hi))
    per_inst = full.group_by("srcaddr", "minute").agg(n=pl.len(), d=pl.col("dstaddr").n_unique())
    assert per_inst["d"].max() < 20
    assert per_inst["n"].min() >= 8 and per_inst["n"].max() <= 15
    assert per_inst["srcaddr"].n_unique() == len(group)
    together = full.group_by("minute").agg(n=pl.len(), d=pl.col("dstaddr").n_unique())
    assert together["d"].max() >= 40
    assert together["d"].min() >= 38 and together["d"].max() <= 80
    # one list split over the instances: no server twice in a minute
    assert (together["d"] == together["n"]).all()


# --- hard benign cases -----------------------------------------------------------------------


def test_newsletter_bursts_reuse_popular_servers(scen, smtp, truth):
    t = _one(truth, "kind", "newsletter")
    s = _of(smtp, t["ip"])
    bursts = [e for e in scen.episodes if e["ip"] == t["ip"]]
    assert len(bursts) >= 3
    assert bursts[0]["start_ms"] - scen.start_ms <= 30 * 60_000
    for a, b in zip(bursts, bursts[1:]):
        assert 40 * 60_000 <= b["start_ms"] - a["start_ms"] <= 60 * 60_000
    previous: set[str] | None = None
    for e in bursts:
        if e["end_ms"] - e["start_ms"] < 3 * 60_000:
            continue  # cut by the end of the scenario
        assert 3 * 60_000 <= e["end_ms"] - e["start_ms"] <= 6 * 60_000
        b = _inside(s, e["start_ms"], e["end_ms"])
        per_min = _full_minutes(b, e["start_ms"], e["end_ms"])
        assert per_min["d"].min() >= 120 and per_min["d"].max() <= 270
        dsts = set(b["dstaddr"].unique().to_list())
        if previous is not None:
            assert len(dsts & previous) >= 0.5 * len(dsts)
        previous = dsts
    quiet = s.filter(~pl.any_horizontal([(pl.col("start") >= e["start_ms"] // 1000)
                                         & (pl.col("start") < e["end_ms"] // 1000) for e in bursts]))
    q = quiet.group_by("minute").len()["len"]
    assert q.min() >= 1 and q.max() <= 15 and 5 <= q.median() <= 15
    assert s["action"].unique().to_list() == ["ACCEPT"]
    assert s["bytes"].median() > 2000


def test_esp_high_volume_is_steady_and_reuses_servers(scen, smtp, truth):
    t = _one(truth, "kind", "esp_high_volume")
    s = _of(smtp, t["ip"])
    per_min = _full_minutes(s, scen.start_ms, scen.end_ms)
    assert per_min.height == DURATION_S // 60
    assert per_min["n"].min() >= 150 and per_min["n"].max() <= 400
    assert per_min["d"].min() >= 80 and per_min["d"].max() <= 200
    # heavy reuse: after the first half hour nearly every server is one it used before
    first_seen = s.group_by("dstaddr").agg(pl.col("minute").min().alias("first"))
    later = s.filter(pl.col("minute") >= scen.start_ms // 60_000 + 30).join(first_seen, on="dstaddr")
    assert (later["first"] < later["minute"]).mean() >= 0.9
    assert s["action"].unique().to_list() == ["ACCEPT"]
    assert s["bytes"].median() > 2000


def test_app_retry(scen, smtp, truth):
    t = _one(truth, "kind", "app_retry")
    [e] = [e for e in scen.episodes if e["ip"] == t["ip"]]
    assert 20 * 60_000 - 1000 <= e["end_ms"] - e["start_ms"] <= 40 * 60_000 + 1000
    [server] = t["targets"]
    s = _of(smtp, t["ip"])
    retry = _inside(s.filter(pl.col("dstaddr") == server), e["start_ms"], e["end_ms"]).filter(pl.col("bytes") <= 600)
    per_min = _full_minutes(retry, e["start_ms"], e["end_ms"])
    assert per_min["n"].min() >= 60 and per_min["n"].max() <= 150
    assert retry["packets"].min() >= 3 and retry["packets"].max() <= 6
    assert retry["bytes"].min() >= 200 and retry["bytes"].max() <= 600
    assert retry["action"].unique().to_list() == ["ACCEPT"]
    # outside the episode: only its little normal mail
    outside = s.filter((pl.col("start") < e["start_ms"] // 1000) | (pl.col("start") >= e["end_ms"] // 1000))
    assert outside.group_by("minute").len()["len"].max() < 20


def test_app_retry_blocked(scen, smtp, truth):
    t = _one(truth, "kind", "app_retry_blocked")
    [e] = [e for e in scen.episodes if e["ip"] == t["ip"]]
    assert e["end_ms"] - e["start_ms"] == 3_600_000
    s = _of(smtp, t["ip"])
    assert s["dstaddr"].unique().to_list() == list(t["targets"])
    assert s["action"].unique().to_list() == ["REJECT"]
    assert s["start"].min() >= e["start_ms"] // 1000 and s["start"].max() < e["end_ms"] // 1000
    per_min = _full_minutes(s, e["start_ms"], e["end_ms"])
    assert per_min.height >= 59 and per_min["n"].min() >= 1 and per_min["n"].max() <= 3


def test_benign_extras_subset_and_default_off():
    s = sc.generate(3, instances=80, duration_s=1800, benign_extras=("app_retry_blocked",))
    assert [a.kind for a in s.actors if a.kind in sc.BENIGN_EXTRA_KINDS] == ["app_retry_blocked"]
    plain = sc.generate(3, instances=80, duration_s=1800)
    assert not any(a.kind in sc.BENIGN_EXTRA_KINDS for a in plain.actors)
    assert sc.DEFAULT_ABUSE == ("spam_burst", "spam_exempted_new", "flood", "blocked_attempts")
    # the new options at their defaults change nothing
    same = sc.generate(3, instances=80, duration_s=1800, warmup_s=0, late_fraction=0.0, benign_extras=False)
    assert b"".join(sc.iter_chunks(same)) == b"".join(sc.iter_chunks(plain))


# --- late delivery ---------------------------------------------------------------------------


LATE = dict(instances=60, duration_s=1800, late_fraction=0.05, late_delay_s=(60, 240))


def _starts(lines: list[str]) -> list[int]:
    return [int(line.split(" ")[10]) for line in lines]


def test_late_lines_move_later_in_the_file_with_their_timestamps():
    on_time = list(sc.iter_lines(sc.generate(7, instances=60, duration_s=1800), header=False))
    late_scen = sc.generate(7, **LATE)
    late = list(sc.iter_lines(late_scen, header=False))
    # the same lines, in another order
    assert sorted(late) == sorted(on_time)
    assert late != on_time
    starts = _starts(late)
    lag, running = [], 0
    for s in starts:
        running = max(running, s)
        lag.append(running - s)
    jitter = sc.JITTER_MS // 1000
    assert max(lag) <= jitter + 240 + 1
    # late lines sit behind lines that started well after them
    behind = sum(1 for x in lag if x > jitter + 1)
    assert 0.02 * len(late) <= behind <= 0.06 * len(late)
    assert max(lag) >= 180
    i = lag.index(max(lag))
    assert any(s > starts[i] + 60 for s in starts[:i])
    assert late_scen.meta()["max_out_of_order_s"] == jitter + 240


def test_late_delivery_is_deterministic_and_file_matches_iterators(tmp_path):
    a = sc.write(sc.generate(7, **LATE), tmp_path / "a")
    b = sc.write(sc.generate(7, **LATE), tmp_path / "b")
    assert a["flows"].read_bytes() == b["flows"].read_bytes()
    assert a["flows"].read_text().split("\n")[:-1] == list(sc.iter_lines(sc.generate(7, **LATE)))
    meta = json.loads(a["scenario"].read_text())
    assert meta["lines"] == len(a["flows"].read_text().split("\n")) - 2
    assert meta["late_fraction"] == 0.05 and meta["late_delay_s"] == [60, 240]


# --- determinism and arguments ---------------------------------------------------------------


def test_same_options_give_identical_files(out, tmp_path):
    again = sc.write(sc.generate(SEED, **OPTIONS), tmp_path)
    for key in ("flows", "exemptions", "truth", "scenario"):
        assert again[key].read_bytes() == out[key].read_bytes(), key


def test_all_options_together_are_deterministic(tmp_path):
    kw = dict(instances=120, duration_s=2 * 3600, abuse=sc.ABUSE_KINDS, warmup_s=600, benign_extras=True,
              late_fraction=0.02, late_delay_s=(90, 180))
    a = sc.write(sc.generate(21, **kw), tmp_path / "a")
    b = sc.write(sc.generate(21, **kw), tmp_path / "b")
    for key in ("flows", "exemptions", "truth", "scenario"):
        assert a[key].read_bytes() == b[key].read_bytes(), key
    other = sc.write(sc.generate(22, **kw), tmp_path / "c")
    assert other["flows"].read_bytes() != a["flows"].read_bytes()


def test_bad_new_arguments():
    with pytest.raises(ValueError, match="benign"):
        sc.generate(3, benign_extras=("bulk",))
    with pytest.raises(ValueError, match="warmup"):
        sc.generate(3, duration_s=600, warmup_s=600)
    with pytest.raises(ValueError, match="late_fraction"):
        sc.generate(3, late_fraction=1.5)
    with pytest.raises(ValueError, match="late_delay"):
        sc.generate(3, late_delay_s=(240, 60))
    with pytest.raises(ValueError, match="low_and_slow"):
        sc.generate(3, duration_s=3600, abuse=("low_and_slow",))
    with pytest.raises(ValueError, match="volume_spike"):
        sc.generate(3, duration_s=7200, warmup_s=6600, abuse=("volume_spike",))
    with pytest.raises(ValueError, match="tenant"):
        sc.generate(3, abuse=("tenant_spam",) * 40)


def test_command_line_new_options(tmp_path):
    rc = sc.main([str(tmp_path), "--seed", "2", "--instances", "80", "--duration", "7200", "--abuse", "all",
                  "--benign-extras", "--warmup", "600", "--late-fraction", "0.01", "--late-delay", "60,120"])
    assert rc == 0
    meta = json.loads((tmp_path / "scenario.json").read_text())
    assert meta["abuse"] == list(sc.ABUSE_KINDS) and meta["benign_extras"] == list(sc.BENIGN_EXTRA_KINDS)
    assert meta["warmup_s"] == 600 and meta["late_fraction"] == 0.01 and meta["late_delay_s"] == [60, 120]
    assert sc.main([str(tmp_path / "x"), "--benign-extras", "bulk"]) == 2


def test_two_hour_scenario_with_everything_has_the_expected_size():
    s = sc.generate(1, instances=300, duration_s=7200, abuse=sc.ABUSE_KINDS, benign_extras=True, late_fraction=0.01)
    n = sum(block.count(b"\n") for block in sc.iter_chunks(s, header=False))
    assert abs(n - s.expected_lines) < 0.1 * n
