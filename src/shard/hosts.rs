//! The contexts the shard gives its feature components: each borrows the
//! shard and its state for one call and carries out what the component
//! asks (send to a slot, answer an origin, run a store job).

use std::task::{Context, Poll, Waker};

use super::*;
use crate::delivery::reliable::{self, Host, Reliable, StoreJob};

/// The shard as seen by a component during one call.
pub(crate) struct ShardCtx<'a> {
    pub(crate) shard: &'a Shard,
    pub(crate) st: &'a mut State,
}

impl Host for ShardCtx<'_> {
    fn delivery(&mut self) -> &mut Reliable {
        &mut self.st.reliable
    }

    fn target(&self, key: ConnKey) -> Option<(&str, bool, bool)> {
        self.st.delivery_target(key)
    }

    fn device_slot(&self, device: &str) -> Option<u32> {
        self.st.device_slot(device)
    }

    fn key_of(&self, slot: u32) -> ConnKey {
        self.st.key_of(slot)
    }

    fn wake_at(&mut self, key: ConnKey, at: Millis) {
        self.st.wake_at(key, at);
    }

    fn deliver(&mut self, slot: u32, frame: &Bytes) -> bool {
        ShardCtx::deliver(self, slot, frame)
    }

    fn send(&mut self, slot: u32, frame: &Bytes) -> bool {
        ShardCtx::send_to_slot(self, slot, frame)
    }

    fn answer(&mut self, origin: Origin, part: Part) {
        self.shard.answer(self.st, origin, part);
    }

    fn run_store(&mut self, mut job: StoreJob) {
        // The memory store answers at once: carried on inline.
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(done) = job.as_mut().poll(&mut cx) {
            let now = self.shard.now();
            return reliable::done(self, now, done);
        }
        let Some(shard) = self.shard.me.upgrade() else { return };
        glommio::spawn_local(async move {
            // glommio polls a new task right away, inside the caller's
            // borrow of the state: wait for the next turn.
            futures_lite::future::yield_now().await;
            let done = job.await;
            let now = shard.now();
            let mut st = shard.state.borrow_mut();
            reliable::done(&mut shard.ctx(&mut st), now, done);
        })
        .detach();
    }
}
