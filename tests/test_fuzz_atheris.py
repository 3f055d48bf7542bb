"""Coverage-guided fuzzing (atheris, libFuzzer) of the binary decoders for a bounded number
of runs, seeded with the shared captures: NetFlow v5/v9/IPFIX datagrams, and pcap/pcapng
files through the SMTP capture parser and the NetFlow capture shell; and the AWS VPC flow log
parser's column reader against its line-by-line path, seeded with the shared flow logs. The harness is
``tests/fuzz/atheris_decoders.py``; a failure leaves the input that caused it in the test's
temporary directory (``crash-*``) and prints it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz.hostile import SOAK
from test_netflow import payloads_of

import atheris  # noqa: E402,F401 - required: the test extras install it (a missing fuzzer is a failure, not a skip)

HARNESS = Path(__file__).resolve().parent / "fuzz" / "atheris_decoders.py"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: runs per target: a few seconds each on one core (times TEST_SOAK for the long variant)
RUNS = {"netflow": 4000 * SOAK, "pcap": 1500 * SOAK, "vpc": 3000 * SOAK, "sflow": 3000 * SOAK}


def _seeds(target: str, corpus: Path) -> int:
    corpus.mkdir()
    if target == "netflow":
        seeds = [p for f in sorted((DATA / "netflow").rglob("*")) if f.suffix in (".dat", ".pcap")
                 for p in payloads_of(f)]
    elif target == "sflow":
        captures = sorted((DATA / "sflow" / "akvorado").glob("*.pcap"))
        seeds = [f.read_bytes() for f in captures] + [p for f in captures for p in payloads_of(f)]
    elif target == "vpc":
        from test_aws_vpc import V2_NAMES, clean_lines

        logs = sorted((DATA / "cloud-flowlogs" / "aws-vpcflow").glob("*.log"))
        seeds = [f.read_bytes() for f in logs] + [f.read_bytes()[:4000] for f in logs]
        seeds += ["\n".join(clean_lines(40, seed)).encode() for seed in range(6)]
        seeds += ["\n".join([" ".join(V2_NAMES)] + clean_lines(30, seed)).encode() for seed in range(6)]
    else:
        seeds = [f.read_bytes() for f in sorted((DATA / "smtp" / "zeek" / "Traces").rglob("*.pcap"))]
        seeds += [f.read_bytes() for f in sorted((DATA / "netflow" / "akvorado").glob("*.pcap"))]
    for i, s in enumerate(seeds):
        (corpus / f"seed-{i:03d}").write_bytes(s)
    return len(seeds)


@pytest.mark.parametrize("target", sorted(RUNS))
def test_atheris_runs_find_no_crash(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    assert _seeds(target, corpus) >= 10
    cmd = [sys.executable, str(HARNESS), target, str(corpus), f"-atheris_runs={RUNS[target]}",
           "-max_len=65536", f"-artifact_prefix={tmp_path}/", "-seed=1", "-print_final_stats=1"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*")) + sorted(tmp_path.glob("oom-*"))
    assert proc.returncode == 0 and not crashes, out[-6000:] + "".join(f"\n{c.name}: {c.read_bytes()[:512]!r}"
                                                                         for c in crashes)
    assert f"Done {RUNS[target]} " in out, out[-3000:]
