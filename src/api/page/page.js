// The upload page's script (GET /page.js; the page's Content-Security-Policy allows no inline
// script). Each chosen file is its own POST /v1/classify call, at most IN_FLIGHT at once: one
// image is never over the model's batch size or the server's images per request, a refused file
// fails alone, and the server's batcher still runs the concurrent calls together. Every file gets
// a card at once, in the order chosen (newest upload first), filled when its answer comes: the
// result, or the error in words. 429 (busy) and 503 (unavailable) are tried again after a backoff.
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
  if ($("model").value.trim()) params.set("model", $("model").value.trim());
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
async function classifyOne(file, params) {
  for (let tries = 1; ; tries++) {
    const form = new FormData();
    form.append("image", file, file.name);
    let response, body;
    try {
      response = await fetch("/v1/classify?" + params, { method: "POST", body: form });
      body = await response.json().catch(() => null);
    } catch (e) {
      return { error: `The server could not be reached: ${e.message}` };
    }
    if (response.ok && body && Array.isArray(body.results) && body.results.length === 1) {
      return { result: body.results[0] };
    }
    // "image 0: ..." is this file: its card already names it.
    const reason = (body && body.error ? body.error : `HTTP ${response.status}`).replace(/^image \d+: /, "");
    const busy = response.status === 429 || response.status === 503;
    if (busy && tries < MAX_TRIES) {
      await sleep(backoff(tries));
      continue;
    }
    if (busy) {
      return { error: `The server stayed busy (${response.status}) after ${tries} tries: ${reason}` };
    }
    return { error: `The server refused this file (${response.status}): ${reason}` };
  }
}

function noteWarnings(r) {
  if (r.model.clinically_trained) return;
  const before = warnings.size;
  for (const w of r.warnings) warnings.add(w);
  if (warnings.size !== before || !$("banner").firstChild) {
    $("banner").replaceChildren(el("p", { class: "banner", role: "note" },
      el("strong", {}, "Not for diagnostic use. "), [...warnings].join(" ")));
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

$("options").addEventListener("submit", (e) => e.preventDefault());
$("files").addEventListener("change", (e) => { classify([...e.target.files]); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("files").click(); }
});
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); classify([...e.dataTransfer.files]); });
