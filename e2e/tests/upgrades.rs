//! WebSocket through `rusty-lb`, on both paths (the lane hands an upgrade to the pipeline):
//! the handshake goes through, the connection becomes a tunnel the byte scan no longer reads
//! (frames of any bytes pass both ways), and it closes cleanly.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rusty_e2e::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

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
                .unwrap_or_else(|_| panic!("{extra:?}: no echo"))
                .expect("a message")
                .expect("not an error");
            assert_eq!(back, m, "{extra:?}");
        }
        ws.close(None).await.unwrap();
        drop(lb);
    }
}
