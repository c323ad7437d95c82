//! A cheap hasher for the maps a request looks up on its way: models by name, metric
//! series, idle backend connections by origin.
//!
//! The standard hasher (SipHash) resists keys chosen to collide, which costs a few hundred
//! instructions per lookup, and a request made several. These maps are filled only from
//! the configuration; a client's input is at most looked up in them, never inserted, so
//! it cannot pile entries into one bucket. FNV-1a is enough for that.

use std::hash::{BuildHasherDefault, Hasher};

/// FNV-1a, 64 bits.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_usize(&mut self, n: usize) {
        // A whole word at once: the keys' integers are pointers and small indexes.
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x0100_0000_01b3);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The `BuildHasher` for maps of this kind.
pub type FastHash = BuildHasherDefault<Fnv>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn matches_the_published_fnv1a_values_and_spreads_keys() {
        // Reference values of 64-bit FNV-1a.
        let hash = |s: &str| {
            let mut h = Fnv::default();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash("foobar"), 0x8594_4171_f739_67e8);
        // Neighbouring keys of the shapes used land in different low bits (buckets).
        let build = FastHash::default();
        let mut low: Vec<u64> = (8090..8098)
            .map(|p| build.hash_one(format!("127.0.0.1:{p}")) & 0xff)
            .collect();
        low.sort_unstable();
        low.dedup();
        assert_eq!(low.len(), 8);
    }
}
