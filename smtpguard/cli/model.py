"""``smtpguard model``: train and evaluate the anomaly model over features in the store."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click
import numpy as np
import polars as pl

from smtpguard.core.errors import SmtpguardError


def load_features(store, since: dt.datetime | None, until: dt.datetime | None) -> pl.DataFrame:
    where, params = ["1"], {}
    if since:
        where.append("window_start >= {since:DateTime64(3, 'UTC')}")
        params["since"] = since
    if until:
        where.append("window_start < {until:DateTime64(3, 'UTC')}")
        params["until"] = until
    df = store.query_df(f"SELECT * FROM {store.database}.window_features FINAL WHERE {' AND '.join(where)}", params)
    return pl.from_pandas(df) if len(df) else pl.DataFrame()


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


@click.group("model")
def model_group() -> None:
    """Train and evaluate the anomaly model (models/anomaly.py) over window features in the store."""


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
@click.pass_obj
def train_cmd(c, since: str | None, until: str | None, out_dir: str | None, seed: int) -> None:
    """Train the anomaly model on stored window features and write the artifact with its card."""
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
        out = Path(out_dir) if out_dir else Path(cfg.data_dir) / "models" / f"anomaly-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
        bar.set_postfix_str("writing the artifact", refresh=True)
        save(model, out)
        bar.update(1)
    click.echo(str(out))
    click.echo(f"trained on {model.card.rows:,} windows; score p50 {model.card.metrics['train_score_p50']:.3f}, "
               f"p99 {model.card.metrics['train_score_p99']:.3f}. Use it with\n"
               f"  [detect.detectors.anomaly_model]\n  model_dir = \"{out}\"", err=True)


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
    """Score stored window features with a trained model and report its metrics."""
    from smtpguard.models.anomaly import evaluate, load
    from smtpguard.core.store import Store

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
