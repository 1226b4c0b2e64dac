"""The JavaScript client (/static/client.js) run in Debian's chromium, driven by Playwright,
against a real stack (Redis, API, 2 workers)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from playwright.async_api import Browser, Page, WebSocket
from support import Stack

# Loaded once per page: the module under test plus small helpers, every wait bounded.
HARNESS = """
async (key) => {
  const m = await import('/static/client.js');
  window.M = m;
  window.KEY = key;
  window.client = m.createClient({ baseUrl: '', token: key, backoff: { initialMs: 100, maxMs: 1000 } });
  window.withTimeout = (p, ms, what) => Promise.race([
    p, new Promise((_, rej) => setTimeout(() => rej(new Error('timed out: ' + what)), ms)),
  ]);
  window.until = async (cond, ms, what) => {
    const t0 = Date.now();
    while (!cond()) {
      if (Date.now() - t0 > ms) throw new Error('timed out: ' + what);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  // follow(client, jobId) → {msgs, done (resolves at the final event or an error), stop()}
  window.follow = (client, jobId, opts = {}) => {
    const msgs = [];
    let stop;
    const done = new Promise((resolve) => {
      stop = client.subscribe(jobId, (msg) => {
        msgs.push(msg);
        if (opts.onMsg) opts.onMsg(msg, msgs);
        if (m.isFinalEvent(msg) || msg.type === 'error') resolve(msgs);
      }, { since: opts.since || 0 });
    });
    return { msgs, done, stop: () => stop() };
  };
  window.sleepJob = (input) => window.client.submit('generate', input, { type: 'sleep' });
  return true;
}
"""


@dataclass
class Sockets:
    """WebSockets the page opened, as Playwright saw them on the wire."""

    opened: list[WebSocket] = field(default_factory=list)
    sent: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)

    def attach(self, page: Page) -> None:
        page.on("websocket", self._on_socket)

    def _on_socket(self, ws: WebSocket) -> None:
        i = len(self.opened)
        self.opened.append(ws)
        self.sent[i] = []
        ws.on("framesent", lambda payload: self.sent[i].append(json.loads(payload)))
        ws.on("close", lambda _ws: self.closed.add(i))

    @property
    def open_count(self) -> int:
        return len(self.opened) - len(self.closed)


async def open_page(browser: Browser, stack: Any, credits: int = 1000) -> tuple[Page, Sockets, list[str]]:
    user = await stack.user(credits=credits)
    page = await browser.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sockets = Sockets()
    sockets.attach(page)
    await page.goto(f"{stack.url}/healthz")
    assert await page.evaluate(HARNESS, user.api_key)
    return page, sockets, errors


async def all_sockets_closed(page: Page, sockets: Sockets, timeout_s: float = 5) -> bool:
    for _ in range(int(timeout_s * 10)):
        if sockets.open_count == 0:
            return True
        await page.wait_for_timeout(100)
    return False


def assert_in_order(msgs: list[dict[str, Any]], since: int = 0) -> list[int]:
    """Events (not control messages) have consecutive seqs from since+1, end with the final event."""
    seqs = [m["seq"] for m in msgs if m.get("type") in ("status", "progress", "log")]
    assert seqs == list(range(since + 1, since + 1 + len(seqs))), seqs
    last = [m for m in msgs if "seq" in m][-1]
    assert last["type"] == "status" and last["status"] in {"completed", "failed", "cancelled", "timed_out"}
    return seqs


async def test_rest_calls(stack: Any, browser: Browser) -> None:
    page, sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const c = window.client;
          const out = {};
          const job = await c.submit('generate', { seconds: 20, ticks: 20 }, { type: 'sleep' });
          out.submitted = job;
          out.got = await c.get(job.jobId);
          const img = await c.submit('generate', { prompt: 'a red fox', width: 64, height: 64, steps: 2 });
          out.imageType = img.type;
          const page1 = await c.list({ limit: 1 });
          const page2 = await c.list({ limit: 1, cursor: page1.nextCursor });
          out.pages = [page1.jobs.map((j) => j.jobId), page2.jobs.map((j) => j.jobId), !!page1.nextCursor];
          out.filtered = (await c.list({ type: 'sleep' })).jobs.map((j) => j.jobId);
          out.cancelled = await c.cancel(job.jobId);
          try { await c.cancel(job.jobId); } catch (e) {
            out.cancelAgain = { name: e.name, status: e.status, code: e.code, isErr: e instanceof M.OrchestratorError };
          }
          try { await c.submit('train', { name: 'bad name!', steps: 0 }); } catch (e) {
            out.invalid = { status: e.status, code: e.code, fields: (e.details || []).map((d) => d.field).sort() };
          }
          try { await c.submit('train', { name: 'x' }, { type: 'sleep' }); } catch (e) {
            out.wrongQueue = { status: e.status, code: e.code };
          }
          const bad = M.createClient({ token: 'ok_not_a_key' });
          try { await bad.me(); } catch (e) { out.badKey = { status: e.status, code: e.code }; }
          const none = M.createClient({});
          try { await none.list(); } catch (e) { out.noKey = e.code; }
          out.me = await c.me();
          out.types = (await c.types()).types.map((t) => t.type);
          out.token = await c.createToken({ ttlSeconds: 60 });
          out.events = (await c.events(job.jobId)).events.map((e) => e.seq);
          out.eventsAfter = (await c.events(job.jobId, { after: 1 })).events.map((e) => e.seq);
          out.imageDone = await c.wait(img.jobId, { timeoutMs: 30000 });
          return out;
        }"""
    )
    sub = got["submitted"]
    assert sub["status"] == "queued" and sub["type"] == "sleep" and sub["queue"] == "generate"
    assert got["got"]["jobId"] == sub["jobId"]
    assert got["imageType"] == "image"
    p1, p2, has_next = got["pages"]
    assert has_next and len(p1) == 1 and len(p2) == 1 and p1 != p2
    assert got["filtered"] == [sub["jobId"]]
    assert got["cancelled"]["status"] == "cancelled"
    assert got["cancelAgain"] == {"name": "OrchestratorError", "status": 409, "code": "JOB_FINISHED", "isErr": True}
    assert got["invalid"] == {"status": 422, "code": "VALIDATION_ERROR", "fields": ["input.name", "input.steps"]}
    assert got["wrongQueue"]["status"] == 422
    assert got["badKey"] == {"status": 401, "code": "UNAUTHORIZED"}
    assert got["noKey"] == "NO_API_KEY"
    assert got["me"]["credits"] == 1000 - 1 - 2 + 1  # sleep refunded on cancel, image charged
    assert {"lora", "image", "sleep"} <= set(got["types"])
    assert got["token"]["token"].startswith("st_")
    assert got["events"][0] == 1 and got["eventsAfter"] == got["events"][1:]
    done = got["imageDone"]
    assert done["status"] == "completed" and done["progress"] == 100
    assert done["result"]["artifacts"][0]["contentType"] == "image/png"
    assert await all_sockets_closed(page, sockets)  # wait() closed its socket when it finished
    assert not errors


async def test_subscribe_delivers_every_event_in_order(stack: Any, browser: Browser) -> None:
    page, sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const job = await sleepJob({ seconds: 1.5, ticks: 12 });
          const f = follow(client, job.jobId);
          await withTimeout(f.done, 30000, 'final event');
          f.stop();
          const history = (await client.events(job.jobId)).events;
          let folded = null;
          for (const msg of f.msgs) folded = M.applyEvent(folded, msg);
          return { msgs: f.msgs, history, folded, final: await client.get(job.jobId) };
        }"""
    )
    msgs = got["msgs"]
    assert msgs[0]["type"] == "subscribed" and msgs[0]["job"]["jobId"] == got["final"]["jobId"]
    events = [m for m in msgs if m["type"] != "subscribed"]
    assert_in_order(msgs)
    assert events == got["history"]  # the same objects as the stored history
    assert [m for m in events if m["type"] == "progress"], "no progress events"
    assert events[-1]["status"] == "completed"
    folded = got["folded"]
    assert folded["status"] == "completed" and folded["progress"] == 100
    assert folded["seq"] == got["final"]["seq"]
    assert folded["result"] == got["final"]["result"]
    assert len(sockets.opened) == 1
    assert not errors


async def test_one_shared_socket_reference_counted(stack: Any, browser: Browser) -> None:
    page, sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const a = await sleepJob({ seconds: 3, ticks: 6 });
          const b = await sleepJob({ seconds: 3, ticks: 6 });
          const fa = follow(client, a.jobId);
          const fb = follow(client, b.jobId);
          await until(() => fa.msgs.length && fb.msgs.length, 15000, 'both subscribed');
          const both = { created: client._debug.stats.socketsCreated, state: client.state,
                         subs: client._debug.subscriptions.length };
          // a second subscriber on job a, late: it gets its own replay; the first sees no duplicate
          const fa2 = follow(client, a.jobId);
          await until(() => fa2.msgs.some((m) => m.seq === 1), 15000, 'late replay');
          fa.stop();
          await new Promise((r) => setTimeout(r, 300));
          const afterFirst = { open: client._debug.socket && client._debug.socket.readyState, state: client.state };
          fa2.stop();
          await new Promise((r) => setTimeout(r, 300));
          const afterA = { open: client._debug.socket && client._debug.socket.readyState, state: client.state };
          await withTimeout(fb.done, 30000, 'job b final');
          fb.stop();
          await until(() => client.state === 'idle' && client._debug.socket === null, 5000, 'socket closed');
          return { both, afterFirst, afterA, fa: fa.msgs, fa2: fa2.msgs, fb: fb.msgs,
                   created: client._debug.stats.socketsCreated };
        }"""
    )
    assert got["both"] == {"created": 1, "state": "open", "subs": 2}
    assert got["afterFirst"] == {"open": 1, "state": "open"}
    assert got["afterA"] == {"open": 1, "state": "open"}
    assert got["created"] == 1
    seq_a = [m["seq"] for m in got["fa"] if "seq" in m]
    assert len(seq_a) == len(set(seq_a)) and seq_a == sorted(seq_a)
    seq_a2 = [m["seq"] for m in got["fa2"] if "seq" in m]
    assert seq_a2[0] == 1 and seq_a2 == list(range(1, len(seq_a2) + 1))
    assert_in_order(got["fb"])
    # on the wire: one socket, subscribe/unsubscribe messages, then closed after the last unsubscribe
    assert len(sockets.opened) == 1
    assert await all_sockets_closed(page, sockets)
    kinds = [(m["type"], m.get("jobId")) for m in sockets.sent[0] if m["type"] != "ping"]
    a_id, b_id = got["fa"][0]["jobId"], got["fb"][0]["jobId"]
    assert kinds[:2] == [("subscribe", a_id), ("subscribe", b_id)] or kinds[:2] == [
        ("subscribe", b_id),
        ("subscribe", a_id),
    ]
    assert ("unsubscribe", a_id) in kinds
    assert "token=st_" in sockets.opened[0].url  # a subscribe token, never the API key
    assert not errors


async def test_resumes_after_a_drop_without_duplicates(stack: Any, browser: Browser) -> None:
    page, sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const job = await sleepJob({ seconds: 3, ticks: 30 });
          const states = [];
          client.onStateChange((s) => states.push(s));
          let dropped = false;
          const f = follow(client, job.jobId, {
            onMsg: (msg) => {
              if (!dropped && msg.type === 'progress' && msg.seq >= 6) { dropped = true; client._debug.drop(); }
            },
          });
          await withTimeout(f.done, 30000, 'final event');
          f.stop();
          return { msgs: f.msgs, states, stats: { ...client._debug.stats },
                   history: (await client.events(job.jobId)).events.map((e) => e.seq) };
        }"""
    )
    seqs = assert_in_order(got["msgs"])
    assert seqs == got["history"]
    assert [m["type"] for m in got["msgs"]].count("subscribed") == 2  # a fresh snapshot after reconnecting
    assert got["stats"]["socketsCreated"] == 2
    assert "reconnecting" in got["states"] and got["states"][-1] == "idle"
    assert got["states"][got["states"].index("reconnecting") + 1 :].count("open") >= 1
    # the second socket resumed from the last seq the client had seen
    assert len(sockets.opened) == 2
    resume = [m for m in sockets.sent[1] if m["type"] == "subscribe"]
    assert resume and resume[0]["since"] >= 6, resume
    assert not errors


async def test_forced_polling_transport(stack: Any, browser: Browser) -> None:
    page, sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const c = M.createClient({ token: KEY, transport: 'poll', pollWaitSeconds: 5 });
          const states = [];
          c.onStateChange((s) => states.push(s));
          const job = await c.submit('generate', { seconds: 1.5, ticks: 8 }, { type: 'sleep' });
          const f = follow(c, job.jobId);
          const transport = c.transport;
          await withTimeout(f.done, 30000, 'final event');
          f.stop();
          return { msgs: f.msgs, states, transport, stats: { ...c._debug.stats },
                   history: (await c.events(job.jobId)).events };
        }"""
    )
    assert got["transport"] == "poll"
    assert got["msgs"][0]["type"] == "subscribed"
    assert_in_order(got["msgs"])
    assert [m for m in got["msgs"] if m["type"] != "subscribed"] == got["history"]  # real events
    assert got["states"] == ["polling", "idle"]
    assert got["stats"]["polls"] >= 1 and got["stats"]["socketsCreated"] == 0
    assert sockets.opened == []
    assert not errors


async def test_falls_back_to_polling_when_sockets_are_blocked(stack: Any, browser: Browser) -> None:
    page, _sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          // every socket goes to a closed port: connection refused, as behind a proxy without upgrades
          class Blocked extends WebSocket { constructor() { super('ws://127.0.0.1:9/ws'); } }
          const c = M.createClient({ token: KEY, WebSocket: Blocked, maxSocketFailures: 2,
                                     backoff: { initialMs: 50, maxMs: 200 }, pollWaitSeconds: 5 });
          const states = [];
          c.onStateChange((s) => states.push(s));
          const job = await c.submit('generate', { seconds: 1, ticks: 5 }, { type: 'sleep' });
          const f = follow(c, job.jobId);
          await withTimeout(f.done, 30000, 'final event');
          const transport = c.transport;
          f.stop();
          return { msgs: f.msgs, states, transport, stats: { ...c._debug.stats } };
        }"""
    )
    assert_in_order(got["msgs"])
    assert got["msgs"][0]["type"] == "subscribed"
    assert got["transport"] == "poll"
    assert got["stats"]["socketsCreated"] >= 2  # two failures, then probes in the background
    assert got["states"][:3] == ["connecting", "reconnecting", "polling"]
    assert got["states"][-1] == "idle"
    assert not errors


async def test_browser_without_api_key(stack: Any, browser: Browser) -> None:
    """A browser holding no API key (the Next.js setup): it follows jobs with subscribe tokens from
    its own backend, scoped to the socket's jobs; forced off the socket, it reads the SSE stream."""
    page, _sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const a = await sleepJob({ seconds: 2, ticks: 8 });
          const b = await sleepJob({ seconds: 1, ticks: 4 });
          const scopes = [];
          // stands in for the app's backend route, which holds the API key
          const mint = async ({ jobIds }) => {
            scopes.push(jobIds);
            return client.createToken({ jobIds, ttlSeconds: 60 });
          };
          const viaSocket = M.createClient({ subscribeToken: mint, backoff: { initialMs: 50, maxMs: 200 } });
          const viaSse = M.createClient({ subscribeToken: mint, transport: 'poll' });
          const fa = follow(viaSocket, a.jobId);
          await until(() => fa.msgs.length > 0, 15000, 'a subscribed');
          const fb = follow(viaSocket, b.jobId);  // not in the first token: one reconnect, then live
          const fs = follow(viaSse, a.jobId);
          const transport = viaSse.transport;
          await withTimeout(Promise.all([fa.done, fb.done, fs.done]), 30000, 'final events');
          fa.stop(); fb.stop(); fs.stop();
          let denied = null;
          try { await viaSse.submit('generate', { seconds: 0 }, { type: 'sleep' }); } catch (e) { denied = e.code; }
          return { fa: fa.msgs, fb: fb.msgs, fs: fs.msgs, transport, denied, scopes,
                   sockets: viaSocket._debug.stats.socketsCreated };
        }"""
    )
    assert got["transport"] == "sse"
    assert got["denied"] == "NO_API_KEY"
    sa = assert_in_order(got["fa"])
    assert_in_order(got["fb"])
    assert assert_in_order(got["fs"]) == sa
    assert got["fa"][0]["type"] == got["fb"][0]["type"] == got["fs"][0]["type"] == "subscribed"
    assert all(m["type"] != "error" for m in got["fa"] + got["fb"] + got["fs"])
    a_id, b_id = got["fa"][0]["jobId"], got["fb"][0]["jobId"]
    assert [a_id] in got["scopes"] and sorted([a_id, b_id]) in [sorted(s) for s in got["scopes"]]
    assert got["sockets"] == 2
    assert not errors


async def test_unknown_job_and_wait(stack: Any, browser: Browser) -> None:
    page, _sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const f = follow(client, 'no-such-job-000000000000');
          await withTimeout(f.done, 15000, 'error message');
          f.stop();
          let waitErr = null;
          try { await client.wait('no-such-job-000000000000', { timeoutMs: 15000 }); }
          catch (e) { waitErr = { status: e.status, code: e.code }; }
          const job = await sleepJob({ seconds: 0.3, ticks: 3, fail: true });
          const failed = await client.wait(job.jobId, { timeoutMs: 30000 });
          let timeout = null;
          const slow = await sleepJob({ seconds: 30, ticks: 1 });
          try { await client.wait(slow.jobId, { timeoutMs: 300 }); } catch (e) { timeout = e.code; }
          await client.cancel(slow.jobId);
          await until(() => client.state === 'idle', 5000, 'idle');
          return { msgs: f.msgs, waitErr, failed, timeout };
        }"""
    )
    assert got["msgs"][-1]["type"] == "error" and got["msgs"][-1]["code"] == "NOT_FOUND"
    assert got["waitErr"] == {"status": 404, "code": "NOT_FOUND"}
    assert got["failed"]["status"] == "failed" and got["failed"]["error"]["code"] == "TASK_ERROR"
    assert got["timeout"] == "TIMEOUT"
    assert not errors


async def test_static_files_are_served_with_their_types(stack: Any, http: Any) -> None:
    want = {
        "client.js": "text/javascript",
        "client.d.ts": "application/typescript",
        "console.css": "text/css",
        "index.html": "text/html",
    }
    for name, ctype in want.items():
        async with http.get(f"{stack.url}/static/{name}") as r:
            assert r.status == 200, name
            assert r.headers["Content-Type"].split(";")[0] == ctype, name
            assert len(await r.read()) > 0
    async with http.get(f"{stack.url}/static/missing.js") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"


async def test_returns_to_the_socket_after_a_fallback_and_never_goes_backwards(stack: Any, browser: Browser) -> None:
    page, _sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          window.blockWs = true;  // a proxy refusing upgrades, for a while
          class Flaky extends WebSocket {
            constructor(url) { super(window.blockWs ? 'ws://127.0.0.1:9/ws' : url); }
          }
          const c = M.createClient({ token: KEY, WebSocket: Flaky, maxSocketFailures: 2,
                                     backoff: { initialMs: 50, maxMs: 300 }, pollWaitSeconds: 2 });
          const states = [];
          c.onStateChange((s) => states.push(s));
          const job = await c.submit('generate', { seconds: 4, ticks: 20 }, { type: 'sleep' });
          const f = follow(c, job.jobId);
          await until(() => c.transport === 'poll', 15000, 'fallback');
          await until(() => f.msgs.some((m) => m.type === 'progress'), 15000, 'progress while polling');
          window.blockWs = false;
          await until(() => c.transport === 'websocket' && c.state === 'open', 15000, 'back on the socket');
          await withTimeout(f.done, 30000, 'final event');
          f.stop();
          return { msgs: f.msgs, states, stats: { ...c._debug.stats } };
        }"""
    )
    assert_in_order(got["msgs"])  # consecutive seqs across the switch: nothing lost or repeated
    assert "polling" in got["states"] and got["states"].index("open") > got["states"].index("polling")
    assert got["stats"]["probes"] >= 1
    assert not errors


async def test_a_refused_subscribe_token_is_reported_as_unauthorized(stack: Any, browser: Browser) -> None:
    page, _sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const job = await sleepJob({ seconds: 0, ticks: 0 });
          const c = M.createClient({ subscribeToken: async () => 'st_forged', maxSocketFailures: 2,
                                     backoff: { initialMs: 50, maxMs: 200 } });
          const seen = [];
          c.onError((e) => seen.push(e));
          const f = follow(c, job.jobId);
          await withTimeout(f.done, 15000, 'an error message');
          await until(() => c.state === 'unauthorized', 15000, 'unauthorized');
          const out = { state: c.state, error: c.error, seen, msgs: f.msgs, transport: c.transport };
          f.stop();
          return out;
        }"""
    )
    assert got["state"] == "unauthorized" and got["transport"] == "websocket"  # no pointless fallback
    assert got["error"]["code"] == "UNAUTHORIZED" and got["error"]["status"] == 401
    assert got["seen"] and got["seen"][0]["code"] == "UNAUTHORIZED"
    assert got["msgs"][-1]["type"] == "error" and got["msgs"][-1]["code"] == "UNAUTHORIZED"
    assert not errors


async def test_token_route_failures_are_retried_on_their_own_schedule(stack: Any, browser: Browser) -> None:
    """A token route answering 500 (in the API's error shape) shows `error` with its reason, is
    retried without counting as socket failures (no fallback), and the job is followed once it heals."""
    page, _sockets, errors = await open_page(browser, stack)
    got = await page.evaluate(
        """async () => {
          const job = await sleepJob({ seconds: 1, ticks: 5 });
          let calls = 0;
          const route = async ({ jobIds }) => {
            calls++;
            if (calls <= 3) {
              return new Response(JSON.stringify({ error: { code: 'TOKEN_ROUTE_DOWN', message: 'db down' } }),
                                  { status: 500, headers: { 'Content-Type': 'application/json' } });
            }
            return client.createToken({ jobIds, ttlSeconds: 60 });
          };
          const c = M.createClient({ subscribeToken: route, maxSocketFailures: 1,
                                     tokenBackoff: { initialMs: 100, maxMs: 300 } });
          const states = [];
          const seen = [];
          c.onStateChange((s, e) => states.push([s, e && e.code]));
          c.onError((e) => seen.push(e.code));
          const f = follow(c, job.jobId);
          await withTimeout(f.done, 30000, 'final event');
          const out = { states, seen, msgs: f.msgs, transport: c.transport, stats: { ...c._debug.stats }, calls };
          f.stop();
          return out;
        }"""
    )
    assert got["seen"][:3] == ["TOKEN_ROUTE_DOWN"] * 3
    assert ["error", "TOKEN_ROUTE_DOWN"] in got["states"] and ["open", None] in got["states"]
    assert got["transport"] == "websocket" and got["stats"]["socketsCreated"] == 1
    assert got["stats"]["tokenFailures"] == 3
    assert_in_order(got["msgs"])
    assert not errors


async def test_recovers_after_the_api_restarts_mid_job(stack: Stack, browser: Browser) -> None:
    """The API process stops mid-job and comes back: token fetches fail meanwhile (not socket
    failures), then the client reopens the socket and resumes by `since` to the final event."""
    page, _sockets, errors = await open_page(browser, stack)
    await page.evaluate(
        """async () => {
          window.c2 = M.createClient({ token: KEY, backoff: { initialMs: 100, maxMs: 500 },
                                       tokenBackoff: { initialMs: 100, maxMs: 500 } });
          const job = await window.c2.submit('generate', { seconds: 8, ticks: 40 }, { type: 'sleep' });
          window.f2 = follow(window.c2, job.jobId);
          await until(() => window.f2.msgs.some((m) => m.type === 'progress'), 15000, 'running');
        }"""
    )
    await asyncio.to_thread(stack.restart_api)
    got = await page.evaluate(
        """async () => {
          await withTimeout(window.f2.done, 60000, 'final event');
          window.f2.stop();
          return { msgs: window.f2.msgs, transport: window.c2.transport, stats: { ...window.c2._debug.stats } };
        }"""
    )
    assert_in_order(got["msgs"])
    assert got["msgs"][-1]["status"] == "completed"
    assert got["transport"] == "websocket" and got["stats"]["reconnects"] >= 1
    assert not errors
