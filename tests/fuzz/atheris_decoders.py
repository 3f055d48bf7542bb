"""Coverage-guided fuzzing (atheris) of the binary decoders: NetFlow v5/v9/IPFIX datagrams and
the pcap/pcapng readers (NetFlow export captures and SMTP captures); and of the AWS VPC flow log
parser's two paths, which must agree on every input (``vpc``).

Run by ``tests/test_fuzz_atheris.py`` with a bounded number of runs, or by hand for longer:

    python tests/fuzz/atheris_decoders.py netflow CORPUS_DIR -atheris_runs=200000
    python tests/fuzz/atheris_decoders.py pcap CORPUS_DIR -max_len=65536
    python tests/fuzz/atheris_decoders.py vpc CORPUS_DIR
    python tests/fuzz/atheris_decoders.py sflow CORPUS_DIR

A run fails (non-zero exit, the input saved as ``crash-*``) when a decoder raises anything but
the project's errors, or breaks the invariant of :func:`fuzz.hostile.check_batch`, or its
state leaves its bounds.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared invariant

# imported before the instrumented block: coverage of the decoders, not of numpy and pyarrow
import msgspec  # noqa: E402,F401
import numpy  # noqa: E402,F401
import pandas  # noqa: E402,F401
import polars  # noqa: E402,F401
import pyarrow  # noqa: E402,F401
import pyarrow.compute  # noqa: E402,F401

import smtpguard.ingest.base  # noqa: E402,F401
import smtpguard.core.wire  # noqa: E402,F401

with atheris.instrument_imports():
    from smtpguard.ingest import aws_vpc, ipfix, netflow, netflow_v5, netflow_v9, pcap_smtp, sflow  # noqa: F401
    from smtpguard.ingest.netflow import Datagram, NetflowDatParser, NetflowDecoder, NetflowPcapParser
    from smtpguard.ingest.pcap_smtp import SmtpCaptureParser

from fuzz.hostile import check_batch  # noqa: E402

from smtpguard.core.errors import SmtpguardError  # noqa: E402

#: One decoder for the whole run, as a collector has: templates learned from one input decode
#: the next, and its state must stay bounded whatever it was fed.
DECODER = NetflowDecoder(None, pending_limit=64, max_templates_per_exporter=256, max_exporters=64)


def _bounded(dec: NetflowDecoder) -> None:
    assert len(dec._exporters) <= dec.max_exporters
    for exp in dec._exporters.values():
        assert sum(len(d.templates) for d in exp.domains.values()) == exp.n_templates
        assert exp.n_templates <= dec.max_templates_per_exporter
        assert all(d.templates for d in exp.domains.values())
    assert dec.pending_sets <= dec.pending_limit and dec._pending_bytes <= dec.pending_bytes_limit
    assert len(dec._layouts) <= netflow.MAX_SHARED_TEMPLATES


def _stream(parser, data: bytes) -> None:
    try:
        for b in parser.parse_stream(io.BytesIO(data), "fuzz"):
            check_batch(b, parser.name)
    except SmtpguardError:
        pass
    check_batch(parser.close(), parser.name)


def one_netflow(data: bytes) -> None:
    exporter = f"192.0.2.{len(data) % 80}:2055"  # several exporters, so that their bound is reached too
    before = DECODER.totals().packets
    check_batch(DECODER.decode_many([Datagram(data, exporter, None), Datagram(data, exporter, 0)]), "netflow")
    assert DECODER.totals().packets - before == 2
    _bounded(DECODER)
    if data[:1] == b"\x00":
        check_batch(DECODER.flush(), "netflow")
    _stream(NetflowDatParser("fuzz", (25,)), data)


def one_pcap(data: bytes) -> None:
    _stream(SmtpCaptureParser("fuzz.pcap", (25, 587), max_connections=16, max_held_bytes=4096), data)
    _stream(NetflowPcapParser("fuzz.pcap", None), data)


def one_sflow(data: bytes) -> None:
    """sFlow v5: the datagram decoder, the capture shell and the back-to-back file shell."""
    dec = sflow.SflowDecoder((25,), max_agents=8)
    check_batch(dec.decode_many([Datagram(data, "fuzz", 0, "dg")]), "sflow")
    assert len(dec.counters) <= 8
    _stream(sflow.SflowPcapParser("fuzz.pcap", None), data)
    _stream(sflow.SflowDatParser("fuzz.dat", (25,)), data)


def one_vpc(data: bytes) -> None:
    """A block of flow log bytes read by the column reader (when it takes it) and line by line:
    the same records, dead letters and counts, and the same layout afterwards."""
    fast, slow = aws_vpc.AwsVpcParser("fuzz", (25,)), aws_vpc.AwsVpcParser("fuzz", (25,))
    lines = data.decode("utf-8", "replace").split("\n")
    a, b = fast.parse_block(data, 1), slow.parse_lines(lines, 1)
    check_batch(a, "aws-vpc")
    assert a.records.equals(b.records), (a.records.to_pylist()[:3], b.records.to_pylist()[:3])
    assert [(r.location, r.reason, r.raw) for r in a.rejects] == [(r.location, r.reason, r.raw) for r in b.rejects]
    assert (a.read, a.skipped) == (b.read, b.skipped)
    assert getattr(fast._state, "fields", None) == getattr(slow._state, "fields", None)


def main() -> None:
    target = sys.argv.pop(1)
    atheris.Setup(sys.argv, {"netflow": one_netflow, "pcap": one_pcap, "vpc": one_vpc, "sflow": one_sflow}[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
