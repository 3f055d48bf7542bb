"""NetFlow v5, NetFlow v9 and IPFIX datagrams → records.

:class:`NetflowDecoder` is the pure decoder: fed UDP payloads with the address of the
exporter that sent them, it returns :class:`~smtpguard.ingest.base.Batch` objects. It is
stateful, as these protocols are: templates, sampling rates and exporter clocks learned
from one datagram are needed to read the next. The version modules
(:mod:`~smtpguard.ingest.netflow_v5`, :mod:`~smtpguard.ingest.netflow_v9`,
:mod:`~smtpguard.ingest.ipfix`) only split datagrams and read templates; this module
dispatches on the version, keeps the state and builds the records.

Two input shells feed it: :class:`NetflowPcapParser` (UDP payloads from a pcap or pcapng
capture, read by :mod:`smtpguard.ingest.pcapfile`, exporter = the sender's address) and
:class:`NetflowDatParser` (payloads written back to back, as ``nc -lu > file`` does). The
live UDP listener is :func:`smtpguard.ingest.netflow_listen.listen_udp`.

State and its bounds (each a constructor argument)
    * Templates are kept per (exporter, version, observation domain or source id,
      template id); at most ``max_templates_per_exporter`` per exporter, and state for
      at most ``max_exporters`` exporters (the least recently heard is forgotten first).
      A domain's state exists while it has templates: a datagram of a domain with none
      leaves nothing behind, and a domain whose templates are all withdrawn is forgotten.
    * Options data sets update the sampling rate per sampler (samplerId / selectorId, or
      exporter-wide when the options record names none) and the exporter's
      systemInitTimeMilliseconds (IPFIX times given as flowStart/EndSysUpTime).
    * A data set whose template is not known yet waits (at most ``pending_limit`` sets
      and ``pending_bytes_limit`` bytes, at most ``pending_timeout_s``) and is decoded
      when the template comes. One that is dropped instead, for the timeout, for the
      bound, or by :meth:`NetflowDecoder.flush`, is a template miss and a dead letter.
      Time is the datagrams' receive time, or the exporters' clocks when there is none.

Records
    One record per unidirectional flow. An RFC 5103 biflow (reverse elements of private
    enterprise 29305, or Cisco's responderOctets/Packets) gives a second record, the
    reverse half, when that half has packets; it keeps the flow's times and takes the
    egress interface as its own. Times: absolute timestamps when the template has them
    (seconds, milliseconds, NTP micro/nanoseconds, deltas to the export time), else
    sysUpTime-relative ones: for v5/v9 against the header's uptime, with 32-bit
    wrap-around; for IPFIX against systemInitTimeMilliseconds (from options or the
    record). ``action`` is ``reject`` when forwardingStatus says dropped or the firewall
    event is "flow denied", else ``unknown``. ``interface_id`` is the SNMP ifIndex the
    flow came in on ("" when 0 or absent). ``sampling_rate`` is the N of 1-in-N.

SMTP selection (``smtp_ports`` not None)
    As for the other formats (:mod:`smtpguard.ingest.selection`): a flow whose
    destination port is an SMTP port is kept; a flow whose source port is one is the
    server's answer, and its packets and bytes go to the kept record with the reversed
    5-tuple from the same exporter in the same batch (the k-th with the k-th) as
    ``rev_packets``/``rev_bytes``; such reverse flows, paired or not, and every other flow
    are skipped. With ``smtp_ports=None`` every flow is kept.

Accounting
    A batch's ``read`` counts the flows it produced (kept or skipped), the options records
    it consumed (skipped) and its rejects, so ``read == rows + skipped + rejects``. Per
    exporter counters are in :attr:`NetflowDecoder.counters`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from dataclasses import dataclass, fields as dc_fields
from typing import BinaryIO, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from smtpguard.core import record
from smtpguard.core.errors import ConfigError
from smtpguard.core.wire import MAX_EPOCH_MS
from smtpguard.ingest import ipfix, netflow_v5, netflow_v9
from smtpguard.ingest.base import Batch, Counters, Datagram, Reject
from smtpguard.ingest.ipfix import DecodeError, Template
from smtpguard.ingest.pcapfile import ExportCaptureParser, first_udp_payload, is_capture, read_exact
from smtpguard.ingest.selection import DEFAULT_SMTP_PORTS, pair_reverse, smtp_directions, smtp_ports_config

#: record ``source_format`` per export version
FORMAT_NAMES = {5: "netflow-v5", 9: "netflow-v9", 10: "ipfix"}
_FMT = ("netflow-v5", "netflow-v9", "ipfix")
#: How the reason of every template-miss dead letter starts (the collector counts them by it).
TEMPLATE_MISS = "template miss"

#: Data sets waiting for their template, at most (all exporters together).
PENDING_LIMIT = 1024
#: ... and at most this many bytes of them.
PENDING_BYTES_LIMIT = 16 << 20
#: How long a data set waits for its template. Exporters resend templates every few
#: seconds to minutes (Cisco every 30 min by default, too long to hold data for).
PENDING_TIMEOUT_S = 60.0
#: Templates per exporter (all versions and domains together). Big routers use some
#: tens per line card; thousands is a bomb.
MAX_TEMPLATES_PER_EXPORTER = 4096
#: Exporters whose state is kept; a UDP port can be sprayed from spoofed addresses.
MAX_EXPORTERS = 10_000
#: Distinct templates shared between exporters (beyond, templates are kept per exporter only).
MAX_SHARED_TEMPLATES = 4096
#: Bytes of a bad datagram or set kept (hex) in its dead letter.
RAW_PREFIX_BYTES = 256

#: How far a v5/v9 switch time may be ahead of the header's sysUptime (exporters fill
#: records and the header at slightly different moments); further ahead, the time is
#: taken as unknown and the flow placed at the export time, keeping its duration.
UPTIME_AHEAD_TOLERANCE_MS = 60_000
_NTP_UNIX_S = 2208988800
_EVICTED = "(forgotten exporters)"
_ACTIONS = pa.array(["unknown", "accept", "reject"], pa.string())
_REJECT = 2
_OCTETS = pa.array([str(i) for i in range(256)], pa.string())
_U64 = np.uint64


@dataclass
class ExporterCounters(Counters):
    """What one exporter sent and what became of it."""

    packets: int = 0
    """datagrams received"""
    records: int = 0
    """flow data records decoded (v5 records; v9/IPFIX data records of flow templates)"""
    options_records: int = 0
    """options data records decoded"""
    templates: int = 0
    """template and options template records received (refreshes included)"""
    templates_refused: int = 0
    """templates refused for the per-exporter bound"""
    template_misses: int = 0
    """data sets dropped because their template never came (timeout, buffer bound, flush)"""
    decode_errors: int = 0
    """malformed datagrams, sets, templates and records (each a dead letter)"""
    pending: int = 0
    """data sets waiting for their template now"""
    ignored_sets: int = 0
    """sets with a reserved id, skipped as the RFCs say"""


# --------------------------------------------------------------------------- state


class _Domain:
    """What one exporter told about one observation domain (IPFIX) or source id (v9)."""

    __slots__ = ("templates", "rates", "init_ms")

    def __init__(self) -> None:
        self.templates: dict[int, Template] = {}
        #: sampler id (None: exporter-wide) -> 1-in-N rate; replaced, never changed in
        #: place, so a data set can hold the mapping that was in force when it arrived
        self.rates: dict[int | None, int] = {}
        self.init_ms: int | None = None


class _Exporter:
    __slots__ = ("name", "domains", "n_templates", "counters")

    def __init__(self, name: str):
        self.name = name
        self.domains: dict[tuple[int, int], _Domain] = {}
        self.n_templates = 0
        self.counters = ExporterCounters()

    def domain(self, version: int, domain_id: int) -> _Domain:
        d = self.domains.get((version, domain_id))
        if d is None:
            d = self.domains[(version, domain_id)] = _Domain()
        return d


class _Ctx:
    """Where a data set came from and the header values its records need."""

    __slots__ = ("exporter", "fmt", "export_ms", "uptime_ms", "rate0", "init_ms", "rates", "seq",
                 "source", "location", "received_ms")

    def __init__(self, exporter: str, fmt: int, export_ms: int, uptime_ms: int, rate0: int, seq: int,
                 source: str, location: str, received_ms: int):
        self.exporter = exporter
        self.fmt = fmt
        self.export_ms = export_ms
        self.uptime_ms = uptime_ms
        self.rate0 = rate0
        self.init_ms: int | None = None
        self.rates: dict[int | None, int] = {}
        self.seq = seq
        self.source = source
        self.location = location
        self.received_ms = received_ms


class _Parked(NamedTuple):
    key: tuple[str, int, int, int]
    """(exporter, version, domain, template id)"""
    body: bytes
    ctx: _Ctx


class _Part(NamedTuple):
    body: bytes
    n: int
    ctx: _Ctx
    starts: list[int] | None
    offs: dict[int, list[int]] | None


class _Work:
    """What one decode call collects before the records are built."""

    __slots__ = ("groups", "rejects", "skipped", "exporters")

    def __init__(self) -> None:
        self.groups: dict[int, tuple[Template, list[_Part]]] = {}
        self.rejects: list[tuple[int, Reject]] = []  # (order, reject)
        self.skipped = 0
        self.exporters: dict[str, int] = {}

    def add(self, tmpl: Template, part: _Part) -> None:
        g = self.groups.get(id(tmpl))
        if g is None:
            self.groups[id(tmpl)] = (tmpl, [part])
        else:
            g[1].append(part)


def _forget_if_empty(exp: _Exporter, version: int, domain_id: int) -> None:
    """A domain (source id) whose templates were all withdrawn or refused is forgotten, its
    sampling rates with it: domains are bounded by templates, an exporter cannot fill memory
    with domain ids."""
    dom = exp.domains.get((version, domain_id))
    if dom is not None and not dom.templates:
        del exp.domains[(version, domain_id)]


# ------------------------------------------------------------------------- decoder


class NetflowDecoder:
    """Stateful NetFlow v5/v9/IPFIX decoder; see the module docstring.

    >>> dec = NetflowDecoder(None)
    >>> batch = dec.decode(payload, "192.0.2.1:2055", received_ms=1_700_000_000_000)  # doctest: +SKIP
    >>> dec.counters["192.0.2.1:2055"].records  # doctest: +SKIP
    """

    def __init__(self, smtp_ports: Sequence[int] | None, *, pending_limit: int = PENDING_LIMIT,
                 pending_bytes_limit: int = PENDING_BYTES_LIMIT, pending_timeout_s: float = PENDING_TIMEOUT_S,
                 max_templates_per_exporter: int = MAX_TEMPLATES_PER_EXPORTER, max_exporters: int = MAX_EXPORTERS,
                 max_template_fields: int = ipfix.MAX_TEMPLATE_FIELDS):
        for name, v in (("pending_limit", pending_limit), ("pending_bytes_limit", pending_bytes_limit),
                        ("max_templates_per_exporter", max_templates_per_exporter),
                        ("max_exporters", max_exporters), ("max_template_fields", max_template_fields)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"NetflowDecoder {name} must be a positive integer, got {v!r}")
        if not pending_timeout_s >= 0:
            raise ConfigError(f"NetflowDecoder pending_timeout_s must be >= 0, got {pending_timeout_s!r}")
        self.smtp_ports = smtp_ports_config(smtp_ports)
        self.pending_limit = pending_limit
        self.pending_bytes_limit = pending_bytes_limit
        self.pending_timeout_ms = int(pending_timeout_s * 1000)
        self.max_templates_per_exporter = max_templates_per_exporter
        self.max_exporters = max_exporters
        self.max_template_fields = max_template_fields
        self._exporters: OrderedDict[str, _Exporter] = OrderedDict()
        self._evicted = ExporterCounters()
        self._pending: OrderedDict[int, _Parked] = OrderedDict()
        self._waiting: dict[tuple[str, int, int, int], list[int]] = {}
        self._pending_bytes = 0
        self._seq = 0
        self._now_ms = 0
        self._layouts: dict[tuple, Template] = {}

    # ------------------------------------------------------------------ public

    @property
    def counters(self) -> dict[str, ExporterCounters]:
        """Counters per exporter (exporters whose state was forgotten for the
        ``max_exporters`` bound are added up under ``"(forgotten exporters)"``)."""
        out = {name: e.counters for name, e in self._exporters.items()}
        if any(getattr(self._evicted, f.name) for f in dc_fields(self._evicted)):
            out[_EVICTED] = self._evicted
        return out

    def totals(self) -> ExporterCounters:
        t = ExporterCounters()
        for c in self.counters.values():
            t.add(c)
        return t

    @property
    def pending_sets(self) -> int:
        return len(self._pending)

    def decode(self, payload: bytes, exporter: str, received_ms: int | None = None) -> Batch:
        """Decode one datagram (templates and options update the state)."""
        return self.decode_many([Datagram(payload, exporter, received_ms)])

    def decode_many(self, datagrams: Iterable[Datagram], source: str | None = None) -> Batch:
        """Decode datagrams in order into one batch (faster than one call per datagram:
        records of one template are decoded together). ``source`` names the input in
        dead letters (default: the exporter)."""
        work = _Work()
        for dg in datagrams:
            try:
                self._datagram(dg, work, source)
            except Exception as e:  # a decoder bug must not stop a collector: dead-letter the datagram
                exp = self._exporter(dg.exporter, work)
                exp.counters.decode_errors += 1
                self._reject(work, dg.exporter if source is None else source,
                             dg.location or f"datagram {exp.counters.packets}",
                             f"internal error while decoding: {type(e).__name__}: {e}", dg.payload, "")
        self._expire(work)
        return self._finish(work)

    def expire(self, now_ms: int) -> Batch:
        """Advance the clock to ``now_ms`` and give up on data that waited longer than
        ``pending_timeout_s`` for its template (for a listener with no traffic)."""
        self._now_ms = max(self._now_ms, now_ms)
        work = _Work()
        self._expire(work)
        return self._finish(work)

    def flush(self) -> Batch:
        """Give up on every data set still waiting for its template (template misses)."""
        work = _Work()
        while self._pending:
            self._drop_oldest(work, "its template never came")
        return self._finish(work)

    # ----------------------------------------------------------- datagrams

    def _exporter(self, name: str, work: _Work) -> _Exporter:
        exp = self._exporters.get(name)
        if exp is None:
            exp = self._exporters[name] = _Exporter(name)
            if len(self._exporters) > self.max_exporters:
                old_name, old = self._exporters.popitem(last=False)
                self._evicted.add(old.counters)
                # its templates are gone, so what waits for them never gets decoded
                for key in [k for k in self._waiting if k[0] == old_name]:
                    for seq in list(self._waiting[key]):
                        self._drop(seq, work, f"exporter {old_name} was forgotten "
                                              f"(state is kept for {self.max_exporters} exporters)")
        else:
            self._exporters.move_to_end(name)
        return exp

    def _counters_of(self, name: str) -> ExporterCounters:
        exp = self._exporters.get(name)
        return exp.counters if exp is not None else self._evicted

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _reject(self, work: _Work, source: str, location: str, reason: str, raw: bytes, fmt: str) -> None:
        work.rejects.append((self._next_seq(), Reject.make(source, location, reason,
                                                           bytes(raw[:RAW_PREFIX_BYTES]).hex(), fmt)))

    def _datagram(self, dg: Datagram, work: _Work, source: str | None) -> None:
        exp = self._exporter(dg.exporter, work)
        c = exp.counters
        c.packets += 1
        payload = dg.payload
        src = dg.exporter if source is None else source
        loc = dg.location or f"datagram {c.packets}"
        if len(payload) < 2:
            c.decode_errors += 1
            self._reject(work, src, loc, f"datagram of {len(payload)} bytes holds no NetFlow header", payload, "")
            return
        version = (payload[0] << 8) | payload[1]
        fmt = FORMAT_NAMES.get(version, "")
        try:
            if version == 5:
                self._v5(exp, payload, dg, src, loc, work)
            elif version == 9:
                self._v9(exp, payload, dg, src, loc, work)
            elif version == 10:
                self._ipfix(exp, payload, dg, src, loc, work)
            else:
                raise DecodeError(f"unknown NetFlow version {version} (expected 5, 9 or 10)")
        except DecodeError as e:
            c.decode_errors += 1
            where = loc if not e.offset else f"{loc}, offset {e.offset}"
            self._reject(work, src, where, e.reason, payload[e.offset:], fmt)

    def _clock(self, dg: Datagram, export_ms: int, work: _Work) -> int:
        """Receive time, or the exporter's clock when there is none. Advances the clock of
        the pending buffer and drops what waited too long, before this datagram's
        templates can release it."""
        t = dg.received_ms if dg.received_ms is not None else export_ms
        if t > self._now_ms:
            self._now_ms = t
        if self._pending:
            self._expire(work)
        return t

    def _v5(self, exp: _Exporter, payload: bytes, dg: Datagram, src: str, loc: str, work: _Work) -> None:
        h, body = netflow_v5.parse(payload)
        if h.count == 0:
            return
        export_ms = h.unix_s * 1000 + h.unix_ns // 1_000_000
        ctx = _Ctx(exp.name, 0, export_ms, h.uptime_ms, h.sampling_rate, self._next_seq(), src, loc,
                   self._clock(dg, export_ms, work))
        exp.counters.records += h.count
        work.add(netflow_v5.TEMPLATE, _Part(body, h.count, ctx, None, None))

    def _v9(self, exp: _Exporter, payload: bytes, dg: Datagram, src: str, loc: str, work: _Work) -> None:
        h = netflow_v9.parse_header(payload)
        self._sets(exp, payload, dg, src, loc, work, 9, h.source_id, h.unix_s * 1000, h.uptime_ms,
                   netflow_v9.iter_flowsets(payload))

    def _ipfix(self, exp: _Exporter, payload: bytes, dg: Datagram, src: str, loc: str, work: _Work) -> None:
        h = ipfix.parse_header(payload)
        self._sets(exp, payload, dg, src, loc, work, 10, h.domain, h.export_s * 1000, -1,
                   ipfix.iter_sets(payload, ipfix.HEADER_LEN, h.length))
        if h.length < len(payload):
            exp.counters.decode_errors += 1
            self._reject(work, src, f"{loc}, offset {h.length}",
                         f"{len(payload) - h.length} bytes after the end of the IPFIX message "
                         f"(header length {h.length})", payload[h.length:], "ipfix")

    def _sets(self, exp: _Exporter, payload: bytes, dg: Datagram, src: str, loc: str, work: _Work, version: int,
              domain_id: int, export_ms: int, uptime_ms: int, sets: Iterator[tuple[int, int, bytes]]) -> None:
        """The sets of a v9 or IPFIX message, in order: data sets go to their templates,
        template sets are learned (or, in IPFIX, withdrawn), sets with a reserved id are
        counted and skipped."""
        received = self._clock(dg, export_ms, work)
        # a domain's (source id's) state is made by its first template: datagrams that bring none leave none
        dom = exp.domains.get((version, domain_id))
        fmt = FORMAT_NAMES[version]
        c = exp.counters
        try:
            for sid, off, body in sets:
                where = f"{loc}, offset {off}"
                if sid >= ipfix.MIN_DATA_SET:
                    ctx = _Ctx(exp.name, _FMT.index(fmt), export_ms, uptime_ms, 1, self._next_seq(), src, where,
                               received)
                    self._data(exp, dom, version, domain_id, sid, body, ctx, work)
                    continue
                got = self._template_set(version, sid, body)
                if got is None:
                    c.ignored_sets += 1
                    continue
                found, problems, options = got
                for tid, tmpl in found:
                    if tmpl is None:
                        if dom is not None:
                            self._withdraw(exp, dom, tid, options)
                        continue
                    if dom is None:
                        dom = exp.domain(version, domain_id)
                    self._learn(exp, dom, version, domain_id, tid, tmpl, src, where, body, fmt, work)
                for e in problems:
                    c.decode_errors += 1
                    self._reject(work, src, f"{loc}, offset {off + 4 + e.offset}", e.reason,
                                 body[e.offset:], fmt)
        except DecodeError as e:
            c.decode_errors += 1
            self._reject(work, src, f"{loc}, offset {e.offset}", e.reason, payload[e.offset:], fmt)
        _forget_if_empty(exp, version, domain_id)

    def _template_set(self, version: int, sid: int, body: bytes
                      ) -> tuple[list[tuple[int, Template | None]], list[DecodeError], bool] | None:
        """(templates, problems, whether they are options templates) of a template or options
        template set; None for another reserved set id. An IPFIX withdrawal is a None template."""
        if version == 9:
            if sid == netflow_v9.TEMPLATE_FLOWSET:
                return *netflow_v9.parse_template_flowset(body, self.max_template_fields), False
            if sid == netflow_v9.OPTIONS_FLOWSET:
                return *netflow_v9.parse_options_flowset(body, self.max_template_fields), True
            return None
        if sid == ipfix.TEMPLATE_SET or sid == ipfix.OPTIONS_TEMPLATE_SET:
            options = sid == ipfix.OPTIONS_TEMPLATE_SET
            return *ipfix.parse_template_set(body, options, self.max_template_fields), options
        return None

    # ------------------------------------------------------------ templates

    def _learn(self, exp: _Exporter, dom: _Domain, version: int, domain_id: int, tid: int, tmpl: Template,
               src: str, where: str, body: bytes, fmt: str, work: _Work) -> None:
        c = exp.counters
        c.templates += 1
        old = dom.templates.get(tid)
        if old is None:
            if exp.n_templates >= self.max_templates_per_exporter:
                c.templates_refused += 1
                c.decode_errors += 1
                self._reject(work, src, where,
                             f"template {tid} refused: exporter {exp.name} already has {exp.n_templates} templates "
                             f"(limit {self.max_templates_per_exporter})", body, fmt)
                return
            exp.n_templates += 1
        if old is not None and old.same_layout(tmpl):
            tmpl = old  # a refresh
        else:
            tmpl = self._shared(version, tmpl)
        dom.templates[tid] = tmpl
        if self._waiting:
            self._release(exp, dom, (exp.name, version, domain_id, tid), tmpl, work)

    def _shared(self, version: int, tmpl: Template) -> Template:
        """One object per distinct template: exporters of one kind send the same
        templates, and the data of one template object is decoded in one go."""
        key = (version, tmpl.tid, tmpl.fields, tmpl.scope_count, tmpl.options)
        got = self._layouts.get(key)
        if got is not None:
            return got
        if len(self._layouts) < MAX_SHARED_TEMPLATES:
            self._layouts[key] = tmpl
        return tmpl

    def _withdraw(self, exp: _Exporter, dom: _Domain, tid: int, options: bool) -> None:
        if tid in (ipfix.TEMPLATE_SET, ipfix.OPTIONS_TEMPLATE_SET):
            gone = [t for t, tm in dom.templates.items() if tm.options == options]
        else:
            gone = [tid] if tid in dom.templates else []
        for t in gone:
            del dom.templates[t]
        exp.n_templates -= len(gone)

    # ----------------------------------------------------------------- data

    def _data(self, exp: _Exporter, dom: _Domain | None, version: int, domain_id: int, tid: int, body: bytes,
              ctx: _Ctx, work: _Work) -> None:
        tmpl = dom.templates.get(tid) if dom is not None else None
        if tmpl is None:
            self._park((exp.name, version, domain_id, tid), body, ctx, exp.counters, work)
        else:
            self._bind(exp, dom, tmpl, body, ctx, work)

    def _bind(self, exp: _Exporter, dom: _Domain, tmpl: Template, body: bytes, ctx: _Ctx, work: _Work) -> None:
        """Attach a data set to its template: options now (they change the state for
        what follows), flow records into the batch's group for the template."""
        c = exp.counters
        fmt = _FMT[ctx.fmt]
        if tmpl.fixed:
            n = len(body) // tmpl.record_len
            starts = offs = None
            if n and len(body) != n * tmpl.record_len:
                body = body[:n * tmpl.record_len]  # the rest is set padding
        else:
            starts, offs, used, problem = tmpl.record_starts(body)
            n = len(starts)
            if problem:
                c.decode_errors += 1
                self._reject(work, ctx.source, f"{ctx.location} (template {tmpl.tid})", problem, body[used:], fmt)
            body = body[:used]
        if n == 0:
            return
        if tmpl.options:
            c.options_records += n
            work.skipped += n
            self._options(dom, tmpl, body, n, offs)
            return
        c.records += n
        ctx.rates = dom.rates
        ctx.init_ms = dom.init_ms
        work.add(tmpl, _Part(body, n, ctx, starts, offs))

    def _options(self, dom: _Domain, tmpl: Template, body: bytes, n: int, offs: dict[int, list[int]] | None) -> None:
        cols = (tmpl.decode_fixed(body, n) if offs is None
                else tmpl.decode_gather(body, {i: np.asarray(v, np.int64) for i, v in offs.items()}))
        rate = _record_rates(cols, n)
        if rate is not None:
            ids = cols.get("sampler_id")
            updates: dict[int | None, int] = {}
            for k in np.flatnonzero(rate).tolist():
                updates[None if ids is None else int(ids[k])] = int(min(rate[k], 0xFFFFFFFF))
            if updates:
                dom.rates = {**dom.rates, **updates}
        init = cols.get("sys_init_ms")
        if init is not None and int(init[-1]):
            # a 64-bit field: beyond the last millisecond a record can hold, every time based on it
            # is out of range (and dead-lettered as such), not an integer overflow
            dom.init_ms = int(min(init[-1], MAX_EPOCH_MS))

    # -------------------------------------------------------------- pending

    def _park(self, key: tuple[str, int, int, int], body: bytes, ctx: _Ctx, c: ExporterCounters, work: _Work) -> None:
        if len(body) > self.pending_bytes_limit:
            c.template_misses += 1
            self._reject(work, ctx.source, ctx.location,
                         f"{TEMPLATE_MISS}: no template {key[3]} (domain {key[2]}) yet, and the data set of "
                         f"{len(body)} bytes is larger than the buffer for data waiting for templates "
                         f"({self.pending_bytes_limit} bytes)",
                         body, _FMT[ctx.fmt])
            return
        while self._pending and (len(self._pending) >= self.pending_limit
                                 or self._pending_bytes + len(body) > self.pending_bytes_limit):
            self._drop_oldest(work, f"the buffer for data waiting for templates was full "
                                    f"({self.pending_limit} sets, {self.pending_bytes_limit} bytes)")
        seq = ctx.seq
        self._pending[seq] = _Parked(key, bytes(body), ctx)
        self._waiting.setdefault(key, []).append(seq)
        self._pending_bytes += len(body)
        c.pending += 1

    def _unpark(self, seq: int) -> _Parked:
        p = self._pending.pop(seq)
        self._pending_bytes -= len(p.body)
        self._counters_of(p.key[0]).pending -= 1
        return p

    def _drop_oldest(self, work: _Work, why: str) -> None:
        self._drop(next(iter(self._pending)), work, why)

    def _drop(self, seq: int, work: _Work, why: str) -> None:
        p = self._unpark(seq)
        lst = self._waiting.get(p.key)
        if lst is not None:
            lst.remove(seq)
            if not lst:
                del self._waiting[p.key]
        c = self._counters_of(p.key[0])
        c.template_misses += 1
        _, version, domain_id, tid = p.key
        what = "source id" if version == 9 else "observation domain"
        self._reject(work, p.ctx.source, p.ctx.location,
                     f"{TEMPLATE_MISS}: data set for template {tid} ({what} {domain_id}) dropped: {why}",
                     p.body, _FMT[p.ctx.fmt])

    def _release(self, exp: _Exporter, dom: _Domain, key: tuple[str, int, int, int], tmpl: Template,
                 work: _Work) -> None:
        seqs = self._waiting.pop(key, None)
        if not seqs:
            return
        for seq in seqs:
            p = self._unpark(seq)
            self._bind(exp, dom, tmpl, p.body, p.ctx, work)

    def _expire(self, work: _Work) -> None:
        limit = self._now_ms - self.pending_timeout_ms
        while self._pending:
            p = next(iter(self._pending.values()))
            if p.ctx.received_ms >= limit:
                break
            self._drop_oldest(work, f"no template within {self.pending_timeout_ms / 1000:g} s")

    # -------------------------------------------------------------- records

    def _finish(self, work: _Work) -> Batch:
        try:
            return self._build(work)
        except Exception as e:  # a decoder bug must not stop a collector: dead-letter the data sets
            reason = f"internal error while building records: {type(e).__name__}: {e}"
            for _, parts in work.groups.values():
                for p in parts:
                    self._counters_of(p.ctx.exporter).decode_errors += 1
                    work.rejects.append((p.ctx.seq, Reject.make(p.ctx.source, p.ctx.location, reason,
                                                                p.body[:RAW_PREFIX_BYTES].hex(), _FMT[p.ctx.fmt])))
            rejects = [r for _, r in sorted(work.rejects, key=lambda x: x[0])]
            return Batch(record.empty_table(), rejects, work.skipped + len(rejects), work.skipped)

    def _build(self, work: _Work) -> Batch:
        cols: list[dict[str, np.ndarray]] = []
        for tmpl, parts in work.groups.values():
            got = self._decode_group(tmpl, parts, work)
            if got is not None:
                cols.append(got)
        rejects = [r for _, r in sorted(work.rejects, key=lambda x: x[0])]
        if not cols:
            return Batch(record.empty_table(), rejects, work.skipped + len(rejects), work.skipped)
        flows = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
        flows = _split_biflows(flows)
        order = np.argsort(flows["order"], kind="stable")
        flows = {k: v[order] for k, v in flows.items()}
        n = len(order)
        skipped = work.skipped
        if self.smtp_ports is not None:
            flows, dropped = _smtp_select(flows, self.smtp_ports)
            skipped += dropped
        exporters = list(work.exporters)
        table = _to_table(flows, exporters)
        return Batch(table, rejects, n + work.skipped + len(rejects), skipped)

    def _decode_group(self, tmpl: Template, parts: list[_Part], work: _Work) -> dict[str, np.ndarray] | None:
        counts = np.fromiter((p.n for p in parts), np.int64, len(parts))
        total = int(counts.sum())
        buf = parts[0].body if len(parts) == 1 else b"".join(p.body for p in parts)
        if tmpl.fixed:
            raw = tmpl.decode_fixed(buf, total)
            starts = None
        else:
            bases = np.cumsum([0] + [len(p.body) for p in parts[:-1]])
            offs = {i: np.concatenate([np.asarray(p.offs[i], np.int64) + b for p, b in zip(parts, bases)])
                    for i in parts[0].offs}  # type: ignore[union-attr]
            starts = np.concatenate([np.asarray(p.starts, np.int64) + b for p, b in zip(parts, bases)])
            raw = tmpl.decode_gather(buf, offs)
        has4 = "src4" in raw and "dst4" in raw
        has6 = "src6" in raw and "dst6" in raw
        if not (has4 or has6):
            work.skipped += total  # not an IP flow (MPLS, layer 2): nothing to say about SMTP
            return None

        def per_part(values: Iterable[int], dtype: type) -> np.ndarray:
            return np.repeat(np.fromiter(values, dtype, len(parts)), counts)

        ex_idx = [work.exporters.setdefault(p.ctx.exporter, len(work.exporters)) for p in parts]
        fmt = parts[0].ctx.fmt
        export_ms = per_part((p.ctx.export_ms for p in parts), np.int64)
        pos = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        out: dict[str, np.ndarray] = {
            "exp": per_part(ex_idx, np.int32),
            "fmt": np.full(total, fmt, np.uint8),
            "order": (per_part((p.ctx.seq for p in parts), np.int64) << 17) + (pos << 1),
        }

        # addresses: 16 bytes each, IPv4 in the last 4
        src = np.zeros((total, 16), np.uint8)
        dst = np.zeros((total, 16), np.uint8)
        v6 = np.zeros(total, bool)
        if has6:
            v6 = raw["src6"].any(axis=1) | raw["dst6"].any(axis=1)
            if has4:
                v6 &= (raw["src4"] == 0) & (raw["dst4"] == 0)
            src[v6] = raw["src6"][v6]
            dst[v6] = raw["dst6"][v6]
        if has4:
            v4 = ~v6
            src[v4, 12:] = raw["src4"][v4].astype(">u4").view(np.uint8).reshape(-1, 4)
            dst[v4, 12:] = raw["dst4"][v4].astype(">u4").view(np.uint8).reshape(-1, 4)
        out["src"], out["dst"], out["v6"] = src, dst, v6

        zeros = np.zeros(total, _U64)
        out["sport"] = raw.get("sport", zeros).astype(np.uint16)
        out["dport"] = raw.get("dport", zeros).astype(np.uint16)
        out["proto"] = raw.get("proto", zeros).astype(np.uint8)
        out["packets"] = raw.get("packets", zeros)
        out["bytes"] = raw.get("bytes", zeros)
        out["flags"] = raw.get("flags", zeros).astype(np.uint16)
        out["flags_ok"] = np.full(total, "flags" in raw)
        out["rpackets"] = raw.get("rpackets", zeros)
        out["rbytes"] = raw.get("rbytes", zeros)
        out["rflags"] = raw.get("rflags", zeros).astype(np.uint16)
        out["rflags_ok"] = np.full(total, "rflags" in raw)
        out["in_if"] = np.minimum(raw.get("in_if", zeros), 0xFFFFFFFF).astype(np.uint32)
        out["out_if"] = np.minimum(raw.get("out_if", zeros), 0xFFFFFFFF).astype(np.uint32)

        action = np.zeros(total, np.uint8)
        if "fwd_status" in raw:
            action[((raw["fwd_status"] & _U64(0xFF)) >> _U64(6)) == 2] = _REJECT
        if "fw_event" in raw:
            action[raw["fw_event"] == 3] = _REJECT
        out["action"] = action

        out["rate"] = self._rates(raw, parts, counts, total)

        start, end, problem = _times(raw, fmt, export_ms, parts, counts)
        bad = np.flatnonzero(problem != 0)
        if bad.size:
            part_of = np.searchsorted(np.cumsum(counts), bad, side="right")
            first = np.cumsum(counts) - counts
            for i, k in zip(bad.tolist(), part_of.tolist()):
                p = parts[k]
                if starts is None:
                    rec = buf[i * tmpl.record_len:(i + 1) * tmpl.record_len]
                else:
                    rec = buf[int(starts[i]):int(starts[i + 1]) if i + 1 < total else len(buf)]
                c = self._counters_of(p.ctx.exporter)
                c.decode_errors += 1
                work.rejects.append((p.ctx.seq, Reject.make(
                    p.ctx.source, f"{p.ctx.location}, record {i - int(first[k]) + 1}",
                    _TIME_PROBLEMS[int(problem[i])], rec[:RAW_PREFIX_BYTES].hex(), _FMT[fmt])))
            keep = problem == 0
            out = {k: v[keep] for k, v in out.items()}
            start, end = start[keep], end[keep]
        out["start"], out["end"] = start, end
        return out

    @staticmethod
    def _rates(raw: dict[str, np.ndarray], parts: list[_Part], counts: np.ndarray, total: int) -> np.ndarray:
        """Sampling rate per record: the record's own sampling fields, else the rate of
        its sampler (or the exporter-wide one) from options data, else the v5 header's."""
        rate = np.repeat(np.fromiter((p.ctx.rate0 for p in parts), np.int64, len(parts)), counts).astype(_U64)
        tables = [p.ctx.rates for p in parts]
        if any(tables):
            ids = raw.get("sampler_id")
            which: dict[int, int] = {}
            snap = np.repeat(np.fromiter((which.setdefault(id(t), len(which)) for t in tables), np.int64,
                                         len(parts)), counts)
            by_id = {id(t): t for t in tables}
            for tid_, k in which.items():
                table = by_id[tid_]
                if not table:
                    continue
                rows = snap == k
                if ids is None:
                    if None in table:
                        rate[rows] = table[None]
                    continue
                sel = ids[rows]
                uniq, inv = np.unique(sel, return_inverse=True)
                default = table.get(None, 0)
                looked = np.array([table.get(int(u), default) for u in uniq], _U64)
                got = looked[inv]
                rate[rows] = np.where(got > 0, got, rate[rows])
        own = _record_rates(raw, total)
        if own is not None:
            rate = np.where(own > 0, own, rate)
        rate[rate == 0] = 1
        return np.minimum(rate, 0xFFFFFFFF).astype(np.uint32)


def _record_rates(cols: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    """1-in-N rates given by the records themselves (0 where they give none), or None."""
    if "samp_interval" in cols:
        return cols["samp_interval"]
    if "samp_pkt_interval" in cols:
        iv = cols["samp_pkt_interval"]
        space = cols.get("samp_pkt_space", np.zeros(n, _U64))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(iv > 0, (iv + space) // np.maximum(iv, _U64(1)), _U64(0)).astype(_U64)
    if "samp_size" in cols and "samp_population" in cols:
        size = cols["samp_size"]
        return np.where(size > 0, cols["samp_population"] // np.maximum(size, _U64(1)), _U64(0)).astype(_U64)
    return None


# ------------------------------------------------------------------ times

_TIME_PROBLEMS = {
    1: "flow start or end time is outside 1970..9999",
    2: "flow ends before it starts",
}


def _times(raw: dict[str, np.ndarray], fmt: int, export_ms: np.ndarray, parts: list[_Part], counts: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start and end (epoch ms) per record, and a problem code (0: none)."""
    n = export_ms.size
    problem = np.zeros(n, np.uint8)
    if fmt == 2:
        inits = [p.ctx.init_ms for p in parts]
        has_init = np.repeat(np.fromiter((x is not None for x in inits), bool, len(parts)), counts)
        init = np.repeat(np.fromiter((x or 0 for x in inits), np.int64, len(parts)), counts)
        if "sys_init_ms" in raw:
            own = raw["sys_init_ms"]
            init = np.where(own > 0, np.minimum(own, MAX_EPOCH_MS).astype(np.int64), init)
            has_init = has_init | (own > 0)
        uptime = None
    else:
        uptime = np.repeat(np.fromiter((p.ctx.uptime_ms for p in parts), np.int64, len(parts)), counts)
        init = has_init = None

    def absolute(pfx: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(ms, known) for the start or end of the flow, or None if the template has no such field."""
        if f"{pfx}_ms" in raw:
            v = raw[f"{pfx}_ms"]
            problem[v > MAX_EPOCH_MS] = 1
            return np.minimum(v, MAX_EPOCH_MS).astype(np.int64), v > 0
        if f"{pfx}_s" in raw:
            v = raw[f"{pfx}_s"]
            problem[v > MAX_EPOCH_MS // 1000] = 1
            return np.minimum(v, MAX_EPOCH_MS // 1000).astype(np.int64) * 1000, v > 0
        for kind in ("us", "ns"):
            if f"{pfx}_{kind}" in raw:
                v = raw[f"{pfx}_{kind}"]
                sec = (v >> _U64(32)).astype(np.int64)
                frac = ((v & _U64(0xFFFFFFFF)) * _U64(1000)) >> _U64(32)
                return (sec - _NTP_UNIX_S) * 1000 + frac.astype(np.int64), v > 0
        if f"{pfx}_delta_us" in raw:
            v = raw[f"{pfx}_delta_us"].astype(np.int64)
            return export_ms - v // 1000, np.ones(n, bool)
        if f"{pfx}_up" in raw:
            up = raw[f"{pfx}_up"]
            if uptime is not None:
                # signed 32-bit difference: right across the wrap of the uptime counter
                # (every 49.7 days) and for a switch time a little after the header's uptime
                ago = ((uptime.astype(_U64) - up) & _U64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
                # a switch time far ahead of the uptime is an exporter clock bug, not a flow
                # in the future: such times are unknown, and the flow is placed at the export
                return export_ms - ago.astype(np.int64), ago >= -UPTIME_AHEAD_TOLERANCE_MS
            assert init is not None and has_init is not None
            return init + np.minimum(up, 0xFFFFFFFF).astype(np.int64), has_init.copy()
        return None

    s = absolute("start")
    e = absolute("end")
    dur = None
    if "dur_ms" in raw:
        dur = np.minimum(raw["dur_ms"], 0xFFFFFFFF).astype(np.int64)
    elif "dur_us" in raw:
        dur = np.minimum(raw["dur_us"], 0xFFFFFFFFFFFF).astype(np.int64) // 1000
    if dur is None and "start_up" in raw and "end_up" in raw:
        # no clock to place them, but the difference still is the duration
        dur = ((raw["end_up"] - raw["start_up"]) & _U64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
        dur = np.maximum(dur.astype(np.int64), 0)
    start, sk = s if s is not None else (export_ms.copy(), np.zeros(n, bool))
    end, ek = e if e is not None else (export_ms.copy(), np.zeros(n, bool))
    # fill what is unknown from what is known: the other end and the duration, else the export time
    d = dur if dur is not None else np.zeros(n, np.int64)
    only_s = sk & ~ek
    only_e = ek & ~sk
    neither = ~sk & ~ek
    end = np.where(only_s, start + d, end)
    start = np.where(only_e, end - d, start)
    end = np.where(neither, export_ms, end)
    start = np.where(neither, export_ms - d, start)
    out_of_range = (start < 0) | (end < 0) | (start > MAX_EPOCH_MS) | (end > MAX_EPOCH_MS)
    problem[out_of_range] = 1
    problem[(problem == 0) & (end < start)] = 2
    return start, end, problem


# ---------------------------------------------------------- biflows and SMTP


def _split_biflows(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the reverse half of every biflow whose reverse direction has packets."""
    rev = np.flatnonzero(f["rpackets"] > 0)
    if rev.size == 0:
        return f
    r = {k: v[rev] for k, v in f.items()}
    r["src"], r["dst"] = r["dst"], r["src"]
    r["sport"], r["dport"] = r["dport"], r["sport"]
    r["packets"], r["bytes"] = r["rpackets"], r["rbytes"]
    r["flags"], r["flags_ok"] = r["rflags"], r["rflags_ok"]
    r["in_if"], r["out_if"] = r["out_if"], r["in_if"]
    r["order"] = r["order"] + 1
    return {k: np.concatenate([f[k], r[k]]) for k in f}


def _smtp_select(f: dict[str, np.ndarray], ports: tuple[int, ...]) -> tuple[dict[str, np.ndarray], int]:
    """Keep client-to-server SMTP flows; the server's answers in the same batch become
    their ``rev_packets``/``rev_bytes``. Returns (kept flows, how many were skipped)."""
    n = f["dport"].size
    fwd, rev = smtp_directions(f["sport"], f["dport"], ports)
    rp = np.zeros(n, _U64)
    rb = np.zeros(n, _U64)
    if fwd.any() and rev.any():
        a, b = pair_reverse(f["src"], f["dst"], f["sport"], f["dport"], f["proto"], fwd, rev, [f["exp"]])
        rp[a] = f["packets"][b]
        rb[a] = f["bytes"][b]
    kept = {k: v[fwd] for k, v in f.items()}
    kept["rev_packets"], kept["rev_bytes"] = rp[fwd], rb[fwd]
    return kept, int(n - fwd.sum())


# ------------------------------------------------------------------ Arrow


def _ip_text(addr: np.ndarray, v6: np.ndarray) -> pa.Array:
    """Canonical text of 16-byte addresses (IPv4 in the last 4 bytes where not ``v6``)."""
    n = addr.shape[0]
    parts = [_OCTETS.take(pa.array(np.ascontiguousarray(addr[:, 12 + i]))) for i in range(4)]
    text = pc.binary_join_element_wise(*parts, ".")
    if v6.any():
        rows = np.flatnonzero(v6)
        uniq, inv = np.unique(np.ascontiguousarray(addr[rows]).view("V16").ravel(), return_inverse=True)
        names = pa.array([str(ipaddress.IPv6Address(u.tobytes())) for u in uniq], pa.string())
        idx = np.zeros(n, np.int64)
        idx[rows] = inv.ravel()
        text = pc.if_else(pa.array(v6), names.take(pa.array(idx)), text)
    return text


def _to_table(f: dict[str, np.ndarray], exporters: list[str]) -> pa.Table:
    n = f["sport"].size
    ts = pa.timestamp("ms", tz="UTC")
    iface = f["in_if"]
    iface_text = pc.cast(pa.array(iface), pa.string())
    if (iface == 0).any():
        iface_text = pc.if_else(pa.array(iface == 0), pa.scalar("", pa.string()), iface_text)
    rev_p = f.get("rev_packets")
    cols = {
        "start": pa.array(f["start"], ts),
        "end": pa.array(f["end"], ts),
        "src_ip": _ip_text(f["src"], f["v6"]),
        "dst_ip": _ip_text(f["dst"], f["v6"]),
        "src_port": pa.array(f["sport"]),
        "dst_port": pa.array(f["dport"]),
        "protocol": pa.array(f["proto"]),
        "packets": pa.array(f["packets"]),
        "bytes": pa.array(f["bytes"]),
        "rev_packets": pa.array(rev_p if rev_p is not None else np.zeros(n, _U64)),
        "rev_bytes": pa.array(f["rev_bytes"] if rev_p is not None else np.zeros(n, _U64)),
        "action": _ACTIONS.take(pa.array(f["action"])),
        "tcp_flags": pa.array(f["flags"], mask=~f["flags_ok"]),
        "interface_id": iface_text,
        "source_format": pa.array(list(_FMT), pa.string()).take(pa.array(f["fmt"])),
        "exporter": pa.array(exporters, pa.string()).take(pa.array(f["exp"])),
        "sampling_rate": pa.array(f["rate"]),
    }
    return record.conform(pa.table(cols), tenant="")


# ------------------------------------------------------------ input shells


def _is_netflow_payload(payload: bytes) -> bool:
    return len(payload) >= 2 and ((payload[0] << 8) | payload[1]) in FORMAT_NAMES


def looks_like_netflow(payload: bytes) -> bool:
    """True when ``payload`` starts with a plausible NetFlow v5, v9 or IPFIX header (and,
    for v9 and IPFIX, a plausible first set)."""
    if len(payload) < 20:
        return False
    version = (payload[0] << 8) | payload[1]
    if version == 5:
        count = (payload[2] << 8) | payload[3]
        return 1 <= count <= 30 and len(payload) >= netflow_v5.HEADER_LEN + netflow_v5.RECORD_LEN * count
    if version == 9:
        if len(payload) < netflow_v9.HEADER_LEN + 4:
            return False
        fid, length = struct.unpack_from(">HH", payload, netflow_v9.HEADER_LEN)
        return (fid in (0, 1) or fid >= 256) and 4 <= length <= len(payload) - netflow_v9.HEADER_LEN
    if version == 10:
        length = (payload[2] << 8) | payload[3]
        if length < ipfix.HEADER_LEN + 4 or length > len(payload):
            return False
        sid, slen = struct.unpack_from(">HH", payload, ipfix.HEADER_LEN)
        return (sid in (2, 3) or sid >= 256) and 4 <= slen <= length - ipfix.HEADER_LEN
    return False


def sniff_pcap(head: bytes) -> bool:
    """True when ``head`` is the start of a pcap/pcapng capture whose first UDP packet is
    NetFlow v5, v9 or IPFIX."""
    if not is_capture(head):
        return False
    payload = first_udp_payload(head)
    return payload is not None and looks_like_netflow(payload)


def sniff_dat(head: bytes) -> bool:
    """True when ``head`` starts with a NetFlow v5, v9 or IPFIX packet (raw payloads written
    back to back)."""
    if is_capture(head):
        return False
    return looks_like_netflow(head)


#: What the registry calls to sniff this module's default format (the pcap shell).
sniff = sniff_pcap

#: Datagrams decoded together: records of one template in a batch decode in one go.
BATCH_DATAGRAMS = 2000


class NetflowPcapParser(ExportCaptureParser):
    """NetFlow/IPFIX datagrams in a pcap or pcapng capture (Ethernet, VLAN, Linux cooked,
    loopback or raw IP; IPv4 or IPv6). The exporter of each datagram is its sender's
    ``ip:port``, its receive time the capture timestamp. Non-UDP packets, and UDP payloads
    that are not NetFlow, are counted in :attr:`ignored_packets`. The decoder (templates)
    lives as long as the parser: feed several captures of one session in order."""

    name = "netflow-pcap"

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS, *,
                 decoder: NetflowDecoder | None = None, batch_datagrams: int = BATCH_DATAGRAMS):
        super().__init__(source, decoder if decoder is not None else NetflowDecoder(smtp_ports), "netflow",
                         _is_netflow_payload, batch_datagrams, RAW_PREFIX_BYTES)


class NetflowDatParser:
    """NetFlow/IPFIX export packets written back to back with no framing (``nc -lu``
    output, test captures). Packet boundaries come from the headers: v5 from the record
    count, IPFIX from the length, v9 by walking flowsets to the next v9 header. All
    packets are taken as coming from one exporter, ``exporter`` (default: the name the
    parser was made with), so templates read from one file serve the data of the next."""

    name = "netflow-dat"

    def __init__(self, source: str, smtp_ports: Sequence[int] | None = DEFAULT_SMTP_PORTS, *,
                 exporter: str | None = None, decoder: NetflowDecoder | None = None,
                 batch_datagrams: int = BATCH_DATAGRAMS):
        self.source = source
        self.exporter = exporter or source
        self.decoder = decoder if decoder is not None else NetflowDecoder(smtp_ports)
        self.batch_datagrams = batch_datagrams

    def parse_stream(self, fh: BinaryIO, source: str) -> Iterator[Batch]:
        todo: list[Datagram] = []
        for offset, payload in split_packets(fh):
            todo.append(Datagram(payload, self.exporter, None, f"byte {offset}"))
            if len(todo) >= self.batch_datagrams:
                yield self.decoder.decode_many(todo, source)
                todo = []
        if todo:
            yield self.decoder.decode_many(todo, source)

    def close(self) -> Batch:
        """Give up on data still waiting for templates (call after the last input)."""
        return self.decoder.flush()


def _packet_end(buf: bytes, pos: int) -> int:
    """End of the packet at ``buf[pos]`` from its header; ``len(buf)`` when the header
    cannot tell (unknown version, a length past the end)."""
    end = len(buf)
    if end - pos < 4:
        return end
    version = (buf[pos] << 8) | buf[pos + 1]
    if version == 5:
        stop = pos + netflow_v5.packet_length(buf, pos)
    elif version == 10:
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        stop = pos + length if length >= ipfix.HEADER_LEN else end
    elif version == 9:
        stop = netflow_v9.packet_end(buf, pos)
    else:
        stop = end
    return min(stop, end)


def split_packets(fh: BinaryIO, chunk_bytes: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
    """(offset, packet) for NetFlow/IPFIX packets written back to back.

    The buffer always holds a whole datagram's worth (64 KiB) past the packet being cut,
    unless the input ends first, so a packet is never cut at a chunk boundary. Where the
    headers cannot tell a packet's end (unknown version, a length past the end) the rest
    of the buffer is one packet, so the decoder dead-letters it with the reason."""
    lookahead = 65536 + netflow_v9.HEADER_LEN
    buf = b""
    base = 0  # input offset of buf[0]
    eof = False
    while True:
        while not eof and len(buf) < lookahead + chunk_bytes:
            data = read_exact(fh, chunk_bytes)
            eof = not data
            buf += data
        pos = 0
        while pos < len(buf) and (eof or len(buf) - pos >= lookahead):
            end = _packet_end(buf, pos)
            yield base + pos, buf[pos:end]
            pos = end
        buf = buf[pos:]
        base += pos
        if eof and not buf:
            return


    batch.rejects = extra + batch.rejects
    batch.read += len(extra)
    return batch

