//! Bounded memory of delivered event ids.

use std::collections::{HashSet, VecDeque};

use ruma_common::{EventId, OwnedEventId};

/// Remembers the last `capacity` event ids delivered, oldest forgotten first.
#[derive(Debug)]
pub(crate) struct Dedup {
    seen: HashSet<OwnedEventId>,
    order: VecDeque<OwnedEventId>,
    capacity: usize,
}

impl Dedup {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True the first time `id` is offered (within the memory window), false after.
    pub(crate) fn first_time(&mut self, id: &EventId) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(id.to_owned());
        self.order.push_back(id.to_owned());
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
    }
}
