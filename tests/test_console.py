"""The web console at GET /, used as a person would: Debian's chromium driven by Playwright
against a real stack (Redis, API, 2 workers). Screenshots go to docs/console-*.png with ORCH_UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Browser, Page, WebSocket
from support import Api

ROOT = Path(__file__).resolve().parent.parent
# the README's pictures are refreshed with ORCH_UPDATE_SCREENSHOTS=1; other runs leave docs/ alone
DOCS = ROOT / "docs" if os.environ.get("ORCH_UPDATE_SCREENSHOTS") == "1" else Path(tempfile.mkdtemp(prefix="console-"))
VIEWPORT = {"width": 1280, "height": 900}


class Console:
    """One browser page on the console, with what it did on the wire."""

    def __init__(self, page: Page, base: str, key: str) -> None:
        self.page, self.base, self.key = page, base, key
        self.errors: list[str] = []
        self.sockets: list[WebSocket] = []
        self.closed: set[int] = set()
        self.max_open = 0
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("websocket", self._on_socket)

    def _on_socket(self, ws: WebSocket) -> None:
        i = len(self.sockets)
        self.sockets.append(ws)
        self.max_open = max(self.max_open, len(self.sockets) - len(self.closed))
        ws.on("close", lambda _ws: self.closed.add(i))

    async def open(self) -> None:
        await self.page.goto(f"{self.base}/#key={self.key}")
        await self.ready()

    async def ready(self) -> None:
        await self.page.wait_for_selector("body[data-ready='1']", timeout=15_000)

    def card(self, job_id: str) -> Any:
        return self.page.locator(f"article.job[data-job-id='{job_id}']")

    async def submit(self, queue: str, type_: str, fields: dict[str, str]) -> str:
        page = self.page
        await page.click(f"#queue-tabs [data-queue='{queue}']")
        await page.select_option("#type-select", type_)
        for name, value in fields.items():
            await page.fill(f"#f-{name}", value)
        before = await page.locator("article.job").count()
        await page.click("#submit-btn")
        await page.wait_for_function(
            "n => document.querySelectorAll('article.job').length > n", arg=before, timeout=10_000
        )
        job_id = await page.locator("article.job").first.get_attribute("data-job-id")
        assert job_id
        assert await self.card(job_id).get_attribute("data-type") == type_
        return job_id

    async def wait_status(self, job_id: str, status: str, timeout_ms: int = 60_000) -> None:
        await self.page.wait_for_selector(
            f"article.job[data-job-id='{job_id}'][data-status='{status}']", timeout=timeout_ms
        )

    async def progress(self, job_id: str) -> float:
        value = await self.card(job_id).locator(".progress").get_attribute("data-progress")
        return float(value or 0)

    async def wait_progress(self, job_id: str, at_least: float, timeout_ms: int = 90_000) -> None:
        await self.page.wait_for_function(
            """([id, p]) => {
              const bar = document.querySelector(`article.job[data-job-id='${id}'] .progress`);
              return bar && Number(bar.dataset.progress) >= p;
            }""",
            arg=[job_id, at_least],
            timeout=timeout_ms,
        )

    async def credits(self) -> int:
        return int(re.sub(r"\D", "", await self.page.inner_text("#credits")) or 0)

    async def wait_credits(self, expected: int, timeout_ms: int = 10_000) -> None:
        await self.page.wait_for_function(
            "n => Number(document.querySelector('#credits').textContent.replace(/\\D/g, '')) === n",
            arg=expected,
            timeout=timeout_ms,
        )

    async def chart_points(self, job_id: str) -> int:
        return int(await self.card(job_id).locator("canvas.loss-chart").get_attribute("data-points") or 0)

    async def chart_ink(self, job_id: str) -> int:
        """Painted pixels on the loss chart's canvas (its background is CSS, the canvas is clear)."""
        return int(
            await self.card(job_id)
            .locator("canvas.loss-chart")
            .evaluate(
                """c => {
                  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let n = 0;
                  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                  return n;
                }"""
            )
        )

    async def chart_steps(self, job_id: str) -> list[int]:
        return list(await self.page.evaluate("id => window.__console.chartSteps(id)", job_id))

    async def loss_events(self, job_id: str) -> list[int]:
        """The steps of the job's stored progress events that carry a loss (its history)."""
        return list(
            await self.page.evaluate(
                """async id => (await window.__console.client.events(id)).events
                  .filter((e) => e.type === 'progress' && e.data && typeof e.data.loss === 'number')
                  .map((e) => e.data.step)""",
                job_id,
            )
        )

    async def screenshot(self, name: str, job_id: str | None = None) -> None:
        await self.page.evaluate("() => { document.querySelector('#toast').hidden = true; }")
        await self.page.wait_for_timeout(150)  # let the last frame paint
        if job_id:
            await self.card(job_id).screenshot(path=str(DOCS / name))
        else:
            await self.page.screenshot(path=str(DOCS / name), full_page=True)

    async def conn_state(self) -> str:
        return str(await self.page.get_attribute("#conn", "data-state"))


async def new_console(browser: Browser, stack: Any, credits: int = 1000) -> Console:
    user = await stack.user(credits=credits)
    page = await browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(30_000)
    return Console(page, stack.url, user.api_key)


async def test_train_and_generate_live(stack: Any, browser: Browser) -> None:
    con = await new_console(browser, stack)
    page = con.page
    await con.open()
    assert "key=" not in page.url  # the key moved from the URL to localStorage
    assert await con.credits() == 1000
    # the forms come from /api/types: defaults and bounds from the input schema
    assert await page.input_value("#f-steps") == "200"
    assert await page.get_attribute("#f-steps", "max") == "100000"
    assert await page.get_attribute("#f-rank", "min") == "1"

    image = await con.submit("generate", "image", {"prompt": "a red fox in the snow, watercolor"})
    lora = await con.submit("train", "lora", {"name": "console-adapter", "steps": "2000", "learningRate": "0.001"})
    await con.wait_credits(1000 - 10 - 2)

    # the image appears when its job completes
    await con.wait_status(image, "completed", 90_000)
    await page.wait_for_function(
        """id => {
          const img = document.querySelector(`article.job[data-job-id='${id}'] img.result-image`);
          return img && img.complete && img.naturalWidth > 0;
        }""",
        arg=image,
        timeout=15_000,
    )
    assert await con.progress(image) == 100
    assert await con.card(image).locator(".pct").inner_text() == "100 %"

    # the loss chart grows while the lora job runs
    await con.wait_progress(lora, 40)
    assert await con.chart_points(lora) > 1
    assert await con.conn_state() == "open"
    assert await page.inner_text("#conn .label") == "live"
    await con.screenshot("console-live.png")

    await con.wait_status(lora, "completed", 180_000)
    assert await con.progress(lora) == 100
    assert await con.card(lora).locator(".pct").inner_text() == "100 %"
    assert await con.card(lora).locator(".badge").inner_text() == "Completed"
    steps = await con.chart_steps(lora)
    assert len(steps) > 1 and steps == sorted(set(steps))
    assert steps == await con.loss_events(lora)  # one point per progress event: none lost, none doubled
    assert await con.chart_ink(lora) > 500
    href = await con.card(lora).locator("a.artifact").get_attribute("href")
    assert href and href.endswith(".safetensors")
    assert "final loss" in await con.card(lora).locator(".result").inner_text()
    assert not await con.card(lora).locator(".cancel").is_visible()

    # every live job shared one socket; it closed once nothing was left to follow
    assert len(con.sockets) >= 1 and con.max_open == 1
    await page.wait_for_function("() => document.querySelector('#conn').dataset.state === 'idle'")
    await con.wait_credits(988)
    await con.screenshot("console-completed.png")
    assert not con.errors


async def test_reload_mid_job_resumes(stack: Any, browser: Browser) -> None:
    con = await new_console(browser, stack)
    page = con.page
    await con.open()
    lora = await con.submit("train", "lora", {"name": "resume-me", "steps": "4000", "learningRate": "0.001"})
    await con.wait_progress(lora, 10)
    before = await con.progress(lora)
    assert before < 100, "the job finished before the reload; make it longer"
    await page.wait_for_timeout(300)  # the console saves its position (seq and chart) every 200 ms

    await page.reload()
    await con.ready()
    resumed_from = await page.evaluate("id => window.__console.resumedFrom[id]", lora)
    assert resumed_from > 2, "the running job should resume from its last seq, not from 0"
    restored = len(await con.chart_steps(lora))  # restored from the saved position
    assert restored > 1
    assert await con.progress(lora) >= before or await con.card(lora).get_attribute("data-status") == "completed"

    await con.wait_status(lora, "completed", 180_000)
    assert await con.progress(lora) == 100
    steps = await con.chart_steps(lora)
    assert steps == await con.loss_events(lora)  # restored + resumed: every step exactly once
    assert await con.chart_points(lora) == len(steps)
    assert not con.errors


async def test_cancel_and_reconnect(stack: Any, browser: Browser) -> None:
    con = await new_console(browser, stack)
    page = con.page
    await con.open()
    job = await con.submit("generate", "sleep", {"seconds": "30", "ticks": "60"})
    assert "fails" not in await con.card(job).locator(".job-title").inner_text()  # the unticked box is false
    await con.wait_status(job, "running", 15_000)
    await con.wait_progress(job, 2)

    # a dropped connection shows, and heals by itself
    states_before = await page.evaluate("() => window.__console.states.length")
    await page.evaluate("() => window.__console.client._debug.drop()")
    await page.wait_for_function(
        """n => {
          const s = window.__console.states.slice(n);
          return s.includes('reconnecting') && s[s.length - 1] === 'open';
        }""",
        arg=states_before,
        timeout=15_000,
    )
    assert await page.inner_text("#conn .label") == "live"
    progress = await con.progress(job)
    await con.wait_progress(job, progress + 2)  # still live after the reconnect

    await con.card(job).locator("button.cancel").click()
    await con.wait_status(job, "cancelled", 10_000)
    assert await con.card(job).locator(".badge").inner_text() == "Cancelled"
    assert "CANCELLED" in await con.card(job).locator(".job-error").inner_text()
    await con.wait_credits(1000)  # refunded
    await con.screenshot("console-cancelled.png", job)
    assert not con.errors


async def test_history_paging_and_validation(stack: Any, browser: Browser) -> None:
    con = await new_console(browser, stack)
    page = con.page
    # 13 finished jobs through the API, then the console pages through them (10 a page)
    async with aiohttp.ClientSession() as session:
        api = Api(session, con.base, con.key)
        ids = [(await api.submit("generate", {"seconds": 0, "ticks": 0}, type="sleep"))["jobId"] for _ in range(13)]
        for job_id in ids:
            await api.wait(job_id, 30)

    await con.open()
    assert await page.locator("article.job").count() == 10
    assert await page.locator("#load-more").is_visible()
    await page.click("#load-more")
    await page.wait_for_function("() => document.querySelectorAll('article.job').length === 13")
    assert not await page.locator("#load-more").is_visible()
    shown = await page.eval_on_selector_all("article.job", "cards => cards.map((c) => c.dataset.jobId)")
    assert shown == list(reversed(ids))  # newest first, no duplicates across pages
    badges = await page.eval_on_selector_all("article.job .badge", "bs => bs.map((b) => b.textContent)")
    assert set(badges) == {"completed"}

    # a value the server rejects is shown on its field
    await page.click("#queue-tabs [data-queue='train']")
    await page.fill("#f-name", "not a valid name!")
    await page.click("#submit-btn")
    await page.wait_for_selector(".field[data-field='name'].invalid", timeout=10_000)
    assert "pattern" in await page.inner_text(".field[data-field='name'] .field-error")
    assert await page.locator("article.job").count() == 13
    assert not con.errors


async def test_asks_for_a_key(stack: Any, browser: Browser) -> None:
    user = await stack.user(credits=50)
    page = await browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{stack.url}/")
    await page.wait_for_selector("#login-form", state="visible", timeout=15_000)
    await page.screenshot(path=str(DOCS / "console-login.png"))
    await page.fill("#api-key", "ok_wrong")
    await page.click("#login-form button[type=submit]")
    await page.wait_for_selector("#login-error:not([hidden])", timeout=15_000)
    assert "not accepted" in await page.inner_text("#login-error")
    await page.fill("#api-key", user.api_key)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    assert await page.inner_text("#credits") == "50"
    assert await page.evaluate("() => localStorage.getItem('orchestrator.apiKey')") == user.api_key
    await page.click("#signout")
    await page.wait_for_selector("#login-form", state="visible", timeout=15_000)
    assert await page.evaluate("() => localStorage.getItem('orchestrator.apiKey')") is None
    assert not errors
