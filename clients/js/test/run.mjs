// Runs the test files with node --test, one file at a time. Node 20 needs
// --experimental-websocket for the global WebSocket the WebSocket
// transport test uses (Node 22 has it by default).
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const dir = dirname(fileURLToPath(import.meta.url));
const files = readdirSync(dir).filter((f) => f.endsWith(".test.mjs")).sort().map((f) => join(dir, f));
// --test-force-exit: a test that timed out must not leave its file's
// process running (a client still reconnecting keeps the event loop alive);
// the harness kills the processes it started on exit.
const args = ["--test", "--test-concurrency=1", "--test-force-exit", ...process.argv.slice(2), ...files];
if (typeof globalThis.WebSocket === "undefined") args.unshift("--experimental-websocket");
// The whole suite is bounded too.
const r = spawnSync(process.execPath, args, { stdio: "inherit", timeout: 15 * 60_000, killSignal: "SIGKILL" });
if (r.error) console.error(`test run failed: ${r.error.message}`);
process.exit(r.status ?? 1);
