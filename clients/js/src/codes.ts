// Error and close codes: the same classification as src/codes.rs. Known
// codes 1000-1999 allow a reconnect (with backoff), 2000-2999 are terminal.
// A code this build does not know (or 0) is treated like SERVER_ERROR
// (reconnect), exactly as the Rust SDK does (`codes::from_wire` then
// `codes::info`). Error frames carry their own `reconnect` flag, which wins.

import { ErrorCode } from "./gen/longlink_pb.js";

export { ErrorCode };

/** Whether a client may reconnect after `code` (Kicked frames; Error frames carry their own flag). */
export function reconnectAllowed(code: number): boolean {
  if (ErrorCode[code] === undefined || code === ErrorCode.ERROR_CODE_UNSPECIFIED) return true;
  return code >= 1000 && code < 2000;
}

/** The code's name (e.g. "REPLACED"), or its number for one this build does not know. */
export function codeName(code: number): string {
  return ErrorCode[code] ?? String(code);
}
