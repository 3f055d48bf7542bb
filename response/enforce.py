"""Enforcement outputs for the network team: the ``smtp.enforcement`` topic, an nftables set file,
and the webhook.

Every registry change becomes one :class:`EnforcementEvent` per affected key: the key itself
and the keys inside it whose rule follows it (expired or lifted keys). Its ``action`` is what
the network must do for the addresses of that key that no more specific key covers: ``allow``
(port 25 open) or ``deny`` (closed). The most specific key wins, so a ``deny`` for
``198.51.100.3`` inside an ``allow`` for ``198.51.100.0/28`` closes that one address. On the
topic, messages are keyed by the key, and the latest message per key is the state
(:func:`read_state`; the topic may be compacted).

The nftables file holds the same allowed set, computed from the registry (see
:func:`write_nftables`).
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from smtpguard.core import metrics
from smtpguard.core.config import Config
from smtpguard.core.errors import BrokerError, SmtpguardError
from smtpguard.core.store import Store

from smtpguard.core.config import ResponseConfig
from smtpguard.core.registry import (ExemptionEvent, IPNetwork, KeyState, Registry, allowed_networks, decider, iso_ms, key_of,
                       now_ms, write_atomically)
from .webhook import WebhookSender

log = logging.getLogger(__name__)

JSON_HEADERS = [("content-type", b"application/json")]
ACTIONS = ("allow", "deny")


class EnforcementEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One message on ``smtp.enforcement`` (key = ``ip``) and one webhook request body."""

    ip: str
    """the key: an address or a CIDR block"""
    action: str
    """allow (port 25 open) or deny (closed) for the key's addresses that no more specific key covers"""
    tenant: str
    reason: str
    alert_ids: list[str]
    event_id: str
    """the registry event behind the message (``smtpguard exemptions show IP`` has it)"""
    at: str
    """when the registry event took effect, ISO 8601 UTC with milliseconds"""
    kind: str
    """the registry event: granted, renewed, revoked, restored or expired"""
    actor: str
    decided_by: str | None
    """the key whose rule applies (this key, or a block around it); null when none does (deny)"""
    expires_at: str | None = None
    """when the key's exemption ends by itself; null = never or not an exemption of its own"""


_encoder = msgspec.json.Encoder()


def encode(event: EnforcementEvent) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> EnforcementEvent:
    return msgspec.json.decode(data, type=EnforcementEvent)


def _message(key: str, states: dict[str, KeyState], cause: ExemptionEvent, reason: str) -> EnforcementEvent:
    s = states.get(key)
    net = s.network if s is not None else ipaddress.ip_network(key)
    d = decider(net, states)
    return EnforcementEvent(
        ip=key, action="allow" if d is not None and d.state == "active" else "deny",
        tenant=s.tenant if s is not None else cause.tenant, reason=reason, alert_ids=list(cause.alert_ids),
        event_id=cause.event_id, at=iso_ms(cause.at_ms), kind=cause.kind, actor=cause.actor,
        decided_by=d.key if d is not None else None,
        expires_at=iso_ms(s.expires_at_ms) if s is not None and s.own_grant and s.expires_at_ms is not None else None)


def messages_for(event: ExemptionEvent, states: dict[str, KeyState]) -> list[EnforcementEvent]:
    """The messages one registry event causes, given the states after it."""
    out = [_message(event.ip, states, event, event.reason)]
    net = states[event.ip].network if event.ip in states else ipaddress.ip_network(event.ip)
    for s in states.values():
        # keys inside this one that decide nothing themselves now follow whatever decides for it
        if (s.key != event.ip and s.state not in ("active", "revoked") and s.network.version == net.version
                and s.network.subnet_of(net)):
            out.append(_message(s.key, states, event, f"{event.ip} {event.kind}: {event.reason}"))
    return out


def state_messages(states: dict[str, KeyState]) -> list[EnforcementEvent]:
    """One message per key with its effective action, for publishing the whole state again."""
    return [_message(k, states, s.last, s.last.reason) for k, s in sorted(states.items())]


# -- Kafka ----------------------------------------------------------------------------------------
class KafkaOutput:
    """Produces enforcement events to ``kafka.topics.enforcement``, keyed by IP."""

    def __init__(self, cfg: Config):
        from confluent_kafka import Producer

        from smtpguard.core.kafka import ensure_topics, producer_settings

        ensure_topics(cfg)
        self.topic = cfg.kafka.topics.enforcement
        self.producer = Producer(producer_settings(cfg))

    def publish(self, events: list[EnforcementEvent], timeout_s: float = 30.0) -> None:
        errors: list[str] = []

        def on_delivery(err, msg) -> None:
            if err is not None:
                errors.append(str(err))

        for e in events:
            self.producer.produce(self.topic, encode(e), key=e.ip.encode(), headers=JSON_HEADERS, on_delivery=on_delivery)
        left = self.producer.flush(timeout_s)
        metrics.ENFORCEMENT_EVENTS.labels("kafka").inc(len(events) - left - len(errors))
        if left or errors:
            raise BrokerError(f"{left + len(errors)} of {len(events)} enforcement events were not delivered to "
                              f"{self.topic}: {errors[0] if errors else 'timed out'}")


def read_state(cfg: Config, timeout_s: float = 30.0) -> dict[str, EnforcementEvent]:
    """Read ``kafka.topics.enforcement`` from the start to its end: the latest event per key.

    Joins no consumer group and commits nothing, so any number of readers may run.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from smtpguard.core.kafka import consumer_settings, read_partitions

    topic = cfg.kafka.topics.enforcement
    consumer = Consumer(consumer_settings(cfg, group_id=f"smtpguard-enforcement-reader-{uuid.uuid4().hex[:8]}"))
    try:
        md = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if md is None or md.error is not None:
            raise BrokerError(f"topic {topic} does not exist on {cfg.kafka.bootstrap_servers}; "
                              "run `smtpguard topics create`")
        state: dict[str, EnforcementEvent] = {}

        def handle(m: Any) -> None:
            key = m.key().decode()
            if m.value() is None:
                state.pop(key, None)
            else:
                state[key] = decode(m.value())

        read_partitions(consumer, [TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions], handle,
                        timeout_s=timeout_s, what=topic)
        return state
    finally:
        consumer.close()


# -- nftables -------------------------------------------------------------------------------------
SET_V4 = "smtp_allowed_v4"
SET_V6 = "smtp_allowed_v6"


def collapsed(networks: list[IPNetwork]) -> tuple[list[str], list[str]]:
    """The networks merged into the fewest IPv4 and IPv6 prefixes (an interval set refuses overlaps)."""
    return ([key_of(n) for n in ipaddress.collapse_addresses(n for n in networks if n.version == 4)],
            [key_of(n) for n in ipaddress.collapse_addresses(n for n in networks if n.version == 6)])


def nftables_text(networks: list[IPNetwork], table: str, generated_at_ms: int) -> str:
    """An nftables file that replaces the contents of the two sets in one transaction when loaded
    with ``nft -f``: the sets are declared (created if missing), flushed, then filled."""
    v4, v6 = collapsed(networks)

    def elements(items: list[str]) -> str:
        # nft rejects an empty element list, so an empty set is declared without one
        return f" elements = {{ {', '.join(items)} }}" if items else ""

    return "\n".join([
        f"# Addresses allowed to send mail on port 25, from the smtpguard exemption registry at {iso_ms(generated_at_ms)}.",
        f"# {len(v4)} IPv4 and {len(v6)} IPv6 entries. Generated by `smtpguard enforce nftables`; do not edit.",
        "# Use the sets in your own chain, for example:",
        f"#   tcp dport 25 ip saddr != @{SET_V4} drop",
        f"#   tcp dport 25 ip6 saddr != @{SET_V6} drop",
        f"table inet {table} {{",
        f"\tset {SET_V4} {{ type ipv4_addr; flags interval; }}",
        f"\tset {SET_V6} {{ type ipv6_addr; flags interval; }}",
        "}",
        f"flush set inet {table} {SET_V4}",
        f"flush set inet {table} {SET_V6}",
        f"table inet {table} {{",
        f"\tset {SET_V4} {{ type ipv4_addr; flags interval;{elements(v4)} }}",
        f"\tset {SET_V6} {{ type ipv6_addr; flags interval;{elements(v6)} }}",
        "}",
        "",
    ])


@dataclass(frozen=True)
class NftablesResult:
    path: Path
    ipv4: int
    ipv6: int
    checked: bool
    """``nft -c -f`` accepted the file (False: nft is not installed, or the check was turned off)"""


def nft_check(path: Path) -> None:
    """Raise SmtpguardError unless ``nft -c -f path`` accepts the file (needs root or CAP_NET_ADMIN)."""
    nft = shutil.which("nft")
    if nft is None:
        raise SmtpguardError("nft is not installed (Debian package nftables); install it or write with --no-check")
    r = subprocess.run([nft, "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SmtpguardError(f"nft -c rejected the generated set file (the old file is kept): {r.stderr.strip()}")


def write_nftables(path: str | Path, registry: Registry, response: ResponseConfig, *, at_ms: int | None = None,
                   check: bool | None = None) -> NftablesResult:
    """Write the allowed set at ``at_ms`` (default now) to ``path`` atomically.

    ``check``: True = ``nft -c -f`` must accept the file before it replaces the old one;
    None = check when nft is installed; False = do not check.
    """
    at = now_ms() if at_ms is None else at_ms
    nets = [n for n, _ in allowed_networks(registry.states(at))]
    do_check = check if check is not None else shutil.which("nft") is not None
    text = nftables_text(nets, response.nftables_table, at)
    path = Path(path)
    write_atomically(path, lambda fh: fh.write(text), nft_check if do_check else None)
    v4, v6 = collapsed(nets)
    return NftablesResult(path, len(v4), len(v6), do_check)


# -- all outputs together -------------------------------------------------------------------------
@dataclass
class PublishReport:
    kafka: int = 0
    webhook_delivered: int = 0
    webhook_dead: int = 0
    skipped: list[str] = field(default_factory=list)
    """outputs not configured"""


class Outputs:
    """The configured enforcement outputs: Kafka when ``kafka.bootstrap_servers`` is set, the
    webhook when ``response.webhook.url`` is set."""

    def __init__(self, cfg: Config, response: ResponseConfig, store: Store, stop: threading.Event | None = None):
        self.kafka = KafkaOutput(cfg) if cfg.kafka.bootstrap_servers else None
        self.webhook = WebhookSender(response.webhook, store, stop) if response.webhook.url else None

    def publish(self, events: list[EnforcementEvent]) -> PublishReport:
        """Kafka first (raises BrokerError when it fails), then the webhook (failures are dead-lettered)."""
        report = PublishReport()
        if self.kafka is not None:
            self.kafka.publish(events)
            report.kafka = len(events)
        else:
            report.skipped.append("kafka (kafka.bootstrap_servers is not set)")
        if self.webhook is not None:
            for e in events:
                if self.webhook.send(encode(e), event_id=e.event_id, ip=e.ip).delivered:
                    report.webhook_delivered += 1
                else:
                    report.webhook_dead += 1
        return report
