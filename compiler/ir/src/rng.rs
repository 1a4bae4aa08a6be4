//! Kiln's counter-based random numbers.
//!
//! Value `i` of stream `(seed, stream)` is a pure function `mix(seed, stream, i)`: no state,
//! so any element can be computed independently, in any order, on any backend, and the same
//! seed always gives the same tensor. The mixer is SplitMix64's finalizer applied to a Weyl
//! sequence over the key, which passes BigCrush for sequential counters.

/// The Weyl sequence's increment (2⁶⁴/φ).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finalizer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of stream `stream` under `seed`: `bits` is `mix64(key + (i + 1)·GOLDEN)`, which
/// is what generated code computes per element with the key folded in.
pub fn key(seed: u64, stream: u64) -> u64 {
    mix64(seed.wrapping_mul(GOLDEN) ^ mix64(stream.wrapping_add(GOLDEN)))
}

/// 64 random bits for counter `i` of stream `stream` under `seed`.
pub fn bits(seed: u64, stream: u64, i: u64) -> u64 {
    mix64(key(seed, stream).wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// A uniform number in [0, 1) with 53 random bits.
pub fn uniform(seed: u64, stream: u64, i: u64) -> f64 {
    (bits(seed, stream, i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A standard normal number (Box–Muller over counters 2i and 2i+1).
pub fn normal(seed: u64, stream: u64, i: u64) -> f64 {
    let u1 = 1.0 - uniform(seed, stream, 2 * i); // (0, 1]: log is finite
    let u2 = uniform(seed, stream, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A stable 64-bit stream id for a name (FNV-1a), so a parameter's values depend on its
/// checkpoint name and the seed only, not on its position in the graph.
pub fn stream_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_deterministic_and_in_range() {
        let a: Vec<f64> = (0..1000).map(|i| uniform(7, 3, i)).collect();
        let b: Vec<f64> = (0..1000).map(|i| uniform(7, 3, i)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = a.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
        assert_ne!(uniform(7, 3, 0), uniform(8, 3, 0));
        assert_ne!(uniform(7, 3, 0), uniform(7, 4, 0));
    }

    #[test]
    fn normal_has_unit_variance() {
        let v: Vec<f64> = (0..20000).map(|i| normal(1, 2, i)).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
