"""Enforcement outputs against real parts: the Tansu broker, ``nft -c``, and a local HTTP server
standing in for the network team's webhook endpoint."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import ipaddress
import re
import shutil
import threading

import msgspec
import pytest

from smtpguard.core.errors import SmtpguardError
from smtpguard.core.kafka import free_port
from smtpguard.core.config import ResponseConfig, WebhookConfig
from smtpguard.response.enforce import (EnforcementEvent, KafkaOutput, Outputs, decode, messages_for, nft_check,
                                        read_state, state_messages, write_nftables)
from smtpguard.core.registry import Registry, from_ms, now_ms, write_atomically
from smtpguard.response.webhook import WebhookSender, backoff_delays_ms
from smtpguard.core.store import Store

SECRET = "s3cret-key"


@pytest.fixture
def store(cfg):
    s = Store(cfg.store_dsn, cfg.store.database)
    yield s
    s.close()


@pytest.fixture
def reg(store) -> Registry:
    return Registry(store)


# -- Kafka ----------------------------------------------------------------------------------------------
def test_enforcement_round_trip_latest_event_per_key_is_the_state(reg, cfg):
    out = KafkaOutput(cfg)
    t = now_ms()
    changes = [
        reg.grant("198.51.100.0/28", "acct-1", "relay pool", "alice", now_ms=t),
        reg.grant("203.0.113.9", "acct-2", "relay", "alice", expires=from_ms(t + 60_000), now_ms=t),
        reg.grant("2001:db8::25", "acct-3", "v6 relay", "alice", now_ms=t),
        reg.revoke("198.51.100.3", "spam run", "policy", ["a-1"], now_ms=t + 1),
        reg.revoke("2001:db8::25", "flood", "bob", ["a-2"], now_ms=t + 2),
        reg.restore("2001:db8::25", "fixed", "carol", now_ms=t + 3),
    ]
    for e in changes:
        out.publish(messages_for(e, reg.states(e.at_ms)))
    out.publish(messages_for(reg.expire_due(now_ms=t + 120_000)[0], reg.states(t + 120_000)))

    state = read_state(cfg)
    assert {k: v.action for k, v in state.items()} == {
        "198.51.100.0/28": "allow", "198.51.100.3": "deny", "203.0.113.9": "deny", "2001:db8::25": "allow"}
    cut = state["198.51.100.3"]
    assert (cut.tenant, cut.reason, cut.alert_ids, cut.kind, cut.actor, cut.decided_by) == (
        "acct-1", "spam run", ["a-1"], "revoked", "policy", "198.51.100.3")
    assert cut.event_id == changes[3].event_id and cut.at == changes[3].to_dict()["at"]
    assert state["203.0.113.9"].kind == "expired" and state["203.0.113.9"].decided_by is None
    assert state["2001:db8::25"].alert_ids == [] and state["2001:db8::25"].kind == "restored"

    # publishing the whole state again leaves the same state
    out.publish(state_messages(reg.states(t + 120_000)))
    again = read_state(cfg)
    assert {k: (v.action, v.event_id) for k, v in again.items()} == {k: (v.action, v.event_id) for k, v in state.items()}


def test_lifting_a_cut_tells_the_network_the_block_decides_again(reg, cfg):
    out = KafkaOutput(cfg)
    t = now_ms()
    for e in (reg.grant("198.51.100.0/28", "acct-1", "relay pool", "alice", now_ms=t),
              reg.revoke("198.51.100.3", "spam run", "policy", now_ms=t + 1),
              reg.restore("198.51.100.3", "false positive", "carol", now_ms=t + 2),
              reg.revoke("198.51.100.0/28", "tenant closed", "bob", now_ms=t + 3)):
        out.publish(messages_for(e, reg.states(e.at_ms)))
    state = read_state(cfg)
    assert {k: (v.action, v.decided_by) for k, v in state.items()} == {
        "198.51.100.0/28": ("deny", "198.51.100.0/28"), "198.51.100.3": ("deny", "198.51.100.0/28")}
    assert state["198.51.100.3"].reason == "198.51.100.0/28 revoked: tenant closed"


# -- nftables -------------------------------------------------------------------------------------------
def _require_nft() -> None:
    if shutil.which("nft") is None:
        pytest.fail("nft is not installed: install the Debian package nftables (the Makefile's test target does)")


def _elements(text: str, set_name: str) -> list[str]:
    filled = re.findall(rf"set {set_name} {{[^}}]*elements = {{ ([^}}]*) }}", text)
    return filled[0].split(", ") if filled else []


def test_nftables_file_holds_the_allowed_set_and_nft_accepts_it(reg, tmp_path):
    _require_nft()
    t = now_ms()
    reg.grant("198.51.100.0/28", "acct-1", "relay pool", "alice", now_ms=t)
    reg.grant("198.51.100.16/28", "acct-1", "relay pool 2", "alice", now_ms=t)
    reg.grant("192.0.2.25", "acct-2", "relay", "alice", now_ms=t)
    reg.grant("2001:db8:25::/64", "acct-3", "v6 pool", "alice", now_ms=t)
    reg.grant("203.0.113.1", "acct-4", "expired relay", "alice", expires=from_ms(t + 1000), now_ms=t)
    reg.revoke("198.51.100.3", "spam", "policy", now_ms=t + 1)
    path = tmp_path / "nft" / "smtp-allowed.nft"

    r = write_nftables(path, reg, ResponseConfig(), at_ms=t + 2000, check=True)
    assert r.checked and (r.ipv4, r.ipv6) == (len(_elements(path.read_text(), "smtp_allowed_v4")), 1)
    v4 = [ipaddress.ip_network(e) for e in _elements(path.read_text(), "smtp_allowed_v4")]
    covered = {str(a) for n in v4 for a in n}
    want = {str(a) for a in ipaddress.ip_network("198.51.100.0/27")} - {"198.51.100.3"} | {"192.0.2.25"}
    assert covered == want
    assert _elements(path.read_text(), "smtp_allowed_v6") == ["2001:db8:25::/64"]
    assert list(tmp_path.joinpath("nft").iterdir()) == [path], "no temporary file left behind"


def test_an_empty_registry_gives_empty_sets_that_nft_accepts(reg, tmp_path):
    _require_nft()
    path = tmp_path / "empty.nft"
    r = write_nftables(path, reg, ResponseConfig(nftables_table="smtp_edge"), check=True)
    assert (r.ipv4, r.ipv6, r.checked) == (0, 0, True)
    assert "table inet smtp_edge {" in path.read_text() and "elements" not in path.read_text()


def test_a_file_nft_rejects_does_not_replace_the_old_one(reg, tmp_path):
    _require_nft()
    path = tmp_path / "smtp-allowed.nft"
    reg.grant("192.0.2.25", "acct-2", "relay", "alice")
    write_nftables(path, reg, ResponseConfig(), check=True)
    good = path.read_text()
    bad = "table inet smtpguard {\n\tset smtp_allowed_v4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/33 } }\n}\n"
    with pytest.raises(SmtpguardError, match="nft -c rejected"):
        write_atomically(path, lambda fh: fh.write(bad), nft_check)
    assert path.read_text() == good and list(tmp_path.iterdir()) == [path]


# -- webhook --------------------------------------------------------------------------------------------
class Endpoint:
    """A loopback HTTP server that answers ``statuses`` in turn (then 200) and keeps every request."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = endpoint.statuses.pop(0) if endpoint.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/enforcement"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    made: list[Endpoint] = []

    def make(statuses: list[int]) -> Endpoint:
        made.append(Endpoint(statuses))
        return made[-1]

    yield make
    for e in made:
        e.close()


def hook(url: str, **kw) -> WebhookConfig:
    return WebhookConfig(url=url, secret=SECRET, **{"max_attempts": 4, "backoff_initial_ms": 1, "backoff_max_ms": 4, **kw})


def test_webhook_retries_until_delivered_and_signs_every_request(endpoint, store):
    ep = endpoint([503, 500])
    payload = b'{"ip":"198.51.100.3","action":"deny"}'
    d = WebhookSender(hook(ep.url), store).send(payload, event_id="ev-1", ip="198.51.100.3")
    assert (d.delivered, d.attempts) == (True, 3)
    assert [h["x-smtpguard-attempt"] for h, _ in ep.requests] == ["1", "2", "3"]
    for headers, body in ep.requests:
        assert body == payload and headers["content-type"] == "application/json"
        assert headers["x-smtpguard-event-id"] == "ev-1"
        want = hmac.new(SECRET.encode(), headers["x-smtpguard-timestamp"].encode() + b"." + body, hashlib.sha256)
        assert hmac.compare_digest(headers["x-smtpguard-signature"], "sha256=" + want.hexdigest())
    assert WebhookSender(hook(ep.url), store).dead_letters() == []


def test_webhook_dead_letters_what_keeps_failing(endpoint, store):
    ep = endpoint([503] * 10)
    sender = WebhookSender(hook(ep.url.replace("http://", "http://user:pw@")), store)
    d = sender.send(b'{"ip":"192.0.2.1"}', event_id="ev-2", ip="192.0.2.1")
    assert (d.delivered, d.attempts, d.last_error) == (False, 4, "HTTP 503 Service Unavailable")
    assert len(ep.requests) == 4
    [dead] = sender.dead_letters()
    assert (dead["event_id"], dead["ip"], dead["attempts"], dead["last_error"], dead["payload"]) == (
        "ev-2", "192.0.2.1", 4, "HTTP 503 Service Unavailable", '{"ip":"192.0.2.1"}')
    assert "pw" not in dead["url"] and dead["url"].endswith("/hooks/enforcement")
    assert {h["authorization"] for h, _ in ep.requests} == {"Basic dXNlcjpwdw=="}, "user:pw as Basic authentication"


def test_webhook_does_not_retry_a_request_the_endpoint_refuses(endpoint, store):
    ep = endpoint([400])
    d = WebhookSender(hook(ep.url), store).send(b"{}", event_id="ev-3", ip="192.0.2.2")
    assert (d.delivered, d.attempts, len(ep.requests)) == (False, 1, 1)


def test_webhook_retries_a_closed_port(store):
    sender = WebhookSender(hook(f"http://127.0.0.1:{free_port()}/x", max_attempts=3), store)
    d = sender.send(b"{}", event_id="ev-4", ip="192.0.2.3")
    assert (d.delivered, d.attempts) == (False, 3) and "refused" in d.last_error.lower()
    assert [r["event_id"] for r in sender.dead_letters()] == ["ev-4"]


def test_backoff_doubles_up_to_its_ceiling():
    cfg = WebhookConfig(max_attempts=6, backoff_initial_ms=500, backoff_max_ms=3000)
    assert backoff_delays_ms(cfg) == [500, 1000, 2000, 3000, 3000]
    assert backoff_delays_ms(WebhookConfig(max_attempts=1)) == []


def test_outputs_send_each_enforcement_event_to_kafka_and_the_webhook(endpoint, reg, cfg, store):
    ep = endpoint([502])
    response = msgspec.structs.replace(ResponseConfig(), webhook=hook(ep.url))
    e = reg.grant("198.51.100.0/28", "acct-1", "relay pool", "alice")
    cut = reg.revoke("198.51.100.3", "spam run", "policy", ["a-7"])
    report = Outputs(cfg, response, store).publish(messages_for(e, reg.states()) + messages_for(cut, reg.states()))
    assert (report.kafka, report.webhook_delivered, report.webhook_dead) == (2, 2, 0)
    bodies = [decode(body) for _, body in ep.requests]
    assert [(b.ip, b.action) for b in bodies] == [("198.51.100.0/28", "allow"), ("198.51.100.0/28", "allow"),
                                                  ("198.51.100.3", "deny")]
    assert bodies[-1].alert_ids == ["a-7"] and isinstance(bodies[-1], EnforcementEvent)
    assert read_state(cfg)["198.51.100.3"].event_id == cut.event_id
