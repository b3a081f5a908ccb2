// The upload page's script (GET /page.js; the page's Content-Security-Policy allows no inline
// script). The model comes from a list the server serves (GET /v1/models); the page shows what
// that model's task needs.
//
// Classification: each chosen file is its own POST /v1/classify call, at most IN_FLIGHT at once:
// one image is never over the model's batch size or the server's images per request, a refused
// file fails alone, and the server's batcher still runs the concurrent calls together. Every file
// gets a card at once, in the order chosen (newest upload first), filled when its answer comes:
// the result, or the error in words.
//
// Segmentation: one file input per sequence the model takes (its `channels`, in order) and a
// Segment button: one POST /v1/segment call per slice, each part named by its sequence. The card
// shows the first sequence's image with the mask drawn over it and the mask alone (canvases, in
// the model's colours), a legend with each label's area, the regions' areas, or the error in words.
// A multi-modal classifier (a classifier with `channels`) takes the same slice form and a Classify
// button: one POST /v1/classify call, parts named by sequence, answered with a classification card.
//
// 429 (busy) and 503 (unavailable) are tried again after a backoff.
"use strict";

/** Calls at once (a browser opens at most 6 connections to one server). */
const IN_FLIGHT = 4;
/** Tries per file while the server answers 429 or 503; then the card says it gave up. */
const MAX_TRIES = 6;
/** The wait after the first refused try; it doubles after each, up to MAX_DELAY_MS. */
const FIRST_DELAY_MS = 250;
const MAX_DELAY_MS = 8000;

const $ = (id) => document.getElementById(id);
const statusBox = $("status");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

/** Files waiting for a call: { file, card, params }. */
const waiting = [];
/** Calls in flight, and this round's counts (a round ends when nothing is left). */
let active = 0;
const round = { total: 0, done: 0, failed: 0 };
/** Every model warning seen, for the banner. */
const warnings = new Set();

function classify(files) {
  if (!files.length) return;
  const params = new URLSearchParams();
  // "" while the list is loading or when it could not be loaded: the server's default model.
  if ($("model").value) params.set("model", $("model").value);
  if ($("preview").checked) params.set("preview", "1");
  const cards = files.map((file) => pendingCard(file));
  // Newest upload first; within one upload, in the order the files were chosen.
  $("results").prepend(...cards);
  files.forEach((file, i) => waiting.push({ file, card: cards[i], params }));
  round.total += files.length;
  progress();
  pump();
}

function pump() {
  while (active < IN_FLIGHT && waiting.length) {
    const job = waiting.shift();
    active += 1;
    classifyOne(job.file, job.params)
      .catch((e) => ({ error: `The page failed: ${e.message}` }))
      .then((outcome) => finish(job, outcome));
  }
}

/** A file's answer: its card filled, the next file started. */
function finish(job, outcome) {
  active -= 1;
  round.done += 1;
  let card;
  try {
    if (outcome.result) {
      card = resultCard(outcome.result, job.file);
      noteWarnings(outcome.result);
    }
  } catch (e) {
    outcome = { error: `The answer could not be shown: ${e.message}` };
  }
  if (!card) {
    round.failed += 1;
    card = failedCard(job.file, outcome.error);
  }
  job.card.replaceWith(card);
  progress();
  pump();
}

function progress() {
  const { total, done, failed } = round;
  if (done < total) {
    statusBox.replaceChildren(el("p", {}, `Classifying ${total} image(s): ${done} done…`));
    return;
  }
  statusBox.replaceChildren();
  if (failed) {
    statusBox.append(el("p", { class: "error", role: "alert" },
      `${failed} of ${total} image(s) could not be classified: see their cards.`));
  }
  round.total = round.done = round.failed = 0;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The wait after `failed` refused tries: half the doubled delay, plus up to the other half at random. */
function backoff(failed) {
  const full = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** (failed - 1));
  return full / 2 + Math.random() * (full / 2);
}

/** One file's call, tried again while the server is busy: { result } or { error } in words. */
function classifyOne(file, params) {
  return post("/v1/classify", params, "file", () => {
    const form = new FormData();
    form.append("image", file, file.name);
    return form;
  }, (body) => (body && Array.isArray(body.results) && body.results.length === 1 ? body.results[0] : null));
}

/**
 * A POST of a form (`makeForm()` builds it anew for each try), tried again while the server
 * answers 429 or 503: { result: accept(body) } when the server answered 2xx with a body that
 * `accept` takes, else { error } in words about `what` ("file", "slice").
 */
async function post(path, params, what, makeForm, accept) {
  for (let tries = 1; ; tries++) {
    let response, body;
    try {
      response = await fetch(path + "?" + params, { method: "POST", body: makeForm() });
      body = await response.json().catch(() => null);
    } catch (e) {
      return { error: `The server could not be reached: ${e.message}` };
    }
    const result = response.ok ? accept(body) : null;
    if (result) return { result };
    // "image 0: ..." / "slice 0: ..." is this file or slice: its card already names it.
    const reason = (body && body.error ? body.error : `HTTP ${response.status}`).replace(/^(image|slice) \d+: /, "");
    const busy = response.status === 429 || response.status === 503;
    if (busy && tries < MAX_TRIES) {
      await sleep(backoff(tries));
      continue;
    }
    if (busy) {
      return { error: `The server stayed busy (${response.status}) after ${tries} tries: ${reason}` };
    }
    return { error: `The server refused this ${what} (${response.status}): ${reason}` };
  }
}

function noteWarnings(r) {
  if (r.model.clinically_trained) return;
  const before = warnings.size;
  for (const w of r.warnings) warnings.add(w);
  if (warnings.size !== before || !$("banner").firstChild) {
    $("banner").replaceChildren(el("p", { class: "banner", role: "note" },
      el("strong", {}, "Not for diagnostic use. "), [...warnings].join("; ")));
  }
}

function pendingCard(file) {
  return el("li", { class: "card pending", "aria-busy": "true" },
    el("p", { class: "file" }, file.name), el("p", { class: "waiting" }, "Classifying…"));
}

function failedCard(file, error) {
  return el("li", { class: "card failed" },
    el("p", { class: "file" }, file.name), el("p", { class: "error", role: "alert" }, error));
}

function resultCard(r, file) {
  const original = el("img", { alt: `Uploaded image ${r.file}`, src: URL.createObjectURL(file) });
  const figures = [el("figure", {}, original, el("figcaption", {}, "uploaded"))];
  if (r.preview) {
    figures.push(el("figure", {}, el("img", { alt: `${r.file} as the model saw it`, src: r.preview }),
      el("figcaption", {}, "as the model saw it")));
  } else {
    figures.push(el("div"));
  }
  const bars = el("div", { class: "bars" });
  for (const [label, p] of Object.entries(r.probabilities)) {
    const pct = (100 * p).toFixed(1);
    const fill = el("div", { class: "fill" });
    // A CSSOM property, which style-src 'self' allows (a style attribute it would not).
    fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
    bars.append(el("div", { class: "bar", role: "meter", "aria-label": label, "aria-valuemin": "0",
                            "aria-valuemax": "100", "aria-valuenow": pct },
      el("span", {}, label), el("div", { class: "track" }, fill), el("span", {}, `${pct} %`)));
  }
  const t = r.timing;
  const ms = (s) => `${(1000 * s).toFixed(1)} ms`;
  const info = el("div", { class: "info" },
    el("p", { class: "top", "data-label": r.label }, `${r.label} — ${(100 * r.probability).toFixed(1)} %`),
    el("p", { class: "file" }, r.file),
    bars,
    el("p", { class: "meta" }, `Model ${r.model.name} v${r.model.version} · SHA-256 `,
      el("code", { class: "sha" }, r.model.sha256),
      ` · ${r.model.clinically_trained ? "clinically trained" : "not clinically trained"}`),
    el("p", { class: "meta" }, `Preprocess ${ms(t.preprocess_seconds)} · queue ${ms(t.queue_seconds)} · ` +
      `inference ${ms(t.inference_seconds)} (batch of ${r.batch_size})`));
  return el("li", { class: "card" }, ...figures, info);
}

// ---------------------------------------------------------------------------------------------
// The model list (GET /v1/models)

/** The models served, by name (each its highest version), from GET /v1/models. */
const models = new Map();

async function loadModels() {
  let response, body;
  try {
    response = await fetch("/v1/models", { headers: { Accept: "application/json" } });
    body = await response.json().catch(() => null);
  } catch (e) {
    return modelsFailed(`the server could not be reached: ${e.message}`);
  }
  if (!response.ok || !body || !Array.isArray(body.models)) {
    return modelsFailed(`HTTP ${response.status}${body && body.error ? `: ${body.error}` : ""}`);
  }
  if (!body.models.length) return modelsFailed("the server serves no model");
  const select = $("model");
  select.replaceChildren(...body.models.map((m) => {
    models.set(m.name, m);
    const isDefault = m.name === body.default_model;
    return el("option", { value: m.name }, `${m.name} v${m.version} — ${m.task}${isDefault ? " (default)" : ""}`);
  }));
  select.value = models.has(body.default_model) ? body.default_model : body.models[0].name;
  modelChanged();
}

/** Without the list the page still classifies, with the server's default model. */
function modelsFailed(reason) {
  $("model").replaceChildren(el("option", { value: "" }, "the server's default model"));
  const about = $("model-about");
  about.className = "about error";
  about.setAttribute("role", "alert");
  about.textContent = `The list of models could not be loaded (${reason}): images are classified ` +
    "with the server's default model.";
  modelChanged();
}

/** Shows what the selected model's task needs: the drop zone, or a slice form. */
function modelChanged() {
  const m = models.get($("model").value);
  // A model of several sequences per slice (segmentation, or a multi-modal classifier).
  const slices = Boolean(m && Array.isArray(m.channels) && m.channels.length);
  $("drop").hidden = slices;
  $("preview-option").hidden = slices;
  $("slice").hidden = !slices;
  $("study").hidden = true;
  if (!m) return;
  $("segment").textContent = m.task === "segmentation" ? "Segment" : "Classify";
  $("study").hidden = m.task !== "segmentation";
  const about = $("model-about");
  about.className = "about";
  about.removeAttribute("role");
  about.textContent = (m.description || "") + (slices ? ` Takes ${m.channels.join(", ")} for each slice.` : "");
  if (slices) showChannels(m);
}

// ---------------------------------------------------------------------------------------------
// Segmentation: one slice, an image per sequence

/** A file input per sequence, kept while the page lives (a file chosen stays when the model changes). */
const channelControls = new Map();

/** The form field (and element id) of a sequence: its name in lower case ("T1c" -> "t1c"). */
const field = (channel) => channel.toLowerCase();

function showChannels(m) {
  $("channels").replaceChildren(...m.channels.map(channelControl));
}

function channelControl(channel) {
  const key = field(channel);
  if (channelControls.has(key)) return channelControls.get(key);
  const id = `ch-${key}`;
  const input = el("input", { type: "file", id, name: key, accept: "image/png,image/jpeg,application/dicom,.dcm" });
  const thumb = el("img", { class: "thumb", alt: "" });
  thumb.hidden = true;
  const box = el("div", { class: "channel", "data-sequence": key },
    el("label", { for: id }, channel), input, thumb);
  const show = () => {
    if (thumb.src) URL.revokeObjectURL(thumb.src);
    const file = input.files[0];
    thumb.hidden = !file;
    if (file) {
      thumb.onerror = () => { thumb.hidden = true; }; // DICOM: the browser cannot show it
      thumb.src = URL.createObjectURL(file);
    } else {
      thumb.removeAttribute("src");
    }
  };
  input.addEventListener("change", show);
  // Drag and drop onto the sequence's box (the first file dropped).
  for (const ev of ["dragenter", "dragover"]) box.addEventListener(ev, (e) => { e.preventDefault(); box.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) box.addEventListener(ev, () => box.classList.remove("over"));
  box.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (!file) return;
    const one = new DataTransfer();
    one.items.add(file);
    input.files = one.files;
    show();
  });
  channelControls.set(key, box);
  return box;
}

/**
 * The slice form's button: one /v1/segment call (a segmentation model) or one /v1/classify call
 * (a multi-modal classifier) with the files chosen (the server names what is missing).
 */
async function submitSlice() {
  const m = models.get($("model").value);
  if (!m || !m.channels || !m.channels.length) return;
  const segments = m.task === "segmentation";
  const parts = m.channels
    .map((channel) => ({ channel, file: $(`ch-${field(channel)}`).files[0] }))
    .filter((p) => p.file);
  const title = parts.length ? parts.map((p) => `${p.channel} ${p.file.name}`).join(" · ") : "no image chosen";
  const card = el("li", { class: "card pending", "aria-busy": "true" },
    el("p", { class: "file" }, title),
    el("p", { class: "waiting" }, `${segments ? "Segmenting" : "Classifying"} with ${m.name}…`));
  $("results").prepend(card);
  const params = new URLSearchParams({ model: m.name });
  const accept = segments
    ? (body) => (body && typeof body.mask_png === "string" ? body : null)
    : (body) => (body && Array.isArray(body.results) && body.results.length === 1 ? body.results[0] : null);
  let outcome = await post(segments ? "/v1/segment" : "/v1/classify", params, "slice", () => {
    const form = new FormData();
    for (const p of parts) form.append(field(p.channel), p.file, p.file.name);
    return form;
  }, accept)
    .catch((e) => ({ error: `The page failed: ${e.message}` }));
  let done;
  if (outcome.result) {
    try {
      if (segments) {
        done = await segmentCard(outcome.result, parts, title);
      } else {
        // The card shows the first sequence's image, and names every part.
        outcome.result.file = title;
        done = resultCard(outcome.result, parts[0].file);
      }
      noteWarnings(outcome.result);
    } catch (e) {
      outcome = { error: `The answer could not be shown: ${e.message}` };
    }
  }
  card.replaceWith(done || failedCard({ name: title }, outcome.error));
}

/** Alpha of a label's colour over the image. */
const OVERLAY_ALPHA = 0.5;

/** "#rrggbb" -> [r, g, b]; a grey for anything else (the server always sends #rrggbb). */
function rgb(hex) {
  const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(hex || "");
  return m ? [1, 2, 3].map((i) => parseInt(m[i], 16)) : [128, 128, 128];
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not decode the image"));
    img.src = src;
  });
}

/** The label map of the answer's mask PNG (each pixel its label's index), checked against its counts. */
async function labelMap(r) {
  const img = await loadImage(r.mask_png);
  const { width: w, height: h } = r;
  if (img.naturalWidth !== w || img.naturalHeight !== h) {
    throw new Error(`the mask is ${img.naturalWidth}×${img.naturalHeight}, the answer says ${w}×${h}`);
  }
  const canvas = el("canvas", { width: w, height: h });
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, w, h).data;
  const labels = new Uint8Array(w * h);
  const counts = new Array(r.labels.length).fill(0);
  for (let i = 0; i < labels.length; i++) {
    const v = rgba[4 * i];
    if (v >= r.labels.length) {
      throw new Error(`the mask has the value ${v} at x ${i % w}, y ${Math.floor(i / w)}, and the model ${r.labels.length} labels`);
    }
    labels[i] = v;
    counts[v] += 1;
  }
  r.classes.forEach((c, i) => {
    if (counts[i] !== c.pixels) throw new Error(`the mask has ${counts[i]} ${c.label} pixels, the answer says ${c.pixels}`);
  });
  return labels;
}

/** A slice's answer as a card: the image with the mask over it, the mask alone, legend, regions. */
async function segmentCard(r, parts, title) {
  const { width: w, height: h } = r;
  const labels = await labelMap(r);
  const colors = r.labels.map((_, i) => rgb(r.colors[i]));

  // The mask alone, every pixel its label's colour (the background's too, black).
  const maskOnly = el("canvas", { class: "mask-only", width: w, height: h, role: "img",
    "aria-label": `The mask alone, ${w}×${h} pixels, in the model's colours` });
  const mctx = maskOnly.getContext("2d");
  const mask = mctx.createImageData(w, h);
  for (let i = 0; i < labels.length; i++) {
    const c = colors[labels[i]];
    mask.data.set([c[0], c[1], c[2], 255], 4 * i);
  }
  mctx.putImageData(mask, 0, 0);

  // The first sequence's image (black where the browser cannot show it, e.g. DICOM), each
  // pixel of a label other than the background blended with its colour.
  const first = parts[0];
  const overlay = el("canvas", { class: "overlay", width: w, height: h, role: "img",
    "aria-label": `${first.channel} image with the mask drawn over it` });
  const octx = overlay.getContext("2d", { willReadFrequently: true });
  octx.fillStyle = "#000";
  octx.fillRect(0, 0, w, h);
  const url = URL.createObjectURL(first.file);
  const base = await loadImage(url).catch(() => null);
  URL.revokeObjectURL(url);
  if (base) octx.drawImage(base, 0, 0, w, h);
  const pixels = octx.getImageData(0, 0, w, h);
  for (let i = 0; i < labels.length; i++) {
    if (labels[i] === 0) continue;
    const c = colors[labels[i]];
    for (let k = 0; k < 3; k++) {
      const o = 4 * i + k;
      pixels.data[o] = Math.round((1 - OVERLAY_ALPHA) * pixels.data[o] + OVERLAY_ALPHA * c[k]);
    }
  }
  octx.putImageData(pixels, 0, 0);

  // Label and region names break after an underscore, not inside a word ("non_enhancing_core").
  const name = (text) => {
    const span = el("span", { class: "name" });
    text.split("_").forEach((part, i, all) => {
      span.append(part + (i < all.length - 1 ? "_" : ""));
      if (i < all.length - 1) span.append(el("wbr"));
    });
    return span;
  };
  const area = w * h;
  const pct = (n) => `${((100 * n) / area).toFixed(2)} %`;
  const count = (n) => n.toLocaleString("en");
  const swatch = (i) => {
    const s = el("span", { class: "swatch", "aria-hidden": "true", "data-color": r.colors[i] || "" });
    s.style.backgroundColor = `rgb(${colors[i].join(", ")})`; // CSSOM: allowed by style-src 'self'
    return s;
  };
  const legend = el("table", { class: "legend" },
    el("caption", {}, "Labels"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Label"), el("th", { scope: "col" }, "Pixels"),
      el("th", { scope: "col" }, "Slice"))),
    el("tbody", {}, ...r.classes.map((c, i) => el("tr", { "data-label": c.label, "data-pixels": String(c.pixels) },
      el("th", { scope: "row" }, swatch(i), name(c.label)), el("td", {}, count(c.pixels)), el("td", {}, pct(c.pixels))))));
  const regions = el("table", { class: "regions" },
    el("caption", {}, "Regions"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Region (its labels)"),
      el("th", { scope: "col" }, "Pixels"), el("th", { scope: "col" }, "Slice"))),
    el("tbody", {}, ...r.regions.map((g) => el("tr", { "data-region": g.name, "data-pixels": String(g.pixels) },
      el("th", { scope: "row" }, name(g.name),
        el("span", { class: "members" }, ...g.labels.flatMap((l, i) => (i ? [", ", name(l)] : [name(l)])))),
      el("td", {}, count(g.pixels)),
      el("td", {}, pct(g.pixels))))));
  const biggest = r.regions.length ? r.regions.reduce((a, b) => (b.pixels > a.pixels ? b : a)) : null;
  const t = r.timing;
  const ms = (s) => `${(1000 * s).toFixed(1)} ms`;
  const info = el("div", { class: "info" },
    el("p", { class: "top" }, biggest ? `${biggest.name} — ${pct(biggest.pixels)} of the slice` : `${w}×${h} label map`),
    el("p", { class: "file" }, title),
    legend,
    regions,
    el("p", { class: "meta" }, `Model ${r.model.name} v${r.model.version} · SHA-256 `,
      el("code", { class: "sha" }, r.model.sha256),
      ` · ${r.model.clinically_trained ? "clinically trained" : "not clinically trained"}`),
    el("p", { class: "meta" }, `Mask ${w}×${h} · preprocess ${ms(t.preprocess_seconds)} · queue ${ms(t.queue_seconds)} · ` +
      `inference ${ms(t.inference_seconds)} (batch of ${r.batch_size})`));
  return el("li", { class: "card seg" },
    el("figure", {}, overlay, el("figcaption", {}, base ? `${first.channel} with the mask` :
      `${first.channel} (the browser cannot show it) with the mask`)),
    el("figure", {}, maskOnly, el("figcaption", {}, "the mask")),
    info);
}

$("options").addEventListener("submit", (e) => e.preventDefault());
$("files").addEventListener("change", (e) => { classify([...e.target.files]); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("files").click(); }
});
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); classify([...e.dataTransfer.files]); });
$("model").addEventListener("change", modelChanged);
$("slice").addEventListener("submit", (e) => { e.preventDefault(); submitSlice(); });
$("study").addEventListener("submit", (e) => { e.preventDefault(); segmentStudy(); });
$("study-files").addEventListener("change", () => chooseStudy([...$("study-files").files]));
for (const ev of ["dragenter", "dragover"]) $("study-box").addEventListener(ev, (e) => { e.preventDefault(); $("study-box").classList.add("over"); });
for (const ev of ["dragleave", "drop"]) $("study-box").addEventListener(ev, () => $("study-box").classList.remove("over"));
$("study-box").addEventListener("drop", async (e) => {
  e.preventDefault();
  // A dropped folder: every file under it (the entries API); dropped files as they are.
  const entries = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  const files = entries.length ? (await Promise.all(entries.map(filesOf))).flat() : [...e.dataTransfer.files];
  chooseStudy(files);
});
loadModels();

// ---------------------------------------------------------------------------------------------
// A whole study: its DICOM files to POST /v1/segment-study, a viewer of the reference slices with
// the mask over them, the volumes, and the DICOM Segmentation object to download.

/** The files chosen for the study (a dropped folder's, or the file chooser's). */
let studyFiles = [];

function chooseStudy(files) {
  studyFiles = files.filter((f) => !f.name.startsWith(".") && f.name !== "DICOMDIR");
  $("study-chosen").textContent = studyFiles.length ? `${studyFiles.length} file(s) chosen.` : "";
}

/** Every file under a dropped directory entry. */
async function filesOf(entry) {
  if (entry.isFile) return [await new Promise((resolve, reject) => entry.file(resolve, reject))];
  const reader = entry.createReader();
  const all = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) break;
    all.push(...batch);
  }
  return (await Promise.all(all.map(filesOf))).flat();
}

async function segmentStudy() {
  const m = models.get($("model").value);
  if (!m || m.task !== "segmentation") return;
  const title = `Study: ${studyFiles.length} file(s)`;
  const card = el("li", { class: "card pending", "aria-busy": "true" },
    el("p", { class: "file" }, title), el("p", { class: "waiting" }, `Segmenting the study with ${m.name}…`));
  $("results").prepend(card);
  const params = new URLSearchParams({ model: m.name, segmentation_object: "1", preview: "1" });
  let outcome = await post("/v1/segment-study", params, "study", () => {
    const form = new FormData();
    studyFiles.forEach((f, i) => form.append(`i${i}`, f, f.name));
    return form;
  }, (body) => (body && Array.isArray(body.slices) ? body : null))
    .catch((e) => ({ error: `The page failed: ${e.message}` }));
  let done;
  if (outcome.result) {
    try {
      done = await studyCard(outcome.result, title);
      noteWarnings(outcome.result);
    } catch (e) {
      outcome = { error: `The answer could not be shown: ${e.message}` };
    }
  }
  card.replaceWith(done || failedCard({ name: title }, outcome.error));
}

/** A study's answer: a slice viewer (preview with the mask over it), series, volumes, download. */
async function studyCard(r, title) {
  const colors = r.labels.map((_, i) => rgb(r.colors[i]));
  const shown = r.slices.map((s, k) => ({ ...s, k })).filter((s) => s.segmented);
  if (!shown.length) throw new Error("no reference slice could be segmented");
  const canvas = el("canvas", { class: "overlay", role: "img", "aria-label": "Reference slice with the mask drawn over it" });
  const slider = el("input", { type: "range", min: "0", max: String(shown.length - 1), step: "1",
    value: String(Math.floor(shown.length / 2)), "aria-label": "Reference slice" });
  const where = el("p", { class: "position", "aria-live": "polite" });
  const draw = async () => {
    const s = shown[Number(slider.value)];
    const [base, mask] = await Promise.all([loadImage(s.preview_png), loadImage(s.mask_png)]);
    const w = mask.naturalWidth, h = mask.naturalHeight;
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(mask, 0, 0);
    const labels = ctx.getImageData(0, 0, w, h).data;
    ctx.drawImage(base, 0, 0, w, h);
    const pixels = ctx.getImageData(0, 0, w, h);
    for (let i = 0; i < w * h; i++) {
      const v = labels[4 * i];
      if (v === 0 || v >= colors.length) continue;
      for (let c = 0; c < 3; c++) {
        const o = 4 * i + c;
        pixels.data[o] = Math.round((1 - OVERLAY_ALPHA) * pixels.data[o] + OVERLAY_ALPHA * colors[v][c]);
      }
    }
    ctx.putImageData(pixels, 0, 0);
    where.textContent = `Slice ${s.k + 1} of ${r.slices.length}, at ${s.position.toFixed(1)} mm`;
    canvas.dataset.slice = String(s.k);
  };
  slider.addEventListener("input", () => { draw(); });
  await draw();
  const ml = (v) => (v == null ? "–" : `${v.toFixed(2)} mL`);
  const volumes = el("table", { class: "volumes" },
    el("caption", {}, "Volumes"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Label or region"), el("th", { scope: "col" }, "Voxels"),
      el("th", { scope: "col" }, "Volume"))),
    el("tbody", {}, ...r.measurements.filter((m) => m.name !== r.labels[0]).map((m) => el("tr", { "data-name": m.name, "data-voxels": String(m.voxels) },
      el("th", { scope: "row" }, m.name), el("td", {}, m.voxels.toLocaleString("en")), el("td", {}, ml(m.volume_ml))))));
  const series = el("table", { class: "series" },
    el("caption", {}, "Series used"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Sequence"), el("th", { scope: "col" }, "Instances"),
      el("th", { scope: "col" }, "Grid"))),
    el("tbody", {}, ...r.series.map((s) => el("tr", {}, el("th", { scope: "row" }, s.sequence),
      el("td", {}, String(s.instances)), el("td", {}, s.exact ? "same" : "resampled")))));
  const info = el("div", { class: "info" },
    el("p", { class: "file" }, title),
    volumes, series,
    el("p", { class: "meta" }, `Model ${r.model.name} v${r.model.version} · SHA-256 `, el("code", { class: "sha" }, r.model.sha256),
      ` · ${r.model.clinically_trained ? "clinically trained" : "not clinically trained"}`),
    el("p", { class: "meta" }, `${shown.length} of ${r.slices.length} reference slices segmented`));
  if (r.segmentation_object) {
    const bytes = Uint8Array.from(atob(r.segmentation_object), (ch) => ch.charCodeAt(0));
    const link = el("a", { class: "download", download: "segmentation.dcm",
      href: URL.createObjectURL(new Blob([bytes], { type: "application/dicom" })) }, "Download the DICOM Segmentation object");
    info.prepend(link);
  }
  if (r.measurement_report) {
    const bytes = Uint8Array.from(atob(r.measurement_report), (ch) => ch.charCodeAt(0));
    const link = el("a", { class: "download report", download: "measurement-report.dcm",
      href: URL.createObjectURL(new Blob([bytes], { type: "application/dicom" })) }, "Download the measurement report (DICOM SR)");
    info.prepend(link);
  }
  return el("li", { class: "card study" }, el("div", { class: "viewer" }, canvas, slider, where), info);
}
