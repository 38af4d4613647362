// The long-lived client state machine, a port of src/sdk/agent.rs: what a
// client does across connections, with no I/O and no clock. Inputs are
// `handle*(now, ...)` calls; outputs are actions (pollAction) and the next
// deadline (pollTimeout). The driver (client.ts) carries them out over a
// Transport.
//
//  waiting --at--> [looking_up --dispatch-->] connecting --connected--> up --AuthOk--> up(active)
//     ^                                            |                    |
//     +---- backoff (or at once: GoAway, network change) <-- failure ---+
//  any failure with a terminal code, or close() --> stopped
//
// Every connection attempt gets a fresh link id; inputs for an older link
// are ignored, so late transport callbacks are harmless.

import { FrameKind, RequestSchema, ErrorCode } from "./gen/longlink_pb.js";
import type { AuthOk, Message, Response } from "./gen/longlink_pb.js";
import { DEFAULT_MAX_BODY, FLAG_RETRANSMISSION, FrameError, FrameReader, encodeFrame } from "./frame.js";
import { ClientSession } from "./session.js";
import type { SessionError, SessionEvent, SessionOptions } from "./session.js";
import { Backoff, Endpoints, Rng, SmartHeartbeat } from "./policy.js";
import { reconnectAllowed } from "./codes.js";

/** Longest service id (src/shard.rs MAX_ID_BYTES). */
export const MAX_ID_BYTES = 255;

export interface AgentConfig {
  session: Omit<SessionOptions, "lastSeq" | "storeIncarnation"> & { lastSeq: bigint; storeIncarnation: bigint };
  endpoints: string[];
  dispatcher: boolean;
  net: string;
  connectTimeoutMs: number;
  backoffMinMs: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
  heartbeatMinMs: number;
  heartbeatMaxMs: number;
  requestRetryMs: number;
  maxPendingRequests: number;
  ackDelayMs: number;
  maxFrameBytes: number;
  seed: bigint;
}

/** What the dispatcher answered. */
export interface Dispatch {
  endpoints: string[];
  token: string;
  heartbeatMinMs: number;
  heartbeatMaxMs: number;
  /** The server's reconnect backoff bounds (0: not given). */
  reconnectMinMs: number;
  reconnectMaxMs: number;
}

/** Why a connection ended or could not start. */
export type Disconnect =
  | { type: "dispatcher"; detail: string }
  | { type: "connect_failed"; detail: string }
  | { type: "connect_timeout"; ms: number }
  | { type: "auth_timeout"; ms: number }
  | { type: "no_pong" }
  | { type: "error"; code: ErrorCode; reason: string; reconnect: boolean }
  | { type: "kicked"; code: ErrorCode; reason: string }
  | { type: "go_away"; endpoint: string; reason: string }
  | { type: "lost"; detail: string }
  | { type: "protocol"; detail: string }
  | { type: "network_changed" }
  | { type: "closed_by_app" };

/** Whether the client reconnects after `d` (terminal vs retryable). */
export function reconnectAllowedAfter(d: Disconnect): boolean {
  switch (d.type) {
    case "error":
      return d.reconnect;
    case "kicked":
      return reconnectAllowed(d.code);
    case "protocol":
    case "closed_by_app":
      return false;
    default:
      return true;
  }
}

/** The server's code, when it gave one. */
export function disconnectCode(d: Disconnect): ErrorCode | undefined {
  return d.type === "error" || d.type === "kicked" ? d.code : undefined;
}

export function describeDisconnect(d: Disconnect): string {
  switch (d.type) {
    case "dispatcher":
      return `dispatcher: ${d.detail}`;
    case "connect_failed":
      return `connect failed: ${d.detail}`;
    case "connect_timeout":
      return `connect did not complete within ${d.ms} ms`;
    case "auth_timeout":
      return `no AuthOk within ${d.ms} ms`;
    case "no_pong":
      return "no Pong to a heartbeat and its probe";
    case "error":
      return `the server closed the session: ${ErrorCode[d.code] ?? d.code} (${d.reason})`;
    case "kicked":
      return `kicked: ${ErrorCode[d.code] ?? d.code} (${d.reason})`;
    case "go_away":
      return `go away to ${JSON.stringify(d.endpoint)}: ${d.reason}`;
    case "lost":
      return `connection lost: ${d.detail}`;
    case "protocol":
      return `protocol error: ${d.detail}`;
    case "network_changed":
      return "the network changed";
    case "closed_by_app":
      return "closed by the application";
  }
}

/** Why an upstream request got no Response. */
export type RequestFailure = { type: "timed_out"; attempts: number } | { type: "stopped"; reason: Disconnect };

export type AgentEvent =
  | { type: "connected"; endpoint: string; authOk: AuthOk }
  | { type: "message"; message: Message }
  | { type: "resync_required"; fromSeq: bigint; toSeq: bigint }
  | { type: "response"; id: bigint; response?: Response; failure?: RequestFailure }
  | { type: "kicked"; code: ErrorCode; reason: string }
  | { type: "disconnected"; reason: Disconnect; retryInMs: number | undefined }
  | { type: "group_result"; group: string; join: boolean; code: ErrorCode; reason: string }
  /** The token expires at `tokenExpiresMs` (unix ms): refreshToken(), or the node ends the session (TOKEN_EXPIRED). */
  | { type: "token_expiring"; tokenExpiresMs: bigint }
  /** The node took the new token. */
  | { type: "token_refreshed"; tokenExpiresMs: bigint };

export type Action =
  | { type: "lookup"; net: string }
  | { type: "connect"; link: number; endpoint: string }
  | { type: "send"; link: number; bytes: Uint8Array }
  | { type: "close"; link: number }
  | { type: "event"; event: AgentEvent };

/** Why the agent refused an application call. */
export class SdkError extends Error {
  constructor(
    readonly kind: "no_endpoints" | "too_many_requests" | "bad_service" | "too_large" | "stopped",
    message: string,
  ) {
    super(message);
    this.name = "SdkError";
  }
}

interface Pending {
  service: string;
  body: Uint8Array;
  deadline: number;
  nextTry: number | undefined;
  attempts: number;
  sentOn: number | undefined;
}

interface Up {
  link: number;
  endpoint: string;
  session: ClientSession;
  reader: FrameReader;
  active: boolean;
  /** When to ask for a new token ("token_expiring"), on our clock. */
  refreshAt: number | undefined;
  /** The node's clock minus ours (AuthOk.server_time_ms). */
  serverOffsetMs: number;
}

type State =
  | { type: "waiting"; at: number }
  | { type: "looking_up"; deadline: number }
  | { type: "connecting"; link: number; endpoint: string; deadline: number }
  | { type: "up"; up: Up }
  | { type: "stopped"; reason: Disconnect };

const maxBig = (a: bigint, b: bigint): bigint => (a > b ? a : b);

export class Agent {
  private readonly cfg: AgentConfig;
  private readonly endpoints: Endpoints;
  readonly backoff: Backoff;
  private readonly rng: Rng;
  heartbeat: SmartHeartbeat;
  private state: State;
  private needLookup: boolean;
  private nextLink = 0;
  /** Highest at-least-once sequence handed to the application. */
  private deliveredSeq: bigint;
  /** Highest sequence the application handled: the resume point. */
  private handledSeq: bigint;
  private incarnation: bigint;
  private ackDue: number | undefined;
  private readonly pending = new Map<bigint, Pending>();
  private nextMsgId: bigint;
  private duplicatesEnded = 0;
  private rushed = false;
  /** The session's token expiry (unix ms, 0: never), from AuthOk or RefreshOk. */
  private tokenExpiresMs = 0n;
  private readonly out: Action[] = [];

  constructor(cfg: AgentConfig, now: number) {
    if (cfg.endpoints.length === 0 && !cfg.dispatcher) {
      throw new SdkError("no_endpoints", "no endpoint and no dispatcher configured");
    }
    this.cfg = { ...cfg, session: { ...cfg.session } };
    this.rng = new Rng(cfg.seed);
    // Random start, so ids stay unique per device across restarts; never 0.
    this.nextMsgId = (this.rng.nextU64() >> 1n) | 1n;
    this.endpoints = new Endpoints(cfg.endpoints);
    this.backoff = new Backoff(cfg.backoffMinMs, cfg.backoffBaseMs, cfg.backoffMaxMs);
    this.heartbeat = new SmartHeartbeat(cfg.heartbeatMinMs, cfg.heartbeatMaxMs);
    this.state = { type: "waiting", at: now };
    this.needLookup = cfg.dispatcher;
    this.deliveredSeq = cfg.session.lastSeq;
    this.handledSeq = cfg.session.lastSeq;
    this.incarnation = cfg.session.storeIncarnation;
    this.attempt(now);
  }

  pollAction(): Action | undefined {
    return this.out.shift();
  }

  /** When handleTimeout must run next (undefined: stopped). */
  pollTimeout(): number | undefined {
    let t: number | undefined;
    const s = this.state;
    switch (s.type) {
      case "waiting":
        t = s.at;
        break;
      case "looking_up":
      case "connecting":
        t = s.deadline;
        break;
      case "up":
        t = Math.min(s.up.session.pollTimeout(), s.up.refreshAt ?? Number.POSITIVE_INFINITY);
        break;
      case "stopped":
        return undefined;
    }
    for (const p of this.pending.values()) {
      t = Math.min(t, p.nextTry === undefined ? p.deadline : Math.min(p.nextTry, p.deadline));
    }
    if (this.ackDue !== undefined) t = Math.min(t, this.ackDue);
    return t;
  }

  /** The resume point: persist it and pass it as `lastSeq` after a restart. */
  get lastSeq(): bigint {
    return this.handledSeq;
  }

  /** Persist with lastSeq and pass as `storeIncarnation` after a restart. */
  get storeIncarnation(): bigint {
    return this.incarnation;
  }

  /** Duplicate at-least-once messages dropped so far. */
  get duplicates(): number {
    return this.duplicatesEnded + (this.state.type === "up" ? this.state.up.session.duplicates : 0);
  }

  /** The endpoint of the active session, if any. */
  get connectedTo(): string | undefined {
    return this.state.type === "up" && this.state.up.active ? this.state.up.endpoint : undefined;
  }

  get currentEndpoint(): string | undefined {
    return this.endpoints.current();
  }

  get pendingRequests(): number {
    return this.pending.size;
  }

  get isStopped(): boolean {
    return this.state.type === "stopped";
  }

  /** Why the agent stopped (undefined while it runs). */
  get stopReason(): Disconnect | undefined {
    return this.state.type === "stopped" ? this.state.reason : undefined;
  }

  /** The token the next Auth carries (the dispatcher may have replaced it). */
  get token(): string {
    return this.cfg.session.token;
  }

  private up(): Up | undefined {
    return this.state.type === "up" ? this.state.up : undefined;
  }

  // ---- inputs from the driver ---------------------------------------------

  handleDispatch(now: number, result: { ok: Dispatch } | { err: string }): void {
    if (this.state.type !== "looking_up") return;
    if ("ok" in result && result.ok.endpoints.length > 0) {
      const d = result.ok;
      this.endpoints.replace(d.endpoints);
      if (d.token !== "") this.cfg.session.token = d.token;
      if (d.heartbeatMaxMs > 0) this.adoptHeartbeatBounds(d.heartbeatMinMs, d.heartbeatMaxMs);
      if (d.reconnectMaxMs > 0) this.backoff.setBounds(d.reconnectMinMs, d.reconnectMaxMs);
      this.needLookup = false;
      this.connect(now);
      return;
    }
    const why = "ok" in result ? "the dispatcher returned no endpoint" : result.err;
    // Fall back to the endpoints already known; ask again once those fail.
    this.needLookup = this.endpoints.length === 0;
    this.retryLater(now, { type: "dispatcher", detail: why });
  }

  handleConnected(now: number, link: number): void {
    const s = this.state;
    if (s.type !== "connecting" || s.link !== link) return;
    const opts: SessionOptions = {
      ...this.cfg.session,
      lastSeq: this.handledSeq,
      storeIncarnation: this.incarnation,
      // 0: the longest the server allows; the smart heartbeat climbs toward it.
      heartbeatMs: this.cfg.session.heartbeatMs === 0 ? 0xffffffff : this.cfg.session.heartbeatMs,
    };
    const session = new ClientSession(opts, now);
    session.skipThrough(this.deliveredSeq);
    this.state = {
      type: "up",
      up: { link, endpoint: s.endpoint, session, reader: new FrameReader(this.cfg.maxFrameBytes), active: false, refreshAt: undefined, serverOffsetMs: 0 },
    };
    this.out.push({ type: "send", link, bytes: session.authFrame() });
  }

  handleBytes(now: number, link: number, bytes: Uint8Array): void {
    let up = this.up();
    if (!up || up.link !== link) return;
    up.reader.push(bytes);
    for (;;) {
      up = this.up();
      if (!up || up.link !== link) return; // an event ended the link (GoAway)
      let frame;
      try {
        frame = up.reader.next();
      } catch (e) {
        const detail = e instanceof FrameError ? e.message : String(e);
        this.fail(now, { type: "protocol", detail: `bad frame from server: ${detail}` }, true);
        return;
      }
      if (!frame) return;
      const r = up.session.handleFrame(now, frame);
      if (r.err) {
        if (r.err.type === "kicked") this.event({ type: "kicked", code: r.err.code, reason: r.err.reason });
        this.fail(now, fromSession(r.err), true);
        return;
      }
      if (r.event) this.onSessionEvent(now, r.event);
    }
  }

  /** The transport closed or failed (connect refused, reset, EOF). */
  handleClosed(now: number, link: number, why: string): void {
    const s = this.state;
    let reason: Disconnect;
    if (s.type === "connecting" && s.link === link) reason = { type: "connect_failed", detail: why };
    else if (s.type === "up" && s.up.link === link) reason = { type: "lost", detail: why };
    else return;
    this.fail(now, reason, false);
  }

  /** The transport closed with a longlink code (WebSocket close 4000 + code). */
  handleClosedWithCode(now: number, link: number, code: ErrorCode, reason: string): void {
    const s = this.state;
    if (!((s.type === "connecting" && s.link === link) || (s.type === "up" && s.up.link === link))) return;
    this.fail(now, { type: "error", code, reason, reconnect: reconnectAllowed(code) }, false);
  }

  handleTimeout(now: number): void {
    const s = this.state;
    switch (s.type) {
      case "waiting":
        if (now >= s.at) this.attempt(now);
        break;
      case "looking_up":
        if (now >= s.deadline) {
          this.needLookup = this.endpoints.length === 0;
          this.retryLater(now, { type: "dispatcher", detail: `no answer within ${this.cfg.connectTimeoutMs} ms` });
        }
        break;
      case "connecting":
        if (now >= s.deadline) this.fail(now, { type: "connect_timeout", ms: this.cfg.connectTimeoutMs }, true);
        break;
      case "up": {
        const up = s.up;
        if (up.refreshAt !== undefined && now >= up.refreshAt) {
          up.refreshAt = undefined;
          this.event({ type: "token_expiring", tokenExpiresMs: this.tokenExpiresMs });
        }
        const t = up.session.pollTimer(now);
        if (t.err) {
          this.fail(now, fromSession(t.err), true);
        } else if (t.due === "ping") {
          this.send(up.link, up.session.ping(now));
        } else if (t.due === "pong_missed") {
          if (this.heartbeat.onMissed()) {
            this.fail(now, { type: "no_pong" }, true);
          } else {
            // Probe at once; its Pong (or its absence) decides.
            this.send(up.link, up.session.ping(now));
          }
        }
        break;
      }
      case "stopped":
        break;
    }
    if (this.ackDue !== undefined && now >= this.ackDue) this.flushAck(true);
    this.requestsDue(now);
  }

  // ---- application calls ----------------------------------------------------

  /**
   * Queues an upstream request; its answer comes as a "response" event
   * within `timeoutMs`. Sent again with the same client_msg_id (and the
   * retransmission flag) after requestRetryMs without an answer, after a
   * BUSY answer, and on the next session when the link drops.
   */
  request(now: number, service: string, body: Uint8Array, timeoutMs: number): bigint {
    if (this.state.type === "stopped") throw new SdkError("stopped", `the client stopped: ${describeDisconnect(this.state.reason)}`);
    const serviceBytes = new TextEncoder().encode(service).length;
    if (serviceBytes === 0 || serviceBytes > MAX_ID_BYTES) throw new SdkError("bad_service", `service id must be 1 to ${MAX_ID_BYTES} bytes`);
    if (body.length + serviceBytes + 32 > this.cfg.maxFrameBytes) {
      throw new SdkError("too_large", `request body of ${body.length} bytes exceeds the frame limit of ${this.cfg.maxFrameBytes}`);
    }
    if (this.pending.size >= this.cfg.maxPendingRequests) {
      throw new SdkError("too_many_requests", `${this.pending.size} requests are already waiting for an answer`);
    }
    const id = this.nextMsgId;
    this.nextMsgId = (this.nextMsgId + 1n) & ((1n << 64n) - 1n) || 1n;
    const active = this.up()?.active ?? false;
    this.pending.set(id, {
      service,
      body,
      deadline: now + timeoutMs,
      nextTry: active ? now : undefined,
      attempts: 0,
      sentOn: undefined,
    });
    this.requestsDue(now);
    return id;
  }

  /** The application handled the message `seq` (or the resync range ending at it) and all before. */
  messageHandled(now: number, seq: bigint): void {
    if (seq <= this.handledSeq) return;
    this.handledSeq = seq;
    const caughtUp = this.handledSeq >= this.deliveredSeq;
    const up = this.up();
    if (!up) return;
    up.session.handled(seq);
    this.incarnation = up.session.storeIncarnation;
    if (!up.active) return; // no Ack before AuthOk; it goes out once active
    if (!this.flushAck(caughtUp) && this.ackDue === undefined) this.ackDue = now + this.cfg.ackDelayMs;
  }

  setForeground(now: number, foreground: boolean): void {
    const returning = this.heartbeat.setForeground(foreground);
    const up = this.up();
    if (!up || !up.active) return;
    if (returning) this.send(up.link, up.session.ping(now));
    this.rearmHeartbeat(now);
  }

  networkChanged(now: number, net: string): void {
    this.cfg.net = net;
    this.heartbeat.resetNetwork();
    this.backoff.reset();
    this.rushed = false;
    this.needLookup = this.cfg.dispatcher;
    switch (this.state.type) {
      case "up":
      case "connecting":
        this.fail(now, { type: "network_changed" }, true);
        break;
      case "waiting":
        this.attempt(now);
        break;
      default:
        break;
    }
  }

  setToken(token: string): void {
    this.cfg.session.token = token;
  }

  /** A new token ("token_expiring"'s answer): for the next connects, and in a Refresh to a running session. */
  refreshToken(_now: number, token: string): void {
    this.cfg.session.token = token;
    const up = this.up();
    if (up && up.active) this.send(up.link, up.session.refreshFrame(token));
  }

  close(): void {
    const link = this.link();
    if (link !== undefined) this.out.push({ type: "close", link });
    if (!this.isStopped) {
      const reason: Disconnect = { type: "closed_by_app" };
      this.event({ type: "disconnected", reason, retryInMs: undefined });
      this.stop(reason);
    }
  }

  // ---- internals ------------------------------------------------------------

  private link(): number | undefined {
    const s = this.state;
    if (s.type === "connecting") return s.link;
    if (s.type === "up") return s.up.link;
    return undefined;
  }

  private event(event: AgentEvent): void {
    this.out.push({ type: "event", event });
  }

  private send(link: number, bytes: Uint8Array): void {
    this.out.push({ type: "send", link, bytes });
  }

  private adoptHeartbeatBounds(minMs: number, maxMs: number): void {
    const fresh = new SmartHeartbeat(minMs, maxMs);
    if (fresh.minMs === this.heartbeat.minMs && fresh.maxMs === this.heartbeat.maxMs) {
      this.heartbeat.resetForNewLink();
    } else {
      const fg = this.heartbeat.foreground;
      this.heartbeat = fresh;
      this.heartbeat.setForeground(fg);
    }
  }

  private rearmHeartbeat(now: number): void {
    const interval = this.heartbeat.intervalMs();
    const up = this.up();
    if (up && interval > 0) up.session.setHeartbeat(now, interval);
  }

  /** Asks for a new token when a fifth of the time to `tokenExpiresMs` is left (at least a second ahead). */
  private scheduleRefresh(up: Up, now: number, tokenExpiresMs: bigint): void {
    up.refreshAt = undefined;
    this.tokenExpiresMs = tokenExpiresMs;
    if (tokenExpiresMs === 0n) return;
    const left = Math.max(0, this.expiresIn(up, now));
    const lead = Math.min(Math.max(left / 5, 1_000), left);
    up.refreshAt = now + left - lead;
  }

  /** Milliseconds until the session's token expires, on the node's clock. */
  private expiresIn(up: Up, now: number): number {
    return Number(this.tokenExpiresMs) - (now + up.serverOffsetMs);
  }

  private attempt(now: number): void {
    if (this.needLookup || this.endpoints.length === 0) {
      this.state = { type: "looking_up", deadline: now + this.cfg.connectTimeoutMs };
      this.out.push({ type: "lookup", net: this.cfg.net });
    } else {
      this.connect(now);
    }
  }

  private connect(now: number): void {
    const endpoint = this.endpoints.current();
    if (endpoint === undefined) {
      this.retryLater(now, { type: "connect_failed", detail: "no endpoint" });
      return;
    }
    this.nextLink += 1;
    const link = this.nextLink;
    this.state = { type: "connecting", link, endpoint, deadline: now + this.cfg.connectTimeoutMs };
    this.out.push({ type: "connect", link, endpoint });
  }

  private onSessionEvent(now: number, ev: SessionEvent): void {
    switch (ev.type) {
      case "connected": {
        const up = this.up();
        if (!up) return;
        up.active = true;
        this.incarnation = up.session.storeIncarnation;
        const ok = ev.authOk;
        // The negotiated interval is the longest the server's idle timeout covers.
        this.adoptHeartbeatBounds(ok.heartbeatMinMs, Math.max(ok.heartbeatMs, ok.heartbeatMinMs));
        this.rearmHeartbeat(now);
        up.serverOffsetMs = Number(ok.serverTimeMs) - now;
        this.scheduleRefresh(up, now, ok.tokenExpiresMs);
        this.event({ type: "connected", endpoint: up.endpoint, authOk: ok });
        // Handled while authenticating (after Auth.last_seq was sent).
        this.flushAck(true);
        for (const p of this.pending.values()) p.nextTry = now;
        this.requestsDue(now);
        break;
      }
      case "pong":
        this.heartbeat.onPong();
        // A round trip made it: the link works, backoff starts over.
        this.backoff.reset();
        this.rushed = false;
        this.rearmHeartbeat(now);
        break;
      case "go_away":
        this.fail(now, { type: "go_away", endpoint: ev.endpoint, reason: ev.reason }, true);
        break;
      case "message":
        this.deliveredSeq = maxBig(this.deliveredSeq, ev.message.seq);
        this.event({ type: "message", message: ev.message });
        break;
      case "group_result":
        this.event({
          type: "group_result",
          group: ev.result.group,
          join: ev.result.join,
          code: ev.result.code,
          reason: ev.result.reason,
        });
        break;
      case "refreshed": {
        const up = this.up();
        if (up) this.scheduleRefresh(up, now, ev.tokenExpiresMs);
        this.event({ type: "token_refreshed", tokenExpiresMs: ev.tokenExpiresMs });
        break;
      }
      case "resync":
        this.deliveredSeq = maxBig(this.deliveredSeq, ev.toSeq);
        this.event({ type: "resync_required", fromSeq: ev.fromSeq, toSeq: ev.toSeq });
        break;
      case "response": {
        const r = ev.response;
        const p = this.pending.get(r.requestId);
        if (!p) return; // a late duplicate
        if (r.status === ErrorCode.BUSY && now + this.cfg.requestRetryMs < p.deadline) {
          p.nextTry = now + this.cfg.requestRetryMs;
          return;
        }
        this.pending.delete(r.requestId);
        this.event({ type: "response", id: r.requestId, response: r });
        break;
      }
    }
  }

  /** Sends or expires the requests that are due. */
  private requestsDue(now: number): void {
    const up = this.up();
    const link = up && up.active ? up.link : undefined;
    const retry = Math.max(1, this.cfg.requestRetryMs);
    const expired: [bigint, number][] = [];
    const sends: Uint8Array[] = [];
    let doubt = false;
    for (const [id, p] of this.pending) {
      if (now >= p.deadline) {
        expired.push([id, p.attempts]);
        continue;
      }
      if (p.nextTry === undefined || p.nextTry > now) continue;
      if (link === undefined) {
        p.nextTry = undefined;
        continue;
      }
      const flags = p.attempts > 0 ? FLAG_RETRANSMISSION : 0;
      sends.push(
        encodeFrame(FrameKind.REQUEST, RequestSchema, { serviceId: p.service, requestId: id, clientMsgId: id, body: p.body }, flags),
      );
      doubt ||= p.sentOn === link;
      p.attempts += 1;
      p.nextTry = now + retry;
      p.sentOn = link;
    }
    if (link !== undefined && up) {
      for (const bytes of sends) this.send(link, bytes);
      // No answer on this link: is it still there? A heartbeat now finds a
      // stalled link within the response timeout.
      if (doubt && !up.session.isAwaitingPong) this.send(link, up.session.ping(now));
    }
    for (const [id, attempts] of expired) {
      this.pending.delete(id);
      this.event({ type: "response", id, failure: { type: "timed_out", attempts } });
    }
  }

  private flushAck(nowOrBatch: boolean): boolean {
    const up = this.up();
    if (!up) {
      this.ackDue = undefined;
      return false;
    }
    const ack = up.session.pollAck(nowOrBatch);
    if (!ack) {
      if (nowOrBatch) this.ackDue = undefined;
      return false;
    }
    this.ackDue = undefined;
    this.send(up.link, ack);
    return true;
  }

  /** The current attempt or session ended; `close`: the agent noticed (the driver closes the link). */
  private fail(now: number, reason: Disconnect, close: boolean): void {
    const s = this.state;
    let wasActive = false;
    let link: number | undefined;
    if (s.type === "up") {
      wasActive = s.up.active;
      link = s.up.link;
      this.duplicatesEnded += s.up.session.duplicates;
    } else if (s.type === "connecting") {
      link = s.link;
    }
    // The next Auth carries the resume point.
    this.ackDue = undefined;
    if (close && link !== undefined) this.out.push({ type: "close", link });
    // Requests wait for the next session.
    for (const p of this.pending.values()) p.nextTry = undefined;
    if (!reconnectAllowedAfter(reason)) {
      this.event({ type: "disconnected", reason, retryInMs: undefined });
      this.stop(reason);
      return;
    }
    let atOnce: boolean;
    if (reason.type === "go_away" && reason.endpoint !== "") {
      this.endpoints.goAway(reason.endpoint);
      atOnce = true;
    } else if (
      reason.type === "go_away" ||
      ((reason.type === "error" || reason.type === "kicked") && reason.code === ErrorCode.GOING_AWAY)
    ) {
      // The node drains and will not take us back: elsewhere, now.
      if (this.cfg.dispatcher) this.needLookup = true;
      else this.endpoints.fail();
      atOnce = true;
    } else if (reason.type === "network_changed") {
      atOnce = true;
    } else if (reason.type === "error" && reason.code === ErrorCode.TOKEN_EXPIRED) {
      this.needLookup = this.cfg.dispatcher;
      atOnce = false;
    } else if (wasActive) {
      // A session that was up is tried again where it was.
      atOnce = false;
    } else {
      // An endpoint that could not give one, we drift away from.
      if (this.endpoints.fail() && this.cfg.dispatcher) this.needLookup = true;
      atOnce = false;
    }
    // At once only once in a row: a server that keeps sending GoAway (or a
    // flapping network) still gets the backoff.
    if (atOnce && !this.rushed) {
      this.rushed = true;
      this.event({ type: "disconnected", reason, retryInMs: 0 });
      this.state = { type: "waiting", at: now };
      this.attempt(now);
    } else {
      this.retryLater(now, reason);
    }
  }

  private retryLater(now: number, reason: Disconnect): void {
    const delay = this.backoff.nextDelayMs(this.rng);
    this.event({ type: "disconnected", reason, retryInMs: delay });
    this.state = { type: "waiting", at: now + delay };
  }

  private stop(reason: Disconnect): void {
    this.state = { type: "stopped", reason };
    const ids = [...this.pending.keys()];
    this.pending.clear();
    for (const id of ids) this.event({ type: "response", id, failure: { type: "stopped", reason } });
  }
}

function fromSession(e: SessionError): Disconnect {
  switch (e.type) {
    case "error":
      return { type: "error", code: e.code, reason: e.reason, reconnect: e.reconnect };
    case "kicked":
      return { type: "kicked", code: e.code, reason: e.reason };
    case "auth_timeout":
      return { type: "auth_timeout", ms: e.ms };
    case "protocol":
      return { type: "protocol", detail: e.detail };
  }
}

export { DEFAULT_MAX_BODY };
