"""Console users, roles, sessions, API tokens, CSRF tokens and the login rate limit.

Roles, each allowed what the ones before it are:

========= ==================================================================================
viewer    read every page and ``GET /api/...``
analyst   act on alerts: acknowledge, confirm (applies the revocation policy), dismiss, re-check DNSBLs
admin     manage exemptions (grant, revoke, restore) and console users
========= ==================================================================================

Passwords are hashed with Argon2id (argon2-cffi's defaults, re-hashed on login when those
change). Session ids and API tokens are 256-bit random secrets; only their SHA-256 is
stored: a slow hash protects guessable passwords, and these are not guessable, so every
request can afford to check one. An API token reads ``sgc_<id>_<secret>``: the id finds the
row, the secret is compared with the stored hash in constant time.

Sessions are rows in ``console_sessions`` (so logging out, disabling a user or changing a
role takes effect on the next request); the browser holds the session id in an HttpOnly,
SameSite=Lax cookie. Each session has its own CSRF token, which every state-changing form
carries (``csrf_token``) and which scripts using the cookie send as ``X-CSRF-Token``.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from smtpguard.core.errors import InputError, SmtpguardError
from smtpguard.core.store import Store

from . import schema
from .schema import utc

ROLES = ("viewer", "analyst", "admin")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
MIN_PASSWORD_CHARS = 10
TOKEN_PREFIX = "sgc_"

_hasher = PasswordHasher()
# Verifying against this when the user does not exist makes a wrong name cost as much time as a
# wrong password, so response times do not tell which names exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AuthError(SmtpguardError):
    """A user, session or token operation was refused (unknown user, name taken, ...)."""


def allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (roles are ordered viewer < analyst < admin)."""
    return ROLES.index(role) >= ROLES.index(needed)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InputError(f"user name {name!r} must be 1-64 lower-case letters, digits, '.', '_', '@' or '-', "
                         "starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InputError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise InputError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    return password


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class User:
    name: str
    role: str
    disabled: bool
    created_at: dt.datetime
    updated_by: str
    updated_at: dt.datetime

    def may(self, needed: str) -> bool:
        return not self.disabled and allows(self.role, needed)

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "disabled": self.disabled,
                "created_at": self.created_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "updated_by": self.updated_by}


class Users:
    """The ``console_users`` table."""

    def __init__(self, store: Store):
        self.store = store
        self.table = f"{store.database}.{schema.USERS}"

    def _write(self, name: str, role: str, password_hash: str, disabled: bool, created_at: dt.datetime,
               actor: str) -> None:
        self.store.insert_arrow(schema.USERS, pa.table({
            "name": [name], "role": [role], "password_hash": [password_hash],
            "disabled": pa.array([disabled], pa.bool_()),
            "created_at": pa.array([created_at], pa.timestamp("ms", tz="UTC")),
            "updated_by": [actor],
            "updated_at": pa.array([schema.next_version()], pa.timestamp("us", tz="UTC")),
        }))

    def _row(self, name: str) -> tuple | None:
        rows = self.store.query(
            f"SELECT name, role, disabled, created_at, updated_by, updated_at, password_hash FROM {self.table} FINAL "
            "WHERE name = {name:String}", {"name": name})
        return rows[0] if rows else None

    @staticmethod
    def _user(row: tuple) -> User:
        return User(row[0], row[1], bool(row[2]), utc(row[3]), row[4], utc(row[5]))

    def get(self, name: str) -> User | None:
        row = self._row(name)
        return self._user(row) if row else None

    def list(self) -> list[User]:
        rows = self.store.query(f"SELECT name, role, disabled, created_at, updated_by, updated_at FROM {self.table} FINAL "
                                "ORDER BY name")
        return [self._user(r) for r in rows]

    def count(self) -> int:
        return int(self.store.query(f"SELECT count() FROM {self.table} FINAL")[0][0])

    def add(self, name: str, role: str, password: str, actor: str) -> User:
        check_name(name)
        check_role(role)
        check_password(password)
        if self._row(name) is not None:
            raise AuthError(f"user {name} exists; change it with `smtpguard users set {name}`")
        self._write(name, role, _hasher.hash(password), False, _now(), actor)
        return self.get(name)

    def set(self, name: str, actor: str, *, role: str | None = None, password: str | None = None,
            disabled: bool | None = None) -> User:
        """Change a user's role, password or disabled flag (what is None stays)."""
        row = self._row(name)
        if row is None:
            raise AuthError(f"no user {name}; add one with `smtpguard users add {name} --role viewer`")
        if role is not None:
            check_role(role)
        if password is not None:
            check_password(password)
        self._write(name, role if role is not None else row[1],
                    _hasher.hash(password) if password is not None else row[6],
                    bool(row[2]) if disabled is None else disabled, utc(row[3]), actor)
        return self.get(name)

    def verify(self, name: str, password: str) -> User | None:
        """The user when the password is right and the user is enabled, else None (in about the same time)."""
        row = self._row(name) if NAME_RE.match(name) else None
        stored = row[6] if row else _DUMMY_HASH
        try:
            _hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None or row[2]:
            return None
        if _hasher.check_needs_rehash(stored):
            self._write(row[0], row[1], _hasher.hash(password), False, utc(row[3]), row[0])
        return self._user(row)


@dataclass(frozen=True)
class Session:
    user: User
    csrf_token: str
    expires_at: dt.datetime


class Sessions:
    """The ``console_sessions`` table: server-side sessions named by a random id in a cookie."""

    def __init__(self, store: Store, ttl_s: int):
        self.store = store
        self.ttl_s = ttl_s
        self.table = f"{store.database}.{schema.SESSIONS}"
        self.users = f"{store.database}.{schema.USERS}"

    def _write(self, session_hash: str, user: str, csrf: str, created: dt.datetime, expires: dt.datetime,
               client: str, ended: bool) -> None:
        ts = pa.timestamp("ms", tz="UTC")
        self.store.insert_arrow(schema.SESSIONS, pa.table({
            "session_hash": [session_hash], "user": [user], "csrf_token": [csrf],
            "created_at": pa.array([created], ts), "expires_at": pa.array([expires], ts),
            "client": [client], "ended": pa.array([ended], pa.bool_()),
            "updated_at": pa.array([schema.next_version()], pa.timestamp("us", tz="UTC")),
        }))

    def create(self, user: User, client: str) -> tuple[str, str]:
        """A new session for ``user``: (the cookie value, its CSRF token)."""
        sid = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = _now()
        self._write(sha256(sid), user.name, csrf, now, now + dt.timedelta(seconds=self.ttl_s), client, False)
        return sid, csrf

    def lookup(self, sid: str) -> Session | None:
        """The live session named by the cookie value, with its user as they are now; None when it ended,
        expired, or its user is gone or disabled."""
        if not sid or len(sid) > 128:
            return None
        rows = self.store.query(
            f"SELECT s.csrf_token, s.expires_at, u.name, u.role, u.disabled, u.created_at, u.updated_by, u.updated_at "
            f"FROM {self.table} AS s FINAL INNER JOIN (SELECT * FROM {self.users} FINAL) AS u ON u.name = s.user "
            "WHERE s.session_hash = {h:String} AND NOT s.ended AND s.expires_at > now64(3) AND NOT u.disabled",
            {"h": sha256(sid)})
        if not rows:
            return None
        r = rows[0]
        return Session(User(r[2], r[3], bool(r[4]), utc(r[5]), r[6], utc(r[7])), r[0], utc(r[1]))

    def end(self, sid: str) -> None:
        h = sha256(sid)
        rows = self.store.query(f"SELECT user, csrf_token, created_at, expires_at, client FROM {self.table} FINAL "
                                "WHERE session_hash = {h:String}", {"h": h})
        if rows:
            user, csrf, created, expires, client = rows[0]
            self._write(h, user, csrf, utc(created), utc(expires), client, True)


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())


@dataclass(frozen=True)
class ApiToken:
    token_id: str
    user: str
    label: str
    created_at: dt.datetime
    revoked: bool

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "user": self.user, "label": self.label, "revoked": self.revoked,
                "created_at": self.created_at.isoformat(timespec="seconds").replace("+00:00", "Z")}


class ApiTokens:
    """The ``console_api_tokens`` table: bearer tokens for scripts, hashed at rest."""

    def __init__(self, store: Store):
        self.store = store
        self.table = f"{store.database}.{schema.API_TOKENS}"
        self.users = f"{store.database}.{schema.USERS}"

    def _write(self, token_id: str, user: str, token_hash: str, label: str, created: dt.datetime, revoked: bool) -> None:
        self.store.insert_arrow(schema.API_TOKENS, pa.table({
            "token_id": [token_id], "user": [user], "token_hash": [token_hash], "label": [label],
            "created_at": pa.array([created], pa.timestamp("ms", tz="UTC")),
            "revoked": pa.array([revoked], pa.bool_()),
            "updated_at": pa.array([schema.next_version()], pa.timestamp("us", tz="UTC")),
        }))

    def issue(self, user: User, label: str = "") -> str:
        """A new token for ``user``; the only time its text exists outside the caller."""
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        self._write(token_id, user.name, sha256(secret), label, _now(), False)
        return f"{TOKEN_PREFIX}{token_id}_{secret}"

    def list(self, user: str | None = None) -> list[ApiToken]:
        where, params = "1", {}
        if user is not None:
            where, params = "user = {user:String}", {"user": user}
        rows = self.store.query(f"SELECT token_id, user, label, created_at, revoked FROM {self.table} FINAL "
                                f"WHERE {where} ORDER BY created_at, token_id", params)
        return [ApiToken(r[0], r[1], r[2], utc(r[3]), bool(r[4])) for r in rows]

    def revoke(self, token_id: str) -> None:
        rows = self.store.query(f"SELECT user, token_hash, label, created_at FROM {self.table} FINAL "
                                "WHERE token_id = {id:String}", {"id": token_id})
        if not rows:
            raise AuthError(f"no API token {token_id}; list them with `smtpguard users list --tokens`")
        user, token_hash, label, created = rows[0]
        self._write(token_id, user, token_hash, label, utc(created), True)

    def authenticate(self, token: str) -> User | None:
        """The enabled user the token belongs to, or None."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        token_id, sep, secret = token[len(TOKEN_PREFIX):].partition("_")
        if not sep or not token_id or not secret:
            return None
        rows = self.store.query(
            f"SELECT t.token_hash, u.name, u.role, u.disabled, u.created_at, u.updated_by, u.updated_at "
            f"FROM {self.table} AS t FINAL INNER JOIN (SELECT * FROM {self.users} FINAL) AS u ON u.name = t.user "
            "WHERE t.token_id = {id:String} AND NOT t.revoked AND NOT u.disabled", {"id": token_id})
        if not rows or not hmac.compare_digest(rows[0][0], sha256(secret)):
            return None
        r = rows[0]
        return User(r[1], r[2], bool(r[3]), utc(r[4]), r[5], utc(r[6]))


class LoginLimiter:
    """Refuses logins after ``max_failures`` failed attempts within ``window_s``, per (user, client address).

    Kept in memory: one console process serves a store, and a restart forgetting the count
    costs an attacker a restart per five guesses. A second, wider bound per client address
    alone stops one address from trying many user names.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, per_client_max: int = 20,
                 clock=time.monotonic):
        self.max_failures = max_failures
        self.window_s = window_s
        self.per_client_max = per_client_max
        self._clock = clock
        self._fails: dict[tuple[str, str], collections.deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> collections.deque[float]:
        q = self._fails.setdefault(key, collections.deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._fails[key]
            return collections.deque()
        return q

    def retry_after_s(self, user: str, client: str) -> int:
        """0 when a login may be tried now, else the seconds until it may."""
        now = self._clock()
        with self._lock:
            waits = []
            for key, limit in (((user.lower(), client), self.max_failures), (("", client), self.per_client_max)):
                q = self._recent(key, now)
                if len(q) >= limit:
                    waits.append(q[len(q) - limit] + self.window_s - now)
            return max(1, int(max(waits)) + 1) if waits else 0

    def failed(self, user: str, client: str) -> None:
        now = self._clock()
        with self._lock:
            for key in ((user.lower(), client), ("", client)):
                self._recent(key, now)
                self._fails.setdefault(key, collections.deque()).append(now)

    def succeeded(self, user: str, client: str) -> None:
        with self._lock:
            self._fails.pop((user.lower(), client), None)
