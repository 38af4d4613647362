//! `longlink request`, `client`, `sdk`: a client from the command line.

use crate::*;

pub(crate) fn run_request(
    server: SocketAddr,
    token: String,
    service: String,
    timeout: Duration,
    body: String,
) -> anyhow::Result<ExitCode> {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .make()
        .map_err(|e| anyhow::anyhow!("starting the client executor: {e}"))?;
    ex.run(async move {
        let answer = match Connection::connect(server, ClientOptions::new(token)).await {
            Ok((mut conn, _)) => {
                let answer = conn.request(&service, bytes::Bytes::from(body), timeout).await;
                conn.close().await;
                answer
            }
            Err(err) => Err(err),
        };
        match answer {
            Ok(r) => {
                emit(response_json(&r));
                Ok(if r.status == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
            }
            Err(err) => {
                emit(close_event(&err));
                Ok(ExitCode::from(1))
            }
        }
    })
}

pub(crate) fn response_json(r: &proto::Response) -> serde_json::Value {
    json!({
        "event": "response",
        "request_id": r.request_id,
        "status": if r.status == 0 { "OK" } else { codes::from_wire(r.status).as_str_name() },
        "body": String::from_utf8_lossy(&r.body),
        "reason": non_empty(&r.reason),
    })
}

pub(crate) fn run_client(server: SocketAddr, opts: ClientOptions) -> anyhow::Result<ExitCode> {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .make()
        .map_err(|e| anyhow::anyhow!("starting the client executor: {e}"))?;
    ex.run(async move {
        let (mut last_seq, mut store_incarnation) = (opts.last_seq, opts.store_incarnation);
        let result = match Connection::connect(server, opts).await {
            Ok((mut conn, ok)) => {
                emit(json!({
                    "event": "connected",
                    "conn_id": ok.conn_id,
                    "shard": ok.shard,
                    "node": ok.node,
                    "heartbeat_ms": ok.heartbeat_ms,
                    "idle_timeout_ms": ok.idle_timeout_ms,
                    "server_time_ms": ok.server_time_ms,
                    "store_incarnation": ok.store_incarnation,
                }));
                loop {
                    match conn.next_event().await {
                        Ok(ClientEvent::Pong { rtt_ms }) => emit(json!({"event": "pong", "rtt_ms": rtt_ms})),
                        Ok(ClientEvent::GoAway { endpoint, reason }) => {
                            emit(json!({"event": "go_away", "endpoint": endpoint, "reason": reason}))
                        }
                        Ok(ClientEvent::Message(m)) => emit(json!({
                            "event": "message",
                            "message_id": m.message_id,
                            "seq": m.seq,
                            "service_id": m.service_id,
                            "payload": String::from_utf8_lossy(&m.payload),
                        })),
                        Ok(ClientEvent::Response(r)) => emit(response_json(&r)),
                        Ok(ClientEvent::ResyncRequired { from_seq, to_seq }) => {
                            emit(json!({"event": "resync_required", "from_seq": from_seq, "to_seq": to_seq}))
                        }
                        Ok(ClientEvent::Connected(_)) => {}
                        Ok(ClientEvent::Refreshed { token_expires_ms }) => {
                            emit(json!({"event": "token_refreshed", "token_expires_ms": token_expires_ms}))
                        }
                        Ok(ClientEvent::GroupResult(r)) => emit(json!({
                            "event": "group_result",
                            "group": r.group,
                            "join": r.join,
                            "code": if r.code == 0 { "OK" } else { codes::from_wire(r.code).as_str_name() },
                            "reason": non_empty(&r.reason),
                        })),
                        Err(err) => {
                            last_seq = conn.last_seq();
                            store_incarnation = conn.store_incarnation();
                            break err;
                        }
                    }
                }
            }
            Err(err) => err,
        };
        let mut close = close_event(&result);
        // Printed so a later run can resume with --last-seq and
        // --store-incarnation.
        close["last_seq"] = json!(last_seq);
        close["store_incarnation"] = json!(store_incarnation);
        emit(close);
        if result.reconnect_allowed() { Ok(ExitCode::SUCCESS) } else { Ok(ExitCode::from(1)) }
    })
}

#[derive(Args)]
pub(crate) struct SdkArgs {
    /// host:port of a node's client port; repeat for drift (tried in order).
    #[arg(long = "endpoint")]
    pub(crate) endpoints: Vec<String>,
    /// host:port of a dispatcher: endpoints and token come from it (the
    /// --endpoint list is the fallback).
    #[arg(long)]
    pub(crate) dispatcher: Option<String>,
    /// Connect token (not needed with --dispatcher).
    #[arg(long, default_value = "")]
    pub(crate) token: String,
    /// User and device sent to the dispatcher.
    #[arg(long, default_value = "")]
    pub(crate) uid: String,
    /// Login ticket for the dispatcher (single use).
    #[arg(long, default_value = "")]
    pub(crate) ticket: String,
    /// Credential for the dispatcher's auth hook, sent as the Authorization
    /// header.
    #[arg(long, env = "LONGLINK_DISPATCH_AUTHORIZATION", default_value = "", hide_env_values = true)]
    pub(crate) authorization: String,
    #[arg(long, default_value = "")]
    pub(crate) device: String,
    #[arg(long, default_value = "cli")]
    pub(crate) platform: String,
    /// Resume after this at-least-once sequence.
    #[arg(long, default_value_t = 0)]
    pub(crate) last_seq: u64,
    /// The store incarnation seen with that sequence (see `client`).
    #[arg(long, default_value_t = 0)]
    pub(crate) store_incarnation: u64,
}

pub(crate) fn run_sdk(args: SdkArgs) -> anyhow::Result<ExitCode> {
    use longlink::sdk::{AgentConfig, BlockingClient, ClientConfig, DispatcherConfig, Event, NextError};
    let mut opts = ClientOptions::new(args.token);
    opts.platform = args.platform.clone();
    opts.last_seq = args.last_seq;
    opts.store_incarnation = args.store_incarnation;
    let mut agent = AgentConfig::new(opts);
    agent.endpoints = args.endpoints;
    let dispatcher = args.dispatcher.map(|addr| DispatcherConfig {
        platform: args.platform,
        ticket: args.ticket,
        authorization: args.authorization,
        ..DispatcherConfig::new(addr, args.uid, args.device)
    });
    if agent.endpoints.is_empty() && dispatcher.is_none() {
        bail!("give --endpoint or --dispatcher");
    }
    let client = BlockingClient::start(ClientConfig { agent, dispatcher, token_refresher: None })?;
    loop {
        let ev = match client.next_event(Duration::from_secs(3600)) {
            Ok(ev) => ev,
            Err(NextError::Timeout) => continue,
            Err(NextError::Stopped) => break,
        };
        match ev {
            Event::Connected { endpoint, auth_ok } => emit(json!({
                "event": "connected", "endpoint": endpoint, "conn_id": auth_ok.conn_id, "node": auth_ok.node,
                "heartbeat_ms": auth_ok.heartbeat_ms, "store_incarnation": auth_ok.store_incarnation,
            })),
            Event::Message(m) => {
                emit(json!({
                    "event": "message", "message_id": m.message_id, "seq": m.seq, "service_id": m.service_id,
                    "payload": String::from_utf8_lossy(&m.payload),
                }));
                acknowledge(&client, m.seq)?;
            }
            Event::ResyncRequired { from_seq, to_seq } => {
                emit(json!({"event": "resync_required", "from_seq": from_seq, "to_seq": to_seq}));
                acknowledge(&client, to_seq)?;
            }
            Event::Response { result: Ok(r), .. } => emit(response_json(&r)),
            Event::Response { id, result: Err(e) } => {
                emit(json!({"event": "response", "request_id": id.0, "error": e.to_string()}))
            }
            Event::Kicked { code, reason } => {
                emit(json!({"event": "kicked", "code": code.as_str_name(), "reason": reason}))
            }
            Event::TokenExpiring { token_expires_ms } => {
                emit(json!({"event": "token_expiring", "token_expires_ms": token_expires_ms}))
            }
            Event::TokenRefreshed { token_expires_ms } => {
                emit(json!({"event": "token_refreshed", "token_expires_ms": token_expires_ms}))
            }
            Event::TokenRefreshFailed(why) => emit(json!({"event": "token_refresh_failed", "reason": why})),
            Event::Disconnected { reason, retry_in_ms } => {
                emit(json!({
                    "event": "disconnected", "code": reason.code().map(|c| c.as_str_name()),
                    "reason": reason.to_string(), "retry_in_ms": retry_in_ms,
                }));
            }
        }
    }
    // The client stops only after a terminal code.
    Ok(ExitCode::from(1))
}

/// Marks `seq` handled. A client that already stopped (e.g. kicked right
/// after the message arrived) is not an error here: the events still queued
/// say why it stopped.
pub(crate) fn acknowledge(client: &longlink::sdk::BlockingClient, seq: u64) -> anyhow::Result<()> {
    match client.message_handled(seq) {
        Ok(()) | Err(longlink::sdk::SdkError::Stopped(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn close_event(err: &ClientError) -> serde_json::Value {
    let kind = match err {
        ClientError::Kicked { .. } => "kicked",
        _ => "closed",
    };
    json!({
        "event": kind,
        "code": err.code().map(|c| c.as_str_name()),
        "reason": err.to_string(),
        "reconnect": err.reconnect_allowed(),
    })
}
