//! What the programs log: `rusty-lb`'s access log (a line per request with what the client
//! sent and got, the same on the fast lane and on the pipeline, in JSON and in nginx's
//! combined format, and a new file after SIGUSR1, for log rotation), and both programs' own
//! logs as JSON lines with `--log-format json`.

use std::path::Path;
use std::time::{Duration, Instant};

use rusty_e2e::*;

/// The file's lines once it has `n` of them.
fn read_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            assert_eq!(lines.len(), n, "{lines:#?}");
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} lines in {}: {lines:#?}",
            lines.len(),
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// The value of a header the backend received, from the head `--echo-headers` appends.
fn echoed(body: &str, name: &str) -> String {
    body.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("the backend got no {name}: {body}"))
}

fn log_flags(dir: &TempDir, format: &str) -> Vec<&'static str> {
    let path = dir.path("access.log").display().to_string();
    let flags = vec![
        "--access-log".to_owned(),
        path,
        "--access-log-format".to_owned(),
        format.to_owned(),
    ];
    flags.into_iter().map(|s| &*s.leak()).collect()
}

#[test]
fn every_request_gets_a_json_line_with_what_the_client_sent_and_got() {
    let a = Echo::start_with("a", &["--echo-headers"]);
    let logs = TempDir::new("access-json");
    let (_dir, lb) = proxy_to(&a, "access-json-lb", &log_flags(&logs, "json"));
    let mut client = Client::new(lb.port);
    // Served by the fast lane: a bodiless GET.
    let get = client
        .request("GET /lane?x=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test-agent/1\r\nReferer: http://r.example/\r\n\r\n")
        .unwrap();
    assert_eq!(get.status, 200);
    // Served by the pipeline: a body, and the client's own request id.
    let post = client
        .request("POST /pipe HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: client-id-7\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    assert_eq!(post.status, 200);
    let (head, _) = raw(
        lb.port,
        "HEAD /head HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");

    let path = logs.path("access.log");
    let lines: Vec<_> = read_lines(&path, 3).iter().map(|l| json(l)).collect();
    let year = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_556_952;
    for l in &lines {
        let time = l["time"].as_str().unwrap();
        assert!(
            time.starts_with(&format!("{year}-")) && time.ends_with('Z') && time.len() == 24,
            "RFC 3339 in UTC: {time}"
        );
        assert_eq!(l["client"], "127.0.0.1");
        assert_eq!(l["host"], "localhost");
        assert_eq!(l["status"], 200);
        assert_eq!(l["backend"], "a");
        assert_eq!(l["service"], "web");
        assert_eq!(l["attempts"], 1);
        assert_eq!(l["class"], "normal");
        assert_eq!(l["tls"], false);
        assert!(l["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{l}");
    }
    let (g, p, h) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(g["method"], "GET");
    assert_eq!(g["path"], "/lane?x=1");
    assert_eq!(g["bytes"], get.body.len(), "the body the client got");
    assert_eq!(
        g["request_id"],
        echoed(&get.body, "x-request-id"),
        "the id the backend got"
    );
    assert_eq!(g["user_agent"], "test-agent/1");
    assert_eq!(g["referer"], "http://r.example/");
    assert_eq!(p["method"], "POST");
    assert_eq!(p["path"], "/pipe");
    assert_eq!(p["bytes"], post.body.len());
    assert_eq!(p["request_id"], "client-id-7");
    assert_eq!(p["user_agent"], "");
    assert_eq!(h["method"], "HEAD");
    assert_eq!(h["bytes"], 0);

    assert_eq!(lb.metric("rustybalancer_access_log_lines_total"), 3.0);
    assert_eq!(lb.metric("rustybalancer_access_log_dropped_total"), 0.0);

    // Rotation: the file is moved away, SIGUSR1, and the next line starts a new file.
    let rotated = logs.path("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    lb.proc.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lb.proc.stderr_text().contains("SIGUSR1: reopening") {
        assert!(Instant::now() < deadline, "{}", lb.proc.stderr_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lb.get("localhost", "/after").status, 200);
    let after = read_lines(&path, 1);
    assert_eq!(json(&after[0])["path"], "/after");
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        3
    );
}

#[test]
fn the_lane_and_the_pipeline_log_a_request_alike() {
    let a = Echo::start("a");
    let line_of = |extra: &[&str], tag: &str| {
        let logs = TempDir::new(tag);
        // A class of its own, so the line shows which one the request was given.
        let path = logs.path("table.json");
        write_atomic(
            &path,
            &serde_json::json!({"version": 1, "services": [{"name": "web", "class": "critical",
                "backends": [{"id": "a", "addr": a.addr(), "weight": 1, "priority": 0}]}]})
            .to_string(),
        );
        let mut flags: Vec<String> = log_flags(&logs, "json")
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        flags.extend(["--table".to_owned(), path.display().to_string()]);
        let lb = Lb::start(&flags);
        lb.wait_version(1, Duration::from_secs(10));
        let r = Client::new(lb.port)
            .request("GET /same?q=2 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: ua\r\n\r\n")
            .unwrap();
        assert_eq!(r.status, 200);
        let mut v = json(&read_lines(&logs.path("access.log"), 1)[0]);
        for k in ["time", "duration_ms", "request_id"] {
            assert!(v.as_object_mut().unwrap().remove(k).is_some(), "{k}");
        }
        v
    };
    let lane = line_of(&[], "access-lane");
    let pipeline = line_of(&["--no-fast-lane"], "access-pipeline");
    assert_eq!(lane["class"], "critical");
    assert_eq!(lane, pipeline);
}

#[test]
fn the_combined_format_is_nginxs_and_refused_requests_are_logged_too() {
    let a = Echo::start("a");
    let logs = TempDir::new("access-combined");
    let (_dir, lb) = proxy_to(&a, "access-combined-lb", &log_flags(&logs, "combined"));
    let r = Client::new(lb.port)
        .request("GET /c?q=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: ua \"2\" \\o/\r\n\r\n")
        .unwrap();
    assert_eq!(r.status, 200);
    // A raw quote in the request line: refused by the connection front before any parser.
    let (refused, _) = raw(lb.port, "GET /\"x HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 400 "), "{refused}");
    let lines = read_lines(&logs.path("access.log"), 2);
    // 127.0.0.1 - - [01/Dec/2026:18:22:03 +0000] "GET /c?q=1 HTTP/1.1" 200 N "-" "ua"
    for line in &lines {
        let (start, rest) = line.split_once(" [").unwrap();
        assert_eq!(start, "127.0.0.1 - -");
        let (time, _) = rest.split_once("] ").unwrap();
        assert_eq!(time.len(), "01/Dec/2026:18:22:03 +0000".len(), "{time}");
        assert!(
            time.ends_with(" +0000") && time.as_bytes()[2] == b'/',
            "{time}"
        );
    }
    let bytes = r.body.len();
    assert!(
        lines[0].ends_with(&format!(
            "] \"GET /c?q=1 HTTP/1.1\" 200 {bytes} \"-\" \"ua \\x222\\x22 \\x5Co/\""
        )),
        "quotes and backslashes escaped as nginx does: {}",
        lines[0]
    );
    let body = refused.split_once("\r\n\r\n").unwrap().1.len();
    assert!(
        lines[1].ends_with(&format!("] \"-\" 400 {body} \"-\" \"-\"")),
        "{}",
        lines[1]
    );
}

/// Every line of `text` is a JSON object with a level and a message; returns the messages.
fn json_log(text: &str) -> Vec<String> {
    assert!(!text.trim().is_empty(), "nothing logged");
    text.lines()
        .map(|l| {
            let v = json(l);
            assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[test]
fn both_programs_log_json_lines_when_asked() {
    let a = Echo::start("a");
    let (_dir, lb) = proxy_to(&a, "json-logs-lb", &["--log-format", "json"]);
    assert_eq!(lb.get("localhost", "/").status, 200);
    let messages = json_log(&lb.proc.stderr_text());
    assert!(
        messages.iter().any(|m| m == "table applied"),
        "{messages:?}"
    );

    let dir = TempDir::new("json-logs-agent");
    let config = dir.path("agent.toml");
    std::fs::write(dir.path("token"), "token-json-logs\n").unwrap();
    std::fs::write(
        &config,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\ntoken_file = \"{}\"\n{}",
            free_port(),
            dir.path("state").display(),
            dir.path("token").display(),
            echo_service("web", 1, "")
        ),
    )
    .unwrap();
    let mut agent = Proc::spawn(
        "rusty-agent",
        &bin("rusty-agent"),
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
            "--log-format".into(),
            "json".into(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.stderr_text().contains("table published") {
        assert!(Instant::now() < deadline, "{}", agent.stderr_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(20));
    let messages = json_log(&agent.stderr_text());
    assert!(
        messages.iter().any(|m| m == "table published"),
        "{messages:?}"
    );
}

/// Clients that leave in the middle of their request are in the access log, not the error
/// log: Pingora's pipeline logged an ERROR line for each, which any client could repeat at
/// will. A backend that refuses connections still gets its ERROR line.
#[test]
fn clients_that_leave_mid_request_are_logged_as_requests_not_as_errors() {
    let a = Echo::start("a");
    let dir = TempDir::new("left-mid-request");
    let log = dir.path("access.log");
    let mut flags = vec!["--no-fast-lane"];
    flags.extend(log_flags(&dir, "json"));
    let (_table, lb) = proxy_to(&a, "left-mid-request-table", &flags);
    const LEFT: usize = 10;
    for _ in 0..LEFT {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", lb.port)).expect("connect");
        // The head and part of the body, then gone.
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten b")
            .expect("send");
    }
    let lines = read_lines(&log, LEFT);
    for line in &lines {
        let entry = json(line);
        assert_eq!(entry["method"], "POST", "{line}");
        assert!(entry["status"].as_u64().is_some_and(|s| s >= 400), "{line}");
    }
    let text = lb.proc.stderr_text();
    assert!(
        !text.contains("ERROR"),
        "clients that left made ERROR lines:\n{text}"
    );
    // What stays an error: a backend that is gone.
    drop(a);
    assert!(lb.get("a", "/").status >= 500);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lb.proc.stderr_text().contains("ERROR") {
        assert!(
            Instant::now() < deadline,
            "no ERROR line for a refused connect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
