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

impl Dedup {
    /// Reserves nothing: each batch reserves what it brings ([`reserve`](Self::reserve)), and
    /// a machine made for a short sync (a one-shot check, a test) would pay more to set up a
    /// table than to parse its sync.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
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
    fn reserves_nothing_up_front() {
        let d = Dedup::new(16_384);
        assert_eq!((d.order.capacity(), d.seen.capacity()), (0, 0));
    }

    #[test]
    fn each_machine_draws_its_own_key() {
        let (a, b) = (Dedup::new(1), Dedup::new(1));
        assert_ne!(a.key.hash_one("$same:x"), b.key.hash_one("$same:x"));
    }
}
