//! The connection front: what happens to a client connection before and between its requests.
//!
//! Pingora times each read of a request head, not the whole head, so a client that trickles a
//! byte every few seconds holds its connection forever (slowloris; Pingora issue #447). It has no
//! cap on client connections. And on a graceful shutdown it drops idle keep-alive connections at
//! once, racing clients that are sending on them. [`Front`] wraps the proxy's [`ServerApp`], and
//! [`Guarded`] each connection's stream, to close those gaps:
//!
//! - **A cap on open client connections.** Over it a new connection is answered `503` with
//!   `Retry-After` at once and closed, instead of hanging in the accept queue.
//! - **A deadline for each whole request head**, counted from accept for the first request and
//!   from the first byte of the head for later ones on a keep-alive connection (HAProxy's `timeout
//!   http-request`). Past it the client gets `408` and the connection is closed. Waiting *between*
//!   requests is the keep-alive timeout's business, set per request in `proxy`.
//! - **Graceful shutdown.** While draining, the proxy marks responses `Connection: close`, and a
//!   connection that is idle between requests is closed [`DRAIN_IDLE`] after the shutdown began —
//!   long enough for a client that just got a keep-alive response to send its next request and
//!   get an answer, instead of an RST.
//!
//! - **Checks on the bytes as sent** ([`scan`]), where Pingora's parser is lenient before we see
//!   the parsed request: the request line (Pingora percent-escapes spaces and control bytes in a
//!   target) and chunked framing (it accepts control bytes in chunk extensions and an empty
//!   chunk-size line). Either gets `400` and a close.
//!
//! The wrapper sees bytes, not HTTP. A head ends at its first empty line; a new head may begin
//! once a final (non-1xx) response has begun. Bytes are scanned only inside a head and the chunk
//! framing of a chunked body (data is skipped, not read), so other bodies and upgraded tunnels
//! pass untouched, and the common case (a whole head in one read) arms no timer.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

pub(crate) mod scan;
use scan::{feed, switches_protocols, Bad, Phase};

use crate::lane::{Lane, Served};

/// How long a connection idle between requests stays open once a graceful shutdown began.
pub const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// How long a refused connection is read from before it is closed, so the client's request
/// is consumed and the kernel sends FIN, not RST (which could discard the 503 unread).
const REFUSE_LINGER: Duration = Duration::from_millis(200);

/// A complete response of ours that closes the connection, with its length computed.
fn canned(status: &str, body: &str, retry_after: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n{body}",
        body.len(),
        if retry_after { "Retry-After: 1\r\n" } else { "" },
    )
    .into_bytes()
}

static RESPONSE_503: LazyLock<Vec<u8>> = LazyLock::new(|| {
    canned(
        "503 Service Unavailable",
        "too many connections, try again\n",
        true,
    )
});
static RESPONSE_408: LazyLock<Vec<u8>> = LazyLock::new(|| {
    canned(
        "408 Request Timeout",
        "request head not received in time\n",
        false,
    )
});
static RESPONSE_400_LINE: LazyLock<Vec<u8>> =
    LazyLock::new(|| canned("400 Bad Request", "malformed request line\n", false));
static RESPONSE_400_CHUNK: LazyLock<Vec<u8>> =
    LazyLock::new(|| canned("400 Bad Request", "malformed chunked body\n", false));

/// Settings of the front, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct FrontLimits {
    /// Open client connections beyond which new ones are refused.
    pub max_connections: usize,
    /// Longest time a whole request head may take to arrive.
    pub header_timeout: Duration,
    /// Register each accepted socket with the runtime that serves it ([`rehome`]): needed when
    /// the proxy runs one runtime per thread.
    pub rehome: bool,
}

/// State shared by every connection of one listener, and read by the admin and shutdown code.
#[derive(Debug, Default)]
pub struct FrontState {
    open: AtomicUsize,
    draining: AtomicBool,
    /// The shutdown signal the proxy and the connections see: it flips only once the listener
    /// has closed. Pingora's own flips at the signal, and the proxy would then tell clients to
    /// reconnect while the listener still accepted them into a backlog it was about to reset.
    drain: tokio::sync::watch::Sender<bool>,
    refused: AtomicU64,
    head_timeouts: AtomicU64,
    drained_idle: AtomicU64,
    bad_request_lines: AtomicU64,
    bad_chunks: AtomicU64,
    pub(crate) lane_requests: AtomicU64,
    lane_handovers: AtomicU64,
}

impl FrontState {
    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }
    /// Connections refused because `max_connections` were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }
    /// Connections closed because a request head did not arrive in time.
    pub fn head_timeouts(&self) -> u64 {
        self.head_timeouts.load(Relaxed)
    }
    /// Requests refused with 400 for a request line that is not `METHOD SP target SP version`.
    pub fn bad_request_lines(&self) -> u64 {
        self.bad_request_lines.load(Relaxed)
    }
    /// Requests refused with 400 for chunked framing that is not RFC 9112 §7.1.
    pub fn bad_chunks(&self) -> u64 {
        self.bad_chunks.load(Relaxed)
    }
    /// Requests the fast lane served.
    pub fn lane_requests(&self) -> u64 {
        self.lane_requests.load(Relaxed)
    }
    /// Connections the fast lane handed to the pipeline.
    pub fn lane_handovers(&self) -> u64 {
        self.lane_handovers.load(Relaxed)
    }
    /// Idle connections closed by a graceful shutdown.
    pub fn drained_idle(&self) -> u64 {
        self.drained_idle.load(Relaxed)
    }
    /// A graceful shutdown has begun: responses should close their connections.
    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }
    pub fn start_draining(&self) {
        self.draining.store(true, Relaxed);
        self.drain.send_replace(true);
    }
}

/// Wraps an application (the HTTP proxy) with the connection cap and the guarded stream, and
/// serves plain requests on the fast lane before handing a connection to it.
pub struct Front<A> {
    inner: Arc<A>,
    limits: FrontLimits,
    state: Arc<FrontState>,
    lane: Option<Lane>,
}

impl<A> Front<A> {
    pub fn new(inner: A, limits: FrontLimits, state: Arc<FrontState>) -> Self {
        Front {
            inner: Arc::new(inner),
            limits,
            state,
            lane: None,
        }
    }

    /// Serve plain requests on `lane`; the wrapped application gets the rest.
    pub fn with_lane(mut self, lane: Lane) -> Self {
        self.lane = Some(lane);
        self
    }
}

/// Decrements the open-connection count however the connection ends.
struct OpenGuard<'a>(&'a AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Front<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        _pingora_shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let count = self.state.open.fetch_add(1, Relaxed) + 1;
        let _open = OpenGuard(&self.state.open);
        if count > self.limits.max_connections {
            self.state.refused.fetch_add(1, Relaxed);
            refuse(&mut stream).await;
            return None;
        }
        let stream = if self.limits.rehome {
            match rehome(stream) {
                Ok(s) => s,
                Err(_) => return None,
            }
        } else {
            stream
        };
        // Our drain signal, not Pingora's (see `FrontState::drain`).
        let drain = self.state.drain.subscribe();
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut guarded = Guarded::new(
            stream,
            self.limits.header_timeout,
            self.state.clone(),
            drain.clone(),
        );
        if let Some(lane) = &self.lane {
            // The lane never switches protocols (it answers a 101 it did not ask for with a
            // 502), and body bytes it passes on must not look like one to the stream.
            guarded.upgrades = false;
            match lane.serve(&mut guarded, peer, &self.state).await {
                Served::Done => return None,
                // What the lane read and did not answer is read again by the pipeline.
                Served::HandOver(read) => {
                    self.state.lane_handovers.fetch_add(1, Relaxed);
                    guarded.unread = read;
                    guarded.upgrades = true;
                }
            }
        }
        // Pingora's HTTP/1 app runs the keep-alive loop itself and returns `None` when the
        // connection is done, so this wraps each connection exactly once.
        self.inner.process_new(Box::new(guarded), &drain).await
    }

    /// Runs once the listener has stopped. The proxy's own cleanup drops every idle keep-alive
    /// connection at once; [`Guarded`] closes them gently instead, so the proxy's cleanup only
    /// runs after the drain window, for whatever is left.
    async fn cleanup(&self) {
        // Only now, with the listener closed, do responses start saying `Connection: close`.
        // Earlier, a client told to reconnect could land in the listen backlog just before it
        // closed, and get a reset instead of a refusal.
        self.state.start_draining();
        tokio::time::sleep(DRAIN_IDLE * 2).await;
        self.inner.cleanup().await;
    }
}

/// Move an accepted socket's registration to the runtime this task runs on.
///
/// With one runtime per thread, Pingora's listener accepts on one runtime and hands the
/// connection to another picked at random, while the socket stays registered with the
/// accepting runtime's reactor: each readiness event then crossed threads, an `eventfd` write
/// and a wake-up of the serving thread for about every other request (`strace -f -k`, see
/// loadtest/TUNING.md). A duplicate of the socket registered here, and the original dropped
/// (deregistering it there), keeps all of the connection's I/O on one thread, as in nginx.
/// Costs a few system calls per connection, none per request. Sockets that are not TCP are
/// returned as they are.
fn rehome(stream: Stream) -> io::Result<Stream> {
    use std::os::fd::BorrowedFd;
    let fd = stream.id();
    if fd < 0 {
        return Ok(stream);
    }
    // SAFETY: `fd` is the open socket `stream` owns, and `stream` outlives this borrow.
    let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    let std_stream = std::net::TcpStream::from(dup);
    let Ok(peer) = std_stream.peer_addr() else {
        return Ok(stream);
    };
    std_stream.set_nonblocking(true)?;
    let here = tokio::net::TcpStream::from_std(std_stream)?;
    drop(stream);
    let new_fd = std::os::fd::AsRawFd::as_raw_fd(&here);
    let mut l4 = pingora::protocols::l4::stream::Stream::from(here);
    let digest = pingora::protocols::SocketDigest::from_raw_fd(new_fd);
    let _ = digest
        .peer_addr
        .set(Some(pingora::protocols::l4::socket::SocketAddr::Inet(peer)));
    l4.set_socket_digest(digest);
    Ok(Box::new(l4))
}

/// Answer 503 without reading the request, then close cleanly.
async fn refuse(stream: &mut Stream) {
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        if stream.write_all(&RESPONSE_503).await.is_ok() && stream.flush().await.is_ok() {
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    Shutdown::shutdown(stream.as_mut()).await;
}

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
    state: Arc<FrontState>,
    /// Bytes read and scanned already (by the fast lane), returned before any new read.
    unread: Vec<u8>,
    /// Whether a write beginning `HTTP/1.x 101 ` turns the connection into a tunnel.
    upgrades: bool,
}

impl Guarded {
    fn new(
        inner: Stream,
        header_timeout: Duration,
        state: Arc<FrontState>,
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
            state,
            unread: Vec::new(),
            upgrades: true,
        }
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
                        let (counter, response, why) = match bad {
                            Bad::RequestLine | Bad::Target => (
                                &this.state.bad_request_lines,
                                &*RESPONSE_400_LINE,
                                "malformed request line",
                            ),
                            Bad::Chunk => (
                                &this.state.bad_chunks,
                                &*RESPONSE_400_CHUNK,
                                "malformed chunked body",
                            ),
                        };
                        counter.fetch_add(1, Relaxed);
                        let _ = Pin::new(&mut this.inner).poll_write(cx, response);
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
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
                        this.state.head_timeouts.fetch_add(1, Relaxed);
                        // Best effort: the socket's send buffer is empty between requests.
                        let _ = Pin::new(&mut this.inner).poll_write(cx, &RESPONSE_408);
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
                        this.state.drained_idle.fetch_add(1, Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_responses_frame_their_bodies_exactly() {
        for r in [
            &*RESPONSE_503,
            &*RESPONSE_408,
            &*RESPONSE_400_LINE,
            &*RESPONSE_400_CHUNK,
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut resp = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(n) = resp.parse(r).unwrap() else {
                panic!("incomplete: {}", r.escape_ascii());
            };
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                .unwrap();
            assert_eq!(len, r.len() - n, "{}", r.escape_ascii());
        }
    }
}
