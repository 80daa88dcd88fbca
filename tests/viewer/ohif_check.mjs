// Open OHIF URLs one after the other in ONE Debian chromium (playwright-core, no browser download): for
// each, wait for the viewport to settle, save a screenshot, and record the console (every level: OHIF
// logs its SR crash at debug level), page errors, the page text and the overlay label texts (SVG).
// Usage: node ohif_check.mjs JOBS_JSON OUT_JSON
//   JOBS_JSON: [{"url": ..., "png": ..., "settle": ms}, ...]; OUT_JSON: one report per job, same order.
import { createRequire } from 'node:module';
import { readFileSync, writeFileSync } from 'node:fs';

const require = createRequire(process.env.PLAYWRIGHT_CORE_DIR + '/');
const { chromium } = require('playwright-core');
const [jobsPath, outJson] = process.argv.slice(2);
const jobs = JSON.parse(readFileSync(jobsPath, 'utf8'));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
const reports = [];
for (const job of jobs) {
  const page = await context.newPage();
  const consoleLines = [];
  const pageErrors = [];
  page.on('console', (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => pageErrors.push(String(err && err.stack ? err.stack : err)));
  const started = Date.now();
  let gotoError = null;
  try {
    await page.goto(job.url, { waitUntil: 'load', timeout: 60000 });
    await page.waitForSelector('canvas, .text-foreground', { timeout: 60000 });
  } catch (err) {
    gotoError = String(err);
  }
  // Dismiss OHIF's first-visit tour and notice (once per browser context), which dim the viewport.
  const settle = Number(job.settle || 8000);
  for (let round = 0; round < 3; round++) {
    await page.waitForTimeout(settle / 3);
    for (const label of ['Skip all', 'Confirm and hide']) {
      const button = page.getByText(label, { exact: true });
      if (await button.count().catch(() => 0)) await button.first().click({ timeout: 2000 }).catch(() => {});
    }
  }
  await page.waitForTimeout(1000);
  await page.screenshot({ path: job.png, timeout: 120000 }); // a loaded CI machine needs more than the default 30 s
  const bodyText = await page.evaluate(() => document.body.innerText).catch(() => '');
  const svgTexts = await page.evaluate(() => [...document.querySelectorAll('svg text')].map((t) => t.textContent)).catch(() => []);
  // Where each overlay label and the viewport's largest canvas are on the page (CSS px): clipping and overlap.
  const boxes = await page
    .evaluate(() => {
      const rect = (r) => ({ x: r.left, y: r.top, w: r.width, h: r.height });
      const canvases = [...document.querySelectorAll('canvas')].map((c) => c.getBoundingClientRect()).sort((a, b) => b.width * b.height - a.width * a.height);
      return { canvas: canvases.length ? rect(canvases[0]) : null, labels: [...document.querySelectorAll('svg text')].map((t) => ({ text: t.textContent, ...rect(t.getBoundingClientRect()) })) };
    })
    .catch(() => ({ canvas: null, labels: [] }));
  reports.push({ url: job.url, console: consoleLines, pageErrors, gotoError, bodyText, svgTexts, boxes, seconds: (Date.now() - started) / 1000 });
  await page.close();
}
writeFileSync(outJson, JSON.stringify(reports, null, 1));
await browser.close();
