//! The TLS handshake of a connection to the TLS listener, run by the front after the
//! connection cap and before any HTTP is read.
//!
//! The ClientHello is read first, parsed by rustls and kept: its SNI picks the certificate
//! (from one [`Generation`], so the check and the handshake agree), and an SNI no certificate
//! covers is answered with the `unrecognized_name` alert at once, which rustls' own resolver
//! cannot send. The bytes are then replayed into Pingora's rustls handshake, which leaves a
//! stream the lane and the pipeline read like any other, carrying a [`TlsConn`] in its digest.
//! Plain HTTP sent to this port gets a 400 that says so. The caller bounds all of it in time.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::tls::Acceptor;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::answers::Answer;
use crate::certs::{Certs, TlsConn};
use crate::connections::Event;

use super::replay::Replay;

/// Largest ClientHello read before the handshake (a post-quantum key share makes one about
/// 2 KiB; rustls itself refuses handshake messages over 64 KiB).
const MAX_HELLO: usize = 32 * 1024;

/// A TLS record of type handshake starts with this byte.
const HANDSHAKE_RECORD: u8 = 0x16;

/// The fatal `unrecognized_name` alert (RFC 6066 §3), as a plaintext record: it is sent
/// before any key is agreed.
const UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// How long a refused connection is read from before it is closed, so the answer is not lost
/// to a reset.
const REFUSE_LINGER: Duration = Duration::from_millis(200);

/// How a handshake did not give a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The SNI matches no certificate and there is no default.
    UnknownName,
    /// The client sent plain HTTP (answered 400).
    PlainHttp,
    /// The client closed before sending anything (a TCP health check, a port scan).
    Closed,
    /// Anything else: not TLS, a ClientHello rustls refused, an unsupported version, a closed
    /// or reset connection.
    Failed,
}

impl Refusal {
    pub fn event(self) -> Event {
        match self {
            Refusal::UnknownName => Event::TlsUnknownName,
            Refusal::PlainHttp => Event::TlsPlainHttp,
            Refusal::Closed => Event::TlsClosed,
            Refusal::Failed => Event::TlsFailed,
        }
    }
}

/// Run the server side of a TLS handshake on `stream`.
pub async fn accept(certs: &Certs, mut stream: Stream) -> Result<(Stream, Arc<TlsConn>), Refusal> {
    let generation = certs.current();
    let mut hello = Vec::with_capacity(2048);
    let mut parser = rustls::server::Acceptor::default();
    let mut fed = 0;
    let sni = loop {
        if hello.len() >= MAX_HELLO {
            return Err(Refusal::Failed);
        }
        hello.reserve(4096.min(MAX_HELLO - hello.len()));
        match stream.read_buf(&mut hello).await {
            Ok(n) if n > 0 => {}
            _ if hello.is_empty() => return Err(Refusal::Closed),
            _ => return Err(Refusal::Failed),
        }
        if hello[0] != HANDSHAKE_RECORD {
            return Err(not_tls(&mut stream, hello[0]).await);
        }
        while fed < hello.len() {
            match parser.read_tls(&mut &hello[fed..]) {
                Ok(0) | Err(_) => return Err(Refusal::Failed),
                Ok(n) => fed += n,
            }
        }
        match parser.accept() {
            Ok(Some(accepted)) => break accepted.client_hello().server_name().map(Box::from),
            Ok(None) => {}
            Err((_, mut alert)) => {
                let mut bytes = Vec::new();
                let _ = alert.write_all(&mut bytes);
                let _ = stream.write_all(&bytes).await;
                return Err(Refusal::Failed);
            }
        }
    };
    let Some(cert) = generation.set.resolve(sni.as_deref()).cloned() else {
        let _ = stream.write_all(&UNRECOGNIZED_NAME).await;
        let _ = stream.flush().await;
        return Err(Refusal::UnknownName);
    };
    let acceptor = Acceptor::from_server_config(generation.config.clone());
    let chosen = Chosen(Arc::new(TlsConn { cert, sni }));
    let replay = Replay::new(hello, stream);
    match pingora::protocols::tls::server::handshake_with_callback(&acceptor, replay, &chosen).await
    {
        Ok(tls) => Ok((Box::new(tls), chosen.0)),
        Err(_) => Err(Refusal::Failed),
    }
}

/// The first bytes are not a TLS handshake: an HTTP request gets a 400 that says where it went
/// (as nginx does); anything else is closed.
async fn not_tls(stream: &mut Stream, first: u8) -> Refusal {
    if !first.is_ascii_uppercase() {
        return Refusal::Failed;
    }
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        let mut answer = Vec::new();
        Answer::PlainHttpToTls.render(true, &mut answer);
        if stream.write_all(&answer).await.is_ok() && stream.flush().await.is_ok() {
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    Refusal::PlainHttp
}

/// Hands the connection's facts to the digest the request paths read.
struct Chosen(Arc<TlsConn>);

#[async_trait]
impl TlsAccept for Chosen {
    async fn handshake_complete_callback(
        &self,
        _tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        // Stored as the `Arc` itself (see `TlsConn::of`).
        Some(Arc::new(self.0.clone()))
    }
}
