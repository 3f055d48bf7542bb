"""``smtpguard audit``: look our senders up in DNS blocklists, now or on a schedule, and report changes.

Reads the config (data_dir, store, ``[dnsbl]``) from the ``smtpguard`` command's context object.
"""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import click

from smtpguard.response.audit import CATEGORIES, TITLES, Audit, AuditLock, dumps, flag_note, parse_interval, run_audit
from smtpguard.response.dnsbl import Checker, parse_resolver
from smtpguard.core.errors import InputError, SmtpguardError
from smtpguard.core.store import Store


def _print(audit: Audit) -> None:
    if audit.baseline:
        click.echo(f"audit {audit.audit_id}: baseline ({len(audit.addresses)} addresses, {audit.lookups} lookups, "
                   f"{audit.listed} listed); no earlier audit to compare with")
    else:
        counts = ", ".join(f"{c.replace('_', ' ')} {len(audit.of(c))}" for c in CATEGORIES)
        click.echo(f"audit {audit.audit_id} against {audit.previous_id}: {counts}")
    for cat in CATEGORIES:
        for c in audit.of(cat):
            note = flag_note(audit, c)
            click.echo(f"  {TITLES[cat].split(' (')[0].lower()}: {c.ip} {c.zone} {','.join(c.codes) or '-'} "
                       f"{c.meaning}" + (f"; delist: {c.delist_url}" if c.delist_url and cat != "errors" else "")
                       + (f"; {note}" if note else ""))
    click.echo(f"reports: {', '.join(str(p) for p in audit.paths.values())}")


@click.command("audit")
@click.option("--targets", default="exempted,flagged", show_default=True, metavar="LIST",
              help="comma-separated: exempted (registry), flagged (medium+ alerts, 7 days), CIDR blocks, addresses")
@click.option("--every", metavar="INTERVAL", help="repeat every INTERVAL (e.g. 6h, 30m) until Ctrl-C or SIGTERM")
@click.option("--zone", "zone_names", multiple=True, metavar="NAME",
              help="zone to query (repeatable; default: dnsbl.default_zones)")
@click.option("--resolver", metavar="HOST:PORT", help="resolver for every zone (default: dnsbl.resolvers)")
@click.option("--report-dir", type=click.Path(file_okay=False), help="where reports go (default: DATA_DIR/audits)")
@click.option("--json", "as_json", is_flag=True, help="print each audit as one JSON object")
@click.pass_context
def audit_cmd(ctx: click.Context, targets: str, every: str | None, zone_names: tuple[str, ...],
              resolver: str | None, report_dir: str | None, as_json: bool) -> None:
    """Audit blocklist listings of our senders; report newly listed, delisted, still listed and errors.

    The first audit is the baseline. Reports (Markdown, HTML, CSV) name each listing's delisting
    page and, for newly listed addresses, whether smtpguard had flagged them first. A second
    audit while one runs exits 1.

    \b
    Examples:
      smtpguard audit
      smtpguard audit --targets exempted,198.51.100.0/24 --every 6h
    """
    cfg = ctx.find_root().obj.cfg
    specs = [t.strip() for t in targets.split(",") if t.strip()]
    if not specs:
        raise click.BadParameter("name at least one target", param_hint="--targets")
    for spec in specs:
        if spec not in ("exempted", "flagged"):
            # checked before any audit runs, so a schedule does not repeat a typo forever
            try:
                ip_network(spec, strict=True)
            except ValueError as e:
                raise click.BadParameter(f"{spec!r} is not exempted, flagged, an address or a CIDR block: {e}",
                                         param_hint="--targets") from None
    if resolver:
        try:
            parse_resolver(resolver)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--resolver") from None
    try:
        interval = parse_interval(every) if every else None
    except InputError as e:
        raise click.BadParameter(str(e), param_hint="--every") from None
    # one Checker for the life of the command: its query-rate bound spans every audit
    checker = Checker(cfg.dnsbl)
    unknown = [n for n in zone_names if n not in checker.zones]
    if unknown:
        raise click.BadParameter(f"unknown zone {', '.join(unknown)}; known: {', '.join(sorted(checker.zones))}",
                                 param_hint="--zone")
    out_dir = Path(report_dir) if report_dir else Path(cfg.data_dir) / "audits"

    def once() -> Audit:
        # the lock comes before the store, so a concurrent audit is told so rather than that the store is busy;
        # the store is opened per audit, so an embedded store is free between scheduled runs
        with AuditLock(cfg.data_dir), Store(cfg.store_dsn, cfg.store.database) as store:
            audit = run_audit(store, checker, specs, zones=list(zone_names) or None, resolver=resolver,
                              report_dir=out_dir)
        click.echo(dumps(audit)) if as_json else _print(audit)
        return audit

    if interval is None:
        audit = once()
        if audit.lookups and audit.counts["errors"] == audit.lookups:
            raise SmtpguardError("every DNSBL lookup of the audit failed; check the resolver (--resolver, "
                                 "dnsbl.resolvers) and that it may query these lists")
        return
    from smtpguard.core.lifecycle import Shutdown

    with Shutdown(name="smtpguard audit") as stop:
        while not stop.event.is_set():
            try:
                once()
            except SmtpguardError as e:
                # one failed run (store or lock busy) does not end the schedule; the next one retries
                click.echo(f"smtpguard: audit failed: {e}", err=True)
            stop.wait(interval)
    click.echo("smtpguard: scheduled audits stopped", err=True)
