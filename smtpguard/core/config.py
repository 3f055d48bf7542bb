"""Configuration: one TOML file plus ``SMTPGUARD_*`` environment overrides, validated at start-up.

Every option is declared once, here, with its default and meaning. Units are in the names.
Detector parameters are declared beside each detector (``detectors/rules.py``); a run checks
them, the response's detector names and the DNSBL zone names when it loads the config
(:func:`smtpguard.app.settings.load`), since this module imports nothing above the core.

Environment overrides use ``SMTPGUARD_<SECTION>__<KEY>``, e.g.
``SMTPGUARD_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``SMTPGUARD_INGEST__SMTP_PORTS=[25,587]``;
values are read as TOML values when they parse as such, else as strings.
``SMTPGUARD_CONFIG`` names the file when ``--config`` is not given.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import dns.exception
import dns.name
import msgspec

from .errors import ConfigError
from .exemptions import parse_time
from .record import SEVERITIES

ENV_PREFIX = "SMTPGUARD_"
DEFAULT_FILE = "smtpguard.toml"

#: librdkafka settings whose values are never printed.
SECRET_KEYS = ("password", "secret", "token", "key.pem", "sasl.oauthbearer.config")


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "smtpguard")


class Topics(msgspec.Struct, forbid_unknown_fields=True):
    flows: str = "smtp.flows"
    """normalized SMTP connection records (Arrow IPC batches, see docs/ARCHITECTURE.md)"""
    dlq: str = "smtp.flows.dlq"
    """dead letters: input that could not be decoded, with its reason (JSON)"""
    alerts: str = "smtp.alerts"
    """alerts (JSON, one per message, key = source IP or tenant)"""
    enforcement: str = "smtp.enforcement"
    """exemption revocations and restorations for the network (JSON)"""
    ocsf: str = ""
    """the raised alerts again, as OCSF Detection Findings (JSON, key = source or tenant:T), for a SIEM;
    empty = not published (docs/ARCHITECTURE.md, "Alerts as OCSF findings")"""


class Kafka(msgspec.Struct, forbid_unknown_fields=True):
    bootstrap_servers: str = ""
    """comma-separated host:port list; empty = start a local Tansu broker (serve, demo)"""
    topics: Topics = msgspec.field(default_factory=Topics)
    partitions: int = 8
    """partitions of topics smtpguard creates itself"""
    group_id: str = "smtpguard-detectors"
    """consumer group of the detectors; run more `smtpguard detect` processes to scale out"""
    response_group_id: str = "smtpguard-response"
    """consumer group of the response service (`smtpguard respond`) on the alerts topic"""
    records_per_message: int = 2000
    """records batched into one Kafka message (Arrow IPC); one source IP always maps to one partition"""
    session_timeout_ms: int = 10000
    """consumer group session timeout; lower = faster rebalance and failover"""
    max_poll_interval_ms: int = 60000
    """longest time between polls before the broker evicts a detector"""
    client: dict[str, str] = msgspec.field(default_factory=dict)
    """librdkafka settings passed through as they are (security.protocol, sasl.*, ssl.*)"""


class Store(msgspec.Struct, forbid_unknown_fields=True):
    dsn: str = ""
    """clickhouse-connect DSN: chdb:///path (embedded) or http(s)://user:pass@host:8123/db; empty = chdb under data_dir"""
    database: str = "smtpguard"
    """database for smtpguard's tables (created if missing)"""
    retention_days: dict[str, int] = msgspec.field(default_factory=lambda: {"flows": 30, "window_features": 180})
    """days a row of these tables is kept after it was stored (a ClickHouse TTL, applied by the detectors and
    `store migrate`); 0 or a table left out = kept for ever. Tables that can expire: flows, window_features,
    dnsbl_checks. Alerts, registry events, decisions and review labels are always kept"""


class Ingest(msgspec.Struct, forbid_unknown_fields=True):
    smtp_ports: list[int] = msgspec.field(default_factory=lambda: [25, 465, 587, 2525])
    """destination ports that make a flow an SMTP connection"""
    chunk_lines: int = 100_000
    """lines parsed per batch"""


class Detect(msgspec.Struct, forbid_unknown_fields=True):
    window_ms: int = 60_000
    """tumbling window length"""
    allowed_lateness_ms: int = 30_000
    """how far behind the newest event time a record may arrive and still count; later ones are counted as late and
    dropped. Alerts of a window are due when the watermark passes its end, so this is also part of every alert's
    delay. Raise it for inputs delivered further out of order (AWS delivers flow-log files minutes apart: see
    docs/DETECTION.md)"""
    idle_flush_ms: int = 10_000
    """wall-clock time without new records after which a partition's open windows are closed"""
    poll_messages: int = 500
    """Kafka messages a detector takes per poll at most (one pipeline pass per partition and poll);
    fewer = smaller steps and earlier alerts near the head of the log, more = higher throughput"""
    checkpoint_interval_ms: int = 5_000
    """how often a detector commits offsets and saves its windows' watermark, source history and cooldowns;
    a restarted or rebalanced detector resumes from the last checkpoint"""
    cooldown_ms: int = 600_000
    """after an alert for an IP and detector, further findings within this time are stored as suppressed, not raised"""
    exemptions_csv: str = ""
    """CSV with header ip,tenant,granted_at,reason (IP or CIDR) of instances allowed to send on port 25; optional
    column declared_conns_per_min: the sending volume the exemption was granted for"""
    inventory_csv: str = ""
    """CSV with header ip,tenant,instance_id,interface_id (address or prefix): the provider's address plan. Fills
    tenant and instance where the input has none (NetFlow, sFlow, captures) and names the IPv6 prefix each source
    is judged by (see smtpguard/inventory.py)"""
    ipv6_prefix_len: int = 64
    """IPv6 sources outside the inventory are judged by this prefix (addresses rotating inside it are one
    source); IPv4 sources by their address"""
    learning_minutes: int = 60
    """a source is learning until its history covers this many minutes: until then, an established exempted
    sender without a declared volume is never raised above low for volume or fan-out that only its own history
    could judge (docs/DETECTION.md, cold start)"""
    sampling_confidence: float = 0.999
    """inputs sampled per packet (sFlow 1 in N > 1): each count a detector judges is the lower bound of its
    estimate at this one-sided confidence (a Poisson bound on the samples behind it), so at 1:4,096 one sampled
    SYN is "at least 4 connections", not 4,096, and three are "at least 780" (docs/DETECTION.md, sampled inputs;
    chosen on the tuning seeds: 0.99 let benign senders reach medium at 1:1,024 and 1:4,096)"""
    exemptions_refresh_ms: int = 5_000
    """how often a detector reads the exemption registry again when it changed: revocations by the response
    service, restores and grants by people reach detection within this time (and the team's verdicts, for
    hold_repeats_below)"""
    hold_repeats_below: float = 0.1
    """a source's repeat of an alert the team dismissed (and never confirmed), no stronger than the dismissed
    ones, is held at low when the promoted verdicts model gives it at most this probability of being confirmed
    and has learned that kind of alert (docs/DETECTION.md, repeats of dismissed alerts); 0 = never held"""
    max_sources: int = 1_000_000
    """source IPs whose history (baselines, familiar destinations) one detector process keeps, shared by its
    partitions; beyond it the least recently seen are evicted (counted in smtpguard_detector_state_evictions_total)"""
    max_panes: int = 4_000_000
    """one-minute panes (source x minute) one detector process keeps for the 10- and 60-minute horizons; beyond
    it the panes of the sources with the fewest active minutes go first, oldest first (counted)"""
    detectors: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """per-detector parameters, e.g. [detect.detectors.spam_fanout] min_distinct_dst = 25 (see docs/DETECTION.md)"""


class Metrics(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9325"
    """HOST:PORT where collect, detect and serve answer Prometheus scrapes at /metrics (docs/METRICS.md);
    empty = no endpoint. Every process on a machine needs its own port (a second detector: --metrics HOST:9326);
    when the default port is taken the process warns and runs without an endpoint, a chosen one must be free"""
    lag_interval_ms: int = 5_000
    """how often a detector asks the broker for its partitions' high watermarks (consumer lag) and
    updates the window lag"""
    console_public: bool = True
    """the console answers /metrics without a login (it binds to loopback by default); false = a
    session or API token of any console user is needed (Prometheus: authorization credentials)"""


def host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9325"`` -> ``("127.0.0.1", 9325)``; ``[ADDR]:PORT`` for IPv6; ValueError if not HOST:PORT."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT (use [ADDR]:PORT for IPv6)")
    return host, int(port)


# -- [dnsbl]: blocklists and how lookups run (the lookups themselves: smtpguard.response.dnsbl) ---------------

Category = Literal["listing", "policy", "error"]
ANSWER_NET = ipaddress.IPv4Network("127.0.0.0/8")
NEVER_LISTED = ipaddress.IPv4Address("127.0.0.1")

#: Public recursive resolvers. Spamhaus answers queries from them with 127.255.255.254
#: (its public mirrors need an attributable resolver), so configuring one draws a warning.

_ZONE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class Code(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one return code of a zone means."""

    meaning: str
    """human-readable meaning, shown beside the code in results"""
    category: Category = "listing"
    """listing: evidence of abuse; policy: not evidence (e.g. Spamhaus PBL); error: the list refused to answer"""


def _parse_code_range(key: str) -> tuple[int, int]:
    """``127.0.0.2``, ``127.0.0.0/24`` or ``127.0.0.5-127.0.0.7`` -> (first, last) as integers."""
    try:
        if "/" in key:
            net = ipaddress.IPv4Network(key)
            first, last = net.network_address, net.broadcast_address
        elif "-" in key:
            a, b = key.split("-", 1)
            first, last = ipaddress.IPv4Address(a.strip()), ipaddress.IPv4Address(b.strip())
        else:
            first = last = ipaddress.IPv4Address(key)
    except ValueError as e:
        raise ValueError(f"return code {key!r} is not an IPv4 address, CIDR or range a-b: {e}") from None
    if first > last:
        raise ValueError(f"return code range {key!r} ends before it starts")
    if first not in ANSWER_NET or last not in ANSWER_NET:
        raise ValueError(f"return code {key!r} lies outside 127.0.0.0/8, where RFC 5782 puts every answer")
    if first == last == NEVER_LISTED:
        raise ValueError("127.0.0.1 is never a valid DNSBL answer (RFC 5782); it cannot carry a meaning")
    return int(first), int(last)


class Zone(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One blocklist: where to ask and how to read its answers.

    In TOML (``[[dnsbl.zones]]`` or a ``zones_file``)::

        [[zones]]
        name = "example-bl"
        zone = "bl.example.net"
        weight = 0.5
        delist_url = "https://bl.example.net/remove"
        codes = { "127.0.0.2" = { meaning = "spam source" }, "127.0.0.10" = { meaning = "dynamic range", category = "policy" } }
    """

    name: str
    """short name used on the command line and in results (lower case, e.g. spamhaus-zen)"""
    zone: str
    """DNS zone queried, e.g. zen.spamhaus.org"""
    codes: dict[str, Code] = msgspec.field(default_factory=dict)
    """return address, CIDR or range a-b -> meaning; the most specific entry wins; codes in 127.0.0.0/8
    that are missing here count as listings with an "unknown code" meaning (RFC 5782)"""
    kind: Literal["ip", "domain"] = "ip"
    """ip: the list is queried with reversed IP addresses; domain: with domain names (not checked by `check`)"""
    weight: float = 1.0
    """how much a listing here adds to an address's score in `summary` (a judgement of the list's precision)"""
    delist_url: str = ""
    """where the owner of a listed address asks for removal"""
    ipv6: bool = False
    """whether the list answers IPv6 (nibble) queries; IPv6 addresses are not looked up in IPv4-only lists"""
    resolver: str = ""
    """HOST or HOST:PORT ([v6]:PORT) of the resolver for this zone only; empty = dnsbl.resolvers"""
    timeout_ms: int = 0
    """time allowed for one lookup (A and TXT) in this zone; 0 = dnsbl.timeout_ms"""
    dqs_key: str = ""
    """Spamhaus Data Query Service key: queries go to <ip>.<key>.<list>.dq.spamhaus.net instead of the public mirrors"""

    def __post_init__(self) -> None:
        if not _ZONE_NAME.match(self.name):
            raise ValueError(f"zone name {self.name!r} must be lower case letters, digits, '-', '_' or '.'")
        try:
            dns.name.from_text(self.zone)
        except dns.exception.DNSException as e:
            raise ValueError(f"zone {self.name}: {self.zone!r} is not a DNS name: {e}") from None
        for key in self.codes:
            _parse_code_range(key)
        if self.weight < 0:
            raise ValueError(f"zone {self.name}: weight must be >= 0")
        if self.timeout_ms < 0:
            raise ValueError(f"zone {self.name}: timeout_ms must be >= 0 (0 = dnsbl.timeout_ms)")
        if self.resolver:
            parse_resolver(self.resolver)
        if self.dqs_key:
            if not re.fullmatch(r"[a-z0-9]+", self.dqs_key):
                raise ValueError(f"zone {self.name}: dqs_key must be the lower-case letters and digits Spamhaus issued")
            if not self.zone.rstrip(".").endswith((".spamhaus.org", ".dq.spamhaus.net")):
                raise ValueError(f"zone {self.name}: dqs_key only applies to Spamhaus zones, not {self.zone}")

    @property
    def query_zone(self) -> str:
        """The zone the queries go to: the configured zone, or its DQS name when a key is set."""
        zone = self.zone.rstrip(".")
        if not self.dqs_key:
            return zone
        if zone.endswith(".dq.spamhaus.net"):
            return f"{self.dqs_key}.{zone}"
        return f"{self.dqs_key}.{zone.removesuffix('.spamhaus.org')}.dq.spamhaus.net"


# ZEN already contains SBL, XBL and PBL: querying them as well would count one listing twice.
DEFAULT_ZONES = ["spamhaus-zen", "spamcop", "barracuda", "uceprotect-1", "mailspike-bl", "psbl"]


class DnsblConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The ``[dnsbl]`` config section."""

    default_zones: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_ZONES))
    """zones a check queries when it names none (names from the catalogue, zones_file or zones)"""
    zones: list[Zone] = msgspec.field(default_factory=list)
    """zone definitions added to the built-in catalogue; one with a catalogue name replaces that entry"""
    zones_file: str = ""
    """TOML file with [[zones]] tables (same fields as dnsbl.zones), read at start-up"""
    resolvers: list[str] = msgspec.field(default_factory=list)
    """recursive resolvers as HOST or HOST:PORT ([v6]:PORT); empty = the system's (/etc/resolv.conf).
    Spamhaus refuses public resolvers (8.8.8.8, 1.1.1.1, ...): use your own, or a DQS key"""
    timeout_ms: int = 3000
    """time allowed for one lookup (A and TXT) in one zone; a zone's timeout_ms overrides it"""
    max_concurrent: int = 32
    """lookups in flight at once"""
    max_queries_per_s: float = 50.0
    """DNS queries sent per second at most (token bucket, bursts of up to one second's worth);
    Mailspike's free use, for one, is 100,000 queries a day"""
    cache_max_entries: int = 100_000
    """answers kept in memory (least recently used are dropped); 0 = no cache"""
    cache_negative_ttl_s: int = 900
    """how long NXDOMAIN is cached when the answer carries no SOA (else its SOA minimum)"""
    cache_max_ttl_s: int = 3600
    """upper bound on how long any answer is cached, so a delisting shows within this time"""
    check_alerts_from: str = "medium"
    """the detector looks up the source of every new alert of this severity or higher in default_zones
    and stores the answers with the alert (info, low, medium, high, critical; "off" = never)"""
    alert_queue_max: int = 10_000
    """alerts waiting for their lookup at most; beyond it lookups are skipped and counted (a flood of
    alerts must not hold the detector back, and the console can re-check any alert later)"""

    def __post_init__(self) -> None:
        for r in self.resolvers:
            parse_resolver(r)
        if self.timeout_ms <= 0:
            raise ValueError("dnsbl.timeout_ms must be positive")
        if self.max_concurrent < 1:
            raise ValueError("dnsbl.max_concurrent must be >= 1")
        if not self.max_queries_per_s > 0:
            raise ValueError("dnsbl.max_queries_per_s must be positive")
        if self.cache_max_entries < 0 or self.cache_negative_ttl_s < 0 or self.cache_max_ttl_s < 0:
            raise ValueError("dnsbl.cache_max_entries, cache_negative_ttl_s and cache_max_ttl_s must be >= 0")
        if self.check_alerts_from not in (*SEVERITIES, "off"):
            raise ValueError(f"dnsbl.check_alerts_from must be one of {', '.join(SEVERITIES)} or off, "
                             f"not {self.check_alerts_from!r}")
        if self.alert_queue_max < 1:
            raise ValueError("dnsbl.alert_queue_max must be >= 1")


def parse_resolver(spec: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"`` -> ``("127.0.0.1", 5353)``; also ``"10.0.0.2"``, ``"::1"``, ``"[::1]:53"``."""
    s = spec.strip()
    host, port = s, 53
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"resolver {spec!r}: write an IPv6 resolver as [ADDRESS]:PORT")
            port = _port(spec, rest[1:])
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = _port(spec, p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"resolver {spec!r} must be an IP address, optionally with :PORT") from None
    return host, port


def _port(spec: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"resolver {spec!r}: {text!r} is not a UDP port")
    return int(text)




# -- [response]: revocation policy, enforcement outputs, webhook (smtpguard.response) -----------------------
#
# Example::
#
#     [response]
#     actions = { info = "notify", low = "notify", medium = "propose", high = "graduated", critical = "revoke" }
#     graduated_window_days = 7
#
#     [response.detectors.blocked_attempts]     # per-detector overrides, by severity
#     critical = "notify"
#
#     [[response.tenant_allowlist]]             # revoke becomes propose for this tenant until the date
#     tenant = "123456789012"
#     until = "2026-12-31T00:00:00Z"
#     reason = "managed mail relay, change ticket CHG-1234"
#
#     [response.webhook]
#     url = "https://netops.example/hooks/smtp-enforcement"
#     secret = "…"                               # better: SMTPGUARD_RESPONSE__WEBHOOK__SECRET

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
    poll_alerts: int = 200
    """alerts the response service takes per poll at most (its offsets are committed after each poll)"""
    actor: str = "smtpguard-policy"
    """the actor recorded on registry events written by the policy (people are recorded by name)"""
    nftables_table: str = "smtpguard"
    """nftables table (family inet) holding the sets smtp_allowed_v4 and smtp_allowed_v6"""
    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    siem_webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    """where every raised alert is POSTed as an OCSF Detection Finding (one JSON object per request, signed like
    the enforcement webhook, the alert id in X-Smtpguard-Event-Id); empty url = off"""

    def __post_init__(self) -> None:
        self.actions = {**DEFAULT_ACTIONS, **self.actions}
        _check_actions("response.actions", self.actions)
        # the detector names are checked against the detectors where the config is loaded for a run
        # (smtpguard.app.settings), which knows them
        for name, by_severity in self.detectors.items():
            _check_actions(f"response.detectors.{name}", by_severity)
        if self.poll_alerts < 1:
            raise ValueError("response.poll_alerts must be >= 1")
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
        for name, w in (("webhook", self.webhook), ("siem_webhook", self.siem_webhook)):
            if w.url:
                if not w.url.startswith(("http://", "https://")):
                    raise ValueError(f"response.{name}.url must start with http:// or https://")
                if not w.secret:
                    raise ValueError(f"response.{name}.secret is required when response.{name}.url is set "
                                     f"(set SMTPGUARD_RESPONSE__{name.upper()}__SECRET)")
            if w.timeout_ms <= 0 or w.max_attempts < 1 or w.backoff_initial_ms < 0 or \
                    w.backoff_max_ms < w.backoff_initial_ms:
                raise ValueError(f"response.{name}: timeout_ms > 0, max_attempts >= 1 and "
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


class Config(msgspec.Struct, forbid_unknown_fields=True):
    data_dir: str = msgspec.field(default_factory=default_data_dir)
    """where the embedded store and local state live"""
    log_level: str = "info"
    kafka: Kafka = msgspec.field(default_factory=Kafka)
    store: Store = msgspec.field(default_factory=Store)
    ingest: Ingest = msgspec.field(default_factory=Ingest)
    detect: Detect = msgspec.field(default_factory=Detect)
    dnsbl: DnsblConfig = msgspec.field(default_factory=DnsblConfig)
    """DNS blocklist checks: zones, resolvers, timeouts, query rate, cache (see smtpguard/dnsbl.py)"""
    response: ResponseConfig = msgspec.field(default_factory=ResponseConfig)
    """revocation policy, enforcement outputs and webhook (ResponseConfig above)"""
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    """Prometheus metrics endpoint (docs/METRICS.md)"""

    @property
    def store_dsn(self) -> str:
        return self.store.dsn or f"chdb://{os.path.join(os.path.abspath(self.data_dir), 'store')}"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another override")
        node[path[-1]] = _parse_env_value(raw)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None,
         overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate the config; raise :class:`ConfigError` with one clear line."""
    environ = dict(os.environ if environ is None else environ)
    explicit = path or environ.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = {}
    file = Path(explicit) if explicit else Path(DEFAULT_FILE)
    if explicit and not file.is_file():
        raise ConfigError(f"config file {file} not found")
    if file.is_file():
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {file}: {e}") from None
    data = _merge(data, _env_overrides(environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        where = str(e).replace("$.", "").replace("`", "'")
        raise ConfigError(f"invalid config ({file if file.is_file() else 'defaults + environment'}): {where}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that types alone cannot express."""
    def bad(msg: str) -> None:
        raise ConfigError(f"invalid config: {msg}")

    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        bad(f"log_level must be debug, info, warning or error, not {cfg.log_level!r}")
    for port in cfg.ingest.smtp_ports:
        if not 0 < port < 65536:
            bad(f"ingest.smtp_ports: {port} is not a TCP port")
    if not cfg.ingest.smtp_ports:
        bad("ingest.smtp_ports must name at least one port")
    for name in ("window_ms", "cooldown_ms"):
        if getattr(cfg.detect, name) <= 0:
            bad(f"detect.{name} must be positive")
    if cfg.detect.allowed_lateness_ms < 0 or cfg.detect.idle_flush_ms < 0:
        bad("detect.allowed_lateness_ms and detect.idle_flush_ms must be >= 0")
    if 3_600_000 % cfg.detect.window_ms:
        bad("detect.window_ms must divide one hour evenly")
    if cfg.detect.max_sources < 1 or cfg.detect.max_panes < 1:
        bad("detect.max_sources and detect.max_panes must be >= 1")
    if not 1 <= cfg.detect.ipv6_prefix_len <= 128:
        bad("detect.ipv6_prefix_len must be between 1 and 128")
    if cfg.detect.exemptions_refresh_ms <= 0:
        bad("detect.exemptions_refresh_ms must be positive")
    if not 0.5 <= cfg.detect.sampling_confidence < 1:
        bad("detect.sampling_confidence must be at least 0.5 and below 1")
    if not 0 <= cfg.detect.hold_repeats_below < 1:
        bad("detect.hold_repeats_below must be at least 0 (never hold) and below 1")
    if cfg.detect.learning_minutes < 0:
        bad("detect.learning_minutes must be >= 0")
    if cfg.detect.poll_messages < 1:
        bad("detect.poll_messages must be >= 1")
    from smtpguard.core.store import RETENTION_COLUMNS

    for table, days in cfg.store.retention_days.items():
        if table not in RETENTION_COLUMNS:
            bad(f"store.retention_days: {table!r} cannot expire (tables that can: {', '.join(RETENTION_COLUMNS)})")
        if isinstance(days, bool) or not isinstance(days, int) or days < 0:
            bad(f"store.retention_days.{table} must be a whole number of days >= 0 (0 = kept for ever)")
    if cfg.kafka.partitions < 1 or cfg.kafka.records_per_message < 1:
        bad("kafka.partitions and kafka.records_per_message must be >= 1")
    if cfg.ingest.chunk_lines < 1:
        bad("ingest.chunk_lines must be >= 1")
    if cfg.metrics.listen:
        try:
            host_port(cfg.metrics.listen)
        except ValueError as e:
            bad(f"metrics.listen (--metrics): {e}; empty = no metrics endpoint")
    if cfg.metrics.lag_interval_ms <= 0:
        bad("metrics.lag_interval_ms must be positive")
    dsn = cfg.store.dsn
    if dsn and not dsn.startswith(("chdb://", "http://", "https://", "clickhouse://")):
        bad(f"store.dsn must start with chdb://, http:// or https://, not {dsn.split(':')[0]!r}")
    # the names and parameters that other layers declare (detectors, DNSBL zones) are checked where
    # a run loads its config: smtpguard.app.settings.load


def _mask(key: str, value: Any) -> Any:
    if isinstance(value, str) and any(s in key.lower() for s in SECRET_KEYS) and value:
        return "***"
    return value


def mask_dsn(dsn: str) -> str:
    """``http://user:secret@host`` -> ``http://user:***@host``."""
    if "://" in dsn and "@" in dsn:
        scheme, rest = dsn.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{scheme}://{cred}@{host}"
    return dsn


def shown(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data with secrets masked."""
    data = msgspec.to_builtins(cfg)
    data["store"]["dsn"] = mask_dsn(cfg.store_dsn)
    data["kafka"]["client"] = {k: _mask(k, v) for k, v in data["kafka"]["client"].items()}
    for name in ("webhook", "siem_webhook"):
        hook = data["response"][name]
        if hook.get("secret"):
            hook["secret"] = "***"
        if hook.get("url"):
            hook["url"] = mask_dsn(hook["url"])
    for z in data["dnsbl"]["zones"]:
        z["dqs_key"] = "***" if z["dqs_key"] else ""
    return data


def to_toml(data: dict[str, Any]) -> str:
    """``data`` (a config as plain values) as TOML that :func:`load` reads back: what ``config show``
    prints. TOML has no null: unset optional values are left out."""
    import tomli_w

    def drop_none(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: drop_none(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [drop_none(x) for x in v if x is not None]
        return v

    return tomli_w.dumps(drop_none(data))
