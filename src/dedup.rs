//! Bounded memory of delivered event ids.
//!
//! Ids are remembered as 64-bit fingerprints rather than as strings: no allocation per event
//! and 8 bytes per remembered id. The fingerprint is foldhash's quality hash under a key drawn
//! at random for each machine, so ids cannot be chosen to collide; two different ids share a
//! fingerprint with probability about n²/2⁶⁵ for a window of n ids (under 10⁻⁹ for the default
//! window), and a collision would skip one event as already delivered. The key is the only
//! thing in the machine not given by its inputs; it changes nothing else that comes out.
//! Being a keyed hash already, a fingerprint is its own hash in the set (`nohash-hasher`).

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;

use ruma_common::EventId;

/// Remembers the last `capacity` event ids delivered, oldest forgotten first.
#[derive(Debug)]
pub(crate) struct Dedup {
    seen: HashSet<u64, nohash_hasher::BuildNoHashHasher<u64>>,
    order: VecDeque<u64>,
    capacity: usize,
    key: foldhash::quality::RandomState,
}

/// Memory reserved up front; larger capacities grow on demand. Small, because a machine is
/// often made for a short sync (a one-shot check, a test) where clearing a larger table would
/// cost more than the sync's parse; growing later costs a few rehashes of a large batch.
const PREALLOCATED: usize = 1 << 7;

impl Dedup {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let reserve = capacity.min(PREALLOCATED);
        Self {
            seen: HashSet::with_capacity_and_hasher(reserve, Default::default()),
            order: VecDeque::with_capacity(reserve),
            capacity,
            key: Default::default(),
        }
    }

    /// Makes room for `events` more ids (as many as the window keeps), so that a large batch
    /// does not grow the table step by step.
    pub(crate) fn reserve(&mut self, events: usize) {
        let more = events.min(self.capacity.saturating_sub(self.order.len()));
        self.seen.reserve(more);
        self.order.reserve(more);
    }

    /// True the first time `id` is offered (within the memory window), false after.
    pub(crate) fn first_time(&mut self, id: &EventId) -> bool {
        let fingerprint = self.key.hash_one(id.as_str());
        if !self.seen.insert(fingerprint) {
            return false;
        }
        self.order.push_back(fingerprint);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_oldest_past_capacity() {
        let mut d = Dedup::new(2);
        let id = |s: &str| EventId::parse(s).unwrap();
        assert!(d.first_time(&id("$a:x")));
        assert!(!d.first_time(&id("$a:x")));
        assert!(d.first_time(&id("$b:x")));
        assert!(d.first_time(&id("$c:x")));
        assert!(d.first_time(&id("$a:x")), "a was forgotten");
        assert!(!d.first_time(&id("$c:x")));
        assert_eq!((d.seen.len(), d.order.len()), (2, 2));
    }

    #[test]
    fn reserves_for_a_batch_no_more_than_the_window() {
        let mut d = Dedup::new(1000);
        d.reserve(600);
        assert!(d.seen.capacity() >= 600 && d.order.capacity() >= 600);
        d.reserve(1_000_000);
        assert!(d.seen.capacity() >= 1000 && d.order.capacity() >= 1000);
        assert!(d.order.capacity() < 4096, "not past the window");
    }

    #[test]
    fn reserves_up_to_a_hundred_ids_up_front() {
        let small = Dedup::new(10);
        assert!(small.order.capacity() >= 10 && small.seen.capacity() >= 10);
        let large = Dedup::new(16_384);
        assert!(large.order.capacity() >= PREALLOCATED);
        assert!(large.seen.capacity() >= PREALLOCATED);
        assert!(large.order.capacity() < 16_384, "the rest grows on demand");
    }

    #[test]
    fn each_machine_draws_its_own_key() {
        let (a, b) = (Dedup::new(1), Dedup::new(1));
        assert_ne!(a.key.hash_one("$same:x"), b.key.hash_one("$same:x"));
    }
}
