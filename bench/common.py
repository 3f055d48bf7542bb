"""Shared benchmark helpers: machine description, peak memory, data files cached under .bench/."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
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


#: the last landed release before the columnar work (the benchmarks' "previous release")
PREVIOUS = "ea0b9d1"


def previous_tree(rev: str, into: Path) -> Path:
    """The code of revision ``rev`` as one importable package tree (its top folders become
    sub-packages), checked out with ``git worktree`` under ``into``; put it first on PYTHONPATH."""
    wt = into / "wt"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(wt), rev], check=True,
                   capture_output=True)
    pkg = into / "tree" / "smtpguard"
    shutil.copytree(wt / "smtpguard", pkg)
    for name in ("ingest", "detectors", "models", "response", "console"):
        if (wt / name).is_dir() and not (pkg / name).exists():
            shutil.copytree(wt / name, pkg / name)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], check=True, capture_output=True)
    return into / "tree"


def run_pinned(code: str, args: list[str], pythonpath: str | None = None) -> dict:
    """Run ``code`` (a Python program that prints one JSON object as its last line) in its own
    process on CPU 0 with one polars thread; return that object."""
    env = {**os.environ, "POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-c", code, *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])
