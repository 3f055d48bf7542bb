"""The console in a real browser: Debian's Chromium, headless, driven by Playwright, against the real
app served by uvicorn on a free loopback port, over a store filled by the detectors, with
enforcement events on a real Kafka broker.

Screenshots of the main pages go to test-artifacts/console/ (git-ignored).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conftest import make_config
from console_data import Filled, fill
from smtpguard.console.app import create_app
from smtpguard.console.auth import Users
from smtpguard.console.server import ConsoleServer
from smtpguard.response.enforce import read_state
from smtpguard.core.registry import Registry
from smtpguard.core.store import Store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"


class Site:
    def __init__(self, cfg, store: Store, filled: Filled, url: str):
        self.cfg, self.store, self.filled, self.url = cfg, store, filled, url


@pytest.fixture(scope="module")
def site(tmp_path_factory, broker, chdb_dir):
    base = tmp_path_factory.mktemp("console-browser")
    cfg = make_config(base, broker.bootstrap, f"chdb://{chdb_dir}")
    store = Store(cfg.store_dsn, cfg.store.database)
    filled = fill(store, cfg, base / "scenario")
    users = Users(store)
    for role in ("viewer", "analyst", "admin"):
        users.add(role, role, PASSWORD, "test")
    with ConsoleServer(create_app(cfg, store), "127.0.0.1", 0) as server:
        yield Site(cfg, store, filled, server.url)
    store.close()


@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def session(browser: Browser, site: Site, name: str) -> Page:
    """A fresh browser context logged in as ``name`` through the login form."""
    page = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{site.url}/alerts")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Falerts$"))
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{site.url}/alerts")
    expect(page.locator("header .who")).to_have_text(name)
    return page


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_review_in_the_browser_filter_open_confirm_dismiss_restore(browser, site):
    target = site.filled.first(label="spam_exempted_new", exempted=True, severity="critical")
    page = session(browser, site, "analyst")
    expect(page.locator("table.queue tbody tr")).to_have_count(len(site.filled.alerts))

    # filter the queue down to critical fan-out alerts
    page.get_by_label("Severity").select_option("critical")
    page.get_by_label("Detector").select_option("spam_fanout")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"severity=critical.*detector=spam_fanout|detector=spam_fanout.*severity=critical"))
    critical = [a for a in site.filled.alerts if a.severity == "critical" and a.detector == "spam_fanout"]
    rows = page.locator("table.queue tbody tr")
    expect(rows).to_have_count(len(critical))
    expect(rows.locator(".sev-critical")).to_have_count(len(critical))

    # open the alert and read its evidence
    page.locator(f'table.queue a[href="/alerts/{target.alert_id}"]').first.click()
    expect(page).to_have_url(f"{site.url}/alerts/{target.alert_id}")
    chart = page.locator("#traffic-chart svg.chart")
    expect(chart).to_be_visible()
    expect(chart.locator("polyline")).to_have_count(3)
    connections = chart.locator('g[data-series="connections"] polyline').get_attribute("points").split()
    assert len(connections) == 61
    assert len({p.split(",")[1] for p in connections}) > 5, "the connections line has a shape, not a flat line"
    expect(chart.locator("rect.alert-window")).to_have_count(1)
    expect(page.locator("ul.reasons li").first).to_have_text(target.reasons[0])
    expect(page.locator("#exemption .verdict")).to_have_text("may send on port 25")
    expect(page.locator("#alert-status")).to_have_text("new")

    # confirm: the policy revokes the exemption and publishes the revocation
    page.get_by_label("Note").fill("spam run from a new mailer, SEC-12")
    page.get_by_role("button", name="Confirm abuse").click()
    expect(page.locator(".flash-ok")).to_contain_text("policy: revoke")
    expect(page.locator(".flash-ok")).to_contain_text("enforcement event(s) to Kafka")
    expect(page.locator("#alert-status")).to_have_text("confirmed")
    expect(page.locator("#review-label")).to_contain_text("confirmed")
    expect(page.locator("#exemption .verdict")).to_have_text("may not send on port 25")
    expect(page.locator("#exemption table.history tbody tr").last).to_contain_text("revoked")
    expect(page.locator("#activity")).to_contain_text("spam run from a new mailer, SEC-12")
    expect(page.get_by_role("button", name="Confirm abuse")).to_have_count(0)
    event = read_state(site.cfg)[target.src_ip]
    assert (event.action, event.kind, event.alert_ids) == ("deny", "revoked", [target.alert_id])
    shot(page, "detail")

    # dismiss a blocked-attempts alert as a false positive
    page.get_by_role("link", name="Alerts", exact=True).click()
    page.get_by_label("Detector").select_option("blocked_attempts")
    page.get_by_role("button", name="Filter").click()
    other = site.filled.first(label="blocked_attempts", exempted=False)
    page.locator(f'table.queue a[href="/alerts/{other.alert_id}"]').first.click()
    page.get_by_role("button", name="Dismiss as false positive").click()
    expect(page.locator(".flash-ok")).to_contain_text("dismissed as a false positive by analyst")
    expect(page.locator("#review-label")).to_contain_text("false_positive")
    labels = site.store.query(f"SELECT label, actor, src_ip FROM {site.store.database}.review_labels FINAL "
                              "WHERE alert_id = {id:String}", {"id": other.alert_id})
    assert labels == [("false_positive", "analyst", other.src_ip)]

    # the queue shows the new statuses; the health page counts them
    page.get_by_role("link", name="Alerts", exact=True).click()
    expect(page.locator(f'tr:has(a[href="/alerts/{target.alert_id}"]) .status')).to_have_text("confirmed")
    expect(page.locator(f'tr:has(a[href="/alerts/{other.alert_id}"]) .status')).to_have_text("dismissed")
    shot(page, "queue")
    page.get_by_role("link", name="Health", exact=True).click()
    expect(page.locator("#flows-count")).to_have_text(f"{site.store.count('flows'):,}")
    shot(page, "health")
    page.close()

    # an admin restores the exemption from the exemptions page
    admin = session(browser, site, "admin")
    admin.get_by_role("link", name="Exemptions", exact=True).click()
    admin.get_by_label("State").select_option("revoked")
    admin.get_by_role("button", name="Filter").click()
    admin.get_by_role("link", name=target.src_ip, exact=True).first.click()
    expect(admin.locator(".verdict")).to_have_text("may not send on port 25")
    admin.get_by_placeholder(f"why restore {target.src_ip}").fill("customer cleaned the instance")
    admin.get_by_role("button", name=f"Restore {target.src_ip}").click()
    expect(admin.locator(".flash-ok")).to_contain_text(f"{target.src_ip}: restored by admin")
    expect(admin.locator(".verdict")).to_have_text("may send on port 25")
    assert Registry(site.store).show(target.src_ip).state.state == "active"
    assert read_state(site.cfg)[target.src_ip].action == "allow"
    admin.get_by_role("link", name="Exemptions", exact=True).click()
    shot(admin, "exemptions")
    admin.close()


def test_a_viewer_cannot_act_and_a_post_without_csrf_token_is_refused(browser, site):
    alert = site.filled.first(label="flood", exempted=True)
    viewer = session(browser, site, "viewer")
    viewer.goto(f"{site.url}/alerts/{alert.alert_id}")
    expect(viewer.locator("#traffic-chart svg.chart")).to_be_visible()
    for name in ("Acknowledge", "Confirm abuse", "Dismiss as false positive", "Re-check DNSBLs", "Revoke exemption"):
        expect(viewer.get_by_role("button", name=name)).to_have_count(0)
    expect(viewer.get_by_role("link", name="Users", exact=True)).to_have_count(0)
    # the viewer's own session token does not lift the role check
    token = viewer.locator('header input[name="csrf_token"]').get_attribute("value")
    r = viewer.request.post(f"{site.url}/alerts/{alert.alert_id}/confirm", form={"csrf_token": token})
    assert r.status == 403 and "analyst role" in r.text()

    analyst = session(browser, site, "analyst")
    r = analyst.request.post(f"{site.url}/alerts/{alert.alert_id}/ack", form={"note": "no token"})
    assert r.status == 403 and "CSRF" in r.text()
    analyst.goto(f"{site.url}/alerts/{alert.alert_id}")
    expect(analyst.locator("#alert-status")).to_have_text("new")
    expect(analyst.locator("#activity")).to_contain_text("Nobody has acted on this alert yet.")
    viewer.close()
    analyst.close()


def test_a_held_repeat_says_why_and_an_analyst_restores_it(browser, site):
    """An alert the detectors held at low as a repeat of dismissed alerts (detectors/repeats.py) shows why on
    its page; "Restore to medium" gives it the rules' severity back."""
    import msgspec

    from smtpguard.core.records import iso_of, ms_of

    rule = next(a for a in reversed(site.filled.alerts) if a.src_ip and a.severity == "medium")
    held = msgspec.structs.replace(
        rule, severity="low", created_at=iso_of(ms_of(rule.created_at) + 1),
        evidence={**rule.evidence, "held": {"rule_severity": "medium", "dismissed": 4, "dismissed_top_score": rule.score,
                                            "confirm_probability": 0.06, "model": "verdicts-test"}},
        reasons=[*rule.reasons, "held at low (the rules say medium): the team dismissed this source's earlier alerts"])
    site.store.insert_alerts([held])  # as the detector stores a held repeat
    page = session(browser, site, "analyst")
    page.goto(f"{site.url}/alerts/{rule.alert_id}")
    expect(page.locator(".alert-head h1 .sev")).to_have_text("low")
    expect(page.locator("#held")).to_contain_text("at low as a repeat of 4 dismissed alert(s); the rules say medium")
    expect(page.locator("ul.reasons li").last).to_contain_text("held at low (the rules say medium)")
    shot(page, "held")
    page.get_by_label("Note").fill("new campaign, look again")
    page.get_by_role("button", name="Restore to medium").click()
    expect(page.locator(".flash-ok")).to_contain_text("severity restored from low to medium by analyst")
    expect(page.locator(".alert-head h1 .sev")).to_have_text("medium")
    expect(page.locator("#held")).to_contain_text("restored to medium by analyst")
    expect(page.get_by_role("button", name="Restore to medium")).to_have_count(0)
    expect(page.locator("#activity")).to_contain_text("new campaign, look again")
    page.close()
