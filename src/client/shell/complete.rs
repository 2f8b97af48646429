//! Tab completion in the interactive shell, as in sftp and lftp: the first
//! word against the command names, the arguments of local commands against
//! local paths (`~` is the home directory), those of remote commands
//! against a listing of the remote directory.
//!
//! The line editor asks for completions while the loop waits in
//! `readline`; the loop lends the session to the completer for that time
//! (`lend`, `take_back`). Remote listings are kept a few seconds per
//! directory and dropped after any command that may change the remote
//! tree. A completion that fails completes nothing; one whose listing
//! broke the session drops it, and the next command reconnects.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustyline::completion::{Completer, Pair};
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::validate::Validator;
use rustyline::{Context, Helper};
use tokio::runtime::Handle;

use super::commands::KNOWN;
use super::local_path;
use super::output::printable;
use crate::client::{Client, ClientError};
use crate::protocol::Word;

/// How long a remote directory's listing is used for completion.
const FRESH: Duration = Duration::from_secs(5);
/// How many remote directories' listings are kept.
const CACHED_DIRS: usize = 16;
/// How long a completion waits for a listing.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Commands that change nothing on the server: the cached listings stay.
const READ_ONLY: &[&str] = &[
    "pwd", "cd", "ls", "dir", "get", "quota", "df", "uploads", "lpwd", "lcd", "lls", "lmkdir",
    "help", "?",
];

/// The shell's line-editor helper. Clones share the session and the cache.
#[derive(Clone)]
pub(super) struct Completion {
    shared: Arc<Shared>,
    runtime: Handle,
}

struct Shared {
    /// The session, while the loop waits in `readline`.
    client: Mutex<Option<Client>>,
    /// Listings of remote directories, oldest first.
    cache: Mutex<Vec<Listed>>,
}

struct Listed {
    dir: String,
    at: Instant,
    names: Arc<[Name]>,
}

/// A name in a directory, and whether it is a directory.
#[derive(Debug, Clone, PartialEq)]
struct Name {
    name: String,
    dir: bool,
}

/// A lock that a panic elsewhere does not make unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Completion {
    /// A completer that runs remote listings on the current runtime.
    pub(super) fn new() -> Completion {
        Completion {
            shared: Arc::new(Shared {
                client: Mutex::new(None),
                cache: Mutex::new(vec![]),
            }),
            runtime: Handle::current(),
        }
    }

    /// Lends the session to the completer while the line is read.
    pub(super) fn lend(&self, client: Option<Client>) {
        *lock(&self.shared.client) = client;
    }

    /// The session back; None if there was none or a listing broke it.
    pub(super) fn take_back(&self) -> Option<Client> {
        lock(&self.shared.client).take()
    }

    /// Called for each command the shell runs: one that may change the
    /// remote tree makes every cached listing stale.
    pub(super) fn after(&self, words: &[Word]) {
        let cmd = words.first().map_or("", |w| w.text.as_str());
        if !READ_ONLY.contains(&cmd) && !cmd.starts_with('!') {
            lock(&self.shared.cache).clear();
        }
    }

    /// The names in the remote directory `dir` (as typed, relative to the
    /// remote directory; empty for the remote directory itself).
    fn remote_names(&self, dir: &str) -> Arc<[Name]> {
        let mut slot = lock(&self.shared.client);
        let Some(client) = slot.as_mut().filter(|c| c.is_usable()) else {
            return Arc::new([]);
        };
        let Ok(path) = client.remote_path(if dir.is_empty() { "." } else { dir }) else {
            return Arc::new([]);
        };
        let key = path.to_string();
        if let Some(names) = self.cached(&key) {
            return names;
        }
        let listing = self
            .runtime
            .block_on(tokio::time::timeout(LIST_TIMEOUT, client.list(Some(&key))));
        match listing {
            Ok(Ok(listing)) => {
                let names: Arc<[Name]> = listing
                    .entries
                    .into_iter()
                    .map(|e| Name {
                        dir: e.kind == 'd',
                        name: e.name,
                    })
                    // A control character comes escaped (`\u{1b}`): a
                    // backslash, which no remote path may hold.
                    .filter(|n| safe(&n.name) && !n.name.contains('\\'))
                    .collect();
                self.remember(key, names.clone());
                names
            }
            // Refused (no such directory, say): the session is in step.
            Ok(Err(ClientError::Server { .. } | ClientError::Local(_))) => Arc::new([]),
            // Cut off mid-reply, or the connection failed: reconnect on the next command.
            _ => {
                *slot = None;
                Arc::new([])
            }
        }
    }

    fn cached(&self, dir: &str) -> Option<Arc<[Name]>> {
        let mut cache = lock(&self.shared.cache);
        cache.retain(|l| l.at.elapsed() < FRESH);
        cache.iter().find(|l| l.dir == dir).map(|l| l.names.clone())
    }

    fn remember(&self, dir: String, names: Arc<[Name]>) {
        let mut cache = lock(&self.shared.cache);
        cache.retain(|l| l.dir != dir);
        if cache.len() >= CACHED_DIRS {
            cache.remove(0);
        }
        cache.push(Listed {
            dir,
            at: Instant::now(),
            names,
        });
    }

    /// The completions of the word before `pos`: where it starts and the
    /// candidates that replace it.
    fn candidates(&self, line: &str) -> (usize, Vec<Pair>) {
        let at = cursor(line);
        let Some((cmd, args)) = at.words.split_first() else {
            return (at.start, commands(&at.partial));
        };
        if at.partial.starts_with('-') {
            return (at.start, vec![]);
        }
        let Some((side, dirs_only)) = side(cmd, args) else {
            return (at.start, vec![]);
        };
        if side == Side::Local && at.partial == "~" {
            return (at.start, vec![pair("~/".into(), "~/".into())]);
        }
        let (dir, prefix) = match at.partial.rfind('/') {
            Some(i) => at.partial.split_at(i + 1),
            None => ("", at.partial.as_str()),
        };
        let names = match side {
            Side::Local => local_names(dir),
            Side::Remote => self.remote_names(dir),
        };
        let mut found: Vec<&Name> = names
            .iter()
            .filter(|n| n.name.starts_with(prefix) && (n.dir || !dirs_only))
            // Hidden names only when asked for, as in a shell.
            .filter(|n| !n.name.starts_with('.') || prefix.starts_with('.'))
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        let pairs = found
            .into_iter()
            .map(|n| {
                let slash = if n.dir { "/" } else { "" };
                let word = quoted(&format!("{dir}{}{slash}", n.name));
                // A file ends the word; in a directory the user goes on.
                let space = if n.dir { "" } else { " " };
                pair(format!("{}{slash}", printable(&n.name)), word + space)
            })
            .collect();
        (at.start, pairs)
    }
}

fn pair(display: String, replacement: String) -> Pair {
    Pair {
        display,
        replacement,
    }
}

/// A name fit to be completion text: one name, nothing a terminal would
/// take as a control sequence.
fn safe(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && matches!(printable(name), Cow::Borrowed(_))
}

/// The command names starting with `prefix`; none for a `!` command.
fn commands(prefix: &str) -> Vec<Pair> {
    if prefix.starts_with('!') {
        return vec![];
    }
    let mut names: Vec<&str> = KNOWN
        .iter()
        .copied()
        .chain(["help", "lcd"])
        .filter(|c| c.starts_with(prefix))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|c| pair(c.into(), format!("{c} ")))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Local,
    Remote,
}

/// Which side's paths an argument of `cmd` names, given the arguments
/// before it, and whether only directories fit.
fn side(cmd: &str, before: &[String]) -> Option<(Side, bool)> {
    let n = before.iter().filter(|a| !a.starts_with('-')).count();
    match (cmd, n) {
        ("lcd" | "lmkdir", _) => Some((Side::Local, true)),
        ("lls", _) | ("put", 0) | ("get", 1) => Some((Side::Local, false)),
        ("cd" | "rmdir" | "mkdir", _) => Some((Side::Remote, true)),
        ("ls" | "dir" | "rm" | "delete" | "mv" | "rename" | "discard", _)
        | ("get", 0)
        | ("put", 1) => Some((Side::Remote, false)),
        _ => None,
    }
}

/// The names in the local directory `dir` (as typed; `~` is the home).
fn local_names(dir: &str) -> Arc<[Name]> {
    let path = local_path(if dir.is_empty() { "." } else { dir });
    let Ok(entries) = std::fs::read_dir(path) else {
        return Arc::new([]);
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            // Followed through symbolic links, as a shell completes them.
            let dir = std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir());
            Some(Name { name, dir })
        })
        .filter(|n| safe(&n.name))
        .collect()
}

/// `word` as the shell reads it back as one word, never a pattern: in
/// double quotes if it holds a blank, a quote, a backslash, a `;` or a
/// wildcard.
fn quoted(word: &str) -> String {
    let special = [' ', '\t', '"', '\'', '\\', ';', '*', '?', '['];
    if !word.contains(special) {
        return word.to_string();
    }
    let mut out = String::from('"');
    for c in word.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Where the cursor is: the words of its command before the word it is
/// in, where that word starts, and its text so far without quotes.
#[derive(Debug, PartialEq)]
struct Cursor {
    words: Vec<String>,
    start: usize,
    partial: String,
}

/// The text of the word being read, begun at `at` if it was not yet.
fn begun(word: &mut Option<(usize, String)>, at: usize) -> &mut String {
    &mut word.get_or_insert_with(|| (at, String::new())).1
}

/// Reads `line` (up to the cursor) as the shell splits it: blanks between
/// words, `;` between commands, quotes and backslashes as in a POSIX shell.
fn cursor(line: &str) -> Cursor {
    let mut words = vec![];
    let mut word: Option<(usize, String)> = None;
    let mut quote = None;
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        match (quote, c) {
            (None, ' ' | '\t') => words.extend(word.take().map(|w| w.1)),
            (None, ';') => {
                word = None;
                words.clear();
            }
            (None, '"' | '\'') => {
                begun(&mut word, i);
                quote = Some(c);
            }
            (None, '\\') => {
                let t = begun(&mut word, i);
                t.extend(chars.next().map(|(_, c)| c));
            }
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => match chars.next() {
                Some((_, e @ ('"' | '\\'))) => begun(&mut word, i).push(e),
                Some((_, other)) => begun(&mut word, i).extend(['\\', other]),
                None => {}
            },
            (_, c) => begun(&mut word, i).push(c),
        }
    }
    let (start, partial) = word.unwrap_or((line.len(), String::new()));
    Cursor {
        words,
        start,
        partial,
    }
}

impl Completer for Completion {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        Ok(self.candidates(line.get(..pos).unwrap_or(line)))
    }
}

impl Hinter for Completion {
    type Hint = String;
}

impl Highlighter for Completion {}

impl Validator for Completion {}

impl Helper for Completion {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words before the cursor (joined by `|`), where its word
    /// starts, and that word.
    fn at(line: &str) -> (String, usize, String) {
        let c = cursor(line);
        (c.words.join("|"), c.start, c.partial)
    }

    #[test]
    fn the_word_at_the_cursor() {
        assert_eq!(at(""), ("".into(), 0, "".into()));
        assert_eq!(at("  quo"), ("".into(), 2, "quo".into()));
        assert_eq!(at("ls "), ("ls".into(), 3, "".into()));
        assert_eq!(at("get -p rep"), ("get|-p".into(), 7, "rep".into()));
        assert_eq!(at("ls \"my fi"), ("ls".into(), 3, "my fi".into()));
        assert_eq!(at("ls 'a\\b"), ("ls".into(), 3, "a\\b".into()));
        assert_eq!(at("ls \"a\\\"b\\\\c"), ("ls".into(), 3, "a\"b\\c".into()));
        assert_eq!(at("ls my\\ fi"), ("ls".into(), 3, "my fi".into()));
        assert_eq!(at("pwd; cd ph"), ("cd".into(), 8, "ph".into()));
        assert_eq!(at("ls; "), ("".into(), 4, "".into()));
        assert_eq!(at("ls \"my dir/\"su"), ("ls".into(), 3, "my dir/su".into()));
    }

    #[test]
    fn names_are_quoted_when_the_shell_would_split_them() {
        assert_eq!(quoted("report-2026.pdf"), "report-2026.pdf");
        assert_eq!(quoted("~/deep/"), "~/deep/");
        assert_eq!(quoted("my file"), "\"my file\"");
        assert_eq!(quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(quoted("x[1].txt"), "\"x[1].txt\"");
        assert_eq!(quoted("it's;"), "\"it's;\"");
        for name in ["my file", "a\"b\\c", "x[1]*?", "it's;"] {
            let words = crate::protocol::split_words(&quoted(name), true).unwrap();
            assert_eq!(words.len(), 1);
            assert_eq!(words[0].len(), 1);
            assert_eq!(words[0][0].text, name);
            assert_eq!(words[0][0].pattern, None);
        }
    }

    #[test]
    fn unsafe_names_are_never_completed() {
        assert!(safe("report.pdf"));
        assert!(safe("ü é"));
        assert!(!safe("a/b"));
        assert!(!safe("evil\x1b[2J"));
        assert!(!safe("bell\x07"));
        assert!(!safe("\u{9b}31m"));
        assert!(!safe("rtl\u{202e}fdp.exe"));
        assert!(!safe(""));
    }

    #[test]
    fn arguments_name_local_or_remote_paths() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(side("put", &args(&[])), Some((Side::Local, false)));
        assert_eq!(side("put", &args(&["-r"])), Some((Side::Local, false)));
        assert_eq!(side("put", &args(&["a"])), Some((Side::Remote, false)));
        assert_eq!(side("get", &args(&["-p"])), Some((Side::Remote, false)));
        assert_eq!(side("get", &args(&["a"])), Some((Side::Local, false)));
        assert_eq!(side("cd", &args(&[])), Some((Side::Remote, true)));
        assert_eq!(side("mv", &args(&["a"])), Some((Side::Remote, false)));
        assert_eq!(side("lcd", &args(&[])), Some((Side::Local, true)));
        assert_eq!(side("lls", &args(&[])), Some((Side::Local, false)));
        assert_eq!(side("quota", &args(&[])), None);
        assert_eq!(side("!ls", &args(&[])), None);
    }

    #[test]
    fn the_first_word_completes_to_a_command() {
        let names =
            |p: &str| -> Vec<String> { commands(p).into_iter().map(|c| c.replacement).collect() };
        assert_eq!(names("quo"), ["quota "]);
        assert_eq!(names("l"), ["lcd ", "lls ", "lmkdir ", "lpwd ", "ls "]);
        assert_eq!(names("he"), ["help "]);
        assert!(names("!l").is_empty());
        assert!(names("zz").is_empty());
    }
}
