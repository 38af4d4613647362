// Pieces without a node: the frame layout against proto/README.md's worked
// examples, the reassembler, the policies (ported from src/sdk.rs tests),
// the code classification, the agent's pure decisions, and that the
// committed generated code matches proto/longlink.proto.

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { fromBinary } from "@bufbuild/protobuf";
import {
  Agent,
  Backoff,
  Endpoints,
  ErrorCode,
  FrameError,
  FrameKind,
  FrameReader,
  Rng,
  SmartHeartbeat,
  decodeWsClose,
  encodeFrame,
  encodeRaw,
  parseDispatch,
  pb,
  reconnectAllowed,
  reconnectAllowedAfter,
} from "../dist/node.js";

const hex = (b) => Buffer.from(b).toString("hex").toUpperCase().match(/../g).join(" ");
const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");

test("frames match proto/README.md's worked examples byte for byte", () => {
  assert.equal(hex(encodeRaw(FrameKind.PING, new Uint8Array())), "4C 01 04 00 00 00 00 00");
  assert.equal(hex(encodeRaw(FrameKind.PING, new Uint8Array(), 1)), "4C 01 04 01 00 00 00 00");
  assert.equal(
    hex(encodeFrame(FrameKind.AUTH, pb.AuthSchema, { token: "abc", heartbeatMs: 30000 })),
    "4C 01 01 00 00 00 00 09 0A 03 61 62 63 38 B0 EA 01",
  );
  assert.equal(hex(encodeFrame(FrameKind.ERROR, pb.ErrorSchema, { code: ErrorCode.FRAME_TOO_LARGE })), "4C 01 03 00 00 00 00 03 08 D1 0F");
  assert.equal(hex(encodeFrame(FrameKind.KICKED, pb.KickedSchema, { code: ErrorCode.REPLACED })), "4C 01 06 00 00 00 00 03 08 D3 0F");
});

test("the reassembler reads frames split anywhere and several per chunk, and checks the length first", () => {
  const frames = [
    encodeFrame(FrameKind.MESSAGE, pb.MessageSchema, { payload: new Uint8Array(300).fill(7), seq: 5n }),
    encodeRaw(FrameKind.PONG, new Uint8Array()),
    encodeFrame(FrameKind.GO_AWAY, pb.GoAwaySchema, { endpoint: "10.0.0.2:7100", reason: "drain" }),
  ];
  const all = Buffer.concat(frames);
  for (const step of [1, 3, 8, 9, 100, all.length]) {
    const r = new FrameReader();
    const got = [];
    for (let i = 0; i < all.length; i += step) {
      r.push(all.subarray(i, i + step));
      for (let f; (f = r.next()); ) got.push(f);
    }
    assert.deepEqual(got.map((f) => f.kind), [FrameKind.MESSAGE, FrameKind.PONG, FrameKind.GO_AWAY], `step ${step}`);
    assert.equal(got[0].body.length, frames[0].length - 8);
    assert.equal(r.buffered, 0);
  }
  // A header announcing more than the limit is refused before its body arrives.
  const big = new FrameReader(1024);
  big.push(Uint8Array.from([0x4c, 1, 7, 0, 0, 0, 0x04, 0x01]));
  assert.throws(() => big.next(), FrameError);
  const magic = new FrameReader();
  magic.push(Uint8Array.from([0x47, 0x45, 0x54, 0x20, 0, 0, 0, 0]));
  assert.throws(() => magic.next(), /magic/);
  const version = new FrameReader();
  version.push(Uint8Array.from([0x4c, 2, 4, 0, 0, 0, 0, 0]));
  assert.throws(() => version.next(), /version/);
  const kind = new FrameReader();
  kind.push(Uint8Array.from([0x4c, 1, 0, 0, 0, 0, 0, 0]));
  assert.throws(() => kind.next(), /kind/);
});

test("backoff grows exponentially with full jitter inside the bounds, and is never a tight loop", () => {
  const rng = new Rng(7n);
  const b = new Backoff(100, 500, 30_000);
  for (let k = 0; k < 10; k++) {
    const ceiling = Math.min(500 * 2 ** k, 30_000);
    const d = b.nextDelayMs(rng);
    assert.ok(d >= 100 && d <= ceiling, `attempt ${k}: ${d}`);
  }
  const draws = Array.from({ length: 200 }, () => b.nextDelayMs(rng));
  assert.ok(draws.some((d) => d < 10_000) && draws.some((d) => d > 20_000));
  b.reset();
  assert.ok(b.nextDelayMs(rng) <= 500);
  const zero = new Backoff(0, 0, 0);
  for (let i = 0; i < 100; i++) assert.ok(zero.nextDelayMs(rng) >= 1);
});

test("endpoints drift and GoAway jumps", () => {
  const e = new Endpoints(["a:1", "b:1", "c:1"]);
  assert.equal(e.current(), "a:1");
  assert.equal(e.fail(), false);
  assert.equal(e.current(), "b:1");
  assert.equal(e.fail(), false);
  assert.equal(e.fail(), true, "wrapped: every endpoint failed");
  e.goAway("c:1");
  assert.equal(e.current(), "c:1");
  assert.equal(e.length, 3);
  e.goAway("d:1");
  assert.deepEqual([e.current(), e.length], ["d:1", 4]);
});

test("the smart heartbeat lengthens after three pongs, probes after a miss, never climbs back", () => {
  const h = new SmartHeartbeat(10_000, 90_000);
  assert.equal(h.intervalMs(), 10_000);
  for (let i = 0; i < 3; i++) h.onPong();
  assert.equal(h.intervalMs(), 20_000);
  for (let i = 0; i < 6; i++) h.onPong();
  assert.equal(h.intervalMs(), 40_000);
  assert.equal(h.provenMs, 30_000);
  assert.equal(h.onMissed(), false);
  assert.equal(h.intervalMs(), 0, "probe at once");
  h.onPong();
  assert.equal(h.intervalMs(), 30_000);
  for (let i = 0; i < 30; i++) h.onPong();
  assert.equal(h.intervalMs(), 30_000);
  // Background: the proven interval; one heartbeat on return.
  const g = new SmartHeartbeat(10_000, 90_000);
  for (let i = 0; i < 6; i++) g.onPong();
  assert.equal(g.setForeground(false), false);
  assert.equal(g.intervalMs(), 20_000);
  assert.equal(g.setForeground(true), true);
  g.resetNetwork();
  assert.equal(g.intervalMs(), 10_000);
  // A failed probe means dead.
  const d = new SmartHeartbeat(10_000, 90_000);
  assert.equal(d.onMissed(), false);
  assert.equal(d.onMissed(), true);
});

test("codes: known 1xxx reconnect, 2xxx are terminal, unknown ones reconnect as in src/codes.rs", () => {
  for (const [name, n] of Object.entries(ErrorCode)) {
    if (typeof n !== "number" || n === 0) continue;
    assert.equal(reconnectAllowed(n), n >= 1000 && n < 2000, name);
  }
  assert.equal(reconnectAllowed(2999), true, "unknown: SERVER_ERROR's row, like the Rust SDK");
  const kicked = (code) => ({ type: "kicked", code, reason: "" });
  assert.equal(reconnectAllowedAfter(kicked(ErrorCode.SHUTDOWN)), true);
  assert.equal(reconnectAllowedAfter(kicked(ErrorCode.REPLACED)), false);
  assert.equal(reconnectAllowedAfter({ type: "error", code: ErrorCode.TOKEN_EXPIRED, reason: "", reconnect: true }), true);
  assert.equal(reconnectAllowedAfter({ type: "error", code: ErrorCode.INVALID_TOKEN, reason: "", reconnect: false }), false);
  for (const t of ["connect_failed", "connect_timeout", "auth_timeout", "no_pong", "lost", "dispatcher", "network_changed", "go_away"]) {
    assert.equal(reconnectAllowedAfter({ type: t }), true, t);
  }
  assert.equal(reconnectAllowedAfter({ type: "protocol" }), false);
  assert.equal(reconnectAllowedAfter({ type: "closed_by_app" }), false);
  assert.equal(decodeWsClose(4000, "2003 replaced"), ErrorCode.REPLACED);
  assert.equal(decodeWsClose(4000, "GOING_AWAY: drain"), ErrorCode.GOING_AWAY);
  assert.equal(decodeWsClose(1006, ""), undefined);
  assert.equal(decodeWsClose(1000, "bye"), undefined);
  // The status alone (no reason): 4000 + (code - 1000), 4500 + (code - 2000).
  assert.equal(decodeWsClose(4000, ""), ErrorCode.SHUTDOWN);
  assert.equal(decodeWsClose(4503, ""), ErrorCode.REPLACED);
  assert.equal(decodeWsClose(4502, "2002 INVALID_TOKEN"), ErrorCode.INVALID_TOKEN);
  assert.equal(decodeWsClose(4499, ""), undefined);
});

test("the agent needs somewhere to connect and starts with a connect bounded by the timeout", () => {
  const cfg = {
    session: { token: "t", device: "", platform: "", clientVersion: "", capabilities: 1, lastSeq: 0n, storeIncarnation: 0n, heartbeatMs: 0, responseTimeoutMs: 10_000, ackEvery: 16 },
    endpoints: [],
    dispatcher: false,
    net: "",
    connectTimeoutMs: 10_000,
    backoffMinMs: 200,
    backoffBaseMs: 1000,
    backoffMaxMs: 60_000,
    heartbeatMinMs: 5000,
    heartbeatMaxMs: 270_000,
    requestRetryMs: 5000,
    maxPendingRequests: 1024,
    ackDelayMs: 200,
    maxFrameBytes: 65536,
    seed: 1n,
  };
  assert.throws(() => new Agent(cfg, 0), /no endpoint/);
  const a = new Agent({ ...cfg, endpoints: ["a:1"] }, 0);
  assert.deepEqual(a.pollAction(), { type: "connect", link: 1, endpoint: "a:1" });
  assert.equal(a.pollTimeout(), 10_000);
  // A stale link is ignored.
  a.handleConnected(1, 7);
  a.handleClosed(1, 7, "x");
  assert.equal(a.pollAction(), undefined);
});

/** The Auth frame among the actions queued so far. */
function sentAuth(agent) {
  for (let a; (a = agent.pollAction()); ) {
    if (a.type !== "send") continue;
    const r = new FrameReader();
    r.push(a.bytes);
    const f = r.next();
    if (f.kind === FrameKind.AUTH) return fromBinary(pb.AuthSchema, f.body);
  }
  throw new Error("no Auth sent");
}

test("the store incarnation is sent, and a changed one adopted only once its resync is handled", () => {
  const cfg = {
    session: { token: "t", device: "", platform: "", clientVersion: "", capabilities: 1, lastSeq: 0n, storeIncarnation: 7n, heartbeatMs: 0, responseTimeoutMs: 10_000, ackEvery: 16 },
    endpoints: ["a:1"], dispatcher: false, net: "", connectTimeoutMs: 10_000, backoffMinMs: 200, backoffBaseMs: 1000, backoffMaxMs: 60_000,
    heartbeatMinMs: 5000, heartbeatMaxMs: 270_000, requestRetryMs: 5000, maxPendingRequests: 1024, ackDelayMs: 200, maxFrameBytes: 65536, seed: 1n,
  };
  const agent = new Agent(cfg, 0);
  agent.handleConnected(1, 1);
  assert.equal(sentAuth(agent).storeIncarnation, 7n);
  agent.handleBytes(2, 1, encodeFrame(FrameKind.AUTH_OK, pb.AuthOkSchema, { heartbeatMs: 30_000, storeIncarnation: 9n }));
  assert.equal(agent.storeIncarnation, 7n, "not before the resync is handled");
  agent.handleBytes(3, 1, encodeFrame(FrameKind.RESYNC_REQUIRED, pb.ResyncRequiredSchema, { fromSeq: 1n, toSeq: 500n }));
  agent.messageHandled(4, 500n);
  assert.deepEqual([agent.storeIncarnation, agent.lastSeq], [9n, 500n]);
  // The next session says so.
  agent.handleClosed(5, 1, "reset");
  agent.handleTimeout(600_000);
  let connect;
  for (let a; (a = agent.pollAction()); ) if (a.type === "connect") connect = a;
  assert.ok(connect, "reconnects");
  agent.handleConnected(600_001, connect.link);
  const auth = sentAuth(agent);
  assert.deepEqual([auth.storeIncarnation, auth.lastSeq], [9n, 500n]);
});

test("dispatcher replies are parsed and checked", () => {
  const d = parseDispatch(
    JSON.stringify({ endpoints: ["127.0.0.1:7100"], token: "tok", heartbeat: { min_ms: 5000, max_ms: 200000 }, reconnect: { min_ms: 300, max_ms: 20000 } }),
  );
  assert.deepEqual(d, { endpoints: ["127.0.0.1:7100"], token: "tok", heartbeatMinMs: 5000, heartbeatMaxMs: 200000, reconnectMinMs: 300, reconnectMaxMs: 20000 });
  assert.throws(() => parseDispatch("{}"), /no endpoints/);
  assert.throws(() => parseDispatch("not json"), /bad dispatcher reply/);
});

test("the committed generated code is up to date with proto/longlink.proto", () => {
  const out = mkdtempSync(join(tmpdir(), "longlink-gen-"));
  try {
    execFileSync(join(root, "node_modules/.bin/buf"), ["generate", "../../proto", "--template", "buf.gen.yaml", "-o", out], {
      cwd: root,
      stdio: "pipe",
      // buf runs the protoc-gen-es plugin from the dev dependencies.
      env: { ...process.env, PATH: `${join(root, "node_modules/.bin")}:${process.env.PATH}` },
    });
    const fresh = readFileSync(join(out, "src/gen/longlink_pb.ts"), "utf8");
    const committed = readFileSync(join(root, "src/gen/longlink_pb.ts"), "utf8");
    assert.ok(fresh === committed, "src/gen/longlink_pb.ts is stale: run `npm run generate` in clients/js and commit it");
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test("the browser entry (dist/index.js) imports no node: module, directly or not", () => {
  const seen = new Set();
  const walk = (file) => {
    if (seen.has(file)) return;
    seen.add(file);
    const src = readFileSync(file, "utf8");
    for (const m of src.matchAll(/(?:^|\n)\s*(?:import|export)[^;]*?from\s+"([^"]+)"/g)) {
      const spec = m[1];
      assert.ok(!spec.startsWith("node:"), `${file} imports ${spec}`);
      if (spec.startsWith(".")) walk(resolve(dirname(file), spec));
    }
  };
  walk(join(root, "dist/index.js"));
  assert.ok(seen.size > 5);
  assert.ok(![...seen].some((f) => f.endsWith("tcp.js")));
});
