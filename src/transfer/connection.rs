//! Lines and frames over any buffered byte stream (TLS in production, an
//! in-memory pipe in some tests). Every read is bounded in size, and every
//! read or write of frame data in time.
//!
//! Reads come straight from the stream's own buffer: over TLS that is the
//! plaintext rustls decrypted, so a received byte is copied once more only
//! into the frame or line that takes it. Writes gather in a buffer of ours,
//! so that a reply line or a frame header is not a TLS record of its own.

use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter,
};

use crate::protocol::{Code, FRAME_HEADER_LEN, FrameHeader};
use crate::transfer::error::{Error, Result};

/// What a [`Connection`] runs over: a stream that buffers what it reads.
pub trait Stream: AsyncBufRead + AsyncWrite + Unpin {}

impl<S: AsyncBufRead + AsyncWrite + Unpin> Stream for S {}

pub struct Connection<S> {
    stream: BufWriter<S>,
    io_timeout: Duration,
}

impl<S: Stream> Connection<S> {
    pub fn new(stream: S, io_timeout: Duration) -> Connection<S> {
        Connection {
            stream: BufWriter::with_capacity(64 * 1024, stream),
            io_timeout,
        }
    }

    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    /// Reads one line of at most `max` bytes, without its line end. `Ok(None)`
    /// is a clean end of stream before any byte of a line. A longer line is
    /// [`Error::LineTooLong`]; bytes that are not UTF-8 are a syntax error.
    pub async fn read_line(&mut self, max: usize) -> Result<Option<String>> {
        let mut line = Vec::new();
        loop {
            let buf = self.stream.fill_buf().await.map_err(Error::Connection)?;
            if buf.is_empty() {
                if line.is_empty() {
                    return Ok(None);
                }
                return Err(Error::Connection(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if line.len() + take > max + 2 {
                return Err(Error::LineTooLong);
            }
            line.extend_from_slice(&buf[..take]);
            self.stream.consume(take);
            if done {
                break;
            }
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > max {
            return Err(Error::LineTooLong);
        }
        String::from_utf8(line)
            .map(Some)
            .map_err(|_| Error::NotText)
    }

    /// Waits until input is buffered, the stream has ended or it failed
    /// (the next read tells which). Cancel safe: nothing is consumed.
    pub async fn input(&mut self) {
        let _ = self.stream.fill_buf().await;
    }

    /// The bytes that have arrived and wait to be read: those buffered, and
    /// what the stream has ready without waiting. Nothing is taken.
    fn arrived(&mut self) -> &[u8] {
        match self.stream.fill_buf().now_or_never() {
            Some(Ok(buf)) => buf,
            _ => &[],
        }
    }

    /// The lines that have arrived whole, each with its line end.
    fn whole_lines(&mut self) -> impl Iterator<Item = &[u8]> {
        let lines = self.arrived().split_inclusive(|&b| b == b'\n');
        lines.take_while(|l| l.ends_with(b"\n"))
    }

    /// Whether a whole line has arrived and waits to be read. A peer that
    /// sends requests without waiting for replies gets its replies in fewer
    /// writes when they are sent only once none waits.
    pub fn line_waiting(&mut self) -> bool {
        self.whole_lines().next().is_some()
    }

    /// Up to `max` lines that have arrived whole, as text, without taking
    /// them (the next reads return them as ever); stops at one that is not
    /// UTF-8. For a reader that prepares their work ahead.
    pub fn lines_waiting(&mut self, max: usize) -> Vec<String> {
        let text = self.whole_lines().take(max).map_while(|l| {
            let l = l.strip_suffix(b"\n")?;
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            std::str::from_utf8(l).ok().map(str::to_string)
        });
        text.collect()
    }

    /// Whether a whole final reply line (`NNN text`) has arrived and waits
    /// to be read. For a reader whose peer sends only reply lines here.
    pub fn reply_waiting(&mut self) -> bool {
        let is_final =
            |l: &[u8]| l.len() > 4 && l[..3].iter().all(u8::is_ascii_digit) && l[3] == b' ';
        self.whole_lines().any(is_final)
    }

    /// Queues a line; [`Connection::flush`] sends it.
    pub async fn write_line(&mut self, line: &str) -> Result<()> {
        timed(self.io_timeout, "write", async {
            self.stream.write_all(line.as_bytes()).await?;
            self.stream.write_all(b"\n").await
        })
        .await
    }

    pub async fn flush(&mut self) -> Result<()> {
        timed(self.io_timeout, "write", self.stream.flush()).await
    }

    /// Writes a final reply line and sends it.
    pub async fn reply(&mut self, code: Code, text: &str) -> Result<()> {
        self.write_line(&code.line(text)).await?;
        self.flush().await
    }

    pub async fn read_frame_header(&mut self) -> Result<FrameHeader> {
        let mut buf = [0u8; FRAME_HEADER_LEN];
        timed(self.io_timeout, "read", self.stream.read_exact(&mut buf)).await?;
        FrameHeader::decode(&buf).map_err(Error::Protocol)
    }

    /// Fills `buf` exactly.
    pub async fn read_payload(&mut self, buf: &mut [u8]) -> Result<()> {
        timed(self.io_timeout, "read", self.stream.read_exact(buf))
            .await
            .map(|_| ())
    }

    /// Queues a frame. Payloads larger than the buffer go straight to the stream.
    pub async fn write_frame(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<()> {
        timed(self.io_timeout, "write", async {
            self.stream.write_all(&header.encode()).await?;
            self.stream.write_all(payload).await
        })
        .await
    }

    /// Closes the write side cleanly (TLS close_notify).
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.io_timeout, async {
            let _ = self.stream.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

async fn timed<T>(
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = std::io::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(Error::Connection),
        Err(_) => Err(Error::Timeout(what)),
    }
}
