// The upload page in a real browser: Debian's chromium, driven by playwright-core.
//
//   node tests/browser/upload.test.mjs
//
// Environment (set by tests/browser/run.sh, which starts the server):
//   BRAINAI_URL       the HTTP API port, e.g. http://127.0.0.1:8000
//   BRAINAI_EXPECTED  a JSON file: `brainai classify --json` of the images (the gRPC API's answers)
//   BRAINAI_BAD       a file that is no image
//   CHROMIUM          the browser (default /usr/bin/chromium)
//   SCREENSHOTS       where the screenshots go (default target/browser)
//
// Checks, at 1280x800 and at a phone width (390x844): the page loads with no console error;
// choosing the images shows one card per image, in order, with the gRPC API's label and
// probabilities, a bar per label, the image as the model saw it, the model's name, version and
// SHA-256, the timings, and the not-clinically-trained banner; the drop zone is reached and opened
// from the keyboard; a file that is no image is refused in words. Any console error fails the test,
// except the browser's own report of the one HTTP 400 the refusal step provokes. Every wait is bounded.

import { readFileSync, mkdirSync } from "node:fs";
import { basename, resolve } from "node:path";
import { chromium } from "playwright-core";

const URL_ = process.env.BRAINAI_URL;
const expected = JSON.parse(readFileSync(process.env.BRAINAI_EXPECTED, "utf8")).results;
const BAD = process.env.BRAINAI_BAD;
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
  let allowed400 = 0;
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // Chromium logs every 4xx response of fetch(); the refusal step expects exactly one.
    if (allowed400 > 0 && /status of 400/.test(m.text())) { allowed400 -= 1; return; }
    consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(`uncaught: ${e.message}`));
  // Listening from the start turns on file-chooser interception before any key is pressed (it is
  // switched on asynchronously when the first listener is added).
  const choosers = [];
  page.on("filechooser", (c) => choosers.push(c));

  const response = await page.goto(`${URL_}/`);
  check(response.status() === 200, `GET / answers 200 (${response.status()})`);
  check((await page.title()).includes("BrainAI"), "the page has its title");

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
  await page.locator("#results .card").nth(files.length - 1).waitFor();
  const cards = page.locator("#results .card");
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

  // A file that is no image: refused in words, not a blank page.
  allowed400 = 1;
  await page.setInputFiles("#files", BAD);
  const error = page.locator("#status .error");
  await error.waitFor();
  const text = await error.textContent();
  check(/\(400\): not_an_image\.bin: data is neither PNG, JPEG nor DICOM/.test(text), `a bad file is refused in words, by name: "${text}"`);
  check((await cards.count()) === files.length, "the earlier results stay");
  await page.screenshot({ path: `${SHOTS}/refused-${width}x${height}.png` });
  check(allowed400 === 0, "the refusal was one HTTP 400");
  check(consoleErrors.length === 0, `no console errors ${JSON.stringify(consoleErrors)}`);
  await context.close();
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
