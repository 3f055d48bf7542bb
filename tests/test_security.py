"""No way in: every console route needs a login, every action its role, every filter reaches
ClickHouse as a parameter, no secret reaches a log line, and a DNS reply that does not answer the
query (another id) is never a listing.

The console tests share the filled store of tests/test_console.py (its ``env`` fixture)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dns.message
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from smtpguard.response.dnsbl import check_sync
from test_console import bl_server, env  # noqa: F401 - the shared fixtures
from test_console import login
from test_dnsbl import Responder

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))
#: routes anybody may call: the login form, the root redirect, the Prometheus scrape (public by default)
OPEN = {("GET", "/login"), ("POST", "/login"), ("GET", "/"), ("GET", "/metrics")}
EVIL = ("x' OR 1=1 --", "'); DROP TABLE alerts; --", "{ip:String}", "\\' \" `", "1; SELECT 1", "%27%20OR%201%3D1")


def routes(app) -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        if isinstance(r, APIRoute):
            for m in sorted(r.methods - {"HEAD"}):
                out.append((m, re.sub(r"\{[^}]+\}", "x", r.path)))
    return out


def test_every_route_but_the_login_needs_credentials(env):  # noqa: F811
    app = env.app()
    anon = TestClient(app)
    checked = 0
    for method, path in routes(app):
        if (method, path.replace("/x", "/{}")) in OPEN or (method, path) in OPEN:
            continue
        r = anon.request(method, path, follow_redirects=False)
        checked += 1
        if path.startswith("/api/"):
            assert r.status_code == 401, (method, path, r.status_code)
        else:
            # pages send a browser to the login form; posts without a session are refused
            assert r.status_code in (303, 401, 403), (method, path, r.status_code)
            if r.status_code == 303:
                assert r.headers["location"].startswith("/login"), (method, path)
    assert checked >= 20, "the route list is the console's, not an empty one"


def test_every_state_change_needs_more_than_the_viewer_role(env):  # noqa: F811
    app = env.app()
    viewer = env.api(app, "viewer")
    posts = [path for method, path in routes(app) if method == "POST" and path.startswith("/api/")]
    assert posts
    for path in posts:
        r = viewer.post(path, json={"key": "192.0.2.1", "tenant": "t", "reason": "r"})
        # the role is checked before the action name or the alert: 403 even for unknown ones
        assert r.status_code == 403, (path, r.status_code)
    # the pages' forms: refused without the session's CSRF token even for an admin
    cl, _csrf = login(app, "admin")
    for method, path in routes(app):
        if method == "POST" and not path.startswith("/api/") and path not in ("/login",):
            r = cl.post(path, data={}, follow_redirects=False)
            assert r.status_code == 403, (path, r.status_code)


@pytest.mark.parametrize("field", ["severity", "detector", "tenant", "status", "ip", "since", "until", "page",
                                   "per_page", "suppressed"])
def test_injection_strings_through_every_alert_filter(env, field):  # noqa: F811
    api = env.api(env.app(), "viewer")
    total = api.get("/api/alerts").json()["total"]
    for evil in EVIL:
        r = api.get("/api/alerts", params={field: evil})
        # a value that is not of the field's kind is a 400; any other reaches ClickHouse as a parameter
        assert r.status_code in (200, 400), (field, evil, r.status_code)
        if r.status_code == 200:
            assert r.json()["total"] in (0, total), (field, evil)
    assert api.get("/api/alerts").json()["total"] == total, "nothing was dropped or changed"


def test_injection_strings_through_the_exemption_filters_and_the_cli(env):  # noqa: F811
    from click.testing import CliRunner

    from smtpguard.cli.console import ALERT_ACTION_COMMANDS
    from smtpguard.cli.response import exemptions_group

    from smtpguard.cli.main import Ctx

    ctx = Ctx.of(env.cfg)
    api = env.api(env.app(), "viewer")
    n = len(api.get("/api/exemptions", params={"state": "all"}).json()["exemptions"])
    for evil in EVIL:
        assert api.get("/api/exemptions", params={"state": "all", "tenant": evil}).json()["exemptions"] == []
        assert api.get("/api/exemptions/show", params={"key": evil}).status_code == 400
        r = CliRunner().invoke(exemptions_group, ["list", "--state", "all", "--tenant", evil, "--json"], obj=ctx)
        assert r.exit_code == 0 and r.stdout.strip() == "", (evil, r.output)
        for cmd in ALERT_ACTION_COMMANDS:
            r = CliRunner().invoke(cmd, [evil], obj=ctx)
            assert r.exit_code != 0 and "no alert" in str(r.exception), (cmd.name, evil)
    assert len(api.get("/api/exemptions", params={"state": "all"}).json()["exemptions"]) == n


def _run(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    e.update(env_extra or {})
    return subprocess.run([SMTPGUARD, "-vv", *args], capture_output=True, text=True, env=e, timeout=120)


def test_no_secret_reaches_a_log_line_or_an_error(tmp_path):
    secret = "hunter2-Sup3rSecret"
    conf = tmp_path / "c.toml"
    conf.write_text(f'''data_dir = "{tmp_path}"
[kafka]
bootstrap_servers = "127.0.0.1:1"
client = {{ "security.protocol" = "SASL_PLAINTEXT", "sasl.mechanism" = "PLAIN", "sasl.username" = "u", "sasl.password" = "{secret}" }}
[store]
dsn = "http://reader:{secret}@127.0.0.1:1/smtpguard"
[response.webhook]
url = "http://127.0.0.1:1/hook"
secret = "{secret}"
[dnsbl]
zones = [{{ name = "zen-dqs", zone = "zen.spamhaus.org", dqs_key = "abc{secret.lower().replace('-', '')}" }}]
''')
    runs = [
        _run("--config", str(conf), "config", "show"),
        _run("--config", str(conf), "config", "show", "--json"),
        _run("--config", str(conf), "alerts", "list"),                 # the store refuses: an error line
        _run("--config", str(conf), "dnsbl", "zones"),
        _run("--config", str(conf), "topics", "create", env_extra={"SMTPGUARD_KAFKA__CLIENT": '{"socket.timeout.ms": "1500", "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "' + secret + '"}'}),
    ]
    for r in runs:
        text = r.stdout + r.stderr
        assert secret not in text and secret.lower().replace("-", "") not in text, text[-2000:]
    assert runs[2].returncode != 0 and "127.0.0.1" in runs[2].stderr, "the failing command still says what failed"


def listing_under_another_id(q: dns.message.Message) -> dns.message.Message:
    """A listing for the name asked, sent back under another query id (a spoofing attempt)."""
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "127.0.0.2"))
    r.id = (q.id + 1) % 65536
    FORGED.append(r.id)
    return r


FORGED: list[int] = []


def test_a_reply_with_another_query_id_is_never_a_listing():
    from smtpguard.response.dnsbl import Code, DnsblConfig, Zone

    zone = Zone("t", "bl.dnsbl.test", {"127.0.0.2": Code("spam")})
    with Responder(listing_under_another_id) as srv:
        cfg = DnsblConfig(zones=[zone], default_zones=["t"], resolvers=[f"127.0.0.1:{srv.port}"], timeout_ms=800)
        [r] = check_sync(["192.0.2.1"], config=cfg)
    assert FORGED, "the forged replies were sent"
    assert r.status == "error" and r.error == "timeout"
