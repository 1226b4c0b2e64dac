// Orchestrator JavaScript client: one ES module, no dependencies, no build step.
//
//   import { createClient } from "/static/client.js";
//   const client = createClient({ baseUrl: "", token: apiKey });
//   const job = await client.submit("generate", { prompt: "a red fox" });
//   const stop = client.subscribe(job.jobId, (evt) => console.log(evt.type, evt.seq, evt.progress));
//
// subscribe() shares ONE WebSocket between all subscriptions of a client (reference counted:
// it opens with the first subscription and closes after the last). The socket authenticates
// with a short-lived subscribe token (POST /api/tokens, or your own `subscribeToken` function),
// resumes with `since` after a drop (exponential backoff with jitter), delivers every event
// exactly once and in `seq` order, and falls back to long-polling (or SSE when only a subscribe
// token is available) when the socket cannot be opened, probing the socket in the background
// and returning to it as soon as one opens. Token fetch failures are retried on their own
// schedule; `state`, `error` and `onError` say why nothing arrives (unauthorized, token route
// failing, job not found).

export const FINAL_STATUSES = Object.freeze(["completed", "failed", "cancelled", "timed_out"]);
const FINAL = new Set(FINAL_STATUSES);

/** True when `status` is one a job never leaves. */
export function isFinal(status) {
  return FINAL.has(status);
}

/** True for the last event of a job (a `status` event with a final status). */
export function isFinalEvent(evt) {
  return !!evt && evt.type === "status" && FINAL.has(evt.status);
}

/** An error answered by the API ({"error": {"code", "message", "details"?}}) or raised by the client. */
export class OrchestratorError extends Error {
  constructor(status, code, message, details = undefined, retryAfter = undefined) {
    super(message || code);
    this.name = "OrchestratorError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

/**
 * Folds one message from subscribe() into a job resource and returns the new object (the input
 * is not modified). A `subscribed` message replaces the job with its snapshot; events older than
 * the job's `seq` are ignored. Handy for React state: `setJob((j) => applyEvent(j, evt))`.
 */
export function applyEvent(job, evt) {
  if (!evt) return job;
  if (evt.type === "subscribed") {
    if (!evt.job) return job;
    if (job && typeof job.seq === "number" && job.seq > evt.job.seq) return job; // never backwards
    return { ...evt.job };
  }
  if (typeof evt.seq !== "number") return job;
  if (job && typeof job.seq === "number" && evt.seq <= job.seq) return job;
  const next = job ? { ...job } : { jobId: evt.jobId, result: null, error: null };
  next.seq = evt.seq;
  if (evt.status) next.status = evt.status;
  if (typeof evt.progress === "number") next.progress = evt.progress;
  if (evt.message != null) next.message = evt.message;
  if (evt.ts) next.updatedAt = evt.ts;
  if ("etaSeconds" in evt) next.etaSeconds = evt.etaSeconds;
  if (evt.error) next.error = evt.error;
  if (evt.status === "running" && !next.startedAt && evt.ts) next.startedAt = evt.ts;
  if (isFinalEvent(evt)) {
    next.etaSeconds = null;
    if (!next.finishedAt && evt.ts) next.finishedAt = evt.ts;
    if (evt.data && evt.data.result) next.result = evt.data.result;
  }
  return next;
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    if (signal && signal.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      if (signal) signal.removeEventListener("abort", done);
      resolve();
    }
    if (signal) signal.addEventListener("abort", done, { once: true });
  });

/** An error answered in the contract's shape (`{"error": {"code", "message"}}`), or HTTP_<status>. */
async function responseError(res) {
  const text = await res.text().catch(() => "");
  let e = {};
  try {
    e = (JSON.parse(text) || {}).error || {};
  } catch {
    e = {};
  }
  const ra = res.headers.get("Retry-After");
  return new OrchestratorError(
    res.status,
    e.code || `HTTP_${res.status}`,
    e.message || text.slice(0, 200) || res.statusText,
    e.details,
    ra == null ? undefined : Number(ra),
  );
}

/** A token (or key) from a value, a function, a `{token}` object or a fetch `Response` (whose
 * error answer becomes an OrchestratorError with its status and code). */
async function resolveValue(v, arg) {
  let got = typeof v === "function" ? await v(arg) : await v;
  if (got && typeof got === "object" && typeof got.json === "function" && "ok" in got) {
    if (!got.ok) throw await responseError(got);
    got = await got.json();
  }
  if (got && typeof got === "object" && typeof got.token === "string") return got.token;
  return got;
}

function queryString(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => q.append(k, String(x)));
    else q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

/**
 * createClient({ baseUrl, token, ... }) — see client.d.ts for every option.
 * `token` is the API key (or a function, possibly async, returning it).
 */
export function createClient(options = {}) {
  const opts = {
    baseUrl: "",
    token: undefined,
    subscribeToken: undefined,
    transport: "auto",
    maxSocketFailures: 3,
    pollWaitSeconds: 20,
    tokenTtlSeconds: 600,
    pingIntervalMs: 25000,
    backoff: {},
    ...options,
  };
  const backoffCfg = { initialMs: 250, maxMs: 10000, ...(options.backoff || {}) };
  const tokenBackoffCfg = { initialMs: 1000, maxMs: 30000, ...(options.tokenBackoff || {}) };
  const jittered = (cfg, n) => {
    const cap = Math.min(cfg.maxMs, cfg.initialMs * 2 ** Math.min(Math.max(n - 1, 0), 16));
    return cap / 2 + Math.random() * (cap / 2);
  };
  const fetchImpl = opts.fetch || ((...a) => globalThis.fetch(...a));
  const WS = () => opts.WebSocket || globalThis.WebSocket;
  const ES = () => opts.EventSource || globalThis.EventSource;
  const base = String(opts.baseUrl || "").replace(/\/+$/, "");

  // ---- REST ---------------------------------------------------------------------------------

  async function request(method, path, { body, query, headers, signal, auth = "key" } = {}) {
    const h = { Accept: "application/json", ...(headers || {}) };
    if (auth === "key") {
      const key = await resolveValue(opts.token);
      if (!key) throw new OrchestratorError(0, "NO_API_KEY", "this client has no API key (option `token`)");
      h.Authorization = `Bearer ${key}`;
    }
    if (body !== undefined) h["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetchImpl(base + path + queryString(query), {
        method,
        headers: h,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new OrchestratorError(0, "NETWORK_ERROR", `network error: ${err && err.message ? err.message : err}`);
    }
    if (res.status === 304) return null;
    const text = await res.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    if (!res.ok) {
      const e = (data && data.error) || {};
      const ra = res.headers.get("Retry-After");
      throw new OrchestratorError(
        res.status,
        e.code || `HTTP_${res.status}`,
        e.message || text.slice(0, 200) || res.statusText,
        e.details,
        ra == null ? undefined : Number(ra),
      );
    }
    return data;
  }

  function submit(queue, input, o = {}) {
    if (queue !== "train" && queue !== "generate") {
      return Promise.reject(new OrchestratorError(0, "BAD_QUEUE", 'queue must be "train" or "generate"'));
    }
    const body = { input: input || {} };
    if (o.type) body.type = o.type;
    if (o.webhookUrl) body.webhookUrl = o.webhookUrl;
    if (o.webhookEvents) body.webhookEvents = o.webhookEvents;
    const headers = o.idempotencyKey ? { "Idempotency-Key": o.idempotencyKey } : undefined;
    return request("POST", `/api/${queue}`, { body, headers, signal: o.signal });
  }

  const jobPath = (id) => `/api/jobs/${encodeURIComponent(id)}`;

  function get(jobId, o = {}) {
    return request("GET", jobPath(jobId), {
      query: { waitSeconds: o.waitSeconds, afterSeq: o.afterSeq },
      signal: o.signal,
    });
  }

  function list(params = {}) {
    const { signal, ...query } = params;
    return request("GET", "/api/jobs", { query, signal });
  }

  function cancel(jobId, o = {}) {
    return request("DELETE", jobPath(jobId), { signal: o.signal });
  }

  function events(jobId, o = {}) {
    return request("GET", `${jobPath(jobId)}/events`, { query: { after: o.after }, signal: o.signal });
  }

  const types = (o = {}) => request("GET", "/api/types", { signal: o.signal });
  const me = (o = {}) => request("GET", "/api/me", { signal: o.signal });
  const createToken = (o = {}) => {
    const body = {};
    if (o.jobIds) body.jobIds = o.jobIds;
    if (o.ttlSeconds) body.ttlSeconds = o.ttlSeconds;
    return request("POST", "/api/tokens", { body, signal: o.signal });
  };

  // ---- realtime: shared socket, per-job entries, per-subscriber handles ------------------------

  /** jobId → { jobId, handles: Set<handle>, notFound, poller } */
  const jobs = new Map();
  let ws = null;
  let generation = 0; // bumps whenever a socket is abandoned; stale callbacks compare it
  let mode = opts.transport === "poll" ? "poll" : "socket";
  let state = "idle";
  let failures = 0; // consecutive sockets that never opened
  let attempt = 0; // consecutive drops, for the backoff
  let tokenFailures = 0; // consecutive token fetches that failed, for their own schedule
  let probes = 0; // consecutive background probes of the socket while on the fallback
  let reconnectTimer = null;
  let probeTimer = null;
  let pingTimer = null;
  let lastMessageAt = 0;
  let lastError = null;
  const stateListeners = new Set();
  const errorListeners = new Set();
  const stats = {
    socketsCreated: 0,
    socketsClosed: 0,
    tokensFetched: 0,
    tokenFailures: 0,
    messages: 0,
    reconnects: 0,
    polls: 0,
    probes: 0,
  };

  function notify(listeners, ...args) {
    for (const fn of [...listeners]) {
      try {
        fn(...args);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  function setState(s) {
    if (s === "open" || s === "idle") lastError = null;
    if (s === state) return;
    state = s;
    notify(stateListeners, s, lastError);
  }

  /** Records why the connection is not delivering (`state` "unauthorized" or "error", or a
   * network failure while "reconnecting") and tells `onError` listeners. */
  function reportError(err, nextState) {
    lastError = {
      code: (err && err.code) || "ERROR",
      message: (err && err.message) || String(err),
      status: err && typeof err.status === "number" ? err.status : 0,
      ...(err && err.jobId ? { jobId: err.jobId } : {}),
    };
    notify(errorListeners, lastError);
    if (nextState && nextState !== state) {
      state = nextState;
      notify(stateListeners, nextState, lastError);
    } else if (nextState) notify(stateListeners, nextState, lastError);
  }

  const isAuthError = (err) => err instanceof OrchestratorError && (err.status === 401 || err.status === 403);

  function call(h, msg) {
    try {
      h.onEvent(msg);
    } catch (err) {
      setTimeout(() => {
        throw err;
      }); // report, but never break delivery to others
    }
  }

  /** The `since` to (re)subscribe with: the oldest position among the job's unfinished handles. */
  function sinceOf(entry) {
    let min = null;
    for (const h of entry.handles) if (!h.done && (min === null || h.lastSeq < min)) min = h.lastSeq;
    return min;
  }

  function deliverSnapshot(entry, job) {
    for (const h of [...entry.handles]) {
      if (h.done || !h.active || !h.needSnapshot) continue;
      h.needSnapshot = false;
      if (job && isFinal(job.status) && h.lastSeq >= job.seq) h.done = true;
      call(h, { type: "subscribed", jobId: entry.jobId, job });
    }
  }

  function deliverEvent(entry, evt) {
    let gap = false;
    for (const h of [...entry.handles]) {
      if (h.done || !h.active || evt.seq <= h.lastSeq) continue; // duplicate or already finished
      if (evt.seq !== h.lastSeq + 1) {
        gap = true; // never expected from the server; resynchronise instead of skipping events
        continue;
      }
      h.lastSeq = evt.seq;
      if (isFinalEvent(evt)) h.done = true;
      call(h, evt);
    }
    if (gap) resync(entry);
  }

  function deliverError(entry, code, message) {
    for (const h of [...entry.handles]) if (h.active) call(h, { type: "error", jobId: entry.jobId, code, message });
  }

  function resync(entry) {
    const now = Date.now();
    if (entry.resyncAt && now - entry.resyncAt < 1000) return;
    entry.resyncAt = now;
    if (mode === "socket") sendSubscribe(entry);
    else restartPoller(entry);
  }

  function send(obj) {
    if (ws && ws.readyState === 1) {
      ws.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  function sendSubscribe(entry) {
    if (entry.notFound) return;
    const since = sinceOf(entry);
    if (since === null) return; // every subscriber has the final event
    send({ type: "subscribe", jobId: entry.jobId, since });
  }

  function onMessage(text) {
    stats.messages++;
    lastMessageAt = Date.now();
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    const entry = msg.jobId ? jobs.get(msg.jobId) : undefined;
    switch (msg.type) {
      case "pong":
      case "unsubscribed":
        return;
      case "subscribed":
        if (entry) deliverSnapshot(entry, msg.job);
        return;
      case "error":
        if (entry) {
          if (msg.code === "NOT_FOUND" && opts.subscribeToken !== undefined && !entry.rescoped) {
            // a token scoped to the jobs of the last connect: reconnect once with one covering this job
            entry.rescoped = true;
            if (ws) ws.close(4001, "subscribe token scope");
            return;
          }
          if (msg.code === "NOT_FOUND") entry.notFound = true;
          deliverError(entry, msg.code, msg.message);
          reportError({ code: msg.code, message: msg.message, status: msg.code === "NOT_FOUND" ? 404 : 0, jobId: entry.jobId });
        }
        return;
      default:
        if (entry && typeof msg.seq === "number") deliverEvent(entry, msg);
    }
  }

  async function subscribeToken(jobIds) {
    stats.tokensFetched++;
    if (opts.subscribeToken !== undefined) {
      const t = await resolveValue(opts.subscribeToken, { jobIds });
      if (!t) throw new OrchestratorError(0, "NO_TOKEN", "subscribeToken() returned nothing");
      return t;
    }
    const got = await request("POST", "/api/tokens", { body: { ttlSeconds: opts.tokenTtlSeconds } });
    return got.token;
  }

  function wsUrl(token) {
    const where = globalThis.location ? globalThis.location.href : undefined;
    const u = new URL(`${base}/ws`, where);
    u.protocol = u.protocol === "https:" ? "wss:" : u.protocol === "http:" ? "ws:" : u.protocol;
    u.searchParams.set("token", token);
    return u.toString();
  }

  function ensureTransport() {
    if (jobs.size === 0) return;
    if (mode === "poll") {
      setState("polling");
      for (const entry of jobs.values()) if (!entry.poller) startPoller(entry);
      return;
    }
    if (!ws && !reconnectTimer && !connecting) connect();
  }

  let connecting = false;
  /** Opens the shared socket. A `probe` runs while the fallback serves the jobs: it changes
   * nothing unless its socket opens, and then takes the jobs back from the fallback. */
  async function connect(probe = false) {
    const gen = ++generation;
    connecting = true;
    if (!probe) setState(attempt === 0 && tokenFailures === 0 ? "connecting" : "reconnecting");
    else stats.probes++;
    let token;
    try {
      token = await subscribeToken([...jobs.keys()]);
    } catch (err) {
      connecting = false;
      if (gen !== generation) return;
      stats.tokenFailures++;
      tokenFailures++;
      tokenLost(err, probe);
      return;
    }
    tokenFailures = 0;
    connecting = false;
    if (gen !== generation || jobs.size === 0 || mode !== (probe ? "poll" : "socket")) return;
    let sock;
    try {
      const Ctor = WS();
      if (!Ctor) throw new Error("no WebSocket in this environment");
      sock = new Ctor(wsUrl(token));
    } catch {
      if (probe) scheduleProbe();
      else socketLost(false, true, null);
      return;
    }
    ws = sock;
    stats.socketsCreated++;
    let opened = false;
    sock.onopen = () => {
      if (gen !== generation) return;
      opened = true;
      failures = 0;
      attempt = 0;
      probes = 0;
      lastMessageAt = Date.now();
      if (mode === "poll") {
        mode = "socket"; // back from the fallback: the socket resumes where the pollers were
        for (const entry of jobs.values()) stopPoller(entry);
      }
      setState("open");
      for (const entry of jobs.values()) {
        for (const h of entry.handles) h.needSnapshot = true; // a fresh snapshot after every (re)connect
        sendSubscribe(entry);
      }
      startPing(gen);
    };
    sock.onmessage = (m) => {
      if (gen === generation) onMessage(m.data);
    };
    sock.onerror = () => {}; // a close event follows
    sock.onclose = () => {
      stats.socketsClosed++;
      if (gen !== generation) return;
      ws = null;
      if (!opened && mode === "poll") scheduleProbe();
      else socketLost(opened, false, opened ? null : token);
    };
  }

  /** A token fetch failed: retried on the token schedule; never counted as a socket failure. */
  function tokenLost(err, probe) {
    if (jobs.size === 0) return setState("idle");
    if (isAuthError(err)) {
      for (const entry of jobs.values()) deliverError(entry, err.code, err.message);
      reportError(err, "unauthorized");
    } else if (err instanceof OrchestratorError && err.status > 0) {
      reportError(err, probe ? undefined : "error"); // the token route answered an error
    } else {
      const e = err instanceof OrchestratorError ? err : new OrchestratorError(0, "TOKEN_FAILED", `token: ${err && err.message ? err.message : err}`);
      reportError(e, probe ? undefined : "reconnecting");
    }
    if (probe) return scheduleProbe();
    if (reconnectTimer) clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(() => {
      reconnectTimer = null;
      if (jobs.size && mode === "socket" && !ws) connect();
    }, jittered(tokenBackoffCfg, tokenFailures));
  }

  /** While on the fallback, try the socket again in the background (backoff, at most maxMs apart). */
  function scheduleProbe() {
    if (probeTimer || opts.transport !== "auto" || mode !== "poll" || jobs.size === 0) return;
    probes++;
    probeTimer = setTimeout(() => {
      probeTimer = null;
      if (jobs.size && mode === "poll" && !ws && !connecting) connect(true);
    }, jittered(backoffCfg, probes));
  }

  /** Why a socket never opened, when HTTP can tell (a browser hides the upgrade's status): the
   * same token on the SSE route answers 401 for a bad or expired one. */
  async function diagnose(token) {
    const jobId = jobs.keys().next().value;
    if (!token || jobId === undefined) return null;
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 5000);
    try {
      const res = await fetchImpl(`${base}${jobPath(jobId)}/stream${queryString({ token })}`, { signal: ctrl.signal });
      if (res.status === 401 || res.status === 403) return await responseError(res);
      return null;
    } catch {
      return null;
    } finally {
      clearTimeout(timer);
      ctrl.abort();
    }
  }

  function stopPing() {
    if (pingTimer) clearInterval(pingTimer);
    pingTimer = null;
  }

  function startPing(gen) {
    stopPing();
    if (!opts.pingIntervalMs) return;
    pingTimer = setInterval(() => {
      if (gen !== generation || !ws) return stopPing();
      if (Date.now() - lastMessageAt > opts.pingIntervalMs + 10000) {
        // silent for too long: abandon this socket and reconnect
        const dead = ws;
        generation++;
        ws = null;
        stopPing();
        try {
          dead.close(4000, "no answer to ping");
        } catch {
          /* ignore */
        }
        socketLost(true, false, null);
        return;
      }
      send({ type: "ping" });
    }, opts.pingIntervalMs);
  }

  async function socketLost(opened, failedEarly, token) {
    stopPing();
    if (jobs.size === 0) {
      setState("idle");
      return;
    }
    if (!opened && token) {
      const gen = generation;
      const why = await diagnose(token);
      if (gen !== generation || jobs.size === 0) return;
      if (why) {
        // the token is refused: the fallback would be refused too; try again with a fresh one
        for (const entry of jobs.values()) deliverError(entry, why.code, why.message);
        reportError(why, "unauthorized");
        tokenFailures++;
        if (reconnectTimer) clearTimeout(reconnectTimer);
        reconnectTimer = setTimeout(() => {
          reconnectTimer = null;
          if (jobs.size && mode === "socket" && !ws) connect();
        }, jittered(tokenBackoffCfg, tokenFailures));
        return;
      }
    }
    if (!opened || failedEarly) failures++;
    attempt++;
    stats.reconnects++;
    if (opts.transport === "auto" && failures >= opts.maxSocketFailures) {
      mode = "poll";
      probes = 0;
      ensureTransport();
      scheduleProbe();
      return;
    }
    const delay = jittered(backoffCfg, attempt);
    setState("reconnecting");
    if (reconnectTimer) clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(() => {
      reconnectTimer = null;
      if (jobs.size && mode === "socket" && !ws) connect();
    }, delay);
  }

  function teardown() {
    generation++;
    if (reconnectTimer) clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (probeTimer) clearTimeout(probeTimer);
    probeTimer = null;
    probes = 0;
    tokenFailures = 0;
    connecting = false;
    stopPing();
    const sock = ws;
    ws = null;
    if (sock) {
      try {
        sock.close(1000, "no subscriptions");
      } catch {
        /* ignore */
      }
    }
    failures = 0;
    attempt = 0;
    mode = opts.transport === "poll" ? "poll" : "socket";
    setState("idle");
  }

  // ---- fallback: long-polling with the API key, or SSE with a subscribe token ----------------

  function startPoller(entry) {
    const ctrl = new AbortController();
    entry.poller = ctrl;
    for (const h of entry.handles) h.needSnapshot = true;
    const run = opts.token !== undefined ? runPoll : runSse;
    run(entry, ctrl.signal).finally(() => {
      if (entry.poller === ctrl) entry.poller = null;
    });
  }

  function stopPoller(entry) {
    if (entry.poller) entry.poller.abort();
    entry.poller = null;
  }

  function restartPoller(entry) {
    stopPoller(entry);
    if (mode === "poll" && jobs.get(entry.jobId) === entry) startPoller(entry);
  }

  const alive = (entry, signal) => !signal.aborted && jobs.get(entry.jobId) === entry;

  async function runPoll(entry, signal) {
    let cursor = sinceOf(entry);
    let snapshot = false;
    let errors = 0;
    while (cursor !== null && alive(entry, signal)) {
      try {
        if (!snapshot) {
          deliverSnapshot(entry, await get(entry.jobId, { signal }));
          snapshot = true;
        }
        stats.polls++;
        const got = await events(entry.jobId, { after: cursor, signal });
        if (!alive(entry, signal)) return;
        for (const ev of got.events || []) {
          deliverEvent(entry, ev);
          cursor = Math.max(cursor, ev.seq);
        }
        if (sinceOf(entry) === null) return; // everyone has the final event
        await get(entry.jobId, { waitSeconds: opts.pollWaitSeconds, afterSeq: cursor, signal });
        errors = 0;
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof OrchestratorError && [401, 403, 404].includes(err.status)) {
          if (err.status === 404) entry.notFound = true;
          deliverError(entry, err.code, err.message);
          reportError({ ...err, message: err.message, jobId: entry.jobId }, err.status === 404 ? undefined : "unauthorized");
          return;
        }
        errors++;
        await sleep(Math.min(backoffCfg.maxMs, backoffCfg.initialMs * 2 ** Math.min(errors, 16)), signal);
      }
    }
  }

  async function runSse(entry, signal) {
    let errors = 0;
    while (alive(entry, signal) && sinceOf(entry) !== null) {
      const Ctor = ES();
      if (!Ctor) {
        deliverError(entry, "NO_TRANSPORT", "no WebSocket, no API key for polling and no EventSource");
        return;
      }
      let token;
      try {
        token = await subscribeToken([entry.jobId]);
      } catch {
        errors++;
        await sleep(Math.min(backoffCfg.maxMs, backoffCfg.initialMs * 2 ** Math.min(errors, 16)), signal);
        continue;
      }
      if (!alive(entry, signal)) return;
      const url = `${base}${jobPath(entry.jobId)}/stream${queryString({ since: sinceOf(entry), token })}`;
      const ended = await new Promise((resolve) => {
        const es = new Ctor(url);
        const finish = (v) => {
          es.close();
          signal.removeEventListener("abort", onAbort);
          resolve(v);
        };
        const onAbort = () => finish(true);
        signal.addEventListener("abort", onAbort, { once: true });
        es.addEventListener("snapshot", (m) => deliverSnapshot(entry, JSON.parse(m.data)));
        const onEv = (m) => {
          deliverEvent(entry, JSON.parse(m.data));
          if (sinceOf(entry) === null) finish(true);
        };
        for (const t of ["status", "progress", "log"]) es.addEventListener(t, onEv);
        es.onerror = () => finish(false); // reconnect ourselves, with a fresh token and `since`
      });
      if (ended) return;
      errors++;
      await sleep(Math.min(backoffCfg.maxMs, backoffCfg.initialMs * 2 ** Math.min(errors, 16)), signal);
    }
  }

  // ---- public realtime API -------------------------------------------------------------------

  function subscribe(jobId, onEvent, o = {}) {
    if (typeof onEvent !== "function") throw new TypeError("subscribe(jobId, onEvent): onEvent must be a function");
    const since = Math.max(0, Math.floor(Number(o.since) || 0));
    const h = { jobId, onEvent, lastSeq: since, active: true, done: false, needSnapshot: true };
    let entry = jobs.get(jobId);
    if (!entry) {
      entry = { jobId, handles: new Set(), notFound: false, poller: null, resyncAt: 0 };
      jobs.set(jobId, entry);
    }
    entry.handles.add(h);
    if (mode === "socket") {
      if (ws && ws.readyState === 1) {
        // a new job, or a late subscriber (it needs a snapshot, maybe an earlier replay): the server
        // replaces the job's subscription and replays from the oldest position; the others dedupe
        sendSubscribe(entry);
      } else ensureTransport();
    } else if (!entry.poller) {
      ensureTransport();
    } else {
      restartPoller(entry);
    }
    return function unsubscribe() {
      if (!h.active) return;
      h.active = false;
      entry.handles.delete(h);
      if (entry.handles.size) return;
      if (jobs.get(jobId) === entry) jobs.delete(jobId);
      stopPoller(entry);
      if (jobs.size === 0) teardown();
      else send({ type: "unsubscribe", jobId });
    };
  }

  /** Resolves with the final job (built from the events) once it ends; rejects on timeout. */
  function wait(jobId, o = {}) {
    return new Promise((resolve, reject) => {
      let job = null;
      let timer = null;
      const stop = subscribe(jobId, (evt) => {
        if (evt.type === "error") {
          if (evt.code === "NOT_FOUND" || evt.code === "FORBIDDEN" || evt.code === "UNAUTHORIZED") {
            finish();
            reject(new OrchestratorError(evt.code === "NOT_FOUND" ? 404 : 401, evt.code, evt.message));
          }
          return;
        }
        job = applyEvent(job, evt);
        if (o.onEvent) o.onEvent(evt, job);
        if (isFinalEvent(evt) || (evt.type === "subscribed" && evt.job && isFinal(evt.job.status))) {
          finish();
          resolve(job);
        }
      });
      function finish() {
        if (timer) clearTimeout(timer);
        if (o.signal) o.signal.removeEventListener("abort", onAbort);
        stop();
      }
      function onAbort() {
        finish();
        reject(new OrchestratorError(0, "ABORTED", "wait() aborted"));
      }
      if (o.signal) o.signal.addEventListener("abort", onAbort, { once: true });
      if (o.timeoutMs) {
        timer = setTimeout(() => {
          finish();
          reject(new OrchestratorError(0, "TIMEOUT", `job ${jobId} did not finish in ${o.timeoutMs} ms`));
        }, o.timeoutMs);
      }
    });
  }

  function onStateChange(fn) {
    stateListeners.add(fn);
    return () => stateListeners.delete(fn);
  }

  function onError(fn) {
    errorListeners.add(fn);
    return () => errorListeners.delete(fn);
  }

  function close() {
    for (const entry of jobs.values()) {
      for (const h of entry.handles) h.active = false;
      stopPoller(entry);
    }
    jobs.clear();
    teardown();
  }

  return {
    baseUrl: base,
    submit,
    get,
    list,
    cancel,
    events,
    types,
    me,
    createToken,
    subscribe,
    wait,
    close,
    onStateChange,
    onError,
    get state() {
      return state;
    },
    /** Why the connection is not delivering ({code, message, status, jobId?}), or null. */
    get error() {
      return lastError;
    },
    get transport() {
      return mode === "poll" ? (opts.token !== undefined ? "poll" : "sse") : "websocket";
    },
    /** For tests and debugging; not a stable API. */
    _debug: {
      stats,
      get socket() {
        return ws;
      },
      get subscriptions() {
        return [...jobs.values()].map((e) => ({ jobId: e.jobId, handles: e.handles.size, since: sinceOf(e) }));
      },
      /** Closes the current socket as a network drop would; the client reconnects with `since`. */
      drop(code = 4000) {
        if (ws) ws.close(code, "debug drop");
      },
    },
  };
}

export default createClient;
