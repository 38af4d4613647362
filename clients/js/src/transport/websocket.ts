// A Transport over the browser's (or Node's) global WebSocket, for the
// node's WebSocket listener (`server.ws_listen`, path /v1/ws, subprotocol
// longlink.v1). Each binary message carries whole longlink frames; the
// client still runs every payload through its frame reassembler, so a
// frame split across messages is read correctly too.

import type { ConnectContext, Link, LinkHandlers, Transport } from "../transport.js";
import { ErrorCode } from "../gen/longlink_pb.js";

export const WS_SUBPROTOCOL = "longlink.v1";
export const WS_PATH = "/v1/ws";
/** A Sec-WebSocket-Protocol entry carrying the token; the node never echoes it. */
export const WS_TOKEN_PROTOCOL_PREFIX = "longlink.token.";

export interface WebSocketTransportOptions {
  /** ws:// or wss:// for endpoints given as host:port (default: wss when the page is https, else ws). */
  secure?: boolean;
  /** Path for endpoints given as host:port (default /v1/ws). */
  path?: string;
  /**
   * Where the token also travels, because browsers cannot set headers:
   * "query" adds ?token=..., "protocol" adds a Sec-WebSocket-Protocol entry
   * made by `protocolEntry`. Default "none": the Auth frame carries it.
   */
  token?: "none" | "query" | "protocol";
  protocolEntry?: (token: string) => string;
  /** The WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: typeof WebSocket;
}

/**
 * The longlink code of a WebSocket close, if it carries one. The node
 * sends the exact code in the reason ("2003 REPLACED"), which is read
 * first: a number or a name, then a space, colon or the end. The status is
 * the fallback (proto/README.md): RFC 6455 leaves only 4000-4999 for
 * private use, so reconnect codes 1000-1499 travel as 4000 + (code - 1000)
 * and terminal codes 2000-2499 as 4500 + (code - 2000).
 */
export function decodeWsClose(wsCode: number, reason: string): number | undefined {
  const m = /^\s*([0-9]{1,5}|[A-Z][A-Z_]+)(?=$|[\s:,.;-])/.exec(reason);
  if (m) {
    const token = m[1]!;
    const n = /^[0-9]/.test(token) ? Number(token) : (ErrorCode as unknown as Record<string, number>)[token];
    if (typeof n === "number" && n >= 1000 && n <= 2999) return n;
  }
  const code = wsCode >= 4000 && wsCode <= 4499 ? 1000 + (wsCode - 4000) : wsCode >= 4500 && wsCode <= 4999 ? 2000 + (wsCode - 4500) : undefined;
  if (code !== undefined && ErrorCode[code] !== undefined) return code;
  return undefined;
}

/** Builds the URL for `endpoint` (host:port or a full ws:// / wss:// URL). */
export function webSocketUrl(endpoint: string, ctx: ConnectContext, opts: WebSocketTransportOptions = {}): string {
  let url: URL;
  if (/^wss?:\/\//i.test(endpoint)) {
    url = new URL(endpoint);
  } else {
    const pageSecure = (globalThis as { location?: { protocol?: string } }).location?.protocol === "https:";
    const scheme = (opts.secure ?? pageSecure) ? "wss" : "ws";
    url = new URL(`${scheme}://${endpoint}${opts.path ?? WS_PATH}`);
  }
  if (opts.token === "query" && ctx.token !== "") url.searchParams.set("token", ctx.token);
  return url.toString();
}

export function webSocketTransport(opts: WebSocketTransportOptions = {}): Transport {
  return {
    connect(endpoint: string, h: LinkHandlers, ctx: ConnectContext): Link {
      const Ctor = opts.WebSocket ?? globalThis.WebSocket;
      let closed = false;
      const finish = (info: { reason: string; code?: number }): void => {
        if (closed) return;
        closed = true;
        h.onClose(info);
      };
      if (Ctor === undefined) {
        queueMicrotask(() => finish({ reason: "no WebSocket implementation in this environment" }));
        return { send() {}, buffered: () => 0, close() {} };
      }
      const protocols = [WS_SUBPROTOCOL];
      if (opts.token === "protocol" && ctx.token !== "") {
        protocols.push((opts.protocolEntry ?? ((t: string) => `${WS_TOKEN_PROTOCOL_PREFIX}${t}`))(ctx.token));
      }
      let ws: WebSocket;
      try {
        ws = new Ctor(webSocketUrl(endpoint, ctx, opts), protocols);
      } catch (e) {
        queueMicrotask(() => finish({ reason: (e as Error).message }));
        return { send() {}, buffered: () => 0, close() {} };
      }
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        if (!closed) h.onOpen();
      };
      ws.onmessage = (ev: MessageEvent) => {
        if (closed) return;
        if (ev.data instanceof ArrayBuffer) h.onData(new Uint8Array(ev.data));
        else {
          // Text messages are not longlink frames.
          ws.close(1003, "binary frames only");
          finish({ reason: "text message from the server" });
        }
      };
      ws.onerror = () => {
        // A failed connection (handshake refused, network error). A close
        // frame from the server (with its code) comes as onclose, not here;
        // some implementations never follow an error with onclose.
        finish({ reason: "websocket error" });
        try {
          ws.close();
        } catch {
          // already closed
        }
      };
      ws.onclose = (ev: CloseEvent) => {
        const code = decodeWsClose(ev.code, ev.reason);
        const reason = ev.reason || (ev.wasClean ? "closed by the server" : `connection closed (${ev.code})`);
        finish(code !== undefined ? { reason, code } : { reason });
      };
      return {
        send(bytes: Uint8Array) {
          if (!closed && ws.readyState === 1) ws.send(bytes);
        },
        buffered: () => ws.bufferedAmount,
        close() {
          closed = true;
          try {
            ws.close(1000);
          } catch {
            // already closing
          }
        },
      };
    },
  };
}
