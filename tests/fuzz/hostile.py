"""Hostile values and the invariant every parser keeps, shared by the fuzz tests and the
atheris harnesses.

The invariant: a parser never raises anything but the project's errors
(:class:`smtpguard.core.errors.SmtpguardError`); every unit of input is a kept record, a
skipped one or a dead letter (``read == rows + skipped + rejects``); a kept record
obeys the record's rules as the detector checks them on the wire
(:func:`smtpguard.core.wire.check_records`); a dead letter has a reason and a place, and can
be published as JSON.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from smtpguard.core import record, wire
from smtpguard.ingest.base import MAX_RAW_CHARS, Batch

#: Failures hypothesis finds are kept in the project's (git-ignored) .hypothesis directory
#: and replayed first on the next run.
DB = DirectoryBasedExampleDatabase(str(Path(__file__).resolve().parents[2] / ".hypothesis" / "examples"))


#: The long ("soak") variants: ``TEST_SOAK=N make test`` multiplies every bounded fault
#: count by N (fuzz examples, atheris runs, detector kills); 1 (the default) = the quick run.
#: (Not SMTPGUARD_SOAK: every SMTPGUARD_* variable is a config override, which the processes under test
#: would refuse as an unknown field.)
SOAK = max(1, int(os.environ.get("TEST_SOAK", "1") or 1))


def fuzz(n: int) -> settings:
    """Every fuzz test: ``n`` examples at most (times SOAK), no deadline (the first example imports polars)."""
    return settings(max_examples=n * SOAK, deadline=None, database=DB,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


HUGE = "A" * 1_000_000
"""a 1 MB field"""

#: Numbers as text: NaN and infinities, negatives, overflows, other spellings.
NUMBERS = ["NaN", "nan", "Infinity", "-Infinity", "inf", "-1", "-0", "1e308", "1e3", "0x19", "25.5", "+25", "",
           "9" * 25, str(2**63), str(2**63 - 1), str(2**64), str(2**64 - 1), "\u0662\u0665", "\uff12\uff15"]
#: Epoch seconds of 1900, 2200, 0, 2^63, the last second of 9999 and the one after, -1.
EPOCHS = ["-2208988800", "7258118400", "0", str(2**63), str(2**63 // 1000), "253402300799", "253402300800", "-1",
          "4102444800.5", "1e10"]
#: Odd and forged addresses: v4-mapped, scoped, malformed, non-canonical, non-ASCII digits.
IPS = ["::ffff:10.0.0.1", "::ffff:0a00:0001", "fe80::1%eth0", "fe80::1%25eth0", "[::1]", "::", "0.0.0.0",
       "255.255.255.255", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.04", "256.1.1.1", "1::2::3", ":::1",
       "2001:db8::" + "1" * 50, "\uff11.\uff12.\uff13.\uff14", "2001:DB8::1", "1:2:3:4:5:6:7:8:9", "10.0.0.1/32",
       " 10.0.0.1", "10.0.0.1\x00", "\u0661.1.1.1", "::ffff:1.2.3.4%1", "64:ff9b::192.0.2.1"]
#: Text values: empty, binary, control characters, non-ASCII, 1 MB.
TEXTS = ["", "-", "\x00", "\x00\x01\x02", "\ufffd", "\u00e9t\u00e9", "\u202e", "a\tb", "a,b", "a b", '"', "\\x41",
         "\r", HUGE]

#: Every hostile token, for fields of any type.
TOKENS = NUMBERS + EPOCHS + IPS + TEXTS
#: Hostile JSON values: wrong types, NaN and infinities (as Python floats: json.dumps
#: writes them as NaN/Infinity, which JSON does not allow), huge numbers and strings.
JSON_VALUES = [None, True, False, [], {}, [1, 2], {"a": 1}, 1.5, -1, 0, 2**63, 2**64, 2**70, -(2**63) - 1,
               float("nan"), float("inf"), float("-inf"), 1e308, HUGE, *TOKENS]


class Accounted:
    """What a run of batches added up to."""

    def __init__(self) -> None:
        self.read = self.kept = self.skipped = self.rejected = 0
        self.reasons: list[str] = []

    def add(self, b: Batch) -> Batch:
        self.read += b.read
        self.kept += b.records.num_rows
        self.skipped += b.skipped
        self.rejected += len(b.rejects)
        self.reasons.extend(r.reason for r in b.rejects)
        return b


def check_batch(b: Batch, fmt: str = "") -> Batch:
    """The invariant for one batch (see the module docstring)."""
    assert b.records.schema == record.SCHEMA, b.records.schema
    assert b.read == b.records.num_rows + b.skipped + len(b.rejects), (b.read, b.records.num_rows, b.skipped,
                                                                        len(b.rejects))
    problems = wire.check_records(b.records)
    assert not problems, (fmt, problems[:3], wire._rows_json(b.records.take([problems[0][0]])))
    for r in b.rejects:
        assert isinstance(r.reason, str) and r.reason.strip(), r
        assert not r.reason.startswith("internal error"), r.reason
        assert isinstance(r.location, str) and r.location, r
        assert isinstance(r.raw, str) and len(r.raw) <= MAX_RAW_CHARS + 40, len(r.raw)
        back = msgspec.json.decode(wire.encode_json(r))  # it can go to the dead-letter topic as it is
        assert back["reason"] == r.reason
    return b


#: Byte edits for :func:`mutate`: a bit flip, a cut, an insert, or an integer field overwritten.
BYTE_EDITS = ("flip", "cut", "insert", "u16", "u32", "u64")


def mutate(data: bytes, edits: list[tuple[str, int, int]], byteorder: str) -> bytes:
    """``data`` with each ``(kind, position, value)`` edit applied in turn (positions wrap):
    flip a bit, cut the rest, insert up to 8 bytes of ``value``, or overwrite 2/4/8 bytes with it."""
    out = bytearray(data)
    for kind, at, v in edits:
        if not out:
            break
        at %= len(out)
        if kind == "flip":
            out[at] ^= 1 << (v % 8)
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = v.to_bytes(8, byteorder)[: 1 + v % 8]
        else:
            n = {"u16": 2, "u32": 4, "u64": 8}[kind]
            out[at:at + n] = (v % (1 << (8 * n))).to_bytes(n, byteorder)
    return bytes(out)


def char_edits(alphabet, max_size: int):
    """A hypothesis strategy of up to ``max_size`` edits for :func:`edit_chars`: delete, insert or
    replace at a position (wrapping) with an item of ``alphabet`` (characters, or byte values)."""
    return st.lists(st.tuples(st.sampled_from(["del", "ins", "rep"]), st.integers(0, 10**6),
                              st.sampled_from(list(alphabet))), max_size=max_size)


def edit_chars(text, edits):
    """``text`` (a str, or bytes edited byte by byte) with each edit of :func:`char_edits` applied in turn."""
    s = list(text)
    for op, at, ch in edits:
        pos = at % (len(s) + 1)
        if op == "ins":
            s.insert(pos, ch)
        elif s:
            pos = min(pos, len(s) - 1)
            if op == "del":
                del s[pos]
            else:
                s[pos] = ch
    return bytes(s) if isinstance(text, (bytes, bytearray)) else "".join(s)
