"""Webhook sender: POST each enforcement event to the network team's endpoint, signed, with retries.

Every request carries the event as JSON and these headers:

``X-Smtpguard-Timestamp``
    Unix time in seconds when the request was signed.
``X-Smtpguard-Signature``
    ``sha256=`` and the hex HMAC-SHA256, keyed with ``response.webhook.secret``, of the
    timestamp, a ``.``, and the exact request body. A receiver recomputes it, compares in
    constant time, and rejects timestamps more than a few minutes old (replays).
``X-Smtpguard-Event-Id``, ``X-Smtpguard-Attempt``
    The registry event behind the message, and which try this is (1, 2, ...). A receiver
    deduplicates retries by (``ip``, ``event_id``).

Credentials in the URL (``https://user:pass@host/path``) are sent as HTTP Basic
authentication and masked wherever the URL is shown.

A 2xx answer is success. Connection errors, timeouts, 408, 429 and 5xx are retried after
``backoff_initial_ms``, doubling up to ``backoff_max_ms``, for ``max_attempts`` tries in all;
any other answer (a 4xx: the request itself is wrong) is not retried. An event that is not
delivered is recorded in the store's ``webhook_dead_letters`` table with the last error,
where the on-call finds it; ``smtpguard enforce publish`` sends the full state again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import pyarrow as pa

from smtpguard.core import metrics
from smtpguard.core.config import mask_dsn
from smtpguard.core.store import Store

from smtpguard.core.config import WebhookConfig

log = logging.getLogger(__name__)

DEAD_LETTER_TABLE = "webhook_dead_letters"
DEAD_LETTER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("failed_at", "DateTime64(3, 'UTC')"),
    ("url", "String"),
    ("event_id", "String"),
    ("ip", "String"),
    ("payload", "String"),
    ("attempts", "UInt16"),
    ("last_error", "String"),
)
#: Answers that may succeed when tried again; other 4xx answers mean the request is wrong.
RETRYABLE_STATUS = frozenset({408, 429})


def migrations(db: str) -> list[tuple[str, list[str]]]:
    cols = ",\n    ".join(f"`{n}` {t}" for n, t in DEAD_LETTER_COLUMNS)
    return [("response-webhook-1", [
        f"CREATE TABLE IF NOT EXISTS {db}.{DEAD_LETTER_TABLE} (\n    {cols}\n) ENGINE = MergeTree ORDER BY (`failed_at`, `event_id`)",
    ])]


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Smtpguard-Signature`` value for a body signed at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def backoff_delays_ms(cfg: WebhookConfig) -> list[int]:
    """The waits between tries: ``backoff_initial_ms`` doubling up to ``backoff_max_ms``."""
    return [min(cfg.backoff_initial_ms * 2 ** i, cfg.backoff_max_ms) for i in range(cfg.max_attempts - 1)]


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    attempts: int
    last_error: str = ""
    stopped: bool = False
    """the sender was stopped between tries: no verdict, no dead letter"""


class WebhookSender:
    """POSTs payloads to ``cfg.url``; what cannot be delivered goes to the store's dead letters."""

    def __init__(self, cfg: WebhookConfig, store: Store, stop: threading.Event | None = None):
        self.cfg = cfg
        self.store = store
        # urllib does not take credentials from the URL: they travel as a Basic Authorization header
        parts = urllib.parse.urlsplit(cfg.url)
        self._url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
        self._auth = {}
        if parts.username is not None:
            cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._auth = {"Authorization": "Basic " + base64.b64encode(cred.encode()).decode()}
        # waiting on an event, not time.sleep, lets a shutting-down process cut a backoff short
        self.stop = stop or threading.Event()

    def send(self, payload: bytes, *, event_id: str, ip: str) -> Delivery:
        delays = backoff_delays_ms(self.cfg)
        error = ""
        attempt = 0
        for attempt in range(1, self.cfg.max_attempts + 1):
            retry, error = self._try(payload, event_id, attempt)
            if not error:
                metrics.ENFORCEMENT_EVENTS.labels("webhook").inc()
                return Delivery(True, attempt)
            log.warning("webhook %s attempt %d for %s %s failed: %s", mask_dsn(self.cfg.url), attempt, ip, event_id, error)
            if not retry or attempt == self.cfg.max_attempts:
                break
            if self.stop.wait(delays[attempt - 1] / 1000):
                # stopping is no verdict on the event: the caller keeps it owed (the outbox), no dead letter
                return Delivery(False, attempt, error + " (stopped before the next try)", stopped=True)
        self._dead_letter(payload, event_id, ip, attempt, error)
        return Delivery(False, attempt, error)

    def _try(self, payload: bytes, event_id: str, attempt: int) -> tuple[bool, str]:
        """One request: ('' on success) or (whether to retry, what went wrong)."""
        ts = str(int(time.time()))
        req = urllib.request.Request(self._url, data=payload, method="POST", headers={
            **self._auth,
            "Content-Type": "application/json",
            "User-Agent": "smtpguard-webhook",
            "X-Smtpguard-Timestamp": ts,
            "X-Smtpguard-Signature": signature(self.cfg.secret, ts, payload),
            "X-Smtpguard-Event-Id": event_id,
            "X-Smtpguard-Attempt": str(attempt),
        })
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_ms / 1000) as resp:
                resp.read()
                return False, ""
        except urllib.error.HTTPError as e:
            return (e.code >= 500 or e.code in RETRYABLE_STATUS), f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:
            return True, f"{type(e).__name__}: {getattr(e, 'reason', e)}"

    def _dead_letter(self, payload: bytes, event_id: str, ip: str, attempts: int, error: str) -> None:
        metrics.WEBHOOK_DEAD_LETTERS.inc()
        self.store.insert_arrow(DEAD_LETTER_TABLE, pa.table({
            "failed_at": pa.array([int(time.time() * 1000)], pa.timestamp("ms", tz="UTC")),
            "url": pa.array([mask_dsn(self.cfg.url)], pa.string()),
            "event_id": pa.array([event_id], pa.string()),
            "ip": pa.array([ip], pa.string()),
            "payload": pa.array([payload.decode()], pa.string()),
            "attempts": pa.array([attempts], pa.uint16()),
            "last_error": pa.array([error], pa.string()),
        }))

    def dead_letters(self, limit: int = 100) -> list[dict]:
        names = [n for n, _ in DEAD_LETTER_COLUMNS]
        rows = self.store.query(f"SELECT {', '.join(names)} FROM {self.store.database}.{DEAD_LETTER_TABLE} "
                                "ORDER BY failed_at DESC LIMIT {limit:UInt32}", {"limit": limit})
        return [dict(zip(names, r)) for r in rows]
