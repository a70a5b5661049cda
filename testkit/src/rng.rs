//! The tests' one random generator: SplitMix64 (Vigna), seeded and the same on every
//! platform, so a seed names a run. Simulations, the fault-injecting proxy, the benchmark
//! body generator and the reference backoff all draw from it; the machine's own jitter
//! generator is the library's and is replayed by [`crate::backoff`] with this one.

/// SplitMix64, written from its published definition.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`: the top 53 bits over 2^53.
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), by remainder (the bias is irrelevant for tests).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`, by remainder.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "empty range {lo}..={hi}");
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `lo..=hi`, by remainder.
    pub fn between(&mut self, (lo, hi): (usize, usize)) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_unit() < p
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// One of `items` (not empty), uniformly, by [`SplitMix64::below`].
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Uniform index in `0..len` from one 64-bit draw, by multiply-shift.
pub fn index_below(draw: u64, len: usize) -> usize {
    ((u128::from(draw) * len as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::{index_below, SplitMix64};

    #[test]
    fn seed_zero_gives_the_published_first_outputs() {
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn derived_draws_stay_in_their_ranges() {
        let mut r = SplitMix64::new(7);
        for _ in 0..1000 {
            let u = r.next_unit();
            assert!((0.0..1.0).contains(&u));
            assert!(r.below(3) < 3);
            assert!(index_below(r.next_u64(), 5) < 5);
            assert!((4..=6).contains(&r.range(4, 6)));
            assert!((2..=2).contains(&r.between((2, 2))));
        }
        assert!(!r.chance(0.0) && r.chance(1.0));
        assert!(!r.percent(0) && r.percent(100));
    }
}
