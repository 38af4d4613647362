// Runs the test files with node --test, one file at a time. Node 20 needs
// --experimental-websocket for the global WebSocket the WebSocket
// transport test uses (Node 22 has it by default).
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const dir = dirname(fileURLToPath(import.meta.url));
const files = readdirSync(dir).filter((f) => f.endsWith(".test.mjs")).sort().map((f) => join(dir, f));
const args = ["--test", "--test-concurrency=1", ...process.argv.slice(2), ...files];
if (typeof globalThis.WebSocket === "undefined") args.unshift("--experimental-websocket");
const r = spawnSync(process.execPath, args, { stdio: "inherit" });
process.exit(r.status ?? 1);
