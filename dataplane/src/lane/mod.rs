//! The fast lane: plain requests (a bodiless `GET` or `HEAD` over HTTP/1.1) served on the
//! connection the front gives it, without Pingora's per-request phases, through the same
//! router, attempt core, header editor and answers as the pipeline. It decides before anything
//! goes upstream: whatever it does not serve (see [`plain_request`]) it hands back, with the
//! bytes it read, and never attempts a request the pipeline will. Called by the front only.
//! `docs/request-path.md` walks both paths.

mod h2;
pub mod pool;
pub mod spare;

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::prelude::fast_timeout::fast_timeout;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::access_log::Entry;
use crate::attempt::{Failure, Routed};
use crate::certs::TlsConn;
use crate::clock;
use crate::hostnames::ACME_CHALLENGE_PREFIX;
use crate::http1::editor::{ClientText, Origin};
use crate::http1::head::{self, plain_request, Body, Response};
use crate::http1::limits::MAX_INTERIM_RESPONSES;
use crate::http1::scan::{Bad, ChunkScan};
use crate::metrics::UpstreamError;
use crate::plane::Plane;
use crate::snapshot::{self, Backend};

/// Room kept free in a read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// Room for each read of a body that did not come with its head: large bodies move in few
/// reads and writes. Only connections that stream such bodies grow their buffer to it.
const BODY_CHUNK: usize = spare::Size::Body.bytes();

/// What the lane did with a connection.
pub enum Served {
    /// The connection is finished.
    Done,
    /// A request the lane does not serve: these bytes were read and not answered, and go back
    /// in front of the stream for the pipeline.
    HandOver(Vec<u8>),
}

/// The fast lane of one listener.
#[derive(Clone)]
pub struct Lane {
    plane: Arc<Plane>,
}

/// Buffers of one request in hand, owned by its (boxed) future and given back to the thread's
/// spares ([`spare`]) when it ends. The client's own buffer lives with the connection.
struct Buffers {
    /// The head going upstream.
    request: Vec<u8>,
    /// From the backend.
    upstream: Vec<u8>,
    /// Going to the client: a response head and the start of its body.
    response: Vec<u8>,
    /// Body bytes of the current request's answer that reached the client.
    sent: u64,
}

impl Drop for Buffers {
    fn drop(&mut self) {
        spare::release(&mut self.request);
        spare::release(&mut self.upstream);
        spare::release(&mut self.response);
    }
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
    pub fn new(plane: Arc<Plane>) -> Self {
        Lane { plane }
    }

    /// Serve a client connection for as long as its requests are plain. `tls` is the
    /// connection's TLS facts when it came to the TLS listener.
    ///
    /// Written as an `async move` block rather than an `async fn`, whose state would hold
    /// each argument twice; this future is part of every idle connection's task.
    #[allow(clippy::manual_async_fn)] // see above: the state's size
    pub fn serve<'a, S>(
        &'a self,
        client: &'a mut S,
        ip: Option<IpAddr>,
        tls: Option<&'a TlsConn>,
    ) -> impl Future<Output = Served> + 'a
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        async move {
            let plane = &*self.plane;
            // From the client: the current head and whatever was pipelined after it. Given back
            // to the spares whenever it is empty, so an idle connection holds no buffer.
            let mut read = Vec::new();
            let mut first = true;
            // Whether the client may speak for others, once per connection.
            let trusted = plane.trusted.trusts(ip);
            loop {
                // The next head: parsed from what is buffered, else read for.
                let (plain, head) = loop {
                    // Empty lines before a request line are ignored (RFC 9112 §2.2); dropped here
                    // so a client that sends only those waits as an idle one.
                    let blank = read
                        .iter()
                        .take_while(|b| matches!(b, b'\r' | b'\n'))
                        .count();
                    if blank > 0 {
                        read.drain(..blank);
                    }
                    if !read.is_empty() {
                        // The client's address as `X-Forwarded-For` writes it.
                        let text = ip.map(ClientText::new);
                        let origin = Origin::new(text.as_ref(), trusted, tls.is_some());
                        // The head going upstream; kept only if the request is whole.
                        let mut head = spare::take(spare::Size::Head);
                        match plain_request(&read, &plane.limits, &origin, &plane.ids, &mut head) {
                            Ok(Some(plain)) => break (plain, head),
                            Ok(None) => spare::give(head),
                            Err(head::NotPlain) => {
                                spare::give(head);
                                return Served::HandOver(std::mem::take(&mut read));
                            }
                        }
                    }
                    let idle = read.is_empty() && !first;
                    if read.is_empty() {
                        spare::release(&mut read);
                    }
                    let more = async {
                        if read.capacity() == 0 {
                            spare::read_idle(client, &mut read).await
                        } else {
                            read_more(client, &mut read).await
                        }
                    };
                    let n = if idle {
                        // Between requests the keep-alive timeout applies; the head deadline and
                        // the drain are the stream's (`front::Guarded`).
                        match fast_timeout(plane.keepalive, more).await {
                            Ok(r) => r,
                            Err(_) => return Served::Done,
                        }
                    } else {
                        more.await
                    };
                    match n {
                        Ok(n) if n > 0 => {}
                        _ => return Served::Done,
                    }
                };
                first = false;
                let len = plain.len;
                // Routing, the exchange, the access log line and the request's buffers in one
                // boxed future: allocated for the request only, so an idle connection's task
                // holds little more than its read (`loadtest/idle.py`).
                match Box::pin(self.request(client, plain, ip, tls, &read, head)).await {
                    None => return Served::HandOver(std::mem::take(&mut read)),
                    Some(false) => {
                        let _ = client.shutdown().await;
                        return Served::Done;
                    }
                    Some(true) => {}
                }
                if read.len() == len {
                    read.clear();
                } else {
                    read.drain(..len);
                }
            }
        }
    }

    /// One plain request whose head is in `read`, with `request` the head to send upstream:
    /// routed and proxied, or `None` when it is the pipeline's to serve (nothing was sent
    /// then). `Some(keep)`: whether the client connection can take another request.
    async fn request<S>(
        &self,
        client: &mut S,
        plain: head::Plain,
        ip: Option<IpAddr>,
        tls: Option<&TlsConn>,
        read: &[u8],
        request: Vec<u8>,
    ) -> Option<bool>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut bufs = Buffers {
            request,
            upstream: Vec::new(),
            response: Vec::new(),
            sent: 0,
        };
        let bufs = &mut bufs;
        let plane = &*self.plane;
        let host = &read[plain.host.clone()];
        // A host the connection's certificate does not cover: the pipeline answers 421.
        if tls.is_some_and(|t| !t.covers(host)) {
            return None;
        }
        let snapshot = plane.store.current()?;
        let route = snapshot.router.route(host, &read[plain.path.clone()]);
        let s = route?;
        // ACME challenges are answered by the pipeline.
        if !snapshot.table.acme_challenges.is_empty()
            && read[plain.path.clone()].starts_with(ACME_CHALLENGE_PREFIX.as_bytes())
        {
            return None;
        }
        if !snapshot.services[s as usize].lane_serves(tls.is_some()) {
            return None;
        }
        let start = Instant::now();
        let mut routed = Routed::new(snapshot, s, start);
        bufs.upstream = spare::take(spare::Size::Upstream);
        bufs.response = spare::take(spare::Size::Head);
        let (status, keep) = self
            .proxy(client, &mut routed, &plain, tls.is_some(), bufs)
            .await;
        if let Some(log) = &plane.access_log {
            let svc = routed.service();
            log.log(&Entry {
                client: ip,
                method: if plain.head { b"HEAD" } else { b"GET" },
                host: &read[plain.host.clone()],
                target: &read[plain.target.clone()],
                version: "HTTP/1.1",
                status,
                bytes: bufs.sent,
                duration: start.elapsed(),
                backend: routed
                    .backend()
                    .map_or("", |i| &svc.backends[i as usize].id),
                request_id: plain.request_id(&bufs.request),
                service: &svc.name,
                attempts: routed.tried().len(),
                class: svc.class,
                user_agent: &read[plain.user_agent.clone()],
                referer: &read[plain.referer.clone()],
                https: tls.is_some(),
            });
        }
        routed.end(status);
        plane.connections.lane_request();
        Some(keep)
    }

    /// One request, through as many attempts as the attempt core allows. Returns the status
    /// the client got (499 if it left first) and whether the client connection stays open.
    async fn proxy<S>(
        &self,
        client: &mut S,
        routed: &mut Routed,
        plain: &head::Plain,
        https: bool,
        bufs: &mut Buffers,
    ) -> (u16, bool)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let plane = &*self.plane;
        let hsts = routed.service().hsts.clone().filter(|_| https);
        // After a stale pooled connection the next attempt dials anew.
        let mut fresh = false;
        while let Some(i) = routed.next(clock::now_ms()) {
            let backend = &routed.service().backends[i as usize];
            let failure =
                match exchange(client, backend, plain, plane, fresh, hsts.as_deref(), bufs).await {
                    Ok(Ok(done)) => return (done.status, done.keep),
                    Ok(Err(Cut(status))) => return (status, false),
                    Err(failure) => failure,
                };
            fresh = matches!(failure, Failure::Stale { .. });
            if !routed.fail(failure, clock::now_ms()) {
                break;
            }
        }
        // Every attempt failed: answered for the last one, and the connection closes, as the
        // pipeline does after a proxy error.
        let answer = routed.answer();
        bufs.response.clear();
        answer.render(true, &mut bufs.response);
        let sent = send(client, &bufs.response, plane.send_timeout)
            .await
            .is_ok();
        if sent {
            bufs.sent = answer.body_bytes().len() as u64;
        }
        (if sent { answer.status() } else { 499 }, false)
    }
}

/// Write all of `bytes` to the client and flush, unless it stops reading for `timeout`.
async fn send<S: AsyncWrite + Unpin>(
    client: &mut S,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let write = async {
        client.write_all(bytes).await?;
        client.flush().await
    };
    fast_timeout(timeout, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
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

async fn connect(backend: &Backend) -> Result<TcpStream, UpstreamError> {
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
    // The same keepalive and unacknowledged-data limit as the pipeline's connections.
    let sock = socket2::SockRef::from(&conn);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(snapshot::UPSTREAM_KEEPALIVE_IDLE)
        .with_interval(snapshot::UPSTREAM_KEEPALIVE_INTERVAL)
        .with_retries(snapshot::UPSTREAM_KEEPALIVE_PROBES);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(snapshot::UPSTREAM_USER_TIMEOUT));
    Ok(conn)
}

/// One attempt on one backend (on a new connection when `fresh`, else a pooled one if there
/// is): send the request, pass the response on. `Err` if it failed before the client got
/// anything of an answer (then the attempt core decides what follows: a plain request can be
/// replayed, and a pooled connection found closed is `Stale`); `Ok(Err)` if the client
/// connection must close after a response was begun or could not be delivered.
async fn exchange<S>(
    client: &mut S,
    backend: &Backend,
    plain: &head::Plain,
    plane: &Plane,
    fresh: bool,
    hsts: Option<&str>,
    bufs: &mut Buffers,
) -> Result<Result<Answered, Cut>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = backend.peer.options.read_timeout;
    let (mut up, reused) = send_head(backend, &bufs.request, fresh).await?;
    let stale = Failure::Stale { replayable: true };
    bufs.upstream.clear();
    let mut head = HeadRead {
        heard: false,
        relayed: 0,
        hsts,
    };
    let (response, close) =
        match read_response_head(&mut up, plain, plane, bufs, client, timeout, &mut head).await {
            Ok(r) => r,
            // Closed before a byte: the pool's staleness, not the backend's failure.
            Err(HeadError::Closed) if reused && !head.heard => return Err(stale),
            Err(HeadError::Failed(kind)) => return Err(failed(kind, &head)),
            Err(HeadError::Closed) => return Err(failed(UpstreamError::Closed, &head)),
            Err(HeadError::Client) => return Ok(Err(Cut(499))),
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
        return Err(failed(UpstreamError::Other, &head));
    };
    let head_len = bufs.response.len();
    if rest == Rest::UntilClose {
        chunk(&mut bufs.response, first_part);
    } else {
        bufs.response.extend_from_slice(first_part);
    }
    if send(client, &bufs.response, plane.send_timeout)
        .await
        .is_err()
    {
        // Nothing reached a client that is gone (nginx's 499), or that does not read.
        return Ok(Err(Cut(499)));
    }
    bufs.sent = (bufs.response.len() - head_len) as u64;

    // The rest of the body, read by read and passed on as it comes.
    while rest != Rest::Length(0) {
        bufs.upstream.clear();
        bufs.upstream.reserve(BODY_CHUNK);
        let part = match read_upstream(&mut up, &mut bufs.upstream, timeout).await {
            Ok(0) if rest == Rest::UntilClose => {
                if send(client, b"0\r\n\r\n", plane.send_timeout)
                    .await
                    .is_err()
                {
                    return Ok(Err(Cut(status)));
                }
                bufs.sent += 5;
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
        let n = part.len() as u64;
        if send(client, part, plane.send_timeout).await.is_err() {
            return Ok(Err(Cut(status)));
        }
        bufs.sent += n;
    }
    if reusable {
        pool::put(backend.addr, up);
    }
    Ok(Ok(Answered { status, keep }))
}

/// An upstream connection for one attempt with `head` sent on it: a pooled one unless `fresh`
/// (or none is idle), else a new one; and whether it was pooled, since a pooled connection
/// found closed before any byte of an answer is `Stale`, not the backend's failure.
async fn send_head(
    backend: &Backend,
    head: &[u8],
    fresh: bool,
) -> Result<(TcpStream, bool), Failure> {
    let pooled = if fresh {
        None
    } else {
        pool::take(backend.addr)
    };
    let reused = pooled.is_some();
    let mut up = match pooled {
        Some(conn) => conn,
        None => connect(backend).await.map_err(Failure::Connect)?,
    };
    if up.write_all(head).await.is_err() {
        return Err(if reused {
            Failure::Stale { replayable: true }
        } else {
            replayable(UpstreamError::Closed)
        });
    }
    Ok((up, reused))
}

/// A failure of a backend that took a plain request: a bodiless GET or HEAD, and nothing has
/// reached the client yet, so another backend may take it again.
fn replayable(kind: UpstreamError) -> Failure {
    Failure::Answer {
        kind,
        replayable: true,
    }
}

/// A failure of a backend that took the request, once its head was (partly) read: replayable
/// unless an interim response already reached the client, which another backend's answer
/// would then follow.
fn failed(kind: UpstreamError, got: &HeadRead<'_>) -> Failure {
    Failure::Answer {
        kind,
        replayable: got.relayed == 0,
    }
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

/// What reading a response head got to before it ended.
struct HeadRead<'a> {
    /// Some byte came from the backend.
    heard: bool,
    /// Interim (1xx) responses passed on to the client.
    relayed: u8,
    /// The `Strict-Transport-Security` the final head gets (HTTPS, and the service asks).
    hsts: Option<&'a str>,
}

/// Why no response head could be passed on.
enum HeadError {
    /// The backend closed, or reset, before a complete head.
    Closed,
    /// A timeout, or a head that cannot be passed on.
    Failed(UpstreamError),
    /// The client went away while an interim (1xx) response was passed on.
    Client,
}

/// Read the backend's final response head into `bufs.upstream` and write the client's into
/// `bufs.response`; also whether the client connection closes after it (the client asked, or
/// the process is draining by the time the answer comes). Interim (1xx) responses are passed
/// on as they come, at most `MAX_INTERIM_RESPONSES`; `got` says how far it came.
async fn read_response_head<S>(
    up: &mut TcpStream,
    plain: &head::Plain,
    plane: &Plane,
    bufs: &mut Buffers,
    client: &mut S,
    timeout: Option<Duration>,
    got: &mut HeadRead<'_>,
) -> Result<(Response, bool), HeadError>
where
    S: AsyncWrite + Unpin,
{
    loop {
        if !bufs.upstream.is_empty() {
            got.heard = true;
            let close = plain.close || plane.shutdown.draining();
            let hsts = got.hsts;
            match head::response_head(&bufs.upstream, plain.head, close, hsts, &mut bufs.response) {
                Ok(Some(r)) if r.status == 101 => {
                    // Never asked for: the request carried no Upgrade.
                    return Err(HeadError::Failed(UpstreamError::Other));
                }
                Ok(Some(r)) if r.status < 200 => {
                    if got.relayed == MAX_INTERIM_RESPONSES {
                        return Err(HeadError::Failed(UpstreamError::Other));
                    }
                    if send(client, &bufs.response, plane.send_timeout)
                        .await
                        .is_err()
                    {
                        return Err(HeadError::Client);
                    }
                    got.relayed += 1;
                    bufs.upstream.drain(..r.len);
                    continue;
                }
                Ok(Some(r)) => return Ok((r, close)),
                Ok(None) => {}
                Err(_) => return Err(HeadError::Failed(UpstreamError::Other)),
            }
        }
        match read_upstream(up, &mut bufs.upstream, timeout).await {
            Ok(0) | Err(UpstreamError::Closed) => return Err(HeadError::Closed),
            Ok(_) => {}
            Err(kind) => return Err(HeadError::Failed(kind)),
        }
    }
}
