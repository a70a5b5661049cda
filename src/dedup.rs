//! Bounded memory of delivered event ids.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use ruma_common::EventId;

/// Remembers the last `capacity` event ids delivered, oldest forgotten first.
///
/// Each id is stored once, shared by the set (for lookups) and the queue (for eviction order).
#[derive(Debug)]
pub(crate) struct Dedup {
    seen: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
    capacity: usize,
}

/// Memory reserved up front; larger capacities grow on demand.
const PREALLOCATED: usize = 1 << 10;

impl Dedup {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let reserve = capacity.min(PREALLOCATED);
        Self {
            seen: HashSet::with_capacity(reserve),
            order: VecDeque::with_capacity(reserve),
            capacity,
        }
    }

    /// True the first time `id` is offered (within the memory window), false after.
    pub(crate) fn first_time(&mut self, id: &EventId) -> bool {
        if self.seen.contains(id.as_str()) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        let id: Arc<str> = Arc::from(id.as_str());
        self.seen.insert(id.clone());
        self.order.push_back(id);
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
}
