"""`smtpguard serve FILE` raises the same medium-or-higher alerts as `smtpguard analyze FILE`.

Both commands run as a user runs them (subprocesses, the real Tansu broker and chdb store that
`serve` starts itself), on a scenario with IPv6 rotation (keyed by prefix across partitions),
a tenant split over instances, first-minute spam and exempted senders. The revocation policy
is set to notify: a revocation changes who is exempted in the middle of a live stream, which
replaying a file offline cannot know.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from smtpguard.lab import scenario

ABUSE = ("spam_burst", "spam_first_minute", "spam_exempted_new", "flood", "blocked_attempts", "tenant_spam",
         "spam_ipv6_rotating", "spam_ipv6_wide")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(url: str, name: str, label: str = "") -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not label or label in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_serve_raises_the_same_medium_alerts_as_analyze(tmp_path):
    scen = scenario.generate(31, instances=300, duration_s=75 * 60, abuse=ABUSE)
    paths = scenario.write(scen, tmp_path / "scen")
    conf = tmp_path / "smtpguard.toml"
    conf.write_text('[response]\nactions = { info = "notify", low = "notify", medium = "notify", high = "notify", '
                    'critical = "notify" }\n[dnsbl]\ncheck_alerts_from = "off"\n')
    exe = [str(Path(sys.executable).with_name("smtpguard"))]
    env = {**os.environ, "SMTPGUARD_CONFIG": str(conf)}
    common = ["--exemptions", str(paths["exemptions"]), "--inventory", str(paths["inventory"])]

    offline = subprocess.run([*exe, "--data-dir", str(tmp_path / "a"), "analyze", str(paths["flows"]), *common,
                              "--json", "--min-severity", "medium", "--no-progress"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert offline.returncode == 0, offline.stderr
    want = {(a["alert_id"], a["severity"]) for a in map(json.loads, offline.stdout.splitlines())}
    kept = int(re.search(r"([\d,]+) SMTP records", offline.stderr).group(1).replace(",", ""))
    assert len(want) > 20

    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    data = tmp_path / "b"
    proc = subprocess.Popen([*exe, "--data-dir", str(data), "serve", str(paths["flows"]), *common,
                             "--metrics", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(1)
            assert proc.poll() is None, proc.communicate()[1]
            try:
                records = _metric(url, "smtpguard_detector_records_total")
                open_rows = _metric(url, "smtpguard_detector_state_entries", 'structure="open_rows"')
            except OSError:
                continue
            if records >= kept and open_rows == 0:
                break
        else:
            raise AssertionError(f"serve consumed {records} of {kept} records")
        time.sleep(2)  # the last tenant windows and the final checkpoint
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err

    listed = subprocess.run([*exe, "--data-dir", str(data), "alerts", "list", "--severity", "medium", "--limit",
                             "100000", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    alerts = [json.loads(line) for line in listed.stdout.splitlines()]
    got = {(a["alert_id"], a["severity"]) for a in alerts}
    assert got == want, {"only in serve": sorted(got - want), "only in analyze": sorted(want - got)}
    # the IPv6 rotators were judged as their prefixes, whole, across the partitions
    rotators = [a for a in scen.abusive if a.label.startswith("spam_ipv6")]
    for r in rotators:
        assert any(a["src_ip"] == r.prefix for a in alerts), r.prefix
