// tunelab ui: the runs table, a run's details, comparisons and the training form.
// Plain JavaScript without libraries (the page must work offline); every value from the
// server goes into the page as text (textContent), never as HTML.
"use strict";

const COLORS = ["#2f5bd3", "#d9480f", "#2b8a3e", "#9c36b5", "#c2255c", "#0b7285", "#5c940d", "#862e9c"];
const state = { runs: [], selected: new Set(), open: null, job: null, form: null };

// ---------------------------------------------------------------------------------------------
// helpers

async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) {
    const error = new Error(data.error ? data.error.message : response.statusText);
    error.field = data.error && data.error.field;
    throw error;
  }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const num = (v, digits = 4) => (v === null || v === undefined ? "" : Number(v).toFixed(digits));
const value = (v) => (Number.isInteger(v) && Math.abs(v) > 1 ? String(v) : num(v)); // counts as counts

function size(bytes) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return (i ? bytes.toFixed(1) : bytes) + " " + units[i];
}
const q = (ids) => ids.map((id) => "run=" + encodeURIComponent(id)).join("&");
const statusBadge = (s) => el("span", { class: "status " + s }, s);

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function kvTable(pairs) {
  return el("table", { class: "kv" }, pairs.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))));
}

function flatten(tree, prefix = "") {
  const out = [];
  for (const [key, value] of Object.entries(tree || {})) {
    if (value && typeof value === "object" && !Array.isArray(value)) out.push(...flatten(value, prefix + key + "."));
    else out.push([prefix + key, typeof value === "string" ? value : JSON.stringify(value)]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// line charts in SVG

function lineChart(title, xLabel, series) {
  const W = 520, H = 280, L = 58, R = 14, T = 26, B = 40;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("text", { x: L, y: 15, class: "title" }, title);
  const points = series.flatMap((s) => s.points);
  if (!points.length) {
    add("text", { x: L, y: H / 2 }, "nothing logged yet");
    return svg;
  }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  let lastStep = null;  // steps are integers: a short range would repeat rounded labels
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4, x = Math.round(x0 + ((x1 - x0) * i) / 4);
    add("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid" });
    add("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, Number(y.toPrecision(3)));
    if (x !== lastStep) add("text", { x: sx(x), y: H - B + 15, "text-anchor": "middle" }, x);
    lastStep = x;
  }
  add("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  add("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  add("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, xLabel);
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
    add("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.8 });
    if (s.markers) s.points.forEach((p) => add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.8, fill: s.color }));
    if (series.length > 1) {
      add("rect", { x: W - R - 150, y: T + 4 + i * 15, width: 10, height: 3, fill: s.color });
      add("text", { x: W - R - 136, y: T + 9 + i * 15 }, s.name.length > 24 ? "…" + s.name.slice(-23) : s.name);
    }
  });
  return svg;
}

async function curvesView(ids, metric) {
  const data = await api("/api/curves?" + q(ids) + (metric ? "&metric=" + encodeURIComponent(metric) : ""));
  const color = (i) => COLORS[i % COLORS.length];
  const loss = data.runs.map((r, i) => ({ name: r.run, points: r.loss, color: color(i) }));
  const val = data.runs.map((r, i) => ({ name: r.run, points: r.validation, color: color(i), markers: true }));
  const box = el("div", {});
  const select = el("select", {
    onchange: async () => box.replaceWith(await curvesView(ids, select.value)),
  }, data.metrics.map((m) => el("option", { value: m, selected: m === data.metric }, m)));
  box.append(
    el("div", { class: "row" }, el("h3", {}, "Curves"), data.metrics.length ? select : null,
      el("span", { class: "muted" }, data.lower_is_better ? "lower is better" : "higher is better")),
    el("div", { class: "charts" },
      lineChart("training loss", "optimizer step", loss),
      lineChart("validation " + data.metric, "optimizer step", val)));
  return box;
}

// ---------------------------------------------------------------------------------------------
// the runs table

async function refreshRuns() {
  const data = await api("/api/runs");
  state.runs = data.runs;
  document.getElementById("root").textContent = data.root;
  const ids = new Set(data.runs.map((r) => r.id));
  for (const id of [...state.selected]) if (!ids.has(id)) state.selected.delete(id);
  const body = document.querySelector("#runs tbody");
  body.replaceChildren(...data.runs.map(runRow));
  document.getElementById("runs-empty").hidden = data.runs.length > 0;
  document.getElementById("runs-count").textContent = data.runs.length + (data.runs.length === 1 ? " run" : " runs");
  document.getElementById("compare").disabled = state.selected.size < 2;
}

function runRow(r) {
  const box = el("input", {
    type: "checkbox", checked: state.selected.has(r.id), "aria-label": "select " + r.id,
    onclick: (event) => event.stopPropagation(),
    onchange: () => {
      if (box.checked) state.selected.add(r.id); else state.selected.delete(r.id);
      document.getElementById("compare").disabled = state.selected.size < 2;
    },
  });
  const steps = r.total_steps ? r.steps + "/" + r.total_steps : r.steps ?? "";
  return el("tr", { "data-run": r.id, class: r.id === state.open ? "open" : null, title: r.error || null,
    onclick: () => showRun(r.id) },
  el("td", {}, box), el("td", {}, r.id), el("td", {}, statusBadge(r.status)), el("td", {}, r.task),
  el("td", {}, r.model), el("td", {}, r.method), el("td", {}, r.metric),
  el("td", { class: "num" }, num(r.validation)), el("td", { class: "num" }, num(r.test)),
  el("td", { class: "num" }, steps), el("td", {}, (r.started || "").replace("T", " ").slice(0, 16)),
  el("td", { class: "num" }, duration(r.train_seconds)));
}

// ---------------------------------------------------------------------------------------------
// one run

async function showRun(id) {
  state.open = id;
  const view = document.getElementById("view");
  let run;
  try {
    run = await api("/api/run?run=" + encodeURIComponent(id));
  } catch (error) {
    view.replaceChildren(el("p", { class: "error" }, error.message));
    return;
  }
  const s = run.summary, p = run.progress;
  const parts = [
    el("div", { class: "row" }, el("h2", {}, id), statusBadge(s.status),
      el("span", { class: "muted" }, run.path)),
    run.status.error ? el("p", { class: "error" }, run.status.error) : null,
    el("div", { class: "grid2" },
      el("div", {}, el("h3", {}, "Run"), kvTable([
        ["task", s.task + " (metric " + s.metric + ")"], ["model", (run.config.model || {}).name],
        ["method", s.method], ["steps", s.total_steps ? s.steps + " / " + s.total_steps : s.steps],
        ["started", (s.started || "").replace("T", " ")],
        ["training time", duration(s.train_seconds)],
        s.status === "running" ? ["ETA", duration(p.eta_s)] : null,
        ["versions", "tunelab " + run.env.tunelab + ", torch " + run.env.torch + ", transformers " + run.env.transformers],
        ["device", (run.env.device || "") + ", " + (run.env.precision || "") + ", " + (run.env.threads || "?") + " threads"],
      ].filter(Boolean))),
      el("div", {}, el("h3", {}, "Results"), resultsTable(run.results, s))),
    await curvesView([id]),
  ];
  if (run.plots.length) {
    parts.push(el("h3", {}, "Plots"), el("div", { class: "plots" }, run.plots.map((path) =>
      el("figure", {}, el("img", { src: "/api/plot?run=" + encodeURIComponent(id) + "&path=" + encodeURIComponent(path), alt: path }),
        el("figcaption", {}, path)))));
  }
  parts.push(el("div", { class: "grid2" },
    el("div", {}, el("h3", {}, "Config"), kvTable(flatten(run.config))),
    el("div", {}, el("h3", {}, "Files"), kvTable(run.files.map((f) =>
      [f.name + (f.dir ? "/" : ""), size(f.bytes)])))));
  if (run.log) parts.push(el("h3", {}, "train.log (last lines)"), el("pre", { class: "log" }, run.log));
  if (state.open !== id) return; // another run was opened meanwhile
  view.replaceChildren(el("div", { id: "run-detail", "data-run": id }, parts));
  document.querySelectorAll("#runs tbody tr").forEach((tr) => tr.classList.toggle("open", tr.dataset.run === id));
}

function resultsTable(results, summary) {
  const splits = ["validation", "test"].filter((split) => results[split]);
  if (!splits.length) {
    return el("p", { class: "muted" }, "no results yet; best validation " + summary.metric +
      " so far: " + (num(summary.validation) || "none"));
  }
  const keys = Object.keys(results[splits[0]]).filter((k) => typeof results[splits[0]][k] === "number");
  const t = results.train || {};
  return el("div", {},
    el("table", {}, el("tr", {}, el("th", {}, "metric"), splits.map((sp) => el("th", {}, sp))),
      keys.map((k) => el("tr", {}, el("td", {}, k), splits.map((sp) => el("td", { class: "num" }, value(results[sp][k])))))),
    t.steps ? el("p", { class: "muted" }, t.steps + " steps (best " + t.best_step + "), " +
      num(t.samples_per_s, 1) + " samples/s, " + num(t.trainable_percent, 3) + "% of " +
      t.total_params + " parameters trained") : null);
}

// ---------------------------------------------------------------------------------------------
// several runs

async function showCompare() {
  const ids = [...state.selected];
  state.open = null;
  const view = document.getElementById("view");
  try {
    const diff = await api("/api/diff?" + q(ids));
    const head = el("tr", {}, el("th", {}, "key"), ids.map((id) => el("th", {}, id)));
    const diffTable = (rows) => rows.length ? el("table", {}, head.cloneNode(true), rows.map((r) =>
      el("tr", {}, el("td", {}, r.key), r.values.map((v) => el("td", {}, typeof v === "string" ? v : JSON.stringify(v))))))
      : el("p", { class: "muted" }, "identical");
    const summaries = el("table", { id: "compare-table" },
      el("tr", {}, ["run", "status", "method", "metric", "validation", "test", "steps", "time", "trained %"].map((h) => el("th", {}, h))),
      diff.summaries.map((s, i) => el("tr", {}, el("td", {}, ids[i]), el("td", {}, statusBadge(s.status)),
        el("td", {}, s.method), el("td", {}, s.metric), el("td", { class: "num" }, num(s.validation)),
        el("td", { class: "num" }, num(s.test)), el("td", { class: "num" }, s.steps),
        el("td", { class: "num" }, duration(s.train_seconds)),
        el("td", { class: "num" }, num((diff.results[i].train || {}).trainable_percent, 3)))));
    view.replaceChildren(el("div", { id: "compare-view" },
      el("h2", {}, "Comparing " + ids.length + " runs"), summaries, await curvesView(ids),
      el("div", { class: "grid2" },
        el("div", {}, el("h3", {}, "Config keys that differ"), diffTable(diff.config)),
        el("div", {}, el("h3", {}, "Environment keys that differ"), diffTable(diff.env)))));
  } catch (error) {
    view.replaceChildren(el("p", { class: "error" }, error.message));
  }
}

// ---------------------------------------------------------------------------------------------
// new training

async function showTrainingForm() {
  state.open = null;
  const data = await api("/api/recipes");
  const select = el("select", { id: "recipe", onchange: () => loadForm(select.value, {}) },
    data.recipes.map((r) => el("option", { value: r.path, disabled: !!r.error, title: r.error || r.title },
      (r.path || "(no recipe)") + (r.error ? " (not a recipe)" : "") + (r.title ? " — " + r.title : ""))));
  const form = el("form", { id: "train-form", onsubmit: startTraining },
    el("div", { class: "row" }, el("label", { for: "recipe" }, "Recipe"), select),
    el("p", { class: "muted" }, "Recipes from " + (data.folder || "no folder (start with --recipes DIR)") +
      ". Changed fields become key=value overrides of the recipe; an empty field is null."),
    el("div", { id: "fields" }),
    el("div", { class: "row" }, el("label", { for: "run-name" }, "Run name"),
      el("input", { id: "run-name", placeholder: "default: date-time-recipe-method", pattern: "[A-Za-z0-9][A-Za-z0-9._-]*" }),
      el("span", { class: "spacer" }), el("button", { type: "submit", id: "start" }, "Start")),
    el("code", { id: "command", class: "command" }),
    el("p", { id: "form-error", class: "error", hidden: true }));
  document.getElementById("view").replaceChildren(el("h2", {}, "New training"), form);
  const first = data.recipes.find((r) => !r.error);
  select.value = first.path;
  await loadForm(first.path, {});
}

async function loadForm(recipe, values) {
  try {
    const data = await api("/api/form", { recipe, values });
    state.form = data;
    renderFields(data.fields);
    showFormState(data, null);
  } catch (error) {
    showFormState(null, error);
  }
}

function renderFields(fields) {
  const sections = {};
  for (const f of fields) (sections[f.key.split(".")[0]] ||= []).push(f);
  document.getElementById("fields").replaceChildren(...Object.entries(sections).map(([name, list]) =>
    el("fieldset", {}, el("legend", {}, name), list.map(fieldRow))));
}

function fieldRow(f) {
  const id = "field-" + f.key;
  let input;
  const options = f.choices || (f.type === "bool" ? ["true", "false"] : null);
  if (options) {
    input = el("select", { id, name: f.key }, options.map((c) => el("option", { value: c, selected: c === f.text }, c === "" ? "(unset)" : c)));
  } else {
    input = el("input", { id, name: f.key, value: f.text, placeholder: f.nullable ? "unset" : "", autocomplete: "off" });
  }
  const switches = f.key === "method.name" || f.key === "task.name";
  input.addEventListener(switches ? "change" : "input", switches ? () => loadForm(currentRecipe(), formValues()) : checkSoon);
  const type = f.type + (f.nullable ? " or null" : "");
  return el("div", { class: "field", "data-key": f.key },
    el("label", { for: id, title: type }, f.key), input,
    el("span", { class: "hint" }, f.doc, el("span", { class: "muted" }, " (" + type + ", default " + JSON.stringify(f.default) + ")")));
}

const currentRecipe = () => document.getElementById("recipe").value;

function formValues() {
  const values = {};
  document.querySelectorAll("#fields [name]").forEach((input) => { values[input.name] = input.value; });
  return values;
}

let checkTimer = null;
function checkSoon() {
  clearTimeout(checkTimer);
  checkTimer = setTimeout(async () => {
    try {
      showFormState(await api("/api/form", { recipe: currentRecipe(), values: formValues() }), null);
    } catch (error) {
      showFormState(null, error);
    }
  }, 300);
}

function showFormState(data, error) {
  const message = document.getElementById("form-error");
  message.hidden = !error;
  message.textContent = error ? error.message : "";
  if (data) document.getElementById("command").textContent = data.command;
  // `method={name: ia3}` replaces the section: it is the method.name field that changed
  const changed = new Set((data ? data.overrides : []).map((o) => o.split("=")[0])
    .map((key) => (key.includes(".") ? key : key + ".name")));
  document.querySelectorAll(".field").forEach((row) => {
    row.classList.toggle("bad", !!(error && error.field === row.dataset.key));
    if (data) row.classList.toggle("changed", changed.has(row.dataset.key));
  });
  document.getElementById("start").disabled = !!error;
}

async function startTraining(event) {
  event.preventDefault();
  const name = document.getElementById("run-name").value.trim() || null;
  try {
    const data = await api("/api/train", { recipe: currentRecipe(), values: formValues(), name });
    showJob(data.job);
    pollJob();
  } catch (error) {
    showFormState(null, error);
  }
}

// ---------------------------------------------------------------------------------------------
// the training started here

function showJob(job) {
  state.job = job;
  const panel = document.getElementById("job");
  panel.hidden = !job;
  if (!job) return;
  document.getElementById("job-run").textContent = job.run;
  document.getElementById("job-state").replaceWith(Object.assign(statusBadge(job.state), { id: "job-state" }));
  document.getElementById("job-command").textContent = job.command;
  document.getElementById("job-stop").disabled = !job.running;
  const p = job.progress || {};
  const share = p.total_steps ? Math.min(1, p.step / p.total_steps) : 0;
  document.getElementById("job-bar").style.width = (job.state === "finished" ? 100 : share * 100) + "%";
  document.getElementById("job-numbers").replaceChildren(
    el("span", { id: "job-step" }, "step " + (p.step ?? 0) + " / " + (p.total_steps ?? "?")),
    el("span", {}, "loss " + (num(p.loss) || "–")),
    el("span", {}, "validation " + (p.metric || "") + " " + (num(p.validation) || "–")),
    el("span", {}, "elapsed " + (duration(p.elapsed_s) || "–")),
    el("span", {}, "ETA " + (job.running ? duration(p.eta_s) || "–" : "–")));
  const error = document.getElementById("job-error");
  error.hidden = !job.error;
  error.textContent = job.error || "";
  const log = document.getElementById("job-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = job.log;
  if (atEnd) log.scrollTop = log.scrollHeight;
}

let jobTimer = null;
async function pollJob() {
  clearTimeout(jobTimer);
  const data = await api("/api/train");
  showJob(data.job);
  if (data.job && data.job.running) {
    jobTimer = setTimeout(pollJob, 1000);
  } else {
    await refreshRuns(); // the finished run, with its results, enters the table now
    if (data.job && state.open === data.job.run) await showRun(data.job.run);
  }
}

// ---------------------------------------------------------------------------------------------
// start

document.getElementById("new-training").addEventListener("click", showTrainingForm);
document.getElementById("compare").addEventListener("click", showCompare);
document.getElementById("job-stop").addEventListener("click", async () => {
  showJob((await api("/api/train/stop", {})).job);
});
document.getElementById("job-run").addEventListener("click", (event) => {
  event.preventDefault();
  if (state.job) showRun(state.job.run);
});

refreshRuns();
pollJob();
setInterval(() => {
  if (document.hidden) return;
  refreshRuns();
  const open = state.runs.find((r) => r.id === state.open);
  if (open && open.status === "running") showRun(open.id);
}, 3000);
