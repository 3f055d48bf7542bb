"""Repeats of what the team dismissed (detectors/repeats.py): labels made with the console's own actions
on a generated store, a verdicts model trained on them, and the same traffic detected again with the
team's verdicts. A newsletter the team dismissed again and again is held at low from then on, visibly and
reversibly; every other alert, the abusers' that nobody reviewed among them, keeps its rule severity."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from smtpguard.core.store import Store

NEWSLETTER = "10.250.1.10"
#: verdicts are given on the alerts of windows before this time; the rest is "later traffic"
REVIEWED_UNTIL = "2024-03-12T10:00"
ABUSE = (["spam_burst"] * 6 + ["spam_first_minute", "spam_exempted_new", "spam_exempted_new", "spam_submission",
                               "spam_submission", "flood", "blocked_attempts"])


def _with_newsletter(scen, flows: Path) -> None:
    """Add a newsletter to the scenario's flow log: every 12 minutes a one-minute burst to 60 mail
    servers it never sent to before (the rules' spam_fanout raises it at medium each time)."""
    rng = random.Random(5)
    t0 = scen.start_ms // 1000
    extra = []
    for minute in range(0, scen.duration_s // 60, 12):
        for i in range(60):
            s = t0 + minute * 60 + 5 + rng.randrange(50)
            dst = f"{rng.randrange(11, 220)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 254)}"
            extra.append(f"3 123456789012 eni-0newsletter0000001 {NEWSLETTER} {dst} {40000 + i} 25 6 14 9000 {s} "
                         f"{s + 3} ACCEPT OK i-0newsletter00000001 19")
    lines = flows.read_text().splitlines()
    body = sorted(lines[1:] + extra, key=lambda line: int(line.split(" ")[10]))
    flows.write_text(lines[0] + "\n" + "\n".join(body) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import make_config
    from smtpguard.app.analyze import analyze
    from smtpguard.cli.model import load_verdicts
    from smtpguard.console import actions
    from smtpguard.core.exemptions import Exemptions
    from smtpguard.detectors import storage
    from smtpguard.detectors.features import to_store
    from smtpguard.lab import scenario
    from smtpguard.models import verdicts

    tmp = tmp_path_factory.mktemp("repeats")
    cfg = make_config(tmp)
    scen = scenario.generate(7, instances=300, duration_s=3 * 3600, abuse=ABUSE)
    paths = scenario.write(scen, tmp / "scenario")
    _with_newsletter(scen, paths["flows"])
    flows, exemptions = [str(paths["flows"])], Exemptions.from_csv(paths["exemptions"])
    abusers = {a.ip for a in scen.abusive}
    store = Store(cfg.store_dsn, cfg.store.database)
    first = analyze(cfg, flows, "aws-vpc", exemptions, keep_features=True)
    store.insert_alerts(first.alerts)
    for f in first.features:
        storage.insert_features(store, to_store(f))
    console = actions.Console(cfg, store)
    for a in first.raised():
        if a.src_ip and a.window_start < REVIEWED_UNTIL:
            if a.src_ip in abusers:
                actions.confirm(console, a.alert_id, "reviewer")
            else:
                actions.dismiss(console, a.alert_id, "reviewer", note="our newsletter" if a.src_ip == NEWSLETTER else "")
    feats, y = load_verdicts(store)
    model, _ = verdicts.train(feats, y)
    models = verdicts.models_folder(cfg.data_dir)
    verdicts.save(model, models / "verdicts-1")
    verdicts.promote(models, models / "verdicts-1")
    again = analyze(cfg, flows, "aws-vpc", exemptions, verdicts_from=store)
    yield {"cfg": cfg, "store": store, "console": console, "first": first, "again": again, "abusers": abusers,
           "model": model}
    store.close()


def test_the_newsletter_is_raised_at_medium_by_the_rules(world):
    """The premise: without verdicts the rules raise every burst of the newsletter at medium."""
    news = [a for a in world["first"].raised() if a.src_ip == NEWSLETTER]
    assert len(news) >= 12 and {a.severity for a in news} == {"medium"}
    assert {a.detector for a in news} == {"spam_fanout"}


def test_repeats_of_the_dismissed_newsletter_are_held_and_say_why(world):
    first = {a.alert_id: a for a in world["first"].alerts}
    news_later = [a for a in world["again"].alerts if a.src_ip == NEWSLETTER and a.window_start >= REVIEWED_UNTIL]
    assert len(news_later) >= 4
    for a in news_later:
        held = a.evidence["held"]
        assert a.severity == "low" and first[a.alert_id].severity == "medium"
        assert held["rule_severity"] == "medium" and held["dismissed"] >= 5 and held["model"] == "verdicts-1"
        assert held["confirm_probability"] <= world["cfg"].detect.hold_repeats_below
        assert a.score <= held["dismissed_top_score"] and a.score == first[a.alert_id].score
        assert any(r.startswith("held at low (the rules say medium)") and "dismissed this source's earlier "
                   "spam_fanout alerts" in r for r in a.reasons)


def test_every_other_alert_keeps_its_rule_severity(world):
    """Only the newsletter's repeats change: the abusers' alerts, reviewed or not, and every benign
    source nobody dismissed keep what the rules said."""
    first = {a.alert_id: a for a in world["first"].alerts}
    assert len(world["again"].alerts) == len(first)
    changed = {a.src_ip for a in world["again"].alerts if a.severity != first[a.alert_id].severity
               or a.suppressed != first[a.alert_id].suppressed}
    assert changed == {NEWSLETTER}
    # abusers whose alerts nobody reviewed yet (they start after the review) are raised as before
    fresh = [a for a in world["again"].raised() if a.src_ip in world["abusers"] and a.window_start >= REVIEWED_UNTIL
             and not any(b.src_ip == a.src_ip and b.window_start < REVIEWED_UNTIL for b in world["first"].raised())]
    assert fresh and all(a.severity in ("medium", "high", "critical") and "held" not in a.evidence for a in fresh)


def test_the_queue_ordered_by_likelihood_puts_the_abusers_above_the_newsletter(world):
    """The later alerts at medium or higher, most likely confirmed first: every abuser's alert comes before
    every one of the newsletter's; the default order is newest first, as before."""
    from smtpguard.console import queries
    from smtpguard.models import verdicts

    store = world["store"]
    ranker = queries.VerdictRanker(verdicts.models_folder(world["cfg"].data_dir))
    f = queries.AlertFilter(severity="medium", since=queries.from_ms(_ms(REVIEWED_UNTIL)), per_page=500)
    page = queries.alert_queue(store, dataclasses.replace(f, order="likely"), ranker)
    ips = [a["src_ip"] for a in page.alerts]
    assert NEWSLETTER in ips and any(ip in world["abusers"] for ip in ips)
    last_abuser = max(i for i, ip in enumerate(ips) if ip in world["abusers"])
    first_news = min(i for i, ip in enumerate(ips) if ip == NEWSLETTER)
    assert last_abuser < first_news, [(a["src_ip"], a["confirm_probability"]) for a in page.alerts]
    newest = queries.alert_queue(store, f, ranker).alerts
    assert [a["window_start"] for a in newest] == sorted((a["window_start"] for a in newest), reverse=True)


def _ms(iso: str) -> int:
    import datetime as dt

    return int(dt.datetime.fromisoformat(iso).replace(tzinfo=dt.timezone.utc).timestamp() * 1000)


def _newsletter(world):
    """The newsletter's stored window features, one of its held alerts, and a maker of findings on that
    alert's window."""
    import polars as pl

    from smtpguard.detectors.rules import Finding

    store = world["store"]
    held = next(a for a in world["again"].alerts if a.src_ip == NEWSLETTER and "held" in a.evidence)
    feats = pl.from_pandas(store.query_df(
        f"SELECT * FROM {store.database}.window_features FINAL WHERE src_ip = {{ip:String}}", {"ip": NEWSLETTER}))

    def finding(score: float, detector: str = "spam_fanout") -> Finding:
        return Finding(detector, NEWSLETTER, held.tenant, held.window_start_ms, held.window_start_ms + 60_000,
                       score, ["x"])

    return feats, held, finding


def test_the_hold_needs_weaker_evidence_a_known_kind_and_a_model(world, tmp_path):
    """A stronger repeat, a kind of alert the model has too few labels for, and no promoted model:
    nothing is held."""
    from smtpguard.detectors.repeats import RepeatHold
    from smtpguard.models import verdicts

    cfg, store = world["cfg"], world["store"]
    feats, held, finding = _newsletter(world)
    hold = RepeatHold(verdicts.models_folder(cfg.data_dir), cfg.detect.hold_repeats_below)
    hold.refresh(store)
    top = held.evidence["held"]["dismissed_top_score"]
    same, stronger = finding(top), finding(top + 0.05)
    assert hold.hold([same, stronger], feats) == 1 and same.severity == "low" and stronger.severity is None
    # a kind the model learned from too few labels is never touched, whatever the team dismissed
    unknown = next(d for d in ("low_and_slow", "volume_spike", "connection_flood")
                   if not verdicts.knows_kind(world["model"].card, d))
    hold.history[(NEWSLETTER, unknown)] = hold.history[(NEWSLETTER, "spam_fanout")]
    other = finding(top, unknown)
    assert hold.hold([other], feats) == 0 and other.severity is None
    # no promoted model: nothing is held
    bare = RepeatHold(tmp_path / "no-models", cfg.detect.hold_repeats_below)
    bare.refresh(store)
    again = finding(top)
    assert bare.hold([again], feats) == 0 and again.severity is None


def test_a_person_restores_a_held_alert(world):
    """Held alerts are stored at low; the console's restore gives one its rule severity back, records who
    did it, and a second restore is refused."""
    from smtpguard.console import actions, queries

    store, console = world["store"], world["console"]
    held = [a for a in world["again"].alerts if a.src_ip == NEWSLETTER and "held" in a.evidence]
    store.insert_alerts([a for a in held if a.window_start >= REVIEWED_UNTIL])  # as the detector stores them
    target = next(a for a in held if a.window_start >= REVIEWED_UNTIL)
    assert queries.get_alert(store, target.alert_id)["severity"] == "low"
    res = actions.restore(console, target.alert_id, "lead", note="new campaign, look again")
    assert res.message.startswith("severity restored from low to medium by lead")
    row = queries.get_alert(store, target.alert_id)
    ev = queries.alert_json(row)["evidence"]
    assert row["severity"] == "medium" and row["severity_rank"] == 2 and ev["held"]["restored_by"] == "lead"
    assert row["reasons"][-1].startswith("severity restored to medium by lead")
    assert [a["action"] for a in queries.actions_of(store, target.alert_id)] == ["restore"]
    with pytest.raises(actions.Refused, match="already restored"):
        actions.restore(console, target.alert_id, "lead")
    plain = next(a for a in world["first"].raised() if a.src_ip in world["abusers"])
    with pytest.raises(actions.Refused, match="was not held"):
        actions.restore(console, plain.alert_id, "lead")


def test_a_failing_model_holds_nothing_and_detection_goes_on(world, monkeypatch):
    from smtpguard.detectors.repeats import RepeatHold
    from smtpguard.models import verdicts

    cfg = world["cfg"]
    feats, held, finding = _newsletter(world)
    hold = RepeatHold(verdicts.models_folder(cfg.data_dir), cfg.detect.hold_repeats_below)
    hold.refresh(world["store"])

    def broken(self, feats):
        raise ValueError("input has NaN")

    monkeypatch.setattr(verdicts.Model, "probability", broken)
    f = finding(held.evidence["held"]["dismissed_top_score"])
    assert hold.hold([f], feats) == 0 and hold.failures == 1
    assert f.severity is None and "held" not in f.evidence and f.reasons == ["x"]


def test_a_model_an_earlier_release_made_is_not_used_and_retraining_replaces_it(world, capsys):
    """A promoted artifact of another kind: the queue still works (without likelihoods), nothing is held,
    and `model train --supervised` promotes a new model, saying why."""
    import json
    import shutil

    from smtpguard.cli.model import _train_supervised
    from smtpguard.console import queries
    from smtpguard.detectors.repeats import RepeatHold
    from smtpguard.models import verdicts

    cfg, store = world["cfg"], world["store"]
    models = verdicts.models_folder(cfg.data_dir)
    old = models / "verdicts-0-earlier"
    shutil.copytree(models / "verdicts-1", old)
    card = json.loads((old / "card.json").read_text())
    card["kind"] = "verdicts-logistic-v1"
    (old / "card.json").write_text(json.dumps(card))
    verdicts.promote(models, old)
    ranker = queries.VerdictRanker(models)
    assert ranker.model() is None
    page = queries.alert_queue(store, queries.AlertFilter(severity="medium"), ranker)
    assert page.alerts and all(a.get("confirm_probability") is None for a in page.alerts)
    feats, held, finding = _newsletter(world)
    hold = RepeatHold(models, cfg.detect.hold_repeats_below)
    hold.refresh(store)
    f = finding(held.evidence["held"]["dismissed_top_score"])
    assert hold.hold([f], feats) == 0 and f.severity is None and hold.failures == 0
    _train_supervised(cfg, None, None, None, 0)
    assert "the current model verdicts-0-earlier is one this version cannot use" in capsys.readouterr().err
    assert verdicts.current_dir(models).name.startswith("verdicts-2")  # a new artifact, named by its time
    assert ranker.model() is not None
