//! When push requests must be answered: the per-shard deadline queue and
//! the alarm that wakes the shard for the next one.

use super::*;

/// Push-port requests by deadline, on their origin shard. Every entry is
/// one `push.reply_timeout_ms` after its start, so the queue is in deadline
/// order and the shard's timer tick pops what is due: no timer per request.
#[derive(Default)]
pub(crate) struct Deadlines {
    queue: VecDeque<(Millis, Expiry)>,
}

/// What a deadline ends.
pub(crate) enum Expiry {
    /// A request in `State::pending` (nothing to do if it was answered).
    Request(u64),
    /// A request answered by a task (cluster mode), which waits on it.
    Alarm(Rc<Alarm>),
}

impl Expiry {
    /// Whether the deadline still matters.
    pub(super) fn is_live(&self, pending: &std::collections::HashMap<u64, Pending>) -> bool {
        match self {
            Expiry::Request(token) => pending.contains_key(token),
            // The task holds the other reference while it waits.
            Expiry::Alarm(alarm) => Rc::strong_count(alarm) > 1,
        }
    }
}

/// Entries kept before answered ones are swept out early (their deadlines
/// otherwise keep them until they pass).
pub(super) const DEADLINES_SWEEP_AT: usize = 1024;

impl Deadlines {
    pub(crate) fn push(&mut self, at: Millis, what: Expiry) {
        self.queue.push_back((at, what));
    }

    /// Moves the entries due at `now` into `out`.
    pub(crate) fn take_due(&mut self, now: Millis, out: &mut Vec<Expiry>) {
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, what)) = self.queue.pop_front() {
                out.push(what);
            }
        }
    }

    /// Drops the entries of requests already answered once they make up
    /// most of the queue: it stays in proportion to the requests in flight.
    pub(super) fn sweep(&mut self, pending: &std::collections::HashMap<u64, Pending>) {
        if self.queue.len() >= DEADLINES_SWEEP_AT && self.queue.len() > 2 * (pending.len() + 64) {
            self.queue.retain(|(_, what)| what.is_live(pending));
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }
}

/// Rings once the deadline of a request answered by a task passes.
#[derive(Default)]
pub(crate) struct Alarm {
    pub(super) fired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Alarm {
    pub(super) fn fire(&self) {
        self.fired.set(true);
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the deadline passed.
    pub(crate) fn rang(&self) -> bool {
        self.fired.get()
    }

    /// `fut`'s output, or `None` when the alarm rings first.
    pub(crate) async fn before<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        let rung = std::future::poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            let mut slot = self.waker.borrow_mut();
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
            Poll::Pending
        });
        futures_lite::future::or(async { Some(fut.await) }, async {
            rung.await;
            None
        })
        .await
    }
}
