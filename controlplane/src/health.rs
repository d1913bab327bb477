//! Health: the rise/fall rule (pure) and the probes that feed it (HTTP GET, TCP connect, or
//! the gRPC health service over HTTP/2, over TLS for services whose backends speak it).
//!
//! An instance enters the table after `rise` passing checks in a row and leaves it after `fall`
//! failing checks in a row, as in HAProxy. A process that exits is taken down at once, without
//! waiting for `fall` failures: the runtime saw it die, there is nothing to confirm.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::spec::{Probe, ProbeTls};

/// Rise/fall counting for one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    up: bool,
    ever_up: bool,
    passes: u32,
    fails: u32,
}

impl Tracker {
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Has this instance ever passed `rise` checks? (A deploy waits for exactly this.)
    pub fn ever_up(&self) -> bool {
        self.ever_up
    }

    /// Count one check; true when the instance changed between up and down.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        if ok {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            if !self.up && self.passes >= rise {
                self.up = true;
                self.ever_up = true;
                return true;
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            if self.up && self.fails >= fall {
                self.up = false;
                return true;
            }
        }
        false
    }

    /// Up without checks: an instance adopted from an earlier agent was serving; it stays in
    /// the table unless `fall` checks fail.
    pub fn assume_up(&mut self) {
        self.up = true;
        self.ever_up = true;
        self.passes = 0;
        self.fails = 0;
    }

    /// Down now (the process exited); it must rise again. True if it was up.
    pub fn force_down(&mut self) -> bool {
        let was = self.up;
        self.up = false;
        self.passes = 0;
        self.fails = 0;
        was
    }
}

/// Largest response head a health check reads.
const MAX_HEAD: usize = 8 * 1024;

/// The TLS client of one service's checks, made once per instance's probe task.
pub struct TlsProbe {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl TlsProbe {
    /// `h2`: offer only HTTP/2 in ALPN (the gRPC check).
    pub fn new(tls: &ProbeTls, h2: bool) -> Result<TlsProbe, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca_pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| format!("CA: {e}"))?;
                    roots.add(cert).map_err(|e| format!("CA: {e}"))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        if h2 {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        let server_name = match &tls.server_name {
            Some(n) => Some(
                ServerName::try_from(n.clone()).map_err(|e| format!("server_name {n:?}: {e}"))?,
            ),
            None => None,
        };
        Ok(TlsProbe {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

/// One check against `addr`. `Err` carries why it failed, for the log.
pub async fn probe(
    addr: SocketAddr,
    probe: &Probe,
    tls: Option<&TlsProbe>,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(addr, probe, tls)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}ms", timeout.as_millis())),
    }
}

async fn probe_inner(
    addr: SocketAddr,
    probe: &Probe,
    tls: Option<&TlsProbe>,
) -> Result<(), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let Some(tls) = tls else {
        return check(tcp, probe, &addr.to_string()).await;
    };
    let name = tls
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
    let host = match &name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        _ => addr.to_string(),
    };
    let stream = tls
        .connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    check(stream, probe, &host).await
}

/// The check proper, on a connected stream: nothing more for TCP, a GET for HTTP.
async fn check<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut stream: S,
    probe: &Probe,
    host: &str,
) -> Result<(), String> {
    let path = match probe {
        Probe::Http { path } => path,
        Probe::Tcp => return Ok(()),
        Probe::Grpc { service } => return grpc_check(stream, host, service).await,
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: rusty-agent-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 1024];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) | Ok(httparse::Status::Partial)
                if resp.code.is_some() =>
            {
                let code = resp.code.unwrap_or(0);
                return if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("status {code}"))
                };
            }
            Ok(_) if buf.len() < MAX_HEAD => continue,
            Ok(_) => return Err("response head too large".into()),
            Err(e) => return Err(format!("bad response: {e}")),
        }
    }
}

/// Largest gRPC health answer read (a `HealthCheckResponse` is 2 bytes).
const MAX_GRPC_ANSWER: usize = 1024;

/// `grpc.health.v1.Health/Check` for `service` on an HTTP/2 connection: passes when the call
/// ends with `grpc-status` 0 and the answer says `SERVING`.
async fn grpc_check<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    host: &str,
    service: &str,
) -> Result<(), String> {
    let (mut client, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    // The connection is driven while the call runs and dropped with it.
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let _stop = AbortOnDrop(driver);
    let request = http::Request::post(format!("http://{host}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "rusty-agent-health")
        .body(())
        .map_err(|e| format!("request: {e}"))?;
    let (answer, mut send) = client
        .send_request(request, false)
        .map_err(|e| format!("HTTP/2: {e}"))?;
    send.send_data(health_request(service).into(), true)
        .map_err(|e| format!("HTTP/2: {e}"))?;
    let answer = answer.await.map_err(|e| format!("HTTP/2: {e}"))?;
    if answer.status() != http::StatusCode::OK {
        return Err(format!("status {}", answer.status().as_u16()));
    }
    // A trailers-only answer carries the status in its head.
    if let Some(status) = answer.headers().get("grpc-status") {
        return Err(format!(
            "grpc-status {}",
            String::from_utf8_lossy(status.as_bytes())
        ));
    }
    let mut body = answer.into_body();
    let mut message = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("HTTP/2: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
        if message.len() > MAX_GRPC_ANSWER {
            return Err("health answer too large".into());
        }
    }
    let trailers = body.trailers().await.map_err(|e| format!("HTTP/2: {e}"))?;
    let status = trailers.as_ref().and_then(|t| t.get("grpc-status"));
    match status.map(|s| s.as_bytes()) {
        Some(b"0") => {}
        Some(other) => return Err(format!("grpc-status {}", String::from_utf8_lossy(other))),
        None => return Err("no grpc-status".into()),
    }
    match serving_status(&message) {
        Some(1) => Ok(()),
        Some(n) => Err(format!("health status {n} (not SERVING)")),
        None => Err("unreadable health answer".into()),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One gRPC message (uncompressed) holding `HealthCheckRequest { service }`.
fn health_request(service: &str) -> Vec<u8> {
    // Field 1, length-delimited; names are at most 200 bytes (checked in the config), so the
    // length is one varint byte when under 128 and two otherwise.
    let mut message = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        message.push(0x0a);
        let n = service.len();
        if n < 0x80 {
            message.push(n as u8);
        } else {
            message.extend_from_slice(&[(n as u8 & 0x7f) | 0x80, (n >> 7) as u8]);
        }
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

/// The `status` (field 1, a varint) of the one `HealthCheckResponse` message in `framed`;
/// absent is 0 (UNKNOWN), as protobuf's default.
fn serving_status(framed: &[u8]) -> Option<u64> {
    let (&[0], rest) = (framed.get(..1)?, framed.get(1..)?) else {
        return None; // compressed, or nothing
    };
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let mut message = rest.get(4..4 + len)?;
    let mut status = 0;
    while let Some((&tag, rest)) = message.split_first() {
        let (value, rest) = varint(rest)?;
        match tag {
            0x08 => status = value,
            // Any other varint field is skipped; anything else is not a HealthCheckResponse.
            t if t & 0x07 == 0 => {}
            _ => return None,
        }
        message = rest;
    }
    Some(status)
}

fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_messages_are_framed_and_read_as_the_protocol_says() {
        assert_eq!(health_request(""), [0, 0, 0, 0, 0]);
        assert_eq!(
            health_request("web"),
            [0, 0, 0, 0, 5, 0x0a, 3, b'w', b'e', b'b']
        );
        let long = "s".repeat(200);
        assert_eq!(&health_request(&long)[5..8], &[0x0a, 0xc8, 0x01]);
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 0]),
            Some(0),
            "absent is UNKNOWN"
        );
        assert_eq!(
            serving_status(&[1, 0, 0, 0, 2, 0x08, 1]),
            None,
            "compressed"
        );
        assert_eq!(serving_status(&[0, 0, 0, 0, 9, 0x08, 1]), None, "truncated");
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 2, 0x0a, 1]),
            None,
            "not a status"
        );
    }

    #[test]
    fn rises_after_rise_passes_in_a_row_and_falls_after_fall_failures() {
        let mut t = Tracker::default();
        assert!(!t.record(true, 3, 2));
        assert!(!t.record(false, 3, 2), "a failure resets the rise count");
        assert!(!t.record(true, 3, 2));
        assert!(!t.record(true, 3, 2));
        assert!(t.record(true, 3, 2), "third pass in a row");
        assert!(t.is_up() && t.ever_up());
        assert!(!t.record(false, 3, 2));
        assert!(!t.record(true, 3, 2), "a pass resets the fall count");
        assert!(!t.record(false, 3, 2));
        assert!(t.record(false, 3, 2));
        assert!(!t.is_up() && t.ever_up());
    }

    #[test]
    fn forced_down_must_rise_again() {
        let mut t = Tracker::default();
        t.record(true, 1, 1);
        assert!(t.force_down());
        assert!(!t.is_up());
        assert!(!t.force_down());
        assert!(t.record(true, 1, 1));
    }

    #[tokio::test]
    async fn probes_fail_on_refused_connections_and_bad_statuses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable", "302 Found"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                let resp = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let http = Probe::Http {
            path: "/healthz".into(),
        };
        let t = Duration::from_secs(2);
        assert_eq!(probe(addr, &http, None, t).await, Ok(()));
        assert_eq!(probe(addr, &http, None, t).await, Err("status 503".into()));
        assert_eq!(probe(addr, &http, None, t).await, Ok(()), "3xx passes");
        server.await.unwrap();
        let e = probe(addr, &Probe::Tcp, None, t).await.unwrap_err();
        assert!(e.starts_with("connect"), "{e}");
    }
}
