"""``smtpguard console`` (the web console) and ``smtpguard users`` (its accounts and API tokens).

The commands read the loaded config from the ``smtpguard`` command's context (``cfg``); a
:class:`~smtpguard.core.config.Config` given as the context object (``obj=``) takes its place.

With the embedded store, one process at a time owns it: add users before starting the
console, or manage them on the console's Users page while it runs.
"""

from __future__ import annotations

import json
import sys

import click

from smtpguard.core.config import Config, mask_dsn
from smtpguard.console.auth import ROLES, ApiTokens, AuthError, Users
from smtpguard.console.server import DEFAULT_HOST, DEFAULT_PORT, bind
from smtpguard.cli.response import os_user
from smtpguard.core.errors import ConfigError
from smtpguard.core.store import Store


def _cfg(ctx: click.Context) -> Config:
    own = ctx.find_object(Config)
    if own is not None:
        return own
    # the smtpguard command's context object carries the loaded, validated config
    return ctx.find_root().obj.cfg


def _store(ctx: click.Context) -> Store:
    cfg = _cfg(ctx)
    store = Store(cfg.store_dsn, cfg.store.database)
    ctx.call_on_close(store.close)
    return store


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def _read_password(prompt: str) -> str:
    """Ask twice on a terminal; otherwise read the first line of stdin (for scripts: ``echo "$PW" | ...``)."""
    if sys.stdin.isatty():
        return click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    line = sys.stdin.readline()
    if not line:
        raise click.UsageError("no password on stdin (give it as the first line, or run on a terminal to be asked)")
    return line.rstrip("\r\n")


@click.command("console")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="address to listen on; anything but loopback exposes the console: put TLS in front of it")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option("--ssl-certfile", metavar="FILE", help="serve https with this certificate (PEM)")
@click.option("--ssl-keyfile", metavar="FILE", help="the certificate's private key (PEM)")
@click.option("--forwarded-allow-ips", metavar="IPS", default="127.0.0.1", show_default=True,
              help="reverse proxies whose X-Forwarded-Proto/-For headers are believed (comma-separated)")
@click.pass_context
def console_cmd(ctx: click.Context, host: str, port: int, ssl_certfile: str | None, ssl_keyfile: str | None,
                forwarded_allow_ips: str) -> None:
    """Serve the web console: alert queue, evidence, actions, exemptions, pipeline health.

    \b
    Examples:
      smtpguard users add alice --role admin        # first, while nothing else holds the store
      smtpguard console                              # http://127.0.0.1:8025/
      smtpguard console --host 0.0.0.0 --ssl-certfile cert.pem --ssl-keyfile key.pem
    """
    import uvicorn

    from smtpguard.console.app import create_app
    from smtpguard.console.server import uvicorn_config

    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise click.UsageError("--ssl-certfile and --ssl-keyfile go together")
    cfg = _cfg(ctx)
    store = _store(ctx)
    if Users(store).count() == 0:
        raise ConfigError("the console has no users yet; stop this command and create an admin first: "
                          "smtpguard users add NAME --role admin")
    app = create_app(cfg, store)
    sock = bind(host, port)
    scheme = "https" if ssl_certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    _err(f"console on {scheme}://{shown}:{port}/ (store {mask_dsn(cfg.store_dsn)}); Ctrl-C to stop")
    server = uvicorn.Server(uvicorn_config(app, host, port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                                           forwarded_allow_ips=forwarded_allow_ips))
    # uvicorn runs in a thread (it installs no signal handlers there); SIGTERM and SIGINT stop it here,
    # the way every long-running command stops (smtpguard/lifecycle.py)
    import threading

    from smtpguard.core.lifecycle import Shutdown

    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="console", daemon=True)
    with Shutdown(name="smtpguard console") as stop:
        thread.start()
        while thread.is_alive() and not stop.wait(0.5):
            pass
        server.should_exit = True
        thread.join(30)
    sock.close()
    store.close()
    _err("console stopped")


@click.group("users")
def users_group() -> None:
    """Console users and their API tokens.

    \b
    Roles: viewer (reads), analyst (acts on alerts), admin (also exemptions and users).
    Examples:
      smtpguard users add alice --role admin               # asks for the password
      printf '%s\\n' "$PASSWORD" | smtpguard users add bot --role analyst
      smtpguard users token bot --label "SIEM sync"        # prints the token once
      smtpguard users list
    """


@users_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True, help="what the user may do")
@click.pass_context
def users_add(ctx: click.Context, name: str, role: str) -> None:
    """Add a user; the password is asked for (or read from the first line of stdin)."""
    store = _store(ctx)
    password = _read_password(f"password for {name}")
    u = Users(store).add(name, role, password, os_user())
    _err(f"user {u.name} added as {u.role}")


@users_group.command("set")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), help="a new role")
@click.option("--password", "new_password", is_flag=True, help="set a new password (asked for, or read from stdin)")
@click.option("--disable/--enable", "disabled", default=None, help="refuse or allow the user's logins and tokens")
@click.pass_context
def users_set(ctx: click.Context, name: str, role: str | None, new_password: bool, disabled: bool | None) -> None:
    """Change a user's role, password, or whether they may log in."""
    if role is None and not new_password and disabled is None:
        raise click.UsageError("give --role, --password, --disable or --enable")
    store = _store(ctx)
    password = _read_password(f"new password for {name}") if new_password else None
    u = Users(store).set(name, os_user(), role=role, password=password, disabled=disabled)
    _err(f"user {u.name}: {u.role}{', disabled' if u.disabled else ''}")


@users_group.command("token")
@click.argument("name")
@click.option("--label", default="", help="what the token is for (shown in `users list --tokens`)")
@click.pass_context
def users_token(ctx: click.Context, name: str, label: str) -> None:
    """Issue an API token for NAME and print it once (only its hash is stored).

    Scripts send it as `Authorization: Bearer TOKEN` to the console's /api/ endpoints.
    """
    store = _store(ctx)
    user = Users(store).get(name)
    if user is None:
        raise AuthError(f"no user {name}; add one with `smtpguard users add {name} --role viewer`")
    click.echo(ApiTokens(store).issue(user, label))
    _err("store this token now: it is not shown again")


@users_group.command("revoke-token")
@click.argument("token_id")
@click.pass_context
def users_revoke_token(ctx: click.Context, token_id: str) -> None:
    """Revoke an API token by its id (see `users list --tokens`)."""
    ApiTokens(_store(ctx)).revoke(token_id)
    _err(f"API token {token_id} revoked")


@users_group.command("list")
@click.option("--tokens", "with_tokens", is_flag=True, help="list the API tokens too")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.pass_context
def users_list(ctx: click.Context, with_tokens: bool, as_json: bool) -> None:
    """List the users (and their API tokens)."""
    store = _store(ctx)
    rows = Users(store).list()
    for u in rows:
        d = u.to_dict()
        if as_json:
            click.echo(json.dumps({"kind": "user", **d} if with_tokens else d))
        else:
            click.echo(f"{u.name:24} {u.role:8} {'disabled' if u.disabled else 'enabled':8} since {d['created_at']}")
    if with_tokens:
        for t in ApiTokens(store).list():
            d = t.to_dict()
            if as_json:
                click.echo(json.dumps({"kind": "token", **d}))
            else:
                click.echo(f"token {t.token_id}  {t.user:24} {'revoked' if t.revoked else 'active':8} "
                           f"issued {d['created_at']}  {t.label}")
    if not as_json:
        _err(f"{len(rows)} users")


# -- console actions on alerts, for scripts (the same functions the console's buttons call) --------
def _alert_command(name: str, action: str, help_text: str, *, with_note: bool = True) -> click.Command:
    """``smtpguard alerts NAME ALERT_ID``: the console action ``actions.<action>`` with the actor
    (and note) from the command line; NotFound and Refused are one line on stderr and exit status 1."""

    @click.command(name, help=help_text)
    @click.argument("alert_id")
    @click.option("--actor", default=os_user, show_default="the OS user", help="who acts (recorded)")
    @click.option("--json", "as_json", is_flag=True, help="the action's result as one JSON object")
    @click.pass_context
    def command(ctx: click.Context, alert_id: str, actor: str, as_json: bool, note: str = "") -> None:
        from smtpguard.console import actions

        c = actions.Console(_cfg(ctx), _store(ctx))
        extra = (note,) if with_note else ()
        result = getattr(actions, action)(c, alert_id, actor, *extra)
        click.echo(json.dumps(result.to_dict()) if as_json else result.message)

    if with_note:
        command = click.option("--note", default="", help="why (recorded with the action, shown on the alert page)")(
            command)
    return command


ALERT_ACTION_COMMANDS = (
    _alert_command("ack", "acknowledge", "Acknowledge an alert: someone is looking at it (status new -> acknowledged)."),
    _alert_command("confirm", "confirm", "Confirm an alert as abuse: label it for training and apply the revocation "
                   "policy to it (notify, warn, propose or revoke the source's exemption, published to the "
                   "enforcement outputs)."),
    _alert_command("dismiss", "dismiss", "Dismiss an alert as a false positive (stored as a training label)."),
    _alert_command("restore", "restore", "Give an alert held at low as a repeat of dismissed alerts the severity its "
                   "rules gave it (confirm it afterwards to apply the revocation policy)."),
    _alert_command("dnsbl", "recheck_dnsbl", "Look the alert's source up in the DNSBLs (dnsbl.default_zones) again "
                   "and store the answers with it.", with_note=False),
)
