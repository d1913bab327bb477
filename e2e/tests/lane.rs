//! The fast lane through the real `rusty-lb`: plain requests are served without Pingora's
//! proxy pipeline, so these tests check what that must not change. Every response framing a
//! backend may use reaches the client byte-exact on one kept-alive connection; a connection
//! moves to the pipeline mid-stream without losing or reordering a request; pooled upstream
//! connections that died while idle cost no failed request; bodies of megabytes arrive
//! byte-exact, and one a backend cuts short closes the client's connection; and the lane and
//! the pipeline (`--no-fast-lane`) forward the same request and give the same answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use rusty_e2e::wire::{connect, read_answer, Answer};
use rusty_e2e::*;

/// A backend of canned answers, one per path, on a real socket: the framings rusty-echo does
/// not produce. Keep-alive unless the answer runs until close.
fn canned_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve_canned(conn));
        }
    });
    port
}

fn serve_canned(conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h.trim_end().is_empty() {
                break;
            }
        }
        let pieces: Vec<Vec<u8>> = match (method.as_str(), path.as_str()) {
            (_, "/chunked") => vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec(),
                b"lo\r\n6\r\n world\r\n".to_vec(),
                b"0\r\n\r\n".to_vec(),
            ],
            (_, "/early") => vec![
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            ],
            (_, "/not-modified") => {
                vec![b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n".to_vec()]
            }
            ("HEAD", "/big") => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n".to_vec()],
            (_, "/big") => {
                let mut v = vec![b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n".to_vec()];
                v.extend((0..20).map(|i| vec![b'a' + i as u8; 10_000]));
                v
            }
            (_, "/large") => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {LARGE}\r\n\r\n");
                vec![head.into_bytes(), large_body(LARGE)]
            }
            // A backend that fails mid-body: a third of what it promised, then it closes.
            (_, "/cut") => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {LARGE}\r\n\r\n");
                vec![head.into_bytes(), large_body(LARGE / 3)]
            }
            (_, "/until-close") => {
                vec![
                    b"HTTP/1.1 200 OK\r\n\r\nstreamed ".to_vec(),
                    b"until close".to_vec(),
                ]
            }
            _ => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()],
        };
        for piece in pieces {
            if out.write_all(&piece).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if path == "/until-close" || path == "/cut" {
            return;
        }
    }
}

/// The length of `/large` (and what `/cut` promises): many pipes' and socket buffers' worth.
const LARGE: usize = 3_000_000;

/// Bytes no two nearby positions of which are alike, so a reordered or repeated piece shows.
fn large_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn lb_for(addr: &str, tag: &str, extra: &[&str]) -> (TempDir, Lb) {
    let dir = TempDir::new(tag);
    let path = dir.path("table.json");
    write_atomic(&path, &table(1, &[("a", addr, 1, 0)]));
    let mut args = vec!["--table".to_owned(), path.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let lb = Lb::start(&args);
    lb.wait_version(1, Duration::from_secs(10));
    (dir, lb)
}

#[test]
fn every_response_framing_reaches_the_client_intact_on_one_connection() {
    let backend = canned_backend();
    let (_dir, lb) = lb_for(&format!("127.0.0.1:{backend}"), "lane-framing", &[]);
    let (mut s, mut r) = connect(lb.port);
    let mut ask = |r: &mut BufReader<TcpStream>, method: &str, path: &str| {
        write!(s, "{method} {path} HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        read_answer(r, method == "HEAD")
    };

    let a = ask(&mut r, "GET", "/chunked");
    assert_eq!((a.status, a.body.as_slice()), (200, &b"hello world"[..]));
    assert_eq!(a.header("transfer-encoding"), Some("chunked"));

    // An interim response is passed on, then the final one.
    let a = ask(&mut r, "GET", "/early");
    assert_eq!(a.status, 103);
    assert_eq!(a.header("link"), Some("</a.css>"));
    let a = read_answer(&mut r, false);
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));

    let a = ask(&mut r, "GET", "/not-modified");
    assert_eq!(a.status, 304);
    let a = ask(&mut r, "HEAD", "/big");
    assert_eq!(
        (a.status, a.header("content-length")),
        (200, Some("200000"))
    );
    let a = ask(&mut r, "GET", "/big");
    assert_eq!(a.body.len(), 200_000);
    assert!(a.body.starts_with(b"aaa") && a.body.ends_with(b"ttt"));

    // Each answer above ended exactly where its framing said: this one is still in step.
    let a = ask(&mut r, "GET", "/plain");
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(a.header("connection"), Some("keep-alive"));

    // A body that runs until the backend closes reaches the client chunked, and the client
    // keeps its connection.
    let a = ask(&mut r, "GET", "/until-close");
    assert_eq!(a.body, b"streamed until close");
    assert_eq!(a.header("transfer-encoding"), Some("chunked"));
    assert_eq!(a.header("connection"), Some("keep-alive"));
    let a = ask(&mut r, "GET", "/plain");
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));

    // Asked to close, it does, after the answer.
    write!(
        s,
        "GET /plain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let a = read_answer(&mut r, false);
    assert_eq!(a.header("connection"), Some("close"));
    let mut rest = Vec::new();
    assert_eq!(
        r.read_to_end(&mut rest).unwrap(),
        0,
        "closed after the answer"
    );

    let all = "rustybalancer_requests_total{service=\"web\",backend=\"a\",code=";
    lb.wait_metric(&format!("{all}\"200\"}}"), 8.0, Duration::from_secs(5));
    assert_eq!(lb.metric(&format!("{all}\"304\"}}")), 1.0);
    assert_eq!(lb.metric("rustybalancer_fast_lane_requests_total"), 9.0);
    assert_eq!(lb.metric("rustybalancer_fast_lane_handovers_total"), 0.0);
}

#[test]
fn large_bodies_arrive_byte_exact_and_one_cut_short_closes_the_connection() {
    let backend = canned_backend();
    let (_dir, lb) = lb_for(&format!("127.0.0.1:{backend}"), "lane-large", &[]);
    let (mut s, mut r) = connect(lb.port);
    for _ in 0..2 {
        write!(s, "GET /large HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        let a = read_answer(&mut r, false);
        assert_eq!(a.status, 200);
        assert!(a.body == large_body(LARGE), "the body differs");
    }
    // Each body ended where its length said: the connection is in step.
    write!(s, "GET /plain HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let a = read_answer(&mut r, false);
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));

    // The backend closes a third of the way in: the client gets the head and what was sent,
    // then its connection closes (it cannot mistake the answer for whole).
    let (mut s, r) = connect(lb.port);
    write!(s, "GET /cut HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut r = r.into_inner();
    r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    r.read_to_end(&mut got).unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"));
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        got[end..] == large_body(LARGE / 3)[..],
        "{} body bytes",
        got.len() - end
    );
    // And the proxy serves on.
    let (mut s, mut r) = connect(lb.port);
    write!(s, "GET /plain HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert_eq!(read_answer(&mut r, false).status, 200);
    assert_eq!(lb.metric("rustybalancer_fast_lane_handovers_total"), 0.0);
}

#[test]
fn a_connection_moves_to_the_pipeline_mid_stream_without_losing_or_reordering_a_request() {
    let a = Echo::start_with("a", &["--echo-headers"]);
    let (_dir, lb) = proxy_to(&a, "lane-handover", &[]);
    let (mut s, mut r) = connect(lb.port);
    // Pipelined in one write: plain, then one the lane hands over (a body), then plain again.
    s.write_all(
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
          GET /three HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .unwrap();
    for line in ["GET /one ", "POST /two ", "GET /three "] {
        let answer = read_answer(&mut r, false);
        assert_eq!(answer.status, 200);
        let body = String::from_utf8_lossy(&answer.body);
        assert!(
            body.contains(line),
            "expected {line:?} answered next, got {body}"
        );
    }
    // The connection is still good, now with the pipeline.
    s.write_all(b"GET /four HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut r, false);
    assert!(String::from_utf8_lossy(&answer.body).contains("GET /four "));
    assert_eq!(lb.metric("rustybalancer_fast_lane_requests_total"), 1.0);
    assert_eq!(lb.metric("rustybalancer_fast_lane_handovers_total"), 1.0);
}

#[test]
fn pooled_connections_to_a_restarted_backend_cost_no_failed_request() {
    let mut a = Echo::start("a");
    let port = a.port;
    let (_dir, lb) = proxy_to(&a, "lane-restart", &[]);
    let mut clients: Vec<Client> = (0..4).map(|_| Client::new(lb.port)).collect();
    for c in clients.iter_mut() {
        assert_eq!(c.get("a", "/").unwrap().status, 200);
    }
    // Every pooled upstream connection now leads to a process that is gone.
    a.proc.signal("KILL");
    a.proc.wait_exit(Duration::from_secs(5));
    let _a = Echo::start_on("a", port, &[]);
    for c in clients.iter_mut() {
        for _ in 0..3 {
            assert_eq!(c.get("a", "/").unwrap().status, 200);
        }
    }
    let series = |kind: &str| {
        format!(
            "rustybalancer_upstream_errors_total{{service=\"web\",backend=\"a\",kind=\"{kind}\"}}"
        )
    };
    lb.wait_metric(
        "rustybalancer_requests_total{service=\"web\",backend=\"a\",code=\"200\"}",
        16.0,
        Duration::from_secs(5),
    );
    assert_eq!(lb.metric(&series("upstream_closed")), 0.0);
    assert_eq!(lb.metric(&series("connect_refused")), 0.0);
}

/// What a backend saw, minus the one line that differs by design (a fresh request id).
fn forwarded(body: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(body)
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("x-request-id:"))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

fn response_headers(a: &Answer) -> Vec<String> {
    a.head_lines()
}

#[test]
fn the_lane_and_the_pipeline_forward_the_same_request_and_answer_alike() {
    let a = Echo::start_with("a", &["--echo-headers"]);
    let trusted = ["--trusted-proxies", "127.0.0.1"];
    let (_d1, lane) = proxy_to(&a, "lane-same", &trusted);
    let (_d2, pipeline) = proxy_to(
        &a,
        "lane-same-pipeline",
        &["--no-fast-lane", "--trusted-proxies", "127.0.0.1"],
    );
    let request = "GET /x?y=1 HTTP/1.1\r\nHost: a:80\r\nUser-Agent: t\r\n\
                   X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: https\r\n\r\n";
    let ask = |port: u16, request: &str| {
        let (mut s, mut r) = connect(port);
        s.write_all(request.as_bytes()).unwrap();
        read_answer(&mut r, request.starts_with("HEAD"))
    };
    let (x, y) = (ask(lane.port, request), ask(pipeline.port, request));
    assert_eq!(forwarded(&x.body), forwarded(&y.body));
    assert!(String::from_utf8_lossy(&x.body).contains("x-forwarded-for: 192.0.2.1, 127.0.0.1"));
    assert!(String::from_utf8_lossy(&x.body).contains("x-request-id: "));
    assert_eq!(response_headers(&x), response_headers(&y));
    // Counted when the connection leaves the lane (here: when the client closes it).
    lane.wait_metric(
        "rustybalancer_fast_lane_requests_total",
        1.0,
        Duration::from_secs(5),
    );
    assert_eq!(
        pipeline.metric("rustybalancer_fast_lane_requests_total"),
        0.0
    );

    let head = request.replacen("GET", "HEAD", 1);
    let (x, y) = (ask(lane.port, &head), ask(pipeline.port, &head));
    assert_eq!(response_headers(&x), response_headers(&y));

    // No backend accepts a connection: the same 503, and the same close.
    let dead = free_port();
    let (_d3, lane) = lb_for(&format!("127.0.0.1:{dead}"), "lane-dead", &[]);
    let (_d4, pipeline) = lb_for(
        &format!("127.0.0.1:{dead}"),
        "lane-dead-p",
        &["--no-fast-lane"],
    );
    let (x, y) = (ask(lane.port, request), ask(pipeline.port, request));
    assert_eq!((x.status, y.status), (503, 503));
    assert_eq!(x.body, y.body);
    assert_eq!(x.header("connection"), Some("close"));
    assert_eq!(x.header("connection"), y.header("connection"));
}

#[test]
fn empty_lines_after_a_request_do_not_keep_an_idle_connection_open() {
    let a = Echo::start("a");
    let (_dir, lb) = proxy_to(&a, "lane-blank", &["--keepalive-timeout", "1"]);
    let (mut s, mut r) = connect(lb.port);
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut r, false).status, 200);
    // Only empty lines follow: the connection is idle, and the keep-alive timeout closes it.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap(), 0);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "closed after {waited:?}, keep-alive timeout 1 s"
    );
}

/// The pipeline's pooled upstream connections are taken again on the thread that gave them
/// back: concurrent keep-alive clients over two threads need about one upstream connection
/// each, none dialled because a pooled one was lost to a race between threads, and no ERROR
/// line for it (Pingora's `failed to acquire reusable stream`, once per hundred reuses or so
/// before).
#[test]
fn the_pipelines_pooled_connections_are_reused_without_a_race() {
    let a = Echo::start_with("a", &["--number-connections"]);
    let (_dir, lb) = proxy_to(&a, "pipeline-pool", &["--no-fast-lane"]);
    const CLIENTS: usize = 8;
    const REQUESTS: usize = 400;
    let port = lb.port;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::new(port);
                let mut highest = 0u64;
                for i in 0..REQUESTS {
                    // Bodies as well: the requests the lane leaves to the pipeline anyway.
                    let r = if i % 2 == 0 {
                        c.get("a", "/")
                    } else {
                        c.request(
                            "POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
                        )
                    }
                    .expect("answered");
                    assert_eq!(r.status, 200);
                    let n: u64 = r
                        .header("x-echo-connection")
                        .expect("rusty-echo numbers its connections")
                        .parse()
                        .expect("a number");
                    highest = highest.max(n);
                }
                highest
            })
        })
        .collect();
    let dialled = workers
        .into_iter()
        .map(|w| w.join().expect("client thread"))
        .max()
        .expect("clients");
    let log = lb.proc.stderr_text();
    assert!(
        !log.contains("failed to acquire reusable stream"),
        "a pooled connection was lost to a race:\n{log}"
    );
    // At most one per client in flight at once, on whichever thread serves it; a few more
    // would be noise, dozens the race.
    assert!(
        dialled <= 2 * CLIENTS as u64,
        "{dialled} upstream connections for {CLIENTS} clients"
    );
}

/// `--work-stealing` (one runtime whose threads steal tasks, Pingora's own threads serving the
/// connections) serves both paths too, over kept-alive connections.
#[test]
fn with_work_stealing_both_paths_serve_kept_alive_connections() {
    let a = Echo::start("a");
    let (_dir, lb) = proxy_to(&a, "work-stealing", &["--work-stealing"]);
    let mut clients: Vec<Client> = (0..4).map(|_| Client::new(lb.port)).collect();
    // GETs first: a connection that sent a body stays with the pipeline.
    for _ in 0..25 {
        for c in clients.iter_mut() {
            assert_eq!(c.get("a", "/").expect("lane").status, 200);
        }
    }
    for _ in 0..25 {
        for c in clients.iter_mut() {
            let post = "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
            assert_eq!(c.request(post).expect("pipeline").status, 200);
        }
    }
    let lane = lb.metric("rustybalancer_fast_lane_requests_total");
    assert!(lane >= 100.0, "{lane} requests on the lane");
}
