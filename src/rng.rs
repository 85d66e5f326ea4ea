//! Seeded randomness, each kind written once: the seed mixer that gives every row, epoch or
//! layer its own stream, and the two seeded orderings the pipeline uses. All of it is ChaCha8,
//! which is portable: the same seed gives the same titles, shots, split and batches on every
//! machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A stream seed for `(seed, stream)`, SplitMix64-finalized so neighbouring streams (row ids,
/// epochs, steps) are unrelated.
pub(crate) fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator of one stream of `seed`.
pub(crate) fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(seed, stream))
}

/// A generator seeded directly (a user's seed used as it is).
pub(crate) fn seeded(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `k` distinct indices of `0..n` in draw order: the first `k` steps of a forward Fisher-Yates
/// shuffle, so drawing more keeps the earlier draws.
pub(crate) fn draw(n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (rng.random::<u64>() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k.min(n));
    idx
}

/// A uniformly random permutation of `0..n` (Durstenfeld's Fisher-Yates, from the back).
pub(crate) fn permutation(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.random::<u64>() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_distinct_prefixes_of_one_shuffle() {
        let a = draw(50, 10, &mut seeded(3));
        let b = draw(50, 20, &mut seeded(3));
        assert_eq!(a[..], b[..10]);
        let mut s = b.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 20);
    }

    #[test]
    fn permutations_cover_everything_and_depend_on_the_seed() {
        let p = permutation(100, &mut seeded(1));
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(p, permutation(100, &mut seeded(2)));
        assert_ne!(mix(1, 0), mix(1, 1));
    }
}
