//! `rusty-lb --agent`: a real WebSocket subscription. The agent side is a minimal stand-in
//! server written here with tokio-tungstenite, so the data plane's side is tested on its own (the
//! real agent is tested end to end in `agent.rs`): it checks the
//! bearer token, sends the current table on connect and each new one after, and records what the
//! data plane sent back (it must be control frames only).

// tungstenite fixes the handshake callback's signature, with its large error type.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rusty_e2e::*;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::Message;

#[derive(Default, Debug)]
struct Seen {
    authorizations: Vec<String>,
    data_frames_from_plane: usize,
    connections: usize,
}

/// Serve tables from `tables` on `port` until `stop` flips; requires `Bearer {token}`.
fn stand_in_agent(
    port: u16,
    token: &'static str,
    tables: watch::Receiver<String>,
    stop: watch::Receiver<bool>,
    seen: Arc<Mutex<Seen>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            let mut stop_accept = stop.clone();
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.unwrap(),
                    _ = stop_accept.changed() => return,
                };
                let seen = seen.clone();
                let mut tables = tables.clone();
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    let seen_hdr = seen.clone();
                    let check = move |req: &Request,
                                      resp: WsResponse|
                          -> Result<WsResponse, ErrorResponse> {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        seen_hdr.lock().unwrap().authorizations.push(auth.clone());
                        if auth == format!("Bearer {token}") {
                            Ok(resp)
                        } else {
                            let mut r = ErrorResponse::new(Some("bad token".into()));
                            *r.status_mut() = http_status_401();
                            Err(r)
                        }
                    };
                    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
                        return;
                    };
                    seen.lock().unwrap().connections += 1;
                    let (mut tx, mut rx) = ws.split();
                    let first = tables.borrow_and_update().clone();
                    if tx.send(Message::Text(first)).await.is_err() {
                        return;
                    }
                    loop {
                        tokio::select! {
                            changed = tables.changed() => {
                                if changed.is_err() { return; }
                                let t = tables.borrow_and_update().clone();
                                if tx.send(Message::Text(t)).await.is_err() { return; }
                            }
                            frame = rx.next() => match frame {
                                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                                    seen.lock().unwrap().data_frames_from_plane += 1;
                                }
                                Some(Ok(_)) => {}
                                _ => return,
                            },
                            _ = stop.changed() => return,
                        }
                    }
                });
            }
        });
    })
}

/// A `rusty-lb` subscribed to the stand-in agent on `port` with `token` (and a state dir if asked).
fn subscribed_lb(dir: &TempDir, port: u16, token: &str, state_dir: bool) -> Lb {
    wait_for_port(port, Duration::from_secs(5));
    let token_file = dir.path("token");
    std::fs::write(&token_file, token).unwrap();
    let mut args = vec![
        "--agent".into(),
        format!("ws://127.0.0.1:{port}/v1/tables"),
        "--token-file".into(),
        token_file.display().to_string(),
    ];
    if state_dir {
        args.extend([
            "--state-dir".into(),
            dir.path("state").display().to_string(),
        ]);
    }
    Lb::start(&args)
}

fn http_status_401() -> tokio_tungstenite::tungstenite::http::StatusCode {
    tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED
}

#[test]
fn tables_arrive_over_the_websocket_and_survive_the_agent_going_away() {
    let a = Echo::start("web-a");
    let b = Echo::start("web-b");
    let dir = TempDir::new("agent");
    let port = free_port();
    let (tables_tx, tables_rx) = watch::channel(table(1, &[("web-a", &a.addr(), 1, 0)]));
    let (stop_tx, stop_rx) = watch::channel(false);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let agent = stand_in_agent(port, "s3cret", tables_rx, stop_rx, seen.clone());
    let lb = subscribed_lb(&dir, port, "s3cret\n", true);
    lb.wait_version(1, Duration::from_secs(10));
    assert_eq!(lb.get("localhost", "/").backend(), Some("web-a"));

    tables_tx
        .send(table(2, &[("web-b", &b.addr(), 1, 0)]))
        .unwrap();
    lb.wait_version(2, Duration::from_secs(5));
    assert_eq!(lb.get("localhost", "/").backend(), Some("web-b"));

    // A bad table over the channel is refused; the good one keeps serving.
    tables_tx
        .send(r#"{"version": 3, "services": [{"name": "web", "nope": 1}]}"#.into())
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while lb.metric(r#"rustybalancer_table_updates_total{result="rejected"}"#) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "bad table never judged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lb.table_version(), Some(2));

    // The agent goes away: the data plane keeps serving its last good table.
    stop_tx.send(true).unwrap();
    agent.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        let r = lb.get("localhost", "/");
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), Some("web-b"));
    }

    // It comes back with a newer table: the data plane reconnects by itself.
    let (tables_tx, tables_rx) = watch::channel(table(4, &[("web-a", &a.addr(), 1, 0)]));
    let (stop_tx, stop_rx) = watch::channel(false);
    let agent = stand_in_agent(port, "s3cret", tables_rx, stop_rx, seen.clone());
    lb.wait_version(4, Duration::from_secs(15));
    assert_eq!(lb.get("localhost", "/").backend(), Some("web-a"));
    drop(tables_tx);
    stop_tx.send(true).unwrap();
    agent.join().unwrap();

    let seen = seen.lock().unwrap();
    assert!(seen.connections >= 2, "{seen:?}");
    assert!(
        seen.authorizations.iter().all(|a| a == "Bearer s3cret"),
        "{seen:?}"
    );
    assert_eq!(
        seen.data_frames_from_plane, 0,
        "the data plane must only receive"
    );
}

#[test]
fn a_wrong_token_is_refused_and_nothing_is_installed() {
    let dir = TempDir::new("agent-token");
    let port = free_port();
    let (_tables_tx, tables_rx) = watch::channel(table(1, &[("x", "127.0.0.1:1", 1, 0)]));
    let (stop_tx, stop_rx) = watch::channel(false);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let agent = stand_in_agent(port, "right", tables_rx, stop_rx, seen.clone());
    let lb = subscribed_lb(&dir, port, "wrong", false);
    // It keeps trying (with backoff) and never gets a table.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().authorizations.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no retry");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lb.table_version(), None);
    assert_eq!(lb.admin_get("/healthz").status, 503);
    assert_eq!(seen.lock().unwrap().connections, 0);
    stop_tx.send(true).unwrap();
    agent.join().unwrap();
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_flood_of_a_thousand_tables_converges_on_the_last_without_growing_memory() {
    let a = Echo::start("web-a");
    let b = Echo::start("web-b");
    let dir = TempDir::new("agent-flood");
    let port = free_port();
    const TABLES: u64 = 1000;
    let addrs = (a.addr(), b.addr());
    // Unlike the stand-in above (which, like the real agent, sends only the newest table), this
    // peer writes every one of them back to back.
    let flood = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            // The first connections may be port probes; the data plane's is the one that
            // completes a handshake.
            let mut ws = loop {
                let (stream, _) = listener.accept().await.unwrap();
                if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                    break ws;
                }
            };
            let t0 = std::time::Instant::now();
            for v in 1..=TABLES {
                // Alternate the backend so every table is a real change.
                let addr = if v % 2 == 0 { &addrs.0 } else { &addrs.1 };
                let id = if v % 2 == 0 { "web-a" } else { "web-b" };
                ws.send(Message::Text(table(v, &[(id, addr, 1, 0)])))
                    .await
                    .unwrap();
            }
            let sent_in = t0.elapsed();
            // Hold the connection open until the test is done with it.
            let _ = tokio::time::timeout(Duration::from_secs(20), ws.next()).await;
            sent_in
        })
    });
    let lb = subscribed_lb(&dir, port, "any", false);
    // The load is about the flood, not about the moment before the first table.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while lb.table_version().is_none() {
        assert!(std::time::Instant::now() < deadline, "no table arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let rss_before = rss_kib(lb.proc.pid());
    let load = LoadLoop::start(lb.port, "localhost", 2, Duration::from_secs(20));
    lb.wait_version(TABLES, Duration::from_secs(15));
    let report = load.finish();
    let rss_after = rss_kib(lb.proc.pid());
    assert_eq!(lb.get("localhost", "/").backend(), Some("web-a"));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(
        lb.metric(r#"rustybalancer_table_updates_total{result="applied"}"#) >= 1.0,
        "no table applied"
    );
    eprintln!("flood: RSS {rss_before} KiB → {rss_after} KiB");
    // Every table replaces the last: memory does not grow with the number received.
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    drop(lb);
    let sent_in = flood.join().unwrap();
    eprintln!("flood: {TABLES} tables sent in {sent_in:?}");
}
