// The widget in headless Chromium against the whole stack, as a visitor uses it: a foreign
// origin gets nothing; a browser asking for German gets the organisation's German texts; on
// the organisation's website nothing is stored or called before the
// launcher is opened (with the keyboard alone); the visitor declines consent, chats
// anonymously, grants consent later and gives their e-mail, which moves the visit from the
// tab's sessionStorage to localStorage (the demo widget remembers visitors); reloads and finds
// the chat again, in a second tab too; downloads and deletes their data.
//
// Run by crates/cli/tests/browser.rs (which starts the stack and has the agents answer); the
// environment it sets:
//   HAFEN_PAGE          the demo website, an origin the widget allows (`https://localhost:P/`)
//   HAFEN_FOREIGN_PAGE  the same page on an origin it does not allow
//   HAFEN_ENDPOINT      the webchat service (`https://127.0.0.1:Q`)
//   HAFEN_CERTS_DIR     the dev certificates; page and service both use webchat.pem
//   HAFEN_DOWNLOADS     where the browser saves downloads (empty)
//   HAFEN_SCREENSHOTS   where the screenshots go
//   HAFEN_ANSWER        how every agent answer starts
//
// Chromium trusts exactly the service's key (by its SPKI hash), not every certificate. Each
// step prints `ok - <step>`; the first that fails prints what the widget and the console said,
// saves failure.png and exits 1. Every wait is bounded, and so is the whole run.

import { X509Certificate, createHash } from "node:crypto";
import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import puppeteer from "puppeteer-core";

/** The longest any one wait may take. */
const WAIT_MS = 20_000;
/** The most presses of Tab that may reach the launcher (the demo page has one link before it). */
const MAX_TABS = 20;
/** The demo widget's visit lifetime, which the consent dialog states. */
const LIFETIME_DAYS = 30;
/** The whole run's limit, below the Rust test's 240 s so that a hang is reported from here. */
const RUN_MS = 200_000;
const POLL_MS = 100;

function env(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`browser.mjs: ${name} is not set (crates/cli/tests/browser.rs sets it)`);
    process.exit(1);
  }
  return value;
}

const PAGE = env("HAFEN_PAGE");
const FOREIGN_PAGE = env("HAFEN_FOREIGN_PAGE");
const ENDPOINT = env("HAFEN_ENDPOINT").replace(/\/+$/, "");
const CERTS_DIR = env("HAFEN_CERTS_DIR");
const DOWNLOADS = env("HAFEN_DOWNLOADS");
const SCREENSHOTS = env("HAFEN_SCREENSHOTS");
const ANSWER = env("HAFEN_ANSWER");

const PAGE_ORIGIN = new URL(PAGE).origin;
const ENDPOINT_ORIGIN = new URL(ENDPOINT).origin;
/** Where the widget's calls go: gRPC-Web under /w/<widget id>/. */
const CALLS = `${ENDPOINT}/w/`;

/** The base64 SHA-256 of the certificate's SubjectPublicKeyInfo, as Chromium's flag takes it. */
function spkiHash(pemFile) {
  const der = new X509Certificate(readFileSync(pemFile)).publicKey.export({ type: "spki", format: "der" });
  return createHash("sha256").update(der).digest("base64");
}

// ---- what the run has seen, for the checks and for a failure report ----

let currentStep = "starting Chromium";
/** The page the report reads the status line from. */
let activePage = null;
const consoleLines = [];

/** Collects a page's console messages and uncaught errors under `label`. */
function watchConsole(page, label) {
  const lines = [];
  page.on("console", (message) => {
    const line = `${message.type()}: ${message.text()}`;
    lines.push(line);
    consoleLines.push(`[${label}] ${line}`);
  });
  page.on("pageerror", (error) => {
    const line = `pageerror: ${error?.message ?? error}`;
    lines.push(line);
    consoleLines.push(`[${label}] ${line}`);
  });
  return lines;
}

/** Records every request a page makes, and every response. */
function watchNetwork(page) {
  const seen = { requests: [], responses: [], failed: [] };
  page.on("request", (request) => seen.requests.push({ method: request.method(), url: request.url() }));
  page.on("response", (response) => seen.responses.push({ url: response.url(), status: response.status() }));
  page.on("requestfailed", (request) =>
    seen.failed.push({ url: request.url(), error: request.failure()?.errorText ?? "" }),
  );
  return seen;
}

async function step(name, work) {
  currentStep = name;
  await work();
  console.log(`ok - ${name}`);
}

function check(condition, message) {
  if (!condition) {
    throw new Error(message);
  }
}

function equal(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  check(a === e, `${what}: expected ${e}, got ${a}`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Polls `probe` (run in Node, usually evaluating in the page) until it returns something truthy
 * and returns that; fails after WAIT_MS naming `what` and the last value seen. A probe that
 * throws (a page navigating) counts as not yet.
 */
async function until(what, probe, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) {
        return last;
      }
    } catch (err) {
      last = err instanceof Error ? err.message : String(err);
    }
    if (Date.now() > deadline) {
      throw new Error(`waited ${timeoutMs / 1000} s for ${what}; last saw ${JSON.stringify(last)}`);
    }
    await sleep(POLL_MS);
  }
}

// ---- the widget, inside its shadow root ----
// The page's CSP forbids eval, so nothing here uses puppeteer's waitForFunction (which builds
// its predicate with `new Function` in the page); page.evaluate goes through the DevTools
// protocol, which the page's policy does not govern.

const hook = (name) => `[data-hafen="${name}"]`;

/** The visible widget element for `selector`, or null. */
async function visible(page, selector) {
  const handle = await page.evaluateHandle((sel) => {
    const el = document.querySelector("hafen-widget")?.shadowRoot?.querySelector(sel);
    if (!el || el.closest("[hidden]") || el.getClientRects().length === 0) {
      return null;
    }
    return el;
  }, selector);
  const element = handle.asElement();
  if (!element) {
    await handle.dispose();
  }
  return element;
}

/** Whether the widget has an element for `selector` at all, visible or not. */
function exists(page, selector) {
  return page.evaluate(
    (sel) => Boolean(document.querySelector("hafen-widget")?.shadowRoot?.querySelector(sel)),
    selector,
  );
}

function waitVisible(page, selector, what = selector) {
  return until(what, () => visible(page, selector));
}

async function click(page, name) {
  const element = await waitVisible(page, hook(name), `${hook(name)} to show`);
  await element.click();
  await element.dispose();
}

async function typeInto(page, name, text) {
  const element = await waitVisible(page, hook(name), `${hook(name)} to show`);
  await element.click();
  await element.type(text);
  await element.dispose();
}

function text(page, selector) {
  return page.evaluate(
    (sel) => document.querySelector("hafen-widget")?.shadowRoot?.querySelector(sel)?.textContent ?? "",
    selector,
  );
}

const statusText = (page) => text(page, hook("status"));

/** The chat's messages in the order shown. */
function messages(page) {
  return page.evaluate(() =>
    Array.from(
      document.querySelector("hafen-widget")?.shadowRoot?.querySelectorAll('[data-hafen="message"]') ?? [],
      (el) => ({
        id: el.dataset.messageId,
        from: el.dataset.from,
        sequence: Number(el.dataset.sequence),
        text: el.querySelector(".text")?.textContent ?? "",
      }),
    ),
  );
}

const answers = (list) => list.filter((m) => m.from === "agent" && m.text.startsWith(ANSWER));

async function waitAnswers(page, count) {
  return until(`answer ${count} of an agent ("${ANSWER} …")`, async () => {
    const list = await messages(page);
    return answers(list).length >= count ? list : null;
  });
}

async function sendMessage(page, body) {
  await typeInto(page, "message-input", body);
  await page.keyboard.press("Enter");
  await until(`"${body}" in the chat as the visitor's`, async () =>
    (await messages(page)).some((m) => m.from === "visitor" && m.text === body),
  );
}

/** Everything the page keeps in the browser, as the page sees it. */
function pageStorage(page) {
  return page.evaluate(() => {
    const dump = (storage) =>
      Object.fromEntries(Array.from({ length: storage.length }, (_, i) => storage.key(i)).map((k) => [k, storage.getItem(k)]));
    return { local: dump(localStorage), session: dump(sessionStorage), cookie: document.cookie };
  });
}

/**
 * Checks that the widget's visit is stored in `where` ("local" or "session") and nowhere else,
 * as nothing but its token, and that there is no cookie; returns the token.
 */
async function assertStoredIn(page, context, widgetId, where, what) {
  const names = { local: "localStorage", session: "sessionStorage" };
  const other = where === "local" ? "session" : "local";
  const key = `hafen-widget:${widgetId}`;
  const stored = await pageStorage(page);
  equal(Object.keys(stored[where]), [key], `${what}: ${names[where]}'s keys`);
  const value = JSON.parse(stored[where][key]);
  equal(Object.keys(value), ["token"], `${what}: what is stored`);
  check(typeof value.token === "string" && value.token.length > 0, `${what}: the stored token is empty`);
  equal(stored[other], {}, `${what}: ${names[other]}`);
  equal(stored.cookie, "", `${what}: document.cookie`);
  equal(await context.cookies(), [], `${what}: the browser's cookies`);
  return value.token;
}

async function assertNothingStored(page, context, what) {
  const stored = await pageStorage(page);
  equal(stored, { local: {}, session: {}, cookie: "" }, `${what}: storage and document.cookie`);
  equal(await context.cookies(), [], `${what}: the browser's cookies`);
}

/** Where the keyboard focus is, through the widget's shadow root. */
function focused(page) {
  return page.evaluate(() => {
    let el = document.activeElement;
    while (el?.shadowRoot?.activeElement) {
      el = el.shadowRoot.activeElement;
    }
    return {
      tag: el?.tagName?.toLowerCase() ?? null,
      hafen: el?.dataset?.hafen ?? null,
      inPanel: Boolean(el?.closest?.(".panel")),
      inConsent: Boolean(el?.closest?.('[data-hafen="consent-dialog"]')),
    };
  });
}

/** The launcher's text and aria-expanded, and whether the panel shows. */
function launcherState(page) {
  return page.evaluate(() => {
    const root = document.querySelector("hafen-widget")?.shadowRoot;
    const launcher = root?.querySelector('[data-hafen="launcher"]');
    return {
      text: launcher?.textContent ?? null,
      expanded: launcher?.getAttribute("aria-expanded") ?? null,
      open: root?.querySelector(".panel")?.hidden === false,
    };
  });
}

async function screenshot(page, name) {
  // The panel fades in when opened: a picture taken meanwhile shows it half there.
  await until("the widget's animations to end", () =>
    page.evaluate(() =>
      (document.querySelector("hafen-widget")?.shadowRoot?.getAnimations() ?? []).every((a) => a.playState !== "running"),
    ),
  );
  await page.screenshot({ path: join(SCREENSHOTS, name) });
}

async function goto(page, url) {
  const response = await page.goto(url, { waitUntil: "load", timeout: WAIT_MS });
  check(response?.ok(), `${url} answered ${response?.status()}`);
}

// ---- the run ----

async function foreignOrigin(browser) {
  const context = await browser.createBrowserContext();
  try {
    const page = await context.newPage();
    activePage = page;
    watchConsole(page, "foreign");
    const net = watchNetwork(page);
    await step("the foreign page loads", () => goto(page, FOREIGN_PAGE));
    await step("foreign origin gets nothing", async () => {
      // The script itself may be loaded by any site; the widget's calls are what is refused.
      const launcher = await until("the launcher (or the widget's absence)", async () => {
        const el = await visible(page, hook("launcher"));
        return el ?? null;
      }).catch(() => null);
      if (launcher) {
        await launcher.click();
        await launcher.dispose();
      }
      // "Connecting…" comes first; wait for the error that follows the refusal.
      const status = await until("an error in the status line", () =>
        page.evaluate(() => {
          const line = document.querySelector("hafen-widget")?.shadowRoot?.querySelector('[data-hafen="status"]');
          return line?.classList.contains("error") ? line.textContent : "";
        }),
      );
      const calls = net.requests.filter((r) => r.url.startsWith(CALLS));
      check(calls.length > 0, "the widget did not even try to call the service");
      const answered = net.responses.filter((r) => r.url.startsWith(CALLS) && r.status >= 200 && r.status < 300);
      equal(answered, [], "2xx answers to calls from a foreign origin");
      check(!(await exists(page, hook("message-input"))), "a message box is shown on a foreign origin");
      const stored = await pageStorage(page);
      const keys = [...Object.keys(stored.local), ...Object.keys(stored.session)].filter((k) => k.startsWith("hafen-widget:"));
      equal(keys, [], "widget keys in storage on a foreign origin");
      const codes = net.responses.filter((r) => r.url.startsWith(CALLS)).map((r) => r.status);
      const failures = net.failed.filter((r) => r.url.startsWith(CALLS)).map((r) => r.error);
      console.log(`# foreign origin: status "${status}"; under /w/ answers ${JSON.stringify(codes)}, failures ${JSON.stringify(failures)}`);
    });
  } finally {
    activePage = null;
    await context.close();
  }
}

/**
 * A visitor whose browser asks for German gets the organisation's German texts (the demo
 * widget has a German translation and consent text) and the widget's own German words, and the
 * organisation's texts are marked as German for screen readers.
 */
async function germanVisitor(browser) {
  const context = await browser.createBrowserContext();
  try {
    const page = await context.newPage();
    activePage = page;
    watchConsole(page, "german");
    const cdp = await page.createCDPSession();
    await cdp.send("Network.setUserAgentOverride", {
      userAgent: await browser.userAgent(),
      acceptLanguage: "de-DE,de,en",
    });
    await step("German: the organisation's texts and the widget's in the visitor's language", async () => {
      await goto(page, PAGE);
      equal(await page.evaluate(() => [...navigator.languages]), ["de-DE", "de", "en"], "the browser's languages");
      const launcher = await waitVisible(page, hook("launcher"), "the launcher");
      equal(await launcher.evaluate((el) => el.textContent), "Chatten Sie mit uns", "the launcher's text (German)");
      await launcher.dispose();
      await click(page, "launcher");
      await waitVisible(page, hook("consent-dialog"), "the consent dialog");
      const consent = await page.evaluate(() => {
        const root = document.querySelector("hafen-widget")?.shadowRoot;
        const text = root?.querySelector(".consent-text");
        return {
          title: root?.querySelector('[data-hafen="consent-dialog"] h3')?.textContent,
          lang: text?.getAttribute("lang"),
          start: text?.textContent?.slice(0, 22),
        };
      });
      equal(consent, { title: "Bevor wir chatten", lang: "de", start: "Die Demo-Organisation " }, "the consent question");
      await click(page, "consent-decline");
      const topic = await waitVisible(page, hook("field-topic"), "the topic field");
      const label = await topic.evaluate((input) => {
        const row = input.closest(".field");
        const span = row?.querySelector("label span");
        return { label: span?.textContent, lang: span?.getAttribute("lang"), purpose: row?.querySelector(".purpose")?.textContent };
      });
      await topic.dispose();
      equal(label, { label: "Thema", lang: "de", purpose: "Damit Ihre Frage die richtige Person erreicht" }, "the topic field");
    });
  } finally {
    activePage = null;
    await context.close();
  }
}

async function visitor(browser) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  activePage = page;
  const consoleOfPage = watchConsole(page, "page");
  const net = watchNetwork(page);
  // The language the widget picks comes from navigator.languages; say it in requests too.
  await page.setExtraHTTPHeaders({ "Accept-Language": "en-US,en;q=0.9" });

  const downloads = { completed: [], events: [] };
  const cdp = await browser.target().createCDPSession();
  cdp.on("Browser.downloadProgress", (event) => {
    if (event.state === "completed") {
      downloads.completed.push(event.guid);
    } else if (event.state === "canceled") {
      downloads.events.push(`canceled ${event.guid}`);
    }
  });
  await cdp.send("Browser.setDownloadBehavior", {
    behavior: "allow",
    downloadPath: DOWNLOADS,
    eventsEnabled: true,
    browserContextId: context.id,
  });

  // When the launcher is first drawn with its stylesheet (the frame shows once the CSS loaded),
  // in ms since the navigation began: reported, not judged (timings are for benchmarks).
  await page.evaluateOnNewDocument(() => {
    const look = () => {
      const frame = document.querySelector("hafen-widget")?.shadowRoot?.querySelector(".frame");
      if (frame && !frame.hidden) {
        window.__hafenFirstRender = performance.now();
      } else {
        requestAnimationFrame(look);
      }
    };
    requestAnimationFrame(look);
  });

  let widgetId = "";
  await step("the organisation's page loads", async () => {
    await goto(page, PAGE);
    widgetId = await page.evaluate(() => document.querySelector("script[data-widget]")?.dataset.widget ?? "");
    check(widgetId !== "", "the page's script tag has no data-widget");
    const times = await until("the widget's first render", () =>
      page.evaluate(() => {
        const rendered = window.__hafenFirstRender;
        const navigation = performance.getEntriesByType("navigation")[0];
        return rendered === undefined
          ? null
          : { rendered: Math.round(rendered), loaded: Math.round(navigation?.loadEventEnd ?? 0) };
      }),
    );
    console.log(`# first render of the widget on the demo page: ${times.rendered} ms after navigation start (page load event ${times.loaded} ms)`);
  });

  await step("before opening: no cookie, no storage, no call", async () => {
    const launcher = await waitVisible(page, hook("launcher"), "the launcher");
    const label = await launcher.evaluate((el) => el.textContent);
    await launcher.dispose();
    equal(label, "Chat with us", "the launcher's text (English)");
    equal(await page.evaluate(() => document.querySelector("hafen-widget")?.shadowRoot?.querySelector(".frame")?.lang), "en", "the widget's language");
    await assertNothingStored(page, context, "before opening");
    const called = net.requests.filter((r) => r.url.startsWith(CALLS));
    equal(called, [], "calls before the launcher was clicked");
    const loaded = net.requests.filter((r) => r.url.startsWith(ENDPOINT)).map((r) => new URL(r.url).pathname);
    equal(loaded.sort(), ["/widget/hafen-widget.css", "/widget/hafen-widget.js"], "what was loaded from the service");
    await screenshot(page, "widget-closed.png");
  });

  await step("keyboard: Tab reaches the launcher, Enter opens the chat, Escape closes it", async () => {
    for (let presses = 0; (await focused(page)).hafen !== "launcher"; presses += 1) {
      check(presses < MAX_TABS, `${MAX_TABS} presses of Tab did not reach the launcher; the focus is on ${JSON.stringify(await focused(page))}`);
      await page.keyboard.press("Tab");
    }
    await page.keyboard.press("Enter");
    await waitVisible(page, hook("consent-dialog"), "the consent dialog");
    await until("the focus in the consent dialog", async () => (await focused(page)).inConsent);
    equal(await launcherState(page), { text: "Close chat", expanded: "true", open: true }, "the launcher while the chat is open");
    await page.keyboard.press("Escape");
    await until("the panel to close, the focus back on the launcher", async () => {
      const state = await launcherState(page);
      return !state.open && (await focused(page)).hafen === "launcher" ? state : null;
    });
    // The visit has started (its token is stored), so the launcher offers to continue it.
    equal(await launcherState(page), { text: "Continue chat", expanded: "false", open: false }, "the launcher after Escape");
    await page.keyboard.press("Enter");
    await until("the panel to open again, the focus in the consent dialog", async () =>
      (await launcherState(page)).open && (await focused(page)).inConsent,
    );
    equal(await launcherState(page), { text: "Close chat", expanded: "true", open: true }, "the launcher after Enter");
  });

  let token = "";
  await step("the consent question, with the return-visit sentence and the privacy policy", async () => {
    await waitVisible(page, hook("consent-dialog"), "the consent dialog");
    const consent = await text(page, ".consent-text");
    check(consent.trim().length > 0, "the consent dialog has no text");
    const remember = await text(page, hook("consent-remember"));
    check(
      remember.includes(`for ${LIFETIME_DAYS} days`),
      `the consent dialog's return-visit sentence does not say "for ${LIFETIME_DAYS} days": "${remember}"`,
    );
    const order = await page.evaluate(() =>
      Array.from(
        document.querySelector("hafen-widget")?.shadowRoot?.querySelectorAll(
          '[data-hafen="consent-dialog"] :is(.consent-text, [data-hafen="consent-remember"], [data-hafen="privacy-link"])',
        ) ?? [],
        (el) => el.dataset.hafen ?? el.className,
      ),
    );
    equal(order, ["consent-text", "consent-remember", "privacy-link"], "the consent dialog's order");
    const link = await page.evaluate(() => {
      const a = document.querySelector("hafen-widget")?.shadowRoot?.querySelector('[data-hafen="privacy-link"]');
      return a && { href: a.getAttribute("href"), target: a.getAttribute("target"), rel: a.getAttribute("rel") };
    });
    check(link, "the consent dialog has no privacy link");
    equal(link.href, `${PAGE_ORIGIN}/privacy`, "the privacy link");
    equal(link.target, "_blank", "the privacy link's target");
    check((link.rel ?? "").split(/\s+/).includes("noopener"), `the privacy link's rel is "${link.rel}"`);
    await screenshot(page, "consent-dialog.png");
    token = await assertStoredIn(page, context, widgetId, "session", "before an answer");
  });

  await step("decline: the form asks nothing personal", async () => {
    await click(page, "consent-decline");
    await waitVisible(page, hook("field-topic"), "the topic field");
    check(!(await exists(page, hook("field-email"))), "the e-mail field is offered without consent");
    check(!(await exists(page, '[data-hafen^="release-"]')), "a release box is offered without consent");
    equal(await assertStoredIn(page, context, widgetId, "session", "after declining"), token, "the token after declining");
    await typeInto(page, "field-topic", "Billing");
    await click(page, "fields-submit");
  });

  await step("chat: a message and an agent's answer", async () => {
    await waitVisible(page, hook("message-input"), "the message box");
    await sendMessage(page, "Hello from Chromium");
    await waitAnswers(page, 1);
  });

  await step("grant later: the e-mail field is offered and released", async () => {
    const before = await messages(page);
    // The chat must be the same one afterwards (not rebuilt): mark its element.
    check(
      await page.evaluate(() => {
        const chat = document.querySelector("hafen-widget")?.shadowRoot?.querySelector(".chat");
        if (chat) {
          chat.hafenTestMark = true;
        }
        return Boolean(chat);
      }),
      "no chat element",
    );
    await click(page, "mydata-open");
    await click(page, "consent-change");
    await waitVisible(page, hook("consent-dialog"), "the consent dialog again");
    await click(page, "consent-accept");
    await waitVisible(page, hook("field-email"), "the e-mail field");
    // The grant was recorded before the form came: the visit is remembered on this device now.
    equal(await assertStoredIn(page, context, widgetId, "local", "after the grant"), token, "the token after the grant");
    await waitVisible(page, hook("release-email"), "the e-mail's release box");
    check(!(await exists(page, hook("field-topic"))), "the topic, given already, is asked again");
    await typeInto(page, "field-email", "visitor@example.com");
    await click(page, "release-email");
    await click(page, "fields-submit");
    await waitVisible(page, hook("message-input"), "the chat again");
    const same = await page.evaluate(
      () => document.querySelector("hafen-widget")?.shadowRoot?.querySelector(".chat")?.hafenTestMark === true,
    );
    check(same, "the chat was rebuilt instead of shown again");
    const after = await messages(page);
    check(
      before.every((m) => after.some((a) => a.id === m.id)),
      `messages went missing: before ${JSON.stringify(before)}, after ${JSON.stringify(after)}`,
    );
  });

  let beforeReload = [];
  await step("a second message and its answer", async () => {
    await sendMessage(page, "Second message");
    beforeReload = await waitAnswers(page, 2);
    await screenshot(page, "conversation.png");
  });

  await step("reload: the same chat, without gap or duplicate, and live", async () => {
    await page.reload({ waitUntil: "load", timeout: WAIT_MS });
    equal(await assertStoredIn(page, context, widgetId, "local", "after the reload"), token, "the token after the reload");
    const launcher = await waitVisible(page, hook("launcher"), "the launcher");
    equal(await launcher.evaluate((el) => el.textContent), "Continue chat", "the launcher's text after the reload");
    await launcher.dispose();
    await click(page, "launcher");
    // The replay may arrive in parts: wait for at least what was shown before.
    const expected = await until("the chat replayed", async () => {
      const list = await messages(page);
      return list.length >= beforeReload.length ? list : null;
    });
    const sequences = expected.map((m) => m.sequence);
    equal(sequences, [...sequences].sort((a, b) => a - b), "the messages' order by data-sequence");
    equal(new Set(expected.map((m) => m.id)).size, expected.length, "distinct messages");
    equal(expected.slice(0, beforeReload.length).map((m) => m.id), beforeReload.map((m) => m.id), "the messages before and after the reload");
    const visitorTexts = expected.filter((m) => m.from === "visitor").map((m) => m.text);
    equal(visitorTexts, ["Hello from Chromium", "Second message"], "the visitor's messages");
    check(answers(expected).length >= 2, `answers after the reload: ${JSON.stringify(expected)}`);
    equal(expected.length, 4, "messages shown (2 of the visitor, 2 answers)");
    check(!(await exists(page, hook("consent-dialog"))), "consent was asked again");
    await sendMessage(page, "After reload");
    await waitAnswers(page, 3);
    equal(await assertStoredIn(page, context, widgetId, "local", "after resuming"), token, "the token after resuming");
  });

  // The second tab's console and requests join the first's for the last checks.
  let consoleOfTab = [];
  let netOfTab = { requests: [] };
  await step("a second tab: the same chat, without consent asked again", async () => {
    const shown = await messages(page);
    const tab = await context.newPage();
    activePage = tab;
    consoleOfTab = watchConsole(tab, "second tab");
    netOfTab = watchNetwork(tab);
    await tab.setExtraHTTPHeaders({ "Accept-Language": "en-US,en;q=0.9" });
    await goto(tab, PAGE);
    equal(await assertStoredIn(tab, context, widgetId, "local", "in the second tab"), token, "the token in the second tab");
    const launcher = await waitVisible(tab, hook("launcher"), "the second tab's launcher");
    equal(await launcher.evaluate((el) => el.textContent), "Continue chat", "the second tab's launcher");
    await launcher.dispose();
    await click(tab, "launcher");
    const replayed = await until("the chat replayed in the second tab", async () => {
      const list = await messages(tab);
      return list.length >= shown.length ? list : null;
    });
    equal(replayed.map((m) => m.id), shown.map((m) => m.id), "the messages in the second tab");
    await waitVisible(tab, hook("message-input"), "the second tab's message box");
    check(!(await exists(tab, hook("consent-dialog"))), "consent was asked in the second tab");
    equal(await assertStoredIn(tab, context, widgetId, "local", "after resuming in the second tab"), token, "the token after resuming in the second tab");
    await screenshot(tab, "second-tab.png");
    // Closed only when all is well, so that a failure's report shows this tab.
    await tab.close();
    activePage = page;
    await page.bringToFront();
  });

  await step("my data: fields, consent answers, download", async () => {
    await click(page, "mydata-open");
    const email = await waitVisible(page, hook("mydata-field-email"), "the e-mail in my data");
    equal(await email.evaluate((el) => el.value), "visitor@example.com", "the e-mail in my data");
    await email.dispose();
    const topic = await waitVisible(page, hook("mydata-field-topic"), "the topic in my data");
    equal(await topic.evaluate((el) => el.value), "Billing", "the topic in my data");
    await topic.dispose();
    const consentAnswers = await page.evaluate(() =>
      Array.from(
        document.querySelector("hafen-widget")?.shadowRoot?.querySelectorAll('[data-hafen="mydata-panel"] li') ?? [],
        (li) => /^Version \d+: (accepted|declined)/.exec(li.textContent ?? "")?.[1],
      ).filter(Boolean),
    );
    equal(consentAnswers, ["declined", "accepted"], "the consent answers");
    await screenshot(page, "my-data.png");
    await click(page, "mydata-download");
    await until("the download to complete", () => downloads.completed.length > 0 || downloads.events.length > 0);
    equal(downloads.events, [], "download events");
    const files = await until("the downloaded file", () => {
      const names = readdirSync(DOWNLOADS);
      return names.length > 0 && names.every((n) => !n.endsWith(".crdownload")) ? names : null;
    });
    equal(files.length, 1, `files in ${DOWNLOADS} (${files.join(", ")})`);
    const exported = JSON.parse(readFileSync(join(DOWNLOADS, files[0]), "utf8"));
    check(typeof exported.visit_id === "string" && exported.visit_id !== "", "the export has no visit_id");
    const field = (exported.fields ?? []).find((f) => f.key === "email");
    equal(field?.value, "visitor@example.com", "the e-mail in the export");
  });

  await step("delete: the data goes, and nothing stays in the browser", async () => {
    await click(page, "mydata-delete");
    await click(page, "mydata-delete-confirm");
    await until('"Your data was deleted." in the status line', async () =>
      (await statusText(page)) === "Your data was deleted.",
    );
    await assertNothingStored(page, context, "after deleting");
  });

  await step("only the page's origin and the service were contacted", async () => {
    const foreign = [...net.requests, ...netOfTab.requests].filter((r) => {
      const origin = new URL(r.url).origin;
      return origin !== PAGE_ORIGIN && origin !== ENDPOINT_ORIGIN;
    });
    equal(foreign, [], "requests to third parties");
  });

  await step("no Content-Security-Policy violation", async () => {
    const violations = [...consoleOfPage, ...consoleOfTab].filter((line) => /Refused to|Content Security Policy/i.test(line));
    equal(violations, [], "CSP violations in the console");
  });

  activePage = null;
  await cdp.detach().catch(() => {});
  await context.close();
}

async function report(err) {
  console.log(`not ok - ${currentStep}`);
  console.log(`# error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  if (activePage && !activePage.isClosed()) {
    const status = await Promise.race([statusText(activePage).catch((e) => `(unreadable: ${e.message})`), sleep(5000).then(() => "(no answer)")]);
    console.log(`# widget status line: ${JSON.stringify(status)}`);
    await Promise.race([activePage.screenshot({ path: join(SCREENSHOTS, "failure.png") }), sleep(10_000)]).catch((e) =>
      console.log(`# no failure.png: ${e.message}`),
    );
  }
  console.log(`# console (${consoleLines.length} messages):`);
  for (const line of consoleLines) {
    console.log(`#   ${line}`);
  }
}

async function main() {
  // A failure.png is about the run that saved it.
  rmSync(join(SCREENSHOTS, "failure.png"), { force: true });
  const userDataDir = mkdtempSync(join(tmpdir(), "hafen-chromium-"));
  let browser = null;
  let failed = false;
  try {
    const spki = spkiHash(join(CERTS_DIR, "webchat.pem"));
    browser = await puppeteer.launch({
      executablePath: "/usr/bin/chromium",
      headless: true,
      userDataDir,
      protocolTimeout: 30_000,
      defaultViewport: { width: 1280, height: 800 },
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--lang=en-US",
        `--ignore-certificate-errors-spki-list=${spki}`,
      ],
      env: { ...process.env, LANGUAGE: "en_US", LANG: "en_US.UTF-8" },
    });
    let timer;
    const overtime = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`the run took over ${RUN_MS / 1000} s`)), RUN_MS);
    });
    try {
      await Promise.race([
        (async () => {
          await foreignOrigin(browser);
          await germanVisitor(browser);
          await visitor(browser);
        })(),
        overtime,
      ]);
    } finally {
      clearTimeout(timer);
    }
  } catch (err) {
    failed = true;
    await report(err);
  } finally {
    if (browser) {
      const closed = await Promise.race([browser.close().then(() => true, () => false), sleep(10_000).then(() => false)]);
      if (!closed) {
        browser.process()?.kill("SIGKILL");
      }
    }
    rmSync(userDataDir, { recursive: true, force: true });
  }
  process.exit(failed ? 1 : 0);
}

await main();
