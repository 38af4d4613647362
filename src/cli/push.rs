//! `longlink push`, `status`, `group`, `kick`, `online`: the push port
//! from the command line.

use crate::*;

/// Where the push-port commands connect, and with which push key.
#[derive(Args)]
pub(crate) struct PushPort {
    /// host:port of a node's push port.
    #[arg(long, default_value = "127.0.0.1:7101")]
    pub(crate) server: String,
    /// The push key as `id:hexsecret` (prefer the env var or a file: a
    /// flag shows in `ps`). Overrides --key-file.
    #[arg(long, env = "LONGLINK_PUSH_KEY", hide_env_values = true, value_name = "ID:HEX")]
    pub(crate) key: Option<String>,
    /// File holding the push key (`id:hexsecret`, mode 0600). The default
    /// is the dev push key of a node started in this directory.
    #[arg(long, env = "LONGLINK_PUSH_KEY_FILE", default_value = ".longlink/push-key")]
    pub(crate) key_file: std::path::PathBuf,
    /// Connect over TLS (a node's push.tls_listen) and verify the node's
    /// certificate against --ca before the key is used.
    #[arg(long, env = "LONGLINK_PUSH_TLS", requires = "ca")]
    pub(crate) tls: bool,
    /// PEM file with the CA certificates that sign the node's certificate
    /// (with --tls).
    #[arg(long, env = "LONGLINK_PUSH_CA", value_name = "FILE", requires = "tls")]
    pub(crate) ca: Option<std::path::PathBuf>,
    /// Name the node's certificate must carry (with --tls). Default: the
    /// host part of --server.
    #[arg(long, env = "LONGLINK_PUSH_SERVER_NAME", value_name = "NAME", requires = "tls")]
    pub(crate) server_name: Option<String>,
}

impl PushPort {
    fn credential(&self) -> anyhow::Result<longlink::backend::PushKey> {
        match &self.key {
            Some(text) => longlink::push::auth::parse_credential(text)
                .map_err(|why| anyhow::anyhow!("--key / LONGLINK_PUSH_KEY: {why}")),
            None => longlink::protocol::token::read_key_file(&self.key_file)
                .map_err(|e| anyhow::anyhow!("reading the push key (--key-file {}): {e}", self.key_file.display())),
        }
    }

    /// With --tls: the CA and the name to verify the node against.
    fn tls(&self) -> anyhow::Result<Option<longlink::backend::PushTls>> {
        let Some(ca) = self.ca.as_deref().filter(|_| self.tls) else { return Ok(None) };
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => host_of(&self.server).to_owned(),
        };
        longlink::backend::PushTls::from_ca_file(ca, &name)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--ca {} / --server-name {name:?}: {e}", ca.display()))
    }
}

/// The host of `host:port` (`[v6]:port` too), for the certificate name.
fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(host, _)| host);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// How long the push-port commands wait for the TCP connection.
pub(crate) const PUSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long they wait for the node's reply.
pub(crate) const PUSH_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).args(["device", "user", "group", "all"])))]
pub(crate) struct PushArgs {
    #[command(flatten)]
    pub(crate) port: PushPort,
    /// Device id; repeat the flag or separate ids with commas for several.
    #[arg(long, value_name = "DEVICE", value_delimiter = ',')]
    pub(crate) device: Vec<String>,
    /// User id (every online device of the user); repeatable, comma-separated.
    #[arg(long, value_name = "USER", value_delimiter = ',')]
    pub(crate) user: Vec<String>,
    /// Group id: every online member of the group.
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// Broadcast to every session on the node (delivered at the node's pace).
    #[arg(long)]
    pub(crate) all: bool,
    /// Service id the client sees on the message (which business sent it).
    #[arg(long, value_name = "SERVICE")]
    pub(crate) service: Option<String>,
    /// How long the message stays deliverable, in ms; 0 means no limit.
    #[arg(long, default_value_t = 0)]
    pub(crate) ttl_ms: u32,
    /// Delivery guarantee. at-least-once (devices and users only) stores the
    /// message in each device's timeline first; the result says STORED with
    /// the copy's seq and message_id.
    #[arg(long, value_enum, default_value_t = QosArg::AtMostOnce)]
    pub(crate) qos: QosArg,
    /// The message; its UTF-8 bytes are the payload.
    pub(crate) message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum QosArg {
    AtMostOnce,
    AtLeastOnce,
}

#[derive(Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub(crate) port: PushPort,
    /// Message ids (from `longlink push --qos at-least-once`).
    #[arg(required = true, value_delimiter = ',')]
    pub(crate) message_ids: Vec<u64>,
}

#[derive(Subcommand)]
pub(crate) enum GroupCommand {
    /// Add devices to a group; prints one JSON line per device.
    Join(GroupArgs),
    /// Remove devices from a group; prints one JSON line per device.
    Leave(GroupArgs),
}

#[derive(Args)]
pub(crate) struct GroupArgs {
    #[command(flatten)]
    pub(crate) port: PushPort,
    /// Group id.
    #[arg(long)]
    pub(crate) group: String,
    /// Device ids (also accepted comma-separated).
    #[arg(required = true, value_delimiter = ',')]
    pub(crate) devices: Vec<String>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).args(["device", "user"])))]
pub(crate) struct KickArgs {
    #[command(flatten)]
    pub(crate) port: PushPort,
    /// Device id; repeatable, comma-separated.
    #[arg(long, value_name = "DEVICE", value_delimiter = ',')]
    pub(crate) device: Vec<String>,
    /// User id (every session of the user); repeatable, comma-separated.
    #[arg(long, value_name = "USER", value_delimiter = ',')]
    pub(crate) user: Vec<String>,
    /// Code sent to the clients, by name: KICKED or REPLACED tell them not
    /// to reconnect, SHUTDOWN or GOING_AWAY let them come back.
    #[arg(long, default_value = "KICKED", value_parser = parse_error_code)]
    pub(crate) code: ErrorCode,
    /// Reason text sent to the clients.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub(crate) reason: String,
}

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).multiple(true).args(["device", "user"])))]
pub(crate) struct RevokeArgs {
    #[command(flatten)]
    pub(crate) port: PushPort,
    /// Device id; repeatable, comma-separated.
    #[arg(long, value_name = "DEVICE", value_delimiter = ',')]
    pub(crate) device: Vec<String>,
    /// User id; repeatable, comma-separated.
    #[arg(long, value_name = "USER", value_delimiter = ',')]
    pub(crate) user: Vec<String>,
    /// Reason text sent to the clients kicked.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub(crate) reason: String,
}

#[derive(Args)]
pub(crate) struct OnlineArgs {
    #[command(flatten)]
    pub(crate) port: PushPort,
    /// Device id to look up; repeatable, comma-separated.
    #[arg(long, value_name = "DEVICE", value_delimiter = ',')]
    pub(crate) device: Vec<String>,
    /// User id to look up (lists the user's online devices); repeatable, comma-separated.
    #[arg(long, value_name = "USER", value_delimiter = ',')]
    pub(crate) user: Vec<String>,
    /// Group id to count online members of; repeatable, comma-separated.
    #[arg(long, value_name = "GROUP", value_delimiter = ',')]
    pub(crate) group: Vec<String>,
}

/// Connects to the push port, runs `call`, and turns a connection or
/// protocol failure into exit status 1 (clap's usage errors exit with 2).
pub(crate) fn with_push_port(
    port: &PushPort,
    call: impl FnOnce(&mut PushClient) -> Result<(), BackendError>,
) -> anyhow::Result<ExitCode> {
    let key = port.credential()?;
    let tls = port.tls()?;
    let connected = PushClient::connect_with(port.server.as_str(), PUSH_CONNECT_TIMEOUT, &key, tls.as_ref());
    let result = connected.and_then(|mut client| {
        client.set_read_timeout(Some(PUSH_REPLY_TIMEOUT))?;
        call(&mut client)
    });
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            eprintln!("error: push port {}: {err}", port.server);
            Ok(ExitCode::from(1))
        }
    }
}

pub(crate) fn push(client: &mut PushClient, args: &PushArgs) -> Result<(), BackendError> {
    let per_target = !args.device.is_empty() || !args.user.is_empty();
    let targets = proto::Targets {
        devices: args.device.clone(),
        users: args.user.clone(),
        group: args.group.clone().unwrap_or_default(),
        broadcast: args.all,
    };
    let qos = match args.qos {
        QosArg::AtMostOnce => proto::Qos::AtMostOnce,
        QosArg::AtLeastOnce => proto::Qos::AtLeastOnce,
    };
    let reply = client.push_request(proto::PushRequest {
        request_id: 0,
        targets: Some(targets),
        payload: bytes::Bytes::copy_from_slice(args.message.as_bytes()),
        service_id: args.service.clone().unwrap_or_default(),
        ttl_ms: args.ttl_ms,
        qos: qos as i32,
        forwarded: false,
    })?;
    if per_target {
        reply.results.iter().for_each(|r| emit(target_result_json(r)));
    } else {
        let mut line = json!({
            "status": push_status_name(reply.status),
            "delivered": reply.delivered,
            "not_online": reply.not_online,
            "message_id": reply.message_id,
            "reason": non_empty(&reply.reason),
        });
        if reply.status == proto::PushStatus::Rejected as i32 {
            line["retryable"] = json!(reply.retryable);
        }
        emit(line);
    }
    Ok(())
}

pub(crate) fn target_result_json(r: &proto::TargetResult) -> serde_json::Value {
    let mut line = json!({
        "target": r.target,
        "status": push_status_name(r.status),
        "sessions": r.sessions,
        "reason": non_empty(&r.reason),
    });
    if r.status == proto::PushStatus::Rejected as i32 {
        // Whether sending the same push again may succeed.
        line["retryable"] = json!(r.retryable);
    }
    if r.seq != 0 {
        line["seq"] = json!(r.seq);
        line["message_id"] = json!(r.message_id);
    }
    if !r.copies.is_empty() {
        line["copies"] =
            r.copies.iter().map(|c| json!({"device": c.device, "seq": c.seq, "message_id": c.message_id})).collect();
    }
    line
}

pub(crate) fn status_json(s: &proto::MessageStatus) -> serde_json::Value {
    let state = proto::DeliveryState::try_from(s.state)
        .map_or("UNKNOWN", |st| st.as_str_name().strip_prefix("DELIVERY_STATE_").unwrap_or(st.as_str_name()));
    let ms = |v: u64| (v != 0).then_some(v);
    json!({
        "message_id": s.message_id,
        "state": state,
        "device": non_empty(&s.device),
        "seq": (s.seq != 0).then_some(s.seq),
        "stored_at_ms": ms(s.stored_at_ms),
        "sent_at_ms": ms(s.sent_at_ms),
        "acked_at_ms": ms(s.acked_at_ms),
        "reason": non_empty(&s.reason),
    })
}

/// One line per device, user and group, then the node's connection counts.
pub(crate) fn presence_lines(reply: &proto::PresenceReply) -> Vec<serde_json::Value> {
    let device = |d: &proto::DevicePresence| {
        if d.online {
            json!({
                "device": d.device,
                "online": true,
                "user": d.user,
                "shard": d.shard,
                "conn_id": d.conn_id,
                "connected_at_ms": d.connected_at_ms,
                "client_version": d.client_version,
                "platform": d.platform,
            })
        } else {
            json!({"device": d.device, "online": false})
        }
    };
    let mut lines: Vec<_> = reply.devices.iter().map(device).collect();
    lines.extend(reply.users.iter().map(|u| {
        json!({
            "user": u.user,
            "online": !u.devices.is_empty(),
            "devices": u.devices.iter().map(device).collect::<Vec<_>>(),
        })
    }));
    lines.extend(reply.groups.iter().map(|g| json!({"group": g.group, "online": g.online})));
    lines.push(json!({
        "connections_total": reply.connections_total,
        "connections_per_shard": reply.connections_per_shard,
    }));
    lines
}

pub(crate) fn push_status_name(status: i32) -> &'static str {
    proto::PushStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name())
}

pub(crate) fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// Parses a code name such as `KICKED` (any case) for `longlink kick`.
pub(crate) fn parse_error_code(name: &str) -> Result<ErrorCode, String> {
    match ErrorCode::from_str_name(&name.trim().to_ascii_uppercase()) {
        Some(code) if code != ErrorCode::Unspecified => Ok(code),
        _ => {
            let names: Vec<_> = codes::TABLE.iter().map(|row| row.code.as_str_name()).collect();
            Err(format!("unknown code {name:?}; valid codes: {}", names.join(", ")))
        }
    }
}
