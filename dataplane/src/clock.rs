//! A monotonic millisecond clock for ejection deadlines, cheap enough to read on the slow path.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the first call in this process, never 0 (0 means "not ejected").
pub fn now_ms() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
