"""What the console reads from the store. Every value reaches ClickHouse as a query parameter.

The current status of an alert joins ``alert_actions`` (see :mod:`smtpguard.console.schema`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from smtpguard.core.record import SEVERITIES
from smtpguard.core.alert import Alert, iso
from smtpguard.core.errors import InputError
from smtpguard.core.exemptions import parse_time
from smtpguard.core.inventory import key_network
from smtpguard.response.lookups import DNSBL_ANSWER
from smtpguard.response.webhook import DEAD_LETTER_TABLE
from smtpguard.core.alert import ALERT
from smtpguard.core.store import Store, addr_text

from . import schema
from .schema import utc

STATUSES = ("new", "acknowledged", "confirmed", "dismissed")
MINUTE_MS = 60_000
#: How much traffic the alert page charts on each side of the alert window.
CHART_MARGIN_MIN = 30
MAX_PER_PAGE = 500
ALERT_NAMES = ALERT.names


def to_ms(t: dt.datetime) -> int:
    return int(utc(t).timestamp() * 1000)


def from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)


def iso_z(t: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, to the second."""
    return None if t is None else utc(t).isoformat(timespec="seconds").replace("+00:00", "Z")


def _status_join(db: str) -> str:
    return (f"LEFT JOIN (SELECT alert_id, argMax(status_after, (at, action_id)) AS status "
            f"FROM {db}.{schema.ALERT_ACTIONS} WHERE status_after != '' GROUP BY alert_id) AS st "
            "ON st.alert_id = a.alert_id")


def _select(db: str) -> str:
    cols = ", ".join(f"a.{c}" for c in ALERT_NAMES if c != "status")
    return (f"SELECT {cols}, if(st.status = '', a.status, st.status) AS status "
            f"FROM {db}.alerts AS a FINAL {_status_join(db)}")


def _row(row: tuple) -> dict[str, Any]:
    names = [c for c in ALERT_NAMES if c != "status"] + ["status"]
    d = dict(zip(names, row))
    for k in ("window_start", "window_end", "created_at"):
        d[k] = utc(d[k])
    return d


#: orders of the alert queue: newest first, or most likely to be confirmed first
ORDERS = ("", "likely")


@dataclass(frozen=True)
class AlertFilter:
    """The alert queue's filters. Empty fields do not filter."""

    severity: str = ""
    """at least this severity"""
    detector: str = ""
    tenant: str = ""
    status: str = ""
    ip: str = ""
    since: dt.datetime | None = None
    """window end at or after"""
    until: dt.datetime | None = None
    """window start before"""
    suppressed: bool = False
    """include findings suppressed by cooldown"""
    order: str = ""
    """'' newest window first; 'likely': most likely to be confirmed first (the promoted verdicts model)"""
    page: int = 1
    per_page: int = 50

    @classmethod
    def parse(cls, params: dict[str, str]) -> "AlertFilter":
        """From query parameters; raises InputError naming the bad one."""
        def text(name: str) -> str:
            return (params.get(name) or "").strip()

        sev, status = text("severity"), text("status")
        if sev and sev not in SEVERITIES:
            raise InputError(f"severity must be one of {', '.join(SEVERITIES)}")
        if status and status not in STATUSES:
            raise InputError(f"status must be one of {', '.join(STATUSES)}")
        if text("order") not in ORDERS:
            raise InputError("order must be 'likely' (most likely to be confirmed first) or empty (newest first)")

        def when(name: str) -> dt.datetime | None:
            value = text(name)
            if not value:
                return None
            try:
                # a browser's datetime-local input has no zone: the console speaks UTC everywhere
                return parse_time(value)
            except ValueError:
                raise InputError(f"{name} must be an ISO 8601 date or time (UTC), e.g. 2024-03-12T08:00") from None

        def number(name: str, default: int, top: int) -> int:
            value = text(name)
            if not value:
                return default
            if not value.isdigit() or not 1 <= int(value) <= top:
                raise InputError(f"{name} must be a whole number from 1 to {top}")
            return int(value)

        return cls(severity=sev, detector=text("detector"), tenant=text("tenant"), status=status, ip=text("ip"),
                   since=when("since"), until=when("until"), suppressed=text("suppressed") in ("1", "on", "true"),
                   order=text("order"), page=number("page", 1, 1_000_000), per_page=number("per_page", 50, MAX_PER_PAGE))

    def query_params(self, **changes: Any) -> dict[str, str]:
        """The filter as query parameters (for paging links), without empty values."""
        f = replace(self, **changes)
        out = {"severity": f.severity, "detector": f.detector, "tenant": f.tenant, "status": f.status, "ip": f.ip,
               "since": f.since.strftime("%Y-%m-%dT%H:%M") if f.since else "",
               "until": f.until.strftime("%Y-%m-%dT%H:%M") if f.until else "",
               "suppressed": "1" if f.suppressed else "", "order": f.order, "page": str(f.page) if f.page > 1 else "",
               "per_page": str(f.per_page) if f.per_page != 50 else ""}
        return {k: v for k, v in out.items() if v}


@dataclass
class Page:
    alerts: list[dict[str, Any]]
    total: int
    filter: AlertFilter

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.filter.per_page))


def alert_queue(store: Store, f: AlertFilter, ranker: "VerdictRanker | None" = None) -> Page:
    """One page of alerts matching ``f``, newest window first, worst first within a window; with
    ``order='likely'``, most likely to be confirmed first (``ranker``'s model; ties newest first).
    With a ranker, each alert carries ``confirm_probability`` (None where its window has no features)."""
    db = store.database
    where = ["1"]
    params: dict[str, Any] = {"limit": f.per_page, "offset": (f.page - 1) * f.per_page}
    if f.severity:
        where.append("a.severity_rank >= {rank:UInt8}")
        params["rank"] = SEVERITIES.index(f.severity)
    if f.detector:
        where.append("a.detector = {detector:String}")
        params["detector"] = f.detector
    if f.tenant:
        where.append("a.tenant = {tenant:String}")
        params["tenant"] = f.tenant
    if f.ip:
        where.append("a.src_ip = {ip:String}")
        params["ip"] = f.ip
    if f.status:
        where.append("if(st.status = '', a.status, st.status) = {status:String}")
        params["status"] = f.status
    if f.since:
        where.append("a.window_end >= {since:DateTime64(3, 'UTC')}")
        params["since"] = f.since
    if f.until:
        where.append("a.window_start < {until:DateTime64(3, 'UTC')}")
        params["until"] = f.until
    if not f.suppressed:
        where.append("a.suppressed = ''")
    cond = " AND ".join(where)
    model = ranker.model() if ranker is not None else None
    if f.order == "likely" and model is None:
        raise InputError("no verdicts model is promoted yet: confirm and dismiss alerts, then run "
                         "`smtpguard model train --supervised`")
    total = store.query(f"SELECT count() FROM {db}.alerts AS a FINAL {_status_join(db)} WHERE {cond}", params)[0][0]
    order = "ORDER BY a.window_start DESC, a.severity_rank DESC, a.alert_id"
    if f.order == "likely":
        # every matching alert is scored, then paged: the order is over the whole queue
        alerts = [_row(r) for r in store.query(f"{_select(db)} WHERE {cond} {order}", params)]
        ranker.annotate(store, alerts)
        alerts.sort(key=lambda a: -(a["confirm_probability"] if a["confirm_probability"] is not None else -1))
        alerts = alerts[(f.page - 1) * f.per_page:f.page * f.per_page]
    else:
        alerts = [_row(r) for r in store.query(f"{_select(db)} WHERE {cond} {order} "
                                               "LIMIT {limit:UInt32} OFFSET {offset:UInt64}", params)]
        if model is not None:
            ranker.annotate(store, alerts)
    return Page(alerts, int(total), f)


class VerdictRanker:
    """The promoted verdicts model of a models folder (``DATA_DIR/models/verdicts-current``), reloaded
    when another one is promoted, scoring alerts by the window features they were raised on."""

    def __init__(self, models_dir: str | Path):
        from smtpguard.models import verdicts

        self.current = verdicts.Current(models_dir)
        self._history: tuple[tuple, Any] | None = None

    def model(self):
        return self.current.get()

    def history(self, store: Store):
        """The team's verdicts (the model's earlier-verdict inputs), read again only when one was added."""
        from smtpguard.models import verdicts

        version = verdicts.history_version(store)
        if self._history is None or self._history[0] != version:
            self._history = (version, verdicts.load_history(store))
        return self._history[1]

    def annotate(self, store: Store, alerts: list[dict[str, Any]]) -> None:
        """Set ``confirm_probability`` on each alert (None: a tenant alert, or no stored window)."""
        import polars as pl

        from smtpguard.models import verdicts
        from smtpguard.models.anomaly import INPUT_COLUMNS

        for a in alerts:
            a["confirm_probability"] = None
        model = self.model()
        keyed = [a for a in alerts if a.get("src_ip")]
        if model is None or not keyed:
            return
        cols = ", ".join(f"`{c}`" for c in INPUT_COLUMNS)
        rows = store.query(
            f"SELECT src_ip, toUnixTimestamp64Milli(window_start), {cols} FROM {store.database}.window_features FINAL "
            "WHERE src_ip IN {ips:Array(String)} AND window_start >= {lo:DateTime64(3, 'UTC')} "
            "AND window_start <= {hi:DateTime64(3, 'UTC')}",
            {"ips": sorted({a["src_ip"] for a in keyed}), "lo": min(a["window_start"] for a in keyed),
             "hi": max(a["window_start"] for a in keyed)})
        if not rows:
            return
        feats = pl.DataFrame(rows, schema=["src_ip", "window_start", *INPUT_COLUMNS], orient="row")
        by_key = {(ip, int(ms)): i for i, (ip, ms) in enumerate(zip(feats["src_ip"], feats["window_start"]))}
        found = [(a, by_key[k]) for a in keyed if (k := (a["src_ip"], to_ms(a["window_start"]))) in by_key]
        if not found:
            return
        # one row per alert (alerts of several detectors on one window each count their own earlier verdicts)
        rows_of = feats[[i for _, i in found]]
        p = model.probability(verdicts.with_earlier(rows_of, self.history(store),
                                                    [a["detector"] for a, _ in found]))
        for (a, _), x in zip(found, p.tolist()):
            a["confirm_probability"] = float(x)


def get_alert(store: Store, alert_id: str) -> dict[str, Any] | None:
    rows = store.query(f"{_select(store.database)} WHERE a.alert_id = {{id:String}}", {"id": alert_id})
    return _row(rows[0]) if rows else None


def as_alert(row: dict[str, Any]) -> Alert:
    """A store row as the detectors' :class:`Alert` (what the response policy takes)."""
    evidence = row["evidence"]
    return Alert(alert_id=row["alert_id"], detector=row["detector"], severity=row["severity"], score=row["score"],
                 src_ip=row["src_ip"], tenant=row["tenant"], window_start=iso(to_ms(row["window_start"])),
                 window_end=iso(to_ms(row["window_end"])), reasons=list(row["reasons"]),
                 evidence=json.loads(evidence) if isinstance(evidence, str) and evidence else {},
                 exempted=bool(row["exempted"]), suppressed=row["suppressed"], status=row["status"],
                 created_at=iso(to_ms(row["created_at"])), incident_id=row.get("incident_id", ""),
                 next_step=row.get("next_step", ""))


def alert_json(row: dict[str, Any]) -> dict[str, Any]:
    """A store row as JSON: times in ISO 8601 UTC, evidence decoded."""
    out = {k: v for k, v in row.items() if k != "severity_rank"}
    for k in ("window_start", "window_end", "created_at"):
        out[k] = iso_z(row[k])
    ev = row.get("evidence")
    out["evidence"] = json.loads(ev) if isinstance(ev, str) and ev else (ev or {})
    out["reasons"] = list(row["reasons"])
    return out


def detectors_seen(store: Store) -> list[str]:
    return [r[0] for r in store.query(f"SELECT DISTINCT detector FROM {store.database}.alerts ORDER BY detector")]


# -- the evidence of one alert ------------------------------------------------------------------------
IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _scope(alert: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Which flows belong to the alert: its source IP, the addresses of its source prefix (an IPv6 /64 or an
    inventory prefix: one range of the typed ``src_ip``), or its tenant for tenant-level alerts."""
    src = alert["src_ip"]
    net = key_network(src) if src and "/" in src else None
    if net is not None:
        cond = "src_ip BETWEEN toIPv6({lo:String}) AND toIPv6({hi:String})"
        if net.version == 6 and net.overlaps(IPV4_MAPPED):
            # IPv4 flows are stored IPv4-mapped: a prefix around ::ffff:0:0/96 does not take them in
            cond += " AND NOT (src_ip BETWEEN toIPv6('::ffff:0.0.0.0') AND toIPv6('::ffff:255.255.255.255'))"
        return cond, {"lo": str(net[0]), "hi": str(net[-1])}
    if src:
        return "src_ip = {scope:String}", {"scope": src}
    return "tenant = {scope:String}", {"scope": alert["tenant"]}


@dataclass(frozen=True)
class Minute:
    start_ms: int
    connections: int
    distinct_dst: int
    rejected: int


def traffic_minutes(store: Store, alert: dict[str, Any], margin_min: int = CHART_MARGIN_MIN) -> list[Minute]:
    """Per minute from ``margin_min`` before the alert window to ``margin_min`` after it: connections
    (sampling applied, as the window features count them), distinct destinations and rejected
    connections of the alert's source; minutes without flows are zeros."""
    start = to_ms(alert["window_start"]) // MINUTE_MS * MINUTE_MS - margin_min * MINUTE_MS
    end = -(-to_ms(alert["window_end"]) // MINUTE_MS) * MINUTE_MS + margin_min * MINUTE_MS
    cond, params = _scope(alert)
    rows = store.query(
        "SELECT toUnixTimestamp(toStartOfMinute(`start`)) * 1000 AS m, sum(greatest(sampling_rate, 1)), "
        "uniqExact(dst_ip), sumIf(greatest(sampling_rate, 1), action = 'reject') "
        f"FROM {store.database}.flows FINAL WHERE {cond} "
        "AND `start` >= {lo:DateTime64(3, 'UTC')} AND `start` < {hi:DateTime64(3, 'UTC')} GROUP BY m ORDER BY m",
        {**params, "lo": from_ms(start), "hi": from_ms(end)})
    by_minute = {int(r[0]): r for r in rows}
    out = []
    for m in range(start, end, MINUTE_MS):
        r = by_minute.get(m)
        out.append(Minute(m, int(r[1]), int(r[2]), int(r[3])) if r else Minute(m, 0, 0, 0))
    return out


@dataclass(frozen=True)
class Destination:
    dst_ip: str
    ports: list[int]
    connections: int
    rejected: int
    bytes: int


def top_destinations(store: Store, alert: dict[str, Any], limit: int = 10) -> list[Destination]:
    """The destinations the alert's source connected to most within the alert window."""
    cond, params = _scope(alert)
    rows = store.query(
        f"SELECT {addr_text('dst_ip')} AS dst_ip, groupUniqArray(dst_port), sum(greatest(sampling_rate, 1)) AS n, "
        "sumIf(greatest(sampling_rate, 1), action = 'reject'), sum(bytes * greatest(sampling_rate, 1)) "
        f"FROM {store.database}.flows FINAL WHERE {cond} "
        "AND `start` >= {lo:DateTime64(3, 'UTC')} AND `start` < {hi:DateTime64(3, 'UTC')} "
        "GROUP BY dst_ip ORDER BY n DESC, dst_ip LIMIT {limit:UInt32}",
        {**params, "lo": alert["window_start"], "hi": alert["window_end"], "limit": limit})
    return [Destination(r[0], sorted(int(p) for p in r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]


def actions_of(store: Store, alert_id: str) -> list[dict[str, Any]]:
    names = [n for n, _ in schema.ALERT_ACTION_COLUMNS]
    rows = store.query(f"SELECT {', '.join(names)} FROM {store.database}.{schema.ALERT_ACTIONS} "
                       "WHERE alert_id = {id:String} ORDER BY at, action_id", {"id": alert_id})
    out = []
    for r in rows:
        d = dict(zip(names, r))
        d["at"] = utc(d["at"])
        d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
        out.append(d)
    return out


def label_of(store: Store, alert_id: str) -> dict[str, Any] | None:
    names = [n for n, _ in schema.REVIEW_LABEL_COLUMNS]
    rows = store.query(f"SELECT {', '.join(names)} FROM {store.database}.{schema.REVIEW_LABELS} FINAL "
                       "WHERE alert_id = {id:String}", {"id": alert_id})
    if not rows:
        return None
    d = dict(zip(names, rows[0]))
    d["at"], d["window_start"] = utc(d["at"]), utc(d["window_start"])
    return d


def earlier_verdicts(store: Store, alert: dict[str, Any]) -> dict[str, int]:
    """How the team judged this source's earlier alerts of the same detector (windows before this
    one): ``{"confirmed": n, "false_positive": m}``; empty for a tenant alert."""
    if not alert.get("src_ip"):
        return {}
    rows = store.query(
        f"SELECT label, count() FROM {store.database}.{schema.REVIEW_LABELS} FINAL WHERE src_ip = {{ip:String}} "
        "AND detector = {detector:String} AND window_start < {ws:DateTime64(3, 'UTC')} GROUP BY label",
        {"ip": alert["src_ip"], "detector": alert["detector"], "ws": alert["window_start"]})
    return {str(label): int(n) for label, n in rows}


def stored_dnsbl(store: Store, ip: str) -> list[dict[str, Any]]:
    """The latest stored answer of every zone for ``ip``."""
    names = list(DNSBL_ANSWER.names)
    rows = store.query(
        f"SELECT {', '.join(f'argMax({n}, checked_at)' for n in names if n != 'zone')}, zone "
        f"FROM {store.database}.{DNSBL_ANSWER.table} WHERE ip = {{ip:String}} GROUP BY zone ORDER BY zone",
        {"ip": ip})
    out = []
    for r in rows:
        d = dict(zip([n for n in names if n != "zone"] + ["zone"], r))
        d["checked_at"] = utc(d["checked_at"])
        d["codes"] = list(d["codes"])
        out.append(d)
    return out


# -- pipeline health ------------------------------------------------------------------------------------
@dataclass
class Health:
    tables: set[str]
    flows: int = 0
    first_flow: dt.datetime | None = None
    last_flow: dt.datetime | None = None
    windows: int = 0
    last_window_end: dt.datetime | None = None
    alerts_by_severity: dict[str, int] = field(default_factory=dict)
    suppressed: int = 0
    alerts_by_status: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    webhook_dead_letters: int | None = None
    """None when the table does not exist"""

    def to_dict(self) -> dict[str, Any]:
        return {"flows": self.flows, "first_flow": iso_z(self.first_flow), "last_flow": iso_z(self.last_flow),
                "windows": self.windows, "last_window_end": iso_z(self.last_window_end),
                "alerts_by_severity": self.alerts_by_severity, "suppressed": self.suppressed,
                "alerts_by_status": self.alerts_by_status, "review_labels": self.labels,
                "checkpoints": [{**c, "saved_at": iso_z(c["saved_at"]), "closed_upto": iso_z(c["closed_upto"])}
                                for c in self.checkpoints],
                "webhook_dead_letters": self.webhook_dead_letters}


def health(store: Store) -> Health:
    """Counts and latest times from the store (exact where ClickHouse keeps them cheaply)."""
    db = store.database
    tables = {r[0] for r in store.query("SELECT name FROM system.tables WHERE database = {db:String}", {"db": db})}
    h = Health(tables)
    if "flows" in tables:
        n, first, last = store.query(f"SELECT count(), min(`start`), max(`start`) FROM {db}.flows")[0]
        h.flows, h.first_flow, h.last_flow = int(n), (utc(first) if n else None), (utc(last) if n else None)
    if "window_features" in tables:
        n, last = store.query(f"SELECT count(), max(window_end) FROM {db}.window_features")[0]
        h.windows, h.last_window_end = int(n), (utc(last) if n else None)
    if "alerts" in tables:
        for sev, suppressed, n in store.query(f"SELECT severity, suppressed != '', count() FROM {db}.alerts FINAL "
                                              "GROUP BY severity, suppressed != ''"):
            if suppressed:
                h.suppressed += int(n)
            else:
                h.alerts_by_severity[sev] = h.alerts_by_severity.get(sev, 0) + int(n)
        h.alerts_by_severity = {s: h.alerts_by_severity.get(s, 0) for s in reversed(SEVERITIES)}
        status_sql = (f"SELECT if(st.status = '', a.status, st.status) AS s, count() FROM {db}.alerts AS a FINAL "
                      f"{_status_join(db)} WHERE a.suppressed = '' GROUP BY s")
        counts = dict(store.query(status_sql))
        h.alerts_by_status = {s: int(counts.get(s, 0)) for s in STATUSES}
    if schema.REVIEW_LABELS in tables:
        h.labels = {r[0]: int(r[1]) for r in store.query(
            f"SELECT label, count() FROM {db}.{schema.REVIEW_LABELS} FINAL GROUP BY label ORDER BY label")}
    if "detector_state" in tables:
        h.checkpoints = [{"group_id": r[0], "topic": r[1], "partition": int(r[2]), "saved_at": utc(r[3]),
                          "closed_upto": from_ms(int(r[4])) if int(r[4]) > 0 else None}
                         for r in store.query(f"SELECT group_id, topic, partition, saved_at, closed_upto_ms "
                                              f"FROM {db}.detector_state FINAL ORDER BY group_id, topic, partition")]
    if DEAD_LETTER_TABLE in tables:
        h.webhook_dead_letters = int(store.query(f"SELECT count() FROM {db}.{DEAD_LETTER_TABLE}")[0][0])
    return h
