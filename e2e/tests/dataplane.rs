//! The data plane end to end: real `rusty-lb` and `rusty-echo` processes on loopback.

use std::time::Duration;

use rusty_e2e::*;

fn lb_with_table(dir: &TempDir, text: &str) -> Lb {
    let path = dir.path("table.json");
    write_atomic(&path, text);
    Lb::start(&[
        "--table".into(),
        path.display().to_string(),
        "--state-dir".into(),
        dir.path("state").display().to_string(),
    ])
}

#[test]
fn nine_hundred_requests_split_exactly_500_300_100_and_the_spare_gets_none() {
    let (a, b, c, spare) = (
        Echo::start("web-a"),
        Echo::start("web-b"),
        Echo::start("web-c"),
        Echo::start("web-spare"),
    );
    let dir = TempDir::new("dist");
    let lb = lb_with_table(
        &dir,
        &table(
            1,
            &[
                ("web-a", &a.addr(), 5, 0),
                ("web-b", &b.addr(), 3, 0),
                ("web-c", &c.addr(), 1, 0),
                ("web-spare", &spare.addr(), 1, 1),
            ],
        ),
    );
    let mut client = Client::new(lb.port);
    let mut counts = std::collections::BTreeMap::new();
    let mut previous = String::new();
    let mut repeats = 0;
    for _ in 0..900 {
        let r = client.get("localhost", "/").expect("request");
        assert_eq!(r.status, 200, "{}", r.body);
        let id = r.backend().expect("x-backend-id").to_owned();
        repeats += u32::from(id == previous);
        previous = id.clone();
        *counts.entry(id).or_insert(0) += 1;
    }
    assert_eq!(counts.get("web-a"), Some(&500));
    assert_eq!(counts.get("web-b"), Some(&300));
    assert_eq!(counts.get("web-c"), Some(&100));
    assert_eq!(counts.get("web-spare"), None);
    // web-a holds 5 of 9 slots, so once per cycle it must follow itself; nobody else ever does.
    assert_eq!(repeats, 100 - 1);
    lb.wait_metric(
        r#"rustybalancer_requests_total{service="web",backend="web-a",code="200"}"#,
        500.0,
        Duration::from_secs(5),
    );
}

#[test]
fn killing_tier_zero_fails_over_to_tier_one_without_failed_requests() {
    let mut a = Echo::start("web-a");
    let mut b = Echo::start("web-b");
    let spare = Echo::start("web-spare");
    let dir = TempDir::new("failover");
    let lb = lb_with_table(
        &dir,
        &table(
            1,
            &[
                ("web-a", &a.addr(), 1, 0),
                ("web-b", &b.addr(), 1, 0),
                ("web-spare", &spare.addr(), 1, 1),
            ],
        ),
    );
    let load = LoadLoop::start(lb.port, "localhost", 4, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    a.proc.signal("KILL");
    b.proc.signal("KILL");
    let _ = a.proc.wait_exit(Duration::from_secs(2));
    let _ = b.proc.wait_exit(Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(1000));
    let before = load.finish();
    assert!(before.failures.is_empty(), "failed: {:?}", before.failures);
    assert!(before.by_backend.get("web-spare").copied().unwrap_or(0) > 0);

    // With tier 0 ejected, everything now goes to the spare.
    let mut client = Client::new(lb.port);
    for _ in 0..50 {
        let r = client.get("localhost", "/").expect("request");
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), Some("web-spare"));
    }
    assert_eq!(
        lb.metric(r#"rustybalancer_backend_ejected{service="web",backend="web-a"}"#),
        1.0
    );
    assert!(
        lb.metric(
            r#"rustybalancer_upstream_errors_total{service="web",backend="web-a",kind="connect_refused"}"#
        ) >= 1.0
    );
}

#[test]
fn tables_swapped_under_load_fail_no_request() {
    let echoes: Vec<Echo> = ["v1-a", "v1-b", "v2-a", "v2-b"]
        .iter()
        .map(|id| Echo::start(id))
        .collect();
    let set = |version: u64| {
        let (x, y) = if version % 2 == 1 { (0, 1) } else { (2, 3) };
        table(
            version,
            &[
                (&echoes[x].id, &echoes[x].addr(), 1, 0),
                (&echoes[y].id, &echoes[y].addr(), 1, 0),
            ],
        )
    };
    let dir = TempDir::new("swap");
    let lb = lb_with_table(&dir, &set(1));
    let load = LoadLoop::start(lb.port, "localhost", 4, Duration::from_secs(30));
    let path = dir.path("table.json");
    let mut version = 1;
    for _ in 0..60 {
        version += 1;
        write_atomic(&path, &set(version));
        lb.proc.signal("HUP");
        std::thread::sleep(Duration::from_millis(40));
    }
    lb.wait_version(version, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    let report = load.finish();
    assert!(report.failures.is_empty(), "failed: {:?}", report.failures);
    assert!(
        report.ok > 500,
        "too little load to mean anything: {report:?}"
    );
    for e in &echoes {
        assert!(
            report.by_backend.get(&e.id).copied().unwrap_or(0) > 0,
            "{report:?}"
        );
    }
    assert!(lb.metric(r#"rustybalancer_table_updates_total{result="applied"}"#) >= 2.0);
}

#[test]
fn every_kind_of_bad_table_is_rejected_while_traffic_keeps_flowing() {
    let a = Echo::start("web-a");
    let dir = TempDir::new("bad");
    let good = table(5, &[("web-a", &a.addr(), 1, 0)]);
    let lb = lb_with_table(&dir, &good);
    let addr = a.addr();
    let service = |backends: &str, extra: &str| {
        format!(
            r#"{{"version": 9, "services": [{{"name": "web", "backends": [{backends}]{extra}}}]}}"#
        )
    };
    let one = format!(r#"{{"id": "web-a", "addr": "{addr}"}}"#);
    let bad_tables: Vec<(&str, String)> = vec![
        ("malformed JSON", "{\"version\": 9, \"services\": [".into()),
        ("unknown field", service(&one, r#", "colour": "red""#)),
        ("stale version", table(5, &[("web-a", &addr, 1, 0)])),
        (
            "repeated service",
            format!(
                r#"{{"version": 9, "services": [{{"name": "web", "backends": [{one}]}}, {{"name": "web", "path_prefix": "/x"}}]}}"#
            ),
        ),
        ("repeated backend id", service(&format!("{one}, {one}"), "")),
        (
            "bad address",
            service(r#"{"id": "x", "addr": "nowhere:80"}"#, ""),
        ),
        (
            "weight out of range",
            service(
                &format!(r#"{{"id": "x", "addr": "{addr}", "weight": 0}}"#),
                "",
            ),
        ),
        (
            "priority out of range",
            service(
                &format!(r#"{{"id": "x", "addr": "{addr}", "priority": 500}}"#),
                "",
            ),
        ),
        (
            "schedule index out of range",
            service(&one, r#", "schedule": [[7]]"#),
        ),
        (
            "schedule not matching weights",
            service(&one, r#", "schedule": [[0, 0]]"#),
        ),
        (
            "too large",
            format!("{{\"version\": 9, \"pad\": \"{}\"}}", "x".repeat(1 << 20)),
        ),
        (
            "empties the table",
            r#"{"version": 9, "services": []}"#.into(),
        ),
    ];
    let path = dir.path("table.json");
    let mut client = Client::new(lb.port);
    for (i, (kind, text)) in bad_tables.iter().enumerate() {
        write_atomic(&path, text);
        lb.proc.signal("HUP");
        // Wait until the store has looked at it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let counted = |lb: &Lb| {
            lb.metric(r#"rustybalancer_table_updates_total{result="rejected"}"#)
                + lb.metric(r#"rustybalancer_table_updates_total{result="stale"}"#)
        };
        while counted(&lb) < (i + 1) as f64 {
            assert!(std::time::Instant::now() < deadline, "{kind}: never judged");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(lb.table_version(), Some(5), "{kind} changed the table");
        for _ in 0..20 {
            let r = client.get("localhost", "/").expect("request");
            assert_eq!(r.status, 200, "after {kind}: {}", r.body);
        }
    }
    assert_eq!(
        lb.metric(r#"rustybalancer_table_updates_total{result="stale"}"#),
        1.0
    );
    assert_eq!(
        lb.metric(r#"rustybalancer_table_updates_total{result="rejected"}"#),
        11.0
    );
    // The explicit form of "empty" is accepted.
    write_atomic(
        &path,
        r#"{"version": 10, "allow_empty": true, "services": []}"#,
    );
    lb.proc.signal("HUP");
    lb.wait_version(10, Duration::from_secs(5));
    assert_eq!(lb.get("localhost", "/").status, 404);
}

#[test]
fn a_restart_with_no_table_source_serves_the_saved_table_at_once() {
    let a = Echo::start("web-a");
    let dir = TempDir::new("restart");
    let lb = lb_with_table(&dir, &table(3, &[("web-a", &a.addr(), 1, 0)]));
    assert_eq!(lb.get("localhost", "/").status, 200);
    drop(lb);

    // Only the state dir now: no file, no agent.
    let lb = Lb::start(&[
        "--state-dir".into(),
        dir.path("state").display().to_string(),
    ]);
    // The very first request on the new listener is served.
    let r = lb.get("localhost", "/");
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), Some("web-a"));
    assert_eq!(lb.table_version(), Some(3));
}

#[test]
fn a_damaged_saved_table_falls_back_to_the_one_before_and_says_so() {
    let a = Echo::start("web-a");
    let b = Echo::start("web-b");
    let dir = TempDir::new("damaged");
    let path = dir.path("table.json");
    let lb = lb_with_table(&dir, &table(3, &[("web-a", &a.addr(), 1, 0)]));
    write_atomic(&path, &table(4, &[("web-b", &b.addr(), 1, 0)]));
    lb.proc.signal("HUP");
    lb.wait_version(4, Duration::from_secs(10));
    let state = dir.path("state");
    // Applied in memory first, then saved: wait for the save.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(state.join("table.json")).is_ok_and(|t| t.contains("web-b")) {
        assert!(std::time::Instant::now() < deadline, "never saved");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(lb);
    let start = || Lb::start(&["--state-dir".into(), state.display().to_string()]);

    // Truncated mid-write by something else: the table before it serves.
    let saved = std::fs::read(state.join("table.json")).unwrap();
    std::fs::write(state.join("table.json"), &saved[..saved.len() / 2]).unwrap();
    let lb = start();
    assert_eq!(lb.table_version(), Some(3), "{}", lb.proc.stderr_text());
    assert_eq!(lb.get("localhost", "/").backend(), Some("web-a"));
    let metric = |e: &str| {
        lb.metric(&format!(
            "rustybalancer_state_dir_events_total{{event=\"{e}\"}}"
        ))
    };
    assert_eq!(
        (metric("restored_previous"), metric("unusable")),
        (1.0, 1.0)
    );
    let log = lb.proc.stderr_text();
    assert!(
        log.contains("the saved table is unusable; restored the one before it")
            && log.contains("table.json"),
        "{log}"
    );
    drop(lb);

    // Both garbage: no table, and the log says that, not that one keeps serving.
    std::fs::write(state.join("table.json"), "garbage").unwrap();
    std::fs::write(state.join("table.prev.json"), "{").unwrap();
    let lb = start();
    assert_eq!(lb.table_version(), None);
    assert_eq!(lb.get("localhost", "/").status, 503);
    let log = lb.proc.stderr_text();
    assert!(log.contains("no saved table could be restored"), "{log}");
    assert!(!log.contains("keeps serving"), "{log}");
}

/// A small tmpfs of the test's own, unmounted when dropped.
#[test]
fn a_read_only_state_dir_never_holds_a_table_back_and_is_retried() {
    let a = Echo::start("web-a");
    let b = Echo::start("web-b");
    let dir = TempDir::new("readonly");
    let state = dir.path("state");
    // A read-only file system, as the data plane would meet it: mounting one needs root.
    let Some(fs) = Tmpfs::mount(&state) else {
        eprintln!("\n==== SKIPPED: cannot mount a tmpfs here (not root?); the read-only state dir is untested ====\n");
        return;
    };
    let path = dir.path("table.json");
    let lb = lb_with_table(&dir, &table(1, &[("web-a", &a.addr(), 1, 0)]));
    lb.wait_version(1, Duration::from_secs(10));
    fs.remount("ro");
    write_atomic(&path, &table(2, &[("web-b", &b.addr(), 1, 0)]));
    lb.proc.signal("HUP");
    lb.wait_version(2, Duration::from_secs(10));
    assert_eq!(
        lb.get("localhost", "/").backend(),
        Some("web-b"),
        "applied in memory"
    );
    // Saved off the install's path: the refusal follows the install.
    let failed = "rustybalancer_state_dir_events_total{event=\"save_failed\"}";
    lb.wait_metric(failed, 1.0, Duration::from_secs(10));
    assert!(lb
        .proc
        .stderr_text()
        .contains("not saved to the state dir; retrying"));
    fs.remount("rw");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(state.join("table.json"))
        .unwrap()
        .contains("web-b")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never saved after the file system became writable"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(lb);
}

#[test]
fn before_any_table_health_is_503_and_requests_get_503() {
    let dir = TempDir::new("empty");
    let lb = Lb::start(&[
        "--state-dir".into(),
        dir.path("state").display().to_string(),
    ]);
    assert_eq!(lb.admin_get("/healthz").status, 503);
    let r = lb.get("localhost", "/");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("no routing table"));
}

#[test]
fn requests_carry_forwarding_headers_and_unrouted_ones_get_404() {
    let a = Echo::start_with("web-a", &["--echo-headers"]);
    let dir = TempDir::new("headers");
    let text = format!(
        r#"{{"version": 1, "services": [{{"name": "web", "hosts": ["localhost"], "path_prefix": "/app",
            "backends": [{{"id": "web-a", "addr": "{}"}}]}}]}}"#,
        a.addr()
    );
    let lb = lb_with_table(&dir, &text);
    let body = lb.get("LOCALHOST:1234", "/app/x").body.to_ascii_lowercase();
    assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{body}");
    assert!(body.contains("x-forwarded-proto: http"), "{body}");
    assert!(body.contains("x-request-id: "), "{body}");

    let mut client = Client::new(lb.port);
    let r = client
        .request("GET /app HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: mine-42\r\nX-Forwarded-For: 10.1.1.1\r\n\r\n")
        .unwrap();
    let body = r.body.to_ascii_lowercase();
    assert!(body.contains("x-request-id: mine-42"), "{body}");
    // The client is no trusted proxy: its chain is not believed.
    assert!(body.contains("x-forwarded-for: 127.0.0.1\r\n"), "{body}");
    assert!(!body.contains("10.1.1.1"), "{body}");

    for (host, path) in [("localhost", "/other"), ("elsewhere", "/app")] {
        let r = lb.get(host, path);
        assert_eq!(r.status, 404, "{host}{path}");
        assert_eq!(r.body, "no route matched\n");
    }
    lb.wait_metric(
        r#"rustybalancer_requests_total{service="",backend="",code="404"}"#,
        2.0,
        Duration::from_secs(5),
    );
    let table: serde_json::Value = serde_json::from_str(&lb.admin_get("/table").body).unwrap();
    assert_eq!(table["version"], 1);
    assert_eq!(table["services"][0]["backends"][0]["id"], "web-a");
}

#[test]
fn all_backends_down_answers_503_with_a_short_body() {
    let dir = TempDir::new("down");
    let dead = format!("127.0.0.1:{}", free_port());
    let lb = lb_with_table(&dir, &table(1, &[("gone", &dead, 1, 0)]));
    let r = lb.get("localhost", "/");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("no backend"), "{}", r.body);
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_exits_promptly() {
    let slow = Echo::start_with("slow", &["--delay-ms", "700"]);
    let dir = TempDir::new("term");
    let mut lb = lb_with_table(&dir, &table(1, &[("slow", &slow.addr(), 1, 0)]));
    let port = lb.port;
    let inflight = std::thread::spawn(move || get(port, "localhost", "/"));
    std::thread::sleep(Duration::from_millis(200));
    let t0 = std::time::Instant::now();
    lb.proc.signal("TERM");
    let r = inflight.join().expect("client thread");
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), Some("slow"));
    let code = lb.proc.wait_exit(Duration::from_secs(4));
    assert_eq!(
        code,
        Some(0),
        "rusty-lb did not exit after its last request"
    );
    // It exits when the last request is done, not after the whole 5 s grace period.
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

/// Run `rusty-lb` with its admin listener on `admin_ip` and `table`; it must refuse to start
/// (exit 2). Returns what it said.
fn refused_start(admin_ip: &str, table: &std::path::Path) -> String {
    let out = std::process::Command::new(bin("rusty-lb"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("{admin_ip}:{}", free_port())])
        .args(["--table", &table.display().to_string()])
        .output()
        .expect("run rusty-lb");
    assert_eq!(out.status.code(), Some(2));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_table_file_at_start_refuses_to_start_and_says_why() {
    let dir = TempDir::new("badstart");
    let path = dir.path("table.json");
    write_atomic(
        &path,
        r#"{"version": 1, "services": [{"name": "web", "backends": [{"id": "a", "addr": "127.0.0.1:1", "weight": 5000}]}]}"#,
    );
    let err = refused_start("127.0.0.1", &path);
    assert!(err.contains("weight 5000 is out of range"), "{err}");
    assert!(err.contains("table.json"), "{err}");
}

#[test]
fn the_admin_listener_off_loopback_needs_a_token_which_guards_metrics_and_table() {
    let a = Echo::start("a");
    let dir = TempDir::new("admintoken");
    let path = dir.path("table.json");
    write_atomic(&path, &table(1, &[("a", &a.addr(), 1, 0)]));
    let err = refused_start("0.0.0.0", &path);
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("--admin-token-file"), "{err}");

    let token = dir.path("admin.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let lb = Lb::start(&[
        "--table".to_owned(),
        path.display().to_string(),
        "--admin-token-file".to_owned(),
        token.display().to_string(),
    ]);
    let with = |auth: &str, path: &str| {
        Client::new(lb.admin)
            .request(&format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
            ))
            .unwrap()
            .status
    };
    assert_eq!(with("", "/healthz"), 200, "health stays open for probes");
    assert_eq!(with("", "/metrics"), 401);
    assert_eq!(with("Authorization: Bearer nope\r\n", "/table"), 401);
    assert_eq!(with("Authorization: Bearer s3cret\r\n", "/metrics"), 200);
    assert_eq!(with("Authorization: Bearer s3cret\r\n", "/table"), 200);
    for page in ["/", "/status"] {
        assert_eq!(with("", page), 401, "{page}");
        assert_eq!(
            with("Authorization: Bearer s3cret\r\n", page),
            200,
            "{page}"
        );
    }
}

#[test]
fn a_post_is_never_replayed_on_another_backend_but_an_idempotent_get_is() {
    let dir = TempDir::new("replay");
    let (rec_a, rec_b) = (dir.path("a.log"), dir.path("b.log"));
    let a = Echo::start_with(
        "slow-a",
        &[
            "--delay-ms",
            "3000",
            "--record",
            &rec_a.display().to_string(),
        ],
    );
    let b = Echo::start_with("b", &["--record", &rec_b.display().to_string()]);
    // Only `a` at first, so the request surely goes there.
    let lb = lb_with_table(&dir, &table(1, &[("slow-a", &a.addr(), 1, 0)]));
    write_atomic(
        &dir.path("table.json"),
        &table(2, &[("slow-a", &a.addr(), 1, 0), ("b", &b.addr(), 1, 1)]),
    );
    lb.proc.signal("HUP");
    lb.wait_version(2, Duration::from_secs(5));

    let port = lb.port;
    let post = std::thread::spawn(move || {
        Client::new(port).request(
            "POST /once HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    // `a` has the whole POST (it records before its delay) and dies before answering.
    a.proc.signal("KILL");
    let r = post.join().unwrap().expect("a response");
    assert_eq!(
        r.status, 502,
        "the POST must fail, not be sent again: {}",
        r.body
    );
    let recorded = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("/once"))
            .count()
    };
    assert_eq!(recorded(&rec_a), 1);
    assert_eq!(recorded(&rec_b), 0, "the POST reached a second backend");

    // A GET that dies the same way is retried on the other backend: idempotent, no byte of a
    // response seen yet.
    let a2 = Echo::start_with("slow-a2", &["--delay-ms", "3000"]);
    write_atomic(
        &dir.path("table.json"),
        &table(3, &[("slow-a2", &a2.addr(), 1, 0), ("b", &b.addr(), 1, 1)]),
    );
    lb.proc.signal("HUP");
    lb.wait_version(3, Duration::from_secs(5));
    let get = std::thread::spawn(move || get(port, "localhost", "/idempotent"));
    std::thread::sleep(Duration::from_millis(500));
    a2.proc.signal("KILL");
    let r = get.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), Some("b"));
}

#[test]
fn all_backends_down_answers_503_at_once_and_traffic_returns_when_one_comes_back() {
    let dir = TempDir::new("comeback");
    let port = free_port();
    let lb = lb_with_table(
        &dir,
        &table(1, &[("back", &format!("127.0.0.1:{port}"), 1, 0)]),
    );
    let t0 = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(lb.get("localhost", "/").status, 503);
    }
    // Refused connects: no waiting for the connect timeout.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // The only backend is ejected now; when it comes back it is used at once anyway (with no
    // backend in good standing the selection ignores ejections).
    let back = Echo::start_on("back", port, &[]);
    let r = lb.get("localhost", "/");
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), Some("back"));
    drop(back);
}

#[test]
fn a_backend_slower_than_the_service_read_timeout_gets_504_in_time() {
    let slow = Echo::start_with("slow", &["--delay-ms", "2000"]);
    let dir = TempDir::new("read-timeout");
    let text = serde_json::json!({
        "version": 1,
        "services": [{
            "name": "web",
            "read_timeout_ms": 300,
            "connect_timeout_ms": 200,
            "backends": [{"id": "slow", "addr": slow.addr()}],
        }],
    })
    .to_string();
    let lb = lb_with_table(&dir, &text);
    let t0 = std::time::Instant::now();
    let r = lb.get("localhost", "/");
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{}", r.body);
    // A GET that timed out would be retried on another backend (as nginx does), but there is
    // none: the answer is the timeout's 504, after about one read timeout.
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[test]
fn a_backend_that_stops_answering_is_ejected_after_two_read_timeouts() {
    let a = Echo::start("web-a");
    // Accepts connections (the kernel completes them) and never reads or answers: a hung
    // process, or a path that drops everything after the handshake.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    let dir = TempDir::new("hung");
    let text = serde_json::json!({"version": 1, "services": [{
        "name": "web", "read_timeout_ms": 300, "retries": 1, "eject_ms": 30000,
        "backends": [{"id": "a", "addr": a.addr()}, {"id": "hung", "addr": hung_addr}],
    }]})
    .to_string();
    let lb = lb_with_table(&dir, &text);
    let mut slow = 0;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let r = lb.get("localhost", "/");
        // Idempotent: every one is answered, after a retry on `a` when `hung` held it.
        assert_eq!((r.status, r.backend()), (200, Some("web-a")), "{}", r.body);
        if started.elapsed() >= Duration::from_millis(250) {
            slow += 1;
        }
    }
    assert_eq!(
        slow, 2,
        "two read timeouts, then hung is ejected and costs nothing"
    );
    let series = "rustybalancer_upstream_errors_total{service=\"web\",backend=\"hung\",kind=\"read_timeout\"}";
    assert_eq!(lb.metric(series), 2.0);
    assert!(lb
        .proc
        .stderr_text()
        .contains("backend ejected after read timeouts in a row"));

    // Upstream connections carry TCP keepalive (a dead pooled connection is found while idle).
    let ss = std::process::Command::new("ss")
        .args(["-tno", "state", "established", "dst", &a.addr()])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(ss.contains("timer:(keepalive"), "{ss}");
    drop(hung);
}
