"""``smtpguard dnsbl``: look addresses up in DNS blocklists, list the configured zones.

The group reads the ``[dnsbl]`` config section from the ``smtpguard`` command's context; a
:class:`~smtpguard.response.dnsbl.DnsblConfig` given as the context object (``obj=``) takes its place.
"""

from __future__ import annotations

import asyncio
import json

import click
import msgspec

from smtpguard.response.dnsbl import Checker, DnsblConfig, Result, parse_ip, parse_resolver, summary
from smtpguard.core.errors import InputError, SmtpguardError


def _config(ctx: click.Context) -> DnsblConfig:
    own = ctx.find_object(DnsblConfig)
    if own is not None:
        return own
    root = ctx.find_root().obj
    # the smtpguard command's context object carries the loaded, validated config
    return root.cfg.dnsbl if root is not None else DnsblConfig()


@click.group("dnsbl")
def dnsbl_group() -> None:
    """DNS blocklists: is an address listed, and what does the listing mean.

    \b
    Examples:
      smtpguard dnsbl check 192.0.2.1 2001:db8::25
      smtpguard dnsbl check 192.0.2.1 --zone spamhaus-zen --resolver 10.0.0.2:53 --json
      smtpguard dnsbl zones
    """


@dnsbl_group.command("check")
@click.argument("ips", nargs=-1, required=True, metavar="IP...")
@click.option("--zone", "zone_names", multiple=True, metavar="NAME",
              help="zone to query (repeatable; default: dnsbl.default_zones; see `smtpguard dnsbl zones`)")
@click.option("--resolver", metavar="HOST:PORT", help="resolver for every zone (default: dnsbl.resolvers, else the system's)")
@click.option("--timeout-ms", type=click.IntRange(min=1), help="time allowed per lookup in one zone (dnsbl.timeout_ms)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per result per line")
@click.pass_context
def check_cmd(ctx: click.Context, ips: tuple[str, ...], zone_names: tuple[str, ...], resolver: str | None,
              timeout_ms: int | None, as_json: bool) -> None:
    """Look IP addresses up in blocklists.

    Exit status 0 when the lookups were answered, listed or not; 1 when every lookup failed
    (timeouts, refusals, error codes such as Spamhaus's 127.255.255.254); 2 on a bad address,
    zone name or resolver.
    """
    for ip in ips:
        try:
            parse_ip(ip)
        except InputError as e:
            raise click.BadParameter(str(e), param_hint="IP") from None
    if resolver:
        try:
            parse_resolver(resolver)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--resolver") from None
    checker = Checker(_config(ctx))
    unknown = [n for n in zone_names if n not in checker.zones]
    if unknown:
        raise click.BadParameter(f"unknown zone {', '.join(unknown)}; known: {', '.join(sorted(checker.zones))}",
                                 param_hint="--zone")
    results = asyncio.run(checker.check(ips, list(zone_names) or None, resolver=resolver, timeout_ms=timeout_ms))
    if as_json:
        for r in results:
            click.echo(json.dumps(r.to_dict()))
    else:
        _table(results)
    looked_up = {r.ip for r in results}
    skipped = [ip for ip in dict.fromkeys(str(parse_ip(i)) for i in ips) if ip not in looked_up]
    if skipped:
        click.echo(f"not looked up (no selected zone answers IPv6): {', '.join(skipped)}", err=True)
    if results and all(r.status == "error" for r in results):
        raise SmtpguardError("every DNSBL lookup failed (see the errors above); check the resolver "
                             "(--resolver, dnsbl.resolvers) and that it may query these lists")


def _table(results: list[Result]) -> None:
    wip = max([2, *(len(r.ip) for r in results)])
    wzone = max([4, *(len(r.zone) for r in results)])
    click.echo(f"{'IP':<{wip}} {'ZONE':<{wzone}} {'STATUS':<20} {'CODES':<24} {'TTL':>6} {'MS':>7}  MEANING")
    for r in results:
        codes = ",".join(r.codes) or "-"
        ttl = "-" if r.ttl is None else str(r.ttl)
        ms = "cache" if r.cached else f"{r.elapsed_ms:.0f}"
        status = f"error:{r.error}" if r.error else r.status
        detail = r.meaning + (f"  TXT: {r.txt}" if r.txt else "")
        click.echo(f"{r.ip:<{wip}} {r.zone:<{wzone}} {status:<20} {codes:<24} {ttl:>6} {ms:>7}  {detail}")
    click.echo("")
    for s in summary(results).values():
        click.echo(f"{s.ip}: score {s.score:g}; listed: {', '.join(s.listed) or '-'}; "
                   f"policy: {', '.join(s.policy) or '-'}; errors: {', '.join(s.errors) or '-'}")
    listed = [r for r in results if r.status == "listed" and r.delist_url]
    for url, zones in _by_url(listed).items():
        click.echo(f"delisting for {', '.join(zones)}: {url}")


def _by_url(results: list[Result]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in results:
        zones = out.setdefault(r.delist_url, [])
        if r.zone not in zones:
            zones.append(r.zone)
    return out


@dnsbl_group.command("zones")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per zone per line")
@click.pass_context
def zones_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the configured zones with their return codes (DQS keys masked)."""
    cfg = _config(ctx)
    checker = Checker(cfg)
    for z in checker.zones.values():
        data = msgspec.to_builtins(z)
        data["dqs_key"] = "***" if z.dqs_key else ""
        data["default"] = z.name in cfg.default_zones
        if as_json:
            click.echo(json.dumps(data))
            continue
        flags = " (default)" if data["default"] else ""
        extra = f", resolver {z.resolver}" if z.resolver else ""
        extra += ", DQS" if z.dqs_key else ""
        click.echo(f"{z.name}{flags}: {z.zone}, {z.kind} list, weight {z.weight:g}, "
                   f"{'IPv4 and IPv6' if z.ipv6 else 'IPv4 only'}{extra}")
        if z.delist_url:
            click.echo(f"    delist: {z.delist_url}")
        for code, c in z.codes.items():
            click.echo(f"    {code:<18} {c.category:<8} {c.meaning}")
