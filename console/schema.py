"""The console's tables. Each column list is defined once here; the DDL and the writers use it.

Alert status lives in ``alert_actions``, not in new versions of ``alerts`` rows: the
current status of an alert is the ``status_after`` of its latest action that set one,
else the status the detector wrote. The alert row stays exactly what the detector
produced (its ``created_at`` keeps meaning "when it was raised"), every change of status
carries its actor and time in one place, and a detector that writes an alert again after
a replay cannot undo a person's decision.

Rows that change (users, sessions, API tokens) are ``ReplacingMergeTree`` tables versioned
by ``updated_at`` in microseconds; :func:`next_version` keeps versions written by this
process strictly increasing, so two changes within one millisecond keep their order.
"""

from __future__ import annotations

import datetime as dt
import threading

# the verdicts' table is named by the model that learns from it, where the detectors can read it too
from smtpguard.models.verdicts import REVIEW_LABELS  # noqa: F401

USERS = "console_users"
SESSIONS = "console_sessions"
API_TOKENS = "console_api_tokens"
ALERT_ACTIONS = "alert_actions"

TS3 = "DateTime64(3, 'UTC')"
TS6 = "DateTime64(6, 'UTC')"

USER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "String"),
    ("role", "LowCardinality(String)"),
    ("password_hash", "String"),
    ("disabled", "Bool"),
    ("created_at", TS3),
    ("updated_by", "String"),
    ("updated_at", TS6),
)

SESSION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("session_hash", "String"),
    ("user", "String"),
    ("csrf_token", "String"),
    ("created_at", TS3),
    ("expires_at", TS3),
    ("client", "String"),
    ("ended", "Bool"),
    ("updated_at", TS6),
)

API_TOKEN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("token_id", "String"),
    ("user", "String"),
    ("token_hash", "String"),
    ("label", "String"),
    ("created_at", TS3),
    ("revoked", "Bool"),
    ("updated_at", TS6),
)

ALERT_ACTION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("action_id", "String"),
    ("alert_id", "String"),
    ("action", "LowCardinality(String)"),
    ("actor", "String"),
    ("at", TS3),
    ("status_after", "LowCardinality(String)"),
    ("note", "String"),
    ("message", "String"),
    ("detail", "String"),
)

REVIEW_LABEL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("alert_id", "String"),
    ("src_ip", "Nullable(String)"),
    ("tenant", "String"),
    ("detector", "LowCardinality(String)"),
    ("window_start", TS3),
    ("label", "LowCardinality(String)"),
    ("actor", "String"),
    ("at", TS3),
)

def _cols(columns: tuple[tuple[str, str], ...]) -> str:
    return ",\n    ".join(f"`{n}` {t}" for n, t in columns)


def migrations(db: str) -> list[tuple[str, list[str]]]:
    """Schema steps. Append a step; never edit a released one."""
    return [("console-1", [
        f"CREATE TABLE IF NOT EXISTS {db}.{USERS} (\n    {_cols(USER_COLUMNS)}\n) "
        "ENGINE = ReplacingMergeTree(`updated_at`) ORDER BY (`name`)",
        f"CREATE TABLE IF NOT EXISTS {db}.{SESSIONS} (\n    {_cols(SESSION_COLUMNS)}\n) "
        "ENGINE = ReplacingMergeTree(`updated_at`) ORDER BY (`session_hash`)",
        f"CREATE TABLE IF NOT EXISTS {db}.{API_TOKENS} (\n    {_cols(API_TOKEN_COLUMNS)}\n) "
        "ENGINE = ReplacingMergeTree(`updated_at`) ORDER BY (`token_id`)",
        f"CREATE TABLE IF NOT EXISTS {db}.{ALERT_ACTIONS} (\n    {_cols(ALERT_ACTION_COLUMNS)}\n) "
        "ENGINE = MergeTree ORDER BY (`alert_id`, `at`, `action_id`)",
        # The latest label of an alert wins: a reviewer who changes their mind replaces the label.
        f"CREATE TABLE IF NOT EXISTS {db}.{REVIEW_LABELS} (\n    {_cols(REVIEW_LABEL_COLUMNS)}\n) "
        "ENGINE = ReplacingMergeTree(`at`) ORDER BY (`alert_id`)",
    ])]  # dnsbl_checks, once created here too, belongs to the response (smtpguard.response.lookups)


_version_lock = threading.Lock()
_last_version_us = 0


def next_version() -> dt.datetime:
    """Now (UTC, microseconds), strictly later than any version this process handed out before."""
    global _last_version_us
    with _version_lock:
        now_us = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1_000_000)
        _last_version_us = max(now_us, _last_version_us + 1)
        return dt.datetime.fromtimestamp(_last_version_us / 1_000_000, dt.timezone.utc)


def utc(t: dt.datetime | None) -> dt.datetime | None:
    """A datetime read from the store as an aware UTC datetime (chdb returns naive UTC values)."""
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
