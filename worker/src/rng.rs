//! Keyed, stateless randomness.
//!
//! Every random draw in the worker is a pure function of a key — `(seed, parameter name)` for
//! initialisation, `(seed, step, sample index)` for data — never of a stream position. So an
//! expert initialises identically on whichever worker owns it, the data of step `s` does not
//! depend on how many workers there are, and a checkpoint needs no RNG state beyond the seed.

/// SplitMix64 finaliser: a bijective 64-bit mix with full avalanche.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes a sequence of words into one key (order-sensitive).
pub fn key(words: &[u64]) -> u64 {
    words.iter().fold(0x6A09_E667_F3BC_C908, |acc, &w| mix64(acc ^ mix64(w)))
}

/// FNV-1a of a string, used to turn parameter names into key words.
pub fn name_word(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
}

/// A small counter-based generator seeded from a key: draw `i` is `mix64(key + i)`.
#[derive(Clone, Debug)]
pub struct KeyedStream {
    key: u64,
    counter: u64,
}

impl KeyedStream {
    /// A stream for `key`, starting at draw 0.
    pub fn new(key: u64) -> Self {
        Self { key, counter: 0 }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let out = mix64(self.key.wrapping_add(self.counter.wrapping_mul(0xD1B5_4A32_D192_ED03)));
        self.counter += 1;
        out
    }

    /// A uniform draw in the open interval (0, 1).
    pub fn next_open01(&mut self) -> f64 {
        // 53 random mantissa bits, shifted off zero.
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// `n` draws from N(0, std²) as f32, by Box–Muller.
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let (u1, u2) = (self.next_open01(), self.next_open01());
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let theta = std::f64::consts::TAU * u2;
            out.push((r * theta.cos()) as f32);
            out.push((r * theta.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_draws_are_reproducible_and_key_sensitive() {
        let a = KeyedStream::new(key(&[42, name_word("layers.0.wq")])).normals(1000, 1.0);
        let b = KeyedStream::new(key(&[42, name_word("layers.0.wq")])).normals(1000, 1.0);
        let c = KeyedStream::new(key(&[42, name_word("layers.0.wk")])).normals(1000, 1.0);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / 1000.0;
        let var = a.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / 1000.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "mean {mean} var {var}");
    }
}
