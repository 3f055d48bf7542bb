"""Response: act on alerts about exempted senders and tell the network.

``registry``  the exemption registry, an append-only event log in the store
``policy``    what to do about an alert (notify, warn, propose, revoke) and the executor
``enforce``   enforcement outputs: the ``smtp.enforcement`` topic, the nftables set file
``webhook``   signed webhook requests with retries and dead letters
``config``    the ``[response]`` config section

The store's migrations include :func:`migrations` (see ``store.MIGRATION_PROVIDERS``).
"""

from __future__ import annotations


def migrations(db: str) -> list[tuple[str, list[str]]]:
    """The schema steps of every response table."""
    from . import policy, registry, webhook

    return [*registry.migrations(db), *policy.migrations(db), *webhook.migrations(db)]
