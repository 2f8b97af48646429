//! Request lines as the server reads them: `Request::parse`, and the word
//! splitter in both its wire and shell forms.
//!
//! Properties: nothing panics; a parsed request written back with
//! `to_line` parses to the same request; `quote` round-trips every word the
//! splitter produces.

#![no_main]

use ftpx::protocol::{Request, quote, split_commands};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The connection refuses bytes that are not UTF-8 before any parsing.
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    for shell in [false, true] {
        if let Ok(commands) = split_commands(line, shell) {
            for word in commands.iter().flatten() {
                assert!(
                    !word.chars().any(char::is_control),
                    "a control character got through the splitter: {line:?} -> {word:?}"
                );
                let quoted = format!("X {}", quote(word));
                let back = split_commands(&quoted, shell).expect("a quoted word splits");
                assert_eq!(
                    back,
                    vec![vec!["X".to_string(), word.clone()]],
                    "quote does not round-trip {word:?} (shell: {shell})"
                );
            }
        }
    }
    if let Ok(request) = Request::parse(line) {
        let again = request.to_line();
        match Request::parse(&again) {
            Ok(back) => assert!(
                back == request,
                "{line:?} parsed, was written as {again:?}, which parses to another request"
            ),
            Err(e) => panic!("{line:?} parsed, was written as {again:?}, which fails: {e}"),
        }
        assert_eq!(request.to_line(), again, "to_line is not stable");
    }
});
