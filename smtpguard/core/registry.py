"""The exemption registry: who may send on port 25, as an append-only log of events in the store.

Every change is an :class:`ExemptionEvent` row in ``exemption_events`` (who, when, why, which
alerts); nothing is updated or deleted. The state of a key (an address or a CIDR block) is
its events folded in order:

=========== ==================================================================================
state       meaning
=========== ==================================================================================
active      granted, renewed or restored, and ``expires_at`` not yet reached
revoked     revoked (by a person or the policy); ``restore`` lifts it
expired     ``expires_at`` has passed; ``renew`` or a new ``grant`` brings it back
lifted      a revocation cut out of a block was restored: the key has no rule of its own
=========== ==================================================================================

**Expiry is computed, not scheduled.** An exemption whose ``expires_at`` has passed reads as
expired whether or not anything ran at that moment, so every read (detectors, nftables,
export) is right on its own. :meth:`Registry.expire_due` then records the ``expired`` event
(at the expiry time, actor ``smtpguard``) so the history shows it and the enforcement outputs
learn it; ``smtpguard enforce expire`` runs it (from a timer) and every write command runs it
before it acts.

**Blocks and addresses.** A key may be a CIDR block. The most specific key that is active or
revoked decides for an address (expired and lifted keys step aside). Revoking an address
that only a block covers records a revocation for the address itself, which cuts it out of
the block; restoring it lifts the cut. :meth:`Registry.allowed` returns the resulting
disjoint networks, which the detectors (:meth:`Registry.current`), the nftables set and
``export`` all use.

One writer per key at a time: the policy executor handles an IP's alerts in one consumer
(alerts are keyed by IP), people act through the CLI. Registries are small (thousands of
keys), so reads load the log and fold it in Python.

Example::

    reg = Registry(store)
    reg.grant("198.51.100.0/28", tenant="acct-1", reason="mail relay pool, CHG-42", actor="alice")
    reg.revoke("198.51.100.3", reason="spam run", actor="bob", alert_ids=["4f1c..."])
    reg.current().lookup("198.51.100.3")   # None: cut out of the block
"""

from __future__ import annotations

import csv
import datetime as dt
import ipaddress
import itertools
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TextIO

from typing import Annotated

import msgspec

from smtpguard.core.errors import InputError, SmtpguardError
from smtpguard.core.exemptions import DECLARED_COLUMN, REQUIRED_COLUMNS, Exemption, Exemptions, parse_time
from smtpguard.core.records import RecordType, Stamp, ch
from smtpguard.core.store import Store

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

KINDS = ("granted", "renewed", "revoked", "restored", "expired")
STATES = ("active", "revoked", "expired", "lifted")
#: States whose key decides for the addresses it covers (see the module docstring).
DECIDING = ("active", "revoked")
SYSTEM_ACTOR = "smtpguard"
TABLE = "exemption_events"

def migrations(db: str) -> list[tuple[str, list[str]]]:
    """Schema steps (the registry's first steps ran as response-registry-*). Append; never edit a released one."""
    return [("response-registry-1", [
        EVENT.ddl(db, "ENGINE = MergeTree ORDER BY (`ip`, `at`, `event_id`)"),
    ]),
        # a grant or renewal may declare the sending volume the exemption is for (detectors judge by it)
        ("response-registry-2", [
            f"ALTER TABLE {db}.{TABLE} ADD COLUMN IF NOT EXISTS `declared_conns_per_min` Nullable(Float64)",
        ])]


class RegistryError(SmtpguardError):
    """The registry refused a change (no exemption to revoke, already revoked, ...); exit status 1."""


class ExemptionEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``exemption_events`` (its table: :data:`EVENT`)."""

    event_id: str
    """sortable unique id: the event time in hex, a per-process counter, random bits"""
    ip: str
    """the key: an address (``192.0.2.1``, ``2001:db8::1``) or a CIDR block (``192.0.2.0/28``)"""
    tenant: str
    kind: Annotated[str, ch("LowCardinality(String)")]
    """granted, renewed, revoked, restored or expired"""
    at: Stamp
    """when the event took effect (UTC)"""
    expires_at: Stamp | None
    """when the exemption ends by itself; None = never"""
    actor: str
    """who: a person's user name, the policy's actor, or smtpguard for expiries"""
    reason: str
    alert_ids: list[str] = []
    """the alerts behind the change"""
    declared_conns_per_min: float | None = None
    """grants and renewals: the sending volume (SMTP connections a minute) the exemption is for; None = not declared"""

    @property
    def at_ms(self) -> int:
        return to_ms(self.at)

    def to_dict(self) -> dict:
        return {"event_id": self.event_id, "ip": self.ip, "tenant": self.tenant, "kind": self.kind,
                "at": iso_ms(self.at_ms), "expires_at": iso_ms(to_ms(self.expires_at)) if self.expires_at else None,
                "actor": self.actor, "reason": self.reason, "alert_ids": list(self.alert_ids),
                "declared_conns_per_min": self.declared_conns_per_min}


EVENT = RecordType(ExemptionEvent, table=TABLE)


@dataclass(frozen=True)
class KeyState:
    """A key's events folded up to a time."""

    key: str
    network: IPNetwork
    state: str
    tenant: str
    own_grant: bool
    """the key was granted itself (not only cut out of a block by a revocation)"""
    granted_at_ms: int | None
    granted_reason: str
    expires_at_ms: int | None
    restored_at_ms: int | None
    """the last restore since the last grant, for the policy's probation after a restore"""
    last: ExemptionEvent
    declared_conns_per_min: float | None = None
    """the declared sending volume of the last grant or renewal that declared one"""

    def to_dict(self) -> dict:
        return {"ip": self.key, "state": self.state, "tenant": self.tenant,
                "granted_at": iso_ms(self.granted_at_ms) if self.granted_at_ms is not None else None,
                "granted_reason": self.granted_reason,
                "expires_at": iso_ms(self.expires_at_ms) if self.expires_at_ms is not None else None,
                "updated_at": iso_ms(self.last.at_ms), "last_kind": self.last.kind, "last_actor": self.last.actor,
                "last_reason": self.last.reason, "alert_ids": list(self.last.alert_ids),
                "declared_conns_per_min": self.declared_conns_per_min}


@dataclass(frozen=True)
class Shown:
    """One key's state, its history, and which key decides for it."""

    key: str
    state: KeyState | None
    history: list[ExemptionEvent]
    decided_by: KeyState | None
    """the most specific active or revoked key covering this one (itself when it decides)"""

    @property
    def allowed(self) -> bool:
        return self.decided_by is not None and self.decided_by.state == "active"


@dataclass(frozen=True)
class ImportResult:
    imported: list[str]
    skipped: list[str]
    """keys already in the registry (their history wins over the file)"""
    events: list[ExemptionEvent]


# -- helpers ------------------------------------------------------------------------------------
def now_ms() -> int:
    return int(time.time() * 1000)


def to_ms(t: dt.datetime) -> int:
    # chdb returns naive datetimes for DateTime64(3, 'UTC') columns: they are UTC.
    return int((t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp() * 1000)


def from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)


def iso_ms(ms: int) -> str:
    return from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_key(text: str) -> tuple[str, IPNetwork]:
    """``"192.0.2.7"`` -> ``("192.0.2.7", 192.0.2.7/32)``; a block keeps its prefix. Raises InputError.

    Host bits in a block are refused (``192.0.2.7/24``): the user meant one of two things.
    """
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise InputError(f"{text!r} is not an IP address or CIDR block: {e}") from None
    return key_of(net), net


def key_of(net: IPNetwork) -> str:
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def parse_expiry(text: str, now: int | None = None) -> dt.datetime:
    """An ``--expires`` value: ISO 8601 date or time (UTC unless a zone is given), in the future."""
    try:
        t = parse_time(text)
    except ValueError:
        raise InputError(f"{text!r} is not an ISO 8601 date or time (e.g. 2026-12-31 or 2026-12-31T18:00:00Z)") from None
    if to_ms(t) <= (now if now is not None else now_ms()):
        raise InputError(f"expiry {text} is not in the future")
    return t


_counter = itertools.count()


def new_event_id(at_ms: int) -> str:
    # Ordered by time, then by a per-process counter, so events of one key written within the
    # same millisecond keep their order when the log is read back sorted by (at, event_id).
    return f"{at_ms:012x}{next(_counter) % 0x10000:04x}{secrets.token_hex(6)}"


def fold(key: str, events: Iterable[ExemptionEvent], at_ms: int) -> KeyState | None:
    """The state of ``key`` after ``events`` (sorted by time) up to ``at_ms``."""
    state = None
    tenant = ""
    own = False
    granted_at = None
    granted_reason = ""
    expires = None
    restored = None
    last = None
    declared = None
    for e in events:
        if e.at_ms > at_ms:
            break
        last = e
        tenant = e.tenant or tenant
        if e.kind == "granted":
            own, state, granted_at, granted_reason, restored = True, "active", e.at_ms, e.reason, None
            expires = to_ms(e.expires_at) if e.expires_at else None
            declared = e.declared_conns_per_min
        elif e.kind == "renewed":
            state = "active"
            expires = to_ms(e.expires_at) if e.expires_at else None
            if e.declared_conns_per_min is not None:
                declared = e.declared_conns_per_min
        elif e.kind == "revoked":
            state = "revoked"
        elif e.kind == "restored":
            state, restored = ("active" if own else "lifted"), e.at_ms
        elif e.kind == "expired":
            state = "expired"
    if last is None:
        return None
    if state == "active" and expires is not None and expires <= at_ms:
        state = "expired"
    return KeyState(key=key, network=parse_key(key)[1], state=state, tenant=tenant, own_grant=own,
                    granted_at_ms=granted_at, granted_reason=granted_reason, expires_at_ms=expires,
                    restored_at_ms=restored, last=last, declared_conns_per_min=declared)


def decider(net: IPNetwork, states: dict[str, KeyState]) -> KeyState | None:
    """The most specific active or revoked key that covers ``net`` (``net`` itself included)."""
    best = None
    for s in states.values():
        if s.state in DECIDING and s.network.version == net.version and net.subnet_of(s.network):
            if best is None or s.network.prefixlen > best.network.prefixlen:
                best = s
    return best


def allowed_networks(states: dict[str, KeyState]) -> list[tuple[IPNetwork, KeyState]]:
    """Disjoint networks allowed to send, each with the active key it comes from.

    Keys are applied from the widest to the narrowest, each replacing what lies under it, so
    the most specific key wins: a revoked address inside an active block is cut out of it.
    """
    pieces: list[tuple[IPNetwork, KeyState]] = []
    for s in sorted((s for s in states.values() if s.state in DECIDING),
                    key=lambda s: (s.network.version, s.network.prefixlen)):
        net = s.network
        kept: list[tuple[IPNetwork, KeyState]] = []
        for p, owner in pieces:
            if p.version != net.version or not p.overlaps(net):
                kept.append((p, owner))
            elif not p.subnet_of(net):
                kept.extend((q, owner) for q in p.address_exclude(net))
        pieces = kept
        if s.state == "active":
            pieces.append((net, s))
    return sorted(pieces, key=lambda po: (po[0].version, po[0].network_address))


# -- the registry ---------------------------------------------------------------------------------
class Registry:
    """The exemption registry in a :class:`~smtpguard.core.store.Store`.

    Writes take ``now_ms`` (default: the wall clock) so that expiry can be examined at any
    time; reads take ``at_ms`` and see the registry as it was then.
    """

    def __init__(self, store: Store):
        self.store = store
        self.table = f"{store.database}.{TABLE}"

    # -- reads ------------------------------------------------------------------------------------
    def events(self, *, ip: str | None = None, tenant: str | None = None, until_ms: int | None = None,
               alert_id: str | None = None) -> list[ExemptionEvent]:
        """Events in order, optionally of one key, of keys ever held by one tenant, or naming one alert."""
        where, params = [], {}
        if until_ms is not None:
            where.append("at <= {until:DateTime64(3, 'UTC')}")
            params["until"] = from_ms(until_ms)
        if ip is not None:
            where.append("ip = {ip:String}")
            params["ip"] = ip
        if tenant is not None:
            where.append(f"ip IN (SELECT ip FROM {self.table} WHERE tenant = {{tenant:String}})")
            params["tenant"] = tenant
        if alert_id is not None:
            where.append("has(alert_ids, {alert_id:String})")
            params["alert_id"] = alert_id
        sql = (f"SELECT {EVENT.select()} FROM {self.table} WHERE {' AND '.join(where) or '1'} "
               "ORDER BY ip, at, event_id")
        return [EVENT.from_row(dict(zip(EVENT.names, row))) for row in self.store.query(sql, params)]

    def version(self) -> tuple[int, str]:
        """Changes whenever an event is added: (events, newest event id). Cheap, for readers that poll."""
        rows = self.store.query(f"SELECT count(), max(event_id) FROM {self.table}")
        return (int(rows[0][0]), str(rows[0][1])) if rows else (0, "")

    def states(self, at_ms: int | None = None, *, tenant: str | None = None) -> dict[str, KeyState]:
        at = now_ms() if at_ms is None else at_ms
        out = {}
        for key, evs in itertools.groupby(self.events(tenant=tenant, until_ms=at), key=lambda e: e.ip):
            s = fold(key, evs, at)
            if s is not None:
                out[key] = s
        return out

    def list(self, state: str = "active", *, tenant: str | None = None, at_ms: int | None = None) -> list[KeyState]:
        """Keys in ``state`` (active, revoked, expired, lifted or all), optionally of one tenant."""
        if state != "all" and state not in STATES:
            raise InputError(f"state must be one of {', '.join(STATES)} or all, not {state!r}")
        got = self.states(at_ms, tenant=tenant).values()
        return [s for s in got if state == "all" or s.state == state]

    def show(self, ip_or_cidr: str, at_ms: int | None = None) -> Shown:
        key, net = parse_key(ip_or_cidr)
        at = now_ms() if at_ms is None else at_ms
        history = self.events(ip=key)
        states = self.states(at)
        return Shown(key=key, state=states.get(key), history=history, decided_by=decider(net, states))

    def covering(self, ip: str, at_ms: int | None = None) -> KeyState | None:
        """The key that decides for ``ip`` when it lets it send (active), else None."""
        _, net = parse_key(ip)
        d = decider(net, self.states(at_ms))
        return d if d is not None and d.state == "active" else None

    def exemption_of(self, source: str, at_ms: int | None = None) -> KeyState | None:
        """The active key that lets a detection source send: the one deciding for it (an address, or a
        block around a prefix), else an active key inside it (an IPv6 source judged by its /64 whose
        exemption names one address of it; the earliest granted)."""
        _, net = parse_key(source)
        states = self.states(at_ms)
        d = decider(net, states)
        if d is not None:
            return d if d.state == "active" else None
        inner = [s for s in states.values() if s.state == "active" and s.network.version == net.version
                 and s.network.subnet_of(net)]
        return min(inner, key=lambda s: (s.granted_at_ms or 0, s.key)) if inner else None

    def allowed(self, at_ms: int | None = None) -> list[tuple[IPNetwork, KeyState]]:
        return allowed_networks(self.states(at_ms))

    def current(self, at_ms: int | None = None) -> Exemptions:
        """The exemptions in force at ``at_ms`` (default now), for the detectors."""
        return Exemptions([Exemption(net, s.tenant, s.granted_at_ms if s.granted_at_ms is not None else s.last.at_ms,
                                     s.granted_reason, s.declared_conns_per_min) for net, s in self.allowed(at_ms)])

    # -- writes -----------------------------------------------------------------------------------
    def _append(self, events: list[ExemptionEvent]) -> None:
        self.store.insert_arrow(TABLE, EVENT.to_arrow(events))

    def _write(self, key: str, kind: str, *, tenant: str, reason: str, actor: str, at_ms: int,
               expires_at_ms: int | None, alert_ids: Iterable[str] = (),
               declared: float | None = None) -> ExemptionEvent:
        if not reason.strip():
            raise InputError("a reason is required: every change to an exemption records why")
        if not actor.strip():
            raise InputError("an actor is required: every change to an exemption records who")
        e = ExemptionEvent(event_id=new_event_id(at_ms), ip=key, tenant=tenant, kind=kind, at=from_ms(at_ms),
                           expires_at=from_ms(expires_at_ms) if expires_at_ms is not None else None,
                           actor=actor, reason=reason, alert_ids=list(alert_ids), declared_conns_per_min=declared)
        self._append([e])
        return e

    def grant(self, ip_or_cidr: str, tenant: str, reason: str, actor: str, expires: dt.datetime | None = None,
              *, now_ms: int | None = None, declared: float | None = None) -> ExemptionEvent:
        key, _ = parse_key(ip_or_cidr)
        _check_declared(declared)
        now = _now(now_ms)
        if expires is not None and to_ms(expires) <= now:
            raise InputError(f"expiry {iso_ms(to_ms(expires))} is not in the future")
        s = self.states(now).get(key)
        if s is not None and s.state == "active":
            raise RegistryError(f"{key} is already exempted (granted {iso_ms(s.granted_at_ms or s.last.at_ms)} "
                                f"by {s.last.actor}); use renew to change its expiry")
        if s is not None and s.state == "revoked":
            raise RegistryError(f"{key} is revoked ({s.last.actor}, {iso_ms(s.last.at_ms)}: {s.last.reason}); "
                                "lift the revocation with restore")
        return self._write(key, "granted", tenant=tenant, reason=reason, actor=actor, at_ms=now,
                           expires_at_ms=to_ms(expires) if expires is not None else None, declared=declared)

    def renew(self, ip_or_cidr: str, reason: str, actor: str, expires: dt.datetime | None = None,
              *, now_ms: int | None = None, declared: float | None = None) -> ExemptionEvent:
        """Set a new expiry (None = never), and optionally a new declared volume, on an active or expired
        exemption."""
        key, _ = parse_key(ip_or_cidr)
        _check_declared(declared)
        now = _now(now_ms)
        if expires is not None and to_ms(expires) <= now:
            raise InputError(f"expiry {iso_ms(to_ms(expires))} is not in the future")
        s = self.states(now).get(key)
        if s is None or not s.own_grant or s.state == "lifted":
            raise RegistryError(f"{key} has no exemption of its own to renew; grant one")
        if s.state == "revoked":
            raise RegistryError(f"{key} is revoked; lift the revocation with restore first")
        return self._write(key, "renewed", tenant=s.tenant, reason=reason, actor=actor, at_ms=now,
                           expires_at_ms=to_ms(expires) if expires is not None else None, declared=declared)

    def revoke(self, ip_or_cidr: str, reason: str, actor: str, alert_ids: Iterable[str] = (),
               *, now_ms: int | None = None) -> ExemptionEvent:
        """Revoke the key's exemption; an address that only a block covers is cut out of the block."""
        key, net = parse_key(ip_or_cidr)
        now = _now(now_ms)
        states = self.states(now)
        s = states.get(key)
        if s is not None and s.state == "revoked":
            raise RegistryError(f"{key} is already revoked ({s.last.actor}, {iso_ms(s.last.at_ms)}: {s.last.reason})")
        if s is not None and s.state == "active":
            return self._write(key, "revoked", tenant=s.tenant, reason=reason, actor=actor, at_ms=now,
                               expires_at_ms=s.expires_at_ms, alert_ids=alert_ids)
        d = decider(net, states)
        if d is not None and d.state == "active":
            return self._write(key, "revoked", tenant=d.tenant, reason=reason, actor=actor, at_ms=now,
                               expires_at_ms=None, alert_ids=alert_ids)
        why = "it has no exemption"
        if s is not None and s.state == "expired":
            why = f"its exemption expired at {iso_ms(s.expires_at_ms or s.last.at_ms)}"
        elif d is not None:
            why = f"the block {d.key} that covers it is revoked"
        raise RegistryError(f"cannot revoke {key}: {why}")

    def restore(self, ip_or_cidr: str, reason: str, actor: str, *, now_ms: int | None = None) -> ExemptionEvent:
        """Lift a revocation: the exemption is as it was before (same tenant and expiry).

        Every revocation can be lifted. An exemption whose expiry passed while it was revoked
        comes back expired; renew it to let it send again.
        """
        key, _ = parse_key(ip_or_cidr)
        now = _now(now_ms)
        s = self.states(now).get(key)
        if s is None or s.state != "revoked":
            raise RegistryError(f"cannot restore {key}: it is not revoked ({s.state if s else 'it has no exemption'})")
        return self._write(key, "restored", tenant=s.tenant, reason=reason, actor=actor, at_ms=now,
                           expires_at_ms=s.expires_at_ms)

    def expire_due(self, *, now_ms: int | None = None) -> list[ExemptionEvent]:
        """Record an ``expired`` event for every exemption that has run out, at its expiry time
        (or at its last event, when it was restored after it had expired, to keep the order)."""
        now = _now(now_ms)
        due = [s for s in self.states(now).values()
               if s.state == "expired" and s.last.kind != "expired" and s.expires_at_ms is not None]
        events = []
        for s in due:
            at = max(s.expires_at_ms, s.last.at_ms)
            events.append(ExemptionEvent(event_id=new_event_id(at), ip=s.key, tenant=s.tenant, kind="expired",
                                         at=from_ms(at), expires_at=from_ms(s.expires_at_ms), actor=SYSTEM_ACTOR,
                                         reason=f"the exemption expired at {iso_ms(s.expires_at_ms)}"))
        if events:
            self._append(events)
        return events

    # -- CSV --------------------------------------------------------------------------------------
    def import_csv(self, path: str | os.PathLike[str], actor: str) -> ImportResult:
        """Grant every row of an exemptions CSV (``ip,tenant,granted_at,reason``, optional ``expires_at``)
        whose key the registry has never seen, as granted by ``actor`` at the row's ``granted_at``.

        Keys with history are skipped, so importing the same file again changes nothing and never
        undoes a revocation.
        """
        path = Path(path)
        # Exemptions.from_csv is the one reader of the format (header check, line numbers in errors);
        # the optional expires_at column is read beside it, row for row.
        entries = Exemptions.from_csv(path).entries
        with path.open(newline="") as fh:
            extra = [(row.get("expires_at") or "").strip() for row in csv.DictReader(fh)]
        known = {e.ip for e in self.events()}
        imported, skipped, events = [], [], []
        for n, (entry, exp) in enumerate(zip(entries, extra), start=2):
            key = key_of(entry.network)
            if key in known:
                skipped.append(key)
                continue
            try:
                expires_ms = to_ms(parse_time(exp)) if exp else None
            except ValueError as e:
                raise InputError(f"exemptions file {path} line {n}: expires_at: {e}") from None
            known.add(key)
            imported.append(key)
            events.append(ExemptionEvent(
                event_id=new_event_id(entry.granted_at_ms), ip=key, tenant=entry.tenant, kind="granted",
                at=from_ms(entry.granted_at_ms), expires_at=from_ms(expires_ms) if expires_ms is not None else None,
                actor=actor, reason=entry.reason or f"imported from {path.name}",
                declared_conns_per_min=entry.declared_conns_per_min))
        if events:
            self._append(events)
        return ImportResult(imported, skipped, events)

    def export_csv(self, path: str | os.PathLike[str], at_ms: int | None = None) -> int:
        """Write what is allowed at ``at_ms`` as an exemptions CSV (``ip,tenant,granted_at,reason,expires_at``).

        Blocks with revoked addresses are written as the pieces that remain, so that
        ``smtpguard analyze --exemptions FILE`` sees exactly what the streaming detectors see.
        Returns the number of rows.
        """
        rows = [[key_of(net), s.tenant, iso_ms(s.granted_at_ms if s.granted_at_ms is not None else s.last.at_ms),
                 s.granted_reason, iso_ms(s.expires_at_ms) if s.expires_at_ms is not None else "",
                 "" if s.declared_conns_per_min is None else f"{s.declared_conns_per_min:g}"]
                for net, s in self.allowed(at_ms)]

        def write(fh):
            w = csv.writer(fh)
            w.writerow([*REQUIRED_COLUMNS, "expires_at", DECLARED_COLUMN])
            w.writerows(rows)

        write_atomically(Path(path), write)
        return len(rows)


def _check_declared(declared: float | None) -> None:
    if declared is not None and not declared > 0:
        raise InputError(f"a declared volume must be a positive number of SMTP connections a minute, not {declared}")


def _now(now: int | None) -> int:
    return now_ms() if now is None else now


def write_atomically(path: Path, write: Callable[[TextIO], None], check: Callable[[Path], None] | None = None) -> None:
    """Write a text file through a temporary file beside it, so readers see the old or the new file, never half.

    ``check`` sees the finished temporary file and may raise; the old file then stays in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
