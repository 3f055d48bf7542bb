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

    Values matching :data:`IPV4_RE` are valid and unchanged. Of the others, only those at
    rows where ``check`` is true (all rows when None) and that contain a ``:`` are parsed
    with :mod:`ipaddress`; valid IPv6 addresses are replaced by their canonical text.
    Everything else is marked not ok and left as is.

    Work is per distinct value: a flow log names the same instances and mail servers over
    and over, so the column is dictionary-encoded once (a hash pass, cheaper than the
    regular expression over every row) and each distinct address is matched or parsed once.
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    enc = pc.dictionary_encode(col)
    words = enc.dictionary
    idx = enc.indices
    # a null row points one past the dictionary, at a value that is never ok
    codes = (idx.fill_null(len(words)) if idx.null_count else idx).to_numpy(zero_copy_only=False)
    word_v4 = np.append(pc.match_substring_regex(words, IPV4_RE).to_numpy(zero_copy_only=False), False)
    ok = word_v4[codes]
    todo = ~ok if check is None else (~ok & check)
    if not todo.any():
        return col, ok
    wanted = np.zeros(len(words) + 1, dtype=bool)
    wanted[codes[todo]] = True
    word_v6 = np.zeros(len(words) + 1, dtype=bool)
    changed: dict[int, str] = {}  # dictionary position -> canonical text, where it differs
    for w in np.flatnonzero(wanted[:-1]).tolist():
        v = words[w].as_py()
        if ":" not in v:
            continue
        c = canonical_ip(v)
        if c is None:
            continue
        word_v6[w] = True
        if c != v:
            changed[w] = c
    if not word_v6.any():
        return col, ok
    v6_rows = todo & word_v6[codes]
    ok |= v6_rows
    if changed:
        differs = np.zeros(len(words) + 1, dtype=bool)
        differs[list(changed)] = True
        mask = v6_rows & differs[codes]
        vals = [changed[w] for w in codes[mask].tolist()]
        col = pc.replace_with_mask(col, pa.array(mask), pa.array(vals, col.type))
    return col, ok
