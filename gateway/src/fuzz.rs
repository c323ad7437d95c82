//! Deterministic pseudo-random inputs for the parsers' never-panic tests.
//!
//! A fixed seed makes every run try the same inputs, so a failure reproduces; xorshift
//! is enough to spread them over the syntax each test's alphabet is biased towards.

/// A xorshift64 generator.
pub(crate) struct XorShift(u64);

impl XorShift {
    /// A generator started at `seed` (not zero: zero stays zero).
    pub(crate) fn new(seed: u64) -> XorShift {
        assert_ne!(seed, 0, "xorshift never leaves zero");
        XorShift(seed)
    }

    /// The next value.
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `len` bytes, each from `alphabet`, or (one in `any_byte_in`, when given) any byte
    /// at all.
    pub(crate) fn bytes(
        &mut self,
        alphabet: &[u8],
        len: usize,
        any_byte_in: Option<u64>,
    ) -> Vec<u8> {
        (0..len)
            .map(|_| {
                let x = self.next();
                match any_byte_in {
                    Some(n) if x.is_multiple_of(n) => (x >> 8) as u8,
                    _ => alphabet[(x % alphabet.len() as u64) as usize],
                }
            })
            .collect()
    }
}
