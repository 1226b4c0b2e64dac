// The web console: plain ES module on top of /static/client.js (one shared WebSocket).
import { applyEvent, createClient, isFinal, isFinalEvent, OrchestratorError } from "./client.js";

const KEY_STORAGE = "orchestrator.apiKey";
const LIVE_PREFIX = "orchestrator.live."; // per running job: {seq, points} so a reload resumes by seq
const PAGE_SIZE = 10;

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c != null) node.append(c);
  return node;
};

// ---- state ------------------------------------------------------------------------------------

const ui = {
  client: null,
  types: [],
  queue: "train",
  cursor: null,
  jobs: new Map(), // jobId → view
  states: [],
  resumedFrom: {},
};
// Test and debugging hook.
window.__console = {
  get client() {
    return ui.client;
  },
  states: ui.states,
  resumedFrom: ui.resumedFrom,
  chartSteps: (jobId) => {
    const v = ui.jobs.get(jobId);
    return v ? [...v.points.keys()] : [];
  },
  job: (jobId) => ui.jobs.get(jobId)?.job ?? null,
};

// ---- API key ----------------------------------------------------------------------------------

function takeKeyFromHash() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const key = params.get("key");
  if (key) {
    localStorage.setItem(KEY_STORAGE, key);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function showLogin(message) {
  $("#app").hidden = true;
  $("#session").hidden = true;
  $("#login").hidden = false;
  const err = $("#login-error");
  err.hidden = !message;
  err.textContent = message || "";
  $("#api-key").focus();
}

$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("#api-key").value.trim();
  if (!key) return;
  localStorage.setItem(KEY_STORAGE, key);
  location.reload();
});

$("#signout").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  for (const k of Object.keys(localStorage)) if (k.startsWith(LIVE_PREFIX)) localStorage.removeItem(k);
  if (ui.client) ui.client.close();
  location.reload();
});

// ---- formatting -------------------------------------------------------------------------------

const humanize = (name) => {
  const words = name.replace(/([a-z0-9])([A-Z])/g, "$1 $2").replace(/[_-]+/g, " ").toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1);
};
const fmtBytes = (n) =>
  n == null ? "" : n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} kB` : `${(n / 1048576).toFixed(1)} MB`;
const fmtTime = (iso) => (iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) : "");
const fmtDate = (iso) => {
  if (!iso) return "";
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? fmtTime(iso) : d.toLocaleString([], { dateStyle: "medium", timeStyle: "short", hour12: false });
};
const fmtDuration = (s) => {
  if (s == null || !isFinite(s)) return "";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
};
const fmtLoss = (x) => (x == null ? "" : x >= 0.1 ? x.toFixed(3) : x.toPrecision(3));
const STATUS_LABEL = { timed_out: "timed out" };

function toast(message, kind = "info") {
  const t = $("#toast");
  t.textContent = message;
  t.dataset.kind = kind;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), 5000);
}

// ---- connection indicator and credits ------------------------------------------------------------

const CONN_LABEL = {
  idle: "idle",
  connecting: "connecting…",
  open: "live",
  reconnecting: "reconnecting…",
  polling: "polling",
};
const CONN_TITLE = {
  idle: "No live jobs: the socket is closed until one is followed",
  connecting: "Opening the WebSocket",
  open: "Live: one WebSocket carries every running job",
  reconnecting: "Connection lost: reconnecting and resuming by seq",
  polling: "WebSocket unavailable: following jobs by long-polling",
};
function showConnState(s) {
  ui.states.push(s);
  const c = $("#conn");
  c.dataset.state = s;
  $(".label", c).textContent = CONN_LABEL[s] || s;
  c.title = CONN_TITLE[s] || "";
}

let creditsTimer = null;
function refreshCredits(delayMs = 0) {
  clearTimeout(creditsTimer);
  creditsTimer = setTimeout(async () => {
    try {
      const me = await ui.client.me();
      $("#credits").textContent = me.credits.toLocaleString();
      $("#user").textContent = me.name;
    } catch (err) {
      if (err.status === 401) showLogin("That API key is no longer accepted.");
    }
  }, delayMs);
}

// ---- the submit form, built from /api/types inputSchema ----------------------------------------

function propType(prop) {
  if (prop.type) return Array.isArray(prop.type) ? prop.type.find((t) => t !== "null") : prop.type;
  const alt = (prop.anyOf || prop.oneOf || []).find((p) => p.type && p.type !== "null");
  if (alt) return alt.type;
  if (prop.enum) return "enum";
  return "object";
}

function constraintHint(prop, type) {
  const parts = [];
  const lo = prop.minimum ?? prop.exclusiveMinimum;
  const hi = prop.maximum ?? prop.exclusiveMaximum;
  if (type === "integer" || type === "number") {
    if (lo != null && hi != null) parts.push(`${prop.exclusiveMinimum != null ? ">" : ""}${lo} – ${hi}`);
    else if (lo != null) parts.push(`${prop.exclusiveMinimum != null ? ">" : "≥"} ${lo}`);
    else if (hi != null) parts.push(`≤ ${hi}`);
  } else if (type === "string") {
    if (prop.maxLength != null) parts.push(`${prop.minLength ?? 0}–${prop.maxLength} chars`);
    if (prop.pattern) parts.push(`pattern ${prop.pattern}`);
  }
  if (prop.default !== undefined && type !== "boolean") parts.push(`default ${JSON.stringify(prop.default)}`);
  return parts.join(" · ");
}

function buildField(name, prop, required) {
  const type = propType(prop);
  const id = `f-${name}`;
  const label = humanize(name);
  let input;
  if (prop.enum) {
    input = el("select", { id, name }, prop.enum.map((v) => el("option", { value: v, text: String(v) })));
    if (prop.default !== undefined) input.value = prop.default;
  } else if (type === "boolean") {
    input = el("input", { id, name, type: "checkbox", class: "switch" });
    input.checked = !!prop.default;
    input.dataset.kind = "boolean";
    return el(
      "div",
      { class: "field field-check", "data-field": name },
      el("label", { for: id }, input, el("span", { class: "field-label", text: label })),
      el("div", { class: "field-error" }),
    );
  } else if (type === "integer" || type === "number") {
    input = el("input", {
      id,
      name,
      type: "number",
      inputmode: type === "integer" ? "numeric" : "decimal",
      step: type === "integer" ? "1" : "any",
      min: prop.minimum ?? prop.exclusiveMinimum,
      max: prop.maximum ?? prop.exclusiveMaximum,
      required: required || undefined,
    });
    if (prop.default !== undefined) input.value = prop.default;
  } else if (type === "string") {
    const long = (prop.maxLength ?? 0) > 200;
    input = el(long ? "textarea" : "input", {
      id,
      name,
      rows: long ? 3 : undefined,
      type: long ? undefined : "text",
      minlength: prop.minLength,
      maxlength: prop.maxLength,
      pattern: prop.pattern && !long ? prop.pattern.replace(/^\^|\$$/g, "") : undefined,
      required: required || undefined,
      spellcheck: long ? "true" : "false",
      placeholder: name === "prompt" ? "a red fox in the snow, watercolor" : name === "name" ? "my-adapter" : undefined,
    });
    if (prop.default !== undefined && prop.default !== null) input.value = prop.default;
  } else {
    input = el("textarea", { id, name, rows: 4, class: "mono", "data-json": "1", spellcheck: "false" });
    input.value = JSON.stringify(prop.default ?? (type === "array" ? [] : {}), null, 2);
  }
  input.dataset.kind = prop.enum ? "enum" : type;
  const hint = constraintHint(prop, type);
  return el(
    "div",
    { class: "field", "data-field": name },
    el(
      "label",
      { for: id, class: "field-label" },
      label,
      required ? el("span", { class: "req", title: "required", text: " *" }) : null,
    ),
    input,
    prop.description ? el("div", { class: "field-hint", text: prop.description }) : null,
    hint ? el("div", { class: "field-hint", text: hint }) : null,
    el("div", { class: "field-error" }),
  );
}

function renderTabs() {
  const queues = ["train", "generate"].filter((q) => ui.types.some((t) => t.queue === q));
  if (!queues.includes(ui.queue)) ui.queue = queues[0] || "train";
  const tabs = $("#queue-tabs");
  tabs.replaceChildren(
    ...queues.map((q) =>
      el("button", {
        type: "button",
        role: "tab",
        class: `tab${q === ui.queue ? " active" : ""}`,
        "aria-selected": q === ui.queue ? "true" : "false",
        "data-queue": q,
        text: q === "train" ? "Train" : "Generate",
        onclick: () => {
          ui.queue = q;
          renderTabs();
          renderTypeSelect();
        },
      }),
    ),
  );
}

function renderTypeSelect() {
  const select = $("#type-select");
  const types = ui.types.filter((t) => t.queue === ui.queue);
  select.replaceChildren(
    ...types.map((t) => el("option", { value: t.type, text: `${t.type}  ·  ${t.cost} credit${t.cost === 1 ? "" : "s"}` })),
  );
  renderFields();
}

function currentType() {
  return ui.types.find((t) => t.type === $("#type-select").value);
}

function renderFields() {
  const t = currentType();
  const box = $("#fields");
  setFormError(null);
  if (!t) {
    box.replaceChildren(el("p", { class: "muted", text: "No task types on this queue." }));
    return;
  }
  const schema = t.inputSchema || {};
  const req = new Set(schema.required || []);
  box.replaceChildren(
    ...Object.entries(schema.properties || {}).map(([name, prop]) => buildField(name, prop, req.has(name))),
  );
  $("#submit-btn").textContent = `Submit ${t.type} · ${t.cost} credit${t.cost === 1 ? "" : "s"}`;
}

$("#type-select").addEventListener("change", renderFields);

function setFormError(message, details) {
  const box = $("#form-error");
  for (const f of document.querySelectorAll("#fields .field")) {
    f.classList.remove("invalid");
    $(".field-error", f).textContent = "";
  }
  box.hidden = !message;
  box.textContent = message || "";
  for (const d of details || []) {
    const name = String(d.field || "").replace(/^input\./, "").split(".")[0];
    const f = document.querySelector(`#fields .field[data-field="${CSS.escape(name)}"]`);
    if (f) {
      f.classList.add("invalid");
      $(".field-error", f).textContent = d.message;
    }
  }
}

function collectInput() {
  const input = {};
  const problems = [];
  for (const node of document.querySelectorAll("#fields [name]")) {
    const name = node.name;
    const kind = node.dataset.kind;
    if (kind === "boolean") {
      input[name] = node.checked;
    } else if (node.dataset.json) {
      try {
        input[name] = JSON.parse(node.value || "null");
      } catch {
        problems.push({ field: name, message: "not valid JSON" });
      }
    } else if (kind === "integer" || kind === "number") {
      if (node.value === "") {
        if (node.required) problems.push({ field: name, message: "required" });
        continue;
      }
      const n = Number(node.value);
      if (!isFinite(n)) problems.push({ field: name, message: "not a number" });
      else input[name] = n;
    } else {
      if (node.value === "" && !node.required) continue;
      input[name] = node.value;
    }
  }
  return { input, problems };
}

$("#submit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const t = currentType();
  if (!t) return;
  const { input, problems } = collectInput();
  if (problems.length) {
    setFormError("Please fix the highlighted fields.", problems);
    return;
  }
  const btn = $("#submit-btn");
  btn.disabled = true;
  try {
    const job = await ui.client.submit(t.queue, input, { type: t.type });
    setFormError(null);
    started(job);
  } catch (err) {
    if (err instanceof OrchestratorError) {
      const msg =
        err.code === "INSUFFICIENT_CREDITS"
          ? `Not enough credits: ${err.message}`
          : err.code === "RATE_LIMITED" || err.status === 429
            ? `Slow down: try again in ${err.retryAfter ?? "a few"} s`
            : err.message;
      setFormError(msg, Array.isArray(err.details) ? err.details : null);
      if (err.status === 401) showLogin("That API key is no longer accepted.");
    } else {
      setFormError(String(err));
    }
  } finally {
    btn.disabled = false;
  }
});

function started(job) {
  addJob(job, { prepend: true });
  follow(job.jobId, 0);
  refreshCredits();
  toast(`Submitted ${job.type} job ${job.jobId.slice(0, 8)}…`);
}

// ---- follow-up operations on a finished image (fal.upscale, fal.edit) --------------------------

function imageActions(imageUrl) {
  const has = (name) => ui.types.find((t) => t.type === name);
  const upscale = has("fal.upscale");
  const edit = has("fal.edit");
  if (!upscale && !edit) return null;
  const row = el("div", { class: "result-actions" });
  const run = async (btn, type, args) => {
    btn.disabled = true;
    try {
      started(await ui.client.submit(type.queue, { arguments: { image_url: imageUrl, ...args } }, { type: type.type }));
    } catch (err) {
      toast(err.message || String(err), "error");
    } finally {
      btn.disabled = false;
    }
  };
  if (upscale) {
    const btn = el("button", { type: "button", class: "btn ghost small upscale", text: `Upscale · ${upscale.cost}` });
    btn.addEventListener("click", () => run(btn, upscale, {}));
    row.append(btn);
  }
  if (edit) {
    const prompt = el("input", { type: "text", class: "edit-prompt", placeholder: "Edit: make the sky purple…", maxlength: "2000" });
    const btn = el("button", { type: "submit", class: "btn ghost small edit", text: `Edit · ${edit.cost}` });
    const form = el("form", { class: "edit-form" }, prompt, btn);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (!prompt.value.trim()) return prompt.focus();
      run(btn, edit, { prompt: prompt.value.trim() });
    });
    row.append(form);
  }
  return row;
}

// ---- job cards --------------------------------------------------------------------------------

function jobTitle(job) {
  const i = job.input || {};
  if (job.type === "lora") return `${i.name ?? "adapter"} · ${i.steps ?? "?"} steps · rank ${i.rank ?? "?"}`;
  if (job.type === "image") return `“${String(i.prompt ?? "").slice(0, 80)}” · ${i.width ?? "?"}×${i.height ?? "?"}`;
  if (job.type === "sleep") return `${i.seconds ?? 1} s · ${i.ticks ?? 10} ticks${i.fail ? " · fails" : ""}`;
  if (i.model) return String(i.model);
  return job.type;
}

function addJob(job, { prepend = false } = {}) {
  if (ui.jobs.has(job.jobId)) {
    const v = ui.jobs.get(job.jobId);
    if (job.seq > (v.job.seq ?? 0)) {
      v.job = job;
      render(v);
    }
    return v;
  }
  const card = el("article", { class: "job", "data-job-id": job.jobId, "data-type": job.type });
  const v = {
    job,
    card,
    points: new Map(), // step → loss (lora)
    seq: 0,
    unsub: null,
    chartLoaded: false,
    imageShown: null,
    persistTimer: null,
    frame: 0,
  };
  card.append(
    el(
      "div",
      { class: "job-head" },
      el("span", { class: "badge" }),
      el("span", { class: "job-type", text: job.type }),
      el("span", { class: "job-title", text: jobTitle(job) }),
      el("span", { class: "spacer" }),
      el("code", { class: "job-id", title: job.jobId, text: job.jobId.slice(0, 10) }),
      el("time", { class: "job-time", datetime: job.createdAt, text: fmtDate(job.createdAt) }),
      el("button", {
        class: "btn ghost small cancel",
        type: "button",
        text: "Cancel",
        onclick: () => cancelJob(v),
      }),
    ),
    el(
      "div",
      { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" },
      el("div", { class: "bar" }),
    ),
    el(
      "div",
      { class: "job-meta" },
      el("span", { class: "pct" }),
      el("span", { class: "msg" }),
      el("span", { class: "spacer" }),
      el("span", { class: "eta" }),
    ),
    el("div", { class: "job-body" }),
  );
  if (job.type === "lora") {
    const chart = el(
      "div",
      { class: "chart-box" },
      el("div", { class: "chart-head" }, el("span", { text: "Training loss" }), el("span", { class: "chart-last" })),
      el("canvas", { class: "loss-chart", "data-points": "0", height: "150" }),
    );
    $(".job-body", card).append(chart);
  }
  $(".job-body", card).append(el("div", { class: "result" }));
  const list = $("#jobs");
  if (prepend) list.prepend(card);
  else list.append(card);
  ui.jobs.set(job.jobId, v);
  $("#jobs-empty").hidden = true;
  render(v);
  if (job.type === "lora" && isFinal(job.status)) loadChartHistory(v);
  return v;
}

function render(v) {
  const { job, card } = v;
  card.dataset.status = job.status;
  const badge = $(".badge", card);
  badge.textContent = STATUS_LABEL[job.status] || job.status;
  badge.className = `badge badge-${job.status}`;
  const pct = Math.max(0, Math.min(100, Number(job.progress) || 0));
  const bar = $(".progress", card);
  bar.setAttribute("aria-valuenow", String(pct));
  bar.dataset.progress = String(pct);
  $(".bar", bar).style.width = `${pct}%`;
  $(".pct", card).textContent = `${pct.toFixed(pct % 1 ? 1 : 0)} %`;
  $(".msg", card).textContent = job.message || "";
  const eta = $(".eta", card);
  if (job.status === "running" && job.etaSeconds != null) eta.textContent = `~${fmtDuration(job.etaSeconds)} left`;
  else if (isFinal(job.status) && job.startedAt && job.finishedAt)
    eta.textContent = `took ${fmtDuration((Date.parse(job.finishedAt) - Date.parse(job.startedAt)) / 1000)}`;
  else eta.textContent = "";
  $(".cancel", card).hidden = isFinal(job.status);
  renderResult(v);
  if (job.type === "lora") drawChart(v);
}

function renderResult(v) {
  const { job, card } = v;
  const box = $(".result", card);
  if (job.status === "completed" && job.result) {
    const arts = job.result.artifacts || [];
    const img = arts.find((a) => String(a.contentType || "").startsWith("image/"));
    if (img && v.imageShown !== img.url) {
      v.imageShown = img.url;
      const src = ui.client.baseUrl + img.url;
      box.replaceChildren(
        el(
          "a",
          { href: src, target: "_blank", rel: "noopener", class: "image-link", title: "Open full size" },
          el("img", {
            class: "result-image",
            src,
            alt: String(job.input?.prompt ?? "generated image"),
            width: job.result.width,
            height: job.result.height,
          }),
        ),
        el("div", {
          class: "result-line muted",
          text: `${job.result.width ? `${job.result.width}×${job.result.height} ` : ""}${img.contentType} · ${fmtBytes(img.bytes)}`,
        }),
        imageActions(img.url),
      );
    } else if (!img && !box.dataset.done) {
      const facts = [];
      if (job.result.finalLoss != null) facts.push(`final loss ${fmtLoss(job.result.finalLoss)}`);
      if (job.result.steps != null) facts.push(`${job.result.steps} steps`);
      if (job.result.seconds != null) facts.push(`slept ${job.result.seconds} s`);
      box.replaceChildren(
        el(
          "div",
          { class: "result-line" },
          facts.length ? el("span", { text: facts.join(" · ") }) : null,
          ...arts.map((a) =>
            el(
              "a",
              { class: "artifact", href: ui.client.baseUrl + a.url, download: a.url.split("/").pop() },
              `⬇ ${a.url.split("/").pop()}`,
              el("span", { class: "muted", text: ` ${fmtBytes(a.bytes)}` }),
            ),
          ),
        ),
      );
    }
    box.dataset.done = "1";
  } else if (job.error && isFinal(job.status)) {
    box.replaceChildren(
      el("div", { class: "job-error" }, el("code", { text: job.error.code }), ` ${job.error.message || ""}`),
    );
  } else if (!isFinal(job.status)) {
    box.replaceChildren();
  }
}

function scheduleRender(v) {
  if (v.frame) return;
  v.frame = requestAnimationFrame(() => {
    v.frame = 0;
    render(v);
  });
}

// ---- loss chart ---------------------------------------------------------------------------------

function drawChart(v) {
  const canvas = $(".loss-chart", v.card);
  if (!canvas) return;
  const pts = [...v.points.entries()].sort((a, b) => a[0] - b[0]);
  canvas.dataset.points = String(pts.length);
  const last = pts[pts.length - 1];
  $(".chart-last", v.card).textContent = last ? `step ${last[0]} · loss ${fmtLoss(last[1])}` : "";
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 600;
  const cssH = canvas.clientHeight || 150;
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const styles = getComputedStyle(document.documentElement);
  const grid = styles.getPropertyValue("--chart-grid").trim() || "#e5e7eb";
  const text = styles.getPropertyValue("--muted").trim() || "#6b7280";
  const line = styles.getPropertyValue("--accent").trim() || "#4f46e5";
  const pad = { l: 52, r: 12, t: 10, b: 22 };
  const w = cssW - pad.l - pad.r;
  const h = cssH - pad.t - pad.b;
  ctx.font = "11px ui-sans-serif, system-ui, sans-serif";
  ctx.fillStyle = text;
  if (pts.length < 2) {
    ctx.textAlign = "center";
    ctx.fillText(pts.length ? "collecting points…" : "waiting for the first steps…", cssW / 2, cssH / 2);
    return;
  }
  const maxStep = Math.max(v.job.input?.steps ?? 0, last[0]);
  let lo = Infinity;
  let hi = -Infinity;
  for (const [, y] of pts) {
    lo = Math.min(lo, y);
    hi = Math.max(hi, y);
  }
  if (hi - lo < 1e-12) {
    hi += Math.abs(hi) * 0.1 || 1;
    lo -= Math.abs(lo) * 0.1 || 1;
  }
  // a log axis when the loss spans a wide range (it usually drops fast, then flattens)
  const log = lo > 0 && hi / lo > 4;
  const f = log ? Math.log10 : (x) => x;
  const inv = log ? (x) => 10 ** x : (x) => x;
  let flo = f(lo);
  let fhi = f(hi);
  const span = fhi - flo;
  flo -= span * 0.06;
  fhi += span * 0.06;
  lo = inv(flo);
  hi = inv(fhi);
  $(".chart-head > span", v.card).textContent = log ? "Training loss (log scale)" : "Training loss";
  const X = (s) => pad.l + (s / maxStep) * w;
  const Y = (y) => pad.t + (1 - (f(y) - flo) / (fhi - flo)) * h;
  // grid and labels
  ctx.strokeStyle = grid;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 3; i++) {
    const y = inv(flo + ((fhi - flo) * i) / 3);
    const py = Math.round(Y(y)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(pad.l, py);
    ctx.lineTo(pad.l + w, py);
    ctx.stroke();
    ctx.fillText(fmtLoss(y), pad.l - 6, py);
  }
  ctx.textBaseline = "top";
  for (const [s, align] of [[0, "left"], [Math.round(maxStep / 2), "center"], [maxStep, "right"]]) {
    ctx.textAlign = align;
    ctx.fillText(String(s), X(s), pad.t + h + 6);
  }
  // area and line
  ctx.beginPath();
  pts.forEach(([s, y], i) => (i ? ctx.lineTo(X(s), Y(y)) : ctx.moveTo(X(s), Y(y))));
  ctx.strokeStyle = line;
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  ctx.stroke();
  ctx.lineTo(X(last[0]), pad.t + h);
  ctx.lineTo(X(pts[0][0]), pad.t + h);
  ctx.closePath();
  const grad = ctx.createLinearGradient(0, pad.t, 0, pad.t + h);
  grad.addColorStop(0, `${line}33`);
  grad.addColorStop(1, `${line}00`);
  ctx.fillStyle = grad;
  ctx.fill();
  ctx.beginPath();
  ctx.arc(X(last[0]), Y(last[1]), 3, 0, Math.PI * 2);
  ctx.fillStyle = line;
  ctx.fill();
}

function addPoint(v, evt) {
  const d = evt.data;
  if (evt.type !== "progress" || !d || typeof d.loss !== "number") return;
  v.points.set(typeof d.step === "number" ? d.step : evt.seq, d.loss); // keyed by step: replays never duplicate
}

async function loadChartHistory(v) {
  if (v.chartLoaded) return;
  v.chartLoaded = true;
  try {
    const { events } = await ui.client.events(v.job.jobId);
    for (const evt of events) addPoint(v, evt);
    drawChart(v);
  } catch {
    v.chartLoaded = false;
  }
}

// ---- live following -------------------------------------------------------------------------------

function loadLive(jobId) {
  try {
    return JSON.parse(localStorage.getItem(LIVE_PREFIX + jobId) || "null");
  } catch {
    return null;
  }
}

function persistLive(v) {
  if (v.persistTimer) return;
  v.persistTimer = setTimeout(() => {
    v.persistTimer = null;
    if (isFinal(v.job.status)) return;
    try {
      localStorage.setItem(
        LIVE_PREFIX + v.job.jobId,
        JSON.stringify({ seq: v.seq, points: [...v.points.entries()] }),
      );
    } catch {
      /* storage full: a reload then replays from 0, which is fine */
    }
  }, 200);
}

function dropLive(v) {
  clearTimeout(v.persistTimer);
  v.persistTimer = null;
  localStorage.removeItem(LIVE_PREFIX + v.job.jobId);
}

function follow(jobId, since) {
  const v = ui.jobs.get(jobId);
  if (!v || v.unsub) return;
  v.seq = since;
  v.unsub = ui.client.subscribe(
    jobId,
    (msg) => {
      if (msg.type === "error") {
        toast(`${jobId.slice(0, 8)}…: ${msg.message}`, "error");
        if (msg.code === "NOT_FOUND") stopFollowing(v);
        return;
      }
      if (msg.type === "subscribed") {
        v.job = applyEvent(v.job, msg);
        scheduleRender(v);
        if (isFinal(v.job.status) && v.seq >= v.job.seq) finished(v);
        return;
      }
      v.seq = msg.seq;
      v.job = applyEvent(v.job, msg);
      addPoint(v, msg);
      if (isFinalEvent(msg)) {
        // the snapshot may be newer than this replayed event; the final event carries the result
        if (msg.data && msg.data.result) v.job = { ...v.job, result: msg.data.result };
        finished(v);
      } else {
        persistLive(v);
      }
      scheduleRender(v);
    },
    { since },
  );
}

function stopFollowing(v) {
  if (v.unsub) v.unsub();
  v.unsub = null;
}

function finished(v) {
  dropLive(v);
  stopFollowing(v);
  render(v);
  refreshCredits(150);
  updateSummary();
}

async function cancelJob(v) {
  const btn = $(".cancel", v.card);
  btn.disabled = true;
  try {
    const job = await ui.client.cancel(v.job.jobId);
    if (job.seq >= (v.job.seq ?? 0)) v.job = job;
    render(v);
    refreshCredits(150);
  } catch (err) {
    toast(err.code === "JOB_FINISHED" ? "That job has already finished." : `Cancel failed: ${err.message}`, "error");
  } finally {
    btn.disabled = false;
  }
}

function updateSummary() {
  let live = 0;
  for (const v of ui.jobs.values()) if (!isFinal(v.job.status)) live++;
  $("#jobs-summary").textContent = `${ui.jobs.size} shown${live ? ` · ${live} live` : ""}`;
}

// ---- history ------------------------------------------------------------------------------------

async function loadPage() {
  const btn = $("#load-more");
  btn.disabled = true;
  try {
    const page = await ui.client.list({ limit: PAGE_SIZE, cursor: ui.cursor || undefined });
    for (const job of page.jobs) {
      const v = addJob(job);
      if (!isFinal(job.status) && !v.unsub) resume(v);
    }
    ui.cursor = page.nextCursor;
    btn.hidden = !page.nextCursor;
    $("#jobs-empty").hidden = ui.jobs.size > 0;
    updateSummary();
  } catch (err) {
    toast(`Could not load jobs: ${err.message}`, "error");
  } finally {
    btn.disabled = false;
  }
}

function resume(v) {
  const saved = loadLive(v.job.jobId);
  let since = 0;
  if (saved && Number.isInteger(saved.seq) && saved.seq > 0) {
    since = saved.seq;
    for (const [s, loss] of saved.points || []) v.points.set(s, loss);
  }
  ui.resumedFrom[v.job.jobId] = since;
  follow(v.job.jobId, since);
}

$("#load-more").addEventListener("click", loadPage);

async function resumeStrays() {
  // running jobs saved before a reload but no longer on the first page
  for (const k of Object.keys(localStorage)) {
    if (!k.startsWith(LIVE_PREFIX)) continue;
    const jobId = k.slice(LIVE_PREFIX.length);
    if (ui.jobs.has(jobId)) continue;
    try {
      const job = await ui.client.get(jobId);
      if (isFinal(job.status)) localStorage.removeItem(k);
      else resume(addJob(job, { prepend: true }));
    } catch {
      localStorage.removeItem(k);
    }
  }
}

window.addEventListener("resize", () => {
  for (const v of ui.jobs.values()) if (v.job.type === "lora") drawChart(v);
});

// ---- start --------------------------------------------------------------------------------------

async function start() {
  takeKeyFromHash();
  const key = localStorage.getItem(KEY_STORAGE);
  if (!key) {
    showLogin();
    document.body.dataset.ready = "login";
    return;
  }
  ui.client = createClient({ baseUrl: "", token: () => localStorage.getItem(KEY_STORAGE) });
  ui.client.onStateChange(showConnState);
  let me;
  try {
    me = await ui.client.me();
  } catch (err) {
    if (err.status === 401) {
      localStorage.removeItem(KEY_STORAGE);
      showLogin("That API key was not accepted.");
    } else {
      showLogin(`Could not reach the server: ${err.message}`);
    }
    document.body.dataset.ready = "login";
    return;
  }
  $("#login").hidden = true;
  $("#session").hidden = false;
  $("#app").hidden = false;
  $("#credits").textContent = me.credits.toLocaleString();
  $("#user").textContent = me.name;
  const { types } = await ui.client.types();
  ui.types = types;
  renderTabs();
  renderTypeSelect();
  await loadPage();
  await resumeStrays();
  document.body.dataset.ready = "1";
}

start().catch((err) => {
  toast(`Console failed to start: ${err.message || err}`, "error");
  document.body.dataset.ready = "error";
});
