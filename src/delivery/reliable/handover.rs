//! At-least-once state across the in-place upgrade ([`crate::upgrade`]).
//! The timeline is the source of truth and travels with the memory store;
//! of the window only the client's cumulative ACK and the learned recovery
//! time are carried over. The new process sends again what the timeline
//! holds after that ACK: the client drops sequences it already has.

use super::*;

impl Reliable {
    /// The delivery state of session `key` to carry over, if it has one.
    pub(crate) fn image(&self, key: ConnKey) -> Option<(u64, Option<u32>)> {
        let t = self.tracked.get(&key.index).filter(|t| t.key == key)?;
        Some((t.window.acked(), t.window.learned_ms()))
    }
}

/// Restores what [`Reliable::image`] took, for a session that is active
/// here now: replays the timeline after the client's ACK.
pub(crate) fn restore<H: Host>(h: &mut H, key: ConnKey, now: Now, image: (u64, Option<u32>)) {
    let (acked, learned) = image;
    let mut t = Tracked::new(key, acked).learned(learned);
    t.backlog = true;
    h.delivery().track(t);
    refill(h, key, now);
}
