//! Starts a node: one pinned glommio executor per shard, each with its own
//! SO_REUSEPORT listener, joined by a full channel mesh.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles};
use tracing::info;

use crate::cluster::ClusterShared;
use crate::config::Config;
use crate::conn::fd;
use crate::conn::links::LinkError;
use crate::conn::listen::{ListenError, bind_reuseport};
use crate::delivery::reliable::DeliverySettings;
use crate::delivery::store::{MemoryStore, TimelineStore};
use crate::delivery::store_redis::{RedisStore, RedisStoreConfig};
use crate::http::HttpServer;
use crate::http::admin::{self, AdminState};
use crate::mesh::{MeshEnds, Outbox};
use crate::protocol::ids::ShardId;
use crate::push::auth::Listener;
use crate::shard::{Shard, ShardConfig, ShardCounters};
use crate::upgrade::wire::ListenerKind;
use crate::upgrade::{Inherited, ListenerPool, ShardLink, ShardRestore};
use crate::upstream::UpstreamError;

/// Messages queued per mesh channel (power of two; small ones are slow).
const MESH_CAPACITY: usize = 1024;
/// Mesh slots one shard receives into, over all its peers. glommio
/// allocates and touches every slot up front (96 bytes each) and the mesh
/// has `n * (n - 1)` channels: at 1024 slots per channel, 100 shards would
/// hold 950 MB and 256 shards 6.3 GB. This budget keeps the full capacity
/// up to 17 shards and ~1.5 MB per shard beyond.
const MESH_SLOTS_PER_SHARD: usize = 16 * 1024;
/// The smallest channel (glommio is ~10x slower per message below this).
const MIN_MESH_CAPACITY: usize = 64;

/// Capacity of each mesh channel for a node of `shards` shards.
fn mesh_capacity(shards: u16) -> usize {
    let peers = usize::from(shards).saturating_sub(1).max(1);
    let share = MESH_SLOTS_PER_SHARD / peers;
    // The largest power of two within the share (glommio rounds up).
    let pow2 = if share == 0 { 0 } else { 1 << share.ilog2() };
    pow2.clamp(MIN_MESH_CAPACITY, MESH_CAPACITY)
}
/// What an in-place upgrade gives one shard at start: the sessions and
/// store handed over (new process), its channel to the coordinator.
type ShardUpgradeStart = (Option<ShardRestore>, Option<ShardLink>);

/// How long start-up may take before it is reported as failed.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start executors: {0}")]
    Executor(String),
    #[error("cannot start the Redis timeline store: {0}")]
    Store(std::io::Error),
    #[error("shards did not start: {0}")]
    Start(String),
    #[error("cannot start cluster mode: {0}")]
    Cluster(std::io::Error),
    #[error("cannot serve admin HTTP on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(crate::conn::tls::TlsConfigError),
}

impl From<ListenError> for ServerError {
    fn from(ListenError { addr, source }: ListenError) -> ServerError {
        ServerError::Listen { addr, source }
    }
}

impl From<crate::reload::SettingsError> for ServerError {
    fn from(err: crate::reload::SettingsError) -> ServerError {
        match err {
            crate::reload::SettingsError::Config(e) => ServerError::Config(e),
            crate::reload::SettingsError::Upstream(e) => ServerError::Upstream(e),
        }
    }
}

impl From<LinkError> for ServerError {
    fn from(err: LinkError) -> ServerError {
        match err {
            LinkError::Config(e) => ServerError::Config(e),
            LinkError::Listen(e) => e.into(),
            LinkError::Tls(e) => ServerError::Tls(e),
        }
    }
}

/// A running node. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    handles: Option<PoolThreadHandles<()>>,
    stop: Arc<AtomicBool>,
    client_addr: SocketAddr,
    push_addr: SocketAddr,
    /// Cluster mode: the node-to-node listener.
    node_addr: Option<SocketAddr>,
    counters: Vec<Arc<ShardCounters>>,
    /// The admin HTTP server (/metrics, /healthz; cluster endpoints in
    /// cluster mode).
    admin: HttpServer,
    /// Cluster mode: the node's cluster state.
    cluster: Option<Arc<ClusterShared>>,
    /// Single node: a drain was asked for (SIGTERM). Cluster mode drains
    /// through [`ClusterShared::request_drain`].
    drain: Arc<AtomicBool>,
    links: crate::conn::links::LinkAddrs,
    tls: crate::conn::links::TlsStores,
    /// The in-place upgrade's coordinator ([`crate::upgrade`]).
    upgrader: Arc<crate::upgrade::Upgrader>,
    /// SIGHUP and `POST /reload` ([`crate::reload`]).
    reloader: Arc<crate::reload::Reloader>,
}

/// Every listener of a node, bound before anything starts (a taken port
/// fails the start at once). The shards each take one socket of the
/// SO_REUSEPORT groups; the HTTP listeners are served by threads.
struct Listeners {
    client_addr: SocketAddr,
    client: Vec<OwnedFd>,
    push_addr: SocketAddr,
    push: Vec<OwnedFd>,
    /// Cluster mode: the node-to-node listener.
    node: Option<(SocketAddr, Vec<OwnedFd>)>,
    admin: std::net::TcpListener,
}

impl Listeners {
    /// Binds, or takes the sockets an upgrade handed over (`pool`).
    fn bind(config: &Config, shards: u16, mut pool: Option<&mut ListenerPool>) -> Result<Listeners, ServerError> {
        let server = &config.server;
        let mut group = |kind, addr: SocketAddr| match pool.as_mut().and_then(|p| p.take_group(kind, shards)) {
            Some(taken) => taken.map_err(|source| ServerError::Listen { addr, source }),
            None => bind_reuseport(addr, shards, server.listen_backlog).map_err(ServerError::from),
        };
        let (client_addr, client) = group(ListenerKind::Client, server.client_listen)?;
        let (push_addr, push) = group(ListenerKind::Push, server.push_listen)?;
        let node = match config.cluster.enabled {
            true => Some(bind_reuseport(config.cluster.node_listen, shards, server.listen_backlog)?),
            false => None,
        };
        let admin = match pool.and_then(|p| p.take(ListenerKind::Admin)).and_then(|fds| fds.into_iter().next()) {
            Some(fd) => std::net::TcpListener::from(fd),
            None => std::net::TcpListener::bind(server.admin_listen)
                .map_err(|source| ServerError::Admin { addr: server.admin_listen, source })?,
        };
        Ok(Listeners { client_addr, client, push_addr, push, node, admin })
    }

    /// Duplicates of every listening socket, for a later upgrade.
    fn duplicates(
        &self,
        links: &[Vec<(crate::conn::transport::Link, OwnedFd)>],
        push_tls: &[OwnedFd],
    ) -> Vec<(ListenerKind, u16, OwnedFd)> {
        use crate::conn::transport::Link;
        let mut out = Vec::new();
        let mut add = |kind, shard: usize, fd: &OwnedFd| match fd.try_clone() {
            Ok(dup) => out.push((kind, shard as u16, dup)),
            Err(err) => tracing::warn!(error = %err, ?kind, "cannot keep a listener for upgrades"),
        };
        for (i, fd) in self.client.iter().enumerate() {
            add(ListenerKind::Client, i, fd);
        }
        for (i, fd) in self.push.iter().enumerate() {
            add(ListenerKind::Push, i, fd);
        }
        for (i, fd) in push_tls.iter().enumerate() {
            add(ListenerKind::PushTls, i, fd);
        }
        for (i, shard) in links.iter().enumerate() {
            for (link, fd) in shard {
                let kind = match link {
                    Link::Tls => ListenerKind::Tls,
                    Link::WssUpgrade | Link::Wss => ListenerKind::Wss,
                    _ => ListenerKind::Ws,
                };
                add(kind, i, fd);
            }
        }
        match self.admin.try_clone() {
            Ok(dup) => out.push((ListenerKind::Admin, 0, OwnedFd::from(dup))),
            Err(err) => tracing::warn!(error = %err, "cannot keep the admin listener for upgrades"),
        }
        out
    }
}

impl Server {
    /// Binds the listeners and starts every shard; returns once all of them
    /// accept connections.
    pub fn start(config: &Config) -> Result<Server, ServerError> {
        Server::start_with(config, None)
    }

    /// [`Server::start`] in a process an in-place upgrade started: the
    /// listeners, sessions and stores come from `inherited` (confirm it
    /// once this returns).
    pub fn start_with(config: &Config, inherited: Option<&mut Inherited>) -> Result<Server, ServerError> {
        config.validate()?;
        let (keyring, _) = config.keyring()?;
        let shards = config.shard_count();
        let server = &config.server;
        let session = &config.session;

        let (mut pool, restores) = match inherited {
            Some(i) => (Some(std::mem::take(&mut i.listeners)), std::mem::take(&mut i.shards)),
            None => (None, Vec::new()),
        };
        let bound = Listeners::bind(config, shards, pool.as_mut())?;
        let links = crate::conn::links::LinkListeners::bind_from(config, shards, pool.as_mut())?;
        // Hook: the in-place upgrade keeps a copy of every listener and
        // talks to each shard.
        let (upgrader, shard_links) = crate::upgrade::Upgrader::new(
            shards,
            config.cluster.enabled,
            Duration::from_millis(config.push.reply_timeout_ms),
            if config.cluster.enabled { Vec::new() } else { bound.duplicates(&links.per_shard, &links.push_tls) },
        );
        let upgrader = Arc::new(upgrader);
        let mut restores: Vec<Option<ShardRestore>> = restores.into_iter().map(Some).collect();
        restores.resize_with(usize::from(shards), || None);
        let per_shard_upgrade: Arc<Mutex<Vec<ShardUpgradeStart>>> =
            Arc::new(Mutex::new(restores.into_iter().zip(shard_links.into_iter().map(Some)).collect()));
        let Listeners { client_addr, client: listeners, push_addr, push: push_listeners, node, admin: admin_listener } =
            bound;
        let node_addr = node.as_ref().map(|(addr, _)| *addr);
        let cluster = match node_addr {
            Some(node_addr) => {
                Some(ClusterShared::start(config, client_addr, node_addr, shards).map_err(ServerError::Cluster)?)
            }
            None => None,
        };
        let counters: Vec<Arc<ShardCounters>> = (0..shards).map(|_| Arc::default()).collect();
        let live = crate::reload::LiveSettings::from_config(config, shards)?;
        let reload = crate::reload::ReloadHub::new(live.clone(), shards);
        let admission = Arc::new(crate::admission::Admission::new(crate::admission::AdmissionLimits::of(server)));
        let shard_cfg = ShardConfig {
            live: live.clone(),
            reload: reload.clone(),
            max_frame_bytes: server.max_frame_bytes,
            outbound_queue_bytes: session.outbound_queue_bytes,
            write_timeout_ms: session.write_timeout_ms,
            max_groups_per_session: session.max_groups_per_session,
            join_policy: config.client_groups.allow.clone().into(),
            read_buffer_bytes: server.read_buffer_bytes,
            wheel_tick_ms: session.wheel_tick_ms,
            admission: admission.clone(),
            node: config.node_name_bound(client_addr.port()),
            upstream: live.upstream.clone(),
            delivery: DeliverySettings {
                window: config.delivery.window as usize,
                policy: config.delivery.retry_policy(),
                shared_store: !config.delivery.redis_url.is_empty(),
                unacked_replay_limit: config.delivery.retention_messages as usize,
                node_index: config.delivery.node_index,
            },
            node_counters: counters.iter().cloned().collect(),
            ws: Arc::new(crate::conn::tls_config::handshake_config(config)),
            tls: links.stores.clone(),
        };
        // One Redis sidecar for the node, or a memory store per shard (each
        // holds the timelines of the devices its shard owns).
        let redis = match config.delivery.redis_url.as_str() {
            "" => None,
            url => {
                let d = &config.delivery;
                let store = RedisStore::start(RedisStoreConfig {
                    url: url.to_owned(),
                    prefix: d.redis_prefix.clone(),
                    retention: d.retention(),
                    idle_ttl_secs: d.redis_idle_ttl_secs,
                    status_ttl_secs: d.redis_status_ttl_secs,
                    connect_timeout: Duration::from_millis(d.redis_timeout_ms),
                    io_timeout: Duration::from_millis(d.redis_timeout_ms),
                    connections: d.redis_connections as usize,
                })
                .map_err(ServerError::Store)?;
                Some(store)
            }
        };
        let retention = config.delivery.retention();
        let memory_store_bytes =
            usize::try_from(config.delivery.memory_store_bytes / u64::from(shards)).unwrap_or(usize::MAX);
        // Sequences of this run's memory stores start above any earlier run's.
        let boot_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        // The cluster's drain rate and deadline apply to a single node too.
        let drain_rate_per_shard = f64::from(config.cluster.drain_rate_per_sec) / f64::from(shards.max(1));
        // Each executor takes one (client, push) listener pair and its own
        // ends of the mesh, made here, on one thread, before any executor
        // runs (the channels' shared state must not be built concurrently).
        type ShardStart = (
            OwnedFd,
            OwnedFd,
            Option<OwnedFd>,
            MeshEnds,
            Vec<(crate::conn::transport::Link, OwnedFd)>,
            Option<OwnedFd>,
        );
        let (fd_tx, fd_rx) = crossbeam_channel::bounded::<ShardStart>(listeners.len());
        let mesh = crate::mesh::full_mesh(shards, mesh_capacity(shards));
        let mut node_fds = node.map(|(_, fds)| fds.into_iter());
        let mut push_tls_fds = links.push_tls.into_iter();
        for (((client, push), ends), extra) in listeners.into_iter().zip(push_listeners).zip(mesh).zip(links.per_shard)
        {
            let node_fd = node_fds.as_mut().and_then(Iterator::next);
            let _ = fd_tx.send((client, push, node_fd, ends, extra, push_tls_fds.next()));
        }
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<ShardId, String>>(usize::from(shards));
        let grace = Duration::from_millis(session.close_linger_ms) + Duration::from_secs(1);

        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let placement = if usize::from(shards) <= cores {
            PoolPlacement::MaxSpread(usize::from(shards), None)
        } else {
            tracing::warn!(shards, cores, "more shards than cores: executors are not pinned");
            PoolPlacement::Unbound(usize::from(shards))
        };
        let handles = LocalExecutorPoolBuilder::new(placement)
            .name("longlink-shard")
            .io_memory(server.io_memory_bytes)
            .ring_depth(server.ring_depth)
            .on_all_shards({
                let stop = stop.clone();
                let counters = counters.clone();
                let rendezvous = Arc::new(Rendezvous::default());
                let registered = Arc::new(Rendezvous::default());
                let cluster = cluster.clone();
                let drain = drain.clone();
                let per_shard_upgrade = per_shard_upgrade.clone();
                move || {
                    let per_shard_upgrade = per_shard_upgrade.clone();
                    let rendezvous = rendezvous.clone();
                    let registered = registered.clone();
                    let cluster = cluster.clone();
                    let drain = drain.clone();
                    let (fd_rx, ready_tx, cfg, stop, counters, redis) = (
                        fd_rx.clone(),
                        ready_tx.clone(),
                        shard_cfg.clone(),
                        stop.clone(),
                        counters.clone(),
                        redis.clone(),
                    );
                    async move {
                        let Ok((client_fd, push_fd, node_fd, mesh, extra, push_tls_fd)) = fd_rx.try_recv() else {
                            let _ = ready_tx.send(Err("no listener left for this executor".into()));
                            return;
                        };
                        // Listening sockets built by `bind_reuseport`, owned by
                        // this executor from here on.
                        let (listener, push_listener) = (fd::listener(client_fd), fd::listener(push_fd));
                        // Until the shard reports ready, wake the executor every
                        // 10 ms: joining the mesh waits for the peers through
                        // cross-thread notifications, and the reactor re-checks
                        // every pending connection each time it runs, so a lost
                        // notification then costs a tick instead of a start-up
                        // that never finishes (seen under load: "timed out
                        // waiting" after 30 s, in 2 of 5 full test runs).
                        let starting = Rc::new(std::cell::Cell::new(true));
                        glommio::spawn_local({
                            let starting = starting.clone();
                            async move {
                                while starting.get() {
                                    glommio::timer::sleep(START_TICK).await;
                                }
                            }
                        })
                        .detach();
                        let id = mesh.me();
                        // Blocks this executor's thread until every shard has
                        // registered its mesh ends (nothing else runs here yet).
                        let (senders, receivers) = mesh
                            .connect(|| {
                                if !registered.wait_for(shards, START_TIMEOUT) {
                                    tracing::warn!(shard = %id, "not every shard joined the mesh in time");
                                }
                            })
                            .await;
                        let outbox = Outbox::new(senders);
                        // Hook: what an upgrade handed over to this shard.
                        let (restore, upgrade_link) = per_shard_upgrade
                            .lock()
                            .ok()
                            .and_then(|mut v| v.get_mut(id.index()).map(std::mem::take))
                            .unwrap_or_default();
                        let ShardRestore { sessions: restored, store: store_image, revoked } =
                            restore.unwrap_or_default();
                        let mut memory = None;
                        let store: Rc<dyn TimelineStore> = match redis {
                            Some(redis) => Rc::new(redis),
                            None => {
                                let store = match store_image {
                                    Some(image) => MemoryStore::from_image(retention, image),
                                    None => MemoryStore::new(retention, boot_unix_ms),
                                };
                                let store = Rc::new(store.with_max_bytes(memory_store_bytes));
                                memory = Some(store.clone());
                                store
                            }
                        };
                        let shard = Shard::new(id, shards, cfg, outbox.clone(), counters[id.index()].clone(), store);
                        if let Some(memory) = memory {
                            shard.upgrade.set_memory_store(memory);
                        }
                        if let Some(link) = upgrade_link {
                            glommio::spawn_local(Rc::clone(&shard).upgrade_loop(link)).detach();
                        }
                        // Sessions handed over come back before anyone new.
                        shard.state.borrow_mut().revoked.restore(revoked);
                        shard.restore(restored);
                        match cluster {
                            Some(cluster) => crate::cluster::attach(&shard, cluster),
                            None => {
                                let drain = Rc::clone(&shard).single_drain_loop(drain, drain_rate_per_shard);
                                glommio::spawn_local(drain).detach();
                            }
                        }
                        let mesh_readers: Vec<_> = receivers
                            .into_iter()
                            .map(|(_peer, rx)| {
                                let shard = shard.clone();
                                glommio::spawn_local(async move {
                                    while let Some(msg) = rx.recv().await {
                                        shard.on_message(msg);
                                    }
                                })
                            })
                            .collect();
                        glommio::spawn_local(Rc::clone(&shard).accept_loop(listener)).detach();
                        let push_port =
                            crate::push::accept_loop(Rc::clone(&shard), push_listener, Listener::Push, None);
                        glommio::spawn_local(push_port).detach();
                        let tls = shard.cfg.tls.clone();
                        if let Some(fd) = node_fd {
                            let node_tls = tls.node.as_ref().map(|s| s.shard_handle());
                            let nodes =
                                crate::push::accept_loop(Rc::clone(&shard), fd::listener(fd), Listener::Node, node_tls);
                            glommio::spawn_local(nodes).detach();
                        }
                        if let (Some(fd), Some(store)) = (push_tls_fd, tls.push.as_ref()) {
                            let push_tls = Some(store.shard_handle());
                            let port =
                                crate::push::accept_loop(Rc::clone(&shard), fd::listener(fd), Listener::Push, push_tls);
                            glommio::spawn_local(port).detach();
                        }
                        for (link, fd) in extra {
                            glommio::spawn_local(Rc::clone(&shard).accept_link_loop(fd::listener(fd), link)).detach();
                        }
                        glommio::spawn_local(Rc::clone(&shard).pacer_loop()).detach();
                        glommio::spawn_local(Rc::clone(&shard).flusher_loop()).detach();
                        // Ready once every service backend was tried once.
                        crate::upstream::start(&shard).await;
                        let _ = ready_tx.send(Ok(id));
                        starting.set(false);
                        shard.timer_loop(stop, grace).await;
                        // Quiet teardown. Closing or dropping a mesh channel
                        // end writes the peer executor's eventfd, and the
                        // kernel completes that executor's pending eventfd
                        // read into its reactor's memory: an executor that
                        // is already tearing down has freed it (seen as
                        // "unaligned tcache chunk" aborts at thread exit).
                        // So every shard closes its channel ends while all
                        // executors are alive, and none exits before all
                        // have.
                        rendezvous.wait(shards);
                        outbox.close();
                        let readers_done = async {
                            for reader in mesh_readers {
                                reader.await;
                            }
                        };
                        futures_lite::future::or(readers_done, glommio::timer::sleep(RENDEZVOUS_TIMEOUT)).await;
                        rendezvous.wait(shards);
                    }
                }
            })
            .map_err(|e| ServerError::Executor(e.to_string()))?;

        for _ in 0..shards {
            match ready_rx.recv_timeout(START_TIMEOUT) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ServerError::Start(e)),
                Err(e) => return Err(ServerError::Start(e.to_string())),
            }
        }
        if let Some(cluster) = &cluster {
            // Registered before serving, unless Redis is down (then the
            // sidecar keeps trying; sessions claim routes once it is up).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !cluster.router.state().is_live() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !cluster.router.state().is_live() {
                tracing::warn!(node = %cluster.node, "not registered in the cluster yet; serving anyway");
            }
            while !cluster.revocations_loaded() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !cluster.revocations_loaded() {
                tracing::warn!(
                    node = %cluster.node,
                    "the cluster's revocations could not be read yet; logins are refused (UNAVAILABLE) until they are"
                );
            }
        }
        let admin_addr = config.server.admin_listen;
        let reloader = Arc::new(crate::reload::Reloader::new(config, reload, links.stores.clone(), shards));
        reloader.set_admission(admission);
        let state = AdminState {
            node: config.node_name_bound(client_addr.port()),
            counters: counters.clone(),
            stop: stop.clone(),
            drain: Arc::new(drainer(cluster.clone(), drain.clone())),
            reloader: reloader.clone(),
        };
        let admin = admin::serve(admin_listener, state, config, cluster.clone().map(|c| (c, keyring)))
            .map_err(|source| ServerError::Admin { addr: admin_addr, source })?;
        if let Some(cluster) = &cluster {
            let active = counters.clone();
            let sessions = move || active.iter().map(|c| c.active.load(Ordering::Relaxed)).sum::<u64>();
            crate::cluster::spawn_drain_coordinator(cluster.clone(), sessions, stop.clone())
                .map_err(ServerError::Cluster)?;
            info!(node = %cluster.node, admin = %admin.addr(), client = %cluster.client_endpoint, "cluster mode");
        } else {
            let deadline = Duration::from_millis(config.cluster.drain_deadline_ms);
            spawn_single_drain_coordinator(drain.clone(), deadline, counters.clone(), stop.clone())
                .map_err(ServerError::Cluster)?;
        }
        info!(%client_addr, shards, node = %config.node_name_bound(client_addr.port()), "longlink serving");
        let (links, tls) = (links.addrs, links.stores);
        Ok(Server {
            handles: Some(handles),
            stop,
            client_addr,
            push_addr,
            node_addr,
            counters,
            admin,
            cluster,
            drain,
            links,
            tls,
            upgrader,
            reloader,
        })
    }

    /// Starts an in-place upgrade on a thread of its own (SIGUSR2): on
    /// success the process exits 0 once the new one serves; on failure it
    /// serves on. The outcome goes to [`crate::upgrade::status_path`].
    pub fn upgrade_in_background(&self) {
        (self.upgrader())();
    }

    /// [`Server::upgrade_in_background`] as a function another thread can
    /// keep (the signal thread).
    pub fn upgrader(&self) -> impl Fn() + Send + Sync + 'static {
        let upgrader = self.upgrader.clone();
        move || Self::spawn_upgrade(upgrader.clone())
    }

    fn spawn_upgrade(upgrader: Arc<crate::upgrade::Upgrader>) {
        let spawned = std::thread::Builder::new().name("longlink-upgrade".into()).spawn(move || {
            let outcome = upgrader.run();
            if let Err(crate::upgrade::UpgradeError::Busy) = outcome {
                tracing::warn!("SIGUSR2 while an upgrade is running: ignored");
                return;
            }
            crate::upgrade::write_status(&outcome);
            if let Ok(pid) = outcome {
                info!(new_pid = pid, "upgraded: the new process serves every connection; exiting");
                // Not a shutdown: the sockets are the new process's now, so
                // nothing may be written to them or shut down (exiting only
                // closes this process's copies).
                std::process::exit(0);
            }
        });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "cannot start the upgrade thread");
        }
    }

    /// The bound client address (useful with port 0).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The bound push-port address.
    pub fn push_addr(&self) -> SocketAddr {
        self.push_addr
    }

    /// Cluster mode: the bound node-to-node listener address.
    pub fn node_addr(&self) -> Option<SocketAddr> {
        self.node_addr
    }

    /// The bound WebSocket, TLS and WSS addresses (those that are on).
    pub fn links(&self) -> crate::conn::links::LinkAddrs {
        self.links
    }

    /// Re-reads the TLS certificate and key files: new connections get the
    /// new certificate ([`crate::conn::links::TlsStores::reload`]).
    pub fn reload_tls(&self) -> Result<(), crate::conn::tls::TlsConfigError> {
        self.tls.reload()
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr()
    }

    /// The node's cluster state (cluster mode).
    pub fn cluster(&self) -> Option<&Arc<ClusterShared>> {
        self.cluster.as_ref()
    }

    /// Per-shard counters, indexed by shard id.
    pub fn counters(&self) -> &[Arc<ShardCounters>] {
        &self.counters
    }

    /// Asks every shard to stop: stop accepting, close sessions with
    /// SHUTDOWN, exit once they are gone or the linger passes.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Asks the node to drain: send every client away at the drain rate
    /// (GoAway, then close with GOING_AWAY), then stop. A cluster node
    /// names another node in each GoAway; a single node names none, so the
    /// client reconnects through whatever is in front (a load balancer).
    pub fn request_drain(&self) {
        (self.drainer())();
    }

    /// [`Server::request_drain`] as a function another thread can keep
    /// (the signal thread, while the main thread joins the server).
    pub fn drainer(&self) -> impl Fn() + Send + Sync + 'static {
        drainer(self.cluster.clone(), self.drain.clone())
    }

    /// Re-reads the config and applies what can change live (SIGHUP,
    /// `POST /reload`); see [`crate::reload`].
    pub fn reloader(&self) -> Arc<crate::reload::Reloader> {
        self.reloader.clone()
    }

    /// A flag that stops the server when set (for signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Waits for every shard to exit.
    pub fn join(mut self) {
        if let Some(handles) = self.handles.take() {
            for result in handles.join_all() {
                if let Err(e) = result {
                    tracing::error!(error = %e, "shard exited with an error");
                }
            }
        }
        self.admin.stop();
    }

    /// [`Server::request_stop`] then [`Server::join`].
    pub fn shutdown(self) {
        self.request_stop();
        self.join();
    }
}

/// [`Server::drainer`], for the admin port too.
fn drainer(cluster: Option<Arc<ClusterShared>>, drain: Arc<AtomicBool>) -> impl Fn() + Send + Sync + 'static {
    move || match &cluster {
        Some(cluster) => cluster.request_drain(),
        None => {
            if !drain.swap(true, Ordering::Relaxed) {
                info!("drain requested");
            }
        }
    }
}

/// Where the shards meet: once their mesh ends are registered (at start),
/// and twice on the way out (see the end of a shard's task in
/// [`Server::start`]): each `wait` returns once every shard has arrived, or
/// after [`RENDEZVOUS_TIMEOUT`] (a shard that never started must not hold
/// the others forever).
#[derive(Default)]
struct Rendezvous {
    arrived: Mutex<u64>,
    all_here: Condvar,
}

/// How often a starting shard's executor wakes up (see `starting`).
/// Single node: once `drain` is set, waits until every session left (or
/// the deadline passes), then stops the node.
fn spawn_single_drain_coordinator(
    drain: Arc<AtomicBool>,
    deadline: Duration,
    active: Vec<Arc<ShardCounters>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("longlink-drain".into()).spawn(move || {
        while !drain.load(Ordering::Relaxed) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(DRAIN_POLL);
        }
        let started = std::time::Instant::now();
        let sessions = || active.iter().map(|c| c.active.load(Ordering::Relaxed)).sum::<u64>();
        info!(sessions = sessions(), deadline_ms = deadline.as_millis() as u64, "draining");
        while sessions() > 0 && started.elapsed() < deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(DRAIN_POLL);
        }
        info!(left = sessions(), elapsed_ms = started.elapsed().as_millis() as u64, "drain finished; stopping");
        stop.store(true, Ordering::Relaxed);
    })?;
    Ok(())
}

const DRAIN_POLL: Duration = Duration::from_millis(20);
const START_TICK: Duration = Duration::from_millis(10);

/// How long a shard waits for the others at a rendezvous.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(5);

impl Rendezvous {
    /// Blocks the executor thread (nothing is left to run on it) until
    /// `shards` threads reached this round.
    fn wait(&self, shards: u16) {
        self.wait_for(shards, RENDEZVOUS_TIMEOUT);
    }

    /// [`Rendezvous::wait`] with its own time limit; false if it passed.
    fn wait_for(&self, shards: u16, timeout: Duration) -> bool {
        let Ok(mut arrived) = self.arrived.lock() else { return false };
        *arrived += 1;
        let target = (*arrived).div_ceil(u64::from(shards)) * u64::from(shards);
        if *arrived == target {
            self.all_here.notify_all();
            return true;
        }
        let deadline = Instant::now() + timeout;
        while *arrived < target {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                tracing::warn!(arrived = *arrived, target, "shards did not all reach the rendezvous");
                return false;
            };
            match self.all_here.wait_timeout(arrived, left) {
                Ok((guard, _)) => arrived = guard,
                Err(_) => return false,
            }
        }
        true
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
