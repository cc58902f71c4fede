//! The fake server clock behind `{".sv":"timestamp"}`, push ids and token expiry.

use std::time::{SystemTime, UNIX_EPOCH};

/// Real time plus an adjustable offset, or a frozen instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    offset_ms: i64,
    frozen_ms: Option<i64>,
}

impl Clock {
    /// The server time in ms since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        self.frozen_ms
            .unwrap_or_else(|| real_now_ms().saturating_add(self.offset_ms))
    }

    /// Moves the clock forward (or back, for a negative amount).
    pub fn advance(&mut self, ms: i64) {
        match &mut self.frozen_ms {
            Some(frozen) => *frozen = frozen.saturating_add(ms),
            None => self.offset_ms = self.offset_ms.saturating_add(ms),
        }
    }

    /// Freezes the clock at `ms`.
    pub fn freeze_at(&mut self, ms: i64) {
        self.frozen_ms = Some(ms);
    }

    /// Back to real time with no offset.
    pub fn reset(&mut self) {
        *self = Clock::default();
    }
}

/// Real time in ms since the Unix epoch.
pub fn real_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_and_freeze() {
        let mut c = Clock::default();
        let before = c.now_ms();
        c.advance(3_600_000);
        assert!(c.now_ms() >= before + 3_600_000);
        c.freeze_at(42);
        c.advance(8);
        assert_eq!(c.now_ms(), 50);
        c.reset();
        assert!(c.now_ms() >= before);
    }
}
