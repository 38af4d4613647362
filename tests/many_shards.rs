//! A node with more shards than a 64-bit shard set holds (hosts with more
//! than 64 cores): 100 shards on this 2-core box, unpinned.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use longlink::backend::PushClient;
use longlink::client::{ClientEvent, Connection};
use longlink::protocol::ids::owner_shard;
use longlink::protocol::proto::PushStatus;

const SHARDS: u16 = 100;
const USERS: usize = 100;
const DEVICES_PER_USER: usize = 3;

/// The next message on `conn`, acknowledging as the client does.
async fn message(conn: &mut Connection) -> longlink::protocol::proto::Message {
    loop {
        match conn.next_event().await.expect("connection stays up") {
            ClientEvent::Message(m) => return m,
            _ => continue,
        }
    }
}

#[test]
fn a_node_with_100_shards_routes_devices_users_and_groups_with_unique_ids() {
    let mut cfg = test_config(SHARDS);
    // 100 executors on 2 cores: small rings keep the node's memory modest.
    cfg.server.ring_depth = 256;
    // Hand-offs cross 100 executors sharing 2 cores: more than the test
    // config's 600 ms may pass between Auth and activation.
    cfg.session.auth_timeout_ms = 10_000;
    // The clients are not polled between steps: no idle timeout meanwhile.
    cfg.session.heartbeat_default_ms = 120_000;
    // Every executor wakes once a tick; 100 of them on 2 cores add up.
    cfg.session.wheel_tick_ms = 100;
    let server = start(&cfg);
    let addr = server.client_addr();
    let pairs: Vec<(String, String)> = (0..USERS)
        .flat_map(|u| (0..DEVICES_PER_USER).map(move |d| (format!("many-u{u}"), format!("many-u{u}-d{d}"))))
        .collect();
    let owners: HashSet<u16> = pairs.iter().map(|(_, d)| owner_shard(d, SHARDS).0).collect();
    let homes: HashSet<u16> = pairs.iter().map(|(u, _)| longlink::protocol::ids::home_shard(u, SHARDS).0).collect();
    assert!(owners.len() >= 80 && owners.iter().any(|&s| s >= 64), "devices on {} shards", owners.len());
    assert!(homes.iter().any(|&s| s >= 64), "some user directories above shard 63");
    let mut push = PushClient::connect(server.push_addr(), Duration::from_secs(5), &push_key()).expect("push port");
    push.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let devices: Vec<String> = pairs.iter().map(|(_, d)| d.clone()).collect();
    let users: Vec<String> = (0..USERS).map(|u| format!("many-u{u}")).collect();
    let n = pairs.len();

    let ids = run(async move {
        let mut conns = connect_all(addr, &cfg, &pairs).await;
        let reply = push.group_update("everyone", &devices, &[]).unwrap();
        assert!(reply.results.iter().all(|r| r.sessions == 1), "{reply:?}");
        let mut ids: Vec<u64> = Vec::new();
        let mut seen_by_clients: Vec<u64> = Vec::new();

        // Devices: one batch, every owner shard.
        let reply = push.push_devices(&devices, Bytes::from_static(b"to devices")).unwrap();
        assert_eq!(reply.delivered, n as u64, "{reply:?}");
        ids.push(reply.message_id);
        // Users: home shards 0..99 look their sessions up.
        let reply = push.push_users(&users, Bytes::from_static(b"to users")).unwrap();
        assert!(reply.results.iter().all(|r| r.sessions == DEVICES_PER_USER as u32), "{reply:?}");
        ids.push(reply.message_id);
        // A group with members on every shard.
        let reply = push.push_group("everyone", Bytes::from_static(b"to the group")).unwrap();
        assert_eq!((PushStatus::try_from(reply.status), reply.delivered), (Ok(PushStatus::Delivered), n as u64));
        ids.push(reply.message_id);
        for c in &mut conns {
            for expected in [&b"to devices"[..], b"to users", b"to the group"] {
                let m = message(c).await;
                assert_eq!(m.payload, Bytes::from_static(expected));
                seen_by_clients.push(m.message_id);
            }
        }

        // At-least-once to every user: each holding shard gives its copies
        // ids in the same milliseconds, so shards 64 apart must not share
        // worker bits.
        for round in 0..5 {
            let reply = push
                .push_request(longlink::protocol::proto::PushRequest {
                    targets: Some(longlink::protocol::proto::Targets { users: users.clone(), ..Default::default() }),
                    payload: Bytes::from(format!("stored {round}")),
                    qos: longlink::protocol::proto::Qos::AtLeastOnce as i32,
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(reply.stored, n as u64, "{reply:?}");
            ids.extend(reply.results.iter().flat_map(|r| r.copies.iter().map(|c| c.message_id)));
        }
        for c in &mut conns {
            for round in 0..5 {
                let m = message(c).await;
                assert_eq!(m.payload, Bytes::from(format!("stored {round}")));
                seen_by_clients.push(m.message_id);
            }
        }
        let mut per_id: HashMap<u64, usize> = HashMap::new();
        for id in &seen_by_clients {
            *per_id.entry(*id).or_default() += 1;
        }
        // At-most-once ids are shared by every recipient; stored copies
        // each have their own.
        assert_eq!(per_id.len(), 3 + 5 * n, "distinct ids seen by clients");
        ids
    });
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "message ids repeat");
    let handed: u64 = server.counters().iter().map(|c| c.handed_off.load(Ordering::Relaxed)).sum();
    assert!(handed > 0, "connections crossed shards");
    server.shutdown();
}
