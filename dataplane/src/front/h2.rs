//! HTTP/2 client connections: the accept loop of one connection that negotiated `h2` (ALPN on
//! the TLS listener, or the preface with `--h2c`), run by the front. Each stream is a request
//! of its own, served by the lane when it is plain and by the pipeline otherwise. The loop bounds what one
//! connection can make the proxy do: requests in the pipeline at once, streams the client
//! abandons before their answer (rapid reset), malformed streams, time to the preface and time
//! with no stream open; a graceful shutdown sends GOAWAY. It reads no request itself.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{self, default_h2_options, H2Accept};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream};
use pingora::server::ShutdownWatch;

use crate::certs::TlsConn;
use crate::connections::{self, Connections, H2Close};
use crate::lane::Lane;

/// Limits of HTTP/2 client connections, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct H2Limits {
    /// Streams a client may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams: u32,
    /// Largest decoded header list of a request (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub max_header_list: u32,
    /// The client's preface must arrive within this.
    pub handshake: Duration,
    /// A connection with no request in flight this long is closed.
    pub idle: Duration,
}

/// Streams the client abandoned before their answer, counted only once this many were: a
/// connection whose abandoned streams are then half or more of all is closed (Envoy's rule for
/// premature resets, with its minimum of 500 lowered to 100 here).
const ABANDON_MIN: usize = 100;

/// Streams refused over the in-flight cap before the connection is closed.
const REFUSAL_BUDGET: usize = 100;

/// Malformed streams (refused by Pingora's checks) before the connection is closed, as
/// Pingora's own accept loop does.
const MALFORMED_BUDGET: usize = 32;

/// How long a closing connection is driven to deliver its GOAWAY and finish its streams.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Largest response body buffered per stream for a client that reads slowly (h2's default
/// is 400 KiB; with 128 streams that would be 50 MiB for one connection).
const MAX_SEND_BUFFER: usize = 64 * 1024;

/// What the streams of one connection have done, shared with their tasks.
#[derive(Default)]
struct Tally {
    /// Requests of this connection in the pipeline now.
    in_flight: AtomicUsize,
    /// Streams the client left before they were answered.
    abandoned: AtomicUsize,
}

/// Where the streams of a connection go: the lane first, if there is one, then `app`.
pub struct Streams<A> {
    pub app: Arc<A>,
    pub lane: Option<Lane>,
    /// The client's address and TLS facts, the same for every stream.
    pub peer: Option<IpAddr>,
    pub tls: Option<Arc<TlsConn>>,
}

/// Serve an HTTP/2 connection until it closes.
pub async fn serve<A>(
    streams: Streams<A>,
    stream: Stream,
    limits: H2Limits,
    drain: ShutdownWatch,
    counters: &Connections,
) where
    A: HttpServerApp + Send + Sync + 'static,
{
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let mut options = default_h2_options();
    options
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.max_header_list)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    let mut conn = match tokio::time::timeout(
        limits.handshake,
        server::handshake(stream, Some(options)),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(_)) => return,
        Err(_) => {
            counters.count_h2_close(H2Close::HandshakeTimeout);
            return;
        }
    };
    counters.count_h2_connection();
    let tally = Arc::new(Tally::default());
    // Shared by the connection's stream tasks: one reference count per stream.
    let streams = Arc::new(streams);
    // In the pipeline at once: twice the streams the client may open, since a stream the client
    // resets is closed for h2 at once while its request may still be on its way.
    let max_in_flight = 2 * limits.max_streams as usize;
    let (mut accepted, mut refused, mut malformed) = (0usize, 0usize, 0usize);
    let mut drain = drain;
    // One stream is served inside this task, polled beside the connection: for the common
    // client with one request at a time that saves a task and two wake-ups per request (the
    // stream's task waking this one to send, and back). Streams that arrive while it runs get
    // tasks of their own.
    let mut inline: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    let closing = loop {
        let next = tokio::select! {
            biased;
            _ = drain.changed() => break None,
            _ = async { inline.as_mut().expect("guarded").await }, if inline.is_some() => {
                inline = None;
                continue;
            }
            next = tokio::time::timeout(limits.idle, server::HttpSession::from_h2_conn(&mut conn, digest.clone())) => next,
        };
        let session = match next {
            // Nothing arrived for the idle time: closed if nothing is in flight either.
            Err(_) if tally.in_flight.load(Relaxed) == 0 => break Some(H2Close::Idle),
            Err(_) => continue,
            Ok(Ok(Some(H2Accept::Session(session)))) => session,
            Ok(Ok(Some(H2Accept::Rejected))) => {
                malformed += 1;
                if malformed > MALFORMED_BUDGET {
                    break Some(H2Close::Malformed);
                }
                continue;
            }
            // The client closed, or broke the protocol (h2 sent GOAWAY itself): the stream
            // served here may still finish while the connection is driven to its end.
            Ok(Ok(None)) | Ok(Err(_)) => {
                if let Some(request) = inline.take() {
                    let closed = std::future::poll_fn(|cx| conn.poll_closed(cx));
                    let both = async { tokio::join!(request, closed) };
                    let _ = tokio::time::timeout(CLOSE_GRACE, both).await;
                }
                return;
            }
        };
        let mut session = session;
        if tally.in_flight.load(Relaxed) >= max_in_flight {
            session.shutdown_with_reason(h2::Reason::REFUSED_STREAM);
            counters.count_h2_refused_stream();
            refused += 1;
            if refused > REFUSAL_BUDGET {
                break Some(H2Close::Refusals);
            }
            continue;
        }
        accepted += 1;
        let abandoned = tally.abandoned.load(Relaxed);
        if abandoned >= ABANDON_MIN && abandoned * 2 >= accepted {
            break Some(H2Close::RapidReset);
        }
        tally.in_flight.fetch_add(1, Relaxed);
        let request = serve_stream(session, streams.clone(), tally.clone(), drain.clone());
        if inline.is_none() {
            inline = Some(Box::pin(request));
        } else {
            tokio::spawn(request);
        }
    };
    // A stream still served here goes on in a task of its own while the connection closes.
    if let Some(request) = inline.take() {
        tokio::spawn(request);
    }
    // Draining, or closed for a reason: GOAWAY, then the streams in flight may finish.
    match closing {
        None => conn.graceful_shutdown(),
        Some(why) => {
            counters.count_h2_close(why);
            if why == H2Close::Idle {
                conn.graceful_shutdown();
            } else {
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, finish(&mut conn)).await;
}

/// One stream: the lane if it takes it, else the pipeline; counted as abandoned if the client
/// reset it before its answer.
async fn serve_stream<A>(
    session: server::HttpSession,
    streams: Arc<Streams<A>>,
    tally: Arc<Tally>,
    drain: ShutdownWatch,
) where
    A: HttpServerApp + Send + Sync + 'static,
{
    let request = async {
        let left = match &streams.lane {
            Some(lane) => {
                lane.serve_h2(session, streams.peer, streams.tls.as_deref())
                    .await
            }
            None => Some(session),
        };
        if let Some(session) = left {
            streams
                .app
                .process_new_http(ServerSession::new_http2(session), &drain)
                .await;
        }
        connections::stream_abandoned()
    };
    if connections::with_stream(request).await {
        tally.abandoned.fetch_add(1, Relaxed);
    }
    tally.in_flight.fetch_sub(1, Relaxed);
}

/// Drive a connection that sent GOAWAY until it is closed; streams still arriving (sent before
/// the client saw the GOAWAY) are refused.
async fn finish(conn: &mut h2::server::Connection<Stream, Bytes>) {
    while let Some(Ok((_, mut respond))) = conn.accept().await {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
    }
}
