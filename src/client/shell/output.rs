//! What the shell prints: results, server text escaped for the terminal,
//! listings, times, and progress bars (drawn only on a terminal).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{
    HumanBytes, HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState,
    ProgressStyle,
};

use crate::client::{ClientError, Transferred};
use crate::config::human_bytes;
use crate::protocol::{self, Entry};

/// What went wrong, said once for a person and made safe for the
/// terminal: a server's refusal in its own words (the reply code is in the
/// client's log), a system error without its number.
pub(super) fn said(e: &ClientError) -> String {
    if let ClientError::Login(refused) = e {
        return said(refused);
    }
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

/// The hash line of a transfer on stdout, after the line saying where it
/// resumed, if it did.
pub(super) fn report(t: &Transferred, name: &str) {
    if t.resumed_at > 0 {
        out!("resumed at {} bytes", t.resumed_at);
    }
    out!("{}  {}", protocol::hex(&t.hash), printable(name));
}

/// `f 12 1700000000 "a b"` → `f         12  2023-11-14 22:13  a b`, the
/// name escaped for the terminal.
pub(super) fn format_entry(e: &Entry) -> String {
    format_entry_as(e, false, false)
}

/// [`format_entry`] with the time in the local time zone (`ls -l`) and the
/// size in human units (`ls -h`).
pub(super) fn format_entry_as(e: &Entry, local_time: bool, human: bool) -> String {
    let slash = if e.kind == 'd' { "/" } else { "" };
    let size = match human {
        true => human_bytes(e.size),
        false => e.size.to_string(),
    };
    let time = match local_time {
        true => format_local_time(e.mtime),
        false => format_time(e.mtime),
    };
    format!(
        "{} {size:>12}  {time}  {}{slash}",
        printable(&e.kind.to_string()),
        printable(&e.name)
    )
}

/// Unix seconds as `YYYY-MM-DD HH:MM` in the local time zone.
pub(super) fn format_local_time(secs: i64) -> String {
    #[allow(clippy::unnecessary_cast)]
    let t = secs as libc::time_t;
    // SAFETY: `tm` is a plain C struct for localtime_r to fill; both
    // pointers are valid for the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return format_time(secs);
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
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

/// The style of a file's bar: its name, then the bar, bytes, rate and ETA
/// once its size is known (never a full bar reading `0 B/0 B` before).
/// The bar takes what the terminal's width leaves, so a line never wraps.
fn file_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg:20!} [{wide_bar}] {sizes}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("sizes", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            if let Some(len) = s.len() {
                let _ = write!(
                    w,
                    "{}/{} {}/s ETA {:#}",
                    HumanBytes(s.pos()),
                    HumanBytes(len),
                    HumanBytes(s.per_sec() as u64),
                    HumanDuration(s.eta())
                );
            }
        })
        .progress_chars("=> ")
}

/// The bar of one `put` or `get`, drawn only on a terminal; its size is
/// set when the transfer starts.
pub(super) fn file_bar(multi: Option<&MultiProgress>, name: &str) -> ProgressBar {
    let bar = if draw() {
        ProgressBar::no_length().with_style(file_style())
    } else {
        ProgressBar::hidden()
    };
    // Into the multi before anything is drawn: a line drawn by the bar
    // alone would be left on the screen, unknown to the multi.
    let bar = match multi {
        Some(m) => m.add(bar),
        None => bar,
    };
    // Hidden too: the summary names the file by it.
    bar.set_message(printable(name).into_owned());
    bar
}

/// The hash line of one `put` or `get` on stdout, then its summary on
/// stderr: what moved, how long it took, how fast, and where it resumed.
/// `bar` is the transfer's own: it gives the name and the time.
pub(super) fn report_file(t: &Transferred, name: &str, bar: &ProgressBar) {
    report(t, name);
    eprintln!("{}", file_summary(t, &bar.message(), bar.elapsed()));
}

/// `big: 24.0 MiB in 0.31 s, 77.4 MiB/s`, and where it resumed, if it did.
fn file_summary(t: &Transferred, name: &str, took: Duration) -> String {
    let moved = t.size.saturating_sub(t.resumed_at);
    let mut line = format!("{}: {}", printable(name), summary(moved, took));
    if t.resumed_at > 0 {
        line.push_str(&format!(
            " (resumed at {} of {})",
            human_bytes(t.resumed_at),
            human_bytes(t.size)
        ));
    }
    line
}

/// `3.1 MiB in 0.91 s, 3.4 MiB/s`.
pub(super) fn summary(bytes: u64, took: Duration) -> String {
    let secs = took.as_secs_f64();
    let rate = bytes as f64 / secs.max(0.001);
    format!(
        "{} in {}, {}/s",
        human_bytes(bytes),
        seconds(took),
        human_bytes(rate as u64)
    )
}

/// `0.31 s`, `12.5 s`, `3 min 05 s`.
fn seconds(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.2} s")
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = d.as_secs();
        format!("{} min {:02} s", whole / 60, whole % 60)
    }
}

/// What a person sees of `put -r` and `get -r`: one overall bar (files
/// and bytes, rate, ETA) and the bar of the file being transferred, both
/// reused from file to file and both gone at the end, when only the
/// result lines and the summary are left.
pub(super) struct TreeProgress {
    multi: MultiProgress,
    total: ProgressBar,
    file: ProgressBar,
    /// Whether each bar is shown yet: none before there is something to show.
    shown: (bool, bool),
    files: u64,
    files_total: u64,
    /// Bytes of the files done (resumed parts included), for the bar.
    done: u64,
    /// Bytes sent or received, for the summary.
    moved: u64,
    started: Instant,
}

impl TreeProgress {
    pub(super) fn new() -> TreeProgress {
        // The bars start hidden and draw only through the multi, once
        // added to it: a line drawn by a bar alone would be left on the
        // screen, unknown to the multi.
        let (multi, total, file) = if draw() {
            let total = ProgressBar::hidden().with_style(
                ProgressStyle::with_template(
                    "{msg} files [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let file = ProgressBar::hidden().with_style(file_style());
            (MultiProgress::new(), total, file)
        } else {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
            (multi, ProgressBar::hidden(), ProgressBar::hidden())
        };
        total.set_length(0);
        TreeProgress {
            multi,
            total,
            file,
            shown: (false, false),
            files: 0,
            files_total: 0,
            done: 0,
            moved: 0,
            started: Instant::now(),
        }
    }

    /// More to do: `files` files of `bytes` bytes in all.
    pub(super) fn add(&mut self, files: u64, bytes: u64) {
        self.files_total += files;
        self.total.inc_length(bytes);
        self.count();
        if !self.shown.0 && self.files_total > 0 {
            self.shown.0 = true;
            self.multi.add(self.total.clone());
        }
    }

    /// One file of `size` bytes needs nothing done: already complete.
    pub(super) fn skip(&mut self, size: u64) {
        self.files_total = self.files_total.saturating_sub(1);
        let len = self.total.length().unwrap_or(0);
        self.total.set_length(len.saturating_sub(size));
        self.count();
    }

    fn count(&self) {
        self.total
            .set_message(format!("{}/{}", self.files, self.files_total));
    }

    /// The bar for the next file, `name` of `size` bytes.
    pub(super) fn file(&mut self, name: &str, size: u64) -> &ProgressBar {
        self.file.reset();
        self.file.set_length(size);
        self.file.set_message(printable(name).into_owned());
        if !self.shown.1 {
            self.shown.1 = true;
            self.multi.add(self.file.clone());
        }
        &self.file
    }

    /// Runs `work`, a transfer drawn on the file bar, and meanwhile moves
    /// the overall bar along with it.
    pub(super) async fn follow<T>(&self, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                t = &mut work => return t,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    self.total.set_position(self.done + self.file.position());
                }
            }
        }
    }

    /// A file is done: its hash line on stdout, and the bars move on.
    pub(super) fn done(&mut self, t: &Transferred, name: &str) {
        self.multi.suspend(|| report(t, name));
        self.files += 1;
        self.done += t.size;
        self.moved += t.size.saturating_sub(t.resumed_at);
        self.total.set_position(self.done);
        self.count();
    }

    /// Runs `f`, which prints, with the bars out of the way.
    pub(super) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.multi.suspend(f)
    }

    /// The end: the bars go, `line` goes to stdout as it is and to stderr
    /// with the bytes moved, the time and the rate.
    pub(super) fn finish(self, line: &str) {
        let took = self.started.elapsed();
        let moved = self.moved;
        drop(self);
        out!("{line}");
        eprintln!("{line}: {}", summary(moved, took));
    }
}

impl Drop for TreeProgress {
    /// The bars go, whether the tree is done or failed.
    fn drop(&mut self) {
        self.file.finish_and_clear();
        self.total.finish_and_clear();
        let _ = self.multi.clear();
    }
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
    fn summaries_say_bytes_time_rate_and_where_a_transfer_resumed() {
        let t = Transferred {
            hash: blake3::hash(b""),
            size: 24 << 20,
            resumed_at: 0,
        };
        let took = Duration::from_millis(310);
        assert_eq!(
            file_summary(&t, "big", took),
            "big: 24.0 MiB in 0.31 s, 77.4 MiB/s"
        );
        let resumed = Transferred {
            resumed_at: 16 << 20,
            ..t
        };
        assert_eq!(
            file_summary(&resumed, "a\u{1b}b", Duration::from_secs(2)),
            "a\\x1bb: 8.0 MiB in 2.00 s, 4.0 MiB/s (resumed at 16.0 MiB of 24.0 MiB)"
        );
        assert_eq!(
            summary(3 << 20, Duration::from_secs(75)),
            "3.0 MiB in 1 min 15 s, 41.0 KiB/s"
        );
        assert_eq!(summary(0, Duration::ZERO), "0 B in 0.00 s, 0 B/s");
        assert_eq!(seconds(Duration::from_millis(12_340)), "12.3 s");
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
