"""Vectorised IP address validation and canonical text, shared by the flow parsers.

The happy path is one RE2 match over a column of strings: a canonical dotted quad
(no leading zeros, every octet 0..255) is already in :mod:`ipaddress` text form, so it
is kept as is. Everything else (IPv6, or junk) goes through :mod:`ipaddress` one value
at a time, which is fine because those rows are few in flow logs.
"""

from __future__ import annotations

import ipaddress
import socket

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: A canonical IPv4 dotted quad (what ``str(ipaddress.IPv4Address(x))`` prints).
IPV4_RE = rf"^(?:{_OCTET}\.){{3}}{_OCTET}$"


def parse_ip(text: str) -> tuple[int, int] | None:
    """(version, integer value) of an IPv4 or IPv6 address, or None if ``text`` is not one
    (scoped IPv6 addresses included, see :func:`canonical_ip`).

    The C library's parser takes the common spellings (about ten times faster than
    :mod:`ipaddress`); anything with an embedded dotted quad, or that it refuses, goes to
    :mod:`ipaddress`, whose rules decide."""
    if not text or len(text) > 45 or "%" in text:
        return None
    if ":" in text and "." not in text:
        try:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        except (OSError, ValueError):  # ValueError: an embedded NUL, which the C function cannot take
            pass
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        return None
    return a.version, int(a)


def ipv6_text(value: int) -> str:
    """Canonical (RFC 5952, as :mod:`ipaddress` prints it) text of an IPv6 address."""
    text = socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))
    # the C library prints IPv4-mapped and -compatible addresses with a dotted quad; ipaddress does not
    return str(ipaddress.IPv6Address(value)) if "." in text else text


def canonical_ip(text: str) -> str | None:
    """Canonical text of an IPv4 or IPv6 address, or None if ``text`` is not one.

    Scoped IPv6 addresses (``fe80::1%eth0``) are refused: a flow record has no use
    for the zone and it would make two spellings of one address.
    """
    got = parse_ip(text)
    if got is None:
        return None
    version, value = got
    return str(ipaddress.IPv4Address(value)) if version == 4 else ipv6_text(value)


def canonicalize_ips(col: pa.Array, check: np.ndarray | None = None) -> tuple[pa.Array, np.ndarray]:
    """Validate a string column of addresses; return ``(canonical column, ok mask)``.

    Values matching :data:`IPV4_RE` are valid and unchanged (vectorised). Of the
    others, only those at rows where ``check`` is true (all rows when None) and that
    contain a ``:`` are parsed with :mod:`ipaddress`; valid IPv6 addresses are
    replaced by their canonical text. Everything else is marked not ok and left as is.
    """
    ok = pc.match_substring_regex(col, IPV4_RE).to_numpy(zero_copy_only=False)
    if col.null_count:
        ok &= col.is_valid().to_numpy(zero_copy_only=False)
    todo = ~ok if check is None else (~ok & check)
    rows = np.flatnonzero(todo)
    if rows.size == 0:
        return col, ok
    repl_rows: list[int] = []
    repl_vals: list[str] = []
    for i, v in zip(rows.tolist(), col.take(rows).to_pylist()):
        if v is None or ":" not in v:
            continue
        c = canonical_ip(v)
        if c is None:
            continue
        ok[i] = True
        if c != v:
            repl_rows.append(i)
            repl_vals.append(c)
    if repl_rows:
        mask = np.zeros(len(col), dtype=bool)
        mask[repl_rows] = True
        col = pc.replace_with_mask(col, pa.array(mask), pa.array(repl_vals, col.type))
    return col, ok
