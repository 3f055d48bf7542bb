"""Configuration: one TOML file plus ``SMTPGUARD_*`` environment overrides, validated at start-up.

Every option is declared once, here, with its default and meaning. Units are in the names.
Detector parameters are declared beside each detector (``detectors/rules.py``) and validated
against those declarations when the config is loaded.

Environment overrides use ``SMTPGUARD_<SECTION>__<KEY>``, e.g.
``SMTPGUARD_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``SMTPGUARD_INGEST__SMTP_PORTS=[25,587]``;
values are read as TOML values when they parse as such, else as strings.
``SMTPGUARD_CONFIG`` names the file when ``--config`` is not given.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from .dnsbl import DnsblConfig
from .response.config import ResponseConfig
from .errors import ConfigError

ENV_PREFIX = "SMTPGUARD_"
DEFAULT_FILE = "smtpguard.toml"

#: librdkafka settings whose values are never printed.
SECRET_KEYS = ("password", "secret", "token", "key.pem", "sasl.oauthbearer.config")


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "smtpguard")


class Topics(msgspec.Struct, forbid_unknown_fields=True):
    flows: str = "smtp.flows"
    """normalized SMTP connection records (Arrow IPC batches, see docs/ARCHITECTURE.md)"""
    dlq: str = "smtp.flows.dlq"
    """dead letters: input that could not be decoded, with its reason (JSON)"""
    alerts: str = "smtp.alerts"
    """alerts (JSON, one per message, key = source IP or tenant)"""
    enforcement: str = "smtp.enforcement"
    """exemption revocations and restorations for the network (JSON)"""


class Kafka(msgspec.Struct, forbid_unknown_fields=True):
    bootstrap_servers: str = ""
    """comma-separated host:port list; empty = start a local Tansu broker (serve, demo)"""
    topics: Topics = msgspec.field(default_factory=Topics)
    partitions: int = 8
    """partitions of topics smtpguard creates itself"""
    group_id: str = "smtpguard-detectors"
    """consumer group of the detectors; run more `smtpguard detect` processes to scale out"""
    records_per_message: int = 2000
    """records batched into one Kafka message (Arrow IPC); one source IP always maps to one partition"""
    session_timeout_ms: int = 10000
    """consumer group session timeout; lower = faster rebalance and failover"""
    max_poll_interval_ms: int = 60000
    """longest time between polls before the broker evicts a detector"""
    client: dict[str, str] = msgspec.field(default_factory=dict)
    """librdkafka settings passed through as they are (security.protocol, sasl.*, ssl.*)"""


class Store(msgspec.Struct, forbid_unknown_fields=True):
    dsn: str = ""
    """clickhouse-connect DSN: chdb:///path (embedded) or http(s)://user:pass@host:8123/db; empty = chdb under data_dir"""
    database: str = "smtpguard"
    """database for smtpguard's tables (created if missing)"""


class Ingest(msgspec.Struct, forbid_unknown_fields=True):
    smtp_ports: list[int] = msgspec.field(default_factory=lambda: [25, 465, 587, 2525])
    """destination ports that make a flow an SMTP connection"""
    chunk_lines: int = 100_000
    """lines parsed per batch"""


class Detect(msgspec.Struct, forbid_unknown_fields=True):
    window_ms: int = 60_000
    """tumbling window length"""
    allowed_lateness_ms: int = 30_000
    """how far behind the newest event time a record may arrive and still count; later ones are counted as late and
    dropped. Alerts of a window are due when the watermark passes its end, so this is also part of every alert's
    delay. Raise it for inputs delivered further out of order (AWS delivers flow-log files minutes apart: see
    docs/DETECTION.md)"""
    idle_flush_ms: int = 10_000
    """wall-clock time without new records after which a partition's open windows are closed"""
    poll_messages: int = 500
    """Kafka messages a detector takes per poll at most (one pipeline pass per partition and poll);
    fewer = smaller steps and earlier alerts near the head of the log, more = higher throughput"""
    checkpoint_interval_ms: int = 5_000
    """how often a detector commits offsets and saves its windows' watermark, source history and cooldowns;
    a restarted or rebalanced detector resumes from the last checkpoint"""
    cooldown_ms: int = 600_000
    """after an alert for an IP and detector, further findings within this time are stored as suppressed, not raised"""
    exemptions_csv: str = ""
    """CSV with header ip,tenant,granted_at,reason (IP or CIDR) of instances allowed to send on port 25; optional
    column declared_conns_per_min: the sending volume the exemption was granted for"""
    inventory_csv: str = ""
    """CSV with header ip,tenant,instance_id,interface_id (address or prefix): the provider's address plan. Fills
    tenant and instance where the input has none (NetFlow, sFlow, captures) and names the IPv6 prefix each source
    is judged by (see smtpguard/inventory.py)"""
    ipv6_prefix_len: int = 64
    """IPv6 sources outside the inventory are judged by this prefix (addresses rotating inside it are one
    source); IPv4 sources by their address"""
    learning_minutes: int = 60
    """a source is learning until its history covers this many minutes: until then, an established exempted
    sender without a declared volume is never raised above low for volume or fan-out that only its own history
    could judge (docs/DETECTION.md, cold start)"""
    max_sources: int = 1_000_000
    """source IPs whose history (baselines, familiar destinations) one detector process keeps, shared by its
    partitions; beyond it the least recently seen are evicted (counted in smtpguard_detector_state_evictions_total)"""
    max_panes: int = 4_000_000
    """one-minute panes (source x minute) one detector process keeps for the 10- and 60-minute horizons; beyond
    it the panes of the sources with the fewest active minutes go first, oldest first (counted)"""
    detectors: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """per-detector parameters, e.g. [detect.detectors.spam_fanout] min_distinct_dst = 25 (see docs/DETECTION.md)"""


class Metrics(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9325"
    """HOST:PORT where collect, detect and serve answer Prometheus scrapes at /metrics (docs/METRICS.md);
    empty = no endpoint. Every process on a machine needs its own port (a second detector: --metrics HOST:9326);
    when the default port is taken the process warns and runs without an endpoint, a chosen one must be free"""
    lag_interval_ms: int = 5_000
    """how often a detector asks the broker for its partitions' high watermarks (consumer lag) and
    updates the window lag"""
    console_public: bool = True
    """the console answers /metrics without a login (it binds to loopback by default); false = a
    session or API token of any console user is needed (Prometheus: authorization credentials)"""


def host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9325"`` -> ``("127.0.0.1", 9325)``; ``[ADDR]:PORT`` for IPv6; ValueError if not HOST:PORT."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT (use [ADDR]:PORT for IPv6)")
    return host, int(port)


class Config(msgspec.Struct, forbid_unknown_fields=True):
    data_dir: str = msgspec.field(default_factory=default_data_dir)
    """where the embedded store and local state live"""
    log_level: str = "info"
    kafka: Kafka = msgspec.field(default_factory=Kafka)
    store: Store = msgspec.field(default_factory=Store)
    ingest: Ingest = msgspec.field(default_factory=Ingest)
    detect: Detect = msgspec.field(default_factory=Detect)
    dnsbl: DnsblConfig = msgspec.field(default_factory=DnsblConfig)
    """DNS blocklist checks: zones, resolvers, timeouts, query rate, cache (see smtpguard/dnsbl.py)"""
    response: ResponseConfig = msgspec.field(default_factory=ResponseConfig)
    """revocation policy, enforcement outputs and webhook (smtpguard/response/config.py)"""
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    """Prometheus metrics endpoint (docs/METRICS.md)"""

    @property
    def store_dsn(self) -> str:
        return self.store.dsn or f"chdb://{os.path.join(os.path.abspath(self.data_dir), 'store')}"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another override")
        node[path[-1]] = _parse_env_value(raw)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None,
         overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate the config; raise :class:`ConfigError` with one clear line."""
    environ = dict(os.environ if environ is None else environ)
    explicit = path or environ.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = {}
    file = Path(explicit) if explicit else Path(DEFAULT_FILE)
    if explicit and not file.is_file():
        raise ConfigError(f"config file {file} not found")
    if file.is_file():
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {file}: {e}") from None
    data = _merge(data, _env_overrides(environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        where = str(e).replace("$.", "").replace("`", "'")
        raise ConfigError(f"invalid config ({file if file.is_file() else 'defaults + environment'}): {where}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that types alone cannot express."""
    def bad(msg: str) -> None:
        raise ConfigError(f"invalid config: {msg}")

    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        bad(f"log_level must be debug, info, warning or error, not {cfg.log_level!r}")
    for port in cfg.ingest.smtp_ports:
        if not 0 < port < 65536:
            bad(f"ingest.smtp_ports: {port} is not a TCP port")
    if not cfg.ingest.smtp_ports:
        bad("ingest.smtp_ports must name at least one port")
    for name in ("window_ms", "cooldown_ms"):
        if getattr(cfg.detect, name) <= 0:
            bad(f"detect.{name} must be positive")
    if cfg.detect.allowed_lateness_ms < 0 or cfg.detect.idle_flush_ms < 0:
        bad("detect.allowed_lateness_ms and detect.idle_flush_ms must be >= 0")
    if 3_600_000 % cfg.detect.window_ms:
        bad("detect.window_ms must divide one hour evenly")
    if cfg.detect.max_sources < 1 or cfg.detect.max_panes < 1:
        bad("detect.max_sources and detect.max_panes must be >= 1")
    if not 1 <= cfg.detect.ipv6_prefix_len <= 128:
        bad("detect.ipv6_prefix_len must be between 1 and 128")
    if cfg.detect.learning_minutes < 0:
        bad("detect.learning_minutes must be >= 0")
    if cfg.detect.poll_messages < 1:
        bad("detect.poll_messages must be >= 1")
    if cfg.kafka.partitions < 1 or cfg.kafka.records_per_message < 1:
        bad("kafka.partitions and kafka.records_per_message must be >= 1")
    if cfg.ingest.chunk_lines < 1:
        bad("ingest.chunk_lines must be >= 1")
    if cfg.metrics.listen:
        try:
            host_port(cfg.metrics.listen)
        except ValueError as e:
            bad(f"metrics.listen (--metrics): {e}; empty = no metrics endpoint")
    if cfg.metrics.lag_interval_ms <= 0:
        bad("metrics.lag_interval_ms must be positive")
    dsn = cfg.store.dsn
    if dsn and not dsn.startswith(("chdb://", "http://", "https://", "clickhouse://")):
        bad(f"store.dsn must start with chdb://, http:// or https://, not {dsn.split(':')[0]!r}")
    from smtpguard import dnsbl

    dnsbl.validate(cfg.dnsbl)
    # detector parameters are checked against their declarations
    from smtpguard.detectors.rules import build_detectors

    build_detectors(cfg.detect.detectors)


def _mask(key: str, value: Any) -> Any:
    if isinstance(value, str) and any(s in key.lower() for s in SECRET_KEYS) and value:
        return "***"
    return value


def mask_dsn(dsn: str) -> str:
    """``http://user:secret@host`` -> ``http://user:***@host``."""
    if "://" in dsn and "@" in dsn:
        scheme, rest = dsn.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{scheme}://{cred}@{host}"
    return dsn


def shown(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data with secrets masked."""
    data = msgspec.to_builtins(cfg)
    data["store"]["dsn"] = mask_dsn(cfg.store_dsn)
    data["kafka"]["client"] = {k: _mask(k, v) for k, v in data["kafka"]["client"].items()}
    hook = data["response"]["webhook"]
    if hook.get("secret"):
        hook["secret"] = "***"
    if hook.get("url"):
        hook["url"] = mask_dsn(hook["url"])
    for z in data["dnsbl"]["zones"]:
        z["dqs_key"] = "***" if z["dqs_key"] else ""
    from smtpguard.detectors.rules import build_detectors

    data["detect"]["detectors"] = {d.name: msgspec.to_builtins(d.params) for d in build_detectors(cfg.detect.detectors)}
    return data


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Minimal TOML writer for ``config show`` (tables, scalars, lists)."""
    import json

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    scalars = [f"{k} = {val(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = []
    if scalars:
        if prefix:
            out.append(f"[{prefix}]")
        out.extend(scalars)
        out.append("")
    for k, v in data.items():
        if isinstance(v, dict):
            key = k if all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)
            sub = to_toml(v, f"{prefix}.{key}" if prefix else key)
            if sub.strip():
                out.append(sub)
            elif not v:
                out.append(f"[{prefix + '.' if prefix else ''}{key}]\n")
    return "\n".join(out)
