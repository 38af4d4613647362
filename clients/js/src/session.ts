// One connection's protocol state (a port of ClientSession in
// src/client.rs): Auth, AuthOk, heartbeats, duplicate detection by
// sequence, cumulative Acks of what the application handled, and the
// store incarnation. No I/O, time passed in (ms).

import {
  AckSchema,
  AuthOkSchema,
  AuthSchema,
  Capability,
  ErrorSchema,
  FrameKind,
  GoAwaySchema,
  GroupResultSchema,
  KickedSchema,
  MessageSchema,
  RefreshOkSchema,
  RefreshSchema,
  ResponseSchema,
  ResyncRequiredSchema,
} from "./gen/longlink_pb.js";
import type { AuthOk, GroupResult, Message, Response } from "./gen/longlink_pb.js";
import { decodeBody, encodeFrame, encodeRaw } from "./frame.js";
import type { RawFrame } from "./frame.js";

/** What goes into Auth. */
export interface SessionOptions {
  token: string;
  device: string;
  platform: string;
  clientVersion: string;
  capabilities: number;
  lastSeq: bigint;
  storeIncarnation: bigint;
  heartbeatMs: number;
  responseTimeoutMs: number;
  ackEvery: number;
}

export type SessionEvent =
  | { type: "connected"; authOk: AuthOk }
  | { type: "pong"; rttMs: number }
  | { type: "go_away"; endpoint: string; reason: string }
  | { type: "message"; message: Message }
  | { type: "resync"; fromSeq: bigint; toSeq: bigint }
  | { type: "response"; response: Response }
  | { type: "group_result"; result: GroupResult }
  /** The node took a Refresh: the session's token now expires then (unix ms). */
  | { type: "refreshed"; tokenExpiresMs: bigint };

/** Why the session ended (mapped to a Disconnect by the agent). */
export type SessionError =
  | { type: "error"; code: number; reason: string; reconnect: boolean }
  | { type: "kicked"; code: number; reason: string }
  | { type: "auth_timeout"; ms: number }
  | { type: "protocol"; detail: string };

export type Due = "nothing" | "ping" | "pong_missed";

const PING = encodeRaw(FrameKind.PING, new Uint8Array(0));

export class ClientSession {
  private active = false;
  private heartbeatMs = 0;
  private nextPing = Number.POSITIVE_INFINITY;
  /** [sent at, answer deadline] of the outstanding Ping. */
  private awaitingPong: [number, number] | undefined;
  private readonly authDeadline: number;
  private receivedSeq: bigint;
  private handledSeq: bigint;
  private ackedSeq: bigint;
  private unacked = 0;
  duplicates = 0;
  private incarnation: bigint;
  private offeredIncarnation: [bigint, bigint] | undefined;

  constructor(
    private readonly opts: SessionOptions,
    now: number,
  ) {
    this.authDeadline = now + opts.responseTimeoutMs;
    this.receivedSeq = opts.lastSeq;
    this.handledSeq = opts.lastSeq;
    this.ackedSeq = opts.lastSeq;
    this.incarnation = opts.storeIncarnation;
  }

  /** The Auth frame to send first. */
  authFrame(): Uint8Array {
    const o = this.opts;
    return encodeFrame(FrameKind.AUTH, AuthSchema, {
      token: o.token,
      device: o.device,
      platform: o.platform,
      clientVersion: o.clientVersion,
      capabilities: o.capabilities,
      lastSeq: o.lastSeq,
      heartbeatMs: o.heartbeatMs,
      storeIncarnation: o.storeIncarnation,
    });
  }

  get isActive(): boolean {
    return this.active;
  }

  get storeIncarnation(): bigint {
    return this.incarnation;
  }

  private acks(): boolean {
    return (this.opts.capabilities & Capability.ACK) !== 0;
  }

  /** The application handled everything up to `seq`. */
  handled(seq: bigint): void {
    if (seq > this.handledSeq) {
      this.handledSeq = seq;
      this.unacked += 1;
    }
    if (this.offeredIncarnation && seq > this.offeredIncarnation[1]) {
      this.incarnation = this.offeredIncarnation[0];
      this.offeredIncarnation = undefined;
    }
  }

  /** The Ack to send: when `nowOrBatch`, or once `ackEvery` handled ones wait. */
  pollAck(nowOrBatch: boolean): Uint8Array | undefined {
    const batch = this.unacked >= Math.max(1, this.opts.ackEvery);
    if (!this.acks() || this.handledSeq <= this.ackedSeq || !(nowOrBatch || batch)) return undefined;
    this.ackedSeq = this.handledSeq;
    this.unacked = 0;
    return encodeFrame(FrameKind.ACK, AckSchema, { seq: this.handledSeq });
  }

  /** Throws SessionError (as a value) through the `err` side of the result. */
  handleFrame(now: number, f: RawFrame): { event?: SessionEvent; err?: SessionError } {
    try {
      return this.frame(now, f);
    } catch (e) {
      return { err: { type: "protocol", detail: (e as Error).message } };
    }
  }

  private frame(now: number, f: RawFrame): { event?: SessionEvent; err?: SessionError } {
    const unexpected = (): { err: SessionError } => ({
      err: { type: "protocol", detail: `unexpected ${FrameKind[f.kind] ?? f.kind} frame from the server` },
    });
    switch (f.kind) {
      case FrameKind.ERROR: {
        const e = decodeBody(ErrorSchema, f.body);
        return { err: { type: "error", code: e.code, reason: e.reason, reconnect: e.reconnect } };
      }
      case FrameKind.KICKED: {
        const k = decodeBody(KickedSchema, f.body);
        return { err: { type: "kicked", code: k.code, reason: k.reason } };
      }
      case FrameKind.AUTH_OK: {
        if (this.active) return unexpected();
        const ok = decodeBody(AuthOkSchema, f.body);
        const inc = ok.storeIncarnation;
        if (inc !== 0n) {
          if (this.incarnation === 0n || this.incarnation === inc) this.incarnation = inc;
          else this.offeredIncarnation = [inc, this.receivedSeq];
        }
        this.active = true;
        this.heartbeatMs = Math.max(1, ok.heartbeatMs);
        this.nextPing = now + this.heartbeatMs;
        return { event: { type: "connected", authOk: ok } };
      }
    }
    if (!this.active) return unexpected();
    switch (f.kind) {
      case FrameKind.PONG: {
        if (f.body.length !== 0) return { err: { type: "protocol", detail: "Pong with a body" } };
        const rttMs = this.awaitingPong ? now - this.awaitingPong[0] : 0;
        this.awaitingPong = undefined;
        return { event: { type: "pong", rttMs } };
      }
      case FrameKind.GO_AWAY: {
        const g = decodeBody(GoAwaySchema, f.body);
        return { event: { type: "go_away", endpoint: g.endpoint, reason: g.reason } };
      }
      case FrameKind.MESSAGE: {
        const m = decodeBody(MessageSchema, f.body);
        if (m.seq !== 0n && m.seq <= this.receivedSeq) {
          // Resent (or replayed) and already seen: drop it.
          this.duplicates += 1;
          return {};
        }
        if (m.seq > this.receivedSeq) this.receivedSeq = m.seq;
        return { event: { type: "message", message: m } };
      }
      case FrameKind.RESYNC_REQUIRED: {
        const r = decodeBody(ResyncRequiredSchema, f.body);
        if (r.toSeq > this.receivedSeq) this.receivedSeq = r.toSeq;
        return { event: { type: "resync", fromSeq: r.fromSeq, toSeq: r.toSeq } };
      }
      case FrameKind.RESPONSE:
        return { event: { type: "response", response: decodeBody(ResponseSchema, f.body) } };
      case FrameKind.REFRESH_OK:
        return { event: { type: "refreshed", tokenExpiresMs: decodeBody(RefreshOkSchema, f.body).tokenExpiresMs } };
      case FrameKind.GROUP_RESULT:
        // The answer to a JOIN or LEAVE (a refused JOIN joined nothing).
        return { event: { type: "group_result", result: decodeBody(GroupResultSchema, f.body) } };
      default:
        return unexpected();
    }
  }

  /** When pollTimer must run next. */
  pollTimeout(): number {
    if (!this.active) return this.authDeadline;
    return this.awaitingPong ? Math.min(this.awaitingPong[1], this.nextPing) : this.nextPing;
  }

  /** Fires due timers; a missed Pong is reported, not fatal (the agent probes first). */
  pollTimer(now: number): { due: Due; err?: SessionError } {
    if (!this.active) {
      if (now >= this.authDeadline) return { due: "nothing", err: { type: "auth_timeout", ms: this.opts.responseTimeoutMs } };
      return { due: "nothing" };
    }
    if (this.awaitingPong && now >= this.awaitingPong[1]) {
      this.awaitingPong = undefined;
      return { due: "pong_missed" };
    }
    if (now >= this.nextPing) {
      this.ping(now);
      return { due: "ping" };
    }
    return { due: "nothing" };
  }

  /** A heartbeat now; returns the Ping frame. */
  ping(now: number): Uint8Array {
    this.nextPing = now + this.heartbeatMs;
    if (!this.awaitingPong) this.awaitingPong = [now, now + this.opts.responseTimeoutMs];
    return PING;
  }

  setHeartbeat(now: number, intervalMs: number): void {
    this.heartbeatMs = Math.max(1, intervalMs);
    this.nextPing = now + this.heartbeatMs;
  }

  get isAwaitingPong(): boolean {
    return this.awaitingPong !== undefined;
  }

  /** A Refresh frame carrying a new token for this session. */
  refreshFrame(token: string): Uint8Array {
    return encodeFrame(FrameKind.REFRESH, RefreshSchema, { token });
  }

  /** Messages up to `seq` already reached the application: their replay is a duplicate. */
  skipThrough(seq: bigint): void {
    if (seq > this.receivedSeq) this.receivedSeq = seq;
  }
}

export { PING };
