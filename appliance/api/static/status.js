// The appliance's status page. Plain JavaScript, no dependencies: it polls the admin API and
// /metrics (what the CLI reads) and draws what it finds. The admin key is asked for once and
// kept in this tab's session storage; it is sent as "Authorization: Bearer <key>".
"use strict";

const REFRESH_MS = 2000;
const CHART_WINDOW_MS = 5 * 60 * 1000;
const KEY_STORAGE = "appliance.adminKey";
const COLOURS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563"];
const ACTIONS = {
  // Which buttons a model in a given state offers.
  unloaded: ["load"], failed: ["load", "unload"], loading: ["unload"], downloading: ["unload"],
  ready: ["unload", "sleep"], sleeping: ["wake", "unload"], draining: [],
};

const view = {
  adminRefused: false, // the last admin call answered 401/403
  refusal: "", // and what it said
  busy: new Set(), // models with an action in flight
  samples: [], // {t, totals: {model: generated tokens}} from /metrics
  deviceKind: null,
};

const $ = (id) => document.getElementById(id);

function adminKey() { return sessionStorage.getItem(KEY_STORAGE); }

function headers() {
  const key = adminKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function call(method, path) {
  const response = await fetch(path, { method, headers: headers(), cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch (_) { /* /metrics is text; errors are JSON */ }
  return { status: response.status, body };
}

function errorText(body, status) {
  return (body && body.error && body.error.message) || "HTTP " + status;
}

function notice(text, isError) {
  const el = $("notice");
  el.hidden = !text;
  el.textContent = text || "";
  el.className = isError ? "error" : "";
}

// -- Prometheus text ------------------------------------------------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    const pairs = /(\w+)="((?:[^"\\]|\\.)*)"/g;
    let pair;
    while ((pair = pairs.exec(match[3] || "")) !== null) {
      labels[pair[1]] = pair[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

function byModel(samples, name) {
  const found = {};
  for (const s of samples) {
    if (s.name === name && s.labels.model) found[s.labels.model] = (found[s.labels.model] || 0) + s.value;
  }
  return found;
}

// What /metrics alone says about each model: enough to list them when the admin API refuses.
function modelsFromMetrics(samples) {
  const models = {};
  for (const s of samples) {
    if (s.name === "appliance_model_state" && s.value === 1) {
      models[s.labels.model] = { name: s.labels.model, state: s.labels.state };
    }
  }
  const inFlight = byModel(samples, "appliance_requests_in_flight");
  const waiting = byModel(samples, "appliance_engine_waiting_requests");
  for (const m of Object.values(models)) {
    m.in_flight = inFlight[m.name] || 0;
    m.engine_waiting = waiting[m.name] || 0;
  }
  return Object.values(models).sort((a, b) => a.name.localeCompare(b.name));
}

// -- drawing --------------------------------------------------------------------------------

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function gib(value) { return typeof value === "number" ? value.toFixed(1) + " GiB" : "-"; }

function drawModels(models) {
  const body = $("models").querySelector("tbody");
  body.replaceChildren();
  for (const m of models) {
    const row = document.createElement("tr");
    row.dataset.model = m.name;
    row.dataset.state = m.state || "unknown";
    cell(row, m.name);
    const badge = document.createElement("span");
    badge.className = "state state-" + (m.state || "unknown");
    badge.textContent = view.busy.has(m.name) ? m.state + "…" : m.state || "unknown";
    row.appendChild(document.createElement("td")).appendChild(badge);
    const devices = (m.devices || []).map((d) => (view.deviceKind || "dev") + d).join(", ");
    cell(row, m.backend_url ? "remote" : devices || "-");
    cell(row, gib(m.memory_gib), "num");
    cell(row, String(m.in_flight ?? 0), "num");
    cell(row, String((m.waiting ?? 0) + (m.engine_waiting ?? 0)), "num");
    cell(row, m.load_seconds ? m.load_seconds.toFixed(1) + " s" : "-", "num");
    const err = cell(row, m.last_error || "", "error");
    err.title = m.last_error || "";
    const actions = row.appendChild(document.createElement("td"));
    if (!m.backend_url) {
      for (const action of ACTIONS[m.state] || []) {
        if (action !== "load" && action !== "unload" && view.deviceKind !== "gpu") continue;
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = action[0].toUpperCase() + action.slice(1);
        button.dataset.action = action;
        button.dataset.model = m.name;
        button.disabled = view.busy.has(m.name);
        button.addEventListener("click", () => act(m.name, action));
        actions.appendChild(button);
      }
    }
    body.appendChild(row);
  }
}

function drawDevices(admin) {
  const box = $("devices");
  box.replaceChildren();
  if (!admin) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "enter the admin key to see devices and memory";
    box.appendChild(p);
    return;
  }
  admin.devices.forEach((device) => {
    const parts = [];
    admin.data.forEach((m, i) => {
      const at = (m.devices || []).indexOf(device.index);
      if (at >= 0 && m.reserved_gib && m.reserved_gib[at]) {
        parts.push({ model: m.name, gib: m.reserved_gib[at], colour: COLOURS[i % COLOURS.length] });
      }
    });
    const reserved = parts.reduce((sum, p) => sum + p.gib, 0);
    const div = document.createElement("div");
    div.className = "device";
    div.dataset.device = device.label;
    div.dataset.reserved = reserved.toFixed(2);
    div.dataset.total = device.total_gib.toFixed(2);
    const title = document.createElement("div");
    const unit = admin.device_kind === "cpu" ? "of the CPU memory budget" : "";
    title.textContent = `${device.label} (${device.name}): ${reserved.toFixed(1)} / ` +
      `${device.total_gib.toFixed(1)} GiB reserved ${unit}`;
    div.appendChild(title);
    const bar = document.createElement("div");
    bar.className = "bar";
    for (const p of parts) {
      const seg = document.createElement("span");
      seg.className = "seg";
      seg.dataset.model = p.model;
      seg.title = `${p.model}: ${p.gib.toFixed(1)} GiB`;
      seg.style.width = Math.min(100, (100 * p.gib) / device.total_gib) + "%";
      seg.style.background = p.colour;
      bar.appendChild(seg);
    }
    div.appendChild(bar);
    box.appendChild(div);
  });
}

function drawChart() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const now = Date.now();
  const series = {};
  for (let i = 1; i < view.samples.length; i++) {
    const a = view.samples[i - 1];
    const b = view.samples[i];
    const seconds = (b.t - a.t) / 1000;
    if (seconds <= 0) continue;
    for (const model of Object.keys(b.totals)) {
      // A counter that went down means the appliance restarted: no rate for that step.
      const rate = Math.max(0, (b.totals[model] - (a.totals[model] || 0)) / seconds);
      (series[model] = series[model] || []).push({ t: b.t, rate });
    }
  }
  let max = 0;
  for (const points of Object.values(series)) for (const p of points) max = Math.max(max, p.rate);
  const top = max > 0 ? max * 1.1 : 1;
  const pad = 36;
  // The time axis spans the samples there are, up to five minutes: a page opened a moment
  // ago draws its first seconds across the whole width rather than in the last pixels.
  const first = view.samples.length ? view.samples[0].t : now;
  const span = Math.max(10 * 1000, Math.min(CHART_WINDOW_MS, now - first));
  ctx.strokeStyle = "#9ca3af";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(pad, 4);
  ctx.lineTo(pad, height - 16);
  ctx.lineTo(width - 4, height - 16);
  ctx.stroke();
  ctx.fillStyle = "#4b5563";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(top.toFixed(top < 10 ? 1 : 0), 2, 12);
  ctx.fillText("0", 2, height - 16);
  const start = span >= CHART_WINDOW_MS ? "-5 min" : `-${Math.round(span / 1000)} s`;
  ctx.fillText(start, pad, height - 2);
  ctx.fillText("now", width - 28, height - 2);
  const x = (t) => pad + ((width - pad - 4) * (t - (now - span))) / span;
  const y = (rate) => height - 16 - ((height - 24) * rate) / top;
  const legend = $("legend");
  legend.replaceChildren();
  Object.keys(series).sort().forEach((model, i) => {
    const colour = COLOURS[i % COLOURS.length];
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    series[model].forEach((p, j) => (j ? ctx.lineTo(x(p.t), y(p.rate)) : ctx.moveTo(x(p.t), y(p.rate))));
    ctx.stroke();
    const entry = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = colour;
    entry.append(swatch, model);
    legend.appendChild(entry);
  });
  canvas.dataset.samples = String(view.samples.length);
  canvas.dataset.maxRate = max.toFixed(3);
}

function drawUsage(usage) {
  const body = $("usage").querySelector("tbody");
  body.replaceChildren();
  for (const u of (usage && usage.data) || []) {
    const row = document.createElement("tr");
    row.dataset.key = u.key;
    row.dataset.model = u.model;
    cell(row, u.key || "(no key)");
    cell(row, u.model);
    for (const n of [u.requests, u.errors, u.prompt_tokens, u.completion_tokens]) cell(row, String(n), "num");
    body.appendChild(row);
  }
}

function drawKeyState() {
  const has = Boolean(adminKey());
  $("key-state").textContent = has ? "admin key set" : view.adminRefused ? "no admin key" : "";
  $("forget-key").hidden = !has;
  $("key-button").hidden = has;
}

// -- refresh --------------------------------------------------------------------------------

async function refresh() {
  let admin = null;
  let samples = [];
  const [models, metrics, usage] = await Promise.all([
    call("GET", "/admin/models").catch(() => null),
    fetch("/metrics", { headers: headers(), cache: "no-store" }).catch(() => null),
    call("GET", "/admin/usage").catch(() => null),
  ]);
  if (metrics && metrics.ok) samples = parseMetrics(await metrics.text());
  if (models && models.status === 200) {
    admin = models.body;
    view.adminRefused = false;
    view.deviceKind = admin.device_kind;
  } else if (models && (models.status === 401 || models.status === 403)) {
    view.adminRefused = true;
    view.refusal = errorText(models.body, models.status);
  }
  if (!models || !metrics) {
    notice("the appliance does not answer; retrying", true);
  } else if (view.adminRefused) {
    notice(`Enter the admin key to see devices and memory and to load or unload models ` +
      `(the appliance says: ${view.refusal})`, false);
  } else if (!document.querySelector("#notice.error")) {
    notice("", false);
  }
  if (samples.length) {
    const totals = byModel(samples, "appliance_generation_tokens_total");
    view.samples.push({ t: Date.now(), totals });
    const oldest = Date.now() - CHART_WINDOW_MS;
    while (view.samples.length && view.samples[0].t < oldest) view.samples.shift();
  }
  const list = admin ? admin.data : modelsFromMetrics(samples);
  drawModels(list);
  drawDevices(admin);
  drawChart();
  drawUsage(usage && usage.status === 200 ? usage.body : null);
  drawKeyState();
  const ready = list.filter((m) => m.state === "ready").length;
  $("summary").textContent = `${list.length} models, ${ready} ready` +
    (admin ? ` · ${admin.device_kind} · catalogue: ${admin.catalogue_source}` : "");
  document.body.dataset.refreshed = String(Date.now());
}

// -- the admin key and actions --------------------------------------------------------------

function askForKey(why) {
  $("key-dialog-why").textContent = why || "";
  $("key-input").value = "";
  $("key-dialog").showModal();
  $("key-input").focus();
}

async function act(name, action) {
  if (!adminKey() && view.adminRefused) {
    // No key and the admin API wants one: ask, and send nothing.
    askForKey(`to ${action} ${name}`);
    return;
  }
  view.busy.add(name);
  await refresh();
  try {
    const path = `/admin/models/${encodeURIComponent(name)}/${action}`;
    const { status, body } = await call("POST", path);
    if (status === 401 || status === 403) {
      sessionStorage.removeItem(KEY_STORAGE);
      view.adminRefused = true;
      askForKey(`the appliance refused the key: ${errorText(body, status)}`);
    } else if (status >= 400) {
      notice(`${action} ${name}: ${errorText(body, status)}`, true);
    } else {
      notice("", false);
    }
  } catch (err) {
    notice(`${action} ${name}: ${err}`, true);
  } finally {
    view.busy.delete(name);
    await refresh();
  }
}

function setUp() {
  $("key-button").addEventListener("click", () => askForKey(""));
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    refresh();
  });
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  const save = () => {
    const key = $("key-input").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    $("key-dialog").close();
    refresh();
  };
  $("key-save").addEventListener("click", save);
  $("key-input").addEventListener("keydown", (event) => { if (event.key === "Enter") save(); });
  refresh();
  setInterval(refresh, REFRESH_MS);
}

setUp();
