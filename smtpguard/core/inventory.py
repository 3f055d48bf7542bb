"""The provider's inventory: which tenant and instance own an address or prefix, and which
prefix is the unit a source is judged by.

A provider knows its own address space (its IPAM): every instance's IPv4 address and the
IPv6 prefix assigned to it (a /64 of its own, an AWS /80 delegated to an interface, a /56
routed to a customer's server). smtpguard uses it for two things:

- **Enrichment**: records whose source has no tenant or instance id (NetFlow, IPFIX, sFlow
  and packet captures carry none) get them from the inventory, so tenant-level detection
  works on every input format.
- **Source keys**: detection judges a source by the unit the provider assigns. An IPv4
  address is its own key; an IPv6 address is judged by the inventory prefix that holds it,
  or else by its /64 (``detect.ipv6_prefix_len``), because an instance can take any address
  of its prefix and a spammer rotating addresses inside it must not look like thousands of
  one-off senders.

The CSV has the header ``ip,tenant,instance_id,interface_id`` (more columns allowed; only
``ip`` is required), ``ip`` an address or a CIDR prefix. The most specific entry wins.

>>> inv = Inventory.from_rows([("2001:db8:0:1::/64", "acct-1", "i-1", "")])
>>> SourceKeys(inv).key_of("2001:db8:0:1::25")
'2001:db8:0:1::/64'
>>> SourceKeys(inv).key_of("2001:db8:0:2::25"), SourceKeys(inv).key_of("192.0.2.7")
('2001:db8:0:2::/64', '192.0.2.7')
"""

from __future__ import annotations

import csv
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import polars as pl

from smtpguard.core.errors import ConfigError
from smtpguard.core.frames import encode
from smtpguard.core.iputil import ipv6_text, parse_ip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
INVENTORY_COLUMNS = ("ip", "tenant", "instance_id", "interface_id")


@dataclass(frozen=True)
class Entry:
    network: IPNetwork
    tenant: str
    instance_id: str
    interface_id: str


class Inventory:
    """Entries by prefix length, for longest-prefix matches."""

    def __init__(self, entries: Iterable[Entry] = ()):
        self.entries = list(entries)
        self._by_len: dict[tuple[int, int], dict[int, Entry]] = {}
        for e in self.entries:
            self._by_len.setdefault((e.network.version, e.network.prefixlen), {})[int(e.network.network_address)] = e
        self._lens = {v: sorted((pl_ for ver, pl_ in self._by_len if ver == v), reverse=True) for v in (4, 6)}

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, str, str]]) -> "Inventory":
        return cls(Entry(ipaddress.ip_network(ip, strict=False), t, i, f) for ip, t, i, f in rows)

    @classmethod
    def from_csv(cls, path: str | Path) -> "Inventory":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"inventory file {path} not found")
        entries = []
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if "ip" not in (reader.fieldnames or []):
                raise ConfigError(f"inventory file {path}: header must include ip (and tenant, instance_id, "
                                  "interface_id where known)")
            for n, row in enumerate(reader, start=2):
                try:
                    net = ipaddress.ip_network((row.get("ip") or "").strip(), strict=False)
                except ValueError as e:
                    raise ConfigError(f"inventory file {path} line {n}: {e}") from None
                entries.append(Entry(net, (row.get("tenant") or "").strip(), (row.get("instance_id") or "").strip(),
                                     (row.get("interface_id") or "").strip()))
        return cls(entries)

    def lookup(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Entry | None:
        """The most specific entry holding ``addr``, or None."""
        return self.lookup_int(addr.version, int(addr))

    def lookup_int(self, version: int, value: int) -> Entry | None:
        """:meth:`lookup` of an address given as (version, integer value)."""
        bits = 32 if version == 4 else 128
        for plen in self._lens[version]:
            e = self._by_len[(version, plen)].get(value >> (bits - plen) << (bits - plen))
            if e is not None:
                return e
        return None


class SourceKeys:
    """Maps record source addresses to detection keys, and fills tenant and instance from the inventory."""

    def __init__(self, inventory: Inventory | None = None, ipv6_prefix_len: int = 64):
        if not 1 <= ipv6_prefix_len <= 128:
            raise ConfigError("invalid config: detect.ipv6_prefix_len must be between 1 and 128")
        self.inventory = inventory if inventory is not None and len(inventory) else None
        self.ipv6_prefix_len = ipv6_prefix_len
        self._cache: dict[str, tuple[str, str, str]] = {}

    def key_of(self, ip: str) -> str:
        return self._resolve(ip)[0]

    def _resolve(self, ip: str) -> tuple[str, str, str]:
        """(key, tenant, instance id) of one source address ('' where the inventory says nothing)."""
        got = self._cache.get(ip)
        if got is not None:
            return got
        parsed = parse_ip(ip)
        if parsed is None:
            return ip, "", ""
        version, value = parsed
        e = self.inventory.lookup_int(version, value) if self.inventory is not None else None
        if version == 4:
            key = ip
        elif e is not None:
            key = str(e.network)
        else:
            plen = self.ipv6_prefix_len
            key = f"{ipv6_text(value >> (128 - plen) << (128 - plen))}/{plen}"
        got = (key, e.tenant if e else "", e.instance_id if e else "")
        if len(self._cache) > 1_000_000:
            self._cache.clear()
        self._cache[ip] = got
        return got

    def apply(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Rows with ``src_ip`` replaced by the key and ``src_addr`` the record's source address where it
        is not the key itself (null where it is: IPv4 addresses); empty ``tenant`` and ``instance_id``
        filled from the inventory, and ``tenant_filled`` true where the tenant was empty (only with an
        inventory).

        Each distinct address is resolved once (and cached across batches); rows take their key by
        index. Without an inventory only IPv6 addresses are looked at: an IPv4 address is its own key."""
        addrs = rows["src_ip"]
        none = pl.lit(None, pl.String)
        if self.inventory is None:
            v6 = addrs.str.contains(":", literal=True)
            if not v6.any():
                return rows.with_columns(src_addr=none)  # IPv4 without an inventory: every address is its own key
            uniq = addrs.filter(v6).unique()
            keys = pl.Series([self._resolve(ip)[0] for ip in uniq.to_list()], dtype=pl.String)
            return rows.with_columns(src_ip=pl.when(v6).then(addrs.replace_strict(uniq, keys, default=addrs))
                                     .otherwise(addrs),
                                     src_addr=pl.when(v6).then(addrs).otherwise(none))
        uniq, code = encode(addrs)
        resolved = [self._resolve(ip) for ip in uniq.to_list()]
        keys = pl.Series([r[0] for r in resolved], dtype=pl.String)
        differs = pl.Series([r[0] != ip for r, ip in zip(resolved, uniq.to_list())], dtype=pl.Boolean).gather(code)
        tenants = pl.Series([r[1] for r in resolved], dtype=pl.String).gather(code)
        insts = pl.Series([r[2] for r in resolved], dtype=pl.String).gather(code)
        return rows.with_columns(
            src_ip=keys.gather(code),
            src_addr=pl.when(differs).then(addrs).otherwise(none),
            tenant_filled=pl.col("tenant") == "",
            tenant=pl.when(pl.col("tenant") == "").then(tenants).otherwise(pl.col("tenant")),
            instance_id=pl.when(pl.col("instance_id") == "").then(insts).otherwise(pl.col("instance_id")),
        )


def key_network(key: str) -> IPNetwork | None:
    """The network a source key names (an address is a /32 or /128), or None if it is not an address."""
    try:
        return ipaddress.ip_network(key, strict=False)
    except ValueError:
        return None
