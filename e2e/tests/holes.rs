//! The holes between the parsers, from the client's side, each on both request paths (with
//! the fast lane and `--no-fast-lane`): a response body cannot switch the byte scan off,
//! empty lines cannot hold a connection, a path is routed as the backend will read it, a
//! client cannot speak for others unless it is a trusted proxy, valid requests of unusual
//! form are served, and a client that stops reading does not hold its connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rusty_e2e::wire::{connect, exchange, read_answer};
use rusty_e2e::*;

fn corpus() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus/hostile-backends.txt")
        .display()
        .to_string()
}

/// One service on any host, to `backend`, served by `rusty-lb` with and without the lane.
fn both(
    tag: &str,
    backend: &Echo,
    services: serde_json::Value,
    extra: &[&str],
) -> Vec<(&'static str, Lb, TempDir)> {
    let table = serde_json::json!({"version": 1, "services": services}).to_string();
    [("lane", &[][..]), ("pipeline", &["--no-fast-lane"][..])]
        .into_iter()
        .map(|(name, more)| {
            let dir = TempDir::new(&format!("{tag}-{name}"));
            let path = dir.path("table.json");
            write_atomic(&path, &table);
            let mut args = vec!["--table".to_owned(), path.display().to_string()];
            args.extend(extra.iter().chain(more).map(|s| s.to_string()));
            let lb = Lb::start(&args);
            lb.wait_version(1, Duration::from_secs(10));
            let _ = backend;
            (name, lb, dir)
        })
        .collect()
}

fn one_service(backend: &Echo) -> serde_json::Value {
    serde_json::json!([{"name": "web", "backends": [{"id": "a", "addr": backend.addr()}]}])
}

/// Read until the peer closes or `limit` passes; whether it closed, and when.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn a_response_body_that_looks_like_a_101_does_not_switch_the_scan_off() {
    let backend = Echo::start_with("a", &["--script", &corpus()]);
    for (name, lb, _dir) in both(
        "blind",
        &backend,
        one_service(&backend),
        &["--header-timeout", "1"],
    ) {
        let (mut s, mut r) = connect(lb.port);
        s.write_all(b"GET /case/body-looks-like-101 HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let a = read_answer(&mut r, false);
        assert_eq!(
            (a.status, a.body.as_slice()),
            (200, &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..]),
            "{name}"
        );
        // Still HTTP, still scanned: a raw quote in the target is refused, not forwarded.
        s.write_all(b"GET /a\"b HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let a = read_answer(&mut r, false);
        assert_eq!(a.status, 400, "{name}: {}", a.head);
        assert_eq!(a.body, b"malformed request line\n", "{name}");
        // And a head that trickles still meets its deadline.
        let (mut s, mut r) = connect(lb.port);
        s.write_all(b"GET /case/body-looks-like-101 HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        read_answer(&mut r, false);
        s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let a = read_answer(&mut r, false);
        assert_eq!(a.status, 408, "{name}: {}", a.head);
    }
}

#[test]
fn empty_lines_between_requests_cannot_hold_a_connection_open() {
    let backend = Echo::start("a");
    let extra = ["--header-timeout", "1", "--keepalive-timeout", "30"];
    for (name, lb, _dir) in both("blank", &backend, one_service(&backend), &extra) {
        let (mut s, mut r) = connect(lb.port);
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(read_answer(&mut r, false).status, 200, "{name}");
        // An empty line every 200 ms: each one is the start of a head that never comes.
        let start = Instant::now();
        let mut closed = None;
        while start.elapsed() < Duration::from_secs(5) {
            if s.write_all(b"\r\n").is_err() {
                closed = Some(start.elapsed());
                break;
            }
            if let Some(after) = closed_within(&mut s, Duration::from_millis(200)) {
                closed = Some(start.elapsed().max(after));
                break;
            }
        }
        let closed =
            closed.unwrap_or_else(|| panic!("{name}: still open after 5 s of empty lines"));
        assert!(
            closed < Duration::from_secs(3),
            "{name}: closed after {closed:?}, header timeout 1 s"
        );
        // A flood of them is refused at once.
        let (mut s, _r) = connect(lb.port);
        s.write_all(&b"\r\n".repeat(40)).unwrap();
        let closed = closed_within(&mut s, Duration::from_secs(2));
        assert!(
            closed.is_some_and(|d| d < Duration::from_secs(1)),
            "{name}: {closed:?}"
        );
        // A bare CR before the request line is no empty line: refused on both paths.
        let a = exchange(lb.port, b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n").expect("an answer");
        assert_eq!(a.status, 400, "{name}: {}", a.head);
    }
}

#[test]
fn paths_are_routed_and_forwarded_in_their_normal_form() {
    let backend = Echo::start_with("a", &["--echo-headers"]);
    let services = serde_json::json!([
        {"name": "api", "path_prefix": "/api", "backends": [{"id": "a", "addr": backend.addr()}]}
    ]);
    for (name, lb, _dir) in both("paths", &backend, services, &[]) {
        let status = |target: &str| {
            exchange(
                lb.port,
                format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
            )
            .expect("an answer")
        };
        // `/secret` has no route, however the request spells it.
        for target in [
            "/secret",
            "/api/../secret",
            "/api/%2e%2e/secret",
            "/api/./../secret",
        ] {
            assert_eq!(status(target).status, 404, "{name}: {target}");
        }
        // An encoded slash reads two ways: refused.
        assert_eq!(status("/api%2f..%2fsecret").status, 400, "{name}");
        // What is routed is what is forwarded.
        let a = status("/api/./v1/../v2?x=1");
        assert_eq!(a.status, 200, "{name}");
        let body = String::from_utf8_lossy(&a.body);
        assert!(body.contains("GET /api/v2?x=1 HTTP/1.1"), "{name}: {body}");
    }
}

#[test]
fn only_trusted_proxies_may_speak_for_someone_else() {
    let backend = Echo::start_with("a", &["--echo-headers"]);
    let request = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.9\r\n\
                    X-Forwarded-Host: admin.internal\r\nForwarded: for=203.0.113.9\r\n\
                    X-Real-IP: 203.0.113.9\r\n\r\n";
    for (trusted, extra) in [
        (false, &[][..]),
        (true, &["--trusted-proxies", "127.0.0.0/8"][..]),
    ] {
        for (name, lb, _dir) in both("trust", &backend, one_service(&backend), extra) {
            let a = exchange(lb.port, request).expect("an answer");
            let body = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
            if trusted {
                assert!(
                    body.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\r\n"),
                    "{name}: {body}"
                );
                assert!(
                    body.contains("x-forwarded-host: admin.internal"),
                    "{name}: {body}"
                );
                assert!(body.contains("x-real-ip: 203.0.113.9"), "{name}: {body}");
            } else {
                assert!(
                    body.contains("x-forwarded-for: 127.0.0.1\r\n"),
                    "{name}: {body}"
                );
                for gone in ["x-forwarded-host", "forwarded:", "x-real-ip", "203.0.113.9"] {
                    assert!(
                        !body.contains(gone),
                        "{name}: {gone} reached the backend: {body}"
                    );
                }
            }
        }
    }
}

#[test]
fn valid_requests_of_unusual_form_are_served() {
    let backend = Echo::start_with("a", &["--echo-headers"]);
    let services = serde_json::json!([
        {"name": "main", "hosts": ["main.example"], "backends": [{"id": "a", "addr": backend.addr()}]}
    ]);
    for (name, lb, _dir) in both("forms", &backend, services, &[]) {
        // The target's authority wins over Host (RFC 9112 §3.2.2), and goes upstream as Host.
        let a = exchange(
            lb.port,
            b"GET http://main.example/x HTTP/1.1\r\nHost: other.example\r\n\r\n",
        )
        .expect("an answer");
        assert_eq!(a.status, 200, "{name}: {}", a.head);
        let body = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
        assert!(
            body.contains("get /x http/1.1"),
            "{name}: origin form upstream: {body}"
        );
        assert!(body.contains("host: main.example\r\n"), "{name}: {body}");
        assert!(!body.contains("other.example"), "{name}: {body}");
        // HTTP/1.0 in absolute form.
        let a =
            exchange(lb.port, b"GET http://main.example/y HTTP/1.0\r\n\r\n").expect("an answer");
        assert_eq!(a.status, 200, "{name}: {}", a.head);
        // Two in one write: each is rewritten, in order.
        let (mut s, mut r) = connect(lb.port);
        let one = "GET http://main.example/one HTTP/1.1\r\nHost: x\r\n\r\n";
        let two = "GET http://main.example/two HTTP/1.1\r\n\r\n";
        s.write_all(format!("{one}{two}").as_bytes()).unwrap();
        for path in ["/one", "/two"] {
            let a = read_answer(&mut r, false);
            assert_eq!(a.status, 200, "{name}: {path}: {}", a.head);
            let body = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
            assert!(
                body.contains(&format!("get {path} http/1.1")),
                "{name}: {body}"
            );
        }
        // A head split across reads, held back and released whole, with the body behind it.
        let (mut s, mut r) = connect(lb.port);
        let body = "b".repeat(100_000);
        s.write_all(b"POST http://main.example/up HTTP/1.1\r\nContent-")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(format!("Length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .unwrap();
        let a = read_answer(&mut r, false);
        assert_eq!(a.status, 200, "{name}: {}", a.head);
        // The body reached the backend whole: the connection carries on in step.
        s.write_all(b"GET /after HTTP/1.1\r\nHost: main.example\r\n\r\n")
            .unwrap();
        let a = read_answer(&mut r, false);
        assert_eq!(a.status, 200, "{name}: {}", a.head);
        assert!(
            String::from_utf8_lossy(&a.body).contains("GET /after"),
            "{name}"
        );
        // A later minor version is served as HTTP/1.1 (RFC 9110 §2.5).
        let a =
            exchange(lb.port, b"GET /z HTTP/1.2\r\nHost: main.example\r\n\r\n").expect("an answer");
        assert_eq!(a.status, 200, "{name}: {}", a.head);
        assert!(a.head.starts_with("HTTP/1.1 200"), "{name}: {}", a.head);
    }
}

#[test]
fn a_client_that_stops_reading_does_not_hold_its_connection() {
    let backend = Echo::start_with("a", &["--script", &corpus()]);
    for (name, lb, _dir) in both(
        "send",
        &backend,
        one_service(&backend),
        &["--send-timeout", "1"],
    ) {
        let mut s = TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
        s.write_all(b"GET /case/twenty-megabytes HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        // Never read: the socket buffers fill and the proxy's writes wait.
        let series = "rustybalancer_client_connections";
        lb.wait_metric(series, 1.0, Duration::from_secs(5));
        let start = Instant::now();
        while lb.metric(series) > 0.0 && start.elapsed() < Duration::from_secs(8) {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            lb.metric(series),
            0.0,
            "{name}: still held after {:?}",
            start.elapsed()
        );
        assert!(
            start.elapsed() >= Duration::from_millis(500),
            "{name}: closed at once?"
        );
        drop(s);
    }
}
