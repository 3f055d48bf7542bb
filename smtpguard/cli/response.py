"""``smtpguard exemptions`` (the exemption registry) and ``smtpguard enforce`` (outputs for the network).

The groups read the loaded config from the ``smtpguard`` command's context (``cfg``, with its
``[response]`` section as ``cfg.response``); a :class:`ResponseContext` given as the context
object (``obj=``) takes its place.

Every command that changes the registry first records the exemptions that have run out,
then makes its change, then publishes the enforcement events (Kafka when
``kafka.bootstrap_servers`` is set, the webhook when ``response.webhook.url`` is set).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from dataclasses import dataclass
from typing import Any

import click

from smtpguard.core.config import Config
from smtpguard.core.errors import BrokerError, InputError, SmtpguardError
from smtpguard.core.config import ResponseConfig
from smtpguard.response.enforce import Outputs, messages_for, state_messages, write_nftables
from smtpguard.response.policy import DecisionLog
from smtpguard.core.registry import STATES, ExemptionEvent, Registry, iso_ms, parse_expiry, parse_key, to_ms
from smtpguard.core.store import Store


@dataclass
class ResponseContext:
    cfg: Config
    response: ResponseConfig


def _settings(ctx: click.Context) -> ResponseContext:
    own = ctx.find_object(ResponseContext)
    if own is not None:
        return own
    # the smtpguard command's context object carries the loaded, validated config
    cfg = ctx.find_root().obj.cfg
    return ResponseContext(cfg, cfg.response)


class _Session:
    """The store and registry for one command, and publishing what it changed."""

    def __init__(self, rc: ResponseContext):
        self.rc = rc
        self.store = Store(rc.cfg.store_dsn, rc.cfg.store.database)
        self.registry = Registry(self.store)

    def close(self) -> None:
        self.store.close()

    def publish(self, events: list[ExemptionEvent]) -> None:
        if not events:
            return
        states = self.registry.states()
        msgs = [m for e in events for m in messages_for(e, states)]
        try:
            report = Outputs(self.rc.cfg, self.rc.response, self.store).publish(msgs)
        except BrokerError as e:
            raise SmtpguardError(f"the registry change is recorded, but {e}; run `smtpguard enforce publish` "
                                 "once Kafka is reachable") from None
        for s in report.skipped:
            _err(f"enforcement events not sent to {s}")
        if report.webhook_dead:
            raise SmtpguardError(f"the registry change is recorded, but {report.webhook_dead} webhook deliveries failed "
                                 f"(see the {self.store.database}.webhook_dead_letters table)")


def _open(ctx: click.Context) -> _Session:
    s = _Session(_settings(ctx))
    ctx.call_on_close(s.close)
    return s


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def os_user() -> str:
    """Who runs the command, as recorded with what it changes."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        # a container user without a passwd entry still has a uid worth recording
        return f"uid:{os.getuid()}"


def _key_arg(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return parse_key(value)[0]
    except InputError as e:
        raise click.BadParameter(str(e)) from None


def _expiry_opt(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return parse_expiry(value)
    except InputError as e:
        raise click.BadParameter(str(e)) from None


_actor_opt = click.option("--actor", default=os_user, show_default="the OS user",
                          help="who makes the change (recorded with it)")
_reason_opt = click.option("--reason", required=True, help="why (recorded with the change)")
_json_opt = click.option("--json", "as_json", is_flag=True, help="JSON output")


def _change(ctx: click.Context, act) -> ExemptionEvent:
    s = _open(ctx)
    expired = s.registry.expire_due()
    event = act(s.registry)
    s.publish([*expired, event])
    return event


def _done(e: ExemptionEvent) -> None:
    _err(f"{e.ip}: {e.kind} by {e.actor} at {iso_ms(e.at_ms)} (event {e.event_id})")


# -- exemptions ---------------------------------------------------------------------------------------
@click.group("exemptions")
def exemptions_group() -> None:
    """The exemption registry: who may send mail on port 25, with the history of every change.

    \b
    Examples:
      smtpguard exemptions grant 198.51.100.7 --tenant acct-1 --reason "mail relay, CHG-42" --expires 2026-12-31
      smtpguard exemptions revoke 198.51.100.7 --reason "spam run" --alert 4f1c0a9e2b7d
      smtpguard exemptions restore 198.51.100.7 --reason "customer cleaned the instance"
      smtpguard exemptions list --state revoked --json
    """


@exemptions_group.command("grant")
@click.argument("ip", metavar="IP|CIDR", callback=_key_arg)
@click.option("--tenant", required=True, help="cloud account, project or subscription that holds the address")
@_reason_opt
@click.option("--expires", metavar="DATE", callback=_expiry_opt, help="ISO 8601 date or time it ends (UTC unless a zone is given)")
@click.option("--declared", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="the sending volume the exemption is for, in SMTP connections a minute at peak: detectors judge "
                   "the sender against it from its first minute")
@_actor_opt
@click.pass_context
def grant_cmd(ctx: click.Context, ip: str, tenant: str, reason: str, expires: dt.datetime | None,
              declared: float | None, actor: str) -> None:
    """Exempt an address or block: it may send mail on port 25."""
    _done(_change(ctx, lambda reg: reg.grant(ip, tenant, reason, actor, expires, declared=declared)))


@exemptions_group.command("renew")
@click.argument("ip", metavar="IP|CIDR", callback=_key_arg)
@_reason_opt
@click.option("--expires", metavar="DATE", callback=_expiry_opt, help="new end (default: never)")
@click.option("--declared", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="a new declared sending volume (SMTP connections a minute); default: keep the current one")
@_actor_opt
@click.pass_context
def renew_cmd(ctx: click.Context, ip: str, reason: str, expires: dt.datetime | None, declared: float | None,
              actor: str) -> None:
    """Give an active or expired exemption a new expiry (and declared volume)."""
    _done(_change(ctx, lambda reg: reg.renew(ip, reason, actor, expires, declared=declared)))


@exemptions_group.command("revoke")
@click.argument("ip", metavar="IP|CIDR", callback=_key_arg)
@_reason_opt
@click.option("--alert", "alert_ids", multiple=True, metavar="ID", help="an alert behind the revocation (repeatable)")
@_actor_opt
@click.pass_context
def revoke_cmd(ctx: click.Context, ip: str, reason: str, alert_ids: tuple[str, ...], actor: str) -> None:
    """Revoke an exemption (port 25 closes again). An address inside an exempted block is cut out of it.

    Exit status 1 when the address has no exemption to revoke.
    """
    _done(_change(ctx, lambda reg: reg.revoke(ip, reason, actor, alert_ids)))


@exemptions_group.command("restore")
@click.argument("ip", metavar="IP|CIDR", callback=_key_arg)
@_reason_opt
@_actor_opt
@click.pass_context
def restore_cmd(ctx: click.Context, ip: str, reason: str, actor: str) -> None:
    """Lift a revocation: the exemption is as it was before it."""
    _done(_change(ctx, lambda reg: reg.restore(ip, reason, actor)))


@exemptions_group.command("list")
@click.option("--state", type=click.Choice([*STATES, "all"]), default="active", show_default=True)
@click.option("--tenant", help="only keys this tenant has held")
@_json_opt
@click.pass_context
def list_cmd(ctx: click.Context, state: str, tenant: str | None, as_json: bool) -> None:
    """List exemptions by state (lifted: a revoked address inside a block, restored)."""
    rows = _open(ctx).registry.list(state, tenant=tenant)
    for s in rows:
        d = s.to_dict()
        if as_json:
            click.echo(json.dumps(d))
        else:
            click.echo(f"{d['ip']:20} {d['state']:8} {d['tenant']:16} granted {d['granted_at'] or '-':24} "
                       f"expires {d['expires_at'] or 'never':24} {d['last_kind']} by {d['last_actor']}: {d['last_reason']}")
    if not as_json:
        _err(f"{len(rows)} exemptions ({state})")


@exemptions_group.command("show")
@click.argument("ip", metavar="IP|CIDR", callback=_key_arg)
@_json_opt
@click.pass_context
def show_cmd(ctx: click.Context, ip: str, as_json: bool) -> None:
    """Show an address's exemption, what decides for it, and the history of changes."""
    shown = _open(ctx).registry.show(ip)
    data: dict[str, Any] = {
        "ip": shown.key, "allowed": shown.allowed,
        "decided_by": shown.decided_by.key if shown.decided_by else None,
        "exemption": shown.state.to_dict() if shown.state else None,
        "history": [e.to_dict() for e in shown.history],
    }
    if as_json:
        click.echo(json.dumps(data))
        return
    verdict = "may send on port 25" if shown.allowed else "may not send on port 25"
    via = f" (decided by {data['decided_by']})" if data["decided_by"] not in (None, shown.key) else ""
    click.echo(f"{shown.key}: {verdict}{via}")
    if shown.state:
        st = data["exemption"]
        click.echo(f"state {st['state']}  tenant {st['tenant']}  granted {st['granted_at'] or '-'}  "
                   f"expires {st['expires_at'] or 'never'}")
    if not shown.history:
        click.echo("no exemption events for this key")
    for e in data["history"]:
        alerts = f"  alerts {', '.join(e['alert_ids'])}" if e["alert_ids"] else ""
        click.echo(f"  {e['at']}  {e['kind']:8} by {e['actor']}: {e['reason']}{alerts}")


@exemptions_group.command("proposals")
@_json_opt
@click.pass_context
def proposals_cmd(ctx: click.Context, as_json: bool) -> None:
    """Revocations the policy proposed for review, for addresses that are still exempted.

    Accept one with `smtpguard exemptions revoke IP --reason ... --alert ID`.
    """
    s = _open(ctx)
    rows = [r for r in DecisionLog(s.store).list(action="propose", limit=1000) if s.registry.covering(r["ip"])]
    for r in rows:
        r = {k: iso_ms(to_ms(v)) if isinstance(v, dt.datetime) else v for k, v in r.items()}
        if as_json:
            click.echo(json.dumps(r))
        else:
            click.echo(f"{r['ip']:20} {r['tenant']:16} alert {r['alert_id']}  {r['reason']}")
    if not as_json:
        _err(f"{len(rows)} proposals")


@exemptions_group.command("import")
@click.argument("path", metavar="FILE.csv", type=click.Path(dir_okay=False))
@_actor_opt
@click.pass_context
def import_cmd(ctx: click.Context, path: str, actor: str) -> None:
    """Grant the exemptions of a CSV (header ip,tenant,granted_at,reason; optional expires_at).

    Addresses the registry already knows are skipped, so importing a file again changes nothing.
    """
    s = _open(ctx)
    expired = s.registry.expire_due()
    result = s.registry.import_csv(path, actor)
    s.publish([*expired, *result.events])
    _err(f"imported {len(result.imported)}, skipped {len(result.skipped)} already in the registry"
         + (f" ({', '.join(result.skipped[:5])}{', ...' if len(result.skipped) > 5 else ''})" if result.skipped else ""))


@exemptions_group.command("export")
@click.argument("path", metavar="FILE.csv", type=click.Path(dir_okay=False))
@click.pass_context
def export_cmd(ctx: click.Context, path: str) -> None:
    """Write what is exempted now as a CSV that `smtpguard analyze --exemptions` reads."""
    n = _open(ctx).registry.export_csv(path)
    _err(f"{n} rows written to {path}")


# -- enforce ------------------------------------------------------------------------------------------
@click.group("enforce")
def enforce_group() -> None:
    """Outputs for the network team: the nftables set file, the enforcement topic, the webhook.

    \b
    Examples:
      smtpguard enforce nftables --output /etc/nftables.d/smtp-allowed.nft && nft -f /etc/nftables.d/smtp-allowed.nft
      smtpguard enforce expire          # from a timer: record expired exemptions and publish them
      smtpguard enforce publish         # send every key's state again (after a broker lost its data)
    """


@enforce_group.command("nftables")
@click.option("--output", "-o", required=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="the set file to write (replaced atomically)")
@click.option("--check/--no-check", default=None,
              help="run `nft -c -f` on the new file before it replaces the old one (default: when nft is installed)")
@click.pass_context
def nftables_cmd(ctx: click.Context, output: str, check: bool | None) -> None:
    """Write the addresses allowed to send on port 25 as nftables sets (smtp_allowed_v4, smtp_allowed_v6)."""
    s = _open(ctx)
    r = write_nftables(output, s.registry, s.rc.response, check=check)
    _err(f"{r.ipv4} IPv4 and {r.ipv6} IPv6 entries written to {r.path}"
         + ("" if r.checked else " (not checked: nft is not installed or --no-check)"))


@enforce_group.command("expire")
@click.pass_context
def expire_cmd(ctx: click.Context) -> None:
    """Record the exemptions that have run out and publish their end."""
    s = _open(ctx)
    events = s.registry.expire_due()
    s.publish(events)
    _err(f"{len(events)} exemptions expired" + (f": {', '.join(e.ip for e in events)}" if events else ""))


@enforce_group.command("publish")
@click.pass_context
def publish_cmd(ctx: click.Context) -> None:
    """Publish the current state of every key again (Kafka and webhook)."""
    s = _open(ctx)
    s.registry.expire_due()
    msgs = state_messages(s.registry.states())
    report = Outputs(s.rc.cfg, s.rc.response, s.store).publish(msgs)
    for skipped in report.skipped:
        _err(f"not sent to {skipped}")
    _err(f"{len(msgs)} keys: {report.kafka} to Kafka, {report.webhook_delivered} to the webhook"
         + (f", {report.webhook_dead} dead-lettered" if report.webhook_dead else ""))
    if report.webhook_dead:
        raise SmtpguardError(f"{report.webhook_dead} webhook deliveries failed "
                             f"(see the {s.store.database}.webhook_dead_letters table)")
