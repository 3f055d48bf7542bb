"""The config as a run loads it: the core config (:mod:`smtpguard.core.config`), then the checks that
need the layers above the core: detector names and parameters (declared in ``detectors/rules.py``),
the detectors named in ``[response.detectors]``, and the DNSBL zones named in ``[dnsbl]``.

Everything that starts a run (the command line, the demo) loads the config here, so a wrong
option anywhere stops it at start-up with one line (:class:`ConfigError`, exit status 2).
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from smtpguard.core import config as core
from smtpguard.core.config import Config
from smtpguard.core.errors import ConfigError


def check(cfg: Config) -> Config:
    """Raise :class:`ConfigError` for a detector, detector parameter or DNSBL zone the config names wrongly."""
    from smtpguard.detectors.rules import REGISTRY, build_detectors
    from smtpguard.response import dnsbl

    build_detectors(cfg.detect.detectors)
    for name in cfg.response.detectors:
        if name not in REGISTRY:
            raise ConfigError(f"invalid config: response.detectors: unknown detector {name!r} "
                              f"(known: {', '.join(REGISTRY)})")
    dnsbl.validate(cfg.dnsbl)
    return cfg


def load(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None,
         overrides: dict[str, Any] | None = None) -> Config:
    """:func:`smtpguard.core.config.load`, then :func:`check`."""
    return check(core.load(path, environ, overrides))


def shown(cfg: Config) -> dict[str, Any]:
    """The effective config with secrets masked and every detector's effective parameters."""
    from smtpguard.detectors.rules import build_detectors

    data = core.shown(cfg)
    data["detect"]["detectors"] = {d.name: msgspec.to_builtins(d.params) for d in build_detectors(cfg.detect.detectors)}
    return data
