//! What the server says, read within bounds: replies, listings, and the
//! requests that wait for them.

use crate::protocol::{self, Entry, ReplyLine, Request};

use super::{Client, ClientError, Result};

// What a server sends is bounded whatever it claims: a reply, a listing and
// a download's plan are checked against these before anything is kept.

/// Longest reply line the client accepts. An honest line is at most a
/// quoted 4096-byte path and a few words.
pub const MAX_REPLY_LINE: usize = 64 * 1024;
/// Bytes of one reply other than a listing, all its lines together.
pub const MAX_REPLY_BYTES: usize = 1 << 20;
/// Continuation lines of one reply other than a listing.
pub const MAX_REPLY_LINES: usize = 1024;
/// Entries of one listing: the server's default `max_list_entries`.
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// Bytes of one listing, all its lines together: [`MAX_LIST_ENTRIES`]
/// lines of the longest entry an honest server writes (a 255-byte name
/// quoted is at most 512 bytes, plus about 50 for the other words).
pub const MAX_LIST_BYTES: usize = 64 << 20;
/// Requests or small uploads sent before their replies are read.
pub(super) const PIPELINE_WINDOW: usize = 64;

/// How much of one reply the client reads before it gives up on the server.
#[derive(Debug, Clone, Copy)]
pub struct ReplyLimit {
    /// Bytes of all the reply's lines together.
    pub bytes: usize,
    /// Continuation lines.
    pub lines: usize,
}

impl ReplyLimit {
    /// Any reply but a listing.
    pub const REPLY: ReplyLimit = ReplyLimit {
        bytes: MAX_REPLY_BYTES,
        lines: MAX_REPLY_LINES,
    };
    /// The reply to `LIST`.
    pub const LISTING: ReplyLimit = ReplyLimit {
        bytes: MAX_LIST_BYTES,
        lines: MAX_LIST_ENTRIES,
    };

    /// The limit for the reply to `request`.
    pub fn of(request: &Request) -> ReplyLimit {
        match request {
            Request::List(_) => ReplyLimit::LISTING,
            _ => ReplyLimit::REPLY,
        }
    }
}

/// A complete reply: its continuation lines and its final line.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
    pub lines: Vec<String>,
}

impl Reply {
    /// The id the server gave the transfer this reply answers, if it gave
    /// one (see `protocol`).
    pub fn transfer_id(&self) -> Option<String> {
        protocol::transfer_id(&self.lines).map(str::to_string)
    }

    /// An error reply as an error.
    pub fn into_error(self) -> ClientError {
        ClientError::Server {
            code: self.code,
            text: self.text,
        }
    }
}

/// A parsed `LIST` reply.
#[derive(Debug, Clone)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// The server cut the listing at its own limit.
    pub truncated: bool,
    /// The final line's text (`N entries`).
    pub text: String,
}

impl Client {
    /// Reads one whole reply of at most [`ReplyLimit::REPLY`].
    pub async fn read_reply(&mut self) -> Result<Reply> {
        self.read_reply_within(ReplyLimit::REPLY).await
    }

    /// Reads one whole reply; a longer one is a protocol error.
    pub async fn read_reply_within(&mut self, limit: ReplyLimit) -> Result<Reply> {
        self.logged_in().await?;
        self.read_reply_now(limit).await
    }

    /// [`Client::read_reply_within`] without reading a login's outcome
    /// first: for the greeting and the login's reply themselves.
    pub(super) async fn read_reply_now(&mut self, limit: ReplyLimit) -> Result<Reply> {
        let mut lines = vec![];
        let (code, text) = self
            .read_lines(limit, |line| {
                lines.push(line);
                Ok(())
            })
            .await?;
        Ok(Reply { code, text, lines })
    }

    /// Reads one reply, handing each continuation line's text to `each` as
    /// it arrives, and returns the final line's code and text. Past `limit`
    /// the reply is a protocol error, and the session is out of step. The
    /// outcome of a login sent with the first request is read first.
    async fn read_reply_lines(
        &mut self,
        limit: ReplyLimit,
        each: impl FnMut(String) -> Result<()>,
    ) -> Result<(u16, String)> {
        self.logged_in().await?;
        self.read_lines(limit, each).await
    }

    /// [`Client::read_reply_lines`], the login's outcome aside.
    async fn read_lines(
        &mut self,
        limit: ReplyLimit,
        mut each: impl FnMut(String) -> Result<()>,
    ) -> Result<(u16, String)> {
        let (mut count, mut bytes) = (0usize, 0usize);
        loop {
            // A server that goes silent mid-reply counts as a lost connection.
            let line = tokio::time::timeout(self.io_timeout, self.conn.read_line(MAX_REPLY_LINE))
                .await
                .map_err(|_| ClientError::Connection("no reply from the server".into()))??
                .ok_or_else(|| ClientError::Connection("server closed the connection".into()))?;
            bytes += line.len() + 1;
            if bytes > limit.bytes {
                return Err(ClientError::Protocol(format!(
                    "reply longer than {} bytes",
                    limit.bytes
                )));
            }
            let reply = ReplyLine::parse(&line)
                .ok_or_else(|| ClientError::Protocol(format!("bad reply line {line:?}")))?;
            if reply.last {
                self.closed |= reply.code == 421;
                return Ok((reply.code, reply.text));
            }
            count += 1;
            if count > limit.lines {
                return Err(ClientError::Protocol(format!(
                    "reply longer than {} lines",
                    limit.lines
                )));
            }
            each(reply.text)?;
        }
    }

    /// Sends a request and returns its reply, whatever its code.
    pub async fn exchange(&mut self, request: &Request) -> Result<Reply> {
        self.write_request(request).await?;
        self.flush().await?;
        self.read_reply_within(ReplyLimit::of(request)).await
    }

    /// Sends a request and returns its reply; an error reply is an error.
    pub async fn request(&mut self, request: &Request) -> Result<Reply> {
        let reply = self.exchange(request).await?;
        if reply.code >= 400 {
            return Err(ClientError::Server {
                code: reply.code,
                text: reply.text,
            });
        }
        Ok(reply)
    }

    /// Sends `requests` without waiting between them and hands each reply,
    /// in order, to `each` with its request's index; an error reply is an
    /// `Err` there. Only one reply is held at a time. An error from `each`
    /// stops the run and leaves the session out of step.
    pub async fn request_many(
        &mut self,
        requests: &[Request],
        mut each: impl FnMut(usize, Result<Reply>) -> Result<()>,
    ) -> Result<()> {
        for (b, batch) in requests.chunks(PIPELINE_WINDOW).enumerate() {
            for r in batch {
                self.write_request(r).await?;
            }
            self.send().await?;
            for (i, r) in batch.iter().enumerate() {
                let reply = self.read_reply_within(ReplyLimit::of(r)).await?;
                let reply = if reply.code >= 400 {
                    Err(ClientError::Server {
                        code: reply.code,
                        text: reply.text,
                    })
                } else {
                    Ok(reply)
                };
                if let Err(e) = each(b * PIPELINE_WINDOW + i, reply) {
                    self.in_data = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Writes a request without waiting for its reply, nor sending it yet
    /// ([`Client::flush`] does): its reply is read later, in order, with
    /// [`Client::read_answer`], [`Client::read_listing`] or
    /// [`Client::get_answered`]. Returns the bytes the request took.
    pub async fn pipe(&mut self, request: &Request) -> Result<usize> {
        let len = self.write_request(request).await?;
        self.unanswered += 1;
        Ok(len)
    }

    /// Sends what [`Client::pipe`] wrote, and `QUIT` after it if
    /// [`Client::quit_with_next`] asked for it.
    pub async fn flush(&mut self) -> Result<()> {
        if std::mem::take(&mut self.quit_next) {
            // Accepted before login too: it never waits for the login.
            self.conn.write_line(&Request::Quit.to_line()).await?;
            self.quit_sent = true;
        }
        self.send().await
    }

    /// Sends what was written.
    pub(super) async fn send(&mut self) -> Result<()> {
        match self.conn.flush().await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e.into()).await),
        }
    }

    /// Reads the whole reply to the oldest piped request (not a `LIST`:
    /// see [`Client::read_listing`]), whatever its code.
    pub async fn read_answer(&mut self) -> Result<Reply> {
        let reply = self.read_reply().await?;
        self.answered();
        Ok(reply)
    }

    /// One piped request was answered in full.
    pub(super) fn answered(&mut self) {
        self.unanswered = self.unanswered.saturating_sub(1);
    }

    /// Lists a remote directory (or describes a file), at most
    /// [`MAX_LIST_ENTRIES`] entries in [`MAX_LIST_BYTES`]; each entry is
    /// parsed as it arrives, so only the parsed entries are kept.
    pub async fn list(&mut self, path: Option<&str>) -> Result<Listing> {
        self.pipe(&Request::List(path.map(str::to_string))).await?;
        self.flush().await?;
        self.read_listing().await
    }

    /// Reads the reply to the oldest piped `LIST`, within the same bounds
    /// as [`Client::list`].
    pub async fn read_listing(&mut self) -> Result<Listing> {
        let mut entries = vec![];
        let mut bad = None;
        let (code, text) = self
            .read_reply_lines(ReplyLimit::LISTING, |line| {
                match Entry::parse(&line) {
                    Ok(e) => entries.push(e),
                    Err(_) => {
                        bad.get_or_insert(ClientError::Protocol(format!(
                            "bad listing line {line:?}"
                        )));
                    }
                }
                Ok(())
            })
            .await?;
        self.answered();
        if code >= 400 {
            return Err(ClientError::Server { code, text });
        }
        if let Some(e) = bad {
            return Err(e);
        }
        Ok(Listing {
            truncated: text.contains("truncated"),
            entries,
            text,
        })
    }
}

/// `"quoted path"` → the path.
pub fn unquote(text: &str) -> Result<String> {
    let words =
        protocol::split_commands(text, false).map_err(|e| ClientError::Protocol(e.to_string()))?;
    words
        .into_iter()
        .next()
        .and_then(|w| w.into_iter().next())
        .ok_or_else(|| ClientError::Protocol(format!("expected a path, got {text:?}")))
}
