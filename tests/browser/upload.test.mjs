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
// bad one in words, and a 429 answer (injected) is tried again. Finally an inline script injected
// into the page is refused by the policy (the check sees violations). Any console error fails the
// test, except the browser's own reports of the HTTP 400s the bad files provoke and of the
// injected 429. Every wait is bounded.

import { readFileSync, readdirSync, mkdirSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { chromium } from "playwright-core";

const URL_ = process.env.BRAINAI_URL;
const expected = JSON.parse(readFileSync(process.env.BRAINAI_EXPECTED, "utf8")).results;
const BAD = process.env.BRAINAI_BAD;
const MANY = readdirSync(process.env.BRAINAI_MANY).sort().map((f) => join(process.env.BRAINAI_MANY, f));
const MANY_BAD = "many_05.png";
const SHOTS = resolve(process.env.SCREENSHOTS || "target/browser");
const WAIT_MS = 30_000;
mkdirSync(SHOTS, { recursive: true });

const failures = [];
function check(ok, what) {
  console.log(`${ok ? "  ok    " : "  FAIL  "}${what}`);
  if (!ok) failures.push(what);
}

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
  let allowed400 = 0, allowed429 = 0;
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // Chromium logs every 4xx response of fetch(); each refusal step expects exactly one 400, the
    // injected 429 at most one report.
    if (allowed400 > 0 && /status of 400/.test(m.text())) { allowed400 -= 1; return; }
    if (allowed429 > 0 && /status of 429/.test(m.text())) { allowed429 -= 1; return; }
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

  // Keyboard: Tab reaches the drop zone (after the model field and the preview box); Enter
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
