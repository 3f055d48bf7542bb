"""What the analysts' notebooks (``notebooks/``) share: which store to open, and pandas frames of
the queries they have in common.

The notebooks read through :class:`smtpguard.core.store.Store` like the CLI and the console. One
alert's evidence (traffic per minute, top destinations, DNSBL answers, actions) comes from
:mod:`smtpguard.console.queries`, so a notebook shows the numbers the console's alert page
shows; this module only turns those results into frames. Times in frames are UTC-aware on the
embedded engine and on a server alike.

Example::

    from smtpguard.lab import notebook as nbk
    store = nbk.open_store(os.environ.get("SMTPGUARD_STORE__DSN") or nbk.demo_dsn(), "smtpguard")
    nbk.sources(store).head(10)      # the busiest sources
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from smtpguard.core.config import mask_dsn
from smtpguard.console import queries, schema
from smtpguard.core.errors import StoreError
from smtpguard.core import registry
from smtpguard.response import policy
from smtpguard.core.store import SEVERITIES, Store, addr_text

#: Connections counted the way the window features count them: a sampled flow stands for N.
CONNS = "greatest(sampling_rate, 1)"


def demo_dsn() -> str:
    """The store ``smtpguard demo`` writes: ``chdb://DATA_DIR/demo/store`` (DATA_DIR from the config)."""
    from smtpguard.core.config import load

    return f"chdb://{Path(load().data_dir).resolve() / 'demo' / 'store'}"


def open_store(dsn: str, database: str = "smtpguard") -> Store:
    """Open the store without creating or migrating anything (an analyst's account may be read-only)."""
    store = Store(dsn, database, create=False)
    if "flows" not in tables(store):
        store.close()
        raise StoreError(f"database {database} of {mask_dsn(dsn)} has no smtpguard tables: run `smtpguard demo` "
                         "first, or set SMTPGUARD_STORE__DSN to the store the pipeline writes")
    return store


def tables(store: Store) -> set[str]:
    return {r[0] for r in store.query("SELECT name FROM system.tables WHERE database = {db:String}",
                                      {"db": store.database})}


def frame(store: Store, sql: str, params: dict[str, Any] | None = None) -> pd.DataFrame:
    """``store.query_df`` with ``{db}`` in ``sql`` replaced by the database, and times made UTC-aware
    (the embedded engine returns naive UTC times, a server aware ones)."""
    df = store.query_df(sql.replace("{db}", store.database), params)
    return _utc(df)


def _utc(df: pd.DataFrame) -> pd.DataFrame:
    for col in df.columns:
        if pd.api.types.is_datetime64_any_dtype(df[col]) and getattr(df[col].dt, "tz", None) is None:
            df[col] = df[col].dt.tz_localize("UTC")
    return df


def _records(rows: Iterable[Any], columns: list[str]) -> pd.DataFrame:
    rows = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]
    return _utc(pd.DataFrame(rows, columns=columns))


# -- traffic --------------------------------------------------------------------------------------
def sources(store: Store) -> pd.DataFrame:
    """One row per source IP, busiest first: tenant, connections, distinct destinations (fan-out),
    rejected connections and their share, active minutes, first and last flow."""
    return frame(store, f"""
        SELECT {addr_text("src_ip")} AS src_ip, any(tenant) AS tenant, sum({CONNS}) AS connections, uniqExact(dst_ip) AS distinct_dst,
               sumIf({CONNS}, action = 'reject') AS rejected, rejected / connections AS rejected_share,
               uniqExact(toStartOfMinute(`start`)) AS active_minutes, min(`start`) AS first_flow, max(`start`) AS last_flow
        FROM {{db}}.flows FINAL GROUP BY src_ip ORDER BY connections DESC, src_ip""")


def per_minute(store: Store, src_ips: list[str], *, raw: bool = False) -> pd.DataFrame:
    """Connections, distinct destinations and rejected connections per minute of the given sources, from
    the per-minute rollup (``source_minutes``: months without scanning raw flows, and beyond their
    retention); ``raw=True`` computes the same from ``flows`` (as on a store not migrated to the rollups yet)."""
    if raw or "source_minutes" not in tables(store):
        inner = f"""
            SELECT toStartOfMinute(`start`) AS minute, src_ip AS ip, sum({CONNS}) AS connections,
                   uniqExact(dst_ip) AS distinct_dst, sumIf({CONNS}, action = 'reject') AS rejected
            FROM {{db}}.flows FINAL WHERE src_ip IN {{ips:Array(String)}} GROUP BY minute, src_ip"""
    else:
        inner = """
            SELECT minute, src_ip AS ip, sum(connections) AS connections, uniqExactMerge(dst) AS distinct_dst,
                   sum(rejected) AS rejected
            FROM {db}.source_minutes FINAL WHERE src_ip IN {ips:Array(String)} GROUP BY minute, src_ip"""
    # filtered on the typed column (its index), then turned into text
    return frame(store, f"""SELECT minute, {addr_text("ip")} AS src_ip, connections, distinct_dst, rejected
        FROM ({inner}) ORDER BY minute, src_ip""", {"ips": list(src_ips)})


def tenant_traffic(store: Store, *, raw: bool = False) -> pd.DataFrame:
    """One row per tenant: sources, connections, fan-out and rejected share over everything stored, from the
    per-minute rollup (``tenant_minutes``); ``raw=True`` computes the same from ``flows`` (as on a store not
    migrated to the rollups yet)."""
    if raw or "tenant_minutes" not in tables(store):
        return frame(store, f"""
        SELECT tenant, uniqExact(src_ip) AS sources, sum({CONNS}) AS connections, uniqExact(dst_ip) AS distinct_dst,
               sumIf({CONNS}, action = 'reject') AS rejected, rejected / connections AS rejected_share
        FROM {{db}}.flows FINAL GROUP BY tenant ORDER BY tenant""")
    return frame(store, """
        SELECT tenant, uniqExactMerge(sources) AS sources, sum(connections) AS connections,
               uniqExactMerge(dst) AS distinct_dst, sum(rejected) AS rejected, rejected / connections AS rejected_share
        FROM {db}.tenant_minutes FINAL GROUP BY tenant ORDER BY tenant""")


def tenants(store: Store) -> pd.DataFrame:
    """One row per tenant: sources, connections, fan-out, rejected share, raised alerts and the worst severity."""
    traffic = tenant_traffic(store)
    alerts = frame(store, "SELECT tenant, count() AS alerts, max(severity_rank) AS worst FROM {db}.alerts FINAL "
                          "WHERE suppressed = '' GROUP BY tenant")
    alerts["worst_severity"] = [SEVERITIES[int(r)] for r in alerts.pop("worst")]
    out = traffic.merge(alerts, on="tenant", how="left")
    out["alerts"] = out["alerts"].fillna(0).astype(int)
    out["worst_severity"] = out["worst_severity"].fillna("")
    return out.sort_values(["connections", "tenant"], ascending=[False, True]).reset_index(drop=True)


# -- one alert and its incident -------------------------------------------------------------------
def pick_alert(store: Store, alert_id: str = "", incident_id: str = "") -> dict[str, Any]:
    """The alert named, else the worst raised alert (of the incident, when one is named): highest
    severity, then score, then the earliest window. Returned as the console reads it (with status)."""
    if not alert_id:
        where, params = ["suppressed = ''"], {}
        if incident_id:
            where.append("incident_id = {incident:String}")
            params["incident"] = incident_id
        rows = store.query(f"SELECT alert_id FROM {store.database}.alerts FINAL WHERE {' AND '.join(where)} "
                           "ORDER BY severity_rank DESC, score DESC, window_start, alert_id LIMIT 1", params)
        if not rows:
            raise StoreError(f"no raised alerts{' in incident ' + incident_id if incident_id else ''} in the store")
        alert_id = rows[0][0]
    alert = queries.get_alert(store, alert_id)
    if alert is None:
        raise StoreError(f"no alert {alert_id} in the store")
    return alert


def incident_alerts(store: Store, alert: dict[str, Any]) -> pd.DataFrame:
    """Every alert of the alert's incident (repeats suppressed by cooldown included), in time order."""
    if not alert["incident_id"]:
        where, params = "alert_id = {id:String}", {"id": alert["alert_id"]}
    else:
        where, params = "incident_id = {incident:String}", {"incident": alert["incident_id"]}
    return frame(store, "SELECT alert_id, window_start, window_end, detector, severity, score, suppressed, "
                        f"reasons[1] AS reason FROM {{db}}.alerts FINAL WHERE {where} ORDER BY window_start, alert_id",
                 params)


def evidence(alert: dict[str, Any]) -> pd.Series:
    """The window features the detector saw, as stored with the alert."""
    ev = alert["evidence"]
    return pd.Series(json.loads(ev) if isinstance(ev, str) and ev else dict(ev or {}), name="evidence", dtype=object)


def minutes(store: Store, alert: dict[str, Any], first: Any = None, last: Any = None,
            margin_min: int = queries.CHART_MARGIN_MIN) -> pd.DataFrame:
    """Connections, distinct destinations and rejects per minute of the alert's source (or tenant),
    from ``margin_min`` before ``first`` (default: the alert window) to ``margin_min`` after ``last``."""
    span = {**alert, "window_start": first if first is not None else alert["window_start"],
            "window_end": last if last is not None else alert["window_end"]}
    df = _records(queries.traffic_minutes(store, span, margin_min), ["start_ms", "connections", "distinct_dst", "rejected"])
    df.insert(0, "minute", pd.to_datetime(df.pop("start_ms"), unit="ms", utc=True))
    return df.set_index("minute")


def destinations(store: Store, alert: dict[str, Any], limit: int = 10) -> pd.DataFrame:
    """The servers the source connected to most within the alert window."""
    return _records(queries.top_destinations(store, alert, limit),
                    ["dst_ip", "ports", "connections", "rejected", "bytes"])


def exemption(store: Store, ip: str, at: Any = None) -> tuple[registry.Shown, pd.DataFrame]:
    """The registry's view of ``ip`` (at ``at``, default now) and the key's whole event history."""
    at_ms = queries.to_ms(at) if at is not None else None
    shown = registry.Registry(store).show(ip, at_ms)
    return shown, _records((e.to_dict() for e in shown.history),
                           ["at", "kind", "ip", "tenant", "actor", "reason", "alert_ids", "expires_at", "event_id"])


def dnsbl(store: Store, ip: str) -> pd.DataFrame:
    """The latest stored DNSBL answer of every zone for ``ip`` (empty when none was stored)."""
    from smtpguard.response.lookups import DNSBL_ANSWER

    if DNSBL_ANSWER.table not in tables(store):
        return pd.DataFrame(columns=list(DNSBL_ANSWER.names))
    return _records(queries.stored_dnsbl(store, ip), list(DNSBL_ANSWER.names))


def actions(store: Store, alert_ids: list[str], ip: str | None = None) -> pd.DataFrame:
    """What was done about the alerts, in time order: people's actions (console, CLI), the response
    policy's decisions, and exemption changes that name the alerts."""
    have = tables(store)
    rows: list[dict[str, Any]] = []
    if schema.ALERT_ACTIONS in have:
        for aid in alert_ids:
            rows += [{"at": a["at"], "by": a["actor"], "what": a["action"], "alert_id": aid, "detail": a["message"]}
                     for a in queries.actions_of(store, aid)]
    if policy.DECISIONS_TABLE in have:
        wanted = set(alert_ids)
        rows += [{"at": schema.utc(d["decided_at"]), "by": "response policy", "what": f"decision: {d['action']}",
                  "alert_id": d["alert_id"], "detail": d["reason"]}
                 for d in policy.DecisionLog(store).list(ip=ip, limit=100_000) if d["alert_id"] in wanted]
    if registry.TABLE in have:
        for aid in alert_ids:
            rows += [{"at": e.at, "by": e.actor, "what": f"exemption {e.kind}", "alert_id": aid,
                      "detail": f"{e.ip}: {e.reason}"} for e in registry.Registry(store).events(alert_id=aid)]
    df = _records(rows, ["at", "by", "what", "alert_id", "detail"])
    return df.sort_values("at", kind="stable").reset_index(drop=True)


# -- labels ---------------------------------------------------------------------------------------
def review_labels(store: Store) -> pd.DataFrame:
    """The reviewers' labels (confirmed / false_positive), one per alert; empty when there are none."""
    names = [n for n, _ in schema.REVIEW_LABEL_COLUMNS]
    if schema.REVIEW_LABELS not in tables(store):
        return pd.DataFrame(columns=names)
    df = frame(store, f"SELECT {', '.join(names)} FROM {{db}}.{schema.REVIEW_LABELS} FINAL ORDER BY at, alert_id")
    return df if len(df.columns) else pd.DataFrame(columns=names)


def truth_file(dsn: str) -> Path | None:
    """The scenario truth file beside an embedded store (``smtpguard demo`` writes DIR/truth.json
    beside DIR/store), if there is one."""
    if not dsn.startswith("chdb://"):
        return None
    path = Path(dsn[len("chdb://"):]).parent / "truth.json"
    return path if path.is_file() else None
