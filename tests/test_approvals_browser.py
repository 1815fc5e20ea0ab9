"""The approval inbox in a real browser: headless Chromium (Debian's `chromium`,
driven by Playwright) opens the page, is given the token once, sees held calls
appear live, approves one and denies another, and the agents' calls complete.
The test saves a screenshot of the inbox as build/screenshots/approval-inbox.png
(`make screenshots` refreshes the committed docs/approval-inbox.png)."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from tests.support.approvals import agent_call
from tests.support.procs import ADMIN_TOKEN, ROOT, RegateProcess, start_upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = os.environ.get("REGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Into build/ (ignored by git), so `make test` leaves the tree clean; `make screenshots`
# sets REGATE_SCREENSHOTS=docs to refresh the committed one.
SCREENSHOT = ROOT / os.environ.get("REGATE_SCREENSHOTS", "build/screenshots") / "approval-inbox.png"
PAY = "/tools/payments/pay"


def _require_browser() -> None:
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
        raise RuntimeError(f"{CHROMIUM} not found: install the Debian package chromium "
                           "(apt-get install -y chromium; `make test` does this)")


@pytest.fixture(scope="module")
def regate(keys_file, tmp_path_factory):
    upstream, upstream_url = start_upstream()
    tmp = tmp_path_factory.mktemp("approvals-browser")
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
        "tools": [{"name": "payments", "upstream": upstream_url, "timeout_ms": 5000}],
        "limits": {"enabled": False},
        "approvals": {"mode": "hold", "timeout_s": 300},
        "http": {"shutdown_grace_s": 1},
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()
    upstream.stop()


async def test_inbox_shows_held_calls_live_and_approves_one(regate):
    _require_browser()
    from playwright.async_api import async_playwright, expect

    problems: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1120, "height": 820})
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)

            await page.goto(regate.admin_url + "/ui/approvals")
            # A wrong token is refused and asked for again.
            await page.fill("#token", "not-the-token")
            await page.click("#save")
            await expect(page.locator("#loginError")).to_contain_text("refused", timeout=5000)
            problems.clear()  # the 401 shows up as a console error; it is expected here
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("#save")
            await expect(page.locator("#status")).to_have_text("live", timeout=5000)
            await expect(page.locator("#empty")).to_be_visible()
            await page.fill("#approver", "alice")

            older = asyncio.create_task(agent_call(regate.url, PAY, {
                "amount": 180, "currency": "USD", "to": "Office Supplies Ltd", "invoice": "INV-1042"}))
            cards = page.locator("[data-approval-id]")
            await expect(cards).to_have_count(1, timeout=5000)
            newer = asyncio.create_task(agent_call(regate.url, PAY, {
                "amount": 2400, "currency": "USD", "to": "Acme Cloud GmbH", "invoice": "INV-2291",
                "lines": [{"item": "GPU hours", "qty": 120, "unit_price": 20}]}))
            await expect(cards).to_have_count(2, timeout=5000)
            # Newest first, with agent, tool, reason, arguments and time left.
            newest_id = await cards.nth(0).get_attribute("data-approval-id")
            first = page.locator(f'[data-approval-id="{newest_id}"]')
            await expect(first).to_contain_text("analyst-2 → payments")
            await expect(first).to_contain_text("A payment of 2400 USD is above the 100 USD")
            await expect(first.locator("pre")).to_contain_text('"Acme Cloud GmbH"')
            await expect(first.locator("[data-role=left]")).to_contain_text("left")
            await expect(cards.nth(1)).to_contain_text("Office Supplies Ltd")
            assert not older.done() and not newer.done()

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            await first.locator("[data-role=comment]").fill("Cloud invoice matches the PO")
            await first.locator("[data-role=approve]").click()
            await expect(first.locator("[data-role=result]")).to_have_text("Approved by alice", timeout=5000)
            status, headers, echoed = await asyncio.wait_for(newer, 5)
            assert status == 200 and "Acme Cloud GmbH" in echoed["body"]

            second = page.locator("[data-approval-id]", has_text="Office Supplies Ltd")
            await second.locator("[data-role=comment]").fill("Use the supplies budget instead")
            await second.locator("[data-role=deny]").click()
            status, _, body = await asyncio.wait_for(older, 5)
            assert status == 403 and "Use the supplies budget instead" in body["error"]["message"]
            await expect(cards).to_have_count(0, timeout=10000)
            await expect(page.locator("#empty")).to_be_visible()

            # The token was entered once: a reload keeps it (sessionStorage).
            await page.reload()
            await expect(page.locator("#status")).to_have_text("live", timeout=5000)
            await expect(page.locator("#login")).to_be_hidden()
        finally:
            await browser.close()
    assert not problems, problems
    assert SCREENSHOT.stat().st_size > 10_000
