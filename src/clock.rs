//! The wall clock, in Unix seconds, as journals and accounts record it.

/// Now, in whole seconds since 1970 (0 if the clock is set before it).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
