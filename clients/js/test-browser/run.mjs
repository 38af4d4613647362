// Runs the browser test with node --test (extra arguments, e.g.
// --test-name-pattern=ws, go before the file), bounded as a whole.
import { spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const file = join(dirname(fileURLToPath(import.meta.url)), "browser.test.mjs");
const args = ["--test", "--test-concurrency=1", "--test-force-exit", ...process.argv.slice(2), file];
const r = spawnSync(process.execPath, args, { stdio: "inherit", timeout: 10 * 60_000, killSignal: "SIGKILL" });
if (r.error) console.error(`browser test run failed: ${r.error.message}`);
process.exit(r.status ?? 1);
