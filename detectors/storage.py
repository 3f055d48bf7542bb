"""The detectors' tables: window features (one row per source and window) and the streams'
checkpoints (watermark, source history, horizon panes, cooldowns), and their schema steps.

The feature columns derive from :data:`smtpguard.detectors.features.FEATURES`.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Sequence

import pyarrow as pa

from smtpguard.core.store import STORED_AT_DDL, Store

from .features import FEATURES

FEATURES_TABLE = "window_features"
STATE_TABLE = "detector_state"


def migrations(db: str) -> list[tuple[str, list[str]]]:
    """Schema steps. Append a step; never edit a released one (``detectors-1`` also brings stores made
    before it, whose core-1 step created these tables, up to its feature columns)."""
    cols = ",\n    ".join(f"`{f.name}` {f.clickhouse}" for f in FEATURES)
    return [("detectors-1", [
        f"""CREATE TABLE IF NOT EXISTS {db}.{FEATURES_TABLE} (
    {cols}
) ENGINE = ReplacingMergeTree ORDER BY (`src_ip`, `window_start`, `window_ms`)""",
        *[f"ALTER TABLE {db}.{FEATURES_TABLE} ADD COLUMN IF NOT EXISTS `{f.name}` {f.clickhouse}" for f in FEATURES],
        f"""CREATE TABLE IF NOT EXISTS {db}.{STATE_TABLE} (
    `group_id` String, `topic` String, `partition` UInt32, `saved_at` DateTime64(3, 'UTC'),
    `closed_upto_ms` Int64, `history` String, `panes` String, `gate` String
) ENGINE = ReplacingMergeTree(`saved_at`) ORDER BY (`group_id`, `topic`, `partition`)""",
    ]), ("detectors-2", [f"ALTER TABLE {db}.{FEATURES_TABLE} ADD COLUMN IF NOT EXISTS {STORED_AT_DDL}"])]


def insert_features(store: Store, features: pa.Table) -> None:
    """Rows of :data:`FEATURES` (:func:`smtpguard.detectors.features.to_store`)."""
    store.insert_arrow(FEATURES_TABLE, features)


def save_state(store: Store, group_id: str, topic: str, states: dict[int, dict]) -> None:
    """Checkpoints of a consumer's streams, one row per partition (see ``detectors/runner.py``)."""
    if not states:
        return
    now = dt.datetime.now(dt.timezone.utc)
    parts = sorted(states)
    store.insert_arrow(STATE_TABLE, pa.table({
        "group_id": [group_id] * len(parts), "topic": [topic] * len(parts),
        "partition": pa.array(parts, pa.uint32()),
        "saved_at": pa.array([now] * len(parts), pa.timestamp("ms", tz="UTC")),
        "closed_upto_ms": pa.array([states[p]["closed_upto_ms"] for p in parts], pa.int64()),
        "history": pa.array([states[p]["history"] for p in parts], pa.binary()),
        "panes": pa.array([states[p]["panes"] for p in parts], pa.binary()),
        "gate": [json.dumps(states[p]["gate"]) for p in parts],
    }))


def load_state(store: Store, group_id: str, topic: str, partitions: Sequence[int]) -> dict[int, dict]:
    if not partitions:
        return {}
    rows = store.query(
        f"SELECT partition, closed_upto_ms, history, panes, gate FROM {store.database}.{STATE_TABLE} FINAL "
        "WHERE group_id = {g:String} AND topic = {t:String} AND partition IN {p:Array(UInt32)}",
        {"g": group_id, "t": topic, "p": list(partitions)}, column_formats={"history": "bytes", "panes": "bytes"})
    return {int(r[0]): {"closed_upto_ms": int(r[1]), "history": r[2], "panes": r[3], "gate": json.loads(r[4])}
            for r in rows}
