//! The agent's listeners: the admin API (JSON over HTTP/1.1), `/metrics`, `/healthz`, a status
//! page at `/` (static: its script reads `/v1/status` with the token the operator gives it), and
//! the table stream (`GET /v1/tables`, a WebSocket), on `agent.listen` and, over TLS, on
//! `agent.tls_listen`. Certificate bundles go only to subscribers that reach the agent over TLS
//! or from loopback.
//!
//! The request head is read and checked here, with a size cap and a deadline, before anything
//! else happens: everything under `/v1/` needs the bearer token, and a request without it is
//! answered 401 without reading further. One request per connection: the API is for operators
//! and scripts, not for throughput.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use crate::api::{AcmeStatus, DeployAccepted, ErrorBody, ScaleRequest};
use crate::auth::Token;
use crate::certs::CertFeed;
use crate::core::{ApiError, Command};
use crate::metrics::Metrics;
use crate::publish::Feed;
use crate::reconcile::Refusal;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A subscriber that cannot take a table this long is dropped (it reconnects and gets the newest).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const PING_EVERY: Duration = Duration::from_secs(10);
/// Nothing at all from a subscriber (its pings included) for this long: it is gone.
const SILENT_LIMIT: Duration = Duration::from_secs(30);

pub struct Shared {
    pub token: Token,
    pub commands: mpsc::Sender<Command>,
    pub feed: Feed,
    pub certs: CertFeed,
    pub metrics: Arc<Metrics>,
    /// Where each ACME certificate stands, for status and metrics.
    pub acme: watch::Receiver<Vec<AcmeStatus>>,
    /// Asks the ACME task to order every name again now; `None` without `[tls.acme]`.
    pub acme_renew: Option<mpsc::Sender<()>>,
    pub shutdown: watch::Receiver<bool>,
}

/// A client connection of either listener: TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

/// How a connection reached the agent.
#[derive(Debug, Clone, Copy)]
struct Conn {
    peer: std::net::SocketAddr,
    tls: bool,
}

impl Conn {
    /// Whether keys may be sent on it: nobody else can read it.
    fn private(&self) -> bool {
        self.tls || self.peer.ip().is_loopback()
    }
}

/// Accept connections until shutdown; over TLS with `tls`.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Tables are small frames that must go out at once: without it, a table
                    // sent while the one before was unacknowledged waited for the data plane's
                    // delayed ACK (p99 12-38 ms from a decision to 1-32 data planes,
                    // loadtest/fanout.py).
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let conn = Conn { peer, tls: tls.is_some() };
                        let stream: Stream = match tls {
                            None => Box::new(stream),
                            Some(acceptor) => match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => Box::new(s),
                                Ok(Err(e)) => return debug!(%peer, "TLS handshake: {e}"),
                                Err(_) => return debug!(%peer, "TLS handshake timed out"),
                            },
                        };
                        if let Err(e) = connection(stream, conn, &shared).await {
                            debug!(%peer, "connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    /// Bytes read past the head (the start of the body).
    rest: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn header_has(&self, name: &str, token: &str) -> bool {
        self.header(name).is_some_and(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    }
}

enum Head {
    Ok(Request),
    Bad(&'static str),
    TooLarge,
    Closed,
}

async fn read_head(stream: &mut Stream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let request = Request {
                    method: req.method.unwrap_or("").to_owned(),
                    path: req.path.unwrap_or("").to_owned(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), h.value.to_vec()))
                        .collect(),
                    rest: buf[len..].to_vec(),
                };
                return Ok(Head::Ok(request));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Ok(Head::TooLarge),
            Err(httparse::Error::TooManyHeaders) => return Ok(Head::TooLarge),
            Err(_) => return Ok(Head::Bad("malformed request")),
        }
    }
}

async fn respond(
    stream: &mut Stream,
    status: u16,
    content_type: &str,
    extra: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn json<T: serde::Serialize>(
    stream: &mut Stream,
    status: u16,
    value: &T,
) -> std::io::Result<()> {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into()) + "\n";
    respond(stream, status, "application/json", "", &body).await
}

async fn error(
    stream: &mut Stream,
    status: u16,
    message: impl Into<String>,
) -> std::io::Result<()> {
    json(
        stream,
        status,
        &ErrorBody {
            error: message.into(),
        },
    )
    .await
}

async fn connection(mut stream: Stream, conn: Conn, shared: &Shared) -> std::io::Result<()> {
    let req = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => return Ok(()),
        Ok(r) => match r? {
            Head::Ok(r) => r,
            Head::Closed => return Ok(()),
            Head::Bad(why) => return error(&mut stream, 400, why).await,
            Head::TooLarge => return error(&mut stream, 431, "request head over 16 KiB").await,
        },
    };
    let path = req.path.split('?').next().unwrap_or("").to_owned();
    match (req.method.as_str(), path.as_str()) {
        ("GET", "/healthz") => return respond(&mut stream, 200, "text/plain", "", "ok\n").await,
        // No data in it: what it shows comes from `/v1/status`, behind the token.
        ("GET", "/") => {
            return respond(
                &mut stream,
                200,
                "text/html; charset=utf-8",
                "Cache-Control: no-store\r\nContent-Security-Policy: default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'\r\n",
                include_str!("page.html"),
            )
            .await
        }
        ("GET", "/metrics") => {
            let Some(status) = status(shared).await else {
                return error(&mut stream, 503, "agent is shutting down").await;
            };
            let text = shared.metrics.render(&status);
            return respond(&mut stream, 200, "text/plain; version=0.0.4", "", &text).await;
        }
        _ => {}
    }
    if !path.starts_with("/v1/") {
        return error(&mut stream, 404, format!("no such endpoint: {path}")).await;
    }
    if !shared.token.admits(req.header("authorization")) {
        if path == "/v1/tables" {
            shared.metrics.subscribers_refused.inc();
        }
        warn!(path, "refused: missing or wrong bearer token");
        return respond(
            &mut stream,
            401,
            "application/json",
            "WWW-Authenticate: Bearer\r\n",
            "{\"error\": \"missing or wrong bearer token\"}\n",
        )
        .await;
    }
    let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["tables"]) => subscribe(stream, req, conn, shared).await,
        ("GET", ["status"]) => match status(shared).await {
            Some(status) => json(&mut stream, 200, &status).await,
            None => error(&mut stream, 503, "agent is shutting down").await,
        },
        ("POST", ["services", service, "scale"]) => {
            let body: ScaleRequest = match read_json(&mut stream, &req).await? {
                Ok(b) => b,
                Err((code, e)) => return error(&mut stream, code, e).await,
            };
            let service = service.to_string();
            let replicas = body.replicas;
            match ask(shared, |reply| Command::Scale {
                service,
                replicas,
                reply,
            })
            .await
            {
                Some(Ok(())) => json(&mut stream, 202, &body).await,
                Some(Err(e)) => api_error(&mut stream, e).await,
                None => error(&mut stream, 503, "agent is shutting down").await,
            }
        }
        ("POST", ["services", service, "deploy"]) => {
            let request = match read_json(&mut stream, &req).await? {
                Ok(b) => b,
                Err((code, e)) => return error(&mut stream, code, e).await,
            };
            let service = service.to_string();
            match ask(shared, |reply| Command::Deploy {
                service,
                request,
                reply,
            })
            .await
            {
                Some(Ok(generation)) => {
                    json(&mut stream, 202, &DeployAccepted { generation }).await
                }
                Some(Err(e)) => api_error(&mut stream, e).await,
                None => error(&mut stream, 503, "agent is shutting down").await,
            }
        }
        ("POST", ["services", service, "instances", id, "drain"]) => {
            let seq = id
                .strip_prefix(*service)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|n| n.parse::<u64>().ok());
            let Some(seq) = seq else {
                return error(
                    &mut stream,
                    404,
                    format!("no instance {id} in service {service}"),
                )
                .await;
            };
            let service = service.to_string();
            match ask(shared, |reply| Command::Drain {
                service,
                seq,
                reply,
            })
            .await
            {
                Some(Ok(())) => {
                    json(&mut stream, 202, &serde_json::json!({ "draining": id })).await
                }
                Some(Err(e)) => api_error(&mut stream, e).await,
                None => error(&mut stream, 503, "agent is shutting down").await,
            }
        }
        ("POST", ["acme", "renew"]) => match &shared.acme_renew {
            // A renewal already asked for and not yet begun covers this one too.
            Some(renew) => {
                let _ = renew.try_send(());
                let hosts: Vec<String> = shared
                    .acme
                    .borrow()
                    .iter()
                    .map(|c| c.host.clone())
                    .collect();
                json(&mut stream, 202, &serde_json::json!({ "renewing": hosts })).await
            }
            None => error(&mut stream, 404, "ACME is not configured ([tls.acme])").await,
        },
        (_, ["tables"] | ["status"]) => error(&mut stream, 405, "use GET").await,
        (_, ["acme", "renew"]) => error(&mut stream, 405, "use POST").await,
        (_, ["services", _, "scale" | "deploy"] | ["services", _, "instances", _, "drain"]) => {
            error(&mut stream, 405, "use POST").await
        }
        _ => error(&mut stream, 404, format!("no such endpoint: {path}")).await,
    }
}

async fn api_error(stream: &mut Stream, e: ApiError) -> std::io::Result<()> {
    let code = match &e {
        ApiError::NoService(_) | ApiError::Refused(Refusal::NoInstance(_)) => 404,
        ApiError::Invalid(_) | ApiError::Refused(Refusal::TooMany(_)) => 400,
        ApiError::Refused(_) => 409,
    };
    error(stream, code, e.to_string()).await
}

/// Send a command to the core and wait for its answer; `None` if the core is gone.
/// The core's status with the ACME task's.
async fn status(shared: &Shared) -> Option<crate::api::Status> {
    let mut status = ask(shared, Command::Status).await?;
    status.acme = shared.acme.borrow().clone();
    Some(status)
}

async fn ask<T>(shared: &Shared, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    shared.commands.send(make(tx)).await.ok()?;
    rx.await.ok()
}

async fn read_json<T: DeserializeOwned>(
    stream: &mut Stream,
    req: &Request,
) -> std::io::Result<Result<T, (u16, String)>> {
    if req.header("transfer-encoding").is_some() {
        return Ok(Err((411, "send the body with Content-Length".into())));
    }
    let len = match req.header("content-length").map(|v| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
    }) {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => return Ok(Err((400, "bad Content-Length".into()))),
    };
    if len > MAX_BODY {
        return Ok(Err((413, format!("body over {MAX_BODY} bytes"))));
    }
    let mut body = req.rest.clone();
    body.truncate(len);
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = tokio::time::timeout(HEAD_TIMEOUT, stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "body"))??;
        if n == 0 {
            return Ok(Err((400, "body ended early".into())));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(serde_json::from_slice(&body).map_err(|e| (400, format!("bad JSON body: {e}"))))
}

/// The table stream: the full current table at once, then every newer one. Reads only control
/// frames; a data frame from the subscriber ends the session (the channel is one-way).
async fn subscribe(
    mut stream: Stream,
    req: Request,
    conn: Conn,
    shared: &Shared,
) -> std::io::Result<()> {
    let key = match req.header("sec-websocket-key") {
        Some(k)
            if req.header_has("upgrade", "websocket")
                && req.header_has("connection", "upgrade") =>
        {
            k.to_vec()
        }
        _ => {
            return respond(
                &mut stream,
                426,
                "application/json",
                "Upgrade: websocket\r\n",
                "{\"error\": \"this endpoint is a WebSocket\"}\n",
            )
            .await;
        }
    };
    if req.header("sec-websocket-version") != Some(b"13") {
        return respond(
            &mut stream,
            426,
            "application/json",
            "Sec-WebSocket-Version: 13\r\n",
            "{\"error\": \"WebSocket version 13 only\"}\n",
        )
        .await;
    }
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(&key)
    );
    stream.write_all(head.as_bytes()).await?;
    let peer = conn.peer.to_string();
    // Keys cross only a channel no one else can read: TLS, or loopback.
    let wants_certs = req
        .path
        .split_once('?')
        .is_some_and(|(_, q)| q.split('&').any(|kv| kv == "certs=1"));
    let certs = match (wants_certs, conn.private()) {
        (true, true) => Some(shared.certs.clone()),
        (true, false) => {
            shared.metrics.cert_bundles_withheld.inc();
            warn!(%peer, "a data plane asked for certificates over plain ws:// from off loopback: not sent (keys never cross a network in clear); subscribe over wss:// to agent.tls_listen");
            None
        }
        (false, _) => None,
    };
    let config = WebSocketConfig {
        max_message_size: Some(64 * 1024),
        max_frame_size: Some(64 * 1024),
        ..WebSocketConfig::default()
    };
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
    shared.metrics.subscribers.inc();
    info!(%peer, "data plane subscribed");
    let end = session(&mut ws, shared, certs).await;
    shared.metrics.subscribers.dec();
    info!(%peer, "data plane left: {end}");
    Ok(())
}

/// Sends tables, and bundles when `certs` is given (the subscriber asked and may have them).
async fn session(
    ws: &mut WebSocketStream<Stream>,
    shared: &Shared,
    mut certs: Option<CertFeed>,
) -> String {
    let mut feed = shared.feed.clone();
    let mut pending_certs = certs.as_mut().and_then(|c| c.borrow_and_update().clone());
    let mut shutdown = shared.shutdown.clone();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset();
    let mut last_heard = tokio::time::Instant::now();
    // The current table goes out at once; `changed` then wakes us for newer ones only.
    let mut pending = feed.borrow_and_update().clone();
    loop {
        if let Some(p) = pending.take() {
            match tokio::time::timeout(SEND_TIMEOUT, ws.send(Message::Text(p.json.clone()))).await {
                Ok(Ok(())) => {
                    shared.metrics.table_frames_sent.inc();
                    debug!(version = p.version, "table sent");
                }
                Ok(Err(e)) => return format!("send failed: {e}"),
                Err(_) => return "too slow to take a table".into(),
            }
        }
        if let Some(b) = pending_certs.take() {
            match tokio::time::timeout(SEND_TIMEOUT, ws.send(Message::Binary(b.bytes.clone())))
                .await
            {
                Ok(Ok(())) => {
                    shared.metrics.cert_bundles_sent.inc();
                    info!(version = b.version, names = ?b.names, "certificates sent");
                }
                Ok(Err(e)) => return format!("send failed: {e}"),
                Err(_) => return "too slow to take certificates".into(),
            }
        }
        let mut certs_closed = false;
        tokio::select! {
            update = next_bundle(certs.as_mut()) => match update {
                Some(bundle) => pending_certs = bundle,
                // The publisher is gone: no more bundles; tables go on.
                None => certs_closed = true,
            },
            changed = feed.changed() => {
                if changed.is_err() {
                    let _ = ws.close(None).await;
                    return "agent stopping".into();
                }
                pending = feed.borrow_and_update().clone();
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => last_heard = tokio::time::Instant::now(),
                Some(Ok(Message::Close(_))) | None => return "closed".into(),
                Some(Ok(_)) => {
                    let _ = ws.close(Some(CloseFrame { code: CloseCode::Policy, reason: "the table stream is one-way".into() })).await;
                    return "sent a data frame".into();
                }
                Some(Err(e)) => return format!("read failed: {e}"),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > SILENT_LIMIT {
                    return "silent too long".into();
                }
                if tokio::time::timeout(SEND_TIMEOUT, ws.send(Message::Ping(Vec::new()))).await.map_or(true, |r| r.is_err()) {
                    return "ping failed".into();
                }
            }
            _ = shutdown.changed() => {
                let _ = ws.close(Some(CloseFrame { code: CloseCode::Away, reason: "agent stopping".into() })).await;
                return "agent stopping".into();
            }
        }
        if certs_closed {
            certs = None;
        }
    }
}

/// The next bundle of `certs` once it changes; `None` when its publisher is gone. Never
/// completes without a feed.
async fn next_bundle(
    certs: Option<&mut CertFeed>,
) -> Option<Option<std::sync::Arc<crate::certs::Bundle>>> {
    match certs {
        Some(c) => match c.changed().await {
            Ok(()) => Some(c.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_only_where_nobody_else_can_read_them() {
        let conn = |peer: &str, tls| Conn {
            peer: peer.parse().unwrap(),
            tls,
        };
        assert!(conn("127.0.0.1:5000", false).private());
        assert!(conn("127.3.4.5:5000", false).private());
        assert!(conn("[::1]:5000", false).private());
        assert!(!conn("10.0.0.7:5000", false).private());
        assert!(!conn("[2001:db8::1]:5000", false).private());
        assert!(conn("10.0.0.7:5000", true).private());
    }
}
