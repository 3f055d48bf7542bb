"""SMTP selection, the same for every format: which ports are SMTP, which flows are kept, and
which server-to-client flow answers which client-to-server one.

Formats whose records hold both directions of a connection (Argus, Zeek, Azure, packet
captures) keep the records to an SMTP port (:func:`select_smtp`). Formats that log each
direction as a flow of its own (AWS VPC, GCP VPC, NetFlow/IPFIX) split the flows into
client-to-server ones and the server's answers (:func:`smtp_directions`), and pair each
answer with the client's flow of the same connection (:func:`pair_reverse`): its packets
and bytes become that record's ``rev_packets`` / ``rev_bytes``.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard.core.errors import ConfigError

DEFAULT_SMTP_PORTS: tuple[int, ...] = (25, 465, 587, 2525)

#: A key column of :func:`pair_reverse`: numbers (numpy, one per flow, or one row of bytes
#: per flow such as a 16-byte address) or text (Arrow).
KeyColumn = Union[np.ndarray, pa.Array, pa.ChunkedArray]

_U64 = np.uint64


def smtp_ports_config(smtp_ports: Sequence[int] | None, every: str = "flow") -> tuple[int, ...] | None:
    """Validate the SMTP ports a parser keeps (None keeps every flow; ``every`` names what a
    parser keeps then, for the message)."""
    if smtp_ports is None:
        return None
    ports = []
    for p in smtp_ports:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= int(p) <= 65535:
            raise ConfigError(f"SMTP port {p!r} is not a port number (0-65535)")
        ports.append(int(p))
    if not ports:
        raise ConfigError(f"smtp_ports is empty: give at least one port, or None to keep every {every}")
    return tuple(sorted(set(ports)))


def select_smtp(
    dport: np.ndarray, smtp_ports: tuple[int, ...] | None, ok: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """The rows to keep, of ``ok`` (default: every row), in a format whose records hold both
    directions: those whose destination port is an SMTP port, all of them with
    ``smtp_ports=None``. Returns (rows kept, how many rows of ``ok`` are left out)."""
    if ok is None:
        ok = np.ones(len(dport), dtype=bool)
    if smtp_ports is None:
        return ok, 0
    smtp = np.isin(dport, smtp_ports)
    return ok & smtp, int((ok & ~smtp).sum())


def smtp_directions(
    sport: np.ndarray, dport: np.ndarray, smtp_ports: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Client-to-server flows (destination port an SMTP port) and the server's answers
    (source port an SMTP port, destination port not)."""
    fwd = np.isin(dport, smtp_ports)
    rev = np.isin(sport, smtp_ports) & ~fwd
    return fwd, rev


def pair_reverse(
    src: KeyColumn,
    dst: KeyColumn,
    sport: np.ndarray,
    dport: np.ndarray,
    proto: np.ndarray,
    fwd: np.ndarray,
    rev: np.ndarray,
    scope: Sequence[KeyColumn | None] = (),
    rev_scope: Sequence[KeyColumn | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair reverse (server-to-client) flows with forward (client-to-server) flows of the
    same connection: the reversed 5-tuple and the same ``scope`` (the interface, account,
    project or exporter that logged both; ``rev_scope``, when the reverse rows name it in
    other columns; a None column is left out); the k-th reverse of a connection, in input
    order, with the k-th forward one. ``fwd`` and ``rev`` are masks of the rows. Returns
    row positions (forward, reverse).

    Vectorised: text columns become integer codes, the parts of a row's key are mixed
    into one 64-bit key, keys are matched by sorting, and every pair is checked again part
    by part, so a collision of the mixed key cannot pair two connections.
    """
    fi = np.flatnonzero(fwd)
    ri = np.flatnonzero(rev)
    if fi.size == 0 or ri.size == 0:
        return fi[:0], ri[:0]
    if rev_scope is None:
        rev_scope = scope
    # forward rows keyed (src, dst, sport, dport, proto, scope), reverse rows (dst, src, dport, sport, proto, scope)
    columns = [(src, dst), (dst, src), (sport, dport), (dport, sport), (proto, proto)]
    columns += [(f, r) for f, r in zip(scope, rev_scope) if f is not None and r is not None]
    parts = [p for f, r in columns for p in _key_parts(f, fi, r, ri)]
    nf = fi.size
    key = np.zeros(nf + ri.size, dtype=_U64)
    with np.errstate(over="ignore"):
        for p in parts:
            key = _mix64(key ^ _mix64(p ^ _U64(0x9E3779B97F4A7C15)))
    kf, kr = key[:nf], key[nf:]
    of = np.argsort(kf, kind="stable")
    sf = kf[of]
    orv = np.argsort(kr, kind="stable")
    sr = kr[orv]
    rank = np.arange(sr.size) - np.searchsorted(sr, sr, side="left")
    cand = np.searchsorted(sf, sr, side="left") + rank
    inside = cand < sf.size
    cand = np.minimum(cand, sf.size - 1)
    hit = inside & (sf[cand] == sr)
    f = of[cand[hit]]
    r = orv[hit] + nf
    same = np.ones(f.size, dtype=bool)
    for p in parts:
        same &= p[f] == p[r]
    return fi[f[same]], ri[r[same] - nf]


def _key_parts(fcol: KeyColumn, fi: np.ndarray, rcol: KeyColumn, ri: np.ndarray) -> list[np.ndarray]:
    """One key column over the forward rows ``fi`` then the reverse rows ``ri``, as uint64
    arrays that are equal where the values are."""
    if isinstance(fcol, np.ndarray):
        assert isinstance(rcol, np.ndarray)
        v = np.concatenate([fcol[fi], rcol[ri]])
        if v.ndim == 1:
            return [v.astype(_U64)]
        raw = np.ascontiguousarray(v.reshape(v.shape[0], -1).view(np.uint8))
        if raw.shape[1] % 8:
            raw = np.pad(raw, ((0, 0), (0, 8 - raw.shape[1] % 8)))
        words = np.ascontiguousarray(raw).view(_U64)
        return [words[:, k] for k in range(words.shape[1])]
    a, b = (c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in (fcol, rcol))
    a, b = a.take(pa.array(fi)), b.take(pa.array(ri))
    if a.type != b.type:
        a, b = a.cast(pa.large_string()), b.cast(pa.large_string())
    codes = pc.dictionary_encode(pa.concat_arrays([a, b]), null_encoding="encode").indices
    return [codes.to_numpy(zero_copy_only=False).astype(_U64)]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _U64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> _U64(27))
        x = x * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))
