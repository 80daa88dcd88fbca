// Open one OHIF URL in Debian's chromium (playwright-core, no browser download), wait for the viewport
// to settle, save a screenshot and report the console (every level) and page errors as JSON.
// Usage: node ohif_check.mjs URL OUT_PNG OUT_JSON [SETTLE_MS]
import { createRequire } from 'node:module';
import { writeFileSync } from 'node:fs';

const require = createRequire(process.env.PLAYWRIGHT_CORE_DIR + '/');
const { chromium } = require('playwright-core');
const [url, outPng, outJson, settleArg] = process.argv.slice(2);
const settle = Number(settleArg || 8000);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
const consoleLines = [];
const pageErrors = [];
page.on('console', (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
page.on('pageerror', (err) => pageErrors.push(String(err && err.stack ? err.stack : err)));
let gotoError = null;
try {
  await page.goto(url, { waitUntil: 'load', timeout: 60000 });
  await page.waitForSelector('canvas', { timeout: 60000 });
} catch (err) {
  gotoError = String(err);
}
// Dismiss OHIF's first-visit tour and notice, which dim the viewport.
for (let round = 0; round < 3; round++) {
  await page.waitForTimeout(settle / 3);
  for (const label of ['Skip all', 'Confirm and hide']) {
    const button = page.getByText(label, { exact: true });
    if (await button.count().catch(() => 0)) await button.first().click({ timeout: 2000 }).catch(() => {});
  }
}
await page.waitForTimeout(1500);
await page.screenshot({ path: outPng });
const bodyText = await page.evaluate(() => document.body.innerText).catch(() => '');
writeFileSync(outJson, JSON.stringify({ url, console: consoleLines, pageErrors, gotoError, bodyText }, null, 1));
await browser.close();
