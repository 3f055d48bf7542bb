"""DNSBL checks against a real rbldnsd on loopback (smtpguard/rbldnsd.py), plus small loopback UDP
servers for what rbldnsd never does (stay silent, SERVFAIL, answer for another name).

Every query goes to 127.0.0.1: each config names the local server as its resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading

import dns.message
import dns.rcode
import dns.rrset
import msgspec
import pytest
from click.testing import CliRunner

from smtpguard.response import dnsbl
from smtpguard.cli.dnsbl import dnsbl_group
from smtpguard.response.dnsbl import (Cache, Checker, DnsblConfig, Error, Listed, NotListed, PolicyListed, TokenBucket, Zone,
                             check, check_sync, summary)
from smtpguard.core.errors import ConfigError, InputError

from smtpguard.lab.rbldnsd import Dataset, Rbldnsd

CATALOGUE = {z.name: z for z in dnsbl.CATALOGUE}
# The catalogue's Spamhaus ZEN codes, served from a local test zone.
TEST_ZEN = msgspec.structs.replace(CATALOGUE["spamhaus-zen"], name="test-zen", zone="zen.dnsbl.test",
                                   delist_url="https://dnsbl.test/remove")
OTHER = Zone("test-other", "other.dnsbl.test", {"127.0.0.2": dnsbl.Code("spam trap hit")}, weight=0.5)
NOSOA = Zone("test-nosoa", "nosoa.dnsbl.test", {"127.0.0.2": dnsbl.Code("listed")})
UNSERVED = Zone("test-unserved", "unserved.dnsbl.test", {})

ZEN_LINES = [
    ":127.0.0.2:Listed, see https://dnsbl.test/lookup?$",
    "192.0.2.1",
    "192.0.2.10 :127.0.0.10:Dynamic range of an ISP",
    "192.0.2.11 :127.0.0.11:Dynamic range",
    # one address, two A records: an infected host inside a PBL range
    "192.0.2.12 :127.0.0.4:Infected",
    "192.0.2.12 :127.0.0.11:",
    "192.0.2.20 :10.0.0.1:",
    "192.0.2.21 :127.0.0.1:",
    "192.0.2.30 :127.0.0.77:",
    "192.0.2.252 :127.255.255.252:Typo in the zone name",
    "192.0.2.253 :127.255.255.253:",
    "192.0.2.254 :127.255.255.254:Open resolver",
    "192.0.2.255 :127.255.255.255:Over quota",
    # addresses reserved for the cache and rate tests (one set per test, so query counts are theirs alone)
    "198.51.100.1",
    "198.51.100.2",
]
ZEN6_LINES = [
    ":127.0.0.2:IPv6 listed $",
    "2001:db8:1::/48",
    "2001:db8:2::5 :127.0.0.10:Dynamic IPv6",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Rbldnsd(tmp_path_factory.mktemp("rbldnsd"), [
        Dataset("zen.dnsbl.test", "ip4set", ZEN_LINES),
        Dataset("zen.dnsbl.test", "ip6trie", ZEN6_LINES),
        Dataset("other.dnsbl.test", "ip4set", [":127.0.0.2:Trap hit", "192.0.2.1"]),
        Dataset("nosoa.dnsbl.test", "ip4set", ["192.0.2.1"], soa=False),
    ])
    srv.start()
    yield srv
    srv.stop()


def config(resolver: str, **kw) -> DnsblConfig:
    base = dict(resolvers=[resolver], zones=[TEST_ZEN, OTHER, NOSOA, UNSERVED], default_zones=["test-zen"],
                timeout_ms=2000)
    return DnsblConfig(**{**base, **kw})


def one(results: list[dnsbl.Result]) -> dnsbl.Result:
    assert len(results) == 1, results
    return results[0]


def lookup(server: Rbldnsd, ip: str, zone: str = "test-zen", **kw) -> dnsbl.Result:
    return one(check_sync([ip], [zone], config=config(server.resolver, **kw)))


def count(server: Rbldnsd, name: str) -> int:
    return sum(1 for q in server.queries() if q.name == name)


class VirtualClock:
    """Time that moves only when told to, or when a token bucket sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


# -- query names and config ------------------------------------------------------------------------
def test_query_names_follow_rfc5782():
    zone = CATALOGUE["spamhaus-zen"]
    assert str(dnsbl.query_name(dnsbl.parse_ip("192.0.2.99"), zone)) == "99.2.0.192.zen.spamhaus.org."
    # the RFC 5782 section 2.4 example
    v6 = dnsbl.query_name(dnsbl.parse_ip("2001:db8:1:2:3:4:567:89ab"), zone)
    assert str(v6) == "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.zen.spamhaus.org."
    assert str(dnsbl.parse_ip("::ffff:192.0.2.1")) == "192.0.2.1"
    dqs = msgspec.structs.replace(zone, dqs_key="k3y")
    assert str(dnsbl.query_name(dnsbl.parse_ip("192.0.2.1"), dqs)) == "1.2.0.192.k3y.zen.dq.spamhaus.net."
    with pytest.raises(InputError, match="not an IPv4 or IPv6"):
        dnsbl.parse_ip("192.0.2.300")


def test_catalogue_carries_the_reference_codes():
    zen = dnsbl.CodeTable(CATALOGUE["spamhaus-zen"].codes)

    def cat(code: str) -> str:
        c = zen.lookup(ipaddress.IPv4Address(code))
        return c.category if c else "unmapped"

    assert [cat(c) for c in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9")] == ["listing"] * 4
    assert [cat(c) for c in ("127.0.0.10", "127.0.0.11")] == ["policy"] * 2
    assert [cat(c) for c in ("127.255.255.252", "127.255.255.254", "127.255.255.255", "127.255.255.1")] == ["error"] * 4
    assert "public" in zen.lookup(ipaddress.IPv4Address("127.255.255.254")).meaning
    assert set(dnsbl.DEFAULT_ZONES) <= set(CATALOGUE)
    for name in ("spamcop", "barracuda", "uceprotect-1", "mailspike-bl", "psbl"):
        assert cat_of(name, "127.0.0.2") == "listing" and CATALOGUE[name].delist_url.startswith("https://")


def cat_of(zone: str, code: str) -> str:
    c = dnsbl.CodeTable(CATALOGUE[zone].codes).lookup(ipaddress.IPv4Address(code))
    return c.category if c else "unmapped"


@pytest.mark.parametrize("data,needle", [
    ({"zones": [{"name": "x", "zone": "bl.example", "codes": {"10.0.0.2": {"meaning": "m"}}}]}, "outside 127.0.0.0/8"),
    ({"zones": [{"name": "x", "zone": "bl.example", "codes": {"127.0.0.1": {"meaning": "m"}}}]}, "never a valid"),
    ({"zones": [{"name": "x", "zone": "bl.example", "codes": {"127.0.0.2": {"meaning": "m", "category": "bad"}}}]},
     "category"),
    ({"zones": [{"name": "x", "zone": "bl.example", "dqs_key": "abc"}]}, "only applies to Spamhaus"),
    ({"resolvers": ["resolver.example:53"]}, "must be an IP address"),
    ({"resolvers": ["127.0.0.1:99999"]}, "not a UDP port"),
    ({"timeout_ms": 0}, "timeout_ms"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_bad_config_is_rejected_with_its_reason(data, needle):
    with pytest.raises(msgspec.ValidationError, match=needle):
        msgspec.convert(data, DnsblConfig)


def test_default_zones_must_exist_and_zones_file_overrides_the_catalogue(tmp_path):
    with pytest.raises(ConfigError, match="unknown zones nope"):
        dnsbl.validate(DnsblConfig(default_zones=["spamcop", "nope"]))
    f = tmp_path / "zones.toml"
    f.write_text('[[zones]]\nname = "spamcop"\nzone = "bl.spamcop.test"\nweight = 0.1\n'
                 '[[zones]]\nname = "local"\nzone = "bl.local.test"\n'
                 'codes = { "127.0.0.0/24" = { meaning = "local list" } }\n')
    zones = dnsbl.validate(DnsblConfig(zones_file=str(f), default_zones=["local"]))
    assert zones["spamcop"].zone == "bl.spamcop.test" and zones["spamcop"].weight == 0.1
    assert zones["local"].codes["127.0.0.0/24"].meaning == "local list"
    assert "spamhaus-zen" in zones
    f.write_text('[[zones]]\nname = "bad"\nzone = "bl.local.test"\nweight = -1\n')
    with pytest.raises(ConfigError, match="zones_file.*weight"):
        dnsbl.validate(DnsblConfig(zones_file=str(f)))


def test_public_resolver_for_spamhaus_draws_a_warning():
    zen, spamcop = CATALOGUE["spamhaus-zen"], CATALOGUE["spamcop"]
    public = Checker(DnsblConfig(resolvers=["8.8.8.8", "10.0.0.53"]))
    [w] = public.warnings([zen, spamcop])
    assert "spamhaus-zen" in w and "8.8.8.8" in w and "127.255.255.254" in w
    assert public.warnings([msgspec.structs.replace(zen, dqs_key="k3y")]) == []
    assert Checker(DnsblConfig(resolvers=["10.0.0.53"])).warnings([zen]) == []
    assert public.warnings([zen], resolver="10.0.0.53:53") == []
    assert Checker(DnsblConfig(resolvers=["10.0.0.53"])).warnings([zen], resolver="1.1.1.1") != []


# -- answers from rbldnsd --------------------------------------------------------------------------
def test_listed_address_has_code_meaning_and_txt(server):
    r = lookup(server, "192.0.2.1")
    assert isinstance(r.answer, Listed) and r.status == "listed" and r.answer.category == "listing"
    assert r.codes == ("127.0.0.2",) and r.answer.code == "127.0.0.2"
    assert r.meaning.startswith("SBL")
    assert r.txt == "Listed, see https://dnsbl.test/lookup?192.0.2.1"
    assert r.ttl == 60 and r.delist_url == "https://dnsbl.test/remove" and not r.cached
    assert r.query == "1.2.0.192.zen.dnsbl.test"


def test_unlisted_address_is_nxdomain_with_the_soa_negative_ttl(server):
    r = lookup(server, "192.0.2.99")
    assert isinstance(r.answer, NotListed) and r.status == "not_listed" and r.codes == ()
    assert r.ttl == 45  # min(SOA TTL 60, SOA MINIMUM 45), RFC 2308
    # without a SOA in the answer the configured default applies
    r = lookup(server, "192.0.2.99", zone="test-nosoa", cache_negative_ttl_s=123)
    assert isinstance(r.answer, NotListed) and r.ttl == 123


@pytest.mark.parametrize("ip,code", [("192.0.2.10", "127.0.0.10"), ("192.0.2.11", "127.0.0.11")])
def test_pbl_codes_are_policy_not_listings(server, ip, code):
    r = lookup(server, ip)
    assert isinstance(r.answer, PolicyListed) and r.status == "policy" and r.codes == (code,)
    assert r.meaning.startswith("PBL") and r.txt
    s = summary([r])[ip]
    assert s.listed == [] and s.score == 0 and s.policy == ["test-zen"]


def test_listing_and_policy_in_one_answer_is_a_listing_that_keeps_both(server):
    r = lookup(server, "192.0.2.12")
    assert isinstance(r.answer, Listed)
    assert sorted(r.codes) == ["127.0.0.11", "127.0.0.4"]
    assert sorted(h.category for h in r.answer.hits) == ["listing", "policy"]
    s = summary([r])["192.0.2.12"]
    assert s.listed == ["test-zen"] and s.policy == ["test-zen"] and s.score == 1.0


@pytest.mark.parametrize("ip,code,needle", [
    ("192.0.2.252", "127.255.255.252", "typing error"),
    ("192.0.2.253", "127.255.255.253", "reserved for errors"),
    ("192.0.2.254", "127.255.255.254", "public"),
    ("192.0.2.255", "127.255.255.255", "excessive"),
])
def test_spamhaus_error_codes_are_errors_never_listings(server, ip, code, needle):
    r = lookup(server, ip)
    assert isinstance(r.answer, Error) and r.answer.kind == "list_error" and r.status == "error"
    assert r.codes == (code,) and needle in r.meaning
    s = summary([r])[ip]
    assert s.listed == [] and s.score == 0 and s.errors == ["test-zen: list_error"]


@pytest.mark.parametrize("ip,code", [("192.0.2.20", "10.0.0.1"), ("192.0.2.21", "127.0.0.1")])
def test_answers_rfc5782_rules_out_are_invalid(server, ip, code):
    r = lookup(server, ip)
    assert isinstance(r.answer, Error) and r.answer.kind == "invalid_answer"
    assert code in r.answer.detail and summary([r])[ip].listed == []


def test_unknown_code_in_127_8_is_a_listing_marked_unknown(server):
    r = lookup(server, "192.0.2.30")
    assert isinstance(r.answer, Listed) and r.codes == ("127.0.0.77",) and "unknown code" in r.meaning


def test_ipv6_is_looked_up_by_nibbles_in_zones_that_serve_it(server):
    cfg = config(server.resolver, zones=[TEST_ZEN, OTHER])
    results = check_sync(["2001:db8:1::25", "2001:db8:2::5", "2001:db8:3::1"], ["test-zen", "test-other"], config=cfg)
    # test-other is an IPv4-only list: IPv6 addresses are not sent there
    assert [(r.ip, r.zone, r.status) for r in results] == [
        ("2001:db8:1::25", "test-zen", "listed"),
        ("2001:db8:2::5", "test-zen", "policy"),
        ("2001:db8:3::1", "test-zen", "not_listed"),
    ]
    assert results[0].txt == "IPv6 listed 2001:db8:1::25"
    # 2001:0db8:0001:0000:0000:0000:0000:0025, nibbles least significant first
    nibbles = "5.2.0.0." "0.0.0.0." "0.0.0.0." "0.0.0.0." "0.0.0.0." "1.0.0.0." "8.b.d.0." "1.0.0.2." "zen.dnsbl.test"
    assert results[0].query == nibbles and count(server, nibbles) >= 1


def test_a_zone_the_server_does_not_serve_is_refused(server):
    r = lookup(server, "192.0.2.1", zone="test-unserved")
    assert isinstance(r.answer, Error) and r.answer.kind == "refused" and r.ttl is None


def test_summary_weighs_listings_per_address(server):
    results = check_sync(["192.0.2.1", "192.0.2.10", "192.0.2.254", "192.0.2.99"], ["test-zen", "test-other"],
                         config=config(server.resolver))
    s = summary(results)
    assert list(s) == ["192.0.2.1", "192.0.2.10", "192.0.2.254", "192.0.2.99"]
    assert s["192.0.2.1"].listed == ["test-zen", "test-other"] and s["192.0.2.1"].score == 1.5
    assert s["192.0.2.10"].listed == [] and s["192.0.2.10"].policy == ["test-zen"]
    assert s["192.0.2.254"].errors == ["test-zen: list_error"] and s["192.0.2.254"].score == 0
    assert s["192.0.2.99"].not_listed == ["test-zen", "test-other"] and s["192.0.2.99"].score == 0


# -- cache and rate ---------------------------------------------------------------------------------
def test_answers_are_cached_for_their_ttl(server):
    clock = VirtualClock()
    checker = Checker(config(server.resolver), cache=Cache(1000, clock=clock))
    listed, clean = "1.100.51.198.zen.dnsbl.test", "9.100.51.198.zen.dnsbl.test"

    def run() -> list[dnsbl.Result]:
        return asyncio.run(checker.check(["198.51.100.1", "198.51.100.9"]))

    first = run()
    assert [r.status for r in first] == ["listed", "not_listed"] and not any(r.cached for r in first)
    assert (count(server, listed), count(server, clean)) == (2, 1)  # A + TXT; A only for NXDOMAIN
    sent = checker.bucket.granted

    clock.now += 30
    second = run()
    assert [r.answer for r in second] == [r.answer for r in first] and all(r.cached for r in second)
    assert [r.ttl for r in second] == [30, 15]  # what is left of 60 s and of the 45 s negative TTL
    assert (count(server, listed), count(server, clean), checker.bucket.granted) == (2, 1, sent)
    assert checker.cache.hits == 2

    clock.now += 16  # the NXDOMAIN has expired, the listing has not
    third = run()
    assert [r.cached for r in third] == [True, False]
    assert (count(server, listed), count(server, clean)) == (2, 2)


def test_a_cached_answer_survives_the_server(tmp_path):
    with Rbldnsd(tmp_path / "z", [Dataset("zen.dnsbl.test", "ip4set", [":127.0.0.2:gone soon", "192.0.2.7"])]) as srv:
        checker = Checker(config(srv.resolver, timeout_ms=500))
        first = one(asyncio.run(checker.check(["192.0.2.7"])))
    assert isinstance(first.answer, Listed) and first.txt == "gone soon"
    again = one(asyncio.run(checker.check(["192.0.2.7"])))
    assert again.cached and again.answer == first.answer


def test_failures_are_not_cached(silent_port):
    checker = Checker(config(f"127.0.0.1:{silent_port}", timeout_ms=200))
    for _ in range(2):
        r = one(asyncio.run(checker.check(["192.0.2.1"])))
        assert r.error == "timeout" and not r.cached
    assert len(checker.cache) == 0 and checker.bucket.granted == 2


def test_token_bucket_bounds_the_rate_on_a_virtual_clock():
    clock = VirtualClock()
    bucket = TokenBucket(10, 3, clock=clock, sleep=clock.sleep)

    async def take(n: int) -> None:
        await asyncio.gather(*(bucket.take() for _ in range(n)))

    asyncio.run(take(3))
    assert clock.now == 1000.0 and bucket.granted == 3  # the burst goes out at once
    asyncio.run(take(20))
    assert bucket.granted == 23 and clock.now - 1000.0 == pytest.approx(20 / 10)


def test_queries_to_the_server_respect_the_rate_bound(server):
    clock = VirtualClock()
    bucket = TokenBucket(5, 1, clock=clock, sleep=clock.sleep)
    checker = Checker(config(server.resolver, max_concurrent=8), cache=Cache(0), bucket=bucket)
    ips = [f"203.0.113.{i}" for i in range(1, 11)]
    results = asyncio.run(checker.check(ips))
    assert [r.status for r in results] == ["not_listed"] * 10
    sent = sum(count(server, f"{i}.113.0.203.zen.dnsbl.test") for i in range(1, 11))
    assert bucket.granted == sent == 10
    assert clock.now - 1000.0 >= (10 - 1) / 5 - 1e-9  # N queries at rate R after a burst of 1


# -- failures of the query itself -------------------------------------------------------------------
@pytest.fixture
def silent_port():
    """A bound loopback UDP socket that never replies: queries to it time out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


class Responder:
    """A loopback UDP DNS server whose every answer is made by ``reply(query) -> response``."""

    def __init__(self, reply):
        self.reply = reply
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.sock.sendto(self.reply(dns.message.from_wire(data)).to_wire(), peer)

    def __enter__(self) -> Responder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def servfail(q: dns.message.Message) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.SERVFAIL)
    return r


def answer_for_another_name(q: dns.message.Message) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("2.0.0.127.zen.dnsbl.test.", 60, "IN", "A", "127.0.0.2"))
    return r


def test_a_silent_server_times_out_within_the_configured_time(silent_port):
    r = one(check_sync(["192.0.2.1"], config=config(f"127.0.0.1:{silent_port}", timeout_ms=300)))
    assert isinstance(r.answer, Error) and r.answer.kind == "timeout" and r.status == "error"
    assert 250 <= r.elapsed_ms < 300 + 1500
    assert summary([r])["192.0.2.1"].errors == ["test-zen: timeout"]


def test_lookups_run_concurrently_up_to_the_bound(silent_port):
    checker = Checker(config(f"127.0.0.1:{silent_port}", timeout_ms=300, max_concurrent=3))
    results = asyncio.run(checker.check([f"192.0.2.{i}" for i in range(1, 8)]))
    assert [r.error for r in results] == ["timeout"] * 7
    assert checker.max_in_flight == 3


def test_servfail_is_an_error():
    with Responder(servfail) as srv:
        r = one(check_sync(["192.0.2.1"], config=config(f"127.0.0.1:{srv.port}", timeout_ms=1000)))
    assert r.error == "servfail"


def cname_to_another_name(q: dns.message.Message) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "CNAME", "2.0.0.127.zen.dnsbl.test."))
    r.answer.append(dns.rrset.from_text("2.0.0.127.zen.dnsbl.test.", 60, "IN", "A", "127.0.0.2"))
    return r


def nxdomain_with_soa(ttl_s: int, minimum_s: int):
    def reply(q: dns.message.Message) -> dns.message.Message:
        r = dns.message.make_response(q)
        r.set_rcode(dns.rcode.NXDOMAIN)
        r.authority.append(dns.rrset.from_text("zen.dnsbl.test.", ttl_s, "IN", "SOA",
                                               f"ns.dnsbl.test. hostmaster.dnsbl.test. 1 600 300 86400 {minimum_s}"))
        return r
    return reply


@pytest.mark.parametrize("ttl_s,minimum_s,expected", [(30, 45, 30), (90, 45, 45)])
def test_nxdomain_is_cached_for_the_lesser_of_soa_ttl_and_minimum(ttl_s, minimum_s, expected):
    # rbldnsd always sends the two equal; RFC 2308 section 5 takes the lesser
    with Responder(nxdomain_with_soa(ttl_s, minimum_s)) as srv:
        r = one(check_sync(["192.0.2.1"], config=config(f"127.0.0.1:{srv.port}", timeout_ms=1000)))
    assert r.status == "not_listed" and r.ttl == expected


@pytest.mark.parametrize("reply,kind", [(answer_for_another_name, "no_answer"), (cname_to_another_name, "invalid_answer")])
def test_an_answer_for_another_name_is_never_a_listing(reply, kind):
    with Responder(reply) as srv:
        r = one(check_sync(["192.0.2.1"], config=config(f"127.0.0.1:{srv.port}", timeout_ms=1000)))
    assert r.status == "error" and r.error == kind and r.ttl is None
    assert summary([r])["192.0.2.1"].listed == []


def test_async_api_takes_zone_objects_and_overrides(server, silent_port):
    # a Zone object that is not in the config, and a resolver override for every zone
    results = asyncio.run(check(["192.0.2.1"], [OTHER], config=DnsblConfig(resolvers=[f"127.0.0.1:{silent_port}"]),
                                resolver=server.resolver, timeout_ms=1000))
    assert [(r.zone, r.status, r.txt) for r in results] == [("test-other", "listed", "Trap hit")]
    with pytest.raises(ConfigError, match="unknown DNSBL zone nope"):
        check_sync(["192.0.2.1"], ["nope"], config=config(server.resolver))
    with pytest.raises(InputError):
        check_sync(["not-an-ip"], config=config(server.resolver))


# -- command line -------------------------------------------------------------------------------------
def invoke(cfg: DnsblConfig, *args: str):
    return CliRunner().invoke(dnsbl_group, list(args), obj=cfg)


def test_cli_check_json_prints_one_object_per_result(server):
    res = invoke(config(server.resolver), "check", "192.0.2.1", "192.0.2.99", "192.0.2.10",
                 "--zone", "test-zen", "--zone", "test-other", "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["ip"], r["zone"], r["status"]) for r in rows] == [
        ("192.0.2.1", "test-zen", "listed"), ("192.0.2.1", "test-other", "listed"),
        ("192.0.2.99", "test-zen", "not_listed"), ("192.0.2.99", "test-other", "not_listed"),
        ("192.0.2.10", "test-zen", "policy"), ("192.0.2.10", "test-other", "not_listed"),
    ]
    assert rows[0]["codes"] == ["127.0.0.2"] and rows[0]["txt"].startswith("Listed") and rows[0]["ttl"] == 60
    assert rows[4]["categories"] == ["policy"] and rows[0]["error"] is None


def test_cli_check_table_and_summary(server):
    res = invoke(config(server.resolver), "check", "192.0.2.1", "192.0.2.254")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "listed" in out and "error:list_error" in out
    assert "192.0.2.1: score 1; listed: test-zen" in out
    assert "192.0.2.254: score 0; listed: -; policy: -; errors: test-zen: list_error" in out
    assert "https://dnsbl.test/remove" in out


def test_cli_exit_1_when_every_lookup_failed(silent_port, server):
    res = invoke(config(server.resolver), "check", "192.0.2.1", "--resolver", f"127.0.0.1:{silent_port}",
                 "--timeout-ms", "200", "--json")
    assert res.exit_code == 1 and "every DNSBL lookup failed" in str(res.exception)
    assert json.loads(res.stdout)["error"] == "timeout"
    # the list's own error code is a failure too, but one answered lookup is enough for success
    assert invoke(config(server.resolver), "check", "192.0.2.254").exit_code == 1
    assert invoke(config(server.resolver), "check", "192.0.2.254", "192.0.2.99").exit_code == 0


@pytest.mark.parametrize("args,needle", [
    (["check", "192.0.2.300"], "not an IPv4 or IPv6"),
    (["check", "192.0.2.1", "--zone", "nope"], "unknown zone nope"),
    (["check", "192.0.2.1", "--resolver", "dns.example"], "must be an IP address"),
    (["check", "192.0.2.1", "--timeout-ms", "0"], "timeout-ms"),
    (["check"], "Missing argument"),
])
def test_cli_usage_errors_exit_2(server, args, needle):
    res = invoke(config(server.resolver), *args)
    assert res.exit_code == 2 and needle in res.output, res.output


def test_cli_ipv6_against_ipv4_only_zones_is_reported(server):
    res = invoke(config(server.resolver), "check", "2001:db8::1", "--zone", "test-other")
    assert res.exit_code == 0 and "not looked up" in res.stderr and "2001:db8::1" in res.stderr


def test_cli_zones_lists_codes_and_masks_dqs_keys(server):
    secret = msgspec.structs.replace(TEST_ZEN, name="test-dqs", zone="zen.spamhaus.org", dqs_key="s3cr3tkey")
    cfg = config(server.resolver, zones=[TEST_ZEN, secret])
    res = invoke(cfg, "zones", "--json")
    assert res.exit_code == 0, res.output
    zones = {z["name"]: z for z in map(json.loads, res.stdout.splitlines())}
    assert set(CATALOGUE) | {"test-zen", "test-dqs"} == set(zones)
    assert zones["test-zen"]["default"] and not zones["spamcop"]["default"]
    assert zones["spamhaus-zen"]["codes"]["127.0.0.10"]["category"] == "policy"
    assert zones["test-dqs"]["dqs_key"] == "***" and "s3cr3tkey" not in res.stdout
    text = invoke(cfg, "zones")
    assert text.exit_code == 0 and "s3cr3tkey" not in text.stdout
    assert "test-zen (default): zen.dnsbl.test" in text.stdout and "127.255.255.254" in text.stdout

