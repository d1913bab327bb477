//! Client connections through the real `rusty-lb`: the whole-head deadline against slow clients,
//! the connection cap, graceful shutdown under keep-alive load, and the zero-downtime binary
//! upgrade.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusty_e2e::*;

/// Read until the peer closes or `limit` passes; what arrived, and when the close came.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    Some(t0.elapsed()),
                )
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    Some(t0.elapsed()),
                )
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), None)
}

#[test]
fn slow_request_heads_get_408_at_the_header_timeout_while_slow_bodies_and_idle_keep_alive_do_not() {
    let a = Echo::start("a");
    let (_dir, lb) = proxy_to(&a, "slowhead", &["--header-timeout", "1"]);
    let t0 = Instant::now();

    // A connection that never sends a byte.
    let mut silent = TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    // A slowloris: a header line every 200 ms, which a per-read timeout would never catch.
    let mut trickle = TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    trickle
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let mut s = trickle.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(Relaxed) && sent < 20 {
                std::thread::sleep(Duration::from_millis(200));
                if s.write_all(b"X-Slow: y\r\n").is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };

    // A keep-alive client idle for longer than the header timeout between two requests: the
    // deadline counts from the first byte of a head, so its second request is served.
    let mut keep = Client::new(lb.port);
    assert_eq!(keep.get("localhost", "/").unwrap().status, 200);

    let (said, closed) = read_until_closed(&mut trickle, Duration::from_secs(4));
    stop.store(true, Relaxed);
    let lines_sent = trickler.join().unwrap();
    let closed = closed.expect("the trickling connection was never closed");
    assert!(said.starts_with("HTTP/1.1 408"), "{said:?}");
    assert!(
        closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );
    assert!(
        lines_sent < 15,
        "the trickler kept sending: {lines_sent} lines"
    );

    let (said, closed) = read_until_closed(&mut silent, Duration::from_secs(3));
    assert!(closed.is_some(), "the silent connection was never closed");
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 408"),
        "{said:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));

    std::thread::sleep(Duration::from_millis(1500).saturating_sub(t0.elapsed()));
    let again = keep.get("localhost", "/").unwrap();
    assert_eq!(again.status, 200);

    // A body that trickles for longer than the header timeout is not cut off: only heads are.
    let mut post = TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    post.write_all(
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 15\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(100));
        post.write_all(b"x").unwrap();
    }
    let (said, _) = read_until_closed(&mut post, Duration::from_secs(5));
    assert!(said.starts_with("HTTP/1.1 200"), "{said:?}");

    assert!(lb.metric("rustybalancer_request_head_timeouts_total") >= 2.0);
}

#[test]
fn connections_over_the_cap_get_503_at_once_and_a_freed_slot_serves_again() {
    let a = Echo::start("a");
    let (_dir, lb) = proxy_to(&a, "cap", &["--max-connections", "3"]);
    let mut held: Vec<Client> = (0..3).map(|_| Client::new(lb.port)).collect();
    for c in &mut held {
        assert_eq!(c.get("localhost", "/").unwrap().status, 200);
    }
    assert_eq!(lb.metric("rustybalancer_client_connections"), 3.0);

    let t0 = Instant::now();
    let (said, closed) = raw(
        lb.port,
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(said.starts_with("HTTP/1.1 503"), "{said:?}");
    assert!(said.contains("Retry-After: 1"), "{said:?}");
    assert!(closed);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(
        lb.metric("rustybalancer_client_connections_refused_total"),
        1.0
    );

    // Free one slot: the next connection is served, and the held ones still are.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while lb.metric("rustybalancer_client_connections") > 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(lb.get("localhost", "/").status, 200);
    for c in &mut held {
        assert_eq!(c.get("localhost", "/").unwrap().status, 200);
    }
}

/// What one keep-alive client saw during a shutdown.
#[derive(Default, Debug)]
struct Seen {
    ok: u64,
    /// Connects refused once the listener had closed: expected, the client goes elsewhere.
    refused: u64,
    /// A request written on an open connection that got no response: must never happen.
    failed: Vec<String>,
}

/// A client that sends GETs until stopped: on one keep-alive connection, or a new connection
/// per request (`fresh`). A refused connect ends a keep-alive client (its server is gone) and
/// is counted by a fresh one, which goes on.
fn client_loop(port: u16, stop: Arc<AtomicBool>, fresh: bool) -> Seen {
    let mut seen = Seen::default();
    let mut client = Client::new(port);
    let head = if fresh {
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    } else {
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    };
    while !stop.load(Relaxed) {
        match client.request(head) {
            Ok(r) if r.status == 200 => seen.ok += 1,
            Ok(r) => seen.failed.push(format!("status {}", r.status)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                seen.refused += 1;
                if !fresh {
                    break;
                }
            }
            Err(e) => seen.failed.push(e.to_string()),
        }
    }
    seen
}

/// Wait for every client and add up what they saw.
fn join_all(clients: Vec<std::thread::JoinHandle<Seen>>) -> Seen {
    let mut total = Seen::default();
    for c in clients {
        let seen = c.join().expect("client thread");
        total.ok += seen.ok;
        total.refused += seen.refused;
        total.failed.extend(seen.failed);
    }
    total
}

#[test]
fn sigterm_under_keep_alive_load_fails_no_request_and_exits_once_the_last_is_done() {
    let a = Echo::start("a");
    let b = Echo::start_with("b", &["--delay-ms", "5"]);
    let dir = TempDir::new("drain");
    let path = dir.path("table.json");
    write_atomic(
        &path,
        &table(1, &[("a", &a.addr(), 1, 0), ("b", &b.addr(), 1, 0)]),
    );
    let mut lb = Lb::start(&["--table".to_owned(), path.display().to_string()]);
    lb.wait_version(1, Duration::from_secs(10));

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            let port = lb.port;
            std::thread::spawn(move || client_loop(port, stop, false))
        })
        .collect();
    // Plus idle keep-alive connections, which must not hold the exit up to the grace period.
    let mut idle: Vec<Client> = (0..4).map(|_| Client::new(lb.port)).collect();
    for c in &mut idle {
        assert_eq!(c.get("localhost", "/").unwrap().status, 200);
    }
    std::thread::sleep(Duration::from_millis(700));

    let t0 = Instant::now();
    lb.proc.signal("TERM");
    let code = lb.proc.wait_exit(Duration::from_secs(5));
    let exited_after = t0.elapsed();
    stop.store(true, Relaxed);
    let total = join_all(clients);
    eprintln!("graceful shutdown under load: {total:?}, exit after {exited_after:?}");
    assert!(
        total.failed.is_empty(),
        "requests failed: {:?}",
        total.failed
    );
    assert!(total.ok > 100, "{total:?}");
    assert_eq!(code, Some(0));
    // Exit is prompt: the drain window for idle connections, not the 5 s grace period.
    assert!(exited_after < Duration::from_secs(3), "{exited_after:?}");
}

#[test]
fn a_binary_upgrade_under_load_refuses_no_connection_and_fails_no_request() {
    let a = Echo::start("a");
    let dir = TempDir::new("upgrade");
    let path = dir.path("table.json");
    let state = dir.path("state");
    write_atomic(&path, &table(7, &[("a", &a.addr(), 1, 0)]));
    let mut old = Lb::start(&[
        "--table".to_owned(),
        path.display().to_string(),
        "--state-dir".to_owned(),
        state.display().to_string(),
    ]);
    old.wait_version(7, Duration::from_secs(10));

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = [true, true, true, false, false]
        .into_iter()
        .map(|fresh| {
            let stop = stop.clone();
            let port = old.port;
            std::thread::spawn(move || client_loop(port, stop, fresh))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // The new binary: no table source but the state dir (the agent is down), and the listeners
    // of the old one, which it waits for.
    let new = Proc::spawn(
        "rusty-lb-new",
        &bin("rusty-lb"),
        &[
            "--listen".to_owned(),
            format!("127.0.0.1:{}", old.port),
            "--admin".to_owned(),
            format!("127.0.0.1:{}", old.admin),
            "--threads".to_owned(),
            "2".to_owned(),
            "--grace-period".to_owned(),
            "5".to_owned(),
            "--state-dir".to_owned(),
            state.display().to_string(),
            "--upgrade".to_owned(),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    old.proc.signal("QUIT");
    // The old process keeps accepting for Pingora's 5 s hand-over window, then drains.
    let code = old.proc.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Relaxed);
    let total = join_all(clients);
    eprintln!("binary upgrade under load: {total:?}");
    assert_eq!(code, Some(0), "the old rusty-lb did not exit cleanly");
    assert_eq!(total.refused, 0, "{total:?}");
    assert!(
        total.failed.is_empty(),
        "requests failed: {:?}",
        total.failed
    );
    assert!(total.ok > 500, "{total:?}");

    // Only the new process is left, serving the state dir's table on the same ports.
    let lb = Lb {
        proc: new,
        port: old.port,
        admin: old.admin,
    };
    assert_eq!(lb.table_version(), Some(7));
    assert_eq!(lb.get("localhost", "/").backend(), Some("a"));
}

#[test]
fn a_response_still_streaming_at_sigterm_is_finished_not_cut() {
    // 2 s of body in ten pieces, with the echo's head in it so the body is long enough.
    let slow = Echo::start_with("slow", &["--trickle-ms", "2000", "--echo-headers"]);
    let dir = TempDir::new("drain-stream");
    let path = dir.path("table.json");
    write_atomic(&path, &table(1, &[("slow", &slow.addr(), 1, 0)]));
    let mut lb = Lb::start(&["--table".to_owned(), path.display().to_string()]);
    lb.wait_version(1, Duration::from_secs(10));
    let port = lb.port;
    let download = std::thread::spawn(move || Client::new(port).get("localhost", "/stream"));
    // The headers are out and the body is streaming when the signal comes; the drain window
    // for idle connections (0.5 s) passes long before the body is done.
    std::thread::sleep(Duration::from_millis(600));
    lb.proc.signal("TERM");
    let r = download.join().unwrap().expect("the streaming response");
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("hello from slow"), "{:?}", r.body);
    assert!(
        r.body.contains("GET /stream HTTP/1.1"),
        "cut short: {:?}",
        r.body
    );
    assert_eq!(lb.proc.wait_exit(Duration::from_secs(4)), Some(0));
}
