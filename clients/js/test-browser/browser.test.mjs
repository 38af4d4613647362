// The demo page (demo/) in a real, headless Chromium, against a real node
// (its WebSocket listeners, server.ws_listen and wss_listen) and the real
// echo backend. The page connects over ws:// and over wss:// (a test CA
// made here with openssl; Chromium accepts only the test certificate's
// key, by its SPKI hash, no blanket --ignore-certificate-errors), and,
// through its own controls:
// - receives a unicast (at-least-once, ACKed) and a group push;
// - holds two at-least-once messages unacknowledged in its handler while
//   the node kicks the session with a reconnectable code: it reconnects,
//   handles each once, in order, and every one is ACKED;
// - is kicked for good, two messages are pushed while it is offline,
//   Connect resumes after its last handled seq and the node replays them;
// - joins its group again after each reconnect (a group push arrives);
// - completes an upstream request to the echo backend.
// Every wait is bounded and polls; nothing sleeps.
//
// Needs Chromium ($CHROMIUM_BIN, or Debian's `chromium`) and puppeteer-core
// (a dev dependency). Run: npm run test:browser (after npm ci).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createHash, createPublicKey } from "node:crypto";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import * as net from "node:net";
import puppeteer from "puppeteer-core";
import { Node, Echo, cli, waitUntil, tempDir, freePort, nodeToml, spawnReady, big, WAIT_MS } from "../test/harness.mjs";

const here = dirname(fileURLToPath(import.meta.url));

function chromiumPath() {
  const candidates = [process.env.CHROMIUM_BIN, "/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"];
  const found = candidates.find((p) => p && existsSync(p));
  if (!found) throw new Error("Chromium not found: install Debian's `chromium` package or set CHROMIUM_BIN");
  return found;
}

/** A test CA and a certificate for 127.0.0.1 / localhost signed by it (openssl). */
function testCa(dir) {
  const run = (...args) => execFileSync("openssl", args, { stdio: "pipe", cwd: dir });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  run("req", "-x509", ...ec, "-days", "1", "-subj", "/CN=longlink browser test CA", "-keyout", "ca.key", "-out", "ca.pem");
  run("req", ...ec, "-subj", "/CN=127.0.0.1", "-keyout", "key.pem", "-out", "req.csr");
  const ext = join(dir, "ext.cnf");
  execFileSync("sh", ["-c", `printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > ${JSON.stringify(ext)}`]);
  run("x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", ext, "-out", "cert.pem");
  const cert = readFileSync(join(dir, "cert.pem"));
  const key = readFileSync(join(dir, "key.pem"));
  // Chromium's --ignore-certificate-errors-spki-list takes base64 SHA-256 of a SubjectPublicKeyInfo.
  const spki = createPublicKey(cert).export({ type: "spki", format: "der" });
  return { cert, key, certFile: join(dir, "cert.pem"), keyFile: join(dir, "key.pem"), spki: createHash("sha256").update(spki).digest("base64") };
}

/** `node demo/serve.mjs` on a free port; resolves with its URL once it printed it. */
function startDemo() {
  const child = spawn(process.execPath, [resolve(here, "../demo/serve.mjs"), "--listen", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr = (stderr + d).slice(-4096)));
  const url = new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error(`demo server not ready within ${WAIT_MS} ms: ${stderr}`)), WAIT_MS);
    createInterface({ input: child.stdout }).on("line", (l) => {
      if (l.startsWith("demo ")) {
        clearTimeout(t);
        res(l.slice(5).trim());
      }
    });
    child.on("exit", (code) => rej(new Error(`demo server exited (${code}): ${stderr}`)));
  });
  return { child, url };
}

/**
 * A node like the harness's, with its WebSocket listeners on free ports:
 * ws_listen, and wss_listen with the test certificate.
 */
async function startNode(o, ca) {
  const ws = `127.0.0.1:${await freePort()}`;
  const wss = `127.0.0.1:${await freePort()}`;
  const ndir = tempDir("node");
  const config = join(ndir, "longlink.toml");
  const toml = nodeToml({ dataDir: ndir, wsListen: ws, ...o }).replace(
    /^ws_listen = .*$/m,
    (line) => `${line}\nwss_listen = ${JSON.stringify(wss)}`,
  );
  // The page joins its group itself: client JOIN is off unless allowed.
  writeFileSync(
    config,
    `${toml}\n[tls]\ncert_file = ${JSON.stringify(ca.certFile)}\nkey_file = ${JSON.stringify(ca.keyFile)}\n` +
      `[client_groups]\nallow = ["room-*"]\n`,
  );
  const p = spawnReady(["serve", "--config", config], ["listening ", "push "]);
  const [clientAddr, pushAddr] = await p.ready;
  const n = Object.assign(new Node(), { proc: p, child: p.child, dir: ndir, config, clientAddr, pushAddr, ws, wss });
  // The listeners are bound before those lines are printed; poll until they accept anyway.
  for (const addr of [ws, wss]) await waitUntil(`${addr} accepts`, () => accepts(addr));
  return n;
}

function accepts(addr) {
  const i = addr.lastIndexOf(":");
  return new Promise((res) => {
    const s = net.connect(Number(addr.slice(i + 1)), addr.slice(0, i));
    s.setTimeout(1000, () => s.destroy());
    s.on("connect", () => {
      s.destroy();
      res(true);
    });
    s.on("error", () => res(false));
    s.on("close", () => res(false));
  });
}

let dir, ca, echo, node, demo, demoUrl, browser;

before(async () => {
  dir = tempDir("browser");
  ca = testCa(dir);
  echo = await Echo.start();
  node = await startNode({ shards: 2, services: [{ id: "echo", backends: [echo.addr] }] }, ca);
  demo = startDemo();
  demoUrl = await demo.url;
  browser = await puppeteer.launch({
    executablePath: chromiumPath(),
    headless: true,
    timeout: 60_000,
    protocolTimeout: 60_000,
    userDataDir: join(dir, "profile"),
    args: [
      // Only the test certificate's key is accepted without a trusted chain.
      `--ignore-certificate-errors-spki-list=${ca.spki}`,
      ...(process.getuid?.() === 0 ? ["--no-sandbox"] : []),
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--no-first-run",
    ],
  });
});

after(async () => {
  await browser?.close().catch(() => {});
  demo?.child.kill("SIGKILL");
  await node?.stop();
  echo?.kill();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** A fresh page on the demo, with its console and errors kept for failure messages. */
async function openDemo() {
  const page = await browser.newPage();
  const notes = [];
  page.on("console", (m) => notes.push(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => notes.push(`pageerror: ${e.message}`));
  page.on("requestfailed", (r) => notes.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));
  page.setDefaultTimeout(WAIT_MS);
  await page.goto(demoUrl, { waitUntil: "load" });
  await page.waitForFunction(() => window.demo !== undefined);
  return { page, notes };
}

/** Waits until `fn(arg)` (run in the page) is truthy; on timeout says what the page logged. */
async function pageWait(p, what, fn, arg) {
  try {
    await p.page.waitForFunction(fn, { timeout: WAIT_MS, polling: 50 }, arg);
  } catch (e) {
    const log = await p.page.$eval("#log", (el) => el.innerText).catch(() => "");
    throw new Error(`${what}: ${e.message}\npage log:\n${log.slice(-3000)}\n${p.notes.slice(-20).join("\n")}`);
  }
}

const state = (p) => p.page.evaluate(() => JSON.parse(JSON.stringify({ messages: demo.messages, responses: demo.responses, events: demo.events, connects: demo.connects, state: demo.state })));

async function fill(page, id, value) {
  await page.$eval(`#${id}`, (el, v) => {
    el.value = v;
    el.dispatchEvent(new Event("change"));
  }, value);
}

async function groupCount(group) {
  const out = await cli(["online", ...node.pushPort(), "--group", group]);
  // One line per group: {"group":"room-1","online":1}.
  return out.trim().split("\n").map((l) => JSON.parse(l)).find((j) => j.group === group)?.online ?? 0;
}

async function acked(ids) {
  const st = await node.status(...ids);
  return st.every((s) => s.state === "ACKED");
}

/**
 * The whole story on one page: connect (token sent as `mode`), join a group,
 * a unicast and a group push, two at-least-once messages held unacknowledged
 * in the page's handler while the node kicks the session (SHUTDOWN: come
 * back), the page resumes and handles each once; a terminal kick, two
 * messages pushed while the page is offline, Connect again: replayed after
 * the page's last handled seq; a group push after the resume (the page
 * joined again), an upstream request to the echo backend.
 */
async function story(endpoint, mode, tag) {
  const device = `web-${tag}`;
  const group = `room-${tag}`;
  const token = await node.token(`user-${tag}`, device);
  const p = await openDemo();
  const { page } = p;
  try {
    await fill(page, "endpoint", endpoint);
    await fill(page, "token", token);
    await fill(page, "token-mode", mode);
    await fill(page, "group", group);
    await page.click("#connect");
    await pageWait(p, "connected", () => demo.state === "connected");

    // Join: the node counts the member once the JOIN frame arrived.
    await page.click("#join");
    await waitUntil(`${group} has a member`, async () => (await groupCount(group)) === 1);

    // A unicast (at-least-once) push, acknowledged by the page.
    const [u1] = await node.push(device, `unicast ${tag}`);
    assert.equal(u1.status, "STORED");
    await pageWait(p, "the unicast", (t) => demo.messages.some((m) => m.text === t), `unicast ${tag}`);
    await waitUntil("the unicast ACKED", () => acked([u1.message_id]));

    // A group push (at-most-once, seq 0).
    const g1 = await cli(["push", ...node.pushPort(), "--group", group, `group ${tag}`]);
    assert.match(g1, /"delivered":1|"DELIVERED"/, g1);
    await pageWait(p, "the group push", (t) => demo.messages.some((m) => m.text === t && m.seq === "0"), `group ${tag}`);

    // Hold the handler, then two at-least-once messages: sent to the page,
    // not acknowledged.
    await page.click("#hold");
    const [h1] = await node.push(device, `held one ${tag}`);
    const [h2] = await node.push(device, `held two ${tag}`);
    await waitUntil("both held messages sent", async () => {
      const st = await node.status(h1.message_id, h2.message_id);
      if (st.some((x) => x.state === "ACKED")) assert.fail(`acknowledged before the page handled it: ${JSON.stringify(st, big)}`);
      return st.every((x) => x.state === "SENT");
    });
    await pageWait(p, "the page got the first held message", (t) => document.getElementById("log").innerText.includes(t), `"held one ${tag}" (held)`);
    assert.equal((await node.status(h1.message_id))[0].state, "SENT", "nothing is acknowledged before handling");

    // The node ends the session; the page reconnects and resumes.
    const before = await state(p);
    await node.kick(device, "SHUTDOWN", "browser test");
    await pageWait(p, "a kick", (n) => demo.events.slice(n).some((e) => e.type === "kicked"), before.events.length);
    await pageWait(p, "back after the kick", (n) => demo.connects > n && demo.state === "connected", before.connects);
    await page.click("#hold"); // release: the page handles the held messages now
    await pageWait(p, "both held messages handled", (t) => demo.messages.filter((m) => m.text.startsWith(t)).length >= 2, "held ");
    await waitUntil("every at-least-once message ACKED", () => acked([u1.message_id, h1.message_id, h2.message_id]));

    // A terminal kick stops the page; two messages pushed meanwhile wait in
    // the node's store; Connect again resumes after the last handled seq
    // and the node replays exactly those two.
    const mid = await state(p);
    await node.kick(device, "KICKED", "browser test, terminal");
    await pageWait(p, "stopped by the kick", () => demo.state === "stopped");
    const [o1] = await node.push(device, `offline one ${tag}`);
    const [o2] = await node.push(device, `offline two ${tag}`);
    assert.deepEqual([o1.status, o2.status], ["STORED", "STORED"]);
    assert.equal((await node.status(o1.message_id))[0].state, "STORED", "not sent: the page is offline");
    await page.click("#connect");
    await pageWait(p, "connected again", (n) => demo.connects > n && demo.state === "connected", mid.connects);
    await pageWait(p, "the messages pushed while offline", (t) => demo.messages.filter((m) => m.text.startsWith(t)).length >= 2, "offline ");
    await waitUntil("the replayed messages ACKED", () => acked([o1.message_id, o2.message_id]));

    // Membership came back with the new connection; a message after the
    // resume still arrives.
    await waitUntil(`${group} has its member again`, async () => (await groupCount(group)) === 1);
    await cli(["push", ...node.pushPort(), "--group", group, `group again ${tag}`]);
    const [a1] = await node.push(device, `after ${tag}`);
    await pageWait(p, "the messages after the resume", (ts) => ts.every((t) => demo.messages.some((m) => m.text === t)), [`group again ${tag}`, `after ${tag}`]);
    await waitUntil("the last message ACKED", () => acked([a1.message_id]));

    // Each message handled exactly once, at-least-once ones in seq order.
    const s = await state(p);
    const texts = s.messages.map((m) => m.text);
    assert.deepEqual(
      [...texts].sort(),
      [`unicast ${tag}`, `group ${tag}`, `held one ${tag}`, `held two ${tag}`, `offline one ${tag}`, `offline two ${tag}`, `group again ${tag}`, `after ${tag}`].sort(),
      `each message once: ${JSON.stringify(texts)}`,
    );
    const seqs = s.messages.filter((m) => m.seq !== "0").map((m) => BigInt(m.seq));
    assert.deepEqual(seqs, [u1.seq, h1.seq, h2.seq, o1.seq, o2.seq, a1.seq], "at-least-once messages in order, none lost");
    assert.ok(s.events.some((e) => e.type === "disconnected" && e.retryInMs !== undefined), "the page was told, and reconnected");

    // An upstream request through the node to the echo backend.
    await fill(page, "service", "echo");
    await fill(page, "body", `ping ${tag}`);
    await page.click("#send");
    await pageWait(p, "the echo response", () => demo.responses.length > 0);
    const [r] = (await state(p)).responses;
    assert.deepEqual([r.status, r.body], ["OK", `ping ${tag}`], JSON.stringify(r));

    await page.click("#disconnect");
    await pageWait(p, "stopped", () => demo.state === "stopped");
  } finally {
    await page.close().catch(() => {});
  }
}

test("ws://: the demo page in Chromium: pushes, a group, a kick with resume and nothing lost, an upstream request", { timeout: 180_000 }, async () => {
  await story(`ws://${node.ws}/v1/ws`, "query", "ws");
});

test("wss://: the same over TLS, the token as a subprotocol entry", { timeout: 180_000 }, async () => {
  await story(`wss://${node.wss}/v1/ws`, "protocol", "wss");
});
