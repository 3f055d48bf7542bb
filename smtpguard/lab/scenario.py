"""Deterministic generator of realistic, labelled cloud flow traffic (AWS VPC Flow Logs, NetFlow v9).

Used for demos, evaluation and benchmarks. A :class:`Scenario` is a small plan
(instances, tenants, exemptions, address pools, traffic streams and the abuse
windows); the flow records themselves are produced on demand, one time chunk at
a time, so files of tens of millions of lines stream in constant memory. The same
traffic can be written as an AWS VPC flow log (:func:`write`) and re-exported as
NetFlow v9 (:func:`write_netflow`).

The population is drawn from wide ranges on purpose: each behaviour's rate is
spread (log-uniformly, stratified so that every scenario holds both ends of the
range) over what real instances of that kind do, not just under a detector's
threshold. Evaluation keeps tuning seeds and evaluation seeds apart
(:mod:`smtpguard.lab.evaluate`).

What is in the traffic
----------------------
Every instance is an :class:`Actor` with a private IPv4 address (``10.x.y.z``, one
/22 per tenant VPC) or, for some, an IPv6 /64 of its own (``2600:1f18:…``; one
/56 per tenant), a 12-digit tenant (account id), an ``eni-`` and an ``i-`` id.
Mail goes to a universe of about 130,000 MX hosts: a few large providers with
hundreds of hosts over many /24s, a few hundred mid-size ones, and a long tail
of small domains on shared hosting; popularity is Zipf-like. Part of the MX
hosts also have IPv6 addresses, which IPv6 senders use.

Benign kinds (label ``benign``; ``kind`` says which):

- background roles ``web``, ``worker``, ``batch``, ``bastion`` (no SMTP): HTTPS/HTTP
  out and in, DNS, NTP, databases, SSH, ICMP and rejected inbound scans; a tenth
  of the web instances are IPv6 (``web6``);
- ``submission``: applications sending through one to three relays on 587 (some
  465), from 0.05 to 300 connections a minute (heavy users included);
- ``misconfigured_app``: no exemption, retries one to three mail servers on port
  25 (rejected), at any rate from once an hour to 8 a second;
- ``mail_server`` (exempted for months): 1-150 connections a minute to its own
  correspondents (50-6,000 servers, popular ones first); 15 % are IPv6;
- ``transactional``: 5-300 connections a minute, mostly to the large providers;
- ``esp_high_volume``: an ESP's outbound MTA, 150-3,000 connections a minute (about
  100-2,000 distinct servers) from a pool of 3,000-60,000 correspondents, active
  from the first minute;
- ``mailing_list``: a list server with 0.5-10 connections a minute and, every
  15-60 minutes, a post delivered in 2-12 minutes to every member's server (200-3,000
  of them, at least one connection each, 50-600 a minute), the first within the first period;
- ``newsletter``: 1-30 connections a minute and, every 30-180 minutes, a 2-5 minute
  burst of 100-1,000 distinct servers a minute that it never used before;
- ``backup_mx``: a backup MX or forwarder relaying 5-500 messages a minute to one
  to four primary servers;
- ``new_mail_server_declared``: exempted 1-5 days before, with a declared sending
  volume D (30-1,500 connections a minute, the optional exemptions CSV column
  ``declared_conns_per_min``), sending 10-70 % of it to new correspondents;
- ``app_retry``: an exempted application with 1-10 mails a minute that, for 20-60
  minutes, opens 1-150 greeting-only connections a minute to one server.

Abuse kinds (label = kind; each in its own instance, window in :meth:`Scenario.truth`):

- ``spam_burst``: no exemption, rejected port 25 to 30-500 distinct servers a minute;
- ``spam_first_minute``: the same (or accepted on 587) starting in the run's first minute;
- ``spam_exempted_new``: exempted 1-48 hours before, accepted, 30-500 distinct a minute;
- ``spam_submission``: no exemption, accepted bursts on 465/587 to 25-300 distinct
  submission servers a minute (stolen credentials);
- ``flood``: 1-3 servers of one provider, handshake-only connections; alternately
  just over (1.1-1.5 times) and far over (3-10 times) the default flood threshold
  of the instance (an established exempted mail server on port 25, or an instance
  without exemption on 587/465, where nothing blocks it);
- ``blocked_attempts``: no exemption, 10-80 rejected port-25 attempts a minute to
  5-40 distinct servers (a spam tool behind the block);
- ``volume_spike``: an established mail server that, at least 70 minutes in, sends
  8-15 times its usual rate for 10-20 minutes, 60 % to servers it never used;
- ``low_and_slow``: exempted 1-3 days before, 3-8 never-seen servers a minute for
  60-90 minutes; ``low_and_slow_blocked``: the same shape without exemption, 2-4
  rejected attempts a minute;
- ``low_and_slow_in_mail``: an established mail server's normal mail plus 10-50
  never-seen servers a minute for 40-120 minutes, from at least 65 minutes in;
- ``tenant_spam``: 3-6 instances of one tenant without exemption, 5-15 rejected
  attempts a minute each, together 50-150 distinct servers a minute;
- ``spam_ipv6_rotating``: an IPv6 instance that takes a new address from its /64
  for every connection, 30-300 distinct servers a minute;
- ``spam_ipv6_wide``: the same over a /56 delegated to the instance (256 /64s).

Every connection gives one record per direction (the reply has the ports swapped;
rejected SYNs have none), both logged on the instance's interface. Lines come out
roughly in time order: each is delayed by a random 0-30 s before sorting, like
AWS's delivery, so ``start`` may go backwards by up to 30 s. With ``late_fraction``
that share of lines is delivered ``late_delay_s`` (60-240 s by default) late.

Output (:func:`write`): ``flows.log`` (custom format; the first line is the header
of field names, as in files AWS delivers to S3), ``exemptions.csv``
(``ip,tenant,granted_at,reason,declared_conns_per_min``; IPv6 senders by address or
by their /64), ``inventory.csv`` (``ip,tenant,instance_id,interface_id``: every
instance's address or prefix, as a provider's IPAM knows it), ``truth.json`` (every
actor with its label and, for abusive ones, the abuse window) and ``scenario.json``
(the options, the tenant-level truth and the benign episodes).
:func:`write_netflow` writes the same flows as a pcap of NetFlow v9 export packets,
:func:`write_sflow` the same traffic as an sFlow v5 export sampling 1 packet in N.

The same seed (and arguments, numpy version) gives byte-identical output.

Run ``python -m smtpguard.lab.scenario OUT_DIR [--seed N] [--abuse all] [--netflow]
[--late-fraction F]`` for a demo directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip as gzip_module
import ipaddress
import json
import math
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Field names of the custom format written (in order); the file's first line.
FIELDS: tuple[str, ...] = (
    "version", "account-id", "interface-id", "srcaddr", "dstaddr", "srcport", "dstport",
    "protocol", "packets", "bytes", "start", "end", "action", "log-status", "instance-id", "tcp-flags",
)
HEADER = " ".join(FIELDS)
#: A custom format's version is the highest version of its fields (instance-id, tcp-flags: 3).
FORMAT_VERSION = 3

ABUSE_KINDS: tuple[str, ...] = (
    "spam_burst", "spam_first_minute", "spam_exempted_new", "spam_submission", "flood", "blocked_attempts",
    "volume_spike", "low_and_slow", "low_and_slow_blocked", "low_and_slow_in_mail", "tenant_spam",
    "spam_ipv6_rotating", "spam_ipv6_wide")
DEFAULT_ABUSE: tuple[str, ...] = ("spam_burst", "spam_exempted_new", "flood", "blocked_attempts")
#: Benign kinds with SMTP traffic (label ``benign``); see the module docstring.
BENIGN_KINDS: tuple[str, ...] = (
    "submission", "misconfigured_app", "mail_server", "transactional", "esp_high_volume", "mailing_list",
    "newsletter", "backup_mx", "new_mail_server_declared", "app_retry")
#: Abuse kinds judged against the sender's own history (they need a normal past, so they start late).
HISTORY_KINDS: tuple[str, ...] = ("volume_spike", "low_and_slow_in_mail")
#: Start used when none is given (fixed, so output never depends on the clock).
DEFAULT_START = dt.datetime(2024, 3, 12, 8, 0, 0, tzinfo=dt.timezone.utc)

MINUTE_MS = 60_000
#: Largest random delivery delay used for ordering (AWS-like out-of-order lines).
JITTER_MS = 30_000
#: NetFlow re-export: a flow is exported up to this long after it ends (the exporter's inactive timeout).
NETFLOW_EXPORT_DELAY_MS = 15_000

ACCEPT, REJECT = 0, 1

# TCP flags as AWS reports them (OR over the aggregation window): FIN 1, SYN 2, RST 4, SYN-ACK 18.
_FIN, _SYN, _RST, _SYNACK = 1, 2, 4, 18


def _flood_thresholds() -> tuple[float, float]:
    """The default connection_flood thresholds (connections a minute to the top three servers) for an
    instance without exemption and for an established exempted one: "just over" and "far over" floods
    are drawn relative to them."""
    from smtpguard.detectors.rules import ConnectionFlood

    p = ConnectionFlood.Params()
    return float(p.min_conns_top3), float(p.min_conns_top3 * p.exempt_factor)


# ---------------------------------------------------------------------------
# public data types


@dataclass
class Actor:
    """One instance (one interface) in the scenario."""

    ip: str
    """its address (the first of its prefix for IPv6 instances)"""
    tenant: str
    instance_id: str
    kind: str
    """role of the instance: a background role, a benign kind of :data:`BENIGN_KINDS`, or the role an
    abusive instance plays (mail_server, mail_server_new, web, worker)"""
    label: str
    """``benign`` or the abuse kind (one of :data:`ABUSE_KINDS`)"""
    interface_id: str = ""
    exempted: bool = False
    prefix: str = ""
    """the IPv6 prefix assigned to the instance (its /64, or the /56 delegated to it); '' for IPv4"""
    declared_conns_per_min: float | None = None
    """the sending volume its exemption was granted for, when declared"""
    abuse_start_ms: int | None = None
    abuse_end_ms: int | None = None
    """abuse window [start, end) in epoch ms; every abusive flow starts inside it"""
    targets: tuple[str, ...] = ()
    """servers a flood, misconfigured app or retrying application aims at"""

    @property
    def abusive(self) -> bool:
        return self.label != "benign"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["abuse_start"] = _iso_ms(self.abuse_start_ms) if self.abuse_start_ms is not None else None
        d["abuse_end"] = _iso_ms(self.abuse_end_ms) if self.abuse_end_ms is not None else None
        return d


@dataclass
class Exemption:
    """One row of exemptions.csv: an instance (address or prefix) allowed to send on port 25."""

    ip: str
    tenant: str
    granted_at: dt.datetime
    reason: str
    declared_conns_per_min: float | None = None


@dataclass
class Scenario:
    """A generated scenario: the plan of who sends what, and when.

    The flow lines are not held; get them with :func:`iter_lines`,
    :func:`iter_chunks`, :func:`write` or :func:`write_netflow`.
    """

    seed: int
    start_ms: int
    end_ms: int
    actors: list[Actor]
    exemptions: list[Exemption]
    fields: tuple[str, ...] = FIELDS
    expected_lines: int = 0
    """estimate of the number of flow lines (without the header), within ~10 %"""
    abuse: tuple[str, ...] = ()
    """the abuse kinds asked for, in order"""
    warmup_s: int = 0
    """no abuse starts in the first ``warmup_s`` seconds (0: abuse may start at once)"""
    late_fraction: float = 0.0
    """share of lines delivered late (later in the file, same timestamps)"""
    late_delay_s: tuple[int, int] = (60, 240)
    tenant_abuse: list[dict] = field(default_factory=list)
    """tenant-level truth: one entry per tenant_spam run (tenant, its instances, the window)"""
    episodes: list[dict] = field(default_factory=list)
    """windows of the benign kinds' unusual traffic (newsletter and list bursts, retry storms)"""
    _plan: "_Plan | None" = field(default=None, repr=False, compare=False)

    @property
    def header(self) -> str:
        return " ".join(self.fields)

    @property
    def duration_s(self) -> int:
        return (self.end_ms - self.start_ms) // 1000

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.start_ms / 1000, dt.timezone.utc)

    @property
    def end(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.end_ms / 1000, dt.timezone.utc)

    @property
    def abusive(self) -> list[Actor]:
        return [a for a in self.actors if a.abusive]

    def actor(self, ip: str) -> Actor:
        for a in self.actors:
            if a.ip == ip:
                return a
        raise KeyError(ip)

    def truth(self) -> list[dict]:
        """Every actor as a JSON-ready dict (label, kind, exemption, prefix, abuse window).

        One entry per instance: tenant_spam instances are listed each with their
        own label and tenant; the tenant-level view is :meth:`tenant_truth`.
        """
        return [a.to_dict() for a in self.actors]

    def tenant_truth(self) -> list[dict]:
        """One entry per tenant_spam run: ``tenant``, ``label``, ``instances`` (IPs) and the window."""
        return [dict(t) for t in self.tenant_abuse]

    def exemptions_csv(self) -> str:
        rows = ["ip,tenant,granted_at,reason,declared_conns_per_min"]
        for e in self.exemptions:
            reason = e.reason.replace('"', "'")
            if "," in reason:
                reason = f'"{reason}"'
            declared = "" if e.declared_conns_per_min is None else f"{e.declared_conns_per_min:g}"
            rows.append(f"{e.ip},{e.tenant},{_iso_s(e.granted_at)},{reason},{declared}")
        return "\n".join(rows) + "\n"

    def inventory_csv(self) -> str:
        """Every instance's address (IPv4) or assigned prefix (IPv6), with its tenant and ids."""
        rows = ["ip,tenant,instance_id,interface_id"]
        for a in self.actors:
            rows.append(f"{a.prefix or a.ip},{a.tenant},{a.instance_id},{a.interface_id}")
        return "\n".join(rows) + "\n"

    def meta(self) -> dict:
        return {
            "generator": "smtpguard.lab.scenario",
            "seed": self.seed,
            "start": _iso_ms(self.start_ms),
            "end": _iso_ms(self.end_ms),
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "instances": len(self.actors),
            "tenants": len({a.tenant for a in self.actors}),
            "exemptions": len(self.exemptions),
            "abusive": [a.ip for a in self.abusive],
            "format": "aws-vpc",
            "header": self.header,
            "expected_lines": self.expected_lines,
            "max_out_of_order_s": JITTER_MS // 1000 + (self.late_delay_s[1] if self.late_fraction > 0 else 0),
            "abuse": list(self.abuse),
            "warmup_s": self.warmup_s,
            "late_fraction": self.late_fraction,
            "late_delay_s": list(self.late_delay_s),
            "kinds": dict(sorted(_count(a.kind for a in self.actors if not a.abusive).items())),
            "tenant_abuse": self.tenant_truth(),
            "benign_episodes": [dict(e) for e in self.episodes],
        }


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_s(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------
# traffic profiles: how one connection of a kind looks


@dataclass(frozen=True)
class _Profile:
    name: str
    proto: int
    inbound: bool          # True: the remote side is the client (connects to the instance)
    port: int              # server port (0: per-row port from the stream, or ICMP)
    action: int
    pk_med: float          # client->server packets: lognormal median, sigma, clipped [lo, hi]
    pk_sig: float
    pk_lo: int
    pk_hi: int
    bpp_lo: int            # bytes per packet, uniform integer [lo, hi]
    bpp_hi: int
    rev_prob: float        # probability that the reply flow is logged
    rev_ratio: float       # reply packets / request packets
    rbpp_lo: int
    rbpp_hi: int
    dur_med: float         # duration seconds: lognormal median, sigma (clipped to 0..59)
    dur_sig: float
    f_fwd: int             # TCP flags of the request flow, alternative flags and their probability
    f_fwd_alt: int
    p_fwd_alt: float
    f_rev: int
    f_rev_alt: int
    p_rev_alt: float


_OK_F = (_SYN | _FIN, _SYN | _FIN | _RST)          # 3, 7
_OK_R = (_SYNACK | _FIN, _SYNACK | _FIN | _RST)    # 19, 23

_PROFILES: tuple[_Profile, ...] = (
    _Profile("https_out", 6, False, 443, ACCEPT, 14, 0.9, 4, 5000, 60, 260, 1.0, 1.4, 400, 1400, 2.0, 1.1, *_OK_F, 0.04, *_OK_R, 0.03),
    _Profile("http_out", 6, False, 80, ACCEPT, 7, 0.7, 3, 800, 60, 200, 1.0, 1.2, 500, 1400, 0.8, 1.0, *_OK_F, 0.03, *_OK_R, 0.02),
    _Profile("dns", 17, False, 53, ACCEPT, 1, 0.0, 1, 1, 60, 90, 0.98, 1.0, 100, 420, 0.01, 0.0, 0, 0, 0.0, 0, 0, 0.0),
    _Profile("ntp", 17, False, 123, ACCEPT, 1, 0.0, 1, 1, 76, 76, 1.0, 1.0, 76, 76, 0.01, 0.0, 0, 0, 0.0, 0, 0, 0.0),
    _Profile("postgres_out", 6, False, 5432, ACCEPT, 10, 0.9, 3, 3000, 70, 400, 1.0, 1.1, 80, 1200, 0.5, 1.5, *_OK_F, 0.02, *_OK_R, 0.02),
    _Profile("mysql_out", 6, False, 3306, ACCEPT, 9, 0.9, 3, 3000, 70, 400, 1.0, 1.1, 80, 1200, 0.5, 1.5, *_OK_F, 0.02, *_OK_R, 0.02),
    _Profile("https_in", 6, True, 443, ACCEPT, 12, 0.9, 3, 3000, 60, 220, 1.0, 1.5, 400, 1400, 1.5, 1.2, *_OK_F, 0.05, *_OK_R, 0.03),
    _Profile("http_in", 6, True, 80, ACCEPT, 6, 0.6, 3, 300, 60, 200, 1.0, 1.3, 400, 1400, 0.5, 1.0, *_OK_F, 0.05, *_OK_R, 0.03),
    _Profile("ssh_in", 6, True, 22, ACCEPT, 150, 1.0, 10, 20000, 60, 160, 1.0, 1.1, 60, 400, 25, 0.6, *_OK_F, 0.05, *_OK_R, 0.03),
    _Profile("scan_in", 6, True, 0, REJECT, 1.2, 0.4, 1, 2, 40, 60, 0.0, 1.0, 40, 40, 0.5, 1.0, _SYN, _SYN, 0.0, 0, 0, 0.0),
    _Profile("icmp_in", 1, True, 0, ACCEPT, 2, 0.5, 1, 8, 84, 84, 1.0, 1.0, 84, 84, 1.0, 1.0, 0, 0, 0.0, 0, 0, 0.0),
    # SMTP
    _Profile("smtp_mx", 6, False, 25, ACCEPT, 16, 0.6, 8, 600, 120, 900, 1.0, 0.75, 60, 160, 2.5, 0.7, *_OK_F, 0.05, *_OK_R, 0.03),
    _Profile("smtp_submission", 6, False, 587, ACCEPT, 24, 0.7, 10, 800, 150, 1000, 1.0, 0.8, 80, 400, 2.0, 0.7, *_OK_F, 0.03, *_OK_R, 0.02),
    _Profile("smtp_blocked", 6, False, 25, REJECT, 1.5, 0.6, 1, 3, 40, 60, 0.0, 1.0, 40, 40, 1.0, 0.8, _SYN, _SYN, 0.0, 0, 0, 0.0),
    _Profile("smtp_spam_small", 6, False, 25, ACCEPT, 9, 0.3, 6, 16, 120, 450, 1.0, 0.9, 60, 140, 1.2, 0.5, *_OK_F, 0.15, *_OK_R, 0.10),
    _Profile("smtp_flood_accept", 6, False, 25, ACCEPT, 1.5, 0.6, 1, 3, 40, 60, 0.6, 1.0, 40, 60, 0.3, 1.0, _SYN, _SYN | _RST, 0.5, _SYNACK, _RST, 0.3),
    _Profile("smtp_flood_reject", 6, False, 25, REJECT, 1.5, 0.6, 1, 3, 40, 60, 0.0, 1.0, 40, 40, 0.3, 1.0, _SYN, _SYN, 0.0, 0, 0, 0.0),
    # an application that connects, greets and quits: 3-6 packets, 200-600 bytes, the banner back
    _Profile("smtp_retry", 6, False, 25, ACCEPT, 4, 0.3, 3, 6, 67, 100, 1.0, 1.0, 60, 120, 0.3, 0.8, *_OK_F, 0.1, *_OK_R, 0.05),
    # spam through other providers' submission servers (465/587: per-row port), small messages over TLS
    _Profile("smtp_submission_spam", 6, False, 587, ACCEPT, 14, 0.3, 10, 30, 120, 400, 1.0, 0.9, 80, 300, 1.5, 0.5, *_OK_F, 0.1, *_OK_R, 0.05),
    # a flood on 465/587, which nothing blocks: handshakes, resets
    _Profile("smtp_flood_sub", 6, False, 587, ACCEPT, 1.5, 0.6, 1, 3, 40, 60, 0.6, 1.0, 40, 60, 0.3, 1.0, _SYN, _SYN | _RST, 0.5, _SYNACK, _RST, 0.3),
)
_P = {p.name: i for i, p in enumerate(_PROFILES)}


class _ProfileTable:
    """The profiles as numpy columns, for vectorised lookups by profile id."""

    def __init__(self, profiles: Sequence[_Profile]):
        for name in _Profile.__dataclass_fields__:
            if name == "name":
                continue
            vals = [getattr(p, name) for p in profiles]
            kind = float if isinstance(vals[0], float) or any(isinstance(v, float) for v in vals) else int
            setattr(self, name, np.array(vals, dtype=np.float64 if kind is float else np.int64))
        self.inbound = self.inbound.astype(bool)
        self.log_pk_med = np.log(self.pk_med)
        self.log_dur_med = np.log(self.dur_med)


_PT = _ProfileTable(_PROFILES)


# per-minute connection rates (log-uniform between lo and hi, per instance) of background roles
_ROLE_RATES: dict[str, dict[str, tuple[float, float]]] = {
    "web": {"https_in": (2, 10), "http_in": (0.2, 1.5), "https_out": (0.5, 3), "dns": (1, 4),
            "ntp": (0.05, 0.07), "scan_in": (0.2, 1.0), "icmp_in": (0.05, 0.3), "ssh_in": (0.01, 0.05)},
    "worker": {"https_out": (2, 8), "postgres_out": (1, 6), "dns": (2, 5), "ntp": (0.05, 0.07),
               "scan_in": (0.1, 0.5), "ssh_in": (0.01, 0.04)},
    "batch": {"https_out": (0.5, 10), "http_out": (0.2, 1), "mysql_out": (1, 5), "dns": (1, 4),
              "ntp": (0.05, 0.07), "scan_in": (0.1, 0.5)},
    "bastion": {"ssh_in": (0.1, 0.8), "https_out": (0.2, 1), "dns": (0.5, 2), "ntp": (0.05, 0.07),
                "scan_in": (1, 4), "icmp_in": (0.1, 0.5)},
    "mail": {"dns": (4, 12), "https_out": (0.2, 1), "ntp": (0.05, 0.07), "scan_in": (0.2, 1.0),
             "ssh_in": (0.01, 0.05), "icmp_in": (0.05, 0.2)},
    # IPv6 instances: web traffic over IPv6 only (remote pools of IPv6 addresses)
    "web6": {"https_in": (1, 8), "https_out": (0.5, 3), "dns": (1, 4)},
}
_BG_ROLES = ("web", "worker", "batch", "bastion")
_BG_ROLE_P = (0.45, 0.33, 0.16, 0.06)
_SCAN_PORTS = np.array([23, 3389, 445, 1433, 5900, 6379, 8080, 8443, 2323, 5555, 9200, 27017], dtype=np.int64)
_RESOLVERS = ("8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9")
_RESOLVERS6 = ("2001:4860:4860::8888", "2001:4860:4860::8844", "2606:4700:4700::1111", "2620:fe::fe")

_MAIL_REASONS = ("transactional mail relay", "customer MTA (reviewed)", "ticketing system notifications",
                 "CRM mail", "helpdesk notifications")
_KIND_REASONS = {"transactional": "transactional mail (receipts, password resets)",
                 "esp_high_volume": "ESP outbound MTA (high volume)", "mailing_list": "mailing-list server",
                 "newsletter": "newsletter delivery server", "backup_mx": "backup MX / forwarder",
                 "new_mail_server_declared": "new customer MTA (declared volume)",
                 "app_retry": "application notifications"}
# MX popularity: Zipf over providers, geometric over a provider's hosts; the long tail of small
# domains (one or two MX each on shared hosting /24s) gets Zipf-tail weights.
_MX_ZIPF = 1.1
_MX_INNER_RATIO = 0.85
_N_BIG, _N_MID, _N_TAIL = 10, 300, 120_000

#: (lo, hi) connections a minute and other ranges of the benign kinds (see the module docstring)
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "submission": {"rate": (0.05, 300.0)},
    "misconfigured_app": {"rate": (1 / 60, 480.0), "targets": (1, 3)},
    "mail_server": {"rate": (1.0, 150.0), "pool": (50, 6000)},
    "transactional": {"rate": (5.0, 300.0), "pool": (30, 400)},
    "esp_high_volume": {"rate": (150.0, 3000.0), "pool": (3000, 60000)},
    "mailing_list": {"rate": (0.5, 10.0), "burst_rate": (50.0, 600.0), "burst_min": (2, 12), "period_min": (15, 60),
                     "pool": (200, 3000)},
    "newsletter": {"rate": (1.0, 30.0), "burst_distinct": (100.0, 1000.0), "burst_min": (2, 5),
                   "period_min": (30, 180), "pool": (50, 1500)},
    "backup_mx": {"rate": (5.0, 500.0), "targets": (1, 4)},
    "new_mail_server_declared": {"declared": (30.0, 1500.0), "share": (0.1, 0.7)},
    "app_retry": {"rate": (1.0, 10.0), "retry_rate": (1.0, 150.0), "retry_min": (20, 60)},
}
#: share of the instances (and, from 200 instances, the least number) of each benign kind
_KIND_SHARE: dict[str, tuple[float, int]] = {
    "submission": (1 / 10, 3), "misconfigured_app": (1 / 40, 3), "mail_server": (1 / 40, 4),
    "transactional": (1 / 100, 2), "esp_high_volume": (1 / 200, 2), "mailing_list": (1 / 250, 2),
    "newsletter": (1 / 150, 2), "backup_mx": (1 / 250, 2), "new_mail_server_declared": (1 / 250, 2),
    "app_retry": (1 / 250, 1)}
_V6_MAIL_SHARE = 0.15
_V6_WEB_SHARE = 0.10

# abuse windows: length in minutes and the earliest start in minutes (kinds judged against the
# sender's own history start after it has had a normal past)
_ABUSE_MINUTES: dict[str, tuple[float, float]] = {
    "spam_burst": (3, 20), "spam_first_minute": (5, 20), "spam_exempted_new": (5, 20), "spam_submission": (3, 15),
    "flood": (5, 20), "blocked_attempts": (5, 20), "volume_spike": (10, 20), "low_and_slow": (60, 90),
    "low_and_slow_blocked": (60, 90), "low_and_slow_in_mail": (40, 120), "tenant_spam": (10, 20),
    "spam_ipv6_rotating": (5, 20), "spam_ipv6_wide": (5, 20)}
_ABUSE_EARLIEST_MIN: dict[str, float] = {"volume_spike": 70, "low_and_slow_in_mail": 65}
#: instances of one tenant_spam run (all in one tenant)
_TENANT_SPAM_MIN, _TENANT_SPAM_MAX = 3, 6
#: addresses an IPv6 spammer rotates through (a new one for nearly every connection)
_ROTATION_POOL = 12_000


def _window_earliest_ms(kind: str, dur_ms: int, warmup_ms: int) -> float:
    """Earliest start of an abuse window after the scenario start."""
    if kind == "spam_first_minute":
        return 0.0
    return max(2 * MINUTE_MS, warmup_ms, _ABUSE_EARLIEST_MIN.get(kind, 0) * MINUTE_MS)


def _window_longest_ms(kind: str, dur_ms: int) -> float:
    lo, hi = _ABUSE_MINUTES[kind]
    return hi * MINUTE_MS if kind in HISTORY_KINDS or hi > 20 else min(hi * MINUTE_MS, 0.5 * dur_ms)


# ---------------------------------------------------------------------------
# plan: streams of connections


@dataclass
class _Stream:
    profile: int
    actors: np.ndarray                  # global actor ids
    rate: np.ndarray                    # per-minute Poisson mean, or uniform low bound (with rate_hi)
    act_from: np.ndarray                # activity window [from, to) per actor, epoch ms
    act_to: np.ndarray
    rate_hi: np.ndarray | None = None
    diurnal: bool = True
    cap: int = 0                        # most connections per actor-minute (0 = none)
    dst: str = "pool"                   # pool | weighted | targets | wtargets | distinct | rds
    pool: tuple[int, int] = (0, 0)      # (offset, length) in the address table
    cum: np.ndarray | None = None       # cumulative weights over the pool (weighted)
    p: np.ndarray | None = None         # probabilities over the pool (distinct)
    extra_frac: float = 0.0             # distinct: up to this share of repeat connections
    extra_lo: float = 0.0               # distinct: at least this share of repeat connections
    tgt_off: np.ndarray | None = None   # targets / wtargets: per local actor, into tgt_flat
    tgt_len: np.ndarray | None = None
    tgt_flat: np.ndarray | None = None  # address indices
    tgt_cum: np.ndarray | None = None   # wtargets: per segment cumulative weights, segment l in (l, l + 1]
    dport_actor: np.ndarray | None = None
    dport_choices: np.ndarray | None = None
    src_off: np.ndarray | None = None   # per local actor: rotation pool (offset, length) of source addresses
    src_len: np.ndarray | None = None
    ev_t: np.ndarray | None = None      # scheduled events (sorted by time) instead of rates
    ev_local: np.ndarray | None = None
    ev_dst: np.ndarray | None = None    # events: fixed remote address index per event (else by dst)

    def expected_per_min(self, duration_ms: int) -> float:
        """Mean connections per minute over the scenario (for sizing)."""
        if self.ev_t is not None:
            return len(self.ev_t) * MINUTE_MS / max(duration_ms, 1)
        active = np.clip(self.act_to - self.act_from, 0, None) / max(duration_ms, 1)
        rate = self.rate if self.rate_hi is None else (self.rate + self.rate_hi) / 2
        if self.cap:
            rate = np.minimum(rate, self.cap)
        return float((rate * active).sum() * (1 + (self.extra_lo + self.extra_frac) / 2))


@dataclass
class _Plan:
    seed: int
    start_ms: int
    end_ms: int
    chunk_ms: int
    chunk0_ms: int
    n_chunks: int
    addr: pa.Array             # address strings; actors first (index = actor id)
    addr_bin: np.ndarray       # (n, 16) uint8: IPv6 bytes, or IPv4 in the last 4
    addr_v6: np.ndarray        # bool per address
    prefix: pa.Array           # per actor: "3 <account> <eni>"
    suffix: pa.Array           # per actor and action: "ACCEPT OK <instance>" at 2*actor + action
    tenant_of: np.ndarray
    rds_of_tenant: np.ndarray  # address index of each tenant's database
    streams: list[_Stream]
    late_fraction: float = 0.0
    late_lo_ms: int = 0
    late_hi_ms: int = 0


_OCTETS = pa.array([str(i) for i in range(256)])
_SMALL_INT = pa.array([str(i) for i in range(256)])
_FLAGS_NL = pa.array([f"{i}\n" for i in range(256)])
_EXCLUDED_FIRST_OCTETS = {0, 1, 10, 100, 127, 169, 172, 192, 198, 203} | set(range(224, 256))
_PUBLIC_FIRST = np.array([o for o in range(2, 224) if o not in _EXCLUDED_FIRST_OCTETS], dtype=np.uint32)


def _ip_strings(u32: np.ndarray) -> pa.Array:
    u = np.asarray(u32, dtype=np.uint32)
    parts = [_OCTETS.take(pa.array(((u >> s) & 255).astype(np.int32))) for s in (24, 16, 8, 0)]
    return pc.binary_join_element_wise(*parts, ".")


def _ip_u32(s: str) -> int:
    a, b, c, d = (int(x) for x in s.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def _public_24s(rng: np.random.Generator, n: int, taken: set[int]) -> np.ndarray:
    """``n`` distinct random public /24 prefixes (as the address of .0), not in ``taken``."""
    out = np.zeros(0, np.uint32)
    while len(out) < n:
        k = (n - len(out)) * 2 + 16
        first = rng.choice(_PUBLIC_FIRST, size=k)
        rest = rng.integers(0, 1 << 16, size=k, dtype=np.uint32)
        cand = (first << 24) | (rest << 8)
        _, first_idx = np.unique(cand, return_index=True)
        cand = cand[np.sort(first_idx)]
        if taken:
            cand = cand[~np.isin(cand, np.fromiter(taken, np.uint32, len(taken)))]
        cand = cand[:n - len(out)]
        taken.update(cand.tolist())
        out = np.concatenate([out, cand])
    return out


def _hosts_in(rng: np.random.Generator, nets: np.ndarray, per_net: np.ndarray) -> np.ndarray:
    """Distinct host addresses (.2-.254) in each /24 of ``nets``, ``per_net[i]`` of them."""
    per_net = np.asarray(per_net, np.int64)
    if not len(nets):
        return np.zeros(0, np.uint32)
    # a random permutation of .2-.254 per net, first k taken
    keys = rng.random((len(nets), 253))
    order = np.argsort(keys, axis=1)[:, :int(per_net.max())] + 2
    take = np.arange(order.shape[1])[None, :] < per_net[:, None]
    return (np.asarray(nets, np.uint32)[:, None] | order.astype(np.uint32))[take]


def _v6_strings(hi: np.ndarray, lo: np.ndarray) -> list[str]:
    return [str(ipaddress.IPv6Address((int(h) << 64) | int(l))) for h, l in zip(hi.tolist(), lo.tolist())]


def _v6_bytes(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = np.zeros((len(hi), 16), np.uint8)
    out[:, :8] = np.asarray(hi, np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    out[:, 8:] = np.asarray(lo, np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    return out


def _v4_bytes(u32: np.ndarray) -> np.ndarray:
    out = np.zeros((len(u32), 16), np.uint8)
    out[:, 12:] = np.asarray(u32, np.uint32).astype(">u4").view(np.uint8).reshape(-1, 4)
    return out


def _hex_ids(rng: np.random.Generator, n: int, prefix: str) -> list[str]:
    raw = rng.integers(0, 16, size=(n, 17))
    raw[:, 0] = 0  # modern ids: eni-0..., i-0...
    digits = np.array(list("0123456789abcdef"))
    return [prefix + "".join(row) for row in digits[raw]]


def _loguniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))


def _spread(rng: np.random.Generator, lo: float, hi: float, n: int, log: bool = True) -> np.ndarray:
    """``n`` values over [lo, hi], one in each of ``n`` equal strata (log scale by default), shuffled:
    every scenario holds both ends of the range, not only its middle."""
    if n <= 0:
        return np.zeros(0)
    u = rng.permutation((np.arange(n) + rng.random(n)) / n)
    if log:
        return np.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return lo + u * (hi - lo)


def _benign_counts(n: int) -> dict[str, int]:
    out = {}
    for kind, (share, least) in _KIND_SHARE.items():
        k = int(round(n * share))
        if n >= 200:
            k = max(k, least)
        elif kind in ("submission", "misconfigured_app", "mail_server"):
            k = max(k, 2 if kind != "misconfigured_app" else 1)
        out[kind] = k
    return out


def generate(seed: int, *, instances: int = 300, duration_s: int = 7200, start: dt.datetime | None = None,
             abuse: Sequence[str] = DEFAULT_ABUSE, warmup_s: int = 0, late_fraction: float = 0.0,
             late_delay_s: tuple[int, int] = (60, 240)) -> Scenario:
    """Plan a scenario of ``instances`` instances over ``duration_s`` seconds from ``start`` (UTC).

    ``abuse`` lists the abusive runs: one instance per entry, except ``tenant_spam``,
    which takes 3-6 instances of one tenant (kinds may repeat; floods alternate between
    just over and far over the threshold, and between an exempted mail server and an
    instance without exemption). The benign population scales with ``instances``
    (every benign kind from 200 instances on).

    ``warmup_s``: no abuse window starts before ``start + warmup_s`` (0 by default: abuse
    may start at once, and ``spam_first_minute`` always starts in the first minute).
    ``late_fraction`` of the lines (each independently) are delivered ``late_delay_s`` =
    (lo, hi) seconds late: they move that much later in the file, their timestamps stay.
    """
    abuse = tuple(abuse)
    unknown = [k for k in abuse if k not in ABUSE_KINDS]
    if unknown:
        raise ValueError(f"unknown abuse kind(s) {unknown}; known: {', '.join(ABUSE_KINDS)}")
    if duration_s < 60:
        raise ValueError("duration_s must be at least 60")
    warmup_s = int(warmup_s)
    if not 0 <= warmup_s < duration_s:
        raise ValueError("warmup_s must be at least 0 and less than duration_s")
    late_fraction = float(late_fraction)
    if not 0.0 <= late_fraction <= 1.0:
        raise ValueError("late_fraction must be between 0 and 1")
    late_lo, late_hi = (int(x) for x in late_delay_s)
    if not 0 <= late_lo <= late_hi:
        raise ValueError("late_delay_s must be (lo, hi) seconds with 0 <= lo <= hi")
    start = DEFAULT_START if start is None else start
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.timezone.utc)
    start_ms = int(round(start.timestamp() * 1000))
    end_ms = start_ms + int(duration_s) * 1000
    dur_ms = end_ms - start_ms
    warmup_ms = warmup_s * 1000
    for kind in dict.fromkeys(abuse):
        lo_min = _ABUSE_MINUTES[kind][0]
        need = _window_earliest_ms(kind, dur_ms, warmup_ms) + lo_min * MINUTE_MS
        if need > dur_ms:
            raise ValueError(f"abuse kind {kind!r} needs a scenario of at least {math.ceil(need / 1000)} s "
                             f"with warmup_s={warmup_s} (duration_s={duration_s})")
    N = int(instances)
    counts = _benign_counts(N)
    singles = tuple(k for k in abuse if k != "tenant_spam")
    n_groups = len(abuse) - len(singles)
    n_bg = N - sum(counts.values()) - len(singles) - _TENANT_SPAM_MAX * n_groups
    if n_bg < 10:
        raise ValueError(f"instances={N} is too few for this mix; use at least {N - n_bg + 10}")

    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, 0])
    flood_t, flood_t_exempt = _flood_thresholds()

    # --- tenants and instances
    sizes: list[int] = []
    while sum(sizes) < N:
        sizes.append(int(rng.integers(2, 13)))
    sizes[-1] -= sum(sizes) - N
    if sizes[-1] == 0:
        sizes.pop()
    n_ten = len(sizes)
    if n_ten > 16000:
        raise ValueError("too many instances (at most ~100k)")
    accounts: list[str] = []
    seen: set[int] = set()
    while len(accounts) < n_ten:
        a = int(rng.integers(10**11, 10**12))
        if a not in seen:
            seen.add(a)
            accounts.append(str(a))
    tenant_of = np.repeat(np.arange(n_ten), sizes)
    first_of = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # one /22 VPC per tenant, spread over 10.0.0.0/8, and one IPv6 /56 per tenant
    vpc_slot = rng.choice(np.arange(1, 16384, dtype=np.uint32), size=n_ten, replace=False)
    vpc_base = (np.uint32(10) << 24) + vpc_slot * np.uint32(1024)
    inst_u32 = np.empty(N, np.uint32)
    pos = 0
    for t, k in enumerate(sizes):
        hosts = rng.choice(np.arange(10, 1000, dtype=np.uint32), size=k, replace=False)
        inst_u32[pos:pos + k] = vpc_base[t] + hosts
        pos += k
    rds_u32 = vpc_base + 1000 + rng.integers(0, 20, size=n_ten).astype(np.uint32)
    v6_slot = rng.choice(np.arange(1, 1 << 20, dtype=np.uint64), size=n_ten, replace=False)

    # roles, assigned over a random permutation of the instances; tenant_spam takes several instances
    # of one tenant: reserve them first, and send the tenant's other instances to background roles
    perm = rng.permutation(N)
    tenant_groups: list[np.ndarray] = []
    if n_groups:
        used: set[int] = set()
        rest: list[np.ndarray] = []
        for _ in range(n_groups):
            k = int(rng.integers(_TENANT_SPAM_MIN, _TENANT_SPAM_MAX + 1))
            free = [t for t in range(n_ten) if t not in used and sizes[t] >= _TENANT_SPAM_MIN]
            if not free:
                raise ValueError(f"instances={N}: no tenant left with {_TENANT_SPAM_MIN} instances for tenant_spam")
            big_enough = [t for t in free if sizes[t] >= k]
            t = int(rng.choice(big_enough or free))
            used.add(t)
            members = np.arange(first_of[t], first_of[t] + sizes[t])
            chosen = np.sort(rng.choice(members, size=min(k, sizes[t]), replace=False))
            tenant_groups.append(chosen)
            rest.append(np.setdiff1d(members, chosen))
        everyone = np.concatenate(tenant_groups + rest)
        perm = np.concatenate([perm[~np.isin(perm, everyone)], rng.permutation(np.concatenate(rest))])
        n_bg = N - sum(counts.values()) - len(singles) - sum(len(g) for g in tenant_groups)
    roles = np.empty(N, dtype=object)
    labels = np.array(["benign"] * N, dtype=object)
    cursor = 0

    def take(k: int) -> np.ndarray:
        nonlocal cursor
        ids = np.sort(perm[cursor:cursor + k])
        cursor += k
        return ids

    kind_ids: dict[str, np.ndarray] = {}
    for kind in BENIGN_KINDS:
        kind_ids[kind] = take(counts[kind])
        roles[kind_ids[kind]] = kind
    abuse_ids = take(len(singles))
    bg_ids = take(n_bg)
    roles[bg_ids] = rng.choice(np.array(_BG_ROLES, dtype=object), size=n_bg, p=_BG_ROLE_P)
    for g in tenant_groups:
        roles[g] = "web"
    bg_role = roles.copy()  # role whose background traffic the instance has
    mailish = ("mail_server", "transactional", "esp_high_volume", "mailing_list", "newsletter", "backup_mx",
               "new_mail_server_declared")
    for kind in mailish:
        bg_role[kind_ids[kind]] = "mail"
    bg_role[kind_ids["submission"]] = rng.choice(np.array(("web", "worker"), dtype=object), size=counts["submission"])
    bg_role[kind_ids["misconfigured_app"]] = rng.choice(np.array(("web", "worker", "batch"), dtype=object),
                                                        size=counts["misconfigured_app"])
    bg_role[kind_ids["app_retry"]] = "worker"

    # which instances are IPv6: a share of the mail servers and web instances, and the IPv6 spammers
    is_v6 = np.zeros(N, bool)
    ms = kind_ids["mail_server"]
    is_v6[ms[rng.random(len(ms)) < _V6_MAIL_SHARE]] = True
    web = bg_ids[roles[bg_ids] == "web"]
    is_v6[web[rng.random(len(web)) < _V6_WEB_SHARE]] = True
    abuse_kind_of: dict[int, str] = dict(zip(abuse_ids.tolist(), singles))
    for aid, kind in abuse_kind_of.items():
        if kind in ("spam_ipv6_rotating", "spam_ipv6_wide"):
            is_v6[aid] = True
    # IPv6 addresses: tenant /56 + a /64 of the instance's own + a random interface id; the wide
    # rotator gets a /56 of its own (prefix delegation)
    v6_ids = np.flatnonzero(is_v6)
    subnet = np.zeros(N, np.uint64)
    for t in np.unique(tenant_of[v6_ids]).tolist():
        mine = v6_ids[tenant_of[v6_ids] == t]
        subnet[mine] = rng.choice(np.arange(1, 256, dtype=np.uint64), size=len(mine), replace=False)
    inst_hi = (np.uint64(0x26001F18) << np.uint64(32)) | (v6_slot[tenant_of].astype(np.uint64) << np.uint64(8)) | subnet
    inst_lo = rng.integers(1 << 40, 1 << 62, size=N, dtype=np.uint64)
    wide_hi: dict[int, int] = {}
    for aid, kind in abuse_kind_of.items():
        if kind == "spam_ipv6_wide":
            h = (0x26001F19 << 32) | (int(rng.integers(1, 1 << 24)) << 8)
            wide_hi[aid] = h
            inst_hi[aid] = np.uint64(h)

    # --- address pools (index space: actors, mx4, mx6, relays, web, web6, clients, clients6, admins,
    # resolvers, resolvers6, ntp, scanners, rds, rotation pools)
    taken: set[int] = set()
    # MX hosts: a few large providers over many /24s, mid-size ones, and the long tail on shared hosting
    big_hosts = rng.integers(40, 200, size=_N_BIG)
    mid_hosts = rng.integers(2, 13, size=_N_MID)
    mx_parts, w_parts, prov_parts = [], [], []
    prov = 0
    for hosts_of in (big_hosts, mid_hosts):
        for h in hosts_of.tolist():
            n_nets = max(1, -(-h // int(rng.integers(4, 12))))
            nets = _public_24s(rng, n_nets, taken)
            per = np.full(n_nets, h // n_nets)
            per[:h % n_nets] += 1
            ips = _hosts_in(rng, nets, per)
            inner = _MX_INNER_RATIO ** np.arange(len(ips))
            mx_parts.append(ips)
            w_parts.append(inner / inner.sum() / (prov + 1) ** _MX_ZIPF)
            prov_parts.append(np.full(len(ips), prov))
            prov += 1
    n_head = sum(len(x) for x in mx_parts)
    host_nets = _public_24s(rng, _N_TAIL // 6, taken)
    per = rng.integers(2, 11, size=len(host_nets))
    tail = _hosts_in(rng, host_nets, per)[:_N_TAIL]
    tail_rank = prov + 1 + rng.permutation(len(tail)) // 2
    mx_parts.append(tail)
    w_parts.append(1.0 / tail_rank.astype(np.float64) ** _MX_ZIPF / 2)
    prov_parts.append(prov + np.arange(len(tail)) // 2)
    mx_u32 = np.concatenate(mx_parts)
    mx_w = np.concatenate(w_parts)
    mx_w /= mx_w.sum()
    mx_prov = np.concatenate(prov_parts)
    n_mx = len(mx_u32)
    # IPv6 MX: every large-provider host, half the mid-size ones, a tenth of the tail
    has6 = np.zeros(n_mx, bool)
    n_big_hosts = int(big_hosts.sum())
    has6[:n_big_hosts] = True
    has6[n_big_hosts:n_head] = rng.random(n_head - n_big_hosts) < 0.5
    has6[n_head:] = rng.random(n_mx - n_head) < 0.1
    mx6_of = np.flatnonzero(has6)
    n_mx6 = len(mx6_of)
    mx6_hi = (np.uint64(0x2A00) << np.uint64(48)) | (mx_prov[mx6_of].astype(np.uint64) << np.uint64(16))
    mx6_lo = rng.integers(1, 1 << 48, size=n_mx6, dtype=np.uint64)
    mx6_w = mx_w[mx6_of] / mx_w[mx6_of].sum()

    relay_u32 = _hosts_in(rng, _public_24s(rng, 3, taken), np.array([2, 2, 2]))
    web_u32 = _hosts_in(rng, _public_24s(rng, 300, taken), rng.integers(2, 20, size=300))
    client_u32 = _hosts_in(rng, _public_24s(rng, 4000, taken), rng.integers(1, 8, size=4000))
    admin_u32 = _hosts_in(rng, _public_24s(rng, 20, taken), np.full(20, 2))
    resolver_u32 = np.array([_ip_u32(s) for s in _RESOLVERS], np.uint32)
    ntp_u32 = _hosts_in(rng, _public_24s(rng, 8, taken), np.ones(8, np.int64))
    scan_u32 = _hosts_in(rng, _public_24s(rng, 600, taken), rng.integers(1, 5, size=600))
    web6 = (np.full(500, 0x2A02 << 48, np.uint64) | rng.integers(1, 1 << 40, size=500, dtype=np.uint64),
            rng.integers(1, 1 << 63, size=500, dtype=np.uint64))
    client6 = (np.full(3000, 0x2A01 << 48, np.uint64) | rng.integers(1, 1 << 40, size=3000, dtype=np.uint64),
               rng.integers(1, 1 << 63, size=3000, dtype=np.uint64))
    res6 = [int(ipaddress.IPv6Address(s)) for s in _RESOLVERS6]
    res6_hi = np.array([x >> 64 for x in res6], np.uint64)
    res6_lo = np.array([x & ((1 << 64) - 1) for x in res6], np.uint64)

    # rotation pools of the IPv6 spammers: addresses in their /64 (or over the /64s of their /56)
    rot: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for aid, kind in abuse_kind_of.items():
        if kind == "spam_ipv6_rotating":
            rot[aid] = (np.full(_ROTATION_POOL, inst_hi[aid], np.uint64),
                        rng.integers(1 << 40, 1 << 62, size=_ROTATION_POOL, dtype=np.uint64))
        elif kind == "spam_ipv6_wide":
            rot[aid] = (np.uint64(wide_hi[aid]) | rng.integers(0, 256, size=_ROTATION_POOL, dtype=np.uint64),
                        rng.integers(1 << 40, 1 << 62, size=_ROTATION_POOL, dtype=np.uint64))

    v4_pools = [("mx4", mx_u32), ("relays", relay_u32), ("web", web_u32), ("clients", client_u32),
                ("admins", admin_u32), ("resolvers", resolver_u32), ("ntp", ntp_u32), ("scanners", scan_u32),
                ("rds", rds_u32)]
    v6_pools = [("mx6", (mx6_hi, mx6_lo)), ("web6", web6), ("clients6", client6), ("resolvers6", (res6_hi, res6_lo))]
    v6_pools += [(f"rot{aid}", pair) for aid, pair in rot.items()]
    off: dict[str, tuple[int, int]] = {}
    o = N
    for name, arr in v4_pools:
        off[name] = (o, len(arr))
        o += len(arr)
    for name, (hi_, _lo) in v6_pools:
        off[name] = (o, len(hi_))
        o += len(hi_)
    # strings and bytes of every address, in index order
    inst_str = _ip_strings(inst_u32).to_pylist()
    v6_inst = np.flatnonzero(is_v6)
    for i, s in zip(v6_inst.tolist(), _v6_strings(inst_hi[v6_inst], inst_lo[v6_inst])):
        inst_str[i] = s
    inst_bin = _v4_bytes(inst_u32)
    inst_bin[v6_inst] = _v6_bytes(inst_hi[v6_inst], inst_lo[v6_inst])
    v4_all = np.concatenate([arr for _, arr in v4_pools])
    v6_hi_all = np.concatenate([p[0] for _, p in v6_pools])
    v6_lo_all = np.concatenate([p[1] for _, p in v6_pools])
    addr = pa.concat_arrays([pa.array(inst_str, pa.string()), _ip_strings(v4_all).cast(pa.string()),
                             pa.array(_v6_strings(v6_hi_all, v6_lo_all), pa.string())])
    addr_bin = np.concatenate([inst_bin, _v4_bytes(v4_all), _v6_bytes(v6_hi_all, v6_lo_all)])
    addr_v6 = np.concatenate([is_v6, np.zeros(len(v4_all), bool), np.ones(len(v6_hi_all), bool)])
    mx_str = addr.slice(off["mx4"][0], n_mx).to_pylist()

    def prefix_of(i: int) -> str:
        if not is_v6[i]:
            return ""
        if i in wide_hi:
            return str(ipaddress.IPv6Network(((wide_hi[i] << 64), 56)))
        return str(ipaddress.IPv6Network(((int(inst_hi[i]) << 64), 64)))

    # --- identities
    enis = _hex_ids(rng, N, "eni-")
    iids = _hex_ids(rng, N, "i-")
    ten_str = np.array(accounts, dtype=object)[tenant_of]

    full_from = np.full(N, start_ms, np.int64)
    full_to = np.full(N, end_ms, np.int64)
    streams: list[_Stream] = []

    def cum(w: np.ndarray) -> np.ndarray:
        c = np.cumsum(w)
        return c / c[-1]

    def mx_table(aid: int) -> tuple[str, int, np.ndarray, np.ndarray]:
        """(pool name, universe size, weights, spam weights) of the MX an instance sends to (IPv4 or IPv6)."""
        if is_v6[aid]:
            return "mx6", n_mx6, mx6_w, spam6_p
        return "mx4", n_mx, mx_w, spam_p

    spam_p = np.sqrt(mx_w)
    spam_p /= spam_p.sum()
    spam6_p = np.sqrt(mx6_w)
    spam6_p /= spam6_p.sum()

    def own_pool(aid: int, size: int, concentrate: float = 1.0, head_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """An instance's correspondents: ``size`` MX drawn by popularity, with their weights (global indices)."""
        name, n, w, _sp = mx_table(aid)
        p = w ** concentrate
        if head_only and name == "mx4":
            p = p.copy()
            p[n_head:] = 0
        elif head_only:
            p = np.where(mx6_of < n_head, p, 0)
        p = p / p.sum()
        size = int(min(size, np.count_nonzero(p)))
        chosen = rng.choice(n, size=size, replace=False, p=p)
        return chosen + off[name][0], w[chosen] ** concentrate

    def wtargets(profile: str, aids: list[int], pools: list[tuple[np.ndarray, np.ndarray]], rate: np.ndarray,
                 act_from: np.ndarray | None = None, act_to: np.ndarray | None = None, *, rate_hi=None,
                 diurnal: bool = True, dport: np.ndarray | None = None) -> None:
        a = np.array(aids, np.int64)
        lens = np.array([len(p[0]) for p in pools], np.int64)
        segs = [i + cum(np.asarray(p[1], np.float64)) for i, p in enumerate(pools)]
        streams.append(_Stream(
            _P[profile], a, np.asarray(rate, np.float64),
            full_from[a] if act_from is None else np.asarray(act_from, np.int64),
            full_to[a] if act_to is None else np.asarray(act_to, np.int64),
            rate_hi=None if rate_hi is None else np.asarray(rate_hi, np.float64), diurnal=diurnal, dst="wtargets",
            tgt_off=np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64), tgt_len=lens,
            tgt_flat=np.concatenate([p[0] for p in pools]).astype(np.int64), tgt_cum=np.concatenate(segs),
            dport_actor=dport))

    def targets(profile: str, aids: list[int], tgts: list[np.ndarray], rate, act_from=None, act_to=None, *,
                rate_hi=None, diurnal: bool = True, dport=None, dport_choices=None) -> None:
        a = np.array(aids, np.int64)
        lens = np.array([len(t) for t in tgts], np.int64)
        streams.append(_Stream(
            _P[profile], a, np.asarray(rate, np.float64),
            full_from[a] if act_from is None else np.asarray(act_from, np.int64),
            full_to[a] if act_to is None else np.asarray(act_to, np.int64),
            rate_hi=None if rate_hi is None else np.asarray(rate_hi, np.float64), diurnal=diurnal, dst="targets",
            tgt_off=np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64), tgt_len=lens,
            tgt_flat=np.concatenate(tgts).astype(np.int64), dport_actor=dport, dport_choices=dport_choices))

    def distinct(profile: str, aid: int, lo: float, hi: float, w0: int, w1: int, *, extra: float = 0.2,
                 dport_choices=None, fresh: bool = True) -> None:
        """``lo``-``hi`` distinct servers a minute for [w0, w1): never-used ones (spam lists) from the tail."""
        name, n, _w, sp = mx_table(aid)
        a = np.array([aid], np.int64)
        st = _Stream(_P[profile], a, np.array([lo]), np.array([w0], np.int64), np.array([w1], np.int64),
                     rate_hi=np.array([hi]), diurnal=False, dst="distinct", pool=off[name], p=sp,
                     extra_frac=extra, dport_choices=dport_choices)
        if aid in rot:
            st.src_off = np.array([off[f"rot{aid}"][0]], np.int64)
            st.src_len = np.array([off[f"rot{aid}"][1]], np.int64)
        streams.append(st)

    # --- abuse windows
    def place(length: float, earliest: float) -> tuple[int, int]:
        """A window of ``length`` ms starting at least ``earliest`` ms after the start, clear of the end."""
        lo = start_ms + earliest
        hi = end_ms - 0.03 * dur_ms - length
        if hi < lo:
            hi = max(lo, end_ms - length)
        w0 = int(round(rng.uniform(lo, max(lo, hi)) / 1000)) * 1000
        w1 = w0 + int(round(length / 1000)) * 1000
        return w0, min(w1, end_ms)

    def abuse_window(kind: str) -> tuple[int, int]:
        lo_min, hi_min = _ABUSE_MINUTES[kind]
        earliest = _window_earliest_ms(kind, dur_ms, warmup_ms)
        length = min(rng.uniform(lo_min, hi_min) * MINUTE_MS, max(lo_min * MINUTE_MS, dur_ms - earliest))
        if kind == "spam_first_minute":
            w0 = start_ms + int(rng.integers(0, 60)) * 1000
            return w0, min(end_ms, w0 + int(round(length / 1000)) * 1000)
        return place(length, earliest)

    windows: dict[int, tuple[int, int]] = {}
    exempt_old: set[int] = set()
    exempt_new: set[int] = set()
    exempt_recent: set[int] = set()
    declared: dict[int, float] = {}
    targets_of: dict[int, tuple[str, ...]] = {}
    reason_of: dict[int, str] = {}
    tenant_runs: list[tuple[np.ndarray, tuple[int, int]]] = []
    next_group = iter(tenant_groups)
    n_floods = 0
    flood_variant = int(rng.integers(0, 2))
    for kind in abuse:
        if kind == "tenant_spam":
            group = next(next_group)
            w = abuse_window(kind)
            tenant_runs.append((group, w))
            for aid in group.tolist():
                windows[aid] = w
                labels[aid] = kind
    for aid, kind in abuse_kind_of.items():
        w0, w1 = windows[aid] = abuse_window(kind)
        labels[aid] = kind
        if kind in ("spam_burst", "blocked_attempts", "low_and_slow_blocked", "spam_submission"):
            roles[aid] = bg_role[aid] = "web" if kind == "spam_burst" else "worker"
        if kind == "spam_burst":
            distinct("smtp_blocked", aid, *sorted(_loguniform(rng, 30, 500, 2)), w0, w1, extra=0.3)
        elif kind == "spam_first_minute":
            roles[aid] = bg_role[aid] = "web"
            lo, hi = sorted(_loguniform(rng, 30, 500, 2))
            if rng.random() < 0.5:
                distinct("smtp_blocked", aid, lo, hi, w0, w1, extra=0.3)
            else:
                distinct("smtp_submission_spam", aid, lo, hi, w0, w1, dport_choices=np.array([587, 465]))
        elif kind == "spam_exempted_new":
            roles[aid] = "mail_server_new"
            bg_role[aid] = "mail"
            exempt_new.add(aid)
            distinct("smtp_spam_small", aid, *sorted(_loguniform(rng, 30, 500, 2)), w0, w1)
            pool = own_pool(aid, 60)
            wtargets("smtp_mx", [aid], [pool], rng.uniform(1, 5, 1))
        elif kind == "spam_submission":
            distinct("smtp_submission_spam", aid, *sorted(_loguniform(rng, 25, 300, 2)), w0, w1, extra=0.1,
                     dport_choices=np.array([587, 587, 465]))
        elif kind == "flood":
            big = np.unique(mx_prov[:n_head])
            victim = int(rng.choice(big))
            cand = np.flatnonzero(mx_prov == victim)
            k = int(min(len(cand), rng.integers(1, 4)))
            tg = np.sort(rng.choice(cand, size=k, replace=False))
            targets_of[aid] = tuple(mx_str[i] for i in tg)
            just_over = (n_floods + flood_variant) % 2 == 0
            factor = rng.uniform(1.1, 1.5) if just_over else rng.uniform(3.0, 10.0)
            if n_floods % 2 == 0:  # an established exempted mail server, port 25, with its own mail
                roles[aid] = "mail_server"
                bg_role[aid] = "mail"
                exempt_old.add(aid)
                rate = factor * flood_t_exempt
                targets("smtp_flood_accept", [aid], [tg + off["mx4"][0]], [rate], [w0], [w1], rate_hi=[rate * 1.08],
                        diurnal=False)
                wtargets("smtp_mx", [aid], [own_pool(aid, 300)], rng.uniform(5, 40, 1))
            else:  # no exemption: on 465/587, which nothing blocks
                roles[aid] = bg_role[aid] = "worker"
                rate = factor * flood_t
                targets("smtp_flood_sub", [aid], [tg + off["mx4"][0]], [rate], [w0], [w1], rate_hi=[rate * 1.08],
                        diurnal=False, dport=np.array([587 if rng.random() < 0.6 else 465]))
            n_floods += 1
        elif kind == "blocked_attempts":
            k = int(rng.integers(5, 41))
            tg = np.sort(rng.choice(n_mx, size=k, replace=False, p=mx_w))
            targets_of[aid] = tuple(mx_str[i] for i in tg)
            lo = float(rng.uniform(10, 60))
            targets("smtp_blocked", [aid], [tg + off["mx4"][0]], [lo], [w0], [w1], rate_hi=[lo * rng.uniform(1, 1.35)],
                    diurnal=False)
        elif kind in ("volume_spike", "low_and_slow_in_mail"):
            roles[aid] = "mail_server"
            bg_role[aid] = "mail"
            exempt_old.add(aid)
            r = float(rng.uniform(5, 60))
            pool = own_pool(aid, int(np.clip(r * rng.uniform(20, 40), 100, 2000)))
            wtargets("smtp_mx", [aid], [pool], [r])
            if kind == "volume_spike":
                f = float(rng.uniform(8, 15))
                wtargets("smtp_mx", [aid], [pool], [(0.4 * f - 1) * r], [w0], [w1], diurnal=False)
                distinct("smtp_mx", aid, 0.6 * f * r * 0.9, 0.6 * f * r * 1.1, w0, w1, extra=0.0)
            else:
                slot_a, slot_b = _minute_slots(w0, w1)
                per = rng.uniform(10, 50)
                n = rng.poisson(per * (slot_b - slot_a) / MINUTE_MS)
                t = rng.integers(np.repeat(slot_a, n), np.repeat(slot_b, n))
                dst = rng.choice(n_mx, size=int(n.sum()), replace=False, p=spam_p)
                streams.append(_event_stream(_P["smtp_spam_small"], np.array([aid]), t, np.zeros(len(t), np.int64),
                                             dst + off["mx4"][0]))
        elif kind in ("low_and_slow", "low_and_slow_blocked"):
            if kind == "low_and_slow":
                roles[aid] = "mail_server_new"
                bg_role[aid] = "mail"
                exempt_recent.add(aid)
            lo_n, hi_n = (3, 8) if kind == "low_and_slow" else (2, 4)
            slot_a, slot_b = _minute_slots(w0, w1)
            n = np.rint(rng.integers(lo_n, hi_n + 1, size=len(slot_a)) * (slot_b - slot_a) / MINUTE_MS).astype(np.int64)
            t = rng.integers(np.repeat(slot_a, n), np.repeat(slot_b, n))
            dst = rng.choice(n_mx, size=int(n.sum()), replace=False, p=spam_p)
            prof = "smtp_spam_small" if kind == "low_and_slow" else "smtp_blocked"
            streams.append(_event_stream(_P[prof], np.array([aid]), t, np.zeros(len(t), np.int64), dst + off["mx4"][0]))
        elif kind in ("spam_ipv6_rotating", "spam_ipv6_wide"):
            roles[aid] = "web"
            bg_role[aid] = "web6"
            lo, hi = sorted(_loguniform(rng, 30, 300, 2))
            if rng.random() < 0.5:
                distinct("smtp_blocked", aid, lo, hi, w0, w1, extra=0.2)
            else:
                distinct("smtp_submission_spam", aid, lo, hi, w0, w1, extra=0.1, dport_choices=np.array([587, 465]))

    # tenant_spam: one spam list split over the instances, 50-150 distinct servers a minute in all
    tenant_abuse: list[dict] = []
    for group, (w0, w1) in tenant_runs:
        k = len(group)
        lo_r, hi_r = max(5.0, 50.0 / k), min(25.0, 150.0 / k)
        slot_a, slot_b = _minute_slots(w0, w1)
        frac = (slot_b - slot_a) / MINUTE_MS
        n = np.rint(rng.uniform(lo_r, hi_r, size=(len(slot_a), k)) * frac[:, None]).astype(np.int64)
        dst = np.concatenate([rng.choice(n_mx, size=int(row.sum()), replace=False, p=spam_p) for row in n])
        per_slot = n.sum(axis=1)
        t = rng.integers(np.repeat(slot_a, per_slot), np.repeat(slot_b, per_slot))
        local = np.concatenate([np.repeat(np.arange(k), row) for row in n])
        streams.append(_event_stream(_P["smtp_blocked"], group.astype(np.int64), t, local, dst + off["mx4"][0]))
        tenant_abuse.append({"tenant": ten_str[group[0]], "label": "tenant_spam",
                             "instances": [inst_str[i] for i in group.tolist()],
                             "abuse_start_ms": w0, "abuse_end_ms": w1,
                             "abuse_start": _iso_ms(w0), "abuse_end": _iso_ms(w1)})

    # --- benign kinds
    episodes: list[tuple[int, str, int, int]] = []
    R = RANGES
    ids = kind_ids["submission"].tolist()
    if ids:
        relays = [off["relays"][0] + rng.choice(off["relays"][1], size=int(rng.integers(1, 4)), replace=False)
                  for _ in ids]
        targets("smtp_submission", ids, relays, _spread(rng, *R["submission"]["rate"], len(ids)),
                dport=np.where(rng.random(len(ids)) < 0.8, 587, 465).astype(np.int64))
    ids = kind_ids["misconfigured_app"].tolist()
    if ids:
        tg = [rng.choice(n_mx, size=int(rng.integers(1, 4)), replace=False, p=mx_w) for _ in ids]
        for aid, t in zip(ids, tg):
            targets_of[aid] = tuple(mx_str[i] for i in t)
        a_from, a_to = full_from[ids].copy(), full_to[ids].copy()
        for j, aid in enumerate(ids):
            if rng.random() < 0.3:  # a retry storm of 10-120 minutes, else all along
                w0, w1 = place(min(rng.uniform(10, 120) * MINUTE_MS, dur_ms), 0)
                a_from[j], a_to[j] = w0, w1
                episodes.append((aid, "misconfigured_app", w0, w1))
        targets("smtp_blocked", ids, [t + off["mx4"][0] for t in tg], _spread(rng, *R["misconfigured_app"]["rate"], len(ids)),
                a_from, a_to, diurnal=False)
    for kind in ("mail_server", "transactional", "esp_high_volume", "new_mail_server_declared"):
        ids = kind_ids[kind].tolist()
        if not ids:
            continue
        if kind == "new_mail_server_declared":
            dec = _spread(rng, *R[kind]["declared"], len(ids))
            rates = dec * rng.uniform(*R[kind]["share"], len(ids))
            for aid, d in zip(ids, dec):
                declared[aid] = float(round(d))
            sizes_ = np.clip(rates * 30, 50, 20000)
        else:
            rates = _spread(rng, *R[kind]["rate"], len(ids))
            if kind == "mail_server":
                sizes_ = np.clip(rates * rng.uniform(20, 60, len(ids)), *R[kind]["pool"])
            else:
                sizes_ = _spread(rng, *R[kind]["pool"], len(ids))
        pools = [own_pool(aid, int(s), concentrate=1.5 if kind == "transactional" else 1.0,
                          head_only=kind == "transactional") for aid, s in zip(ids, sizes_)]
        wtargets("smtp_mx", ids, pools, rates)
    ids = kind_ids["mailing_list"].tolist()
    for aid in ids:
        # a post goes to every member: each member's server gets at least one connection per post
        rr = R["mailing_list"]
        pool, pw = own_pool(aid, int(_spread(rng, *rr["pool"], 1)[0]))
        wtargets("smtp_mx", [aid], [(pool, pw)], _loguniform(rng, *rr["rate"], 1))
        period = rng.uniform(*rr["period_min"]) * MINUTE_MS
        t = start_ms + rng.uniform(0, period)
        rate = float(_loguniform(rng, *rr["burst_rate"], 1)[0])
        ev_t, ev_d = [], []
        while t < end_ms:
            length = rng.uniform(*rr["burst_min"]) * MINUTE_MS
            b1 = min(int(t + length), end_ms)
            per = np.maximum(1, rng.poisson(pw / pw.sum() * rate * length / MINUTE_MS))
            ev_d.append(np.repeat(pool, per))
            ev_t.append(rng.integers(int(t), max(int(t) + 1, b1), size=int(per.sum())))
            episodes.append((aid, "mailing_list", int(t), b1))
            t += period
        if not ev_t:
            continue  # a scenario shorter than the list's first post
        et, ed = np.concatenate(ev_t), np.concatenate(ev_d)
        keep = et < end_ms
        streams.append(_event_stream(_P["smtp_mx"], np.array([aid]), et[keep], np.zeros(int(keep.sum()), np.int64),
                                     ed[keep]))
    ids = kind_ids["newsletter"].tolist()
    for aid in ids:
        rr = R["newsletter"]
        pool = own_pool(aid, int(_spread(rng, *rr["pool"], 1)[0]))
        wtargets("smtp_mx", [aid], [pool], _loguniform(rng, *rr["rate"], 1))
        period = rng.uniform(*rr["period_min"]) * MINUTE_MS
        t = start_ms + rng.uniform(0, period)
        while t < end_ms:
            b1 = min(int(t + rng.uniform(*rr["burst_min"]) * MINUTE_MS), end_ms)
            d = float(_loguniform(rng, *rr["burst_distinct"], 1)[0])
            distinct("smtp_mx", aid, 0.9 * d, 1.1 * d, int(t), b1, extra=0.5)
            episodes.append((aid, "newsletter", int(t), b1))
            t += period
    ids = kind_ids["backup_mx"].tolist()
    if ids:
        tg = [rng.choice(n_mx, size=int(rng.integers(*R["backup_mx"]["targets"], endpoint=True)), replace=False)
              for _ in ids]
        for aid, t in zip(ids, tg):
            targets_of[aid] = tuple(mx_str[i] for i in t)
        targets("smtp_mx", ids, [t + off["mx4"][0] for t in tg], _spread(rng, *R["backup_mx"]["rate"], len(ids)))
    ids = kind_ids["app_retry"].tolist()
    for aid in ids:
        rr = R["app_retry"]
        wtargets("smtp_mx", [aid], [own_pool(aid, int(rng.integers(50, 300)))], _loguniform(rng, *rr["rate"], 1))
        tg = int(rng.choice(n_mx, p=mx_w))
        targets_of[aid] = (mx_str[tg],)
        w0, w1 = place(rng.uniform(*rr["retry_min"]) * MINUTE_MS, 0)
        episodes.append((aid, "app_retry", w0, w1))
        rate = float(_loguniform(rng, *rr["retry_rate"], 1)[0])
        targets("smtp_retry", [aid], [np.array([tg + off["mx4"][0]])], [rate], [w0], [w1], rate_hi=[rate * 1.2],
                diurnal=False)
    episodes.sort(key=lambda e: (e[2], e[0]))
    for kind in ("mail_server", "transactional", "esp_high_volume", "mailing_list", "newsletter", "backup_mx", "app_retry"):
        exempt_old.update(kind_ids[kind].tolist())
        for aid in kind_ids[kind].tolist():
            reason_of[aid] = _KIND_REASONS.get(kind, "")

    # --- background traffic, one stream per profile and address family
    bg_pool = {"https_out": "web", "http_out": "web", "dns": "resolvers", "ntp": "ntp",
               "https_in": "clients", "http_in": "clients", "ssh_in": "admins", "scan_in": "scanners",
               "icmp_in": "clients"}
    bg_role6 = np.where(is_v6, "web6", bg_role).astype(object)
    for prof in ("https_out", "http_out", "dns", "ntp", "postgres_out", "mysql_out", "https_in", "http_in",
                 "ssh_in", "scan_in", "icmp_in"):
        for fam in ("4", "6"):
            ids_, rates = [], []
            for role, table in _ROLE_RATES.items():
                if prof not in table or (role == "web6") != (fam == "6"):
                    continue
                members = np.flatnonzero(bg_role6 == role)
                if len(members):
                    ids_.append(members)
                    rates.append(_loguniform(rng, *table[prof], len(members)))
            if not ids_:
                continue
            a = np.concatenate(ids_)
            order = np.argsort(a, kind="stable")
            a, r = a[order], np.concatenate(rates)[order]
            st = _Stream(_P[prof], a, r, full_from[a], full_to[a])
            if prof in ("postgres_out", "mysql_out"):
                st.dst = "rds"
            else:
                st.pool = off[bg_pool[prof] + ("6" if fam == "6" else "")]
                if prof == "scan_in":
                    st.dport_choices = _SCAN_PORTS
                    st.diurnal = False
            streams.append(st)

    # --- exemptions
    exemptions: list[Exemption] = []

    def exempt_key(aid: int) -> str:
        # IPv6 senders are exempted by their /64 or by their address (both appear in real registries)
        if is_v6[aid] and rng.random() < 0.5:
            return prefix_of(aid)
        return inst_str[aid]

    for aid in sorted(exempt_old):
        days = float(rng.uniform(30, 900))
        granted = dt.datetime.fromtimestamp(start_ms / 1000 - days * 86400, dt.timezone.utc).replace(microsecond=0)
        reason = reason_of.get(aid) or _MAIL_REASONS[int(rng.integers(len(_MAIL_REASONS)))]
        exemptions.append(Exemption(exempt_key(aid), ten_str[aid], granted, reason))
    for aid in sorted(exempt_new):
        hours = float(rng.uniform(1, 48))
        granted = dt.datetime.fromtimestamp(start_ms / 1000 - hours * 3600, dt.timezone.utc).replace(microsecond=0)
        exemptions.append(Exemption(exempt_key(aid), ten_str[aid], granted, "new marketing mailer"))
    for aid in sorted(exempt_recent):
        hours = float(rng.uniform(24, 72))
        granted = dt.datetime.fromtimestamp(start_ms / 1000 - hours * 3600, dt.timezone.utc).replace(microsecond=0)
        exemptions.append(Exemption(exempt_key(aid), ten_str[aid], granted, "new customer MTA"))
    for aid, d in sorted(declared.items()):
        days = float(rng.uniform(1, 5))
        granted = dt.datetime.fromtimestamp(start_ms / 1000 - days * 86400, dt.timezone.utc).replace(microsecond=0)
        exemptions.append(Exemption(exempt_key(aid), ten_str[aid], granted, _KIND_REASONS["new_mail_server_declared"], d))
    # stale exemptions of decommissioned servers (no traffic)
    for _ in range(2):
        t = int(rng.integers(n_ten))
        ip = int(vpc_base[t] + 1020 + rng.integers(0, 3))  # above instances (10-999) and databases (1000-1019)
        days = float(rng.uniform(200, 1500))
        granted = dt.datetime.fromtimestamp(start_ms / 1000 - days * 86400, dt.timezone.utc).replace(microsecond=0)
        exemptions.append(Exemption(_ip_strings(np.array([ip]))[0].as_py(), accounts[t], granted,
                                    "legacy relay (decommissioned)"))
    exemptions.sort(key=lambda e: (e.granted_at, e.ip))

    # --- actors
    exempted = exempt_old | exempt_new | exempt_recent | set(declared)
    actors = []
    for i in range(N):
        w = windows.get(i)
        actors.append(Actor(
            ip=inst_str[i], tenant=ten_str[i], instance_id=iids[i], kind=str(roles[i]), label=str(labels[i]),
            interface_id=enis[i], exempted=i in exempted, prefix=prefix_of(i), declared_conns_per_min=declared.get(i),
            abuse_start_ms=w[0] if w else None, abuse_end_ms=w[1] if w else None,
            targets=targets_of.get(i, ()),
        ))

    # --- output tables
    prefix = pa.array([f"{FORMAT_VERSION} {ten_str[i]} {enis[i]}" for i in range(N)])
    suffix = pa.array([f"{act} OK {iids[i]}" for i in range(N) for act in ("ACCEPT", "REJECT")])

    # mean diurnal factor over the scenario (for the line estimate)
    mins = np.arange(start_ms, end_ms, MINUTE_MS, dtype=np.int64)
    d_mean = float(_diurnal(mins - mins % MINUTE_MS).mean())
    per_min = 0.0
    for st in streams:
        rev = float(_PT.rev_prob[st.profile])
        per_min += st.expected_per_min(dur_ms) * (1 + rev) * (d_mean if st.diurnal and st.rate_hi is None else 1.0)
    expected = int(per_min * dur_ms / MINUTE_MS)
    # chunks: whole minutes, at most ~300k lines each
    minutes = 10
    for m in (10, 5, 2, 1):
        minutes = m
        if per_min * m <= 300_000:
            break
    chunk_ms = minutes * MINUTE_MS
    chunk0 = start_ms - start_ms % chunk_ms
    n_chunks = -(-(end_ms - chunk0) // chunk_ms)
    plan = _Plan(int(seed), start_ms, end_ms, chunk_ms, chunk0, int(n_chunks), addr, addr_bin, addr_v6, prefix, suffix,
                 tenant_of.astype(np.int64), (off["rds"][0] + np.arange(n_ten)).astype(np.int64), streams,
                 late_fraction, late_lo * 1000, late_hi * 1000)
    episode_dicts = [{"ip": inst_str[aid], "kind": kind, "start_ms": e0, "end_ms": e1,
                      "start": _iso_ms(e0), "end": _iso_ms(e1)} for aid, kind, e0, e1 in episodes]
    return Scenario(int(seed), start_ms, end_ms, actors, exemptions, FIELDS, expected, abuse=abuse,
                    warmup_s=warmup_s, late_fraction=late_fraction, late_delay_s=(late_lo, late_hi),
                    tenant_abuse=tenant_abuse, episodes=episode_dicts, _plan=plan)


def _minute_slots(w0: int, w1: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts of [w0, w1) in each calendar minute, as (from, to) arrays in epoch ms."""
    m = np.arange(w0 - w0 % MINUTE_MS, w1, MINUTE_MS, dtype=np.int64)
    a, b = np.maximum(m, w0), np.minimum(m + MINUTE_MS, w1)
    keep = b > a
    return a[keep], b[keep]


def _event_stream(profile: int, actors: np.ndarray, t: np.ndarray, local: np.ndarray, dst: np.ndarray) -> _Stream:
    """A stream of connections fixed at plan time: (time, actor, remote address) per event."""
    order = np.argsort(t, kind="stable")
    n = len(actors)
    return _Stream(profile, actors, np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64),
                   ev_t=t[order].astype(np.int64), ev_local=local[order].astype(np.int64),
                   ev_dst=dst[order].astype(np.int64))


# ---------------------------------------------------------------------------
# chunk generation (vectorised)


def _stream_rows(rng: np.random.Generator, st: _Stream, plan: _Plan, lo: int, hi: int,
                 slot_lo: np.ndarray, slot_hi: np.ndarray, diurnal: np.ndarray):
    """Connections of one stream in [lo, hi): (actor, t_ms, remote address index, dport or None, source
    address index or None: the actor's own address)."""
    if st.ev_t is not None:
        i0, i1 = np.searchsorted(st.ev_t, [lo, hi])
        local = st.ev_local[i0:i1]
        t = st.ev_t[i0:i1]
        dst_fixed = None if st.ev_dst is None else st.ev_dst[i0:i1]
    else:
        A, S = len(st.actors), len(slot_lo)
        s_lo = np.maximum(slot_lo[None, :], st.act_from[:, None])
        s_hi = np.minimum(slot_hi[None, :], st.act_to[:, None])
        span = np.maximum(s_hi - s_lo, 0)
        if not span.any():
            return None
        frac = span / MINUTE_MS
        if st.rate_hi is None:
            lam = st.rate[:, None] * frac
            if st.diurnal:
                lam = lam * diurnal[None, :]
            n = rng.poisson(lam)
        else:
            n = np.rint(rng.uniform(st.rate[:, None], st.rate_hi[:, None], size=(A, S)) * frac).astype(np.int64)
        if st.cap:
            np.minimum(n, st.cap, out=n)
        n_flat = n.ravel()
        dst_fixed = None
        if st.dst == "distinct":
            cells, dsts = [], []
            po, pl = st.pool
            for c in np.flatnonzero(n_flat).tolist():
                k = int(min(n_flat[c], pl))
                d = rng.choice(pl, size=k, replace=False, p=st.p)
                extra = int(k * rng.uniform(st.extra_lo, st.extra_frac))
                if extra:
                    d = np.concatenate([d, d[rng.integers(0, k, size=extra)]])
                cells.append(np.full(len(d), c))
                dsts.append(d + po)
            if not cells:
                return None
            cell = np.concatenate(cells)
            dst_fixed = np.concatenate(dsts).astype(np.int64)
        else:
            cell = np.repeat(np.arange(n_flat.size), n_flat)
        if cell.size == 0:
            return None
        local = cell // S
        t = s_lo.ravel()[cell] + (rng.random(cell.size) * span.ravel()[cell]).astype(np.int64)
    m = len(local)
    if m == 0:
        return None
    actor = st.actors[local]
    if dst_fixed is not None:
        remote = dst_fixed
    elif st.dst == "pool":
        remote = st.pool[0] + rng.integers(0, st.pool[1], size=m)
    elif st.dst == "weighted":
        remote = st.pool[0] + np.minimum(np.searchsorted(st.cum, rng.random(m), side="right"), st.pool[1] - 1)
    elif st.dst == "targets":
        remote = st.tgt_flat[st.tgt_off[local] + (rng.random(m) * st.tgt_len[local]).astype(np.int64)]
    elif st.dst == "wtargets":
        pos = np.searchsorted(st.tgt_cum, local + rng.random(m), side="right")
        remote = st.tgt_flat[np.minimum(pos, st.tgt_off[local] + st.tgt_len[local] - 1)]
    elif st.dst == "rds":
        remote = plan.rds_of_tenant[plan.tenant_of[actor]]
    else:  # pragma: no cover
        raise AssertionError(st.dst)
    if st.dport_actor is not None:
        dport = st.dport_actor[local]
    elif st.dport_choices is not None:
        dport = st.dport_choices[rng.integers(0, len(st.dport_choices), size=m)]
    else:
        dport = None
    src = None
    if st.src_off is not None:  # a new source address from the actor's rotation pool for every connection
        src = st.src_off[local] + (rng.random(m) * st.src_len[local]).astype(np.int64)
    return actor, t.astype(np.int64), remote.astype(np.int64), dport, src


def _diurnal(slot_start_ms: np.ndarray) -> np.ndarray:
    """Traffic factor of each minute slot: 0.7-1.3, busiest around 14:00 UTC."""
    hours = ((slot_start_ms + MINUTE_MS // 2) % 86_400_000) / 3_600_000
    return 1.0 + 0.3 * np.sin(2 * np.pi * (hours - 8.0) / 24.0)


def _chunk_columns(plan: _Plan, ci: int) -> dict[str, np.ndarray] | None:
    """All flow lines of chunk ``ci`` as sorted numpy columns (or None if empty)."""
    c_lo = plan.chunk0_ms + ci * plan.chunk_ms
    lo, hi = max(c_lo, plan.start_ms), min(c_lo + plan.chunk_ms, plan.end_ms)
    if hi <= lo:
        return None
    rng = np.random.default_rng([plan.seed & 0xFFFFFFFF, plan.seed >> 32 & 0xFFFFFFFF, 1, ci])
    slots = np.arange(c_lo, c_lo + plan.chunk_ms, MINUTE_MS, dtype=np.int64)
    slot_lo = np.maximum(slots, plan.start_ms)
    slot_hi = np.minimum(slots + MINUTE_MS, plan.end_ms)
    diurnal = _diurnal(slots)

    parts = []
    for si, st in enumerate(plan.streams):
        r = _stream_rows(rng, st, plan, lo, hi, slot_lo, slot_hi, diurnal)
        if r is None:
            continue
        actor, t, remote, dport, own = r
        prof = np.full(len(actor), st.profile, np.int64)
        if dport is None:
            dport = _PT.port[prof]
        if own is None:
            own = actor
        parts.append((actor, t, remote, dport, prof, own))
    if not parts:
        return None
    actor, t, remote, dport, prof, own = (np.concatenate(x) for x in zip(*parts))
    n = len(actor)

    PT = _PT
    inbound = PT.inbound[prof]
    proto = PT.proto[prof]
    src = np.where(inbound, remote, own)
    dst = np.where(inbound, own, remote)
    eph_inst = rng.integers(32768, 61000, size=n)
    # internet clients: mostly the IANA dynamic range, some (NAT, older stacks) wider, never an SMTP port
    eph_net = np.where(rng.random(n) < 0.7, rng.integers(49152, 65536, size=n), rng.integers(10000, 65536, size=n))
    sport = np.where(inbound, eph_net, eph_inst)
    icmp = proto == 1
    sport[icmp] = 0
    dport = np.where(icmp, 0, dport)

    pk = np.rint(np.exp(PT.log_pk_med[prof] + PT.pk_sig[prof] * rng.standard_normal(n)))
    pk = np.clip(pk, PT.pk_lo[prof], PT.pk_hi[prof]).astype(np.int64)
    by = pk * rng.integers(PT.bpp_lo[prof], PT.bpp_hi[prof] + 1)
    dur = np.clip(np.rint(np.exp(PT.log_dur_med[prof] + PT.dur_sig[prof] * rng.standard_normal(n))), 0, 59).astype(np.int64)
    start_s = t // 1000
    end_s = start_s + dur
    action = PT.action[prof]
    flags = np.where(rng.random(n) < PT.p_fwd_alt[prof], PT.f_fwd_alt[prof], PT.f_fwd[prof])

    rev = rng.random(n) < PT.rev_prob[prof]
    ri = np.flatnonzero(rev)
    rp = prof[ri]
    r_pk = np.maximum(1, np.rint(pk[ri] * PT.rev_ratio[rp] * rng.uniform(0.7, 1.3, size=len(ri)))).astype(np.int64)
    r_pk = np.where(PT.proto[rp] == 6, r_pk, pk[ri])
    r_by = r_pk * rng.integers(PT.rbpp_lo[rp], PT.rbpp_hi[rp] + 1)
    r_flags = np.where(rng.random(len(ri)) < PT.p_rev_alt[rp], PT.f_rev_alt[rp], PT.f_rev[rp])

    cols = {
        "actor": np.concatenate([actor, actor[ri]]),
        "src": np.concatenate([src, dst[ri]]),
        "dst": np.concatenate([dst, src[ri]]),
        "sport": np.concatenate([sport, dport[ri]]),
        "dport": np.concatenate([dport, sport[ri]]),
        "proto": np.concatenate([proto, proto[ri]]),
        "packets": np.concatenate([pk, r_pk]),
        "bytes": np.concatenate([by, r_by]),
        "start": np.concatenate([start_s, start_s[ri]]),
        "end": np.concatenate([end_s, end_s[ri]]),
        "action": np.concatenate([action, action[ri]]),
        "flags": np.concatenate([flags, r_flags]),
    }
    key = np.concatenate([t, t[ri]]) + rng.integers(0, JITTER_MS, size=n + len(ri))
    cols["key"] = key
    order = np.argsort(key, kind="stable")
    return {k: v[order] for k, v in cols.items()}


def _format(plan: _Plan, c: dict[str, np.ndarray]) -> pa.Array:
    """Columns -> one string per line, each ending in a newline (contiguous in one buffer)."""
    def num(a: np.ndarray) -> pa.Array:
        return pa.array(a).cast(pa.string())

    return pc.binary_join_element_wise(
        plan.prefix.take(pa.array(c["actor"])),
        plan.addr.take(pa.array(c["src"])),
        plan.addr.take(pa.array(c["dst"])),
        num(c["sport"]), num(c["dport"]),
        _SMALL_INT.take(pa.array(c["proto"])),
        num(c["packets"]), num(c["bytes"]), num(c["start"]), num(c["end"]),
        plan.suffix.take(pa.array(c["actor"] * 2 + c["action"])),
        _FLAGS_NL.take(pa.array(c["flags"])),
        " ",
    )


def _buffer(lines: pa.Array, upto: int | None = None) -> memoryview:
    """The text of ``lines[:upto]`` as one memoryview (no copy)."""
    n = len(lines) if upto is None else min(upto, len(lines))
    offs = np.frombuffer(lines.buffers()[1], dtype=np.int32, count=len(lines) + 1, offset=lines.offset * 4)
    return memoryview(lines.buffers()[2])[int(offs[0]):int(offs[n])]


def _blocks(scenario: Scenario) -> Iterator[pa.Array]:
    plan = scenario._plan
    if plan is None:
        raise ValueError("scenario has no plan (make it with generate())")
    if plan.late_fraction <= 0:
        for ci in range(plan.n_chunks):
            cols = _chunk_columns(plan, ci)
            if cols is not None:
                yield _format(plan, cols)
        return
    # Late lines: their delivery key moves on by the delay. Those whose key passes the end of
    # their chunk wait and are merged into the chunk their key falls in (or written last).
    held: dict[str, np.ndarray] | None = None
    for ci in range(plan.n_chunks):
        parts = []
        cols = _chunk_columns(plan, ci)
        if cols is not None:
            # a generator of its own, so the lines are the same as without late delivery
            rng = np.random.default_rng([plan.seed & 0xFFFFFFFF, plan.seed >> 32 & 0xFFFFFFFF, 2, ci])
            n = len(cols["key"])
            late = rng.random(n) < plan.late_fraction
            cols["key"] = cols["key"] + np.where(late, rng.integers(plan.late_lo_ms, plan.late_hi_ms + 1, size=n), 0)
            parts.append(_rows(cols, ~late))
            held = _rows(cols, late) if held is None else _concat(held, _rows(cols, late))
        if held is not None:
            due = held["key"] < plan.chunk0_ms + (ci + 1) * plan.chunk_ms
            parts.append(_rows(held, due))
            held = _rows(held, ~due)
        if parts:
            block = _concat(*parts)
            if len(block["key"]):
                yield _format(plan, _rows(block, np.argsort(block["key"], kind="stable")))
    if held is not None and len(held["key"]):
        yield _format(plan, _rows(held, np.argsort(held["key"], kind="stable")))


def _rows(cols: dict[str, np.ndarray], sel: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[sel] for k, v in cols.items()}


def _concat(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def iter_chunks(scenario: Scenario, *, header: bool = True) -> Iterator[bytes]:
    """flows.log as byte blocks of whole newline-terminated lines, header first."""
    if header:
        yield (scenario.header + "\n").encode()
    for lines in _blocks(scenario):
        yield bytes(_buffer(lines))


def iter_lines(scenario: Scenario, *, header: bool = True) -> Iterator[str]:
    """The lines of flows.log in output order (header first), without newlines, streaming."""
    if header:
        yield scenario.header
    for lines in _blocks(scenario):
        text = bytes(_buffer(lines)).decode("ascii")
        yield from text[:-1].split("\n")


def _write_flows(scenario: Scenario, path: Path, gz: bool, limit: int | None = None) -> int:
    n = 0
    with open(path, "wb", buffering=1 << 20) as raw:
        # gzip: fixed mtime and no file name in its header, so output is byte-identical
        f: IO[bytes] = gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) if gz else raw
        try:
            f.write((scenario.header + "\n").encode())
            for lines in _blocks(scenario):
                if limit is not None and n + len(lines) >= limit:
                    f.write(_buffer(lines, limit - n))
                    n = limit
                    break
                f.write(_buffer(lines))
                n += len(lines)
        finally:
            if gz:
                f.close()
    return n


def write(scenario: Scenario, out_dir: Path | str, *, gzip: bool = False, netflow: bool = False) -> dict[str, Path]:
    """Write flows.log (or flows.log.gz), exemptions.csv, inventory.csv, truth.json and scenario.json
    into ``out_dir``; with ``netflow`` also netflow.pcap, the same flows exported as NetFlow v9."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "flows": out / ("flows.log.gz" if gzip else "flows.log"),
        "exemptions": out / "exemptions.csv",
        "inventory": out / "inventory.csv",
        "truth": out / "truth.json",
        "scenario": out / "scenario.json",
    }
    lines = _write_flows(scenario, paths["flows"], gzip)
    paths["exemptions"].write_text(scenario.exemptions_csv())
    paths["inventory"].write_text(scenario.inventory_csv())
    paths["truth"].write_text(json.dumps(scenario.truth(), indent=1) + "\n")
    meta = scenario.meta()
    meta["lines"] = lines
    if netflow:
        paths["netflow"] = out / "netflow.pcap"
        meta["netflow_flows"] = write_netflow(scenario, paths["netflow"])
    paths["scenario"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths


# ---------------------------------------------------------------------------
# NetFlow v9 re-export of the same flows

#: (field type, length) of the two data templates: IPv4 (256) and IPv6 (257)
_NF_COMMON = ((1, 4), (2, 4), (4, 1), (6, 1), (7, 2), (10, 2), (11, 2), (21, 4), (22, 4), (89, 1))
_NF_TEMPLATES = {256: ((8, 4), (12, 4)) + _NF_COMMON, 257: ((27, 16), (28, 16)) + _NF_COMMON}
_NF_DTYPES = {
    tid: np.dtype([(f"f{ft}", f">u{ln}" if ln in (1, 2, 4) else (np.uint8, ln)) for ft, ln in fields])
    for tid, fields in _NF_TEMPLATES.items()}
_NF_TEMPLATE_FLOWSET = b"".join(
    struct.pack(">HH", tid, len(f)) + b"".join(struct.pack(">HH", ft, ln) for ft, ln in f)
    for tid, f in _NF_TEMPLATES.items())
_NF_TEMPLATE_FLOWSET = struct.pack(">HH", 0, 4 + len(_NF_TEMPLATE_FLOWSET)) + _NF_TEMPLATE_FLOWSET
#: forwardingStatus (RFC 7270): forwarded (64), dropped for an ACL deny (128 + 2)
_NF_FORWARDED, _NF_DROPPED = 64, 130
_NF_RECORDS_PER_PACKET = 24
_NF_TEMPLATE_EVERY = 20
_NF_EXPORTER = (bytes([10, 255, 0, 1]), bytes([10, 255, 0, 2]), 2055)


def _netflow_columns(plan: _Plan, ci: int) -> dict[str, np.ndarray] | None:
    """The flows of chunk ``ci`` as NetFlow columns, ordered by export time (end + up to 15 s)."""
    c = _chunk_columns(plan, ci)
    if c is None:
        return None
    rng = np.random.default_rng([plan.seed & 0xFFFFFFFF, plan.seed >> 32 & 0xFFFFFFFF, 3, ci])
    n = len(c["start"])
    # whole seconds of export time, so that uptime arithmetic loses nothing
    export_ms = (c["end"] * 1000 + rng.integers(1000, NETFLOW_EXPORT_DELAY_MS + 1, size=n)) // 1000 * 1000
    order = np.argsort(export_ms, kind="stable")
    out = {k: v[order] for k, v in c.items()}
    out["export_ms"] = export_ms[order]
    return out


def write_netflow(scenario: Scenario, path: Path | str) -> int:
    """The scenario's flows (both directions, as in flows.log) as a pcap of NetFlow v9 export packets
    from one exporter (an IPv4 and an IPv6 template, resent every 20 packets; forwardingStatus says
    forwarded or dropped; the input ifIndex is the instance's). Returns the number of flow records.

    The exporter's clock starts ten days before the scenario; records are exported 1-15 s after
    they end, so their order is by end, not start, as a router's flow cache exports them.
    """
    plan = scenario._plan
    if plan is None:
        raise ValueError("scenario has no plan (make it with generate())")
    boot_ms = plan.start_ms - 10 * 86_400_000
    src_ip, dst_ip, port = _NF_EXPORTER
    flows = 0
    seq = 0
    with open(path, "wb", buffering=1 << 20) as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ci in range(plan.n_chunks):
            c = _netflow_columns(plan, ci)
            if c is None:
                continue
            n = len(c["start"])
            flows += n
            v6 = plan.addr_v6[c["src"]]
            recs = {}
            for tid, sel in ((256, ~v6), (257, v6)):
                idx = np.flatnonzero(sel)
                r = np.zeros(len(idx), _NF_DTYPES[tid])
                if tid == 256:
                    r["f8"] = plan.addr_bin[c["src"][idx], 12:].copy().view(">u4").ravel()
                    r["f12"] = plan.addr_bin[c["dst"][idx], 12:].copy().view(">u4").ravel()
                else:
                    r["f27"] = plan.addr_bin[c["src"][idx]]
                    r["f28"] = plan.addr_bin[c["dst"][idx]]
                r["f1"] = np.minimum(c["bytes"][idx], 0xFFFFFFFF)
                r["f2"] = np.minimum(c["packets"][idx], 0xFFFFFFFF)
                r["f4"] = c["proto"][idx]
                r["f6"] = c["flags"][idx] & 0xFF
                r["f7"] = c["sport"][idx]
                r["f10"] = c["actor"][idx] % 65535 + 1
                r["f11"] = c["dport"][idx]
                r["f21"] = c["end"][idx] * 1000 - boot_ms
                r["f22"] = c["start"][idx] * 1000 - boot_ms
                r["f89"] = np.where(c["action"][idx] == REJECT, _NF_DROPPED, _NF_FORWARDED)
                recs[tid] = (idx, r)
            # packets of up to 24 records in export order, each with one data flowset per family it holds
            pos_of = {tid: np.searchsorted(idx, np.arange(n)) for tid, (idx, _r) in recs.items()}
            for lo in range(0, n, _NF_RECORDS_PER_PACKET):
                hi = min(lo + _NF_RECORDS_PER_PACKET, n)
                export_ms = int(c["export_ms"][hi - 1])
                body = []
                count = 0
                if seq % _NF_TEMPLATE_EVERY == 0:
                    body.append(_NF_TEMPLATE_FLOWSET)
                    count += len(_NF_TEMPLATES)
                for tid, (idx, r) in recs.items():
                    a, b = int(pos_of[tid][lo]), int(pos_of[tid][hi]) if hi < n else len(idx)
                    if b <= a:
                        continue
                    data = r[a:b].tobytes()
                    pad = -(4 + len(data)) % 4
                    body.append(struct.pack(">HH", tid, 4 + len(data) + pad) + data + b"\0" * pad)
                    count += b - a
                payload = struct.pack(">HHIIII", 9, count, (export_ms - boot_ms) & 0xFFFFFFFF, export_ms // 1000,
                                      seq, 0) + b"".join(body)
                seq += 1
                fh.write(_udp_frame(payload, src_ip, dst_ip, port, export_ms))
    return flows


# ---------------------------------------------------------------------------
# sFlow v5 re-export of the same traffic, packet-sampled 1 in N

#: sFlow flow samples per datagram (an agent sends a datagram when it has a few, or every second)
_SF_SAMPLES_PER_DATAGRAM = 8
#: a sample reaches the collector this long after its packet (the agent's batching)
_SF_EXPORT_DELAY_MS = 100
_SF_AGENT = (bytes([10, 255, 0, 3]), bytes([10, 255, 0, 2]), 6343)
#: output ifIndex of a packet the switch discarded (sFlow v5: format 1 in the top bits, a reason code)
_SF_DISCARDED = 0x40000000 | 258
_SF_ACK, _SF_ACKPSH = 0x10, 0x18


def _sf_dtype(v6: bool) -> np.dtype:
    """One flow sample (format 1) with one raw packet header record (Ethernet, IP, TCP/UDP), as written."""
    ip = ([("ip_vtc", ">u4"), ("ip_plen", ">u2"), ("ip_next", "u1"), ("ip_hop", "u1"),
           ("ip_src", "u1", 16), ("ip_dst", "u1", 16)] if v6 else
          [("ip_vhl", "u1"), ("ip_tos", "u1"), ("ip_len", ">u2"), ("ip_id", ">u2"), ("ip_frag", ">u2"),
           ("ip_ttl", "u1"), ("ip_proto", "u1"), ("ip_sum", ">u2"), ("ip_src", ">u4"), ("ip_dst", ">u4")])
    return np.dtype([("fmt", ">u4"), ("len", ">u4"),
                     ("seq", ">u4"), ("source_id", ">u4"), ("rate", ">u4"), ("pool", ">u4"), ("drops", ">u4"),
                     ("input", ">u4"), ("output", ">u4"), ("n_records", ">u4"),
                     ("rec_fmt", ">u4"), ("rec_len", ">u4"),
                     ("h_proto", ">u4"), ("frame_len", ">u4"), ("stripped", ">u4"), ("h_len", ">u4"),
                     ("eth", "u1", 12), ("etype", ">u2"), *ip,
                     ("sport", ">u2"), ("dport", ">u2"), ("tcp_seq", ">u4"), ("tcp_ack", ">u4"),
                     ("tcp_off", "u1"), ("tcp_flags", "u1"), ("tcp_win", ">u2"), ("tcp_sum", ">u2"),
                     ("tcp_urg", ">u2"), ("pad", "u1", 2)])


_SF_DTYPES = {False: _sf_dtype(False), True: _sf_dtype(True)}


def _sflow_samples(plan: _Plan, ci: int, rate: int) -> dict[str, np.ndarray] | None:
    """The packets of chunk ``ci``'s flows that a 1-in-``rate`` packet sampler picks: each packet is
    picked with probability 1/rate, independently. A flow's first packet is its SYN (SYN-ACK for a
    reply); every packet of a flow with only SYN set is a SYN (retries of a connection nobody
    answered); the others carry ACK. Times are spread over the flow's seconds."""
    c = _chunk_columns(plan, ci)
    if c is None:
        return None
    rng = np.random.default_rng([plan.seed & 0xFFFFFFFF, plan.seed >> 32 & 0xFFFFFFFF, 4, ci, rate])
    pk = c["packets"]
    first = rng.random(len(pk)) < 1.0 / rate
    rest = rng.binomial(np.maximum(pk - 1, 0), 1.0 / rate)
    n_of = first.astype(np.int64) + rest
    flow = np.repeat(np.arange(len(pk)), n_of)
    # the first sample of a flow whose first packet was picked is that packet
    starts = np.cumsum(n_of) - n_of
    is_first = np.zeros(len(flow), bool)
    is_first[starts[first]] = True
    fl = c["flags"][flow]
    tcp = c["proto"][flow] == 6
    syn_only = fl == _SYN
    pflags = np.where(is_first | syn_only, fl & (_SYN | _SF_ACK), _SF_ACKPSH)
    pflags = np.where(tcp, pflags, 0)
    dur_ms = (c["end"][flow] - c["start"][flow] + 1) * 1000
    t = c["start"][flow] * 1000 + np.where(is_first, rng.integers(0, 1000, size=len(flow)),
                                           (rng.random(len(flow)) * dur_ms).astype(np.int64))
    length = np.maximum(c["bytes"][flow] // np.maximum(pk[flow], 1), 40)
    return {"t": t, "src": c["src"][flow], "dst": c["dst"][flow], "sport": c["sport"][flow],
            "dport": c["dport"][flow], "proto": c["proto"][flow], "flags": pflags, "length": length,
            "action": c["action"][flow], "actor": c["actor"][flow]}


def write_sflow(scenario: Scenario, path: Path | str, rate: int) -> int:
    """The scenario's traffic (both directions, as in flows.log) as a pcap of sFlow v5 export
    datagrams from one agent sampling 1 packet in ``rate`` on every instance's interface. Each
    sample is a flow sample with the packet's Ethernet, IP and TCP/UDP headers; the input ifIndex is
    the instance's, the output says discarded for a rejected flow. Returns the number of samples.

    Samples are written in packet-time order (a flow's packets spill into later chunks: those are
    held until their chunk), in datagrams of up to 8, each sent 100 ms after its last packet."""
    plan = scenario._plan
    if plan is None:
        raise ValueError("scenario has no plan (make it with generate())")
    if rate < 1:
        raise ValueError(f"sampling rate {rate}: it is 1 in N, N >= 1")
    boot_ms = plan.start_ms - 10 * 86_400_000
    agent, dst_ip, port = _SF_AGENT
    total = seq = dg_seq = 0
    held: dict[str, np.ndarray] | None = None
    with open(path, "wb", buffering=1 << 20) as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ci in range(plan.n_chunks + 1):
            s = _sflow_samples(plan, ci, rate) if ci < plan.n_chunks else None
            parts = [p for p in (held, s) if p is not None]
            if not parts:
                continue
            s = _concat(*parts)
            due = (s["t"] < plan.chunk0_ms + (ci + 1) * plan.chunk_ms) if ci < plan.n_chunks else np.ones(len(s["t"]), bool)
            held, s = _rows(s, ~due), _rows(s, due)
            s = _rows(s, np.argsort(s["t"], kind="stable"))
            n = len(s["t"])
            if n == 0:
                continue
            v6 = plan.addr_v6[s["src"]]
            rows = []
            for fam in (False, True):
                idx = np.flatnonzero(v6 == fam)
                r = np.zeros(len(idx), _SF_DTYPES[fam])
                r["fmt"] = 1
                r["len"] = r.itemsize - 8
                r["seq"] = seq + idx + 1
                r["source_id"] = r["input"] = s["actor"][idx] % 65535 + 1
                r["rate"] = rate
                r["pool"] = (seq + idx + 1) * rate
                r["output"] = np.where(s["action"][idx] == REJECT, _SF_DISCARDED, 0)
                r["n_records"] = 1
                r["rec_fmt"] = 1
                r["rec_len"] = r.itemsize - 48  # after the sample's 8-byte head, 32 of fields, 8 of record head
                hlen = 14 + (40 if fam else 20) + 20
                length = s["length"][idx]
                r["h_proto"], r["stripped"], r["h_len"] = 1, 4, hlen
                r["frame_len"] = length + 14 + 4
                r["eth"] = np.frombuffer(b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01", np.uint8)
                r["ip_src"] = plan.addr_bin[s["src"][idx]] if fam else plan.addr_bin[s["src"][idx], 12:].copy().view(">u4").ravel()
                r["ip_dst"] = plan.addr_bin[s["dst"][idx]] if fam else plan.addr_bin[s["dst"][idx], 12:].copy().view(">u4").ravel()
                if fam:
                    r["etype"], r["ip_vtc"], r["ip_hop"] = 0x86DD, 6 << 28, 64
                    r["ip_plen"] = np.maximum(length - 40, 0)
                    r["ip_next"] = s["proto"][idx]
                else:
                    r["etype"], r["ip_vhl"], r["ip_ttl"] = 0x0800, 0x45, 64
                    r["ip_len"] = np.minimum(length, 0xFFFF)
                    r["ip_proto"] = s["proto"][idx]
                r["sport"], r["dport"] = s["sport"][idx], s["dport"][idx]
                r["tcp_off"], r["tcp_flags"], r["tcp_win"] = 0x50, s["flags"][idx], 65535
                rows.append((idx, r))
            # sample i of the block, as bytes, wherever its family's array holds it
            where = np.empty(n, np.int64)
            blobs = []
            for fam, (idx, r) in enumerate(rows):
                where[idx] = np.arange(len(idx))
                blobs.append((r.tobytes(), r.itemsize))
            t = s["t"]
            for lo in range(0, n, _SF_SAMPLES_PER_DATAGRAM):
                hi = min(lo + _SF_SAMPLES_PER_DATAGRAM, n)
                sent = int(t[hi - 1]) + _SF_EXPORT_DELAY_MS
                body = []
                for i in range(lo, hi):
                    blob, size = blobs[int(v6[i])]
                    k = int(where[i]) * size
                    body.append(blob[k:k + size])
                dg_seq += 1
                payload = struct.pack(">II4sIIII", 5, 1, agent, 0, dg_seq, (sent - boot_ms) & 0xFFFFFFFF,
                                      hi - lo) + b"".join(body)
                fh.write(_udp_frame(payload, agent, dst_ip, port, sent))
            seq += n
            total += n
    return total


def _udp_frame(payload: bytes, src: bytes, dst: bytes, port: int, ts_ms: int) -> bytes:
    """One pcap record: Ethernet, IPv4 (no checksum), UDP (no checksum), ``payload``."""
    udp = struct.pack(">HHHH", 40000, port, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst) + udp
    frame = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip
    return struct.pack("<IIII", ts_ms // 1000, ts_ms % 1000 * 1000, len(frame), len(frame)) + frame


def write_lines(path: Path | str, seed: int, target_lines: int, *, gzip: bool = False) -> int:
    """Write a flows.log of exactly ``target_lines`` flow lines plus the header line, fast.

    For benchmarks: the scenario is sized to the target (more instances for
    bigger files, ~4 hours of traffic) and cut at ``target_lines``. Returns the
    number of flow lines written (the file has one more line, the header).
    """
    target = int(target_lines)
    if target < 1:
        raise ValueError("target_lines must be >= 1")
    path = Path(path)
    instances = int(min(50_000, max(300, math.ceil(target / 100_000) * 20)))
    duration = 4 * 3600
    sc = generate(seed, instances=instances, duration_s=duration)
    while True:
        if sc.expected_lines < target * 1.15:
            duration = int(duration * target * 1.3 / max(sc.expected_lines, 1)) + 600
            sc = generate(seed, instances=instances, duration_s=duration)
        n = _write_flows(sc, path, gzip, limit=target)
        if n >= target:
            return n
        duration *= 2  # the estimate was off: longer scenario, write again
        sc = generate(seed, instances=instances, duration_s=duration)


# ---------------------------------------------------------------------------
# command line (demo data)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smtpguard.lab.scenario", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory, or file with --lines")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--duration", type=int, default=7200, help="seconds")
    ap.add_argument("--start", help="ISO 8601 UTC start (default 2024-03-12T08:00:00Z)")
    ap.add_argument("--abuse", default=",".join(DEFAULT_ABUSE),
                    help=f"comma-separated abuse kinds ('' for none, 'all' for {', '.join(ABUSE_KINDS)})")
    ap.add_argument("--warmup", type=int, default=0, help="seconds at the start without abuse")
    ap.add_argument("--late-fraction", type=float, default=0.0, help="share of lines delivered late")
    ap.add_argument("--late-delay", default="60,240", help="LO,HI seconds of delay of late lines")
    ap.add_argument("--gzip", action="store_true")
    ap.add_argument("--netflow", action="store_true", help="also write netflow.pcap (the same flows as NetFlow v9)")
    ap.add_argument("--lines", type=int, help="benchmark file: write exactly this many flow lines to OUT")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.lines:
        n = write_lines(a.out, a.seed, a.lines, gzip=a.gzip)
        dt_s = time.perf_counter() - t0
        print(f"{n} lines in {dt_s:.2f} s ({n / dt_s:,.0f} lines/s) -> {a.out}", file=sys.stderr)
        return 0
    start = dt.datetime.fromisoformat(a.start.replace("Z", "+00:00")) if a.start else None
    abuse = ABUSE_KINDS if a.abuse == "all" else [k for k in a.abuse.split(",") if k]
    try:
        late_delay = tuple(int(x) for x in a.late_delay.split(","))
        if len(late_delay) != 2:
            raise ValueError("--late-delay must be LO,HI seconds")
        sc = generate(a.seed, instances=a.instances, duration_s=a.duration, start=start, abuse=abuse,
                      warmup_s=a.warmup, late_fraction=a.late_fraction, late_delay_s=late_delay)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write(sc, Path(a.out), gzip=a.gzip, netflow=a.netflow)
    meta = json.loads(paths["scenario"].read_text())
    print(f"{meta['lines']} lines, {len(sc.actors)} instances, {len(sc.abusive)} abusive, "
          f"in {time.perf_counter() - t0:.2f} s -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
