"""Repeats of what the team dismissed: a source's new finding of a kind the security team already
dismissed for that source is held at ``low`` when every one of these holds:

- the team dismissed at least one of the source's earlier alerts of this detector (windows before this
  one) and confirmed none of those;
- the rule evidence is no stronger: the finding's score is at most the highest score among those
  dismissed alerts (so its severity is at most theirs);
- the promoted verdicts model (:mod:`smtpguard.models.verdicts`) learned this kind of alert
  (:func:`~smtpguard.models.verdicts.knows_kind`) and gives this window a probability of being
  confirmed at or below ``detect.hold_repeats_below``.

Anything else is untouched: a fresh source, a source the team confirmed earlier for this detector, a
stronger repeat, a kind the model has too few labels for, and every alert when no model is promoted.
A held alert says so in its reasons and in ``evidence.held`` (the rule severity, the verdicts, the
probability, the model); a person restores its rule severity on the alert page
(:func:`smtpguard.console.actions.restore`).

The verdicts are read from the store by whoever has one: the detector consumer whenever they change
(checked with the exemptions), ``analyze(verdicts_from=store)`` once. The pipeline itself stays
pure: it asks :meth:`RepeatHold.hold` to mark findings.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import polars as pl

from smtpguard.core.alert import rank
from smtpguard.core.record import SEVERITIES
from smtpguard.models import verdicts

from .alerts import severity_of
from .rules import Finding

log = logging.getLogger(__name__)

MEDIUM = SEVERITIES.index("medium")
HELD_SEVERITY = "low"


class RepeatHold:
    """Holds repeats of dismissed patterns at low (module docstring). ``models_dir`` is the folder with
    the promoted verdicts model (:class:`smtpguard.models.verdicts.Current`)."""

    def __init__(self, models_dir: Any, below: float):
        self.current = verdicts.Current(models_dir)
        self.below = below
        self.history: verdicts.History = {}
        self.held = 0
        """findings held at low since this process started"""
        self.failures = 0
        """times holding failed (and held nothing) since this process started"""

    def refresh(self, store: Any) -> None:
        self.history = verdicts.load_history(store)

    def hold(self, findings: Sequence[Finding], feats: pl.DataFrame) -> int:
        """Mark the findings that repeat a dismissed pattern (``severity`` low, reasons, ``evidence.held``);
        ``feats`` are the windows' features as stored (the model's input). Returns how many. Never
        raises: a failure (the model, its input) is logged and counted, and the findings stay as the rules
        made them."""
        if not self.history or self.below <= 0:
            return 0
        try:
            return self._hold(findings, feats)
        except Exception as e:  # noqa: BLE001 - holding is a courtesy; detection must go on
            # (every probability is computed before any finding is marked: a failure leaves them all as they were)
            self.failures += 1
            if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                log.warning("repeat hold failed (%d times so far); alerts keep the rules' severity: %s",
                            self.failures, e)
            return 0

    def _hold(self, findings: Sequence[Finding], feats: pl.DataFrame) -> int:
        cands = []
        for f in findings:
            v = self.history.get((f.src_ip, f.detector)) if f.src_ip is not None else None
            if v is None or f.severity is not None or rank(severity_of(f.score)) < MEDIUM:
                continue
            dismissed, confirmed, top = v.before(f.window_start_ms)
            # scores are stored rounded as the alert carries them: compare like with like
            if dismissed and not confirmed and round(f.score, 3) <= top:
                cands.append((f, dismissed, top))
        if not cands:
            return 0
        model = self.current.get()
        if model is None:
            return 0
        cands = [c for c in cands if verdicts.knows_kind(model.card, c[0].detector)]
        if not cands:
            return 0
        keys = pl.DataFrame({"src_ip": [f.src_ip for f, _, _ in cands], "_ms": [f.window_start_ms for f, _, _ in cands]})
        rows = keys.join(feats.with_columns(pl.Series("_ms", verdicts.window_ms(feats), pl.Int64)),
                         on=["src_ip", "_ms"], how="inner", maintain_order="left")
        if rows.height != len(cands):  # every finding comes from a window of these features
            log.warning("repeat hold: %d of %d findings have no window features; none is held",
                        len(cands) - rows.height, len(cands))
            return 0
        p = model.probability(verdicts.with_earlier(rows, self.history, [f.detector for f, _, _ in cands]))
        n = 0
        for (f, dismissed, top), prob in zip(cands, p.tolist()):
            if prob > self.below:
                continue
            rule = severity_of(f.score)
            f.severity = HELD_SEVERITY
            f.evidence["held"] = {"rule_severity": rule, "dismissed": dismissed, "dismissed_top_score": round(top, 3),
                                  "confirm_probability": round(prob, 4), "model": self.current.name}
            f.reasons.append(
                f"held at {HELD_SEVERITY} (the rules say {rule}): the team dismissed this source's earlier "
                f"{f.detector} alerts {dismissed} time{'s' if dismissed != 1 else ''} and confirmed none; this one "
                f"is no stronger (score {f.score:.2f}, dismissed up to {top:.2f}) and the verdicts model gives it "
                f"a {prob:.0%} chance of being confirmed. Restore its severity on the alert page if it should stand.")
            n += 1
        self.held += n
        return n
