"""``smtpguard store``: the store's schema, for a ClickHouse server run by its own team."""

from __future__ import annotations

import click

from smtpguard.core.errors import SmtpguardError


@click.group("store")
def store_group() -> None:
    """The store's schema: apply it to a ClickHouse server, or print it for review.

    \b
    Every command opens the store and applies missing schema steps itself; `store migrate`
    does only that, so a deployment can run it once, from one place, before starting the
    services (docs/DEPLOYMENT.md).
    """


@store_group.command("migrate")
@click.pass_obj
def store_migrate(c) -> None:
    """Apply the schema steps the store has not run yet, and the tables' retention
    (store.retention_days); print what changed."""
    from smtpguard.core.config import mask_dsn
    from smtpguard.core.store import Store

    try:
        with Store(c.cfg.store_dsn, c.cfg.store.database, create=False) as st:
            n = st.migrate(rebuild=True)
            total = st.count("schema_migrations")
            retention = st.apply_retention(c.cfg.store.retention_days)
    except SmtpguardError:
        raise
    except Exception as e:  # noqa: BLE001 - the server's own errors (permissions, cluster) as one line
        raise SmtpguardError(f"cannot migrate the store {mask_dsn(c.cfg.store_dsn)}: {e}") from None
    click.echo(f"{n} schema steps applied now; {total} in all")
    for table, days in retention.items():
        click.echo(f"{table}: rows kept {days} days" if days else f"{table}: rows kept for ever")


@store_group.command("schema")
@click.option("--database", default=None, help="database name in the statements (default: store.database)")
@click.pass_obj
def store_schema(c, database: str | None) -> None:
    """Print every schema step as SQL, in the order `store migrate` runs them."""
    from smtpguard.core.store import all_migrations

    for version, steps in all_migrations(database or c.cfg.store.database):
        click.echo(f"-- step {version}")
        for sql in steps:
            click.echo(sql.rstrip() + ";")
        click.echo("")
