// The WebSocket transport (global WebSocket, as in browsers) against a real
// node: its own WebSocket listener (last test), and a small RFC 6455 bridge
// in this file in front of its TCP port. The bridge splits every chunk from the node
// across two WebSocket messages, so the client must reassemble frames
// across messages; it can also close with code 4000 + a longlink code.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { createHash } from "node:crypto";
import * as net from "node:net";
import { LonglinkClient, webSocketTransport, ErrorCode, WS_SUBPROTOCOL } from "../dist/node.js";
import { Node, collect, waitUntil } from "./harness.mjs";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

function wsFrame(opcode, payload) {
  const len = payload.length;
  const head = len < 126 ? Buffer.from([0x80 | opcode, len]) : len < 65536 ? Buffer.alloc(4) : Buffer.alloc(10);
  if (len >= 126 && len < 65536) {
    head[0] = 0x80 | opcode;
    head[1] = 126;
    head.writeUInt16BE(len, 2);
  } else if (len >= 65536) {
    head[0] = 0x80 | opcode;
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(len), 2);
  }
  return Buffer.concat([head, payload]);
}

function closeFrame(code, reason) {
  const p = Buffer.alloc(2 + Buffer.byteLength(reason));
  p.writeUInt16BE(code, 0);
  p.write(reason, 2);
  return wsFrame(0x8, p);
}

/** A WebSocket-to-TCP bridge to `target`. `mode.closeWith` closes the first session with WS code 4000 and that reason. */
async function bridge(target, mode = {}) {
  const seen = { urls: [], protocols: [], sessions: 0 };
  const server = createServer((_req, res) => res.writeHead(404).end());
  server.on("upgrade", (req, socket) => {
    seen.urls.push(req.url);
    const offered = String(req.headers["sec-websocket-protocol"] ?? "").split(",").map((s) => s.trim());
    seen.protocols.push(offered);
    if (!req.url.startsWith("/v1/ws") || !offered.includes(WS_SUBPROTOCOL)) {
      socket.end("HTTP/1.1 400 Bad Request\r\n\r\n");
      return;
    }
    const accept = createHash("sha1").update(req.headers["sec-websocket-key"] + GUID).digest("base64");
    socket.write(
      `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\nSec-WebSocket-Protocol: ${WS_SUBPROTOCOL}\r\n\r\n`,
    );
    const session = ++seen.sessions;
    if (mode.closeWith && session === 1) {
      socket.end(closeFrame(4000, mode.closeWith));
      return;
    }
    const tcp = net.connect(...(([h, p]) => [Number(p), h])(target.split(":")));
    // Node to client: each chunk split over two messages.
    tcp.on("data", (d) => {
      const cut = Math.max(1, Math.floor(d.length / 2));
      socket.write(wsFrame(0x2, d.subarray(0, cut)));
      if (cut < d.length) socket.write(wsFrame(0x2, d.subarray(cut)));
    });
    tcp.on("close", () => socket.end(closeFrame(1000, "")));
    tcp.on("error", () => {});
    socket.on("error", () => {});
    socket.on("close", () => tcp.destroy());
    // Client to node: unmask whole frames.
    let buf = Buffer.alloc(0);
    socket.on("data", (d) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (buf.length < 2) return;
        const opcode = buf[0] & 0x0f;
        let len = buf[1] & 0x7f;
        let off = 2;
        if (len === 126) {
          if (buf.length < 4) return;
          len = buf.readUInt16BE(2);
          off = 4;
        } else if (len === 127) {
          if (buf.length < 10) return;
          len = Number(buf.readBigUInt64BE(2));
          off = 10;
        }
        if (buf.length < off + 4 + len) return;
        const mask = buf.subarray(off, off + 4);
        const payload = Buffer.from(buf.subarray(off + 4, off + 4 + len));
        for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4];
        buf = buf.subarray(off + 4 + len);
        if (opcode === 0x2) tcp.write(payload);
        else if (opcode === 0x8) {
          socket.end(closeFrame(1000, ""));
          tcp.destroy();
        }
      }
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const addr = `127.0.0.1:${server.address().port}`;
  return { addr, seen, stop: () => server.close() && server.closeAllConnections?.() };
}

test("the WebSocket transport talks to a real node: token in the URL, frames split across messages, ACK", { timeout: 60_000 }, async () => {
  assert.equal(typeof globalThis.WebSocket, "function", "run with a global WebSocket (node test/run.mjs adds the flag on Node 20)");
  const node = await Node.start();
  const br = await bridge(node.clientAddr);
  const token = await node.token("uw", "dw");
  const got = [];
  const client = new LonglinkClient({
    transport: webSocketTransport({ token: "query" }),
    endpoints: [br.addr],
    token,
    onMessage: (m) => void got.push(m),
  });
  const ev = collect(client);
  try {
    const c = await ev.next("connected", (e) => e.type === "connected");
    assert.equal(c.endpoint, br.addr);
    assert.equal(new URL(br.seen.urls[0], "ws://x").searchParams.get("token"), token);
    assert.ok(br.seen.protocols[0].includes(WS_SUBPROTOCOL));
    const [r] = await node.push("dw", "over websocket");
    await waitUntil("the message", () => got.length === 1);
    assert.equal(new TextDecoder().decode(got[0].payload), "over websocket");
    assert.equal(got[0].seq, r.seq);
    await waitUntil("ACKED", async () => (await node.status(r.message_id))[0].state === "ACKED");
  } finally {
    await client.close();
    br.stop();
    await node.stop();
  }
});

test("a WebSocket close carrying a terminal longlink code stops the client; one carrying SHUTDOWN reconnects", { timeout: 60_000 }, async () => {
  const node = await Node.start();
  const token = await node.token("uw2", "dw2");
  // 4000 + SHUTDOWN: retryable, the second session goes through.
  const br1 = await bridge(node.clientAddr, { closeWith: `${ErrorCode.SHUTDOWN} node restarting` });
  const c1 = new LonglinkClient({ transport: webSocketTransport({ token: "protocol" }), endpoints: [br1.addr], token, backoffMinMs: 10, backoffBaseMs: 20 });
  const ev1 = collect(c1);
  // 4000 + REPLACED: terminal.
  const br2 = await bridge(node.clientAddr, { closeWith: "REPLACED: replaced by a new login" });
  let c2;
  try {
    const d = await ev1.next("disconnected", (e) => e.type === "disconnected");
    assert.deepEqual([d.reason.type, d.reason.code, d.reason.reconnect], ["error", ErrorCode.SHUTDOWN, true]);
    assert.ok(d.retryInMs !== undefined);
    await ev1.next("connected", (e) => e.type === "connected");
    assert.ok(br1.seen.protocols[0].includes(`longlink.token.${token}`), "the token as a subprotocol entry");
    await c1.close();

    c2 = new LonglinkClient({ transport: webSocketTransport(), endpoints: [br2.addr], token });
    const stop = await c2.stopped();
    assert.deepEqual([stop.type, stop.code, stop.reconnect], ["error", ErrorCode.REPLACED, false]);
    assert.equal(stop.reason, "REPLACED: replaced by a new login");
    assert.equal(br2.seen.sessions, 1, "no reconnect");
  } finally {
    await c1.close();
    await c2?.close();
    br1.stop();
    br2.stop();
    await node.stop();
  }
});

/** A free loopback port (for the node's ws_listen, which it does not print). */
async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, "127.0.0.1", r));
  const port = s.address().port;
  await new Promise((r) => s.close(r));
  return port;
}

test("the node's own WebSocket listener: token as a longlink.token. subprotocol entry, a push, then REPLACED from the close", { timeout: 60_000 }, async () => {
  const port = await freePort();
  const node = await Node.start({ wsListen: `127.0.0.1:${port}` });
  const token = await node.token("uw3", "dw3");
  const got = [];
  const client = new LonglinkClient({
    transport: webSocketTransport({ token: "protocol" }),
    endpoints: [`127.0.0.1:${port}`],
    token,
    onMessage: (m) => void got.push(m),
  });
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    const [r] = await node.push("dw3", "straight to the node");
    await waitUntil("the message", () => got.length === 1);
    assert.equal(new TextDecoder().decode(got[0].payload), "straight to the node");
    await waitUntil("ACKED", async () => (await node.status(r.message_id))[0].state === "ACKED");
    await node.kick("dw3", "REPLACED");
    // The Kicked frame comes before the WebSocket close (4503 "2003 REPLACED"): terminal.
    const stop = await client.stopped();
    assert.deepEqual([stop.type, stop.code], ["kicked", ErrorCode.REPLACED]);
  } finally {
    await client.close();
    await node.stop();
  }
});
