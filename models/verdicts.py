"""A supervised model of the security team's verdicts: confirmed alerts are abuse, dismissed ones
benign.

Trained on the window features of reviewed alerts (the console's ``review_labels``, joined to
the detector's ``window_features`` by source and window), it estimates how likely a person is to
confirm an alert that looks like this one. It never raises an alert: the rule detectors do.

Model
    The features of :data:`smtpguard.models.anomaly.FEATURES` (one definition, one
    :func:`~smtpguard.models.anomaly.matrix`), log-scaled and standardised, a logistic
    regression with balanced class weights (the team confirms far more than it dismisses, or the
    other way round), calibrated with Platt scaling (``CalibratedClassifierCV``) so that its
    probability can be read as one.

Hold-out
    The labelled windows are ordered by window time; the last :data:`HOLDOUT_SHARE` are held out
    (a model is judged on verdicts that came after the ones it learned from, as it will be used).
    The card carries the hold-out's average precision, precision and recall at 0.5, the Brier
    score, and the rule detectors' numbers on the same windows (every one of them was an alert:
    precision = the share confirmed, recall 1).

Promotion (:func:`promote`)
    A new artifact replaces the current one only when its average precision on its hold-out is at
    least the current model's on the same windows; otherwise it is kept beside it and refused, with
    both numbers.

Artifacts are folders like the anomaly model's (``model.skops`` loaded with an explicit list of
trusted types, ``card.json`` with the SHA-256): :func:`smtpguard.models.anomaly.save_artifact`.
"""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from smtpguard.core.errors import SmtpguardError

from .anomaly import FEATURES, Card, load_artifact, matrix, save_artifact

MODEL_KIND = "verdicts-logistic-v1"
#: the most recent share of labelled windows held out to judge a model
HOLDOUT_SHARE = 0.3
#: confirmed and dismissed windows each needed in the training part (and one of each held out)
MIN_PER_CLASS = 5
#: labels as the console stores them -> class
LABELS = {"confirmed": 1, "false_positive": 0}
TRUSTED_TYPES = [
    "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration",
    "sklearn.calibration.CalibratedClassifierCV", "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.pipeline.Pipeline", "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._function_transformer.FunctionTransformer", "numpy.log1p",
]


@dataclass
class Model:
    pipeline: Any
    card: Card

    def probability(self, feats: pl.DataFrame) -> np.ndarray:
        """The calibrated probability that a person confirms each window's alert."""
        if feats.height == 0:
            return np.zeros(0)
        return self.pipeline.predict_proba(matrix(feats))[:, 1]


def labels_of(values: list[str] | pl.Series) -> np.ndarray:
    """1 for confirmed, 0 for false_positive (other labels raise)."""
    try:
        return np.array([LABELS[v] for v in values], dtype=np.int64)
    except KeyError as e:
        raise SmtpguardError(f"unknown review label {e.args[0]!r}; known: {', '.join(LABELS)}") from None


def split(feats: pl.DataFrame, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training part and of the hold-out (the most recent :data:`HOLDOUT_SHARE` by window
    time); raises when either lacks labels of a class."""
    order = (np.argsort(feats["window_start"].cast(pl.Int64).to_numpy(), kind="stable") if len(y)
             else np.zeros(0, np.int64))
    cut = int(round(len(order) * (1 - HOLDOUT_SHARE)))
    train, hold = order[:cut], order[cut:]
    pos, neg = int(y[train].sum()), int(len(train) - y[train].sum())
    if pos < MIN_PER_CLASS or neg < MIN_PER_CLASS or len(set(y[hold].tolist())) < 2:
        raise SmtpguardError(
            f"too few verdicts to train on: {int(y.sum())} confirmed and {int(len(y) - y.sum())} dismissed windows "
            f"({pos} and {neg} before the hold-out); the model needs at least {MIN_PER_CLASS} of each before the "
            f"most recent {HOLDOUT_SHARE:.0%}, and both kinds in it (confirm and dismiss more alerts in the console)")
    return train, hold


def build_pipeline(folds: int, seed: int = 0):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    base = Pipeline([
        ("log", FunctionTransformer(np.log1p)),
        ("scale", StandardScaler()),
        ("logistic", LogisticRegression(class_weight="balanced", max_iter=1000, random_state=seed)),
    ])
    return CalibratedClassifierCV(base, method="sigmoid", cv=folds)


def metrics(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Average precision, precision and recall at 0.5 and the Brier score of probabilities ``p``, and
    the rule detectors' precision and recall on the same alerts."""
    from sklearn.metrics import average_precision_score, brier_score_loss

    pred = p >= 0.5
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    fn = int((~pred & (y == 1)).sum())
    return {
        "windows": int(len(y)), "confirmed": int(y.sum()), "dismissed": int(len(y) - y.sum()),
        "average_precision": float(average_precision_score(y, p)) if 0 < y.sum() < len(y) else None,
        "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
        "brier": float(brier_score_loss(y, p)),
        "rules": {"precision": float(y.mean()) if len(y) else None, "recall": 1.0 if y.sum() else None},
    }


def train(feats: pl.DataFrame, y: np.ndarray, *, seed: int = 0) -> tuple[Model, np.ndarray]:
    """Fit on the older labelled windows and judge on the most recent; returns the model (fitted on the
    training part only, so its card's hold-out numbers are its own) and the hold-out indices."""
    import sklearn

    y = np.asarray(y, dtype=np.int64)
    tr, hold = split(feats, y)
    folds = int(min(3, y[tr].sum(), len(tr) - y[tr].sum()))
    pipe = build_pipeline(folds, seed)
    pipe.fit(matrix(feats[tr]), y[tr])
    model = Model(pipe, Card(
        kind=MODEL_KIND, features=list(FEATURES),
        trained_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        training_window={"from": _iso(feats[tr]["window_start"].min()), "to": _iso(feats[tr]["window_start"].max())},
        rows=int(len(tr)),
        versions={"scikit-learn": sklearn.__version__, "numpy": np.__version__, "python": platform.python_version()},
        metrics={"labels": {"train": {"confirmed": int(y[tr].sum()), "dismissed": int(len(tr) - y[tr].sum())},
                            "holdout": {"confirmed": int(y[hold].sum()), "dismissed": int(len(hold) - y[hold].sum())}},
                 "holdout_window": {"from": _iso(feats[hold]["window_start"].min()),
                                    "to": _iso(feats[hold]["window_start"].max())},
                 "holdout": {}},
    ))
    model.card.metrics["holdout"] = metrics(model.probability(feats[hold]), y[hold])
    return model, hold


def _iso(v: Any) -> str | None:
    return v.isoformat() if isinstance(v, dt.datetime) else (None if v is None else str(v))


def save(model: Model, directory: str | Path) -> Path:
    return save_artifact(model.pipeline, model.card, directory)


def load(directory: str | Path) -> Model:
    """Load an artifact folder; refuses a changed file, another kind or feature list, untrusted types."""
    pipe, card = load_artifact(directory, MODEL_KIND, FEATURES, TRUSTED_TYPES)
    return Model(pipe, card)


@dataclass
class Promotion:
    promoted: bool
    candidate_ap: float | None
    current_ap: float | None
    message: str


def compare(candidate: Model, current: Model | None, feats: pl.DataFrame, y: np.ndarray) -> Promotion:
    """Whether ``candidate`` may replace ``current``: its average precision on these (hold-out) windows
    is at least the current model's on the same windows."""
    cand = metrics(candidate.probability(feats), y)["average_precision"]
    if current is None:
        return Promotion(True, cand, None, f"promoted: hold-out average precision {_fmt(cand)}; no current model")
    cur = metrics(current.probability(feats), y)["average_precision"]
    if cand is not None and (cur is None or cand >= cur):
        return Promotion(True, cand, cur, f"promoted: hold-out average precision {_fmt(cand)} >= the current "
                                          f"model's {_fmt(cur)} on the same {len(y)} windows")
    return Promotion(False, cand, cur, f"not promoted: hold-out average precision {_fmt(cand)} is worse than the "
                                       f"current model's {_fmt(cur)} on the same {len(y)} windows; the current "
                                       "model stays")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


#: the file in a models folder that names the promoted verdicts artifact
CURRENT = "verdicts-current"
#: artifacts kept in a models folder (the promoted one is never removed)
KEEP = 5


def current_dir(models_dir: Path) -> Path | None:
    """The promoted artifact of ``models_dir``, or None."""
    f = models_dir / CURRENT
    if not f.is_file():
        return None
    d = models_dir / f.read_text().strip()
    return d if d.is_dir() else None


def promote(models_dir: Path, artifact: Path) -> None:
    """Make ``artifact`` (a folder in ``models_dir``) the current one, and keep the last :data:`KEEP`."""
    tmp = models_dir / (CURRENT + ".tmp")
    tmp.write_text(artifact.name + "\n")
    tmp.replace(models_dir / CURRENT)
    prune(models_dir)


def prune(models_dir: Path) -> list[Path]:
    """Remove all but the newest :data:`KEEP` verdicts artifacts (never the current one); returns those removed."""
    import shutil

    keep = current_dir(models_dir)
    arts = sorted((d for d in models_dir.glob("verdicts-*") if d.is_dir()), key=lambda d: d.name, reverse=True)
    gone = [d for d in arts[KEEP:] if d != keep]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone
