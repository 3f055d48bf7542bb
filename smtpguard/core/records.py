"""Record types defined once: a msgspec ``Struct`` is the definition; its ClickHouse columns, its
Arrow schema and its JSON form all derive from it.

A field's ClickHouse type follows from its Python type (``str`` String, ``int`` Int64, ``float``
Float64, ``bool`` Bool, ``list[str]`` Array(String), ``X | None`` Nullable(X)); a field may say
otherwise with :data:`typing.Annotated` and :func:`ch` (``LowCardinality(String)``, ``UInt8``).
Two kinds need a word on how they are stored:

- :data:`Time`: ISO 8601 text in JSON (``2026-01-05T12:00:00Z``), ``DateTime64(3, 'UTC')`` in
  ClickHouse and Arrow; :data:`TimeMs` is the same time as epoch milliseconds in Python, and
  :data:`Stamp` as an aware datetime;
- :data:`Json`: a dict in Python and JSON, its JSON text in a ``String`` column.

Store-only columns computed from a record (an alert's ``severity_rank``) are given as ``derived``.

Example::

    class Note(msgspec.Struct):
        note_id: str
        at: Time
        tags: list[str]
        detail: Json

    NOTE = RecordType(Note, table="notes")
    NOTE.ddl("smtpguard", "ENGINE = MergeTree ORDER BY note_id")
    NOTE.to_arrow([Note("n1", "2026-01-05T12:00:00Z", ["a"], {"x": 1})])
"""

from __future__ import annotations

import datetime as dt
import json
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Sequence

import msgspec
import pyarrow as pa


def ch(clickhouse: str) -> msgspec.Meta:
    """A field's ClickHouse type, where its Python type alone does not say it."""
    return msgspec.Meta(extra={"clickhouse": clickhouse})


#: a time: ISO 8601 UTC text in Python and JSON, DateTime64(3, 'UTC') in the store
Time = Annotated[str, msgspec.Meta(extra={"clickhouse": "DateTime64(3, 'UTC')", "time": "iso"})]
#: a time: epoch milliseconds in Python and JSON, DateTime64(3, 'UTC') in the store
TimeMs = Annotated[int, msgspec.Meta(extra={"clickhouse": "DateTime64(3, 'UTC')", "time": "ms"})]
#: a time: an aware datetime in Python, ISO 8601 in JSON, DateTime64(3, 'UTC') in the store
Stamp = Annotated[dt.datetime, msgspec.Meta(extra={"clickhouse": "DateTime64(3, 'UTC')", "time": "datetime"})]
#: a JSON object: a dict in Python and JSON, its JSON text in a String column
Json = Annotated[dict, msgspec.Meta(extra={"clickhouse": "String", "json": True})]

_TS = pa.timestamp("ms", tz="UTC")
_ARROW = {"String": pa.string(), "Int64": pa.int64(), "Float64": pa.float64(), "Bool": pa.bool_(),
          "UInt8": pa.uint8(), "UInt16": pa.uint16(), "UInt32": pa.uint32(), "UInt64": pa.uint64(),
          "DateTime64(3, 'UTC')": _TS, "Array(String)": pa.list_(pa.string())}
_encoder = msgspec.json.Encoder()


def iso_of(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC text (whole seconds unless there are milliseconds)."""
    t = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    return t.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


def ms_of(value: str | dt.datetime) -> int:
    """ISO 8601 text or an aware datetime as epoch milliseconds."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return int(round(value.timestamp() * 1000))


@dataclass(frozen=True)
class Column:
    name: str
    clickhouse: str
    arrow: pa.DataType
    kind: str = ""
    """'' (as is), 'iso' or 'ms' (a time), 'json' (a dict), 'derived' (computed for the store)"""
    compute: Callable[[Any], Any] | None = None


def _column(name: str, hint: Any) -> Column:
    nullable = False
    extra: dict[str, Any] = {}
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        for m in meta:
            if isinstance(m, msgspec.Meta) and m.extra:
                extra.update(m.extra)
        hint = base
    args = typing.get_args(hint)
    if type(None) in args:
        nullable = True
        hint = next(a for a in args if a is not type(None))
        if typing.get_origin(hint) is Annotated:
            base, *meta = typing.get_args(hint)
            for m in meta:
                if isinstance(m, msgspec.Meta) and m.extra:
                    extra.update(m.extra)
            hint = base
    chtype = extra.get("clickhouse")
    if chtype is None:
        if hint is str:
            chtype = "String"
        elif hint is bool:
            chtype = "Bool"
        elif hint is int:
            chtype = "Int64"
        elif hint is float:
            chtype = "Float64"
        elif typing.get_origin(hint) is list and typing.get_args(hint) in ((str,), ()):
            chtype = "Array(String)"
        else:
            raise TypeError(f"field {name}: no ClickHouse type for {hint!r}; annotate it with records.ch(...)")
    inner = chtype.removeprefix("LowCardinality(").removesuffix(")") if chtype.startswith("LowCardinality(") else chtype
    kind = "json" if extra.get("json") else extra.get("time", "")
    arrow = _ARROW[inner]
    return Column(name, f"Nullable({chtype})" if nullable else chtype, arrow, kind)


@dataclass
class RecordType:
    """A record type: the Struct, its table, and the columns derived from it."""

    struct: type[msgspec.Struct]
    table: str
    derived: dict[str, tuple[str, Callable[[Any], Any]]] = field(default_factory=dict)
    """store-only columns: name -> (ClickHouse type, function of the record)"""
    columns: tuple[Column, ...] = ()

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(self.struct, include_extras=True)
        cols = [_column(name, hints[name]) for name in self.struct.__struct_fields__]
        for name, (chtype, fn) in self.derived.items():
            cols.append(Column(name, chtype, _ARROW[chtype], "derived", fn))
        self.columns = tuple(cols)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def fields(self) -> tuple[str, ...]:
        """The record's own fields (the JSON keys), without the derived store columns."""
        return tuple(self.struct.__struct_fields__)

    def clickhouse_columns(self) -> list[tuple[str, str]]:
        return [(c.name, c.clickhouse) for c in self.columns]

    def ddl(self, db: str, engine: str) -> str:
        """``CREATE TABLE IF NOT EXISTS`` for the record's table (``engine``: ENGINE, ORDER BY ...)."""
        cols = ",\n    ".join(f"`{c.name}` {c.clickhouse}" for c in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {db}.{self.table} (\n    {cols}\n) {engine}"

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow, nullable=c.clickhouse.startswith("Nullable(")) for c in self.columns])

    def to_arrow(self, rows: Sequence[msgspec.Struct]) -> pa.Table:
        """Records as the rows of their table."""
        arrays = []
        for c in self.columns:
            if c.kind == "derived":
                values = [c.compute(r) for r in rows]
            else:
                values = [getattr(r, c.name) for r in rows]
                if c.kind == "iso":
                    values = [None if v is None else dt.datetime.fromtimestamp(ms_of(v) / 1000, dt.timezone.utc)
                              for v in values]
                elif c.kind == "ms":
                    values = [None if v is None else dt.datetime.fromtimestamp(v / 1000, dt.timezone.utc) for v in values]
                elif c.kind == "json":
                    values = [_encoder.encode(v).decode() for v in values]
            arrays.append(pa.array(values, c.arrow))
        return pa.Table.from_arrays(arrays, schema=self.arrow_schema())

    def from_row(self, row: dict[str, Any]) -> msgspec.Struct:
        """A record from a row of its table (a dict by column name; derived columns are ignored)."""
        values: dict[str, Any] = {}
        for c in self.columns:
            if c.kind == "derived" or c.name not in row:
                continue
            v = row[c.name]
            if v is not None and c.kind == "iso":
                v = iso_of(ms_of(v))
            elif v is not None and c.kind == "ms":
                v = ms_of(v)
            elif v is not None and c.kind == "datetime":
                v = dt.datetime.fromtimestamp(ms_of(v) / 1000, dt.timezone.utc)
            elif c.kind == "json":
                v = json.loads(v) if isinstance(v, str) and v else (v or {})
            elif c.clickhouse == "Array(String)":
                v = list(v or [])
            values[c.name] = v
        return msgspec.convert(values, self.struct, strict=False)

    def select(self) -> str:
        """The record's columns for a SELECT list."""
        return ", ".join(f"`{n}`" for n in self.names)

    def json(self, r: msgspec.Struct) -> bytes:
        return _encoder.encode(r)
