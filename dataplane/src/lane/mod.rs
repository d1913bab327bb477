//! The fast lane: ordinary requests proxied without Pingora's per-request phase pipeline.
//!
//! Profiles of the data plane (`loadtest/TUNING.md`) put our own code at about 2 % of its CPU
//! and Pingora's proxy pipeline at about 40 %: a dozen async phases per request, a header map
//! built and rebuilt, allocations, a timer per phase. Most traffic in front of containers is
//! the same simple exchange, a bodiless `GET` answered with a framed body, so the lane serves
//! exactly that on the client connection Pingora's listener accepted, with the same routing,
//! round robin, ejection, retries, forwarding headers and metrics as the pipeline, and hands
//! everything else over to it.
//!
//! The rule for handing over is simple: the lane decides before anything goes upstream. A
//! request that is not plain (see [`head::plain_request`]), that routes nowhere, to a service
//! with capped backends (admission queues live in the pipeline) or to one with no backend at
//! all, is handed to Pingora with every byte read so far put back in front of the stream; the
//! connection then stays with Pingora. Once the lane has sent a request upstream it sees the
//! request through, answering failures itself the way the pipeline does (503 when no backend
//! accepts a connection, 502 when one fails to answer, 504 when it is too slow), so no request
//! is ever attempted by both.
//!
//! Per request the lane reads the client once, writes the backend once, reads it once and
//! writes the client once (for a response that fits in one read), with buffers owned by the
//! connection and upstream connections pooled per thread ([`pool`]): no lock or header map on
//! the way. The timeouts of reads that have to wait (the backend's answer, the client's next
//! request) are Pingora's shared 10 ms-tick timers: a Tokio timer per read made the runtime
//! wake its own I/O driver (an `eventfd` write) for most requests.

pub mod head;
pub mod pool;

use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::prelude::fast_timeout::fast_timeout;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::check::Limits;
use crate::front::scan::{Bad, ChunkScan};
use crate::front::FrontState;
use crate::metrics::UpstreamError;
use crate::proxy::{error_body, RequestIds, MAX_TRIES};
use crate::snapshot::{BackendState, ServiceState};
use crate::store::TableStore;
use head::{Body, Response};

/// Room kept free in a read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// Room for each read of a body that did not come with its head: large bodies move in few
/// reads and writes. Only connections that stream such bodies grow their buffer to it.
const BODY_CHUNK: usize = 64 * 1024;

/// What the lane did with a connection.
pub enum Served {
    /// The connection is finished.
    Done,
    /// A request the lane does not serve: these bytes were read and not answered, and go back
    /// in front of the stream for the pipeline.
    HandOver(Vec<u8>),
}

/// The lane's settings and the state it shares with the pipeline.
pub struct Lane {
    store: Arc<TableStore>,
    ids: Arc<RequestIds>,
    limits: Limits,
    keepalive: Duration,
}

/// Buffers of one client connection, reused by each of its requests.
struct Buffers {
    /// From the client: the current head and whatever was pipelined after it.
    client: Vec<u8>,
    /// The head going upstream.
    request: Vec<u8>,
    /// From the backend.
    upstream: Vec<u8>,
    /// Going to the client: a response head and the start of its body.
    response: Vec<u8>,
}

/// How an attempt on one backend failed, before any byte of a response reached the client.
enum Failed {
    /// No connection: the backend is ejected and any method may go elsewhere.
    Connect(UpstreamError),
    /// The backend took the request and did not answer it properly.
    Upstream(UpstreamError, u16),
}

/// How an exchange that reached the client ended.
struct Answered {
    status: u16,
    /// The client connection can take another request.
    keep: bool,
}

/// An exchange that ended with the client connection unusable: the client went away, or the
/// backend failed mid-body. The status is the one the client got, or was about to get.
struct Cut(u16);

impl Lane {
    pub fn new(
        store: Arc<TableStore>,
        ids: Arc<RequestIds>,
        limits: Limits,
        keepalive_secs: u64,
    ) -> Self {
        Lane {
            store,
            ids,
            limits,
            keepalive: Duration::from_secs(keepalive_secs.max(1)),
        }
    }

    /// Serve a client connection for as long as its requests are plain.
    pub async fn serve<S>(&self, client: &mut S, peer: Option<IpAddr>, front: &FrontState) -> Served
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut bufs = Buffers {
            client: Vec::with_capacity(READ_CHUNK / 4),
            request: Vec::with_capacity(1024),
            upstream: Vec::with_capacity(READ_CHUNK),
            response: Vec::with_capacity(1024),
        };
        let mut first = true;
        // The client's address as `X-Forwarded-For` writes it, made once per connection.
        let peer = peer.map(|ip| ip.to_string());
        let peer = peer.as_deref().map(str::as_bytes);
        loop {
            // The next head: parsed from what is buffered, else read for.
            let plain = loop {
                // Empty lines before a request line are ignored (RFC 9112 §2.2); dropped here
                // so a client that sends only those waits as an idle one.
                let blank = bufs
                    .client
                    .iter()
                    .take_while(|b| matches!(b, b'\r' | b'\n'))
                    .count();
                if blank > 0 {
                    bufs.client.drain(..blank);
                }
                if !bufs.client.is_empty() {
                    let ids = &self.ids;
                    match head::plain_request(
                        &bufs.client,
                        &self.limits,
                        peer,
                        |out| ids.write_next(out),
                        &mut bufs.request,
                    ) {
                        Ok(Some(plain)) => break plain,
                        Ok(None) => {}
                        Err(head::NotPlain) => return Served::HandOver(bufs.client),
                    }
                }
                let idle = bufs.client.is_empty() && !first;
                let read = read_more(client, &mut bufs.client);
                let n = if idle {
                    // Between requests the keep-alive timeout applies; the head deadline and
                    // the drain are the stream's (`front::Guarded`).
                    match fast_timeout(self.keepalive, read).await {
                        Ok(r) => r,
                        Err(_) => return Served::Done,
                    }
                } else {
                    read.await
                };
                match n {
                    Ok(n) if n > 0 => {}
                    _ => return Served::Done,
                }
            };
            first = false;

            let Some(snapshot) = self.store.current() else {
                return Served::HandOver(bufs.client);
            };
            let route = snapshot.router.route(
                &bufs.client[plain.host.clone()],
                &bufs.client[plain.path.clone()],
            );
            let Some(svc) = route.map(|s| &snapshot.services[s as usize]) else {
                return Served::HandOver(bufs.client);
            };
            if svc.limited {
                return Served::HandOver(bufs.client);
            }
            let Some(first_pick) = svc.pick(&[]) else {
                return Served::HandOver(bufs.client);
            };

            let _inflight = InFlight::new(svc);
            let start = Instant::now();
            let (status, backend, keep) = self
                .proxy(client, svc, first_pick, &plain, front, &mut bufs)
                .await;
            svc.backends[backend as usize]
                .counters
                .count_response(status);
            svc.counters.observe(start.elapsed().as_nanos() as u64);
            front.lane_requests.fetch_add(1, Relaxed);
            if !keep {
                let _ = client.shutdown().await;
                return Served::Done;
            }
            if bufs.client.len() == plain.len {
                bufs.client.clear();
            } else {
                bufs.client.drain(..plain.len);
            }
        }
    }

    /// One request, through as many attempts as the service allows. Returns the status the
    /// client got (499 if it left first), the backend counted for it (the last one tried), and
    /// whether the client connection stays open.
    async fn proxy<S>(
        &self,
        client: &mut S,
        svc: &ServiceState,
        first: u32,
        plain: &head::Plain,
        front: &FrontState,
        bufs: &mut Buffers,
    ) -> (u16, u32, bool)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut tried = [0u32; MAX_TRIES];
        let mut tries = 0;
        let mut i = first;
        let mut last_failure;
        loop {
            tried[tries] = i;
            tries += 1;
            let backend = &svc.backends[i as usize];
            match exchange(client, backend, plain, front, bufs).await {
                Ok(Ok(done)) => return (done.status, i, done.keep),
                Ok(Err(Cut(status))) => return (status, i, false),
                Err(Failed::Connect(kind)) => {
                    backend.counters.count_error(kind);
                    svc.eject(i);
                    last_failure = 503;
                }
                Err(Failed::Upstream(kind, status)) => {
                    // GET and HEAD are idempotent and nothing reached the client: another
                    // backend may try, as the pipeline retries them.
                    backend.counters.count_error(kind);
                    last_failure = status;
                }
            }
            // Out of attempts: no pick, so no round-robin position is spent.
            let budget_left = tries <= svc.retries as usize && tries < MAX_TRIES;
            match budget_left.then(|| svc.pick(&tried[..tries])).flatten() {
                Some(next) => i = next,
                None => break,
            }
        }
        // Every attempt failed: answered for the last one, and the connection closes, as the
        // pipeline does after a proxy error.
        let response = error_response(last_failure);
        let sent = client.write_all(&response).await.is_ok() && client.flush().await.is_ok();
        (if sent { last_failure } else { 499 }, i, false)
    }
}

/// Counts a request in flight for its service while it lives. (The process-wide count the
/// pipeline keeps for the graceful shutdown is not needed here: a lane request always has its
/// connection open, and the shutdown waits for those.)
struct InFlight<'a> {
    svc: &'a ServiceState,
}

impl<'a> InFlight<'a> {
    fn new(svc: &'a ServiceState) -> Self {
        svc.counters.inflight_add(1);
        InFlight { svc }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.svc.counters.inflight_add(-1);
    }
}

/// A plain-text error answer that closes the connection.
fn error_response(status: u16) -> Vec<u8> {
    let body = error_body(status);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Read once more into `buf`, growing it when it is nearly full.
async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    r.read_buf(buf).await
}

/// A read from the backend, bounded by its read timeout.
async fn read_upstream(
    up: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Option<Duration>,
) -> Result<usize, UpstreamError> {
    let read = read_more(up, buf);
    let r = match timeout {
        Some(t) => fast_timeout(t, read)
            .await
            .map_err(|_| UpstreamError::ReadTimeout)?,
        None => read.await,
    };
    r.map_err(|_| UpstreamError::Closed)
}

async fn connect(backend: &BackendState) -> Result<TcpStream, UpstreamError> {
    let connect = TcpStream::connect(backend.addr);
    let conn = match backend.peer.options.connection_timeout {
        Some(t) => tokio::time::timeout(t, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?,
        None => connect.await,
    };
    let conn = conn.map_err(|e| match e.kind() {
        io::ErrorKind::ConnectionRefused => UpstreamError::ConnectRefused,
        io::ErrorKind::TimedOut => UpstreamError::ConnectTimeout,
        _ => UpstreamError::ConnectOther,
    })?;
    let _ = conn.set_nodelay(true);
    Ok(conn)
}

/// One attempt on one backend: send the request, pass the response on. `Err` if it failed
/// before the client got anything (another backend may try); `Ok(Err)` if the client
/// connection must close after a response was begun or could not be delivered.
async fn exchange<S>(
    client: &mut S,
    backend: &BackendState,
    plain: &head::Plain,
    front: &FrontState,
    bufs: &mut Buffers,
) -> Result<Result<Answered, Cut>, Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = backend.peer.options.read_timeout;
    let mut pooled = pool::take(backend.addr);
    let (mut up, response, close) = loop {
        // A pooled connection the backend closed while idle fails before any byte of a
        // response: that is the pool's staleness, not the backend's failure, and the request
        // goes again on a new connection to the same backend, outside the retry budget, as
        // nginx does for its cached upstream connections.
        let reused = pooled.is_some();
        let mut up = match pooled.take() {
            Some(conn) => conn,
            None => connect(backend).await.map_err(Failed::Connect)?,
        };
        if up.write_all(&bufs.request).await.is_err() {
            if reused {
                continue;
            }
            return Err(Failed::Upstream(UpstreamError::Closed, 502));
        }
        bufs.upstream.clear();
        let mut heard = false;
        match read_response_head(&mut up, plain, front, bufs, client, timeout, &mut heard).await {
            Ok((r, close)) => break (up, r, close),
            Err(HeadError::Closed) if reused && !heard => continue,
            Err(HeadError::Failed(kind, status)) => return Err(Failed::Upstream(kind, status)),
            Err(HeadError::Closed) => return Err(Failed::Upstream(UpstreamError::Closed, 502)),
            Err(HeadError::Client) => return Ok(Err(Cut(499))),
        }
    };

    let status = response.status;
    let mut reusable = response.reusable;
    let keep = !close;
    // The head and as much of the body as arrived with it go in one write.
    let mut rest = match response.body {
        Body::None => Rest::Length(0),
        Body::Length(n) => Rest::Length(n),
        Body::Chunked => Rest::Chunked(ChunkScan::default()),
        Body::UntilClose => Rest::UntilClose,
    };
    let Ok(first_part) = rest.take(&bufs.upstream[response.len..], &mut reusable) else {
        return Err(Failed::Upstream(UpstreamError::Other, 502));
    };
    if rest == Rest::UntilClose {
        chunk(&mut bufs.response, first_part);
    } else {
        bufs.response.extend_from_slice(first_part);
    }
    if client.write_all(&bufs.response).await.is_err() {
        // Nothing reached a client that is gone (nginx's 499).
        return Ok(Err(Cut(499)));
    }

    // The rest of the body, read by read and passed on as it comes.
    while rest != Rest::Length(0) {
        bufs.upstream.clear();
        bufs.upstream.reserve(BODY_CHUNK);
        let part = match read_upstream(&mut up, &mut bufs.upstream, timeout).await {
            Ok(0) if rest == Rest::UntilClose => {
                if client.write_all(b"0\r\n\r\n").await.is_err() {
                    return Ok(Err(Cut(status)));
                }
                break;
            }
            Ok(0) | Err(_) => return Ok(Err(Cut(status))),
            Ok(n) => match rest.take(&bufs.upstream[..n], &mut reusable) {
                Ok(part) if rest == Rest::UntilClose => {
                    bufs.response.clear();
                    chunk(&mut bufs.response, part);
                    &bufs.response[..]
                }
                Ok(part) => part,
                Err(_) => return Ok(Err(Cut(status))),
            },
        };
        if client.write_all(part).await.is_err() {
            return Ok(Err(Cut(status)));
        }
    }
    if client.flush().await.is_err() {
        return Ok(Err(Cut(status)));
    }
    if reusable {
        pool::put(backend.addr, up);
    }
    Ok(Ok(Answered { status, keep }))
}

/// What is still to come of a response body after what has been passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rest {
    /// This many bytes (0: the body is complete).
    Length(u64),
    /// Chunked framing, scanned to find its end.
    Chunked(ChunkScan),
    /// Everything until the backend closes.
    UntilClose,
}

impl Rest {
    /// The part of `read` that belongs to the body, advancing past it. Bytes after the body's
    /// end make the connection not `reusable`. Fails on broken chunked framing.
    fn take<'a>(&mut self, read: &'a [u8], reusable: &mut bool) -> Result<&'a [u8], Bad> {
        let end = match self {
            Rest::Length(left) => {
                let take = (read.len() as u64).min(*left);
                *left -= take;
                take as usize
            }
            Rest::Chunked(scan) => match scan.scan(read)? {
                Some(end) => {
                    *self = Rest::Length(0);
                    end
                }
                None => read.len(),
            },
            Rest::UntilClose => read.len(),
        };
        *reusable &= end == read.len();
        Ok(&read[..end])
    }
}

/// Append `data` as one chunk of a chunked body (nothing for no data: that would end it).
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    if !data.is_empty() {
        let _ = write!(out, "{:x}\r\n", data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

/// Why no response head could be passed on.
enum HeadError {
    /// The backend closed, or reset, before a complete head.
    Closed,
    /// A timeout, or a head that cannot be passed on: the status it stands for.
    Failed(UpstreamError, u16),
    /// The client went away while an interim (1xx) response was passed on.
    Client,
}

/// Read the backend's final response head into `bufs.upstream` and write the client's into
/// `bufs.response`; also whether the client connection closes after it (the client asked, or
/// the process is draining by the time the answer comes). Interim (1xx) responses are passed
/// on as they come. `heard` is set once any byte came from the backend.
async fn read_response_head<S>(
    up: &mut TcpStream,
    plain: &head::Plain,
    front: &FrontState,
    bufs: &mut Buffers,
    client: &mut S,
    timeout: Option<Duration>,
    heard: &mut bool,
) -> Result<(Response, bool), HeadError>
where
    S: AsyncWrite + Unpin,
{
    loop {
        if !bufs.upstream.is_empty() {
            *heard = true;
            let close = plain.close || front.draining();
            match head::response_head(&bufs.upstream, plain.head, close, &mut bufs.response) {
                Ok(Some(r)) if r.status == 101 => {
                    // Never asked for: the request carried no Upgrade.
                    return Err(HeadError::Failed(UpstreamError::Other, 502));
                }
                Ok(Some(r)) if r.status < 200 => {
                    if client.write_all(&bufs.response).await.is_err() {
                        return Err(HeadError::Client);
                    }
                    bufs.upstream.drain(..r.len);
                    continue;
                }
                Ok(Some(r)) => return Ok((r, close)),
                Ok(None) => {}
                Err(_) => return Err(HeadError::Failed(UpstreamError::Other, 502)),
            }
        }
        match read_upstream(up, &mut bufs.upstream, timeout).await {
            Ok(0) | Err(UpstreamError::Closed) => return Err(HeadError::Closed),
            Ok(_) => {}
            Err(kind) => return Err(HeadError::Failed(kind, 504)),
        }
    }
}
