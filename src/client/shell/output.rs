//! What the shell prints: results, server text escaped for the terminal,
//! listings, times, and progress bars (drawn only on a terminal).

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::client::{ClientError, Transferred};
use crate::protocol::{self, Entry};

/// What went wrong, said once for a person and made safe for the
/// terminal: a server's refusal in its own words (the reply code is in the
/// client's log), a system error without its number.
pub(super) fn said(e: &ClientError) -> String {
    let text = match e {
        ClientError::Server { text, .. } => text.clone(),
        other => other.to_string(),
    };
    printable(&without_os_numbers(&text)).into_owned()
}

/// `text` without the ` (os error N)` that Rust's I/O errors end in.
fn without_os_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(" (os error ") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + " (os error ".len()..];
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && tail[digits..].starts_with(')') {
            rest = &tail[digits + 1..];
        } else {
            out.push_str(" (os error ");
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// `text` made safe for a terminal: control characters (C0, DEL, C1) and
/// the bidirectional overrides are written as escapes (`\x1b`, `\u{9b}`),
/// as OpenSSH's `fmprintf` does; printable text, UTF-8 included, is kept.
/// Everything a server sent goes through here before it is printed.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write as _;
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(unsafe_char) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if c.is_ascii() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    out.into()
}

/// Exit statuses of `ftpx connect`.
pub(super) fn report(t: &Transferred, name: &str) {
    if t.resumed_at > 0 {
        out!("resumed at {} bytes", t.resumed_at);
    }
    out!("{}  {}", protocol::hex(&t.hash), printable(name));
}

/// `f 12 1700000000 "a b"` → `f         12  2023-11-14 22:13  a b`, the
/// name escaped for the terminal.
pub(super) fn format_entry(e: &Entry) -> String {
    let slash = if e.kind == 'd' { "/" } else { "" };
    format!(
        "{} {:>12}  {}  {}{slash}",
        printable(&e.kind.to_string()),
        e.size,
        format_time(e.mtime),
        printable(&e.name)
    )
}

/// One line of `uploads`: size, bytes stored so far, last saved, target
/// (escaped for the terminal).
pub(super) fn format_unfinished(line: &str) -> Result<String, ClientError> {
    let bad = || ClientError::Protocol(format!("bad unfinished upload line {line:?}"));
    let words = protocol::split_commands(line, false).map_err(|_| bad())?;
    let words = words.into_iter().next().ok_or_else(bad)?;
    let [size, verified, updated, target] = &words[..] else {
        return Err(bad());
    };
    let number = |w: &str| w.parse::<u64>().map_err(|_| bad());
    let (size, verified, updated) = (number(size)?, number(verified)?, number(updated)?);
    Ok(format!(
        "{size:>12}  {:>12} stored  {}  {}",
        verified.min(size),
        format_time(i64::try_from(updated).unwrap_or(i64::MAX)),
        printable(target)
    ))
}

/// Unix seconds as `YYYY-MM-DD HH:MM` (UTC).
pub(super) fn format_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub(super) fn draw() -> bool {
    std::io::stderr().is_terminal()
}

pub(super) fn file_bar(multi: Option<&MultiProgress>, name: &str) -> ProgressBar {
    if !draw() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg:24!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(printable(name).into_owned());
    match multi {
        Some(m) => m.add(bar),
        None => bar,
    }
}

pub(super) fn total_bar(multi: &MultiProgress, total: u64) -> ProgressBar {
    if !draw() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("total {pos}/{len} files [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    multi.add(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_entries() {
        assert_eq!(format_time(0), "1970-01-01 00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00");
        let e = format_entry(&Entry::parse("d 0 1700000000 \"a b\"").unwrap());
        assert!(e.starts_with('d') && e.ends_with("a b/"), "{e}");
        assert!(Entry::parse("x y").is_err());
        // The wire refuses control characters in words; a name is escaped all the same.
        assert!(Entry::parse("f 1 0 \"\u{1b}[2J\"").is_err());
        let e = format_entry(&Entry {
            kind: 'f',
            size: 1,
            mtime: 0,
            name: "\u{1b}]0;pwned\u{7}".into(),
        });
        assert!(
            e.ends_with("\\x1b]0;pwned\\x07") && !e.contains('\u{1b}'),
            "{e}"
        );
    }

    #[test]
    fn errors_are_said_without_codes_or_os_numbers() {
        let refused = ClientError::Server {
            code: 550,
            text: "/x: no such file or directory".into(),
        };
        assert_eq!(said(&refused), "/x: no such file or directory");
        let local = ClientError::Local("a: No such file or directory (os error 2)".into());
        assert_eq!(said(&local), "a: No such file or directory");
        let odd = ClientError::Local("kept (os error x) and \u{1b}[2J".into());
        assert_eq!(said(&odd), "kept (os error x) and \\x1b[2J");
    }

    #[test]
    fn printable_escapes_controls_only() {
        assert_eq!(printable("plain näme ✓.txt"), "plain näme ✓.txt");
        assert!(matches!(printable("ok"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(printable("\u{1b}[2Jhi"), "\\x1b[2Jhi");
        assert_eq!(
            printable("a\nb\rc\td\0e\u{7f}"),
            "a\\x0ab\\x0dc\\x09d\\x00e\\x7f"
        );
        // C1 controls (8-bit CSI) and bidirectional overrides.
        assert_eq!(printable("\u{9b}31m\u{202e}x"), "\\u{9b}31m\\u{202e}x");
        for c in (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let p = printable(&c.to_string()).into_owned();
            assert!(!p.chars().any(char::is_control), "{c:?} -> {p:?}");
        }
    }
}
