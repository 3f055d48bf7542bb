"""Address text: the fast path (the C library's parser and printer) agrees with :mod:`ipaddress`
on every address, and refuses what it refuses."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard.core.iputil import canonical_ip, ipv6_text, parse_ip


def _reference(text: str) -> str | None:
    if "%" in text:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


# sparse hextets: runs of zeros (where compression rules bite), small values, full values
_hextet = st.one_of(st.just(0), st.just(0), st.integers(1, 15), st.integers(0, 0xFFFF))
_v6 = st.lists(_hextet, min_size=8, max_size=8).map(lambda hs: sum(h << (16 * (7 - i)) for i, h in enumerate(hs)))


@settings(max_examples=3000, deadline=None)
@given(_v6, st.sampled_from(["compressed", "exploded", "upper"]))
def test_ipv6_text_and_parsing_agree_with_ipaddress(value, spelling):
    addr = ipaddress.IPv6Address(value)
    assert ipv6_text(value) == str(addr)
    text = {"compressed": str(addr), "exploded": addr.exploded, "upper": addr.exploded.upper()}[spelling]
    assert parse_ip(text) == (6, value)
    assert canonical_ip(text) == str(addr)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF:.%x ", max_size=45))
def test_junk_is_refused_exactly_as_ipaddress_refuses_it(text):
    assert canonical_ip(text) == _reference(text)


def test_mapped_compatible_and_scoped_addresses():
    assert canonical_ip("::ffff:1.2.3.4") == "::ffff:102:304"
    assert ipv6_text(int(ipaddress.IPv6Address("::ffff:0:0"))) == "::ffff:0:0"
    assert ipv6_text(int(ipaddress.IPv6Address("::1:0"))) == "::1:0"
    assert canonical_ip("fe80::1%eth0") is None
    assert canonical_ip("203.0.113.7") == "203.0.113.7"
    assert parse_ip("203.0.113.7") == (4, int(ipaddress.IPv4Address("203.0.113.7")))
    assert canonical_ip("1.2.3") is None and canonical_ip("") is None


def test_text_the_c_parser_cannot_take_is_not_an_address() -> None:
    for text in ("::1\x00", "fe80::\x00:1", "\x00::"):
        assert parse_ip(text) is None and canonical_ip(text) is None
