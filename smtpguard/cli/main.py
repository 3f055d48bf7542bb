"""The ``smtpguard`` command line. Exit status: 0 success, 1 the job failed, 2 usage or config error."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

import click

from smtpguard.core import config as config_mod
from smtpguard.core.errors import SmtpguardError
from smtpguard.core.lifecycle import Shutdown
from smtpguard.core.record import SEVERITIES

log = logging.getLogger("smtpguard")

FORMAT_HELP = "input format, or auto to sniff each file (see `smtpguard formats`)"


def _format_choice() -> click.Choice:
    from smtpguard.ingest.registry import FORMATS

    return click.Choice(["auto", *FORMATS])


class Ctx:
    def __init__(self, config_path: str | None, overrides: dict[str, Any]):
        self.config_path = config_path
        self.overrides = overrides
        self._cfg: config_mod.Config | None = None

    @classmethod
    def of(cls, cfg: config_mod.Config) -> "Ctx":
        """A context around an already loaded config (for running commands from Python)."""
        c = cls(None, {})
        c._cfg = cfg
        return c

    @property
    def cfg(self) -> config_mod.Config:
        if self._cfg is None:
            from smtpguard.app import settings

            self._cfg = settings.load(self.config_path, overrides=self.overrides)
        return self._cfg


pass_ctx = click.make_pass_decorator(Ctx)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clickhouse_connect").setLevel(logging.WARNING)


def _exemptions(cfg: config_mod.Config, path: str | None):
    from smtpguard.core.exemptions import Exemptions

    path = path or cfg.detect.exemptions_csv
    return Exemptions.from_csv(path) if path else Exemptions()


def _inventory(cfg: config_mod.Config, path: str | None):
    from smtpguard.core.inventory import Inventory

    path = path or cfg.detect.inventory_csv
    return Inventory.from_csv(path) if path else None


def _err(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="FILE", help="TOML config file (default: $SMTPGUARD_CONFIG or ./smtpguard.toml)")
@click.option("--data-dir", metavar="DIR", help="where the embedded store and local state live (config: data_dir)")
@click.option("--store", "store_dsn", metavar="DSN", help="ClickHouse DSN: chdb:///dir or http(s)://user:pass@host:8123/db")
@click.option("--bootstrap-servers", metavar="HOST:PORT,...", help="Kafka brokers (config: kafka.bootstrap_servers)")
@click.option("-v", "--verbose", count=True, help="more logging (-v info, -vv debug)")
@click.version_option(package_name="smtpguard")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, data_dir: str | None, store_dsn: str | None,
        bootstrap_servers: str | None, verbose: int) -> None:
    """Detect spam and SMTP floods from cloud instances in flow records.

    \b
    Quick start:
      smtpguard demo                         generate traffic, run the whole pipeline, show alerts
      smtpguard analyze flows.log --json     detectors over files, no broker needed
      smtpguard serve flows/                 local broker + collector + detector + store
    """
    overrides: dict[str, Any] = {}
    if data_dir:
        overrides["data_dir"] = data_dir
    if store_dsn:
        overrides.setdefault("store", {})["dsn"] = store_dsn
    if bootstrap_servers:
        overrides.setdefault("kafka", {})["bootstrap_servers"] = bootstrap_servers
    ctx.obj = Ctx(config_path, overrides)
    _setup_logging("debug" if verbose > 1 else "info" if verbose else "warning")


# -- config -----------------------------------------------------------------------------------
@cli.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of TOML")
@pass_ctx
def config_show(c: Ctx, as_json: bool) -> None:
    """Print the effective config (file + SMTPGUARD_* environment + flags), secrets masked."""
    from smtpguard.app import settings

    data = settings.shown(c.cfg)
    click.echo(json.dumps(data, indent=2) if as_json else config_mod.to_toml(data))


@cli.command("formats")
def formats_cmd() -> None:
    """List the input formats with an example command each."""
    from smtpguard.ingest.registry import FORMATS

    for f in FORMATS.values():
        click.echo(f"{f.name:10} {f.doc}\n{'':10} e.g. {f.example}")


# -- decode / analyze ---------------------------------------------------------------------------
@cli.command("decode")
@click.argument("paths", nargs=-1, required=True)
@click.option("--format", "fmt", default="auto", type=_format_choice(), help=FORMAT_HELP)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line (the record's field names)")
@click.option("--smtp-only", is_flag=True, help="only client-to-server SMTP records (what the collector keeps)")
@click.option("--rejects", is_flag=True, help="print the dead letters (input that could not be decoded) with reasons instead")
@pass_ctx
def decode_cmd(c: Ctx, paths: tuple[str, ...], fmt: str, as_json: bool, smtp_only: bool, rejects: bool) -> None:
    """Print every decoded flow as the normalized record (PATH may be a file, .gz, directory or -)."""
    import msgspec

    from smtpguard.core import record
    from smtpguard.ingest.reader import read_batches

    ports = c.cfg.ingest.smtp_ports if smtp_only else None
    n_rec = n_rej = 0
    out = sys.stdout
    for _src, batch in read_batches(paths, fmt, ports, c.cfg.ingest.chunk_lines):
        if rejects:
            for r in batch.rejects:
                out.write(msgspec.json.encode(r).decode() + "\n" if as_json else f"{r.source}:{r.location}: {r.reason}: {r.raw}\n")
        else:
            for row in record.to_dicts(batch.records):
                out.write(json.dumps(row) + "\n" if as_json else
                          f"{row['start']} {row['src_ip']}:{row['src_port']} -> {row['dst_ip']}:{row['dst_port']} "
                          f"proto {row['protocol']} {row['packets']} pkts {row['bytes']} B {row['action']} {row['tenant']}\n")
        n_rec += batch.records.num_rows
        n_rej += len(batch.rejects)
    _err(f"{n_rec:,} records, {n_rej:,} rejected")


@cli.command("analyze")
@click.argument("paths", nargs=-1, required=True)
@click.option("--format", "fmt", default="auto", type=_format_choice(), help=FORMAT_HELP)
@click.option("--exemptions", metavar="FILE.csv", help="exempted IPs: CSV with header ip,tenant,granted_at,reason "
              "(optional column declared_conns_per_min)")
@click.option("--inventory", metavar="FILE.csv", help="the provider's address plan: CSV with header "
              "ip,tenant,instance_id,interface_id (config: detect.inventory_csv)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per alert per line on stdout")
@click.option("--min-severity", type=click.Choice(SEVERITIES), default="info",
              show_default=True, help="print only alerts at or above this severity")
@click.option("--dead-letters", metavar="FILE", help="write rejected input (JSON lines with reasons) here")
@click.option("--progress/--no-progress", default=None, help="progress bar on stderr (default: when stderr is a terminal)")
@pass_ctx
def analyze_cmd(c: Ctx, paths: tuple[str, ...], fmt: str, exemptions: str | None, inventory: str | None,
                as_json: bool, min_severity: str, dead_letters: str | None, progress: bool | None) -> None:
    """Run the detectors over flow files offline (no broker, no store) and print the alerts.

    Progress and the summary go to stderr; alerts go to stdout.
    """
    import msgspec

    from smtpguard.app.analyze import analyze, contract_json
    from smtpguard.core.alert import rank
    from smtpguard.ingest.reader import Progress

    cfg = c.cfg
    ex = _exemptions(cfg, exemptions)
    dl = open(dead_letters, "w") if dead_letters else None
    bar = Progress("analyze", progress)
    try:
        res = analyze(cfg, paths, fmt, ex, bar,
                      on_reject=(lambda r: dl.write(msgspec.json.encode(r).decode() + "\n")) if dl else None,
                      inventory=_inventory(cfg, inventory))
    finally:
        bar.close()
        if dl:
            dl.close()
    floor = rank(min_severity)
    for a in res.raised():
        if rank(a.severity) < floor:
            continue
        if as_json:
            click.echo(json.dumps(contract_json(a)))
        else:
            click.echo(f"{a.window_start} {a.severity:8} {a.detector:17} {a.src_ip or 'tenant ' + a.tenant:16} "
                       f"score {a.score:.2f}  {a.reasons[0]}")
    _err(res.summary())
    if res.rejects and not dead_letters:
        _err(f"{res.rejects:,} input lines were rejected; see them with --dead-letters FILE or `smtpguard decode --rejects`")


# -- streaming ----------------------------------------------------------------------------------
def _collect_choice() -> click.Choice:
    from smtpguard.ingest.registry import FORMATS

    return click.Choice(["auto", "netflow", "sflow", "live", *FORMATS])


def _host_port(value: str) -> tuple[str, int]:
    try:
        return config_mod.host_port(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


metrics_option = click.option(
    "--metrics", "metrics_listen", metavar="HOST:PORT",
    help="serve Prometheus metrics at http://HOST:PORT/metrics (config: metrics.listen, default 127.0.0.1:9325); "
         "'' = none")


def _start_metrics(c: Ctx, listen: str | None):
    """Apply ``--metrics`` to the config and start the endpoint (None when metrics.listen is empty)."""
    from smtpguard.core import metrics

    if listen is not None:
        c.overrides.setdefault("metrics", {})["listen"] = listen
        c._cfg = None
    # an address the user chose must work; the default one may be taken by a sibling process
    chosen = listen is not None or c.cfg.metrics.listen != config_mod.Metrics().listen
    return metrics.serve(c.cfg.metrics.listen, required=chosen)


@cli.command("collect")
@click.argument("fmt", metavar="FORMAT", type=_collect_choice())
@click.argument("paths", nargs=-1)
@click.option("--listen", metavar="HOST:PORT", help="receive NetFlow v5/v9/IPFIX over UDP instead of reading files")
@click.option("--iface", metavar="IF", help="with FORMAT live: capture SMTP connections on this interface "
              "(needs root or CAP_NET_RAW)")
@click.option("--bpf", metavar="EXPR", help="with --iface: a tcpdump-style filter instead of the built-in "
              "SMTP-port filter (compiled by libpcap)")
@click.option("--progress/--no-progress", default=None, help="progress bar on stderr (default: when stderr is a terminal)")
@metrics_option
@pass_ctx
def collect_cmd(c: Ctx, fmt: str, paths: tuple[str, ...], listen: str | None, iface: str | None, bpf: str | None,
                progress: bool | None, metrics_listen: str | None) -> None:
    """Read flow records and produce SMTP connection records to Kafka.

    \b
    Examples:
      smtpguard --bootstrap-servers kafka:9092 collect aws-vpc /var/log/vpc/
      smtpguard --bootstrap-servers kafka:9092 collect netflow --listen 0.0.0.0:2055
      smtpguard --bootstrap-servers kafka:9092 collect sflow --listen 0.0.0.0:6343
      smtpguard --bootstrap-servers kafka:9092 collect pcap /var/capture/smtp-*.pcap
      sudo smtpguard --bootstrap-servers kafka:9092 collect live --iface eth0
    Records go to kafka.topics.flows (keyed by source IP), dead letters to kafka.topics.dlq.
    """
    from smtpguard.ingest.collector import Collector
    from smtpguard.ingest.reader import Progress
    from smtpguard.core.kafka import ensure_topics

    if (fmt == "live") != bool(iface):
        raise click.UsageError("live capture is `collect live --iface IF`")
    if bpf and not iface:
        raise click.UsageError("--bpf goes with `collect live --iface IF`")
    if iface and (paths or listen):
        raise click.UsageError("`collect live --iface IF` reads no PATHs and no --listen")
    if listen and paths:
        raise click.UsageError("give either PATHs or --listen, not both")
    if not listen and not paths and not iface:
        raise click.UsageError("give PATHs to read, --listen HOST:PORT for NetFlow/IPFIX or sFlow over UDP, "
                               "or `collect live --iface IF`")
    if listen and not fmt.startswith(("netflow", "sflow")):
        raise click.UsageError("--listen receives NetFlow/IPFIX or sFlow: use `collect netflow --listen HOST:PORT` "
                               "or `collect sflow --listen HOST:PORT`")
    if fmt in ("netflow", "sflow") and not listen:
        fmt = "auto"
    _start_metrics(c, metrics_listen)
    ensure_topics(c.cfg)
    col = Collector(c.cfg)
    if iface:
        from smtpguard.ingest.pcap_live import live_capture
        from smtpguard.ingest.pcap_smtp import SmtpCaptureParser

        parser = SmtpCaptureParser(iface, c.cfg.ingest.smtp_ports)
        with Shutdown(name="smtpguard collect") as sd:
            capture = live_capture(iface, c.cfg.ingest.smtp_ports, col.send, sd.event, bpf=bpf, parser=parser,
                                   on_ready=lambda: _err(f"capturing SMTP connections on {iface}; Ctrl-C or "
                                                         "SIGTERM to stop"))
        col.flush()
        _err(f"{col.stats.summary()}\ncapture: {capture.packets:,} packets read, "
             f"{capture.kernel_drops:,} dropped by the kernel; {parser.counters}")
        return
    if listen:
        from smtpguard.ingest.netflow import NetflowDecoder
        from smtpguard.ingest.netflow_listen import listen_udp
        from smtpguard.ingest.sflow import SflowDecoder

        host, port = _host_port(listen)
        sflow = fmt.startswith("sflow")
        dec = SflowDecoder(c.cfg.ingest.smtp_ports) if sflow else NetflowDecoder(c.cfg.ingest.smtp_ports)
        what = "sFlow" if sflow else "NetFlow/IPFIX"
        try:
            with Shutdown(name="smtpguard collect") as sd:
                listen_udp(host, port, dec, col.send, sd.event,
                           on_ready=lambda addr: _err(f"listening for {what} on {listen}; Ctrl-C or SIGTERM to stop"))
        except OSError as e:
            raise SmtpguardError(f"cannot listen on {listen}: {e}") from None
        col.flush()
        _err(f"{col.stats.summary()}\n{'agents' if sflow else 'exporters'}: {dec.totals()}")
        return
    bar = Progress("collect", progress)
    try:
        stats = col.run(paths, fmt, bar)
    finally:
        bar.close()
    _err(stats.summary())
    if stats.delivery_errors:
        for e in stats.first_errors:
            _err(f"  {e}")
        raise SmtpguardError(f"{stats.delivery_errors} messages were not delivered")


@cli.group("spool")
def spool_group() -> None:
    """Messages the collector could not deliver within the delivery timeout (DATA_DIR/spool)."""


@spool_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per spool file")
@pass_ctx
def spool_list(c: Ctx, as_json: bool) -> None:
    """The spool files and the messages waiting in each, per topic."""
    from pathlib import Path

    from smtpguard.ingest.collector import Spool

    spool = Spool(Path(c.cfg.data_dir) / "spool")
    files = spool.files()
    for f in files:
        per_topic: dict[str, int] = {}
        for m in Spool.read(f):
            per_topic[m.topic] = per_topic.get(m.topic, 0) + 1
        if as_json:
            click.echo(json.dumps({"file": str(f), "bytes": f.stat().st_size, "messages": per_topic}))
        else:
            click.echo(f"{f}  {f.stat().st_size:,} bytes  " + ", ".join(f"{t}: {n}" for t, n in per_topic.items()))
    if not as_json:
        _err(f"{len(files)} spool files in {spool.directory}" + ("; `smtpguard spool resend` delivers them" if files else ""))


@spool_group.command("resend")
@pass_ctx
def spool_resend(c: Ctx) -> None:
    """Deliver the spooled messages to their topics and partitions, skipping any the topic already
    holds (matched by message id); each file is removed once all its messages are settled."""
    from smtpguard.ingest.collector import resend_spool
    from smtpguard.core.kafka import ensure_topics

    ensure_topics(c.cfg)
    st = resend_spool(c.cfg)
    _err(f"resent {st.delivered:,} messages, {st.skipped:,} were already on the topic, {st.delivery_errors:,} failed again"
         + (f" (kept in {st.spool_path})" if st.spooled else ""))
    if st.delivery_errors:
        raise SmtpguardError(f"{st.delivery_errors} messages were not delivered; they stay in the spool")


@cli.command("detect")
@click.option("--exemptions", metavar="FILE.csv",
              help="import this CSV into the exemption registry first (config: detect.exemptions_csv)")
@click.option("--inventory", metavar="FILE.csv", help="the provider's address plan: CSV with header "
              "ip,tenant,instance_id,interface_id (config: detect.inventory_csv)")
@metrics_option
@pass_ctx
def detect_cmd(c: Ctx, exemptions: str | None, inventory: str | None, metrics_listen: str | None) -> None:
    """Run a detector in the consumer group: flows -> windows -> alerts, features -> store.

    Start more processes with the same kafka.group_id to share the partitions.
    """
    from smtpguard.detectors.runner import DetectorRunner
    from smtpguard.core.kafka import ensure_topics
    from smtpguard.core.store import Store

    from smtpguard.app.serve import import_exemptions

    _start_metrics(c, metrics_listen)
    cfg = c.cfg
    if inventory:
        cfg.detect.inventory_csv = inventory
    _inventory(cfg, None)  # a bad file stops here, with one line
    ensure_topics(cfg)
    with Shutdown(name="smtpguard detect") as sd, Store(cfg.store_dsn, cfg.store.database) as store:
        import_exemptions(store, exemptions or cfg.detect.exemptions_csv, cfg)
        runner = DetectorRunner(cfg, store, None, stop=sd.event)
        runner.run()
    _err(runner.stats.summary())


@cli.command("respond")
@metrics_option
@pass_ctx
def respond_cmd(c: Ctx, metrics_listen: str | None) -> None:
    """Run the response service: act on every raised alert once (its own consumer group on the alerts topic).

    The revocation policy decides; revocations go to the exemption registry and the enforcement
    outputs (smtp.enforcement, the webhook) through a durable outbox, so a slow webhook holds up
    neither the detectors nor this consumer; sources of medium-or-higher alerts are looked up in the
    DNSBLs. Run one or more (kafka.response_group_id); detectors read revocations from the registry.
    """
    from smtpguard.core.kafka import ensure_topics
    from smtpguard.core.store import Store
    from smtpguard.response.service import Responder

    _start_metrics(c, metrics_listen)
    cfg = c.cfg
    ensure_topics(cfg)
    with Shutdown(name="smtpguard respond") as sd, Store(cfg.store_dsn, cfg.store.database) as store:
        responder = Responder(cfg, store, sd.event)
        _err(f"acting on alerts from {cfg.kafka.topics.alerts} (group {cfg.kafka.response_group_id}); "
             "Ctrl-C or SIGTERM to stop")
        responder.run()
    _err(responder.stats.summary())


@cli.command("serve")
@click.argument("paths", nargs=-1)
@click.option("--format", "fmt", default="auto", type=_format_choice(), help=FORMAT_HELP)
@click.option("--exemptions", metavar="FILE.csv",
              help="import this CSV into the exemption registry first (config: detect.exemptions_csv)")
@click.option("--inventory", metavar="FILE.csv", help="the provider's address plan: CSV with header "
              "ip,tenant,instance_id,interface_id (config: detect.inventory_csv)")
@metrics_option
@pass_ctx
def serve_cmd(c: Ctx, paths: tuple[str, ...], fmt: str, exemptions: str | None, inventory: str | None,
              metrics_listen: str | None) -> None:
    """Run everything in one process: a local Tansu broker when no Kafka is configured, the
    store, a detector, and a collector for each PATH given. Stops on Ctrl-C."""
    from smtpguard.ingest.reader import Progress
    from smtpguard.app.serve import LocalStack, collect_into

    _start_metrics(c, metrics_listen)
    cfg = c.cfg
    if inventory:
        cfg.detect.inventory_csv = inventory
    _inventory(cfg, None)
    with Shutdown(name="smtpguard serve") as sd:
        with LocalStack(cfg, exemptions) as stack:
            sd.watch(stack.stop_event)
            _err(f"broker {stack.cfg.kafka.bootstrap_servers}, store {config_mod.mask_dsn(stack.cfg.store_dsn)}")
            if paths:
                bar = Progress("collect")
                try:
                    stats = collect_into(stack.cfg, paths, fmt, bar, stop=sd.event)
                finally:
                    bar.close()
                _err(stats.summary())
                # the files are the whole input: the last windows close once they are consumed
                stack.end_of_input(stats.kept)
            if not sd.event.is_set():
                _err("detector running; Ctrl-C or SIGTERM to stop")
            while not stack.stop_event.wait(1.0):
                pass
        # the stack has stopped: the detector wrote and committed what it had, the broker is stopped
        # and the store is closed
        _err(stack.runner.stats.summary() if stack.runner is not None else "detector not started")
        if stack.responder is not None:
            _err(stack.responder.stats.summary())
        if stack.error:
            raise SmtpguardError(f"the detector stopped: {stack.error}")


@cli.command("demo")
@click.option("--seed", default=7, show_default=True, help="scenario seed")
@click.option("--instances", default=300, show_default=True, help="instances in the generated cloud")
@click.option("--minutes", default=60, show_default=True, help="scenario length")
@click.option("--out", "out_dir", metavar="DIR", help="where to put the demo's data (default: DATA_DIR/demo)")
@pass_ctx
def demo_cmd(c: Ctx, seed: int, instances: int, minutes: int, out_dir: str | None) -> None:
    """Generate a realistic cloud's traffic with injected spam, a flood and blocked attempts,
    push it through the whole pipeline (broker, collector, detector, store) and show the alerts."""
    from smtpguard.lab.demo import run_demo

    ok = run_demo(c.cfg, seed=seed, instances=instances, minutes=minutes, out_dir=out_dir)
    if not ok:
        sys.exit(1)


@cli.group("topics")
def topics_group() -> None:
    """Kafka topics."""


@topics_group.command("create")
@pass_ctx
def topics_create(c: Ctx) -> None:
    """Create smtpguard's topics (flows with kafka.partitions partitions) if missing."""
    from smtpguard.core.kafka import ensure_topics

    ensure_topics(c.cfg)
    t = c.cfg.kafka.topics
    _err(f"topics ready: {t.flows}, {t.dlq}, {t.alerts}, {t.enforcement}")


# -- alerts -------------------------------------------------------------------------------------
def _parse_since(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    units = {"m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        from smtpguard.core.exemptions import parse_time

        return parse_time(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a duration like 30m, 6h, 2d nor an ISO 8601 time") from None


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, dt.datetime):
            v = v.replace(tzinfo=dt.timezone.utc) if v.tzinfo is None else v
            v = v.isoformat().replace("+00:00", "Z")
        if k == "evidence" and isinstance(v, str):
            v = json.loads(v)
        out[k] = v
    out.pop("severity_rank", None)
    return out


def _ocsf(row: dict[str, Any], dnsbl: list[dict[str, Any]] | None = None) -> bytes:
    """A stored alert row as its OCSF Detection Finding (JSON)."""
    import msgspec

    from smtpguard.core import ocsf
    from smtpguard.core.alert import Alert

    return ocsf.to_json(msgspec.convert(_jsonable(row), Alert), dnsbl)


@cli.group("alerts")
def alerts_group() -> None:
    """Review alerts in the store."""


@alerts_group.command("list")
@click.option("--severity", type=click.Choice(SEVERITIES), help="at least this severity")
@click.option("--since", metavar="WHEN", help="window end after: a duration (30m, 6h, 2d) or an ISO 8601 time")
@click.option("--ip", metavar="IP", help="only this source IP")
@click.option("--suppressed", is_flag=True, help="include findings suppressed by cooldown")
@click.option("--limit", default=100, show_default=True)
@click.option("--format", "out_format", type=click.Choice(["text", "json", "ocsf"]), default="text", show_default=True,
              help="json: one alert object per line; ocsf: one OCSF Detection Finding per line (docs/ARCHITECTURE.md)")
@click.option("--json", "as_json", is_flag=True, help="the same as --format json")
@pass_ctx
def alerts_list(c: Ctx, severity: str | None, since: str | None, ip: str | None, suppressed: bool, limit: int,
                out_format: str, as_json: bool) -> None:
    """List alerts, newest window first.

    \b
    Examples:
      smtpguard alerts list --severity medium --since 6h
      smtpguard alerts list --format ocsf | curl -s --data-binary @- https://siem.example/ingest
    """
    from smtpguard.core.store import Store

    out_format = "json" if as_json else out_format
    when = _parse_since(since)
    with Store(c.cfg.store_dsn, c.cfg.store.database) as store:
        rows = store.list_alerts(min_severity=severity, since=when, ip=ip, include_suppressed=suppressed, limit=limit)
    for r in rows:
        if out_format == "ocsf":
            click.echo(_ocsf(r).decode())
        elif out_format == "json":
            click.echo(json.dumps(_jsonable(r)))
        else:
            click.echo(f"{r['alert_id']}  {r['window_start']:%Y-%m-%d %H:%M}  {r['severity']:8} {r['detector']:17} "
                       f"{r['src_ip'] or 'tenant ' + r['tenant']:16} {r['score']:.2f}  {r['reasons'][0] if r['reasons'] else ''}")
    if out_format == "text":
        _err(f"{len(rows)} alerts")


@alerts_group.command("incidents")
@click.option("--since", metavar="WHEN", help="incidents active after: a duration (30m, 6h, 2d) or an ISO 8601 time")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@pass_ctx
def alerts_incidents(c: Ctx, since: str | None, limit: int, as_json: bool) -> None:
    """Alerts grouped into incidents (one source or tenant, gaps under 30 minutes)."""
    from smtpguard.core.store import Store

    when = _parse_since(since)
    with Store(c.cfg.store_dsn, c.cfg.store.database) as store:
        rows = store.list_incidents(since=when, limit=limit)
    for r in rows:
        if as_json:
            click.echo(json.dumps(_jsonable(r)))
        else:
            click.echo(f"{r['incident_id']}  {r['first_window']:%Y-%m-%d %H:%M} .. {r['last_window']:%H:%M}  "
                       f"{r['severity']:8} {r['src_ip'] or 'tenant ' + r['tenant']:16} {r['alerts']:4} alerts  "
                       f"{', '.join(r['detectors'])}")
    if not as_json:
        _err(f"{len(rows)} incidents")


@alerts_group.command("show")
@click.argument("alert_id")
@click.option("--format", "out_format", type=click.Choice(["text", "json", "ocsf"]), default="text", show_default=True,
              help="ocsf: the alert as an OCSF Detection Finding, its DNSBL answers as enrichments")
@click.option("--json", "as_json", is_flag=True, help="the same as --format json")
@pass_ctx
def alerts_show(c: Ctx, alert_id: str, out_format: str, as_json: bool) -> None:
    """Show one alert with its reasons and evidence, and the DNSBL answers about its source."""
    from smtpguard.console.queries import stored_dnsbl
    from smtpguard.core.store import Store

    with Store(c.cfg.store_dsn, c.cfg.store.database) as store:
        row = store.get_alert(alert_id)
        if row is None:
            raise SmtpguardError(f"no alert {alert_id}; list them with `smtpguard alerts list`")
        dnsbl = stored_dnsbl(store, row["src_ip"]) if row["src_ip"] else []
    data = _jsonable(row)
    data["dnsbl"] = [_jsonable(d) for d in dnsbl]
    if out_format == "ocsf":
        click.echo(_ocsf(row, data["dnsbl"]).decode())
        return
    if as_json or out_format == "json":
        click.echo(json.dumps(data))
        return
    click.echo(f"alert {data['alert_id']}: {data['severity']} {data['detector']} (score {data['score']:.2f})")
    click.echo(f"source {data['src_ip']}  tenant {data['tenant']}  exempted {data['exempted']}  status {data['status']}")
    click.echo(f"window {data['window_start']} .. {data['window_end']}")
    click.echo("reasons:")
    for r in data["reasons"]:
        click.echo(f"  - {r}")
    click.echo("evidence:")
    for k, v in data["evidence"].items():
        click.echo(f"  {k}: {v}")
    click.echo("DNSBL answers (latest per zone):" if dnsbl else
               "DNSBL answers: none stored (look it up with `smtpguard alerts dnsbl ALERT_ID`)")
    for d in data["dnsbl"]:
        what = f"{d['status']}" + (f" {', '.join(d['codes'])}" if d["codes"] else "") + \
            (f" ({d['meaning']})" if d["meaning"] else "") + (f" \"{d['txt']}\"" if d["txt"] else "")
        click.echo(f"  {d['zone']:16} {what}  checked {d['checked_at']}" +
                   (f"  delist: {d['delist_url']}" if d["status"] == "listed" and d["delist_url"] else ""))


@cli.command("eval")
@click.option("--seeds", default="evaluation", show_default=True,
              help="'evaluation' (seeds never used for tuning), 'tuning', or comma-separated integers")
@click.option("--instances", default=600, show_default=True, help="instances per scenario")
@click.option("--hours", default=2.0, show_default=True, help="hours of traffic per scenario, all of them scored")
@click.option("--formats", default="aws-vpc,netflow-v9", show_default=True,
              help="write each scenario as these and detect on each: aws-vpc, netflow-v9, sflow-N "
                   "(sFlow sampling 1 packet in N, e.g. sflow-256)")
@click.option("--late-fraction", default=0.0, show_default=True, help="share of flow lines delivered 1-4 minutes late")
@click.option("--labelled", "labelled", multiple=True, metavar="DIR",
              help="folder of labelled Argus flows (CTU-13); may repeat")
@click.option("--sweep", "sweep_dir", metavar="DIR",
              help="instead: run each detector's main parameters over a range on the seeds and write a "
                   "precision/recall table (Markdown) and plot (PNG) per detector into DIR")
@click.option("--sampling", "sampling_rates", metavar="RATES", default=None, is_flag=False, flag_value="64,256,1024,4096",
              help="instead: detect the same traffic unsampled and exported as sFlow sampling 1 packet in each "
                   "of RATES (default 64,256,1024,4096) and print recall per kind and rate as a Markdown table; "
                   "exit status 1 when a benign source reaches medium at any rate")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def eval_cmd(c: Ctx, seeds: str, instances: int, hours: float, formats: str, late_fraction: float,
             labelled: tuple[str, ...], sweep_dir: str | None, sampling_rates: str | None, as_json: bool) -> None:
    """Measure detection quality on generated traffic, scored from the first minute.

    Every medium-or-higher alert counts: on an abuser inside its abuse window (start - 1 min to
    end + 15 min) it is a hit, anywhere else a false positive. Prints recall and delay per abuse
    kind, precision per detector, false-positive sources per hour, and the targets. Exit status 1
    when a target is not met (recall 1.0 for every kind, no false-positive source, median delay
    <= 90 s for bursts, floods and blocked spam and <= 30 min for low-and-slow).

    \b
    smtpguard eval                                # the evaluation seeds (never tuned on)
    smtpguard eval --seeds tuning --formats aws-vpc
    smtpguard eval --seeds tuning --sweep docs/sweep
    smtpguard eval --sampling                     # recall at 1:1, 1:64, 1:256, 1:1024, 1:4096
    """
    from pathlib import Path

    from smtpguard.lab import evaluate

    if seeds == "evaluation":
        seed_list = list(evaluate.EVALUATION_SEEDS)
    elif seeds == "tuning":
        seed_list = list(evaluate.TUNING_SEEDS)
    else:
        try:
            seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"--seeds must be 'evaluation', 'tuning' or integers separated by commas, "
                                     f"not {seeds!r}") from None
    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    try:
        evaluate.check_formats(fmts)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--formats") from None
    from smtpguard.ingest.reader import step_bar

    if sampling_rates is not None:
        try:
            rates = [int(x) for x in sampling_rates.split(",") if x.strip()]
        except ValueError:
            rates = []
        if not rates or min(rates) < 1:
            raise click.BadParameter(f"takes sampling rates N >= 1 separated by commas, not {sampling_rates!r}",
                                     param_hint="--sampling")
        with step_bar("eval", len(seed_list) * (1 + len({r for r in rates if r > 1})), "run") as bar:
            sres = evaluate.sampling(c.cfg, seed_list, rates, instances=instances, hours=hours,
                                     progress=lambda name: bar.update(1))
        click.echo(json.dumps(sres.to_dict(), default=str) if as_json else evaluate.sampling_report(sres))
        if not sres.no_false_positives():
            sys.exit(1)
        return
    if sweep_dir:
        from smtpguard.lab import sweep

        with step_bar("sweep", len(seed_list) * len(fmts), "run") as bar:
            tables = sweep.run(c.cfg, seed_list, Path(sweep_dir), instances=instances, hours=hours, formats=fmts,
                               progress=lambda name: bar.update(1))
        click.echo(json.dumps(tables, default=str) if as_json else sweep.report(tables, Path(sweep_dir)))
        return
    with step_bar("eval", len(seed_list) * len(fmts), "run") as bar:
        def done(name: str) -> None:
            bar.set_postfix(run=name, refresh=False)
            bar.update(1)

        res = evaluate.run(c.cfg, seed_list, instances=instances, hours=hours, formats=fmts,
                           late_fraction=late_fraction, labelled_dirs=[Path(d) for d in labelled], progress=done)
    click.echo(json.dumps(res.to_dict(), default=str) if as_json else evaluate.report(res))
    if not res.meets_targets():
        sys.exit(1)


def _register() -> None:
    from smtpguard.cli.dnsbl import dnsbl_group
    from smtpguard.cli.model import model_group
    from smtpguard.cli.audit import audit_cmd
    from smtpguard.cli.console import ALERT_ACTION_COMMANDS, console_cmd, users_group
    from smtpguard.cli.response import enforce_group, exemptions_group
    from smtpguard.cli.store import store_group

    cli.add_command(model_group)
    cli.add_command(dnsbl_group)
    cli.add_command(exemptions_group)
    cli.add_command(enforce_group)
    cli.add_command(console_cmd)
    cli.add_command(users_group)
    cli.add_command(audit_cmd)
    cli.add_command(store_group)
    for cmd in ALERT_ACTION_COMMANDS:
        alerts_group.add_command(cmd)


_register()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="smtpguard", standalone_mode=False)
    except click.exceptions.Abort:
        _err("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except SmtpguardError as e:
        _err(f"smtpguard: error: {e}")
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(0)


if __name__ == "__main__":
    main()
