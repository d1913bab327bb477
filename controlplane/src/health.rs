//! Health: the rise/fall rule (pure) and the probes that feed it (HTTP GET or TCP connect, over
//! TLS for services whose backends speak it).
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
    pub fn new(tls: &ProbeTls) -> Result<TlsProbe, String> {
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
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
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
async fn check<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    probe: &Probe,
    host: &str,
) -> Result<(), String> {
    let Probe::Http { path } = probe else {
        return Ok(());
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

#[cfg(test)]
mod tests {
    use super::*;

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
