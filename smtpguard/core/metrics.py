"""Prometheus metrics: every metric smtpguard exports, defined once, and the ``/metrics`` endpoint.

The table of metrics with their labels and meaning is ``docs/METRICS.md``. Components count
per batch (a parsed chunk, a poll of the consumer, an insert), never per record.

``collect``, ``detect`` and ``serve`` answer scrapes at ``http://metrics.listen/metrics``
(:func:`serve`); the console serves the same registry as a route of its app
(:func:`exposition`). Counters start at zero when the process starts.

Example::

    from smtpguard.core import metrics

    endpoint = metrics.serve("127.0.0.1:9325")    # None when the address is empty
    print(endpoint.url)                            # http://127.0.0.1:9325/metrics
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version as _dist_version
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info,
                               generate_latest, start_http_server)
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

from smtpguard.core.errors import SmtpguardError

log = logging.getLogger(__name__)

#: The process's registry: smtpguard's metrics and the process collectors (CPU, memory, open files, GC).
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)


def _version() -> str:
    try:
        return _dist_version("smtpguard")
    except PackageNotFoundError:
        return "unknown"


BUILD = Info("smtpguard_build", "smtpguard version of this process", registry=REGISTRY)
BUILD.info({"version": _version(), "python": platform.python_version()})

# -- collector ---------------------------------------------------------------------------------------
COLLECTOR_INPUT = Counter("smtpguard_collector_input_records_total",
                          "input units the collector parsed: lines, flow records, packets",
                          registry=REGISTRY)
COLLECTOR_KEPT = Counter("smtpguard_collector_kept_records_total",
                         "SMTP connection records produced to the flows topic", registry=REGISTRY)
COLLECTOR_SKIPPED = Counter("smtpguard_collector_skipped_records_total",
                            "valid input that is not SMTP client traffic (other ports, NODATA rows, merged reverse "
                            "halves)", registry=REGISTRY)
DEAD_LETTERS = Counter("smtpguard_dead_letters_total",
                       "input sent to the dead-letter topic, by input format (kafka: undecodable messages on the "
                       "flows topic, dead-lettered by a detector)", ["format"], registry=REGISTRY)
TEMPLATE_MISSES = Counter("smtpguard_netflow_template_misses_total",
                          "NetFlow v9/IPFIX data sets dropped because their template never came (also dead letters)",
                          ["format"], registry=REGISTRY)
COLLECTOR_DELIVERY_ERRORS = Counter("smtpguard_collector_delivery_errors_total",
                                    "messages the broker did not acknowledge", ["topic"], registry=REGISTRY)
COLLECTOR_QUEUE = Gauge("smtpguard_collector_queue_messages",
                        "messages waiting in the collector's producer queue (not yet acknowledged)", registry=REGISTRY)

# -- detector ----------------------------------------------------------------------------------------
DETECTOR_MESSAGES = Counter("smtpguard_detector_messages_total", "messages consumed from the flows topic",
                            registry=REGISTRY)
DETECTOR_RECORDS = Counter("smtpguard_detector_records_total", "SMTP records consumed from the flows topic",
                           registry=REGISTRY)
DETECTOR_WINDOWS = Counter("smtpguard_detector_windows_total", "source windows closed (rows of window_features)",
                           registry=REGISTRY)
ALERTS = Counter("smtpguard_alerts_total",
                 "new alerts by severity; outcome raised (stored and published) or suppressed (stored, cooldown)",
                 ["severity", "outcome"], registry=REGISTRY)
DETECTOR_COMMITS = Counter("smtpguard_detector_commits_total", "offset commits (each after a checkpoint)",
                           registry=REGISTRY)
OFFSET_RESETS = Counter("smtpguard_detector_offset_resets_total",
                        "times a partition's log went back: the broker lost it (e.g. restarted without its data)",
                        ["topic", "partition"], registry=REGISTRY)
COLLECTOR_SPOOLED = Counter("smtpguard_collector_spooled_messages_total",
                            "messages not delivered within the delivery timeout, kept in the spool for resend",
                            ["topic"], registry=REGISTRY)
CONSUMER_LAG = Gauge("smtpguard_consumer_lag_messages",
                     "messages on an assigned partition not consumed yet: high watermark - position",
                     ["topic", "partition"], registry=REGISTRY)
WINDOW_LAG = Gauge("smtpguard_window_lag_seconds",
                   "wall clock - event-time watermark of an assigned partition (newest event time - allowed lateness)",
                   ["topic", "partition"], registry=REGISTRY)
DETECTOR_STATE = Gauge("smtpguard_detector_state_entries",
                       "detection state held now over the assigned partitions: sources (source histories), "
                       "familiar_rows (full 16384-bit destination rows), panes (horizon panes), open_rows (records "
                       "of open windows)", ["structure"], registry=REGISTRY)
DETECTOR_EVICTIONS = Counter("smtpguard_detector_state_evictions_total",
                             "state given up to stay within detect.max_sources and detect.max_panes: sources "
                             "(histories evicted), sources_unremembered (sources of a window judged without history), "
                             "familiar_saturated (sources that could not get a full destination row), panes",
                             ["structure"], registry=REGISTRY)
_evictions_seen: dict[str, int] = {}


def set_detector_state(stats: dict[str, int]) -> None:
    """Export :meth:`Pipeline.state_stats` (sizes as gauges, the process's eviction counts as counters)."""
    for k in ("sources", "familiar_rows", "panes", "open_rows"):
        DETECTOR_STATE.labels(k).set(stats.get(k, 0))
    for k, v in stats.items():
        if k.startswith("evicted_"):
            name = k[len("evicted_"):]
            delta = v - _evictions_seen.get(name, 0)
            if delta > 0:
                DETECTOR_EVICTIONS.labels(name).inc(delta)
            _evictions_seen[name] = max(v, _evictions_seen.get(name, 0))

# -- store -------------------------------------------------------------------------------------------
STORE_WRITE_SECONDS = Histogram("smtpguard_store_write_seconds", "time of one insert into a store table",
                                ["table"], registry=REGISTRY,
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STORE_WRITE_FAILURES = Counter("smtpguard_store_write_failures_total", "inserts the store refused or failed",
                               ["table"], registry=REGISTRY)

# -- DNSBL -------------------------------------------------------------------------------------------
DNSBL_LOOKUPS = Counter("smtpguard_dnsbl_lookups_total",
                        "DNSBL lookups (one address in one zone) by answer: listed, policy, not_listed, error",
                        ["zone", "status"], registry=REGISTRY)
DNSBL_ERRORS = Counter("smtpguard_dnsbl_errors_total", "DNSBL lookups without a usable answer, by error kind",
                       ["zone", "kind"], registry=REGISTRY)
DNSBL_CACHE_HITS = Counter("smtpguard_dnsbl_cache_hits_total", "DNSBL lookups answered from the cache",
                           ["zone"], registry=REGISTRY)

# -- enforcement -------------------------------------------------------------------------------------
ENFORCEMENT_EVENTS = Counter("smtpguard_enforcement_events_total",
                             "enforcement events delivered: kafka (the enforcement topic) or webhook",
                             ["output"], registry=REGISTRY)
RESPONSE_COMMITS = Counter("smtpguard_response_commits_total", "offset commits of the response service on the alerts topic",
                           registry=REGISTRY)
OUTBOX_PENDING = Gauge("smtpguard_enforcement_outbox_pending",
                       "enforcement events the response service owes the outputs (Kafka, webhook) at its last pass",
                       registry=REGISTRY)
WEBHOOK_DEAD_LETTERS = Counter("smtpguard_webhook_dead_letters_total",
                               "enforcement events the webhook could not deliver (kept in webhook_dead_letters)",
                               registry=REGISTRY)

# -- console -----------------------------------------------------------------------------------------
CONSOLE_REQUESTS = Counter("smtpguard_console_requests_total",
                           "console HTTP requests by method, route template (other: static files, unknown paths) "
                           "and status", ["method", "route", "status"], registry=REGISTRY)


def exposition() -> tuple[bytes, str]:
    """The registry in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


@dataclass
class Endpoint:
    """A running ``/metrics`` HTTP endpoint (a daemon thread of this process)."""

    server: Any
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(listen: str, *, required: bool = True) -> Endpoint | None:
    """Answer scrapes at ``http://listen/metrics`` (port 0 = a free one) from a daemon thread;
    None when ``listen`` is empty. When the address cannot be bound: SmtpguardError if
    ``required`` (the address was asked for), else a warning and None (the default address is
    taken, e.g. by a second process on the machine: its job matters more than its metrics)."""
    from smtpguard.core.config import host_port  # config imports modules that import this one

    if not listen:
        return None
    host, port = host_port(listen)
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        if not required:
            log.warning("metrics: cannot serve on the default %s (%s): running without a metrics endpoint; "
                        "give this process one with --metrics HOST:PORT", listen, e.strerror or e)
            return None
        raise SmtpguardError(f"cannot serve metrics on {listen}: {e.strerror or e}; give this process its own "
                             "address with --metrics HOST:PORT (metrics.listen), or --metrics '' for none") from None
    endpoint = Endpoint(server, host, server.server_address[1])
    log.info("metrics on %s", endpoint.url)
    return endpoint


def forget_partitions(topic: str, partitions: list[int]) -> None:
    """Drop the per-partition gauges of partitions this process no longer owns."""
    for p in partitions:
        for gauge in (CONSUMER_LAG, WINDOW_LAG):
            try:
                gauge.remove(topic, str(p))
            except KeyError:
                pass
