//! Bounded queues under a shard that stops: one executor thread of a real
//! node is frozen (ptrace), pushes keep coming, memory must stay bounded
//! and every push must be answered once the shard runs again.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use longlink::backend::{PushClient, Reply, Request};
use longlink::protocol::ids::owner_shard;
use longlink::protocol::proto::{self, PushStatus};

/// One thread of another process, stopped with ptrace (only that thread:
/// the rest of the process runs on). Resumed on drop.
struct StoppedThread {
    tid: libc::pid_t,
}

impl StoppedThread {
    /// Stops a glommio executor thread of `pid`: one named after the shard
    /// executors that is waiting in io_uring_enter (its blocking-pool
    /// threads share the name but wait elsewhere).
    fn stop_a_shard_of(pid: u32) -> StoppedThread {
        const IO_URING_ENTER: &str = "426";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks").flatten() {
                let path = task.path();
                let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                let syscall = std::fs::read_to_string(path.join("syscall")).unwrap_or_default();
                if comm.starts_with("longlink-shard") && syscall.split(' ').next() == Some(IO_URING_ENTER) {
                    let tid: libc::pid_t = task.file_name().to_string_lossy().parse().expect("tid");
                    return StoppedThread::stop(tid);
                }
            }
            assert!(Instant::now() < deadline, "no shard executor found waiting in io_uring_enter");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(tid: libc::pid_t) -> StoppedThread {
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: ptrace on a thread of a child process; no memory of ours
        // is passed. SEIZE + INTERRUPT stops this one thread, not its group.
        unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, tid, null, null), 0, "{}", std::io::Error::last_os_error());
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid, "{}", std::io::Error::last_os_error());
        }
        StoppedThread { tid }
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        let null = std::ptr::null_mut::<libc::c_void>();
        // SAFETY: as in `stop`; detaching resumes the thread.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid, null, null) };
    }
}

/// Two device ids owned by different shards of a 2-shard node.
fn one_device_per_shard() -> [String; 2] {
    let mut found: [Option<String>; 2] = [None, None];
    for i in 0.. {
        let device = format!("bp-dev-{i}");
        let slot = &mut found[owner_shard(&device, 2).index()];
        slot.get_or_insert(device);
        if let [Some(a), Some(b)] = &found {
            return [a.clone(), b.clone()];
        }
    }
    unreachable!()
}

#[test]
fn a_stopped_shard_makes_the_push_port_stop_reading_instead_of_growing_memory() {
    const BACKENDS: usize = 8;
    const PUSHES: usize = 4_000;
    let mut cfg = test_config(2);
    // The per-connection bound alone would let 8 connections queue 8 x 1 M
    // requests: only the mesh bound holds them here.
    cfg.push.max_inflight_per_backend = 1 << 20;
    let node = NodeProcess::start(&cfg);
    let devices = one_device_per_shard();
    let payload = Bytes::from(vec![b'p'; 8 * 1024]);
    let request = || {
        let targets = proto::Targets { devices: devices.to_vec(), ..Default::default() };
        Request::Push(proto::PushRequest { targets: Some(targets), payload: payload.clone(), ..Default::default() })
    };
    // Warm up every path (first allocations) before the baseline.
    let mut warm = PushClient::connect(node.push_addr, Duration::from_secs(5), &push_key()).unwrap();
    for _ in 0..200 {
        let Request::Push(req) = request() else { unreachable!() };
        warm.push_request(req).unwrap();
    }
    let rss_before = node.rss_bytes();

    // Connected (and authenticated: the accepting shard answers the
    // challenge) before the shard stops.
    let clients: Vec<PushClient> = (0..BACKENDS)
        .map(|_| PushClient::connect(node.push_addr, Duration::from_secs(5), &push_key()).unwrap())
        .collect();
    let stopped = StoppedThread::stop_a_shard_of(node.child.id());
    // Every request has a part for each shard. Connections the running
    // shard reads send the stopped one a part per request; the others are
    // not read at all.
    let sent: Arc<Vec<AtomicUsize>> = Arc::new((0..BACKENDS).map(|_| AtomicUsize::new(0)).collect());
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (b, mut client) in clients.into_iter().enumerate() {
        client.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let (mut tx, mut rx) = client.split().unwrap();
        let sent = sent.clone();
        let reqs: Vec<Request> = (0..PUSHES).map(|_| request()).collect();
        senders.push(std::thread::spawn(move || {
            for req in reqs {
                tx.send(req).unwrap();
                sent[b].fetch_add(1, Ordering::Relaxed);
            }
            tx.flush().unwrap();
            tx
        }));
        receivers.push(std::thread::spawn(move || {
            (0..PUSHES)
                .map(|_| match rx.recv().unwrap() {
                    Reply::Push(r) => r,
                    other => panic!("{other:?}"),
                })
                .collect::<Vec<_>>()
        }));
    }
    // Wait until the senders are done or blocked (no progress for 2 s).
    let total = || sent.iter().map(|s| s.load(Ordering::Relaxed)).sum::<usize>();
    let (mut last, mut since) = (total(), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(120);
    while total() < BACKENDS * PUSHES && since.elapsed() < Duration::from_secs(2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        if total() != last {
            (last, since) = (total(), Instant::now());
        }
    }
    let growth = node.rss_bytes().saturating_sub(rss_before);
    let sent_while_stopped = total();
    drop(stopped);

    // Every push is answered once the shard runs again.
    for r in receivers {
        let replies = r.join().unwrap();
        assert_eq!(replies.len(), PUSHES);
        for reply in replies {
            assert!(reply.results.iter().all(|r| r.status == PushStatus::NotOnline as i32), "{reply:?}");
        }
    }
    for s in senders {
        s.join().unwrap();
    }
    // Unbounded, the running shard would read every request of its
    // connections (about half of 8 x 4,000 x 8 KiB = 128 MiB) and keep a
    // part of each for the stopped one.
    assert!(
        growth < 64 << 20,
        "node RSS grew by {} MiB while a shard was stopped ({sent_while_stopped} requests sent)",
        growth >> 20
    );
}

#[test]
fn the_memory_store_refuses_at_least_once_pushes_past_its_cap_and_frees_room_as_clients_ack() {
    const REQUESTS: usize = 500;
    const TARGETS: usize = 100;
    let mut cfg = test_config(2);
    cfg.delivery.memory_store_bytes = 4 << 20;
    let node = NodeProcess::start(&cfg);
    let mut push = PushClient::connect(node.push_addr, Duration::from_secs(5), &push_key()).unwrap();
    push.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let rss_before = node.rss_bytes();
    // Pushes to device ids nobody will ever connect with (a backend bug),
    // until the store is full; a few more after that.
    let (mut stored, mut rejected, mut full_at) = (0usize, 0usize, None);
    for r in 0..REQUESTS {
        let devices: Vec<String> = (0..TARGETS).map(|t| format!("made-up-{r}-{t}")).collect();
        let reply =
            push.push_devices_at_least_once(&devices, Bytes::from_static(b"hello, device that is not there")).unwrap();
        for t in &reply.results {
            match PushStatus::try_from(t.status) {
                Ok(PushStatus::Stored) => stored += 1,
                Ok(PushStatus::Rejected) => {
                    assert!(t.retryable && t.reason.contains("timeline store full"), "{t:?}");
                    rejected += 1;
                }
                other => panic!("{other:?}: {t:?}"),
            }
        }
        if rejected > 0 && full_at.is_none() {
            full_at = Some(r);
        }
        if full_at.is_some_and(|f| r >= f + 20) {
            break;
        }
    }
    let growth = node.rss_bytes().saturating_sub(rss_before);
    assert!(rejected > 0, "never full after {stored} copies ({} MiB more RSS)", growth >> 20);
    // Unbounded, 50,000 copies took about 38 MiB here (770 bytes each).
    assert!(growth < 16 << 20, "node RSS grew by {} MiB for {stored} copies", growth >> 20);

    // A device with stored messages connects, gets them and acknowledges:
    // its shard has room again, for it at least.
    let device = "made-up-0-0";
    let cfg2 = cfg.clone();
    let addr = node.client_addr;
    run(async move {
        let mut conn = connect_all(addr, &cfg2, &[("someone".into(), device.into())]).await.remove(0);
        let m = next_message(&mut conn).await;
        assert_eq!(m.payload, Bytes::from_static(b"hello, device that is not there"));
        conn.ack_now().await.unwrap();
        assert_nothing_queued(&mut conn).await; // the Ack was handled
    });
    let reply = push.push_devices_at_least_once(&[device], Bytes::from_static(b"again")).unwrap();
    assert_eq!(PushStatus::try_from(reply.results[0].status), Ok(PushStatus::Stored), "{reply:?}");
}
