//! Reply lines as the client reads them: `ReplyLine::parse` on any string.
//!
//! Properties: nothing panics; a parsed line has a three-digit code from 100
//! to 999, and its code, separator and text put together give the line back.

#![no_main]

use ftpx::protocol::ReplyLine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Some(reply) = ReplyLine::parse(line) else {
        return;
    };
    assert!((100..=999).contains(&reply.code), "{line:?} -> {reply:?}");
    let separator = if reply.last { ' ' } else { '-' };
    let rebuilt = format!("{}{separator}{}", reply.code, reply.text);
    let bare = line.len() == 3 && reply.last && reply.text.is_empty();
    assert!(
        rebuilt == line || bare,
        "{line:?} parsed as {reply:?}, which reads back as {rebuilt:?}"
    );
});
