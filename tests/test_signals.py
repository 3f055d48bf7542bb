"""Stopping `smtpguard serve` as operators do: SIGTERM (a service manager, `kill`, a container stop),
SIGINT (Ctrl-C), a second signal during shutdown, and SIGKILL. Nothing it started may outlive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from smtpguard.lab import scenario

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))


@pytest.fixture(scope="module")
def flows(tmp_path_factory) -> Path:
    paths = scenario.write(scenario.generate(17, instances=60, duration_s=20 * 60), tmp_path_factory.mktemp("sig"))
    return paths["flows"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc: the children of each of its threads)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _start_serve(flows: Path, data: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([SMTPGUARD, "--data-dir", str(data), "serve", str(flows), "--metrics", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}/metrics"


def _wait_caught_up(proc: subprocess.Popen, url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            time.sleep(0.5)
            continue
        records = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("smtpguard_detector_records_total"))
        if records > 0 and 'structure="open_rows"} 0.0' in text:
            return
        time.sleep(0.5)
    raise AssertionError("serve did not catch up")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_sigterm_and_sigint(flows, tmp_path, sig):
    data = tmp_path / "data"
    proc, url = _start_serve(flows, data)
    try:
        first = next(line for line in proc.stderr if line.startswith("broker "))  # printed at start
        broker_port = int(first.split()[1].rstrip(",").rsplit(":", 1)[1])
        _wait_caught_up(proc, url)
        children = _descendants(proc.pid)
        assert children, "serve runs its local broker as a child"
        assert _listening(broker_port)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"{signal.Signals(sig).name}: stopping" in err
    assert "detector: consumed" in err and "windows" in err  # the summary
    assert not [p for p in children if _alive(p)], "a process serve started outlived it"
    assert not _listening(broker_port), "the broker's port is free"
    # the store opens from another process at once: the lock went with serve
    t0 = time.monotonic()
    listed = subprocess.run([SMTPGUARD, "--data-dir", str(data), "alerts", "list", "--severity", "medium"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert time.monotonic() - t0 < 30 and "alerts" in listed.stderr


def test_a_second_signal_during_shutdown_exits_at_once_with_status_1(flows, tmp_path):
    data = tmp_path / "data"
    proc, url = _start_serve(flows, data)
    try:
        _wait_caught_up(proc, url)
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if "again: stopping at once" in err:
        assert proc.returncode == 1
    else:  # the clean shutdown had finished before the second signal landed
        assert proc.returncode == 0
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)]


def test_sigkill_leaves_no_broker_behind(flows, tmp_path):
    data = tmp_path / "data"
    proc, url = _start_serve(flows, data)
    try:
        _wait_caught_up(proc, url)
        children = _descendants(proc.pid)
        assert children
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)], "the kernel stops the broker with serve (parent-death signal)"


def test_rbldnsd_under_its_guard_dies_with_its_parent(tmp_path):
    """rbldnsd drops root, which makes the kernel forget the parent-death signal: its guard keeps it."""
    code = ("import sys, time; from pathlib import Path; from smtpguard.lab.rbldnsd import Dataset, Rbldnsd; "
            "s = Rbldnsd(Path(sys.argv[1]), [Dataset('bl.test', 'ip4set', ['192.0.2.1'])]).start(); "
            "print(s.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "z")], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        below = _descendants(parent.pid)
        assert pid in below and _alive(pid)
        parent.kill()
        parent.wait(10)
    finally:
        if parent.poll() is None:
            parent.kill()
    deadline = time.monotonic() + 8
    while any(_alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in below if _alive(p)]
