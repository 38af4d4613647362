// @longlink/client: the browser-safe entry (no node: imports). Node users
// take tcpTransport from "@longlink/client/node".

export { LonglinkClient, RequestError, CLIENT_VERSION } from "./client.js";
export type { ClientOptions, ClientEvent, ResyncRange } from "./client.js";
export { Agent, SdkError, describeDisconnect, disconnectCode, reconnectAllowedAfter, MAX_ID_BYTES } from "./agent.js";
export type { Action, AgentConfig, AgentEvent, Disconnect, Dispatch, RequestFailure } from "./agent.js";
export { reconnectAllowed, codeName } from "./codes.js";
export { httpLookup, dispatchUrl, parseDispatch, DispatchError } from "./dispatch.js";
export type { DispatcherOptions, LookupFn } from "./dispatch.js";
export { FrameReader, FrameError, encodeFrame, encodeRaw, decodeBody, FLAG_RETRANSMISSION, DEFAULT_MAX_BODY, HEADER_LEN } from "./frame.js";
export type { RawFrame } from "./frame.js";
export { Backoff, Endpoints, Rng, SmartHeartbeat } from "./policy.js";
export type { Transport, Link, LinkHandlers, ConnectContext } from "./transport.js";
export { webSocketTransport, webSocketUrl, decodeWsClose, WS_PATH, WS_SUBPROTOCOL } from "./transport/websocket.js";
export type { WebSocketTransportOptions } from "./transport/websocket.js";
export * as pb from "./gen/longlink_pb.js";
export { ErrorCode, FrameKind } from "./gen/longlink_pb.js";
export type { AuthOk, Message, Response } from "./gen/longlink_pb.js";
