//! Messages between the shards of one node, and the outbox that sends them
//! without ever blocking the sender.
//!
//! The mesh is one glommio SPSC channel per ordered pair of shards. Code
//! that runs inside a poll (a session's input, a push request) cannot await
//! a full channel, so each destination gets an [`Outbox`]: the message goes
//! straight into the channel when nothing is queued ahead of it, otherwise
//! into a local FIFO that a flusher task drains. Order per destination is
//! kept either way.
//!
//! The FIFOs are bounded by pushing back, not by dropping: once more than
//! [`SPILL_LIMIT_BYTES`] wait in them, [`Outbox::congested`] tells the push
//! port to stop reading requests until they drain. Every other message a
//! shard sends is bounded by something else (see [`Outbox::send`]), and
//! none may be dropped: a lost `Part` hangs a request, a lost `Adopt` a
//! connection, a lost `UserDir` the user directory.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};

use crate::protocol::ids::{ConnKey, ShardId};
use crate::protocol::proto;
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
    /// Record a revocation (sent to every shard; no answer). `loaded`: the
    /// last part of the cluster's stored revocations (cluster mode waits
    /// for it before taking logins).
    Revoke { devices: Arc<[String]>, users: Arc<[String]>, not_before: i64, loaded: bool },
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
    /// The transport and its state (a WebSocket decoder may be mid-frame).
    pub link: crate::conn::transport::Link,
    pub ws: Option<Box<crate::conn::transport::WsState>>,
    pub tls: Option<Box<crate::conn::transport::TlsLink>>,
    /// The connection's charge in the per-source table, released at close.
    pub admitted: crate::admission::Admitted,
}

impl ShardMsg {
    /// Roughly the memory this message holds: its slot plus what it points
    /// to (shared buffers counted in full, so this errs on the high side).
    fn approx_bytes(&self) -> usize {
        let items = |items: &[(u32, String)]| items.iter().map(|(_, id)| id.len() + 32).sum::<usize>();
        std::mem::size_of::<ShardMsg>()
            + match self {
                ShardMsg::Adopt(a) => std::mem::size_of::<Adoption>() + a.leftover.len(),
                ShardMsg::Devices { items: i, frame, .. } => items(i) + frame.len(),
                ShardMsg::StoreDevices { items, msg, .. } => {
                    items.iter().map(|(_, id, _)| id.len() + 40).sum::<usize>() + msg.payload.len()
                }
                ShardMsg::DeliveryStatus { ids, .. } => ids.len() * 8,
                ShardMsg::UserLookup { items: i, action, .. } | ShardMsg::Users { items: i, action, .. } => {
                    items(i)
                        + match action {
                            UserAction::Deliver(frame) => frame.len(),
                            UserAction::Kick { reason, .. } => reason.len(),
                            UserAction::Store(msg) => msg.payload.len(),
                        }
                }
                ShardMsg::Group { group, frame, .. } => group.len() + frame.len(),
                ShardMsg::Broadcast { frame, .. } => frame.len(),
                ShardMsg::GroupUpdate { group, items: i, .. } => group.len() + items(i),
                ShardMsg::KickDevices { items: i, reason, .. } => items(i) + reason.len(),
                ShardMsg::Presence { query, .. } => {
                    query.devices.iter().chain(&query.users).chain(&query.groups).map(|s| s.len() + 24).sum()
                }
                ShardMsg::UserDir { .. } | ShardMsg::UserDirAck { .. } => 0,
                ShardMsg::Revoke { devices, users, .. } => {
                    devices.iter().chain(users.iter()).map(|s| s.len() + 24).sum()
                }
                ShardMsg::Part { part, .. } => match part {
                    Part::Sessions(v) => v.len() * 8,
                    Part::Stored(v) => v.iter().map(|c| c.device.len() + 64).sum(),
                    Part::Status(v) => v.len() * 128,
                    Part::Presence(p) => {
                        let d = |d: &proto::DevicePresence| 96 + d.device.len() + d.user.len();
                        p.devices.iter().map(|(_, x)| d(x)).sum::<usize>()
                            + p.users.iter().flat_map(|(_, v)| v.iter()).map(d).sum::<usize>()
                            + p.groups.len() * 16
                    }
                    Part::Count(_) | Part::Expect { .. } => 0,
                },
            }
    }
}

/// Bytes (as [`ShardMsg::approx_bytes`] counts them) that may wait in one
/// shard's outbox FIFOs before its push port stops reading. A soft bound:
/// the request being handled when it is crossed still sends all its parts.
pub const SPILL_LIMIT_BYTES: usize = 8 << 20;

/// Spilled bytes at or below which the push port reads again (hysteresis:
/// readers are not woken for every message that drains).
const SPILL_RESUME_BYTES: usize = SPILL_LIMIT_BYTES / 2;

/// One shard's ends of the mesh, before its executor connects them.
pub struct MeshEnds {
    me: ShardId,
    /// To each peer (none to itself).
    senders: Vec<Option<SharedSender<ShardMsg>>>,
    /// From each peer.
    receivers: Vec<(ShardId, SharedReceiver<ShardMsg>)>,
}

/// Makes the channels of a full mesh of `shards` shards, `capacity`
/// messages each, and returns every shard's ends (index = shard id).
///
/// Instead of glommio's `MeshBuilder`, whose `join` connects a shard's
/// channels one after another, each waiting (spinning) for its peer to
/// reach the same pair: with 100 executors on 2 cores, start-up took 20 s
/// to over a minute. Here every end is registered first, then connected
/// ([`MeshEnds::connect`]).
pub fn full_mesh(shards: u16, capacity: usize) -> Vec<MeshEnds> {
    let n = usize::from(shards);
    let mut ends: Vec<MeshEnds> = (0..shards)
        .map(|me| MeshEnds {
            me: ShardId(me),
            senders: (0..n).map(|_| None).collect(),
            receivers: Vec::with_capacity(n.saturating_sub(1)),
        })
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(capacity);
                ends[from].senders[to] = Some(tx);
                ends[to].receivers.push((ShardId(from as u16), rx));
            }
        }
    }
    ends
}

impl MeshEnds {
    pub fn me(&self) -> ShardId {
        self.me
    }

    /// Connects every end on the current executor; returns the senders and
    /// the receivers, by peer.
    ///
    /// An end's first poll registers it; after that it completes once its
    /// peer has registered too, and until then glommio wakes it on every
    /// pass of the reactor, so waiting executors spin. So every end is
    /// registered first, then `all_registered` runs: it must return once
    /// every shard has registered its ends (a barrier), after which each
    /// end completes on its next poll.
    pub async fn connect(
        self,
        all_registered: impl FnOnce(),
    ) -> (MeshSenders, Vec<(ShardId, ConnectedReceiver<ShardMsg>)>) {
        type Connecting<T> = Pin<Box<dyn Future<Output = T>>>;
        let mut senders: Vec<Option<Connecting<ConnectedSender<ShardMsg>>>> =
            self.senders.into_iter().map(|tx| tx.map(|tx| Box::pin(tx.connect()) as Connecting<_>)).collect();
        let mut receivers: Vec<(ShardId, Connecting<ConnectedReceiver<ShardMsg>>)> =
            self.receivers.into_iter().map(|(peer, rx)| (peer, Box::pin(rx.connect()) as Connecting<_>)).collect();
        let mut done_senders: Vec<Option<ConnectedSender<ShardMsg>>> = Vec::with_capacity(senders.len());
        for tx in senders.iter_mut() {
            done_senders.push(match tx {
                Some(fut) => futures_lite::future::poll_once(fut.as_mut()).await,
                None => None,
            });
        }
        let mut done_receivers = Vec::with_capacity(receivers.len());
        for (_, fut) in receivers.iter_mut() {
            done_receivers.push(futures_lite::future::poll_once(fut.as_mut()).await);
        }
        all_registered();
        let mut connected = Vec::with_capacity(senders.len());
        for (fut, done) in senders.into_iter().zip(done_senders) {
            connected.push(match (fut, done) {
                (_, Some(tx)) => Some(tx),
                (Some(fut), None) => Some(fut.await),
                (None, None) => None,
            });
        }
        let mut inbound = Vec::with_capacity(receivers.len());
        for ((peer, fut), done) in receivers.into_iter().zip(done_receivers) {
            inbound.push((
                peer,
                match done {
                    Some(rx) => rx,
                    None => fut.await,
                },
            ));
        }
        (MeshSenders { me: self.me, senders: connected }, inbound)
    }
}

/// This shard's connected sending ends, by destination shard.
pub struct MeshSenders {
    me: ShardId,
    senders: Vec<Option<ConnectedSender<ShardMsg>>>,
}

/// The local FIFO for one destination and how many messages wait in it
/// (including the one its flusher is sending).
type Queue = (LocalSender<(ShardMsg, usize)>, Rc<Cell<usize>>);

/// Per-destination ordered, non-blocking sending over the mesh.
pub struct Outbox {
    mesh: MeshSenders,
    queues: Vec<Option<Queue>>,
    /// Approximate bytes waiting in all the FIFOs (including messages their
    /// flushers are sending).
    spilled: Cell<usize>,
    /// Tasks (push-port readers) waiting for the FIFOs to drain.
    waiters: RefCell<Vec<Waker>>,
}

impl Outbox {
    /// Creates the outbox and spawns one flusher task per peer on the
    /// current executor.
    pub fn new(mesh: MeshSenders) -> Rc<Outbox> {
        let me = mesh.me.index();
        let peers = mesh.senders.len();
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
        let outbox = Rc::new(Outbox { mesh, queues, spilled: Cell::new(0), waiters: RefCell::new(Vec::new()) });
        for (peer, rx, queued) in receivers {
            glommio::spawn_local(flusher(outbox.clone(), peer, rx, queued)).detach();
        }
        outbox
    }

    /// Closes this shard's ends of the mesh channels (their receivers see
    /// the end of the stream). Part of the shutdown rendezvous in
    /// [`crate::server`]: done while every executor is still alive.
    pub fn close(&self) {
        for tx in self.mesh.senders.iter().flatten() {
            tx.close();
        }
    }

    pub fn me(&self) -> ShardId {
        self.mesh.me
    }

    /// Sends `msg` to shard `to` (never the current one) without waiting.
    ///
    /// Never drops a message: what the channel cannot take waits in the
    /// FIFO. Its size is bounded because the producers are: push-port
    /// requests stop being read while [`Outbox::congested`]; their parts
    /// (`Users` from a lookup, `Part` answers) follow from requests already
    /// admitted, at most a few per shard each, and each backend connection
    /// has a bounded number in flight; `Adopt` and `UserDir` come one or two
    /// per connection accepted, which the accept rate and connection limit
    /// bound.
    pub fn send(&self, to: ShardId, msg: ShardMsg) {
        let Some(Some((tx, queued))) = self.queues.get(to.index()) else {
            // Only a bug can get here: messages to self are handled inline.
            tracing::error!(to = %to, "mesh message to self or unknown shard dropped");
            return;
        };
        let msg = if queued.get() == 0 {
            let Some(Some(sender)) = self.mesh.senders.get(to.index()) else { return };
            match sender.try_send(msg) {
                Ok(()) => return,
                Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(msg))) => msg,
                Err(_) => return, // peer gone: the node is shutting down
            }
        } else {
            msg
        };
        let bytes = msg.approx_bytes();
        queued.set(queued.get() + 1);
        self.spilled.set(self.spilled.get() + bytes);
        if tx.try_send((msg, bytes)).is_err() {
            queued.set(queued.get() - 1);
            self.spilled.set(self.spilled.get() - bytes);
        }
    }

    /// Whether too much waits in the FIFOs for more requests to be read;
    /// if so, `waker` is woken once they have drained enough.
    pub fn congested(&self, waker: &Waker) -> bool {
        if self.spilled.get() <= SPILL_LIMIT_BYTES {
            return false;
        }
        let mut waiters = self.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
        true
    }

    /// Approximate bytes waiting in the FIFOs (metrics, tests).
    pub fn spilled_bytes(&self) -> usize {
        self.spilled.get()
    }

    fn drained(&self, bytes: usize) {
        self.spilled.set(self.spilled.get().saturating_sub(bytes));
        if self.spilled.get() <= SPILL_RESUME_BYTES && !self.waiters.borrow().is_empty() {
            let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
            for w in waiters {
                w.wake();
            }
        }
    }
}

async fn flusher(outbox: Rc<Outbox>, peer: usize, rx: LocalReceiver<(ShardMsg, usize)>, queued: Rc<Cell<usize>>) {
    while let Some((msg, bytes)) = rx.recv().await {
        let sent = match outbox.mesh.senders.get(peer) {
            Some(Some(sender)) => sender.send(msg).await.is_ok(),
            _ => false,
        };
        queued.set(queued.get() - 1);
        outbox.drained(bytes);
        if !sent {
            break; // peer gone
        }
    }
}
