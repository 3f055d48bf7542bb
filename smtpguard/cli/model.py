"""``smtpguard model``: train and evaluate the anomaly model over features in the store."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click
import numpy as np
import polars as pl

from smtpguard.core.errors import SmtpguardError


def _windows_between(column: str, since: dt.datetime | None, until: dt.datetime | None
                     ) -> tuple[list[str], dict[str, dt.datetime]]:
    """SQL conditions (and their parameters) keeping ``column`` in [since, until)."""
    where, params = [], {}
    if since:
        where.append(column + " >= {since:DateTime64(3, 'UTC')}")
        params["since"] = since
    if until:
        where.append(column + " < {until:DateTime64(3, 'UTC')}")
        params["until"] = until
    return where, params


def load_features(store, since: dt.datetime | None, until: dt.datetime | None) -> pl.DataFrame:
    where, params = _windows_between("window_start", since, until)
    where = where or ["1"]
    df = store.query_df(f"SELECT * FROM {store.database}.window_features FINAL WHERE {' AND '.join(where)}", params)
    return pl.from_pandas(df) if len(df) else pl.DataFrame()


def _kind(model_dir: str) -> str | None:
    try:
        return json.loads((Path(model_dir) / "card.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def load_labels(path: str) -> dict[str, int]:
    """ip -> 1 (abusive) / 0 (benign), from a truth.json list or a CSV with ip,label columns."""
    p = Path(path)
    if p.suffix == ".json":
        rows = json.loads(p.read_text())
    else:
        import csv

        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    try:
        return {r["ip"]: int(str(r["label"]) not in ("benign", "0", "false", "")) for r in rows}
    except (KeyError, TypeError) as e:
        raise SmtpguardError(f"labels file {path} needs ip and label fields: {e}") from None


def load_verdicts(store, since: dt.datetime | None = None, until: dt.datetime | None = None
                  ) -> tuple[pl.DataFrame, np.ndarray]:
    """The window features of reviewed source alerts and their verdicts (1 confirmed, 0 dismissed): one
    row per (source, window), the latest verdict where alerts of several detectors were reviewed, in
    ``detector`` the kind of alert that verdict was given on, and the verdicts on the source's earlier
    alerts of that kind (:data:`~smtpguard.models.verdicts.EARLIER`)."""
    from smtpguard.models.verdicts import LABELS, REVIEW_LABELS, labels_of, load_history, with_earlier

    db = store.database
    where, params = _windows_between("l.window_start", since, until)
    where += ["l.src_ip IS NOT NULL", f"l.label IN ({', '.join(repr(k) for k in LABELS)})"]
    df = store.query_df(f"""
SELECT * FROM (
    SELECT assumeNotNull(src_ip) AS src_ip, window_start, argMax(label, at) AS verdict,
        argMax(detector, at) AS detector
    FROM (SELECT * FROM {db}.{REVIEW_LABELS} FINAL) AS l
    WHERE {' AND '.join(where)} GROUP BY src_ip, window_start) AS l
INNER JOIN (SELECT * FROM {db}.window_features FINAL) AS f USING (src_ip, window_start)
ORDER BY window_start, src_ip""", params)
    if not len(df):
        return pl.DataFrame(), np.zeros(0, np.int64)
    frame = pl.from_pandas(df)
    frame = with_earlier(frame, load_history(store), frame["detector"].to_list())
    return frame.drop("verdict"), labels_of(frame["verdict"].to_list())


@click.group("model")
def model_group() -> None:
    """Train and evaluate the anomaly model (models/anomaly.py) over window features in the store, and the
    supervised model of the team's verdicts (models/verdicts.py) over the alerts reviewed in the console."""


def _when(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    from smtpguard.core.exemptions import parse_time

    try:
        return parse_time(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None


@model_group.command("train")
@click.option("--since", metavar="TIME", help="first window to train on (ISO 8601)")
@click.option("--until", metavar="TIME", help="end of the training window (ISO 8601)")
@click.option("--out", "out_dir", metavar="DIR", help="artifact folder (default: DATA_DIR/models/anomaly-<time>)")
@click.option("--seed", default=0, show_default=True)
@click.option("--supervised", is_flag=True,
              help="train the model of the team's verdicts on the alerts confirmed and dismissed in the console; "
                   "it is promoted (DATA_DIR/models/verdicts-current) only if it does no worse on the hold-out "
                   "than the current one")
@click.option("--every", metavar="INTERVAL", help="with --supervised: train again every INTERVAL (e.g. 24h) until "
                                                   "Ctrl-C or SIGTERM, promoting only what does no worse")
@click.pass_obj
def train_cmd(c, since: str | None, until: str | None, out_dir: str | None, seed: int, supervised: bool,
              every: str | None) -> None:
    """Train the anomaly model on stored window features and write the artifact with its card.

    \b
    smtpguard model train                           # the anomaly model over every stored window
    smtpguard model train --supervised              # the verdicts model over the reviewed alerts
    smtpguard model train --supervised --every 24h  # ... retrained daily, like the audits
    """
    if every and not supervised:
        raise click.BadParameter("is for the verdicts model: add --supervised", param_hint="--every")
    if every and out_dir:
        raise click.BadParameter("a schedule writes into DATA_DIR/models; leave out --out", param_hint="--every")
    if supervised:
        s, u = _when(since), _when(until)
        if not every:
            _train_supervised(c.cfg, s, u, out_dir, seed)
            return
        from smtpguard.core.errors import InputError
        from smtpguard.core.lifecycle import Shutdown
        from smtpguard.response.audit import parse_interval

        try:
            interval = parse_interval(every)
        except InputError as e:
            raise click.BadParameter(str(e), param_hint="--every") from None
        with Shutdown(name="smtpguard model train") as stop:
            while not stop.event.is_set():
                try:
                    _train_supervised(c.cfg, s, u, None, seed)
                except SmtpguardError as e:
                    # too few verdicts yet, or the store busy: the next run tries again
                    click.echo(f"smtpguard: training failed: {e}", err=True)
                stop.wait(interval)
        click.echo("smtpguard: scheduled training stopped", err=True)
        return
    from smtpguard.models import verdicts
    from smtpguard.models.anomaly import save, train
    from smtpguard.core.store import Store

    from smtpguard.ingest.reader import step_bar

    cfg = c.cfg
    s, u = _when(since), _when(until)
    with step_bar("model train", 3, "step") as bar:
        bar.set_postfix_str("reading window features", refresh=True)
        with Store(cfg.store_dsn, cfg.store.database) as store:
            feats = load_features(store, s, u)
        bar.update(1)
        bar.set_postfix_str(f"fitting on {len(feats):,} windows", refresh=True)
        model = train(feats, window=(since, until), seed=seed)
        bar.update(1)
        out = Path(out_dir) if out_dir else verdicts.models_folder(cfg.data_dir) / f"anomaly-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
        bar.set_postfix_str("writing the artifact", refresh=True)
        save(model, out)
        bar.update(1)
    click.echo(str(out))
    click.echo(f"trained on {model.card.rows:,} windows; score p50 {model.card.metrics['train_score_p50']:.3f}, "
               f"p99 {model.card.metrics['train_score_p99']:.3f}. Use it with\n"
               f"  [detect.detectors.anomaly_model]\n  model_dir = \"{out}\"", err=True)


def _train_supervised(cfg, since, until, out_dir: str | None, seed: int) -> None:
    from smtpguard.core.store import Store
    from smtpguard.ingest.reader import step_bar
    from smtpguard.models import verdicts

    models_dir = verdicts.models_folder(cfg.data_dir)
    with step_bar("model train --supervised", 4, "step") as bar:
        bar.set_postfix_str("reading the reviewed alerts", refresh=True)
        with Store(cfg.store_dsn, cfg.store.database) as store:
            feats, y = load_verdicts(store, since, until)
        bar.update(1)
        bar.set_postfix_str(f"fitting on {len(y):,} reviewed windows", refresh=True)
        model, hold = verdicts.train(feats, y, seed=seed)
        bar.update(1)
        bar.set_postfix_str("comparing with the current model", refresh=True)
        cur_dir = verdicts.current_dir(models_dir)
        current = verdicts.load_usable(cur_dir) if cur_dir is not None else None
        verdict = verdicts.compare(model, current, feats[hold], y[hold])
        if cur_dir is not None and current is None:
            verdict.message = verdict.message.replace(
                "no current model", f"the current model {cur_dir.name} is one this version cannot use")
        model.card.metrics["promotion"] = {"promoted": verdict.promoted, "current": cur_dir.name if cur_dir else None,
                                           "current_average_precision": verdict.current_ap}
        bar.update(1)
        out = Path(out_dir) if out_dir else models_dir / f"verdicts-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
        verdicts.save(model, out)
        if verdict.promoted and out.parent.resolve() == models_dir.resolve():
            verdicts.promote(models_dir, out)
        bar.update(1)
    h = model.card.metrics["holdout"]
    click.echo(str(out))
    click.echo(f"trained on {model.card.rows:,} reviewed windows, judged on the {h['windows']} most recent "
               f"({h['confirmed']} confirmed, {h['dismissed']} dismissed): average precision "
               f"{verdicts._fmt(h['average_precision'])}, precision {verdicts._fmt(h['precision'])}, recall "
               f"{verdicts._fmt(h['recall'])} at 0.5; the rules on the same alerts: precision "
               f"{verdicts._fmt(h['rules']['precision'])}, recall 1.000", err=True)
    click.echo(verdict.message, err=True)


@model_group.command("evaluate")
@click.argument("model_dir")
@click.option("--since", metavar="TIME")
@click.option("--until", metavar="TIME")
@click.option("--labels", metavar="FILE", help="truth.json or CSV with ip,label: adds precision and recall per window")
@click.option("--threshold", default=0.7, show_default=True, help="model score counted as a detection")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def evaluate_cmd(c, model_dir: str, since: str | None, until: str | None, labels: str | None, threshold: float,
                 as_json: bool) -> None:
    """Score stored window features with a trained model and report its metrics.

    A verdicts artifact (``model train --supervised``) is judged on the reviewed alerts of the store
    (between --since and --until), against the rule detectors on the same alerts.
    """
    from smtpguard.models.anomaly import evaluate, load
    from smtpguard.models import verdicts
    from smtpguard.core.store import Store

    if _kind(model_dir) == verdicts.MODEL_KIND:
        vm = verdicts.load(model_dir)
        with Store(c.cfg.store_dsn, c.cfg.store.database) as store:
            feats, y = load_verdicts(store, _when(since), _when(until))
        if not len(y):
            raise SmtpguardError("no reviewed alerts in the store to evaluate on (confirm and dismiss alerts first)")
        report = verdicts.metrics(vm.probability(feats), y)
        report["card"] = {k: getattr(vm.card, k) for k in ("kind", "trained_at", "rows", "training_window")}
        click.echo(json.dumps(report, default=str) if as_json else
                   "\n".join(f"{k:18} {v}" for k, v in report.items()))
        return
    model = load(model_dir)
    with Store(c.cfg.store_dsn, c.cfg.store.database) as store:
        feats = load_features(store, _when(since), _when(until))
    y = None
    if labels:
        lab = load_labels(labels)
        y = np.array([lab.get(ip, 0) for ip in feats["src_ip"].to_list()]) if feats.height else np.zeros(0)
    report = evaluate(model, feats, y, threshold)
    report["card"] = {k: getattr(model.card, k) for k in ("kind", "trained_at", "rows", "training_window", "versions")}
    if as_json:
        click.echo(json.dumps(report))
    else:
        for k, v in report.items():
            click.echo(f"{k:16} {v}")
