// The demo page: a LonglinkClient over the browser's WebSocket. It shows
// every event live, joins groups, sends upstream requests, and can hold its
// message handler to show that nothing is acknowledged before handling.
//
// The page's state is also on `window.demo` (read by the browser test in
// test-browser/): handled messages, responses and events, in order.

import {
  LonglinkClient,
  webSocketTransport,
  FrameReader,
  FrameKind,
  encodeFrame,
  describeDisconnect,
  codeName,
  pb,
} from "./client/index.js";

const $ = (id) => document.getElementById(id);
const text = new TextDecoder();

/** Bounded, like everything that grows with traffic. */
const KEEP = 500;
function keep(list, item) {
  list.push(item);
  if (list.length > KEEP) list.splice(0, list.length - KEEP);
}

const demo = {
  /** Messages handled, in order: { seq, id, service, text } (seq and id as strings). */
  messages: [],
  /** Upstream responses: { service, status, body, reason }. */
  responses: [],
  /** Client events: { type, ... } with bigints as strings. */
  events: [],
  state: "idle",
  connects: 0,
  client: undefined,
};
window.demo = demo;

function log(kind, line) {
  const el = $("log");
  const row = document.createElement("div");
  row.className = kind;
  row.textContent = `${new Date().toISOString().slice(11, 23)}  ${kind.padEnd(12)} ${line}`;
  el.append(row);
  while (el.childElementCount > KEEP) el.firstElementChild.remove();
  el.scrollTop = el.scrollHeight;
}

function setState(state, detail = "") {
  demo.state = state;
  $("status").textContent = state;
  $("detail").textContent = detail;
  const running = state !== "idle" && state !== "stopped";
  $("connect").disabled = running;
  $("disconnect").disabled = !running;
}

// ---- Groups -------------------------------------------------------------
// Group membership belongs to a connection (the node drops it when the
// connection closes), and the client has no join call of its own, so this
// transport wrapper sends a JOIN frame for every group on each new link,
// right after the node's AuthOk (before that the node would refuse it).

const groups = new Set();
let current; // { link, active } of the newest link

function joinFrame(kind, group) {
  return encodeFrame(kind, pb.GroupMembershipSchema, { group });
}

function withGroups(inner) {
  return {
    connect(endpoint, h, ctx) {
      const me = { link: undefined, active: false, reader: new FrameReader() };
      current = me;
      me.link = inner.connect(
        endpoint,
        {
          onOpen: () => h.onOpen(),
          onData: (chunk) => {
            let authed = false;
            if (me.reader) {
              try {
                me.reader.push(chunk);
                for (let f; !authed && (f = me.reader.next()); ) authed = f.kind === FrameKind.AUTH_OK;
              } catch {
                me.reader = undefined; // the client sees the same bytes and closes the link
              }
            }
            h.onData(chunk);
            if (authed && current === me) {
              me.reader = undefined; // only the first frames are looked at
              me.active = true;
              for (const g of groups) me.link.send(joinFrame(FrameKind.JOIN, g));
              if (groups.size > 0) log("join", `sent JOIN for ${[...groups].join(", ")}`);
            }
          },
          onClose: (info) => {
            me.active = false;
            me.reader = undefined;
            h.onClose(info);
          },
        },
        ctx,
      );
      return me.link;
    },
  };
}

function showGroups() {
  $("groups").textContent = groups.size ? `member of: ${[...groups].join(", ")}` : "";
}

$("join").onclick = () => {
  const g = $("group").value.trim();
  if (!g) return;
  groups.add(g);
  showGroups();
  if (current?.active) {
    current.link.send(joinFrame(FrameKind.JOIN, g));
    log("join", `sent JOIN ${g}`);
  } else log("join", `${g}: will join once connected`);
};

$("leave").onclick = () => {
  const g = $("group").value.trim();
  if (!groups.delete(g)) return;
  showGroups();
  if (current?.active) {
    current.link.send(joinFrame(FrameKind.LEAVE, g));
    log("leave", `sent LEAVE ${g}`);
  }
};

// ---- Holding the handler ------------------------------------------------

let held; // { promise, release } while "hold" is checked
$("hold").onchange = () => {
  if ($("hold").checked) {
    let release;
    const promise = new Promise((r) => (release = r));
    held = { promise, release };
    log("hold", "handling held: messages wait unacknowledged");
  } else {
    held?.release();
    held = undefined;
    log("hold", "handling released");
  }
};

async function onMessage(m) {
  const body = text.decode(m.payload);
  const seq = m.seq.toString();
  if (held) log("received", `seq=${seq} ${JSON.stringify(body)} (held)`);
  // Handling: wait while held. The client acknowledges only after this resolves.
  while (held) await held.promise;
  keep(demo.messages, { seq, id: m.messageId.toString(), service: m.serviceId, text: body });
  $("handled").textContent = String(demo.messages.length);
  $("last-seq").textContent = seq === "0" ? $("last-seq").textContent : seq;
  log("message", `seq=${seq}${m.serviceId ? ` service=${m.serviceId}` : ""} ${JSON.stringify(body)}${seq === "0" ? " (at-most-once)" : ""}`);
}

// ---- Connecting ---------------------------------------------------------
// The resume point survives Connect / Disconnect (not a reload): a new
// client starts after the last message this page handled, so the node
// replays only what the page has not handled. Another token starts afresh
// (sequences belong to a device).

const resume = { token: "", lastSeq: 0n, storeIncarnation: 0n };
function saveResume(client, token) {
  Object.assign(resume, { token, lastSeq: client.lastSeq, storeIncarnation: client.storeIncarnation });
}

function plain(ev) {
  return JSON.parse(JSON.stringify(ev, (_k, v) => (typeof v === "bigint" ? v.toString() : v)));
}

$("connect").onclick = () => {
  const endpoint = $("endpoint").value.trim();
  const token = $("token").value.trim();
  if (!endpoint || !token) {
    log("error", "an endpoint and a token are needed");
    return;
  }
  const mode = $("token-mode").value;
  if (resume.token !== token) Object.assign(resume, { token, lastSeq: 0n, storeIncarnation: 0n });
  const client = new LonglinkClient({
    // "protocol" sends a longlink.token.<token> Sec-WebSocket-Protocol entry.
    transport: withGroups(webSocketTransport({ token: mode })),
    endpoints: [endpoint],
    token,
    lastSeq: resume.lastSeq,
    storeIncarnation: resume.storeIncarnation,
    platform: "web",
    backoffMinMs: 200,
    backoffBaseMs: 500,
    backoffMaxMs: 10_000,
    onMessage,
    onResyncRequired: ({ fromSeq, toSeq }) => {
      log("resync", `the node cannot replay seq ${fromSeq}..=${toSeq}: fetch them from the business backend`);
    },
  });
  demo.client = client;
  setState("connecting", endpoint);
  log("connecting", `${endpoint}${resume.lastSeq ? `, resuming after seq ${resume.lastSeq}` : ""}`);
  client.on("connected", (e) => {
    if (demo.client !== client) return;
    demo.connects += 1;
    keep(demo.events, plain({ type: e.type, endpoint: e.endpoint, node: e.authOk.node, connId: e.authOk.connId }));
    setState("connected", `to ${e.authOk.node} (connection ${e.authOk.connId}, shard ${e.authOk.shard})`);
    log("connected", `${e.endpoint} node=${e.authOk.node} conn_id=${e.authOk.connId} heartbeat=${e.authOk.heartbeatMs} ms, resuming after seq ${client.lastSeq}`);
  });
  client.on("disconnected", (e) => {
    if (demo.client !== client) return;
    keep(demo.events, plain({ type: e.type, reason: e.reason, retryInMs: e.retryInMs }));
    const why = describeDisconnect(e.reason);
    if (e.retryInMs === undefined) {
      saveResume(client, token);
      setState("stopped", why);
      log("disconnected", `${why}: stopped`);
    } else {
      setState("reconnecting", why);
      log("disconnected", `${why}: reconnecting in ${e.retryInMs} ms`);
    }
  });
  client.on("kicked", (e) => {
    keep(demo.events, plain(e));
    log("kicked", `${codeName(e.code)} ${e.reason}`);
  });
  client.on("resync_required", (e) => keep(demo.events, plain(e)));
  client.on("handler_error", (e) => {
    keep(demo.events, plain({ type: e.type, seq: e.seq, error: String(e.error) }));
    log("error", `handler: ${e.error}`);
  });
};

$("disconnect").onclick = async () => {
  const client = demo.client;
  if (!client) return;
  await client.close();
  saveResume(client, resume.token);
  setState("stopped", "closed by the page");
  log("disconnected", "closed by the page");
};

// ---- Upstream requests --------------------------------------------------

$("send").onclick = async () => {
  const client = demo.client;
  if (!client || client.isStopped) {
    log("error", "connect first");
    return;
  }
  const service = $("service").value.trim();
  const body = $("body").value;
  log("request", `${service} ${JSON.stringify(body)}`);
  try {
    const r = await client.request(service, body, { timeoutMs: 15_000 });
    const status = r.status === 0 ? "OK" : codeName(r.status);
    const answer = { service, status, body: text.decode(r.body), reason: r.reason };
    keep(demo.responses, answer);
    log("response", `${service} ${status} ${JSON.stringify(answer.body)}${r.reason ? ` (${r.reason})` : ""}`);
  } catch (e) {
    keep(demo.responses, { service, status: "FAILED", body: "", reason: String(e.message ?? e) });
    log("error", `request: ${e.message ?? e}`);
  }
};

// ---- Start --------------------------------------------------------------
// Fields may be prefilled from the fragment (not sent to any server):
// #endpoint=ws://host:7104/v1/ws&token=...&group=room-1&connect=1

const params = new URLSearchParams(location.hash.slice(1));
$("endpoint").value = params.get("endpoint") ?? `ws://${location.hostname || "127.0.0.1"}:7104/v1/ws`;
if (params.has("token")) $("token").value = params.get("token");
if (params.has("group")) $("group").value = params.get("group");
if (params.has("mode")) $("token-mode").value = params.get("mode");
setState(demo.state);
log("ready", "fill in a token and connect");
if (params.get("connect") === "1") $("connect").click();
