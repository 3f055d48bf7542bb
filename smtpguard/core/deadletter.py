"""The dead letter: input that could not become a record, with why and where (the ``smtp.flows.dlq``
message, ``decode --rejects``, ``analyze --dead-letters``). Collectors make them from bad input, the
detector from bad messages; neither ever drops one silently.
"""

from __future__ import annotations

import time

import msgspec

#: Longest raw sample kept in a dead letter; longer input is cut and marked.
MAX_RAW_CHARS = 2048


class Reject(msgspec.Struct):
    """A piece of input that could not become a record, with why and where."""

    source: str
    """file name, exporter address or topic the input came from"""
    location: str
    """line number, packet number or offset within the source"""
    reason: str
    raw: str
    format: str = ""
    seen_at_ms: int = 0

    @classmethod
    def make(cls, source: str, location: object, reason: str, raw: str | bytes, fmt: str = "") -> "Reject":
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "backslashreplace")
        if len(raw) > MAX_RAW_CHARS:
            raw = raw[:MAX_RAW_CHARS] + f"...[{len(raw) - MAX_RAW_CHARS} more chars]"
        return cls(source, str(location), reason, raw, fmt, int(time.time() * 1000))
