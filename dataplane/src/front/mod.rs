//! The connection front: what happens to a client connection before and between its requests.
//!
//! [`Front`] wraps the pipeline's [`ServerApp`] and is what Pingora's listener runs for each
//! accepted connection. It caps open connections (over `--max-connections` a new one gets
//! `503` with `Retry-After` at once, instead of hanging in the accept queue; a TLS one is
//! closed), moves the socket to the runtime that serves it ([`rehome`]), runs the TLS
//! handshake on connections to the TLS listener ([`tls`]), wraps the stream in a [`Guarded`] one (the head
//! deadline, the checks on bytes as sent, the graceful close of idle connections) and serves
//! plain requests on the fast lane before handing the connection to the pipeline. The one
//! request path it calls directly is the lane; everything else it shares goes through the
//! plane. Why each guard exists is in `docs/request-path.md`.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::{Shutdown, Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The part of Pingora's `IO` contract a stream wrapper passes straight to its `inner`
/// stream: writes, shutdown, the id, TLS facts and the digests. The wrapper writes its own
/// `AsyncRead`, `Peek` and `Debug`.
macro_rules! pass_through_io {
    ($wrapper:ty) => {
        impl tokio::io::AsyncWrite for $wrapper {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }

        #[async_trait::async_trait]
        impl pingora::protocols::Shutdown for $wrapper {
            async fn shutdown(&mut self) {
                pingora::protocols::Shutdown::shutdown(self.inner.as_mut()).await
            }
        }

        impl pingora::protocols::UniqueID for $wrapper {
            fn id(&self) -> pingora::protocols::UniqueIDType {
                self.inner.id()
            }
        }

        impl pingora::protocols::Ssl for $wrapper {
            fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
                self.inner.get_ssl()
            }
            fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
                self.inner.get_ssl_digest()
            }
            fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
                self.inner.selected_alpn_proto()
            }
        }

        impl pingora::protocols::GetTimingDigest for $wrapper {
            fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
                self.inner.get_timing_digest()
            }
            fn get_read_pending_time(&self) -> std::time::Duration {
                self.inner.get_read_pending_time()
            }
            fn get_write_pending_time(&self) -> std::time::Duration {
                self.inner.get_write_pending_time()
            }
        }

        impl pingora::protocols::GetProxyDigest for $wrapper {
            fn get_proxy_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::raw_connect::ProxyDigest>> {
                self.inner.get_proxy_digest()
            }
        }

        impl pingora::protocols::GetSocketDigest for $wrapper {
            fn get_socket_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::SocketDigest>> {
                self.inner.get_socket_digest()
            }
        }
    };
}

mod accepted;
mod guarded;
pub mod h2;
mod replay;
pub mod tls;
mod workers;
pub use guarded::Guarded;
pub use h2::H2Limits;

use crate::answers::Answer;
use crate::certs::{Certs, TlsConn};
use crate::connections::{self, Event};
use crate::lane::{Lane, Served};
use crate::plane::Plane;
use accepted::Accepted;
pub use workers::Workers;

/// How long a connection idle between requests stays open once a graceful shutdown began.
pub const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// How long a refused connection is read from before it is closed, so the client's request
/// is consumed and the kernel sends FIN, not RST (which could discard the 503 unread).
const REFUSE_LINGER: Duration = Duration::from_millis(200);

/// Settings of the front, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct FrontLimits {
    /// Open client connections beyond which new ones are refused.
    pub max_connections: usize,
    /// Longest time a whole request head may take to arrive.
    pub header_timeout: Duration,
    /// Longest time a TLS handshake may take, from accept.
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 connections: ALPN `h2` on the TLS listener, and the h2c preface on plain
    /// listeners when `h2c` is set.
    pub h2: H2Limits,
    pub h2c: bool,
}

/// What a client sends first on an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The TLS listener: connections accepted on its port are TLS, served with these
/// certificates.
pub struct TlsListener {
    pub port: u16,
    pub certs: Arc<Certs>,
}

/// Wraps an application (the HTTP proxy) with the connection cap and the guarded stream, and
/// serves plain requests on the fast lane before handing a connection to it.
pub struct Front<A> {
    inner: Arc<A>,
    limits: FrontLimits,
    plane: Arc<Plane>,
    lane: Option<Lane>,
    tls: Option<TlsListener>,
    workers: Option<Workers>,
}

impl<A> Front<A> {
    pub fn new(inner: A, limits: FrontLimits, plane: Arc<Plane>) -> Self {
        Front {
            inner: Arc::new(inner),
            limits,
            plane,
            lane: None,
            tls: None,
            workers: None,
        }
    }

    /// Terminate TLS on connections to this listener's port.
    pub fn with_tls(mut self, tls: TlsListener) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The TLS listener's certificates, if the connection came to its port.
    fn tls_of(&self, stream: &Stream) -> Option<&Arc<Certs>> {
        let tls = self.tls.as_ref()?;
        let port = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).map(|a| a.port()));
        (port == Some(tls.port)).then_some(&tls.certs)
    }

    /// The TLS handshake, bounded by `--tls-handshake-timeout`; `Err` when the connection is
    /// done.
    async fn handshake(&self, certs: &Certs, stream: Stream) -> Result<(Stream, Arc<TlsConn>), ()> {
        let connections = &self.plane.connections;
        let handshake = tls::accept(certs, stream);
        match tokio::time::timeout(self.limits.tls_handshake_timeout, handshake).await {
            Ok(Ok(done)) => {
                connections.count(Event::TlsHandshake);
                Ok(done)
            }
            Ok(Err(refusal)) => {
                connections.count(refusal.event());
                Err(())
            }
            Err(_) => {
                connections.count(Event::TlsTimeout);
                Err(())
            }
        }
    }

    /// Serve connections on these threads, each accepted socket registered with the one that
    /// serves it ([`rehome`]); without them, on the thread Pingora gave it (`--work-stealing`).
    pub fn with_workers(mut self, workers: Workers) -> Self {
        self.workers = Some(workers);
        self
    }

    /// Serve plain requests on `lane`; the wrapped application gets the rest.
    pub fn with_lane(mut self, lane: Lane) -> Self {
        self.lane = Some(lane);
        self
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Front<A> {
    /// Each connection is served by a task of its own on one of our threads (on this thread's
    /// runtime with `--work-stealing`), and the task Pingora's listener spawned for it ends at
    /// once: Pingora's task is sized for its own handshake and timeout (about 9 KiB,
    /// heaptrack), and would hold that for the life of every keep-alive connection. Ours holds
    /// what an idle connection needs (see `loadtest/idle.py`). Our cleanup and drain do not
    /// depend on Pingora's task.
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        _pingora_shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let connection = self.clone().serve_connection(stream);
        match &self.workers {
            Some(workers) => workers.spawn(connection),
            None => drop(tokio::spawn(connection)),
        }
        None
    }

    /// Runs once the listener has stopped. The proxy's own cleanup drops every idle keep-alive
    /// connection at once; [`Guarded`] closes them gently instead, so the proxy's cleanup only
    /// runs after the drain window, for whatever is left.
    async fn cleanup(&self) {
        // Only now, with the listener closed, do responses start saying `Connection: close`.
        // Earlier, a client told to reconnect could land in the listen backlog just before it
        // closed, and get a reset instead of a refusal.
        self.plane.shutdown.begin();
        tokio::time::sleep(DRAIN_IDLE).await;
        self.plane.shutdown.close_idle();
        tokio::time::sleep(DRAIN_IDLE).await;
        self.inner.cleanup().await;
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Front<A> {
    /// One client connection, from accept to close.
    ///
    /// An `async move` block rather than an `async fn`, whose state would hold the arguments
    /// twice: this is every connection's task.
    #[allow(clippy::manual_async_fn)] // see above: the state's size
    fn serve_connection(self: Arc<Self>, mut stream: Stream) -> impl Future<Output = ()> + Send {
        async move {
            let connections = &self.plane.connections;
            let (_open, count) = connections.open_one();
            let certs = self.tls_of(&stream).cloned();
            if count > self.limits.max_connections {
                connections.count(Event::Refused);
                // A TLS client could not read a plaintext 503: it is closed before any handshake
                // work is spent on it.
                // Boxed, as the rare path it is: its read buffer would otherwise be part of every
                // connection's task.
                if certs.is_none() {
                    Box::pin(refuse(&mut stream)).await;
                }
                return;
            }
            let peer = stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
            let stream = if self.workers.is_some() {
                match rehome(stream) {
                    Ok(s) => s,
                    Err(_) => return,
                }
            } else {
                stream
            };
            // The handshake's future is boxed: it is large and over once the connection is in.
            let (stream, tls) = match certs {
                Some(certs) => match Box::pin(self.handshake(&certs, stream)).await {
                    Ok((stream, conn)) => (stream, Some(conn)),
                    Err(()) => return,
                },
                None => (stream, None),
            };
            // Our drain signal, not Pingora's (see `shutdown`).
            let drain = self.plane.shutdown.subscribe();
            // HTTP/2 skips the lane and the HTTP/1 guards: its own loop bounds it.
            let (stream, h2) = match &tls {
                Some(_) => {
                    let h2 = stream.selected_alpn_proto() == Some(ALPN::H2);
                    (stream, h2)
                }
                None if self.limits.h2c => {
                    match Box::pin(h2c_preface(stream, self.limits.header_timeout)).await {
                        Some(read) => read,
                        None => return,
                    }
                }
                None => (stream, false),
            };
            if h2 {
                let streams = h2::Streams {
                    app: self.inner.clone(),
                    lane: self.lane.clone(),
                    peer,
                    tls,
                };
                let serve = h2::serve(streams, stream, self.limits.h2, drain, connections);
                return Box::pin(serve).await;
            }
            let mut guarded =
                Guarded::new(stream, self.limits.header_timeout, self.plane.clone(), peer);
            if let Some(lane) = &self.lane {
                match lane.serve(&mut guarded, peer, tls.as_deref()).await {
                    Served::Done => return,
                    // What the lane read and did not answer is read again by the pipeline.
                    Served::HandOver(read) => {
                        connections.count(Event::LaneHandover);
                        guarded.hand_over(read);
                    }
                }
            }
            // Pingora's HTTP/1 app runs the keep-alive loop itself and returns `None` when the
            // connection is done, so this wraps each connection exactly once, and the connection's
            // switch of protocols lives as long as its task.
            let pipeline =
                connections::with_switch(self.inner.process_new(Box::new(guarded), &drain));
            let _ = Box::pin(pipeline).await;
        }
    }
}

/// Read a plain connection's first bytes while they match the HTTP/2 preface: `true` when the
/// whole preface came, `false` at the first byte that differs (an HTTP/1 request). The bytes
/// read are put back in front of the stream. `None`: closed, or the preface did not finish
/// within `timeout`.
async fn h2c_preface(mut stream: Stream, timeout: Duration) -> Option<(Stream, bool)> {
    let mut read = Vec::with_capacity(H2_PREFACE.len());
    let h2 = tokio::time::timeout(timeout, async {
        loop {
            let mut buf = [0u8; 24];
            let want = H2_PREFACE.len() - read.len();
            let n = stream.read(&mut buf[..want]).await.ok()?;
            if n == 0 {
                return None;
            }
            read.extend_from_slice(&buf[..n]);
            if !H2_PREFACE.starts_with(&read) {
                return Some(false);
            }
            if read.len() == H2_PREFACE.len() {
                return Some(true);
            }
        }
    })
    .await
    .ok()??;
    Some((Box::new(replay::Replay::new(read, stream)), h2))
}

/// Move an accepted socket's registration to the runtime this task runs on.
///
/// Pingora's listener accepts on one runtime and the front hands the connection to one of its
/// own, while the socket stays registered with the accepting runtime's reactor: each readiness
/// event then crossed threads, an `eventfd` write and a wake-up of the serving thread for about
/// every other request (`strace -f -k`, see loadtest/TUNING.md). A duplicate of the socket
/// registered here, and the original dropped (deregistering it there), keeps all of the
/// connection's I/O on one thread, as in nginx. Costs a few system calls per connection, none
/// per request. The socket comes back as an [`Accepted`], lighter than Pingora's stream.
/// Sockets that are not TCP are returned as they are.
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
    Ok(Box::new(Accepted::new(here, peer)))
}

/// Answer 503 without reading the request, then close cleanly.
async fn refuse(stream: &mut Stream) {
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        let answer = Answer::TooManyConnections.closing_bytes();
        if stream.write_all(answer).await.is_ok() && stream.flush().await.is_ok() {
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    Shutdown::shutdown(stream.as_mut()).await;
}
