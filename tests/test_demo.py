"""``smtpguard demo`` end to end, as a newcomer runs it: every injected abuser flagged, a flagged
exempted sender revoked with its evidence, the enforcement state and the nftables set without it,
and the DNSBL answers of its alerts (from the demo's own rbldnsd) stored with them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


from smtpguard.lab.rbldnsd import available

SMTPGUARD = str(Path(sys.executable).with_name("smtpguard"))


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    return subprocess.run([SMTPGUARD, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_demo_closes_the_loop(tmp_path):
    assert available(), "rbldnsd is missing: make test installs it (Debian's rbldnsd)"
    r = run("--data-dir", str(tmp_path), "demo", "--instances", "150", "--minutes", "40")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    demo = tmp_path / "demo"
    truth = {t["ip"]: t["label"] for t in json.loads((demo / "truth.json").read_text()) if t["label"] != "benign"}
    assert f"injected abusers flagged: {len(truth)} of {len(truth)}" in out
    assert "benign sources with medium or higher alerts: 0" in out

    revoked = re.findall(r"exemption of (\S+) revoked by smtpguard-policy", out)
    assert revoked, out
    # the topic's state agrees with the nftables set: the imported grants were published too
    allowed, denied = map(int, re.search(r"(\d+) allowed, (\d+) denied", out).groups())
    in_set = int(re.search(r"\((\d+) IPv4 and", out).group(1))
    assert denied == len(revoked) and allowed == in_set > 0
    store = ["--data-dir", str(demo)]
    for ip in revoked:
        assert ip in truth
        # the registry says revoked, naming the alert behind it
        shown = json.loads(run(*store, "exemptions", "show", ip, "--json").stdout)
        last = shown["history"][-1]
        assert last["kind"] == "revoked" and last["alert_ids"]
        # the enforcement topic's latest event for it is a deny; the nftables set leaves it out
        assert re.search(rf"denied \([^)]*\b{re.escape(ip)}\b", out), out
        nft = (demo / "smtp-allowed.nft").read_text()
        assert re.search(rf"\b{re.escape(ip)}\b", nft.split("table inet smtpguard {", 2)[-1]) is None
        # the alert behind the revocation carries the DNSBL answers about its source
        alert = json.loads(run(*store, "alerts", "show", last["alert_ids"][0], "--json").stdout)
        assert alert["src_ip"] == ip and alert["evidence"]
        statuses = {d["zone"]: d["status"] for d in alert["dnsbl"]}
        # the demo blocklist lists the spammers and nobody else
        assert statuses == {"demo-bl": "listed" if truth[ip].startswith("spam") else "not_listed"}
