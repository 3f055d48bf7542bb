"""Parser throughput on generated input: lines (or flow tuples) per second, wall clock and
per CPU second, with SMTP filtering on (the collector's setting) and off.

    .venv/bin/python bench/bench_formats.py [LINES]

Input is generated in memory (random addresses and ports, 2 % towards port 25) and fed
in chunks of 100,000 lines, as the reader does. Numbers go in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import io
import json
import random
import sys
import time
from typing import Callable

from smtpguard.ingest.argus import ArgusParser
from smtpguard.ingest.aws_vpc import AwsVpcParser
from smtpguard.ingest.azure_flow import AzureFlowParser
from smtpguard.ingest.gcp_vpc import GcpVpcParser
from smtpguard.ingest.zeek import ZeekParser

CHUNK = 100_000
SMTP = (25, 465, 587, 2525)


def _ip(rnd: random.Random) -> str:
    return f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"


def _dport(rnd: random.Random) -> int:
    return 25 if rnd.random() < 0.02 else rnd.choice((443, 80, 53, 8080, 3306))


def gen_aws(n: int, rnd: random.Random) -> list[str]:
    return [
        f"2 123456789012 eni-0a1b2c3d4e5f60718 {_ip(rnd)} {_ip(rnd)} {rnd.randrange(1024, 65536)} {_dport(rnd)} 6 "
        f"{rnd.randrange(1, 100)} {rnd.randrange(40, 100000)} 1700000000 1700000060 ACCEPT OK"
        for _ in range(n)
    ]


def gen_argus(n: int, rnd: random.Random) -> list[str]:
    head = "StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,TotPkts,TotBytes,SrcBytes,Label"
    return [head] + [
        f"2011/08/16 12:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000000:06d},{rnd.random() * 10:.6f},tcp,"
        f"{_ip(rnd)},{rnd.randrange(1024, 65536)},   ->,{_ip(rnd)},{_dport(rnd)},FSPA_FSPA,0,0,{rnd.randrange(2, 50)},"
        f"{(t := rnd.randrange(200, 90000))},{t // 3},flow=Background-TCP-Established"
        for i in range(n)
    ]


def gen_zeek_tsv(n: int, rnd: random.Random) -> list[str]:
    head = [
        "#separator \\x09",
        "#set_separator\t,",
        "#empty_field\t(empty)",
        "#unset_field\t-",
        "#path\tconn",
        "#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration\torig_bytes\t"
        "resp_bytes\tconn_state\tlocal_orig\tlocal_resp\tmissed_bytes\thistory\torig_pkts\torig_ip_bytes\t"
        "resp_pkts\tresp_ip_bytes\ttunnel_parents",
    ]
    return head + [
        f"{1700000000 + i / 1000:.6f}\tC{i:017d}\t{_ip(rnd)}\t{rnd.randrange(1024, 65536)}\t{_ip(rnd)}\t"
        f"{_dport(rnd)}\ttcp"
        f"\t-\t{rnd.random() * 10:.6f}\t{rnd.randrange(1000)}\t{rnd.randrange(1000)}\tSF\t-\t-\t0\tShADadFf"
        f"\t{rnd.randrange(3, 50)}\t{rnd.randrange(200, 9000)}\t{rnd.randrange(3, 50)}\t{rnd.randrange(200, 9000)}\t-"
        for i in range(n)
    ]


def gen_zeek_json(n: int, rnd: random.Random) -> list[str]:
    return [
        json.dumps(
            {
                "ts": 1700000000 + i / 1000,
                "uid": f"C{i:017d}",
                "id.orig_h": _ip(rnd),
                "id.orig_p": rnd.randrange(1024, 65536),
                "id.resp_h": _ip(rnd),
                "id.resp_p": _dport(rnd),
                "proto": "tcp",
                "duration": rnd.random(),
                "orig_bytes": 100,
                "resp_bytes": 200,
                "conn_state": "SF",
                "missed_bytes": 0,
                "history": "ShADadFf",
                "orig_pkts": 5,
                "orig_ip_bytes": 400,
                "resp_pkts": 4,
                "resp_ip_bytes": 500,
            }
        )
        for i in range(n)
    ]


def gen_gcp(n: int, rnd: random.Random) -> list[str]:
    out = []
    for i in range(n):
        st = f"2019-06-14T03:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}193305Z"
        out.append(
            json.dumps(
                {
                    "insertId": f"id{i}",
                    "jsonPayload": {
                        "bytes_sent": str(rnd.randrange(100, 100000)),
                        "packets_sent": str(rnd.randrange(1, 100)),
                        "connection": {
                            "src_ip": _ip(rnd),
                            "src_port": rnd.randrange(1024, 65536),
                            "dest_ip": _ip(rnd),
                            "dest_port": _dport(rnd),
                            "protocol": 6,
                        },
                        "start_time": st,
                        "end_time": st,
                        "reporter": "SRC",
                        "rtt_msec": "36",
                        "src_instance": {
                            "project_id": "my-sample-project",
                            "region": "us-east1",
                            "vm_name": "kibana",
                            "zone": "us-east1-b",
                        },
                        "src_vpc": {
                            "project_id": "my-sample-project",
                            "subnetwork_name": "default",
                            "vpc_name": "default",
                        },
                    },
                    "logName": "projects/my-sample-project/logs/compute.googleapis.com%2Fvpc_flows",
                    "resource": {
                        "labels": {
                            "location": "us-east1-b",
                            "project_id": "my-sample-project",
                            "subnetwork_id": "758019854043528829",
                            "subnetwork_name": "default",
                        },
                        "type": "gce_subnetwork",
                    },
                    "timestamp": "2019-06-14T03:50:10.845445834Z",
                },
                separators=(",", ":"),
            )
        )
    return out


def gen_azure(n: int, rnd: random.Random) -> bytes:
    tuples = [
        f"{1542110000 + i // 100},{_ip(rnd)},{_ip(rnd)},{rnd.randrange(1024, 65536)},{_dport(rnd)},T,O,A,E,"
        f"{rnd.randrange(1, 50)},{rnd.randrange(60, 9000)},{rnd.randrange(1, 50)},{rnd.randrange(60, 9000)}"
        for i in range(n)
    ]
    per = 10_000
    records = [
        {
            "time": "2018-11-13T12:00:35.3899262Z",
            "category": "NetworkSecurityGroupFlowEvent",
            "resourceId": "/SUBSCRIPTIONS/00000000-0000-0000-0000-000000000000/RESOURCEGROUPS/RG/PROVIDERS/"
            "MICROSOFT.NETWORK/NETWORKSECURITYGROUPS/NSG",
            "operationName": "NetworkSecurityGroupFlowEvents",
            "properties": {
                "Version": 2,
                "flows": [{"rule": "r", "flows": [{"mac": "000D3AF87856", "flowTuples": tuples[i : i + per]}]}],
            },
        }
        for i in range(0, n, per)
    ]
    return json.dumps({"records": records}).encode()


def run_lines(name: str, make: Callable[[str, object], object], lines: list[str], ports) -> None:
    """The parser as the reader feeds it: undecoded blocks when it reads those (``parse_block``,
    also timed line by line then), else chunks of lines."""
    parser = make("bench", ports)
    if hasattr(parser, "parse_block"):
        blocks = ["\n".join(lines[i : i + CHUNK]).encode() for i in range(0, len(lines), CHUNK)]
        _timed(f"{name}", ports, len(lines),
               lambda: [parser.parse_block(b, i * CHUNK + 1) for i, b in enumerate(blocks)])  # type: ignore[attr-defined]
        parser = make("bench", ports)
        name = f"{name} (line by line)"
    _timed(name, ports, len(lines), lambda: [parser.parse_lines(lines[i : i + CHUNK], i + 1)  # type: ignore[attr-defined]
                                             for i in range(0, len(lines), CHUNK)])


def _timed(name: str, ports, n: int, parse: Callable[[], list]) -> None:
    t, c = time.perf_counter(), time.process_time()
    kept = sum(b.records.num_rows for b in parse())
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(
        f"{name:26s} smtp_ports={'on ' if ports else 'off'} {n / wall / 1e6:6.2f} M lines/s wall "
        f"{n / cpu / 1e6:6.2f} M lines/CPU-s  kept {kept}"
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rnd = random.Random(1)
    cases = [
        ("aws-vpc", AwsVpcParser, gen_aws(n, rnd)),
        ("argus", ArgusParser, gen_argus(n, rnd)),
        ("zeek-tsv", ZeekParser, gen_zeek_tsv(n, rnd)),
        ("zeek-json", ZeekParser, gen_zeek_json(n, rnd)),
        ("gcp-vpc", GcpVpcParser, gen_gcp(n, rnd)),
    ]
    for name, cls, lines in cases:
        run_lines(name, cls, lines[:CHUNK], SMTP)  # warm up
        for ports in (SMTP, None):
            run_lines(name, cls, lines, ports)
    data = gen_azure(n, rnd)
    for ports in (SMTP, None):
        t, c = time.perf_counter(), time.process_time()
        (b,) = AzureFlowParser("bench", ports).parse_stream(io.BytesIO(data), "bench")
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        print(
            f"{'azure-flow':12s} smtp_ports={'on ' if ports else 'off'} {n / wall / 1e6:6.2f} M tuples/s wall "
            f"{n / cpu / 1e6:6.2f} M tuples/CPU-s  kept {b.records.num_rows}"
        )


if __name__ == "__main__":
    main()
