"""The ``[response]`` config section: revocation policy, enforcement outputs, webhook.

Every option is declared here with its default and meaning, and checked when the config
loads (``__post_init__``), so a bad action name or date stops the program at start-up,
not at the first alert.

Example::

    [response]
    actions = { info = "notify", low = "notify", medium = "propose", high = "graduated", critical = "revoke" }
    graduated_window_days = 7

    [response.detectors.blocked_attempts]     # per-detector overrides, by severity
    critical = "notify"

    [[response.tenant_allowlist]]             # revoke becomes propose for this tenant until the date
    tenant = "123456789012"
    until = "2026-12-31T00:00:00Z"
    reason = "managed mail relay, change ticket CHG-1234"

    [response.webhook]
    url = "https://netops.example/hooks/smtp-enforcement"
    secret = "…"                               # better: SMTPGUARD_RESPONSE__WEBHOOK__SECRET
"""

from __future__ import annotations

import msgspec

from smtpguard.detectors.alerts import SEVERITIES
from smtpguard.exemptions import parse_time

#: What the policy may do with an alert about an exempted IP:
#: notify = record it for the on-call, nothing else; propose = queue a revocation for review;
#: graduated = warn on a first offence, revoke on a second within graduated_window_days, and
#: revoke at once on abuse within restore_probation_days after a restore; revoke = revoke at once.
ACTIONS = ("notify", "propose", "graduated", "revoke")

DEFAULT_ACTIONS = {"info": "notify", "low": "notify", "medium": "propose", "high": "graduated", "critical": "revoke"}


class TenantAllowance(msgspec.Struct, forbid_unknown_fields=True):
    """A tenant whose exemptions are never revoked automatically until ``until``: revoke becomes propose."""

    tenant: str
    until: str
    """ISO 8601 date or time (UTC unless a zone is given), quoted; the allowance ends then"""
    reason: str = ""
    """why (a ticket, a contract): shown with every decision it changes"""

    @property
    def until_ms(self) -> int:
        return int(parse_time(self.until).timestamp() * 1000)


class WebhookConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str = ""
    """where enforcement events are POSTed (one JSON event per request); empty = no webhook"""
    secret: str = ""
    """HMAC-SHA256 key for the X-Smtpguard-Signature header; required when url is set"""
    timeout_ms: int = 5000
    """time allowed for one request"""
    max_attempts: int = 5
    """tries per event (the first included) before it is dead-lettered"""
    backoff_initial_ms: int = 500
    """wait before the second try; it doubles for every further try"""
    backoff_max_ms: int = 30_000
    """longest wait between two tries"""


class ResponseConfig(msgspec.Struct, forbid_unknown_fields=True):
    actions: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    """action per alert severity: notify, propose, graduated or revoke; severities left out keep their default"""
    detectors: dict[str, dict[str, str]] = msgspec.field(default_factory=dict)
    """per-detector overrides of `actions`, e.g. [response.detectors.blocked_attempts] critical = "notify\""""
    graduated_window_days: int = 7
    """graduated: a second offence by the same IP within this many days of an earlier one revokes"""
    restore_probation_days: int = 30
    """graduated: an offence within this many days after a restore revokes at once"""
    tenant_allowlist: list[TenantAllowance] = msgspec.field(default_factory=list)
    """tenants for which an automatic revoke becomes a proposal for review, each until its date"""
    actor: str = "smtpguard-policy"
    """the actor recorded on registry events written by the policy (people are recorded by name)"""
    nftables_table: str = "smtpguard"
    """nftables table (family inet) holding the sets smtp_allowed_v4 and smtp_allowed_v6"""
    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)

    def __post_init__(self) -> None:
        self.actions = {**DEFAULT_ACTIONS, **self.actions}
        _check_actions("response.actions", self.actions)
        from smtpguard.detectors.rules import REGISTRY

        for name, by_severity in self.detectors.items():
            if name not in REGISTRY:
                raise ValueError(f"response.detectors: unknown detector {name!r} (known: {', '.join(REGISTRY)})")
            _check_actions(f"response.detectors.{name}", by_severity)
        if self.graduated_window_days < 1 or self.restore_probation_days < 0:
            raise ValueError("response.graduated_window_days must be >= 1 and response.restore_probation_days >= 0")
        for a in self.tenant_allowlist:
            try:
                parse_time(a.until)
            except ValueError:
                raise ValueError(f"response.tenant_allowlist: tenant {a.tenant!r}: until {a.until!r} "
                                 "is not an ISO 8601 date or time") from None
        if not self.nftables_table.replace("_", "").replace("-", "").isalnum():
            raise ValueError("response.nftables_table may hold letters, digits, '_' and '-' only")
        w = self.webhook
        if w.url:
            if not w.url.startswith(("http://", "https://")):
                raise ValueError("response.webhook.url must start with http:// or https://")
            if not w.secret:
                raise ValueError("response.webhook.secret is required when response.webhook.url is set "
                                 "(set SMTPGUARD_RESPONSE__WEBHOOK__SECRET)")
        if w.timeout_ms <= 0 or w.max_attempts < 1 or w.backoff_initial_ms < 0 or w.backoff_max_ms < w.backoff_initial_ms:
            raise ValueError("response.webhook: timeout_ms > 0, max_attempts >= 1 and "
                             "0 <= backoff_initial_ms <= backoff_max_ms are required")

    def action_for(self, detector: str, severity: str) -> str:
        """The configured action for an alert of this detector and severity."""
        return self.detectors.get(detector, {}).get(severity) or self.actions[severity]

    def allowance(self, tenant: str, at_ms: int) -> TenantAllowance | None:
        """The tenant's allowance in force at ``at_ms``, if any."""
        for a in self.tenant_allowlist:
            if a.tenant == tenant and at_ms < a.until_ms:
                return a
        return None


def _check_actions(where: str, mapping: dict[str, str]) -> None:
    for severity, action in mapping.items():
        if severity not in SEVERITIES:
            raise ValueError(f"{where}: {severity!r} is not a severity ({', '.join(SEVERITIES)})")
        if action not in ACTIONS:
            raise ValueError(f"{where}.{severity}: {action!r} is not an action ({', '.join(ACTIONS)})")
