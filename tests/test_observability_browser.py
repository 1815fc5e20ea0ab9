"""The overview page in a real browser: headless Chromium (Debian's `chromium`,
driven by Playwright) opens /ui/overview while agents keep calling, is given
the admin token once, and sees the numbers and charts update; a click on a
recent decision shows its trace. Nothing on the page breaks its CSP (no
console errors). The test saves the page as build/screenshots/overview.png
(`make screenshots` refreshes the committed docs/overview.png)."""

from __future__ import annotations

import asyncio
import os
import shutil

import aiohttp
import pytest

from tests.conftest import AGENT_KEY, OTHER_KEY
from tests.support.procs import ADMIN_TOKEN, ROOT, RegateProcess, start_upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = os.environ.get("REGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Into build/ (ignored by git), so `make test` leaves the tree clean; `make screenshots`
# sets REGATE_SCREENSHOTS=docs to refresh the committed one.
SCREENSHOT = ROOT / os.environ.get("REGATE_SCREENSHOTS", "build/screenshots") / "overview.png"


def _require_browser() -> None:
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
        raise RuntimeError(f"{CHROMIUM} not found: install the Debian package chromium "
                           "(apt-get install -y chromium; `make test` does this)")


@pytest.fixture(scope="module")
def regate(keys_file, tmp_path_factory):
    upstream, upstream_url = start_upstream()
    tmp = tmp_path_factory.mktemp("overview-browser")
    cfg = {
        "auth": {"mode": "api_key", "keys": str(keys_file)},
        "policy": {"rego": str(ROOT / "rego"), "data": str(ROOT / "policies")},
        "tools": [{"name": "echo", "upstream": upstream_url}, {"name": "shell", "upstream": upstream_url},
                  {"name": "search", "upstream": upstream_url}],
        "http": {"shutdown_grace_s": 1},
    }
    proc = RegateProcess(cfg, tmp)
    yield proc
    proc.stop()
    upstream.stop()


async def _load(url: str, stop: asyncio.Event) -> None:
    """Agents at work: mostly allowed calls, some refused by the policy (about 60 calls/s)."""
    calls = [("/tools/echo/work", AGENT_KEY, {"n": 1}), ("/tools/search/q", AGENT_KEY, {"q": "x"}),
             ("/tools/echo/report", OTHER_KEY, {"n": 2}), ("/tools/shell/run", AGENT_KEY, {"command": "rm -rf /"}),
             ("/tools/search/q", OTHER_KEY, {"q": "y"}), ("/tools/shell/run", OTHER_KEY, {"command": "ls"})]
    async with aiohttp.ClientSession() as s:
        async def worker(k: int) -> None:
            i = k
            while not stop.is_set():
                path, key, body = calls[i % len(calls)]
                i += 1
                try:
                    async with s.post(url + path, json=body, headers={"X-Api-Key": key}) as r:
                        await r.read()
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.08)

        await asyncio.gather(*(worker(k) for k in range(6)))


async def test_overview_page_updates_under_load(regate):
    _require_browser()
    from playwright.async_api import async_playwright, expect

    async with aiohttp.ClientSession() as s:
        async with s.get(regate.admin_url + "/admin/ui/overview") as r:
            assert r.status == 401  # the /admin/ copy needs the token; /ui/overview is the shell
        async with s.get(regate.admin_url + "/ui/overview") as r:
            assert r.status == 200 and "script-src 'sha256-" in r.headers["Content-Security-Policy"]

    stop = asyncio.Event()
    load = asyncio.create_task(_load(regate.url, stop))
    problems: list[str] = []
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1240, "height": 900})
                page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
                page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
                await page.goto(regate.admin_url + "/ui/overview")
                await page.fill("#token", ADMIN_TOKEN)
                await page.click("#save")
                await expect(page.locator("#status")).to_have_text("live", timeout=5000)

                async def calls() -> int:
                    text = (await page.text_content("#calls")) or "0"
                    return int(float(text.replace(",", "").replace("k", "e3")))

                await expect(page.locator("#p50")).not_to_have_text("–", timeout=8000)
                first = await calls()
                later = first
                for _ in range(80):  # the page's CSP forbids eval, so poll from here
                    await page.wait_for_timeout(100)
                    later = await calls()
                    if later > first:
                        break
                assert later > first > 0  # the numbers move while agents work
                rate = await page.text_content("#rate")
                assert rate not in ("–", "0.0") and float(rate.replace(",", "")) > 0
                await expect(page.locator("#chartRate polyline").first).to_be_attached(timeout=5000)
                await expect(page.locator("#outcomes")).to_contain_text("policy_denied")
                await expect(page.locator("#outcomes")).to_contain_text("forwarded")
                assert (await page.text_content("#revision")).startswith("embedded · sha256:")

                # A recent decision explains itself.
                await page.wait_for_timeout(3000)  # let the charts fill for the screenshot
                row = page.locator("tr.row").first
                decision_id = await row.get_attribute("data-decision-id")
                await row.click()
                await expect(page.locator("#trace")).to_contain_text(decision_id, timeout=5000)
                await expect(page.locator("#trace")).to_contain_text("identify")

                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT), full_page=True)
            finally:
                await browser.close()
    finally:
        stop.set()
        await load
    assert not problems, problems
    assert SCREENSHOT.stat().st_size > 10_000
