"""The dashboard as a person sees it: rendered by headless Chromium (Debian's, via Playwright),
after signing in with the operator token through its form.

The screenshot is kept as ``tests/artifacts/sidecar-dashboard.png`` (gitignored).
"""

import asyncio
import dataclasses
import time

from aiohttp import web
from aiohttp.test_utils import TestClient
from playwright.async_api import async_playwright
from redis.asyncio import Redis

from shared.appkeys import CHECKER
from shared.keys import Keys
from shared.settings import SidecarSettings
from sidecar.app import create_app
from tests.support.env import AiohttpClient, Device
from tests.support.paths import ROOT_DIR
from tests.support.procs import free_port
from tests.support.sidecar import CHROMIUM_BIN, http_record, xadd_batch

Client = TestClient[web.Request, web.Application]
ARTIFACTS = ROOT_DIR / "tests" / "artifacts"
OPERATOR = "operator-token-for-tests"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def add_history(redis: Redis, keys: Keys, pod: str) -> None:
    """Fifteen minutes of traffic, a burst of errors and a slow spell in the middle."""
    now_ms = time.time_ns() // 1_000_000
    for i in range(90):
        busy = 40 + (i % 7) * 5
        failing = 6 if 40 <= i < 46 else 0
        slow = 30_000 if 60 <= i < 66 else 600
        records = [http_record(duration_us=slow + (n % 10) * 50) for n in range(busy)]
        records += [http_record(status=503, duration_us=900)] * failing
        records += [http_record(status=422, samples=0)] * 2
        await xadd_batch(redis, keys, pod, records, sent_ms=now_ms - (90 - i) * 10_000)


async def test_the_dashboard_shows_each_component_including_a_failed_one(
    client: Client,
    device: Device,
    aiohttp_client: AiohttpClient,
    sidecar_settings: SidecarSettings,
    redis: Redis,
    keys: Keys,
) -> None:
    await add_history(redis, keys, sidecar_settings.pod)
    for seq in range(3):
        await client.post("/ingestion/ppg", json=device.batch(seq), headers=device.headers)
    closed_postgres = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    sidecar = await aiohttp_client(
        create_app(
            dataclasses.replace(
                sidecar_settings,
                database_url=closed_postgres,
                environment="production",
                health_detail_token=OPERATOR,
            )
        )
    )
    async with asyncio.timeout(5):
        while not all(r.checked_at > 0 for r in sidecar.app[CHECKER].results.values()):
            await asyncio.sleep(0.05)
    ARTIFACTS.mkdir(exist_ok=True)

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM_BIN, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            signin = await page.goto(str(sidecar.make_url("/")))
            assert signin is not None
            signin_status = signin.status
            await page.fill("#token", OPERATOR)
            await page.click("button[type=submit]")
            await page.wait_for_selector("#live")
            # The live part replaces itself in place: wait for one refresh, no reload.
            await page.wait_for_function(
                "Number(document.getElementById('live').dataset.refreshes) >= 1",
                timeout=10_000,
            )
            cards = await page.eval_on_selector_all(
                "[data-component]",
                "cards => cards.map(c => [c.dataset.component, c.dataset.status, c.innerText])",
            )
            verdict = await page.inner_text(".overall .verdict")
            chart_paths = await page.eval_on_selector_all(
                ".chart path.line", "paths => paths.map(p => p.getAttribute('d'))"
            )
            await page.screenshot(path=str(ARTIFACTS / "sidecar-dashboard.png"), full_page=True)
        finally:
            await browser.close()

    assert signin_status == 401
    statuses = {name: status for name, status, _ in cards}
    texts = {name: text for name, _, text in cards}
    assert statuses == {
        "service": "up",
        "redis": "up",
        "database": "down",
        "ai-services": "up",
        "memory_heap": "up",
        "memory_rss": "up",
        "disk": "up",
    }
    assert "refused" in texts["database"].lower()
    assert "checked " in texts["redis"]
    assert "ms" in texts["redis"]
    assert verdict.strip() == "1 component down"
    assert len(chart_paths) == 4
    assert all(d and d.startswith("M") for d in chart_paths)
    assert (ARTIFACTS / "sidecar-dashboard.png").stat().st_size > 10_000
