//! The fast lane against the pipeline (`--no-fast-lane`), byte for byte: the same request sent
//! to both must reach the backends as the same head, the same number of times, and come back
//! as the same answer. Covers every rule of the header editor in both directions, every answer
//! the proxy writes itself, and every retry outcome; each case also checks the answer is the
//! right one, so two paths that are wrong alike do not pass.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rusty_e2e::wire::{connect, exchange, read_answer, Answer};
use rusty_e2e::*;

/// Requests a scripted backend received, by path.
type Arrivals = Arc<Mutex<HashMap<String, usize>>>;

/// A backend on a real socket that answers by path: `/head` echoes the request head it got
/// as its body, `/hop` answers with hop-by-hop headers, `/slow` answers after 1.5 s, anything
/// else `ok`. With `close_all` it reads each request and closes without a word.
fn scripted(close_all: bool) -> (u16, Arrivals) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let arrivals: Arrivals = Arc::default();
    let seen = arrivals.clone();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let seen = seen.clone();
            thread::spawn(move || serve(conn, close_all, &seen));
        }
    });
    (port, arrivals)
}

fn serve(conn: TcpStream, close_all: bool, seen: &Arrivals) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
        *seen.lock().unwrap().entry(path.clone()).or_default() += 1;
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if close_all {
            return;
        }
        let answer = match path.as_str() {
            "/head" => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}",
                head.len()
            ),
            "/hop" => "HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: secret\r\n\
                       Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n\
                       X-Kept: yes\r\nContent-Length: 2\r\n\r\nok"
                .to_owned(),
            "/slow" => {
                thread::sleep(Duration::from_millis(1500));
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow".to_owned()
            }
            _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_owned(),
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// The same table served twice: by `rusty-lb` with its fast lane and without it.
struct Pair {
    lane: Lb,
    pipeline: Lb,
    _dirs: (TempDir, TempDir),
}

impl Pair {
    fn start(tag: &str, table: &str, extra: &[&str]) -> Pair {
        let start = |tag: String, more: &[&str]| {
            let dir = TempDir::new(&tag);
            let path = dir.path("table.json");
            write_atomic(&path, table);
            let mut args = vec!["--table".to_owned(), path.display().to_string()];
            args.extend(extra.iter().chain(more).map(|s| s.to_string()));
            let lb = Lb::start(&args);
            lb.wait_version(1, Duration::from_secs(10));
            (dir, lb)
        };
        let (d1, lane) = start(format!("{tag}-lane"), &[]);
        let (d2, pipeline) = start(format!("{tag}-pipeline"), &["--no-fast-lane"]);
        Pair {
            lane,
            pipeline,
            _dirs: (d1, d2),
        }
    }
}

/// The answer without what differs by design: `Date`, and the request id a backend echoes.
fn comparable(a: &Option<Answer>) -> Option<(Vec<String>, String)> {
    a.as_ref().map(|a| {
        let body = String::from_utf8_lossy(&a.body)
            .lines()
            .filter(|l| !l.to_ascii_lowercase().starts_with("x-request-id:"))
            .map(|l| l.to_ascii_lowercase())
            .collect::<Vec<_>>();
        let mut body = body;
        body.sort();
        (a.head_lines(), body.join("\n"))
    })
}

/// Send `request` to both, check both got the same answer with `status`, and that each
/// backend path saw the same number of arrivals from each (`arrivals` given per path).
fn same(
    pair: &Pair,
    name: &str,
    request: &str,
    status: u16,
    watch: &[(&Arrivals, &str)],
) -> Answer {
    let count = || -> Vec<usize> {
        watch
            .iter()
            .map(|(a, p)| a.lock().unwrap().get(*p).copied().unwrap_or(0))
            .collect()
    };
    let before = count();
    let lane = exchange(pair.lane.port, request.as_bytes());
    let middle = count();
    let pipeline = exchange(pair.pipeline.port, request.as_bytes());
    let after = count();
    let by_lane: Vec<usize> = middle.iter().zip(&before).map(|(m, b)| m - b).collect();
    let by_pipeline: Vec<usize> = after.iter().zip(&middle).map(|(a, m)| a - m).collect();
    assert_eq!(by_lane, by_pipeline, "{name}: arrivals at the backends");
    assert_eq!(comparable(&lane), comparable(&pipeline), "{name}");
    let answer = lane.unwrap_or_else(|| panic!("{name}: no answer"));
    assert_eq!(answer.status, status, "{name}: {}", answer.head);
    answer
}

fn table(good: u16, closer: u16, dead: u16) -> String {
    let b =
        |id: &str, port: u16| serde_json::json!({"id": id, "addr": format!("127.0.0.1:{port}")});
    serde_json::json!({"version": 1, "services": [
        {"name": "main", "hosts": ["main"], "backends": [b("g", good)]},
        {"name": "refused", "hosts": ["refused"], "retries": 2,
         "backends": [b("d", dead), b("g", good)]},
        {"name": "closed", "hosts": ["closed"], "retries": 2,
         "backends": [b("c", closer), b("g", good)]},
        {"name": "allclosed", "hosts": ["allclosed"], "retries": 2,
         "backends": [b("c", closer)]},
        {"name": "slow", "hosts": ["slow"], "read_timeout_ms": 300, "retries": 2,
         "backends": [b("g", good)]},
        {"name": "dead", "hosts": ["dead"], "backends": [b("d", dead)]},
        {"name": "empty", "hosts": ["empty"], "backends": []},
        {"name": "capped", "hosts": ["capped"], "max_inflight": 1, "queue_timeout_ms": 50,
         "backends": [b("g", good)]}
    ]})
    .to_string()
}

fn get(host: &str, path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n")
}

#[test]
fn both_paths_forward_the_same_heads_by_the_editor_rules() {
    let (good, seen) = scripted(false);
    let (closer, _) = scripted(true);
    // Loopback is a trusted proxy here, so the chain rules are seen (`holes.rs` has the rest).
    let pair = Pair::start(
        "diff-heads",
        &table(good, closer, free_port()),
        &["--trusted-proxies", "127.0.0.1"],
    );
    let at = [(&seen, "/head")];
    let forwarded = |name: &str, extra: &str| -> String {
        let a = same(&pair, name, &get("main", "/head", extra), 200, &at);
        String::from_utf8_lossy(&a.body).to_ascii_lowercase()
    };

    // Served by the lane (hop-by-hop headers it strips itself) and by the pipeline alike.
    let body = forwarded(
        "hop-by-hop",
        "Proxy-Authorization: Basic eA==\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nUser-Agent: t\r\n",
    );
    assert!(
        !body.contains("proxy-authorization") && !body.contains("http2-settings"),
        "{body}"
    );
    assert!(body.contains("user-agent: t"), "{body}");
    // Handed over by the lane; stripped by the pipeline's use of the same editor.
    let body = forwarded(
        "connection options",
        "Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n",
    );
    for gone in [
        "x-secret",
        "keep-alive",
        "te:",
        "proxy-connection",
        "connection:",
    ] {
        assert!(!body.contains(gone), "{gone} forwarded: {body}");
    }
    let body = forwarded(
        "forwarded chain",
        "X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-For: 192.0.2.2, 192.0.2.3\r\nX-Forwarded-Proto: https\r\n",
    );
    assert!(
        body.contains("x-forwarded-for: 192.0.2.1, 192.0.2.2, 192.0.2.3, 127.0.0.1\r\n"),
        "{body}"
    );
    assert!(body.contains("x-forwarded-proto: http\r\n"), "{body}");
    assert!(body.contains("x-request-id: "), "an id is added: {body}");
    let body = forwarded("own request id", "X-Request-Id: mine\r\n");
    assert_eq!(body.matches("x-request-id:").count(), 1, "{body}");
    assert!(body.contains("x-request-id: mine"), "{body}");
    let body = forwarded("websocket", "Connection: Upgrade\r\nUpgrade: websocket\r\n");
    assert!(
        body.contains("connection: upgrade") && body.contains("upgrade: websocket"),
        "{body}"
    );
    let body = forwarded("other upgrade", "Connection: Upgrade\r\nUpgrade: h2c\r\n");
    assert!(!body.contains("upgrade"), "{body}");

    // HTTP/1.0 without Host: routed to a catch-all service, the backend's address as the Host
    // upstream (the lane leaves HTTP/1.0 to the pipeline; both answer the same).
    let catch_all = serde_json::json!({"version": 1, "services": [
        {"name": "any", "backends": [{"id": "g", "addr": format!("127.0.0.1:{good}")}]}]});
    let any = Pair::start("diff-heads-any", &catch_all.to_string(), &[]);
    let a = same(
        &any,
        "http/1.0 without host",
        "GET /head HTTP/1.0\r\n\r\n",
        200,
        &at,
    );
    let body = String::from_utf8_lossy(&a.body).to_ascii_lowercase();
    assert!(
        body.contains(&format!("host: 127.0.0.1:{good}\r\n")),
        "{body}"
    );

    // Refused on both, before anything reaches a backend.
    for (name, extra, status) in [
        ("connection names host", "Connection: host\r\n", 400),
        ("connection not a token", "Connection: \"x\"\r\n", 400),
        (
            "too many options",
            "Connection: a,b,c,d,e,f,g,h,i,j,k\r\n",
            400,
        ),
    ] {
        let a = same(&pair, name, &get("main", "/head", extra), status, &at);
        assert_eq!(a.header("connection"), Some("close"), "{name}");
    }

    // The response direction: the backend's hop-by-hop headers stay behind.
    let a = same(
        &pair,
        "response hop-by-hop",
        &get("main", "/hop", ""),
        200,
        &[],
    );
    let head = a.head.to_ascii_lowercase();
    for gone in [
        "x-hop",
        "keep-alive: timeout",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(!head.contains(gone), "{gone} reached the client: {head}");
    }
    assert!(head.contains("x-kept: yes"), "{head}");
}

#[test]
fn both_paths_give_the_same_answers_and_retry_the_same_way() {
    let (good, seen) = scripted(false);
    let (closer, closed) = scripted(true);
    let dead = free_port();
    let pair = Pair::start(
        "diff-answers",
        &table(good, closer, dead),
        &["--max-body-bytes", "10"],
    );

    // Retries: a refused connect goes to the other backend; a backend that closes without an
    // answer gets a GET once and the other backend gets it again.
    same(
        &pair,
        "refused then served",
        &get("refused", "/", ""),
        200,
        &[(&seen, "/")],
    );
    let a = same(
        &pair,
        "closed then served",
        &get("closed", "/x", ""),
        200,
        &[(&closed, "/x"), (&seen, "/x")],
    );
    assert_eq!(a.body, b"ok");
    // Every attempt failed: answered for the last one, and closed.
    let a = same(
        &pair,
        "every backend closes",
        &get("allclosed", "/y", ""),
        502,
        &[(&closed, "/y")],
    );
    assert_eq!(a.header("connection"), Some("close"));
    assert_eq!(
        closed.lock().unwrap()["/y"],
        2,
        "one arrival per path: no other backend to retry on"
    );
    let a = same(
        &pair,
        "timeout",
        &get("slow", "/slow", ""),
        504,
        &[(&seen, "/slow")],
    );
    assert!(String::from_utf8_lossy(&a.body).contains("gateway timeout"));
    let a = same(&pair, "no backend accepts", &get("dead", "/", ""), 503, &[]);
    assert!(String::from_utf8_lossy(&a.body).contains("no backend available"));
    same(
        &pair,
        "a service without backends",
        &get("empty", "/", ""),
        503,
        &[],
    );
    // A POST that reached a backend is not sent again.
    same(
        &pair,
        "post to a closing backend",
        "POST /p HTTP/1.1\r\nHost: allclosed\r\nContent-Length: 2\r\n\r\nhi",
        502,
        &[(&closed, "/p")],
    );

    // The proxy's own answers.
    let a = same(&pair, "no route", &get("nowhere", "/", ""), 404, &[]);
    assert_eq!(a.body, b"no route matched\n");
    assert_eq!(a.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(a.header("connection"), Some("keep-alive"));
    let a = same(&pair, "bad host", &get("a b", "/", ""), 400, &[]);
    assert_eq!(a.header("connection"), Some("close"));
    same(
        &pair,
        "target too long",
        &get("main", &format!("/{}", "x".repeat(9000)), ""),
        414,
        &[],
    );
    same(
        &pair,
        "declared body too large",
        "POST / HTTP/1.1\r\nHost: main\r\nContent-Length: 20\r\n\r\n",
        413,
        &[],
    );
    same(
        &pair,
        "chunked body too large",
        "POST / HTTP/1.1\r\nHost: main\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n01234567890123456789\r\n0\r\n\r\n",
        413,
        &[],
    );
    same(
        &pair,
        "malformed request line",
        "GET /a b HTTP/1.1\r\nHost: main\r\n\r\n",
        400,
        &[],
    );
    same(
        &pair,
        "malformed chunk",
        "POST / HTTP/1.1\r\nHost: main\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        &[],
    );

    // Shed under overload: one slow request holds the only slot; the next waits 50 ms.
    for lb in [&pair.lane, &pair.pipeline] {
        let (mut holder, mut holder_r) = connect(lb.port);
        holder
            .write_all(get("capped", "/slow", "").as_bytes())
            .unwrap();
        thread::sleep(Duration::from_millis(200));
        let shed = exchange(lb.port, get("capped", "/", "").as_bytes()).expect("an answer");
        assert_eq!(shed.status, 503, "{}", shed.head);
        assert_eq!(shed.header("retry-after"), Some("1"));
        assert_eq!(
            shed.header("connection"),
            Some("keep-alive"),
            "the connection stays"
        );
        assert!(String::from_utf8_lossy(&shed.body).contains("normal request shed"));
        assert_eq!(read_answer(&mut holder_r, false).status, 200);
    }
}

#[test]
fn both_paths_answer_alike_at_the_front_and_before_any_table() {
    let (good, _) = scripted(false);
    let pair = Pair::start(
        "diff-front",
        &table(good, free_port(), free_port()),
        &["--max-connections", "2", "--header-timeout", "1"],
    );
    // A head that never ends: 408 at the deadline, on both.
    let trickle = |port| {
        let (mut s, mut r) = connect(port);
        s.write_all(b"GET / HTTP/1.1\r\nHost: main\r\n").unwrap();
        read_answer(&mut r, false)
    };
    let (x, y) = (trickle(pair.lane.port), trickle(pair.pipeline.port));
    assert_eq!(
        (x.status, x.head_lines(), x.body.clone()),
        (408, y.head_lines(), y.body)
    );
    // Over the connection cap: 503 with Retry-After, on both.
    let over = |port| {
        let held: Vec<_> = (0..2).map(|_| connect(port)).collect();
        thread::sleep(Duration::from_millis(100));
        let a = exchange(port, get("main", "/", "").as_bytes()).expect("an answer");
        drop(held);
        a
    };
    let (x, y) = (over(pair.lane.port), over(pair.pipeline.port));
    assert_eq!(x.status, 503);
    assert_eq!(x.header("retry-after"), Some("1"));
    assert_eq!((x.head_lines(), x.body), (y.head_lines(), y.body));

    // No table yet: an agent that never answers.
    let dir = TempDir::new("diff-notable");
    let token = dir.path("token");
    std::fs::write(&token, "t").unwrap();
    let args = |more: &[&str]| -> Vec<String> {
        let mut a = vec![
            "--agent".to_owned(),
            format!("ws://127.0.0.1:{}/v1/tables", free_port()),
            "--token-file".to_owned(),
            token.display().to_string(),
        ];
        a.extend(more.iter().map(|s| s.to_string()));
        a
    };
    let lane = Lb::start(&args(&[]));
    let pipeline = Lb::start(&args(&["--no-fast-lane"]));
    let request = get("main", "/", "");
    let x = exchange(lane.port, request.as_bytes()).expect("an answer");
    let y = exchange(pipeline.port, request.as_bytes()).expect("an answer");
    assert_eq!(x.status, 503);
    assert_eq!(x.body, b"no routing table installed yet\n");
    assert_eq!((x.head_lines(), x.body), (y.head_lines(), y.body));
}
