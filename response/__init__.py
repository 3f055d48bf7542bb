"""Response: act on alerts about exempted senders and tell the network.

``policy``    what to do about an alert (notify, warn, propose, revoke) and the executor
``enforce``   enforcement outputs: the ``smtp.enforcement`` topic, the nftables set file
``webhook``   signed webhook requests with retries and dead letters
``findings``  every raised alert as an OCSF finding to the SIEM webhook, through an outbox
``dnsbl``     DNSBL lookups with typed answers; ``lookups``: the alerts' lookups and their stored answers
``audit``     scheduled blacklist audits of the provider's addresses

The exemption registry it writes is shared with the detectors, which read it:
:mod:`smtpguard.core.registry`. Its options are the ``[response]`` and ``[dnsbl]`` sections of
:mod:`smtpguard.core.config`.

The store's migrations include :func:`migrations` (see ``store.MIGRATION_PROVIDERS``).
"""

from __future__ import annotations


def migrations(db: str) -> list[tuple[str, list[str]]]:
    """The schema steps of every response table."""
    from . import findings, lookups, outbox, policy, webhook

    return [*policy.migrations(db), *webhook.migrations(db), *lookups.migrations(db), *outbox.migrations(db),
            *findings.migrations(db)]
