"""Deterministic generator of realistic, labelled AWS VPC Flow Log traffic.

Used for demos, evaluation and benchmarks. A :class:`Scenario` is a small plan
(instances, tenants, exemptions, address pools, traffic streams and the abuse
windows); the flow-log lines themselves are produced on demand, one time chunk
at a time, so files of tens of millions of lines stream in constant memory.

What is in the traffic
----------------------
Every instance is an :class:`Actor` with a private address (``10.x.y.z``, one
/22 per tenant VPC), a 12-digit tenant (account id), an ``eni-`` and an ``i-`` id.

- background (every instance, by role ``web``, ``worker``, ``batch``,
  ``bastion``): HTTPS/HTTP out and in, DNS and NTP over UDP, PostgreSQL/MySQL to
  the tenant's database, inbound SSH, ICMP and REJECTed inbound port scans;
- ``mail_server`` / ``esp_relay`` (exempted long ago): steady ACCEPTed port-25
  traffic, 20-50 connections/min (never more than 59 in a minute) to MX hosts
  chosen by popularity, a few KB per connection, with the reverse flow from port 25;
- ``submission``: apps sending on 587 (some 465) to one to three ESP relays;
- ``misconfigured_app``: 0-3 REJECTed port-25 attempts per 10 minutes;
- abuse, each in its own instance and active for 5-20 minutes (start and end in
  :meth:`Scenario.truth`): ``spam_burst`` (non-exempt, 100-300 distinct MX per
  minute, REJECTed SYNs), ``spam_exempted_new`` (exempted less than a day
  before the scenario, ACCEPTed small messages to 80-250 distinct MX per
  minute), ``flood`` (500-3000 connections per minute to 1-3 servers; the first
  flood actor is a long-exempted mail server, so ACCEPT, further ones are not
  exempted, so REJECT) and ``blocked_attempts`` (non-exempt, 10-40 REJECTed
  attempts per minute to 2-6 servers). These four are the default ``abuse``.
- further abuse kinds, asked for by name (``abuse=ABUSE_KINDS`` for all):

  - ``volume_spike``: a long-exempted mail server with its usual 20-35
    connections/min that, at least 45 minutes in, sends 8-15 times that for
    10-20 minutes, ACCEPTed, 60 % of it to MX it never used before (half of the
    small providers' MX never appear in its normal mail);
  - ``low_and_slow``: exempted 1-3 days before the scenario, no other mail:
    3-8 ACCEPTed small messages a minute, each to an MX it never contacted, for
    60-90 minutes (under 20 distinct servers in any minute, 180-480 new in an
    hour); ``low_and_slow_blocked``: the same shape from a non-exempt instance,
    2-4 REJECTed SYNs a minute;
  - ``tenant_spam``: 4-6 non-exempt instances of one tenant (its other
    instances stay benign), each 8-15 REJECTed SYNs a minute, together 40-80
    distinct MX a minute (one spam list split over the instances: no server
    twice in a minute), for 10-20 minutes. Each instance is in the truth with
    label ``tenant_spam`` and its tenant; :meth:`Scenario.tenant_truth` (and
    ``tenant_abuse`` in scenario.json) has one entry per run with the tenant,
    its instances and the window.

- hard benign cases with ``benign_extras`` (label ``benign``, ``kind`` the case;
  the windows of their unusual traffic in :attr:`Scenario.episodes`, and
  ``benign_episodes`` in scenario.json):

  - ``newsletter``: exempted long ago, 5-15 connections/min, and every 40-60
    minutes (the first within the first half hour) a 3-6 minute burst to
    120-250 distinct MX a minute, drawn from a fixed list of 320-480 MX weighted
    to the popular ones, so bursts reuse each other's servers;
  - ``esp_high_volume``: exempted long ago, all along 90-180 distinct MX a
    minute from a fixed set of 800-1200 (the popular ones and part of the tail),
    about 1.8-2 connections per server, so 160-360 connections/min;
  - ``app_retry``: exempted long ago, 2-6 mails a minute, and for 20-40 minutes
    60-150 ACCEPTed connections a minute to one server that carry only a
    greeting (3-6 packets, 200-600 bytes);
  - ``app_retry_blocked``: non-exempt, 1-3 REJECTed attempts a minute to one
    server for an hour.

``warmup_s`` keeps abuse windows (and the app_retry episodes) out of the first
seconds of the scenario, so detectors have baselines when abuse starts.

Every connection gives one line per direction (the reply flow has the ports
swapped; REJECTed SYNs have none), both logged on the instance's interface.
Lines come out roughly in time order: each is delayed by a random 0-30 s before
sorting, like AWS's delivery, so ``start`` may go backwards by up to 30 s. With
``late_fraction`` that share of lines is delivered a further ``late_delay_s``
(60-240 s by default) late: later in the file, timestamps unchanged, to test
watermarks; the lines are the same as without it, only their order differs.

Output (:func:`write`): ``flows.log`` (custom format; the first line is the
header of field names, as in files AWS delivers to S3), ``exemptions.csv``
(``ip,tenant,granted_at,reason``), ``truth.json`` (a list of every actor with
its label and, for abusive ones, the abuse window) and ``scenario.json`` (the
options, the tenant-level truth and the benign episodes).

The same seed (and arguments, numpy version) gives byte-identical output.

Run ``python -m smtpguard.scenario OUT_DIR [--seed N] [--abuse all] [--benign-extras]
[--warmup S] [--late-fraction F]`` for a demo directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip as gzip_module
import json
import math
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

ABUSE_KINDS: tuple[str, ...] = ("spam_burst", "spam_exempted_new", "flood", "blocked_attempts", "volume_spike",
                                 "low_and_slow", "low_and_slow_blocked", "tenant_spam")
DEFAULT_ABUSE: tuple[str, ...] = ("spam_burst", "spam_exempted_new", "flood", "blocked_attempts")
#: Hard benign cases (label ``benign``, ``kind`` the name here), added with ``benign_extras``.
BENIGN_EXTRA_KINDS: tuple[str, ...] = ("newsletter", "esp_high_volume", "app_retry", "app_retry_blocked")
#: Start used when none is given (fixed, so output never depends on the clock).
DEFAULT_START = dt.datetime(2024, 3, 12, 8, 0, 0, tzinfo=dt.timezone.utc)

MINUTE_MS = 60_000
#: Largest random delivery delay used for ordering (AWS-like out-of-order lines).
JITTER_MS = 30_000
#: Upper bound of connections per minute of one benign exempted mail server.
MAIL_CAP_PER_MIN = 59

ACCEPT, REJECT = 0, 1

# TCP flags as AWS reports them (OR over the aggregation window): FIN 1, SYN 2, RST 4, SYN-ACK 18.
_FIN, _SYN, _RST, _SYNACK = 1, 2, 4, 18


# ---------------------------------------------------------------------------
# public data types


@dataclass
class Actor:
    """One instance (one interface) in the scenario."""

    ip: str
    tenant: str
    instance_id: str
    kind: str
    """role of the instance: web, worker, batch, bastion, mail_server, esp_relay,
    mail_server_new, submission, misconfigured_app, or a hard benign kind (newsletter,
    esp_high_volume, app_retry, app_retry_blocked)"""
    label: str
    """``benign`` or the abuse kind (one of :data:`ABUSE_KINDS`)"""
    interface_id: str = ""
    exempted: bool = False
    abuse_start_ms: int | None = None
    abuse_end_ms: int | None = None
    """abuse window [start, end) in epoch ms; every abusive flow starts inside it"""
    targets: tuple[str, ...] = ()
    """servers a flood, blocked_attempts, app_retry or app_retry_blocked actor aims at"""

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
    """One row of exemptions.csv: an instance allowed to send on port 25."""

    ip: str
    tenant: str
    granted_at: dt.datetime
    reason: str


@dataclass
class Scenario:
    """A generated scenario: the plan of who sends what, and when.

    The flow lines are not held; get them with :func:`iter_lines`,
    :func:`iter_chunks` or :func:`write`.
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
    """no abuse starts in the first ``warmup_s`` seconds"""
    late_fraction: float = 0.0
    """share of lines delivered late (later in the file, same timestamps)"""
    late_delay_s: tuple[int, int] = (60, 240)
    benign_extras: tuple[str, ...] = ()
    """hard benign kinds included (see :data:`BENIGN_EXTRA_KINDS`)"""
    tenant_abuse: list[dict] = field(default_factory=list)
    """tenant-level truth: one entry per tenant_spam run (tenant, its instances, the window)"""
    episodes: list[dict] = field(default_factory=list)
    """windows of the hard benign cases' unusual traffic (newsletter bursts, retry storms)"""
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
        """Every actor as a JSON-ready dict (label, kind, exemption, abuse window).

        One entry per instance: tenant_spam instances are listed each with their
        own label and tenant; the tenant-level view is :meth:`tenant_truth`.
        """
        return [a.to_dict() for a in self.actors]

    def tenant_truth(self) -> list[dict]:
        """One entry per tenant_spam run: ``tenant``, ``label``, ``instances`` (IPs) and the window."""
        return [dict(t) for t in self.tenant_abuse]

    def exemptions_csv(self) -> str:
        rows = ["ip,tenant,granted_at,reason"]
        for e in self.exemptions:
            reason = e.reason.replace('"', "'")
            if "," in reason:
                reason = f'"{reason}"'
            rows.append(f"{e.ip},{e.tenant},{_iso_s(e.granted_at)},{reason}")
        return "\n".join(rows) + "\n"

    def meta(self) -> dict:
        return {
            "generator": "smtpguard.scenario",
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
            "benign_extras": list(self.benign_extras),
            "tenant_abuse": self.tenant_truth(),
            "benign_episodes": [dict(e) for e in self.episodes],
        }


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
}
_BG_ROLES = ("web", "worker", "batch", "bastion")
_EXTRA_BG_ROLE = {"newsletter": "mail", "esp_high_volume": "mail", "app_retry": "worker", "app_retry_blocked": "web"}
_BG_ROLE_P = (0.45, 0.33, 0.16, 0.06)
_SCAN_PORTS = np.array([23, 3389, 445, 1433, 5900, 6379, 8080, 8443, 2323, 5555, 9200, 27017], dtype=np.int64)
_RESOLVERS = ("8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9")

_MAIL_REASONS = ("transactional mail relay", "customer MTA (reviewed)", "newsletter delivery server",
                 "ticketing system notifications", "mailing-list server")
# MX popularity: Zipf over providers, geometric over a provider's hosts. Tuned so that a
# mail server making 20-59 connections a minute reaches ~15-45 distinct MX hosts.
_MX_ZIPF = 1.1
_MX_INNER_RATIO = 0.3


# abuse windows: length in minutes (the first kinds: 5-20, at most half the scenario) and the
# earliest start; a volume spike needs a baseline of normal traffic before it
_ABUSE_MINUTES: dict[str, tuple[float, float]] = {
    "volume_spike": (10, 20), "low_and_slow": (60, 90), "low_and_slow_blocked": (60, 90), "tenant_spam": (10, 20)}
_ABUSE_EARLIEST_MIN: dict[str, float] = {"volume_spike": 45}
#: instances of one tenant_spam run (all in one tenant)
_TENANT_SPAM_MIN, _TENANT_SPAM_MAX = 4, 6


def _window_earliest_ms(kind: str, dur_ms: int, warmup_ms: int) -> float:
    """Earliest start of an abuse window after the scenario start (clear of the first 5 %)."""
    return max(0.05 * dur_ms, warmup_ms, _ABUSE_EARLIEST_MIN.get(kind, 0) * MINUTE_MS)


def _window_longest_ms(kind: str, dur_ms: int) -> float:
    if kind in _ABUSE_MINUTES:
        return _ABUSE_MINUTES[kind][1] * MINUTE_MS
    return min(20 * MINUTE_MS, 0.5 * dur_ms)


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
    dst: str = "pool"                   # pool | weighted | targets | distinct | rds
    pool: tuple[int, int] = (0, 0)      # (offset, length) in the address table
    cum: np.ndarray | None = None       # cumulative weights over the pool (weighted)
    p: np.ndarray | None = None         # probabilities over the pool (distinct)
    extra_frac: float = 0.0             # distinct: up to this share of repeat connections
    extra_lo: float = 0.0               # distinct: at least this share of repeat connections
    tgt_off: np.ndarray | None = None   # targets: per local actor, into tgt_flat
    tgt_len: np.ndarray | None = None
    tgt_flat: np.ndarray | None = None
    dport_actor: np.ndarray | None = None
    dport_choices: np.ndarray | None = None
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
    out: list[int] = []
    while len(out) < n:
        k = (n - len(out)) * 2
        first = rng.choice(_PUBLIC_FIRST, size=k)
        rest = rng.integers(0, 1 << 16, size=k, dtype=np.uint32)
        for v in ((first << 24) | (rest << 8)).tolist():
            if v not in taken:
                taken.add(v)
                out.append(v)
                if len(out) == n:
                    break
    return np.array(out, dtype=np.uint32)


def _hosts_in(rng: np.random.Generator, nets: np.ndarray, per_net: np.ndarray) -> np.ndarray:
    """Distinct host addresses (.2-.254) in each /24 of ``nets``, ``per_net[i]`` of them."""
    out = []
    for net, k in zip(nets.tolist(), per_net.tolist()):
        hosts = rng.choice(np.arange(2, 255, dtype=np.uint32), size=int(k), replace=False)
        out.append(np.uint32(net) | hosts)
    return np.concatenate(out) if out else np.zeros(0, np.uint32)


def _hex_ids(rng: np.random.Generator, n: int, prefix: str) -> list[str]:
    raw = rng.integers(0, 16, size=(n, 17))
    raw[:, 0] = 0  # modern ids: eni-0..., i-0...
    digits = np.array(list("0123456789abcdef"))
    return [prefix + "".join(row) for row in digits[raw]]


def _loguniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))


def generate(seed: int, *, instances: int = 300, duration_s: int = 7200, start: dt.datetime | None = None,
             abuse: Sequence[str] = DEFAULT_ABUSE, warmup_s: int = 0, late_fraction: float = 0.0,
             late_delay_s: tuple[int, int] = (60, 240),
             benign_extras: bool | Sequence[str] = False) -> Scenario:
    """Plan a scenario of ``instances`` instances over ``duration_s`` seconds from ``start`` (UTC).

    ``abuse`` lists the abusive runs: one instance per entry, except ``tenant_spam``,
    which takes 4-6 instances of one tenant (kinds may repeat; the first ``flood``
    is an exempted mail server, further ones are not exempted).

    ``warmup_s``: no abuse window (and no app_retry episode) starts before
    ``start + warmup_s``, so detectors can learn every source's baseline first.
    ``late_fraction`` of the lines (each independently) are delivered
    ``late_delay_s`` = (lo, hi) seconds late: they move that much later in the
    file, their timestamps stay. ``benign_extras``: True for one instance of every
    kind in :data:`BENIGN_EXTRA_KINDS`, or a sequence of those kinds.
    """
    abuse = tuple(abuse)
    unknown = [k for k in abuse if k not in ABUSE_KINDS]
    if unknown:
        raise ValueError(f"unknown abuse kind(s) {unknown}; known: {', '.join(ABUSE_KINDS)}")
    if benign_extras is True:
        extras = BENIGN_EXTRA_KINDS
    elif benign_extras is False or benign_extras is None:
        extras = ()
    else:
        extras = (benign_extras,) if isinstance(benign_extras, str) else tuple(benign_extras)
    unknown = [k for k in extras if k not in BENIGN_EXTRA_KINDS]
    if unknown:
        raise ValueError(f"unknown benign kind(s) {unknown}; known: {', '.join(BENIGN_EXTRA_KINDS)}")
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
        need = _window_earliest_ms(kind, dur_ms, warmup_ms) + _window_longest_ms(kind, dur_ms)
        if need > dur_ms:
            raise ValueError(f"abuse kind {kind!r} needs a scenario of at least {math.ceil(need / 1000)} s "
                             f"with warmup_s={warmup_s} (duration_s={duration_s})")
    N = int(instances)
    n_mail = max(5, round(N / 40))
    n_esp = max(1, n_mail // 4)
    n_sub = max(3, round(N / 10))
    n_mis = max(2, round(N / 60))
    singles = tuple(k for k in abuse if k != "tenant_spam")
    n_groups = len(abuse) - len(singles)
    n_bg = N - n_mail - n_sub - n_mis - len(singles) - len(extras) - _TENANT_SPAM_MAX * n_groups
    if n_bg < 10:
        raise ValueError(f"instances={N} is too few for this mix; use at least {N - n_bg + 10}")

    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, 0])

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
    # one /22 VPC per tenant, spread over 10.0.0.0/8
    vpc_slot = rng.choice(np.arange(1, 16384, dtype=np.uint32), size=n_ten, replace=False)
    vpc_base = (np.uint32(10) << 24) + vpc_slot * np.uint32(1024)
    inst_u32 = np.empty(N, np.uint32)
    pos = 0
    for t, k in enumerate(sizes):
        hosts = rng.choice(np.arange(10, 1000, dtype=np.uint32), size=k, replace=False)
        inst_u32[pos:pos + k] = vpc_base[t] + hosts
        pos += k
    rds_u32 = vpc_base + 1000 + rng.integers(0, 20, size=n_ten).astype(np.uint32)

    # roles, assigned over a random permutation of the instances
    perm = rng.permutation(N)
    # tenant_spam takes several instances of one tenant: reserve them before the other roles,
    # and send the tenant's other instances to the end, where only background roles are given
    tenant_groups: list[np.ndarray] = []
    if n_groups:
        first_of = np.concatenate([[0], np.cumsum(sizes)[:-1]])
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
        n_bg = N - n_mail - n_sub - n_mis - len(singles) - len(extras) - sum(len(g) for g in tenant_groups)
    roles = np.empty(N, dtype=object)
    labels = np.array(["benign"] * N, dtype=object)
    cursor = 0

    def take(k: int) -> np.ndarray:
        nonlocal cursor
        ids = np.sort(perm[cursor:cursor + k])
        cursor += k
        return ids

    mail_ids = take(n_mail)
    esp_ids = mail_ids[:n_esp]
    roles[mail_ids] = "mail_server"
    roles[esp_ids] = "esp_relay"
    sub_ids = take(n_sub)
    roles[sub_ids] = "submission"
    mis_ids = take(n_mis)
    roles[mis_ids] = "misconfigured_app"
    abuse_ids = take(len(singles))
    extra_ids = take(len(extras))
    bg_ids = take(n_bg)
    roles[bg_ids] = rng.choice(np.array(_BG_ROLES, dtype=object), size=n_bg, p=_BG_ROLE_P)
    for g in tenant_groups:
        roles[g] = "web"
    for aid, kind in zip(extra_ids.tolist(), extras):
        roles[aid] = kind
    bg_role = roles.copy()  # role whose background traffic the instance has
    bg_role[mail_ids] = "mail"
    bg_role[sub_ids] = rng.choice(np.array(("web", "worker"), dtype=object), size=n_sub)
    bg_role[mis_ids] = rng.choice(np.array(("web", "worker", "batch"), dtype=object), size=n_mis)
    for aid, kind in zip(extra_ids.tolist(), extras):
        bg_role[aid] = _EXTRA_BG_ROLE[kind]

    # --- address pools (index space: actors, mx, relays, web, clients, admins, resolvers, ntp, scanners, rds)
    taken: set[int] = set()
    # MX hosts: a few big providers over many /24s, mid-size ones, and shared hosting /24s
    n_big, n_mid, n_hosting = 8, 92, 420
    big_nets = rng.integers(3, 9, size=n_big)
    mid_nets = rng.integers(1, 3, size=n_mid)
    n_nets = int(big_nets.sum() + mid_nets.sum() + n_hosting)
    nets = _public_24s(rng, n_nets, taken)
    mx_list, mx_weight, mx_provider = [], [], []
    npos = 0
    prov = 0
    for count, per_lo, per_hi in ((big_nets, 4, 13), (mid_nets, 2, 7)):
        for k in count.tolist():
            my = nets[npos:npos + k]
            npos += k
            ips = _hosts_in(rng, my, rng.integers(per_lo, per_hi, size=k))
            # a sender mostly reaches a provider's preferred MX hosts: geometric weights inside it
            inner = _MX_INNER_RATIO ** np.arange(len(ips))
            mx_list.append(ips)
            mx_weight.append(inner / inner.sum() / (prov + 1) ** _MX_ZIPF)
            mx_provider.append(np.full(len(ips), prov))
            prov += 1
    hosting = nets[npos:npos + n_hosting]
    host_ips = _hosts_in(rng, hosting, rng.integers(4, 14, size=n_hosting))
    # each small provider (one or two hosts on a hosting /24) gets a Zipf-tail weight
    small_rank = prov + 1 + rng.permutation(len(host_ips)) // 2
    mx_list.append(host_ips)
    mx_weight.append(1.0 / small_rank.astype(np.float64) ** _MX_ZIPF / 2)
    mx_provider.append(prov + np.arange(len(host_ips)) // 2)
    mx_u32 = np.concatenate(mx_list)
    mx_w = np.concatenate(mx_weight)
    mx_w = mx_w / mx_w.sum()
    mx_prov = np.concatenate(mx_provider)
    n_mx = len(mx_u32)

    relay_nets = _public_24s(rng, 2, taken)
    relay_u32 = _hosts_in(rng, relay_nets, np.array([2, 2]))
    web_u32 = _hosts_in(rng, _public_24s(rng, 300, taken), rng.integers(2, 20, size=300))
    client_u32 = _hosts_in(rng, _public_24s(rng, 4000, taken), rng.integers(1, 8, size=4000))
    admin_u32 = _hosts_in(rng, _public_24s(rng, 20, taken), np.full(20, 2))
    resolver_u32 = np.array([_ip_u32(s) for s in _RESOLVERS], np.uint32)
    ntp_u32 = _hosts_in(rng, _public_24s(rng, 8, taken), np.ones(8, np.int64))
    scan_u32 = _hosts_in(rng, _public_24s(rng, 600, taken), rng.integers(1, 5, size=600))

    pools = [("actors", inst_u32), ("mx", mx_u32), ("relays", relay_u32), ("web", web_u32),
             ("clients", client_u32), ("admins", admin_u32), ("resolvers", resolver_u32),
             ("ntp", ntp_u32), ("scanners", scan_u32), ("rds", rds_u32)]
    off: dict[str, tuple[int, int]] = {}
    o = 0
    for name, arr in pools:
        off[name] = (o, len(arr))
        o += len(arr)
    addr_u32 = np.concatenate([arr for _, arr in pools])
    addr = _ip_strings(addr_u32)
    addr_list_actors = addr.slice(0, N).to_pylist()
    mx_str = addr.slice(off["mx"][0], n_mx).to_pylist()

    # --- identities
    enis = _hex_ids(rng, N, "eni-")
    iids = _hex_ids(rng, N, "i-")
    ten_str = np.array(accounts, dtype=object)[tenant_of]

    # --- abuse actors
    full_from = np.full(N, start_ms, np.int64)
    full_to = np.full(N, end_ms, np.int64)
    windows: dict[int, tuple[int, int]] = {}
    exempt_new: set[int] = set()
    exempt_old: set[int] = set(mail_ids.tolist())
    exempt_recent: set[int] = set()
    own_mail: set[int] = set()  # exempted senders whose mail has its own streams, not the shared one
    flood_exempt_done = False
    abuse_kind_of: dict[int, str] = {}

    def place(length: float, earliest: float) -> tuple[int, int]:
        """A window of ``length`` ms starting at least ``earliest`` ms after the start, clear of the end."""
        lo = start_ms + earliest
        hi = end_ms - 0.05 * dur_ms - length
        if hi < lo:
            hi = max(lo, end_ms - length)
        w0 = int(round(rng.uniform(lo, max(lo, hi)) / 1000)) * 1000
        w1 = w0 + int(round(length / 1000)) * 1000
        return w0, min(w1, end_ms)

    def abuse_window(kind: str) -> tuple[int, int]:
        lo_min, hi_min = _ABUSE_MINUTES.get(kind, (5, 20))
        length = rng.uniform(lo_min, hi_min) * MINUTE_MS
        if kind not in _ABUSE_MINUTES:
            length = min(length, 0.5 * dur_ms)
        return place(length, _window_earliest_ms(kind, dur_ms, warmup_ms))

    tenant_runs: list[tuple[np.ndarray, tuple[int, int]]] = []
    next_single = iter(abuse_ids.tolist())
    next_group = iter(tenant_groups)
    for kind in abuse:
        if kind == "tenant_spam":
            group = next(next_group)
            w = abuse_window(kind)
            tenant_runs.append((group, w))
            for aid in group.tolist():
                windows[aid] = w
                labels[aid] = kind
            continue
        aid = next(next_single)
        windows[aid] = abuse_window(kind)
        labels[aid] = kind
        abuse_kind_of[aid] = kind
        if kind == "spam_burst":
            roles[aid] = bg_role[aid] = "web"
        elif kind == "spam_exempted_new":
            roles[aid] = "mail_server_new"
            bg_role[aid] = "mail"
            exempt_new.add(aid)
        elif kind == "flood" and not flood_exempt_done:
            roles[aid] = "mail_server"
            bg_role[aid] = "mail"
            exempt_old.add(aid)
            flood_exempt_done = True
        elif kind == "volume_spike":
            roles[aid] = "mail_server"
            bg_role[aid] = "mail"
            exempt_old.add(aid)
            own_mail.add(aid)
        elif kind == "low_and_slow":
            roles[aid] = "mail_server_new"
            bg_role[aid] = "mail"
            exempt_recent.add(aid)
        else:  # blocked_attempts, low_and_slow_blocked, further floods
            roles[aid] = bg_role[aid] = "worker"

    # hard benign cases: exempted senders that look busy, and applications that retry
    extra_of = dict(zip(extras, [[] for _ in extras]))
    for aid, kind in zip(extra_ids.tolist(), extras):
        extra_of[kind].append(aid)
        if kind in ("newsletter", "esp_high_volume", "app_retry"):
            exempt_old.add(aid)
            own_mail.add(aid)
    episodes: list[tuple[int, str, int, int]] = []
    bursts_of: dict[int, list[tuple[int, int]]] = {}
    retry_window: dict[int, tuple[int, int]] = {}
    for aid in extra_of.get("newsletter", []):
        # first burst within the first half hour, then one every 40-60 minutes, on whole minutes
        t = start_ms + int(rng.uniform(1, 25) * MINUTE_MS)
        t += -t % MINUTE_MS
        bursts: list[tuple[int, int]] = []
        while t < end_ms:
            bursts.append((t, min(t + int(rng.integers(3, 7)) * MINUTE_MS, end_ms)))
            t += int(rng.integers(40, 61)) * MINUTE_MS
        bursts_of[aid] = bursts
        episodes.extend((aid, "newsletter", b0, b1) for b0, b1 in bursts)
    for kind, (lo_min, hi_min) in (("app_retry", (20, 40)), ("app_retry_blocked", (60, 60))):
        for aid in extra_of.get(kind, []):
            earliest = max(0.05 * dur_ms, warmup_ms)
            w = place(min(rng.uniform(lo_min, hi_min) * MINUTE_MS, end_ms - start_ms - earliest), earliest)
            retry_window[aid] = w
            episodes.append((aid, kind, *w))
    episodes.sort(key=lambda e: (e[2], e[0]))

    streams: list[_Stream] = []

    def pool_of(name: str) -> tuple[int, int]:
        return off[name]

    def cum(w: np.ndarray) -> np.ndarray:
        c = np.cumsum(w)
        return c / c[-1]

    # background traffic, one stream per profile
    bg_pool = {"https_out": "web", "http_out": "web", "dns": "resolvers", "ntp": "ntp",
               "https_in": "clients", "http_in": "clients", "ssh_in": "admins", "scan_in": "scanners",
               "icmp_in": "clients"}
    for prof in ("https_out", "http_out", "dns", "ntp", "postgres_out", "mysql_out", "https_in", "http_in",
                 "ssh_in", "scan_in", "icmp_in"):
        ids, rates = [], []
        for role, table in _ROLE_RATES.items():
            if prof not in table:
                continue
            members = np.flatnonzero(bg_role == role)
            if len(members):
                ids.append(members)
                rates.append(_loguniform(rng, *table[prof], len(members)))
        if not ids:
            continue
        a = np.concatenate(ids)
        order = np.argsort(a, kind="stable")
        a, r = a[order], np.concatenate(rates)[order]
        st = _Stream(_P[prof], a, r, full_from[a], full_to[a])
        if prof in ("postgres_out", "mysql_out"):
            st.dst = "rds"
        else:
            st.pool = pool_of(bg_pool[prof])
            if prof == "scan_in":
                st.dport_choices = _SCAN_PORTS
                st.diurnal = False
        streams.append(st)

    # benign exempted mail servers (and the exempted flood actor's normal mail)
    mailers = np.array(sorted(exempt_old - own_mail), dtype=np.int64)
    m_rate = np.where(np.isin(mailers, esp_ids), rng.uniform(38, 50, len(mailers)), rng.uniform(20, 35, len(mailers)))
    streams.append(_Stream(_P["smtp_mx"], mailers, m_rate, full_from[mailers], full_to[mailers],
                           cap=MAIL_CAP_PER_MIN, dst="weighted", pool=pool_of("mx"), cum=cum(mx_w)))
    # the newly exempted instance sends a little legitimate mail all along
    if exempt_new:
        new = np.array(sorted(exempt_new), dtype=np.int64)
        streams.append(_Stream(_P["smtp_mx"], new, rng.uniform(2, 5, len(new)), full_from[new], full_to[new],
                               cap=MAIL_CAP_PER_MIN, dst="weighted", pool=pool_of("mx"), cum=cum(mx_w)))

    # submission to ESP relays on 587 / 465
    s_relays = [rng.choice(len(relay_u32), size=int(rng.integers(1, 4)), replace=False) + pool_of("relays")[0]
                for _ in sub_ids]
    streams.append(_Stream(
        _P["smtp_submission"], sub_ids.astype(np.int64), _loguniform(rng, 0.5, 4, len(sub_ids)),
        full_from[sub_ids], full_to[sub_ids], dst="targets",
        tgt_off=np.cumsum([0] + [len(x) for x in s_relays[:-1]]).astype(np.int64),
        tgt_len=np.array([len(x) for x in s_relays], np.int64), tgt_flat=np.concatenate(s_relays).astype(np.int64),
        dport_actor=np.where(rng.random(len(sub_ids)) < 0.8, 587, 465).astype(np.int64)))

    # misconfigured apps: 0-3 REJECTed port-25 attempts per 10 minutes, to one server each
    block0 = start_ms - start_ms % (10 * MINUTE_MS)
    ev_t, ev_l = [], []
    for li in range(len(mis_ids)):
        for b in range(block0, end_ms, 10 * MINUTE_MS):
            k = int(rng.choice(4, p=(0.3, 0.4, 0.2, 0.1)))
            lo, hi = max(b, start_ms), min(b + 10 * MINUTE_MS, end_ms)
            if k and hi > lo:
                ev_t.append(rng.integers(lo, hi, size=k))
                ev_l.append(np.full(k, li))
    evt = np.concatenate(ev_t) if ev_t else np.zeros(0, np.int64)
    evl = np.concatenate(ev_l) if ev_l else np.zeros(0, np.int64)
    o_ = np.argsort(evt, kind="stable")
    mis_tgt = off["mx"][0] + rng.choice(n_mx, size=len(mis_ids), p=mx_w)
    streams.append(_Stream(_P["smtp_blocked"], mis_ids.astype(np.int64), np.zeros(len(mis_ids)),
                           full_from[mis_ids], full_to[mis_ids], dst="targets",
                           tgt_off=np.arange(len(mis_ids), dtype=np.int64), tgt_len=np.ones(len(mis_ids), np.int64),
                           tgt_flat=mis_tgt.astype(np.int64), ev_t=evt[o_].astype(np.int64), ev_local=evl[o_]))

    # abuse streams
    mx_p_spam = np.sqrt(mx_w)
    mx_p_spam /= mx_p_spam.sum()
    targets_of: dict[int, tuple[str, ...]] = {}
    for aid, kind in abuse_kind_of.items():
        a = np.array([aid], np.int64)
        w0, w1 = windows[aid]
        wf, wt = np.array([w0], np.int64), np.array([w1], np.int64)
        if kind == "spam_burst":
            streams.append(_Stream(_P["smtp_blocked"], a, np.array([100.0]), wf, wt, rate_hi=np.array([300.0]),
                                   diurnal=False, dst="distinct", pool=pool_of("mx"), p=mx_p_spam, extra_frac=0.3))
        elif kind == "spam_exempted_new":
            streams.append(_Stream(_P["smtp_spam_small"], a, np.array([80.0]), wf, wt, rate_hi=np.array([250.0]),
                                   diurnal=False, dst="distinct", pool=pool_of("mx"), p=mx_p_spam, extra_frac=0.2))
        elif kind == "flood":
            # 1-3 servers of one provider (the victim)
            big = np.unique(mx_prov)
            victim = int(rng.choice(big[:n_big + n_mid]))
            cand = np.flatnonzero(mx_prov == victim)
            k = int(min(len(cand), rng.integers(1, 4)))
            tg = np.sort(rng.choice(cand, size=k, replace=False))
            targets_of[aid] = tuple(mx_str[i] for i in tg)
            prof = "smtp_flood_accept" if aid in exempt_old else "smtp_flood_reject"
            streams.append(_Stream(_P[prof], a, np.array([500.0]), wf, wt, rate_hi=np.array([3000.0]),
                                   diurnal=False, dst="targets", tgt_off=np.array([0]), tgt_len=np.array([k]),
                                   tgt_flat=(tg + off["mx"][0]).astype(np.int64)))
        elif kind == "blocked_attempts":
            k = int(rng.integers(2, 7))
            tg = np.sort(rng.choice(n_mx, size=k, replace=False, p=mx_w))
            targets_of[aid] = tuple(mx_str[i] for i in tg)
            streams.append(_Stream(_P["smtp_blocked"], a, np.array([10.0]), wf, wt, rate_hi=np.array([40.0]),
                                   diurnal=False, dst="targets", tgt_off=np.array([0]), tgt_len=np.array([k]),
                                   tgt_flat=(tg + off["mx"][0]).astype(np.int64)))
        elif kind == "volume_spike":
            # Half of the small providers' MX stay out of its normal mail, so the spike's share to
            # them is traffic to servers it provably never used.
            hosting0 = n_mx - len(host_ips)
            fresh = rng.choice(np.arange(hosting0, n_mx), size=len(host_ips) // 2, replace=False)
            usual_w = mx_w.copy()
            usual_w[fresh] = 0.0
            fresh_w = np.zeros(n_mx)
            fresh_w[fresh] = mx_p_spam[fresh]
            r = float(rng.uniform(20, 35))
            f = float(rng.uniform(8, 15))
            streams.append(_Stream(_P["smtp_mx"], a, np.array([r]), full_from[a], full_to[a], cap=MAIL_CAP_PER_MIN,
                                   dst="weighted", pool=pool_of("mx"), cum=cum(usual_w)))
            # during the spike: f times the usual rate in all, 60 % of it to never-used MX
            for rate, w in (((0.4 * f - 1) * r, usual_w), (0.6 * f * r, fresh_w)):
                streams.append(_Stream(_P["smtp_mx"], a, np.array([rate]), wf, wt, diurnal=False,
                                       dst="weighted", pool=pool_of("mx"), cum=cum(w)))
        elif kind in ("low_and_slow", "low_and_slow_blocked"):
            # a few servers a minute, each never contacted before (drawn without replacement over
            # the whole window), so no minute stands out but the hour reaches hundreds
            lo_n, hi_n = (3, 8) if kind == "low_and_slow" else (2, 4)
            slot_a, slot_b = _minute_slots(w0, w1)
            n = np.rint(rng.integers(lo_n, hi_n + 1, size=len(slot_a)) * (slot_b - slot_a) / MINUTE_MS).astype(np.int64)
            t = rng.integers(np.repeat(slot_a, n), np.repeat(slot_b, n))
            dst = rng.choice(n_mx, size=int(n.sum()), replace=False, p=mx_p_spam)
            prof = "smtp_spam_small" if kind == "low_and_slow" else "smtp_blocked"
            streams.append(_event_stream(_P[prof], a, t, np.zeros(len(t), np.int64), dst + off["mx"][0]))

    # tenant_spam: each instance 8-15 rejected SYNs a minute, the run 40-80 distinct MX a minute
    tenant_abuse: list[dict] = []
    for group, (w0, w1) in tenant_runs:
        k = len(group)
        lo_r, hi_r = max(8.0, 40.0 / k), min(15.0, 80.0 / k)
        slot_a, slot_b = _minute_slots(w0, w1)
        frac = (slot_b - slot_a) / MINUTE_MS
        n = np.rint(rng.uniform(lo_r, hi_r, size=(len(slot_a), k)) * frac[:, None]).astype(np.int64)
        # one spam list split over the instances: distinct servers within each minute of the run
        dst = np.concatenate([rng.choice(n_mx, size=int(row.sum()), replace=False, p=mx_p_spam) for row in n])
        per_slot = n.sum(axis=1)
        t = rng.integers(np.repeat(slot_a, per_slot), np.repeat(slot_b, per_slot))
        local = np.concatenate([np.repeat(np.arange(k), row) for row in n])
        streams.append(_event_stream(_P["smtp_blocked"], group.astype(np.int64), t, local, dst + off["mx"][0]))
        tenant_abuse.append({"tenant": ten_str[group[0]], "label": "tenant_spam",
                             "instances": [addr_list_actors[i] for i in group.tolist()],
                             "abuse_start_ms": w0, "abuse_end_ms": w1,
                             "abuse_start": _iso_ms(w0), "abuse_end": _iso_ms(w1)})

    # hard benign streams
    reason_of: dict[int, str] = {}
    for aid in extra_of.get("newsletter", []):
        a = np.array([aid], np.int64)
        reason_of[aid] = "newsletter delivery server"
        streams.append(_Stream(_P["smtp_mx"], a, np.array([5.0]), full_from[a], full_to[a], rate_hi=np.array([15.0]),
                               dst="weighted", pool=pool_of("mx"), cum=cum(mx_w)))
        # the subscriber list: a fixed set of MX, popular ones first, so every burst reuses them
        audience = rng.choice(n_mx, size=int(rng.integers(320, 481)), replace=False, p=mx_p_spam)
        aud_p = np.zeros(n_mx)
        aud_p[audience] = mx_p_spam[audience]
        bursts = bursts_of[aid]
        if bursts:
            bf = np.array([b[0] for b in bursts], np.int64)
            bt = np.array([b[1] for b in bursts], np.int64)
            streams.append(_Stream(_P["smtp_mx"], np.full(len(bursts), aid, np.int64), np.full(len(bursts), 120.0),
                                   bf, bt, rate_hi=np.full(len(bursts), 250.0), dst="distinct", pool=pool_of("mx"),
                                   p=aud_p / aud_p.sum(), extra_lo=0.3, extra_frac=1.0))
    for aid in extra_of.get("esp_high_volume", []):
        a = np.array([aid], np.int64)
        reason_of[aid] = "ESP outbound MTA (high volume)"
        # its customers' recipients: the popular MX and a share of the tail, the same all day
        audience = rng.choice(n_mx, size=int(rng.integers(800, 1201)), replace=False, p=mx_w)
        aud_p = np.zeros(n_mx)
        aud_p[audience] = mx_p_spam[audience]
        # steady 90-180 distinct MX a minute, 1.8-2 connections per server
        d_lo = float(rng.uniform(90, 120))
        streams.append(_Stream(_P["smtp_mx"], a, np.array([d_lo]), full_from[a], full_to[a],
                               rate_hi=np.array([d_lo + rng.uniform(30, 60)]), dst="distinct", pool=pool_of("mx"),
                               p=aud_p / aud_p.sum(), extra_lo=0.8, extra_frac=1.0))
    for aid in extra_of.get("app_retry", []):
        a = np.array([aid], np.int64)
        w0, w1 = retry_window[aid]
        reason_of[aid] = "application notifications"
        streams.append(_Stream(_P["smtp_mx"], a, rng.uniform(2, 6, 1), full_from[a], full_to[a],
                               cap=MAIL_CAP_PER_MIN, dst="weighted", pool=pool_of("mx"), cum=cum(mx_w)))
        tg = int(rng.choice(n_mx, p=mx_w))
        targets_of[aid] = (mx_str[tg],)
        streams.append(_Stream(_P["smtp_retry"], a, np.array([60.0]), np.array([w0], np.int64),
                               np.array([w1], np.int64), rate_hi=np.array([150.0]), diurnal=False, dst="targets",
                               tgt_off=np.array([0]), tgt_len=np.array([1]),
                               tgt_flat=np.array([tg + off["mx"][0]], np.int64)))
    for aid in extra_of.get("app_retry_blocked", []):
        a = np.array([aid], np.int64)
        w0, w1 = retry_window[aid]
        tg = int(rng.choice(n_mx, p=mx_w))
        targets_of[aid] = (mx_str[tg],)
        streams.append(_Stream(_P["smtp_blocked"], a, np.array([1.0]), np.array([w0], np.int64),
                               np.array([w1], np.int64), rate_hi=np.array([3.0]), diurnal=False, dst="targets",
                               tgt_off=np.array([0]), tgt_len=np.array([1]),
                               tgt_flat=np.array([tg + off["mx"][0]], np.int64)))

    # --- exemptions
    exemptions: list[Exemption] = []
    for aid in sorted(exempt_old):
        days = float(rng.uniform(30, 900))
        granted = dt.datetime.fromtimestamp(start_ms / 1000 - days * 86400, dt.timezone.utc).replace(microsecond=0)
        if aid in reason_of:
            reason = reason_of[aid]
        elif roles[aid] == "esp_relay":
            reason = "ESP outbound MTA"
        else:
            reason = _MAIL_REASONS[int(rng.integers(len(_MAIL_REASONS)))]
        exemptions.append(Exemption(addr_list_actors[aid], ten_str[aid], granted, reason))
    for aid in sorted(exempt_new):
        hours = float(rng.uniform(1, 20))
        granted = dt.datetime.fromtimestamp(start_ms / 1000 - hours * 3600, dt.timezone.utc).replace(microsecond=0)
        exemptions.append(Exemption(addr_list_actors[aid], ten_str[aid], granted, "new marketing mailer"))
    for aid in sorted(exempt_recent):
        hours = float(rng.uniform(24, 72))
        granted = dt.datetime.fromtimestamp(start_ms / 1000 - hours * 3600, dt.timezone.utc).replace(microsecond=0)
        exemptions.append(Exemption(addr_list_actors[aid], ten_str[aid], granted, "new customer MTA"))
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
    exempted = exempt_old | exempt_new | exempt_recent
    actors = []
    for i in range(N):
        w = windows.get(i)
        actors.append(Actor(
            ip=addr_list_actors[i], tenant=ten_str[i], instance_id=iids[i], kind=str(roles[i]), label=str(labels[i]),
            interface_id=enis[i], exempted=i in exempted,
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
    plan = _Plan(int(seed), start_ms, end_ms, chunk_ms, chunk0, int(n_chunks), addr, prefix, suffix,
                 tenant_of.astype(np.int64), (off["rds"][0] + np.arange(n_ten)).astype(np.int64), streams,
                 late_fraction, late_lo * 1000, late_hi * 1000)
    episode_dicts = [{"ip": addr_list_actors[aid], "kind": kind, "start_ms": e0, "end_ms": e1,
                      "start": _iso_ms(e0), "end": _iso_ms(e1)} for aid, kind, e0, e1 in episodes]
    return Scenario(int(seed), start_ms, end_ms, actors, exemptions, FIELDS, expected, abuse=abuse,
                    warmup_s=warmup_s, late_fraction=late_fraction, late_delay_s=(late_lo, late_hi),
                    benign_extras=extras, tenant_abuse=tenant_abuse, episodes=episode_dicts, _plan=plan)


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
    """Connections of one stream in [lo, hi): (actor, t_ms, remote address index, dport or None)."""
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
    return actor, t.astype(np.int64), remote.astype(np.int64), dport


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
        actor, t, remote, dport = r
        prof = np.full(len(actor), st.profile, np.int64)
        if dport is None:
            dport = _PT.port[prof]
        parts.append((actor, t, remote, dport, prof))
    if not parts:
        return None
    actor, t, remote, dport, prof = (np.concatenate(x) for x in zip(*parts))
    n = len(actor)

    PT = _PT
    inbound = PT.inbound[prof]
    proto = PT.proto[prof]
    src = np.where(inbound, remote, actor)
    dst = np.where(inbound, actor, remote)
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


def write(scenario: Scenario, out_dir: Path | str, *, gzip: bool = False) -> dict[str, Path]:
    """Write flows.log (or flows.log.gz), exemptions.csv, truth.json and scenario.json into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "flows": out / ("flows.log.gz" if gzip else "flows.log"),
        "exemptions": out / "exemptions.csv",
        "truth": out / "truth.json",
        "scenario": out / "scenario.json",
    }
    lines = _write_flows(scenario, paths["flows"], gzip)
    paths["exemptions"].write_text(scenario.exemptions_csv())
    paths["truth"].write_text(json.dumps(scenario.truth(), indent=1) + "\n")
    meta = scenario.meta()
    meta["lines"] = lines
    paths["scenario"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths


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
    ap = argparse.ArgumentParser(prog="python -m smtpguard.scenario", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory, or file with --lines")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--duration", type=int, default=7200, help="seconds")
    ap.add_argument("--start", help="ISO 8601 UTC start (default 2024-03-12T08:00:00Z)")
    ap.add_argument("--abuse", default=",".join(DEFAULT_ABUSE),
                    help=f"comma-separated abuse kinds ('' for none, 'all' for {', '.join(ABUSE_KINDS)})")
    ap.add_argument("--benign-extras", nargs="?", const="all", default="",
                    help=f"add hard benign cases: all (the default with the flag alone) or some of "
                         f"{', '.join(BENIGN_EXTRA_KINDS)}, comma-separated")
    ap.add_argument("--warmup", type=int, default=0, help="seconds at the start without abuse (baselines)")
    ap.add_argument("--late-fraction", type=float, default=0.0, help="share of lines delivered late")
    ap.add_argument("--late-delay", default="60,240", help="LO,HI seconds of delay of late lines")
    ap.add_argument("--gzip", action="store_true")
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
    extras = True if a.benign_extras == "all" else [k for k in a.benign_extras.split(",") if k]
    try:
        late_delay = tuple(int(x) for x in a.late_delay.split(","))
        if len(late_delay) != 2:
            raise ValueError("--late-delay must be LO,HI seconds")
        sc = generate(a.seed, instances=a.instances, duration_s=a.duration, start=start, abuse=abuse,
                      warmup_s=a.warmup, late_fraction=a.late_fraction, late_delay_s=late_delay,
                      benign_extras=extras)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write(sc, Path(a.out), gzip=a.gzip)
    meta = json.loads(paths["scenario"].read_text())
    print(f"{meta['lines']} lines, {len(sc.actors)} instances, {len(sc.abusive)} abusive, "
          f"in {time.perf_counter() - t0:.2f} s -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
