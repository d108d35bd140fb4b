// An operator's session in the Keel inspector, in headless Chromium (driven by the Rust test
// `gui::an_operator_resolves_a_conflict_and_pauses_a_job_in_a_real_browser`):
// - waits for the three devices and reads which one leads;
// - keeps the side of the open conflict written by KEEL_KEEP_DEVICE, and waits until the page
//   shows it resolved (the update arrives through the live stream, without a reload);
// - waits for a running job, pauses it, and waits until the page shows it paused (and reads
//   how long its progress bar is drawn);
// - opens a location and a file in the library's browser, and finds the kept tag;
// - opens a follower's inspector (KEEL_FOLLOWER_URL) and reads its role there;
// - opens the inspector of a library alone on its device (KEEL_ALONE_URL);
// - back on the first page, waits for a device joining (the test starts one once the script
//   says it waits for it, and holds its link cut) and reads its row.
// Prints one JSON line: { devices, leader, resolved, paused, pausedBar, pausedShare,
// followerRole, aloneDevices, joining, joinText }.
"use strict";
const { chromium } = require("playwright-core");

const url = process.env.KEEL_GUI_URL;
const keep = process.env.KEEL_KEEP_DEVICE;
const LONG = { timeout: 60_000 };

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.KEEL_CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => document.querySelectorAll("#devices tbody tr").length === 3, null, LONG);
  const devices = await page.locator("#devices tbody tr").count();
  const leaderRow = page.locator("#devices tbody tr", { has: page.locator(".badge.leader") });
  const leader = (await leaderRow.first().getAttribute("data-device")).slice(0, 8);

  const open = page.locator('.conflict[data-resolved="false"]');
  await open.first().waitFor(LONG);
  const conflict = await open.first().getAttribute("data-conflict");
  await open.first().locator(`button[data-keep="${keep}"]`).click();
  await page.locator(`.conflict[data-conflict="${conflict}"][data-resolved="true"]`).waitFor(LONG);

  console.log("waiting for a job");
  const running = page.locator('.job[data-state="running"]');
  await running.first().waitFor(LONG);
  const job = await running.first().getAttribute("data-job");
  await page.locator(`.job[data-job="${job}"] button[data-action="pause"]`).click();
  try {
    await page.locator(`.job[data-job="${job}"][data-state="paused"]`).waitFor(LONG);
  } catch (e) {
    // What the page shows instead (a job that ended before the click says so in #error).
    console.log("page errors", JSON.stringify(errors));
    console.log("jobs drawn", await page.locator("#jobs").innerHTML());
    console.log("error shown", await page.locator("#error").textContent().catch(() => "none"));
    throw e;
  }
  // Its bar is as long as its progress says.
  const pausedBar = await page.locator(`.job[data-job="${job}"] .bar`)
    .evaluate((b) => b.firstElementChild.getBoundingClientRect().width / b.getBoundingClientRect().width);
  const counts = (await page.locator(`.job[data-job="${job}"] .muted`).textContent()).match(/(\d+) of (\d+)/);
  const pausedShare = Number(counts[1]) / Number(counts[2]);

  // The library's browser: a location, then a file's tags and note.
  await page.locator("#locations a", { hasText: "/tree" }).click();
  await page.locator("#entries a", { hasText: "f1.txt" }).click();
  await page.locator("#details", { hasText: "beach" }).waitFor(LONG);

  await page.screenshot({ path: process.env.KEEL_SCREENSHOT, fullPage: true });

  // A follower's inspector: the same devices, this one following.
  const follower = await browser.newPage();
  follower.on("pageerror", (e) => errors.push(String(e)));
  await follower.goto(process.env.KEEL_FOLLOWER_URL);
  await follower.waitForFunction(() => document.querySelectorAll("#devices tbody tr").length === 3, null, LONG);
  const own = follower.locator("#devices tbody tr").first();
  const followerRole = await own.locator(".badge").first().textContent();

  // A library alone on its device: one device, which leads.
  const alone = await browser.newPage();
  alone.on("pageerror", (e) => errors.push(String(e)));
  await alone.goto(process.env.KEEL_ALONE_URL);
  await alone.locator("#devices tbody tr .badge.leader").waitFor(LONG);
  const aloneDevices = await alone.locator("#devices tbody tr").count();

  // A device joining through a link the test holds cut: its row, with its initial sync.
  console.log("waiting for a join");
  const joiningRow = page.locator("#devices tbody tr", { has: page.locator(".badge.joining") });
  await joiningRow.first().waitFor(LONG);
  const joining = (await joiningRow.first().getAttribute("data-device")).slice(0, 8);
  const joinText = await joiningRow.first().locator("div.joining").textContent();
  const joinBar = await joiningRow.first().locator(".bar")
    .evaluate((b) => b.firstElementChild.getBoundingClientRect().width / b.getBoundingClientRect().width);
  await page.screenshot({ path: process.env.KEEL_SCREENSHOT.replace(/\.png$/, "-joining.png"), fullPage: true });
  await browser.close();
  if (errors.length) throw new Error("errors on the page: " + errors.join("; "));
  console.log(JSON.stringify({
    devices, leader, resolved: conflict, paused: job, pausedBar, pausedShare, followerRole,
    aloneDevices, joining, joinText, joinBar,
  }));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
