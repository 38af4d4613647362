// The 8-byte frame header (proto/README.md, "Frame layout") around a
// protobuf body, and a reassembler that turns a byte stream (TCP chunks or
// WebSocket messages) into whole frames.

import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { DescMessage, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import { FrameKind } from "./gen/longlink_pb.js";

export const MAGIC = 0x4c;
export const VERSION = 0x01;
export const HEADER_LEN = 8;
/** Header flag bit 0: the frame repeats one sent before. */
export const FLAG_RETRANSMISSION = 0x01;
/** The node's default `max_frame_bytes`. */
export const DEFAULT_MAX_BODY = 64 * 1024;

/** One frame as read from the wire: the body is still encoded. */
export interface RawFrame {
  kind: FrameKind;
  flags: number;
  body: Uint8Array;
}

/** Why the stream cannot be read any further (the link must close). */
export class FrameError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "FrameError";
  }
}

/** Encodes one frame: header plus the body bytes. */
export function encodeRaw(kind: FrameKind, body: Uint8Array, flags = 0): Uint8Array {
  const out = new Uint8Array(HEADER_LEN + body.length);
  out[0] = MAGIC;
  out[1] = VERSION;
  out[2] = kind;
  out[3] = flags & 0xff;
  new DataView(out.buffer).setUint32(4, body.length, false);
  out.set(body, HEADER_LEN);
  return out;
}

/** Encodes one frame whose body is a message of `schema`. */
export function encodeFrame<Desc extends DescMessage>(
  kind: FrameKind,
  schema: Desc,
  init: MessageInitShape<Desc>,
  flags = 0,
): Uint8Array {
  return encodeRaw(kind, toBinary(schema, create(schema, init)), flags);
}

/** Decodes a frame body; a body that does not decode is a FrameError. */
export function decodeBody<Desc extends DescMessage>(schema: Desc, body: Uint8Array): MessageShape<Desc> {
  try {
    return fromBinary(schema, body);
  } catch (e) {
    throw new FrameError(`${schema.typeName} does not decode: ${(e as Error).message}`);
  }
}

/**
 * Collects bytes and yields whole frames. The announced length is checked
 * against `maxBody` from the header, before anything is buffered for it; the
 * buffer never holds more than one frame plus one read.
 */
export class FrameReader {
  private buf: Uint8Array = new Uint8Array(0);
  private start = 0;
  private end = 0;

  constructor(private readonly maxBody: number = DEFAULT_MAX_BODY) {}

  /** Appends a chunk (a TCP read or a WebSocket message). */
  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    if (this.end + chunk.length > this.buf.length) {
      const live = this.end - this.start;
      if (live + chunk.length <= this.buf.length && this.start > 0) {
        this.buf.copyWithin(0, this.start, this.end);
      } else {
        const grown = new Uint8Array(Math.max(live + chunk.length, this.buf.length * 2, 4096));
        grown.set(this.buf.subarray(this.start, this.end));
        this.buf = grown;
      }
      this.start = 0;
      this.end = live;
    }
    this.buf.set(chunk, this.end);
    this.end += chunk.length;
  }

  /** Bytes held that do not make a whole frame yet. */
  get buffered(): number {
    return this.end - this.start;
  }

  /** The next whole frame, or undefined until more bytes arrive. Throws FrameError. */
  next(): RawFrame | undefined {
    const avail = this.end - this.start;
    if (avail < HEADER_LEN) return undefined;
    const b = this.buf;
    const s = this.start;
    if (b[s] !== MAGIC) throw new FrameError(`bad magic 0x${b[s]!.toString(16)}`);
    if (b[s + 1] !== VERSION) throw new FrameError(`unsupported version ${b[s + 1]}`);
    const kind = b[s + 2]!;
    const flags = b[s + 3]!;
    const len = new DataView(b.buffer, b.byteOffset + s + 4, 4).getUint32(0, false);
    if (len > this.maxBody) throw new FrameError(`frame body of ${len} bytes exceeds the limit of ${this.maxBody}`);
    if (kind === 0 || FrameKind[kind] === undefined) throw new FrameError(`unknown frame kind ${kind}`);
    if (avail < HEADER_LEN + len) return undefined;
    // A copy: the buffer is reused.
    const body = b.slice(s + HEADER_LEN, s + HEADER_LEN + len);
    this.start += HEADER_LEN + len;
    if (this.start === this.end) this.start = this.end = 0;
    return { kind: kind as FrameKind, flags, body };
  }
}
