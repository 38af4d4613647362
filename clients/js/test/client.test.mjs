// The TypeScript client against a real longlink node (and the real echo
// backend, dispatcher and redis-server). Each test starts its own
// processes on free ports and is bounded in time.

import { test } from "node:test";
import assert from "node:assert/strict";
import * as net from "node:net";
import { LonglinkClient, tcpTransport, FrameReader, FrameKind, ErrorCode, FLAG_RETRANSMISSION, pb, encodeFrame } from "../dist/node.js";
import { fromBinary } from "@bufbuild/protobuf";
import { Node, Echo, collect, recording, waitUntil, gate, deadAddr, big, freeze } from "./harness.mjs";

const T = { timeout: 90_000 };
const text = (m) => new TextDecoder().decode(m.payload);

/** Client options for tests: fast retries, bounds as a server gives. */
function options(extra) {
  return {
    transport: tcpTransport(),
    platform: "test",
    backoffMinMs: 20,
    backoffBaseMs: 50,
    backoffMaxMs: 500,
    connectTimeoutMs: 5_000,
    requestRetryMs: 300,
    ...extra,
  };
}

test("connects, authenticates and gets a unicast push", T, async () => {
  const node = await Node.start();
  const got = [];
  const client = new LonglinkClient(
    options({ endpoints: [node.clientAddr], token: await node.token("u1", "d1"), onMessage: (m) => void got.push(m) }),
  );
  const ev = collect(client);
  try {
    const c = await ev.next("connected", (e) => e.type === "connected");
    assert.equal(c.endpoint, node.clientAddr);
    assert.ok(c.authOk.connId > 0n);
    assert.equal(client.connectedTo, node.clientAddr);
    const [r] = await node.push("d1", "hello", { qos: "at-most-once" });
    assert.equal(r.status, "DELIVERED");
    await waitUntil("the message", () => got.length === 1);
    assert.equal(text(got[0]), "hello");
    assert.equal(got[0].seq, 0n, "at-most-once messages carry no sequence");
  } finally {
    const reason = await client.close();
    assert.equal(reason.type, "closed_by_app");
    await node.stop();
  }
});

test("at-least-once: the ACK goes out only after the handler resolved", T, async () => {
  const node = await Node.start();
  const g = gate();
  const handled = [];
  const client = new LonglinkClient(
    options({
      endpoints: [node.clientAddr],
      token: await node.token("u2", "d2"),
      onMessage: async (m) => {
        await g.wait();
        handled.push(m.seq);
      },
    }),
  );
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    const [r] = await node.push("d2", "m1");
    assert.equal(r.status, "STORED");
    // The node sent it; the handler holds it.
    await waitUntil("SENT", async () => (await node.status(r.message_id))[0].state === "SENT");
    // The link is cut while the handler runs: an ACK on receipt would have
    // told the node it was processed, so nothing would come again. Without
    // one the node replays it on the next session, and the client drops the
    // replay (the handler already has it).
    await node.kick("d2", "SHUTDOWN", "cut");
    await ev.next("disconnected", (e) => e.type === "disconnected" && e.reason.type === "kicked");
    await ev.next("reconnected", (e) => e.type === "connected");
    await waitUntil("the replay dropped as a duplicate", () => client.duplicates >= 1);
    assert.equal((await node.status(r.message_id))[0].state, "SENT", "not acknowledged while the handler runs");
    g.open();
    await waitUntil("ACKED", async () => (await node.status(r.message_id))[0].state === "ACKED");
    assert.deepEqual(handled, [r.seq], "handled once");
    assert.equal(client.lastSeq, r.seq);
  } finally {
    g.open();
    await client.close();
    await node.stop();
  }
});

test("resume from last_seq after the server cuts the link: no loss, no duplicate to the app", T, async () => {
  const node = await Node.start();
  const device = "d3";
  const tok = await node.token("u3", device);
  const seqs = [];
  const ids = [];
  const store = async (i) => {
    const [r] = await node.push(device, `m${i}`);
    assert.equal(r.status, "STORED");
    seqs.push(r.seq);
    ids.push(r.message_id);
  };

  // A first run handles m1..m3 and exits.
  let got = [];
  let client = new LonglinkClient(options({ endpoints: [node.clientAddr], token: tok, onMessage: (m) => void got.push(m) }));
  let ev = collect(client);
  await ev.next("connected", (e) => e.type === "connected");
  for (let i = 1; i <= 3; i++) await store(i);
  await waitUntil("m1..m3", () => got.length === 3);
  assert.deepEqual(got.map(text), ["m1", "m2", "m3"]);
  const resumeAt = client.lastSeq;
  const incarnation = client.storeIncarnation;
  assert.equal(resumeAt, seqs[2]);
  await client.close();

  // Offline: m4..m6 are stored. The next run resumes after m3.
  for (let i = 4; i <= 6; i++) await store(i);
  got = [];
  const g = gate();
  client = new LonglinkClient(
    options({
      endpoints: [node.clientAddr],
      token: tok,
      lastSeq: resumeAt,
      storeIncarnation: incarnation,
      onMessage: async (m) => {
        got.push(m);
        // m4 is handled at once, m5 waits: when the link drops, m5 and m6
        // are in the client's hands but not handled.
        if (text(m) === "m5") await g.wait();
      },
    }),
  );
  ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    await waitUntil("m4, m5 in the handler", () => got.length === 2);
    await waitUntil("m4 handled", () => client.lastSeq === seqs[3]);
    await node.kick(device, "SHUTDOWN", "cut");
    await ev.next("reconnected", (e) => e.type === "connected");
    // The node replays m5 and m6 (never acknowledged); the client drops them.
    await waitUntil("the replays dropped", () => client.duplicates >= 2);
    g.open();
    await store(7);
    await waitUntil("m7", () => got.length === 4);
    assert.deepEqual(got.map(text), ["m4", "m5", "m6", "m7"], "each once, in order");
    assert.deepEqual(got.map((m) => m.seq), seqs.slice(3, 7));
    await waitUntil("m7 handled", () => client.lastSeq === seqs[6]);
    await waitUntil("everything acknowledged", async () => (await node.status(...ids)).every((s) => s.state === "ACKED"));
  } finally {
    g.open();
    await client.close();
    await node.stop();
  }
});

test("a frozen node is detected by the heartbeat and the client resumes after it thaws", T, async () => {
  const node = await Node.start();
  const got = [];
  const client = new LonglinkClient(
    options({
      endpoints: [node.clientAddr],
      token: await node.token("u4", "d4"),
      heartbeatMs: 300,
      responseTimeoutMs: 1_000,
      onMessage: (m) => void got.push(m),
    }),
  );
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    const [r1] = await node.push("d4", "before");
    await waitUntil("before", () => got.length === 1);
    await node.freeze();
    // Ping, then a probe, unanswered: the link is dead.
    await ev.next("no pong", (e) => e.type === "disconnected" && e.reason.type === "no_pong");
    node.signal("SIGCONT");
    await ev.next("reconnected", (e) => e.type === "connected");
    const [r2] = await node.push("d4", "after");
    await waitUntil("after", () => got.length === 2);
    assert.deepEqual(got.map(text), ["before", "after"]);
    assert.deepEqual(got.map((m) => m.seq), [r1.seq, r2.seq]);
  } finally {
    node.signal("SIGCONT");
    await client.close();
    await node.stop();
  }
});

test("ResyncRequired is surfaced when the node's store lost its contents (restart, memory store)", T, async () => {
  const { freePort } = await import("./harness.mjs");
  const port = await freePort();
  let node = await Node.start({ clientListen: `127.0.0.1:${port}` });
  const tok = await node.token("u5", "d5");
  const got = [];
  const resyncs = [];
  const client = new LonglinkClient(
    options({
      endpoints: [`127.0.0.1:${port}`],
      token: tok,
      onMessage: (m) => void got.push(m),
      onResyncRequired: (r) => void resyncs.push(r),
    }),
  );
  const ev = collect(client);
  try {
    const first = await ev.next("connected", (e) => e.type === "connected");
    const inc1 = first.authOk.storeIncarnation;
    assert.ok(inc1 !== 0n);
    const [r] = await node.push("d5", "m1");
    await waitUntil("m1 handled", () => client.lastSeq === r.seq);
    assert.equal(client.storeIncarnation, inc1);
    // The node dies with its memory store; a new one starts on the same port.
    await node.stop();
    await ev.next("lost", (e) => e.type === "disconnected");
    node = await Node.start({ clientListen: `127.0.0.1:${port}` });
    const second = await ev.next("reconnected", (e) => e.type === "connected");
    const inc2 = second.authOk.storeIncarnation;
    assert.notEqual(inc2, inc1, "a new store incarnation");
    const rs = await ev.next("resync_required", (e) => e.type === "resync_required");
    assert.equal(rs.fromSeq, r.seq + 1n, "everything after the last handled sequence may be lost");
    assert.ok(rs.toSeq >= rs.fromSeq);
    await waitUntil("the resync handled", () => resyncs.length === 1 && client.lastSeq === rs.toSeq);
    assert.equal(client.storeIncarnation, inc2, "the new incarnation adopted once the resync was handled");
    const [r2] = await node.push("d5", "m2");
    await waitUntil("m2", () => got.length === 2);
    assert.equal(got[1].seq, r2.seq);
    assert.ok(r2.seq > rs.toSeq);
  } finally {
    await client.close();
    await node.stop();
  }
});

test("an upstream request retried across a reconnect keeps its client_msg_id and reaches the backend once", T, async () => {
  const echo = await Echo.start();
  const node = await Node.start({ services: [{ id: "chat", backends: [echo.addr], timeoutMs: 15_000 }] });
  const rec = recording(tcpTransport(), FrameReader);
  const client = new LonglinkClient(
    options({ transport: rec.transport, endpoints: [node.clientAddr], token: await node.token("u6", "d6") }),
  );
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    // Warm the node's upstream connection, then freeze the backend: the
    // first attempt sits in its socket, unanswered.
    const warm = await client.request("chat", "warm", { timeoutMs: 15_000 });
    assert.equal(new TextDecoder().decode(warm.body), "warm");
    await freeze(echo.child);
    const answer = client.request("chat", "pay 5", { timeoutMs: 15_000 });
    const requests = () =>
      rec.sent.filter((f) => f.kind === FrameKind.REQUEST).map((f) => ({ f, r: fromBinary(pb.RequestSchema, f.body) }));
    const pay = () => requests().filter(({ r }) => new TextDecoder().decode(r.body) === "pay 5");
    let settled;
    answer.then(
      (r) => (settled = r),
      (e) => (settled = e),
    );
    await waitUntil("a retry on the same link", () => pay().length >= 2).catch((e) => {
      throw new Error(`${e.message}; sent ${rec.sent.map((f) => FrameKind[f.kind]).join(",")}; answer ${JSON.stringify(settled, big)}`);
    });
    await node.kick("d6", "SHUTDOWN", "cut");
    await ev.next("reconnected", (e) => e.type === "connected");
    const before = pay().length;
    await waitUntil("a retry on the new link", () => pay().length > before);
    echo.child.kill("SIGCONT");
    const res = await answer;
    assert.equal(res.status, 0, `status ${res.status} ${res.reason}`);
    assert.equal(new TextDecoder().decode(res.body), "pay 5");
    const attempts = pay();
    const ids = new Set(attempts.map(({ r }) => r.clientMsgId));
    assert.equal(ids.size, 1, "one client_msg_id for every attempt");
    assert.ok([...ids][0] !== 0n);
    assert.equal(attempts[0].f.flags & FLAG_RETRANSMISSION, 0, "the first attempt is not a retransmission");
    assert.ok(attempts.slice(1).every(({ f }) => (f.flags & FLAG_RETRANSMISSION) !== 0), "retries are flagged");
    const counts = await echo.stopAndCount();
    assert.equal(counts.requests.chat, 2, `warm + pay 5, each once: ${JSON.stringify(counts)}`);
  } finally {
    echo.kill();
    await client.close();
    await node.stop();
  }
});

test("a terminal close (REPLACED) stops the client; a retryable one (SHUTDOWN) reconnects", T, async () => {
  const node = await Node.start();
  const tok = await node.token("u7", "d7");
  const rec = recording(tcpTransport(), FrameReader);
  const client = new LonglinkClient(options({ transport: rec.transport, endpoints: [node.clientAddr], token: tok }));
  const ev = collect(client);
  let other;
  try {
    const c1 = await ev.next("connected", (e) => e.type === "connected");
    await node.kick("d7", "SHUTDOWN", "restart");
    const k = await ev.next("kicked", (e) => e.type === "kicked");
    assert.equal(k.code, ErrorCode.SHUTDOWN);
    const d = await ev.next("disconnected", (e) => e.type === "disconnected");
    assert.equal(d.reason.type, "kicked");
    assert.ok(typeof d.retryInMs === "number" && d.retryInMs >= 20 && d.retryInMs <= 500, `retry in ${d.retryInMs}`);
    const c2 = await ev.next("reconnected", (e) => e.type === "connected");
    assert.notEqual(c2.authOk.connId, c1.authOk.connId);
    assert.equal(rec.connects.length, 2);

    // The same device logs in elsewhere: REPLACED is terminal.
    other = new LonglinkClient(options({ endpoints: [node.clientAddr], token: tok }));
    const otherEv = collect(other);
    await otherEv.next("other connected", (e) => e.type === "connected");
    const last = await ev.next("final disconnect", (e) => e.type === "disconnected" && e.retryInMs === undefined);
    assert.equal(last.reason.code, ErrorCode.REPLACED);
    const stop = await client.stopped();
    assert.equal(stop.type, "kicked");
    assert.equal(stop.code, ErrorCode.REPLACED);
    assert.ok(client.isStopped);
    assert.equal(rec.connects.length, 2, "no reconnect after a terminal code");
    await assert.rejects(client.request("chat", "x"), /stopped/);
    assert.equal(other.connectedTo, node.clientAddr, "the new login stays");
  } finally {
    await client.close();
    await other?.close();
    await node.stop();
  }
});

test("drifts past a dead endpoint with jittered, growing backoff", T, async () => {
  const node = await Node.start();
  const dead = await deadAddr();
  // Only the dead endpoint first: attempts fail with growing, jittered waits.
  const client = new LonglinkClient(
    options({ endpoints: [dead], token: await node.token("u8", "d8"), backoffMinMs: 1, backoffBaseMs: 8, backoffMaxMs: 64 }),
  );
  const ev = collect(client);
  try {
    const delays = [];
    for (let i = 0; i < 12; i++) {
      const d = await ev.next("a failed attempt", (e) => e.type === "disconnected");
      assert.equal(d.reason.type, "connect_failed");
      delays.push(d.retryInMs);
    }
    await client.close();
    delays.forEach((d, k) => {
      const ceiling = Math.min(8 * 2 ** k, 64);
      assert.ok(d >= 1 && d <= ceiling, `attempt ${k}: ${d} not in 1..=${ceiling}`);
    });
    assert.ok(new Set(delays.slice(3)).size > 1, `jitter: ${delays}`);

    // Dead first, live second: the client drifts to the live one.
    const c2 = new LonglinkClient(options({ endpoints: [dead, node.clientAddr], token: await node.token("u8", "d8") }));
    const ev2 = collect(c2);
    const first = await ev2.next("first", () => true);
    assert.equal(first.type, "disconnected");
    assert.equal(first.reason.type, "connect_failed");
    const second = await ev2.next("second", () => true);
    assert.equal(second.type, "connected");
    assert.equal(second.endpoint, node.clientAddr);
    await c2.close();
  } finally {
    await client.close();
    await node.stop();
  }
});

/**
 * A peer that speaks just enough of the protocol: answers Auth with AuthOk,
 * then tells the client to go to `to` (a single node sends GoAway only
 * while draining in cluster mode; the cluster test covers that path).
 */
async function goAwayPeer(to) {
  const auths = [];
  const server = net.createServer((sock) => {
    const r = new FrameReader();
    sock.on("error", () => {});
    sock.on("data", (d) => {
      r.push(d);
      const f = r.next();
      if (!f) return;
      assert.equal(f.kind, FrameKind.AUTH);
      auths.push(fromBinary(pb.AuthSchema, f.body));
      sock.write(encodeFrame(FrameKind.AUTH_OK, pb.AuthOkSchema, { connId: 1n, heartbeatMinMs: 100, heartbeatMaxMs: 10_000, heartbeatMs: 10_000 }));
      sock.write(encodeFrame(FrameKind.GO_AWAY, pb.GoAwaySchema, { endpoint: to, reason: "draining" }));
    });
  });
  await new Promise((res) => server.listen(0, "127.0.0.1", res));
  return { addr: `127.0.0.1:${server.address().port}`, auths, close: () => server.close() };
}

test("GoAway moves to the endpoint it names at once, whatever the backoff", T, async () => {
  const node = await Node.start();
  const peer = await goAwayPeer(node.clientAddr);
  const client = new LonglinkClient(
    // A backoff this long would show: GoAway must not wait for it.
    options({ endpoints: [peer.addr], token: await node.token("u9", "d9"), backoffMinMs: 60_000, backoffBaseMs: 60_000, backoffMaxMs: 60_000 }),
  );
  const ev = collect(client);
  try {
    const first = await ev.next("connected to the peer", (e) => e.type === "connected");
    assert.equal(first.endpoint, peer.addr);
    const d = await ev.next("go away", () => true);
    assert.deepEqual(d, { type: "disconnected", reason: { type: "go_away", endpoint: node.clientAddr, reason: "draining" }, retryInMs: 0 });
    const second = await ev.next("connected to the node", () => true);
    assert.equal(second.type, "connected");
    assert.equal(second.endpoint, node.clientAddr);
    assert.equal(peer.auths[0].platform, "test");
    assert.equal(peer.auths[0].capabilities, pb.Capability.ACK);
  } finally {
    await client.close();
    peer.close();
    await node.stop();
  }
});

test("a peer that stops reading ends the link instead of stalling the client", T, async () => {
  // Authenticates the client, then never reads again.
  const server = net.createServer((sock) => {
    sock.on("error", () => {});
    sock.once("data", () => {
      sock.pause();
      sock.write(encodeFrame(FrameKind.AUTH_OK, pb.AuthOkSchema, { heartbeatMinMs: 100, heartbeatMaxMs: 10_000, heartbeatMs: 10_000 }));
    });
  });
  await new Promise((res) => server.listen(0, "127.0.0.1", res));
  const addr = `127.0.0.1:${server.address().port}`;
  const client = new LonglinkClient(options({ endpoints: [addr], token: "t", responseTimeoutMs: 1_000 }));
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    // Far more than the socket buffers hold.
    const body = new Uint8Array(60_000).fill(7);
    const pending = [];
    for (let i = 0; i < 600; i++) pending.push(client.request("chat", body, { timeoutMs: 60_000 }).catch(() => {}));
    const d = await ev.next("the link given up", (e) => e.type === "disconnected");
    assert.equal(d.reason.type, "lost");
    assert.match(d.reason.detail, /write blocked/);
  } finally {
    await client.close();
    server.close();
  }
});

test("TLS endpoints (tls://host:port) through a TLS terminator to a real node", T, async (t) => {
  const { execFileSync } = await import("node:child_process");
  const { readFileSync, mkdtempSync, rmSync } = await import("node:fs");
  const { join } = await import("node:path");
  const { tmpdir } = await import("node:os");
  const tls = await import("node:tls");
  const dir = mkdtempSync(join(tmpdir(), "longlink-tls-"));
  const node = await Node.start();
  let server;
  let client;
  try {
    execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
      "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem")], { stdio: "pipe" });
    const cert = readFileSync(join(dir, "cert.pem"));
    const [host, port] = node.clientAddr.split(":");
    server = tls.createServer({ key: readFileSync(join(dir, "key.pem")), cert }, (sock) => {
      const up = net.connect(Number(port), host);
      sock.pipe(up).pipe(sock);
      sock.on("error", () => up.destroy());
      up.on("error", () => sock.destroy());
    });
    await new Promise((res) => server.listen(0, "127.0.0.1", res));
    const endpoint = `tls://localhost:${server.address().port}`;
    const got = [];
    client = new LonglinkClient(
      options({ transport: tcpTransport({ tls: { ca: cert } }), endpoints: [endpoint], token: await node.token("u10", "d10"), onMessage: (m) => void got.push(m) }),
    );
    const ev = collect(client);
    const c = await ev.next("connected over TLS", (e) => e.type === "connected");
    assert.equal(c.endpoint, endpoint);
    await node.push("d10", "secret");
    await waitUntil("the message over TLS", () => got.length === 1);
    assert.equal(text(got[0]), "secret");
    // A certificate the client does not trust: the handshake fails, no session.
    const untrusting = new LonglinkClient(options({ endpoints: [endpoint], token: "t" }));
    const ev2 = collect(untrusting);
    const d = await ev2.next("refused", (e) => e.type === "disconnected");
    assert.equal(d.reason.type, "connect_failed");
    assert.match(d.reason.detail, /certificate/i);
    await untrusting.close();
  } finally {
    await client?.close();
    server?.close();
    await node.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a BUSY answer is retried until the service has room, not handed to the app", T, async () => {
  const echo = await Echo.start();
  // One request of the service in flight per shard: one node shard, so the
  // second request is answered BUSY while the first is held.
  const node = await Node.start({ shards: 1, services: [{ id: "chat", backends: [echo.addr], timeoutMs: 15_000, maxInflightPerShard: 1 }] });
  const rec = recording(tcpTransport(), FrameReader);
  const client = new LonglinkClient(options({ transport: rec.transport, endpoints: [node.clientAddr], token: await node.token("u11", "d11") }));
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    await client.request("chat", "warm", { timeoutMs: 15_000 });
    await freeze(echo.child);
    const first = client.request("chat", "first", { timeoutMs: 15_000 });
    const second = client.request("chat", "second", { timeoutMs: 15_000 });
    const sends = (body) =>
      rec.sent.filter((f) => f.kind === FrameKind.REQUEST && new TextDecoder().decode(fromBinary(pb.RequestSchema, f.body).body) === body).length;
    // BUSY answers, each followed by another attempt.
    await waitUntil("the second request tried again after BUSY", () => sends("second") >= 3);
    echo.child.kill("SIGCONT");
    const [a, b] = await Promise.all([first, second]);
    assert.deepEqual([a.status, new TextDecoder().decode(a.body)], [0, "first"]);
    assert.deepEqual([b.status, new TextDecoder().decode(b.body)], [0, "second"], "BUSY never reached the app");
  } finally {
    echo.kill();
    await client.close();
    await node.stop();
  }
});

test("a network change reconnects at once, whatever the backoff", T, async () => {
  const node = await Node.start();
  const client = new LonglinkClient(
    options({ endpoints: [node.clientAddr], token: await node.token("u12", "d12"), backoffMinMs: 60_000, backoffBaseMs: 60_000, backoffMaxMs: 60_000 }),
  );
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    client.setForeground(false);
    client.networkChanged("cellular");
    const d = await ev.next("disconnected", () => true);
    assert.deepEqual(d, { type: "disconnected", reason: { type: "network_changed" }, retryInMs: 0 });
    const c = await ev.next("reconnected", () => true);
    assert.equal(c.type, "connected");
  } finally {
    await client.close();
    await node.stop();
  }
});

test("a handler that throws gets the same message again, and nothing is acknowledged before it succeeds", T, async () => {
  const node = await Node.start();
  let calls = 0;
  let failing = true;
  const handled = [];
  const client = new LonglinkClient(
    options({
      endpoints: [node.clientAddr],
      token: await node.token("u13", "d13"),
      handlerRetryMs: 50,
      onMessage: (m) => {
        calls += 1;
        if (failing) throw new Error(`failure ${calls}`);
        handled.push(text(m));
      },
    }),
  );
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    const [r1] = await node.push("d13", "m1");
    const [r2] = await node.push("d13", "m2");
    const e1 = await ev.next("handler error", (e) => e.type === "handler_error");
    assert.equal(e1.seq, r1.seq);
    assert.match(String(e1.error), /failure 1/);
    await ev.next("another try", (e) => e.type === "handler_error");
    const states = (await node.status(r1.message_id, r2.message_id)).map((s) => s.state);
    assert.deepEqual(states, ["SENT", "SENT"], "nothing acknowledged while the handler fails");
    assert.deepEqual(handled, []);
    failing = false;
    await waitUntil("both handled", () => handled.length === 2);
    assert.deepEqual(handled, ["m1", "m2"], "in order, m2 only after m1 succeeded");
    await waitUntil("ACKED", async () => (await node.status(r1.message_id, r2.message_id)).every((s) => s.state === "ACKED"));
  } finally {
    await client.close();
    await node.stop();
  }
});
