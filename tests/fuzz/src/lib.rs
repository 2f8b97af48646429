//! What the `session` fuzz target and the corpus generator
//! (`examples/seeds.rs`) must agree on: the fuzz user and the files the
//! session's home starts with.

/// The account every `session` run logs in as, before its input.
pub const USER: &str = "fuzz";
pub const PASSWORD: &str = "correct horse";

/// The server's chunk size in the `session` fixture: the smallest allowed,
/// so that the home's files go out in several chunks.
pub const CHUNK: u64 = 1 << 10;

/// `/data.bin` in the home holds `pattern(DATA_LEN)`.
pub const DATA_LEN: usize = 3000;

/// `/resume.bin` is an unfinished upload of `pattern(RESUME_LEN)` of which
/// the first `RESUME_HELD` bytes are in the staging directory, journaled.
pub const RESUME_TARGET: &str = "/resume.bin";
pub const RESUME_LEN: usize = 4096;
pub const RESUME_HELD: usize = 2048;

/// Deterministic bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
