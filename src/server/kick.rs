//! Ending a session from outside (`ftpx kick`): a [`Kick`] is set once,
//! and the session's stream, wrapped in [`Kickable`], fails every read and
//! write from then on, waking the session wherever it waits, mid-transfer
//! too. A transfer stopped so keeps what it verified, as after a dropped
//! connection; an idle session is told why before it closes
//! ([`Kickable::farewell`]).

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

const RUNNING: u8 = 0;
const KICKED: u8 = 1;
/// Kicked, and the last words are being written.
const FAREWELL: u8 = 2;

/// The switch that ends one session.
#[derive(Default)]
pub struct Kick {
    state: AtomicU8,
    /// The tasks waiting on the stream's reads and writes.
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl Kick {
    /// Ends the session: its stream fails from now on.
    pub fn kick(&self) {
        let _ = self
            .state
            .compare_exchange(RUNNING, KICKED, Ordering::SeqCst, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    pub fn kicked(&self) -> bool {
        self.state.load(Ordering::SeqCst) != RUNNING
    }

    /// After a kick, lets the session write its last reply and close.
    pub fn farewell(&self) {
        let _ = self
            .state
            .compare_exchange(KICKED, FAREWELL, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Whether I/O must fail now; if not, remembers who to wake.
    fn check(&self, side: usize, cx: &Context<'_>) -> io::Result<()> {
        if self.state.load(Ordering::SeqCst) == KICKED {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "session ended by the server's admin",
            ));
        }
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !wakers[side]
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            wakers[side] = Some(cx.waker().clone());
        }
        drop(wakers);
        // A kick between the first look and the waker's registration.
        match self.state.load(Ordering::SeqCst) {
            KICKED => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "session ended by the server's admin",
            )),
            _ => Ok(()),
        }
    }
}

/// A stream that a [`Kick`] can cut.
pub struct Kickable<S> {
    inner: S,
    kick: std::sync::Arc<Kick>,
}

impl<S> Kickable<S> {
    pub fn new(inner: S, kick: std::sync::Arc<Kick>) -> Kickable<S> {
        Kickable { inner, kick }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Kickable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.kick.check(0, cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncBufRead + Unpin> AsyncBufRead for Kickable<S> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        this.kick.check(0, cx)?;
        Pin::new(&mut this.inner).poll_fill_buf(cx)
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.inner).consume(amt)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Kickable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.kick.check(1, cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.kick.check(1, cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_kick_wakes_a_waiting_read_and_farewell_lets_one_reply_out() {
        let (a, mut b) = tokio::io::duplex(64);
        let kick = Arc::new(Kick::default());
        let mut stream = Kickable::new(a, kick.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let read = stream.read(&mut buf).await;
            (read.map_err(|e| e.kind()), stream)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        kick.kick();
        let (read, mut stream) = reader.await.unwrap();
        assert_eq!(read, Err(io::ErrorKind::ConnectionAborted));
        assert!(stream.write_all(b"x").await.is_err());
        kick.farewell();
        stream.write_all(b"421 bye\n").await.unwrap();
        let mut got = [0u8; 8];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"421 bye\n");
    }
}
