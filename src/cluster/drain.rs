//! The shard's cluster task (node table refresh, claim retries, drain
//! steps) and the node's drain coordinator.

use super::*;
use crate::mesh::ShardMsg;

/// Runs the drain when asked: announce it, wait until every session left
/// (or the deadline), leave the registry, then stop the node. Returns when
/// the node is told to stop (by this or by `stop` being set elsewhere).
pub fn spawn_drain_coordinator(
    shared: Arc<ClusterShared>,
    sessions: impl Fn() -> u64 + Send + 'static,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("longlink-drain".into()).spawn(move || {
        while !shared.is_draining() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = Instant::now();
        if let Err(e) = futures_lite::future::block_on(shared.router.announce_draining()) {
            warn!(error = %e, "could not mark the node as draining in the registry");
        }
        info!(node = %shared.node, sessions = sessions(), deadline_ms = shared.drain_deadline.as_millis() as u64, "draining");
        while sessions() > 0 && started.elapsed() < shared.drain_deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = sessions();
        // Releases queued by the closing sessions run before this (the
        // sidecar keeps order).
        if let Err(e) = futures_lite::future::block_on(shared.router.deregister()) {
            warn!(error = %e, "could not leave the registry; the lease will expire");
        }
        info!(node = %shared.node, left, elapsed_ms = started.elapsed().as_millis() as u64, "drain finished; stopping");
        stop.store(true, Ordering::Relaxed);
    })?;
    Ok(())
}

// ---- the shard's cluster task ----------------------------------------

pub(super) async fn cluster_loop<S: ClusterShard>(shard: Rc<S>) {
    let Some(local) = local(&*shard) else { return };
    let mut tick = 0u32;
    let mut reasserted = Instant::now();
    while !shard.is_stopping() {
        if tick.is_multiple_of(NODES_EVERY) {
            refresh_nodes(&*shard, &local).await;
        }
        let rereg = local.shared.reregistered.load(Ordering::Relaxed);
        if rereg != local.reregistered_seen.get() {
            local.reregistered_seen.set(rereg);
            info!(shard = %shard.id(), "re-registered: re-asserting routes");
            reassert_routes(&*shard, &local, true);
            reasserted = Instant::now();
        } else if reasserted.elapsed() >= local.shared.route_ttl / 2 {
            // Route keys expire (so devices that never return are
            // forgotten): those of long sessions are written again.
            reassert_routes(&*shard, &local, true);
            reasserted = Instant::now();
        } else if tick.is_multiple_of(RETRY_EVERY) {
            reassert_routes(&*shard, &local, false);
        }
        if local.shared.is_draining() {
            cluster_drain_step(&*shard, &local);
        }
        if shard.id().0 == 0 && (tick.is_multiple_of(REVOCATIONS_EVERY) || !local.shared.revocations_loaded()) {
            sync_revocations(&*shard, &local).await;
        }
        tick = tick.wrapping_add(1);
        glommio::timer::sleep(TICK).await;
    }
}

pub(super) async fn refresh_nodes<S: ClusterShard>(shard: &S, local: &Rc<Local<S>>) {
    match local.shared.router.nodes().await {
        Ok(nodes) => *local.nodes.borrow_mut() = nodes,
        Err(err) => debug!(shard = %shard.id(), %err, "node table not refreshed"),
    }
}

/// Shard 0 reads the revocations other nodes stored since its last read
/// and hands them to every shard (the whole log at start: logins wait
/// for it). Redis unreachable: counted, tried again next time; shards
/// keep what they have.
pub(super) async fn sync_revocations<S: ClusterShard>(shard: &S, local: &Rc<Local<S>>) {
    let after = local.revocations_seen.get();
    let entries = match local.shared.router.revocations_since(after, REVOCATIONS_BATCH).await {
        Ok((_, counter)) if counter < after => {
            // Redis lost the log (a restart without persistence): its
            // counter started again; read what it holds from the start.
            local.revocations_seen.set(0);
            return;
        }
        Ok((entries, _)) => entries,
        Err(err) => {
            local.shared.counters.revocation_sync_failures.fetch_add(1, Ordering::Relaxed);
            debug!(%err, "could not read the cluster's revocations; trying again");
            return;
        }
    };
    // Fewer than asked for: nothing more is stored now.
    let complete = entries.len() < REVOCATIONS_BATCH;
    if let Some(last) = entries.last() {
        local.revocations_seen.set(last.seq);
    }
    shard.enter(|h| {
        for (not_before, devices, users) in crate::revocation::by_time(entries) {
            let (devices, users): (Arc<[String]>, Arc<[String]>) = (devices.into(), users.into());
            for to in 0..h.shards() {
                let msg =
                    ShardMsg::Revoke { devices: devices.clone(), users: users.clone(), not_before, loaded: false };
                h.route(ShardId(to), msg);
            }
        }
        if complete && !local.revocations_marked.replace(true) {
            // After the entries on the same ordered links.
            for to in 0..h.shards() {
                let msg = ShardMsg::Revoke { devices: Arc::new([]), users: Arc::new([]), not_before: 0, loaded: true };
                h.route(ShardId(to), msg);
            }
            info!(node = %local.shared.node, "cluster revocations read; taking logins");
        }
    });
}

/// One tick of the drain: each user is sent to the node ranked first
/// for it among the live, non-draining others (the pacing is the
/// shard's, shared with single-node drain).
pub(super) fn cluster_drain_step<S: ClusterShard>(shard: &S, local: &Rc<Local<S>>) {
    let nodes = local.nodes.borrow();
    let others: Vec<NodeInfo> = nodes.iter().filter(|n| n.name != local.shared.node && !n.draining).cloned().collect();
    let endpoint = |user: &str| rank(user, &others, 1).first().map(|n| n.client_endpoint.clone()).unwrap_or_default();
    let sent = shard.drain_step(&local.drain, TICK, endpoint);
    local.shared.counters.go_away_sent.fetch_add(u64::from(sent), Ordering::Relaxed);
}
