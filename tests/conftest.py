"""Fixtures that start real services: a Tansu broker (Kafka protocol) and an embedded
ClickHouse engine (chdb) in temporary directories. Stopped by PID / closed at the end."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import msgspec
import pytest

from smtpguard.core import config
from smtpguard.core.kafka import LocalBroker

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared test data is missing at {SHARED_DATA} (the repository is checked out beside shared/)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    b = LocalBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory) -> Path:
    # chdb runs one engine per process: every test shares this directory, each with its own database.
    return tmp_path_factory.mktemp("chdb") / "store"


@pytest.fixture
def silent():
    """A loopback UDP port that receives queries and never answers them."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def make_config(tmp_path: Path, bootstrap: str = "", dsn: str = "", **detect: object) -> config.Config:
    """A config isolated per test: own topics, own database, own data dir."""
    tag = uuid.uuid4().hex[:10]
    cfg = config.load(environ={}, overrides={
        "data_dir": str(tmp_path / "data"),
        "kafka": {"bootstrap_servers": bootstrap, "partitions": 4, "group_id": f"g-{tag}",
                  "session_timeout_ms": 6000, "max_poll_interval_ms": 10000,
                  "topics": {"flows": f"flows-{tag}", "dlq": f"dlq-{tag}", "alerts": f"alerts-{tag}",
                             "enforcement": f"enf-{tag}"}},
        "store": {"dsn": dsn, "database": f"t_{tag}"},
        "detect": {"idle_flush_ms": 1000, **detect},
        # alerts are looked up in DNSBLs only where a test serves its own zones (rbldnsd)
        "dnsbl": {"check_alerts_from": "off"},
    })
    return cfg


@pytest.fixture
def cfg(tmp_path, broker, chdb_dir) -> config.Config:
    return make_config(tmp_path, broker.bootstrap, f"chdb://{chdb_dir}")


@pytest.fixture
def offline_cfg(tmp_path) -> config.Config:
    return make_config(tmp_path)


def replace(cfg: config.Config, **sections: dict) -> config.Config:
    """``cfg`` with some options of some sections replaced; a nested table (``response={"webhook": {...}}``)
    is converted to its type, so it is validated as the config file's would be."""
    out = cfg
    for name, values in sections.items():
        section = getattr(out, name)
        typed = {}
        for k, v in values.items():
            current = getattr(section, k)
            typed[k] = msgspec.convert(v, type(current)) if isinstance(v, dict) and isinstance(current, msgspec.Struct) \
                else v
        out = msgspec.structs.replace(out, **{name: msgspec.structs.replace(section, **typed)})
    return out


os.environ.setdefault("TQDM_DISABLE", "1")
