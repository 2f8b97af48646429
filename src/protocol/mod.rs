//! The ftpx wire protocol: every request, reply and frame, and their limits.
//!
//! This module is the specification. It is pure: parsing and formatting only,
//! no I/O, so it is tested line by line without sockets.
//!
//! # Transport
//!
//! One TLS 1.3 connection per session, ALPN protocol id `ftpx/1`, nothing in
//! plaintext. Control requests, replies and file data all travel on it; there
//! is no second data connection. `openssl s_client -alpn ftpx/1 -connect
//! HOST:PORT -CAfile certs/ca.pem` is enough to talk to a server by hand.
//!
//! # Lines
//!
//! A request is one UTF-8 line ending in LF (a CR before the LF is dropped),
//! at most `max_line` bytes (a setting, default 8192); control characters
//! other than TAB are refused. Words are separated by spaces or tabs. A word
//! that holds a space, a quote, a backslash or nothing at all is written in
//! double quotes, inside which `\"` and `\\` stand for `"` and `\`; single
//! quotes take everything literally up to the next `'`. The verb is not case
//! sensitive. At most [`MAX_ARGS`] words follow the verb.
//!
//! The server speaks first: `220 ftpx VERSION ready`.
//!
//! A reply is `CODE TEXT` (a final line), or a run of `CODE-TEXT` lines ended
//! by a final line with the same code (listings). The first digit says how it
//! went: 1 = go ahead with a data transfer, 2 = done, 4 = failed, trying again
//! later may work, 5 = failed for good. Codes:
//!
//! | code | meaning |
//! |------|---------|
//! | 150 | upload accepted; send a start frame, then chunks (see `PUT`) |
//! | 151 | download follows as frames (see `GET`) |
//! | 200 | done |
//! | 211 | help text |
//! | 213 | status information (listing entries, `STAT`, `QUOTA`, `HASH`) |
//! | 220 | greeting |
//! | 221 | goodbye, the server closes the connection |
//! | 226 | transfer complete: `226 HASH SIZE` |
//! | 230 | logged in |
//! | 257 | a path: `257 "PATH"` (`PWD`, `CWD`, `MKD`) |
//! | 421 | service not available (too many sessions, timeout, shutdown, too many bad requests); closes |
//! | 430 | login failed (the same for an unknown user and a wrong password) |
//! | 450 | busy: the file is being transferred by another session |
//! | 451 | local error on the server (storage); nothing was changed |
//! | 452 | the server's disk is full; nothing was changed |
//! | 453 | a chunk failed its hash check; nothing after the last good chunk was written |
//! | 454 | the whole-file hash did not match; the target is untouched |
//! | 500 | syntax error or unknown verb (closes if the line was too long) |
//! | 501 | bad argument (invalid path, name or number) |
//! | 503 | bad sequence (already logged in, frame out of order) |
//! | 530 | not logged in |
//! | 550 | no such file or directory, or wrong type |
//! | 552 | quota or file limit exceeded |
//! | 553 | name not allowed or already taken |
//!
//! # Requests
//!
//! Before login only `LOGIN`, `REGISTER`, `HELP`, `NOOP` and `QUIT` are
//! accepted; everything else gets 530.
//!
//! - `LOGIN USER PASSWORD` → 230, or 430 after a fixed delay.
//! - `REGISTER USER PASSWORD` → 230 (created and logged in), 553 (name not
//!   allowed or taken, or registration off), 501 (password too short or long)
//!   or 450 (too many registrations from this address).
//! - `PWD` → `257 "/dir"`. `CWD [PATH]` → `257 "/new"` (no path: `/`).
//! - `LIST [PATH]` → `213-TYPE SIZE MTIME NAME` per entry, then
//!   `213 N entries`. TYPE is `d`, `f`, `l` or `o`; MTIME in Unix seconds;
//!   NAME quoted as a word. At most `max_list_entries` entries; past that the
//!   final line is `213 N entries (truncated)`.
//! - `STAT PATH` → `213 TYPE SIZE MTIME NAME`.
//! - `HASH PATH` → `213 HASH` (BLAKE3 of a regular file).
//! - `MKD PATH` → 257. `RMD PATH`, `DELE PATH`, `RENAME FROM TO` → 200.
//! - `QUOTA` → `213 USED LIMIT FILES MAX_FILES UNFINISHED_BYTES UNFINISHED`:
//!   bytes used (unfinished uploads included) and the quota; files and
//!   directories (unfinished uploads included) and their limit; what the
//!   unfinished uploads are charged, and how many there are.
//! - `PARTS` → `213-SIZE VERIFIED UPDATED PATH` per unfinished upload (one
//!   that stopped, waiting to be resumed, or one running now): its declared
//!   size, the bytes stored so far, the Unix time of its last save and its
//!   target, quoted as a word; then `213 N unfinished uploads`.
//! - `MTIME PATH SECONDS` → 200: sets the modification time of the file at
//!   PATH (Unix seconds), as `put -p` keeps a local file's.
//! - `DISCARD PATH` → 200: the unfinished upload to PATH is removed and
//!   stops counting; 550 if there is none, 450 while it is running.
//! - `PUT PATH SIZE [CHUNK]` (CHUNK defaults to 262144) → 150 with up to two resume candidates,
//!   `150 ready [OFFSET PROOF]...`: offsets (whole chunks) up to which the
//!   server holds a partial copy, each with the proof of its bytes
//!   `[0, OFFSET)` (see `transfer`). The client answers with a start frame
//!   naming 0 or one candidate whose proof matches its own prefix, then chunk
//!   frames of CHUNK bytes (a power of two, 1 KiB to 4 MiB) from there, then
//!   an end frame. The server then replies `226 HASH SIZE`, 452, 453, 454 or
//!   another error. Refused at once (552) if the file won't fit.
//! - `SEND PATH SIZE`: an upload of a small file (SIZE at most [`MAX_SEND`])
//!   whose frames follow the line at once, with no 150 to wait for: a start
//!   frame at 0, the whole file as one chunk (none if it is empty), an end
//!   frame. The server reads them all, then replies as to `PUT`: 226, or an
//!   error that leaves nothing behind. A client may send many before reading
//!   their replies, which come in order; the server writes the files in that
//!   order while it reads on, and answers any other request after them.
//! - `GET PATH [OFFSET PROOF]...` (up to two candidates: what the client
//!   already holds) → `151 SIZE OFFSET CHUNK`, then chunk frames of CHUNK
//!   bytes from OFFSET (the highest candidate the server could prove, else 0)
//!   and an end frame.
//! - `NOOP` → 200. `HELP` → 211. `QUIT` → 221 and close.
//!
//! # Pipelining
//!
//! A client may write requests before the replies to earlier ones have
//! arrived (`get -r` asks for listings, hashes and files so). The server
//! reads and handles one request at a time, in order, and its replies come
//! in the same order, a `GET`'s 151 and frames included, before the next
//! request's reply. It holds nothing for the requests it has not reached:
//! they wait in the connection under TCP's flow control (and at most its
//! 64 KiB read buffer), so pipelining can't make it queue more. A client
//! that pipelines keeps what it has written and not yet had answered small
//! enough for the connection's buffers (the `ftpx` client: 32 KiB of
//! request lines), or both ends could wait on each other, the server
//! writing a reply the client does not read while the client writes a
//! request the server does not read. `SEND` is pipelined by design (above).
//! The `ftpx` client writes its `LOGIN` before the greeting has arrived; a
//! greeting other than 220 still refuses the session, and the server reads
//! nothing more. In a script it also writes its first request right behind
//! the `LOGIN`, before the login's reply (one request, no more), and `QUIT`
//! right behind the last request when that is one request and its reply.
//! A request refused (530) only because the login just before it failed
//! is not counted against `max_bad_requests`: the failed login was.
//!
//! # Transfer ids
//!
//! The server gives every `PUT`, `GET` and `SEND` it handles an id: a word
//! of 1 to [`MAX_TRANSFER_ID`] ASCII letters and digits (16 hex digits
//! today), unique across runs and servers. Its first reply to that
//! request (150, 151, 226, or the error that refused it) begins with a
//! continuation line `CODE-transfer ID`, and the server's log names the
//! transfer by the same id, so a user's complaint can be matched to the
//! server's line. A client that knows nothing of ids reads the line as any
//! continuation line and skips it; a client that does logs the id (the
//! `ftpx` client does, in its log).
//!
//! # Frames
//!
//! After 150 (from the client) and 151 (from the server) file data flows as
//! binary frames, each a fixed [`FRAME_HEADER_LEN`]-byte header and a payload:
//!
//! ```text
//! kind: u8 | offset: u64 BE | len: u32 BE | hash: [u8; 32]
//! ```
//!
//! - `S` start: OFFSET is where the chunks will begin; len 0; hash zero.
//! - `C` chunk: OFFSET is the file offset of the payload (a multiple of
//!   CHUNK), LEN its size (CHUNK, or less for the last one), HASH the BLAKE3
//!   chaining value of the payload as the subtree at OFFSET of the file's
//!   BLAKE3 tree, or the payload's BLAKE3 hash when it is the whole file.
//!   Chunks are contiguous.
//! - `E` end: OFFSET is the total size, len 0, HASH the whole file's BLAKE3.
//! - `A` abort: the sender gives up; len 0. A reply line follows from the server.
//!
//! Hashes in text are 64 lowercase hex digits.

use std::fmt::Write as _;

pub mod path;

pub use path::{BadPath, MAX_NAME, VPath};

/// The reply codes of the table above, by what they mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 150: upload accepted; the frames may follow.
    Ready = 150,
    /// 151: a download's frames follow.
    Sending = 151,
    /// 200: done.
    Ok = 200,
    /// 211: help text.
    Help = 211,
    /// 213: status information.
    Status = 213,
    /// 220: greeting.
    Greeting = 220,
    /// 221: goodbye.
    Goodbye = 221,
    /// 226: transfer complete.
    Stored = 226,
    /// 230: logged in.
    LoggedIn = 230,
    /// 257: a path.
    Path = 257,
    /// 421: service not available; the server closes.
    Unavailable = 421,
    /// 430: login failed.
    LoginFailed = 430,
    /// 450: busy.
    Busy = 450,
    /// 451: local error on the server.
    LocalError = 451,
    /// 452: the server's disk is full.
    StorageFull = 452,
    /// 453: a chunk failed its hash check.
    BadChunk = 453,
    /// 454: the whole-file hash did not match.
    HashMismatch = 454,
    /// 500: syntax error or unknown verb.
    Syntax = 500,
    /// 501: bad argument.
    BadArgument = 501,
    /// 503: bad sequence.
    BadSequence = 503,
    /// 530: not logged in.
    NotLoggedIn = 530,
    /// 550: no such file or directory, or wrong type.
    NotFound = 550,
    /// 552: quota or file limit exceeded.
    QuotaExceeded = 552,
    /// 553: name not allowed or taken.
    NameRefused = 553,
}

impl Code {
    pub fn number(self) -> u16 {
        self as u16
    }

    /// `CODE TEXT`, a final reply line.
    pub fn line(self, text: &str) -> String {
        format!("{} {text}", self.number())
    }

    /// `CODE-TEXT`, a line of a reply that goes on.
    pub fn continued(self, text: &str) -> String {
        format!("{}-{text}", self.number())
    }
}

/// ALPN id both ends insist on.
pub const ALPN: &[u8] = b"ftpx/1";
/// Words after the verb, at most.
pub const MAX_ARGS: usize = 8;
/// Size of a frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 1 + 8 + 4 + 32;
/// Largest chunk payload any peer accepts (the configured chunk size is smaller).
pub const MAX_CHUNK: u32 = 4 << 20;
/// Largest file a `SEND` may carry.
pub const MAX_SEND: u64 = 1 << 20;
/// Chunk size of a `PUT` that names none.
pub const DEFAULT_CHUNK: u64 = 256 << 10;

/// Whether `chunk` can be a chunk size: a power of two from BLAKE3's own
/// 1 KiB chunk up to [`MAX_CHUNK`].
pub fn valid_chunk_size(chunk: u64) -> bool {
    chunk.is_power_of_two() && (blake3::CHUNK_LEN as u64..=u64::from(MAX_CHUNK)).contains(&chunk)
}
/// Resume candidates in one `PUT` reply or `GET` request.
pub const MAX_CANDIDATES: usize = 2;

/// Why a line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty request")]
    Empty,
    #[error("unterminated quote")]
    UnterminatedQuote,
    #[error("control characters are not allowed")]
    ControlCharacter,
    #[error("too many arguments")]
    TooManyArgs,
    #[error("unknown command {0:?}")]
    UnknownVerb(String),
    #[error("{verb} takes {expected}")]
    WrongArgs {
        verb: &'static str,
        expected: &'static str,
    },
    #[error("invalid number {0:?}")]
    BadNumber(String),
    #[error("invalid hash {0:?}")]
    BadHash(String),
    #[error("bad listing line")]
    BadEntry,
}

/// One entry of a listing or a `STAT` reply: `TYPE SIZE MTIME NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `d` directory, `f` regular file, `l` symlink, `o` anything else.
    pub kind: char,
    pub size: u64,
    /// Unix seconds.
    pub mtime: i64,
    /// A name: on the client, as the server sent it, to be checked before
    /// any local use and escaped before it is printed.
    pub name: String,
}

impl Entry {
    /// `TYPE SIZE MTIME NAME`, the name quoted as a word.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.kind,
            self.size,
            self.mtime,
            quote(&self.name)
        )
    }

    pub fn parse(line: &str) -> Result<Entry, ParseError> {
        let bad = || ParseError::BadEntry;
        let words = split_commands(line, false)?;
        let words = words.into_iter().next().ok_or_else(bad)?;
        let [kind, size, mtime, name] = &words[..] else {
            return Err(bad());
        };
        let kind = kind
            .chars()
            .next()
            .filter(|_| kind.len() == 1)
            .ok_or_else(bad)?;
        Ok(Entry {
            kind,
            size: size.parse().map_err(|_| bad())?,
            mtime: mtime.parse().map_err(|_| bad())?,
            name: name.clone(),
        })
    }
}

/// Splits a line into words and `;`-separated commands.
///
/// `allow_separators` is on for the client shell, where `a; b` is two
/// commands; on the wire a bare `;` is an ordinary character.
pub fn split_commands(line: &str, allow_separators: bool) -> Result<Vec<Vec<String>>, ParseError> {
    Ok(split_words(line, allow_separators)?
        .into_iter()
        .map(|words| words.into_iter().map(|w| w.text).collect())
        .collect())
}

/// One word of a shell line, and the glob pattern it stands for when it
/// holds a `*`, `?` or `[` outside quotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub text: String,
    /// The word as a glob pattern, its quoted or escaped characters taken
    /// literally (written `[*]`, `[?]`, `[[]`, `[]]`); None when no
    /// wildcard stands outside quotes.
    pub pattern: Option<String>,
}

/// A word being read: its text, and its pattern with quoted wildcards
/// escaped.
#[derive(Default)]
struct Reading {
    text: String,
    pattern: String,
    glob: bool,
    started: bool,
}

impl Reading {
    fn push(&mut self, c: char, quoted: bool) {
        self.started = true;
        self.text.push(c);
        match c {
            '*' | '?' | '[' | ']' if quoted => {
                self.pattern.push('[');
                self.pattern.push(c);
                self.pattern.push(']');
            }
            '*' | '?' | '[' => {
                self.glob = true;
                self.pattern.push(c);
            }
            c => self.pattern.push(c),
        }
    }

    fn take(&mut self) -> Option<Word> {
        let r = std::mem::take(self);
        r.started.then(|| Word {
            text: r.text,
            pattern: r.glob.then_some(r.pattern),
        })
    }
}

/// [`split_commands`], keeping for each word the glob pattern it stands for.
pub fn split_words(line: &str, allow_separators: bool) -> Result<Vec<Vec<Word>>, ParseError> {
    let mut commands = vec![];
    let mut words: Vec<Word> = vec![];
    let mut word = Reading::default();
    let mut chars = line.chars();
    let control = |c: char| c.is_control();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => words.extend(word.take()),
            ';' if allow_separators => {
                words.extend(word.take());
                if !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            '"' => {
                word.started = true;
                loop {
                    match chars.next() {
                        None => return Err(ParseError::UnterminatedQuote),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            None => return Err(ParseError::UnterminatedQuote),
                            Some(e @ ('"' | '\\')) => word.push(e, true),
                            Some(c) if control(c) => return Err(ParseError::ControlCharacter),
                            Some(other) => {
                                word.push('\\', true);
                                word.push(other, true);
                            }
                        },
                        Some(c) if control(c) => return Err(ParseError::ControlCharacter),
                        Some(c) => word.push(c, true),
                    }
                }
            }
            '\'' => {
                word.started = true;
                loop {
                    match chars.next() {
                        None => return Err(ParseError::UnterminatedQuote),
                        Some('\'') => break,
                        Some(c) if control(c) => return Err(ParseError::ControlCharacter),
                        Some(c) => word.push(c, true),
                    }
                }
            }
            '\\' if allow_separators => {
                // POSIX shell: a backslash outside quotes takes the next character literally.
                match chars.next() {
                    Some(c) if control(c) => return Err(ParseError::ControlCharacter),
                    Some(c) => word.push(c, true),
                    None => word.push('\\', true),
                }
            }
            c if control(c) => return Err(ParseError::ControlCharacter),
            c => word.push(c, false),
        }
    }
    words.extend(word.take());
    if !words.is_empty() {
        commands.push(words);
    }
    Ok(commands)
}

/// Writes `s` as one word that [`split_commands`] reads back unchanged.
/// Longest transfer id a client accepts.
pub const MAX_TRANSFER_ID: usize = 64;

/// `CODE-transfer ID`: the line that announces a transfer's id before the
/// first reply to its request.
pub fn transfer_line(code: Code, id: &str) -> String {
    code.continued(&format!("transfer {id}"))
}

/// The transfer id a reply's continuation lines announce, if any (see the
/// section on transfer ids above).
pub fn transfer_id(lines: &[String]) -> Option<&str> {
    lines.iter().find_map(|line| {
        let id = line.strip_prefix("transfer ")?;
        let valid = (1..=MAX_TRANSFER_ID).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_alphanumeric());
        valid.then_some(id)
    })
}

pub fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && !s
            .chars()
            .any(|c| matches!(c, ' ' | '\t' | '"' | '\'' | '\\' | ';') || c.is_control());
    if plain {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Names with control characters can only exist if an admin made
            // them; show them escaped, never raw, so they can't rewrite a terminal.
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A BLAKE3 digest as 64 lowercase hex digits.
pub fn hex(hash: &blake3::Hash) -> String {
    hash.to_hex().to_string()
}

/// Parses 64 hex digits.
pub fn parse_hash(s: &str) -> Result<blake3::Hash, ParseError> {
    if s.len() != 64 {
        return Err(ParseError::BadHash(truncate(s)));
    }
    blake3::Hash::from_hex(s).map_err(|_| ParseError::BadHash(truncate(s)))
}

/// A request with the wrong arguments for its verb.
fn wrong(verb: &'static str, expected: &'static str) -> ParseError {
    ParseError::WrongArgs { verb, expected }
}

fn parse_u64(s: &str) -> Result<u64, ParseError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadNumber(truncate(s)));
    }
    s.parse().map_err(|_| ParseError::BadNumber(truncate(s)))
}

fn truncate(s: &str) -> String {
    s.chars().take(70).collect()
}

/// A point the receiver can resume from: it holds `offset` bytes whose BLAKE3 is `hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub offset: u64,
    pub hash: blake3::Hash,
}

fn parse_candidates(words: &[String]) -> Result<Vec<Candidate>, ParseError> {
    if !words.len().is_multiple_of(2) || words.len() / 2 > MAX_CANDIDATES {
        return Err(ParseError::WrongArgs {
            verb: "resume candidates",
            expected: "pairs of OFFSET HASH, at most two",
        });
    }
    words
        .chunks(2)
        .map(|pair| {
            Ok(Candidate {
                offset: parse_u64(&pair[0])?,
                hash: parse_hash(&pair[1])?,
            })
        })
        .collect()
}

/// Formats candidates as ` OFFSET HASH` pairs.
pub fn format_candidates(candidates: &[Candidate]) -> String {
    let mut out = String::new();
    for c in candidates {
        let _ = write!(out, " {} {}", c.offset, hex(&c.hash));
    }
    out
}

/// One request from client to server.
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    Login {
        user: String,
        password: String,
    },
    Register {
        user: String,
        password: String,
    },
    Pwd,
    Cwd(Option<String>),
    List(Option<String>),
    Stat(String),
    Hash(String),
    Mkd(String),
    Rmd(String),
    Dele(String),
    Rename {
        from: String,
        to: String,
    },
    Quota,
    Parts,
    Discard(String),
    Mtime {
        path: String,
        mtime: u64,
    },
    Put {
        path: String,
        size: u64,
        chunk: u64,
    },
    Send {
        path: String,
        size: u64,
    },
    Get {
        path: String,
        candidates: Vec<Candidate>,
    },
    Noop,
    Help,
    Quit,
}

// Written by hand so that a password never reaches a log line.
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Login { user, .. } => write!(f, "LOGIN {user:?} ****"),
            Request::Register { user, .. } => write!(f, "REGISTER {user:?} ****"),
            other => f.write_str(&other.to_line()),
        }
    }
}

impl Request {
    /// The verb, for logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Login { .. } => "LOGIN",
            Request::Register { .. } => "REGISTER",
            Request::Pwd => "PWD",
            Request::Cwd(_) => "CWD",
            Request::List(_) => "LIST",
            Request::Stat(_) => "STAT",
            Request::Hash(_) => "HASH",
            Request::Mkd(_) => "MKD",
            Request::Rmd(_) => "RMD",
            Request::Dele(_) => "DELE",
            Request::Rename { .. } => "RENAME",
            Request::Quota => "QUOTA",
            Request::Parts => "PARTS",
            Request::Discard(_) => "DISCARD",
            Request::Mtime { .. } => "MTIME",
            Request::Put { .. } => "PUT",
            Request::Send { .. } => "SEND",
            Request::Get { .. } => "GET",
            Request::Noop => "NOOP",
            Request::Help => "HELP",
            Request::Quit => "QUIT",
        }
    }

    /// Parses one request line (without its line end).
    pub fn parse(line: &str) -> Result<Request, ParseError> {
        let mut commands = split_commands(line, false)?;
        let words = match commands.len() {
            0 => return Err(ParseError::Empty),
            _ => commands.swap_remove(0),
        };
        if words.len() > MAX_ARGS + 1 {
            return Err(ParseError::TooManyArgs);
        }
        let verb = words[0].to_ascii_uppercase();
        let args = &words[1..];
        let optional = |verb: &'static str| match args {
            [] => Ok(None),
            [a] => Ok(Some(a.clone())),
            _ => Err(wrong(verb, "at most one argument")),
        };
        let one = |verb: &'static str| match args {
            [a] => Ok(a.clone()),
            _ => Err(wrong(verb, "one argument")),
        };
        let none = |verb: &'static str, req: Request| match args {
            [] => Ok(req),
            _ => Err(wrong(verb, "no arguments")),
        };
        match verb.as_str() {
            "PWD" => none("PWD", Request::Pwd),
            "CWD" => Ok(Request::Cwd(optional("CWD")?)),
            "LIST" => Ok(Request::List(optional("LIST")?)),
            "STAT" => Ok(Request::Stat(one("STAT")?)),
            "HASH" => Ok(Request::Hash(one("HASH")?)),
            "MKD" => Ok(Request::Mkd(one("MKD")?)),
            "RMD" => Ok(Request::Rmd(one("RMD")?)),
            "DELE" => Ok(Request::Dele(one("DELE")?)),
            "QUOTA" => none("QUOTA", Request::Quota),
            "PARTS" => none("PARTS", Request::Parts),
            "DISCARD" => Ok(Request::Discard(one("DISCARD")?)),
            "NOOP" => none("NOOP", Request::Noop),
            "HELP" => none("HELP", Request::Help),
            "QUIT" => none("QUIT", Request::Quit),
            _ => Request::parse_with_args(&verb, args)
                .unwrap_or_else(|| Err(ParseError::UnknownVerb(truncate(&words[0])))),
        }
    }

    /// The requests of several arguments; None for an unknown verb.
    fn parse_with_args(verb: &str, args: &[String]) -> Option<Result<Request, ParseError>> {
        let parsed = match (verb, args) {
            ("LOGIN", [user, password]) => Ok(Request::Login {
                user: user.clone(),
                password: password.clone(),
            }),
            ("REGISTER", [user, password]) => Ok(Request::Register {
                user: user.clone(),
                password: password.clone(),
            }),
            ("RENAME", [from, to]) => Ok(Request::Rename {
                from: from.clone(),
                to: to.clone(),
            }),
            ("MTIME", [path, mtime]) => parse_u64(mtime).map(|mtime| Request::Mtime {
                path: path.clone(),
                mtime,
            }),
            ("PUT", [path, size, rest @ ..]) if rest.len() <= 1 => (|| {
                Ok(Request::Put {
                    path: path.clone(),
                    size: parse_u64(size)?,
                    chunk: rest.first().map_or(Ok(DEFAULT_CHUNK), |c| parse_u64(c))?,
                })
            })(),
            ("SEND", [path, size]) => parse_u64(size).map(|size| Request::Send {
                path: path.clone(),
                size,
            }),
            ("GET", [path, rest @ ..]) => parse_candidates(rest).map(|candidates| Request::Get {
                path: path.clone(),
                candidates,
            }),
            ("LOGIN", _) => Err(wrong("LOGIN", "USER PASSWORD")),
            ("REGISTER", _) => Err(wrong("REGISTER", "USER PASSWORD")),
            ("RENAME", _) => Err(wrong("RENAME", "FROM TO")),
            ("MTIME", _) => Err(wrong("MTIME", "PATH SECONDS")),
            ("PUT", _) => Err(wrong("PUT", "PATH SIZE [CHUNK]")),
            ("SEND", _) => Err(wrong("SEND", "PATH SIZE")),
            ("GET", _) => Err(wrong("GET", "PATH [OFFSET HASH]...")),
            _ => return None,
        };
        Some(parsed)
    }

    /// Formats the request as a line (without its line end).
    pub fn to_line(&self) -> String {
        let q = |s: &str| quote(s);
        match self {
            Request::Login { user, password } => format!("LOGIN {} {}", q(user), q(password)),
            Request::Register { user, password } => format!("REGISTER {} {}", q(user), q(password)),
            Request::Pwd => "PWD".into(),
            Request::Cwd(None) => "CWD".into(),
            Request::Cwd(Some(p)) => format!("CWD {}", q(p)),
            Request::List(None) => "LIST".into(),
            Request::List(Some(p)) => format!("LIST {}", q(p)),
            Request::Stat(p) => format!("STAT {}", q(p)),
            Request::Hash(p) => format!("HASH {}", q(p)),
            Request::Mkd(p) => format!("MKD {}", q(p)),
            Request::Rmd(p) => format!("RMD {}", q(p)),
            Request::Dele(p) => format!("DELE {}", q(p)),
            Request::Rename { from, to } => format!("RENAME {} {}", q(from), q(to)),
            Request::Quota => "QUOTA".into(),
            Request::Parts => "PARTS".into(),
            Request::Discard(p) => format!("DISCARD {}", q(p)),
            Request::Mtime { path, mtime } => format!("MTIME {} {mtime}", q(path)),
            Request::Put { path, size, chunk } => format!("PUT {} {size} {chunk}", q(path)),
            Request::Send { path, size } => format!("SEND {} {size}", q(path)),
            Request::Get { path, candidates } => {
                format!("GET {}{}", q(path), format_candidates(candidates))
            }
            Request::Noop => "NOOP".into(),
            Request::Help => "HELP".into(),
            Request::Quit => "QUIT".into(),
        }
    }
}

/// One reply line as read by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    /// False for a `CODE-TEXT` continuation line.
    pub last: bool,
    pub text: String,
}

impl ReplyLine {
    /// Parses `CODE TEXT` or `CODE-TEXT`.
    pub fn parse(line: &str) -> Option<ReplyLine> {
        let b = line.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) || b[0] == b'0' {
            return None;
        }
        let code = line[..3].parse().ok()?;
        let (last, text) = match b.get(3) {
            None => (true, ""),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return None,
        };
        Some(ReplyLine {
            code,
            last,
            text: text.to_string(),
        })
    }
}

/// The kind of a binary frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Start,
    Chunk,
    End,
    Abort,
}

/// A frame header; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0] = match self.kind {
            FrameKind::Start => b'S',
            FrameKind::Chunk => b'C',
            FrameKind::End => b'E',
            FrameKind::Abort => b'A',
        };
        out[1..9].copy_from_slice(&self.offset.to_be_bytes());
        out[9..13].copy_from_slice(&self.len.to_be_bytes());
        out[13..45].copy_from_slice(&self.hash);
        out
    }

    /// Decodes and checks a header: an unknown kind, a payload on a frame
    /// that has none, or a chunk over [`MAX_CHUNK`] is an error.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, String> {
        let kind = match b[0] {
            b'S' => FrameKind::Start,
            b'C' => FrameKind::Chunk,
            b'E' => FrameKind::End,
            b'A' => FrameKind::Abort,
            other => return Err(format!("unknown frame kind 0x{other:02x}")),
        };
        let offset = u64::from_be_bytes(b[1..9].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(b[9..13].try_into().expect("4 bytes"));
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[13..45]);
        match kind {
            FrameKind::Chunk if len == 0 || len > MAX_CHUNK => {
                return Err(format!("chunk length {len} out of range"));
            }
            FrameKind::Chunk => {}
            _ if len != 0 => return Err("frame carries a payload it may not have".into()),
            _ => {}
        }
        Ok(FrameHeader {
            kind,
            offset,
            len,
            hash,
        })
    }

    pub fn start(offset: u64) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Start,
            offset,
            len: 0,
            hash: [0; 32],
        }
    }

    pub fn end(size: u64, hash: blake3::Hash) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::End,
            offset: size,
            len: 0,
            hash: *hash.as_bytes(),
        }
    }

    pub fn abort() -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Abort,
            offset: 0,
            len: 0,
            hash: [0; 32],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<Vec<String>> {
        split_commands(line, true).unwrap()
    }

    #[test]
    fn a_transfer_id_is_announced_in_a_continuation_line() {
        let line = transfer_line(Code::Ready, "00ff3a");
        assert_eq!(line, "150-transfer 00ff3a");
        let text = line[4..].to_string();
        assert_eq!(transfer_id(&[text]), Some("00ff3a"));
        for bad in ["transfer ", "transfer a b", "transfer \x1b", "id 12"] {
            assert_eq!(transfer_id(&[bad.to_string()]), None, "{bad}");
        }
        let long = format!("transfer {}", "a".repeat(MAX_TRANSFER_ID + 1));
        assert_eq!(transfer_id(&[long]), None);
    }

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(words("put a b"), vec![vec!["put", "a", "b"]]);
        assert_eq!(
            words(r#"put "my file.txt" 'x y'"#),
            vec![vec!["put", "my file.txt", "x y"]]
        );
        assert_eq!(
            words(r#"cd "a;b"; pwd"#),
            vec![vec!["cd", "a;b"], vec!["pwd"]]
        );
        assert_eq!(words(r"put my\ file"), vec![vec!["put", "my file"]]);
        assert_eq!(words(";; ls ;"), vec![vec!["ls"]]);
        assert_eq!(words(r#"x "" y"#), vec![vec!["x", "", "y"]]);
        assert_eq!(
            split_commands(r#"put "abc"#, true),
            Err(ParseError::UnterminatedQuote)
        );
        assert_eq!(
            split_commands("ls a\u{1b}[2J", true),
            Err(ParseError::ControlCharacter)
        );
        // Found by fuzzing: a control character escaped inside double quotes.
        for line in ["DELE \"a\\\u{1b}[2J\"", "DELE \"a\\\0\""] {
            assert_eq!(
                split_commands(line, false),
                Err(ParseError::ControlCharacter),
                "{line:?}"
            );
        }
    }

    #[test]
    fn wildcards_outside_quotes_make_patterns() {
        let w = |line: &str| split_words(line, true).unwrap().remove(0);
        let words = w(r#"put *.jpg "a*b" 'c?' d\* [x]y plain"#);
        let patterns: Vec<Option<&str>> = words.iter().map(|w| w.pattern.as_deref()).collect();
        assert_eq!(
            patterns,
            [None, Some("*.jpg"), None, None, None, Some("[x]y"), None]
        );
        assert_eq!(words[2].text, "a*b");
        assert_eq!(words[4].text, "d*");
        // Quoted wildcards beside an unquoted one are taken literally.
        assert_eq!(w(r#""x*"*"#)[0].pattern.as_deref(), Some("x[*]*"));
        assert_eq!(w("''")[0].text, "");
    }

    #[test]
    fn wire_does_not_split_on_semicolons() {
        assert_eq!(
            split_commands("DELE a;b", false).unwrap(),
            vec![vec!["DELE", "a;b"]]
        );
    }

    #[test]
    fn quote_round_trips() {
        for s in [
            "plain",
            "with space",
            "",
            "quo\"te",
            "back\\slash",
            "semi;colon",
            "üñí cødé 文件",
            "'",
            "a\"b\\c d",
        ] {
            let line = format!("X {}", quote(s));
            assert_eq!(split_commands(&line, false).unwrap()[0][1], s, "{line}");
            assert_eq!(split_commands(&line, true).unwrap()[0][1], s, "{line}");
        }
        assert_eq!(quote("a\nb"), "\"a\\u{a}b\"");
    }

    #[test]
    fn parses_requests() {
        let ok = |l: &str| Request::parse(l).unwrap();
        assert_eq!(ok("pwd"), Request::Pwd);
        assert_eq!(ok("CWD"), Request::Cwd(None));
        assert_eq!(ok("cwd \"a b\""), Request::Cwd(Some("a b".into())));
        assert_eq!(ok("PUT x 10"), ok(&format!("PUT x 10 {DEFAULT_CHUNK}")));
        assert_eq!(
            ok("PUT x 10 1024"),
            Request::Put {
                path: "x".into(),
                size: 10,
                chunk: 1024,
            }
        );
        let h = blake3::hash(b"x");
        assert_eq!(
            ok(&format!("GET f 5 {}", hex(&h))),
            Request::Get {
                path: "f".into(),
                candidates: vec![Candidate { offset: 5, hash: h }]
            }
        );
        for bad in [
            "",
            "   ",
            "FOO",
            "PWD x",
            "DELE",
            "DELE a b",
            "PUT x",
            "PUT x 10 1024 5",
            "PUT x -1 1024",
            "PUT x 99999999999999999999999",
            "PUT x 1e3",
            "GET f 5",
            "GET f 5 zz",
            "LOGIN a",
            "RENAME a",
            "LIST a b c d e f g h i j",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn every_request_round_trips() {
        let h = blake3::hash(b"y");
        let all = [
            Request::Login {
                user: "u".into(),
                password: "p w\"".into(),
            },
            Request::Register {
                user: "u".into(),
                password: "x".into(),
            },
            Request::Pwd,
            Request::Cwd(None),
            Request::Cwd(Some("/a b".into())),
            Request::List(Some("ü".into())),
            Request::Stat("s".into()),
            Request::Hash("h".into()),
            Request::Mkd("m".into()),
            Request::Rmd("r".into()),
            Request::Dele("d;x".into()),
            Request::Rename {
                from: "a".into(),
                to: "b c".into(),
            },
            Request::Quota,
            Request::Parts,
            Request::Discard("a \"b\"".into()),
            Request::Mtime {
                path: "m t".into(),
                mtime: 1_700_000_000,
            },
            Request::Put {
                path: "p".into(),
                size: u64::MAX,
                chunk: 1 << 18,
            },
            Request::Get {
                path: "g".into(),
                candidates: vec![
                    Candidate { offset: 1, hash: h },
                    Candidate { offset: 0, hash: h },
                ],
            },
            Request::Send {
                path: "small file".into(),
                size: 7,
            },
            Request::Noop,
            Request::Help,
            Request::Quit,
        ];
        for r in all {
            assert_eq!(Request::parse(&r.to_line()).unwrap(), r);
        }
    }

    #[test]
    fn debug_hides_passwords() {
        let r = Request::Login {
            user: "ann".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{r:?}").contains("hunter2"));
    }

    #[test]
    fn reply_lines() {
        assert_eq!(
            ReplyLine::parse("230 welcome").unwrap(),
            ReplyLine {
                code: 230,
                last: true,
                text: "welcome".into()
            }
        );
        assert!(!ReplyLine::parse("213-f 1").unwrap().last);
        assert_eq!(ReplyLine::parse("200").unwrap().text, "");
        for bad in ["", "20", "abc", "2000 x", "099 x", "20x y"] {
            assert!(ReplyLine::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn chunk_sizes() {
        assert!(
            valid_chunk_size(1024)
                && valid_chunk_size(1 << 18)
                && valid_chunk_size(MAX_CHUNK.into())
        );
        for bad in [0, 1, 512, 1000, 3 << 10, u64::from(MAX_CHUNK) * 2] {
            assert!(!valid_chunk_size(bad), "{bad}");
        }
    }

    #[test]
    fn frames() {
        let h = FrameHeader {
            kind: FrameKind::Chunk,
            offset: 7,
            len: 9,
            hash: [3; 32],
        };
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = b'Z';
        assert!(FrameHeader::decode(&bad).is_err());
        let mut big = h;
        big.len = MAX_CHUNK + 1;
        assert!(FrameHeader::decode(&big.encode()).is_err());
        big.len = 0;
        assert!(FrameHeader::decode(&big.encode()).is_err());
        let mut end = FrameHeader::end(5, blake3::hash(b""));
        end.len = 3;
        assert!(FrameHeader::decode(&end.encode()).is_err());
    }
}
