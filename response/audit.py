"""Scheduled blacklist audits: look our own senders up in DNS blocklists and report what changed.

An audit resolves its targets (``exempted``: the addresses the exemption registry lets send;
``flagged``: sources of medium or worse alerts in the last 7 days; or a CIDR block / address),
looks every address up in every selected zone through one :class:`~smtpguard.response.dnsbl.Checker`,
stores each answer in ``audit_results`` and the run in ``audit_runs``, and compares with the
earlier audits read back from the store, so a restart loses nothing.

Comparison, per (address, zone), against the latest *answered* status of earlier completed
audits (a timeout in one audit does not erase what the audit before it saw):

================ ==================================================================
newly_listed     listed now, answered "not listed" (or policy only) before
delisted         answered "not listed" (or policy only) now, listed before
still_listed     listed now and before
listed_no_prior  listed now, never answered before (a new target, or only errors)
errors           the list did not answer now: never counted as a listing or delisting
================ ==================================================================

The first audit in a store is the baseline and reports no changes. A run row is written only
after all its results, so an interrupted audit leaves no run and is never compared against.

Audits never overlap: each holds an exclusive lock file under the data directory while it runs.

Example::

    with AuditLock(data_dir), Store(dsn, db) as store:
        audit = run_audit(store, Checker(cfg.dnsbl), ["exempted", "flagged"], report_dir=Path("audits"))
        print(audit.counts, audit.paths)
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import html
import io
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from smtpguard.response.dnsbl import Checker, Result, check_sync
from smtpguard.core.errors import InputError, SmtpguardError, StoreError
from smtpguard.core.store import SEVERITIES, Store

RUNS = "audit_runs"
RESULTS = "audit_results"
#: The widest block a target may expand to: a /22 in IPv4. Wider blocks are refused rather than
#: silently truncated, because a partial audit of a block would read as a clean one.
MAX_BLOCK_ADDRESSES = 1024
FLAGGED_DAYS = 7
FLAGGED_MIN_SEVERITY = "medium"
CATEGORIES = ("newly_listed", "delisted", "still_listed", "listed_no_prior", "errors")
TITLES = {
    "newly_listed": "Newly listed",
    "delisted": "Delisted",
    "still_listed": "Still listed",
    "listed_no_prior": "Listed, no earlier answer to compare with",
    "errors": "Errors (the list did not answer; not counted as listed or delisted)",
}
#: Statuses that are an answer saying "not a listing".
CLEAN = ("not_listed", "policy")


class AuditBusyError(SmtpguardError):
    """Another audit holds the lock; exit status 1."""


def migrations(db: str) -> list[tuple[str, list[str]]]:
    return [("audit-1", [
        f"""CREATE TABLE IF NOT EXISTS {db}.{RUNS} (
    `audit_id` String, `started_at` DateTime64(3, 'UTC'), `finished_at` DateTime64(3, 'UTC'),
    `targets` Array(String), `zones` Array(String), `addresses` UInt32, `counts` Map(String, UInt32)
) ENGINE = MergeTree ORDER BY (`started_at`, `audit_id`)""",
        f"""CREATE TABLE IF NOT EXISTS {db}.{RESULTS} (
    `audit_id` String, `run_at` DateTime64(3, 'UTC'), `ip` String, `zone` LowCardinality(String),
    `status` LowCardinality(String), `codes` Array(String), `meaning` String, `delist_url` String,
    `error` LowCardinality(String)
) ENGINE = MergeTree ORDER BY (`ip`, `zone`, `run_at`)""",
    ])]


def ensure_tables(store: Store) -> None:
    """Create the audit tables (idempotent), so audits work whether or not the store's migrations list this module."""
    for _step, sqls in migrations(store.database):
        for sql in sqls:
            try:
                store.client.command(sql)
            except Exception as e:
                raise StoreError(f"creating the audit tables failed: {e}") from e


# -- lock ---------------------------------------------------------------------------------------------
class AuditLock:
    """An exclusive flock on ``<data_dir>/audits/audit.lock``; the holder's PID is written into it.

    flock locks belong to the open file, so a second holder is refused in the same process too.
    """

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.path = Path(data_dir) / "audits" / "audit.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise AuditBusyError(f"another blacklist audit is running ({owner}; lock {self.path}); "
                                 "audits never overlap, try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {_iso(_now())}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> AuditLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- targets ------------------------------------------------------------------------------------------
def _expand(net: ipaddress.IPv4Network | ipaddress.IPv6Network, origin: str) -> list[str]:
    if net.num_addresses > MAX_BLOCK_ADDRESSES:
        raise InputError(f"target {origin}: {net} has {net.num_addresses} addresses; an audit expands blocks of at "
                         f"most {MAX_BLOCK_ADDRESSES} addresses (an IPv4 /22): audit it as smaller blocks")
    return [str(a) for a in net]


def resolve_targets(store: Store, specs: Sequence[str], *, now: dt.datetime | None = None) -> list[str]:
    """``exempted``, ``flagged``, CIDR blocks and addresses -> distinct addresses, sorted."""
    from smtpguard.core.registry import Registry

    now = now or _now()
    out: set[str] = set()
    for spec in (s.strip() for s in specs):
        if not spec:
            continue
        if spec == "exempted":
            # allowed(): the disjoint networks the registry lets send now (revoked cut-outs excluded)
            for net, state in Registry(store).allowed():
                out.update(_expand(net, f"exempted ({state.key})"))
        elif spec == "flagged":
            out.update(flagged_ips(store, now - dt.timedelta(days=FLAGGED_DAYS), now))
        else:
            try:
                net = ipaddress.ip_network(spec, strict=True)
            except ValueError as e:
                raise InputError(f"target {spec!r} is not exempted, flagged, an address or a CIDR block: {e}") from None
            out.update(_expand(net, spec))
    return sorted(out, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def flagged_ips(store: Store, since: dt.datetime, until: dt.datetime) -> list[str]:
    rows = store.query(
        f"SELECT DISTINCT src_ip FROM {store.database}.alerts FINAL WHERE src_ip IS NOT NULL AND src_ip != '' "
        "AND severity_rank >= {rank:UInt8} AND window_end >= {since:DateTime64(3, 'UTC')} "
        "AND window_end <= {until:DateTime64(3, 'UTC')}",
        {"rank": SEVERITIES.index(FLAGGED_MIN_SEVERITY), "since": since, "until": until})
    return [r[0] for r in rows]


def first_flagged(store: Store, ips: Sequence[str], until: dt.datetime) -> dict[str, dt.datetime]:
    """When smtpguard first raised a medium or worse alert for each address (window end), up to ``until``."""
    if not ips:
        return {}
    rows = store.query(
        f"SELECT src_ip, min(window_end) FROM {store.database}.alerts FINAL WHERE src_ip IN {{ips:Array(String)}} "
        "AND severity_rank >= {rank:UInt8} AND window_end <= {until:DateTime64(3, 'UTC')} GROUP BY src_ip",
        {"ips": list(ips), "rank": SEVERITIES.index(FLAGGED_MIN_SEVERITY), "until": until})
    return {ip: _utc(t) for ip, t in rows}


# -- the audit ----------------------------------------------------------------------------------------
@dataclass
class Change:
    category: str
    ip: str
    zone: str
    status: str
    previous: str
    """the latest answered status of earlier audits ('' = none)"""
    codes: list[str]
    meaning: str
    delist_url: str
    first_flagged_at: dt.datetime | None = None
    """newly listed only: the first medium+ alert for the address, if any came before this audit"""

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("category", "ip", "zone", "status", "previous", "codes", "meaning",
                                             "delist_url")}
        d["first_flagged_at"] = _iso(self.first_flagged_at) if self.first_flagged_at else None
        return d


@dataclass
class Audit:
    audit_id: str
    started_at: dt.datetime
    finished_at: dt.datetime
    targets: list[str]
    zones: list[str]
    addresses: list[str]
    previous_id: str | None
    """the latest earlier completed audit; None = this one is the baseline"""
    previous_started_at: dt.datetime | None
    changes: list[Change] = field(default_factory=list)
    listed: int = 0
    lookups: int = 0
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def baseline(self) -> bool:
        return self.previous_id is None

    def of(self, category: str) -> list[Change]:
        return [c for c in self.changes if c.category == category]

    @property
    def counts(self) -> dict[str, int]:
        return {"lookups": self.lookups, "addresses": len(self.addresses), "listed": self.listed,
                **{c: len(self.of(c)) for c in CATEGORIES}}

    def lead(self, c: Change) -> dt.timedelta | None:
        return self.started_at - c.first_flagged_at if c.first_flagged_at else None

    def to_dict(self) -> dict[str, Any]:
        return {"audit_id": self.audit_id, "started_at": _iso(self.started_at), "finished_at": _iso(self.finished_at),
                "targets": self.targets, "zones": self.zones, "baseline": self.baseline,
                "previous_audit_id": self.previous_id, "counts": self.counts,
                "changes": [c.to_dict() | ({"flagged_lead_s": int(self.lead(c).total_seconds())} if self.lead(c) else {})
                            for c in self.changes],
                "reports": {k: str(v) for k, v in self.paths.items()}}


def new_audit_id(at: dt.datetime) -> str:
    # sortable by time; the random tail keeps two audits of one second apart
    return at.strftime("%Y%m%dT%H%M%S") + f"{at.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def previous_audit(store: Store, before: dt.datetime) -> tuple[str, dt.datetime] | None:
    rows = store.query(f"SELECT audit_id, started_at FROM {store.database}.{RUNS} "
                       "WHERE started_at < {t:DateTime64(3, 'UTC')} ORDER BY started_at DESC, audit_id DESC LIMIT 1",
                       {"t": before})
    return (rows[0][0], _utc(rows[0][1])) if rows else None


def _prior_answers(store: Store, ips: Sequence[str], before: dt.datetime) -> dict[tuple[str, str], str]:
    """(ip, zone) -> the latest answered (non-error) status among completed audits before ``before``."""
    if not ips:
        return {}
    db = store.database
    rows = store.query(
        f"SELECT ip, zone, argMax(status, run_at) FROM {db}.{RESULTS} "
        f"WHERE audit_id IN (SELECT audit_id FROM {db}.{RUNS}) AND status != 'error' "
        "AND run_at < {t:DateTime64(3, 'UTC')} AND ip IN {ips:Array(String)} GROUP BY ip, zone",
        {"t": before, "ips": list(ips)})
    return {(ip, zone): status for ip, zone, status in rows}


def compare(results: Sequence[Result], prior: dict[tuple[str, str], str]) -> list[Change]:
    out = []
    for r in results:
        before = prior.get((r.ip, r.zone), "")
        if r.status == "error":
            cat = "errors"
        elif r.status == "listed":
            cat = {"listed": "still_listed", "": "listed_no_prior"}.get(before, "newly_listed")
        elif before == "listed":
            cat = "delisted"
        else:
            continue
        out.append(Change(cat, r.ip, r.zone, r.status, before, list(r.codes), r.meaning, r.delist_url))
    return out


def run_audit(store: Store, checker: Checker, targets: Sequence[str], *, zones: Sequence[str] | None = None,
              resolver: str | None = None, report_dir: Path) -> Audit:
    """One audit: resolve, look up, store, compare with the earlier audits, write the reports.

    The caller holds the :class:`AuditLock`.
    """
    ensure_tables(store)
    started = _now()
    audit_id = new_audit_id(started)
    chosen = [z.name for z in checker.select(list(zones) if zones else None)]
    addresses = resolve_targets(store, targets, now=started)
    results = check_sync(addresses, chosen, checker=checker, resolver=resolver) if addresses else []
    prev = previous_audit(store, started)
    audit = Audit(audit_id, started, started, list(targets), chosen, addresses, prev[0] if prev else None,
                  prev[1] if prev else None, lookups=len(results),
                  listed=sum(1 for r in results if r.status == "listed"))
    if prev is not None:
        audit.changes = compare(results, _prior_answers(store, addresses, started))
    else:
        # the baseline reports no changes, but errors are still worth knowing about
        audit.changes = [c for c in compare(results, {}) if c.category == "errors"]
    newly = audit.of("newly_listed")
    flagged = first_flagged(store, sorted({c.ip for c in newly}), started)
    for c in newly:
        c.first_flagged_at = flagged.get(c.ip)
    _store_results(store, audit_id, started, results)
    audit.finished_at = _now()
    _store_run(store, audit)
    audit.paths = write_reports(audit, report_dir)
    return audit


def _store_results(store: Store, audit_id: str, at: dt.datetime, results: Sequence[Result]) -> None:
    if not results:
        return
    rows = [[audit_id, at, r.ip, r.zone, r.status, list(r.codes), r.meaning, r.delist_url, r.error or ""]
            for r in results]
    try:
        store.client.insert(f"{store.database}.{RESULTS}", rows,
                            column_names=["audit_id", "run_at", "ip", "zone", "status", "codes", "meaning",
                                          "delist_url", "error"])
    except Exception as e:
        raise StoreError(f"writing {len(rows)} audit results failed: {e}") from e


def _store_run(store: Store, audit: Audit) -> None:
    try:
        store.client.insert(f"{store.database}.{RUNS}",
                            [[audit.audit_id, audit.started_at, audit.finished_at, audit.targets, audit.zones,
                              len(audit.addresses), audit.counts]],
                            column_names=["audit_id", "started_at", "finished_at", "targets", "zones", "addresses",
                                          "counts"])
    except Exception as e:
        raise StoreError(f"recording audit {audit.audit_id} failed: {e}") from e


def list_runs(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    ensure_tables(store)
    names = ["audit_id", "started_at", "finished_at", "targets", "zones", "addresses", "counts"]
    rows = store.query(f"SELECT {', '.join(names)} FROM {store.database}.{RUNS} "
                       "ORDER BY started_at DESC LIMIT {n:UInt32}", {"n": limit})
    return [dict(zip(names, r)) for r in rows]


# -- reports ------------------------------------------------------------------------------------------
def _human(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d {hours}h" if days else f"{hours}h {rest // 60}m"


def flag_note(audit: Audit, c: Change) -> str:
    if c.category != "newly_listed":
        return ""
    if c.first_flagged_at is None:
        return "not flagged by smtpguard before the listing"
    note = (f"flagged by smtpguard at {_iso(c.first_flagged_at)}, {_human(audit.lead(c))} before this audit "
            "found the listing")
    if audit.previous_started_at and c.first_flagged_at <= audit.previous_started_at:
        # the previous audit still saw the address unlisted, so the alert certainly came first
        note += " (and before the previous audit, when it was not yet listed)"
    return note


def _heading(audit: Audit) -> str:
    if audit.baseline:
        return "baseline: first audit, no earlier audit to compare with, so no changes are reported"
    return f"compared with audit {audit.previous_id} ({_iso(audit.previous_started_at)})"


def markdown(audit: Audit) -> str:
    lines = [f"# Blacklist audit {audit.audit_id}", "",
             f"- started {_iso(audit.started_at)}, finished {_iso(audit.finished_at)}",
             f"- targets: {', '.join(audit.targets)} ({len(audit.addresses)} addresses)",
             f"- zones: {', '.join(audit.zones)}", f"- {_heading(audit)}",
             f"- lookups {audit.lookups}, listed now {audit.listed}", ""]
    for cat in CATEGORIES:
        rows = audit.of(cat)
        if audit.baseline and cat != "errors":
            continue
        lines += [f"## {TITLES[cat]} ({len(rows)})", ""]
        if not rows:
            lines += ["none", ""]
            continue
        lines += ["| IP | zone | codes | meaning | delisting | flagged before |", "|---|---|---|---|---|---|"]
        for c in rows:
            cells = [c.ip, c.zone, ", ".join(c.codes) or "-", c.meaning, c.delist_url or "-", flag_note(audit, c) or "-"]
            lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def html_report(audit: Audit) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Blacklist audit {e(audit.audit_id)}</title>"
             "</head><body>", f"<h1>Blacklist audit {e(audit.audit_id)}</h1><ul>",
             f"<li>started {e(_iso(audit.started_at))}, finished {e(_iso(audit.finished_at))}</li>",
             f"<li>targets: {e(', '.join(audit.targets))} ({len(audit.addresses)} addresses)</li>",
             f"<li>zones: {e(', '.join(audit.zones))}</li><li>{e(_heading(audit))}</li>",
             f"<li>lookups {audit.lookups}, listed now {audit.listed}</li></ul>"]
    for cat in CATEGORIES:
        if audit.baseline and cat != "errors":
            continue
        rows = audit.of(cat)
        parts.append(f"<h2>{e(TITLES[cat])} ({len(rows)})</h2>")
        if not rows:
            parts.append("<p>none</p>")
            continue
        parts.append("<table><tr><th>IP</th><th>zone</th><th>codes</th><th>meaning</th><th>delisting</th>"
                     "<th>flagged before</th></tr>")
        for c in rows:
            link = f"<a href='{e(c.delist_url, quote=True)}'>{e(c.delist_url)}</a>" if c.delist_url else "-"
            parts.append(f"<tr><td>{e(c.ip)}</td><td>{e(c.zone)}</td><td>{e(', '.join(c.codes))}</td>"
                         f"<td>{e(c.meaning)}</td><td>{link}</td><td>{e(flag_note(audit, c))}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def csv_report(audit: Audit) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["audit_id", "category", "ip", "zone", "status", "previous_status", "codes", "meaning", "delist_url",
                "first_flagged_at", "flagged_lead_s"])
    for c in audit.changes:
        lead = audit.lead(c)
        w.writerow([audit.audit_id, c.category, c.ip, c.zone, c.status, c.previous, " ".join(c.codes), c.meaning,
                    c.delist_url, _iso(c.first_flagged_at) if c.first_flagged_at else "",
                    int(lead.total_seconds()) if lead else ""])
    return buf.getvalue()


def write_reports(audit: Audit, report_dir: Path) -> dict[str, Path]:
    from smtpguard.core.registry import write_atomically

    out = {}
    for ext, render in (("md", markdown), ("html", html_report), ("csv", csv_report)):
        path = Path(report_dir) / f"{audit.audit_id}.{ext}"
        text = render(audit)
        write_atomically(path, lambda fh, text=text: fh.write(text))
        out[ext] = path
    return out


# -- time ---------------------------------------------------------------------------------------------
def _now() -> dt.datetime:
    # millisecond precision: what DateTime64(3) stores, so comparisons with read-back times agree
    t = dt.datetime.now(dt.timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def _utc(t: dt.datetime) -> dt.datetime:
    # chdb returns naive datetimes for DateTime64(3, 'UTC') columns: they are UTC
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return _utc(t).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_interval(text: str) -> float:
    """``90s``, ``30m``, ``6h``, ``1d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1
    if not value > 0:
        raise InputError(f"interval {text!r}: write a positive number with s, m, h or d (e.g. 6h)")
    return value


def dumps(audit: Audit) -> str:
    return json.dumps(audit.to_dict())
