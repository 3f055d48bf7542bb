"""DNS blocklist (DNSBL) checks: which blocklists list an IP address, and what the answer means.

Blocklists are data: a :class:`Zone` names the DNS zone to query and maps each return code
to a meaning and a category. Only a *listing* is evidence of abuse; a *policy* code (Spamhaus
PBL: "this range should not send mail directly") is not, and an *error* code (Spamhaus
127.255.255.x: public resolver, over quota, typo) is the list refusing to answer. Errors are
never counted as listings.

Queries follow RFC 5782: IPv4 ``a.b.c.d`` is looked up as ``d.c.b.a.<zone>`` type A, IPv6 as
its 32 reversed nibbles; NXDOMAIN means not listed; an A record in 127.0.0.0/8 other than
127.0.0.1 means listed, anything else is an invalid answer. The TXT record at the same name
is fetched for listed addresses.

Example::

    from smtpguard.response.dnsbl import DnsblConfig, check_sync, summary

    results = check_sync(["192.0.2.1"], ["spamhaus-zen", "spamcop"],
                         config=DnsblConfig(resolvers=["127.0.0.1:5353"]))
    for ip, s in summary(results).items():
        print(ip, s.score, s.listed, s.policy, s.errors)

A long-running process keeps one :class:`Checker`, so that its cache and query-rate bound
span every check it makes.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import math
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Literal, Union

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import msgspec

from smtpguard.core import metrics
# the zone types and the [dnsbl] options are declared with the config, and used from here too
from smtpguard.core.config import (ANSWER_NET, DEFAULT_ZONES, NEVER_LISTED, Category, Code, DnsblConfig,  # noqa: F401
                                   Zone, _parse_code_range, parse_resolver)
from smtpguard.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

Status = Literal["listed", "policy", "not_listed", "error"]
ErrorKind = Literal["list_error", "invalid_answer", "no_answer", "servfail", "refused", "timeout",
                    "no_nameservers", "dns_error"]

#: RFC 5782: every answer of a DNSBL lies in 127.0.0.0/8, and 127.0.0.1 is never a listing.
PUBLIC_RESOLVERS = frozenset({
    "8.8.8.8", "8.8.4.4", "2001:4860:4860::8888", "2001:4860:4860::8844",    # Google
    "1.1.1.1", "1.0.0.1", "2606:4700:4700::1111", "2606:4700:4700::1001",    # Cloudflare
    "9.9.9.9", "149.112.112.112", "2620:fe::fe", "2620:fe::9",                # Quad9
    "208.67.222.222", "208.67.220.220", "2620:119:35::35", "2620:119:53::53",  # OpenDNS
    "94.140.14.14", "94.140.15.15",                                           # AdGuard
    "64.6.64.6", "64.6.65.6",                                                 # Verisign
    "185.228.168.9", "185.228.169.9",                                         # CleanBrowsing
    "76.76.2.0", "76.76.10.0",                                                # Control D
    "4.2.2.1", "4.2.2.2", "4.2.2.3", "4.2.2.4", "4.2.2.5", "4.2.2.6",         # Level3
})



# -- zones ----------------------------------------------------------------------------------------
class CodeTable:
    """A zone's codes compiled for lookup: the most specific (narrowest) matching entry wins."""

    def __init__(self, codes: dict[str, Code]):
        entries = [(*_parse_code_range(k), k, c) for k, c in codes.items()]
        self._entries = sorted(entries, key=lambda e: e[1] - e[0])

    def lookup(self, address: ipaddress.IPv4Address) -> Code | None:
        n = int(address)
        for first, last, _key, code in self._entries:
            if first <= n <= last:
                return code
        return None


# The catalogue. Codes and meanings as each list documents them (Spamhaus: the datasets/zones
# page of docs.spamhaus.com; the others: their usage pages); weights are our judgement of each
# list's precision.
SPAMHAUS_ERRORS = {
    "127.255.255.0/24": Code("Spamhaus error code (127.255.255.0/24 is reserved for errors)", "error"),
    "127.255.255.252": Code("typing error in the DNSBL name", "error"),
    "127.255.255.254": Code("query came through a public or unattributable resolver; use your own resolver or DQS",
                            "error"),
    "127.255.255.255": Code("excessive number of queries (over the free-use volume)", "error"),
}
SPAMHAUS_SBL = {
    "127.0.0.2": Code("SBL: direct spam source or spam support"),
    "127.0.0.3": Code("CSS: automated snowshoe spam source"),
    "127.0.0.9": Code("DROP: hijacked or criminal network"),
    "127.0.0.30": Code("BCL: botnet controller"),
}
SPAMHAUS_XBL = {"127.0.0.4": Code("XBL: exploited or infected host (e.g. a spambot)")}
SPAMHAUS_PBL = {
    "127.0.0.10": Code("PBL: range should not send mail directly (entry maintained by the ISP)", "policy"),
    "127.0.0.11": Code("PBL: range should not send mail directly (entry maintained by Spamhaus)", "policy"),
}
SPAMHAUS_DELIST = "https://check.spamhaus.org/"
LISTED_2 = {"127.0.0.2": Code("listed")}

CATALOGUE: tuple[Zone, ...] = (
    Zone("spamhaus-zen", "zen.spamhaus.org", {**SPAMHAUS_SBL, **SPAMHAUS_XBL, **SPAMHAUS_PBL, **SPAMHAUS_ERRORS},
         weight=1.0, delist_url=SPAMHAUS_DELIST, ipv6=True),
    Zone("spamhaus-sbl", "sbl.spamhaus.org", {**SPAMHAUS_SBL, **SPAMHAUS_ERRORS},
         weight=1.0, delist_url=SPAMHAUS_DELIST, ipv6=True),
    Zone("spamhaus-xbl", "xbl.spamhaus.org", {**SPAMHAUS_XBL, **SPAMHAUS_ERRORS},
         weight=1.0, delist_url=SPAMHAUS_DELIST, ipv6=True),
    Zone("spamhaus-pbl", "pbl.spamhaus.org", {**SPAMHAUS_PBL, **SPAMHAUS_ERRORS},
         weight=0.0, delist_url=SPAMHAUS_DELIST, ipv6=True),
    Zone("spamcop", "bl.spamcop.net", {"127.0.0.2": Code("reported spam source (entries expire automatically)")},
         weight=0.8, delist_url="https://www.spamcop.net/bl.shtml"),
    # Barracuda answers only resolvers registered with it; unregistered ones may time out.
    Zone("barracuda", "b.barracudacentral.org", {"127.0.0.2": Code("listed in the Barracuda Reputation Block List")},
         weight=0.8, delist_url="https://www.barracudacentral.org/rbl/removal-request"),
    Zone("uceprotect-1", "dnsbl-1.uceprotect.net", {"127.0.0.2": Code("UCEPROTECT level 1: this address hit spam traps")},
         weight=0.5, delist_url="https://www.uceprotect.net/en/rblcheck.php"),
    # The numeric values of the reputation levels L5..L3 (.10-.12) are not confirmed by
    # mailspike.org's own table; check them before giving this list more weight.
    Zone("mailspike-bl", "bl.mailspike.net", {
        "127.0.0.2": Code("took part in a distributed spam wave"),
        "127.0.0.10": Code("reputation L5 (worst)"),
        "127.0.0.11": Code("reputation L4"),
        "127.0.0.12": Code("reputation L3"),
    }, weight=0.5, delist_url="https://mailspike.org/"),
    Zone("psbl", "psbl.surriel.com", {"127.0.0.2": Code("hit the PSBL spam traps")},
         weight=0.5, delist_url="https://psbl.org/"),
)

def load_zones_file(path: str | Path) -> list[Zone]:
    """Read a TOML file of ``[[zones]]`` tables; raise :class:`ConfigError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dnsbl.zones_file {p} not found")
    try:
        data = tomllib.loads(p.read_text())
        return msgspec.convert(data, ZonesFile).zones
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"dnsbl.zones_file {p}: {e}") from None
    except msgspec.ValidationError as e:
        raise ConfigError(f"dnsbl.zones_file {p}: {str(e).replace('$.', '')}") from None


class ZonesFile(msgspec.Struct, forbid_unknown_fields=True):
    zones: list[Zone] = msgspec.field(default_factory=list)


def zone_catalogue(cfg: DnsblConfig) -> dict[str, Zone]:
    """Every zone known to this config by name: built-ins, then zones_file, then dnsbl.zones."""
    out = {z.name: z for z in CATALOGUE}
    for z in (load_zones_file(cfg.zones_file) if cfg.zones_file else []):
        out[z.name] = z
    for z in cfg.zones:
        out[z.name] = z
    return out


def validate(cfg: DnsblConfig) -> dict[str, Zone]:
    """Checks across the section that types alone cannot express; returns the zone catalogue."""
    zones = zone_catalogue(cfg)
    unknown = [n for n in cfg.default_zones if n not in zones]
    if unknown:
        raise ConfigError(f"invalid config: dnsbl.default_zones names unknown zones {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(zones))}")
    return zones


# -- answers --------------------------------------------------------------------------------------
class Hit(msgspec.Struct, frozen=True):
    """One A record of an answer with what it means in its zone."""

    code: str
    meaning: str
    category: Category


class Listed(msgspec.Struct, frozen=True, tag="listed", tag_field="status"):
    """The list says this address is a source of abuse: at least one code is a listing.

    ``hits`` keeps every returned code, since one answer can carry several (zen returns
    127.0.0.4 and 127.0.0.11 for an infected host in a PBL range).
    """

    hits: tuple[Hit, ...]
    txt: str = ""
    category: ClassVar[Category] = "listing"

    @property
    def code(self) -> str:
        return next(h.code for h in self.hits if h.category == "listing")


class PolicyListed(msgspec.Struct, frozen=True, tag="policy", tag_field="status"):
    """Only policy codes (e.g. Spamhaus PBL): the range should not send mail directly. Not evidence of abuse."""

    hits: tuple[Hit, ...]
    txt: str = ""
    category: ClassVar[Category] = "policy"

    @property
    def code(self) -> str:
        return self.hits[0].code


class NotListed(msgspec.Struct, frozen=True, tag="not_listed", tag_field="status"):
    """NXDOMAIN: the list does not list this address."""


class Error(msgspec.Struct, frozen=True, tag="error", tag_field="status"):
    """No usable answer: never a listing and never a clean bill either."""

    kind: ErrorKind
    detail: str
    hits: tuple[Hit, ...] = ()


Answer = Union[Listed, PolicyListed, NotListed, Error]


def classify(table: CodeTable, addresses: Sequence[str]) -> Listed | PolicyListed | Error:
    """Read the A records of a positive answer.

    Any record outside 127.0.0.0/8 or equal to 127.0.0.1 makes the whole answer invalid (a
    resolver that rewrites NXDOMAIN, or a list that has shut down and answers everything);
    any error code makes it the list's refusal; otherwise a listing code wins over policy codes.
    """
    hits: list[Hit] = []
    for text in addresses:
        addr = ipaddress.IPv4Address(text)
        if addr not in ANSWER_NET or addr == NEVER_LISTED:
            return Error("invalid_answer", f"answer {text} is outside 127.0.0.0/8 or is 127.0.0.1, "
                                           "which RFC 5782 rules out for a listing", ())
        code = table.lookup(addr)
        hits.append(Hit(text, code.meaning, code.category) if code else
                    Hit(text, f"unknown code {text} (not in the zone's table)", "listing"))
    errors = [h for h in hits if h.category == "error"]
    if errors:
        return Error("list_error", "; ".join(f"{h.code}: {h.meaning}" for h in errors), tuple(hits))
    if any(h.category == "listing" for h in hits):
        return Listed(tuple(hits))
    return PolicyListed(tuple(hits))


class Result(msgspec.Struct, frozen=True):
    """One address looked up in one zone."""

    ip: str
    zone: str
    """the zone's name (catalogue name, e.g. spamhaus-zen)"""
    answer: Answer
    ttl: int | None
    """seconds the answer stays cached (the remaining time when served from cache); None when it is not
    cached (timeouts, SERVFAIL and other failures of the query itself)"""
    delist_url: str
    weight: float
    elapsed_ms: float
    """time spent on the DNS queries of this lookup (0 when served from cache)"""
    cached: bool
    query: str
    """the name queried, with a DQS key masked"""

    @property
    def status(self) -> Status:
        return {Listed: "listed", PolicyListed: "policy", NotListed: "not_listed", Error: "error"}[type(self.answer)]

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(h.code for h in getattr(self.answer, "hits", ()))

    @property
    def meaning(self) -> str:
        if isinstance(self.answer, Error):
            return self.answer.detail
        return "; ".join(h.meaning for h in getattr(self.answer, "hits", ()))

    @property
    def txt(self) -> str:
        return getattr(self.answer, "txt", "")

    @property
    def error(self) -> ErrorKind | None:
        return self.answer.kind if isinstance(self.answer, Error) else None

    def to_dict(self) -> dict[str, object]:
        """The result as one flat JSON object (what ``smtpguard dnsbl check --json`` prints)."""
        a = self.answer
        return {
            "ip": self.ip, "zone": self.zone, "status": self.status, "codes": list(self.codes),
            "meaning": self.meaning, "txt": self.txt,
            "categories": [h.category for h in getattr(a, "hits", ())],
            "error": self.error,
            "ttl": self.ttl, "delist_url": self.delist_url, "weight": self.weight,
            "elapsed_ms": round(self.elapsed_ms, 1), "cached": self.cached, "query": self.query,
        }


class IpSummary(msgspec.Struct):
    """What the zones said about one address."""

    ip: str
    score: float = 0.0
    """sum of the weights of the zones that list the address"""
    listed: list[str] = msgspec.field(default_factory=list)
    policy: list[str] = msgspec.field(default_factory=list)
    """zones with a policy code for the address (not evidence of abuse)"""
    errors: list[str] = msgspec.field(default_factory=list)
    """"zone: kind" for each zone that gave no usable answer"""
    not_listed: list[str] = msgspec.field(default_factory=list)


def summary(results: Iterable[Result]) -> dict[str, IpSummary]:
    """Per address, in the order first seen: listing zones with their weighted score, policy listings, errors."""
    out: dict[str, IpSummary] = {}
    for r in results:
        s = out.setdefault(r.ip, IpSummary(r.ip))
        a = r.answer
        if isinstance(a, Listed):
            s.listed.append(r.zone)
            s.score = round(s.score + r.weight, 6)
        if isinstance(a, (Listed, PolicyListed)) and any(h.category == "policy" for h in a.hits):
            s.policy.append(r.zone)
        if isinstance(a, Error):
            s.errors.append(f"{r.zone}: {a.kind}")
        if isinstance(a, NotListed):
            s.not_listed.append(r.zone)
    return out


# -- query names ----------------------------------------------------------------------------------
def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address to check; IPv4-mapped IPv6 (::ffff:a.b.c.d) is read as the IPv4 address."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise InputError(f"{text!r} is not an IPv4 or IPv6 address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def reversed_name(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """RFC 5782: ``192.0.2.1`` -> ``1.2.0.192``; IPv6 -> its 32 nibbles, least significant first."""
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def query_name(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: Zone) -> dns.name.Name:
    """The absolute name to query, e.g. ``1.2.0.192.zen.spamhaus.org.``."""
    return dns.name.from_text(f"{reversed_name(addr)}.{zone.query_zone}.")


def _shown_query(qname: dns.name.Name, zone: Zone) -> str:
    text = qname.to_text(omit_final_dot=True)
    return text.replace(f".{zone.dqs_key}.", ".<dqs-key>.") if zone.dqs_key else text


# -- rate bound and cache ------------------------------------------------------------------------
class TokenBucket:
    """At most ``rate_per_s`` grants per second on average, bursts of up to ``burst``.

    ``clock`` and ``sleep`` are injectable so that the bound can be checked on a virtual clock.
    Waiters are served in arrival order (the lock is held while waiting).
    """

    def __init__(self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if not rate_per_s > 0 or burst < 1:
            raise ValueError("a token bucket needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._last = clock()
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.granted = 0
        """tokens handed out so far: the number of DNS queries sent"""

    def _lock_here(self) -> asyncio.Lock:
        # An asyncio lock belongs to one event loop; a bucket outlives a loop when
        # check_sync is called more than once with the same Checker.
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock

    async def take(self) -> None:
        async with self._lock_here():
            while True:
                now = self._clock()
                self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate_per_s)
                self._last = now
                # the tolerance keeps float rounding of the refill from asking for a sleep too
                # short to move the clock
                if self._tokens >= 1 - 1e-9:
                    self._tokens = max(0.0, self._tokens - 1)
                    self.granted += 1
                    return
                await self._sleep((1 - self._tokens) / self.rate_per_s)


class Cache:
    """Answers by (resolvers, zone name, query name) until their TTL runs out; least recently used dropped first."""

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self._clock = clock
        self._data: collections.OrderedDict[tuple[str, str, str], tuple[float, Answer]] = collections.OrderedDict()
        self.hits = 0

    def get(self, key: tuple[str, str, str]) -> tuple[Answer, int] | None:
        """The answer and its remaining TTL in whole seconds, or None."""
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, answer = entry
        left = expires - self._clock()
        if left <= 0:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return answer, math.ceil(left)

    def put(self, key: tuple[str, str, str], answer: Answer, ttl_s: int) -> None:
        if self.max_entries <= 0 or ttl_s <= 0:
            return
        self._data[key] = (self._clock() + ttl_s, answer)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


# -- lookups --------------------------------------------------------------------------------------
class Checker:
    """Looks addresses up in zones: concurrent, rate-bounded, cached. Keep one per process.

    ``cache`` and ``bucket`` may be given to share them or to run them on a virtual clock.
    """

    def __init__(self, config: DnsblConfig | None = None, *, cache: Cache | None = None,
                 bucket: TokenBucket | None = None):
        self.config = config or DnsblConfig()
        self.zones = validate(self.config)
        self.cache = cache if cache is not None else Cache(self.config.cache_max_entries)
        rate = self.config.max_queries_per_s
        self.bucket = bucket if bucket is not None else TokenBucket(rate, max(1, int(rate)))
        self._resolvers: dict[tuple[tuple[str, int], ...], dns.asyncresolver.Resolver] = {}
        # by identity: a Zone passed to check() may share a name with a catalogue entry
        self._tables: dict[int, tuple[Zone, CodeTable]] = {}
        self._system: list[tuple[str, int]] | None = None
        self._warned: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        """the most lookups that were in flight at once (bounded by dnsbl.max_concurrent)"""

    def _zones(self, zones: Sequence[str | Zone] | None) -> list[Zone]:
        if not zones:
            return self.select(None)
        out: list[Zone] = []
        for z in zones:
            if isinstance(z, Zone):
                if z.kind != "ip":
                    raise ConfigError(f"zone {z.name} lists domain names; a check looks up IP addresses")
                out.append(z)
            else:
                out.extend(self.select([z]))
        return out

    def select(self, names: Sequence[str] | None) -> list[Zone]:
        """Zones by name (None = dnsbl.default_zones); unknown names raise :class:`ConfigError`."""
        names = list(names) if names else list(self.config.default_zones)
        unknown = [n for n in names if n not in self.zones]
        if unknown:
            raise ConfigError(f"unknown DNSBL zone {', '.join(unknown)}; known: {', '.join(sorted(self.zones))} "
                              "(see `smtpguard dnsbl zones`)")
        zones = [self.zones[n] for n in dict.fromkeys(names)]
        domain = [z.name for z in zones if z.kind != "ip"]
        if domain:
            raise ConfigError(f"zone {', '.join(domain)} lists domain names; a check looks up IP addresses")
        return zones

    def nameservers(self, zone: Zone, resolver: str | None = None) -> list[tuple[str, int]]:
        """The resolvers a zone is queried through: the override, the zone's, dnsbl.resolvers or the system's."""
        if resolver:
            return [parse_resolver(resolver)]
        if zone.resolver:
            return [parse_resolver(zone.resolver)]
        if self.config.resolvers:
            return [parse_resolver(r) for r in self.config.resolvers]
        if self._system is None:
            try:
                system = dns.resolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                raise ConfigError("no dnsbl.resolvers configured and the system has no resolver (/etc/resolv.conf); "
                                  "set dnsbl.resolvers or pass --resolver") from None
            self._system = [(ns, system.port) if isinstance(ns, str) else (ns.address, ns.port)
                            for ns in system.nameservers]
        return self._system

    def warnings(self, zones: Sequence[Zone], resolver: str | None = None) -> list[str]:
        """Configuration that will make lists refuse to answer, e.g. Spamhaus through a public resolver."""
        out = []
        for z in zones:
            if z.dqs_key or not z.zone.rstrip(".").endswith(".spamhaus.org"):
                continue
            public = [host for host, _ in self.nameservers(z, resolver) if host in PUBLIC_RESOLVERS]
            if public:
                out.append(f"zone {z.name}: Spamhaus refuses queries through public resolvers ({', '.join(public)}) "
                           "with 127.255.255.254; use your own recursive resolver or a DQS key (dqs_key)")
        return out

    def _table(self, zone: Zone) -> CodeTable:
        entry = self._tables.get(id(zone))
        if entry is None or entry[0] is not zone:
            entry = self._tables[id(zone)] = (zone, CodeTable(zone.codes))
        return entry[1]

    def _resolver(self, servers: list[tuple[str, int]]) -> dns.asyncresolver.Resolver:
        key = tuple(servers)
        r = self._resolvers.get(key)
        if r is None:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
            # Retrying a SERVFAIL within one lookup only spends the time budget; it is reported instead.
            r.retry_servfail = False
            r.cache = None
            self._resolvers[key] = r
        return r

    async def check(self, ips: Sequence[str], zones: Sequence[str | Zone] | None = None, *,
                    resolver: str | None = None, timeout_ms: int | None = None) -> list[Result]:
        """Look every address up in every zone; results in address order, then zone order.

        ``zones`` are names or :class:`Zone` objects (None = dnsbl.default_zones); ``resolver``
        (HOST:PORT) and ``timeout_ms`` override the config for every zone. Bad addresses raise
        :class:`InputError`, unknown zones :class:`ConfigError`; DNS failures are results.
        IPv6 addresses are looked up only in zones with ``ipv6 = true``.
        """
        addrs = [parse_ip(ip) for ip in ips]
        if resolver:
            try:
                parse_resolver(resolver)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if timeout_ms is not None and timeout_ms <= 0:
            raise ConfigError("timeout_ms must be positive")
        chosen = self._zones(zones)
        for w in self.warnings(chosen, resolver):
            if w not in self._warned:
                self._warned.add(w)
                log.warning(w)
        sem = asyncio.Semaphore(self.config.max_concurrent)
        jobs = [self._lookup(sem, a, z, resolver, timeout_ms)
                for a in addrs for z in chosen if isinstance(a, ipaddress.IPv4Address) or z.ipv6]
        results = list(await asyncio.gather(*jobs))
        _count(results)
        return results

    async def _lookup(self, sem: asyncio.Semaphore, addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
                      zone: Zone, resolver: str | None, timeout_ms: int | None) -> Result:
        qname = query_name(addr, zone)
        servers = self.nameservers(zone, resolver)
        key = (",".join(f"{h}#{p}" for h, p in servers), zone.name, qname.to_text())

        def result(answer: Answer, ttl: int | None, elapsed_ms: float, cached: bool) -> Result:
            return Result(str(addr), zone.name, answer, ttl, zone.delist_url, zone.weight, elapsed_ms, cached,
                          _shown_query(qname, zone))

        hit = self.cache.get(key)
        if hit is not None:
            return result(hit[0], hit[1], 0.0, True)
        budget_s = (timeout_ms or zone.timeout_ms or self.config.timeout_ms) / 1000
        async with sem:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self.bucket.take()
                start = time.monotonic()
                answer, ttl = await self._query(self._resolver(servers), qname, zone, budget_s, start)
                elapsed_ms = (time.monotonic() - start) * 1000
            finally:
                self.in_flight -= 1
        if ttl is not None:
            ttl = min(ttl, self.config.cache_max_ttl_s)
            self.cache.put(key, answer, ttl)
        return result(answer, ttl, elapsed_ms, False)

    async def _query(self, res: dns.asyncresolver.Resolver, qname: dns.name.Name, zone: Zone, budget_s: float,
                     start: float) -> tuple[Answer, int | None]:
        """A (and TXT when listed) within the budget; the answer and how long it may be cached (None: not at all)."""
        try:
            ans = await res.resolve(qname, dns.rdatatype.A, lifetime=budget_s, search=False)
        except dns.resolver.NXDOMAIN as e:
            return NotListed(), self._negative_ttl(e, qname)
        except dns.resolver.NoAnswer:
            return Error("no_answer", f"NOERROR without an A record for {qname}: neither a listing nor NXDOMAIN"), None
        except dns.resolver.LifetimeTimeout:
            return Error("timeout", f"no answer within {budget_s * 1000:.0f} ms"), None
        except dns.resolver.NoNameservers as e:
            return _no_nameservers(e), None
        except dns.exception.DNSException as e:
            return Error("dns_error", f"{type(e).__name__}: {e}"), None
        # dnspython matched the id and question; the records must also be owned by the queried name
        # (no redirection to another name).
        if ans.rrset is None or ans.rrset.name != qname or ans.canonical_name != qname:
            owner = ans.rrset.name if ans.rrset is not None else None
            return Error("invalid_answer", f"answer owned by {owner} does not match the query {qname}"), None
        answer = classify(self._table(zone), [rd.address for rd in ans.rrset])
        if isinstance(answer, (Listed, PolicyListed)):
            answer = msgspec.structs.replace(answer, txt=await self._txt(res, qname, budget_s, start))
        return answer, ans.rrset.ttl

    async def _txt(self, res: dns.asyncresolver.Resolver, qname: dns.name.Name, budget_s: float, start: float) -> str:
        # The TXT is the list's explanation; the listing stands on the A record alone, so a TXT
        # failure leaves it empty rather than turning the listing into an error.
        left = budget_s - (time.monotonic() - start)
        if left <= 0.01:
            return ""
        await self.bucket.take()
        try:
            ans = await res.resolve(qname, dns.rdatatype.TXT, lifetime=left, search=False)
        except dns.exception.DNSException as e:
            log.debug("TXT %s: %s", qname, e)
            return ""
        if ans.rrset is None or ans.rrset.name != qname:
            return ""
        return " | ".join(b"".join(rd.strings).decode("utf-8", "replace") for rd in ans.rrset)

    def _negative_ttl(self, e: dns.resolver.NXDOMAIN, qname: dns.name.Name) -> int:
        # RFC 2308: a negative answer is cached for min(SOA TTL, SOA MINIMUM) of the SOA in the
        # authority section.
        try:
            response = e.response(qname)
        except KeyError:
            return self.config.cache_negative_ttl_s
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return min(rrset.ttl, rrset[0].minimum)
        return self.config.cache_negative_ttl_s


def _count(results: Sequence[Result]) -> None:
    """The lookups in the metrics: one call per zone and answer, not per lookup."""
    for (zone, status), n in collections.Counter((r.zone, r.status) for r in results).items():
        metrics.DNSBL_LOOKUPS.labels(zone, status).inc(n)
    for (zone, kind), n in collections.Counter((r.zone, r.error) for r in results if r.error).items():
        metrics.DNSBL_ERRORS.labels(zone, kind).inc(n)
    for zone, n in collections.Counter(r.zone for r in results if r.cached).items():
        metrics.DNSBL_CACHE_HITS.labels(zone).inc(n)


def _no_nameservers(e: dns.resolver.NoNameservers) -> Error:
    """Every resolver failed: SERVFAIL and REFUSED are told apart, the rest is reported as it came."""
    errors = e.kwargs.get("errors") or []
    rcodes = {resp.rcode() for *_, resp in errors if resp is not None}
    detail = "; ".join(f"{server}:{port}: {err}" for server, _tcp, port, err, _resp in errors) or str(e)
    if rcodes == {dns.rcode.SERVFAIL}:
        return Error("servfail", f"SERVFAIL ({detail})")
    if rcodes == {dns.rcode.REFUSED}:
        return Error("refused", f"REFUSED ({detail})")
    return Error("no_nameservers", f"no resolver answered ({detail})")


async def check(ips: Sequence[str], zones: Sequence[str | Zone] | None = None, *, config: DnsblConfig | None = None,
                resolver: str | None = None, timeout_ms: int | None = None,
                checker: Checker | None = None) -> list[Result]:
    """Look ``ips`` up in ``zones`` (names or :class:`Zone`; None = dnsbl.default_zones).

    Pass ``checker`` to reuse its cache and rate bound across calls; otherwise a fresh one is
    built from ``config``.
    """
    c = checker or Checker(config)
    return await c.check(ips, zones, resolver=resolver, timeout_ms=timeout_ms)


def check_sync(ips: Sequence[str], zones: Sequence[str | Zone] | None = None, **kwargs: object) -> list[Result]:
    """:func:`check` for code without an event loop (runs one)."""
    return asyncio.run(check(ips, zones, **kwargs))  # type: ignore[arg-type]
