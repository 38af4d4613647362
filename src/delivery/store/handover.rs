//! The memory store as plain data, for the in-place upgrade: the old
//! process takes an image of each shard's store and the new one rebuilds
//! it, so at-least-once messages waiting in memory survive the upgrade
//! (same sequences, same incarnation: clients notice nothing). Status
//! records of finished messages are not carried over.

use std::collections::VecDeque;

use super::{MemoryStore, Retention, Stored, Timeline, live_cost, message_cost, timeline_cost};

/// A memory store's contents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreImage {
    pub base_seq: u64,
    pub incarnation: u64,
    pub reuse_floor: u64,
    pub timelines: Vec<TimelineImage>,
}

/// One device's timeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimelineImage {
    pub device: String,
    pub floor: u64,
    pub last: u64,
    pub acked: u64,
    pub replays: u32,
    pub replayed_through: u64,
    /// Learned recovery time (ms) and until when it is kept (unix ms).
    pub learned: Option<(u32, u64)>,
    /// Messages and when each was first sent (unix ms).
    pub messages: Vec<(Stored, Option<u64>)>,
}

impl MemoryStore {
    /// A copy of the store's timelines.
    pub fn image(&self) -> StoreImage {
        let timelines = self
            .timelines
            .borrow()
            .iter()
            .map(|(device, tl)| TimelineImage {
                device: device.clone(),
                floor: tl.floor,
                last: tl.last,
                acked: tl.acked,
                replays: tl.replays,
                replayed_through: tl.replayed_through,
                learned: tl.learned,
                messages: tl.messages.iter().cloned().collect(),
            })
            .collect();
        StoreImage {
            base_seq: self.base_seq,
            incarnation: self.incarnation,
            reuse_floor: self.reuse_floor.get(),
            timelines,
        }
    }

    /// The store an image was taken of, counted against the byte cap as
    /// appends would have counted it (it may start above the cap: appends
    /// are refused until clients acknowledge).
    pub fn from_image(retention: Retention, image: StoreImage) -> MemoryStore {
        let mut store = MemoryStore::new(retention, 0);
        store.base_seq = image.base_seq;
        store.incarnation = image.incarnation.max(1);
        store.reuse_floor.set(image.reuse_floor);
        {
            let mut timelines = store.timelines.borrow_mut();
            let mut live = store.live.borrow_mut();
            for t in image.timelines {
                store.add_bytes(timeline_cost(&t.device));
                let mut tl = Timeline {
                    floor: t.floor,
                    last: t.last,
                    acked: t.acked,
                    messages: VecDeque::new(),
                    replays: t.replays,
                    replayed_through: t.replayed_through,
                    learned: t.learned,
                };
                for (m, sent) in t.messages {
                    live.insert(m.message_id, (t.device.clone(), m.seq));
                    store.add_bytes(live_cost(&t.device) + message_cost(&m));
                    store.resized(&mut tl, |tl| tl.messages.push_back((m, sent)));
                }
                timelines.insert(t.device, tl);
            }
        }
        store
    }
}

#[cfg(test)]
mod tests {
    use super::super::{NewMessage, TimelineStore};
    use super::*;

    fn block<T>(f: super::super::StoreFuture<'_, T>) -> T {
        futures_lite::future::block_on(f).expect("memory store answers")
    }

    #[test]
    fn an_image_rebuilds_the_same_store() {
        let store = MemoryStore::new(Retention::default(), 1_000);
        for id in 1..=3 {
            let msg = NewMessage { message_id: id, service_id: "s".into(), payload: "p".into(), expires_at_ms: 0 };
            block(store.append("dev", msg, 5));
        }
        let first = store.base_seq() + 1;
        block(store.ack("dev", first, 6));
        let copy = MemoryStore::from_image(Retention::default(), store.image());
        assert_eq!(copy.image(), store.image());
        assert_eq!(copy.bytes(), store.bytes());
        assert_eq!(copy.incarnation(), store.incarnation());
        let replay = block(copy.replay("dev", first, 10, 7));
        assert_eq!(replay.messages.iter().map(|m| m.message_id).collect::<Vec<_>>(), [2, 3]);
        // The next sequence follows on, as in the old store.
        let msg = NewMessage { message_id: 4, service_id: "s".into(), payload: "p".into(), expires_at_ms: 0 };
        assert_eq!(block(copy.append("dev", msg, 8)).seq, first + 3);
    }
}
