#!/usr/bin/env node
// A tiny static server for the demo page: the page itself (demo/), the
// built client (dist/, as browser ESM under /client/) and @bufbuild/protobuf
// (its ESM build under /vendor/protobuf/, found by the page's import map).
// Nothing else is served: every path maps into one of those three folders
// and is checked to stay inside it.
//
//   node demo/serve.mjs [--listen 127.0.0.1:8104]
//
// Prints `demo http://ADDR/` once listening (tests read that line), then
// serves until SIGINT/SIGTERM. Only for trying longlink out: it has no
// authentication and binds to loopback unless told otherwise.

import { createServer } from "node:http";
import { createReadStream, existsSync, statSync } from "node:fs";
import { dirname, extname, join, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, "..");

function usage(msg) {
  if (msg) console.error(`serve.mjs: ${msg}`);
  console.error("usage: node demo/serve.mjs [--listen HOST:PORT]   (default 127.0.0.1:8104; port 0 picks one)");
  process.exit(2);
}

let listen = process.env.LONGLINK_DEMO_LISTEN ?? "127.0.0.1:8104";
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === "--listen" && i + 1 < argv.length) listen = argv[++i];
  else if (argv[i] === "-h" || argv[i] === "--help") usage();
  else usage(`unknown argument ${argv[i]}`);
}
const m = /^(.*):(\d{1,5})$/.exec(listen);
if (!m || Number(m[2]) > 65535) usage(`--listen wants HOST:PORT, got ${JSON.stringify(listen)}`);
const host = m[1].replace(/^\[(.*)\]$/, "$1");
const port = Number(m[2]);

const dist = join(pkg, "dist");
if (!existsSync(join(dist, "index.js"))) {
  console.error(`serve.mjs: ${dist}/index.js is missing: run \`npm ci\` (or \`npm run build\`) in ${pkg} first`);
  process.exit(1);
}
let protobuf;
try {
  // .../node_modules/@bufbuild/protobuf/dist/esm/index.js
  protobuf = dirname(createRequire(join(pkg, "package.json")).resolve("@bufbuild/protobuf").replace(`${sep}cjs${sep}`, `${sep}esm${sep}`));
} catch {
  console.error(`serve.mjs: @bufbuild/protobuf is not installed: run \`npm ci\` in ${pkg} first`);
  process.exit(1);
}

// URL prefix -> folder. The first match wins.
const roots = [
  ["/client/", dist],
  ["/vendor/protobuf/", protobuf],
  ["/", here],
];

const types = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".ts": "text/plain; charset=utf-8",
  ".ico": "image/x-icon",
};

/** The file for a request path, or undefined (never outside its root). */
function fileFor(pathname) {
  if (pathname === "/") pathname = "/index.html";
  for (const [prefix, dir] of roots) {
    if (!pathname.startsWith(prefix)) continue;
    let rel;
    try {
      rel = decodeURIComponent(pathname.slice(prefix.length));
    } catch {
      return undefined;
    }
    if (rel.includes("\0")) return undefined;
    const file = resolve(dir, rel);
    if (!file.startsWith(dir + sep)) return undefined;
    // The server's own source is not part of the page.
    if (dir === here && file === fileURLToPath(import.meta.url)) return undefined;
    return file;
  }
  return undefined;
}

const server = createServer((req, res) => {
  const send = (status, text) => {
    res.writeHead(status, { "content-type": "text/plain; charset=utf-8" }).end(`${text}\n`);
  };
  if (req.method !== "GET" && req.method !== "HEAD") return send(405, "method not allowed");
  let url;
  try {
    url = new URL(req.url ?? "/", "http://demo");
  } catch {
    return send(400, "bad request");
  }
  const file = fileFor(url.pathname);
  let st;
  try {
    st = file && statSync(file);
  } catch {
    st = undefined;
  }
  if (!st || !st.isFile()) return send(404, "not found");
  res.writeHead(200, {
    "content-type": types[extname(file)] ?? "application/octet-stream",
    "content-length": st.size,
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
  });
  if (req.method === "HEAD") return res.end();
  const stream = createReadStream(file);
  stream.on("error", () => res.destroy());
  stream.pipe(res);
});
server.requestTimeout = 10_000;
server.headersTimeout = 5_000;
server.on("error", (e) => {
  console.error(`serve.mjs: ${e.message}`);
  process.exit(1);
});
server.listen(port, host, () => {
  const a = server.address();
  const shown = a.family === "IPv6" ? `[${a.address}]` : a.address;
  console.log(`demo http://${shown}:${a.port}/`);
});
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => server.close(() => process.exit(0)).closeAllConnections());
