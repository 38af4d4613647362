//! At-least-once state across the in-place upgrade ([`crate::upgrade`]).
//! The timeline is the source of truth and travels with the memory store;
//! of the window only the client's cumulative ACK and the learned recovery
//! time are carried over. The new process sends again what the timeline
//! holds after that ACK: the client drops sequences it already has.

use super::*;

impl Shard {
    /// The delivery state of session `key` to carry over, if it has one.
    pub(crate) fn delivery_image(&self, st: &State, key: ConnKey) -> Option<(u64, Option<u32>)> {
        let t = st.reliable.get(&key.index).filter(|t| t.key == key)?;
        Some((t.window.acked(), t.window.learned_ms()))
    }

    /// Restores what [`Shard::delivery_image`] took, for a session that is
    /// active here now: replays the timeline after the client's ACK.
    pub(crate) fn restore_delivery(&self, st: &mut State, key: ConnKey, now: Now, image: (u64, Option<u32>)) {
        let (acked, learned) = image;
        let mut t = Tracked::new(key, acked).learned(learned);
        t.backlog = true;
        self.track(st, t);
        self.refill(st, key, now);
    }
}
