// Token refresh in-band against a real node: a short-lived token is
// replaced through onTokenRefresh before it expires (a Refresh frame), so
// the session outlives it; a refresh the application cannot get ends the
// session with TOKEN_EXPIRED. The node runs with no clock leeway, so the
// token's own expiry is the deadline.

import { test } from "node:test";
import assert from "node:assert/strict";
import { LonglinkClient, tcpTransport, ErrorCode } from "../dist/node.js";
import { Node, collect, waitUntil, big } from "./harness.mjs";

const T = { timeout: 90_000 };
const text = (m) => new TextDecoder().decode(m.payload);

function options(extra) {
  return {
    transport: tcpTransport(),
    platform: "test",
    backoffMinMs: 20,
    backoffBaseMs: 50,
    backoffMaxMs: 500,
    connectTimeoutMs: 5_000,
    ...extra,
  };
}

test("onTokenRefresh: the session outlives its first token through an in-band Refresh", T, async () => {
  const node = await Node.start({ clockLeewaySecs: 0 });
  // Minted ahead so the callback answers at once, however loaded the box.
  const [first, next] = [await node.token("tr1", "trd1", "4s"), await node.token("tr1", "trd1", "1h")];
  const asked = [];
  const got = [];
  const client = new LonglinkClient(
    options({
      endpoints: [node.clientAddr],
      token: first,
      onMessage: (m) => void got.push(m),
      onTokenRefresh: async (expiresMs) => {
        asked.push(expiresMs);
        return next;
      },
    }),
  );
  const ev = collect(client);
  try {
    const c = await ev.next("connected", (e) => e.type === "connected");
    const firstExpiry = c.authOk.tokenExpiresMs;
    assert.ok(firstExpiry > 0n, "AuthOk names the token's expiry");
    const refreshed = await ev.next("token_refreshed", (e) => e.type === "token_refreshed" || e.type === "disconnected");
    assert.equal(refreshed.type, "token_refreshed", JSON.stringify(refreshed, big));
    assert.ok(refreshed.tokenExpiresMs > firstExpiry + 3_000_000n, "the new token's expiry, an hour on");
    assert.deepEqual(asked, [firstExpiry]);
    // Past the first token's expiry (by the node's clock, as AuthOk told it).
    await waitUntil("the first token's expiry to pass", () => BigInt(Date.now()) > firstExpiry + 1_500n, 30_000);
    const [r] = await node.push("trd1", "after expiry", { qos: "at-most-once" });
    assert.equal(r.status, "DELIVERED");
    await waitUntil("the message", () => got.length === 1);
    assert.equal(text(got[0]), "after expiry");
    assert.equal(client.connectedTo, node.clientAddr);
    assert.equal(ev.events.filter((e) => e.type === "disconnected").length, 0, "never disconnected");
  } finally {
    await client.close();
    await node.stop();
  }
});

test("a refresh the application cannot get surfaces TOKEN_EXPIRED", T, async () => {
  const node = await Node.start({ clockLeewaySecs: 0 });
  const first = await node.token("tr2", "trd2", "3s");
  const client = new LonglinkClient(
    options({
      endpoints: [node.clientAddr],
      token: first,
      onTokenRefresh: () => {
        throw new Error("the login service said no");
      },
    }),
  );
  const ev = collect(client);
  try {
    await ev.next("connected", (e) => e.type === "connected");
    const failed = await ev.next("token_refresh_failed", (e) => e.type === "token_refresh_failed");
    assert.match(String(failed.error), /said no/);
    const gone = await ev.next("disconnected", (e) => e.type === "disconnected");
    assert.equal(gone.reason.type, "error", JSON.stringify(gone.reason, big));
    assert.equal(gone.reason.code, ErrorCode.TOKEN_EXPIRED);
  } finally {
    await client.close();
    await node.stop();
  }
});
