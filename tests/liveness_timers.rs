//! longlink patch 2 regression: a latency-ring timer kept by `Reactor::wait`
//! that completes after the keep decision is consumed by the later
//! `consume_rings!`; the park then saw `Some(src)` and armed no timer, so the
//! executor slept past its next user timer (forever when idle). A short
//! preemption timer makes the kept timer expire inside that window often.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

#[test]
fn a_parked_executor_wakes_for_its_next_timer() {
    const SLEEPS: u64 = 3000;
    let done = Arc::new(AtomicU64::new(0));
    let progress = done.clone();
    let handle = LocalExecutorBuilder::new(Placement::Unbound)
        .preempt_timer(Duration::from_micros(50))
        .spawn(move || async move {
            for _ in 0..SLEEPS {
                // further away than the preemption timer armed by the last turn
                glommio::timer::sleep(Duration::from_millis(2)).await;
                progress.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
    let (mut last, mut since) = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let n = done.load(Ordering::Relaxed);
        if n == SLEEPS {
            handle.join().unwrap();
            return;
        }
        if n != last {
            (last, since) = (n, Instant::now());
        }
        // The executor thread is left asleep on failure: it cannot be woken.
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "executor slept past a 2 ms timer for 10 s after {n} of {SLEEPS} sleeps"
        );
    }
}
