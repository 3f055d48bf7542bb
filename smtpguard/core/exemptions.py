"""Port-25 exemptions: which instances may send mail directly, since when.

Loaded from a CSV with the header ``ip,tenant,granted_at,reason`` (more columns allowed);
``ip`` may be an address or a CIDR block, ``granted_at`` an ISO 8601 date or time (UTC
when no zone is given). The optional column ``declared_conns_per_min`` is the sending
volume the exemption was granted for (SMTP connections a minute at peak); detectors judge
a declared sender against it from its first minute. Detectors read exemptions through
:meth:`Exemptions.annotate`, by source key: an address, or the IPv6 prefix a source is
judged by (an exemption of an address inside that prefix, or of a block around it, counts).
"""

from __future__ import annotations

import csv
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from smtpguard.core.errors import ConfigError

REQUIRED_COLUMNS = ("ip", "tenant", "granted_at", "reason")
DECLARED_COLUMN = "declared_conns_per_min"


@dataclass(frozen=True)
class Exemption:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    tenant: str
    granted_at_ms: int
    reason: str
    declared_conns_per_min: float | None = None


def parse_time(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


class Exemptions:
    def __init__(self, entries: list[Exemption] | None = None):
        self.entries = list(entries or [])
        self._exact = {str(e.network.network_address): e for e in self.entries if e.network.num_addresses == 1}
        self._nets = [e for e in self.entries if e.network.num_addresses > 1]

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_csv(cls, path: str | Path) -> "Exemptions":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"exemptions file {path} not found")
        entries = []
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"exemptions file {path}: header must include {','.join(REQUIRED_COLUMNS)} "
                                  f"(missing {', '.join(missing)})")
            for n, row in enumerate(reader, start=2):
                try:
                    net = ipaddress.ip_network(row["ip"].strip(), strict=False)
                    granted = parse_time(row["granted_at"])
                    declared = parse_declared(row.get(DECLARED_COLUMN))
                except (ValueError, AttributeError) as e:
                    raise ConfigError(f"exemptions file {path} line {n}: {e}") from None
                entries.append(Exemption(net, (row.get("tenant") or "").strip(), int(granted.timestamp() * 1000),
                                         (row.get("reason") or "").strip(), declared))
        return cls(entries)

    def lookup(self, ip: str) -> Exemption | None:
        """The exemption of an address, or of a source key that names a prefix (the earliest granted
        exemption inside it or around it)."""
        if "/" in ip:
            return self._lookup_prefix(ip)
        e = self._exact.get(ip)
        if e is not None or not self._nets:
            return e
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for e in self._nets:
            if addr.version == e.network.version and addr in e.network:
                return e
        return None

    def _lookup_prefix(self, key: str) -> Exemption | None:
        try:
            net = ipaddress.ip_network(key, strict=False)
        except ValueError:
            return None
        found = [e for e in self.entries if e.network.version == net.version and e.network.overlaps(net)]
        return min(found, key=lambda e: e.granted_at_ms) if found else None

    def annotate(self, feats: pl.DataFrame) -> pl.DataFrame:
        """Add ``exempted``, ``exemption_age_days`` (at each window's start) and
        ``declared_conns_per_min`` (null when none is declared) to feature rows."""
        ips = feats["src_ip"].unique().to_list() if feats.height else []
        found = {ip: e for ip in ips if (e := self.lookup(ip)) is not None}
        g = pl.DataFrame({"src_ip": list(found), "_granted_ms": [e.granted_at_ms for e in found.values()],
                          "_declared": [e.declared_conns_per_min for e in found.values()]},
                         schema={"src_ip": pl.String, "_granted_ms": pl.Int64, "_declared": pl.Float64})
        # joined on the keys only and added as columns: a join of ``feats`` itself would copy every column
        keys = feats.select("src_ip", "window_start").join(g, on="src_ip", how="left", maintain_order="left")
        start_ms = pl.col("window_start").dt.epoch("ms")
        active = pl.col("_granted_ms").is_not_null() & (pl.col("_granted_ms") <= start_ms)
        return feats.hstack(keys.select(
            exempted=active,
            exemption_age_days=pl.when(active).then((start_ms - pl.col("_granted_ms")) / 86_400_000.0),
            declared_conns_per_min=pl.when(active).then(pl.col("_declared")),
        ))


def parse_declared(text: str | None) -> float | None:
    """The optional declared sending volume: empty = none, else a positive number of connections a minute."""
    text = (text or "").strip()
    if not text:
        return None
    v = float(text)
    if not v > 0:
        raise ValueError(f"{DECLARED_COLUMN} must be a positive number of SMTP connections a minute, not {text!r}")
    return v
