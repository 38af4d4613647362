// The seam between the client and the network. A Transport opens one Link
// per connection attempt and reports bytes and closes through handlers; the
// client reassembles frames from whatever chunks arrive (TCP reads or
// WebSocket messages alike).

export interface LinkHandlers {
  /** The link is up (TCP connected, TLS handshake done, WebSocket open). */
  onOpen(): void;
  /** Bytes arrived (any chunking: frames are reassembled by the client). */
  onData(chunk: Uint8Array): void;
  /**
   * The link closed or failed. `code` is a longlink ErrorCode when the
   * transport carries one (a WebSocket close with code 4000 + longlink code).
   * Called at most once.
   */
  onClose(info: { reason: string; code?: number }): void;
}

export interface Link {
  send(bytes: Uint8Array): void;
  /** Bytes accepted by send() but not yet written to the network. */
  buffered(): number;
  /** Stop reading (backpressure from a slow handler); optional. */
  pause?(): void;
  resume?(): void;
  /** Closes at once; no onClose callback is needed after it. */
  close(): void;
}

export interface ConnectContext {
  /** The token the Auth frame will carry (a WebSocket transport may also pass it in the URL). */
  token: string;
}

export interface Transport {
  connect(endpoint: string, handlers: LinkHandlers, ctx: ConnectContext): Link;
}
