//! WebSocket through `rusty-lb`, on both paths (the lane hands an upgrade to the pipeline) and
//! through the TLS listener (which also offers h2: a WebSocket client offers no ALPN, or
//! http/1.1): the handshake goes through, the connection becomes a tunnel the byte scan no
//! longer reads (frames of any bytes pass both ways), and it closes cleanly.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rusty_e2e::tls::{Pki, TlsLb};
use rusty_e2e::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket echo server on loopback.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_tunnelled_whole_on_both_paths() {
    let backend = echo_server().await;
    let dir = TempDir::new("websocket");
    let path = dir.path("table.json");
    write_atomic(
        &path,
        &table(1, &[("ws", &format!("127.0.0.1:{backend}"), 1, 0)]),
    );
    for extra in [&[][..], &["--no-fast-lane"][..]] {
        let mut args = vec!["--table".to_owned(), path.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let lb = tokio::task::spawn_blocking(move || {
            let lb = Lb::start(&args);
            lb.wait_version(1, Duration::from_secs(10));
            lb
        })
        .await
        .unwrap();
        let stream = TcpStream::connect(("127.0.0.1", lb.port)).await.unwrap();
        let (mut ws, response) =
            tokio_tungstenite::client_async("ws://chat.example/socket", stream)
                .await
                .unwrap_or_else(|e| panic!("{extra:?}: handshake: {e}"));
        assert_eq!(response.status(), 101, "{extra:?}");
        echo_messages(&mut ws, &format!("{extra:?}")).await;
        ws.close(None).await.unwrap();
        drop(lb);
    }
}

/// Messages of every kind go out and come back whole.
async fn echo_messages<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, what: &str) {
    // Bytes the byte scan would refuse in a request line: a tunnel is not scanned.
    let hostile: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let messages = [
        Message::text("hello"),
        Message::binary(hostile),
        Message::text("GET /a\"b HTTP/1.1\r\n\r\n"),
    ];
    for m in messages {
        ws.send(m.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: no echo"))
            .expect("a message")
            .expect("not an error");
        assert_eq!(back, m, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_tunnelled_through_the_tls_listener() {
    use rustls::pki_types::pem::PemObject;
    let backend = echo_server().await;
    let dir = TempDir::new("websocket-tls");
    let pki = Pki::new(&dir.path("ca"));
    let certs = dir.path("certs");
    pki.issue(&certs, "default", &["DNS:chat.example"], 10);
    let path = dir.path("table.json");
    write_atomic(
        &path,
        &table(1, &[("ws", &format!("127.0.0.1:{backend}"), 1, 0)]),
    );
    let args = vec!["--table".to_owned(), path.display().to_string()];
    let lb = tokio::task::spawn_blocking(move || {
        let lb = TlsLb::start(&certs, &args);
        lb.lb.wait_version(1, Duration::from_secs(10));
        lb
    })
    .await
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.ca()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let stream = TcpStream::connect(("127.0.0.1", lb.tls_port))
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async_tls_with_config(
        "wss://chat.example/socket",
        stream,
        None,
        Some(tokio_tungstenite::Connector::Rustls(Arc::new(config))),
    )
    .await
    .unwrap_or_else(|e| panic!("handshake over TLS: {e}"));
    assert_eq!(response.status(), 101);
    echo_messages(&mut ws, "wss").await;
    ws.close(None).await.unwrap();
    drop(lb);
}
