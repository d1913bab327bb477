//! The fast lane for HTTP/2 streams: a bodiless `GET` or `HEAD` stream to a service the HTTP/1
//! lane would serve goes upstream as an HTTP/1.1 request on this thread's pool, and its answer,
//! read by the same head reader, goes back as HTTP/2 fields and DATA frames. Every other stream
//! is handed back untouched, before anything went upstream, for the pipeline. Same router,
//! request checks, editor, attempt core, answers and accounting as the other paths. Called by
//! the front's HTTP/2 loop only.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;
use pingora::protocols::http::v2::server::HttpSession as Stream;

use super::{pool, read_upstream, replayable, send_head, Lane, Rest};
use crate::access_log::Entry;
use crate::answers::Answer;
use crate::attempt::{Failure, Routed};
use crate::certs::TlsConn;
use crate::clock;
use crate::connections;
use crate::hostnames::ACME_CHALLENGE_PREFIX;
use crate::http1::editor::{self, ClientText, HeaderOut, Line, Origin};
use crate::http1::head::{self, H2Head};
use crate::http1::limits::MAX_INTERIM_RESPONSES;
use crate::http1::scan::Bad;
use crate::http1::{path, request};
use crate::metrics::UpstreamError;
use crate::snapshot::Backend;

/// What the lane needs of a stream it serves, decided before anything goes upstream.
struct Plan {
    routed: Routed,
    /// The HTTP/1.1 head that goes upstream.
    upstream_head: Vec<u8>,
    head_request: bool,
    /// The request id the backend gets (the client's, or the one the editor made up), when
    /// there is an access log to write it to.
    request_id: Vec<u8>,
}

/// The upstream head as the editor writes it, keeping the request id it adds.
struct UpstreamHead<'a> {
    out: &'a mut Vec<u8>,
    request_id: Option<Vec<u8>>,
    in_id: bool,
    /// Keep the id (only the access log reads it).
    keep_id: bool,
}

impl HeaderOut for UpstreamHead<'_> {
    fn start(&mut self, name: &'static str) {
        self.in_id = self.keep_id && name == "x-request-id";
        self.out.start(name);
    }
    fn value(&mut self, value: &[u8]) {
        if self.in_id {
            self.request_id = Some(value.to_vec());
        }
        self.out.value(value);
    }
    fn finish(&mut self) {
        self.in_id = false;
        self.out.finish();
    }
}

/// How a stream's exchange with one backend ended once the stream had its answer's head.
struct Delivered {
    status: u16,
    /// Body bytes the stream took.
    sent: u64,
}

/// An exchange that could not give the stream its whole answer: the status it had (499 when it
/// got nothing), and whether the client left (else the backend broke off).
struct Cut {
    status: u16,
    client_left: bool,
}

impl Cut {
    fn client(status: u16) -> Cut {
        Cut {
            status,
            client_left: true,
        }
    }
    /// The backend broke off a body: the stream is reset (`INTERNAL_ERROR`, as the pipeline
    /// does), so the client cannot take what it got for the whole answer.
    fn backend(stream: &mut Stream, status: u16) -> Cut {
        stream.shutdown();
        Cut {
            status,
            client_left: false,
        }
    }
}

impl Lane {
    /// Serve an HTTP/2 stream if it is plain; otherwise give it back as it came, for the
    /// pipeline. `peer` (the client's address) and `tls` are its connection's.
    pub async fn serve_h2(
        &self,
        mut stream: Stream,
        peer: Option<IpAddr>,
        tls: Option<&TlsConn>,
    ) -> Option<Stream> {
        let start = Instant::now();
        let Some(plan) = self.plan(&stream, peer, tls, start) else {
            return Some(stream);
        };
        let plane = &*self.plane;
        let Plan {
            mut routed,
            upstream_head,
            head_request,
            request_id,
        } = plan;
        stream.set_write_timeout(Some(plane.send_timeout));
        let hsts = routed.service().hsts.clone().filter(|_| tls.is_some());
        let mut buf = Vec::with_capacity(super::READ_CHUNK);
        let mut fresh = false;
        let mut client_left = false;
        let (status, sent) = loop {
            let Some(i) = routed.next(clock::now_ms()) else {
                break answer(&mut stream, routed.answer()).await;
            };
            let backend = &routed.service().backends[i as usize];
            let attempt = exchange(
                &mut stream,
                backend,
                &upstream_head,
                head_request,
                hsts.as_deref(),
                fresh,
                &mut buf,
            )
            .await;
            let failure = match attempt {
                Ok(Ok(done)) => break (done.status, done.sent),
                Ok(Err(cut)) => {
                    client_left = cut.client_left;
                    break (cut.status, 0);
                }
                Err(failure) => failure,
            };
            fresh = matches!(failure, Failure::Stale { .. });
            if !routed.fail(failure, clock::now_ms()) {
                break answer(&mut stream, routed.answer()).await;
            }
        };
        if status == 499 || client_left {
            // Counts against its connection's budget of abandoned streams.
            connections::abandon_stream();
        }
        if let Some(log) = &plane.access_log {
            let req = stream.req_header();
            let header = |name: http::header::HeaderName| {
                req.headers.get(name).map_or(&b""[..], |v| v.as_bytes())
            };
            let svc = routed.service();
            log.log(&Entry {
                client: peer,
                method: req.method.as_str().as_bytes(),
                host: req
                    .uri
                    .authority()
                    .map_or(&b""[..], |a| a.as_str().as_bytes()),
                target: req
                    .uri
                    .path_and_query()
                    .map_or(&b"/"[..], |p| p.as_str().as_bytes()),
                version: "HTTP/2.0",
                status,
                bytes: sent,
                duration: start.elapsed(),
                backend: routed
                    .backend()
                    .map_or("", |i| &svc.backends[i as usize].id),
                request_id: &request_id,
                service: &svc.name,
                attempts: routed.tried().len(),
                class: svc.class,
                user_agent: header(http::header::USER_AGENT),
                referer: header(http::header::REFERER),
                https: tls.is_some(),
            });
        }
        routed.end(status);
        plane.connections.lane_request();
        None
    }

    /// The lane's plan for a stream, or `None` when the pipeline is to serve it: the same
    /// conditions as the HTTP/1 lane's, on the fields HTTP/2 gives.
    fn plan(
        &self,
        stream: &Stream,
        peer: Option<IpAddr>,
        tls: Option<&TlsConn>,
        start: Instant,
    ) -> Option<Plan> {
        let plane = &*self.plane;
        let req = stream.req_header();
        let head_request = match req.method {
            http::Method::GET => false,
            http::Method::HEAD => true,
            _ => return None,
        };
        // A body, a `Host` besides `:authority`, or cookies in several fields (which HTTP/1
        // wants as one): the pipeline's to sort out.
        if !stream.is_body_empty()
            || req.headers.contains_key(http::header::HOST)
            || req
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .nth(1)
                .is_some()
        {
            return None;
        }
        let authority = req.uri.authority()?.as_str().as_bytes();
        request::check(req, &plane.limits).ok()?;
        let path_bytes = req.uri.path().as_bytes();
        if !matches!(path::normalize(path_bytes), Ok(Cow::Borrowed(_))) {
            return None;
        }
        if tls.is_some_and(|t| !t.covers(authority)) {
            return None;
        }
        let snapshot = plane.store.current()?;
        if !snapshot.table.acme_challenges.is_empty()
            && path_bytes.starts_with(ACME_CHALLENGE_PREFIX.as_bytes())
        {
            return None;
        }
        let s = snapshot.router.route(authority, path_bytes)?;
        if !snapshot.services[s as usize].lane_serves(tls.is_some()) {
            return None;
        }
        let trusted = plane.trusted.trusts(peer);
        let lines = req
            .headers
            .iter()
            .map(|(n, v)| Line::new(n.as_str().as_bytes(), v.as_bytes()));
        let edit = editor::read_request(lines, true, trusted).ok()?;
        if edit.websocket {
            return None;
        }
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut upstream_head = Vec::with_capacity(256 + target.len());
        upstream_head.extend_from_slice(req.method.as_str().as_bytes());
        upstream_head.push(b' ');
        upstream_head.extend_from_slice(target.as_bytes());
        upstream_head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in req.headers.iter() {
            let line = Line::new(name.as_str().as_bytes(), value.as_bytes());
            if edit.forwards(&line) {
                for part in [line.name, b": ", line.value, b"\r\n"] {
                    upstream_head.extend_from_slice(part);
                }
            }
        }
        let text = peer.map(ClientText::new);
        let origin = Origin::new(text.as_ref(), trusted, tls.is_some());
        let logged = plane.access_log.is_some();
        let mut out = UpstreamHead {
            out: &mut upstream_head,
            request_id: None,
            in_id: false,
            keep_id: logged,
        };
        edit.add_headers(&origin, &plane.ids, Some(authority), &mut out);
        // For the access log only: the id the backend got, the client's or the editor's.
        let request_id = match out.request_id.take() {
            Some(id) => id,
            None if logged => req
                .headers
                .get("x-request-id")
                .map_or_else(Vec::new, |v| v.as_bytes().to_vec()),
            None => Vec::new(),
        };
        upstream_head.extend_from_slice(b"\r\n");
        Some(Plan {
            routed: Routed::new(snapshot, s, start),
            upstream_head,
            head_request,
            request_id,
        })
    }
}

/// Our own answer on the stream; the status the client got (499 if it is gone).
async fn answer(stream: &mut Stream, answer: Answer) -> (u16, u64) {
    let body = answer.body_bytes();
    let len = body.len() as u64;
    if stream
        .write_response_header(Box::new(answer.response_header()), false)
        .is_err()
        || stream.write_body(body, true).await.is_err()
    {
        return (499, 0);
    }
    (answer.status(), len)
}

/// One attempt on one backend (a new connection when `fresh`, else a pooled one if there is):
/// send the head, pass the answer on. `Err` when it failed before the stream got anything
/// (the attempt core decides what follows: a bodiless GET or HEAD can be replayed, and a
/// pooled connection found closed is `Stale`); `Ok(Err(status))` when the stream could not be
/// given its whole answer.
async fn exchange(
    stream: &mut Stream,
    backend: &Backend,
    upstream_head: &[u8],
    head_request: bool,
    hsts: Option<&str>,
    fresh: bool,
    buf: &mut Vec<u8>,
) -> Result<Result<Delivered, Cut>, Failure> {
    let timeout = backend.peer.options.read_timeout;
    let (mut up, reused) = send_head(backend, upstream_head, fresh).await?;
    let stale = Failure::Stale { replayable: true };
    buf.clear();
    let mut heard = false;
    let mut interim = 0u8;
    let mut out = H2Head::default();
    // The final head; interim ones are not passed on (HTTP/2 answers carry none here, as in
    // the pipeline).
    let response = loop {
        if !buf.is_empty() {
            heard = true;
            match head::response_head(buf, head_request, false, hsts, &mut out) {
                Ok(Some(r)) if r.status == 101 => return Err(replayable(UpstreamError::Other)),
                Ok(Some(r)) if r.status < 200 => {
                    interim += 1;
                    if interim > MAX_INTERIM_RESPONSES {
                        return Err(replayable(UpstreamError::Other));
                    }
                    buf.drain(..r.len);
                    continue;
                }
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(_) => return Err(replayable(UpstreamError::Other)),
            }
        }
        // A client that resets its stream while the backend thinks is gone at once: the
        // backend's connection closes with it, as the pipeline's does.
        let read = tokio::select! {
            biased;
            read = read_upstream(&mut up, buf, timeout) => read,
            _ = stream.idle() => return Ok(Err(Cut::client(499))),
        };
        match read {
            Ok(0) | Err(UpstreamError::Closed) if reused && !heard => return Err(stale),
            Ok(0) | Err(UpstreamError::Closed) => return Err(replayable(UpstreamError::Closed)),
            Ok(_) => {}
            Err(kind) => return Err(replayable(kind)),
        }
    };
    let Some(fields) = out.0.take() else {
        return Err(replayable(UpstreamError::Other));
    };
    let status = response.status;
    let mut reusable = response.reusable;
    let mut rest = match response.body {
        head::Body::None => Rest::Length(0),
        head::Body::Length(n) => Rest::Length(n),
        head::Body::Chunked => Rest::Chunked(Default::default()),
        head::Body::UntilClose => Rest::UntilClose,
    };
    let mut ended = rest == Rest::Length(0);
    if stream
        .write_response_header(Box::new(fields), ended)
        .is_err()
    {
        return Ok(Err(Cut::client(499)));
    }
    let mut sent = 0u64;
    let mut data = Vec::new();
    let mut read = response.len..buf.len();
    while !ended {
        if body_of(&mut rest, &buf[read.clone()], &mut reusable, &mut data).is_err() {
            return Ok(Err(Cut::backend(stream, status)));
        }
        let done = rest == Rest::Length(0);
        if !data.is_empty() || done {
            let n = data.len() as u64;
            let chunk = Bytes::from(std::mem::take(&mut data));
            if stream.write_body(chunk, done).await.is_err() {
                return Ok(Err(Cut::client(status)));
            }
            sent += n;
            ended = done;
        }
        if ended {
            break;
        }
        buf.clear();
        buf.reserve(super::BODY_CHUNK);
        match read_upstream(&mut up, buf, timeout).await {
            Ok(0) if rest == Rest::UntilClose => {
                if stream.write_body(Bytes::new(), true).await.is_err() {
                    return Ok(Err(Cut::client(status)));
                }
                ended = true;
            }
            Ok(0) | Err(_) => return Ok(Err(Cut::backend(stream, status))),
            Ok(n) => read = 0..n,
        }
    }
    if reusable {
        pool::put(backend.addr, up);
    }
    Ok(Ok(Delivered { status, sent }))
}

/// The body bytes in `read` (without chunked framing), appended to `out`; advances `rest`.
fn body_of(
    rest: &mut Rest,
    read: &[u8],
    reusable: &mut bool,
    out: &mut Vec<u8>,
) -> Result<(), Bad> {
    match rest {
        Rest::Chunked(scan) => {
            if let Some(end) = scan.scan_data(read, |d| out.extend_from_slice(d))? {
                *rest = Rest::Length(0);
                *reusable &= end == read.len();
            }
        }
        _ => out.extend_from_slice(rest.take(read, reusable)?),
    }
    Ok(())
}
