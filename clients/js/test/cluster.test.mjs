// Dispatcher lookup and GoAway with real parts: redis-server, two
// `longlink serve --redis` nodes and `longlink dispatcher`. Draining a node
// (POST /drain on its admin port) sends its clients GoAway naming another
// node; the client moves there at once. The dispatcher here has no auth hook
// and no ticket keys, so it vouches for nobody: it answers endpoints only,
// and the client keeps the token its application gave it.

import { test } from "node:test";
import assert from "node:assert/strict";
import { LonglinkClient, tcpTransport } from "../dist/node.js";
import { Node, Redis, startDispatcher, collect, waitUntil } from "./harness.mjs";

test("looks up the dispatcher (custom params and headers), connects, and follows GoAway when the node drains", { timeout: 120_000 }, async () => {
  const redis = await Redis.start();
  const nodes = [];
  let dispatcher;
  let client;
  try {
    nodes.push(await Node.start({ name: "a", redisUrl: redis.url, nodeIndex: 0 }));
    nodes.push(await Node.start({ name: "b", redisUrl: redis.url, nodeIndex: 1 }));
    dispatcher = await startDispatcher(redis.url, nodes[0].config);
    const base = `http://${dispatcher.addr}`;
    // Both nodes registered (readiness by polling the real dispatcher).
    await waitUntil("both nodes in the dispatcher's answer", async () => {
      const res = await fetch(`${base}/v1/dispatch?uid=probe&device=probe`).catch(() => undefined);
      if (!res || res.status !== 200) return false;
      return (await res.json()).endpoints.length === 2;
    });

    const asked = [];
    const recordingFetch = (url, init) => {
      asked.push({ url: new URL(url), headers: new Headers(init?.headers) });
      return fetch(url, init);
    };
    const token = await nodes[0].token("u-disp", "d-disp");
    client = new LonglinkClient({
      transport: tcpTransport(),
      // No endpoint of its own: it comes from the dispatcher, which mints no
      // token for an unproven user, so the application's token is used.
      token,
      dispatcher: {
        url: base,
        uid: "u-disp",
        device: "d-disp",
        platform: "test",
        app: "test",
        params: { app_proof: "signed-by-the-app" },
        headers: { authorization: "Bearer app-credential" },
        fetch: recordingFetch,
      },
      net: "wifi",
      backoffMinMs: 20,
      backoffBaseMs: 50,
      backoffMaxMs: 500,
      // A backoff this long would show: GoAway must not wait for it.
      connectTimeoutMs: 5_000,
    });
    const ev = collect(client);
    const first = await ev.next("connected", (e) => e.type === "connected");
    const addrs = nodes.map((n) => n.clientAddr);
    assert.ok(addrs.includes(first.endpoint), `${first.endpoint} is one of ${addrs}`);
    assert.equal(asked.length, 1);
    const q = asked[0].url.searchParams;
    assert.deepEqual(
      [q.get("uid"), q.get("device"), q.get("platform"), q.get("app"), q.get("net"), q.get("app_proof")],
      ["u-disp", "d-disp", "test", "test", "wifi", "signed-by-the-app"],
    );
    assert.equal(asked[0].headers.get("authorization"), "Bearer app-credential");

    const from = nodes.find((n) => n.clientAddr === first.endpoint);
    const to = nodes.find((n) => n !== from);
    assert.equal(await from.adminPost("/drain"), 202);
    const d = await ev.next("go away", (e) => e.type === "disconnected");
    assert.equal(d.reason.type, "go_away", JSON.stringify(d.reason));
    assert.equal(d.reason.endpoint, to.clientAddr, "GoAway names the other node");
    assert.equal(d.retryInMs, 0, "at once, not after the backoff");
    const second = await ev.next("reconnected", (e) => e.type === "connected");
    assert.equal(second.endpoint, to.clientAddr);
    assert.equal(asked.length, 1, "GoAway with an endpoint needs no lookup");
  } finally {
    await client?.close();
    dispatcher?.stop();
    for (const n of nodes) await n.stop();
    await redis.stop();
  }
});
