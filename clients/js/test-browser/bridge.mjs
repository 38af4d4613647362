// A WebSocket (ws:// or wss://) to TCP bridge in front of a node's client
// port, for running the browser test before the node has its own WebSocket
// listener. It checks the path and the longlink.v1 subprotocol, records the
// token the browser sent, and relays whole WebSocket messages both ways.

import { createServer } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { createHash } from "node:crypto";
import * as net from "node:net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

function wsFrame(opcode, payload) {
  const len = payload.length;
  let head;
  if (len < 126) head = Buffer.from([0x80 | opcode, len]);
  else if (len < 65536) {
    head = Buffer.alloc(4);
    head[0] = 0x80 | opcode;
    head[1] = 126;
    head.writeUInt16BE(len, 2);
  } else {
    head = Buffer.alloc(10);
    head[0] = 0x80 | opcode;
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(len), 2);
  }
  return Buffer.concat([head, payload]);
}

/** `tls`: { key, cert } for wss://. */
export async function bridge(target, tls) {
  const seen = { urls: [], protocols: [], sessions: 0 };
  const handler = (_req, res) => res.writeHead(404).end();
  const server = tls ? createHttpsServer(tls, handler) : createServer(handler);
  server.on("upgrade", (req, socket) => {
    seen.urls.push(req.url);
    const offered = String(req.headers["sec-websocket-protocol"] ?? "").split(",").map((s) => s.trim());
    seen.protocols.push(offered);
    if (!req.url.startsWith("/v1/ws") || !offered.includes("longlink.v1")) {
      socket.end("HTTP/1.1 400 Bad Request\r\n\r\n");
      return;
    }
    const accept = createHash("sha1").update(req.headers["sec-websocket-key"] + GUID).digest("base64");
    socket.write(
      `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\nSec-WebSocket-Protocol: longlink.v1\r\n\r\n`,
    );
    seen.sessions += 1;
    const [h, p] = target.split(":");
    const tcp = net.connect(Number(p), h);
    tcp.on("data", (d) => socket.write(wsFrame(0x2, d)));
    tcp.on("close", () => socket.end(wsFrame(0x8, Buffer.from([0x03, 0xe8]))));
    tcp.on("error", () => {});
    socket.on("error", () => {});
    socket.on("close", () => tcp.destroy());
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
          socket.end(wsFrame(0x8, Buffer.from([0x03, 0xe8])));
          tcp.destroy();
        }
      }
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const addr = `127.0.0.1:${server.address().port}`;
  return {
    addr,
    seen,
    stop: () => {
      server.close();
      server.closeAllConnections?.();
    },
  };
}
