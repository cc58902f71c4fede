//! Push ids for POST: 20 characters from `-0-9A-Z_a-z`, eight encoding the time in ms and
//! twelve random ones that are incremented within the same millisecond, so ids sort in
//! creation order (as firebase-js-sdk `nextPushId`).

use rand::Rng;

const PUSH_CHARS: &[u8; 64] = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";

/// Generates time-ordered push ids.
#[derive(Debug, Default)]
pub struct PushIdGenerator {
    last_ms: i64,
    last_random: [u8; 12],
}

impl PushIdGenerator {
    /// The next id for a write at `now_ms`.
    pub fn next(&mut self, now_ms: i64) -> String {
        if now_ms == self.last_ms {
            self.bump_random();
        } else {
            self.last_ms = now_ms;
            let mut rng = rand::rng();
            for slot in &mut self.last_random {
                *slot = rng.random_range(0..64);
            }
        }
        let mut id = Vec::with_capacity(20);
        let mut t = now_ms.max(0) as u64;
        let mut time_chars = [0u8; 8];
        for slot in time_chars.iter_mut().rev() {
            *slot = PUSH_CHARS[(t % 64) as usize];
            t /= 64;
        }
        id.extend_from_slice(&time_chars);
        id.extend(
            self.last_random
                .iter()
                .map(|&i| PUSH_CHARS[usize::from(i & 63)]),
        );
        String::from_utf8_lossy(&id).into_owned()
    }

    fn bump_random(&mut self) {
        for slot in self.last_random.iter_mut().rev() {
            if *slot == 63 {
                *slot = 0;
            } else {
                *slot += 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::validate_key;

    #[test]
    fn ids_are_valid_and_ordered() {
        let mut g = PushIdGenerator::default();
        let mut ids = vec![g.next(1_700_000_000_000)];
        for _ in 0..100 {
            ids.push(g.next(1_700_000_000_000));
        }
        ids.push(g.next(1_700_000_000_001));
        for id in &ids {
            assert_eq!(id.len(), 20);
            assert!(validate_key(id).is_ok());
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
    }
}
