"""The one list of input formats. ``--format``, auto-detection, ``collect``, ``analyze`` and
``decode`` all read it.

Each entry names a module with a pure parser class and a ``sniff(head: str) -> bool``
(``sniff(head: bytes) -> bool`` for stream formats). Order matters for auto-detection:
the first sniffer that accepts an input wins, so list stricter formats first.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from smtpguard.core.errors import InputError


@dataclass(frozen=True)
class Format:
    name: str
    module: str
    parser: str
    doc: str
    example: str
    sniffer: str = "sniff"
    """name of the module's sniff function (a module may hold several formats)"""
    kind: str = "lines"
    """"lines": the parser has parse_lines(lines, first_line_no) (text, fed in chunks);
    "stream": the parser has parse_stream(binary_file, source) and yields batches"""

    def load(self) -> tuple[Callable[..., Any], Callable[[str], bool]]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.parser), getattr(mod, self.sniffer)

    def make_parser(self, source: str, smtp_ports: Sequence[int] | None) -> Any:
        cls, _ = self.load()
        return cls(source, smtp_ports)


FORMATS: dict[str, Format] = {
    f.name: f for f in (
        Format("netflow-pcap", "smtpguard.ingest.netflow", "NetflowPcapParser",
               "NetFlow v5/v9 and IPFIX datagrams in a pcap or pcapng capture (exporter = sender ip:port); "
               "templates carry over between files",
               "smtpguard decode capture.pcap --format netflow-pcap --json", sniffer="sniff_pcap", kind="stream"),
        Format("sflow-pcap", "smtpguard.ingest.sflow", "SflowPcapParser",
               "sFlow v5 datagrams in a pcap or pcapng capture of the export traffic: one record per sampled "
               "packet (raw header or sampled IPv4/IPv6 record), its sampling rate carried; exporter = the agent",
               "smtpguard decode sflow-export.pcap --format sflow-pcap --json", sniffer="sniff_pcap", kind="stream"),
        Format("pcap", "smtpguard.ingest.pcap_smtp", "SmtpCaptureParser",
               "TCP connections to SMTP ports in a pcap or pcapng capture, with the SMTP dialogue where visible "
               "(EHLO name, MAIL FROM domain, RCPT count, reply codes, STARTTLS, AUTH); exporter = the file name; "
               "connections carry over between files",
               "smtpguard decode capture.pcap --format pcap --json", sniffer="sniff", kind="stream"),
        Format("aws-vpc", "smtpguard.ingest.aws_vpc", "AwsVpcParser",
               "AWS VPC and Transit Gateway Flow Logs: default v2, all-fields v3-v5, Transit Gateway v6 default, "
               "or any layout declared by a header line; plain or .gz",
               "smtpguard analyze flows.log.gz --format aws-vpc --json"),
        Format("azure-flow", "smtpguard.ingest.azure_flow", "AzureFlowParser",
               "Azure Network Watcher flow logs: NSG v1/v2 and VNet v4 JSON documents (PT1H.json), a bare record, "
               "or one per line", "smtpguard analyze PT1H.json --format azure-flow --json", kind="stream"),
        Format("gcp-vpc", "smtpguard.ingest.gcp_vpc", "GcpVpcParser",
               "GCP VPC Flow Logs exported from Cloud Logging, one LogEntry JSON per line",
               "smtpguard analyze vpc_flows.json.gz --format gcp-vpc --json"),
        Format("zeek", "smtpguard.ingest.zeek", "ZeekParser",
               "Zeek conn.log and smtp.log, TSV (with #fields header) or JSON lines; other Zeek logs are skipped",
               "smtpguard analyze conn.log smtp.log --format zeek --json"),
        Format("argus", "smtpguard.ingest.argus", "ArgusParser",
               "Argus bidirectional flows CSV with header (ra -c ,; CTU-13 .binetflow)",
               "smtpguard analyze capture20110816.binetflow --format argus --json"),
        Format("sflow-dat", "smtpguard.ingest.sflow", "SflowDatParser",
               "sFlow v5 datagrams written back to back (times from the file's modification time and the "
               "agent's uptime)",
               "smtpguard decode sflow.dat --format sflow-dat --json", sniffer="sniff_dat", kind="stream"),
        Format("netflow-dat", "smtpguard.ingest.netflow", "NetflowDatParser",
               "NetFlow v5/v9 and IPFIX export packets written back to back (nc -lu > file), one exporter",
               "smtpguard decode templates.dat data.dat --format netflow-dat --json", sniffer="sniff_dat", kind="stream"),
    )
}


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown format {name!r}; known formats: auto, {', '.join(FORMATS)}") from None


def detect(head: bytes, source: str = "input") -> Format:
    """Pick the format whose sniffer accepts the first bytes of an input."""
    text = head.decode("utf-8", "replace")
    for f in FORMATS.values():
        _, sniff = f.load()
        if sniff(text if f.kind == "lines" else head):
            return f
    raise InputError(f"cannot tell the format of {source}; name it with --format ({', '.join(FORMATS)})")
