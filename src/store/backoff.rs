//! The retry wait of the sync engine and of the Firebase change stream: one rule, their own
//! start and cap.

use std::time::Duration;

/// `start` doubling with each failure after the first, up to `cap`, with ±25 % jitter so that
/// a fleet does not retry in step. `failures` counts from 1 (0 waits as 1 does).
pub(crate) fn jittered(start: Duration, cap: Duration, failures: u32) -> Duration {
    let base = start
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(cap);
    base.mul_f64(0.75 + 0.5 * unit_random())
}

/// A cheap random number in [0, 1): the jitter needs no more.
fn unit_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::clock::now_ms());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(2);

    fn within(wait: Duration, base: Duration) -> bool {
        wait >= base.mul_f64(0.75) && wait <= base.mul_f64(1.25)
    }

    #[test]
    fn doubles_from_start_to_the_cap_within_the_jitter() {
        for _ in 0..100 {
            assert!(within(jittered(START, CAP, 0), START));
            assert!(within(jittered(START, CAP, 1), START));
            assert!(within(jittered(START, CAP, 2), START * 2));
            assert!(within(jittered(START, CAP, 4), START * 8));
            assert!(within(jittered(START, CAP, 5), START * 16));
            assert!(
                within(jittered(START, CAP, 6), CAP),
                "32 × start is over it"
            );
            assert!(within(jittered(START, CAP, u32::MAX), CAP));
        }
    }

    #[test]
    fn the_jitter_is_in_zero_to_one() {
        for _ in 0..1000 {
            let r = unit_random();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }
}
