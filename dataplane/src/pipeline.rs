//! The pipeline: every request the fast lane does not serve, through Pingora's `ProxyHttp`.
//!
//! Pingora calls these phases per request; each hands the decision to the shared pieces below
//! it, so the pipeline answers as the lane does: the request checks and the header editor
//! (`http1`), routing and the attempt core (`attempt`: which backend, what a failure means,
//! the final answer, the accounting), the overload queue for capped services (`queue`) and
//! the proxy's own answers (`answers`). What stays here is the mapping between Pingora's
//! phases and errors and those decisions. Called by Pingora, under the connection front.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};
use rusty_shared::RequestClass;

use crate::access_log::{AccessLog, Entry};
use crate::answers::{self, Answer};
use crate::attempt::{Failure, Routed};
use crate::certs::TlsConn;
use crate::clock;
use crate::connections;
use crate::hostnames::{https_location, ACME_CHALLENGE_PREFIX};
use crate::http1;
use crate::http1::editor::{self, ClientText, HeaderOut, Line, Origin};
use crate::http1::head;
use crate::http1::limits::MAX_INTERIM_RESPONSES;
use crate::http1::request;
use crate::metrics::UpstreamError;
use crate::plane::Plane;

pub struct Pipeline {
    plane: Arc<Plane>,
}

impl Pipeline {
    pub fn new(plane: Arc<Plane>) -> Self {
        Pipeline { plane }
    }
}

/// What one request carries between the phases.
#[derive(Default)]
pub struct Ctx {
    /// Set once the request is routed to a service.
    routed: Option<Routed>,
    /// The answer the request gets when it fails, decided where the failure was understood.
    answer: Option<Answer>,
    response_started: bool,
    /// Request body bytes seen so far, counted only when a body limit is set.
    body_bytes: u64,
    /// The request's priority class: its service's, or the one its class header names.
    class: RequestClass,
    /// The backend whose concurrency slot this request holds, if its address is capped.
    held: Option<u32>,
    /// The backend whose slot `request_filter` took, for the first attempt.
    assigned: Option<u32>,
    /// The request is a WebSocket upgrade: the one a `101` may answer.
    websocket: bool,
    /// The socket of the current attempt's upstream connection.
    upstream_fd: Option<std::os::fd::RawFd>,
    /// Interim (1xx) responses relayed so far.
    interim: u8,
    /// A final answer came before the request body was all in: the rest of the body is read
    /// and dropped, never forwarded, and the client connection closes after the answer.
    discard_body: bool,
    /// The request came over the TLS listener.
    https: bool,
    /// When `request_filter` began: the request's start for the attempt core and the log.
    start: Option<Instant>,
    /// The request id the editor made up (the client sent none), kept for the access log.
    request_id: Option<Vec<u8>>,
    /// A gRPC call over HTTP/2: our own answers to it are gRPC statuses.
    grpc: bool,
    /// The call's `grpc-status`, once the backend's trailers (or our answer) gave it.
    grpc_status: Option<u32>,
    /// When a gRPC call's `grpc-timeout` runs out.
    deadline: Option<Instant>,
    /// The client asked for trailers (`TE: trailers`), which HTTP/2 backends are told again.
    te_trailers: bool,
}

/// The headers the editor adds, collected to be inserted into Pingora's header map.
#[derive(Default)]
struct Added(Vec<(&'static str, Vec<u8>)>);

impl HeaderOut for Added {
    fn start(&mut self, name: &'static str) {
        self.0.push((name, Vec::new()));
    }
    fn value(&mut self, value: &[u8]) {
        if let Some((_, v)) = self.0.last_mut() {
            v.extend_from_slice(value);
        }
    }
    fn finish(&mut self) {}
}

/// The failure a Pingora error stands for, as the attempt core counts it.
fn connect_failure(e: &Error) -> Failure {
    Failure::Connect(match e.etype() {
        ErrorType::ConnectRefused => UpstreamError::ConnectRefused,
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => {
            UpstreamError::ConnectTimeout
        }
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
            UpstreamError::Tls
        }
        _ => UpstreamError::ConnectOther,
    })
}

fn upstream_error(e: &Error) -> UpstreamError {
    match e.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamError::ReadTimeout,
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
            UpstreamError::Closed
        }
        _ => UpstreamError::Other,
    }
}

#[async_trait]
impl ProxyHttp for Pipeline {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    /// No compression or other downstream modules: nothing to run per request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let plane = &*self.plane;
        let start = *ctx.start.insert(Instant::now());
        // The request line as sent was checked by the connection front before Pingora parsed
        // it; these are the checks on the parsed head, and the editor's on its headers.
        let trusted = plane.trusted.trusts(client_ip(session));
        let h2 = session.as_downstream().is_http2();
        let req = session.req_header();
        if h2 {
            let header = |n: http::header::HeaderName| req.headers.get(n).map(|v| v.as_bytes());
            ctx.grpc = header(http::header::CONTENT_TYPE).is_some_and(answers::is_grpc);
            ctx.te_trailers =
                header(http::header::TE).is_some_and(|v| v.eq_ignore_ascii_case(b"trailers"));
            if ctx.grpc {
                ctx.deadline = req
                    .headers
                    .get("grpc-timeout")
                    .and_then(|v| grpc_timeout(v.as_bytes()))
                    .map(|t| start + t);
            }
        }
        let checked = request::check(req, &plane.limits).and_then(|()| {
            let lines = req
                .headers
                .iter()
                .map(|(n, v)| Line::new(n.as_str().as_bytes(), v.as_bytes()));
            let edit = editor::read_request(lines, req.version == http::Version::HTTP_11, trusted)?;
            Ok(edit.websocket)
        });
        let checked = checked.and_then(|websocket| {
            normalize_path(session.req_header_mut())?;
            Ok(websocket)
        });
        match checked {
            Ok(websocket) => ctx.websocket = websocket,
            Err(why) => {
                // Framing or routing that could be read two ways: answer, close, forward
                // nothing.
                respond(session, Answer::Refused(why), true, ctx).await?;
                return Ok(true);
            }
        }
        // A client that stops reading holds its connection only this long.
        session.set_write_timeout(Some(plane.send_timeout));
        // Keep-alive, but not forever: 0 means "infinite" to Pingora, and a client's own
        // `Keep-Alive: timeout=` may only shorten ours.
        if let Some(current) = session.get_keepalive() {
            let ours = plane.keepalive.as_secs();
            let secs = match current {
                0 => ours,
                n => n.min(ours),
            };
            session.set_keepalive(Some(secs));
            // Requests a client pipelines are answered one by one, in order (RFC 9112 §9.3.2),
            // instead of Pingora's default of answering the first and closing.
            session.as_downstream_mut().set_pipelining_enabled(true);
        }
        let Some(snapshot) = plane.store.current() else {
            respond(session, Answer::NoTable, false, ctx).await?;
            return Ok(true);
        };
        let tls = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|d| TlsConn::of(d));
        ctx.https = tls.is_some();
        let req = session.req_header();
        let host = request_host(req);
        // The agent's open ACME challenges are answered here, for any host; a token the table
        // does not carry goes to the backends (which may run their own ACME client).
        let challenge = req
            .uri
            .path()
            .strip_prefix(ACME_CHALLENGE_PREFIX)
            .and_then(|token| snapshot.table.acme_challenges.get(token));
        if let Some(key_authorization) = challenge {
            let (head, body) = answers::acme_challenge(key_authorization);
            session.write_response_header(Box::new(head), false).await?;
            session.write_response_body(Some(body), true).await?;
            return Ok(true);
        }
        // No domain fronting: on TLS, a request may only name a host its connection's
        // certificate covers (RFC 9110 §15.5.20).
        if tls.is_some_and(|t| !host.is_empty() && !t.covers(host)) {
            respond(session, Answer::Misdirected, false, ctx).await?;
            return Ok(true);
        }
        let Some(service) = snapshot.router.route(host, req.uri.path().as_bytes()) else {
            respond(session, Answer::NoRoute, false, ctx).await?;
            return Ok(true);
        };
        let svc = &snapshot.services[service as usize];
        let path = req.uri.path();
        if svc.https_redirect && !ctx.https && !path.starts_with(ACME_CHALLENGE_PREFIX) {
            let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
            match https_location(host, plane.https_port, target) {
                Some(location) => {
                    let mut head = Answer::HttpsRedirect.response_header();
                    let _ = head.insert_header(http::header::LOCATION, location);
                    session.write_response_header(Box::new(head), false).await?;
                    session
                        .write_response_body(Some(Answer::HttpsRedirect.body_bytes()), true)
                        .await?;
                }
                None => {
                    let why = http1::Refused(400, "a redirect to HTTPS needs a valid Host");
                    respond(session, Answer::Refused(why), false, ctx).await?;
                }
            }
            return Ok(true);
        }
        // A class header only matters where admission does: services with capped backends.
        ctx.class = svc.class;
        if svc.limited {
            if let Some(class) = svc
                .class_header
                .as_ref()
                .and_then(|h| req.headers.get(h))
                .and_then(|v| RequestClass::from_bytes(v.as_bytes()))
            {
                ctx.class = class;
            }
        }
        let limited = svc.limited;
        let routed = ctx.routed.insert(Routed::new(snapshot, service, start));
        // Capped backends: take a slot (or wait for one) before going upstream, so a request
        // that is shed gets its 503 on a connection that stays open.
        if limited {
            if let Some(first) = routed.candidate(clock::now_ms()) {
                match self.take_slot(ctx, first).await {
                    Some(i) => ctx.assigned = Some(i),
                    None => {
                        let answer = Answer::Shed(ctx.class);
                        respond(session, answer, false, ctx).await?;
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let pick = match ctx.assigned.take() {
            // The first attempt goes where request_filter found a slot.
            Some(i) => Some(i),
            None => {
                // A previous attempt failed: its slot goes back before another is taken.
                self.release_slot(ctx);
                let routed = ctx.routed.as_mut().ok_or_else(not_routed)?;
                if routed.service().limited {
                    match routed.candidate(clock::now_ms()) {
                        Some(first) => match self.take_slot(ctx, first).await {
                            Some(i) => Some(i),
                            None => {
                                ctx.answer = Some(Answer::Shed(ctx.class));
                                return Error::e_explain(
                                    ErrorType::HTTPStatus(503),
                                    "request shed",
                                );
                            }
                        },
                        None => None,
                    }
                } else {
                    routed.next(clock::now_ms())
                }
            }
        };
        let routed = ctx.routed.as_ref().ok_or_else(not_routed)?;
        match pick {
            Some(i) => {
                let mut peer = Box::new(routed.service().backends[i as usize].peer.clone());
                // Beside what the table put there (the CA's pool, HTTP/2's).
                peer.group_key ^= thread_pool_key();
                if let Some(deadline) = ctx.deadline {
                    // A gRPC call's deadline bounds each attempt's connect and each read.
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        ctx.answer = Some(Answer::GatewayTimeout);
                        return Error::e_explain(ErrorType::HTTPStatus(504), "grpc-timeout passed");
                    }
                    let options = &mut peer.options;
                    for t in [
                        &mut options.connection_timeout,
                        &mut options.total_connection_timeout,
                        &mut options.read_timeout,
                    ] {
                        *t = Some(t.map_or(left, |t| t.min(left)));
                    }
                }
                Ok(peer)
            }
            // No attempt left: answered for the last failure (a 504 after a timeout, as nginx
            // does), or 503 when there was no backend at all.
            None => {
                let answer = routed.answer();
                ctx.answer = Some(answer);
                Error::e_explain(ErrorType::HTTPStatus(answer.status()), "no attempt left")
            }
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let routed = ctx.routed.as_ref().ok_or_else(not_routed)?;
        let ip = client_ip(session);
        let trusted = self.plane.trusted.trusts(ip);
        let text = ip.map(ClientText::new);
        let origin = Origin::new(text.as_ref(), trusted, ctx.https);
        // HTTP/1.0 clients may send no Host; the request goes upstream as HTTP/1.1, which
        // needs one. (An HTTP/2 request's `:authority` is its host.)
        let host = (!upstream.headers.contains_key(http::header::HOST)
            && upstream.uri.authority().is_none())
        .then(|| routed.backend())
        .flatten()
        .map(|i| routed.service().backends[i as usize].addr.to_string());
        let host = host.as_deref().map(str::as_bytes);
        // The downstream head passed `request_filter`'s editor check, so this reads the same.
        let (remove, added) = {
            let lines = upstream
                .headers
                .iter()
                .map(|(n, v)| Line::new(n.as_str().as_bytes(), v.as_bytes()));
            // The client's version: Pingora sends every request upstream as HTTP/1.1.
            let http11 = session.req_header().version == http::Version::HTTP_11;
            let mut edit = editor::read_request(lines, http11, trusted)
                .map_err(|why| Error::explain(ErrorType::InvalidHTTPHeader, why.1))?;
            let remove: Vec<http::HeaderName> = upstream
                .headers
                .keys()
                .filter(|n| !edit.forwards(&Line::new(n.as_str().as_bytes(), b"")))
                .cloned()
                .collect();
            // After a HEAD the backend's connection is not reused (Pingora honours the
            // request's own close).
            edit.closes_upstream = upstream.method == http::Method::HEAD;
            let mut added = Added::default();
            edit.add_headers(&origin, &self.plane.ids, host, &mut added);
            (remove, added)
        };
        for name in remove {
            upstream.remove_header(&name);
        }
        for (name, value) in added.0 {
            // The editor writes tokens, addresses and ids: always a valid value.
            upstream.insert_header(name, value.as_slice())?;
            if name == "x-request-id" && self.plane.access_log.is_some() {
                ctx.request_id = Some(value);
            }
        }
        // `TE` is hop-by-hop, but `trailers` is what a gRPC server needs to hear again on
        // the next hop, and the one value HTTP/2 allows.
        if ctx.te_trailers && routed.service().upstream_h2 {
            upstream.insert_header(http::header::TE, "trailers")?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if let Err(why) = self.check_response(session, upstream_response, ctx) {
            // The backend's fault: an upstream error, retried like any failed answer.
            return Err(Error::explain(ErrorType::InvalidHTTPHeader, why).into_up());
        }
        ctx.response_started = true;
        if ctx.grpc {
            // A trailers-only answer carries its status in the head.
            if let Some(code) = upstream_response.headers.get("grpc-status") {
                ctx.grpc_status = grpc_code(code.as_bytes());
            }
        }
        let names: Vec<http::HeaderName> = {
            let lines = upstream_response
                .headers
                .iter()
                .map(|(n, v)| Line::new(n.as_str().as_bytes(), v.as_bytes()));
            let edit = editor::read_response(status, lines);
            upstream_response
                .headers
                .keys()
                .filter(|n| !edit.forwards(&Line::new(n.as_str().as_bytes(), b"")))
                .cloned()
                .collect()
        };
        for name in names {
            upstream_response.remove_header(&name);
        }
        if status == 101 {
            // The rest of this connection is the upgraded protocol's.
            connections::switch_protocols();
        } else if status >= 200 && !session.is_body_done() {
            // Answered before the request body was all in (an `Expect: 100-continue` refused,
            // say): nothing the client sends after this may reach the backend as this
            // request's body, and the connection ends with the answer.
            ctx.discard_body = true;
            session.set_keepalive(None);
            // No more of the request reaches the backend (a chunked upload must not end as if
            // whole), and its connection is not reused; its answer is still read whole.
            shut_upstream(ctx, libc::SHUT_WR);
        }
        if self.plane.shutdown.draining() {
            // Shutting down: this response tells the client to take its next request elsewhere.
            session.set_keepalive(None);
        }
        if ctx.https {
            let hsts = ctx.routed.as_ref().and_then(|r| r.service().hsts.clone());
            if let Some(value) = hsts {
                let _ = upstream_response.insert_header("strict-transport-security", &*value);
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::fd::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // An HTTP/2 backend's connection carries other requests' streams: never ours to shut.
        let h2 = ctx.routed.as_ref().is_some_and(|r| r.service().upstream_h2);
        ctx.upstream_fd = (!h2).then_some(fd);
        Ok(())
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.grpc {
            if let Some(code) = trailers.get("grpc-status") {
                ctx.grpc_status = grpc_code(code.as_bytes());
            }
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.upstream_fd = None;
        if let Some(routed) = ctx.routed.as_mut() {
            e.set_retry(routed.fail(connect_failure(&e), clock::now_ms()));
        }
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        ctx.upstream_fd = None;
        // The client's side failed (it left, or its body broke a limit): no backend is to
        // blame, and nothing goes again.
        if e.esource() == &ErrorSource::Downstream || matches!(e.etype(), ErrorType::HTTPStatus(_))
        {
            e.set_retry(false);
            return e;
        }
        let replayable = session.req_header().method.is_idempotent()
            && !ctx.response_started
            && !session.as_ref().retry_buffer_truncated();
        // A pooled connection found closed before any answer: the lane's `Stale`, too.
        let stale = client_reused
            && !ctx.response_started
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        if let Some(routed) = ctx.routed.as_mut() {
            let failure = if stale {
                Failure::Stale { replayable }
            } else {
                Failure::Answer {
                    kind: upstream_error(&e),
                    replayable,
                }
            };
            e.set_retry(routed.fail(failure, clock::now_ms()));
        }
        e
    }

    /// A client that left or broke its side mid-request is the edge's weather, not the
    /// proxy's error: it is counted (499, 400) and in the access log, and Pingora's ERROR line
    /// for it is a debug one here, so clients cannot fill the log at will (nginx logs these at
    /// `info`). Failures of backends and of the proxy itself stay errors.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &Error) -> bool {
        let downstream = *error.esource() == ErrorSource::Downstream;
        if downstream {
            tracing::debug!(%error, "client side of a request failed");
        }
        downstream
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let answer = ctx.answer.take().or_else(|| {
            if let ErrorType::HTTPStatus(code) = e.etype() {
                return Some(match *code {
                    502..=504 => Answer::for_failure(*code),
                    413 => Answer::PayloadTooLarge,
                    400..=499 => Answer::Refused(request::Refused(*code, "bad request")),
                    _ => Answer::Internal,
                });
            }
            let upstream = matches!(
                e.etype(),
                ErrorType::ConnectRefused
                    | ErrorType::ConnectTimedout
                    | ErrorType::ConnectNoRoute
                    | ErrorType::ConnectError
            ) || e.esource() == &ErrorSource::Upstream;
            match e.esource() {
                _ if upstream => Some(
                    ctx.routed
                        .as_ref()
                        .map_or(Answer::BadGateway, Routed::answer),
                ),
                ErrorSource::Downstream => match e.etype() {
                    // The client is gone: nothing to answer.
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        None
                    }
                    _ => Some(Answer::Refused(request::Refused(400, "bad request"))),
                },
                _ => Some(Answer::Internal),
            }
        });
        if let Some(answer) = answer {
            // The connection may be unusable (a half-read body): the error path closes it.
            session.set_keepalive(None);
            if ctx.grpc {
                // Before the backend's answer began, the status is the whole answer; after,
                // it ends the call as trailers (the messages the client got stay valid).
                if session.response_written().is_none() {
                    let _ = write_grpc(session, answer, ctx);
                } else {
                    ctx.grpc_status = Some(answer.grpc_status());
                    let _ = session
                        .as_downstream_mut()
                        .write_response_trailers(answer.grpc_trailers())
                        .await;
                }
            } else {
                let _ = session
                    .write_error_response(answer.response_header(), answer.body_bytes())
                    .await;
            }
        }
        FailToProxy {
            error_code: answer.map_or(0, Answer::status),
            can_reuse_downstream: false,
        }
    }

    /// Counts a streamed body against `--max-body-bytes` (a `Content-Length` was checked in
    /// `request_filter`; this catches chunked bodies). Over the limit the request fails with 413
    /// if no response has begun; the backend sees an aborted upload, never a complete request.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (Some(max), Some(chunk)) = (self.plane.limits.max_body, body.as_ref()) {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > max {
                ctx.answer = Some(Answer::PayloadTooLarge);
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "request body larger than --max-body-bytes",
                );
            }
        }
        if ctx.discard_body {
            *body = None;
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        self.release_slot(ctx);
        let code = match session.response_written() {
            Some(r) => r.status.as_u16(),
            // Nothing was answered: the client went away (nginx's 499) or we failed.
            None if e.is_some_and(|e| e.esource() == &ErrorSource::Downstream) => 499,
            None => 502,
        };
        if code == 499 || e.is_some_and(|e| e.esource() == &ErrorSource::Downstream) {
            // An HTTP/2 stream its client left before the answer was through counts against
            // its connection's reset budget.
            connections::abandon_stream();
        }
        if let Some(log) = &self.plane.access_log {
            log_request(log, session, ctx, code);
        }
        if let (true, Some(routed)) = (ctx.grpc, ctx.routed.as_ref()) {
            // A call that ended with no status: the client cancelled it, or it broke.
            let status = ctx.grpc_status.unwrap_or(if code == 499 { 1 } else { 2 });
            routed.service().counters.count_grpc(status);
        }
        match ctx.routed.as_mut() {
            Some(routed) => routed.end(code),
            // Refused, before any table, or matching no service.
            None => self.plane.metrics.unrouted().count_response(code),
        }
    }
}

/// The host a request names: its `Host`, else the authority of an absolute-form target.
fn request_host(req: &RequestHeader) -> &[u8] {
    match req.headers.get(http::header::HOST) {
        Some(h) => h.as_bytes(),
        None => req
            .uri
            .authority()
            .map_or(&b""[..], |a| a.as_str().as_bytes()),
    }
}

/// The access log's line for a request the pipeline answered with `status`.
fn log_request(log: &AccessLog, session: &Session, ctx: &Ctx, status: u16) {
    let req = session.req_header();
    let header =
        |name: http::header::HeaderName| req.headers.get(name).map_or(&b""[..], |v| v.as_bytes());
    let host = request_host(req);
    let routed = ctx.routed.as_ref();
    let service = routed.map(Routed::service);
    let backend = routed
        .and_then(Routed::backend)
        .zip(service)
        .map_or("", |(i, svc)| &svc.backends[i as usize].id);
    let request_id = match &ctx.request_id {
        Some(id) => &id[..],
        None => header(http::header::HeaderName::from_static("x-request-id")),
    };
    log.log(&Entry {
        client: client_ip(session),
        method: req.method.as_str().as_bytes(),
        host,
        target: req
            .uri
            .path_and_query()
            .map_or(&b"/"[..], |p| p.as_str().as_bytes()),
        version: match req.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            _ => "HTTP/1.1",
        },
        status,
        bytes: session.body_bytes_sent() as u64,
        duration: ctx.start.map_or(Duration::ZERO, |s| s.elapsed()),
        backend,
        request_id,
        service: service.map_or("", |s| &s.name),
        attempts: routed.map_or(0, |r| r.tried().len()),
        class: ctx.class,
        user_agent: header(http::header::USER_AGENT),
        referer: header(http::header::REFERER),
        https: ctx.https,
    });
}

/// Our answer to a gRPC call, trailers-only: one HEADERS frame that ends the stream, which
/// only the HTTP/2 session itself can write (the proxy's session ends a stream with a body).
fn write_grpc(session: &mut Session, answer: Answer, ctx: &mut Ctx) -> Result<()> {
    ctx.grpc_status = Some(answer.grpc_status());
    let head = Box::new(answer.grpc_response_header());
    match session.as_downstream_mut() {
        ServerSession::H2(h2) => h2.write_response_header(head, true),
        // Calls are only marked gRPC on HTTP/2.
        _ => Error::e_explain(ErrorType::InternalError, "a gRPC answer on HTTP/1"),
    }
}

/// A `grpc-status` value: a decimal number.
fn grpc_code(value: &[u8]) -> Option<u32> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// A `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's path in its normal form (`http1::path`), which it is routed and forwarded
/// by. (An absolute-form target reaches the pipeline in origin form already: the connection
/// front rewrote it.)
fn normalize_path(req: &mut RequestHeader) -> std::result::Result<(), request::Refused> {
    let bad = request::Refused(400, "bad request target");
    let normal = http1::path::normalize(req.uri.path().as_bytes())?;
    if matches!(normal, std::borrow::Cow::Borrowed(_)) {
        return Ok(());
    }
    let mut target = normal.into_owned();
    if let Some(query) = req.uri.query() {
        target.push(b'?');
        target.extend_from_slice(query.as_bytes());
    }
    let uri = http::Uri::builder()
        .path_and_query(target)
        .build()
        .map_err(|_| bad)?;
    req.set_uri(uri);
    Ok(())
}

/// Shut down the current attempt's upstream connection (`how`: `SHUT_WR`, or `SHUT_RDWR`)
/// so it is never pooled.
fn shut_upstream(ctx: &mut Ctx, how: libc::c_int) {
    if let Some(fd) = ctx.upstream_fd.take() {
        // SAFETY: `fd` is the socket of this request's current upstream connection, saved in
        // `connected_to_upstream` and cleared when an attempt fails: it is open while the
        // response is being proxied (Pingora closes it only after these phases), and
        // `shutdown` neither closes nor frees it.
        unsafe {
            libc::shutdown(fd, how);
        }
    }
}

/// The client's address, as the socket tells it.
fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

fn not_routed() -> Box<Error> {
    Error::explain(ErrorType::InternalError, "no service routed")
}

impl Pipeline {
    /// The rules every response head must pass before anything of it reaches the client: a
    /// bounded number of interim responses, a `101` only to a WebSocket upgrade, framing that
    /// reads one way (`response_framing`, shared with the lane). A response that has no body
    /// by rule also ends its upstream connection's reuse.
    fn check_response(
        &self,
        session: &mut Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> std::result::Result<(), &'static str> {
        let status = resp.status.as_u16();
        if status == 101 && !ctx.websocket {
            return Err("a 101 to a request that asked for no upgrade");
        }
        if (100..200).contains(&status) && status != 101 {
            ctx.interim += 1;
            if ctx.interim > MAX_INTERIM_RESPONSES {
                return Err("too many interim responses");
            }
        }
        let version = u8::from(resp.version != http::Version::HTTP_10);
        let head = session.req_header().method == http::Method::HEAD;
        let lines = resp
            .headers
            .iter()
            .map(|(n, v)| Line::new(n.as_str().as_bytes(), v.as_bytes()));
        let framing = head::response_framing(version, status, head, lines)
            .map_err(|_| "response framing that reads more than one way")?;
        if status >= 200 && status != 101 && framing.body == head::Body::None && !framing.reusable {
            // Its next reuse check (Pingora reads a connection before reuse) sees it closed,
            // and whatever it still sends is never read as another request's answer.
            shut_upstream(ctx, libc::SHUT_RDWR);
        }
        Ok(())
    }

    /// Give back the slot a request holds, to the best waiter or the backend.
    fn release_slot(&self, ctx: &mut Ctx) {
        let Some(i) = ctx.held.take() else { return };
        if let Some(limiter) = ctx
            .routed
            .as_ref()
            .and_then(|r| r.service().backends[i as usize].limiter.as_ref())
        {
            self.plane.queue.release(limiter, clock::now_ms());
        }
    }

    /// A slot for the next attempt of a request to a service with capped backends, starting
    /// from `first` (the round robin's candidate): the backend it is on, which the attempt
    /// then goes to, or `None` when the request is shed (counted here).
    async fn take_slot(&self, ctx: &mut Ctx, first: u32) -> Option<u32> {
        let routed = ctx.routed.as_mut()?;
        let snap = routed.snapshot().clone();
        let service = routed.service_index();
        let granted = self
            .plane
            .queue
            .acquire(
                &snap,
                service,
                ctx.class,
                first,
                routed.tried(),
                clock::now_ms(),
            )
            .await;
        let svc = &snap.services[service as usize];
        match granted {
            Some(i) => {
                routed.begin(i);
                if svc.backends[i as usize].limiter.is_some() {
                    ctx.held = Some(i);
                }
                Some(i)
            }
            None => {
                svc.counters.count_shed(ctx.class);
                None
            }
        }
    }
}

/// A short answer of ours on a connection Pingora keeps unless `close` (or the answer) says so;
/// a gRPC call gets it as a gRPC status.
async fn respond(session: &mut Session, answer: Answer, close: bool, ctx: &mut Ctx) -> Result<()> {
    if close || answer.closes() {
        session.set_keepalive(None);
    }
    if ctx.grpc {
        return write_grpc(session, answer, ctx);
    }
    session
        .write_response_header(Box::new(answer.response_header()), false)
        .await?;
    session
        .write_response_body(Some(answer.body_bytes()), true)
        .await
}

/// This thread's part of Pingora's upstream connection pools (mixed into the peer's
/// `group_key`): an idle upstream connection is taken again only by a request on the thread
/// that gave it back, where its idle watcher runs too (the front's own threads). Taken across
/// threads, Pingora lost the race for it about once in a hundred reuses (`failed to acquire
/// reusable stream`, then a new connection); HTTP/2 upstream connections are driven on the
/// thread that uses them.
fn thread_pool_key() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    thread_local! {
        // Spread over all 64 bits (splitmix64's finalizer), so that no two threads' keys
        // mixed into the table's keys meet.
        static KEY: u64 = {
            let mut z = NEXT
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
    }
    KEY.with(|k| *k)
}
