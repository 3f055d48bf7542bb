"""The web console over a real store: pages, JSON API, roles, sessions, CSRF, login limits, and the
actions on alerts and exemptions with what they write (alert_actions, review_labels, the
exemption registry, enforcement events on a real Kafka broker, DNSBL answers from a real rbldnsd).

The store is filled once per module the way the pipeline fills it (console_data.fill); each
test builds its own app over it (an app is cheap; its login limiter and flash messages are its own).
"""

from __future__ import annotations

import json
import datetime as dt
import re
import time

import pytest
from markupsafe import escape
from click.testing import CliRunner
from fastapi.testclient import TestClient
from smtpguard.lab.rbldnsd import Dataset, Rbldnsd

from conftest import make_config, replace
from console_data import Filled, abuser, fill, plan
from smtpguard.cli.console import console_cmd, users_group
from smtpguard.console import schema
from smtpguard.console.app import ConsoleSettings, create_app
from smtpguard.console.auth import ApiTokens, AuthError, Users, sha256
from smtpguard.response.dnsbl import Code, Zone
from smtpguard.core.errors import ConfigError, InputError
from smtpguard.response.enforce import read_state
from smtpguard.response.policy import Executor
from smtpguard.core.registry import Registry
from smtpguard.core.store import Store

PASSWORD = "correct horse battery"
BL_ZONE = Zone("test-bl", "bl.dnsbl.test", {"127.0.0.2": Code("spam source")}, delist_url="https://bl.example/remove")
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


class Env:
    def __init__(self, cfg, store: Store, filled: Filled, tokens: dict[str, str]):
        self.cfg, self.store, self.filled, self.tokens = cfg, store, filled, tokens

    def app(self, **settings):
        return create_app(self.cfg, self.store, settings=ConsoleSettings(**settings))

    def api(self, app, role: str) -> TestClient:
        return TestClient(app, headers={"Authorization": f"Bearer {self.tokens[role]}"})


@pytest.fixture(scope="module")
def bl_server(tmp_path_factory):
    # the blocklist lists the scenario's blocked_attempts instance, wherever the generator put it
    srv = Rbldnsd(tmp_path_factory.mktemp("rbldnsd"), [
        Dataset("bl.dnsbl.test", "ip4set", [":127.0.0.2:Listed for spam, see https://bl.example/remove",
                                            abuser(plan(), "blocked_attempts")]),
    ])
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory, broker, chdb_dir, bl_server) -> Env:
    base = tmp_path_factory.mktemp("console")
    cfg = make_config(base, broker.bootstrap, f"chdb://{chdb_dir}")
    cfg = replace(cfg, dnsbl={"zones": [BL_ZONE], "default_zones": ["test-bl"], "resolvers": [bl_server.resolver],
                              "timeout_ms": 2000})
    store = Store(cfg.store_dsn, cfg.store.database)
    filled = fill(store, cfg, base / "scenario")
    users, api_tokens = Users(store), ApiTokens(store)
    tokens = {}
    for role in ("viewer", "analyst", "admin"):
        tokens[role] = api_tokens.issue(users.add(role, role, PASSWORD, "test"), f"{role} script")
    yield Env(cfg, store, filled, tokens)
    store.close()


def csrf_in(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "the page has no CSRF token"
    return m.group(1)


def login(app, name: str) -> tuple[TestClient, str]:
    """A browser-like client logged in as ``name``, and the CSRF token of its session."""
    cl = TestClient(app)
    form = cl.get("/login")
    r = cl.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": csrf_in(form.text),
                                "next": "/alerts"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/alerts"
    return cl, csrf_in(cl.get("/alerts").text)


def ids(rows) -> list[str]:
    return [a["alert_id"] for a in rows]


# -- schema ------------------------------------------------------------------------------------------
def test_console_tables_match_their_definitions(env):
    def columns(table):
        return {r[0]: r[1].replace(" ", "") for r in env.store.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            {"db": env.store.database, "t": table})}

    for table, cols in ((schema.USERS, schema.USER_COLUMNS), (schema.SESSIONS, schema.SESSION_COLUMNS),
                        (schema.API_TOKENS, schema.API_TOKEN_COLUMNS), (schema.ALERT_ACTIONS, schema.ALERT_ACTION_COLUMNS),
                        (schema.REVIEW_LABELS, schema.REVIEW_LABEL_COLUMNS)):
        assert columns(table) == {n: t.replace(" ", "") for n, t in cols}, table
    assert env.store.migrate() == 0


# -- authentication ----------------------------------------------------------------------------------
def test_pages_need_a_login_and_the_api_a_valid_token(env):
    cl = TestClient(env.app())
    r = cl.get("/alerts?severity=high", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Falerts%3Fseverity%3Dhigh"
    r = cl.get("/api/alerts")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "error" in r.json()
    for bad in ("Bearer sgc_0000_nope", "Bearer " + env.tokens["viewer"] + "x", "Basic dXNlcjpwYXNz"):
        assert cl.get("/api/alerts", headers={"Authorization": bad}).status_code == 401
    assert env.api(env.app(), "viewer").get("/api/me").json()["role"] == "viewer"


def test_session_cookie_is_httponly_lax_and_secure_over_https_and_logout_ends_it(env):
    app = env.app()
    cl = TestClient(app)
    form = cl.get("/login")
    r = cl.post("/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": csrf_in(form.text)},
                follow_redirects=False)
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("sg_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    sid = cl.cookies.get("sg_session")
    assert env.store.query(f"SELECT count() FROM {env.store.database}.{schema.SESSIONS} WHERE session_hash = {{h:String}}",
                           {"h": sha256(sid)})[0][0] == 1, "only the hash of the session id is stored"

    secure = TestClient(app, base_url="https://testserver")
    form = secure.get("/login")
    r = secure.post("/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": csrf_in(form.text)},
                    follow_redirects=False)
    assert "Secure" in next(c for c in r.headers.get_list("set-cookie") if c.startswith("sg_session="))
    assert secure.get("/alerts").status_code == 200

    page = cl.get("/alerts")
    r = cl.post("/logout", data={"csrf_token": csrf_in(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    replay = TestClient(app, cookies={"sg_session": sid})
    assert replay.get("/alerts", follow_redirects=False).status_code == 303, "a logged-out session must not work again"


def test_login_refuses_a_missing_csrf_token_and_redirects_only_within_the_console(env):
    cl = TestClient(env.app())
    cl.get("/login")
    r = cl.post("/login", data={"username": "viewer", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 403 and "sg_session" not in cl.cookies
    form = cl.get("/login")
    r = cl.post("/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": csrf_in(form.text),
                                "next": "//evil.example/phish"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/alerts"


def test_failed_logins_are_limited_per_user_and_address(env):
    app = env.app(login_max_failures=5, login_window_s=3)
    cl = TestClient(app)

    def attempt(name: str, password: str):
        form = cl.get("/login")
        return cl.post("/login", data={"username": name, "password": password, "csrf_token": csrf_in(form.text)},
                       follow_redirects=False)

    for _ in range(5):
        r = attempt("analyst", "wrong password!")
        assert r.status_code == 401 and "wrong user name or password" in r.text
    r = attempt("analyst", PASSWORD)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, "the right password after 5 failures is refused"
    assert attempt("viewer", PASSWORD).status_code == 303, "another user from the same address is not locked out"
    assert attempt("nobody-here", "whatever123").status_code == 401, "unknown users fail like wrong passwords"
    time.sleep(3.2)
    assert attempt("analyst", PASSWORD).status_code == 303, "the limit lifts when the window has passed"


def test_api_tokens_are_hashed_at_rest_and_die_with_revocation_or_a_disabled_user(env):
    store = env.store
    users, tokens = Users(store), ApiTokens(store)
    temp = users.add("temp-user", "analyst", PASSWORD, "test")
    token = tokens.issue(temp, "temporary")
    stored = store.query(f"SELECT token_hash FROM {store.database}.{schema.API_TOKENS} WHERE user = 'temp-user'")
    assert stored and all(token not in r[0] and token.split("_", 2)[2] not in r[0] for r in stored)
    app = env.app()
    assert TestClient(app, headers={"Authorization": f"Bearer {token}"}).get("/api/me").json()["name"] == "temp-user"
    session, _ = login(app, "temp-user")

    admin, admin_csrf = login(app, "admin")
    r = admin.post("/users/temp-user", data={"csrf_token": admin_csrf, "disabled": "1"}, follow_redirects=False)
    assert r.status_code == 303
    assert TestClient(app, headers={"Authorization": f"Bearer {token}"}).get("/api/me").status_code == 401
    assert session.get("/alerts", follow_redirects=False).status_code == 303, "a disabled user's session ends"

    users.set("temp-user", "test", disabled=False)
    assert TestClient(app, headers={"Authorization": f"Bearer {token}"}).get("/api/me").status_code == 200
    tokens.revoke(token.split("_")[1])
    assert TestClient(app, headers={"Authorization": f"Bearer {token}"}).get("/api/me").status_code == 401


def test_the_last_admin_cannot_be_demoted(env):
    admin, csrf = login(env.app(), "admin")
    r = admin.post("/users/admin", data={"csrf_token": csrf, "role": "viewer"}, follow_redirects=False)
    assert r.status_code == 409
    assert Users(env.store).get("admin").role == "admin"


# -- the queue ---------------------------------------------------------------------------------------
def test_queue_filters_and_pages_match_the_detectors_output(env):
    api = env.api(env.app(), "viewer")
    raised = env.filled.alerts
    everything = api.get("/api/alerts", params={"per_page": 500}).json()
    assert everything["total"] == len(raised) and set(ids(everything["alerts"])) == {a.alert_id for a in raised}
    starts = [a["window_start"] for a in everything["alerts"]]
    assert starts == sorted(starts, reverse=True), "newest window first"

    def expect(params, keep):
        got = api.get("/api/alerts", params={**params, "per_page": 500}).json()
        want = {a.alert_id for a in raised if keep(a)}
        assert want, f"the scenario has no alert for {params}"
        assert set(ids(got["alerts"])) == want and got["total"] == len(want), params

    expect({"severity": "high"}, lambda a: a.severity in ("high", "critical"))
    expect({"detector": "blocked_attempts"}, lambda a: a.detector == "blocked_attempts")
    tenant = raised[0].tenant
    expect({"tenant": tenant}, lambda a: a.tenant == tenant)
    one = abuser(plan(), "spam_exempted_new")
    expect({"ip": one}, lambda a: a.src_ip == one)
    expect({"since": "2024-03-12T08:10", "until": "2024-03-12T08:20"},
           lambda a: a.window_end >= "2024-03-12T08:10:00Z" and a.window_start < "2024-03-12T08:20:00Z")
    expect({"severity": "critical", "detector": "spam_fanout", "tenant": tenant},
           lambda a: a.severity == "critical" and a.detector == "spam_fanout" and a.tenant == tenant)
    suppressed = api.get("/api/alerts", params={"suppressed": "1", "per_page": 500}).json()
    assert suppressed["total"] > len(raised), "suppressed findings are stored and can be shown"

    n_pages = -(-len(raised) // 4)
    assert n_pages >= 3
    pages = [api.get("/api/alerts", params={"per_page": 4, "page": p}).json() for p in range(1, n_pages + 1)]
    assert {p["pages"] for p in pages} == {n_pages} and all(len(p["alerts"]) == 4 for p in pages[:-1])
    assert sum((ids(p["alerts"]) for p in pages), []) == ids(everything["alerts"]), "pages split the one ordering"

    r = api.get("/api/alerts", params={"severity": "urgent"})
    assert r.status_code == 400 and "severity must be one of" in r.json()["error"]


def test_queue_page_renders_filters_and_paging_links(env):
    cl, _ = login(env.app(per_page=4), "viewer")
    r = cl.get("/alerts", params={"severity": "high", "detector": "spam_fanout"})
    assert r.status_code == 200
    shown = re.findall(r'<a href="/alerts/([0-9a-f]{24})">20', r.text)
    api = env.api(env.app(), "viewer").get("/api/alerts", params={"severity": "high", "detector": "spam_fanout",
                                                                   "per_page": 4}).json()
    assert shown == ids(api["alerts"]) and len(shown) >= 2
    assert '<option value="high" selected>' in r.text and '<option value="spam_fanout" selected>' in r.text
    page2 = cl.get("/alerts", params={"per_page": 4})
    assert 'href="/alerts?page=2&amp;per_page=4"' in page2.text
    bad = cl.get("/alerts", params={"since": "yesterday"})
    assert bad.status_code == 400 and "since must be an ISO 8601" in bad.text


def test_filter_values_reach_clickhouse_as_parameters(env):
    api = env.api(env.app(), "viewer")
    for evil in ("x' OR 1=1 --", "'); DROP TABLE alerts; --", "{ip:String}", "\\' \" `"):
        for field in ("tenant", "ip", "detector"):
            r = api.get("/api/alerts", params={field: evil})
            assert r.status_code == 200 and r.json()["total"] == 0, (field, evil)
        assert api.get(f"/api/alerts/{evil}").status_code == 404
    assert api.get("/api/alerts").json()["total"] == len(env.filled.alerts)


# -- the evidence -----------------------------------------------------------------------------------
def test_alert_page_shows_traffic_destinations_reasons_and_exemption(env):
    alert = env.filled.first(label="spam_exempted_new", exempted=True, severity="critical")
    app = env.app()
    detail = env.api(app, "viewer").get(f"/api/alerts/{alert.alert_id}").json()
    traffic = detail["traffic"]
    assert len(traffic) == 61, "30 minutes either side of a one-minute window"
    in_window = next(m for m in traffic if m["minute"] == alert.window_start)
    assert in_window["connections"] == alert.evidence["connections"]
    assert in_window["distinct_dst"] == alert.evidence["distinct_dst"]
    assert in_window["rejected"] == alert.evidence["rejected"]
    top = detail["top_destinations"][0]
    assert top["connections"] == alert.evidence["top_dst_conns"] and top["ports"] == [25]
    assert detail["exemption"]["key"] == alert.src_ip and detail["exemption"]["history"][0]["kind"] == "granted"

    cl, _ = login(app, "viewer")
    html = cl.get(f"/alerts/{alert.alert_id}").text
    svg = re.search(r'<svg class="chart".*?</svg>', html, re.S).group(0)
    polylines = re.findall(r'<polyline[^>]* points="([^"]+)"', svg)
    assert len(polylines) == 3 and all(len(p.split()) == 61 for p in polylines)
    assert 'class="alert-window"' in svg
    for reason in alert.reasons:
        assert str(escape(reason)) in html
    assert f"{alert.evidence['connections']:,}" in html and top["dst_ip"] in html
    assert '<span class="state state-granted">granted</span>' in html


# -- actions -----------------------------------------------------------------------------------------
def test_confirm_applies_the_policy_revokes_publishes_and_labels(env):
    alert = env.filled.first(label="spam_exempted_new", exempted=True, severity="critical")
    app = env.app()
    analyst = env.api(app, "analyst")
    r = analyst.post(f"/api/alerts/{alert.alert_id}/confirm", json={"note": "spam run, SEC-12"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "confirmed" and out["actor"] == "analyst"
    assert out["detail"]["decision"]["action"] == "revoke" and out["detail"]["published"]["kafka"] >= 1

    reg = Registry(env.store)
    shown = reg.show(alert.src_ip)
    assert shown.state.state == "revoked" and shown.history[-1].alert_ids == [alert.alert_id]
    assert not shown.allowed
    event = read_state(env.cfg)[alert.src_ip]
    assert (event.action, event.kind, event.alert_ids) == ("deny", "revoked", [alert.alert_id])

    label = env.store.query(f"SELECT label, actor, src_ip, window_start FROM {env.store.database}.review_labels FINAL "
                            "WHERE alert_id = {id:String}", {"id": alert.alert_id})
    assert [(lb, actor, ip) for lb, actor, ip, _ in label] == [("confirmed", "analyst", alert.src_ip)]
    assert label[0][3].strftime("%Y-%m-%dT%H:%M:%SZ") == alert.window_start
    confirmed = analyst.get("/api/alerts", params={"status": "confirmed"}).json()
    assert alert.alert_id in ids(confirmed["alerts"])
    actions = analyst.get(f"/api/alerts/{alert.alert_id}").json()["actions"]
    assert [(a["action"], a["actor"], a["status_after"], a["note"]) for a in actions] == [
        ("confirm", "analyst", "confirmed", "spam run, SEC-12")]
    assert analyst.post(f"/api/alerts/{alert.alert_id}/confirm").status_code == 409

    # restoring an exemption is an admin's job
    cl, csrf = login(app, "analyst")
    r = cl.post(f"/alerts/{alert.alert_id}/exemption/restore",
                data={"csrf_token": csrf, "key": alert.src_ip, "reason": "cleaned"}, follow_redirects=False)
    assert r.status_code == 403 and reg.show(alert.src_ip).state.state == "revoked"
    admin, admin_csrf = login(app, "admin")
    page = admin.get(f"/alerts/{alert.alert_id}").text
    assert "Restore exemption" in page and "may not send on port 25" in page
    r = admin.post(f"/alerts/{alert.alert_id}/exemption/restore",
                   data={"csrf_token": admin_csrf, "key": alert.src_ip, "reason": "customer cleaned the instance"})
    assert r.status_code == 200 and "restored by admin" in r.text
    assert reg.show(alert.src_ip).state.state == "active"
    event = read_state(env.cfg)[alert.src_ip]
    assert (event.action, event.kind, event.actor) == ("allow", "restored", "admin")
    kinds = [a["action"] for a in analyst.get(f"/api/alerts/{alert.alert_id}").json()["actions"]]
    assert kinds == ["confirm", "restore_exemption"]


def test_confirming_an_alert_the_policy_already_handled_does_not_act_twice(env):
    floods = [a for a in env.filled.alerts if env.filled.truth.get(a.src_ip) == "flood"
              and a.severity in ("medium", "high", "critical")]
    alert = floods[-1]
    reg = Registry(env.store)
    # the response policy has already decided about the alert, as its consumer would have
    first = Executor(reg, env.cfg.response).handle(alert).decision
    before = reg.events(ip=alert.src_ip)
    out = env.api(env.app(), "analyst").post(f"/api/alerts/{alert.alert_id}/confirm").json()
    assert out["status"] == "confirmed" and out["detail"]["decision"]["rule"] == "duplicate"
    assert out["detail"]["earlier_decision"]["action"] == first.action
    assert f"the policy had already decided about this alert: {first.action}" in out["message"]
    assert reg.events(ip=alert.src_ip) == before, "the registry is not changed twice"


def test_dismiss_from_the_page_stores_a_false_positive_label(env):
    alert = env.filled.first(label="blocked_attempts", exempted=False)
    cl, csrf = login(env.app(), "analyst")
    r = cl.post(f"/alerts/{alert.alert_id}/dismiss", data={"csrf_token": csrf, "note": "known scanner test"},
                follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/alerts/{alert.alert_id}"
    page = cl.get(r.headers["location"]).text
    assert "dismissed as a false positive by analyst" in page and "known scanner test" in page
    assert 'id="review-label">false_positive' in page
    rows = env.store.query(f"SELECT label, actor, src_ip, tenant, detector FROM {env.store.database}.review_labels FINAL "
                           "WHERE alert_id = {id:String}", {"id": alert.alert_id})
    assert rows == [("false_positive", "analyst", alert.src_ip, alert.tenant, alert.detector)]
    assert "Dismiss as false positive" not in page, "a dismissed alert offers no second dismissal"


def test_acknowledge_only_from_new(env):
    alert = env.filled.first(label="spam_exempted_new", exempted=True)
    api = env.api(env.app(), "analyst")
    r = api.post(f"/api/alerts/{alert.alert_id}/ack")
    assert r.status_code == 200 and r.json()["status"] == "acknowledged"
    r = api.post(f"/api/alerts/{alert.alert_id}/ack")
    assert r.status_code == 409 and "only new alerts" in r.json()["error"]
    assert api.post("/api/alerts/0123456789abcdef01234567/ack").status_code == 404


def test_a_viewer_sees_no_buttons_and_cannot_act(env):
    alert = env.filled.first(label="spam_burst", exempted=False)
    app = env.app()
    cl, csrf = login(app, "viewer")
    page = cl.get(f"/alerts/{alert.alert_id}").text
    for button in ("Acknowledge", "Confirm abuse", "Dismiss as false positive", "Re-check DNSBLs", "Revoke exemption"):
        assert button not in page
    for action in ("ack", "confirm", "dismiss", "dnsbl", "restore"):
        r = cl.post(f"/alerts/{alert.alert_id}/{action}", data={"csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 403 and "analyst role" in r.text
        assert env.api(app, "viewer").post(f"/api/alerts/{alert.alert_id}/{action}").status_code == 403
    r = env.api(app, "analyst").post("/api/exemptions/grant", json={"key": "192.0.2.10", "tenant": "t", "reason": "x"})
    assert r.status_code == 403 and "admin role" in r.json()["error"]
    detail = env.api(app, "viewer").get(f"/api/alerts/{alert.alert_id}").json()
    assert detail["alert"]["status"] == "new" and detail["actions"] == [] and detail["label"] is None


def test_state_changes_without_the_sessions_csrf_token_are_refused(env):
    alert = env.filled.first(label="flood", exempted=True)
    cl, csrf = login(env.app(), "analyst")
    for data in ({}, {"csrf_token": "forged"}, {"csrf_token": csrf + "x"}):
        r = cl.post(f"/alerts/{alert.alert_id}/confirm", data=data, follow_redirects=False)
        assert r.status_code == 403 and "CSRF" in r.text
    r = cl.post(f"/api/alerts/{alert.alert_id}/ack", follow_redirects=False)
    assert r.status_code == 403, "a cookie session on the API needs the X-CSRF-Token header too"
    other, other_csrf = login(env.app(), "analyst")
    assert other_csrf != csrf
    r = cl.post(f"/alerts/{alert.alert_id}/ack", data={"csrf_token": other_csrf}, follow_redirects=False)
    assert r.status_code == 403, "another session's token does not count"
    assert cl.get(f"/api/alerts/{alert.alert_id}").json()["actions"] == []
    r = cl.post(f"/api/alerts/{alert.alert_id}/ack", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["status"] == "acknowledged"


def test_recheck_dnsbl_asks_the_configured_lists_and_stores_the_answers(env, bl_server):
    alert = env.filled.first(label="blocked_attempts", exempted=False)
    cl, csrf = login(env.app(), "analyst")
    assert "Not checked yet." in cl.get(f"/alerts/{alert.alert_id}").text
    r = cl.post(f"/alerts/{alert.alert_id}/dnsbl", data={"csrf_token": csrf})
    assert r.status_code == 200 and f"{alert.src_ip}: listed in 1 of 1 zones (score 1): test-bl" in r.text
    assert 'class="dnsbl-listed">listed' in r.text and "spam source" in r.text
    reverse = ".".join(reversed(alert.src_ip.split(".")))
    assert any(q.name.startswith(f"{reverse}.bl.dnsbl.test") for q in bl_server.queries())
    stored = env.store.query(f"SELECT ip, zone, status, codes, actor, alert_id FROM {env.store.database}.dnsbl_checks "
                             "WHERE ip = {ip:String}", {"ip": alert.src_ip})
    assert stored == [(alert.src_ip, "test-bl", "listed", ["127.0.0.2"], "analyst", alert.alert_id)]
    other = env.filled.first(label="spam_burst", exempted=False, severity="critical")
    out = env.api(env.app(), "analyst").post(f"/api/alerts/{other.alert_id}/dnsbl").json()
    assert out["detail"]["results"][0]["status"] == "not_listed" and out["status"] == "new"


def test_admin_grants_revokes_and_restores_exemptions_through_the_api(env):
    admin = env.api(env.app(), "admin")
    r = admin.post("/api/exemptions/grant", json={"key": "192.0.2.0/29", "tenant": "acct-9", "reason": "relay pool",
                                                   "expires": "2099-01-01"})
    assert r.status_code == 200 and r.json()["detail"]["event"]["kind"] == "granted"
    assert admin.post("/api/exemptions/revoke", json={"key": "192.0.2.3", "reason": "spam"}).status_code == 200
    shown = admin.get("/api/exemptions/show", params={"key": "192.0.2.3"}).json()
    assert shown["allowed"] is False and shown["decided_by"] == "192.0.2.3"
    assert read_state(env.cfg)["192.0.2.3"].action == "deny"
    r = admin.post("/api/exemptions/revoke", json={"key": "192.0.2.3", "reason": "again"})
    assert r.status_code == 409 and "already revoked" in r.json()["error"]
    assert admin.post("/api/exemptions/restore", json={"key": "192.0.2.3", "reason": "fixed"}).status_code == 200
    listed = admin.get("/api/exemptions", params={"state": "all"}).json()["exemptions"]
    assert {e["ip"]: e["state"] for e in listed}["192.0.2.3"] == "lifted"
    assert admin.post("/api/exemptions/grant", json={"key": "192.0.2.300", "tenant": "t", "reason": "x"}).status_code == 400
    assert admin.post("/api/exemptions/grant", json={"key": "192.0.2.9", "tenant": "t", "reason": " "}).status_code == 400

    cl, csrf = login(env.app(), "admin")
    page = cl.get("/exemptions/show", params={"key": "192.0.2.3"}).text
    assert page.count('class="state state-') >= 2 and "fixed" in page and "spam" in page


def test_pages_render_for_every_role(env):
    app = env.app()
    for role, pages in (("viewer", ("/alerts", "/exemptions", "/health")), ("admin", ("/users",))):
        cl, _ = login(app, role)
        for path in pages:
            r = cl.get(path)
            assert r.status_code == 200, (role, path)
            assert r.headers["content-security-policy"].startswith("default-src 'self'")
            assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    viewer, _ = login(app, "viewer")
    assert viewer.get("/users").status_code == 403


def test_health_counts_what_the_store_holds(env):
    h = env.api(env.app(), "viewer").get("/api/health").json()
    db = env.store.database
    assert h["flows"] == env.store.count("flows") > 0
    assert h["windows"] == env.store.count("window_features") > 0
    assert sum(h["alerts_by_severity"].values()) == len(env.filled.alerts)
    assert sum(h["alerts_by_status"].values()) == len(env.filled.alerts)
    last = env.store.query(f"SELECT max(window_end) FROM {db}.window_features")[0][0]
    assert h["last_window_end"] == last.replace(tzinfo=dt.timezone.utc).isoformat().replace("+00:00", "Z")
    assert h["webhook_dead_letters"] == 0


# -- command line -----------------------------------------------------------------------------------
def test_users_commands_add_list_and_issue_a_token_that_works(env):
    runner = CliRunner()
    r = runner.invoke(users_group, ["add", "bob", "--role", "analyst"], input=f"{PASSWORD}\n", obj=env.cfg)
    assert r.exit_code == 0, r.output
    r = runner.invoke(users_group, ["add", "bob", "--role", "viewer"], input=f"{PASSWORD}\n", obj=env.cfg)
    assert isinstance(r.exception, AuthError) and "exists" in str(r.exception)
    r = runner.invoke(users_group, ["add", "carol", "--role", "viewer"], input="short\n", obj=env.cfg)
    assert isinstance(r.exception, InputError) and "at least 10 characters" in str(r.exception)
    r = runner.invoke(users_group, ["token", "bob", "--label", "SIEM sync"], obj=env.cfg)
    assert r.exit_code == 0
    token = r.stdout.strip()
    assert token.startswith("sgc_") and "not shown again" in r.stderr
    me = TestClient(env.app(), headers={"Authorization": f"Bearer {token}"}).get("/api/me").json()
    assert (me["name"], me["role"], me["disabled"]) == ("bob", "analyst", False)
    r = runner.invoke(users_group, ["list", "--json", "--tokens"], obj=env.cfg)
    lines = [line for line in r.stdout.splitlines() if '"bob"' in line]
    assert any('"kind": "user"' in line and '"analyst"' in line for line in lines)
    assert any('"kind": "token"' in line and "SIEM sync" in line and token not in line for line in lines)
    r = runner.invoke(users_group, ["set", "bob", "--role", "viewer"], obj=env.cfg)
    assert r.exit_code == 0 and Users(env.store).get("bob").role == "viewer"


def test_console_listens_on_loopback_by_default_and_needs_a_user_first(tmp_path, chdb_dir):
    defaults = {p.name: p.default for p in console_cmd.params}
    assert (defaults["host"], defaults["port"]) == ("127.0.0.1", 8025)
    empty = make_config(tmp_path, "", f"chdb://{chdb_dir}")
    r = CliRunner().invoke(console_cmd, [], obj=empty)
    assert isinstance(r.exception, ConfigError) and "smtpguard users add NAME --role admin" in str(r.exception)


def test_every_alert_action_has_a_cli_command_with_json(env, bl_server):
    """CLI parity: `smtpguard alerts ack|confirm|dismiss|dnsbl|restore` do what the console's buttons do."""
    from smtpguard.cli.console import ALERT_ACTION_COMMANDS
    from smtpguard.console import queries

    api = env.api(env.app(), "viewer")
    untouched = [a for a in env.filled.alerts
                 if a.src_ip and api.get(f"/api/alerts/{a.alert_id}").json()["alert"]["status"] == "new"]
    ack, confirm, dismiss = untouched[-3:]
    runner = CliRunner()
    by_name = {c.name: c for c in ALERT_ACTION_COMMANDS}
    assert set(by_name) == {"ack", "confirm", "dismiss", "dnsbl", "restore"}
    # restore gives a held repeat its rule severity back (tests/test_repeats.py); any other alert is refused
    r = runner.invoke(by_name["restore"], [ack.alert_id, "--actor", "cli-tester"], obj=env.cfg)
    assert r.exit_code != 0 and "was not held" in str(r.exception), r.output

    def invoke(name, *args):
        r = runner.invoke(by_name[name], [*args, "--json", "--actor", "cli-tester"], obj=env.cfg)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    out = invoke("ack", ack.alert_id, "--note", "on it")
    assert (out["action"], out["actor"], out["status"]) == ("acknowledge", "cli-tester", "acknowledged")
    out = invoke("dismiss", dismiss.alert_id)
    assert out["status"] == "dismissed"
    assert queries.label_of(env.store, dismiss.alert_id)["label"] == "false_positive"
    out = invoke("confirm", confirm.alert_id, "--note", "abuse")
    assert out["status"] == "confirmed" and queries.label_of(env.store, confirm.alert_id)["label"] == "confirmed"
    out = invoke("dnsbl", ack.alert_id)
    assert out["action"] == "recheck_dnsbl" and [r["zone"] for r in out["detail"]["results"]] == ["test-bl"]
    detail = api.get(f"/api/alerts/{ack.alert_id}").json()
    assert sorted((a["action"], a["actor"]) for a in detail["actions"]) == [("acknowledge", "cli-tester"),
                                                                            ("recheck_dnsbl", "cli-tester")]
    # a refused action and an unknown alert are errors the caller can see, and change nothing
    r = runner.invoke(by_name["ack"], [ack.alert_id], obj=env.cfg)
    assert r.exit_code != 0 and "only new alerts" in str(r.exception)
    r = runner.invoke(by_name["dismiss"], ["0123456789abcdef01234567"], obj=env.cfg)
    assert r.exit_code != 0 and "no alert" in str(r.exception)
