"""Format sniffers against every shared sample: each accepts exactly its own format's
files and none of the others (AWS, NetFlow, pcap, DNSBL zones, expected-output JSON)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpguard.ingest import argus, aws_vpc, azure_flow, gcp_vpc, zeek

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ZEEK_LOGS = {
    "smtp/zeek/Baseline/scripts.base.protocols.smtp.basic/smtp.log",
    "smtp/zeek/Baseline/scripts.base.protocols.smtp.starttls/smtp.log",
    "smtp/zeek/Baseline/scripts.base.protocols.smtp.starttls/ssl.log",
    "smtp/zeek/Baseline/scripts.base.protocols.smtp.mail-transactions-invalid/smtp.log",
    "smtp/zeek/Baseline/scripts.base.protocols.smtp.mail-transactions-invalid/weird.log",
    "smtp/zeek/Baseline/scripts.base.protocols.smtp.attachment/files.log",
}
OWN = {
    "argus": {
        "labelled-flows/ctu13-scenario6-capture20110816/capture20110816.binetflow.slice_13_1",
        "labelled-flows/ctu13-scenario6-capture20110816/capture20110816.binetflow.slice_1_2",
    },
    "zeek": ZEEK_LOGS,
    "gcp-vpc": {"cloud-flowlogs/gcp-vpcflow/test-vpcflow.first3.log"},
    "azure-flow": {"cloud-flowlogs/azure-nsg/test-nsg.log"},
    "aws-vpc": {
        "cloud-flowlogs/aws-vpcflow/test-extra-samples.log",
        "cloud-flowlogs/aws-vpcflow/test-v5-all-fields.log",
    },
}
TEXT_SNIFFERS = {"argus": argus.sniff, "zeek": zeek.sniff, "gcp-vpc": gcp_vpc.sniff, "aws-vpc": aws_vpc.sniff}


def heads() -> dict[str, bytes]:
    files = sorted(f for f in DATA.rglob("*") if f.is_file())
    assert len(files) > 40
    return {str(f.relative_to(DATA)): f.read_bytes()[: 64 * 1024] for f in files}


@pytest.mark.parametrize("fmt", sorted(OWN))
def test_sniffer_accepts_exactly_its_own_samples(fmt: str) -> None:
    accepted = set()
    for name, head in heads().items():
        if fmt == "azure-flow":
            hit = azure_flow.sniff(head)
        else:
            hit = TEXT_SNIFFERS[fmt](head.decode("utf-8", "replace"))
        if hit:
            accepted.add(name)
    assert accepted == OWN[fmt]


def test_no_sample_is_claimed_by_two_sniffers() -> None:
    for name, head in heads().items():
        text = head.decode("utf-8", "replace")
        claims = [f for f, s in TEXT_SNIFFERS.items() if s(text)] + (["azure-flow"] if azure_flow.sniff(head) else [])
        assert len(claims) <= 1, (name, claims)
