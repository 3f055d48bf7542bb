"""Shared benchmark helpers: machine description, peak memory, data files cached under .bench/."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench"


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu or 'unknown CPU'}, Python {platform.python_version()}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def flow_file(lines: int, seed: int = 1) -> Path:
    """A generated AWS VPC flow-log file of ``lines`` lines, made once and reused."""
    from smtpguard.lab import scenario

    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"vpc-{lines}-{seed}.log"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        scenario.write_lines(tmp, seed, lines)
        tmp.rename(path)
    return path
