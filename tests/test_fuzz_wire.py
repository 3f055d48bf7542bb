"""Property-based fuzzing of the ``smtp.flows`` message decoder (``smtpguard/wire.py``): what
a detector does with whatever a producer put on the topic.

Invariant: :func:`wire.decode` raises nothing but :class:`wire.WireError` (the message is
dead-lettered whole); otherwise every record of the message is either kept, and obeys the
record's rules, or returned as a bad record with its position and reason; and the kept
records go through the detection pipeline without an error (a record the pipeline cannot
take would stop the detector's partition).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pytest
from fuzz.hostile import BYTE_EDITS, EPOCHS, HUGE, IPS, JSON_VALUES, NUMBERS, TEXTS, fuzz, mutate
from hypothesis import example, given
from hypothesis import strategies as st

from smtpguard.core import config, record, wire
from smtpguard.detectors.pipeline import Pipeline

CFG = config.load(environ={}, overrides={})
JSON_HEADERS = [("content-type", b"application/json")]
GOOD = {"start": "2024-03-12T08:00:00.000Z", "end": "2024-03-12T08:00:02.500Z", "src_ip": "10.0.0.5",
        "dst_ip": "198.51.100.7", "src_port": 40000, "dst_port": 25, "protocol": 6, "packets": 10, "bytes": 1000}
PRODUCED_MS = 1_710_230_400_000  # 2024-03-12T08:00:00Z
#: times that are no flow: 1900, 2200, year 0 and 1, 2^63 ms, after the message was produced
HOSTILE_TIMES = ["1900-01-01T00:00:00Z", "2200-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "0000-01-01T00:00:00Z",
                 "9999-12-31T23:59:59.999Z", "2024-03-20T00:00:00Z", "2024-03-12T08:00:00+14:00",
                 "2024-02-30T00:00:00Z", 2**63, 2**63 - 1, -1, 0, 7258118400000, -(2**63)]


def check_decoded(table: pa.Table, bad: list[wire.BadRecord], n: int | None) -> None:
    assert table.schema == record.SCHEMA
    assert wire.check_records(table) == []
    for b in bad:
        assert b.reason and isinstance(b.raw, bytes) and b.index >= 0
    if n is not None:
        assert table.num_rows + len(bad) == n
        assert len({b.index for b in bad}) == len(bad) and all(b.index < n for b in bad)
    if table.num_rows:
        # what a detector keeps must not stop it
        p = Pipeline(CFG)
        p.process(table, key=0, offset=0)
        p.flush()


def decode(value: bytes, headers: Any, n: int | None, produced_ms: int | None = PRODUCED_MS) -> list[wire.BadRecord]:
    try:
        table, bad = wire.decode(value, headers, produced_ms)
    except wire.WireError as e:
        assert str(e)
        return []
    check_decoded(table, bad, n)
    return bad


# ------------------------------------------------------------------ arbitrary bytes


@fuzz(300)
@given(value=st.one_of(st.binary(max_size=600), st.builds(lambda b: b"{" + b, st.binary(max_size=200)),
                       st.builds(lambda b: b"[" + b, st.binary(max_size=200))),
       headers=st.sampled_from([None, [], wire.HEADERS, JSON_HEADERS, [("content-type", b"\xff\xfe")]]))
def test_arbitrary_bytes_are_a_wire_error_or_checked_records(value: bytes, headers: Any) -> None:
    decode(value, headers, None)


def _arrow_message(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


GOOD_TABLE = wire.decode_message(json.dumps([GOOD, {**GOOD, "src_ip": "2001:db8::5", "dst_port": 587}]).encode(),
                                 JSON_HEADERS)
GOOD_MESSAGE = wire.encode_table(GOOD_TABLE)


@fuzz(300)
@given(edits=st.lists(st.tuples(st.sampled_from(BYTE_EDITS),
                                st.integers(0, len(GOOD_MESSAGE) - 1), st.integers(0, 2**64 - 1)),
                      min_size=1, max_size=6))
@example(edits=[("flip", 257, 1)])  # a schema naming a field twice (found by this test)
def test_mutated_arrow_messages(edits: list) -> None:
    """Bit flips, cuts and overwritten lengths in a valid Arrow IPC message: a wire error, or
    records that are checked like any others (never a crash of the reader)."""
    decode(mutate(GOOD_MESSAGE, edits, "little"), wire.HEADERS, None)


# ------------------------------------------------------------------ JSON records


_FIELDS = [f.name for f in record.FIELDS] + ["extra", ""]
_JSON_EDIT = st.tuples(st.sampled_from(_FIELDS), st.one_of(
    st.sampled_from(JSON_VALUES), st.sampled_from(HOSTILE_TIMES), st.sampled_from(IPS), st.integers(),
    st.floats(), st.text(max_size=20)))


@fuzz(250)
@given(records=st.lists(st.lists(_JSON_EDIT, max_size=4), min_size=1, max_size=6), as_list=st.booleans())
@example(records=[[("packets", float("nan"))]], as_list=False)
@example(records=[[("start", "2200-01-01T00:00:00Z"), ("end", "2200-01-01T00:00:01Z")], []], as_list=True)
@example(records=[[("src_ip", "fe80::1%eth0")], [("helo", HUGE)], [("start", 2**63 - 1)], []], as_list=True)
@example(records=[[("start", "9999-12-31T23:59:59.999Z"), ("end", "9999-12-31T23:59:59.999Z")]], as_list=False)
@example(records=[[("end", "2024-03-12T08:00:00+14:00")], [("tcp_flags", "x")], [("conn_state", "weird")]],
         as_list=True)
def test_json_records_with_hostile_fields(records: list, as_list: bool) -> None:
    objs = []
    for edits in records:
        o = dict(GOOD)
        for k, v in edits:
            o[k] = v
        objs.append(o)
    body = objs if as_list or len(objs) > 1 else objs[0]
    value = json.dumps(body).encode()  # NaN and infinities as JSON does not allow them
    bad = decode(value, JSON_HEADERS, len(objs))
    for b in bad:
        assert b.index < len(objs)


def test_json_regressions() -> None:
    """Inputs the fuzzing found accepted before the decoder checked records."""
    def one(**over: Any) -> list[wire.BadRecord]:
        table, bad = wire.decode(json.dumps({**GOOD, **over}).encode(), JSON_HEADERS, PRODUCED_MS)
        assert table.num_rows + len(bad) == 1
        return bad
    assert "not an IP address" in one(src_ip="fe80::1%eth0")[0].reason
    assert "outside 1970..9999" in one(start="1900-01-01T00:00:00Z")[0].reason
    assert "outside 1970..9999" in one(start=-1)[0].reason
    assert "after the message was produced" in one(start="2200-01-01T00:00:00Z", end="2200-01-01T00:00:01Z")[0].reason
    assert "end" in one(end="2024-03-12T07:00:00Z")[0].reason
    assert "longer than 4096" in one(helo=HUGE)[0].reason
    assert "unknown action" in one(action="x" * 100)[0].reason
    assert "sampling_rate 0" in one(sampling_rate=0)[0].reason
    with pytest.raises(wire.WireError, match="invalid JSON"):
        wire.decode(json.dumps({**GOOD, "packets": float("nan")}).encode(), JSON_HEADERS)
    with pytest.raises(wire.WireError, match="no records"):
        wire.decode(b"[]", JSON_HEADERS)
    # a list keeps its good records and names the bad ones by position
    table, bad = wire.decode(json.dumps([GOOD, {**GOOD, "dst_ip": "x"}, GOOD, {"src_ip": 5}]).encode(), JSON_HEADERS)
    assert table.num_rows == 2 and [b.index for b in bad] == [1, 3]
    assert msgspec.json.decode(bad[0].raw)["dst_ip"] == "x"


# ------------------------------------------------------------------ Arrow batches


_TYPES = [pa.int8(), pa.int64(), pa.uint64(), pa.float64(), pa.string(), pa.large_string(), pa.binary(), pa.bool_(),
          pa.timestamp("s"), pa.timestamp("ns", tz="UTC"), pa.date32(), pa.null(), pa.list_(pa.int32()),
          pa.dictionary(pa.int8(), pa.string())]
_CELL = st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.sampled_from(NUMBERS + EPOCHS + IPS),
                  st.text(max_size=10), st.booleans())


def _array(values: list, typ: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, typ, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.nulls(len(values), typ)


@fuzz(200)
@given(n=st.integers(1, 5), columns=st.lists(st.tuples(st.sampled_from(_FIELDS), st.sampled_from(_TYPES),
                                                          st.lists(_CELL, min_size=5, max_size=5)),
                                                max_size=8, unique_by=lambda c: c[0]),
       drop=st.lists(st.sampled_from(_FIELDS), max_size=3), version=st.sampled_from([b"1", b"2", None, b"\xff"]))
def test_arrow_batches_with_wrong_types(n: int, columns: list, drop: list, version: bytes | None) -> None:
    """A batch whose columns have other types than the record's, or are missing, or carry
    another record version: the cast of the record's types, else a wire error."""
    base = {name: GOOD_TABLE.column(name).combine_chunks().take(pa.array([0] * n)) for name in GOOD_TABLE.column_names}
    for name, typ, cells in columns:
        base[name] = _array(cells[:n], typ)
    for name in drop:
        base.pop(name, None)
    meta = {b"smtpguard.core.record.version": version} if version is not None else None
    table = pa.table(base).replace_schema_metadata(meta)
    decode(_arrow_message(table), wire.HEADERS, n if version == b"1" else None)


_TS = st.one_of(st.none(), st.sampled_from([-(2**63), 2**63 - 1, -1, 0, wire.MAX_EPOCH_MS, wire.MAX_EPOCH_MS + 1,
                                            PRODUCED_MS, PRODUCED_MS + wire.MAX_AHEAD_MS + 1, -2208988800000,
                                            7258118400000]),
                st.integers(-(2**63), 2**63 - 1))
_TEXT = st.one_of(st.none(), st.sampled_from(IPS + TEXTS + ["10.0.0.1", "accept", "completed"]), st.text(max_size=8))


@fuzz(200)
@given(rows=st.lists(st.fixed_dictionaries({"start": _TS, "end": _TS, "src_ip": _TEXT, "dst_ip": _TEXT,
                                            "action": _TEXT, "conn_state": _TEXT, "helo": _TEXT,
                                            "sampling_rate": st.one_of(st.none(), st.integers(0, 2**32 - 1))},
                                           ), min_size=1, max_size=8),
       produced=st.sampled_from([PRODUCED_MS, None]))
@example(rows=[{"start": 2**63 - 1, "end": 2**63 - 1, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "action": "accept",
                "conn_state": "", "helo": "", "sampling_rate": 1}], produced=None)
@example(rows=[{"start": None, "end": 0, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "action": "accept",
                "conn_state": "", "helo": "", "sampling_rate": 1}], produced=None)
@example(rows=[{"start": wire.MAX_EPOCH_MS, "end": wire.MAX_EPOCH_MS, "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2",
                "action": "accept", "conn_state": "", "helo": "", "sampling_rate": 1}], produced=PRODUCED_MS)
def test_arrow_batches_of_the_record_schema_with_hostile_values(rows: list, produced: int | None) -> None:
    """The record's schema, so nothing to cast, but values no record may have: nulls in
    fields that are not nullable (Arrow IPC does not enforce it), times beyond any calendar
    (2^63 ms made the detector's pipeline panic), addresses, states and 1 MB strings."""
    n = len(rows)
    cols = []
    for f in record.FIELDS:
        if f.name in rows[0]:
            vals = [r[f.name] for r in rows]
            cols.append(pa.array(vals, pa.int64()).cast(f.arrow) if f.arrow == pa.timestamp("ms", tz="UTC")
                        else pa.array(vals, f.arrow))
        else:
            cols.append(GOOD_TABLE.column(f.name).combine_chunks().take(pa.array(np.zeros(n, np.int64))))
    table = pa.Table.from_arrays(cols, schema=record.SCHEMA)
    decode(_arrow_message(table), wire.HEADERS, n, produced)


def test_a_message_with_some_bad_records_keeps_the_good_ones() -> None:
    t = GOOD_TABLE.take(pa.array([0, 0, 1, 1]))
    start = pa.array([PRODUCED_MS - 1000, 2**63 - 1, PRODUCED_MS, PRODUCED_MS + 30 * 86_400_000], pa.int64())
    ts = start.cast(pa.timestamp("ms", tz="UTC"))
    table = pa.Table.from_arrays([ts, ts] + t.columns[2:], schema=record.SCHEMA)
    kept, bad = wire.decode(wire.encode_table(table), wire.HEADERS, PRODUCED_MS)
    assert kept.num_rows == 2 and [b.index for b in bad] == [1, 3]
    assert "outside 1970..9999" in bad[0].reason and "30.0 days after" in bad[1].reason
    assert msgspec.json.decode(bad[0].raw)["start"] == 2**63 - 1
    with pytest.raises(wire.WireError, match=r"record 1: .*\(and 1 more"):
        wire.decode_message(wire.encode_table(table), wire.HEADERS, PRODUCED_MS)
    assert dt.datetime.fromtimestamp(PRODUCED_MS / 1000, dt.timezone.utc).year == 2024
