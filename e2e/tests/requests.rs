//! Request validation through the real `rusty-lb`: requests whose framing or routing could be
//! read two ways get a 400 and a closed connection, and never reach the backend; valid HTTP/1.0
//! is served, with a Host supplied upstream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rusty_e2e::*;

fn backend_requests(lb: &Lb) -> f64 {
    lb.metric("rustybalancer_requests_total{service=\"web\",backend=\"a\",code=\"200\"}")
}

#[test]
fn ambiguous_requests_get_400_close_and_reach_no_backend() {
    let a = Echo::start_with("a", &["--echo-headers"]);
    let (_dir, lb) = proxy_to(&a, "requests", &[]);

    let cases = [
        ("TE twice", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("TE not chunked last", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        ("two Content-Lengths", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        ("CL list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\na"),
        ("no Host", "GET / HTTP/1.1\r\n\r\n"),
        ("two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("Host with userinfo", "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n"),
        ("Host with a comma", "GET / HTTP/1.1\r\nHost: a,b\r\n\r\n"),
        ("Host with a bad port", "GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n"),
        ("target without /", "GET a/b HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("TE in HTTP/1.0", "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ];
    let before = backend_requests(&lb);
    for (name, request) in cases {
        let (response, closed) = raw(lb.port, request);
        assert!(response.starts_with("HTTP/1.1 400"), "{name}: {response:?}");
        assert!(closed, "{name}: the connection must be closed after a 400");
        assert!(
            !response.contains("hello from"),
            "{name}: reached the backend: {response:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        backend_requests(&lb),
        before,
        "no refused request reached the backend"
    );

    // Content-Length with Transfer-Encoding: the length is dropped, the body read as chunked,
    // and the connection closed after the response (RFC 9112 §6.1), so no second request can
    // hide in the body.
    let (response, closed) = raw(
        lb.port,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert!(closed, "closed after the response: {response:?}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response:?}"
    );
    assert!(
        !response.to_ascii_lowercase().contains("content-length: 40"),
        "{response:?}"
    );
    assert!(
        !response.contains("/smuggled"),
        "the hidden request never reached the backend: {response:?}"
    );
    assert_eq!(
        response.matches("HTTP/1.1 ").count(),
        1,
        "one response only: {response:?}"
    );

    // Valid HTTP/1.0 without Host is served; the backend gets a Host.
    let (response, _) = raw(lb.port, "GET / HTTP/1.0\r\n\r\n");
    assert!(
        response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
        "{response:?}"
    );
    assert!(response.contains("hello from a"), "{response:?}");
    let supplied = format!("host: {}", a.addr());
    assert!(
        response.to_ascii_lowercase().contains(&supplied),
        "the backend sees a Host ({supplied}): {response:?}"
    );
}

#[test]
fn heads_over_the_limits_get_414_or_431_close_and_reach_no_backend() {
    let a = Echo::start("a");
    let (_dir, lb) = proxy_to(&a, "limits", &[]);
    let before = backend_requests(&lb);

    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
        "a".repeat(8 * 1024 + 1)
    );
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(16 * 1024)
    );
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    let block: String = (0..9)
        .map(|i| format!("X-B{i}: {}\r\n", "c".repeat(7 * 1024)))
        .collect();
    let big_head = format!("GET / HTTP/1.1\r\nHost: a\r\n{block}\r\n");
    for (name, request, status) in [
        ("8 KiB + 1 target", long_target, "414"),
        ("one 16 KiB header", big_header, "431"),
        ("120 headers", many_headers, "431"),
        ("63 KiB head", big_head, "431"),
    ] {
        let (response, closed) = raw(lb.port, &request);
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{name}: {response:?}"
        );
        assert!(closed, "{name}: closed");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        backend_requests(&lb),
        before,
        "nothing over a limit was forwarded"
    );
    // Just under every limit is served.
    let fine = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\nX-Ok: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(4000),
        "d".repeat(4000)
    );
    let (response, _) = raw(lb.port, &fine);
    assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
}

/// A wider corpus, grouped by the rule each request breaks. Every one must get a 4xx, have its
/// connection closed, and leave the backend's request count unchanged.
/// One case of `e2e/corpus/malformed.txt`.
struct Case {
    rule: String,
    status: u16,
    reached: usize,
    request: Vec<u8>,
}

/// `\r \n \t \\ \xNN` and `\{N*c}` (N copies of c), as the corpus file documents.
fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b[i + 1] {
            b'r' => out.push(b'\r'),
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b'{' => {
                let end = i + s[i..].find('}').unwrap();
                let (n, c) = s[i + 2..end].split_once('*').unwrap();
                out.extend(c.as_bytes().repeat(n.parse().unwrap()));
                i = end - 1;
            }
            other => panic!("unknown escape \\{}", other as char),
        }
        i += 2;
    }
    out
}

fn corpus() -> Vec<Case> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/malformed.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rule = String::new();
    let mut cases = Vec::new();
    for line in text.lines() {
        if let Some(r) = line.strip_prefix("## ") {
            rule = r.to_owned();
        } else if !line.is_empty() && !line.starts_with('#') {
            let mut parts = line.splitn(3, ' ');
            let mut next = || parts.next().unwrap();
            let (status, reached, request) = (next(), next(), next());
            cases.push(Case {
                rule: rule.clone(),
                status: status.parse().unwrap(),
                reached: reached.parse().unwrap(),
                request: unescape(request),
            });
        }
    }
    cases
}

fn lines_in(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_corpus_of_malformed_and_smuggling_requests_is_refused_at_the_edge() {
    let dir = TempDir::new("corpus-record");
    let record = dir.path("received.log");
    let a = Echo::start_with("a", &["--record", &record.display().to_string()]);
    let (_lb_dir, lb) = proxy_to(&a, "corpus", &[]);

    let cases = corpus();
    let mut failures = Vec::new();
    let mut expected_total = 0;
    for case in &cases {
        let before = lines_in(&record).len();
        let (response, closed) = raw(lb.port, &case.request);
        let status: Option<u16> = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok());
        let reached = lines_in(&record).len() - before;
        expected_total += case.reached;
        if status != Some(case.status) || !closed || reached != case.reached {
            failures.push(format!(
                "{}: {:?} → {:?}, closed: {closed}, reached the backend: {reached} (want {} {})",
                case.rule,
                String::from_utf8_lossy(&case.request),
                response.lines().next().unwrap_or(""),
                case.status,
                case.reached
            ));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let received = lines_in(&record);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(received.len(), expected_total, "{received:#?}");
    assert!(
        !received
            .iter()
            .any(|r| r.to_ascii_lowercase().contains("smuggled")),
        "a request hidden in a body reached the backend: {received:#?}"
    );
    assert!(cases.len() >= 150, "{}", cases.len());
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_timeout() {
    let a = Echo::start("a");
    let (_dir, lb) = proxy_to(&a, "keepalive", &["--keepalive-timeout", "1"]);
    let mut s = TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Idle now: the proxy closes within about a second, well before the 5 s read timeout.
    let idle = std::time::Instant::now();
    let n = s.read(&mut buf).expect("closed, not timed out");
    assert_eq!(n, 0, "the proxy closed the idle connection");
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "not before the timeout: {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "closed after {waited:?}");
}

#[test]
fn bodies_over_max_body_bytes_get_413_whatever_their_framing_and_never_arrive_whole() {
    let dir = TempDir::new("body-limit");
    let record = dir.path("received.log");
    let a = Echo::start_with("a", &["--record", &record.display().to_string()]);
    let (_lb_dir, lb) = proxy_to(&a, "body-limit", &["--max-body-bytes", "100"]);
    let post_cl = |n: usize| {
        format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{}",
            "b".repeat(n)
        )
    };
    let post_chunked = |chunks: &[usize]| {
        let mut s =
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                .to_owned();
        for n in chunks {
            s += &format!("{n:x}\r\n{}\r\n", "c".repeat(*n));
        }
        s + "0\r\n\r\n"
    };
    let cases = [
        (post_cl(100), 200, 1),
        (post_cl(101), 413, 0),
        (post_chunked(&[30, 30, 30]), 200, 1),
        (post_chunked(&[60, 60, 60]), 413, 0),
    ];
    for (request, status, reached) in cases {
        let before = lines_in(&record).len();
        let (response, closed) = raw(lb.port, &request);
        std::thread::sleep(Duration::from_millis(100));
        let got = response.split_whitespace().nth(1).unwrap_or("");
        assert_eq!(got, status.to_string(), "{request:.80} → {response}");
        assert!(closed);
        assert_eq!(lines_in(&record).len() - before, reached, "{request:.80}");
    }
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let a = Echo::start_with("a", &["--echo-headers"]);
    let (_dir, lb) = proxy_to(&a, "pipeline", &[]);
    let (response, closed) = raw(
        lb.port,
        "GET /first HTTP/1.1\r\nHost: a\r\n\r\n\
         POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
         GET /third HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(closed);
    let statuses: Vec<&str> = response
        .match_indices("HTTP/1.1 200")
        .map(|(i, _)| &response[i..i + 12])
        .collect();
    assert_eq!(statuses.len(), 3, "{response}");
    let order: Vec<usize> = ["GET /first ", "POST /second ", "GET /third "]
        .iter()
        .map(|p| {
            response
                .find(p)
                .unwrap_or_else(|| panic!("{p} missing: {response}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{response}");
}
