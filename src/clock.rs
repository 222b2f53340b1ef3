//! Deadlines from configured durations, computed without overflow.
//!
//! `ferry check` bounds every duration ([`MAX_DURATION`]), so these never saturate for a
//! config it accepted; they are the second line, so that no value can panic a worker.

use std::time::Duration;

use tokio::time::Instant;

/// The longest duration a config may give: ten years. Longer means "never" in practice,
/// and keeps every deadline computed from it representable.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// `d` after `t`, or [`MAX_DURATION`] after it if `d` is longer.
pub fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d.min(MAX_DURATION))
        .or_else(|| t.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(t)
}

/// `d` from now (see [`after`]).
pub fn later(d: Duration) -> Instant {
    after(Instant::now(), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_overflows() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) >= now + MAX_DURATION);
        assert_eq!(
            after(now, Duration::from_secs(3)),
            now + Duration::from_secs(3)
        );
        assert!(later(Duration::MAX) > Instant::now() + Duration::from_secs(86_400));
    }
}
