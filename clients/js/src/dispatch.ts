// The dispatcher lookup (GET /v1/dispatch, src/dispatcher.rs) over fetch,
// bounded in time and in bytes. Everything about the request can be
// customised: extra query parameters and headers (an app credential the
// dispatcher checks), or a whole lookup function of the app's own.

import type { Dispatch } from "./agent.js";

export interface DispatcherOptions {
  /** Base URL of the dispatcher, e.g. "http://127.0.0.1:7103". */
  url: string;
  /** Sent as uid, device, platform, app (omitted when undefined). */
  uid?: string;
  device?: string;
  platform?: string;
  app?: string;
  /** Extra query parameters (e.g. the app's own credential). */
  params?: Record<string, string>;
  /** Extra request headers (e.g. Authorization). */
  headers?: Record<string, string>;
  /** The fetch to use (default: globalThis.fetch). */
  fetch?: typeof fetch;
  /** Bound on the whole exchange (default 5,000 ms; the client's connect timeout bounds it too). */
  timeoutMs?: number;
}

/** A custom lookup: must resolve with endpoints (and usually a token) or reject. */
export type LookupFn = (net: string, signal: AbortSignal) => Promise<Dispatch>;

/** Largest reply read (the JSON is a few hundred bytes). */
const MAX_REPLY = 64 * 1024;

export class DispatchError extends Error {
  constructor(
    message: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = "DispatchError";
  }
}

/** The lookup URL for `net` (exported for tests and custom fetchers). */
export function dispatchUrl(o: DispatcherOptions, net: string): string {
  const url = new URL("/v1/dispatch", o.url);
  const std: [string, string | undefined][] = [
    ["uid", o.uid],
    ["device", o.device],
    ["platform", o.platform],
    ["app", o.app],
    ["net", net],
  ];
  for (const [k, v] of std) if (v !== undefined) url.searchParams.set(k, v);
  for (const [k, v] of Object.entries(o.params ?? {})) url.searchParams.set(k, v);
  return url.toString();
}

async function readBounded(res: globalThis.Response): Promise<string> {
  const len = Number(res.headers.get("content-length") ?? "0");
  if (len > MAX_REPLY) throw new DispatchError(`dispatcher reply of ${len} bytes is too large`);
  if (!res.body) return "";
  const reader = res.body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (total > MAX_REPLY) {
      await reader.cancel();
      throw new DispatchError(`dispatcher reply larger than ${MAX_REPLY} bytes`);
    }
    chunks.push(value);
  }
  const all = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return new TextDecoder().decode(all);
}

const num = (v: unknown): number => (typeof v === "number" && Number.isFinite(v) && v >= 0 ? Math.floor(v) : 0);

/** Parses the dispatcher's JSON answer. */
export function parseDispatch(text: string): Dispatch {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new DispatchError(`bad dispatcher reply: ${(e as Error).message}`);
  }
  const o = (json ?? {}) as Record<string, unknown>;
  const endpoints = Array.isArray(o.endpoints) ? o.endpoints.filter((e): e is string => typeof e === "string") : [];
  if (endpoints.length === 0) throw new DispatchError("bad dispatcher reply: no endpoints");
  const hb = (o.heartbeat ?? {}) as Record<string, unknown>;
  const rc = (o.reconnect ?? {}) as Record<string, unknown>;
  return {
    endpoints,
    token: typeof o.token === "string" ? o.token : "",
    heartbeatMinMs: num(hb.min_ms),
    heartbeatMaxMs: num(hb.max_ms),
    reconnectMinMs: num(rc.min_ms),
    reconnectMaxMs: num(rc.max_ms),
  };
}

/** A LookupFn asking the dispatcher at `o.url`. */
export function httpLookup(o: DispatcherOptions): LookupFn {
  return async (net: string, signal: AbortSignal): Promise<Dispatch> => {
    const f = o.fetch ?? globalThis.fetch;
    const timeout = AbortSignal.timeout(o.timeoutMs ?? 5_000);
    const both = AbortSignal.any ? AbortSignal.any([signal, timeout]) : signal;
    const res = await f(dispatchUrl(o, net), { headers: o.headers ?? {}, signal: both });
    const text = await readBounded(res);
    if (res.status !== 200) throw new DispatchError(`dispatcher answered ${res.status}: ${text.slice(0, 200)}`, res.status);
    return parseDispatch(text);
  };
}
