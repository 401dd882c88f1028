// Browser test of the demo page: serves wasm-demo/www from 127.0.0.1, opens it in headless
// Chromium (Debian's, through playwright-core), sets the loss control to 10 %, starts a
// transfer, waits for the fabric lane to report it complete, checks every stream's SHA-256
// as sent and as received, and saves a screenshot.
//
// node wasm-demo/tools/browser-test.mjs [--www DIR] [--out DIR] [--loss PCT] [--timeout SECS]
//
// Prints one JSON line with what it saw (the Rust test in wasm-demo/tests/browser.rs asserts
// on it) and exits non-zero if a check failed. Any request leaving 127.0.0.1 is refused and
// fails the test: the page must work with no network access.
import { createServer } from "node:http";
import { mkdirSync, readFileSync, statSync } from "node:fs";
import { extname, join, normalize, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, a, i, all) => {
    if (a.startsWith("--")) pairs.push([a.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const www = resolve(args.www ?? join(here, "..", "www"));
const out = resolve(args.out ?? join(here, "..", "..", "target", "wasm-demo"));
const loss = Number(args.loss ?? 10);
const timeoutMs = 1000 * Number(args.timeout ?? 90);
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";

const types = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".wasm": "application/wasm",
  ".png": "image/png",
};

/** A static file server on 127.0.0.1, like `python3 -m http.server -d www`. */
function serve(root) {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    let file = join(root, path);
    if (!file.startsWith(root)) {
      res.writeHead(403).end();
      return;
    }
    try {
      if (statSync(file).isDirectory()) file = join(file, "index.html");
      const body = readFileSync(file);
      res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

const result = {
  ok: false,
  loss,
  status: null,
  verdict: null,
  digests: [],
  link: null,
  baseline: null,
  foreignRequests: [],
  consoleErrors: [],
  pageErrors: [],
  screenshot: null,
  problems: [],
};

const server = await serve(www);
const origin = `http://127.0.0.1:${server.address().port}`;
const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1300 } });
  page.on("console", (m) => m.type() === "error" && result.consoleErrors.push(m.text()));
  page.on("pageerror", (e) => result.pageErrors.push(String(e)));
  await page.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(`${origin}/`)) return route.continue();
    result.foreignRequests.push(url);
    return route.abort();
  });
  await page.goto(`${origin}/index.html`);
  await page.waitForSelector("body[data-ready=true]", { timeout: 30_000 });

  // Set the controls as a user would: ranges by value plus an input event.
  const setRange = (id, value) =>
    page.locator(`#${id}`).evaluate((el, v) => {
      el.value = String(v);
      el.dispatchEvent(new Event("input", { bubbles: true }));
    }, value);
  await setRange("loss", loss);
  await setRange("streams", 8);
  await page.selectOption("#size", "256");
  result.lossShown = await page.locator("#loss-out").textContent();
  await page.click("#start");

  const fabric = page.locator("#lane-fabric");
  await page.waitForFunction(
    () => ["complete", "mismatch", "failed"].includes(document.querySelector("#lane-fabric").dataset.status),
    null,
    { timeout: timeoutMs, polling: 100 },
  );
  result.status = await fabric.getAttribute("data-status");
  result.statusText = await fabric.locator("[data-role=status]").textContent();
  result.verdict = await fabric.locator("[data-role=verdict]").getAttribute("data-verdict");
  result.verdictText = await fabric.locator("[data-role=verdict]").textContent();
  result.elapsed = await fabric.locator("[data-role=elapsed]").textContent();
  result.digests = await page.$$eval("#digests-fabric tbody tr", (rows) =>
    rows.map((r) => ({ sent: r.dataset.sent, received: r.dataset.received })),
  );
  const [lost, sent] = (await fabric.locator("[data-role=lost]").textContent()).split("/").map(Number);
  result.link = { lost, sent };
  const baseline = page.locator("#lane-baseline");
  result.baseline = {
    status: await baseline.getAttribute("data-status"),
    done: await baseline.locator("[data-role=done]").textContent(),
  };
  // Let the charts draw a frame after the verdict, then keep the picture.
  await page.waitForTimeout(300);
  mkdirSync(out, { recursive: true });
  result.screenshot = join(out, "screenshot.png");
  await page.screenshot({ path: result.screenshot, fullPage: true });

  const check = (cond, what) => cond || result.problems.push(what);
  check(result.lossShown === `${loss} %`, `loss control shows ${result.lossShown}`);
  check(result.status === "complete", `fabric lane status ${result.status} (${result.statusText})`);
  check(result.verdict === "match", `verdict ${result.verdict}: ${result.verdictText}`);
  check(result.digests.length === 8, `${result.digests.length} digest rows, expected 8`);
  for (const [i, d] of result.digests.entries()) {
    check(/^[0-9a-f]{64}$/.test(d.sent ?? ""), `stream ${i + 1}: sent digest ${d.sent}`);
    check(d.sent === d.received, `stream ${i + 1}: sent ${d.sent}, received ${d.received}`);
  }
  check(loss === 0 || lost > 0, `the link lost nothing (${lost} of ${sent})`);
  check(result.baseline.status !== "idle", "the baseline lane did not run");
  check(result.foreignRequests.length === 0, `requests left 127.0.0.1: ${result.foreignRequests}`);
  check(result.pageErrors.length === 0, `page errors: ${result.pageErrors}`);
  check(result.consoleErrors.length === 0, `console errors: ${result.consoleErrors}`);
  result.ok = result.problems.length === 0;
} catch (e) {
  result.problems.push(String(e));
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
