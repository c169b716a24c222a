//! The gateway's monotonic millisecond clock: ejection deadlines, access-log durations and the
//! admin views read it (an `Instant` is 16 bytes; a `u64` of milliseconds fits an atomic).

use std::sync::OnceLock;
use std::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process's first reading, plus one (so 0 can mean "never").
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}
