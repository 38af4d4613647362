//! Messages between the shards of one node, and the outbox that sends them
//! without ever blocking the sender.
//!
//! glommio's mesh gives one SPSC channel per ordered pair of shards. Code
//! that runs inside a poll (a session's input, a push request) cannot await
//! a full channel, so each destination gets an [`Outbox`]: the message goes
//! straight into the channel when nothing is queued ahead of it, otherwise
//! into a local FIFO that a flusher task drains. Order per destination is
//! kept either way.

use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use glommio::channels::channel_mesh::Senders;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use crate::ids::{ConnKey, ShardId};
use crate::proto;
use crate::session::{Login, Session};

/// Identifies a request waiting on its origin shard for parts of its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    pub shard: ShardId,
    pub token: u64,
}

/// Messages between shards.
pub enum ShardMsg {
    /// A connection authenticated on the sending shard belongs to the
    /// receiver (the device's owner shard).
    Adopt(Box<Adoption>),
    /// Deliver `frame` to these devices (the receiver owns them); answer
    /// with [`Part::Sessions`] indexed like `items`.
    Devices { origin: Origin, items: Vec<(u32, String)>, frame: Bytes },
    /// At-least-once: append `msg` to these devices' timelines (the
    /// receiver owns them), as `(target index, device, message id)`, then
    /// send it to those online; answer with [`Part::Stored`].
    StoreDevices { origin: Origin, items: Vec<(u32, String, u64)>, msg: Arc<Outgoing> },
    /// Look these message ids up in the receiver's timeline store; answer
    /// with [`Part::Status`].
    DeliveryStatus { origin: Origin, ids: Arc<Vec<u64>> },
    /// The receiver is the home shard of these users: find the shards
    /// holding their sessions and forward [`ShardMsg::Users`] there; answer
    /// with [`Part::Expect`].
    UserLookup { origin: Origin, items: Vec<(u32, String)>, action: UserAction },
    /// Deliver to (or kick) every session of these users on the receiver.
    Users { origin: Origin, items: Vec<(u32, String)>, action: UserAction },
    /// Deliver to every member of `group` on the receiver.
    Group { origin: Origin, group: String, frame: Bytes },
    /// Queue a paced broadcast on the receiver.
    Broadcast { origin: Origin, frame: Bytes, expires_at: Option<std::time::Instant> },
    /// Add or remove devices (owned by the receiver) to or from a group.
    GroupUpdate { origin: Origin, group: String, items: Vec<(u32, String)>, add: bool },
    /// Kick these devices (owned by the receiver).
    KickDevices { origin: Origin, items: Vec<(u32, String)>, code: proto::ErrorCode, reason: String },
    /// Report presence of devices, users, groups and connection counts.
    Presence { origin: Origin, query: Arc<PresenceQuery> },
    /// A user gained its first session on `shard` (or lost its last one).
    /// Sent to the user's home shard, which keeps the user directory. With
    /// `ack`, the home shard answers [`ShardMsg::UserDirAck`] so the new
    /// session is activated only once user pushes can find it.
    UserDir { user_hash: u64, shard: ShardId, present: bool, ack: Option<ConnKey> },
    /// The home shard recorded the directory entry for session `key`.
    UserDirAck { key: ConnKey },
    /// Part of the answer to a request, sent back to its origin shard.
    Part { token: u64, part: Part },
}

/// A presence query, shared by every shard that answers it.
#[derive(Clone, Debug, Default)]
pub struct PresenceQuery {
    pub devices: Vec<String>,
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

/// What to do with the sessions of a user.
#[derive(Clone, Debug)]
pub enum UserAction {
    Deliver(Bytes),
    Kick {
        code: proto::ErrorCode,
        reason: String,
    },
    /// At-least-once: a stored copy per device (answered with [`Part::Stored`]).
    Store(Arc<Outgoing>),
}

/// An at-least-once message, shared by all its copies.
#[derive(Debug)]
pub struct Outgoing {
    pub service_id: String,
    pub payload: Bytes,
    /// Unix ms after which it is dropped (0: retention only).
    pub expires_at_ms: u64,
}

/// What happened to one device's copy of an at-least-once message.
#[derive(Debug, Default)]
pub struct CopyResult {
    /// Index of the target (device or user) in the request.
    pub idx: u32,
    pub device: String,
    pub seq: u64,
    pub message_id: u64,
    /// Sessions it was sent to at once (0 or 1).
    pub sessions: u32,
    /// Set when the store failed: the copy was not stored.
    pub error: Option<String>,
    /// The failure may pass (the store was unavailable or overloaded).
    pub retryable: bool,
}

/// A piece of an answer, merged into the pending request on its origin.
#[derive(Debug)]
pub enum Part {
    /// Sessions reached per target index; every target of the request
    /// part is listed (0: not reached), so the origin knows it answered.
    Sessions(Vec<(u32, u32)>),
    /// Sessions reached by a group or broadcast push on one shard.
    Count(u64),
    /// A home shard forwarded a user lookup as `parts` further messages;
    /// `targets`: how many of them answer for each user (by target index).
    Expect { parts: u32, targets: Vec<(u32, u32)> },
    /// Presence answer of one shard.
    Presence(Box<PresencePart>),
    /// At-least-once copies stored (or not) by one shard; a user target
    /// with no session there is listed once with an empty device.
    Stored(Vec<CopyResult>),
    /// Delivery statuses one shard's store knows, by query index.
    Status(Vec<(u32, proto::MessageStatus)>),
}

/// One shard's answer to a presence query.
#[derive(Debug, Default)]
pub struct PresencePart {
    pub shard: ShardId,
    pub connections: u64,
    /// Index into the query's devices, and what the shard knows.
    pub devices: Vec<(u32, proto::DevicePresence)>,
    /// Index into the query's users, and that user's sessions here.
    pub users: Vec<(u32, Vec<proto::DevicePresence>)>,
    /// Index into the query's groups, and members online here.
    pub groups: Vec<(u32, u64)>,
}

/// A connection in transit to its owner shard.
pub struct Adoption {
    pub fd: OwnedFd,
    pub session: Session,
    pub login: Login,
    /// Bytes read after the Auth frame, not yet processed.
    pub leftover: Vec<u8>,
}

/// The local FIFO for one destination and how many messages wait in it
/// (including the one its flusher is sending).
type Queue = (LocalSender<ShardMsg>, Rc<Cell<usize>>);

/// Per-destination ordered, non-blocking sending over the mesh.
pub struct Outbox {
    mesh: Senders<ShardMsg>,
    queues: Vec<Option<Queue>>,
}

impl Outbox {
    /// Creates the outbox and spawns one flusher task per peer on the
    /// current executor.
    pub fn new(mesh: Senders<ShardMsg>) -> Rc<Outbox> {
        let me = mesh.peer_id();
        let peers = mesh.nr_consumers();
        let mut receivers = Vec::new();
        let queues = (0..peers)
            .map(|peer| {
                if peer == me {
                    return None;
                }
                let (tx, rx) = local_channel::new_unbounded();
                let queued = Rc::new(Cell::new(0usize));
                receivers.push((peer, rx, queued.clone()));
                Some((tx, queued))
            })
            .collect();
        let outbox = Rc::new(Outbox { mesh, queues });
        for (peer, rx, queued) in receivers {
            glommio::spawn_local(flusher(outbox.clone(), peer, rx, queued)).detach();
        }
        outbox
    }

    /// Closes this shard's ends of the mesh channels (their receivers see
    /// the end of the stream). Part of the shutdown rendezvous in
    /// [`crate::server`]: done while every executor is still alive.
    pub fn close(&self) {
        self.mesh.close();
    }

    pub fn me(&self) -> ShardId {
        ShardId(self.mesh.peer_id() as u16)
    }

    /// Sends `msg` to shard `to` (never the current one) without waiting.
    pub fn send(&self, to: ShardId, msg: ShardMsg) {
        let Some(Some((tx, queued))) = self.queues.get(to.index()) else {
            // Only a bug can get here: messages to self are handled inline.
            tracing::error!(to = %to, "mesh message to self or unknown shard dropped");
            return;
        };
        let msg = if queued.get() == 0 {
            match self.mesh.try_send_to(to.index(), msg) {
                Ok(()) => return,
                Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(msg))) => msg,
                Err(_) => return, // peer gone: the node is shutting down
            }
        } else {
            msg
        };
        queued.set(queued.get() + 1);
        if tx.try_send(msg).is_err() {
            queued.set(queued.get() - 1);
        }
    }
}

async fn flusher(outbox: Rc<Outbox>, peer: usize, rx: LocalReceiver<ShardMsg>, queued: Rc<Cell<usize>>) {
    while let Some(msg) = rx.recv().await {
        let sent = outbox.mesh.send_to(peer, msg).await;
        queued.set(queued.get() - 1);
        if sent.is_err() {
            break; // peer gone
        }
    }
}
