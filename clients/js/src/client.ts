// The public client: an Agent (agent.ts) driven by timers and a Transport.
// Messages and resync ranges go through the application's handlers one at
// a time, in order; a message is acknowledged only after its handler
// resolved (ACK after handling). Upstream requests are promises.

import { Agent, SdkError, describeDisconnect, disconnectCode, reconnectAllowedAfter } from "./agent.js";
import type { Action, AgentConfig, AgentEvent, Disconnect, Dispatch, RequestFailure } from "./agent.js";
import { Capability, ErrorCode } from "./gen/longlink_pb.js";
import type { AuthOk, Message, Response } from "./gen/longlink_pb.js";
import { DEFAULT_MAX_BODY } from "./frame.js";
import { Rng } from "./policy.js";
import { httpLookup } from "./dispatch.js";
import type { DispatcherOptions, LookupFn } from "./dispatch.js";
import type { Link, Transport } from "./transport.js";

export const CLIENT_VERSION = "js-0.1.0";

export interface ResyncRange {
  fromSeq: bigint;
  toSeq: bigint;
}

export interface ClientOptions {
  /** How to reach the node: tcpTransport() from "@longlink/client/node", or webSocketTransport(). */
  transport: Transport;
  /** host:port endpoints in order of preference (the fallback when a dispatcher is set). */
  endpoints?: string[];
  /** Ask a dispatcher for endpoints and a token: its URL and parameters, or a lookup function. */
  dispatcher?: DispatcherOptions | LookupFn;
  /** Connect token (may come from the dispatcher instead). */
  token?: string;
  device?: string;
  platform?: string;
  clientVersion?: string;
  /** Network type told to the dispatcher ("wifi", "cellular", ...). */
  net?: string;
  /** Resume point: the last sequence handled by an earlier run, and its store incarnation. */
  lastSeq?: bigint;
  storeIncarnation?: bigint;
  /** Declare CAPABILITY_ACK (default true): stored messages are resent until acknowledged. */
  acks?: boolean;
  /** Requested heartbeat interval (0: the longest the server allows; the smart heartbeat stays inside). */
  heartbeatMs?: number;
  /** Wait for AuthOk, for each Pong, and for a blocked write (default 10,000 ms). */
  responseTimeoutMs?: number;
  /** Ack after this many handled messages in a burst (default 16). */
  ackEvery?: number;
  /** Ack at the latest this long after handling (default 200 ms). */
  ackDelayMs?: number;
  connectTimeoutMs?: number;
  backoffMinMs?: number;
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  heartbeatMinMs?: number;
  heartbeatMaxMs?: number;
  /** Resend an unanswered request after this long (default 5,000 ms). */
  requestRetryMs?: number;
  maxPendingRequests?: number;
  maxFrameBytes?: number;
  /** Seed of the jitter and of client_msg_ids (tests fix it). */
  seed?: bigint;
  /**
   * Handles a pushed message. The message is acknowledged (at-least-once
   * ones, seq != 0) only after the returned promise resolves. If it throws,
   * a "handler_error" event is emitted and the same message is handled
   * again after `handlerRetryMs`; nothing after it is handled meanwhile.
   */
  onMessage?: (message: Message) => void | Promise<void>;
  /**
   * The node cannot replay fromSeq..=toSeq: fetch what was missed from the
   * business backend. The range counts as handled once this resolves.
   */
  onResyncRequired?: (range: ResyncRange) => void | Promise<void>;
  handlerRetryMs?: number;
  /**
   * Gets a new token for the same user and device when the session's token
   * nears its expiry (a fifth of its lifetime left, at least a second): it
   * goes to the node in a Refresh frame, so the session outlives the old
   * token, and is used by later connects. A throw or rejection emits
   * "token_refresh_failed"; the node then closes the session with
   * TOKEN_EXPIRED when the token expires. Without it, listen for
   * "token_expiring" and call refreshToken().
   */
  onTokenRefresh?: (tokenExpiresMs: bigint) => string | Promise<string>;
  /** Stop reading from the link while this many messages wait for the handler (default 1,024). */
  maxQueuedMessages?: number;
}

export type ClientEvent =
  | { type: "connected"; endpoint: string; authOk: AuthOk }
  | { type: "disconnected"; reason: Disconnect; retryInMs: number | undefined }
  | { type: "kicked"; code: ErrorCode; reason: string }
  | { type: "resync_required"; fromSeq: bigint; toSeq: bigint }
  | { type: "handler_error"; error: unknown; seq: bigint }
  /** The session's token expires at `tokenExpiresMs` (unix ms): refresh it (onTokenRefresh does). */
  | { type: "token_expiring"; tokenExpiresMs: bigint }
  /** The node took the new token: the session now ends at `tokenExpiresMs` (0: never). */
  | { type: "token_refreshed"; tokenExpiresMs: bigint }
  /** onTokenRefresh threw or rejected. */
  | { type: "token_refresh_failed"; error: unknown }
  /** The node's answer to a JOIN or LEAVE: `code` 0 = done (a refused JOIN joined nothing). */
  | { type: "group_result"; group: string; join: boolean; code: ErrorCode; reason: string };

type EventMap = { [E in ClientEvent as E["type"]]: E };
type Listener<K extends keyof EventMap> = (ev: EventMap[K]) => void;

/** An upstream request that got no Response. */
export class RequestError extends Error {
  constructor(readonly failure: RequestFailure) {
    super(
      failure.type === "timed_out"
        ? `no response within the request's timeout (${failure.attempts} attempts)`
        : `the client stopped: ${describeDisconnect(failure.reason)}`,
    );
    this.name = "RequestError";
  }
}

type Work = { kind: "message"; message: Message } | { kind: "resync"; range: ResyncRange };

const now = (): number => Math.floor(performance.now());
/** setTimeout's limit. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export class LonglinkClient {
  private readonly agent: Agent;
  private readonly transport: Transport;
  private readonly lookup: LookupFn | undefined;
  private readonly opts: ClientOptions;
  private readonly responseTimeoutMs: number;
  private readonly listeners = new Map<string, Set<(ev: never) => void>>();
  private readonly waiters = new Map<bigint, { resolve: (r: Response) => void; reject: (e: RequestError) => void }>();
  private link: { id: number; conn: Link } | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private timerAt = Number.POSITIVE_INFINITY;
  private lookupAbort: AbortController | undefined;
  /** A blocked write: [deadline, buffered bytes when it was set]. */
  private drain: [number, number] | undefined;
  private readonly work: Work[] = [];
  private working = false;
  private paused = false;
  private pumping = false;
  private stoppedReason: Disconnect | undefined;
  private readonly stoppedWaiters: ((d: Disconnect) => void)[] = [];

  constructor(opts: ClientOptions) {
    this.opts = opts;
    this.transport = opts.transport;
    this.responseTimeoutMs = opts.responseTimeoutMs ?? 10_000;
    if (typeof opts.dispatcher === "function") this.lookup = opts.dispatcher;
    else if (opts.dispatcher) this.lookup = httpLookup(opts.dispatcher);
    const cfg: AgentConfig = {
      session: {
        token: opts.token ?? "",
        device: opts.device ?? "",
        platform: opts.platform ?? "",
        clientVersion: opts.clientVersion ?? CLIENT_VERSION,
        capabilities: opts.acks === false ? 0 : Capability.ACK,
        lastSeq: opts.lastSeq ?? 0n,
        storeIncarnation: opts.storeIncarnation ?? 0n,
        heartbeatMs: opts.heartbeatMs ?? 0,
        responseTimeoutMs: this.responseTimeoutMs,
        ackEvery: opts.ackEvery ?? 16,
      },
      endpoints: opts.endpoints ?? [],
      dispatcher: this.lookup !== undefined,
      net: opts.net ?? "",
      connectTimeoutMs: opts.connectTimeoutMs ?? 10_000,
      backoffMinMs: opts.backoffMinMs ?? 200,
      backoffBaseMs: opts.backoffBaseMs ?? 1_000,
      backoffMaxMs: opts.backoffMaxMs ?? 60_000,
      heartbeatMinMs: opts.heartbeatMinMs ?? 5_000,
      heartbeatMaxMs: opts.heartbeatMaxMs ?? 270_000,
      requestRetryMs: opts.requestRetryMs ?? 5_000,
      maxPendingRequests: opts.maxPendingRequests ?? 1_024,
      ackDelayMs: opts.ackDelayMs ?? 200,
      maxFrameBytes: opts.maxFrameBytes ?? DEFAULT_MAX_BODY,
      seed: opts.seed ?? Rng.fromEntropy().nextU64(),
    };
    this.agent = new Agent(cfg, now());
    // The first lookup or connect starts on the next tick, after the
    // caller attached its listeners.
    queueMicrotask(() => this.pump());
  }

  // ---- typed events -----------------------------------------------------------

  on<K extends keyof EventMap>(type: K, fn: Listener<K>): this {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(fn as (ev: never) => void);
    return this;
  }

  off<K extends keyof EventMap>(type: K, fn: Listener<K>): this {
    this.listeners.get(type)?.delete(fn as (ev: never) => void);
    return this;
  }

  private emit(ev: ClientEvent): void {
    for (const fn of this.listeners.get(ev.type) ?? []) {
      try {
        (fn as (e: ClientEvent) => void)(ev);
      } catch {
        // A listener's bug must not break the client's loop.
      }
    }
  }

  // ---- application calls --------------------------------------------------------

  /**
   * Sends an upstream request and resolves with the node's Response (a
   * non-OK `status` such as TIMEOUT or UNAVAILABLE is an answer too).
   * Retried with the same client_msg_id until `timeoutMs`: the backend sees it once.
   */
  request(service: string, body: Uint8Array | string, opts: { timeoutMs?: number } = {}): Promise<Response> {
    const bytes = typeof body === "string" ? new TextEncoder().encode(body) : body;
    let id: bigint;
    try {
      id = this.agent.request(now(), service, bytes, opts.timeoutMs ?? 30_000);
    } catch (e) {
      return Promise.reject(e);
    }
    const p = new Promise<Response>((resolve, reject) => this.waiters.set(id, { resolve, reject }));
    this.pump();
    return p;
  }

  /** The app moved to the foreground or background (heartbeat policy). */
  setForeground(foreground: boolean): void {
    this.agent.setForeground(now(), foreground);
    this.pump();
  }

  /** The device changed networks: reconnect now, re-learn the heartbeat. */
  networkChanged(net: string): void {
    this.agent.networkChanged(now(), net);
    this.pump();
  }

  /** A new token for the next connects. */
  setToken(token: string): void {
    this.agent.setToken(token);
  }

  /** A new token for the running session (sent in a Refresh) and the next connects. */
  refreshToken(token: string): void {
    this.agent.refreshToken(now(), token);
    this.pump();
  }

  /** Stops for good; resolves once stopped. Requests in flight reject. */
  close(): Promise<Disconnect> {
    this.agent.close();
    this.pump();
    return this.stopped();
  }

  /** Resolves with the reason once the client stopped (terminal code or close()). */
  stopped(): Promise<Disconnect> {
    if (this.stoppedReason) return Promise.resolve(this.stoppedReason);
    return new Promise((resolve) => this.stoppedWaiters.push(resolve));
  }

  /** The resume point: persist it (with storeIncarnation) and pass it back as `lastSeq`. */
  get lastSeq(): bigint {
    return this.agent.lastSeq;
  }

  get storeIncarnation(): bigint {
    return this.agent.storeIncarnation;
  }

  /** Duplicate at-least-once messages dropped (never shown to the handler). */
  get duplicates(): number {
    return this.agent.duplicates;
  }

  get connectedTo(): string | undefined {
    return this.agent.connectedTo;
  }

  get isStopped(): boolean {
    return this.agent.isStopped;
  }

  get pendingRequests(): number {
    return this.agent.pendingRequests;
  }

  // ---- the loop ----------------------------------------------------------------

  /** Carries out the agent's actions, then re-arms the timer. */
  private pump(): void {
    if (this.pumping) return; // re-entered from a callback: the outer loop continues
    this.pumping = true;
    try {
      let a: Action | undefined;
      while ((a = this.agent.pollAction()) !== undefined) this.run(a);
    } finally {
      this.pumping = false;
    }
    if (this.agent.isStopped) this.finishStop();
    this.arm();
  }

  private run(a: Action): void {
    switch (a.type) {
      case "event":
        this.onEvent(a.event);
        break;
      case "send": {
        const l = this.link;
        if (!l || l.id !== a.link) break;
        l.conn.send(a.bytes);
        const b = l.conn.buffered();
        if (b > 0 && !this.drain) this.drain = [now() + this.responseTimeoutMs, b];
        break;
      }
      case "close":
        if (this.link?.id === a.link) {
          this.link.conn.close();
          this.link = undefined;
          this.drain = undefined;
        }
        break;
      case "connect":
        this.openLink(a.link, a.endpoint);
        break;
      case "lookup":
        this.startLookup(a.net);
        break;
    }
  }

  private openLink(id: number, endpoint: string): void {
    this.link?.conn.close();
    this.drain = undefined;
    this.paused = false;
    const current = () => this.link?.id === id;
    const conn = this.transport.connect(
      endpoint,
      {
        onOpen: () => {
          if (!current()) return;
          this.agent.handleConnected(now(), id);
          this.pump();
        },
        onData: (chunk) => {
          if (!current()) return;
          this.agent.handleBytes(now(), id, chunk);
          this.pump();
        },
        onClose: ({ reason, code }) => {
          if (!current()) return;
          this.link = undefined;
          this.drain = undefined;
          if (code !== undefined) this.agent.handleClosedWithCode(now(), id, code, reason);
          else this.agent.handleClosed(now(), id, reason);
          this.pump();
        },
      },
      { token: this.currentToken() },
    );
    this.link = { id, conn };
  }

  private currentToken(): string {
    // The dispatcher may have replaced it.
    return this.agent.token;
  }

  private startLookup(net: string): void {
    this.lookupAbort?.abort();
    const abort = new AbortController();
    this.lookupAbort = abort;
    const lookup = this.lookup;
    const done = (r: { ok: Dispatch } | { err: string }) => {
      if (abort.signal.aborted) return;
      this.lookupAbort = undefined;
      this.agent.handleDispatch(now(), r);
      this.pump();
    };
    if (!lookup) {
      queueMicrotask(() => done({ err: "no dispatcher configured" }));
      return;
    }
    let p: Promise<Dispatch>;
    try {
      p = lookup(net, abort.signal);
    } catch (e) {
      p = Promise.reject(e);
    }
    p.then(
      (ok) => done({ ok }),
      (e: unknown) => done({ err: e instanceof Error ? e.message : String(e) }),
    );
  }

  private arm(): void {
    const a = this.agent.pollTimeout();
    let at = a ?? Number.POSITIVE_INFINITY;
    if (this.drain) at = Math.min(at, this.drain[0]);
    if (at === this.timerAt && this.timer !== undefined) return;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.timerAt = at;
    if (at === Number.POSITIVE_INFINITY) return;
    const delay = Math.min(Math.max(0, at - now()), MAX_TIMER_MS);
    this.timer = setTimeout(() => this.tick(), delay);
  }

  private tick(): void {
    this.timer = undefined;
    this.timerAt = Number.POSITIVE_INFINITY;
    const t = now();
    if (this.drain && this.link && t >= this.drain[0]) {
      const b = this.link.conn.buffered();
      if (b === 0) this.drain = undefined;
      else if (b < this.drain[1]) this.drain = [t + this.responseTimeoutMs, b]; // progress
      else {
        // A peer that stops reading must not hold the client: end the link.
        const { id, conn } = this.link;
        conn.close();
        this.link = undefined;
        this.drain = undefined;
        this.agent.handleClosed(t, id, `write blocked for ${this.responseTimeoutMs} ms`);
      }
    }
    const due = this.agent.pollTimeout();
    if (due !== undefined && due <= t) this.agent.handleTimeout(t);
    this.pump();
  }

  private onEvent(ev: AgentEvent): void {
    switch (ev.type) {
      case "connected":
      case "kicked":
      case "disconnected":
      case "group_result":
      case "token_refreshed":
        this.emit(ev);
        break;
      case "token_expiring":
        this.emit(ev);
        if (this.opts.onTokenRefresh) this.fetchToken(this.opts.onTokenRefresh, ev.tokenExpiresMs);
        break;
      case "message":
        this.enqueue({ kind: "message", message: ev.message });
        break;
      case "resync_required":
        this.emit(ev);
        this.enqueue({ kind: "resync", range: { fromSeq: ev.fromSeq, toSeq: ev.toSeq } });
        break;
      case "response": {
        const w = this.waiters.get(ev.id);
        if (!w) break;
        this.waiters.delete(ev.id);
        if (ev.response) w.resolve(ev.response);
        else if (ev.failure) w.reject(new RequestError(ev.failure));
        break;
      }
    }
  }

  private fetchToken(fetch: (expiresMs: bigint) => string | Promise<string>, expiresMs: bigint): void {
    let p: Promise<string>;
    try {
      p = Promise.resolve(fetch(expiresMs));
    } catch (e) {
      p = Promise.reject(e);
    }
    p.then(
      (token) => {
        if (this.agent.isStopped) return;
        if (typeof token !== "string" || token === "") {
          this.emit({ type: "token_refresh_failed", error: new Error("onTokenRefresh returned no token") });
          return;
        }
        this.refreshToken(token);
      },
      (error: unknown) => this.emit({ type: "token_refresh_failed", error }),
    );
  }

  // ---- handlers, in order, ACK after each ---------------------------------------------

  private enqueue(w: Work): void {
    this.work.push(w);
    const max = this.opts.maxQueuedMessages ?? 1_024;
    if (this.work.length >= max && !this.paused && this.link) {
      if (this.link.conn.pause) {
        this.paused = true;
        this.link.conn.pause();
      } else if (this.work.length >= 2 * max) {
        // A transport that cannot stop reading (WebSocket): the queue must
        // not grow without bound. Drop the link; at-least-once messages
        // come again after the resume point, at-most-once ones are lost
        // as at-most-once allows.
        const { id, conn } = this.link;
        conn.close();
        this.link = undefined;
        this.drain = undefined;
        this.agent.handleClosed(now(), id, `the message handler fell behind (${this.work.length} queued)`);
        this.pump();
      }
    }
    if (!this.working) void this.drainWork();
  }

  private async drainWork(): Promise<void> {
    this.working = true;
    try {
      while (this.work.length > 0 && !this.agent.isStopped) {
        const w = this.work[0]!;
        const seq = w.kind === "message" ? w.message.seq : w.range.toSeq;
        try {
          if (w.kind === "message") await this.opts.onMessage?.(w.message);
          else await this.opts.onResyncRequired?.(w.range);
        } catch (error) {
          this.emit({ type: "handler_error", error, seq });
          await new Promise((r) => setTimeout(r, this.opts.handlerRetryMs ?? 1_000));
          continue;
        }
        this.work.shift();
        if (seq !== 0n) {
          this.agent.messageHandled(now(), seq);
          this.pump();
        }
        if (this.paused && this.work.length < (this.opts.maxQueuedMessages ?? 1_024) / 2) {
          this.paused = false;
          this.link?.conn.resume?.();
        }
      }
    } finally {
      this.working = false;
    }
  }

  private finishStop(): void {
    if (this.stoppedReason) return;
    this.stoppedReason = this.agent.stopReason ?? { type: "closed_by_app" };
    this.lookupAbort?.abort();
    this.lookupAbort = undefined;
    if (this.link) {
      this.link.conn.close();
      this.link = undefined;
    }
    for (const [, w] of this.waiters) w.reject(new RequestError({ type: "stopped", reason: this.stoppedReason }));
    this.waiters.clear();
    for (const fn of this.stoppedWaiters.splice(0)) fn(this.stoppedReason);
  }
}

export { describeDisconnect, disconnectCode, reconnectAllowedAfter, SdkError };
