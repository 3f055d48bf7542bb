"""The web console: server-rendered pages for people, a JSON API under ``/api`` for scripts.

:func:`create_app` builds the application over an open :class:`~smtpguard.core.store.Store`, so
the process that owns an embedded store can serve the console beside its other work.

Pages: ``/alerts`` (the queue), ``/alerts/{id}`` (evidence and actions), ``/exemptions``,
``/exemptions/show?key=IP``, ``/health``, ``/users`` (admin), ``/login``; ``/metrics`` for Prometheus
(docs/METRICS.md; without a login unless ``metrics.console_public`` is false).

API (``Authorization: Bearer sgc_...`` from ``smtpguard users token NAME``, or the session
cookie plus an ``X-CSRF-Token`` header)::

    GET  /api/me
    GET  /api/alerts?severity=&detector=&tenant=&status=&ip=&since=&until=&suppressed=&page=&per_page=
    GET  /api/alerts/{id}
    POST /api/alerts/{id}/ack | confirm | dismiss | dnsbl | restore   {"note": "..."} (analyst)
    GET  /api/exemptions?state=active|revoked|expired|lifted|all&tenant=
    GET  /api/exemptions/show?key=IP_OR_CIDR
    POST /api/exemptions/grant | revoke | restore                 {"key", "reason", "tenant", "expires", "alert_id"} (admin)
    GET  /api/health

Errors come back as ``{"error": "..."}`` with 400 (bad input), 401 (no or bad credentials),
403 (role, CSRF), 404, 409 (the action does not apply now) or 429 (too many failed logins).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Body, FastAPI, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from smtpguard.core import metrics
from smtpguard.core.config import Config, mask_dsn
from smtpguard.core.record import SEVERITIES
from smtpguard.detectors.features import FEATURES
from smtpguard.detectors.rules import REGISTRY
from smtpguard.core.errors import ConfigError, InputError, SmtpguardError, StoreError
from smtpguard.core.exemptions import parse_time
from smtpguard.core.registry import STATES, RegistryError, parse_key
from smtpguard.core.store import Store

from . import actions, queries
from .auth import ROLES, ApiTokens, AuthError, LoginLimiter, Sessions, User, Users, check_name, csrf_ok
from .chart import minute_chart
from .queries import AlertFilter, iso_z, to_ms
from .schema import utc

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "sg_session"
LOGIN_CSRF_COOKIE = "sg_login_csrf"
FEATURE_DOCS = {f.name: f.doc for f in FEATURES}
#: Evidence shown first on the alert page (when the alert has it); the rest is one click away.
HEADLINE_EVIDENCE = ("connections", "accepted", "rejected", "distinct_dst", "distinct_dst24", "new_dst", "new_dst_share",
                     "top_dst", "top_dst_conns", "top_dst_share", "bytes_per_conn", "low_byte_conns", "rejected_port25",
                     "conns_10m", "conns_60m", "new_dst_60m", "base_conns", "base_distinct", "history_minutes",
                     "exemption_age_days")
#: Evidence the alert page's header already shows.
IN_HEADER = ("window_start", "window_end", "src_ip", "tenant")


@dataclass(frozen=True)
class ConsoleSettings:
    """Tunables of the console (defaults suit one team on one machine)."""

    session_ttl_s: int = 12 * 3600
    """how long a login lasts"""
    login_max_failures: int = 5
    """failed logins per user name and client address within login_window_s before logins are refused (429)"""
    login_window_s: int = 60
    """the window of login_max_failures"""
    per_page: int = 50
    """alerts per page of the queue"""


class Problem(Exception):
    """An error answered with ``status``: JSON under /api, a page elsewhere."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class LoginRequired(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    user: User
    via: str
    """session or token"""
    csrf: str = ""
    sid: str = ""


_STATUS_OF = ((actions.NotFound, 404), (actions.Refused, 409), (RegistryError, 409), (AuthError, 409),
              (InputError, 400), (ConfigError, 400), (StoreError, 503))


def _status_for(e: SmtpguardError) -> int:
    return next((code for cls, code in _STATUS_OF if isinstance(e, cls)), 500)


def _fmt_ts(t: dt.datetime | None, seconds: bool = False) -> str:
    if t is None:
        return "–"
    return utc(t).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _fmt_ms(ms: int | None, missing: str = "–") -> str:
    return missing if ms is None else _fmt_ts(queries.from_ms(ms))


def _fmt_num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return iso_z(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _safe_next(target: str | None) -> str:
    # only paths on this console: "//host" and "http://..." would send a fresh login elsewhere
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/alerts"
    return target


def create_app(cfg: Config, store: Store, *, settings: ConsoleSettings | None = None,
               console: actions.Console | None = None) -> FastAPI:
    """The console application over ``store`` (which stays open for the app's life; the caller closes it)."""
    settings = settings or ConsoleSettings()
    c = console or actions.Console(cfg, store)
    users, tokens = Users(store), ApiTokens(store)
    sessions = Sessions(store, settings.session_ttl_s)
    limiter = LoginLimiter(settings.login_max_failures, settings.login_window_s)
    flashes: dict[str, tuple[str, str]] = {}
    flash_lock = threading.Lock()

    app = FastAPI(title="smtpguard console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = c
    app.state.settings = settings
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(ts=_fmt_ts, ms=_fmt_ms, num=_fmt_num)
    templates.env.globals.update(SEVERITIES=SEVERITIES, STATUSES=queries.STATUSES, ROLES=ROLES, STATES=STATES)

    # -- plumbing -------------------------------------------------------------------------------------
    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        h = response.headers
        h.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                                "script-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                                                "base-uri 'none'")
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "same-origin")
        if not request.url.path.startswith("/static/"):
            h.setdefault("Cache-Control", "no-store")
        return response

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # the route template (/alerts/{alert_id}), never the path: one series per route
            route = getattr(request.scope.get("route"), "path", "other")
            metrics.CONSOLE_REQUESTS.labels(request.method, route, str(status)).inc()

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def principal(request: Request) -> Principal | None:
        auth = request.headers.get("authorization", "")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer":
                raise Problem(401, "use Authorization: Bearer TOKEN (from `smtpguard users token NAME`)",
                              {"WWW-Authenticate": "Bearer"})
            user = tokens.authenticate(token.strip())
            if user is None:
                raise Problem(401, "the API token is unknown, revoked, or its user is disabled",
                              {"WWW-Authenticate": "Bearer"})
            return Principal(user, "token")
        sid = request.cookies.get(SESSION_COOKIE, "")
        s = sessions.lookup(sid) if sid else None
        return Principal(s.user, "session", s.csrf_token, sid) if s else None

    def who(request: Request, needed: str = "viewer", csrf: str | None = None) -> Principal:
        """The caller, checked: logged in, CSRF token on a state change, and a role that allows ``needed``."""
        p = principal(request)
        if p is None:
            if is_api(request):
                raise Problem(401, "log in, or send Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})
            raise LoginRequired()
        if request.method not in ("GET", "HEAD") and p.via == "session":
            # a bearer token is never sent by a browser on its own, so only cookie sessions need the check
            if not csrf_ok(p.csrf, csrf or request.headers.get("x-csrf-token")):
                raise Problem(403, "missing or invalid CSRF token: reload the page and try again")
        if not p.user.may(needed):
            raise Problem(403, f"this needs the {needed} role; {p.user.name} is {p.user.role}")
        return p

    def flash(p: Principal, message: str, kind: str = "ok") -> None:
        if p.sid:
            with flash_lock:
                if len(flashes) > 10_000:
                    flashes.clear()
                flashes[p.sid] = (kind, message)

    def page(request: Request, p: Principal | None, name: str, status: int = 200, **ctx: Any) -> Response:
        taken = None
        if p is not None and p.sid:
            with flash_lock:
                taken = flashes.pop(p.sid, None)
        ctx.update(user=p.user if p else None, csrf=p.csrf if p else "", flash=taken, path=request.url.path)
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    @app.exception_handler(Problem)
    async def on_problem(request: Request, e: Problem):
        if is_api(request):
            return JSONResponse({"error": e.message}, e.status, headers=e.headers)
        return templates.TemplateResponse(request, "error.html", {"status": e.status, "message": e.message,
                                                                   "user": None, "csrf": "", "flash": None,
                                                                   "path": request.url.path},
                                          status_code=e.status, headers=e.headers)

    @app.exception_handler(LoginRequired)
    async def on_login_required(request: Request, e: LoginRequired):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", 303)

    @app.exception_handler(SmtpguardError)
    async def on_error(request: Request, e: SmtpguardError):
        status = _status_for(e)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, e)
        return await on_problem(request, Problem(status, str(e)))

    def done(p: Principal, back: str, result: actions.ActionResult | str, kind: str = "ok") -> Response:
        flash(p, result if isinstance(result, str) else result.message, kind)
        return RedirectResponse(back, 303)

    # -- login ------------------------------------------------------------------------------------------
    def login_page(request: Request, status: int = 200, error: str = "", next_url: str = "/alerts",
                   headers: dict[str, str] | None = None) -> Response:
        token = secrets.token_urlsafe(24)
        r = templates.TemplateResponse(request, "login.html", {"login_csrf": token, "error": error, "next": next_url,
                                                                "user": None, "csrf": "", "flash": None,
                                                                "path": "/login"},
                                       status_code=status, headers=headers)
        r.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="lax", path="/login",
                     secure=request.url.scheme == "https")
        return r

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/alerts", 303)

    @app.get("/login")
    def login_form(request: Request, next: str = "/alerts"):
        return login_page(request, next_url=_safe_next(next))

    @app.post("/login")
    def login(request: Request, username: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
              next: str = Form("/alerts")):
        next_url = _safe_next(next)
        if not csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf_token):
            raise Problem(403, "missing or invalid CSRF token: reload the login page and try again")
        name = username.strip().lower()
        client = request.client.host if request.client else ""
        wait = limiter.retry_after_s(name, client)
        if wait:
            return login_page(request, 429, f"too many failed logins; try again in {wait} s", next_url,
                              {"Retry-After": str(wait)})
        user = users.verify(name, password)
        if user is None:
            limiter.failed(name, client)
            log.warning("failed console login for %r from %s", name, client)
            return login_page(request, 401, "wrong user name or password", next_url)
        limiter.succeeded(name, client)
        sid, _ = sessions.create(user, client)
        r = RedirectResponse(next_url, 303)
        r.set_cookie(SESSION_COOKIE, sid, max_age=settings.session_ttl_s, httponly=True, samesite="lax", path="/",
                     secure=request.url.scheme == "https")
        r.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return r

    @app.post("/logout")
    def logout(request: Request, csrf_token: str = Form("")):
        p = who(request, "viewer", csrf_token)
        sessions.end(p.sid)
        r = RedirectResponse("/login", 303)
        r.delete_cookie(SESSION_COOKIE, path="/")
        return r

    # -- alerts -----------------------------------------------------------------------------------------
    # the promoted model of the team's verdicts (smtpguard model train --supervised), if any: ranks the queue
    from smtpguard.models.verdicts import models_folder

    ranker = queries.VerdictRanker(models_folder(cfg.data_dir))

    def parse_filter(request: Request) -> AlertFilter:
        f = AlertFilter.parse(dict(request.query_params))
        return f if "per_page" in request.query_params else replace(f, per_page=settings.per_page)

    @app.get("/alerts")
    def alerts_page(request: Request):
        p = who(request)
        error = ""
        try:
            f = parse_filter(request)
        except InputError as e:
            f, error = AlertFilter(per_page=settings.per_page), str(e)
        try:
            result = queries.alert_queue(store, f, ranker)
        except InputError as e:  # e.g. the order by verdicts without a promoted model
            f, error = replace(f, order=""), str(e)
            result = queries.alert_queue(store, f, ranker)
        detectors = sorted(set(REGISTRY) | set(queries.detectors_seen(store)))

        def link(**changes: Any) -> str:
            return "/alerts?" + urlencode(f.query_params(**changes))

        ranked = any("confirm_probability" in a for a in result.alerts)
        return page(request, p, "alerts.html", 400 if error else 200, page_=result, f=f, detectors=detectors,
                    link=link, error=error, ranked=ranked)

    def alert_or_404(alert_id: str) -> dict[str, Any]:
        a = queries.get_alert(store, alert_id)
        if a is None:
            raise Problem(404, f"no alert {alert_id}")
        return a

    def exemption_view(ip: str | None) -> dict[str, Any] | None:
        if not ip:
            return None
        shown = c.registry.show(ip)
        decided = shown.decided_by
        history = list(shown.history)
        if decided is not None and decided.key != shown.key:
            history = sorted(history + c.registry.events(ip=decided.key), key=lambda e: (e.at_ms, e.event_id))
        revoked = [s.key for s in (shown.state, decided) if s is not None and s.state == "revoked"]
        return {"key": shown.key, "allowed": shown.allowed, "state": shown.state, "decided_by": decided,
                "history": history, "restorable": list(dict.fromkeys(revoked))}

    def evidence_rows(alert: dict[str, Any]) -> dict[str, list[tuple[str, Any, str]]]:
        ev = {k: v for k, v in queries.alert_json(alert)["evidence"].items() if k not in IN_HEADER}
        headline = [(k, ev[k], FEATURE_DOCS.get(k, "")) for k in HEADLINE_EVIDENCE if k in ev]
        rest = [(k, v, FEATURE_DOCS.get(k, "")) for k, v in ev.items() if k not in HEADLINE_EVIDENCE]
        return {"headline": headline, "rest": rest}

    @app.get("/alerts/{alert_id}")
    def alert_page(request: Request, alert_id: str):
        p = who(request)
        alert = alert_or_404(alert_id)
        minutes = queries.traffic_minutes(store, alert)
        ws, we = to_ms(alert["window_start"]), to_ms(alert["window_end"])
        source = alert["src_ip"] or f"tenant {alert['tenant']}"
        chart = Markup(minute_chart(minutes, ws, we, title=f"traffic of {source} per minute around the alert"))
        decisions = ([d for d in c.decisions.list(ip=alert["src_ip"], limit=50)] if alert["src_ip"] else [])
        ranker.annotate(store, [alert])
        return page(request, p, "alert.html", alert=alert, chart=chart, minutes=minutes,
                    earlier=queries.earlier_verdicts(store, alert),
                    held=queries.alert_json(alert)["evidence"].get("held"),
                    destinations=queries.top_destinations(store, alert), evidence=evidence_rows(alert),
                    exemption=exemption_view(alert["src_ip"]), decisions=decisions,
                    dnsbl=queries.stored_dnsbl(store, alert["src_ip"]) if alert["src_ip"] else [],
                    history=queries.actions_of(store, alert_id), label=queries.label_of(store, alert_id),
                    source=source)

    ALERT_ACTIONS = {
        "ack": lambda p, aid, note: actions.acknowledge(c, aid, p.user.name, note),
        "confirm": lambda p, aid, note: actions.confirm(c, aid, p.user.name, note),
        "dismiss": lambda p, aid, note: actions.dismiss(c, aid, p.user.name, note),
        "dnsbl": lambda p, aid, note: actions.recheck_dnsbl(c, aid, p.user.name),
        "restore": lambda p, aid, note: actions.restore(c, aid, p.user.name, note),
    }

    @app.post("/alerts/{alert_id}/{action}")
    def alert_action(request: Request, alert_id: str, action: str, csrf_token: str = Form(""), note: str = Form("")):
        p = who(request, "analyst", csrf_token)  # credentials first: nothing is told to a stranger
        if action not in ALERT_ACTIONS:
            raise Problem(404, f"no action {action}")
        back = f"/alerts/{quote(alert_id, safe='')}"
        try:
            return done(p, back, ALERT_ACTIONS[action](p, alert_id, note))
        except (actions.Refused, InputError, ConfigError) as e:
            return done(p, back, str(e), "error")

    @app.post("/alerts/{alert_id}/exemption/{change}")
    def alert_exemption(request: Request, alert_id: str, change: str, csrf_token: str = Form(""),
                        key: str = Form(""), reason: str = Form("")):
        p = who(request, "admin", csrf_token)
        alert = alert_or_404(alert_id)
        back = f"/alerts/{quote(alert_id, safe='')}"
        fn = {"revoke": actions.revoke_exemption, "restore": actions.restore_exemption}.get(change)
        if fn is None:
            raise Problem(404, f"no exemption change {change}")
        try:
            return done(p, back, fn(c, key or alert["src_ip"] or "", p.user.name, reason, alert_id))
        except (RegistryError, InputError) as e:
            return done(p, back, str(e), "error")

    # -- exemptions -------------------------------------------------------------------------------------
    def state_param(state: str) -> str:
        if state != "all" and state not in STATES:
            raise Problem(400, f"state must be one of {', '.join(STATES)} or all")
        return state

    @app.get("/exemptions")
    def exemptions_page(request: Request, state: str = "all", tenant: str = ""):
        p = who(request)
        rows = c.registry.list(state_param(state), tenant=tenant.strip() or None)
        rows.sort(key=lambda s: (s.state != "revoked", -s.last.at_ms))
        events = sorted(c.registry.events(), key=lambda e: (e.at_ms, e.event_id), reverse=True)[:50]
        return page(request, p, "exemptions.html", rows=rows, state=state, tenant=tenant, events=events)

    @app.get("/exemptions/show")
    def exemption_page(request: Request, key: str = ""):
        # parameters default to empty and are checked after the credentials: FastAPI would answer
        # a missing one with 422 before any handler ran, telling a stranger what the route takes
        p = who(request)
        try:
            key = parse_key(key)[0]
        except InputError as e:
            raise Problem(400, str(e)) from None
        return page(request, p, "exemption.html", ex=exemption_view(key))

    def parse_expires(text: str) -> dt.datetime | None:
        if not text.strip():
            return None
        try:
            return parse_time(text.strip())
        except ValueError:
            raise InputError(f"expires {text!r} is not an ISO 8601 date or time (UTC)") from None

    @app.post("/exemptions/{change}")
    def exemption_change(request: Request, change: str, csrf_token: str = Form(""), key: str = Form(""),
                         reason: str = Form(""), tenant: str = Form(""), expires: str = Form("")):
        p = who(request, "admin", csrf_token)
        try:
            if change == "grant":
                result = actions.grant_exemption(c, key, tenant, p.user.name, reason, parse_expires(expires))
            elif change == "revoke":
                result = actions.revoke_exemption(c, key, p.user.name, reason)
            elif change == "restore":
                result = actions.restore_exemption(c, key, p.user.name, reason)
            else:
                raise Problem(404, f"no exemption change {change}")
        except (RegistryError, InputError) as e:
            return done(p, "/exemptions", str(e), "error")
        return done(p, f"/exemptions/show?{urlencode({'key': result.detail['event']['ip']})}", result)

    # -- metrics ----------------------------------------------------------------------------------------
    @app.get("/metrics", include_in_schema=False)
    def metrics_page(request: Request):
        """Prometheus metrics of this process; without a login unless metrics.console_public is false."""
        if not cfg.metrics.console_public and principal(request) is None:
            raise Problem(401, "metrics need a login: send Authorization: Bearer TOKEN (from `smtpguard users token "
                               "NAME`)", {"WWW-Authenticate": "Bearer"})
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    # -- health -----------------------------------------------------------------------------------------
    @app.get("/health")
    def health_page(request: Request):
        p = who(request)
        states: dict[str, int] = {s: 0 for s in STATES}
        for s in c.registry.states().values():
            states[s.state] = states.get(s.state, 0) + 1
        return page(request, p, "health.html", h=queries.health(store), exemption_states=states,
                    store_dsn=mask_dsn(store.dsn), database=store.database, cfg=cfg)

    # -- users ------------------------------------------------------------------------------------------
    def last_admin_guard(name: str, role: str | None, disabled: bool | None) -> None:
        admins = [u for u in users.list() if u.role == "admin" and not u.disabled]
        if [u.name for u in admins] == [name] and ((role is not None and role != "admin") or disabled):
            raise Problem(409, f"{name} is the last enabled admin; make another admin first")

    @app.get("/users")
    def users_page(request: Request):
        p = who(request, "admin")
        return page(request, p, "users.html", users=users.list(), tokens=tokens.list())

    @app.post("/users")
    def users_add(request: Request, csrf_token: str = Form(""), name: str = Form(""), role: str = Form("viewer"),
                  password: str = Form("")):
        p = who(request, "admin", csrf_token)
        try:
            u = users.add(name.strip().lower(), role, password, p.user.name)
        except (InputError, AuthError) as e:
            return done(p, "/users", str(e), "error")
        return done(p, "/users", f"user {u.name} added as {u.role}")

    @app.post("/users/{name}")
    def users_set(request: Request, name: str, csrf_token: str = Form(""), role: str = Form(""),
                  disabled: str = Form("")):
        p = who(request, "admin", csrf_token)
        new_role = role or None
        new_disabled = {"1": True, "0": False}.get(disabled)
        last_admin_guard(name, new_role, new_disabled)
        try:
            u = users.set(check_name(name), p.user.name, role=new_role, disabled=new_disabled)
        except (InputError, AuthError) as e:
            return done(p, "/users", str(e), "error")
        return done(p, "/users", f"user {u.name}: {u.role}{', disabled' if u.disabled else ''}")

    @app.post("/tokens/{token_id}/revoke")
    def token_revoke(request: Request, token_id: str, csrf_token: str = Form("")):
        p = who(request, "admin", csrf_token)
        tokens.revoke(token_id)
        return done(p, "/users", f"API token {token_id} revoked")

    # -- JSON API ---------------------------------------------------------------------------------------
    @app.get("/api/me")
    def api_me(request: Request):
        return who(request).user.to_dict()

    @app.get("/api/alerts")
    def api_alerts(request: Request):
        who(request)
        try:
            result = queries.alert_queue(store, parse_filter(request), ranker)
        except InputError as e:
            raise Problem(400, str(e)) from None
        return {"alerts": [queries.alert_json(a) for a in result.alerts], "total": result.total,
                "page": result.filter.page, "per_page": result.filter.per_page, "pages": result.pages}

    @app.get("/api/alerts/{alert_id}")
    def api_alert(request: Request, alert_id: str):
        who(request)
        alert = alert_or_404(alert_id)
        ex = exemption_view(alert["src_ip"])
        ranker.annotate(store, [alert])
        return _jsonable({
            "earlier_verdicts": queries.earlier_verdicts(store, alert),
            "alert": queries.alert_json(alert),
            "traffic": [m.__dict__ | {"minute": iso_z(queries.from_ms(m.start_ms))} for m in
                        queries.traffic_minutes(store, alert)],
            "top_destinations": [d.__dict__ for d in queries.top_destinations(store, alert)],
            "exemption": None if ex is None else {
                "key": ex["key"], "allowed": ex["allowed"],
                "state": ex["state"].to_dict() if ex["state"] else None,
                "decided_by": ex["decided_by"].key if ex["decided_by"] else None,
                "history": [e.to_dict() for e in ex["history"]]},
            "dnsbl": queries.stored_dnsbl(store, alert["src_ip"]) if alert["src_ip"] else [],
            "actions": queries.actions_of(store, alert_id),
            "label": queries.label_of(store, alert_id),
        })

    @app.post("/api/alerts/{alert_id}/{action}")
    def api_alert_action(request: Request, alert_id: str, action: str, payload: dict[str, Any] | None = Body(None)):
        p = who(request, "analyst")
        if action not in ALERT_ACTIONS:
            raise Problem(404, f"no action {action}; use ack, confirm, dismiss, dnsbl or restore")
        note = str((payload or {}).get("note") or "")
        return ALERT_ACTIONS[action](p, alert_id, note).to_dict()

    @app.get("/api/exemptions")
    def api_exemptions(request: Request, state: str = "active", tenant: str = ""):
        who(request)
        return {"exemptions": [s.to_dict() for s in c.registry.list(state_param(state), tenant=tenant or None)]}

    @app.get("/api/exemptions/show")
    def api_exemption(request: Request, key: str = ""):
        who(request)
        try:
            key = parse_key(key)[0]
        except InputError as e:
            raise Problem(400, str(e)) from None
        ex = exemption_view(key)
        return {"key": ex["key"], "allowed": ex["allowed"], "state": ex["state"].to_dict() if ex["state"] else None,
                "decided_by": ex["decided_by"].key if ex["decided_by"] else None,
                "history": [e.to_dict() for e in ex["history"]]}

    @app.post("/api/exemptions/{change}")
    def api_exemption_change(request: Request, change: str, payload: dict[str, Any] | None = Body(None)):
        p = who(request, "admin")
        if payload is None:
            raise Problem(400, 'a JSON body is required: {"key": ..., "reason": ..., "tenant": ..., "expires": ...}')
        key, reason = str(payload.get("key") or ""), str(payload.get("reason") or "")
        alert_id = payload.get("alert_id") or None
        if change == "grant":
            result = actions.grant_exemption(c, key, str(payload.get("tenant") or ""), p.user.name, reason,
                                             parse_expires(str(payload.get("expires") or "")))
        elif change == "revoke":
            result = actions.revoke_exemption(c, key, p.user.name, reason, alert_id)
        elif change == "restore":
            result = actions.restore_exemption(c, key, p.user.name, reason, alert_id)
        else:
            raise Problem(404, f"no exemption change {change}; use grant, revoke or restore")
        return result.to_dict()

    @app.get("/api/health")
    def api_health(request: Request):
        who(request)
        return queries.health(store).to_dict()

    return app
