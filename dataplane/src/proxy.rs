//! The request path: our [`ProxyHttp`] implementation on top of Pingora.
//!
//! Per request this does, in order: one snapshot load and route lookup (`request_filter`), one
//! pick per attempt (`upstream_peer`), the forwarding headers (`upstream_request_filter`) and the
//! metrics (`logging`). Everything it needs was resolved when the table was installed: routes,
//! schedules, a ready-made peer per backend and the metric handles. Failed connects eject the
//! backend locally and retry on another; other upstream failures retry only idempotent requests
//! that have not received a response byte, so a POST that may have reached a backend is never
//! sent twice.

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorSource, ErrorType};
use rusty_shared::RequestClass;

use crate::admission::{Admission, Admit};
use crate::check::{self, Limits, Refused};
use crate::metrics::UpstreamError;
use crate::snapshot::{ServiceState, Snapshot};
use crate::store::TableStore;

/// Attempts per request: the first plus at most `RETRIES_MAX` retries.
pub(crate) const MAX_TRIES: usize = rusty_shared::limits::RETRIES_MAX as usize + 1;

pub struct Proxy {
    store: Arc<TableStore>,
    /// Requests in flight in this process, for graceful shutdown.
    active: Arc<AtomicI64>,
    request_ids: Arc<RequestIds>,
    limits: Limits,
    /// Seconds an idle keep-alive client connection is kept (Pingora's default is forever).
    keepalive_secs: u64,
}

impl Proxy {
    pub fn new(
        store: Arc<TableStore>,
        active: Arc<AtomicI64>,
        request_ids: Arc<RequestIds>,
        limits: Limits,
        keepalive_secs: u64,
    ) -> Self {
        Proxy {
            store,
            active,
            request_ids,
            limits,
            keepalive_secs: keepalive_secs.max(1),
        }
    }
}

/// What one request carries between the phases.
pub struct Ctx {
    snapshot: Option<Arc<Snapshot>>,
    service: u32,
    routed: bool,
    backend: Option<u32>,
    tried: [u32; MAX_TRIES],
    tries: usize,
    start: Option<Instant>,
    response_started: bool,
    /// Request body bytes seen so far, counted only when a body limit is set.
    body_bytes: u64,
    /// Status the last failed attempt stands for (502, 503 or 504); 0 before any failure.
    last_failure: u16,
    /// The request's priority class: its service's, or the one its class header names.
    class: RequestClass,
    /// The backend whose concurrency slot this request holds, if its address is capped.
    held: Option<u32>,
    /// Shed under overload: answered 503 with `Retry-After`.
    shed: bool,
    /// The backend whose slot request_filter took, for the first attempt.
    assigned: Option<u32>,
}

impl Ctx {
    fn service(&self) -> Option<&ServiceState> {
        let snap = self.snapshot.as_ref()?;
        self.routed.then(|| &snap.services[self.service as usize])
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            snapshot: None,
            service: 0,
            routed: false,
            backend: None,
            tried: [0; MAX_TRIES],
            tries: 0,
            start: None,
            response_started: false,
            body_bytes: 0,
            last_failure: 0,
            class: RequestClass::Normal,
            held: None,
            shed: false,
            assigned: None,
        }
    }

    /// No compression or other downstream modules: nothing to run per request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // The request line as sent was checked by the connection front before Pingora parsed it.
        if let Err(Refused(status, why)) = check::check(session.req_header(), &self.limits) {
            // Framing or routing that could be read two ways: answer, close, forward nothing.
            session.set_keepalive(None);
            let body = Bytes::from(format!("{why}\n"));
            respond(session, status, body, Some((CONNECTION, "close"))).await?;
            return Ok(true);
        }
        // Keep-alive, but not forever: 0 means "infinite" to Pingora, and a client's own
        // `Keep-Alive: timeout=` may only shorten ours.
        if let Some(current) = session.get_keepalive() {
            let secs = match current {
                0 => self.keepalive_secs,
                n => n.min(self.keepalive_secs),
            };
            session.set_keepalive(Some(secs));
            // Requests a client pipelines are answered one by one, in order (RFC 9112 §9.3.2),
            // instead of Pingora's default of answering the first and closing.
            session.as_downstream_mut().set_pipelining_enabled(true);
        }
        let Some(snapshot) = self.store.current() else {
            let body = Bytes::from_static(b"no routing table installed yet\n");
            respond(session, 503, body, None).await?;
            return Ok(true);
        };
        let req = session.req_header();
        let host = match req.headers.get(HOST) {
            Some(h) => h.as_bytes(),
            None => req
                .uri
                .authority()
                .map_or(&b""[..], |a| a.as_str().as_bytes()),
        };
        let route = snapshot.router.route(host, req.uri.path().as_bytes());
        // The class only matters where admission does: services with capped backends.
        if let Some(svc) = route
            .map(|s| &snapshot.services[s as usize])
            .filter(|s| s.limited)
        {
            ctx.class = svc
                .class_header
                .as_ref()
                .and_then(|h| req.headers.get(h))
                .and_then(|v| RequestClass::from_bytes(v.as_bytes()))
                .unwrap_or(svc.class);
        }
        ctx.snapshot = Some(snapshot);
        match route {
            None => {
                respond(
                    session,
                    404,
                    Bytes::from_static(b"no route matched\n"),
                    None,
                )
                .await?;
                Ok(true)
            }
            Some(service) => {
                ctx.service = service;
                ctx.routed = true;
                ctx.start = Some(Instant::now());
                if let Some(s) = ctx.service() {
                    s.counters.inflight_add(1);
                }
                self.active.fetch_add(1, Relaxed);
                // Capped backends: take a slot (or wait for one) before going upstream, so a
                // request that is shed gets its 503 on a connection that stays open.
                let first = ctx
                    .service()
                    .filter(|s| s.limited)
                    .and_then(|s| s.pick(&[]));
                if let Some(first) = first {
                    match self.take_slot(ctx, first).await {
                        Ok(i) => ctx.assigned = Some(i),
                        Err(_) => {
                            respond_shed(session, ctx.class).await?;
                            return Ok(true);
                        }
                    }
                }
                Ok(false)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let pick = match ctx.assigned.take() {
            // The first attempt goes where request_filter found a slot.
            Some(i) => Some(i),
            None => {
                // A previous attempt failed: its slot goes back before another is taken.
                self.release_slot(ctx);
                let svc = ctx
                    .service()
                    .ok_or_else(|| Error::explain(ErrorType::InternalError, "no service routed"))?;
                // Out of attempts: answer without advancing any round-robin counter.
                let budget_left = ctx.tries <= svc.retries as usize && ctx.tries < MAX_TRIES;
                let pick = if budget_left {
                    svc.pick(&ctx.tried[..ctx.tries])
                } else {
                    None
                };
                match (pick, svc.limited) {
                    (Some(first), true) => Some(self.take_slot(ctx, first).await?),
                    _ => pick,
                }
            }
        };
        let svc = ctx
            .service()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no service routed"))?;
        match pick {
            Some(i) => {
                let peer = Box::new(svc.backends[i as usize].peer.clone());
                ctx.tried[ctx.tries] = i;
                ctx.tries += 1;
                ctx.backend = Some(i);
                Ok(peer)
            }
            // A retry that finds no other backend answers for the attempt that failed (a 504
            // for a timeout, as nginx does), not as if there had never been a backend.
            None if ctx.last_failure != 0 => Err(Error::explain(
                ErrorType::HTTPStatus(ctx.last_failure),
                "no other backend to retry on",
            )),
            None => Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "no backend available",
            )),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // HTTP/1.0 clients may send no Host; the request goes upstream as HTTP/1.1, which needs
        // one: the backend's address, as nginx's default `proxy_set_header Host $proxy_host`.
        if !upstream.headers.contains_key(HOST) {
            if let (Some(svc), Some(i)) = (ctx.service(), ctx.backend) {
                let addr = svc.backends[i as usize].peer.address().to_string();
                upstream.insert_header(HOST, addr)?;
            }
        }
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        add_forwarding_headers(upstream, client, &self.request_ids)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.response_started = true;
        if self.store.registry.front.draining() {
            // Shutting down: this response tells the client to take its next request elsewhere.
            session.set_keepalive(None);
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
        ctx.last_failure = 503;
        if let (Some(svc), Some(i)) = (ctx.service(), ctx.backend) {
            let kind = match e.etype() {
                ErrorType::ConnectRefused => UpstreamError::ConnectRefused,
                ErrorType::ConnectTimedout => UpstreamError::ConnectTimeout,
                _ => UpstreamError::ConnectOther,
            };
            svc.backends[i as usize].counters.count_error(kind);
            svc.eject(i);
            // Nothing was sent: any method may go to another backend.
            e.set_retry(ctx.tries <= svc.retries as usize);
        }
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        ctx.last_failure = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => 504,
            _ => 502,
        };
        if let (Some(svc), Some(i)) = (ctx.service(), ctx.backend) {
            let kind = match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamError::ReadTimeout,
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
                    UpstreamError::Closed
                }
                _ => UpstreamError::Other,
            };
            svc.backends[i as usize].counters.count_error(kind);
            let safe = session.req_header().method.is_idempotent()
                && !ctx.response_started
                && !session.as_ref().retry_buffer_truncated();
            e.set_retry(safe && ctx.tries <= svc.retries as usize);
        }
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            // Every attempt failed to connect: no backend could take the request (Envoy and
            // HAProxy answer 503 here too).
            ErrorType::ConnectRefused
            | ErrorType::ConnectTimedout
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError => 503,
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code == 503 && ctx.shed {
            // A retry found every other backend full. Pingora closes the connection after a
            // proxy error, so the response says so.
            session.set_keepalive(None);
            let _ = respond_shed(session, ctx.class).await;
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        if code > 0 {
            // The connection may be unusable (a half-read body); the error path closes it.
            let _ = session
                .respond_error_with_body(code, Bytes::from_static(error_body(code)))
                .await;
        }
        FailToProxy {
            error_code: code,
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
        if let (Some(max), Some(chunk)) = (self.limits.max_body, body.as_ref()) {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > max {
                return Error::e_explain(
                    ErrorType::HTTPStatus(413),
                    "request body larger than --max-body-bytes",
                );
            }
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
        let Some(snap) = ctx.snapshot.as_ref() else {
            self.store.registry.unrouted().count_response(code);
            return;
        };
        let Some(svc) = ctx.service() else {
            snap.unrouted.count_response(code);
            return;
        };
        match ctx.backend {
            Some(i) => svc.backends[i as usize].counters.count_response(code),
            None => svc.no_backend.count_response(code),
        }
        if let Some(start) = ctx.start {
            svc.counters.observe(start.elapsed().as_nanos() as u64);
        }
        svc.counters.inflight_add(-1);
        self.active.fetch_sub(1, Relaxed);
    }
}

impl Proxy {
    /// Give back the slot a request holds, to the best waiter or the backend.
    fn release_slot(&self, ctx: &mut Ctx) {
        let Some(i) = ctx.held.take() else { return };
        if let Some(limiter) = ctx
            .service()
            .and_then(|svc| svc.backends[i as usize].limiter.as_ref())
        {
            self.store.registry.admission.release(limiter);
        }
    }

    /// A slot for this attempt of a request to a service with capped backends: on `first` (the
    /// round robin's pick) if it has one free, else on any other backend not yet tried, else
    /// wait in the queue by class. Fails with 503 when the request is shed.
    async fn take_slot(&self, ctx: &mut Ctx, first: u32) -> Result<u32> {
        let Some(snap) = ctx.snapshot.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no snapshot");
        };
        let svc = &snap.services[ctx.service as usize];
        let tried = &ctx.tried[..ctx.tries];
        let free = |i: u32| {
            svc.backends[i as usize]
                .limiter
                .as_ref()
                .is_none_or(|l| l.try_acquire())
        };
        let others = svc
            .tiers
            .iter()
            .flat_map(|t| t.members.iter().copied())
            .filter(|&i| i != first && !tried.contains(&i) && !svc.ejected_now(i));
        let admission = &self.store.registry.admission;
        // While requests wait, a newcomer queues behind them (and is served at once if a slot
        // is free that none of them can use).
        let found = if admission.queued() == 0 {
            std::iter::once(first).chain(others).find(|&i| free(i))
        } else {
            None
        };
        let granted = match found {
            Some(i) => Some(i),
            None => match admission.enqueue(&snap, ctx.service, ctx.class) {
                Admit::Now(i) => Some(i),
                Admit::Shed => None,
                Admit::Wait(rx, seq) => {
                    let mut wait = Waiting {
                        admission,
                        snap: &snap,
                        service: ctx.service,
                        seq,
                        rx: Some(rx),
                    };
                    wait.granted(svc.queue_timeout).await
                }
            },
        };
        match granted {
            Some(i) => {
                if svc.backends[i as usize].limiter.is_some() {
                    ctx.held = Some(i);
                }
                Ok(i)
            }
            None => {
                svc.counters.count_shed(ctx.class);
                ctx.shed = true;
                Error::e_explain(ErrorType::HTTPStatus(503), "overloaded: request shed")
            }
        }
    }
}

/// A request in the overload queue. If it is dropped while waiting (the client went away), it
/// leaves the queue, and a slot handed to it in the meantime goes back.
struct Waiting<'a> {
    admission: &'a Admission,
    snap: &'a Arc<Snapshot>,
    service: u32,
    seq: u64,
    rx: Option<tokio::sync::oneshot::Receiver<u32>>,
}

impl Waiting<'_> {
    /// The backend whose slot was handed over, or `None` if shed or timed out.
    async fn granted(&mut self, timeout: std::time::Duration) -> Option<u32> {
        let rx = self.rx.as_mut()?;
        let got = match tokio::time::timeout(timeout, &mut *rx).await {
            Ok(Ok(i)) => Some(i),
            // The sender was dropped: shed to make room for a higher class.
            Ok(Err(_)) => None,
            // Timed out, unless a slot arrived just now (then it is already ours).
            Err(_) if self.admission.cancel(self.seq) => None,
            Err(_) => rx.try_recv().ok(),
        };
        self.rx = None;
        got
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        if !self.admission.cancel(self.seq) {
            if let Ok(i) = rx.try_recv() {
                let svc = &self.snap.services[self.service as usize];
                if let Some(limiter) = &svc.backends[i as usize].limiter {
                    self.admission.release(limiter);
                }
            }
        }
    }
}

/// A short response written by the proxy itself, keeping the connection alive.
/// 503 for a request shed under overload, with `Retry-After`; the connection stays open.
async fn respond_shed(session: &mut Session, class: RequestClass) -> Result<()> {
    let body = Bytes::from(format!(
        "service unavailable: overloaded, {} request shed; retry shortly\n",
        class.as_str()
    ));
    respond(session, 503, body, Some((RETRY_AFTER, "1"))).await
}

/// A short plain-text response written by the proxy itself, with at most one extra header.
async fn respond(
    session: &mut Session,
    code: u16,
    body: Bytes,
    extra: Option<(http::HeaderName, &'static str)>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(code, Some(4))?;
    resp.insert_header(CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(CONTENT_LENGTH, body.len())?;
    if let Some((name, value)) = extra {
        resp.insert_header(name, value)?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// The body of the proxy's answer when no backend answered a request (here and in `lane`).
pub(crate) fn error_body(code: u16) -> &'static [u8] {
    match code {
        502 => b"bad gateway: the backend failed to answer\n",
        503 => b"service unavailable: no backend available\n",
        504 => b"gateway timeout: the backend did not answer in time\n",
        413 => b"payload too large: the request body is over the limit\n",
        _ => b"",
    }
}

/// `X-Forwarded-For`, `X-Forwarded-Proto`, and an `X-Request-Id` when the client sent none.
pub fn add_forwarding_headers(
    upstream: &mut RequestHeader,
    client: Option<IpAddr>,
    ids: &RequestIds,
) -> Result<()> {
    if let Some(ip) = client {
        let xff = forwarded_for(upstream.headers.get("x-forwarded-for"), ip);
        upstream.insert_header("x-forwarded-for", xff)?;
    }
    upstream.insert_header("x-forwarded-proto", "http")?;
    if !upstream.headers.contains_key("x-request-id") {
        upstream.insert_header("x-request-id", ids.next())?;
    }
    Ok(())
}

/// `X-Forwarded-For`: the client's chain so far, then the client (nginx's
/// `$proxy_add_x_forwarded_for`).
fn forwarded_for(existing: Option<&http::HeaderValue>, client: IpAddr) -> String {
    match existing
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    {
        Some(chain) => format!("{chain}, {client}"),
        None => client.to_string(),
    }
}

/// Request ids unique per process run: a random-ish prefix fixed at start and a counter.
pub struct RequestIds {
    prefix: u32,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        RequestIds {
            prefix: nanos ^ std::process::id().rotate_left(16),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        let mut id = Vec::with_capacity(25);
        self.write_next(&mut id);
        id.into_iter().map(char::from).collect()
    }

    /// The next id, written where it is needed instead of allocated.
    pub fn write_next(&self, out: &mut Vec<u8>) {
        let n = self.counter.fetch_add(1, Relaxed);
        crate::lane::head::write_request_id(out, self.prefix, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_appends_the_client_to_an_existing_chain() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(forwarded_for(None, ip), "10.0.0.7");
        let chain = http::HeaderValue::from_static("1.2.3.4");
        assert_eq!(forwarded_for(Some(&chain), ip), "1.2.3.4, 10.0.0.7");
    }

    #[test]
    fn request_ids_are_unique() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 8 + 1 + 16);
    }
}
