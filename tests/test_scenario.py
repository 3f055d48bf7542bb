"""The scenario generator: determinism, format, labelled behaviour and speed."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from smtpguard.lab import scenario as sc

SEED = 11
INSTANCES = 120
DURATION_S = 3600


@pytest.fixture(scope="module")
def scen() -> sc.Scenario:
    return sc.generate(SEED, instances=INSTANCES, duration_s=DURATION_S)


@pytest.fixture(scope="module")
def out(scen, tmp_path_factory) -> dict[str, Path]:
    return sc.write(scen, tmp_path_factory.mktemp("scenario"))


@pytest.fixture(scope="module")
def flows(out) -> pl.DataFrame:
    df = pl.read_csv(out["flows"], separator=" ", has_header=True,
                     schema_overrides={"account-id": pl.Utf8, "srcaddr": pl.Utf8, "dstaddr": pl.Utf8})
    return df.with_columns((pl.col("start") // 60).alias("minute"))


@pytest.fixture(scope="module")
def truth(out) -> list[dict]:
    return json.loads(out["truth"].read_text())


def _one(truth: list[dict], label: str) -> dict:
    found = [t for t in truth if t["label"] == label]
    assert len(found) == 1, label
    return found[0]


def _smtp_out(flows: pl.DataFrame, ip: str, port: int = 25) -> pl.DataFrame:
    return flows.filter((pl.col("srcaddr") == ip) & (pl.col("dstport") == port))


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_gives_identical_files(out, tmp_path):
    again = sc.write(sc.generate(SEED, instances=INSTANCES, duration_s=DURATION_S), tmp_path)
    for key in ("flows", "exemptions", "truth", "scenario"):
        assert again[key].read_bytes() == out[key].read_bytes(), key


def test_gzip_output_is_deterministic_and_same_text(scen, out, tmp_path):
    a = sc.write(scen, tmp_path / "a", gzip=True)["flows"]
    b = sc.write(scen, tmp_path / "b", gzip=True)["flows"]
    assert a.name == "flows.log.gz"
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) == out["flows"].read_bytes()


def test_different_seeds_differ():
    a = list(sc.iter_lines(sc.generate(1, instances=60, duration_s=600)))
    b = list(sc.iter_lines(sc.generate(2, instances=60, duration_s=600)))
    assert a[0] == b[0] == sc.HEADER
    assert a[1:] != b[1:]
    assert len(set(a[1:200]) & set(b[1:200])) == 0


def test_iter_lines_and_chunks_match_file(scen, out):
    text = out["flows"].read_text()
    assert b"".join(sc.iter_chunks(scen)).decode() == text
    lines = list(sc.iter_lines(scen))
    assert lines == text.split("\n")[:-1]


# --- format ----------------------------------------------------------------------------------


def test_header_first_and_field_count(out):
    with open(out["flows"]) as f:
        header = f.readline().rstrip("\n")
        assert header == sc.HEADER
        assert header.split(" ")[:4] == ["version", "account-id", "interface-id", "srcaddr"]
        n_fields = len(header.split(" "))
        n = 0
        for line in f:
            assert line.count(" ") == n_fields - 1, line
            n += 1
    assert n > 50_000


def test_field_values(scen, flows, truth):
    assert flows["version"].unique().to_list() == [sc.FORMAT_VERSION]
    assert set(flows["action"].unique()) == {"ACCEPT", "REJECT"}
    assert flows["log-status"].unique().to_list() == ["OK"]
    assert flows["account-id"].str.contains(r"^\d{12}$").all()
    assert flows["interface-id"].str.contains(r"^eni-[0-9a-f]{17}$").all()
    assert flows["instance-id"].str.contains(r"^i-[0-9a-f]{17}$").all()
    assert (flows["end"] >= flows["start"]).all()
    assert (flows["end"] - flows["start"]).max() <= 60
    assert flows["start"].min() >= scen.start_ms // 1000
    assert flows["start"].max() < scen.end_ms // 1000
    assert ((flows["packets"] >= 1) & (flows["bytes"] >= 40 * flows["packets"])).all()
    assert set(flows["protocol"].unique()) == {1, 6, 17}
    # interface, instance and account are consistent per actor, and every line is on an actor's interface
    by_eni = {t["interface_id"]: (t["instance_id"], t["tenant"]) for t in truth}
    pairs = flows.select("interface-id", "instance-id", "account-id").unique()
    assert len(pairs) == pairs["interface-id"].n_unique()
    for eni, iid, acct in pairs.iter_rows():
        assert by_eni[eni] == (iid, acct)


def test_lines_roughly_in_time_order(flows):
    start = flows["start"]
    running_max = start.cum_max()
    assert (running_max - start).max() <= sc.JITTER_MS // 1000
    assert (start.diff().drop_nulls() < 0).any()  # delivered slightly out of order, as AWS does


def test_background_is_not_smtp_and_has_both_directions(flows):
    smtp_ports = [25, 465, 587, 2525]
    bg = flows.filter(~pl.col("dstport").is_in(smtp_ports) & ~pl.col("srcport").is_in(smtp_ports))
    assert len(bg) > 0.2 * len(flows)  # (a small scenario: an ESP's thousands of connections a minute weigh more)
    ports = set(bg["dstport"].unique()) | set(bg["srcport"].unique())
    assert {443, 80, 53, 22, 5432, 123} <= ports
    dns = bg.filter(pl.col("protocol") == 17)
    assert (dns.filter(pl.col("dstport") == 53).height > 0) and (dns.filter(pl.col("srcport") == 53).height > 0)
    # an SMTP port only ever appears in SMTP traffic: instance -> server on 25/465/587, and its reply
    to_smtp = flows.filter(pl.col("dstport").is_in(smtp_ports))
    ours = pl.col("srcaddr").str.starts_with("10.") | pl.col("srcaddr").str.starts_with("2600:1f1")
    assert (to_smtp["protocol"] == 6).all() and (to_smtp["srcport"] >= 32768).all()
    assert to_smtp.select(ours.all()).item()
    from_smtp = flows.filter(pl.col("srcport").is_in(smtp_ports))
    assert (from_smtp["dstport"] >= 32768).all()
    assert from_smtp.select((pl.col("dstaddr").str.starts_with("10.") | pl.col("dstaddr").str.starts_with("2600:1f1"))
                            .all()).item()
    https_req = bg.filter((pl.col("dstport") == 443) & (pl.col("protocol") == 6)).height
    https_rep = bg.filter((pl.col("srcport") == 443) & (pl.col("protocol") == 6)).height
    assert 0.9 < https_rep / https_req < 1.1


# --- truth and exemptions --------------------------------------------------------------------


def test_truth_lists_every_abusive_actor_with_window(scen, truth):
    assert len(truth) == INSTANCES
    abusive = [t for t in truth if t["label"] != "benign"]
    assert sorted(t["label"] for t in abusive) == sorted(sc.DEFAULT_ABUSE)
    for t in abusive:
        assert scen.start_ms <= t["abuse_start_ms"] < t["abuse_end_ms"] <= scen.end_ms
        assert 3 * 60_000 <= t["abuse_end_ms"] - t["abuse_start_ms"] <= 20 * 60_000
        assert t["abuse_start"].endswith("Z")
    for t in truth:
        if t["label"] == "benign":
            assert t["abuse_start_ms"] is None and t["abuse_end_ms"] is None
    assert len({t["ip"] for t in truth}) == len(truth)
    tenants = {}
    for t in truth:
        tenants.setdefault(t["tenant"], []).append(t)
    assert len(tenants) < INSTANCES / 2  # several instances per tenant


def test_abusive_traffic_stays_inside_its_window(flows, truth):
    for label in ("spam_burst", "blocked_attempts"):
        t = _one(truth, label)
        s = _smtp_out(flows, t["ip"])
        assert s.height > 0
        assert s["start"].min() >= t["abuse_start_ms"] // 1000
        assert s["start"].max() < t["abuse_end_ms"] // 1000 + 1


def test_exemptions_csv(scen, out, truth):
    text = out["exemptions"].read_text()
    assert text.split("\n")[0] == "ip,tenant,granted_at,reason,declared_conns_per_min"
    rows = list(csv.DictReader(text.splitlines()))
    exempt_ips = {r["ip"] for r in rows}
    start = scen.start
    for r in rows:
        assert r["granted_at"].endswith("Z")
        granted = dt.datetime.fromisoformat(r["granted_at"].replace("Z", "+00:00"))
        assert granted < start
        assert len(r["tenant"]) == 12
    by_ip = {t["ip"]: t for t in truth}
    for t in truth:  # IPv6 senders are exempted by address or by their /64
        assert t["exempted"] == (t["ip"] in exempt_ips or bool(t["prefix"]) and t["prefix"] in exempt_ips)
    benign_mail = [t for t in truth if t["exempted"] and t["label"] == "benign"]
    assert 3 <= len(benign_mail) <= 12
    granted = {r["ip"]: dt.datetime.fromisoformat(r["granted_at"].replace("Z", "+00:00")) for r in rows}

    def granted_of(t):
        return granted.get(t["ip"]) or granted[t["prefix"]]

    for t in benign_mail:
        if t["declared_conns_per_min"] is None:
            assert start - granted_of(t) > dt.timedelta(days=7)
        else:
            assert dt.timedelta(days=1) <= start - granted_of(t) <= dt.timedelta(days=5)
    new = _one(truth, "spam_exempted_new")
    assert dt.timedelta(0) < start - granted_of(new) < dt.timedelta(days=2)
    assert _one(truth, "flood")["exempted"]
    assert not _one(truth, "spam_burst")["exempted"]
    assert not _one(truth, "blocked_attempts")["exempted"]
    # stale exemptions of decommissioned servers are listed but have no traffic
    assert any(ip not in by_ip for ip in exempt_ips)


# --- labelled behaviour ----------------------------------------------------------------------


def test_spam_burst_fans_out_with_rejected_syns(flows, truth):
    t = _one(truth, "spam_burst")
    s = _smtp_out(flows, t["ip"])
    per_min = s.group_by("minute").agg(pl.col("dstaddr").n_unique().alias("d"))
    assert per_min["d"].max() >= 25
    assert per_min["d"].max() <= 600
    assert s["action"].unique().to_list() == ["REJECT"]
    assert s["tcp-flags"].unique().to_list() == [2]
    assert s["packets"].min() >= 1 and s["packets"].max() <= 3
    assert s["bytes"].min() >= 40 and s["bytes"].max() <= 180
    # a blocked SYN gets no reply flow
    assert flows.filter((pl.col("dstaddr") == t["ip"]) & (pl.col("srcport") == 25)).height == 0
    # fan-out reaches many /24s
    nets = s["dstaddr"].str.replace(r"\.\d+$", "").n_unique()
    assert nets >= 0.8 * s["dstaddr"].n_unique() >= 40


def test_spam_exempted_new_accepted_fan_out(flows, truth):
    t = _one(truth, "spam_exempted_new")
    s = _smtp_out(flows, t["ip"]).filter((pl.col("start") >= t["abuse_start_ms"] // 1000)
                                         & (pl.col("start") < t["abuse_end_ms"] // 1000))
    per_min = s.group_by("minute").agg(pl.col("dstaddr").n_unique().alias("d"))
    assert per_min["d"].max() >= 25
    assert s["action"].unique().to_list() == ["ACCEPT"]
    assert s["bytes"].median() < 5000


def test_flood_hits_few_targets_hard(flows, truth):
    t = _one(truth, "flood")
    assert 1 <= len(t["targets"]) <= 3
    s = _smtp_out(flows, t["ip"])
    fl = s.filter(pl.col("dstaddr").is_in(t["targets"]))
    per_min = fl.group_by("minute").agg(pl.len().alias("n"), pl.col("dstaddr").n_unique().alias("d"))
    just_over, _ = sc._flood_thresholds()
    assert per_min["n"].max() >= 1.1 * 2 * just_over  # the first flood is an exempted mail server's
    assert per_min["d"].max() <= 3
    # the same holds without knowing the targets: the busiest minute's top-3 destinations
    busiest = s.group_by("minute").len().sort("len", descending=True)["minute"][0]
    top3 = (s.filter(pl.col("minute") == busiest).group_by("dstaddr").len()
            .sort("len", descending=True).head(3)["len"].sum())
    assert top3 >= 600
    assert set(fl["action"].unique()) == {"ACCEPT"}  # the first flood actor is exempted
    # flood connections are SYN (or SYN+RST) only, 1-3 packets; the server's normal mail also goes on
    syn = fl.filter(pl.col("tcp-flags").is_in([2, 6]))
    assert syn["packets"].max() <= 3 and syn["bytes"].max() <= 200
    assert syn.group_by("minute").len()["len"].max() >= 300
    assert syn["start"].min() >= t["abuse_start_ms"] // 1000 and syn["start"].max() < t["abuse_end_ms"] // 1000


def test_blocked_attempts(flows, truth):
    t = _one(truth, "blocked_attempts")
    s = _smtp_out(flows, t["ip"])
    assert 5 <= len(t["targets"]) <= 40 and s["dstaddr"].n_unique() >= 5
    assert set(s["dstaddr"].unique()) <= set(t["targets"])
    assert s["action"].unique().to_list() == ["REJECT"]
    per_min = s.group_by("minute").len()["len"]
    assert per_min.max() <= 81 and per_min.max() >= 10


def test_benign_mail_servers_send_all_along_to_their_own_correspondents(flows, truth):
    servers = [t for t in truth if t["kind"] == "mail_server" and t["label"] == "benign"]
    assert servers
    for t in servers:
        s = _smtp_out(flows, t["ip"])
        per_min = s.group_by("minute").agg(pl.len().alias("n"))
        assert per_min.height >= 0.5 * DURATION_S // 60
        assert s["action"].unique().to_list() == ["ACCEPT"]
        assert s["bytes"].median() > 2000
        replies = flows.filter((pl.col("srcaddr").is_in(s["dstaddr"].unique().to_list()))
                               & (pl.col("dstaddr") == t["ip"]) & (pl.col("srcport") == 25))
        assert replies.height == s.height
        # its correspondents repeat: far fewer distinct servers than connections over the hour
        assert s["dstaddr"].n_unique() < 0.8 * s.height or s.height < 60


def test_benign_smtp_noise_and_submission(flows, truth):
    mis = [t for t in truth if t["kind"] == "misconfigured_app"]
    assert mis
    for t in mis:
        s = _smtp_out(flows, t["ip"])
        assert set(s["action"].unique()) <= {"REJECT"}
        assert 1 <= len(t["targets"]) <= 3 and set(s["dstaddr"].unique()) <= set(t["targets"])
    subs = [t for t in truth if t["kind"] == "submission"]
    assert len(subs) >= 10
    sub_flows = flows.filter(pl.col("srcaddr").is_in([t["ip"] for t in subs]) & pl.col("dstport").is_in([587, 465]))
    assert sub_flows["action"].unique().to_list() == ["ACCEPT"]
    assert set(sub_flows["dstport"].unique()) == {465, 587}
    assert sub_flows["dstaddr"].n_unique() <= 6
    assert not any(t["exempted"] for t in subs)
    # nobody benign and non-exempt gets anything but REJECT on port 25
    benign_nonexempt = [t["ip"] for t in truth if t["label"] == "benign" and not t["exempted"]]
    p25 = flows.filter(pl.col("srcaddr").is_in(benign_nonexempt) & (pl.col("dstport") == 25))
    assert set(p25["action"].unique()) <= {"REJECT"}


def test_floods_alternate_exemption_and_intensity():
    """Two floods: an exempted mail server on port 25 and an instance without exemption on 465/587
    (nothing blocks those); one just over its default threshold, one far over."""
    s = sc.generate(5, instances=80, duration_s=1800, abuse=("flood", "flood"))
    floods = {a.ip: a for a in s.actors if a.label == "flood"}
    assert sorted(a.exempted for a in floods.values()) == [False, True]
    t_open, t_exempt = sc._flood_thresholds()
    peak: dict[str, dict[int, int]] = {ip: {} for ip in floods}
    for line in sc.iter_lines(s, header=False):
        f = line.split(" ")
        a = floods.get(f[3])
        if a is not None and f[4] in a.targets:
            assert f[12] == "ACCEPT" and (f[6] == "25") == a.exempted and f[6] in ("25", "465", "587")
            m = int(f[10]) // 60
            peak[a.ip][m] = peak[a.ip].get(m, 0) + 1
    ratios = sorted(max(peak[ip].values()) / (t_exempt if a.exempted else t_open) for ip, a in floods.items())
    assert 1.05 <= ratios[0] <= 1.7 and 2.8 <= ratios[1] <= 11.5, ratios


def test_no_abuse_and_bad_arguments():
    s = sc.generate(3, instances=60, duration_s=600, abuse=())
    assert all(a.label == "benign" for a in s.actors)
    with pytest.raises(ValueError):
        sc.generate(3, abuse=("phishing",))
    with pytest.raises(ValueError, match="too few"):
        sc.generate(3, instances=10)
    with pytest.raises(ValueError):
        sc.generate(3, duration_s=10)


def test_start_is_honoured():
    start = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    s = sc.generate(3, instances=60, duration_s=600, start=start)
    assert s.start == start and s.duration_s == 600
    first = next(iter(sc.iter_lines(s, header=False))).split(" ")
    assert int(start.timestamp()) <= int(first[10]) < int(start.timestamp()) + 600


# --- benchmark files -------------------------------------------------------------------------


def test_write_lines_exact_count(tmp_path):
    p = tmp_path / "bench.log"
    n = sc.write_lines(p, 4, 123_457)
    assert n == 123_457
    with open(p, "rb") as f:
        assert f.readline().decode().rstrip("\n") == sc.HEADER
        assert sum(1 for _ in f) == 123_457
    again = tmp_path / "again.log"
    sc.write_lines(again, 4, 123_457)
    assert again.read_bytes() == p.read_bytes()


def test_short_scenarios_generate():
    """A scenario of a few minutes (benchmarks, quick checks) has traffic even when some senders' first
    burst would come later."""
    for seed in range(1, 9):
        scen = sc.generate(seed, instances=300, duration_s=11 * 60)
        assert sum(1 for _ in sc.iter_lines(scen)) > 1000
