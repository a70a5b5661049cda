//! Bounded memory of delivered event ids.
//!
//! Ids are remembered as keyed 64-bit fingerprints rather than as strings: no allocation per
//! event and 8 bytes per remembered id. Two different ids share a fingerprint with probability
//! about n²/2⁶⁵ for a window of n ids (under 10⁻⁹ for the default window), and the key comes from
//! the configured seed, so ids cannot be chosen to collide without it; since room version 3, ids
//! are hashes of their event, which leaves even a server that knows the key no say over them.
//! A collision would skip one event as already delivered.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use ruma_common::EventId;

/// Remembers the last `capacity` event ids delivered, oldest forgotten first.
#[derive(Debug)]
pub(crate) struct Dedup {
    seen: HashSet<u64, BuildHasherDefault<Prehashed>>,
    order: VecDeque<u64>,
    capacity: usize,
    key: u64,
}

/// Memory reserved up front; larger capacities grow on demand.
const PREALLOCATED: usize = 1 << 10;

impl Dedup {
    pub(crate) fn new(capacity: usize, seed: u64) -> Self {
        let capacity = capacity.max(1);
        let reserve = capacity.min(PREALLOCATED);
        Self {
            seen: HashSet::with_capacity_and_hasher(reserve, Default::default()),
            order: VecDeque::with_capacity(reserve),
            capacity,
            key: mix(seed ^ 0x6a09_e667_f3bc_c908),
        }
    }

    /// True the first time `id` is offered (within the memory window), false after.
    pub(crate) fn first_time(&mut self, id: &EventId) -> bool {
        let fingerprint = self.fingerprint(id.as_str());
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

    fn fingerprint(&self, id: &str) -> u64 {
        let bytes = id.as_bytes();
        let mut hash = self.key ^ (bytes.len() as u64).wrapping_mul(MULTIPLIER);
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
            hash = (hash ^ word).wrapping_mul(MULTIPLIER).rotate_left(29);
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        mix(hash ^ u64::from_le_bytes(tail))
    }
}

const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finalizer: every input bit affects every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The set's hasher: its keys are already well-mixed fingerprints.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by a `HashSet<u64>`; fold anything else in all the same.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(MULTIPLIER);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_oldest_past_capacity() {
        let mut d = Dedup::new(2, 7);
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
    fn fingerprints_differ_for_ids_differing_anywhere() {
        let d = Dedup::new(1, 0);
        let base = "$abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
        let mut seen = HashSet::new();
        assert!(seen.insert(d.fingerprint(base)));
        for i in 1..base.len() {
            let mut changed = base.as_bytes().to_vec();
            changed[i] ^= 1;
            let changed = String::from_utf8(changed).unwrap();
            assert!(seen.insert(d.fingerprint(&changed)), "byte {i}");
            assert!(seen.insert(d.fingerprint(&base[..i])), "prefix {i}");
        }
        // Zero padding of the tail must not make a shorter id equal a longer one.
        assert_ne!(d.fingerprint("$a:x"), d.fingerprint("$a:x\0"));
        assert_ne!(
            Dedup::new(1, 1).fingerprint(base),
            d.fingerprint(base),
            "keyed"
        );
    }

    /// For every input bit, how often each output bit changes when it flips, over `inputs`
    /// samples: the worst distance from one half (strict avalanche: every entry near 0.5).
    fn worst_avalanche(
        inputs: usize,
        bits: usize,
        hash: impl Fn(usize, usize) -> (u64, u64),
    ) -> f64 {
        let mut flips = vec![[0u32; 64]; bits];
        for input in 0..inputs {
            for (bit, counts) in flips.iter_mut().enumerate() {
                let (a, b) = hash(input, bit);
                for (out, count) in counts.iter_mut().enumerate() {
                    *count += u32::from((a ^ b) >> out & 1 == 1);
                }
            }
        }
        flips
            .iter()
            .flatten()
            .map(|&n| (f64::from(n) / inputs as f64 - 0.5).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn fingerprints_mix_every_bit_of_the_id_and_of_the_seed() {
        let ids: Vec<String> = (0..256).map(|i| format!("${:043}", i * 7919)).collect();
        let d = Dedup::new(1, 0);
        let flip = |id: &str, bit: usize| {
            let mut bytes = id.as_bytes().to_vec();
            // The low seven bits of each byte: the id stays ASCII.
            bytes[bit / 7] ^= 1 << (bit % 7);
            String::from_utf8(bytes).unwrap()
        };
        let by_id = worst_avalanche(ids.len(), 44 * 7, |i, bit| {
            (d.fingerprint(&ids[i]), d.fingerprint(&flip(&ids[i], bit)))
        });
        let by_seed = worst_avalanche(ids.len(), 64, |i, bit| {
            let other = Dedup::new(1, 1 << bit);
            (d.fingerprint(&ids[i]), other.fingerprint(&ids[i]))
        });
        let by_value = worst_avalanche(512, 64, |i, bit| {
            let x = (i as u64).wrapping_mul(MULTIPLIER);
            (mix(x), mix(x ^ (1 << bit)))
        });
        // Binomial noise with 256 samples or more: a standard deviation of at most 0.03; 0.3 is far beyond
        // chance, and what a missing or weakened mixing step gives (entries of 0 or 1).
        for (what, worst) in [("id", by_id), ("seed", by_seed), ("mix", by_value)] {
            assert!(worst < 0.3, "{what}: {worst}");
        }
    }

    #[test]
    fn the_set_hashes_fingerprints_as_they_are() {
        let mut h = Prehashed::default();
        h.write_u64(0xdead_beef);
        assert_eq!(h.finish(), 0xdead_beef);
        let bytes = |b: &[u8]| {
            let mut h = Prehashed::default();
            h.write(b);
            h.finish()
        };
        assert_ne!(bytes(b"ab"), bytes(b"ba"));
        assert_ne!(bytes(b"a"), bytes(b"b"));
        assert_ne!(bytes(b"a"), 0);
    }
}
