"""The supervised model of the team's verdicts (models/verdicts.py, `smtpguard model train --supervised`):
labels made with the console's own actions on a generated store (every alert on an abuser confirmed,
every alert on a benign source dismissed), trained and judged on the most recent verdicts, promoted
only when it does no worse than the current model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smtpguard.core.store import Store

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))


def run(cfg, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    env.update(SMTPGUARD_DATA_DIR=cfg.data_dir, SMTPGUARD_STORE__DATABASE=cfg.store.database,
               SMTPGUARD_STORE__DSN=cfg.store_dsn)
    return subprocess.run([SMTPGUARD, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    import console_data
    from conftest import make_config
    from smtpguard.console import actions

    tmp = tmp_path_factory.mktemp("verdicts")
    cfg = make_config(tmp)
    with Store(cfg.store_dsn, cfg.store.database) as store:
        filled = console_data.fill(store, cfg, tmp / "scenario", instances=300, minutes=120)
        console = actions.Console(cfg, store)
        done = {"confirmed": 0, "false_positive": 0}
        for a in filled.alerts:
            if a.src_ip is None:
                continue
            if a.src_ip in filled.truth:
                actions.confirm(console, a.alert_id, "reviewer")
                done["confirmed"] += 1
            else:
                actions.dismiss(console, a.alert_id, "reviewer", note="newsletter, known sender")
                done["false_positive"] += 1
    assert done["confirmed"] >= 10 and done["false_positive"] >= 20, done
    return cfg, filled


def _labelled(cfg):
    from smtpguard.cli.model import load_verdicts

    with Store(cfg.store_dsn, cfg.store.database) as store:
        return load_verdicts(store)


def test_verdicts_made_in_the_console_are_the_training_labels(reviewed):
    cfg, filled = reviewed
    feats, y = _labelled(cfg)
    windows = {(a.src_ip, a.window_start_ms) for a in filled.alerts if a.src_ip}
    assert len(y) == len(windows) == feats.height
    abusive = {ip for ip in filled.truth}
    got = dict(zip(feats["src_ip"].to_list(), y.tolist()))
    assert all(got[ip] == (1 if ip in abusive else 0) for ip in got)
    assert {"connections", "distinct_dst", "new_dst_share"} <= set(feats.columns)


def test_train_supervised_writes_its_card_and_promotes_the_first_model(reviewed):
    from smtpguard.models import verdicts

    cfg, _ = reviewed
    r = run(cfg, "model", "train", "--supervised")
    assert r.returncode == 0, r.stderr
    out = Path(r.stdout.strip().splitlines()[-1])
    assert "promoted: hold-out average precision" in r.stderr and "no current model" in r.stderr, r.stderr
    models = Path(cfg.data_dir) / "models"
    assert verdicts.current_dir(models) == out
    card = json.loads((out / "card.json").read_text())
    assert card["kind"] == verdicts.MODEL_KIND and card["features"] and len(card["sha256"]) == 64
    labels = card["metrics"]["labels"]
    feats, y = _labelled(cfg)
    assert sum(labels["train"].values()) + sum(labels["holdout"].values()) == len(y)
    assert labels["holdout"]["confirmed"] >= 1 and labels["holdout"]["dismissed"] >= 1
    hold = card["metrics"]["holdout"]
    assert hold["windows"] == sum(labels["holdout"].values())
    # the rules raised every one of these alerts: their precision is the share the team confirmed
    assert hold["rules"]["precision"] == pytest.approx(labels["holdout"]["confirmed"] / hold["windows"])
    # the model ranks what the team confirms above what it dismisses, better than the rules' flat "all"
    assert hold["average_precision"] > hold["rules"]["precision"], hold
    assert card["training_window"]["to"] <= card["metrics"]["holdout_window"]["from"]
    m = verdicts.load(out)
    p = m.probability(feats)
    assert ((p >= 0) & (p <= 1)).all() and p[y == 1].mean() > p[y == 0].mean()


def test_model_evaluate_judges_a_verdicts_artifact_against_the_rules(reviewed, tmp_path):
    from smtpguard.models import verdicts

    cfg, _ = reviewed
    feats, y = _labelled(cfg)
    model, _hold = verdicts.train(feats, y)
    verdicts.save(model, tmp_path / "m")
    r = run(cfg, "model", "evaluate", str(tmp_path / "m"), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["windows"] == len(y) and rep["confirmed"] == int(y.sum())
    assert rep["rules"]["recall"] == 1.0 and rep["average_precision"] > rep["rules"]["precision"]


def test_a_promotion_with_worse_holdout_metrics_is_refused(reviewed):
    """A model trained on scrambled verdicts does worse on the real hold-out than the current one: it is
    refused and the current model stays."""
    from smtpguard.models import verdicts

    cfg, _ = reviewed
    feats, y = _labelled(cfg)
    current, hold = verdicts.train(feats, y)
    worse, _ = verdicts.train(feats, np.random.default_rng(3).permutation(y))
    v = verdicts.compare(worse, current, feats[hold], y[hold])
    assert not v.promoted and v.candidate_ap < v.current_ap
    assert v.message.startswith("not promoted") and f"{v.current_ap:.3f}" in v.message
    same = verdicts.compare(current, current, feats[hold], y[hold])
    assert same.promoted  # no worse is good enough


def test_retraining_compares_with_the_current_model_and_keeps_the_last_artifacts(reviewed):
    """A second training on the same verdicts is judged against the promoted model on the same hold-out
    (no worse: promoted); older artifacts beyond the last few are removed, never the current one."""
    from smtpguard.models import verdicts

    cfg, _ = reviewed
    models = Path(cfg.data_dir) / "models"
    first = run(cfg, "model", "train", "--supervised")
    assert first.returncode == 0, first.stderr
    second = run(cfg, "model", "train", "--supervised")
    assert second.returncode == 0, second.stderr
    assert ">= the current model's" in second.stderr, second.stderr
    out = Path(second.stdout.strip().splitlines()[-1])
    assert verdicts.current_dir(models) == out
    card = json.loads((out / "card.json").read_text())
    assert card["metrics"]["promotion"]["current"] == Path(first.stdout.strip().splitlines()[-1]).name
    for _ in range(verdicts.KEEP):
        assert run(cfg, "model", "train", "--supervised").returncode == 0
    kept = sorted(d.name for d in models.glob("verdicts-*") if d.is_dir())
    assert len(kept) == verdicts.KEEP and verdicts.current_dir(models).name in kept


def test_the_queue_ranks_by_the_verdicts_model_once_one_is_promoted(reviewed):
    """With a promoted model every alert shows how likely the team is to confirm it, and the queue can be
    ordered by it: what the team confirms comes first; newest-first stays the default order."""
    from smtpguard.console import queries
    from smtpguard.core.errors import InputError
    from smtpguard.models import verdicts

    cfg, filled = reviewed
    models = Path(cfg.data_dir) / "models"
    if verdicts.current_dir(models) is None:
        assert run(cfg, "model", "train", "--supervised").returncode == 0
    ranker = queries.VerdictRanker(models)
    empty = queries.VerdictRanker(Path(cfg.data_dir) / "no-models")
    every = queries.AlertFilter(per_page=1000)
    with Store(cfg.store_dsn, cfg.store.database) as store:
        plain = queries.alert_queue(store, every)
        newest = queries.alert_queue(store, every, ranker)
        likely = queries.alert_queue(store, queries.AlertFilter(per_page=1000, order="likely"), ranker)
        paged = [queries.alert_queue(store, queries.AlertFilter(per_page=10, page=n, order="likely"), ranker)
                 for n in (1, 2)]
        with pytest.raises(InputError, match="model train --supervised"):
            queries.alert_queue(store, queries.AlertFilter(order="likely"), empty)
    ids = [a["alert_id"] for a in plain.alerts]
    assert [a["alert_id"] for a in newest.alerts] == ids  # the default order does not change
    assert all(a.get("confirm_probability") is None for a in plain.alerts)
    p = [a["confirm_probability"] for a in likely.alerts if a["src_ip"]]
    assert p and all(x is not None for x in p) and p == sorted(p, reverse=True)
    assert sorted(a["alert_id"] for a in likely.alerts) == sorted(ids)
    assert [a["alert_id"] for a in paged[0].alerts + paged[1].alerts] == [a["alert_id"] for a in likely.alerts][:20]
    rank = {a["alert_id"]: i for i, a in enumerate(likely.alerts)}
    abusive = [rank[a.alert_id] for a in filled.alerts if a.src_ip in filled.truth]
    benign = [rank[a.alert_id] for a in filled.alerts if a.src_ip and a.src_ip not in filled.truth]
    assert np.mean(abusive) < np.mean(benign) and min(abusive) == 0, (abusive, benign)


def test_the_console_shows_and_orders_by_the_likelihood(reviewed):
    from fastapi.testclient import TestClient

    from smtpguard.console.app import create_app
    from smtpguard.console.auth import ApiTokens, Users
    from smtpguard.models import verdicts

    cfg, filled = reviewed
    if verdicts.current_dir(Path(cfg.data_dir) / "models") is None:
        assert run(cfg, "model", "train", "--supervised").returncode == 0
    with Store(cfg.store_dsn, cfg.store.database) as store:
        token = ApiTokens(store).issue(Users(store).add("ranker", "viewer", "correct horse battery", "test"), "t")
        cl = TestClient(create_app(cfg, store), headers={"Authorization": f"Bearer {token}"})
        r = cl.get("/api/alerts", params={"order": "likely", "per_page": 5})
        assert r.status_code == 200, r.text
        got = r.json()["alerts"]
        assert len(got) == 5 and all(a["src_ip"] in filled.truth for a in got[:1])
        assert [a["confirm_probability"] for a in got] == sorted((a["confirm_probability"] for a in got), reverse=True)
        page = cl.get("/alerts", params={"order": "likely"})
        assert page.status_code == 200 and ">Likely<" in page.text and "most likely confirmed first" in page.text
        assert cl.get("/api/alerts", params={"order": "worst"}).status_code == 400
        # an alert of a source whose earlier alerts of that detector the team dismissed says so, with its likelihood
        by_key: dict = {}
        for a in filled.alerts:
            if a.src_ip and a.src_ip not in filled.truth:
                by_key.setdefault((a.src_ip, a.detector), []).append(a)
        repeats = max(by_key.values(), key=len)
        assert len(repeats) >= 2, "the store has no benign source alerted twice by one detector"
        last = max(repeats, key=lambda a: a.window_start_ms)
        body = cl.get(f"/api/alerts/{last.alert_id}").json()
        earlier = sum(1 for a in repeats if a.window_start_ms < last.window_start_ms)
        assert body["earlier_verdicts"] == {"false_positive": earlier}, body["earlier_verdicts"]
        assert 0 <= body["alert"]["confirm_probability"] <= 1
        html = cl.get(f"/alerts/{last.alert_id}").text
        assert f"{earlier} dismissed, 0 confirmed" in html and 'id="likely"' in html


def test_scheduled_training_runs_until_sigterm(reviewed):
    """`model train --supervised --every 24h` trains at once, waits, and stops cleanly on SIGTERM."""
    import signal
    import time

    from smtpguard.models import verdicts

    cfg, _ = reviewed
    models = Path(cfg.data_dir) / "models"
    before = {d.name for d in models.glob("verdicts-*")} if models.exists() else set()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    env.update(SMTPGUARD_DATA_DIR=cfg.data_dir, SMTPGUARD_STORE__DATABASE=cfg.store.database,
               SMTPGUARD_STORE__DSN=cfg.store_dsn)
    p = subprocess.Popen([SMTPGUARD, "model", "train", "--supervised", "--every", "24h"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and verdicts.current_dir(models) is None or \
                {d.name for d in models.glob("verdicts-*")} <= before:
            assert p.poll() is None, p.communicate()
            time.sleep(0.5)
        time.sleep(2)  # past the run's writes, into the wait
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "promoted" in err and "scheduled training stopped" in err, err
    assert {d.name for d in models.glob("verdicts-*")} - before


def test_every_without_supervised_is_a_usage_error(tmp_path):
    from conftest import make_config

    r = run(make_config(tmp_path), "model", "train", "--every", "24h")
    assert r.returncode == 2 and "--supervised" in r.stderr


def test_too_few_verdicts_is_one_clear_error(tmp_path):
    from conftest import make_config

    cfg = make_config(tmp_path)
    with Store(cfg.store_dsn, cfg.store.database):
        pass
    r = run(cfg, "model", "train", "--supervised")
    assert r.returncode == 1 and "too few verdicts" in r.stderr and "confirm and dismiss" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_notebook_03_trains_and_judges_the_verdicts_model(reviewed, tmp_path):
    """The analysts' notebook trains the verdicts model on the labels made in the console, with the same
    hold-out numbers as `model train --supervised`, and plots precision/recall by threshold and the weights."""
    from test_notebooks import NOTEBOOK_DIR, execute, found, images, text

    from smtpguard.models import verdicts

    cfg, _ = reviewed
    feats, y = _labelled(cfg)
    model, _hold = verdicts.train(feats, y)
    h = model.card.metrics["holdout"]
    nb = execute(NOTEBOOK_DIR / "03-tune-and-train.ipynb", cfg.store_dsn, MODEL_DIR=str(tmp_path / "model"),
                 DATABASE=cfg.store.database)
    out = text(nb)
    assert f"{len(y)} reviewed windows: {int(y.sum())} confirmed" in out
    assert (f"Verdicts model: trained on {model.card.rows} reviewed windows, judged on the {h['windows']} most recent: "
            f"average precision {h['average_precision']:.2f} against the rules' {h['rules']['precision']:.2f}") in out
    assert int(found(r"PR curve over (\d+) thresholds", out)) >= 2
    assert found(r"Towards confirm: (\w+);", out) in verdicts.INPUTS
    assert images(nb) >= 4  # the sweep, the anomaly scores, precision/recall by threshold, the weights
