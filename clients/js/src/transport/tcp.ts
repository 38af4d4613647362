// Node's TCP (node:net) and TLS (node:tls) transport: the node's client
// port speaks longlink frames directly on the byte stream.

import * as net from "node:net";
import * as tls from "node:tls";
import type { ConnectContext, Link, LinkHandlers, Transport } from "../transport.js";

export interface TcpTransportOptions {
  /** TLS for every endpoint (an endpoint may also say tls://host:port or tcp://host:port). */
  tls?: boolean | tls.ConnectionOptions;
}

/** Splits "host:port", "[v6]:port", "tls://host:port". */
export function parseEndpoint(endpoint: string): { host: string; port: number; tls?: boolean } {
  let rest = endpoint;
  let useTls: boolean | undefined;
  const scheme = /^(tcp|tls):\/\//i.exec(rest);
  if (scheme) {
    useTls = scheme[1]!.toLowerCase() === "tls";
    rest = rest.slice(scheme[0].length);
  }
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(rest) ?? /^([^:]+):(\d+)$/.exec(rest);
  if (!m) throw new Error(`endpoint ${JSON.stringify(endpoint)} is not host:port`);
  const port = Number(m[2]);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`bad port in ${JSON.stringify(endpoint)}`);
  return useTls === undefined ? { host: m[1]!, port } : { host: m[1]!, port, tls: useTls };
}

export function tcpTransport(opts: TcpTransportOptions = {}): Transport {
  return {
    connect(endpoint: string, h: LinkHandlers, _ctx: ConnectContext): Link {
      let closed = false;
      let lastError: string | undefined;
      const finish = (reason: string): void => {
        if (closed) return;
        closed = true;
        h.onClose({ reason });
      };
      let target: { host: string; port: number; tls?: boolean };
      try {
        target = parseEndpoint(endpoint);
      } catch (e) {
        queueMicrotask(() => finish((e as Error).message));
        return { send() {}, buffered: () => 0, close() {} };
      }
      const useTls = target.tls ?? Boolean(opts.tls);
      let sock: net.Socket;
      if (useTls) {
        const extra = typeof opts.tls === "object" ? opts.tls : {};
        const servername = net.isIP(target.host) ? undefined : target.host;
        sock = tls.connect({ host: target.host, port: target.port, servername, ...extra });
        sock.once("secureConnect", () => {
          if (!closed) h.onOpen();
        });
      } else {
        sock = net.connect({ host: target.host, port: target.port });
        sock.once("connect", () => {
          if (!closed) h.onOpen();
        });
      }
      sock.setNoDelay(true);
      sock.on("data", (chunk: Buffer) => {
        if (!closed) h.onData(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength));
      });
      sock.on("error", (e: Error) => {
        lastError = e.message;
      });
      sock.on("close", () => finish(lastError ?? "closed by the server"));
      return {
        send(bytes: Uint8Array) {
          if (!closed && !sock.destroyed) sock.write(bytes);
        },
        buffered: () => sock.writableLength,
        pause: () => sock.pause(),
        resume: () => sock.resume(),
        close() {
          closed = true;
          sock.destroy();
        },
      };
    },
  };
}
