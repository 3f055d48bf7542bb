"""The unsupervised anomaly model over window features, with its card.

One scikit-learn ``Pipeline`` (log scaling, standardisation, IsolationForest) is shared by
training (``smtpguard model train``), notebooks and the ``anomaly`` detector. An artifact is a
folder: ``model.skops`` (skops format, loaded with an explicit list of trusted types: never
a bare pickle) and ``card.json`` (features, training window, row count, library versions,
metrics, the artifact's SHA-256). Loading refuses an artifact whose hash or feature list does
not match.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from smtpguard.core.errors import ConfigError, SmtpguardError

MODEL_KIND = "isolation-forest-v1"

#: Window-feature columns the model reads, in order. Ratios are derived in :func:`matrix`.
FEATURES: tuple[str, ...] = (
    "connections", "distinct_dst", "distinct_dst24", "bytes_per_conn", "packets_per_conn", "rejected_share",
    "low_byte_share", "top_dst_share", "new_dst_share", "port25_share", "mean_duration_ms",
)

#: The window-feature columns :func:`matrix` reads (the ratios come from these).
INPUT_COLUMNS: tuple[str, ...] = tuple(
    c for c in FEATURES if c not in ("rejected_share", "low_byte_share", "port25_share")) + (
    "rejected", "low_byte_conns", "port25")

#: Types inside a saved pipeline that skops must be told to trust (nothing else loads).
TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]


def matrix(feats: pl.DataFrame) -> np.ndarray:
    """The model's input matrix from window features (one row per source and window)."""
    conns = pl.col("connections").cast(pl.Float64).clip(1.0)
    df = feats.with_columns(
        rejected_share=pl.col("rejected") / conns,
        low_byte_share=pl.col("low_byte_conns") / conns,
        port25_share=pl.col("port25") / conns,
        new_dst_share=pl.col("new_dst_share") if "new_dst_share" in feats.columns else pl.lit(0.0),
    ).select([pl.col(c).cast(pl.Float64).fill_null(0.0).fill_nan(0.0).clip(0.0) for c in FEATURES])
    return df.to_numpy()


def build_pipeline(seed: int = 0, n_estimators: int = 200):
    from sklearn.ensemble import IsolationForest
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return Pipeline([
        ("log", FunctionTransformer(np.log1p)),
        ("scale", StandardScaler()),
        ("forest", IsolationForest(n_estimators=n_estimators, contamination="auto", random_state=seed)),
    ])


@dataclass
class Card:
    kind: str
    features: list[str]
    trained_at: str
    training_window: dict[str, str | None]
    rows: int
    versions: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, list[float]] = field(default_factory=dict)
    """medians and spreads of the training features, to explain a score in reasons"""
    sha256: str = ""


@dataclass
class Model:
    pipeline: Any
    card: Card

    def score(self, feats: pl.DataFrame) -> np.ndarray:
        """Anomaly score in [0, 1] per row (0.5 ~ ordinary, higher = more unusual)."""
        if feats.height == 0:
            return np.zeros(0)
        raw = -self.pipeline.score_samples(matrix(feats))  # IsolationForest: ~0.5 normal, -> 1 anomalous
        return np.clip(raw, 0.0, 1.0)

    def explain(self, row: np.ndarray, top: int = 3) -> list[str]:
        med = np.array(self.card.reference["median"])
        spread = np.array(self.card.reference["spread"])
        z = (np.log1p(row) - np.log1p(med)) / np.maximum(spread, 1e-6)
        order = np.argsort(-np.abs(z))[:top]
        return [f"{FEATURES[i]} {row[i]:.3g} vs usual {med[i]:.3g}" for i in order]


def train(feats: pl.DataFrame, *, window: tuple[str | None, str | None] = (None, None), seed: int = 0) -> Model:
    if feats.height < 50:
        raise SmtpguardError(f"only {feats.height} feature rows to train on; the model needs at least 50 "
                             "(run the detector over more traffic first)")
    import sklearn

    x = matrix(feats)
    pipe = build_pipeline(seed)
    pipe.fit(x)
    scores = np.clip(-pipe.score_samples(x), 0, 1)
    logx = np.log1p(x)
    q1, q3 = np.percentile(logx, [25, 75], axis=0)
    card = Card(
        kind=MODEL_KIND, features=list(FEATURES),
        trained_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        training_window={"from": window[0], "to": window[1]}, rows=int(len(x)),
        versions={"scikit-learn": sklearn.__version__, "numpy": np.__version__, "python": platform.python_version()},
        metrics={"train_score_p50": float(np.median(scores)), "train_score_p99": float(np.percentile(scores, 99)),
                 "train_score_max": float(scores.max())},
        reference={"median": np.median(x, axis=0).tolist(), "spread": np.maximum(q3 - q1, 0.1).tolist()},
    )
    return Model(pipe, card)


def evaluate(model: Model, feats: pl.DataFrame, labels: np.ndarray | None = None, threshold: float = 0.65) -> dict[str, Any]:
    """Score distribution, and precision/recall against labels (1 = abusive) when given."""
    s = model.score(feats)
    out: dict[str, Any] = {"rows": int(len(s)), "threshold": threshold,
                           "flagged": int((s >= threshold).sum()),
                           "score_p50": float(np.median(s)) if len(s) else 0.0,
                           "score_p99": float(np.percentile(s, 99)) if len(s) else 0.0}
    if labels is not None and len(s):
        pred = s >= threshold
        tp = int((pred & (labels == 1)).sum())
        fp = int((pred & (labels == 0)).sum())
        fn = int((~pred & (labels == 1)).sum())
        out.update(precision=tp / (tp + fp) if tp + fp else None, recall=tp / (tp + fn) if tp + fn else None,
                   true_positives=tp, false_positives=fp, false_negatives=fn)
    return out


def save(model: Model, directory: str | Path) -> Path:
    return save_artifact(model.pipeline, model.card, directory)


def load(directory: str | Path) -> Model:
    """Load an artifact folder; refuses a changed file, an unknown kind or another feature list."""
    pipe, card = load_artifact(directory, MODEL_KIND, FEATURES, TRUSTED_TYPES)
    return Model(pipe, card)


def save_artifact(pipeline: Any, card: Card, directory: str | Path) -> Path:
    """Write ``model.skops`` and ``card.json`` (with the SHA-256 of the model file) into ``directory``."""
    import skops.io as sio

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    blob = sio.dumps(pipeline)
    card.sha256 = hashlib.sha256(blob).hexdigest()
    (d / "model.skops").write_bytes(blob)
    (d / "card.json").write_text(json.dumps(asdict(card), indent=2))
    return d


def load_artifact(directory: str | Path, kind: str, features: tuple[str, ...], trusted: list[str]) -> tuple[Any, Card]:
    """An artifact folder's model and card; refuses a changed file, another kind, another feature list
    or a type outside ``trusted``."""
    import skops.io as sio

    d = Path(directory)
    try:
        card = Card(**json.loads((d / "card.json").read_text()))
        blob = (d / "model.skops").read_bytes()
    except (OSError, TypeError, ValueError) as e:
        raise ConfigError(f"model artifact {d} is unreadable: {e}") from None
    if hashlib.sha256(blob).hexdigest() != card.sha256:
        raise ConfigError(f"model artifact {d}: model.skops does not match the SHA-256 in card.json; refusing to load it")
    if card.kind != kind:
        raise ConfigError(f"model artifact {d} is a {card.kind!r}, this version reads {kind!r}")
    if list(card.features) != list(features):
        raise ConfigError(f"model artifact {d} was trained on features {card.features}, this version computes "
                          f"{list(features)}; retrain it with `smtpguard model train`")
    untrusted = sio.get_untrusted_types(data=blob)
    unknown = [t for t in untrusted if t not in trusted]
    if unknown:
        raise ConfigError(f"model artifact {d} contains types that are not trusted: {unknown}")
    return sio.loads(blob, trusted=trusted), card
