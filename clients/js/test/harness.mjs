// Test harness: real longlink processes (node, echo backend, dispatcher,
// redis-server) on free ports with their own config, readiness by their
// own output or by polling, never by sleeping. Every wait is bounded.

import { spawn, execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, existsSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import * as net from "node:net";
import { createInterface } from "node:readline";

const here = dirname(fileURLToPath(import.meta.url));

/** The node binary: $LONGLINK_BIN or ../../target/release/longlink (relative to clients/js). */
export const BIN = process.env.LONGLINK_BIN ? resolve(process.env.LONGLINK_BIN) : resolve(here, "../../../target/release/longlink");
if (!existsSync(BIN)) {
  throw new Error(
    `longlink binary not found at ${BIN}: build it with \`cargo build --release\` at the repository root, or set LONGLINK_BIN`,
  );
}

export const KEY_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
/** The cluster secret every test node shares (the node listener). */
export const CLUSTER_SECRET_HEX = "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f";
export const WAIT_MS = 20_000;

const children = new Set();
process.on("exit", () => {
  for (const c of children) c.kill("SIGKILL");
});

/** Polls `cond` every 10 ms until it holds (returns its value) or `limitMs` passes (throws). */
export async function waitUntil(what, cond, limitMs = WAIT_MS) {
  const deadline = Date.now() + limitMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${limitMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * SIGSTOP `child` and wait until every one of its threads is stopped:
 * kill() returns before a busy thread has entered the stop, and on a
 * loaded box a thread may still answer a request meanwhile (Linux /proc).
 */
export async function freeze(child) {
  child.kill("SIGSTOP");
  const tasks = `/proc/${child.pid}/task`;
  const state = (tid) => {
    try {
      const stat = readFileSync(`${tasks}/${tid}/stat`, "utf8");
      return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    } catch {
      return "T"; // the thread is gone
    }
  };
  await waitUntil(`process ${child.pid} stopped`, () => readdirSync(tasks).every((tid) => state(tid) === "T"));
}

/** A free loopback port (bind-and-release; the process binds it right after). */
export async function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.on("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

/** An address nobody listens on. */
export async function deadAddr() {
  return `127.0.0.1:${await freePort()}`;
}

export function tempDir(tag) {
  return mkdtempSync(join(tmpdir(), `longlink-js-${tag}-`));
}

/**
 * Spawns `args`, collects stdout lines; resolves once `expect` lines were
 * printed (each line matched by prefix) with the rest of each line.
 */
export function spawnReady(args, prefixes, env = {}) {
  const child = spawn(BIN, args, { env: { ...process.env, RUST_LOG: "warn", ...env }, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  child.on("exit", () => children.delete(child));
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr = (stderr + d.toString()).slice(-8192);
  });
  const lines = [];
  const waiters = [];
  const rl = createInterface({ input: child.stdout });
  rl.on("line", (line) => {
    lines.push(line);
    for (const w of waiters.splice(0)) w();
  });
  const ready = new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`${args[0]} not ready within ${WAIT_MS} ms; stderr: ${stderr}`)), WAIT_MS);
    const check = () => {
      if (lines.length >= prefixes.length) {
        clearTimeout(timer);
        const out = prefixes.map((p, i) => {
          if (!lines[i].startsWith(p)) return rej(new Error(`unexpected line ${JSON.stringify(lines[i])}`));
          return lines[i].slice(p.length).trim();
        });
        res(out);
      } else waiters.push(check);
    };
    child.on("exit", (code) => {
      clearTimeout(timer);
      rej(new Error(`${args[0]} exited (${code}) before it was ready; stderr: ${stderr}`));
    });
    check();
  });
  return { child, ready, lines, stderr: () => stderr };
}

/** Runs the CLI once; resolves with stdout (bounded in time). */
export function cli(args) {
  return new Promise((res, rej) => {
    execFile(BIN, args, { timeout: WAIT_MS, env: { ...process.env, RUST_LOG: "warn" } }, (err, stdout, stderr) => {
      if (err) rej(new Error(`longlink ${args.join(" ")}: ${err.message}; ${stderr}`));
      else res(stdout);
    });
  });
}

/** JSON.parse keeping 64-bit ids and sequences exact (as BigInt). */
export function parseBig(line) {
  const quoted = line.replace(/"(message_id|seq|conn_id|store_incarnation)":\s*(\d+)/g, '"$1":"$2"');
  return JSON.parse(quoted, (k, v) =>
    ["message_id", "seq", "conn_id", "store_incarnation"].includes(k) && typeof v === "string" ? BigInt(v) : v,
  );
}

function tomlString(s) {
  return JSON.stringify(s);
}

/** The node's config (TOML), like tests/common test_config, with overrides. */
export function nodeToml(o) {
  const services = (o.services ?? [])
    .map(
      (s) => `
[[upstream.services]]
id = ${tomlString(s.id)}
backends = [${s.backends.map(tomlString).join(", ")}]
timeout_ms = ${s.timeoutMs ?? 15000}
max_inflight_per_shard = ${s.maxInflightPerShard ?? 1024}
`,
    )
    .join("");
  return `
node_name = ${tomlString(o.name ?? "js-test")}
data_dir = ${tomlString(o.dataDir)}
[server]
client_listen = ${tomlString(o.clientListen ?? "127.0.0.1:0")}
ws_listen = ${tomlString(o.wsListen ?? "127.0.0.1:0")}
push_listen = ${tomlString(o.pushListen ?? "127.0.0.1:0")}
shards = ${o.shards ?? 2}
io_memory_bytes = 65536
accept_rate_per_sec = 0
[session]
auth_timeout_ms = 2000
heartbeat_min_ms = 100
heartbeat_default_ms = 10000
wheel_tick_ms = 20
close_linger_ms = 300
# Tests ping faster than real clients; the budget stays on, loose.
control_frames_per_sec = 1000
control_frames_burst = 1000
[auth]
clock_leeway_secs = ${o.clockLeewaySecs ?? 30}
[[auth.keys]]
id = "k1"
secret_hex = "${KEY_HEX}"
[delivery]
retry_base_ms = ${o.retryBaseMs ?? 300}
${o.redisUrl ? `redis_url = ${tomlString(o.redisUrl)}\nnode_index = ${o.nodeIndex ?? 0}` : ""}
[cluster]
enabled = ${o.redisUrl ? "true" : "false"}
node_listen = "127.0.0.1:0"
secret_hex = "${CLUSTER_SECRET_HEX}"
lease_ms = 3000
admin_listen = "127.0.0.1:0"
drain_rate_per_sec = 1000
drain_deadline_ms = 30000
[http]
admin_token = "${ADMIN_TOKEN}"
[upstream]
rate_limit_per_sec = 0
${services}
`;
}

/** The admin token of the test nodes (`[http] admin_token`). */
const ADMIN_TOKEN = "js-test-admin-token-00112233445566778899";

/** A `longlink serve` process. */
export class Node {
  static async start(o = {}) {
    const dir = tempDir("node");
    const config = join(dir, "longlink.toml");
    writeFileSync(config, nodeToml({ dataDir: dir, ...o }));
    const p = spawnReady(["serve", "--config", config], o.redisUrl ? ["listening ", "push ", "admin "] : ["listening ", "push "]);
    const [clientAddr, pushAddr, adminAddr] = await p.ready;
    const n = new Node();
    Object.assign(n, { proc: p, child: p.child, dir, config, clientAddr, pushAddr, adminAddr });
    return n;
  }

  /** A token for (user, device) signed with the node's key. */
  async token(user, device, ttl = "1h") {
    return (await cli(["token", "--user", user, "--device", device, "--app", "test", "--ttl", ttl, "--config", this.config])).trim();
  }

  /** The push-port flags: the address and the node's dev push key. */
  pushPort() {
    return ["--server", this.pushAddr, "--key-file", join(this.dir, "push-key")];
  }

  /** Pushes through the push port; returns the JSON result lines. */
  async push(device, text, { qos = "at-least-once" } = {}) {
    const out = await cli(["push", ...this.pushPort(), "--device", device, "--qos", qos, text]);
    return out.trim().split("\n").map(parseBig);
  }

  async kick(device, code, reason = "test") {
    await cli(["kick", ...this.pushPort(), "--device", device, "--code", code, "--reason", reason]);
  }

  /** Delivery state of at-least-once message ids ("STORED", "SENT", "ACKED", ...). */
  async status(...ids) {
    const out = await cli(["status", ...this.pushPort(), ...ids.map(String)]);
    return out.trim().split("\n").map(parseBig);
  }

  async adminPost(path) {
    // State-changing admin endpoints need the admin token and a content type
    // a browser cannot send cross-site without a preflight.
    const res = await fetch(`http://${this.adminAddr}${path}`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN_TOKEN}`, "content-type": "application/json" },
      body: "{}",
    });
    return res.status;
  }

  signal(sig) {
    this.child.kill(sig);
  }

  freeze() {
    return freeze(this.child);
  }

  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((r) => this.child.once("exit", r));
      this.child.kill("SIGKILL");
      await exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** `longlink echo-backend`: answers every upstream request with its body. */
export class Echo {
  static async start() {
    const p = spawnReady(["echo-backend", "--listen", "127.0.0.1:0"], ["listening "]);
    const [addr] = await p.ready;
    const e = new Echo();
    Object.assign(e, { proc: p, child: p.child, addr });
    return e;
  }

  /** SIGTERM: the backend prints its counts as one JSON line and exits. */
  async stopAndCount() {
    const exited = new Promise((r) => this.child.once("exit", r));
    this.child.kill("SIGCONT");
    this.child.kill("SIGTERM");
    await exited;
    const line = this.proc.lines.slice(1).find((l) => l.startsWith("{"));
    return JSON.parse(line);
  }

  kill() {
    this.child.kill("SIGKILL");
  }
}

/** A real redis-server on a free port. */
export class Redis {
  static async start() {
    const port = await freePort();
    const dir = tempDir("redis");
    const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], {
      stdio: "ignore",
    });
    children.add(child);
    const r = new Redis();
    Object.assign(r, { child, port, dir, url: `redis://127.0.0.1:${port}/` });
    await waitUntil("redis PING", () => r.ping());
    return r;
  }

  ping() {
    return new Promise((res) => {
      const s = net.connect(this.port, "127.0.0.1");
      let got = "";
      s.setTimeout(1000, () => s.destroy());
      s.on("connect", () => s.write("PING\r\n"));
      s.on("data", (d) => {
        got += d;
        if (got.includes("\r\n")) {
          s.destroy();
          res(got.startsWith("+PONG"));
        }
      });
      s.on("error", () => res(false));
      s.on("close", () => res(false));
    });
  }

  async stop() {
    this.child.kill("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** `longlink dispatcher` against a cluster's Redis. */
export async function startDispatcher(redisUrl, config) {
  const p = spawnReady(["dispatcher", "--redis", redisUrl, "--listen", "127.0.0.1:0", "--config", config], ["dispatcher "]);
  const [addr] = await p.ready;
  return { child: p.child, addr, stop: () => p.child.kill("SIGKILL") };
}

/**
 * Wraps a transport to record what the client sends (whole frames) and
 * how many connects it made.
 */
export function recording(transport, FrameReader) {
  const rec = { connects: [], sent: [] };
  rec.transport = {
    connect(endpoint, handlers, ctx) {
      rec.connects.push(endpoint);
      const link = transport.connect(endpoint, handlers, ctx);
      const reader = new FrameReader(1 << 20);
      return {
        ...link,
        send(bytes) {
          reader.push(bytes);
          for (let f; (f = reader.next()); ) rec.sent.push(f);
          link.send(bytes);
        },
        buffered: () => link.buffered(),
        pause: link.pause && (() => link.pause()),
        resume: link.resume && (() => link.resume()),
        close: () => link.close(),
      };
    },
  };
  return rec;
}

/** Collects a client's events in order; `next(type, pred)` waits for one (bounded). */
export function collect(client) {
  const events = [];
  const waiters = [];
  const types = ["connected", "disconnected", "kicked", "resync_required", "handler_error"];
  for (const t of [...types, "token_expiring", "token_refreshed", "token_refresh_failed"]) {
    client.on(t, (ev) => {
      events.push(ev);
      for (const w of waiters.splice(0)) w();
    });
  }
  let cursor = 0;
  return {
    events,
    /** The next event (after the last one returned) matching `pred`; earlier ones are skipped. */
    async next(what, pred, limitMs = WAIT_MS) {
      const deadline = Date.now() + limitMs;
      for (;;) {
        while (cursor < events.length) {
          const ev = events[cursor++];
          if (pred(ev)) return ev;
        }
        const left = deadline - Date.now();
        if (left <= 0) {
          const shown = events.slice(-12).map((e) => JSON.stringify(e, big).slice(0, 300));
          throw new Error(`timed out waiting for ${what}; ${events.length} events, the last ones: ${shown.join(", ")}`);
        }
        await new Promise((r) => {
          const t = setTimeout(r, left);
          waiters.push(() => {
            clearTimeout(t);
            r();
          });
        });
      }
    },
  };
}

/** JSON.stringify replacer for bigints and bytes. */
export function big(_k, v) {
  if (typeof v === "bigint") return v.toString();
  if (v instanceof Uint8Array) return new TextDecoder().decode(v);
  return v;
}

/** A gate a handler can wait on. */
export function gate() {
  let open;
  const p = new Promise((r) => (open = r));
  return { wait: () => p, open };
}
