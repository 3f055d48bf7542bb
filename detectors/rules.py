"""The detectors: small named units, each turning window features into findings with reasons.

Policy only: thresholds and scores. Every parameter is declared in the detector's
``Params`` with its default and meaning; ``[detect.detectors.NAME]`` in the config
overrides them and is checked against these declarations at start-up.

Each detector sees one row per (source, window) with the columns of :data:`features.FEATURES`
plus ``exempted`` (the source holds a port-25 exemption), ``exemption_age_days`` (how long it
has held it; null when not exempted) and ``declared_conns_per_min`` (the sending volume the
exemption was granted for; null when none was declared).

Three kinds of source, and what may raise them to medium or higher (docs/DETECTION.md):

- **no exemption, or a fresh one** (younger than ``established_exemption_days``): judged from
  its first minute on what needs no history: fan-out, floods, blocked attempts to many servers;
- **established exempted senders**: a real mail server talks to many servers and bursts, so
  volume and fan-out are judged against its own history, and only once that history covers
  ``detect.learning_minutes`` (before that, at most ``low``, marked *learning*); what can raise
  them is persistence: many never-seen servers minute after minute (``volume_spike``,
  ``low_and_slow``), and floods;
- **declared senders** (an exemption with ``declared_conns_per_min``): judged against the
  declared volume from their first minute, whatever their history.

Every finding carries its recommended next step (``next_step``), in the terms of the person who acts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
import polars as pl

from smtpguard.core.errors import ConfigError


@dataclass
class Finding:
    detector: str
    src_ip: str | None
    tenant: str
    window_start_ms: int
    window_end_ms: int
    score: float
    reasons: list[str]
    evidence: dict[str, Any] = field(default_factory=dict)
    exempted: bool = False
    next_step: str = ""
    severity: str | None = None
    """set only to override the severity of the score (a repeat held at low: detectors/repeats.py)"""


def ramp(x: pl.Expr, lo: float | pl.Expr, hi: float | pl.Expr, s_lo: float = 0.5, s_hi: float = 1.0) -> pl.Expr:
    """Score rising linearly from ``s_lo`` at ``lo`` to ``s_hi`` at ``hi`` (and capped there)."""
    frac = ((x - lo) / (pl.lit(hi) - lo)).clip(0.0, 1.0) if not isinstance(hi, pl.Expr) else ((x - lo) / (hi - lo)).clip(0.0, 1.0)
    return (s_lo + (s_hi - s_lo) * frac).round(3)


def _established(p: Any) -> pl.Expr:
    """Exempted long enough to have earned the higher exempted-sender thresholds."""
    return pl.col("exempted") & (pl.col("exemption_age_days").fill_null(0) >= p.established_exemption_days)


def _declared() -> pl.Expr:
    return pl.col("declared_conns_per_min").is_not_null()


#: what the person who acts should do, per kind of finding (docs/DETECTION.md, severity table)
NEXT_STEPS = {
    "spam": "Check the instance now: confirm to apply the revocation policy (the exemption is revoked, port 25 "
            "closed) or dismiss; contact the tenant about a compromised host or account.",
    "spam_learning": "No action yet: an established sender judged without its own history. Review if it repeats "
                     "once the history is learned, or declare its volume on the exemption.",
    "flood": "Stop the flood now: confirm to revoke the exemption (or block 465/587 for the instance) and contact "
             "the tenant; the target is another provider's mail server.",
    "blocked_spam": "Investigate the instance: it tries many mail servers although port 25 is closed (a spam tool "
                    "or malware). Contact the tenant; no exemption to revoke.",
    "blocked_app": "Advise the customer: an application keeps trying port 25, which is closed. Send mail through "
                   "port 587 or 465 with a mail provider or the provider's relay. No security action.",
    "over_declared": "Ask the customer about the traffic above the volume its exemption was granted for; confirm "
                     "to apply the revocation policy if it is not theirs.",
    "tenant": "Review the tenant's instances together: several of them reach many mail servers; contact the tenant.",
    "reject_storm": "Check the instance: receiving servers refuse its mail. Look it up in the DNSBLs (the alert "
                    "shows the answers) and contact the tenant.",
    "anomaly": "Evidence for a reviewer: unusual, not necessarily abusive. Look at the features named.",
}


def _history_note(r: dict[str, Any]) -> str:
    """The source's history state, as every reason list shows it."""
    seen = int(r.get("seen_minutes") or 0)
    if r.get("learning", True):
        return f"learning: seen for {seen} minutes ({int(r.get('history_minutes') or 0)} active), not yet judged " \
               f"against its own history"
    return f"history: seen for {seen} minutes, usually {r.get('base_conns', 0):.1f} connections and " \
           f"{r.get('base_new', 0):.1f} never-seen servers per active minute"


def _source_note(r: dict[str, Any]) -> str:
    """Names the address behind a prefix key, or how many addresses shared the window."""
    key = r.get("src_ip") or ""
    if "/" not in key:
        return ""
    n = int(r.get("addresses") or 1)
    if n == 1:
        return f"one address of {key}: {r.get('top_address')}"
    return f"{n} addresses of {key} in the window (busiest {r.get('top_address')}): judged as one source"


class Detector:
    name: ClassVar[str]
    Params: ClassVar[type[msgspec.Struct]]
    scope: ClassVar[str] = "source"
    """"source": sees one row per source IP and window; "tenant": one row per tenant and window"""

    def __init__(self, params: msgspec.Struct):
        self.params = params

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        raise NotImplementedError

    @staticmethod
    def _findings(name: str, rows: pl.DataFrame, reasons_of, next_step_of=None) -> list[Finding]:
        out = []
        if rows.height == 0:
            return out
        times = [k for k, t in rows.schema.items() if t.is_temporal() and not k.startswith("_")]
        hidden = [k for k in rows.columns if k == "score" or k.startswith("_")]
        for r in rows.iter_rows(named=True):
            evidence = dict(r)
            for k in hidden:
                del evidence[k]
            for k in times:
                if evidence[k] is not None:
                    evidence[k] = evidence[k].isoformat()
            reasons = [x for x in reasons_of(r) if x]
            if r.get("src_ip") is not None and "learning" in r:
                reasons.append(_history_note(r))
            step = next_step_of(r) if next_step_of else ""
            evidence["next_step"] = step
            out.append(Finding(
                detector=name, src_ip=r.get("src_ip"), tenant=r["tenant"],
                window_start_ms=int(r["window_start"].timestamp() * 1000),
                window_end_ms=int(r["window_end"].timestamp() * 1000),
                score=float(r["score"]), reasons=reasons, evidence=evidence, exempted=bool(r.get("exempted")),
                next_step=step,
            ))
        return out


def _exempt_note(r: dict[str, Any]) -> str:
    if not r["exempted"]:
        return "no port-25 exemption"
    declared = r.get("declared_conns_per_min")
    return f"exempted for {r['exemption_age_days']:.1f} days" + (
        f", declared volume {declared:g} connections a minute" if declared is not None else ", no declared volume")


class SpamFanout(Detector):
    """Many distinct mail servers in one window: the shape of bulk spam delivery.

    Sources without an established exemption are judged from their first minute. An
    established exempted sender bursts to many servers as part of its job (newsletters,
    lists): its fan-out alone is at most ``low``, evidence for a reviewer, while it is learning
    and after; persistence raises it (``volume_spike``, ``low_and_slow``). A declared sender is
    judged against its declared volume.
    """

    name = "spam_fanout"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_distinct_dst: int = 20
        """distinct destination servers per window that start a finding"""
        min_distinct_dst24: int = 8
        """distinct destination /24 networks also required (spreads across providers)"""
        saturation_distinct_dst: int = 150
        """fan-out at which the score reaches 1.0"""
        exempt_factor: float = 4.0
        """established exempted senders need this many times the fan-out even for a low finding"""
        established_exemption_days: float = 7.0
        """an exemption younger than this earns no relief: the same volume from a new instance is suspect"""
        peak_factor: float = 1.5
        """established exempted senders (history learned) also need this many times their own peak fan-out"""
        min_new_share: float = 0.5
        """established exempted senders also need this share of destinations they never used before"""
        declared_tolerance: float = 1.25
        """a declared sender is raised when its fan-out passes this many times its declared volume"""
        max_established_score: float = 0.45
        """the highest score a burst of an established exempted sender gets (0.45 = low)"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        est = _established(p)
        dec = _declared()
        declared_t = pl.col("declared_conns_per_min") * p.declared_tolerance
        base_t = pl.lit(float(p.min_distinct_dst))
        est_t = pl.lit(p.min_distinct_dst * p.exempt_factor)
        rows = feats.with_columns(
            _mode=pl.when(dec).then(pl.lit("declared")).when(est).then(pl.lit("established")).otherwise(pl.lit("open")),
        ).with_columns(
            _t=pl.when(pl.col("_mode") == "declared").then(pl.max_horizontal(base_t, declared_t))
            .when(pl.col("_mode") == "established").then(
                pl.when(pl.col("learning")).then(est_t).otherwise(pl.max_horizontal(est_t, pl.col("peak_distinct") * p.peak_factor)))
            .otherwise(base_t),
            _t24=pl.when(pl.col("_mode") == "established").then(pl.lit(p.min_distinct_dst24 * p.exempt_factor))
            .otherwise(pl.lit(float(p.min_distinct_dst24))),
        ).with_columns(
            _sat=pl.col("_t") * (p.saturation_distinct_dst / p.min_distinct_dst),
        ).filter((pl.col("distinct_dst") >= pl.col("_t")) & (pl.col("distinct_dst24") >= pl.col("_t24"))
                 & ((pl.col("_mode") != "established") | (pl.col("new_dst_share") >= p.min_new_share)))
        rows = rows.with_columns(score=pl.when(pl.col("_mode") == "established")
                                 .then(ramp(pl.col("distinct_dst"), pl.col("_t"), pl.col("_sat"), 0.3, p.max_established_score))
                                 .otherwise(ramp(pl.col("distinct_dst"), pl.col("_t"), pl.col("_sat"))))

        def reasons(r: dict[str, Any]) -> list[str]:
            why = {"declared": f"over {p.declared_tolerance:g} times its declared volume",
                   "established": "an established sender's burst: at most low on its own (persistence is judged by "
                                  "volume_spike and low_and_slow)",
                   "open": "no established exemption: judged from the first minute"}[r["_mode"]]
            return [
                f"{r['distinct_dst']} distinct mail servers in {r['distinct_dst24']} networks within "
                f"{r['window_ms'] // 1000} s (threshold {r['_t']:.0f}; {why})",
                f"{r['new_dst']} of them never contacted before ({r['new_dst_share']:.0%}); usual fan-out "
                f"{r['base_distinct']:.1f} per active minute",
                f"{r['connections']} SMTP connections, {r['rejected']} rejected by the network, "
                f"{r['bytes_per_conn']:.0f} bytes per connection",
                _source_note(r),
                _exempt_note(r),
            ]

        def step(r: dict[str, Any]) -> str:
            if r["_mode"] == "established":
                return NEXT_STEPS["spam_learning"]
            if r["_mode"] == "declared":
                return NEXT_STEPS["over_declared"]
            return NEXT_STEPS["spam"]

        return self._findings(self.name, rows, reasons, step)


class ConnectionFlood(Detector):
    """Many short connections concentrated on one to three servers: a DoS against mail servers.

    Only connections that left the network count: a flood the network rejects harms no one
    (it is reported by ``blocked_attempts``). Needs no history: fires from the first minute.
    """

    name = "connection_flood"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_conns_top3: int = 300
        """connections to the three busiest destinations per window that start a finding"""
        min_top3_share: float = 0.8
        """share of all connections those destinations must take (concentration)"""
        max_bytes_per_conn: float = 2000.0
        """flood connections carry little: above this mean size it is mail, not a flood"""
        saturation_conns: int = 2000
        """connections at which the score reaches 1.0"""
        exempt_factor: float = 2.0
        """established exempted senders need this many times the connections"""
        established_exemption_days: float = 7.0
        """see spam_fanout"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        factor = pl.when(_established(p)).then(pl.lit(p.exempt_factor)).otherwise(pl.lit(1.0))
        rows = feats.with_columns(
            _t=pl.lit(p.min_conns_top3) * factor, _sat=pl.lit(p.saturation_conns) * factor,
            _share=pl.col("top3_dst_conns") / pl.col("connections"),
            _open=pl.col("connections").cast(pl.Int64) - pl.col("rejected").cast(pl.Int64),
            _targets=pl.min_horizontal(pl.col("distinct_dst"), pl.lit(3)),
        ).filter(
            (pl.col("top3_dst_conns") >= pl.col("_t"))
            & (pl.col("_open") >= pl.col("_t"))
            & (pl.col("_share") >= p.min_top3_share)
            & (pl.col("bytes_per_conn") <= p.max_bytes_per_conn)
        ).with_columns(score=ramp(pl.col("top3_dst_conns"), pl.col("_t"), pl.col("_sat")))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [
                f"{r['top3_dst_conns']} connections to {r['_targets']} server(s) within {r['window_ms'] // 1000} s "
                f"(threshold {r['_t']:.0f}); top target {r['top_dst']} took {r['top_dst_conns']} ({r['top_dst_share']:.0%})",
                f"{r['low_byte_conns']} of {r['connections']} connections were handshake-only; "
                f"{r['bytes_per_conn']:.0f} bytes and {r['packets_per_conn']:.1f} packets per connection; "
                f"{r['_open']} left the network (ports: 25 {r['port25']}, 465 {r['port465']}, 587 {r['port587']})",
                _source_note(r),
                _exempt_note(r),
            ]

        return self._findings(self.name, rows, reasons, lambda r: NEXT_STEPS["flood"])


class BlockedAttempts(Detector):
    """Port-25 connections the network rejected, from an instance without an exemption.

    To one to three servers it is a misconfigured application (``low``, an advisory for the
    customer); to many distinct servers, in a minute or spread over ten, it is a spam tool
    behind the block (``medium`` or higher). Needs no history beyond the servers it tried.
    """

    name = "blocked_attempts"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_rejected: int = 5
        """rejected port-25 connections per window that start a finding"""
        max_app_servers: int = 3
        """an application retries this many servers at most: up to here the finding is an advisory (low)"""
        min_servers: int = 4
        """distinct servers of rejected port-25 connections in one window that make it spam attempts (medium+)"""
        min_new_servers_10m: int = 10
        """servers never tried before, over the last 10 minutes, that make slow attempts spam too (medium+)"""
        saturation_servers: int = 40
        """distinct servers at which the score reaches its maximum"""
        max_score: float = 0.85
        """blocked traffic did no harm yet: the score stays below critical"""
        app_score: float = 0.4
        """the score of a misconfigured application's finding (0.4 = low)"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        many = (pl.col("rejected_dst25") >= p.min_servers) & (pl.col("rejected_port25") >= p.min_rejected)
        slow = pl.col("rejected_new_dst25_10m") >= p.min_new_servers_10m
        app = (pl.col("rejected_port25") >= p.min_rejected) & (pl.col("rejected_dst25") <= p.max_app_servers)
        servers = pl.max_horizontal(pl.col("rejected_dst25").cast(pl.Float64),
                                    pl.col("rejected_new_dst25_10m").cast(pl.Float64) * p.min_servers / p.min_new_servers_10m)
        rows = feats.filter(~pl.col("exempted") & (pl.col("rejected_port25") > 0) & (many | slow | app)).with_columns(
            _spam=many | slow,
        ).with_columns(
            score=pl.when(pl.col("_spam")).then(ramp(servers, p.min_servers, p.saturation_servers, 0.5, p.max_score))
            .otherwise(pl.lit(p.app_score)))

        def reasons(r: dict[str, Any]) -> list[str]:
            if r["_spam"]:
                head = (f"{r['rejected_port25']} port-25 connections rejected within {r['window_ms'] // 1000} s to "
                        f"{r['rejected_dst25']} distinct servers (threshold {p.min_servers}); "
                        f"{r['rejected_new_dst25_10m']} servers never tried before in 10 minutes "
                        f"(threshold {p.min_new_servers_10m}): spam attempts")
            else:
                head = (f"{r['rejected_port25']} port-25 connections rejected within {r['window_ms'] // 1000} s to "
                        f"{r['rejected_dst25']} server(s) (at most {p.max_app_servers}): a misconfigured application")
            return [head, f"{r['rejected_port25_60m']} rejected in the last hour", _source_note(r), _exempt_note(r)]

        return self._findings(self.name, rows, reasons,
                              lambda r: NEXT_STEPS["blocked_spam"] if r["_spam"] else NEXT_STEPS["blocked_app"])


class VolumeSpike(Detector):
    """Far more SMTP than the source's own past, or than it declared.

    - a source without an established exemption, once learned: connections far above its own
      usual rate (per minute);
    - an established exempted sender, once learned: minute after minute of never-seen servers
      (``sustain_minutes`` of the last 10 elevated): a hijacked mail server's spam run. A
      newsletter's burst of a few minutes is not enough;
    - a declared sender: connections above the declared volume, from the first minute.
    """

    name = "volume_spike"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_connections: int = 40
        """connections per window below which no per-minute spike is reported, whatever the ratio"""
        min_ratio: float = 5.0
        """connections / usual connections per active minute that start a finding"""
        saturation_ratio: float = 20.0
        """ratio at which the score reaches 1.0"""
        min_distinct_dst: int = 10
        """a spike to one or a few servers is a retrying application or a flood (connection_flood), not mail"""
        max_top_dst_share: float = 0.5
        """likewise when most of the spike goes to one server, however many others share the rest"""
        sustain_minutes: int = 8
        """established senders: minutes of the last 10 with elevated novelty"""
        min_excess_10m: float = 100.0
        """established senders: never-seen servers above their usual over the last 10 minutes"""
        min_new_per_conn_10m: float = 0.25
        """established senders: never-seen servers per connection over the last 10 minutes (a list server's
        bursts go back to its members; a spam run does not)"""
        saturation_excess_10m: float = 1500.0
        """excess at which the score reaches 1.0"""
        declared_tolerance: float = 1.25
        """a declared sender is raised above this many times its declared connections a minute"""
        established_exemption_days: float = 7.0
        """see spam_fanout"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        est = _established(p)
        dec = _declared()
        ratio = pl.col("connections") / pl.col("base_conns").clip(1.0)
        per_minute = (~est & ~dec & ~pl.col("learning") & (pl.col("connections") >= p.min_connections)
                      & (ratio >= p.min_ratio) & (pl.col("distinct_dst") >= p.min_distinct_dst)
                      & (pl.col("top_dst_share") <= p.max_top_dst_share))
        sustained = (est & ~pl.col("learning") & (pl.col("elevated_minutes_10m") >= p.sustain_minutes)
                     & (pl.col("new_excess_10m") >= p.min_excess_10m)
                     & (pl.col("new_dst_10m") >= p.min_new_per_conn_10m * pl.col("conns_10m")))
        over = dec & (pl.col("connections") >= pl.col("declared_conns_per_min") * p.declared_tolerance) \
            & (pl.col("connections") >= p.min_connections)
        rows = feats.with_columns(
            _ratio=ratio,
            _mode=pl.when(over).then(pl.lit("declared")).when(sustained).then(pl.lit("sustained"))
            .when(per_minute).then(pl.lit("ratio")).otherwise(pl.lit(None, pl.String)),
        ).filter(pl.col("_mode").is_not_null())
        dec_ratio = pl.col("connections") / pl.col("declared_conns_per_min").fill_null(1.0)
        rows = rows.with_columns(score=pl.when(pl.col("_mode") == "declared")
                                 .then(ramp(dec_ratio, p.declared_tolerance, p.declared_tolerance * 4))
                                 .when(pl.col("_mode") == "sustained")
                                 .then(ramp(pl.col("new_excess_10m"), p.min_excess_10m, p.saturation_excess_10m))
                                 .otherwise(ramp(pl.col("_ratio"), p.min_ratio, p.saturation_ratio)))

        def reasons(r: dict[str, Any]) -> list[str]:
            if r["_mode"] == "declared":
                head = (f"{r['connections']} SMTP connections within {r['window_ms'] // 1000} s, over "
                        f"{p.declared_tolerance:g} times the declared {r['declared_conns_per_min']:g} a minute")
            elif r["_mode"] == "sustained":
                head = (f"never-seen servers well above its usual in {r['elevated_minutes_10m']} of the last 10 minutes "
                        f"(threshold {p.sustain_minutes}): {r['new_dst_10m']} new of {r['conns_10m']} connections, "
                        f"{r['new_excess_10m']:.0f} above its usual {r['base_new']:.1f} a minute "
                        f"(threshold {p.min_excess_10m:g})")
            else:
                head = (f"{r['connections']} SMTP connections within {r['window_ms'] // 1000} s, {r['_ratio']:.1f} times "
                        f"the usual {r['base_conns']:.1f} per active minute (threshold {p.min_ratio:g}x)")
            return [head, f"{r['distinct_dst']} distinct servers ({r['new_dst']} new) in the last minute",
                    _source_note(r), _exempt_note(r)]

        return self._findings(self.name, rows, reasons,
                              lambda r: NEXT_STEPS["over_declared"] if r["_mode"] == "declared" else NEXT_STEPS["spam"])


class LowAndSlow(Detector):
    """Spam kept under the per-minute thresholds: a steady stream of never-seen mail servers.

    - a source without an established exemption or a declared volume: many never-seen servers
      over the hour, active most of it, mostly one connection per new server;
    - an established exempted sender, once learned: never-seen servers above its own usual in
      many minutes of the hour and still now; newsletters burst for a few minutes, which is
      not enough.
    """

    name = "low_and_slow"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_new_dst_60m: int = 60
        """destinations never contacted before, over the last 60 minutes, that start a finding"""
        min_active_minutes_60m: int = 20
        """minutes with SMTP activity in the last 60 (persistence)"""
        min_new_dst_10m: int = 10
        """... and never-seen destinations in the last 10 minutes: it is still going on (an hour's sum alone
        would keep alerting for an hour after a burst ended)"""
        min_new_share_60m: float = 0.75
        """new destinations per connection over the hour: a new mail server's ordinary mail returns to
        the big providers, a spam run keeps meeting strangers"""
        saturation_new_dst_60m: int = 600
        """new destinations at which the score reaches 1.0"""
        min_elevated_minutes_60m: int = 15
        """established senders: minutes of the hour with elevated novelty"""
        min_elevated_minutes_10m: int = 5
        """established senders: ... and of the last 10 (it is still going on)"""
        min_excess_60m: float = 150.0
        """established senders: never-seen servers above their usual over the hour"""
        min_new_per_conn_60m: float = 0.1
        """established senders: never-seen servers per connection over the hour"""
        saturation_excess_60m: float = 1500.0
        """excess at which the score reaches 1.0"""
        established_exemption_days: float = 7.0
        """see spam_fanout"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        est = _established(p)
        dec = _declared()
        open_ = (~est & ~dec & (pl.col("new_dst_60m") >= p.min_new_dst_60m)
                 & (pl.col("active_minutes_60m") >= p.min_active_minutes_60m)
                 & (pl.col("new_dst_10m") >= p.min_new_dst_10m)
                 & (pl.col("new_dst_60m") >= p.min_new_share_60m * pl.col("conns_60m")))
        learned = ((est | dec) & ~pl.col("learning") & (pl.col("elevated_minutes_60m") >= p.min_elevated_minutes_60m)
                   & (pl.col("elevated_minutes_10m") >= p.min_elevated_minutes_10m)
                   & (pl.col("new_excess_60m") >= p.min_excess_60m)
                   & (pl.col("new_dst_60m") >= p.min_new_per_conn_60m * pl.col("conns_60m")))
        rows = feats.with_columns(
            _mode=pl.when(learned).then(pl.lit("learned")).when(open_).then(pl.lit("open")).otherwise(pl.lit(None, pl.String)),
        ).filter(pl.col("_mode").is_not_null()).with_columns(
            score=pl.when(pl.col("_mode") == "learned")
            .then(ramp(pl.col("new_excess_60m"), p.min_excess_60m, p.saturation_excess_60m))
            .otherwise(ramp(pl.col("new_dst_60m"), p.min_new_dst_60m, p.saturation_new_dst_60m)))

        def reasons(r: dict[str, Any]) -> list[str]:
            if r["_mode"] == "learned":
                head = (f"never-seen servers well above its usual in {r['elevated_minutes_60m']} minutes of the last 60 "
                        f"(threshold {p.min_elevated_minutes_60m}) and {r['elevated_minutes_10m']} of the last 10: "
                        f"{r['new_excess_60m']:.0f} above its usual {r['base_new']:.1f} a minute "
                        f"(threshold {p.min_excess_60m:g})")
            else:
                head = (f"{r['new_dst_60m']} mail servers never contacted before within 60 minutes "
                        f"(threshold {p.min_new_dst_60m}), active in {r['active_minutes_60m']} of those minutes")
            return [head, f"{r['conns_60m']} connections in the hour, {r['distinct_dst']} distinct servers in the last "
                          f"minute", _source_note(r), _exempt_note(r)]

        return self._findings(self.name, rows, reasons, lambda r: NEXT_STEPS["spam"])


class RejectStorm(Detector):
    """Mail servers answering a source mostly with 5xx: they refuse its mail (seen in captures)."""

    name = "reject_storm"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_replies_5xx: int = 20
        """5xx replies per window that start a finding"""
        min_share: float = 0.5
        """5xx replies per SMTP session"""
        saturation_replies_5xx: int = 200
        """5xx replies at which the score reaches 1.0"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        rows = feats.filter(
            (pl.col("replies_5xx") >= p.min_replies_5xx)
            & (pl.col("replies_5xx") >= p.min_share * pl.col("smtp_sessions").clip(1))
        ).with_columns(score=ramp(pl.col("replies_5xx"), p.min_replies_5xx, p.saturation_replies_5xx))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [
                f"{r['replies_5xx']} 5xx replies in {r['smtp_sessions']} SMTP sessions within {r['window_ms'] // 1000} s "
                f"(threshold {p.min_replies_5xx})",
                f"{r['rcpt_total']} recipients attempted at {r['distinct_dst']} servers",
                _exempt_note(r),
            ]

        return self._findings(self.name, rows, reasons, lambda r: NEXT_STEPS["reject_storm"])


class TenantSpam(Detector):
    """Several instances of one tenant, each moderate, together a spam fan-out."""

    name = "tenant_spam"
    scope = "tenant"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_instances: int = 3
        """instances with port-25 traffic in the window"""
        min_distinct_dst: int = 40
        """distinct port-25 destinations of the tenant per window (HyperLogLog estimate)"""
        max_instance_share: float = 0.7
        """no single instance may carry more than this share (else it is a single-source case)"""
        saturation_distinct_dst: int = 300
        """fan-out at which the score reaches 1.0"""
        established_exemption_days: float = 7.0
        """traffic of mail servers exempted this long is left out of the tenant's total"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        rows = feats.filter(
            (pl.col("instances") >= p.min_instances) & (pl.col("distinct_dst25") >= p.min_distinct_dst)
            & (pl.col("max_instance_share") <= p.max_instance_share)
        ).with_columns(score=ramp(pl.col("distinct_dst25"), p.min_distinct_dst, p.saturation_distinct_dst))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [
                f"tenant {r['tenant']}: {r['instances']} instances reached about {r['distinct_dst25']} distinct mail servers "
                f"on port 25 within {r['window_ms'] // 1000} s (threshold {p.min_distinct_dst})",
                f"{r['conns25']} connections, the busiest instance carried {r['max_instance_share']:.0%}; "
                f"{r['rejected25']} rejected by the network",
                f"instances: {r['top_instances']}",
            ]

        return self._findings(self.name, rows, reasons, lambda r: NEXT_STEPS["tenant"])


class AnomalyModel(Detector):
    """The trained unsupervised model (models/anomaly.py): windows unlike the training traffic.

    Off until ``model_dir`` names an artifact (``smtpguard model train`` writes one). An
    unsupervised model has no notion of abuse, only of unusual, so its findings stay low
    severity by default: evidence for a reviewer, not a reason to act.
    """

    name = "anomaly_model"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        model_dir: str = ""
        """artifact folder with model.skops and card.json; empty = detector off"""
        min_anomaly: float = 0.7
        """model score (0.5 ordinary, 1 most unusual) that starts a finding"""
        min_connections: int = 10
        """windows with fewer connections are too small to judge"""
        max_score: float = 0.45
        """the highest alert score this detector gives (0.45 = low severity)"""

    def __init__(self, params: msgspec.Struct):
        super().__init__(params)
        self.model = None
        if params.model_dir:
            from smtpguard.models.anomaly import load

            self.model = load(params.model_dir)

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        if self.model is None or feats.height == 0:
            return []
        p = self.params
        cand = feats.filter(pl.col("connections") >= p.min_connections)
        if cand.height == 0:
            return []
        from smtpguard.models.anomaly import matrix

        anomaly = self.model.score(cand)
        cand = cand.with_columns(_anomaly=pl.Series(anomaly), _row=pl.int_range(pl.len()))
        x = matrix(cand)
        rows = cand.filter(pl.col("_anomaly") >= p.min_anomaly).with_columns(
            score=ramp(pl.col("_anomaly"), p.min_anomaly, 1.0, 0.3, p.max_score))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [f"anomaly model score {r['_anomaly']:.2f} (threshold {p.min_anomaly}; trained "
                    f"{self.model.card.trained_at} on {self.model.card.rows} windows)",
                    "most unusual: " + "; ".join(self.model.explain(x[r["_row"]]))]

        return self._findings(self.name, rows, reasons, lambda r: NEXT_STEPS["anomaly"])


REGISTRY: dict[str, type[Detector]] = {d.name: d for d in (SpamFanout, ConnectionFlood, BlockedAttempts, VolumeSpike,
                                                            LowAndSlow, RejectStorm, TenantSpam, AnomalyModel)}


def build_detectors(overrides: dict[str, dict[str, Any]] | None = None) -> list[Detector]:
    """Instantiate every detector with its parameters; unknown names or parameters raise ConfigError."""
    overrides = overrides or {}
    for name in overrides:
        if name not in REGISTRY:
            raise ConfigError(f"invalid config: unknown detector {name!r} in detect.detectors "
                              f"(known: {', '.join(REGISTRY)})")
    out = []
    for name, cls in REGISTRY.items():
        try:
            params = msgspec.convert(overrides.get(name, {}), cls.Params, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"invalid config: detect.detectors.{name}: {str(e).replace('$.', '')}") from None
        out.append(cls(params))
    return out


def describe() -> list[dict[str, Any]]:
    """Every detector with its parameters, defaults and meanings (for docs and --help)."""
    import inspect

    out = []
    for name, cls in REGISTRY.items():
        src = inspect.getsource(cls.Params)
        docs: dict[str, str] = {}
        lines = src.splitlines()
        for i, line in enumerate(lines[:-1]):
            s = line.strip()
            if ":" in s and "=" in s and not s.startswith(("class", '"')):
                nxt = lines[i + 1].strip()
                if nxt.startswith('"""'):
                    docs[s.split(":")[0]] = nxt.strip('"')
        defaults = msgspec.to_builtins(cls.Params())
        out.append({"name": name, "doc": (cls.__doc__ or "").strip(),
                    "params": [{"name": k, "default": v, "doc": docs.get(k, "")} for k, v in defaults.items()]})
    return out
