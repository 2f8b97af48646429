//! Resume journals, which are read back from disk and may be damaged or
//! planted: `Journal::parse` on any bytes.
//!
//! Properties: nothing panics; a journal that parses has the current
//! version, and writing its record the way `Journal::save` does gives text
//! that parses to the same record.

#![no_main]

use ftpx::transfer::journal::{Journal, VERSION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Journal::load refuses files over 64 KiB before parsing.
    if data.len() > 64 * 1024 {
        return;
    }
    let Ok(record) = Journal::parse(data) else {
        return;
    };
    assert_eq!(record.version, VERSION);
    let text = match toml::to_string(&record) {
        Ok(t) => t,
        Err(e) => panic!("a parsed journal cannot be saved again: {record:?}: {e}"),
    };
    match Journal::parse(text.as_bytes()) {
        Ok(back) => assert_eq!(back, record, "saved as {text:?}"),
        Err(e) => panic!("{record:?} saved as {text:?}, which does not parse: {e}"),
    }
});
