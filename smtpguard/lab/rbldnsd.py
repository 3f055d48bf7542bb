"""A real rbldnsd (Debian package ``rbldnsd``) serving blocklist zones on a free loopback UDP port.

The tests serve their DNSBL zones with it, and ``smtpguard demo`` serves a demo blocklist, so
that DNSBL answers in the demo come from a real DNS server without leaving the machine.

Example::

    with Rbldnsd(tmp_dir, [Dataset("zen.dnsbl.test", "ip4set", [":127.0.0.2:Listed $", "192.0.2.1"])]) as srv:
        srv.resolver        # "127.0.0.1:PORT", for dnsbl.resolvers or --resolver
        srv.queries()       # what it answered so far, from its query log

Zone-file syntax: ``man rbldnsd`` (``:A:TXT`` default value line, then one entry per line).
The server is stopped by PID.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RBLDNSD = "/usr/sbin/rbldnsd"
HOST = "127.0.0.1"


@dataclass
class Dataset:
    """One rbldnsd dataset: a zone file served under a DNS zone name."""

    zone: str
    """DNS zone it answers for, e.g. zen.dnsbl.test"""
    kind: str
    """rbldnsd dataset type: ip4set, ip4trie, ip6trie, dnset, ..."""
    lines: list[str]
    """zone-file lines (entries, :A:TXT default lines, comments)"""
    ttl_s: int = 60
    soa: bool = True
    """whether NXDOMAIN answers carry a SOA (without one they are not cacheable by TTL)"""
    soa_ttl_s: int = 60
    negative_ttl_s: int = 45
    """the SOA MINIMUM field: how long resolvers may cache NXDOMAIN"""


@dataclass
class Query:
    """One line of rbldnsd's query log."""

    name: str
    qtype: str
    rcode: str


@dataclass
class Rbldnsd:
    directory: Path
    datasets: list[Dataset]
    port: int = 0
    pid: int = 0
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def resolver(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "queries.log"

    @property
    def stderr_path(self) -> Path:
        return self.directory / "rbldnsd.stderr"

    def _write_zones(self) -> list[str]:
        specs = []
        for i, ds in enumerate(self.datasets):
            name = f"d{i}-{ds.kind}.zone"
            head = [f"$TTL {ds.ttl_s}"]
            if ds.soa:
                head.insert(0, f"$SOA {ds.soa_ttl_s} ns.{ds.zone}. hostmaster.{ds.zone}. 1 600 300 86400 "
                               f"{ds.negative_ttl_s}")
            path = self.directory / name
            path.write_text("\n".join(head + ds.lines) + "\n")
            path.chmod(0o644)
            specs.append(f"{ds.zone}:{ds.kind}:{name}")
        return specs

    def start(self, timeout_s: float = 10.0) -> Rbldnsd:
        if not available():
            raise RuntimeError(f"{RBLDNSD} is missing: apt-get install -y rbldnsd (the Makefile's set-up installs it)")
        # rbldnsd drops root privileges and then reads the zone files: the directory must be
        # readable by its user. As root it is chrooted into the directory, so the (private)
        # parent directories of a pytest tmp_path do not matter.
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        specs = self._write_zones()
        last_error = ""
        for _attempt in range(5):
            self.port = _free_udp_port()
            args = [RBLDNSD, "-n", "-b", f"{HOST}/{self.port}", "-c", "0", "-l", "+-"]
            if os.geteuid() == 0:
                args += ["-u", _unprivileged_user(), "-r", str(self.directory), "-w", "/"]
            else:
                args += ["-w", str(self.directory)]
            with open(self.log_path, "wb") as out, open(self.stderr_path, "wb") as err:
                from smtpguard.core import lifecycle

                # rbldnsd drops root, which makes the kernel forget the parent-death signal: a guard keeps it
                self._proc = lifecycle.popen([*args, *specs], guard=os.geteuid() == 0, stdout=out, stderr=err,
                                             stdin=subprocess.DEVNULL)
            self.pid = self._proc.pid
            deadline = time.monotonic() + timeout_s
            # Startup progress ends with "rbldnsd: ... started"; it shares stdout with the query log.
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if b" started (" in self.log_path.read_bytes():
                    return self
                time.sleep(0.02)
            last_error = (self.log_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")).strip()
            self.stop()
            if "Address already in use" not in last_error:
                break
        raise RuntimeError(f"rbldnsd did not start: {last_error or 'no output'}")

    def stop(self) -> None:
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        assert self._proc is not None
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self._proc.wait(timeout=5)
        from smtpguard.core import lifecycle

        lifecycle.forget(self._proc)
        self.pid = 0

    def queries(self) -> list[Query]:
        """Every query answered so far (``-l +-`` makes the log line-buffered)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            # "1795842194 127.0.0.1 1.2.0.192.zen.dnsbl.test A IN: NOERROR/1/52"
            parts = line.split()
            if len(parts) >= 6 and parts[4] == "IN:":
                out.append(Query(parts[2].lower(), parts[3], parts[5].split("/")[0]))
        return out

    def __enter__(self) -> Rbldnsd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def available() -> bool:
    """Whether rbldnsd is installed here."""
    return os.access(RBLDNSD, os.X_OK)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _unprivileged_user() -> str:
    # rbldnsd refuses to keep running as root; the Debian package creates the user rbldns.
    for name in ("rbldns", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("neither user rbldns nor nobody exists for rbldnsd to run as")
