"""A supervised model of the security team's verdicts: confirmed alerts are abuse, dismissed ones
benign.

Trained on the window features of reviewed alerts (the console's ``review_labels``, joined to
the detector's ``window_features`` by source and window), it estimates how likely a person is to
confirm an alert that looks like this one. It never raises an alert: the rule detectors do.

Model
    The features of :data:`smtpguard.models.anomaly.FEATURES` (one definition, one
    :func:`~smtpguard.models.anomaly.matrix`) and :data:`EARLIER`, how the team judged the same
    source's earlier alerts of the same detector (what an analyst remembers: "this newsletter was
    dismissed nine times"), log-scaled and standardised, a logistic
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
import logging
import platform
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from smtpguard.core.errors import ConfigError, SmtpguardError

from .anomaly import FEATURES, Card, load_artifact, matrix, save_artifact

log = logging.getLogger(__name__)

MODEL_KIND = "verdicts-logistic-v2"
#: the most recent share of labelled windows held out to judge a model
HOLDOUT_SHARE = 0.3
#: confirmed and dismissed windows each needed in the training part (and one of each held out)
MIN_PER_CLASS = 5
#: labelled windows of one kind of alert (detector) the model must have learned from, both verdicts among
#: them, before it may hold that kind's repeats (:func:`knows_kind`)
MIN_PER_KIND = 5
#: the table of the team's verdicts (written by the console's confirm and dismiss)
REVIEW_LABELS = "review_labels"
#: the labels the console stores for a confirmed and for a dismissed alert
CONFIRMED, DISMISSED = "confirmed", "false_positive"
#: labels as the console stores them -> class
LABELS = {CONFIRMED: 1, DISMISSED: 0}
TRUSTED_TYPES = [
    "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration",
    "sklearn.calibration.CalibratedClassifierCV", "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.pipeline.Pipeline", "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._function_transformer.FunctionTransformer", "numpy.log1p",
]


#: the team's verdicts on the source's earlier alerts of the same detector (windows before this one)
EARLIER = ("earlier_dismissed", "earlier_confirmed")
#: the model's inputs, in order
INPUTS = tuple(FEATURES) + EARLIER


@dataclass
class Earlier:
    """The team's verdicts on one source's alerts of one detector, in window order, with the score each
    alert was raised at."""

    window_ms: list[int] = field(default_factory=list)
    dismissed: list[bool] = field(default_factory=list)
    score: list[float] = field(default_factory=list)

    def before(self, window_ms: int) -> tuple[int, int, float]:
        """(dismissed, confirmed, highest dismissed score) of the windows before ``window_ms``."""
        n = bisect_left(self.window_ms, window_ms)
        dis = [s for d, s in zip(self.dismissed[:n], self.score[:n]) if d]
        return len(dis), n - len(dis), max(dis, default=0.0)


#: (source, detector) -> its verdicts
History = dict[tuple[str, str], Earlier]


def history_version(store: Any) -> tuple:
    """Changes whenever a verdict is added (a cheap check before :func:`load_history`)."""
    return tuple(store.query(f"SELECT count(), max(at) FROM {store.database}.{REVIEW_LABELS}")[0])


def load_history(store: Any) -> History:
    """Every source alert the team confirmed or dismissed (its latest verdict), keyed by (source, detector)."""
    db = store.database
    rows = store.query(f"""
SELECT assumeNotNull(l.src_ip), l.detector, toUnixTimestamp64Milli(l.window_start), l.label = {{dismissed:String}},
       a.score
FROM (SELECT * FROM {db}.{REVIEW_LABELS} FINAL) AS l
INNER JOIN (SELECT alert_id, argMax(score, created_at) AS score FROM {db}.alerts
            WHERE alert_id IN (SELECT alert_id FROM {db}.{REVIEW_LABELS}) GROUP BY alert_id) AS a
    ON a.alert_id = l.alert_id
WHERE l.src_ip IS NOT NULL AND l.label IN {{labels:Array(String)}}
ORDER BY 1, 2, 3""", {"labels": list(LABELS), "dismissed": DISMISSED})
    out: History = {}
    for ip, det, ms, dismissed, score in rows:
        v = out.setdefault((ip, det), Earlier())
        v.window_ms.append(int(ms))
        v.dismissed.append(bool(dismissed))
        v.score.append(float(score))
    return out


def window_ms(feats: pl.DataFrame) -> list[int]:
    """Each row's window start in epoch milliseconds (a time column or already milliseconds)."""
    ws = pl.col("window_start")
    return feats.select(ws.dt.epoch("ms") if feats.schema["window_start"].is_temporal() else ws.cast(pl.Int64)
                        ).to_series().to_list()


def with_earlier(feats: pl.DataFrame, history: History, detectors: list[str]) -> pl.DataFrame:
    """``feats`` (one row per source and window) with the :data:`EARLIER` columns: the verdicts on the
    source's alerts of ``detectors[i]`` in windows before row i's."""
    counts = [history[(ip, det)].before(ms)[:2] if (ip, det) in history else (0, 0)
              for ip, det, ms in zip(feats["src_ip"].to_list(), detectors, window_ms(feats))]
    return feats.with_columns(pl.Series(EARLIER[0], [c[0] for c in counts], pl.Int64),
                              pl.Series(EARLIER[1], [c[1] for c in counts], pl.Int64))


def model_matrix(feats: pl.DataFrame) -> np.ndarray:
    """The model's input matrix: :func:`~smtpguard.models.anomaly.matrix` and the :data:`EARLIER` columns."""
    missing = [c for c in EARLIER if c not in feats.columns]
    if missing:
        raise ValueError(f"window features lack {missing}: add them with with_earlier()")
    return np.hstack([matrix(feats), feats.select([pl.col(c).cast(pl.Float64) for c in EARLIER]).to_numpy()])


@dataclass
class Model:
    pipeline: Any
    card: Card

    def probability(self, feats: pl.DataFrame) -> np.ndarray:
        """The calibrated probability that a person confirms each window's alert (``feats`` with the
        :data:`EARLIER` columns)."""
        if feats.height == 0:
            return np.zeros(0)
        return self.pipeline.predict_proba(model_matrix(feats))[:, 1]


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
    training part only, so its card's hold-out numbers are its own) and the hold-out indices. With a
    ``detector`` column (the kind of alert each window was judged on), the card counts the training
    labels per kind (:func:`knows_kind`)."""
    import sklearn

    y = np.asarray(y, dtype=np.int64)
    tr, hold = split(feats, y)
    folds = int(min(3, y[tr].sum(), len(tr) - y[tr].sum()))
    pipe = build_pipeline(folds, seed)
    pipe.fit(model_matrix(feats[tr]), y[tr])
    model = Model(pipe, Card(
        kind=MODEL_KIND, features=list(INPUTS),
        trained_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        training_window={"from": _iso(feats[tr]["window_start"].min()), "to": _iso(feats[tr]["window_start"].max())},
        rows=int(len(tr)),
        versions={"scikit-learn": sklearn.__version__, "numpy": np.__version__, "python": platform.python_version()},
        metrics={"labels": {"train": {"confirmed": int(y[tr].sum()), "dismissed": int(len(tr) - y[tr].sum())},
                            "holdout": {"confirmed": int(y[hold].sum()), "dismissed": int(len(hold) - y[hold].sum())},
                            "by_detector": _by_detector(feats, y, tr)},
                 "holdout_window": {"from": _iso(feats[hold]["window_start"].min()),
                                    "to": _iso(feats[hold]["window_start"].max())},
                 "holdout": {}},
    ))
    model.card.metrics["holdout"] = metrics(model.probability(feats[hold]), y[hold])
    return model, hold


def _by_detector(feats: pl.DataFrame, y: np.ndarray, rows: np.ndarray) -> dict[str, dict[str, int]]:
    if "detector" not in feats.columns:
        return {}
    out: dict[str, dict[str, int]] = {}
    for det, label in zip(feats["detector"].gather(rows).to_list(), y[rows].tolist()):
        c = out.setdefault(det, {"confirmed": 0, "dismissed": 0})
        c["confirmed" if label else "dismissed"] += 1
    return dict(sorted(out.items()))


def knows_kind(card: Card, detector: str) -> bool:
    """Whether the model learned enough of this kind of alert to act on it: at least :data:`MIN_PER_KIND`
    training labels of the detector, confirmed and dismissed both among them. A model whose card does
    not count labels per kind knows none."""
    c = (card.metrics.get("labels") or {}).get("by_detector", {}).get(detector)
    return bool(c) and c["confirmed"] >= 1 and c["dismissed"] >= 1 and c["confirmed"] + c["dismissed"] >= MIN_PER_KIND


def _iso(v: Any) -> str | None:
    return v.isoformat() if isinstance(v, dt.datetime) else (None if v is None else str(v))


def save(model: Model, directory: str | Path) -> Path:
    return save_artifact(model.pipeline, model.card, directory)


def load(directory: str | Path) -> Model:
    """Load an artifact folder; refuses a changed file, another kind or feature list, untrusted types."""
    pipe, card = load_artifact(directory, MODEL_KIND, INPUTS, TRUSTED_TYPES)
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


def models_folder(data_dir: str | Path) -> Path:
    """Where a deployment keeps its model artifacts: ``DATA_DIR/models``."""
    return Path(data_dir) / "models"


def load_usable(directory: str | Path) -> Model | None:
    """The artifact, or None (with a warning) when this version cannot use it: another kind or feature
    list (made by an earlier release: retrain), or a file changed since it was written."""
    try:
        return load(directory)
    except (ConfigError, OSError, ValueError) as e:
        log.warning("the verdicts model %s is not used: %s", directory, e)
        return None


class Current:
    """The promoted verdicts model of a models folder, loaded once and again whenever another one is
    promoted (the console's ranking and the detectors' repeat hold read it through this). A promoted
    artifact this version cannot use counts as none (:func:`load_usable`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._loaded: tuple[str, Model | None] | None = None

    def get(self) -> Model | None:
        d = current_dir(self.directory)
        if d is None:
            return None
        if self._loaded is None or self._loaded[0] != d.name:
            self._loaded = (d.name, load_usable(d))
        return self._loaded[1]

    @property
    def name(self) -> str | None:
        """The loaded artifact's folder name."""
        return self._loaded[0] if self._loaded else None


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
