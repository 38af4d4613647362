// @longlink/client/node: everything in the main entry plus the Node TCP/TLS transport.

export * from "./index.js";
export { tcpTransport, parseEndpoint } from "./transport/tcp.js";
export type { TcpTransportOptions } from "./transport/tcp.js";
