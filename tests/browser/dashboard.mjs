// Loads the gatehouse dashboard in headless Chromium, checks it shows the three demo
// backends and the HTTPS listener's certificate expiry, clicks "drain" on vm-2 and waits until the page shows it draining.
// Usage: node dashboard.mjs http://127.0.0.1:PORT/ [screenshot.png]
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const failures = [];
  page.on("requestfailed", (request) => failures.push(request.url()));
  await page.goto(url, { timeout: 20000 });
  await page.waitForFunction(() => document.querySelectorAll("tr[data-backend]").length === 3, null, { timeout: 20000 });
  const names = await page.$$eval("tr[data-backend]", (rows) => rows.map((row) => row.dataset.backend));
  if (names.join(",") !== "vm-1,vm-2,vm-3") throw new Error(`unexpected backends: ${names}`);
  // Each listener's soonest certificate expiry: a date and days left for TLS, "—" without.
  const expiries = await page.$$eval("#listeners tr", (rows) => rows.map((row) => row.lastChild.textContent));
  if (expiries.length !== 2 || expiries[0] !== "—" || !/\(\d+ d\)$/.test(expiries[1])) {
    throw new Error(`unexpected certificate expiries: ${expiries}`);
  }
  await page.click('tr[data-backend="vm-2"] button[data-action="drain"]');
  await page.waitForFunction(
    () => document.querySelector('tr[data-backend="vm-2"] [data-field="state"]')?.textContent === "draining",
    null,
    { timeout: 20000 },
  );
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  const external = failures.filter((u) => !u.startsWith(url));
  if (external.length) throw new Error(`external requests: ${external}`);
  console.log("dashboard ok");
} finally {
  await browser.close();
}
