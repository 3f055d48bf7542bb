"""The security team's web console: the alert queue, the evidence behind an alert, and the actions on it.

``schema``   the console's tables (users, sessions, API tokens, alert actions, review labels, DNSBL checks)
``auth``     users and roles, password hashing, sessions, API tokens, CSRF, the login rate limit
``queries``  what the pages read: the queue with filters, an alert's traffic and destinations, health
``actions``  acknowledge, confirm, dismiss, re-check DNSBLs, grant/revoke/restore exemptions: plain
             functions that the web routes, the JSON API and the command line share
``chart``    the per-minute traffic chart as inline SVG
``app``      the FastAPI application (:func:`~smtpguard.console.app.create_app`)
``server``   running the application with uvicorn, in the foreground or in a thread

This module stays free of web imports: the store's migrations import it
(``store.MIGRATION_PROVIDERS``) in every command.
"""

from __future__ import annotations


def migrations(db: str) -> list[tuple[str, list[str]]]:
    """The schema steps of every console table."""
    from .schema import migrations as console_migrations

    return console_migrations(db)
