//! The guarded client stream: a deadline for each whole request head (408), the byte scan's
//! checks on the bytes as sent (400), and the graceful close of a connection idle while
//! draining. The front wraps every client stream in one; the lane and the pipeline read
//! through it without knowing. It sees bytes, not HTTP, and arms no timer when a head arrives
//! in one read. Why each guard exists: `docs/request-path.md` ("Why the front guards").

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::DRAIN_IDLE;
use crate::answers::Answer;
use crate::connections::Event;
use crate::http1::scan::{feed, switches_protocols, Bad, Phase};
use crate::plane::Plane;

type DrainWait = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// A client stream with a whole-head deadline and a graceful close when idle while draining.
pub struct Guarded {
    inner: Stream,
    phase: Phase,
    header_timeout: Duration,
    /// Deadline of the head being read; set at accept, or when a later head first has to wait.
    deadline: Option<Instant>,
    /// Allocated the first time a head has to wait, then reset for later heads.
    timer: Option<Pin<Box<Sleep>>>,
    /// Completes `DRAIN_IDLE` after a graceful shutdown began; made on the first idle wait.
    drain: Option<DrainWait>,
    drained: bool,
    shutdown: ShutdownWatch,
    plane: Arc<Plane>,
    /// Bytes read and scanned already (by the fast lane), returned before any new read.
    unread: Vec<u8>,
    /// Whether a write beginning `HTTP/1.x 101 ` turns the connection into a tunnel.
    upgrades: bool,
}

impl Guarded {
    pub(super) fn new(
        inner: Stream,
        header_timeout: Duration,
        plane: Arc<Plane>,
        shutdown: ShutdownWatch,
    ) -> Self {
        Guarded {
            inner,
            phase: Phase::head(),
            header_timeout,
            deadline: Some(Instant::now() + header_timeout),
            timer: None,
            drain: None,
            drained: false,
            shutdown,
            plane,
            unread: Vec::new(),
            upgrades: true,
        }
    }

    /// Whether a write beginning `HTTP/1.x 101 ` turns the connection into a tunnel (off while
    /// the fast lane, which never switches protocols, serves it).
    pub(super) fn set_upgrades(&mut self, on: bool) {
        self.upgrades = on;
    }

    /// The fast lane hands the connection to the pipeline: `read` (bytes it read and did not
    /// answer) is read again first, and protocol switches count again.
    pub(super) fn hand_over(&mut self, read: Vec<u8>) {
        self.unread = read;
        self.upgrades = true;
    }

    /// A read is waiting inside a head: is the deadline past? Registers a wake-up if not.
    fn head_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Instant::now() + self.header_timeout);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// A read is waiting between requests: has the drain window passed? Registers a wake-up.
    fn drain_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.drained {
            return true;
        }
        let drain = self.drain.get_or_insert_with(|| {
            let mut shutdown = self.shutdown.clone();
            Box::pin(async move {
                if shutdown.wait_for(|down| *down).await.is_ok() {
                    tokio::time::sleep(DRAIN_IDLE).await;
                } else {
                    // The server is gone without a graceful shutdown; never close from here.
                    std::future::pending::<()>().await;
                }
            })
        });
        // A finished future must not be polled again.
        self.drained = drain.as_mut().poll(cx).is_ready();
        self.drained
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread[..n]);
            this.unread.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                match feed(&mut this.phase, new) {
                    Ok(false) => {}
                    Ok(true) => this.deadline = None,
                    Err(bad) => {
                        // Best effort, and the connection ends here either way. (A response
                        // may already be under way for a request before this one; the client
                        // then sees it cut short, as with any connection closed mid-response.)
                        let (event, answer) = match bad {
                            Bad::RequestLine | Bad::Target => {
                                (Event::BadRequestLine, Answer::BadRequestLine)
                            }
                            Bad::Chunk => (Event::BadChunk, Answer::BadChunk),
                        };
                        this.plane.connections.count(event);
                        let _ = Pin::new(&mut this.inner).poll_write(cx, answer.closing_bytes());
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            answer.body().trim_end(),
                        )));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let phase = this.phase;
                // A head has begun (or it is the connection's first, timed from accept).
                let in_head =
                    matches!(phase, Phase::Head(h) if h.seen()) || this.deadline.is_some();
                match phase {
                    Phase::Head(_) if in_head && this.head_expired(cx) => {
                        this.plane.connections.count(Event::HeadTimeout);
                        // Best effort: the socket's send buffer is empty between requests.
                        let answer = Answer::HeadTimeout.closing_bytes();
                        let _ = Pin::new(&mut this.inner).poll_write(cx, answer);
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("request head not complete within {:?}", this.header_timeout),
                        )))
                    }
                    // Between requests and draining. Pingora also reads one byte at a time
                    // while a response streams, to notice a client that leaves; that read
                    // must not end the stream, so only a read for a new head (a buffer of
                    // more than one byte) is answered with end of stream.
                    _ if phase.between_requests()
                        && buf.remaining() > 1
                        && this.drain_expired(cx) =>
                    {
                        this.plane.connections.count(Event::DrainedIdle);
                        // End of stream: the proxy closes the connection as if the client had.
                        Poll::Ready(Ok(()))
                    }
                    _ => Poll::Pending,
                }
            }
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.upgrades && switches_protocols(buf) {
            self.phase = Phase::Tunnel;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.upgrades
            && bufs
                .iter()
                .find(|b| !b.is_empty())
                .is_some_and(|b| switches_protocols(b))
        {
            self.phase = Phase::Tunnel;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// The rest of Pingora's `IO` contract, passed through to the real stream.

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner.as_mut()).await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        // Pingora peeks for the HTTP/2 preface; bytes handed back by the lane come first.
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.len());
            buf[..n].copy_from_slice(&self.unread[..n]);
            return Ok(n == buf.len());
        }
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}
