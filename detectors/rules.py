"""The detectors: small named units, each turning window features into findings with reasons.

Policy only: thresholds and scores. Every parameter is declared in the detector's
``Params`` with its default and meaning; ``[detect.detectors.NAME]`` in the config
overrides them and is checked against these declarations at start-up.

Each detector sees one row per (source IP, window) with the columns of
:data:`features.FEATURES` plus ``exempted`` (the IP holds a port-25 exemption) and
``exemption_age_days`` (how long it has held it; null when not exempted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
import polars as pl

from smtpguard.errors import ConfigError


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


def ramp(x: pl.Expr, lo: float | pl.Expr, hi: float | pl.Expr, s_lo: float = 0.5, s_hi: float = 1.0) -> pl.Expr:
    """Score rising linearly from ``s_lo`` at ``lo`` to ``s_hi`` at ``hi`` (and capped there)."""
    frac = ((x - lo) / (pl.lit(hi) - lo)).clip(0.0, 1.0) if not isinstance(hi, pl.Expr) else ((x - lo) / (hi - lo)).clip(0.0, 1.0)
    return (s_lo + (s_hi - s_lo) * frac).round(3)


def _established(p: Any) -> pl.Expr:
    """Exempted long enough to have earned the higher exempted-sender thresholds."""
    return pl.col("exempted") & (pl.col("exemption_age_days").fill_null(0) >= p.established_exemption_days)


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
    def _findings(name: str, rows: pl.DataFrame, reasons_of) -> list[Finding]:
        out = []
        for r in rows.iter_rows(named=True):
            evidence = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                        if k not in ("score",) and not k.startswith("_")}
            out.append(Finding(
                detector=name, src_ip=r.get("src_ip"), tenant=r["tenant"],
                window_start_ms=int(r["window_start"].timestamp() * 1000),
                window_end_ms=int(r["window_end"].timestamp() * 1000),
                score=float(r["score"]), reasons=reasons_of(r), evidence=evidence, exempted=bool(r.get("exempted")),
            ))
        return out


def _exempt_note(r: dict[str, Any]) -> str:
    if not r["exempted"]:
        return "no port-25 exemption"
    return f"exempted for {r['exemption_age_days']:.1f} days"


class SpamFanout(Detector):
    """Many distinct mail servers in one window: the shape of bulk spam delivery."""

    name = "spam_fanout"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_distinct_dst: int = 20
        """distinct destination servers per window that start a finding"""
        min_distinct_dst24: int = 8
        """distinct destination /24 networks also required (spreads across providers)"""
        saturation_distinct_dst: int = 150
        """fan-out at which the score reaches 1.0"""
        exempt_factor: float = 4.0
        """established exempted senders need this many times the fan-out (a real mail server talks to many MX)"""
        established_exemption_days: float = 7.0
        """an exemption younger than this earns no relief: the same volume from a new instance is suspect"""
        peak_factor: float = 1.5
        """established exempted senders also need this many times their own peak fan-out"""
        min_new_share: float = 0.5
        """established exempted senders also need this share of destinations they never used before"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        est = _established(p)
        factor = pl.when(est).then(pl.lit(p.exempt_factor)).otherwise(pl.lit(1.0))
        base_t = pl.lit(p.min_distinct_dst) * factor
        rows = feats.with_columns(
            _t=pl.when(est).then(pl.max_horizontal(base_t, pl.col("peak_distinct") * p.peak_factor)).otherwise(base_t),
            _t24=pl.lit(p.min_distinct_dst24) * factor,
        ).with_columns(
            _sat=pl.col("_t") * (p.saturation_distinct_dst / p.min_distinct_dst),
        ).filter((pl.col("distinct_dst") >= pl.col("_t")) & (pl.col("distinct_dst24") >= pl.col("_t24"))
                 & (~est | (pl.col("new_dst_share") >= p.min_new_share)))
        rows = rows.with_columns(score=ramp(pl.col("distinct_dst"), pl.col("_t"), pl.col("_sat")))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [
                f"{r['distinct_dst']} distinct mail servers in {r['distinct_dst24']} networks within "
                f"{r['window_ms'] // 1000} s (threshold {r['_t']:.0f})",
                f"{r['new_dst']} of them never contacted before ({r['new_dst_share']:.0%}); usual fan-out "
                f"{r['base_distinct']:.1f} per active minute over {r['history_minutes']} minutes of history",
                f"{r['connections']} SMTP connections, {r['rejected']} rejected by the network, "
                f"{r['bytes_per_conn']:.0f} bytes per connection",
                _exempt_note(r),
            ]

        return self._findings(self.name, rows, reasons)


class ConnectionFlood(Detector):
    """Many short connections concentrated on one to three servers: a DoS against mail servers."""

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
            _targets=pl.min_horizontal(pl.col("distinct_dst"), pl.lit(3)),
        ).filter(
            (pl.col("top3_dst_conns") >= pl.col("_t"))
            & (pl.col("_share") >= p.min_top3_share)
            & (pl.col("bytes_per_conn") <= p.max_bytes_per_conn)
        ).with_columns(score=ramp(pl.col("top3_dst_conns"), pl.col("_t"), pl.col("_sat")))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [
                f"{r['top3_dst_conns']} connections to {r['_targets']} server(s) within {r['window_ms'] // 1000} s "
                f"(threshold {r['_t']:.0f}); top target {r['top_dst']} took {r['top_dst_conns']} ({r['top_dst_share']:.0%})",
                f"{r['low_byte_conns']} of {r['connections']} connections were handshake-only; "
                f"{r['bytes_per_conn']:.0f} bytes and {r['packets_per_conn']:.1f} packets per connection",
                _exempt_note(r),
            ]

        return self._findings(self.name, rows, reasons)


class BlockedAttempts(Detector):
    """Port-25 connections the network rejected, from an instance without an exemption."""

    name = "blocked_attempts"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_rejected: int = 5
        """rejected port-25 connections per window that start a finding (a misconfigured app retries less)"""
        saturation_rejected: int = 60
        """rejected connections at which the score reaches its maximum"""
        max_score: float = 0.85
        """blocked traffic did no harm yet: the score stays below critical"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        rows = feats.filter(~pl.col("exempted") & (pl.col("rejected_port25") >= p.min_rejected)).with_columns(
            score=ramp(pl.col("rejected_port25"), p.min_rejected, p.saturation_rejected, 0.5, p.max_score))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [
                f"{r['rejected_port25']} port-25 connections rejected within {r['window_ms'] // 1000} s "
                f"(threshold {p.min_rejected}) to {r['distinct_dst']} distinct servers",
                _exempt_note(r),
            ]

        return self._findings(self.name, rows, reasons)


class VolumeSpike(Detector):
    """Far more SMTP connections than the source's own usual rate."""

    name = "volume_spike"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_history_minutes: int = 30
        """active minutes of history before a source has a baseline to compare with"""
        min_connections: int = 40
        """connections per window below which no spike is reported, whatever the ratio"""
        min_ratio: float = 5.0
        """connections / usual connections per active minute that start a finding"""
        saturation_ratio: float = 20.0
        """ratio at which the score reaches 1.0"""
        min_distinct_dst: int = 10
        """a spike to one or a few servers is a retrying application or a flood (connection_flood), not mail"""
        max_top_dst_share: float = 0.5
        """likewise when most of the spike goes to one server, however many others share the rest"""
        peak_factor: float = 1.5
        """established exempted senders must also exceed their own peak by this factor (newsletters burst)"""
        min_new_share: float = 0.4
        """established exempted senders must also send this share to servers they never used: a newsletter
        goes back to the same providers, a hijacked server's spam does not"""
        established_exemption_days: float = 7.0
        """see spam_fanout"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        rows = feats.with_columns(_ratio=pl.col("connections") / pl.col("base_conns").clip(1.0)).filter(
            (pl.col("history_minutes") >= p.min_history_minutes) & (pl.col("connections") >= p.min_connections)
            & (pl.col("_ratio") >= p.min_ratio) & (pl.col("distinct_dst") >= p.min_distinct_dst)
            & (pl.col("top_dst_share") <= p.max_top_dst_share)
            & (~_established(p) | ((pl.col("connections") >= p.peak_factor * pl.col("peak_conns"))
                                   & (pl.col("new_dst_share") >= p.min_new_share)))
        ).with_columns(score=ramp(pl.col("_ratio"), p.min_ratio, p.saturation_ratio))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [
                f"{r['connections']} SMTP connections within {r['window_ms'] // 1000} s, {r['_ratio']:.1f} times the "
                f"usual {r['base_conns']:.1f} per active minute (threshold {p.min_ratio:g}x)",
                f"{r['distinct_dst']} distinct servers ({r['new_dst']} new); {r['history_minutes']} minutes of history",
                _exempt_note(r),
            ]

        return self._findings(self.name, rows, reasons)


class LowAndSlow(Detector):
    """Spam kept under the per-minute thresholds: a steady stream of new mail servers for an hour."""

    name = "low_and_slow"

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        min_new_dst_60m: int = 120
        """destinations never contacted before, over the last 60 minutes, that start a finding"""
        min_active_minutes_60m: int = 30
        """minutes with SMTP activity in the last 60 (persistence)"""
        min_new_share_60m: float = 0.75
        """new destinations per connection over the hour: a new mail server's ordinary mail returns to
        the big providers, a spam run keeps meeting strangers"""
        saturation_new_dst_60m: int = 600
        """new destinations at which the score reaches 1.0"""
        established_exemption_days: float = 7.0
        """established exempted mail servers are left to spam_fanout, which compares them with their own peak:
        a real mail server meets new destinations all day"""

    def evaluate(self, feats: pl.DataFrame) -> list[Finding]:
        p = self.params
        rows = feats.with_columns(_t=pl.lit(p.min_new_dst_60m), _sat=pl.lit(p.saturation_new_dst_60m)).filter(
            ~_established(p) & (pl.col("new_dst_60m") >= pl.col("_t"))
            & (pl.col("active_minutes_60m") >= p.min_active_minutes_60m)
            & (pl.col("new_dst_60m") >= p.min_new_share_60m * pl.col("conns_60m"))
        ).with_columns(score=ramp(pl.col("new_dst_60m"), pl.col("_t"), pl.col("_sat")))

        def reasons(r: dict[str, Any]) -> list[str]:
            return [
                f"{r['new_dst_60m']} mail servers never contacted before within 60 minutes (threshold {r['_t']:.0f}), "
                f"active in {r['active_minutes_60m']} of those minutes",
                f"{r['conns_60m']} connections in the hour, {r['distinct_dst']} distinct servers in the last minute",
                _exempt_note(r),
            ]

        return self._findings(self.name, rows, reasons)


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

        return self._findings(self.name, rows, reasons)


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

        return self._findings(self.name, rows, reasons)


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

        return self._findings(self.name, rows, reasons)


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
