"""``smtpguard demo``: a generated cloud through the whole pipeline, on embedded defaults."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import msgspec

from smtpguard.core.config import Config, mask_dsn


def _say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def exe_name() -> str:
    return "smtpguard" if shutil.which("smtpguard") else sys.argv[0]


def _console_user(store) -> str:
    """An admin user 'demo' with a fresh random password in the demo's own store."""
    import secrets

    from smtpguard.console.auth import Users

    password = secrets.token_urlsafe(12)
    users = Users(store)
    if users.get("demo") is None:
        users.add("demo", "admin", password, "smtpguard-demo")
    else:
        users.set("demo", "smtpguard-demo", password=password)
    return password


DEMO_ZONE = "bl.demo.smtpguard.test"


def _demo_blocklist(out: Path, listed: list[str]):
    """A real rbldnsd on loopback serving a demo blocklist that lists ``listed``, and the zone to
    query it with; (None, None) when rbldnsd is not installed."""
    from smtpguard.lab import rbldnsd
    from smtpguard.response.dnsbl import Code, Zone

    if not rbldnsd.available():
        return None, None
    zone = Zone("demo-bl", DEMO_ZONE, {"127.0.0.2": Code("spam source (demo blocklist)")},
                delist_url="https://example.org/demo-blocklist/delist")
    srv = rbldnsd.Rbldnsd(out / "dnsbl", [rbldnsd.Dataset(
        DEMO_ZONE, "ip4set", [":127.0.0.2:Listed by the smtpguard demo blocklist", *listed])])
    return srv.start(), zone


def run_demo(cfg: Config, *, seed: int = 7, instances: int = 300, minutes: int = 60, out_dir: str | None = None) -> bool:
    from smtpguard.lab import scenario

    out = Path(out_dir or Path(cfg.data_dir) / "demo").resolve()
    if (out / "store").exists():
        shutil.rmtree(out / "store")  # the demo's own store starts fresh each run
    out.mkdir(parents=True, exist_ok=True)

    _say(f"generating {minutes} minutes of traffic from {instances} instances (seed {seed}) ...")
    scen = scenario.generate(seed, instances=instances, duration_s=minutes * 60)
    paths = scenario.write(scen, out)
    truth = json.loads(Path(paths["truth"]).read_text())
    abusers = {a["ip"]: a for a in truth if a["label"] != "benign"}

    # The demo blocklist lists the spammers, not the flood or the blocked attempts: every
    # medium-or-higher alert is looked up in it, and the listings join the alerts' evidence.
    spammers = sorted(ip for ip, a in abusers.items() if a["label"].startswith("spam"))
    dnsbl_srv, zone = _demo_blocklist(out, spammers)
    if zone is None:
        _say("rbldnsd is not installed (apt-get install rbldnsd): alerts are not looked up in a blocklist")
        dnsbl_cfg = msgspec.structs.replace(cfg.dnsbl, check_alerts_from="off")
    else:
        _say(f"demo blocklist {DEMO_ZONE} (rbldnsd on {dnsbl_srv.resolver}) lists {len(spammers)} of the spammers")
        dnsbl_cfg = msgspec.structs.replace(cfg.dnsbl, zones=[zone], default_zones=[zone.name],
                                            resolvers=[dnsbl_srv.resolver], check_alerts_from="medium")
    try:
        return _run(cfg, out, paths, abusers, dnsbl_cfg)
    finally:
        if dnsbl_srv is not None:
            dnsbl_srv.stop()


def _run(cfg: Config, out: Path, paths: dict, abusers: dict, dnsbl_cfg) -> bool:
    from smtpguard.console.queries import stored_dnsbl
    from smtpguard.ingest.reader import Progress
    from smtpguard.app.serve import LocalStack, collect_into

    cfg = msgspec.structs.replace(
        cfg, data_dir=str(out), dnsbl=dnsbl_cfg,
        store=msgspec.structs.replace(cfg.store, dsn=f"chdb://{out / 'store'}"),
        detect=msgspec.structs.replace(cfg.detect, idle_flush_ms=2000, exemptions_csv=str(paths["exemptions"]),
                                       inventory_csv=str(paths["inventory"])),
    )
    t0 = time.monotonic()
    with LocalStack(cfg, str(paths["exemptions"])) as stack:
        _say(f"local Kafka broker (Tansu) on {stack.cfg.kafka.bootstrap_servers}; store {mask_dsn(stack.cfg.store_dsn)}")
        bar = Progress("collect")
        try:
            stats = collect_into(stack.cfg, [str(paths["flows"])], "aws-vpc", bar)
        finally:
            bar.close()
        _say(f"collector: {stats.summary()}")
        stack.end_of_input(stats.kept)
        _say("detector: closing windows ...")
        if not stack.wait_idle(stats.kept, timeout_s=300):
            _say("the detector did not catch up within 300 s")
            return False
        st = stack.runner.stats
        _say(f"detector: {st.records:,} records, {st.windows:,} source-minute windows, {st.alerts_raised} alerts raised, "
             f"{st.alerts_suppressed} repeats suppressed by cooldown ({time.monotonic() - t0:.1f} s)")
        alerts = stack.store.list_alerts(min_severity="low", limit=10_000)
        medium_ips = sorted({a["src_ip"] for a in alerts if a["src_ip"] and a["severity"] in ("medium", "high", "critical")})
        dnsbl = {ip: stored_dnsbl(stack.store, ip) for ip in medium_ips}
        from smtpguard.response.enforce import write_nftables
        from smtpguard.core.registry import Registry

        registry = Registry(stack.store)
        revoked = registry.list("revoked")
        nft_path = out / "smtp-allowed.nft"
        nft = write_nftables(nft_path, registry, stack.cfg.response)
        decisions = dict(stack.responder.stats.decisions)
        enforcement_topic = stack.cfg.kafka.topics.enforcement
        from smtpguard.response.enforce import read_state

        enforcement = read_state(stack.cfg)
        password = _console_user(stack.store)

    print()
    groups: dict[tuple[str, str], list[dict]] = {}
    for a in alerts:
        groups.setdefault((a["src_ip"] or f"tenant {a['tenant']}", a["detector"]), []).append(a)
    print(f"{'first window':17} {'alerts':>6} {'worst':8} {'detector':17} {'source':15}  strongest evidence")
    for (src, det), group in sorted(groups.items(), key=lambda kv: min(a["window_start"] for a in kv[1])):
        worst = max(group, key=lambda a: (a["severity_rank"], a["score"]))
        first = min(a["window_start"] for a in group)
        print(f"{first:%Y-%m-%d %H:%M}  {len(group):6} {worst['severity']:8} {det:17} {src:15}  {worst['reasons'][0]}")
    flagged = {a["src_ip"] for a in alerts if a["severity"] in ("medium", "high", "critical")}
    found = sorted(ip for ip in abusers if ip in flagged)
    missed = sorted(ip for ip in abusers if ip not in flagged)
    false_pos = sorted(ip for ip in flagged if ip not in abusers)
    print()
    print(f"injected abusers flagged: {len(found)} of {len(abusers)}"
          + "".join(f"\n  {ip:15} {abusers[ip]['label']}" for ip in found))
    if missed:
        print("missed: " + ", ".join(f"{ip} ({abusers[ip]['label']})" for ip in missed))
    print(f"benign sources with medium or higher alerts: {len(false_pos)}" + (f" ({', '.join(false_pos)})" if false_pos else ""))
    print()
    print(f"response policy decisions: {decisions or 'none'}")
    for r in revoked:
        print(f"  exemption of {r.key} revoked by {r.last.actor}: {r.last.reason}")
    denied = sorted(k for k, e in enforcement.items() if e.action == "deny")
    print(f"enforcement state on {enforcement_topic} (latest event per key): {len(enforcement) - len(denied)} allowed, "
          f"{len(denied)} denied" + (f" ({', '.join(denied)})" if denied else ""))
    print(f"nftables set of allowed senders: {nft_path} ({nft.ipv4} IPv4 and {nft.ipv6} IPv6 entries"
          + (", checked with nft -c)" if nft.checked else ")")
          + (f"; revoked senders left out: {', '.join(r.key for r in revoked)}" if revoked else ""))
    if any(dnsbl.values()):
        print()
        print("DNSBL answers stored with the alerts (every medium or higher alert's source is looked up):")
        for ip, answers in dnsbl.items():
            print(f"  {ip:15} " + ", ".join(
                f"{d['zone']} {d['status'].replace('_', ' ')}" + (f" {','.join(d['codes'])}" if d["codes"] else "")
                for d in answers))
    print()
    print(f"console: {exe_name()} --data-dir {out} console   then open http://127.0.0.1:8025 and log in as "
          f"'demo' with password '{password}' (role admin: triage, confirm, dismiss, restore)")
    print()
    print(f"data: flow log {paths['flows']}, exemptions {paths['exemptions']}, inventory {paths['inventory']}, "
          f"truth {paths['truth']}")
    print(f"store: {out / 'store'} (ClickHouse tables flows, window_features, alerts in database {cfg.store.database})")
    exe = exe_name()
    print(f"explore: {exe} --data-dir {out} alerts list --severity medium")
    print(f"         {exe} analyze {paths['flows']} --exemptions {paths['exemptions']} --inventory {paths['inventory']} "
          "--min-severity medium")
    return not missed and not false_pos
