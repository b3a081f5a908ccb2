// The upload page in a real browser: Debian's chromium, driven by playwright-core.
//
//   node tests/browser/upload.test.mjs
//
// Environment (set by tests/browser/run.sh, which starts the server):
//   BRAINAI_URL       the HTTP API port, e.g. http://127.0.0.1:8000
//   BRAINAI_EXPECTED  a JSON file: `brainai classify --json` of the images (the gRPC API's answers)
//   BRAINAI_BAD       a file that is no image
//   BRAINAI_MANY      a directory of copies of the first expected image and one file that is no
//                     image (many_05.png), chosen together
//   BRAINAI_SEGMENT_EXPECTED  a JSON file: `brainai segment --json --model seg-threshold` of the
//                     slice (the gRPC API's answer)
//   BRAINAI_SEGMENT_MASK      the mask PNG that call wrote (--out)
//   BRAINAI_SLICE     a directory with the slice: flair.png, t1c.png, t2.png
//   CHROMIUM          the browser (default /usr/bin/chromium)
//   SCREENSHOTS       where the screenshots go (default target/browser)
//
// Checks, at 1280x800 and at a phone width (390x844): the page loads under its strict
// Content-Security-Policy (no 'unsafe-inline': script and stylesheet are files) with no policy
// violation and its stylesheet applied; choosing the images shows one card per image, in order,
// with the gRPC API's label and probabilities, a bar per label, the image as the model saw it, the
// model's name, version and SHA-256, the timings, and the not-clinically-trained banner; the drop
// zone is reached and opened from the keyboard; a file that is no image gets a card that says why
// in words; many files with one bad among them get one card each, at most 4 calls in flight, the
// bad one in words, and a 429 answer (injected) is tried again. The model is picked from a select
// filled from GET /v1/models (the default model preselected). Segmentation: seg-threshold picked
// with the keyboard, the slice form shows a labelled file input per sequence of the model
// (FLAIR, T1c, T2), each reached with Tab and filled from its file chooser (Space), Segment
// pressed with the keyboard; the card's legend has every label in the model's colour with the
// gRPC API's pixel counts, the regions the gRPC API's pixel counts, the mask alone (a canvas read
// back) the colour of the gRPC mask's label at every pixel, the overlay (a canvas) the FLAIR
// image with each label's colour blended in at every pixel, the model's name, version and
// SHA-256, the timings and the banner; a slice without its T2 image is refused in words on its
// card; a file dropped on a sequence's box fills its input. When the model list cannot be loaded
// the page says so in words and keeps the drop zone (the server's default model). Finally an inline script injected
// into the page is refused by the policy (the check sees violations). Any console error fails the
// test, except the browser's own reports of the HTTP 400s the bad files and the incomplete slice
// provoke and of the injected 429 and 503 (the slice's first call, tried again). Every wait is
// bounded.

import { readFileSync, readdirSync, mkdirSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { chromium } from "playwright-core";

const URL_ = process.env.BRAINAI_URL;
const expected = JSON.parse(readFileSync(process.env.BRAINAI_EXPECTED, "utf8")).results;
const BAD = process.env.BRAINAI_BAD;
const MANY = readdirSync(process.env.BRAINAI_MANY).sort().map((f) => join(process.env.BRAINAI_MANY, f));
const MANY_BAD = "many_05.png";
const SEG = JSON.parse(readFileSync(process.env.BRAINAI_SEGMENT_EXPECTED, "utf8"));
const SEG_MASK = `data:image/png;base64,${readFileSync(process.env.BRAINAI_SEGMENT_MASK).toString("base64")}`;
const SLICE = { FLAIR: "flair.png", T1c: "t1c.png", T2: "t2.png" };
// `brainai classify --json --model multi-classify --flair … --t1c … --t2 …` of the same slice.
const MULTI_MODEL = "multi-classify";
const MULTI = JSON.parse(readFileSync(process.env.BRAINAI_MULTI_EXPECTED, "utf8")).results[0];
// `brainai segment --json --model study-seg --study …` of the study the page segments.
const STUDY_MODEL = "study-seg";
const STUDY = JSON.parse(readFileSync(process.env.BRAINAI_STUDY_EXPECTED, "utf8"));
const STUDY_FILES = readdirSync(process.env.BRAINAI_STUDY, { recursive: true })
  .filter((f) => f.endsWith(".dcm")).sort().map((f) => join(process.env.BRAINAI_STUDY, f));
for (const k of Object.keys(SLICE)) SLICE[k] = join(process.env.BRAINAI_SLICE, SLICE[k]);
const SEG_MODEL = "seg-threshold";
const SHOTS = resolve(process.env.SCREENSHOTS || "target/browser");
const WAIT_MS = 30_000;
mkdirSync(SHOTS, { recursive: true });

// The models the server lists (GET /v1/models): the page's select and the legend's colours.
const listed = await (await fetch(`${URL_}/v1/models`, { signal: AbortSignal.timeout(WAIT_MS) })).json();
const listedSeg = listed.models.find((m) => m.name === SEG_MODEL);

const failures = [];
function check(ok, what) {
  console.log(`${ok ? "  ok    " : "  FAIL  "}${what}`);
  if (!ok) failures.push(what);
}
check(listed.default_model === "tiny" && listedSeg?.task === "segmentation" &&
  JSON.stringify(listedSeg.channels) === JSON.stringify(Object.keys(SLICE)) && listedSeg.colors.length === SEG.labels.length &&
  JSON.stringify(listedSeg.labels) === JSON.stringify(SEG.labels),
  `GET /v1/models: default tiny, ${SEG_MODEL} takes ${listedSeg?.channels} with a colour per label ${JSON.stringify(listedSeg?.colors)}`);
if (!listedSeg) throw new Error(`${SEG_MODEL} is not served`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // No user namespaces in containers (CI runs as root); no GPU; /dev/shm may be small.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  timeout: WAIT_MS,
});

async function session(width, height, name) {
  console.log(`${name} (${width}x${height})`);
  const context = await browser.newContext({ viewport: { width, height } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  const consoleErrors = [];
  let allowed400 = 0, allowed429 = 0, allowed503 = 0;
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // Chromium logs every 4xx response of fetch(); each refusal step expects exactly one 400, the
    // injected 429 at most one report.
    if (allowed400 > 0 && /status of 400/.test(m.text())) { allowed400 -= 1; return; }
    if (allowed429 > 0 && /status of 429/.test(m.text())) { allowed429 -= 1; return; }
    if (allowed503 > 0 && /status of 503/.test(m.text())) { allowed503 -= 1; return; }
    consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(`uncaught: ${e.message}`));
  // Content-Security-Policy violations, as the page itself sees them (the init script is the
  // browser's, not the page's: the policy does not apply to it).
  await page.addInitScript(() => {
    window.__violations = [];
    document.addEventListener("securitypolicyviolation",
      (e) => window.__violations.push(`${e.effectiveDirective}: ${e.blockedURI || "inline"}`));
  });
  const violations = () => page.evaluate(() => window.__violations);
  // Calls to /v1/classify in flight, and the most at once.
  let inFlight = 0, maxInFlight = 0, classifyCalls = 0;
  const isClassify = (r) => new URL(r.url()).pathname === "/v1/classify";
  page.on("request", (r) => { if (isClassify(r)) { classifyCalls += 1; inFlight += 1; maxInFlight = Math.max(maxInFlight, inFlight); } });
  for (const ev of ["requestfinished", "requestfailed"]) page.on(ev, (r) => { if (isClassify(r)) inFlight -= 1; });
  // Calls to /v1/segment; while segBusy > 0 they are answered 503 (injected). The route is in
  // place before the page loads (a route added later was seen to miss a request now and then).
  let segCalls = 0, segBusy = 0;
  await page.route("**/v1/segment*", (route) => {
    segCalls += 1;
    if (segBusy > 0) {
      segBusy -= 1;
      return route.fulfill({ status: 503, contentType: "application/json",
        body: JSON.stringify({ error: "the model is not ready (injected by the test)" }) });
    }
    return route.continue();
  });
  // Listening from the start turns on file-chooser interception before any key is pressed (it is
  // switched on asynchronously when the first listener is added).
  const choosers = [];
  page.on("filechooser", (c) => choosers.push(c));

  const response = await page.goto(`${URL_}/`);
  check(response.status() === 200, `GET / answers 200 (${response.status()})`);
  check((await page.title()).includes("BrainAI"), "the page has its title");
  const csp = response.headers()["content-security-policy"] || "";
  check(/default-src 'none'/.test(csp) && /script-src 'self'/.test(csp) && !/unsafe/.test(csp),
    `a strict Content-Security-Policy: ${csp}`);
  const border = await page.evaluate(() => getComputedStyle(document.getElementById("drop")).borderTopStyle);
  check(border === "dashed", `the stylesheet applies under the policy (drop zone border ${border})`);

  // The model is picked from the list the server serves, the default model preselected.
  await page.locator(`#model option[value="${SEG_MODEL}"]`).waitFor({ state: "attached" });
  const options = await page.locator("#model option").evaluateAll((os) => os.map((o) => [o.value, o.textContent]));
  check(JSON.stringify(options) === JSON.stringify([[MULTI_MODEL, `${MULTI_MODEL} v1 — classification`],
    [SEG_MODEL, `${SEG_MODEL} v1 — segmentation`], [STUDY_MODEL, `${STUDY_MODEL} v1 — segmentation`],
    ["tiny", "tiny v1 — classification (default)"]]), `the model select lists the served models ${JSON.stringify(options)}`);
  check((await page.locator("#model").inputValue()) === "tiny", "the default model is preselected");
  check(await page.locator("#drop").isVisible() && !(await page.locator("#slice").isVisible()),
    "a classification model shows the drop zone, no slice form");

  // Keyboard: Tab reaches the drop zone (after the model select and the preview box); Enter
  // opens the file chooser.
  await page.keyboard.press("Tab");
  await page.keyboard.press("Tab");
  await page.keyboard.press("Tab");
  check(await page.evaluate(() => document.activeElement?.id === "drop"), "Tab reaches the drop zone");
  await page.keyboard.press("Enter");
  for (let i = 0; i < 100 && choosers.length === 0; i++) await page.waitForTimeout(50);
  const chooser = choosers.shift();
  check(chooser !== undefined && chooser.isMultiple(), "Enter on the drop zone opens a multi-file chooser");
  if (!chooser) throw new Error("no file chooser opened");

  const files = expected.map((r) => r.file);
  await chooser.setFiles(files);
  const cards = page.locator("#results .card");
  await settled(page, files.length);
  check((await cards.count()) === files.length, `one card per image (${await cards.count()})`);
  for (let i = 0; i < files.length; i++) {
    const card = cards.nth(i);
    const want = expected[i];
    const label = await card.locator(".top").getAttribute("data-label");
    check(label === want.label, `${basename(files[i])}: label ${label} = gRPC ${want.label}`);
    check((await card.locator(".file").textContent()) === basename(files[i]), `${basename(files[i])}: card in order`);
    const top = await card.locator(".top").textContent();
    check(top.includes(`${(100 * want.probability).toFixed(1)} %`), `${basename(files[i])}: top probability "${top}"`);
    const bars = card.locator(".bar");
    const labels = Object.keys(want.probabilities);
    check((await bars.count()) === labels.length, `${basename(files[i])}: a bar per label`);
    for (const l of labels) {
      const now = await card.locator(`.bar[aria-label="${l}"]`).getAttribute("aria-valuenow");
      check(now === (100 * want.probabilities[l]).toFixed(1), `${basename(files[i])}: bar ${l} = ${now} %`);
    }
    const preview = card.locator("img").nth(1);
    const src = await preview.getAttribute("src");
    check(src?.startsWith("data:image/png;base64,"), `${basename(files[i])}: the image as the model saw it`);
    check(await preview.evaluate((img) => img.complete && img.naturalWidth > 0), `${basename(files[i])}: the preview decodes`);
    const meta = await card.locator(".meta").allTextContents();
    const m = want.model;
    check(meta[0].includes(`Model ${m.name} v${m.version}`) && meta[0].includes(m.sha256),
      `${basename(files[i])}: model name, version and full SHA-256`);
    check(/Preprocess [\d.]+ ms · queue [\d.]+ ms · inference [\d.]+ ms/.test(meta[1]), `${basename(files[i])}: timings`);
  }
  const banner = page.locator(".banner");
  check((await banner.count()) === 1 && /Not for diagnostic use.*not clinically trained/.test(await banner.textContent()),
    "the not-clinically-trained banner");
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `no sideways scrolling (${overflow} px too wide)`);
  await page.screenshot({ path: `${SHOTS}/upload-${width}x${height}.png`, fullPage: true });

  // A file that is no image: refused in words on its own card, not a blank page.
  allowed400 = 1;
  await page.setInputFiles("#files", BAD);
  await settled(page, files.length + 1);
  const refused = cards.nth(0);
  const text = await refused.locator(".error").textContent();
  check((await refused.locator(".file").textContent()) === "not_an_image.bin" &&
    /refused this file \(400\): data is neither PNG, JPEG nor DICOM/.test(text),
    `a bad file is refused in words, on its card: "${text}"`);
  check(/1 of 1 image\(s\) could not be classified/.test(await page.locator("#status").textContent()),
    "the status says one file failed");
  check((await cards.count()) === files.length + 1, "the earlier results stay");
  await page.screenshot({ path: `${SHOTS}/refused-${width}x${height}.png` });
  check(allowed400 === 0, "the refusal was one HTTP 400");

  // Many files, one bad among them: one call per file, at most 4 at once; the first call is
  // answered 429 (injected), and is tried again.
  let busy = 1;
  await page.route("**/v1/classify*", (route) => {
    if (busy > 0) {
      busy -= 1;
      return route.fulfill({ status: 429, contentType: "application/json",
        body: JSON.stringify({ error: "the model is overloaded (injected by the test)" }) });
    }
    return route.continue();
  });
  allowed400 = 1;
  allowed429 = 1;
  const before = await cards.count();
  classifyCalls = 0;
  maxInFlight = 0;
  await page.setInputFiles("#files", MANY);
  await settled(page, before + MANY.length);
  check((await cards.count()) === before + MANY.length, `one card per file (${MANY.length} more)`);
  const good = expected[0];
  for (let i = 0; i < MANY.length; i++) {
    const card = cards.nth(i);
    const name = basename(MANY[i]);
    check((await card.locator(".file").textContent()) === name, `${name}: card in order`);
    if (name === MANY_BAD) {
      const why = await card.locator(".error").textContent();
      check(/refused this file \(400\): data is neither PNG, JPEG nor DICOM/.test(why), `${name}: refused in words: "${why}"`);
    } else {
      check((await card.locator(".top").getAttribute("data-label")) === good.label, `${name}: label ${good.label}`);
    }
  }
  check(busy === 0 && classifyCalls === MANY.length + 1, `the 429 was tried again (${classifyCalls} calls for ${MANY.length} files)`);
  check(maxInFlight >= 2 && maxInFlight <= 4, `a few calls in flight at once, at most 4 (${maxInFlight})`);
  check(/1 of \d+ image\(s\) could not be classified/.test(await page.locator("#status").textContent()),
    "the status says one file failed");
  await page.screenshot({ path: `${SHOTS}/many-${width}x${height}.png`, fullPage: true });
  check(allowed400 === 0, "the bad file was one HTTP 400");
  await page.unroute("**/v1/classify*");

  // Segmentation: seg-threshold picked with the keyboard (type-ahead on the focused select).
  await page.locator("#model").focus();
  await page.keyboard.type("seg");
  check((await page.locator("#model").inputValue()) === SEG_MODEL, `the keyboard picks ${SEG_MODEL}`);
  check(!(await page.locator("#drop").isVisible()) && await page.locator("#slice").isVisible(),
    "a segmentation model shows the slice form instead of the drop zone");
  const channelNames = await page.locator("#channels label").allTextContents();
  check(JSON.stringify(channelNames) === JSON.stringify(Object.keys(SLICE)),
    `a labelled file input per sequence, in the model's order ${JSON.stringify(channelNames)}`);
  // Tab to each file input, Space opens its file chooser; then Tab to Segment, Enter.
  for (const [channel, path] of Object.entries(SLICE)) {
    await page.keyboard.press("Tab");
    const id = `ch-${channel.toLowerCase()}`;
    const focused = await page.evaluate(() => document.activeElement?.id);
    check(focused === id, `Tab reaches the ${channel} file input (${focused})`);
    choosers.length = 0;
    await page.keyboard.press("Space");
    for (let i = 0; i < 100 && choosers.length === 0; i++) await page.waitForTimeout(50);
    const c = choosers.shift();
    check(c !== undefined && !c.isMultiple(), `Space on the ${channel} input opens a one-file chooser`);
    if (c) await c.setFiles(path); else await page.setInputFiles(`#${id}`, path);
  }
  await page.keyboard.press("Tab");
  check(await page.evaluate(() => document.activeElement?.id === "segment"), "Tab reaches the Segment button");
  const segBefore = await cards.count();
  // The first call is answered 503 (injected), and is tried again.
  segCalls = 0;
  segBusy = 1;
  allowed503 = 1;
  await page.keyboard.press("Enter");
  await settled(page, segBefore + 1);
  check(segBusy === 0 && segCalls === 2, `the 503 was tried again (${segCalls} calls for one slice)`);
  const segCard = cards.nth(0);
  const segError = await segCard.locator(".error").allTextContents();
  check(await segCard.evaluate((c) => c.classList.contains("seg")), `the slice's card shows a segmentation ${JSON.stringify(segError)}`);
  const area = SEG.width * SEG.height;
  const pct = (n) => `${((100 * n) / area).toFixed(2)} %`;
  // The legend: every label, in the model's colour, with the gRPC API's pixel count.
  const colors = listedSeg.colors;
  const rows = await segCard.locator(".legend tbody tr").evaluateAll((trs) => trs.map((tr) => ({
    label: tr.dataset.label, pixels: Number(tr.dataset.pixels), text: tr.textContent,
    color: getComputedStyle(tr.querySelector(".swatch")).backgroundColor,
  })));
  check(rows.length === SEG.labels.length, `the legend has one entry per label (${rows.length})`);
  SEG.classes.forEach((want, i) => {
    const row = rows[i] || {};
    const [r, g, b] = [1, 3, 5].map((k) => parseInt(colors[i].slice(k, k + 2), 16));
    check(row.label === want.label && row.pixels === want.pixels && row.text.includes(pct(want.pixels)),
      `legend ${want.label}: ${row.pixels} px = gRPC ${want.pixels}, ${pct(want.pixels)}`);
    check(row.color === `rgb(${r}, ${g}, ${b})`, `legend ${want.label}: swatch ${row.color} = the model's ${colors[i]}`);
  });
  check(SEG.classes.every((c) => c.pixels > 0), "every label occurs in the slice");
  const regionRows = await segCard.locator(".regions tbody tr").evaluateAll((trs) => trs.map((tr) => ({
    name: tr.dataset.region, pixels: Number(tr.dataset.pixels), text: tr.textContent })));
  check(regionRows.length === SEG.regions.length, `one row per region (${regionRows.length})`);
  for (const want of SEG.regions) {
    const row = regionRows.find((r) => r.name === want.name) || {};
    check(row.pixels === want.pixels && row.text?.includes(want.labels.join(", ")) && row.text.includes(pct(want.pixels)),
      `region ${want.name} (${want.labels.join(", ")}): ${row.pixels} px = gRPC ${want.pixels}`);
  }
  // The canvases, read back, against the gRPC API's mask and the FLAIR image, at every pixel.
  const flair = `data:image/png;base64,${readFileSync(SLICE.FLAIR).toString("base64")}`;
  const px = await segCard.evaluate(async (card, { mask, flair, colors, w, h }) => {
    const decode = async (src) => {
      const img = new Image();
      img.src = src;
      await img.decode();
      const c = document.createElement("canvas");
      c.width = w;
      c.height = h;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0, w, h);
      return { size: [img.naturalWidth, img.naturalHeight], data: ctx.getImageData(0, 0, w, h).data };
    };
    const want = await decode(mask);
    const gray = await decode(flair);
    const only = card.querySelector("canvas.mask-only");
    const over = card.querySelector("canvas.overlay");
    const out = { maskSize: want.size, onlySize: [only.width, only.height], overSize: [over.width, over.height],
                  counts: colors.map(() => 0), badMask: 0, badOnly: 0, badOver: 0, first: [] };
    if (only.width !== w || only.height !== h || over.width !== w || over.height !== h) return out;
    const got = only.getContext("2d").getImageData(0, 0, w, h).data;
    const blend = over.getContext("2d").getImageData(0, 0, w, h).data;
    const rgb = colors.map((hex) => [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16)));
    for (let i = 0; i < w * h; i++) {
      const o = 4 * i, l = want.data[o];
      if (l >= colors.length || want.data[o + 1] !== l || want.data[o + 2] !== l) { out.badMask += 1; continue; }
      out.counts[l] += 1;
      const c = rgb[l];
      if (got[o] !== c[0] || got[o + 1] !== c[1] || got[o + 2] !== c[2] || got[o + 3] !== 255) {
        out.badOnly += 1;
        if (out.first.length < 3) out.first.push({ x: i % w, y: Math.floor(i / w), label: l, got: [...got.slice(o, o + 4)] });
      }
      for (let k = 0; k < 3; k++) {
        const g = gray.data[o + k];
        const expect = l === 0 ? g : Math.round(0.5 * g + 0.5 * c[k]);
        if (Math.abs(blend[o + k] - expect) > 1) { out.badOver += 1; break; }
      }
    }
    return out;
  }, { mask: SEG_MASK, flair, colors, w: SEG.width, h: SEG.height });
  check(px.maskSize[0] === SEG.width && px.maskSize[1] === SEG.height &&
    JSON.stringify(px.counts) === JSON.stringify(SEG.classes.map((c) => c.pixels)) && px.badMask === 0,
    `the gRPC mask decodes in the page: ${px.maskSize.join("×")}, label counts ${JSON.stringify(px.counts)}`);
  check(px.onlySize[0] === SEG.width && px.onlySize[1] === SEG.height && px.badOnly === 0,
    `the mask alone (${px.onlySize.join("×")}) is the model's colour of the gRPC label at every pixel ` +
    `(${px.badOnly} differ ${JSON.stringify(px.first)})`);
  check(px.overSize[0] === SEG.width && px.overSize[1] === SEG.height && px.badOver === 0,
    `the overlay (${px.overSize.join("×")}) is the FLAIR image with each label's colour at 50 % (${px.badOver} pixels differ)`);
  const segMeta = await segCard.locator(".meta").allTextContents();
  check(segMeta[0]?.includes(`Model ${SEG.model.name} v${SEG.model.version}`) && segMeta[0].includes(SEG.model.sha256) &&
    segMeta[0].includes("not clinically trained"), "the slice's card: model name, version, full SHA-256, not trained");
  check(/Mask 300×220 · preprocess [\d.]+ ms · queue [\d.]+ ms · inference [\d.]+ ms/.test(segMeta[1] || ""),
    `the slice's card: size and timings "${segMeta[1]}"`);
  check(new RegExp(`Not for diagnostic use.*model ${SEG_MODEL} v1 is not clinically trained`).test(await banner.textContent()),
    "the banner names the segmentation model as not clinically trained");
  const segOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(segOverflow <= 0, `no sideways scrolling with the slice's card (${segOverflow} px too wide)`);
  const widest = await segCard.locator("canvas").evaluateAll((cs) => Math.max(...cs.map((c) => c.getBoundingClientRect().right)));
  check(widest <= width, `the canvases fit the width (right edge ${widest.toFixed(0)} of ${width})`);
  await page.evaluate(() => window.scrollTo(0, 0));
  const segBox = await segCard.boundingBox();
  await page.screenshot({ path: `${SHOTS}/segment-${width}x${height}.png`, fullPage: true,
    clip: { x: 0, y: 0, width, height: Math.ceil(segBox.y + segBox.height + 16) } });

  // A slice without its T2 image: refused in words on its card.
  await page.setInputFiles("#ch-t2", []);
  allowed400 = 1;
  await page.locator("#segment").focus();
  await page.keyboard.press("Enter");
  await settled(page, segBefore + 2);
  const noT2 = await cards.nth(0).locator(".error").allTextContents();
  check(/refused this slice \(400\): no T2 image/.test(noT2.join(" ")), `a slice without T2 is refused in words: ${JSON.stringify(noT2)}`);
  check(allowed400 === 0, "the refusal was one HTTP 400");
  // A file dropped on a sequence's box fills its input.
  const dropped = await page.evaluateHandle((b64) => {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], "t2.png", { type: "image/png" }));
    return dt;
  }, readFileSync(SLICE.T2).toString("base64"));
  await page.dispatchEvent('.channel[data-sequence="t2"]', "drop", { dataTransfer: dropped });
  check((await page.locator("#ch-t2").evaluate((i) => i.files[0]?.name)) === "t2.png", "a file dropped on the T2 box fills its input");

  // A multi-modal classifier: the same slice form, its channels in its order, a Classify button;
  // one /v1/classify call, answered with a classification card equal to the gRPC API's.
  await page.locator("#model").selectOption(MULTI_MODEL);
  check(await page.locator("#slice").isVisible() && !(await page.locator("#drop").isVisible()),
    "a multi-modal classifier shows the slice form instead of the drop zone");
  const multiChannels = await page.locator("#channels label").allTextContents();
  check(JSON.stringify(multiChannels) === JSON.stringify(["T2", "FLAIR", "T1c"]),
    `its file inputs follow its channel order ${JSON.stringify(multiChannels)}`);
  check((await page.locator("#segment").textContent()) === "Classify", "its button says Classify");
  for (const [channel, path] of Object.entries(SLICE)) await page.setInputFiles(`#ch-${channel.toLowerCase()}`, path);
  const multiBefore = await cards.count();
  await page.locator("#segment").focus();
  await page.keyboard.press("Enter");
  await settled(page, multiBefore + 1);
  const multiCard = cards.nth(0);
  const multiError = await multiCard.locator(".error").allTextContents();
  const multiTop = await multiCard.locator(".top").getAttribute("data-label").catch(() => null);
  check(multiTop === MULTI.label, `the slice's classification is the gRPC API's ${MULTI.label} (${multiTop} ${JSON.stringify(multiError)})`);
  const multiText = (await multiCard.textContent()) || "";
  check(multiText.includes(`${(100 * MULTI.probability).toFixed(1)} %`) && multiText.includes(`Model ${MULTI_MODEL} v1`) &&
    multiText.includes("not clinically trained"), "the card: the probability, the model, not trained");

  // A whole study: the study form of a segmentation model; its files chosen; one
  // /v1/segment-study call; a viewer of the reference slices, the volumes equal to the gRPC
  // API's, the DICOM Segmentation object to download.
  await page.locator("#model").selectOption(STUDY_MODEL);
  check(await page.locator("#study").isVisible(), "a segmentation model offers the study form");
  await page.setInputFiles("#study-files", STUDY_FILES);
  check(/48 file\(s\) chosen/.test(await page.locator("#study-chosen").textContent()), "the study's files are counted");
  const studyBefore = await cards.count();
  await page.locator("#segment-study").focus();
  await page.keyboard.press("Enter");
  await settled(page, studyBefore + 1);
  const studyCard = cards.nth(0);
  const studyError = await studyCard.locator(".error").allTextContents();
  check(await studyCard.evaluate((c) => c.classList.contains("study")), `the study's card ${JSON.stringify(studyError)}`);
  const want = STUDY.measurements.find((m) => m.name === "tumor");
  const shownVoxels = await studyCard.locator('.volumes tr[data-name="tumor"]').getAttribute("data-voxels");
  check(Number(shownVoxels) === want.voxels, `the tumour's voxels are the gRPC API's (${shownVoxels} = ${want.voxels})`);
  const volumeText = await studyCard.locator('.volumes tr[data-name="tumor"]').textContent();
  check(volumeText.includes(`${want.volume_ml.toFixed(2)} mL`), `its volume in mL: ${volumeText}`);
  const report = studyCard.locator("a.download.report");
  check((await report.getAttribute("download")) === "measurement-report.dcm", "the measurement report can be downloaded");
  const download = studyCard.locator("a.download:not(.report)");
  check((await download.getAttribute("download")) === "segmentation.dcm" && /^blob:/.test(await download.getAttribute("href")),
    "the DICOM Segmentation object can be downloaded");
  // The slider moves through the reference slices, with the keyboard.
  const slider = studyCard.locator(".viewer input[type=range]");
  const sliceBefore = await studyCard.locator("canvas").getAttribute("data-slice");
  await slider.focus();
  await page.keyboard.press("ArrowRight");
  await page.waitForFunction((b) => document.querySelector("#results .card.study canvas")?.dataset.slice !== b, sliceBefore);
  const positionText = await studyCard.locator(".viewer .position").textContent();
  check(/Slice \d+ of 16, at [\d.]+ mm/.test(positionText), `the slider moves to another slice: ${positionText}`);
  const studyOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(studyOverflow <= 0, `no sideways scrolling with the study's card (${studyOverflow} px too wide)`);
  await page.evaluate(() => window.scrollTo(0, 0));
  const studyBox = await studyCard.boundingBox();
  await page.screenshot({ path: `${SHOTS}/study-${width}x${height}.png`, fullPage: true,
    clip: { x: 0, y: 0, width, height: Math.ceil(studyBox.y + studyBox.height + 16) } });

  check(consoleErrors.length === 0, `no console errors ${JSON.stringify(consoleErrors)}`);
  const seen = await violations();
  check(seen.length === 0, `no Content-Security-Policy violations ${JSON.stringify(seen)}`);
  // The policy is enforced, and the check above would see it: an inline script is refused.
  await page.evaluate(() => {
    const s = document.createElement("script");
    s.textContent = "window.__inlineRan = true;";
    document.body.append(s);
  });
  const after = await violations();
  check(after.length === 1 && /^script-src/.test(after[0]) && !(await page.evaluate(() => window.__inlineRan)),
    `an injected inline script is refused by the policy ${JSON.stringify(after)}`);

  // Without the model list (GET /v1/models answered 503, injected) the page says so in words and
  // still offers the drop zone, for the server's default model.
  const bare = await context.newPage();
  bare.setDefaultTimeout(WAIT_MS);
  await bare.route("**/v1/models", (route) => route.fulfill({ status: 503, contentType: "application/json",
    body: JSON.stringify({ error: "the server is starting (injected by the test)" }) }));
  await bare.goto(`${URL_}/`);
  const about = bare.locator("#model-about.error");
  await about.waitFor();
  const aboutText = await about.textContent();
  check(/The list of models could not be loaded \(HTTP 503: the server is starting \(injected by the test\)\): images are classified with the server's default model/.test(aboutText) &&
    (await bare.locator("#model").inputValue()) === "" && await bare.locator("#drop").isVisible(),
    `without the model list the page says so and classifies with the default model: "${aboutText}"`);
  await bare.close();
  await context.close();
}

/** Waits (bounded) until there are `count` cards and none is still waiting for its answer. */
async function settled(page, count) {
  await page.waitForFunction((n) => document.querySelectorAll("#results .card").length === n &&
    !document.querySelector("#results .card.pending"), count, { timeout: WAIT_MS });
}

const sizes = process.env.ONLY_PHONE ? [[390, 844, "phone"]] : [[1280, 800, "desktop"], [390, 844, "phone"]];
try {
  for (const [w, h, name] of sizes) await session(w, h, name);
} finally {
  await browser.close();
}
if (failures.length) {
  console.log(`\nbrowser test FAILED (${failures.length}):\n  ${failures.join("\n  ")}`);
  process.exit(1);
}
console.log(`\nbrowser test passed; screenshots in ${SHOTS}`);
